"""The model card (README.md) of an exported model, written from its config, meta.json and eval results."""

from __future__ import annotations

import json
from pathlib import Path

from pldr_core.config import GMode, PLDRConfig
from pldr_core.errors import PLDRError

DEFAULT_LICENSE = "apache-2.0"


def read_eval_results(path: str | Path) -> dict[str, list[dict]]:
    """The zero-shot scores of a ``pldr eval --output`` file, per run ('' or 'no_gcache'/'gcache'):
    rows {task, metric, value, stderr}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PLDRError(f"eval results file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PLDRError(f"cannot read eval results {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PLDRError(f"{path} is not the JSON that `pldr eval --output` writes")
    runs = {"": data} if "results" in data else {k: data[k] for k in ("no_gcache", "gcache") if k in data}
    if not runs or not all(isinstance(r, dict) and isinstance(r.get("results"), dict) for r in runs.values()):
        raise PLDRError(f"{path} has no lm-eval \"results\"; pass the file `pldr eval --output` writes")
    return {name: _score_rows(run["results"]) for name, run in runs.items()}


def _score_rows(results: dict) -> list[dict]:
    rows = []
    for task, res in results.items():
        for key, value in (res or {}).items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def model_card(config: PLDRConfig, meta: dict, *, layout: str, params_total: int, params_metric: int,
               license: str = DEFAULT_LICENSE, scores: dict[str, list[dict]] | None = None) -> str:
    """README.md text: HF YAML front matter, then shape, parameters, G mode, training, scores, loading."""
    parts = [_front_matter(license, config), f"# {config.name}\n",
             "A PLDR-LLM (Large Language Model from Power Law Decoder Representations, arXiv 2502.13502): "
             "a decoder whose attention is power law graph attention, with an energy-curvature tensor "
             "G_LM per layer.\n",
             _shape(config, params_total, params_metric), _g_section(config), _training(meta)]
    if scores:
        parts.append(_scores(scores))
    parts.append(_loading(layout))
    return "\n".join(p for p in parts if p)


def _front_matter(license: str, config: PLDRConfig) -> str:
    tags = ["pldr-llm", "power-law-graph-attention", "large-language-model"]
    if config.g_mode is not GMode.LEARNED:
        tags.append(f"g-{config.g_mode.value}")
    lines = ["---", f"license: {license}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    return "\n".join(lines + ["---", ""])


def _shape(c: PLDRConfig, total: int, metric: int) -> str:
    rows = [("layers (L)", c.num_layers), ("d_model", c.d_model), ("heads (H)", c.num_heads),
            ("head_dim (dk)", c.head_dim), ("dff", c.dff), ("vocab", c.vocab_size),
            ("context", c.max_seq_len), ("rope", f"{c.rope_style}, base {c.rope_base:g}")]
    if c.has_metric_path:
        rows += [("metric path", f"{c.num_reslayerA} residual units x {c.num_denseA} GLUs, A_dff {c.A_dff}")]
    rows += [("parameters", f"{total:,}"), ("of which metric path", f"{metric:,}")]
    return "## Shape\n\n" + _table(("", ""), rows)


def _g_section(c: PLDRConfig) -> str:
    text = {
        GMode.LEARNED: "learned: the metric path computes A, A_LM, A_P and G_LM from every prompt.",
        GMode.IDENTITY: "identity: G_LM = I and no metric path (scaled dot-product attention).",
        GMode.RANDOM: f"random: a frozen G_LM drawn from N({c.g_random_mean:g}, {c.g_random_std:g}^2) "
                      f"with seed {c.g_random_seed}.",
        GMode.FIXED: "fixed: a frozen G_LM (and A_LM) per layer, transferred from a G-cache.",
    }[c.g_mode]
    lines = ["## G mode\n", text]
    if c.g_source:
        lines.append(f"\nG-cache provenance: `{c.g_source}`.")
    if any(c.dag):
        lines.append(f"\nDAG loss coefficients (A_LM, A_P, G_LM): {', '.join(f'{x:g}' for x in c.dag)}.")
    return "\n".join(lines) + "\n"


def _training(meta: dict) -> str:
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    rows = [(name, meta.get(key)) for name, key in (
        ("created by", "created_by"), ("steps", "steps"), ("tokens seen", "tokens_seen"),
        ("final train loss", "final_loss"), ("final validation loss", "final_val_loss"),
        ("toolkit version", "toolkit_version"))]
    rows += [("data source", data.get("source")), ("data tokens", data.get("tokens"))]
    rows = [(k, _fmt(v)) for k, v in rows if v is not None]
    if not rows:
        return "## Training\n\nNo training record (meta.json) came with this model.\n"
    return "## Training\n\n" + _table(("", ""), rows)


def _scores(scores: dict[str, list[dict]]) -> str:
    out = ["## Zero-shot scores\n"]
    for run, rows in scores.items():
        if run:
            out.append(f"{'With' if run == 'gcache' else 'Without'} the G-cache:\n")
        out.append(_table(("task", "metric", "value", "stderr"),
                          [(r["task"], r["metric"], f"{r['value']:.4f}",
                            "" if r["stderr"] is None else f"{r['stderr']:.4f}") for r in rows]))
    return "\n".join(out)


def _loading(layout: str) -> str:
    lines = ["## How to load\n", "With the pldr toolkit (`pip install pldr`):\n", "```python",
             "from pldr_core import load_model", "", 'model = load_model("path/to/this/folder")',
             "logits = model(tokens).logits   # tokens: LongTensor [B, S]", "```", ""]
    if layout == "hf":
        lines += ["With the transformers port of PLDR-LLM (model_type `pldrllm`):\n", "```python",
                  "from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]
    lines += ["From the command line: `pldr generate path/to/this/folder --prompt \"...\"`.", ""]
    return "\n".join(lines)


def _table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
