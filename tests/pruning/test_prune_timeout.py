"""The graph-building time limit: no signals, cancels cleanly, works from any thread."""
import signal
import threading
import time

import pytest
import torch
from torch import nn

from fastarch.pruning import GraphBuildError, prune
from fastarch.pruning.graph import export_model


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        time.sleep(0.02)
        return torch.relu(self.fc(x))


def _slow_model(n=100):
    return nn.Sequential(*[Slow() for _ in range(n)]).eval()


def _trace_threads():
    return [t for t in threading.enumerate() if t.name == "fastarch-prune-trace"]


def test_overrun_unwinds_the_trace_without_signals():
    handler = signal.getsignal(signal.SIGALRM)
    before = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout may hold one already
    with pytest.raises(GraphBuildError, match="time limit"):
        export_model(_slow_model(), (torch.randn(2, 8),), timeout=0.1)
    assert signal.getsignal(signal.SIGALRM) is handler
    after = signal.getitimer(signal.ITIMER_REAL)
    assert after[1] == before[1] and after[0] <= before[0]  # not armed or re-armed by us
    for t in _trace_threads():  # cancelled at its next module call, not abandoned
        t.join(5.0)
    assert not _trace_threads()


def test_hooks_removed_and_model_unchanged_after_timeout():
    model = _slow_model(60)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(model, torch.randn(2, 8), ratio=0.5, timeout=0.05)
    assert not report.ok and "time limit" in report.skipped[0][1]
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_time_limit_from_a_worker_thread():
    out = {}

    def work():
        out["report"] = prune(_slow_model(60), torch.randn(2, 8), ratio=0.5, timeout=0.05)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        out["ok"] = prune(m, torch.randn(2, 8), ratio=0.5, timeout=60)

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert not out["report"].ok
    assert out["ok"].ok and out["ok"].params_after < out["ok"].params_before


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, xs):
        x, cls = xs
        return self.fc(torch.cat([cls, x], 1)).relu()[:, 1:], cls


class _PitLike(nn.Module):
    """Like timm PiT: a parameter-derived tensor handed to a submodule inside a tuple, which
    torch's FLOP counter (its module tracker) cannot hook under no_grad."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = _TupleBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x, _ = self.block((x, self.cls.expand(x.shape[0], -1, -1)))
        return self.head(x.mean(1))


def test_flops_counted_when_a_module_gets_a_grad_tensor_without_grad_fn():
    from fastarch.pruning import count_flops

    model = _PitLike().eval()
    x = torch.randn(2, 5, 8)
    assert count_flops(model, (x,)) > 0
    report = prune(model, x, ratio=0.5)
    assert report.ok and report.flops_after < report.flops_before
    assert model(x).shape == (2, 3)
