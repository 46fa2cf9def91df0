"""Inspect the deductive outputs (A_LM, A_P, G_LM) of a PLDR-LLM, in float64 (SPEC section 5).

Per layer and head: det and log|det| (slogdet), numerical rank, the share of the largest singular
value, the asymmetry ||M - M^T|| / ||M||, the minimum entry and the DAG term of each tensor; the RMSE of
each tensor across the prompts (plain, and divided by |mean|, the author's way of reporting the
invariance). Cache fidelity: the same figures from the tensors the cached path actually serves
(KV + G-cache filled at the prefill, and A_P recomputed from the frozen A of the KV-cache) against the
uncached forward pass, and the max |logit difference| of teacher-forced greedy decoding under every cache
combination (and a G-cache file, when one is given) against KV + G.

Everything here is plain tensors and dicts: ``pldr_cli`` renders the report, ``write_dump`` and
``write_plots`` write the artifacts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pldr_core.cache import GCache, KVCache
from pldr_core.config import GMode
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_path, atomic_write_text, read_text_lines
from pldr_core.generate import decode_steps
from pldr_core.training.losses import dag_loss_term

STAT_TENSORS = ("A_LM", "A_P", "G_LM")
"""The deductive outputs the statistics are computed for (A is dumped, not summarised)."""
DUMP_TENSORS = ("A", "A_LM", "A_P", "G_LM")
PER_PROMPT_STATS = ("det", "logabsdet", "sign", "rank", "top_sv_share", "asymmetry", "min")

BUILTIN_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the universe was created.",
    "She opened the door and looked outside at the rain.",
    "Power law graph attention learns a metric tensor from every prompt.",
)
"""With the EOS-only prompt, the default prompts (when the model has a tokenizer)."""


@dataclass
class Prompt:
    label: str
    ids: list[int]


@dataclass
class InspectResult:
    report: dict
    """JSON-able: every figure per layer and head (``entries``), per layer, and the cache fidelity."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """For ``--dump``: ``uncached.layers.{i}.{name}`` / ``cached.layers.{i}.{name}`` [P, H, dk, dk]
    float64, ``gcache_file.layers.{i}.{A_LM,G_LM}`` [H, dk, dk], ``logits.{mode}`` [P, n, V]."""


# ---- prompts -----------------------------------------------------------------------------------
def collect_prompts(*, eos_id: int, tokenizer=None, prompts: list[str] | None = None,
                    prompts_file: str | Path | None = None, data_dir: str | Path | None = None,
                    samples: int = 8, seed: int = 0, max_len: int | None = None) -> list[Prompt]:
    """The prompts to inspect, as token ids.

    Sources: ``prompts`` (texts), ``prompts_file`` (one text per line; blank lines are the empty text,
    i.e. EOS alone), ``data_dir`` (``samples`` rows of a token data folder, val split first), or by
    default the EOS-only prompt plus ``BUILTIN_PROMPTS`` (those only with a tokenizer). Rows longer
    than ``max_len`` are cut to their first ``max_len`` tokens.
    """
    texts: list[str] = list(prompts or [])
    if prompts_file is not None:
        lines = read_text_lines(prompts_file, "prompts file")  # blank lines: the EOS-only prompt
        if not lines:
            raise PLDRError(f"prompts file {prompts_file} is empty; put one prompt per line")
        texts += lines
    out: list[Prompt] = []
    if data_dir is not None:
        out += _data_rows(Path(data_dir), samples, seed)
    if not texts and data_dir is None:
        out.append(Prompt("<EOS>", [eos_id]))
        if tokenizer is not None:
            texts = list(BUILTIN_PROMPTS)
    if texts and tokenizer is None:
        raise PLDRError("text prompts need a tokenizer, and the model directory has no tokenizer.model "
                        "(add one with `pldr init --tokenizer`, or use --data DIR)")
    for text in texts:
        ids = tokenizer.encode(text) if text else [eos_id]
        out.append(Prompt(text if text else "<EOS>", ids))
    if max_len is not None:
        for p in out:
            p.ids = p.ids[:max_len]
    return out


def _data_rows(data_dir: Path, samples: int, seed: int) -> list[Prompt]:
    """``samples`` rows of a token data folder (meta.json with seq_len and dtype; val.bin, train.bin)."""

    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise PLDRError(f"{data_dir} is not a token data folder (no meta.json; make one with `pldr tokenize`)")
    try:
        meta = json.loads(meta_file.read_text())
        seq_len = int(meta["seq_len"])
        dtype = np.dtype(meta.get("dtype", "uint16"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PLDRError(f"cannot read {meta_file} ({type(exc).__name__}: {exc})") from None
    if samples < 1:
        raise PLDRError("--samples must be at least 1")
    for split in ("val", "train"):
        file = data_dir / f"{split}.bin"
        if file.is_file() and file.stat().st_size >= seq_len * dtype.itemsize:
            rows = np.memmap(file, dtype=dtype, mode="r")
            rows = rows[: rows.size // seq_len * seq_len].reshape(-1, seq_len)
            gen = np.random.default_rng(seed)
            pick = sorted(gen.choice(rows.shape[0], size=min(samples, rows.shape[0]), replace=False))
            return [Prompt(f"{split}[{i}]", [int(t) for t in rows[i]]) for i in pick]
    raise PLDRError(f"{data_dir} has no val.bin or train.bin with a full row of {seq_len} tokens")


# ---- statistics ------------------------------------------------------------------------------
def matrix_stats(X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-matrix figures of X [..., dk, dk] (float64): det, logabsdet, sign, rank, top_sv_share,
    asymmetry (Frobenius ||X - X^T|| / ||X||) and min entry; each [...]."""
    X = X.to(torch.float64)
    sign, logabsdet = torch.linalg.slogdet(X)
    sv = torch.linalg.svdvals(X)
    tol = sv[..., :1] * X.shape[-1] * torch.finfo(X.dtype).eps
    norm = torch.linalg.matrix_norm(X)
    return {
        "det": torch.linalg.det(X),
        "logabsdet": logabsdet,
        "sign": sign,
        "rank": (sv > tol).sum(-1).to(torch.float64),
        "top_sv_share": sv[..., 0] / sv.sum(-1),
        "asymmetry": torch.linalg.matrix_norm(X - X.transpose(-1, -2)) / norm,
        "min": X.amin(dim=(-2, -1)),
    }


