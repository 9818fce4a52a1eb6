#!/usr/bin/env bash
# Multi30k En-De convergence run (issue 5): transformer-base, configs/train/multi30k.yaml.
#
#   OUT=/tmp/out bash benchmarks/convergence.sh lsjax        # fp16 params only, lsjax optimizer
#   OUT=/tmp/out bash benchmarks/convergence.sh fp32master   # fp32 master weights + optax.adamw, fp16 compute
#   extra key=value overrides go after the variant (e.g. steps=3000)
#
# Needs Multi30k in .data/multi30k (copy ../shared/data/multi30k there; pass ".data" in the
# device tool's `carry`). The run directory (checkpoints) stays outside $OUT; its metrics.jsonl,
# summary.json and config.json are copied to $OUT/multi30k_<variant>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
variant=${1:?usage: convergence.sh lsjax|fp32master [overrides]}; shift
case "$variant" in
  lsjax) extra=() ;;
  fp32master) extra=(master_weights=true) ;;
  *) echo "variant must be lsjax or fp32master, got $variant" >&2; exit 2 ;;
esac
DATA=${MULTI30K:-.data/multi30k}
[ -f "$DATA/train.en.gz" ] || { echo "Multi30k not found in $DATA (copy ../shared/data/multi30k there)" >&2; exit 2; }
RUN=${RUN_ROOT:-/tmp/lsjax_runs}/multi30k_$variant
rm -rf "$RUN"
python3 -m lsjax.train --config multi30k --data-dir "$DATA" --run-dir "$RUN" \
  compilation_cache="${LSJAX_COMPILATION_CACHE:-~/.cache/lsjax/jax_compilation_cache}" "${extra[@]}" "$@"
mkdir -p "$OUT/multi30k_$variant"
cp "$RUN"/metrics.jsonl "$RUN"/summary.json "$RUN"/config.json "$OUT/multi30k_$variant/"
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "eval":
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
PY
