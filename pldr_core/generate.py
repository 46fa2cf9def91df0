"""Autoregressive decoding as a Python generator that yields tokens (SPEC section 2 cache semantics).

Cache combinations (``kv`` and ``g`` switches are independent):
- neither: every step reruns the whole text, so A is recomputed from the whole current text;
- KV only: the prefill caches k, v and A; later steps recompute G_LM from the frozen A;
- G only: the prefill's (or a file's) G_LM is reused; every step reruns the whole text;
- KV + G: both; with a G-cache file the metric path never runs at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pldr_core.cache import GCache, KVCache


@dataclass
class Step:
    """One decoded position."""

    token: torch.Tensor
    """[B] the chosen ids."""
    logits: torch.Tensor
    """[B, V] the logits they were chosen from."""


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


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
    use_g = g_cache is not False and model.config.has_metric_path
    if isinstance(g_cache, GCache):
        gc = g_cache
    elif use_g:
        gc = GCache.for_model(model, B)
    else:
        gc = None
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
