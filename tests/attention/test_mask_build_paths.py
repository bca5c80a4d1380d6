"""The cheaper block-mask build paths stand for exactly the mask: periodic predicates (one bitmap
per class of tiles), the general predicate path restricted to the window's key tiles and split
in chunks (bitmaps in the order of the tile lists), and the period / relative hints that
and_masks / or_masks keep."""
import pytest
import torch

from fastarch.attention import (
    and_masks,
    causal,
    create_block_mask,
    fixed,
    from_function,
    or_masks,
    prefix_lm,
    sliding_window,
    strided,
)
from fastarch.attention import block_mask as block_mask_mod
from fastarch.ops.block_sparse_attention import block_sparse_attention


from test_block_mask import expected, represented  # noqa: E402  (the same checks)


def _periodic_user(p):
    return from_function(lambda b, h, q, kv: ((q // p) == (kv // p)) | (kv % p == p - 1),
                         period=p, name=f"user-period{p}")


PERIODIC = {
    "fixed(24,3)": fixed(24, 3),
    "fixed(128,8)": fixed(128, 8),
    "fixed(10,2)": fixed(10, 2),  # period not a multiple of the tile
    "user-period-7&causal": and_masks(causal(), _periodic_user(7)),
    "strided&window": and_masks(strided(12), sliding_window(90)),
    "fixed|window-right": or_masks(fixed(16, 2), sliding_window(0, 5)),
}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lengths", [(221, 221, 0), (63, 300, 237), (5, 129, 124), (1, 77, 76),
                                     (90, 90, 0)], ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("name", list(PERIODIC))
def test_periodic_path_is_exact(name, lengths, block_size):
    spec = PERIODIC[name]
    assert spec.shift_period > 0  # takes the periodic path
    lq, lk, off = lengths
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=off, block_size=block_size,
                           cache=False)
    assert torch.equal(represented(bm), expected(spec, lq, lk, off))


def test_periodic_path_shares_bitmaps():
    # fixed(128): period 2 tiles of 64, so at most 2 bitmaps per tile diagonal are evaluated.
    bm = create_block_mask(fixed(128, 8), q_len=4096, block_size=64, cache=False)
    assert bm.tile_masks.shape[0] <= 2 * (2 * 64 - 1)
    assert int(bm.kv_num_blocks.sum()) > 2 * bm.tile_masks.shape[0]


def test_hints_kept_by_combinations():
    assert fixed(16, 2).shift_period == 16
    assert and_masks(causal(), strided(8)).shift_period == 1
    assert and_masks(causal(), fixed(16, 2), _periodic_user(6)).shift_period == 48
    assert and_masks(causal(), from_function(lambda b, h, q, kv: q > 3)).shift_period == 0
    assert or_masks(fixed(16, 2), prefix_lm(4)).shift_period == 0  # a prefix is absolute
    assert and_masks(prefix_lm(4), fixed(16, 2)).shift_period == 0
    with pytest.raises(ValueError, match="period"):
        from_function(lambda b, h, q, kv: q > kv, period=-1)


@pytest.mark.parametrize("case", ["per-head-causal", "per-batch-window", "prefix-user"])
def test_general_path_chunks_and_window_range(case, monkeypatch):
    """Tiny chunks (several per call) and key ranges cut by the window; per-head / per-batch
    predicates put their bitmaps in the order of the tile lists."""
    monkeypatch.setattr(block_mask_mod, "_CHUNK_ELEMENTS", 1)
    if case == "per-head-causal":
        spec = and_masks(causal(), from_function(lambda b, h, q, kv: (q + kv * (h + 1)) % 3 != 0,
                                                 per_head=True))
        batch, heads = 1, 3
    elif case == "per-batch-window":
        spec = and_masks(sliding_window(20, 7),
                         from_function(lambda b, h, q, kv: (q * (b + 2) + kv) % 5 != 1,
                                       per_batch=True))
        batch, heads = 2, 1
    else:
        spec = and_masks(prefix_lm(19), from_function(lambda b, h, q, kv: (q ^ kv) % 4 != 0))
        batch, heads = 1, 1
    assert spec.shift_period == 0  # the general path
    for lq, lk, off in ((150, 150, 0), (40, 170, 130)):
        bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=off, batch=batch,
                               heads=heads, block_size=16, cache=False)
        assert torch.equal(represented(bm, batch, heads), expected(spec, lq, lk, off, batch,
                                                                    heads))
        q = torch.randn(batch, heads, lq, 64)
        k = torch.randn(batch, 1, lk, 64)
        v = torch.randn(batch, 1, lk, 64)
        out = block_sparse_attention(q, k, v, bm)
        allowed = expected(spec, lq, lk, off, batch, heads)
        s = (q @ k.transpose(-1, -2)) * 0.125
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        torch.testing.assert_close(out, p @ v, atol=2e-5, rtol=2e-5)
