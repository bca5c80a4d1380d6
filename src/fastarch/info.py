"""What is built and usable here: ``python -m fastarch.info``."""
from __future__ import annotations

import platform
import sys
import types


def info(file=None) -> dict:
    """Print (and return) the torch/triton/CUDA versions and, per op, the backend serving each
    device on this machine."""
    import torch

    from fastarch import native
    from fastarch.ops.registry import OPS, op_backends

    file = file or sys.stdout
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        triton_version = "not installed"
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "triton": triton_version,
        "native_loaded": native.native_loaded(),
        "native_error": native.load_error(),
        "cuda_kernels_built": native.cuda_built(),
        "cpu_capability": native.cpu_capability(),
        "cpu_gemv_bf16": native.cpu_gemv_paths(),
        "cpu_attention": native.cpu_attention_paths(),
        "triton_usable_here": native.triton_usable(),
        "compile_backend": _compile_backend(),
        "ops": {name: op_backends(name) for name in sorted(OPS)},
    }
    w = file.write
    w("fastarch info\n")
    for key in ("python", "torch", "torch_cuda", "cuda_available", "device", "triton",
                "native_loaded", "native_error", "cuda_kernels_built", "cpu_capability",
                "cpu_gemv_bf16", "cpu_attention", "triton_usable_here", "compile_backend"):
        w(f"  {key:20s} {report[key]}\n")
    w(f"  {'op':28s} {'schema':8s} {'cpu':10s} cuda\n")
    for name, b in report["ops"].items():
        w(f"  {name:28s} {b['schema']:8s} {b['cpu']:10s} {b['cuda']}\n")
    return report


def _compile_backend() -> str:
    """Whether torch.compile(backend="fastarch") resolves here (the installed entry point)."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "fastarch"]
    return f"fastarch -> {eps[0].value}" if eps else "not registered (reinstall the package)"


class _CallableModule(types.ModuleType):
    """Lets ``fastarch.info()`` call :func:`info` while ``python -m fastarch.info`` runs it."""

    def __call__(self, *args, **kwargs):
        return info(*args, **kwargs)


if __name__ == "__main__":
    info()
else:
    sys.modules[__name__].__class__ = _CallableModule
