"""Dependency graph for structured pruning: which channels of which parameters must go together.

The model is traced with ``torch.export`` (non-strict), which gives one closed set of ATen ops for
torchvision, timm and Hugging Face models alike, with every parameter and buffer as a named graph
input. Each parameter dimension that a channel can be removed from gets one integer id per index
("position"); activations carry *label tensors*: an int64 tensor broadcastable to the activation,
holding for every element the id of the channel it belongs to (-1: not tied to any channel).
Labels are propagated op by op:

* shape ops (view, permute, cat, unbind, expand, ...) are run on the label tensor itself;
* elementwise ops merge the labels of their inputs (union-find: "removed together");
* linear / conv / norms / embedding / attention tie activation labels to parameter positions;
* anything not understood *blocks* the labels that reach it (never pruned), so an unknown op
  makes the model less prunable, never wrong.

A *unit* is one union-find class (a channel, a whole attention head with its K/V heads, a group
of a grouped convolution); a :class:`ChannelGroup` is the set of units that touch the same
parameter dimensions (e.g. the 512 hidden neurons of one MLP). Removing a unit removes all its
positions from every parameter dimension it touches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import operator
import threading
import types
from typing import Any

import torch
from torch import nn

aten = torch.ops.aten

ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "where", "maximum",
    "minimum", "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "neg", "exp",
    "pow", "rsqrt", "sqrt", "abs", "clamp", "clamp_", "clamp_min", "clamp_max", "dropout",
    "clone", "contiguous", "to", "_to_copy", "type_as", "alias", "detach", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "mish", "mish_", "softplus", "hardtanh", "hardtanh_", "erf",
    "log", "reciprocal", "square", "masked_fill", "sin", "cos", "lift_fresh_copy", "celu",
    "selu", "gelu_tanh", "log_sigmoid", "logsigmoid", "glu_", "feature_dropout", "alpha_dropout",
    "native_dropout", "copy", "fill", "zeros_like", "ones_like", "full_like", "empty_like",
    "erfinv", "sign", "floor", "ceil", "round", "log1p", "expm1", "prelu",
}
SHAPE_OPS = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "cat", "stack", "select", "slice", "narrow", "unbind",
    "split", "split_with_sizes", "chunk", "repeat", "roll", "flip", "movedim", "tensor_split",
    "view_as", "reshape_as", "expand_as", "index_select", "constant_pad_nd", "pad", "swapaxes",
    "hstack", "vstack", "unfold", "numpy_T", "mT",
}
# ops whose output keeps the channel dims of the input (spatial work only)
CHANNEL_PRESERVING = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d",
    "_upsample_nearest_exact2d", "upsample_nearest1d", "max_pool2d_with_indices",
    "_adaptive_avg_pool2d", "upsample_linear1d", "_upsample_bilinear2d_aa",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "linalg_vector_norm",
              "max", "min", "logsumexp", "var_mean", "std_mean"}
INEXACT_REDUCTIONS = {"mean", "var", "std", "norm", "linalg_vector_norm", "amax", "amin", "max",
                      "min", "logsumexp", "var_mean", "std_mean"}
ALONG_DIM = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod"}
IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel",
           "_assert_async", "sym_constrain_range_for_size", "_check_is_size"}
NO_LABEL_SOURCES = {"arange", "zeros", "ones", "full", "empty", "scalar_tensor", "new_ones",
                    "new_zeros", "new_full", "new_empty", "randn", "rand", "tensor", "lift_fresh",
                    "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "logical_not",
                    "logical_and", "logical_or", "bitwise_not", "diff", "triu", "tril",
                    "argmax", "argmin", "bucketize"}


GROUPED_MM_MULTIPLE = 8


class GraphBuildError(RuntimeError):
    """The model could not be traced (within the time limit)."""


@dataclasses.dataclass
class ParamDim:
    """One prunable dimension of one parameter or buffer: ids start..start+size-1."""

    name: str
    dim: int
    start: int
    size: int
    role: str  # "out" (produces channels), "in" (consumes), "norm", "param" (used directly)


@dataclasses.dataclass
class ParamRef:
    """A parameter flowing through the graph; ``dims[i]`` is the parameter dim of view dim i."""

    name: str
    dims: tuple


@dataclasses.dataclass
class AttentionSite:
    """One attention call: where it lives and how its heads map to ids (for attribute updates)."""

    module: str
    q_heads: int
    kv_heads: int
    head_dim: int
    q_head_ids: list  # one representative id per query head
    kv_head_ids: list


@dataclasses.dataclass
class ChannelGroup:
    """Units (sets of ids) that touch the same parameter dims; the thing a ratio is applied to."""

    key: tuple  # sorted (param name, dim) pairs
    units: list  # list of roots
    positions: dict  # root -> {(name, dim): [indices]}
    kind: str  # "channels", "heads", "groups"
    exact: bool  # False when a norm over the channel dim couples it (LayerNorm, RMSNorm)
    multiple: int = 1  # the width kept stays a multiple of this (grouped matmuls)

    @property
    def size(self) -> int:
        return len(self.units)

    def describe(self) -> str:
        names = sorted({n.rsplit(".", 1)[0] for n, _ in self.key})
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} modules)" if len(names) > 4 else "")
        return f"{self.kind}[{self.size}] of {shown}"


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union a[i] with b[i] where both are >= 0 (distinct pairs only)."""
        a = a.reshape(-1)
        b = b.reshape(-1)
        ok = (a >= 0) & (b >= 0) & (a != b)
        if not bool(ok.any()):
            return
        pairs = torch.unique(torch.stack([a[ok], b[ok]], 1), dim=0).tolist()
        for x, y in pairs:
            self.union(x, y)

    def union_all(self, ids: torch.Tensor) -> None:
        ids = torch.unique(ids[ids >= 0]).tolist()
        for x in ids[1:]:
            self.union(ids[0], x)


def canonical(label: torch.Tensor | None) -> torch.Tensor | None:
    """Collapse dims along which the label is constant; None when nothing is labelled."""
    if label is None:
        return None
    if bool((label < 0).all()):
        return None
    for d in range(label.dim()):
        if label.shape[d] > 1:
            first = label.narrow(d, 0, 1)
            if bool((label == first).all()):
                label = first
    return label.contiguous()


def varying_dims(label: torch.Tensor | None) -> list[int]:
    if label is None:
        return []
    return [d for d in range(label.dim()) if label.shape[d] > 1]


