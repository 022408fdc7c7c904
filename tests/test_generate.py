"""Generation: KV cache vs recompute, parity with transformers, sampling semantics, stop, streaming."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from gptlab import GPT, ModelConfig
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.generate import generate, generate_ids, stream
from gptlab.infer.sampling import SamplingParams, argmax, best_tokens, process_logits, sample_checked, sample_next

# ---- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine waiting for them costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaked_model(seed: int = 0, **kw) -> GPT:
    """A random tiny GPT with confident predictions, so greedy choices are never near-ties that
    float rounding could flip between implementations."""
    base = dict(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=101)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)
    return model


def greedy_recompute(model: GPT, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level tokenizer with no merges: one token per UTF-8 byte, <|endoftext|> = 256."""
    from gptlab.tokenizer import Tokenizer

    return Tokenizer({bytes([b]): b for b in range(256)}, [], {"<|endoftext|>": 256})


def scripted_model(script: list[int], vocab: int = 257) -> GPT:
    """A hand-built GPT whose greedy token after position p is script[p], whatever the input.

    Blocks are identities (zero output projections), wpe[p] is a one-hot spike, and an untied head maps
    spike p to token script[p].
    """
    n = len(script)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=n, n_ctx=n, vocab_size=vocab, tie_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(n) * 10)
        for position, token in enumerate(script):
            model.lm_head.weight[token, position] = 4.0
    return model.eval()


def script_text(prompt_len: int, text: bytes, eot: int | None = None, n: int = 48) -> list[int]:
    """A script that generates `text` (bytes) after a prompt of prompt_len tokens, then `eot`."""
    tail = list(text) + ([eot] if eot is not None else [])
    script = [ord("x")] * (prompt_len - 1) + tail
    return script + [ord("z")] * (n - len(script))


# ---- KV cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
def test_cached_greedy_equals_full_recompute_padded_batch(pattern):
    model = peaked_model(attn_pattern=pattern, local_window=4, n_layer=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8], [5] * 13, [42]]
    out = generate_ids(model, prompts, SamplingParams(max_new_tokens=20, temperature=0))
    for prompt, got in zip(prompts, out, strict=True):
        assert got == greedy_recompute(model, prompt, 20)


def sampled_recompute(model: GPT, prompt: list[int], steps: int, params: SamplingParams) -> list[int]:
    """Seeded sampling without any cache: every step a forward pass over the whole sequence, the
    draw from the stream (seed, sample 0) that a request's first completion uses."""
    from gptlab.infer.sampling import make_generator

    generator, out = make_generator(params.seed, 0), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out]))[0][:, -1].float()
            out.append(int(sample_next(process_logits(logits, [out], [params], [prompt]), [params], [generator])[0]))
    return out


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
def test_seeded_sampling_equals_full_recompute_mixed_batch(pattern):
    torch.manual_seed(1)  # plain random weights: flat distributions, so the draws really sample
    model = GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, n_ctx=64, vocab_size=101, attn_pattern=pattern,
                            local_window=4)).eval()  # fmt: skip
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8], [5] * 13, [42]]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, repetition_penalty=1.2, seed=7)
    got = generate_ids(model, prompts, params)
    want = [sampled_recompute(model, p, 20, params) for p in prompts]
    assert got == want
    assert len({tuple(g) for g in got}) == len(got) and all(len(set(g)) > 5 for g in got)  # really sampled


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_engine_logits_match_full_forward(pattern, block_size):
    """Prefill rows of different lengths in one batch, then decode them together one token a step:
    every step's logits equal a forward pass over the whole sequence without any cache."""
    model = peaked_model(attn_pattern=pattern, local_window=3, n_layer=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [7] * 11]
    continuation = [[7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]
    engine = InferenceEngine(model, kv_cache_tokens=64, block_size=block_size)
    seqs = [engine.sequence(p) for p in prompts]
    logits = [engine.forward(seqs)]
    for t in range(6):
        for seq, c in zip(seqs, continuation, strict=True):
            seq.tokens.append(c[t])
        logits.append(engine.forward(seqs))
    with torch.no_grad():
        for b in range(len(prompts)):
            full = model(torch.tensor([prompts[b] + continuation[b]]))[0][0]
            ref = full[len(prompts[b]) - 1 :]
            got = torch.stack([step[b] for step in logits])
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for seq in seqs:
        engine.free(seq)
    engine.pool.check()
    assert engine.pool.in_use == 0


# ---- transformers parity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random tiny GPT2LMHeadModel and the same weights loaded by gptlab.checkpoint.load_model."""
    transformers = pytest.importorskip("transformers")
    from gptlab.checkpoint import load_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=100,
        bos_token_id=99,
        eos_token_id=99,
        initializer_range=0.3,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, load_model(directory)


def _hf_generate(hf, prompts, **kw):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=99, **kw)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(99)] if 99 in row else row)
    return rows


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8]], [[5, 6, 7, 8, 9, 10, 11], [3], [12, 13, 14]]])
def test_greedy_matches_transformers(hf_pair, prompts):
    hf, model = hf_pair
    want = _hf_generate(hf, prompts, max_new_tokens=16, do_sample=False)
    assert generate_ids(model, prompts, max_new_tokens=16, temperature=0, eos_id=99) == want


