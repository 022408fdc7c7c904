import csv
import io
import json
import math

import pytest
import torch

from gptlab import GPT, ModelConfig, preset
from gptlab.checkpoint import load_model
from gptlab.cli import main
from gptlab.reports import sizing as sz
from gptlab.reports.compare import load_model_spec, parse_tokens
from gptlab.reports.run_report import (
    generate_sample,
    load_run,
    model_config_from_dict,
    read_metrics,
    write_report,
)

GPT2_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# ---- published figures ---------------------------------------------------------------------------
def test_gpt3_175b_training_flops_match_paper():
    # Brown et al. 2020, Table D.1: 3.14e23 FLOPs to train GPT-3 175B on 300B tokens.
    r = sz.sizing(preset("gpt3-175b"), tokens=300e9)
    assert r["train_flops"] == pytest.approx(3.14e23, rel=0.05)


def test_gpt3_175b_training_days_match_narayanan():
    # Narayanan et al. 2021 (Megatron-LM on 3072 GPUs), section 5.1: GPT-3 175B on 300B tokens takes
    # ~34 days on 1024 A100s at 140 TFLOP/s each, counting 8ND (6ND + recomputing the forward pass).
    r = sz.sizing(preset("gpt3-175b"), tokens=300e9, gpu="A100", n_gpus=1024, mfu=140e12 / 312e12)
    assert r["train_days"] * 8 / 6 == pytest.approx(34, rel=0.05)


def test_compare_json_gpt2_counts_and_flops(capsys):
    code, out, _ = cli(capsys, "compare", *GPT2_COUNTS, "gpt3-175b", "--json")
    assert code == 0
    rows = {r["label"]: r for r in json.loads(out)}
    for name, count in GPT2_COUNTS.items():
        assert rows[name]["params"] == count
        assert rows[name]["params_embedding"] + rows[name]["params_non_embedding"] == count
    assert rows["gpt3-175b"]["train_flops"] == pytest.approx(3.14e23, rel=0.05)
    assert rows["gpt3-175b"]["chinchilla_tokens"] == pytest.approx(20 * rows["gpt3-175b"]["params"])
    assert rows["gpt2"]["n_ctx"] == 1024 and rows["gpt3-175b"]["attention"] == "dense/local(256)"


# ---- formulas against hand computation ----------------------------------------------------------
def test_activation_memory_is_korthikanti_formula():
    cfg = preset("gpt3-175b", attn_pattern="dense")
    s, b, h, a, L, V = 2048, 2, 12288, 96, 96, 50257
    layers = L * s * b * h * (34 + 5 * a * s / h)
    out = 4 * s * b * h + 4 * s * b * V
    assert sz.activation_bytes(cfg, micro_batch=b) == pytest.approx(layers + out)
    ckpt = L * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h) + out
    assert sz.activation_bytes(cfg, micro_batch=b, checkpointing=True) == pytest.approx(ckpt)


def test_banded_layers_keep_fewer_attention_scores():
    dense = preset("gpt3-small", attn_pattern="dense")
    alt = preset("gpt3-small")  # odd layers banded to 256 keys
    s, a, w = 2048, 12, 256
    saved = 6 * 5 * a * s * (s - w)  # 6 local layers, scores over w keys instead of s
    assert sz.activation_bytes(dense) - sz.activation_bytes(alt) == pytest.approx(saved)
    assert sz.activation_bytes(alt, seq=200) == sz.activation_bytes(dense, seq=200)  # shorter than the band


