"""A static-cache decode engine: the fast path for batch-1 and small-batch decoding.

``pldr_core.generate.decode_steps`` is the reference mechanism (dynamic shapes, per-row lengths, any
cache combination). This engine does the same maths for rows of equal length with everything a CUDA
graph needs:

- the KV-cache is preallocated once for prompt + max_new_tokens and attended over in full with a mask
  (static shapes; keys past the current position get zero weight);
- the position is a tensor, so one captured graph serves every step;
- G_LM comes from a static buffer [L, B, H, dk, dk] (filled from the prefill or from a G-cache file), so
  with a G-cache the metric path never runs in the step; with the KV-cache alone the step recomputes
  G_LM from the frozen A (SPEC section 2), as the eager model does;
- with a G_LM that stays fixed over the decode (a G-cache, or a frozen G), the key cache holds each key
  already multiplied by it: (q G_LM) . k = q . (G_LM k), so the step multiplies the one new key instead
  of the query, and the query's path is the identity-G model's; on CUDA one Triton kernel per layer
  rotates q and k, multiplies the new key and writes it and its value (``pldr_core.kernels.kv_write``);
- the step is compiled with ``torch.compile`` and replayed as one captured CUDA graph per token.

The prefill is the eager model itself (``model(prompt, kv_cache=..., g_cache=...)``): it writes straight
into the engine's buffers, so the cache semantics stay those of the library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pldr_core.attention import apply_rope, rope_angles
from pldr_core.cache import GCache, KVCache
from pldr_core.config import GMode
from pldr_core.errors import PLDRError
from pldr_core.sampling import Step, greedy
from pldr_core.kernels import KERNELS, kv_write

G_SOURCES = ("file", "prefill", "none")


class _StepModule(nn.Module):
    """One decode step over static buffers: token [B], position [1] -> logits [B, V].

    At batch 1-16 a decode step is bound by the number of kernels, not by FLOPs, so the step is written
    for few of them: q, k and v come from one matmul against the concatenated weights, as do the FFN's
    two input projections (a copy of those weights, made once per engine). With a fixed G_LM (``G``),
    the cached keys are G_LM k (``DecodeEngine.prefill`` converts the prompt's) and the query goes
    straight into the scores as in an identity-G model. A profile of one compiled step (paper-110m,
    batch 16, H200) gave the kernel counts: multiplying the query by G_LM, 76 kernels against
    identity-G's 71 (q G is a reduction, so the scores no longer merged with q's rotary embedding);
    multiplying the new key with torch ops, still 76 (a rotary kernel and a product-and-write kernel
    per layer); with ``kernel`` (``pldr_core.kernels.kv_write.decode_qkv``), 71, busy 300 us against
    297. Timed in turns in one run (batch 16, G-cache file): 0.89x identity-G's tokens/s with the torch
    ops, 0.99x with the kernel (the torch ops had given 0.943x in an earlier ``pldr bench`` run).
    """

    def __init__(self, model, kv: KVCache, G: torch.Tensor | None, use_metric: bool, kernel: bool):
        super().__init__()
        cfg = model.config
        self.model = model
        self.L, self.H, self.dk, self.d = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model
        self.rope_style = cfg.rope_style
        self.use_metric = use_metric
        self.kernel = kernel  # pldr_core.kernels.kv_write's decode_qkv (needs a fixed G)
        dtype = kv.k.dtype
        T = kv.max_len
        cos, sin = rope_angles(torch.arange(T, device=kv.k.device), self.dk, cfg.rope_base)
        # Same float64 angles as the eager path, cast once (the cast is element-wise, so identical).
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.register_buffer("keys", torch.arange(T, device=kv.k.device), persistent=False)
        self.register_buffer("layer_ids", torch.arange(cfg.num_layers, device=kv.k.device), persistent=False)
        self.k_cache, self.v_cache, self.A = kv.k, kv.v, kv.A
        self.G = G
        layers = model.decoder.dec_layers
        with torch.no_grad():
            self.wqkv = [torch.cat([l.mha1.wq.weight, l.mha1.wk.weight, l.mha1.wv.weight]) for l in layers]
            self.bqkv = [torch.cat([l.mha1.wq.bias, l.mha1.wk.bias, l.mha1.wv.bias]) for l in layers]
            self.w12 = [torch.cat([l.ffn.gluw1.weight, l.ffn.gluw2.weight]) for l in layers]
            self.b12 = [torch.cat([l.ffn.gluw1.bias, l.ffn.gluw2.bias]) for l in layers]

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, V], greedy next token [B]); advances ``pos`` by one."""
        m = self.model
        B = token.shape[0]
        H, dk = self.H, self.dk
        x = m.decoder.embedding(token[:, None]) * math.sqrt(self.d)
        x = m.decoder.layernorm1(x)
        if not self.kernel:  # the kernel reads the tables at pos itself
            cos = self.cos.index_select(0, pos)[None, None]  # [1, 1, 1, dk/2]
            sin = self.sin.index_select(0, pos)[None, None]
        mask = (self.keys <= pos)[None, None, None, :]   # [1, 1, 1, T]
        for i, layer in enumerate(m.decoder.dec_layers):
            a = layer.mha1
            qkv = F.linear(x, self.wqkv[i], self.bqkv[i])
            acc = torch.promote_types(qkv.dtype, torch.float32)  # products accumulate in fp32 (or fp64)
            if self.kernel:
                # Fixed G_LM, one Triton kernel: rotate q and k, cache G_LM k and v at pos.
                q = torch.ops.pldr.decode_qkv(qkv, self.cos, self.sin, pos, self.G, self.k_cache,
                                              self.v_cache, i, self.rope_style == "interleaved")
            else:
                q, k, v = qkv.view(B, 1, 3, H, dk).transpose(1, 3).unbind(2)
                q = apply_rope(q, cos, sin, self.rope_style)
                k = apply_rope(k, cos, sin, self.rope_style)
                if self.G is not None:
                    # Fixed G_LM: the key is cached as G_LM k, (G_LM k)_i = sum_j G_ij k_j.
                    k = (self.G[i].to(acc) * k.to(acc)).sum(-1).unsqueeze(-2).to(k.dtype)
                elif self.use_metric:
                    # KV-cache alone: G_LM from the A frozen at the prefill, every step (as the eager
                    # model), and q G_LM for the one query: sum_i q_i G_ij.
                    with torch.autocast(device_type=q.device.type, enabled=False):
                        _, _, G = a.plgatt_layer(self.A[i])
                    q = (q.transpose(-1, -2).to(acc) * G.to(acc)).sum(-2, keepdim=True).to(q.dtype)
                # Write the new key/value into the [L, B, H, T, dk] caches with tensor indices for both
                # the layer and the position: one scatter into the base tensor. (Writing through a
                # per-layer view made the compiled step copy the whole cache back, ~150 us per step at
                # batch 16.)
                lid = self.layer_ids[i:i + 1]
                self.k_cache[lid, :, :, pos] = k.permute(2, 0, 1, 3).to(self.k_cache.dtype)
                self.v_cache[lid, :, :, pos] = v.permute(2, 0, 1, 3).to(self.v_cache.dtype)
            kc, vc = self.k_cache[i], self.v_cache[i]
            # Attention of the one query over the whole static cache, masked past ``pos``: written out
            # (multiply-sum, softmax, multiply-sum) it compiles to fused kernels that beat fused SDPA with
            # a mask here (H200, paper-110m, G-cache file, batch 16, same build otherwise: 27,660 against
            # 26,782 tokens/s; identity-G 28,870 against 26,883).
            scores = (q.to(acc) * kc.to(acc)).sum(-1) / math.sqrt(dk)  # [B, H, T]
            p = torch.softmax(scores.masked_fill(~mask[0], float("-inf")), dim=-1)
            out = (p.unsqueeze(-1) * vc.to(acc)).sum(-2, keepdim=True).to(q.dtype)
            out = a.dense(out.transpose(1, 2).reshape(B, 1, H * dk))
            x = layer.layernorm1(x + out)
            ffn = layer.ffn
            g1, g2 = F.linear(x, self.w12[i], self.b12[i]).chunk(2, dim=-1)
            x = layer.layernorm2(x + ffn.gluw3(F.silu(g1) * g2))
        logits = m.final_layer(x)[:, 0]
        pos.add_(1)
        return logits, logits.argmax(dim=-1)


