"""Last-resort build of fastarch._C for bench/gpu_run.sh: torch's JIT extension loader, no
setuptools (for a machine whose pip / setuptools cannot build the package). The library lands in
src/fastarch as _C.so; with PYTHONPATH=src (and kernels/ linked as src/fastarch/kernels) the
package imports from the checkout. CPU sources are tried with the CUDA ones, then left out."""
import glob
import os
import sys

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
cuda = torch.cuda.is_available() and os.environ.get("FASTARCH_CUDA", "1") != "0"
cu = sorted(glob.glob("csrc/cuda/*.cu")) if cuda else []
flags = ["-O3", "-fopenmp", "-march=native"] + (["-DFASTARCH_WITH_CUDA"] if cuda else [])
for with_cpu in (True, False):
    srcs = ["csrc/ops.cpp"] + (sorted(glob.glob("csrc/cpu/*.cpp")) if with_cpu else []) + cu
    try:
        load(name="_C", sources=srcs, build_directory="src/fastarch", verbose=True,
             extra_cflags=flags + (["-DFASTARCH_WITH_CPU"] if with_cpu else []),
             extra_cuda_cflags=["-O3", "-DFASTARCH_WITH_CUDA", "--use_fast_math", "-lineinfo"],
             extra_ldflags=["-fopenmp"])
        print(f"built src/fastarch/_C.so (CPU kernels: {with_cpu}, CUDA kernels: {cuda})")
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001
        print(f"JIT build with CPU kernels={with_cpu} failed: {exc}")
sys.exit(1)
