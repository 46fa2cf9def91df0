"""The one place matplotlib is loaded (lazily: it is optional) and PNGs are written."""

from __future__ import annotations

from pathlib import Path

from pldr_core.errors import PLDRError
from pldr_core.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend; a PLDRError saying how to install it when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise PLDRError("--plots needs matplotlib: pip install 'pldr[plots]' or pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it atomically as a PNG and close it."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    pyplot().close(fig)
    return path
