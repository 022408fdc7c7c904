"""Training: one loop (loop.py) that pretraining and every fine-tuning mode share.

What differs between modes is a `Task` (task.py): which batches, which loss, which parameters train.
  - pretraining: `pretrain(cfg)` (pretrain.py) = `LanguageModelingTask` on a prepared dataset + a GPT.
  - fine-tuning (classification, SFT, LoRA): write a Task, build the model (a head on `GPT.features`,
    adapters with the base frozen) and call `train(cfg, model, task, run_dir)`.
Around the loop: config.py (TrainConfig), schedule.py (warm-up + cosine, batch ramp), optim.py
(AdamW groups), distributed.py (torchrun, DDP / FSDP2, activation checkpointing), state.py (atomic
checkpoints with the resume state), metrics.py (metrics.jsonl, TensorBoard, loss.png, MFU), losses.py
(the vocabulary cross-entropy without materialised logits) and pipeline.py (`gptlab train` with no
arguments: tokenizer -> data -> nano model -> sample).
"""

from gptlab.train.config import TrainConfig, load_train_config
from gptlab.train.loop import NonFiniteLossError, TrainResult, train
from gptlab.train.task import LanguageModelingTask, Task

__all__ = [
    "LanguageModelingTask",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "load_train_config",
    "pretrain",
    "train",
]


def __getattr__(name: str):
    if name == "pretrain":
        from gptlab.train.pretrain import pretrain

        return pretrain
    raise AttributeError(f"module 'gptlab.train' has no attribute {name!r}")
