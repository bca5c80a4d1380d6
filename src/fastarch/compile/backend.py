"""The ``"fastarch"`` torch.compile backend: rewrite what provably maps to fastarch ops, then
hand the graph to Inductor.

    model = torch.compile(model, backend="fastarch")
    model = torch.compile(model, backend="fastarch", options={"rewrites": ["attention"]})

Dynamo gives the backend each captured FX graph (torch-level ops, parameters as inputs). The
passes below replace nodes whose meaning is preserved exactly by a fastarch op; every other node
is left as it was, and the result goes to ``torch._inductor.compile_fx``. What each pass did, and
why it left a node alone, is logged on the ``fastarch.compile`` logger (switch it on with
``TORCH_LOGS=+fastarch`` or ``FASTARCH_LOGS=1``) and collected by :func:`explain`.

Passes (``options["rewrites"]``, default all):

* ``attention``: ``F.scaled_dot_product_attention`` with an explicit mask (Hugging Face padding
  masks, sliding windows, documents, ...) -> ``torch.ops.fastarch.sdpa``, which computes only the
  tiles the mask allows with the block-sparse kernel when that pays (decided per mask when it
  runs; SDPA otherwise, so the result is SDPA's). Calls without a mask, or with dropout or
  ``is_causal``, stay SDPA calls: nothing is gained by routing them.
* ``sparsity`` (off unless ``options["sparsity"] > 0``): TEAL activation sparsity on the linear
  layers of an inference graph; see :mod:`fastarch.compile.linear`. This one changes outputs by
  design (within the chosen sparsity).

Models already transformed by :func:`fastarch.sparsify`, :func:`fastarch.prune` (N:M) or
:func:`fastarch.use_attention` reach the backend as calls of fastarch ops: they stay as they
are (opaque to Inductor, no graph break) and are listed in the report.

Graphs that need gradients (training) are compiled without rewrites: the passes target
inference.

Other keys of ``options`` are passed to Inductor as config patches (as ``torch.compile`` does
with ``backend="inductor"``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastarch.compile import attention as _attention  # registers torch.ops.fastarch.sdpa

__all__ = ["compile_backend", "CompileOptions", "CompileReport", "Rewrite", "REWRITES",
           "rewrite_graph", "reports", "clear_reports"]

log = logging.getLogger("fastarch.compile")

REWRITES = ("attention", "sparsity")
_PRODUCED = ("sdpa", "teal_linear")  # ops the passes write (not reported as the model's own)
_FASTARCH_KEYS = ("rewrites", "sparsity", "calibrate")


@dataclasses.dataclass
class CompileOptions:
    """Options of the backend, from ``torch.compile(..., options={...})``.

    Attributes:
        rewrites: which passes may run (names in ``REWRITES``); default all.
        sparsity: activation sparsity of the ``sparsity`` pass, in ``[0, 1)``; 0 = off.
        calibrate: for ``sparsity``: calibrate thresholds on the example inputs the graph was
            compiled with (the only data the backend sees). Default True.
        inductor: the remaining keys, Inductor config patches.
    """

    rewrites: tuple[str, ...] = REWRITES
    sparsity: float = 0.0
    calibrate: bool = True
    inductor: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict | None) -> "CompileOptions":
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        opts = cls(inductor={k: v for k, v in options.items() if k not in _FASTARCH_KEYS})
        if "rewrites" in options:
            rw = options["rewrites"]
            rw = (rw,) if isinstance(rw, str) else tuple(rw)
            bad = [r for r in rw if r not in REWRITES]
            if bad:
                raise ValueError(f"options['rewrites'] has unknown pass(es) {bad}; "
                                 f"known: {list(REWRITES)}")
            opts.rewrites = rw
        if "sparsity" in options:
            s = options["sparsity"]
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s < 1.0:
                raise ValueError(f"options['sparsity'] must be a number in [0, 1), got {s!r}")
            opts.sparsity = float(s)
        if "calibrate" in options:
            opts.calibrate = bool(options["calibrate"])
        return opts


@dataclasses.dataclass
class Rewrite:
    """One node the backend looked at: ``action`` is ``"rewritten"``, ``"kept"`` (already a
    fastarch op) or ``"skipped"`` (with the reason)."""

    pass_name: str
    action: str
    node: str
    target: str
    where: str
    reason: str = ""

    def line(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"[{self.pass_name}] {self.action}: {self.node} = {self.target} at {self.where}{why}"


@dataclasses.dataclass
class CompileReport:
    """What the backend did to one graph."""

    graph: int
    nodes: int
    entries: list[Rewrite] = dataclasses.field(default_factory=list)
    note: str = ""

    def rewritten(self) -> list[Rewrite]:
        return [e for e in self.entries if e.action == "rewritten"]

    def __str__(self) -> str:
        head = (f"graph {self.graph}: {self.nodes} nodes, {len(self.rewritten())} rewritten"
                + (f"; {self.note}" if self.note else ""))
        return "\n".join([head] + ["  " + e.line() for e in self.entries])


_REPORTS: list[CompileReport] = []
_MAX_REPORTS = 256
_graph_counter = 0


def reports() -> list[CompileReport]:
    """Reports of the graphs compiled by the backend in this process, oldest first (capped)."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()


