"""pldr_core: the PLDR-LLM library under the ``pldr`` command-line toolkit.

The small public API for scripts::

    from pldr_core import load_model
    model = load_model("runs/tiny/final")        # our model directory, a HF "pldrllm" dir, or a .pth
    out = model(tokens)                          # tokens: LongTensor [B, S]
    out.logits                                   # [B, S, V]
    model(tokens, return_deductive=True).deductive[0]["G_LM"]   # [B, H, dk, dk] of layer 0

Everything heavy (torch) is imported lazily so that ``import pldr_core`` stays cheap.
"""

from pldr_core._version import __version__
from pldr_core.errors import PLDRError

__all__ = ["PLDRError", "__version__", "load_model", "PLDRConfig", "PLDRModel"]


def __getattr__(name):
    if name == "load_model":
        from pldr_core.checkpoint import load_model

        return load_model
    if name == "PLDRConfig":
        from pldr_core.config import PLDRConfig

        return PLDRConfig
    if name == "PLDRModel":
        from pldr_core.model import PLDRModel

        return PLDRModel
    raise AttributeError(f"module 'pldr_core' has no attribute {name!r}")
