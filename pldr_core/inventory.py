"""What ``pldr info`` reports about a model or preset."""

from __future__ import annotations

from pathlib import Path

import torch

from pldr_core.checkpoint import detect_layout, load_config, read_meta, weights_problems
from pldr_core.config import GMode
from pldr_core.config import preset as make_preset
from pldr_core.errors import PLDRError
from pldr_core.model import PLDRModel
from pldr_core.tokenizer import TOKENIZER_FILE


def count_params(config) -> tuple[int, int]:
    """(total, metric path) parameter counts of a config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = PLDRModel(config) if config.g_mode is not GMode.RANDOM else PLDRModel(config.replace(g_mode=GMode.FIXED))
    return model.num_params(), model.num_params(metric_only=True)


def describe(*, model: str | Path | None = None, preset: str | None = None, g_mode: str | None = None) -> dict:
    if preset is not None:
        config = make_preset(preset, **({"g_mode": g_mode} if g_mode else {}))
        source, layout, files, meta = f"preset {preset}", "preset", {}, {}
        has_tok = None
    else:
        path = Path(model)
        layout = detect_layout(path)
        config = load_config(path)
        problems = weights_problems(path, config) if path.is_dir() else []
        if problems:
            more = f" (and {len(problems) - 1} more: `pldr doctor {path}` lists them)" if len(problems) > 1 else ""
            raise PLDRError(problems[0] + more)
        source = str(path)
        files = ({p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
                 if path.is_dir() else {path.name: path.stat().st_size})
        meta = read_meta(path) if path.is_dir() else {}
        has_tok = path.is_dir() and (path / TOKENIZER_FILE).is_file()
    total, metric = count_params(config)
    out = {
        "source": source,
        "layout": layout,
        "config": config.to_dict(),
        "params_total": total,
        "params_metric": metric,
        "g_mode": config.g_mode.value,
        "rope_style": config.rope_style,
        "files": files,
        "meta": meta,
    }
    if has_tok is not None:
        out["tokenizer"] = has_tok
    return out
