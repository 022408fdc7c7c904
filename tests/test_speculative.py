"""Speculative decoding: greedy output is the target's own token for token, sampled output has the
target's distribution (chi-square against the exact distribution, with a broken acceptance rule as the
negative control), and rejected tokens leave the paged cache as if they had never been written.

References: plain decoding of the same model (greedy tokens), the exact probabilities of every
continuation of a tiny-vocabulary model (sampling), a forward pass without any cache (logits).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import random

import pytest
import torch

from gptlab import GPT, ModelConfig
from gptlab.infer import speculative as speculative_module
from gptlab.infer.cpu import kernels as cpu_kernels
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.generate import generate, generate_ids, stream
from gptlab.infer.sampling import SamplingParams, process_logits
from gptlab.infer.speculative import Speculation, lookup, next_draft_length

pytestmark = pytest.mark.usefixtures("one_thread")


def peaked_model(seed: int = 0, scale: float = 40.0, **kw) -> GPT:
    """A tiny GPT whose greedy choices are never near-ties (see test_generate.peaked_model); a smaller
    `scale` spreads its distributions out (sampling tests)."""
    base = dict(n_layer=2, n_head=2, n_embd=32, n_ctx=96, vocab_size=101)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
    return model


def noisy_copy(model: GPT, noise: float, seed: int = 1) -> GPT:
    """A draft that agrees with `model` often but not always: its weights plus Gaussian noise."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.abs().mean())
    return draft


def no_cache_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1].float()


@pytest.fixture(scope="module")
def byte_tokenizer():
    from gptlab.tokenizer import Tokenizer

    return Tokenizer({bytes([b]): b for b in range(256)}, [], {"<|endoftext|>": 256})


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7], [9] * 19 + [4, 9, 9]]


# ---- drafting ------------------------------------------------------------------------------------------
def test_prompt_lookup_continues_the_first_earlier_occurrence_of_the_longest_suffix():
    assert lookup([1, 2, 3, 4, 1, 2], 2, 3) == [3, 4, 1]
    assert lookup([5, 2, 3, 4, 1, 2], 2, 3) == [3, 4, 1]  # no earlier [1, 2]: the 1-gram [2] matches
    assert lookup([1, 2, 3, 4, 1, 2], 2, 9) == [3, 4, 1, 2]  # at most what the sequence holds
    assert lookup([1, 2, 3, 4], 3, 3) == [] and lookup([7], 2, 3) == [] and lookup([1, 1], 2, 0) == []


def test_prompt_lookup_equals_the_window_by_window_search():
    def reference(tokens, n, k):  # every earlier window, longest n-gram first, the first occurrence
        for m in range(min(n, len(tokens) - 1), 0, -1):
            for i in range(len(tokens) - m):
                if tokens[i : i + m] == tokens[-m:]:
                    return tokens[i + m : i + m + k]
        return []

    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 30))]
        n, k = rng.randrange(1, 5), rng.randrange(1, 6)
        assert lookup(tokens, n, k) == reference(tokens, n, k), (tokens, n, k)


def test_speculation_is_validated():
    target = peaked_model()
    with pytest.raises(ValueError, match="vocabulary has 50 tokens and the target's 101"):
        Speculation(draft=peaked_model(vocab_size=50)).validate(target)
    with pytest.raises(ValueError, match="exactly one drafter"):
        Speculation().validate(target)
    with pytest.raises(ValueError, match="exactly one drafter"):
        Speculation(draft=peaked_model(seed=1), prompt_lookup=2).validate(target)
    with pytest.raises(ValueError, match="num_tokens"):
        Speculation(prompt_lookup=2, num_tokens=0).validate(target)
    with pytest.raises(ValueError, match="beam search"):
        generate_ids(target, [[1]], max_new_tokens=3, num_beams=2, speculative=Speculation(prompt_lookup=2))


