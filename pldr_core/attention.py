"""Power Law Graph Attention (PLGA): the attention, its metric path's dispatch, and its decode step.

G_LM comes from the metric path (``pldr_core.metric``), from a frozen tensor, or from a G-cache.
Module and parameter names follow the reference implementation so that state dicts map one to one
(``mha1.plgatt_layer.Wlst`` and so on). ``decode_step`` is the same attention for one token over the
static buffers of a ``DecodeState`` (``pldr_core.engine`` compiles it).
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
from pldr_core.kernels import MetricPath, _Gram, decode_attn, glu_stack, kv_write
from pldr_core.metric import EAGER, EPS_ADJ, GLU, PLGAParams, ResLayerA, metric_dtype

__all__ = ["PLGAttention", "LayerDeductive", "DecodeState", "MetricPath", "GLU", "PLGAParams", "ResLayerA",
           "EPS_ADJ", "metric_dtype", "rope_angles", "rope_tables", "apply_rope", "explicit_attention"]

# Backends for masked (KV-cached) attention. cuDNN is left out: it builds a new execution plan for
# every new key length.
_MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


@torch.library.custom_op("pldr::rope_angles", mutates_args=())
def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for integer ``positions`` [..., S] -> [..., S, head_dim/2].

    Angles are formed in float64 (as the golden vectors are) and cast by the caller. An opaque custom
    op, so that ``torch.compile`` computes the small tables once instead of inlining the float64
    cos/sin into every kernel that applies the rotation.
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


@dataclass
class DecodeState:
    """The static buffers one decode step reads and writes (``PLDRModel.decode_state`` builds it).

    ``k``, ``v``: the caches [L, B, H, T, dk], written in place at the step's position; with a fixed
    ``G`` [L, B, H, dk, dk] (a G-cache or a frozen G) the key cache holds G_LM k, since
    (q G_LM) . k = q . (G_LM k), so the step multiplies the one new key instead of the query. ``A``:
    the metric tensor frozen at the prefill ([L, B, H, dk, dk]; ``use_metric``: G_LM is recomputed
    from it every step). ``cos``, ``sin``: rotary tables [T, dk/2]; ``keys``: 0..T-1; ``rows``: 0..B-1;
    ``layer_ids``: 0..L-1 (tensor indices, so that a cache write is one scatter into the base tensor). ``wqkv``,
    ``bqkv``, ``w12``, ``b12``: per layer, the concatenated q|k|v and FFN W1|W2 weights (one matmul
    each: at small batch a step is bound by its number of kernels). ``kernel``: the q|k|v Triton kernel
    (``pldr_core.kernels.kv_write``) rotates q and k and writes G_LM k and v (needs a fixed ``G``);
    ``attn_kernel``: the attention over the cache as the Triton kernel of ``kernels.decode_attn``.
    """

    k: torch.Tensor
    v: torch.Tensor
    A: torch.Tensor | None
    G: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor
    rows: torch.Tensor
    layer_ids: torch.Tensor
    wqkv: list[torch.Tensor]
    bqkv: list[torch.Tensor]
    w12: list[torch.Tensor]
    b12: list[torch.Tensor]
    use_metric: bool
    kernel: bool
    attn_kernel: bool = False


class PLGAttention(nn.Module):
    """Multi-head power law graph attention with its metric path (reference name: ``mha1``).

    ``metric_path`` (a ``MetricPath``, set through ``PLDRModel.set_metric_path``) says how the metric
    path runs: eager modules or the fused formulation; the maths is the same.
    """

    def __init__(self, config: PLDRConfig):
        super().__init__()
        d, H, dk = config.d_model, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, dk
        self.rope_style, self.rope_base = config.rope_style, config.rope_base
        self.g_mode = config.g_mode
        self.metric_path = EAGER
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

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wq|Wk|Wv and bq|bk|bv concatenated: q, k and v as one matmul."""
        return (torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]),
                torch.cat([self.wq.bias, self.wk.bias, self.wv.bias]))

    # ---- metric path -------------------------------------------------------------------------
    def metric_A_of(self, q: torch.Tensor) -> torch.Tensor:
        """``metric_A`` of q [B, H, S, dk] as the attention produced it (bf16 under autocast): the
        metric path runs in ``metric_dtype`` (fp32; fp64 for a float64 model)."""
        path = self.metric_path
        if path.fused and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):  # under autocast
            return self._metric_stack(_Gram.apply(q, path.gram_kernel()))
        return self.metric_A(q.to(metric_dtype(q.dtype)))

    def metric_A(self, q: torch.Tensor) -> torch.Tensor:
        """A from post-RoPE q [B, H, S, dk]: LN_A(q^T q) through the residual units -> [B, H, dk, dk].

        The sum runs over every position of the input (not causal): the paper's definition.
        """
        return self._metric_stack(self.metric_path.matmul(q.transpose(-1, -2), q, "a0"))

    def _metric_stack(self, A: torch.Tensor) -> torch.Tensor:
        """LN_A and the residual units on A0 (as the Triton kernels where the metric path says so)."""
        path = self.metric_path
        if path.uses_triton(self, A):
            return glu_stack.glu_stack(self, A, glu_stack.OPERANDS[path.precision])
        A = self.layernorm1(A)
        for unit in self.reslayerAs:
            A = unit(A, path)
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

        Caches: with a filled ``g_cache`` the metric path never runs; with a filled ``kv_cache`` the
        metric tensor A is the one frozen at the prefill; otherwise A comes from this input and is
        stored in whichever caches are present.
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
            A_LM, A_P, G_LM = self.plgatt_layer(A.to(mdtype), self.metric_path)
        if g_cache is not None:
            g_cache.store(layer, A_LM, G_LM)
        deductive.A, deductive.A_LM, deductive.A_P, deductive.G_LM = A, A_LM, A_P, G_LM
        return G_LM

    # ---- decode step -------------------------------------------------------------------------
    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, layer: int, state: DecodeState,
                    rope: tuple[torch.Tensor, torch.Tensor] | None,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """``forward`` for one token x [B, 1, d] at ``pos`` ([1]: every row; or [B]: one per row) over
        ``state``'s static caches.

        ``rope``: cos, sin [1 or B, 1, 1, dk/2] at ``pos`` (None with ``state.kernel``, which reads the
        tables itself); ``mask`` [1 or B, 1, T]: each row's keys up to its position (None with
        ``state.attn_kernel``). Writes k (or G_LM k) and v at each row's position of layer ``layer``;
        returns the attention's output [B, 1, d].
        """
        B = x.shape[0]
        H, dk = self.num_heads, self.head_dim
        qkv = F.linear(x, state.wqkv[layer], state.bqkv[layer])
        acc = torch.promote_types(qkv.dtype, torch.float32)  # products accumulate in fp32 (or fp64)
        if state.kernel:
            # Fixed G_LM, one Triton kernel: rotate q and k, cache G_LM k and v at pos.
            q = kv_write.decode_qkv(qkv, state.cos, state.sin, pos, state.G, state.k, state.v, layer,
                                    self.rope_style == "interleaved")
        else:
            q = self._decode_qkv(qkv, pos, layer, state, rope, acc)
        if state.attn_kernel:  # one Triton kernel, reading only the keys up to each row's position
            out = decode_attn.decode_attention(q, state.k, state.v, layer, pos)
        else:
            # The one query over the whole static cache, masked past ``pos``; written out (multiply-sum,
            # softmax, multiply-sum) it compiles to fewer kernels than fused SDPA with a mask.
            kc, vc = state.k[layer], state.v[layer]
            scores = (q.to(acc) * kc.to(acc)).sum(-1) / math.sqrt(dk)  # [B, H, T]
            p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            out = (p.unsqueeze(-1) * vc.to(acc)).sum(-2, keepdim=True).to(q.dtype)
        return self.dense(out.transpose(1, 2).reshape(B, 1, H * dk))

    def _decode_qkv(self, qkv, pos, layer: int, state: DecodeState, rope, acc) -> torch.Tensor:
        """The torch ops of ``kv_write.decode_qkv``, plus the KV-cache-alone case: rotated q
        (multiplied by G_LM when G_LM comes from the frozen A); k (or G_LM k) and v written at pos."""
        B = qkv.shape[0]
        H, dk = self.num_heads, self.head_dim
        cos, sin = rope
        q, k, v = qkv.view(B, 1, 3, H, dk).transpose(1, 3).unbind(2)
        q = apply_rope(q, cos, sin, self.rope_style)
        k = apply_rope(k, cos, sin, self.rope_style)
        if state.G is not None:
            # Fixed G_LM: the key is cached as G_LM k, (G_LM k)_i = sum_j G_ij k_j.
            k = (state.G[layer].to(acc) * k.to(acc)).sum(-1).unsqueeze(-2).to(k.dtype)
        elif state.use_metric:
            # KV-cache alone: G_LM from the A frozen at the prefill, every step (as the eager model),
            # and q G_LM for the one query: sum_i q_i G_ij.
            with torch.autocast(device_type=q.device.type, enabled=False):
                _, _, G = self.plgatt_layer(state.A[layer], self.metric_path)
            q = (q.transpose(-1, -2).to(acc) * G.to(acc)).sum(-2, keepdim=True).to(q.dtype)
        # Tensor indices for the layer, the rows and their positions: one scatter into the base tensor
        # (a write through a per-layer view made the compiled step copy the whole cache back).
        lid = state.layer_ids[layer:layer + 1]
        state.k[lid, state.rows, :, pos] = k[:, :, 0].to(state.k.dtype)   # [B, H, dk]
        state.v[lid, state.rows, :, pos] = v[:, :, 0].to(state.v.dtype)
        return q
