"""Checks used by the coverage test and the sweep benchmark: prune a model and verify it."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from fastarch.pruning.api import masked_copy, prune
from fastarch.pruning.graph import flatten_tensors, model_call_kwargs


def _outputs(model, inputs):
    with torch.no_grad():
        return flatten_tensors(model(*inputs, **model_call_kwargs(model)))


def _max_diff(xs, ys, dtype=torch.float32) -> float:
    """Max |x - y| over pairs of outputs, computed in ``dtype`` (0 for no outputs)."""
    return max((float((x.to(dtype) - y.to(dtype)).abs().max()) for x, y in zip(xs, ys)),
               default=0.0)


def _diff_in_float64(a: nn.Module, b: nn.Module, inputs: tuple) -> float | None:
    """Max |a(x) - b(x)| with both models and the floating inputs in float64 (copies), or
    None when a model does not run in float64."""
    def to64(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    try:
        a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
        x64 = tuple(to64(x) for x in inputs)
        return _max_diff(_outputs(a64, x64), _outputs(b64, x64), torch.float64)
    except Exception:  # noqa: BLE001  (an op without float64 support: keep the fp32 verdict)
        return None


def check_model(model: nn.Module, inputs: tuple, ratio: float = 0.3, tol: float = 1e-4,
                timeout: float = 60.0) -> dict:
    """Prune ``ratio`` of every group and check (1) the forward runs with the same output
    shapes, (2) pruning the exact groups equals the masked model within ``tol``, relative to
    the output's scale (max |y| of the masked model, at least 1: a deep random-weight network
    such as resnet152 has outputs of ~1e7, where fp32 rounding alone exceeds any absolute 1e-4).
    A difference over the bound is measured again with both models in float64, where rounding
    shrinks and a real mismatch does not (``max_diff_fp64``); that one decides.

    Returns a dict: ok, reason, removed (groups), param_reduction, max_diff, rel_diff, seconds."""
    t0 = time.perf_counter()
    model = model.eval()
    ref = _outputs(model, inputs)
    res = {"ok": False, "reason": "", "removed": 0, "param_reduction": 0.0, "max_diff": None}
    same = copy.deepcopy(model)
    prune(same, inputs, ratio=0.0)
    before = model.state_dict()
    if any(not torch.equal(v, before[k]) for k, v in same.state_dict().items()):
        res["reason"] = "ratio 0 changed the model"
        return res
    pruned = copy.deepcopy(model)
    report = prune(pruned, inputs, ratio=ratio, timeout=timeout)
    res["graph_seconds"] = report.graph_seconds
    if not report.ok:
        res["reason"] = report.skipped[0][1]
        res["seconds"] = time.perf_counter() - t0
        return res
    out = _outputs(pruned, inputs)
    if [o.shape for o in out] != [o.shape for o in ref]:
        res["reason"] = "output shape changed"
        return res
    res["removed"] = len(report.removed)
    res["param_reduction"] = report.param_reduction
    exact = copy.deepcopy(model)
    rep2 = prune(exact, inputs, ratio=ratio, exact_only=True, graph=report.graph)
    masked = masked_copy(model, rep2)
    a, b = _outputs(exact, inputs), _outputs(masked, inputs)
    diff = _max_diff(a, b)
    scale = max([1.0] + [float(y.float().abs().max()) for y in b if y.numel()])
    res["max_diff"] = diff
    res["rel_diff"] = diff / scale
    res["exact_removed"] = len(rep2.removed)
    if diff > tol * scale:
        # Over the bound in fp32: the same two models in float64 tell rounding (which shrinks
        # by ~1e9 there) from a real difference (which does not).
        d64 = _diff_in_float64(exact, masked, inputs)
        if d64 is not None:
            res["max_diff_fp64"] = d64
            if d64 <= tol * scale:
                diff = d64
    if diff > tol * scale:
        res["reason"] = f"pruned != masked (max diff {diff:.2e}, output scale {scale:.2e})"
    elif res["removed"] == 0:
        res["reason"] = "nothing prunable found"
    else:
        res["ok"] = True
    res["seconds"] = time.perf_counter() - t0
    return res
