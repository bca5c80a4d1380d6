"""The fake (meta) kernels: shapes of what they return, and what they refuse.

One meta tensor among CPU ones sends a raw op call to the fake kernel; its output is
uninitialised memory, so a mixed call must be an error there, not an answer."""
import pytest
import torch

import fastarch  # noqa: F401  (registers the ops)
from fastarch.attention import causal, create_block_mask

ops = torch.ops.fastarch
M = "meta"


def _attn_args(device_of=None):
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    bm = create_block_mask(causal(), q_len=9, kv_len=9, block_size=4)
    args = [q, k, v, *bm.op_args(), None, None, bm.block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, 0.25, 0.0]
    if device_of is not None:
        args[device_of] = args[device_of].to(M)
    return args


MIXED = {
    "sparse_gemv-w_t": (lambda: ops.sparse_gemv(torch.randn(3, 8), torch.randn(8, 5, device=M),
                                                None, 0.0), "w_t is on meta"),
    "sparse_gemv-bias": (lambda: ops.sparse_gemv(torch.randn(3, 8, device=M),
                                                 torch.randn(8, 5, device=M), torch.randn(5),
                                                 0.0), "bias is on cpu"),
    "sparse_gemv_index-index": (lambda: ops.sparse_gemv_index(
        torch.randn(3, 8), torch.randn(8, 5), None, torch.tensor([0], device=M)), "index is on"),
    "gather_gemv-index": (lambda: ops.gather_gemv(torch.randn(3, 8), torch.randn(5, 8), None,
                                                  torch.tensor([0], device=M)), "index is on"),
    "sparse_mlp-neuron_index": (lambda: ops.sparse_mlp(
        torch.randn(2, 8), torch.randn(6, 8), None, torch.randn(6, 8), None, None, None,
        torch.tensor([1], device=M), 0.0, "silu"), "neuron_index is on"),
    "nm_linear-values": (lambda: ops.nm_linear(torch.randn(2, 8), torch.randn(4, 4, device=M),
                                               torch.zeros(4, 4, dtype=torch.uint8), None, 2, 4),
                         "values is on"),
    "attention-kv_indices": (lambda: ops.block_sparse_attention(*_attn_args(4)),
                             "kv_indices is on"),
    "attention-v": (lambda: ops.block_sparse_attention(*_attn_args(2)), "k is on|v is on"),
}


@pytest.mark.parametrize("case", list(MIXED))
def test_mixed_meta_and_cpu_is_an_error(case):
    call, match = MIXED[case]
    with pytest.raises(RuntimeError, match=match):
        call()


SHAPES = {
    "features": (lambda: ops.sparse_gemv(torch.randn(3, 7, device=M), torch.randn(8, 5, device=M),
                                         None, 0.0), "7 features"),
    "rank": (lambda: ops.sparse_gemv(torch.randn(8, device=M), torch.randn(8, 5, device=M), None,
                                     0.0), "2-D"),
    "gather-index-rank": (lambda: ops.gather_gemv(torch.randn(3, 8, device=M),
                                                  torch.randn(5, 8, device=M), None,
                                                  torch.zeros(1, 2, dtype=torch.long, device=M)),
                          "1-D"),
    "nm-width": (lambda: ops.nm_linear(torch.randn(2, 9, device=M), torch.randn(4, 4, device=M),
                                       torch.zeros(4, 4, dtype=torch.uint8, device=M), None, 2, 4),
                 "stand for 8"),
    "attention-head-dim": (lambda: ops.block_sparse_attention(
        *[t.to(M)[..., :8] if i == 1 else (t.to(M) if isinstance(t, torch.Tensor) else t)
          for i, t in enumerate(_attn_args())]), "head dim"),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_fake_kernels_check_shapes(case):
    call, match = SHAPES[case]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_all_meta_gives_the_output_shapes():
    y = ops.sparse_gemv(torch.randn(3, 8, device=M), torch.randn(8, 5, device=M), None, 0.0)
    assert y.shape == (3, 5) and y.device.type == M
    out, lse = ops.block_sparse_attention(*[t.to(M) if isinstance(t, torch.Tensor) else t
                                            for t in _attn_args()])
    assert out.shape == (1, 2, 9, 16) and lse.shape == (1, 2, 9) and lse.dtype == torch.float32


def test_wrappers_on_meta_inputs():
    # (their index range check reads values, which meta tensors do not have)
    x = torch.randn(3, 8, device=M)
    idx = torch.tensor([1, 2], device=M)
    assert fastarch.gather_gemv(x, torch.randn(5, 8, device=M), idx).shape == (3, 2)
    assert fastarch.sparse_gemv_index(x, torch.randn(8, 5, device=M), idx).shape == (3, 5)
    assert fastarch.sparse_mlp(x, torch.randn(6, 8, device=M), torch.randn(6, 5, device=M),
                               neuron_index=idx).shape == (3, 5)
