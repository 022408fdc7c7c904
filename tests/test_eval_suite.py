"""The GPT-3 paper's evaluation suite on fixture files in each task's distributed format (a handful of
items each, tests/fixtures/eval_suite): against lm-evaluation-harness's stock tasks of the same names run
on the same items (its Hugging Face backend, the same tiny random GPT-2), the CLI, and training."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.eval.suite import MAX_ANSWER_TOKENS, build, evaluate_suite_task
from gptlab.eval.suite_data import SOURCES, MissingDataError, load_split
from gptlab.eval.suite_tasks import TASKS, exact_match, normalize_answer

FIXTURES = Path(__file__).resolve().parent / "fixtures/eval_suite"
SAME_PROMPT = ("lambada_openai", "hellaswag", "arc_easy", "arc_challenge", "openbookqa", "winogrande")
OTHER_PROMPT = ("piqa", "boolq", "triviaqa")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_bpe_dir: Path) -> Path:
    """A tiny random GPT-2 (GPT-2's vocabulary and 1024 positions) saved by transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("hf-gpt2-suite")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory)
    shutil.copy(gpt2_bpe_dir / "encoder.json", directory / "vocab.json")
    shutil.copy(gpt2_bpe_dir / "vocab.bpe", directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def ours(hf_dir: Path, gpt2_tokenizer):
    from gptlab.checkpoint import load_model

    return load_model(hf_dir), gpt2_tokenizer


# ---- the hub's copies, written by hand from the distributed records (what lm-eval's tasks read) -------
def _arc_row(doc: dict, stem_key: str) -> dict:
    choices = doc["question"]["choices"]
    return {"id": doc["id"], stem_key: doc["question"]["stem"], "answerKey": doc["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}  # fmt: skip


def hub_rows(task: str, split: str) -> list[dict]:
    docs = load_split(task, split, FIXTURES)
    if task in ("arc_easy", "arc_challenge"):
        return [_arc_row(d, "question") for d in docs]
    if task == "openbookqa":
        return [_arc_row(d, "question_stem") for d in docs]
    if task == "hellaswag":
        return [{**d, "label": str(d["label"])} for d in docs]  # the hub stores labels as strings
    if task == "boolq":
        return [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
                for i, d in enumerate(docs)]  # fmt: skip
    if task == "triviaqa":
        answers = [{"aliases": d["Answer"]["Aliases"], "value": d["Answer"]["Value"]} for d in docs]
        return [{"question": d["Question"], "question_id": d["QuestionId"], "answer": a} for d, a in zip(docs, answers)]
    return docs  # LAMBADA, PIQA (labels merged), WinoGrande: the same fields


STOCK = {  # lm-eval's own config file of each task, and the split it scores
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "triviaqa": ("triviaqa/default.yaml", "validation"),
}


def write_lm_eval_tasks(out: Path) -> Path:
    """lm-eval's stock tasks (included as they ship) pointed at the fixture items as local JSON."""
    import lm_eval
    import yaml

    stock = Path(lm_eval.__file__).parent / "tasks"
    for task, (config, split) in STOCK.items():
        files = {}
        for ours_split, theirs in (("test", split), ("train", "train")):
            rows = hub_rows(task, ours_split)
            if rows:
                path = out / f"{task}.{theirs}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
                files[theirs] = str(path)
        yml = {"include": str(stock / config), "task": task, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files}}  # fmt: skip
        if task == "triviaqa":  # lm-eval's default of 256 new tokens: our 32 for the same completions
            yml["generation_kwargs"] = {"until": ["\n", ".", ","], "do_sample": False, "max_gen_toks": 32}
        (out / f"{task}.yaml").write_text(yaml.safe_dump(yml), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def lm_eval_run(lm_eval_env, hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import lm_eval.models.huggingface  # noqa: F401  (registers "hf"; the registry is not empty, so lm-eval won't)
    from lm_eval.tasks import TaskManager

    tasks_dir = write_lm_eval_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))
    return lm_eval_env.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=list(STOCK), device="cpu",
        batch_size=4, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        num_fewshot=0, log_samples=True, bootstrap_iters=10,
    )  # fmt: skip


def _samples(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("task", list(STOCK))
def test_lm_eval_style_equals_lm_eval_harness(task: str, lm_eval_run: dict, ours) -> None:
    """Our reading of the distributed files + lm-eval's prompts = lm-eval's stock task on the hub's
    copies: the same requests, log-likelihoods, completions and scores."""
    model, tok = ours
    mine = evaluate_suite_task(model, tok, task, 0, data=FIXTURES, style="lm-eval")
    results, samples = lm_eval_run["results"][task], _samples(lm_eval_run, task)
    assert len(samples) == mine["n"] == len(load_split(task, "test", FIXTURES))
    if task == "triviaqa":
        assert [s["arguments"][0][0] for s in samples] == [d["prompt"] for d in mine["items"]]
        assert [s["resps"][0][0] for s in samples] == [d["completion"] for d in mine["items"]]
        assert results["exact_match,remove_whitespace"] == mine["metrics"]["em"] == 0.0  # a random model
        return
    for sample, d in zip(samples, mine["items"], strict=True):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert lls == pytest.approx(d["loglikelihoods"], abs=2e-4)
        contexts = [a[0] for a in sample["arguments"]]
        assert d["prompt"] in contexts
    assert results["acc,none"] == pytest.approx(mine["metrics"]["acc"])
    if "acc_norm,none" in results:
        assert results["acc_norm,none"] == pytest.approx(mine["metrics"]["acc_char"])
    if task == "lambada_openai":
        assert results["perplexity,none"] == pytest.approx(mine["metrics"]["ppl"], rel=1e-4)
    else:
        assert results["acc_stderr,none"] == pytest.approx(mine["metrics"]["acc_stderr"])


def test_paper_prompts_equal_lm_eval_where_the_formats_agree(lm_eval_run: dict) -> None:
    for task in (*SAME_PROMPT, *OTHER_PROMPT):
        spec = TASKS[task]
        test = load_split(task, "test", FIXTURES)
        paper = build(spec, test, [], 0, "paper")
        theirs = [sorted({a[0] for a in s["arguments"]}) for s in _samples(lm_eval_run, task)]
        mine = [sorted(set(it.contexts)) for it in paper.items]
        assert (mine == theirs) == (task in SAME_PROMPT), task
    assert build(TASKS["piqa"], load_split("piqa", "test", FIXTURES), [], 0).items[0].contexts[0] == (
        "How to apply sealant to wood."
    )  # the paper's figure G.4: the goal alone


def test_unconditional_and_per_token_normalisation(lm_eval_env, hf_dir: Path, ours) -> None:
    """acc_uncond from log P(choice | prompt) - log P(choice | "Answer:") and acc_token from the per-token
    mean, recomputed with lm-eval's Hugging Face backend and transformers' tokenizer."""
    import lm_eval.models.huggingface  # noqa: F401
    from lm_eval.api.registry import get_model

    lm = get_model("hf").create_from_arg_string(f"pretrained={hf_dir},dtype=float32", {"device": "cpu"})

    class Req:
        def __init__(self, *args):
            self.args = args

    model, tok = ours
    r = evaluate_suite_task(model, tok, "arc_easy", 1, data=FIXTURES)
    assert r["metric"] == "acc_uncond" and r["value"] == r["metrics"]["acc_uncond"]
    for d, doc in zip(r["items"], load_split("arc_easy", "test", FIXTURES), strict=True):
        choices = [" " + c["text"] for c in doc["question"]["choices"]]
        prompt = d["prompt"]
        cond = [ll for ll, _ in lm.loglikelihood([Req(prompt, c) for c in choices], disable_tqdm=True)]
        uncond = [ll for ll, _ in lm.loglikelihood([Req("Answer:", c) for c in choices], disable_tqdm=True)]
        assert d["unconditional"] == pytest.approx(uncond, abs=2e-4)
        best = max(range(len(choices)), key=lambda i: cond[i] - uncond[i])
        assert d["acc_uncond"] == float(best == d["gold"])
        counts = [len(lm.tok_encode(prompt + c)) - len(lm.tok_encode(prompt)) for c in choices]
        best = max(range(len(choices)), key=lambda i: cond[i] / counts[i])
        assert d["acc_token"] == float(best == d["gold"])


def test_fewshot_examples_come_from_the_train_split_never_the_item() -> None:
    for task in TASKS:
        spec = TASKS[task]
        test, train = load_split(task, "test", FIXTURES), load_split(task, "train", FIXTURES)
        five = build(spec, test, train, 5, seed=7)
        assert build(spec, test, train, 5, seed=7, limit=2).prefixes == five.prefixes[:2]  # fixed per item
        assert build(spec, test, train, 5, seed=8).prefixes != five.prefixes
        pool = [spec.format(d, "paper", True).example() for d in (train or test)]
        for prefix, item in zip(five.prefixes, five.items, strict=True):
            examples = prefix.split("\n\n")[:-1]
            if spec.fewshot_header:
                assert examples.pop(0) == spec.fewshot_header, task
            assert len(examples) == 5 and len(set(examples)) == 5, task
            assert all(e in pool for e in examples) and item.example() not in examples, task


# ---- the paper's formats, item by item: the examples of its appendix G figures ----------------------
_PASSAGE = "Normal force -- In a simple case such as an object resting upon a table, the normal force is equal."
_TORCH = ('She held the torch in front of her.\nShe caught her breath.\n"Chris? There\'s a step."\n"What?"\n'
          '"A step. Cut in the rock. About fifty feet ahead." She moved faster. They both moved faster. '
          '"In fact," she said, raising the torch higher, "there\'s more than a')  # fmt: skip
_FEVER = [("a bacterial population in the bloodstream", "A"), ("a leg muscle relaxing after exercise", "B"),
          ("several viral particles on the skin", "C"), ("carbohydrates being digested in the stomach", "D")]
APPENDIX_G = {  # task: (record in the distributed format, contexts, completions), as figure G.x shows them
    "piqa": (  # G.4: the goal alone
        {"goal": "How to apply sealant to wood.", "label": 0,
         "sol1": "Using a brush, brush on sealant onto wood until it is fully saturated with the sealant.",
         "sol2": "Using a brush, drip on sealant onto wood until it is fully saturated with the sealant."},
        ["How to apply sealant to wood."] * 2,
        [" Using a brush, brush on sealant onto wood until it is fully saturated with the sealant.",
         " Using a brush, drip on sealant onto wood until it is fully saturated with the sealant."]),
    "boolq": (  # G.29: passage, then "question: ...?" and "answer:" on lines of their own, lower case
        {"passage": _PASSAGE, "question": "is the normal force equal to the force of gravity", "answer": True},
        [f"{_PASSAGE}\nquestion: is the normal force equal to the force of gravity?\nanswer:"] * 2,
        [" no", " yes"]),
    "triviaqa": (  # G.34: "Q:" and "A:", the answer a completion of its own line
        {"Question": "'Nude Descending A Staircase' is perhaps the most famous painting by which 20th century "
                     "artist?", "Answer": {"Value": "Marcel Duchamp", "Aliases": ["R.Mutt", "Duchamp"]}},
        ["Q: 'Nude Descending A Staircase' is perhaps the most famous painting by which 20th century artist?\nA:"],
        [" Marcel Duchamp"]),
    "hellaswag": (  # G.9: "activity: context" and the ending
        {"activity_label": "Making a cake", "label": 0,
         "ctx_a": "Several cake pops are shown on a display. A woman and girl are shown making the cake pops in "
                  "a kitchen.", "ctx_b": "they",
         "endings": ["bake them, then frost and decorate.", "taste them as they place them on plates."]},
        ["Making a cake: Several cake pops are shown on a display. A woman and girl are shown making the cake "
         "pops in a kitchen. They"] * 2,
        [" bake them, then frost and decorate.", " taste them as they place them on plates."]),
    "arc_easy": (  # G.16: "Question: ... Answer:"
        {"question": {"stem": "Which factor will most likely cause a person to develop a fever?",
                      "choices": [{"text": t, "label": k} for t, k in _FEVER]}, "answerKey": "A"},
        ["Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"] * 4,
        [" " + t for t, _ in _FEVER]),
    "openbookqa": (  # G.8: the question stem alone
        {"question": {"stem": "Organisms require energy in order to do what?",
                      "choices": [{"text": "mature and develop.", "label": "A"},
                                  {"text": "rest soundly.", "label": "B"}]}, "answerKey": "A"},
        ["Organisms require energy in order to do what?"] * 2,
        [" mature and develop.", " rest soundly."]),
    "winogrande": (  # G.14: the option in the context, the rest of the sentence the completion
        {"sentence": "Johnny likes fruits more than vegetables in his new keto diet because the _ are saccharine.",
         "option1": "fruits", "option2": "vegetables", "answer": "1"},
        ["Johnny likes fruits more than vegetables in his new keto diet because the fruits",
         "Johnny likes fruits more than vegetables in his new keto diet because the vegetables"],
        [" are saccharine.", " are saccharine."]),
    "lambada_openai": (  # G.21 / section 3.1.2: with examples, the passage as a blank to fill
        {"text": _TORCH + " step"}, [_TORCH + " ____. ->"], [" step"]),
}  # fmt: skip


@pytest.mark.parametrize("task", list(APPENDIX_G))
def test_paper_style_formats_are_the_appendix_g_figures(task: str) -> None:
    doc, contexts, continuations = APPENDIX_G[task]
    item = TASKS[task].format(doc, "paper", True)
    assert list(item.contexts) == contexts and list(item.continuations) == continuations
    assert item.gold == 0 if task != "boolq" else item.gold == 1


def test_paper_style_lambada_prompt_fills_the_blank_from_one_shot_on() -> None:
    """Section 3.1.2: zero-shot is the plain passage; with examples, "Fill in blank:" (figure G.21) and
    each passage as "context ____. -> word", one blank line apart, as the paper joins its examples."""
    spec, (doc, contexts, _) = TASKS["lambada_openai"], APPENDIX_G["lambada_openai"]
    example = {"text": "Alice was friends with Bob. Alice went to visit her friend Bob"}
    zero = build(spec, [doc], [], 0)
    assert zero.prefixes == [""] and zero.items[0].contexts == (_TORCH,)
    one = build(spec, [doc], [example], 1)
    want = "Fill in blank:\n\nAlice was friends with Bob. Alice went to visit her friend ____. -> Bob\n\n"
    assert one.prefixes == [want] and one.items[0].contexts == tuple(contexts)
    assert build(spec, [doc], [example], 1, style="lm-eval").prefixes == [
        "Alice was friends with Bob. Alice went to visit her friend  Bob\n\n"  # lm-eval's two spaces
    ]


def test_hub_rows_convert_to_the_distributed_records() -> None:
    for task, source in SOURCES.items():
        spec = TASKS[task]
        for split in ("test", "train"):
            docs, rows = load_split(task, split, FIXTURES), hub_rows(task, split)
            for doc, row in zip(docs, rows, strict=True):
                for style in ("paper", "lm-eval"):
                    assert spec.format(source.from_hub(row), style, True) == spec.format(doc, style, True)


def test_triviaqa_normalised_exact_match() -> None:
    assert normalize_answer("The  Marcel_Duchamp!") == "marcel duchamp"
    assert exact_match(" the Red Planet.", ("Mars", "The Red Planet"))
    assert not exact_match("Duchamp, Marcel", ("Marcel Duchamp",))
    assert exact_match("an apple", ("Apple",)) and not exact_match("apples", ("Apple",))


def test_missing_data_says_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MissingDataError, match=r"rowanz/hellaswag.*hellaswag_val.jsonl below .*/hellaswag/"):
        load_split("hellaswag", "test", tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "dev.jsonl").write_text("{}\n")
    (tmp_path / "b" / "dev.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="put this task's files under"):
        load_split("boolq", "test", tmp_path)
    from gptlab.cli import main

    assert main(["eval", "suite", "ckpt", "--tasks", "piqa", "--data", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "valid.jsonl and valid-labels.lst below" in err and "yonatanbisk.com/piqa" in err
    assert main(["eval", "suite", "ckpt", "--tasks", "mmlu", "--no-progress"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err


def test_cli_suite_writes_table_json_and_plots(hf_dir: Path, ours, tmp_path: Path, capsys) -> None:
    from gptlab.checkpoint import save_model
    from gptlab.cli import main
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    model, tok = ours
    torch.manual_seed(1)
    small = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=1024, vocab_size=50257))
    save_model(small, tmp_path / "small", tokenizer=tok)
    out = tmp_path / "suite"
    args = ["eval", "suite", str(hf_dir), str(tmp_path / "small"), "--tasks", "piqa,lambada_openai,triviaqa",
            "--shots", "0,2", "--data", str(FIXTURES), "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert [(x["task"], x["shots"]) for x in r["results"][:6]] == [
        ("piqa", 0), ("piqa", 2), ("lambada_openai", 0), ("lambada_openai", 2), ("triviaqa", 0), ("triviaqa", 2)
    ]
    for row in r["results"][:6]:
        ref = evaluate_suite_task(model, tok, row["task"], row["shots"], data=FIXTURES)
        assert row["value"] == pytest.approx(ref["value"]) and row["metric"] == ref["metric"]
        assert row["stderr"] == pytest.approx(ref["stderr"] if ref["stderr"] is not None else None)
    lam = r["results"][2]["metrics"]
    lls = [d["loglikelihoods"][0] for d in r["results"][2]["items"]]
    assert lam["ppl"] == pytest.approx(math.exp(-sum(lls) / len(lls)))
    table = (out / "results.md").read_text()
    assert table in printed and "| piqa | acc_token | 5 |" in table and "| lambada_openai | ppl | 7 |" in table
    for png in ("accuracy_vs_shots.png", "accuracy_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_offline_path_a_local_hub_snapshot_converted_then_scored(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's GPT-2 124M command without the hub: a directory as `save_pretrained` (and the hub's
    openai-community/gpt2) holds it, `gptlab convert --from-hf`, then `gptlab eval suite`; LAMBADA's
    perplexity and accuracy recomputed with transformers' own model and tokenizer."""
    transformers = pytest.importorskip("transformers")
    from gptlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {f.name for f in hf_dir.iterdir()}
    ckpt, out = tmp_path / "gpt2-124m", tmp_path / "suite"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(ckpt)]) == 0
    assert main(["eval", "suite", str(ckpt), "--tasks", "lambada_openai,hellaswag", "--shots", "0",
                 "--data", str(FIXTURES), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rows = {r["task"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    lls, greedy = [], []
    for doc in load_split("lambada_openai", "test", FIXTURES):
        context, word = doc["text"].rsplit(" ", 1)
        ctx_ids, ids = hf_tok(context)["input_ids"], hf_tok(context + " " + word)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].double(), -1)
        targets = torch.tensor(ids[len(ctx_ids):])
        scored = logp[len(ctx_ids) - 1 :]
        lls.append(scored.gather(1, targets[:, None]).sum().item())
        greedy.append(float(bool((scored.argmax(-1) == targets).all())))
    lam = rows["lambada_openai"]["metrics"]
    assert lam["ppl"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert lam["acc"] == sum(greedy) / len(greedy)
    assert rows["hellaswag"]["metric"] == "acc_token" and rows["hellaswag"]["n"] == 6


def test_readme_hub_command_takes_weights_and_tokenizer_from_one_snapshot(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gptlab eval suite openai-community/gpt2 ...`: the hub id is downloaded once (here: the download
    answers with a local save_pretrained directory) and the tokenizer is read from the same snapshot."""
    import gptlab.interop.hf
    from gptlab.cli import main

    asked = []
    monkeypatch.setattr(gptlab.interop.hf, "download", lambda name: asked.append(name) or hf_dir)
    monkeypatch.chdir(tmp_path)  # no local directory may shadow the hub id
    out = tmp_path / "suite"
    assert main(["eval", "suite", "openai-community/gpt2", "--tasks", "lambada_openai", "--shots", "0",
                 "--data", str(FIXTURES), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert asked == ["openai-community/gpt2"]
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["checkpoint"] == "openai-community/gpt2" and row["n"] == 7


def test_load_tokenizer_takes_a_hub_name_like_load_model(hf_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`gptlab eval perplexity / fewshot openai-community/gpt2` read the tokenizer from the hub snapshot."""
    import gptlab.interop.hf
    from gptlab.checkpoint import load_tokenizer
    from gptlab.tokenizer import Tokenizer

    monkeypatch.setattr(gptlab.interop.hf, "download", lambda name: hf_dir)
    monkeypatch.chdir(tmp_path)
    got = load_tokenizer("openai-community/gpt2")
    assert got.encode("hello world") == Tokenizer.from_pretrained(hf_dir).encode("hello world")


# ---- during training ---------------------------------------------------------------------------------
def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_eval_tasks_every_interval_logged_plotted_and_reported(
    tiny_tokenizer, tiny_corpus: list[str], tmp_path: Path
) -> None:
    from gptlab.checkpoint import load_model
    from gptlab.data.prepare import prepare
    from gptlab.reports.run_report import write_report
    from gptlab.train.config import load_train_config
    from gptlab.train.pretrain import pretrain

    files = []
    for i, text in enumerate(tiny_corpus):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    tiny_tokenizer.save(tmp_path / "tok")
    prepare(files, tmp_path / "ds", tiny_tokenizer, val_fraction=0.25, progress=False)
    run = tmp_path / "run"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    cfg = load_train_config(None, {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.n_ctx": 128,
        "data.dataset": str(tmp_path / "ds"), "data.tokenizer": str(tmp_path / "tok"), "data.seq_len": 32,
        "train.batch_size": 4, "train.max_steps": 6,
        "train.eval_interval": 3, "train.eval_batches": 1, "train.log_interval": 2, "train.progress": False,
        "train.run_dir": str(run), "train.dtype": "float32", "train.threads": 1, "train.tensorboard": tensorboard,
        "train.eval_tasks": "piqa,lambada_openai", "train.eval_tasks_data": str(FIXTURES),
        "train.eval_tasks_items": 3, "train.eval_tasks_shots": 1,
    })  # fmt: skip
    assert cfg.train.eval_tasks == ["piqa", "lambada_openai"]
    pretrain(cfg)
    scored = [r for r in _rows(run) if "eval/piqa" in r]
    assert [r["step"] for r in scored] == [3, 6]
    assert all({"eval/lambada_openai", "eval/lambada_openai_ppl"} <= set(r) for r in scored)
    # the last scores are those of the final weights, on the first 3 items with the same 1-shot prompts
    model = load_model(run)
    for task, key in (("piqa", "eval/piqa"), ("lambada_openai", "eval/lambada_openai_ppl")):
        ref = evaluate_suite_task(model, tiny_tokenizer, task, 1, data=FIXTURES, limit=3)
        want = ref["metrics"]["ppl"] if key.endswith("_ppl") else ref["value"]
        assert scored[-1][key] == pytest.approx(want, rel=1e-4)
    assert scored[0]["eval/lambada_openai_ppl"] != scored[-1]["eval/lambada_openai_ppl"]  # the weights moved
    assert (run / "eval_tasks.png").read_bytes()[:4] == b"\x89PNG"
    report = write_report(run, sample=False).read_text()
    assert "| eval/piqa |" in report and "report_eval_tasks.png" in report
    if not tensorboard:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in events.Tensors("eval/piqa")] == [3, 6]


def test_finetune_eval_tasks_flag(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gptlab.cli import main

    train = tmp_path / "sft.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Q: {i}+1?\nA:", "completion": f" {i + 1}"}) + "\n"
                             for i in range(8)))  # fmt: skip
    out = tmp_path / "ft"
    args = ["finetune", "--task", "sft", "--base", str(hf_dir), "--train", str(train), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--eval-interval", "1", "--eval-tasks", "winogrande",
            "--eval-tasks-data", str(FIXTURES), "--eval-tasks-items", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    rows = [r for r in _rows(out / "train") if "eval/winogrande" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["eval/winogrande"] <= 1 for r in rows)
    bad = [a if a != "winogrande" else "mmlu" for a in args]
    assert main(bad) == 2 and "unknown task 'mmlu'" in capsys.readouterr().err


@pytest.mark.parametrize(("task", "shots"), [("hellaswag", 3), ("piqa", 3), ("boolq", 3), ("arc_easy", 3),
                                           ("lambada_openai", 1), ("lambada_openai", 3), ("triviaqa", 3)])
def test_lm_eval_style_few_shot_prompts_and_scores_equal_lm_eval(task: str, shots: int, lm_eval_env, hf_dir: Path,
                                                                 ours, tmp_path: Path) -> None:  # fmt: skip
    """lm-eval's sampler drawn the same way: its few-shot contexts are ours, and so are the scores (tasks
    whose config scores validation draw K + 1 and keep K; ARC scores test and draws K; LAMBADA draws
    from the scored split less the item). LAMBADA's examples keep lm-eval's two spaces before the last
    word (its text, target_delimiter " ", then the target " word"); TriviaQA's show the first alias."""
    import lm_eval.models.huggingface  # noqa: F401
    from lm_eval.tasks import TaskManager

    tasks_dir = write_lm_eval_tasks(tmp_path)
    run = lm_eval_env.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=[task], device="cpu",
        batch_size=4, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        num_fewshot=shots, log_samples=True, bootstrap_iters=10,
    )  # fmt: skip
    model, tok = ours
    mine = evaluate_suite_task(model, tok, task, shots, data=FIXTURES, style="lm-eval")
    samples = _samples(run, task)
    if task == "lambada_openai":
        assert all("  " in d["prompt"] for d in mine["items"])  # the two spaces are in every prompt
    if task == "triviaqa":
        assert [s["arguments"][0][0] for s in samples] == [d["prompt"] for d in mine["items"]]
        assert [s["resps"][0][0] for s in samples] == [d["completion"] for d in mine["items"]]
        return
    for sample, d in zip(samples, mine["items"], strict=True):
        assert d["prompt"] in {a[0] for a in sample["arguments"]}
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert lls == pytest.approx(d["loglikelihoods"], abs=2e-4)
    assert run["results"][task]["acc,none"] == pytest.approx(mine["metrics"]["acc"])
    if task == "lambada_openai":
        assert run["results"][task]["perplexity,none"] == pytest.approx(mine["metrics"]["ppl"], rel=1e-4)


def test_paper_style_triviaqa_answers_by_beam_search(ours) -> None:
    """GPT-3 section 2.4: free-form answers by beam search, width 4, length penalty 0.6 (lm-eval: greedy)."""
    from gptlab.infer.generate import generate

    model, tok = ours
    for style, beams in (("paper", dict(num_beams=4, length_penalty=0.6)), ("lm-eval", {})):
        r = evaluate_suite_task(model, tok, "triviaqa", 1, data=FIXTURES, style=style)
        prompts = [d["prompt"] for d in r["items"]]
        want = generate(model, tok, prompts, temperature=0, max_new_tokens=MAX_ANSWER_TOKENS,
                        stop=list(TASKS["triviaqa"].stop(style)), **beams)  # fmt: skip
        assert [d["completion"] for d in r["items"]] == [c.text for c in want]
