"""Pretraining: one loop for CPU, one GPU and torchrun (FSDP2 / DDP).

- AdamW (0.9, 0.95), eps 1e-5, weight decay on matrices; linear warm-up then cosine to
  ``min_lr_ratio`` x lr at the last step; gradients clipped by value at 1.0 (the norm before clipping
  is logged);
- bf16 autocast on CUDA (the metric path keeps fp32 by itself);
- loss = token cross-entropy ignoring the pad id, averaged over every token of the global batch, plus
  the DAG terms of A_LM, A_P and G_LM times their coefficients (the terms are logged whenever the model
  has them);
- ``batch_size`` is the global batch per optimizer step: each of W ranks runs ``grad_accum``
  micro-batches of ``batch / (W * grad_accum)`` rows, so the maths does not depend on W;
- step checkpoints (``checkpointing``) resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pldr_core import parallel
from pldr_core.build import build_model
from pldr_core.config import PLDRConfig
from pldr_core.config import preset as make_preset
from pldr_core.criticality import SpikeDetector
from pldr_core.data import RowSampler, TokenData
from pldr_core.errors import PLDRError
from pldr_core.kernels import prepare_metric_path
from pldr_core.training.args import TrainArgs, TrainResult
from pldr_core.training.checkpointing import CheckpointManager, TrainState
from pldr_core.training.losses import add_dag_terms, correct_tokens, dag_terms, token_cross_entropy
from pldr_core.training.monitor import Monitor
from pldr_core.training.optim import build_optimizer
from pldr_core.training.runtime import Interrupt, deterministic
from pldr_core.training.schedule import lr_at

DAG_LOG_EVERY = 10
"""Without DAG terms in the loss, they are still logged: every this many steps (and at validations)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (a runtime failure, exit 1)."""


def pretrain(args: TrainArgs, *, on_log: Callable[[dict], None] | None = None,
             on_event: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a run; every rank calls this. Callbacks fire on rank 0 only.

    The args are checked first: bad values raise PLDRError before anything exists on disk."""
    args.validate()
    args = args.with_default_lr()
    with deterministic(args.deterministic, args.seed):
        d = parallel.setup(args.device)
        finished = False
        try:
            trainer = Trainer(args, d, on_log=on_log, on_event=on_event)
            trainer.setup()
            result = trainer.fit()
            finished = True
            return result
        finally:
            parallel.teardown(d, finished)


