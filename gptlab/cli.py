"""Command line: parses arguments and calls the importable function that does the work.

Each command is registered by an `_add_<command>` function; nothing here holds logic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gptlab


class CLIError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


# ---- argument types: a bad value is a one-line usage error before anything loads ----------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535 (0: any free port), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _host_name(text: str) -> str:
    """A DNS name a request's Host header may give ('*': any); IP addresses are always accepted."""
    import re

    label = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
    if text == "*" or re.fullmatch(rf"{label}(\.{label})*\.?", text):
        return text
    raise argparse.ArgumentTypeError(
        f"expected a host name such as example.com (no scheme or port) or '*', got {text!r}"
    )


def _origin(text: str) -> str:
    """A browser origin, scheme://host[:port] exactly as browsers send it, or '*'."""
    from urllib.parse import urlsplit

    if text == "*":
        return text
    try:
        parts = urlsplit(text)
        valid = parts.port is None or parts.port > 0  # .port raises on a port that is no number or too big
    except ValueError:
        valid = False
    valid = valid and parts.scheme in ("http", "https") and bool(parts.hostname)
    if not valid or text != f"{parts.scheme}://{parts.netloc}":
        raise argparse.ArgumentTypeError(
            f"expected an origin such as https://example.com or http://localhost:3000 (no path or trailing "
            f"slash) or '*', got {text!r}"
        )
    return text


def _logit_bias(text: str) -> tuple[int, float]:
    token, _, bias = text.partition(":")
    try:
        value = int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID:BIAS (like 50256:-100), got {text!r}") from None
    if value[0] < 0 or not -100 <= value[1] <= 100:
        raise argparse.ArgumentTypeError(f"ID must be >= 0 and BIAS in [-100, 100], got {text!r}")
    return value


