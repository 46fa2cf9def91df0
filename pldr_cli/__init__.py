"""pldr_cli: the ``pldr`` command-line app (Typer). Parses, validates, calls pldr_core, renders."""
