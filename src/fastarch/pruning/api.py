"""``fastarch.prune``: dependency-aware structured pruning of any traceable model."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from fastarch.pruning.graph import (
    DependencyGraph,
    GraphBuildError,
    flatten_tensors,
    gc_paused,
    model_call_kwargs,
    positional_inputs,
)
from fastarch.pruning.importance import IMPORTANCES, rank_uniform, score_units
from fastarch.pruning.removal import drops_by_tensor, remove_units
from fastarch.pruning.std_conv import fold_weight_standardization as fold_std_convs
from fastarch.pruning.std_conv import unfold_weight_standardization as unfold_std_convs

TARGETS = ("ratio", "params", "flops", "latency")


class SizeChange:
    """Parameter and FLOP counts before / after, shared by the pruning reports."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def size_summary(self) -> str:
        return (f"params {self.params_before:,} -> {self.params_after:,} "
                f"(-{100 * self.param_reduction:.1f}%), FLOPs {self.flops_before:,} -> "
                f"{self.flops_after:,} (-{100 * self.flop_reduction:.1f}%)")


@dataclasses.dataclass
class PruneReport(SizeChange):
    """What :func:`prune` did. ``str(report)`` is a readable summary."""

    removed: list = dataclasses.field(default_factory=list)  # one dict per pruned group
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    skipped: list = dataclasses.field(default_factory=list)  # (module, reason)
    shapes: dict = dataclasses.field(default_factory=dict)  # tensor -> (old shape, new shape)
    ratio_used: float = 0.0  # the per-group ratio applied (found by search for budget targets)
    graph_seconds: float = 0.0
    total_seconds: float = 0.0
    ok: bool = True  # False when the model could not be traced at all (left unchanged)
    graph: object = dataclasses.field(default=None, repr=False)  # the DependencyGraph used
    blocks: object = None  # the BlockPruneReport when whole blocks were removed (blocks=...)
    removed_units: list = dataclasses.field(default_factory=list, repr=False)  # its roots
    folded: int = 0  # weight-standardised convs replaced by plain ones (fold_weight_standardization)

    def __str__(self) -> str:
        lines = [f"{self.size_summary()}, graph {self.graph_seconds:.2f} s, "
                 f"total {self.total_seconds:.2f} s"]
        if self.latency_before_ms is not None:
            lines.append(f"latency {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms")
        if self.folded:
            lines.append(f"  folded the weight standardisation of {self.folded} convs into plain "
                         "convs (same inference output; training the model now trains plain "
                         "convs)")
        for r in self.removed:
            lines.append(f"  removed {r['removed']}/{r['before']} {r['group']}")
        for where, reason in self.skipped:
            lines.append(f"  not pruned: {where or '<model>'}: {reason}")
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Sequence, meta: bool = True) -> int:
    """FLOPs of one forward pass on ``example_inputs`` (torch's FlopCounterMode).

    With ``meta=True`` the pass runs on a copy of the model whose parameters and buffers are on
    the meta device (shapes only, no arithmetic), which is far faster than a real forward; a
    model that does not run on meta tensors (``.item()``, data-dependent control flow, CPU
    tensors made inside ``forward``) is counted with a real forward instead. The counter sees
    the same ops either way, so the two counts are equal (tested on CNNs, ViTs, decoders)."""
    if meta:
        counted = _flops_on_meta(model, example_inputs)
        if counted is not None:
            return counted[0]
    return _flops_and_outputs(model, example_inputs)[0]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """The two matmuls of attention (Q K^T, then P V), per query head (K/V heads repeated)."""
    *batch, q_len, head_dim = query_shape
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * q_len * kv_len * (head_dim + v_dim)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_heads, *args,
                      **kwargs) -> int:
    """nn.MultiheadAttention's fused inference kernel: Q/K/V projections, attention, output
    projection (what its unfused path runs as linears and matmuls)."""
    *batch, q_len, _ = query_shape
    kv_len = key_shape[-2]
    n = math.prod(batch)
    projections = 2 * n * embed_dim * embed_dim * (2 * q_len + 2 * kv_len)
    return projections + 4 * n * q_len * kv_len * embed_dim


