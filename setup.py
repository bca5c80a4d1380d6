"""Build fastarch._C.

The CPU sources in csrc/ (ops.cpp and csrc/cpu/*.cpp) are always compiled. The CUDA sources
(csrc/cuda/*.cu) are added when FASTARCH_CUDA allows it:

  FASTARCH_CUDA=auto (default)  build CUDA when nvcc is found and torch is a CUDA build
  FASTARCH_CUDA=1               require it (fail if nvcc or a CUDA torch is missing)
  FASTARCH_CUDA=0               CPU only
  FASTARCH_CPP=0                no native extension at all (ops fall back to their references)
  FASTARCH_CPU_ARCH=native      -march value for the CPU kernels ("" to leave the default)
  TORCH_CUDA_ARCH_LIST          defaults to "8.0;9.0" (A100 and H100/H200)
  MAX_JOBS                      parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    if os.environ.get("FASTARCH_CPP", "1") == "0":
        print("fastarch: FASTARCH_CPP=0, not building the native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    mode = os.environ.get("FASTARCH_CUDA", "auto").lower()
    have_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    have_cuda_torch = torch.version.cuda is not None
    if mode in ("1", "true", "on"):
        if not (have_nvcc and have_cuda_torch):
            raise RuntimeError(
                f"FASTARCH_CUDA=1 but nvcc found={have_nvcc}, torch CUDA build={have_cuda_torch}"
            )
        with_cuda = True
    elif mode in ("0", "false", "off"):
        with_cuda = False
    else:
        with_cuda = have_nvcc and have_cuda_torch

    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    march = os.environ.get("FASTARCH_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-DFASTARCH_WITH_CPU"]
    if march:
        cxx.append(f"-march={march}")
    extra = {"cxx": cxx}
    link = ["-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        extra["cxx"].append("-DFASTARCH_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DFASTARCH_WITH_CUDA", "--use_fast_math",
                         "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print(f"fastarch: building _C with CUDA={'yes' if with_cuda else 'no'} "
          f"({len(sources)} sources, -march={march or 'default'})")
    ext = ext_cls("fastarch._C", sources, extra_compile_args=extra, extra_link_args=link,
                  py_limited_api=False)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages("src") + ["fastarch.kernels"],
    package_dir={"": "src", "fastarch.kernels": "kernels"},
    package_data={"fastarch": ["data/*", "data/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