def test_memory_and_hardware_bounds():
    cfg = preset("gpt2")
    n = GPT2_COUNTS["gpt2"]
    mem = sz.training_memory(cfg)
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == 16 * n
    assert [sz.weights_bytes(cfg, d) for d in ("fp32", "bf16", "int8")] == [4 * n, 2 * n, n]
    assert sz.inference_tokens_per_s(cfg, "A100") == pytest.approx(2.039e12 / (2 * n))
    assert sz.inference_tokens_per_s(cfg, "h200", 2) == pytest.approx(2 * 4.8e12 / (2 * n))
    assert sz.kv_cache_bytes(cfg) == 2 * 12 * 768 * 2 * 1024
    days = sz.training_seconds(cfg, 1e9, "H100", 8, 0.5) / 86400
    assert days * 86400 == pytest.approx(cfg.training_flops(1e9) / (8 * 989e12 * 0.5))


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="unknown accelerator 'B9000'.*A100"):
        sz.accelerator("B9000")
    assert sz.accelerator("a100-40gb").bandwidth == 1.555e12
    with pytest.raises(ValueError, match="MFU"):
        sz.training_seconds(preset("gpt2"), 1e9, "A100", 1, 1.5)
    with pytest.raises(ValueError, match="not-a-model"):
        load_model_spec("not-a-model")
    assert parse_tokens("300B") == 300e9 and parse_tokens("1.4e12") == 1.4e12
    with pytest.raises(ValueError, match="token budget"):
        parse_tokens("lots")


# ---- output formats -----------------------------------------------------------------------------
def test_csv_markdown_table_and_plot(capsys, tmp_path):
    code, out, _ = cli(capsys, "compare", "gpt2", "gpt3-small", "--csv", "--tokens", "1e9")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["quantity", "gpt2", "gpt3-small"]
    by_key = {r[0]: r[1:] for r in rows[1:]}
    assert int(by_key["params"][0]) == GPT2_COUNTS["gpt2"]
    assert float(by_key["train_flops"][0]) == pytest.approx(preset("gpt2").training_flops(1e9))

    code, out, _ = cli(capsys, "compare", "gpt2", "gpt3-small", "--markdown")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1:4] == [
        " quantity                           ",
        " gpt2        ",
        " gpt3-small       ",
    ]
    assert "| parameters" in out and "124,439,808" in out and "Korthikanti" in out

    code, out, _ = cli(capsys, "compare", "gpt2", "gpt3-175b", "--gpu", "H100", "--gpus", "1024")
    assert code == 0 and "training days" in out and "decode tokens/s" in out

    png = tmp_path / "sizing.png"
    code, _, err = cli(capsys, "compare", "gpt2", "gpt3-175b", "--plot", str(png))
    assert code == 0 and str(png) in err
    assert_png(png)


def test_config_files_as_models(capsys, tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text("[model]\nn_layer = 2\nn_head = 2\nn_embd = 64\nn_ctx = 128\nvocab_size = 300\n")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"preset": "gpt2", "n_layer": 6}))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_layer": 12,
                "n_head": 12,
                "n_embd": 768,
                "n_positions": 1024,
                "vocab_size": 50257,
                "n_inner": None,
                "layer_norm_epsilon": 1e-5,
            }
        )
    )
    code, out, _ = cli(capsys, "compare", str(toml), str(bare), str(hf), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["label"] for r in rows] == ["mine", "gpt2", "hf-gpt2"]
    assert rows[0]["params"] == ModelConfig(n_layer=2, n_head=2, n_embd=64, n_ctx=128, vocab_size=300).n_params()
    assert rows[1]["n_layer"] == 6
    assert rows[2]["params"] == GPT2_COUNTS["gpt2"]

    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = 2\n")
    code, _, err = cli(capsys, "compare", str(bad))
    assert code == 2 and "n_layers" in err and "bad.toml" in err