def _native_encoder_layer_flops(src_shape, embed_dim, num_heads, *args, **kwargs) -> int:
    """nn.TransformerEncoderLayer's fused inference kernel: self-attention plus the two FFN
    linears (args[11] is the first FFN weight, (ffn, embed_dim))."""
    ffn_dim = args[11][0]
    *batch, length, _ = src_shape
    tokens = math.prod(batch) * length
    attention = _native_mha_flops(src_shape, src_shape, src_shape, embed_dim, num_heads)
    return attention + 4 * tokens * embed_dim * ffn_dim


def _flop_counter():
    """FlopCounterMode that also counts the fused CPU attention kernels. torch has formulas for
    the CUDA ones only, so on the CPU attention counted 0 FLOPs while the meta device (which
    takes the unfused path) counted its matmuls: the two counts differed."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
                          ("_native_multi_head_attention", _native_mha_flops),
                          ("_transformer_encoder_layer_fwd", _native_encoder_layer_flops)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            extra[op] = formula
    return FlopCounterMode(display=False, custom_mapping=extra)


def _flops_and_outputs(model: nn.Module, example_inputs: Sequence) -> tuple[int, list]:
    """(FLOPs, flat tensor outputs) of one forward pass under FlopCounterMode."""
    for grad in (False, True):
        counter = _flop_counter()
        try:
            with torch.set_grad_enabled(grad), counter:
                out = model(*example_inputs, **model_call_kwargs(model))
            return int(counter.get_total_flops()), flatten_tensors(out)
        except (AssertionError, AttributeError):
            # FlopCounterMode's module tracker hooks autograd and fails under no_grad when a
            # module gets a tensor that requires grad without a grad_fn (timm PiT's cls token)
            if grad:
                raise
    raise AssertionError("unreachable")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (no data copied);
    shared tensors stay shared. Whatever a forward caches on the copy stays on the copy."""
    memo: dict = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("meta")
    return copy.deepcopy(model, memo)


def _flops_on_meta(model: nn.Module, example_inputs: Sequence) -> tuple[int, list] | None:
    """(FLOPs, output shapes) from a forward on meta copies; None when it does not run there."""
    import warnings

    try:
        twin = _meta_copy(model)
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flops, outs = _flops_and_outputs(twin, inputs)
    except Exception:  # noqa: BLE001 - anything meta cannot run is counted for real
        return None
    return flops, [tuple(o.shape) for o in outs]


def measure_latency_ms(model: nn.Module, example_inputs: Sequence, repeats: int = 5,
                       min_seconds: float = 0.02, max_repeats: int = 200) -> float:
    """Best time of one forward pass, in milliseconds.

    One warm-up call, then at least ``repeats`` timed calls and more until ``min_seconds`` have
    been spent (at most ``max_repeats``). The minimum, not the median: on a shared machine other
    work only ever adds time, so the fastest call is the one closest to the model's own cost.
    """
    kwargs = model_call_kwargs(model)
    best = math.inf
    with torch.no_grad():
        model(*example_inputs, **kwargs)
        start = time.perf_counter()
        n = 0
        while n < repeats or (time.perf_counter() - start < min_seconds and n < max_repeats):
            t0 = time.perf_counter()
            model(*example_inputs, **kwargs)
            best = min(best, time.perf_counter() - t0)
            n += 1
    return 1000 * best


def latency_ratio(candidate: nn.Module, baseline: nn.Module, example_inputs: Sequence,
                  rounds: int = 2) -> float:
    """Latency of ``candidate`` over that of ``baseline``, timed in alternation so that a change
    in the machine's load during the measurement hits both sides alike."""
    best_c = best_b = math.inf
    for _ in range(rounds):
        best_b = min(best_b, measure_latency_ms(baseline, example_inputs))
        best_c = min(best_c, measure_latency_ms(candidate, example_inputs))
    return best_c / best_b


def _check_args(model, example_inputs, ratio, importance, target, round_to, pattern):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        example_inputs = positional_inputs(model, example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of "
                        "keyword arguments")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
            or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if pattern is not None and pattern not in ("2:4", "4:8"):
        raise ValueError(f"pattern must be None, '2:4' or '4:8', got {pattern!r}")
    return tuple(example_inputs)


