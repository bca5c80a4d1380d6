"""torch.ops.fastarch.sdpa (SDPA that picks its kernel from the mask) and teal_linear, against
their references: F.scaled_dot_product_attention and F.linear on the thresholded input."""
import pytest
import torch
import torch.nn.functional as F

import fastarch.compile.attention as A
from fastarch.compile import plan_attention, sdpa, teal_linear
from fastarch.compile import linear as L

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture
def force_block_sparse(monkeypatch):
    """Take the block-sparse path whenever the mask allows it (no size / fraction limits)."""
    monkeypatch.setattr(A, "MIN_PAIRS", 0)
    monkeypatch.setattr(A, "MAX_FRACTION", 1.0)
    A._PLANS.clear()
    A._graph_plans().clear()
    yield
    A._PLANS.clear()
    A._graph_plans().clear()


def _qkv(b, hq, hk, lq, lk, d, dtype):
    q = torch.randn(b, hq, lq, d, dtype=dtype)
    k = torch.randn(b, hk, lk, d, dtype=dtype)
    v = torch.randn(b, hk, lk, d, dtype=dtype)
    return q, k, v


def _causal(lq, lk):  # bottom-right aligned, as Hugging Face builds it with a cache
    return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)


def _masks(b, lq, lk):
    causal = _causal(lq, lk)
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[-1, ..., : lk // 3] = False  # left padding of the last row
    band = causal & ~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq - 40)
    docs = torch.arange(lk) // 50
    doc = (docs[-lq:].view(-1, 1) == docs.view(1, -1)) & causal
    return {
        "causal+pad": causal & pad,
        "window40": band,
        "documents": doc,
        "keypad": pad.expand(b, 1, lq, lk),
        "random": torch.rand(lq, lk) > 0.3,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq,lk", [(1, 1), (63, 63), (65, 65), (130, 130), (17, 150), (200, 200)])
def test_matches_sdpa_on_block_sparse_path(force_block_sparse, dtype, lq, lk):
    q, k, v = _qkv(2, 4, 2, lq, lk, 32, dtype)
    before = A.STATS["block_sparse"]
    for name, mask in _masks(2, lq, lk).items():
        out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             enable_gqa=True)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype],
                                   msg=f"mask {name}")
    if lq * lk > 1:
        assert A.STATS["block_sparse"] > before  # the kernel path really ran


def test_fully_masked_rows_are_zero_like_sdpa(force_block_sparse):
    q, k, v = _qkv(2, 2, 2, 100, 100, 16, torch.float32)
    mask = _causal(100, 100) & torch.ones(2, 1, 1, 100, dtype=torch.bool)
    mask[1, :, :30] = False  # whole rows masked
    out = sdpa(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert out[1, :, :30].abs().max() == 0


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min, -1e9])
def test_additive_masks(force_block_sparse, fill):
    q, k, v = _qkv(2, 2, 2, 130, 130, 16, torch.float32)
    keep = _causal(130, 130) & torch.ones(2, 1, 1, 130, dtype=torch.bool)
    keep[1, ..., 100:] = False  # right padding: every row keeps key 0
    fmask = torch.zeros(keep.shape).masked_fill(~keep, fill)
    assert plan_attention(q, k, v, fmask, cache=False).kind == "block_sparse"
    torch.testing.assert_close(sdpa(q, k, v, fmask),
                               F.scaled_dot_product_attention(q, k, v, fmask), atol=2e-5,
                               rtol=2e-5)


