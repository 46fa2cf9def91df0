"""Faster training for the metric path, behind a switch that leaves the eager/CPU model untouched.

The metric path (SPEC section 1, step 3) is about 2.5% of a training step's FLOPs but, written plainly,
runs as hundreds of small kernels on [B, H, dk, dk] tensors. ``enable_fused(model)`` swaps each
attention layer's metric path for a formulation that compiles into far fewer kernels:

- the two input projections of every GLU (W1, W2) are one matmul against their concatenation;
- the whole chain A0 = q^T q -> LN_A -> residual GLU units -> A_LM -> A_P -> G_LM is one function that
  ``torch.compile`` fuses end to end (element-wise work folds into matmul prologues/epilogues).

The maths is the same (tests pin values and gradients against the eager path in float64).
``optimize_for_training(model, device)`` is what ``pretrain --compile`` calls: on CUDA it enables the
fused metric path, lets fp32 matmuls (only the metric path runs in fp32 under bf16 autocast) use TF32,
and returns ``torch.compile(model)``; on CPU it returns the model unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pldr_core.attention import EPS_ADJ, PLGAttention

__all__ = ["enable_fused", "disable_fused", "is_fused", "fused_metric_A", "fused_metric_chain",
           "optimize_for_training"]


def _glu_stack(A: torch.Tensor, unit) -> torch.Tensor:
    """One residual unit: LN_u( A + GLU_n(...GLU_1(A)) ), with W1 and W2 as one matmul per GLU."""
    h = A
    for glu in unit.denseAs:
        w12 = torch.cat((glu.gluw1.weight, glu.gluw2.weight), 0)
        b12 = torch.cat((glu.gluw1.bias, glu.gluw2.bias), 0)
        a, b = F.linear(h, w12, b12).chunk(2, dim=-1)
        h = F.linear(F.silu(a) * b, glu.gluw3.weight, glu.gluw3.bias)
    ln = unit.layernormA
    return F.layer_norm(A + h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def fused_metric_A(attn: PLGAttention, q: torch.Tensor) -> torch.Tensor:
    """A from post-RoPE q [B, H, S, dk] (same maths as ``PLGAttention.metric_A``)."""
    A = torch.matmul(q.transpose(-1, -2), q)
    ln = attn.layernorm1
    A = F.layer_norm(A, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    for unit in attn.reslayerAs:
        A = _glu_stack(A, unit)
    return A


def fused_metric_chain(params, A: torch.Tensor):
    """(A_LM, A_P, G_LM) from A (same maths as ``PLGAParams.forward``)."""
    z = torch.matmul(params.Wlst, A) + params.blst
    A_LM = z * F.silu(z) + EPS_ADJ
    A_P = torch.pow(A_LM, params.pwlst)
    G_LM = torch.matmul(params.alst, A_P) + params.balst
    return A_LM, A_P, G_LM


class FusedPLGAttention(PLGAttention):
    """PLGAttention whose metric path is the fused formulation (same parameters, same state dict)."""

    def metric_A(self, q: torch.Tensor) -> torch.Tensor:
        return fused_metric_A(self, q)


def _fused_params_forward(self, A):
    return fused_metric_chain(self, A)


def enable_fused(model) -> int:
    """Swap every learned-G attention layer of ``model`` to the fused metric path; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is PLGAttention and module.g_mode == "learned":
            module.__class__ = FusedPLGAttention
            module.plgatt_layer.__class__ = _FusedPLGAParams
            n += 1
    return n


def disable_fused(model) -> int:
    """Undo ``enable_fused``."""
    from pldr_core.attention import PLGAParams

    n = 0
    for module in model.modules():
        if type(module) is FusedPLGAttention:
            module.__class__ = PLGAttention
            module.plgatt_layer.__class__ = PLGAParams
            n += 1
    return n


def is_fused(model) -> bool:
    return any(type(m) is FusedPLGAttention for m in model.modules())


def _make_fused_params_class():
    from pldr_core.attention import PLGAParams

    class _Fused(PLGAParams):
        forward = _fused_params_forward

    _Fused.__name__ = "FusedPLGAParams"
    return _Fused


_FusedPLGAParams = _make_fused_params_class()


def optimize_for_training(model, device=None, *, mode: str | None = None, tf32_metric: bool = True):
    """The training module to call: compiled with the fused metric path on CUDA; ``model`` on CPU.

    ``model`` itself stays the module to save and to give the optimizer (the compiled wrapper shares
    its parameters). ``mode`` is passed to ``torch.compile`` (default: its default mode).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cuda":
        return model
    enable_fused(model)
    if tf32_metric:
        # Under bf16 autocast only the metric path's matmuls run in fp32; TF32 keeps them on tensor
        # cores (still far more precise than the reference code, which runs them in bf16).
        torch.backends.cuda.matmul.allow_tf32 = True
    kw = {} if mode is None else {"mode": mode}
    return torch.compile(model, **kw)
