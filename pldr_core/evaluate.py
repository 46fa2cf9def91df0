"""`pldr eval`: lm-eval runs of a model directory, online or from local task data.

Importing this module registers the ``pldr`` lm-eval model (``pldr_core.evaluation.harness``)::

    import pldr_core.evaluate, lm_eval
    lm_eval.simple_evaluate(model="pldr", model_args="pretrained=runs/x/final,gcache=g.safetensors",
                            tasks=["arc_easy"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pldr_core.checkpoint import detect_layout, load_model
from pldr_core.device import resolve_device
from pldr_core.errors import PLDRError
from pldr_core.evaluation.harness import EVAL_NEEDS_ONE, PLDRLM, Progress, parse_batch_size, score_windows
from pldr_core.files import atomic_write_text
from pldr_core.gcache import read_gcache
from pldr_core.prompts import find_tokenizer
from pldr_core.tasks import avg0, expand_tasks, plan_tasks

__all__ = ["PLDRLM", "EvalReport", "PreparedTasks", "Progress", "RequestTimer", "prepared_tasks",
           "results_json", "run_eval", "score_rows", "score_windows"]


class RequestTimer:
    """Counts the loglikelihood requests (rolling ones too) an lm-eval model scores and the seconds it
    spends on them, tokenizing included: it wraps the instance's two methods, so it times any lm-eval
    model alike, ours or lm-eval's own ``hf`` one. Each scoring call returns Python floats, so the
    device has finished when the clock stops."""

    METHODS = ("loglikelihood", "loglikelihood_rolling")

    def __init__(self, lm):
        self.requests = 0
        self.seconds = 0.0
        for name in self.METHODS:
            setattr(lm, name, self._wrap(getattr(lm, name)))

    def _wrap(self, method):
        def timed(requests, *args, **kwargs):
            t0 = time.perf_counter()
            out = method(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.requests += len(requests)
            return out
        return timed

    def reset(self) -> None:
        self.requests, self.seconds = 0, 0.0

    def figures(self) -> dict:
        """{"requests", "scoring_s", "requests_per_s"} so far (requests_per_s None before any)."""
        rate = self.requests / self.seconds if self.seconds > 0 else None
        return {"requests": self.requests, "scoring_s": round(self.seconds, 4),
                "requests_per_s": None if rate is None else round(rate, 2)}


@dataclasses.dataclass
class EvalReport:
    """What one `pldr eval` run produced."""

    results: dict
    """lm-eval's results dict (without G-cache when comparing)."""
    compare: dict | None
    """lm-eval's results with the G-cache, for --compare-gcache."""
    skipped: dict[str, str]
    ran: list[str]
    offline: bool
    data_dir: str | None
    wall_s: float
    throughput: dict | None = None
    """``RequestTimer.figures()`` of the first run (without the G-cache when comparing)."""

    @property
    def avg0(self) -> dict | None:
        """The criticality paper's Avg0 of this run (``tasks.avg0``), when all six of its tasks ran."""
        return avg0(self.results)

    def rows(self) -> list[dict]:
        """``score_rows`` of the run; with a comparison each row also holds ``gcache_value``,
        ``gcache_stderr`` and ``difference`` (with G-cache minus without, None where it lacks one)."""
        rows = score_rows(self.results)
        if self.compare is None:
            return rows
        with_g = {(r["task"], r["metric"], r["filter"]): r for r in score_rows(self.compare)}
        for r in rows:
            g = with_g.get((r["task"], r["metric"], r["filter"]))
            r["gcache_value"] = g["value"] if g else None
            r["gcache_stderr"] = g["stderr"] if g else None
            r["difference"] = (g["value"] - r["value"]) if g else None
        return rows


def score_rows(results: dict) -> list[dict]:
    """Flatten lm-eval results to rows {task, metric, filter, value, stderr} (numeric metrics)."""
    rows = []
    for task, res in (results.get("results") or {}).items():
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


@contextlib.contextmanager
def _offline_env(on: bool):
    """Offline, make the hub libraries fail fast instead of retrying a dead network."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in names}
    if on:
        for k in names:
            os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records ``git describe`` of the current directory and lets git print "fatal: not a git
    repository" when there is none; ask git the same question with its stderr silenced."""
    import lm_eval.evaluator as ev

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.decode().strip() or None if out.returncode == 0 else None

    old = ev.get_git_commit_hash
    ev.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        ev.get_git_commit_hash = old


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    return (text[:237] + "...") if len(text) > 240 else text


def _quiet_logs(debug: bool) -> None:
    level = logging.INFO if debug else logging.ERROR
    for name in ("lm_eval", "lm-eval", "datasets", "huggingface_hub", "fsspec", "filelock"):
        logging.getLogger(name).setLevel(level)
    if not debug:
        try:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except ImportError:
            pass


