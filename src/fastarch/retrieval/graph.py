"""Normalised operator graphs of architectures.

One forward pass on meta tensors (no memory, no compute) under a ``TorchFunctionMode`` records
every top-level torch function call with the tensors it reads and writes. Shape-only calls
(view, permute, getitem, dropout, ...) are folded into their input, so the graph holds compute
operators only, each labelled with a normalised name (``conv2d.k3.dw``, ``linear``, ``matmul``,
``softmax``, ``layer_norm``, ``gelu``, ``add``, ...), never with module or model names.

A forward pass that stops part way (data-dependent control flow on meta, an unsupported input)
keeps what it recorded, and the leaf modules that it never reached are appended as a chain read
from the module tree, so every model gets a graph; ``OpGraph.method`` says which way it was read:
``"trace"`` (complete forward), ``"partial"`` (forward stopped; module tree for the rest) or
``"module_tree"`` (no forward at all).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastarch.retrieval.meta_shortcuts import FLOP_SHORTCUTS, META_SHORTCUTS

__all__ = ["ExtractionTimeout", "OpGraph", "extract_graph", "module_tree_graph"]

# ops that only move or reshape data: folded into their input
_PASS = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "getitem", "setitem", "split",
    "chunk", "unbind", "to", "type", "float", "half", "bfloat16", "double", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clone", "detach", "t",
    "movedim", "moveaxis", "narrow", "select", "index_select", "tensor_split", "swapaxes",
    "type_as", "cuda", "cpu", "requires_grad", "as_strided", "repeat", "tile", "broadcast_to",
    "flip", "pad", "constant_pad_nd", "identity", "masked_fill", "fill", "zero", "copy",
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "long", "int", "bool", "repeat_interleave", "gather",
    "clamp", "clip", "nan_to_num", "contiguous_", "squeeze_", "unsqueeze_", "transpose_",
    "roll_", "triu", "tril", "expand_copy", "split_with_sizes", "index", "item", "tolist",
}
# canonical names for synonyms
_CANON = {
    "iadd": "add", "radd": "add", "sub": "add", "rsub": "add", "isub": "add", "subtract": "add",
    "imul": "mul", "rmul": "mul", "multiply": "mul", "div": "mul", "truediv": "mul",
    "rtruediv": "mul", "itruediv": "mul", "divide": "mul", "floordiv": "mul",
    "bmm": "matmul", "mm": "matmul", "baddbmm": "matmul", "addmm": "linear", "einsum": "matmul",
    "rmatmul": "matmul", "matmul": "matmul", "bilinear": "linear",
    "scaled_dot_product_attention": "attention", "multi_head_attention_forward": "attention",
    "softmax": "softmax", "log_softmax": "softmax", "softmin": "softmax",
    "relu": "relu", "relu6": "relu", "hardtanh": "relu", "leaky_relu": "relu", "prelu": "relu",
    "rrelu": "relu", "threshold": "relu", "elu": "relu", "selu": "relu", "celu": "relu",
    "gelu": "gelu", "silu": "silu", "mish": "silu", "sigmoid": "sigmoid", "hardsigmoid": "sigmoid",
    "hardswish": "hardswish", "tanh": "tanh", "softplus": "silu", "glu": "glu",
    "layer_norm": "layer_norm", "batch_norm": "batch_norm", "group_norm": "group_norm",
    "instance_norm": "group_norm", "rms_norm": "rms_norm", "local_response_norm": "batch_norm",
    "normalize": "l2_norm",
    "max_pool1d": "max_pool", "max_pool2d": "max_pool", "max_pool3d": "max_pool",
    "max_pool1d_with_indices": "max_pool", "max_pool2d_with_indices": "max_pool",
    "avg_pool1d": "avg_pool", "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool",
    "adaptive_avg_pool1d": "global_pool", "adaptive_avg_pool2d": "global_pool",
    "adaptive_avg_pool3d": "global_pool", "adaptive_max_pool1d": "global_pool",
    "adaptive_max_pool2d": "global_pool", "adaptive_max_pool3d": "global_pool",
    "lp_pool2d": "avg_pool",
    "cat": "concat", "concat": "concat", "concatenate": "concat", "stack": "concat",
    "hstack": "concat", "vstack": "concat",
    "mean": "reduce", "sum": "reduce", "amax": "reduce", "max": "reduce", "min": "reduce",
    "amin": "reduce", "var": "reduce", "std": "reduce", "var_mean": "reduce", "logsumexp": "reduce",
    "prod": "reduce", "norm": "reduce", "cumsum": "cumsum",
    "interpolate": "resize", "upsample": "resize", "upsample_nearest": "resize",
    "upsample_bilinear": "resize", "grid_sample": "resize", "pixel_shuffle": "resize",
    "pixel_unshuffle": "resize", "affine_grid": "resize",
    "embedding": "embedding", "embedding_bag": "embedding", "one_hot": "embedding",
    "pow": "math", "rsqrt": "math", "sqrt": "math", "exp": "math", "log": "math", "cos": "math",
    "sin": "math", "abs": "math", "neg": "math", "reciprocal": "math", "square": "math",
    "erf": "math", "log1p": "math", "expm1": "math", "sign": "math", "floor": "math",
    "ceil": "math", "round": "math", "atan2": "math", "rpow": "math", "ipow": "math",
    "roll": "roll", "unfold": "unfold", "fold": "unfold", "im2col": "unfold",
    "addcmul": "mul", "addcdiv": "mul", "lerp": "add", "where": "where",
    "topk": "topk", "sort": "topk", "argsort": "topk", "argmax": "topk", "argmin": "topk",
    "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose",
    "conv_transpose3d": "conv_transpose",
    "lstm": "rnn", "gru": "rnn", "rnn_tanh": "rnn", "rnn_relu": "rnn",
}
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
            "and", "or", "invert", "xor", "isin", "all", "any", "diff", "isnan", "isinf"}
# labels that count as "compute" layers for depth
_LAYER_OPS = ("conv", "linear", "matmul", "attention", "rnn", "embedding")


def _label_kind(label: str) -> str:
    return label.split(".", 1)[0]


@dataclasses.dataclass
class OpGraph:
    """A directed operator graph: ``labels[i]`` is node i's normalised op label, ``edges`` are
    ``(src, dst)`` data dependencies; nodes are in execution (topological) order."""

    labels: list[str]
    edges: list[tuple[int, int]]
    method: str = "trace"
    params: int = 0
    flops: int = 0
    width: int = 0
    input_kind: str = "image"
    error: str = ""
    dims: list | None = None  # per node: weight shape of layers (None elsewhere)

    def __len__(self):
        return len(self.labels)

    @property
    def op_counts(self) -> dict[str, int]:
        return dict(Counter(_label_kind(label) for label in self.labels))

    @property
    def depth(self) -> int:
        """Longest path counted in compute layers (conv, linear, matmul, attention, ...)."""
        if not self.labels:
            return 0
        preds = [[] for _ in self.labels]
        for s, d in self.edges:
            if s < d:
                preds[d].append(s)
        best = [0] * len(self.labels)
        for i, label in enumerate(self.labels):
            w = 1 if _label_kind(label).startswith(_LAYER_OPS) else 0
            best[i] = w + max((best[p] for p in preds[i]), default=0)
        return max(best)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["edges"] = [list(e) for e in self.edges]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OpGraph:
        d = dict(d)
        d["edges"] = [tuple(e) for e in d.get("edges", [])]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _func_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # property getters (Tensor.shape, ...)
        return "getattr"
    name = name.strip("_")
    if name.endswith("_") and name[:-1] in _CANON:
        name = name[:-1]
    return name


def _conv_label(weight: torch.Tensor, groups: int, stride) -> str:
    # weight: (out, in/groups, *kernel)
    dims = weight.dim() - 2
    k = max(weight.shape[2:]) if dims > 0 else 1
    in_per_group = weight.shape[1]
    kind = ""
    if groups > 1 and in_per_group == 1:
        kind = ".dw"
    elif groups > 1:
        kind = ".g"
    s = stride if isinstance(stride, int) else (max(stride) if stride else 1)
    return f"conv{dims}d.k{k}{kind}" + (".s2" if s and s > 1 else "")


def _iter_tensors(obj, depth=0) -> list[torch.Tensor]:
    """The tensors in ``obj`` and in the lists, tuples and dicts in it (3 levels), in order.

    A list, not a generator: the recorder reads the tensors of every call several times."""
    found: list[torch.Tensor] = []
    _collect_tensors(obj, depth, found)
    return found


def _collect_tensors(obj, depth, found):
    if isinstance(obj, torch.Tensor):
        found.append(obj)
        return
    if depth >= 3:
        return
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return
    for o in obj:  # tensors and scalars inline: most arguments are one of the two
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (list, tuple, dict)):
            _collect_tensors(o, depth + 1, found)


_NO_VALUE = object()


def _meta_value(func, args):
    """A stand-in for a data-dependent read of a meta tensor (``bool(t)``, ``t.item()``):
    meta tensors hold no values, so control flow takes the branch of "true"/"one", which in
    the models of the zoo is the plain path (no padding, all positions valid)."""
    name = _func_name(func)
    t = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if t is None or t.device.type != "meta":
        return _NO_VALUE
    if name == "bool":
        return True
    if name in ("item", "int", "float", "index"):
        if t.dtype == torch.bool:
            return True
        return 1.0 if t.dtype.is_floating_point else 1
    if name == "tolist":
        return torch.ones(t.shape, dtype=torch.long).tolist() if t.numel() <= 4096 else _NO_VALUE
    return _NO_VALUE


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.labels: list[str] = []
        self.dims: list = []  # per node: the weight shape (or heads, head dim), else None
        self.edges: list[tuple[int, int]] = []
        self.producer: dict[int, tuple[int, ...]] = {}  # id(tensor) -> producing nodes
        self.width = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            out = _meta_value(func, args)
            if out is _NO_VALUE:
                raise
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # recording must never change what the model computes
            pass
        return out

    def _sources(self, tensors):
        srcs = []
        for t in tensors:
            srcs.extend(self.producer.get(id(t), ()))
        return tuple(dict.fromkeys(srcs))

    def _set(self, tensors, nodes):
        for t in tensors:
            if isinstance(t, torch.nn.Parameter):
                continue
            key = id(t)
            if key not in self.producer:
                # forget the id when the tensor dies, so that a new tensor reusing the id is
                # not mistaken for it (and intermediate activations are freed as usual)
                weakref.finalize(t, self.producer.pop, key, None)
            self.producer[key] = nodes

    def _record(self, func, args, kwargs, out):
        name = _func_name(func)
        if name == "getattr":
            return
        outs = _iter_tensors(out)
        if not outs:
            return
        tensors = _iter_tensors(list(args) + list(kwargs.values()))
        srcs = self._sources(tensors)
        if name in _COMPARE:
            name = "compare"
        if name in _PASS:
            if srcs:
                self._set(outs, srcs)
            return
        label = _CANON.get(name, name)
        dims = None
        weight = None
        if label in ("linear", "conv_transpose", "embedding", "layer_norm", "group_norm",
                     "batch_norm", "rms_norm") or name in ("conv1d", "conv2d", "conv3d"):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if label in ("layer_norm", "group_norm", "rms_norm"):
                weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
            elif label == "batch_norm":
                weight = kwargs.get("weight", args[3] if len(args) > 3 else None)
            if isinstance(weight, torch.Tensor):
                dims = [int(d) for d in weight.shape]
        elif label == "attention" and tensors and tensors[0].dim() == 4:
            dims = [int(tensors[0].shape[1]), int(tensors[0].shape[-1])]  # heads, head dim
        if name in ("conv1d", "conv2d", "conv3d"):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            label = _conv_label(weight, int(groups), stride)
            self.width = max(self.width, int(weight.shape[0]))
        elif label == "conv_transpose":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.width = max(self.width, int(weight.shape[1]))
        elif label == "linear":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                self.width = max(self.width, int(weight.shape[0]))
        elif label in ("add", "mul"):
            # a binary op between two computed tensors (residual, gating) or with a constant
            computed = sum(1 for t in tensors if id(t) in self.producer)
            if computed < 2:
                label = label + ".c"
        if not srcs:
            return  # computed from constants only (masks, position tables, anchors)
        node = len(self.labels)
        self.labels.append(label)
        self.dims.append(dims)
        self.edges.extend((s, node) for s in srcs if s >= 0)
        self._set(outs, (node,))

    def mark_inputs(self, args, kwargs):
        # -1: the graph input (not a node)
        self._set(_iter_tensors(list(args) + list(kwargs.values())), (-1,))


class _FlopCounter(TorchDispatchMode):
    """FLOPs of the aten ops seen, by torch's own per-op formulas (those of FlopCounterMode,
    without its module tracker, which some models trip over). On meta tensors it runs the ops
    that have a cheaper stand-in for torch's Python meta kernel through that stand-in
    (:mod:`~fastarch.retrieval.meta_shortcuts`: same output shapes, dtypes and strides)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shortcut = META_SHORTCUTS.get(func)
        out = shortcut(*args, **kwargs) if shortcut is not None else None
        if out is None:
            out = func(*args, **kwargs)
        count = FLOP_SHORTCUTS.get(func) or self.registry.get(func._overloadpacket)
        if count is not None:
            try:
                self.total += int(count(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001  (a formula that does not fit: not counted)
                pass
        return out


class ExtractionTimeout(RuntimeError):
    """Graph extraction took longer than its time limit."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise ExtractionTimeout(f"graph extraction took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _leaf_label(module: torch.nn.Module) -> str | None:
    """Op label of a leaf module read from its type and shapes (module-tree fallback)."""
    nn = torch.nn
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_label(module.weight, module.groups, module.stride)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, (nn.RNNBase,)):
        return "rnn"
    table = {
        nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.ReLU: "relu", nn.ReLU6: "relu",
        nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish",
        nn.Hardsigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax", nn.MaxPool2d: "max_pool",
        nn.AvgPool2d: "avg_pool", nn.AdaptiveAvgPool2d: "global_pool", nn.LeakyReLU: "relu",
        nn.Mish: "silu", nn.ELU: "relu", nn.PReLU: "relu", nn.Upsample: "resize",
    }
    for cls, label in table.items():
        if isinstance(module, cls):
            return label
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch_norm"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "group_norm"
    # custom leaves with weights: a generic label from their parameter shapes, never the name
    ps = [p for p in module.parameters(recurse=False)]
    if ps and all(p.dim() == 1 for p in ps):
        return "norm"
    if ps:
        return "linear" if any(p.dim() == 2 for p in ps) else "param_op"
    return None


def _leaves(model):
    return [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]


def module_tree_graph(model: torch.nn.Module, skip: set | None = None) -> tuple[list[str], list]:
    """Leaf modules in registration order as a chain of op labels (the fallback reading)."""
    labels, _ = _module_tree(model, skip)
    return labels, [(i, i + 1) for i in range(len(labels) - 1)]


def _module_tree(model, skip=None):
    labels, dims = [], []
    for _, m in _leaves(model):
        if skip is not None and id(m) in skip:
            continue
        label = _leaf_label(m)
        if label is not None:
            labels.append(label)
            w = getattr(m, "weight", None)
            dims.append([int(d) for d in w.shape] if isinstance(w, torch.Tensor) else None)
    return labels, dims


def count_params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _input_kind(args, kwargs) -> str:
    if "input_ids" in kwargs:
        return "text"
    if "input_values" in kwargs or "input_features" in kwargs:
        return "audio"
    for t in _iter_tensors(list(args) + list(kwargs.values())):
        if t.dtype in (torch.long, torch.int):
            return "text"
        if t.dim() == 5:
            return "video"
        if t.dim() in (3, 4):
            return "image"
        return "sequence"
    return "unknown"


def extract_graph(model: torch.nn.Module, args=(), kwargs=None, time_limit: float | None = 60,
                  flops: bool = True) -> OpGraph:
    """Operator graph of ``model`` for one forward pass on ``args``/``kwargs``.

    Inputs on the meta device (and a model built on meta, e.g. by ``fastarch.zoo.create``) cost
    no memory or compute. When the forward pass fails part way the graph holds what was read
    and the unreached leaf modules (``method="partial"``, ``error`` says why); when it cannot
    start, the module tree (``method="module_tree"``). Never raises for a model that cannot be
    traced; raises :class:`ExtractionTimeout` only from the module-tree fallback if that too
    runs out of time (it does not in practice).

    Example:
        >>> g = extract_graph(torchvision.models.resnet18().to("meta"),
        ...                   (torch.zeros(1, 3, 224, 224, device="meta"),))
        >>> g.method, g.op_counts["conv2d"] > 10
        ('trace', True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    if not isinstance(args, (tuple, list)):
        args = (args,)
    recorder = _Recorder()
    visited: set[int] = set()
    hooks = []
    for _, m in _leaves(model):
        hooks.append(m.register_forward_pre_hook(lambda mod, inp: visited.add(id(mod))))
    error = ""
    flop_total = 0
    counter = None
    start = time.perf_counter()
    try:
        with _time_limit(time_limit), torch.no_grad():
            if flops:
                counter = _FlopCounter()
            with counter if counter is not None else contextlib.nullcontext(), recorder:
                recorder.mark_inputs(args, kwargs)
                model(*args, **kwargs)
    except ExtractionTimeout as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001  (any failure: keep what was read)
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        for h in hooks:
            h.remove()
    if counter is not None:
        try:
            flop_total = int(counter.total)
        except Exception:  # noqa: BLE001
            flop_total = 0
    labels, edges, dims = recorder.labels, recorder.edges, recorder.dims
    if not error:
        method = "trace"
    else:
        tail_labels, tail_dims = _module_tree(model, skip=visited)
        tail_edges = [(i, i + 1) for i in range(len(tail_labels) - 1)]
        method = "partial" if labels else "module_tree"
        off = len(labels)
        if labels and tail_labels:
            edges = edges + [(off - 1, off)]
        labels = labels + tail_labels
        dims = dims + tail_dims
        edges = edges + [(s + off, d + off) for s, d in tail_edges]
    width = recorder.width
    if not width:
        for _, m in _leaves(model):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                width = max(width, int(w.shape[0]))
    g = OpGraph(labels=labels, edges=edges, method=method, params=count_params(model),
                flops=flop_total, width=width, input_kind=_input_kind(args, kwargs),
                error=error, dims=dims)
    g.seconds = round(time.perf_counter() - start, 3)  # type: ignore[attr-defined]
    return g


def human(n: float) -> str:
    """1234567 -> '1.2M'."""
    if n <= 0:
        return "0"
    units = ["", "K", "M", "G", "T", "P"]
    i = min(int(math.log10(n) // 3), len(units) - 1)
    return f"{n / 10 ** (3 * i):.3g}{units[i]}"
