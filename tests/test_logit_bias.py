"""OpenAI's logit_bias: the formula (logits + bias), validation, banned and forced tokens in generate and
the command line. The server's side is in tests/test_serve.py."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPT, ModelConfig
from gptlab.infer.generate import generate_ids
from gptlab.infer.sampling import SamplingParams, process_logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bias_is_added_to_the_logits_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    bias = {2: 5.0, 7: -3.5, 10: 100.0}
    rows = [SamplingParams(logit_bias=bias), SamplingParams(), SamplingParams(logit_bias={0: -100})]
    got = process_logits(logits, [[], [], []], rows, warp=False)
    want = logits.clone()
    for token, value in bias.items():
        want[0, token] += value
    want[2, 0] -= 100
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bias_comes_after_penalties_and_before_temperature():
    torch.manual_seed(1)
    logits = torch.randn(1, 9)
    base = SamplingParams(presence_penalty=0.5, temperature=0.5)
    biased = base.updated(logit_bias={4: 2.0})
    unbiased = process_logits(logits, [[4, 4]], [base], warp=False)
    got = process_logits(logits, [[4, 4]], [biased], warp=True)
    want = unbiased.clone()
    want[0, 4] += 2.0
    torch.testing.assert_close(got, want / 0.5)


@pytest.mark.parametrize(
    "bias, words",
    [
        ({-1: 1.0}, "key -1"),
        ({"5": 1.0}, "key '5'"),
        ({True: 1.0}, "key True"),
        ({5: 100.5}, "logit_bias[5]"),
        ({5: float("nan")}, "logit_bias[5]"),
        ({5: "1"}, "logit_bias[5]"),
        ([5], "dict"),
    ],
)
def test_bad_biases_are_refused_with_the_key(bias, words):
    with pytest.raises(ValueError, match="logit_bias") as e:
        SamplingParams(logit_bias=bias).validate()
    assert words in str(e.value)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=50)).eval()


def test_greedy_generation_bans_and_forces_tokens():
    model = tiny()
    prompt = [[1, 2, 3]]
    plain = generate_ids(model, prompt, temperature=0, max_new_tokens=8)[0]
    banned = generate_ids(model, prompt, temperature=0, max_new_tokens=8, logit_bias={t: -100 for t in set(plain)})[0]
    assert not set(banned) & set(plain)
    forced = generate_ids(model, prompt, temperature=1.0, seed=3, max_new_tokens=8, logit_bias={17: 100})[0]
    assert forced == [17] * 8
    with pytest.raises(ValueError, match="token id 50, outside the vocabulary of 50"):
        generate_ids(model, prompt, max_new_tokens=2, logit_bias={50: 1})


def test_cli_parses_repeated_logit_bias(monkeypatch):
    from gptlab import cli

    seen = {}

    def fake_run_generate(model, tokenizer, prompt, params, **kw):
        seen["params"] = params
        return 0

    monkeypatch.setattr("gptlab.infer.generate.run_generate", fake_run_generate)
    monkeypatch.setattr("gptlab.infer.prepare.load_for_generation", lambda *a, **k: (None, None))
    assert cli.main(["generate", "ckpt", "hi", "--logit-bias", "50256:-100", "--logit-bias", "13:2.5"]) == 0
    assert seen["params"].logit_bias == {50256: -100.0, 13: 2.5}
    with pytest.raises(SystemExit):
        cli.main(["generate", "ckpt", "hi", "--logit-bias", "13:200"])
