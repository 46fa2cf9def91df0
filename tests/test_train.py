"""pldr pretrain: learning, metrics, exact resume, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pldr_cli.app import app


def _run(*args, env=None):
    return CliRunner().invoke(app, list(map(str, args)), env=env)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, spm_model):
    """A small token data folder: patterned text the tiny model can learn in a few steps."""
    from pldr_core.data import tokenize_corpus

    rng = random.Random(0)
    words = "the metric tensor of power law graph attention learns a curvature from every prompt".split()
    docs = [" ".join(words[(i + k) % len(words)] for k in range(rng.randint(20, 60))) for i in range(300)]
    src = tmp_path_factory.mktemp("src") / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path_factory.mktemp("data") / "tok"
    tokenize_corpus([str(src)], out, tokenizer=spm_model, seq_len=64, val_fraction=0.05)
    return out


def _args(tok_dir, out, **kw):
    from pldr_core.training import TrainArgs

    base = dict(data=str(tok_dir), out=str(out), preset="tiny", steps=8, batch_size=4, seq_len=32,
                lr=3e-3, warmup=2, eval_every=4, eval_batches=2, save_every=4, device="cpu", seed=1)
    base.update(kw)
    return TrainArgs(**base)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    from pldr_core.training.schedule import lr_at

    lrs = [lr_at(s, lr=1.0, warmup=4, steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_optimizer_is_fused_on_one_gpu_and_foreach_across_ranks():
    from pldr_core.parallel import Dist
    from pldr_core.training.optim import optimizer_impl

    assert optimizer_impl(Dist(device=torch.device("cuda", 0))) == {"fused": True}
    assert optimizer_impl(Dist(world=2, device=torch.device("cuda", 0))) == {"foreach": True}
    assert optimizer_impl(Dist()) == {}


def test_resume_uses_this_runs_optimizer_implementation():
    # A foreach checkpoint (as saved before AdamW was fused) resumed on one GPU runs fused, and a
    # fused one resumed on CPU runs torch's default there.
    from pldr_core.parallel import Dist
    from pldr_core.training.optim import with_optimizer_impl

    saved = {"state": {}, "param_groups": [{"lr": 1e-3, "foreach": True, "fused": None, "params": [0]}]}
    groups = with_optimizer_impl(saved, Dist(device=torch.device("cuda", 0)))["param_groups"]
    assert groups == [{"lr": 1e-3, "foreach": None, "fused": True, "params": [0]}]
    saved["param_groups"][0].update(foreach=None, fused=True)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    opt.load_state_dict(with_optimizer_impl(saved, Dist()))
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None


def test_pretrain_learns_and_writes_run(tmp_path, tok_dir):
    run = tmp_path / "run"
    r = _run("pretrain", "--data", tok_dir, "--out", run, "--steps", 30, "--batch-size", 8, "--seq-len", 32,
             "--lr", "1e-2", "--warmup", 3, "--eval-every", 10, "--eval-batches", 2, "--save-every", 30, "--device", "cpu")
    assert r.exit_code == 0, r.output
    m = _metrics(run)
    train = [x for x in m if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 31))
    for key in ("loss", "acc", "lr", "grad_norm", "tokens_per_s"):
        assert all(np.isfinite(x[key]) for x in train), key
    # The three DAG terms are logged for a learned-G model even with zero coefficients: every
    # DAG_LOG_EVERY steps and at validations (every step only when they are in the loss).
    from pldr_core.training import DAG_LOG_EVERY

    with_dag = [x["step"] for x in train if {"dag_A_LM", "dag_A_P", "dag_G_LM"} <= set(x)]
    assert with_dag == [s for s in range(1, 31) if s % DAG_LOG_EVERY == 0 or s % 10 == 0]
    vals = [x["val_loss"] for x in m if "val_loss" in x]
    assert m[0]["step"] == 0 and len(vals) == 4
    assert vals[-1] < vals[0] - 0.5
    assert np.mean([x["loss"] for x in train[-5:]]) < np.mean([x["loss"] for x in train[:5]]) - 0.5
    from pldr_core.checkpoint import load_model, read_meta
    from pldr_core.data import TokenData

    final = run / "final"
    model = load_model(final)
    assert model.config.vocab_size == TokenData(tok_dir).vocab_size
    assert (final / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    meta = read_meta(final)
    assert meta["steps"] == 30 and meta["tokens_seen"] == 30 * 8 * 32 and meta["final_val_loss"] == vals[-1]


def test_resume_is_bitwise(tmp_path, tok_dir):
    from safetensors.torch import load_file

    from pldr_core.training import pretrain

    full = pretrain(_args(tok_dir, tmp_path / "full", dag=(0.01, 0.01, 0.01)))
    part = pretrain(_args(tok_dir, tmp_path / "part", dag=(0.01, 0.01, 0.01), stop_after=4))
    assert part.interrupted and part.final_dir is None and part.checkpoint.name == "step-00000004"
    resumed = pretrain(_args(tok_dir, tmp_path / "part", dag=(0.01, 0.01, 0.01), resume=True))
    assert resumed.steps_done == 8 and not resumed.interrupted
    assert resumed.last["loss"] == full.last["loss"]
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # metrics.jsonl of the resumed run equals the uninterrupted one (timings aside)
    strip = lambda m: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in m]  # noqa: E731
    assert strip(_metrics(tmp_path / "part")) == strip(_metrics(tmp_path / "full"))


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, tok_dir):
    from pldr_core.training import pretrain

    cases = {
        "seq": ["--seq-len", 4096],
        "data": [],
        "resume_none": ["--resume"],
        "batch": ["--batch-size", 3, "--grad-accum", 2],
        "gfixed": ["--g-mode", "fixed"],
        "dag": ["--dag", "1,2"],
        "precision": ["--metric-precision", "fp16"],
        "compile_mode": ["--compile-mode", "max"],
    }
    for name, extra in cases.items():
        out = tmp_path / name
        data = tmp_path / "nodata" if name == "data" else tok_dir
        r = _run("pretrain", "--data", data, "--out", out, "--steps", 2, "--device", "cpu", *extra)
        assert r.exit_code == 2, (name, r.output)
        assert r.output.strip().splitlines()[-1].startswith("error: "), (name, r.output)
        assert not out.exists(), name
    # an empty data folder
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in ("tokenizer.model",):
        (empty / f).write_bytes((tok_dir / f).read_bytes())
    meta = json.loads((tok_dir / "meta.json").read_text())
    meta["rows"] = {"train": 0, "val": 0}
    (empty / "meta.json").write_text(json.dumps(meta))
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    r = _run("pretrain", "--data", empty, "--out", tmp_path / "e_run", "--device", "cpu")
    assert r.exit_code == 2 and "empty" in r.output and not (tmp_path / "e_run").exists()
    # --resume from a run of another config
    pretrain(_args(tok_dir, tmp_path / "other", steps=2, save_every=1))
    before = sorted(p.name for p in (tmp_path / "other").iterdir())
    r = _run("pretrain", "--data", tok_dir, "--out", tmp_path / "other", "--steps", 4, "--batch-size", 4,
             "--seq-len", 32, "--g-mode", "identity", "--resume", "--device", "cpu")
    assert r.exit_code == 2 and "another run" in r.output
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == before
    # an existing run without --resume
    r = _run("pretrain", "--data", tok_dir, "--out", tmp_path / "other", "--device", "cpu")
    assert r.exit_code == 2 and "--resume" in r.output


@pytest.mark.parametrize("option,value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1e-3"), ("--lr", "0"),
    ("--steps", "0"), ("--batch-size", "-4"), ("--grad-accum", "0"), ("--seq-len", "0"),
    ("--warmup", "-1"), ("--eval-every", "0"), ("--save-every", "0"), ("--eval-batches", "0"),
    ("--keep", "0"), ("--seed", "-1"), ("--dag", "nan,0,0"), ("--dag", "0,inf,0"), ("--dag", "0,0,-1"),
])
def test_bad_numbers_exit_2_naming_the_option_before_anything_exists(tmp_path, tok_dir, option, value):
    out = tmp_path / "run"
    steps = [] if option == "--steps" else ["--steps", 2]
    r = _run("pretrain", "--data", tok_dir, "--out", out, "--batch-size", 4, "--seq-len", 32,
             "--device", "cpu", *steps, option, value)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], r.output
    assert "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("field,value", [
    ("min_lr_ratio", 1.5), ("min_lr_ratio", float("nan")), ("weight_decay", float("inf")),
    ("weight_decay", -0.1), ("log_every", 0), ("stop_after", 0), ("lr", float("-inf")), ("steps", 2.5),
])
def test_train_args_are_checked_before_anything_exists(tmp_path, tok_dir, field, value):
    from pldr_core.errors import PLDRError
    from pldr_core.training import pretrain

    out = tmp_path / "run"
    with pytest.raises(PLDRError, match="--" + field.replace("_", "-")):
        pretrain(_args(tok_dir, out, **{field: value}))
    assert not out.exists()


def test_paths_are_printed_whole_in_a_narrow_terminal(tmp_path, tok_dir):
    run = tmp_path / "a-run-folder-with-a-name-longer-than-the-terminal"
    r = _run("pretrain", "--data", tok_dir, "--out", run, "--steps", 2, "--batch-size", 4, "--seq-len", 32,
             "--eval-every", 2, "--save-every", 2, "--device", "cpu", env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(str(run / "final") in line for line in lines if line.startswith("done: ")), r.output
    assert any(str(run / "step-00000002") in line for line in lines), r.output


def test_nan_loss_is_reported_with_the_step(tmp_path, tok_dir):
    r = _run("pretrain", "--data", tok_dir, "--out", tmp_path / "nan", "--steps", 3, "--batch-size", 4,
             "--seq-len", 32, "--lr", "1e30", "--warmup", 0, "--eval-every", 100, "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "at step" in r.output and ("nan" in r.output.lower() or "inf" in r.output.lower())


def test_resume_can_extend_a_finished_run(tmp_path, tok_dir):
    from pldr_core.training import pretrain

    args = dict(warmup=None, eval_every=4)
    first = pretrain(_args(tok_dir, tmp_path / "run", steps=8, **args))
    assert first.steps_done == 8
    # The default warm-up follows --steps (8 // 10 = 0 here, 16 // 10 = 1): a longer --resume keeps
    # the warm-up the run started with instead of calling itself another run.
    more = pretrain(_args(tok_dir, tmp_path / "run", steps=16, resume=True, **args))
    assert more.steps_done == 16 and not more.interrupted
    state = json.loads(sorted((tmp_path / "run").glob("step-*/trainer_state.json"))[-1].read_text())
    assert state["run"]["warmup"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_matches_per_layer_compile(tmp_path, tok_dir):
    """--compile-mode graphs (whole model as CUDA graphs) trains like per-layer compile, also with
    gradient accumulation (non-final micro-batch gradients must leave the graph pool) and DAG terms."""
    from pldr_core.training import pretrain

    curves = {}
    for mode in ("graphs", "layers"):
        logs = []
        pretrain(_args(tok_dir, tmp_path / mode, device="cuda", compile=True, compile_mode=mode,
                       grad_accum=2, dag=(0.005, 0.005, 0.005), metric_precision="fp32"),
                 on_log=logs.append)
        curves[mode] = [r["loss"] for r in logs if "loss" in r]
    assert len(curves["graphs"]) == 8
    assert curves["graphs"] == pytest.approx(curves["layers"], abs=2e-2)


def test_checkpoint_manager_keeps_the_newest_and_loads_them(tmp_path, tok_dir):
    from pldr_core.checkpoint import fingerprint, load_config, load_model
    from pldr_core.model import PLDRModel
    from pldr_core.parallel import Dist
    from pldr_core.training import pretrain
    from pldr_core.training.checkpointing import CheckpointManager, TrainState

    run = tmp_path / "run"
    result = pretrain(_args(tok_dir, run, steps=4, save_every=1, keep=2))
    manager = CheckpointManager(run, Dist(), keep=2, tokenizer=None)
    assert [p.name for p in manager.checkpoints()] == ["step-00000003", "step-00000004"]
    assert manager.latest() == run / "step-00000004" == result.checkpoint
    model = PLDRModel(load_config(run / "final"))
    state = manager.load(manager.latest(), model)
    assert state == TrainState(step=4, samples_seen=4 * 4, tokens_seen=4 * 4 * 32,
                               first_val_loss=result.first_val_loss)
    assert fingerprint(model) == fingerprint(load_model(run / "final"))
