"""Fine-tuning: data validation, LoRA, classification head, the fine-tuning Tasks on the one loop,
and acceptance runs on synthetic data (sentiment >= 95%, word reversal >= 90% exact match)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_model, load_tokenizer, save_model
from gptlab.config import ModelConfig
from gptlab.finetune import data as D
from gptlab.finetune.heads import SequenceClassifier
from gptlab.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    model_fingerprint,
    save_adapter,
    trainable_parameters,
)
from gptlab.finetune.metrics import macro_f1
from gptlab.finetune.runner import FinetuneConfig, finetune
from gptlab.model import GPT
from gptlab.presets import preset

QUIET = {"train.tensorboard": "false"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only contend on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_gpt(vocab_size: int, n_embd: int = 32, n_ctx: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        ModelConfig(n_layer=2, n_head=max(1, n_embd // 16), n_embd=n_embd, n_ctx=n_ctx, vocab_size=vocab_size)
    )


# ---- synthetic data -------------------------------------------------------------------------------
POSITIVE = "good great excellent wonderful superb lovely brilliant fantastic".split()
NEGATIVE = "bad awful terrible horrible dreadful poor boring nasty".split()
NOUNS = "movie film book meal show song game trip".split()
TEMPLATES = ["the {n} was {a}", "what a {a} {n}", "i found the {n} {a}", "{a} {n} overall", "a truly {a} {n}"]


def sentiment(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = rng.choice(TEMPLATES).format(n=rng.choice(NOUNS), a=adjective)
        out.append({"text": text, "label": label})
    return out


def reverse_record(word: str) -> dict:
    return {"prompt": f"reverse {word}:", "completion": " " + word[::-1]}


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    return write_jsonl(root / "train.jsonl", sentiment(600, rng)), write_jsonl(
        root / "val.jsonl", sentiment(200, rng)
    )


@pytest.fixture(scope="module")
def sentiment_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised 2 x 64 GPT with the tiny tokenizer (no pretraining)."""
    return save_model(
        tiny_gpt(tiny_tokenizer.vocab_size, n_embd=64), tmp_path_factory.mktemp("b") / "base", tiny_tokenizer
    )


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory, sentiment_base, sentiment_files):
    train, val = sentiment_files
    out = tmp_path_factory.mktemp("sentiment_run") / "out"
    began = time.process_time()
    result = finetune(
        FinetuneConfig(
            task="classification",
            base=str(sentiment_base),
            train_file=str(train),
            val_file=str(val),
            out=str(out),
            epochs=10,
            lr=1e-3,
            batch_size=32,
            progress=False,
            train_overrides=QUIET,
        )
    )
    return result, time.process_time() - began


