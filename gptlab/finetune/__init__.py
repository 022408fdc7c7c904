"""Fine-tuning on the one training loop: classification heads, prompt -> completion (SFT), LoRA.

data.py      JSONL readers (errors name file:line), label sets, padded batches
heads.py     SequenceClassifier: a linear head on the last non-padding token of the trunk
lora.py      LoRA adapters: apply, merge, save / load with a base-model fingerprint
tasks.py     ClassificationTask / SFTTask: the `Task`s gptlab.train.loop.train runs
runner.py    finetune(FinetuneConfig): build the setup, call the loop, write OUT/
classify.py  Classifier.from_pretrained(dir).predict(texts)
"""

from __future__ import annotations

__all__ = ["Classifier", "FinetuneConfig", "LoRAConfig", "finetune", "merge_adapter"]


def __getattr__(name: str):
    # Lazy: `import gptlab.finetune` loads nothing heavy.
    if name == "Classifier":
        from gptlab.finetune.classify import Classifier

        return Classifier
    if name in ("FinetuneConfig", "finetune", "merge_adapter"):
        from gptlab.finetune import runner

        return getattr(runner, name)
    if name == "LoRAConfig":
        from gptlab.finetune.lora import LoRAConfig

        return LoRAConfig
    raise AttributeError(f"module 'gptlab.finetune' has no attribute {name!r}")
