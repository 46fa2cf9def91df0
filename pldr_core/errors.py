"""The one exception type for problems the user can fix (bad path, bad shape, bad value).

The CLI turns it into a single line on stderr and exit status 2; anything else is a bug and keeps
its traceback under ``--debug``.
"""


class PLDRError(ValueError):
    """Bad input or bad usage: the message says what is wrong and how to fix it."""
