"""pldr pretrain: train a PLDR-LLM on a token data folder (one process, one GPU, or torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pldr_cli._common import LiveDisplay, console, handle_errors, is_terminal
from pldr_core.errors import PLDRError

EPILOG = """Examples:

  pldr tokenize --out data/tok --vocab-size 8000
  pldr pretrain --data data/tok --out runs/tiny --preset tiny --steps 200

  pldr pretrain --data data/tok --out runs/small --preset small --steps 5000 --batch-size 64 --lr 1e-3

  pldr pretrain --data data/tok --out runs/small --preset small --steps 5000 --resume

  pldr pretrain --data data/tok --out runs/sdpa --g-mode identity --dag 0.005,0.005,0.005

  torchrun --nproc-per-node 4 -m pldr_cli pretrain --data data/tok --out runs/p110 --preset paper-110m

  torchrun --nproc-per-node 4 -m pldr_cli pretrain --data data/tok --out runs/p110 --parallel fsdp

Ctrl-C stops at the end of the current step and saves a checkpoint that --resume continues exactly.
"""


def register(app: typer.Typer) -> None:
    app.command("pretrain", epilog=EPILOG,
                help="Pretrain a PLDR-LLM: AdamW, warm-up + cosine, checkpoints that resume exactly, "
                     "DDP or FSDP2 under torchrun.")(pretrain)


def _parse_dag(text: str | None):
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise PLDRError(f"--dag takes three numbers L1,L2,L3, got {text!r}") from None
    if len(values) != 3:
        raise PLDRError(f"--dag takes three numbers L1,L2,L3, got {text!r}")
    return values


def _op(rec: dict) -> str:
    """The criticality probe's OP(G_LM) for a progress line ('' on steps without a probe)."""
    if "crit_op_G_LM" not in rec:
        return ""
    value = rec["crit_op_G_LM"]
    return " OP(G_LM) " + ("n/a" if value is None else f"{value:.4f}")


class _Display(LiveDisplay):
    """Rank 0: a rich progress line in a terminal, plain lines otherwise."""

    def __init__(self, steps: int, start_note: str):
        self.steps = steps
        self.rich = is_terminal()
        self.con = console()
        self.note = start_note  # printed with the first record, so bad input stays a single line
        self.every = max(1, steps // 20)
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.con)
            self.task = self.progress.add_task("train", total=steps, info="")

    def _announce(self) -> None:
        if self.note:
            (self.progress.console if self.rich else self.con).print(self.note, soft_wrap=True, markup=False)
            self.note = None

    def log(self, rec: dict) -> None:
        self._announce()
        if "loss" not in rec:
            self.con.print(f"step {rec['step']}: val_loss {rec['val_loss']:.4f}{_op(rec)}")
            return
        info = (f"loss {rec['loss']:.4f} acc {rec['acc']:.3f} lr {rec['lr']:.2e} "
                f"|g| {rec['grad_norm']:.2f} {rec['tokens_per_s']:,.0f} tok/s")
        if "val_loss" in rec:
            info += f" val {rec['val_loss']:.4f}"
        info += _op(rec)
        if self.rich:
            self.progress.update(self.task, completed=rec["step"], info=info)
            if "val_loss" in rec:
                self.progress.console.print(f"step {rec['step']}: {info}")
        elif (rec["step"] % self.every == 0 or rec["step"] == self.steps
              or {"val_loss", "crit_op_G_LM"} & set(rec)):
            typer.echo(f"step {rec['step']}/{self.steps}: {info}")

    def event(self, text: str) -> None:
        self._announce()
        # Paths are printed whole (never wrapped) so that they can be copied.
        (self.progress.console if self.rich else self.con).print(text, style="dim", soft_wrap=True,
                                                                 markup=False)


