"""Up-front checks that a text input decodes, so a bad byte is reported before any heavy work."""

from __future__ import annotations

import codecs
from pathlib import Path

from pldr_core.errors import PLDRError

ENCODING_ERRORS = ("strict", "replace", "ignore")


def check_codec(encoding: str, errors: str) -> None:
    """PLDRError naming the option when ``encoding`` is no known codec or ``errors`` no policy."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise PLDRError(f"--encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, "
                        "cp1252)") from None
    if errors not in ENCODING_ERRORS:
        raise PLDRError(f"--errors {errors!r}: choose one of {', '.join(ENCODING_ERRORS)}")


def check_decodes(file: str | Path, encoding: str = "utf-8", chunk: int = 1 << 20) -> None:
    """Decode ``file`` in chunks; PLDRError with the byte offset and line of the first bad byte."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    with open(file, "rb") as fh:
        while True:
            data = fh.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                # the decoder sees the bytes it held back from the last chunk followed by this one
                bad = offset - (len(exc.object) - len(data)) + exc.start
                byte = exc.object[exc.start:exc.start + 1].hex()
                raise PLDRError(f"{file} is not valid {encoding} text: byte 0x{byte} at offset {bad:,} "
                                f"(line {_line_of(file, bad):,}); pass its encoding, e.g. --encoding latin-1, "
                                "or --errors replace") from None
            if not data:
                return
            offset += len(data)


def _line_of(file: str | Path, offset: int) -> int:
    with open(file, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1
