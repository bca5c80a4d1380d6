"""The sparse GEMV op family: products that skip inactive input channels or output rows.

Ops (``torch.ops.fastarch.*``; the wrappers below add shape handling and checks):

* ``sparse_gemv(x, w_t, bias, threshold)``: TEAL-style. ``y = (x * [|x| > threshold]) @ w_t + bias``
  with ``w_t`` the *input-major* weight ``W.T`` of shape ``(in, out)``; the threshold test is fused
  into the weight load, so an inactive channel costs no weight traffic.
* ``sparse_gemv_index(x, w_t, bias, index)``: only the listed input channels contribute.
* ``gather_gemv(x, w, bias, index)``: only the listed output rows are computed (``w`` is the usual
  ``(out, in)`` layout); the result is compact, ``(B, len(index))``.
* ``sparse_mlp(x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold, activation)``:
  a fused MLP over a neuron subset (Deja Vu / CoreInfer / CATS): neuron ``j`` is kept when it is
  listed and ``|act(x . w_in[j] + b_in[j])| > threshold``; for kept neurons the up row (gated MLPs)
  and the down column ``w_out_t[j]`` are read, for the others nothing.

Backends: C++ on CPU; on CUDA the Triton kernel (default) or the CUDA kernel
(``FASTARCH_GEMV_CUDA_BACKEND=cuda``), with more than ``GPU_DENSE_ABOVE`` rows of x handed to
cuBLAS on the masked x (``sparse_gemv``, ``sparse_gemv_index``); the references below are the
spec.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastarch import native
from fastarch.ops.registry import OpInfo, fake_checks, flatten_rows, register_op

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_ACT_ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- references (the spec; computed in fp32) --------------------------------------------------------
def sparse_gemv_reference(x, w_t, bias, threshold):
    xf = x.float()
    xm = torch.where(xf.abs() > threshold, xf, torch.zeros_like(xf))
    y = xm @ w_t.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_gemv_index_reference(x, w_t, bias, index):
    index = index.long()
    y = x.float()[:, index] @ w_t.float()[index]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gather_gemv_reference(x, w, bias, index):
    index = index.long()
    y = x.float() @ w.float()[index].t()
    if bias is not None:
        y = y + bias.float()[index]
    return y.to(x.dtype)


def apply_activation(v: torch.Tensor, activation: str) -> torch.Tensor:
    activation = _ACT_ALIASES.get(activation, activation)
    if activation == "silu":
        return F.silu(v)
    if activation == "gelu":
        return F.gelu(v)
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if activation == "relu":
        return F.relu(v)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sparse_mlp_reference(x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold,
                         activation):
    xf = x.float()
    if neuron_index is None:
        neuron_index = torch.arange(w_in.shape[0], device=x.device)
    idx = neuron_index.long()
    g = xf @ w_in.float()[idx].t()
    if b_in is not None:
        g = g + b_in.float()[idx]
    g = apply_activation(g, activation)
    keep = g.abs() > threshold
    h = g
    if w_up is not None:
        u = xf @ w_up.float()[idx].t()
        if b_up is not None:
            u = u + b_up.float()[idx]
        h = g * u
    h = torch.where(keep, h, torch.zeros_like(h))
    y = h @ w_out_t.float()[idx]
    if b_out is not None:
        y = y + b_out.float()
    return y.to(x.dtype)


# ---- fake kernels ------------------------------------------------------------------------------------
def _gemv_fake_checks(op, x, w, in_dim, tensors, extra=()):
    ok2 = x.dim() == 2 and w.dim() == 2
    fake_checks(op, x, tensors, [(ok2, "x and the weight must be 2-D")] + (
        [(x.shape[1] == w.shape[in_dim], f"x has {x.shape[1]} features, the weight "
          f"{w.shape[in_dim]}")] + list(extra) if ok2 else []))


def _sparse_gemv_fake(x, w_t, bias, threshold):
    _gemv_fake_checks("sparse_gemv", x, w_t, 0, {"w_t": w_t, "bias": bias})
    return x.new_empty((x.shape[0], w_t.shape[1]))


def _sparse_gemv_index_fake(x, w_t, bias, index):
    _gemv_fake_checks("sparse_gemv_index", x, w_t, 0, {"w_t": w_t, "bias": bias, "index": index},
                      [(index.dim() == 1, "index must be 1-D")])
    return x.new_empty((x.shape[0], w_t.shape[1]))


def _gather_gemv_fake(x, w, bias, index):
    _gemv_fake_checks("gather_gemv", x, w, 1, {"w": w, "bias": bias, "index": index},
                      [(index.dim() == 1, "index must be 1-D")])
    return x.new_empty((x.shape[0], index.shape[0]))


def _sparse_mlp_fake(x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold,
                     activation):
    _gemv_fake_checks("sparse_mlp", x, w_in, 1, {
        "w_in": w_in, "w_up": w_up, "w_out_t": w_out_t, "b_in": b_in, "b_up": b_up,
        "b_out": b_out, "neuron_index": neuron_index},
        [(w_out_t.dim() == 2 and w_out_t.shape[0] == w_in.shape[0],
          "w_out_t must be (neurons, out) with w_in's neurons")])
    return x.new_empty((x.shape[0], w_out_t.shape[1]))


# ---- CUDA dispatch ----------------------------------------------------------------------------------
def _cuda_backend() -> str:
    """'triton' (default), 'cuda' or 'reference', limited to what is built here."""
    want = os.environ.get("FASTARCH_GEMV_CUDA_BACKEND", "triton")
    if want == "cuda" and native.cuda_built():
        return "cuda"
    if want in ("triton", "cuda") and native.triton_available():
        return "triton"
    if native.cuda_built():
        return "cuda"
    return "reference"


def _gpu_backends() -> list[str]:
    out = []
    if native.cuda_built():
        out.append("CUDA")
    if native.triton_available():
        out.append("Triton")
    return out


# Above this many rows a GPU product goes to cuBLAS (on the masked x): the kernels read the
# weight tile once per 16 rows, cuBLAS once per much larger tile. Not yet measured on a GPU: 16
# is the kernel's row tile, beyond which it reads the weight twice; bench/bench_gpu.py's
# "by batch" table measures the crossover. FASTARCH_GEMV_GPU_DENSE_ABOVE overrides it.
GPU_DENSE_ABOVE = 16


def _gpu_dense_above() -> int:
    env = os.environ.get("FASTARCH_GEMV_GPU_DENSE_ABOVE")
    return int(env) if env else GPU_DENSE_ABOVE


def _dense_product(xm, w_t, bias):
    return torch.mm(xm, w_t) if bias is None else torch.addmm(bias, xm, w_t)


def _sparse_gemv_cuda(x, w_t, bias, threshold):
    if x.shape[0] > _gpu_dense_above():
        # the test in fp32, as the reference and the kernels: x.abs() > threshold would round
        # the threshold to x's dtype and drop values just above it
        keep = x.float().abs() > threshold
        return _dense_product(torch.where(keep, x, torch.zeros_like(x)), w_t, bias)
    backend = _cuda_backend()
    if backend == "triton":
        from fastarch.kernels import sparse_gemv as k

        return k.sparse_gemv(x, w_t, bias, threshold)
    if backend == "cuda":
        return native._C.sparse_gemv_cuda(x, w_t, bias, threshold)
    return sparse_gemv_reference(x, w_t, bias, threshold)


def _sparse_gemv_index_cuda(x, w_t, bias, index):
    if x.shape[0] > _gpu_dense_above():
        # index_add: a channel listed twice counts twice, as in the reference
        xm = torch.zeros_like(x).index_add_(1, index, x.index_select(1, index))
        return _dense_product(xm, w_t, bias)
    backend = _cuda_backend()
    if backend == "triton":
        from fastarch.kernels import sparse_gemv as k

        return k.sparse_gemv_index(x, w_t, bias, index)
    if backend == "cuda":
        return native._C.sparse_gemv_index_cuda(x, w_t, bias, index)
    return sparse_gemv_index_reference(x, w_t, bias, index)


def _gather_gemv_cuda(x, w, bias, index):
    backend = _cuda_backend()
    if backend == "triton":
        from fastarch.kernels import sparse_gemv as k

        return k.gather_gemv(x, w, bias, index)
    if backend == "cuda":
        return native._C.gather_gemv_cuda(x, w, bias, index)
    return gather_gemv_reference(x, w, bias, index)


# sparse_mlp's GPU kernels read the gate / up rows once per row of x (decode: a few rows); a
# prefill-sized call goes to the reference (fp32 GEMMs), which reads them once. Not measured on a
# GPU: 64 rows is where the kernels' weight traffic is 64 times the GEMMs', a bound, not a fit.
GPU_MLP_REFERENCE_ABOVE = 64


def _sparse_mlp_cuda(x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold,
                     activation):
    args = (x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold, activation)
    if x.shape[0] > GPU_MLP_REFERENCE_ABOVE:
        return sparse_mlp_reference(*args)
    backend = _cuda_backend()
    if backend == "triton":
        from fastarch.kernels import sparse_gemv as k

        return k.sparse_mlp(*args)
    if backend == "cuda":
        return native._C.sparse_mlp_cuda(*args)
    return sparse_mlp_reference(*args)


register_op(OpInfo(
    name="sparse_gemv", family="sparse_gemv",
    schema="sparse_gemv(Tensor x, Tensor w_t, Tensor? bias, float threshold) -> Tensor",
    reference=sparse_gemv_reference, fake=_sparse_gemv_fake, cuda=_sparse_gemv_cuda,
    cuda_backends=_gpu_backends, differentiable=(0, 1, 2),
))
register_op(OpInfo(
    name="sparse_gemv_index", family="sparse_gemv",
    schema="sparse_gemv_index(Tensor x, Tensor w_t, Tensor? bias, Tensor index) -> Tensor",
    reference=sparse_gemv_index_reference, fake=_sparse_gemv_index_fake,
    cuda=_sparse_gemv_index_cuda, cuda_backends=_gpu_backends, differentiable=(0, 1, 2),
))
register_op(OpInfo(
    name="gather_gemv", family="sparse_gemv",
    schema="gather_gemv(Tensor x, Tensor w, Tensor? bias, Tensor index) -> Tensor",
    reference=gather_gemv_reference, fake=_gather_gemv_fake, cuda=_gather_gemv_cuda,
    cuda_backends=_gpu_backends, differentiable=(0, 1, 2),
))
register_op(OpInfo(
    name="sparse_mlp", family="sparse_gemv",
    schema=(
        "sparse_mlp(Tensor x, Tensor w_in, Tensor? w_up, Tensor w_out_t, Tensor? b_in, "
        "Tensor? b_up, Tensor? b_out, Tensor? neuron_index, float threshold, str activation) "
        "-> Tensor"
    ),
    reference=sparse_mlp_reference, fake=_sparse_mlp_fake, cuda=_sparse_mlp_cuda,
    cuda_backends=_gpu_backends, differentiable=(0, 1, 2, 3, 4, 5, 6),
))


# ---- public wrappers ----------------------------------------------------------------------------------
def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_like(x: torch.Tensor, t: torch.Tensor | None, name: str) -> None:
    if t is None:
        return
    _check_float(t, name)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not threshold >= 0.0:  # also catches NaN
        raise ValueError(f"threshold must be a number >= 0, got {threshold}")
    return threshold


def _check_index(index: torch.Tensor, limit: int, x: torch.Tensor, name: str) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64/int32, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"{name} is on {index.device} but x is on {x.device}")
    if index.numel() and index.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {limit})")


def _flatten(x: torch.Tensor, in_features: int, name: str = "x"):
    _check_float(x, name)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name} must have {in_features} features in its last dim, got shape {tuple(x.shape)}"
        )
    return flatten_rows(x, in_features), x.shape[:-1]


def prepare_input_major(weight: torch.Tensor) -> torch.Tensor:
    """Return ``weight.T`` (an ``nn.Linear`` weight ``(out, in)``) as a contiguous ``(in, out)``
    tensor: the layout in which an active input channel is one contiguous row. Do it once."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    return weight.detach().t().contiguous()


