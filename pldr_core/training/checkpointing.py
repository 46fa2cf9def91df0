"""Resumable step checkpoints of a run folder: one manager for the model, the optimizer, the RNG, the
data position and keep-N.

RUN/step-XXXXXXXX/ is a model directory (``checkpoint.save_model``) plus optimizer.safetensors (the
full AdamW state, flattened), rng.safetensors (CPU and CUDA generator states) and trainer_state.json
(step, data position, the run identity, the optimizer's scalars and groups). The data order is a pure
function of (seed, sample position), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from pldr_core import parallel
from pldr_core.checkpoint import WEIGHTS_FILE, load_weights, save_model, unwrap
from pldr_core.config import PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_write_text
from pldr_core.model import PLDRModel
from pldr_core.training.optim import with_optimizer_impl

STEP_DIR = re.compile(r"step-(\d{8})$")
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
# Settings that define a run: a --resume with any of them different is another run.
RUN_KEYS = ("model", "batch_size", "seq_len", "lr", "warmup", "seed", "data_tokens", "weight_decay")


@dataclass
class TrainState:
    """Where a run stands: optimizer steps done and the data position."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    first_val_loss: float | None = None


def find_checkpoints(run: Path) -> list[Path]:
    """The step folders of ``run``, oldest first."""
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


class CheckpointManager:
    """Saves and loads the step checkpoints of one run folder; every rank holds one (saving gathers
    the full state, a collective under FSDP2), rank 0 writes."""

    def __init__(self, run: str | Path, d: parallel.Dist, *, keep: int, tokenizer: str | Path | None):
        self.run = Path(run)
        self.d = d
        self.keep = keep
        self.tokenizer = tokenizer
        self.metrics_path = self.run / METRICS_FILE

    # ---- finding and checking --------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        return find_checkpoints(self.run)

    def latest(self) -> Path | None:
        """The newest step folder, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def holds_run(self) -> bool:
        """Whether the run folder already holds (part of) a run."""
        return self.run.exists() and bool(self.checkpoints() or self.metrics_path.exists()
                                          or (self.run / FINAL_DIR).exists())

    @staticmethod
    def read_state(path: Path) -> dict:
        """A step folder's trainer_state.json."""
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PLDRError(f"cannot read {path / STATE_FILE}: {exc}") from None

    @staticmethod
    def check_same_run(path: Path, saved: dict, identity: dict) -> None:
        """PLDRError unless the checkpoint's run identity equals ``identity`` on every RUN_KEYS."""
        diff = [k for k in RUN_KEYS if saved.get("run", {}).get(k) != identity[k]]
        if diff:
            raise PLDRError(f"--resume: {path} is from another run (different {', '.join(diff)}); "
                            "use the same settings or a new --out")

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, path: Path, model: PLDRModel) -> TrainState:
        """Load a step folder's weights into ``model`` and restore the RNG; returns the run's state."""
        saved = self.read_state(path)
        load_weights(model, load_file(str(path / WEIGHTS_FILE)), path)
        rng = load_file(str(path / RNG_FILE))
        torch.set_rng_state(rng["cpu"])
        if self.d.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.d.device)
        return TrainState(step=saved["step"], samples_seen=saved["samples_seen"],
                          tokens_seen=saved["tokens_seen"], first_val_loss=saved.get("first_val_loss"))

    def load_optimizer(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load a step folder's optimizer state into this run's (wrapped) model's optimizer."""
        info = self.read_state(path)["optimizer"]
        state = _unflatten_optimizer(load_file(str(path / OPTIM_FILE)), info)
        parallel.load_optimizer_state(model, optimizer, with_optimizer_impl(state, self.d))

    def prepare(self, start_step: int) -> None:
        """Create the run folder and drop metric lines written after ``start_step`` (a resumed run
        writes them again); the first write of a run."""
        if self.d.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            _trim_metrics(self.metrics_path, start_step)
        parallel.barrier(self.d)

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, *,
             identity: dict, args: dict, last: dict, meta: dict, monitor: dict | None = None) -> Path:
        """Write RUN/step-XXXXXXXX/ for ``state.step`` and delete all but the newest ``keep``;
        ``monitor`` (the spike detector's state) goes into trainer_state.json."""
        msd = parallel.full_model_state(model)
        osd = parallel.full_optimizer_state(model, optimizer)
        path = self.run / f"step-{state.step:08d}"
        if self.d.is_main:
            tensors, info = _flatten_optimizer(osd)
            rng = {"cpu": torch.get_rng_state()}
            if self.d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
            trainer_state = {"step": state.step, "samples_seen": state.samples_seen,
                             "tokens_seen": state.tokens_seen, "first_val_loss": state.first_val_loss,
                             "run": identity, "optimizer": info, "args": args, "last": last,
                             "world_size": self.d.world, "monitor": monitor or {}}
            extra = {OPTIM_FILE: save(tensors), RNG_FILE: save(rng),
                     STATE_FILE: (json.dumps(trainer_state, indent=2, default=str) + "\n").encode()}
            save_model(_model_from_state(unwrap(model).config, msd), path, tokenizer=self.tokenizer,
                       meta=meta, extra_files=extra)
            for old in self.checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        parallel.barrier(self.d)
        return path

    def save_final(self, model: torch.nn.Module, *, meta: dict) -> Path | None:
        """Write RUN/final/ (a model directory, no optimizer state); its path on rank 0, else None."""
        msd = parallel.full_model_state(model)
        final = None
        if self.d.is_main:
            final = save_model(_model_from_state(unwrap(model).config, msd), self.run / FINAL_DIR,
                               tokenizer=self.tokenizer, meta=meta)
        parallel.barrier(self.d)
        return final


def _model_from_state(config: PLDRConfig, sd: dict[str, torch.Tensor]) -> PLDRModel:
    """A CPU PLDRModel holding ``sd`` without a second random initialisation."""
    with torch.device("meta"):
        m = PLDRModel(config)
    m.load_state_dict(sd, assign=True, strict=True)
    return m


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors keyed "param::key" for safetensors; the scalars and groups for trainer_state.json."""
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(info.get("scalars", {}).items()):
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def _trim_metrics(path: Path, keep_upto: int) -> None:
    """Keep the metric lines (step records, and spike records, which carry their step too) of steps up
    to ``keep_upto``."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_upto]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
