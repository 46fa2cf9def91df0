"""pldr doctor: check a model directory (and optionally a G-cache) in full."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, print_json

EPILOG = """Examples:

  pldr doctor runs/tiny/final

  pldr doctor runs/tiny/final --gcache g-eos.safetensors --json

Exit status 2 when any check fails.
"""

_STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


def register(app: typer.Typer) -> None:
    app.command("doctor", epilog=EPILOG, help="Check a model directory: config, weights against the config, "
                "tokenizer, meta.json, and a G-cache against the model.")(doctor)


@handle_errors
def doctor(
    model: Path = typer.Argument(..., help="Model directory, HF pldrllm directory or .pth file."),
    gcache: Path = typer.Option(None, "--gcache", help="G-cache file to check against the model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from pldr_core.doctor import ERROR, check_model

    findings = check_model(model, gcache=gcache)
    failed = any(f.status == ERROR for f in findings)
    if as_json:
        print_json({"model": str(model), "ok": not failed, "findings": [f.to_dict() for f in findings]})
    else:
        from rich.table import Table

        table = Table(title=str(model), title_justify="left")
        for column in ("check", "status", "detail"):
            table.add_column(column)
        for f in findings:
            table.add_row(f.check, f"[{_STYLE[f.status]}]{f.status}[/]", f.detail)
        console().print(table)
    if failed:
        raise typer.Exit(2)