def test_plans(force_block_sparse):
    q, k, v = _qkv(2, 2, 2, 130, 130, 16, torch.float32)
    ms = _masks(2, 130, 130)
    assert plan_attention(q, k, v, torch.ones(130, 130, dtype=torch.bool)).kind == "nomask"
    assert plan_attention(q, k, v, ms["window40"]).kind == "block_sparse"
    bias = torch.randn(130, 130)  # a real additive bias: only SDPA computes it
    assert plan_attention(q, k, v, bias).kind == "sdpa"
    # fully masked rows: -inf ones give zeros in SDPA as in the kernel; finite ones do not
    rows = torch.zeros(130, 130).masked_fill(~ms["causal+pad"][1, 0], float("-inf"))
    assert plan_attention(q, k, v, rows).kind == "block_sparse"
    torch.testing.assert_close(sdpa(q, k, v, rows), F.scaled_dot_product_attention(q, k, v, rows),
                               atol=2e-5, rtol=2e-5)
    rows_min = torch.zeros(130, 130).masked_fill(~ms["causal+pad"][1, 0], -1e30)
    assert plan_attention(q, k, v, rows_min).kind == "sdpa"
    assert plan_attention(q, k, v, ms["window40"], dropout_p=0.1).kind == "sdpa"
    assert plan_attention(q, k, v, None, is_causal=True).kind == "sdpa"
    # defaults: a dense mask and a small problem stay with SDPA; all-true needs no mask
    dense = ms["random"]
    assert plan_attention(q, k, v, dense, max_fraction=0.45, cache=False).kind == "sdpa"
    assert plan_attention(q, k, v, torch.ones(130, 130, dtype=torch.bool), max_fraction=0.45,
                          cache=False).kind == "nomask"
    # a mask whose dense tiles hide in the middle rows of each tile: the quick lower bound does
    # not see them, the full scan does
    mid = torch.zeros(130, 130, dtype=torch.bool)
    mid[torch.arange(130) % 64 == 30] = True
    p = plan_attention(q, k, v, mid, max_fraction=0.45, cache=False)
    assert p.kind == "sdpa" and p.fraction == pytest.approx(2 / 3)  # rows 128-129: no tile
    assert not p.reason.startswith(">=")  # decided by the full scan
    assert plan_attention(q, k, v, ms["window40"], min_pairs=1 << 20, cache=False).kind == "sdpa"
    # grouped heads without enable_gqa: SDPA (which raises, as it should)
    q4 = torch.randn(2, 4, 130, 16)
    assert plan_attention(q4, k, v, ms["window40"], cache=False).kind == "sdpa"
    with pytest.raises(RuntimeError):
        sdpa(q4, k, v, ms["window40"])


def test_plan_cache_follows_mask_identity_and_version(force_block_sparse):
    q, k, v = _qkv(1, 2, 2, 130, 130, 16, torch.float32)
    mask = _masks(1, 130, 130)["window40"].clone()
    p1 = plan_attention(q, k, v, mask)
    assert plan_attention(q, k, v, mask) is p1
    mask.fill_(True)  # in place: the version changes, the plan is redone
    p2 = plan_attention(q, k, v, mask)
    assert p2 is not p1 and p2.kind == "nomask"
    torch.testing.assert_close(sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v))


