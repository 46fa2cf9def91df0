"""pldr criticality: the order parameter of the deductive outputs and per-head diagnostics."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, fail, handle_errors, is_terminal

EPILOG = """Examples:

  pldr criticality runs/small/final --samples 100 --json crit.json --plots crit/

  pldr criticality runs/tiny/final --data data/tok --samples 8 --new-tokens 32

  pldr criticality runs/small/final --prompts-file prompts.txt --top-p 0.9 --seed 1

Without --prompts-file or --data, the prompts are documents of the embedded corpus (the model needs
its tokenizer.model for that). OP(X) = sqrt(mean((X_1 - X_C)^2)) / |mean(X_C)| pooled over samples,
layers, heads and the dk x dk grid: X_1 from a sampled continuation, X_C from the prompt alone.
"""

HELP = ("The criticality order parameter OP of A, A_LM, A_P and G_LM (sampled continuation against "
        "the prompt alone), per-layer OP, per-head diagnostics and the G-cache drift.")


def register(app: typer.Typer) -> None:
    app.command("criticality", epilog=EPILOG, help=HELP)(criticality)


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


@handle_errors
def criticality(
    model: Path = typer.Argument(..., help="Model directory, HF pldrllm directory or .pth file."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line."),
    data: Path = typer.Option(None, "--data", help="A token data folder (pldr tokenize): sample rows."),
    samples: int = typer.Option(100, "--samples", help="How many prompts."),
    max_prompt_tokens: int = typer.Option(256, "--max-prompt-tokens", help="Cut prompts to this many tokens."),
    new_tokens: int = typer.Option(256, "--new-tokens", help="Tokens sampled per run (fewer at EOS)."),
    top_p: float = typer.Option(0.8, "--top-p", help="Nucleus sampling threshold of runs 1 and 2."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature of runs 1 and 2."),
    seed: int = typer.Option(0, "--seed", help="Run 1 samples with this seed, run 2 with seed + 1."),
    drift_tokens: int = typer.Option(16, "--drift-tokens", help="eps_G after each of the first N new "
                                     "tokens of run 1 (one forward pass each; 0 skips it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_out: Path = typer.Option(None, "--json", help="Write the whole result here (with the token ids)."),
    plots: Path = typer.Option(None, "--plots", help="Write PNGs here: OP per layer, eps_G, entropy per head."),
) -> None:
    from pldr_core import criticality as lib
    from pldr_core.checkpoint import load_config

    protocol = lib.Protocol(samples=samples, max_prompt_tokens=max_prompt_tokens, new_tokens=new_tokens,
                            top_p=top_p, temperature=temperature, seed=seed, drift_tokens=drift_tokens)
    protocol.check()
    load_config(model)
    if json_out is not None and json_out.is_dir():
        raise fail(f"--json {json_out} is a folder; give a file path")
    if plots is not None and plots.exists() and not plots.is_dir():
        raise fail(f"--plots {plots} exists and is not a folder")
    from pldr_core.prompts import find_tokenizer

    tokenizer = None if data is not None else find_tokenizer(model, required=False)
    prompts, protocol.source = lib.collect_prompts(samples=samples, seed=seed, tokenizer=tokenizer,
                                                   prompts_file=prompts_file, data_dir=data)

    from pldr_core.checkpoint import load_model
    from pldr_core.device import resolve_device

    m = load_model(model, device=resolve_device(device))
    if is_terminal():
        from rich.progress import Progress

        with Progress(transient=True, console=console(stderr=True)) as bar:
            task = bar.add_task("criticality", total=len(prompts))

            def progress(stage, done, total):
                bar.update(task, description=stage, completed=done, total=total)

            result = lib.measure_criticality(m, prompts, protocol, progress=progress)
    else:
        result = lib.measure_criticality(m, prompts, protocol)
    written = []
    if json_out is not None:
        written.append(("json", lib.write_json(json_out, result)))
    if plots is not None:
        written += [("plot", p) for p in lib.write_plots(plots, result)]
    _render(result, written)


def _render(result, written) -> None:
    from rich.table import Table

    from pldr_core.criticality import reading

    c = console()
    c.soft_wrap = True
    p = result.protocol
    table = Table(title=f"order parameter, g_mode {p.g_mode}, {len(result.samples)} sample(s), up to "
                        f"{p.new_tokens} new tokens, top-p {p.top_p}, temperature {p.temperature}",
                  title_justify="left")
    for col in ("tensor", "OP (1 vs C)", "OP_12 (1 vs 2)", "mean 1", "std 1", "mean 2", "std 2",
                "mean C", "std C"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for kind, op in result.order_parameter.items():
        s = result.stats
        table.add_row(kind, _g(op), _g(result.order_parameter_12[kind]),
                      *(_g(s[r][kind][m]) for r in ("1", "2", "C") for m in ("mean", "std")))
    c.print(table)
    layers = Table(title="OP per layer (run 1 vs C)", title_justify="left")
    layers.add_column("layer", justify="right")
    for kind in result.order_parameter:
        layers.add_column(kind, justify="right")
    for row in result.per_layer:
        layers.add_row(str(row["layer"]), *(_g(row["order_parameter"][k]) for k in result.order_parameter))
    c.print(layers)
    if result.eps_G:
        last = result.eps_G[-1]
        c.print(f"G-cache drift after {last['t']} new token(s): eps_G per layer "
                + ", ".join(_g(e) for e in last["eps_G"]))
    for note in result.notes:
        c.print(f"note: {note}")
    c.print(reading(result))
    for kind, path in written:
        c.print(f"wrote {kind}: {path}")
