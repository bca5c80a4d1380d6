"""Loading of the native extension and the record of which backend serves each op.

The import of fastarch never fails because a native part is missing: the extension is loaded here
once; when it cannot be, one warning is issued and every op falls back to its PyTorch reference.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

_C = None
_LOAD_ERROR: str | None = None


def _load():
    global _C, _LOAD_ERROR
    if os.environ.get("FASTARCH_DISABLE_NATIVE", "0") == "1":
        _LOAD_ERROR = "disabled by FASTARCH_DISABLE_NATIVE=1"
        return
    try:
        import torch  # noqa: F401  (loads libc10/libtorch that the extension links against)

        _C = importlib.import_module("fastarch._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol, wrong torch), ...
        _C = None
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "fastarch: the native extension fastarch._C could not be loaded "
            f"({_LOAD_ERROR}); every op falls back to its PyTorch reference. "
            "Rebuild with `pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def native_loaded() -> bool:
    """Whether fastarch._C (the C++ CPU kernels and the op schemas) is loaded."""
    return _C is not None


def load_error() -> str | None:
    return _LOAD_ERROR


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into fastarch._C."""
    return _C is not None and bool(_C.cuda_built())


def cpu_capability() -> str:
    return _C.cpu_capability() if _C is not None else "none"


def cpu_gemv_paths() -> str:
    """The bf16 batch kernels of sparse_gemv this build runs on this CPU: "bf16-dot"
    (AVX512-BF16), "amx" (AMX tiles, from 8 rows), both, or "widening" (fp32 FMAs)."""
    return _C.cpu_gemv_paths() if _C is not None and hasattr(_C, "cpu_gemv_paths") else "none"


def cpu_attention_paths() -> str:
    """The tile products of the CPU attention prefill on this CPU, e.g. "bf16 amx, fp32 brgemm"
    (AMX tiles and oneDNN's fp32 kernels through libtorch) or "bf16 bf16-dot, fp32 avx2", and
    ", grouped decode" where the build has the AVX-512 decode of GQA groups."""
    if _C is None or not hasattr(_C, "cpu_attention_paths"):
        return "none"
    return _C.cpu_attention_paths()


def cpu_attention_amx() -> bool:
    """Whether the CPU attention prefill runs its bf16 tiles on AMX here (cheap: no timing)."""
    return _C is not None and hasattr(_C, "cpu_attention_amx") and bool(_C.cpu_attention_amx())


def cpu_attention_grouped_decode() -> bool:
    """Whether CPU decode calls run each GQA group as one unit here (an AVX-512 build; cheap)."""
    return (_C is not None and hasattr(_C, "cpu_attention_grouped_decode")
            and bool(_C.cpu_attention_grouped_decode()))


def triton_available() -> bool:
    """Whether Triton imports (its kernels need a CUDA device, or TRITON_INTERPRET=1 on CPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_usable() -> bool:
    if not triton_available():
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"