# ---- the cache rolls back ------------------------------------------------------------------------------
def test_truncate_frees_blocks_and_a_cut_cached_block_stops_being_a_prefix():
    model = peaked_model()
    engine = InferenceEngine(model, kv_cache_tokens=128, block_size=4)
    pool = engine.pool
    tokens = list(range(1, 20))  # 19 tokens: four full blocks and three more
    seq = engine.sequence(tokens)
    engine.forward([seq])
    assert len(seq.blocks) == 5 and len(seq.keys) == 4 and pool.in_use == 5
    engine.truncate(seq, 10)  # inside the third block, which the prefix cache held
    assert seq.tokens == tokens[:10] and seq.length == 10 and len(seq.blocks) == 3 and len(seq.keys) == 2
    assert pool.in_use == 3 and pool.summary()["blocks_cached"] == 3
    pool.check()
    seq.tokens += [50, 51, 52]  # overwrite positions 10-12 of the cut block
    torch.testing.assert_close(
        engine.forward([seq])[0], no_cache_logits(model, tokens[:10] + [50, 51, 52]), atol=1e-5, rtol=1e-5
    )
    # the original prompt finds its first two blocks, never the overwritten third
    again = engine.sequence(tokens)
    assert again.length == 8
    torch.testing.assert_close(engine.forward([again])[0], no_cache_logits(model, tokens), atol=1e-5, rtol=1e-5)
    engine.free(seq)
    engine.free(again)
    pool.check()
    assert pool.in_use == 0
    with pytest.raises(ValueError, match="cannot truncate"):
        engine.truncate(engine.sequence([1, 2]), 3)


def test_truncating_a_shared_block_copies_it_before_writing():
    model = peaked_model()
    engine = InferenceEngine(model, kv_cache_tokens=128, block_size=4, prefix_caching=False)
    tokens = list(range(1, 12))
    parent = engine.sequence(tokens)
    engine.forward([parent])
    child = engine.fork(parent)
    engine.truncate(child, 6)  # inside the second block, which the parent keeps using
    assert child.blocks == parent.blocks[:2] and engine.pool.refs[parent.blocks[1]] == 2
    child.tokens += [60, 61]
    parent.tokens += [70]
    got = engine.forward([child, parent])
    assert child.blocks[1] != parent.blocks[1]
    torch.testing.assert_close(got[0], no_cache_logits(model, tokens[:6] + [60, 61]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], no_cache_logits(model, tokens + [70]), atol=1e-5, rtol=1e-5)
    engine.free(child)
    engine.free(parent)
    engine.pool.check()
    assert engine.pool.in_use == 0


def test_prompt_lookup_drafts_fewer_tokens_after_misses_and_more_after_hits(monkeypatch):
    # transformers' heuristic schedule for num_assistant_tokens: +2 after a draft kept whole, -1 after a cut
    assert [next_draft_length(k, True, 5) for k in (1, 3, 4, 5)] == [3, 5, 5, 5]
    assert [next_draft_length(k, False, 5) for k in (1, 2, 5)] == [1, 1, 4]
    target, prompt = peaked_model(), PROMPTS[0]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    want = generate_ids(target, [prompt], params)[0]
    for wrong in (True, False):  # a lookup that proposes the target's next tokens, or each one changed

        def oracle(tokens, n, k):
            done = len(tokens) - len(prompt)
            return [(t + wrong) % 101 for t in want[done : done + k]]

        monkeypatch.setattr(speculative_module, "lookup", oracle)
        sizes = []
        engine = InferenceEngine(target, kv_cache_tokens=1024)
        forward = engine.forward
        monkeypatch.setattr(engine, "forward", lambda seqs, n=None: sizes.append(n) or forward(seqs, n))
        spec = Speculation(prompt_lookup=2, num_tokens=4)
        assert generate_ids(target, [prompt], params, engine=engine, speculative=spec)[0] == want
        drafted = [n[0] - 1 for n in sizes if n is not None]
        if wrong:  # 4, 3, 2, then 1 token a step (none when one token is left)
            assert drafted == [4, 3, 2] + [1] * 25 + [0], drafted
        else:  # K every step, all kept: 5 tokens a step after the prefill's one (4 left: 3 drafted)
            assert drafted == [4, 4, 4, 4, 4, 3], drafted


