"""Score modifications the kernel applies in-register: ALiBi slopes, a relative position bias
table and tanh soft-capping.

``block_sparse_attention(..., alibi_slopes=alibi_slopes(H))`` adds ``slope_h * (kv - q)`` to each
score (a linear penalty on distance for causal attention); ``rel_bias=table`` with ``table`` of
shape ``(H, 2 R + 1)`` adds ``table[h, clip(kv - q, -R, R) + R]`` (T5 / Swin relative position
bias, after mapping the buckets to distances; the table is differentiable, so it can be
learned: the CPU backward accumulates its gradient per tile); ``softcap=c`` replaces a scaled score ``s`` by
``c * tanh(s / c)`` (Gemma 2, Grok).
"""
from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The ALiBi head slopes of Press et al. (geometric, ``2^(-8 h / n)``; for a head count that
    is not a power of two, those of the next lower power plus every other one of the next higher),
    float32 ``(num_heads,)``."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
