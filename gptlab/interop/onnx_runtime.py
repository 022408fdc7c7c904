"""Running an ONNX export (gptlab.interop.onnx) with onnxruntime: logits, and generation with the KV cache.

`gptlab generate ONNX_DIR` decodes here: each step feeds the graph's `present.*` outputs back as its
`past_key_values.*` inputs, so a token costs one position, not the whole sequence. The tokens are chosen
by gptlab.infer.rows (`make_rows` / `advance`): the same penalties, temperature, top-k / top-p / min-p,
per-sample seeded generators, stop sequences and constraints as generation on the PyTorch model, so a
seeded request gives the same tokens on both (up to onnxruntime's ~1e-6 differences in the logits).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.infer.generate import check_vocab, encode_prompts, fit_prompts, raise_failures
from gptlab.infer.rows import Completion, Row, TextTokenizer, advance, make_rows
from gptlab.infer.sampling import SamplingParams
from gptlab.interop.onnx import EXPORT_INFO_FILE, MODEL_FILE, io_names, require


def is_onnx_export(path: str | Path) -> bool:
    """True for a directory written by `gptlab export --format onnx`."""
    path = Path(path)
    return (path / EXPORT_INFO_FILE).is_file() and (path / MODEL_FILE).is_file()


class OnnxDecoder:
    """`model.onnx` in an onnxruntime CPU session, with the export's shapes."""

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        export_dir = Path(export_dir)
        for needed in (export_dir / MODEL_FILE, export_dir / EXPORT_INFO_FILE):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{needed} does not exist; write the directory with `gptlab export CKPT --format onnx --out DIR`"
                )
        info = json.loads((export_dir / EXPORT_INFO_FILE).read_text())
        if info.get("inputs") != io_names(info["model"]["n_layer"])[0]:
            raise ValueError(
                f"{export_dir} was written by an older gptlab (inputs {info.get('inputs', [])[:3]}...); "
                "export it again with `gptlab export CKPT --format onnx --out DIR --overwrite`"
            )
        self.n_layer, self.n_head = info["model"]["n_layer"], info["model"]["n_head"]
        self.head_size = info["model"]["n_embd"] // self.n_head
        self.n_ctx, self.vocab_size = info["model"]["n_ctx"], info["model"]["vocab_size"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(export_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = io_names(self.n_layer)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_size), dtype=np.float32) for _ in self.inputs[3:]]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward call: (B, T) ids, (B, P + T) mask (0 = left padding), 2 * n_layer past arrays ->
        logits (B, T, V), presents. Positions count real tokens only, as in gptlab's generation."""
        positions = (mask.cumsum(axis=1) - 1).clip(min=0)[:, -ids.shape[1] :]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
        feed |= dict(zip(self.inputs[3:], past, strict=True))
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def logits(self, input_ids: Any) -> np.ndarray:
        """Logits (B, T, V) of an int64 (B, T) array, from an empty cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self.step(ids, np.ones_like(ids), self.empty_past(ids.shape[0]))[0]

    def decode(self, rows: Sequence[Row], eos_id: int | None) -> Iterator[None]:
        """Decode every row until it finishes, yielding after each step (for streaming). Prompts are
        left-padded into one batch; finished rows leave the batch, their cache with them."""
        for r in rows:
            if not r.params.max_new_tokens:
                r.finish_reason = "length"
        live = [r for r in rows if not r.done]
        if not live:
            return
        longest = max(len(r.prompt) for r in live)
        ids = np.zeros((len(live), longest), dtype=np.int64)
        mask = np.zeros((len(live), longest), dtype=np.int64)
        for b, r in enumerate(live):
            ids[b, longest - len(r.prompt) :] = r.prompt
            mask[b, longest - len(r.prompt) :] = 1
        past = self.empty_past(len(live))
        while True:
            logits, past = self.step(ids, mask, past)
            advance(live, torch.from_numpy(np.ascontiguousarray(logits[:, -1])), eos_id, self.n_ctx)
            yield
            keep = [b for b, r in enumerate(live) if not r.done]
            if not keep:
                return
            if len(keep) < len(live):
                live, mask, past = [live[b] for b in keep], mask[keep], [p[keep] for p in past]
            ids = np.array([[r.ids[-1]] for r in live], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((len(live), 1), dtype=np.int64)], axis=1)

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_id: int | None = None
    ) -> list[list[int]]:
        """New ids per prompt (`params.n` per prompt, in order), the eos token excluded."""
        rows = self._rows([list(map(int, p)) for p in prompts], params, None)
        for _ in self.decode(rows, eos_id):
            pass
        raise_failures(rows)
        return [r.ids for r in rows]

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: max_new_tokens new ids (no end-of-text stop)."""
        return self.generate_ids(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))

    def generate(
        self, tokenizer: TextTokenizer, prompts: str | Sequence[str], params: SamplingParams, truncate: bool = True
    ) -> list[Completion]:
        """Completions of each prompt, as `gptlab.infer.generate.generate` gives them."""
        ids = fit_prompts(encode_prompts(tokenizer, prompts), self.n_ctx, params.max_new_tokens, truncate)
        rows = self._rows(ids, params, tokenizer)
        for _ in self.decode(rows, tokenizer.eot_id):
            pass
        raise_failures(rows)
        return [r.completion() for r in rows]

    def stream(
        self, tokenizer: TextTokenizer, prompt: str, params: SamplingParams, truncate: bool = True
    ) -> Iterator[str]:
        """Text deltas of one completion as tokens are generated (stop sequences held back)."""
        if params.n != 1:
            raise ValueError("stream produces one completion: use n=1 (or generate())")
        ids = fit_prompts(encode_prompts(tokenizer, prompt), self.n_ctx, params.max_new_tokens, truncate)
        rows = self._rows(ids, params, tokenizer)
        tracker = rows[0].tracker
        assert tracker is not None
        for _ in self.decode(rows, tokenizer.eot_id):
            if text := tracker.delta():
                yield text
        raise_failures(rows)
        tracker.finish()
        if text := tracker.delta(final=True):
            yield text

    def _rows(self, prompts: list[list[int]], params: SamplingParams, tokenizer: TextTokenizer | None) -> list[Row]:
        params.validate()
        if params.num_beams != 1:
            raise ValueError("beam search runs on the PyTorch model only; use a checkpoint, or num_beams=1")
        if not prompts or any(not p for p in prompts):
            raise ValueError("pass one or more non-empty prompts")
        check_vocab(params, self.vocab_size)
        return make_rows(fit_prompts(prompts, self.n_ctx, params.max_new_tokens, truncate=False), params, tokenizer)


