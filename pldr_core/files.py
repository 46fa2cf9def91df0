"""Atomic file and folder writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from pldr_core.errors import PLDRError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(tmp, is_dir: bool = False) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result the usual permissions.
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PLDRError(f"cannot write {path}: a file stands where a folder of its path should be") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary sibling path to write a file to; rename it onto ``path`` on success."""
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling folder; on success it replaces ``path`` (old contents removed)."""
    path = Path(path)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_text_lines(path, what: str = "file") -> list[str]:
    """The lines of a UTF-8 text file; PLDRError (naming ``what``) when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise PLDRError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PLDRError(f"cannot read {what} {path} as UTF-8 text ({exc})") from None


def json_safe(obj):
    """``obj`` with NaN and +-inf (a log|det| of a singular matrix, an undefined ratio) as None, so
    that it serialises as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj, *, indent: int = 1) -> Path:
    """``obj`` as strict JSON (``json_safe``), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")
    return path