def test_graph_plans_follow_program_order_not_identity(force_block_sparse):
    # Inside Inductor's code the calls on one mask node may get different buffers, and a freed
    # buffer may be handed on without a version bump: the compiled graph plans on the first call
    # of each mask node (plan_mode=1) into its slot and reuses the slot on the later calls (2).
    q, k, v = _qkv(1, 2, 2, 130, 130, 16, torch.float32)
    ms = _masks(1, 130, 130)
    buf = ms["window40"].clone()
    op, slot = torch.ops.fastarch.sdpa, A.new_plan_slot()
    op(q, k, v, buf, 0.0, False, None, False, 1, slot)
    assert A.plan_attention(q, k, v, buf.clone(), plan_mode=2, plan_slot=slot) is \
        A._graph_plans()[slot]  # another buffer, same slot: reused
    buf.data.copy_(ms["documents"].expand_as(buf))  # new content, same object, same version
    out = op(q, k, v, buf, 0.0, False, None, False, 1, slot)  # first call of the next run
    ref = F.scaled_dot_product_attention(q, k, v, ms["documents"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(op(q, k, v, buf.clone(), 0.0, False, None, False, 2, slot), ref,
                               atol=2e-5, rtol=2e-5)
    # a later call whose shapes do not match the slot's plan plans again
    q2, k2, v2 = _qkv(1, 2, 2, 100, 100, 16, torch.float32)
    m2 = ms["documents"][:100, :100]
    torch.testing.assert_close(op(q2, k2, v2, m2, 0.0, False, None, False, 2, slot),
                               F.scaled_dot_product_attention(q2, k2, v2, m2), atol=2e-5,
                               rtol=2e-5)


def test_gradients_match_sdpa(force_block_sparse):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 2, 70, 70, 16, torch.float32))
    mask = _masks(2, 70, 70)["causal+pad"]
    g = torch.randn(2, 2, 70, 16)
    grads = torch.autograd.grad(sdpa(q, k, v, mask), (q, k, v), g)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, mask), (q, k, v), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_opcheck(force_block_sparse):
    q, k, v = _qkv(2, 2, 2, 70, 70, 16, torch.float32)
    mask = _masks(2, 70, 70)["causal+pad"]
    torch.library.opcheck(torch.ops.fastarch.sdpa.default, (q, k, v, mask, 0.0, False, None, False))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastarch.sdpa.default,
                          (qg, kg, vg, mask, 0.0, False, 0.3, False))
    torch.library.opcheck(torch.ops.fastarch.sdpa.default, (q, k, v, None, 0.0, True, None, False))


def test_compiles_fullgraph(force_block_sparse):
    q, k, v = _qkv(2, 2, 2, 100, 100, 16, torch.float32)
    mask = _masks(2, 100, 100)["causal+pad"]
    f = torch.compile(lambda q, k, v, m: sdpa(q, k, v, m) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v, mask), 2 * F.scaled_dot_product_attention(q, k, v, mask))


def test_bad_input():
    q, k, v = _qkv(1, 1, 1, 8, 8, 4, torch.float32)
    with pytest.raises(TypeError, match="q must be a tensor"):
        sdpa([1.0], k, v)
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, attn_mask="causal")
    with pytest.raises(ValueError, match="is_causal"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.5)


# ---- teal_linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 37), (1, 1, 37), (3, 37), (2, 9, 37)])
def test_teal_linear_matches_reference(dtype, shape):
    lin = torch.nn.Linear(37, 29).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    t = 0.6
    with torch.no_grad():
        out = teal_linear(x, lin.weight, lin.bias, t)
        ref = F.linear(torch.where(x.abs() > t, x, 0).float(), lin.weight.float(), lin.bias.float())
    rows = x.numel() // 37
    assert (rows <= L.MAX_SPARSE_ROWS) == (rows in (1, 3))  # both paths are covered
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


def test_teal_linear_follows_weight_updates():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(1, 16)
    with torch.no_grad():
        teal_linear(x, lin.weight, None, 0.1)
        lin.weight.mul_(2)  # in-place update: the input-major copy is refreshed
        ref = F.linear(torch.where(x.abs() > 0.1, x, 0), lin.weight)
        torch.testing.assert_close(teal_linear(x, lin.weight, None, 0.1), ref)


def test_teal_linear_opcheck_and_errors():
    w, x = torch.randn(8, 16), torch.randn(2, 16)
    torch.library.opcheck(torch.ops.fastarch.teal_linear.default, (x, w, None, 0.2))
    torch.library.opcheck(torch.ops.fastarch.teal_linear.default, (torch.randn(20, 16), w,
                                                                   torch.randn(8), 0.2))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        teal_linear(x, torch.randn(8), None, 0.1)
    with pytest.raises(ValueError, match="in_features"):
        teal_linear(torch.randn(2, 15), w, None, 0.1)
    with pytest.raises(ValueError, match="bias"):
        teal_linear(x, w, torch.randn(3), 0.1)
    with pytest.raises(ValueError, match="threshold"):
        teal_linear(x, w, None, -1.0)
