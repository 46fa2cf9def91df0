"""Faster training for the metric path, behind a switch that leaves the eager/CPU model untouched.

The metric path (SPEC section 1, step 3) is about 2.5% of a training step's FLOPs but, written plainly,
runs as hundreds of small kernels on [B, H, dk, dk] tensors. ``enable_fused(model)`` swaps each
attention layer's metric path for a formulation that compiles into far fewer kernels:

- the two input projections of every GLU (W1, W2) are one matmul against their concatenation;
- the whole chain A0 = q^T q -> LN_A -> residual GLU units -> A_LM -> A_P -> G_LM is one function that
  ``torch.compile`` fuses end to end (element-wise work folds into matmul prologues/epilogues);
- on CUDA, LN_A and the residual units run as three Triton kernels per layer (forward, backward for
  the data, backward for the weights; ``pldr_core.kernels.glu_stack``) instead of ~40 small kernels
  per unit. ``enable_fused(model, kernel="torch")`` keeps the torch formulation.

The maths is the same (tests pin values and gradients against the eager path in float64).
``optimize_for_training(model, device)`` is what ``pldr bench`` trains with: on CUDA it enables the
fused metric path (bf16 GLU operands by default, see ``prepare_metric_path``) and returns
``torch.compile(model)``; on CPU it returns the model unchanged. ``pldr pretrain --compile`` calls
``prepare_metric_path``, then compiles the whole model under CUDA graphs (or each decoder layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pldr_core.attention import EPS_ADJ, PLGAParams, PLGAttention
from pldr_core.errors import PLDRError
from pldr_core.kernels import glu_stack

__all__ = ["enable_fused", "disable_fused", "is_fused", "fused_metric_A", "fused_metric_chain",
           "check_metric_precision", "prepare_metric_path", "optimize_for_training", "KERNELS",
           "METRIC_PRECISIONS", "DEFAULT_METRIC_PRECISION"]


def _residual_unit(A: torch.Tensor, unit) -> torch.Tensor:
    """One residual unit: LN_u( A + GLU_n(...GLU_1(A)) ), with W1 and W2 as one matmul per GLU."""
    h = A
    for glu in unit.denseAs:
        w12 = torch.cat((glu.gluw1.weight, glu.gluw2.weight), 0)
        b12 = torch.cat((glu.gluw1.bias, glu.gluw2.bias), 0)
        a, b = F.linear(h, w12, b12).chunk(2, dim=-1)
        h = F.linear(F.silu(a) * b, glu.gluw3.weight, glu.gluw3.bias)
    ln = unit.layernormA
    return F.layer_norm(A + h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


KERNELS = ("auto", "triton", "torch")


def _use_triton(attn, A0: torch.Tensor) -> bool:
    kernel = attn.metric_kernel
    if kernel == "torch" or (kernel == "auto" and not A0.is_cuda):
        return False
    return glu_stack.supports(attn, A0)


def fused_metric_A(attn: PLGAttention, q: torch.Tensor) -> torch.Tensor:
    """A from post-RoPE q [B, H, S, dk] (same maths as ``PLGAttention.metric_A``)."""
    return _fused_stack(attn, torch.matmul(q.transpose(-1, -2), q))


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

    Against the torch path (an fp32 copy of q, then a TF32 matmul with ``--metric-precision tf32`` or
    bf16), it reads and writes bf16 only and represents g + g^T to 16 significant bits instead of 11
    (bf16 hi and lo parts, both products accumulated in fp32); the result is rounded to bf16 once, as
    the torch path's cast does. ``--metric-precision fp32`` keeps the fp32 matmul."""
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


def _fused_stack(attn: PLGAttention, A: torch.Tensor) -> torch.Tensor:
    """LN_A and the residual units on A0 (the Triton kernels where they apply)."""
    if _use_triton(attn, A):
        return glu_stack.glu_stack(attn, A, attn.metric_precision)
    ln = attn.layernorm1
    A = F.layer_norm(A, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    for unit in attn.reslayerAs:
        A = _residual_unit(A, unit)
    return A


def fused_metric_chain(params, A: torch.Tensor):
    """(A_LM, A_P, G_LM) from A (same maths as ``PLGAParams.forward``)."""
    z = torch.matmul(params.Wlst, A) + params.blst
    A_LM = z * F.silu(z) + EPS_ADJ
    A_P = torch.pow(A_LM, params.pwlst)
    G_LM = torch.matmul(params.alst, A_P) + params.balst
    return A_LM, A_P, G_LM


class FusedPLGAttention(PLGAttention):
    """PLGAttention whose metric path is the fused formulation (same parameters, same state dict).

    ``enable_fused`` sets ``metric_kernel`` and ``metric_precision`` on each such layer."""

    metric_kernel: str
    metric_precision: str

    def metric_A_of(self, q: torch.Tensor) -> torch.Tensor:
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):  # under autocast
            kernel = self.metric_kernel != "torch" and self.metric_precision != "ieee"
            return _fused_stack(self, _Gram.apply(q, kernel))
        return super().metric_A_of(q)

    def metric_A(self, q: torch.Tensor) -> torch.Tensor:
        return fused_metric_A(self, q)


