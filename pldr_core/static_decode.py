"""Generation's static-cache path: one ``DecodeEngine`` per prompt length, stepped in lockstep.

``pldr_core.generate`` owns the decode loop (sampling, EOS, timing); this module supplies what the
loop needs from the engines: the prefill's logits and a function that runs one decode step for the
whole batch.
"""

from __future__ import annotations

import time

import torch

from pldr_core.cache import GCache
from pldr_core.engine import DecodeEngine

# Distinct batch sizes the static engines compile for before falling back to uncompiled engines
# (torch._dynamo's default recompile limit is 8; bench and earlier calls may hold some entries).
MAX_ENGINE_SHAPES = 4


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times cover the work they name."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feed_ids(chosen: torch.Tensor, active: list[bool], eos_id: int | None) -> torch.Tensor:
    """The next input ids: the chosen tokens, with EOS fed to rows that have already finished."""
    done_id = torch.full_like(chosen, eos_id if eos_id is not None else 0)
    return torch.where(torch.tensor(active, device=chosen.device), chosen, done_id)


def _g_source(model, g_cache: bool | GCache) -> tuple[str, GCache | None]:
    if not model.config.has_metric_path:
        return "none", None  # identity / frozen G: the engine holds it (a G-cache is unused)
    if isinstance(g_cache, GCache):
        return "file", g_cache
    return ("prefill" if g_cache else "none"), None


# Runs under no_grad rather than inference mode: the engine's static buffers are updated in place by
# a compiled step / captured CUDA graph, the setting in which the engine is tested.
@torch.inference_mode(False)
@torch.no_grad()
def static_prefill(model, rows: list[torch.Tensor], *, max_new_tokens: int, g_cache: bool | GCache,
                   eos_id: int | None, stats, device: torch.device):
    """Build the engines (compiling them on CUDA, timed into ``stats.compile_s``), prefill every row
    (``stats.rows[b].prefill_ms``: its group's time) and return ``(logits [B, V], next_logits)``,
    where ``next_logits(step, chosen, active, previous)`` runs decode step ``step`` for all rows."""
    B = len(rows)
    g_source, g_file = _g_source(model, g_cache)
    groups: dict[int, list[int]] = {}
    for b, ids in enumerate(rows):
        groups.setdefault(len(ids), []).append(b)
    # Every engine gets the same length, so the compiled step differs between groups only by batch
    # size. Each distinct shape is one more compile of the same (fullgraph) step, and dynamo refuses
    # past its recompile limit: beyond that many batch sizes the engines run uncompiled.
    max_len = max(groups) + max_new_tokens
    shapes = {len(members) for members in groups.values()}
    use_compile = device.type == "cuda" and len(shapes) <= MAX_ENGINE_SHAPES
    engines = []
    for S, members in groups.items():
        engine = DecodeEngine(model, batch=len(members), max_len=max_len, g_source=g_source,
                              g_cache=g_file, compile=use_compile)
        if use_compile and max_new_tokens > 1:
            t0 = time.perf_counter()
            engine.warm_up()
            sync(device)
            stats.compile_s += time.perf_counter() - t0
        engines.append((S, torch.tensor(members, device=device), members, engine))

    # Prefill: each group at once (equal lengths, so unpadded), into its engine's static caches.
    logits = None
    for S, idx, members, engine in engines:
        t0 = time.perf_counter()
        out = engine.prefill(torch.stack([rows[b] for b in members]))
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        for b in members:
            stats.rows[b].prefill_ms = ms
        if logits is None:
            logits = out.new_empty(B, out.shape[-1])
        logits.index_copy_(0, idx, out)

    def next_logits(step, chosen, active, previous):
        with torch.inference_mode(False), torch.no_grad():
            feed = feed_ids(chosen, active, eos_id)
            if len(engines) == 1:  # one prompt length: the rows are already in engine order
                S, _, _, engine = engines[0]
                return engine.step(feed, S + step - 1)
            new = torch.empty_like(previous)
            for S, idx, _, engine in engines:
                new.index_copy_(0, idx, engine.step(feed.index_select(0, idx), S + step - 1))
            return new

    return logits, next_logits
