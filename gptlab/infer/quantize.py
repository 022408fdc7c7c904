"""Fast CPU linear layers for inference, applied from outside the model.

`use_cpu_kernels` (what `gptlab generate` and `gptlab serve` use on CPU where gptlab's C kernels build,
see `gptlab.infer.cpu.kernels`) stores each weight once as float32, bfloat16 or int8 (`KernelLinear`): up to
16 activation rows (decoding) run on kernels that stream each weight row once; more rows (prefill)
run torch's GEMM on the dequantised weight. The classes below are the fallbacks built from torch's
own kernels, for machines where the C kernels do not build, and the int8 modes for `quantize_int8`.

`quantize_int8` quantises weights symmetrically per output channel (scale = max|w| / 127). Two kernels:
- "dynamic" (default): fbgemm's dynamic int8 GEMM; each call quantises its input to 8 bits per
  tensor, multiplies in int8 with int32 accumulation, and rescales. The fastest int8 CPU matmul in
  torch on AVX2 (a 768x3072 matrix-vector product, one core: ~0.12 ms, against ~2.3 ms for
  `_weight_int8pack_mm` with float32 activations and ~0.3 ms for float32 `F.linear`).
- "weight": weight-only; int8 weights are dequantised inside the matmul and activations stay in
  float (`torch._weight_int8pack_mm`). Closest to float; fast where that kernel is (AVX-512).
Quantisation is applied from outside the model, in place, to every `nn.Linear` of the blocks and to
the output projection (the tied embedding matrix, copied into an int8 head); token and position
embeddings stay in float since decoding reads one row of them per token.

`pack_float32` keeps float32 values but lays each weight out for the fastest CPU kernel torch offers
at each batch size (`PackedLinear`); on the AMD EPYC we measured, `F.linear` was ~1.3x slower at
batch 1 and ~1.4x at batch 8.

`pack_half` is how a bfloat16 model runs on CPUs without native bf16 matmuls (AVX2): each weight is
stored in fbgemm's packed float16 format and multiplied with float32 activations. Every bf16 value of
magnitude >= 2**-14 is exactly a float16 value (fp16 has more mantissa bits, and smaller ones round
by < 3e-8), so the weights are the bf16 weights, read at 2 bytes each; only the activations are kept
in float32 instead of being rounded to bf16.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.infer.cpu import kernels as cpu_kernels
from gptlab.model import GPT

MODES = ("dynamic", "weight")
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 (N, K), float32 scales (N,)) with weight ≈ int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # all-zero rows: any positive scale is exact
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` replacement holding an int8 weight (see the module docstring for modes)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, mode: str = "dynamic") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"int8 mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_weight(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = self._pack() if mode == "dynamic" else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "dynamic") -> Int8Linear:
        return cls(linear.weight, linear.bias, mode)

    def _pack(self) -> torch.ScriptObject:
        with warnings.catch_warnings():  # the quantised-tensor API warns that it is being retired
            warnings.simplefilter("ignore")
            zero = torch.zeros(self.out_features, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qweight, self.bias)

    def dequantized(self) -> Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if self._packed is not None:
            # reduce_range: 7-bit activations, so AVX2's pairwise u8*s8 products cannot saturate int16.
            y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, True)
            return y.to(dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        y = torch._weight_int8pack_mm(x2.to(act), self.weight_int8, self.scale.to(act))
        if self.bias is not None:
            y = y + self.bias.to(act)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class HalfLinear(nn.Module):
    """A drop-in `nn.Linear` replacement with float16 weights packed for fbgemm; float32 activations."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        if w.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"weights up to {w.abs().max():.3g} overflow float16; use float32 or int8")
        with warnings.catch_warnings():  # fbgemm's fp16 entry points warn that they are being retired
            warnings.simplefilter("ignore")
            self._packed = torch.fbgemm_pack_gemm_matrix_fp16(w)
        # The kernel warns on every call too; it stays the fastest half-precision CPU GEMM in torch
        # 2.13 (~25% ahead of quantized.linear_dynamic_fp16), so silence just that message.
        warnings.filterwarnings("ignore", message="fbgemm_linear_fp16_weight_fp32_activation is deprecated")
        self.register_buffer("bias", torch.zeros(self.out_features) if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalfLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.fbgemm_linear_fp16_weight(x.float(), self._packed, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16 (fbgemm)"


class PackedLinear(nn.Module):
    """A drop-in float32 `nn.Linear` replacement laid out for fast CPU matmuls (same values).

    One row (batch-1 decoding) runs MKL's `x @ W` on a (K, N) copy of the weight, ~1.3x faster than
    `F.linear`'s `x @ W.T` here; more rows run oneDNN on a prepacked copy, ~1.4x faster at 8 rows.
    Two copies, so twice the memory of the linear weights (`gptlab generate` uses it on CPU; pass
    pack=False to `prepare_model` to keep plain layers).
    """

    BATCH_HINT = 8  # oneDNN picks its blocked layout for this many rows

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float().contiguous()
        self.register_buffer("weight_t", w.t().contiguous())  # (K, N)
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w, self.BATCH_HINT))
        self.register_buffer("bias", torch.zeros(self.out_features) if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] == 1:
            y = torch.addmm(self.bias, x2, self.weight_t)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float32 (MKL + oneDNN)"


