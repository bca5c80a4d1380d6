"""Physical channel removal: slice parameters and buffers, then fix module attributes.

``remove_units`` takes the dependency graph and the roots (units) chosen for removal and rewrites
the model in place: every parameter / buffer dimension listed in a unit loses those indices, then
the attributes that describe shapes (``in_features``, ``out_channels``, ``groups``, ``num_heads``,
...) are set from the new shapes. ``mask_units`` is the reference it is tested against: the same
positions set to zero, shapes unchanged.
"""
from __future__ import annotations

import functools
import re

import torch
from torch import nn

from fastarch.pruning.graph import DependencyGraph

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_q_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")
GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep")
# widths a module with raw parameters may keep and read (MoE experts and routers)
WIDTH_NAMES = ("hidden_dim", "hidden_size", "intermediate_dim", "intermediate_size", "embed_dim",
               "ffn_dim", "expert_dim", "moe_intermediate_size", "d_model", "model_dim")
WIDTH_ATTRS = ("attn_dim", "all_head_size", "inner_dim", "split_size", "q_dim", "dim_out_attn")


CONFIG_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
CONFIG_KV_KEYS = ("num_key_value_heads", "num_kv_heads")


class LayerConfig:
    """One attention module's view of a shared model config: its own (pruned) head counts,
    every other attribute read from, and written to, the shared config, so that later changes
    to it (the attention implementation) still reach the layer. Given to modules whose forward
    reads head counts from ``self.config`` (Phi-3 cuts its fused qkv at
    ``config.num_attention_heads * head_dim``), where per-layer counts differ from the config's."""

    def __init__(self, base, overrides: dict):
        if isinstance(base, LayerConfig):
            overrides = {**base.__dict__["_over"], **overrides}
            base = base.__dict__["_base"]
        self.__dict__["_base"] = base
        self.__dict__["_over"] = dict(overrides)

    def __getattr__(self, name):
        d = self.__dict__
        if "_over" not in d or name.startswith("__"):
            raise AttributeError(name)
        if name in d["_over"]:
            return d["_over"][name]
        return getattr(d["_base"], name)

    def __setattr__(self, name, value):
        if name in self.__dict__["_over"]:
            self.__dict__["_over"][name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({self.__dict__['_over']}, base={type(self.__dict__['_base']).__name__})"


@functools.lru_cache(maxsize=None)
def _reads_config_heads(cls: type) -> tuple[str, ...]:
    """The config head-count keys the forward of module class ``cls`` reads as
    ``self.config.<key>`` (one source read per class, not per removal trial)."""
    import inspect

    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ()
    return tuple(k for k in CONFIG_HEAD_KEYS + CONFIG_KV_KEYS if re.search(rf"self\.config\.{k}\b", src))


def drops_by_tensor(graph: DependencyGraph, roots) -> dict[tuple[str, int], list[int]]:
    """(tensor name, dim) -> sorted indices removed with the given units."""
    roots = set(roots)
    drops: dict[tuple[str, int], set[int]] = {}
    for group in graph.groups:
        for r in group.units:
            if r not in roots:
                continue
            for key, idx in group.positions[r].items():
                drops.setdefault(key, set()).update(idx)
    return {k: sorted(v) for k, v in drops.items()}


def _owner(model: nn.Module, name: str):
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    alias: dict[int, list[str]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        alias.setdefault(id(t), []).append(n)
    return alias


def mask_units(model: nn.Module, graph: DependencyGraph, roots) -> None:
    """Zero the parameter positions of the given units (shapes unchanged): the masked model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for (name, dim), idx in drops_by_tensor(graph, roots).items():
            if name in params:
                params[name].index_fill_(dim, torch.tensor(idx, device=params[name].device), 0)


def remove_units(model: nn.Module, graph: DependencyGraph, roots) -> dict[str, tuple]:
    """Physically remove the units; returns {tensor name: (old shape, new shape)}."""
    roots = set(roots)
    drops = drops_by_tensor(graph, roots)
    alias = _aliases(model)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    per_tensor: dict[str, dict[int, list[int]]] = {}
    for (name, dim), idx in drops.items():
        per_tensor.setdefault(name, {})[dim] = idx
    changed: dict[str, tuple] = {}
    touched_modules: set[str] = set()
    with torch.no_grad():
        for name, dims in per_tensor.items():
            old = tensors[name]
            new = old.detach()
            for dim, idx in dims.items():
                keep = torch.ones(old.shape[dim], dtype=torch.bool)
                keep[idx] = False
                keep_idx = keep.nonzero().flatten().to(old.device)
                new = new.index_select(dim, keep_idx)
            new = new.contiguous()
            for alias_name in alias.get(id(old), [name]):
                mod, attr = _owner(model, alias_name)
                if isinstance(old, nn.Parameter):
                    mod._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
                else:
                    mod._buffers[attr] = new
                changed[alias_name] = (tuple(old.shape), tuple(new.shape))
                touched_modules.add(alias_name.rpartition(".")[0])
    for mod_name in touched_modules:
        mod = model.get_submodule(mod_name) if mod_name else model
        _fix_module_attrs(mod, graph, mod_name)
        _fix_width_attrs(mod, changed, mod_name)
    _fix_attention_attrs(model, graph, roots)
    _fix_split_attrs(model, graph, roots)
    _fix_group_norm_attrs(model, graph, roots)
    _fix_group_split_attrs(model, graph, roots)
    return changed


def _fix_module_attrs(mod: nn.Module, graph: DependencyGraph, mod_name: str) -> None:
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear):
        mod.in_features, mod.out_features = w.shape[1], w.shape[0]
    elif isinstance(mod, nn.modules.conv._ConvNd):
        name = f"{mod_name}.weight" if mod_name else "weight"
        cin_g, cout_g = graph.convs.get(name, (None, None))
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            return
        mod.out_channels = w.shape[0]
        if mod.groups > 1 and cout_g:
            mod.groups = w.shape[0] // cout_g
            mod.in_channels = mod.groups * cin_g
        else:
            mod.in_channels = w.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else mod.running_mean
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.LayerNorm) or hasattr(mod, "normalized_shape"):
        if w is not None and isinstance(mod.normalized_shape, (tuple, list)):
            mod.normalized_shape = (w.shape[0],) + tuple(mod.normalized_shape[1:])
        elif w is not None and isinstance(mod.normalized_shape, int):
            mod.normalized_shape = w.shape[0]
    elif isinstance(mod, nn.GroupNorm):
        mod.num_channels = w.shape[0]
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = w.shape[1]
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2 style (in, out) weight
        mod.nf = w.shape[1]
    for attr in ("hidden_size", "dim", "normalized_shape_int"):
        val = getattr(mod, attr, None)
        if isinstance(val, int) and w is not None and w.dim() == 1 and val != w.shape[0] and \
                "norm" in type(mod).__name__.lower():
            setattr(mod, attr, w.shape[0])


def _fix_width_attrs(mod: nn.Module, changed: dict, mod_name: str) -> None:
    """A module holding raw parameters (MoE experts' 3-d weights, a router) and reading a width
    it keeps as an attribute (``hidden_states.reshape(-1, self.hidden_dim)``): a width
    attribute equal to an old size moves to the new one, where every dim of the module's own
    tensors of that size changed alike (hidden 64 kept beside an intermediate 64 removed from
    is ambiguous, and left)."""
    if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
        return
    prefix = f"{mod_name}." if mod_name else ""
    moves: dict[int, set] = {}
    for pname, t in list(mod.named_parameters(recurse=False)) + \
            list(mod.named_buffers(recurse=False)):
        old_shape, new_shape = changed.get(prefix + pname, (tuple(t.shape), tuple(t.shape)))
        for o, n in zip(old_shape, new_shape):
            moves.setdefault(o, set()).add(n)
    for attr in WIDTH_NAMES:
        val = mod.__dict__.get(attr)
        if isinstance(val, int) and not isinstance(val, bool) and len(moves.get(val, ())) == 1:
            new = next(iter(moves[val]))
            if new != val:
                setattr(mod, attr, new)


def _set_matching(mod: nn.Module, names, old: int, new: int) -> None:
    for attr in names:
        val = mod.__dict__.get(attr)
        if isinstance(val, int) and not isinstance(val, bool) and val == old:
            setattr(mod, attr, new)


def _fix_attention_attrs(model: nn.Module, graph: DependencyGraph, roots) -> None:
    find = graph.uf.find
    removed = {find(r) for r in roots}
    for site in graph.attention:
        try:
            mod = model.get_submodule(site.module) if site.module else model
        except AttributeError:
            continue
        q_new = sum(1 for i in site.q_head_ids if i < 0 or find(i) not in removed)
        kv_new = sum(1 for i in site.kv_head_ids if i < 0 or find(i) not in removed)
        if q_new == site.q_heads:
            continue
        _set_matching(mod, HEAD_ATTRS, site.q_heads, q_new)
        if site.kv_heads != site.q_heads:
            _set_matching(mod, KV_ATTRS, site.kv_heads, kv_new)
        _set_matching(mod, WIDTH_ATTRS, site.q_heads * site.head_dim, q_new * site.head_dim)
        if kv_new and site.kv_heads and q_new % kv_new == 0:  # query heads per K/V head
            _set_matching(mod, GROUP_ATTRS, site.q_heads // site.kv_heads, q_new // kv_new)
        mod._fastarch_heads = (q_new, kv_new)
        cfg = mod.__dict__.get("config")
        keys = _reads_config_heads(type(mod)) if cfg is not None else ()
        over = {}
        for k in keys:
            val = getattr(cfg, k, None)
            if k in CONFIG_HEAD_KEYS and val == site.q_heads:
                over[k] = q_new
            elif k in CONFIG_KV_KEYS and val == site.kv_heads:  # (MHA: kv_new is q_new)
                over[k] = kv_new
        if over:
            mod.config = LayerConfig(cfg, over)


def _fix_split_attrs(model: nn.Module, graph: DependencyGraph, roots) -> None:
    find = graph.uf.find
    removed = {find(r) for r in roots}
    for where, label, dim, pieces in graph.splits:
        try:
            mod = model.get_submodule(where) if where else model
        except AttributeError:
            continue
        old = label.shape[dim] if label.dim() > dim else 1
        if old <= 1:
            continue
        new = _kept_along(label, dim, find, removed)
        if new != old:
            _set_matching(mod, WIDTH_ATTRS + ("embed_dim",), old, new)
    for where, pieces, dim in graph.split_lists:
        # the sizes kept as one list or tuple attribute, in the order of the cut: timm's
        # parallel ViT blocks, ``torch.split(y, self.in_split, -1)`` into MLP | q | k | v
        try:
            mod = model.get_submodule(where) if where else model
        except AttributeError:
            continue
        old = [p.shape[dim] for p in pieces]
        new = [_kept_along(p, dim, find, removed) for p in pieces]
        if new == old:
            continue
        for attr, val in list(mod.__dict__.items()):
            if isinstance(val, (list, tuple)) and len(val) == len(old) and \
                    all(type(v) is int for v in val) and list(val) == old:
                setattr(mod, attr, type(val)(new))


def _kept_along(label, dim: int, find, removed: set) -> int:
    """How many positions along ``dim`` of a label stay (read at index 0 of the other dims)."""
    flat = label.movedim(dim, 0).reshape(label.shape[dim], -1)[:, 0].tolist()
    return sum(1 for i in flat if i < 0 or find(i) not in removed)


def _fix_group_norm_attrs(model: nn.Module, graph: DependencyGraph, roots) -> None:
    """GroupNorms lose whole groups (the graph unites each group's channels): the group count
    drops with the channel count, the channels per group stay."""
    find = graph.uf.find
    removed = {find(r) for r in roots}
    for where, ids, groups in graph.group_norms:
        mod = model.get_submodule(where) if where else model
        per = len(ids) // groups
        kept = sum(1 for i in ids if i < 0 or find(i) not in removed)
        if kept != len(ids):
            mod.num_groups = kept // per
            mod.num_channels = kept


def _fix_group_split_attrs(model: nn.Module, graph: DependencyGraph, roots) -> None:
    """A reshape into (groups, channels per group) whose group count the module reads from an
    attribute (the graph's ``group_splits``): whole groups go, the count follows."""
    find = graph.uf.find
    removed = {find(r) for r in roots}
    for where, label, dim, attr in graph.group_splits:
        mod = model.get_submodule(where) if where else model
        old = label.shape[dim]
        new = _kept_along(label, dim, find, removed)  # (the graph records no unlabelled slice)
        if new != old and getattr(mod, attr, None) == old:
            setattr(mod, attr, new)
