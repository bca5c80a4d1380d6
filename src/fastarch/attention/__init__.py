"""Attention variants on the block-sparse attention kernel.

* masks: :func:`causal`, :func:`sliding_window`, :func:`prefix_lm`, :func:`document`,
  :func:`strided`, :func:`fixed`, :func:`global_local_random`, :func:`from_function`,
  :func:`from_dense`, combined with :func:`and_masks` / :func:`or_masks`;
* :func:`create_block_mask` turns a mask into the kernel's :class:`BlockMask` (cached);
* score mods: :func:`alibi_slopes` (ALiBi), softcap and a relative position bias table
  (``rel_bias``), arguments of :func:`block_sparse_attention`;
* :func:`topk_block_mask`: data-dependent top-k key blocks per query tile (Quest / NSA style);
  :class:`TopKAttention` (the ``use_attention`` variant ``"topk:K"``) rebuilds it per call;
* :class:`BlockSparseAttention` (nn.Module) and :func:`use_attention` (swaps the attention of
  Hugging Face and timm models).
"""
from fastarch.attention.block_mask import create_block_mask  # noqa: F401
from fastarch.attention.masks import (  # noqa: F401
    MaskSpec,
    and_masks,
    causal,
    document,
    fixed,
    from_dense,
    from_function,
    full,
    global_local_random,
    or_masks,
    prefix_lm,
    sliding_window,
    strided,
)
from fastarch.attention.models import AttentionSwapReport, use_attention  # noqa: F401
from fastarch.attention.module import BlockSparseAttention, resolve_variant  # noqa: F401
from fastarch.attention.score_mods import alibi_slopes  # noqa: F401
from fastarch.attention.topk import (  # noqa: F401
    KeyBlockSummary,
    TopKAttention,
    block_scores,
    topk_block_mask,
)
from fastarch.ops.block_sparse_attention import BlockMask, block_sparse_attention  # noqa: F401
