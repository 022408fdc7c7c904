"""gptlab's CPU decoding kernels (`csrc/`), compiled on first use and called through ctypes.

Decoding multiplies a few activation rows by each weight matrix, which is bound by reading the
weights; BLAS GEMMs either leave a third of the bandwidth unused (one row) or pack the weight first
(several rows). The kernels of `csrc/matvec.c` stream each weight row once, stored as float32,
bfloat16 or int8 (`linear`). `csrc/decode.c` runs a whole decoding step of a model on them in one
call (`DecodeStep`): as torch operators, the few hundred small operations around the matmuls cost
3-5 ms a token, a third of a bfloat16 token of GPT-2 124M here.

They are compiled with the machine's C compiler (`$CC`, else `cc`) and `-march=native` into
`$GPTLAB_CACHE` (default `~/.cache/gptlab`), keyed by the sources, compiler, flags and CPU, then
reused: AVX-512 machines get 16-lane int8 tiles (and VNNI's int16 dot products) and BF16 / AMX
bfloat16 ones, others AVX2's; `GPTLAB_KERNEL_ISA=avx2` builds the AVX2 code anywhere.
Without a compiler, AVX2 + FMA + F16C or OpenMP (other CPUs, slim containers) the build fails once, a
warning says why, and callers keep torch's own operators. `GPTLAB_CPU_KERNELS=0` turns them off.
No torch headers are involved, so the build takes a few seconds, not a C++ extension's minute.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "decode.c"  # includes matvec.c: one library
SOURCES = (SOURCE, SOURCE.with_name("matvec.c"))
ABI_VERSION = 8
MAX_ROWS = 64
"""Most activation rows per call. Measured on AVX2 (Zen 3, 2 cores, GPT-2 124M's shapes), against
torch's GEMM: the float32 kernel is 2.4x ahead at 1 row, 1.4x at 32 and ties at 64 (35-39 GMAC/s);
the bfloat16 one, which torch must first convert to float32, is 2.3x ahead at 32 rows and ties
around 128. Beyond, GEMMs win. So decoding batches and short prompts (the prefill of a 32-token
prompt: bfloat16 130 -> 74 ms, float32 111 -> 92 ms) run here."""
KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}
CACHE_DTYPES = (torch.float32, torch.float16)  # of the fused step's KV cache


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


@cache
def native_bfloat16_gemm() -> bool:
    """Whether torch's GEMMs multiply bfloat16 natively here (AVX-512 BF16 or AMX, through oneDNN):
    then they beat converting the weight to float32 by 3-5x from 16 rows on (Xeon, 2 cores)."""
    flags = set(" ".join(ln for ln in _cpu_identity().splitlines() if ln.startswith("flags")).split())
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


ISAS = {"native": [], "avx2": ["-mno-avx512f"]}
"""Instruction sets the kernels can be built for: `native` (the machine's widest: AVX-512 where it has
it), or `avx2` on any AVX2 machine (what CPUs without AVX-512 run; tests build it to check that code
on AVX-512 machines too). `$GPTLAB_KERNEL_ISA` picks one; the default is native."""


def _isa() -> str:
    isa = os.environ.get("GPTLAB_KERNEL_ISA", "native")
    if isa not in ISAS:
        raise RuntimeError(f"GPTLAB_KERNEL_ISA must be one of {list(ISAS)}, got {isa!r}")
    return isa


def build(out_dir: Path | None = None, isa: str | None = None) -> Path:
    """Compile the kernels (if not cached) for `isa` (default: `$GPTLAB_KERNEL_ISA`, else native) and
    return the shared library's path; raises RuntimeError."""
    isa = isa or _isa()
    if isa not in ISAS:
        raise RuntimeError(f"isa must be one of {list(ISAS)}, got {isa!r}")
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"no C compiler ({cc!r}: {e}); install gcc or set $CC") from e
    source = b"".join(f.read_bytes() for f in SOURCES)
    flags = ["-O3", "-march=native", *ISAS[isa], "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(source + version.encode() + _cpu_identity().encode() + " ".join(flags).encode()).hexdigest()
    key = key[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"gptlab-kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
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
        return load(build())
    except (RuntimeError, OSError) as e:
        warnings.warn(f"fast CPU decoding kernels unavailable, using torch's matmuls: {e}", stacklevel=3)
        return None


def load(path: Path) -> ctypes.CDLL:
    """The library at `path` (from `build`) with its functions' signatures set; raises RuntimeError or
    OSError."""
    lib = ctypes.CDLL(str(path))
    if lib.gl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale library (ABI {lib.gl_abi_version()}, expected {ABI_VERSION})")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for kind in KINDS.values():
        fn = getattr(lib, f"gl_linear_{kind}")
        fn.restype = None
        workspace = [p] if kind != "f32" else []  # the activations in the tiles' form: int16, bfloat16
        fn.argtypes = [p, i64, i64, p, i64, p, p, p, *workspace, ctypes.c_int]
    lib.gl_decode_step.restype = ctypes.c_int
    lib.gl_avx512.restype = ctypes.c_int
    lib.gl_amx.restype = ctypes.c_int
    lib.gl_read_sum.restype = ctypes.c_double
    lib.gl_read_sum.argtypes = [p, i64, ctypes.c_int]
    i32 = ctypes.c_int
    step = [ctypes.POINTER(_Model), i64, p, p, p, i64, p, p, i64, i64, i32, p, i32]
    lib.gl_decode_step.argtypes = [*step, i32]
    lib.gl_greedy_steps.restype = ctypes.c_int
    lib.gl_greedy_steps.argtypes = [*step, i64, p]
    return lib


def available() -> bool:
    """Whether the kernels are built and loadable on this machine (builds them on first call)."""
    return _library() is not None


def avx512() -> bool:
    """Whether the loaded kernels were built for AVX-512 (int8 products 16 lanes wide, VNNI)."""
    lib = _library()
    return lib is not None and bool(lib.gl_avx512())


def read_sum(x: Tensor) -> float:
    """The sum of a contiguous float32 CPU tensor, read by as many threads as torch uses: a plain
    streaming read, to time this machine's read bandwidth (`benchmarks/decode.py`)."""
    if _library() is None:
        raise RuntimeError("CPU kernels are unavailable; check gptlab.infer.cpu.kernels.available() first")
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("read_sum takes a contiguous float32 CPU tensor")
    return _library().gl_read_sum(x.data_ptr(), x.numel(), torch.get_num_threads())


def amx() -> bool:
    """Whether the loaded kernels multiply bfloat16 weights by 2+ activation rows on AMX tiles."""
    lib = _library()
    return lib is not None and bool(lib.gl_amx())


def linear(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (M, K) float32 @ weight (N, K).T * scale + bias -> (M, N) float32, for M <= MAX_ROWS on CPU.

    weight: float32, bfloat16 or int8 (then `scale`, float32 (N,), is the per-row dequantisation
    scale). Contiguous CPU tensors only; call `available()` first.
    """
    if _library() is None:
        raise RuntimeError("CPU kernels are unavailable; check gptlab.infer.cpu.kernels.available() first")
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
    if weight.dtype == torch.float32:
        _library().gl_linear_f32(x.data_ptr(), M, K, weight.data_ptr(), N, None, _ptr(bias), y.data_ptr(), threads)
    elif weight.dtype == torch.bfloat16:
        xp = torch.empty((M + 8) * K + 16)  # the kernel's copy of x in its tiles' form
        _library().gl_linear_bf16(
            x.data_ptr(), M, K, weight.data_ptr(), N, None, _ptr(bias), y.data_ptr(), xp.data_ptr(), threads
        )
    else:
        xq = torch.empty(M, K, dtype=torch.int16)  # the kernel's int16 copy of x; alive until it returns
        _library().gl_linear_i8(
            x.data_ptr(), M, K, weight.data_ptr(), N, scale.data_ptr(), _ptr(bias), y.data_ptr(), xq.data_ptr(),
            threads,
        )  # fmt: skip
    return y


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> Tensor:
    """`nbytes` of zeroed CPU memory (a uint8 tensor, 2 MiB-aligned) that Linux backs with transparent
    huge pages, also where it only gives them on request (`enabled` = madvise, the common default).

    Decoding streams every weight once a token. With 4 KiB pages that is a TLB miss every 4 KiB and a
    stop of the hardware prefetcher at every page edge; in 2 MiB pages the same kernels decoded GPT-2
    124M 4-10% faster here (fp32, bf16 and int8). Where huge pages are not offered (other systems,
    `enabled` = never) this is ordinary memory, and only slower. Memory is committed as it is written,
    so filling it from tensors that are freed one by one does not double the peak.
    """
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is None or nbytes < HUGE_PAGE:
        return torch.zeros(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advise, 0, len(region))
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about writable buffers; the region is ours
        flat = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as a view is
    start = -flat.data_ptr() % HUGE_PAGE
    return flat[start : start + nbytes]


def huge_page_views(like: list[Tensor], align: int = 64) -> list[Tensor]:
    """Zeroed tensors of the shapes and dtypes of `like`, laid out in this order in one
    `huge_page_buffer`, each `align`-byte aligned: put the weights in the order a decoding step reads
    them, and its stream runs through one region."""
    offsets, total = [], 0
    for t in like:
        offsets.append(total)
        total += -(-t.nbytes // align) * align
    buffer = huge_page_buffer(total)
    return [buffer[o : o + t.nbytes].view(t.dtype).view(t.shape) for t, o in zip(like, offsets, strict=True)]


# ---- a whole decoding step (csrc/decode.c) ------------------------------------------------------
class _Lin(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("kind", ctypes.c_int64),
    ]


class _Block(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")),
        *((name, _Lin) for name in ("qkv", "proj", "fc", "fc_proj")),
        ("local", ctypes.c_int64),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n_layer", "n_embd", "n_head", "d_ff", "vocab", "n_ctx", "window")),
        ("eps", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in ("wte", "wpe", "lnf_w", "lnf_b")),
        ("blocks", ctypes.POINTER(_Block)),
        ("head", _Lin),
    ]


_STEP_ERRORS = {
    1: "a token id is out of range for the vocabulary",
    2: "a position is beyond the model's context",
    3: "a block table entry is beyond the KV pool, or a position beyond the block table",
    4: "out of memory for the step's activations",
}


def _step_rows(layer: torch.nn.Module) -> int:
    """Rows of a kernel layer (`quantize.KernelLinear`) that a fused step takes in one call; 0 for others."""
    rows = getattr(layer, "step_rows", None)
    return rows if rows is not None else getattr(layer, "kernel_rows", 0)


def _int64_rows(x: Tensor) -> Tensor:
    """x as a contiguous int64 tensor (no copy when it already is one), whose elements C reads in
    order, one per row, whatever its shape."""
    if x.dtype != torch.int64 or not x.is_contiguous():
        x = x.to(torch.int64).contiguous()
    return x


class DecodeStep:
    """One decoding step of a model whose linear layers are kernel layers (`quantize.KernelLinear`),
    run as one C call (`csrc/decode.c`): embeddings, every block and the output projection for up to
    `max_rows` rows, float32 activations, a float32 or float16 KV cache (`cache_dtype` is the one to
    allocate). `gptlab.infer.engine.InferenceEngine` builds one for a model prepared with
    `gptlab.infer.quantize.use_cpu_kernels` and decodes on it wherever it `runs` the batch.

    It points at the model's tensors as they are when it is built (and keeps them alive): a model
    whose weights change afterwards must be prepared afresh.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if _library() is None:
            raise RuntimeError("CPU kernels are unavailable; check gptlab.infer.cpu.kernels.available() first")
        config, t = model.config, model.transformer
        self.config = config
        self._keep: list[Tensor] = []
        layers = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        self.max_rows = min(_step_rows(layer) for layer in (*(x for group in layers for x in group), model.lm_head))
        # int8 layers hand more rows than a step takes to fbgemm's faster GEMM; float layers stop where
        # torch's GEMM catches up, and bigger batches still gain from several calls
        self._splits = all(getattr(layer, "dynamic", None) is None for group in layers for layer in group)
        blocks = (_Block * config.n_layer)()
        for i, (block, group) in enumerate(zip(t.h, layers, strict=True)):
            norms = (block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias)
            blocks[i] = _Block(*map(self._float, norms), *map(self._linear, group), int(block.attn.local))
        self._blocks = blocks
        self._model = _Model(
            config.n_layer, config.n_embd, config.n_head, config.d_ff, config.vocab_size, config.n_ctx,
            config.local_window, config.layer_norm_eps,
            *map(self._float, (t.wte.weight, t.wpe.weight, t.ln_f.weight, t.ln_f.bias)),
            blocks, self._linear(model.lm_head),
        )  # fmt: skip
        self._model_ref = ctypes.byref(self._model)
        # Attention reads the whole cache every token: in float16 that is half the bytes (int8 GPT-2
        # batch-1 steps 1.5-2.5% faster here, bf16 batch 8 4%), and float16's 11 bits lose less than
        # bfloat16 or int8 weights already do. float32 weights keep a float32 cache, the reference that
        # the others are tested against.
        weights = [layer.weight for group in layers for layer in group] + [model.lm_head.weight]
        self.cache_dtype = torch.float32 if any(w.dtype == torch.float32 for w in weights) else torch.float16
        self._fn, self._greedy = _library().gl_decode_step, _library().gl_greedy_steps

    def _float(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the fused decode step needs contiguous float32 CPU embeddings and layer norms")
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, layer: torch.nn.Module) -> _Lin:
        weight, scale, bias = (getattr(layer, name, None) for name in ("weight", "scale", "bias"))
        if not hasattr(layer, "kernel_rows") or weight is None:
            raise ValueError(f"the fused decode step needs kernel layers (KernelLinear), got {type(layer).__name__}")
        check(weight, scale, bias)
        self._keep += [x for x in (weight, scale, bias) if x is not None]
        kind = list(KINDS).index(weight.dtype)
        return _Lin(weight.data_ptr(), _ptr(scale), _ptr(bias), weight.shape[0], weight.shape[1], kind)

    def runs(self, rows: int) -> bool:
        """Whether this step should decode `rows` rows (else the engine uses the torch reference): in one
        call, or in consecutive calls of up to `max_rows` rows where those still beat torch's GEMMs
        (float weights; not int8, whose bigger batches run on fbgemm's int8 GEMM)."""
        return 0 < rows <= (rows if self._splits else self.max_rows)

    def decode(self, pool: Any, tokens: Tensor, positions: Tensor, tables: Tensor, exact: bool = False) -> Tensor:
        """Logits (M, vocab) float32 of M rows: row m feeds token tokens[m] at position positions[m],
        writes its key and value into `pool` (a `gptlab.infer.cache.KVPool`) through its block table
        tables[m] and attends to its positions <= positions[m]. More than `max_rows` rows run as
        consecutive calls (rows are independent). `exact`: every row's logits have the bits it would
        get alone (float32 and int8 rows always do; bfloat16 ones then stay off AMX tiles)."""
        idx, positions, tables, M = self._rows(pool, tokens, positions, tables)
        logits = torch.empty(M, self.config.vocab_size)
        # Row r0's pointers by address arithmetic: slicing tensors costs microseconds a call.
        for r0 in range(0, M, self.max_rows):
            self._call(self._fn, pool, idx, positions, tables, logits, r0, min(self.max_rows, M - r0), int(exact))
        return logits

    def greedy(self, pool: Any, tokens: Tensor, positions: Tensor, tables: Tensor, steps: int) -> Tensor:
        """`steps` greedy steps of M rows in one C call: row m feeds tokens[m] at positions[m], then at
        each further position the argmax of its last logits (`decode`'s rows, its tables reaching the
        last position). (M, steps) int64: each row's argmax after each step, -1 from a step whose
        logits have no finite maximum on. At most `max_rows` rows."""
        idx, positions, tables, M = self._rows(pool, tokens, positions, tables)
        if not 0 < M <= self.max_rows or steps < 1:
            raise ValueError(f"greedy steps take 1 to {self.max_rows} rows and steps >= 1; got {M} and {steps}")
        out = torch.empty(M, steps, dtype=torch.int64)
        workspace = torch.empty(M, self.config.vocab_size)
        self._call(self._greedy, pool, idx, positions, tables, workspace, 0, M, steps, out.data_ptr())
        return out

    def _rows(self, pool: Any, tokens: Tensor, positions: Tensor, tables: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """The rows' tokens, positions and tables as C reads them, and their number; checks the pool."""
        idx, positions, tables = _int64_rows(tokens), _int64_rows(positions), _int64_rows(tables)
        M = idx.numel()
        if positions.numel() != M or tables.dim() != 2 or tables.shape[0] != M:
            raise ValueError(
                f"got {M} tokens, {positions.numel()} positions and block tables of shape {tuple(tables.shape)}; "
                "need one token, position and table row per row"
            )
        c, k_cache, v_cache = self.config, pool.k, pool.v
        shape = tuple(k_cache.shape)
        ok = len(shape) == 5 and (shape[0], shape[2], shape[4]) == (c.n_layer, c.n_head, c.head_size)
        if not (ok and tuple(v_cache.shape) == shape and k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError(
                f"the KV pool must be two contiguous tensors of one shape (n_layer={c.n_layer}, blocks, "
                f"n_head={c.n_head}, block_size, head_size={c.head_size}); got {shape} and {tuple(v_cache.shape)}"
            )
        if k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.device.type != "cpu":
            raise ValueError(f"the KV pool must be float32 or float16 on the CPU; got {k_cache.dtype}")
        return idx, positions, tables, M

    def _call(self, fn: Any, pool: Any, idx: Tensor, positions: Tensor, tables: Tensor, logits: Tensor, r0: int,
              rows: int, *extra: int) -> None:  # fmt: skip
        """fn (a step of rows r0 .. r0 + rows - 1, with `extra` arguments); raises ValueError on its error."""
        k_cache, v_cache, width = pool.k, pool.v, tables.shape[1]
        err = fn(
            self._model_ref, rows, idx.data_ptr() + 8 * r0, positions.data_ptr() + 8 * r0,
            tables.data_ptr() + 8 * width * r0, width, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
            k_cache.shape[3], k_cache.dtype == torch.float16, logits.data_ptr() + 4 * logits.shape[1] * r0,
            torch.get_num_threads(), *extra,
        )  # fmt: skip
        if err:
            raise ValueError(f"decode step: {_STEP_ERRORS.get(err, f'error {err}')}")
