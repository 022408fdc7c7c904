"""Constrained decoding (llguidance): every sampled output of a tiny random model over GPT-2's real
vocabulary parses and validates (jsonschema), fully matches its regex or grammar; the mask against an
independent reference; end-of-text only where the grammar accepts; 'stop' when the structure is
complete and 'length' when max_new_tokens cuts it; the command line. The server's response_format is
in tests/test_serve.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance: pip install 'gptlab[structured]'")
jsonschema = pytest.importorskip("jsonschema", reason="validating outputs needs jsonschema (the dev extra)")

from gptlab import GPT, ModelConfig  # noqa: E402
from gptlab.infer.constrain import Constraint, TokenMatcher, mask_logits  # noqa: E402
from gptlab.infer.generate import generate, generate_ids, stream  # noqa: E402
from gptlab.infer.sampling import SamplingParams  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(gpt2_tokenizer) -> GPT:
    """A random 1-layer GPT over GPT-2's 50,257 ids: near-uniform next-token distributions, so sampling
    at temperature 1 wanders over everything the grammar allows."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=256, vocab_size=gpt2_tokenizer.vocab_size)
    return GPT(config).eval()


def closed(properties: dict, **extra) -> dict:
    """An object schema requiring every property and no others (else a sampler may add keys forever)."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False, **extra}  # fmt: skip


SCHEMAS = {
    "nested": closed({
        "user": closed({"name": {"type": "string", "maxLength": 6},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
        "active": {"type": "boolean"},
    }),
    "arrays": closed({"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                               "minItems": 1, "maxItems": 3}}),
    "enums": closed({"color": {"enum": ["red", "green", "blue"]},
                     "size": {"type": "string", "enum": ["S", "M", "XL"]}, "n": {"const": 3}}),
    "bounded numbers": closed({"x": {"type": "integer", "minimum": -5, "maximum": 5},
                               "p": {"type": "number", "minimum": 0, "maximum": 1}}),
    "array of objects": {"type": "array", "maxItems": 3,
                         "items": closed({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                          "ok": {"type": ["boolean", "null"]}})},
}  # fmt: skip
SAMPLES = 48


def sample(model, tok, constraint: Constraint, n: int = SAMPLES, max_new_tokens: int = 64, **kw):
    return generate(model, tok, "Answer:", SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n,
                                                          seed=kw.pop("seed", 0), constraint=constraint, **kw))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_sampled_output_validates_against_its_schema(model, gpt2_tokenizer, name):
    schema = SCHEMAS[name]
    outs = sample(model, gpt2_tokenizer, Constraint.json_schema(schema))
    stopped = [c for c in outs if c.finish_reason == "stop"]
    for c in stopped:
        jsonschema.validate(json.loads(c.text), schema)
    for c in outs:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == 64
    assert len(stopped) >= SAMPLES * 3 // 4, [c.text for c in outs if c.finish_reason != "stop"][:3]
    assert len({c.text for c in stopped}) > SAMPLES // 4 or name == "enums"  # really sampled


def test_any_json_object(model, gpt2_tokenizer):
    """Nearly every GPT-2 token may sit inside a JSON string, so a random model closes one only when
    '"' and '}' are made likelier (logit_bias); the mask still decides where they may go."""
    closers = {gpt2_tokenizer.encode(s)[0]: 10 for s in ('"', "}", '"}')}
    outs = sample(model, gpt2_tokenizer, Constraint.json(), n=16, max_new_tokens=24, logit_bias=closers)
    for c in outs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 24
            with pytest.raises(json.JSONDecodeError):
                json.loads(c.text)
    assert sum(c.finish_reason == "stop" for c in outs) >= 8


@pytest.mark.parametrize(
    "pattern",
    [r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"(\+44|0)[0-9]{4} [0-9]{6}", r"(yes|no|maybe)( [0-9]{1,3})?"],
)
def test_regex_outputs_fully_match(model, gpt2_tokenizer, pattern):
    outs = sample(model, gpt2_tokenizer, Constraint.regex(pattern), n=32, max_new_tokens=32)
    assert all(c.finish_reason == "stop" for c in outs)
    for c in outs:
        assert re.fullmatch(pattern, c.text), c.text


LARK = r"""
start: greeting " " target
greeting: "hello" | "hi"
target: NAME | "world"
NAME: /[A-Z][a-z]{1,5}/
"""
GBNF = r"""
root ::= item ("," item){0,2}
item ::= ("cat" | "dog") [0-9]
"""


@pytest.mark.parametrize(
    "grammar, language",
    [(LARK, r"(hello|hi) ([A-Z][a-z]{1,5}|world)"), (GBNF, r"(cat|dog)[0-9](,(cat|dog)[0-9]){0,2}")],
    ids=["lark", "gbnf"],
)
def test_grammar_outputs_are_sentences_of_the_grammar(model, gpt2_tokenizer, grammar, language):
    outs = sample(model, gpt2_tokenizer, Constraint.grammar(grammar), n=32, max_new_tokens=24)
    assert all(c.finish_reason == "stop" for c in outs)
    for c in outs:
        assert re.fullmatch(language, c.text), c.text  # both grammars describe a regular language
    assert len({c.text for c in outs}) > 4


def test_mask_matches_an_independent_reference(gpt2_tokenizer):
    """Under [0-9]+ the allowed tokens are exactly those whose bytes are all digits, plus end-of-text
    once at least one digit was written."""
    tok = gpt2_tokenizer
    digits = {i for i in range(tok.vocab_size) if i != tok.eot_id and tok.token_bytes(i).isdigit()}
    matcher = TokenMatcher.start(Constraint.regex(r"[0-9]+"), tok)
    V = tok.vocab_size + 7  # a model's padded vocabulary: the ids past the tokenizer's are never allowed
    allowed = set(matcher.allowed(V).nonzero()[0].tolist())
    assert allowed == digits
    matcher.consume(tok.encode("12")[0])
    assert set(matcher.allowed(V).nonzero()[0].tolist()) == digits | {tok.eot_id}
    logits = torch.randn(2, V)
    masked = mask_logits(logits, [None, matcher])
    assert torch.equal(masked[0], logits[0])
    keep = torch.zeros(V, dtype=torch.bool)
    keep[list(digits | {tok.eot_id})] = True
    assert torch.equal(masked[1], logits[1].masked_fill(~keep, float("-inf")))


def test_end_of_text_only_where_the_grammar_accepts(model, gpt2_tokenizer):
    """With end-of-text pushed to +100, a row still writes at least three digits, and stops at once when
    the grammar accepts."""
    eot = gpt2_tokenizer.eot_id
    outs = sample(model, gpt2_tokenizer, Constraint.regex(r"[0-9]{3,40}"), n=16, logit_bias={eot: 100})
    for c in outs:
        assert c.finish_reason == "stop" and re.fullmatch(r"[0-9]{3,40}", c.text)
        assert len(gpt2_tokenizer.decode(c.token_ids[:-1])) < 3  # stopped as soon as end-of-text was allowed


def test_complete_structure_stops_and_a_cut_one_is_length(model, gpt2_tokenizer):
    (done,) = sample(model, gpt2_tokenizer, Constraint.regex("abc"), n=1)
    assert done.text == "abc" and done.finish_reason == "stop"
    schema = SCHEMAS["nested"]
    for c in sample(model, gpt2_tokenizer, Constraint.json_schema(schema), n=8, max_new_tokens=4):
        assert c.finish_reason == "length" and len(c.token_ids) == 4
        assert '{"user": {"name": "'.startswith(c.text) or c.text.startswith('{"user": {"name": "')
    text = "".join(stream(model, gpt2_tokenizer, "Q:", temperature=1.0, seed=1, max_new_tokens=64,
                          constraint=Constraint.json_schema(SCHEMAS["enums"])))  # fmt: skip
    jsonschema.validate(json.loads(text), SCHEMAS["enums"])


def test_greedy_rows_and_unconstrained_rows_share_a_batch(model, gpt2_tokenizer):
    free = generate(model, gpt2_tokenizer, ["a", "b"], temperature=0, max_new_tokens=6)
    constrained = generate(model, gpt2_tokenizer, ["a", "b"], temperature=0, max_new_tokens=6,
                           constraint=Constraint.regex("[a-z]{6}"))  # fmt: skip
    assert [c.text for c in free] != [c.text for c in constrained]
    assert all(re.fullmatch("[a-z]{6}", c.text) for c in constrained)


def test_refusals_name_the_problem(model, gpt2_tokenizer):
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(num_beams=2, constraint=Constraint.json()).validate()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate_ids(model, [[1, 2]], constraint=Constraint.json(), max_new_tokens=2)
    with pytest.raises(ValueError, match="not valid JSON"):
        generate(model, gpt2_tokenizer, "x", constraint=Constraint.json_schema("{oops"), max_new_tokens=2)
    with pytest.raises(ValueError, match="invalid regex constraint"):
        generate(model, gpt2_tokenizer, "x", constraint=Constraint.regex("(unclosed"), max_new_tokens=2)
    with pytest.raises(ValueError, match="invalid grammar constraint"):
        generate(model, gpt2_tokenizer, "x", constraint=Constraint.grammar("start: undefined_rule"), max_new_tokens=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        Constraint("xml", "<a/>").validate()


def test_cli_flags_build_the_constraint(tmp_path, monkeypatch):
    from gptlab import cli

    seen = {}
    monkeypatch.setattr("gptlab.infer.generate.run_generate", lambda m, t, p, params, **kw: seen.update(p=params))
    monkeypatch.setattr("gptlab.infer.prepare.load_for_generation", lambda *a, **k: (None, None))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]))
    grammar = tmp_path / "g.gbnf"
    grammar.write_text(GBNF)
    cases = {("--json",): Constraint.json(), ("--regex", "[0-9]+"): Constraint.regex("[0-9]+"),
             ("--json-schema", str(schema)): Constraint.json_schema(schema.read_text()),
             ("--grammar", str(grammar)): Constraint.grammar(GBNF)}  # fmt: skip
    for flags, want in cases.items():
        assert cli.main(["generate", "ckpt", "hi", *flags]) == 0
        assert seen["p"].constraint == want
    with pytest.raises(SystemExit):
        cli.main(["generate", "ckpt", "hi", "--json", "--regex", "a"])
    assert cli.main(["generate", "ckpt", "hi", "--grammar", str(tmp_path / "missing.lark")]) == 2


def test_cli_generates_constrained_output(tmp_path, model, gpt2_tokenizer, capsys):
    from gptlab.checkpoint import save_model
    from gptlab.cli import main

    ckpt = save_model(model, tmp_path / "ckpt", gpt2_tokenizer)
    assert main(["generate", str(ckpt), "Colour:", "--regex", "(red|green|blue)!", "--seed", "0"]) == 0
    assert re.fullmatch(r"(red|green|blue)!\n", capsys.readouterr().out)


def test_speculative_hook_checks_drafts_and_rolls_back():
    from gptlab.tokenizer import Tokenizer

    tok = Tokenizer({bytes([b]): b for b in range(256)}, [], {"<|endoftext|>": 256})
    matcher = TokenMatcher.start(Constraint.regex("[a-z]+!"), tok)
    assert matcher.accepted_prefix(list(b"ab1!")) == 2  # the state is unchanged by the check
    for t in b"abc":
        matcher.consume(t)
    matcher.rollback(2)
    assert matcher.accepted_prefix(list(b"!")) == 1 and not matcher.accepting
    matcher.consume(ord("!"))
    assert matcher.done and matcher.accepting
    with pytest.raises(ValueError, match="rejected"):
        matcher.consume(ord("x"))
