"""Prediction with a fine-tuned classifier: `Classifier.from_pretrained(dir).predict(texts)`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptlab.finetune.data import LabelSet, encode_text, load_classification, pad_right
from gptlab.finetune.heads import SequenceClassifier
from gptlab.finetune.metrics import classification_metrics


class Classifier:
    """A `SequenceClassifier` with its tokenizer and label set."""

    def __init__(
        self, model: SequenceClassifier, tokenizer: Any, labels: LabelSet, max_length: int | None = None
    ):
        if model.num_labels != len(labels):
            raise ValueError(f"the head has {model.num_labels} outputs but there are {len(labels)} labels")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = min(max_length or model.config.n_ctx, model.config.n_ctx)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, device: str = "cpu"
    ) -> Classifier:
        """Load the output of `gptlab finetune --task classification`: a full checkpoint (config.json with
        a 'classifier' entry + head.safetensors) or a LoRA adapter directory (its base from `base`, else
        the path recorded at training time)."""
        from gptlab.checkpoint import (
            load_model,
            load_tokenizer,
            read_config,
            read_safetensors,
            resolve_checkpoint,
        )
        from gptlab.finetune.lora import is_adapter_dir, load_adapter, read_adapter_config

        path = Path(path)
        if is_adapter_dir(path):
            meta = read_adapter_config(path)
            if meta.get("task") != "classification":
                raise ValueError(
                    f"LoRA adapter {path} was trained for {meta.get('task')!r}, not classification"
                )
            base_path = base or meta.get("base_path")
            if not base_path:
                raise ValueError(f"adapter {path} does not record its base model; pass base=")
            trunk = load_model(base_path)
            model = SequenceClassifier(trunk, len(meta["labels"]))
            load_adapter(model, path, base=trunk)
            labels, max_length = LabelSet(meta["labels"]), meta.get("max_length")
            tokenizer = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else base_path)
        else:
            directory = resolve_checkpoint(path)
            info = read_config(directory).get("classifier")
            if not isinstance(info, dict) or "labels" not in info:
                raise ValueError(
                    f"{directory} is not a classifier: its config.json has no 'classifier' entry; "
                    "train one with `gptlab finetune --task classification`"
                )
            trunk = load_model(directory)
            labels, max_length = LabelSet(info["labels"]), info.get("max_length")
            model = SequenceClassifier(trunk, len(labels))
            state = read_safetensors(directory / info.get("head", "head.safetensors"))
            try:
                model.head.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(
                    f"{directory / 'head.safetensors'} does not fit {len(labels)} labels ({e})"
                ) from None
            tokenizer = load_tokenizer(directory)
        return cls(model.to(device), tokenizer, labels, max_length)

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, num_labels) class probabilities."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no texts to classify")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise ValueError(f"text {i} must be a non-empty string, got {t!r}")
        device = self.model.head.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            ids = [encode_text(self.tokenizer, t, self.max_length) for t in texts[start : start + batch_size]]
            idx = pad_right(ids, self.tokenizer.eot_id).to(device)
            lengths = torch.tensor([len(x) for x in ids], device=device)
            out.append(self.model(idx, lengths).float().softmax(-1).cpu())
        return torch.cat(out)

    def predict(self, texts: str | Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """One {'label': most likely label, 'probs': {label: probability}} per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        probs = self.probabilities(texts, batch_size)
        result = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            result.append(
                {
                    "label": self.labels.labels[best],
                    "probs": {label: p for label, p in zip(self.labels, row, strict=True)},
                }
            )
        return result

    def evaluate(self, path: str | os.PathLike[str], batch_size: int = 32) -> dict[str, float]:
        """Accuracy and macro-F1 on a labelled JSONL file; a label the model does not know is an error."""
        examples = load_classification(path)
        truth = [self.labels.index(e.label, e.where) for e in examples]
        probs = self.probabilities([e.text for e in examples], batch_size)
        metrics: dict[str, float] = classification_metrics(probs.argmax(-1).tolist(), truth, len(self.labels))
        return {**metrics, "n": len(examples)}
