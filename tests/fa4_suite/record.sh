#!/usr/bin/env bash
# Learn tests/fa4_suite/h100-fa4-suite.yaml from the cases of cases.txt, on a CPU box (no GPU):
#   tests/fa4_suite/record.sh [MANIFEST]
# FA4's test file runs in its own fake-tensor mode (FLASH_ATTENTION_FAKE_TENSOR=1) under
# `fa4aot record --no-compile` (FA4's _compile_misses probe: its forward, combine and prepare keys
# are recorded, nothing compiles; FA4's backward calls are recorded and not run), for an H100
# (sm_90a, 132 SMs). A CPU build of torch cannot run autograd on fake CUDA tensors (no CUDA device
# guard or hooks): fakecuda.cpp registers stand-ins, preloaded into the test process only.
# Fake mode skips some of the file's calls (precomputed scheduler metadata, LSE gradients):
# .devcarry/fa4suite_run.sh records on the GPU instead, where every call runs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MANIFEST=${1:-$HERE/h100-fa4-suite.yaml}
BUILD=${FA4SUITE_BUILD:-$ROOT/.devcarry/fa4suite-build}
mkdir -p "$BUILD"
TORCH=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
if [ ! -f "$BUILD/libfakecuda.so" ] || [ "$HERE/fakecuda.cpp" -nt "$BUILD/libfakecuda.so" ]; then
  g++ -O1 -shared -fPIC -std=c++20 -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
    "$HERE/fakecuda.cpp" -L"$TORCH/lib" -lc10 -ltorch_cpu -Wl,-rpath,"$TORCH/lib" -o "$BUILD/libfakecuda.so"
fi
cd "$ROOT"
export FA4AOT_FA4_SUITE=1 FLASH_ATTENTION_FAKE_TENSOR=1 FA4SUITE_CASES=$HERE/cases.txt \
  FLASH_ATTENTION_ARCH=sm_90a CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132 \
  FA4SUITE_COUNTS=$BUILD/record-counts
unset FA4AOT_PATCH
# the tests fail where they compare with a reference FA4 never computed (fake mode skips most of
# those checks; test_flash_attn_invalid_head_dim is not in fake mode): record's exit status is theirs
fa4aot record --no-compile --target h100 -o "$MANIFEST" -- \
  env LD_PRELOAD="$BUILD/libfakecuda.so" python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  --junitxml="$BUILD/record-junit.xml" "$HERE/test_flash_attn.py" || true
echo "FA4's kernels the cases need (its probe's misses):"
cat "$BUILD"/record-counts*.json
test -s "$MANIFEST"
