"""The N:M linear op family: ``y = x @ W.T + bias`` with W stored N:M sparse (2:4, 4:8).

Layout ("values + metadata"): along the input dimension every group of ``m`` consecutive weights
keeps ``n``; ``values`` (out, in*n/m) holds the kept weights in the weight dtype, ``indices``
(out, in*n/m, uint8) the position of each inside its group (0..m-1), ascending within a group.
A decode GEMV then reads n/m of the weight bytes (plus 1 byte of metadata per kept value).

Op: ``torch.ops.fastarch.nm_linear(x, values, indices, bias, n, m)`` with x (B, in).
Backends: C++ on CPU (batch 1..8 and small batches: each weight group is read once for all rows);
on CUDA the Triton kernel (torch's semi-structured 2:4 tensors are the other CUDA candidate:
:func:`fastarch.pruning.nm.NMLinear` measures and keeps the faster form per layer).
"""
from __future__ import annotations

import torch

from fastarch import native
from fastarch.ops.registry import OpInfo, fake_checks, flatten_rows, register_op

PATTERNS = ((2, 4), (4, 8), (1, 4), (2, 8))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- reference (the spec; fp32) -----------------------------------------------------------------
def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense (out, in) weight from N:M ``values`` / ``indices``. A position listed twice in one
    group (never made by :func:`nm_compress`) holds the sum of its values, as the kernels read it."""
    out, kept = values.shape
    groups = kept // n
    dense = values.new_zeros((out, groups, m))
    dense.scatter_add_(2, indices.long().reshape(out, groups, n), values.reshape(out, groups, n))
    return dense.reshape(out, groups * m)


def nm_linear_reference(x, values, indices, bias, n, m):
    w = nm_decompress(values.float(), indices, n, m)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _nm_linear_fake(x, values, indices, bias, n, m):
    ok = x.dim() == 2 and values.dim() == 2 and n > 0 and m > n
    fake_checks("nm_linear", x, {"values": values, "indices": indices, "bias": bias},
                [(ok, "x and values must be 2-D, the pattern n:m with 0 < n < m")] + (
                    [(values.shape[1] % n == 0 and x.shape[1] == values.shape[1] // n * m,
                      f"x has {x.shape[1]} features, the {n}:{m} values stand for "
                      f"{values.shape[1] // n * m}")] if ok else []))
    return x.new_empty((x.shape[0], values.shape[0]))


# ---- compression ------------------------------------------------------------------------------
def nm_compress(weight: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None):
    """Keep the ``n`` highest-``scores`` weights (default |weight|) of every ``m`` along the input.

    Returns ``(values, indices)`` for :func:`nm_linear`.

    Example:
        >>> w = torch.randn(8, 16)
        >>> values, indices = nm_compress(w, 2, 4)
        >>> values.shape, indices.shape
        (torch.Size([8, 8]), torch.Size([8, 8]))
    """
    _check_pattern(n, m)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (out_features, in_features)")
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"weight: in_features ({inp}) must be a multiple of m ({m})")
    if scores is None:
        scores = weight.detach().abs()
    elif scores.shape != weight.shape:
        raise ValueError(f"scores must have the weight's shape {tuple(weight.shape)}")
    g = scores.float().reshape(out, inp // m, m)
    top = g.topk(n, dim=2).indices.sort(dim=2).values  # ascending position inside the group
    vals = weight.detach().reshape(out, inp // m, m).gather(2, top)
    return vals.reshape(out, -1).contiguous(), top.to(torch.uint8).reshape(out, -1).contiguous()


# ---- public wrapper -----------------------------------------------------------------------------
def _check_pattern(n, m):
    if (n, m) not in PATTERNS:
        raise ValueError(f"n:m must be one of {[f'{a}:{b}' for a, b in PATTERNS]}, got {n}:{m}")


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              bias: torch.Tensor | None = None, n: int = 2, m: int = 4) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` given N:M-compressed by :func:`nm_compress`.

    ``x`` may have any leading dims (..., in_features); the result is (..., out_features).

    Example:
        >>> w = torch.randn(16, 32); x = torch.randn(2, 32)
        >>> v, i = nm_compress(w, 2, 4)
        >>> y = nm_linear(x, v, i, None, 2, 4)
        >>> y.shape
        torch.Size([2, 16])
    """
    _check_pattern(n, m)
    for name, t in (("x", x), ("values", values), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values must have x's dtype {x.dtype}, got {values.dtype}")
    if indices.dtype != torch.uint8:
        raise TypeError(f"indices must be uint8, got {indices.dtype}")
    if values.dim() != 2 or indices.shape != values.shape:
        raise ValueError("values and indices must be 2-D with the same shape (out, in*n/m)")
    if values.shape[1] % n:
        raise ValueError(f"values: its second dim must be a multiple of n ({n})")
    in_features = values.shape[1] // n * m
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: last dim must be in_features={in_features}, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if bias is not None and (bias.shape != (values.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must have shape ({values.shape[0]},) and x's dtype")
    if len({t.device for t in (x, values, indices)} | ({bias.device} if bias is not None else set())) > 1:
        raise ValueError("x, values, indices and bias must be on the same device")
    lead = x.shape[:-1]
    x2 = flatten_rows(x, in_features).contiguous()
    y = torch.ops.fastarch.nm_linear(x2, values.contiguous(), indices.contiguous(), bias, n, m)
    return y.reshape(*lead, values.shape[0])


# ---- CUDA dispatch ----------------------------------------------------------------------------
def _gpu_backends() -> list[str]:
    return ["Triton"] if native.triton_available() else []


def _nm_linear_cuda(x, values, indices, bias, n, m):
    if native.triton_available():
        from fastarch.kernels import nm_linear as k

        return k.nm_linear(x, values, indices, bias, n, m)
    return nm_linear_reference(x, values, indices, bias, n, m)


register_op(OpInfo(
    name="nm_linear", family="nm_linear",
    schema="nm_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m) -> Tensor",
    reference=nm_linear_reference, fake=_nm_linear_fake, cuda=_nm_linear_cuda,
    cuda_backends=_gpu_backends, differentiable=(0, 1, 3),
))
