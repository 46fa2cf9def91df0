"""The G-cache file (SPEC section 3): safetensors with ``layers.{i}.G_LM`` and ``layers.{i}.A_LM``
([H, dk, dk] float32 each) and string metadata that ties it to the model it came from."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from pldr_core import __version__
from pldr_core.cache import GCache
from pldr_core.errors import PLDRError
from pldr_core.io import atomic_path

FORMAT = "pldr-gcache"
FORMAT_VERSION = "1"


def write_gcache(path: str | Path, A_LM: torch.Tensor, G_LM: torch.Tensor, *, fingerprint: str,
                 how: dict | None = None) -> Path:
    """Write [L, H, dk, dk] A_LM and G_LM with their metadata, atomically."""
    from safetensors.torch import save_file

    if A_LM.shape != G_LM.shape or G_LM.dim() != 4:
        raise PLDRError("A_LM and G_LM must both be [L, H, dk, dk]")
    L, H, dk, _ = G_LM.shape
    tensors = {}
    for i in range(L):
        tensors[f"layers.{i}.G_LM"] = G_LM[i].detach().to("cpu", torch.float32).contiguous()
        tensors[f"layers.{i}.A_LM"] = A_LM[i].detach().to("cpu", torch.float32).contiguous()
    how = dict(how or {})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_layers": str(L),
        "num_heads": str(H),
        "head_dim": str(dk),
        "fingerprint": fingerprint,
        "prompts": json.dumps(how.pop("prompts", [])),
        "count": str(how.pop("count", 1)),
        "reduction": str(how.pop("reduction", "first")),
        "toolkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update({k: str(v) for k, v in how.items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_gcache(path: str | Path, model=None, *, force: bool = False) -> GCache:
    """Read a G-cache file into a filled ``GCache`` (source 'file').

    With ``model`` given, shapes must match it, and so must the fingerprint unless ``force`` (a
    same-shape foreign G, for transfer experiments).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise PLDRError(f"G-cache file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise PLDRError(f"{path} is not a pldr G-cache file (metadata format is "
                                f"{meta.get('format')!r}; make one with `pldr export-gcache`)")
            L = int(meta["num_layers"])
            G = torch.stack([fh.get_tensor(f"layers.{i}.G_LM") for i in range(L)])
            A = torch.stack([fh.get_tensor(f"layers.{i}.A_LM") for i in range(L)])
    except PLDRError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PLDRError(f"{path} is not a readable G-cache file ({type(exc).__name__}: {exc})") from None
    H, dk = int(meta["num_heads"]), int(meta["head_dim"])
    if tuple(G.shape) != (L, H, dk, dk) or A.shape != G.shape:
        raise PLDRError(f"{path}: tensors {list(G.shape)} disagree with its metadata "
                        f"({L} layers, {H} heads, head_dim {dk})")
    if model is not None:
        check_gcache_fits(meta, model, path, force=force)
        p = next(model.parameters())
        mdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        A, G = A.to(p.device, mdtype), G.to(p.device, mdtype)
    return GCache.from_tensors(A, G, meta=meta)


def check_gcache_fits(meta: dict, model, path, *, force: bool = False) -> None:
    from pldr_core.checkpoint import fingerprint

    cfg = model.config
    want = (cfg.num_layers, cfg.num_heads, cfg.head_dim)
    got = (int(meta["num_layers"]), int(meta["num_heads"]), int(meta["head_dim"]))
    if want != got:
        raise PLDRError(f"G-cache {path} is for {got[0]} layers x {got[1]} heads x head_dim {got[2]}, "
                        f"the model has {want[0]} x {want[1]} x {want[2]}")
    if not force and meta.get("fingerprint") != fingerprint(model):
        raise PLDRError(f"G-cache {path} was made from another model (fingerprint "
                        f"{meta.get('fingerprint')}); pass --force to use a foreign G of the same shape")
