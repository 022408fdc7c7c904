"""Training throughput: gptlab's settings side by side with Hugging Face transformers and nanoGPT.

    python benchmarks/train_throughput.py                      # GPT-2-style 6 x 384, context 256, batch 8
    python benchmarks/train_throughput.py --settings fp32,bf16 --no-peers --steps 3
    python benchmarks/train_throughput.py --profile fp32       # where one step's time goes

Every model trains on the same batches in the same process: one step = forward, backward, clip, AdamW
step. Reported: median tokens/s over the timed steps after warm-up, and MFU against the measured peak
matmul FLOP/s of the device (printed for fp32 and bf16), using `ModelConfig.flops_per_token`.

Peers:
  transformers  GPT2LMHeadModel (sdpa attention) with the same shape, torch AdamW, bf16 autocast
  nanoGPT       nanoGPT's own model.py when `--nanogpt-dir DIR` points at a checkout of it (loaded from
                there, never vendored), with its configure_optimizers (fused AdamW only on CUDA);
                without one, a re-implementation of its architecture written from its description
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptlab.config import ModelConfig  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.train.config import OptimSection  # noqa: E402
from gptlab.train.metrics import measured_matmul_flops  # noqa: E402
from gptlab.train.optim import build_optimizer  # noqa: E402


# ---- nanoGPT-style peer ---------------------------------------------------------------------------
class NanoAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = c.n_head, c.n_embd
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = NanoAttention(c)
        self.c_fc, self.gelu, self.c_proj = (
            nn.Linear(c.n_embd, 4 * c.n_embd),
            nn.GELU(),
            nn.Linear(4 * c.n_embd, c.n_embd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's architecture: learned positions, pre-LN blocks, exact GELU, a tied lm_head module."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.n_ctx, c.n_embd)
        self.h = nn.ModuleList(NanoBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, device_type: str) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"  # nanoGPT: fused AdamW only where it was available, on CUDA
        return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused or None)


# ---- runners --------------------------------------------------------------------------------------
def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def make_gptlab(c: ModelConfig, compile_model: bool, fused_loss: bool = True):
    """gptlab as `gptlab train` runs it: fused AdamW and (by default) the blockwise fused loss."""
    from gptlab.train.losses import apply_fused_cross_entropy

    torch.manual_seed(0)
    model = GPT(c)
    if fused_loss:
        apply_fused_cross_entropy(model)
    opt = build_optimizer(model, model.named_parameters(), OptimSection(), torch.device("cpu"))
    if compile_model:
        model.compile()
    return model, opt, lambda x, y: model(x, y)[1]


def make_gptlab_plain_loss(c: ModelConfig, compile_model: bool):
    return make_gptlab(c, compile_model, fused_loss=False)


def _real_nanogpt(c: ModelConfig, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"--nanogpt-dir {path}: no model.py there; point it at a nanoGPT checkout")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = mod.GPTConfig(
        block_size=c.n_ctx,
        vocab_size=c.vocab_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        dropout=0.0,
        bias=True,
    )
    model = mod.GPT(conf)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    return model, opt, lambda x, y: model(x, y)[1]


def make_nanogpt(c: ModelConfig, compile_model: bool, nanogpt_dir: Path | None = None):
    torch.manual_seed(0)
    if nanogpt_dir is not None:
        model, opt, loss_fn = _real_nanogpt(c, nanogpt_dir)
    else:
        model = NanoGPT(c)
        opt = model.configure_optimizers("cpu")
        loss_fn = lambda x, y: model(x, y)
    if compile_model:
        model.compile()
    return model, opt, loss_fn


def make_transformers(c: ModelConfig, compile_model: bool):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError("the transformers peer needs transformers: pip install 'gptlab[hf]'") from None
    torch.manual_seed(0)
    hf = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.n_ctx,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(hf, attn_implementation="sdpa") if _accepts_attn(GPT2LMHeadModel) else GPT2LMHeadModel(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if compile_model:
        model.compile()
    # labels are shifted inside the model: pass the input window and let it predict its next tokens
    return model, opt, lambda x, y: model(input_ids=x, labels=x).loss


def _accepts_attn(cls) -> bool:
    import inspect

    return "attn_implementation" in inspect.signature(cls.__init__).parameters


def time_steps(step_fn, batches, warmup: int) -> list[float]:
    times = []
    for i, (x, y) in enumerate(batches):
        began = time.perf_counter()
        step_fn(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


def _summary(times: list[float], tokens: int, flops: float, peak: float) -> tuple[float, float, float]:
    sec = statistics.median(times)
    return tokens / sec, tokens * flops / sec / peak, sec


def trainer(make, c: ModelConfig, dtype: torch.dtype, compile_model: bool):
    model, opt, loss_fn = make(c, compile_model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        with _autocast(dtype):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


SETTINGS = {
    # name: (implementation, dtype, compile)
    "fp32": ("gptlab", torch.float32, False),
    "fp32-plain-loss": ("gptlab-plain-loss", torch.float32, False),
    "bf16": ("gptlab", torch.bfloat16, False),
    "fp32+compile": ("gptlab", torch.float32, True),
    "bf16+compile": ("gptlab", torch.bfloat16, True),
}
PEERS = {
    "transformers-fp32": ("transformers", torch.float32, False),
    "transformers-bf16": ("transformers", torch.bfloat16, False),
    "nanogpt-fp32": ("nanogpt", torch.float32, False),
    "nanogpt-bf16": ("nanogpt", torch.bfloat16, False),
}
MAKERS = {
    "gptlab": make_gptlab,
    "gptlab-plain-loss": make_gptlab_plain_loss,
    "transformers": make_transformers,
    "nanogpt": make_nanogpt,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile needs >= 2)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"gptlab settings: {','.join(SETTINGS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"peers: {','.join(PEERS)}")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--nanogpt-dir", type=Path, help="a nanoGPT checkout: benchmark its own model.py")
    p.add_argument("--profile", metavar="SETTING", help="profile one step of this setting and exit")
    p.add_argument("--sequential", action="store_true", help="time each setting on its own, not round-robin")
    args = p.parse_args(argv)
    if args.nanogpt_dir is not None:
        MAKERS["nanogpt"] = functools.partial(make_nanogpt, nanogpt_dir=args.nanogpt_dir)
    if args.threads:
        torch.set_num_threads(args.threads)

    c = ModelConfig(
        name="bench",
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        n_ctx=args.context,
        vocab_size=args.vocab,
    )
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        data = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=gen)
        batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    tokens = args.batch * args.context
    flops = c.flops_per_token(args.context, backward=True)
    peak = {
        torch.float32: measured_matmul_flops(torch.float32),
        torch.bfloat16: measured_matmul_flops(torch.bfloat16),
    }
    print(
        f"# {c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {args.context}, batch {args.batch}, "
        f"vocab {c.vocab_size}: {GPT(c).num_params() / 1e6:.1f}M parameters, "
        f"{flops * tokens / 1e9:.0f} GFLOP per step"
    )
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; measured peak matmul: "
        f"fp32 {peak[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s"
    )

    table = {**SETTINGS, **PEERS}
    if args.profile:
        impl, dtype, comp = table[args.profile]
        _, step = trainer(MAKERS[impl], c, dtype, comp)
        for x, y in batches[: args.warmup]:
            step(x, y)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(*batches[-1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return 0

    names = [s for s in args.settings.split(",") if s]
    if not args.no_peers:
        names += [s for s in args.peers.split(",") if s]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(table)}")
    results = {}
    if args.sequential:
        for name in names:
            impl, dtype, comp = table[name]
            model, step = trainer(MAKERS[impl], c, dtype, comp)
            times = time_steps(step, batches, args.warmup)
            del model, step
            results[name] = _summary(times, tokens, flops, peak[dtype])
            print(f"#   {name}: {results[name][0]:,.0f} tokens/s", flush=True)
    else:
        # Round-robin: step i of every setting runs back to back, so a machine whose load drifts
        # (shared CI runners, other jobs) slows every setting alike instead of whichever ran then.
        steppers = {n: trainer(MAKERS[table[n][0]], c, table[n][1], table[n][2])[1] for n in names}
        times = {name: [] for name in names}
        for i, (x, y) in enumerate(batches):
            for name, step in steppers.items():
                began = time.perf_counter()
                step(x, y)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - began)
            print(f"#   step {i + 1}/{len(batches)} done", flush=True)
        for name in names:
            results[name] = _summary(times[name], tokens, flops, peak[table[name][1]])

    peers = [k for k in PEERS if k in results]
    print()
    print("| setting | dtype | compile | tokens/s | MFU | ms/step | " + " | ".join(f"vs {k}" for k in peers) + " |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(peers))
    for name, (tps, mfu, sec) in results.items():
        impl, dtype, comp = table[name]
        rel = " | ".join(f"{tps / results[k][0]:.2f}x" for k in peers)
        dt = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
        compiled = "yes" if comp else "no"
        print(f"| {name} | {dt} | {compiled} | {tps:,.0f} | {100 * mfu:.1f}% | {sec * 1000:.0f} | {rel} |")
    print("\nMFU is against the measured peak matmul FLOP/s of the setting's dtype.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
