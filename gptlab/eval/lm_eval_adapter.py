"""lm-evaluation-harness adapter: gptlab checkpoints as the lm-eval model type `gptlab`.

lm-eval 0.4 finds models only in its registry, which this module fills on import (it has no plugin
entry points), so run the harness through this module:

    python -m gptlab.eval.lm_eval_adapter --model gptlab --model_args pretrained=runs/x \\
        --tasks my_task --include_path DIR [any other lm_eval option]

or from Python: `import gptlab.eval.lm_eval_adapter` then `lm_eval.simple_evaluate(model="gptlab",
model_args={"pretrained": ...}, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=DIR))`.

model_args: pretrained (checkpoint, run or Hugging Face GPT-2 directory), tokenizer (default: the
checkpoint's), dtype (float32 | bfloat16 | float16), max_length (default n_ctx; the window of
loglikelihood_rolling). lm_eval's own --device and --batch_size options reach the model too
(batch size "auto" means 16; a CUDA device on a machine without one means the CPU, as in lm-eval's
Hugging Face backend).

lm-eval indexes its several thousand built-in task files before every run (about half a minute); from
Python, `TaskManager(include_path=DIR, include_defaults=False)` skips that for local tasks.

Scores come from the same code as `gptlab eval`: `loglikelihood` uses lm-eval's context /
continuation tokenization (`gptlab.eval.scoring.encode_pair`), `loglikelihood_rolling` lm-eval's own
rolling windows, `generate_until` greedy decoding with `gptlab.infer.generate`.

`write_lm_eval_task` turns a gptlab task file into an lm-eval task directory (YAML + JSONL per split)
with the same prompts, so the two harnesses can be run on the same items.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the lm-evaluation-harness adapter needs lm-eval ({e}); install it with: pip install 'gptlab[eval]'"
    ) from None

import torch
from tqdm import tqdm

from gptlab.eval.scoring import encode_pair, greedy_until, score_pairs
from gptlab.eval.tasks import Task, load_task

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("gptlab")
class GptlabLM(LM):
    """A gptlab model behind lm-eval's `LM` interface."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = "cpu",
        dtype: str = "float32",
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from gptlab.checkpoint import load_model, load_tokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        device = _resolve_device(device)
        self.model = load_model(pretrained, device=device, dtype=_DTYPES[dtype])
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        self._device = torch.device(device)
        # lm-eval passes batch_size as a string, "auto" included; auto-sizing is not implemented
        self.batch_size = (
            16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        )
        self.max_length = int(max_length) if max_length else self.model.config.n_ctx
        if not 1 <= self.max_length <= self.model.config.n_ctx:
            raise ValueError(f"max_length must be in [1, n_ctx={self.model.config.n_ctx}], got {max_length}")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.fingerprint()

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in args]
        results = score_pairs(self.model, pairs, batch_size=self.batch_size, progress=not disable_tqdm)
        for a, r in zip(args, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", a, r)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tokenizer.encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = score_pairs(self.model, windows, batch_size=self.batch_size)
            total = sum(ll for ll, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, stops, limits = [], [], []
        eot_text = self.tokenizer.decode([self.eot_token_id])
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError(
                    "the gptlab adapter decodes greedily only; set do_sample: false, temperature: 0"
                )
            prompts.append(context)
            stops.append([*until, eot_text])
            limits.append(int(kwargs.pop("max_gen_toks", 256)))
        results = greedy_until(
            self.model, self.tokenizer, prompts, stops, limits, self.batch_size, not disable_tqdm
        )
        for req, r in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, r)
        return results


def _resolve_device(device: str | None) -> str:
    """lm-eval's command line passes "cuda:0" unless told otherwise; like its Hugging Face backend, take
    that (or None) to mean "CUDA if there is one, else the CPU"."""
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            logger.warning("device %r is not available; using %r", device, chosen)
        return chosen
    return device


def write_lm_eval_task(task_file: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/<name>.yaml` and one JSONL per split, an lm-eval task with the same prompts,
    choices and scoring as `gptlab eval fewshot` on `task_file`; returns the YAML path."""
    import yaml

    task = load_task(task_file)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, items in (("train", task.train), ("test", task.test)):
        if not items:
            continue
        path = out_dir / f"{task.name}.{split}.jsonl"
        rows = [
            {"context": i.context, "choices": list(i.choices), "gold": i.gold, "target": i.target}
            for i in items
        ]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        data_files[split] = str(path)
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "doc_to_text": "context",
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
        **({"description": task.description + task.fewshot_delimiter} if task.description else {}),
        **({"fewshot_split": "train"} if task.train else {}),
        **_kind_config(task),
    }
    yaml_path = out_dir / f"{task.name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return yaml_path


def _kind_config(task: Task) -> dict[str, Any]:
    if task.kind == "multiple_choice":
        return {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }
    if task.kind == "cloze":
        # lm-eval's `loglikelihood` requests are (context, doc_to_target) with no delimiter between them
        # (its LAMBADA puts the space in doc_to_target), so the delimiter moves into the target template
        return {
            "output_type": "loglikelihood",
            "target_delimiter": "",
            "doc_to_target": "{{" + json.dumps(task.target_delimiter) + " + target}}",
            "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}],
        }
    return {
        "output_type": "generate_until",
        "doc_to_target": "target",
        "generation_kwargs": {"until": list(task.stop), "max_gen_toks": task.max_tokens, "do_sample": False},
        "filter_list": [
            {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
        ],
        "metric_list": [{"metric": "exact_match"}],
    }


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `gptlab` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
