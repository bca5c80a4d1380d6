"""Mask variants and the block-mask builder: the block mask stands for exactly the mask."""
import pytest
import torch

from fastarch.attention import (
    alibi_slopes,
    and_masks,
    causal,
    create_block_mask,
    document,
    fixed,
    from_dense,
    from_function,
    full,
    global_local_random,
    or_masks,
    prefix_lm,
    resolve_variant,
    sliding_window,
    strided,
)
from fastarch.ops.block_sparse_attention import dense_mask

SPECS = {
    "causal": causal(),
    "full": full(),
    "window-left": sliding_window(40),
    "window-both": sliding_window(9, 23),
    "prefix": prefix_lm(37),
    "document": document(lengths=[50, 1, 70, 100]),
    "doc-causal": and_masks(causal(), document(cu_seqlens=[0, 64, 65, 150, 221])),
    "window&doc": and_masks(sliding_window(30), document(lengths=[100, 121])),
    "strided": strided(12),
    "fixed": fixed(24, 3),
    "bigbird": global_local_random(block=16, global_blocks=1, window_blocks=1, random_blocks=2),
    "bigbird-causal": global_local_random(block=32, window_blocks=1, random_blocks=3,
                                          causal=True, seed=3),
    "causal|window-right": or_masks(causal(), sliding_window(0, 5)),
    "prefix&window": and_masks(prefix_lm(20), sliding_window(50)),
    "user": from_function(lambda b, h, q, kv: (q + kv) % 3 == 0),
}


def expected(spec, q_len, kv_len, q_offset, batch=1, heads=1):
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = torch.arange(q_len).view(-1, 1) + q_offset
    kv = torch.arange(kv_len).view(1, -1)
    return spec.predicate(b, h, q, kv).expand(batch, heads, q_len, kv_len)


def represented(bm, batch=1, heads=1):
    m = dense_mask(bm.q_len, bm.kv_len, *bm.op_args(), bm.block_size, bm.q_offset,
                   bm.window_left, bm.window_right, bm.prefix_len)
    return m.expand(batch, heads, bm.q_len, bm.kv_len)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("name", list(SPECS))
def test_block_mask_is_exact(name, block_size):
    spec = SPECS[name]
    bm = create_block_mask(spec, q_len=221, block_size=block_size)
    assert torch.equal(represented(bm), expected(spec, 221, 221, 0))
    # Every listed partial tile of a descriptor mask is really cut; full tiles are all allowed.
    allowed = expected(spec, 221, 221, 0)[0, 0]
    kt = bm.num_kv_tiles
    for qt in range(bm.num_q_tiles):
        rows = allowed[qt * block_size:(qt + 1) * block_size]
        for j in range(int(bm.full_kv_num_blocks[0, 0, qt])):
            t = int(bm.full_kv_indices[0, 0, qt, j])
            assert rows[:, t * block_size:(t + 1) * block_size].all()
        listed = set(bm.kv_indices[0, 0, qt, :int(bm.kv_num_blocks[0, 0, qt])].tolist())
        listed |= set(bm.full_kv_indices[0, 0, qt, :int(bm.full_kv_num_blocks[0, 0, qt])].tolist())
        for t in range(kt):
            if t not in listed:
                assert not rows[:, t * block_size:(t + 1) * block_size].any()


@pytest.mark.parametrize("name", ["causal", "window-left", "doc-causal", "strided", "prefix"])
@pytest.mark.parametrize("q_len", [1, 7, 16])
def test_decode_offsets(name, q_len):
    kv_len = 221
    spec = SPECS[name]
    bm = create_block_mask(spec, q_len=q_len, kv_len=kv_len, q_offset=kv_len - q_len,
                           block_size=32)
    assert torch.equal(represented(bm), expected(spec, q_len, kv_len, kv_len - q_len))


def test_window_computes_few_tiles():
    bm = create_block_mask(sliding_window(255), q_len=4096, block_size=64)
    # (256 + 64) / 64 tiles per row at most, of 64: ~8 %
    assert bm.computed_fraction() < 0.09
    assert create_block_mask(causal(), q_len=4096, block_size=64).computed_fraction() == (
        pytest.approx((64 + 1) / 2 / 64))