# ---- data -----------------------------------------------------------------------------------------
def test_jsonl_errors_name_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "p"}, "", {"text": "y"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:3: missing field\(s\) \['label'\]"):
        D.load_classification(f)
    f = write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 1}, "{not json"])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid JSON"):
        D.load_classification(f)
    f = write_jsonl(tmp_path / "c.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: expected a JSON object"):
        D.load_sft(f)
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": True}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: 'label' must be a string or an integer"):
        D.load_classification(f)
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": "a"}])
    with pytest.raises(ValueError, match=r"e\.jsonl mixes string and integer labels .*e\.jsonl:2"):
        D.load_classification(f)
    f = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "completion": ""}])
    with pytest.raises(ValueError, match=r"f\.jsonl:1: field 'completion' is empty"):
        D.load_sft(f)
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": 3, "completion": "c"}])
    with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'prompt' must be a string"):
        D.load_sft(f)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        D.load_sft(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        D.load_sft(tmp_path / "missing.jsonl")


def test_label_set_is_sorted_and_strictly_typed():
    ex = [D.ClassificationExample("t", label, "f:1") for label in (2, 0, 1, 0)]
    labels = D.LabelSet.from_examples(ex)
    assert labels.labels == [0, 1, 2] and labels.index(2) == 2
    with pytest.raises(ValueError, match=r"unknown label '1'.*integers: write 1 without quotes"):
        labels.index("1", "val.jsonl:4")
    with pytest.raises(ValueError, match=r"val\.jsonl:4: unknown label 7"):
        labels.index(7, "val.jsonl:4")
    words = D.LabelSet(["neg", "pos"])
    with pytest.raises(ValueError, match="unknown label 'neutral'"):
        words.index("neutral")
    with pytest.raises(ValueError, match=r"only the label \[.a.\]; a classifier needs 2"):
        D.LabelSet.from_examples([D.ClassificationExample("t", "a", "f:1")], "train.jsonl")


def test_sft_targets_cover_completion_and_eot_only(byte_tokenizer):
    tok = byte_tokenizer
    ((x, y),) = D.encode_sft([D.SFTExample("reverse abc:", " cba", "f:1")], tok, n_ctx=64)
    full = tok.encode("reverse abc:") + tok.encode(" cba") + [tok.eot_id]
    assert x == full[:-1]
    n_prompt = len(tok.encode("reverse abc:"))
    assert y == [-1] * (n_prompt - 1) + tok.encode(" cba") + [tok.eot_id]
    batch = D.sft_batch([(x, y), (x[:3], y[:3])], pad_id=tok.eot_id)
    assert batch["idx"].shape == batch["targets"].shape == (2, len(x))
    assert (batch["targets"][1, 3:] == -1).all()
    with pytest.raises(ValueError, match=r"f:1: the prompt is \d+ tokens"):
        D.encode_sft([D.SFTExample("x" * 40, "y", "f:1")], tok, n_ctx=16)
    with pytest.warns(UserWarning, match="exceed the context of 16"):
        ((x, y),) = D.encode_sft([D.SFTExample("ab", "y" * 40, "f:1")], tok, n_ctx=16)
    assert len(x) == len(y) == 16


def test_macro_f1_by_hand():
    # class 0: tp 1, fp 1, fn 1 -> F1 2/4; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: never seen -> 0
    assert macro_f1([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 3) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert macro_f1([1, 1], [1, 1], 2) == pytest.approx(0.5)


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 30)
        true = [rng.randrange(4) for _ in range(n)]
        pred = [rng.randrange(4) for _ in range(n)]
        want = sklearn_metrics.f1_score(true, pred, average="macro", labels=list(range(4)), zero_division=0)
        assert macro_f1(pred, true, 4) == pytest.approx(want)


# ---- classification head --------------------------------------------------------------------------
def test_classifier_head_matches_transformers_and_ignores_padding():
    transformers = pytest.importorskip("transformers")
    from gptlab.interop.hf import gptlab_state_dict_to_hf, model_config_to_hf_config

    trunk = tiny_gpt(100)
    clf = SequenceClassifier(trunk, 3).eval()
    with torch.no_grad():
        clf.head.bias.zero_()  # HF's score layer has no bias
    pad = 99
    hf_config = transformers.GPT2Config(
        **{**model_config_to_hf_config(trunk.config), "pad_token_id": pad}, num_labels=3
    )
    hf = transformers.GPT2ForSequenceClassification(hf_config).eval()
    state = {k.removeprefix("transformer."): v for k, v in gptlab_state_dict_to_hf(trunk).items()}
    hf.transformer.load_state_dict(state, strict=False)
    hf.score.weight.data.copy_(clf.head.weight)
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    idx = D.pad_right(seqs, pad)
    lengths = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        ours = clf(idx, lengths)
        theirs = hf(input_ids=idx).logits
        alone = torch.cat([clf(torch.tensor([s])) for s in seqs])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-4)  # right padding changes nothing


# ---- LoRA -----------------------------------------------------------------------------------------
def test_lora_trains_under_two_percent_of_gpt2_small():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    total = model.num_params()
    names = apply_lora(model, LoRAConfig(rank=8, modules=["c_attn", "c_proj", "c_fc"]))
    trainable, all_params = trainable_parameters(model)
    c, r, L = 768, 8, 12
    per_layer = r * (
        (c + 3 * c) + (c + c) + (c + 4 * c) + (4 * c + c)
    )  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(names) == 4 * L
    assert trainable == L * per_layer == 1_179_648
    assert all_params == total + trainable
    assert trainable / total < 0.02  # 0.95%


