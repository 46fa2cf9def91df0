"""Inspect the deductive outputs (A_LM, A_P, G_LM) of a PLDR-LLM, in float64.

Per layer and head: det and log|det| (slogdet), numerical rank, the share of the largest singular
value, the asymmetry ||M - M^T|| / ||M||, the minimum entry and the DAG term of each tensor; the RMSE of
each tensor across the prompts (plain, and divided by |mean|, the author's way of reporting the
invariance). Cache fidelity: the same figures from the tensors the cached path actually serves
(KV + G-cache filled at the prefill, and A_P recomputed from the frozen A of the KV-cache) against the
uncached forward pass, and the max |logit difference| of teacher-forced greedy decoding under every cache
combination (and a G-cache file, when one is given) against KV + G.

Everything here is plain tensors and dicts: ``pldr_core.deductive_report`` runs it on a model
directory and writes the artifacts, ``pldr_cli`` renders the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pldr_core.attention import LayerDeductive
from pldr_core.cache import GCache, KVCache
from pldr_core.config import GMode
from pldr_core.dag import dag_loss_term
from pldr_core.deductive_stats import (
    agreement,
    dag_per_head,
    equal_decimals,
    matrix_stats,
    rmse_across,
)
from pldr_core.errors import PLDRError
from pldr_core.files import read_text_lines
from pldr_core.generate import decode_steps

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


# ---- the run ---------------------------------------------------------------------------------
def _deductive_stack(per_prompt: list[list[LayerDeductive]], L: int) -> dict[tuple[int, str], torch.Tensor]:
    """[(layer, name)] -> [P, H, dk, dk] from per-prompt lists of per-layer deductive outputs."""
    out = {}
    for i in range(L):
        for name in DUMP_TENSORS:
            mats = [getattr(ded[i], name) for ded in per_prompt if ded[i] is not None]
            mats = [m for m in mats if m is not None]
            if len(mats) == len(per_prompt) and mats:
                out[(i, name)] = torch.cat([m.detach().to(torch.float64).expand(1, *m.shape[1:])
                                            for m in mats]).cpu()
    return out


def _served(kv_g: LayerDeductive | None, kv_only: LayerDeductive | None) -> LayerDeductive:
    """What the cached path serves: A_LM and G_LM from the KV + G-cache step, A and A_P (which that
    step does not recompute) from the KV-only step."""
    kv_g, kv_only = kv_g or LayerDeductive(), kv_only or LayerDeductive()
    return LayerDeductive(**{f.name: getattr(kv_g, f.name) if getattr(kv_g, f.name) is not None
                             else getattr(kv_only, f.name) for f in fields(LayerDeductive)})


def _forced(tokens: list[torch.Tensor]):
    """A ``choose`` for decode_steps that replays ``tokens`` (teacher forcing the reference path)."""
    it = iter(tokens)
    return lambda logits: next(it).to(logits.device)


def _notes(cfg, gcache: GCache | None, n_prompts: int) -> tuple[list[str], GCache | None]:
    """What the report must say about this model; a G-cache is dropped where no metric path exists."""
    notes: list[str] = []
    if cfg.g_mode is GMode.IDENTITY:
        notes.append("g_mode identity: G_LM = I by construction (plain SDPA); A_LM and A_P do not "
                     "exist, so only G_LM is reported and the G-cache does not apply")
    elif not cfg.has_metric_path:
        have = "G_LM and A_LM are" if cfg.g_mode is GMode.FIXED else "G_LM is"
        notes.append(f"g_mode {cfg.g_mode}: no metric path; G_LM is a frozen tensor, so only {have} "
                     "reported; A_P and the G-cache do not apply")
    if gcache is not None and not cfg.has_metric_path:
        notes.append("--gcache ignored: the model has no metric path for a G-cache to replace")
        gcache = None
    if n_prompts == 1:
        notes.append("one prompt: the RMSE across prompts is 0 by definition; give more prompts")
    return notes, gcache


def _decode_modes(metric: bool, gcache: GCache | None) -> tuple[dict, str]:
    """{mode: (kv_cache, g_cache)} for the logit comparison, and the reference mode."""
    modes = {"none": (False, False), "kv": (True, False)}
    if metric:
        modes.update({"g": (False, True), "kv+g": (True, True)})
    if gcache is not None:
        modes["kv+gfile"] = (True, gcache)
    return modes, "kv+g" if metric else "kv"


def _run_prompt(model, ids: torch.Tensor, modes: dict, ref_mode: str, new_tokens: int):
    """One prompt: the uncached deductive outputs, those the cached path serves at the first decode
    step, and {mode: [new_tokens, V] logits} of teacher-forced greedy decoding in every mode."""
    S = ids.shape[1]
    ref = model(ids, return_deductive=True)  # the uncached forward pass: the metric path on the prompt
    nxt = ref.logits[:, -1].argmax(-1)[:, None]
    kv = KVCache.for_model(model, 1, S + 1)
    gc = GCache.for_model(model, 1) if model.config.has_metric_path else None
    model(ids, kv_cache=kv, g_cache=gc)
    step_kvg = model(nxt, kv_cache=kv, g_cache=gc, return_deductive=True).deductive
    kv_only = KVCache.for_model(model, 1, S + 1)
    model(ids, kv_cache=kv_only)
    step_kv = model(nxt, kv_cache=kv_only, return_deductive=True).deductive
    served = [_served(a, b) for a, b in zip(step_kvg, step_kv)]
    kv_on, g_on = modes[ref_mode]
    steps = list(decode_steps(model, ids, new_tokens, kv_cache=kv_on, g_cache=g_on))
    tokens = [s.token for s in steps]
    logits = {ref_mode: torch.stack([s.logits[0] for s in steps])}
    for mode, (kv_on, g_on) in modes.items():
        if mode != ref_mode:
            steps = decode_steps(model, ids, new_tokens, kv_cache=kv_on, g_cache=g_on, choose=_forced(tokens))
            logits[mode] = torch.stack([s.logits[0] for s in steps])
    return ref.deductive, served, logits


def _tensor_figures(X: torch.Tensor, Y: torch.Tensor) -> dict:
    """Every figure of one layer's uncached X and cached Y [P, H, dk, dk], and their largest gaps."""
    t = dict(X=X, Y=Y, sx=matrix_stats(X), sy=matrix_stats(Y), dx=dag_per_head(X), dy=dag_per_head(Y))
    t["rx"], t["rrx"] = rmse_across(X)
    t["ry"], t["rry"] = rmse_across(Y)
    gaps = {s: agreement(t["sx"][s], t["sy"][s])["max_abs_diff"] for s in PER_PROMPT_STATS}
    for s, a, b in (("rmse", "rx", "ry"), ("rmse_rel", "rrx", "rry"), ("dag", "dx", "dy")):
        gaps[s] = agreement(t[a], t[b])["max_abs_diff"]
    t["gaps"] = gaps
    return t