def sparse_gemv(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = 0.0) -> torch.Tensor:
    """``(x * [|x| > threshold]) @ w_t + bias``, skipping the weight rows of inactive channels.

    Args:
        x: ``(..., in)`` activations (float32, bfloat16 or float16).
        w_t: ``(in, out)`` input-major weight, contiguous (see :func:`prepare_input_major`).
        bias: optional ``(out,)``.
        threshold: channels with ``|x| <= threshold`` are skipped; must be ``>= 0``.

    The weight is taken to be finite: the row of a skipped channel is usually not read, so an
    inf / NaN there reaches the output only on the paths that read every row (large batches),
    where the masked product ``0 * inf`` gives NaN as in the reference.

    Example:
        >>> w_t = prepare_input_major(linear.weight)
        >>> y = sparse_gemv(x, w_t, linear.bias, threshold=0.05)
    """
    _check_float(w_t, "w_t")
    if w_t.dim() != 2:
        raise ValueError(f"w_t must be 2-D (in, out), got shape {tuple(w_t.shape)}")
    x2, lead = _flatten(x, w_t.shape[0])
    _check_like(x2, w_t, "w_t")
    _check_like(x2, bias, "bias")
    if bias is not None and tuple(bias.shape) != (w_t.shape[1],):
        raise ValueError(f"bias must have shape ({w_t.shape[1]},), got {tuple(bias.shape)}")
    y = torch.ops.fastarch.sparse_gemv(x2, w_t.contiguous(), bias, _check_threshold(threshold))
    return y.reshape(*lead, w_t.shape[1])


