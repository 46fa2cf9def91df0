"""Pretraining loop (SPEC section 5): one loop for CPU, one GPU and torchrun (FSDP2 / DDP).

- AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1 on matrices; linear warm-up then cosine to 0.1x lr at
  the last step; gradients clipped by value at 1.0 (the norm before clipping is logged);
- bf16 autocast on CUDA (the metric path keeps fp32 by itself);
- loss = token cross-entropy ignoring pad id 0, averaged over every token of the global batch, plus the
  DAG terms of A_LM, A_P and G_LM times their coefficients (the terms are logged whenever the model has
  them);
- ``--batch-size`` is the global batch per optimizer step: each of W ranks runs ``grad_accum``
  micro-batches of ``batch / (W * grad_accum)`` rows, so the maths does not depend on W;
- step checkpoints RUN/step-XXXXXXXX/ (a model directory + optimizer.safetensors + rng.safetensors +
  trainer_state.json) resume exactly: the data order is a pure function of (seed, sample position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pldr_core import parallel
from pldr_core.config import PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_write_text

STEP_DIR = re.compile(r"step-(\d{8})$")
DAG_LOG_EVERY = 10
"""Without DAG terms in the loss, they are still logged: every this many steps (and at validations)."""
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
# Settings that define a run: a --resume with any of them different is another run.
RUN_KEYS = ("model", "batch_size", "seq_len", "lr", "warmup", "seed", "data_tokens", "weight_decay")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (a runtime failure, exit 1)."""


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
    compile: bool | None = None
    """torch.compile with the fused metric path (Triton kernels on CUDA); default on for a single CUDA
    process, off on CPU and under torchrun (compile + FSDP2 not yet measured). See ``compile_mode``."""
    compile_mode: str = "graphs"
    """With compile on one CUDA process: "graphs" (default) compiles the whole model and replays it as
    CUDA graphs; "layers" compiles each decoder layer (what torchrun/FSDP2 runs always use)."""
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


# ---- schedule ---------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, warmup: int, steps: int, min_ratio: float = 0.1) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up, cosine to min_ratio*lr at the
    last update."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- checkpoint helpers ---------------------------------------------------------------------------
def find_checkpoints(run: Path) -> list[Path]:
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
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


def _model_from_state(config: PLDRConfig, sd: dict[str, torch.Tensor]):
    """A CPU PLDRModel holding ``sd`` without a second random initialisation."""
    from pldr_core.model import PLDRModel

    with torch.device("meta"):
        m = PLDRModel(config)
    m.load_state_dict(sd, assign=True, strict=True)
    return m


# ---- the loop ---------------------------------------------------------------------------------
class _Interrupt:
    """First Ctrl-C asks for a clean stop at the end of the step; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _resolve(args: TrainArgs, data) -> tuple[PLDRConfig, dict]:
    """The model config and the run identity, from the args and the data (no side effects)."""
    from pldr_core.config import preset as make_preset

    if args.lr is None:
        args.lr = 3e-3 if args.preset == "tiny" and not args.config_file else 1e-3
    if args.lr <= 0:
        raise PLDRError("--lr must be positive")

    overrides: dict = {"vocab_size": data.vocab_size}
    if args.g_mode is not None:
        overrides["g_mode"] = args.g_mode
    if args.dag is not None:
        overrides["dag"] = tuple(args.dag)
    if args.config_file:
        config = PLDRConfig.from_json(args.config_file).replace(**overrides)
    else:
        config = make_preset(args.preset, **overrides)
    seq_len = args.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise PLDRError(f"--seq-len {seq_len} is longer than the model's context ({config.max_seq_len}); "
                        "lower --seq-len or raise max_seq_len in --config")
    if seq_len < 1:
        raise PLDRError("--seq-len must be positive")
    identity = {
        "model": {k: v for k, v in config.to_dict().items() if k not in ("name", "g_source")},
        "batch_size": args.batch_size, "seq_len": seq_len, "lr": args.lr,
        "warmup": args.warmup if args.warmup is not None else min(1000, args.steps // 10),
        "seed": args.seed, "data_tokens": int(data.meta.get("tokens", 0)),
        "weight_decay": args.weight_decay,
    }
    return config, identity


def _validate(args: TrainArgs, d: parallel.Dist) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep"):
        if getattr(args, name) < 1:
            raise PLDRError(f"--{name.replace('_', '-')} must be at least 1")
    if args.compile_mode not in ("graphs", "layers"):
        raise PLDRError(f"unknown --compile-mode {args.compile_mode!r}; choose graphs or layers")
    from pldr_core.kernels import check_metric_precision

    check_metric_precision(args.metric_precision)
    if args.batch_size % (d.world * args.grad_accum):
        raise PLDRError(f"--batch-size {args.batch_size} must be divisible by world size x grad-accum "
                        f"({d.world} x {args.grad_accum})")


def pretrain(args: TrainArgs, *, on_log: Callable[[dict], None] | None = None,
             on_event: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a run; every rank calls this. Callbacks fire on rank 0 only."""
    d = parallel.setup(args.device)
    try:
        return _pretrain(args, d, on_log or (lambda r: None), on_event or (lambda s: None))
    finally:
        parallel.teardown(d)


