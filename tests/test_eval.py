"""Evaluation: task files, few-shot prompts, log-likelihood and perplexity against transformers computed
directly (a tiny random GPT-2 with GPT-2's real tokenizer), the CLI, and the lm-evaluation-harness
adapter against `gptlab eval fewshot` and lm-eval's own Hugging Face backend."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from gptlab.eval import (
    Task,
    TaskItem,
    accuracy_stderr,
    evaluate_task,
    greedy_until,
    load_task,
    loglikelihood,
    make_example_tasks,
    perplexity,
    sliding_windows,
    write_task,
)
from gptlab.eval.fewshot import build_prompts

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples/tasks"
N_CTX = 48

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's a truth universally acknowledged that a single man "
    "in possession of a good fortune must be in want of a wife. Numbers: 3.14159, 2718 and 42! Unicode: "
    "naïve café, Straße, 東京. " * 2
)


# ---- fixtures: a tiny random Hugging Face GPT-2 saved with GPT-2's tokenizer ---------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_bpe_dir: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    shutil.copy(gpt2_bpe_dir / "encoder.json", directory / "vocab.json")
    shutil.copy(gpt2_bpe_dir / "vocab.bpe", directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def hf(hf_dir: Path):
    """(transformers model, transformers tokenizer): the independent reference."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    return model, transformers.GPT2Tokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ours(hf_dir: Path, gpt2_tokenizer):
    from gptlab.checkpoint import load_model

    return load_model(hf_dir), gpt2_tokenizer


def hf_loglikelihood(hf, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's rule written out with transformers' tokenizer and model, one unpadded request at a time."""
    model, tok = hf
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if context:
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx) :]
    else:  # lm-eval conditions on the end-of-text token
        ctx, cont = [tok.eos_token_id], tok.encode(continuation)
    seq = (ctx + cont)[-(N_CTX + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0, -len(cont) :]
    lp = logits.log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum()
    return float(lp), bool((logits.argmax(-1) == torch.tensor(cont)).all())


def hf_guide_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, verbatim apart from counting the tokens each loss averages."""
    enc = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, enc.size(1), stride):
        end = min(begin + max_length, enc.size(1))
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == enc.size(1):
            break
    return nll, count


# ---- task files ----------------------------------------------------------------------------------
def test_committed_example_tasks_are_the_generators_output(tmp_path: Path) -> None:
    paths = make_example_tasks(tmp_path)
    assert {p.name for p in paths} == {p.name for p in EXAMPLES.glob("*.jsonl")}
    for p in paths:
        assert p.read_bytes() == (EXAMPLES / p.name).read_bytes(), f"regenerate {EXAMPLES / p.name}"
    kinds = {load_task(p).kind for p in paths}
    assert kinds == {"multiple_choice", "cloze", "generation"}
    for p in paths:
        task = load_task(p)
        assert len(task.train) == 16 and len(task.test) == 40
        assert len({i.key() for i in task.train + task.test}) == 56 or task.kind == "multiple_choice"
    add = load_task(EXAMPLES / "arithmetic_2digit.jsonl")
    for item in add.test:
        a, b = map(int, item.context.removeprefix("Q: What is ").split("?")[0].split(" plus "))
        assert int(item.target) == a + b
    assert make_example_tasks(tmp_path / "other", seed=7)[0].read_bytes() != paths[0].read_bytes()


def test_task_round_trip_and_format_errors(tmp_path: Path) -> None:
    task = Task("t", "multiple_choice", description="Pick one.")
    task.train = [TaskItem("Q1?", "train", ("a", "b"), 1)]
    task.test = [TaskItem("Q2?", "test", ("c", "d", "e"), 2)]
    loaded = load_task(write_task(tmp_path / "t.jsonl", task))
    assert (loaded.train, loaded.test, loaded.description) == (task.train, task.test, "Pick one.")

    def bad(*lines: str) -> str:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError) as e:
            load_task(path)
        assert "bad.jsonl" in str(e.value)
        return str(e.value)

    assert "bad.jsonl:2" in bad('{"kind": "cloze", "context": "a", "target": "b"}', "{not json")
    assert "gold" in bad('{"kind": "multiple_choice", "context": "a", "choices": ["x", "y"], "gold": 2}')
    assert "kind" in bad('{"context": "a", "target": "b"}')
    assert "one kind per file" in bad(
        '{"kind": "cloze", "context": "a", "target": "b"}',
        '{"kind": "generation", "context": "a", "target": "b"}',
    )
    assert "no test items" in bad('{"kind": "cloze", "split": "train", "context": "a", "target": "b"}')
    assert "unknown fields" in bad('{"kind": "cloze", "context": "a", "answer": "b"}')
    assert "first line" in bad('{"kind": "cloze", "context": "a", "target": "b"}', '{"task": {"name": "x"}}')
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_task(tmp_path / "missing.jsonl")