def resolve_run(args: TrainArgs, data: TokenData) -> tuple[PLDRConfig, dict]:
    """The model config and the run identity (checkpointing's RUN_KEYS), from the args (with ``lr``
    set) and the data; no side effects."""
    overrides: dict = {"vocab_size": data.vocab_size}
    if args.g_mode is not None:
        overrides["g_mode"] = args.g_mode
    if args.dag is not None:
        overrides["dag"] = tuple(args.dag)
    if args.config_file:
        config = PLDRConfig.from_json(args.config_file)
        if config.vocab_size < data.vocab_size:
            raise PLDRError(f"--config {args.config_file}: vocab_size {config.vocab_size} is smaller than the "
                            f"token data's vocabulary ({data.vocab_size}); raise it or retokenize")
        config = config.replace(**overrides)
    else:
        config = make_preset(args.preset, **overrides)
    seq_len = args.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise PLDRError(f"--seq-len {seq_len} is longer than the model's context ({config.max_seq_len}); "
                        "lower --seq-len or raise max_seq_len in --config")
    identity = {
        "model": {k: v for k, v in config.to_dict().items() if k not in ("name", "g_source")},
        "batch_size": args.batch_size, "seq_len": seq_len, "lr": args.lr,
        "warmup": args.warmup if args.warmup is not None else min(1000, args.steps // 10),
        "seed": args.seed, "data_tokens": int(data.meta.get("tokens", 0)),
        "weight_decay": args.weight_decay,
    }
    return config, identity


class Trainer:
    """One rank's part of a run: ``setup`` checks the inputs and builds everything (writing nothing
    until they are known good), ``fit`` runs the steps, validations and checkpoints."""

    def __init__(self, args: TrainArgs, d: parallel.Dist, *, on_log: Callable[[dict], None] | None = None,
                 on_event: Callable[[str], None] | None = None, spikes: SpikeDetector | None = None):
        self.args, self.d = args, d
        self.detector = spikes  # None: the default SpikeDetector
        self.on_log = on_log or (lambda rec: None)
        self.on_event = on_event or (lambda text: None)
        self.compiled = None
        self._metrics = None

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        args, d = self.args, self.d
        self.plan = parallel.plan_for(args.parallel, d)
        if args.batch_size % (d.world * args.grad_accum):
            raise PLDRError(f"--batch-size {args.batch_size} must be divisible by world size x grad-accum "
                            f"({d.world} x {args.grad_accum})")
        self.data = TokenData(args.data)
        self.config, self.identity = resolve_run(args, self.data)
        self.seq_len = self.identity["seq_len"]
        self.train_rows = RowSampler(self.data.train, self.seq_len, seed=args.seed)
        if self.train_rows.num_samples == 0:
            raise PLDRError(f"{args.data} has no training rows of {self.seq_len + 1} tokens (empty data)")
        self.val_rows = RowSampler(self.data.val, self.seq_len, shuffle=False)
        self.monitor = Monitor(args.criticality_every, d, self.val_rows, self.detector)
        self.ckpt = CheckpointManager(args.out, d, keep=args.keep, tokenizer=self.data.tokenizer_path)
        resume_from = self._resume_point()
        self.warmup = self.identity["warmup"]

        model = build_model(self.config, seed=args.seed, g_file=args.g_file)
        if resume_from is not None:
            self.state = self.ckpt.load(resume_from, model)
            self.monitor.load_state(self.ckpt.read_state(resume_from).get("monitor"))
        else:
            self.state = TrainState()
            torch.manual_seed(args.seed)
        # Nothing has been written so far; from here on the run folder exists.
        self.ckpt.prepare(self.state.step)
        self._place(model)
        self.optimizer = build_optimizer(self.model, lr=args.lr, weight_decay=args.weight_decay, d=d)
        if resume_from is not None:
            self.ckpt.load_optimizer(resume_from, self.model, self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                         else contextlib.nullcontext())
        self.use_dag = any(c != 0 for c in self.config.dag)
        self.per_rank = args.batch_size // d.world
        self.micro = self.per_rank // args.grad_accum
        self.eval_every = args.eval_every or max(1, args.steps // 10)
        self.save_every = args.save_every or max(1, args.steps // 5)
        self.pad = self.config.pad_id

    def _resume_point(self) -> Path | None:
        """The step folder to resume from (None for a new run), after checking it is this run's."""
        run = self.ckpt.run
        if run.exists() and not run.is_dir():
            raise PLDRError(f"--out {run} exists and is not a folder")
        if not self.args.resume:
            if self.ckpt.holds_run():
                raise PLDRError(f"{run} already holds a run; pass --resume to continue it or choose a "
                                "new --out")
            return None
        path = self.ckpt.latest()
        if path is None:
            raise PLDRError(f"--resume: {run} holds no step-XXXXXXXX checkpoint to resume from")
        saved = self.ckpt.read_state(path)
        if self.args.warmup is None and "warmup" in saved.get("run", {}):
            # The default warm-up follows --steps; extending a run keeps the one it started with.
            self.identity["warmup"] = saved["run"]["warmup"]
        self.ckpt.check_same_run(path, saved, self.identity)
        return path

    def _place(self, model: torch.nn.Module) -> None:
        """Move to the device, compile (default on CUDA; fused metric path) and wrap: under torchrun each
        decoder layer is compiled, then wrapped (torchtitan's order); CUDA graphs need one process."""
        args, d = self.args, self.d
        model.to(d.device)
        model.train()
        use_compile = args.compile if args.compile is not None else d.device.type == "cuda"
        graphs = use_compile and args.compile_mode == "graphs" and d.device.type == "cuda" and not d.enabled
        self.compile_desc = "graphs" if graphs else "layers" if use_compile else "off"
        if use_compile:
            prepare_metric_path(model, d.device, metric_precision=args.metric_precision)
            if not graphs:
                for layer in model.decoder.dec_layers:
                    layer.compile()
        self.model = parallel.wrap(model, d, self.plan)
        if graphs:
            self.compiled = torch.compile(self.model, mode="reduce-overhead")

    def forward(self, x: torch.Tensor, **kw):
        """The model's forward; with CUDA graphs, outputs stay valid until the next call only."""
        if self.compiled is None:
            return self.model(x, **kw)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, **kw)

    def _rank_rows(self, sampler: RowSampler, start: int) -> torch.Tensor:
        """This rank's [per_rank, S+1] share of the global batch starting at sample ``start``."""
        return torch.from_numpy(sampler.batch(start + self.d.rank * self.per_rank, self.per_rank))

    # ---- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step from ``self.state``; advances it and returns the step's metrics record."""
        args, d = self.args, self.d
        t0 = time.perf_counter()
        lr = lr_at(self.state.step, lr=args.lr, warmup=self.warmup, steps=args.steps,
                   min_ratio=args.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = self._rank_rows(self.train_rows, self.state.samples_seen)
        n_global = float((rows[:, 1:] != self.pad).sum())  # counted on the host: no device sync
        if d.enabled:
            counts = torch.tensor([n_global], device=d.device, dtype=torch.float64)
            n_global = parallel.all_reduce_sum(counts, d).item()
        rows = rows.to(d.device)
        stats = torch.zeros(2, dtype=torch.float64, device=d.device)  # ce sum, correct
        # Logged DAG terms cost three matrix exponentials per layer: take them every DAG_LOG_EVERY
        # steps, at validations and at the end (every step when in the loss).
        nxt = self.state.step + 1
        log_dag = nxt % DAG_LOG_EVERY == 0 or nxt % self.eval_every == 0 or nxt == args.steps
        dag_log: dict[str, torch.Tensor] = {}
        for m in range(args.grad_accum):
            terms = self._micro_step(rows[m * self.micro:(m + 1) * self.micro], m, n_global, stats, log_dag)
            if terms is not None:
                dag_log = terms
        gnorm = parallel.grad_norm([p.grad for p in self.params if p.grad is not None])
        torch.nn.utils.clip_grad_value_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.samples_seen += args.batch_size
        self.state.tokens_seen += args.batch_size * self.seq_len
        return self._record(lr, stats, dag_log, n_global, gnorm, t0)

    def _micro_step(self, chunk: torch.Tensor, m: int, n_global: float, stats: torch.Tensor,
                    log_dag: bool) -> dict[str, torch.Tensor] | None:
        """Forward and backward of micro-batch ``m``; adds its ce sum and correct count to ``stats`` and
        returns the DAG terms to log (None when this micro-batch logs none)."""
        x, y = chunk[:, :-1], chunk[:, 1:]
        sync = m == self.args.grad_accum - 1
        dag_log = None
        with parallel.grad_sync(self.model, sync), self.autocast:
            out = self.forward(x, return_deductive=True)
            logits = out.logits.float()
            ce = token_cross_entropy(logits, y, self.pad)
            loss = ce * self.d.world / max(n_global, 1.0)
            if self.use_dag:
                terms = dag_terms(out.deductive)
                loss = add_dag_terms(loss, terms, self.config.dag, self.args.grad_accum)
                dag_log = {k: v.detach() for k, v in terms.items()}
            elif sync and log_dag:
                with torch.no_grad():
                    dag_log = dag_terms([{k: v.detach() for k, v in dd.items()} for dd in out.deductive])
        loss.backward()
        with torch.no_grad():
            stats += torch.stack([ce.detach().double(), correct_tokens(logits, y, self.pad).double()])
            if self.compiled is not None and m == 0 and not sync:
                # The first backward's gradients live in the CUDA-graph pool, which the next micro-batch
                # overwrites: take them out before accumulating more (later backwards add into these).
                for p in self.params:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
        return dag_log

    def _record(self, lr: float, stats: torch.Tensor, dag_log: dict, n_global: float, gnorm,
                t0: float) -> dict:
        """The step's metrics, summed over ranks; TrainingDiverged when the loss is not finite."""
        d, step = self.d, self.state.step
        dag_vec = torch.stack([dag_log[k].double() for k in sorted(dag_log)]) if dag_log else None
        parallel.all_reduce_sum(stats, d)
        if dag_vec is not None:
            parallel.all_reduce_sum(dag_vec, d)
        loss_value = stats[0].item() / max(n_global, 1.0)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"loss is {loss_value} at step {step}; lower --lr or check the "
                                   "data (the last checkpoint is kept)")
        dt = time.perf_counter() - t0  # loss_value's .item() waited for the step
        tokens = self.args.batch_size * self.seq_len
        rec = {"step": step, "loss": loss_value, "acc": stats[1].item() / max(n_global, 1.0), "lr": lr,
               "grad_norm": float(gnorm), "tokens_per_s": tokens / dt, "tokens_seen": self.state.tokens_seen}
        if dag_vec is not None:
            for k, v in zip(sorted(dag_log), dag_vec.tolist()):
                rec[f"dag_{k}"] = v / d.world
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Validation loss and accuracy over ``eval_batches`` batches (None without validation rows)."""
        args, d = self.args, self.d
        if self.val_rows.num_samples == 0:
            return None
        self.model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=d.device)
        n_batches = min(args.eval_batches, max(1, self.val_rows.num_samples // args.batch_size))
        for b in range(n_batches):
            start = (b * args.batch_size) % self.val_rows.num_samples
            rows = self._rank_rows(self.val_rows, start).to(d.device)
            x, y = rows[:, :-1], rows[:, 1:]
            with self.autocast:
                logits = self.forward(x).logits.float()
            ce = token_cross_entropy(logits, y, self.pad)
            total += torch.stack([ce.double(), correct_tokens(logits, y, self.pad).double(),
                                  (y != self.pad).sum().double()])
        parallel.all_reduce_sum(total, d)
        self.model.train()
        n = max(1.0, total[2].item())
        return {"val_loss": total[0].item() / n, "val_acc": total[1].item() / n}

    # ---- checkpoints and the loop ----------------------------------------------------------------
    def save(self, last: dict) -> Path:
        """A resumable step checkpoint of the current state."""
        path = self.ckpt.save(self.model, self.optimizer, self.state, identity=self.identity,
                              args=self.args.to_json(), last=last, meta=self._meta(last, "checkpoint"),
                              monitor=self.monitor.state())
        if self.d.is_main:
            self.on_event(f"saved {path}")
        return path

    def _meta(self, last: dict, kind: str) -> dict:
        args, data = self.args, self.data
        return {"created_by": "pldr pretrain", "kind": kind, "steps": self.state.step,
                "tokens_seen": self.state.tokens_seen,
                "data": {"path": str(Path(args.data).resolve()), "source": data.meta.get("source"),
                         "tokens": data.meta.get("tokens")},
                "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                "first_val_loss": self.state.first_val_loss, "train_args": args.to_json(),
                "parallel": {"plan": self.plan, "world_size": self.d.world, "compile": self.compile_desc},
                **self.monitor.summary()}

    def _log(self, rec: dict, *, event: str | None = None) -> None:
        """A metrics line (rank 0, while ``fit`` runs) passed to ``on_log``, or with ``event`` to
        ``on_event`` instead."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
            if event is None:
                self.on_log(rec)
        if event is not None and self.d.is_main:
            self.on_event(event)

    def record_loss(self, step: int, loss: float) -> dict | None:
        """Feed a step's loss to the spike detector; a spike is logged as its own metrics record
        (``kind`` "spike") and returned."""
        spike = self.monitor.spike(step, loss)
        if spike is not None:
            self._log(spike, event=f"loss spike at step {step}: {loss:.4f}, {spike['score']:.1f} median "
                                   f"absolute deviations above the running median {spike['median']:.4f}")
        return spike

    def fit(self) -> TrainResult:
        """Run from ``self.state`` to ``args.steps`` (or a stop request); validations, metrics lines,
        checkpoints and the final model directory on the way."""
        args, d = self.args, self.d
        t_start = time.perf_counter()
        last: dict = {}
        checkpoint, interrupted, val = None, False, None
        self._metrics = open(self.ckpt.metrics_path, "a") if d.is_main else None
        try:
            if self.state.step == 0:
                val = self.evaluate()
                if val is not None:
                    self.state.first_val_loss = val["val_loss"]
                    crit = self.monitor.probe(self.model) if self.monitor.probe_due(0, True) else {}
                    self._log({"step": 0, "tokens_seen": 0, **val, **crit})
            with Interrupt() as interrupt:
                while self.state.step < args.steps:
                    last = self.train_step()
                    step = self.state.step
                    validate = step % self.eval_every == 0 or step == args.steps
                    if validate:
                        val = self.evaluate()
                        if val is not None:
                            last.update(val)
                    if self.monitor.probe_due(step, validate and val is not None):
                        last.update(self.monitor.probe(self.model))
                    if step % args.log_every == 0 or step == args.steps or {"val_loss", "crit_op_A"} & set(last):
                        self._log(last)
                    self.record_loss(step, last["loss"])
                    stop = parallel.any_flag(interrupt.requested, d) or (
                        args.stop_after is not None and step >= args.stop_after)
                    if stop and step < args.steps:
                        checkpoint, interrupted = self.save(last), True
                        break
                    if step % self.save_every == 0 or step == args.steps:
                        checkpoint = self.save(last)
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
        final_dir = None
        if not interrupted:
            final_dir = self.ckpt.save_final(self.model, meta=self._meta(last, "final"))
            if final_dir is not None:
                self.on_event(f"saved {final_dir}")
        return TrainResult(steps_done=self.state.step, interrupted=interrupted, final_dir=final_dir,
                           checkpoint=checkpoint, last=last, first_val_loss=self.state.first_val_loss,
                           val_loss=(val or {}).get("val_loss"), elapsed_s=time.perf_counter() - t_start,
                           spikes=self.monitor.spikes)
