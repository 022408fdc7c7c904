"""`gptlab convert`: Hugging Face GPT-2 directories to gptlab checkpoints and back.

It needs both formats, so it sits above `gptlab.checkpoint` (which reads Hugging Face directories
through `gptlab.interop.hf`) and `gptlab.interop.hf` (which writes through `gptlab.files`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gptlab.checkpoint import TOKENIZER_DIR, atomic_dir, is_hub_name, load_model, load_tokenizer, write_model_files
from gptlab.interop.hf import TOKENIZER_FILES, download, load_hf_model, save_hf
from gptlab.tokenizer import GPT2_BPE_FILE, GPT2_ENCODER_FILE, Tokenizer


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace it"
        )


def convert_from_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Hugging Face GPT-2 directory (or hub name) -> gptlab checkpoint, tokenizer files copied along."""
    out = Path(out)
    _check_out(out, overwrite)
    directory = download(src) if isinstance(src, str) and is_hub_name(src) else Path(src)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass a Hugging Face GPT-2 directory")
    model = load_hf_model(directory)
    names = (*TOKENIZER_FILES, GPT2_ENCODER_FILE, GPT2_BPE_FILE)  # GPT-2's original pair too
    tokenizer_files = [directory / f for f in names if (directory / f).is_file()]
    if tokenizer_files:  # read them before copying: an empty or broken tokenizer is an error here
        try:
            tokenizer = Tokenizer.from_pretrained(directory)
        except (ValueError, OSError, KeyError) as e:
            found = ", ".join(f.name for f in tokenizer_files)
            raise ValueError(f"the tokenizer files in {directory} ({found}) cannot be read: {e}") from None
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens, the model only "
                f"{model.config.vocab_size}"
            )
    with atomic_dir(out) as tmp:
        if tokenizer_files:  # before the model files, so that checksums.json records them too
            (tmp / TOKENIZER_DIR).mkdir()
            for f in tokenizer_files:
                shutil.copyfile(f, tmp / TOKENIZER_DIR / f.name)
        write_model_files(model, tmp)
    return out


def convert_to_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """gptlab checkpoint or run directory -> Hugging Face GPT-2 directory (with its tokenizer, if any)."""
    out = Path(out)
    _check_out(out, overwrite)
    model = load_model(src)
    try:
        tokenizer = load_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None  # a model trained on raw token ids: export the weights alone
    return save_hf(model, out, tokenizer, source=str(src))
