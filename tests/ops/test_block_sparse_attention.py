"""block_sparse_attention: C++ CPU kernel (and Triton, interpreted) against the fp32 reference,
the reference against SDPA, gradients, fake kernel / opcheck, bad input."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastarch
from fastarch.attention import (
    and_masks,
    causal,
    create_block_mask,
    document,
    fixed,
    from_function,
    full,
    global_local_random,
    prefix_lm,
    sliding_window,
    strided,
)
from fastarch.ops.block_sparse_attention import (
    BlockMask,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_mask,
)

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}
MASKS = {
    "causal": causal(),
    "full": full(),
    "window": sliding_window(37, 5),
    "prefix": prefix_lm(50),
    "doc-causal": and_masks(causal(), document(lengths=[30, 70, 29])),
    "strided": strided(16),
    "fixed": fixed(32, 4),
    "bigbird": global_local_random(block=16, random_blocks=2),
}


def qkv(b, hq, hkv, lq, lk, d, dtype):
    q = torch.randn(b, hq, lq, d, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, dtype=dtype)
    return q, k, v


def reference(q, k, v, bm, scale=None, softcap=0.0, alibi=None, rel_bias=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return block_sparse_attention_reference(
        q, k, v, *bm.op_args(), alibi, rel_bias, bm.block_size, bm.q_offset, bm.window_left,
        bm.window_right, bm.prefix_len, scale, softcap)


def check(q, k, v, bm, scale=None, softcap=0.0, alibi=None, rel_bias=None):
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True, scale=scale, softcap=softcap,
                                      alibi_slopes=alibi, rel_bias=rel_bias)
    ref_out, ref_lse = reference(q, k, v, bm, scale=scale, softcap=softcap, alibi=alibi,
                                 rel_bias=rel_bias)
    atol, rtol = TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    return out, lse


# ---- the reference is the spec: check it against SDPA with an explicit mask ----------------------
@pytest.mark.parametrize("mask", ["causal", "window", "doc-causal", "strided"])
def test_reference_matches_sdpa(mask):
    q, k, v = qkv(2, 4, 2, 70, 70, 64, torch.float32)
    bm = create_block_mask(MASKS[mask], q_len=70, batch=2, heads=4, block_size=16)
    allowed = dense_mask(70, 70, *bm.op_args()[:8], bm.block_size, bm.q_offset, bm.window_left,
                         bm.window_right, bm.prefix_len)
    pos = torch.arange(70)
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.arange(4).view(1, -1, 1, 1)
    want = MASKS[mask].predicate(b, h, pos.view(-1, 1), pos.view(1, -1))
    assert torch.equal(allowed.expand(2, 4, 70, 70), want.expand(2, 4, 70, 70))
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=allowed)
    out, _ = reference(q, k, v, bm)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


# ---- C++ kernel against the reference -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 80, 96, 128], ids=lambda d: f"D{d}")
def test_dtypes_head_dims(dtype, d):
    q, k, v = qkv(1, 4, 1, 63, 63, d, dtype)
    check(q, k, v, create_block_mask(causal(), q_len=63, block_size=32))


@pytest.mark.parametrize("length", [1, 63, 129], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks_lengths(mask, length):
    q, k, v = qkv(2, 4, 2, length, length, 64, torch.float32)
    bm = create_block_mask(MASKS[mask], q_len=length, batch=2, heads=4, block_size=32)
    check(q, k, v, bm)


@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"GQA{g}")
def test_gqa(group):
    q, k, v = qkv(2, 8, 8 // group, 100, 100, 64, torch.bfloat16)
    check(q, k, v, create_block_mask(sliding_window(20), q_len=100, block_size=16))


def test_long_odd_length():
    q, k, v = qkv(1, 2, 1, 1000, 1000, 64, torch.float32)
    check(q, k, v, create_block_mask(causal(), q_len=1000))


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_sizes(block_size):
    q, k, v = qkv(1, 2, 2, 200, 200, 64, torch.float32)
    check(q, k, v, create_block_mask(sliding_window(60, 3), q_len=200, block_size=block_size))


@pytest.mark.parametrize("lq", [1, 5, 16], ids=lambda n: f"Lq{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_over_kv_cache(lq, dtype):
    # Few (b, h) items and many key tiles: the kernel splits the keys over threads.
    lk = 700
    q, k, v = qkv(1, 2, 1, lq, lk, 64, dtype)
    bm = create_block_mask(causal(), q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=32)
    out, _ = check(q, k, v, bm)
    # Causal decode over the whole cache equals attention with no mask for the last query.
    dense = F.scaled_dot_product_attention(q[:, :, -1:].float(), k.float().repeat_interleave(2, 1),
                                           v.float().repeat_interleave(2, 1))
    torch.testing.assert_close(out[:, :, -1:].float(), dense, **dict(zip(("atol", "rtol"),
                                                                         TOL[dtype])))


# The grouped decode (one query tile, a mask shared by the heads: the query heads of a GQA group
# stacked as rows of one unit): (dtype, B, Hq, Hkv, Lq, Lk, D, block, mask, mods). D=80 takes
# the fp32 score kernel in bf16 too (the bf16 dot one needs D % 32 == 0); D=72, 9 x 8 = 72
# stacked rows and a 20-row query tile fall back to the per-head items; one unit (B = Hkv = 1) over 8 or more tiles splits
# its keys over the threads.
GROUPED_DECODE = {
    "bf16-gqa4-causal": (torch.bfloat16, 1, 8, 2, 1, 1000, 128, 64, "causal", ""),
    "fp16-gqa4-causal": (torch.float16, 1, 8, 2, 1, 1000, 128, 64, "causal", ""),
    "fp32-gqa4-causal": (torch.float32, 1, 8, 2, 1, 1000, 128, 64, "causal", ""),
    "bf16-mha-window-lq3": (torch.bfloat16, 2, 4, 4, 3, 517, 64, 32, "window", ""),
    "bf16-gqa3-D80-doc": (torch.bfloat16, 2, 6, 2, 4, 300, 80, 32, "doc", ""),
    "fp16-gqa3-D96-fixed": (torch.float16, 1, 6, 2, 5, 400, 96, 32, "fixed", ""),
    "fp32-gqa2-prefix-alibi": (torch.float32, 1, 4, 2, 2, 333, 64, 32, "prefix", "alibi"),
    "bf16-gqa4-strided-alibi-softcap": (torch.bfloat16, 1, 8, 2, 1, 700, 64, 64, "strided",
                                        "alibi-softcap"),
    "bf16-gqa2-rel": (torch.bfloat16, 1, 4, 2, 3, 150, 64, 32, "causal", "rel"),
    "fp32-gqa8-lq8-64rows": (torch.float32, 1, 8, 1, 8, 2000, 64, 64, "causal", "alibi"),
    "bf16-gqa4-lq8-split": (torch.bfloat16, 1, 4, 1, 8, 3000, 64, 32, "causal", "alibi"),
    "fp16-gqa4-window-split": (torch.float16, 1, 4, 1, 2, 4000, 128, 16, "window", ""),
    "bf16-gqa8-lq9-fallback": (torch.bfloat16, 1, 8, 1, 9, 500, 64, 64, "causal", "alibi"),
    "fp16-D72-fallback": (torch.float16, 1, 4, 2, 1, 300, 72, 32, "causal", ""),
    # the per-head decode's own key splits (one item over 63 tiles)
    "fp32-D72-split-fallback": (torch.float32, 1, 1, 1, 1, 2000, 72, 32, "causal", "alibi"),
    "bf16-mha-lq20-fallback": (torch.bfloat16, 1, 2, 2, 20, 300, 64, 32, "window", "alibi"),
    "bf16-lk-tail-1": (torch.bfloat16, 1, 4, 1, 1, 65, 64, 64, "causal", ""),
}


@pytest.mark.parametrize("case", list(GROUPED_DECODE))
def test_grouped_decode(case):
    dtype, b, hq, hkv, lq, lk, d, block, mask, mods = GROUPED_DECODE[case]
    torch.manual_seed(hash(case) % 1000)
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype)
    q = q * 2  # sharper rows, so that a row's keys are not all alike
    specs = {
        "causal": causal(),
        "window": sliding_window(100),
        "doc": and_masks(causal(), document(torch.stack([
            torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([90, 150, 60])),
            torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([250, 50]))]))),
        "fixed": fixed(32, 4),
        "prefix": prefix_lm(40),
        "strided": strided(16),
    }
    bm = create_block_mask(specs[mask], q_len=lq, kv_len=lk, batch=b if mask == "doc" else 1,
                           q_offset=lk - lq, block_size=block)
    alibi = torch.linspace(0.05, 0.4, hq) if "alibi" in mods else None
    rel = torch.randn(hq, 2 * 8 + 1) if "rel" in mods else None
    check(q, k, v, bm, softcap=5.0 if "softcap" in mods else 0.0, alibi=alibi, rel_bias=rel)


@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_decode_per_head_masks(lq, dtype):
    from fastarch.attention.topk import topk_block_mask

    # Top-k selection: per-head rows, alike within each GQA group (the grouped decode takes the
    # group's rows once). A per-head predicate: rows that differ within a group (per-head items).
    torch.manual_seed(1)
    lk = 900
    q, k, v = qkv(2, 8, 2, lq, lk, 64, dtype)
    bm = topk_block_mask(q, k, topk=4, block_size=32)
    assert bm.kv_num_blocks.shape[1] == 8
    check(q, k, v, bm)
    spec = from_function(lambda b, h, qi, ki: (ki % (h + 2) == 0) | (ki == qi), per_head=True)
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, heads=8, q_offset=lk - lq, block_size=32)
    check(q, k, v, bm)


def test_decode_sliding_window_and_document():
    lk, lq = 300, 3
    q, k, v = qkv(2, 4, 2, lq, lk, 64, torch.float32)
    docs = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([100, 150, 50]))
    spec = and_masks(sliding_window(80), document(docs.expand(2, -1)))
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, batch=2, q_offset=lk - lq, block_size=32)
    check(q, k, v, bm)


def test_softcap_alibi_scale():
    q, k, v = qkv(1, 4, 2, 90, 90, 64, torch.float32)
    q = q * 4  # make the softcap bite
    bm = create_block_mask(causal(), q_len=90, block_size=32)
    slopes = fastarch.attention.alibi_slopes(4)
    check(q, k, v, bm, softcap=5.0, alibi=slopes, scale=0.3)


@pytest.mark.parametrize("r", [0, 4, 200], ids=lambda r: f"R{r}")
def test_relative_bias(r):
    q, k, v = qkv(2, 4, 2, 77, 77, 64, torch.float32)
    bm = create_block_mask(sliding_window(40, 10), q_len=77, block_size=32)
    check(q, k, v, bm, rel_bias=torch.randn(4, 2 * r + 1))


def test_relative_bias_decode_and_bad():
    q, k, v = qkv(1, 4, 4, 3, 150, 64, torch.bfloat16)
    bm = create_block_mask(causal(), q_len=3, kv_len=150, q_offset=147, block_size=32)
    check(q, k, v, bm, rel_bias=torch.randn(4, 21))
    with pytest.raises(ValueError, match="rel_bias must be"):
        block_sparse_attention(q, k, v, bm, rel_bias=torch.randn(4, 20))
    with pytest.raises(TypeError, match="rel_bias must be float32"):
        block_sparse_attention(q, k, v, bm, rel_bias=torch.randint(0, 3, (4, 21)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(dtype):
    # (B, L, H, D) memory viewed as (B, H, L, D): the layout Hugging Face models hand over
    # (bf16: K's rows are H * D apart when it is regrouped into pairs, 16 keys at a time)
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 50, 50, 4, 4, 64, dtype))
    assert not q.is_contiguous()
    check(q, k, v, create_block_mask(causal(), q_len=50, block_size=16))


@pytest.mark.parametrize("d", [64, 80, 128], ids=lambda d: f"D{d}")
def test_bf16_many_tiles_odd_length(d):
    # several full 64-key tiles (K regrouped by 16 x 16 blocks; D=80 leaves 8 pairs per row to
    # the scalar loop) and a partial last tile of 1 key
    q, k, v = qkv(1, 4, 2, 257, 257, d, torch.bfloat16)
    check(q, k, v, create_block_mask(sliding_window(100), q_len=257, block_size=64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("mask", ["causal", "window"])
def test_lone_tile_joins_the_run_before_it(mask, d, dtype):
    # Runs of consecutive key tiles hold up to 16384 / D keys (4 tiles of 64 at D 64, 2 at D 128);
    # a lone tile right after a full run joins it. Causal at 300 keys: query tile 4 sees tiles
    # 0-4, the last one partial and 44 keys long; the 256-key window at 400: rows of 5 tiles with
    # partial tiles at both ends.
    n = 300 if mask == "causal" else 400
    fn = causal() if mask == "causal" else sliding_window(256)
    q, k, v = qkv(1, 2, 1, n, n, d, dtype)
    check(q, k, v, create_block_mask(fn, q_len=n, block_size=64))


def test_empty_rows_give_zeros():
    # Queries 0..9 may see nothing; the others see the first 20 keys.
    spec = from_function(lambda b, h, qi, ki: (qi >= 10) & (ki < 20))
    q, k, v = qkv(1, 2, 2, 40, 40, 64, torch.float32)
    bm = create_block_mask(spec, q_len=40, block_size=16)
    out, lse = check(q, k, v, bm)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    assert torch.isinf(lse[:, :, :10]).all() and torch.isfinite(lse[:, :, 10:]).all()


def test_empty_block_mask_all_zero():
    q, k, v = qkv(1, 2, 2, 33, 33, 64, torch.bfloat16)
    bm = create_block_mask(causal(), q_len=33, block_size=16)
    empty = BlockMask(torch.zeros_like(bm.kv_num_blocks), bm.kv_indices, None, None, 16, 33, 33)
    out = block_sparse_attention(q, k, v, empty)
    assert torch.equal(out, torch.zeros_like(out))


def test_per_head_user_mask():
    # Head h sees keys with kv % (h + 1) == 0 plus itself: a per-head predicate.
    spec = from_function(lambda b, h, qi, ki: (ki % (h + 1) == 0) | (ki == qi), per_head=True)
    q, k, v = qkv(1, 3, 3, 45, 45, 64, torch.float32)
    bm = create_block_mask(spec, q_len=45, heads=3, block_size=16)
    assert bm.kv_num_blocks.shape[1] == 3
    check(q, k, v, bm)


# ---- gradients: the op against autograd through SDPA with the dense mask ----------------------
@pytest.mark.parametrize("mask", ["causal", "window", "fixed"])
def test_gradients(mask):
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 4, 2, 40, 40, 64, torch.float32))
    bm = create_block_mask(MASKS[mask], q_len=40, block_size=16)
    out = block_sparse_attention(q, k, v, bm)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    allowed = dense_mask(40, 40, *bm.op_args()[:8], 16, 0, bm.window_left, bm.window_right,
                         bm.prefix_len)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=allowed)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradient_of_lse_and_empty_rows_is_finite():
    spec = from_function(lambda b, h, qi, ki: (qi >= 8) & (ki <= qi))
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 2, 2, 24, 24, 64, torch.float32))
    bm = create_block_mask(spec, q_len=24, block_size=16)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :8], torch.zeros_like(q.grad[:, :, :8]))


BACKWARD_CASES = {
    "causal-GQA2-L70": (causal(), torch.float32, 70, {}),
    "window-L129": (sliding_window(30, 4), torch.float32, 129, {}),
    "doc-causal-L129": (MASKS["doc-causal"], torch.float32, 129, {}),
    "fixed-bitmaps-L90": (fixed(32, 4), torch.float32, 90, {}),
    "softcap-alibi-L50": (causal(), torch.float32, 50, {"softcap": 2.0, "alibi": True}),
    "bf16-L63": (causal(), torch.bfloat16, 63, {}),
    "empty-rows-L40": (from_function(lambda b, h, qi, ki: (qi >= 10) & (ki <= qi)), torch.float32,
                       40, {}),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_backward_op_matches_reference_vjp(case):
    from fastarch.ops.block_sparse_attention import block_sparse_attention_backward_reference

    spec, dtype, length, extra = BACKWARD_CASES[case]
    q, k, v = qkv(2, 4, 2, length, length, 64, dtype)
    bm = create_block_mask(spec, q_len=length, batch=2, heads=4, block_size=32)
    slopes = fastarch.attention.alibi_slopes(4) if extra.get("alibi") else None
    rel = torch.randn(4, 9) if extra.get("alibi") else None
    rest = (*bm.op_args(), slopes, rel, bm.block_size, bm.q_offset, bm.window_left, bm.window_right,
            bm.prefix_len, 0.125, extra.get("softcap", 0.0))
    out, lse = torch.ops.fastarch.block_sparse_attention(q, k, v, *rest)
    g, glse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.ops.fastarch.block_sparse_attention_backward(g, glse, q, k, v, out, lse, *rest)
    want = block_sparse_attention_backward_reference(g, glse, q, k, v, out, lse, *rest)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)


# ---- fake kernel, opcheck, compile ---------------------------------------------------------------
def _op_args(q, k, v, bm):
    return (q, k, v, *bm.op_args(), None, None, bm.block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, 0.125, 0.0)


@pytest.mark.parametrize("mask", ["causal", "strided", "doc-causal"])
def test_opcheck(mask):
    q, k, v = qkv(1, 2, 1, 37, 37, 64, torch.float32)
    bm = create_block_mask(MASKS[mask], q_len=37, block_size=16, cache=False)
    if mask == "doc-causal":
        bm = create_block_mask(and_masks(causal(), document(lengths=[20, 17])), q_len=37,
                               block_size=16)
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention.default,
                          _op_args(q, k, v, bm))
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention.default,
                          _op_args(q, k, v, bm), test_utils=("test_autograd_registration",))
    q.requires_grad_(False)
    out, lse = torch.ops.fastarch.block_sparse_attention(*_op_args(q, k, v, bm))
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention_backward.default,
                          (torch.randn_like(out), None, q, k, v, out, lse,
                           *_op_args(q, k, v, bm)[3:]))


def test_compile_fullgraph_no_recompile_on_mask_contents():
    torch._dynamo.reset()
    calls = {"n": 0}

    def backend(gm, example_inputs):
        calls["n"] += 1
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def f(q, k, v, bm):
        return block_sparse_attention(q, k, v, bm)

    q, k, v = qkv(1, 2, 2, 64, 64, 64, torch.float32)
    bm1 = create_block_mask(and_masks(causal(), document(lengths=[20, 44])), q_len=64,
                            block_size=16)
    torch.testing.assert_close(f(q, k, v, bm1), block_sparse_attention(q, k, v, bm1))
    n = calls["n"]
    # Same variant, other contents (document boundaries, hence tile lists and ids): same graph.
    bm2 = create_block_mask(and_masks(causal(), document(lengths=[50, 3, 11])), q_len=64,
                            block_size=16)
    torch.testing.assert_close(f(q, k, v, bm2), block_sparse_attention(q, k, v, bm2))
    assert calls["n"] == n


# ---- bad input ------------------------------------------------------------------------------
def test_bad_input():
    q, k, v = qkv(1, 4, 2, 32, 32, 64, torch.float32)
    bm = create_block_mask(causal(), q_len=32, block_size=16)
    with pytest.raises(ValueError, match="multiple of the heads of k"):
        block_sparse_attention(q, k[:, :1].expand(1, 3, 32, 64), v[:, :1].expand(1, 3, 32, 64), bm)
    with pytest.raises(ValueError, match="head dim"):
        block_sparse_attention(q, k[..., :32], v[..., :32], bm)
    with pytest.raises(ValueError, match="v has"):
        block_sparse_attention(q, k, v[:, :, :16], bm)
    with pytest.raises(TypeError, match="k has dtype"):
        block_sparse_attention(q, k.half(), v.half(), bm)
    with pytest.raises(ValueError, match="k is on"):
        block_sparse_attention(q, k.to("meta"), v, bm)
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attention(q[0], k, v, bm)
    other = create_block_mask(causal(), q_len=48, block_size=16)
    with pytest.raises(ValueError, match="block_mask was built"):
        block_sparse_attention(q, k, v, other)
    wrong = BlockMask(bm.kv_num_blocks[:, :, :1], bm.kv_indices[:, :, :1], None, None, 16, 32, 32)
    with pytest.raises(ValueError, match="kv_num_blocks must have shape"):
        block_sparse_attention(q, k, v, wrong)
    with pytest.raises(ValueError, match="block_mask.kv_num_blocks is on"):
        block_sparse_attention(q, k, v, bm.to("meta"))
    with pytest.raises(TypeError, match="block_mask must be"):
        block_sparse_attention(q, k, v, "causal")
    with pytest.raises(ValueError, match="softcap"):
        block_sparse_attention(q, k, v, bm, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        block_sparse_attention(q, k, v, bm, softcap=float("inf"))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            block_sparse_attention(q, k, v, bm, scale=bad)
    with pytest.raises(ValueError, match="head dim >= 1"):
        block_sparse_attention(q[..., :0], k[..., :0], v[..., :0], bm)
    with pytest.raises(ValueError, match="alibi_slopes"):
        block_sparse_attention(q, k, v, bm, alibi_slopes=torch.ones(3))


def test_native_kernel_checks_scalars():
    # what the wrapper rejects, the raw op rejects too (it is callable on its own)
    q, k, v = qkv(1, 2, 2, 32, 32, 64, torch.float32)
    bm = create_block_mask(document(lengths=[10, 22]), q_len=32, block_size=16)
    base = list(_op_args(q, k, v, bm))
    n = len(base)
    cases = [({0: q[..., :0], 1: k[..., :0], 2: v[..., :0]}, "head dim"),
             ({n - 2: float("inf")}, "scale must be finite"),
             ({n - 1: float("nan")}, "softcap must be finite"),
             ({n - 6: 2 ** 62}, "q_offset"),
             ({n - 5: -(2 ** 50)}, "window_left"),
             ({9: bm.q_doc_ids.float() + 0.5, 10: bm.kv_doc_ids.float()}, "integer tensors")]
    for change, msg in cases:
        args = list(base)
        for i, val in change.items():
            args[i] = val
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.fastarch.block_sparse_attention(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("lk", [9, 200, 3000], ids=lambda n: f"Lk{n}")
def test_nan_reaches_the_rows_that_see_it(lk, dtype):
    # A NaN key gives NaN in every row that may attend to it (as SDPA and the reference do),
    # and leaves the rows that may not (masked before the softmax) as they were.
    lq = 1 if lk == 3000 else lk  # 3000 keys, one query: the decode path, split over the keys
    q, k, v = qkv(1, 2, 2, lq, lk, 64, dtype)
    k[0, 0, lk // 3] = float("nan")
    bm = create_block_mask(causal(), q_len=lq, kv_len=lk, q_offset=lk - lq)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, bm)
    assert ref_out[0, 0].isnan().any() and not ref_out[0, 1].isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("cap", [0.5, 50.0, 1e4, 1e6, 1e8])
def test_softcap_large_caps_stay_accurate(cap):
    # tanh(x) = 1 - 2 / (exp(2x) + 1) cancels when s / cap is small: at a cap of 1e6 the output
    # was off by 0.06, at 1e8 by 2.8; a huge cap must give plain attention's answer
    q, k, v = qkv(1, 1, 1, 33, 33, 16, torch.float32)
    check(q * 2, k * 2, v, create_block_mask(full(), q_len=33), softcap=cap)


def test_native_kernel_checks_indices():
    # The C++ kernel never reads out of bounds: an out-of-range tile index is an error.
    q, k, v = qkv(1, 2, 2, 32, 32, 64, torch.float32)
    bm = create_block_mask(causal(), q_len=32, block_size=16)
    bad = bm.kv_indices.clone()
    bad[..., 0] = 7
    args = list(_op_args(q, k, v, bm))
    args[4] = bad
    with pytest.raises(RuntimeError, match="kv_indices holds tile 7"):
        torch.ops.fastarch.block_sparse_attention(*args)


# ---- Triton kernel (interpreted on CPU when there is no GPU) -----------------------------------
TRITON_CASES = {
    "causal-fp32-D64-GQA2": (causal(), torch.float32, 64, 50, 50, {}),
    "window-fp16-D80": (sliding_window(10, 3), torch.float16, 80, 50, 50, {}),
    "doc-causal-bf16-D64": (and_masks(causal(), document(lengths=[20, 30])), torch.bfloat16, 64,
                            50, 50, {}),
    "strided-fp32-D96-alibi-softcap": (strided(8), torch.float32, 96, 40, 40,
                                       {"alibi": True, "softcap": 3.0}),
    "full-fp32-D64-softcap1e6": (full(), torch.float32, 64, 20, 20, {"softcap": 1e6}),
    "decode-Lq3-Lk100-D128": (causal(), torch.float32, 128, 3, 100, {}),
    "empty-rows": (from_function(lambda b, h, qi, ki: (qi >= 10) & (ki < qi)), torch.float32, 64,
                   33, 33, {}),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernel_interpreted(case):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from fastarch.kernels import block_sparse_attention as kern

    spec, dtype, d, lq, lk, extra = TRITON_CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in qkv(1, 4, 2, lq, lk, d, dtype))
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=16,
                           device=device)
    slopes = fastarch.attention.alibi_slopes(4, device=device) if extra.get("alibi") else None
    rel = torch.randn(4, 9, device=device) if extra.get("alibi") else None
    args = (q, k, v, *bm.op_args(), slopes, rel, 16, bm.q_offset, bm.window_left, bm.window_right,
            bm.prefix_len, 0.11, extra.get("softcap", 0.0))
    out, lse = kern.block_sparse_attention(*args)
    # float64 reference (an fp32 one, through MKL's sgemm, varies between runs with alignment)
    ref_out, ref_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(),
                                                        *args[3:])
    atol, rtol = TOL[dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [None, 2, 5, 40], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("mask", ["causal", "window-doc"])
def test_triton_decode_key_splits(split, mask, monkeypatch):
    # decode (Lq <= 16) over a cache: the key tiles of a row shared among programs, merged after;
    # any split count (more splits than tiles: some empty) gives the unsplit answer
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from fastarch.kernels import block_sparse_attention as kern

    monkeypatch.setitem(kern.FWD_TUNE, "split", split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lq, lk = 5, 150
    spec = causal() if mask == "causal" else and_masks(
        sliding_window(60), document(lengths=[40, 100, 10]))
    q, k, v = (t.to(device) for t in qkv(2, 8, 2, lq, lk, 64, torch.float32))
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=16,
                           device=device)
    args = (q, k, v, *bm.op_args(), None, None, 16, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, 0.125, 0.0)
    out, lse = kern.block_sparse_attention(*args)
    ref_out, ref_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(),
                                                        *args[3:])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def test_native_kernel_rejects_a_tile_listed_twice():
    q, k, v = qkv(1, 2, 2, 40, 40, 64, torch.float32)
    bm = create_block_mask(causal(), q_len=40, block_size=16)
    args = list(_op_args(q, k, v, bm))
    # query tile 2 lists key tile 0 as full already; list it as partial too
    num, idx = bm.kv_num_blocks.clone(), bm.kv_indices.clone()
    idx[0, 0, 2, 1] = 0
    num[0, 0, 2] = 2
    args[3], args[4] = num, idx
    with pytest.raises(RuntimeError, match="listed twice"):
        torch.ops.fastarch.block_sparse_attention(*args)


# window-fp16-D80: the tensor-core (LOWP) dots, which the interpreter runs for fp16 (not bf16)
@pytest.mark.parametrize("case", ["causal-fp32-D64-GQA2", "strided-fp32-D96-alibi-softcap",
                                  "doc-causal-bf16-D64", "window-fp16-D80", "empty-rows"])
def test_triton_backward_interpreted(case):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from fastarch.kernels import block_sparse_attention as kern

    from fastarch.ops.block_sparse_attention import block_sparse_attention_backward_reference

    spec, dtype, d, lq, lk, extra = TRITON_CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in qkv(1, 4, 2, lq, lk, d, dtype))
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=16,
                           device=device)
    slopes = fastarch.attention.alibi_slopes(4, device=device) if extra.get("alibi") else None
    rel = torch.randn(4, 9, device=device) if extra.get("alibi") else None
    rest = (*bm.op_args(), slopes, rel, 16, bm.q_offset, bm.window_left, bm.window_right,
            bm.prefix_len, 0.11, extra.get("softcap", 0.0))
    out, lse = block_sparse_attention_reference(q, k, v, *rest)
    g, glse = torch.randn_like(out), torch.randn_like(lse)
    got = kern.block_sparse_attention_backward(g, glse, q, k, v, out, lse, *rest)
    want = block_sparse_attention_backward_reference(g, glse, q, k, v, out, lse, *rest)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("lq,lk", [(5, 0), (0, 7)], ids=["no-keys", "no-queries"])
def test_empty_dims(lq, lk):
    q, k, v = qkv(1, 2, 2, lq, lk, 64, torch.float32)
    bm = create_block_mask(full(), q_len=lq, kv_len=lk)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 2, lq)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
