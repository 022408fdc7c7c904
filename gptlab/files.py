"""Files every on-disk format shares: atomic writes, checksums, safetensors reading, the file names.

`gptlab.checkpoint` (gptlab's own format) and `gptlab.interop` (Hugging Face, GGUF, ONNX) both build
on this module, so neither needs the other for its I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"


# ---- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    A crash inside the block leaves any previous `path` untouched and only a `.tmp-*` folder behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        _chmod_tree(tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`, replacing any directory there (moved aside first)."""
    if path.exists():
        old = path.with_name(f".old-{path.name}-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_tree(root: Path) -> None:
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files: give what mkdir / open() would.
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue  # chmod would follow it out of the tree
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        elif p.is_file():
            os.chmod(p, (0o666 | (p.stat().st_mode & 0o111)) & ~mask)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ---- checksums ----------------------------------------------------------------------------------
def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: Path, files: Iterable[Path] | None = None) -> None:
    """Record the SHA-256 of `files` (default: every file under `directory`) in directory/checksums.json."""
    if files is None:
        files = [p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE]
    digests = {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(files)}
    manifest = {"format": "gptlab-checksums", "algorithm": "sha256", "files": digests}
    atomic_write_text(directory / CHECKSUMS_FILE, json.dumps(manifest, indent=2) + "\n")


def read_checksums(directory: Path) -> dict[str, str] | None:
    """The recorded digests by relative path; None for a checkpoint written before checksums existed."""
    file = directory / CHECKSUMS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupted ({e}); the checkpoint cannot be verified") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (
        not isinstance(files, dict)
        or data.get("algorithm") != "sha256"
        or not all(isinstance(v, str) for v in files.values())
    ):
        raise ValueError(f'{file} is corrupted: expected {{"algorithm": "sha256", "files": {{path: digest}}}}')
    return files


def verify_checksums(directory: Path, names: Iterable[str] | None = None) -> None:
    """Check files of `directory` against its checksums.json: those listed under `names` (a file, or a
    folder for all its files), or every listed file. Does nothing without checksums.json."""
    recorded = read_checksums(directory)
    if recorded is None:
        return
    if names is not None:
        wanted = tuple(names)
        recorded = {k: v for k, v in recorded.items() if k in wanted or k.startswith(tuple(f"{n}/" for n in wanted))}
    for name, digest in recorded.items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{file} is missing: {directory / CHECKSUMS_FILE} lists it; the checkpoint is incomplete")
        if file_sha256(file) != digest:
            raise ValueError(
                f"{file} does not match the SHA-256 recorded when it was written ({directory / CHECKSUMS_FILE}): "
                "the file is corrupted or was changed; restore it or use another checkpoint"
            )


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Reject NaN / inf in floating-point tensors, naming the first tensor that holds any."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{source}: tensor {name} holds {bad} non-finite values (NaN or inf) out of {t.numel()}; "
                "the checkpoint is corrupted or was saved after training diverged"
            )


# ---- save ---------------------------------------------------------------------------------------
def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors, as safetensors requires."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, naming the file when it is missing, truncated or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file} is truncated or corrupted and cannot be read ({e})") from None
