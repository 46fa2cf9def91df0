"""Triton kernels for the residual GLU stack of the metric path (LN_A and the residual units on A).

The stack maps every row of the metric tensor on its own: each of the B*H*dk rows of A0 = q^T q is a
dk-vector that goes through LN_A and then ``num_reslayerA`` residual units, each a chain of
``num_denseA`` SwiGLUs (dk -> A_dff -> dk) closed by a residual add and a LayerNorm. Written with torch
ops that is ~40 kernels per unit on small [B, H, dk, dk] tensors; here it is three kernels per layer:

- ``_fwd``: one program carries a block of rows through LN_A and every unit, weights read from L2. It
  saves each GLU's input and each unit's pre-LayerNorm sum for the backward.
- ``_bwd_data``: the same row blocks in reverse: LayerNorm backward, then each GLU backward (its hidden
  activations recomputed from the saved input), giving dA0, the gradient at every GLU output, and per
  row block the sums that make the LayerNorm and b3 gradients.
- ``_bwd_weights``: the weight gradients, a reduction over all rows: one program per (GLU, hidden chunk,
  row split) recomputes the hidden activations and accumulates the W1/W2/W3, b1 and b2 gradients. The
  per-split (and per-block) partial sums are added up outside the op (by torch.compile's own kernels
  when compiled).

The kernels read the weights in nn.Linear's own layout (stacked over the GLUs) and step through the
hidden size in chunks; hidden units past its end read as zero weights, which add nothing (silu(0) * 0
= 0, and their W3 columns are zero), and their gradients are not written. So every parameter's
gradient comes out of the stack's backward as a contiguous slice in the parameter's layout, which
autograd hands over without a copy. Matmuls are fp32 (``precision="ieee"``) by
default; ``"tf32"`` uses TF32 tensor cores and ``"bf16"`` rounds every matmul operand to bfloat16
(what bf16 autocast does to a Linear), accumulating in fp32, with the LayerNorms, residual adds and
gradients in fp32 (``pldr_core.kernels.prepare_metric_path`` says what training uses).

``glu_stack`` is the entry point; it is a ``torch.library`` custom op, so ``torch.compile`` (and CUDA
graphs) treat it as one opaque call. On CPU tensors it runs the same kernels in Triton's interpreter,
which is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Per operand precision and kernel: rows per program (BM), hidden chunk width (BF), warps,
# software-pipelining stages (more stages need more shared memory); scripts/tune_glu_kernels.py times
# a grid of them at the paper-110m shape. The kernels are bound by L1/shared-memory traffic; 32-wide
# chunks in fp32 because 64-wide ones spill registers, 64-wide in bf16 (half the bytes) except in
# the weight kernel.
TUNING = {
    "tf32": {
        "fwd": {"BM": 64, "BF": 32, "num_warps": 4, "num_stages": 1},
        "bwd_data": {"BM": 64, "BF": 32, "num_warps": 4, "num_stages": 2},
        "bwd_weights": {"BM": 64, "BF": 32, "num_warps": 4, "num_stages": 2},
    },
    "bf16": {
        "fwd": {"BM": 64, "BF": 64, "num_warps": 4, "num_stages": 1},
        "bwd_data": {"BM": 64, "BF": 64, "num_warps": 4, "num_stages": 1},
        "bwd_weights": {"BM": 64, "BF": 32, "num_warps": 4, "num_stages": 1},
    },
}
PRECISIONS = ("ieee", "tf32", "bf16")
OPERANDS = {"fp32": "ieee", "tf32": "tf32", "bf16": "bf16"}  # MetricPrecision -> the kernels' precision


def available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fits(head_dim: int, *tensors: torch.Tensor, smallest: int = 2) -> bool:
    """Whether a kernel of this package that holds dk x dk tiles takes these: dk a power of two from
    ``smallest`` to 128 (larger tiles outgrow a Hopper block's registers and shared memory), every
    tensor under 2**31 elements (the kernels' offsets are 32-bit), and Triton importable."""
    power_of_two = smallest <= head_dim <= 128 and not head_dim & (head_dim - 1)
    return power_of_two and all(t.numel() < 2**31 for t in tensors) and available()


def on_device(t: torch.Tensor):
    """Context for launching a Triton kernel on ``t``: Triton launches on the current CUDA device, which
    need not be the tensors' (a model on ``cuda:1``); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tuning(precision: str) -> dict[str, dict[str, int]]:
    """The kernels' launch settings for an operand precision (fp32 "ieee" shares TF32's)."""
    return TUNING["bf16" if precision == "bf16" else "tf32"]


_ALIGN = 8  # hidden units: 16-byte rows in bf16, and whole 8-wide groups under the kernels' masks


def _operands(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, precision: str):
    """W1, W2 [U*J, FA, D] and W3 [U*J, D, FA] as the kernels read them: the hidden size F zero-padded
    to FA, a multiple of 8, and bf16 copies for "bf16". Made inside the ops, so the parameters'
    gradients keep their own layout. Padded because an odd hidden size made Triton split the loads
    along it into 4-byte pieces."""
    dtype = torch.bfloat16 if precision == "bf16" else w1.dtype
    pad = -w1.shape[1] % _ALIGN
    pad_rows = torch.nn.functional.pad
    return (pad_rows(w1.to(dtype), (0, 0, 0, pad)), pad_rows(w2.to(dtype), (0, 0, 0, pad)),
            pad_rows(w3.to(dtype), (0, pad)))


def _kernel(name: str, device: torch.device, n: int, precision: str):
    """(kernel, rows per program, hidden chunk width, launch options) for ``device`` (CPU tensors need
    the interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton GLU-stack kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    from pldr_core.kernels import _glu_triton as k  # imports triton: only where a kernel runs

    options = dict(tuning(precision)[name])
    options.pop("BM")
    bf = options.pop("BF")
    bm = _rows_per_program(name, n, precision)
    return getattr(k, "_" + name), bm, bf, (options if device.type == "cuda" else {})


# ---- custom ops ---------------------------------------------------------------------------------------
@torch.library.custom_op("pldr::glu_stack_fwd", mutates_args=())
def _glu_stack_fwd(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor,
                   b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, lnw: torch.Tensor,
                   lnb: torch.Tensor, eps: float, glus_per_unit: int, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = x.shape
    uj, hidden = w1.shape[0], w1.shape[1]
    units = uj // glus_per_unit
    y = torch.empty_like(x)
    hs = torch.empty(uj, n, d, dtype=_hs_dtype(x, precision), device=x.device)
    ys = torch.empty(units, n, d, dtype=x.dtype, device=x.device)
    wk1, wk2, wk3 = _operands(w1, w2, w3, precision)
    fwd, bm, bf, opts = _kernel("fwd", x.device, n, precision)
    with on_device(x):
        fwd[((n + bm - 1) // bm,)](x, y, hs, ys, wk1, wk2, b1, b2, wk3, b3, lnw, lnb, n, eps,
                                   U=units, J=glus_per_unit, D=d, F=hidden, FA=wk1.shape[1], BF=bf, BM=bm,
                                   PREC=precision, **opts)
    return y, hs, ys


def _hs_dtype(x: torch.Tensor, precision: str) -> torch.dtype:
    """The saved GLU inputs: bf16 for bf16 operands (the backward only multiplies by them)."""
    return torch.bfloat16 if precision == "bf16" else x.dtype


@_glu_stack_fwd.register_fake
def _(x, w1, w2, b1, b2, w3, b3, lnw, lnb, eps, glus_per_unit, precision):
    n, d = x.shape
    uj = w1.shape[0]
    return (x.new_empty(n, d), x.new_empty(uj, n, d, dtype=_hs_dtype(x, precision)),
            x.new_empty(uj // glus_per_unit, n, d))


@torch.library.custom_op("pldr::glu_stack_bwd", mutates_args=())
def _glu_stack_bwd(dy: torch.Tensor, x: torch.Tensor, hs: torch.Tensor, ys: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                   w3: torch.Tensor, lnw: torch.Tensor, eps: float, glus_per_unit: int, precision: str
                   ) -> list[torch.Tensor]:
    """[dA0, then the gradients of w1, w2, b1, b2, w3 as per-split partial sums (a leading split
    dimension), then per-row-block partials [blocks, 2 (U+1) + U*J, dk] of the LayerNorms' (weight,
    bias) gradients followed by b3's]; ``_backward`` sums them."""
    n, d = x.shape
    uj, hidden = w1.shape[0], w1.shape[1]
    units = uj // glus_per_unit
    wk1, wk2, wk3 = _operands(w1, w2, w3, precision)
    bwd_data, bm, bf, opts = _kernel("bwd_data", x.device, n, precision)
    nblocks = (n + bm - 1) // bm
    dx = torch.empty_like(x)
    dgout = torch.empty(hs.shape, dtype=_hs_dtype(x, precision), device=x.device)
    dvec = torch.empty(nblocks, 2 * (units + 1) + uj, d, dtype=x.dtype, device=x.device)
    with on_device(x):
        bwd_data[(nblocks,)](x, dy.contiguous(), dx, hs, ys, dgout, wk1, wk2, b1, b2, wk3, lnw, dvec, n, eps,
                             U=units, J=glus_per_unit, D=d, F=hidden, FA=wk1.shape[1], BF=bf, BM=bm,
                             PREC=precision, **opts)
    bwd_weights, bm, bf, opts = _kernel("bwd_weights", x.device, n, precision)
    splits, rows_per_split = _row_splits(n, uj, hidden, x.device, precision)
    dw1 = torch.empty(splits, *w1.shape, dtype=x.dtype, device=x.device)
    dw2 = torch.empty_like(dw1)
    dw3 = torch.empty(splits, *w3.shape, dtype=x.dtype, device=x.device)
    db1 = torch.empty(splits, *b1.shape, dtype=x.dtype, device=x.device)
    db2 = torch.empty_like(db1)
    with on_device(x):
        bwd_weights[(uj, -(-hidden // bf), splits)](hs, dgout, wk1, wk2, b1, b2, wk3, dw1, dw2, db1, db2, dw3,
                                                   n, rows_per_split, D=d, F=hidden, FA=wk1.shape[1],
                                                   BF=bf, BM=bm, PREC=precision, **opts)
    return [dx, dw1, dw2, db1, db2, dw3, dvec]


def _rows_per_program(name: str, n: int, precision: str) -> int:
    """Rows per program of kernel ``name`` for ``n`` rows (16 when there are fewer rows than a block)."""
    bm = tuning(precision)[name]["BM"]
    return bm if n >= bm else 16


def _row_splits(n: int, uj: int, hidden: int, device: torch.device, precision: str) -> tuple[int, int]:
    """(row splits, rows per split) of the weight-gradient kernel: enough splits for about 8 programs
    per SM (fewer left the GPU half idle) without large partial buffers."""
    bm, bf = _rows_per_program("bwd_weights", n, precision), tuning(precision)["bwd_weights"]["BF"]
    nblocks = -(-n // bm)
    splits = max(1, min(16, (8 * _sm_count(device)) // (uj * -(-hidden // bf)), nblocks))
    rows_per_split = -(-nblocks // splits) * bm
    return -(-n // rows_per_split), rows_per_split


@_glu_stack_bwd.register_fake
def _(dy, x, hs, ys, w1, w2, b1, b2, w3, lnw, eps, glus_per_unit, precision):
    n, d = x.shape
    uj, units = w1.shape[0], ys.shape[0]
    splits, _ = _row_splits(n, uj, w1.shape[1], x.device, precision)
    nblocks = -(-n // _rows_per_program("bwd_data", n, precision))
    return [torch.empty_like(x), *(x.new_empty(splits, *w.shape) for w in (w1, w2, b1, b2, w3)),
            x.new_empty(nblocks, 2 * (units + 1) + uj, d)]


def _setup_context(ctx, inputs, output):
    x, w1, w2, b1, b2, w3, b3, lnw, lnb, eps, glus_per_unit, precision = inputs
    _, hs, ys = output
    ctx.save_for_backward(x, hs, ys, w1, w2, b1, b2, w3, lnw)
    ctx.args = (eps, glus_per_unit, precision)


def _backward(ctx, dy, dhs, dys):
    x, hs, ys, w1, w2, b1, b2, w3, lnw = ctx.saved_tensors
    dx, *parts, dvec = _glu_stack_bwd(dy, x, hs, ys, w1, w2, b1, b2, w3, lnw, *ctx.args)
    # The partial sums are reduced here, outside the op, so that under torch.compile the reduction
    # fuses with the unstacking into each parameter's gradient (pack's backward).
    dvec = dvec.sum(0)
    dln, db3 = dvec[:2 * lnw.shape[0]].view(-1, 2, dvec.shape[-1]), dvec[2 * lnw.shape[0]:]
    return (dx, *(p.sum(0) for p in parts), db3, dln[:, 0], dln[:, 1], None, None, None)


_glu_stack_fwd.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


# ---- packing the module's parameters ------------------------------------------------------------------
def pack(layernorm1, units) -> tuple[list[torch.Tensor], float, int]:
    """The metric path's LN_A and residual units as the kernels' tensors (differentiable stacks).

    Returns ([w1, w2, b1, b2, w3, b3, lnw, lnb], eps, glus_per_unit) with w1, w2: [U*J, F, dk], b1,
    b2: [U*J, F], w3: [U*J, dk, F], b3: [U*J, dk] (each GLU's nn.Linear tensors, stacked), lnw, lnb:
    [U+1, dk] (LN_A first, then each unit's LayerNorm).
    """
    glus = [glu for unit in units for glu in unit.denseAs]
    norms = [layernorm1, *(unit.layernormA for unit in units)]
    tensors = [torch.stack([getattr(g, name).weight for g in glus]) for name in ("gluw1", "gluw2")]
    tensors += [torch.stack([getattr(g, name).bias for g in glus]) for name in ("gluw1", "gluw2")]
    tensors += [torch.stack([g.gluw3.weight for g in glus]), torch.stack([g.gluw3.bias for g in glus])]
    tensors += [torch.stack([n.weight for n in norms]), torch.stack([n.bias for n in norms])]
    return tensors, layernorm1.eps, len(units[0].denseAs)


def supports(attn, A0: torch.Tensor) -> bool:
    """Whether the kernels handle this layer and input (fp32; dk a power of two >= 16; int32 offsets)."""
    dk = A0.shape[-1]
    units = attn.reslayerAs
    if A0.dtype != torch.float32 or dk < 16 or dk & (dk - 1) or len(units) == 0:
        return False
    if any(len(u.denseAs) != len(units[0].denseAs) or u.layernormA.eps != attn.layernorm1.eps
           for u in units):
        return False
    glus_total = len(units) * len(units[0].denseAs)
    return glus_total * A0.numel() < 2**31 and len(units[0].denseAs) > 0


def glu_stack(attn, A0: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """LN_A and the residual units of ``attn`` applied to A0 [..., dk, dk] (same maths as the torch path)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tensors, eps, glus_per_unit = pack(attn.layernorm1, attn.reslayerAs)
    x = A0.reshape(-1, A0.shape[-1]).contiguous()
    y, _, _ = _glu_stack_fwd(x, *tensors, eps, glus_per_unit, precision)
    return y.view(A0.shape)