def _ignored_prefixes(model: nn.Module, ignore) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    known = set(names.values())
    out = []
    if isinstance(ignore, (str, nn.Module)):  # one name or module, not an iterable of them
        ignore = [ignore]
    for item in ignore or ():
        if isinstance(item, str):
            if item not in known:
                close = sorted(n for n in known if n.endswith("." + item))[:3]
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                raise ValueError(f"ignore lists {item!r}, which is not a module of model{hint}")
            out.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError("ignore lists a module that is not part of model")
            out.append(names[id(item)])
        else:
            raise TypeError(f"ignore must hold module names or modules, got {type(item).__name__}")
    return out


def _in_module(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def plan_removal(graph: DependencyGraph, groups, scores, ratio: float, round_to: int = 1,
                 global_ranking: bool = False, max_group_ratio: float = 0.9) -> list[int]:
    """Roots to remove at the given ratio (per group, or globally over normalised scores)."""
    roots: list[int] = []
    if ratio <= 0:
        return roots
    if not global_ranking:
        for g in groups:
            n = g.size
            keep = n - math.floor(ratio * n + 1e-9)
            step = math.lcm(round_to if g.kind == "channels" else 1, g.multiple)
            if step > 1:
                keep = min(n, math.ceil(keep / step) * step)
            keep = max(keep, 1)
            roots.extend(rank_uniform(g, scores, n - keep))
        return roots
    pool = []
    for gi, g in enumerate(groups):
        mean = sum(scores.get(r, 0.0) for r in g.units) / g.size or 1.0
        for r in g.units:
            pool.append((scores.get(r, 0.0) / mean, gi, r))
    pool.sort()
    total = sum(g.size for g in groups)
    budget = math.floor(ratio * total)
    taken = [0] * len(groups)
    for s, gi, r in pool:
        if budget <= 0:
            break
        g = groups[gi]
        if taken[gi] + 1 > min(g.size - 1, int(max_group_ratio * g.size)):
            continue
        taken[gi] += 1
        roots.append(r)
        budget -= 1
    # a group whose width must stay a multiple (grouped matmuls) gives back its best picks
    for gi, g in enumerate(groups):
        while g.multiple > 1 and taken[gi] and (g.size - taken[gi]) % g.multiple:
            best = max((r for r in roots if r in g.positions), key=lambda r: scores.get(r, 0.0))
            roots.remove(best)
            taken[gi] -= 1
    return roots


def _hf_hidden_multiple(model, graph, groups, scores, roots, round_to: int = 1):
    """Hugging Face configs require hidden_size % num_attention_heads == 0: keep a few more
    residual channels when the plan would break that. With ``round_to`` the width kept is a
    multiple of both where the group allows it (a 512-wide Llama pruned 30% with 6 heads left
    and ``round_to=16`` keeps 384 channels, not 372), so ``round_to`` holds for the hidden
    size too."""
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if cfg is None or emb is None or \
            not isinstance(getattr(cfg, "num_attention_heads", None), int):
        return roots
    find = graph.uf.find
    removed = {find(r) for r in roots}
    # no attention site found (Bloom's baddbmm on merged batch x heads): the config's head
    # count stays, and the hidden size must remain a multiple of it
    multiple = 1 if graph.attention else max(cfg.num_attention_heads, 1)
    # a config whose head_dim is a property, hidden // heads (Falcon), and which uses RoPE
    # refuses to save an odd quotient, even where the modules keep their real head size
    even = isinstance(getattr(type(cfg), "head_dim", None), property) and \
        getattr(cfg, "rope_parameters", None) is not None
    for site in graph.attention:
        q_new = sum(1 for i in site.q_head_ids if i < 0 or find(i) not in removed)
        multiple = math.lcm(multiple, max(q_new, 1))
    if even:  # hidden // heads even: the hidden a multiple of twice the head count
        multiple *= 2
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight}
    for g in groups:
        if not any(n in names and d == 1 for n, d in g.key):
            continue
        dropped = sorted((r for r in g.units if r in removed), key=lambda r: -scores.get(r, 0.0))
        kept = g.size - len(dropped)
        step = math.lcm(multiple, round_to, g.multiple)
        step = step if -(-kept // step) * step <= g.size else math.lcm(multiple, g.multiple)
        while kept % step and dropped:
            removed.discard(dropped.pop(0))
            kept += 1
    return [r for r in roots if find(r) in removed]


def _params_after(model: nn.Module, graph: DependencyGraph, roots) -> int:
    drops = drops_by_tensor(graph, roots)
    seen = set()
    total = 0
    per_tensor: dict[str, dict[int, int]] = {}
    for (name, dim), idx in drops.items():
        per_tensor.setdefault(name, {})[dim] = len(idx)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = list(p.shape)
        for dim, n in per_tensor.get(name, {}).items():
            shape[dim] -= n
        total += math.prod(shape)
    return total


def _try_prune(model, graph, roots, example_inputs, ref_shapes):
    """Prune a copy; None if it runs with the same output shapes, else the error text."""
    trial = copy.deepcopy(model)
    try:
        remove_units(trial, graph, roots)
        with torch.no_grad():
            outs = flatten_tensors(trial(*example_inputs, **model_call_kwargs(trial)))
        shapes = [tuple(o.shape) for o in outs]
        if shapes != ref_shapes:
            return f"output shapes changed: {ref_shapes} -> {shapes}", trial
        return None, trial
    except Exception as exc:  # noqa: BLE001 - reported, the group is left unpruned
        return f"{type(exc).__name__}: {str(exc)[:200]}", None


def _module_state(model: nn.Module) -> list:
    """What :func:`remove_units` and a forward can change on each module: its attributes and
    the contents of its dicts (parameters, buffers, submodules, hooks). No tensor is copied."""
    return [(m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if isinstance(v, dict)})
            for m in model.modules()]


