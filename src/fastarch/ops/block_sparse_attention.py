"""The block-sparse attention op family: flash-style attention over the tiles a block mask lists.

Op (``torch.ops.fastarch.block_sparse_attention``; :func:`block_sparse_attention` below adds the
checks and takes a :class:`BlockMask`)::

    block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                           full_kv_indices, tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids,
                           alibi_slopes, rel_bias, block_size, q_offset, window_left,
                           window_right, prefix_len, scale, softcap) -> (out, lse)

* ``q`` (B, Hq, Lq, D), ``k``/``v`` (B, Hkv, Lk, D), ``Hq % Hkv == 0`` (grouped-query attention).
* The block mask (``block_size`` tiles, ``Qt = ceil(Lq / bs)``, ``Kt = ceil(Lk / bs)``), batch and
  head dims 1 (broadcast) or B / Hq: query tile ``qt`` of (b, h) attends the ``full_kv_num_blocks``
  first entries of ``full_kv_indices[b, h, qt]`` with no element mask, and the ``kv_num_blocks``
  first entries of ``kv_indices[b, h, qt]`` ("partial" tiles) with the element mask
  ``(window_ok || kv < prefix_len) && q_doc == kv_doc && bitmap``, where
  ``window_ok = -window_left <= kv - (q + q_offset) <= window_right`` (a negative bound is
  unbounded) and ``bitmap = tile_masks[tile_mask_index[b, h, qt, j]]`` (index -1: no bitmap).
  Tiles not listed are skipped.
* Scores: ``s = scale * q.k``; ``softcap * tanh(s / softcap)`` when ``softcap > 0``; plus
  ``alibi_slopes[h] * (kv - (q + q_offset))``; plus ``rel_bias[h, clip(kv - q_pos, -R, R) + R]``
  for a relative position bias table ``(Hq, 2 R + 1)`` (T5 / Swin style; fill it from your
  buckets; it is differentiable: the backward returns its gradient). A query that may see nothing gets zeros and ``lse = -inf``.

Backends: C++ on CPU (MKL sgemm per tile when libtorch exports it), Triton on CUDA
(``fastarch.kernels.block_sparse_attention``); the reference below is the spec. Backward:
``block_sparse_attention_backward`` -> ``(dq, dk, dv, drel_bias)`` (C++ on CPU, Triton on CUDA),
tiled like the forward and recomputing P from the saved lse; its reference is the
vector-Jacobian product of the forward reference (memory O(Lq * Lk) per head). ``drel_bias`` is
accumulated per tile by the C++ kernel; on CUDA it comes from that reference VJP (the Triton
kernel gives dq, dk, dv), so training a relative bias on GPU costs O(Lq * Lk) memory per head.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fastarch import native
from fastarch.ops.registry import OpInfo, fake_checks, register_op

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 80, 96, 128)  # tested; any D works on CPU

SCHEMA = (
    "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
    "Tensor kv_indices, Tensor? full_kv_num_blocks, Tensor? full_kv_indices, "
    "Tensor? tile_masks, Tensor? tile_mask_index, Tensor? q_doc_ids, Tensor? kv_doc_ids, "
    "Tensor? alibi_slopes, Tensor? rel_bias, int block_size, int q_offset, int window_left, "
    "int window_right, int prefix_len, float scale, float softcap) -> (Tensor, Tensor)"
)


# ---- the block mask ------------------------------------------------------------------------------
@dataclasses.dataclass
class BlockMask:
    """Which key/value tiles each query tile visits, and the element mask inside partial tiles.

    Build one with :func:`fastarch.attention.create_block_mask`; the fields are the op's inputs
    (see the module docstring). ``q_len`` / ``kv_len`` are the sequence lengths it was built for.
    """

    kv_num_blocks: torch.Tensor  # (Bm, Hm, Qt) int32: partial tiles per query tile
    kv_indices: torch.Tensor  # (Bm, Hm, Qt, W) int32
    full_kv_num_blocks: torch.Tensor | None  # (Bm, Hm, Qt) int32: unmasked tiles
    full_kv_indices: torch.Tensor | None  # (Bm, Hm, Qt, Wf) int32
    block_size: int
    q_len: int
    kv_len: int
    q_offset: int = 0
    window_left: int = -1
    window_right: int = -1
    prefix_len: int = 0
    q_doc_ids: torch.Tensor | None = None  # (Bd, Lq) int
    kv_doc_ids: torch.Tensor | None = None  # (Bd, Lk) int
    tile_masks: torch.Tensor | None = None  # (P, bs, bs) bool
    tile_mask_index: torch.Tensor | None = None  # like kv_indices, -1 = no bitmap

    def __post_init__(self):
        # plain ints are range-checked; symbolic ones (built inside torch.compile) pass through
        for name, lo, hi in (("block_size", 1, 256), ("q_len", 0, None), ("kv_len", 0, None)):
            val = getattr(self, name)
            if not isinstance(val, (int, torch.SymInt)) or isinstance(val, bool) or (
                    isinstance(val, int) and (val < lo or (hi is not None and val > hi))):
                rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ValueError(f"BlockMask: {name} must be an int {rng}, got {val!r}")

    @property
    def num_q_tiles(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def num_kv_tiles(self) -> int:
        return -(-self.kv_len // self.block_size)

    def computed_fraction(self) -> float:
        """Tiles visited / all ``Qt * Kt`` tiles (averaged over the mask's batch and heads)."""
        n = self.kv_num_blocks.sum()
        if self.full_kv_num_blocks is not None:
            n = n + self.full_kv_num_blocks.sum()
        total = self.kv_num_blocks.numel() * max(self.num_kv_tiles, 1)
        return float(n) / max(total, 1)

    def to(self, device) -> BlockMask:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)
        })

    def op_args(self) -> tuple:
        """The block-mask arguments of ``torch.ops.fastarch.block_sparse_attention``, in order."""
        return (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices, self.tile_masks, self.tile_mask_index, self.q_doc_ids,
                self.kv_doc_ids)