# ---- runs ---------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def make_run(root, name, tokenizer, losses, attn="dense", seq=32, batch=4):
    """A fabricated run directory: config.json, metrics.jsonl and one tiny checkpoint."""
    from gptlab.checkpoint import save_model

    torch.manual_seed(len(name))
    mc = ModelConfig(
        name=name,
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_ctx=64,
        vocab_size=tokenizer.vocab_size,
        attn_pattern=attn,
        local_window=16,
    )
    run = root / name
    run.mkdir()
    # The layout `gptlab train` writes (TrainConfig.save): a model section of preset + fields.
    model = {"preset": None, **{k: v for k, v in mc.to_dict().items() if k != "name"}}
    config = {"format": "gptlab-train", "model": model, "data": {"dataset": "", "seq_len": seq}}
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    for i, loss in enumerate(losses):
        m = {
            "step": (i + 1) * 10,
            "loss": loss,
            "lr": 1e-3,
            "tokens": (i + 1) * 10 * batch * seq,
            "tokens_per_s": 1000.0 + i,
            "mfu": 0.01 * (i + 1),
            "elapsed": 2.0 * (i + 1),
        }
        if i % 2 == 1:
            m["val_loss"] = loss + 0.1
        lines.append(json.dumps(m))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "lo')  # partial last line
    save_model(GPT(mc), run / "checkpoints" / f"step_{len(losses) * 10:08d}", tokenizer=tokenizer)
    return run


def test_reads_the_model_of_a_train_config():
    from gptlab.train.config import ModelSection, TrainConfig

    for section in (
        ModelSection(preset="nano-gpt3", n_layer=2),
        ModelSection.of(preset("nano-gpt3", n_layer=2)),
    ):
        got = model_config_from_dict(TrainConfig(model=section).to_dict())
        assert got == preset("nano-gpt3", n_layer=2)
    got = model_config_from_dict(TrainConfig(model=ModelSection(preset=None, n_layer=2, n_embd=48)).to_dict())
    assert (got.n_layer, got.n_embd, got.n_head) == (2, 48, 12)


def test_read_metrics_skips_partial_tail_but_rejects_bad_middle(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(f)
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(f) == [{"step": 1, "loss": 2.0}]


def test_compare_runs_table_and_loss_plot(capsys, tmp_path, tokenizer):
    a = make_run(tmp_path, "gpt2-style", tokenizer, [5.0, 4.0, 3.5, 3.0])
    b = make_run(tmp_path, "gpt3-style", tokenizer, [5.1, 3.9, 3.3, 2.9], attn="alternating", seq=64)
    png = tmp_path / "curves.png"
    code, out, _ = cli(capsys, "compare", str(a), str(b), "--json", "--plot", str(png))
    assert code == 0
    rows = {r["label"]: r for r in json.loads(out)}
    ra, rb = rows["gpt2-style"], rows["gpt3-style"]
    assert ra["steps"] == 40 and ra["tokens"] == 40 * 4 * 32
    assert ra["final_train_loss"] == 3.0 and ra["final_val_loss"] == pytest.approx(3.1)
    assert ra["best_val_loss"] == pytest.approx(3.1) and ra["val_perplexity"] == pytest.approx(math.exp(3.1))
    assert ra["tokens_per_s"] == 1002.0 and ra["mfu"] == pytest.approx(0.03) and ra["elapsed_s"] == 8.0
    cfg_b = load_run(b).model
    assert rb["attention"] == "dense/local(16)"
    assert rb["train_flops"] == pytest.approx(40 * 4 * 64 * cfg_b.flops_per_token(64, backward=True))
    assert_png(png)

    code, out, _ = cli(capsys, "compare", str(a), str(b), "--markdown")
    assert code == 0 and "| final val loss" in out and "3.1000" in out and "gpt3-style" in out


def test_report_card(capsys, tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"tokens": 12345, "documents": 7}))
    run = make_run(tmp_path, "r1", tokenizer, [5.0, 4.0, 3.5, 3.0])
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "data": {"dataset": str(data), "seq_len": 32}}))

    out = tmp_path / "cards" / "r1.md"
    code, stdout, _ = cli(
        capsys, "report", str(run), "--out", str(out), "--max-new-tokens", "8", "--prompt", "the quick"
    )
    assert code == 0 and stdout.strip() == str(out)
    md = out.read_text()
    png = out.with_name("r1_loss.png")
    assert_png(png)
    assert f"![loss curve]({png.name})" in md
    assert f"| val perplexity    | {math.exp(3.1):.2f}   |" in md  # perplexity = exp(final val loss)
    assert "12,345" in md and torch.__version__ in md and '"seq_len": 32' in md

    # The sample is a greedy continuation: check it against a plain full-recompute argmax loop.
    model = load_model(str(run / "checkpoints" / "step_00000040"))
    prompt = tokenizer.encode("the quick")
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            nxt = model(idx)[0][:, -1].argmax(-1, keepdim=True)
            if int(nxt) == tokenizer.eot_id:
                break
            idx = torch.cat([idx, nxt], dim=1)
    expected = tokenizer.decode(idx[0, len(prompt) :].tolist())
    assert expected
    assert generate_sample(run, "the quick", 8) == expected
    assert ("the quick" + expected).strip("\n") in md

    # Default location, no sample.
    assert write_report(run, sample=False) == run / "report.md"
    assert "Sampling skipped" in (run / "report.md").read_text()
    assert (run / "report_loss.png").is_file()


