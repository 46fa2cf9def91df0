"""Kernels of the metric path and of the decode step, and the setting that chooses them.

``MetricPath`` is the one setting of how a model's metric path runs (``PLDRModel.set_metric_path``):
the eager modules, or the fused formulation that ``torch.compile`` turns into few kernels (each GLU's
W1|W2 as one matmul; on CUDA the residual GLU stack as the Triton kernels of ``glu_stack``). The maths
is the same on every path. ``prepare_metric_path`` and ``optimize_for_training`` are what training
calls. ``_Gram`` forms A0 = q^T q from a bf16 q; ``kv_write`` holds the decode step's q|k|v kernel,
``decode_attn`` its attention over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pldr_core.config import MetricPrecision
from pldr_core.kernels import glu_stack

__all__ = ["MetricPath", "check_metric_precision", "prepare_metric_path", "optimize_for_training",
           "KERNELS", "METRIC_PRECISIONS", "DEFAULT_METRIC_PRECISION"]

KERNELS = ("auto", "triton", "torch")
METRIC_PRECISIONS = tuple(m.value for m in MetricPrecision)
DEFAULT_METRIC_PRECISION = MetricPrecision.BF16


@dataclass(frozen=True)
class MetricPath:
    """How the metric path runs; the default is the eager modules.

    ``fused``: each GLU's W1 and W2 as one matmul and the chain A0 -> G_LM written for
    ``torch.compile`` to fuse. ``kernel`` (fused only): the Triton GLU-stack kernels "auto" (for CUDA
    fp32 A0), "triton" (also CPU tensors, under TRITON_INTERPRET=1: for tests) or "torch" (never).
    ``precision``: the kernels' matmul operands (``MetricPrecision``). ``matmul`` and ``linear`` are
    the metric path's products, so that a precision study can emulate them.
    """

    fused: bool = False
    kernel: str = "auto"
    precision: MetricPrecision = MetricPrecision.FP32

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        object.__setattr__(self, "precision", MetricPrecision.parse(self.precision, "metric precision"))
        if self.fused and self.kernel == "auto" and not glu_stack.available():
            object.__setattr__(self, "kernel", "torch")  # CPU-only torch builds come without Triton

    def matmul(self, a: torch.Tensor, b: torch.Tensor, part: str) -> torch.Tensor:
        """a @ b for ``part`` "a0" (q^T q) or "chain" (W @ A, alpha @ A_P)."""
        return torch.matmul(a, b)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """A GLU projection of the fused path."""
        return F.linear(x, weight, bias)

    def uses_triton(self, attn, A0: torch.Tensor) -> bool:
        """Whether the GLU stack of ``attn`` runs as the Triton kernels on A0."""
        if not self.fused or self.kernel == "torch" or (self.kernel == "auto" and not A0.is_cuda):
            return False
        return glu_stack.supports(attn, A0)

    def gram_kernel(self) -> bool:
        """Whether the backward of A0 = q^T q from a bf16 q may be the 16-bit Triton kernel."""
        return self.kernel != "torch" and self.precision is not MetricPrecision.FP32


class _Gram(torch.autograd.Function):
    """A0 = q^T q in fp32 from a bf16/fp16 CUDA q, without an fp32 copy of q.

    q's values are exact in fp32, so reading them as they are and accumulating in fp32 gives the A0
    of ``q.float()``. The backward, dq = q (g + g^T) rounded once to q's dtype, is the fp32 path's
    matmul, or with ``kernel`` (for bf16 q) one Triton kernel that carries g + g^T to 16 significant
    bits (``_gram_backward``)."""

    @staticmethod
    def forward(ctx, q, kernel: bool):
        ctx.save_for_backward(q)
        ctx.kernel = kernel
        B, H, S, dk = q.shape
        rows = q.reshape(B * H, S, dk)
        return torch.bmm(rows.transpose(1, 2), rows, out_dtype=torch.float32).view(B, H, dk, dk)

    @staticmethod
    def backward(ctx, g):
        (q,) = ctx.saved_tensors
        if ctx.kernel and _gram_kernel_applies(q):
            return torch.ops.pldr.gram_backward(q, g), None
        return torch.matmul(q.to(g.dtype), g + g.transpose(-1, -2)).to(q.dtype), None


def _gram_kernel_applies(q: torch.Tensor) -> bool:
    """bf16 q with dk a power of two from 16 (a matmul tile) to 128 (dk 256 needs more shared memory
    than a Hopper block has) and int32 offsets; Triton available."""
    return q.dtype == torch.bfloat16 and glu_stack.fits(q.shape[-1], q, smallest=16)


_GRAM_ROWS = 128  # positions per program of the kernel below


@torch.library.custom_op("pldr::gram_backward", mutates_args=())
def _gram_backward(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dq = q (g + g^T) in bf16 for bf16 q [B, H, S, dk] and fp32 g [B, H, dk, dk], as one Triton kernel.

    Against the torch path (an fp32 copy of q, then a TF32 or bf16 matmul), it reads and writes bf16
    only and represents g + g^T to 16 significant bits instead of 11 (bf16 hi and lo parts, both
    products accumulated in fp32); the result is rounded to bf16 once, as the torch path's cast does.
    ``MetricPrecision.FP32`` keeps the fp32 matmul."""
    from pldr_core.kernels import _glu_triton as k

    if q.dtype != torch.bfloat16 or g.dtype != torch.float32:
        raise ValueError(f"gram_backward takes bf16 q and fp32 g, got {q.dtype} and {g.dtype}")
    B, H, S, dk = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with glu_stack.on_device(q):
        k._gram_bwd[(B * H, -(-S // _GRAM_ROWS))](q.contiguous(), g.contiguous(), dq, S, D=dk, BM=_GRAM_ROWS)
    return dq


@_gram_backward.register_fake
def _(q, g):
    return q.new_empty(q.shape)


def check_metric_precision(metric_precision: str) -> MetricPrecision:
    """``metric_precision`` as a ``MetricPrecision``; a ``PLDRError`` naming the choices otherwise."""
    return MetricPrecision.parse(metric_precision, "metric_precision (--metric-precision)")


def prepare_metric_path(model, device=None, *,
                        metric_precision: str = DEFAULT_METRIC_PRECISION) -> int:
    """Put ``model``'s learned-G layers on the fused metric path for training; returns how many.

    On CUDA the residual GLU stack runs as the Triton kernels with ``metric_precision`` matmul
    operands: "bf16" (the default: every GLU matmul operand rounded to bf16, as autocast does to a
    Linear, with fp32 accumulation and fp32 LayerNorms, residual adds and gradients; the fastest),
    "tf32" or "fp32". With "tf32" or "bf16" the torch matmuls of the metric path (W @ A, alpha @ A_P)
    go to TF32: this sets the process-wide ``torch.backends.cuda.matmul.allow_tf32`` (under bf16
    autocast they are the only fp32 matmuls). Under autocast A0 = q^T q reads the bf16 q directly with
    fp32 accumulation, which is exact, and its backward is one Triton kernel that carries g + g^T to
    16 significant bits (``_Gram``). On CPU the fused torch formulation runs (same maths, fp32/fp64).
    Under bf16 autocast the gradients' distance from float64 is set by autocast, not by this choice
    (``scripts/metric_precision_study.py``, ``tests/test_metric_precision.py``).
    """
    precision = check_metric_precision(metric_precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = model.set_metric_path(MetricPath(fused=True, precision=precision))
    if device.type == "cuda" and precision is not MetricPrecision.FP32 and n:
        torch.backends.cuda.matmul.allow_tf32 = True
    return n


def optimize_for_training(model, device=None, *, mode: str | None = None,
                          metric_precision: str = DEFAULT_METRIC_PRECISION):
    """The training module to call: compiled with the fused metric path on CUDA; ``model`` on CPU.

    ``model`` itself stays the module to save and to give the optimizer (the compiled wrapper shares
    its parameters). ``mode`` is passed to ``torch.compile`` (default: its default mode).
    ``metric_precision``: see ``prepare_metric_path``.
    """
    check_metric_precision(metric_precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cuda":
        return model
    prepare_metric_path(model, device, metric_precision=metric_precision)
    kw = {} if mode is None else {"mode": mode}
    return torch.compile(model, **kw)
