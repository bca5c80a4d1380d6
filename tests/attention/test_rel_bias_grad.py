"""Relative-position bias (rel_bias) is differentiable: the C++ backward's drel_bias against
autograd through the fp32 reference, gradcheck of the reference in float64, opcheck."""
import math

import pytest
import torch

import fastarch
from fastarch.attention import (
    and_masks,
    causal,
    create_block_mask,
    document,
    fixed,
    full,
    sliding_window,
)
from fastarch.ops.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_backward_reference,
    block_sparse_attention_reference,
)

CASES = {
    # name: (mask, dtype, b, hq, hkv, lq, lk, R, block, extra)
    "causal-R4-L70": (causal(), torch.float32, 2, 4, 2, 70, 70, 4, 32, {}),
    "window-R200-L129": (sliding_window(30, 4), torch.float32, 1, 4, 4, 129, 129, 200, 32, {}),
    "full-R0-L33": (full(), torch.float32, 1, 2, 1, 33, 33, 0, 16, {}),
    "doc-causal-R8-L100": (and_masks(causal(), document(lengths=[40, 60])), torch.float32, 1, 4,
                           1, 100, 100, 8, 32, {}),
    "fixed-bitmaps-R16": (fixed(32, 4), torch.float32, 1, 2, 2, 90, 90, 16, 32, {}),
    "softcap-alibi-R6": (causal(), torch.float32, 1, 4, 2, 50, 50, 6, 16,
                         {"softcap": 2.0, "alibi": True}),
    "decode-offset-R10": (causal(), torch.float32, 1, 4, 1, 3, 150, 10, 32, {}),
    "bf16-R5-L63": (causal(), torch.bfloat16, 1, 4, 2, 63, 63, 5, 32, {}),
    "fp16-R5-L63": (sliding_window(20), torch.float16, 1, 4, 4, 63, 63, 5, 16, {}),
}


def _setup(case):
    spec, dtype, b, hq, hkv, lq, lk, r, block, extra = CASES[case]
    torch.manual_seed(0)
    q = torch.randn(b, hq, lq, 64, dtype=dtype)
    k = torch.randn(b, hkv, lk, 64, dtype=dtype)
    v = torch.randn(b, hkv, lk, 64, dtype=dtype)
    rel = torch.randn(hq, 2 * r + 1)
    bm = create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=lk - lq, batch=b, heads=hq,
                           block_size=block)
    slopes = fastarch.attention.alibi_slopes(hq) if extra.get("alibi") else None
    return q, k, v, rel, bm, slopes, extra.get("softcap", 0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_op_rel_grad_matches_reference(case):
    q, k, v, rel, bm, slopes, softcap = _setup(case)
    rest = (*bm.op_args(), slopes, rel, bm.block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, 1 / math.sqrt(q.shape[-1]), softcap)
    out, lse = torch.ops.fastarch.block_sparse_attention(q, k, v, *rest)
    g, glse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.ops.fastarch.block_sparse_attention_backward(g, glse, q, k, v, out, lse, *rest)
    want = block_sparse_attention_backward_reference(g, glse, q, k, v, out, lse, *rest)
    assert len(got) == 4 and got[3].shape == rel.shape and got[3].dtype == rel.dtype
    assert want[3].abs().sum() > 0  # the case exercises the bias
    atol = 1e-4 if q.dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(1.0, b.abs().max()),
                                   rtol=atol)


@pytest.mark.parametrize("case", ["causal-R4-L70", "softcap-alibi-R6", "decode-offset-R10",
                                  "bf16-R5-L63"])
def test_autograd_through_wrapper(case):
    """loss.backward() through block_sparse_attention reaches rel_bias (and q, k, v)."""
    q, k, v, rel, bm, slopes, softcap = _setup(case)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rel_leaf = rel.clone().requires_grad_(True)
    out, lse = block_sparse_attention(*leaves, bm, rel_bias=rel_leaf, alibi_slopes=slopes,
                                      softcap=softcap, return_lse=True)
    w = torch.randn_like(out, dtype=torch.float32)
    (out.float() * w).sum().backward()

    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_rel = rel.clone().requires_grad_(True)
    ref_out, _ = block_sparse_attention_reference(
        *ref_leaves, *bm.op_args(), slopes, ref_rel, bm.block_size, bm.q_offset, bm.window_left,
        bm.window_right, bm.prefix_len, 1 / math.sqrt(q.shape[-1]), softcap)
    (ref_out.float() * w).sum().backward()
    atol = 1e-4 if q.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(rel_leaf.grad, ref_rel.grad,
                               atol=atol * max(1.0, ref_rel.grad.abs().max()), rtol=atol)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=atol * 10, rtol=atol * 10)


