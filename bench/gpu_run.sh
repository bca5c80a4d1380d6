#!/bin/bash
# One device lease, one command: build fastarch for sm_90 on the GPU machine, run
# bench/bench_gpu.py (checks + same-run ratios) and the GPU tests; everything lands in $OUT.
#   bash bench/gpu_run.sh            (on the device machine, from the repository root)
# BENCH_S / TEST_S bound the two parts (seconds); SECTIONS picks bench sections.
set -u
OUT=${OUT:-/tmp/fastarch_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 | tee "$OUT/smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
t0=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTARCH_CUDA=${FASTARCH_CUDA:-1}
# pip: the whole extension; else the CUDA kernels alone (the CPU sources against this torch may
# fail). An older setuptools (< 77) rejects pyproject's `license = "..."`: then drop that line in
# this copy and try both again. Last: build _C with torch's JIT loader into src/fastarch.
try_pip() {  # try_pip LOG [VAR=value ...]
    local log=$1; shift
    env "$@" python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . \
        > "$OUT/$log.log" 2>&1
}
if ! try_pip build && ! try_pip build_cuda_only FASTARCH_CPU=0; then
    echo "pip build failed:"; grep -m3 -A3 -i "error" "$OUT/build.log"
    grep -q "project.license" "$OUT/build.log" && sed -i '/^license = /d' pyproject.toml
    if ! try_pip build2 && ! try_pip build2_cuda_only FASTARCH_CPU=0; then
        echo "pip failed again; torch.utils.cpp_extension.load into src/fastarch"
        ln -sfn ../../kernels src/fastarch/kernels
        python3 bench/gpu_jit_build.py > "$OUT/build_jit.log" 2>&1 || tail -30 "$OUT/build_jit.log"
        export PYTHONPATH="$ROOT/src"
    fi
fi
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp && python3 -m fastarch.info 2>&1 | tee "$OUT/info.txt"; cd "$ROOT"
t1=$(date +%s)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # (pytest-xdist, where installed)
PYTHONSAFEPATH=1 timeout "${TEST_S:-100}" python3 -m pytest -q -p no:cacheprovider $XDIST \
    --timeout 90 tests/ops -k "triton or gpu or cuda" > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t1 )) s"
tail -15 "$OUT/tests.log"
t2=$(date +%s)
(cd /tmp && timeout "${BENCH_S:-360}" python3 "$ROOT/bench/bench_gpu.py" \
    --sections "${SECTIONS:-ceil,gemv,attn,nm,models,mlp}" --out "$OUT/gpu_bench.md" > "$OUT/bench.log" 2>&1)
echo "bench rc=$? in $(( $(date +%s) - t2 )) s"
grep -i "fail\|error" "$OUT/bench.log" | head -20
cat "$OUT/gpu_bench.md"
