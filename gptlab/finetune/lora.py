"""LoRA: low-rank adapters on chosen Linear layers (Hu et al. 2021, arXiv:2106.09685).

A targeted `nn.Linear` becomes a `LoRALinear` that keeps the same `weight` and `bias` (so the base
state-dict names do not change) and adds `lora_A` (r, in) and `lora_B` (out, r):
    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T
B starts at zero, so training starts from the base model exactly. `merge_lora` folds B A into W.

An adapter is saved alone (adapter.safetensors + adapter_config.json) with the base model's config and
a fingerprint of its weights; `load_adapter` refuses a base that does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "gptlab-lora/1"


@dataclass
class LoRAConfig:
    """Which layers get adapters and how large they are."""

    rank: int = 8
    """Rank r of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (the paper's alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj"])
    """Linear layers to adapt, by name suffix: 'c_proj' matches attn.c_proj and mlp.c_proj,
    'attn.c_proj' only the attention's."""

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()]
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.modules:
            raise ValueError("LoRA needs at least one target module, e.g. c_attn,c_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # adopt base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (out, r): zero at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the paper's code
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (…, out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r) B A, sharing the bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
        linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets(model: nn.Module, modules: Sequence[str]) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    chosen = []
    for target in modules:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"LoRA target module {target!r} matches no Linear layer; available: {names}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and put adapters on the target layers; their names.

    Modules added afterwards (a classification head) stay trainable.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them first")
    names = _targets(model, config.modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.rank, config.alpha, config.dropout))
    return names


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model has no LoRA modules afterwards."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---- fingerprint ---------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """Short hash of a model's base weights (names, shapes, dtypes, values); adapters excluded."""
    h = hashlib.sha256(b"gptlab-weights/1\n")
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # buffer protocol: no copy
    return h.hexdigest()[:16]


# ---- save / load ---------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable tensor of `model` (adapters, and any head added after `apply_lora`)."""
    return {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    config: LoRAConfig,
    base_config: dict[str, Any],
    base_fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapter.safetensors (trainable tensors only) and adapter_config.json into `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT,
        "lora": asdict(config),
        "base_model": base_config,
        "base_fingerprint": base_fingerprint,
        **(extra or {}),
    }
    save_file(adapter_state_dict(model), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return out_dir


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(adapter_dir) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{file} is not a gptlab LoRA adapter config (format {ADAPTER_FORMAT!r} expected)")
    return meta


def check_base(meta: dict[str, Any], base: nn.Module, adapter_dir: str | os.PathLike[str]) -> None:
    """Raise ValueError naming the mismatch when `base` is not the model the adapter was trained on."""
    config = base.config.to_dict()  # type: ignore[union-attr]
    want = meta["base_model"]
    diffs = [
        f"{k}={want.get(k)!r} (base has {config.get(k)!r})"
        for k in sorted(set(want) | set(config))
        if k != "name" and want.get(k) != config.get(k)
    ]
    if diffs:
        raise ValueError(
            f"LoRA adapter {adapter_dir} was trained on a different model shape: {', '.join(diffs)}; "
            "pass the base checkpoint it was trained from"
        )
    got = model_fingerprint(base)
    if got != meta["base_fingerprint"]:
        raise ValueError(
            f"LoRA adapter {adapter_dir} was trained on base weights with fingerprint "
            f"{meta['base_fingerprint']}, but this base has {got}: same shape, different weights; "
            f"pass the base checkpoint it was trained from ({meta.get('base_path', 'unknown path')})"
        )


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike[str], base: nn.Module | None = None
) -> dict:
    """Check `base` (default: `model`) against the adapter, apply LoRA to it and load the tensors.

    `model` may wrap `base` (a classifier around its trunk): tensor names are relative to `model`.
    Returns the adapter's config dict.
    """
    from gptlab.checkpoint import read_safetensors

    meta = read_adapter_config(adapter_dir)
    base = model if base is None else base
    check_base(meta, base, adapter_dir)
    apply_lora(base, LoRAConfig(**meta["lora"]))
    state = read_safetensors(Path(adapter_dir) / ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if unknown or missing:
        raise ValueError(
            f"{Path(adapter_dir) / ADAPTER_WEIGHTS} does not fit the model: unknown tensors {unknown[:5]}, "
            f"missing {missing[:5]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return meta
