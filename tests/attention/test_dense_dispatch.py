"""BlockSparseAttention sends plain causal / full attention to SDPA where SDPA is the faster
dense path (thresholds lowered here so that small inputs take it); results equal the kernel."""
import os

import pytest
import torch

from fastarch.attention import BlockSparseAttention, create_block_mask
from fastarch.attention import masks as M
from fastarch.attention import module as module_mod
from fastarch.ops.block_sparse_attention import block_sparse_attention


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(module_mod, "SDPA_DENSE_MIN_LEN", 64)
    monkeypatch.setattr(module_mod, "SDPA_DENSE_MIN_HEAD_DIM", 64)


@pytest.mark.parametrize("variant,lq,lk,dispatched", [
    ("causal", 100, 100, True),
    ("full", 100, 130, True),
    ("causal", 70, 130, False),  # bottom-right causal: SDPA aligns top-left, stays on the kernel
    ("sliding_window:32", 100, 100, False),
])
def test_dense_dispatch(small_thresholds, variant, lq, lk, dispatched):
    torch.manual_seed(0)
    q = torch.randn(2, 4, lq, 64)
    k = torch.randn(2, 2, lk, 64)
    v = torch.randn(2, 2, lk, 64)
    attn = BlockSparseAttention(variant, block_size=32)
    before = dict(module_mod.STATS)
    out = attn(q, k, v, scale=0.2)
    assert (module_mod.STATS["sdpa"] - before["sdpa"] == 1) == dispatched
    bm = create_block_mask(attn.mask, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=32)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, bm, scale=0.2), atol=2e-5,
                               rtol=2e-5)


def test_no_dispatch_below_thresholds_or_with_mods(small_thresholds, monkeypatch):
    monkeypatch.setattr(module_mod, "_CPU_AMX", False)
    q = torch.randn(1, 2, 100, 64)
    before = dict(module_mod.STATS)
    BlockSparseAttention("causal", softcap=5.0)(q, q, q)
    BlockSparseAttention("causal")(q.bfloat16(), q.bfloat16(), q.bfloat16())
    BlockSparseAttention("causal")(q[..., :32].contiguous(), q[..., :32].contiguous(),
                                   q[..., :32].contiguous())
    assert module_mod.STATS["sdpa"] == before["sdpa"]
    assert module_mod.STATS["kernel"] == before["kernel"] + 3


@pytest.mark.parametrize("variant,dtype,capability,hkv,d,grouped,dispatched", [
    ("causal", torch.float32, "AVX512", 4, 64, True, True),   # the last query sees every key
    ("full", torch.float32, "AVX512", 4, 64, True, True),
    ("causal", torch.float32, "AVX512", 2, 64, True, False),  # GQA: the grouped decode is ahead
    ("causal", torch.float32, "AVX512", 2, 64, False, True),  # a build without it: SDPA
    ("causal", torch.float32, "AVX512", 2, 72, True, True),   # a D it does not take: SDPA
    ("causal", torch.bfloat16, "AVX512", 4, 64, True, False),  # bf16 decode: the kernel was faster
    ("causal", torch.float32, "AVX2", 4, 64, True, False),     # parity measured there
    # one query's window is the cache's last keys: SDPA over that slice
    ("sliding_window:32", torch.float32, "AVX512", 4, 64, True, True),
    ("sliding_window:77", torch.float32, "AVX512", 4, 64, True, True),  # covers the 77 keys
    ("sliding_window:76", torch.float32, "AVX512", 4, 64, True, True),  # one key short
    ("local:5", torch.float32, "AVX512", 4, 64, True, True),  # nothing right of the last key
    ("sliding_window:32", torch.float32, "AVX512", 2, 64, True, True),  # GQA over 32 keys
    ("sliding_window:70", torch.float32, "AVX512", 2, 64, True, False),  # 70: the kernel's
    ("sliding_window:32", torch.float32, "AVX2", 4, 64, True, False),
    ("prefix_lm:8", torch.float32, "AVX512", 4, 64, True, True),  # a prefix before the query
    # a window and a prefix apart: two runs of keys, the kernel; or the window reaching it
    (M.MaskSpec("w40p8", window_left=40, window_right=0, prefix_len=8), torch.float32, "AVX512",
     4, 64, True, False),
    (M.MaskSpec("w70p8", window_left=70, window_right=0, prefix_len=8), torch.float32, "AVX512",
     4, 64, True, True),
    ("strided:8", torch.float32, "AVX512", 4, 64, True, False),  # a predicate: the kernel
])
def test_decode_dispatch(monkeypatch, variant, dtype, capability, hkv, d, grouped, dispatched):
    monkeypatch.setattr(module_mod, "_CPU_CAPABILITY", capability)
    monkeypatch.setattr(module_mod, "_CPU_AMX", False)
    monkeypatch.setattr(module_mod, "_CPU_GROUPED_DECODE", grouped)
    monkeypatch.setattr(module_mod, "GQA_DECODE_KERNEL_FROM", 64)  # (77 keys here)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, d, dtype=dtype)
    k = torch.randn(2, hkv, 77, d, dtype=dtype)
    v = torch.randn(2, hkv, 77, d, dtype=dtype)
    attn = BlockSparseAttention(variant, block_size=32)
    before = dict(module_mod.STATS)
    out = attn(q, k, v, scale=0.2)
    assert (module_mod.STATS["sdpa"] - before["sdpa"] == 1) == dispatched
    bm = create_block_mask(attn.mask, q_len=1, kv_len=77, q_offset=76, block_size=32)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, bm, scale=0.2), atol=tol,
                               rtol=tol)


