"""The learning-rate schedule: linear warm-up, then cosine decay to a fraction of the peak."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup: int, steps: int, min_ratio: float = 0.1) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up, cosine to min_ratio*lr at the
    last update."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
