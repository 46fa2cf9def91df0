"""The Triton kernel of ``pldr_core.kernels.kv_write`` (see there). Its own module, so that importing the
library never imports Triton; under ``TRITON_INTERPRET=1`` it runs on CPU tensors (fp32/fp64 only: the
interpreter's bf16 casts truncate)."""

import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, c, s, i, partner, sign, ACC: tl.constexpr):
    """The rotary embedding of the dk-vector at x_ptr, in ACC, rounded to x's dtype."""
    x = tl.load(x_ptr + i).to(ACC)
    xp = tl.load(x_ptr + partner).to(ACC)
    return (x * c + sign.to(ACC) * xp * s).to(x_ptr.dtype.element_ty)


@triton.jit
def _decode_qkv(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, g_ptr, kc_ptr, vc_ptr, q_ptr,
                layer, H, s_row, s_pos, s_gl, s_gb, s_gh, s_cl, s_cb, s_ch, s_ct,
                D: tl.constexpr, INTERLEAVED: tl.constexpr, ACC: tl.constexpr):
    """One program per (row, head): rotate q and k, store q, and G_LM k and v into the caches at pos."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    pos = tl.load(pos_ptr + b * s_pos)  # s_pos 0: one position for every row
    i = tl.arange(0, D)
    if INTERLEAVED:  # pairs (2j, 2j+1)
        partner = i ^ 1
        sign = tl.where(i % 2 == 0, -1.0, 1.0)
        f = i // 2
    else:  # halves
        partner = (i + D // 2) % D
        sign = tl.where(i < D // 2, -1.0, 1.0)
        f = i % (D // 2)
    c = tl.load(cos_ptr + pos * (D // 2) + f).to(ACC)
    s = tl.load(sin_ptr + pos * (D // 2) + f).to(ACC)
    row = qkv_ptr + b * s_row
    tl.store(q_ptr + pid * D + i, _rotate(row + h * D, c, s, i, partner, sign, ACC))
    k = _rotate(row + (H + h) * D, c, s, i, partner, sign, ACC).to(ACC)
    g = tl.load(g_ptr + layer * s_gl + b * s_gb + h * s_gh + i[:, None] * D + i[None, :]).to(ACC)
    gk = tl.sum(g * k[None, :], axis=1)  # (G_LM k)_i = sum_j G_ij k_j
    at = layer * s_cl + b * s_cb + h * s_ch + pos * s_ct + i
    tl.store(kc_ptr + at, gk.to(kc_ptr.dtype.element_ty))
    tl.store(vc_ptr + at, tl.load(row + (2 * H + h) * D + i))
