"""How an op family is wired into torch.ops.fastarch.

Each family module (fastarch/ops/<family>.py) declares its ops with :func:`register_op`, giving
the schema, the PyTorch reference, the fake (meta) kernel, and optionally a CUDA implementation
chooser. This module then

* defines the schema in Python when the native extension is missing (the schema text must equal
  the one in csrc/ops.cpp: tests/ops/test_registry.py checks it),
* registers the reference as the CPU kernel when the native one is missing, with one warning,
* registers the fake kernel (torch.compile, opcheck),
* registers the CUDA kernel (native CUDA / Triton / reference, by the family's chooser),
* registers autograd as the vector-Jacobian product of the reference, so that every op has a
  correct, if not fast, backward.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch


_PY_LIB = None  # torch.library.Library("fastarch", "DEF") when the native schemas are missing


@dataclasses.dataclass
class OpInfo:
    name: str
    schema: str
    reference: Callable
    fake: Callable
    family: str
    cuda: Callable | None = None  # chooses and runs the CUDA implementation
    cuda_backends: Callable[[], list[str]] | None = None  # which GPU backends are built
    differentiable: tuple[int, ...] = ()  # positions of tensor args that get gradients
    registered: dict = dataclasses.field(default_factory=dict)


OPS: dict[str, OpInfo] = {}
_warned_fallback: set[str] = set()


def _define_schema(info: OpInfo) -> None:
    global _PY_LIB
    if _PY_LIB is None:
        _PY_LIB = torch.library.Library("fastarch", "FRAGMENT")
    _PY_LIB.define(info.schema)


def _has_native_kernel(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def _schema_defined(name: str) -> bool:
    try:
        getattr(torch.ops.fastarch, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _warn_fallback(name: str, device: str) -> None:
    if (name, device) in _warned_fallback:
        return
    _warned_fallback.add((name, device))
    warnings.warn(
        f"fastarch: no {device} kernel is built for fastarch::{name}; using the PyTorch "
        "reference (slow). See `python -m fastarch.info`.",
        RuntimeWarning,
        stacklevel=4,
    )


def register_op(info: OpInfo) -> None:
    qual = f"fastarch::{info.name}"
    OPS[info.name] = info
    if not _schema_defined(info.name):
        _define_schema(info)
        info.registered["schema"] = "python"
    else:
        info.registered["schema"] = "native"

    if _has_native_kernel(qual, "CPU"):
        info.registered["cpu"] = "C++"
    else:
        ref = info.reference

        def cpu_fallback(*args, _ref=ref, _name=info.name):
            _warn_fallback(_name, "CPU")
            return _ref(*args)

        torch.library.register_kernel(qual, "cpu", cpu_fallback)
        info.registered["cpu"] = "reference"

    if info.cuda is not None:
        torch.library.register_kernel(qual, "cuda", info.cuda)
    else:
        ref = info.reference

        def cuda_fallback(*args, _ref=ref, _name=info.name):
            _warn_fallback(_name, "CUDA")
            return _ref(*args)

        torch.library.register_kernel(qual, "cuda", cuda_fallback)

    torch.library.register_fake(qual)(info.fake)
    if info.differentiable:
        _register_vjp_autograd(info)


def _register_vjp_autograd(info: OpInfo) -> None:
    """Backward = vector-Jacobian product of the reference, recomputed at backward time."""
    diff = info.differentiable

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[a if isinstance(a, torch.Tensor) else None for a in inputs])

    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        args = [s if isinstance(a, torch.Tensor) else a for a, s in zip(ctx.inputs, saved)]
        want = [i for i in diff if isinstance(args[i], torch.Tensor) and ctx.needs_input_grad[i]]
        grads: list = [None] * len(args)
        if not want:
            return tuple(grads)
        # create_graph=True (double backward) runs this with grad enabled: differentiate the
        # reference on the saved inputs themselves, so the gradients carry their graph back to
        # them and to grad_out; otherwise on detached copies, a graph of the reference alone
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not create_graph:
                for i in want:
                    args[i] = args[i].detach().requires_grad_(True)
            out = info.reference(*args)
            got = torch.autograd.grad(out, [args[i] for i in want], grad_out,
                                      create_graph=create_graph, allow_unused=True)
        for i, g in zip(want, got):
            grads[i] = g
        return tuple(grads)

    torch.library.register_autograd(
        f"fastarch::{info.name}", backward, setup_context=setup_context
    )


def fake_checks(op: str, x: torch.Tensor, others: dict, shape_checks=()) -> None:
    """What a fake (meta) kernel must refuse before it makes an output: tensors on another
    device than ``x`` (one meta argument among CPU ones sends the call to the fake kernel, whose
    uninitialised output would otherwise come back as the answer) and, through ``torch._check``
    (symbolic shapes allowed), the shape rules of ``shape_checks``: (condition, message) pairs."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise RuntimeError(f"fastarch::{op}: {name} is on {t.device} but the first input is "
                               f"on {x.device}")
    for cond, msg in shape_checks:
        torch._check(cond, lambda msg=msg: f"fastarch::{op}: {msg}")


def flatten_rows(x: torch.Tensor, features: int) -> torch.Tensor:
    """``x (..., features)`` as ``(rows, features)`` for the 2-D ops; ``flatten``, not
    ``reshape(-1, features)``, which fails on empty inputs when ``features`` is 0."""
    return x.reshape(1, features) if x.dim() == 1 else x.flatten(0, -2)


def op_backends(name: str) -> dict[str, str]:
    """Which backend serves each device for op `name` on this machine."""
    info = OPS[name]
    out = {"schema": info.registered.get("schema", "?"), "cpu": info.registered.get("cpu", "?")}
    gpu = info.cuda_backends() if info.cuda_backends is not None else []
    out["cuda"] = ", ".join(gpu) if gpu else "reference"
    return out