def test_fewshot_prompts_draw_train_examples_never_the_item_itself() -> None:
    train = [TaskItem(f"Q{i}:", "train", target=f"A{i}") for i in range(6)]
    test = [TaskItem("Q0:", "test", target="A0"), TaskItem("Q9:", "test", target="A9")]  # Q0 also in train
    task = Task("t", "cloze", train, test, description="Answer.")
    assert build_prompts(task, 0, seed=1) == ["Answer.\n\nQ0:", "Answer.\n\nQ9:"]
    for seed in range(30):
        first, second = build_prompts(task, 5, seed)
        assert "Q0: A0" not in first and first.count("\n\n") == 6 and first.endswith("\n\nQ0:")
        shown = [line for line in second.split("\n\n")[1:-1]]
        assert len(set(shown)) == 5 and all(s in {f"Q{i}: A{i}" for i in range(6)} for s in shown)
    assert build_prompts(task, 3, seed=4) == build_prompts(task, 3, seed=4)
    assert build_prompts(task, 3, seed=4)[:1] == build_prompts(task, 3, seed=4, limit=1)  # same draws
    assert len({build_prompts(task, 3, seed=s)[1] for s in range(10)}) > 1
    with pytest.raises(ValueError, match="fewer than the 6 shots"):
        build_prompts(task, 6, seed=0)  # item Q0 leaves 5 usable train items


def test_accuracy_stderr_is_the_sample_standard_error() -> None:
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert accuracy_stderr(scores) == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)))
    assert accuracy_stderr([1.0]) is None


