#!/usr/bin/env python
"""A small sweep over (peak learning rate, warm-up) on the embedded corpus with the tiny model, and
OP(G_LM) of each pretrained model against its validation loss.

The criticality paper's knobs are exactly these two: at 110M parameters, near-critical models (small
OP(G_LM)) come from some (peak LR, warm-up) pairs and sub-critical ones (large OP) from others. This
repeats the experiment at toy scale; what it shows there is not calibrated against the paper.

    python examples/criticality_sweep.py --out runs/sweep --steps 300 --device cpu
    python examples/criticality_sweep.py --out runs/sweep --preset small --steps 3000 --device cuda

Writes OUT/sweep.json (one record per run) and OUT/op_vs_val_loss.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pldr_core.checkpoint import load_model
from pldr_core.criticality import Protocol, collect_prompts, measure_criticality
from pldr_core.data import tokenize_corpus
from pldr_core.device import resolve_device
from pldr_core.files import atomic_path, atomic_write_text
from pldr_core.training import TrainArgs, pretrain

GRID = [(3e-3, 10), (3e-3, 100), (1e-3, 30), (6e-4, 100), (3e-4, 30)]
"""(peak LR, warm-up steps) pairs: from aggressive to timid."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16, help="criticality prompts per model")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    data = a.out / "tok"
    if not (data / "meta.json").is_file():
        tokenize_corpus([], data, vocab_size=4000, seq_len=128)
    records = []
    for lr, warmup in GRID:
        run = a.out / f"lr{lr:g}_wu{warmup}"
        result = pretrain(TrainArgs(data=str(data), out=str(run), preset=a.preset, steps=a.steps,
                                    batch_size=a.batch_size, lr=lr, warmup=warmup, device=a.device,
                                    seed=a.seed, eval_every=a.steps))
        model = load_model(result.final_dir, device=resolve_device(a.device))
        prompts, source = collect_prompts(samples=a.samples, seed=a.seed, data_dir=data)
        crit = measure_criticality(model, prompts, Protocol(samples=a.samples, new_tokens=a.new_tokens,
                                                            max_prompt_tokens=64, drift_tokens=0,
                                                            seed=a.seed, source=source))
        rec = {"lr": lr, "warmup": warmup, "val_loss": result.val_loss,
               "op_G_LM": crit.order_parameter["G_LM"], "op_A": crit.order_parameter["A"],
               "op12_G_LM": crit.order_parameter_12["G_LM"]}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    atomic_write_text(a.out / "sweep.json", json.dumps(records, indent=1) + "\n")
    plot(records, a.out / "op_vs_val_loss.png")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        ax.scatter(r["val_loss"], r["op_G_LM"])
        ax.annotate(f"{r['lr']:g}/{r['warmup']}", (r["val_loss"], r["op_G_LM"]), fontsize=8)
    ax.set(xlabel="validation loss", ylabel="OP(G_LM)", yscale="log",
           title="order parameter against validation loss (peak LR / warm-up)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
