"""The metric path's modules: the SwiGLU block, the residual units on A, and the map A -> G_LM.

Names follow the paper: A (metric tensor after the residual units), A_LM (iSwiGLU of the linear map of
A, the positive metric tensor), A_P = A_LM ** P (potential tensor), G_LM = alpha @ A_P + beta
(energy-curvature tensor). Every module takes the layer's ``MetricPath``: the fused formulation runs
the same maths through the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pldr_core.kernels import MetricPath

EPS_ADJ = 1e-9  # keeps A_LM strictly positive so that A_LM ** P is defined
EAGER = MetricPath()


def metric_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the metric path runs in for a model (or input) of ``dtype``: fp64 stays fp64, anything
    else is fp32, also bf16/fp16 under autocast (A sums S outer products, A_LM ** P amplifies rounding;
    it is a small part of the FLOPs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class GLU(nn.Module):
    """W3( silu(W1 x + b1) * (W2 x + b2) ) + b3, the SwiGLU block of the FFN and of the metric path."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gluw1 = nn.Linear(d_in, d_hidden)
        self.gluw2 = nn.Linear(d_in, d_hidden)
        self.gluw3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, path: MetricPath = EAGER) -> torch.Tensor:
        if path.fused:
            return self.forward_w12(x, *self.fused_w12(), linear=path.linear)
        return self.gluw3(F.silu(self.gluw1(x)) * self.gluw2(x))

    def fused_w12(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1|W2 and b1|b2 concatenated: both input projections as one matmul."""
        return (torch.cat((self.gluw1.weight, self.gluw2.weight), 0),
                torch.cat((self.gluw1.bias, self.gluw2.bias), 0))

    def forward_w12(self, x: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor, linear=F.linear):
        """``forward`` from the ``fused_w12`` tensors (made once by a caller that reuses them)."""
        a, b = linear(x, w12, b12).chunk(2, dim=-1)
        return linear(F.silu(a) * b, self.gluw3.weight, self.gluw3.bias)


class ResLayerA(nn.Module):
    """One residual unit of the metric path: A = LN( A + GLU_n(...GLU_1(A)) )."""

    def __init__(self, head_dim: int, A_dff: int, num_denseA: int, eps: float):
        super().__init__()
        self.denseAs = nn.ModuleList(GLU(head_dim, A_dff, head_dim) for _ in range(num_denseA))
        self.layernormA = nn.LayerNorm(head_dim, eps=eps)

    def forward(self, A: torch.Tensor, path: MetricPath = EAGER) -> torch.Tensor:
        h = A
        for glu in self.denseAs:
            h = glu(h, path)
        return self.layernormA(A + h)


def iswiglu(z: torch.Tensor) -> torch.Tensor:
    """z * silu(z): SwiGLU with identity weights; non-negative, so A_LM is positive after + EPS_ADJ."""
    return z * F.silu(z)


class PLGAParams(nn.Module):
    """The per-head tensors that map A to G_LM: W, b (-> A_LM), P (-> A_P), alpha, beta (-> G_LM)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        shape = (num_heads, head_dim, head_dim)
        self.Wlst = nn.Parameter(torch.empty(shape))
        self.blst = nn.Parameter(torch.zeros(shape))
        self.pwlst = nn.Parameter(torch.empty(shape))
        self.alst = nn.Parameter(torch.empty(shape))
        self.balst = nn.Parameter(torch.zeros(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # xavier_normal on the [H, dk, dk] tensors, exactly as the reference initialises them.
        for p in (self.Wlst, self.pwlst, self.alst):
            nn.init.xavier_normal_(p)
        nn.init.zeros_(self.blst)
        nn.init.zeros_(self.balst)

    def forward(self, A: torch.Tensor, path: MetricPath = EAGER):
        """A [B, H, dk, dk] -> (A_LM, A_P, G_LM), each [B, H, dk, dk]."""
        A_LM = iswiglu(path.matmul(self.Wlst, A, "chain") + self.blst) + EPS_ADJ
        A_P = torch.pow(A_LM, self.pwlst)
        G_LM = path.matmul(self.alst, A_P, "chain") + self.balst
        return A_LM, A_P, G_LM
