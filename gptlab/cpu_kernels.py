"""Few-row CPU linear kernels (`csrc/matvec.c`), compiled on first use and called through ctypes.

Decoding multiplies 1-16 activation rows by each weight matrix, which is bound by reading the
weights; BLAS GEMMs either leave a third of the bandwidth unused (one row) or pack the weight first
(several rows). The C kernels stream each weight row once, stored as float32, bfloat16 or int8.

They are compiled with the machine's C compiler (`$CC`, else `cc`) and `-march=native` into
`$GPTLAB_CACHE` (default `~/.cache/gptlab`), keyed by the source, compiler and CPU, then reused.
Without a compiler, AVX2 + FMA or OpenMP (other CPUs, slim containers) the build fails once, a
warning says why, and callers keep torch's own matmuls. `GPTLAB_CPU_KERNELS=0` turns them off.
No torch headers are involved, so the build takes a few seconds, not a C++ extension's minute.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "matvec.c"
ABI_VERSION = 2
MAX_ROWS = 16
"""Most activation rows per call: on AVX2 the float32 kernel ties oneDNN's prepacked GEMM at 16 rows
(1.4x ahead at 1 row) and the bfloat16 one stays ahead of fbgemm's fp16 GEMM; beyond, GEMMs win."""
KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}


def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE") or Path.home() / ".cache" / "gptlab") / "kernels"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernels (if not cached) and return the shared library's path; raises RuntimeError."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"no C compiler ({cc!r}: {e}); install gcc or set $CC") from e
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_identity().encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"matvec-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        detail = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
        raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd[:4])} ...): {detail}")
    os.replace(tmp, target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GPTLAB_CPU_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.gl_abi_version() != ABI_VERSION:
            raise RuntimeError(f"stale library (ABI {lib.gl_abi_version()}, expected {ABI_VERSION})")
    except (RuntimeError, OSError) as e:
        warnings.warn(f"fast CPU decoding kernels unavailable, using torch's matmuls: {e}", stacklevel=3)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for kind in KINDS.values():
        fn = getattr(lib, f"gl_linear_{kind}")
        fn.restype = None
        workspace = [p] if kind == "i8" else []  # int16 copy of the activations
        fn.argtypes = [p, i64, i64, p, i64, p, p, p, *workspace, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the kernels are built and loadable on this machine (builds them on first call)."""
    return _library() is not None


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (M, K) float32 @ weight (N, K).T * scale + bias -> (M, N) float32, for M <= MAX_ROWS on CPU.

    weight: float32, bfloat16 or int8 (then `scale`, float32 (N,), is the per-row dequantisation
    scale). Contiguous CPU tensors only; call `available()` first.
    """
    if _library() is None:
        raise RuntimeError("CPU kernels are unavailable; check gptlab.cpu_kernels.available() first")
    check(weight, scale, bias)
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match a weight of shape {tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"the kernels take at most {MAX_ROWS} rows, got {x.shape[0]}; use a GEMM for more")
    return call(x.contiguous().float(), weight, scale, bias)


def check(weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
    """Raise ValueError unless (weight, scale, bias) is something the kernels take."""
    kind = KINDS.get(weight.dtype)
    if kind is None:
        raise ValueError(f"weights must be one of {[str(d) for d in KINDS]}, got {weight.dtype}")
    if (kind == "i8") != (scale is not None):
        raise ValueError("int8 weights need a per-row scale, and only int8 weights take one")
    if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
        raise ValueError("the weight must be a contiguous (N, K) CPU tensor")
    N = weight.shape[0]
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (N,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({N},)")


def call(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """`linear` without its checks, for layers that ran `check` once (a decode step makes ~50 calls,
    so microseconds count): x a contiguous float32 (M <= MAX_ROWS, K) tensor."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N)
    threads = torch.get_num_threads()
    if scale is None:
        fn = _library().gl_linear_f32 if weight.dtype == torch.float32 else _library().gl_linear_bf16
        b = None if bias is None else bias.data_ptr()
        fn(x.data_ptr(), M, K, weight.data_ptr(), N, None, b, y.data_ptr(), threads)
    else:
        xq = torch.empty(M, K, dtype=torch.int16)  # the kernel's int16 copy of x; alive until it returns
        b = None if bias is None else bias.data_ptr()
        _library().gl_linear_i8(
            x.data_ptr(), M, K, weight.data_ptr(), N, scale.data_ptr(), b, y.data_ptr(), xq.data_ptr(), threads
        )
    return y
