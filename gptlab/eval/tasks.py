"""Few-shot task files: the JSONL format, its loader, and the example tasks the project generates.

Format (one JSON object per line, UTF-8; blank lines ignored)
--------------------------------------------------------------
An optional FIRST line holds the task's metadata under the key ``"task"``::

    {"task": {"name": "arithmetic_2digit", "kind": "generation", "description": "",
              "target_delimiter": " ", "fewshot_delimiter": "\\n\\n",
              "stop": ["\\n"], "max_tokens": 8}}

Every other line is one item::

    {"split": "train" | "test", "kind": ..., "context": "...", ...kind-specific fields}

- ``split``: ``"train"`` items are the pool few-shot examples are drawn from; ``"test"`` items are the
  ones scored. Default ``"test"``.
- ``kind`` (per item, or once in the metadata; one kind per file):
  - ``"multiple_choice"``: ``"choices"`` (list of >= 2 strings) and ``"gold"`` (index into choices).
    Each choice is scored by log P(target_delimiter + choice | prompt). Reported: ``acc`` (argmax of
    the log-likelihood) and ``acc_norm`` (argmax of log-likelihood / number of characters of the
    choice, the choice string without the delimiter: lm-evaluation-harness's ``acc_norm``).
  - ``"cloze"`` (LAMBADA style, last word): ``"target"``. Correct when the greedy completion equals
    the target, i.e. every token of target_delimiter + target is the model's argmax (lm-eval's
    LAMBADA ``acc``). Also reported: the target's mean log-likelihood and perplexity.
  - ``"generation"`` (short answer, exact match): ``"target"``. The model decodes greedily after the
    prompt until a stop string (``"stop"``, default ``["\\n"]``) or ``"max_tokens"`` tokens (default
    32; both settable per item or in the metadata); correct when the completion, stripped of
    surrounding whitespace, equals the stripped target.
- ``context`` (alias ``query``): the text before the answer.

Metadata keys: ``name`` (default: the file's stem), ``kind``, ``description`` (text put before the
examples, then the few-shot delimiter), ``target_delimiter`` (default ``" "``, between context and
answer), ``fewshot_delimiter`` (default ``"\\n\\n"``, between examples), ``stop``, ``max_tokens``.

A K-shot prompt is, as in GPT-3 (Brown et al. 2020, section 2) and lm-evaluation-harness::

    description + fewshot_delimiter                                (when a description is given)
    + join(fewshot_delimiter, [ex.context + target_delimiter + answer(ex) for ex in K examples])
    + fewshot_delimiter + item.context                             (just item.context when K = 0)

where answer(ex) is the gold choice or the target. The K examples are drawn without replacement from
the train split with a seeded generator and never include an item equal to the one being tested.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("multiple_choice", "cloze", "generation")
SPLITS = ("train", "test")
DEFAULT_STOP = ("\n",)
DEFAULT_MAX_TOKENS = 32


@dataclass(frozen=True)
class TaskItem:
    """One item of a task: the context and its answer(s)."""

    context: str
    split: str = "test"
    choices: tuple[str, ...] = ()
    gold: int = 0
    target: str = ""
    stop: tuple[str, ...] | None = None
    max_tokens: int | None = None

    def answer(self, kind: str) -> str:
        """The text that follows the context (and the target delimiter) in a solved example."""
        return self.choices[self.gold] if kind == "multiple_choice" else self.target

    def key(self) -> tuple[Any, ...]:
        """Identity of the item's content, so a test item never shows up among its own examples."""
        return (self.context, self.choices, self.gold, self.target)


@dataclass
class Task:
    """A parsed task file: metadata and its train / test items."""

    name: str
    kind: str
    train: list[TaskItem] = field(default_factory=list)
    test: list[TaskItem] = field(default_factory=list)
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = DEFAULT_STOP
    max_tokens: int = DEFAULT_MAX_TOKENS

    def render_example(self, item: TaskItem) -> str:
        return item.context + self.target_delimiter + item.answer(self.kind)

    def prompt(self, item: TaskItem, examples: Sequence[TaskItem] = ()) -> str:
        """The text the model conditions on for `item` after the few-shot `examples`."""
        parts = [self.render_example(ex) for ex in examples] + [item.context]
        if self.description:
            parts.insert(0, self.description)
        return self.fewshot_delimiter.join(parts)

    def sample_examples(self, item: TaskItem, shots: int, rng: random.Random) -> list[TaskItem]:
        """`shots` distinct train items other than `item`, drawn with `rng`."""
        if shots == 0:
            return []
        pool = [ex for ex in self.train if ex.key() != item.key()]
        if len(pool) < shots:
            raise ValueError(
                f"task {self.name!r} has {len(pool)} train items usable as examples, fewer than the "
                f"{shots} shots asked for; add train items or lower --shots"
            )
        return rng.sample(pool, shots)

    def stop_for(self, item: TaskItem) -> tuple[str, ...]:
        return item.stop if item.stop is not None else self.stop

    def max_tokens_for(self, item: TaskItem) -> int:
        return item.max_tokens if item.max_tokens is not None else self.max_tokens