def test_per_batch_documents():
    docs = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([10, 30, 60])),
                        torch.repeat_interleave(torch.arange(2), torch.tensor([77, 23]))])
    spec = and_masks(causal(), document(docs))
    bm = create_block_mask(spec, q_len=100, batch=2, block_size=16)
    assert bm.kv_num_blocks.shape[0] == 2
    assert torch.equal(represented(bm, batch=2), expected(spec, 100, 100, 0, batch=2))


def test_dense_and_per_head_masks():
    dense = torch.rand(2, 3, 40, 50) > 0.7
    spec = from_dense(dense, q_offset=10)
    bm = create_block_mask(spec, q_len=40, kv_len=50, batch=2, heads=3, q_offset=10,
                           block_size=16)
    assert bm.kv_num_blocks.shape[:2] == (2, 3)
    assert torch.equal(represented(bm, 2, 3), dense)


@pytest.mark.parametrize("combine", ["alone", "and", "or"])
def test_dense_masks_skip_the_bounds_trace(combine, monkeypatch):
    """A lookup into a dense tensor cannot be followed by tile bounds: the builder goes straight
    to the element-wise path (and a combination with one keeps that), still exactly."""
    import fastarch.attention.block_mask as bmod

    def no_trace(*args, **kwargs):
        raise AssertionError("trace_tiles called for a dense mask")

    monkeypatch.setattr(bmod, "trace_tiles", no_trace)
    dense = torch.rand(37, 37) > 0.4
    spec = from_dense(dense)
    if combine == "and":
        spec = and_masks(causal(), from_function(lambda b, h, q, kv: kv != 5), spec)
    elif combine == "or":
        spec = or_masks(from_function(lambda b, h, q, kv: kv == q), spec)
    assert not spec.bounded
    bm = create_block_mask(spec, q_len=37, block_size=16, cache=False)
    assert torch.equal(represented(bm), expected(spec, 37, 37, 0))


def test_cache_and_cost():
    a = create_block_mask(causal(), q_len=300, block_size=32)
    assert create_block_mask(causal(), q_len=300, block_size=32) is a
    assert create_block_mask(causal(), q_len=300, block_size=32, cache=False) is not a
    assert create_block_mask(causal(), q_len=301, block_size=32) is not a


def test_variants_by_name():
    assert resolve_variant("causal") is resolve_variant("causal")
    assert resolve_variant("sliding_window:256").window_left == 255
    assert resolve_variant("local:8").window_right == 8
    with pytest.raises(ValueError, match="unknown attention variant"):
        resolve_variant("banana")


