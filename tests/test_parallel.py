"""Two CPU processes (gloo, DDP) train like one process on the same global batch, and their checkpoints
resume in one process."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.test_train import _args, tok_dir  # noqa: F401  (fixture)

# Four steps, validations at 2 and 4; no criticality probe (its generation dominates a tiny run). At
# lr 3e-3 a learned-G tiny model amplifies fp32 rounding about a hundredfold per step from the third
# on (one process on one thread against two, too); 1e-3 keeps its loss curve comparable.
KW = dict(steps=4, batch_size=4, lr=1e-3, eval_every=2, save_every=2, criticality_every=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _exit_when_done(rank: int, fn, *args) -> None:
    """Run one rank's work, then leave at once: what the test checks is on disk by then, and nothing
    left in the process (gloo's threads among it) can keep it from exiting."""
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _ranks(fn, *args, world: int = 2) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` forked processes; raises if any rank fails."""
    mp.start_processes(_exit_when_done, args=(fn, world, _free_port(), *args), nprocs=world, join=True,
                       start_method="fork")


def _worker(rank: int, world: int, port: int, args) -> None:
    from pldr_core.training import pretrain

    _env(rank, world, port)
    pretrain(args)


def _two_processes(args) -> None:
    _ranks(_worker, args)


def _steps(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


def _assert_same_run(ref_run, run, g_mode: str) -> None:
    """The loss curves of two runs agree step by step; with identity G, their final weights agree
    within fp32 rounding too (learned G's metric path amplifies rounding in its weights to about 1e-4
    after four steps, as one process on one thread against two does)."""
    ref, got = _steps(ref_run), _steps(run)
    assert [x["step"] for x in got] == [x["step"] for x in ref] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-4 * 10
    if g_mode == "identity":
        a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (ref_run, run))
        assert a.keys() == b.keys()
        for name in a:
            scale = max(1.0, a[name].abs().max().item())
            assert (a[name] - b[name]).abs().max().item() < 1e-5 * scale, name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tok_dir):  # noqa: F811
    """The one-process runs the two-process ones are held to: {(g_mode, grad_accum): run folder}."""
    from pldr_core.training import pretrain

    runs = {}
    for g_mode in ("learned", "identity"):
        for accum in (1, 2):
            runs[g_mode, accum] = tmp_path_factory.mktemp(f"one-{g_mode}-{accum}") / "run"
            pretrain(_args(tok_dir, runs[g_mode, accum], g_mode=g_mode, grad_accum=accum, **KW))
    return runs


@pytest.mark.parametrize("g_mode", ["learned", "identity"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_process_gloo_matches_one_process(tmp_path, tok_dir, one_process, g_mode, accum):  # noqa: F811
    import torch

    _two_processes(_args(tok_dir, tmp_path / "two", g_mode=g_mode, grad_accum=accum, **KW))
    ref = one_process[g_mode, accum]
    _assert_same_run(ref, tmp_path / "two", g_mode)
    # The first step sees identical weights: the all-reduced gradient has the single-process norm.
    # (Later norms are dominated by the metric path's steep directions and amplify rounding.)
    first, first_ref = _steps(tmp_path / "two")[0], _steps(ref)[0]
    assert abs(first_ref["grad_norm"] - first["grad_norm"]) < 1e-4 * first_ref["grad_norm"]
    meta = json.loads((tmp_path / "two" / "final" / "meta.json").read_text())
    assert meta["parallel"] == {"plan": "ddp", "world_size": 2, "compile": "off"}
    assert json.loads((ref / "final" / "meta.json").read_text())["parallel"]["plan"] == "none"
    rows = _scaling_example().scaling([tmp_path / "two", ref], skip=1)
    assert [r["world_size"] for r in rows] == [1, 2] and rows[0]["efficiency"] == 1.0
    assert rows[1]["steps"] == 3 and rows[1]["efficiency"] > 0
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("g_mode", ["learned", "identity"])
def test_two_process_checkpoint_resumes_in_one(tmp_path, tok_dir, one_process, g_mode):  # noqa: F811
    from pldr_core.training import pretrain
    from tests.conftest import cli

    run = tmp_path / "run"
    _two_processes(_args(tok_dir, run, g_mode=g_mode, stop_after=2, **KW))
    assert not (run / "final").exists() and (run / "step-00000002").is_dir()
    assert json.loads((run / "step-00000002" / "trainer_state.json").read_text())["world_size"] == 2
    result = pretrain(_args(tok_dir, run, g_mode=g_mode, resume=True, **KW))
    assert result.steps_done == 4 and not result.interrupted
    # Same global batch, same data position: steps 3 and 4 continue the uninterrupted run.
    _assert_same_run(one_process[g_mode, 1], run, g_mode)
    assert json.loads((run / "final" / "meta.json").read_text())["parallel"]["world_size"] == 1
    r = cli("info", run / "final")
    assert r.exit_code == 0, r.output


def _cli_worker(rank: int, world: int, port: int, argv: list, report) -> None:
    from typer.testing import CliRunner

    from pldr_cli.app import app

    _env(rank, world, port)
    r = CliRunner().invoke(app, [str(a) for a in argv])
    (report / f"rank{rank}.json").write_text(json.dumps({"code": r.exit_code, "output": r.output}))


def test_fsdp_on_cpu_fails_in_one_line(tmp_path, tok_dir):  # noqa: F811
    argv = ["pretrain", "--data", tok_dir, "--out", tmp_path / "run", "--device", "cpu", "--steps", 1,
            "--batch-size", 2, "--parallel", "fsdp"]
    _ranks(_cli_worker, argv, tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["code"] == 2, got
        lines = got["output"].strip().splitlines()
        assert len(lines) == 1 and "--parallel fsdp" in lines[0] and "ddp" in lines[0], got
    assert not (tmp_path / "run").exists()


def _grad_sync_worker(rank: int, world: int, port: int, report) -> None:
    import torch
    import torch.distributed as dist

    from pldr_core import parallel

    _env(rank, world, port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = parallel.wrap(torch.nn.Linear(3, 1, bias=False), parallel.Dist(rank=rank, world=world), "ddp")
    x = torch.full((1, 3), float(rank + 1))
    with parallel.grad_sync(model, False):
        model(x).sum().backward()
    local = model.module.weight.grad.clone()
    with parallel.grad_sync(model, True):
        model(x).sum().backward()
    (report / f"rank{rank}.json").write_text(json.dumps({"local": local.tolist(),
                                                         "synced": model.module.weight.grad.tolist()}))
    parallel.teardown(parallel.Dist(rank=rank, world=world, initialized_here=True), finished=True)


def test_grad_accumulation_all_reduces_once(tmp_path):
    """Under grad_sync(False) each rank keeps its own gradient; the last micro-batch averages the sum."""
    _ranks(_grad_sync_worker, tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["local"] == [[1.0, 1.0, 1.0]] and got[1]["local"] == [[2.0, 2.0, 2.0]]
    # Rank r accumulated 2 x (r + 1); the all-reduce averages (2 + 4) / 2.
    assert got[0]["synced"] == got[1]["synced"] == [[3.0, 3.0, 3.0]]


def _teardown_rounds_worker(rank: int, world: int, rounds: int, report) -> None:
    import torch
    import torch.distributed as dist

    from pldr_core import parallel

    torch.set_num_threads(1)
    for i in range(rounds):  # a file store per round: no ports to find
        dist.init_process_group("gloo", init_method=f"file://{report}/store{i}", rank=rank, world_size=world)
        model = parallel.wrap(torch.nn.Linear(3, 1, bias=False), parallel.Dist(rank=rank, world=world), "ddp")
        model(torch.ones(1, 3)).sum().backward()
        parallel.teardown(parallel.Dist(rank=rank, world=world, initialized_here=True), finished=True)
        # DDP's reducer holds the group's last reference: freeing it destroys the group here.
        del model
    (report / f"rank{rank}.done").touch()


def test_finished_ranks_tear_down_without_waiting_on_each_other(tmp_path):
    """Ten process groups in a row, each ended by teardown and then freed by the model that held it,
    return normally (no os._exit) within a minute. Without teardown's pause this deadlocked in 6 runs of
    6 here (in 2 of 3 with the barrier alone)."""
    ctx = mp.start_processes(_teardown_rounds_worker, args=(2, 10, tmp_path), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "a rank is still tearing down after 60 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert sorted(p.name for p in tmp_path.glob("*.done")) == ["rank0.done", "rank1.done"]


def test_plan_from_world_and_device():
    import torch

    from pldr_core.errors import PLDRError
    from pldr_core.parallel import Dist, plan_for

    assert plan_for("fsdp", Dist()) == "none"
    assert plan_for("auto", Dist(world=2)) == plan_for("ddp", Dist(world=2)) == "ddp"
    assert plan_for("fsdp", Dist(world=2, device=torch.device("cuda", 0))) == "fsdp"
    with pytest.raises(PLDRError, match="--parallel fsdp"):
        plan_for("fsdp", Dist(world=2))
    with pytest.raises(PLDRError, match="banana"):
        plan_for("banana", Dist(world=2))


def _scaling_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(root: Path, world: int, rates: list[float]) -> Path:
    (root / "final").mkdir(parents=True)
    (root / "final" / "meta.json").write_text(json.dumps(
        {"parallel": {"plan": "ddp" if world > 1 else "none", "world_size": world, "compile": "layers"}}))
    lines = [{"step": 0, "val_loss": 9.0}] + [{"step": i + 1, "loss": 1.0, "tokens_per_s": r}
                                              for i, r in enumerate(rates)]
    lines.insert(3, {"step": 2, "kind": "spike", "score": 9.0})
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_scaling_efficiency_from_metrics(tmp_path, capsys):
    scaling = _scaling_example()
    # The first two steps (compilation) are slow and left out; the median takes the rest.
    one = _fake_run(tmp_path / "g1", 1, [5.0, 50.0, 100.0, 101.0, 99.0])
    two = _fake_run(tmp_path / "g2", 2, [7.0, 90.0, 190.0, 180.0, 200.0])
    four = _fake_run(tmp_path / "g4", 4, [9.0, 100.0, 360.0, 370.0, 350.0])
    rows = scaling.scaling([four, one, two], skip=2)
    assert [r["world_size"] for r in rows] == [1, 2, 4]
    assert [r["tokens_per_s"] for r in rows] == [100.0, 190.0, 360.0]
    assert [round(r["efficiency"], 6) for r in rows] == [1.0, 0.95, 0.9]
    scaling.main(["--skip", "2", str(one), str(four)])
    out = capsys.readouterr().out
    assert "90.0%" in out and "100.0%" in out
    with pytest.raises(SystemExit, match="no step after"):
        scaling.throughput(one, skip=5)
