#!/usr/bin/env bash
# The README's main-job command: install lsjax and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
lsjax-info
lsjax-demo
