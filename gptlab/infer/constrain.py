"""Constrained decoding: JSON, JSON Schema, regular expressions and context-free grammars, enforced as a
token mask in the sampling step.

A `Constraint` (plain data, on `SamplingParams.constraint`) names what the output must be. Each row of
a constrained request owns a `TokenMatcher`: before every sampling step `mask_logits` sets the logits
of every token the grammar cannot accept next to -inf, and `TokenMatcher.consume` advances the state
with the chosen token (`gptlab.infer.rows` does both, per row). The end-of-text token is allowed only
where the grammar accepts; a row whose grammar is complete (nothing but end-of-text can follow) stops
with finish_reason 'stop'.

The masks come from llguidance (Microsoft's Rust engine behind Guidance, also in vLLM, SGLang and
llama.cpp), installed with the `structured` extra: of the three engines timed on GPT-2's 50,257-id
vocabulary (benchmarks/constrain_masks.py, figures in the README) it computed masks fastest after the
shortest setup, reads a tiktoken encoding directly, and accepts Lark and GBNF grammars as well as JSON
Schema and regexes.

Speculative decoding: a verifier checks a draft with `TokenMatcher.accepted_prefix(draft)` (how many
draft tokens the grammar allows, state unchanged), masks each verified position by consuming the
draft with `consume` and `rollback` of what the target model rejects.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

EXTRA = "structured"
KINDS = ("json", "json_schema", "regex", "grammar")
JSON_SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
"""JSON is written like Python's json.dumps: no free whitespace, so a small model cannot spend its
tokens on blank lines inside a structure."""
_TEMPLATES_KEPT = 64  # compiled grammars kept per process (a schema compiles in ~ms; requests repeat them)


@dataclass(frozen=True)
class Constraint:
    """What a completion must be: `json` (any JSON object), `json_schema` (a JSON Schema, as JSON
    text), `regex` (the whole output matches it) or `grammar` (a Lark or GBNF context-free grammar)."""

    kind: Literal["json", "json_schema", "regex", "grammar"]
    spec: str = ""

    @classmethod
    def json(cls) -> Constraint:
        return cls("json")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    def validate(self) -> Constraint:
        """Raise ValueError for an unknown kind or a spec of the wrong type (the grammar itself is checked
        when compiled against a tokenizer: `compile_check`)."""
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str) or (self.kind != "json" and not self.spec):
            raise ValueError(f"a {self.kind} constraint needs its {self.kind} as a non-empty string")
        return self


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ImportError(
            f"constrained decoding needs llguidance: pip install 'gptlab[{EXTRA}]'"
        ) from None
    return llguidance


def _grammar(constraint: Constraint) -> str:
    """llguidance's grammar text for `constraint`; ValueError for malformed JSON Schema text or GBNF."""
    llg = _llguidance()
    if constraint.kind == "json":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_SEPARATORS)
    if constraint.kind == "json_schema":
        try:
            schema = json.loads(constraint.spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON Schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON Schema is a JSON object, got {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_SEPARATORS)
    if constraint.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(constraint.spec)
    return llg.grammar_from("grammar", constraint.spec)  # Lark, or GBNF converted to Lark


_LLTOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEMPLATES: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()
_LOCK = threading.Lock()


def _lltokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a gptlab tokenizer (its tiktoken encoding), built once per tokenizer
    (about a second for GPT-2's vocabulary)."""
    found = _LLTOKENIZERS.get(tokenizer)
    if found is None:
        from llguidance.tiktoken import lltokenizer_from_encoding

        _llguidance()
        found = lltokenizer_from_encoding(tokenizer.encoding, eos_token=tokenizer.eot_id)
        _LLTOKENIZERS[tokenizer] = found
    return found


def _start(constraint: Constraint, tokenizer: Any) -> Any:
    """A matcher in its grammar's start state: a copy of one compiled once per (tokenizer, grammar).
    Under a lock: the server compiles in a worker thread while its engine thread starts rows."""
    llg = _llguidance()
    grammar = _grammar(constraint.validate())
    with _LOCK:
        lltok = _lltokenizer(tokenizer)
        key = (id(lltok), grammar)
        found = _TEMPLATES.get(key)
        if found is None:
            template = llg.LLMatcher(lltok, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"invalid {constraint.kind} constraint: {template.get_error()}")
            found = _TEMPLATES[key] = (lltok, template)  # holding lltok keeps its id unique in the key
            if len(_TEMPLATES) > _TEMPLATES_KEPT:
                _TEMPLATES.popitem(last=False)
        _TEMPLATES.move_to_end(key)
        return found[1].deep_copy()


def compile_check(constraint: Constraint, tokenizer: Any) -> None:
    """Compile `constraint` for `tokenizer` now, raising ValueError with the engine's message when the
    schema, regex or grammar is invalid (the server does this before queueing a request)."""
    _start(constraint, tokenizer)


class TokenMatcher:
    """One row's position in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        self.matcher, self.vocab = matcher, vocab

    @classmethod
    def start(cls, constraint: Constraint, tokenizer: Any) -> TokenMatcher:
        return cls(_start(constraint, tokenizer), tokenizer.vocab_size)

    def fork(self) -> TokenMatcher:
        """An independent copy in the same state (one per sample of a request)."""
        return TokenMatcher(self.matcher.deep_copy(), self.vocab)

    def allowed(self, width: int) -> np.ndarray:
        """(width,) bool: the tokens the grammar accepts next (ids past the tokenizer's never)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        out = np.zeros(width, dtype=bool)
        n = min(width, self.vocab)
        out[:n] = bits[:n]
        return out

    def consume(self, token: int) -> None:
        """Advance past `token`; ValueError (naming the engine's reason) if the grammar rejects it."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"constrained decoding: token {token} rejected: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The structure is complete: nothing but end-of-text can follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher stopped working (a rejected token, a resource limit), or None."""
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (end-of-text allowed here)."""
        return self.matcher.is_accepting()

    def accepted_prefix(self, draft: Sequence[int]) -> int:
        """How many leading tokens of `draft` the grammar accepts from here (state unchanged): the
        speculative-decoding hook."""
        return self.matcher.validate_tokens(list(draft))

    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` consumed (speculative decoding's rejected draft tokens)."""
        if not self.matcher.rollback(tokens):
            raise ValueError(f"constrained decoding: cannot roll back {tokens} tokens: {self.matcher.get_error()}")


def mask_logits(logits: Tensor, matchers: Sequence[TokenMatcher | None]) -> Tensor:
    """`logits` (B, V) with every token row b's grammar forbids set to -inf; rows without a matcher are
    left as they are."""
    V = logits.shape[1]
    return apply_masks(logits, [m.allowed(V) if m is not None else None for m in matchers])


def apply_masks(logits: Tensor, allowed: Sequence[np.ndarray | None]) -> Tensor:
    """`logits` (B, V) with -inf wherever row b's `allowed[b]` (V,) bool mask is False (None: no mask)."""
    B, V = logits.shape
    if all(a is None for a in allowed):
        return logits
    keep = np.ones((B, V), dtype=bool)
    for b, a in enumerate(allowed):
        if a is not None:
            keep[b] = a
    return logits.masked_fill(~torch.from_numpy(keep).to(logits.device), float("-inf"))
