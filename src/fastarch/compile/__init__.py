"""torch.compile support: the ``"fastarch"`` backend and the ops it rewrites into.

* ``torch.compile(model, backend="fastarch")`` (registered through the ``torch_dynamo_backends``
  entry point) or ``backend=fastarch.compile_backend``: see :mod:`fastarch.compile.backend`.
* :func:`explain`: what the backend would rewrite in a model, and Dynamo's graph breaks.
* :func:`sdpa` / ``torch.ops.fastarch.sdpa``: SDPA that runs the block-sparse kernel when the
  mask empties enough tiles (what the attention rewrite calls).
"""
from __future__ import annotations

import dataclasses

import torch

from fastarch.compile.attention import AttentionPlan, plan_attention, sdpa  # noqa: F401
from fastarch.compile.linear import teal_linear  # noqa: F401
from fastarch.compile.backend import (  # noqa: F401
    CompileOptions,
    CompileReport,
    Rewrite,
    clear_reports,
    compile_backend,
    reports,
    rewrite_graph,
)


@dataclasses.dataclass
class ExplainResult:
    """What :func:`explain` found: Dynamo's graphs and breaks, and the backend's report per
    graph."""

    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    reports: list[CompileReport]

    def rewritten(self):
        return [e for r in self.reports for e in r.rewritten()]

    def __str__(self) -> str:
        lines = [f"{self.graph_count} graph(s), {self.graph_break_count} graph break(s), "
                 f"{len(self.rewritten())} rewrite(s)"]
        lines += [f"  break: {r}" for r in self.break_reasons]
        lines += [str(r) for r in self.reports]
        return "\n".join(lines)


def explain(model, *args, options: dict | None = None, no_grad: bool = True,
            **kwargs) -> ExplainResult:
    """Trace ``model(*args, **kwargs)`` with Dynamo (nothing is compiled) and report the graph
    breaks and what the ``"fastarch"`` backend would rewrite with ``options``.

    ``no_grad`` (default True) traces under ``torch.no_grad()``, as inference runs; the backend
    rewrites only graphs that need no gradients.

    Example:
        >>> print(fastarch.explain(model, input_ids, attention_mask=mask))
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or function), got "
                        f"{type(model).__name__}")
    import torch._dynamo

    with torch.no_grad() if no_grad else torch.enable_grad():
        out = torch._dynamo.explain(model)(*args, **kwargs)
        reps = [rewrite_graph(gm, [], options) for gm in out.graphs]
    reasons = [str(getattr(b, "reason", b)) for b in out.break_reasons]
    return ExplainResult(out.graph_count, out.graph_break_count, reasons, reps)
