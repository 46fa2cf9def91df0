"""One decode-step kernel: the attention of the step's one query over the whole static cache.

The decode step attends one query per (row, head) over every key of the preallocated [L, B, H, T, dk]
caches, masked past the current position. Written with torch ops (a multiply-sum for the scores, a
masked softmax, a multiply-sum with v: ``reference``) torch.compile makes several kernels of it per
layer; ``decode_attention`` is the same maths as one Triton kernel per layer, which reads only the keys
up to the position. ``pos`` holds one position for every row or one per row (rows of a continuously
batched server sit at different positions).

It is a ``torch.library`` custom op that reads the two whole cache tensors (a layer index, not a
per-layer view, as ``kv_write.decode_qkv`` writes them), so a CUDA graph captures it as one launch.
``applies`` says when the step can use it; otherwise ``reference`` runs.
"""

from __future__ import annotations

import math
import os

import torch

from pldr_core.kernels.glu_stack import fits, on_device

BLOCK_T = 64  # keys per iteration of a program's loop over the cache


def applies(q: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """CUDA caches (or CPU ones under TRITON_INTERPRET=1) that the kernel fits (``glu_stack.fits``: dk a
    power of two up to 128, 32-bit offsets)."""
    runs_here = k_cache.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return runs_here and fits(head_dim, q, k_cache)


def _accumulation(q: torch.Tensor, k_cache: torch.Tensor) -> torch.dtype:
    """fp32 for 16- and 32-bit tensors, fp64 where either is fp64."""
    return torch.promote_types(torch.promote_types(q.dtype, k_cache.dtype), torch.float32)


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
              pos: torch.Tensor) -> torch.Tensor:
    """``decode_attention`` as torch ops: the decode step's own formulation, and the path where the
    kernel does not apply."""
    acc = _accumulation(q, k_cache)
    kc, vc = k_cache[layer], v_cache[layer]
    scores = (q.to(acc) * kc.to(acc)).sum(-1) / math.sqrt(q.shape[-1])  # [B, H, T]
    keys = torch.arange(kc.shape[2], device=pos.device) <= pos.view(-1, 1, 1)  # [1 or B, 1, T]
    p = torch.softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)
    return (p.unsqueeze(-1) * vc.to(acc)).sum(-2, keepdim=True).to(q.dtype)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, pos: torch.Tensor):
    """A ValueError for inputs the kernel would read out of place."""
    L, B, H, T, dk = k_cache.shape
    if q.shape != (B, H, 1, dk):
        raise ValueError(f"decode_attention: q must be [{B}, {H}, 1, {dk}] for these caches, "
                         f"got {list(q.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the two caches must have one shape and one set of strides, "
                         "the last one 1")
    if q.device != k_cache.device or pos.device != k_cache.device:
        raise ValueError("decode_attention: q, pos and the caches must be on one device")
    if not 0 <= layer < L:
        raise ValueError(f"decode_attention: layer {layer} is outside the caches' {L} layers")
    if pos.dtype not in (torch.int32, torch.int64) or pos.shape not in ((1,), (B,)):
        raise ValueError(f"decode_attention: pos must be an integer tensor of shape [1] or [{B}], got "
                         f"{pos.dtype} {list(pos.shape)}")
    if not applies(q, k_cache, dk):
        raise ValueError("decode_attention: needs CUDA tensors (or TRITON_INTERPRET=1), a power-of-two dk "
                         "up to 128, and caches under 2**31 elements")


@torch.library.custom_op("pldr::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
                     pos: torch.Tensor) -> torch.Tensor:
    """softmax(q k / sqrt(dk)) v [B, H, 1, dk] in q's dtype, over the keys 0..pos[row] of layer ``layer``.

    ``q`` [B, H, 1, dk] (any strides); caches [L, B, H, T, dk] with one set of strides, the last one 1;
    ``pos`` [1] (every row at one position) or [B], int64 or int32, a tensor so that a captured graph
    serves every step. Products and the softmax are fp32 (fp64 for fp64 tensors), as in ``reference``.
    """
    from pldr_core.kernels import _attn_triton

    _check(q, k_cache, v_cache, layer, pos)
    L, B, H, T, dk = k_cache.shape
    out = torch.empty(B, H, 1, dk, dtype=q.dtype, device=q.device)
    acc = _attn_triton.tl.float64 if _accumulation(q, k_cache) == torch.float64 else _attn_triton.tl.float32
    s_pos = 0 if pos.shape[0] == 1 else pos.stride(0)
    with on_device(q):
        _attn_triton._decode_attn[(B * H,)](
            q, k_cache, v_cache, pos, out, layer, H, T, s_pos, q.stride(0), q.stride(1), q.stride(3),
            *k_cache.stride()[:4], D=dk, BT=BLOCK_T, ACC=acc)
    return out


@decode_attention.register_fake
def _(q, k_cache, v_cache, layer, pos):
    return q.new_empty(q.shape)