def test_repetition_penalty_matches_transformers(hf_pair):
    hf, model = hf_pair
    prompts = [[5, 6, 7, 5, 6, 7], [40, 41]]
    want = _hf_generate(hf, prompts, max_new_tokens=16, do_sample=False, repetition_penalty=1.8)
    got = generate_ids(model, prompts, max_new_tokens=16, temperature=0, repetition_penalty=1.8, eos_id=99)
    assert got == want
    assert got != generate_ids(model, prompts, max_new_tokens=16, temperature=0, eos_id=99)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_matches_transformers(hf_pair, length_penalty):
    hf, model = hf_pair
    prompts = [[5, 6, 7, 8], [3, 9]]
    want = _hf_generate(
        hf,
        prompts,
        max_new_tokens=10,
        num_beams=4,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=length_penalty,
    )
    params = SamplingParams(max_new_tokens=10, num_beams=4, n=2, length_penalty=length_penalty)
    assert generate_ids(model, prompts, params, eos_id=99) == want


# ---- logits processors against transformers' ---------------------------------------------------------


def test_warpers_match_transformers_processors():
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 3
    ids = torch.tensor([[1, 2, 2, 7], [3, 3, 3, 3], [0, 49, 10, 11]])
    cases = [
        (dict(repetition_penalty=1.7, temperature=0), [lp.RepetitionPenaltyLogitsProcessor(1.7)]),
        (dict(temperature=0.7), [lp.TemperatureLogitsWarper(0.7)]),
        (dict(top_k=5), [lp.TopKLogitsWarper(5)]),
        (dict(top_p=0.6), [lp.TopPLogitsWarper(0.6)]),
        (dict(min_p=0.2), [lp.MinPLogitsWarper(0.2)]),
        (
            dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
            [
                lp.TemperatureLogitsWarper(1.3),
                lp.TopKLogitsWarper(20),
                lp.TopPLogitsWarper(0.9),
                lp.MinPLogitsWarper(0.05),
            ],
        ),
    ]
    for kw, processors in cases:
        want = logits.clone()
        for p in processors:
            want = p(ids, want)
        got = process_logits(logits, [[]] * 3, SamplingParams(**kw), prompt_ids=ids)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), kw
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)]), kw


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(1, 6)
    got = process_logits(
        logits,
        [[1, 1, 1, 4]],
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        prompt_ids=[[2, 2]],
    )
    # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence, c over generated tokens only.
    assert got.tolist() == [[0.0, -(3 * 0.25 + 0.5), 0.0, 0.0, -(0.25 + 0.5), 0.0]]


def test_per_row_params_in_one_batch():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    rows = [SamplingParams(temperature=0), SamplingParams(top_k=1)]
    processed = process_logits(logits, [[], []], rows)
    assert processed[0].tolist() == [1.0, 3.0, 2.0] and torch.isinf(processed[1, [0, 2]]).all()
    assert sample_next(processed, rows).tolist() == [1, 1]


def test_argmax_is_torchs_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50257, generator=g)
    x[1, 5] = x[1, 9] = float("nan")  # NaN is the maximum, the first one wins
    x[2, 70] = x[2, 7] = x[2].max() + 1  # ties: the first index
    x[3] = -torch.inf
    for t in (x, x[0], x[:, ::3], x.bfloat16()):
        got = argmax(t)
        assert got.dtype == torch.long and torch.equal(got, t.argmax(-1))


