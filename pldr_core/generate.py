"""Autoregressive decoding as a Python generator that yields tokens.

Cache combinations (``kv`` and ``g`` switches are independent):
- neither: every step reruns the whole text, so A is recomputed from the whole current text;
- KV only: the prefill caches k, v and A; later steps recompute G_LM from the frozen A;
- G only: the prefill's (or a file's) G_LM is reused; every step reruns the whole text;
- KV + G: both; with a G-cache file the metric path never runs at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pldr_core.cache import GCache, KVCache
from pldr_core.errors import PLDRError
from pldr_core.sampling import Step, Token, greedy
from pldr_core.static_decode import feed_ids, static_prefill, sync


def _g_cache_for(model, g_cache: bool | GCache, batch: int) -> GCache | None:
    """The GCache a decode uses: the given (file) one, an empty one for the prefill to fill, or none."""
    if isinstance(g_cache, GCache):
        return g_cache
    if g_cache and model.config.has_metric_path:
        return GCache.for_model(model, batch)
    return None


@torch.no_grad()
def decode_steps(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    kv_cache: bool = True,
    g_cache: bool | GCache = True,
    choose=greedy,
) -> Iterator[Step]:
    """Yield ``max_new_tokens`` steps for ``prompt`` [B, S] (all rows the same length).

    ``g_cache`` is True (take G from the prefill), False (no G-cache) or a filled ``GCache`` (from a
    file). ``choose`` maps logits [B, V] to ids [B] (greedy by default). Stopping at EOS is the
    caller's business: this is the mechanism, not the policy.
    """
    B, S = prompt.shape
    gc = _g_cache_for(model, g_cache, B)
    kv = KVCache.for_model(model, B, S + max_new_tokens) if kv_cache else None

    text = prompt
    logits = model(prompt, kv_cache=kv, g_cache=gc).logits[:, -1]
    for step in range(max_new_tokens):
        token = choose(logits)
        yield Step(token=token, logits=logits)
        if step + 1 == max_new_tokens:
            return
        if kv is not None:
            logits = model(token[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        else:
            text = torch.cat([text, token[:, None]], dim=1)
            logits = model(text, g_cache=gc).logits[:, -1]


# ---- generation as a generator -----------------------------------------------------------------
@dataclass
class RowTiming:
    prefill_ms: float = 0.0
    """Wall time of this row's prefill (metric path unless a G-cache file is used, KV writes)."""
    decode_s: float = 0.0
    """Wall time of the decode steps (forward + sampling) that produced this row's later tokens."""
    new_tokens: int = 0
    """Tokens generated for this row; the first comes from the prefill's logits."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else None


@dataclass
class GenerationStats:
    """Filled in place by ``generate`` while it runs (timing per row and for the whole batch)."""

    rows: list[RowTiming]
    decode_s: float = 0.0
    """Wall time of all decode steps (the batch shares them with the KV-cache on)."""
    new_tokens: int = 0
    compile_s: float = 0.0
    """Wall time spent capturing (and with ``torch_compile`` compiling) the decode step before
    decoding (``compile`` on CUDA); not part of ``decode_s``."""

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens produced by decode steps (all but each row's first) per second of decoding."""
        return (self.new_tokens - len(self.rows)) / self.decode_s if self.decode_s > 0 else None


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    kv_cache: bool = True,
    g_cache: bool | GCache = True,
    sampler=greedy,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
    compile: bool = False,
    torch_compile: bool = False,
) -> Iterator[Token]:
    """Generate continuations of ``prompts`` (lists of ids, any lengths), yielding ``Token``s.

    Each prompt is prefilled on its own, unpadded (A sums over every token, so padding would change
    it): through ``KVCache.row(b)`` / ``GCache.row(b)`` views with the KV-cache on, after which all
    rows decode together as one batch (per-row positions); rows that produced EOS stop (they are fed
    EOS until the batch ends, their outputs dropped). Without the KV-cache every step reruns each
    row's whole text, row by row. ``g_cache``: True (G from each row's prefill), False (none) or a
    filled ``GCache`` (a file; the metric path never runs). Every row therefore gets exactly the
    tokens it gets alone. Tokens are yielded step by step, rows in order within a step.

    ``compile`` (with the KV-cache on; ignored without it): decode through the static-cache
    ``DecodeEngine`` instead, one engine for every row, each row at its own position, so that
    ``sampler`` still sees all rows' logits [B, V] at once (same draws as the eager path). On CUDA
    the engine's step is captured once as a CUDA graph and replayed (before the prefill; that time goes
    to ``stats.compile_s``); ``torch_compile`` compiles the step with ``torch.compile`` first, which
    costs seconds and pays off only over long runs. Elsewhere the engine runs eagerly. Every row
    reports the whole prefill's time. Same tokens, same EOS stopping, same ``Token``s as the eager path.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PLDRError("every prompt needs at least one token (the empty text encodes to EOS)")
    if max_new_tokens < 1:
        raise PLDRError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    B = len(prompts)
    rows = [torch.tensor(p, dtype=torch.long, device=device) for p in prompts]
    if stats is None:
        stats = GenerationStats(rows=[RowTiming() for _ in range(B)])
    else:
        stats.rows = [RowTiming() for _ in range(B)]
    if compile and kv_cache:
        logits, next_logits = static_prefill(model, rows, max_new_tokens=max_new_tokens, g_cache=g_cache,
                                             eos_id=eos_id, stats=stats, device=device,
                                             torch_compile=torch_compile)
        yield from _decode_loop(logits, next_logits, max_new_tokens=max_new_tokens, sampler=sampler,
                                eos_id=eos_id, stats=stats)
        return
    gc = _g_cache_for(model, g_cache, B)
    kv = KVCache.for_model(model, B, max(len(p) for p in prompts) + max_new_tokens) if kv_cache else None

    def g_row(b):
        return None if gc is None else gc.row(b)

    # Prefill: row by row, unpadded.
    last = []
    for b, ids in enumerate(rows):
        t0 = time.perf_counter()
        out = model(ids[None], kv_cache=None if kv is None else kv.row(b), g_cache=g_row(b))
        last.append(out.logits[0, -1])
        sync(device)
        stats.rows[b].prefill_ms = (time.perf_counter() - t0) * 1e3
    logits = torch.stack(last)

    texts = list(rows)

    def next_logits(step, chosen, active, previous):
        if kv is not None:
            return model(feed_ids(chosen, active, eos_id)[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        new = previous.clone()  # finished rows keep their (unused) logits
        for b in range(B):
            if active[b]:
                texts[b] = torch.cat([texts[b], chosen[b:b + 1]])
                new[b] = model(texts[b][None], g_cache=g_row(b)).logits[0, -1]
        return new

    yield from _decode_loop(logits, next_logits, max_new_tokens=max_new_tokens, sampler=sampler,
                            eos_id=eos_id, stats=stats)


def _decode_loop(logits, next_logits, *, max_new_tokens, sampler, eos_id, stats):
    """Sample, time and yield one ``Token`` per active row per step; ``next_logits(step, chosen,
    active, logits)`` runs the model for the steps after the first (whose ``logits`` come from the
    prefill)."""
    B = logits.shape[0]
    active = [True] * B
    chosen = None
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        if step > 0:
            logits = next_logits(step, chosen, active, logits)
        chosen = sampler(logits)
        ids = chosen.tolist()  # synchronises with the device
        dt = time.perf_counter() - t0 if step > 0 else 0.0
        stats.decode_s += dt
        for b in range(B):
            if not active[b]:
                continue
            timing = stats.rows[b]
            if step > 0:
                timing.decode_s += dt
            is_eos = eos_id is not None and ids[b] == eos_id
            done = is_eos or step + 1 == max_new_tokens
            timing.new_tokens += 1
            stats.new_tokens += 1
            if done:
                active[b] = False
            yield Token(row=b, id=ids[b], index=step, logits=logits[b], done=done,
                        finish_reason=("eos" if is_eos else "length") if done else None)
        if not any(active):
            return


# ---- the paper's claim, measured ---------------------------------------------------------------
@torch.inference_mode()
def gcache_fidelity(model, ids: list[int], g_cache: GCache) -> dict:
    """How far a G-cache (from a file / another prompt) moves the logits of ``ids`` from full PLGA
    (the metric path run on ``ids`` itself): max |logit difference| at the last position and over
    all positions, and how often the greedy next token agrees (teacher-forced, every position)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    full = model(x).logits[0].double()
    cached = model(x, g_cache=g_cache).logits[0].double()
    diff = (full - cached).abs()
    agree = full.argmax(-1) == cached.argmax(-1)
    return {
        "max_abs_logit_diff_last": float(diff[-1].max()),
        "max_abs_logit_diff": float(diff.max()),
        "logit_scale": float(full.abs().max()),
        "next_token_agrees": bool(agree[-1]),
        "argmax_agreement": float(agree.double().mean()),
        "positions": len(ids),
    }