def _pretrain(args: TrainArgs, d: parallel.Dist, on_log, on_event) -> TrainResult:
    from safetensors.torch import load_file, save

    from pldr_core.checkpoint import save_model
    from pldr_core.tokenizer import TOKENIZER_FILE
    from pldr_core.data import RowSampler, TokenData
    from pldr_core.build import build_model
    from pldr_core.model import dag_terms

    _validate(args, d)
    data = TokenData(args.data)
    config, identity = _resolve(args, data)
    seq_len = identity["seq_len"]
    warmup = identity["warmup"]
    train_sampler = RowSampler(data.train, seq_len, seed=args.seed)
    if train_sampler.num_samples == 0:
        raise PLDRError(f"{args.data} has no training rows of {seq_len + 1} tokens (empty data)")
    val_sampler = RowSampler(data.val, seq_len, shuffle=False)
    run = Path(args.out)
    if run.exists() and not run.is_dir():
        raise PLDRError(f"--out {run} exists and is not a folder")
    ckpts = find_checkpoints(run)
    resume_from = None
    if args.resume:
        if not ckpts:
            raise PLDRError(f"--resume: {run} holds no step-XXXXXXXX checkpoint to resume from")
        resume_from = ckpts[-1]
        try:
            saved = json.loads((resume_from / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PLDRError(f"cannot read {resume_from / STATE_FILE}: {exc}") from None
        if args.warmup is None and "warmup" in saved.get("run", {}):
            # The default warm-up follows --steps; extending a run keeps the one it started with.
            identity["warmup"] = warmup = saved["run"]["warmup"]
        diff = [k for k in RUN_KEYS if saved.get("run", {}).get(k) != identity[k]]
        if diff:
            raise PLDRError(f"--resume: {resume_from} is from another run (different {', '.join(diff)}); "
                            "use the same settings or a new --out")
    elif run.exists() and (ckpts or (run / METRICS_FILE).exists() or (run / "final").exists()):
        raise PLDRError(f"{run} already holds a run; pass --resume to continue it or choose a new --out")

    model = build_model(config, seed=args.seed, g_file=args.g_file)
    start_step, samples_seen, tokens_seen, first_val = 0, 0, 0, None
    opt_state = None
    if resume_from is not None:
        from pldr_core.checkpoint import WEIGHTS_FILE, _load_weights

        _load_weights(model, load_file(str(resume_from / WEIGHTS_FILE)), resume_from)
        start_step, samples_seen = saved["step"], saved["samples_seen"]
        tokens_seen, first_val = saved["tokens_seen"], saved.get("first_val_loss")
        opt_state = _unflatten_optimizer(load_file(str(resume_from / OPTIM_FILE)), saved["optimizer"])
        rng = load_file(str(resume_from / RNG_FILE))
        torch.set_rng_state(rng["cpu"])
        if d.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    else:
        torch.manual_seed(args.seed)

    # Nothing has been written so far; from here on the run folder exists.
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        _trim_metrics(run / METRICS_FILE, start_step)
    parallel.barrier(d)

    model.to(d.device)
    model.train()
    use_compile = args.compile if args.compile is not None else (d.device.type == "cuda" and d.world == 1)
    # CUDA graphs need the whole step's shapes fixed and one process; FSDP2 runs compile per layer.
    graphs = use_compile and args.compile_mode == "graphs" and d.device.type == "cuda" and not d.enabled
    if use_compile:
        from pldr_core.kernels import prepare_metric_path

        prepare_metric_path(model, d.device, metric_precision=args.metric_precision)
        if not graphs:
            for layer in model.decoder.dec_layers:
                layer.compile()
    model = parallel.wrap(model, d)
    compiled = torch.compile(model, mode="reduce-overhead") if graphs else None

    def forward(x: torch.Tensor, **kw):
        """The model's forward; with CUDA graphs, outputs stay valid until the next call only."""
        if compiled is None:
            return model(x, **kw)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, **kw)

    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-5, **_optimizer_impl(d))
    if opt_state is not None:
        parallel.load_optimizer_state(model, optimizer, _with_optimizer_impl(opt_state, d), d)
    params = [p for p in model.parameters() if p.requires_grad]

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                else contextlib.nullcontext())
    coeffs = config.dag
    use_dag = any(c != 0 for c in coeffs)
    per_rank = args.batch_size // d.world
    micro = per_rank // args.grad_accum
    eval_every = args.eval_every or max(1, args.steps // 10)
    save_every = args.save_every or max(1, args.steps // 5)
    pad = config.pad_id

    def rank_rows(sampler, start):
        """This rank's [per_rank, S+1] share of the global batch starting at sample ``start``."""
        return torch.from_numpy(sampler.batch(start + d.rank * per_rank, per_rank))

    @torch.no_grad()
    def evaluate() -> dict | None:
        if val_sampler.num_samples == 0:
            return None
        model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=d.device)
        n_batches = min(args.eval_batches, max(1, val_sampler.num_samples // args.batch_size))
        for b in range(n_batches):
            start = (b * args.batch_size) % val_sampler.num_samples
            rows = rank_rows(val_sampler, start).to(d.device)
            x, y = rows[:, :-1], rows[:, 1:]
            with autocast:
                logits = forward(x).logits.float()
            mask = y != pad
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=pad,
                                 reduction="sum")
            correct = ((logits.argmax(-1) == y) & mask).sum()
            total += torch.stack([ce.double(), correct.double(), mask.sum().double()])
        parallel.all_reduce_sum(total, d)
        model.train()
        n = max(1.0, total[2].item())
        return {"val_loss": total[0].item() / n, "val_acc": total[1].item() / n}

    def save_checkpoint(step: int, last: dict) -> Path:
        msd = parallel.full_model_state(model)
        osd = parallel.full_optimizer_state(model, optimizer)
        path = run / f"step-{step:08d}"
        if d.is_main:
            tensors, info = _flatten_optimizer(osd)
            rng = {"cpu": torch.get_rng_state()}
            if d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(d.device)
            state = {"step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                     "first_val_loss": first_val, "run": identity, "optimizer": info,
                     "args": _jsonable(args), "last": last, "world_size": d.world}
            save_model(_model_from_state(config, msd), path, tokenizer=data.tokenizer_path,
                       meta=_meta(args, data, step, tokens_seen, last, first_val, "checkpoint"),
                       extra_files={OPTIM_FILE: save(tensors), RNG_FILE: save(rng),
                                    STATE_FILE: (json.dumps(state, indent=2, default=str) + "\n").encode()})
            for old in find_checkpoints(run)[:-args.keep]:
                shutil.rmtree(old, ignore_errors=True)
            on_event(f"saved {path}")
        parallel.barrier(d)
        return path

    metrics = open(run / METRICS_FILE, "a") if d.is_main else None
    t_start = time.perf_counter()
    last: dict = {}
    checkpoint = None
    interrupted = False
    val = None
    try:
        if start_step == 0 and eval_every:
            val = evaluate()
            if val is not None:
                first_val = val["val_loss"]
                rec = {"step": 0, "tokens_seen": 0, **val}
                if metrics:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                on_log(rec) if d.is_main else None
        with _Interrupt() as interrupt:
            step = start_step
            while step < args.steps:
                t0 = time.perf_counter()
                lr = lr_at(step, lr=args.lr, warmup=warmup, steps=args.steps, min_ratio=args.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rows = rank_rows(train_sampler, samples_seen)
                n_global = float((rows[:, 1:] != pad).sum())  # counted on the host: no device sync
                if d.enabled:
                    counts = torch.tensor([n_global], device=d.device, dtype=torch.float64)
                    n_global = parallel.all_reduce_sum(counts, d).item()
                rows = rows.to(d.device)
                stats = torch.zeros(2, dtype=torch.float64, device=d.device)  # ce sum, correct
                dag_log: dict[str, torch.Tensor] = {}
                # Logged DAG terms cost three matrix exponentials per layer: take them every
                # DAG_LOG_EVERY steps, at validations and at the end (every step when in the loss).
                nxt = step + 1
                log_dag = (nxt % DAG_LOG_EVERY == 0 or nxt % eval_every == 0 or nxt == args.steps)
                for m in range(args.grad_accum):
                    chunk = rows[m * micro:(m + 1) * micro]
                    x, y = chunk[:, :-1], chunk[:, 1:]
                    sync = m == args.grad_accum - 1
                    with _grad_sync(model, sync), autocast:
                        out = forward(x, return_deductive=True)
                        logits = out.logits.float()
                        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                             ignore_index=pad, reduction="sum")
                        loss = ce * d.world / max(n_global, 1.0)
                        if use_dag:
                            terms = dag_terms(out.deductive)
                            for c, key in zip(coeffs, ("A_LM", "A_P", "G_LM")):
                                if c and key in terms:
                                    loss = loss + c * terms[key] / args.grad_accum
                            dag_log = {k: v.detach() for k, v in terms.items()}
                        elif sync and log_dag:
                            with torch.no_grad():
                                dag_log = dag_terms([{k: v.detach() for k, v in dd.items()}
                                                     for dd in out.deductive])
                    loss.backward()
                    with torch.no_grad():
                        stats += torch.stack([ce.detach().double(),
                                              ((logits.argmax(-1) == y) & (y != pad)).sum().double()])
                        if compiled is not None and m == 0 and not sync:
                            # The first backward's gradients live in the CUDA-graph pool, which the
                            # next micro-batch overwrites: take them out before accumulating more
                            # (later backwards add into these copies in place).
                            for p in params:
                                if p.grad is not None:
                                    p.grad = p.grad.clone()
                grads = [p.grad for p in params if p.grad is not None]
                gnorm = torch.nn.utils.get_total_norm(grads, 2.0)
                if hasattr(gnorm, "full_tensor"):
                    gnorm = gnorm.full_tensor()
                torch.nn.utils.clip_grad_value_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples_seen += args.batch_size
                tokens_seen += args.batch_size * seq_len

                dag_vec = torch.stack([dag_log[k].double() for k in sorted(dag_log)]) if dag_log else None
                parallel.all_reduce_sum(stats, d)
                if dag_vec is not None:
                    parallel.all_reduce_sum(dag_vec, d)
                loss_value = stats[0].item() / max(n_global, 1.0)
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(f"loss is {loss_value} at step {step}; lower --lr or check the "
                                           "data (the last checkpoint is kept)")
                dt = time.perf_counter() - t0  # loss_value's .item() waited for the step
                last = {"step": step, "loss": loss_value, "acc": stats[1].item() / max(n_global, 1.0),
                        "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": args.batch_size * seq_len / dt,
                        "tokens_seen": tokens_seen}
                if dag_vec is not None:
                    for k, v in zip(sorted(dag_log), dag_vec.tolist()):
                        last[f"dag_{k}"] = v / d.world
                if step % eval_every == 0 or step == args.steps:
                    val = evaluate()
                    if val is not None:
                        last.update(val)
                if d.is_main and (step % args.log_every == 0 or "val_loss" in last or step == args.steps):
                    metrics.write(json.dumps(last) + "\n")
                    metrics.flush()
                    on_log(last)
                stop = parallel.any_flag(interrupt.requested, d) or (
                    args.stop_after is not None and step >= args.stop_after)
                if stop and step < args.steps:
                    checkpoint = save_checkpoint(step, last)
                    interrupted = True
                    break
                if step % save_every == 0 or step == args.steps:
                    checkpoint = save_checkpoint(step, last)
    finally:
        if metrics:
            metrics.close()

    final_dir = None
    if not interrupted:
        msd = parallel.full_model_state(model)
        if d.is_main:
            final_dir = save_model(_model_from_state(config, msd), run / "final",
                                   tokenizer=data.tokenizer_path,
                                   meta=_meta(args, data, step, tokens_seen, last, first_val, "final"))
            assert (final_dir / TOKENIZER_FILE).is_file()
            on_event(f"saved {final_dir}")
        parallel.barrier(d)
    return TrainResult(steps_done=step, interrupted=interrupted, final_dir=final_dir, checkpoint=checkpoint,
                       last=last, first_val_loss=first_val,
                       val_loss=(val or {}).get("val_loss"), elapsed_s=time.perf_counter() - t_start)


def _optimizer_impl(d: parallel.Dist) -> dict:
    """AdamW's implementation: fused on a single CUDA device, foreach across ranks (FSDP2's sharded
    parameters), the plain loop on CPU.

    The learned-G paper-110m model has ~690 parameter tensors. With foreach, the host-side work of
    each CUDA-graph step could not keep ahead of the GPU: bf16 steps ran at 381k-536k tokens/s, uneven;
    fused, they ran at a steady 620k-650k (H200, same session, 4k vocabulary, batch 16 x 1024)."""
    if d.device.type != "cuda":
        return {}
    return {"foreach": True} if d.enabled else {"fused": True}


def _with_optimizer_impl(state: dict, d: parallel.Dist) -> dict:
    """An optimizer state dict whose groups ask for this run's implementation: a checkpoint's groups
    carry the one it was saved with (a foreach run's, say), which load_state_dict would restore."""
    impl = {"fused": None, "foreach": None, **_optimizer_impl(d)}
    return {**state, "param_groups": [{**group, **impl} for group in state["param_groups"]]}


@contextlib.contextmanager
def _grad_sync(model, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 flag)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _trim_metrics(path: Path, keep_upto: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_upto]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _jsonable(args: TrainArgs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()}


def _meta(args: TrainArgs, data, step: int, tokens_seen: int, last: dict, first_val, kind: str) -> dict:
    return {"created_by": "pldr pretrain", "kind": kind, "steps": step, "tokens_seen": tokens_seen,
            "data": {"path": str(Path(args.data).resolve()), "source": data.meta.get("source"),
                     "tokens": data.meta.get("tokens")},
            "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
            "first_val_loss": first_val, "train_args": _jsonable(args)}