@handle_errors
def pretrain(
    data: Path = typer.Option(..., "--data", "-d", help="Token data folder from `pldr tokenize`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (metrics.jsonl, step-*/ , final/)."),
    preset: str = typer.Option("tiny", "--preset", "-p", help="tiny, small or paper-110m."),
    config: Path = typer.Option(None, "--config", help="A config.json instead of a preset."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size", help="Global rows per step (split over GPUs and "
                                   "--grad-accum)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step on each process."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per row (default: the model context)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate, cosine to 0.1x at the last step "
                             "(default 3e-3 for tiny, 1e-3 otherwise)."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up steps (default: steps/10, at most 1000)."),
    g_mode: str = typer.Option(None, "--g-mode", help="learned, identity, random or fixed."),
    g_file: Path = typer.Option(None, "--g-file", help="G-cache file for --g-mode fixed."),
    dag: str = typer.Option(None, "--dag", help="DAG loss coefficients L1,L2,L3 for A_LM, A_P, G_LM."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    parallel: str = typer.Option("auto", "--parallel", help="Under torchrun: ddp (a model replica per "
                                 "process), fsdp (FSDP2 sharding; CUDA only) or auto (ddp)."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (see "
                                 "--compile-mode), with the fused (Triton) metric path on CUDA (default: on "
                                 "for CUDA, one process or torchrun; off on CPU)."),
    compile_mode: str = typer.Option("graphs", "--compile-mode",
                                     help="With --compile on one CUDA process: graphs (whole model, CUDA "
                                     "graphs; default) or layers (each decoder layer, as under torchrun)."),
    metric_precision: str = typer.Option("bf16", "--metric-precision",
                                         help="With --compile on CUDA: the metric path's GLU matmuls with "
                                         "bf16 operands (default; the fastest), tf32 or fp32. All train "
                                         "like fp32 under bf16 autocast (README: Metric-path precision)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest RUN/step-* checkpoint."),
    eval_every: int = typer.Option(None, "--eval-every", help="Validation every N steps (default steps/10)."),
    eval_batches: int = typer.Option(8, "--eval-batches", help="Batches per validation."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (default steps/5)."),
    keep: int = typer.Option(2, "--keep", help="Step checkpoints to keep."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the data order."),
    criticality_every: int = typer.Option(None, "--criticality-every",
                                          help="Criticality probe (OP(G_LM), OP(A) on 8 validation rows) "
                                          "every N steps (default: at each validation; 0: off)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic algorithms and "
                                       "every generator seeded: repeated runs give bitwise equal weights."),
) -> None:
    from pldr_core.training import TrainArgs
    from pldr_core.training import pretrain as run_pretrain

    args = TrainArgs(data=str(data), out=str(out), preset=preset,
                     config_file=str(config) if config else None, steps=steps, batch_size=batch_size,
                     grad_accum=grad_accum, seq_len=seq_len, lr=lr, warmup=warmup, g_mode=g_mode,
                     g_file=str(g_file) if g_file else None, dag=_parse_dag(dag), device=device,
                     parallel=parallel, compile=compile, compile_mode=compile_mode,
                     metric_precision=metric_precision, resume=resume, eval_every=eval_every,
                     eval_batches=eval_batches, save_every=save_every, keep=keep, seed=seed,
                     criticality_every=criticality_every, deterministic=deterministic)
    main = int(os.environ.get("RANK", "0")) == 0
    note = f"pretrain {'resume ' if resume else ''}{preset if not config else config} on {data} -> {out}"
    if main:
        with _Display(steps, note) as disp:
            result = run_pretrain(args, on_log=disp.log, on_event=disp.event)
    else:
        result = run_pretrain(args)
    if main:
        _summary(result)


def _summary(result) -> None:
    """The closing lines; paths are printed whole (never wrapped) so that they can be copied."""
    from rich.text import Text

    con = console()
    if result.interrupted:
        con.print(f"stopped at step {result.steps_done}; checkpoint {result.checkpoint}; continue with "
                  "the same command and --resume", soft_wrap=True, markup=False)
        raise typer.Exit(130)
    last = result.last
    parts = [f"done: {result.steps_done} steps in {result.elapsed_s:.1f}s"]
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if result.first_val_loss is not None and result.val_loss is not None:
        parts.append(f"val_loss {result.first_val_loss:.4f} -> {result.val_loss:.4f}")
    con.print(Text.assemble(", ".join(parts) + "; model in ", (str(result.final_dir), "bold")),
              soft_wrap=True)