def sparse_gemv_index(x: torch.Tensor, w_t: torch.Tensor, index: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., index] @ w_t[index] + bias``: only the listed input channels contribute."""
    _check_float(w_t, "w_t")
    if w_t.dim() != 2:
        raise ValueError(f"w_t must be 2-D (in, out), got shape {tuple(w_t.shape)}")
    x2, lead = _flatten(x, w_t.shape[0])
    _check_like(x2, w_t, "w_t")
    _check_like(x2, bias, "bias")
    if bias is not None and tuple(bias.shape) != (w_t.shape[1],):
        raise ValueError(f"bias must have shape ({w_t.shape[1]},), got {tuple(bias.shape)}")
    _check_index(index, w_t.shape[0], x2, "index")
    y = torch.ops.fastarch.sparse_gemv_index(x2, w_t.contiguous(), bias, index)
    return y.reshape(*lead, w_t.shape[1])


def gather_gemv(x: torch.Tensor, w: torch.Tensor, index: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w[index].T + bias[index]``: only the listed output rows; shape ``(..., len(index))``."""
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out, in), got shape {tuple(w.shape)}")
    x2, lead = _flatten(x, w.shape[1])
    _check_like(x2, w, "w")
    _check_like(x2, bias, "bias")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    _check_index(index, w.shape[0], x2, "index")
    y = torch.ops.fastarch.gather_gemv(x2, w.contiguous(), bias, index)
    return y.reshape(*lead, index.shape[0])


