"""Shared test set-up: Triton runs in its interpreter when there is no GPU; fixed seeds."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is decorated (i.e. before fastarch.kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
