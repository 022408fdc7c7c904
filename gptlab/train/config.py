"""`TrainConfig`: what `gptlab train` reads from a TOML / YAML file plus `--section.field VALUE` overrides.

The resolved config (the model section with every field filled in from its preset) is written to the
run directory as config.json, so `gptlab train --config RUN_DIR/config.json` reproduces a run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig, apply_overrides, flatten, from_dict, load_config_file

DTYPES = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_FORMATS = ("single", "dcp")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class ModelSection:
    """A preset plus field overrides; None means 'the preset's value'."""

    preset: str | None = "nano"
    """Preset name (see `gptlab configs`), or None to give every field."""
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_ctx: int | None = None
    vocab_size: int | None = None
    """None: the vocabulary size of the dataset's tokenizer (a larger value pads the embedding)."""
    n_inner: int | None = None
    attn_pattern: str | None = None
    local_window: int | None = None
    dropout: float | None = None
    layer_norm_eps: float | None = None
    tie_embeddings: bool | None = None

    def resolve(self) -> ModelConfig:
        given = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}
        if self.preset is None:
            return ModelConfig(**given)
        from gptlab.presets import preset

        return preset(self.preset, **given)

    @classmethod
    def of(cls, config: ModelConfig) -> ModelSection:
        """Every field filled in: a config that no longer depends on the preset table."""
        d = config.to_dict()
        name = d.pop("name")
        return cls(preset=name if _is_preset(name) else None, **d)


def _is_preset(name: str) -> bool:
    from gptlab.presets import PRESETS

    return name in PRESETS


@dataclass
class DataSection:
    dataset: str = "data/stdlib/dataset"
    """Directory written by `gptlab prepare` (manifest.json + token shards)."""
    tokenizer: str | None = None
    """Tokenizer directory, copied into the run and every checkpoint (for `gptlab generate RUN_DIR`)."""
    seq_len: int | None = None
    """Training sequence length; None: the model's context n_ctx."""
    seed: int = 0
    """Seed of the epoch shuffles."""