def rmse_across(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSE of X [P, H, dk, dk] around its mean over the P prompts, per head -> ([H], [H] / |mean|).

    rmse_h = sqrt( mean_{p,i,j} (X[p,h,i,j] - mean_p X[p,h,i,j])^2 ); the relative figure divides it by
    |mean_{p,i,j} X[p,h,i,j]|. With a single prompt both are 0.
    """
    X = X.to(torch.float64)
    rmse = (X - X.mean(0, keepdim=True)).pow(2).mean(dim=(0, 2, 3)).sqrt()
    return rmse, rmse / X.mean(dim=(0, 2, 3)).abs()


def dag_per_head(X: torch.Tensor) -> torch.Tensor:
    """The DAG term DL of X [P, H, dk, dk] per head (averaged over prompts) -> [H]."""
    return torch.stack([dag_loss_term(X[:, h]) for h in range(X.shape[1])]).to(torch.float64)


def equal_decimals(diff: float) -> int | None:
    """How many decimal places two numbers agree to, given their absolute difference (None: identical)."""
    if diff == 0:
        return None
    if not math.isfinite(diff):
        return 0
    return max(0, math.floor(-math.log10(diff)))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(both_nan, 0)
    diff = float(d.max()) if d.numel() else 0.0
    return {"max_abs_diff": diff, "identical": diff == 0.0, "equal_decimals": equal_decimals(diff)}


# ---- the run ---------------------------------------------------------------------------------
def _deductive_stack(per_prompt: list[list[dict]], L: int) -> dict[tuple[int, str], torch.Tensor]:
    """[(layer, name)] -> [P, H, dk, dk] from per-prompt lists of per-layer deductive dicts."""
    out = {}
    for i in range(L):
        for name in DUMP_TENSORS:
            mats = [ded[i][name] for ded in per_prompt if ded[i] is not None and name in ded[i]]
            if len(mats) == len(per_prompt) and mats:
                out[(i, name)] = torch.cat([m.detach().to(torch.float64).expand(1, *m.shape[1:])
                                            for m in mats]).cpu()
    return out


def _forced(tokens: list[torch.Tensor]):
    """A ``choose`` for decode_steps that replays ``tokens`` (teacher forcing the reference path)."""
    it = iter(tokens)
    return lambda logits: next(it).to(logits.device)


@torch.no_grad()
def inspect_deductive(model, prompts: list[Prompt], *, gcache: GCache | None = None,
                      new_tokens: int = 4, progress=None) -> InspectResult:
    """Inspect ``model`` (float64 recommended) on ``prompts``; see the module docstring.

    ``gcache``: a filled G-cache from a file, compared against the prompts' G_LM and used as one more
    decode mode. ``progress(done, total)`` is called after each prompt.
    """
    if not prompts:
        raise PLDRError("no prompts to inspect")
    if new_tokens < 1:
        raise PLDRError("--new-tokens must be at least 1")
    cfg = model.config
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
    device = next(model.parameters()).device
    metric = cfg.has_metric_path
    notes: list[str] = []
    if cfg.g_mode is GMode.IDENTITY:
        notes.append("g_mode identity: G_LM = I by construction (plain SDPA); A_LM and A_P do not "
                     "exist, so only G_LM is reported and the G-cache does not apply")
    elif not metric:
        have = "G_LM and A_LM are" if cfg.g_mode is GMode.FIXED else "G_LM is"
        notes.append(f"g_mode {cfg.g_mode}: no metric path; G_LM is a frozen tensor, so only {have} "
                     "reported; A_P and the G-cache do not apply")
    if gcache is not None and not metric:
        notes.append("--gcache ignored: the model has no metric path for a G-cache to replace")
        gcache = None
    if len(prompts) == 1:
        notes.append("one prompt: the RMSE across prompts is 0 by definition; give more prompts")

    modes = {"none": (False, False), "kv": (True, False)}
    if metric:
        modes.update({"g": (False, True), "kv+g": (True, True)})
        ref_mode = "kv+g"
    else:
        ref_mode = "kv"
    if gcache is not None:
        modes["kv+gfile"] = (True, gcache)

    uncached, cached, logits = [], [], {m: [] for m in modes}
    total = len(prompts)
    for n, prompt in enumerate(prompts):
        ids = torch.tensor([prompt.ids], device=device)
        S = ids.shape[1]
        # The uncached forward pass: the metric path on the whole prompt.
        ref = model(ids, return_deductive=True)
        uncached.append(ref.deductive)
        nxt = ref.logits[:, -1].argmax(-1)[:, None]
        # What the cached path serves at the first decode step: A_LM and G_LM from the KV + G-cache
        # filled at the prefill, A and A_P recomputed from the KV-cache's frozen A.
        kv = KVCache.for_model(model, 1, S + 1)
        gc = GCache.for_model(model, 1) if metric else None
        model(ids, kv_cache=kv, g_cache=gc)
        step_kvg = model(nxt, kv_cache=kv, g_cache=gc, return_deductive=True).deductive
        kv_only = KVCache.for_model(model, 1, S + 1)
        model(ids, kv_cache=kv_only)
        step_kv = model(nxt, kv_cache=kv_only, return_deductive=True).deductive
        cached.append([{**(b or {}), **(a or {})} for a, b in zip(step_kvg, step_kv)])
        # Teacher-forced greedy decoding under every cache combination, on the reference's tokens.
        kv_on, g_on = modes[ref_mode]
        steps = list(decode_steps(model, ids, new_tokens, kv_cache=kv_on, g_cache=g_on))
        tokens = [s.token for s in steps]
        logits[ref_mode].append(torch.stack([s.logits[0] for s in steps]))
        for mode, (kv_on, g_on) in modes.items():
            if mode == ref_mode:
                continue
            steps = decode_steps(model, ids, new_tokens, kv_cache=kv_on, g_cache=g_on,
                                 choose=_forced(tokens))
            logits[mode].append(torch.stack([s.logits[0] for s in steps]))
        if progress is not None:
            progress(n + 1, total)

    un = _deductive_stack(uncached, L)
    ca = _deductive_stack(cached, L)
    if cfg.g_mode is GMode.IDENTITY:
        eye = torch.eye(dk, dtype=torch.float64).expand(len(prompts), H, dk, dk).clone()
        for i in range(L):
            un[(i, "G_LM")] = eye
            ca[(i, "G_LM")] = eye.clone()
    names = [nm for nm in STAT_TENSORS if (0, nm) in un]

    file_G = file_A = None
    if gcache is not None:
        file_G = gcache.G_LM[:, 0].to("cpu", torch.float64)
        file_A = gcache.A_LM[:, 0].to("cpu", torch.float64)

    entries, layers = [], []
    stat_diff = {nm: {s: 0.0 for s in (*PER_PROMPT_STATS, "rmse", "rmse_rel", "dag")} for nm in names}
    for i in range(L):
        per_tensor = {}
        for nm in names:
            X, Y = un[(i, nm)], ca[(i, nm)]
            sx, sy = matrix_stats(X), matrix_stats(Y)
            rx, rrx = rmse_across(X)
            ry, rry = rmse_across(Y)
            dx, dy = dag_per_head(X), dag_per_head(Y)
            for s in PER_PROMPT_STATS:
                stat_diff[nm][s] = max(stat_diff[nm][s], _agreement(sx[s], sy[s])["max_abs_diff"])
            for s, a, b in (("rmse", rx, ry), ("rmse_rel", rrx, rry), ("dag", dx, dy)):
                stat_diff[nm][s] = max(stat_diff[nm][s], _agreement(a, b)["max_abs_diff"])
            per_tensor[nm] = dict(sx=sx, rx=rx, rrx=rrx, dx=dx, sy=sy, ry=ry, rry=rry, dy=dy, X=X, Y=Y)
        for h in range(H):
            entry = {"layer": i, "head": h}
            for nm, t in per_tensor.items():
                sy = t["sy"]
                e = {s: t["sx"][s][:, h].tolist() for s in PER_PROMPT_STATS}
                e.update(rmse=float(t["rx"][h]), rmse_rel=float(t["rrx"][h]), dag=float(t["dx"][h]))
                e["cached"] = {"det": sy["det"][:, h].tolist(), "logabsdet": sy["logabsdet"][:, h].tolist(),
                               "rmse": float(t["ry"][h]), "rmse_rel": float(t["rry"][h]),
                               "dag": float(t["dy"][h]), "tensor": _agreement(t["X"][:, h], t["Y"][:, h])}
                entry[nm] = e
            if file_G is not None:
                prompt_det = {nm: per_tensor[nm]["sx"]["det"][:, h] for nm in ("A_LM", "G_LM")}
                entry["gcache_file"] = _file_entry(file_A[i, h], file_G[i, h], un, i, h, prompt_det)
            entries.append(entry)
        layer = {"layer": i}
        for nm, t in per_tensor.items():
            sx, rx, rrx, X = t["sx"], t["rx"], t["rrx"], t["X"]
            layer[nm] = {
                "dag": float(dag_loss_term(X)),
                "rmse_mean": float(rx.mean()), "rmse_max": float(rx.max()),
                "rmse_rel_mean": float(rrx.mean()),
                "logabsdet_mean": float(sx["logabsdet"].mean()),
                "det_min": float(sx["det"].min()), "det_max": float(sx["det"].max()),
                "rank_min": int(sx["rank"].min()), "top_sv_share_mean": float(sx["top_sv_share"].mean()),
                "asymmetry_mean": float(sx["asymmetry"].mean()), "min": float(sx["min"].min()),
                "cache_max_abs_diff": _agreement(X, t["Y"])["max_abs_diff"],
            }
        layers.append(layer)

    logit_t = {m: torch.stack(v).to("cpu", torch.float64) for m, v in logits.items()}
    ref_logits = logit_t[ref_mode]
    fidelity_logits = {}
    for m, t in logit_t.items():
        if m == ref_mode:
            continue
        fidelity_logits[m] = {
            **_agreement(t, ref_logits),
            "first_step_max_abs_diff": float((t[:, 0] - ref_logits[:, 0]).abs().max()),
            "argmax_equal": bool((t.argmax(-1) == ref_logits.argmax(-1)).all()),
            "per_prompt_max_abs_diff": (t - ref_logits).abs().amax(dim=(1, 2)).tolist(),
        }
    fidelity = {
        "reference": ref_mode,
        "new_tokens": new_tokens,
        "deductive": {nm: _agreement(torch.stack([un[(i, nm)] for i in range(L)]),
                                     torch.stack([ca[(i, nm)] for i in range(L)])) for nm in names},
        "stats": {nm: {s: {"max_abs_diff": d, "equal_decimals": equal_decimals(d)}
                       for s, d in stat_diff[nm].items()} for nm in names},
        "logits": fidelity_logits,
        "note": ("logits: teacher-forced on the reference's greedy tokens. 'none' recomputes A from the "
                 "whole current text at every step, so it may differ after the first step by design; "
                 "KV, G and KV+G must agree (A frozen at the prompt)."),
    }
    dag_terms = {nm: float(torch.tensor([lay[nm]["dag"] for lay in layers]).mean()) for nm in names}
    report = {
        "g_mode": cfg.g_mode.value,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "shape": {"num_layers": L, "num_heads": H, "head_dim": dk},
        "tensors": names,
        "prompts": [{"label": p.label, "tokens": len(p.ids)} for p in prompts],
        "notes": notes,
        "definitions": {
            "det/logabsdet/sign": "torch.linalg.det and slogdet in float64, per prompt",
            "rank": "singular values above s_max * dk * eps(float64)",
            "top_sv_share": "s_max / sum of singular values",
            "asymmetry": "||M - M^T||_F / ||M||_F",
            "rmse": "sqrt(mean over prompts and entries of (M - mean over prompts)^2)",
            "rmse_rel": "rmse / |mean over prompts and entries of M|",
            "dag": "|log(trace(expm(M o M)) / dk)|, averaged over prompts (and heads, per layer)",
            "cached": "the tensors the KV + G-cache path serves at the first decode step",
        },
        "entries": entries,
        "layers": layers,
        "dag_terms": dag_terms,
        "fidelity": fidelity,
    }
    tensors = {}
    for (i, nm), X in un.items():
        tensors[f"uncached.layers.{i}.{nm}"] = X.contiguous()
    for (i, nm), X in ca.items():
        tensors[f"cached.layers.{i}.{nm}"] = X.contiguous()
    if file_G is not None:
        for i in range(L):
            tensors[f"gcache_file.layers.{i}.G_LM"] = file_G[i].contiguous()
            tensors[f"gcache_file.layers.{i}.A_LM"] = file_A[i].contiguous()
        report["gcache_file"] = {"meta": dict(gcache.meta)}
    for m, t in logit_t.items():
        tensors[f"logits.{m}"] = t.contiguous()
    return InspectResult(report=report, tensors=tensors)


def _file_entry(A_f: torch.Tensor, G_f: torch.Tensor, un: dict, i: int, h: int, prompt_det: dict) -> dict:
    """The G-cache file's A_LM / G_LM for one layer and head, against the prompts' own tensors
    (``prompt_det``: {name: the prompts' determinants for this layer and head}, already computed)."""
    out = {}
    for nm, F in (("A_LM", A_f), ("G_LM", G_f)):
        s = matrix_stats(F)
        X = un[(i, nm)][:, h]
        per_prompt = (X - F).abs().amax(dim=(1, 2))
        diff = float(per_prompt.max())
        out[nm] = {"det": float(s["det"]), "logabsdet": float(s["logabsdet"]),
                   "max_abs_diff_vs_prompts": diff, "equal_decimals": equal_decimals(diff),
                   "per_prompt_max_abs_diff": per_prompt.tolist(),
                   "det_max_abs_diff_vs_prompts": float((prompt_det[nm] - s["det"]).abs().max())}
    return out


# ---- summaries and artifacts -------------------------------------------------------------------
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

    path = Path(path)
    atomic_write_text(path, json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    return path


def _finite(obj):
    """Strict JSON: NaN and +-inf (e.g. log|det| of a singular matrix) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
    prompts per layer. matplotlib (Agg) is imported here only."""
    try:
        import matplotlib
    except ImportError:
        raise PLDRError("--plots needs matplotlib: pip install 'pldr[dev]' or pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


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
        fig.tight_layout()
        path = out_dir / f"G_LM_layer{i}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        written.append(path)
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
    fig.tight_layout()
    path = out_dir / "rmse_per_layer.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    written.append(path)
    return written