def test_best_tokens_flag_the_rows_that_cannot_be_sampled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 301, generator=g)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3] = -torch.inf
    x[4, :300] = -torch.inf  # one finite logit is enough
    for t in (x, x.bfloat16()):
        best, broken = best_tokens(t)
        assert best == t.argmax(-1).tolist()
        assert broken == (~torch.isfinite(t.float().amax(1))).tolist() == [False, True, True, True, False, False]
    params = [SamplingParams(temperature=1.0, seed=1)] * 6
    tokens, broken = sample_checked(x, params, [torch.Generator().manual_seed(b) for b in range(6)])
    assert broken[1:4] == [True] * 3 and tokens[4] == 300  # the others still draw from their logits
    assert tokens[0] == int(torch.multinomial(x[0].softmax(-1), 1, generator=torch.Generator().manual_seed(0)))


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(process_logits(logits, [[]] * 20000, SamplingParams(temperature=2.0)), SamplingParams(), g)
    freq = torch.bincount(drawn, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


# ---- sampling end to end ------------------------------------------------------------------------------


def test_seed_reproducible_and_n_samples_differ():
    model = peaked_model()
    with torch.no_grad():
        model.transformer.wte.weight.div_(40)  # flat distributions: samples vary
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(max_new_tokens=12, seed=123, n=3, top_p=0.95)
    first = generate_ids(model, prompts, params)
    assert len(first) == 6 and first == generate_ids(model, prompts, params)
    assert len({tuple(r) for r in first[:3]}) == 3
    assert first != generate_ids(model, prompts, params.updated(seed=124))
    # A seeded request replays the same tokens whatever shares its batch.
    assert generate_ids(model, [prompts[1]], params)[:3] == first[3:]


def test_degenerate_sampling_equals_greedy():
    model = peaked_model()
    prompts = [[1, 2, 3], [7]]
    greedy = generate_ids(model, prompts, max_new_tokens=10, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert generate_ids(model, prompts, max_new_tokens=10, seed=0, **kw) == greedy, kw


# ---- text: stop sequences, streaming, eos, logprobs ----------------------------------------------------


def test_stop_sequence_across_token_boundaries(byte_tokenizer):
    text = "héllo, wörld\n\nnext"
    model = scripted_model(script_text(2, text.encode()))
    full = generate(model, byte_tokenizer, "ab", max_new_tokens=30, temperature=0)[0]
    assert full.text.startswith(text) and full.finish_reason == "length"
    for stop, want in [("\n\n", "héllo, wörld"), ("ö", "héllo, w"), ("lo, w", "hél")]:
        c = generate(model, byte_tokenizer, "ab", max_new_tokens=30, temperature=0, stop=["zzz", stop])[0]
        assert (c.text, c.finish_reason) == (want, "stop"), stop
        assert bytes(c.token_ids).decode() == want  # tokens that begin before the stop


def test_stream_never_splits_utf8_and_holds_back_stop_prefix(byte_tokenizer):
    text = "añb€c😀d\n"
    model = scripted_model(script_text(1, text.encode(), eot=256))
    deltas = list(stream(model, byte_tokenizer, "a", max_new_tokens=40, temperature=0))
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert "€" in deltas and "😀" in deltas  # a 3- and a 4-byte character, each arriving whole
    deltas = list(stream(model, byte_tokenizer, "a", max_new_tokens=40, temperature=0, stop=["c😀X"]))
    assert "".join(deltas) == text  # "c😀" was held back until "d" ruled the stop out
    assert "c😀d" in deltas  # held back, released together once "d" ruled the stop out
    deltas = list(stream(model, byte_tokenizer, "a", max_new_tokens=40, temperature=0, stop=["€c"]))
    assert "".join(deltas) == "añb"


def test_eos_stops_rows_independently(byte_tokenizer):
    model = scripted_model(script_text(3, b"0123456789", eot=256))
    out = generate(model, byte_tokenizer, ["abc", "a", "abcdef"], max_new_tokens=20, temperature=0)
    # Each row continues the script from its own position (left padding keeps positions per row).
    assert [c.text for c in out] == ["0123456789", "xx0123456789", "3456789"]
    assert all(c.finish_reason == "stop" for c in out)
    capped = generate(model, byte_tokenizer, ["abc", "abcdef"], max_new_tokens=5, temperature=0)
    assert [(c.text, c.finish_reason) for c in capped] == [("01234", "length"), ("34567", "length")]


def test_logprobs_are_model_logprobs_with_top_alternatives(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    with torch.no_grad():
        model.transformer.wte.weight.div_(10)
    c = generate(model, byte_tokenizer, "hi", max_new_tokens=6, seed=3, logprobs=3, temperature=0.8)[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    seq = byte_tokenizer.encode("hi") + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq]))[0][0], -1)
    for t, lp in enumerate(c.logprobs):
        row = ref[len(seq) - 7 + t]
        assert lp.token_id == c.token_ids[t] and lp.token == byte_tokenizer.decode([lp.token_id])
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
        assert [v for _, v in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert [t for t, _ in lp.top] == [byte_tokenizer.decode([i]) for i in row.topk(3).indices.tolist()]


def test_beam_search_returns_n_best_sorted_and_text(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    out = generate(model, byte_tokenizer, ["hello", "x"], max_new_tokens=5, num_beams=3, n=2)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1]
    assert all(c.text == byte_tokenizer.decode(c.token_ids) for c in out)
    assert out[0].token_ids != out[1].token_ids


# ---- prompts and validation --------------------------------------------------------------------------


def test_long_prompt_left_truncated_or_rejected(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    long = "abcdefghij" * 5
    with pytest.warns(UserWarning, match="keeping its last 24 tokens"):
        got = generate(model, byte_tokenizer, long, max_new_tokens=8, temperature=0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = generate(model, byte_tokenizer, long[-24:], max_new_tokens=8, temperature=0)[0]
    assert got.token_ids == want.token_ids
    with pytest.raises(ValueError, match="50 tokens"):
        generate(model, byte_tokenizer, long, max_new_tokens=8, truncate=False)


def test_empty_prompt_starts_from_endoftext(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    c = generate(model, byte_tokenizer, "", max_new_tokens=6, temperature=0)[0]
    assert c.token_ids == generate_ids(model, [[256]], max_new_tokens=6, temperature=0)[0][: len(c.token_ids)]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=-1),
        dict(min_p=2.0),
        dict(n=0),
        dict(repetition_penalty=0),
        dict(logprobs=-1),
        dict(bogus=1),
    ],
)
def test_invalid_parameters_raise_value_error(byte_tokenizer, bad):
    model = peaked_model(vocab_size=257, n_ctx=32)
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(model, byte_tokenizer, "hi", **bad)


def test_empty_batch_and_bad_prompts_raise(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, byte_tokenizer, [])
    with pytest.raises(ValueError, match="no prompts"):
        generate_ids(model, [])
    with pytest.raises(ValueError, match="eos_id"):
        generate_ids(model, [[]])
    with pytest.raises(ValueError, match="n=1"):
        stream(model, byte_tokenizer, "hi", n=2)


def test_max_new_tokens_zero(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32)
    assert [(c.text, c.finish_reason) for c in generate(model, byte_tokenizer, ["a", "b"], max_new_tokens=0)] == [
        ("", "length"),
        ("", "length"),
    ]


def test_training_mode_restored(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=32, dropout=0.5).train()
    a = generate(model, byte_tokenizer, "hi", max_new_tokens=6, temperature=0)[0]
    b = generate(model, byte_tokenizer, "hi", max_new_tokens=6, temperature=0)[0]
    assert a.token_ids == b.token_ids and model.training


# ---- precision and quantisation ----------------------------------------------------------------------


def test_int8_quantized_model_close_to_float():
    from gptlab.infer.quantize import Int8Linear, quantize_int8

    model = peaked_model(n_embd=64, n_layer=2, vocab_size=128)
    with torch.no_grad():
        model.transformer.wte.weight.div_(8)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(x)[0]
        quantized = quantize_int8(copy.deepcopy(model))
        got = quantized(x)[0]
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 2 * 4 + 1  # blocks + head
    assert (got - ref).abs().max() / ref.abs().max() < 0.03
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    out = generate_ids(quantized, [[1, 2, 3]], max_new_tokens=8, temperature=0)
    assert out == [greedy_recompute(quantized, [1, 2, 3], 8)]


def test_packed_float32_linear_same_values():
    from gptlab.infer.quantize import PackedLinear, pack_float32

    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(PackedLinear(linear.weight, linear.bias)(x), linear(x), atol=1e-5, rtol=1e-5)
    model = peaked_model(attn_pattern="alternating", local_window=4)
    prompts = [[1, 2, 3, 4], [5]]
    want = generate_ids(model, prompts, max_new_tokens=10, temperature=0)
    pack_float32(model)
    assert isinstance(model.lm_head, PackedLinear)
    assert generate_ids(model, prompts, max_new_tokens=10, temperature=0) == want


def test_half_linear_exact_for_bfloat16_weights():
    from gptlab.infer.quantize import HalfLinear, pack_half

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.bfloat16().float())  # bf16 values: exactly representable in fp16
    x = torch.randn(5, 64)
    torch.testing.assert_close(HalfLinear.from_linear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)
    model = peaked_model().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same bf16 weights, computed in float32
    pack_half(model)
    assert model.transformer.wte.weight.dtype == torch.float32
    prompts = [[1, 2, 3, 4], [5]]
    want = generate_ids(reference, prompts, max_new_tokens=8, temperature=0)
    assert generate_ids(model, prompts, max_new_tokens=8, temperature=0) == want


