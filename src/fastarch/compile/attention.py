"""``torch.ops.fastarch.sdpa``: scaled dot-product attention that picks its kernel from the mask.

The compile backend rewrites ``F.scaled_dot_product_attention(q, k, v, attn_mask=M, ...)`` calls
into this op. It has SDPA's schema and SDPA's semantics exactly (the reference *is*
``F.scaled_dot_product_attention``); what it adds is a look at the mask when it runs:

* a mask that allows everything -> SDPA without a mask (Q.K^T is not masked element by element);
* a mask whose tiles are mostly empty (causal, sliding window, padding, documents, ...) -> the
  block-sparse attention kernel over the tiles that have any allowed pair, with the mask's own
  bits inside the partial tiles, so the masked-out tiles are never computed;
* anything else (dense masks, additive biases that are not 0 / -inf, dropout, shapes or dtypes
  the kernel does not take, small problems where the look costs more than it saves) -> SDPA with
  the mask, unchanged.

Why at run time: inside a compiled graph the mask is an intermediate tensor (Hugging Face builds
it from the attention mask and positions), so which tiles it empties is only known once it has
values. The layers of a model share one mask, so its plan is made once per forward:

* called eagerly (``plan_mode=0``), the plan is kept per mask tensor, checked against the
  tensor's identity and version;
* in a compiled graph the rewrite gives each mask node a slot (``plan_slot``) and passes
  ``plan_mode=1`` on its first call (plan afresh, keep the plan in the slot, per thread) and
  ``2`` on the later ones (reuse it). Inside Inductor's code the calls on one mask node may get
  different buffers or view objects with the same content, and a freed buffer may be handed to a
  later tensor without bumping any version, so neither identity nor version can be trusted
  there; program order can.

Where the block-sparse kernel starts to pay off was measured on this project's CPU machine
(``bench/bench_compile.py``); the thresholds below come from there. On CUDA the op runs SDPA:
the Triton path of the block-sparse kernel has not been measured on a GPU yet.
"""
from __future__ import annotations

import itertools
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fastarch.attention.block_mask import block_mask_from_bitmaps
from fastarch.ops.block_sparse_attention import BlockMask

__all__ = ["sdpa", "plan_attention", "AttentionPlan"]

BLOCK_SIZE = 64
# The look at the mask and the block-sparse kernel pay off only past this many query x key pairs
# per (batch, head) slice and when at most this fraction of tiles is visited (measured with
# bench/bench_compile.py --attention; see bench/RESULTS.md). Environment overrides for tuning.
MIN_PAIRS = int(os.environ.get("FASTARCH_SDPA_MIN_PAIRS", 512 * 512))
MAX_FRACTION = float(os.environ.get("FASTARCH_SDPA_MAX_FRACTION", 0.45))
# additive mask values at or below this are "masked": exp(s + m - max) is exactly 0 in fp32 when
# the row has an allowed entry (checked), so the bool view of the mask gives the same softmax
_MASKED = -1.0e4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AttentionPlan:
    """What one mask turns into: ``kind`` is ``"sdpa"`` (mask kept), ``"nomask"`` or
    ``"block_sparse"`` (with ``block_mask``), ``reason`` says why."""

    __slots__ = ("kind", "reason", "block_mask", "fraction", "version", "shape")

    def __init__(self, kind: str, reason: str, block_mask: BlockMask | None = None,
                 fraction: float = 1.0, version: int = -1):
        self.kind, self.reason, self.block_mask = kind, reason, block_mask
        self.fraction, self.version = fraction, version
        self.shape: tuple = ()

    def __repr__(self) -> str:
        return f"AttentionPlan({self.kind!r}, {self.reason!r}, fraction={self.fraction:.3f})"


_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # eager: per mask tensor
_GRAPH = threading.local()  # compiled graphs: plan slot -> plan, per thread
_next_slot = itertools.count()


def new_plan_slot() -> int:
    """A slot for one mask node of a compiled graph (see the module docstring)."""
    return next(_next_slot)


def _graph_plans() -> dict:
    plans = getattr(_GRAPH, "plans", None)
    if plans is None:
        plans = _GRAPH.plans = {}
    return plans
