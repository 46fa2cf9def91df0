"""The G-cache file: safetensors with ``layers.{i}.G_LM`` and ``layers.{i}.A_LM``
([H, dk, dk] float32 each) and string metadata that ties it to the model it came from."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pldr_core._version import __version__
from pldr_core.attention import metric_dtype
from pldr_core.cache import GCache
from pldr_core.checkpoint import fingerprint
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_path

FORMAT = "pldr-gcache"
FORMAT_VERSION = "1"


def write_gcache(path: str | Path, A_LM: torch.Tensor, G_LM: torch.Tensor, *, fingerprint: str,
                 how: dict | None = None) -> Path:
    """Write [L, H, dk, dk] A_LM and G_LM with their metadata, atomically."""
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
        mdtype = metric_dtype(p.dtype)
        A, G = A.to(p.device, mdtype), G.to(p.device, mdtype)
    return GCache.from_tensors(A, G, meta=meta)


def check_gcache_fits(meta: dict, model, path, *, force: bool = False) -> None:
    """Refuse a G-cache whose shape (or, unless ``force``, fingerprint) is not the model's."""
    cfg = model.config
    want = (cfg.num_layers, cfg.num_heads, cfg.head_dim)
    got = (int(meta["num_layers"]), int(meta["num_heads"]), int(meta["head_dim"]))
    if want != got:
        raise PLDRError(f"G-cache {path} is for {got[0]} layers x {got[1]} heads x head_dim {got[2]}, "
                        f"the model has {want[0]} x {want[1]} x {want[2]}")
    if not force and meta.get("fingerprint") != fingerprint(model):
        raise PLDRError(f"G-cache {path} was made from another model (fingerprint "
                        f"{meta.get('fingerprint')}); pass --force to use a foreign G of the same shape")


# ---- export: run the metric path on prompts, reduce, report the spread -------------------------
REDUCTIONS = ("first", "mean")


def prompt_metric_tensors(model, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the metric path on each prompt on its own, unpadded (A sums over every token, so padding
    would change it). Returns A_LM and G_LM, each [N, L, H, dk, dk] in the metric path's dtype."""
    if not model.config.has_metric_path:
        raise PLDRError(f"g_mode {model.config.g_mode!r} has no metric path to export a G-cache from "
                        f"(only learned-G models do; identity/random/fixed models already fix G_LM)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PLDRError("every prompt needs at least one token (the empty text encodes to EOS)")
    device = next(model.parameters()).device
    A_all, G_all = [], []
    with torch.inference_mode():
        for ids in prompts:
            gc = GCache.for_model(model, 1)
            model(torch.tensor([ids], dtype=torch.long, device=device), g_cache=gc)
            A_all.append(gc.A_LM[:, 0].clone())
            G_all.append(gc.G_LM[:, 0].clone())
    return torch.stack(A_all), torch.stack(G_all)


def g_spread(G: torch.Tensor) -> list[dict]:
    """How much G_LM [N, L, H, dk, dk] varies across N prompts, per layer (float64):
    ``rmse`` = sqrt(mean over prompts, heads and entries of (G - mean_prompts G)^2), ``mean_abs`` =
    mean |mean_prompts G|, ``rel_rmse`` = rmse / mean_abs. Zero for one prompt."""
    G = G.detach().to("cpu", torch.float64)
    mean = G.mean(0, keepdim=True)
    out = []
    for layer in range(G.shape[1]):
        rmse = float(((G[:, layer] - mean[:, layer]) ** 2).mean().sqrt())
        mean_abs = float(mean[0, layer].abs().mean())
        out.append({"layer": layer, "rmse": rmse, "mean_abs": mean_abs,
                    "rel_rmse": rmse / mean_abs if mean_abs > 0 else float("inf")})
    return out


@dataclass
class GCacheExport:
    """What ``export_gcache`` wrote and measured."""

    path: Path
    A_LM: torch.Tensor
    """[L, H, dk, dk] written to the file."""
    G_LM: torch.Tensor
    """[L, H, dk, dk] written to the file."""
    per_prompt_G: torch.Tensor
    """[N, L, H, dk, dk] G_LM of every prompt (before the reduction)."""
    spread: list[dict]
    """``g_spread`` of ``per_prompt_G``: per layer rmse, rel_rmse, mean_abs."""
    reduction: str
    fingerprint: str
    prompts: list[str]

    def summary(self) -> dict:
        return {"path": str(self.path), "count": len(self.prompts), "reduction": self.reduction,
                "fingerprint": self.fingerprint, "num_layers": int(self.G_LM.shape[0]),
                "num_heads": int(self.G_LM.shape[1]), "head_dim": int(self.G_LM.shape[2]),
                "prompts": self.prompts, "spread": self.spread}


def export_gcache(model, prompts: list[list[int]], out: str | Path, *, reduce: str = "first",
                  labels: list[str] | None = None) -> GCacheExport:
    """Run the metric path on ``prompts`` (ids), reduce to one (A_LM, G_LM) per layer ('first': the
    first prompt's; 'mean': the mean over prompts) and write the G-cache file with the model's
    fingerprint. ``labels`` (the prompt texts) go into the file's metadata."""
    if reduce not in REDUCTIONS:
        raise PLDRError(f"unknown reduction {reduce!r}; choose first or mean")
    labels = list(labels) if labels is not None else [" ".join(map(str, p)) for p in prompts]
    if len(labels) != len(prompts):
        raise PLDRError("labels must match prompts one to one")
    A_all, G_all = prompt_metric_tensors(model, prompts)
    if reduce == "first":
        A_LM, G_LM = A_all[0], G_all[0]
    else:
        A_LM, G_LM = A_all.mean(0), G_all.mean(0)
    fp = fingerprint(model)
    path = write_gcache(out, A_LM, G_LM, fingerprint=fp,
                        how={"prompts": labels, "count": len(prompts), "reduction": reduce})
    return GCacheExport(path=Path(path), A_LM=A_LM.cpu(), G_LM=G_LM.cpu(), per_prompt_G=G_all.cpu(),
                        spread=g_spread(G_all), reduction=reduce, fingerprint=fp, prompts=labels)
