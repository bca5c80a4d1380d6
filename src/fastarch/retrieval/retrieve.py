"""``fastarch.retrieve``: nearest architectures in the zoo index to a model, a name or a text."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from fastarch.retrieval.index import ArchitectureIndex, Hit, shipped_index

__all__ = ["RetrievalWarning", "graph_of_module", "retrieve"]

KINDS = ("auto", "module", "name", "text")


class RetrievalWarning(UserWarning):
    """The query was only partly readable; the result comes from what could be read."""


def _is_hf(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "main_input_name")


def _guess_inputs(model: torch.nn.Module, device):
    """Example inputs for a user's module: HF models by their main input, otherwise from the
    first leaf with weights (conv -> a 224x224 image, linear -> a vector, embedding -> tokens),
    all zeros."""
    if _is_hf(model):
        from fastarch.zoo import _hf_inputs

        return (), _hf_inputs(getattr(model.config, "model_type", ""), model, device, 16)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            spatial = {torch.nn.Conv1d: (256,), torch.nn.Conv2d: (224, 224),
                       torch.nn.Conv3d: (16, 112, 112)}[type(m)]
            return (torch.zeros(1, m.in_channels, *spatial, device=device),), {}
        if isinstance(m, torch.nn.Linear):
            return (torch.zeros(1, m.in_features, device=device),), {}
        if isinstance(m, torch.nn.Embedding):
            return (torch.zeros(1, 16, dtype=torch.long, device=device),), {}
    return None


def graph_of_module(model: torch.nn.Module, example_inputs=None, time_limit: float = 60.0):
    """The operator graph of a user's module (see :func:`fastarch.retrieval.graph.extract_graph`).

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs;
    when omitted they are guessed from the module. Runs on the module's device (meta modules
    cost nothing); warns with :class:`RetrievalWarning` when only part of the graph was read.
    """
    from fastarch.retrieval.graph import OpGraph, _module_tree, count_params, extract_graph

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    args, kwargs = (), {}
    # guessed inputs of a model off meta are zeros that the meta reading below only needs the
    # shapes of: they are made on meta (filling a 1x3x224x224 CPU tensor with two threads took
    # ~8 ms on a busy 2-core machine) and on the model's device only if that reading fails
    guess_on_meta = example_inputs is None and device.type != "meta" and not _is_hf(model)
    if example_inputs is None:
        guessed = _guess_inputs(model, torch.device("meta") if guess_on_meta else device)
        if guessed is None:
            labels, dims = _module_tree(model)
            edges = [(i, i + 1) for i in range(len(labels) - 1)]
            g = OpGraph(labels, edges, method="module_tree", params=count_params(model),
                        error="no example inputs given and none could be guessed", dims=dims)
        else:
            args, kwargs = guessed
    elif isinstance(example_inputs, dict):
        kwargs = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict, got "
                        f"{type(example_inputs).__name__}")
    if args or kwargs:
        was_training = model.training
        model.eval()
        try:
            g = None
            if device.type != "meta":
                g = _graph_on_meta(model, args, kwargs, time_limit)
            if g is None:
                if guess_on_meta:
                    args, kwargs = _guess_inputs(model, device)
                g = extract_graph(model, args, kwargs, time_limit=time_limit)
        finally:
            model.train(was_training)
    if g.method != "trace":
        warnings.warn(
            f"the module could be traced only in part ({g.method}: {g.error or 'no forward'}); "
            "the result comes from what could be read (pass example_inputs to help)",
            RetrievalWarning, stacklevel=3)
    if not g.labels:
        raise ValueError("the module has no operators that could be read (no forward pass and "
                         "no leaf modules with weights)")
    return g


def _graph_on_meta(model, args, kwargs, time_limit):
    """The graph of a model with real weights read by a forward on meta stand-ins of its
    parameters, buffers and inputs (``torch.func.functional_call``; the model is not changed):
    the same recorded calls as on its own device, without computing anything (resnet18 on a
    shared 2-core CPU: ~2 s for the real forward, ~20 ms on meta). ``None`` when that forward
    does not go through completely (a tensor kept outside the parameters and buffers, code
    that reads values), so the caller reads the graph on the model's own device."""
    from torch.func import functional_call

    from fastarch.retrieval.graph import _iter_tensors, extract_graph

    def meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    if any(t.is_sparse for t in _iter_tensors(list(args) + list(kwargs.values()))):
        return None
    state = {n: meta(t) for n, t in model.named_parameters(remove_duplicate=False)}
    state.update({n: meta(t) for n, t in model.named_buffers(remove_duplicate=False)})

    class _Call(torch.nn.Module):  # extract_graph runs a module: the stateless call of model
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *a, **kw):
            return functional_call(self.inner, state, a, kw, strict=False)

    margs = tuple(meta(a) for a in args)
    mkwargs = {k: meta(v) for k, v in kwargs.items()}
    try:
        g = extract_graph(_Call(), margs, mkwargs, time_limit=time_limit)
    except Exception:  # noqa: BLE001
        return None
    return g if g.method == "trace" else None


