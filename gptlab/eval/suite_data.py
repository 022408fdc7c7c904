"""The GPT-3 paper's evaluation tasks as their authors distribute them: file names, readers, hub copies.

Each task is read from the files its authors publish (`--data DIR`): the files of task T are looked
for below DIR/T/ (any depth, so an archive can be unpacked there as it is), else below DIR when a
name occurs there once. The record fields stay those of the distributed files; `gptlab.eval.suite_tasks`
turns records into prompts. With no files, and the `datasets` library online, the same data comes from
the Hugging Face hub copies lm-evaluation-harness uses, converted to the distributed fields.

| task | scored split (files) | few-shot pool (files) |
|---|---|---|
| lambada_openai | lambada_test.jsonl {"text"} | the same file, other items (LAMBADA has no train split) |
| hellaswag | hellaswag_val.jsonl {ctx_a, ctx_b, activity_label, endings, label} | hellaswag_train.jsonl |
| piqa | valid.jsonl {goal, sol1, sol2} + valid-labels.lst | train.jsonl + train-labels.lst |
| arc_easy | ARC-Easy-Test.jsonl {question: {stem, choices: [{text, label}]}, answerKey} | ARC-Easy-Train.jsonl |
| arc_challenge | ARC-Challenge-Test.jsonl (as ARC-Easy) | ARC-Challenge-Train.jsonl |
| openbookqa | test.jsonl (Data/Main; as ARC) | train.jsonl |
| winogrande | dev.jsonl {sentence, option1, option2, answer: "1" or "2"} | train_xl.jsonl |
| boolq | dev.jsonl {question, passage, answer: true or false} | train.jsonl |
| triviaqa | unfiltered-web-dev.json {"Data": [{Question, Answer: {Value, Aliases}}]} | unfiltered-web-train.json |
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """Where a task's data comes from."""

    test: tuple[str, ...]
    """Files of the scored split (a `.lst` file holds the labels of the `.jsonl` before it)."""
    train: tuple[str, ...]
    """Files of the few-shot pool; empty: other items of the scored split."""
    url: str
    """Where the files are published."""
    hub: tuple[str, str | None, str, str | None]
    """(dataset, configuration, scored split, train split) on the Hugging Face hub."""
    from_hub: Callable[[Doc], Doc]
    """A hub row in the distributed file's fields."""


def _arc_from_hub(row: Doc) -> Doc:
    choices = row["choices"]
    stem = row.get("question_stem", row.get("question"))
    return {
        "id": row.get("id"),
        "question": {
            "stem": stem,
            "choices": [{"text": t, "label": lab} for t, lab in zip(choices["text"], choices["label"], strict=True)],
        },
        "answerKey": row["answerKey"],
    }


def _trivia_from_hub(row: Doc) -> Doc:
    answer = row["answer"]
    return {"Question": row["question"], "Answer": {"Value": answer["value"], "Aliases": list(answer["aliases"])}}


SOURCES: dict[str, Source] = {
    "lambada_openai": Source(
        ("lambada_test.jsonl",), (), "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
        ("EleutherAI/lambada_openai", "default", "test", None), lambda r: {"text": r["text"]},
    ),
    "hellaswag": Source(
        ("hellaswag_val.jsonl",), ("hellaswag_train.jsonl",),
        "https://github.com/rowanz/hellaswag/tree/master/data",
        ("Rowan/hellaswag", None, "validation", "train"),
        lambda r: {**{k: r[k] for k in ("activity_label", "ctx_a", "ctx_b", "endings")}, "label": int(r["label"])},
    ),
    "piqa": Source(
        ("valid.jsonl", "valid-labels.lst"), ("train.jsonl", "train-labels.lst"),
        "https://yonatanbisk.com/piqa/data/", ("baber/piqa", None, "validation", "train"),
        lambda r: {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])},
    ),
    "arc_easy": Source(
        ("ARC-Easy-Test.jsonl",), ("ARC-Easy-Train.jsonl",),
        "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
        ("allenai/ai2_arc", "ARC-Easy", "test", "train"), _arc_from_hub,
    ),
    "arc_challenge": Source(
        ("ARC-Challenge-Test.jsonl",), ("ARC-Challenge-Train.jsonl",),
        "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
        ("allenai/ai2_arc", "ARC-Challenge", "test", "train"), _arc_from_hub,
    ),
    "openbookqa": Source(
        ("test.jsonl",), ("train.jsonl",),
        "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip (Data/Main)",
        ("allenai/openbookqa", "main", "test", "train"), _arc_from_hub,
    ),
    "winogrande": Source(
        ("dev.jsonl",), ("train_xl.jsonl",),
        "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
        ("allenai/winogrande", "winogrande_xl", "validation", "train"),
        lambda r: {k: r[k] for k in ("sentence", "option1", "option2", "answer")},
    ),
    "boolq": Source(
        ("dev.jsonl",), ("train.jsonl",), "https://storage.googleapis.com/boolq/dev.jsonl (and train.jsonl)",
        ("aps/super_glue", "boolq", "validation", "train"),
        lambda r: {"question": r["question"], "passage": r["passage"], "answer": bool(r["label"])},
    ),
    "triviaqa": Source(
        ("unfiltered-web-dev.json",), ("unfiltered-web-train.json",),
        "https://nlp.cs.washington.edu/triviaqa/data/triviaqa-unfiltered.tar.gz",
        ("mandarjoshi/trivia_qa", "rc.nocontext", "validation", "train"), _trivia_from_hub,
    ),
}  # fmt: skip


