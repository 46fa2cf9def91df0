#!/usr/bin/env bash
# Data-parallel scaling of `pldr pretrain`: the same per-GPU batch on 1, 2 and 4 GPUs of this host,
# then each run's tokens/s and the scaling efficiency (examples/scaling.py, from metrics.jsonl).
#
#   bash examples/scaling.sh                                 # paper-110m, seq 1024, 16 rows per GPU
#   GPUS="1 2" PARALLEL=fsdp STEPS=60 bash examples/scaling.sh
#   MODE1=layers bash examples/scaling.sh                    # the 1-GPU run compiled per layer too
#
# The 1-GPU run is one process (compiled whole, CUDA graphs, unless MODE1=layers); the others run
# under torchrun with each decoder layer compiled, then wrapped (PARALLEL: auto, ddp or fsdp).
# Validation, checkpoints and the criticality probe happen once, at the end, so they stay out of the
# timed steps; the first SKIP steps (compilation) are left out of the median.
set -euo pipefail

GPUS=${GPUS:-"1 2 4"}
PRESET=${PRESET:-paper-110m}
SEQ=${SEQ:-1024}
BATCH=${BATCH:-16}
STEPS=${STEPS:-40}
SKIP=${SKIP:-10}
PARALLEL=${PARALLEL:-auto}
MODE1=${MODE1:-graphs}
DATA=${DATA:-runs/scaling/data}
OUT=${OUT:-runs/scaling}

if [ ! -f "$DATA/meta.json" ]; then
  # the embedded public-domain corpus (rows repeat across epochs: fine for throughput)
  pldr tokenize --out "$DATA" --vocab-size 8000 --seq-len "$SEQ"
fi

RUNS=()
for N in $GPUS; do
  RUN="$OUT/gpu$N-$PARALLEL"
  rm -rf "$RUN"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} torchrun --standalone --nproc-per-node "$N" -m pldr_cli pretrain \
    --preset "$PRESET" --data "$DATA" --out "$RUN" --seq-len "$SEQ" --steps "$STEPS" \
    --batch-size "$((N * BATCH))" --device cuda --parallel "$PARALLEL" --compile-mode "$MODE1" \
    --eval-every "$STEPS" --save-every "$STEPS" --eval-batches 1 --criticality-every 0
  RUNS+=("$RUN")
done

python "$(dirname "$0")/scaling.py" --skip "$SKIP" "${RUNS[@]}"
