"""Power Law Graph Attention (PLGA) and its metric path (SPEC section 1, steps 1-4).

Names follow the paper: A (metric tensor after the residual units), A_LM (iSwiGLU of the linear map of
A, the positive metric tensor), A_P = A_LM ** P (potential tensor), G_LM = alpha @ A_P + beta
(energy-curvature tensor). Module and parameter names follow the reference implementation so that
state dicts map one to one (``mha1.plgatt_layer.Wlst`` and so on).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pldr_core.config import GMode, PLDRConfig

EPS_ADJ = 1e-9  # keeps A_LM strictly positive so that A_LM ** P is defined

# Backends for masked (KV-cached) attention. cuDNN is left out: it builds a new execution plan for
# every new key length, which made each bf16 decode step on an H200 cost ~17 ms (23 tokens/s).
_MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def metric_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the metric path runs in for a model (or input) of ``dtype``: fp64 stays fp64, anything
    else is fp32, also bf16/fp16 under autocast (A sums S outer products, A_LM ** P amplifies rounding;
    it is ~2.5% of the FLOPs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


DEDUCTIVE_NAMES = ("A", "A_LM", "A_P", "G_LM")


@dataclass
class LayerDeductive:
    """One layer's deductive outputs, each [B or 1, H, dk, dk] or None where this call had none.

    ``A``: the metric tensor after the residual units; ``A_LM``: the positive metric tensor;
    ``A_P = A_LM ** P``: the potential tensor; ``G_LM``: the energy-curvature tensor. Identity-G has
    none; a frozen G (random/fixed) or a G-cache has G_LM (and A_LM where known), not A or A_P.
    It also reads like a dict of the tensors it holds: ``d["G_LM"]``, ``"A" in d``, ``d.items()``.
    """

    A: torch.Tensor | None = None
    A_LM: torch.Tensor | None = None
    A_P: torch.Tensor | None = None
    G_LM: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        value = getattr(self, name, None) if name in DEDUCTIVE_NAMES else None
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return name in DEDUCTIVE_NAMES and getattr(self, name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self else default

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def values(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.keys()]


class GLU(nn.Module):
    """W3( silu(W1 x + b1) * (W2 x + b2) ) + b3, the SwiGLU block of the FFN and of the metric path."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gluw1 = nn.Linear(d_in, d_hidden)
        self.gluw2 = nn.Linear(d_in, d_hidden)
        self.gluw3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gluw3(F.silu(self.gluw1(x)) * self.gluw2(x))