# ---- helpers -------------------------------------------------------------------------------------
def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", str(path)) or "model"
    return node.name


def _val(node: Any):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(
        node, torch.fx.Node) else node


def _needs_grad(gm: torch.fx.GraphModule, example_inputs) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    for n in gm.graph.nodes:
        if n.op == "placeholder" and isinstance(_val(n), torch.Tensor) and _val(n).requires_grad:
            return True
    return any(p.requires_grad for p in gm.parameters())


_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def _sdpa_args(node: torch.fx.Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    for name, a in zip(_SDPA_ARGS, node.args):
        args[name] = a
    args.update(node.kwargs)
    return args


# ---- passes --------------------------------------------------------------------------------------
def _attention_pass(gm: torch.fx.GraphModule, report: CompileReport, opts: CompileOptions) -> None:
    planned: dict[torch.fx.Node, tuple] = {}  # mask node -> (argument node, plan slot)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        a = _sdpa_args(node)
        entry = Rewrite("attention", "skipped", node.name, "scaled_dot_product_attention",
                        _where(node))
        report.entries.append(entry)
        mask, q = a["attn_mask"], _val(a["query"])
        if mask is None:
            entry.reason = "no mask" + (" (is_causal: SDPA skips the masked tiles itself)"
                                        if a["is_causal"] is True else "")
            continue
        if not isinstance(mask, torch.fx.Node):
            entry.reason = "mask is not a tensor of the graph"
            continue
        if a["dropout_p"] != 0.0 or isinstance(a["dropout_p"], torch.fx.Node):
            entry.reason = "dropout"
            continue
        if a["is_causal"] is not False:
            entry.reason = "is_causal together with a mask"
            continue
        if isinstance(a["enable_gqa"], torch.fx.Node):
            entry.reason = "enable_gqa computed in the graph"
            continue
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            entry.reason = "inputs are not (B, H, L, D)"
            continue
        mval = _val(mask)
        if isinstance(mval, torch.Tensor) and mval.requires_grad:
            entry.reason = "the mask needs a gradient"
            continue
        kv = _val(a["key"])
        lq, lk = q.shape[-2], kv.shape[-2] if isinstance(kv, torch.Tensor) else None
        if isinstance(lq, int) and isinstance(lk, int) and lq * lk < _attention.MIN_PAIRS:
            # static and too small for the block-sparse kernel to pay (bench/bench_compile.py)
            entry.reason = f"{lq} x {lk} keys: below the size where the kernel pays"
            continue
        scale = a["scale"]
        first_use = mask not in planned  # the first call on a mask plans it afresh each run
        if first_use and isinstance(mval, torch.Tensor) and mval.dtype == torch.bool:
            # the additive form SDPA would make of it, made once in the graph (fused there)
            with gm.graph.inserting_after(mask):
                planned[mask] = (gm.graph.call_function(_attention.additive_mask,
                                                        (mask, q.dtype)),
                                 _attention.new_plan_slot())
        elif first_use:
            planned[mask] = (mask, _attention.new_plan_slot())
        mask_arg, slot = planned[mask]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                torch.ops.fastarch.sdpa.default,
                (a["query"], a["key"], a["value"], mask_arg, 0.0, False,
                 scale if scale is None or isinstance(scale, torch.fx.Node) else float(scale),
                 bool(a["enable_gqa"]), 1 if first_use else 2, slot))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        entry.action, entry.target = "rewritten", "scaled_dot_product_attention -> fastarch.sdpa"
        entry.reason = "mask-driven block-sparse attention"


