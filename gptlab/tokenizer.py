"""GPT-2 byte-level BPE: load (GPT-2, Hugging Face and gptlab formats), encode, decode, train.

Encoding and decoding run in tiktoken's Rust `CoreBPE`; training runs in Hugging Face `tokenizers`
(Rust) and is converted to the same engine. tiktoken merges the adjacent pair whose concatenation has
the lowest *rank*, so we make rank == token id and check on load that merged tokens' ids increase in
merge order. That is what makes tiktoken reproduce the merges file exactly (GPT-2's own files satisfy
it: 256 byte tokens, then 50,000 merges in order, then `<|endoftext|>` = 50256).

gptlab's saved format is GPT-2's as Hugging Face writes it: `vocab.json` + `merges.txt`, plus a
`tokenizer_config.json` naming the special tokens (so `transformers.GPT2Tokenizer` also reads it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import tiktoken

# GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py), written as tiktoken's `gpt2` encoding writes it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# Unicode's White_Space property: what `\s` matches in tiktoken's regex engine (fancy-regex over the
# regex crate). Python's str.isspace differs (it accepts U+001C..U+001F), so the set is spelled out.
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000").union(map(chr, range(0x2000, 0x200B)))
# fancy-regex gives up on `\s+(?!\S)` over a run of about a million whitespace characters (its
# backtracking limit), and tiktoken turns that into a Rust panic (pyo3 PanicException, a BaseException).
# Runs this long are split off before tiktoken sees them (see `Tokenizer._encode`); any length >= 2 gives
# the same ids, this one keeps ordinary text on tiktoken's fast path.
LONG_WHITESPACE_RUN = 4096
GPT2_VOCAB_SIZE = 50257
FORMAT_VERSION = 1

VOCAB_FILE, MERGES_FILE, CONFIG_FILE = "vocab.json", "merges.txt", "tokenizer_config.json"
GPT2_ENCODER_FILE, GPT2_BPE_FILE = "encoder.json", "vocab.bpe"
HF_TOKENIZER_FILE = "tokenizer.json"
EXPECTED_FILES = (
    f"{VOCAB_FILE} + {MERGES_FILE} (Hugging Face / gptlab), {GPT2_ENCODER_FILE} + {GPT2_BPE_FILE} "
    f"(GPT-2 original) or {HF_TOKENIZER_FILE} (Hugging Face tokenizers)"
)

AllowedSpecial = Literal["all"] | Iterable[str]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (openai/gpt-2 encoder.py)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values, chars = printable[:], printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + len(chars) - len(printable))
    return {b: chr(c) for b, c in zip(byte_values, chars, strict=True)}


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.cache
def _byte_level_table() -> dict[int, str]:
    # str.translate to latin-1 then .encode() decodes a symbol in C; characters outside the
    # alphabet become U+FFFF so that .encode("latin-1") rejects them.
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(c): chr(b) for b, c in bytes_to_unicode().items()})
    return table


def _symbol_bytes(symbol: str, source: str) -> bytes:
    try:
        return symbol.translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(c for c in symbol if c not in _unicode_to_byte())
        raise ValueError(
            f"{source}: token {symbol!r} contains {bad!r}, which is not in GPT-2's byte-level "
            "alphabet; only byte-level BPE vocabularies (GPT-2 style) are supported"
        ) from None


def _symbol(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the file is corrupted or truncated") from None


def _read_vocab(file: Path) -> dict[str, int]:
    vocab = _read_json(file)
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        raise ValueError(f"{file} must be a JSON object mapping token strings to integer ids")
    return vocab


def _read_merges(file: Path) -> list[tuple[str, str]]:
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text ({e}); the file is corrupted") from None
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = [tuple(line.split(" ")) for line in lines[start:] if line]
    bad = lambda m: len(m) != 2 or not m[0] or not m[1]
    if any(map(bad, merges)):
        number, line = next((n, s) for n, s in enumerate(lines[start:], start + 1) if s and bad(s.split(" ")))
        raise ValueError(f"{file} line {number}: expected two tokens separated by a space, got {line!r}")
    return merges


def _verify(
    ranks: dict[bytes, int], merges: Sequence[tuple[bytes, bytes]], special: dict[str, int], source: str
):
    """Check the invariants under which tiktoken's rank-based merging equals the merges file."""
    n = len(ranks) + len(special)
    ids = sorted([*ranks.values(), *special.values()])
    if ids != list(range(n)):
        bad = next(i for i, v in enumerate(ids) if v != i)
        raise ValueError(
            f"{source}: token ids must be 0..{n - 1} without gaps or repeats; id {bad} is missing or repeated"
        )
    clash = [s for s in special if s.encode() in ranks]
    if clash:
        raise ValueError(f"{source}: special tokens {clash} are also ordinary tokens of the vocabulary")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{source}: the {len(missing)} single-byte tokens {missing[:8]}... are missing")
    previous = -1
    for line, (a, b) in enumerate(merges, 1):
        ra, rb, rt = ranks.get(a), ranks.get(b), ranks.get(a + b)
        if ra is None or rb is None or rt is None:
            pair = f"merge {line} ({_symbol(a)} {_symbol(b)})"
            raise ValueError(f"{source}: {pair} uses or produces a token that is not in the vocabulary")
        if rt <= previous or rt <= ra or rt <= rb:
            pair = f"merge {line} ({_symbol(a)} {_symbol(b)})"
            raise ValueError(
                f"{source}: {pair} produces id {rt} after a merge that produced id {previous}; ids of merged "
                "tokens must increase in merge order (tiktoken merges by id)"
            )
        previous = rt
    if sum(len(t) > 1 for t in ranks) != len(merges):
        produced = {a + b for a, b in merges}
        orphan = next(t for t in ranks if len(t) > 1 and t not in produced)
        raise ValueError(
            f"{source}: token {_symbol(orphan)!r} (id {ranks[orphan]}) is neither a byte, the result of a "
            "merge, nor a declared special token"
        )


