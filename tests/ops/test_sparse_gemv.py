"""The sparse GEMV family against its PyTorch reference: C++ CPU, Triton (interpreted without a
GPU), the CUDA kernels when a GPU is here; opcheck; torch.compile; bad input."""
import os
import subprocess
import sys

import pytest
import torch

import fastarch
from fastarch import native
from fastarch.ops import sparse_gemv as sg

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, in, out): odd sizes, size-1 dims, a batch past the dense-dispatch limit (16)
SHAPES = [(1, 1, 1), (1, 123, 77), (3, 257, 5), (8, 64, 300), (17, 33, 45), (64, 130, 70),
          (0, 16, 8)]


def _ids(shapes):
    return [f"B{b}-in{i}-out{o}" for b, i, o in shapes]


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale)


def _make(b, i, o, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, i, generator=g).to(dtype)
    w = (torch.randn(o, i, generator=g) / max(i, 1) ** 0.5).to(dtype)
    bias = torch.randn(o, generator=g).to(dtype)
    return x, w, bias


# ---- C++ CPU kernels ------------------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(not native.native_loaded(), reason="fastarch._C is not built")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("threshold", [0.0, 0.7, 10.0], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_gemv_cpu(shape, dtype, threshold, with_bias):
    b, i, o = shape
    x, w, bias = _make(b, i, o, dtype)
    bias = bias if with_bias else None
    w_t = fastarch.prepare_input_major(w)
    got = fastarch.sparse_gemv(x, w_t, bias, threshold)
    assert got.dtype == dtype and got.shape == (b, o)
    _close(got, sg.sparse_gemv_reference(x, w_t, bias, threshold), dtype)


@needs_cpp
@pytest.mark.parametrize("density", [0.0, 0.3, 0.95, 1.0])
def test_sparse_gemv_dispatch_paths_agree(density):
    # density > 0.9 goes to the dense product inside the kernel; every path must give the spec
    x = torch.randn(2, 512)
    t = torch.quantile(x.abs().flatten(), 1 - density).item() if density > 0 else 1e9
    w_t = torch.randn(512, 96)
    _close(fastarch.sparse_gemv(x, w_t, None, t), sg.sparse_gemv_reference(x, w_t, None, t),
           torch.float32)


# Kernel branches inside rows_axpy: batch 1 (packed rows), batch 2..4 (weights widened in
# registers, one template per batch size), batch > 4 (fp32 staging buffer), the < 4-row tail of
# each, blocks skipped because no batch row is active, and an output wider than one 2048 tile.
# bf16 on CPUs with the bf16 dot instruction: row pairs unpacked in the loop below batch 12,
# packed per chunk from 12 on in 6-row groups (13..17 leave groups of 1..5 rows), panels of
# 1024 columns and a 2053-column output with a partial last tile; above batch 128 a dense
# union goes to at::mm (above 32 on CPUs with AMX, and for fp16 with AVX512-FP16).
BRANCH_BATCHES = [1, 2, 3, 4, 5, 8, 11, 12, 13, 14, 15, 16, 17, 130]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BRANCH_BATCHES, ids=lambda b: f"B{b}")
def test_sparse_gemv_kernel_branches(batch, dtype):
    x, w, bias = _make(batch, 39, 2053, dtype, seed=batch)
    x[:, 4:12] = 0  # two whole 4-row blocks inactive for every batch row
    x[0, 20:24] = 0  # a block active in some rows only (batch > 1)
    w_t = fastarch.prepare_input_major(w)
    for t in (0.0, 0.3):
        got = fastarch.sparse_gemv(x, w_t, bias, t)
        _close(got, sg.sparse_gemv_reference(x, w_t, bias, t), dtype)
        idx = torch.tensor([38, 0, 5, 7, 21, 22, 23, 30, 31], dtype=torch.long)
        _close(fastarch.sparse_gemv_index(x, w_t, idx, bias),
               sg.sparse_gemv_index_reference(x, w_t, bias, idx), dtype)


