"""Cheaper meta kernels for the graph reader (:func:`fastarch.retrieval.graph.extract_graph`).

A forward on meta tensors computes nothing, but torch implements the meta kernels of several
common ops in Python: batch_norm through its decomposition (~90 prim calls), convolution,
addmm and mean through Python shape functions and refs, layer_norm, gelu, the softmax of SDPA
and elementwise add / mul through refs (0.1-0.8 ms a call: a ViT-B or a ConvNeXt-T read took
~55 ms, ~40 of them in these), and the FLOP formula of convolution walks its arguments with
pytree. For a ResNet read on meta that was ~85% of the forward
(ResNet [1,2,1,1] under the FLOP counter: 22 ms with torch's kernels, 3 ms with these, 2-core
machine at load 1.8). The graph reader only needs each output's metadata, so the functions
here make the outputs directly: the same shape, dtype and strides as torch's meta kernel
gives (the tests compare them on a grid of shapes, dtypes and layouts).

Each returns ``None`` outside the cases it was checked on (a tensor off meta, training-mode
batch norm, transposed or ill-shaped convolutions, mixed dtypes, ...): the caller then runs
torch's own kernel, which also raises its own errors.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_flop_count

__all__ = ["FLOP_SHORTCUTS", "META_SHORTCUTS"]

aten = torch.ops.aten


def _on_meta(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "meta")
               for t in tensors)


def _dense(t: torch.Tensor) -> bool:
    formats = {4: (torch.channels_last,), 5: (torch.channels_last_3d,)}.get(t.dim(), ())
    return any(t.is_contiguous(memory_format=f) for f in (torch.contiguous_format, *formats))


def _int_list(v, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(type(x) is int for x in v)


def batch_norm_eval(input, weight=None, bias=None, running_mean=None, running_var=None,
                    training=False, momentum=0.1, eps=1e-5):
    """``aten.native_batch_norm`` in eval mode: the input's shape, dtype and strides (a dense
    input), and the statistics' shape in the computation dtype."""
    if training or running_mean is None or running_var is None:
        return None
    if not _on_meta(input, weight, bias, running_mean, running_var):
        return None
    if input.dim() < 2 or not _dense(input):
        return None
    from torch._prims_common import get_computation_dtype

    stat = (input.shape[1],)
    dtype = get_computation_dtype(input.dtype)
    # empty_strided: empty_like costs ~25 us on meta, more than the rest of this function
    return (torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device="meta"),
            torch.empty(stat, dtype=dtype, device="meta"),
            torch.empty(stat, dtype=dtype, device="meta"))


def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                groups):
    """``aten.convolution``, not transposed: torch's meta kernel gives a contiguous tensor of
    the input's dtype, of the usual output size."""
    if transposed or not _on_meta(input, weight, bias) or type(groups) is not int:
        return None
    n = input.dim() - 2
    if n < 1 or weight.dim() != n + 2 or input.dtype != weight.dtype:
        return None
    if not (_int_list(stride, n) and _int_list(padding, n) and _int_list(dilation, n)):
        return None
    c_out = weight.shape[0]
    if groups < 1 or input.shape[1] == 0 or weight.shape[1] * groups != input.shape[1]:
        return None
    if bias is not None and tuple(bias.shape) != (c_out,):
        return None
    spatial = []
    for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation):
        if s < 1 or d < 1 or p < 0 or size + 2 * p < d * (k - 1) + 1:
            return None  # torch raises its own error for these
        spatial.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return torch.empty((input.shape[0], c_out, *spatial), dtype=input.dtype, device="meta")


def addmm(self, mat1, mat2, beta=1, alpha=1):
    """``aten.addmm`` (``nn.Linear`` with a 2-d input): a contiguous (M, N) tensor."""
    if not _on_meta(self, mat1, mat2) or mat1.dim() != 2 or mat2.dim() != 2:
        return None
    dtype = mat1.dtype
    if not dtype.is_floating_point or mat2.dtype != dtype or self.dtype != dtype:
        return None
    (m, k), (k2, n) = mat1.shape, mat2.shape
    if k != k2 or tuple(self.shape) not in ((n,), (1,), (m, n), (1, n), (m, 1), (1, 1)):
        return None
    return torch.empty((m, n), dtype=dtype, device="meta")


