"""Triton kernels of the block-sparse attention family, forward and backward (GPU; CI runs them
under TRITON_INTERPRET=1 on CPU tensors at small shapes).

One program per (query tile, batch * query head). It walks the full tiles of its row of the block
mask with no element mask, then the partial tiles with the element mask (window / prefix /
document descriptor and the optional per-tile bitmap), keeping the online-softmax state
(m, l, acc) in fp32 registers. The tile size is the block mask's block size (a power of two
>= 16 for tl.dot); head dims that are not a power of two (80, 96) are padded to BLOCK_D with
masked loads.

The backward program of a query tile recomputes P from the saved lse tile by tile, keeps dQ in
registers and adds its dK / dV contributions to fp32 buffers with atomics (the tiles of one key
block are visited by several query tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fastarch.kernels._runtime import interpreting, sm_count


@triton.jit
def _tile(acc, m_i, l_i, q, kt, rows, dcols, K, V, kbase, vbase, skl, svl, Lk, D, q_offset,
          wl, wr, prefix, scale, softcap, slope, qd, KDOC, kdoc_base, tmi, TM, REL, relbase,
          rel_r, PARTIAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_TM: tl.constexpr,
          HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_REL: tl.constexpr,
          IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    cols = kt * BLOCK + tl.arange(0, BLOCK)
    cvalid = cols < Lk
    dmask = dcols < D
    k = tl.load(K + kbase + cols[:, None] * skl + dcols[None, :],
                mask=cvalid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if HAS_SOFTCAP:
        # softcap * tanh(s / softcap), tanh(x) = 2 sigmoid(2x) - 1, which cancels for small |x|:
        # there the odd series to x^9 (as the CPU kernel)
        x = s / softcap
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315
                                                                    + x2 * (62.0 / 2835)))))
        s = softcap * tl.where(tl.abs(x) < 0.3, series, 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0)
    qpos = rows + q_offset
    if HAS_ALIBI:
        s = s + slope * (cols[None, :] - qpos[:, None]).to(tl.float32)
    if HAS_REL:
        dist = tl.minimum(tl.maximum(cols[None, :] - qpos[:, None], -rel_r), rel_r) + rel_r
        s = s + tl.load(REL + relbase + dist)
    ok = cvalid[None, :] & (rows[:, None] >= 0)
    if PARTIAL:
        delta = cols[None, :] - qpos[:, None]
        win = ((wl < 0) | (delta >= -wl)) & ((wr < 0) | (delta <= wr))
        win = win | (cols[None, :] < prefix)
        ok = ok & win
        if HAS_DOC:
            kd = tl.load(KDOC + kdoc_base + cols, mask=cvalid, other=-1)
            ok = ok & (qd[:, None] == kd[None, :])
        if HAS_TM:
            r = tl.arange(0, BLOCK)
            bits = tl.load(TM + tmi * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :],
                           mask=(tmi >= 0) & (r[:, None] >= 0), other=1)
            ok = ok & (bits != 0)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + vbase + cols[:, None] * svl + dcols[None, :],
                mask=cvalid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    elif IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _split_range(n, sp, n_split, SPLIT: tl.constexpr):
    """The share [lo, hi) of a list of n tiles that split sp of n_split walks (all of it when
    the row is not split)."""
    if SPLIT:
        return sp * n // n_split, (sp + 1) * n // n_split
    return n * 0, n


@triton.jit
def _bsa_fwd(Q, K, V, O, LSE, NUM, IDX, FNUM, FIDX, TM, TMI, QDOC, KDOC, ALIBI, REL, rel_r,
             PACC, PM, PL, n_split,
             sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
             Hq, GROUP, Lq, Lk, D, Bm, Hm, Qt, W, Wf, Bd,
             q_offset, wl, wr, prefix, scale, softcap,
             HAS_FULL: tl.constexpr, HAS_TM: tl.constexpr, HAS_DOC: tl.constexpr,
             HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_REL: tl.constexpr,
             IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
             BLOCK_D: tl.constexpr):
    # SPLIT (decode): program (query tile, b * h, split) walks split's share of each tile list
    # and leaves its unnormalised (acc, m, l) in PACC / PM / PL for _merge_splits
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    sp = tl.program_id(2)
    # int64: b * stride and h * stride pass 2^31 on large caches (e.g. 17 x 8 x 128k x 128)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    rows = qt * BLOCK + tl.arange(0, BLOCK)
    rvalid = rows < Lq
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + dcols[None, :],
                mask=rvalid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kbase = b * skb + hk * skh
    vbase = b * svb + hk * svh
    bm = tl.where(Bm == 1, 0, b)
    hm = tl.where(Hm == 1, 0, h)
    row = (bm * Hm + hm) * Qt + qt
    bd = tl.where(Bd == 1, 0, b)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + h).to(tl.float32)
    qd = rows
    if HAS_DOC:
        qd = tl.load(QDOC + bd * Lq + rows, mask=rvalid, other=-2)
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    if HAS_FULL:
        f_lo, f_hi = _split_range(tl.load(FNUM + row), sp, n_split, SPLIT)
        for j in range(f_lo, f_hi):
            kt = tl.load(FIDX + row * Wf + j)
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, kt, rows, dcols, K, V, kbase, vbase, skl,
                                  svl, Lk, D, q_offset, wl, wr, prefix, scale, softcap, slope,
                                  qd, KDOC, bd * Lk, -1, TM, REL, h * (2 * rel_r + 1), rel_r,
                                  False, HAS_DOC, HAS_TM, HAS_ALIBI, HAS_SOFTCAP, HAS_REL, IEEE,
                                  UPCAST, BLOCK)
    p_lo, p_hi = _split_range(tl.load(NUM + row), sp, n_split, SPLIT)
    for j in range(p_lo, p_hi):
        kt = tl.load(IDX + row * W + j)
        tmi = -1
        if HAS_TM:
            tmi = tl.load(TMI + row * W + j)
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, kt, rows, dcols, K, V, kbase, vbase, skl, svl,
                              Lk, D, q_offset, wl, wr, prefix, scale, softcap, slope, qd, KDOC,
                              bd * Lk, tmi, TM, REL, h * (2 * rel_r + 1), rel_r, True, HAS_DOC,
                              HAS_TM, HAS_ALIBI, HAS_SOFTCAP, HAS_REL, IEEE, UPCAST, BLOCK)
    if SPLIT:
        base = (bh * n_split + sp) * Lq
        tl.store(PACC + (base + rows[:, None]) * D + dcols[None, :], acc,
                 mask=rvalid[:, None] & dmask[None, :])
        tl.store(PM + base + rows, m_i, mask=rvalid)
        tl.store(PL + base + rows, l_i, mask=rvalid)
    else:
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sol + dcols[None, :],
                 out.to(O.dtype.element_ty), mask=rvalid[:, None] & dmask[None, :])
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LSE + bh * Lq + rows, lse, mask=rvalid)


# Launch options of the two kernels. An entry set here replaces the rule in _launch_opts
# (bench/bench_gpu.py sweeps them on a GPU); None leaves it to the rule.
FWD_TUNE: dict = {"num_warps": None, "num_stages": None, "split": None}
BWD_TUNE: dict = {"num_warps": None, "num_stages": None}


def _launch_opts(tune, block, block_d):
    """num_warps / num_stages: 8 warps once a tile's fp32 scores and accumulator would not fit
    4 warps' registers (128 x 128 tiles at D = 128), else 4; three K/V stages, fewer where they
    do not fit in shared memory (see _launch)."""
    return {"num_warps": tune["num_warps"] or (8 if block * block_d >= 128 * 128 else 4),
            "num_stages": tune["num_stages"] or 3}


_STAGES_THAT_FIT: dict = {}  # (kernel, its specialisation) -> the num_stages that compiled


def _launch(kernel, grid, args, consts, opts):
    """Launch, retrying with fewer pipeline stages when a configuration needs more shared
    memory than the GPU has (128 x 128 tiles of the backward, say); the stages that fit are
    remembered per specialisation, so the retry happens once."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), opts["num_warps"],
           opts["num_stages"], tuple(sorted(consts.items())),
           tuple(str(a.dtype) for a in args[:3]))
    stages = _STAGES_THAT_FIT.get(key, opts["num_stages"])
    while True:
        try:
            kernel[grid](*args, **consts, num_warps=opts["num_warps"], num_stages=stages)
            _STAGES_THAT_FIT[key] = stages
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                           full_kv_indices, tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids,
                           alibi_slopes, rel_bias, block_size, q_offset, window_left,
                           window_right, prefix_len, scale, softcap):
    """Launch the forward kernel; same arguments and results as the op."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("the Triton kernel needs a power-of-two block_size >= 16, got "
                         f"{block_size}")

    def last_contig(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = last_contig(q), last_contig(k), last_contig(v)
    out = torch.empty((bsz, hq, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, hq, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    num, idx = kv_num_blocks.contiguous(), kv_indices.contiguous()
    has_full = full_kv_num_blocks is not None
    fnum = full_kv_num_blocks.contiguous() if has_full else num
    fidx = full_kv_indices.contiguous() if has_full else idx
    has_tm = tile_masks is not None
    tm = tile_masks.contiguous().view(torch.uint8) if has_tm else num
    tmi = tile_mask_index.contiguous() if has_tm else idx
    has_doc = q_doc_ids is not None
    qd = q_doc_ids.to(torch.int64).contiguous() if has_doc else num
    kd = kv_doc_ids.to(torch.int64).contiguous() if has_doc else num
    bd = qd.shape[0] if has_doc else 1
    has_alibi = alibi_slopes is not None
    al = alibi_slopes.float().contiguous() if has_alibi else q
    qt = -(-lq // block_size)
    # Triton's interpreter computes bf16 dots wrongly (numpy has no bf16): upcast there only.
    upcast = q.dtype == torch.bfloat16 and interpreting()
    grid = (qt, bsz * hq)
    has_rel = rel_bias is not None
    rel = rel_bias.float().contiguous() if has_rel else lse
    rel_r = rel_bias.shape[1] // 2 if has_rel else 0
    block_d = max(16, triton.next_power_of_2(d))
    n_split = _decode_splits(lq, qt * bsz * hq, -(-lk // block_size), q.device)
    if n_split > 1:
        pacc = torch.empty((bsz * hq, n_split, lq, d), dtype=torch.float32, device=q.device)
        pm = torch.empty((bsz * hq, n_split, lq), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        grid = (qt, bsz * hq, n_split)
    else:
        pacc = pm = pl = lse
    args = (
        q, k, v, out, lse, num, idx, fnum, fidx, tm, tmi, qd, kd, al, rel, rel_r,
        pacc, pm, pl, n_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, lq, lk, d, num.shape[0], num.shape[1], qt, idx.shape[-1],
        fidx.shape[-1], bd, q_offset, window_left, window_right, prefix_len, float(scale),
        float(softcap),
    )
    consts = dict(
        HAS_FULL=has_full, HAS_TM=has_tm, HAS_DOC=has_doc, HAS_ALIBI=has_alibi,
        HAS_SOFTCAP=softcap > 0, HAS_REL=has_rel, IEEE=q.dtype == torch.float32, UPCAST=upcast,
        SPLIT=n_split > 1, BLOCK=block_size, BLOCK_D=block_d,
    )
    _launch(_bsa_fwd, grid, args, consts, _launch_opts(FWD_TUNE, block_size, block_d))
    if n_split > 1:
        return _merge_splits(pacc, pm, pl, out, lse)
    return out, lse


def _decode_splits(lq, programs, key_tiles, device) -> int:
    """Key splits per (query tile, b, h) for decode (flash-decoding): up to 16 queries over a
    cache, with fewer programs than would fill the GPU (B * H = 32 against 132 SMs), get the
    listed key tiles of each row shared among that many programs."""
    if lq > 16:
        return 1
    if FWD_TUNE["split"]:
        return max(1, min(FWD_TUNE["split"], key_tiles))
    if key_tiles < 4:
        return 1
    target = 2 * sm_count(device, interpreted=4)
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), key_tiles // 2, 64))


def _merge_splits(pacc, pm, pl, out, lse):
    """Combine the splits' partial softmax states: with M the largest split max, out =
    sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s and lse = M + log(that sum); rows no split
    saw stay zeros with lse -inf."""
    big = pm.amax(1)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    w = torch.exp(pm - big.unsqueeze(1))  # empty splits: m = -inf, weight 0
    total = (w * pl).sum(1)
    seen = total > 0
    o = (w.unsqueeze(-1) * pacc).sum(1) / torch.where(seen, total, 1.0).unsqueeze(-1)
    out.copy_(o.view(out.shape))
    lse.copy_(torch.where(seen, big + torch.log(torch.where(seen, total, 1.0)),
                          float("-inf")).view(lse.shape))
    return out, lse


# ---- backward ----------------------------------------------------------------------------------
@triton.jit
def _bwd_tile(dq, q, do, lse, di, kt, rows, dcols, K, V, DK, DV, kbase, vbase, dkvbase, skl,
              svl, Lk, D, q_offset, wl, wr, prefix, scale, softcap, slope, qd, KDOC, kdoc_base,
              tmi, TM, REL, relbase, rel_r, PARTIAL: tl.constexpr, HAS_DOC: tl.constexpr,
              HAS_TM: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_REL: tl.constexpr, LOWP: tl.constexpr, BLOCK: tl.constexpr):
    # LOWP: q, k, v, do stay bf16 / fp16 and P, dS are rounded to it for the tensor-core dots
    # (fp32 accumulation), as flash-attention does; otherwise every dot in fp32
    cols = kt * BLOCK + tl.arange(0, BLOCK)
    cvalid = cols < Lk
    dmask = dcols < D
    kv_mask = cvalid[:, None] & dmask[None, :]
    k = tl.load(K + kbase + cols[:, None] * skl + dcols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + vbase + cols[:, None] * svl + dcols[None, :], mask=kv_mask, other=0.0)
    if LOWP:
        s = tl.dot(q, tl.trans(k)) * scale
    else:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    th = s
    if HAS_SOFTCAP:
        th = 2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0
        s = softcap * th
    qpos = rows + q_offset
    if HAS_ALIBI:
        s = s + slope * (cols[None, :] - qpos[:, None]).to(tl.float32)
    if HAS_REL:
        dist = tl.minimum(tl.maximum(cols[None, :] - qpos[:, None], -rel_r), rel_r) + rel_r
        s = s + tl.load(REL + relbase + dist)
    ok = cvalid[None, :] & (rows[:, None] >= 0)
    if PARTIAL:
        delta = cols[None, :] - qpos[:, None]
        win = ((wl < 0) | (delta >= -wl)) & ((wr < 0) | (delta <= wr))
        ok = ok & (win | (cols[None, :] < prefix))
        if HAS_DOC:
            kd = tl.load(KDOC + kdoc_base + cols, mask=cvalid, other=-1)
            ok = ok & (qd[:, None] == kd[None, :])
        if HAS_TM:
            r = tl.arange(0, BLOCK)
            bits = tl.load(TM + tmi * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :],
                           mask=(tmi >= 0) & (r[:, None] >= 0), other=1)
            ok = ok & (bits != 0)
    seen = lse > float("-inf")
    p = tl.where(ok & seen[:, None], tl.exp(s - tl.where(seen, lse, 0.0)[:, None]), 0.0)
    if LOWP:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
    else:
        dv = tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - di[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - th * th)
    if LOWP:
        dq += tl.dot(ds.to(k.dtype), k) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
    else:
        dq += tl.dot(ds, k, input_precision="ieee") * scale
        dk = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale
    off = dkvbase + cols[:, None] * D + dcols[None, :]
    tl.atomic_add(DV + off, dv, mask=kv_mask, sem="relaxed")
    tl.atomic_add(DK + off, dk, mask=kv_mask, sem="relaxed")
    return dq


@triton.jit
def _bsa_bwd(Q, K, V, DO, LSE, DI, DQ, DK, DV, NUM, IDX, FNUM, FIDX, TM, TMI, QDOC, KDOC, ALIBI,
             REL, rel_r,
             sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
             Hq, Hkv, GROUP, Lq, Lk, D, Bm, Hm, Qt, W, Wf, Bd,
             q_offset, wl, wr, prefix, scale, softcap,
             HAS_FULL: tl.constexpr, HAS_TM: tl.constexpr, HAS_DOC: tl.constexpr,
             HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_REL: tl.constexpr,
             LOWP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride and h * stride pass 2^31 on large caches (e.g. 17 x 8 x 128k x 128)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    rows = qt * BLOCK + tl.arange(0, BLOCK)
    rvalid = rows < Lq
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    qmask = rvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + dcols[None, :], mask=qmask,
                other=0.0)
    # grad_out, lse and Di are contiguous (B, Hq, Lq[, D])
    do = tl.load(DO + (bh * Lq + rows[:, None]) * D + dcols[None, :], mask=qmask, other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * Lq + rows, mask=rvalid, other=float("-inf"))
    di = tl.load(DI + bh * Lq + rows, mask=rvalid, other=0.0)
    kbase = b * skb + hk * skh
    vbase = b * svb + hk * svh
    dkvbase = (b * Hkv + hk) * Lk * D
    bm = tl.where(Bm == 1, 0, b)
    hm = tl.where(Hm == 1, 0, h)
    row = (bm * Hm + hm) * Qt + qt
    bd = tl.where(Bd == 1, 0, b)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + h).to(tl.float32)
    qd = rows
    if HAS_DOC:
        qd = tl.load(QDOC + bd * Lq + rows, mask=rvalid, other=-2)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    if HAS_FULL:
        nf = tl.load(FNUM + row)
        for j in range(nf):
            kt = tl.load(FIDX + row * Wf + j)
            dq = _bwd_tile(dq, q, do, lse, di, kt, rows, dcols, K, V, DK, DV, kbase, vbase,
                           dkvbase, skl, svl, Lk, D, q_offset, wl, wr, prefix, scale, softcap,
                           slope, qd, KDOC, bd * Lk, -1, TM, REL, h * (2 * rel_r + 1), rel_r,
                           False, HAS_DOC, HAS_TM, HAS_ALIBI, HAS_SOFTCAP, HAS_REL, LOWP,
                           BLOCK)
    npart = tl.load(NUM + row)
    for j in range(npart):
        kt = tl.load(IDX + row * W + j)
        tmi = -1
        if HAS_TM:
            tmi = tl.load(TMI + row * W + j)
        dq = _bwd_tile(dq, q, do, lse, di, kt, rows, dcols, K, V, DK, DV, kbase, vbase, dkvbase,
                       skl, svl, Lk, D, q_offset, wl, wr, prefix, scale, softcap, slope, qd,
                       KDOC, bd * Lk, tmi, TM, REL, h * (2 * rel_r + 1), rel_r, True, HAS_DOC,
                       HAS_TM, HAS_ALIBI, HAS_SOFTCAP, HAS_REL, LOWP, BLOCK)
    tl.store(DQ + (bh * Lq + rows[:, None]) * D + dcols[None, :], dq, mask=qmask)


def block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks,
                                    kv_indices, full_kv_num_blocks, full_kv_indices, tile_masks,
                                    tile_mask_index, q_doc_ids, kv_doc_ids, alibi_slopes,
                                    rel_bias, block_size, q_offset, window_left, window_right,
                                    prefix_len, scale, softcap):
    """(dq, dk, dv): one program per (query tile, b * h); dK / dV by fp32 atomic adds."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("the Triton kernel needs a power-of-two block_size >= 16, got "
                         f"{block_size}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    # (the LOWP dots need do in q's dtype; autograd passes it so, a direct call may not)
    go = grad_out.to(q.dtype).contiguous()
    di = (go.float() * out.float()).sum(-1)
    if grad_lse is not None:
        di = di - grad_lse.float()
    di = di.contiguous()
    lse = lse.contiguous()
    dq = torch.zeros((bsz, hq, lq, d), dtype=torch.float32, device=q.device)
    dk = torch.zeros((bsz, hkv, lk, d), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if dq.numel() and dk.numel():
        num, idx = kv_num_blocks.contiguous(), kv_indices.contiguous()
        has_full = full_kv_num_blocks is not None
        fnum = full_kv_num_blocks.contiguous() if has_full else num
        fidx = full_kv_indices.contiguous() if has_full else idx
        has_tm = tile_masks is not None
        tm = tile_masks.contiguous().view(torch.uint8) if has_tm else num
        tmi = tile_mask_index.contiguous() if has_tm else idx
        has_doc = q_doc_ids is not None
        qd = q_doc_ids.to(torch.int64).contiguous() if has_doc else num
        kd = kv_doc_ids.to(torch.int64).contiguous() if has_doc else num
        has_alibi = alibi_slopes is not None
        al = alibi_slopes.float().contiguous() if has_alibi else dq
        qt = -(-lq // block_size)
        has_rel = rel_bias is not None
        rel = rel_bias.float().contiguous() if has_rel else dq
        rel_r = rel_bias.shape[1] // 2 if has_rel else 0
        block_d = max(16, triton.next_power_of_2(d))
        # tensor-core dots for bf16 / fp16 (the interpreter's bf16 dots are wrong: fp32 there)
        lowp = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not interpreting())
        args = (
            q, k, v, go, lse, di, dq, dk, dv, num, idx, fnum, fidx, tm, tmi, qd, kd, al, rel, rel_r,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            hq, hkv, hq // hkv, lq, lk, d, num.shape[0], num.shape[1], qt, idx.shape[-1],
            fidx.shape[-1], qd.shape[0] if has_doc else 1, q_offset, window_left, window_right,
            prefix_len, float(scale), float(softcap),
        )
        consts = dict(
            HAS_FULL=has_full, HAS_TM=has_tm, HAS_DOC=has_doc, HAS_ALIBI=has_alibi,
            HAS_SOFTCAP=softcap > 0, HAS_REL=has_rel, LOWP=lowp, BLOCK=block_size,
            BLOCK_D=block_d,
        )
        _launch(_bsa_bwd, (qt, bsz * hq), args, consts,
                _launch_opts(BWD_TUNE, block_size, block_d))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
