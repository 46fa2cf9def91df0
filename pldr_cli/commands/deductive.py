"""pldr inspect-deductive (alias: pldr inspect): the deductive outputs A_LM, A_P, G_LM in float64."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, is_terminal

EPILOG = """Examples:

  pldr inspect-deductive runs/tiny/final

  pldr inspect runs/tiny/final --prompt "The cat sat" --prompt "" --json inspect.json

  pldr inspect runs/tiny/final --prompts-file prompts.txt --plots plots/ --dump deductive.safetensors

  pldr inspect runs/tiny/final --data data/tok --samples 16 --gcache gcache.safetensors

An empty --prompt (or a blank line in --prompts-file) is the EOS token alone, the prompt export-gcache
uses by default. Without prompts: the EOS-only prompt plus a few built-in sentences.
"""

HELP = ("Per layer and head, in float64: det, log|det|, rank, RMSE across prompts, asymmetry, min entry "
        "and DAG terms of A_LM, A_P and G_LM, and how exactly the KV/G caches reproduce them.")


def register(app: typer.Typer) -> None:
    app.command("inspect-deductive", epilog=EPILOG, help=HELP)(inspect_deductive)
    app.command("inspect", epilog=EPILOG, help="Alias of inspect-deductive.")(inspect_deductive)


def _num(x, sep: str = " / ") -> str:
    if x is None:
        return "-"
    if isinstance(x, (tuple, list)):
        return sep.join(_num(v) for v in x)
    if isinstance(x, int):
        return str(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return f"{x:.3g}"


def _agree(a: dict) -> str:
    if a["identical"]:
        return "identical (0.0)"
    return f"{a['max_abs_diff']:.3e} ({a['equal_decimals']} equal decimals)"


@handle_errors
def inspect_deductive(
    model: Path = typer.Argument(..., help="Model directory, HF pldrllm directory or .pth file."),
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeatable; '' = EOS alone)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line."),
    data: Path = typer.Option(None, "--data", help="A token data folder (pldr tokenize): sample rows."),
    samples: int = typer.Option(8, "--samples", help="With --data: how many rows to sample."),
    seed: int = typer.Option(0, "--seed", help="With --data: seed of the row sample."),
    max_len: int = typer.Option(None, "--max-len", help="Cut prompts to this many tokens "
                                "(default: the model's context minus --new-tokens)."),
    gcache: Path = typer.Option(None, "--gcache", help="A G-cache file to compare against."),
    force: bool = typer.Option(False, "--force", help="Accept a G-cache made from another model."),
    new_tokens: int = typer.Option(4, "--new-tokens", help="Decode steps for the logit comparison."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (float64 either way)."),
    json_out: Path = typer.Option(None, "--json", help="Write every figure per layer and head here."),
    dump: Path = typer.Option(None, "--dump", help="Write the tensors here (safetensors)."),
    plots: Path = typer.Option(None, "--plots", help="Write PNG heatmaps of G_LM and the RMSE plot here."),
) -> None:
    from pldr_core.deductive_report import run_inspection

    kwargs = dict(prompts=prompt, prompts_file=prompts_file, data_dir=data, samples=samples, seed=seed,
                  max_len=max_len, gcache=gcache, force=force, new_tokens=new_tokens, device=device,
                  json_out=json_out, dump=dump, plots=plots)
    if is_terminal():
        from rich.progress import Progress

        with Progress(transient=True, console=console(stderr=True)) as bar:
            task = None

            def progress(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = bar.add_task("inspecting", total=total)
                bar.update(task, completed=done)

            result, written = run_inspection(model, progress=progress, **kwargs)
    else:
        result, written = run_inspection(model, **kwargs)
    _render(result.report, written)


def _render(report: dict, written: list) -> None:
    from rich.table import Table

    from pldr_core.deductive_report import summary_rows

    c = console()
    c.soft_wrap = True
    rows = summary_rows(report)
    n = len(report["prompts"])
    title = (f"deductive outputs, g_mode {report['g_mode']}, {report['dtype']}, {n} prompt(s); heads "
             f"summarised: means, det min..max, rank min")
    if is_terminal():
        wide = c.width >= 140
        keys = [k for k in rows[0]["tensors"][report["tensors"][0]]
                if wide or k not in ("det min..max", "min", "cache |diff|")]
        table = Table(title=title, title_justify="left")
        table.add_column("layer", justify="right")
        table.add_column("tensor")
        for key in keys:
            table.add_column(key, justify="right")
        for row in rows:
            names = list(row["tensors"])
            cells = ["\n".join(_num(row["tensors"][nm][k], "..") for nm in names) for k in keys]
            table.add_row(str(row["layer"]), "\n".join(names), *cells, end_section=True)
        c.print(table)
    else:
        c.print(title)
        for row in rows:
            for nm, figs in row["tensors"].items():
                c.print(f"  layer {row['layer']} {nm}: " + "; ".join(f"{k} {_num(v, '..')}"
                                                                    for k, v in figs.items()))
    for note in report["notes"]:
        c.print(f"note: {note}")
    fid = report["fidelity"]
    c.print(f"cache fidelity (cached path vs uncached forward, float64; reference decode mode "
            f"{fid['reference']}, {fid['new_tokens']} teacher-forced steps):")
    for nm, a in fid["deductive"].items():
        worst = max(fid["stats"][nm].items(), key=lambda kv: kv[1]["max_abs_diff"])
        stats = ("identical" if worst[1]["max_abs_diff"] == 0 else
                 f"max |diff| {worst[1]['max_abs_diff']:.3e} ({worst[0]})")
        c.print(f"  {nm}: tensors {_agree(a)}; statistics {stats}")
    for mode, a in fid["logits"].items():
        c.print(f"  logits {mode} vs {fid['reference']}: max |diff| {_agree(a)}, first step "
                f"{a['first_step_max_abs_diff']:.3e}, argmax equal: {a['argmax_equal']}")
    c.print("  DAG terms (mean over layers): " + ", ".join(f"{k} {_num(v)}" for k, v in report["dag_terms"].items()))
    if "gcache_file" in report:
        c.print("  G-cache file against each prompt (max over layers and heads): |G_LM(file) - G_LM(prompt)|, "
                "|logits(KV + file G) - logits(KV + prefill G)|:")
        for p, prompt in enumerate(report["prompts"]):
            g = max(e["gcache_file"]["G_LM"]["per_prompt_max_abs_diff"][p] for e in report["entries"])
            lg = fid["logits"]["kv+gfile"]["per_prompt_max_abs_diff"][p]
            c.print(f"    {prompt['label'][:40]!r}: G_LM {g:.3e}, logits {lg:.3e}")
    for kind, path in written:
        c.print(f"wrote {kind}: {path}")
