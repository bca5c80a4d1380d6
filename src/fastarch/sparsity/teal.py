"""TEAL: per-layer magnitude thresholds on the inputs of linear layers, calibrated so that each
layer skips a target fraction of its input channels."""
from __future__ import annotations

import torch
from torch import nn

_MAX_PER_CALL = 1 << 18  # values sampled from one forward call of one layer
_MAX_PER_LAYER = 1 << 21  # values kept per layer for the quantile


class _AbsSampler:
    """Collects a uniform sample of |x| from a module's input across calls."""

    def __init__(self, generator: torch.Generator):
        self.parts: list[torch.Tensor] = []
        self.count = 0
        self.g = generator

    def __call__(self, module, args):
        x = args[0].detach().abs().float().reshape(-1)
        if x.numel() > _MAX_PER_CALL:
            idx = torch.randint(0, x.numel(), (_MAX_PER_CALL,), generator=self.g)
            x = x[idx.to(x.device)]
        if self.count < _MAX_PER_LAYER:
            self.parts.append(x.cpu())
            self.count += x.numel()

    def threshold(self, sparsity: float) -> float:
        if not self.parts:
            raise RuntimeError("no activations were seen: the calibration batches never reached "
                               "this layer")
        v = torch.cat(self.parts)
        if sparsity <= 0:
            return 0.0
        k = min(v.numel(), max(1, int(round(sparsity * v.numel()))))
        return float(v.kthvalue(k).values)


def run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, modules: dict[str, nn.Module], batches,
                         sparsity: float | dict[str, float], seed: int = 0) -> dict[str, float]:
    """Thresholds t per module such that a fraction ``sparsity`` of the |inputs| seen on
    ``batches`` are <= t."""
    g = torch.Generator().manual_seed(seed)
    samplers = {name: _AbsSampler(g) for name in modules}
    handles = [m.register_forward_pre_hook(samplers[n]) for n, m in modules.items()]
    try:
        for batch in batches:
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, s in samplers.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        out[name] = s.threshold(target)
    return out
