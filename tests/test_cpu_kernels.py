"""The few-row C kernels against torch's matmul, their fallback, and decoding through them."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from gptlab.infer.cpu import kernels as cpu_kernels
from gptlab.infer.generate import generate_ids
from gptlab.infer.prepare import prepare_model
from gptlab.infer.quantize import KernelLinear, PackedLinear, quantize_weight
from tests.test_generate import greedy_recompute, peaked_model

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="gptlab's CPU kernels did not build here (no C compiler or no AVX2)"
)


def reference(x: torch.Tensor, weight: torch.Tensor, scale=None, bias=None) -> torch.Tensor:
    w = weight.double() * (scale.double()[:, None] if scale is not None else 1)
    y = x.double() @ w.t()
    return (y + bias.double() if bias is not None else y).float()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 16, 41])
@pytest.mark.parametrize("shape", [(7, 13), (10, 8), (40, 70), (1001, 768)])  # (40, 70): AMX blocks, K % 32
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_kernel_equals_matmul(rows, shape, kind):
    torch.manual_seed(rows)
    N, K = shape
    x, w, bias = torch.randn(rows, K), torch.randn(N, K), torch.randn(N)
    scale = None
    if kind == "int8":
        w, scale = quantize_weight(w)
    else:
        w = w.to(getattr(torch, kind))
    got = cpu_kernels.linear(x, w, scale, bias)
    # bfloat16 weights multiply activations rounded to bfloat16 (nearest even), as torch's bfloat16 GEMMs
    want = reference(x.bfloat16() if kind == "bfloat16" else x, w, scale, bias)
    if kind == "int8":  # activations rounded to 13 bits per row inside the kernel: ~1e-4 relative
        torch.testing.assert_close(got, want, atol=2e-4 * want.abs().max().item(), rtol=0)
    else:  # fp32 accumulation in a different order than float64: error grows like sqrt(K)
        torch.testing.assert_close(got, want, atol=4e-5 * K**0.5, rtol=1e-5)
    no_bias = cpu_kernels.linear(x, w, scale)
    torch.testing.assert_close(no_bias + bias, got, atol=1e-5 * want.abs().max().item(), rtol=0)


@needs_kernels
@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_kernel_row_has_the_same_bits_beside_any_number_of_rows(kind):
    # A speculative step verifies K + 1 positions as rows of one call; its greedy output is the plain
    # step's only if each row's logits do not depend on the rows beside it (float32 tiles of 1 to 8
    # rows, int8 rows quantised one by one). bfloat16 products of 2+ rows run on AMX where it exists.
    torch.manual_seed(0)
    x, w = torch.randn(17, 333), torch.randn(101, 333)
    w, scale = quantize_weight(w) if kind == "int8" else (w, None)
    alone = torch.cat([cpu_kernels.linear(x[i : i + 1], w, scale) for i in range(17)])
    for rows in range(2, 18):
        assert torch.equal(cpu_kernels.linear(x[:rows], w, scale), alone[:rows]), rows


@needs_kernels
def test_kernel_same_result_for_any_thread_count():
    x, w = torch.randn(3, 256), torch.randn(1001, 256)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cpu_kernels.linear(x, w))
    finally:
        torch.set_num_threads(threads)
    # each output is one thread's dot product, so the split cannot change a bit
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_kernels
def test_kernel_rejects_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="weights must be one of"):
        cpu_kernels.linear(x, torch.randn(4, 8).half())
    with pytest.raises(ValueError, match="per-row scale"):
        cpu_kernels.linear(x, torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="bias must be"):
        cpu_kernels.linear(x, torch.randn(4, 8), bias=torch.randn(5))
    with pytest.raises(ValueError, match="at most"):
        cpu_kernels.linear(torch.randn(cpu_kernels.MAX_ROWS + 1, 8), torch.randn(4, 8))


@needs_kernels
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "bfloat16-not-native", "int8"])
def test_kernel_linear_few_and_many_rows_agree(storage, monkeypatch):
    if storage == "bfloat16-not-native":  # what CPUs without native bfloat16 GEMMs run, on any CPU
        monkeypatch.setattr(cpu_kernels, "native_bfloat16_gemm", lambda: False)
        storage = "bfloat16"
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = KernelLinear(linear.weight, linear.bias, storage)
    x = torch.randn(2, 40, 64)  # 80 rows: a GEMM (int8: fbgemm's dynamic one)
    xin = x.bfloat16().float() if storage == "bfloat16" else x  # bfloat16 weights meet bfloat16 activations
    exact = torch.nn.functional.linear(xin, layer.dequantized(), linear.bias)
    many = layer(x)
    few = torch.cat([layer(x[:, i : i + 1]) for i in range(40)], dim=1)  # 2 rows at a time: the kernel
    scale = exact.abs().max().item()
    if storage == "int8":
        # the kernel rounds activations to 13 bits per row (~1e-4), fbgemm's dynamic GEMM to 7 bits
        torch.testing.assert_close(few, exact, atol=2e-4 * scale, rtol=0)
        assert torch.equal(many, layer.dynamic(x))
        assert (many - exact).abs().max() < 0.03 * scale
    else:
        torch.testing.assert_close(few, exact, atol=1e-5, rtol=1e-5)
        # torch's native bfloat16 GEMM, where there is one, also rounds its output to bfloat16
        native = storage == "bfloat16" and cpu_kernels.native_bfloat16_gemm()
        torch.testing.assert_close(many, exact, atol=2**-8 * scale if native else 1e-5, rtol=1e-5)
    if storage == "float32":
        torch.testing.assert_close(few, linear(x), atol=1e-5, rtol=1e-5)
    if storage == "bfloat16":  # a bfloat16 model's activations: the same products
        for got in (layer(x.bfloat16()), torch.cat([layer(x[:, i : i + 1].bfloat16()) for i in range(40)], dim=1)):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), exact, atol=2**-8 * scale, rtol=0)  # bfloat16 output


@needs_kernels
@pytest.mark.parametrize("pattern", ["dense", "alternating"])
def test_decoding_on_kernels_equals_float_recompute(pattern):
    model = peaked_model(attn_pattern=pattern, local_window=4)
    prompts = [[1, 2, 3, 4], [5]]
    want = [greedy_recompute(model, p, 10) for p in prompts]
    prepare_model(model)
    assert isinstance(model.lm_head, KernelLinear) and model.quantized == "float32-kernels"
    assert generate_ids(model, prompts, max_new_tokens=10, temperature=0) == want


@needs_kernels
def test_bfloat16_and_int8_on_kernels_decode_like_their_float_weights():
    model = peaked_model().to(torch.bfloat16)
    reference_model = copy.deepcopy(model).float()  # the same bf16 weights, in float32
    prompts = [[1, 2, 3, 4], [5]]
    prepare_model(model)
    assert model.quantized == "bfloat16-kernels" and model.transformer.wte.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert generate_ids(model, prompts, max_new_tokens=8, temperature=0) == generate_ids(
        reference_model, prompts, max_new_tokens=8, temperature=0
    )
    int8 = prepare_model(peaked_model(), quantize="int8")
    assert int8.quantized == "int8-kernels" and int8.lm_head.weight.dtype == torch.int8
    # the recompute runs the same int8 layers without the cache (prefill path: dequantised GEMM)
    assert generate_ids(int8, prompts, max_new_tokens=8, temperature=0) == [
        greedy_recompute(int8, p, 8) for p in prompts
    ]


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="kernels unavailable.*no C compiler"):
            assert not cpu_kernels.available()
        model = prepare_model(peaked_model())
        assert isinstance(model.lm_head, PackedLinear) or not torch.backends.mkldnn.is_available()
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_kernels.linear(torch.randn(1, 8), torch.randn(4, 8))
    finally:
        cpu_kernels._library.cache_clear()


def test_build_is_cached_and_atomic(tmp_path):
    try:
        path = cpu_kernels.build(tmp_path)
    except RuntimeError as e:
        pytest.skip(f"no kernels here: {e}")
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


# ---- the whole decoding step in one C call -------------------------------------------------------
def engines(model, tokens: int = 1024, block_size: int = 4):
    """An engine on the C step and one on the torch reference, with KV pools of one dtype."""
    from gptlab.infer.engine import InferenceEngine

    fused = InferenceEngine(model, kv_cache_tokens=tokens, block_size=block_size)
    plain = InferenceEngine(model, kv_cache_tokens=tokens, block_size=block_size, kernels=False,
                            kv_dtype=fused.pool.k.dtype)  # fmt: skip
    return fused, plain


def run_both_steps(model, prompts, steps):
    """Decode greedily with the fused C step, and feed the same tokens to the torch step on a second
    pool; the largest logit and cache differences seen (relative to the largest value)."""
    fused, plain = engines(model)
    assert fused.fast is not None and plain.fast is None
    a, b = [fused.sequence(p) for p in prompts], [plain.sequence(p) for p in prompts]
    logits = fused.forward(a)
    plain.forward(b)
    worst = 0.0
    for _ in range(steps):
        for s, t, token in zip(a, b, logits.argmax(-1).tolist(), strict=True):
            s.tokens.append(token)
            t.tokens.append(token)
        logits = fused.forward(a)
        want = plain.forward(b)
        worst = max(worst, (logits - want).abs().max().item() / want.abs().max().item())
    assert [s.blocks for s in a] == [t.blocks for t in b]
    kv = max(
        ((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
        for x, y in ((fused.pool.k, plain.pool.k), (fused.pool.v, plain.pool.v))
    )  # relative to the largest value
    return worst, kv, fused


@needs_kernels
@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("head_size", [16, 64])  # 64: the value sums in registers (weigh_values64)
def test_fused_step_equals_the_torch_step(pattern, storage, head_size):
    model = peaked_model(attn_pattern=pattern, local_window=3, n_layer=3, n_embd=2 * head_size, n_head=2)
    if storage == "bfloat16":
        model = model.to(torch.bfloat16)
    prepare_model(model, quantize="int8" if storage == "int8" else None)
    calls, fn = [], cpu_kernels._library().gl_decode_step
    for layer in model.modules():  # the torch step on the same kernels (int8: not fbgemm from 3 rows on)
        if isinstance(layer, KernelLinear):
            layer.kernel_rows = cpu_kernels.MAX_ROWS
    max_rows = engines(model)[0].fast.max_rows
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]][:max_rows] + [[9, 10, 11]] * (max_rows > 2)
    import gptlab.infer.cpu.kernels as K

    original = K.DecodeStep.decode

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    K.DecodeStep.decode = counted
    try:
        worst, kv, engine = run_both_steps(model, prompts, steps=12)  # past the window: the band slides
    finally:
        K.DecodeStep.decode = original
    assert fn is not None and len(calls) == 12  # every step ran in C
    step = engine.fast
    # the same kernels; int8 rounds activations to 13 bits, bfloat16 to bfloat16, where a last-bit
    # layer-norm difference can move one step (~1e-4 relative)
    assert worst < (1e-5 if storage == "float32" else 1e-3)
    # bfloat16 / int8 weights keep a float16 cache, where a last-bit float32 difference can round a key
    # to the neighbouring float16 value: one float16 step (2^-10 relative) at most
    half = storage != "float32"
    assert step.cache_dtype == (torch.float16 if half else torch.float32)
    assert kv < (2**-10 if half else 1e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_step_verifies_several_tokens_of_a_sequence_like_the_torch_step(threads):
    """A speculative step's K + 1 positions of one sequence run as rows of the fused step sharing a
    block table (each sees the keys the earlier ones write in the same call, whichever thread runs
    them): the logits and cache of the torch step's prefill of the same tokens."""
    model = peaked_model(attn_pattern="alternating", local_window=5, n_layer=2)
    prepare_model(model)
    fused, plain = engines(model)
    import gptlab.infer.cpu.kernels as K

    calls, original = [], K.DecodeStep.decode
    K.DecodeStep.decode = lambda self, pool, tokens, *rest: calls.append(len(tokens)) or original(
        self, pool, tokens, *rest
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10] * 14]
        a, b = [fused.sequence(p) for p in prompts], [plain.sequence(p) for p in prompts]
        fused.forward(a)
        plain.forward(b)
        drafts = [[11, 12, 13, 14, 15], [16], [17, 18, 19, 20, 21, 22, 23, 24, 25]]  # across block edges
        for s, t, d in zip(a, b, drafts, strict=True):
            s.tokens.extend(d)
            t.tokens.extend(d)
        got = fused.forward(a, [len(d) for d in drafts])
        want = plain.forward(b, [len(d) for d in drafts])
    finally:
        K.DecodeStep.decode = original
        torch.set_num_threads(before)
    assert calls == [sum(map(len, drafts))]  # one call, a row per position
    assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5
    for x, y in ((fused.pool.k, plain.pool.k), (fused.pool.v, plain.pool.v)):
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-5


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])  # 3 threads, 2 heads: a run's rows split between threads
@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("head_size", [16, 64])  # 64: the value sums in registers (weigh_values64)
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])  # bfloat16 (AMX), int8: a float16 cache
def test_verified_positions_have_the_bits_of_one_at_a_time_decoding(threads, pattern, head_size, storage):
    """The rows of one sequence attend together (reading each cached block once for all of them), yet
    every row's logits must have the bits it has when decoded alone, whatever rows are beside it:
    speculative greedy output is the target's own only if verification computes plain decoding's
    logits exactly (bfloat16 batches on AMX tiles round otherwise than one row: not these)."""
    model = peaked_model(attn_pattern=pattern, local_window=6, n_layer=2, n_embd=2 * head_size, n_head=2)
    if storage == "bfloat16":
        model = model.to(torch.bfloat16)
    prepare_model(model, quantize="int8" if storage == "int8" else None)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10] * 13]
    drafts = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [20], [21, 22, 23, 24, 25]]  # across block edges
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together, alone = engines(model)[0], engines(model)[0]
        seqs = [together.sequence(p) for p in prompts]
        for seq in seqs:  # prompts one at a time, as below (int8's batched prefill quantizes them together)
            together.forward([seq])
        for seq, d in zip(seqs, drafts, strict=True):
            seq.tokens.extend(d)
        got = together.forward(seqs, [len(d) for d in drafts])  # one call: 15 rows in three runs
        want = []
        for p, d in zip(prompts, drafts, strict=True):
            seq = alone.sequence(p)
            alone.forward([seq])
            for token in d:
                seq.tokens.append(token)
                want.append(alone.forward([seq]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, torch.cat(want))


@needs_kernels
def test_greedy_steps_feed_back_the_argmax_of_each_step():
    model = prepare_model(peaked_model(attn_pattern="alternating", local_window=3))
    one_call, stepwise = engines(model)[0], engines(model)[0]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    a, b = [one_call.sequence(p) for p in prompts], [stepwise.sequence(p) for p in prompts]
    first = one_call.forward(a).argmax(-1).tolist()
    stepwise.forward(b)
    for seq, token in zip(a + b, first + first, strict=True):
        seq.tokens.append(token)
    got = one_call.greedy(a, 6)
    want = [[], []]
    for _ in range(6):
        logits = stepwise.forward(b)
        for i, (seq, token) in enumerate(zip(b, logits.argmax(-1).tolist(), strict=True)):
            want[i].append(token)
            seq.tokens.append(token)
    assert got == want
    assert [s.tokens for s in a] == [s.tokens[:-1] for s in b] and [s.length for s in a] == [len(s.tokens) for s in a]
    assert one_call.greedy(a, 200) is None  # past the context: nothing done
    one_call.pool.check()
    with torch.no_grad():  # logits that cannot be sampled: -1 from that step on
        model.transformer.ln_f.weight[0] = float("nan")
    broken = engines(model)[0]  # the step reads the model's tensors as they are now
    seq = broken.sequence([1, 2])
    broken.forward([seq])
    seq.tokens.append(3)
    assert broken.greedy([seq], 3) == [[-1, -1, -1]]


@needs_kernels
def test_fused_step_takes_a_wide_batch_in_one_call():
    model = peaked_model(attn_pattern="alternating", local_window=3, n_layer=2)
    prepare_model(model)
    import gptlab.infer.cpu.kernels as K

    calls, original = [], K.DecodeStep.decode
    K.DecodeStep.decode = lambda self, pool, tokens, *rest: calls.append(len(tokens)) or original(
        self, pool, tokens, *rest
    )
    try:
        prompts = [[1 + i % 7] * (1 + i % 5) for i in range(41)]  # 41 rows of 1-5 tokens
        worst, kv, _ = run_both_steps(model, prompts, steps=5)
    finally:
        K.DecodeStep.decode = original
    assert calls[-5:] == [41] * 5 and worst < 1e-5 and kv < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_fused_step_logits_bitwise_equal_for_any_thread_count(dtype):
    # Threads claim chunks of weight rows dynamically, and the chunk edges move with the thread count;
    # every output must still be computed alike, GELU included (an MLP width of 100 leaves tails of
    # its 8-wide vector code at different places for 1, 2 and 3 threads).
    model = peaked_model(n_embd=40, n_head=4, n_inner=100, vocab_size=301)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    prepare_model(model, quantize="int8" if dtype == "int8" else None)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            engine, _ = engines(model)
            seqs = [engine.sequence(p) for p in ([1, 2, 3], [4, 9], [5, 6])]
            engine.forward(seqs)
            steps = []
            for _ in range(3):
                for seq, token in zip(seqs, (7, 8, 9), strict=True):
                    seq.tokens.append(token)
                steps.append(engine.forward(seqs))
            results.append(torch.cat(steps))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@needs_kernels
def test_fused_step_same_result_for_any_thread_count():
    model = prepare_model(peaked_model(attn_pattern="alternating", local_window=3, n_head=4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(generate_ids(model, [[1, 2, 3], [4]], max_new_tokens=6, temperature=0, logprobs=0))
    finally:
        torch.set_num_threads(threads)
    assert all(r == results[0] for r in results[1:])


@needs_kernels
def test_fused_step_gives_the_callers_threads_their_subnormals_back():
    # The step flushes subnormals to zero while it runs (FTZ / DAZ); torch's work after it, on the
    # calling thread and on the worker threads the step shared, must see them again.
    model = prepare_model(peaked_model())
    engine, _ = engines(model)
    seq = engine.sequence([1, 2, 3])
    engine.forward([seq])
    seq.tokens.append(4)
    engine.forward([seq])
    tiny = torch.tensor(1e-39)
    assert (tiny * 2).item() > 0
    many = torch.full((1 << 20,), 1e-39)
    assert bool(((many * 2) > 0).all())


@needs_kernels
def test_fused_step_rejects_bad_input():
    model = prepare_model(peaked_model())
    engine, _ = engines(model, tokens=16, block_size=4)
    pool, step = engine.pool, engine.fast
    seq = engine.sequence([1, 2])
    engine.forward([seq])
    table = pool.table([seq])
    one, pos = torch.tensor([1]), torch.tensor([2])
    with pytest.raises(ValueError, match="token id is out of range"):
        step.decode(pool, torch.tensor([model.config.vocab_size]), pos, table)
    with pytest.raises(ValueError, match="beyond the KV pool"):  # position 4 needs a second table entry
        step.decode(pool, one, torch.tensor([4]), table)
    with pytest.raises(ValueError, match="beyond the KV pool"):
        step.decode(pool, one, pos, torch.tensor([[pool.num_blocks]]))
    with pytest.raises(ValueError, match="beyond the model's context"):
        step.decode(pool, one, torch.tensor([model.config.n_ctx]), table)
    with pytest.raises(ValueError, match="one token, position and table row per row"):
        step.decode(pool, torch.tensor([1, 2]), pos, table)
    bad = SimpleNamespace(k=pool.k, v=pool.v[..., :4])
    with pytest.raises(ValueError, match="KV pool must be"):
        step.decode(bad, one, pos, table)
    bad = SimpleNamespace(k=pool.k[:, :, :1].clone(), v=pool.v[:, :, :1].clone())  # C would read past it
    with pytest.raises(ValueError, match="KV pool must be"):
        step.decode(bad, one, pos, table)
    with pytest.raises(ValueError, match="float32 or float16"):
        step.decode(SimpleNamespace(k=pool.k.double(), v=pool.v.double()), one, pos, table)
    assert step.runs(step.max_rows) and not step.runs(0)


@needs_kernels
def test_half_cache_for_bfloat16_and_int8_saturates_like_the_torch_path():
    model = peaked_model(n_layer=1)
    C = model.config.n_embd
    with torch.no_grad():  # keys far beyond float16's range, and one NaN value
        model.transformer.h[0].attn.c_attn.bias[C : 2 * C] = 1e6
        model.transformer.h[0].attn.c_attn.bias[2 * C] = float("nan")
    prepare_model(model, quantize="int8")
    engine, _ = engines(model, tokens=8, block_size=8)
    assert engine.pool.k.dtype == torch.float16
    seq = engine.sequence([1, 2])
    engine.forward([seq])  # positions 0-1 by the torch path (cache.to_cache)
    seq.tokens.append(3)
    engine.forward([seq])  # position 2 by the C step
    block = seq.blocks[0]
    k, v = engine.pool.k[0, block, :, :3], engine.pool.v[0, block, :, :3]  # (nh, 3 positions, hs)
    assert bool((k == 65504).all()), "keys are stored as float16's largest value, not inf"
    assert bool(v[0, :, 0].isnan().all()) and bool(v[..., 1:].isfinite().all()) and bool(v[1:].isfinite().all())
    # float32 weights keep the float32 cache
    assert engines(prepare_model(peaked_model()))[0].pool.k.dtype == torch.float32


def test_huge_page_views_lay_tensors_out_in_order(monkeypatch):
    like = [torch.zeros(3, 1000, dtype=torch.int8), torch.zeros(700_000), torch.zeros(5, dtype=torch.bfloat16)]
    for huge in (True, False):
        if not huge:  # systems without madvise(MADV_HUGEPAGE): ordinary memory, same layout
            monkeypatch.delattr(cpu_kernels.mmap, "MADV_HUGEPAGE", raising=False)
        views = cpu_kernels.huge_page_views(like)
        assert [(v.shape, v.dtype) for v in views] == [(t.shape, t.dtype) for t in like]
        starts = [v.data_ptr() for v in views]
        assert starts == sorted(starts) and all(s % 64 == 0 for s in starts)
        assert starts[1] - starts[0] == 3008 and all(bool((v == 0).all()) for v in views)
        assert starts[0] % cpu_kernels.HUGE_PAGE == 0 or not huge
        views[1].fill_(1.0)  # writable, and the neighbours untouched
        assert views[0].abs().sum() == 0 and views[2].abs().sum() == 0


@needs_kernels
@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_kernel_weights_sit_in_one_buffer_in_reading_order(storage):
    model = peaked_model(n_layer=2)
    want = greedy_recompute(model, [1, 2, 3], 5)
    prepare_model(model, quantize="int8" if storage == "int8" else None)
    t = model.transformer
    order = [layer for b in t.h for layer in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    order.append(model.lm_head)
    starts = [layer.weight.data_ptr() for layer in order]
    ends = [layer.weight.data_ptr() + layer.weight.nbytes for layer in order]
    assert all(e <= s < e + 64 for e, s in zip(ends, starts[1:], strict=False))  # back to back
    if storage == "int8":  # one copy of the int8 values serves the kernel and `dequantized`
        assert all(layer.dynamic.weight_int8 is layer.weight for layer in order)
    assert generate_ids(model, [[1, 2, 3]], max_new_tokens=5, temperature=0) == [want]
    with pytest.raises(ValueError, match="out must be"):
        KernelLinear(torch.randn(4, 8), storage=storage, out=torch.empty(4, 8, dtype=torch.float64))


@needs_kernels
def test_beams_and_seeded_samples_on_the_fused_step_follow_the_float_model():
    """Beam search and n samples reorder and repeat the cache between fused steps."""
    reference_model = peaked_model(attn_pattern="alternating", local_window=3)
    model = prepare_model(copy.deepcopy(reference_model))
    prompts = [[1, 2, 3, 4], [5, 6]]
    for kw in (dict(num_beams=3, n=2, temperature=0), dict(n=3, temperature=1.0, seed=7)):
        want = generate_ids(reference_model, prompts, max_new_tokens=8, **kw)
        assert generate_ids(model, prompts, max_new_tokens=8, **kw) == want


@pytest.fixture(scope="module")
def avx2_build(tmp_path_factory):
    if not cpu_kernels.avx512():
        pytest.skip("no AVX-512 here: the native build is the AVX2 code the other tests check")
    lib = cpu_kernels.load(cpu_kernels.build(tmp_path_factory.mktemp("kernels"), isa="avx2"))
    assert lib.gl_avx512() == 0
    return lib


@needs_kernels
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_avx2_build_on_an_avx512_machine_computes_alike(avx2_build, kind, monkeypatch):
    # On an AVX-512 machine every other test runs its code (16-lane int8 tiles, BF16, AMX); the AVX2
    # code that other CPUs run is checked here, built with -mno-avx512f, by the same tests.
    torch.manual_seed(0)
    x, w = torch.randn(5, 768), torch.randn(1001, 768)
    w, scale = quantize_weight(w) if kind == "int8" else (w.to(getattr(torch, kind)), None)
    native = cpu_kernels.linear(x, w, scale)
    monkeypatch.setattr(cpu_kernels, "_library", lambda: avx2_build)
    avx2 = cpu_kernels.linear(x, w, scale)
    if kind == "int8":  # exact integer sums over the same chunks of K: the same bits at any width
        assert torch.equal(avx2, native)
    else:
        torch.testing.assert_close(avx2, native, atol=1e-4, rtol=1e-5)
    for rows, shape in ((1, (1001, 768)), (3, (7, 13)), (9, (10, 8)), (41, (33, 40))):
        test_kernel_equals_matmul(rows, shape, kind)
    for head_size in (16, 64):
        test_fused_step_equals_the_torch_step("alternating", kind, head_size)


def test_kernel_isa_must_be_known(monkeypatch):
    monkeypatch.setenv("GPTLAB_KERNEL_ISA", "avx9000")
    with pytest.raises(RuntimeError, match="GPTLAB_KERNEL_ISA must be one of"):
        cpu_kernels.build()


@needs_kernels
def test_read_sum_sums():
    x = torch.randn(100_003)  # not a multiple of any vector width or thread split
    assert cpu_kernels.read_sum(x) == pytest.approx(x.double().sum().item(), abs=1e-6 * x.abs().sum().item())
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_kernels.read_sum(x[::2])