class MissingDataError(FileNotFoundError):
    """A task's files are not where they were looked for, and the hub cannot supply them."""


def find_file(data: Path, task: str, name: str) -> Path | None:
    """`name` below data/task/ (any depth), else below `data` when it occurs there exactly once."""
    for root, unique in ((data / task, False), (data, True)):
        if not root.is_dir():
            continue
        found = sorted(root.rglob(name))
        if len(found) == 1 or (found and not unique):
            return found[0]
        if len(found) > 1:
            shown = ", ".join(str(p) for p in found[:3])
            raise ValueError(
                f"task {task}: {len(found)} files named {name} below {data} ({shown}); "
                f"put this task's files under {data / task}/"
            )
    return None


def read_jsonl(path: Path) -> list[Doc]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number} is not valid JSON ({e})") from None
    return docs


def read_files(paths: list[Path]) -> list[Doc]:
    """Records of one split: JSON lines, a TriviaQA JSON file ({"Data": [...]}), or a `.jsonl` followed
    by its `.lst` of labels (PIQA: one 0 / 1 per line, merged as "label")."""
    first = paths[0]
    if first.suffix == ".json":
        try:
            return list(json.loads(first.read_text(encoding="utf-8"))["Data"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{first} is not a TriviaQA file (a JSON object with a "Data" list): {e}') from None
    docs = read_jsonl(first)
    if len(paths) > 1:
        labels = [line.strip() for line in paths[1].read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(labels) != len(docs):
            raise ValueError(f"{paths[1]} holds {len(labels)} labels for the {len(docs)} items of {first}")
        docs = [{**doc, "label": int(label)} for doc, label in zip(docs, labels, strict=True)]
    return docs


def load_split(task: str, split: str, data: str | Path | None) -> list[Doc]:
    """The records of `task`'s scored split ("test") or few-shot pool ("train"), from the distributed
    files under `data`, else from the hub. An empty list: the task has no train split."""
    if task not in SOURCES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[task]
    names = source.test if split == "test" else source.train
    if not names:
        return []
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise MissingDataError(f"--data {data} is not a directory")
        paths = [find_file(data, task, name) for name in names]
        if all(p is not None for p in paths):
            return read_files(paths)  # type: ignore[arg-type]
        if split == "train":
            raise MissingDataError(
                f"task {task}: few-shot examples come from its train split, but {names[0]} is not below "
                f"{data / task}; download it from {source.url}, or evaluate with --shots 0"
            )
    return _from_hub(task, split, data)


def _from_hub(task: str, split: str, data: Path | None) -> list[Doc]:
    source = SOURCES[task]
    names = source.test if split == "test" else source.train
    where = f"{data / task}/" if data is not None else "DIR/" + task + "/ (then pass --data DIR)"
    advice = f"download {source.url} and put {' and '.join(names)} below {where}"
    dataset, config, test_split, train_split = source.hub
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MissingDataError(f"task {task}: no local files and the hub is offline; {advice}")
    try:
        import datasets
    except ImportError:
        raise MissingDataError(
            f"task {task}: no local files; {advice}, or install the `datasets` library "
            f"(pip install 'gptlab[eval]') to fetch {dataset} from the Hugging Face hub"
        ) from None
    try:
        rows = datasets.load_dataset(dataset, config, split=test_split if split == "test" else train_split)
    except Exception as e:  # the hub's errors are many (network, auth, format); each means "no data"
        raise MissingDataError(f"task {task}: fetching {dataset} from the hub failed ({e}); {advice}") from None
    return [source.from_hub(dict(row)) for row in rows]