@pytest.mark.parametrize("variant,dtype,lq,lk,dispatched", [
    ("causal", torch.bfloat16, 1, 77, True),     # GQA decode over a short cache: SDPA
    ("causal", torch.bfloat16, 100, 100, True),  # prefill, below the fp32 thresholds
    ("full", torch.bfloat16, 100, 130, True),
    ("causal", torch.bfloat16, 70, 130, False),  # bottom-right causal stays on the kernel
    ("sliding_window:32", torch.bfloat16, 100, 100, False),
    ("causal", torch.float16, 100, 100, False),  # fp16 is not on AMX here
    ("causal", torch.float32, 100, 100, False),
    ("causal", torch.bfloat16, 512, 512, False),  # longer causal prefill: the kernel is ahead
    ("causal", torch.bfloat16, 511, 511, True),
    ("full", torch.bfloat16, 1023, 1023, True),  # shorter full attention stays on SDPA
    ("full", torch.bfloat16, 1024, 1024, False),  # and longer goes to the kernel
    ("causal", torch.bfloat16, 1, 1500, True),   # likewise
    ("causal", torch.bfloat16, 1, 8192, False),  # over a long one: the kernel's grouped decode
    ("sliding_window:1024", torch.bfloat16, 1, 1500, True),  # SDPA over the window's keys
    ("sliding_window:1024", torch.bfloat16, 1, 9000, True),
    ("sliding_window:8192", torch.bfloat16, 1, 9000, False),  # a window as long: the kernel
])
def test_amx_dispatch(monkeypatch, variant, dtype, lq, lk, dispatched):
    """On CPUs whose bf16 attention tiles run on AMX, SDPA's own AMX kernel is the faster dense
    bf16 path for decode without GQA (test_amx_mha_decode_dispatch), causal prefill below SDPA_AMX_CAUSAL_KERNEL_FROM tokens and full
    attention below SDPA_AMX_FULL_KERNEL_FROM; longer prefill stays on the kernel."""
    monkeypatch.setattr(module_mod, "_CPU_AMX", True)
    monkeypatch.setattr(module_mod, "_CPU_CAPABILITY", "AVX512")
    monkeypatch.setattr(module_mod, "_CPU_GROUPED_DECODE", True)
    torch.manual_seed(0)
    q = torch.randn(1, 4, lq, 64, dtype=dtype)
    k = torch.randn(1, 2, lk, 64, dtype=dtype)
    v = torch.randn(1, 2, lk, 64, dtype=dtype)
    attn = BlockSparseAttention(variant, block_size=32)
    before = dict(module_mod.STATS)
    out = attn(q, k, v, scale=0.2)
    assert (module_mod.STATS["sdpa"] - before["sdpa"] == 1) == dispatched
    bm = create_block_mask(attn.mask, q_len=lq, kv_len=lk, q_offset=lk - lq, block_size=32)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, bm, scale=0.2), atol=tol,
                               rtol=tol)


@pytest.mark.parametrize("hkv,grouped,lk,dispatched", [
    (4, True, 300, True), (2, True, 300, False), (1, True, 300, False),
    (2, False, 300, True),  # a build without the grouped decode: GQA decode to SDPA too
    (2, True, 200, True),   # a cache below GQA_DECODE_KERNEL_FROM (250 here): SDPA
])
def test_amx_mha_decode_dispatch(monkeypatch, hkv, grouped, lk, dispatched):
    monkeypatch.setattr(module_mod, "_CPU_AMX", True)
    monkeypatch.setattr(module_mod, "_CPU_GROUPED_DECODE", grouped)
    monkeypatch.setattr(module_mod, "GQA_DECODE_KERNEL_FROM", 250)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, lk, 64, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, lk, 64, dtype=torch.bfloat16)
    attn = BlockSparseAttention("causal", block_size=32)
    before = dict(module_mod.STATS)
    out = attn(q, k, v)
    assert (module_mod.STATS["sdpa"] - before["sdpa"] == 1) == dispatched
    bm = create_block_mask(attn.mask, q_len=1, kv_len=lk, q_offset=lk - 1, block_size=32)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, bm), atol=2e-2, rtol=2e-2)


