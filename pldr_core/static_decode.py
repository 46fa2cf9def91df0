"""Generation's static-cache path: one ``DecodeEngine`` for every prompt, each row at its own position.

``pldr_core.generate`` owns the decode loop (sampling, EOS, timing); this module supplies what the
loop needs from the engine: the prefill's logits and a function that runs one decode step for the
whole batch. Prompts of one length are prefilled in one forward; prompts of mixed lengths row by row
where G_LM comes from each prompt (A sums over every position, so padding would change it), else in
right-padded forwards (``DecodeEngine.prefill_rows``). On CUDA every decode step is one replay of the
step captured as a CUDA graph (of the eager step, or of the ``torch.compile``d one).
"""

from __future__ import annotations

import time

import torch

from pldr_core.cache import GCache
from pldr_core.engine import DecodeEngine


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
                   eos_id: int | None, stats, device: torch.device, torch_compile: bool = False):
    """Build the engine (on CUDA its step captured as a CUDA graph, compiled first with
    ``torch_compile``; the time goes to ``stats.compile_s``), prefill every row
    (``stats.rows[b].prefill_ms``: the whole prefill's time) and return ``(logits [B, V], next_logits)``,
    where ``next_logits(step, chosen, active, previous)`` runs decode step ``step`` for all rows."""
    lengths = [len(ids) for ids in rows]
    g_source, g_file = _g_source(model, g_cache)
    cuda = device.type == "cuda"
    engine = DecodeEngine(model, batch=len(rows), max_len=max(lengths) + max_new_tokens, g_source=g_source,
                          g_cache=g_file, compile=torch_compile and cuda, graph=cuda)
    if cuda and max_new_tokens > 1:
        t0 = time.perf_counter()
        engine.warm_up()
        sync(device)
        stats.compile_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    if len(set(lengths)) == 1:
        logits = engine.prefill(torch.stack(rows))
    else:
        logits = engine.prefill_rows(list(range(len(rows))), rows)
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    for row in stats.rows:
        row.prefill_ms = ms
    positions = torch.tensor(lengths, device=device)

    def next_logits(step, chosen, active, previous):
        with torch.inference_mode(False), torch.no_grad():
            return engine.step_rows(feed_ids(chosen, active, eos_id), positions + (step - 1))

    return logits, next_logits