def sparse_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out_t: torch.Tensor, *,
               w_up: torch.Tensor | None = None, b_in: torch.Tensor | None = None,
               b_up: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
               neuron_index: torch.Tensor | None = None, threshold: float = 0.0,
               activation: str = "silu") -> torch.Tensor:
    """A fused MLP that reads only the weights of kept neurons.

    ``h_j = act(x . w_in[j] + b_in[j]) * (x . w_up[j] + b_up[j])`` (gated, ``w_up`` given) or
    ``act(x . w_in[j] + b_in[j])`` (plain), for neurons ``j`` in ``neuron_index`` (all if None)
    with ``|act(.)| > threshold``; ``y = sum_j h_j * w_out_t[j] + b_out``.

    Args:
        x: ``(..., hidden)``.
        w_in: ``(inter, hidden)`` gate (gated) or fc1 (plain) weight, row-major as in nn.Linear.
        w_out_t: ``(inter, out)`` the down / fc2 weight transposed (input-major).
        w_up: ``(inter, hidden)`` up projection of a gated MLP (SwiGLU, GeGLU), else None.
        neuron_index: 1-D int64 list of neurons to consider (CoreInfer core neurons).
        threshold: CATS-style magnitude threshold on the activation, ``>= 0``.
        activation: one of ``silu``, ``gelu``, ``gelu_tanh``, ``relu``.

    Example:
        >>> y = sparse_mlp(x, mlp.gate_proj.weight, prepare_input_major(mlp.down_proj.weight),
        ...                w_up=mlp.up_proj.weight, neuron_index=core, activation="silu")
    """
    _check_float(w_in, "w_in")
    _check_float(w_out_t, "w_out_t")
    if w_in.dim() != 2 or w_out_t.dim() != 2:
        raise ValueError("w_in must be (inter, hidden) and w_out_t (inter, out), got "
                         f"{tuple(w_in.shape)} and {tuple(w_out_t.shape)}")
    inter, hidden = w_in.shape
    if w_out_t.shape[0] != inter:
        raise ValueError(f"w_out_t must have {inter} rows (one per neuron), got {tuple(w_out_t.shape)}")
    x2, lead = _flatten(x, hidden)
    for name, t in (("w_in", w_in), ("w_up", w_up), ("w_out_t", w_out_t), ("b_in", b_in),
                    ("b_up", b_up), ("b_out", b_out)):
        _check_like(x2, t, name)
    if w_up is not None and w_up.shape != w_in.shape:
        raise ValueError(f"w_up must have the shape of w_in {tuple(w_in.shape)}, got {tuple(w_up.shape)}")
    if b_up is not None and w_up is None:
        raise ValueError("b_up is given but w_up is None")
    for name, t, n in (("b_in", b_in, inter), ("b_up", b_up, inter), ("b_out", b_out, w_out_t.shape[1])):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    activation = _ACT_ALIASES.get(activation, activation)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if neuron_index is not None:
        _check_index(neuron_index, inter, x2, "neuron_index")
    y = torch.ops.fastarch.sparse_mlp(
        x2, w_in.contiguous(), None if w_up is None else w_up.contiguous(), w_out_t.contiguous(),
        b_in, b_up, b_out, neuron_index, _check_threshold(threshold), activation,
    )
    return y.reshape(*lead, w_out_t.shape[1])
