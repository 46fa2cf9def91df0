"""pldr tokenize: text in, token data folder out (tokenizer.model, train.bin, val.bin, meta.json)."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import LiveDisplay, console, handle_errors, is_terminal, print_json

EPILOG = """Examples:

  pldr tokenize --out data/tok --vocab-size 8000          (the embedded public-domain corpus)

  pldr tokenize books/ notes.txt --out data/tok --seq-len 512

  pldr tokenize corpus.jsonl --text-column body --out data/tok

  pldr tokenize shakespeare.txt --encoding latin-1 --out data/tok

  pldr tokenize saved_dataset/ --tokenizer data/tok/tokenizer.model --out data/tok2

  pldr tokenize hf:roneneldan/TinyStories --out data/stories     (needs the hub)
"""


def register(app: typer.Typer) -> None:
    app.command("tokenize", epilog=EPILOG,
                help="Train a tokenizer, encode and pack text into a token data folder. With no INPUT, "
                     "uses the embedded public-domain corpus.")(tokenize)


class _Bars(LiveDisplay):
    """A rich progress bar per stage in a terminal, plain lines otherwise."""

    def __init__(self):
        self.rich = is_terminal()
        self.tasks: dict[str, int] = {}
        self.last: dict[str, int] = {}
        if self.rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=console())

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.rich:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total)
            self.progress.update(self.tasks[stage], completed=done, total=total)
            return
        if stage not in self.last or done == total or (total and done - self.last[stage] >= total / 10):
            self.last[stage] = done
            typer.echo(f"{stage}: {done}" + (f"/{total}" if total else " ..."), err=True)


@handle_errors
def tokenize(
    inputs: list[str] = typer.Argument(None, metavar="[INPUT]...",
                                       help=".txt files or folders, .jsonl/.json/.parquet, a datasets "
                                            "save_to_disk folder, or hf:NAME[:CONFIG]. None: the "
                                            "embedded corpus."),
    out: Path = typer.Option(..., "--out", "-o", help="Token data folder to write."),
    vocab_size: int = typer.Option(32000, "--vocab-size", help="Tokenizer vocabulary (a small corpus may "
                                   "give fewer pieces; the actual size is reported)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Use this SentencePiece model instead of "
                                   "training one."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Tokens per stored row."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Share of rows kept for validation."),
    text_column: str = typer.Option("text", "--text-column", help="Text column of table inputs."),
    encoding: str = typer.Option("utf-8", "--encoding", help="Encoding of .txt/.jsonl/.json inputs, e.g. "
                                 "latin-1 for many older public-domain texts."),
    errors: str = typer.Option("strict", "--errors", help="Bytes the encoding cannot decode: strict (stop "
                               "and say where), replace (with U+FFFD) or ignore (drop them)."),
    json_out: bool = typer.Option(False, "--json", help="Print meta.json to stdout."),
) -> None:
    import time

    from pldr_core.data import tokenize_corpus

    t0 = time.perf_counter()
    with _Bars() as bars:
        meta = tokenize_corpus(inputs or [], out, vocab_size=vocab_size, tokenizer=tokenizer,
                               seq_len=seq_len, val_fraction=val_fraction, text_column=text_column,
                               encoding=encoding, encoding_errors=errors, progress=bars)
    if json_out:
        print_json(meta)
        return
    tok = meta["tokenizer"]
    size_note = ""
    if tok["trained"] and tok["vocab_size"] != vocab_size:
        size_note = f" (asked {vocab_size}; the corpus supports {tok['vocab_size']})"
    console().print(
        f"wrote [bold]{out}[/] in {time.perf_counter() - t0:.1f}s: {meta['documents']:,} documents, "
        f"{meta['tokens']:,} tokens, vocab {tok['vocab_size']:,}{size_note}, "
        f"{meta['rows']['train']:,} train / {meta['rows']['val']:,} val rows of {meta['seq_len']} "
        f"({meta['dtype']})")
