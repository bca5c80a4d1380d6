"""N:M semi-structured pruning of Linear layers (``fastarch.prune(..., pattern="2:4")``).

Every ``nn.Linear`` and every transformers ``Conv1D`` (GPT-2 style, weight stored (in, out))
that is not ignored and whose input width is a multiple of m keeps the n best of every m input
weights, by magnitude or by Wanda score (|w| * ||x_j|| on calibration data). A layer becomes an
:class:`NMLinear` (compressed values + uint8 indices, :func:`fastarch.nm_linear`) only where that
measures faster than the dense product on this device at the given batch; elsewhere it keeps a
dense weight with the pruned entries set to zero (same numbers, dense speed).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from fastarch.ops.nm_linear import nm_compress, nm_decompress, nm_linear


class NMLinear(nn.Module):
    """A Linear whose weight is stored N:M-compressed; forward runs ``fastarch.nm_linear``."""

    def __init__(self, values, indices, bias, n: int, m: int, in_features: int):
        super().__init__()
        self.n, self.m = n, m
        self.in_features, self.out_features = in_features, values.shape[0]
        self.values = nn.Parameter(values, requires_grad=False)
        self.register_buffer("indices", indices)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Module, n: int = 2, m: int = 4, scores=None) -> NMLinear:
        """From an ``nn.Linear`` or a transformers ``Conv1D``; ``scores`` is (out, in)."""
        w = out_in_weight(linear)
        values, indices = nm_compress(w, n, m, scores)
        return cls(values, indices, linear.bias, n, m, w.shape[1])

    def dense_weight(self) -> torch.Tensor:
        return nm_decompress(self.values, self.indices, self.n, self.m)

    def forward(self, x):
        return nm_linear(x, self.values, self.indices, self.bias, self.n, self.m)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, pattern={self.n}:{self.m}"


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style): a linear layer whose weight is stored (in, out)."""
    w = getattr(mod, "weight", None)
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and \
        isinstance(w, torch.Tensor) and w.dim() == 2


def out_in_weight(mod: nn.Module) -> torch.Tensor:
    """The weight of a Linear or Conv1D as (out, in), detached (a view for Conv1D)."""
    w = mod.weight.detach()
    return w.t() if is_conv1d(mod) else w


def _median_ms(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _wanda_scores(model, calib) -> dict[str, torch.Tensor]:
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or is_conv1d(mod):
            def hook(m, args, _name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                norms[_name] = norms.get(_name, 0) + x.pow(2).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in calib:
                batch = batch if isinstance(batch, (tuple, list)) else (batch,)
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in norms.items()}


def prune_nm(model: nn.Module, pattern: str = "2:4", importance: str = "l2", calib=None,
             ignore=(), batch: int = 1, measure: bool = True):
    """Make every Linear (and transformers Conv1D) N:M sparse; returns a
    :class:`~fastarch.pruning.PruneReport`.

    Groups of ``m`` run along the input (reduction) dimension, for a Conv1D too (its weight is
    stored transposed). ``importance``: "l1"/"l2" (magnitude) or "activation" (Wanda, needs
    ``calib``). ``batch``: the batch size the sparse-vs-dense timing is measured at (decode: 1).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(16, 8)).eval()
        >>> report = prune_nm(model, "2:4", measure=False)
        >>> int((model[0].weight != 0).sum())
        64
    """
    from fastarch.pruning.api import PruneReport, count_params

    n, m = (int(v) for v in pattern.split(":"))
    report = PruneReport()
    report.params_before = count_params(model)
    ignored = {id(x) for x in ignore if isinstance(x, nn.Module)}
    ignored_names = [x for x in ignore if isinstance(x, str)]
    scores = _wanda_scores(model, calib) if importance == "activation" and calib else {}
    owners: dict[int, int] = {}  # weight -> number of modules holding it (tied embeddings)
    for mod in model.modules():
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is not None:
            owners[id(w)] = owners.get(id(w), 0) + 1
    targets = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)) or id(mod) in ignored:
            continue
        if any(name == p or name.startswith(p + ".") for p in ignored_names):
            continue
        if owners.get(id(mod.weight), 0) > 1:
            report.skipped.append((name, "weight tied to another module (e.g. the input "
                                   "embedding): left dense"))
            continue
        in_features = out_in_weight(mod).shape[1]
        if in_features % m:
            report.skipped.append((name, f"in_features {in_features} not a multiple of {m}"))
            continue
        targets.append((name, mod))
    kept_nonzero = 0
    for name, mod in targets:
        w = out_in_weight(mod)
        s = None
        if name in scores:
            s = w.abs().float() * scores[name].to(w.device)[None, :]
        layer = NMLinear.from_linear(mod, n, m, s)
        use_sparse = False
        if measure:
            x = torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device)
            with torch.no_grad():
                t_dense = _median_ms(lambda mod=mod, x=x: mod(x))
                t_sparse = _median_ms(lambda layer=layer, x=x: layer(x))
            use_sparse = t_sparse < t_dense
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if use_sparse:
            setattr(parent, attr, layer)
            form = "sparse"
        else:
            with torch.no_grad():  # w is a view of mod.weight (transposed for Conv1D)
                w.copy_(layer.dense_weight().to(w.dtype))
            form = "dense (faster here)"
        kept_nonzero += layer.values.numel()
        report.removed.append({"group": f"{name}: {pattern} ({form})", "kind": "n:m",
                               "before": w.numel(), "removed": w.numel() - layer.values.numel(),
                               "exact": True})
    report.params_after = report.params_before - sum(r["removed"] for r in report.removed)
    return report