class DecodeEngine:
    """Static-cache greedy/sampled decoding for ``batch`` rows of equal prompt length.

    ``g_source``: 'file' (pass ``g_cache``, a filled GCache from a G-cache file; the metric path never
    runs), 'prefill' (G_LM from the prompt's prefill, then reused) or 'none' (no G-cache: a learned model
    recomputes G_LM from the frozen A each step; an identity-G model has no G at all).
    ``compile``: compile the step with ``torch.compile`` and, on CUDA, capture it once as a CUDA graph
    that reads token and position from static buffers (one replay per token, no host work in between).
    ``kernel``: with a fixed G_LM, write each new key and value with the Triton kernel of
    ``pldr_core.kernels.kv_write`` ('triton'; on CPU it needs TRITON_INTERPRET=1) or with torch ops
    ('torch'); 'auto' (the default) takes the kernel on CUDA. ``self.kernel`` says which one runs.
    """

    def __init__(self, model, *, batch: int, max_len: int, g_source: str = "prefill",
                 g_cache: GCache | None = None, compile: bool = False, compile_mode: str | None = None,
                 kernel: str = "auto"):
        if g_source not in G_SOURCES:
            raise PLDRError(f"unknown g_source {g_source!r}; choose one of {', '.join(G_SOURCES)}")
        if kernel not in KERNELS:
            raise PLDRError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        cfg = model.config
        learned = cfg.has_metric_path
        if g_source == "file" and g_cache is None:
            raise PLDRError("g_source 'file' needs a G-cache (read_gcache(path, model))")
        if g_source != "file" and g_cache is not None:
            raise PLDRError("a g_cache is only used with g_source 'file'")
        if cfg.g_mode is GMode.IDENTITY and g_source == "file":
            raise PLDRError("an identity-G model has no G-cache to load")
        self.model = model
        self.batch, self.max_len = batch, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, model.decoder.embedding.weight.dtype
        self.kv = KVCache.for_model(model, batch, max_len)
        G = None
        self._gc = None
        if cfg.has_frozen_g:
            # A frozen G_LM is part of the weights: hold it in the same static buffer.
            G = torch.stack([l.mha1.G_LM for l in model.decoder.dec_layers])[:, None]
            G = G.expand(-1, batch, -1, -1, -1).to(self.dtype).contiguous()
        elif learned and g_source != "none":
            G = torch.zeros(cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, cfg.head_dim,
                            device=self.device, dtype=self.dtype)
            if g_source == "file":
                self._gc = g_cache.to(device=self.device)
                G.copy_(self._gc.G_LM.to(self.dtype).expand_as(G))
            else:
                self._gc = GCache.for_model(model, batch)
        self.G = G
        fits = G is not None and kv_write.applies(self.kv.k, G, cfg.head_dim)
        if kernel == "triton" and not fits:
            raise PLDRError("the Triton decode kernel needs a fixed G_LM (a G-cache or a frozen G), a "
                            "power-of-two head size up to 128, a KV-cache and G under 2**31 elements, "
                            "Triton, and CUDA (or TRITON_INTERPRET=1)")
        auto = kernel == "auto" and self.device.type == "cuda"
        self.kernel = "triton" if fits and (kernel == "triton" or auto) else "torch"
        self._step = _StepModule(model, self.kv, G, use_metric=learned and g_source == "none",
                                 kernel=self.kernel == "triton")
        self._positions = torch.arange(max_len, device=self.device)
        self.compiled = bool(compile)
        # Static inputs/outputs of the step, so that one captured CUDA graph serves every step.
        self._tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._logits = self._next = None
        self._graph = None
        self._run = torch.compile(self._step, mode=compile_mode, fullgraph=True) if compile else self._step
        self._use_graph = compile and self.device.type == "cuda"

    def _body(self) -> None:
        """The step over the static buffers: logits and greedy choice out, position advanced.

        Under a CUDA graph the outputs of the captured step live in the graph's memory pool at fixed
        addresses, so each replay rewrites ``self._logits`` and ``self._next`` in place."""
        self._logits, self._next = self._run(self._tok, self._pos)

    def _capture(self) -> None:
        # Warm up (compiles) on a side stream, then capture one step. Every one of them runs at the
        # current position (each step advances it, so it is reset before each): they write k/v only
        # there, which the real step rewrites before any query sees it, and never past the cache
        # (a first step at the last position would otherwise warm up one position beyond it).
        pos = self._pos.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._pos.copy_(pos)
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._pos.copy_(pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        self._pos.copy_(pos)
        self._graph = graph

    def _call(self, token: torch.Tensor, p: int) -> torch.Tensor:
        """Logits [B, V] of one step of ``token`` [B] at position ``p`` (a static buffer: copy to keep)."""
        self._tok.copy_(token)
        self._pos.copy_(self._positions[p:p + 1])
        if self._use_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._body()
        return self._logits

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile (and on CUDA capture) the step now, so that the first real step is a replay.

        A no-op without ``compile``. It writes into the caches, which the next ``prefill`` resets and
        rewrites (the positions it touches are written again before any query sees them)."""
        if self.compiled and self._graph is None:
            self._tok.zero_()
            self._call(self._tok, 0)

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [B, V] (a copy) of ``token`` [B] at ``position`` (after ``prefill``)."""
        if not 0 <= position < self.max_len:
            raise PLDRError(f"position {position} is outside this engine's {self.max_len} positions")
        return self._call(token, position).clone()

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the eager model on ``prompt`` [B, S] into the static caches; logits of the last position."""
        B, S = prompt.shape
        if B != self.batch:
            raise PLDRError(f"this engine decodes batches of {self.batch} rows, got {B}")
        if S < 1 or S >= self.max_len:
            raise PLDRError(f"prompt length {S} must be between 1 and {self.max_len - 1} for this engine")
        self.kv.reset()
        gc = self._gc
        if gc is not None and gc.source == "prefill":
            gc.reset()
        logits = self.model(prompt.to(self.device), kv_cache=self.kv, g_cache=gc).logits[:, -1]
        if gc is not None and gc.source == "prefill":
            self.G.copy_(gc.G_LM.to(self.dtype))
        if self.G is not None:
            # The step attends over keys cached as G_LM k (see _StepModule): convert the prompt's.
            # In float64 (exact products for bf16 and fp32 caches alike, whatever the TF32 setting),
            # a layer at a time to bound the temporary.
            for k, G in zip(self.kv.k[:, :, :, :S], self.G):
                k.copy_(torch.matmul(k.double(), G.double().transpose(-1, -2)))
        return logits

    @torch.no_grad()
    def steps(self, prompt: torch.Tensor, max_new_tokens: int, choose=greedy) -> Iterator[Step]:
        """Yield ``max_new_tokens`` steps, like ``decode_steps`` with the KV-cache on."""
        S = prompt.shape[1]
        if S + max_new_tokens > self.max_len:
            raise PLDRError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                            f"{self.max_len} positions")
        logits = self.prefill(prompt)
        for i in range(max_new_tokens):
            token = choose(logits)
            yield Step(token=token, logits=logits)
            if i + 1 == max_new_tokens:
                return
            logits = self._call(token, S + i).clone()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, choose=greedy) -> torch.Tensor:
        """The new tokens [B, max_new_tokens] (no logits kept: the fastest loop)."""
        S = prompt.shape[1]
        if S + max_new_tokens > self.max_len:
            raise PLDRError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                            f"{self.max_len} positions")
        out = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        token = choose(self.prefill(prompt))
        out[:, 0] = token
        if max_new_tokens == 1:
            return out
        self._call(token, S)
        for i in range(1, max_new_tokens):
            if choose is greedy:
                token = self._next  # chosen inside the step (inside the graph on GPU)
            else:
                # self._logits, not a local: without a CUDA graph each step returns a new tensor.
                token = choose(self._logits)
            out[:, i] = token
            if i + 1 < max_new_tokens:
                self._tok.copy_(token)
                self._step_again()
        return out

    def _step_again(self) -> None:
        """Next step from ``self._tok`` at the position the last step left (no host work)."""
        if self._use_graph:
            self._graph.replay()
        else:
            self._body()
