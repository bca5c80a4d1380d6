"""The backend's ``sparsity`` pass: TEAL activation sparsity on the linear layers of a graph.

``torch.compile(model, backend="fastarch", options={"sparsity": 0.5})`` replaces each
``F.linear(x, W, b)`` whose weight is a graph input (a parameter) by
``torch.ops.fastarch.teal_linear(x, W, b, t)``, which is, by definition,

    F.linear(torch.where(x.abs() > t, x, 0), W, b)

with ``t`` the ``sparsity``-quantile of ``|x|`` seen when the graph ran on the example inputs it
was compiled with (the first call's inputs: the only data a backend sees). Unlike the attention
pass this changes the outputs, by design, as :func:`fastarch.sparsify` (TEAL) does; use
``fastarch.sparsify(model, calib=...)`` for thresholds calibrated on real data and without the
extra weight copy described below.

How it runs: with at most :data:`MAX_SPARSE_ROWS` rows (decoding) the sparse GEMV kernel reads
only the weight rows of the kept input channels, from an input-major copy of ``W`` made once per
weight (kept while the weight lives; this doubles the memory of the sparsified linears); with
more rows the masked input goes to the dense ``F.linear`` (the GEMV kernel does not pay there).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fastarch import ops  # noqa: F401  (torch.ops.fastarch.sparse_gemv)

__all__ = ["teal_linear", "sparsity_pass", "MAX_SPARSE_ROWS"]

# Rows up to which the sparse GEMV kernel is used (the CPU dispatch of fastarch.sparse_gemv
# decides further per dtype and batch; see bench/RESULTS.md).
MAX_SPARSE_ROWS = 8
_CALIB_SAMPLES = 1 << 18

_WT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _input_major(w: torch.Tensor) -> torch.Tensor:
    hit = _WT.get(w)
    if hit is not None and hit[0] == w._version:
        return hit[1]
    w_t = w.detach().t().contiguous()
    _WT[w] = (w._version, w_t)
    return w_t


@torch.library.custom_op("fastarch::teal_linear", mutates_args=())
def _teal_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    threshold: float) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if 0 < rows <= MAX_SPARSE_ROWS and x.dtype == weight.dtype and x.dtype in (
            torch.float32, torch.bfloat16, torch.float16):
        x2 = x.reshape(rows, x.shape[-1])
        y = torch.ops.fastarch.sparse_gemv(x2, _input_major(weight), bias, threshold)
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    return F.linear(torch.where(x.abs() > threshold, x, 0), weight, bias)


@_teal_linear_op.register_fake
def _teal_linear_fake(x, weight, bias, threshold):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def teal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:
    """``F.linear(where(|x| > threshold, x, 0), weight, bias)``; inference only (no autograd).

    Example:
        >>> y = fastarch.compile.teal_linear(x, lin.weight, lin.bias, 0.05)
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in weight's in_features {weight.shape[1]}, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
    if not float(threshold) >= 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return torch.ops.fastarch.teal_linear(x, weight, bias, float(threshold))


# classifier / LM heads stay dense, as in TEAL (only the blocks' projections are sparsified)
_HEAD = re.compile(r"(^|\.)(lm_head|head|heads|classifier|score|fc_out|output_projection|pooler"
                   r"|pre_logits)(\.[A-Za-z_]+)?$")
_LINEAR_TARGETS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}


class _Recorder(torch.fx.Interpreter):
    """Runs the graph on the example inputs and keeps a sample of |x| for each linear input."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes = nodes
        self.samples: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.nodes:
            x = self.env[n.args[0]].detach().abs().float().flatten()
            if x.numel() > _CALIB_SAMPLES:
                step = -(-x.numel() // _CALIB_SAMPLES)
                x = x[::step]
            self.samples[n.name] = x
        return out


def sparsity_pass(gm: torch.fx.GraphModule, example_inputs, report, opts) -> None:
    from fastarch.compile.backend import Rewrite, _val, _where

    cands = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        entry = Rewrite("sparsity", "skipped", node.name, "linear", _where(node))
        report.entries.append(entry)
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        wv, xv = _val(w), _val(x)
        if not isinstance(w, torch.fx.Node) or w.op not in ("placeholder", "get_attr"):
            entry.reason = "weight is computed in the graph"
            continue
        if not isinstance(wv, torch.Tensor) or wv.dim() != 2 or not isinstance(xv, torch.Tensor):
            entry.reason = "not a 2-D weight"
            continue
        if _HEAD.search(entry.where):
            entry.reason = "output head (TEAL leaves it dense)"
            continue
        cands.append((node, entry))
    if not cands:
        return
    real = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    fake = any(isinstance(t, torch._subclasses.FakeTensor) for t in real) or not example_inputs
    if not opts.calibrate or fake:
        for _, entry in cands:
            entry.reason = "no real example inputs to calibrate the threshold on"
        return
    rec = _Recorder(gm, {n.name for n, _ in cands})
    with torch.no_grad():
        rec.run(*example_inputs)
    for node, entry in cands:
        sample = rec.samples.get(node.name)
        if sample is None or sample.numel() == 0:
            entry.reason = "input not seen during calibration"
            continue
        k = max(1, min(sample.numel(), int(round(opts.sparsity * sample.numel()))))
        t = float(sample.kthvalue(k).values) if opts.sparsity > 0 else 0.0
        args = list(node.args) + [None] * (3 - len(node.args))
        bias = args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.fastarch.teal_linear.default,
                                         (node.args[0], node.args[1], bias, t))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        entry.action, entry.target = "rewritten", "linear -> fastarch.teal_linear"
        entry.reason = f"threshold {t:.4g} ({opts.sparsity:.0%} of inputs below)"
