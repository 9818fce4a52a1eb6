#!/usr/bin/env bash
# Scratch (never committed): layer norm and embedding, tree 9fa4f0c (scratch_exp/old) against the working
# tree, on one machine, rounds alternating. Each tree's extension is built in place; no pip install of lsjax.
set -u
OUT=${OUT:-/tmp/ab}; mkdir -p "$OUT"
pip install --no-index --no-deps .whl/*.whl > "$OUT/deps.log" 2>&1
pip uninstall -y lsjax >> "$OUT/deps.log" 2>&1
P=$(python3 -c 'import pybind11;print(pybind11.get_cmake_dir())')
build() {
  cmake -S "$1" -B "/tmp/b_$2" -G Ninja -DLSJAX_CUDA=ON -DLSJAX_CUDA_ARCHITECTURES=90a-real -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$P" > "$OUT/cmake_$2.log" 2>&1 && ninja -C "/tmp/b_$2" > "$OUT/ninja_$2.log" 2>&1 &&
    cp /tmp/b_$2/_ffi*.so "$1/lsjax/"
}
start=$(date +%s)
build scratch_exp/old old & build . new & wait
echo "builds took $(( $(date +%s) - start )) s"; ls scratch_exp/old/lsjax/_ffi*.so lsjax/_ffi*.so
nvidia-smi --query-gpu=uuid --format=csv,noheader
ONLY='layer_norm (65536x(512|1024|4096)|8192x4096) bfloat16|embedding 256x256x1024 bfloat16'
for r in 0 1; do
  for t in old new; do
    dir=.; [ "$t" = old ] && dir=scratch_exp/old
    (cd "$dir" && python3 -m benchmarks.ops --ops layer_norm,embedding --only "$ONLY" --json "$OUT/ab_${t}_r$r.json") \
      > "$OUT/ab_${t}_r$r.log" 2>&1
    echo "== $t round $r"; grep -E "copy bandwidth|^(layer_norm|embedding) " "$OUT/ab_${t}_r$r.log"
  done
done