# ---- greedy: the target's own tokens -------------------------------------------------------------------
def drafters(target: GPT) -> dict[str, Speculation]:
    return {
        "draft": Speculation(draft=noisy_copy(target, 1.5), num_tokens=3),  # accepts 63 of 144
        "lookup": Speculation(prompt_lookup=2, num_tokens=4),
    }


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_greedy_speculative_output_is_the_targets_greedy_output(pattern, drafter):
    target = peaked_model(attn_pattern=pattern, local_window=4)
    spec = drafters(target)[drafter]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    want = generate_ids(target, PROMPTS, params)
    engine = InferenceEngine(target, kv_cache_tokens=1024)
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, and rows that accept different numbers of tokens
        got = generate_ids(target, prompts, params, engine=engine, speculative=spec)
        assert got == want[: len(prompts)]
        engine.pool.check()
        assert engine.pool.in_use == 0
    stats = engine.summary()["speculative"]
    assert 0 < stats["accepted"] < stats["drafted"], stats  # some drafts rejected, some accepted
    assert 1 < stats["tokens_per_step"] <= spec.num_tokens + 1
    # end-of-text among the drafts, and a stop after a few tokens
    eos = want[0][6]
    assert generate_ids(target, PROMPTS, params, eos, speculative=spec) == generate_ids(target, PROMPTS, params, eos)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_greedy_speculative_output_on_the_cpu_kernels(storage):
    """Decoding one token per row runs on the C step where it builds; verifying K + 1 positions on the
    reference step over the same weights: both give the target's tokens."""
    from gptlab.infer.prepare import prepare_model

    base = peaked_model(attn_pattern="alternating", local_window=4)
    draft = noisy_copy(base, 0.5)
    target = prepare_model(base.to(torch.bfloat16) if storage == "bfloat16" else base,
                           quantize="int8" if storage == "int8" else None)  # fmt: skip
    params = SamplingParams(max_new_tokens=24, temperature=0)
    want = generate_ids(target, PROMPTS, params)
    for spec in (Speculation(draft=draft, num_tokens=3), Speculation(prompt_lookup=3)):
        assert generate_ids(target, PROMPTS, params, speculative=spec) == want


@pytest.mark.skipif(not cpu_kernels.available(), reason="gptlab's CPU kernels did not build here")
@pytest.mark.parametrize("pattern", ["dense", "alternating"])
def test_greedy_drafts_on_the_cpu_kernels_run_in_one_call_and_draft_what_steps_would(pattern, monkeypatch):
    """A greedy draft model on the C step drafts its tokens after the first in one call feeding its
    argmaxes back (`InferenceEngine.greedy`): the same drafts as a Python step a token, so the same
    acceptance counts, and the target's own greedy output; end-of-text and context ends included."""
    from gptlab.infer.prepare import prepare_model

    base = peaked_model(attn_pattern=pattern, local_window=4)
    target = prepare_model(copy.deepcopy(base))
    noisy = noisy_copy(base, 1.5)  # with a shorter context, which drafts run into
    draft = GPT(dataclasses.replace(base.config, n_ctx=40)).eval()
    state = noisy.state_dict()
    draft.load_state_dict({k: v[:40] if k.endswith("wpe.weight") else v for k, v in state.items()})
    spec = Speculation(draft=prepare_model(draft), num_tokens=5)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    prompts = [*PROMPTS, [3] * 30]
    want = generate_ids(target, prompts, params)
    eos = want[0][6]
    calls, original = [], InferenceEngine.greedy

    def counted(self, seqs, steps):
        calls.append(steps)
        return original(self, seqs, steps)

    results = {}
    for fast in (True, False):
        calls.clear()
        monkeypatch.setattr(InferenceEngine, "greedy", counted if fast else lambda *a: None)
        engine = InferenceEngine(target, kv_cache_tokens=2048)
        got = [generate_ids(target, prompts, params, engine=engine, speculative=spec),
               generate_ids(target, prompts, params, eos, engine=engine, speculative=spec)]  # fmt: skip
        assert got == [want, generate_ids(target, prompts, params, eos)]
        results[fast] = engine.summary()["speculative"], bool(calls)
    assert results[True] == (results[False][0], True), results
    assert 0 < results[True][0]["accepted"] < results[True][0]["drafted"]


@pytest.mark.skipif(not cpu_kernels.available(), reason="gptlab's CPU kernels did not build here")
def test_greedy_drafting_falls_back_to_steps_when_the_draft_pool_is_short(monkeypatch):
    from gptlab.infer.cache import OutOfBlocks
    from gptlab.infer.prepare import prepare_model

    base = peaked_model()
    target = prepare_model(copy.deepcopy(base))
    spec = Speculation(draft=prepare_model(noisy_copy(base, 1.5)), num_tokens=4)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    want = generate_ids(target, PROMPTS, params)

    def short(self, seqs, steps):
        raise OutOfBlocks("no free block")

    monkeypatch.setattr(InferenceEngine, "greedy", short)
    engine = InferenceEngine(target, kv_cache_tokens=1024)
    assert generate_ids(target, PROMPTS, params, engine=engine, speculative=spec) == want
    assert engine.speculation.drafted > engine.speculation.steps  # drafts of several tokens, step by step


