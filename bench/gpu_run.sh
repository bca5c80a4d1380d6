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
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FASTARCH_CUDA=1
PIP="python3 -m pip install -q --no-build-isolation --no-deps --no-index -e ."
# the whole extension; else the CUDA kernels alone (the CPU sources against this torch may
# fail); else no native extension (the Triton kernels still serve every op on the GPU)
if ! $PIP > "$OUT/build.log" 2>&1; then
    echo "full build failed:"; grep -m5 -B2 -A3 "error" "$OUT/build.log"
    if ! FASTARCH_CPU=0 $PIP > "$OUT/build_cuda_only.log" 2>&1; then
        echo "CUDA-only build failed:"; grep -m5 -B2 -A3 "error" "$OUT/build_cuda_only.log"
        FASTARCH_CPP=0 $PIP > "$OUT/build_python.log" 2>&1 || tail -20 "$OUT/build_python.log"
    fi
fi
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp && python3 -m fastarch.info 2>&1 | tee "$OUT/info.txt"; cd "$ROOT"
t1=$(date +%s)
PYTHONSAFEPATH=1 timeout "${TEST_S:-100}" python3 -m pytest -q -p no:cacheprovider -n 8 \
    --timeout 90 tests/ops -k "triton or gpu or cuda" > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t1 )) s"
tail -15 "$OUT/tests.log"
t2=$(date +%s)
(cd /tmp && timeout "${BENCH_S:-360}" python3 "$ROOT/bench/bench_gpu.py" \
    --sections "${SECTIONS:-ceil,gemv,attn,nm,models,mlp}" --out "$OUT/gpu_bench.md" > "$OUT/bench.log" 2>&1)
echo "bench rc=$? in $(( $(date +%s) - t2 )) s"
grep -i "fail\|error" "$OUT/bench.log" | head -20
cat "$OUT/gpu_bench.md"
