"""Triton kernel of the N:M linear family (GPU; run on CPU under TRITON_INTERPRET=1 in tests).

Program (b-block, o-block): for a block of output rows, walk the compressed input in chunks of
BLOCK_K kept values; the column of each kept value is group*m + index, so x is gathered at those
columns (the same for all rows of the b-block) and multiplied with the kept values. Only n/m of
the weight bytes (plus one metadata byte per value) are read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nm_linear_kernel(x_ptr, v_ptr, i_ptr, bias_ptr, y_ptr, B, O, KC, K, stride_x,
                      N: tl.constexpr, M: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < O
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for k0 in range(0, KC, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KC
        mask = o_ok[:, None] & k_ok[None, :]
        ptrs = offs_o[:, None].to(tl.int64) * KC + offs_k[None, :]
        v = tl.load(v_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        idx = tl.load(i_ptr + ptrs, mask=mask, other=0).to(tl.int64)
        cols = (offs_k[None, :] // N) * M + idx
        xv = tl.load(x_ptr + pid_b * stride_x + cols, mask=mask & (cols < K), other=0.0)
        acc += tl.sum(v * xv.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_b * O + offs_o, acc.to(y_ptr.dtype.element_ty), mask=o_ok)


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              bias: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Launch on (B, in) x; values / indices (out, in*n/m). Checks are done by the op wrapper."""
    B, K = x.shape
    O, KC = values.shape
    y = torch.empty((B, O), device=x.device, dtype=x.dtype)
    if B == 0 or O == 0:
        return y
    block_o = 32
    block_k = max(16, min(128, triton.next_power_of_2(KC)))
    grid = (B, triton.cdiv(O, block_o))
    _nm_linear_kernel[grid](
        x, values, indices, bias if bias is not None else values, y, B, O, KC, K, x.stride(0),
        N=n, M=m, HAS_BIAS=bias is not None, BLOCK_O=block_o, BLOCK_K=block_k,
    )
    return y