def retrieve(query, k: int = 10, *, kind: str = "auto", index: ArchitectureIndex | None = None,
             example_inputs=None) -> list[Hit]:
    """The ``k`` architectures of the zoo index nearest to ``query``, best first.

    ``query`` is one of:

    * an ``nn.Module`` (a model of your own, not necessarily in the zoo): its operator graph is
      read with one forward pass on ``example_inputs`` (guessed when omitted) and compared with
      the index by its name-blind graph embedding; a module that cannot be traced fully gives a
      result from what could be read, with a :class:`RetrievalWarning`;
    * a zoo name (``"timm/resnet50"``, ``"resnet50"``, ``"transformers/llama"``): its
      neighbours, itself and identical graphs excluded (a zoo model missing from the index is
      built on meta and read);
    * a text (``"a small vision transformer with windowed attention"``): compared with the
      MiniLM embeddings of the automatically written descriptions of the architectures.

    ``kind`` forces the reading of a string (``"name"`` or ``"text"``); with ``"auto"`` a
    string with a space is a text and one without is a name. ``index`` defaults to the index
    that ships in the package. Each :class:`Hit` has ``name``, ``source``, ``family``,
    ``score`` (cosine similarity), ``params``, ``flops``, ``depth``, ``width``, ``duplicates``.

    Example:
        >>> hits = fastarch.retrieve("timm/resnet50", k=5)
        >>> [h.family for h in hits]
        ['resnet', 'resnet', ...]
        >>> fastarch.retrieve("a small vision transformer with windowed attention", k=3)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    idx = index if index is not None else shipped_index()
    if isinstance(query, torch.nn.Module):
        if kind not in ("auto", "module"):
            raise ValueError(f"kind={kind!r} does not fit a module query")
        g = graph_of_module(query, example_inputs)
        return idx.hits(idx.scores(idx.query_vector(g)), k)
    if not isinstance(query, str):
        raise TypeError("query must be an nn.Module, a zoo name or a text, got "
                        f"{type(query).__name__}")
    text = query.strip()
    if not text:
        raise ValueError("query is an empty string: give a zoo name or a description")
    if kind == "text" or (kind == "auto" and any(c.isspace() for c in text)):
        return _text_query(idx, text, k)
    return _name_query(idx, text, k)


def _name_query(idx: ArchitectureIndex, name: str, k: int) -> list[Hit]:
    from fastarch import zoo

    # names in the index answer without importing the zoo's libraries (a few ms)
    full = next((n for n in ([name] if "/" in name else [f"{s}/{name}" for s in zoo.SOURCES])
                 if n in idx.row_of), None)
    if full is None:
        full = zoo.resolve(name)  # ZooError (a KeyError) with close names when unknown
    row = idx.row_of.get(full)
    if row is not None:
        return idx.hits(idx.scores(idx.search[row]), k, exclude={row})
    # in the zoo but not in this index (not covered, or its build failed): read it now
    model = zoo.create(full, device="meta")
    args, kwargs = zoo.example_inputs(full, model, device="meta")
    from fastarch.retrieval.graph import extract_graph

    g = extract_graph(model, args, kwargs, time_limit=60)
    if g.method != "trace":
        warnings.warn(f"{full} could be traced only in part ({g.error}); the result comes "
                      "from what could be read", RetrievalWarning, stacklevel=3)
    return idx.hits(idx.scores(idx.query_vector(g)), k)


def _text_query(idx: ArchitectureIndex, text: str, k: int) -> list[Hit]:
    if idx.text is None:
        raise ValueError("this index has no text embeddings (built with text=False): "
                         "query it with a model or a zoo name")
    from fastarch.retrieval.describe import embed_texts

    q = embed_texts([text])[0]
    return idx.hits(idx.scores(q, text=True), k)


def scores_matrix(idx: ArchitectureIndex) -> np.ndarray:
    """All-pairs similarities of the search vectors (rows x rows), for leave-one-out
    evaluation."""
    return idx.search @ idx.search.T