# ---- reference (the spec; fp32) -----------------------------------------------------------------
def _listed_tiles(num, idx, kt):
    """(Bm, Hm, Qt, Kt) bool of the tiles listed in the first num entries of idx, and for each
    the slot j it was listed at (-1 where not listed)."""
    w = idx.shape[-1]
    slot_ok = torch.arange(w, device=idx.device) < num.long().unsqueeze(-1)
    listed = torch.zeros((*num.shape, kt + 1), dtype=torch.bool, device=idx.device)
    target = torch.where(slot_ok, idx.long(), kt)  # unused slots land in a dump column
    listed.scatter_(-1, target, True)
    slot = torch.full((*num.shape, kt + 1), -1, dtype=torch.long, device=idx.device)
    slots = torch.arange(w, device=idx.device).expand_as(target)
    slot.scatter_(-1, target, torch.where(slot_ok, slots, -1))
    return listed[..., :kt], slot[..., :kt]


def dense_mask(q_len, kv_len, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
               tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids, block_size, q_offset,
               window_left, window_right, prefix_len) -> torch.Tensor:
    """The (Bm', Hm, Lq, Lk) bool mask a block mask stands for (True = may attend)."""
    bs = block_size
    dev = kv_indices.device
    kt = -(-kv_len // bs)
    qt = kv_num_blocks.shape[-1]
    partial, slot = _listed_tiles(kv_num_blocks, kv_indices, kt)
    full = torch.zeros_like(partial)
    if full_kv_num_blocks is not None:
        full, _ = _listed_tiles(full_kv_num_blocks, full_kv_indices, kt)

    def expand(tiles):  # (Bm, Hm, Qt, Kt) -> (Bm, Hm, Lq, Lk)
        e = tiles.repeat_interleave(bs, dim=-2).repeat_interleave(bs, dim=-1)
        return e[..., :q_len, :kv_len]

    qi = torch.arange(q_len, device=dev).view(-1, 1) + q_offset
    ki = torch.arange(kv_len, device=dev).view(1, -1)
    delta = ki - qi
    elem = torch.ones(q_len, kv_len, dtype=torch.bool, device=dev)
    if window_left >= 0:
        elem = elem & (delta >= -window_left)
    if window_right >= 0:
        elem = elem & (delta <= window_right)
    elem = (elem | (ki < prefix_len))[None, None]
    if q_doc_ids is not None:
        elem = elem & (q_doc_ids[:, None, :, None] == kv_doc_ids[:, None, None, :])
    if tile_masks is not None:
        bm, hm = kv_num_blocks.shape[:2]
        bitmap = torch.ones(bm, hm, qt, kt, bs, bs, dtype=torch.bool, device=dev)
        tmi = torch.gather(tile_mask_index.long(), -1, slot.clamp(min=0))
        use = partial & (tmi >= 0)
        bitmap[use] = tile_masks.bool()[tmi[use]]
        bitmap = bitmap.permute(0, 1, 2, 4, 3, 5).reshape(bm, hm, qt * bs, kt * bs)
        elem = elem & bitmap[..., :q_len, :kv_len]
    return expand(full) | (expand(partial) & elem)


def block_sparse_attention_reference(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                     full_kv_indices, tile_masks, tile_mask_index, q_doc_ids,
                                     kv_doc_ids, alibi_slopes, rel_bias, block_size, q_offset,
                                     window_left, window_right, prefix_len, scale, softcap):
    lq, lk = q.shape[2], k.shape[2]
    allowed = dense_mask(lq, lk, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                         tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids, block_size, q_offset,
                         window_left, window_right, prefix_len)
    group = q.shape[1] // k.shape[1]
    # fp32 (float64 inputs stay float64: a tighter reference for tests of the fp32 kernels)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(work).repeat_interleave(group, dim=1)
    vf = v.to(work).repeat_interleave(group, dim=1)
    s = (q.to(work) @ kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        rel = (torch.arange(lk, device=q.device).view(1, -1)
               - torch.arange(lq, device=q.device).view(-1, 1) - q_offset)
        s = s + alibi_slopes.to(work).view(-1, 1, 1) * rel
    if rel_bias is not None:
        r = rel_bias.shape[1] // 2
        dist = (torch.arange(lk, device=q.device).view(1, -1)
                - torch.arange(lq, device=q.device).view(-1, 1) - q_offset)
        s = s + rel_bias.to(work)[:, dist.clamp(-r, r) + r]
    s = s.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(seen, s, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse)  # masked scores are -inf: exactly 0
    out = p @ vf
    lse = torch.where(seen, lse, float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse.expand(q.shape[:3]).contiguous()


_TENSOR_ARGS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "tile_masks", "tile_mask_index", "q_doc_ids", "kv_doc_ids", "alibi_slopes",
                "rel_bias")  # the tensors after (q, k, v), in the schema's order


def _attention_fake_checks(op, q, k, v, args, more=None):
    ok = q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    named = {"k": k, "v": v, **dict(zip(_TENSOR_ARGS, args)), **(more or {})}
    fake_checks(op, q, named, [(ok, "q, k, v must be 4-D (B, H, L, D)")] + ([
        (k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3], "q, k, v must share the head dim"),
        (q.shape[3] >= 1, "the head dim must be >= 1"),
        (k.shape[0] == q.shape[0] and v.shape[:3] == k.shape[:3],
         "k and v must share q's batch and each other's heads and length")] if ok else []))


def _fake(q, k, v, *args):
    _attention_fake_checks("block_sparse_attention", q, k, v, args)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


# ---- CUDA dispatch ----------------------------------------------------------------------------
def _gpu_backends() -> list[str]:
    return ["Triton"] if native.triton_available() else []


def _block_sparse_attention_cuda(*args):
    if native.triton_available():
        from fastarch.kernels import block_sparse_attention as kern

        return kern.block_sparse_attention(*args)
    return block_sparse_attention_reference(*args)


register_op(OpInfo(
    name="block_sparse_attention", family="block_sparse_attention", schema=SCHEMA,
    reference=block_sparse_attention_reference, fake=_fake, cuda=_block_sparse_attention_cuda,
    cuda_backends=_gpu_backends, differentiable=(),  # autograd below: the op has two outputs
))


BACKWARD_SCHEMA = (
    "block_sparse_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
    "Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks, Tensor kv_indices, "
    "Tensor? full_kv_num_blocks, Tensor? full_kv_indices, Tensor? tile_masks, "
    "Tensor? tile_mask_index, Tensor? q_doc_ids, Tensor? kv_doc_ids, Tensor? alibi_slopes, "
    "Tensor? rel_bias, int block_size, int q_offset, int window_left, int window_right, "
    "int prefix_len, float scale, float softcap) -> (Tensor, Tensor, Tensor, Tensor)"
)


_REL = 9  # position of rel_bias in the arguments after (q, k, v)


def block_sparse_attention_backward_reference(grad_out, grad_lse, q, k, v, out, lse, *args):
    """(dq, dk, dv, drel_bias): the vector-Jacobian product of the reference (O(Lq * Lk) memory).
    ``drel_bias`` has rel_bias's shape and dtype; an empty tensor of q's dtype without one."""
    rel = args[_REL]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        if rel is not None:
            leaves.append(rel.detach().requires_grad_(True))
        rest = list(args)
        if rel is not None:
            rest[_REL] = leaves[3]
        ref_out, ref_lse = block_sparse_attention_reference(*leaves[:3], *rest)
        outs, gs = [ref_out], [grad_out]
        if grad_lse is not None:
            finite = torch.isfinite(ref_lse)
            outs.append(torch.where(finite, ref_lse, 0.0))
            gs.append(torch.where(finite, grad_lse, 0.0))
        got = torch.autograd.grad(outs, leaves, gs, allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g.to(t.dtype)
                  for g, t in zip(got, leaves))
    return grads if rel is not None else (*grads, q.new_empty(0))


def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, *args):
    _attention_fake_checks("block_sparse_attention_backward", q, k, v, args,
                           {"grad_out": grad_out, "grad_lse": grad_lse, "out": out, "lse": lse})
    rel = args[_REL]
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format), \
        (q.new_empty(0) if rel is None else rel.new_empty(rel.shape))