def mean_dim(input, dim, keepdim=False, *, dtype=None):
    """``aten.mean.dim`` of a contiguous floating-point tensor over a list of dims (global
    pooling): a contiguous tensor of the reduced shape."""
    if dtype is not None or not _on_meta(input) or not input.dtype.is_floating_point:
        return None
    if not input.is_contiguous() or not isinstance(dim, (list, tuple)) or not dim:
        return None
    nd = input.dim()
    if nd == 0 or not all(type(d) is int and -nd <= d < nd for d in dim):
        return None
    dims = {d % nd for d in dim}
    if len(dims) != len(dim):
        return None
    shape = [1 if i in dims else s for i, s in enumerate(input.shape) if keepdim or i not in dims]
    return torch.empty(shape, dtype=input.dtype, device="meta")


def _contiguous_float(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_contiguous()
               and t.dtype.is_floating_point for t in tensors)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``aten.native_layer_norm`` of a contiguous input (torch: its Python reference, ~0.8 ms a
    call on meta): the output like the input, mean and rstd of shape ``input.shape[:axis] +
    (1,) * len(normalized_shape)`` in the computation dtype."""
    if not _contiguous_float(input) or not _on_meta(weight, bias):
        return None
    if not _int_list(normalized_shape, len(normalized_shape)) or not normalized_shape:
        return None
    axis = input.dim() - len(normalized_shape)
    if axis < 0 or tuple(input.shape[axis:]) != tuple(normalized_shape):
        return None
    for t in (weight, bias):
        if t is not None and (tuple(t.shape) != tuple(normalized_shape) or t.dtype != input.dtype):
            return None
    from torch._prims_common import get_computation_dtype

    stat = tuple(input.shape[:axis]) + (1,) * len(normalized_shape)
    dtype = get_computation_dtype(input.dtype)
    return (torch.empty(input.shape, dtype=input.dtype, device="meta"),
            torch.empty(stat, dtype=dtype, device="meta"),
            torch.empty(stat, dtype=dtype, device="meta"))


def _like(input):
    return torch.empty(input.shape, dtype=input.dtype, device="meta")


def _contiguous_strides_ok(shape, stride) -> bool:
    expected = 1
    for n, st in zip(reversed(shape), reversed(stride)):
        if n != 1:
            if st != expected:
                return False
            expected *= n
    return True


def _channels_last_ok(shape, stride) -> bool:
    if len(shape) != 4:
        return False
    expected = 1
    for d in (1, 3, 2, 0):
        if shape[d] != 1:
            if stride[d] != expected:
                return False
            expected *= shape[d]
    return True


def elementwise_strides(shape, operands) -> tuple:
    """The strides torch's meta kernels give the output of an elementwise op of ``shape`` over
    ``operands`` ((shape, stride) pairs broadcastable to it): each operand expanded as
    ``Tensor.expand`` does, contiguous when they all are, channels last when they all are, and
    otherwise the dimensions ordered by the operands' strides (the insertion sort of torch's
    ``compute_elementwise_output_logical_to_physical_perm``), with dense strides in that order.
    Checked against torch on random layouts in tests/retrieval/test_meta_shortcuts.py."""
    nd = len(shape)
    if nd <= 1:
        return (1,) * nd
    numel = 1
    for n in shape:
        numel *= n
    strides = []
    for s, st in operands:
        off = nd - len(s)
        full = [0] * nd
        for i in range(nd - 1, -1, -1):
            j = i - off
            size = s[j] if j >= 0 else 1
            stride = st[j] if j >= 0 else (shape[i + 1] * full[i + 1] if i + 1 < nd else 1)
            full[i] = 0 if size != shape[i] else stride
        strides.append(full)
    contiguous = all(numel < 2 or _contiguous_strides_ok(shape, st) for st in strides)
    channels_last = all(_channels_last_ok(shape, st) for st in strides)
    if contiguous and not channels_last:
        perm = list(range(nd - 1, -1, -1))  # fastest dimension first
    elif channels_last and not contiguous:
        perm = [1, 3, 2, 0]
    else:
        perm = list(range(nd - 1, -1, -1))

        def should_swap(d0, d1):
            for st in strides:
                s0, s1 = st[d0], st[d1]
                if s0 == 0 or s1 == 0:
                    continue
                if s0 != s1:
                    return -1 if s0 < s1 else 1
                if shape[d0] > shape[d1]:
                    return 1
            return 0

        for i in range(1, nd):
            d1 = i
            for d0 in range(i - 1, -1, -1):
                c = should_swap(perm[d0], perm[d1])
                if c > 0:
                    perm[d0], perm[d1] = perm[d1], perm[d0]
                    d1 = d0
                elif c < 0:
                    break
    out = [0] * nd
    run = 1
    for d in perm:
        out[d] = run
        run *= shape[d]
    return tuple(out)


def _elementwise_out(*tensors):
    """The output of an elementwise op of meta tensors of one floating dtype (no type
    promotion, no empty dimension), or None."""
    dtype = None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return None
        if not t.dtype.is_floating_point or (dtype is not None and t.dtype != dtype):
            return None
        dtype = t.dtype
    shapes = [tuple(t.shape) for t in tensors]
    nd = max(len(s) for s in shapes)
    shape = [1] * nd
    for s in shapes:
        for i, n in enumerate(s, nd - len(s)):
            if n == 0:
                return None
            if n != 1:
                if shape[i] not in (1, n):
                    return None  # does not broadcast: torch raises its own error
                shape[i] = n
    if len(tensors) == 1:
        # one input: only the plainly contiguous one (its strides exactly the row-major ones,
        # size-1 dims included); for other layouts torch's kernels differ in how they treat
        # size-1 dims (random-layout test), so they decide
        t = tensors[0]
        standard, run = [], 1
        for n in reversed(shapes[0]):
            standard.append(run)
            run *= n
        return _like(t) if tuple(reversed(standard)) == t.stride() else None
    stride = elementwise_strides(shape, [(s, t.stride()) for s, t in zip(shapes, tensors)])
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def unary_like(input, *args, **kwargs):
    """A unary elementwise op (``aten.gelu``, ``sigmoid``, ``silu``, ``neg``) of a contiguous
    floating-point meta tensor: a contiguous tensor like it."""
    return _elementwise_out(input)


def binary_same(input, other, *args, **kwargs):
    """``aten.add.Tensor`` / ``aten.mul.Tensor`` of two meta tensors of one floating dtype
    (residual adds, gates, norm weights, rotary embeddings), broadcasting, any layouts. Type
    promotion and a Python number as ``other`` go to torch."""
    return _elementwise_out(input, other)


def inplace_unary(input, *args, **kwargs):
    """An in-place unary op (``aten.silu_``, ``aten.relu_``): torch returns ``input`` itself."""
    ok = (isinstance(input, torch.Tensor) and input.device.type == "meta"
          and input.dtype.is_floating_point)
    return input if ok else None


def pow_scalar(input, exponent):
    """``aten.pow.Tensor_Scalar`` of a floating-point tensor by a real Python number (the
    square of an RMS norm)."""
    return _elementwise_out(input) if type(exponent) in (int, float) else None


def same_layout(input, *args, **kwargs):
    """``aten.tril`` / ``aten.roll`` of a contiguous tensor of any dtype (causal masks are
    bool): a contiguous tensor of the same shape and dtype."""
    ok = isinstance(input, torch.Tensor) and input.device.type == "meta" and input.is_contiguous()
    return _like(input) if ok else None


def safe_softmax(input, dim, dtype=None):
    """``aten._safe_softmax`` (softmax inside SDPA's math path) of a contiguous tensor."""
    if not _contiguous_float(input) or type(dim) is not int or dtype not in (None, input.dtype):
        return None
    return _like(input) if -input.dim() <= dim < max(1, input.dim()) else None


def mul_scalar(input, other):
    """``aten.mul.Scalar`` of a floating-point tensor by a real Python number."""
    return _elementwise_out(input) if type(other) in (int, float) else None


# aten op -> stand-in for its meta kernel (None: run the op)
META_SHORTCUTS = {
    aten.native_batch_norm.default: batch_norm_eval,
    aten.convolution.default: convolution,
    aten.addmm.default: addmm,
    aten.mean.dim: mean_dim,
    aten.native_layer_norm.default: layer_norm,
    aten.gelu.default: unary_like,
    aten._safe_softmax.default: safe_softmax,
    aten.add.Tensor: binary_same,
    aten.mul.Tensor: binary_same,
    aten.mul.Scalar: mul_scalar,
    aten.pow.Tensor_Scalar: pow_scalar,
    aten.sigmoid.default: unary_like,
    aten.silu.default: unary_like,
    aten.neg.default: unary_like,
    aten.tril.default: same_layout,
    aten.roll.default: same_layout,
    aten.silu_.default: inplace_unary,
    aten.relu_.default: inplace_unary,
}


def convolution_flops(input, weight, bias, stride, padding, dilation, transposed,
                      output_padding, groups, *, out_val):
    """FLOPs of ``aten.convolution`` by torch's formula (``flop_counter.conv_flop``), without
    the pytree walk over the arguments that its registry entry does (~60 us a call)."""
    return conv_flop_count(input.shape, weight.shape, out_val.shape, transposed=bool(transposed))


# aten op -> its FLOP formula, called as the registry's are: (*args, out_val=output)
FLOP_SHORTCUTS = {aten.convolution.default: convolution_flops}
