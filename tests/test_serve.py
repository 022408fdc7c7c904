"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn on
127.0.0.1; outputs are checked against `gptlab.infer.generate` (single request, its own KV cache) and a
no-cache forward pass."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gptlab.config import ModelConfig  # noqa: E402
from gptlab.infer.generate import generate  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.serve.app import create_app, serve_in_thread  # noqa: E402
from gptlab.serve.chat import render_chat  # noqa: E402
from gptlab.serve.engine import Engine  # noqa: E402
from gptlab.serve.handlers import ServerLimits  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny"


def tiny_model(vocab_size: int, eot_id: int) -> GPT:
    """A random 2-layer model (one dense, one locally banded layer) with spread-out logits, so greedy
    choices are never near-ties (top-2 gaps > 0.01), <|endoftext|> is never chosen greedily (outputs
    run to max_tokens), and samples still differ."""
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_ctx=128,
        vocab_size=vocab_size,
        attn_pattern="alternating",
        local_window=8,
        tie_embeddings=False,
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 1.0)
        model.transformer.wpe.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 1.0)
        model.lm_head.weight[eot_id] = 0
    return model


class SlowEngine(Engine):
    """An engine whose decode step can be slowed down, so timing-dependent tests are deterministic."""

    delay = 0.0

    def _decode(self):
        if self.delay:
            time.sleep(self.delay)
        return super()._decode()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer.vocab_size, tiny_tokenizer.eot_id)


@pytest.fixture(scope="module")
def server(model, tiny_tokenizer):
    engine = SlowEngine(model, tiny_tokenizer, max_concurrent=4, max_queue=64)
    app = create_app(
        model,
        tiny_tokenizer,
        model_name=NAME,
        api_key=KEY,
        engine=engine,
        limits=ServerLimits(max_body_bytes=20_000, max_n=4, max_prompts=4),
    )
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def engine(server):
    engine = server[1]
    yield engine
    engine.delay = 0.0
    deadline = time.monotonic() + 5
    while engine.stats()["active"] or engine.stats()["waiting"]:  # leave the engine idle for the next test
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def reference(model, tok, prompt: str, max_tokens: int, **kw):
    return generate(model, tok, prompt, temperature=kw.pop("temperature", 0), max_new_tokens=max_tokens, **kw)


PROMPTS = ["The quick brown fox", "def add(a, b):", "Numbers: 3.14", "x", "Unicode: naïve café, Straße"]


# ---- completions ---------------------------------------------------------------------------------
def test_completion_greedy_matches_generate_with_usage(client, model, tiny_tokenizer, engine):
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    ref = reference(model, tiny_tokenizer, PROMPTS[0], 12)[0]
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_sse_chunks_concatenate_to_the_full_text(client, model, tiny_tokenizer, engine):
    ref = reference(model, tiny_tokenizer, PROMPTS[1], 15)[0]
    stream = client.completions.create(
        model=NAME,
        prompt=PROMPTS[1],
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices


def test_raw_sse_format_ends_with_done(server, engine):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}
    r = httpx.post(server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["index"] == 0


def test_stop_sequences_cut_the_text_blocking_and_streaming(client, model, tiny_tokenizer, engine):
    full = reference(model, tiny_tokenizer, PROMPTS[2], 24)[0].text
    stop = full[6:8]
    expected = full[: full.index(stop)]
    r = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "zzz"]
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_n_samples_and_prompt_lists_follow_generate_with_a_seed(client, model, tiny_tokenizer, engine):
    r = client.completions.create(
        model=NAME, prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=1234
    )
    assert [c.index for c in r.choices] == list(range(6))
    ref = generate(
        model, tiny_tokenizer, PROMPTS[:2], temperature=1.0, top_p=0.9, n=3, seed=1234, max_new_tokens=8
    )
    assert [c.text for c in r.choices] == [c.text for c in ref]
    assert len({c.text for c in r.choices[:3]}) > 1  # the n samples differ
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in ref)


