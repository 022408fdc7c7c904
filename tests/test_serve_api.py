"""The OpenAI API as clients send it: documented fields that cannot change the output are accepted,
stream_options needs stream, /tokenize and /detokenize, the context length in /v1/models, and a busy
port refused in one line before anything is loaded."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import KEY, NAME, reference, tiny_model  # noqa: E402

from gptlab.cli import main  # noqa: E402
from gptlab.serve.app import create_app, serve_in_thread  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer.vocab_size, tiny_tokenizer.eot_id)


@pytest.fixture(scope="module")
def url(model, tiny_tokenizer):
    with serve_in_thread(create_app(model, tiny_tokenizer, model_name=NAME, api_key=KEY)) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_documented_no_op_fields_are_accepted_and_change_nothing(client, model, tiny_tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    extra = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, store=False, metadata={"team": "a"},
        service_tier="auto", user="u-1", modalities=["text"], parallel_tool_calls=True,
        prediction={"type": "content", "content": "hello"},
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )  # fmt: skip
    assert extra.choices[0].message.content == plain.choices[0].message.content
    completion = client.completions.create(model=NAME, prompt="The quick", max_tokens=6, temperature=0, user="u-2")
    assert completion.choices[0].text == reference(model, tiny_tokenizer, "The quick", 6)[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),  # audio output would change the reply
        ({"metadata": {"team": 5}}, "metadata"),
        ({"reasoning_effortt": "low"}, "reasoning_effortt"),  # unknown fields stay refused
    ],
)
def test_fields_that_would_change_the_output_are_400s(url, extra, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and param in (r.json()["error"]["param"] or "") + r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_without_stream_is_a_400(url, path):
    body = {"model": NAME, "max_tokens": 2, "stream_options": {"include_usage": True}}
    body |= {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    for stream in (None, False):
        r = httpx.post(url + path, json={**body, **({} if stream is None else {"stream": stream})}, headers=AUTH)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "stream_options" and "stream is true" in error["message"]
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200 and '"usage"' in r.read().decode()


def test_tokenize_and_detokenize(url, tiny_tokenizer):
    text = "Unicode: naïve café <|endoftext|> def f(x):\n    return x"
    for field in ("prompt", "content"):  # vLLM's and llama.cpp's names
        r = httpx.post(url + "/tokenize", json={"model": NAME, field: text}, headers=AUTH)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["tokens"] == tiny_tokenizer.encode(text) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == 128
    r = httpx.post(url + "/detokenize", json={"tokens": got["tokens"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["prompt"] == r.json()["content"] == tiny_tokenizer.decode(got["tokens"])
    bad = httpx.post(url + "/detokenize", json={"tokens": [1, tiny_tokenizer.vocab_size + 7]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(url + "/tokenize", json={"prompt": "a", "content": "b"}, headers=AUTH)
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    wrong_model = httpx.post(url + "/tokenize", json={"model": "other", "prompt": "a"}, headers=AUTH)
    assert wrong_model.status_code == 404
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(url + path, json=body).status_code == 401  # behind the key like /v1


def test_models_give_the_context_length(client):
    (card,) = client.models.list().data
    assert card.id == NAME and card.max_model_len == 128 and card.context_length == 128
    assert client.models.retrieve(NAME).max_model_len == 128


def test_a_busy_port_is_one_line_before_anything_loads(capsys, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The checkpoint does not exist: the port is checked first, so that is not what is reported.
        code = main(["serve", str(tmp_path / "no-such-run"), "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "serving" not in out + err
    want = f"port {port} is already in use on 127.0.0.1 (another server?); pick another with --port"
    assert err.strip() == f"gptlab serve: error: {want}"


def test_scoring_a_prompt_of_the_whole_context_with_echo(client, model):
    import torch

    ids = [(7 * i + 3) % 200 + 10 for i in range(128)]  # n_ctx tokens exactly
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    got = r.choices[0].logprobs.token_logprobs
    assert len(got) == 128 and got[0] is None and r.usage.completion_tokens == 0
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(127), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(got[1:]), want, atol=1e-4, rtol=0)
    with pytest.raises(openai.BadRequestError, match="128 tokens"):  # generating needs room for a token
        client.completions.create(model=NAME, prompt=ids, max_tokens=1)


def test_embeddings_are_the_normalised_mean_of_the_final_hidden_states(client, model, tiny_tokenizer):
    import base64

    import numpy as np
    import torch

    texts = ["The quick brown fox", "def add(a, b):", "x"]
    r = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(tiny_tokenizer.encode(t)) for t in texts)
    for text, item in zip(texts, r.data, strict=True):
        with torch.no_grad():  # independently: the model's own hidden states, pooled here
            hidden = model.features(torch.tensor([tiny_tokenizer.encode(text)]))[0]
        want = hidden.mean(0) / hidden.mean(0).norm()
        got = torch.tensor(item.embedding)
        assert got.shape == (model.config.n_embd,)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ids = tiny_tokenizer.encode(texts[1])
    packed = client.embeddings.create(model=NAME, input=[ids], encoding_format="base64").data[0].embedding
    if isinstance(packed, str):  # the client may or may not decode base64 itself
        packed = np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist()
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(r.data[1].embedding), atol=1e-6, rtol=0)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=NAME, input="hi", dimensions=7)
    with pytest.raises(openai.BadRequestError, match="at most 128"):
        client.embeddings.create(model=NAME, input=[list(range(10, 140))])
