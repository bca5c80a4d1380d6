"""``BlockSparseAttention``: an nn.Module that runs the block-sparse kernel with a mask variant."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastarch import native
from fastarch.attention import masks as M
from fastarch.attention.block_mask import (
    DEFAULT_BLOCK_SIZE,
    block_mask_from_dense,
    create_block_mask,
)
from fastarch.ops.block_sparse_attention import _call_op, _op_tail

# One object per named variant, so that the block-mask cache hits across layers and calls.
_NAMED = {"causal": M.causal(), "full": M.full()}
# The last dense (padding) mask seen per variant and the block mask built for it.
_LAST_DENSE: dict = {}
# Dense causal / full attention on CPU goes to SDPA where SDPA was measured faster than the
# kernel (bench/bench_attention.py, AMD EPYC AVX2, 2 threads): fp32 with head dim >= 128 from
# 4096 tokens on (1.0-1.26x of SDPA's time there; the kernel ties or wins elsewhere).
SDPA_DENSE_MIN_LEN = 4096
SDPA_DENSE_MIN_HEAD_DIM = 128
SDPA_DENSE_DTYPES = (torch.float32,)
# One fp32 query over the whole cache (decode) with a plain causal / full mask: on CPUs where torch
# runs SDPA with AVX-512 (AMD Zen 4, 2 threads, H=8, D=64/128, 256-4096 keys, interleaved), SDPA
# took 0.40-0.76x of the kernel's time, whose CPU paths are AVX2 only; bf16 decode stays on the
# kernel (SDPA 2.4-5.2x slower there), and AVX2 machines measured parity (0.31 vs 0.32 ms at 1024).
SDPA_DECODE_CAPABILITIES = ("AVX512",)
# Since the kernel's grouped decode (2026-12-07: the query heads of a GQA group stacked into one
# unit, so that each K / V row is read once per group), decode with grouped-query attention stays
# on the kernel on those CPUs and on AMX: Xeon with AMX, 2 threads, one query, plain causal, H=32
# query heads over 8 KV heads, D=64/128, interleaved (/tmp script): kernel / SDPA(enable_gqa)
# 0.52-0.85x in bf16 and 0.33-0.73x in fp32 at 256-4096 keys. With as many KV heads as query
# heads SDPA stays ahead below ~4096 keys (1.04-2.13x bf16, 0.99-1.46x fp32), so those go to it,
# as does GQA decode where the build lacks the grouped decode (_CPU_GROUPED_DECODE: an AVX-512
# build; the per-head decode took 1.2-2.4x of SDPA's time with GQA).
# bf16 on CPUs with AMX (Intel Xeon, 2 threads, 2026-12-03, H=8, D=64/128, interleaved): torch's
# SDPA runs its flash kernel on AMX tiles, and plain causal bf16 took 1.09-1.51x of SDPA's time in
# the kernel (256-4096 tokens), one decode query 2.5-4.4x (256-4096 keys): plain causal / full
# bf16 goes to SDPA there, prefill and decode. 2026-12-07, after the kernel's buffers were put on
# cache lines and its runs lengthened to 512 keys on AMX (same host, B=1, H=8, /tmp script,
# interleaved, two runs): causal prefill kernel / SDPA 1.59-1.70x at 256 tokens, 0.86-0.99x at
# 512, 0.83-0.94x at 1024, 0.79-0.90x at 2048-4096 (D 64 / 128); plain full attention stayed
# behind up to 1024 (1.46-5.1x) and 0.86-0.96x at 2048. Later the same day the kernel stopped
# zeroing a fresh ~480 KiB scratch block per thread and call (runs of two builds alternated, then
# one more): causal 1.05-1.16x at 256 tokens, 0.68-0.82x at 512, 0.74-0.84x at 1024; full
# 1.19-1.31x at 256, 0.89x / 1.06-1.07x at 512 (D 64 / 128), 0.87-0.91x / 0.97-0.98x at 1024,
# 0.81-0.85x / 0.91-0.92x at 2048. So causal prefill from
# SDPA_AMX_CAUSAL_KERNEL_FROM tokens and full attention from SDPA_AMX_FULL_KERNEL_FROM take the
# kernel; shorter prefill and decode stay on SDPA.
SDPA_AMX_DTYPES = (torch.bfloat16,)
SDPA_AMX_CAUSAL_KERNEL_FROM = 512
SDPA_AMX_FULL_KERNEL_FROM = 1024
STATS = {"kernel": 0, "sdpa": 0}


def resolve_variant(variant) -> M.MaskSpec:
    """A :class:`MaskSpec`, or a name: ``"causal"``, ``"full"``, ``"sliding_window:W"`` (causal,
    W keys including the query's own), ``"local:W"`` (bidirectional, W on each side),
    ``"prefix_lm:P"``, ``"strided:S"``, ``"fixed:S"``."""
    if isinstance(variant, M.MaskSpec):
        return variant
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a MaskSpec or a name, got {type(variant).__name__}")
    if variant in _NAMED:
        return _NAMED[variant]
    name, _, arg = variant.partition(":")
    makers = {
        "sliding_window": lambda n: M.sliding_window(n - 1),
        "local": lambda n: M.sliding_window(n, n),
        "prefix_lm": M.prefix_lm,
        "strided": M.strided,
        "fixed": M.fixed,
    }
    if name not in makers or not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"unknown attention variant {variant!r}: use 'causal', 'full', "
                         "'sliding_window:W', 'local:W', 'prefix_lm:P', 'strided:S', 'fixed:S' "
                         "or a fastarch.attention MaskSpec")
    _NAMED[variant] = makers[name](int(arg))
    return _NAMED[variant]


def _torch_cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


_CPU_CAPABILITY = _torch_cpu_capability()  # read once: a plain constant under torch.compile
_CPU_AMX = native.cpu_attention_amx()  # likewise
_CPU_GROUPED_DECODE = native.cpu_attention_grouped_decode()  # (an AVX-512 build)
# the kernel's own conditions for the grouped decode (decode_grouped in the CPU kernel)
GROUPED_DECODE_MAX_ROWS = 64
# In a model, though, the kernel's lead over SDPA shows only from longer caches: each call finds
# K / V and the Python around it out of the caches (the layer's weights pass in between). Decode
# steps of a Llama-shaped model (4 layers, hidden 1024, 16 / 4 heads, D=64, bf16, Xeon with AMX,
# 2 threads, original and copy stepping in turns, /tmp script over bench_attention's
# run_model_decode, two runs each), speed against the original with GQA decode on the kernel at
# every length / on SDPA with the group's heads packed as rows (_run): 1.00x / 1.00-1.01x at
# 2048 tokens, 1.02-1.04x / 1.01-1.02x at 4096, 1.11-1.12x / 1.07x at 8192; at 512-1024 the
# kernel was level (0.99-1.00x). (Before the module kept its last call's routing and block mask
# and the one-tile mask build went to plain ints, the kernel was at 0.97-0.98x at 2048.) So GQA
# decode takes the kernel from this many keys, SDPA below.
GQA_DECODE_KERNEL_FROM = 4096


class BlockSparseAttention(nn.Module):
    """Attention ``(B, Hq, Lq, D) x (B, Hkv, Lk, D) -> (B, Hq, Lq, D)`` restricted to a mask.

    Queries sit at the end of the keys (``q_offset = Lk - Lq``), as in decoding over a KV cache.
    An extra boolean ``attn_mask`` (e.g. padding, shape broadcastable to (B, H, Lq, Lk)) is
    combined with the variant. Plain causal / full attention runs on SDPA where SDPA is faster
    on CPU (``SDPA_DENSE_*`` above: the module is never slower than dense attention).

    Example:
        >>> attn = BlockSparseAttention("sliding_window:256")
        >>> out = attn(q, k, v)
    """

    def __init__(self, variant="causal", *, block_size: int = DEFAULT_BLOCK_SIZE,
                 softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.mask = resolve_variant(variant)
        self.block_size = block_size
        self.softcap = softcap
        self.alibi_slopes = alibi_slopes
        # The last call's shapes and what they decided: the SDPA route or the op's arguments
        # after (q, k, v). A model's layers share the module and call it with the same shapes in
        # a row (a decode step), and in a model each call finds this Python code out of the
        # caches (the layer's weights pass in between): the routing and the block-mask lookup
        # cost 45-60 us there against ~5 us hot (Xeon, /tmp script, a 60 MiB write before
        # each call). A hit skips them.
        self._last = None

    def block_mask(self, q, k, attn_mask: torch.Tensor | None = None):
        b, hq, lq = q.shape[:3]
        lk = k.shape[2]
        spec = self.mask
        if attn_mask is not None and not torch.compiler.is_compiling():
            # A model hands the same mask tensor to every layer: build its block mask once
            # (keyed on identity and the version counter, which in-place writes bump).
            key = (id(attn_mask), attn_mask._version, attn_mask.shape, b, hq, lq, lk,
                   self.block_size, q.device)
            hit = _LAST_DENSE.get(self.mask)
            if hit is not None and hit[0] == key and hit[1] is attn_mask:
                return hit[2]
            bm = self._dense_block_mask(q, k, attn_mask)
            _LAST_DENSE[self.mask] = (key, attn_mask, bm)
            return bm
        if attn_mask is not None:
            return self._dense_block_mask(q, k, attn_mask)
        return create_block_mask(spec, q_len=lq, kv_len=lk, batch=b, heads=hq,
                                 block_size=self.block_size, q_offset=lk - lq, device=q.device)

    def _dense_block_mask(self, q, k, attn_mask):
        b, hq, lq = q.shape[:3]
        lk = k.shape[2]
        dense = M.attn_mask_4d(attn_mask, b, hq, lq, lk)
        spec = self.mask
        if (0 < lq <= self.block_size and lk > 0 and spec.mask_mod is None
                and spec.doc_ids is None and not torch.compiler.is_compiling()):
            # one query tile (decode with a padding mask): by tiles of the dense mask
            return block_mask_from_dense(spec, dense, self.block_size, lk - lq)
        spec = M.and_masks(self.mask, M.from_dense(dense, q_offset=lk - lq))
        return create_block_mask(spec, q_len=lq, kv_len=lk, batch=b, heads=hq,
                                 block_size=self.block_size, q_offset=lk - lq, device=q.device,
                                 cache=False)

    def _sdpa_route(self, q, k, attn_mask) -> tuple[bool, int] | None:
        """``(is_causal, first_key)`` when this call is plain causal / full attention over the
        keys from ``first_key`` on that SDPA runs faster (see SDPA_* above), else None (the
        kernel). One query with a left window sees one contiguous run of keys, the last
        ``window_left + 1``: SDPA over that slice of the cache is the same attention, and with
        an ``attn_mask`` (a batch's padding) SDPA takes the mask's slice too."""
        spec = self.mask
        lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
        cpu = q.device.type == "cpu"
        mods = self.softcap or self.alibi_slopes is not None
        # the descriptor alone (no predicate or documents): a window and a prefix
        windowed = spec.mask_mod is None and spec.doc_ids is None
        amx = q.dtype in SDPA_AMX_DTYPES and _CPU_AMX
        if lq == 1 and lk >= 1 and cpu and not mods and windowed:
            # queries end at the last key (q_offset = lk - lq): the last query sees keys
            # [lk - 1 - window_left, lk - 1], nothing to its right, and the prefix [0, prefix_len)
            first = 0 if spec.window_left < 0 else max(0, lk - 1 - spec.window_left)
            if first <= spec.prefix_len:
                first = 0
            elif spec.prefix_len:
                return None  # two runs of keys
            n = lk - first
            gqa_on_kernel = (q.shape[1] != k.shape[1] and _CPU_GROUPED_DECODE and d % 16 == 0
                             and q.shape[1] // k.shape[1] <= GROUPED_DECODE_MAX_ROWS
                             and n >= GQA_DECODE_KERNEL_FROM)
            if not gqa_on_kernel and (amx or (q.dtype == torch.float32
                                              and _CPU_CAPABILITY in SDPA_DECODE_CAPABILITIES)):
                return False, first
            return None
        # a left window at least as long as the cache is no limit (queries end at the last key:
        # q_offset = lk - lq), e.g. sliding_window:1024 over the first 1024 tokens
        no_left_limit = spec.window_left < 0 or spec.window_left >= lk - 1
        plain = (windowed and not spec.prefix_len and no_left_limit
                 and spec.window_right in (-1, 0))
        if attn_mask is not None or mods or not cpu or not plain:
            return None
        if not amx and (q.dtype not in SDPA_DENSE_DTYPES or d < SDPA_DENSE_MIN_HEAD_DIM
                        or lq < SDPA_DENSE_MIN_LEN):
            return None
        if spec.window_right == 0:
            if amx and lq >= SDPA_AMX_CAUSAL_KERNEL_FROM:
                return None  # the kernel is ahead there (see SDPA_AMX_CAUSAL_KERNEL_FROM)
            return (True, 0) if lq == lk else None  # SDPA's causal is aligned top-left
        if amx and lq >= SDPA_AMX_FULL_KERNEL_FROM:
            return None  # likewise (SDPA_AMX_FULL_KERNEL_FROM)
        return False, 0

    def forward(self, q, k, v, *, scale: float | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # (traced: no Python-side state, no counters)
            return self._run(q, k, v, scale, attn_mask, self._decide(q, k, v, scale, attn_mask))
        # (the routing depends on a mask's shape and dtype only; the kernel's block mask on its
        # contents, so with a mask only an SDPA route is kept)
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
               v.device, scale, id(self.mask), self.block_size, self.softcap,
               id(self.alibi_slopes),
               None if attn_mask is None else (attn_mask.shape, attn_mask.dtype))
        last = self._last
        if last is not None and last[0] == key:
            return self._run(q, k, v, scale, attn_mask, last[1], count=True)
        decided = self._decide(q, k, v, scale, attn_mask)
        if attn_mask is None or decided[0] == "sdpa":
            self._last = (key, decided)
        return self._run(q, k, v, scale, attn_mask, decided, count=True)

    def _decide(self, q, k, v, scale, attn_mask):
        """("sdpa", (is_causal, first_key)) or ("kernel", the op's arguments after q, k, v)."""
        route = self._sdpa_route(q, k, attn_mask)
        if route is not None:
            return "sdpa", route
        bm = self.block_mask(q, k, attn_mask)
        slopes = self.alibi_slopes
        if slopes is not None:
            slopes = slopes.to(q.device)
        return "kernel", _op_tail(q, k, v, bm, scale, self.softcap, slopes, None, own_mask=True)

    @staticmethod
    def _run(q, k, v, scale, attn_mask, decided, count: bool = False):
        how, what = decided
        if how == "sdpa":
            if count:
                STATS["sdpa"] += 1
            is_causal, first = what
            lk = k.shape[2]
            if attn_mask is not None:
                # as the kernel reads it (bool, keys past lk ignored; a clear error if it does
                # not broadcast), and its rows that see nothing give zeros in SDPA as well
                attn_mask = M.attn_mask_4d(attn_mask, q.shape[0], q.shape[1], 1, lk)
                if first and attn_mask.shape[3] > 1:
                    attn_mask = attn_mask[..., first:]
            if first:
                k = k.narrow(2, first, lk - first)
                v = v.narrow(2, first, lk - first)
            b, hq, lq, d = q.shape
            hkv = k.shape[1]
            if lq == 1 and hq != hkv:
                # One query per head: each GQA group's query heads as the rows of one kv head
                # (as transformers' pack_gqa does), plain attention without enable_gqa. On the
                # Xeon host (bf16, 2 threads, 16 / 4 heads, /tmp script) SDPA takes 0.70-0.76x
                # of enable_gqa's time this way, batch 1 and 4, 1030 and 4100 keys, with and
                # without a padding mask.
                g = hq // hkv
                if attn_mask is not None and attn_mask.shape[1] > 1:
                    attn_mask = attn_mask.reshape(attn_mask.shape[0], hkv, g, -1)
                out = F.scaled_dot_product_attention(q.reshape(b, hkv, g, d), k, v,
                                                     attn_mask=attn_mask, scale=scale)
                return out.view(b, hq, 1, d)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                  is_causal=is_causal, scale=scale,
                                                  enable_gqa=hq != hkv)
        if count:
            STATS["kernel"] += 1
        return _call_op(q, k, v, what)[0]

    def extra_repr(self) -> str:
        return f"mask={self.mask.name}, block_size={self.block_size}"
