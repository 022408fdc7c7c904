"""The inference engine: the paged KV pool, prefix caching, preemption, and context reuse in scoring.

References: a forward pass without any cache (logits, greedy tokens), the same request run alone (for
a scheduler under random interleavings with a small pool), and `score_tokens` (for context reuse).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab import GPT, ModelConfig
from gptlab.infer.cache import OutOfBlocks
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.generate import generate_ids
from gptlab.infer.sampling import SamplingParams
from gptlab.infer.speculative import Speculation

pytestmark = pytest.mark.usefixtures("one_thread")


def peaked_model(seed: int = 0, **kw) -> GPT:
    """A tiny GPT whose greedy choices are never near-ties (see test_generate.peaked_model)."""
    base = dict(n_layer=2, n_head=2, n_embd=32, n_ctx=96, vocab_size=101)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model


def no_cache_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1].float()


# ---- the pool ------------------------------------------------------------------------------------------
def test_blocks_are_taken_as_sequences_grow_and_come_back_when_they_end():
    engine = InferenceEngine(peaked_model(), kv_cache_tokens=24, block_size=4)
    pool = engine.pool
    seq = engine.sequence(list(range(1, 10)))  # 9 tokens: 3 blocks
    engine.forward([seq])
    assert len(seq.blocks) == 3 and pool.in_use == 3
    for _ in range(3):  # positions 9-11 fit the third block; the 13th token takes a fourth
        seq.tokens.append(5)
        engine.forward([seq])
    assert len(seq.blocks) == 3
    seq.tokens.append(5)
    engine.forward([seq])
    assert len(seq.blocks) == 4 and pool.in_use == 4
    engine.free(seq)
    pool.check()
    assert pool.in_use == 0 and pool.available == 6
    assert pool.summary()["blocks_cached"] == 3  # its three full blocks wait for a prefix hit


def test_out_of_blocks_takes_nothing():
    engine = InferenceEngine(peaked_model(), kv_cache_tokens=8, block_size=4)
    seq = engine.sequence(list(range(1, 13)))
    with pytest.raises(OutOfBlocks, match="need 3 KV blocks, 2 of 2"):
        engine.forward([seq])
    assert engine.pool.in_use == 0 and seq.blocks == []


def test_least_recently_used_prefix_is_evicted_first():
    engine = InferenceEngine(peaked_model(), kv_cache_tokens=12, block_size=4)
    pool = engine.pool
    a, b = [1] * 4 + [2], [3] * 4 + [4]
    for prompt in (a, b):
        seq = engine.sequence(prompt)
        engine.forward([seq])
        engine.free(seq)
    again = engine.sequence(a)  # a's block was used last now
    assert again.length == 4
    engine.free(again)
    big = engine.sequence([7] * 5)  # two blocks: the free one and the least recently used cached one
    engine.forward([big])
    engine.free(big)
    assert engine.sequence(a).length == 4 and engine.sequence(b).length == 0
    assert pool.stats.evictions >= 1


def test_forks_share_blocks_and_copy_the_one_they_write():
    model = peaked_model()
    engine = InferenceEngine(model, kv_cache_tokens=64, block_size=4)
    pool = engine.pool
    parent = engine.sequence([1, 2, 3, 4, 5, 6])  # blocks [full, 2 of 4]
    engine.forward([parent])
    child = engine.fork(parent)
    assert child.blocks == parent.blocks and pool.refs[parent.blocks[1]] == 2
    parent.tokens.append(7)
    child.tokens.append(8)
    got = engine.forward([parent, child])
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    torch.testing.assert_close(got[0], no_cache_logits(model, [1, 2, 3, 4, 5, 6, 7]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], no_cache_logits(model, [1, 2, 3, 4, 5, 6, 8]), atol=1e-5, rtol=1e-5)
    engine.free(parent)
    engine.free(child)
    pool.check()
    assert pool.in_use == 0


# ---- prefix caching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_prefix_hit_gives_the_logits_and_tokens_of_a_miss(pattern, storage):
    """A request whose prompt starts with cached blocks reuses them and computes only the rest: the same
    logits as without the cache (float32: within 1e-5 of a no-cache forward) and the same tokens,
    through a banded layer past its window, for every weight storage the CPU kernels take."""
    from gptlab.infer.prepare import prepare_model

    model = peaked_model(attn_pattern=pattern, local_window=5)
    if storage != "float32":
        model = prepare_model(model.to(torch.bfloat16) if storage == "bfloat16" else model,
                              quantize="int8" if storage == "int8" else None)  # fmt: skip
    system = [(7 * i) % 97 + 1 for i in range(37)]  # two full blocks of 16 and 5 tokens more
    questions = [[11, 12, 13], [50, 51, 52, 53, 54, 55, 56], [90]]
    cold = InferenceEngine(model, kv_cache_tokens=512, prefix_caching=False)
    warm = InferenceEngine(model, kv_cache_tokens=512)
    first = warm.sequence(system + [1, 2])
    warm.forward([first])
    warm.free(first)
    for q in questions:
        a, b = cold.sequence(system + q), warm.sequence(system + q)
        assert a.length == 0 and b.length == 32  # the two full blocks of the system prompt came from the cache
        got, want = warm.forward([b]), cold.forward([a])
        tol = 1e-5 if storage == "float32" else 1e-3
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
        if storage == "float32":
            torch.testing.assert_close(got[0], no_cache_logits(model, system + q), atol=1e-5, rtol=1e-5)
        warm.free(b)
        cold.free(a)
    assert warm.pool.stats.hits == 3 * 32
    params = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [system + q for q in questions]
    assert generate_ids(model, prompts, params) == generate_ids(model, prompts[:1], params) + generate_ids(
        model, prompts[1:2], params
    ) + generate_ids(model, prompts[2:], params)


def test_a_prompt_entirely_cached_still_computes_its_last_token():
    model = peaked_model()
    engine = InferenceEngine(model, kv_cache_tokens=128, block_size=4)
    prompt = list(range(1, 17))  # exactly four blocks
    seq = engine.sequence(prompt)
    engine.forward([seq])
    engine.free(seq)
    again = engine.sequence(prompt)
    assert again.length == 12 and again.pending == 4  # the last block is recomputed, never written shared
    torch.testing.assert_close(engine.forward([again])[0], no_cache_logits(model, prompt), atol=1e-5, rtol=1e-5)


# ---- the server's scheduler under random interleavings ---------------------------------------------------
class _Loop:
    """Stands in for a request's event loop: delivers the engine's events at once."""

    def call_soon_threadsafe(self, fn, items):
        fn(items)


def _drain(job) -> dict[int, list[int]]:
    from gptlab.serve.jobs import Failed, Finished

    out = {}
    while not job.queue.empty():
        event = job.queue.get_nowait()
        assert not isinstance(event, Failed), event.message
        if isinstance(event, Finished):
            out[event.index] = event.completion.token_ids
    return out


@pytest.fixture(scope="module")
def byte_tokenizer():
    from gptlab.tokenizer import Tokenizer

    return Tokenizer({bytes([b]): b for b in range(256)}, [], {"<|endoftext|>": 256})


@pytest.fixture(scope="module")
def server_model():
    """Varied greedy continuations (top-2 logit gaps > 0.3 along them), so a row that read another
    row's keys or a stale block would produce other tokens."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=257, tie_embeddings=False,
                            attn_pattern="alternating", local_window=6)).eval()  # fmt: skip
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)
        model.transformer.wpe.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 3.0)
        model.lm_head.weight[256] = 0
    return model