def _block_sparse_attention_backward_cuda(*args):
    if native.triton_available():
        from fastarch.kernels import block_sparse_attention as kern

        dq, dk, dv = kern.block_sparse_attention_backward(*args)
        if args[7 + _REL] is None:
            return dq, dk, dv, args[2].new_empty(0)
        # The Triton kernel has no rel-bias gradient: take it from the reference VJP.
        return dq, dk, dv, block_sparse_attention_backward_reference(*args)[3]
    return block_sparse_attention_backward_reference(*args)



register_op(OpInfo(
    name="block_sparse_attention_backward", family="block_sparse_attention",
    schema=BACKWARD_SCHEMA, reference=block_sparse_attention_backward_reference,
    fake=_backward_fake, cuda=_block_sparse_attention_backward_cuda,
    cuda_backends=_gpu_backends,
))


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.inputs = inputs
    tensors = [a if isinstance(a, torch.Tensor) else None for a in inputs]
    ctx.save_for_backward(*tensors, out, lse)


def _backward(ctx, grad_out, grad_lse):
    """dq, dk, dv from the backward op (C++ on CPU: tiled, no (Lq, Lk) matrix)."""
    *saved, out, lse = ctx.saved_tensors
    args = [s if isinstance(a, torch.Tensor) else a for a, s in zip(ctx.inputs, saved)]
    grads: list = [None] * len(args)
    rel_at = 3 + _REL
    if not (any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[rel_at]):
        return tuple(grads)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    q, k, v, *rest = args
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the backward op has no derivative of its own, so
        # differentiate the reference (it holds the (Lq, Lk) scores: memory grows with Lq * Lk)
        want = [i for i in (0, 1, 2, rel_at) if ctx.needs_input_grad[i]]
        ref_out, ref_lse = block_sparse_attention_reference(*args)
        outs, cot = [ref_out], [grad_out]
        if grad_lse is not None:
            seen = torch.isfinite(ref_lse)  # rows that see nothing have lse -inf and no gradient
            outs.append(torch.where(seen, ref_lse, 0.0))
            cot.append(torch.where(seen, grad_lse, 0.0))
        got = torch.autograd.grad(outs, [args[i] for i in want], cot, create_graph=True,
                                  allow_unused=True)
        for i, g in zip(want, got):
            grads[i] = g
        return tuple(grads)
    dq, dk, dv, drel = torch.ops.fastarch.block_sparse_attention_backward(
        grad_out.contiguous(), grad_lse, q, k, v, out, lse, *rest)
    for i, g in ((0, dq), (1, dk), (2, dv), (rel_at, drel)):
        if ctx.needs_input_grad[i]:
            grads[i] = g
    return tuple(grads)


