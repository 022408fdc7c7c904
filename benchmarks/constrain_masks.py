"""Token-mask time of three structured-generation engines on GPT-2's 50,257-id vocabulary.

Not a model run: each engine compiles the same JSON Schema (and a regular expression), then walks
the same token sequence (a valid document, tokenized by gptlab's GPT-2 tokenizer), computing the
allowed-token mask before each token and then consuming it, as a sampling step would. Reports the
one-off setup (tokenizer preparation, then grammar compilation) and the per-token mask time (median and
mean over the document's tokens, repeated --runs times). One thread each. Engines not installed are
skipped.

    python benchmarks/constrain_masks.py [--runs 20] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from gptlab.reports.table import format_table
from gptlab.tokenizer import Tokenizer

DEFAULT_BPE_DIR = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "tags", "address", "role"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "tags": ["mathematician", "writer", "analyst"],
        "address": {"city": "London", "zip": "W1"},
        "role": "admin",
    }
)
REGEX = r"(\+44|0)[0-9]{4} [0-9]{6}( ext\. [0-9]{1,4})?"
REGEX_TEXT = "+441632 960961 ext. 42"

Walker = Callable[[list[int]], list[float]]  # tokens -> seconds per mask


def llguidance_engine(tok: Tokenizer, kind: str, spec: str) -> tuple[float, Walker]:
    import llguidance
    from llguidance.tiktoken import lltokenizer_from_encoding

    t0 = time.perf_counter()
    lltok = lltokenizer_from_encoding(tok.encoding, eos_token=tok.eot_id)
    t1 = time.perf_counter()
    grammar = llguidance.grammar_from("json_schema" if kind == "json" else "regex", spec)
    llguidance.LLMatcher(lltok, grammar)  # compiles
    setup = (t1 - t0, time.perf_counter() - t1)

    def walk(tokens: list[int]) -> list[float]:
        matcher, times = llguidance.LLMatcher(lltok, grammar), []
        for t in tokens:
            t1 = time.perf_counter()
            matcher.compute_bitmask()
            times.append(time.perf_counter() - t1)
            assert matcher.consume_token(t), matcher.get_error()
        assert matcher.is_accepting()
        return times

    return setup, walk


def xgrammar_engine(tok: Tokenizer, kind: str, spec: str) -> tuple[float, Walker]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[tok.eot_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(spec) if kind == "json" else compiler.compile_regex(spec)
    setup = (t1 - t0, time.perf_counter() - t1)

    def walk(tokens: list[int]) -> list[float]:
        matcher, times = xgr.GrammarMatcher(compiled), []
        bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
        for t in tokens:
            t1 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t1)
            assert matcher.accept_token(t)
        assert matcher.is_completed() or matcher.accept_token(tok.eot_id)
        return times

    return setup, walk


def outlines_engine(tok: Tokenizer, kind: str, spec: str) -> tuple[float, Walker]:
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    by_text: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != tok.eot_id:
            by_text.setdefault(tok.token_bytes(i), []).append(i)
    vocab = Vocabulary(tok.eot_id, by_text)
    t1 = time.perf_counter()
    regex = build_regex_from_schema(spec) if kind == "json" else spec
    index = Index(regex, vocab)
    setup = (t1 - t0, time.perf_counter() - t1)

    def walk(tokens: list[int]) -> list[float]:
        guide, times = Guide(index), []
        mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
        for t in tokens:
            t1 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            times.append(time.perf_counter() - t1)
            guide.advance(t)
        assert guide.is_finished()
        return times

    return setup, walk


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def gptlab_engine(tok: Tokenizer, kind: str, spec: str) -> tuple[float, Walker]:
    """What a sampling step pays in gptlab: llguidance's mask, unpacked and applied to (1, V) logits."""
    import torch

    from gptlab.infer.constrain import Constraint, TokenMatcher, mask_logits

    constraint = Constraint.json_schema(spec) if kind == "json" else Constraint.regex(spec)
    t0 = time.perf_counter()
    TokenMatcher.start(constraint, tok)
    setup = (time.perf_counter() - t0, 0.0)  # tokenizer + compile; both cached afterwards
    logits = torch.zeros(1, tok.vocab_size)

    def walk(tokens: list[int]) -> list[float]:
        matcher, times = TokenMatcher.start(constraint, tok), []
        for t in tokens:
            t1 = time.perf_counter()
            mask_logits(logits, [matcher])
            times.append(time.perf_counter() - t1)
            matcher.consume(t)
        assert matcher.accepting
        return times

    return setup, walk


ENGINES["gptlab (llguidance, mask applied)"] = gptlab_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="walks of each token sequence")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_BPE_DIR, help="GPT-2 encoder.json + vocab.bpe")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    tok = Tokenizer.gpt2(args.tokenizer)
    header = ["engine", "case", "tokenizer ms", "compile ms", "mask us (median)", "mask us (mean)", "mask us (max)"]
    rows: list[dict] = []
    for kind, spec, text in (("json", json.dumps(SCHEMA), DOCUMENT), ("regex", REGEX, REGEX_TEXT)):
        tokens = tok.encode(text)
        for name, engine in ENGINES.items():
            try:
                setup, walk = engine(tok, kind, spec)
                times = [t for _ in range(args.runs) for t in walk(tokens)]
            except ImportError as e:
                rows.append(dict(zip(header, [name, kind, f"not installed ({e.name})"])))
                continue
            except Exception as e:  # an engine that cannot run this case is reported, not fatal
                rows.append(dict(zip(header, [name, kind, f"failed: {type(e).__name__}: {e}"[:80]])))
                continue
            rows.append(
                dict(zip(header, [
                    name,
                    kind,
                    f"{setup[0] * 1e3:.0f}",
                    f"{setup[1] * 1e3:.1f}",
                    f"{statistics.median(times) * 1e6:.0f}",
                    f"{statistics.fmean(times) * 1e6:.0f}",
                    f"{max(times) * 1e6:.0f}",
                ]))
            )
    print(f"GPT-2 vocabulary ({tok.vocab_size} ids); JSON document {len(tok.encode(DOCUMENT))} tokens, "
          f"regex text {len(tok.encode(REGEX_TEXT))} tokens; {args.runs} walks each")
    print(format_table(rows, header, markdown=True))


if __name__ == "__main__":
    main()
