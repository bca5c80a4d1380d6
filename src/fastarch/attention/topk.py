"""Data-dependent block selection (Quest / landmark / NSA style): each query tile keeps the top-k
key blocks by a per-block summary score, shared across a GQA group.

Scores: key block ``j`` keeps the per-channel min and max of its keys (Quest); a query tile's
score for it is the upper bound ``sum_d max(q_d * kmin_jd, q_d * kmax_jd)`` summed over the tile's
queries' mean and over the query heads of the group (so one selection serves the group, and the
kernel reads each selected K/V tile once per head). Causal selection only considers blocks that
are not in the future; the block holding the query tile's diagonal (and ``sink_blocks`` first
blocks) are always kept. The result is an ordinary :class:`BlockMask` (full tiles below the
diagonal, causal element mask on the diagonal tiles), for prefill and for decode over a KV cache.

:class:`KeyBlockSummary` keeps the summaries of a growing KV cache up to date in O(new keys).
"""
from __future__ import annotations

import torch

from fastarch.ops.block_sparse_attention import BlockMask


class KeyBlockSummary:
    """Per-block channel min / max of the keys ``(B, Hkv, Kt, D)``, extended as keys arrive.

    Both live in one fp32 tensor, ``bounds`` ``(B, Hkv, Kt, 2 D)`` = ``[kmax | kmin]`` (so that a
    query's bound for every block is one matrix product), with infinite keys taken as the
    largest finite float: a zero query part times such a bound adds 0, not NaN. NaN stays NaN.
    """

    def __init__(self, block_size: int = 64):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        self.bounds: torch.Tensor | None = None
        self.length = 0

    @property
    def kmax(self) -> torch.Tensor | None:
        return None if self.bounds is None else self.bounds[..., :self.bounds.shape[-1] // 2]

    @property
    def kmin(self) -> torch.Tensor | None:
        return None if self.bounds is None else self.bounds[..., self.bounds.shape[-1] // 2:]

    @classmethod
    def of(cls, k: torch.Tensor, block_size: int = 64) -> KeyBlockSummary:
        s = cls(block_size)
        s.update(k)
        return s

    def update(self, k_new: torch.Tensor) -> KeyBlockSummary:
        """Add keys ``(B, Hkv, n, D)`` at positions ``length .. length + n - 1``."""
        if k_new.dim() != 4:
            raise ValueError(f"k_new must be (B, Hkv, n, D), got shape {tuple(k_new.shape)}")
        bs = self.block_size
        b, h, n, d = k_new.shape
        if n == 0:
            return self
        big = torch.finfo(torch.float32).max
        kf = k_new.detach().float().clamp(-big, big)
        start = self.length
        lead = start % bs  # keys already in the block the new ones start in
        if self.bounds is not None and 0 < lead and lead + n <= bs:
            # all new keys fall in the last stored block (a decode step, 63 in 64 with bs=64):
            # update its bounds in place instead of re-concatenating the whole summary
            last = self.bounds[:, :, -1:]
            last[..., :d] = torch.maximum(last[..., :d], kf.amax(2, keepdim=True))
            last[..., d:] = torch.minimum(last[..., d:], kf.amin(2, keepdim=True))
            self.length += n
            return self
        # Pad the new keys so that they line up with block boundaries; the padding repeats a
        # real key, which does not change a min or a max.
        total = lead + n
        nblk = -(-total // bs)
        pad_front = kf[:, :, :1].expand(b, h, lead, d)
        pad_back = kf[:, :, -1:].expand(b, h, nblk * bs - total, d)
        blocks = torch.cat([pad_front, kf, pad_back], dim=2).view(b, h, nblk, bs, d)
        new = torch.cat([blocks.amax(3), blocks.amin(3)], dim=-1)  # (b, h, nblk, 2 d)
        if self.bounds is None:
            self.bounds = new
        else:
            old = self.bounds
            if lead > 0:  # the first new block continues the last stored one
                new[:, :, 0, :d] = torch.maximum(new[:, :, 0, :d], old[:, :, -1, :d])
                new[:, :, 0, d:] = torch.minimum(new[:, :, 0, d:], old[:, :, -1, d:])
                old = old[:, :, :-1]
            self.bounds = torch.cat([old, new], dim=2)
        self.length += n
        return self


def block_scores(q: torch.Tensor, summary: KeyBlockSummary) -> torch.Tensor:
    """Quest upper-bound scores ``(B, Hkv, Qt, Kt)`` of each query tile (mean query of the tile,
    summed over the GQA group) against each key block."""
    bs = summary.block_size
    b, hq, lq, d = q.shape
    hkv = summary.kmin.shape[1]
    qt = -(-lq // bs)
    kt = summary.kmin.shape[2]
    if lq == 0:
        return q.new_zeros(b, hkv, 0, kt, dtype=torch.float32)
    qf = q.detach().float()
    if lq == 1:  # (decode: the one query is its tile's mean)
        qmean = qf.view(b, hkv, hq // hkv, 1, d)
    else:
        whole = lq // bs  # tiles of bs queries; a last partial tile is averaged over its own rows
        parts = [qf[:, :, :whole * bs].reshape(b, hq, whole, bs, d).mean(3)] if whole else []
        if whole < qt:
            parts.append(qf[:, :, whole * bs:].mean(2, keepdim=True))
        qmean = (parts[0] if len(parts) == 1 else torch.cat(parts, 2)).view(
            b, hkv, hq // hkv, qt, d)
    # sum_g sum_d max(q_gd kmin_d, q_gd kmax_d), with kmin <= kmax: kmax where q_gd > 0, kmin
    # where q_gd < 0, so one product of the group's summed positive and negative parts with
    # [kmax | kmin] instead of a (G, Qt, Kt, D) temporary (a decode step over 16384 keys,
    # H=32/8, D=128: ~4 ms for the mask, 15x the attention call it serves). The summary holds
    # infinities as the largest finite float, so that a zero part times one adds 0, not NaN
    # (max() kept the other, finite, product).
    parts = torch.cat([qmean.clamp(min=0), qmean.clamp(max=0)], dim=-1).sum(2)  # (B,Hkv,Qt,2D)
    return parts @ summary.bounds.transpose(-1, -2)


def topk_block_mask(q: torch.Tensor, k: torch.Tensor | None = None, *, topk: int,
                    block_size: int = 64, causal: bool = True, sink_blocks: int = 1,
                    q_offset: int | None = None,
                    summary: KeyBlockSummary | None = None) -> BlockMask:
    """A :class:`BlockMask` keeping, per query tile and GQA group, the ``topk`` best key blocks.

    Args:
        q: ``(B, Hq, Lq, D)`` queries (prefill, or the 1..16 newest positions when decoding).
        k: ``(B, Hkv, Lk, D)`` keys, or None when ``summary`` is given.
        topk: key blocks per query tile, counting the always-kept diagonal and sink blocks.
        causal: only blocks at or before the query; the element mask is causal.
        sink_blocks: the first blocks, always kept (attention sinks).
        q_offset: position of the first query; default ``Lk - Lq`` (queries at the end).
        summary: a :class:`KeyBlockSummary` of the keys (a KV cache keeps one up to date).

    Example:
        >>> bm = topk_block_mask(q, k, topk=8)
        >>> out = fastarch.block_sparse_attention(q, k, v, bm)
    """
    if summary is None:
        if k is None:
            raise ValueError("give k or summary")
        summary = KeyBlockSummary.of(k, block_size)
    if summary.block_size != block_size:
        raise ValueError(f"summary has block_size {summary.block_size}, expected {block_size}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    _, hq, lq, _ = q.shape
    lk = summary.length
    hkv = summary.kmin.shape[1]
    if hq % hkv:
        raise ValueError(f"the heads of q ({hq}) must be a multiple of the key heads ({hkv})")
    q_offset = lk - lq if q_offset is None else q_offset
    bs = block_size
    if lq == 1 and q_offset == lk - 1 and lk > 0:
        return _decode_topk_mask(q, summary, topk, causal, sink_blocks)
    return _topk_mask(q, summary, topk, causal, sink_blocks, q_offset)


def _decode_topk_mask(q, summary: KeyBlockSummary, topk: int, causal: bool,
                      sink_blocks: int) -> BlockMask:
    """topk_block_mask of one query at the last key (a decode step), with a few tensor ops
    instead of _topk_mask's ~40. Every block it keeps is wholly visible to the query, so the
    mask has full tiles only: the ``topk`` best, counting the sink blocks and (causal) the last
    one, in ascending order."""
    b, hq = q.shape[:2]
    bs, lk = summary.block_size, summary.length
    hkv = summary.kmin.shape[1]
    kt = -(-lk // bs)
    kk = min(topk, kt)
    dev = q.device
    if kk == kt:  # every block: no scores needed, one list for all heads
        fidx = torch.arange(kt, dtype=torch.int32, device=dev).view(1, 1, 1, kt)
        bm_b = bm_h = 1
    else:
        ranked = block_scores(q, summary)  # (B, Hkv, 1, Kt), a fresh tensor
        big = torch.finfo(torch.float32).max
        if sink_blocks > 0:
            ranked[..., :sink_blocks] = big
        if causal:
            ranked[..., kt - 1] = big  # the query's own block
        top = torch.topk(ranked, kk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
        g = hq // hkv  # (B, Hq, 1, kk): each kv head's list for each query head of its group
        fidx = top.unsqueeze(2).expand(b, hkv, g, 1, kk).reshape(b, hq, 1, kk)
        bm_b, bm_h = b, hq
    fnum = torch.full((bm_b, bm_h, 1), kk, dtype=torch.int32, device=dev)
    num = torch.zeros((bm_b, bm_h, 1), dtype=torch.int32, device=dev)
    idx = torch.zeros((bm_b, bm_h, 1, 1), dtype=torch.int32, device=dev)
    return BlockMask(num, idx, fnum, fidx, bs, 1, lk, q_offset=lk - 1,
                     window_right=0 if causal else -1)


def _topk_mask(q, summary: KeyBlockSummary, topk: int, causal: bool, sink_blocks: int,
               q_offset: int) -> BlockMask:
    """topk_block_mask for any queries (see there)."""
    _, hq, lq, _ = q.shape
    bs, lk = summary.block_size, summary.length
    hkv = summary.kmin.shape[1]
    qt, kt = -(-lq // bs), -(-lk // bs)
    dev = q.device
    scores = block_scores(q, summary)  # (B, Hkv, Qt, Kt)
    qfirst = torch.arange(qt, device=dev) * bs + q_offset  # first query position of each tile
    qlast = torch.clamp(torch.arange(qt, device=dev) * bs + bs, max=lq) - 1 + q_offset
    kfirst = torch.arange(kt, device=dev) * bs
    klast = torch.clamp(kfirst + bs, max=lk) - 1
    if causal:
        visible = kfirst.view(1, -1) <= qlast.view(-1, 1)  # (Qt, Kt)
        forced = visible & (klast.view(1, -1) >= qfirst.view(-1, 1))  # the diagonal tiles
    else:
        visible = torch.ones(qt, kt, dtype=torch.bool, device=dev)
        forced = torch.zeros(qt, kt, dtype=torch.bool, device=dev)
    forced = forced | ((torch.arange(kt, device=dev) < sink_blocks).view(1, -1) & visible)
    big = torch.finfo(torch.float32).max
    ranked = torch.where(forced, big, torch.where(visible, scores, -big))
    kk = min(topk, kt)
    top = torch.topk(ranked, kk, dim=-1).indices if kk > 0 else ranked.new_zeros(
        (*ranked.shape[:-1], 0), dtype=torch.long)
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    chosen = chosen & visible  # (B, Hkv, Qt, Kt)
    if causal:
        full_tile = (klast.view(1, -1) <= qfirst.view(-1, 1))  # entirely in the past
    else:
        full_tile = torch.ones(qt, kt, dtype=torch.bool, device=dev)
    from fastarch.attention.block_mask import _compress

    # the lists of each kv head, then one copy per query head of its group (B, Hq, Qt, ...):
    # the sorts run on Hkv rows, not Hq
    g = hq // hkv
    num, idx = (t.repeat_interleave(g, dim=1) for t in _compress(chosen & ~full_tile))
    fnum, fidx = (t.repeat_interleave(g, dim=1) for t in _compress(chosen & full_tile))
    return BlockMask(num, idx, fnum, fidx, bs, lq, lk, q_offset=q_offset,
                     window_right=0 if causal else -1)


# Below this many keys a CPU TopKAttention call attends to all of them (min_keys=None). Decode
# steps of a Llama-shaped model (4 layers, hidden 1024, 16 / 4 heads, D=64, bf16, Xeon with AMX,
# 2 threads, bench_attention.py --model-decode, two runs), "topk:16" selecting at every length
# against the original (SDPA over every key): 0.88-0.89x of its speed at 1024 tokens, 0.93x at
# 2048, 1.00x at 4096, 1.17-1.18x at 8192.
TOPK_MIN_KEYS_CPU = 4096
# The bool elements of one piece of a padded top-k block mask (TopKAttention.block_mask)
_MASK_CHUNK_BYTES = 64 << 20


class TopKAttention(torch.nn.Module):
    """Attention over the ``topk`` best key blocks per query tile (a ``use_attention`` variant,
    ``"topk:K"``): the block mask is rebuilt from the data on every call.

    Queries sit at the end of the keys (``q_offset = Lk - Lq``), so the same module serves a
    prefill and each decode step over a KV cache. Pass ``state`` (any object that lives as long
    as one layer's cache, e.g. the model's attention module) to keep that layer's
    :class:`KeyBlockSummary` between calls: when the keys are the previous ones plus the new
    queries' keys (a growing cache), the summary is extended in O(new keys) instead of being
    rebuilt from the whole cache. An extra boolean ``attn_mask`` (padding) is combined with the
    selection through a dense ``(Lq, Lk)`` mask (exact, but O(Lq * Lk) to build).

    Calls over fewer than ``min_keys`` keys, or whose keys fit in ``topk`` blocks, attend to
    every key they may see (plain causal / full attention, exact): there the selection costs
    more than the keys it skips. The default (None) is TOPK_MIN_KEYS_CPU on CPU, where it was
    measured, and 0 elsewhere; ``min_keys=0`` selects at every length.

    Example:
        >>> attn = TopKAttention(topk=8)
        >>> out = attn(q, k, v)
    """

    def __init__(self, topk: int, *, block_size: int = 64, sink_blocks: int = 1,
                 causal: bool = True, softcap: float = 0.0, min_keys: int | None = None):
        super().__init__()
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        if min_keys is not None and (not isinstance(min_keys, int) or min_keys < 0):
            raise ValueError(f"min_keys must be None or an int >= 0, got {min_keys!r}")
        self.min_keys = min_keys
        self.topk = topk
        self.block_size = block_size
        self.sink_blocks = sink_blocks
        self.causal = causal
        self.softcap = softcap
        self.stats = {"summary_built": 0, "summary_extended": 0, "all_blocks": 0}
        # (causal, softcap) -> the BlockSparseAttention of calls that keep every block
        self._plain: dict = {}

    @property
    def name(self) -> str:
        return f"topk:{self.topk}"

    def _summary(self, k: torch.Tensor, lq: int, state) -> KeyBlockSummary:
        lk = k.shape[2]
        prev = getattr(state, "_fastarch_topk_summary", None) if state is not None else None
        if prev is not None:
            summary, first, shape = prev
            # Extend when the cache grew by exactly the new queries and starts with the same key
            # (a new prompt, a cropped or reordered cache rebuilds).
            if (summary.block_size == self.block_size and summary.length == lk - lq
                    and shape == (k.shape[0], k.shape[1], k.shape[3])
                    and torch.equal(first, k[:, :, :1])):
                summary.update(k[:, :, summary.length:])
                self.stats["summary_extended"] += 1
                return summary
        summary = KeyBlockSummary.of(k, self.block_size)
        self.stats["summary_built"] += 1
        if state is not None and not torch.compiler.is_compiling():
            object.__setattr__(state, "_fastarch_topk_summary",
                               (summary, k[:, :, :1].detach().clone(),
                                (k.shape[0], k.shape[1], k.shape[3])))
        return summary

    def block_mask(self, q, k, attn_mask: torch.Tensor | None = None, *, causal=None,
                   state=None) -> BlockMask:
        lq, lk = q.shape[2], k.shape[2]
        causal = self.causal if causal is None else causal
        summary = self._summary(k, lq, state)
        bm = topk_block_mask(q, topk=self.topk, block_size=self.block_size, causal=causal,
                             sink_blocks=self.sink_blocks, q_offset=lk - lq, summary=summary)
        if attn_mask is None:
            return bm
        from fastarch.attention import masks as M
        from fastarch.attention.block_mask import block_mask_from_bitmaps, dense_tiles
        from fastarch.ops.block_sparse_attention import dense_mask

        b, hq = q.shape[:2]
        dense = M.attn_mask_4d(attn_mask, b, hq, lq, lk)
        if (lq == 1 and lk > 0 and dense.shape[1] == 1 and bm.q_offset == lk - 1
                and not torch.compiler.is_compiling()):
            # A decode step (its mask lists full tiles only) with one padding row per batch
            # row: the padding as documents, attended keys 1 and padded ones 0 against the
            # query's 1, with the selected tiles listed as partial ones so that the kernel
            # applies it. Each GQA group still shares its lists (the grouped decode), and no
            # (B, Hq, Lk) mask is built.
            kv_doc = dense[:, 0, 0, :].to(torch.int32)
            q_doc = torch.ones(kv_doc.shape[0], 1, dtype=torch.int32, device=q.device)
            return BlockMask(bm.full_kv_num_blocks, bm.full_kv_indices, None, None,
                             bm.block_size, 1, lk, q_offset=lk - 1,
                             window_right=bm.window_right, q_doc_ids=q_doc, kv_doc_ids=kv_doc)
        # By tiles of the selection's dense mask and the padding (the predicate path over them
        # took ~0.27 s a decode step at 4096 keys, batch 4), a few query tiles at a time: the
        # whole (B, Hq, Lq, Lk) mask would be 4.3 GB at 8192 tokens, batch 4, 16 heads.
        bs = self.block_size
        qt = -(-lq // bs)
        rows_bh = (max(bm.kv_num_blocks.shape[0], dense.shape[0])
                   * max(bm.kv_num_blocks.shape[1], dense.shape[1]))
        per = max(1, _MASK_CHUNK_BYTES // max(1, rows_bh * bs * lk))
        fulls, partials, bitmaps, index = [], [], [], []
        made = 0
        for a in range(0, qt, per):
            e = min(qt, a + per)
            r0, r1 = a * bs, min(lq, e * bs)
            sub = [t[:, :, a:e] for t in (bm.kv_num_blocks, bm.kv_indices,
                                          bm.full_kv_num_blocks, bm.full_kv_indices)]
            allowed = dense_mask(r1 - r0, lk, *sub, None, None, None, None, bs, bm.q_offset + r0,
                                 bm.window_left, bm.window_right, bm.prefix_len)
            full, partial, bmp = dense_tiles(M.full(), allowed & dense[:, :, r0:r1], bs,
                                             bm.q_offset + r0)
            # bitmap numbers in the row-major order of the whole (B', H', Qt, Kt) grid
            index.append(made + torch.cumsum(partial.flatten().to(torch.int64), 0).view(
                partial.shape) - 1)
            made += bmp.shape[0]
            fulls.append(full)
            partials.append(partial)
            bitmaps.append(bmp)
        full, partial = torch.cat(fulls, 2), torch.cat(partials, 2)
        return block_mask_from_bitmaps(full, partial, torch.cat(bitmaps), bs, lq, lk, lk - lq,
                                       bitmap_of=torch.cat(index, 2))

    def forward(self, q, k, v, *, scale: float | None = None,
                attn_mask: torch.Tensor | None = None, causal: bool | None = None,
                softcap: float | None = None, state=None) -> torch.Tensor:
        from fastarch.ops.block_sparse_attention import _attention

        cap = self.softcap if softcap is None else softcap
        causal = self.causal if causal is None else causal
        lk = k.shape[2]
        least = self.min_keys
        if least is None:
            least = TOPK_MIN_KEYS_CPU if q.device.type == "cpu" else 0
        if lk > 0 and (lk < least or -(-lk // self.block_size) <= self.topk):
            # Short enough for every key (min_keys), or the selection keeps every block the
            # queries may see: plain causal / full attention, which takes BlockSparseAttention's
            # routing (SDPA where it is faster). No summary is kept; a later call over a longer
            # cache builds it once and extends it from there.
            plain = self._plain.get((causal, cap or 0.0))
            if plain is None:
                from fastarch.attention.module import BlockSparseAttention

                plain = BlockSparseAttention("causal" if causal else "full",
                                             block_size=self.block_size, softcap=cap or 0.0)
                self._plain[(causal, cap or 0.0)] = plain
            if not torch.compiler.is_compiling():
                self.stats["all_blocks"] += 1
            return plain(q, k, v, scale=scale, attn_mask=attn_mask)
        bm = self.block_mask(q, k, attn_mask, causal=causal, state=state)
        # (the mask was built here for these q, k: its shapes need no second check)
        return _attention(q, k, v, bm, scale, cap or 0.0, None, None, False, own_mask=True)

    def extra_repr(self) -> str:
        return (f"topk={self.topk}, block_size={self.block_size}, causal={self.causal}, "
                f"min_keys={self.min_keys}")