def _reshape_blocks(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """The dims of shape ``a`` and of its reshape ``b`` in blocks of equal size, in order:
    (a dims, b dims) per block; [] for shapes with a zero-size dim or that do not match."""
    if 0 in a or 0 in b or math.prod(a) != math.prod(b):
        return []
    blocks, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        pa, pb, ia, jb = a[i], b[j], [i], [j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa, i = pa * a[i], i + 1
                ia.append(i - 1)
            else:
                pb, j = pb * b[j], j + 1
                jb.append(j - 1)
        blocks.append((ia, jb))
    return blocks


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _size(d) -> int:
    """A dim of a traced shape as an int; 1 for a size known only at run time (an unbacked
    SymInt, e.g. the tokens routed to one expert: JetMoE splits by ``expert_size.tolist()``).
    Labels are constant along such dims (they carry tokens, not channels), so 1 broadcasts."""
    if isinstance(d, int):
        return d
    try:
        return int(d)
    except Exception:  # noqa: BLE001 - data-dependent: no value at trace time
        return 1


def _shape(node):
    v = _val(node)
    return tuple(_size(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _opname(target) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


class _ExportWrapper(nn.Module):
    """Calls the model and returns only its tensor outputs (HF ModelOutput / caches dropped)."""

    def __init__(self, model: nn.Module, kwargs: dict):
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args):
        out = self.model(*args, **self.kwargs)
        return tuple(flatten_tensors(out))


def flatten_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        res = []
        for o in out:
            res.extend(flatten_tensors(o))
        return res
    return []


def positional_inputs(model: nn.Module, kwargs: dict) -> tuple:
    """Keyword inputs (an encoder-decoder's decoder_input_ids) as the positional tuple that
    every pass of the pruner calls the model with; the parameters between them get their
    defaults."""
    import inspect

    kwargs = {k: v for k, v in kwargs.items() if k not in model_call_kwargs(model)}
    odd = [k for k, v in kwargs.items() if v is not None and not isinstance(v, torch.Tensor)]
    if odd:
        raise ValueError(f"example_inputs: {odd[0]!r} is not a tensor (the dict holds the "
                         "model's tensor inputs; the pruner sets use_cache itself)")
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ValueError(f"example_inputs: {type(model).__name__}.forward has no positional "
                         f"parameter {unknown[0]!r}")
    last = max((names.index(k) for k in kwargs), default=-1)
    return tuple(kwargs[p.name] if p.name in kwargs else (None if p.default is p.empty
                                                          else p.default)
                 for p in params[:last + 1])


def model_call_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that make a Hugging Face model return plain tensors."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        return {"use_cache": False}
    return {}


def export_model(model: nn.Module, example_inputs: tuple, timeout: float):
    """torch.export (non-strict) under a time limit; GraphBuildError on failure or timeout.

    Export runs in a worker thread (no signals: safe in any thread, under pytest-timeout,
    servers and notebooks). When the limit passes, a cancel flag makes the next submodule call
    of the trace raise, so export unwinds cleanly in the worker; a trace stuck inside a single
    op cannot be interrupted and its daemon thread is abandoned."""
    wrapper = _ExportWrapper(model, model_call_kwargs(model))
    cancel = threading.Event()
    limit_text = f"tracing took longer than the time limit ({timeout:g} s)"

    def check_cancel(mod, args):
        if cancel.is_set():
            raise GraphBuildError(limit_text)

    def do_export():
        handles = [m.register_forward_pre_hook(check_cancel) for m in model.modules()]
        try:
            with torch.no_grad():
                return torch.export.export(wrapper, tuple(example_inputs), strict=False)
        finally:
            for h in handles:
                h.remove()

    def failed(exc):
        if isinstance(exc, GraphBuildError):
            return exc
        return GraphBuildError(f"torch.export failed: {type(exc).__name__}: {str(exc)[:300]}")

    result: dict[str, Any] = {}

    def work():
        try:
            result["ep"] = do_export()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True, name="fastarch-prune-trace")
    thread.start()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        cancel.set()
        thread.join(5.0)  # let the trace unwind at its next module call
        raise GraphBuildError(limit_text)
    if cancel.is_set() or "error" in result:
        raise failed(result.get("error", GraphBuildError(limit_text)))
    return result["ep"]


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (also usable as a decorator). Building a graph
    allocates hundreds of thousands of small dicts and lists next to the large object graph of
    the export; each automatic collection then walks all of it, which took most of
    ``_build_groups`` (resnet50: ~0.9 s of ~1 s). Reference counting still frees everything
    that is not cyclic; the collector runs again as soon as the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class DependencyGraph:
    """Traces ``model`` and builds its channel groups. See the module docstring."""

    @gc_paused()
    def __init__(self, model: nn.Module, example_inputs: tuple, timeout: float = 120.0):
        import time

        self.model = model
        self.deadline = time.monotonic() + timeout
        self._time = time.monotonic
        self.uf = UnionFind()
        self.param_dims: dict[tuple[str, int], ParamDim] = {}
        self.blocked: set[int] = set()
        self.inexact: set[int] = set()
        self.problems: list[tuple[str, str]] = []  # (where, reason)
        self.constraints: list[tuple[torch.Tensor, int, str]] = []  # label, dim must be stable
        self.attention: list[AttentionSite] = []
        self.splits: list[tuple[str, torch.Tensor, int, int]] = []  # module, label, dim, pieces
        # the same cuts by sizes, one entry per call: module, the pieces' labels, dim (a module
        # may keep the sizes as one list: timm's ParallelScalingBlock ``in_split``)
        self.split_lists: list[tuple[str, list[torch.Tensor], int]] = []
        # constant slices along labelled dims: source node, dim, start, end, label, module
        self.slices: list[tuple[str, int, int, int, torch.Tensor, str]] = []
        self.convs: dict[str, tuple[int, int]] = {}  # weight name -> (in per group, out per group)
        self.group_norms: list[tuple[str, list[int], int]] = []  # module, channel ids, groups
        self.dim_multiple: dict[tuple[str, int], int] = {}  # widths kept a multiple of this
        self.split_ids: set[int] = set()  # channels whose dim was cut into several (heads)
        # view/reshape cutting a channel dim into several: module, label, sizes as written
        self.view_splits: list[tuple[str, torch.Tensor, list]] = []
        # the group-count dim of such a cut, read from a module attribute that removal updates:
        # module, label, dim, attribute (timm's EvoNorm: reshape(B, self.groups, C // groups, ..))
        self.group_splits: list[tuple[str, torch.Tensor, int, str]] = []
        self.param_derived: set[str] = set()  # nodes computed from parameters alone
        # parameter label, activation label it is broadcast against, module
        self.shared_params: list[tuple[torch.Tensor, torch.Tensor, str]] = []
        ep = export_model(model, example_inputs, timeout)
        self.ep = ep
        sig = ep.graph_signature
        self.input_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        prefix = "model."
        self.input_names = {k: v.removeprefix(prefix)
                            for k, v in self.input_names.items()}
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.params = set(self.tensors)
        self.tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self._propagate()
        self.groups = self._build_groups()

    # ---- ids ----------------------------------------------------------------------------
    def pid(self, name: str, dim: int, role: str) -> torch.Tensor:
        key = (name, dim)
        pd = self.param_dims.get(key)
        if pd is None:
            size = self.tensors[name].shape[dim]
            pd = ParamDim(name, dim, self.uf.add(size), size, role)
            self.param_dims[key] = pd
        elif role == "out" and pd.role != "out":
            pd.role = "out"
        return torch.arange(pd.start, pd.start + pd.size)

    def block(self, label, reason: str | None = None, where: str = "") -> None:
        if label is None:
            return
        if isinstance(label, ParamRef):
            for d in range(len(label.dims)):
                if label.dims[d] is not None:
                    self.blocked.update(self.pid(label.name, label.dims[d], "param").tolist())
            return
        if isinstance(label, (list, tuple)):
            for item in label:
                self.block(item, reason, where)
            return
        ids = label[label >= 0]
        if ids.numel():
            self.blocked.update(torch.unique(ids).tolist())
            if reason:
                self.problems.append((where, reason))

    # ---- label helpers ------------------------------------------------------------------
    def canon(self, label):
        """Labels as union-find roots, collapsed along dims where they are constant."""
        if label is None or isinstance(label, ParamRef):
            return label
        if label.numel() == 0:
            return None
        # collapse the dims where the ids are already constant first (the spatial dims of a
        # label run through a window partition): torch.unique then sorts the channel ids only,
        # not a full activation's worth (maxvit at 384: 14 of 28 s of the graph were here)
        label = canonical(label)
        if label is None:
            return None
        uniq, inv = torch.unique(label, return_inverse=True)
        roots = torch.tensor([self.uf.find(i) if i >= 0 else -1 for i in uniq.tolist()],
                             dtype=torch.long)
        return canonical(roots[inv].reshape(label.shape))

    def label_of(self, arg, env):
        if isinstance(arg, torch.fx.Node):
            return env.get(arg.name)
        return None

    def as_tensor_label(self, label, shape, where=""):
        """A ParamRef used as a plain tensor: label its only non-1 dim (or its last one)."""
        if not isinstance(label, ParamRef):
            return label
        if label.name not in self.params:
            return None  # a buffer used as data (rotary frequencies, masks): a fixed constant
        if shape is None or len(shape) == 0:
            return None
        big = [d for d in range(len(shape)) if shape[d] > 1]
        if not big:
            return None
        keep = big[-1]
        for d in big[:-1]:
            pdim = label.dims[d]
            if pdim is None:
                continue
            self.blocked.update(self.pid(label.name, pdim, "param").tolist())
        pdim = label.dims[keep]
        if pdim is None:
            return None
        ids = self.pid(label.name, pdim, "param")
        view = [1] * len(shape)
        view[keep] = shape[keep]
        return ids.reshape(view)

    def full(self, label, shape):
        if label is None:
            return torch.full(shape, -1, dtype=torch.long)
        while label.dim() < len(shape):
            label = label.unsqueeze(0)
        return label.expand(shape)

    # ---- propagation --------------------------------------------------------------------
    def _propagate(self) -> None:
        env: dict[str, Any] = {}
        graph = self.ep.graph
        for node in graph.nodes:
            if self._time() > self.deadline:
                raise GraphBuildError("building the dependency graph exceeded the time limit")
            if node.op == "placeholder":
                name = self.input_names.get(node.name)
                if name is not None and name in self.tensors and \
                        self.tensors[name].is_floating_point():
                    env[node.name] = ParamRef(name, tuple(range(self.tensors[name].dim())))
                else:
                    env[node.name] = None
            elif node.op == "call_function":
                where = self._where(node)
                try:
                    env[node.name] = self._visit(node, env, where)
                except Exception as exc:  # noqa: BLE001 - an op we mis-handle blocks, never breaks
                    self._block_inputs(node, env, f"{_opname(node.target)}: {exc}", where)
                    env[node.name] = None
            elif node.op == "output":
                for arg in torch.fx.node.map_arg(node.args, lambda n: n).__iter__():
                    self._block_output(arg, env)
            else:
                env[node.name] = None
        self._apply_constraints()

    def _block_output(self, arg, env):
        if isinstance(arg, (list, tuple)):
            for a in arg:
                self._block_output(a, env)
        elif isinstance(arg, torch.fx.Node):
            lab = env.get(arg.name)
            self.block(lab)

    def _where(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _clean_path(path)

    def _block_inputs(self, node, env, reason, where):
        for arg in node.all_input_nodes:
            lab = env.get(arg.name)
            if lab is not None:
                self.block(lab, reason, where)

    def _visit(self, node, env, where):
        name = _opname(node.target)
        args, kwargs = node.args, node.kwargs
        if name in IGNORED:
            return None
        if name.endswith("_") and not name.startswith("_") and name[:-1] in ELEMENTWISE:
            name = name[:-1]
        if name == "getitem":
            src = env.get(args[0].name)
            if isinstance(src, (list, tuple)):
                return src[args[1]]
            if src is None:
                return None
            raise ValueError("getitem on a tensor")
        tensor_inputs = [a for a in node.all_input_nodes if env.get(a.name) is not None]
        if not tensor_inputs and name not in ("linear", "conv1d", "conv2d", "conv3d", "convolution",
                                              "embedding", "batch_norm", "layer_norm",
                                              "group_norm", "rms_norm",
                                              "_native_batch_norm_legit_no_training",
                                              "addmm", "mm", "matmul"):
            return None
        if name in NO_LABEL_SOURCES:
            self._block_inputs(node, env, None, where)
            return None
        handler = getattr(self, f"_op_{name}", None)
        if handler is not None:
            return handler(node, env, where)
        if name in ELEMENTWISE:
            return self._elementwise(node, env, where)
        if name in SHAPE_OPS:
            return self._shape_op(node, env, where)
        if name in CHANNEL_PRESERVING:
            return self._channel_preserving(node, env, where)
        if name in REDUCTIONS:
            return self._reduction(node, env, where, name)
        if name in ALONG_DIM:
            lab = self._tensor_label(args[0], env)
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            if lab is not None:
                self.constraints.append((lab, dim % lab.dim(), where))
            return lab
        self._block_inputs(node, env, f"op {name} is not supported by the pruning graph", where)
        return None

    def _tensor_label(self, arg, env):
        lab = self.label_of(arg, env)
        if isinstance(lab, ParamRef):
            return self.as_tensor_label(lab, _shape(arg))
        return self.canon(lab)

    # ---- generic op families ------------------------------------------------------------
    def _elementwise(self, node, env, where):
        out_shape = _shape(node)
        if out_shape is None:
            return None
        items, param_items = [], []
        args = list(node.args) + list(node.kwargs.values())
        if _opname(node.target) in ("type_as", "to"):  # the other tensor gives only a dtype
            args = args[:1]
        for arg in args:
            if isinstance(arg, torch.fx.Node) and isinstance(_val(arg), torch.Tensor):
                raw = self.label_of(arg, env)
                lab = self._tensor_label(arg, env)
                if (isinstance(raw, ParamRef) or arg.name in self.param_derived) and \
                        lab is not None:
                    param_items.append((len(items), raw, lab))
                items.append((lab, _shape(arg)))
        if param_items and len(param_items) == sum(lab is not None for lab, _ in items):
            # computed from parameters only (Gemma's 1 + weight, a weight cast to float): still
            # a parameter to the activation it meets
            self.param_derived.add(node.name)
        # a parameter that varies along fewer labelled dims than the activation it scales (a
        # per-head-dim norm weight shared by all heads) is a constant there, not a channel source
        act_vary = set()
        for i, (lab, shp) in enumerate(items):
            if lab is not None and all(i != j for j, _, _ in param_items):
                off = len(out_shape) - lab.dim()
                act_vary.update(off + d for d in varying_dims(lab))
        shared = []
        for i, raw, lab in param_items:
            off = len(out_shape) - lab.dim()
            pv = {off + d for d in varying_dims(lab)}
            has_act = any(lab_ is not None for j, (lab_, _) in enumerate(items)
                          if all(j != k for k, _, _ in param_items))
            if has_act and not pv <= act_vary:
                self.block(lab)
                items[i] = (None, items[i][1])
            elif has_act and pv and pv < act_vary and self._from_split(items, param_items):
                # broadcast along a labelled dim (Qwen3's q_norm weight, shared by every head):
                # whether it goes with the channels or stays whole depends on units that are
                # only known after propagation (see _resolve_shared)
                shared.append(lab)
                items[i] = (None, (1,) * len(items[i][1]) if items[i][1] is not None else None)
        labelled = [lab for lab, _ in items if lab is not None]
        if not labelled:
            return None
        nd = len(out_shape)
        # common canonical shape: out size where any labelled input varies, else 1
        shape = [1] * nd
        for lab in labelled:
            off = nd - lab.dim()
            for d in range(lab.dim()):
                if lab.shape[d] > 1:
                    shape[off + d] = out_shape[off + d]
        out = None
        for lab, _ in items:
            if lab is None:
                continue
            f = self.full(lab, shape).clone()
            if out is None:
                out = f
            else:
                both = (out >= 0) & (f >= 0)
                self.uf.union_pairs(out[both], f[both])
                only_f = (out < 0) & (f >= 0)
                out[only_f] = f[only_f]
        out = self.canon(out)
        if out is None:
            for lab in shared:
                self.block(lab)
            return None
        for lab in shared:
            self.shared_params.append((lab, out, where))
        vary = varying_dims(out)
        for lab, shp in items:
            # an input with no channel labels but full extent along a labelled dim (a constant,
            # an unrelated tensor) cannot shrink: the labelled dim must then stay whole
            if shp is None:
                continue
            off = nd - len(shp)
            for d in vary:
                di = d - off
                if di < 0 or shp[di] == 1:
                    continue
                if lab is None or lab.dim() <= di or (lab.shape[di] == 1 and bool((lab < 0).any())):
                    self.constraints.append((out, d, where))
                elif bool((lab < 0).any()):
                    self.block(out, "elementwise op mixes channels with unlabelled values", where)
        return out

    def _shape_op(self, node, env, where):
        name = _opname(node.target)
        args = list(node.args)
        # a parameter going through transpose/permute/view stays a ParamRef where possible
        first = self.label_of(args[0], env) if args and isinstance(args[0], torch.fx.Node) else None
        if isinstance(first, ParamRef) and name == "select" and isinstance(args[2], int):
            # one expert of stacked expert weights (JetMoE's weight[i]): the expert dim leaves
            # the view; every expert shares the other dims' channel ids, so they prune alike
            d = args[1] % len(first.dims)
            return ParamRef(first.name, first.dims[:d] + first.dims[d + 1:])
        if isinstance(first, ParamRef) and name in ("t", "transpose", "permute", "numpy_T", "mT"):
            dims = list(first.dims)
            if name in ("t", "numpy_T"):  # Tensor.T (Falcon's linear) reverses every dim
                dims = dims[::-1]
            elif name == "mT":
                dims[-2:] = dims[-2:][::-1]
            elif name == "transpose":
                a, b = args[1] % len(dims), args[2] % len(dims)
                dims[a], dims[b] = dims[b], dims[a]
            else:
                dims = [dims[i] for i in args[1]]
            return ParamRef(first.name, tuple(dims))
        if name in ("constant_pad_nd", "pad") and not isinstance(first, ParamRef):
            # padding dims along which the label is constant (the spatial dims before a conv,
            # timm's dynamic "SAME" padding) keeps every element in its channel: the label
            # stands, broadcast. Run on the label tensor, the border would get label 0.
            lab = self._tensor_label(args[0], env)
            shape = _shape(args[0])
            if lab is not None and shape is not None and lab.dim() == len(shape):
                pad = args[1]
                dims = [len(shape) - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0]
                if all(lab.shape[d] == 1 for d in dims):
                    return lab
        new_args = []
        any_label = False
        for arg in args:
            if isinstance(arg, (list, tuple)) and arg and all(
                    isinstance(a, torch.fx.Node) and isinstance(_val(a), torch.Tensor) for a in arg):
                sub = []
                for a in arg:
                    lab = self._tensor_label(a, env)
                    any_label |= lab is not None
                    sub.append(self.full(lab, _shape(a)).contiguous())
                new_args.append(sub)
            elif isinstance(arg, torch.fx.Node) and isinstance(_val(arg), torch.Tensor):
                lab = self._tensor_label(arg, env)
                any_label |= lab is not None
                new_args.append(self.full(lab, _shape(arg)).contiguous())
            elif isinstance(arg, torch.fx.Node):
                new_args.append(_val(arg))
            elif isinstance(arg, (list, tuple)):  # sizes, some of them traced scalars
                new_args.append(type(arg)(_val(a) if isinstance(a, torch.fx.Node) else a
                                          for a in arg))
            else:
                new_args.append(arg)
        if not any_label:
            return None
        kwargs = {k: (_val(v) if isinstance(v, torch.fx.Node) else v) for k, v in node.kwargs.items()}
        kwargs.pop("value", None) if name == "constant_pad_nd" else None
        src = new_args[0]
        if name == "split_with_sizes" and isinstance(src, torch.Tensor):
            dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % src.dim()
            if not all(isinstance(z, int) for z in new_args[1]):
                # sizes known only at run time (tokens per expert): fine along a dim where the
                # label is constant, and every piece then has the source's label
                lab = self.canon(src)
                if lab is not None and lab.shape[dim] > 1:
                    raise ValueError("split by run-time sizes along a channel dim")
                return [lab] * len(args[1])
            pieces = node.target(*new_args, **kwargs)
            lab = self.canon(src)
            if lab is not None and lab.shape[dim] > 1:
                # a fused projection cut into differently sized parts (MQA's q | k | v): each
                # part may shrink; the module attribute holding its size is updated after
                # removal (and a size held anywhere else fails the verification run)
                for p in pieces:
                    self.splits.append((where, p, dim, len(pieces)))
                self.split_lists.append((where, list(pieces), dim))
            return [self.canon(p) for p in pieces]
        if name in ("select", "slice", "narrow", "index_select", "constant_pad_nd", "pad",
                    "unfold", "roll", "flip", "repeat", "tensor_split", "unbind"):
            dims = self._touched_dims(name, args, src)
            lab = self.canon(src)
            piece = self._slice_piece(name, args, src) if lab is not None else None
            for d in dims:
                if lab is not None and lab.shape[d] > 1:
                    if piece is not None:  # decided with the source's other slices, later
                        self.slices.append((args[0].name, d, piece[0], piece[1], lab, where))
                    else:
                        self.constraints.append((lab, d, where))
        if name in ("split", "chunk") and isinstance(src, torch.Tensor):
            dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % src.dim()
            pieces = node.target(*new_args, **kwargs)
            sizes = {p.shape[dim] for p in pieces}
            lab = self.canon(src)
            if lab is not None and lab.shape[dim] > 1:
                if len(sizes) == 1:  # equal pieces: position i of every piece goes together
                    for p in pieces[1:]:
                        self.uf.union_pairs(pieces[0], p)
                    self.splits.append((where, pieces[0], dim, len(pieces)))
                else:
                    self.constraints.append((lab, dim, where))
            return [self.canon(p) for p in pieces]
        result = node.target(*new_args, **kwargs)
        if isinstance(result, (list, tuple)):
            return [self.canon(r) for r in result]
        out = self.canon(result)
        if name in ("view", "reshape", "_unsafe_view", "unflatten") and out is not None and \
                isinstance(src, torch.Tensor) and len(varying_dims(out)) > len(varying_dims(
                    first if isinstance(first, torch.Tensor) else self.canon(src))):
            # one channel dim cut into several (heads x head dim, groups x channels)
            self.split_ids.update(torch.unique(out[out >= 0]).tolist())
        if name in ("view", "reshape", "_unsafe_view") and out is not None and \
                isinstance(src, torch.Tensor):
            self._note_view_split(where, self.canon(src), tuple(src.shape), out, new_args, kwargs)
        return out

    def _note_view_split(self, where, src_lab, src_shape, out, new_args, kwargs) -> None:
        """Record a view/reshape that cuts a labelled dim into several (for
        ``_resolve_view_splits``). Found from the shapes: once a group's channels are one unit,
        the label no longer varies inside the group, so labels alone do not show the cut."""
        sizes = new_args[1] if len(new_args) > 1 else kwargs.get("size", kwargs.get("shape"))
        if not isinstance(sizes, (list, tuple)) or len(sizes) != out.dim() or src_lab is None \
                or not all(type(z) is int for z in sizes):
            return
        true = self._true_sizes(sizes, src_shape)
        vary_src = set(varying_dims(src_lab))
        for ins, outs in _reshape_blocks(src_shape, tuple(true)):
            cut = [d for d in outs if true[d] > 1]
            if len(cut) >= 2 and vary_src & set(ins):
                self.view_splits.append((where, out, list(sizes), cut))

    @staticmethod
    def _true_sizes(sizes, src_shape) -> list[int]:
        sizes = [int(z) for z in sizes]
        if -1 in sizes:
            known = math.prod(z for z in sizes if z != -1)
            sizes[sizes.index(-1)] = math.prod(src_shape) // known if known else 0
        return sizes

    def _attention_head_roots(self) -> set[int]:
        """Roots of every query and K/V head unit of the attention sites (whose head counts
        removal updates)."""
        return {self.uf.find(i) for site in self.attention
                for i in site.q_head_ids + site.kv_head_ids if i >= 0}

    @staticmethod
    def _slice_piece(name, args, src):
        """(start, end) of a step-1 constant slice of a node, else None."""
        if name != "slice" or not isinstance(src, torch.Tensor) or not isinstance(args[0], torch.fx.Node):
            return None
        if len(args) > 1 and not isinstance(args[1], int):
            return None
        d = (args[1] if len(args) > 1 else 0) % src.dim()
        size = src.shape[d]
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else size
        step = args[4] if len(args) > 4 else 1
        if not all(isinstance(v, int) for v in (start, end, step)) or step != 1:
            return None
        start = max(0, start + size if start < 0 else start)
        end = min(size, end + size if end < 0 else end)
        return (start, end) if end > start else None

    def _resolve_slices(self) -> None:
        """Constant slices that cut one tensor into consecutive pieces covering it whole, each
        piece made of whole attention heads (Phi-3's fused qkv: q | k | v by head counts): heads
        are removed from every piece and the module's head counts, from which the slice bounds
        are computed, follow (removal.py). Any other slice along channels fixes their size."""
        by_src: dict = {}
        for src, d, start, end, lab, where in self.slices:
            by_src.setdefault((src, d), []).append((start, end, lab, where))
        head_roots = self._attention_head_roots()
        # only inside an attention module, whose head counts removal updates (the bounds are
        # computed from them); a tiling elsewhere could have literal bounds
        site_modules = {site.module for site in self.attention}
        for (src, d), pieces in by_src.items():
            size = pieces[0][2].shape[d]
            bounds = sorted({(a, b) for a, b, _, _ in pieces})
            tiles = len(bounds) > 1 and bounds[0][0] == 0 and bounds[-1][1] == size and \
                all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
            roots = self._roots(pieces[0][2])
            if tiles and head_roots and set(torch.unique(roots[roots >= 0]).tolist()) <= head_roots \
                    and not bool((roots < 0).any()) and \
                    all(where in site_modules for _, _, _, where in pieces):
                continue
            for _, _, lab, where in pieces:
                self.constraints.append((lab, d, where))

    @staticmethod
    def _touched_dims(name, args, src):
        nd = src.dim() if isinstance(src, torch.Tensor) else 0
        if name in ("select", "slice", "narrow", "index_select", "unfold", "split_with_sizes",
                    "tensor_split", "unbind"):
            d = args[1] if len(args) > 1 and isinstance(args[1], int) else 0
            if name in ("split_with_sizes", "tensor_split"):
                d = args[2] if len(args) > 2 else 0
            return [d % nd] if nd else []
        if name in ("roll", "flip"):
            dims = args[-1] if len(args) > 1 else list(range(nd))
            dims = [dims] if isinstance(dims, int) else list(dims)
            return [d % nd for d in dims]
        if name in ("constant_pad_nd", "pad"):
            pad = args[1]
            return [nd - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0]
        if name == "repeat":
            return [nd - len(args[1]) + i for i, r in enumerate(args[1]) if r != 1 and nd - len(args[1]) + i >= 0]
        return []

    def _channel_preserving(self, node, env, where):
        lab = self._tensor_label(node.args[0], env)
        if lab is None:
            return None
        out_shape = _shape(node)
        if out_shape is None:  # e.g. max_pool2d_with_indices returns a tuple
            vals = _val(node)
            out_shape = tuple(vals[0].shape)
            res = self.canon(lab)
            return [res, None]
        for d in varying_dims(lab):
            if d >= len(out_shape) or out_shape[d] != lab.shape[d]:
                raise ValueError("spatial op changes a labelled dim")
        return lab

    def _reduction(self, node, env, where, name):
        lab = self._tensor_label(node.args[0], env)
        if lab is None:
            return None
        args = node.args
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if name == "linalg_vector_norm":
            dims = args[2] if len(args) > 2 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", False)
        for a in args[2:]:
            if isinstance(a, bool):
                keep = a
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(lab.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted({d % lab.dim() for d in dims})
        vary = set(varying_dims(lab))
        reduced_vary = [d for d in dims if d in vary]
        out = lab
        if reduced_vary and not (vary - set(dims)):
            out = None  # a statistic over all channels (e.g. RMSNorm): carries no channel
            if name in INEXACT_REDUCTIONS:  # removing channels changes it
                self.inexact.update(torch.unique(lab[lab >= 0]).tolist())
        else:
            # a statistic per unit (Qwen3's q_norm over one head's channels): the constraint
            # keeps each reduced row inside one unit, which goes whole, so the others are exact
            for d in reduced_vary:
                self.constraints.append((lab, d, where))
            for d in dims:
                out = out.narrow(d, 0, 1)
        if out is not None and not keep:
            for d in reversed(dims):
                out = out.squeeze(d)
        if name in ("max", "min", "var_mean", "std_mean") and isinstance(_val(node), (list, tuple)):
            return [self.canon(out), None if name in ("max", "min") else self.canon(out)]
        return self.canon(out)

    # ---- layers -------------------------------------------------------------------------
    def _consume(self, lab, dim, w: ParamRef, wdim, where, role="in"):
        """Tie the labels of activation dim `dim` to parameter dim `wdim` (input channels)."""
        pdim = w.dims[wdim]
        ids = self.pid(w.name, pdim, role)
        if lab is None:
            self.blocked.update(ids.tolist())
            return
        other = [d for d in varying_dims(lab) if d != dim % lab.dim()]
        if other:
            self.blocked.update(ids.tolist())
            self.block(lab, "channel labels vary along several dims at a layer input", where)
            return
        x = lab.reshape(-1) if lab.shape[dim] > 1 else lab.reshape(-1).expand(ids.numel())
        if x.numel() != ids.numel():
            raise ValueError("layer input size does not match its weight")
        self.uf.union_pairs(x, ids)
        bad = x < 0
        if bool(bad.any()):
            self.blocked.update(ids[bad].tolist())
            self.block(x, "layer input mixes labelled and unlabelled channels", where)

    def _produce(self, w: ParamRef, wdim, out_shape, dim, bias=None):
        ids = self.pid(w.name, w.dims[wdim], "out")
        if isinstance(bias, ParamRef):
            self.uf.union_pairs(ids, self.pid(bias.name, bias.dims[0], "out"))
        view = [1] * len(out_shape)
        view[dim % len(out_shape)] = ids.numel()
        return ids.reshape(view)

    def _param_arg(self, node, i, env, key=None):
        arg = node.args[i] if len(node.args) > i else node.kwargs.get(key)
        lab = self.label_of(arg, env) if isinstance(arg, torch.fx.Node) else None
        return lab

    def _op_linear(self, node, env, where):
        x = self._tensor_label(node.args[0], env)
        w = self._param_arg(node, 1, env)
        b = self._param_arg(node, 2, env, "bias")
        if not isinstance(w, ParamRef):
            self.block(x, "linear with a computed weight", where)
            self.block(w)
            self.block(b)
            return None
        self._consume(x, -1, w, 1, where)
        return self._produce(w, 0, _shape(node), -1, b)

    def _op_addmm(self, node, env, where):
        bias = self.label_of(node.args[0], env)
        x = self._tensor_label(node.args[1], env)
        w = self.label_of(node.args[2], env)
        if not isinstance(w, ParamRef):
            return self._matmul(node, env, where, node.args[1], node.args[2], bias=node.args[0])
        self._consume(x, -1, w, 0, where)
        return self._produce(w, 1, _shape(node), -1, bias if isinstance(bias, ParamRef) else None)

    def _op_mm(self, node, env, where):
        return self._op_matmul(node, env, where)

    def _op_bmm(self, node, env, where):
        return self._matmul(node, env, where, node.args[0], node.args[1])

    def _op_matmul(self, node, env, where):
        w = self.label_of(node.args[1], env)
        if isinstance(w, ParamRef) and len(w.dims) == 2:
            x = self._tensor_label(node.args[0], env)
            self._consume(x, -1, w, 0, where)
            return self._produce(w, 1, _shape(node), -1)
        return self._matmul(node, env, where, node.args[0], node.args[1])

    def _matmul(self, node, env, where, a_node, b_node, bias=None):
        a = self._tensor_label(a_node, env)
        b = self._tensor_label(b_node, env)
        out_shape = _shape(node)
        sa, sb = _shape(a_node), _shape(b_node)
        if bias is not None and self.label_of(bias, env) is not None:
            raise ValueError("matmul bias")
        if a is None and b is None:
            return None
        if len(sa) < 2 or len(sb) < 2:
            raise ValueError("matmul of vectors")
        nd = len(out_shape)
        A = self.full(a, sa)
        B = self.full(b, sb)
        while A.dim() < nd:
            A = A.unsqueeze(0)
        while B.dim() < nd:
            B = B.unsqueeze(0)
        batch = list(out_shape[:-2])
        A = A.expand(batch + list(A.shape[-2:]))
        B = B.expand(batch + list(B.shape[-2:]))
        ca, cb = self.canon(A), self.canon(B)
        a_m = ca is not None and ca.shape[-2] > 1
        a_k = ca is not None and ca.shape[-1] > 1
        b_k = cb is not None and cb.shape[-2] > 1
        b_n = cb is not None and cb.shape[-1] > 1
        if (a_m and b_n) or (a_m and a_k) or (b_k and b_n):
            raise ValueError("matmul operands labelled along several dims")
        if a_k != b_k:
            raise ValueError("matmul contracts channels against unlabelled values")
        flat_a = A.reshape(-1, A.shape[-2], A.shape[-1])
        flat_b = B.reshape(-1, B.shape[-2], B.shape[-1])
        n = flat_a.shape[0]
        unit = torch.full((n,), -1, dtype=torch.long)
        for i in range(n):
            parts = []
            if a_k:
                ak, bk = flat_a[i, 0, :], flat_b[i, :, 0]
                if bool(((ak >= 0) != (bk >= 0)).any()):
                    raise ValueError("matmul contracts channels against unlabelled values")
                parts += [ak, bk]  # a contracted slice survives or goes whole (a head)
            if not a_m and not a_k:
                parts.append(flat_a[i, 0, :1])
            if not b_n and not b_k:
                parts.append(flat_b[i, :1, 0])
            ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            ids = ids[ids >= 0]
            if ids.numel():
                self.uf.union_all(ids)
                unit[i] = ids[0]
        if a is not None and b is not None and len(batch) >= 2 and not a_m and not b_n:
            self._eager_attention_site(unit.reshape(batch), flat_b, sa[-1], where)
        unit = unit.reshape(batch + [1, 1]) if batch else unit.reshape(1, 1)
        if a_m or b_n:
            lab = (A[..., :, :1] if a_m else B[..., :1, :]).contiguous()
            u = unit.expand_as(lab)
            both = (lab >= 0) & (u >= 0)
            self.uf.union_pairs(lab[both], u[both])
            lab = torch.where(lab >= 0, lab, u)
            return self.canon(lab)
        return self.canon(unit)

    def _op_conv(self, node, env, where, groups_index):
        x = self._tensor_label(node.args[0], env)
        w = self._param_arg(node, 1, env)
        b = self._param_arg(node, 2, env)
        groups = node.args[groups_index] if len(node.args) > groups_index else 1
        if not isinstance(w, ParamRef):
            # as for linear: the units the computed weight carries (e.g. a weight-standardised
            # conv: batch statistics over its input side) are not removable either
            self.block(x, "convolution with a computed weight", where)
            self.block(w)
            self.block(b)
            return None
        out_shape = _shape(node)
        if groups == 1:
            self._consume(x, 1, w, 1, where)
            return self._produce(w, 0, out_shape, 1, b)
        weight = self.tensors[w.name]
        cin_g = weight.shape[1]
        cout = weight.shape[0]
        cout_g = cout // groups
        self.convs[w.name] = (cin_g, cout_g)
        out_ids = self._produce(w, 0, out_shape, 1, b)
        self.blocked.update(self.pid(w.name, 1, "in").tolist())
        flat_out = out_ids.reshape(-1)
        if x is None or any(d != 1 for d in varying_dims(x)):
            self.blocked.update(flat_out.tolist())
            self.block(x)
            return out_ids
        xin = x.reshape(-1)
        if xin.numel() == 1:
            xin = xin.expand(cin_g * groups)
        for g in range(groups):  # a group of a grouped conv goes whole (input and output side)
            ids = torch.cat([xin[g * cin_g:(g + 1) * cin_g], flat_out[g * cout_g:(g + 1) * cout_g]])
            if bool((ids < 0).any()):
                self.blocked.update(ids[ids >= 0].tolist())
            self.uf.union_all(ids)
        return out_ids

    def _op_conv1d(self, node, env, where):
        return self._op_conv(node, env, where, 6)

    _op_conv2d = _op_conv1d
    _op_conv3d = _op_conv1d

    def _op_convolution(self, node, env, where):
        if node.args[6]:  # transposed
            self._block_inputs(node, env, "transposed convolution", where)
            return None
        return self._op_conv(node, env, where, 8)

    def _norm(self, node, env, where, dim, params, exact):
        x = self._tensor_label(node.args[0], env)
        refs = [p for p in params if isinstance(p, ParamRef)]
        if x is None:
            for p in refs:
                self.blocked.update(self.pid(p.name, p.dims[0], "norm").tolist())
            return None
        for p in refs:
            self._consume(x, dim, p, 0, where, role="norm")
        if not exact:
            self.inexact.update(torch.unique(x[x >= 0]).tolist())
        return x

    def _op_batch_norm(self, node, env, where):
        params = [self.label_of(a, env) for a in node.args[1:5]]
        return self._norm(node, env, where, 1, params, True)

    def _op__native_batch_norm_legit_no_training(self, node, env, where):
        params = [self.label_of(a, env) for a in node.args[1:5]]
        return [self._norm(node, env, where, 1, params, True), None, None]

    def _op_layer_norm(self, node, env, where):
        shape = node.args[1]
        if len(shape) != 1:
            self._block_inputs(node, env, "layer_norm over several dims", where)
            return None
        params = [self.label_of(a, env) for a in node.args[2:4]]
        return self._norm(node, env, where, -1, params, False)

    def _op_rms_norm(self, node, env, where):
        shape = node.args[1]
        if len(shape) != 1:
            self._block_inputs(node, env, "rms_norm over several dims", where)
            return None
        params = [self.label_of(a, env) for a in node.args[2:3]]
        return self._norm(node, env, where, -1, params, False)

    def _op_group_norm(self, node, env, where):
        x = self._tensor_label(node.args[0], env)
        groups = node.args[1]
        params = [self.label_of(a, env) for a in node.args[2:4]]
        if x is None or groups == 1:
            # one group normalises over every channel, as LayerNorm does: removing channels
            # changes the statistics, so the removal is not exact
            return self._norm(node, env, where, 1, params, False)
        if not self._reads_num_groups(where, groups):
            self.block(x, "group_norm whose group count is a constant of the code (no "
                          "num_groups attribute to update)", where)
            return self._norm(node, env, where, 1, params, True)
        full = self.full(x, _shape(node.args[0]))
        flat = self.canon(full)
        if flat is None or varying_dims(flat) != [1]:
            # channel labels that also vary along other dims: the channels stay as they are
            self.constraints.append((full, 1, where))
            return self._norm(node, env, where, 1, params, True)
        ids = flat.reshape(-1)
        per = ids.numel() // groups
        for g in range(groups):
            part = ids[g * per:(g + 1) * per]
            if bool((part < 0).any()):
                self.block(part, "a GroupNorm group holding channels that cannot be removed", where)
            else:
                # a normalisation group is removed whole or not at all; removing whole groups
                # leaves the others' statistics as they were, so it is exact
                self.uf.union_all(part)
        self.group_norms.append((where, ids.tolist(), groups))
        return self._norm(node, env, where, 1, params, True)

    def _reads_num_groups(self, where: str, groups: int) -> bool:
        """Whether this group_norm call reads the ``num_groups`` attribute of the module it runs
        in (nn.GroupNorm and its subclasses), which removal can update; False when the count is a
        constant of the code."""
        try:
            mod = self.model.get_submodule(where) if where else self.model
        except AttributeError:
            return False
        return getattr(mod, "num_groups", None) == groups

    def _op_embedding(self, node, env, where):
        w = self._param_arg(node, 0, env)
        idx = self.label_of(node.args[1], env)
        self.block(idx)
        if not isinstance(w, ParamRef):
            return None
        self.blocked.update(self.pid(w.name, w.dims[0], "param").tolist())
        return self._produce(w, 1, _shape(node), -1)

    # ---- routing (mixture of experts) -----------------------------------------------------
    def _op_index_add(self, node, env, where):
        """out = self with source's rows added at index along dim (MoE outputs scattered back to
        their tokens): elementwise between self and source, if neither varies along dim."""
        dim = node.args[1]
        shape = _shape(node)
        if shape is None or len(node.args) < 4:
            raise ValueError("index_add with unexpected arguments")
        d = dim % len(shape)
        for arg in (node.args[0], node.args[3]):
            lab = self._tensor_label(arg, env)
            if lab is not None and lab.dim() > len(shape) - 1 - d and \
                    lab.shape[d - (len(shape) - lab.dim())] > 1:
                raise ValueError("index_add along a labelled dim")
        pair = types.SimpleNamespace(args=(node.args[0], node.args[3]), kwargs={},
                                     target=node.target, meta=node.meta, name=node.name)
        return self._elementwise(pair, env, where)

    def _op_topk(self, node, env, where):
        """Top-k / sort along a dim: which entries win depends on all of them (a router's choice
        among its experts), so channels along that dim stay; labels along other dims pass."""
        lab = self._tensor_label(node.args[0], env)
        if lab is None:
            return None
        name = _opname(node.target)
        pos = 2 if name == "topk" else 1
        dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", -1)
        dim %= lab.dim()
        if lab.shape[dim] > 1:  # the winners are unlabelled values (which expert, its weight)
            self.block(lab)
            return [None, None]
        out = self.canon(lab)
        return [out, out]

    _op_sort = _op_topk

    def _op_gather(self, node, env, where):
        """gather(x, dim, index): picks along ``dim`` (a router's weights of the chosen experts);
        labels along the other dims pass where the index spans them whole."""
        lab = self._tensor_label(node.args[0], env)
        self.block(self.label_of(node.args[2], env))
        if lab is None:
            return None
        dim = node.args[1] % lab.dim()
        shape, out_shape = _shape(node.args[0]), _shape(node)
        if lab.shape[dim] > 1:
            self.block(lab)
            return None
        if any(lab.shape[d] > 1 and out_shape[d] != shape[d] for d in range(lab.dim())):
            self.block(lab, "gather of part of the channels", where)
            return None
        return lab

    def _op_index(self, node, env, where):
        """x[idx...] with index tensors along dims where the labels are constant (tokens routed
        to an expert, a bias row per token's expert): the other dims keep their labels."""
        x = self.label_of(node.args[0], env)
        shape = _shape(node.args[0])
        if isinstance(x, ParamRef):
            x = self.as_tensor_label(x, shape, where)
        indices = list(node.args[1])
        for i in indices:
            if isinstance(i, torch.fx.Node) and self.label_of(i, env) is not None:
                raise ValueError("index with labelled index tensors")
        if x is None:
            return None
        if shape is None or x.dim() != len(shape):
            raise ValueError("index on a label of unknown shape")
        lab = x
        picks = []
        for d, i in enumerate(indices):
            if i is None:
                picks.append(None)
                continue
            v = _val(i) if isinstance(i, torch.fx.Node) else None
            if not isinstance(v, torch.Tensor) or v.dtype == torch.bool:
                raise ValueError("index with a mask or a non-tensor index")
            if lab.shape[d] > 1:
                self.block(lab, "indexing along the channels", where)
                return None
            picks.append(torch.zeros(tuple(v.shape), dtype=torch.long))
        return self.canon(torch.ops.aten.index.Tensor(lab, picks))

    def _op_grouped_mm(self, node, env, where):
        """One matmul per expert over its rows of x: (S, in) x (E, in, out) -> (S, out), the
        3-d weight of every expert at once (transformers' MoE experts, torch's grouped mm). A
        channel of the expert width is removed from every expert together."""
        x = self._tensor_label(node.args[0], env)
        w = self.label_of(node.args[1], env)
        self.block(self.label_of(node.args[2], env) if len(node.args) > 2 else None)
        if not isinstance(w, ParamRef) or len(w.dims) != 3 or w.name not in self.params:
            self.block(x, "grouped matmul with a computed weight", where)
            self.block(w)
            return None
        # torch._grouped_mm (what transformers runs outside export) wants the strides of its
        # operands to be multiples of 16 bytes: both widths stay multiples of 8
        for d in (1, 2):
            self.dim_multiple[(w.name, w.dims[d])] = GROUPED_MM_MULTIPLE
        self._consume(x, -1, w, 1, where)
        return self._produce(w, 2, _shape(node), -1)

    _op_grouped_mm_fallback = _op_grouped_mm
    _op__grouped_mm = _op_grouped_mm

    def _op_scaled_dot_product_attention(self, node, env, where):
        q, k, v = (self._tensor_label(a, env) for a in node.args[:3])
        mask = self.label_of(node.args[3], env) if len(node.args) > 3 else node.kwargs.get("attn_mask")
        self.block(mask if not isinstance(mask, torch.fx.Node) else None)
        if q is None and k is None and v is None:
            return None
        sq, sk, sv = (_shape(a) for a in node.args[:3])
        Q = self.full(q, sq)
        K = self.full(k, sk)
        V = self.full(v, sv)
        hq, hk = sq[-3], sk[-3]
        rep = hq // hk
        # per head: labels along the sequence must be constant
        for name_, lab in (("q", q), ("k", k), ("v", v)):
            if lab is not None and lab.dim() >= 2 and lab.shape[-2] > 1:
                raise ValueError(f"attention {name_} labelled along the sequence")
        Qh = Q.reshape(-1, hq, sq[-2], sq[-1])[0, :, 0, :]
        Kh = K.reshape(-1, hk, sk[-2], sk[-1])[0, :, 0, :]
        Vh = V.reshape(-1, hk, sv[-2], sv[-1])[0, :, 0, :]
        if hq > 1 and self._shared_kv(Kh, Vh):
            return self._multi_query(Qh, Kh, Vh, node, where)
        q_rep, kv_rep = [], []
        for h in range(hq):
            g = h // rep
            ids = torch.cat([Qh[h], Kh[g], Vh[g]])
            if bool((ids < 0).any()):
                self.block(ids, "attention head only partly labelled", where)
            self.uf.union_all(ids)
            q_rep.append(int(ids[ids >= 0][0]) if bool((ids >= 0).any()) else -1)
        for g in range(hk):
            kv_rep.append(q_rep[g * rep])
        if hk == hq and hq > 1:  # K/V repeated per query head before the call (repeat_kv)
            groups = self._kv_groups(torch.cat([Kh, Vh], dim=1))
            hk, kv_rep = len(groups), [q_rep[g] for g in groups]
        self.attention.append(AttentionSite(where, hq, hk, sq[-1], q_rep, kv_rep))
        out_shape = _shape(node)
        lab = torch.tensor(q_rep).reshape(hq, 1, 1)
        while lab.dim() < len(out_shape):
            lab = lab.unsqueeze(0)
        # the head id goes with every value channel of that head
        out = self.full(lab, out_shape[:-1] + (1,))
        vout = Vh.repeat_interleave(rep, dim=0).reshape(hq, 1, sv[-1])
        while vout.dim() < len(out_shape):
            vout = vout.unsqueeze(0)
        out = torch.where(vout.expand(out.shape[:-1] + (sv[-1],)) >= 0,
                          vout.expand(out.shape[:-1] + (sv[-1],)),
                          out.expand(out.shape[:-1] + (sv[-1],)))
        return self.canon(out.contiguous())

    def _eager_attention_site(self, unit, flat_b, head_dim, where):
        """Q K^T written as a matmul of two activations (HF "eager" attention, timm without
        fused_attn): each (batch, head) slice became one unit with its contracted channels, so
        heads are units as with SDPA; record the site so that head counts are updated too. K was
        repeated per query head (repeat_kv): heads with the same K labels share a K/V head."""
        heads = unit.reshape(-1, unit.shape[-1])[0]
        hq = heads.numel()
        keys = flat_b.reshape(-1, hq, *flat_b.shape[1:])[0, :, :, 0]  # K channel labels per head
        groups = self._kv_groups(keys)
        q_rep = heads.tolist()
        last = self.attention[-1] if self.attention else None
        if last is not None and last.module == where and last.q_head_ids == q_rep:
            return  # P V of the same attention (its V unlabelled per channel, e.g. K reused)
        # (every head sharing one K, MQA, made all of them one unit: nothing is removed, but the
        # site still tells the head count, which the hidden size must stay a multiple of)
        self.attention.append(AttentionSite(where, hq, len(groups), head_dim, q_rep,
                                            [q_rep[g] for g in groups]))

    @staticmethod
    def _kv_groups(keys) -> list[int]:
        """The first query head of each K/V head, from K's labels per query head: K repeated
        for its group (repeat_kv) shows the same labels in consecutive heads."""
        hq = keys.shape[0]
        groups = [h for h in range(hq) if h == 0 or not torch.equal(keys[h], keys[h - 1])]
        hk = len(groups)
        if hk == 0 or hq % hk or groups != list(range(0, hq, hq // hk)) or \
                not bool((keys >= 0).all()):
            return list(range(hq))  # not a repeat_kv pattern: count the heads as seen
        return groups

    @staticmethod
    def _shared_kv(Kh, Vh) -> bool:
        """One K/V head serves every query head (MQA), given directly or repeated (repeat_kv)."""
        kv = torch.cat([Kh, Vh], dim=1)
        return bool((kv == kv[:1]).all()) and bool((kv >= 0).any())

    def _multi_query(self, Qh, Kh, Vh, node, where):
        """MQA: tying every query head to the one shared K/V head would make all heads a single
        unit (nothing prunable). Instead each query head is its own unit and the shared K/V
        channels are kept whole: removing query heads never changes what the others compute."""
        hq = Qh.shape[0]
        self.block(torch.cat([Kh.reshape(-1), Vh.reshape(-1)]))
        q_rep = []
        for h in range(hq):
            ids = Qh[h]
            if bool((ids < 0).any()):
                self.block(ids, "attention head only partly labelled", where)
            self.uf.union_all(ids)
            q_rep.append(int(ids[ids >= 0][0]) if bool((ids >= 0).any()) else -1)
        self.attention.append(AttentionSite(where, hq, 1, Qh.shape[-1], q_rep, [-1]))
        out_shape = _shape(node)
        lab = torch.tensor(q_rep).reshape(hq, 1, 1)
        while lab.dim() < len(out_shape):
            lab = lab.unsqueeze(0)
        # every output channel of a head goes with that query head (V's channels are kept)
        return self.canon(self.full(lab, out_shape).contiguous())

    # ---- after propagation --------------------------------------------------------------
    def _roots(self, label: torch.Tensor) -> torch.Tensor:
        flat = label.reshape(-1).tolist()
        return torch.tensor([self.uf.find(i) if i >= 0 else -1 for i in flat]).reshape(label.shape)

    def _from_split(self, items, param_items) -> bool:
        """Whether every activation channel here comes from one channel dim cut into several
        (a head split): only there can a parameter broadcast along the other dims be shared by
        units. Tokens labelled differently (a concatenated class token) are not such dims."""
        roots = None
        skip = {j for j, _, _ in param_items}
        for j, (lab, _) in enumerate(items):
            if lab is None or j in skip:
                continue
            ids = torch.unique(lab[lab >= 0]).tolist()
            if not ids:
                return False
            if all(i in self.split_ids for i in ids):  # the usual case: labelled at the split
                continue
            if roots is None:
                roots = {self.uf.find(i) for i in self.split_ids}
            if any(self.uf.find(i) not in roots for i in ids):
                return False
        return True

    def _resolve_shared(self) -> None:
        """A parameter broadcast along a dim where its activation is labelled. Where the units
        (as propagation left them) are whole along the parameter's own dims, each unit is a
        slice along the broadcast dims and all of them share the parameter (a per-head-dim
        norm weight applied to every head): it stays whole. Otherwise it is an ordinary
        per-channel parameter: it goes with the channels, and ties them across the broadcast
        dims (one channel of every group)."""
        for plab, alab, where in self.shared_params:
            nd = max(plab.dim(), alab.dim())
            P = plab.reshape((1,) * (nd - plab.dim()) + tuple(plab.shape))
            A = alab.reshape((1,) * (nd - alab.dim()) + tuple(alab.shape))
            own = [d for d in range(nd) if P.shape[d] > 1]
            P, A = torch.broadcast_tensors(P, A)
            roots = self._roots(A.contiguous())
            if all(bool((roots == roots.narrow(d, 0, 1)).all()) for d in own):
                self.block(plab)
            else:
                both = (P >= 0) & (A >= 0)
                self.uf.union_pairs(P[both], A[both])

    GROUP_COUNT_ATTRS = ("groups", "num_groups")

    def _resolve_view_splits(self) -> None:
        """A channel dim cut by view/reshape into (count, size) with the count written as a
        number: the traced program holds every size as a constant, but the model's code
        computes one of them when it runs again. The size written -1 follows the channels; a
        count that equals a group-count attribute of the module (timm's EvoNorm
        ``reshape(B, self.groups, C // self.groups, H, W)``) is updated by removal. Any other
        count, where removal may change it (a slice along it is one unit, removed whole), is a
        constant of the code: kept fixed. Heads are left to the attention sites, which update
        the head counts."""
        head_roots = self._attention_head_roots()
        for where, lab, sizes, cut in self.view_splits:
            d = cut[0]  # the outer dim of the cut: the count of groups (or heads)
            if sizes[d] == -1 or lab.shape[d] == 1:
                continue
            roots = self._roots(lab)
            if bool((roots == roots.narrow(d, 0, 1)).all()):
                continue  # every unit spans the dim: removal cannot change the count
            part = roots
            for k in range(roots.dim()):
                if k not in cut:
                    part = part.narrow(k, 0, 1)
            rows = part.movedim(d, 0).reshape(part.shape[d], -1)
            if not any(bool((r == r[0]).all()) for r in rows):
                # several units in every slice (ShuffleNet's halves): units go from the slices
                # alike or the view fails its check run; no slice goes whole, so the count stays
                continue
            ids = set(torch.unique(roots[roots >= 0]).tolist())
            if head_roots and ids <= head_roots:
                continue
            try:
                mod = self.model.get_submodule(where) if where else self.model
            except AttributeError:
                mod = None
            attr = next((a for a in self.GROUP_COUNT_ATTRS
                         if getattr(mod, a, None) == lab.shape[d] and
                         not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
            if attr is not None and not bool((roots < 0).any()):
                self.group_splits.append((where, lab, d, attr))
            else:
                self.constraints.append((lab, d, where))

    def _apply_constraints(self) -> None:
        self._resolve_shared()
        self._resolve_slices()
        self._resolve_view_splits()
        blocked = {self.uf.find(i) for i in self.blocked}
        for label, dim, where in self.constraints:
            roots = self._roots(label)
            if roots.shape[dim] > 1 and not bool((roots == roots.narrow(dim, 0, 1)).all()):
                # already blocked (a router's softmax over the experts its topk keeps): no news
                known = all(r in blocked for r in torch.unique(roots[roots >= 0]).tolist())
                self.block(label, None if known else
                           "a fixed-size op (slice, pad, split, constant) along the channels", where)

    def _all_roots(self) -> list[int]:
        """Root of every id, found for all ids at once (pointer jumping on a tensor)."""
        parent = torch.tensor(self.uf.parent, dtype=torch.long)
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                return parent.tolist()
            parent = grand

    def _build_groups(self) -> list[ChannelGroup]:
        find = self.uf.find
        blocked_roots = {find(i) for i in self.blocked}
        inexact_roots = {find(i) for i in self.inexact}
        root_of = self._all_roots()
        units: dict[int, dict] = {}
        has_out: set[int] = set()
        for key, pd in self.param_dims.items():
            roots = root_of[pd.start:pd.start + pd.size]
            for i, r in enumerate(roots):
                pos = units.get(r)
                if pos is None:
                    units[r] = {key: [i]}
                elif key in pos:
                    pos[key].append(i)
                else:
                    pos[key] = [i]
            if pd.role in ("out", "param"):
                has_out.update(roots)
        head_roots = set()
        for site in self.attention:
            head_roots.update(find(i) for i in site.q_head_ids if i >= 0)
        grouped_roots = set()
        for name, (cin_g, cout_g) in self.convs.items():
            if cin_g > 1 or cout_g > 1:
                pd = self.param_dims.get((name, 0))
                if pd is not None:
                    grouped_roots.update(root_of[pd.start:pd.start + pd.size])
        for _, ids, groups in self.group_norms:
            if len(ids) > groups:  # a unit holds a whole normalisation group of channels
                grouped_roots.update(root_of[i] for i in ids if i >= 0)
        by_key: dict[tuple, list[int]] = {}
        for r, pos in units.items():
            if r in blocked_roots or r not in has_out:
                continue
            key = tuple(sorted(pos))
            by_key.setdefault(key, []).append(r)
        groups = []
        for key, roots in by_key.items():
            if len(roots) < 2:
                continue
            kind = "heads" if roots[0] in head_roots else (
                "groups" if roots[0] in grouped_roots else "channels")
            exact = not any(r in inexact_roots for r in roots)
            multiple = math.lcm(1, *(self.dim_multiple.get(k, 1) for k in key))
            groups.append(ChannelGroup(key, sorted(roots), {r: units[r] for r in roots}, kind,
                                       exact, multiple))
        groups.sort(key=lambda g: min(self.param_dims[k].start for k in g.key))
        return groups


def _clean_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].model.layers[0].mlp" or "model.layers.0.mlp"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "[":
            j = path.index("]", i)
            token = path[i + 1:j].strip("'\"")
            out.append("." + token)
            i = j + 1
        else:
            out.append(c)
            i += 1
    res = "".join(out)
    if res.startswith("model."):
        res = res[len("model."):]
    elif res == "model":
        res = ""
    return res
