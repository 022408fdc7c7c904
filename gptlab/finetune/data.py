"""Fine-tuning data: JSONL readers with line-numbered errors, label sets, and padded batches.

Two formats, one JSON object per line:
- classification: {"text": str, "label": str | int}; the label set is that of the training file.
- prompt -> completion (SFT): {"prompt": str, "completion": str}; the loss covers only the completion
  and the <|endoftext|> appended after it, so the model learns where to stop.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

Label = str | int

IGNORE_INDEX = -1  # GPT.forward ignores targets equal to -1


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    @property
    def eot_id(self) -> int: ...


# ---- reading -------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str], fields: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; every record must hold `fields`.

    Errors name the file and the 1-based line: `data.jsonl:7: no field 'label' ...`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: expected a JSON object with fields {list(fields)}, "
                    f"got a JSON {type(record).__name__}"
                )
            missing = [k for k in fields if k not in record]
            if missing:
                raise ValueError(
                    f"{where}: missing field(s) {missing}; the record has {sorted(record)[:10]}, "
                    f"each line needs {list(fields)}"
                )
            records.append((number, record))
    if not records:
        raise ValueError(f"data file {path} is empty: it needs one JSON object per line with {list(fields)}")
    return records


def _string_field(record: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
    if not allow_empty and not value:
        raise ValueError(f"{where}: field {name!r} is empty")
    return value


def _label_field(record: dict[str, Any], where: str) -> Label:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(
            f"{where}: 'label' must be a string or an integer, got {type(label).__name__} {label!r}"
        )
    return label


@dataclass
class ClassificationExample:
    text: str
    label: Label
    where: str
    """file:line the example came from, for error messages."""


@dataclass
class SFTExample:
    prompt: str
    completion: str
    where: str


def load_classification(path: str | os.PathLike[str]) -> list[ClassificationExample]:
    """Read {"text", "label"} records; labels must be all strings or all integers."""
    out = []
    for number, record in read_jsonl(path, ("text", "label")):
        where = f"{path}:{number}"
        out.append(
            ClassificationExample(_string_field(record, "text", where), _label_field(record, where), where)
        )
    kinds = {type(e.label) for e in out}
    if len(kinds) > 1:
        first = {k: next(e for e in out if type(e.label) is k) for k in kinds}
        raise ValueError(
            f"{path} mixes string and integer labels (e.g. {first[str].label!r} at {first[str].where}, "
            f"{first[int].label!r} at {first[int].where}); use one kind"
        )
    return out


def load_sft(path: str | os.PathLike[str]) -> list[SFTExample]:
    """Read {"prompt", "completion"} records (the prompt may be empty, the completion not)."""
    out = []
    for number, record in read_jsonl(path, ("prompt", "completion")):
        where = f"{path}:{number}"
        prompt = _string_field(record, "prompt", where, allow_empty=True)
        out.append(SFTExample(prompt, _string_field(record, "completion", where), where))
    return out


# ---- labels --------------------------------------------------------------------------------------
class LabelSet:
    """The classes of a classifier, in a fixed order (sorted), all strings or all integers.

    Labels match by exact JSON value: a model trained on integer labels rejects the string "1" (and
    vice versa) with an error that says how to write it, rather than guessing.
    """

    def __init__(self, labels: Sequence[Label]) -> None:
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError(f"classification needs at least 2 distinct labels, got {labels}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {labels}")
        if (
            any(isinstance(x, bool) or not isinstance(x, (str, int)) for x in labels)
            or len({type(x) for x in labels}) > 1
        ):
            raise ValueError(f"labels must be all strings or all integers, got {labels}")
        self.labels: list[Label] = labels
        self._index = {label: i for i, label in enumerate(labels)}

    @classmethod
    def from_examples(cls, examples: Sequence[ClassificationExample], source: str = "") -> LabelSet:
        labels = sorted({e.label for e in examples})  # type: ignore[type-var]
        if len(labels) < 2:
            raise ValueError(
                f"{source or 'the training data'} has only the label {labels}; a classifier needs 2 or more"
            )
        return cls(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self.labels == other.labels

    @property
    def kind(self) -> str:
        return "integer" if isinstance(self.labels[0], int) else "string"

    def index(self, label: Label, where: str = "") -> int:
        if isinstance(label, bool) or label not in self._index or type(label) is not type(self.labels[0]):
            prefix = f"{where}: " if where else ""
            hint = ""
            if isinstance(label, str) and self.kind == "integer" and label.strip().lstrip("-").isdigit():
                hint = f"; this model's labels are integers: write {int(label)} without quotes"
            elif isinstance(label, int) and self.kind == "string" and str(label) in self._index:
                hint = f'; this model\'s labels are strings: write "{label}" in quotes'
            raise ValueError(
                f"{prefix}unknown label {label!r}: the model knows the {self.kind} labels {self.labels}{hint}"
            )
        return self._index[label]

    def to_json(self) -> list[Label]:
        return list(self.labels)


# ---- encoding ------------------------------------------------------------------------------------
def encode_text(tokenizer: TokenizerLike, text: str, max_len: int) -> list[int]:
    """Token ids of `text`, the first `max_len` kept (the head reads the last kept token)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    return ids[:max_len]


