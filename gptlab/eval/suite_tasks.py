"""Prompt formats and scoring rules of the GPT-3 paper's tasks (Brown et al. 2020, section 2.4, appendix G).

Two styles of prompt:
- "paper": the formats of the paper's appendix G figures (the README's eval-suite section lists, per task,
  the figure, what it shows and what no source could settle).
- "lm-eval": lm-evaluation-harness 0.4's task of the same name, for side-by-side checks.
They differ for PIQA (the paper conditions on the goal alone, figure G.4; lm-eval on "Question: goal\\nAnswer:"),
BoolQ (figure G.29's "question:" / "answer:" against lm-eval's "Question:" / "Answer:"), TriviaQA (figure
G.34's "Q: ...\\nA:" stopping at a newline against lm-eval's "Question: ...?\\nAnswer:" stopping at a
newline, period or comma; lm-eval's few-shot answers are the first alias, ours the answer's own value) and
LAMBADA with examples (section 3.1.2 and figure G.21: "Fill in blank:" then each passage as
"context ____. -> word"; lm-eval's lambada_openai keeps the plain text). The rest are the same in both.

Scoring, per the paper's section 2.4:
- multiple choice compares log P(completion | context) per choice: `acc` the raw sum (lm-eval's `acc`),
  `acc_token` divided by the completion's token count (the paper's normalisation for most tasks),
  `acc_char` by its characters (lm-eval's `acc_norm`), and for ARC and OpenBookQA `acc_uncond`:
  log P(completion | context) - log P(completion | answer context "Answer:").
- WinoGrande is scored partially (Trinh and Le 2018): the option fills the blank in the context and the
  rest of the sentence after the blank is the completion scored under each.
- LAMBADA: `acc` when every token of the last word is the greedy prediction, and `ppl` the perplexity
  exp(-mean log P(word | context)) over items (GPT-2 paper table 3 / lm-eval's definition).
- TriviaQA: a completion by beam search (width 4, length penalty 0.6, GPT-3 section 2.4; greedy in the
  lm-eval style), exact match after TriviaQA's own answer normalisation (lower case,
  punctuation and articles removed, whitespace collapsed) against any alias of the answer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gptlab.eval.suite_data import SOURCES, Doc

STYLES = ("paper", "lm-eval")
KINDS = ("multiple_choice", "partial", "cloze", "generation")


@dataclass(frozen=True)
class Item:
    """One test item made into text: per option the context and its completion."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    """Each starts with the space that separates it from its context."""
    choices: tuple[str, ...] = ()
    """The option texts whose characters `acc_char` divides by (lm-eval's choices)."""
    gold: int = 0
    answers: tuple[str, ...] = ()
    """Generation: every accepted answer."""
    example_gap: str = ""
    """What a few-shot example puts between its context and its completion (see `_lambada`)."""

    def example(self) -> str:
        """The item solved, as a few-shot example."""
        return self.contexts[self.gold] + self.example_gap + self.continuations[self.gold]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    metric: str
    """The metric the paper reports."""
    format: Callable[[Doc, str, bool], Item]
    """(record, style, with few-shot examples) -> Item."""
    answer_context: str | None = None
    """Context of the unconditional probability (`acc_uncond`); None: not this task's normalisation."""
    fewshot_header: str = ""
    """The paper style's first line of a prompt with examples (figure G.21's "Fill in blank:")."""
    lm_eval_extra_draw: bool = False
    """lm-eval's config of the task names no test split (it scores validation) nor a few-shot split; the
    two being equal, its sampler draws K + 1 examples to drop the scored item, and keeps the first K."""

    def stop(self, style: str) -> tuple[str, ...]:
        return ("\n", ".", ",") if style == "lm-eval" else ("\n",)

    def decoding(self, style: str) -> dict[str, Any]:
        """How free-form answers are decoded: the paper's beam search (section 2.4: width 4, length
        penalty 0.6, as in the GPT-2 paper), or lm-eval's greedy decoding."""
        return {} if style == "lm-eval" else {"num_beams": 4, "length_penalty": 0.6}


def _choice_item(context: str, choices: list[str], gold: int) -> Item:
    return Item(tuple([context] * len(choices)), tuple(" " + c for c in choices), tuple(choices), gold)


def _lambada(doc: Doc, style: str, fewshot: bool) -> Item:
    words = doc["text"].split(" ")  # lm-eval splits on single spaces; so do we, for equal prompts
    context = " ".join(words[:-1])
    if style == "paper" and fewshot:  # section 3.1.2 / figure G.21: fill in the blank from one shot on
        context += " ____. ->"  # lm-eval's lambada_openai_cloze blank; the paper's transcriptions disagree
    # lm-eval writes an example as text + target_delimiter " " + target, and LAMBADA's target is " word"
    gap = " " if style == "lm-eval" else ""
    return Item((context,), (" " + words[-1],), (words[-1],), 0, example_gap=gap)


def _hellaswag_clean(text: str) -> str:
    """WikiHow artefacts out of HellaSwag text (bracketed headers), as lm-eval's preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: Doc, style: str, fewshot: bool) -> Item:
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choice_item(context, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: Doc, style: str, fewshot: bool) -> Item:
    context = doc["goal"] if style == "paper" else f"Question: {doc['goal']}\nAnswer:"
    return _choice_item(context, [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc_choices(doc: Doc) -> tuple[list[str], int]:
    choices = doc["question"]["choices"]
    labels = [c["label"] for c in choices]
    key = str(doc["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels} (item {doc.get('id')})")
    return [c["text"] for c in choices], labels.index(key)


def _arc(doc: Doc, style: str, fewshot: bool) -> Item:
    choices, gold = _arc_choices(doc)
    return _choice_item(f"Question: {doc['question']['stem']}\nAnswer:", choices, gold)


def _openbookqa(doc: Doc, style: str, fewshot: bool) -> Item:
    choices, gold = _arc_choices(doc)
    return _choice_item(doc["question"]["stem"], choices, gold)


def _winogrande(doc: Doc, style: str, fewshot: bool) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = (doc["option1"], doc["option2"])
    contexts = tuple(sentence[:blank] + option for option in options)
    rest = " " + sentence[blank + 1 :].strip()
    return Item(contexts, (rest, rest), options, int(doc["answer"]) - 1)


def _boolq(doc: Doc, style: str, fewshot: bool) -> Item:
    q, a = ("question", "answer") if style == "paper" else ("Question", "Answer")
    context = f"{doc['passage']}\n{q}: {doc['question']}?\n{a}:"
    return _choice_item(context, ["no", "yes"], int(bool(doc["answer"])))


def _triviaqa(doc: Doc, style: str, fewshot: bool) -> Item:
    answer = doc["Answer"]
    question = doc["Question"]
    context = f"Q: {question}\nA:" if style == "paper" else f"Question: {question}?\nAnswer:"
    answers = tuple(dict.fromkeys([answer["Value"], *answer.get("Aliases", [])]))
    # lm-eval's target is the alias list, and a few-shot example shows its first entry
    shown = answer["Aliases"][0] if style == "lm-eval" and answer.get("Aliases") else answer["Value"]
    return Item((context,), (" " + shown,), (shown,), 0, answers)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("lambada_openai", "cloze", "acc", _lambada, fewshot_header="Fill in blank:"),
        TaskSpec("hellaswag", "multiple_choice", "acc_token", _hellaswag, lm_eval_extra_draw=True),
        TaskSpec("piqa", "multiple_choice", "acc_token", _piqa, lm_eval_extra_draw=True),
        TaskSpec("arc_easy", "multiple_choice", "acc_uncond", _arc, answer_context="Answer:"),
        TaskSpec("arc_challenge", "multiple_choice", "acc_uncond", _arc, answer_context="Answer:"),
        TaskSpec("openbookqa", "multiple_choice", "acc_uncond", _openbookqa, answer_context="Answer:"),
        TaskSpec("winogrande", "partial", "acc", _winogrande, lm_eval_extra_draw=True),
        TaskSpec("boolq", "multiple_choice", "acc", _boolq, lm_eval_extra_draw=True),
        TaskSpec("triviaqa", "generation", "em", _triviaqa, lm_eval_extra_draw=True),
    )
}
assert set(TASKS) == set(SOURCES)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(text: str | list[str]) -> list[str]:
    """'hellaswag,piqa' (or a list; 'all' for every task) -> checked task names."""
    names = [n.strip() for part in ([text] if isinstance(text, str) else text) for n in part.split(",") if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    for name in names:
        task_spec(name)
    if not names:
        raise ValueError(f"no task given; choose from {', '.join(TASKS)} (or 'all')")
    return names


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | {"‘", "’", "´", "`"}


def normalize_answer(text: str) -> str:
    """TriviaQA's answer normalisation (its evaluation script): underscores and punctuation become
    spaces, lower case, articles dropped, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(completion: str, answers: tuple[str, ...]) -> bool:
    got = normalize_answer(completion)
    return any(got == normalize_answer(a) for a in answers)