STATS = {"sdpa": 0, "nomask": 0, "block_sparse": 0}


_ONES = int.from_bytes(b"\x01" * 8, "little")  # eight True bytes read as one int64


def _padded_words(keep: torch.Tensor, bs: int) -> torch.Tensor:
    """The bool mask ``(Bm, Hm, Lq, Lk)`` zero-padded to whole tiles, contiguous, as int64 words
    of eight pairs each ``(Bm, Hm, Qt * bs, Kt * bs / 8)``: the tile scans then touch 8x fewer
    elements."""
    bm_, hm_, lq, lk = keep.shape
    qt, kt = -(-lq // bs), -(-lk // bs)
    padded = keep.new_zeros(bm_, hm_, qt * bs, kt * bs)
    padded[..., :lq, :lk] = keep
    return padded.view(torch.int64)


def _block_mask_from_words(words: torch.Tensor, bs: int, lq: int, lk: int) -> BlockMask:
    """Exact BlockMask of a padded mask (see :func:`_padded_words`): empty tiles skipped, tiles
    whose pairs are all allowed unmasked, the rest with their bitmaps. Tiles cut by the end of a
    sequence always get a bitmap (zero past the end, which the kernel never reads)."""
    bm_, hm_ = words.shape[:2]
    qt, kt = -(-lq // bs), -(-lk // bs)
    grid = words.view(bm_, hm_, qt, bs, kt, bs // 8)
    any_ = (grid != 0).any(-1).any(3)  # (Bm, Hm, Qt, Kt)
    full = (grid == _ONES).all(-1).all(3)
    partial = any_ & ~full
    where = partial.nonzero(as_tuple=True)  # row-major = ascending tile order within a row
    bitmaps = grid[where[0], where[1], where[2], :, where[3], :]  # (P, bs, bs / 8) words
    bitmaps = bitmaps.contiguous().view(torch.bool).view(-1, bs, bs)
    return block_mask_from_bitmaps(full, partial, bitmaps, bs, lq, lk)


def _fraction_lower_bound(mask: torch.Tensor, bs: int) -> float:
    """Tiles visited, counted on the first and last row of each query tile only (a bool mask,
    or an additive one where 0 = allowed)."""
    bm_, hm_, lq, lk = mask.shape
    qt, kt = -(-lq // bs), -(-lk // bs)
    first = torch.arange(qt, device=mask.device) * bs
    rows = torch.stack([first, torch.clamp(first + bs - 1, max=lq - 1)], 1).flatten()
    sampled = mask.index_select(2, rows)  # (Bm, Hm, 2 Qt, Lk)
    if sampled.dtype != torch.bool:
        sampled = sampled == 0
    if kt * bs != lk:
        sampled = torch.nn.functional.pad(sampled, (0, kt * bs - lk))
    visited = sampled.view(bm_, hm_, qt, 2, kt, bs).any(-1).any(3)
    return float(visited.sum()) / max(visited.numel(), 1)


def _collapse(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Drop a batch / head dim of the mask whose slices are all equal."""
    if words.shape[dim] == 1:
        return words
    first = words.narrow(dim, 0, 1)
    return first if bool((words == first).all()) else words


def plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: torch.Tensor | None, dropout_p: float = 0.0,
                   is_causal: bool = False, enable_gqa: bool = False,
                   min_pairs: int | None = None, max_fraction: float | None = None,
                   cache: bool = True, plan_mode: int = 0, plan_slot: int = -1
                   ) -> AttentionPlan:
    """How :func:`sdpa` runs for these inputs (see the module docstring for ``plan_mode``)."""
    min_pairs = MIN_PAIRS if min_pairs is None else min_pairs
    max_fraction = MAX_FRACTION if max_fraction is None else max_fraction
    if attn_mask is None or is_causal or dropout_p != 0.0:
        return AttentionPlan("sdpa", "no mask, is_causal or dropout: SDPA handles it")
    if q.device.type != "cpu":
        return AttentionPlan("sdpa", f"block-sparse path not enabled on {q.device.type}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[-1] != v.shape[-1]:
        return AttentionPlan("sdpa", "inputs are not (B, H, L, D) with equal head dims")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _KERNEL_DTYPES:
        return AttentionPlan("sdpa", f"dtype {q.dtype} not taken by the kernel")
    b, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or hq % max(hk, 1) != 0:
        return AttentionPlan("sdpa", "shapes the kernel does not take")
    if hk != hq and not enable_gqa:
        return AttentionPlan("sdpa", "grouped heads without enable_gqa")
    if attn_mask.dim() > 4 or not _broadcasts(attn_mask.shape, (b, hq, lq, lk)):
        return AttentionPlan("sdpa", "mask does not broadcast to (B, H, Lq, Lk)")
    if lq * lk < min_pairs:
        return AttentionPlan("sdpa", f"small problem ({lq} x {lk} < {min_pairs} pairs)")
    graph = plan_mode in (1, 2) and plan_slot >= 0
    if graph and plan_mode == 2 and cache:
        hit = _graph_plans().get(plan_slot)
        if hit is not None and hit.shape == (lq, lk) and _fits(hit, q):
            return hit
    elif plan_mode == 0 and cache:
        hit = _PLANS.get(attn_mask)
        if hit is not None and hit.version == attn_mask._version and _fits(hit, q):
            return hit
    plan = _plan_from_mask(attn_mask, b, hq, lq, lk, max_fraction)
    plan.version, plan.shape = attn_mask._version, (lq, lk)
    if cache and graph:
        _graph_plans()[plan_slot] = plan
    elif cache and plan_mode == 0:
        _PLANS[attn_mask] = plan
    return plan


def _broadcasts(shape, target) -> bool:
    shape = (1,) * (len(target) - len(shape)) + tuple(shape)
    return all(s in (1, t) for s, t in zip(shape, target))


def _fits(plan: AttentionPlan, q: torch.Tensor) -> bool:
    bm = plan.block_mask
    if bm is None:
        return True
    return bm.kv_num_blocks.shape[0] in (1, q.shape[0]) and bm.kv_num_blocks.shape[1] in (
        1, q.shape[1])


@torch.no_grad()
def _plan_from_mask(mask: torch.Tensor, b: int, hq: int, lq: int, lk: int,
                    max_fraction: float) -> AttentionPlan:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return AttentionPlan("sdpa", f"mask dtype {mask.dtype}")
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m4 = m4.expand(m4.shape[0], m4.shape[1], lq, lk)  # e.g. a key-padding mask (B, 1, 1, Lk)
    # a dim the mask was expanded along is read once; other repeated slices collapse below
    m4 = m4[tuple(slice(0, 1) if m4.stride(d) == 0 else slice(None) for d in (0, 1))]
    # A lower bound of the visited tiles from the first and last row of each query tile (1/32 of
    # the mask): a dense mask goes back to SDPA before the mask is read in full.
    lb = _fraction_lower_bound(m4, BLOCK_SIZE)
    if lb >= 1.0 and bool((m4 if m4.dtype == torch.bool else m4 == 0).all()):
        return AttentionPlan("nomask", "mask allows every pair", fraction=1.0)
    if lb > max_fraction:
        return AttentionPlan("sdpa", f">= {lb:.0%} of tiles visited > {max_fraction:.0%}",
                             fraction=lb)
    if m4.dtype == torch.bool:
        keep = m4
    else:
        keep = m4 == 0
        if bool(((m4 > _MASKED) & ~keep).any()):
            return AttentionPlan("sdpa", "additive mask with values other than 0 and -inf")
        empty = ~keep.any(-1)
        if bool(empty.any()) and not bool((m4[empty.nonzero(as_tuple=True)] == float("-inf")).all()):
            # SDPA gives zeros for a row of -inf (as the kernel does) but spreads a row of finite
            # large negatives uniformly over the keys
            return AttentionPlan("sdpa", "additive mask with rows masked by finite values")
    words = _collapse(_collapse(_padded_words(keep, BLOCK_SIZE), 1), 0)
    bm = _block_mask_from_words(words, BLOCK_SIZE, lq, lk)
    fraction = bm.computed_fraction()
    if fraction >= 1.0 and bool(keep.all()):
        return AttentionPlan("nomask", "mask allows every pair", fraction=1.0)
    if fraction > max_fraction:
        return AttentionPlan("sdpa", f"{fraction:.0%} of tiles visited > {max_fraction:.0%}",
                             fraction=fraction)
    return AttentionPlan("block_sparse", f"{fraction:.0%} of tiles visited", bm, fraction)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's own reading of a bool mask: 0 where allowed, -inf elsewhere, in the query's dtype
    (the compile backend inserts this in the graph so that Inductor fuses it with the mask's
    construction, once per mask, as it does for SDPA)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), float("-inf"), dtype=dtype, device=mask.device))


def _run(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, plan_mode=0,
         plan_slot=-1):
    plan = plan_attention(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa,
                          plan_mode=plan_mode, plan_slot=plan_slot)
    STATS[plan.kind] += 1
    if plan.kind == "nomask":
        return F.scaled_dot_product_attention(q, k, v, None, dropout_p, False, scale=scale,
                                              enable_gqa=enable_gqa)
    if plan.kind == "block_sparse":
        bm = plan.block_mask
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, _ = torch.ops.fastarch.block_sparse_attention(
            q, k, v, *bm.op_args(), None, None, bm.block_size, 0, -1, -1, 0, s, 0.0)
        return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _check(q, k, v, attn_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if q.dim() < 2:
        raise ValueError(f"q must have at least 2 dims (..., L, E), got shape {tuple(q.shape)}")


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output's layout: q's dim order with v's head dim, as CPU SDPA returns it (Hugging Face
    passes q as a transposed (B, L, H, D) tensor, and its ``out.transpose(1, 2).reshape(...)``
    then costs nothing)."""
    shape = q.shape[:-1] + v.shape[-1:]
    if q.dim() < 2:
        return q.new_empty(shape)
    # dims by decreasing stride, the last (head) dim kept last
    order = sorted(range(q.dim() - 1), key=lambda i: -q.stride(i)) + [q.dim() - 1]
    out = q.new_empty([shape[i] for i in order])
    return out.permute([order.index(i) for i in range(q.dim())])


@torch.library.custom_op("fastarch::sdpa", mutates_args=())
def _sdpa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
             dropout_p: float, is_causal: bool, scale: float | None,
             enable_gqa: bool, plan_mode: int = 0, plan_slot: int = -1) -> torch.Tensor:
    out = _run(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, plan_mode,
               plan_slot)
    want = _out_like(q, v)
    if out.stride() != want.stride():  # the fake kernel promises this layout
        want.copy_(out)
        return want
    return out


@_sdpa_op.register_fake
def _sdpa_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, plan_mode=0,
               plan_slot=-1):
    return _out_like(q, v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, _, _ = inputs
    if dropout_p != 0.0:
        raise NotImplementedError("fastarch.sdpa: backward with dropout is not supported (the "
                                  "compile backend leaves dropout attention to SDPA)")
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (is_causal, scale, enable_gqa)


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    is_causal, scale, enable_gqa = ctx.args
    needs = ctx.needs_input_grad[:4]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((q, k, v, attn_mask), needs)]
        out = F.scaled_dot_product_attention(*leaves[:3], leaves[3], 0.0, is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        wrt = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(out, wrt, grad_out) if wrt else ())
    return tuple(next(grads) if (t is not None and n) else None
                 for t, n in zip(leaves, needs)) + (None,) * 6


_sdpa_op.register_autograd(_backward, setup_context=_setup_context)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the same arguments and result, running the
    block-sparse kernel when the mask empties enough tiles (see the module docstring).

    Example:
        >>> pad = torch.ones(2, 1, 1, 512, dtype=torch.bool); pad[1, ..., 300:] = False
        >>> mask = torch.ones(512, 512, dtype=torch.bool).tril() & pad
        >>> out = fastarch.compile.sdpa(q, k, v, attn_mask=mask)  # == F.sdpa(q, k, v, mask)
    """
    _check(q, k, v, attn_mask)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be given together (as in SDPA)")
    return torch.ops.fastarch.sdpa(q, k, v, attn_mask, float(dropout_p), bool(is_causal),
                                   None if scale is None else float(scale), bool(enable_gqa))
