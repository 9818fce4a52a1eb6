#!/usr/bin/env bash
# The README's main-job command: install lsjax, train the tiny Transformer on the built-in
# synthetic translation task (CPU, a few minutes), report validation loss/BLEU and translate
# with beam search. Extra arguments are passed to lsjax-train as overrides (e.g. steps=300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
lsjax-info
lsjax-train --config tiny-synthetic "$@"
