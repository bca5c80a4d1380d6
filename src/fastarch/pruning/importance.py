"""Importance of each prunable unit (higher = keep).

A unit's score is the sum, over every parameter dimension it touches, of a per-index score:

* ``"l1"`` / ``"l2"``: magnitude of the weight slice (sum of |w| or of w^2);
* ``"taylor"``: first-order Taylor, sum of |w * dL/dw| on the calibration batch (the loss is the
  mean square of the outputs unless ``loss_fn`` is given);
* ``"bn_scale"``: |gamma| of the batch norms in the unit (network slimming); L2 where none;
* ``"activation"``: Wanda-style, ``||W[:, j]|| * ||X_j||`` on the input side of every linear /
  conv, with ``||X_j||`` measured on the calibration data (FLAP-like); L2 on the output side.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from fastarch.pruning.graph import ChannelGroup, DependencyGraph, flatten_tensors, model_call_kwargs

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "activation", "random")


def _per_index(t: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    if t.is_meta:  # no values (a model on the meta device): every index scores the same
        return torch.zeros(t.shape[dim])
    t = t.detach()
    other = [d for d in range(t.dim()) if d != dim]
    innermost = max((d for d in range(t.dim()) if t.shape[d] > 1), default=dim)
    if innermost in other:
        # one reduction op (no |w| or w^2 temporary, no fp32 copy of a bf16 weight): on a small,
        # busy machine every multi-threaded op costs a thread wake-up, which dominated scoring
        # (resnet50: 2 s for pow + sum over 53 conv weights, half that as one op each)
        norm = torch.linalg.vector_norm(t, 1 if kind == "l1" else 2, other, dtype=torch.float32)
        return norm if kind == "l1" else norm.square()
    # only leading dims reduced (a Linear's input side): vector_norm is ~2x slower there.
    # An fp32 copy (of a bf16 / fp16 weight) is ours to square in place: one fewer temporary
    f = t.float()
    if f.data_ptr() == t.data_ptr():  # already fp32: f is the weight itself
        mag = f.abs() if kind == "l1" else f.pow(2)
    else:
        mag = f.abs_() if kind == "l1" else f.square_()
    return mag.sum(other) if other else mag


def _run(model, inputs):
    out = model(*inputs, **model_call_kwargs(model))
    return flatten_tensors(out)


def _taylor_grads(model: nn.Module, inputs, loss_fn) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        outs = _run(model, inputs)
        if loss_fn is not None:
            loss = loss_fn(outs[0] if len(outs) == 1 else outs)
        else:
            loss = sum(o.float().pow(2).mean() for o in outs if o.is_floating_point())
        loss.backward()
    model.train(was_training)
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return grads


def _activation_norms(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Sum of squares of each input channel of every Linear / Conv (keyed by weight name)."""
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or type(mod).__name__ == "Conv1D":
            key = f"{name}.weight" if name else "weight"
            channel_dim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1

            def hook(m, args, _key=key, _dim=channel_dim):
                x = args[0].detach().float()
                dims = [d for d in range(x.dim()) if d != _dim % x.dim()]
                s = x.pow(2).sum(dims)
                norms[_key] = norms.get(_key, 0) + s

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return norms


def score_units(graph: DependencyGraph, model: nn.Module, importance: str, inputs, calib=None,
                loss_fn=None) -> dict[int, float]:
    """Score of every unit of every group, {root: score}."""
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    on_meta = any(t.is_meta for t in tensors.values())
    if on_meta and importance in ("taylor", "activation"):
        importance = "random"  # no values to measure on the meta device
    grads = _taylor_grads(model, inputs, loss_fn) if importance == "taylor" else {}
    acts = {}
    if importance == "activation":
        batches = calib if calib is not None else [inputs]
        acts = _activation_norms(model, batches)
    gen = torch.Generator().manual_seed(0)
    scores: dict[int, float] = {}
    for group in graph.groups:
        per_dim = {}
        for key in group.key:
            name, dim = key
            t = tensors[name]
            role = graph.param_dims[key].role
            if importance == "random" or t.is_meta:
                per_dim[key] = torch.rand(t.shape[dim], generator=gen)
            elif importance == "taylor":
                g = grads.get(name)
                per_dim[key] = (_per_index(t * g, dim, "l1") if g is not None and t.is_floating_point()
                                else torch.zeros(t.shape[dim]))
            elif importance == "bn_scale":
                if role == "norm" and name.endswith("weight") and t.dim() == 1:
                    per_dim[key] = t.detach().float().abs()
            elif importance == "activation" and role == "in" and name in acts:
                a = acts[name].to(t.device)
                w = _per_index(t, dim, "l2")
                if a.numel() == w.numel():
                    per_dim[key] = w.sqrt() * a.sqrt()
                else:
                    per_dim[key] = w
            elif importance in ("l1", "l2", "activation") and t.is_floating_point():
                per_dim[key] = _per_index(t, dim, "l1" if importance == "l1" else "l2")
        if not per_dim:  # bn_scale without a batch norm: fall back to L2
            per_dim = {k: _per_index(tensors[k[0]], k[1], "l2") for k in group.key
                       if tensors[k[0]].is_floating_point()}
        total = torch.zeros(group.size, dtype=torch.float64)
        for key in group.key:
            v = per_dim.get(key)
            if v is None:
                continue
            per_unit = [group.positions[r].get(key, ()) for r in group.units]
            pos = torch.tensor(list(itertools.chain.from_iterable(per_unit)), dtype=torch.long)
            owner = torch.repeat_interleave(torch.tensor([len(i) for i in per_unit]))
            total.index_add_(0, owner, v.detach().double().cpu()[pos])
        scores.update(zip(group.units, total.tolist()))
    return scores


def rank_uniform(group: ChannelGroup, scores: dict[int, float], n_remove: int) -> list[int]:
    order = sorted(group.units, key=lambda r: (scores.get(r, 0.0), r))
    return order[:n_remove]