torch.library.register_autograd("fastarch::block_sparse_attention", _backward,
                                setup_context=_setup_context)


# Skips the autograd dispatch keys, as the op's own autograd kernel does when no input needs a
# gradient (torch/_library/autograd.py); absent in a torch without it: the plain call.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


# ---- public wrapper ---------------------------------------------------------------------------
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch {t.shape[0]} but q has batch {q.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has head dim {q.shape[3]}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v has (heads, length) {tuple(v.shape[1:3])} but k has "
                         f"{tuple(k.shape[1:3])}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the heads of q ({q.shape[1]}) must be a multiple of the heads of k "
                         f"({k.shape[1]}) (grouped-query attention)")


def _check_block_mask(bm: BlockMask, q, k) -> None:
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a fastarch BlockMask, got {type(bm).__name__}")
    b, hq, lq = q.shape[:3]
    lk = k.shape[2]
    if bm.q_len != lq or bm.kv_len != lk:
        raise ValueError(f"block_mask was built for (q_len, kv_len) = ({bm.q_len}, {bm.kv_len}) "
                         f"but q, k have lengths ({lq}, {lk})")
    qt = bm.num_q_tiles
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "tile_mask_index"):
        t = getattr(bm, name)
        if t is None:
            continue
        if t.device != q.device:
            raise ValueError(f"block_mask.{name} is on {t.device} but q is on {q.device}")
        if t.dtype != torch.int32:
            raise TypeError(f"block_mask.{name} must be int32, got {t.dtype}")
        want = 3 if name.endswith("num_blocks") else 4
        if (t.dim() != want or t.shape[0] not in (1, b) or t.shape[1] not in (1, hq)
                or t.shape[2] != qt):
            raise ValueError(f"block_mask.{name} must have shape (1 or {b}, 1 or {hq}, {qt}"
                             f"{', W' if want == 4 else ''}) for q_len={lq}, block_size="
                             f"{bm.block_size}; got {tuple(t.shape)}")
    if bm.kv_indices.shape[:3] != bm.kv_num_blocks.shape:
        raise ValueError("block_mask.kv_indices and kv_num_blocks disagree in shape: "
                         f"{tuple(bm.kv_indices.shape)} vs {tuple(bm.kv_num_blocks.shape)}")
    for name in ("q_doc_ids", "kv_doc_ids", "tile_masks"):
        t = getattr(bm, name)
        if t is not None and t.device != q.device:
            raise ValueError(f"block_mask.{name} is on {t.device} but q is on {q.device}")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_mask: BlockMask, *, scale: float | None = None,
                           softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                           rel_bias: torch.Tensor | None = None, return_lse: bool = False):
    """Attention of ``q`` over ``k``/``v`` restricted to ``block_mask`` (flash-style, tiled).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``; float32,
            bfloat16 or float16; any strides with a contiguous last dim.
        block_mask: a :class:`BlockMask` built for ``(Lq, Lk)``, e.g. by
            :func:`fastarch.attention.create_block_mask`.
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: ``> 0`` applies ``softcap * tanh(s / softcap)`` to the scaled scores (Gemma 2).
        alibi_slopes: optional ``(Hq,)`` ALiBi slopes: adds ``slope * (kv - q_pos)``.
        rel_bias: optional ``(Hq, 2 R + 1)`` relative position bias: adds
            ``rel_bias[h, clip(kv - q_pos, -R, R) + R]``; differentiable (a learnable table).
        return_lse: also return the fp32 log-sum-exp ``(B, Hq, Lq)`` (``-inf`` for empty rows).

    Returns:
        ``out`` ``(B, Hq, Lq, D)`` in q's dtype (zeros for queries that may see nothing), and
        ``lse`` when ``return_lse``.

    Example:
        >>> from fastarch.attention import create_block_mask, sliding_window
        >>> bm = create_block_mask(sliding_window(256), q_len=4096, kv_len=4096)
        >>> out = block_sparse_attention(q, k, v, bm)
    """
    return _attention(q, k, v, block_mask, scale, softcap, alibi_slopes, rel_bias, return_lse)


