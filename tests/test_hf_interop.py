"""Hugging Face GPT-2 interop, checked against transformers' own GPT2LMHeadModel (logits and greedy
continuations), in both directions and through `gptlab convert`."""

import json
import shutil
import socket

import pytest
import torch

from gptlab import GPT, ModelConfig
from gptlab.checkpoint import load_model, load_tokenizer
from gptlab.cli import main
from gptlab.interop.hf import load_hf_model, save_hf

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'gptlab[hf]')"
)

SHAPE = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=256)
NEW_TOKENS = 32


def hf_model(tied: bool = True, vocab_size: int = 256, seed: int = 0):
    """A randomly initialised GPT2LMHeadModel; eager attention, so the reference is not SDPA like ours."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **{**SHAPE, "vocab_size": vocab_size},
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        initializer_range=0.2,  # wide logits: greedy argmaxes far from ties, so the comparison is stable
    )
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


def prompt(vocab_size: int = 256, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(1))


def hf_greedy(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def gptlab_greedy(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    from gptlab.infer.generate import generate_ids

    return torch.tensor(generate_ids(model, ids.tolist(), max_new_tokens=NEW_TOKENS, temperature=0))


def assert_same_model(ours: GPT, reference, greedy: bool = True) -> None:
    """Same logits (fp32, max abs diff <= 1e-4) and the same 32-token greedy continuation."""
    ours.eval()
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        ref_logits = reference(ids).logits
        our_logits, _ = ours(ids)
    assert our_logits.shape == ref_logits.shape
    assert (our_logits - ref_logits).abs().max().item() <= 1e-4
    if not greedy:
        return
    expected = hf_greedy(reference, ids)
    assert len(set(expected[0].tolist())) > 3, "degenerate reference continuation: the check would be weak"
    assert torch.equal(gptlab_greedy(ours, ids), expected)


def write_legacy_bin(model, directory, prefixed: bool) -> None:
    """pytorch_model.bin as older transformers wrote it: mask buffers included, GPT2Model keys unprefixed."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[key if prefixed or key == "lm_head.weight" else key.removeprefix("transformer.")] = tensor
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        base = f"transformer.h.{i}.attn." if prefixed else f"h.{i}.attn."
        state[base + "bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[base + "masked_bias"] = torch.tensor(-1e4)
    model.config.save_pretrained(directory)
    torch.save(state, directory / "pytorch_model.bin")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_model()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize(
    "fmt,tied", [("safetensors", True), ("safetensors", False), ("bin", True), ("bin", False)]
)
def test_load_hf_directory_matches_transformers(tmp_path, fmt, tied):
    reference = hf_model(tied=tied)
    if fmt == "safetensors":
        reference.save_pretrained(tmp_path)
    else:  # transformers v5 only writes safetensors: write the legacy pickle format ourselves
        write_legacy_bin(reference, tmp_path, prefixed=not tied)
    assert not (tmp_path / ("pytorch_model.bin" if fmt == "safetensors" else "model.safetensors")).exists()
    ours = load_model(str(tmp_path))
    assert ours.config.tie_embeddings is tied and (ours.lm_head is None) is tied
    assert (ours.config.n_layer, ours.config.n_ctx, ours.config.vocab_size) == (2, 128, 256)
    assert_same_model(ours, reference)


def test_load_sharded_safetensors(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (
        tmp_path / "model.safetensors"
    ).exists()
    assert_same_model(load_model(tmp_path), reference, greedy=False)


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_unchanged(tmp_path, tied):
    config = ModelConfig(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_ctx=128,
        vocab_size=256,
        n_inner=96,
        layer_norm_eps=1e-6,
        tie_embeddings=tied,
    )
    torch.manual_seed(0)
    ours = GPT(config)
    with torch.no_grad():  # wide weights (as in hf_model): greedy argmaxes far from ties
        for p in ours.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    save_hf(ours, tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf_config["model_type"] == "gpt2" and hf_config["architectures"] == ["GPT2LMHeadModel"]
    assert hf_config["activation_function"] == "gelu_new" and hf_config["n_inner"] == 96
    reference, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    assert reference.config.layer_norm_epsilon == 1e-6 and reference.config.tie_word_embeddings is tied
    assert_same_model(ours, reference.eval())
    # and back again: HF dir -> gptlab gives the original tensors
    again = load_hf_model(tmp_path / "hf")
    assert again.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_cli_convert_round_trip_with_tokenizer(tmp_path):
    from gptlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(
        ["the quick brown fox jumps over the lazy dog"] * 40, 300, show_progress=False
    )
    reference = hf_model(vocab_size=300)
    reference.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")

    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert config["format"] == "gptlab"
    assert (tmp_path / "ckpt/tokenizer/vocab.json").is_file()
    assert load_tokenizer(tmp_path / "ckpt").fingerprint() == tokenizer.fingerprint()
    assert_same_model(load_model(tmp_path / "ckpt"), reference, greedy=False)  # greedy: checked below

    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2")]) == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2", attn_implementation="eager")
    assert_same_model(load_model(tmp_path / "ckpt"), exported.eval())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    text = "the lazy fox jumps"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    assert exported.config.eos_token_id == tokenizer.eot_id

    # an existing, non-empty output is never silently replaced
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2")]) == 2
    assert (
        main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2"), "--overwrite"])
        == 0
    )


def test_export_refuses_alternating_attention(tmp_path):
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=100, attn_pattern="alternating")
    with pytest.raises(ValueError, match="alternating.*GPT2LMHeadModel only has dense"):
        save_hf(GPT(config), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"activation_function": "relu"}, "activation_function is 'relu'"),
        ({"activation_function": "gelu"}, "activation_function is 'gelu'"),  # exact erf GELU differs
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"model_type": "gpt_neo"}, "model_type is 'gpt_neo'"),
    ],
)
def test_unrepresentable_configs_refused(tmp_path, hf_dir, change, match):
    directory = tmp_path / "hf"
    shutil.copytree(hf_dir[0], directory)
    config = json.loads((directory / "config.json").read_text()) | change
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"cannot represent exactly.*{match}"):
        load_model(directory)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_corrupted_weights_name_the_file(tmp_path, hf_dir, fmt):
    directory = tmp_path / "hf"
    shutil.copytree(hf_dir[0], directory)
    if fmt == "bin":
        (directory / "model.safetensors").unlink()
        torch.save(hf_dir[1].state_dict(), directory / "pytorch_model.bin")
    file = directory / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        load_model(directory)
    assert str(file) in str(err.value)
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_hub_name_offline_asks_for_a_local_directory(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    name = "gptlab-tests/no-such-model"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE.*Pass a local directory"):
        load_model(name)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(name)
    assert main(["convert", "--from-hf", name, "--out", "unused-out"]) == 2
    assert "Pass a local directory" in capsys.readouterr().err


def test_to_hf_writes_a_complete_directory_a_batched_pipeline_uses(tmp_path, gpt2_tokenizer):
    from gptlab.checkpoint import save_model
    from gptlab.infer.generate import generate

    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=50257)
    ours = GPT(config).eval()
    with torch.no_grad():  # confident predictions: greedy choices far from ties
        ours.transformer.wte.weight.mul_(30)
    save_model(ours, tmp_path / "ckpt", gpt2_tokenizer)
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "vocab.json",
                 "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and str(tmp_path / "ckpt") in card and "n_embd | 32" in card

    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.is_fast and fast.pad_token == fast.eos_token == "<|endoftext|>" and fast.padding_side == "left"
    assert fast.model_max_length == 64
    for text in ["Hello world!", "  def f(x):\n\treturn x  ", "naïve café 😀", " " * 40 + "a", "x<|endoftext|>y"]:
        assert fast.encode(text) == gpt2_tokenizer.encode(text, allowed_special="all"), text
        assert fast.decode(fast.encode(text)) == text
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == generation.pad_token_id == 50256

    prompts = ["The quick brown fox", "def", "Numbers: 1, 2, 3, 4, 5"]  # different lengths: padding
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    got = pipe(prompts, batch_size=3, max_new_tokens=8, do_sample=False, return_full_text=False)
    want = generate(ours, gpt2_tokenizer, prompts, temperature=0, max_new_tokens=8)
    assert [g[0]["generated_text"] for g in got] == [w.text for w in want]


def test_from_hf_keeps_gpt2s_original_tokenizer_files_and_refuses_a_broken_one(tmp_path, gpt2_bpe_dir, capsys):
    reference = hf_model(vocab_size=50257)
    reference.save_pretrained(tmp_path / "hf")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(gpt2_bpe_dir / name, tmp_path / "hf" / name)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt/tokenizer/encoder.json").is_file()
    assert load_tokenizer(tmp_path / "ckpt").encode("Hello world") == [15496, 995]  # GPT-2's ids

    (tmp_path / "hf" / "encoder.json").unlink()
    (tmp_path / "hf" / "tokenizer.json").write_text("")  # an empty tokenizer.json is not copied silently
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt2")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer files in" in err and "tokenizer.json" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt2").exists()
