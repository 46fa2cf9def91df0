"""`pldr inspect` on a model directory: prompts from texts, a file or a token data folder, the
inspection in float64, and its artifacts (JSON report, tensor dump, PNG plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pldr_core import files
from pldr_core.checkpoint import load_config, load_model
from pldr_core.deductive import InspectResult, collect_prompts, inspect_deductive
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_path
from pldr_core.gcache import read_gcache
from pldr_core.plots import pyplot, save_png
from pldr_core.prompts import find_tokenizer


def _check_paths(prompts_file, gcache, data_dir, json_out, dump, plots) -> None:
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise PLDRError(f"prompts file not found: {prompts_file}")
    if gcache is not None and not Path(gcache).is_file():
        raise PLDRError(f"G-cache file not found: {gcache}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise PLDRError(f"data folder not found: {data_dir}")
    for out in (json_out, dump):
        if out is not None and Path(out).is_dir():
            raise PLDRError(f"{out} is a folder; give a file path")
    if plots is not None and Path(plots).exists() and not Path(plots).is_dir():
        raise PLDRError(f"--plots {plots} exists and is not a folder")


def run_inspection(model_path: str | Path, *, prompts: list[str] | None = None,
                   prompts_file: str | Path | None = None, data_dir: str | Path | None = None,
                   samples: int = 8, seed: int = 0, max_len: int | None = None,
                   gcache: str | Path | None = None, force: bool = False, new_tokens: int = 4,
                   device: str = "cpu", json_out: str | Path | None = None, dump: str | Path | None = None,
                   plots: str | Path | None = None,
                   progress=None) -> tuple[InspectResult, list[tuple[str, Path]]]:
    """Load the model in float64, collect the prompts (``collect_prompts``; cut to ``max_len``, by
    default the context minus ``new_tokens``), run ``inspect_deductive`` (``progress(done, total)``)
    and write the artifacts asked for. Everything that needs no weights is checked first. Returns
    the result and the (kind, path) of every file written."""
    cfg = load_config(model_path)
    _check_paths(prompts_file, gcache, data_dir, json_out, dump, plots)
    if new_tokens < 1:
        raise PLDRError("--new-tokens must be at least 1")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PLDRError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PLDRError("--device cuda: no CUDA device is available")
    limit = max_len if max_len is not None else max(1, cfg.max_seq_len - new_tokens)
    if limit < 1:
        raise PLDRError("--max-len must be at least 1")
    tokenizer = find_tokenizer(model_path, required=False)
    rows = collect_prompts(eos_id=cfg.eos_id, tokenizer=tokenizer, prompts=prompts, prompts_file=prompts_file,
                           data_dir=data_dir, samples=samples, seed=seed, max_len=limit)
    for p in rows:
        bad = [t for t in p.ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise PLDRError(f"prompt {p.label!r} has token id {bad[0]} outside the model's vocabulary "
                            f"({cfg.vocab_size}); was the data tokenized with this model's tokenizer?")

    model = load_model(model_path, device=device, dtype=torch.float64)
    g = read_gcache(gcache, model, force=force) if gcache is not None and cfg.has_metric_path else None
    result = inspect_deductive(model, rows, gcache=g, new_tokens=new_tokens, progress=progress)
    if gcache is not None and g is None:
        result.report["notes"].append("--gcache ignored: the model has no metric path")
    written = []
    if json_out is not None:
        written.append(("json", write_json(json_out, result.report)))
    if dump is not None:
        written.append(("dump", write_dump(dump, result)))
    if plots is not None:
        written += [("plot", path) for path in write_plots(plots, result)]
    return result, written


def summary_rows(report: dict) -> list[dict]:
    """One row per layer, heads summarised (what the CLI shows): {"layer": i, "tensors": {name: {figure:
    value}}}; means over heads and prompts, except det (min and max), rank and min entry (minimum)."""
    rows = []
    for lay in report["layers"]:
        per = {}
        for nm in report["tensors"]:
            t = lay[nm]
            per[nm] = {"log|det|": t["logabsdet_mean"], "det min..max": (t["det_min"], t["det_max"]),
                       "rank": t["rank_min"], "s1 share": t["top_sv_share_mean"],
                       "asym": t["asymmetry_mean"], "min": t["min"], "RMSE": t["rmse_mean"],
                       "RMSE/|mean|": t["rmse_rel_mean"], "DAG": t["dag"],
                       "cache |diff|": t["cache_max_abs_diff"]}
        rows.append({"layer": lay["layer"], "tensors": per})
    return rows


def write_json(path: str | Path, report: dict) -> Path:
    """The report as strict JSON (atomic)."""
    return files.write_json(path, report)


def write_dump(path: str | Path, result: InspectResult) -> Path:
    """The tensors as safetensors (atomic), with the prompts and g_mode as metadata."""
    path = Path(path)
    meta = {"format": "pldr-inspect", "g_mode": result.report["g_mode"],
            "prompts": json.dumps(result.report["prompts"])}
    with atomic_path(path) as tmp:
        save_file(result.tensors, str(tmp), metadata=meta)
    return path


def write_plots(out_dir: str | Path, result: InspectResult) -> list[Path]:
    """PNG heatmaps of G_LM (mean over prompts) per layer, one panel per head, and the RMSE across
    prompts per layer."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = result.report
    L, H = report["shape"]["num_layers"], report["shape"]["num_heads"]
    written = []
    for i in range(L):
        G = result.tensors[f"uncached.layers.{i}.G_LM"].mean(0)
        cols = min(H, 4)
        rows = math.ceil(H / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= H:
                ax.axis("off")
                continue
            im = ax.imshow(G[h].numpy(), cmap="RdBu_r", interpolation="nearest")
            ax.set_title(f"layer {i} head {h}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(f"G_LM (mean over {len(report['prompts'])} prompt(s)), g_mode {report['g_mode']}")
        written.append(save_png(fig, out_dir / f"G_LM_layer{i}.png"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = list(range(L))
    for nm in report["tensors"]:
        ax1.plot(xs, [report["layers"][i][nm]["rmse_mean"] for i in xs], marker="o", label=nm)
        ax2.plot(xs, [report["layers"][i][nm]["rmse_rel_mean"] for i in xs], marker="o", label=nm)
    for ax, title in ((ax1, "RMSE across prompts"), (ax2, "RMSE / |mean|")):
        ax.set_xlabel("layer")
        ax.set_xticks(xs)
        ax.set_title(f"{title} (mean over heads)")
        ax.legend()
    written.append(save_png(fig, out_dir / "rmse_per_layer.png"))
    return written