def test_logprobs_stream_and_penalties_match_plain_decoding(byte_tokenizer):
    target = peaked_model(vocab_size=257)
    spec = Speculation(draft=noisy_copy(target, 0.5), num_tokens=4)
    prompt = "abcabcabc"
    kw = dict(max_new_tokens=20, temperature=0, logprobs=2, frequency_penalty=0.5, repetition_penalty=1.3)
    want = generate(target, byte_tokenizer, prompt, **kw)[0]
    got = generate(target, byte_tokenizer, prompt, speculative=spec, **kw)[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    lookup_spec = Speculation(prompt_lookup=3)
    text = "".join(stream(target, byte_tokenizer, prompt, speculative=lookup_spec, max_new_tokens=20, temperature=0))
    assert text == generate(target, byte_tokenizer, prompt, max_new_tokens=20, temperature=0)[0].text


def test_prefix_hits_after_speculative_runs_give_the_logits_of_misses():
    target = peaked_model(attn_pattern="alternating", local_window=4)
    warm = InferenceEngine(target, kv_cache_tokens=1024, block_size=4)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    outs = generate_ids(target, PROMPTS, params, engine=warm, speculative=drafters(target)["draft"])
    for prompt, out in zip(PROMPTS, outs, strict=True):
        seq = warm.sequence(prompt + out)
        assert seq.length > 0
        torch.testing.assert_close(warm.forward([seq])[0], no_cache_logits(target, prompt + out), atol=1e-5, rtol=1e-5)
        warm.free(seq)
    warm.pool.check()
    assert warm.pool.in_use == 0
    assert generate_ids(target, PROMPTS, params, engine=warm, speculative=drafters(target)["lookup"]) == outs


# ---- sampling: the target's distribution ---------------------------------------------------------------
V, NEW, SAMPLES = 8, 4, 3000
SAMPLING = dict(temperature=0.9, top_k=6)


def exact_probabilities(model: GPT, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """Probability of every continuation of NEW tokens under the processed (temperature, top-k)
    distributions: the product of the next-token probabilities along it."""
    continuations = list(itertools.product(range(V), repeat=NEW - 1))
    x = torch.tensor([prompt + list(c) for c in continuations])
    with torch.no_grad():
        logits = model(x)[0][:, len(prompt) - 1 :]  # (V^(NEW-1), NEW, V)
    params = SamplingParams(**SAMPLING)
    flat = process_logits(logits.reshape(-1, V), [[]] * logits[:, :, 0].numel(), params)
    logp = flat.log_softmax(-1).reshape(logits.shape)
    out = {}
    for i, c in enumerate(continuations):
        for last in range(V):
            seq = (*c, last)
            out[seq] = math.exp(sum(logp[i, j, t].item() for j, t in enumerate(seq)))
    return out


def chi_square_p_value(samples: list[list[int]], probabilities: dict, positions: tuple[int, ...]) -> float:
    """Goodness of fit of the samples' tokens at `positions` to the exact marginal; cells expecting
    fewer than 5 draws are pooled."""
    from scipy.stats import chi2

    expected: dict[tuple, float] = {}
    for seq, p in probabilities.items():
        key = tuple(seq[i] for i in positions)
        expected[key] = expected.get(key, 0.0) + p * len(samples)
    observed: dict[tuple, int] = {}
    for s in samples:
        key = tuple(s[i] for i in positions)
        observed[key] = observed.get(key, 0) + 1
    big = [k for k, e in expected.items() if e >= 5]
    cells = [(observed.get(k, 0), expected[k]) for k in big]
    rest_o = len(samples) - sum(o for o, _ in cells)
    rest_e = len(samples) - sum(e for _, e in cells)
    if rest_o or rest_e > 1e-9:  # draws where the target puts (almost) nothing count hugely
        cells.append((rest_o, max(rest_e, 1e-9)))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    return float(chi2.sf(statistic, len(cells) - 1))


@pytest.fixture(scope="module")
def tiny_vocab():
    target = peaked_model(seed=3, scale=3.0, vocab_size=V, n_ctx=32)
    draft = peaked_model(seed=4, scale=3.0, vocab_size=V, n_ctx=32, n_layer=1)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    return target, draft, prompt, exact_probabilities(target, prompt)


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_speculative_sampling_has_the_targets_distribution(tiny_vocab, drafter, monkeypatch):
    pytest.importorskip("scipy")
    target, draft, prompt, exact = tiny_vocab
    spec = Speculation(draft=draft, num_tokens=3) if drafter == "draft" else Speculation(prompt_lookup=2, num_tokens=3)
    params = SamplingParams(max_new_tokens=NEW, n=SAMPLES, seed=0, **SAMPLING)

    def p_values() -> list[float]:
        engine = InferenceEngine(target, kv_cache_tokens=SAMPLES * 48 + 256)
        samples = generate_ids(target, [prompt], params, engine=engine, speculative=spec)
        assert all(len(s) == NEW for s in samples)
        assert engine.speculation.drafted > SAMPLES  # the drafts were used, not only plain steps
        return [chi_square_p_value(samples, exact, pos) for pos in ((0, 1), (1, 2), (2, 3))]

    plain = [chi_square_p_value(generate_ids(target, [prompt], params), exact, pos) for pos in ((0, 1), (1, 2))]
    assert min(plain) > 1e-3, plain  # the test itself accepts plain sampling
    assert min(p_values()) > 1e-3
    # negative control: keeping every draft token gives the drafter's distribution, which the test sees
    monkeypatch.setattr(speculative_module, "acceptance", lambda p, q: torch.ones(()))
    assert min(p_values()) < 1e-6


# ---- with constrained decoding: drafts are checked against the grammar ---------------------------------
@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_constrained_greedy_speculative_output_is_the_constrained_targets(byte_tokenizer, drafter):
    pytest.importorskip("llguidance", reason="constrained decoding needs llguidance: pip install 'gptlab[structured]'")
    import re

    from gptlab.infer.constrain import Constraint

    target = peaked_model(vocab_size=257)
    spec = Speculation(draft=noisy_copy(target, 1.5), num_tokens=4) if drafter == "draft" else Speculation(
        prompt_lookup=3, num_tokens=5)
    pattern = "(ab|ba|[a-c]{3}){1,8}!"
    prompts = ["abcabcab", "ba ba ba", "x"]
    params = SamplingParams(max_new_tokens=40, temperature=0, constraint=Constraint.regex(pattern))
    want = generate(target, byte_tokenizer, prompts, params)
    engine = InferenceEngine(target, kv_cache_tokens=2048)
    got = generate(target, byte_tokenizer, prompts, params, engine=engine, speculative=spec)
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert any(re.fullmatch(pattern, c.text) for c in got)
    assert engine.speculation.accepted > 0
    engine.pool.check()


def test_constrained_speculative_samples_validate(gpt2_tokenizer):
    pytest.importorskip("llguidance", reason="constrained decoding needs llguidance: pip install 'gptlab[structured]'")
    jsonschema = pytest.importorskip("jsonschema")
    from gptlab.infer.constrain import Constraint

    torch.manual_seed(0)
    target = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=256, vocab_size=gpt2_tokenizer.vocab_size)).eval()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}  # fmt: skip
    params = SamplingParams(max_new_tokens=48, temperature=1.0, n=12, seed=0, constraint=Constraint.json_schema(schema))
    for spec in (Speculation(draft=noisy_copy(target, 0.3), num_tokens=3), Speculation(prompt_lookup=2)):
        out = generate(target, gpt2_tokenizer, 'Answer {"n": 1, "ok": true}:', params, speculative=spec)
        for c in out:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
        assert sum(c.finish_reason == "stop" for c in out) >= len(out) // 2


