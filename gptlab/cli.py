"""Command line: parses arguments and calls the importable function that does the work.

Each command is registered by an `_add_<command>` function; nothing here holds logic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import gptlab


class CLIError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


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


COMMANDS = [_add_configs]


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
    except (CLIError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130
