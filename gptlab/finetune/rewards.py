"""Rewards for RL fine-tuning: `reward(completion, example) -> float`, where `example` is the prompt's
JSONL record ({"prompt", ...} plus whatever fields the reward reads, e.g. "answer").

Built in (by name):
  exact_match     1 when the completion, stripped, equals str(example["answer"]) stripped, else 0
  numeric         1 when the first number in the completion equals the number example["answer"], else 0
  regex:PATTERN   1 when PATTERN occurs in the completion (re.search), else 0
  regex           the same with the example's own "pattern" field
Or a Python callable of that signature: `module:function` (an importable module) or `path/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Reward = Callable[[str, dict[str, Any]], float]

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
BUILTIN_NAMES = ("exact_match", "numeric", "regex:PATTERN", "regex")


def exact_match(completion: str, example: dict[str, Any]) -> float:
    return float(completion.strip() == str(example["answer"]).strip())


def first_number(text: str) -> float | None:
    found = NUMBER.search(text)
    return float(found.group()) if found else None


def numeric(completion: str, example: dict[str, Any]) -> float:
    value = first_number(completion)
    return float(value is not None and math.isclose(value, float(example["answer"]), rel_tol=1e-9, abs_tol=1e-9))


def regex(pattern: str) -> Reward:
    compiled = re.compile(pattern)
    return lambda completion, example: float(compiled.search(completion) is not None)


def example_regex(completion: str, example: dict[str, Any]) -> float:
    return float(re.search(example["pattern"], completion) is not None)


BUILTIN: dict[str, tuple[Reward, str | None]] = {
    "exact_match": (exact_match, "answer"),
    "numeric": (numeric, "answer"),
    "regex": (example_regex, "pattern"),
}


def load_reward(spec: str) -> tuple[Reward, str | None]:
    """(reward function, the example field it needs or None) for a built-in name or a Python path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("regex:"):
        try:
            return regex(spec[len("regex:") :]), None
        except re.error as e:
            raise ValueError(f"--reward {spec!r}: not a valid regular expression ({e})") from None
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(
            f"unknown reward {spec!r}: give a built-in ({', '.join(BUILTIN_NAMES)}) or a Python callable as "
            "module:function or path/to/file.py:function"
        )
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: the file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"gptlab_reward_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"--reward {spec!r}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"--reward {spec!r}: cannot import module {where!r} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: {where} has no callable {name!r}")
    return function, None


def score(reward: Reward, completions: Sequence[str], examples: Sequence[dict[str, Any]]) -> list[float]:
    """reward(completion, example) for each pair, checked to be a finite number."""
    out = []
    for text, example in zip(completions, examples, strict=True):
        value = reward(text, example)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(
                f"the reward returned {value!r} for the completion {text!r} of prompt {example['prompt']!r}; "
                "it must return a finite number"
            )
        out.append(number)
    return out