def test_report_errors_are_actionable(capsys, tmp_path):
    code, _, err = cli(capsys, "report", str(tmp_path / "nope"))
    assert code == 2 and "not a run directory" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no model config"):
        load_run(tmp_path / "r")


def test_example_configs_train_for_equal_tokens():
    """examples/gpt2_vs_gpt3: both configs parse, match in size, and get equal token budgets."""
    import importlib.util
    from pathlib import Path

    from gptlab.train.config import load_train_config
    from gptlab.train.schedule import batch_size_at

    here = Path(__file__).resolve().parents[1] / "examples" / "gpt2_vs_gpt3"
    spec = importlib.util.spec_from_file_location("gpt2_vs_gpt3_run", here / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    budget = 400_000
    tokens, models = {}, {}
    for name in run.RUNS:
        cfg = load_train_config(here / f"{name}.toml", run.budget_overrides(name, budget))
        models[name] = cfg.model.resolve()
        seen = 0
        for _ in range(cfg.train.max_steps):  # replay the trainer's batch schedule
            t = cfg.train
            seen += batch_size_at(seen, t.batch_size, t.batch_ramp_start, t.batch_ramp_tokens) * cfg.data.seq_len
        tokens[name] = seen
    assert budget <= tokens["gpt2"] < budget + 2048 and budget <= tokens["gpt3"] < budget + 2048
    g2, g3 = models["gpt2"], models["gpt3"]
    assert g2.n_params(embeddings=False) == g3.n_params(embeddings=False)
    assert (g2.attn_pattern, g3.attn_pattern) == ("dense", "alternating") and g3.n_ctx == 2 * g2.n_ctx


def test_device_names_match_the_accelerator_table():
    from gptlab.reports import sizing as sz

    names = {
        "NVIDIA H100 80GB HBM3": "H100",
        "NVIDIA H100 PCIe": "H100-PCIE",
        "NVIDIA L40S": "L40S",
        "NVIDIA L4": "L4",
        "NVIDIA GeForce RTX 4090": "RTX4090",
        "NVIDIA A100-SXM4-80GB": "A100",
    }
    assert {n: sz.match_device(n).name for n in names} == names
    assert sz.match_device("Intel Arc A770") is None
    assert sz.accelerator("h100").peak_flops_fp32 == 67e12


def test_report_finds_relative_data_paths_from_the_run_not_the_working_directory(
    capsys, tmp_path, tokenizer, monkeypatch
):
    project = tmp_path / "project"
    data = project / "data" / "corpus"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"tokens": 54321, "documents": 3}))
    (project / "runs").mkdir()
    run = make_run(project / "runs", "r2", tokenizer, [5.0, 4.0])  # trained in `project`: runs/r2
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "data": {"dataset": "data/corpus", "seq_len": 32}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, _ = cli(capsys, "report", str(run), "--out", "card.md", "--max-new-tokens", "4")
    md = (elsewhere / "card.md").read_text()
    assert code == 0 and "54,321" in md and str(data / "manifest.json") in md
    assert "prompt 'def '" in md  # the default sample prompt shows the start of a function
