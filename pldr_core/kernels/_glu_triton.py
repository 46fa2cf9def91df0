"""The Triton kernels of ``pldr_core.kernels.glu_stack`` (see there for what each does), and the
backward of A0 = q^T q for bf16 q (``pldr_core.kernels._Gram``).

Kept in their own module so that importing the library never imports Triton; under
``TRITON_INTERPRET=1`` (set by the test suite on machines without a GPU) ``triton.jit`` gives the
interpreter, which runs the same kernels on CPU tensors.

``PREC`` is the matmul operand precision: "ieee" (fp32), "tf32", or "bf16" (every matmul operand
rounded to bfloat16, products accumulated in fp32; everything between the matmuls stays fp32).
"""

import os

import triton
import triton.language as tl

# Triton's interpreter gets bfloat16 wrong (under triton 3.9 its tl.dot on bf16 tiles returns garbage
# and its fp32 -> bf16 cast truncates), so there "bf16" rounds operands to nearest-even by hand and
# multiplies them in fp32: the same products as the GPU's bf16 tensor cores with fp32 accumulation.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _ln(x, w_ptr, b_ptr, cols, eps, D: tl.constexpr):
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None] * tl.load(w_ptr + cols)[None, :] + tl.load(b_ptr + cols)[None, :]


@triton.jit
def _ln_bwd(x, dy, w_ptr, dw_ptr, cols, eps, D: tl.constexpr):
    """dx of LayerNorm at input x; writes this block's sums for dweight and dbias at dw_ptr."""
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    tl.store(dw_ptr + cols, tl.sum(dy * xhat, axis=0))
    tl.store(dw_ptr + D + cols, tl.sum(dy, axis=0))
    g = dy * tl.load(w_ptr + cols)[None, :]
    c1 = tl.sum(g * xhat, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    return (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. With PREC "bf16" both operands must already be bf16 (``_op``)."""
    if PREC == "bf16":
        if _INTERPRETED:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _op(a, PREC: tl.constexpr):
    """``a`` as a matmul operand: rounded to bf16 once (outside the chunk loops) for PREC "bf16"."""
    if PREC == "bf16":
        if _INTERPRETED:
            bits = a.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # round to nearest even
            return bits.to(tl.float32, bitcast=True)
        else:
            return a.to(tl.bfloat16)
    else:
        return a


@triton.jit
def _in_tiles(W1, W2, B1, B2, uj, f, cols, D: tl.constexpr, F: tl.constexpr, FA: tl.constexpr):
    """GLU uj's input projections at hidden units ``f`` (a chunk; those >= F read as zero): the
    transposed W1, W2 tiles [D, chunk] (the weights are [U*J, FA, D], nn.Linear's layout with the
    hidden size zero-padded to FA, a multiple of 8) and the b1, b2 chunks ([U*J, F])."""
    w_off = uj * FA * D + f[None, :] * D + cols[:, None]
    w_mask = f[None, :] < FA
    b_off = uj * F + f
    return (tl.load(W1 + w_off, mask=w_mask, other=0.0), tl.load(W2 + w_off, mask=w_mask, other=0.0),
            tl.load(B1 + b_off, mask=f < F, other=0.0), tl.load(B2 + b_off, mask=f < F, other=0.0))


@triton.jit
def _hidden(h, W1, W2, B1, B2, uj, f, cols, D: tl.constexpr, F: tl.constexpr, FA: tl.constexpr,
            PREC: tl.constexpr):
    """The GLU's two input projections at hidden units ``f``: a = h W1 + b1, b = h W2 + b2, and the
    tiles."""
    w1, w2, b1, b2 = _in_tiles(W1, W2, B1, B2, uj, f, cols, D, F, FA)
    return _mm(h, w1, PREC) + b1[None, :], _mm(h, w2, PREC) + b2[None, :], w1, w2


@triton.jit
def _out_tile(W3, uj, f, cols, D: tl.constexpr, FA: tl.constexpr):
    """GLU uj's output projection at hidden units ``f``, transposed: [D, chunk] (W3 is [U*J, D, FA])."""
    return tl.load(W3 + uj * D * FA + cols[:, None] * FA + f[None, :], mask=f[None, :] < FA, other=0.0)


@triton.jit
def _fwd(X, Y, HS, YS, W1, W2, B1, B2, W3, B3, LNW, LNB, N, eps,
         U: tl.constexpr, J: tl.constexpr, D: tl.constexpr, F: tl.constexpr, FA: tl.constexpr,
         BF: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, BF)
    mask = rows[:, None] < N
    offs = rows[:, None] * D + cols[None, :]
    x = _ln(tl.load(X + offs, mask=mask, other=0.0), LNW, LNB, cols, eps, D)
    for u in range(U):
        h = x
        for j in range(J):
            uj = u * J + j
            h = _op(h, PREC)  # HS is bf16 for PREC "bf16": the backward only multiplies by it
            tl.store(HS + uj * N * D + offs, h, mask=mask)
            acc = tl.zeros([BM, D], dtype=tl.float32)
            for c in range(tl.cdiv(F, BF)):
                f = c * BF + fcols
                a, b, w1, w2 = _hidden(h, W1, W2, B1, B2, uj, f, cols, D, F, FA, PREC)
                w3 = tl.trans(_out_tile(W3, uj, f, cols, D, FA))
                acc += _mm(_op(a * tl.sigmoid(a) * b, PREC), w3, PREC)
            h = acc + tl.load(B3 + uj * D + cols)[None, :]
        y = x + h
        tl.store(YS + u * N * D + offs, y, mask=mask)
        x = _ln(y, LNW + (u + 1) * D, LNB + (u + 1) * D, cols, eps, D)
    tl.store(Y + offs, x, mask=mask)


@triton.jit
def _bwd_data(X, DY, DX, HS, YS, DG, W1, W2, B1, B2, W3, LNW, DVEC, N, eps,
              U: tl.constexpr, J: tl.constexpr, D: tl.constexpr, F: tl.constexpr, FA: tl.constexpr,
              BF: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, BF)
    mask = rows[:, None] < N
    offs = rows[:, None] * D + cols[None, :]
    # This row block's partial sums: the LayerNorms' (dweight, dbias) pairs, then each GLU's db3.
    dln = DVEC + pid * ((U + 1) * 2 + U * J) * D
    dx = tl.load(DY + offs, mask=mask, other=0.0)
    for uu in range(U):
        u = U - 1 - uu
        y = tl.load(YS + u * N * D + offs, mask=mask, other=0.0)
        dy = _ln_bwd(y, dx, LNW + (u + 1) * D, dln + (u + 1) * 2 * D, cols, eps, D)
        dh = dy
        for jj in range(J):
            uj = u * J + (J - 1 - jj)
            dh_op = _op(dh, PREC)
            # The weight kernel only multiplies by DG, so for bf16 it is stored as the rounded operand
            # (half the bytes it reads once per hidden chunk); db3, the one plain sum, is taken here.
            tl.store(DG + uj * N * D + offs, dh_op if PREC == "bf16" else dh, mask=mask)
            tl.store(dln + ((U + 1) * 2 + uj) * D + cols, tl.sum(dh, axis=0))
            h = tl.load(HS + uj * N * D + offs, mask=mask, other=0.0)
            dh_in = tl.zeros([BM, D], dtype=tl.float32)
            for c in range(tl.cdiv(F, BF)):
                f = c * BF + fcols
                a, b, w1, w2 = _hidden(h, W1, W2, B1, B2, uj, f, cols, D, F, FA, PREC)
                dgate = _mm(dh_op, _out_tile(W3, uj, f, cols, D, FA), PREC)
                s = tl.sigmoid(a)
                da = dgate * b * s * (1.0 + a * (1.0 - s))
                db = dgate * a * s
                dh_in += _mm(_op(da, PREC), tl.trans(w1), PREC)
                dh_in += _mm(_op(db, PREC), tl.trans(w2), PREC)
            dh = dh_in
        dx = dy + dh
    x0 = tl.load(X + offs, mask=mask, other=0.0)
    tl.store(DX + offs, _ln_bwd(x0, dx, LNW, dln, cols, eps, D), mask=mask)


@triton.jit
def _bwd_weights(HS, DG, W1, W2, B1, B2, W3, DW1, DW2, DB1, DB2, DW3, N, rows_per_split,
                 D: tl.constexpr, F: tl.constexpr, FA: tl.constexpr, BF: tl.constexpr,
                 BM: tl.constexpr, PREC: tl.constexpr):
    uj = tl.program_id(0)
    c = tl.program_id(1)
    split = tl.program_id(2)
    UJ = tl.num_programs(0)
    cols = tl.arange(0, D)
    f = c * BF + tl.arange(0, BF)
    # This program's weight tiles are the same for every row block: loaded once, before the loop.
    w3t = _out_tile(W3, uj, f, cols, D, FA)
    w1, w2, b1, b2 = _in_tiles(W1, W2, B1, B2, uj, f, cols, D, F, FA)
    acc1 = tl.zeros([D, BF], dtype=tl.float32)
    acc2 = tl.zeros([D, BF], dtype=tl.float32)
    acc3 = tl.zeros([BF, D], dtype=tl.float32)
    sb1 = tl.zeros([BF], dtype=tl.float32)
    sb2 = tl.zeros([BF], dtype=tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    for start in range(lo, hi, BM):
        rows = start + tl.arange(0, BM)
        mask = rows[:, None] < hi
        offs = uj * N * D + rows[:, None] * D + cols[None, :]
        h = tl.load(HS + offs, mask=mask, other=0.0)
        dh_op = _op(tl.load(DG + offs, mask=mask, other=0.0), PREC)  # zero rows add nothing below
        a = _mm(h, w1, PREC) + b1[None, :]
        b = _mm(h, w2, PREC) + b2[None, :]
        s = tl.sigmoid(a)
        dgate = _mm(dh_op, w3t, PREC)
        da = dgate * b * s * (1.0 + a * (1.0 - s))
        db = dgate * a * s
        acc3 += _mm(tl.trans(_op(a * s * b, PREC)), dh_op, PREC)
        ht = tl.trans(h)
        acc1 += _mm(ht, _op(da, PREC), PREC)
        acc2 += _mm(ht, _op(db, PREC), PREC)
        sb1 += tl.sum(da, axis=0)
        sb2 += tl.sum(db, axis=0)
    base = split * UJ + uj
    # Gradients in the weights' layouts: dW1, dW2 [F, D] (acc1, acc2 are their [D, chunk] transposes),
    # dW3 [D, F] (acc3 is its [chunk, D] transpose); hidden units >= F are not written.
    w_off = base * F * D + f[None, :] * D + cols[:, None]
    tl.store(DW1 + w_off, acc1, mask=f[None, :] < F)
    tl.store(DW2 + w_off, acc2, mask=f[None, :] < F)
    tl.store(DW3 + base * D * F + cols[None, :] * F + f[:, None], acc3, mask=f[:, None] < F)
    tl.store(DB1 + base * F + f, sb1, mask=f < F)
    tl.store(DB2 + base * F + f, sb2, mask=f < F)


@triton.jit
def _gram_bwd(Q, G, DQ, S, D: tl.constexpr, BM: tl.constexpr):
    """dq = q (g + g^T) for one (batch, head) and BM positions: q bf16 [S, D], g fp32 [D, D].

    g + g^T is split into bf16 hi and lo parts, and both products are accumulated in fp32: 16
    significant bits of g + g^T, more than the 11 of a TF32 matmul, at bf16 tensor-core speed."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    g = G + bh * D * D
    sym = tl.load(g + cols[:, None] * D + cols[None, :]) + tl.load(g + cols[None, :] * D + cols[:, None])
    hi = _op(sym, "bf16")
    lo = _op(sym - hi.to(tl.float32), "bf16")
    offs = bh * S * D + rows[:, None] * D + cols[None, :]
    mask = rows[:, None] < S
    q = _op(tl.load(Q + offs, mask=mask, other=0.0), "bf16")  # exact: q is bf16
    dq = _op(_mm(q, hi, "bf16") + _mm(q, lo, "bf16"), "bf16")  # one rounding, to nearest even
    tl.store(DQ + offs, dq, mask=mask)