def encode_classification(
    examples: Sequence[ClassificationExample], tokenizer: TokenizerLike, labels: LabelSet, max_len: int
) -> list[tuple[list[int], int]]:
    return [(encode_text(tokenizer, e.text, max_len), labels.index(e.label, e.where)) for e in examples]


def encode_sft(
    examples: Sequence[SFTExample], tokenizer: TokenizerLike, n_ctx: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, targets) per example: prompt + completion + <|endoftext|>, shifted by one.

    Prompt and completion are encoded separately, as generation sees them: the prompt alone, then the
    completion's tokens. Targets are -1 on prompt positions. Sequences longer than n_ctx + 1 tokens lose
    their tail (with a warning); an example whose prompt fills the context is an error.
    """
    out = []
    truncated = []
    for e in examples:
        prompt = tokenizer.encode(e.prompt) if e.prompt else [tokenizer.eot_id]
        completion = tokenizer.encode(e.completion) + [tokenizer.eot_id]
        if len(prompt) >= n_ctx:
            raise ValueError(
                f"{e.where}: the prompt is {len(prompt)} tokens, leaving no room for the completion in a "
                f"context of {n_ctx}; shorten the prompt"
            )
        seq = (prompt + completion)[: n_ctx + 1]
        if len(prompt) + len(completion) > n_ctx + 1:
            truncated.append(e.where)
        x = seq[:-1]
        y = [IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt) :]
        out.append((x, y))
    if truncated:
        warnings.warn(
            f"{len(truncated)} example(s) exceed the context of {n_ctx} tokens and lose the end of their "
            f"completion (first: {truncated[0]})",
            stacklevel=2,
        )
    return out


def target_tokens(batch: dict[str, Tensor]) -> int:
    """The tokens a batch is scored on: its targets that are not IGNORE_INDEX (prompt, padding)."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> Tensor:
    """(B, T) long tensor of `seqs`, right-padded with `value` to the longest."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def classification_batch(items: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, Tensor]:
    """{'idx': (B, T) right-padded ids, 'lengths': (B,), 'labels': (B,)}."""
    return {
        "idx": pad_right([ids for ids, _ in items], pad_id),
        "lengths": torch.tensor([len(ids) for ids, _ in items], dtype=torch.long),
        "labels": torch.tensor([label for _, label in items], dtype=torch.long),
    }


def sft_batch(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """{'idx': (B, T) right-padded inputs, 'targets': (B, T) with -1 on prompt and padding}."""
    return {
        "idx": pad_right([x for x, _ in items], pad_id),
        "targets": pad_right([y for _, y in items], IGNORE_INDEX),
    }
