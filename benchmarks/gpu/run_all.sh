#!/usr/bin/env bash
# One prepared GPU check for issue #3 (target: < 8 minutes on one GPU). Run from the repo root on a
# machine with a CUDA device and the GPU image's own torch/triton (no installs there):
#     bash benchmarks/gpu/run_all.sh            # results also land in $OUT (or ./gpu-results)
# Steps: (1) build fmrt._C with the CUDA kernels (sm_90 + sm_87), (2) run every @gpu test and the
# kernel tests on CUDA tensors, (3) time every op against its baseline, printing the table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
RES="${OUT:-gpu-results}"
mkdir -p "$RES"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L 2>&1 | tee "$RES/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$RES/device.txt"

echo "== build (FMRT_BUILD_CUDA=1)"
( time FMRT_BUILD_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 240 "$PY" setup.py build_ext --inplace ) \
    > "$RES/build.log" 2>&1; echo "build rc=$?"; tail -3 "$RES/build.log"

echo "== gpu tests"
timeout 180 "$PY" -m pytest -q -x -m gpu tests -p no:cacheprovider 2>&1 | tee "$RES/tests.log" | tail -15

echo "== timings"
timeout 150 "$PY" benchmarks/gpu/run_all.py --out "$RES/timings.json" 2>&1 | tee "$RES/timings.log"
