"""The CPU forward's prefill path (K^T transposed once, register-blocked products, AVX2 softmax
rows) against the fp32 reference: tails of every size (rows not a multiple of 6, columns not a
multiple of 16 or 8), each head dim it takes, several tiles and runs of tiles, each dtype. On CPUs
with AVX512-BF16, bf16 with a block that is a multiple of 16 takes the bf16 pair products (K / V
regrouped into pairs, odd key counts padded) and the other blocks the fp32 tiles. Where the CPU
has AMX, the bf16 pair products run on its tiles through oneDNN's brgemm, and fp32 tiles take
brgemm where it measures faster than the AVX2 kernel; each of these switches is also forced in a
process of its own (test_forced_tile_products), so every kernel this CPU has is checked."""
import math
import os
import subprocess
import sys

import pytest
import torch

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
    BlockMask,
    block_sparse_attention,
    block_sparse_attention_reference,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
MASKS = {"causal": causal(), "full": full(), "window": sliding_window(45, 3),
         "doc-causal": and_masks(causal(), document(lengths=[77, 3, 120])),
         "fixed": fixed(24, 3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("lq,lk,block", [(200, 200, 16), (129, 129, 32), (77, 200, 64),
                                         (13, 37, 8), (200, 200, 24)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_prefill_against_reference(mask, lq, lk, block, d, dtype):
    torch.manual_seed(lq + d)
    q = torch.randn(1, 4, lq, d, dtype=dtype)
    k = torch.randn(1, 2, lk, d, dtype=dtype)
    v = torch.randn(1, 2, lk, d, dtype=dtype)
    bm = create_block_mask(MASKS[mask], q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=block)
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(
        q, k, v, *bm.op_args(), None, None, block, bm.q_offset, bm.window_left, bm.window_right,
        bm.prefix_len, 1 / math.sqrt(d), 0.0)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_strided_kv_layout():
    """(B, L, H, D) memory viewed as (B, H, L, D), as Hugging Face hands it over."""
    q, k, v = (torch.randn(2, 150, 4, 64).transpose(1, 2) for _ in range(3))
    bm = create_block_mask(causal(), q_len=150, block_size=32)
    ref, _ = block_sparse_attention_reference(q, k, v, *bm.op_args(), None, None, 32, 0, -1, 0,
                                              0, 0.125, 0.0)
    torch.testing.assert_close(block_sparse_attention(q, k, v, bm, scale=0.125), ref,
                               atol=2e-5, rtol=2e-5)


_BF16_FP32_TILES = """
import math, torch
from fastarch.attention import causal, create_block_mask
from fastarch.ops.block_sparse_attention import (block_sparse_attention,
                                                 block_sparse_attention_reference)
for lq, d in ((129, 64), (200, 128)):
    torch.manual_seed(lq)
    q, k, v = (torch.randn(1, 2, lq, d, dtype=torch.bfloat16) for _ in range(3))
    bm = create_block_mask(causal(), q_len=lq, block_size=32)
    ref, _ = block_sparse_attention_reference(q, k, v, *bm.op_args(), None, None, 32, 0, -1, 0,
                                              0, 1 / math.sqrt(d), 0.0)
    torch.testing.assert_close(block_sparse_attention(q, k, v, bm).float(), ref.float(),
                               atol=2e-2, rtol=2e-2)
print("ok")
"""


def _run_script(script, timeout, **switches):
    """stdout of script, run in a process of its own with these environment switches (the
    kernels read theirs once per process); a switch given as None is removed, so that the run
    takes the default whatever the caller's environment holds."""
    env = dict(os.environ)
    for name, value in switches.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bf16_without_pair_products():
    # the switch is read once per process: the fp32-tile bf16 path runs in its own process
    stdout = _run_script(_BF16_FP32_TILES, 300, FASTARCH_ATTN_BF16_DOT="0")
    assert stdout.strip().endswith("ok")


_FORCED = """
import math, torch
from fastarch import native
from fastarch.attention import and_masks, causal, create_block_mask, document, sliding_window
from fastarch.ops.block_sparse_attention import (block_sparse_attention,
                                                 block_sparse_attention_reference)
print(native.cpu_attention_paths())
torch.set_num_threads(2)  # 2 kv heads: the bf16 pairs per head where threads divide them
tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
masks = [causal(), sliding_window(45, 3), and_masks(causal(), document(lengths=[77, 3, 120]))]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for d in (64, 80, 128):
        for lq, lk, block in ((200, 200, 16), (129, 129, 32), (77, 200, 64), (180, 200, 128)):
            for mi, mask in enumerate(masks):
                torch.manual_seed(lq + d + mi)
                q = torch.randn(1, 4, lq, d, dtype=dtype)
                k, v = (torch.randn(1, 2, lk, d, dtype=dtype) for _ in range(2))
                bm = create_block_mask(mask, q_len=lq, kv_len=lk, q_offset=lk - lq,
                                       block_size=block)
                # scale 1 (no multiply), and a softcap (the AMX scores are scaled before it)
                for scale, cap in ((None, 0.0), (1.0, 0.0), (None, 20.0)):
                    out, lse = block_sparse_attention(q, k, v, bm, scale=scale, softcap=cap,
                                                      return_lse=True)
                    # float64 reference: an fp32 one (MKL's sgemm) varies between runs with
                    # its buffers' alignment, by more than this tolerance at times
                    ref, ref_lse = block_sparse_attention_reference(
                        q.double(), k.double(), v.double(), *bm.op_args(), None, None, block,
                        bm.q_offset, bm.window_left, bm.window_right, bm.prefix_len,
                        scale or 1 / math.sqrt(d), cap)
                    t = tol[dtype]
                    torch.testing.assert_close(out.double(), ref, atol=t, rtol=t)
                    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("env", [{"FASTARCH_ATTN_AMX": "0"}, {"FASTARCH_ATTN_BRGEMM": "0"},
                                 {"FASTARCH_ATTN_BRGEMM": "1"},
                                 {"FASTARCH_ATTN_PAIRS_PER_HEAD": "0"},
                                 {"FASTARCH_ATTN_GUESSED_REF": "0"}, {}],
                         ids=["no-amx", "no-brgemm", "brgemm", "call-wide-pairs", "row-max-ref",
                              "default"])
def test_forced_tile_products(env):
    stdout = _run_script(_FORCED, 600, **env)
    lines = stdout.split()
    assert lines[-1] == "ok", stdout[-2000:]
    paths = stdout.splitlines()[0]
    if env.get("FASTARCH_ATTN_AMX") == "0":
        assert "amx" not in paths, paths
    if env.get("FASTARCH_ATTN_BRGEMM") == "0":
        assert "fp32 brgemm" not in paths, paths


_LIVE = r"""
import math, sys, torch
from fastarch.attention import MaskSpec, and_masks, create_block_mask, document, sliding_window
from fastarch.ops.block_sparse_attention import (block_sparse_attention,
                                                 block_sparse_attention_reference)
tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# windows whose rows span full and partial tiles: left only, left and right, with documents,
# with a 4-key sink (a prefix inside the first run only), and a prefix-LM whose prefix is longer
# than one run
masks = {"window255": sliding_window(255), "window100-30": sliding_window(100, 30),
         "window-doc": and_masks(sliding_window(200), document(lengths=[500, 37, 563])),
         "sink4-window90": MaskSpec("sink", window_left=90, window_right=0, prefix_len=4),
         "prefix-lm700": MaskSpec("plm", window_right=0, prefix_len=700)}
for dtype in (torch.float32, torch.bfloat16):
    for name, mask in masks.items():
        for lq, lk, block in ((1100, 1100, 64), (333, 1100, 64), (1100, 1100, 32)):
            torch.manual_seed(lq + block)
            q = torch.randn(1, 2, lq, 64, dtype=dtype)
            k, v = (torch.randn(1, 2, lk, 64, dtype=dtype) for _ in range(2))
            bm = create_block_mask(mask, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=block)
            out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
            ref, ref_lse = block_sparse_attention_reference(
                q.double(), k.double(), v.double(), *bm.op_args(), None, None, block,
                bm.q_offset, bm.window_left, bm.window_right, bm.prefix_len, 1 / math.sqrt(64), 0.0)
            t = tol[dtype]
            torch.testing.assert_close(out.double(), ref, atol=t, rtol=t, msg=f"{name} {dtype} {lq}")
            torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("run_keys", ["", "64", "1024"], ids=["default", "runs64", "runs1024"])
def test_window_rows_over_long_runs(run_keys):
    """Rows of windowed masks compute the max and exp over their live columns only (the window,
    widened to the run's full tiles, unless a prefix lies inside the run); runs of up to 512
    keys on AMX, 256 elsewhere, and forced to 64 / 1024 keys (FASTARCH_ATTN_RUN_KEYS)."""
    stdout = _run_script(_LIVE, 600, FASTARCH_ATTN_RUN_KEYS=run_keys or None)
    assert stdout.split()[-1] == "ok", stdout[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_window_with_full_tiles_outside_it(dtype):
    """A hand-made block mask whose full tiles lie outside the window: each query tile lists its
    own and the previous tile as partial (the 40-key window) and the tile before those as full
    (every key allowed, a global block). A row's live columns then reach from the full tile to
    the row, and the partial tile between must still be masked to the window."""
    bs, qt = 64, 10
    lq = lk = bs * qt
    ts = torch.arange(qt)
    num = torch.where(ts > 0, 2, 1).to(torch.int32)
    idx = torch.stack([(ts - 1).clamp(min=0), ts], -1).to(torch.int32)
    idx[0] = torch.tensor([0, 0])
    fnum = (ts >= 2).to(torch.int32)
    fidx = (ts - 2).clamp(min=0).to(torch.int32).unsqueeze(-1)
    bm = BlockMask(num.view(1, 1, qt), idx.view(1, 1, qt, 2), fnum.view(1, 1, qt),
                   fidx.view(1, 1, qt, 1), block_size=bs, q_len=lq, kv_len=lk,
                   window_left=40, window_right=0)
    torch.manual_seed(0)
    q = torch.randn(1, 2, lq, 64, dtype=dtype)
    k, v = (torch.randn(1, 2, lk, 64, dtype=dtype) for _ in range(2))
    out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(
        q.double(), k.double(), v.double(), *bm.op_args(), None, None, bs, bm.q_offset,
        bm.window_left, bm.window_right, bm.prefix_len, 1 / math.sqrt(64), 0.0)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def _on_two_threads(fn, *args):
    """fn(*args) with 2 intra-op threads, the count the per-head pair path is chosen by here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("block", [16, 48, 80, 112])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (3, 3)], ids=["mha4", "gqa8-2", "mha3"])
def test_bf16_pairs_per_head_read_only_their_own_tiles(heads, block):
    """bf16 pairs regrouped per (batch, kv head) by the thread that attends it, tile by tile as
    its query tiles first need them: a thread's buffers still hold the previous head's tiles
    past those. With blocks of an odd multiple of 16 keys the AMX products pad a run to 32 keys
    and so read into the tile after it. Head 0's V is infinite, and no other head may see it
    (0 * inf would be NaN). 3 kv heads over 2 threads take the call-wide regrouping instead."""
    hq, hkv = heads
    lq = lk = 200
    torch.manual_seed(hq)
    q = torch.randn(1, hq, lq, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, lk, 64, dtype=torch.bfloat16) for _ in range(2))
    v[:, 0] = float("inf")
    bm = create_block_mask(causal(), q_len=lq, kv_len=lk, block_size=block)
    out = _on_two_threads(block_sparse_attention, q, k, v, bm)
    ref, _ = block_sparse_attention_reference(
        q.double(), k.double(), v.double(), *bm.op_args(), None, None, block, bm.q_offset,
        bm.window_left, bm.window_right, bm.prefix_len, 1 / math.sqrt(64), 0.0)
    g = hq // hkv
    torch.testing.assert_close(out[:, g:].double(), ref[:, g:], atol=2e-2, rtol=2e-2)


def test_bf16_window_over_long_keys_samples_rows():
    """17000 keys at D=128: a head's bf16 pairs (8.3 MiB) are over what a thread keeps between
    calls, so they take the per-call buffers. Sampled rows against their window in fp64."""
    torch.manual_seed(0)
    lq = lk = 17000
    d, w = 128, 255
    q = torch.randn(1, 2, lq, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, lk, d, dtype=torch.bfloat16) for _ in range(2))
    bm = create_block_mask(sliding_window(w), q_len=lq, kv_len=lk, block_size=64)
    out = _on_two_threads(block_sparse_attention, q, k, v, bm)
    rows = torch.cat([torch.randint(0, lq, (40,)), torch.tensor([0, 1, 255, 256, lq - 1])])
    for i in rows.tolist():
        lo = max(0, i - w)
        s = (q[0, :, i].double().unsqueeze(1) @ k[0, :, lo:i + 1].double().transpose(1, 2))
        p = torch.softmax(s / math.sqrt(d), -1)
        ref = (p @ v[0, :, lo:i + 1].double()).squeeze(1)
        torch.testing.assert_close(out[0, :, i].double(), ref, atol=2e-2, rtol=2e-2)


_FAR_ROWS = """
import math, torch
from fastarch.attention import causal, create_block_mask, sliding_window
from fastarch.ops.block_sparse_attention import (block_sparse_attention,
                                                 block_sparse_attention_reference)
torch.set_num_threads(2)
lq = lk = 300
scales = torch.tensor([1.0, 30.0, 0.01, 200.0, 1.0, 5.0])[torch.arange(lq) % 6]
for d, block in ((64, 16), (128, 64)):
    for mask in (causal(), sliding_window(100)):
        torch.manual_seed(d)
        q = (torch.randn(1, 4, lq, d) * scales[:, None]).bfloat16()
        k, v = (torch.randn(1, 2, lk, d) for _ in range(2))
        k[:, :, 250:] *= 8
        k, v = k.bfloat16(), v.bfloat16()
        bm = create_block_mask(mask, q_len=lq, kv_len=lk, block_size=block)
        out, lse = block_sparse_attention(q, k, v, bm, return_lse=True)
        ref, ref_lse = block_sparse_attention_reference(
            q.double(), k.double(), v.double(), *bm.op_args(), None, None, block, bm.q_offset,
            bm.window_left, bm.window_right, bm.prefix_len, 1 / math.sqrt(d), 0.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("run_keys", [None, "64"], ids=["default-runs", "64-key-runs"])
def test_bf16_rows_far_from_their_neighbours(run_keys):
    """The bf16 pair path's exp pass takes the previous row's lse as its reference and redoes
    a row whose sum leaves [2^-40, 2^40]. Here neighbouring rows score on scales 0.01 to 200
    (the guess overflows, or underflows to nothing), and the last keys score high. With runs
    of 64 keys (a switch read once per process) a causal row's later runs outgrow the reference
    of its first. D=128 with 64-row tiles takes the 32-row P V products. Out and lse against
    fp64."""
    stdout = _run_script(_FAR_ROWS, 300, FASTARCH_ATTN_RUN_KEYS=run_keys)
    assert stdout.strip().endswith("ok")