def test_amx_flag_matches_the_build():
    from fastarch import native
    assert module_mod._CPU_AMX == native.cpu_attention_amx()
    # the grouped decode is built with AVX-512, as cpu_capability reports the build's ISA, and
    # FASTARCH_ATTN_DECODE_GROUP=0 turns it off
    built = native.cpu_capability() == "avx512"
    on = os.environ.get("FASTARCH_ATTN_DECODE_GROUP", "1")[:1] != "0"
    assert module_mod._CPU_GROUPED_DECODE == (built and on)
    assert ("grouped decode" in native.cpu_attention_paths()) == (built and on)
    assert module_mod._CPU_AMX == ("bf16 amx" in native.cpu_attention_paths())


def test_module_keeps_its_last_decision_per_shapes(monkeypatch):
    """A second call with the same shapes reuses the routing and op arguments (a model's layers
    in a row); other shapes, another mask or scale decide again; results stay right."""
    torch.manual_seed(0)
    attn = BlockSparseAttention("sliding_window:40", block_size=32)
    decided = []
    real = BlockSparseAttention._decide

    def spy(self, *a):
        decided.append(a[0].shape[2])
        return real(self, *a)

    monkeypatch.setattr(BlockSparseAttention, "_decide", spy)
    calls = [(70, 0.2), (70, 0.2), (1, 0.2), (70, 0.2), (70, 0.3)]
    for lq, scale in calls:
        q = torch.randn(1, 4, lq, 64)
        k = torch.randn(1, 2, 90, 64)
        v = torch.randn(1, 2, 90, 64)
        bm = create_block_mask(attn.mask, q_len=lq, kv_len=90, q_offset=90 - lq, block_size=32)
        torch.testing.assert_close(attn(q, k, v, scale=scale),
                                   block_sparse_attention(q, k, v, bm, scale=scale),
                                   atol=2e-5, rtol=2e-5)
    assert decided == [70, 1, 70, 70]  # the second call was a hit
    attn.mask = module_mod.resolve_variant("causal")  # another mask: decided again
    q = torch.randn(1, 4, 70, 64)
    k = torch.randn(1, 2, 90, 64)
    out = attn(q, k, k, scale=0.3)
    bm = create_block_mask(attn.mask, q_len=70, kv_len=90, q_offset=20, block_size=32)
    torch.testing.assert_close(out, block_sparse_attention(q, k, k, bm, scale=0.3), atol=2e-5,
                               rtol=2e-5)
    assert len(decided) == 5


@pytest.mark.parametrize("variant,hkv,mask_heads,dtype", [
    ("causal", 4, 1, torch.float32),
    ("causal", 2, 1, torch.float32),            # GQA: the group's heads packed as rows
    ("causal", 2, 4, torch.float32),            # a per-head mask, packed with them
    ("sliding_window:30", 2, 1, torch.float32),  # the window's slice of keys and of the mask
    ("sliding_window:30", 1, 4, torch.bfloat16),
    ("local:10", 4, 1, torch.bfloat16),
])
def test_decode_with_a_padding_mask_goes_to_sdpa(monkeypatch, variant, hkv, mask_heads, dtype):
    """One decode query with a padding mask (a batch's generate) takes SDPA with the mask where
    plain decode does; the result is the kernel's, rows that see nothing give zeros."""
    monkeypatch.setattr(module_mod, "_CPU_CAPABILITY", "AVX512")
    monkeypatch.setattr(module_mod, "_CPU_AMX", dtype == torch.bfloat16)
    monkeypatch.setattr(module_mod, "GQA_DECODE_KERNEL_FROM", 10 ** 6)
    torch.manual_seed(1)
    b, lk = 3, 77
    q = torch.randn(b, 4, 1, 64, dtype=dtype)
    k = torch.randn(b, hkv, lk, 64, dtype=dtype)
    v = torch.randn(b, hkv, lk, 64, dtype=dtype)
    mask = torch.rand(b, mask_heads, 1, lk) > 0.3
    mask[0, :, :, :50] = False  # left padding
    mask[1, 0] = False  # a row that sees nothing
    attn = BlockSparseAttention(variant, block_size=32)
    before = dict(module_mod.STATS)
    out = attn(q, k, v, scale=0.2, attn_mask=mask)
    assert module_mod.STATS["sdpa"] - before["sdpa"] == 1
    want = block_sparse_attention(q, k, v, attn.block_mask(q, k, mask), scale=0.2)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    out2 = attn(q, k, v, scale=0.2, attn_mask=~mask)  # a kept route, the new mask's contents
    want2 = block_sparse_attention(q, k, v, attn.block_mask(q, k, ~mask), scale=0.2)
    torch.testing.assert_close(out2, want2, atol=tol, rtol=tol)
