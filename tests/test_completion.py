"""`gptlab completion`: the generated bash script completes commands and flags in a real bash."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from gptlab.cli import main

pytest.importorskip("shtab")


def completions(script: str, *words: str) -> list[str]:
    bash = shutil.which("bash") or pytest.skip("no bash")
    words_list = " ".join(f"'{w}'" for w in words)
    show = "printf '%s\\n' \"${COMPREPLY[@]}\""
    probe = f"{script}\nCOMP_WORDS=({words_list}); COMP_CWORD={len(words) - 1}; _shtab_gptlab; {show}"
    out = subprocess.run([bash, "--norc", "-c", probe], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.split()


def test_bash_completion_completes_commands_and_flags(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert completions(script, "gptlab", "ser") == ["serve"]
    assert set(completions(script, "gptlab", "")) >= {"train", "generate", "serve", "eval", "completion"}
    assert completions(script, "gptlab", "serve", "--kv") == ["--kv-cache-tokens"]
    assert "--no-prefix-caching" in completions(script, "gptlab", "serve", "--no")


def test_zsh_script_is_generated(capsys):
    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef gptlab") and "--kv-cache-tokens" in script
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n"], input=script, text=True, check=True, timeout=30)