@needs_cpp
@pytest.mark.parametrize("batch", [12, 19, 64], ids=lambda b: f"B{b}")
def test_sparse_gemv_bf16_packed_chunks(batch):
    # The packed bf16 path takes the active rows 64 pairs (128 rows) at a time: 263 inputs with
    # 9 inactive in every batch row leave 127 pairs (an odd row paired with itself), i.e. one
    # full chunk and a partial one, over a 1100-column output (two panels, a partial tile).
    x, w, bias = _make(batch, 263, 1100, torch.bfloat16, seed=batch)
    x[:, 100:109] = 0
    w_t = fastarch.prepare_input_major(w)
    for t in (0.0, 0.5):
        _close(fastarch.sparse_gemv(x, w_t, bias, t), sg.sparse_gemv_reference(x, w_t, bias, t),
               torch.bfloat16)


_FORCED_DENSE = """
import torch, fastarch
from fastarch.ops import sparse_gemv as sg
for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
    for b in (1, 2, 8, 17):
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 70, generator=g).to(dt)
        w_t = (torch.randn(70, 33, generator=g) / 8).to(dt)
        bias = torch.randn(33, generator=g).to(dt)
        got = fastarch.sparse_gemv(x, w_t, bias, 0.4).float()
        want = sg.sparse_gemv_reference(x, w_t, bias, 0.4).float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
        w = w_t.t().contiguous()  # gather_gemv: (out, in) rows, dense above a fraction of them
        for idx in (torch.tensor([32, 0, 5, 5, 17]), torch.arange(33).flip(0), torch.arange(33),
                torch.arange(32), torch.arange(1, 33)):  # all rows in order: no copy
            for bb in (bias, None):
                got = fastarch.gather_gemv(x, w, idx, bb).float()
                want = sg.gather_gemv_reference(x, w, bb, idx).float()
                torch.testing.assert_close(got, want, rtol=tol,
                                           atol=tol * max(1.0, want.abs().max().item()))
        # sparse_mlp: its gate / up products follow gather_gemv's switch (dense GEMM or rows)
        w_in, w_up = (torch.randn(2, 50, 70, generator=g) / 8).to(dt)
        w_out_t = (torch.randn(50, 33, generator=g) / 8).to(dt)
        b_in, b_up = torch.randn(2, 50, generator=g).to(dt)
        for idx, t, up, bi, act in ((None, 0.0, w_up, None, "silu"),
                                    (torch.arange(49), 0.1, w_up, b_in, "gelu"),
                                    (torch.tensor([3, 0, 3, 49]), 0.05, None, b_in, "relu")):
            bu = b_up if up is not None else None
            got = fastarch.sparse_mlp(x, w_in, w_out_t, w_up=up, b_in=bi, b_up=bu, b_out=bias,
                                      neuron_index=idx, threshold=t, activation=act).float()
            want = sg.sparse_mlp_reference(x, w_in, up, w_out_t, bi, bu, bias, idx, t, act).float()
            torch.testing.assert_close(got, want, rtol=tol,
                                       atol=tol * max(1.0, want.abs().max().item()))
print("ok")
"""


@needs_cpp
@pytest.mark.parametrize("env", [{"FASTARCH_GEMV_DENSE_BATCH_ABOVE": "0"},
                                 {"FASTARCH_GEMV_DENSE_ABOVE": "-1"},
                                 {"FASTARCH_GEMV_DENSE_BATCH_ABOVE": "100000"},
                                 {"FASTARCH_GEMV_BF16_DOT": "0"},
                                 {"FASTARCH_GATHER_DENSE_ABOVE": "0"},
                                 {"FASTARCH_GATHER_DENSE_ABOVE": "2"}],
                         ids=["dense-by-batch", "dense-by-density", "kernel-always",
                              "no-bf16-dot", "gather-dense", "gather-kernel"])
