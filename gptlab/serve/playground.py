"""The playground page served at `/`: one self-contained HTML file (no CDN, no build step).

It posts to /v1/completions with `stream: true` and reads the Server-Sent Events with fetch +
ReadableStream, appending text as it arrives, and shows the token counts from the final usage chunk.
"""

from __future__ import annotations

import json

_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gptlab playground</title>
<style>
  :root { color-scheme: light dark; --accent: #3b6fd8; }
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .8rem; } h1 small { font-weight: normal; opacity: .7; }
  textarea { width: 100%; box-sizing: border-box; font: 14px/1.4 ui-monospace, monospace; padding: .5rem; }
  .controls { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; align-items: end; margin: .6rem 0; }
  label { display: flex; flex-direction: column; font-size: .85rem; gap: .2rem; }
  input[type=number] { width: 6rem; } input[type=password] { width: 12rem; }
  button { font-size: 1rem; padding: .4rem 1.1rem; cursor: pointer; }
  #generate { background: var(--accent); color: white; border: 0; border-radius: 4px; }
  #generate:disabled { opacity: .5; cursor: default; }
  #output { white-space: pre-wrap; word-wrap: break-word; font: 14px/1.45 ui-monospace, monospace;
            border: 1px solid #8884; border-radius: 4px; padding: .6rem; min-height: 8rem; }
  #output .prompt { opacity: .55; }
  #stats, #status { font-size: .85rem; opacity: .8; margin: .4rem 0; }
  .error { color: #d33; }
</style>
</head>
<body>
<h1>gptlab playground <small id="model"></small></h1>
<textarea id="prompt" rows="6" placeholder="Type a prompt, then press Generate (Ctrl+Enter)"></textarea>
<div class="controls">
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="64"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>top_p <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="1"></label>
  <label>API key (if the server needs one) <input id="api_key" type="password" autocomplete="off"></label>
  <button id="generate">Generate</button>
  <button id="stop" disabled>Stop</button>
</div>
<div id="output"><span class="prompt"></span><span class="completion"></span></div>
<div id="stats">prompt tokens: <span id="prompt_tokens">-</span> &middot; completion tokens:
  <span id="completion_tokens">-</span> &middot; <span id="speed">-</span></div>
<div id="status">ready</div>
<script type="application/json" id="config">__CONFIG__</script>
<script>
"use strict";
const config = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
$("model").textContent = config.model + " (context " + config.n_ctx + ")";
$("api_key").value = sessionStorage.getItem("gptlab_api_key") || "";
let controller = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function generate() {
  const prompt = $("prompt").value;
  const key = $("api_key").value.trim();
  sessionStorage.setItem("gptlab_api_key", key);
  const out = $("output");
  out.querySelector(".prompt").textContent = prompt;
  const completion = out.querySelector(".completion");
  completion.textContent = "";
  $("prompt_tokens").textContent = "-";
  $("completion_tokens").textContent = "0";
  $("speed").textContent = "-";
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = {
    model: config.model, prompt: prompt, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("max_tokens").value, 10), temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
  };
  const started = performance.now();
  let chunks = 0, finish = null;
  try {
    const res = await fetch("/v1/completions", {
      method: "POST", headers: headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error.message; } catch (e) {}
      throw new Error(message);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) {
            $("prompt_tokens").textContent = msg.usage.prompt_tokens;
            $("completion_tokens").textContent = msg.usage.completion_tokens;
          }
          for (const choice of msg.choices || []) {
            if (choice.text) {
              completion.textContent += choice.text;
              chunks += 1;
              $("completion_tokens").textContent = chunks;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const n = parseInt($("completion_tokens").textContent, 10) || 0;
    $("speed").textContent = (n / seconds).toFixed(1) + " tokens/s";
    setStatus("done (" + (finish || "stopped") + ") in " + seconds.toFixed(2) + " s");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped");
    else setStatus("error: " + e.message, true);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
});
</script>
</body>
</html>
"""


def playground_html(model_name: str, n_ctx: int) -> str:
    """The page, with the model's name and context embedded as JSON (safe inside <script>)."""
    config = json.dumps({"model": model_name, "n_ctx": n_ctx}).replace("<", "\\u003c")
    return _PAGE.replace("__CONFIG__", config)