class KernelLinear(nn.Module):
    """A drop-in `nn.Linear` replacement for CPU inference on `gptlab.infer.cpu.kernels`' few-row kernels.

    The weight is stored (N, K) as float32, bfloat16 or int8 with a float32 scale per output row.
    float32 / bfloat16: up to `cpu_kernels.MAX_ROWS` rows (decoding, short prompts) go through the
    kernels, which read each weight once; more rows (long prompts) run torch's GEMM on the weight
    converted to float32, which is compute-bound there, so the conversion is cheap. bfloat16 weights
    multiply activations rounded to bfloat16, as torch's bfloat16 matmuls do, on every path; where
    torch multiplies bfloat16 natively (`cpu_kernels.native_bfloat16_gemm`: AMX, AVX-512 BF16), they
    take its bfloat16 GEMM from `BF16_KERNEL_ROWS` rows on. int8: the kernel (weight-only, float
    activations) up to `INT8_KERNEL_ROWS` rows, where reading the weight is the cost; from there on
    fbgemm's dynamic int8 GEMM (`Int8Linear`, on the same int8 values), whose int8 x int8 products
    need fewer instructions than the kernel's int16 ones once compute dominates.
    """

    INT8_KERNEL_ROWS = 2  # measured on AVX2 (benchmarks/decode.py): kernel 1.14x at 1 row, fbgemm 1.5x at 8
    # measured with AMX (Xeon, 2 cores, a 3072 x 768 layer): kernel 0.18 vs oneDNN 0.21 ms at 8 rows,
    # 0.38 vs 0.22 at 16, 0.75 vs 0.26 at 32
    BF16_KERNEL_ROWS = 8

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, storage: str = "float32", out: Tensor | None = None
    ) -> None:
        """out: where to store the weight ((N, K) of the storage dtype), e.g. a view into the buffer that
        holds all of a model's weights; by default a tensor of its own."""
        super().__init__()
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {list(STORAGE)}, got {storage!r}")
        self.storage = storage
        self.out_features, self.in_features = weight.shape
        self.kernel_rows = cpu_kernels.MAX_ROWS
        self.step_rows: int | None = None  # rows a fused decoding step takes; None: kernel_rows
        self.dynamic: Int8Linear | None = None
        w = weight.detach()
        if out is not None and (out.shape != w.shape or out.dtype != STORAGE[storage]):
            raise ValueError(f"out must be a {STORAGE[storage]} tensor of shape {tuple(w.shape)}")
        if storage == "int8":
            self.dynamic = Int8Linear(w, bias, "dynamic")  # quantises w; its int8 values serve both paths
            w, scale = self.dynamic.weight_int8, self.dynamic.scale
            if out is not None:  # fbgemm's packed copy is its own; this one serves the kernel and `dequantized`
                self.dynamic.weight_int8 = w = out.copy_(w)
            self.kernel_rows = self.INT8_KERNEL_ROWS
            if cpu_kernels.avx512():  # 16-lane tiles: a fused step takes up to MAX_ROWS rows in one call
                # (Xeon, 2 cores: batch 8 680 vs 456 tok/s through fbgemm and torch's operators, 16 816
                # vs 642, 32 838 vs 818); with AVX2 tiles int8 batches stay on fbgemm
                self.step_rows = cpu_kernels.MAX_ROWS
        elif out is not None:
            w, scale = out.copy_(w), None
        else:
            w, scale = w.to(STORAGE[storage]).contiguous().clone(), None
        if storage == "bfloat16" and cpu_kernels.native_bfloat16_gemm():
            self.kernel_rows = self.BF16_KERNEL_ROWS
        if storage == "bfloat16" and cpu_kernels.amx():  # likewise on AMX tiles (batch 16: 825 tok/s
            self.step_rows = cpu_kernels.MAX_ROWS  # against 497 in two calls of 8, 500 through torch)
        self.register_buffer("weight", w)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous().clone())
        cpu_kernels.check(self.weight, self.scale, self.bias)

    def dequantized(self) -> Tensor:
        w = self.weight.float()
        return w * self.scale[:, None] if self.scale is not None else w

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1]
        if self.storage == "bfloat16" and rows > self.kernel_rows:
            # bfloat16 weights multiply bfloat16 activations, on every path (the kernel rounds its own)
            xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            if cpu_kernels.native_bfloat16_gemm():
                bias = None if self.bias is None else self.bias.to(torch.bfloat16)
                y = F.linear(xb, self.weight, bias)
            else:
                y = F.linear(xb.float(), self.dequantized(), self.bias)
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if x2.shape[0] <= self.kernel_rows:
            y = cpu_kernels.call(x2, self.weight, self.scale, self.bias)
        elif self.dynamic is not None:
            y = self.dynamic(x2)
        else:
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.storage} (gptlab)"


