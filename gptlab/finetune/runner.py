"""`finetune(cfg)`: build the setup (base model, head or adapters, data, Task) and run the one loop.

OUT/ after a run:
  config.json + model.safetensors + tokenizer/   the fine-tuned model: `gptlab generate OUT` loads it
  head.safetensors                                classification: the head (labels in config.json)
  adapter_config.json + adapter.safetensors       LoRA without --merge: only the trained tensors
  adapter/                                        LoRA with --merge: the adapter, beside the merged model
  finetune.json                                   settings, parameter counts and final metrics
  train/                                          the loop's run directory: metrics.jsonl, loss.png,
                                                  checkpoints/ (resume), best.safetensors
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.finetune.lora import LoRAConfig

TASKS = ("classification", "sft", "dpo", "rl")
METRICS = {
    "classification": ("val_accuracy", "val_macro_f1", "val_loss"),
    "sft": ("val_loss",),
    "dpo": ("val_loss", "val_accuracy", "val_margin"),
    "rl": ("val_reward",),
}
DEFAULT_METRIC = {"classification": "val_accuracy", "sft": "val_loss", "dpo": "val_loss", "rl": "val_reward"}
FINETUNE_FILE = "finetune.json"
HEAD_FILE = "head.safetensors"
RUN_SUBDIR = "train"
ADAPTER_SUBDIR = "adapter"


@dataclass
class FinetuneConfig:
    """What `gptlab finetune` reads from its flags."""

    task: str
    """'classification' ({"text", "label"} lines), 'sft' ({"prompt", "completion"} lines), 'dpo'
    ({"prompt", "chosen", "rejected"} lines) or 'rl' (prompts from `prompts`, scored by `reward`)."""
    base: str
    """Base model: gptlab checkpoint / run directory or Hugging Face GPT-2 directory."""
    train_file: str | None = None
    """Training examples (all tasks but rl, which reads `prompts`)."""
    val_file: str | None = None
    out: str = "runs/finetune"
    tokenizer: str | None = None
    """Tokenizer directory; default: the base checkpoint's."""
    lora: LoRAConfig | None = None
    """None: full fine-tuning."""
    epochs: float | None = None
    """Passes over the training set; ignored when max_steps is given; default 3."""
    max_steps: int | None = None
    lr: float | None = None
    """Peak learning rate; default 5e-5 (full) or 5e-4 (LoRA)."""
    batch_size: int = 16
    warmup_steps: int | None = None
    """Default: 5% of the steps."""
    weight_decay: float = 0.0
    patience: int = 0
    """Stop after this many evaluations without improvement of `metric`; 0 never stops early."""
    metric: str | None = None
    """Validation metric for early stopping and the best checkpoint; default val_accuracy
    (classification) or val_loss (sft)."""
    eval_interval: int | None = None
    """Steps between evaluations; default once per epoch."""
    max_length: int | None = None
    """Classification: tokens kept per text (default the context n_ctx)."""
    keep_best: bool = True
    """With a validation set, the output holds the weights of the best evaluation, not the last."""
    merge: bool = False
    """LoRA: also merge the adapter into the base and write a full model to OUT."""
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    eval_tasks: list[str] = field(default_factory=list)
    """GPT-3 paper tasks scored every eval_interval steps (the loop's `train.eval_tasks`)."""
    eval_tasks_data: str | None = None
    """Directory of their distributed files (`gptlab eval suite --data`); None: the hub."""
    eval_tasks_items: int = 100
    eval_tasks_shots: int = 0
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted TrainConfig overrides, e.g. {'optim.beta2': '0.99', 'train.threads': '1'}."""
    beta: float = 0.1
    """DPO: strength of the pull towards the reference model (the paper's beta)."""
    dpo_loss: str = "sigmoid"
    """DPO: 'sigmoid' (the DPO paper) or 'ipo' (Azar et al. 2023)."""
    rl: Any = None
    """RL: an `RLConfig` (gptlab.finetune.rl); None takes its defaults."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown fine-tuning task {self.task!r}; choose one of {list(TASKS)}")
        if self.task == "rl":
            from gptlab.finetune.rl import RLConfig

            self.rl = self.rl or RLConfig()
            if self.train_file is not None:
                raise ValueError("--task rl reads its prompts from --prompts FILE.jsonl, not --train")
        elif self.train_file is None:
            raise ValueError(f"--task {self.task} needs a training file: pass --train FILE.jsonl")
        from gptlab.finetune.dpo import LOSS_TYPES

        if self.dpo_loss not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {self.dpo_loss!r}; choose one of {list(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patience and not self.val_file:
            raise ValueError("early stopping (patience) needs a validation file: pass --val FILE.jsonl")
        known = METRICS[self.task]
        if self.metric is not None and self.metric not in known:
            raise ValueError(f"unknown metric {self.metric!r} for {self.task}; choose one of {list(known)}")
        if self.merge and self.lora is None:
            raise ValueError("--merge applies to LoRA fine-tuning only: add --lora")


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    stop_reason: str
    trainable_params: int
    total_params: int
    metrics: dict[str, Any]
    """The final (or best, with keep_best) validation metrics; empty without a validation file."""
    seconds: float


def _build(cfg: FinetuneConfig) -> tuple[nn.Module, nn.Module, Any, Any, dict[str, Any]]:
    """(task model, trunk GPT, tokenizer, Task, metadata for the saved files)."""
    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.finetune import data as D
    from gptlab.finetune.heads import SequenceClassifier
    from gptlab.finetune.lora import apply_lora, model_fingerprint
    from gptlab.finetune.tasks import BEST_WEIGHTS, ClassificationTask, SFTTask

    trunk = load_model(cfg.base)  # float32 on CPU: the loop moves it
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.base)
    n_ctx = trunk.config.n_ctx
    if tokenizer.vocab_size > trunk.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the base model {cfg.base} only "
            f"{trunk.config.vocab_size}; pass the tokenizer the base was trained with (--tokenizer)"
        )
    meta: dict[str, Any] = {"base_path": _path_or_name(cfg.base), "task": cfg.task}
    if cfg.lora is not None:
        meta["base_fingerprint"] = model_fingerprint(trunk)
    common = dict(
        pad_id=tokenizer.eot_id,
        seed=cfg.seed,
        eval_batch_size=max(cfg.batch_size, 32),
        best_path=Path(cfg.out) / RUN_SUBDIR / BEST_WEIGHTS,
    )
    torch.manual_seed(cfg.seed)  # head and adapter initialisation
    if cfg.task == "classification":
        max_len = min(cfg.max_length or n_ctx, n_ctx)
        train = D.load_classification(cfg.train_file)
        labels = D.LabelSet.from_examples(train, str(cfg.train_file))
        val = D.load_classification(cfg.val_file) if cfg.val_file else None
        task = ClassificationTask(
            D.encode_classification(train, tokenizer, labels, max_len),
            D.encode_classification(val, tokenizer, labels, max_len) if val else None,
            num_labels=len(labels),
            **common,
        )
        if cfg.lora is not None:
            apply_lora(trunk, cfg.lora)  # before the head exists: the head stays trainable
        model: nn.Module = SequenceClassifier(trunk, len(labels))
        meta["labels"] = labels.to_json()
        meta["max_length"] = max_len
    elif cfg.task == "dpo":
        from gptlab.finetune.dpo import DPOTask, encode_preferences, load_preferences

        val_pairs = load_preferences(cfg.val_file) if cfg.val_file else None
        task = DPOTask(
            encode_preferences(load_preferences(cfg.train_file), tokenizer, n_ctx),
            encode_preferences(val_pairs, tokenizer, n_ctx) if val_pairs else None,
            beta=cfg.beta,
            loss_type=cfg.dpo_loss,
            **common,
        )
        task.set_reference(trunk)  # the base, before adapters exist or any update
        if cfg.lora is not None:
            apply_lora(trunk, cfg.lora)
        model = trunk
    elif cfg.task == "rl":
        from gptlab.finetune.rl import build_rl_task

        task = build_rl_task(cfg.rl, trunk, tokenizer, cfg.val_file, **common)
        if cfg.lora is not None:
            apply_lora(trunk, cfg.lora)
        model = trunk
    else:
        train_sft = D.load_sft(cfg.train_file)
        val_sft = D.load_sft(cfg.val_file) if cfg.val_file else None
        task = SFTTask(
            D.encode_sft(train_sft, tokenizer, n_ctx),
            D.encode_sft(val_sft, tokenizer, n_ctx) if val_sft else None,
            **common,
        )
        if cfg.lora is not None:
            apply_lora(trunk, cfg.lora)
        model = trunk
    return model, trunk, tokenizer, task, meta


def _path_or_name(base: str) -> str:
    p = Path(base)
    return str(p.resolve()) if p.exists() else base


def train_config(cfg: FinetuneConfig, n_train: int, trunk_config: Any) -> Any:
    """The loop's TrainConfig for this fine-tuning run."""
    from gptlab.config import apply_overrides
    from gptlab.train.config import DataSection, ModelSection, OptimSection, TrainConfig, TrainSection

    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    max_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 3.0) * steps_per_epoch))
    evaluates = cfg.val_file or cfg.eval_tasks
    eval_interval = (cfg.eval_interval or min(steps_per_epoch, max_steps)) if evaluates else 0
    lr = cfg.lr if cfg.lr is not None else (5e-4 if cfg.lora is not None else 5e-5)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max_steps // 20
    metric = cfg.metric or DEFAULT_METRIC[cfg.task]
    tc = TrainConfig(
        model=ModelSection.of(trunk_config),
        data=DataSection(dataset=str(cfg.train_file or cfg.rl.prompts), tokenizer=cfg.tokenizer, seed=cfg.seed),
        optim=OptimSection(lr=lr, warmup_steps=warmup, weight_decay=cfg.weight_decay, min_lr_ratio=0.0),
        train=TrainSection(
            run_dir=str(Path(cfg.out) / RUN_SUBDIR),
            batch_size=cfg.batch_size,
            max_steps=max_steps,
            dtype=cfg.dtype,
            device=cfg.device,
            seed=cfg.seed,
            eval_interval=eval_interval,
            log_interval=max(1, min(10, eval_interval or 10)),
            checkpoint_interval=eval_interval or steps_per_epoch,
            keep_checkpoints=1,
            patience=cfg.patience,
            early_stopping_metric=metric,
            progress=cfg.progress,
            eval_tasks=list(cfg.eval_tasks),
            eval_tasks_data=cfg.eval_tasks_data,
            eval_tasks_items=cfg.eval_tasks_items,
            eval_tasks_shots=cfg.eval_tasks_shots,
        ),
    )
    return apply_overrides(tc, cfg.train_overrides) if cfg.train_overrides else tc


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune `cfg.base` on `cfg.train_file` and write the result to `cfg.out` (see module doc)."""
    from gptlab.finetune.lora import trainable_parameters
    from gptlab.train.loop import train

    began = time.perf_counter()
    out = Path(cfg.out)
    run_dir = out / RUN_SUBDIR
    ckpts = run_dir / "checkpoints"
    if not cfg.resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ValueError(
            f"{out} already holds a fine-tuning run; pass --resume to continue it, or another --out"
        )
    model, trunk, tokenizer, task, meta = _build(cfg)
    best = run_dir / "best.safetensors"
    if not cfg.resume:
        best.unlink(missing_ok=True)  # from an earlier run in OUT: never restore another run's weights
    tc = train_config(cfg, len(task), trunk.config)
    trainable, total = trainable_parameters(model)
    if cfg.progress:
        kind = f"LoRA r={cfg.lora.rank}" if cfg.lora else "full"
        print(
            f"fine-tuning ({cfg.task}, {kind}): {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.2f}%); {len(task)} examples, {tc.train.max_steps} steps",
            flush=True,
        )
    result = train(tc, model, task, run_dir, tokenizer=tokenizer, resume=cfg.resume)
    model.to("cpu")
    metrics = _final_metrics(result.rows, run_dir, tc.train.early_stopping_metric)
    if cfg.keep_best and cfg.val_file and best.is_file():
        _load_trainable(model, best)
    _write_outputs(cfg, model, trunk, tokenizer, meta)
    info = {
        "config": _jsonable(asdict(cfg)),
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "trainable_params": trainable,
        "total_params": total,
        "metrics": metrics,
    }
    (out / FINETUNE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return FinetuneResult(
        out, result.step, result.stop_reason, trainable, total, metrics, time.perf_counter() - began
    )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _final_metrics(rows: list[dict[str, Any]], run_dir: Path, metric: str) -> dict[str, Any]:
    """Validation metrics of the best evaluation (by `metric`) over the whole run, resumes included."""
    from gptlab.train.metrics import METRICS_FILE, read_metrics

    file = run_dir / METRICS_FILE
    rows = read_metrics(file) if file.is_file() else rows
    evals = [r for r in rows if metric in r]
    if not evals:
        return {}
    lower = metric.endswith("loss")
    best = (min if lower else max)(evals, key=lambda r: r[metric])
    return {k: v for k, v in best.items() if k == "step" or k.startswith("val_")}


def _load_trainable(model: nn.Module, file: Path) -> None:
    from gptlab.checkpoint import read_safetensors

    state = read_safetensors(file)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{file} does not belong to this model: unknown tensors {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _write_outputs(
    cfg: FinetuneConfig, model: nn.Module, trunk: nn.Module, tokenizer: Any, meta: dict
) -> None:
    from gptlab.finetune.lora import merge_lora, save_adapter

    out = Path(cfg.out)
    if cfg.lora is not None:
        adapter_dir = out / ADAPTER_SUBDIR if cfg.merge else out
        save_adapter(model, adapter_dir, cfg.lora, trunk.config.to_dict(), meta["base_fingerprint"], meta)
        tokenizer.save(adapter_dir / "tokenizer")
        if not cfg.merge:
            return
        merge_lora(model)
    save_finetuned(model, out, tokenizer, meta)


def save_finetuned(model: nn.Module, out: Path, tokenizer: Any, meta: dict[str, Any]) -> None:
    """A normal gptlab checkpoint of the trunk in `out`, plus head.safetensors for a classifier."""
    from safetensors.torch import save

    from gptlab.checkpoint import atomic_write_bytes, write_model_files
    from gptlab.finetune.heads import SequenceClassifier

    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"finetune": {k: v for k, v in meta.items() if k not in ("labels", "max_length")}}
    if isinstance(model, SequenceClassifier):
        extra["classifier"] = {"labels": meta["labels"], "max_length": meta["max_length"], "head": HEAD_FILE}
        head = {k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()}
        atomic_write_bytes(out / HEAD_FILE, save(head, metadata={"format": "pt"}))
        model = model.trunk
    write_model_files(model, out, tokenizer, extra)


def merge_adapter(adapter_dir: str, out: str, base: str | None = None) -> Path:
    """`gptlab lora merge`: base + adapter -> a full checkpoint (a classifier when the adapter has a head)."""
    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.finetune.heads import SequenceClassifier
    from gptlab.finetune.lora import load_adapter, merge_lora, read_adapter_config

    meta = read_adapter_config(adapter_dir)
    base = base or meta.get("base_path")
    if not base:
        raise ValueError(f"adapter {adapter_dir} does not record its base model; pass --base CKPT")
    trunk = load_model(base)
    model: nn.Module = trunk
    if meta.get("task") == "classification":
        model = SequenceClassifier(trunk, len(meta["labels"]))
    load_adapter(model, adapter_dir, base=trunk)
    merge_lora(model)
    tok_dir = Path(adapter_dir) / "tokenizer"
    tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else base)
    keep = ("base_path", "task", "labels", "max_length", "lora")
    save_finetuned(model, Path(out), tokenizer, {k: meta[k] for k in keep if k in meta})
    return Path(out)
