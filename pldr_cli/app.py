"""The ``pldr`` Typer app. Each command lives in ``pldr_cli/commands/<name>.py`` and exposes
``register(app)``; torch and friends are imported inside command bodies so --help stays instant."""

from __future__ import annotations

import importlib
import logging

import typer

from pldr_cli import _common

app = typer.Typer(
    name="pldr",
    help="Toolkit for PLDR-LLMs: tokenize, pretrain, export the G-cache, generate, eval, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Order here is the order in --help.
COMMANDS = ("init_model", "info", "doctor", "tokenize", "pretrain", "export_gcache", "generate", "eval",
            "deductive", "criticality", "bench", "export", "push", "serve")


class _WarningLine(logging.Handler):
    """The library's warnings (e.g. an unknown config field) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {record.getMessage()}", err=True)


def _show_library_warnings() -> None:
    logger = logging.getLogger("pldr_core")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))


def _print_version(value: bool) -> None:
    if value:
        from pldr_core import __version__

        typer.echo(f"pldr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    _common.STATE["debug"] = debug
    _show_library_warnings()


for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"pldr_cli.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"pldr_cli.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    app()
