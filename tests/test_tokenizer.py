"""Tokenizer tests: GPT-2 ids against two independent implementations (tiktoken built by its own loader
from the same files, and Hugging Face tokenizers), round trips, training, formats, errors."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab import tokenizer as tokenizer_module
from gptlab.tokenizer import EOT, Tokenizer, bytes_to_unicode

# GPT-2's published file hashes (tiktoken_ext/openai_public.py): the fixtures are the real files.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# Manifests store fingerprints, so GPT-2's must never change.
GPT2_FINGERPRINT = "aa9307a33d4ec43b"

HYPOTHESIS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EDGE_CASES = [
    "",
    " ",
    "    ",
    "\n\n\n",
    "  \n  \n\t\t x  ",
    "hello world",
    " Hello, World! ",
    "It's we'll they're I've I'd you'M DON'T",
    "'s'll're'''s",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\r\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; }",
    "1234567890 3.14159 1e-10 0x1F",
    "naïve café Straße ñ Ångström",
    "東京都 中文 日本語のテキスト 한국어",
    "Привет, мир! Ελληνικά עברית العربية हिन्दी",
    "😀🚀👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽",
    "e\u0301 a\u0308 combining",
    "\x00\x01\x7f\x80 control \u200b zero-width \ufeff bom",
    "\u00a0nbsp\u3000ideographic space\u2028line sep\u0085nel",
    "<|endoftext|>",
    "a<|endoftext|>b<|endoftext|>",
    "<|endoftext",
    "x" * 3000,
    " " * 257 + "y",
]

code_text = st.text(alphabet=" \t\n\r'sdmtlvre0123456789.,;:(){}[]<>|=_+-*/#\"\\abcXYZ_é😀", max_size=200)
snippets = st.lists(st.sampled_from(EDGE_CASES) | st.text(max_size=20), max_size=8).map("".join)
valid_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | code_text | snippets
# Lone (and paired) surrogates: a Python str may hold them, UTF-8 cannot.
with_surrogates = st.text(alphabet=st.characters(), max_size=100) | st.lists(
    st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "\udc00\ud800", "a", " ", "😀"]), max_size=10
).map("".join)


# ---- references ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiktoken_reference(gpt2_bpe_dir: Path):
    """tiktoken's GPT-2 built by tiktoken's own loader from the same files (no download)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        str(gpt2_bpe_dir / "vocab.bpe"),
        str(gpt2_bpe_dir / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2-reference", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


def hf_byte_level(vocab_file: Path, merges_file: Path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="module")
def hf_reference(gpt2_bpe_dir: Path):
    return hf_byte_level(gpt2_bpe_dir / "encoder.json", gpt2_bpe_dir / "vocab.bpe")


def utf8_safe(s: str) -> str:
    """What tiktoken encodes in place of `s`: surrogate pairs joined, lone surrogates -> U+FFFD."""
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---- GPT-2 parity ----------------------------------------------------------------------------------
def test_gpt2_basics(gpt2_tokenizer: Tokenizer):
    assert gpt2_tokenizer.vocab_size == len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.eot_id == 50256
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.fingerprint() == GPT2_FINGERPRINT
    assert gpt2_tokenizer.token_bytes(50256) == EOT.encode()
    assert gpt2_tokenizer.token_bytes(220) == b" "


@pytest.mark.parametrize("text", EDGE_CASES)
def test_gpt2_edge_cases_match_references(gpt2_tokenizer, tiktoken_reference, hf_reference, text):
    ids = gpt2_tokenizer.encode(text)
    assert ids == tiktoken_reference.encode_ordinary(text)
    assert ids == hf_reference.encode(text).ids
    assert gpt2_tokenizer.decode(ids) == text


@HYPOTHESIS
@given(text=valid_text)
def test_gpt2_matches_tiktoken_and_hf_tokenizers(gpt2_tokenizer, tiktoken_reference, hf_reference, text):
    ids = gpt2_tokenizer.encode(text)
    assert ids == tiktoken_reference.encode_ordinary(text)
    assert ids == hf_reference.encode(text).ids
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.decode_bytes(ids) == text.encode("utf-8")


@HYPOTHESIS
@given(text=with_surrogates)
def test_surrogates_become_replacement_characters_like_tiktoken(gpt2_tokenizer, tiktoken_reference, text):
    ids = gpt2_tokenizer.encode(text)
    assert ids == tiktoken_reference.encode(text, disallowed_special=())
    assert gpt2_tokenizer.decode(ids) == utf8_safe(text)


def test_lone_surrogate_examples(gpt2_tokenizer):
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode("a\ud800b")) == "a\ufffdb"
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode("\ud83d\ude00")) == "😀"  # a valid pair joins
    assert gpt2_tokenizer.encode("x\udfff", allowed_special="all") == gpt2_tokenizer.encode("x\ufffd")


