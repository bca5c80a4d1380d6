"""Architecture retrieval over the zoo (timm, torchvision, transformers).

* :mod:`~fastarch.retrieval.graph`: normalised operator graphs read with one forward pass on
  meta tensors (fallbacks: partial trace, module tree);
* :mod:`~fastarch.retrieval.features`: name-blind embeddings (Weisfeiler-Lehman subtree
  features, motif histogram, global statistics) and the WL hash that collapses duplicates;
* :mod:`~fastarch.retrieval.describe`: written descriptions and their MiniLM embeddings;
* :mod:`~fastarch.retrieval.build` / :mod:`~fastarch.retrieval.index`: the resumable whole-zoo
  build and the :class:`ArchitectureIndex` file (a prebuilt one ships in ``fastarch/data``);
* :func:`retrieve` (also ``fastarch.retrieve``): nearest architectures to a module, a zoo name
  or a text;
* :func:`compress` / :func:`recommend`: a compression plan applied to an architecture and
  measured, and the plan of the nearest architectures that have a recipe.

CLI: ``fastarch index build``, ``fastarch index info``, ``fastarch retrieve QUERY -k 10``.
"""
from fastarch.retrieval.compress import CompressionReport, Plan, compress, recommend  # noqa: F401
from fastarch.retrieval.graph import OpGraph, extract_graph  # noqa: F401
from fastarch.retrieval.index import ArchitectureIndex, Hit, shipped_index  # noqa: F401
from fastarch.retrieval.retrieve import RetrievalWarning, retrieve  # noqa: F401