def test_alibi_slopes():
    s8 = alibi_slopes(8)
    torch.testing.assert_close(s8, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(12).shape == (12,) and (alibi_slopes(12) > 0).all()


def test_bad_masks():
    with pytest.raises(ValueError, match="left and right"):
        sliding_window(-1)
    with pytest.raises(ValueError, match="exactly one"):
        document()
    with pytest.raises(ValueError, match="cu_seqlens"):
        document(cu_seqlens=[1, 5])
    with pytest.raises(ValueError, match="stride"):
        strided(0)
    with pytest.raises(ValueError, match="document mask covers"):
        create_block_mask(document(lengths=[10, 10]), q_len=30)
    with pytest.raises(ValueError, match="block_size"):
        create_block_mask(causal(), q_len=30, block_size=0)
    with pytest.raises(ValueError, match="q_len"):
        create_block_mask(causal(), q_len=-1)
    with pytest.raises(TypeError, match="MaskSpec"):
        create_block_mask("causal", q_len=30)


@pytest.mark.parametrize("q_len,kv_len,q_offset", [(100, 229, 128), (37, 37, 0), (16, 300, 256)])
def test_cheap_paths_are_exact(q_len, kv_len, q_offset):
    # strided: one bitmap per tile diagonal; block-level BigBird: one evaluation per tile.
    for spec, bitmaps in ((strided(12, 5), True), (global_local_random(block=32, random_blocks=2,
                                                                        causal=True), False)):
        bm = create_block_mask(spec, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                               block_size=16, cache=False)
        if bitmaps:
            assert bm.tile_masks.shape[0] == bm.num_q_tiles + bm.num_kv_tiles - 1
        else:
            assert bm.tile_masks is None
        assert torch.equal(represented(bm), expected(spec, q_len, kv_len, q_offset))


def test_one_query_tile_lists_equal_the_general_classification():
    """A single query tile without documents takes _one_tile_lists (intervals on ints); its
    partial and full tiles are those of _classify_descriptor, over a grid of awkward cases."""
    import itertools

    from fastarch.attention import block_mask as BMod
    from fastarch.attention import masks as M

    specs = [M.causal(), M.full(), M.prefix_lm(5), M.prefix_lm(40)]
    specs += [M.MaskSpec("w", window_left=wl, window_right=wr, prefix_len=p)
              for wl, wr, p in itertools.product((-1, 0, 3, 16, 33), (-1, 0, 2, 20), (0, 7, 16))]
    checked = 0
    for spec, bs, lk in itertools.product(specs, (8, 16), (1, 7, 8, 9, 40, 57)):
        for lq in {1, 2, bs // 2, bs}:
            for q_offset in {lk - lq, 0, 3, lk + 2, -5}:
                full, partial = BMod._classify_descriptor(spec, lq, lk, bs, q_offset, None,
                                                          None, "cpu")
                want_p = set(partial[0, 0, 0].nonzero().flatten().tolist())
                want_f = set(full[0, 0, 0].nonzero().flatten().tolist())
                p_iv, f_iv = BMod._one_tile_lists(spec, lq, lk, bs, q_offset)
                got_p = [t for a, b in p_iv for t in range(a, b)]
                got_f = [t for a, b in f_iv for t in range(a, b)]
                assert got_p == sorted(want_p) and got_f == sorted(want_f), (
                    spec, bs, lk, lq, q_offset)
                checked += 1
    assert checked > 2000
    # and the block mask built from them means the same mask as the tensor path's
    for spec in specs[:8]:
        bm = create_block_mask(spec, q_len=1, kv_len=57, block_size=16, q_offset=56,
                               cache=False)
        assert bm.kv_indices.dtype == torch.int32 and bm.kv_indices.dim() == 4
        full, partial = BMod._classify_descriptor(spec, 1, 57, 16, 56, None, None, "cpu")
        n, f = int(bm.kv_num_blocks), int(bm.full_kv_num_blocks)
        want_p = partial[0, 0, 0].nonzero().flatten().tolist()
        want_f = full[0, 0, 0].nonzero().flatten().tolist()
        assert bm.kv_indices[0, 0, 0, :n].tolist() == want_p
        assert bm.full_kv_indices[0, 0, 0, :f].tolist() == want_f


def test_block_mask_from_dense_equals_the_predicate_path():
    """block_mask_from_dense (a dense padding mask over a decode step's query tile, or more
    tiles) means the same mask as the general path (the descriptor and from_dense as one
    predicate)."""
    import itertools

    from fastarch.attention import masks as M
    from fastarch.attention.block_mask import block_mask_from_dense
    from fastarch.ops.block_sparse_attention import dense_mask

    torch.manual_seed(0)
    specs = [M.causal(), M.full(), M.sliding_window(20), M.sliding_window(5, 5), M.prefix_lm(9),
             M.MaskSpec("w12p9", window_left=12, window_right=0, prefix_len=9)]
    for spec, (lq, lk), (bq, hq) in itertools.product(
            specs, [(1, 1), (1, 77), (3, 64), (16, 100), (16, 16), (17, 40), (50, 90)],
            [(1, 1), (3, 1), (2, 4)]):
        dense = torch.rand(bq, hq, lq, lk) > 0.3
        dense[0, 0, :, : lk // 2] = False  # padding, and whole tiles masked
        if bq > 1:
            dense[1] = True  # whole tiles kept
        off = lk - lq
        fast = block_mask_from_dense(spec, dense, 16, off)
        general = create_block_mask(M.and_masks(spec, M.from_dense(dense, q_offset=off)),
                                    q_len=lq, kv_len=lk, batch=bq, heads=hq, block_size=16,
                                    q_offset=off, cache=False)

        def mean(bm):
            return dense_mask(lq, lk, *bm.op_args(), 16, bm.q_offset, bm.window_left,
                              bm.window_right, bm.prefix_len).expand(bq, hq, lq, lk)

        assert torch.equal(mean(fast), mean(general)), (spec.name, lq, lk, bq, hq)
        # and no tile is listed that has nothing in it
        listed = int(fast.kv_num_blocks.sum()) + int(fast.full_kv_num_blocks.sum())
        assert listed <= int(general.kv_num_blocks.sum()) + int(general.full_kv_num_blocks.sum())