class Tokenizer:
    """GPT-2 byte-level BPE. Build with `from_pretrained`, `from_files`, `gpt2` or `train`."""

    KNOWN_FILES = (VOCAB_FILE, MERGES_FILE, GPT2_ENCODER_FILE, GPT2_BPE_FILE, HF_TOKENIZER_FILE)

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: dict[str, int],
        *,
        name: str = "gptlab-bpe",
        source: str = "<memory>",
    ) -> None:
        import tiktoken

        _verify(mergeable_ranks, merges, special_tokens, source)
        self.name, self.source = name, source
        self._ranks, self._merges, self._special = dict(mergeable_ranks), list(merges), dict(special_tokens)
        self._enc: tiktoken.Encoding = tiktoken.Encoding(
            name=name, pat_str=GPT2_PATTERN, mergeable_ranks=self._ranks, special_tokens=self._special
        )

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a directory in GPT-2's, Hugging Face's or gptlab's format, or a tokenizer.json file."""
        path = Path(path)
        if path.is_file():
            return cls.from_tokenizer_json(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer path {path} does not exist; expected a directory with {EXPECTED_FILES}"
            )
        for vocab, merges in ((VOCAB_FILE, MERGES_FILE), (GPT2_ENCODER_FILE, GPT2_BPE_FILE)):
            if (path / vocab).is_file() and (path / merges).is_file():
                return cls.from_files(path / vocab, path / merges)
        if (path / HF_TOKENIZER_FILE).is_file():
            return cls.from_tokenizer_json(path / HF_TOKENIZER_FILE)
        found = sorted(p.name for p in path.iterdir())[:12]
        raise FileNotFoundError(f"no tokenizer files in {path}: expected {EXPECTED_FILES}; found {found}")

    @classmethod
    def gpt2(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """GPT-2's own tokenizer from a directory holding its files (never downloads)."""
        tok = cls.from_pretrained(path)
        if tok.vocab_size != GPT2_VOCAB_SIZE or tok._special.get(EOT) != GPT2_VOCAB_SIZE - 1:
            raise ValueError(
                f"{path} holds a {tok.vocab_size}-token vocabulary, not GPT-2's {GPT2_VOCAB_SIZE}"
            )
        return tok

    @classmethod
    def from_files(
        cls,
        vocab_file: str | os.PathLike[str],
        merges_file: str | os.PathLike[str],
        special_tokens: Iterable[str] | None = None,
    ) -> Tokenizer:
        """Load `encoder.json` + `vocab.bpe` or `vocab.json` + `merges.txt`.

        Special tokens are those named in a sibling tokenizer_config.json (gptlab's or Hugging Face's),
        else `special_tokens`, else `<|endoftext|>` when the vocabulary has it.
        """
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        vocab, merges = _read_vocab(vocab_file), _read_merges(merges_file)
        names = set(special_tokens) if special_tokens is not None else None
        config_file = vocab_file.parent / CONFIG_FILE
        if names is None and config_file.is_file():
            config = _read_json(config_file)
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} must be a JSON object")
            if "gptlab" in config:
                names = set(config["gptlab"].get("special_tokens", {}))
            elif "added_tokens_decoder" in config:
                names = {t["content"] for t in config["added_tokens_decoder"].values() if t.get("special")}
        if names is None:
            names = {EOT} & vocab.keys()
        missing = names - vocab.keys()
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {sorted(missing)} are not in the vocabulary")
        special = {s: vocab[s] for s in names}
        return cls._from_symbols(
            vocab, merges, special, f"{vocab_file} + {merges_file.name}", vocab_file.parent.name
        )

    @classmethod
    def from_tokenizer_json(cls, file: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` holding a GPT-2 style byte-level BPE."""
        file = Path(file)
        data = _read_json(file)
        model = data.get("model") if isinstance(data, dict) else None
        if (
            not isinstance(model, dict)
            or model.get("type") != "BPE"
            or not isinstance(model.get("vocab"), dict)
        ):
            raise ValueError(f"{file} does not hold a BPE model (expected a Hugging Face tokenizer.json)")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            raise ValueError(
                f"{file}: pre_tokenizer {pre.get('type')!r} is not GPT-2's (ByteLevel with its regex, "
                "add_prefix_space false); only GPT-2 style byte-level BPE is supported"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        if not all(len(m) == 2 for m in merges):
            raise ValueError(f"{file}: every merge must have exactly two parts")
        vocab = dict(model["vocab"])
        # Added tokens are matched before BPE by Hugging Face, like tiktoken's special tokens.
        special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        for s, i in special.items():
            if vocab.get(s, i) != i:
                raise ValueError(f"{file}: added token {s!r} has id {i} but the vocabulary gives {vocab[s]}")
            vocab[s] = i
        return cls._from_symbols(vocab, merges, special, str(file), file.parent.name)

    @classmethod
    def _from_symbols(
        cls,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        special: dict[str, int],
        source: str,
        name: str,
    ):
        ranks: dict[bytes, int] = {}
        for symbol, i in vocab.items():
            if symbol in special:
                continue
            token = _symbol_bytes(symbol, source)
            if token in ranks:
                raise ValueError(f"{source}: token {symbol!r} appears twice (ids {ranks[token]} and {i})")
            ranks[token] = i
        merged = [(_symbol_bytes(a, source), _symbol_bytes(b, source)) for a, b in merges]
        return cls(ranks, merged, special, name=name or "gptlab-bpe", source=source)

    # ---- encode / decode -------------------------------------------------------------------------
    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self._special)
        if isinstance(allowed_special, str):
            raise ValueError(
                "allowed_special must be 'all' or a set of special tokens, "
                f"got the string {allowed_special!r}"
            )
        allowed = frozenset(allowed_special)
        unknown = allowed - self._special.keys()
        if unknown:
            raise ValueError(
                f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(self._special)}"
            )
        return allowed

    def encode(self, text: str, *, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`.

        Special tokens such as `<|endoftext|>` are matched only when listed in `allowed_special` (or it
        is "all"); otherwise their text is encoded as ordinary text, never an error. Lone surrogates
        (e.g. "\\ud800") cannot be UTF-8 encoded: as in tiktoken, they become U+FFFD (a valid surrogate
        pair is joined into its character first), so
        `decode(encode(s)) == s` holds for every string without them.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special) if allowed_special else frozenset()
        if _long_whitespace_runs(LONG_WHITESPACE_RUN).search(text) is None:
            return self._encode_plain(text, allowed)
        return self._encode(text, allowed)

    def _encode_plain(self, text: str, allowed: frozenset[str]) -> list[int]:
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def _encode(self, text: str, allowed: frozenset[str]) -> list[int]:
        r"""`_encode_plain`'s ids, with each long whitespace run encoded apart from the regex.

        GPT-2's pattern splits a maximal whitespace run W followed by a non-space into W[:-1] (by
        `\s+(?!\S)`) and W[-1] + what follows (the next match starts there); a run that ends the text,
        or meets a special token (where tiktoken ends the regex's text), is one piece. No other
        alternative of the pattern reaches into or across a whitespace run, so the text before W
        tokenizes alone as it does in place, and W[:-1] (or W) is one piece for BPE.
        """
        if any(WHITESPACE.intersection(special) for special in allowed):
            # A special token holding whitespace could span a cut; no GPT-2 special token does.
            return self._encode_plain(text, allowed)
        specials = tuple(allowed)
        ids: list[int] = []
        start = 0
        for run in _long_whitespace_runs(LONG_WHITESPACE_RUN).finditer(text):
            begin, end = run.span()
            alone = end == len(text) or (specials and text.startswith(specials, end))
            stop = end if alone else end - 1
            ids += self._encode_plain(text[start:begin], allowed)
            if stop > begin:  # (empty only for runs of one, were LONG_WHITESPACE_RUN set to 1)
                # tiktoken's BPE of one pre-tokenized piece: what encode_ordinary does with each regex match.
                ids += self._enc._encode_single_piece(text[begin:stop])
            start = stop
        ids += self._encode_plain(text[start:], allowed)
        return ids

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = (), num_threads: int | None = None
    ) -> list[list[int]]:
        """`encode` of each text, in parallel threads (tiktoken releases the GIL); all cores by default."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, got one str; use encode()")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a sequence of str")
        threads = num_threads or _cpu_count()
        allowed = self._allowed(allowed_special) if allowed_special else frozenset()
        long_runs = _long_whitespace_runs(LONG_WHITESPACE_RUN)
        ordinary = [i for i, t in enumerate(texts) if long_runs.search(t) is None]
        if not allowed:
            batch = self._enc.encode_ordinary_batch([texts[i] for i in ordinary], num_threads=threads)
        else:
            batch = self._enc.encode_batch(
                [texts[i] for i in ordinary], num_threads=threads, allowed_special=allowed, disallowed_special=()
            )
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(ordinary, batch, strict=True):
            out[i] = ids
        for i in sorted(set(range(len(texts))) - set(ordinary)):
            out[i] = self._encode(texts[i], allowed)
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of `ids`; for streaming, where a UTF-8 character may span two tokens."""
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError):
            pass  # slow path only on error: find and name the offending id
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for position, i in enumerate(values):
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"token ids must be ints; position {position} holds {i!r}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} at position {position} is out of range [0, {self.vocab_size})"
                )
        return self._enc.decode_bytes(values)

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (pass errors='strict' to raise)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token's text for special tokens)."""
        token_id = operator.index(token_id)  # numpy / torch integers too; floats are a TypeError
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self._enc.decode_single_token_bytes(token_id)

    # ---- properties --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (50257 for GPT-2)."""
        return self._enc.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, the document separator."""
        if EOT not in self._special:
            raise ValueError(
                f"this tokenizer ({self.source}) has no {EOT} token; "
                f"its special tokens: {sorted(self._special)}"
            )
        return self._special[EOT]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE merges in rank order, as byte pairs (exporters such as GGUF need them)."""
        return list(self._merges)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken engine."""
        return self._enc

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()!r})"
        )

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256(f"gptlab-bpe-fingerprint/1\n{GPT2_PATTERN}\n".encode())
        for token, _ in sorted(self._ranks.items(), key=lambda kv: kv[1]):
            h.update(token.hex().encode() + b",")
        h.update(
            b"\nmerges\n" + b",".join(a.hex().encode() + b"+" + b.hex().encode() for a, b in self._merges)
        )
        h.update(b"\nspecial\n" + json.dumps(sorted(self._special.items())).encode())
        return h.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Short stable hash of vocabulary, merges and special tokens (independent of the file format)."""
        return self._fingerprint

    # ---- save / train ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write vocab.json, merges.txt and tokenizer_config.json (readable by transformers too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = {_symbol(t): i for t, i in self._ranks.items()} | self._special
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        merges = "".join(f"{_symbol(a)} {_symbol(b)}\n" for a, b in self._merges)
        config: dict[str, Any] = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "gptlab": {
                "format": FORMAT_VERSION,
                "special_tokens": self._special,
                "fingerprint": self.fingerprint(),
            },
        }
        if EOT in self._special:
            config |= {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        files = {
            VOCAB_FILE: json.dumps(vocab, ensure_ascii=False),
            MERGES_FILE: "#version: 0.2\n" + merges,
            CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }
        for name, text in files.items():
            tmp = directory / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, directory / name)
        return directory

    def save_tokenizer_json(self, file: str | os.PathLike[str]) -> Path:
        """Write this tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`): byte-level BPE with
        GPT-2's pre-tokenizer, the same merges and ids, special tokens as added tokens."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {_symbol(t): i for t, i in self._ranks.items()}
        merges = [(_symbol(a), _symbol(b)) for a, b in self._merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = sorted(self._special.items(), key=lambda kv: kv[1])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
        for token, i in specials:  # added tokens take the next free ids: they must land on ours
            if hf.token_to_id(token) != i:
                raise ValueError(f"special token {token!r} would get id {hf.token_to_id(token)}, not {i}")
        file = Path(file)
        tmp = file.with_name(f".{file.name}.tmp")
        hf.save(str(tmp))
        os.replace(tmp, file)
        return file

    @classmethod
    def train(
        cls,
        corpus: Iterable[str] | Iterable[os.PathLike[str]] | os.PathLike[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (EOT,),
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a byte-level BPE of (at most) `vocab_size` ids, specials included.

        `corpus` is either files (`pathlib.Path` objects, UTF-8) or an iterable of text strings; a plain
        `str` is text, never a file name. Special tokens are cut out of the text first, so no merge spans
        or spells them. Training runs in Hugging Face tokenizers (Rust, all cores) with progress bars.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = 256 + len(special_tokens)
        if vocab_size <= minimum:
            raise ValueError(
                f"vocab_size {vocab_size} leaves no merges: it must exceed 256 bytes "
                f"+ {len(special_tokens)} special tokens = {minimum}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(_training_texts(corpus, special_tokens, show_progress), trainer)
        return cls.from_huggingface(hf, special_tokens)

    @classmethod
    def from_huggingface(cls, hf: Any, special_tokens: Sequence[str] = (EOT,)) -> Tokenizer:
        """Convert a trained `tokenizers.Tokenizer` (byte-level BPE), renumbering ids so rank == id:
        the 256 bytes in byte order, then each merge's result in merge order, then the special tokens."""
        model = json.loads(hf.to_str())["model"]
        source = "trained tokenizer"
        ranks = {bytes([b]): b for b in range(256)}
        merges: list[tuple[bytes, bytes]] = []
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            pair = (_symbol_bytes(a, source), _symbol_bytes(b, source))
            # Two merges can yield the same bytes (ab+c, a+bc); tiktoken knows a token by its bytes, so
            # only the first merge can define its rank.
            if pair[0] + pair[1] not in ranks:
                ranks[pair[0] + pair[1]] = len(ranks)
                merges.append(pair)
        special = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
        return cls(ranks, merges, special, name="gptlab-trained", source=source)