def test_decode_bytes_streams_without_splitting_characters(gpt2_tokenizer):
    text = "日本語 😀 naïve"
    ids = gpt2_tokenizer.encode(text)
    pieces = [gpt2_tokenizer.decode_bytes([i]) for i in ids]
    assert any(_is_partial_utf8(p) for p in pieces)  # the test exercises a split character
    assert b"".join(pieces) == text.encode()
    assert [gpt2_tokenizer.token_bytes(i) for i in ids] == pieces


def _is_partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_token_bytes_match_reference(gpt2_tokenizer, tiktoken_reference):
    for i in range(0, 50257, 97):
        assert gpt2_tokenizer.token_bytes(i) == tiktoken_reference.decode_single_token_bytes(i)


# ---- special tokens --------------------------------------------------------------------------------
def test_endoftext_is_ordinary_text_unless_allowed(gpt2_tokenizer, tiktoken_reference):
    text = "a<|endoftext|>b"
    ordinary = gpt2_tokenizer.encode(text)
    assert 50256 not in ordinary and ordinary == tiktoken_reference.encode_ordinary(text)
    expected = tiktoken_reference.encode(text, allowed_special="all")
    assert 50256 in expected
    assert gpt2_tokenizer.encode(text, allowed_special="all") == expected
    assert gpt2_tokenizer.encode(text, allowed_special={EOT}) == expected
    assert gpt2_tokenizer.encode(EOT, allowed_special=[EOT]) == [50256]
    assert gpt2_tokenizer.decode(expected) == text


def test_bad_allowed_special(gpt2_tokenizer):
    with pytest.raises(ValueError, match="unknown special tokens"):
        gpt2_tokenizer.encode("x", allowed_special={"<|im_start|>"})
    with pytest.raises(ValueError, match="'all' or a set"):
        gpt2_tokenizer.encode("x", allowed_special=EOT)
    with pytest.raises(TypeError, match="str"):
        gpt2_tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_encode_batch(gpt2_tokenizer):
    texts = [*EDGE_CASES, "a<|endoftext|>b"] * 3
    expected = [gpt2_tokenizer.encode(t) for t in texts]
    assert gpt2_tokenizer.encode_batch(texts) == expected
    assert gpt2_tokenizer.encode_batch(texts, num_threads=1) == expected
    specials = gpt2_tokenizer.encode_batch(texts, allowed_special="all", num_threads=2)
    assert specials == [gpt2_tokenizer.encode(t, allowed_special="all") for t in texts]
    assert specials[-1] != expected[-1]
    with pytest.raises(TypeError, match="one str"):
        gpt2_tokenizer.encode_batch("abc")


# ---- decode errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ids", [[50257], [0, -1], [10**12], [1, 2, 99999]])
def test_decode_out_of_range_ids(gpt2_tokenizer, ids):
    with pytest.raises(ValueError, match="out of range"):
        gpt2_tokenizer.decode(ids)
    with pytest.raises(ValueError, match="out of range"):
        gpt2_tokenizer.token_bytes(ids[-1])


