"""Pruning tests run many tiny forward passes: one intra-op thread is much faster for them on a
small shared machine than a contended thread pool."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