def test_bfloat16_generation_matches_recompute():
    model = peaked_model().to(torch.bfloat16)
    prompts = [[1, 2, 3, 4], [5]]
    out = generate_ids(model, prompts, max_new_tokens=8, temperature=0)
    assert out == [greedy_recompute(model, p, 8) for p in prompts]


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_generate_and_interactive(tmp_path, byte_tokenizer, monkeypatch, capsys):
    from gptlab.checkpoint import save_model
    from gptlab.cli import main

    text = "hello world\n"
    model = scripted_model(script_text(2, text.encode(), eot=256))
    save_model(model, tmp_path / "ckpt", tokenizer=byte_tokenizer)

    def cli(*args: str) -> int:
        return main(["generate", str(tmp_path / "ckpt"), *args, "--temperature", "0", "--max-new-tokens", "20"])

    assert cli("ab") == 0 and text in capsys.readouterr().out
    assert cli("ab", "--stop", "wor", "--quantize", "int8", "--dtype", "bfloat16") == 0
    assert capsys.readouterr().out == "hello \n"
    assert cli("ab", "--dtype", "bfloat16") == 0 and text in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\nab\n"))
    assert cli("-i", "--stop", "\n") == 0
    assert capsys.readouterr().out.count("hello world") == 2
    assert cli("ab", "--beams", "2", "--n", "2") == 0
    assert capsys.readouterr().out.count("--- completion") == 2
    assert cli("ab", "--top-p", "0") == 2 and "top_p" in capsys.readouterr().err
    # one engine for the session: the second prompt starts with the first's blocks (16 bytes each)
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 20 + "\n"))
    assert cli("x" * 20, "-i", "--verbose") == 0
    err = capsys.readouterr().err.splitlines()
    assert "prefix cache: 0 of 20 prompt tokens reused" in err[0]
    assert "prefix cache: 16 of 40 prompt tokens reused (40%)" in err[1]


def test_a_shared_engine_reuses_prompts_across_calls(byte_tokenizer):
    model = peaked_model(vocab_size=257, n_ctx=64)
    engine = InferenceEngine(model, kv_cache_tokens=256)
    system = "You are a terse assistant. Q: "
    first = generate(model, byte_tokenizer, system + "hi", max_new_tokens=5, temperature=0, engine=engine)
    again = generate(model, byte_tokenizer, system + "yo", max_new_tokens=5, temperature=0, engine=engine)
    assert engine.pool.stats.hits == 16 and engine.pool.in_use == 0
    fresh = generate(model, byte_tokenizer, [system + "hi", system + "yo"], max_new_tokens=5, temperature=0)
    assert [first[0].text, again[0].text] == [c.text for c in fresh]
    with pytest.raises(ValueError, match="another model"):
        generate(peaked_model(seed=1, vocab_size=257), byte_tokenizer, "x", max_new_tokens=2, engine=engine)


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    model = peaked_model(attn_pattern="alternating", local_window=4)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert generate_ids(model, prompts, params, compile=True) == generate_ids(model, prompts, params)