def _attention(q, k, v, block_mask, scale, softcap, alibi_slopes, rel_bias, return_lse,
               own_mask: bool = False):
    """block_sparse_attention; ``own_mask``: the caller built ``block_mask`` for these q, k (as
    BlockSparseAttention does), so its shapes are not checked again."""
    tail = _op_tail(q, k, v, block_mask, scale, softcap, alibi_slopes, rel_bias, own_mask)
    out, lse = _call_op(q, k, v, tail)
    return (out, lse) if return_lse else out


def _op_tail(q, k, v, block_mask, scale, softcap, alibi_slopes, rel_bias, own_mask=False):
    """The op's arguments after (q, k, v), checked."""
    _check_qkv(q, k, v)
    if not own_mask:
        _check_block_mask(block_mask, q, k)
    d = q.shape[-1]
    if d < 1:
        raise ValueError(f"q, k, v must have a head dim >= 1, got {d}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)  # symbolic under dynamic shapes; finite for d >= 1
    else:
        scale = float(scale)
        if not -math.inf < scale < math.inf:  # (comparisons, not math.isfinite: dynamo folds them)
            raise ValueError(f"scale must be finite, got {scale}")
    softcap = float(softcap)
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be finite and >= 0, got {softcap}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.shape != (q.shape[1],):
            raise ValueError(f"alibi_slopes must be a tensor of shape ({q.shape[1]},)")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if rel_bias is not None:
        if (not isinstance(rel_bias, torch.Tensor) or rel_bias.dim() != 2
                or rel_bias.shape[0] != q.shape[1] or rel_bias.shape[1] % 2 != 1):
            raise ValueError(f"rel_bias must be a tensor of shape ({q.shape[1]}, 2 R + 1)")
        if rel_bias.device != q.device:
            raise ValueError(f"rel_bias is on {rel_bias.device} but q is on {q.device}")
        if rel_bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"rel_bias must be float32, bfloat16 or float16, got {rel_bias.dtype}")
    bm = block_mask
    return (*bm.op_args(), alibi_slopes, rel_bias, bm.block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, scale, softcap)


_REL_IN_TAIL = 9  # rel_bias's place in _op_tail's tuple


def _call_op(q, k, v, tail):
    """torch.ops.fastarch.block_sparse_attention(q, k, v, *tail) -> (out, lse)."""
    op = torch.ops.fastarch.block_sparse_attention.default
    if (_BELOW_AUTOGRAD is not None and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled()
                     and torch._C._any_requires_grad(q, k, v, tail[_REL_IN_TAIL]))):
        # Nothing to differentiate: straight to the kernel. The op's autograd kernel (Python,
        # torch.library.register_autograd) would only find that out and redispatch below
        # itself; that costs ~7 us a call, a sixth of a decode call over 1000 keys.
        with _BELOW_AUTOGRAD():
            return op(q, k, v, *tail)
    return op(q, k, v, *tail)

