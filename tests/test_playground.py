"""The playground page at / in headless Chromium (Playwright driving Debian's /usr/bin/chromium):
type a prompt, press Generate, watch the streamed text appear and the token counts arrive.

Setup: `apt-get install -y chromium && pip install playwright` (never `playwright install`)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi")

from gptlab.config import ModelConfig  # noqa: E402
from gptlab.infer.generate import generate  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.serve.app import create_app, serve_in_thread  # noqa: E402
from gptlab.serve.engine import Engine  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    for path in (os.environ.get("GPTLAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if path and os.path.isfile(path):
            return path
    pytest.skip("no Chromium found (apt-get install -y chromium, or set GPTLAB_CHROMIUM)")


class _PacedEngine(Engine):
    """Decode steps 20 ms apart, so the page is seen mid-stream."""

    def _decode(self):
        time.sleep(0.02)
        return super()._decode()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=2, n_head=2, n_embd=32, n_ctx=128, vocab_size=tiny_tokenizer.vocab_size, tie_embeddings=False
    )
    model = GPT(config).eval()
    with torch.no_grad():  # spread-out logits: no greedy near-ties; never <|endoftext|>
        model.transformer.wte.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
        model.lm_head.weight[tiny_tokenizer.eot_id] = 0
    return model


def test_playground_streams_a_completion(model, tiny_tokenizer):
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    prompt, max_tokens = "The quick brown fox", 30
    expected = generate(model, tiny_tokenizer, prompt, temperature=0, max_new_tokens=max_tokens)[0].text
    app = create_app(
        model,
        tiny_tokenizer,
        model_name="tiny",
        api_key="sk-page",
        engine=_PacedEngine(model, tiny_tokenizer, max_concurrent=2),
    )
    with serve_in_thread(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert "tiny" in page.text_content("#model")
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", str(max_tokens))
            page.fill("#temperature", "0")
            page.fill("#api_key", "sk-page")
            page.click("#generate")
            # Mid-stream: some text shown while the request is still running.
            page.wait_for_function(
                "document.querySelector('#output .completion').textContent.length > 0"
                " && document.getElementById('status').textContent.startsWith('generating')",
                timeout=10_000,
            )
            partial = page.text_content("#output .completion")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('done')", timeout=20_000
            )
            final = page.text_content("#output .completion")
            assert final == expected and len(partial) < len(final)
            assert page.text_content("#output .prompt") == prompt
            assert page.text_content("#prompt_tokens") == str(len(tiny_tokenizer.encode(prompt)))
            assert page.text_content("#completion_tokens") == str(max_tokens)
            assert "length" in page.text_content("#status")

            page.fill("#api_key", "wrong")  # the page reports the server's error
            page.click("#generate")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('error')", timeout=10_000
            )
            assert "API key" in page.text_content("#status")
        finally:
            browser.close()