def load_tasks(names: list[str], task_manager) -> tuple[list, dict[str, str]]:
    """Load each task once (so one missing data set does not stop the rest): the task objects for
    lm-eval, and name -> reason for those that failed. An unknown name is a PLDRError."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PLDRError(f"unknown task {name!r}{hint}: give lm-eval task names (`lm-eval ls tasks`), "
                            f"pldr_zeroshot, or a task YAML file")
    objs, skipped = [], {}
    for name in names:
        try:
            loaded = task_manager.load([name])
        except Exception as exc:  # a task's data missing or unreadable: skip it, run the rest
            skipped[name] = f"task data not available: {_one_line(exc)}"
            continue
        tasks, groups = loaded.get("tasks", {}), loaded.get("groups", {})
        if not groups and len(tasks) == 1:
            objs.extend(tasks.values())
        else:
            objs.append(name)
    return objs, skipped


@dataclasses.dataclass
class PreparedTasks:
    """lm-eval tasks ready for ``simple_evaluate`` (``prepared_tasks``)."""

    task_manager: object
    tasks: list
    """Task objects (or group names) that loaded."""
    ran: list[str]
    skipped: dict[str, str]
    plan: object
    """The ``pldr_core.tasks.TaskPlan`` they came from."""


@contextlib.contextmanager
def prepared_tasks(names: list[str], *, data_dir=None, offline: bool | None = None):
    """Plan ``names`` (``plan_tasks``: online, or offline from local data), build lm-eval's TaskManager
    over the generated task files and load every task once; yields ``PreparedTasks`` inside the offline
    environment (run lm-eval there). PLDRError when no task can run."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="pldr-eval-") as work:
        plan = plan_tasks(names, work_dir=work, data_dir=data_dir, offline=offline)
        with _offline_env(plan.offline):
            tm = TaskManager(include_path=str(plan.include_path) if plan.include_path else None,
                             include_defaults=plan.needs_builtin_index)
            task_objs, failed = load_tasks(plan.tasks, tm)
            skipped = {**plan.skipped, **failed}
            skipped = {n: skipped[n] for n in names if n in skipped}
            if not task_objs:
                reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
                raise PLDRError(f"no task can run ({reasons})")
            ran = [t if isinstance(t, str) else t.config.task for t in task_objs]
            yield PreparedTasks(task_manager=tm, tasks=task_objs, ran=ran, skipped=skipped, plan=plan)


def run_eval(model_path: str | Path, tasks: str | list[str], *, gcache: str | Path | None = None,
             compare_gcache: str | Path | None = None, force: bool = False, batch_size: int = 8,
             limit: int | float | None = None, device: str | None = "auto",
             data_dir: str | Path | None = None, offline: bool | None = None,
             progress: Progress | None = None, on_plan: Callable | None = None,
             debug: bool = False, output: str | Path | None = None) -> EvalReport:
    """Evaluate a model directory on lm-eval tasks (``pldr_zeroshot`` expands to the paper's suite).

    Offline (no hub reachable, or ``data_dir`` given) the suite reads local data (``pldr_core.tasks``);
    tasks whose data is missing are skipped with the reason, the rest still run; if none can run it
    is a PLDRError. ``compare_gcache`` scores twice, without and with that G-cache file. ``output``:
    where to write ``results_json`` of the report (atomically).
    """
    from lm_eval import simple_evaluate

    if gcache is not None and compare_gcache is not None:
        raise PLDRError("--gcache and --compare-gcache exclude each other (compare scores both ways)")
    names = expand_tasks(tasks)
    for name in names:  # before lm-eval indexes its task registry (slow)
        if name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise PLDRError(f"task file not found: {name}")
    detect_layout(model_path)
    tok = find_tokenizer(model_path, missing=EVAL_NEEDS_ONE)
    for f in (gcache, compare_gcache):
        if f is not None and not Path(f).is_file():
            raise PLDRError(f"G-cache file not found: {f}")
    if limit is not None and limit <= 0:
        raise PLDRError(f"--limit must be positive, got {limit}")
    batch_size = parse_batch_size(batch_size)
    dev = resolve_device(device)
    _quiet_logs(debug)

    t0 = time.perf_counter()
    # The model and its G-caches first: a bad one is the only line the user sees.
    model = load_model(model_path, device=dev, dtype=torch.float32)
    g_main = read_gcache(gcache, model, force=force) if gcache is not None else None
    g_cmp = read_gcache(compare_gcache, model, force=force) if compare_gcache is not None else None
    with prepared_tasks(names, data_dir=data_dir, offline=offline) as prep:
        plan, skipped, ran = prep.plan, prep.skipped, prep.ran
        if on_plan is not None:
            on_plan(ran, skipped, plan)
        lm = PLDRLM(model=model, tokenizer=tok, gcache=g_main, batch_size=batch_size, progress=progress)
        timer = RequestTimer(lm)
        speeds = []

        def run():
            timer.reset()
            with _quiet_git_hash():
                out = simple_evaluate(model=lm, tasks=list(prep.tasks), task_manager=prep.task_manager,
                                      limit=limit, log_samples=False, batch_size=batch_size, device=str(dev))
            speeds.append(timer.figures())
            return out

        results = run()
        compare = None
        if g_cmp is not None:
            lm.gcache = g_cmp
            compare = run()
    wall = time.perf_counter() - t0
    meta = {"model": str(model_path), "gcache": str(gcache) if gcache else None,
            "compare_gcache": str(compare_gcache) if compare_gcache else None,
            "offline": plan.offline, "data_dir": str(plan.data_dir) if plan.data_dir else None,
            "skipped": skipped, "wall_s": round(wall, 3), "limit": limit, "batch_size": batch_size}
    for r, speed in zip((results, compare), speeds):
        r["pldr"] = {**meta, **speed}  # each run's own requests, scoring seconds and requests/s
    report = EvalReport(results=results, compare=compare, skipped=skipped, ran=ran, offline=plan.offline,
                        data_dir=meta["data_dir"], wall_s=wall, throughput=speeds[0])
    if output is not None:
        atomic_write_text(output, results_json(report))
    return report


def results_json(report: EvalReport) -> str:
    """lm-eval's results JSON; with --compare-gcache both runs under "no_gcache" and "gcache"."""
    from lm_eval.utils import handle_non_serializable

    obj = report.results if report.compare is None else {"no_gcache": report.results,
                                                          "gcache": report.compare}
    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