# ---- scoring against transformers ----------------------------------------------------------------
def test_loglikelihood_matches_transformers(ours, hf) -> None:
    model, tok = ours
    long_context = "one two three four five six seven eight nine ten " * 8  # > N_CTX tokens: truncated
    requests = [
        ("Question: Which of these is an animal: chair, tiger?\nAnswer:", " tiger"),
        ("Question: Which of these is an animal: chair, tiger?\nAnswer:", " chair"),
        ("The opposite of hot is ", "cold"),  # trailing space moves into the continuation
        ("Straße in 東京", " naïve café"),
        (long_context, " eleven twelve"),
        ("x", "\n\nQ: What is 12 plus 34?"),
        ("", "Hello world"),
        (" ", "Hello"),
    ]
    got = loglikelihood(model, tok, requests, batch_size=4)  # mixed lengths: right padding in a batch
    for (context, continuation), (ll, greedy) in zip(requests, got, strict=True):
        ref_ll, ref_greedy = hf_loglikelihood(hf, context, continuation)
        assert ll == pytest.approx(ref_ll, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy
    model.train()  # scoring switches dropout off and restores the mode
    unbatched = loglikelihood(model, tok, requests, batch_size=1)
    assert model.training
    model.eval()
    assert [ll for ll, _ in unbatched] == pytest.approx([ll for ll, _ in got], abs=1e-4)

    # a continuation equal to the model's own greedy tokens is "greedy"
    hf_model, hf_tok = hf
    prompt = hf_tok.encode("The cat sat on the")
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = out[0, len(prompt) :].tolist()
    assert loglikelihood(model, tok, [(tok.decode(prompt), tok.decode(ids))])[0][1] == (
        tok.encode(tok.decode(prompt) + tok.decode(ids))[len(prompt) :] == ids
    )


@pytest.mark.parametrize(
    ("max_length", "stride", "prepend_eot"), [(N_CTX, 16, True), (32, 32, False), (24, 7, True)]
)
def test_perplexity_matches_hugging_face_guide(
    ours, hf, max_length: int, stride: int, prepend_eot: bool
) -> None:
    model, tok = ours
    r = perplexity(model, tok, [TEXT], max_length=max_length, stride=stride, prepend_eot=prepend_eot)
    ids = hf[1].encode(TEXT)
    assert len(ids) > 2 * N_CTX
    ref_nll, ref_count = hf_guide_nll(
        hf[0], ([hf[1].eos_token_id] if prepend_eot else []) + ids, max_length, stride
    )
    assert r.tokens == ref_count
    assert r.nll_sum == pytest.approx(ref_nll, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(ref_nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    if prepend_eot and stride < max_length:
        assert r.tokens == len(ids)  # every token scored exactly once


def test_sliding_windows_score_each_token_once() -> None:
    for n in (2, 5, 17, 64):
        for max_length in (2, 3, 8, 16):
            for stride in range(1, max_length + 1):
                windows = sliding_windows(n, max_length, stride)
                scored = [t for b, e, k in windows for t in range(e - k, e)]
                assert len(scored) == len(set(scored)) and 0 not in scored
                assert all(e - b <= max_length and k <= e - b - 1 for b, e, k in windows)
                if stride < max_length:
                    assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


# ---- task evaluation -----------------------------------------------------------------------------
def test_evaluate_multiple_choice_cloze_and_generation(ours, hf) -> None:
    model, tok = ours
    mc = load_task(EXAMPLES / "animals_mc.jsonl")
    r = evaluate_task(model, tok, mc, shots=1, seed=3, limit=5)
    assert r["n"] == 5 and len(r["items"]) == 5
    for item, d in zip(mc.test, r["items"], strict=False):
        ref = [hf_loglikelihood(hf, d["prompt"], " " + c)[0] for c in item.choices]
        assert d["loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        assert d["prediction"] == max(range(len(ref)), key=ref.__getitem__)
        norm = [ll / len(c) for ll, c in zip(ref, item.choices, strict=True)]
        assert d["prediction_norm"] == max(range(len(ref)), key=norm.__getitem__)
    acc = [d["acc"] for d in r["items"]]
    assert r["metrics"]["acc"] == sum(acc) / 5 and r["metrics"]["acc_stderr"] == accuracy_stderr(acc)

    # generation and cloze: items whose target is transformers' greedy completion are right, others wrong
    hf_model, hf_tok = hf
    prompts = ["Q: What is 12 plus 34?\nA:", "The cat sat on the", "one, two, three,", "Monday, Tuesday,"]
    greedy = []
    for p in prompts:
        ids = hf_tok.encode(p)
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy.append(hf_tok.decode(out[0, len(ids) :]))
    assert greedy_until(model, tok, prompts, [[]] * 4, [4] * 4, batch_size=3) == greedy
    items = [
        TaskItem(p, target=g if i % 2 == 0 else g + "x")
        for i, (p, g) in enumerate(zip(prompts, greedy, strict=True))
    ]
    gen = evaluate_task(model, tok, Task("g", "generation", test=items, target_delimiter="", max_tokens=4))
    assert [d["acc"] for d in gen["items"]] == [1.0, 0.0, 1.0, 0.0]
    assert gen["metrics"]["acc"] == 0.5 and gen["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    cloze = evaluate_task(model, tok, Task("c", "cloze", test=items, target_delimiter=""))
    expected = [float(hf_loglikelihood(hf, i.context, i.target)[1]) for i in items]
    assert [d["acc"] for d in cloze["items"]] == expected and expected[0] == 1.0 and expected[1] == 0.0


def test_cli_perplexity_and_fewshot(
    hf_dir: Path, ours, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from gptlab.cli import main

    model, tok = ours
    data = [tmp_path / "a.txt", tmp_path / "b.txt"]
    data[0].write_text(TEXT, encoding="utf-8")
    data[1].write_text("Short one.\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    args = ["eval", "perplexity", str(hf_dir), "--data", *map(str, data), "--stride", "20", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    ref = perplexity(model, tok, [TEXT, "Short one.\n"], max_length=N_CTX, stride=20)
    assert (r["tokens"], r["stride"], r["max_length"]) == (ref.tokens, 20, N_CTX)
    assert r["nll"] == pytest.approx(ref.nll) and r["perplexity"] == pytest.approx(ref.perplexity)
    assert r["bits_per_byte"] == pytest.approx(ref.bits_per_byte)
    assert [f["file"] for f in r["files"]] == list(map(str, data))

    out = tmp_path / "few.json"
    task = EXAMPLES / "last_word_cloze.jsonl"
    args = [
        "eval",
        "fewshot",
        str(hf_dir),
        "--task",
        str(task),
        "--shots",
        "2",
        "--limit",
        "4",
        "--seed",
        "5",
    ]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert (r["kind"], r["shots"], r["n"]) == ("cloze", 2, 4)
    assert r["items"][0]["prompt"] == build_prompts(load_task(task), 2, seed=5)[0]
    assert r["items"][0]["prompt"].count("\n\n") == 2
    assert "last_word_cloze (cloze, 2-shot, n=4): acc" in capsys.readouterr().out

    assert main(["eval", "fewshot", str(hf_dir), "--task", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert main(["eval", "perplexity", str(hf_dir), "--data", str(data[0]), "--stride", "99"]) == 2
    assert "stride" in capsys.readouterr().err


# ---- lm-evaluation-harness ----------------------------------------------------------------------
def _small_task(tmp_path: Path, source: str, n: int) -> Path:
    task = load_task(EXAMPLES / source)
    task.test = task.test[:n]
    return write_task(tmp_path / source, task)


def test_lm_eval_harness_agrees_with_gptlab_fewshot(lm_eval_env, hf_dir: Path, ours, hf, tmp_path) -> None:
    """The same items through lm-eval (its task machinery, our model type) and `gptlab eval fewshot`;
    per-choice log-likelihoods also checked against transformers."""
    from lm_eval.tasks import TaskManager

    from gptlab.eval.lm_eval_adapter import write_lm_eval_task

    model, tok = ours
    sources = [("antonyms_mc.jsonl", 8), ("last_word_cloze.jsonl", 4), ("arithmetic_2digit.jsonl", 4)]
    files = [_small_task(tmp_path, source, n) for source, n in sources]
    for f in files:
        write_lm_eval_task(f, tmp_path / "lm_eval_tasks")
    mc, cloze, gen = (load_task(f) for f in files)
    run = lm_eval_env.simple_evaluate(
        model="gptlab",
        model_args={"pretrained": str(hf_dir), "batch_size": 4},
        tasks=[mc.name, cloze.name, gen.name],
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks"), include_defaults=False),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=10,
    )
    results = run["results"]

    mine = evaluate_task(model, tok, mc)
    assert results[mc.name]["acc,none"] == pytest.approx(mine["metrics"]["acc"])
    assert results[mc.name]["acc_norm,none"] == pytest.approx(mine["metrics"]["acc_norm"])
    assert results[mc.name]["acc_stderr,none"] == pytest.approx(mine["metrics"]["acc_stderr"])
    samples = sorted(run["samples"][mc.name], key=lambda s: s["doc_id"])
    for sample, item, d in zip(samples, mc.test, mine["items"], strict=True):
        assert sample["arguments"][0][0] == d["prompt"]
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert lls == pytest.approx(d["loglikelihoods"], abs=1e-5)
        assert lls == pytest.approx(
            [hf_loglikelihood(hf, d["prompt"], " " + c)[0] for c in item.choices], abs=1e-4
        )
    assert len({d["prediction"] for d in mine["items"]}) > 1  # not a constant answer

    mine = evaluate_task(model, tok, cloze)
    samples = sorted(run["samples"][cloze.name], key=lambda s: s["doc_id"])
    assert [s["arguments"][0] for s in samples] == [(d["prompt"], " " + d["target"]) for d in mine["items"]]
    assert results[cloze.name]["acc,none"] == pytest.approx(mine["metrics"]["acc"])
    assert results[cloze.name]["perplexity,none"] == pytest.approx(mine["metrics"]["perplexity"], rel=1e-5)

    mine = evaluate_task(model, tok, gen)
    assert results[gen.name]["exact_match,strip"] == pytest.approx(mine["metrics"]["acc"])
    samples = sorted(run["samples"][gen.name], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [d["completion"] for d in mine["items"]]


def test_lm_eval_adapter_rolling_and_generation(lm_eval_env, hf_dir: Path, ours, hf) -> None:
    from lm_eval.api.registry import get_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = ours
    lm = get_model("gptlab").create_from_arg_string(f"pretrained={hf_dir},batch_size=3")

    class Req:
        def __init__(self, *args):
            self.args = args

    short = "The quick brown fox jumps over the lazy dog."
    rolled = lm.loglikelihood_rolling([Req(short), Req(TEXT)], disable_tqdm=True)
    assert rolled[0] == pytest.approx(-perplexity(model, tok, [short]).nll_sum, abs=1e-4)  # one window
    # TEXT is longer than the window: lm-eval's rolling windows, scored with transformers
    hf_model, hf_tok = hf
    reference = 0.0
    for window in get_rolling_token_windows(hf_tok.encode(TEXT), hf_tok.eos_token_id, N_CTX, 1):
        context, pred = make_disjoint_window(window)
        seq = context + pred
        with torch.no_grad():
            logits = hf_model(torch.tensor([seq[:-1]])).logits[0, -len(pred) :]
        reference += float(logits.log_softmax(-1).gather(1, torch.tensor(pred)[:, None]).sum())
    assert rolled[1] == pytest.approx(reference, abs=1e-3)

    prompts = ["Q: What is 12 plus 34?\nA:", "one, two, three,"]
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    got = lm.generate_until([Req(p, gen_kwargs) for p in prompts], disable_tqdm=True)
    assert got == greedy_until(model, tok, prompts, [["\n"]] * 2, [5, 5])
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Req("x", {"do_sample": True, "temperature": 0.7})])
