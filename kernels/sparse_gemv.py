"""Triton kernels of the sparse GEMV family (GPU; run on CPU under TRITON_INTERPRET=1 in tests).

One core kernel, ``_rows_axpy``: program (row block, n-block, k-split) accumulates
``a[b, k] * w[row_k, n-block]`` over its share of k, loading a weight row only where its
coefficient is kept. The mask is applied to the load itself, so a skipped row costs no memory
traffic: this is the whole speed-up of a memory-bound decode GEMV. At batch 1 a program holds one
row of x; from 2 rows on it holds 16 (a tl.dot tile) and loads a weight row when any of them keeps
the channel (the union), so the tile is read once for all 16. The k range is split so that the
grid fills the GPU (batch 1 at out = 4096 has only 32 column blocks); the splits meet in an fp32
buffer with atomic adds, so the summation order, and the last bits, may vary between runs. The
coefficient of row k is read either from x at the row index (``X_GATHER``) or compactly at k
(the hidden activations of ``sparse_mlp``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastarch.kernels._runtime import interpreting, sm_count


@triton.jit
def _rows_axpy(x_ptr, w_ptr, idx_ptr, bias_ptr, y_ptr, B, K, N, stride_x, k_per_split, threshold,
               HAS_IDX: tl.constexpr, X_GATHER: tl.constexpr, USE_THRESHOLD: tl.constexpr,
               HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (b-block, n-block, k-split). BLOCK_B == 1: one row of x, products summed in
    # registers; BLOCK_B >= 16: BLOCK_B rows at once through tl.dot, a weight row loaded when any
    # of the rows keeps its channel (the union), so the tile is read once for all of them.
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        if HAS_IDX:
            rows = tl.load(idx_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        else:
            rows = offs_k.to(tl.int64)
        if X_GATHER:
            cols = rows
        else:
            cols = offs_k.to(tl.int64)
        if BLOCK_B == 1:
            a = tl.load(x_ptr + pid_b * stride_x + cols, mask=k_ok, other=0.0).to(tl.float32)
            if USE_THRESHOLD:
                keep = (tl.abs(a) > threshold) & k_ok
            else:
                keep = (a != 0.0) & k_ok
            a = tl.where(keep, a, 0.0)
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=keep[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a[:, None], axis=0)
        else:
            a = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=b_ok[:, None] & k_ok[None, :], other=0.0)
            af = a.to(tl.float32)
            if USE_THRESHOLD:
                keep2 = (tl.abs(af) > threshold) & b_ok[:, None] & k_ok[None, :]
            else:
                keep2 = (af != 0.0) & b_ok[:, None] & k_ok[None, :]
            keep = tl.max(keep2.to(tl.int32), axis=0) > 0
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=keep[:, None] & n_ok[None, :], other=0.0)
            if UPCAST or w.dtype == tl.float32 or a.dtype != w.dtype:
                # exact fp32 products (fp32 inputs, the fp32 hidden of sparse_mlp, or bf16
                # under the interpreter, whose bf16 dots are wrong)
                acc += tl.dot(tl.where(keep2, af, 0.0), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(tl.where(keep2, a, tl.zeros_like(a)), w)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok & (pid_s == 0), other=0.0).to(tl.float32)
        if BLOCK_B == 1:
            acc += bias
        else:
            acc += bias[None, :]
    if BLOCK_B == 1:
        ptrs = y_ptr + pid_b * N + offs_n
        ok = n_ok
    else:
        ptrs = y_ptr + offs_b[:, None].to(tl.int64) * N + offs_n[None, :]
        ok = b_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=ok)


@triton.jit
def _gather_rows_dot(x_ptr, w_ptr, idx_ptr, bias_ptr, y_ptr, K, IN, stride_x,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    # program (b, k-block): y[b, k] = x[b] . w[idx[k]] (+ bias[idx[k]]) for the listed rows
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < IN
        xv = tl.load(x_ptr + pid_b * stride_x + offs_i, mask=i_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * IN + offs_i[None, :],
                    mask=k_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_b * K + offs_k, acc, mask=k_ok)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g * tl.sigmoid(g)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh approximation); tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    else:  # relu
        return tl.maximum(g, 0.0)


@triton.jit
def _mlp_hidden(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, b_up_ptr, idx_ptr, h_ptr, K, IN, stride_x,
                threshold, ACT: tl.constexpr, GATED: tl.constexpr, HAS_B_IN: tl.constexpr,
                HAS_B_UP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr):
    # program (b, k-block) over the listed neurons: h = act(gate) [* up], 0 where |act| <= t.
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
    g = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < IN
        xv = tl.load(x_ptr + pid_b * stride_x + offs_i, mask=i_ok, other=0.0).to(tl.float32)
        w = tl.load(w_in_ptr + rows[:, None] * IN + offs_i[None, :],
                    mask=k_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        g += tl.sum(w * xv[None, :], axis=1)
    if HAS_B_IN:
        g += tl.load(b_in_ptr + rows, mask=k_ok, other=0.0).to(tl.float32)
    g = _act(g, ACT)
    keep = (tl.abs(g) > threshold) & k_ok
    h = g
    if GATED:
        u = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < IN
            xv = tl.load(x_ptr + pid_b * stride_x + offs_i, mask=i_ok, other=0.0).to(tl.float32)
            # up rows of dropped neurons are never loaded
            w = tl.load(w_up_ptr + rows[:, None] * IN + offs_i[None, :],
                        mask=keep[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
            u += tl.sum(w * xv[None, :], axis=1)
        if HAS_B_UP:
            u += tl.load(b_up_ptr + rows, mask=k_ok, other=0.0).to(tl.float32)
        h = g * u
    h = tl.where(keep, h, 0.0)
    tl.store(h_ptr + pid_b * K + offs_k, h, mask=k_ok)


_ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
# Launch shape of _rows_axpy. TUNE's entries, when set, replace the choice made in _rows_config
# (bench/bench_gpu.py sweeps them); None leaves it to the rule.
TUNE: dict = {"block_b": None, "block_k": None, "block_n": None, "split": None, "num_warps": None}
_PROGRAMS_PER_SM = 4


def _rows_config(B, K, N, device):
    """(block_b, block_k, block_n, split, num_warps): one x row per program at batch 1, a
    16-row tile through tl.dot above; the K range split so that the grid fills every SM."""
    block_b = TUNE["block_b"] or (1 if B == 1 else 16)
    block_k = TUNE["block_k"] or 64
    block_n = TUNE["block_n"] or 128
    tiles = triton.cdiv(B, block_b) * triton.cdiv(N, block_n)
    split = TUNE["split"]
    if split is None:
        split = triton.cdiv(_PROGRAMS_PER_SM * sm_count(device, interpreted=8), tiles)
    split = max(1, min(split, triton.cdiv(K, block_k)))
    num_warps = TUNE["num_warps"] or 4
    return block_b, block_k, block_n, split, num_warps


def _launch_rows_axpy(a, w_t, index, bias, threshold, x_gather, use_threshold):
    B = a.shape[0]
    K = index.shape[0] if index is not None else w_t.shape[0]
    N = w_t.shape[1]
    if B == 0 or N == 0:
        return torch.empty((B, N), device=a.device, dtype=torch.float32)
    block_b, block_k, block_n, split, num_warps = _rows_config(B, K, N, a.device)
    # the K range of one split, a whole number of BLOCK_K steps
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k if K else block_k
    split = max(1, triton.cdiv(K, k_per_split))
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)((B, N), device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(B, block_b), triton.cdiv(N, block_n), split)
    dummy = w_t
    upcast = w_t.dtype == torch.bfloat16 and interpreting()
    _rows_axpy[grid](
        a, w_t, index if index is not None else dummy, bias if bias is not None else dummy, y,
        B, K, N, a.stride(0), k_per_split, float(threshold),
        HAS_IDX=index is not None, X_GATHER=x_gather, USE_THRESHOLD=use_threshold,
        HAS_BIAS=bias is not None, ATOMIC=atomic, UPCAST=upcast, BLOCK_B=block_b,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def sparse_gemv(x, w_t, bias, threshold):
    x = x.contiguous()
    y = _launch_rows_axpy(x, w_t.contiguous(), None, bias, threshold, x_gather=True,
                          use_threshold=True)
    return y.to(x.dtype)


def sparse_gemv_index(x, w_t, bias, index):
    x = x.contiguous()
    y = _launch_rows_axpy(x, w_t.contiguous(), index.contiguous(), bias, 0.0, x_gather=True,
                          use_threshold=False)
    # use_threshold=False skips only exact zeros, which contribute nothing anyway
    return y.to(x.dtype)


def gather_gemv(x, w, bias, index):
    x = x.contiguous()
    B, IN = x.shape
    K = index.shape[0]
    y = torch.empty((B, K), device=x.device, dtype=torch.float32)
    if B and K:
        grid = (B, triton.cdiv(K, 32))
        _gather_rows_dot[grid](x, w.contiguous(), index.contiguous(),
                               bias if bias is not None else w, y, K, IN, x.stride(0),
                               HAS_BIAS=bias is not None, BLOCK_K=32, BLOCK_I=128)
    return y.to(x.dtype)


def sparse_mlp(x, w_in, w_up, w_out_t, b_in, b_up, b_out, neuron_index, threshold, activation):
    x = x.contiguous()
    B, IN = x.shape
    if neuron_index is None:
        neuron_index = torch.arange(w_in.shape[0], device=x.device)
    idx = neuron_index.contiguous()
    K = idx.shape[0]
    h = torch.empty((B, K), device=x.device, dtype=torch.float32)
    if B and K:
        grid = (B, triton.cdiv(K, 32))
        w_in = w_in.contiguous()
        _mlp_hidden[grid](
            x, w_in, w_up if w_up is not None else w_in, b_in if b_in is not None else w_in,
            b_up if b_up is not None else w_in, idx, h, K, IN, x.stride(0), float(threshold),
            ACT=_ACT_CODE[activation], GATED=w_up is not None, HAS_B_IN=b_in is not None,
            HAS_B_UP=b_up is not None, BLOCK_K=32, BLOCK_I=128,
        )
    y = _launch_rows_axpy(h, w_out_t.contiguous(), idx, b_out, 0.0, x_gather=False,
                          use_threshold=False)
    return y.to(x.dtype)
