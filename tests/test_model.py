import json
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, ModelConfig, preset
from gptlab.model import banded_causal_attention
from gptlab.presets import GPT3_NOMINAL_PARAMS, PRESETS

GPT2_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=4, n_head=2, n_embd=32, n_ctx=64, vocab_size=101)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("name,count", GPT2_COUNTS.items())
def test_gpt2_parameter_counts_exact(name, count):
    cfg = preset(name)
    assert (cfg.n_ctx, cfg.vocab_size, cfg.attn_pattern) == (1024, 50257, "dense")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == count
    assert cfg.n_params() == count


@pytest.mark.parametrize("name", GPT3_NOMINAL_PARAMS)
def test_gpt3_counts_within_two_percent_of_paper(name):
    cfg = preset(name)
    assert cfg.n_ctx == 2048 and cfg.attn_pattern == "alternating"
    assert cfg.local_layers == list(range(1, cfg.n_layer, 2))
    assert abs(cfg.n_params() / GPT3_NOMINAL_PARAMS[name] - 1) < 0.02


def test_gpt3_table_shapes():
    # Brown et al. 2020, Table 2.1 (13B uses 5120 = 40 x 128, the paper's 5140 is not divisible by 40).
    assert (preset("gpt3-175b").n_layer, preset("gpt3-175b").n_embd, preset("gpt3-175b").n_head) == (
        96,
        12288,
        96,
    )
    assert preset("gpt3-13b").n_embd == 5120 and preset("gpt3-13b").head_size == 128
    assert preset("gpt3-2.7b").head_size == 80


def test_every_preset_builds_on_meta_and_matches_formula():
    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = GPT(cfg)
        assert model.num_params() == cfg.n_params(), name
        assert model.num_params(embeddings=False) == cfg.n_params(embeddings=False), name


def test_tiny_presets_sizes():
    assert 0.5e6 < preset("nano").n_params() < 2e6
    assert 5e6 < preset("micro").n_params() < 20e6


def test_configs_cli_reports_175b_fast():
    t = time.perf_counter()
    from gptlab.presets import preset_rows

    rows = preset_rows()
    assert time.perf_counter() - t < 1.0
    big = next(r for r in rows if r["name"] == "gpt3-175b")
    assert abs(big["n_params"] / 175e9 - 1) < 0.02
    out = subprocess.run(
        [sys.executable, "-m", "gptlab", "configs", "--json"], capture_output=True, text=True, check=True
    ).stdout
    data = json.loads(out)
    assert {r["name"] for r in data} == set(PRESETS)
    assert all("n_params" in r for r in data)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_embd=100, n_head=3), "n_embd (100) must be divisible by n_head (3)"),
        (dict(attn_pattern="sparse"), "attn_pattern must be one of"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.5), "dropout must be in [0, 1)"),
    ],
)
def test_invalid_config_names_field_and_rule(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny(**kwargs)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2-medium"):
        preset("gpt4")


def test_gpt2_architecture_details():
    cfg = tiny()
    model = GPT(cfg)
    assert model.lm_head is None  # tied: the output projection is wte.weight
    ln = model.transformer.h[0].ln_1
    assert ln.eps == 1e-5 and ln.bias is not None
    assert model.transformer.h[0].attn.c_attn.bias is not None
    # GPT-2 init: residual projections use std 0.02 / sqrt(2 * n_layer).
    big = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, n_ctx=64, vocab_size=512))
    std_proj = big.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = big.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_forward_matches_manual_reference():
    """An independent, loop-free reimplementation of GPT-2's forward pass from the weights."""
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    logits, _ = model(x)
    sd = model.state_dict()
    h = sd["transformer.wte.weight"][x] + sd["transformer.wpe.weight"][: x.shape[1]]
    T, hs = x.shape[1], cfg.head_size
    causal = torch.ones(T, T).tril().bool()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        a = F.layer_norm(h, (cfg.n_embd,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        qkv = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(2, T, cfg.n_head, hs).transpose(1, 2) for t in qkv.split(cfg.n_embd, -1))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(2, T, cfg.n_embd)
        h = h + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        m = F.layer_norm(h, (cfg.n_embd,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        u = m @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))  # GELU, tanh approx.
        h = h + u @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    h = F.layer_norm(h, (cfg.n_embd,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    ref = h @ sd["transformer.wte.weight"].T
    assert (logits - ref).abs().max() < 1e-5


def test_loss_ignores_minus_one_and_equals_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 101, (2, 9))
    y = torch.randint(0, 101, (2, 9))
    y[0, :4] = -1
    logits, loss = model(x, y)
    keep = y != -1
    ref = F.cross_entropy(logits[keep], y[keep])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_banded_attention_equals_masked_dense():
    torch.manual_seed(0)
    for T, w in [(37, 8), (64, 16), (5, 8), (16, 16), (33, 1)]:
        q, k, v = torch.randn(3, 2, 3, T, 8).unbind(0)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < w))
        assert (banded_causal_attention(q, k, v, w) - ref).abs().max() < 1e-5, (T, w)


