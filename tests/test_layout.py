"""The package's shape: no import cycles, no module reaching into another's private names, and
inference wholly inside gptlab/infer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gptlab"


def modules() -> dict[str, Path]:
    out = {}
    for file in ROOT.rglob("*.py"):
        name = ".".join(file.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = file
    return out


def imports(name: str, file: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name imported or '') for every import anywhere in the file, lazy ones too."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in found if m in known and m != name]


def test_no_import_cycles():
    known = modules()
    graph = {m: {target for target, _ in imports(m, f, known)} for m, f in known.items()}
    for m in graph:  # a package's __init__ runs before its modules: importing one imports its parents
        graph[m] -= {p for p in graph if m.startswith(p + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = [
        f"{m} imports {target}.{n}"
        for m, f in known.items()
        for target, n in imports(m, f, known)
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, private


def test_inference_lives_in_infer():
    top = {f.stem for f in ROOT.glob("*.py")}
    assert not top & {"generate", "decoder", "sampling", "beam", "quantize", "cpu_kernels"}
    assert not (ROOT / "csrc").exists() and (ROOT / "infer" / "cpu" / "csrc" / "decode.c").is_file()
    model = (ROOT / "model.py").read_text()
    assert "cache" not in model.lower().replace("cached decoding", ""), "model.py holds no KV cache"
