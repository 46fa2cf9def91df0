"""Shared CLI plumbing: error handling (one line, exit 2 for bad input), consoles, small renderers."""

from __future__ import annotations

import functools
import json
import sys
import traceback

import typer

STATE = {"debug": False}


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one error line to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn PLDRError into one line + exit 2, other failures into one line + exit 1 (traceback with
    --debug), Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pldr_core.errors import PLDRError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except PLDRError as exc:
            if STATE["debug"]:
                traceback.print_exc()
            raise fail(str(exc), 2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # a real failure: keep it to one line unless --debug
            if STATE["debug"]:
                traceback.print_exc()
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise fail(f"{type(exc).__name__}: {msg} (rerun with --debug for the traceback)", 1) from None

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def is_terminal() -> bool:
    return sys.stdout.isatty()


class LiveDisplay:
    """Base of the commands' progress displays: subclasses set ``self.progress`` to a rich Progress
    in a terminal (None otherwise); this enters and leaves it with the display."""

    progress = None

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
