"""Prompts for a measurement, the one-line reading against the paper's ranges, and the artifacts
(JSON written atomically, PNG plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pldr_core import files
from pldr_core.corpus import iter_embedded_documents
from pldr_core.criticality.measure import CriticalityResult
from pldr_core.data import TokenData
from pldr_core.errors import PLDRError
from pldr_core.files import read_text_lines
from pldr_core.plots import pyplot, save_png

NEAR_CRITICAL_MAX = 2.2e-2
"""The largest OP(G_LM) among the paper's near-critical 110M models."""
SUB_CRITICAL_MIN = 3.0
"""OP(G_LM) of the paper's sub-critical models starts about here (they measured 15.8 and 46.9)."""


def collect_prompts(*, samples: int, seed: int = 0, tokenizer=None, prompts_file=None,
                    data_dir=None) -> tuple[list[list[int]], str]:
    """(prompt ids, a description of their source): ``samples`` lines of ``prompts_file``, ``samples``
    seeded rows of a token data folder (val split, else train), or by default ``samples`` seeded
    documents of the embedded corpus. Text needs ``tokenizer``."""

    if samples < 1:
        raise PLDRError(f"--samples must be at least 1, got {samples}")
    if prompts_file is not None and data_dir is not None:
        raise PLDRError("give --prompts-file or --data, not both")
    if data_dir is not None:

        data = TokenData(data_dir)
        split, name = (data.val, "val") if data.val.shape[0] else (data.train, "train")
        if split.shape[0] == 0:
            raise PLDRError(f"{data_dir} holds no rows")
        pick = sorted(np.random.default_rng(seed).choice(split.shape[0], size=min(samples, split.shape[0]),
                                                         replace=False))
        return [[int(t) for t in split[i]] for i in pick], f"{data_dir} ({name} split)"
    if tokenizer is None:
        raise PLDRError("the model directory has no tokenizer.model, so text prompts cannot be encoded; "
                        "give token data with --data DIR")
    if prompts_file is not None:
        texts = [line for line in read_text_lines(prompts_file, "prompts file") if line.strip()]
        if not texts:
            raise PLDRError(f"prompts file {prompts_file} holds no prompts (one per line)")
        texts, source = texts[:samples], str(prompts_file)
    else:

        docs = [d["text"] for d in iter_embedded_documents() if d.get("text", "").strip()]
        pick = np.random.default_rng(seed).choice(len(docs), size=min(samples, len(docs)), replace=False)
        texts, source = [docs[i] for i in sorted(pick)], "the embedded corpus"
    return [tokenizer.encode(t, eos=False) or [tokenizer.eos_id] for t in texts], source


def reading(result: CriticalityResult) -> str:
    """One line placing OP(G_LM) beside the ranges the paper reports (its 110M models)."""
    a = result.order_parameter.get("A")
    tail = f"; OP(A) = {a:.3g}" if a is not None else ""
    if result.g_constant:
        return (f"OP(G_LM) is 0 by definition here (g_mode {result.protocol.g_mode}: G_LM does not depend "
                f"on the input){tail}; the paper's ranges are for learned G_LM.")
    op = result.order_parameter["G_LM"]
    scope = "(the paper's ranges come from its 110M models; other scales are not calibrated)"
    if op <= NEAR_CRITICAL_MAX:
        where = f"within the range of the paper's near-critical models (0 to {NEAR_CRITICAL_MAX:.1e})"
    elif op >= SUB_CRITICAL_MIN:
        where = f"within the range of the paper's sub-critical models ({SUB_CRITICAL_MIN:g} and more)"
    else:
        where = (f"between the paper's near-critical (up to {NEAR_CRITICAL_MAX:.1e}) and sub-critical "
                 f"({SUB_CRITICAL_MIN:g} and more) models; the paper reports none there")
    return f"OP(G_LM) = {op:.3g}: {where}{tail} {scope}."


def write_json(path, result: CriticalityResult) -> Path:
    return files.write_json(path, result.to_json())


def write_plots(out_dir, result: CriticalityResult) -> list[Path]:
    """op_per_layer.png, eps_G.png (learned G only) and entropy_per_head.png."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        written.append(save_png(fig, out_dir / name))

    fig, ax = plt.subplots(figsize=(6, 4))
    layers = [row["layer"] for row in result.per_layer]
    for kind in result.order_parameter:
        ys = [row["order_parameter"][kind] for row in result.per_layer]
        if all(y > 0 for y in ys):
            ax.semilogy(layers, ys, marker="o", label=kind)
    ax.set(xlabel="layer", ylabel="OP (run 1 vs run C)", title="order parameter per layer", xticks=layers)
    ax.legend()
    save(fig, "op_per_layer.png")
    if result.eps_G:
        fig, ax = plt.subplots(figsize=(6, 4))
        ts = [row["t"] for row in result.eps_G]
        for i in layers:
            ax.plot(ts, [row["eps_G"][i] for row in result.eps_G], marker=".", label=f"layer {i}")
        ax.set(xlabel="new token t", ylabel="eps_G", title="G-cache drift while generating")
        ax.legend()
        save(fig, "eps_G.png")
    if result.per_head:
        L, H = max(r["layer"] for r in result.per_head) + 1, max(r["head"] for r in result.per_head) + 1
        grid = np.zeros((L, H))
        for r in result.per_head:
            grid[r["layer"], r["head"]] = r["entropy_over_log_S"]
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * H + 2), max(3, 0.5 * L + 1.5)))
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set(xlabel="head", ylabel="layer", title="attention entropy / log S (last query row)")
        fig.colorbar(im, ax=ax)
        save(fig, "entropy_per_head.png")
    return written
