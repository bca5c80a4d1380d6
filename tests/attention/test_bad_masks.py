"""Masks that are not what they should be give clear errors, never a wrong mask or a crash."""
import pytest
import torch

import fastarch
from fastarch.attention import (BlockSparseAttention, causal, create_block_mask, from_dense,
                                from_function, full)
from fastarch.attention.topk import KeyBlockSummary, topk_block_mask
from fastarch.ops.block_sparse_attention import BlockMask


def qkv(b=1, h=2, lq=20, lk=20, d=16):
    return torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)


def test_block_mask_fields_are_checked():
    bm = create_block_mask(causal(), q_len=32, block_size=16)
    for field, val in (("block_size", 0), ("block_size", 300), ("q_len", -1), ("kv_len", 2.5)):
        kw = {"block_size": 16, "q_len": 32, "kv_len": 32, field: val}
        with pytest.raises(ValueError, match=field):
            BlockMask(bm.kv_num_blocks, bm.kv_indices, None, None, **kw)


def test_topk_block_size_checked():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="block_size"):
        topk_block_mask(q, k, topk=2, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        KeyBlockSummary(0)


def test_mask_function_results():
    # a float result is an error; an integer one means non-zero = may attend
    with pytest.raises(TypeError, match="must return a bool tensor"):
        create_block_mask(from_function(lambda b, h, q, kv: (q - kv).float()), q_len=20,
                          cache=False)
    as_int = create_block_mask(from_function(lambda b, h, q, kv: (kv <= q).long() * 2),
                               q_len=40, block_size=16, cache=False)
    q, k, v = qkv(lq=40, lk=40)
    torch.testing.assert_close(
        fastarch.block_sparse_attention(q, k, v, as_int),
        fastarch.block_sparse_attention(q, k, v, create_block_mask(causal(), q_len=40,
                                                                   block_size=16)))


def test_from_dense_three_dims_is_per_batch():
    dense = torch.rand(2, 24, 24) > 0.5
    bm = create_block_mask(from_dense(dense), q_len=24, batch=2, block_size=8, cache=False)
    q, k, v = qkv(b=2, h=3, lq=24, lk=24)
    got = fastarch.block_sparse_attention(q, k, v, bm)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    rows = dense.any(-1)[:, None, :, None]  # rows that see nothing are zeros in fastarch
    torch.testing.assert_close(got, torch.where(rows, want, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["causal", "full"])
def test_module_attn_mask_checked(variant):
    attn = BlockSparseAttention(variant)
    q, k, v = qkv(b=1, lq=20, lk=20)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        attn(q, k, v, attn_mask=torch.ones(20, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(q, k, v, attn_mask=torch.ones(20, 10, dtype=torch.bool))  # too few keys
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(q, k, v, attn_mask=torch.ones(3, 1, 20, 20, dtype=torch.bool))  # batch 3 for 1
    # a padding mask over the keys, (B, 1, 1, Lk), broadcasts over heads and queries
    pad = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    pad[..., 15:] = False
    got = attn(q, k, v, attn_mask=pad)
    base = torch.ones(20, 20, dtype=torch.bool).tril() if variant == "causal" else torch.ones(
        20, 20, dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=base & pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