def test_rel_bias_learns():
    """A few SGD steps on the table alone lower the loss (the gradient is usable, not just equal)."""
    q, k, v, rel, bm, _, _ = _setup("causal-R4-L70")
    target = torch.randn_like(q)
    table = torch.zeros_like(rel, requires_grad=True)
    opt = torch.optim.SGD([table], lr=50.0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((block_sparse_attention(q, k, v, bm, rel_bias=table) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradcheck_kernel_fp32():
    """Finite differences of the C++ kernel itself (fp32: loose eps / tolerances) agree with its
    analytic rel_bias gradient, independently of the reference."""
    torch.manual_seed(1)
    q = torch.randn(1, 2, 9, 8)
    k = torch.randn(1, 1, 12, 8)
    v = torch.randn(1, 1, 12, 8)
    rel = torch.randn(2, 7, requires_grad=True)
    bm = create_block_mask(causal(), q_len=9, kv_len=12, q_offset=3, block_size=4)

    def f(table):
        return block_sparse_attention(q, k, v, bm, rel_bias=table, scale=0.3, return_lse=True)

    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(f, (rel,), eps=1e-2, atol=3e-3, rtol=3e-2)


def test_opcheck_with_rel_bias():
    q, k, v, rel, bm, slopes, softcap = _setup("softcap-alibi-R6")
    args = (q, k, v, *bm.op_args(), slopes, rel, bm.block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, 0.125, softcap)
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention.default, args)
    rel_g = rel.clone().requires_grad_(True)
    args_g = (*args[:12], rel_g, *args[13:])
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention.default, args_g,
                          test_utils=("test_autograd_registration",))
    out, lse = torch.ops.fastarch.block_sparse_attention(*args)
    torch.library.opcheck(torch.ops.fastarch.block_sparse_attention_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse,
                           *args[3:]))
    # Without a table the fourth output is an empty tensor (fake and real agree: opcheck above
    # in tests/ops covers rel_bias=None).
    no_rel = (*args[3:12], None, *args[13:])
    got = torch.ops.fastarch.block_sparse_attention_backward(
        torch.randn_like(out), None, q, k, v, out, lse, *no_rel)
    assert got[3].numel() == 0


def test_bad_rel_bias():
    q, k, v, rel, bm, _, _ = _setup("causal-R4-L70")
    with pytest.raises(ValueError, match="rel_bias must be a tensor of shape"):
        block_sparse_attention(q, k, v, bm, rel_bias=rel[:, :-1])
    with pytest.raises(TypeError, match="rel_bias must be float32"):
        block_sparse_attention(q, k, v, bm, rel_bias=rel.long())


def test_cuda_dispatch_backward_interpreted():
    """The CUDA backward (Triton dq/dk/dv + rel_bias gradient from the reference VJP), run by
    the Triton interpreter on CPU tensors."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from fastarch.ops import block_sparse_attention as ops_mod

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, rel, bm, slopes, softcap = _setup("softcap-alibi-R6")
    q, k, v, rel, slopes = (t.to(device) for t in (q, k, v, rel, slopes))
    bm = bm.to(device)
    for table in (rel, None):
        rest = (*bm.op_args(), slopes, table, bm.block_size, bm.q_offset, bm.window_left,
                bm.window_right, bm.prefix_len, 0.125, softcap)
        out, lse = block_sparse_attention_reference(q, k, v, *rest)
        g, glse = torch.randn_like(out), torch.randn_like(lse)
        got = ops_mod._block_sparse_attention_backward_cuda(g, glse, q, k, v, out, lse, *rest)
        want = block_sparse_attention_backward_reference(g, glse, q, k, v, out, lse, *rest)
        assert len(got) == 4 and got[3].shape == want[3].shape
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)