def test_logprobs_match_a_no_cache_forward_pass(client, model, tiny_tokenizer, engine):
    prompt = PROMPTS[0]
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True
    )
    lp = r.choices[0].logprobs
    ids = tiny_tokenizer.encode(prompt)
    generated = generate(model, tiny_tokenizer, prompt, temperature=0, max_new_tokens=6)[0].token_ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + generated]))
    logp = torch.log_softmax(logits[0].double(), -1)
    want = [None] + [logp[t, tok].item() for t, tok in enumerate((ids + generated)[1:])]
    assert len(lp.token_logprobs) == len(ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    assert lp.tokens == [tiny_tokenizer.decode([t]) for t in ids + generated]
    values, top_ids = logp[-2].topk(3)
    want_top = {tiny_tokenizer.decode([i]): v for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
    assert lp.top_logprobs[-1].keys() == want_top.keys()  # tokens decoding alike share a key, as in OpenAI's
    assert list(lp.top_logprobs[-1].values()) == pytest.approx(list(want_top.values()), abs=1e-4)
    assert r.choices[0].text.startswith(prompt)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_penalties_change_the_output_like_generate(client, model, tiny_tokenizer, engine):
    kw = dict(presence_penalty=2.0, frequency_penalty=2.0)
    r = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=20, temperature=0, **kw)
    assert r.choices[0].text == reference(model, tiny_tokenizer, PROMPTS[3], 20, **kw)[0].text


# ---- chat ------------------------------------------------------------------------------------------
def test_chat_completion_uses_the_chatml_template(client, model, tiny_tokenizer, engine):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]
    rendered = render_chat(messages)
    assert rendered == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    ref = generate(model, tiny_tokenizer, rendered, temperature=0, max_new_tokens=10, stop=["<|im_end|>"])[0]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode(rendered))
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}  # no key: up, nothing more
    health = httpx.get(server[0] + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["slots"] == 4


# ---- auth, validation, limits ----------------------------------------------------------------------
def test_wrong_or_missing_key_gets_401_in_openai_format(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.get(server[0] + "/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(temperature=5), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=5), "n"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=500), "max_tokens"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(extra_body={"bogus": 1}), "bogus"),
        (dict(extra_body={"logit_bias": {"5": 300}}), "logit_bias"),
        (dict(extra_body={"logit_bias": {"x": 3}}), "logit_bias"),
        (dict(extra_body={"logit_bias": {"99999": 3}}), "logit_bias"),
        (dict(extra_body={"logit_bias": {"5": "3"}}), "logit_bias"),
        (dict(prompt=[1, 2, 99999]), "prompt"),
        (dict(prompt="word " * 200), "prompt"),
        (dict(model="gpt-4"), "model"),
    ],
)
def test_bad_parameters_get_openai_errors_naming_the_parameter(client, kwargs, param):
    kwargs = {"model": NAME, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code in (400, 404, 422), e.value
    assert e.value.body["param"] == param and e.value.body["message"]


@pytest.mark.parametrize(
    "bias, words", [({"-3": 1}, "'-3'"), ({"7": 100.5}, "logit_bias['7']"), ({"1e3": 1}, "'1e3'")]
)
def test_bad_logit_bias_names_the_key(client, bias, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, logit_bias=bias)
    assert e.value.body["param"] == "logit_bias" and words in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], logit_bias=bias)
    assert e.value.body["param"] == "logit_bias" and words in e.value.body["message"]


def test_logit_bias_bans_and_forces_greedy_tokens(client, model, tiny_tokenizer, engine):
    prompt = PROMPTS[0]
    ref = reference(model, tiny_tokenizer, prompt, 8)[0]
    banned = {str(t): -100 for t in ref.token_ids}
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logit_bias=banned)
    want = reference(model, tiny_tokenizer, prompt, 8, logit_bias={int(t): -100 for t in banned})[0]
    assert r.choices[0].text == want.text and not set(want.token_ids) & set(ref.token_ids)
    forced = tiny_tokenizer.encode(" fox")[-1]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, logit_bias={str(forced): 100}, seed=1)
    assert r.choices[0].text == tiny_tokenizer.decode([forced] * 5)
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logit_bias={str(forced): 100}
    )
    assert chat.choices[0].message.content == tiny_tokenizer.decode([forced] * 4)


# ---- response_format (constrained decoding) -----------------------------------------------------------
try:
    import jsonschema
    import llguidance  # noqa: F401
except ImportError:
    jsonschema = None
