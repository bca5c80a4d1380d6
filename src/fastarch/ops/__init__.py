"""fastarch operators, one module per op family. Importing this package registers every op with
``torch.ops.fastarch``; the documented wrappers are re-exported from :mod:`fastarch`."""
from fastarch.ops import sparse_gemv  # noqa: F401
from fastarch.ops import block_sparse_attention  # noqa: F401
from fastarch.ops import nm_linear  # noqa: F401
from fastarch.ops.registry import OPS, op_backends  # noqa: F401
