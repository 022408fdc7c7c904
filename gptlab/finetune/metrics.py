"""Classification metrics: accuracy and macro-averaged F1."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(
            f"need equally many predictions and labels, got {len(predictions)} and {len(labels)}"
        )
    return sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over all `num_labels` classes.

    A class with no true and no predicted examples scores 0, as scikit-learn's f1_score(average='macro',
    labels=range(num_labels)) does.
    """
    accuracy(predictions, labels)  # length check
    total = 0.0
    for c in range(num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, labels, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predictions, labels, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predictions, labels, strict=True))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / num_labels


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], num_labels: int
) -> dict[str, float]:
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels, num_labels)}