def test_lora_merge_gives_identical_logits_and_only_adapters_train():
    model = tiny_gpt(100)
    idx = torch.randint(0, 100, (2, 12))
    base_logits, _ = model(idx)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, modules=["c_attn", "mlp.c_proj"]))
    assert all(isinstance(model.transformer.h[i].attn.c_attn, LoRALinear) for i in range(2))
    assert not isinstance(model.transformer.h[0].attn.c_proj, LoRALinear)  # 'mlp.c_proj' only
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
    }
    torch.testing.assert_close(model(idx)[0], base_logits)  # B = 0: starts exactly at the base
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.1)
    adapted = model(idx)[0].detach()
    assert (adapted - base_logits).abs().max() > 1e-2
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_gpt(100).state_dict())
    torch.testing.assert_close(model(idx)[0], adapted, atol=1e-5, rtol=0)


def test_lora_bad_config_and_target():
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(
        ValueError,
        match=r"LoRA target module 'q_proj' matches no Linear layer; available: "
        r"\['c_attn', 'c_fc', 'c_proj'\]",
    ):
        apply_lora(tiny_gpt(100), LoRAConfig(modules="q_proj"))


def test_adapter_checks_its_base(tmp_path):
    base = tiny_gpt(100, seed=0)
    fingerprint = model_fingerprint(base)
    apply_lora(base, LoRAConfig(rank=2))
    assert model_fingerprint(base) == fingerprint  # adapters are not part of the base
    save_adapter(base, tmp_path / "ad", LoRAConfig(rank=2), base.config.to_dict(), fingerprint)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad/adapter.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # the adapter only, never base weights
    load_adapter(tiny_gpt(100, seed=0), tmp_path / "ad")  # the same base: fine
    with pytest.raises(ValueError, match=r"fingerprint .* same shape, different weights"):
        load_adapter(tiny_gpt(100, seed=1), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"different model shape: n_embd=32 \(base has 64\)"):
        load_adapter(tiny_gpt(100, n_embd=64), tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_gpt(100), tmp_path)


# ---- the Task on the loop -------------------------------------------------------------------------
def test_task_batches_visit_every_example_once_per_epoch():
    from gptlab.finetune.tasks import ClassificationTask

    items = [([i + 1], i % 2) for i in range(10)]
    task = ClassificationTask(items, None, pad_id=0, seed=3, num_labels=2)
    for epoch in range(2):
        seen = [int(task.batch([epoch * 10 + i])["idx"][0, 0]) - 1 for i in range(10)]
        assert sorted(seen) == list(range(10))
    first = [int(task.batch([i])["idx"][0, 0]) for i in range(10)]
    second = [int(task.batch([10 + i])["idx"][0, 0]) for i in range(10)]
    assert first != second  # reshuffled each epoch
    again = ClassificationTask(items, None, pad_id=0, seed=3, num_labels=2)
    assert [int(again.batch([i])["idx"][0, 0]) for i in range(10)] == first  # deterministic (resume)