needs_structured = pytest.mark.skipif(
    jsonschema is None, reason="response_format needs llguidance (gptlab[structured]) and jsonschema (dev)"
)
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["color", "count", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Describe a thing as JSON."}]


@needs_structured
def test_chat_json_schema_outputs_validate(client, engine):
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, n=4, temperature=1, seed=3, max_tokens=60, response_format=JSON_SCHEMA_FORMAT
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=NAME, messages=CHAT, temperature=1, seed=4, max_tokens=60, response_format=JSON_SCHEMA_FORMAT,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


@needs_structured
def test_json_object_and_the_completions_extensions(client, engine):
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, n=4, temperature=1, seed=5, max_tokens=40,
        response_format={"type": "json_object"},
    )
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and r.usage.completion_tokens > 0
    pattern = r"[0-9]{2}-[a-z]{3}"
    r = client.completions.create(
        model=NAME, prompt="id:", n=4, temperature=1, seed=6, max_tokens=20,
        extra_body={"response_format": {"type": "regex", "pattern": pattern}},
    )
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in r.choices)
    r = client.completions.create(
        model=NAME, prompt="id:", max_tokens=3, extra_body={"response_format": JSON_SCHEMA_FORMAT}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    grammar = 'start: ("yes" | "no") "!"'
    r = client.completions.create(
        model=NAME, prompt="ok?", max_tokens=10, temperature=1, n=4, seed=7,
        extra_body={"response_format": {"type": "grammar", "grammar": grammar}},
    )
    assert all(c.text in ("yes!", "no!") and c.finish_reason == "stop" for c in r.choices)


@needs_structured
@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "xml"}, "type must be one of"),
        ({"type": "json_schema"}, "takes the field(s)"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "strict"),
        ({"type": "regex", "pattern": "(unclosed"}, "invalid regex"),
        ({"type": "grammar", "grammar": "start: nowhere"}, "invalid grammar"),
    ],
)
def test_bad_response_format_is_a_400(client, fmt, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, response_format=fmt)
    assert e.value.body["param"] == "response_format" and words in e.value.body["message"]


