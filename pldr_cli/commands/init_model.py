"""pldr init: a randomly initialised model directory."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, fail, handle_errors

EPILOG = """Examples:

  pldr init --preset tiny --out models/tiny

  pldr init --preset paper-110m --g-mode identity --out models/sdpa-110m --seed 1

  pldr init --preset small --tokenizer data/tokenizer.model --out models/small
"""


def register(app: typer.Typer) -> None:
    app.command("init", epilog=EPILOG, help="Create a randomly initialised model directory.")(init)


@handle_errors
def init(
    preset: str = typer.Option("tiny", "--preset", "-p", help="tiny, small or paper-110m."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    g_mode: str = typer.Option("learned", "--g-mode", help="learned, identity, random or fixed."),
    g_file: Path = typer.Option(None, "--g-file", help="G-cache file for --g-mode fixed."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model to include."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="Override the preset's vocabulary size "
                                   "(default: the tokenizer's size when --tokenizer is given)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation."),
) -> None:
    from pldr_core.build import init_model_dir

    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} exists and is not a folder")
    path, model = init_model_dir(preset=preset, out=out, g_mode=g_mode, g_file=g_file,
                                 tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
    console().print(f"wrote [bold]{path}[/] ({model.config.name}, g_mode {model.config.g_mode}, "
                    f"{model.num_params():,} parameters)")
