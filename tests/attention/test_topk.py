"""Top-k block selection: the chosen blocks are the best-scoring visible ones, shared by a GQA
group, the diagonal is always kept, and attention over them matches the reference."""
import pytest
import torch

from fastarch.attention import (
    KeyBlockSummary,
    block_scores,
    causal,
    create_block_mask,
    topk_block_mask,
)
from fastarch.ops.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_mask,
)


def listed(bm, b, h, qt):
    n, f = int(bm.kv_num_blocks[b, h, qt]), int(bm.full_kv_num_blocks[b, h, qt])
    return (set(bm.kv_indices[b, h, qt, :n].tolist())
            | set(bm.full_kv_indices[b, h, qt, :f].tolist()))


def test_summary_incremental_equals_batch():
    k = torch.randn(2, 2, 150, 64)
    whole = KeyBlockSummary.of(k, 32)
    grown = KeyBlockSummary(32)
    for a, b in ((0, 7), (7, 40), (40, 41), (41, 45), (45, 64), (64, 65), (65, 150)):
        grown.update(k[:, :, a:b])
    assert grown.length == 150
    torch.testing.assert_close(grown.kmin, whole.kmin)
    torch.testing.assert_close(grown.kmax, whole.kmax)
    torch.testing.assert_close(whole.kmax[:, :, 1], k[:, :, 32:64].amax(2))


