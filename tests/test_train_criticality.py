"""pldr pretrain's monitors: the criticality probe in metrics.jsonl, loss-spike records (and their
resume), --deterministic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file
from test_train import _args, _metrics, _run, tok_dir  # noqa: F401

CRIT = ("crit_op_G_LM", "crit_op_A", "crit_per_layer")


def _trainer(args, **kw):
    from pldr_core.parallel import Dist
    from pldr_core.training import Trainer

    args.validate()
    trainer = Trainer(args.with_default_lr(), Dist(), **kw)
    trainer.setup()
    return trainer


def _planted(at: set[int]):
    """A SpikeDetector that also flags the steps in ``at``."""
    from pldr_core.criticality import SpikeDetector, SpikeRecord

    class Planted(SpikeDetector):
        def update(self, step, loss):
            if step not in at:
                return super().update(step, loss)
            record = SpikeRecord(step, float(loss), float(loss) / 2, 0.1, 5 * float(loss))
            self.spikes.append(record)
            self.history.append(float(loss))
            return record

    return Planted()


def test_criticality_fields_at_validations_and_in_the_progress_line(tmp_path, tok_dir):  # noqa: F811
    run = tmp_path / "run"
    r = _run("pretrain", "--data", tok_dir, "--out", run, "--steps", 8, "--batch-size", 4, "--seq-len", 32,
             "--eval-every", 4, "--eval-batches", 1, "--save-every", 8, "--device", "cpu")
    assert r.exit_code == 0, r.output
    m = _metrics(run)
    probed = [x["step"] for x in m if set(CRIT) <= set(x)]
    assert probed == [x["step"] for x in m if "val_loss" in x] == [0, 4, 8]
    for x in m:
        if "crit_op_G_LM" in x:
            assert np.isfinite(x["crit_op_G_LM"]) and np.isfinite(x["crit_op_A"]) and x["crit_samples"] >= 1
            assert len(x["crit_per_layer"]["G_LM"]) == len(x["crit_per_layer"]["A"]) == 2  # tiny: 2 layers
    assert sum("OP(G_LM)" in line for line in r.output.splitlines()) == 3, r.output


def test_criticality_every_n_zero_and_identity_g(tmp_path, tok_dir):  # noqa: F811
    from pldr_core.training import pretrain

    pretrain(_args(tok_dir, tmp_path / "off", criticality_every=0))
    assert not any(k in x for x in _metrics(tmp_path / "off") for k in CRIT)
    pretrain(_args(tok_dir, tmp_path / "every3", criticality_every=3, log_every=2))
    assert [x["step"] for x in _metrics(tmp_path / "every3") if "crit_op_A" in x] == [0, 3, 6]
    # Identity G: G_LM does not depend on the input, OP(G_LM) is 0 by definition.
    pretrain(_args(tok_dir, tmp_path / "identity", g_mode="identity", steps=4))
    crit = [x for x in _metrics(tmp_path / "identity") if "crit_op_G_LM" in x]
    assert crit and all(x["crit_op_G_LM"] == 0.0 for x in crit)


@pytest.mark.parametrize("value", ["-1", "-5"])
def test_negative_criticality_every_exits_2(tmp_path, tok_dir, value):  # noqa: F811
    out = tmp_path / "run"
    r = _run("pretrain", "--data", tok_dir, "--out", out, "--steps", 2, "--device", "cpu",
             "--criticality-every", value)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--criticality-every" in lines[0]
    assert not out.exists()


def test_spike_detector_flags_a_synthetic_spike_through_the_trainer(tmp_path, tok_dir):  # noqa: F811
    events = []
    trainer = _trainer(_args(tok_dir, tmp_path / "run"), on_event=events.append)
    losses = [3.0 - 0.01 * i + 0.002 * (-1) ** i for i in range(40)]
    losses[30] = 9.0
    found = [rec for step, loss in enumerate(losses, 1) if (rec := trainer.record_loss(step, loss))]
    assert [(r["kind"], r["step"], r["loss"]) for r in found] == [("spike", 31, 9.0)]
    assert trainer.monitor.spikes == 1 and len(events) == 1 and "step 31" in events[0]


def test_spike_records_are_written_counted_and_resume_bitwise(tmp_path, tok_dir):  # noqa: F811
    from pldr_core.checkpoint import read_meta

    kw = dict(steps=8, save_every=4, keep=3, criticality_every=2)
    full = _trainer(_args(tok_dir, tmp_path / "full", **kw), spikes=_planted({3, 6})).fit()
    assert full.spikes == 2
    m = _metrics(tmp_path / "full")
    assert [(x["step"], x["kind"]) for x in m if "kind" in x] == [(3, "spike"), (6, "spike")]
    meta = read_meta(tmp_path / "full" / "final")
    assert meta["spikes"] == 2 and meta["spike_steps"] == [3, 6]
    # The same run resumed from step 4 after its later records were written: the spike and probe records
    # after step 4 are trimmed and written again, the spike before it is still counted.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "step-00000008")
    resumed = _trainer(_args(tok_dir, part, resume=True, **kw), spikes=_planted({6})).fit()
    assert resumed.spikes == 2 and read_meta(part / "final")["spike_steps"] == [3, 6]
    strip = lambda m: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in m]  # noqa: E731
    assert strip(_metrics(part)) == strip(m)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "full", part))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_deterministic_runs_give_bitwise_equal_weights(tmp_path, tok_dir):  # noqa: F811
    import torch

    from pldr_core.training import pretrain

    before = torch.are_deterministic_algorithms_enabled()
    for name in ("a", "b"):
        pretrain(_args(tok_dir, tmp_path / name, deterministic=True, dag=(0.01, 0.01, 0.01), steps=4))
    assert torch.are_deterministic_algorithms_enabled() == before
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "a" / "step-00000004" / "trainer_state.json").read_text())
    assert state["args"]["deterministic"] is True
