"""Activation sparsity (TEAL thresholds, CoreInfer core neurons) applied to whole models."""
from fastarch.sparsity.api import (  # noqa: F401
    SparsityReport,
    densify,
    measure_sparsity,
    sparsify,
)
from fastarch.sparsity.modules import CoreNeuronMLP, SparseLinear  # noqa: F401