def _reference_forward(layer: Int8Linear, x: Tensor) -> Tensor:
    """Float matmul with the dequantised weight: what the int8 kernels approximate (tests)."""
    return F.linear(x.float(), layer.dequantized(), layer.bias)


def _linear_sites(model: GPT, head: bool) -> Iterator[tuple[nn.Module, str, Tensor, Tensor | None]]:
    """(parent, attribute, weight, bias) of every block's nn.Linear and, with head=True, of the output
    projection (the tied embedding where there is none), in the order a decoding step uses them. Lazy:
    a caller that swaps each one as it comes lets the old weights go one by one."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child.weight, child.bias
    if head:
        yield model, "lm_head", model.transformer.wte.weight if model.lm_head is None else model.lm_head.weight, None


def _swap_linears(model: GPT, make: Callable[[Tensor, Tensor | None], nn.Module], head: bool) -> None:
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 / packed half-precision layers run on CPU; load the model with device='cpu'")
    if getattr(model, "quantized", None):
        raise ValueError(f"the model's linear layers are already swapped ({model.quantized}); load it afresh")
    for parent, name, weight, bias in _linear_sites(model, head):
        setattr(parent, name, make(weight, bias))


@torch.no_grad()
def pack_float32(model: GPT) -> GPT:
    """Prepack the float32 linear layers and output head for oneDNN (`PackedLinear`); the values are
    unchanged. In place; returns the model. Inference only. A no-op where torch lacks oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return model.eval()
    model.float()
    _swap_linears(model, PackedLinear, head=True)
    model.quantized = "float32-packed"
    return model.eval()


@torch.no_grad()
def pack_half(model: GPT) -> GPT:
    """Run a (bfloat16) model through fbgemm's half-precision GEMM: linear layers and the output head
    become `HalfLinear`, everything else float32. In place; returns the model. Inference only."""
    _swap_linears(model, HalfLinear, head=True)
    model.float()
    model.quantized = "half"
    return model.eval()


@torch.no_grad()
def quantize_int8(model: GPT, mode: str = "dynamic", head: bool = True) -> GPT:
    """Replace the model's linear layers (and, with head=True, its output projection) by `Int8Linear`,
    in place; returns the model. For inference only: the result cannot be trained or saved."""
    if mode not in MODES:
        raise ValueError(f"--quantize int8 mode must be one of {list(MODES)}, got {mode!r}")
    _swap_linears(model, lambda w, b: Int8Linear(w, b, mode), head)
    model.quantized = mode  # marks the model for reports; GPT.logits calls lm_head as a module
    return model.eval()


@torch.no_grad()
def use_cpu_kernels(model: GPT, storage: str) -> GPT:
    """Run the model's linear layers and output head on `KernelLinear` with weights stored as
    `storage` (float32, bfloat16 or int8); everything else float32. In place; returns the model.
    Inference only. Call only where `cpu_kernels.available()`."""
    model.float()  # first: float() would also convert the bfloat16 weights the layers store
    # Every weight goes straight into one huge-page buffer (`cpu_kernels.huge_page_views`), in the order
    # a decoding step reads them; the buffer commits memory as it is written and each float weight is
    # freed as its layer is swapped, so the peak stays near what it was without the buffer.
    like = [torch.empty(w.shape, dtype=STORAGE[storage], device="meta") for _, _, w, _ in _linear_sites(model, True)]
    views = iter(cpu_kernels.huge_page_views(like))
    _swap_linears(model, lambda w, b: KernelLinear(w, b, storage, out=next(views)), head=True)
    model.quantized = f"{storage}-kernels"
    return model.eval()