def test_sparse_gemv_dispatch_branches_forced(env):
    # the thresholds are read once per process, so each forced branch runs in its own process
    out = subprocess.run([sys.executable, "-c", _FORCED_DENSE], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


_BATCH_PATHS = """
import torch, fastarch
from fastarch.ops import sparse_gemv as sg
from fastarch import native
print(native.cpu_gemv_paths())
# batches below / at / above the 4-, 6-, 8-, 16- and 32-row limits of the kernels; 263 inputs
# with 9 always inactive (254 rows: three whole 64-row chunks and a partial one; 127 pairs: a
# whole 64-pair chunk, a partial one, a partial 16-pair tile); 2053 columns (partial panels and
# tiles); a union of a few rows; every row inactive
for dt, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3), (torch.float32, 1e-4)):
    for b in (2, 3, 4, 5, 7, 8, 15, 16, 17, 24, 32, 33, 64):
        g = torch.Generator().manual_seed(b)
        for inp, out in ((263, 2053), (40, 70)):
            x = torch.randn(b, inp, generator=g).to(dt)
            x[:, 100:109] = 0
            w_t = (torch.randn(inp, out, generator=g) / 8).to(dt)
            bias = torch.randn(out, generator=g).to(dt)
            for t in (0.0, 0.7, 2.5, 1e9):
                got = fastarch.sparse_gemv(x, w_t, bias, t).float()
                want = sg.sparse_gemv_reference(x, w_t, bias, t).float()
                torch.testing.assert_close(got, want, rtol=tol,
                                           atol=tol * max(1.0, want.abs().max().item()))
            idx = torch.tensor([5, 0, 5, inp - 1] + list(range(10, 40)))
            got = fastarch.sparse_gemv_index(x, w_t, idx, bias).float()
            want = sg.sparse_gemv_index_reference(x, w_t, bias, idx).float()
            torch.testing.assert_close(got, want, rtol=tol,
                                       atol=tol * max(1.0, want.abs().max().item()))
print("ok")
"""


@needs_cpp
@pytest.mark.parametrize("env", [{"FASTARCH_GEMV_AMX": "0"}, {"FASTARCH_GEMV_AMX_FROM": "8"},
                                 {"FASTARCH_GEMV_AMX_FROM": "2", "FASTARCH_GEMV_AMX_STREAM": "0"},
                                 {"FASTARCH_GEMV_BF16_DOT": "0"},
                                 {"FASTARCH_GEMV_TILED_FROM": "0"},
                                 {"FASTARCH_GEMV_TILED_FROM": "2"},
                                 {"FASTARCH_GEMV_TILED_FROM": "2", "FASTARCH_GEMV_STREAM_UPTO": "0"}],
                         ids=["no-amx", "amx-from-8", "amx-panels-from-2", "no-bf16-dot",
                              "no-tiles", "stream-from-2", "tiles-from-2"])
def test_sparse_gemv_batch_paths(env):
    # each batch kernel (AMX tiles where the CPU has them, streaming up to 16 rows and in panels,
    # vdpbf16ps, the fp32 / fp16 streaming order and register tiles on AVX-512, the staging one)
    # against the spec; the
    # switches are read once per process. The dense product is switched off: on AMX /
    # AVX512-FP16 CPUs batches above 32 with a full union would go to it, and these runs are for
    # the kernels.
    env = {"FASTARCH_GEMV_DENSE_BATCH_ABOVE": "100000", **env}
    out = subprocess.run([sys.executable, "-c", _BATCH_PATHS], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[-1] == "ok"
    if env.get("FASTARCH_GEMV_AMX") == "0" or env.get("FASTARCH_GEMV_BF16_DOT") == "0":
        assert "amx" not in lines[0]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [17, 33, 64])
def test_sparse_gemv_wide_batches_default_dispatch(batch, dtype):
    # the default dispatch at wide batches (at::mm on the stored layout where the CPU's GEMM
    # wins at a nearly full union, the kernel elsewhere) against the spec, both unions
    for threshold in (0.0, 2.5):  # union ~1, and 0.2-0.55 at these batches
        x, w, bias = _make(batch, 96, 70, dtype)
        w_t = w.t().contiguous()
        _close(fastarch.sparse_gemv(x, w_t, bias, threshold),
               sg.sparse_gemv_reference(x, w_t, bias, threshold), dtype)


@needs_cpp
def test_sparse_gemv_leading_dims():
    x = torch.randn(2, 3, 40)
    w_t = torch.randn(40, 9)
    got = fastarch.sparse_gemv(x, w_t, threshold=0.5)
    assert got.shape == (2, 3, 9)
    _close(got.reshape(6, 9), sg.sparse_gemv_reference(x.reshape(6, 40), w_t, None, 0.5),
           torch.float32)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_sparse_gemv_index_cpu(shape, dtype):
    b, i, o = shape
    x, w, bias = _make(b, i, o, dtype)
    w_t = fastarch.prepare_input_major(w)
    for index in (torch.randperm(i)[: max(1, i // 3)], torch.arange(i), torch.empty(0, dtype=torch.long),
                  torch.tensor([i - 1, 0, i - 1])):  # repeats count twice, like the reference
        got = fastarch.sparse_gemv_index(x, w_t, index, bias)
        _close(got, sg.sparse_gemv_index_reference(x, w_t, bias, index), dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_gather_gemv_cpu(shape, dtype):
    b, i, o = shape
    x, w, bias = _make(b, i, o, dtype)
    for index in (torch.randperm(o)[: max(1, o // 2)], torch.empty(0, dtype=torch.int32)):
        got = fastarch.gather_gemv(x, w, index, bias)
        assert got.shape == (b, index.numel())
        _close(got, sg.gather_gemv_reference(x, w, bias, index), dtype)


MLP_CASES = [  # (batch, hidden, inter, gated, activation, biases)
    (1, 64, 172, True, "silu", False),
    (4, 33, 65, True, "gelu_tanh", False),
    (1, 48, 190, False, "gelu", True),
    (3, 17, 31, False, "relu", True),
    (2, 20, 40, True, "gelu", True),
    (6, 100, 300, True, "silu", False),  # bf16 dot rows: a 64-wide body and a 36-wide tail
    (13, 160, 90, True, "gelu_tanh", True),  # 4-row groups and a 1-row rest; packed down product
]


def _mlp(case, dtype, seed=0):
    b, hidden, inter, gated, act, biases = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / 4).to(dtype)  # noqa: E731
    x = r(b, hidden) * 4
    return dict(x=x, w_in=r(inter, hidden), w_up=r(inter, hidden) if gated else None,
                w_out_t=r(inter, hidden), b_in=r(inter) if biases else None,
                b_up=r(inter) if biases and gated else None, b_out=r(hidden) if biases else None,
                activation=act)


def _mlp_ref(a, neuron_index, threshold):
    return sg.sparse_mlp_reference(a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["b_in"],
                                   a["b_up"], a["b_out"], neuron_index, threshold, a["activation"])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"B{c[0]}-h{c[1]}-i{c[2]}-{'glu' if c[3] else 'mlp'}-{c[4]}")
@pytest.mark.parametrize("mode", ["all", "index", "threshold", "index+threshold"])
def test_sparse_mlp_cpu(case, dtype, mode):
    a = _mlp(case, dtype)
    inter = a["w_in"].shape[0]
    index = torch.randperm(inter)[: inter // 2] if "index" in mode else None
    threshold = 0.05 if "threshold" in mode else 0.0
    got = fastarch.sparse_mlp(a["x"], a["w_in"], a["w_out_t"], w_up=a["w_up"], b_in=a["b_in"],
                              b_up=a["b_up"], b_out=a["b_out"], neuron_index=index,
                              threshold=threshold, activation=a["activation"])
    _close(got, _mlp_ref(a, index, threshold), dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [2, 7, 8], ids=lambda b: f"B{b}")
def test_sparse_mlp_cpu_neuron_groups(batch, dtype):
    # bf16 batches take the gate / up rows 4 neurons at a time: 42 neurons leave a rest of 2,
    # and neurons whose gate is 0 in every batch row (rows 5 and 9 zeroed) skip their up row
    # inside a group of 4, which then falls back to one row at a time for the up products.
    a = _mlp((batch, 70, 42, True, "silu", True), dtype, seed=batch)
    a["w_in"][[5, 9]] = 0
    a["b_in"][[5, 9]] = 0
    for index in (None, torch.tensor([9, 0, 5, 6, 7, 8, 41, 40, 3])):
        got = fastarch.sparse_mlp(a["x"], a["w_in"], a["w_out_t"], w_up=a["w_up"],
                                  b_in=a["b_in"], b_up=a["b_up"], b_out=a["b_out"],
                                  neuron_index=index, threshold=0.01, activation="silu")
        _close(got, _mlp_ref(a, index, 0.01), dtype)


# ---- Triton (interpreted on CPU) -------------------------------------------------------------------
def _triton_ready():
    return native.triton_available() and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


needs_triton = pytest.mark.skipif(not _triton_ready(),
                                  reason="Triton needs a GPU or TRITON_INTERPRET=1")
# (1, 300, 29): batch 1 split over K; (3, 130, 7): the 16-row tile, split; (20, 70, 9): two
# row tiles, the second part-filled
TRITON_SHAPES = [(1, 37, 29), (1, 300, 29), (3, 130, 7), (2, 5, 140), (20, 70, 9)]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=_ids(TRITON_SHAPES))
def test_triton_gemv_kernels(shape, dtype):
    from fastarch.kernels import sparse_gemv as k

    b, i, o = shape
    x, w, bias = (t.to(_dev()) for t in _make(b, i, o, dtype))
    w_t = w.t().contiguous()
    _close(k.sparse_gemv(x, w_t, bias, 0.6).cpu(),
           sg.sparse_gemv_reference(x, w_t, bias, 0.6).cpu(), dtype)
    idx = torch.randperm(i, device=_dev())[: max(1, i // 2)]
    _close(k.sparse_gemv_index(x, w_t, None, idx).cpu(),
           sg.sparse_gemv_index_reference(x, w_t, None, idx).cpu(), dtype)
    rows = torch.randperm(o, device=_dev())[: max(1, o // 2)]
    _close(k.gather_gemv(x, w, bias, rows).cpu(),
           sg.gather_gemv_reference(x, w, bias, rows).cpu(), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MLP_CASES[:3], ids=lambda c: f"h{c[1]}-i{c[2]}-{c[4]}")
def test_triton_sparse_mlp(case, dtype):
    from fastarch.kernels import sparse_gemv as k

    a = {n: (v.to(_dev()) if isinstance(v, torch.Tensor) else v) for n, v in _mlp(case, dtype).items()}
    inter = a["w_in"].shape[0]
    index = torch.randperm(inter, device=_dev())[: inter // 2]
    got = k.sparse_mlp(a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["b_in"], a["b_up"],
                       a["b_out"], index, 0.05, a["activation"])
    _close(got.cpu(), _mlp_ref(a, index, 0.05).cpu(), dtype)


# ---- CUDA kernels (only with a GPU) ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and native.cuda_built()),
                    reason="needs a GPU and the CUDA kernels built")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backends(backend, dtype, monkeypatch):
    monkeypatch.setenv("FASTARCH_GEMV_CUDA_BACKEND", backend)
    x, w, bias = (t.cuda() for t in _make(3, 1000, 777, dtype))
    w_t = w.t().contiguous()
    _close(fastarch.sparse_gemv(x, w_t, bias, 0.5), sg.sparse_gemv_reference(x, w_t, bias, 0.5), dtype)
    idx = torch.randperm(1000, device="cuda")[:300]
    _close(fastarch.sparse_gemv_index(x, w_t, idx, bias),
           sg.sparse_gemv_index_reference(x, w_t, bias, idx), dtype)
    _close(fastarch.gather_gemv(x, w, idx, bias), sg.gather_gemv_reference(x, w, bias, idx), dtype)
    a = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in _mlp(MLP_CASES[0], dtype).items()}
    _close(fastarch.sparse_mlp(a["x"], a["w_in"], a["w_out_t"], w_up=a["w_up"], threshold=0.05),
           _mlp_ref(a, None, 0.05), dtype)


@needs_triton
@pytest.mark.parametrize("cfg", [dict(split=1), dict(split=3, block_k=32), dict(block_b=16),
                                 dict(block_n=32, num_warps=2)], ids=str)
def test_triton_launch_shapes_agree(cfg, monkeypatch):
    # every launch shape the GPU bench sweeps computes the same product
    from fastarch.kernels import sparse_gemv as k

    monkeypatch.setattr(k, "TUNE", {**k.TUNE, **cfg})
    x, w, bias = (t.to(_dev()) for t in _make(2, 200, 40, torch.float32))
    w_t = w.t().contiguous()
    _close(k.sparse_gemv(x, w_t, bias, 0.4).cpu(),
           sg.sparse_gemv_reference(x, w_t, bias, 0.4).cpu(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_batch_hand_over_matches_reference(dtype):
    # the GPU op's dense hand-over (above GPU_DENSE_ABOVE rows) is plain torch: run it on CPU.
    # Channels just above the threshold, which rounds to them in x's dtype: kept, as by the
    # reference (the test is in fp32), and weighted heavily so that dropping them shows
    b = sg.GPU_DENSE_ABOVE + 1
    x, w, bias = _make(b, 40, 9, dtype)
    x[:, :8] = torch.tensor(0.05, dtype=dtype)
    w[:, :8] = 1.0
    t = float(x[0, 0]) - 1e-6
    w_t = w.t().contiguous()
    _close(sg._sparse_gemv_cuda(x, w_t, bias, t), sg.sparse_gemv_reference(x, w_t, bias, t), dtype)
    idx = torch.tensor([3, 7, 7, 39, 0])
    _close(sg._sparse_gemv_index_cuda(x, w_t, bias, idx),
           sg.sparse_gemv_index_reference(x, w_t, bias, idx), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_wide_batches_go_to_cublas(dtype):
    # above GPU_DENSE_ABOVE rows the op hands the (masked) product to cuBLAS: same results,
    # a channel listed twice in the index counting twice
    b = sg.GPU_DENSE_ABOVE + 3
    x, w, bias = (t.cuda() for t in _make(b, 300, 130, dtype))
    w_t = w.t().contiguous()
    _close(fastarch.sparse_gemv(x, w_t, bias, 0.5), sg.sparse_gemv_reference(x, w_t, bias, 0.5),
           dtype)
    idx = torch.tensor([3, 7, 7, 299, 0], device="cuda")
    _close(fastarch.sparse_gemv_index(x, w_t, idx, bias),
           sg.sparse_gemv_index_reference(x, w_t, bias, idx), dtype)


# ---- opcheck, autograd, compile -------------------------------------------------------------------
def _opcheck_samples():
    x, w, bias = _make(2, 24, 10, torch.float32)
    w_t = w.t().contiguous()
    idx = torch.tensor([0, 3, 7, 23])
    a = _mlp(MLP_CASES[2], torch.float32)
    return [
        ("sparse_gemv", (x, w_t, bias, 0.3)),
        ("sparse_gemv", (x, w_t, None, 0.0)),
        ("sparse_gemv_index", (x, w_t, bias, idx)),
        ("gather_gemv", (x, w, bias, idx[:3])),
        ("sparse_mlp", (a["x"], a["w_in"], a["w_up"], a["w_out_t"], a["b_in"], a["b_up"],
                        a["b_out"], torch.tensor([0, 5, 9]), 0.01, a["activation"])),
        ("sparse_mlp", (a["x"], a["w_in"], None, a["w_out_t"], None, None, None, None, 0.0, "silu")),
    ]


@pytest.mark.parametrize("name,args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(name, args, grad):
    if grad:
        args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(getattr(torch.ops.fastarch, name).default, args)


def test_backward_matches_reference():
    x, w, bias = _make(3, 20, 7, torch.float32)
    w_t = w.t().contiguous()
    leaves = [t.clone().requires_grad_(True) for t in (x, w_t, bias)]
    fastarch.sparse_gemv(*leaves[:2], leaves[2], 0.4).square().sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, w_t, bias)]
    sg.sparse_gemv_reference(*ref, 0.4).square().sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad)


class _TinySparseMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(64, 32) / 6)
        self.w_up = torch.nn.Parameter(torch.randn(64, 32) / 6)
        self.w_out_t = torch.nn.Parameter(torch.randn(64, 32) / 8)
        self.w_t = torch.nn.Parameter(torch.randn(32, 32) / 6)
        self.register_buffer("core", torch.arange(0, 64, 2))

    def forward(self, x):
        h = fastarch.sparse_gemv(x, self.w_t, None, 0.1)
        return h + fastarch.sparse_mlp(x, self.w_in, self.w_out_t, w_up=self.w_up,
                                       neuron_index=self.core, activation="silu")


def test_compile_fullgraph_no_break():
    m = _TinySparseMLP()
    x = torch.randn(1, 32)
    with torch.no_grad():
        eager = m(x)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(m)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(m, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(x), eager)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    x, w, bias = _make(2, 8, 4, torch.float32)
    w_t = w.t().contiguous()
    with pytest.raises(ValueError, match="threshold"):
        fastarch.sparse_gemv(x, w_t, bias, -0.1)
    with pytest.raises(ValueError, match="threshold"):
        fastarch.sparse_gemv(x, w_t, bias, float("nan"))
    with pytest.raises(TypeError, match="w_t"):
        fastarch.sparse_gemv(x, w_t.double(), bias)
    with pytest.raises(TypeError, match="x"):
        fastarch.sparse_gemv(x.long(), w_t)
    with pytest.raises(ValueError, match="x must have 8 features"):
        fastarch.sparse_gemv(torch.randn(2, 9), w_t)
    with pytest.raises(ValueError, match="bias"):
        fastarch.sparse_gemv(x, w_t, torch.randn(5))
    with pytest.raises(TypeError, match="bias"):
        fastarch.sparse_gemv(x, w_t, bias.half())
    with pytest.raises(ValueError, match="index"):
        fastarch.sparse_gemv_index(x, w_t, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="index"):
        fastarch.sparse_gemv_index(x, w_t, torch.tensor([-1]))
    with pytest.raises(TypeError, match="index"):
        fastarch.gather_gemv(x, w, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index"):
        fastarch.gather_gemv(x, w, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="activation"):
        fastarch.sparse_mlp(x, torch.randn(6, 8), torch.randn(6, 8), activation="tanh")
    with pytest.raises(ValueError, match="w_out_t"):
        fastarch.sparse_mlp(x, torch.randn(6, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="neuron_index"):
        fastarch.sparse_mlp(x, torch.randn(6, 8), torch.randn(6, 8), neuron_index=torch.tensor([6]))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="w_t"):
            fastarch.sparse_gemv(x, w_t.cuda())


def test_zero_input_features_give_the_bias():
    # in_features = 0: every output is its bias (reshape(-1, 0) used to fail on such inputs)
    x, b = torch.randn(3, 0), torch.randn(5)
    want = b.expand(3, 5)
    torch.testing.assert_close(fastarch.sparse_gemv(x, torch.randn(0, 5), b, 0.0), want)
    torch.testing.assert_close(
        fastarch.sparse_gemv_index(x, torch.randn(0, 5), torch.empty(0, dtype=torch.long), b), want)
    torch.testing.assert_close(fastarch.gather_gemv(x, torch.randn(5, 0), torch.tensor([4, 1]), b),
                               b[[4, 1]].expand(3, 2))
    torch.testing.assert_close(fastarch.sparse_mlp(x, torch.randn(4, 0), torch.randn(4, 5)),
                               torch.zeros(3, 5))


@needs_cpp
def test_cpp_checks_guard_direct_op_calls():
    # The raw op (no Python wrapper) must refuse out-of-range indices, never read out of bounds.
    x, w, _ = _make(1, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastarch.sparse_gemv_index(x, w.t().contiguous(), None, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastarch.gather_gemv(x, w, None, torch.tensor([4]))
    # float64 (which the wrappers refuse) went through float-only loads and gave garbage
    xd, wd = x.double(), w.double()
    idx = torch.tensor([0, 2])
    for call in (lambda: torch.ops.fastarch.sparse_gemv(xd.expand(2, 8), wd.t().contiguous(), None, 0.0),
                 lambda: torch.ops.fastarch.sparse_gemv_index(xd, wd.t().contiguous(), None, idx),
                 lambda: torch.ops.fastarch.gather_gemv(xd, wd, None, idx),
                 lambda: torch.ops.fastarch.sparse_mlp(xd, wd, None, wd, None, None, None, idx,
                                                       0.0, "silu")):
        with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
            call()
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.fastarch.sparse_gemv(x, w.t().contiguous(), None, -1.0)


def test_reference_fallback_without_native_build():
    # With the native extension disabled the ops still work, through the reference, with a warning.
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastarch\n"
        "    from fastarch.ops import sparse_gemv as sg\n"
        "    x = torch.randn(2, 16); w_t = torch.randn(16, 4)\n"
        "    y = fastarch.sparse_gemv(x, w_t, None, 0.5)\n"
        "    assert torch.allclose(y, sg.sparse_gemv_reference(x, w_t, None, 0.5))\n"
        "msgs = [str(r.message) for r in rec]\n"
        "assert any('could not be loaded' in m or 'disabled' in m for m in msgs) or any('reference' in m for m in msgs), msgs\n"
        "assert fastarch.native.native_loaded() is False\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTARCH_DISABLE_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 5, 13], ids=lambda b: f"B{b}")
def test_sparse_gemv_index_propagates_nan_and_inf(batch, dtype):
    # the index form has no threshold test: a NaN or inf coefficient must reach its output row
    # (the bf16 paths round coefficients to bf16 without c10's NaN branch)
    x, w, _ = _make(batch, 64, 70, dtype, seed=3)
    w_t = fastarch.prepare_input_major(w)
    x[batch - 1, 5] = float("nan")
    if batch > 1:
        x[0, 9] = float("inf")
    idx = torch.arange(64)
    got = fastarch.sparse_gemv_index(x, w_t, idx, None).float()
    assert torch.isnan(got[batch - 1]).all()
    if batch > 1:
        assert not torch.isfinite(got[0]).any()
        assert torch.isfinite(got[1:batch - 1]).all()
