#!/usr/bin/env bash
# One-go check of pylb's CUDA similarity twin on a machine with a GPU: builds pylb with
# PYLB_CUDA=ON (into /tmp/pylb-gpu-site, leaving the Python environment alone), runs the CUDA tests
# of tests/test_similarity.py (CUDA vs CPU twin vs numpy, CuPy input), then times
# B=64, N=100k, D=384, k=10 on the GPU against pylb's CPU path and numpy, then the semantic cache's
# lookup grid (10k/100k/1M keys x D=384/768 x batch 1/16/64, k=4) on the GPU against the CPU and
# numpy (bench/bench_cache.py lookup --cuda; results in bench/results/cache_lookup_gpu.json), and
# the cache's store tests with its CUDA path (tests/test_cache_units.py -m cuda).
#
#   bash bench/gpu_check.sh            # needs: nvcc, cuBLAS (toolkit or the nvidia-cublas wheel),
#                                      # CuPy, pytest, hypothesis, pybind11, scikit-build-core, cmake,
#                                      # and the system packages libxxhash-dev and libopenblas-dev
#   bash bench/gpu_check.sh DEB_DIR    # same, but xxHash and OpenBLAS come from the .deb files in
#                                      # DEB_DIR (for a machine without apt access), unpacked under
#                                      # /tmp/pylb-deps, never into /
# PYTHON selects the interpreter (default python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SITE=/tmp/pylb-gpu-site

if [[ $# -ge 1 ]]; then
  DEPS=/tmp/pylb-deps
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for f in "$1"/*.deb; do dpkg -x "$f" "$DEPS"; done
  LIB=$(ls -d "$DEPS"/usr/lib/*-linux-gnu | head -1)
  export LD_LIBRARY_PATH="$LIB:$LIB/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CMAKE_ARGS="-DXXHASH_INCLUDE_DIR=$DEPS/usr/include -DXXHASH_LIBRARY=$LIB/libxxhash.so \
-DCBLAS_INCLUDE_DIR=$DEPS/usr/include/$(basename "$LIB")/openblas-pthread \
-DBLAS_openblas_LIBRARY=$LIB/openblas-pthread/libopenblas.so"
fi

nvidia-smi -L || echo "(nvidia-smi not found)"
"$PY" -c "import cupy, pytest, hypothesis, pybind11, scikit_build_core" \
  || { echo "gpu_check: needs cupy, pytest, hypothesis, pybind11 and scikit-build-core in $PY"; exit 1; }

echo "== build (PYLB_CUDA=ON)"
rm -rf "$SITE"
PYLB_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps --target "$SITE" \
  -C build-dir="$ROOT/build/gpu-check" "$ROOT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd /tmp  # so that the source tree never shadows the installed package
"$PY" -c "from pylb import native; print('built_with_cuda', native.built_with_cuda(), 'cuda_available', native.cuda_available())"
"$PY" -c "from pylb import native; assert native.cuda_available(), 'pylb sees no CUDA device'"

echo "== tests (-m cuda)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda "$ROOT/tests/test_similarity.py" "$ROOT/tests/test_cache_units.py"

echo "== benchmark"
"$PY" "$ROOT/bench/bench_similarity.py" --cuda

echo "== semantic cache lookups: GPU against CPU and numpy"
"$PY" "$ROOT/bench/bench_cache.py" lookup --cuda --sizes 10000,100000,1000000 --dims 384,768 --batches 1,16,64
