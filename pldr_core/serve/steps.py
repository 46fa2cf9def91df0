"""The decode steps the scheduler drives: the eager model's cached forward, or the static-cache engine.

Both hold one preallocated KV-cache of ``batch`` rows. A prefill runs prompts into chosen rows (each
unpadded and alone where G_LM comes from the prompt: A sums over every position, so padding would
change it); a step feeds one token to every row at that row's own position.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pldr_core.cache import GCache, KVCache
from pldr_core.device import ids_on
from pldr_core.engine import DecodeEngine


class DecodeStep(Protocol):
    """What the scheduler drives: the rows' caches, a prefill of some rows and an all-rows decode step."""

    name: str
    """Which step runs ('eager', 'static' or 'static, compiled')."""
    g_source: str
    """Where G_LM comes from: 'file', 'prefill' or 'model' (identity / frozen G)."""
    batch: int
    max_len: int
    device: torch.device
    chunk: int
    """Greedy steps one ``launch`` runs (0: this step has no chunks; every step goes through ``step``)."""

    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Reset rows ``rows`` and run prompt ``prompts[i]`` [S_i] into row ``rows[i]``; the logits
        [len(rows), V] of each prompt's last position."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [B] at ``positions`` [B] (one per row); logits [B, V]."""

    # With ``chunk`` > 0, greedy rows can also run ``chunk`` steps at a time, their tokens chosen and
    # fed back on the device:
    def start_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> "Readback":
        """Prefill as ``prefill_rows``, queued behind the device's work (no waiting for it); each
        row's greedy first token [len(rows)], which is also its next input."""

    def set_inputs(self, tokens: list[int], positions: list[int]) -> None:
        """Every row's next input: ``tokens[b]`` at ``positions[b]``."""

    def launch(self) -> "Readback":
        """Queue ``chunk`` greedy steps of every row from its next input; its tokens [B, chunk + 1]
        (column 0 each row's input, then the tokens chosen)."""


class Readback:
    """A device tensor's values, copied to the host behind the work queued before it; ``values``
    waits for them (and only them)."""

    def __init__(self, values: torch.Tensor):
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = values.clone(), None

    def values(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def _g_source(model, g_cache: GCache | None) -> str:
    if not model.config.has_metric_path:
        return "model"
    return "file" if g_cache is not None else "prefill"


class EagerStep:
    """``DecodeStep`` on the eager model with a ``KVCache`` (and, for prefill G, a ``GCache``)."""

    name = "eager"
    chunk = 0

    def __init__(self, model, *, batch: int, max_len: int, g_cache: GCache | None = None):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = next(model.parameters()).device
        self.kv = KVCache.for_model(model, batch, max_len)
        self.g_source = _g_source(model, g_cache)
        self.gc = (GCache.for_model(model, batch) if self.g_source == "prefill"
                   else g_cache if self.g_source == "file" else None)
        # Every row starts out holding the EOS-only prompt: the batch's caches are then filled for
        # all rows, so a decode step reads the frozen A / G_LM of each row instead of rerunning the
        # metric path on one token.
        eos = torch.tensor([model.config.eos_id], device=self.device)
        self.prefill_rows(list(range(batch)), [eos] * batch)

    @torch.no_grad()
    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for row, ids in zip(rows, prompts):
            kv = self.kv.row(row)
            kv.reset()
            gc = None if self.gc is None else self.gc.row(row)
            if gc is not None:
                gc.reset()
            out.append(self.model(ids[None], kv_cache=kv, g_cache=gc).logits[0, -1])
        return torch.stack(out)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens[:, None], kv_cache=self.kv, g_cache=self.gc, positions=positions[:, None])
        return out.logits[:, -1]


class EngineStep:
    """``DecodeStep`` on the static-cache ``DecodeEngine``: every row in one step (replayed as one CUDA
    graph on a GPU, compiled first with ``compile``), each at its own position, and ``chunk`` greedy
    steps in one replay (``DecodeEngine.greedy_chunk``).

    Rows admitted together are prefilled by ``DecodeEngine.prefill_rows``: in right-padded forwards
    where G_LM is fixed, each alone where it comes from the prompt."""

    def __init__(self, model, *, batch: int, max_len: int, g_cache: GCache | None = None,
                 compile: bool = False, chunk: int = 8):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.g_source = _g_source(model, g_cache)
        source = {"model": "none", "file": "file", "prefill": "prefill"}[self.g_source]
        self.engine = DecodeEngine(model, batch=batch, max_len=max_len, g_source=source, g_cache=g_cache,
                                   compile=compile)
        self.device = self.engine.device
        self.name = "static, compiled" if compile else "static"
        self.chunk = chunk
        self._rows = torch.arange(batch, device=self.device)
        self.engine.warm_up(chunk=chunk or None)

    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        return self.engine.prefill_rows(rows, prompts)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.engine.step_rows(tokens, positions)

    def start_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> Readback:
        first = self.engine.prefill_rows(rows, prompts).argmax(-1)
        lengths = ids_on([len(p) for p in prompts], self.device)
        self.engine.set_rows(ids_on(rows, self.device), first, lengths)
        return Readback(first)

    def set_inputs(self, tokens: list[int], positions: list[int]) -> None:
        self.engine.set_rows(self._rows, ids_on(tokens, self.device), ids_on(positions, self.device))

    def launch(self) -> Readback:
        return Readback(self.engine.greedy_chunk(self.chunk))
