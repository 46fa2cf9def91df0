"""What a pretraining run takes (``TrainArgs``, checked before anything is written) and returns."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pldr_core.errors import PLDRError
from pldr_core.kernels import check_metric_precision
from pldr_core.parallel import PLANS

DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class TrainArgs:
    """Everything ``pldr pretrain`` takes."""

    data: str
    """Token data folder (``pldr tokenize``)."""
    out: str
    """Run folder: metrics.jsonl, step-XXXXXXXX/ checkpoints, final/."""
    preset: str = "tiny"
    """Model preset; ignored when ``config_file`` is given."""
    config_file: str | None = None
    """A config.json to train instead of a preset."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Global rows per optimizer step (all ranks and micro-batches together)."""
    grad_accum: int = 1
    """Micro-batches per step on each rank."""
    seq_len: int | None = None
    """Tokens per row; default the model's context (max_seq_len)."""
    lr: float | None = None
    """Peak learning rate; default 3e-3 for the tiny preset, 1e-3 otherwise (the paper's)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of lr at the last step."""
    warmup: int | None = None
    """Warm-up steps; default min(1000, steps // 10)."""
    weight_decay: float = 0.1
    g_mode: str | None = None
    """Override the config's g_mode (learned, identity, random, fixed)."""
    g_file: str | None = None
    """G-cache file for g_mode fixed."""
    dag: tuple[float, float, float] | None = None
    """DAG loss coefficients (A_LM, A_P, G_LM)."""
    device: str = "auto"
    parallel: str = "auto"
    """Under torchrun: "ddp" (a replica per process), "fsdp" (FSDP2, CUDA only) or "auto"
    (``parallel.plan_for``); one process ignores it."""
    compile: bool | None = None
    """torch.compile with the fused metric path (Triton kernels on CUDA); default on for CUDA (one
    process or torchrun), off on CPU. See ``compile_mode``."""
    compile_mode: str = "graphs"
    """With compile on one CUDA process: "graphs" (default) compiles the whole model and replays it as
    CUDA graphs; "layers" compiles each decoder layer (what torchrun runs always use)."""
    metric_precision: str = "bf16"
    """With compile on CUDA: the metric path's GLU matmuls with "bf16" operands (default, the fastest),
    in "tf32" or in "fp32" (``pldr_core.kernels.prepare_metric_path``)."""
    resume: bool = False
    eval_every: int | None = None
    """Validation every N steps (and at the start and the end); default max(1, steps // 10)."""
    eval_batches: int = 8
    """Validation batches (of batch_size rows) per evaluation."""
    save_every: int | None = None
    """Checkpoint every N steps; default max(1, steps // 5). The last step is always saved."""
    keep: int = 2
    """Step checkpoints kept (older ones are deleted)."""
    seed: int = 0
    log_every: int = 1
    """Write a metrics line every N steps."""
    stop_after: int | None = None
    """Stop (with a resumable checkpoint) after this step, as an interrupt would; for tests."""
    criticality_every: int | None = None
    """The criticality probe (OP(G_LM), OP(A), per layer; ``training.monitor``) every N steps; default
    at each validation; 0 turns it off."""
    deterministic: bool = False
    """Deterministic algorithms (cuDNN, cuBLAS too) and every generator seeded: repeated runs are
    bitwise equal, at some speed on CUDA."""

    def validate(self) -> None:
        """PLDRError naming the first option out of range (NaN, infinite, negative, zero where it
        makes no sense); ``pretrain`` calls this before it touches the disk or the device."""
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "keep", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("seq_len", "eval_every", "save_every", "stop_after"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "criticality_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        _check_int("seed", self.seed, 0)
        if self.lr is not None and not (_finite(self.lr) and self.lr > 0):
            raise _bad("lr", "a positive finite number", self.lr)
        if not (_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise _bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            raise _bad("weight_decay", "a finite number >= 0", self.weight_decay)
        if self.dag is not None and (len(self.dag) != 3 or not all(_finite(c) and c >= 0 for c in self.dag)):
            raise _bad("dag", "three finite coefficients >= 0", ",".join(map(str, self.dag)))
        if self.compile_mode not in ("graphs", "layers"):
            raise PLDRError(f"unknown --compile-mode {self.compile_mode!r}; choose graphs or layers")
        check_metric_precision(self.metric_precision)
        if self.parallel not in PLANS:
            raise _bad("parallel", ", ".join(PLANS[:-1]) + " or " + PLANS[-1], self.parallel)
        if self.device not in DEVICES:
            raise _bad("device", ", ".join(DEVICES[:-1]) + " or " + DEVICES[-1], self.device)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PLDRError("--device cuda but no CUDA device is available")

    def with_default_lr(self) -> TrainArgs:
        """These args with ``lr`` filled in: the tiny preset learns fastest at 3e-3, larger models at
        the paper's 1e-3."""
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=3e-3 if self.preset == "tiny" and not self.config_file else 1e-3)

    def to_json(self) -> dict:
        """The args as JSON values (tuples as lists), as written into checkpoints and meta.json."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    steps_done: int
    interrupted: bool
    final_dir: Path | None
    checkpoint: Path | None
    last: dict = field(default_factory=dict)
    first_val_loss: float | None = None
    val_loss: float | None = None
    elapsed_s: float = 0.0
    spikes: int = 0
    """Loss spikes flagged over the whole run (a resumed run counts those before the resume too)."""


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, rule: str, value) -> PLDRError:
    return PLDRError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def _check_int(name: str, value, least: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise _bad(name, f"an integer >= {least}", value)