_META_KEYS = {"name", "kind", "description", "target_delimiter", "fewshot_delimiter", "stop", "max_tokens"}
_ITEM_KEYS = {"split", "kind", "context", "query", "choices", "gold", "target", "stop", "max_tokens"}


def load_task(path: str | Path) -> Task:
    """Parse and validate a task JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist; pass a JSONL file (see examples/tasks)")
    meta: dict[str, Any] = {}
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number} must be a JSON object, got {type(obj).__name__}")
            if "task" in obj:
                if rows or meta:
                    raise ValueError(f'{path}:{number}: the "task" metadata line must be the first line')
                meta = _check_meta(obj["task"], f"{path}:{number}")
            else:
                rows.append((number, obj))
    kind = meta.get("kind") or next((obj["kind"] for _, obj in rows if "kind" in obj), None)
    if kind is None:
        raise ValueError(f'{path}: no "kind" given; set it in the metadata line or on the items ({KINDS})')
    task = Task(
        name=meta.get("name", path.stem),
        kind=kind,
        description=meta.get("description", ""),
        target_delimiter=meta.get("target_delimiter", " "),
        fewshot_delimiter=meta.get("fewshot_delimiter", "\n\n"),
        stop=tuple(meta.get("stop", DEFAULT_STOP)),
        max_tokens=meta.get("max_tokens", DEFAULT_MAX_TOKENS),
    )
    for number, obj in rows:
        item = _parse_item(obj, kind, f"{path}:{number}")
        (task.train if item.split == "train" else task.test).append(item)
    if not task.test:
        raise ValueError(f'{path} holds no test items (lines with "split": "test"); nothing to evaluate')
    return task


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ValueError(f'{where}: "task" must be an object with keys {sorted(_META_KEYS)}')
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown metadata keys {sorted(unknown)}; known: {sorted(_META_KEYS)}")
    if "kind" in meta and meta["kind"] not in KINDS:
        raise ValueError(f"{where}: kind {meta['kind']!r} is not one of {KINDS}")
    _check_generation_fields(meta, where)
    for key in ("name", "description", "target_delimiter", "fewshot_delimiter"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {meta[key]!r}")
    return meta


def _check_generation_fields(obj: dict[str, Any], where: str) -> None:
    stop = obj.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"{where}: stop must be a list of non-empty strings, got {stop!r}")
    max_tokens = obj.get("max_tokens", 1)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be a positive integer, got {max_tokens!r}")


def _parse_item(obj: dict[str, Any], kind: str, where: str) -> TaskItem:
    unknown = set(obj) - _ITEM_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(_ITEM_KEYS)}")
    if obj.get("kind", kind) != kind:
        raise ValueError(
            f"{where}: kind {obj['kind']!r} differs from the file's kind {kind!r}; one kind per file"
        )
    if kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} is not one of {KINDS}")
    split = obj.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"{where}: split {split!r} is not one of {SPLITS}")
    context = obj.get("context", obj.get("query"))
    if not isinstance(context, str):
        raise ValueError(f'{where}: "context" (or "query") must be a string, got {context!r}')
    _check_generation_fields(obj, where)
    stop = tuple(obj["stop"]) if "stop" in obj else None
    if kind == "multiple_choice":
        choices, gold = obj.get("choices"), obj.get("gold")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError(
                f'{where}: "choices" must be a list of at least 2 non-empty strings, got {choices!r}'
            )
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ValueError(f'{where}: "gold" must be an index in [0, {len(choices)}), got {gold!r}')
        return TaskItem(context=context, split=split, choices=tuple(choices), gold=gold)
    target = obj.get("target")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f'{where}: "target" must be a non-empty string for kind {kind!r}, got {target!r}')
    return TaskItem(context=context, split=split, target=target, stop=stop, max_tokens=obj.get("max_tokens"))


def write_task(path: str | Path, task: Task) -> Path:
    """Write `task` in the JSONL format above (metadata line first, then train and test items)."""
    from gptlab.checkpoint import atomic_write_text

    meta: dict[str, Any] = {"name": task.name, "kind": task.kind}
    if task.description:
        meta["description"] = task.description
    meta["target_delimiter"] = task.target_delimiter
    meta["fewshot_delimiter"] = task.fewshot_delimiter
    if task.kind == "generation":
        meta["stop"] = list(task.stop)
        meta["max_tokens"] = task.max_tokens
    lines = [json.dumps({"task": meta}, ensure_ascii=False)]
    for item in [*task.train, *task.test]:
        row: dict[str, Any] = {"split": item.split, "context": item.context}
        if task.kind == "multiple_choice":
            row.update(choices=list(item.choices), gold=item.gold)
        else:
            row["target"] = item.target
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


# ---- example tasks ------------------------------------------------------------------------------
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "tiger",
    "rabbit",
    "elephant",
    "mouse",
    "lion",
    "sheep",
    "monkey",
    "wolf",
    "cow",
    "bear",
    "duck",
    "fox",
    "goat",
    "zebra",
    "frog",
    "owl",
    "shark",
]
OBJECTS = [
    "chair",
    "spoon",
    "table",
    "window",
    "pencil",
    "bottle",
    "hammer",
    "blanket",
    "cloud",
    "river",
    "door",
    "cup",
    "shoe",
    "lamp",
    "book",
    "mountain",
    "car",
    "clock",
    "stone",
    "bread",
]
ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "young"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("rich", "poor"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("long", "short"),
    ("full", "empty"),
    ("strong", "weak"),
    ("high", "low"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("first", "last"),
]
NAMES = ["Anna", "Tom", "Maria", "James", "Lucy", "David", "Emma", "Peter", "Sarah", "John"]
THINGS = ["book", "key", "letter", "ball", "cake", "map", "ticket", "phone"]
SEQUENCES = [
    "one two three four five six seven eight nine ten".split(),
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "January February March April May June July August September October November December".split(),
    "a b c d e f g h i j k l m n o p q r s t u v w x y z".split(),
]


def _arithmetic(rng: random.Random, n_train: int, n_test: int) -> Task:
    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(pairs) < n_train + n_test:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    items = [
        TaskItem(
            context=f"Q: What is {a} plus {b}?\nA:",
            target=str(a + b),
            split="train" if i < n_train else "test",
        )
        for i, (a, b) in enumerate(pairs)
    ]
    return Task(
        "arithmetic_2digit", "generation", items[:n_train], items[n_train:], stop=("\n",), max_tokens=6
    )


def _animals(rng: random.Random, n_train: int, n_test: int) -> Task:
    items = []
    for i in range(n_train + n_test):
        choices = [rng.choice(ANIMALS), *rng.sample(OBJECTS, 3)]
        rng.shuffle(choices)
        gold = next(j for j, c in enumerate(choices) if c in ANIMALS)
        context = f"Question: Which of these is an animal: {', '.join(choices)}?\nAnswer:"
        items.append(
            TaskItem(
                context=context, choices=tuple(choices), gold=gold, split="train" if i < n_train else "test"
            )
        )
    return Task("animals_mc", "multiple_choice", items[:n_train], items[n_train:])


def _antonyms(rng: random.Random, n_train: int, n_test: int) -> Task:
    words = [w for pair in ANTONYMS for w in pair]
    items = []
    for i in range(n_train + n_test):
        word, opposite = rng.choice(ANTONYMS)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        distractors = rng.sample([w for w in words if w not in (word, opposite)], 3)
        choices = [opposite, *distractors]
        rng.shuffle(choices)
        items.append(
            TaskItem(
                context=f"The opposite of {word} is",
                choices=tuple(choices),
                gold=choices.index(opposite),
                split="train" if i < n_train else "test",
            )
        )
    return Task("antonyms_mc", "multiple_choice", items[:n_train], items[n_train:])


def _last_word(rng: random.Random, n_train: int, n_test: int) -> Task:
    items: list[TaskItem] = []
    seen: set[str] = set()
    while len(items) < n_train + n_test:
        if rng.random() < 0.5:  # a list continued by its next element
            words = rng.choice(SEQUENCES)
            start = rng.randrange(0, len(words) - 4)
            length = rng.randint(4, min(7, len(words) - start))
            span = words[start : start + length]
            context, target = ", ".join(span[:-1]) + ",", span[-1]
        else:  # a name that only the earlier sentence can supply (LAMBADA's long-range cue)
            giver, taker = rng.sample(NAMES, 2)
            thing = rng.choice(THINGS)
            context = f"{giver} gave the {thing} to {taker}. Later, {taker} gave the {thing} back to"
            target = giver
        if context in seen:
            continue
        seen.add(context)
        split = "train" if len(items) < n_train else "test"
        items.append(TaskItem(context=context, target=target, split=split))
    return Task("last_word_cloze", "cloze", items[:n_train], items[n_train:])


EXAMPLE_TASKS = {
    "arithmetic_2digit": _arithmetic,
    "animals_mc": _animals,
    "antonyms_mc": _antonyms,
    "last_word_cloze": _last_word,
}


def make_example_tasks(
    out_dir: str | Path, seed: int = 1234, n_train: int = 16, n_test: int = 40
) -> list[Path]:
    """Write the example tasks (2-digit addition, animal and antonym multiple choice, last-word cloze)
    as `<name>.jsonl` files under `out_dir`; the same seed gives byte-identical files."""
    out_dir = Path(out_dir)
    paths = []
    for offset, (name, make) in enumerate(EXAMPLE_TASKS.items()):
        task = make(random.Random(seed * 1000 + offset), n_train, n_test)
        paths.append(write_task(out_dir / f"{name}.jsonl", task))
    return paths
