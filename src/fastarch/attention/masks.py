"""Attention masks as small descriptors (evaluated inside the kernel) or vectorised predicates.

A :class:`MaskSpec` says which (query position, key position) pairs may attend:

    allowed = (window_ok(kv - q) or kv < prefix_len) and same_document and mask_mod(b, h, q, kv)

``window_ok(d) = -window_left <= d <= window_right`` (a negative bound is unbounded). The first
three parts are the kernel's descriptor: cheap, no per-element memory. ``mask_mod`` is any
vectorised function of broadcastable int64 tensors ``(b, h, q_idx, kv_idx)`` (absolute positions)
returning a bool tensor; the block-mask builder evaluates it and stores per-tile bitmaps only for
the tiles it cuts. Build masks with the factories below and combine them with
:func:`and_masks` / :func:`or_masks`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class MaskSpec:
    """A mask: descriptor fields plus an optional predicate (see the module docstring)."""

    name: str
    window_left: int = -1
    window_right: int = -1
    prefix_len: int = 0
    doc_ids: torch.Tensor | None = None  # (L,) or (B, L) document id of each position
    mask_mod: MaskMod | None = None
    # whether mask_mod depends on the batch / head index (else one mask serves all)
    per_batch: bool = False
    per_head: bool = False
    # mask_mod is constant on aligned (mod_block x mod_block) squares of positions (block-level
    # patterns such as BigBird): the builder then evaluates it once per tile, not per element.
    mod_block: int = 0
    # mask_mod depends on q_idx - kv_idx only (Sparse Transformer strided, local patterns): the
    # builder evaluates one (bs x bs) bitmap per tile diagonal and shares it between tiles.
    relative: bool = False
    # mask_mod is unchanged when q_idx and kv_idx both move by a multiple of ``period`` (0: not
    # known; relative masks have period 1): tiles on one diagonal whose positions differ by a
    # multiple of the period share a bitmap, so the builder evaluates one per class of tiles.
    period: int = 0
    # whether the builder may try to classify tiles from bounds of mask_mod (False for lookups
    # into a dense mask tensor, which bounds cannot follow: the trace would only fail first)
    bounded: bool = True

    @property
    def shift_period(self) -> int:
        """The joint-shift period of the whole predicate (descriptor included), or 0."""
        if self.prefix_len > 0 or self.doc_ids is not None:
            return 0  # a prefix and documents sit at absolute positions
        if self.mask_mod is None or self.relative:
            return 1
        return self.period

    @property
    def mask_mod_period(self) -> int:
        """The joint-shift period of mask_mod alone (1 when relative), or 0."""
        return 1 if self.relative else self.period

    @property
    def has_descriptor_only(self) -> bool:
        return self.mask_mod is None

    def predicate(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        """The full mask as a vectorised predicate (absolute positions)."""
        d = kv_idx - q_idx
        ok = torch.ones_like(d, dtype=torch.bool)
        if self.window_left >= 0:
            ok = ok & (d >= -self.window_left)
        if self.window_right >= 0:
            ok = ok & (d <= self.window_right)
        if self.prefix_len > 0:
            ok = ok | (kv_idx < self.prefix_len)
        if self.doc_ids is not None:
            docs = self.doc_ids if self.doc_ids.dim() == 2 else self.doc_ids.unsqueeze(0)
            bb = b if docs.shape[0] > 1 else torch.zeros_like(b)
            ok = ok & (docs[bb, q_idx] == docs[bb, kv_idx])
        if self.mask_mod is not None:
            got = self.mask_mod(b, h, q_idx, kv_idx)
            # On index tensors an integer result means "non-zero = may attend" (as bool() of
            # it); a float result is an error. The bounds trace passes its own objects here.
            tensor = isinstance(got, torch.Tensor)
            if isinstance(got, float) or tensor and (got.dtype.is_floating_point
                                                     or got.dtype.is_complex):
                raise TypeError(f"the mask function of {self.name!r} must return a bool tensor "
                                f"(True = may attend), got {got.dtype if tensor else 'float'}")
            ok = ok & (got != 0 if tensor and got.dtype != torch.bool else got)
        return ok

    def __repr__(self) -> str:
        return f"MaskSpec({self.name})"


# ---- factories ----------------------------------------------------------------------------------
def full() -> MaskSpec:
    """Every query sees every key (bidirectional, e.g. BERT / ViT)."""
    return MaskSpec("full")


def causal() -> MaskSpec:
    """Key position <= query position."""
    return MaskSpec("causal", window_right=0)


def sliding_window(left: int, right: int = 0) -> MaskSpec:
    """Query at position q sees keys in ``[q - left, q + right]``. ``right=0`` is causal local
    attention (Mistral's ``sliding_window=W`` is ``left = W - 1``)."""
    if left < 0 or right < 0:
        raise ValueError(f"left and right must be >= 0, got left={left}, right={right}")
    return MaskSpec(f"sliding_window({left},{right})", window_left=int(left),
                    window_right=int(right))


def prefix_lm(prefix_len: int) -> MaskSpec:
    """Bidirectional over the first ``prefix_len`` keys, causal after (T5 / PaLM prefix-LM)."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    return MaskSpec(f"prefix_lm({prefix_len})", window_right=0, prefix_len=int(prefix_len))


def document(doc_ids: torch.Tensor | None = None, *, lengths=None, cu_seqlens=None) -> MaskSpec:
    """Queries see only keys of their own document (packed sequences).

    Give one of ``doc_ids`` ((L,) or (B, L) ints), ``lengths`` (documents' lengths, in order) or
    ``cu_seqlens`` (cumulative offsets starting at 0, as in flash-attn's varlen API). Combine with
    :func:`causal` for packed causal LM training: ``and_masks(causal(), document(...))``.
    """
    given = sum(x is not None for x in (doc_ids, lengths, cu_seqlens))
    if given != 1:
        raise ValueError("give exactly one of doc_ids, lengths, cu_seqlens")
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens).long()
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError("cu_seqlens must be 1-D, start at 0 and be non-decreasing")
        lengths = cu[1:] - cu[:-1]
    if lengths is not None:
        lengths = torch.as_tensor(lengths).long()
        if lengths.dim() != 1 or bool((lengths < 0).any()):
            raise ValueError("lengths must be a 1-D tensor of non-negative ints")
        doc_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() not in (1, 2):
        raise ValueError("doc_ids must be a (L,) or (B, L) integer tensor")
    return MaskSpec("document", doc_ids=doc_ids.long())


def strided(stride: int, local: int | None = None) -> MaskSpec:
    """Sparse Transformer "strided" pattern (causal): the previous ``local`` (default ``stride``)
    positions plus every position at a multiple of ``stride`` behind the query."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    local = stride if local is None else int(local)

    def mod(b, h, q, kv):
        d = q - kv
        return (d < local) | (d % stride == 0)

    return MaskSpec(f"strided({stride},{local})", window_right=0, mask_mod=mod, relative=True)


def fixed(stride: int, summary: int = 1) -> MaskSpec:
    """Sparse Transformer "fixed" pattern (causal): keys in the query's own block of ``stride``
    positions, plus the last ``summary`` positions of every block."""
    if stride < 1 or not 0 <= summary <= stride:
        raise ValueError(f"need stride >= 1 and 0 <= summary <= stride, got {stride}, {summary}")

    def mod(b, h, q, kv):
        return (q // stride == kv // stride) | (kv % stride >= stride - summary)

    return MaskSpec(f"fixed({stride},{summary})", window_right=0, mask_mod=mod, period=stride)


def global_local_random(*, block: int = 64, global_blocks: int = 1, window_blocks: int = 1,
                        random_blocks: int = 0, causal: bool = False, seed: int = 0) -> MaskSpec:
    """Longformer / BigBird style, at the granularity of ``block`` positions.

    Every query sees the first ``global_blocks`` blocks (global tokens, which also see every
    key), the ``window_blocks`` neighbouring blocks on each side of its own, and each other key
    block with probability ``random_blocks / number_of_key_blocks``, chosen by a fixed hash of
    (query block, key block, seed) so that the pattern needs no length up front.
    """
    if block < 1 or global_blocks < 0 or window_blocks < 0 or random_blocks < 0:
        raise ValueError("block must be >= 1 and the block counts >= 0")

    def mod(b, h, q, kv):
        qb, kb = q // block, kv // block
        ok = (kb < global_blocks) | (qb < global_blocks) | ((qb - kb).abs() <= window_blocks)
        if random_blocks > 0:
            nkb = torch.clamp(kv.max() // block + 1, min=1)
            hsh = (qb * 1000003 + kb * 7919 + seed * 104729) * 2654435761 % 4294967296
            ok = ok | (hsh * nkb < random_blocks * 4294967296)
        return ok

    return MaskSpec(f"global_local_random(block={block},g={global_blocks},w={window_blocks},"
                    f"r={random_blocks})", window_right=0 if causal else -1, mask_mod=mod,
                    mod_block=block)


def from_function(fn: MaskMod, *, per_batch: bool = False, per_head: bool = False,
                  relative: bool = False, block: int = 0, period: int = 0,
                  name: str = "user") -> MaskSpec:
    """A user mask ``fn(b, h, q_idx, kv_idx) -> bool`` written with tensor ops (vectorised,
    broadcasting). Say ``per_batch`` / ``per_head`` if it depends on b / h.

    With no other hint the block-mask builder runs ``fn`` once on per-tile bounds of its
    arguments (integer arithmetic, ``//`` / ``%`` by constants, comparisons, ``& | ^ ~``,
    ``abs``, ``torch.where`` / ``minimum`` / ``maximum`` / ``clamp``, indexing an integer tensor
    such as ``doc_ids[q_idx]``) and evaluates it exactly only on the tiles it cuts; a function
    using anything else (float math, reductions, data-dependent ``if``) is evaluated on the
    whole grid, as exactly but slower. ``relative`` (depends on ``q_idx - kv_idx`` only),
    ``period=p`` (unchanged when both positions move by p, e.g. patterns built from ``q // p``
    and ``kv % p``) or ``block=n`` (constant on aligned n x n squares) make it cheaper still.

    Example:
        >>> ids = torch.tensor([0] * 100 + [1] * 156)
        >>> spec = from_function(lambda b, h, q, kv: (kv <= q) & (ids[q] == ids[kv]))
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    if int(period) < 0:
        raise ValueError(f"period must be >= 0, got {period}")
    return MaskSpec(name, mask_mod=fn, per_batch=per_batch, per_head=per_head,
                    relative=relative, mod_block=int(block), period=int(period))


def attn_mask_4d(attn_mask: torch.Tensor, batch: int, heads: int, q_len: int,
                 kv_len: int) -> torch.Tensor:
    """An SDPA-style ``attn_mask`` (bool, True = attend, or additive float: ``-inf`` / the
    dtype's min = masked; broadcastable to ``(batch, heads, q_len, kv_len)``, keys past
    ``kv_len`` ignored) as a bool ``(B', H', q_len, kv_len)`` with B' in (1, batch) and H' in
    (1, heads); anything else is a clear error rather than a wrong mask."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError("attn_mask must be bool (True = attend) or an additive float mask, got "
                        f"{attn_mask.dtype}")
    if not 2 <= attn_mask.dim() <= 4:
        raise ValueError(f"attn_mask must have 2 to 4 dims, got shape {tuple(attn_mask.shape)}")
    if attn_mask.dtype != torch.bool:
        attn_mask = attn_mask > torch.finfo(attn_mask.dtype).min / 2
    m = attn_mask[..., :kv_len]
    m = m.view((1,) * (4 - m.dim()) + tuple(m.shape))  # torch broadcasting: leading dims are 1
    want = (batch, heads, q_len, kv_len)
    if any(s not in (1, w) for s, w in zip(m.shape, want)):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(batch, heads, q_len, kv_len) = {want}")
    return m.expand(m.shape[0], m.shape[1], q_len, kv_len)


def from_dense(mask: torch.Tensor, q_offset: int = 0, name: str = "dense") -> MaskSpec:
    """A boolean mask tensor ``(Lq, Lk)``, ``(B, Lq, Lk)`` or ``(B, H, Lq, Lk)`` (True = attend);
    its row i is the query at position ``i + q_offset``."""
    if mask.dtype != torch.bool or mask.dim() not in (2, 3, 4):
        raise ValueError("mask must be a bool tensor of 2, 3 or 4 dims")
    m4 = mask if mask.dim() == 4 else mask.unsqueeze(1) if mask.dim() == 3 else mask[None, None]

    def mod(b, h, q, kv):
        bb = b if m4.shape[0] > 1 else torch.zeros_like(b)
        hh = h if m4.shape[1] > 1 else torch.zeros_like(h)
        return m4[bb, hh, q - q_offset, kv]

    return MaskSpec(name, mask_mod=mod, per_batch=m4.shape[0] > 1, per_head=m4.shape[1] > 1,
                    bounded=False)


# ---- combinations -------------------------------------------------------------------------------
def _meet(a: int, b: int) -> int:
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)


def and_masks(*specs: MaskSpec) -> MaskSpec:
    """Pairs allowed by every mask. Stays a pure descriptor when it can (e.g. causal & document,
    causal & sliding window), otherwise the parts become one predicate."""
    if not specs:
        return full()
    out = specs[0]
    for s in specs[1:]:
        simple = (out.prefix_len == 0 and s.prefix_len == 0
                  and (out.doc_ids is None or s.doc_ids is None))
        if simple:
            mods = [m for m in (out.mask_mod, s.mask_mod) if m is not None]
            with_mod = [x for x in (out, s) if x.mask_mod is not None]
            mod = None
            if len(mods) == 1:
                mod = mods[0]
            elif len(mods) == 2:
                m1, m2 = mods
                mod = lambda b, h, q, kv, m1=m1, m2=m2: m1(b, h, q, kv) & m2(b, h, q, kv)
            out = MaskSpec(f"{out.name}&{s.name}",
                           window_left=_meet(out.window_left, s.window_left),
                           window_right=_meet(out.window_right, s.window_right),
                           doc_ids=out.doc_ids if out.doc_ids is not None else s.doc_ids,
                           mask_mod=mod, per_batch=out.per_batch or s.per_batch,
                           per_head=out.per_head or s.per_head,
                           relative=bool(with_mod) and all(x.relative for x in with_mod),
                           period=_joint_period(x.mask_mod_period for x in with_mod),
                           mod_block=_joint_period(x.mod_block for x in with_mod),
                           bounded=all(x.bounded for x in with_mod))
        else:
            a, c = out, s
            out = MaskSpec(f"{a.name}&{c.name}",
                           mask_mod=lambda b, h, q, kv, a=a, c=c: a.predicate(b, h, q, kv)
                           & c.predicate(b, h, q, kv),
                           per_batch=a.per_batch or c.per_batch or _docs_per_batch(a, c),
                           per_head=a.per_head or c.per_head,
                           period=_joint_period((a.shift_period, c.shift_period)),
                           bounded=a.bounded and c.bounded)
    return out


def _joint_period(periods) -> int:
    """The least common multiple of the periods, 0 when one of them is 0 (unknown)."""
    out = 1
    for p in periods:
        if p <= 0:
            return 0
        out = math.lcm(out, p)
    return out


def or_masks(*specs: MaskSpec) -> MaskSpec:
    """Pairs allowed by any mask (always a predicate, except causal | prefix = prefix_lm)."""
    if not specs:
        raise ValueError("or_masks needs at least one mask")
    if len(specs) == 1:
        return specs[0]

    def mod(b, h, q, kv):
        ok = specs[0].predicate(b, h, q, kv)
        for s in specs[1:]:
            ok = ok | s.predicate(b, h, q, kv)
        return ok

    return MaskSpec("|".join(s.name for s in specs), mask_mod=mod,
                    per_batch=any(s.per_batch for s in specs) or _docs_per_batch(*specs),
                    per_head=any(s.per_head for s in specs),
                    period=_joint_period(s.shift_period for s in specs),
                    bounded=all(s.bounded for s in specs))


def _docs_per_batch(*specs: MaskSpec) -> bool:
    return any(s.doc_ids is not None and s.doc_ids.dim() == 2 and s.doc_ids.shape[0] > 1
               for s in specs)
