"""What a run watches besides its loss: the criticality probe (OP(G_LM), OP(A)) at set steps and the
loss-spike detector, whose state travels in the step checkpoints so that a resumed run flags the same
steps."""

from __future__ import annotations

import torch

from pldr_core import parallel
from pldr_core.checkpoint import unwrap
from pldr_core.criticality import SpikeDetector, SpikeRecord, criticality_probe
from pldr_core.data import RowSampler
from pldr_core.files import json_safe

# 8 validation rows cut to 64 tokens, 64 new tokens each: at the default cadence (ten validations a
# run) a few percent of a run's time or less (docs/performance.md has the measured costs).
PROBE_ROWS = 8
"""Validation rows the probe continues (always the first ones, so the steps compare)."""
PROBE_NEW_TOKENS = 64
PROBE_PROMPT_TOKENS = 64


class Monitor:
    """One rank's monitor. ``every`` is ``TrainArgs.criticality_every``: None probes at each
    validation, N every N steps, 0 never."""

    def __init__(self, every: int | None, d: parallel.Dist, val_rows: RowSampler,
                 detector: SpikeDetector | None = None):
        self.every, self.d, self.val_rows = every, d, val_rows
        self.detector = detector if detector is not None else SpikeDetector()

    # ---- criticality -----------------------------------------------------------------------------
    def probe_due(self, step: int, validated: bool) -> bool:
        if self.every == 0 or self.val_rows.num_samples == 0:
            return False
        return validated if self.every is None else step % self.every == 0

    def probe(self, model: torch.nn.Module) -> dict:
        """The ``crit_*`` fields of a metrics line (strict JSON: NaN as null); empty on ranks that
        do not log. Runs the plain module in eval mode, compiled layers as eager code."""
        # FSDP2 shards the plain module too: its forward gathers from every rank, so all of them run it.
        sharded = self.d.enabled and self.d.device.type == "cuda"
        if not (self.d.is_main or sharded):
            return {}
        plain = unwrap(model)
        rows = self.val_rows.batch(0, min(PROBE_ROWS, self.val_rows.num_samples))
        new_tokens = min(PROBE_NEW_TOKENS, plain.config.max_seq_len // 2)
        with torch.compiler.set_stance("force_eager"):
            result = criticality_probe(plain, rows, new_tokens, prompts=PROBE_ROWS,
                                       prompt_tokens=PROBE_PROMPT_TOKENS, seed=0)
        if not self.d.is_main:
            return {}
        r = json_safe(result.to_dict())
        return {"crit_op_G_LM": r["op_G_LM"], "crit_op_A": r["op_A"],
                "crit_per_layer": {"G_LM": r["op_G_LM_per_layer"], "A": r["op_A_per_layer"]},
                "crit_samples": r["criticality_samples"]}

    # ---- loss spikes -----------------------------------------------------------------------------
    def spike(self, step: int, loss: float) -> dict | None:
        """Feed a step's loss (the same on every rank); the spike's metrics record, or None."""
        record = self.detector.update(step, loss)
        return json_safe(record.to_dict()) if record is not None else None

    @property
    def spikes(self) -> int:
        return self.detector.count

    def summary(self) -> dict:
        return self.detector.summary()

    def state(self) -> dict:
        """The detector's window and flagged steps, for trainer_state.json."""
        return {"loss_history": list(self.detector.history),
                "spikes": [s.to_dict() for s in self.detector.spikes]}

    def load_state(self, state: dict | None) -> None:
        """Restore ``state()`` (checkpoints written without a monitor leave a fresh detector)."""
        if not state:
            return
        self.detector.history.clear()
        self.detector.history.extend(float(x) for x in state.get("loss_history", []))
        self.detector.spikes = [SpikeRecord(**s) for s in state.get("spikes", [])]
