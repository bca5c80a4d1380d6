"""nm_linear: C++ CPU kernel and Triton kernel (interpreted on CPU) against the reference."""
import pytest
import torch

from fastarch import native
from fastarch.ops.nm_linear import nm_compress, nm_decompress, nm_linear, nm_linear_reference

CASES = [  # (B, out, in, n, m)
    (1, 5, 16, 2, 4),
    (3, 37, 64, 2, 4),
    (8, 64, 96, 4, 8),
    (13, 9, 40, 2, 4),
    (0, 7, 8, 2, 4),
]
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


def _ids(case):
    return "B{}-O{}-K{}-{}:{}".format(*case)


def _make(B, O, K, n, m, dtype, bias=True):
    w = torch.randn(O, K)
    v, i = nm_compress(w, n, m)
    x = torch.randn(B, K).to(dtype)
    b = torch.randn(O).to(dtype) if bias else None
    return x, v.to(dtype), i, b


def test_compress_keeps_largest_and_roundtrips():
    w = torch.randn(6, 16)
    v, i = nm_compress(w, 2, 4)
    dense = nm_decompress(v, i, 2, 4)
    groups = dense.reshape(6, 4, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    kept_min = groups.abs().where(groups != 0, torch.inf).amin(-1)
    dropped_max = w.reshape(6, 4, 4).abs().where(groups == 0, 0).amax(-1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cpu_matches_reference(case, dtype, tol):
    B, O, K, n, m = case
    x, v, i, b = _make(B, O, K, n, m, dtype)
    got = nm_linear(x, v, i, b, n, m)
    want = nm_linear_reference(x, v, i, b, n, m)
    assert got.shape == (B, O) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol * 4, rtol=tol)


def test_no_bias_and_leading_dims():
    x, v, i, _ = _make(6, 12, 32, 2, 4, torch.float32, bias=False)
    got = nm_linear(x.reshape(2, 3, 32), v, i, None, 2, 4)
    want = x @ nm_decompress(v, i, 2, 4).t()
    torch.testing.assert_close(got.reshape(6, 12), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("case", CASES[:4], ids=_ids)
def test_triton_interpreted_matches_reference(case):
    from fastarch.kernels import nm_linear as k

    B, O, K, n, m = case
    x, v, i, b = _make(B, O, K, n, m, torch.float32)
    got = k.nm_linear(x, v, i, b, n, m)
    torch.testing.assert_close(got, nm_linear_reference(x, v, i, b, n, m), atol=1e-4, rtol=1e-4)


def test_opcheck():
    x, v, i, b = _make(3, 8, 16, 2, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastarch.nm_linear.default, (x, v, i, b, 2, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_gradient_wrt_x():
    x, v, i, b = _make(2, 8, 16, 2, 4, torch.float32)
    x.requires_grad_(True)
    nm_linear(x, v, i, b, 2, 4).sum().backward()
    want = nm_decompress(v, i, 2, 4).sum(0).expand(2, 16)
    torch.testing.assert_close(x.grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, err, match",
    [
        ({"n": 3}, ValueError, "n:m"),
        ({"x": torch.randn(2, 15)}, ValueError, "x"),
        ({"indices": torch.zeros(8, 8, dtype=torch.int64)}, TypeError, "indices"),
        ({"values": torch.randn(8, 8, dtype=torch.float64)}, TypeError, "values"),
        ({"bias": torch.randn(3)}, ValueError, "bias"),
        ({"x": torch.zeros(2, 16, dtype=torch.int32)}, TypeError, "x"),
        ({"x": torch.tensor(1.0)}, ValueError, "x: last dim"),
        ({"bias": [0.0] * 8}, TypeError, "bias must be a tensor"),
    ],
    ids=["pattern", "x-width", "indices-dtype", "values-dtype", "bias-shape", "x-dtype", "x-0d",
         "bias-list"],
)
def test_bad_inputs(change, err, match):
    x, v, i, b = _make(2, 8, 16, 2, 4, torch.float32)
    args = {"x": x, "values": v, "indices": i, "bias": b, "n": 2, "m": 4}
    args.update(change)
    with pytest.raises(err, match=match):
        nm_linear(**args)


def test_out_of_range_index_rejected_by_kernel():
    x, v, i, b = _make(2, 8, 16, 2, 4, torch.float32)
    i = i.clone()
    i[0, 0] = 7
    with pytest.raises(RuntimeError, match="indices"):
        torch.ops.fastarch.nm_linear(x, v, i, b, 2, 4)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.fastarch.nm_linear(x.double(), v.double(), i, b.double(), 2, 4)


def test_a_position_listed_twice_adds_up():
    # hand-made metadata can list one position twice in a group: kernel and reference agree
    # that the weight there is the sum of both values
    x = torch.arange(8.0).view(1, 8)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    indices = torch.tensor([[1, 1, 0, 3]], dtype=torch.uint8)
    want = torch.tensor([[1 * 3.0 + 4 * 3.0 + 7 * 4.0]])
    torch.testing.assert_close(nm_linear_reference(x, values, indices, None, 2, 4), want)
    torch.testing.assert_close(nm_linear(x, values, indices, None, 2, 4), want)


def test_zero_input_features():
    v, i = nm_compress(torch.randn(4, 0), 2, 4)
    y = nm_linear(torch.randn(3, 0), v, i, torch.ones(4), 2, 4)
    torch.testing.assert_close(y, torch.ones(3, 4))
