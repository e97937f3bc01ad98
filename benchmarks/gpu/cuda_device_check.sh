#!/usr/bin/env bash
# CUDA backend on a real GPU, in one go: install the carried wheels, run the CUDA tests on the
# GPU (slow ones too), then benchmarks/gpu/bench_cuda.py against torch bf16 F.linear.
#
# Meant for this workplace's lent GPU machine (its python3 has torch, numba and numba-cuda, but
# that numba-cuda fails to import with the image's numpy 2.5). Carry wheels in .whl/ (ignored
# by git), made on the dev machine with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     -d .whl numpy==2.4.6 numba-cuda==0.30.4 cuda-core==1.2.2 cuda-pathfinder==1.9.1
# and run:  bash benchmarks/gpu/cuda_device_check.sh   (logs in $OUT, or /tmp/cuda-check)
# TESTS=0 skips the tests, NCU=0 the profile; extra arguments go to bench_cuda.py.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

install() {  # install the named carried wheels into /tmp/site, which shadows the image's packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"
}
install .whl/numpy-*.whl .whl/numba_cuda-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

reason() { python3 -c "from bitnet.cuda import backend; print(backend.unavailable_reason())" 2>&1 | tail -1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import numpy, numba, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__)"
    python3 -m pip list 2>/dev/null | grep -i -E "^(cuda|numba|llvmlite|nvidia-nvvm|nvidia-nvjitlink)"
} 2>&1 | tee "$OUT/env.txt"
R=$(reason)
if [ "$R" != "None" ]; then
    echo "backend unavailable ($R); retrying with the carried cuda-core and cuda-pathfinder" | tee -a "$OUT/env.txt"
    install .whl/cuda_core-*.whl .whl/cuda_pathfinder-*.whl
    R=$(reason)
fi
echo "unavailable_reason: $R" | tee -a "$OUT/env.txt"

[ "${TESTS:-1}" = 1 ] && timeout 200 python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -W ignore::DeprecationWarning \
    tests/test_cuda.py tests/test_cuda_simulator.py 2>&1 | tee "$OUT/tests.txt" | tail -25
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then  # hardware counters of the kernels (works on Firecracker machines)
    timeout 150 ncu --clock-control none -k 'regex:gemv' -c 4 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats python3 benchmarks/gpu/bench_cuda.py --profile >"$OUT/ncu.txt" 2>&1
    grep -E "gemv|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles|Eligible|Issued Warp|No Eligible" \
        "$OUT/ncu.txt" | grep -v -E "^==PROF==" | sed -E 's/\(Array<.*//' | head -60
fi
timeout 330 python3 benchmarks/gpu/bench_cuda.py "$@" 2>&1 | tee "$OUT/bench.txt" | grep -v -i "warning"
