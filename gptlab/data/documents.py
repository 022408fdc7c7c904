"""Finding and reading documents: files, directories, globs, JSONL records, the default corpus.

A document is one text file or one JSONL record. Order is deterministic: files sorted by absolute
path, JSONL records in line order. Bad input is reported, not fatal: undecodable UTF-8 bytes become
U+FFFD and are counted; empty (whitespace-only) files and files containing NUL bytes (binary) are
skipped and counted. A JSONL line that is not a JSON object with a string text field is an error
naming the file and line; blank JSONL lines and records with empty text are skipped and counted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Left out of the default corpus: test suites (17 MB, including deliberately mis-encoded files) and
# whatever pip installed.
_STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
Doc = tuple[int, int, int]  # (file index, byte offset, byte length); length -1 = the whole file


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library .py files (no tests, no site-packages), sorted."""
    files = []
    for directory, subdirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDE]  # prune: site-packages is huge
        files += [Path(directory, n) for n in names if n.endswith(".py")]
    return sorted(files, key=str)


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    """Files named by `inputs` (files, directories searched recursively, globs), sorted and unique.

    None means the default corpus (the Python standard library). Hidden files and directories found
    while walking a directory are ignored.
    """
    if inputs is None:
        files = default_corpus_files()
        if not files:
            root = sysconfig.get_paths()["stdlib"]
            raise FileNotFoundError(f"no .py files under the standard library at {root}; pass input files")
        return files
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given; pass files, directories or globs (or None for the default corpus)")
    found: dict[Path, None] = {}
    for spec in inputs:
        path = Path(spec)
        if path.exists():
            matches = [path]
        elif glob.has_magic(str(spec)):
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"input glob {str(spec)!r} matched no files")
        else:
            raise FileNotFoundError(
                f"input {str(spec)!r} does not exist (pass text files, directories, globs)"
            )
        for match in matches:
            if match.is_dir():
                inside = [
                    f
                    for f in match.rglob("*")
                    if f.is_file() and not any(p.startswith(".") for p in f.relative_to(match).parts)
                ]
                if not inside and not glob.has_magic(str(spec)):
                    raise FileNotFoundError(f"input directory {str(match)!r} contains no files")
                found.update(dict.fromkeys(f.resolve() for f in inside))
            elif match.is_file():
                found[match.resolve()] = None
    if not found:
        raise FileNotFoundError(f"inputs {[str(s) for s in inputs]} name no files")
    return sorted(found, key=str)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def _decode(data: bytes) -> tuple[str, int]:
    """Text of UTF-8 `data` (undecodable sequences become U+FFFD) and how many bytes were undecodable."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        # surrogateescape maps each undecodable byte to one lone surrogate: count those.
        bad = len(re.findall("[\udc80-\udcff]", data.decode("utf-8", "surrogateescape")))
        return data.decode("utf-8", "replace"), bad


def _record_text(line: str, where: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
            "each line of a .jsonl file must be one JSON object"
        ) from None
    if not isinstance(record, dict) or field not in record:
        fields = sorted(record)[:10] if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ValueError(
            f"{where}: no field {field!r} in the record (it has {fields}); "
            "pass --jsonl-field NAME (jsonl_field=) naming the text field"
        )
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} holds a {type(text).__name__}, not a string")
    return text


def _blank(text: str) -> bool:
    return not text or text.isspace()


def new_counts() -> dict[str, int]:
    return dict(
        empty_files=0, binary_files=0, empty_documents=0, replaced_bytes=0, documents_with_replaced_bytes=0
    )


def walk(
    files: Sequence[Path], field: str, counts: dict[str, int], hasher: Any = None, bar: Any = None
) -> Iterator[tuple[Doc, str]]:
    """(ref, text) of every non-empty document in order; skips and replacements tallied in `counts`."""
    for i, file in enumerate(files):
        if bar is not None:
            bar.update(1)
        if hasher is not None:
            hasher.update(f"\0{file}\0".encode())
        if _is_jsonl(file):
            with open(file, "rb") as f:
                offset = 0
                for number, raw in enumerate(f, 1):
                    if hasher is not None:
                        hasher.update(raw)
                    line, bad = _decode(raw)
                    text = "" if _blank(line) else _record_text(line, f"{file} line {number}", field)
                    if _blank(text):
                        counts["empty_documents"] += 1
                    else:
                        counts["replaced_bytes"] += bad
                        counts["documents_with_replaced_bytes"] += bad > 0
                        yield (i, offset, len(raw)), text
                    offset += len(raw)
        else:
            data = file.read_bytes()
            if hasher is not None:
                hasher.update(data)
            if b"\0" in data:
                counts["binary_files"] += 1
                continue
            text, bad = _decode(data)
            if _blank(text):
                counts["empty_files"] += 1
                continue
            counts["replaced_bytes"] += bad
            counts["documents_with_replaced_bytes"] += bad > 0
            yield (i, 0, -1), text


def iter_documents(
    inputs: Sequence[str | os.PathLike[str]] | None, jsonl_field: str = "text"
) -> Iterator[str]:
    """Text of every non-empty document of `inputs` (None: the default corpus), in prepare's order."""
    for _, text in walk(resolve_inputs(inputs), jsonl_field, new_counts()):
        yield text


class Reader:
    """Re-reads documents by reference, keeping the current file open (JSONL records come in order)."""

    def __init__(self, files: Sequence[Path], field: str) -> None:
        self.files, self.field = files, field
        self._open: tuple[int, IO[bytes]] | None = None

    def __call__(self, doc: Doc) -> str:
        i, offset, length = doc
        if length < 0:
            return _decode(self.files[i].read_bytes())[0]
        if self._open is None or self._open[0] != i:
            self.close()
            self._open = (i, open(self.files[i], "rb"))  # noqa: SIM115 - closed by close()
        f = self._open[1]
        f.seek(offset)
        return _record_text(_decode(f.read(length))[0], f"{self.files[i]} byte {offset}", self.field)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def default_corpus_name() -> str:
    return f"Python {sys.version.split()[0]} standard library at {sysconfig.get_paths()['stdlib']}"
