#!/usr/bin/env python
"""The paper's G ablation at small scale (arXiv 2502.13502, section on ablations).

Four models of the same shape are pretrained on the same data, for the same steps, with the same seed:

- learned:  the full metric path (the PLDR-LLM);
- identity: G_LM = I (an ordinary SDPA LLM, the paper's special case);
- random:   a fixed, seeded random G_LM per layer, never trained;
- fixed:    G_LM transferred from the learned run (its G-cache, exported with `pldr export-gcache`),
            frozen during training.

They are compared by validation loss and token accuracy at the last step, and training tokens/s, printed
as a markdown table (and written to OUT/ablation.md and OUT/ablation.json). Everything goes through the
`pldr` CLI, so this is also what a user would type.

    python examples/ablation.py --preset tiny --steps 200 --device cpu          # minutes on a CPU
    python examples/ablation.py --preset small --steps 2000 --device cuda       # one GPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("learned", "identity", "random", "fixed")


def sh(*args, log: Path | None = None) -> None:
    cmd = [str(a) for a in args]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed with exit {proc.returncode}: {' '.join(cmd)} (log: {log})")


def pldr(*args, log: Path | None = None) -> None:
    sh(sys.executable, "-m", "pldr_cli", *args, log=log)


def read_metrics(run: Path) -> dict:
    """Final validation loss / accuracy and the median training tokens/s from RUN/metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl is empty")
    val = [r for r in rows if r.get("val_loss") is not None]
    if not val:
        raise SystemExit(f"{run}/metrics.jsonl has no val_loss record (is --eval-every larger than --steps?)")
    last = val[-1]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    # The first logged steps include compilation and warm-up; the median is the steady rate.
    return {
        "step": last.get("step"),
        "val_loss": last["val_loss"],
        "val_acc": last.get("val_acc", last.get("acc")),
        "train_loss": rows[-1].get("loss"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def table(results: dict[str, dict], args) -> str:
    head = (f"G ablation: preset {args.preset}, {args.steps} steps, batch {args.batch_size or 'default'}, "
            f"device {args.device}, seed {args.seed}\n\n")
    lines = ["| G mode | val loss | val acc | train loss | tokens/s |", "|---|---:|---:|---:|---:|"]
    for mode, r in results.items():
        acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {mode} | {r['val_loss']:.4f} | {acc} | {r['train_loss']:.4f} | {tps} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="tiny, small or paper-110m (default tiny)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None, help="default: pretrain's default")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None,
                    help="an existing token data folder (default: tokenize the embedded corpus)")
    ap.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: preset's)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--compile", action="store_true",
                    help="pass --compile to pretrain (GPU)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown G mode(s) {bad}; choose from {MODES}")
    if "fixed" in modes and "learned" not in modes:
        ap.error("'fixed' transfers the learned run's G: include 'learned' too")

    from pldr_core.config import PRESETS  # noqa: E402  (only for defaults; no torch import)

    if args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    seq_len = args.seq_len or PRESETS[args.preset]["max_seq_len"]
    vocab = args.vocab_size or PRESETS[args.preset]["vocab_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)

    data = args.data
    if data is None:
        data = args.out / "data"
        if not (data / "meta.json").is_file():
            pldr("tokenize", "--out", data, "--vocab-size", vocab, "--seq-len", seq_len,
                 log=logs / "tokenize.log")

    common = ["--preset", args.preset, "--data", data, "--steps", args.steps, "--device", args.device,
              "--seed", args.seed, "--seq-len", seq_len]
    if args.batch_size:
        common += ["--batch-size", args.batch_size]
    common += ["--compile" if args.compile else "--no-compile"]

    results: dict[str, dict] = {}
    # 'learned' first: 'fixed' is trained with the G_LM exported from it.
    for mode in sorted(modes, key=MODES.index):
        run = args.out / mode
        extra = []
        if mode == "fixed":
            gfile = args.out / "learned-gcache.safetensors"
            pldr("export-gcache", args.out / "learned" / "final", "--out", gfile, log=logs / "export.log")
            extra = ["--g-file", gfile]
        t0 = time.perf_counter()
        if run.exists():
            import shutil

            shutil.rmtree(run)  # a rerun starts clean: metrics.jsonl would otherwise mix two runs
        pldr("pretrain", *common, "--g-mode", mode, "--out", run, *extra, log=logs / f"pretrain-{mode}.log")
        results[mode] = read_metrics(run)
        results[mode]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"  {mode}: val loss {results[mode]['val_loss']:.4f}, val acc {results[mode]['val_acc']}, "
              f"{results[mode]['wall_s']} s", flush=True)

    md = table(results, args)
    (args.out / "ablation.md").write_text(md)
    (args.out / "ablation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": results}, indent=2) + "\n")
    print()
    print(md)
    print(f"(written to {args.out / 'ablation.md'} and {args.out / 'ablation.json'})")


if __name__ == "__main__":
    main()