def run_logits(export_dir: str | Path, input_ids: Any) -> np.ndarray:
    """Logits of `model.onnx` for an int64 (B, T) array from an empty cache (a convenience for checks)."""
    return OnnxDecoder(export_dir).logits(input_ids)


def run_onnx_generate(
    export_dir: str | Path,
    prompt: str | None,
    params: SamplingParams,
    *,
    tokenizer: str | Path | None = None,
    interactive: bool = False,
    truncate: bool = True,
    threads: int | None = None,
    out: Any = None,
) -> int:
    """`gptlab generate ONNX_DIR`: what `gptlab generate CKPT` does, decoding with onnxruntime."""
    import sys

    from gptlab.checkpoint import load_tokenizer
    from gptlab.infer.generate import prompt_loop

    out = out or sys.stdout
    decoder = OnnxDecoder(export_dir, threads)
    tok = load_tokenizer(tokenizer or export_dir)

    def complete(text: str) -> None:
        if params.n == 1:
            for delta in decoder.stream(tok, text, params, truncate):
                out.write(delta)
                out.flush()
            out.write("\n")
        else:
            for i, c in enumerate(decoder.generate(tok, text, params, truncate)):
                out.write(f"--- completion {i + 1} ({c.finish_reason}) ---\n{c.text}\n")
            out.flush()

    return prompt_loop(complete, prompt, interactive, out)
