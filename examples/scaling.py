"""Tokens/s and data-parallel scaling efficiency of finished `pldr pretrain` runs.

    python examples/scaling.py runs/scaling/gpu1 runs/scaling/gpu2 runs/scaling/gpu4 [--skip 10]

Each run folder holds metrics.jsonl and final/meta.json (world size, plan, compile mode). A run's
throughput is the median tokens_per_s over its steps after the first ``--skip`` (compilation and
warm-up); efficiency is tokens/s over (world size / the base run's world size) x the base run's
tokens/s, the base being the run of the fewest processes. At a fixed per-GPU batch, 100% is perfect
scaling. `examples/scaling.sh` makes the runs and calls this.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def throughput(run: Path, skip: int) -> dict:
    """A run's world size, plan, compile mode and median tokens/s after ``skip`` steps."""
    run = Path(run)
    meta = json.loads((run / "final" / "meta.json").read_text())
    par = meta.get("parallel", {"plan": "none", "world_size": 1, "compile": "?"})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > skip]
    if not rates:
        raise SystemExit(f"{run}: no step after the first {skip} logged tokens_per_s; run more --steps")
    return {"run": str(run), "world_size": par["world_size"], "plan": par["plan"], "compile": par["compile"],
            "steps": len(rates), "tokens_per_s": statistics.median(rates)}


def scaling(runs: list[Path], skip: int) -> list[dict]:
    """``throughput`` of each run plus its ``efficiency`` against the run of the fewest processes."""
    rows = sorted((throughput(r, skip) for r in runs), key=lambda row: row["world_size"])
    base = rows[0]
    for row in rows:
        ideal = base["tokens_per_s"] * row["world_size"] / base["world_size"]
        row["efficiency"] = row["tokens_per_s"] / ideal
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of `pldr pretrain`")
    ap.add_argument("--skip", type=int, default=10, help="leading steps left out (compile, warm-up)")
    args = ap.parse_args(argv)
    print(f"{'GPUs':>4}  {'plan':<5} {'compile':<7} {'tokens/s':>12}  {'efficiency':>10}  run")
    for row in scaling(args.runs, args.skip):
        print(f"{row['world_size']:>4}  {row['plan']:<5} {row['compile']:<7} {row['tokens_per_s']:>12,.0f}  "
              f"{row['efficiency']:>10.1%}  {row['run']}")


if __name__ == "__main__":
    main()