def test_local_layer_does_not_attend_beyond_its_band():
    torch.manual_seed(0)
    cfg = tiny(n_layer=2, attn_pattern="alternating", local_window=8)
    model = GPT(cfg).eval()
    layer = model.transformer.h[1]
    assert layer.attn.local and not model.transformer.h[0].attn.local
    h = torch.randn(1, 40, cfg.n_embd)
    out = layer(h)
    changed = h.clone()
    changed[0, 5] = torch.randn(
        cfg.n_embd
    )  # position 5 is outside the band of position 5 + 8 = 13 and beyond
    out2 = layer(changed)
    diff = (out2 - out).abs().amax(-1)[0]
    assert diff[5:13].min() > 1e-3  # inside the band the change is seen
    assert diff[13:].max() == 0.0  # outside it, exactly unchanged
    # The dense layer, by contrast, sees it everywhere later.
    dense = model.transformer.h[0]
    assert (dense(changed) - dense(h)).abs().amax(-1)[0, 13:].min() > 1e-6


def test_local_band_end_to_end_and_dense_pattern_differs():
    torch.manual_seed(0)
    cfg = tiny(n_layer=2, attn_pattern="alternating", local_window=4)
    x = torch.randint(0, 101, (1, 30))
    a = GPT(cfg).eval()
    b = GPT(tiny(n_layer=2)).eval()
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x)[0], b(x)[0])  # the band changes the function beyond the window
    assert torch.allclose(a(x[:, :4])[0], b(x[:, :4])[0], atol=1e-6)  # within the window it is dense


@pytest.mark.parametrize("pattern", ["dense", "alternating"])
def test_paged_kv_cache_equals_full_recompute(pattern):
    """Prefill 10 tokens, then 20 one at a time through the paged cache: the logits of every position
    equal the no-cache forward's."""
    from gptlab.infer.engine import InferenceEngine

    torch.manual_seed(0)
    cfg = tiny(attn_pattern=pattern, local_window=5)
    model = GPT(cfg).eval()
    x = torch.randint(0, 101, (2, 30))
    full, _ = model(x)
    engine = InferenceEngine(model, kv_cache_tokens=64, block_size=8)
    seqs = [engine.sequence(row[:10].tolist()) for row in x]
    pieces = [engine.forward(seqs, [10, 10]).view(2, 10, -1)]
    for t in range(10, 30):
        for seq, row in zip(seqs, x, strict=True):
            seq.tokens.append(int(row[t]))
        pieces.append(engine.forward(seqs).view(2, 1, -1))
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5
    assert [s.length for s in seqs] == [30, 30]


def test_clear_errors_for_bad_input():
    model = GPT(tiny()).eval()
    with pytest.raises(ValueError, match="token id 101 is out of range for a vocabulary of 101"):
        model(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match="token id -3 is out of range"):
        model(torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(torch.zeros(3, dtype=torch.long))


def test_flops_formula_counts_banded_layers_cheaper():
    dense = preset("gpt2", n_ctx=2048)
    sparse = preset("gpt2", n_ctx=2048, attn_pattern="alternating")
    assert sparse.flops_per_token() < dense.flops_per_token()
    # 6N rule: training FLOPs per token are 3x the forward.
    assert dense.flops_per_token(backward=True) == pytest.approx(3 * dense.flops_per_token())