class ResLayerA(nn.Module):
    """One residual unit of the metric path: A = LN( A + GLU_n(...GLU_1(A)) )."""

    def __init__(self, head_dim: int, A_dff: int, num_denseA: int, eps: float):
        super().__init__()
        self.denseAs = nn.ModuleList(GLU(head_dim, A_dff, head_dim) for _ in range(num_denseA))
        self.layernormA = nn.LayerNorm(head_dim, eps=eps)

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        h = A
        for glu in self.denseAs:
            h = glu(h)
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

    def forward(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A [B, H, dk, dk] -> (A_LM, A_P, G_LM), each [B, H, dk, dk]."""
        A_LM = iswiglu(torch.matmul(self.Wlst, A) + self.blst) + EPS_ADJ
        A_P = torch.pow(A_LM, self.pwlst)
        G_LM = torch.matmul(self.alst, A_P) + self.balst
        return A_LM, A_P, G_LM


@torch.library.custom_op("pldr::rope_angles", mutates_args=())
def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for integer ``positions`` [..., S] -> [..., S, head_dim/2].

    Angles are formed in float64 (as the golden vectors are) and cast by the caller. This is an opaque
    custom op so that ``torch.compile`` computes the small tables once: as plain element-wise ops,
    inductor inlined the float64 cos/sin into every kernel that applies the rotation, once per element
    of q and k. On an H200 that was about 3.7 ms of a 26 ms paper-110m training step.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos(), angles.sin()


@rope_angles.register_fake
def _(positions, head_dim, base):
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=torch.float64), positions.new_empty(shape, dtype=torch.float64)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for ``positions`` [B, S], shaped [B, 1, S, head_dim/2] to broadcast over heads."""
    cos, sin = rope_angles(positions, head_dim, base)
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x [B, H, S, dk] by angles given as cos/sin [B or 1, 1, S, dk/2]."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if style == "interleaved":
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """softmax(q k^T / sqrt(dk) + mask) v with the weights returned; q already multiplied by G_LM.

    ``mask`` is boolean (True = may attend), broadcastable to [B, H, Sq, Sk]. Kept for tests and for
    returning attention weights; the fast path uses fused SDPA instead.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    weights = weights.to(v.dtype)
    return torch.matmul(weights, v), weights


class PLGAttention(nn.Module):
    """Multi-head power law graph attention with its metric path (reference name: ``mha1``)."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        d, H, dk = config.d_model, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, dk
        self.rope_style, self.rope_base = config.rope_style, config.rope_base
        self.g_mode = config.g_mode
        self.wq = nn.Linear(d, d)
        self.wk = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        if config.has_metric_path:
            self.plgatt_layer = PLGAParams(H, dk)
            self.reslayerAs = nn.ModuleList(
                ResLayerA(dk, config.A_dff, config.num_denseA, config.layer_norm_eps)
                for _ in range(config.num_reslayerA)
            )
            self.layernorm1 = nn.LayerNorm(dk, eps=config.layer_norm_eps)
        elif config.has_frozen_g:
            # Frozen G_LM (and A_LM where it is known) saved with the weights; never trained.
            self.register_buffer("G_LM", torch.zeros(H, dk, dk))
            self.register_buffer("A_LM", torch.zeros(H, dk, dk))

    # ---- metric path -------------------------------------------------------------------------
    def metric_A_of(self, q: torch.Tensor) -> torch.Tensor:
        """``metric_A`` of q [B, H, S, dk] as the attention produced it (bf16 under autocast): the
        metric path runs in ``metric_dtype`` (fp32; fp64 for a float64 model)."""
        return self.metric_A(q.to(metric_dtype(q.dtype)))

    def metric_A(self, q: torch.Tensor) -> torch.Tensor:
        """A from post-RoPE q [B, H, S, dk]: LN_A(q^T q) through the residual units -> [B, H, dk, dk].

        The sum runs over every position of the input (not causal): the paper's definition.
        """
        A = torch.matmul(q.transpose(-1, -2), q)
        A = self.layernorm1(A)
        for unit in self.reslayerAs:
            A = unit(A)
        return A

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        *,
        layer: int,
        kv_cache=None,
        g_cache=None,
        explicit: bool = False,
        need_deductive: bool = False,
        need_weights: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """x [B, S, d] at integer ``positions`` [B, S] -> (out [B, S, d], deductive dict|None, weights|None).

        Caches (SPEC section 2): with a filled ``g_cache`` the metric path never runs; with a filled
        ``kv_cache`` the metric tensor A is the one frozen at the prefill; otherwise A comes from this
        input and is stored in whichever caches are present.
        """
        B, S, _ = x.shape
        H, dk = self.num_heads, self.head_dim
        q = self.wq(x).view(B, S, H, dk).transpose(1, 2)
        k = self.wk(x).view(B, S, H, dk).transpose(1, 2)
        v = self.wv(x).view(B, S, H, dk).transpose(1, 2)
        # The model passes ``rope`` (cos, sin [B, 1, S, dk/2]) computed once for all layers.
        cos, sin = rope if rope is not None else rope_tables(positions, dk, self.rope_base)
        q = apply_rope(q, cos, sin, self.rope_style)
        k = apply_rope(k, cos, sin, self.rope_style)

        deductive = LayerDeductive()
        G = self._g_for(q, layer, kv_cache, g_cache, deductive)

        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v, positions)
        else:
            mask = None  # plain causal over the S positions of this input
        qg = q if G is None else torch.matmul(q, G.to(q.dtype))

        weights = None
        if explicit or need_weights:
            if mask is None:
                mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            out, weights = explicit_attention(qg, k, v, mask[:, None] if mask.dim() == 3 else mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(qg, k, v, is_causal=S > 1)
        else:
            with sdpa_kernel(_MASKED_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None])
        out = self.dense(out.transpose(1, 2).reshape(B, S, H * dk))
        return out, (deductive if need_deductive else None), (weights if need_weights else None)

    def _g_for(self, q, layer, kv_cache, g_cache, deductive: LayerDeductive) -> torch.Tensor | None:
        """G_LM for this call ([B or 1, H, dk, dk]), or None for identity G. Fills ``deductive``."""
        if self.g_mode is GMode.IDENTITY:
            return None
        if self.g_mode.is_frozen:
            deductive.G_LM = self.G_LM[None]
            if self.g_mode is GMode.FIXED:
                deductive.A_LM = self.A_LM[None]
            return self.G_LM[None]
        if g_cache is not None and g_cache.filled:
            deductive.A_LM, deductive.G_LM = g_cache.get(layer)
            return deductive.G_LM
        mdtype = metric_dtype(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            if kv_cache is not None and kv_cache.filled:
                A = kv_cache.A[layer]
            else:
                A = self.metric_A_of(q)
                if kv_cache is not None:
                    kv_cache.store_A(layer, A)
            A_LM, A_P, G_LM = self.plgatt_layer(A.to(mdtype))
        if g_cache is not None:
            g_cache.store(layer, A_LM, G_LM)
        deductive.A, deductive.A_LM, deductive.A_P, deductive.G_LM = A, A_LM, A_P, G_LM
        return G_LM
