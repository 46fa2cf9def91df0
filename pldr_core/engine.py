"""A static-cache decode engine: the fast path for batch-1 and small-batch decoding.

``pldr_core.generate.decode_steps`` is the reference mechanism (dynamic shapes, per-row lengths, any
cache combination). This engine runs the model's own ``decode_step`` with everything a CUDA graph
needs: the buffers of a ``DecodeState`` preallocated once for prompt + max_new_tokens (attended over in
full with a mask), the rows' positions as a tensor, G_LM in a static buffer [L, B, H, dk, dk] (from the
prefill, a G-cache file or the frozen weights; with the KV-cache alone a learned model recomputes it
from the frozen A each step, as the eager model does), and the step compiled with ``torch.compile``
and replayed as one captured CUDA graph per token. Rows either share one prompt length (``prefill``,
``generate``) or are prefilled one at a time and stepped each at its own position (``prefill_row``,
``step_rows``, or ``greedy_chunk``: several greedy steps in one replay; continuous batching in
``pldr_core.serve``).

The prefill is the eager model itself (``model(prompt, kv_cache=..., g_cache=...)``): it writes straight
into the engine's buffers, so the cache semantics stay those of the library.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pldr_core.cache import GCache, KVCache
from pldr_core.config import GMode
from pldr_core.device import ids_on
from pldr_core.errors import PLDRError
from pldr_core.kernels import KERNELS, decode_attn, kv_write
from pldr_core.sampling import Step, greedy

G_SOURCES = ("file", "prefill", "none")

# Prompts in one right-padded prefill forward (``DecodeEngine.prefill_rows``).
PREFILL_CHUNK = 16


class DecodeEngine:
    """Static-cache greedy/sampled decoding for ``batch`` rows: of one prompt length (``prefill``,
    ``steps``, ``generate``) or each at its own position (``prefill_row(s)``, ``step_rows``).

    ``g_source``: 'file' (pass ``g_cache``, a filled GCache from a G-cache file; the metric path never
    runs), 'prefill' (G_LM from the prompt's prefill, then reused) or 'none' (no G-cache: a learned model
    recomputes G_LM from the frozen A each step; an identity-G model has no G at all).
    ``compile``: compile the step with ``torch.compile``. ``graph`` (default: as ``compile``): on CUDA,
    capture the step once as a CUDA graph that reads token and position from static buffers (one replay
    per token, no host work in between). A graph of the eager step (``graph=True, compile=False``)
    costs a capture instead of seconds of compiling: the better choice for short jobs.
    ``kernel``: with a fixed G_LM, write each new key and value with the Triton kernel of
    ``pldr_core.kernels.kv_write`` ('triton'; on CPU it needs TRITON_INTERPRET=1) or with torch ops
    ('torch'); 'auto' (the default) takes the kernel on CUDA. ``self.kernel`` says which one runs.
    ``attention``: the same choice for the attention over the cache (``pldr_core.kernels.decode_attn``);
    ``self.attention`` says which one runs.
    """

    def __init__(self, model, *, batch: int, max_len: int, g_source: str = "prefill",
                 g_cache: GCache | None = None, compile: bool = False, compile_mode: str | None = None,
                 graph: bool | None = None, kernel: str = "auto", attention: str = "auto"):
        if g_source not in G_SOURCES:
            raise PLDRError(f"unknown g_source {g_source!r}; choose one of {', '.join(G_SOURCES)}")
        for name, value in (("kernel", kernel), ("attention", attention)):
            if value not in KERNELS:
                raise PLDRError(f"unknown {name} {value!r}; choose one of {', '.join(KERNELS)}")
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
        attn_fits = decode_attn.applies(self.kv.k[0, :, :, :1], self.kv.k, cfg.head_dim)  # a q-shaped view
        if attention == "triton" and not attn_fits:
            raise PLDRError("the Triton attention kernel needs a power-of-two head size up to 128, caches "
                            "under 2**31 elements, Triton, and CUDA (or TRITON_INTERPRET=1)")
        use_attn = attn_fits and (attention == "triton" or (attention == "auto" and self.device.type == "cuda"))
        self.attention = "triton" if use_attn else "torch"
        self.state = model.decode_state(self.kv, G, use_metric=learned and g_source == "none",
                                        kernel=self.kernel == "triton", attn_kernel=use_attn)
        self._positions = torch.arange(max_len, device=self.device)
        self.compiled = bool(compile)
        # Static inputs/outputs of the step, so that one captured CUDA graph serves every step.
        self._tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # one position per row
        self._logits = self._next = None
        self._graph = None
        self._chunk_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._chunks_out: dict[int, torch.Tensor] = {}
        self._run = torch.compile(self._step, mode=compile_mode, fullgraph=True) if compile else self._step
        self._use_graph = (compile if graph is None else graph) and self.device.type == "cuda"

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, V], greedy next token [B]) of one model step at the rows' positions ``pos`` [B];
        advances them by one."""
        logits = self.model.decode_step(token, pos, self.state)
        pos.add_(1)
        return logits, logits.argmax(dim=-1)

    def _body(self) -> None:
        """The step over the static buffers: logits and greedy choice out, position advanced.

        Under a CUDA graph the outputs of the captured step live in the graph's memory pool at fixed
        addresses, so each replay rewrites ``self._logits`` and ``self._next`` in place."""
        self._logits, self._next = self._run(self._tok, self._pos)

    def _capture(self) -> None:
        self._graph = self._record(self._body, warmups=2)

    def _record(self, body, warmups: int) -> torch.cuda.CUDAGraph:
        """Warm ``body`` up (compiles) on a side stream, then capture it as a CUDA graph. Every run
        starts from the current token and positions (restored before each and after): runs write k/v
        only at positions that a real step rewrites before any query sees them, and never past the
        cache (a first step at the last position would otherwise warm up one position beyond it)."""
        tok, pos = self._tok.clone(), self._pos.clone()

        def restore():
            self._tok.copy_(tok)
            self._pos.copy_(pos)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                restore()
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        restore()
        return graph

    def _call(self, token: torch.Tensor, p: int | torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of one step of ``token`` [B] at position ``p`` (every row) or at positions
        ``p`` [B] (one per row); the logits are a static buffer: copy to keep."""
        self._tok.copy_(token)
        self._pos.copy_(self._positions[p:p + 1] if isinstance(p, int) else p)
        if self._use_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._body()
        return self._logits

    @torch.no_grad()
    def warm_up(self, chunk: int | None = None) -> None:
        """Compile (and on CUDA capture) the step now, so that the first real step is a replay; with
        ``chunk``, also capture ``greedy_chunk(chunk)``.

        A no-op without ``compile`` or ``graph``. It writes into the caches, which the next ``prefill``
        resets and rewrites (the positions it touches are written again before any query sees them)."""
        if not (self.compiled or self._use_graph):
            return
        if self._graph is None:
            self._tok.zero_()
            self._call(self._tok, 0)
        if chunk and self._use_graph and chunk not in self._chunk_graphs:
            self._tok.zero_()
            self._pos.zero_()
            self.greedy_chunk(chunk)

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [B, V] (a copy) of ``token`` [B] at ``position`` (after ``prefill``)."""
        if not 0 <= position < self.max_len:
            raise PLDRError(f"position {position} is outside this engine's {self.max_len} positions")
        return self._call(token, position).clone()

    @torch.no_grad()
    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (a copy) of ``tokens`` [B] at ``positions`` [B], one per row: rows of different
        lengths (each prefilled with ``prefill_row``) in one step, the same compiled step as ``step``."""
        if tokens.shape != (self.batch,) or positions.shape != (self.batch,):
            raise PLDRError(f"this engine steps {self.batch} rows: tokens and positions must be "
                            f"[{self.batch}], got {list(tokens.shape)} and {list(positions.shape)}")
        return self._call(tokens, positions).clone()

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the eager model on ``prompt`` [B, S] into the static caches; logits of the last position."""
        B, S = prompt.shape
        if B != self.batch:
            raise PLDRError(f"this engine decodes batches of {self.batch} rows, got {B}")
        return self._prefill(prompt, slice(0, B))

    @torch.no_grad()
    def prefill_row(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """Reset row ``row`` and run prompt ``ids`` [S] into it alone (unpadded: A sums over every
        position, so padding would change it); the logits [V] of its last position."""
        if not 0 <= row < self.batch:
            raise PLDRError(f"row {row} is outside this engine's {self.batch} rows")
        return self._prefill(ids[None], slice(row, row + 1))[0]

    @torch.no_grad()
    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Prefill ``prompts[i]`` [S_i] into row ``rows[i]``; the logits [len(rows), V] of each prompt's
        last position.

        Where G_LM is fixed before any prompt (a G-cache file, a frozen or identity G) the prompts share
        right-padded forwards, a few at a time: attention is causal, so the padding after a prompt never
        reaches its positions, and the padded keys are masked until a step overwrites them. Where G_LM
        comes from the prompt, A sums over every position and would see the padding: each row alone."""
        if len(rows) != len(prompts) or len(set(rows)) != len(rows) or not all(
                0 <= r < self.batch for r in rows):
            raise PLDRError(f"rows {rows} must be distinct rows of this engine's {self.batch}, one per prompt")
        if not self.fixed_g:
            return torch.stack([self.prefill_row(row, ids) for row, ids in zip(rows, prompts)])
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) >= self.max_len:
            raise PLDRError(f"prompt lengths must be between 1 and {self.max_len - 1} for this engine")
        n = PREFILL_CHUNK  # the forward's logits cover every padded position
        return torch.cat([self._prefill_padded(rows[i:i + n], prompts[i:i + n]) for i in range(0, len(rows), n)])

    @property
    def fixed_g(self) -> bool:
        """Whether G_LM is fixed before any prompt (a G-cache file, a frozen or identity G)."""
        return not ((self._gc is not None and self._gc.source == "prefill") or self.state.use_metric)

    def _prefill_padded(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        S = max(lengths)
        padded = torch.full((len(rows), S), self.model.config.pad_id, dtype=torch.long, device=self.device)
        for i, ids in enumerate(prompts):
            padded[i, :len(ids)] = ids.to(self.device)
        kv = KVCache.for_model(self.model, len(rows), S)
        logits = self.model(padded, kv_cache=kv, g_cache=self._gc).logits
        at = ids_on(rows, self.device)
        if self.G is not None:
            _keys_as_g_keys(kv.k, self.G[:, at])
        self.kv.k[:, at, :, :S] = kv.k
        self.kv.v[:, at, :, :S] = kv.v
        return logits[torch.arange(len(rows), device=self.device), ids_on(lengths, self.device) - 1]

    def _prefill(self, prompt: torch.Tensor, rows: slice) -> torch.Tensor:
        S = prompt.shape[1]
        if S < 1 or S >= self.max_len:
            raise PLDRError(f"prompt length {S} must be between 1 and {self.max_len - 1} for this engine")
        whole = rows == slice(0, self.batch)
        kv = self.kv if whole else self.kv.row(rows.start)
        kv.reset()
        gc = self._gc
        if gc is not None and gc.source == "prefill":
            gc = gc if whole else gc.row(rows.start)
            gc.reset()
        logits = self.model(prompt.to(self.device), kv_cache=kv, g_cache=gc).logits[:, -1]
        if self.G is not None:
            G = self.G[:, rows]
            if gc is not None and gc.source == "prefill":
                G.copy_(gc.G_LM.to(self.dtype))
            _keys_as_g_keys(kv.k[:, :, :, :S], G)
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

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Set the next input of rows ``rows`` [n] to ``tokens`` [n] at ``positions`` [n] (device
        tensors; no host work, so this queues behind whatever the device is running)."""
        self._tok[rows] = tokens
        self._pos[rows] = positions

    @torch.no_grad()
    def greedy_chunk(self, n: int) -> torch.Tensor:
        """Run ``n`` greedy steps of every row from its next input (``set_rows``, ``step_rows`` or
        the last chunk), each row at its own position; [B, n + 1] on the device: column 0 the inputs,
        then the tokens chosen. Each row's next input is then its last chosen token.

        A row's position stops at the last one (later steps rewrite it): rows that are free or done
        may run past their end without leaving the cache. The output is a static buffer, rewritten by
        the next chunk (copy to keep). On CUDA the ``n`` steps are one captured CUDA graph (one per
        ``n``), replayed without host work: the host can prepare the next chunk meanwhile."""
        if n < 1:
            raise PLDRError(f"a chunk runs at least one step, got {n}")
        out = self._chunks_out.get(n)
        if out is None:
            out = self._chunks_out[n] = torch.empty(self.batch, n + 1, dtype=torch.long, device=self.device)
        if not self._use_graph:
            self._chunk_body(out)
            return out
        graph = self._chunk_graphs.get(n)
        if graph is None:
            graph = self._chunk_graphs[n] = self._capture_chunk(out)
        graph.replay()
        return out

    def _chunk_body(self, out: torch.Tensor) -> None:
        out[:, 0] = self._tok
        last = self.max_len - 1
        for i in range(1, out.shape[1]):
            self._body()
            out[:, i] = self._next
            self._tok.copy_(self._next)
            self._pos.clamp_(max=last)

    def _capture_chunk(self, out: torch.Tensor) -> torch.cuda.CUDAGraph:
        # The one-step graph's outputs are kept: ``_body`` rebinds them while the chunk is recorded.
        if self._graph is None:
            self._capture()
        keep = self._logits, self._next
        graph = self._record(lambda: self._chunk_body(out), warmups=1)
        self._logits, self._next = keep
        return graph

    def _step_again(self) -> None:
        """Next step from ``self._tok`` at the position the last step left (no host work)."""
        if self._use_graph:
            self._graph.replay()
        else:
            self._body()


def _keys_as_g_keys(k: torch.Tensor, G: torch.Tensor) -> None:
    """Turn a prompt's keys k [L, n, H, S, dk] in place into G_LM k, as the decode step caches them
    (see ``DecodeState``), with G [L, n, H, dk, dk]. In float64 (exact products for bf16 and fp32 caches
    alike, whatever the TF32 setting), a layer at a time to bound the temporary."""
    for k_layer, G_layer in zip(k, G):
        k_layer.copy_(torch.matmul(k_layer.double(), G_layer.double().transpose(-1, -2)))