def _noisy(model: GPT) -> GPT:
    """A draft model that agrees with `model` on some tokens, not all."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.7 * p.abs().mean())
    return draft


def _speculation(drafter: str | None, model: GPT, k: int) -> Speculation | None:
    if drafter is None:
        return None
    return Speculation(draft=_noisy(model), num_tokens=k) if drafter == "draft" else Speculation(prompt_lookup=2,
                                                                                                 num_tokens=k)


PREFIX = list(b"You are a helpful assistant. ")  # shared by some prompts: prefix hits while others run


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("submit"), st.integers(0, 5), st.integers(1, 14), st.integers(1, 2), st.booleans()),
            st.tuples(st.just("step"), st.integers(1, 3)),
            st.tuples(st.just("cancel"), st.integers(0, 20)),
        ),
        min_size=1,
        max_size=30,
    )
)
@pytest.mark.parametrize("drafter", [None, "draft", "lookup"])
def test_scheduler_interleavings_give_every_request_its_tokens_alone(server_model, byte_tokenizer, drafter, ops):
    """Admission, growth, completion, cancellation and preemption in random order with a pool of 14
    blocks of 4 tokens: every request that was not cancelled gets exactly the tokens it gets alone, and
    the pool is whole again at the end. With speculative decoding (several tokens a step, rejected ones
    rolled back) greedy requests get the tokens of plain decoding alone; sampled ones draw from the
    same distribution but not the same draws after a preemption, so they run greedy here."""
    from gptlab.serve.engine import Engine

    spec = _speculation(drafter, server_model, 3)
    engine = Engine(server_model, byte_tokenizer, max_concurrent=4, max_queue=100, kv_cache_tokens=56, block_size=4,
                    speculation=spec)  # fmt: skip
    prompts = [PREFIX[:13] + [65 + i] * (1 + i) for i in range(3)] + [[66 + i] * (2 + 2 * i) for i in range(3)]
    jobs, cancelled, loop = [], set(), _Loop()
    for op in ops:
        if op[0] == "submit":
            _, which, new, n, sampled = op
            sampled = sampled and spec is None
            params = SamplingParams(max_new_tokens=new, n=n, temperature=0.9 if sampled else 0, seed=len(jobs))
            jobs.append((engine.submit([prompts[which]], params, loop=loop), prompts[which], params))
        elif op[0] == "step":
            for _ in range(op[1]):
                engine._iteration()
                engine._flush()
        elif jobs:
            job = jobs[op[1] % len(jobs)][0]
            job.cancel()
            cancelled.add(id(job))
    for _ in range(500):
        if not (engine._running or engine._pending or engine._resume):
            break
        engine._iteration()
        engine._flush()
    assert not (engine._running or engine._pending or engine._resume), "the engine did not finish"
    for job, prompt, params in jobs:
        got = _drain(job)
        if id(job) in cancelled:
            continue
        alone = generate_ids(server_model, [prompt], params, eos_id=256)
        assert [got[i] for i in range(params.n)] == alone
    engine.pool.check()
    assert engine.pool.in_use == 0, "a block leaked"
    if spec is not None and spec.draft is not None:
        assert engine.speculator.draft_engine.pool.in_use == 0, "a draft block leaked"


@pytest.mark.parametrize("drafter", [None, "draft", "lookup"])
def test_a_full_pool_preempts_and_resumes_with_the_same_tokens(server_model, byte_tokenizer, drafter):
    from gptlab.serve.engine import Engine

    spec = _speculation(drafter, server_model, 4)
    engine = Engine(server_model, byte_tokenizer, max_concurrent=4, max_queue=10, kv_cache_tokens=40, block_size=4,
                    speculation=spec)  # fmt: skip
    loop, params = _Loop(), SamplingParams(max_new_tokens=20, temperature=0)
    prompts = [[70 + i] * 6 for i in range(4)]
    jobs = [engine.submit([p], params, loop=loop) for p in prompts]
    for _ in range(300):
        if not (engine._running or engine._pending or engine._resume):
            break
        engine._iteration()
        engine._flush()
    assert engine.pool.stats.preemptions > 0
    for job, prompt in zip(jobs, prompts, strict=True):
        assert _drain(job)[0] == generate_ids(server_model, [prompt], params, eos_id=256)[0]
    assert engine.pool.in_use == 0
    if spec is not None:
        stats = engine.stats()["speculative"]
        assert 0 < stats["accepted"] <= stats["drafted"] and stats["tokens_per_step"] > 1, stats


def test_a_request_larger_than_the_pool_is_refused_naming_the_limit(server_model, byte_tokenizer):
    from gptlab.serve.engine import Engine

    engine = Engine(server_model, byte_tokenizer, max_concurrent=4, kv_cache_tokens=32, block_size=4)
    with pytest.raises(ValueError, match=r"needs \d+ KV-cache tokens; this server holds 32 \(--kv-cache-tokens\)"):
        engine.submit([[65] * 20], SamplingParams(max_new_tokens=30), loop=_Loop())


# ---- evaluation reuses contexts ---------------------------------------------------------------------------
def test_shared_context_scoring_equals_scoring_whole_sequences():
    from gptlab.eval.scoring import score_pairs

    model = peaked_model(attn_pattern="alternating", local_window=7)
    with torch.no_grad():
        model.transformer.wte.weight.div_(40)  # spread-out probabilities: log-likelihoods that differ
    shots = [5, 6, 7, 8] * 6
    pairs = [
        (shots + [20 + item, 21], choice)
        for item in range(5)
        for choice in ([30], [31, 32], [33, 34, 35], [36 + item] * 4)
    ]
    whole = score_pairs(model, pairs, batch_size=3, reuse=False)
    shared = score_pairs(model, pairs, batch_size=3, reuse=True)
    assert [g for _, g in shared] == [g for _, g in whole]
    for (a, _), (b, _) in zip(shared, whole, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_generate_leaves_the_model_untouched():
    model = peaked_model()
    before = copy.deepcopy(model.state_dict())
    generate_ids(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(k.startswith("_") for k in vars(model) if k not in vars(GPT(model.config)))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_advance_fails_only_rows_whose_logits_cannot_be_sampled(temperature):
    from gptlab.infer.rows import advance, make_rows
    from gptlab.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=4, temperature=temperature, seed=0)
    rows = make_rows([[1], [2], [3], [4], [5]], params, None)
    logits = torch.full((5, 7), -1.0)
    logits[:, 3] = 5.0
    logits[1, 2] = float("nan")  # NaN anywhere
    logits[2, 6] = float("inf")  # +inf anywhere
    logits[3] = float("-inf")  # -inf everywhere
    logits[4, :3] = float("-inf")  # -inf in places only: still samplable
    advance(rows, logits, eos_id=None, n_ctx=64)
    assert [r.finish_reason for r in rows] == [None, "error", "error", "error", None]
    assert all("not finite" in rows[i].error for i in (1, 2, 3))
    assert rows[0].ids == [3] and rows[4].ids[0] in range(3, 7)
    if temperature == 0:
        assert rows[4].ids == [3]