# ---- the server ------------------------------------------------------------------------------------------
def test_server_with_speculative_decoding_answers_like_plain_decoding(byte_tokenizer):
    """Concurrent greedy requests through the official client: the target's own completions (blocking
    and streamed), and /health reports acceptance and tokens per step."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import concurrent.futures

    import httpx

    from gptlab.serve.app import create_app, serve_in_thread

    target = peaked_model(vocab_size=257, n_ctx=128)
    prompts = ["abcabcabc", "the cat the cat", "xyz", "hello hello"]
    want = [c.text for c in generate(target, byte_tokenizer, prompts, max_new_tokens=24, temperature=0)]
    for spec in (Speculation(draft=noisy_copy(target, 1.5), num_tokens=4), Speculation(prompt_lookup=3)):
        app = create_app(target, byte_tokenizer, model_name="t", max_concurrent=3, speculation=spec)
        with serve_in_thread(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)

            def complete(prompt: str) -> str:
                return client.completions.create(model="t", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                got = list(pool.map(complete, prompts))
            assert got == want
            chunks = client.completions.create(model="t", prompt=prompts[0], max_tokens=24, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in chunks) == want[0]
            health = httpx.get(url + "/health").json()
            scraped = httpx.get(url + "/metrics").text
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f.samples[0].value for f in text_string_to_metric_families(scraped)}
        assert families["gptlab_speculative_acceptance_rate"] == health["speculative"]["acceptance_rate"]
        assert families["gptlab_speculative_drafted_tokens"] == health["speculative"]["drafted"]
        stats = health["speculative"]
        assert stats["num_tokens"] == spec.num_tokens and stats["drafted"] > 0
        assert 0 < stats["acceptance_rate"] <= 1 and 1 < stats["tokens_per_step"] <= spec.num_tokens + 1
        assert health["kv_cache"]["blocks_in_use"] == 0


# ---- the command line ------------------------------------------------------------------------------------
def test_cli_generate_and_serve_take_the_speculative_options(tmp_path, byte_tokenizer, monkeypatch, capsys):
    from gptlab.checkpoint import save_model
    from gptlab.cli import main

    target = peaked_model(vocab_size=257, n_ctx=128)
    save_model(target, tmp_path / "target", tokenizer=byte_tokenizer)
    save_model(noisy_copy(target, 1.5), tmp_path / "draft", tokenizer=byte_tokenizer)
    base = ["generate", str(tmp_path / "target"), "abcabcabc", "--temperature", "0", "--max-new-tokens", "24"]
    assert main(base) == 0
    want = capsys.readouterr().out
    for extra in (["--draft", str(tmp_path / "draft"), "--speculative-tokens", "3"], ["--prompt-lookup", "3"]):
        assert main([*base, *extra, "--verbose"]) == 0
        out = capsys.readouterr()
        assert out.out == want
        assert "[speculative:" in out.err and "drafted tokens accepted" in out.err, out.err
    assert main([*base, "--speculative-tokens", "3"]) == 2
    assert "needs a drafter" in capsys.readouterr().err
    assert main([*base, "--draft", str(tmp_path / "draft"), "--prompt-lookup", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    small_vocab = peaked_model(vocab_size=100)
    save_model(small_vocab, tmp_path / "other", tokenizer=None)
    assert main([*base, "--draft", str(tmp_path / "other")]) != 0
    assert "share the target's tokenizer" in capsys.readouterr().err

    import gptlab.serve.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda checkpoint, **kw: seen.update(kw))
    draft = ["--draft", str(tmp_path / "draft"), "--speculative-tokens", "5"]
    assert main(["serve", str(tmp_path / "target"), *draft]) == 0
    assert seen["draft"] == str(tmp_path / "draft") and seen["speculative_tokens"] == 5 and seen["prompt_lookup"] == 0


def test_serve_loads_the_draft_like_the_target(tmp_path, byte_tokenizer, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn

    from gptlab.checkpoint import save_model
    from gptlab.serve.app import serve

    target = peaked_model(vocab_size=257, n_ctx=128)
    save_model(target, tmp_path / "target", tokenizer=byte_tokenizer)
    save_model(noisy_copy(target, 1.5), tmp_path / "draft", tokenizer=byte_tokenizer)
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    threads = torch.get_num_threads()
    try:
        serve(tmp_path / "target", port=0, threads=1, draft=str(tmp_path / "draft"), speculative_tokens=3)
    finally:
        torch.set_num_threads(threads)
    engine = served["app"].state.server.engine
    assert engine.speculator.spec.num_tokens == 3 and engine.speculator.draft_engine is not None
    assert engine.stats()["speculative"]["drafter"] == "draft model"