def _restore_module_state(state: list) -> None:
    for m, attrs, dicts in state:
        m.__dict__.clear()
        m.__dict__.update(attrs)
        for k, content in dicts.items():
            attrs[k].clear()
            attrs[k].update(content)


def _prune_in_place(model, graph, roots, example_inputs, ref_shapes, count: bool):
    """Remove the units from ``model`` itself and run it once: (error text or None, shape
    changes, FLOPs of that forward when ``count``). On error the model is put back as it was,
    so the common case (the plan runs) costs no copy of the model and no second removal."""
    state = _module_state(model)
    try:
        changed = remove_units(model, graph, roots)
        with torch.no_grad():
            if count:
                flops, outs = _flops_and_outputs(model, example_inputs)
            else:
                flops, outs = None, flatten_tensors(model(*example_inputs, **model_call_kwargs(model)))
        shapes = [tuple(o.shape) for o in outs]
        if shapes == ref_shapes:
            return None, changed, flops
        err = f"output shapes changed: {ref_shapes} -> {shapes}"
    except Exception as exc:  # noqa: BLE001 - reported, the groups are searched one by one
        err = f"{type(exc).__name__}: {str(exc)[:200]}"
    _restore_module_state(state)
    return err, None, None


def _real_output_shapes(model: nn.Module, example_inputs) -> list:
    with torch.no_grad():
        return [tuple(o.shape) for o in
                flatten_tensors(model(*example_inputs, **model_call_kwargs(model)))]


def _verified_roots(model, graph, groups, roots, example_inputs, ref_shapes, skipped):
    """Drop the groups whose removal breaks the forward pass (found by bisection)."""
    err, trial = _try_prune(model, graph, roots, example_inputs, ref_shapes)
    if err is None:
        return roots, trial
    root_set = set(roots)
    chosen = [g for g in groups if any(r in root_set for r in g.units)]

    def roots_of(gs):
        return [r for g in gs for r in g.units if r in root_set]

    good: list = []

    def search(gs, err_text):
        if not gs:
            return
        if len(gs) == 1:
            skipped.append((gs[0].describe(), f"pruning it breaks the forward pass ({err_text})"))
            return
        half = len(gs) // 2
        for part in (gs[:half], gs[half:]):
            e, _ = _try_prune(model, graph, roots_of(good + part), example_inputs, ref_shapes)
            if e is None:
                good.extend(part)
            else:
                search(part, e)

    search(chosen, err)
    final = roots_of(good)
    err, trial = _try_prune(model, graph, final, example_inputs, ref_shapes)
    if err is not None:  # should not happen; be safe: prune nothing
        skipped.append(("<model>", f"verification failed ({err}); nothing pruned"))
        return [], copy.deepcopy(model)
    return final, trial


