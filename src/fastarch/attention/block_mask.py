"""Building a :class:`~fastarch.ops.block_sparse_attention.BlockMask` from a :class:`MaskSpec`.

Tiles are classified as full (every pair allowed: no element mask), partial (some allowed: the
kernel evaluates the element mask) or empty (skipped).

* Descriptor masks (window, prefix, documents) are classified analytically from each tile's range
  of ``kv - q`` and of document ids: O(Qt * Kt) tensor ops, no per-element work.
* Masks with a predicate that is unchanged by a joint shift of q and kv (relative patterns such as
  strided: period 1; fixed: period = stride) evaluate one (bs, bs) bitmap per class of tiles
  that must share it (diagonal x phase), not per tile.
* Other predicates are evaluated on the (Lq, Lk) grid in chunks of query tiles (vectorised, one
  predicate call per chunk), only over the key tiles the window part of the mask leaves
  possible; partial tiles keep a (bs, bs) bitmap, the others keep nothing.

Built masks are cached (keyed on the mask object and the sizes), so a model calls the builder per
layer at no cost after the first.
"""
from __future__ import annotations

import collections
import math

import torch

from fastarch.attention.masks import MaskSpec
from fastarch.ops.block_sparse_attention import BlockMask

DEFAULT_BLOCK_SIZE = 64
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64
_CHUNK_ELEMENTS = 1 << 24  # predicate evaluations per chunk


def _compress(tiles: torch.Tensor):
    """(Bm, Hm, Qt, Kt) bool -> (num (Bm, Hm, Qt) int32, indices (Bm, Hm, Qt, Kt) int32), the
    listed tiles first in ascending order."""
    num = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num, order


def block_mask_from_bitmaps(full: torch.Tensor, partial: torch.Tensor,
                            bitmaps: torch.Tensor | None, bs: int, q_len: int, kv_len: int,
                            q_offset: int = 0) -> BlockMask:
    """The BlockMask of tiles classified as ``full`` / ``partial`` ((Bm, Hm, Qt, Kt) bool), with
    ``bitmaps`` (P, bs, bs) holding the partial tiles' element masks in row-major tile order."""
    num, idx = _compress(partial)
    fnum, fidx = _compress(full)
    # Bitmap of the j-th partial tile of a row: its rank among all partial tiles (bitmaps are in
    # row-major order, the same order as the ascending per-row lists).
    rank = (torch.cumsum(partial.flatten().to(torch.int64), 0) - 1).view(partial.shape)
    slot_used = torch.arange(idx.shape[-1], device=partial.device) < num.unsqueeze(-1).long()
    tmi = torch.where(slot_used, torch.gather(rank, -1, idx.long()), -1).to(torch.int32)
    if bitmaps is None or bitmaps.shape[0] == 0:
        bitmaps = torch.zeros(1, bs, bs, dtype=torch.bool, device=partial.device)
    return BlockMask(num, idx, fnum, fidx, bs, q_len, kv_len, q_offset=q_offset,
                     tile_masks=bitmaps.contiguous(), tile_mask_index=tmi)


def _tile_ranges(length: int, bs: int, ntiles: int, device):
    start = torch.arange(ntiles, device=device) * bs
    end = torch.clamp(start + bs, max=length) - 1
    return start, end


def _classify_descriptor(spec: MaskSpec, q_len, kv_len, bs, q_offset, q_doc, kv_doc, device):
    qt, kt = -(-q_len // bs), -(-kv_len // bs)
    q0, q1 = _tile_ranges(q_len, bs, qt, device)
    k0, k1 = _tile_ranges(kv_len, bs, kt, device)
    q0, q1 = (q0 + q_offset).view(-1, 1), (q1 + q_offset).view(-1, 1)
    k0, k1 = k0.view(1, -1), k1.view(1, -1)
    dmin, dmax = k0 - q1, k1 - q0  # kv - q over a tile covers every integer in [dmin, dmax]
    big = 1 << 40
    lo = -spec.window_left if spec.window_left >= 0 else -big
    hi = spec.window_right if spec.window_right >= 0 else big
    w_full = (dmin >= lo) & (dmax <= hi)
    w_empty = (dmax < lo) | (dmin > hi)
    p_full = k1 < spec.prefix_len
    p_empty = k0 >= spec.prefix_len
    full = (w_full | p_full)[None, None]
    empty = (w_empty & p_empty)[None, None]
    if q_doc is not None:
        def tile_minmax(ids, ntiles):  # (Bd, L) -> (Bd, ntiles) min and max
            pad = ntiles * bs - ids.shape[1]
            ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1) if pad else ids
            ids = ids.view(ids.shape[0], ntiles, bs)
            return ids.amin(-1), ids.amax(-1)

        qmin, qmax = tile_minmax(q_doc, qt)
        kmin, kmax = tile_minmax(kv_doc, kt)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        d_full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        d_empty = (qmax < kmin) | (kmax < qmin)
        full = full & d_full
        empty = empty | d_empty
    partial = ~full & ~empty
    return full, partial


