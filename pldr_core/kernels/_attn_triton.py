"""The Triton kernel of ``pldr_core.kernels.decode_attn`` (see there). Its own module, so that importing
the library never imports Triton; under ``TRITON_INTERPRET=1`` it runs on CPU tensors (fp32/fp64 only:
the interpreter's bf16 casts truncate)."""

import triton
import triton.language as tl


@triton.jit
def _decode_attn(q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, layer, H, T, s_pos, s_qb, s_qh, s_qd,
                 s_cl, s_cb, s_ch, s_ct, D: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr):
    """One program per (row, head): softmax(q k / sqrt(dk)) v over the keys 0..pos[row] of ``layer``,
    BT keys at a time with an online softmax (running max m, running sum l, unnormalised output)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    # Keys past the cache's end would be masked anyway: this keeps every read inside the cache.
    n = tl.minimum(tl.load(pos_ptr + b * s_pos) + 1, T)
    i = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + i * s_qd).to(ACC)
    scale = tl.sqrt(tl.full((), D, ACC))  # the scores are divided by sqrt(dk), as in the torch formulation
    base = layer * s_cl + b * s_cb + h * s_ch + i[None, :]
    m = tl.full((), float("-inf"), ACC)
    l = tl.zeros((), ACC)
    o = tl.zeros((D,), ACC)
    for t0 in range(0, n, BT):
        t = t0 + tl.arange(0, BT)
        keep = t < n
        at = base + t[:, None] * s_ct
        k = tl.load(kc_ptr + at, mask=keep[:, None], other=0.0).to(ACC)
        s = tl.where(keep, tl.sum(k * q[None, :], axis=1) / scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)  # 0 at the first block (m = -inf; key 0 always attends)
        p = tl.exp(s - m_new)
        v = tl.load(vc_ptr + at, mask=keep[:, None], other=0.0).to(ACC)
        l = l * alpha + tl.sum(p, axis=0)
        o = o * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    tl.store(out_ptr + pid * D + i, (o / l).to(out_ptr.dtype.element_ty))
