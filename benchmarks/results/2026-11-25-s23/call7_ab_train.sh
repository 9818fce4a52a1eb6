#!/usr/bin/env bash
# Scratch (never committed): transformer-base bf16 train step, tree 9fa4f0c (scratch_exp/old) against the
# working tree, one machine. Each tree's extension is built in place; no pip install of lsjax.
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
echo "builds took $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=uuid --format=csv,noheader
for t in new old; do
  dir=.; [ "$t" = old ] && dir=scratch_exp/old
  (cd "$dir" && python3 -m benchmarks.train_step --models transformer-base --dtypes bfloat16 --out "$OUT/train_$t.json") \
    > "$OUT/train_$t.log" 2>&1
  echo "== $t"; grep -E "^\| transformer-base" "$OUT/train_$t.log"
done
