"""fastarch: make existing PyTorch architectures run faster and smaller.

Ops live in ``torch.ops.fastarch`` (registered on import), with documented wrappers here:
:func:`sparse_gemv`, :func:`sparse_gemv_index`, :func:`gather_gemv`, :func:`sparse_mlp`.
Model-level entry points: :func:`sparsify` / :func:`densify` (activation sparsity).
``fastarch.info()`` or ``python -m fastarch.info`` says what is built here.
"""
from fastarch import native  # noqa: F401  (loads fastarch._C, warns once if it cannot)
from fastarch import ops  # noqa: F401  (registers the ops)
from fastarch.ops.sparse_gemv import (  # noqa: F401
    gather_gemv,
    prepare_input_major,
    sparse_gemv,
    sparse_gemv_index,
    sparse_mlp,
)
from fastarch.sparsity import densify, sparsify  # noqa: F401
from fastarch.ops.block_sparse_attention import BlockMask, block_sparse_attention  # noqa: F401
from fastarch.attention import (  # noqa: F401
    create_block_mask,
    use_attention,
)
from fastarch import zoo  # noqa: F401  (fastarch.zoo.names / create / family)
from fastarch.retrieval.retrieve import retrieve  # noqa: F401
from fastarch.retrieval.compress import compress, recommend  # noqa: F401
from fastarch.pruning import prune, prune_blocks  # noqa: F401
from fastarch.ops.nm_linear import nm_compress, nm_linear  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that `python -m fastarch.info` does not find it already imported.
    if name == "info":
        import fastarch.info as info_module

        return info_module
    if name in ("compile_backend", "explain"):  # imports Dynamo: only when asked for
        import fastarch.compile as compile_module

        return getattr(compile_module, name)
    raise AttributeError(f"module 'fastarch' has no attribute {name!r}")