def _key_tile_range(spec: MaskSpec, q_first, q_last, bs, kt):
    """The key tiles [lo, hi) that queries at positions q_first .. q_last may see at all, from the
    window and prefix parts of the mask (the predicate includes them)."""
    lo, hi = 0, kt
    if spec.window_right >= 0:
        hi = min(kt, (q_last + spec.window_right) // bs + 1)
    if spec.window_left >= 0:
        lo = max(0, (q_first - spec.window_left) // bs)
    if spec.prefix_len > 0:
        lo, hi = 0, max(hi, min(kt, -(-spec.prefix_len // bs)))
    return lo, max(lo, hi)


def _classify_predicate(spec: MaskSpec, bm, hm, q_len, kv_len, bs, q_offset, device):
    qt, kt = -(-q_len // bs), -(-kv_len // bs)
    full = torch.zeros(bm, hm, qt, kt, dtype=torch.bool, device=device)
    partial = torch.zeros_like(full)
    bitmaps, where = [], []
    b = torch.arange(bm, device=device).view(-1, 1, 1, 1)
    h = torch.arange(hm, device=device).view(1, -1, 1, 1)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, bm * hm * bs * kt * bs))
    for t0 in range(0, qt, per_chunk):
        t1 = min(qt, t0 + per_chunk)
        k0, k1 = _key_tile_range(spec, t0 * bs + q_offset, min(t1 * bs, q_len) - 1 + q_offset,
                                 bs, kt)
        if k1 <= k0:
            continue
        nk = k1 - k0
        kv = torch.arange(k0 * bs, k1 * bs, device=device).view(1, 1, 1, -1)
        kv_c = torch.clamp(kv, max=max(kv_len - 1, 0))
        q = torch.arange(t0 * bs, t1 * bs, device=device).view(1, 1, -1, 1)
        valid = (q < q_len) & (kv < kv_len)
        q_c = torch.clamp(q, max=max(q_len - 1, 0)) + q_offset
        ok = spec.predicate(b, h, q_c, kv_c).expand(bm, hm, -1, -1)
        tiles = ok.reshape(bm, hm, t1 - t0, bs, nk, bs).transpose(3, 4)
        vt = valid.expand(1, 1, -1, -1).reshape(1, 1, t1 - t0, bs, nk, bs).transpose(3, 4)
        f = (tiles | ~vt).all(-1).all(-1)
        a = (tiles & vt).any(-1).any(-1)
        full[:, :, t0:t1, k0:k1] = f
        p = a & ~f
        partial[:, :, t0:t1, k0:k1] = p
        nz = p.nonzero()  # row-major, the order of tiles[p]
        where.append(((nz[:, 0] * hm + nz[:, 1]) * qt + nz[:, 2] + t0) * kt + nz[:, 3] + k0)
        bitmaps.append(tiles[p])
    if not bitmaps:
        return full, partial, None
    # Row-major order over (b, h, qt, kt), the order of the per-row tile lists.
    order = torch.argsort(torch.cat(where))
    return full, partial, torch.cat(bitmaps)[order]


def _classify_periodic(spec: MaskSpec, q_len, kv_len, bs, q_offset, period, device):
    """Tiles of a predicate unchanged when q and kv both move by a multiple of ``period``
    (``period = 1``: it depends on q - kv only). Tiles (qt, kt) and (qt', kt') on one diagonal
    (qt - kt = qt' - kt') with (qt - qt') * bs a multiple of the period hold the same bitmap, so
    one (bs, bs) bitmap is evaluated per class present (at most (Qt + Kt - 1) * r of them with
    r = lcm(period, bs) / bs), at the positions of one tile of the class.

    Returns (full, partial) (1, 1, Qt, Kt), the class bitmaps (C, bs, bs) and the class of each
    tile (Qt, Kt)."""
    qt, kt = -(-q_len // bs), -(-kv_len // bs)
    r = math.lcm(period, bs) // bs
    tq = torch.arange(qt, device=device).view(-1, 1)
    tk = torch.arange(kt, device=device).view(1, -1)
    key = (tq - tk + (kt - 1)) * r + tq % r  # (Qt, Kt): diagonal and phase
    classes, cls_of = torch.unique(key, return_inverse=True)
    # One tile of each class: the first in row-major order (scatter_reduce amin of flat index).
    flat = torch.arange(qt * kt, device=device)
    rep = torch.full((classes.numel(),), qt * kt, dtype=torch.long, device=device)
    rep = rep.scatter_reduce(0, cls_of.flatten(), flat, reduce="amin")
    rq, rk = rep // kt, rep % kt
    i = torch.arange(bs, device=device)
    q = (rq * bs + q_offset).view(-1, 1, 1) + i.view(1, -1, 1)
    kv = (rk * bs).view(-1, 1, 1) + i.view(1, 1, -1)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    bitmaps = spec.predicate(zero, zero, q, kv).expand(classes.numel(), bs, bs)
    full = bitmaps.all(-1).all(-1)[cls_of]
    anyt = bitmaps.any(-1).any(-1)[cls_of]
    # Tiles cut by the ends of the sequences: classify over their valid part only.
    m_last, n_last = q_len - (qt - 1) * bs, kv_len - (kt - 1) * bs
    if m_last < bs or n_last < bs:
        edge_q = torch.stack([torch.full((kt,), qt - 1, device=device),
                              torch.arange(kt, device=device)], -1)  # the last query tile's row
        edge_k = torch.stack([torch.arange(qt, device=device),
                              torch.full((qt,), kt - 1, device=device)], -1)  # the last column
        edges = torch.cat([edge_q, edge_k])
        eq, ek = edges[:, 0], edges[:, 1]
        rows_ok = torch.where(eq == qt - 1, m_last, bs).view(-1, 1, 1) > i.view(1, -1, 1)
        cols_ok = torch.where(ek == kt - 1, n_last, bs).view(-1, 1, 1) > i.view(1, 1, -1)
        valid = rows_ok & cols_ok
        b_e = bitmaps[cls_of[eq, ek]]
        full[eq, ek] = (b_e | ~valid).all(-1).all(-1)
        anyt[eq, ek] = (b_e & valid).any(-1).any(-1)
    return full[None, None], (anyt & ~full)[None, None], bitmaps, cls_of


def create_block_mask(mask: MaskSpec, *, q_len: int, kv_len: int | None = None, batch: int = 1,
                      heads: int = 1, block_size: int = DEFAULT_BLOCK_SIZE, q_offset: int = 0,
                      device="cpu", cache: bool = True) -> BlockMask:
    """The :class:`BlockMask` of ``mask`` for ``q_len`` queries at positions
    ``q_offset .. q_offset + q_len - 1`` over ``kv_len`` keys (default ``q_len``).

    ``batch`` / ``heads`` matter only for masks that depend on them (document ids per batch row,
    ``per_batch`` / ``per_head`` predicates); otherwise the mask is built once and broadcast.
    For decode over a KV cache use ``q_offset = kv_len - q_len``.

    Example:
        >>> from fastarch.attention import causal, sliding_window, and_masks
        >>> bm = create_block_mask(and_masks(causal(), sliding_window(255)), q_len=4096)
        >>> bm.computed_fraction()
    """
    if not isinstance(mask, MaskSpec):
        raise TypeError(f"mask must be a fastarch.attention MaskSpec, got {type(mask).__name__}")
    kv_len = q_len if kv_len is None else kv_len
    for name, val in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch), ("heads", heads)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0, got {val!r}")
    if not isinstance(block_size, int) or not 1 <= block_size <= 256:
        raise ValueError(f"block_size must be an int in [1, 256], got {block_size!r}")
    device = torch.device(device)
    if torch.compiler.is_compiling():
        cache = False  # traced into the graph: a handful of tensor ops, no Python-side state
    # Descriptor masks are keyed by their fields (causal() twice is one entry), predicates by
    # identity; the anchor kept in the entry keeps the id from being reused.
    if mask.mask_mod is None:
        anchor = mask.doc_ids
        mkey = (mask.window_left, mask.window_right, mask.prefix_len, id(anchor))
    else:
        anchor = mask
        mkey = id(mask)
    key = (mkey, q_len, kv_len, batch, heads, block_size, q_offset, str(device))
    if cache and key in _CACHE and _CACHE[key][0] is anchor:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]

    bs = block_size
    q_doc = kv_doc = None
    if mask.doc_ids is not None:
        docs = mask.doc_ids if mask.doc_ids.dim() == 2 else mask.doc_ids.unsqueeze(0)
        need = max(kv_len, q_offset + q_len)
        if docs.shape[1] < need:
            raise ValueError(f"the document mask covers {docs.shape[1]} positions but "
                             f"{need} are needed (q_offset + q_len, kv_len)")
        if docs.shape[0] not in (1, batch):
            raise ValueError(f"the document ids have batch {docs.shape[0]}, expected 1 or {batch}")
        docs = docs.to(device)
        q_doc = docs[:, q_offset:q_offset + q_len].contiguous()
        kv_doc = docs[:, :kv_len].contiguous()

    block_level = (mask.mask_mod is not None and mask.mod_block > 0
                   and mask.mod_block % bs == 0 and q_offset % bs == 0)
    if block_level:
        # The predicate is constant on each tile: one evaluation per tile, at its corner; the
        # descriptor part (window, documents) keeps its analytic classification.
        full, partial = _classify_descriptor(mask, q_len, kv_len, bs, q_offset, q_doc, kv_doc,
                                             device)
        nb = batch if mask.per_batch else 1
        nh = heads if mask.per_head else 1
        qt_, kt_ = -(-q_len // bs), -(-kv_len // bs)
        bq = torch.arange(nb, device=device).view(-1, 1, 1, 1)
        hq_ = torch.arange(nh, device=device).view(1, -1, 1, 1)
        r0 = (torch.arange(qt_, device=device) * bs + q_offset).view(1, 1, -1, 1)
        c0 = (torch.arange(kt_, device=device) * bs).view(1, 1, 1, -1)
        # evaluate with the grid's true extent so that length-dependent rules see kv_len
        c_last = torch.full_like(c0[..., :1], max(kv_len - 1, 0))
        ok = mask.mask_mod(bq, hq_, r0, torch.cat([c0, c_last], dim=-1))[..., :kt_]
        ok = ok.expand(nb, nh, qt_, kt_)
        full, partial = full & ok, partial & ok
        num, idx = _compress(partial)
        fnum, fidx = _compress(full)
        bm = BlockMask(num, idx, fnum, fidx, bs, q_len, kv_len, q_offset=q_offset,
                       window_left=mask.window_left, window_right=mask.window_right,
                       prefix_len=mask.prefix_len, q_doc_ids=q_doc, kv_doc_ids=kv_doc)
    elif (mask.mask_mod is not None and mask.shift_period > 0 and not mask.per_batch
          and not mask.per_head and q_len > 0 and kv_len > 0):
        full, partial, bitmaps, cls_of = _classify_periodic(mask, q_len, kv_len, bs, q_offset,
                                                            mask.shift_period, device)
        num, idx = _compress(partial)
        fnum, fidx = _compress(full)
        slot_used = torch.arange(idx.shape[-1], device=device) < num.unsqueeze(-1).long()
        diag = torch.gather(cls_of[None, None].expand_as(idx), -1, idx.long())
        tmi = torch.where(slot_used, diag, -1).to(torch.int32)
        bm = BlockMask(num, idx, fnum, fidx, bs, q_len, kv_len, q_offset=q_offset,
                       tile_masks=bitmaps.contiguous(), tile_mask_index=tmi)
    elif mask.mask_mod is None:
        full, partial = _classify_descriptor(mask, q_len, kv_len, bs, q_offset, q_doc, kv_doc,
                                             device)
        num, idx = _compress(partial)
        fnum, fidx = _compress(full)
        bm = BlockMask(num, idx, fnum, fidx, bs, q_len, kv_len, q_offset=q_offset,
                       window_left=mask.window_left, window_right=mask.window_right,
                       prefix_len=mask.prefix_len, q_doc_ids=q_doc, kv_doc_ids=kv_doc)
    else:
        nb = batch if (mask.per_batch or (q_doc is not None and q_doc.shape[0] > 1)) else 1
        nh = heads if mask.per_head else 1
        full, partial, bitmaps = _classify_predicate(mask, nb, nh, q_len, kv_len, bs, q_offset,
                                                     device)
        bm = block_mask_from_bitmaps(full, partial, bitmaps, bs, q_len, kv_len, q_offset)
    if cache:
        _CACHE[key] = (anchor, bm)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bm
