"""pldr info: config, parameter counts, G mode, rope style, files."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, fail, handle_errors, print_json

EPILOG = """Examples:

  pldr info runs/tiny/final

  pldr info --preset paper-110m --g-mode identity --json

  pldr info path/to/hf-pldrllm-dir
"""


def register(app: typer.Typer) -> None:
    app.command("info", epilog=EPILOG, help="Describe a model directory or a preset.")(info)


@handle_errors
def info(
    model: Path = typer.Argument(None, help="Model directory, HF pldrllm directory or .pth file."),
    preset: str = typer.Option(None, "--preset", "-p", help="Describe a preset instead of a model."),
    g_mode: str = typer.Option(None, "--g-mode", help="With --preset: the G mode to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from pldr_core.inventory import describe

    if (model is None) == (preset is None):
        raise fail("give either a MODEL path or --preset")
    if g_mode is not None and preset is None:
        raise fail("--g-mode only applies with --preset")
    data = describe(model=model, preset=preset, g_mode=g_mode)
    if as_json:
        print_json(data)
        return
    from rich.table import Table

    c = console()
    table = Table(title=data["source"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layout", data["layout"])
    table.add_row("g_mode", data["config"]["g_mode"])
    table.add_row("rope", data["config"]["rope_style"])
    table.add_row("parameters", f"{data['params_total']:,}")
    table.add_row("metric path", f"{data['params_metric']:,}")
    cfg = data["config"]
    shape = (f"L {cfg['num_layers']}, H {cfg['num_heads']}, dk {cfg['head_dim']}, d {cfg['d_model']}, "
             f"dff {cfg['dff']}, A_dff {cfg['A_dff']}, {cfg['num_reslayerA']}x{cfg['num_denseA']} "
             f"residual GLUs, V {cfg['vocab_size']}, context {cfg['max_seq_len']}")
    table.add_row("shape", shape)
    for name, size in data.get("files", {}).items():
        table.add_row("file", f"{name} ({size:,} bytes)")
    if data.get("tokenizer") is False:
        table.add_row("tokenizer", "none (generate/eval need one: pldr init --tokenizer ...)")
    c.print(table)
