"""Loss spikes: a step whose loss exceeds the running median by a set number of median absolute
deviations (the isolated "dragon king" spikes that went with lower scores at the same settings)."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class SpikeRecord:
    """One flagged step, as logged in metrics.jsonl (``kind`` 'spike')."""

    step: int
    loss: float
    median: float
    mad: float
    score: float
    """(loss - median) / mad: how many median absolute deviations above the running median."""
    kind: str = "spike"

    def to_dict(self) -> dict:
        return asdict(self)


class SpikeDetector:
    """Flags losses above ``median + threshold * MAD`` of the last ``window`` losses.

    Nothing is flagged before ``min_history`` losses have been seen. Only rises count: a falling loss
    sits below its running median. A non-finite loss is always a spike. ``mad_floor`` (relative to the
    median) keeps a perfectly flat history from flagging rounding noise.
    """

    def __init__(self, *, window: int = 100, threshold: float = 8.0, min_history: int = 20,
                 mad_floor: float = 1e-3):
        if window < 3 or min_history < 3 or min_history > window:
            raise ValueError("SpikeDetector needs 3 <= min_history <= window")
        if threshold <= 0:
            raise ValueError("SpikeDetector threshold must be positive")
        self.window, self.threshold, self.min_history, self.mad_floor = window, threshold, min_history, mad_floor
        self.history: deque[float] = deque(maxlen=window)
        self.spikes: list[SpikeRecord] = []

    @property
    def count(self) -> int:
        return len(self.spikes)

    def update(self, step: int, loss: float) -> SpikeRecord | None:
        """Feed the loss of ``step``; returns a ``SpikeRecord`` when it is a spike, else None."""
        loss = float(loss)
        record = None
        if not math.isfinite(loss):
            med = statistics.median(self.history) if self.history else float("nan")
            record = SpikeRecord(step, loss, med, float("nan"), float("inf"))
        elif len(self.history) >= self.min_history:
            med = statistics.median(self.history)
            mad = statistics.median(abs(x - med) for x in self.history)
            mad = max(mad, self.mad_floor * abs(med), 1e-12)
            score = (loss - med) / mad
            if score > self.threshold:
                record = SpikeRecord(step, loss, med, mad, score)
        if record is not None:
            self.spikes.append(record)
        if math.isfinite(loss):
            self.history.append(loss)
        return record

    def summary(self) -> dict:
        """For a run's summary: how many spikes, and at which steps."""
        return {"spikes": self.count, "spike_steps": [s.step for s in self.spikes]}
