"""Configuration dataclasses, the sizing formulas (parameters, FLOPs, memory) and override parsing.

Every formula that training (MFU), reports and benchmarks need lives here once, as a method of
`ModelConfig`, so the numbers they print can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ATTN_PATTERNS = ("dense", "alternating")


@dataclass
class ModelConfig:
    """Shape of a GPT-2 / GPT-3 style decoder-only Transformer."""

    name: str = "custom"
    """Preset name, or 'custom'."""
    n_layer: int = 12
    """Number of Transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Model width (d_model)."""
    n_ctx: int = 1024
    """Context length (learned position embeddings)."""
    vocab_size: int = 50257
    """Vocabulary size; 50257 for GPT-2's BPE."""
    n_inner: int | None = None
    """MLP hidden width; None means 4 * n_embd as in GPT-2 / GPT-3."""
    attn_pattern: str = "dense"
    """'dense' (GPT-2) or 'alternating': dense and locally banded layers alternate (GPT-3)."""
    local_window: int = 256
    """Band width of the locally banded layers: a token sees itself and the window-1 tokens before it."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (0.1 in GPT-2's pretraining)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon, GPT-2's value."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection, as GPT-2 and GPT-3 do."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "local_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ModelConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"for example n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"ModelConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.attn_pattern not in ATTN_PATTERNS:
            raise ValueError(
                f"ModelConfig.attn_pattern must be one of {list(ATTN_PATTERNS)}, got {self.attn_pattern!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"ModelConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    # ---- derived shape -------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def is_local(self, layer: int) -> bool:
        """Whether block `layer` uses locally banded attention.

        GPT-3 (Brown et al. 2020, section 2.1) alternates dense and locally banded sparse layers as
        in the Sparse Transformer; we make the odd layers local so layer 0 always sees everything.
        """
        return self.attn_pattern == "alternating" and layer % 2 == 1

    @property
    def local_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_local(i)]

    def attention_span(self, layer: int, context: int | None = None) -> float:
        """Mean number of keys a query attends to in `layer` over a full sequence of `context` tokens."""
        t = self.n_ctx if context is None else context
        if self.is_local(layer) and self.local_window < t:
            w = self.local_window
            # The first w queries see 1..w keys, the rest see w: the mean over t positions.
            return (w * (w + 1) / 2 + (t - w) * w) / t
        return (t + 1) / 2

    # ---- parameters ----------------------------------------------------------------------------
    def n_params(self, embeddings: bool = True) -> int:
        """Exact number of parameters of `GPT(self)`.

        With embeddings=False, the 'non-embedding' count of Kaplan et al. (2020): token and position
        embeddings excluded (and an untied output head, which is an embedding too).
        """
        c, f = self.n_embd, self.d_ff
        attn = c * 3 * c + 3 * c + c * c + c
        mlp = c * f + f + f * c + c
        norms = 2 * (2 * c)
        blocks = self.n_layer * (attn + mlp + norms) + 2 * c  # + final LayerNorm
        if not embeddings:
            return blocks
        emb = self.vocab_size * c + self.n_ctx * c
        head = 0 if self.tie_embeddings else self.vocab_size * c
        return blocks + emb + head

    # ---- compute -------------------------------------------------------------------------------
    def flops_per_token(self, context: int | None = None, backward: bool = False) -> float:
        """Matmul FLOPs to process one token in a sequence of `context` tokens.

        Forward: 2 FLOPs per weight of every matmul (the non-embedding weights plus the output
        projection onto the vocabulary) plus the attention scores and weighted sum, 4 * d_model per
        attended key (Kaplan et al. 2020, Table 1, counting the causal mean span, and the band for
        local layers). With backward=True, forward + backward = 3x forward (the "6N" rule).
        """
        matmul_weights = self.n_params(embeddings=False) + self.vocab_size * self.n_embd
        attn = sum(4 * self.n_embd * self.attention_span(i, context) for i in range(self.n_layer))
        forward = 2 * matmul_weights + attn
        return 3 * forward if backward else forward

    def training_flops(self, tokens: float, context: int | None = None) -> float:
        """Training compute for `tokens` tokens: 6 N D plus the attention term."""
        return self.flops_per_token(context, backward=True) * tokens

    # ---- memory --------------------------------------------------------------------------------
    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV-cache bytes one token occupies across all layers (keys and values)."""
        return 2 * self.n_layer * self.n_embd * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


# ---- generic dataclass helpers used by every command's config ---------------------------------


def config_to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (often a string from the command line) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table of fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested) dict, coercing types; unknown keys are errors."""
    hints = _field_types(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown setting(s) {[prefix + u for u in unknown]}; valid: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass `cfg` with dotted-path overrides applied, e.g. {'model.n_layer': '6'}.

    Nested dataclasses are rebuilt so their validation (__post_init__) runs again.
    """
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in fields(cfg)}
    hints = _field_types(type(cfg))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ValueError(f"unknown setting {key!r}; valid top-level names: {sorted(names)}")
        if rest:
            if not dataclasses.is_dataclass(getattr(cfg, head)):
                raise ValueError(f"setting {head!r} has no sub-settings (got {key!r})")
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = _coerce(value, hints[head], head)
    for head, sub in nested.items():
        direct[head] = apply_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct)


def parse_dotted_args(args: list[str]) -> dict[str, str]:
    """Parse ['--model.n_layer', '6', '--train.lr=3e-4'] into {'model.n_layer': '6', 'train.lr': '3e-4'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; overrides look like --section.name VALUE")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            value = args[i]
        else:
            value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text ({e})") from None
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = _load_yaml(text) or {}
    except (ValueError, TypeError) as e:
        raise ValueError(f"could not parse config file {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got a {type(data).__name__}")
    return data


def _load_yaml(text: str) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ImportError("reading YAML configs needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # e.g. a !!python/object tag, which safe_load refuses
        raise ValueError(str(e)) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_layer': 6}} -> {'model.n_layer': 6}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = [
    "ModelConfig",
    "apply_overrides",
    "config_to_dict",
    "flatten",
    "from_dict",
    "load_config_file",
    "parse_dotted_args",
    "field",
]
