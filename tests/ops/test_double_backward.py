"""Second derivatives (create_graph=True) through the ops: a gradient penalty must see the op.

The first-order backward of each op runs a kernel (or the reference's VJP) that has no
derivative of its own; under create_graph=True the ops differentiate their reference instead,
so the penalty's gradient equals the one of the same expression written in plain PyTorch.
"""
import pytest
import torch

import fastarch
import fastarch.attention as A


def _penalty_grad(f, inputs, wrt):
    """d/d(wrt) of sum(d(sum(f(*inputs) ** 2))/d(inputs[0]) ** 2)."""
    y = f(*inputs)
    (g,) = torch.autograd.grad((y ** 2).sum(), inputs[0], create_graph=True)
    assert g.requires_grad, "the first-order gradient has no graph: create_graph was dropped"
    (h,) = torch.autograd.grad((g ** 2).sum(), wrt)
    return h


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def test_sparse_gemv_double_backward():
    x, w_t, b = _leaves((3, 10), (10, 7), (7,))
    with torch.no_grad():
        x[0, :4] = 0.0  # skipped channels: below the threshold in every row they appear in
    got = _penalty_grad(lambda x, w, b: fastarch.sparse_gemv(x, w, b, 0.3), (x, w_t, b), w_t)
    want = _penalty_grad(lambda x, w, b: torch.where(x.abs() > 0.3, x, 0.0) @ w + b,
                         (x, w_t, b), w_t)
    torch.testing.assert_close(got, want)


def test_gather_gemv_double_backward():
    x, w = _leaves((2, 9), (6, 9))
    idx = torch.tensor([4, 0, 2])
    got = _penalty_grad(lambda x, w: fastarch.gather_gemv(x, w, idx), (x, w), w)
    want = _penalty_grad(lambda x, w: x @ w[idx].t(), (x, w), w)
    torch.testing.assert_close(got, want)


def test_sparse_mlp_double_backward():
    x, g, u, d_t = _leaves((2, 8), (12, 8), (12, 8), (12, 8))
    core = torch.tensor([0, 3, 5, 11])

    def ours(x, g, u, d_t):
        return fastarch.sparse_mlp(x, g, d_t, w_up=u, neuron_index=core, activation="silu")

    def plain(x, g, u, d_t):
        h = torch.nn.functional.silu(x @ g[core].t()) * (x @ u[core].t())
        return h @ d_t[core]

    torch.testing.assert_close(_penalty_grad(ours, (x, g, u, d_t), g),
                               _penalty_grad(plain, (x, g, u, d_t), g))


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
def test_block_sparse_attention_double_backward(with_lse):
    q, k, v = _leaves((1, 2, 9, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    bm = A.create_block_mask(A.causal(), q_len=9, kv_len=9, block_size=4)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()

    def ours(q, k, v):
        out, lse = fastarch.block_sparse_attention(q, k, v, bm, return_lse=True)
        return out + lse.unsqueeze(-1) if with_lse else out

    def plain(q, k, v):
        s = (q @ k.transpose(-1, -2)) / 4.0
        s = s.masked_fill(~causal, float("-inf"))
        out = torch.softmax(s, -1) @ v
        return out + torch.logsumexp(s, -1).unsqueeze(-1) if with_lse else out

    for wrt in (0, 1, 2):
        torch.testing.assert_close(_penalty_grad(ours, (q, k, v), (q, k, v)[wrt]),
                                   _penalty_grad(plain, (q, k, v), (q, k, v)[wrt]),
                                   rtol=1e-4, atol=1e-4)
