"""The PLDR-LLM decoder: post-LayerNorm layers of PLGA + GLU, no final norm, untied head.

Module names follow the reference implementation (``decoder.embedding``, ``decoder.dec_layers.{i}.mha1``,
``final_layer``, ...) so a state dict of this model is a state dict of the paper's code. ``forward`` is
the one forward pass; ``decode_step`` is the same layers for one token over static buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pldr_core.attention import DecodeState, LayerDeductive, PLGAttention, rope_angles, rope_tables
from pldr_core.cache import GCache, KVCache
from pldr_core.config import GMode, PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.kernels import MetricPath
from pldr_core.metric import EAGER, GLU, metric_dtype


@dataclass
class PLDROutput:
    """What ``PLDRModel.forward`` returns."""

    logits: torch.Tensor
    """[B, S, V]."""
    deductive: list[LayerDeductive] | None = None
    """Per layer: A, A_LM, A_P, G_LM ([B, H, dk, dk]; the ones this call computed or used)."""
    attentions: list[torch.Tensor] | None = None
    """Per layer attention weights [B, H, S, T], only on request."""


class DecoderLayer(nn.Module):
    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.mha1 = PLGAttention(config)
        self.ffn = GLU(config.d_model, config.dff, config.d_model)
        self.layernorm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.layernorm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x, positions, **kw):
        attn, deductive, weights = self.mha1(x, positions, **kw)
        x = self.layernorm1(x + attn)
        x = self.layernorm2(x + self.ffn(x))
        return x, deductive, weights

    def decode_step(self, x, pos, layer: int, state: DecodeState, rope, mask):
        """``forward`` for one token over ``state`` (see ``PLGAttention.decode_step``)."""
        x = self.layernorm1(x + self.mha1.decode_step(x, pos, layer, state, rope, mask))
        return self.layernorm2(x + self.ffn.forward_w12(x, state.w12[layer], state.b12[layer]))


class Decoder(nn.Module):
    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layernorm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dec_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))


class PLDRModel(nn.Module):
    """A PLDR-LLM. ``model(tokens)`` -> ``PLDROutput`` with ``logits`` [B, S, V]."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.final_layer = nn.Linear(config.d_model, config.vocab_size)
        self.reset_parameters()

    # ---- initialisation ----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """The paper's init: Linear xavier_uniform with zero bias; W, P, alpha xavier_normal; b, beta 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif hasattr(module, "plgatt_layer") and isinstance(module, PLGAttention):
                module.plgatt_layer.reset_parameters()
        if self.config.g_mode is GMode.RANDOM:
            self.set_fixed_g(random_g(self.config))

    def set_fixed_g(self, G_LM: torch.Tensor, A_LM: torch.Tensor | None = None) -> None:
        """Load frozen G_LM (and A_LM) [L, H, dk, dk] into a 'random' or 'fixed' model."""
        cfg = self.config
        if not cfg.has_frozen_g:
            raise PLDRError(f"g_mode {cfg.g_mode!r} has no frozen G_LM to set")
        expected = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        if tuple(G_LM.shape) != expected or (A_LM is not None and tuple(A_LM.shape) != expected):
            raise PLDRError(f"G_LM must be {list(expected)} for this model, got {list(G_LM.shape)}")
        with torch.no_grad():
            for i, layer in enumerate(self.decoder.dec_layers):
                layer.mha1.G_LM.copy_(G_LM[i])
                layer.mha1.A_LM.copy_(A_LM[i] if A_LM is not None else torch.zeros_like(G_LM[i]))

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        g_cache: GCache | None = None,
        return_deductive: bool = False,
        return_attention: bool = False,
        explicit: bool = False,
        positions: torch.Tensor | None = None,
    ) -> PLDROutput:
        """Run the decoder on ``tokens`` [B, S].

        Without caches this is the training / full forward pass (A from the whole input). With a
        ``kv_cache`` the tokens continue each row at its cached length; a ``g_cache`` that is already
        filled replaces the metric path, an empty one is filled by this call (the prefill).
        ``explicit`` uses softmax((q G) k^T / sqrt(dk)) instead of fused SDPA (same maths).
        """
        B, S = tokens.shape
        end = None  # one past the last position, where known without asking the device
        if positions is None:
            positions = torch.arange(S, device=tokens.device)[None, :]
            if kv_cache is not None and not kv_cache.empty:
                positions = kv_cache.lengths[:, None] + positions
            else:  # every row starts at 0
                end = S
            positions = positions.expand(B, S)
        if kv_cache is not None:
            kv_cache.begin(positions, end)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_base)  # once, not per layer
        x = self.decoder.embedding(tokens) * math.sqrt(self.config.d_model)
        x = self.decoder.layernorm1(x)
        deductive, attentions = [], []
        for i, layer in enumerate(self.decoder.dec_layers):
            x, ded, weights = layer(
                x, positions, layer=i, kv_cache=kv_cache, g_cache=g_cache, explicit=explicit,
                need_deductive=return_deductive, need_weights=return_attention, rope=rope,
            )
            deductive.append(ded)
            attentions.append(weights)
        if kv_cache is not None:
            kv_cache.advance(positions)
        if g_cache is not None and not g_cache.filled and self.config.has_metric_path:
            g_cache.mark_filled()
        logits = self.final_layer(x)
        return PLDROutput(
            logits=logits,
            deductive=deductive if return_deductive else None,
            attentions=attentions if return_attention else None,
        )

    # ---- decode step -------------------------------------------------------------------------
    def decode_step(self, token: torch.Tensor, pos: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits [B, V] of ``token`` [B] at positions ``pos`` (a tensor, so that one captured CUDA graph
        serves every step: [1] for rows that all stand at one position, or [B], one per row, for rows
        of different lengths) over ``state``'s static buffers, which it updates in place.

        The same maths as ``forward`` with a KV-cache (and the G_LM that ``state`` holds), written for
        few kernels: at small batch a decode step is bound by their number, not by FLOPs.
        """
        x = self.decoder.embedding(token[:, None]) * math.sqrt(self.config.d_model)
        x = self.decoder.layernorm1(x)
        rope = None
        if not state.kernel:  # the kernel reads the tables at pos itself
            rope = (state.cos.index_select(0, pos)[:, None, None],   # [1 or B, 1, 1, dk/2]
                    state.sin.index_select(0, pos)[:, None, None])
        # The keys up to each row's position, [1 or B, 1, T] (the attention kernel masks by itself).
        mask = None if state.attn_kernel else (state.keys <= pos[:, None])[:, None]
        for i, layer in enumerate(self.decoder.dec_layers):
            x = layer.decode_step(x, pos, i, state, rope, mask)
        return self.final_layer(x)[:, 0]

    @torch.no_grad()
    def decode_state(self, kv: KVCache, G: torch.Tensor | None, *, use_metric: bool,
                     kernel: bool, attn_kernel: bool = False) -> DecodeState:
        """The buffers of ``decode_step`` over ``kv`` (and a fixed G_LM [L, B, H, dk, dk] or None);
        ``use_metric``: recompute G_LM from ``kv.A`` each step; ``kernel``: the q|k|v Triton kernel;
        ``attn_kernel``: the attention's Triton kernel."""
        cfg = self.config
        T, device = kv.max_len, kv.k.device
        cos, sin = rope_angles(torch.arange(T, device=device), cfg.head_dim, cfg.rope_base)
        layers = self.decoder.dec_layers
        qkv = [layer.mha1.fused_qkv() for layer in layers]
        w12 = [layer.ffn.fused_w12() for layer in layers]
        # Same float64 angles as the eager path, cast once (the cast is element-wise, so identical).
        return DecodeState(k=kv.k, v=kv.v, A=kv.A, G=G, cos=cos.to(kv.k.dtype), sin=sin.to(kv.k.dtype),
                           keys=torch.arange(T, device=device), rows=torch.arange(kv.batch, device=device),
                           layer_ids=torch.arange(cfg.num_layers, device=device),
                           wqkv=[w for w, _ in qkv], bqkv=[b for _, b in qkv],
                           w12=[w for w, _ in w12], b12=[b for _, b in w12],
                           use_metric=use_metric, kernel=kernel, attn_kernel=attn_kernel)

    # ---- metric path setting -----------------------------------------------------------------
    def set_metric_path(self, path: MetricPath = EAGER) -> int:
        """Run every learned-G layer's metric path as ``path`` says; returns how many layers have one.

        ``MetricPath()`` is the eager modules, ``MetricPath(fused=True, ...)`` the fused formulation
        (same values and gradients; same parameters and state dict)."""
        n = 0
        for layer in self.decoder.dec_layers:
            if layer.mha1.g_mode.has_metric_path:
                layer.mha1.metric_path = path
                n += 1
        return n

    @property
    def metric_path(self) -> MetricPath:
        """The ``MetricPath`` the layers run (``set_metric_path``); eager for a model without one."""
        return self.decoder.dec_layers[0].mha1.metric_path

    # ---- helpers -----------------------------------------------------------------------------
    def num_params(self, metric_only: bool = False) -> int:
        total = 0
        for name, p in self.named_parameters():
            if not metric_only or _is_metric_param(name):
                total += p.numel()
        return total

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.for_model(self, batch, max_len)

    def new_g_cache(self, batch: int) -> GCache:
        return GCache.for_model(self, batch)


def _is_metric_param(name: str) -> bool:
    return ".plgatt_layer." in name or ".reslayerAs." in name or ".mha1.layernorm1." in name


def cast_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model`` to ``dtype`` in place, except the metric path, which stays at least fp32.

    The metric path runs in fp32 under any autocast (``attention.metric_dtype``), so its own parameters
    stay fp32 in a bf16 or fp16 model (fp64 in a fp64 one), and the layers feed it fp32 inputs.
    """
    mdtype = metric_dtype(dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(mdtype if _is_metric_param(name) else dtype)
    for b in model.buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)
    return model


def random_g(config: PLDRConfig) -> torch.Tensor:
    """The seeded random G_LM [L, H, dk, dk] of g_mode 'random' (distribution recorded in the config)."""
    gen = torch.Generator().manual_seed(config.g_random_seed)
    shape = (config.num_layers, config.num_heads, config.head_dim, config.head_dim)
    return torch.randn(shape, generator=gen) * config.g_random_std + config.g_random_mean