# ---- acceptance: sentiment classification --------------------------------------------------------
def test_sentiment_classification_reaches_95_percent(sentiment_run, sentiment_files):
    from gptlab.finetune.classify import Classifier

    result, cpu_seconds = sentiment_run
    assert result.metrics["val_accuracy"] >= 0.95, result.metrics
    assert result.metrics["val_macro_f1"] >= 0.95
    assert cpu_seconds < 120
    assert result.trainable_params == result.total_params  # full fine-tuning
    clf = Classifier.from_pretrained(result.out)
    assert clf.labels.labels == ["negative", "positive"]
    preds = clf.predict(["the film was awful", "a truly superb meal"])
    assert [p["label"] for p in preds] == ["negative", "positive"]
    for p in preds:
        assert set(p["probs"]) == {"negative", "positive"} and sum(p["probs"].values()) == pytest.approx(1.0)
    assert clf.evaluate(sentiment_files[1])["accuracy"] == pytest.approx(result.metrics["val_accuracy"])
    # The output is also a plain gptlab checkpoint (the trunk), and the run logged its metrics.
    assert isinstance(load_model(result.out), GPT)
    rows = [json.loads(line) for line in (result.out / "train/metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows)


def test_classify_cli_and_unknown_labels(sentiment_run, tmp_path, capsys):
    from gptlab.cli import main

    out = sentiment_run[0].out
    assert main(["classify", str(out), "what a lovely song", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["label"] == "positive" and row["probs"]["positive"] > 0.5
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"text": "a good film", "label": "positive"}, {"text": "meh", "label": "neutral"}],
    )
    assert main(["classify", str(out), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: unknown label 'neutral'" in err and "['negative', 'positive']" in err
    assert main(["classify", str(sentiment_run[0].out / "train")]) == 2  # no texts given
    assert "give TEXT arguments" in capsys.readouterr().err


def test_finetune_rejects_bad_files(sentiment_base, sentiment_files, tmp_path):
    train, _ = sentiment_files
    val = write_jsonl(
        tmp_path / "val.jsonl", [{"text": "fine", "label": "positive"}, {"text": "odd", "label": "unsure"}]
    )
    with pytest.raises(ValueError, match=r"val\.jsonl:2: unknown label 'unsure'"):
        finetune(
            FinetuneConfig(
                task="classification",
                base=str(sentiment_base),
                train_file=str(train),
                val_file=str(val),
                out=str(tmp_path / "o"),
                progress=False,
            )
        )
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        finetune(
            FinetuneConfig(
                task="sft",
                base=str(sentiment_base),
                train_file=str(tmp_path / "empty.jsonl"),
                out=str(tmp_path / "o"),
                progress=False,
            )
        )
    with pytest.raises(ValueError, match="needs a validation file"):
        FinetuneConfig(task="sft", base="b", train_file="t", patience=2)
    with pytest.raises(ValueError, match=r"unknown metric 'val_accuracy' for sft; choose one of"):
        FinetuneConfig(task="sft", base="b", train_file="t", metric="val_accuracy")


def test_early_stopping_on_a_plateau(sentiment_base, tmp_path):
    rng = random.Random(1)
    train = write_jsonl(tmp_path / "t.jsonl", sentiment(64, rng))
    val = write_jsonl(tmp_path / "v.jsonl", sentiment(32, rng))
    r = finetune(
        FinetuneConfig(
            task="classification",
            base=str(sentiment_base),
            train_file=str(train),
            val_file=str(val),
            out=str(tmp_path / "o"),
            max_steps=40,
            eval_interval=2,
            batch_size=8,
            lr=1e-9,
            patience=2,
            progress=False,
            train_overrides=QUIET,
        )
    )
    # lr ~ 0: accuracy never rises above the first evaluation's (step 2), so steps 4 and 6 exhaust patience
    assert r.stop_reason == "early_stopping" and r.steps == 6
    assert json.loads((tmp_path / "o/finetune.json").read_text())["stop_reason"] == "early_stopping"


# ---- acceptance: prompt -> completion ------------------------------------------------------------
def test_sft_reverses_words_with_greedy_generation(byte_tokenizer, tmp_path):
    from gptlab.infer.generate import generate

    letters = "abcdefgh"
    words = [a + b + c for a in letters for b in letters for c in letters]
    random.Random(0).shuffle(words)
    train = write_jsonl(tmp_path / "train.jsonl", [reverse_record(w) for w in words[:400]])
    val_words = words[400:]
    val = write_jsonl(tmp_path / "val.jsonl", [reverse_record(w) for w in val_words])
    base = save_model(
        tiny_gpt(byte_tokenizer.vocab_size, n_embd=64, n_ctx=24), tmp_path / "base", byte_tokenizer
    )
    r = finetune(
        FinetuneConfig(
            task="sft",
            base=str(base),
            train_file=str(train),
            val_file=str(val),
            out=str(tmp_path / "out"),
            max_steps=200,
            lr=3e-3,
            batch_size=32,
            eval_interval=50,
            progress=False,
            train_overrides=QUIET,
        )
    )
    model, tok = load_model(r.out), load_tokenizer(r.out)  # a normal checkpoint, as generate / serve load it
    completions = generate(model, tok, [f"reverse {w}:" for w in val_words], temperature=0, max_new_tokens=6)
    exact = sum(c.text == " " + w[::-1] for c, w in zip(completions, val_words, strict=True)) / len(val_words)
    assert exact >= 0.9, exact
    assert all(c.finish_reason == "stop" for c in completions[:10])  # learned to emit <|endoftext|>


# ---- LoRA end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_sft_run(tmp_path_factory, byte_tokenizer):
    from gptlab.cli import main

    root = tmp_path_factory.mktemp("lora")
    train = write_jsonl(
        root / "train.jsonl", [reverse_record(w) for w in ("abc", "bca", "cab", "acb", "bac")]
    )
    base = save_model(tiny_gpt(byte_tokenizer.vocab_size, n_ctx=24), root / "base", byte_tokenizer)
    args = [
        "finetune",
        "--task",
        "sft",
        "--base",
        str(base),
        "--train",
        str(train),
        "--out",
        str(root / "out"),
        "--lora",
        "--lora-rank",
        "4",
        "--lora-modules",
        "c_attn,c_proj,c_fc",
        "--max-steps",
        "12",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
        "--merge",
        "--no-progress",
        "--train.tensorboard",
        "false",
    ]
    assert main(args) == 0
    return base, root / "out"


def test_lora_run_saves_adapter_and_merges_exactly(lora_sft_run, tmp_path):
    from gptlab.cli import main

    base_dir, out = lora_sft_run
    meta = json.loads((out / "adapter/adapter_config.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["base_model"]["n_embd"] == 32
    idx = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    base = load_model(base_dir)
    base_logits = base(idx)[0]
    load_adapter(base, out / "adapter")  # unmerged: base + adapters
    unmerged = base(idx)[0]
    merged = load_model(out)(idx)[0]
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert main(["lora", "merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    torch.testing.assert_close(load_model(tmp_path / "m")(idx)[0], merged, atol=1e-6, rtol=0)


def test_lora_adapter_for_another_base_is_refused(lora_sft_run, tmp_path, byte_tokenizer, capsys):
    from gptlab.cli import main

    _, out = lora_sft_run
    other = save_model(
        tiny_gpt(byte_tokenizer.vocab_size, n_ctx=24, seed=5), tmp_path / "other", byte_tokenizer
    )
    code = main(
        [
            "lora",
            "merge",
            "--adapter",
            str(out / "adapter"),
            "--base",
            str(other),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    assert "different weights" in capsys.readouterr().err


def test_lora_classifier_adapter_matches_merged(sentiment_base, tmp_path):
    from gptlab.finetune.classify import Classifier

    rng = random.Random(2)
    train = write_jsonl(
        tmp_path / "t.jsonl", [dict(r, label=int(r["label"] == "positive")) for r in sentiment(48, rng)]
    )
    r = finetune(
        FinetuneConfig(
            task="classification",
            base=str(sentiment_base),
            train_file=str(train),
            out=str(tmp_path / "ad"),
            lora=LoRAConfig(rank=4, modules=["c_attn"]),
            max_steps=6,
            batch_size=8,
            lr=1e-2,
            progress=False,
            train_overrides=QUIET,
        )
    )
    assert r.trainable_params == 2 * 4 * (64 + 192) + 64 * 2 + 2  # adapters + head
    assert not (tmp_path / "ad/model.safetensors").exists()
    adapted = Classifier.from_pretrained(tmp_path / "ad")
    assert adapted.labels.labels == [0, 1]
    from gptlab.finetune.runner import merge_adapter

    merged = Classifier.from_pretrained(merge_adapter(str(tmp_path / "ad"), str(tmp_path / "merged")))
    texts = ["the film was awful", "what a great trip", "boring song overall"]
    torch.testing.assert_close(merged.probabilities(texts), adapted.probabilities(texts), atol=1e-5, rtol=0)


# ---- resume ---------------------------------------------------------------------------------------
def test_resume_continues_exactly(sentiment_base, tmp_path):
    rng = random.Random(3)
    train = write_jsonl(tmp_path / "t.jsonl", sentiment(40, rng))
    common = dict(
        task="classification",
        base=str(sentiment_base),
        train_file=str(train),
        batch_size=8,
        lr=1e-3,
        warmup_steps=0,
        progress=False,
        train_overrides={**QUIET, "optim.decay_steps": "8", "train.checkpoint_interval": "4"},
    )
    whole = finetune(FinetuneConfig(out=str(tmp_path / "whole"), max_steps=8, **common))
    finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=4, **common))
    with pytest.raises(ValueError, match="pass --resume"):
        finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=8, **common))
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=8, resume=True, **common))
    assert whole.steps == resumed.steps == 8
    from gptlab.checkpoint import read_safetensors

    a = read_safetensors(whole.out / "model.safetensors")
    b = read_safetensors(resumed.out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert (
        read_safetensors(whole.out / "head.safetensors")["weight"]
        - read_safetensors(tmp_path / "split/train/checkpoints/step_00000008/model.safetensors")[
            "head.weight"
        ]
    ).abs().max() < 1e-6