@gc_paused()
def prune(model: nn.Module, example_inputs, ratio: float = 0.3, importance: str = "l2",
          target: str = "ratio", ignore: Iterable = (), calib=None, *, round_to: int = 1,
          global_ranking: bool = False, pattern: str | None = None, timeout: float = 120.0,
          verify: bool = True, loss_fn: Callable | None = None,
          prune_heads: bool = True, prune_channels: bool = True,
          exact_only: bool = False, graph: DependencyGraph | None = None,
          blocks: int | float | None = None, block_importance: str = "cosine",
          fold_weight_standardization: bool = True) -> PruneReport:
    """Remove channels, neurons, attention heads and conv groups from ``model``, in place.

    The model is traced with the example inputs; channels that must go together (residual
    adds, concatenations, grouped / depthwise convolutions, norms, attention heads with their
    K/V heads for GQA/MQA) form groups, each unit is scored by ``importance``, and the lowest
    ones are physically removed from the parameters; module attributes (``in_features``,
    ``num_heads``, ...) and a Hugging Face ``config`` are updated so the model still runs and
    can be saved and loaded (see :func:`fastarch.pruning.load_pruned`).

    Args:
        model: any ``nn.Module`` (torchvision, timm, Hugging Face, your own).
        example_inputs: a tensor, a tuple of tensors or a dict of keyword arguments (an
            encoder-decoder's ``decoder_input_ids``) for one forward pass (small is fine).
        ratio: with ``target="ratio"`` the fraction of units removed from each group (or over
            all groups with ``global_ranking``); with ``"params"``/``"flops"``/``"latency"`` the
            fraction of parameters / FLOPs / measured latency to remove.
        importance: ``"l1"``, ``"l2"``, ``"taylor"``, ``"bn_scale"``, ``"activation"``
            (calibration-based, Wanda/FLAP-like) or ``"random"``.
        target: ``"ratio"``, ``"params"``, ``"flops"`` or ``"latency"``.
        ignore: modules (or their names) whose parameters must keep their shapes.
        calib: iterable of input tuples for ``importance="activation"`` (default: example_inputs).
        round_to: keep channel counts a multiple of this (heads are whole anyway).
        pattern: ``"2:4"`` / ``"4:8"``: instead of removing channels, make every Linear weight
            N:M sparse (see :func:`fastarch.pruning.prune_nm`); ``importance`` "l2"/"l1" means
            magnitude, "activation" means Wanda.
        timeout: seconds allowed for tracing and building the graph; past it the model is
            reported as not handled and left unchanged.
        verify: run the pruned model and drop any group whose removal breaks it.
        exact_only: prune only groups where removal equals zeroing (no LayerNorm / RMSNorm
            statistics over the channels), so that :func:`masked_copy` reproduces the result.
        graph: a :class:`DependencyGraph` already built for this architecture (e.g.
            ``report.graph`` of an identical model) to skip tracing.
        blocks: first remove this many whole blocks (int) or this fraction of them (float),
            scored by ``block_importance`` on ``calib`` (see :func:`fastarch.prune_blocks`);
            ``ratio`` / ``target`` then apply to the model that is left (``ratio=0``: depth
            only). The block report is ``report.blocks``.
        block_importance: ``"cosine"`` (block influence) or ``"magnitude"``.
        fold_weight_standardization: replace timm's weight-standardised convs (``StdConv2d``,
            ``ScaledStdConv2d`` and their ``*Same`` variants: BiT, NF-ResNets, NFNets) by plain
            convs with the weight they compute in inference, so that they can be pruned
            (exactly, relative to the folded model); only done when something is then pruned.
            The standardisation is fixed: training the pruned model trains plain convs.
            ``False``: such convs are left whole, with the channels that feed them.

    Returns:
        a :class:`PruneReport` (removed groups, params and FLOPs before/after, modules not
        handled with the reason, ``folded``: how many convs were folded).

    Example:
        >>> import torch, torchvision, fastarch
        >>> m = torchvision.models.resnet18()
        >>> report = fastarch.prune(m, torch.randn(1, 3, 64, 64), ratio=0.3)
        >>> report.params_after < report.params_before
        True
    """
    t_start = time.perf_counter()
    example_inputs = _check_args(model, example_inputs, ratio, importance, target, round_to, pattern)
    if isinstance(calib, (list, tuple)):
        calib = [positional_inputs(model, b) if isinstance(b, dict) else b for b in calib]
    if isinstance(calib, (list, tuple)) and not calib:
        raise ValueError("calib is empty: give at least one batch, or None to score on "
                         "example_inputs")
    block_report = None
    from fastarch.pruning.depth import BLOCK_IMPORTANCES, prune_blocks

    if block_importance not in BLOCK_IMPORTANCES:
        raise ValueError(f"block_importance must be one of {BLOCK_IMPORTANCES}, "
                         f"got {block_importance!r}")
    if blocks is not None:

        if graph is not None:
            raise ValueError("graph: a prebuilt graph cannot be used with blocks= (removing "
                             "blocks changes the model it was traced from)")
        block_report = prune_blocks(model, example_inputs, blocks, block_importance,
                                    calib=calib, ignore=ignore, verify=verify)
    if pattern is not None:
        from fastarch.pruning.nm import prune_nm

        report = prune_nm(model, pattern, importance=importance, calib=calib or [example_inputs],
                          ignore=ignore)
        return _with_blocks(report, block_report)
    if block_report is not None:
        report = prune(model, example_inputs, ratio, importance, target, ignore, calib,
                       round_to=round_to, global_ranking=global_ranking, timeout=timeout,
                       verify=verify, loss_fn=loss_fn, prune_heads=prune_heads,
                       prune_channels=prune_channels, exact_only=exact_only,
                       fold_weight_standardization=fold_weight_standardization)
        report = _with_blocks(report, block_report)
        report.total_seconds = time.perf_counter() - t_start
        return report
    ignored = _ignored_prefixes(model, ignore)
    was_training = model.training
    model.eval()
    report = PruneReport()
    report.params_before = count_params(model)
    # FLOPs and output shapes from a forward on the meta device when the model runs there. The
    # real forward that proves the model runs on the inputs is then the verification's (the
    # pruned model); only when that fails is the unpruned model run, to tell the two apart.
    on_meta = _flops_on_meta(model, example_inputs)
    real_checked = on_meta is None or ratio == 0 or not verify
    try:
        if on_meta is None:
            report.flops_before, outs = _flops_and_outputs(model, example_inputs)
            ref_shapes = [tuple(o.shape) for o in outs]
        else:
            report.flops_before, ref_shapes = on_meta
            if real_checked:
                ref_shapes = _real_output_shapes(model, example_inputs)
    except Exception as exc:
        model.train(was_training)
        raise ValueError(f"example_inputs: the model does not run on them ({exc})") from exc

    def check_real_run():
        nonlocal ref_shapes, real_checked
        if not real_checked:
            try:
                ref_shapes = _real_output_shapes(model, example_inputs)
            except Exception as exc:
                model.train(was_training)
                raise ValueError(f"example_inputs: the model does not run on them ({exc})") \
                    from exc
            real_checked = True

    if ratio == 0:
        report.params_after, report.flops_after = report.params_before, report.flops_before
        report.total_seconds = time.perf_counter() - t_start
        model.train(was_training)
        return report
    t0 = time.perf_counter()
    # undone below when nothing is pruned: a model that is not pruned is left as it was
    swaps = fold_std_convs(model) if fold_weight_standardization else []
    try:  # an error on the way leaves the model unfolded, as it was given
        try:
            if graph is None:
                graph = DependencyGraph(model, example_inputs, timeout=timeout)
        except GraphBuildError as exc:
            unfold_std_convs(swaps)
            check_real_run()
            report.ok = False
            report.skipped.append(("<model>", str(exc)))
            report.params_after, report.flops_after = report.params_before, report.flops_before
            report.total_seconds = time.perf_counter() - t_start
            model.train(was_training)
            return report
        report.graph_seconds = time.perf_counter() - t0
        seen = set()
        for where, reason in graph.problems:
            if (where, reason) not in seen:
                seen.add((where, reason))
                report.skipped.append((where, reason))
        groups = []
        for g in graph.groups:
            if g.kind == "heads" and not prune_heads or g.kind != "heads" and not prune_channels:
                continue
            if exact_only and not g.exact:
                continue
            hit = [p for p in ignored if any(_in_module(n, p) for n, _ in g.key)]
            if hit:
                report.skipped.append((hit[0], f"ignored: {g.describe()} left whole"))
                continue
            groups.append(g)
        scores = score_units(graph, model, importance, example_inputs, calib, loss_fn)

        def plan(r):
            roots = plan_removal(graph, groups, scores, r, round_to, global_ranking)
            return _hf_hidden_multiple(model, graph, groups, scores, roots,
                                       1 if global_ranking else round_to)

        if target == "ratio":
            r_used = ratio
            roots = plan(ratio)
        else:
            if target == "params":
                goal = (1 - ratio) * report.params_before

                def cost(r):
                    return _params_after(model, graph, plan(r))
            elif target == "flops":
                goal = (1 - ratio) * report.flops_before

                def cost(r):
                    trial = copy.deepcopy(model)
                    remove_units(trial, graph, plan(r))
                    return count_flops(trial, example_inputs)
            else:
                # Each trial is timed against the unpruned model in the same breath (a ratio, not
                # two absolute times taken seconds apart), so a burst of other work on the machine
                # does not make an unpruned trial look as if it met the budget.
                report.latency_before_ms = measure_latency_ms(model, example_inputs)
                goal = 1 - ratio

                def cost(r):
                    trial = copy.deepcopy(model)
                    remove_units(trial, graph, plan(r))
                    return latency_ratio(trial, model, example_inputs)
            lo, hi = 0.0, 0.95
            for _ in range(12 if target == "params" else 8):
                mid = (lo + hi) / 2
                if cost(mid) <= goal:
                    hi = mid
                else:
                    lo = mid
            r_used = hi
            roots = plan(hi)
            if cost(hi) > goal:
                reason = f"{target} budget not reachable with the prunable groups; pruned as far as allowed"
                report.skipped.append(("<model>", reason))
        changed = flops_after = None
        if verify:
            err, changed, flops_after = _prune_in_place(model, graph, roots, example_inputs,
                                                        ref_shapes, count=on_meta is None)
            if err is not None:
                check_real_run()
                roots, _ = _verified_roots(model, graph, groups, roots, example_inputs, ref_shapes,
                                           report.skipped)
        root_set = set(roots)
        for g in groups:
            n = sum(1 for r in g.units if r in root_set)
            if n:
                report.removed.append({"group": g.describe(), "kind": g.kind, "before": g.size,
                                       "removed": n, "exact": g.exact})
        if swaps and not roots:
            unfold_std_convs(swaps)
            swaps = []
    except BaseException:
        unfold_std_convs(swaps)
        raise
    report.folded = len({id(original) for _, _, original in swaps})
    report.shapes = changed if changed is not None else remove_units(model, graph, roots)
    report.graph, report.removed_units = graph, list(roots)
    report.ratio_used = r_used
    _update_hf_config(model, graph, report)
    report.params_after = count_params(model)
    report.flops_after = flops_after if flops_after is not None else \
        count_flops(model, example_inputs)
    if target == "latency":
        report.latency_after_ms = measure_latency_ms(model, example_inputs)
    model.train(was_training)
    report.total_seconds = time.perf_counter() - t_start
    return report