def _device(text: str) -> str:
    """A torch device string this machine has ('auto' passes through for commands that take it)."""
    if text in ("auto", "cpu"):
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0-{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: gptlab runs on cpu, cuda or mps devices")
    return text


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="table of every model preset with its size and FLOPs")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")

    def run(args: argparse.Namespace) -> int:
        from gptlab.presets import preset_rows
        from gptlab.reports.table import format_table

        rows = preset_rows()
        print(json.dumps(rows, indent=2) if args.json else format_table(rows, markdown=args.markdown))
        return 0

    p.set_defaults(func=run)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between Hugging Face GPT-2 directories and gptlab checkpoints, and between sharded "
        "(DCP) and single-file training checkpoints",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from-hf", metavar="DIR", help="Hugging Face GPT-2 directory (or Hub id org/name) -> gptlab checkpoint"
    )
    src.add_argument(
        "--to-hf", metavar="CKPT", help="gptlab checkpoint or run directory -> Hugging Face GPT-2 directory"
    )
    src.add_argument(
        "--from-dcp", metavar="CKPT", help="sharded (DCP) training checkpoint -> single-file checkpoint (resumable)"
    )
    src.add_argument("--to-dcp", metavar="CKPT", help="single-file training checkpoint -> sharded (DCP) checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")

    def run(args: argparse.Namespace) -> int:
        from gptlab.interop.convert import convert_from_hf, convert_to_hf

        if args.from_dcp or args.to_dcp:
            from gptlab.train.sharded import sharded_to_single, single_to_sharded

            convert = sharded_to_single if args.from_dcp else single_to_sharded
            out = convert(args.from_dcp or args.to_dcp, args.out, overwrite=args.overwrite)
        elif args.from_hf:
            out = convert_from_hf(args.from_hf, args.out, overwrite=args.overwrite)
        else:
            out = convert_to_hf(args.to_hf, args.out, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0

    p.set_defaults(func=run)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE, or encode / decode with one")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tsub.add_parser("train", help="train a GPT-2 style byte-level BPE on text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="ids in total, <|endoftext|> included")
    train.add_argument("--out", required=True, metavar="DIR", help="where to write vocab.json + merges.txt")
    train.add_argument("--min-frequency", type=int, default=2, help="ignore pairs seen fewer times")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    encode = tsub.add_parser("encode", help="print the token ids of TEXT (stdin when TEXT is '-')")
    encode.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer or checkpoint directory")
    encode.add_argument("--allow-special", action="store_true", help="match <|endoftext|> as one id")
    encode.add_argument("text", metavar="TEXT")
    decode = tsub.add_parser("decode", help="print the text of token IDS")
    decode.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer or checkpoint directory")
    decode.add_argument("ids", nargs="+", type=int, metavar="ID")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from gptlab.checkpoint import load_tokenizer
        from gptlab.tokenizer import Tokenizer

        if args.tokenizer_command == "train":
            files = [Path(f) for f in args.input]
            tok = Tokenizer.train(
                files, args.vocab_size, min_frequency=args.min_frequency, show_progress=not args.no_progress
            )
            out = tok.save(args.out)
            print(f"saved a {tok.vocab_size}-token BPE (fingerprint {tok.fingerprint()}) to {out}")
        elif args.tokenizer_command == "encode":
            text = sys.stdin.read() if args.text == "-" else args.text
            allowed = "all" if args.allow_special else ()
            print(" ".join(map(str, load_tokenizer(args.tokenizer).encode(text, allowed_special=allowed))))
        else:
            sys.stdout.write(load_tokenizer(args.tokenizer).decode(args.ids) + "\n")
        return 0

    p.set_defaults(func=run)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="parallel sizes, memory per GPU and training time for a model on N GPUs")
    p.add_argument("model", help="preset name (see `gptlab configs`)")
    p.add_argument("--gpu", required=True, help="accelerator name, e.g. H100, A100")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: the model's context)")
    p.add_argument("--global-batch", type=int, default=1536, help="sequences per optimizer step")
    p.add_argument("--tokens", type=float, default=300e9, help="training tokens")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the time assumes")
    p.add_argument("--tensor-parallel", type=int, help="tensor-parallel size (default: the smallest that fits)")
    p.add_argument(
        "--activation-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="recompute activations in the backward (auto: only when nothing fits without)",
    )
    p.add_argument("--out", default="plan.json", help="config file `gptlab train --config` runs")

    def run(args: argparse.Namespace) -> int:
        from gptlab.presets import preset
        from gptlab.reports.planner import format_plan, plan, write_plan_config

        checkpointing = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
        p_ = plan(
            preset(args.model), args.gpu, args.gpus, args.seq_len, args.global_batch, args.tokens, args.mfu,
            checkpointing, args.tensor_parallel,
        )  # fmt: skip
        print(format_plan(p_))
        print(f"wrote {write_plan_config(p_, args.model, args.out)}")
        return 0

    p.set_defaults(func=run)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="models side by side (size, FLOPs, memory, time) or training runs (loss curves, final metrics)",
        description="Compare presets / model config files (sizing table), or run directories (loss curves "
        "by step, tokens and FLOPs, and final metrics). Run directories are detected automatically.",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", help="preset name, config file (toml/yaml/json) or run dir"
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV (quantities as rows)")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument(
        "--plot", metavar="FILE.png", help="write a log-scale bar chart (models) or loss curves (runs)"
    )
    p.add_argument("--tokens", default="300e9", help="training token budget, e.g. 300e9 or 300B")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (activations)")
    p.add_argument("--gpu", default="A100", help="accelerator: A100, H100, H200, V100, L4, RTX4090, ...")
    p.add_argument("--gpus", type=int, default=1, help="number of accelerators (default 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for training time")

    def run(args: argparse.Namespace) -> int:
        from gptlab.reports.compare import parse_tokens, run_compare

        fmt_name = "json" if args.json else "csv" if args.csv else "markdown" if args.markdown else "table"
        print(
            run_compare(
                args.models, fmt=fmt_name, plot=args.plot, tokens=parse_tokens(args.tokens),
                micro_batch=args.micro_batch, gpu=args.gpu, n_gpus=args.gpus, mfu=args.mfu,
            )
        )
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a Markdown report card for a training run, with its loss curve")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `gptlab train`")
    p.add_argument("--out", metavar="FILE.md", help="report file (default RUN_DIR/report.md); PNG beside it")
    p.add_argument("--no-sample", action="store_true", help="skip the sample from the latest checkpoint")
    p.add_argument("--prompt", default="def ", help="prompt for the sample (default 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the sample in tokens")

    def run(args: argparse.Namespace) -> int:
        from gptlab.reports.run_report import write_report

        out = write_report(
            args.run_dir, args.out, sample=not args.no_sample, prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
        )
        print(out)
        return 0

    p.set_defaults(func=run)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text files / JSONL into training shards (default: the Python standard library)",
        description="Tokenize documents into a dataset directory of uint16/uint32 token shards with a "
        "train/val split and manifest.json. An interrupted run resumes when re-run with the same arguments.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="text files, directories (recursive), globs or .jsonl files (one JSON object per line); "
        "none: the running Python's standard-library .py files",
    )
    p.add_argument(
        "--tokenizer", required=True, metavar="DIR",
        help="tokenizer directory (vocab.json + merges.txt, encoder.json + vocab.bpe or tokenizer.json) or a "
        "checkpoint / run directory holding one; a local path, never a hub name",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--shard-tokens", type=int, help="tokens per shard, at least (default 2**24)")
    p.add_argument("--jsonl-field", default="text", metavar="NAME", help="text field of .jsonl records")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from gptlab.checkpoint import load_tokenizer
        from gptlab.data.prepare import prepare, summary
        from gptlab.tokenizer import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_pretrained(path) if path.is_file() else load_tokenizer(path)
        extra = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
        manifest = prepare(
            args.inputs or None, args.out, tok, val_fraction=args.val_fraction, seed=args.seed,
            jsonl_field=args.jsonl_field, num_workers=args.workers, progress=not args.no_progress, **extra,
        )
        print(summary(manifest, args.out))
        return 0

    p.set_defaults(func=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity / bits per byte of text, or few-shot accuracy on a task")
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION", required=True)
    ppl = esub.add_parser("perplexity", help="sliding-window perplexity and bits per byte of text files")
    checkpoint_help = "gptlab checkpoint / run, or Hugging Face GPT-2 directory"
    ppl.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    ppl.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: max_length/2)")
    ppl.add_argument("--max-length", type=int, default=None, help="window length in tokens (default n_ctx)")
    ppl.add_argument("--no-eot", action="store_true", help="do not put <|endoftext|> before each document")
    few = esub.add_parser("fewshot", help="zero/one/few-shot accuracy on a JSONL task (see examples/tasks)")
    few.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    few.add_argument("--task", required=True, metavar="FILE.jsonl", help="task file (see examples/tasks)")
    few.add_argument("--shots", type=int, default=0, help="train-split examples put before each item")
    few.add_argument("--seed", type=int, default=1234, help="seed of the example draw")
    few.add_argument("--limit", type=int, default=None, help="score only the first N test items")
    suite = esub.add_parser(
        "suite", help="the GPT-3 paper's tasks (LAMBADA, HellaSwag, PIQA, ARC, OpenBookQA, WinoGrande, BoolQ, "
        "TriviaQA) at zero, one and few shots: results table, JSON and plots"
    )
    suite.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help=checkpoint_help + " (one or more)")
    suite.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    suite.add_argument("--shots", default="0,1,5", help="comma-separated numbers of examples in the prompt")
    suite.add_argument("--data", default=None, metavar="PATH",
                       help="directory holding each task's distributed files under PATH/<task>/ (default: "
                       "the Hugging Face hub through `datasets`, when online)")  # fmt: skip
    suite.add_argument("--style", choices=("paper", "lm-eval"), default="paper",
                       help="prompt formats: the GPT-3 paper's appendix G, or lm-evaluation-harness's")  # fmt: skip
    suite.add_argument("--seed", type=int, default=1234, help="seed of the example draws")
    suite.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    suite.add_argument("--out", default="suite", metavar="DIR", help="where results.md/.json and the plots go")
    for q in (ppl, few):
        q.add_argument("--out", default=None, metavar="FILE.json", help="also write the full result as JSON")
    for q in (ppl, few, suite):
        q.add_argument("--tokenizer", default=None, metavar="DIR", help="default: the checkpoint's tokenizer")
        q.add_argument("--device", type=_device, default="cpu", help="torch device")
        q.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(args: argparse.Namespace) -> int:
        common = dict(
            out=args.out, tokenizer=args.tokenizer, device=args.device, batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        if args.eval_command == "perplexity":
            from gptlab.eval.perplexity import run_perplexity

            r = run_perplexity(
                args.checkpoint, args.data, stride=args.stride, max_length=args.max_length,
                prepend_eot=not args.no_eot, **common,
            )
            print(
                f"tokens {r['tokens']}  nll {r['nll']:.4f}  perplexity {r['perplexity']:.3f}  "
                f"bits/byte {r['bits_per_byte']:.4f}  (max_length {r['max_length']}, stride {r['stride']})"
            )
        elif args.eval_command == "suite":
            from gptlab.eval.suite_run import run_suite

            r = run_suite(
                args.checkpoints, args.tasks, args.shots, data=args.data, style=args.style, seed=args.seed,
                limit=args.limit, **common,
            )
            print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
            print("wrote " + ", ".join(r["files"]))
        else:
            from gptlab.eval.fewshot import run_fewshot

            r = run_fewshot(args.checkpoint, args.task, args.shots, args.seed, args.limit, **common)
            m = r["metrics"]
            parts = []
            for k in ("acc", "acc_norm"):
                if k in m:
                    stderr = m[k + "_stderr"]
                    parts.append(f"{k} {m[k]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
            print(f"{r['task']} ({r['kind']}, {r['shots']}-shot, n={r['n']}): " + "  ".join(parts))
        return 0

    p.set_defaults(func=run)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from gptlab.infer.sampling import SamplingParams

    d = {f.name: f.default for f in fields(SamplingParams) if f.name != "stop"}
    p = sub.add_parser("generate", help="generate text from a checkpoint, streamed as it is produced")
    p.add_argument(
        "checkpoint", metavar="CKPT", help="gptlab run / checkpoint, Hugging Face GPT-2 dir, or ONNX export dir"
    )
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="text to continue")
    p.add_argument("-i", "--interactive", action="store_true", help="then read prompts from stdin")
    option = p.add_argument
    option("--max-new-tokens", type=int, default=d["max_new_tokens"], help="tokens to generate")
    option("--temperature", type=float, default=d["temperature"], help="0 means greedy")
    option("--top-k", type=int, default=d["top_k"], help="sample among the k likeliest (0: off)")
    option("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass (1: off)")
    option("--min-p", type=float, default=d["min_p"], help="drop tokens below min_p * max prob (0: off)")
    option("--repetition-penalty", type=float, default=d["repetition_penalty"], help="HF style (1: off)")
    option("--presence-penalty", type=float, default=d["presence_penalty"], help="OpenAI style (0: off)")
    option("--frequency-penalty", type=float, default=d["frequency_penalty"], help="OpenAI style (0: off)")
    option("--beams", type=int, default=d["num_beams"], help="beam search width (1: off)")
    option("--length-penalty", type=float, default=d["length_penalty"], help="beam search length penalty")
    option("--n", type=int, default=d["n"], help="completions per prompt")
    option("--seed", type=int, default=None, help="seed for reproducible sampling")
    option("--stop", nargs="+", action="extend", default=[], metavar="S", help="stop sequences")
    option(
        "--logit-bias", type=_logit_bias, action="append", default=[], metavar="ID:BIAS",
        help="add BIAS in [-100, 100] to token ID's logit (OpenAI's logit_bias; -100 bans, 100 forces); repeatable",
    )
    shape = p.add_mutually_exclusive_group()  # constrained decoding (needs the `structured` extra)
    shape.add_argument("--json", action="store_true", help="output is a JSON object")
    shape.add_argument("--json-schema", metavar="FILE", help="output is JSON valid under this JSON Schema file")
    shape.add_argument("--regex", metavar="RE", help="output fully matches this regular expression")
    shape.add_argument("--grammar", metavar="FILE", help="output is a sentence of this Lark or GBNF grammar")
    option("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations")
    option("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    option("--no-truncate", action="store_true", help="error on prompts too long for the context")
    option("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    option("--tokenizer", default=None, metavar="DIR", help="default: the checkpoint's tokenizer")
    option("--device", type=_device, default="cpu", help="torch device")
    option("--verbose", action="store_true", help="print KV-cache and prefix-cache counters after each completion")
    _add_speculative_options(p)

    def run(args: argparse.Namespace) -> int:
        from gptlab.infer.generate import run_generate
        from gptlab.infer.prepare import load_for_generation

        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, n=args.n,
            num_beams=args.beams, length_penalty=args.length_penalty, stop=args.stop, seed=args.seed,
            logit_bias=dict(args.logit_bias), constraint=_constraint(args),
        ).validate()
        _check_speculative_options(args)
        from gptlab.interop.onnx_runtime import is_onnx_export

        if is_onnx_export(args.checkpoint):  # a `gptlab export --format onnx` directory: onnxruntime decodes
            from gptlab.interop.onnx_runtime import run_onnx_generate

            given = [flag for flag, on in (("--beams", args.beams != 1), ("--dtype", args.dtype != "float32"),
                     ("--quantize", args.quantize is not None), ("--compile", args.compile),
                     ("--device", str(args.device) != "cpu"), ("--verbose", args.verbose),
                     ("--draft", args.draft is not None),
                     ("--prompt-lookup", bool(args.prompt_lookup))) if on]  # fmt: skip
            if given:
                raise CLIError(f"{' '.join(given)} apply to checkpoints; an ONNX directory runs in onnxruntime (CPU)")
            return run_onnx_generate(
                args.checkpoint, args.prompt, params, tokenizer=args.tokenizer, interactive=args.interactive,
                truncate=not args.no_truncate,
            )
        model, tokenizer = load_for_generation(
            args.checkpoint, dtype=args.dtype, quantize=args.quantize, device=args.device,
            tokenizer=args.tokenizer, pack=not args.compile,
        )
        return run_generate(
            model, tokenizer, args.prompt, params, interactive=args.interactive,
            truncate=not args.no_truncate, compile=args.compile, verbose=args.verbose,
            speculative=_speculation(args, model),
        )

    p.set_defaults(func=run)


def _constraint(args: argparse.Namespace) -> Any:
    from gptlab.infer.constrain import Constraint

    if args.json:
        return Constraint.json()
    if args.regex is not None:
        return Constraint.regex(args.regex)
    for flag, file, make in (("--json-schema", args.json_schema, Constraint.json_schema),
                             ("--grammar", args.grammar, Constraint.grammar)):  # fmt: skip
        if file is not None:
            try:
                return make(Path(file).read_text(encoding="utf-8"))
            except OSError as e:
                raise CLIError(f"{flag}: cannot read {file}: {e.strerror}") from None
    return None


def _add_speculative_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the same output distribution in fewer target steps)")
    g.add_argument("--draft", default=None, metavar="CKPT", help="a smaller draft model with the same tokenizer")
    g.add_argument("--prompt-lookup", type=_positive_int, default=0, metavar="N",
                   help="no draft model: propose what followed the last N-gram (down to 1) earlier in the text")
    g.add_argument("--speculative-tokens", type=_positive_int, default=None, metavar="K",
                   help="tokens drafted per step (default 4; needs --draft or --prompt-lookup)")  # fmt: skip


def _check_speculative_options(args: argparse.Namespace) -> None:
    if args.draft is None and not args.prompt_lookup and args.speculative_tokens is not None:
        raise CLIError("--speculative-tokens needs a drafter: --draft CKPT or --prompt-lookup N")
    if args.draft is not None and args.prompt_lookup:
        raise CLIError("choose one drafter: --draft CKPT or --prompt-lookup N, not both")


def _speculation(args: argparse.Namespace, model: Any) -> Any:
    """The `Speculation` of --draft / --prompt-lookup / --speculative-tokens, or None."""
    from gptlab.infer.speculative import Speculation

    if args.draft is None and not args.prompt_lookup:
        return None
    draft = None
    if args.draft is not None:
        from gptlab.infer.prepare import load_for_generation

        draft, _ = load_for_generation(
            args.draft, dtype=args.dtype, quantize=args.quantize, device=args.device,
            tokenizer=args.tokenizer or args.checkpoint, pack=not args.compile,
        )  # fmt: skip
    k = args.speculative_tokens if args.speculative_tokens is not None else Speculation.num_tokens
    return Speculation(draft=draft, prompt_lookup=args.prompt_lookup, num_tokens=k).validate(model)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a GPT (no arguments: tokenizer + data + a nano model on the Python stdlib, offline)",
        description="Pretrain from a TOML / YAML config plus --section.field VALUE overrides (e.g. "
        "--model.preset nano --model.n_layer 6 --train.batch_size 32 --optim.lr 1e-3). Without --config "
        "runs the whole main job: BPE tokenizer -> data shards -> nano model for --time-limit minutes -> "
        "a sample. Distributed: torchrun --nproc_per_node N -m gptlab train --config FILE "
        "(train.strategy = ddp | fsdp); several machines: add --nnodes M --node_rank R "
        "--rdzv_backend c10d --rdzv_endpoint HOST:29500.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON config (a run's config.json too)")
    p.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
        help="continue from the newest checkpoint that reads back intact (of RUN_DIR, with its config.json; "
        "or of the config's run directory); RUN_DIR may be one checkpoint directory of a run",
    )
    p.add_argument("--step", type=int, metavar="N", help="with --resume: resume from the checkpoint of step N")
    p.add_argument("--time-limit", type=_positive_float, metavar="MIN", help="stop training after MIN minutes")
    p.add_argument("--run-dir", metavar="DIR", help="output directory (default runs/<preset>-<time>)")

    def run(args: argparse.Namespace) -> int:
        from gptlab.train.loop import NonFiniteLossError
        from gptlab.train.pipeline import train_command

        try:
            train_command(args.config, args.overrides, args.resume, args.time_limit, args.run_dir, args.step)
        except NonFiniteLossError as e:
            print(f"gptlab train: stopped: {e}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=run, accepts_overrides=True)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from gptlab.serve.connections import ConnectionLimits

    conn = ConnectionLimits()
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching and a playground page",
        description="Serve a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with /health, /metrics (Prometheus) and a playground page at /. Binds 127.0.0.1 unless --host "
        "says otherwise. Requests must name the server in their Host header (an IP address, localhost, the --host "
        "name, the machine's names when --host is 0.0.0.0 or ::, or an --allowed-host), so that a web page cannot "
        "reach it by DNS rebinding; browsers on other origins may call it only with --cors-origin. With an API key, "
        "/metrics needs it and /health without it says only that the server is up.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="gptlab checkpoint / run dir, or a HF GPT-2 dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 call (default: $GPTLAB_API_KEY, else none)",
    )
    p.add_argument("--model-name", help="model id clients send (default: the checkpoint directory's name)")
    count = _positive_int
    p.add_argument("--max-concurrent", type=count, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=count, default=256, help="requests that may wait (default 256)")
    p.add_argument("--max-tokens-limit", type=count, help="largest max_tokens (default n_ctx-1)")
    p.add_argument("--max-prompt-tokens", type=count, help="longest prompt in tokens (default n_ctx - 1)")
    p.add_argument("--max-n", type=count, default=8, help="largest n per request (default 8)")
    p.add_argument("--max-body-bytes", type=count, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (default info); errors are logged with their x-request-id at info (4xx) and error (5xx)",
    )
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: all cores but one)")
    p.add_argument(
        "--kv-cache-tokens", type=_positive_int, default=None,
        help="tokens the paged KV cache holds (default: what fits a quarter of the free memory, at most "
        "max-concurrent full contexts); requests are admitted by its free blocks",
    )
    p.add_argument(
        "--no-prefix-caching", dest="prefix_caching", action="store_false",
        help="do not reuse the cached keys and values of prompts that start alike",
    )
    _add_speculative_options(p)
    seconds = _positive_float
    p.add_argument(
        "--keep-alive-timeout", type=seconds, default=conn.keep_alive_timeout, metavar="SECONDS",
        help=f"close a keep-alive connection idle this long between requests (default {conn.keep_alive_timeout:g})",
    )
    p.add_argument(
        "--read-timeout", type=seconds, default=conn.read_timeout, metavar="SECONDS",
        help="a client must send a whole request, headers and body, within SECONDS of its first byte (of "
        f"connecting, on a new connection), else it gets a 408 and is disconnected (default {conn.read_timeout:g})",
    )
    p.add_argument(
        "--max-connections", type=count, default=conn.max_connections, metavar="N",
        help=f"open connections; more are answered 503 and closed (default {conn.max_connections}); each "
        "running or queued request holds one",
    )
    p.add_argument(
        "--allowed-host", type=_host_name, action="append", default=[], metavar="NAME",
        help="also accept requests whose Host header is NAME (repeatable; '*': any, e.g. behind a proxy "
        "that checks names itself)",
    )
    p.add_argument(
        "--cors-origin", type=_origin, action="append", default=[], metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://app.example.com; '*': any) call the API from a browser "
        "(repeatable; default: no cross-origin access)",
    )

    def run(args: argparse.Namespace) -> int:
        from gptlab.serve.app import serve
        from gptlab.serve.handlers import ServerLimits

        limits = ServerLimits(
            max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_limit, max_n=args.max_n,
        )
        _check_speculative_options(args)
        serve(
            args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
            max_concurrent=args.max_concurrent, max_queue=args.max_queue, device=args.device,
            dtype=args.dtype, limits=limits, log_level=args.log_level, threads=args.threads,
            quantize=args.quantize, kv_cache_tokens=args.kv_cache_tokens, prefix_caching=args.prefix_caching,
            connections=ConnectionLimits(
                keep_alive_timeout=args.keep_alive_timeout, read_timeout=args.read_timeout,
                max_connections=args.max_connections,
            ),
            allowed_hosts=args.allowed_host, cors_origins=args.cors_origin,
            draft=args.draft, prompt_lookup=args.prompt_lookup, speculative_tokens=args.speculative_tokens,
        )
        return 0

    p.set_defaults(func=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint for deployment: GGUF (llama.cpp) or ONNX (onnxruntime)",
        description="GGUF: one file for llama.cpp's gpt2 architecture with the tokenizer inside. ONNX: a "
        "directory Hugging Face Optimum's ORTModelForCausalLM loads (model.onnx with past keys / values, "
        "config.json, the tokenizer); `gptlab generate DIR` decodes it with onnxruntime.",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="gptlab checkpoint / run or Hugging Face GPT-2 directory"
    )
    p.add_argument("--format", required=True, choices=["gguf", "onnx"], help="what to write")
    p.add_argument("--out", required=True, metavar="PATH", help="FILE.gguf (gguf) or a directory (onnx)")
    p.add_argument(
        "--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type (ONNX: f32 only)"
    )
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, when the checkpoint holds none")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--onnx-exporter", default="dynamo", choices=["dynamo", "torchscript"],
        help="torch.onnx exporter: dynamo (torch's default) or torchscript (legacy, about 10x faster)",
    )

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        out = Path(args.out)
        if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
            raise CLIError(f"{out} already exists; pass --overwrite to replace it")
        from gptlab.interop.progress import Progress

        if args.format == "gguf":
            from gptlab.interop.gguf import export_gguf

            progress = Progress(stages=2)
            written = export_gguf(args.checkpoint, out, dtype=args.dtype, tokenizer=args.tokenizer, progress=progress)
        else:
            from gptlab.interop.onnx import export_checkpoint_onnx

            if args.dtype != "f32":
                raise CLIError(f"ONNX export writes f32 weights; --dtype {args.dtype} applies to GGUF only")
            progress = Progress(stages=3)
            written = export_checkpoint_onnx(
                args.checkpoint, out, tokenizer=args.tokenizer, exporter=args.onnx_exporter, progress=progress
            )
        progress.finish(f"{args.format} export done")
        print(f"wrote {written}")
        return 0

    p.set_defaults(func=run)