def test_decode_accepts_arrays(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode("Hello world")
    assert gpt2_tokenizer.decode(np.array(ids, dtype=np.int64)) == "Hello world"
    assert gpt2_tokenizer.decode(np.array(ids, dtype=np.uint16)) == "Hello world"
    with pytest.raises(TypeError, match="ints"):
        gpt2_tokenizer.decode([1.5])


# ---- formats ---------------------------------------------------------------------------------------
def hf_tokenizer_json(tok: Tokenizer, directory: Path, old_merges: bool = False) -> Path:
    """Save `tok`, then write Hugging Face's tokenizer.json for it with Hugging Face tokenizers itself."""
    tok.save(directory)
    hf = hf_byte_level(directory / "vocab.json", directory / "merges.txt")
    hf.add_special_tokens(list(tok.special_tokens))
    file = directory / "tokenizer.json"
    hf.save(str(file))
    if old_merges:  # tokenizers < 0.20 wrote merges as "a b" strings, newer ones as [a, b] pairs
        data = json.loads(file.read_text())
        data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        file.write_text(json.dumps(data))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (directory / name).unlink()
    return file


def test_gpt2_from_hf_tokenizer_json(gpt2_tokenizer, tmp_path):
    tok = Tokenizer.from_pretrained(hf_tokenizer_json(gpt2_tokenizer, tmp_path))
    assert tok.fingerprint() == GPT2_FINGERPRINT
    assert tok.eot_id == 50256 and tok.vocab_size == 50257


def test_formats_load_identically(tiny_tokenizer, tmp_path):
    hf_dir = tmp_path / "hf"  # Hugging Face's slow-tokenizer files, no gptlab config
    tiny_tokenizer.save(hf_dir)
    (hf_dir / "tokenizer_config.json").unlink()
    original = tmp_path / "gpt2-original"
    original.mkdir()
    shutil.copy(hf_dir / "vocab.json", original / "encoder.json")
    shutil.copy(hf_dir / "merges.txt", original / "vocab.bpe")
    sources = [
        hf_dir,
        original,
        hf_tokenizer_json(tiny_tokenizer, tmp_path / "new"),
        hf_tokenizer_json(tiny_tokenizer, tmp_path / "old", old_merges=True).parent,
        tiny_tokenizer.save(tmp_path / "saved"),
    ]
    text = "Hello <|endoftext|> wörld 😀  \n\n code()"
    expected = tiny_tokenizer.encode(text, allowed_special="all")
    for source in sources:
        tok = Tokenizer.from_pretrained(source)
        assert tok.fingerprint() == tiny_tokenizer.fingerprint(), source
        assert tok.special_tokens == {EOT: 299}
        assert tok.encode(text, allowed_special="all") == expected
    explicit = Tokenizer.from_files(original / "encoder.json", original / "vocab.bpe")
    assert explicit.fingerprint() == tiny_tokenizer.fingerprint()


def test_saved_tokenizer_is_readable_by_transformers(tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_tokenizer.save(tmp_path)
    hf = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    text = "It's a test: naïve 😀 def f(x):\n\treturn x<|endoftext|>"
    assert hf(text)["input_ids"] == tiny_tokenizer.encode(text, allowed_special="all")
    assert hf.eos_token_id == tiny_tokenizer.eot_id


# ---- training --------------------------------------------------------------------------------------
def test_tiny_tokenizer_shape(tiny_tokenizer: Tokenizer, tiny_corpus):
    assert tiny_tokenizer.vocab_size == 300
    assert tiny_tokenizer.eot_id == 299
    assert tiny_tokenizer.encode(EOT, allowed_special="all") == [299]
    assert len(tiny_tokenizer.encode(EOT)) > 1
    assert [tiny_tokenizer.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]
    text = tiny_corpus[0]
    assert len(tiny_tokenizer.encode(text)) < 0.8 * len(text.encode())  # merges learned something


def test_trained_save_load_round_trip(tiny_tokenizer, tiny_corpus, tmp_path):
    loaded = Tokenizer.from_pretrained(tiny_tokenizer.save(tmp_path / "tok"))
    assert loaded.fingerprint() == tiny_tokenizer.fingerprint() != GPT2_FINGERPRINT
    assert loaded.eot_id == tiny_tokenizer.eot_id
    for text in tiny_corpus[:5] + EDGE_CASES:
        expected = tiny_tokenizer.encode(text, allowed_special="all")
        assert loaded.encode(text, allowed_special="all") == expected


def test_pickles_for_worker_processes(tiny_tokenizer, tiny_corpus):
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.fingerprint() == tiny_tokenizer.fingerprint()
    assert clone.encode(tiny_corpus[1]) == tiny_tokenizer.encode(tiny_corpus[1])


@pytest.fixture(scope="module")
def tiny_hf_reference(tiny_tokenizer, tmp_path_factory):
    directory = tiny_tokenizer.save(tmp_path_factory.mktemp("tiny"))
    return hf_byte_level(directory / "vocab.json", directory / "merges.txt")


@HYPOTHESIS
@given(text=valid_text)
def test_trained_round_trips_and_matches_hf_tokenizers(tiny_tokenizer, tiny_hf_reference, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert ids == tiny_hf_reference.encode(text).ids


def test_train_matches_hf_on_a_larger_vocabulary(tiny_corpus):
    tok = Tokenizer.train(tiny_corpus * 3, vocab_size=600, min_frequency=1, show_progress=False)
    assert 300 < tok.vocab_size <= 600
    assert tok.eot_id == tok.vocab_size - 1
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(tiny_corpus * 3, trainer)
    # Same segmentation as the trained Hugging Face model, only numbered differently.
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for text in tiny_corpus + EDGE_CASES:
        ours = [tok.token_bytes(i) for i in tok.encode(text, allowed_special="all")]
        theirs = [bytes(byte_of[c] for c in symbol) for symbol in hf.encode(text).tokens]
        assert ours == theirs


def test_train_from_files(tmp_path, tiny_corpus):
    files = []
    for i in range(3):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text("".join(tiny_corpus[i::3]), encoding="utf-8")
    tok = Tokenizer.train(files, vocab_size=280, show_progress=False)
    assert tok.vocab_size == 280 and tok.eot_id == 279
    assert tok.decode(tok.encode(tiny_corpus[0])) == tiny_corpus[0]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train([tmp_path / "missing.txt"], vocab_size=280, show_progress=False)
    with pytest.raises(ValueError, match="vocab_size 257"):
        Tokenizer.train(tiny_corpus, vocab_size=257, show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        Tokenizer.train([tmp_path / "latin1.txt"], vocab_size=280, show_progress=False)


def test_training_never_learns_special_tokens():
    documents = "<|endoftext|>".join(["hello world", "world hello", "<|endoftext|>x"] * 30)
    tok = Tokenizer.train(documents, vocab_size=270, min_frequency=1, show_progress=False)
    learned = [tok.token_bytes(i) for i in range(256, tok.eot_id)]
    assert b" world" in learned
    assert not any(b"<|" in t or b"|>" in t or b"endoftext" in t for t in learned)
    with pytest.raises(TypeError, match="must be str"):
        Tokenizer.train([b"bytes"], vocab_size=270, show_progress=False)


# ---- errors ----------------------------------------------------------------------------------------
def test_missing_files_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt.*vocab\.bpe.*tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupted_files_are_named(gpt2_bpe_dir, tmp_path):
    shutil.copy(gpt2_bpe_dir / "vocab.bpe", tmp_path / "merges.txt")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(gpt2_bpe_dir.joinpath("encoder.json").read_text()[:5000])
    with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    vocab.write_text('["a", "b"]')
    with pytest.raises(ValueError, match=r"vocab\.json must be a JSON object"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(ValueError, match="does not hold a BPE model"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.json")


def test_inconsistent_vocabularies_are_rejected(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    encoder = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    first, second = ("".join(m.split(" ")) for m in merges[1:3])

    def load(vocab: dict) -> Tokenizer:
        (tmp_path / "vocab.json").write_text(json.dumps(vocab))
        return Tokenizer.from_pretrained(tmp_path)

    assert load(encoder).fingerprint() == tiny_tokenizer.fingerprint()
    swapped = encoder | {first: encoder[second], second: encoder[first]}  # merges 1 and 2 exchange ids
    with pytest.raises(ValueError, match="increase in merge order"):
        load(swapped)
    with pytest.raises(ValueError, match="missing or repeated"):
        load({k: v for k, v in encoder.items() if k != first})
    with pytest.raises(ValueError, match="single-byte"):
        load({k: v - (v > 0) for k, v in encoder.items() if v != 0})
    with pytest.raises(ValueError, match="neither a byte"):
        load(encoder | {"zzzq": len(encoder)})
    with pytest.raises(ValueError, match="not in GPT-2's byte-level alphabet"):
        load(encoder | {"a b": len(encoder)})
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nbad line here\n")
    with pytest.raises(ValueError, match="line 3"):
        load(encoder)


def test_gpt2_rejects_other_vocabularies(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not GPT-2's"):
        Tokenizer.gpt2(tiny_tokenizer.save(tmp_path))


def test_missing_endoftext(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    # Not declared special, <|endoftext|> would be a multi-byte token no merge produces.
    with pytest.raises(ValueError, match="neither a byte"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", special_tokens=[])
    del vocab[EOT]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 299 and tok.special_tokens == {}
    with pytest.raises(ValueError, match=re.escape(f"has no {EOT} token")):
        tok.eot_id  # noqa: B018


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_train_and_encode(tmp_path, tiny_corpus, capsys):
    from gptlab.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(tiny_corpus), encoding="utf-8")
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "290", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    tok = Tokenizer.from_pretrained(out)
    assert tok.fingerprint() in capsys.readouterr().out
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "def add(a, b):"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("def add(a, b):")]
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "none"), "x"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err


# ---- long runs (tiktoken's regex panics on ~1M whitespace characters) ------------------------------
WHITESPACE_AND_NEAR_MISSES = [*sorted(tokenizer_module.WHITESPACE), "\x1c", "\x1f", "\u180e", "\u200b", "\ufeff"]
RUN_ATOMS = [
    *WHITESPACE_AND_NEAR_MISSES, *"aZé東1٣.'!<>|-_\"#", "'s", "'ll", "'re", EOT, "<|endoftext", "😀", "e\u0301",
]
runs_text = st.lists(
    st.tuples(st.sampled_from(RUN_ATOMS), st.sampled_from([1, 1, 1, 2, 3, 5, 9])), max_size=40
).map(lambda parts: "".join(atom * n for atom, n in parts))


@pytest.mark.parametrize("limit", [1, 2, 3])
@HYPOTHESIS
@given(text=runs_text)
def test_runs_split_from_the_regex_give_tiktokens_ids(gpt2_tokenizer, tiktoken_reference, limit, text):
    # A small threshold sends every whitespace run through the split path, on inputs tiktoken handles.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "LONG_WHITESPACE_RUN", limit)
        ordinary = gpt2_tokenizer.encode(text)
        special = gpt2_tokenizer.encode(text, allowed_special="all")
        batch = gpt2_tokenizer.encode_batch([text, "x", text], allowed_special="all", num_threads=2)
    assert ordinary == tiktoken_reference.encode_ordinary(text)
    assert special == tiktoken_reference.encode(text, allowed_special="all")
    assert batch == [special, [87], special]


@pytest.mark.parametrize(
    "text",
    [
        " " * 5000,
        "x" + " " * 5000 + "y",
        " " * 5000 + "y",
        "\n" * 4999 + " Hello",
        "a" + "\t \n\u3000\xa0" * 2000 + "'s",
        " " * 4096 + EOT + " " * 4097 + EOT + "\n" * 4096,
        ("word " + " " * 4100) * 3,
    ],
)
def test_long_whitespace_runs_match_tiktoken_where_it_succeeds(gpt2_tokenizer, tiktoken_reference, text):
    assert len(text) > tokenizer_module.LONG_WHITESPACE_RUN  # the split path, at the shipped threshold
    assert gpt2_tokenizer.encode(text) == tiktoken_reference.encode_ordinary(text)
    assert gpt2_tokenizer.encode(text, allowed_special="all") == tiktoken_reference.encode(text, allowed_special="all")
    assert gpt2_tokenizer.encode_batch([text]) == [tiktoken_reference.encode_ordinary(text)]


@pytest.mark.parametrize("unit", [" ", "a", "\n", "\r\n", " \t", "\u3000"])
def test_a_megabyte_of_one_character_encodes(gpt2_tokenizer, tiny_tokenizer, unit):
    text = unit * (1_000_000 // len(unit))
    for tok in (gpt2_tokenizer, tiny_tokenizer):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_batch(["x", text + "y"], num_threads=2)[1] == tok.encode(text + "y")
