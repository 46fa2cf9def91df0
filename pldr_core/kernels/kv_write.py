"""One decode-step kernel for a fixed G_LM: rotary embeddings and the KV-cache write.

With a fixed G_LM the decode step caches each key as G_LM R_p k (R_p: its rotary embedding at
position p; see ``pldr_core.attention.DecodeState``). Written with torch ops, the product is a
reduction over the head dimension that torch.compile cannot merge with the rotation, so the step
has one more kernel per layer than the identity-G model's. ``decode_qkv`` is that part of the step as
one Triton kernel per layer: from the step's q|k|v projection it rotates q and k, stores G_LM k and v
at the current position of the [L, B, H, T, dk] caches (in place), and returns the rotated q.

It is a ``torch.library`` custom op that mutates the two whole cache tensors (never a per-layer view:
a view made the compiled step copy the cache back), so a CUDA graph captures it as one launch.
``applies`` says when the step can use it; otherwise the step's torch formulation runs.
"""

from __future__ import annotations

import os

import torch

from pldr_core.kernels.glu_stack import fits, on_device


def applies(k_cache: torch.Tensor, G: torch.Tensor, head_dim: int) -> bool:
    """CUDA caches (or CPU ones under TRITON_INTERPRET=1) that the kernel fits (``glu_stack.fits``: a
    program holds a dk x dk tile of G)."""
    runs_here = k_cache.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return runs_here and fits(head_dim, k_cache, G)


@torch.library.custom_op("pldr::decode_qkv", mutates_args=("k_cache", "v_cache"))
def decode_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               G: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
               interleaved: bool) -> torch.Tensor:
    """R_pos q [B, H, 1, dk]; stores G_LM[layer] R_pos k and v at ``pos`` in layer ``layer`` of the caches.

    ``qkv`` [B, 1, 3*H*dk]: one step's q|k|v projection (heads contiguous within each); ``cos``/``sin``
    [T, dk/2] the rotary tables (contiguous); ``pos`` [1] or [B] (int64; one position for every row or
    one per row; a tensor, so a captured graph serves every step); ``G`` [L, B, H, dk, dk] (any strides outside the last two dims, which are contiguous);
    caches [L, B, H, T, dk] with the same strides. The rotations are rounded to qkv's dtype, as the
    model's own rotation leaves them; the product G k accumulates in fp32 (fp64 for fp64 caches)."""
    from pldr_core.kernels import _kv_triton

    L, B, H, T, dk = k_cache.shape
    if qkv.shape != (B, 1, 3 * H * dk) or qkv.stride(-1) != 1:
        raise ValueError(f"decode_qkv: qkv must be [{B}, 1, {3 * H * dk}] with unit last stride, got "
                         f"{list(qkv.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_qkv: the two caches must have one shape and one set of strides")
    if G.shape != (L, B, H, dk, dk) or cos.shape != sin.shape or cos.shape[1:] != (dk // 2,):
        raise ValueError(f"decode_qkv: G must be [{L}, {B}, {H}, {dk}, {dk}] and cos/sin [T, {dk // 2}]")
    if pos.dim() != 1 or pos.shape[0] not in (1, B):
        raise ValueError(f"decode_qkv: pos must be [1] or [{B}], got {list(pos.shape)}")
    if not 0 <= layer < L:
        raise ValueError(f"decode_qkv: layer {layer} is outside the caches' {L} layers")
    if G.stride(-1) != 1 or G.stride(-2) != dk or k_cache.stride(-1) != 1:
        raise ValueError("decode_qkv: G's and the caches' last dimensions must be contiguous")
    if not applies(k_cache, G, dk):
        raise ValueError("decode_qkv: needs CUDA tensors (or TRITON_INTERPRET=1), a power-of-two dk up "
                         "to 128, and caches and G under 2**31 elements")
    q = torch.empty(B, H, 1, dk, dtype=qkv.dtype, device=qkv.device)
    acc = _kv_triton.tl.float64 if k_cache.dtype == torch.float64 else _kv_triton.tl.float32
    with on_device(qkv):
        _kv_triton._decode_qkv[(B * H,)](
            qkv, cos.contiguous(), sin.contiguous(), pos, G, k_cache, v_cache, q, layer, H, qkv.stride(0),
            pos.stride(0) if pos.shape[0] > 1 else 0,
            G.stride(0), G.stride(1), G.stride(2), *k_cache.stride()[:4],
            D=dk, INTERLEAVED=interleaved, ACC=acc)
    return q


@decode_qkv.register_fake
def _(qkv, cos, sin, pos, G, k_cache, v_cache, layer, interleaved):
    L, B, H, T, dk = k_cache.shape
    return qkv.new_empty(B, H, 1, dk)
