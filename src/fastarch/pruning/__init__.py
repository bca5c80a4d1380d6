"""Structured pruning: dependency-aware channel / head / group removal on any traceable model.

Entry points: :func:`prune` (also ``fastarch.prune``) for width, :func:`prune_blocks` (also
``fastarch.prune_blocks``) for depth (whole blocks). :class:`DependencyGraph` exposes the
coupled channel groups, :func:`load_pruned` reloads a pruned Hugging Face model.
"""
from fastarch.pruning.api import (  # noqa: F401
    PruneReport,
    count_flops,
    count_params,
    masked_copy,
    prune,
)
from fastarch.pruning.depth import BlockPruneReport, find_block_lists, prune_blocks  # noqa: F401
from fastarch.pruning.graph import ChannelGroup, DependencyGraph, GraphBuildError  # noqa: F401
from fastarch.pruning.hf import load_pruned  # noqa: F401
from fastarch.pruning.nm import NMLinear, prune_nm  # noqa: F401
from fastarch.pruning.removal import mask_units, remove_units  # noqa: F401