def _with_blocks(report: PruneReport, block_report) -> PruneReport:
    """Fold a block-removal report into the width-pruning one (before = the unpruned model)."""
    if block_report is None:
        return report
    report.blocks = block_report
    entries = [{"group": f"blocks of {name}", "kind": "blocks", "before": before,
                "removed": before - after, "exact": False}
               for name, (before, after) in block_report.lists.items() if before != after]
    report.removed = entries + report.removed
    report.skipped = list(block_report.skipped) + report.skipped
    report.params_before = block_report.params_before
    report.flops_before = block_report.flops_before
    if not report.flops_after:  # N:M reports no FLOPs: the block-pruned count stands
        report.flops_after = block_report.flops_after
    return report


def _update_hf_config(model: nn.Module, graph: DependencyGraph, report: PruneReport) -> None:
    from fastarch.pruning.hf import update_config

    if getattr(model, "config", None) is not None and report.shapes:
        for note in update_config(model, graph, report.shapes) or ():
            report.skipped.append(("config", note))


def masked_copy(original: nn.Module, report: PruneReport) -> nn.Module:
    """A copy of the unpruned ``original`` with the removed units zeroed instead of removed.

    With ``exact_only=True`` it computes what the pruned model computes (the reference that the
    tests compare the physically pruned model with). When :func:`prune` folded weight-standardised
    convs (``report.folded``), the copy is folded the same way before masking."""
    from fastarch.pruning.removal import mask_units

    masked = copy.deepcopy(original)
    if report.folded:
        fold_std_convs(masked)
    if report.graph is not None:
        mask_units(masked, report.graph, report.removed_units)
    return masked