class FusedPLGAParams(PLGAParams):
    def forward(self, A: torch.Tensor):
        return fused_metric_chain(self, A)


def enable_fused(model, *, kernel: str = "auto", precision: str = "ieee") -> int:
    """Swap every learned-G attention layer of ``model`` to the fused metric path; returns how many.

    ``kernel``: "auto" (Triton kernels for CUDA fp32 inputs, torch otherwise), "triton" (also on CPU
    tensors, which needs TRITON_INTERPRET=1: for tests) or "torch". ``precision``: the Triton kernels'
    matmul precision, "ieee" (fp32, the default), "tf32" or "bf16" (see ``prepare_metric_path``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if precision not in glu_stack.PRECISIONS:
        raise ValueError(f"precision must be one of {glu_stack.PRECISIONS}, got {precision!r}")
    if kernel == "auto" and not glu_stack.available():
        kernel = "torch"  # CPU-only torch builds come without Triton
    n = 0
    for module in model.modules():
        if isinstance(module, PLGAttention) and module.g_mode.has_metric_path:
            module.__class__ = FusedPLGAttention
            module.plgatt_layer.__class__ = FusedPLGAParams
            module.metric_kernel, module.metric_precision = kernel, precision
            n += 1
    return n


def disable_fused(model) -> int:
    """Undo ``enable_fused``."""
    n = 0
    for module in model.modules():
        if type(module) is FusedPLGAttention:
            module.__class__ = PLGAttention
            module.plgatt_layer.__class__ = PLGAParams
            n += 1
    return n


def is_fused(model) -> bool:
    return any(type(m) is FusedPLGAttention for m in model.modules())


METRIC_PRECISIONS = ("tf32", "bf16", "fp32")
DEFAULT_METRIC_PRECISION = "bf16"
# --metric-precision -> the GLU-stack kernels' operand precision
_KERNEL_PRECISION = {"tf32": "tf32", "bf16": "bf16", "fp32": "ieee"}


def check_metric_precision(metric_precision: str) -> None:
    """Raise a ``PLDRError`` naming the choices unless ``metric_precision`` is one of them."""
    if metric_precision not in METRIC_PRECISIONS:
        raise PLDRError(f"unknown metric_precision (--metric-precision) {metric_precision!r}; choose one "
                        f"of {', '.join(METRIC_PRECISIONS)}")


def prepare_metric_path(model, device=None, *, metric_precision: str = DEFAULT_METRIC_PRECISION) -> int:
    """Put ``model``'s learned-G layers on the fused metric path for training; returns how many.

    On CUDA the residual GLU stack runs as the Triton kernels with ``metric_precision`` matmuls: "bf16"
    (default: every GLU matmul operand rounded to bf16, as autocast does to a Linear, with fp32
    accumulation and fp32 LayerNorms, residual adds and gradients; the fastest), "tf32" or "fp32".
    With "tf32" or "bf16" the torch matmuls of the metric path (W @ A, alpha @ A_P) go to TF32: this sets the
    process-wide ``torch.backends.cuda.matmul.allow_tf32`` (under bf16 autocast the metric path's
    matmuls are the only fp32 ones). Under autocast A0 = q^T q reads the bf16 q directly with fp32
    accumulation, which is exact, and its backward is one Triton kernel that carries g + g^T to 16
    significant bits (``_Gram``, ``_gram_backward``). On CPU the fused torch formulation is used (same
    maths, fp32/fp64).

    Fidelity: under bf16 autocast (SPEC's training setting) the gradients already differ from
    float64's by O(1) norm-wise with an fp32 metric path, and the GLU operand precision does not add to
    that. Small preset, medians over 16 seeds, metric path / rest: fp32 metric path 1.45 / 0.86, TF32
    1.41 / 0.85, bf16 as run here (bf16 GLU operands, TF32 chain, 16-bit q^T q backward) 1.46 / 0.85
    (plain fp32 without autocast: 1.6e-3 / 1.0e-3). 300 steps of the small preset end at val loss
    6.4775 with bf16 as run (float64 6.4781 in that run), 6.4746 with TF32, 6.4780 with fp32 and 6.4779
    in float64 (``scripts/metric_precision_study.py``: CPU, roundings emulated;
    ``tests/test_metric_precision.py``).

    Speed, H200, paper shape: the bf16 kernels are 1.3-1.8x faster than the TF32 ones; ``pldr bench``
    trains learned-G at 0.850-0.857x identity-G with them (TF32 with earlier kernels: 0.734x) and
    ``pldr pretrain`` at a median 686k tokens/s over steps 11-40 (4k vocabulary; TF32 with earlier
    kernels 557k-562k). bf16 runs were uneven until pretrain's AdamW was made fused
    (``pldr_core.training.optim.optimizer_impl``).
    """
    check_metric_precision(metric_precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = enable_fused(model, precision=_KERNEL_PRECISION[metric_precision])
    if device.type == "cuda" and metric_precision != "fp32" and n:
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