def _existing_ops(gm: torch.fx.GraphModule, report: CompileReport) -> None:
    seen = {e.node for e in report.entries}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name in seen:
            continue
        qual = str(node.target)
        if qual.startswith("fastarch.") and qual.split(".")[1] not in _PRODUCED:
            report.entries.append(Rewrite("model", "kept", node.name, qual, _where(node),
                                          "already a fastarch op"))


def rewrite_graph(gm: torch.fx.GraphModule, example_inputs, options: CompileOptions | dict | None
                  = None) -> CompileReport:
    """Run the enabled passes on ``gm`` in place; returns what was done."""
    global _graph_counter
    opts = options if isinstance(options, CompileOptions) else CompileOptions.parse(options)
    _graph_counter += 1
    report = CompileReport(_graph_counter, len(gm.graph.nodes))
    if _needs_grad(gm, example_inputs):
        report.note = "graph needs gradients: compiled without rewrites"
    else:
        if "attention" in opts.rewrites:
            _attention_pass(gm, report, opts)
        if "sparsity" in opts.rewrites and opts.sparsity > 0.0:
            from fastarch.compile.linear import sparsity_pass

            sparsity_pass(gm, example_inputs, report, opts)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    _existing_ops(gm, report)
    return report


def _emit(report: CompileReport) -> None:
    _REPORTS.append(report)
    del _REPORTS[:-_MAX_REPORTS]
    if report.rewritten() or report.note:
        log.info("%s", report)
    else:
        log.debug("%s", report)


def compile_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None,
                    **kwargs) -> Callable:
    """The ``"fastarch"`` backend (also registered under that name for ``torch.compile``).

    Args:
        gm: the FX graph Dynamo captured.
        example_inputs: its example inputs (real tensors for the first compile).
        options: see :class:`CompileOptions`; keys it does not know go to Inductor.

    Example:
        >>> compiled = torch.compile(model, backend=fastarch.compile_backend)
    """
    opts = CompileOptions.parse(options)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"compile_backend got unexpected arguments {sorted(kwargs)}")
    report = rewrite_graph(gm, example_inputs, opts)
    _emit(report)
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if mode not in (None, "default"):  # as backend="inductor" does with mode=...
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(opts.inductor)
    if patches:
        return compile_fx(gm, example_inputs, config_patches=patches)
    return compile_fx(gm, example_inputs)


# ---- logging switch ------------------------------------------------------------------------------
def _setup_logging() -> None:
    torch_logs = os.environ.get("TORCH_LOGS", "")
    tokens = {t.strip() for t in torch_logs.split(",") if t.strip()}
    level = None
    if "+fastarch" in tokens or os.environ.get("FASTARCH_LOGS", "").lower() in ("debug", "2"):
        level = logging.DEBUG
    elif "fastarch" in tokens or os.environ.get("FASTARCH_LOGS", "") not in ("", "0"):
        level = logging.INFO
    if level is None or log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[fastarch.compile] %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


_setup_logging()