@pytest.mark.parametrize("lq,group", [(1, 1), (3, 4), (200, 2)])
def test_block_scores_are_the_quest_bound(lq, group):
    # sum over the group and the channels of max(q kmin, q kmax), the mean query of each tile
    torch.manual_seed(lq)
    q = torch.randn(2, 4, lq, 48)
    k = torch.randn(2, 4 // group, 150, 48)
    summ = KeyBlockSummary.of(k, 32)
    got = block_scores(q, summ)
    qt = -(-lq // 32)
    rows = torch.arange(lq) // 32
    qmean = torch.stack([q[:, :, rows == t].mean(2) for t in range(qt)], 2)  # (B, Hq, Qt, D)
    qmean = qmean.view(2, 4 // group, group, qt, 1, 48)
    kmin, kmax = summ.kmin[:, :, None, None], summ.kmax[:, :, None, None]
    want = torch.maximum(qmean * kmin, qmean * kmax).sum(-1).sum(2)
    assert got.shape == (2, 4 // group, qt, 5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_block_scores_edge_cases():
    k = torch.randn(1, 2, 100, 16)
    summ = KeyBlockSummary.of(k, 32)
    assert block_scores(torch.randn(1, 4, 0, 16), summ).shape == (1, 2, 0, 4)
    bm = topk_block_mask(torch.randn(1, 4, 0, 16), k, topk=2, block_size=32)
    assert bm.kv_num_blocks.shape == (1, 4, 0)
    # an infinite key channel: a group whose queries are all negative there takes kmin, and
    # the bound stays finite (max(q kmin, q kmax) kept the finite product)
    k[0, 0, 5, 3] = float("inf")
    q = torch.randn(1, 4, 1, 16)
    q[0, :2, :, 3] = -1.0
    got = block_scores(q, KeyBlockSummary.of(k, 32))
    qm = q.view(1, 2, 2, 1, 1, 16)
    ks = KeyBlockSummary.of(k, 32)
    want = torch.maximum(qm * ks.kmin[:, :, None, None], qm * ks.kmax[:, :, None, None])
    want = want.sum(-1).sum(2)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_selection(group):
    q = torch.randn(1, 4, 200, 64)
    k = torch.randn(1, 4 // group, 200, 64)
    v = torch.randn(1, 4 // group, 200, 64)
    bm = topk_block_mask(q, k, topk=3, block_size=32)
    scores = block_scores(q, KeyBlockSummary.of(k, 32))
    for h in range(4):
        for qt in range(bm.num_q_tiles):
            got = listed(bm, 0, h, qt)
            assert qt in got and 0 in got  # diagonal and sink
            assert len(got) == min(3, qt + 1)
            # the others are the best-scoring past blocks of the group
            others = got - {0, qt}
            cand = [j for j in range(1, qt)]
            best = sorted(cand, key=lambda j: -float(scores[0, h // group, qt, j]))
            assert others == set(best[:len(others)])
            assert got == listed(bm, 0, (h // group) * group, qt)  # shared in the group
    out = block_sparse_attention(q, k, v, bm)
    ref, _ = block_sparse_attention_reference(q, k, v, *bm.op_args(), None, None, 32, 0, -1, 0, 0,
                                              0.125, 0.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_topk_all_blocks_is_causal():
    q, k, v = (torch.randn(1, 2, 130, 64) for _ in range(3))
    bm = topk_block_mask(q, k, topk=100, block_size=32)
    dense = dense_mask(130, 130, *bm.op_args(), 32, 0, -1, 0, 0)
    assert torch.equal(dense[0, 0], torch.ones(130, 130, dtype=torch.bool).tril())
    want = block_sparse_attention(q, k, v, create_block_mask(causal(), q_len=130, block_size=32))
    torch.testing.assert_close(block_sparse_attention(q, k, v, bm), want)


def test_decode_over_growing_cache():
    torch.manual_seed(1)
    k = torch.randn(1, 2, 300, 64)
    v = torch.randn(1, 2, 300, 64)
    summary = KeyBlockSummary.of(k[:, :, :250], 32)
    for step in range(250, 300, 17):
        summary.update(k[:, :, summary.length:step + 1])
        q = torch.randn(1, 8, 1, 64)
        bm = topk_block_mask(q, summary=summary, topk=4, block_size=32)
        assert bm.kv_len == step + 1 and bm.q_offset == step
        got = listed(bm, 0, 0, 0)
        assert len(got) == 4 and step // 32 in got and 0 in got
        kk, vv = k[:, :, :step + 1], v[:, :, :step + 1]
        out = block_sparse_attention(q, kk, vv, bm)
        ref, _ = block_sparse_attention_reference(q, kk, vv, *bm.op_args(), None, None, 32,
                                                  step, -1, 0, 0, 0.125, 0.0)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_topk_bad_input():
    q, k = torch.randn(1, 3, 10, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match="multiple"):
        topk_block_mask(q, k, topk=2, block_size=16)
    with pytest.raises(ValueError, match="topk"):
        topk_block_mask(q[:, :2], k, topk=0, block_size=16)
    with pytest.raises(ValueError, match="give k or summary"):
        topk_block_mask(q, topk=2)


@pytest.mark.parametrize("lk,topk,sinks,is_causal,group,batch", [
    (1, 4, 1, True, 1, 1),      # one key, one block
    (200, 3, 1, True, 4, 2),    # 7 blocks, 3 kept
    (200, 7, 1, True, 2, 1),    # every block: no scores
    (257, 2, 0, True, 8, 1),    # no sinks: the last block and the best other
    (257, 2, 3, True, 1, 2),    # more forced blocks than kept ones
    (190, 3, 1, False, 4, 1),   # not causal: the last block is not forced
    (96, 5, 1, True, 4, 1),     # a last block of 32 keys
])
def test_decode_mask_equals_the_general_one(lk, topk, sinks, is_causal, group, batch):
    """One query at the last key takes _decode_topk_mask; its tiles and element mask are those
    of the general construction (_topk_mask), and attention over it matches the reference."""
    from fastarch.attention import topk as T

    torch.manual_seed(lk + topk)
    hkv, d = 2, 64
    q = torch.randn(batch, hkv * group, 1, d)
    k = torch.randn(batch, hkv, lk, d)
    v = torch.randn(batch, hkv, lk, d)
    summ = KeyBlockSummary.of(k, 32)
    fast = topk_block_mask(q, topk=topk, block_size=32, causal=is_causal, sink_blocks=sinks,
                           summary=summ)
    general = T._topk_mask(q, summ, topk, is_causal, sinks, lk - 1)
    args = (1, lk)
    dense_fast = dense_mask(*args, *fast.op_args(), 32, fast.q_offset, fast.window_left,
                            fast.window_right, fast.prefix_len)
    dense_general = dense_mask(*args, *general.op_args(), 32, general.q_offset,
                               general.window_left, general.window_right, general.prefix_len)
    assert torch.equal(dense_fast.expand_as(dense_general), dense_general)
    kept = min(topk, -(-lk // 32))
    assert int(fast.full_kv_num_blocks.min()) == kept == int(fast.full_kv_num_blocks.max())
    out = block_sparse_attention(q, k, v, fast)
    ref, _ = block_sparse_attention_reference(q, k, v, *general.op_args(), None, None, 32,
                                              lk - 1, general.window_left,
                                              general.window_right, general.prefix_len,
                                              d ** -0.5, 0.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal,lq", [(True, 1), (True, 40), (False, 1), (False, 40)])
def test_topk_attention_keeping_every_block_is_plain(is_causal, lq):
    """Where the cache has at most topk blocks, TopKAttention runs plain causal / full attention
    (no summary); past that it selects, building the summary once and extending it."""
    from fastarch.attention import TopKAttention

    torch.manual_seed(2)
    attn = TopKAttention(4, block_size=32, causal=is_causal, min_keys=0)
    k = torch.randn(1, 2, 200, 64)
    v = torch.randn(1, 2, 200, 64)

    class Layer:
        pass

    state = Layer()
    for lk in (128, 129, 130):  # 4 blocks, then 5 (a selection), then 5 again
        q = torch.randn(1, 4, min(lq, lk), 64)
        out = attn(q, k[:, :, :lk], v[:, :, :lk], state=state)
        bm = topk_block_mask(q, k[:, :, :lk], topk=4, block_size=32, causal=is_causal)
        want = block_sparse_attention(q, k[:, :, :lk], v[:, :, :lk], bm)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert attn.stats["all_blocks"] == 1
    # one query a step extends the summary; 40 new queries over a cache 1 longer do not match
    # a grown cache, so the summary is rebuilt
    assert attn.stats["summary_built"] == (1 if lq == 1 else 2)
    assert attn.stats["summary_extended"] == (1 if lq == 1 else 0)


def test_topk_attention_below_min_keys_attends_to_every_key():
    """Below min_keys (default TOPK_MIN_KEYS_CPU on CPU) a call is plain causal attention; at
    min_keys and above it selects."""
    from fastarch.attention import TopKAttention
    from fastarch.attention import topk as T

    torch.manual_seed(4)
    q = torch.randn(1, 4, 1, 64)
    k = torch.randn(1, 2, 300, 64)
    v = torch.randn(1, 2, 300, 64)
    dense = block_sparse_attention(q, k, v, create_block_mask(causal(), q_len=1, kv_len=300,
                                                              q_offset=299, block_size=32))
    picked = block_sparse_attention(q, k, v, topk_block_mask(q, k, topk=2, block_size=32))
    assert (dense - picked).abs().max() > 1e-3  # (the selection drops keys that matter here)
    for min_keys, want in ((301, dense), (300, picked), (0, picked)):
        attn = TopKAttention(2, block_size=32, min_keys=min_keys)
        torch.testing.assert_close(attn(q, k, v), want, atol=2e-5, rtol=2e-5)
        assert attn.stats["all_blocks"] == (1 if want is dense else 0)
    default = TopKAttention(2, block_size=32)
    assert default.min_keys is None and T.TOPK_MIN_KEYS_CPU > 300
    torch.testing.assert_close(default(q, k, v), dense, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="min_keys"):
        TopKAttention(2, min_keys=-1)


@pytest.mark.parametrize("lq,chunk", [(1, None), (5, None), (40, None), (100, None), (100, 1)])
def test_topk_attention_with_a_padding_mask(lq, chunk, monkeypatch):
    """The selection combined with a padding mask: attention over exactly the selected and
    unpadded keys (the reference with their dense mask); a row that sees nothing gives zeros.
    chunk=1: the block mask is built one query tile at a time."""
    from fastarch.attention import TopKAttention
    from fastarch.attention import topk as T

    if chunk is not None:
        monkeypatch.setattr(T, "_MASK_CHUNK_BYTES", chunk)
    torch.manual_seed(5)
    b, lk = 3, 150
    q = torch.randn(b, 4, lq, 64)
    k = torch.randn(b, 2, lk, 64)
    v = torch.randn(b, 2, lk, 64)
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[1, ..., :70] = False
    pad[2] = False  # a batch row that sees nothing
    attn = TopKAttention(2, block_size=32, min_keys=0)
    out = attn(q, k, v, attn_mask=pad)
    bm = topk_block_mask(q, k, topk=2, block_size=32)
    allowed = dense_mask(lq, lk, *bm.op_args(), 32, bm.q_offset, bm.window_left,
                         bm.window_right, bm.prefix_len) & pad
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed)
    ref = torch.where(allowed.any(-1, keepdim=True), ref, 0.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