def _head_entry(i: int, h: int, per_tensor: dict) -> dict:
    entry = {"layer": i, "head": h}
    for nm, t in per_tensor.items():
        sy = t["sy"]
        e = {s: t["sx"][s][:, h].tolist() for s in PER_PROMPT_STATS}
        e.update(rmse=float(t["rx"][h]), rmse_rel=float(t["rrx"][h]), dag=float(t["dx"][h]))
        e["cached"] = {"det": sy["det"][:, h].tolist(), "logabsdet": sy["logabsdet"][:, h].tolist(),
                       "rmse": float(t["ry"][h]), "rmse_rel": float(t["rry"][h]),
                       "dag": float(t["dy"][h]), "tensor": agreement(t["X"][:, h], t["Y"][:, h])}
        entry[nm] = e
    return entry


def _layer_summary(i: int, per_tensor: dict) -> dict:
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
            "cache_max_abs_diff": agreement(X, t["Y"])["max_abs_diff"],
        }
    return layer


def _figures(un: dict, ca: dict, names: list[str], L: int, H: int, file_A, file_G):
    """Per head entries, per layer summaries and, per tensor and statistic, the largest cached gap."""
    entries, layers = [], []
    stat_diff = {nm: {s: 0.0 for s in (*PER_PROMPT_STATS, "rmse", "rmse_rel", "dag")} for nm in names}
    for i in range(L):
        per_tensor = {nm: _tensor_figures(un[(i, nm)], ca[(i, nm)]) for nm in names}
        for nm, t in per_tensor.items():
            for s, d in t["gaps"].items():
                stat_diff[nm][s] = max(stat_diff[nm][s], d)
        for h in range(H):
            entry = _head_entry(i, h, per_tensor)
            if file_G is not None:
                prompt_det = {nm: per_tensor[nm]["sx"]["det"][:, h] for nm in ("A_LM", "G_LM")}
                entry["gcache_file"] = _file_entry(file_A[i, h], file_G[i, h], un, i, h, prompt_det)
            entries.append(entry)
        layers.append(_layer_summary(i, per_tensor))
    return entries, layers, stat_diff


