"""Checkpoints: a directory with config.json, model.safetensors and the tokenizer; atomic writes.

No pickle is ever read on the model load path: weights come from safetensors (or, for Hugging Face
`pytorch_model.bin`, `torch.load(weights_only=True)`). checksums.json records the SHA-256 of every file
gptlab wrote into a checkpoint; loading verifies the files it reads against it (a checkpoint written
before checksums existed has none and loads unverified), and rejects weights that are not finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptlab.config import ModelConfig
from gptlab.model import GPT

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_model_files(
    model: GPT, directory: Path, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None
) -> None:
    """Write config.json, model.safetensors (and tokenizer/) into an existing directory, and
    checksums.json recording them and any files already in tokenizer/."""
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = {"format": "gptlab", "model": model.config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(state_dict_for_save(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    tokenizer_files = [p for p in (directory / TOKENIZER_DIR).rglob("*") if p.is_file()]
    write_checksums(directory, [directory / CONFIG_FILE, directory / WEIGHTS_FILE, *tokenizer_files])


def save_model(
    model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Save a loadable checkpoint directory atomically; returns its path."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, tokenizer, extra)
    return out_dir


# ---- locate -------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, run directory, or a file inside one."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a gptlab run or checkpoint directory, a Hugging Face GPT-2 directory, "
            "or a Hugging Face Hub id as org/name (e.g. openai-community/gpt2)"
        )
    # A run directory's own config.json is its train config: its newest checkpoint comes first.
    steps = list_checkpoints(path)
    if steps:
        return steps[-1]
    if (path / CONFIG_FILE).is_file():
        return path
    raise FileNotFoundError(
        f"{path} holds no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/step_* checkpoint; pass a gptlab run or "
        "checkpoint directory, or a Hugging Face GPT-2 directory (config.json + model.safetensors)"
    )


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint (verified against checksums.json when it has one) as a JSON object."""
    file = directory / CONFIG_FILE
    verify_checksums(directory, [CONFIG_FILE])
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the checkpoint is corrupted") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(config).__name__}; the checkpoint is corrupted")
    return config


def _is_hub_name(path: str) -> bool:
    """Whether `path` names a Hugging Face Hub model: an `org/name` id that is not a local path.

    A bare name or a path under an existing local directory (`runs/nano-typo`) is a mistyped local path,
    not a download."""
    if Path(path).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None:
        return False
    return not Path(path).parent.exists()


# ---- load ---------------------------------------------------------------------------------------
def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a gptlab checkpoint / run directory, a Hugging Face GPT-2 directory, or a hub name."""
    if isinstance(path, str) and _is_hub_name(path):
        from gptlab.interop.hf import download

        path = download(path)
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    if config.get("format") == "gptlab":
        model = _load_gptlab(directory, config)
    else:
        from gptlab.interop.hf import load_hf_model

        model = load_hf_model(directory)
    check_finite(model.state_dict(), directory)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def model_config_of(config: dict[str, Any], file: Path) -> ModelConfig:
    """The "model" section of a gptlab config.json, with errors naming the file."""
    section = config.get("model")
    if not isinstance(section, dict):
        raise ValueError(f'{file} has no "model" object (n_layer, n_head, ...); the checkpoint is corrupted')
    try:
        return ModelConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{file}: "model" is not a valid model config ({e})') from None


def _load_gptlab(directory: Path, config: dict[str, Any]) -> GPT:
    mc = model_config_of(config, directory / CONFIG_FILE)
    with torch.device("meta"):
        model = GPT(mc)
    verify_checksums(directory, [WEIGHTS_FILE])
    state = read_safetensors(directory / WEIGHTS_FILE)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    return model


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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint or run (tokenizer/ inside it, or the directory itself)."""
    from gptlab.tokenizer import Tokenizer

    path = Path(path)
    candidates = [path / TOKENIZER_DIR, path]
    with contextlib.suppress(FileNotFoundError):
        ckpt = resolve_checkpoint(path)
        candidates = [ckpt / TOKENIZER_DIR, ckpt, *candidates]
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in Tokenizer.KNOWN_FILES):
            if c.name == TOKENIZER_DIR:
                verify_checksums(c.parent, [TOKENIZER_DIR])
            return Tokenizer.from_pretrained(c)
    raise FileNotFoundError(
        f"no tokenizer found in {path} (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --tokenizer DIR with encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json"
    )
