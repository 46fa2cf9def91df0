"""Choosing the next token: greedy, or temperature / top-k / top-p sampling, and the ``Step`` and
``Token`` records.

Generation, the decode engine and the server all import this module; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pldr_core.errors import PLDRError


@dataclass
class Step:
    """One decoded position."""

    token: torch.Tensor
    """[B] the chosen ids."""
    logits: torch.Tensor
    """[B, V] the logits they were chosen from."""


@dataclass
class Token:
    """One generated token of one prompt (row)."""

    row: int
    """Which prompt it belongs to (index into the ``prompts`` list)."""
    id: int
    """The chosen id."""
    index: int
    """0 for the first new token of that row, 1 for the next, ..."""
    logits: torch.Tensor
    """[V] the logits it was chosen from."""
    done: bool
    """True when the row stops after this token (EOS or ``max_new_tokens``)."""
    finish_reason: str | None = None
    """'eos' or 'length' when ``done``."""


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Sampler:
    """Maps logits [B, V] to ids [B]: greedy, or temperature / top-k / top-p sampling.

    A ``seed`` makes sampling reproducible (its own ``torch.Generator``, so the global RNG is not
    touched); the draw for a batch is one ``multinomial`` call over all rows.
    """

    def __init__(self, *, temperature: float = 0.8, top_k: int | None = 50, top_p: float = 1.0,
                 greedy: bool = False, seed: int | None = None):
        if not 0 <= temperature < float("inf"):
            raise PLDRError(f"--temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise PLDRError(f"--top-k must be >= 1, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise PLDRError(f"--top-p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = greedy or temperature == 0
        self.seed = seed
        self._gen: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            if self.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(self.seed)
        return self._gen

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            # Keep the smallest set of tokens whose probability reaches top_p (always the best one).
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_logits.softmax(-1)) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self._generator(probs.device)).squeeze(-1)