def _eval_task_names(text: str) -> list[str]:
    from gptlab.eval.suite_tasks import parse_tasks

    return parse_tasks(text) if text.strip() else []


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint: classification head or prompt -> completion (SFT), full or LoRA",
        description="Fine-tune BASE on a JSONL file with the training loop of `gptlab train`. "
        'classification: {"text", "label"} lines (string or integer labels); sft: {"prompt", "completion"} '
        'lines (loss on the completion only); dpo: {"prompt", "chosen", "rejected"} lines; rl: --prompts '
        '{"prompt", ...} lines scored by --reward. OUT receives the model (loadable by generate / '
        "serve / classify), or only the LoRA adapter; OUT/train holds metrics.jsonl, loss.png and checkpoints. "
        "Extra --section.field VALUE arguments override the loop's config (e.g. --optim.beta2 0.99).",
    )
    p.add_argument("--task", required=True, choices=["classification", "sft", "dpo", "rl"],
                   help="what to fine-tune for")
    p.add_argument("--base", required=True, metavar="CKPT", help="gptlab checkpoint / run, or HF GPT-2 dir")
    p.add_argument("--train", metavar="FILE.jsonl", help="training examples (every task but rl)")
    p.add_argument("--val", metavar="FILE.jsonl", help="validation examples (rl: prompts) for metrics")
    p.add_argument("--beta", type=float, default=0.1, help="dpo: pull towards the reference (default 0.1)")
    p.add_argument("--dpo-loss", default="sigmoid", choices=["sigmoid", "ipo"], help="dpo: the loss")
    rl = p.add_argument_group("rl (defaults: gptlab.finetune.rl.RLConfig)")
    rl.add_argument("--prompts", metavar="FILE.jsonl", help='rl: {"prompt", ...} lines (plus the reward\'s fields)')
    rl.add_argument("--reward", metavar="NAME_OR_PYTHON_PATH",
                    help="rl: exact_match, numeric, regex:PATTERN, regex, or module:function / file.py:function")
    rl.add_argument("--algorithm", choices=["grpo", "reinforce"], help="rl: grpo (default) or reinforce")
    rl.add_argument("--group-size", type=int, help="rl: completions sampled per prompt (default 8)")
    rl.add_argument("--max-new-tokens", type=int, help="rl: most tokens per completion (default 32)")
    rl.add_argument("--temperature", type=float, help="rl: rollout sampling temperature (default 1)")
    rl.add_argument("--kl-coef", type=float, help="rl: weight of the KL to the base model (default 0.04)")
    rl.add_argument("--clip", type=float, help="rl: grpo ratio clip epsilon (default 0.2)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", metavar="DIR", help="default: the base checkpoint's tokenizer")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="scale alpha; updates scale by alpha/r")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--lora-modules", default="c_attn,c_proj", help="Linear layers to adapt (name suffixes)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write the merged full model to OUT")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-5 full, 5e-4 LoRA)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    p.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement")
    p.add_argument("--metric", help="early-stopping metric (default val_accuracy / val_loss for sft)")
    p.add_argument("--eval-interval", type=int, help="steps between evaluations (default once per epoch)")
    p.add_argument("--eval-tasks", default="", metavar="TASKS",
                   help="GPT-3 paper tasks (e.g. hellaswag,lambada_openai) scored every --eval-interval steps")
    p.add_argument("--eval-tasks-data", metavar="PATH", help="their distributed files (as `eval suite --data`)")
    p.add_argument("--eval-tasks-items", type=int, default=100, help="items of each task scored (default 100)")
    p.add_argument("--eval-tasks-shots", type=int, default=0, help="examples in each prompt (default 0)")
    p.add_argument("--max-length", type=int, help="classification: tokens kept per text (default n_ctx)")
    p.add_argument("--keep-last", action="store_true", help="output the last weights, not the best on --val")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of head / adapter init and data order")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="compute")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(args: argparse.Namespace) -> int:
        from gptlab.config import parse_dotted_args
        from gptlab.finetune.lora import LoRAConfig
        from gptlab.finetune.runner import FinetuneConfig, finetune

        lora = None
        if args.lora:
            lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                              modules=args.lora_modules)
        rl_config = None
        if args.task == "rl":
            from gptlab.finetune.rl import RLConfig

            given = {k: getattr(args, k) for k in ("prompts", "reward", "algorithm", "group_size",
                                                    "max_new_tokens", "temperature", "kl_coef", "clip")}
            rl_config = RLConfig(**{k: v for k, v in given.items() if v is not None})
        elif args.prompts or args.reward:
            raise CLIError("--prompts and --reward belong to --task rl")
        cfg = FinetuneConfig(
            rl=rl_config,
            task=args.task, base=args.base, train_file=args.train, val_file=args.val, out=args.out,
            tokenizer=args.tokenizer, lora=lora, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
            batch_size=args.batch_size, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            patience=args.patience, metric=args.metric, eval_interval=args.eval_interval,
            max_length=args.max_length, keep_best=not args.keep_last, merge=args.merge, resume=args.resume,
            seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.no_progress,
            train_overrides=parse_dotted_args(args.overrides), eval_tasks=_eval_task_names(args.eval_tasks),
            eval_tasks_data=args.eval_tasks_data, eval_tasks_items=args.eval_tasks_items,
            eval_tasks_shots=args.eval_tasks_shots, beta=args.beta, dpo_loss=args.dpo_loss,
        )
        r = finetune(cfg)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if k.startswith("val_"))
        print(f"{r.steps} steps ({r.stop_reason}) in {r.seconds:.0f} s; {r.trainable_params:,} of "
              f"{r.total_params:,} parameters trained; {shown or 'no validation file'}")
        print(f"wrote {r.out}")
        return 0

    p.set_defaults(func=run, accepts_overrides=True)


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="predict labels (with probabilities) with a fine-tuned classifier")
    p.add_argument("checkpoint", metavar="CKPT", help="output of `gptlab finetune --task classification`")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify ('-': one per line of stdin)")
    p.add_argument("--file", metavar="FILE.jsonl", help='labelled {"text", "label"} lines: print accuracy')
    p.add_argument("--base", metavar="CKPT", help="LoRA adapter: base model (default: the recorded one)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--device", type=_device, default="cpu", help="torch device")

    def run(args: argparse.Namespace) -> int:
        from gptlab.finetune.classify import Classifier

        texts = args.texts
        if texts == ["-"]:
            texts = [line for line in sys.stdin.read().splitlines() if line]
        if not texts and not args.file:
            raise CLIError("give TEXT arguments, '-' to read texts from stdin, or --file FILE.jsonl")
        clf = Classifier.from_pretrained(args.checkpoint, base=args.base, device=args.device)
        if texts:
            for text, r in zip(texts, clf.predict(texts), strict=True):
                if args.json:
                    print(json.dumps({"text": text, **r}))
                else:
                    probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probs"].items())
                    print(f"{r['label']}\t{probs}\t{text}")
        if args.file:
            m = clf.evaluate(args.file)
            print(json.dumps(m) if args.json else
                  f"{args.file}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
        return 0

    p.set_defaults(func=run)


def _add_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge one into its base model")
    lsub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    merge = lsub.add_parser("merge", help="base + adapter -> a full checkpoint (generate / serve / classify)")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="adapter written by gptlab finetune")
    merge.add_argument("--base", metavar="CKPT", help="base model (default: the path the adapter records)")
    merge.add_argument("--out", required=True, metavar="DIR", help="directory for the merged checkpoint")

    def run(args: argparse.Namespace) -> int:
        from gptlab.finetune.runner import merge_adapter

        print(f"wrote {merge_adapter(args.adapter, args.out, base=args.base)}")
        return 0

    p.set_defaults(func=run)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _add_completion(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh), generated from these commands by shtab",
        description="Print a completion script for every gptlab command and flag. bash: "
        "`gptlab completion bash > ~/.local/share/bash-completion/completions/gptlab`; zsh: "
        "`gptlab completion zsh > \"${fpath[1]}/_gptlab\"` (then start a new shell).",
    )
    p.add_argument("shell", choices=["bash", "zsh"])

    def run(args: argparse.Namespace) -> int:
        import shtab

        print(shtab.complete(build_parser(), shell=args.shell), end="")
        return 0

    p.set_defaults(func=run)


COMMANDS = [
    _add_configs, _add_convert, _add_plan, _add_tokenizer, _add_compare, _add_report, _add_prepare, _add_eval,
    _add_generate, _add_train, _add_serve, _add_export,
    _add_finetune, _add_classify, _add_lora, _add_completion,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab", description="Build, train, evaluate, generate with and serve GPT-2 / GPT-3 models."
    )
    parser.add_argument("--version", action="version", version=f"gptlab {gptlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except (CLIError, ValueError, ImportError, OSError) as e:
        # ValueError includes errors raised while running (bad settings, corrupt files); OSError covers
        # FileNotFoundError, a --run-dir that is a file, permissions and full disks. Each names its path.
        print(f"gptlab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
