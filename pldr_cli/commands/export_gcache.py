"""pldr export-gcache: run the metric path on prompt(s) and write the G-cache file."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, is_terminal, print_json

EPILOG = """Examples:

  pldr export-gcache runs/tiny/final --out g-eos.safetensors

  pldr export-gcache runs/small/final --out g-mean.safetensors --prompts-file prompts.txt --reduce mean

  pldr export-gcache runs/small/final --out g.safetensors --prompt "the cat" --prompt "a dog" --json

The default prompt is the empty text, i.e. the EOS token alone. Text prompts are encoded as documents (followed by EOS). With several prompts the command reports how much G_LM varies across them, per layer: RMSE across prompts and RMSE / mean|G_LM| (small values: G_LM is nearly prompt-invariant, the paper's claim). Use the file with `pldr generate MODEL --gcache FILE`."""


def register(app: typer.Typer) -> None:
    app.command("export-gcache", epilog=EPILOG,
                help="Run the metric path on prompt(s) and write the G-cache file.")(export_gcache)


@handle_errors
def export_gcache(
    model: Path = typer.Argument(..., help="Model directory (ours or HF pldrllm) or reference .pth."),
    out: Path = typer.Option(..., "--out", "-o", help="G-cache file to write (.safetensors)."),
    prompt: list[str] = typer.Option(None, "--prompt", help="Prompt text (repeatable)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    tokens: list[str] = typer.Option(None, "--tokens", help="A prompt as raw token ids, e.g. '3' or "
                                     "'5,6,7' (repeatable; needs no tokenizer)."),
    reduce: str = typer.Option("first", "--reduce", help="first (the first prompt's G) or mean."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: the "
                                   "model directory's tokenizer.model)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from pldr_core.gcache_export import export_gcache_file

    data = export_gcache_file(model, out, texts=list(prompt or []), prompts_file=prompts_file,
                              token_prompts=list(tokens or []), reduce=reduce, tokenizer=tokenizer,
                              device=device)
    if as_json:
        print_json(data)
        return
    _render(data)


def _render(data: dict) -> None:
    c = console()
    c.print(f"wrote [bold]{data['path']}[/] ({data['num_layers']} layers x {data['num_heads']} heads x "
            f"head_dim {data['head_dim']}; {data['count']} prompt(s), reduce {data['reduction']}, "
            f"fingerprint {data['fingerprint']})", soft_wrap=True)
    if data["count"] < 2:
        c.print("one prompt: no spread across prompts to report (give several --prompt or "
                "--prompts-file to measure how prompt-invariant G_LM is)", soft_wrap=True)
        return
    if is_terminal():
        from rich.table import Table

        table = Table(title=f"G_LM across {data['count']} prompts", title_justify="left")
        for name in ("layer", "RMSE", "mean |G_LM|", "RMSE / mean|G_LM|"):
            table.add_column(name, justify="right")
        for row in data["spread"]:
            table.add_row(str(row["layer"]), f"{row['rmse']:.4g}", f"{row['mean_abs']:.4g}",
                          f"{row['rel_rmse']:.4g}")
        c.print(table)
    else:
        for row in data["spread"]:
            print(f"layer {row['layer']}: rmse {row['rmse']:.6g} mean_abs {row['mean_abs']:.6g} "
                  f"rel_rmse {row['rel_rmse']:.6g}")
