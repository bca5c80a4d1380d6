"""What the Triton launchers of fastarch.kernels ask of the runtime, in one place."""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1), whose bf16 dots are
    wrong (numpy has no bf16): the launchers upcast bf16 there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, interpreted: int) -> int:
    """Multiprocessors of a CUDA device (read once per device); ``interpreted`` off CUDA, a
    small count so that the tests exercise the launchers' splits."""
    if device.type != "cuda":
        return interpreted
    return _cuda_sm_count(device.index if device.index is not None else
                          torch.cuda.current_device())