def _training_texts(corpus: Any, special_tokens: Sequence[str], show_progress: bool) -> Iterator[str]:
    """The corpus as text pieces with the special tokens cut out, so that no merge learns them."""
    split = re.compile("|".join(map(re.escape, special_tokens))).split if special_tokens else lambda t: [t]
    if isinstance(corpus, os.PathLike):
        corpus = [corpus]
    if isinstance(corpus, list | tuple) and corpus and isinstance(corpus[0], os.PathLike):
        files = [Path(f) for f in corpus]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"training files not found: {', '.join(missing[:5])}")
        return _read_files(files, split, show_progress)
    return _split_texts([corpus] if isinstance(corpus, str) else corpus, split)


def _split_texts(texts: Iterable[str], split: Callable[[str], list[str]]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str (or pass pathlib.Path files), got {type(text)}")
        yield from filter(None, split(text))


def _read_files(files: list[Path], split: Callable[[str], list[str]], show_progress: bool) -> Iterator[str]:
    """Blocks of whole lines (a newline byte never falls inside a UTF-8 character), with a progress bar."""
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not show_progress
    ) as bar:
        for file in files:
            with file.open("rb") as f:
                while block := b"".join(f.readlines(1 << 20)):
                    bar.update(len(block))
                    try:
                        text = block.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"training file {file} is not UTF-8 text ({e})") from None
                    yield from filter(None, split(text))


@functools.cache
def _long_whitespace_runs(length: int) -> re.Pattern[str]:
    # The lookbehind starts a match only where a run starts: without it, every run shorter than
    # `length` is rescanned from each of its characters (quadratic in the run).
    space = "[" + "".join(sorted(WHITESPACE)) + "]"  # no character of the set is special inside [ ]
    return re.compile(f"(?<!{space}){space}{{{length},}}")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