def _logit_fidelity(logit_t: dict, ref_mode: str) -> dict:
    ref = logit_t[ref_mode]
    return {m: {**agreement(t, ref),
                "first_step_max_abs_diff": float((t[:, 0] - ref[:, 0]).abs().max()),
                "argmax_equal": bool((t.argmax(-1) == ref.argmax(-1)).all()),
                "per_prompt_max_abs_diff": (t - ref).abs().amax(dim=(1, 2)).tolist()}
            for m, t in logit_t.items() if m != ref_mode}


DEFINITIONS = {
    "det/logabsdet/sign": "torch.linalg.det and slogdet in float64, per prompt",
    "rank": "singular values above s_max * dk * eps(float64)",
    "top_sv_share": "s_max / sum of singular values",
    "asymmetry": "||M - M^T||_F / ||M||_F",
    "rmse": "sqrt(mean over prompts and entries of (M - mean over prompts)^2)",
    "rmse_rel": "rmse / |mean over prompts and entries of M|",
    "dag": "|log(trace(expm(M o M)) / dk)|, averaged over prompts (and heads, per layer)",
    "cached": "the tensors the KV + G-cache path serves at the first decode step",
}
FIDELITY_NOTE = ("logits: teacher-forced on the reference's greedy tokens. 'none' recomputes A from the "
                 "whole current text at every step, so it may differ after the first step by design; "
                 "KV, G and KV+G must agree (A frozen at the prompt).")


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
    notes, gcache = _notes(cfg, gcache, len(prompts))
    modes, ref_mode = _decode_modes(cfg.has_metric_path, gcache)
    uncached, cached, logits = [], [], {m: [] for m in modes}
    for n, prompt in enumerate(prompts):
        ded, served, per_mode = _run_prompt(model, torch.tensor([prompt.ids], device=device), modes,
                                            ref_mode, new_tokens)
        uncached.append(ded)
        cached.append(served)
        for m, t in per_mode.items():
            logits[m].append(t)
        if progress is not None:
            progress(n + 1, len(prompts))

    un, ca = _deductive_stack(uncached, L), _deductive_stack(cached, L)
    if cfg.g_mode is GMode.IDENTITY:  # G_LM = I: the model returns no tensor for it
        eye = torch.eye(dk, dtype=torch.float64).expand(len(prompts), H, dk, dk).clone()
        for i in range(L):
            un[(i, "G_LM")] = eye
            ca[(i, "G_LM")] = eye.clone()
    names = [nm for nm in STAT_TENSORS if (0, nm) in un]
    file_G = file_A = None
    if gcache is not None:
        file_G = gcache.G_LM[:, 0].to("cpu", torch.float64)
        file_A = gcache.A_LM[:, 0].to("cpu", torch.float64)
    entries, layers, stat_diff = _figures(un, ca, names, L, H, file_A, file_G)
    logit_t = {m: torch.stack(v).to("cpu", torch.float64) for m, v in logits.items()}
    fidelity = {
        "reference": ref_mode,
        "new_tokens": new_tokens,
        "deductive": {nm: agreement(torch.stack([un[(i, nm)] for i in range(L)]),
                                     torch.stack([ca[(i, nm)] for i in range(L)])) for nm in names},
        "stats": {nm: {s: {"max_abs_diff": d, "equal_decimals": equal_decimals(d)}
                       for s, d in stat_diff[nm].items()} for nm in names},
        "logits": _logit_fidelity(logit_t, ref_mode),
        "note": FIDELITY_NOTE,
    }
    report = {
        "g_mode": cfg.g_mode.value,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "shape": {"num_layers": L, "num_heads": H, "head_dim": dk},
        "tensors": names,
        "prompts": [{"label": p.label, "tokens": len(p.ids)} for p in prompts],
        "notes": notes,
        "definitions": dict(DEFINITIONS),
        "entries": entries,
        "layers": layers,
        "dag_terms": {nm: float(torch.tensor([lay[nm]["dag"] for lay in layers]).mean()) for nm in names},
        "fidelity": fidelity,
    }
    tensors = {f"uncached.layers.{i}.{nm}": X.contiguous() for (i, nm), X in un.items()}
    tensors.update({f"cached.layers.{i}.{nm}": X.contiguous() for (i, nm), X in ca.items()})
    if file_G is not None:
        for i in range(L):
            tensors[f"gcache_file.layers.{i}.G_LM"] = file_G[i].contiguous()
            tensors[f"gcache_file.layers.{i}.A_LM"] = file_A[i].contiguous()
        report["gcache_file"] = {"meta": dict(gcache.meta)}
    tensors.update({f"logits.{m}": t.contiguous() for m, t in logit_t.items()})
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
