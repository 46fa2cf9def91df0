#!/usr/bin/env bash
# Single-node multi-GPU pretraining with torchrun (DDP or FSDP2 through `pldr pretrain`).
#
#   bash examples/multi_gpu.sh                 # every visible GPU, preset small
#   NPROC=4 PRESET=paper-110m STEPS=20000 DATA=data/tok bash examples/multi_gpu.sh
#   PARALLEL=fsdp COMPILE=0 bash examples/multi_gpu.sh     # FSDP2, eager
#
# BATCH is the per-GPU batch; `pldr pretrain --batch-size` takes the global batch (kept fixed across
# world sizes), so NPROC x BATCH rows are passed.
# Only rank 0 writes RUN/metrics.jsonl and the checkpoints; rerun with RESUME=1 to continue from the
# last RUN/step-XXXXXXXX/ folder.
set -euo pipefail

NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
PRESET=${PRESET:-small}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-16}
DATA=${DATA:-runs/multi_gpu/data}
OUT=${OUT:-runs/multi_gpu/run}

if [ ! -f "$DATA/meta.json" ]; then
  # the embedded public-domain corpus; point DATA at your own `pldr tokenize` output for real work
  pldr tokenize --out "$DATA" --vocab-size 8000 --seq-len 256
fi

EXTRA=(--parallel "${PARALLEL:-auto}")
[ "${RESUME:-0}" = 1 ] && EXTRA+=(--resume)
[ "${COMPILE:-1}" = 0 ] && EXTRA+=(--no-compile)   # compiled per decoder layer by default

# Rendezvous on this host only; OMP threads per rank kept small so the data loaders do not fight.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} torchrun --standalone --nproc-per-node "$NPROC" -m pldr_cli pretrain \
  --preset "$PRESET" --data "$DATA" --out "$OUT" --steps "$STEPS" --batch-size "$((NPROC * BATCH))" \
  --device cuda "${EXTRA[@]}"

echo "model: $OUT/final   metrics: $OUT/metrics.jsonl"