def test_malformed_json_oversized_body_and_bad_chat_role(server):
    url, headers = (
        server[0] + "/v1/completions",
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    r = httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers=headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": NAME, "prompt": "x" * 30_000}, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chat = {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}
    r = httpx.post(server[0] + "/v1/chat/completions", json=chat, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"


# ---- continuous batching ---------------------------------------------------------------------------
def test_concurrent_greedy_requests_equal_sequential_ones(client, model, tiny_tokenizer, engine):
    jobs = [(p, 5 + 4 * i) for i, p in enumerate(PROMPTS * 2)]  # 10 requests, 4 slots: some queue
    before = engine.counters["max_batch"]
    engine.counters["max_batch"] = 0

    def one(job):
        prompt, n = job
        return (
            client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [reference(model, tiny_tokenizer, p, n)[0].text for p, n in jobs]
    assert engine.counters["max_batch"] > 1  # they really shared decode steps
    engine.counters["max_batch"] = max(before, engine.counters["max_batch"])


def test_a_newcomer_joins_without_waiting_for_a_long_request(client, engine):
    engine.delay = 0.01
    first_chunk, long_done = threading.Event(), []

    def long_request():
        for chunk in client.completions.create(
            model=NAME, prompt="long", max_tokens=100, temperature=0, stream=True
        ):
            first_chunk.set()
            if chunk.choices[0].finish_reason:
                long_done.append(time.monotonic())

    thread = threading.Thread(target=long_request)
    thread.start()
    assert first_chunk.wait(10)
    r = client.completions.create(model=NAME, prompt="short", max_tokens=3, temperature=0)
    short_done = time.monotonic()
    thread.join(30)
    assert r.choices[0].finish_reason == "length" and long_done
    assert short_done < long_done[0] - 0.3  # finished while the long one still had most of its steps


def test_a_disconnected_streaming_client_frees_its_slot(server, engine):
    engine.delay = 0.02  # 120 tokens would take > 2.4 s
    before = dict(engine.counters)
    body = {"model": NAME, "prompt": "abandon", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.stats()["active"] == 1
    closed = time.monotonic()
    while engine.stats()["active"]:
        assert time.monotonic() - closed < 1.0, "the slot of a disconnected client was not freed"
        time.sleep(0.005)
    assert engine.counters["cancelled"] == before["cancelled"] + 1
    assert engine.counters["tokens"] - before["tokens"] < 60


def test_a_client_timing_out_on_a_blocking_request_is_cancelled(server, engine):
    engine.delay = 0.02
    before = engine.counters["cancelled"]
    body = {"model": NAME, "prompt": "slow", "max_tokens": 120, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3
        )
    deadline = time.monotonic() + 1.0
    while engine.counters["cancelled"] == before:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.005)


def test_an_engine_failure_fails_only_that_request(client, engine, tiny_tokenizer, model, monkeypatch):
    boom = tiny_tokenizer.encode("boom")
    sequence = engine.core.sequence

    def faulty(tokens, **kw):
        if list(tokens) == boom:
            raise RuntimeError("injected fault")
        return sequence(tokens, **kw)

    monkeypatch.setattr(engine.core, "sequence", faulty)
    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(
            client.completions.create, model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0
        )
        bad = pool.submit(client.completions.create, model=NAME, prompt="boom", max_tokens=6, temperature=0)
        with pytest.raises(openai.InternalServerError) as e:
            bad.result()
        assert "injected fault" in e.value.body["message"]
        assert ok.result().choices[0].text == reference(model, tiny_tokenizer, PROMPTS[0], 6)[0].text
    stream = client.completions.create(model=NAME, prompt="boom", max_tokens=6, stream=True)
    with pytest.raises(openai.APIError, match="injected fault"):
        list(stream)
    assert client.completions.create(model=NAME, prompt="fine", max_tokens=2).choices[0].text is not None


def test_full_queue_answers_429(model, tiny_tokenizer):
    engine = SlowEngine(model, tiny_tokenizer, max_concurrent=1, max_queue=1)
    engine.delay = 0.02
    app = create_app(model, tiny_tokenizer, model_name=NAME, engine=engine)
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(c.completions.create, model=NAME, prompt="a", max_tokens=60)
            while engine.stats()["active"] == 0:
                time.sleep(0.005)
            queued = pool.submit(c.completions.create, model=NAME, prompt="b", max_tokens=2)
            while engine.stats()["waiting"] == 0:
                time.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=NAME, prompt="c", max_tokens=2)
            assert e.value.code == "queue_full"
            engine.delay = 0.0
            assert running.result().usage.completion_tokens == 60 and queued.result().choices


def test_cpu_server_leaves_a_core_for_the_event_loop():
    from gptlab.serve.app import default_threads

    assert [default_threads(n) for n in (1, 2, 16)] == [1, 1, 15]


# ---- the serve command ---------------------------------------------------------------------------
def test_serve_command_runs_cpu_models_on_decoding_kernels(tmp_path, monkeypatch, model, tiny_tokenizer):
    import copy

    import uvicorn

    from gptlab.checkpoint import save_model
    from gptlab.infer.cpu import kernels as cpu_kernels
    from gptlab.serve.app import serve

    save_model(copy.deepcopy(model), tmp_path / "ckpt", tiny_tokenizer)
    served = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.update(app=self.config.app))
    threads = torch.get_num_threads()
    try:
        serve(tmp_path / "ckpt", port=0, threads=threads, quantize=None)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    app = served["app"]
    kinds = {type(m).__name__ for m in app.state.server.engine.model.modules()}
    assert ("KernelLinear" in kinds) == cpu_kernels.available()
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        r = client.completions.create(model="ckpt", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert r.choices[0].text == reference(model, tiny_tokenizer, PROMPTS[1], 10)[0].text
    with pytest.raises(ValueError, match="runs on CPU"):
        serve(tmp_path / "ckpt", port=0, device="meta", quantize="int8")


@pytest.mark.parametrize("lengths", [[3, 17, 9], [5, 1, 30, 12, 7, 9, 2, 16, 11, 4, 8]])
def test_batched_step_on_the_fused_cpu_kernels_equals_the_torch_step(model, tiny_tokenizer, lengths):
    """Rows of different lengths share one step of gptlab's one-call C decoding step through their
    block tables (one layer banded, rows inside and past its window; some rows sharing prompt blocks);
    more rows than one call takes run as consecutive calls."""
    import copy

    from gptlab.infer.cpu import kernels as cpu_kernels
    from gptlab.infer.engine import InferenceEngine
    from gptlab.infer.prepare import prepare_model

    if not cpu_kernels.available():
        pytest.skip("gptlab's CPU kernels did not build here (no C compiler or no AVX2)")
    kernel_model = prepare_model(copy.deepcopy(model))
    results, calls, counted = [], [], []
    for kernels in (True, False):
        engine = InferenceEngine(kernel_model, kv_cache_tokens=512, block_size=4, kernels=kernels)
        if kernels:
            fused = engine.fast
            fused.max_rows = 8  # 11 rows: calls of 8 and 3
            fn = fused._fn
            fused._fn = lambda *args: calls.append(args[1]) or fn(*args)
        torch.manual_seed(0)
        seqs = [engine.sequence(torch.randint(0, 50, (n,)).tolist()) for n in lengths]
        engine.forward(seqs)
        seqs.append(engine.fork(seqs[0]))  # shares every block of row 0, its last one copied on write
        calls.clear()
        for i, seq in enumerate(seqs):
            seq.tokens.append(5 + i)
        results.append(engine.forward(seqs))
        for seq in seqs:
            seq.tokens.append(1)
        results.append(engine.forward(seqs))
        engine.pool.check()
        counted += calls
    rows = len(lengths) + 1
    assert counted == ([rows] if rows <= 8 else [8, rows - 8]) * 2
    torch.testing.assert_close(results[0], results[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1], results[3], atol=1e-5, rtol=1e-5)