@dataclass
class OptimSection:
    """AdamW with GPT-3's settings (Brown et al. 2020, appendix B)."""

    lr: float = 6e-4
    """Peak learning rate (GPT-3 Small: 6e-4)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (GPT-3: 10%)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to the peak over this many steps."""
    decay_steps: int | None = None
    """Steps from the start to the end of the cosine decay; None: train.max_steps."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only: not biases, LayerNorm gains or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    fused: bool | None = None
    """Fused AdamW kernel; None: on where supported (CPU and CUDA, unsharded or FSDP)."""
    name: str = "adamw"
    """'adamw', or 'muon': torch.optim.Muon for the blocks' 2-D weight matrices and AdamW (at `lr`)
    for embeddings, head, norms and biases, as modded-nanogpt and nanochat split them."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (nanochat's matrix LR); follows the same warm-up and decay."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum (Jordan et al. 2024; torch's default)."""


@dataclass
class TrainSection:
    run_dir: str | None = None
    """Output directory; None: runs/<preset>-<timestamp>."""
    batch_size: int = 32
    """Global batch in sequences (summed over ranks and accumulation steps)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on one rank; the rest is gradient accumulation. None: no accumulation."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    time_limit: float | None = None
    """Stop (with a checkpoint) after this many minutes of training."""
    batch_ramp_tokens: int = 0
    """Ramp the batch size linearly over this many tokens (GPT-3: 4-12B); 0 disables."""
    batch_ramp_start: int = 1
    """Batch size in sequences at the start of the ramp."""
    dtype: str = "auto"
    """'float32', 'bfloat16' (autocast; weights and optimizer stay fp32) or 'auto': bf16 where the device
    computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    compile: bool = False
    """torch.compile the model."""
    fused_loss: bool = True
    """Language-model loss computed a block of tokens at a time from the hidden states, never holding
    the (tokens, vocab) logits (gptlab.train.losses); false: the model's own F.cross_entropy."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
    strategy: str = "ddp"
    """Under torchrun: 'ddp' (replicate) or 'fsdp' (shard parameters, gradients, optimizer: FSDP2)."""
    tensor_parallel: int = 1
    """Ranks that split each block (Megatron-style tensor parallelism: c_attn / c_fc column-wise, c_proj
    row-wise); the rest of the world size is data parallel, with FSDP2 (train.strategy is then ignored)."""
    sequence_parallel: bool = False
    """With tensor_parallel > 1: also split layer norms, dropout and the residual stream along the
    sequence (less activation memory; the sequence length must divide by tensor_parallel)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda'; each rank takes cuda:LOCAL_RANK."""
    seed: int = 1337
    """Seeds initialisation and dropout (data-parallel replica r uses seed + r for dropout; the ranks of
    one tensor-parallel group draw the same masks)."""
    eval_interval: int = 100
    """Validation every this many steps (and at the end); 0 disables."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    eval_tasks: list[str] = field(default_factory=list)
    """GPT-3 paper tasks (`gptlab eval suite` names, e.g. hellaswag,lambada_openai) scored every
    eval_interval steps on a fixed subset; logged as eval/<task> (the paper's metric)."""
    eval_tasks_data: str | None = None
    """Directory of the tasks' distributed files (as `gptlab eval suite --data`); None: the hub."""
    eval_tasks_items: int = 100
    """Items of each task in the fixed subset (the first N of its scored split)."""
    eval_tasks_shots: int = 0
    """Examples in each prompt."""
    log_interval: int = 10
    """Write a metrics row every this many steps."""
    checkpoint_interval: int = 500
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints; 0 keeps all."""
    checkpoint_format: str = "single"
    """'single': full state gathered on rank 0 into model.safetensors + train state (loads anywhere);
    'dcp': torch.distributed.checkpoint shards, each rank writing its own (for models too large to
    gather; resumes on any number of processes; `gptlab convert --from-dcp` makes a single file)."""
    async_checkpoint: bool = False
    """With checkpoint_format 'dcp': write in the background while training goes on."""
    patience: int = 0
    """Stop early once `early_stopping_metric` has not improved for this many evaluations; 0 disables."""
    early_stopping_metric: str = "val_loss"
    """Validation metric for `patience` and a task's `on_best`: 'val_loss' or one the task's `validate`
    reports (e.g. 'val_accuracy'); lower is better for names ending in 'loss', higher otherwise."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None: a table for known GPUs, a measured matmul peak on CPU."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides RUN_DIR/metrics.jsonl: any of 'tensorboard' (RUN_DIR/tensorboard),
    'wandb' (Weights & Biases; WANDB_MODE=offline keeps the run on disk), 'mlflow'; each an extra of the
    same name. On the command line: --train.loggers tensorboard,wandb."""
    tensorboard: bool | None = None
    """The older switch, kept for existing configs: true adds 'tensorboard' to `loggers`, false removes it."""
    project: str = "gptlab"
    """W&B project and MLflow experiment the run is logged under."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or store (e.g. sqlite:///mlflow.db); None: MLFLOW_TRACKING_URI, else MLflow's default."""
    progress: bool = True
    """Show a tqdm progress bar."""
    threads: int | None = None
    """CPU threads per process (torch.set_num_threads); None: torch's default."""

    def __post_init__(self) -> None:
        from gptlab.train.loggers import check_logger_names

        check_logger_names(self.loggers)
        keep_tensorboard = self.tensorboard is not False
        loggers = [name for name in dict.fromkeys(self.loggers) if name != "tensorboard" or keep_tensorboard]
        if self.tensorboard and "tensorboard" not in loggers:
            loggers.insert(0, "tensorboard")
        self.loggers, self.tensorboard = loggers, None  # one source of truth from here on


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        t, o = self.train, self.optim
        if t.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {list(DTYPES)}, got {t.dtype!r}")
        if t.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}, got {t.strategy!r}")
        if t.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"train.checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}, got {t.checkpoint_format!r}"
            )
        if t.tensor_parallel < 1:
            raise ValueError(f"train.tensor_parallel must be >= 1, got {t.tensor_parallel}")
        if t.sequence_parallel and t.tensor_parallel == 1:
            raise ValueError(
                "train.sequence_parallel splits the sequence over tensor-parallel ranks; set train.tensor_parallel > 1"
            )
        if t.async_checkpoint and t.checkpoint_format != "dcp":
            raise ValueError("train.async_checkpoint needs train.checkpoint_format = 'dcp'")
        positive = ("batch_size", "max_steps", "eval_batches", "log_interval", "batch_ramp_start", "eval_tasks_items")
        for name in positive:
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        counts = ("eval_interval", "checkpoint_interval", "keep_checkpoints", "batch_ramp_tokens", "eval_tasks_shots")
        for name in counts:
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size must be >= 1 or None, got {t.micro_batch_size}")
        if t.patience < 0:
            raise ValueError(f"train.patience must be >= 0, got {t.patience}")
        if t.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
        if o.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {list(OPTIMIZERS)}, got {o.name!r}")
        if o.muon_lr <= 0 or not 0 <= o.muon_momentum < 1:
            raise ValueError(
                f"need optim.muon_lr > 0 and 0 <= optim.muon_momentum < 1; got {o.muon_lr}, {o.muon_momentum}"
            )
        if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or o.warmup_steps < 0:
            raise ValueError(
                f"need optim.lr > 0, 0 <= optim.min_lr_ratio <= 1, optim.warmup_steps >= 0; got "
                f"{o.lr}, {o.min_lr_ratio}, {o.warmup_steps}"
            )
        if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.grad_clip < 0 or o.weight_decay < 0:
            raise ValueError(
                f"need 0 <= optim.beta1, beta2 < 1 and optim.grad_clip, weight_decay >= 0; got "
                f"{o.beta1}, {o.beta2}, {o.grad_clip}, {o.weight_decay}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = {k: v for k, v in d.items() if k != "format"}
        return from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        from gptlab.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps({"format": "gptlab-train", **self.to_dict()}, indent=2) + "\n")


def load_train_config(
    file: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> TrainConfig:
    """Defaults, then the file (TOML / YAML / JSON, nested tables or dotted keys), then overrides."""
    from gptlab.config import parse_dotted_args

    cfg = TrainConfig()
    if file is not None:
        data = load_config_file(file)
        data.pop("format", None)  # written into config.json by `TrainConfig.save`
        cfg = apply_overrides(cfg, flatten(data))
    if isinstance(overrides, list):
        overrides = parse_dotted_args(overrides)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
