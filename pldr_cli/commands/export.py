"""pldr export: write a model in the Hugging Face "pldrllm" layout, the reference .pth, or ours, with a card."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, print_json

EPILOG = """Examples:

  pldr export runs/small/final --format hf --out export/small-hf

  pldr export runs/small/final --format hf --out export/small-hf --eval-results eval.json --license mit

  pldr export runs/small/final --format hf --out export/small-gcache --gcache g.safetensors

  pldr export runs/small/final --format pth --out export/small.pth

  pldr export runs/small/final --format pldr --out export/small --force

Formats:

  hf: config.json (model_type pldrllm, the port's field names), model.safetensors, generation_config.json, tokenizer.model (when the model has one) and README.md. The directory loads back with `pldr_core.load_model` and into the transformers port by tensor name. G modes map to the port's custom_G_type: learned -> None, identity -> "identity", fixed -> "external", random -> "random" (with its seed, so pldr reads it back as random); a frozen G travels as decoder.past_G_values. --gcache turns a learned model into a predefined-G ("external") one without its metric path; it reads back as g_mode fixed. Not carried over (the port has no field for them): the DAG loss coefficients, the unk id and the G-cache's file name (the card records it).

  pth: the reference training checkpoint (model_state_dict, optimizer_state_dict, loss, accuracy), readable with torch.load(weights_only=True), plus our config as a plain dict that the reference code ignores and pldr reads back. Learned G only: identity, random and fixed models are refused (the reference model always has its metric path). The reference code itself runs interleaved rope; a half-rope .pth reads back correctly in pldr only. No card (one file).

  pldr: our own layout (config.json, model.safetensors, meta.json, tokenizer.model) plus README.md.

The card (README.md) is written from meta.json: shape, parameter counts, G mode and G-cache provenance, data and token counts, final losses, the zero-shot scores of --eval-results (the JSON of `pldr eval --output`), the licence (HF YAML front matter) and how to load the model. An existing non-empty --out needs --force; the output is written atomically (all or nothing)."""


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EPILOG,
                help="Export a model to the Hugging Face layout, the reference .pth, or ours, with a card.")(export)


@handle_errors
def export(
    model: Path = typer.Argument(..., help="Model directory (ours or HF pldrllm) or reference .pth."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (a .pth file for --format pth)."),
    format: str = typer.Option("hf", "--format", "-f", help="hf, pth or pldr."),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty --out."),
    eval_results: Path = typer.Option(None, "--eval-results", help="JSON from `pldr eval --output`, for "
                                      "the card's zero-shot scores."),
    license: str = typer.Option("apache-2.0", "--license", help="Licence id for the card's front matter."),
    gcache: Path = typer.Option(None, "--gcache", help="With --format hf: a G-cache file that replaces a "
                                "learned model's metric path (custom_G_type external)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model to include (default: "
                                   "the model directory's tokenizer.model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from pldr_core.export import export_model

    result = export_model(model, out, format=format, force=force, license=license,
                          eval_results=eval_results, gcache=gcache, tokenizer=tokenizer)
    data = result.summary()
    if as_json:
        print_json(data)
        return
    g = f"g_mode {data['g_mode']}"
    if data["format"] == "hf":
        g += f", custom_G_type {data['custom_G_type']}"
    console().print(f"wrote [bold]{data['path']}[/] ({data['format']}; {g}): {', '.join(data['files'])}",
                    soft_wrap=True)
