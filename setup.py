"""Build fastarch._C.

The CPU sources in csrc/ (ops.cpp and csrc/cpu/*.cpp) are compiled unless FASTARCH_CPU=0. The
CUDA sources (csrc/cuda/*.cu) are added when FASTARCH_CUDA allows it:

  FASTARCH_CUDA=auto (default)  build CUDA when nvcc is found and torch is a CUDA build
  FASTARCH_CUDA=1               require it (fail if nvcc or a CUDA torch is missing)
  FASTARCH_CUDA=0               CPU only
  FASTARCH_CPP=0                no native extension at all (ops fall back to their references)
  FASTARCH_CPU=0                no CPU kernels (the CUDA ones alone; CPU ops use the references)
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


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH if set, else the toolkit that owns nvcc. A wrapper script on PATH
    (as on our machines: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc) would make
    torch guess /usr/local, so look for the real toolkit folder."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
        try:
            with open(real, "rb") as f:
                text = f.read(4096).decode("utf-8", "ignore")
            for tok in text.split():
                if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                    return os.path.dirname(os.path.dirname(tok))
        except OSError:
            pass
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _pip_cuda_includes():
    """Headers torch's CUDA headers need that a slim toolkit may lack (cusparse.h, cublas...),
    taken from the nvidia-* wheels that the CUDA build of torch installs."""
    out = []
    try:
        import nvidia

        for base in nvidia.__path__:
            out += [p for p in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(p)]
    except ImportError:
        pass
    return out


def _extensions():
    if os.environ.get("FASTARCH_CPP", "1") == "0":
        print("fastarch: FASTARCH_CPP=0, not building the native extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and os.environ.get("FASTARCH_CUDA", "auto").lower() not in ("0", "false", "off"):
        os.environ.setdefault("CUDA_HOME", cuda_home)
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
    # FASTARCH_CPU=0 leaves the CPU kernels out (their ops then run the reference on CPU): a
    # build of the CUDA kernels alone, e.g. against another torch on a GPU machine
    with_cpu = os.environ.get("FASTARCH_CPU", "1").lower() not in ("0", "false", "off")
    if with_cpu:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    march = os.environ.get("FASTARCH_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp"] + (["-DFASTARCH_WITH_CPU"] if with_cpu else [])
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
    kwargs = {}
    if with_cuda:
        kwargs["include_dirs"] = _pip_cuda_includes()
    ext = ext_cls("fastarch._C", sources, extra_compile_args=extra, extra_link_args=link,
                  py_limited_api=False, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages("src") + ["fastarch.kernels"],
    package_dir={"": "src", "fastarch.kernels": "kernels"},
    package_data={"fastarch": ["data/*", "data/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
