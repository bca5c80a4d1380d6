"""Depth pruning: remove whole repeated blocks (``fastarch.prune_blocks``).

A *block list* is an ``nn.ModuleList`` / ``nn.Sequential`` whose children repeat (at least two of
the same class) and are composite blocks, not single torch layers: Hugging Face decoder / encoder
layers (``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``), timm / torchvision
``blocks`` and stages. Only the innermost such lists are used (a ViT's blocks, not a list of
stages holding them). A block can be removed when one forward pass calls it exactly once and its
output has its input's shape (a residual block; a downsampling block of a ResNet stage is kept).

Scores (lower = removed first):

* ``"cosine"``: block influence, 1 - cos(block input, block output) per token (per sample for
  non-sequence activations), averaged over the calibration batches (the ShortGPT criterion): a
  block that barely turns its input is close to the identity.
* ``"magnitude"``: data-free fallback, the mean squared weight of the block's matrices.

Removal rebuilds the list from the blocks kept (so names and ``state_dict`` keys are contiguous
again), renumbers ``layer_idx``-style attributes (the KV cache is indexed by them), and updates a
Hugging Face ``config``: the layer count key and per-layer lists such as ``layer_types``, and a
``fastarch_pruned`` record left by width pruning. The model is run afterwards; if it fails or
its output shapes change, every change is undone and the report says why.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from fastarch.pruning.api import SizeChange, _ignored_prefixes, count_flops, count_params
from fastarch.pruning.graph import flatten_tensors, model_call_kwargs, positional_inputs

BLOCK_IMPORTANCES = ("cosine", "magnitude")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
                    "decoder_layers", "num_decoder_layers", "num_encoder_layers")
INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "block_idx")


@dataclasses.dataclass
class BlockPruneReport(SizeChange):
    """What :func:`prune_blocks` did. ``str(report)`` is a readable summary."""

    removed: list = dataclasses.field(default_factory=list)  # {"block", "score", "list"}
    kept: list = dataclasses.field(default_factory=list)  # names (before removal) of kept blocks
    scores: dict = dataclasses.field(default_factory=dict)  # block name -> score
    lists: dict = dataclasses.field(default_factory=dict)  # list name -> (length before, after)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # (where, reason)
    importance: str = "cosine"
    ok: bool = True  # False when nothing could be removed safely (model left unchanged)
    total_seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"blocks: {self.size_summary()}, {self.total_seconds:.2f} s"]
        for name, (before, after) in self.lists.items():
            lines.append(f"  {name}: {before} -> {after} blocks")
        for r in self.removed:
            lines.append(f"  removed block {r['block']} ({self.importance} {r['score']:.4g})")
        for where, reason in self.skipped:
            lines.append(f"  not removed: {where or '<model>'}: {reason}")
        return "\n".join(lines)


def _hf_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg if hasattr(cfg, "to_json_string") else None  # a transformers config


def _is_block(mod: nn.Module) -> bool:
    """A composite block (a user / library class with parameters), not a single torch layer."""
    if type(mod).__module__.startswith("torch.nn"):
        return False
    return any(True for _ in mod.parameters())


def find_block_lists(model: nn.Module) -> dict[str, list[int]]:
    """Innermost ModuleLists / Sequentials of repeated blocks: {list name: candidate positions}.

    Example:
        >>> import timm
        >>> find_block_lists(timm.create_model("vit_tiny_patch16_224", depth=3))  # doctest: +SKIP
        {'blocks': [0, 1, 2]}
    """
    found: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kinds: dict[type, int] = {}
        for child in mod:
            kinds[type(child)] = kinds.get(type(child), 0) + 1
        pos = [i for i, child in enumerate(mod) if kinds[type(child)] >= 2 and _is_block(child)]
        if pos:
            found[name] = pos
    # innermost only: drop a list whose candidate blocks hold another list
    inner = {}
    for name, pos in found.items():
        if not any(other != name and other.startswith(f"{name}.") for other in found):
            inner[name] = pos
    return inner


def _first_tensor(obj):
    tensors = flatten_tensors(obj)
    return tensors[0] if tensors else None


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Sum over rows of 1 - cos(x_row, y_row), and the number of rows. Rows are tokens for a
    (batch, tokens, features) activation, samples otherwise."""
    x, y = x.detach().float(), y.detach().float()
    if x.dim() == 3:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    cos = nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8)
    return float((1.0 - cos).sum()), cos.numel()


def _observe(model, lists, batches):
    """Run the batches with hooks on every candidate block: calls, shape-preservation, scores."""
    stats: dict[str, dict] = {}
    hooks = []
    for lname, pos in lists.items():
        container = model.get_submodule(lname)
        for i in pos:
            bname = f"{lname}.{i}"
            st = stats[bname] = {"calls": 0, "same_shape": True, "dist": 0.0, "rows": 0}

            def hook(mod, args, kwargs, out, _st=st):
                x = _first_tensor(args)
                if x is None:
                    x = kwargs.get("hidden_states", _first_tensor(kwargs))
                y = _first_tensor(out)
                _st["calls"] += 1
                if x is None or y is None or x.shape != y.shape:
                    _st["same_shape"] = False
                    return
                d, n = _cosine_distance(x, y)
                _st["dist"] += d
                _st["rows"] += n

            hooks.append(container[i].register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(*b, **model_call_kwargs(model))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _magnitude(block: nn.Module) -> float:
    sq, n = 0.0, 0
    for p in block.parameters():
        if p.dim() >= 2:
            sq += float(p.detach().float().pow(2).sum())
            n += p.numel()
    return sq / n if n else 0.0


def _count_key(cfg, lname: str, length: int, taken: set) -> str | None:
    """The config key holding this list's length (decoder lists prefer decoder keys)."""
    keys = [k for k in LAYER_COUNT_KEYS if getattr(cfg, k, None) == length and k not in taken]
    if not keys:
        return None
    parts = lname.split(".")
    for side in ("decoder", "encoder"):
        if any(side in p for p in parts):
            sided = [k for k in keys if side in k]
            if sided:
                return sided[0]
            break
    plain = [k for k in keys if "decoder" not in k and "encoder" not in k]
    return (plain or keys)[0]


def _layer_lists(cfg, length: int) -> list[str]:
    """Per-layer config entries (``layer_types``, ...): lists named *layer* of the list's length."""
    out = []
    for k, v in list(vars(cfg).items()):
        if "layer" in k and isinstance(v, (list, tuple)) and len(v) == length and \
                k not in LAYER_COUNT_KEYS:
            out.append(k)
    return out


def _rename(name: str, lname: str, mapping: dict[int, int | None]):
    """A parameter / module name after the list is rebuilt (None: it was in a removed block)."""
    prefix = f"{lname}." if lname else ""
    if not name.startswith(prefix):
        return name
    head, _, rest = name[len(prefix):].partition(".")
    if not head.isdigit() or int(head) not in mapping:
        return name
    new = mapping[int(head)]
    if new is None:
        return None
    return f"{prefix}{new}" + (f".{rest}" if rest else "")


def _check_args(model, example_inputs, blocks, importance):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        example_inputs = positional_inputs(model, example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of "
                        "keyword arguments")
    if isinstance(blocks, bool) or not isinstance(blocks, (int, float)) or \
            (isinstance(blocks, float) and (math.isnan(blocks) or not 0.0 <= blocks < 1.0)) or \
            (isinstance(blocks, int) and blocks < 0):
        raise ValueError("blocks must be a count (int >= 0) or a fraction (float in [0, 1)), "
                         f"got {blocks!r}")
    if importance not in BLOCK_IMPORTANCES:
        raise ValueError(f"importance must be one of {BLOCK_IMPORTANCES}, got {importance!r}")
    return tuple(example_inputs)


def _resolve_lists(model, container, found):
    if container is None:
        return found
    names = [container] if isinstance(container, str) else list(container)
    out = {}
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"container must be a module name or a list of names, got {n!r}")
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"container: model has no submodule {n!r}") from None
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"container: {n!r} is a {type(mod).__name__}, "
                             "not an nn.ModuleList / nn.Sequential")
        out[n] = [i for i, child in enumerate(mod) if _is_block(child)] or list(range(len(mod)))
    return out


def prune_blocks(model: nn.Module, example_inputs, blocks: int | float = 1,
                 importance: str = "cosine", calib: Iterable | None = None, *,
                 container: str | Iterable[str] | None = None, ignore: Iterable = (),
                 verify: bool = True) -> BlockPruneReport:
    """Remove the least important whole blocks (layers) of ``model``, in place (depth pruning).

    The repeated residual blocks are found (see :func:`find_block_lists`), scored by
    ``importance`` and the lowest ones removed; the block lists are rebuilt, ``layer_idx``
    attributes renumbered and a Hugging Face ``config`` updated (layer count, ``layer_types``
    and other per-layer lists), so the model runs, generates with a KV cache, and saves /
    loads with ``save_pretrained`` / ``from_pretrained`` (or :func:`fastarch.pruning.load_pruned`
    after width pruning). At least one block of every list is kept.

    Args:
        model: any ``nn.Module`` with a list of repeated blocks.
        example_inputs: a tensor or tuple of tensors for one forward pass.
        blocks: how many blocks to remove (int), or the fraction of the candidate blocks (float
            in [0, 1), rounded down).
        importance: ``"cosine"`` (block influence on calibration data, default) or
            ``"magnitude"`` (data-free).
        calib: iterable of input tuples for ``"cosine"`` (default: ``[example_inputs]``).
        container: name(s) of the block list(s) to use instead of the ones found.
        ignore: blocks (modules or names such as ``"model.layers.0"``) that must be kept.
        verify: run the model after removal; undo everything if it fails.

    Returns:
        a :class:`BlockPruneReport` (removed blocks with their scores, list lengths,
        params / FLOPs before and after, what could not be handled and why).

    Example:
        >>> import torch, timm, fastarch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4).eval()
        >>> report = fastarch.prune_blocks(vit, torch.randn(1, 3, 32, 32), blocks=2)
        >>> len(vit.blocks)
        2
    """
    t_start = time.perf_counter()
    example_inputs = _check_args(model, example_inputs, blocks, importance)
    report = BlockPruneReport(importance=importance)
    was_training = model.training
    model.eval()
    try:
        report.params_before = count_params(model)
        try:
            report.flops_before = count_flops(model, example_inputs)
            with torch.no_grad():
                ref_shapes = [tuple(o.shape) for o in flatten_tensors(
                    model(*example_inputs, **model_call_kwargs(model)))]
        except Exception as exc:
            raise ValueError(f"example_inputs: the model does not run on them ({exc})") from exc
        _prune(model, example_inputs, blocks, importance, calib, container, ignore, verify,
               ref_shapes, report)
        report.params_after = count_params(model)
        report.flops_after = count_flops(model, example_inputs) if report.removed \
            else report.flops_before
    finally:
        model.train(was_training)
    report.total_seconds = time.perf_counter() - t_start
    return report


def _prune(model, example_inputs, blocks, importance, calib, container, ignore, verify,
           ref_shapes, report):
    ignored = set(_ignored_prefixes(model, ignore))
    lists = _resolve_lists(model, container, find_block_lists(model))
    if not lists:
        report.ok = False
        report.skipped.append(("<model>", "no list of repeated blocks found"))
        return
    cfg = _hf_config(model)
    count_keys: dict[str, str | None] = {}
    taken: set = set()
    for lname in list(lists):
        if cfg is None:
            continue
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            # GPT-2's attention scale depends on the layer's position: a renumbered block
            # would reload with another scale
            report.skipped.append((lname, "attention is scaled by the layer index "
                                   "(scale_attn_by_inverse_layer_idx): blocks kept"))
            del lists[lname]
            continue
        key = _count_key(cfg, lname, len(model.get_submodule(lname)), taken)
        if key is None:
            report.skipped.append((lname, "the config has no layer count equal to its length: "
                                   "a rebuilt model would not match"))
            del lists[lname]
            continue
        taken.add(key)
        count_keys[lname] = key
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib] \
        if calib is not None and importance == "cosine" else [example_inputs]
    stats = _observe(model, lists, batches)
    candidates = []  # (score, list name, position)
    for lname, pos in lists.items():
        for i in pos:
            bname = f"{lname}.{i}"
            st = stats[bname]
            if bname in ignored:
                report.skipped.append((bname, "ignored"))
                continue
            if st["calls"] != len(batches):
                report.skipped.append((bname, f"called {st['calls']} times in {len(batches)} "
                                       "forward passes (shared or unused): kept"))
                continue
            if not st["same_shape"]:
                report.skipped.append((bname, "its output shape differs from its input's: kept"))
                continue
            if importance == "cosine":
                score = st["dist"] / max(st["rows"], 1)
            else:
                score = _magnitude(model.get_submodule(bname))
            report.scores[bname] = score
            candidates.append((score, lname, i))
    n_total = len(candidates)
    n = blocks if isinstance(blocks, int) else math.floor(blocks * n_total + 1e-9)
    candidates.sort()
    chosen: dict[str, list[int]] = {}
    for score, lname, i in candidates:
        if sum(len(v) for v in chosen.values()) >= n:
            break
        if len(model.get_submodule(lname)) - len(chosen.get(lname, [])) <= 1:
            continue  # keep one block per list
        chosen.setdefault(lname, []).append(i)
        report.removed.append({"block": f"{lname}.{i}", "score": score, "list": lname})
    removed_n = sum(len(v) for v in chosen.values())
    if removed_n < n:
        report.skipped.append(("<model>", f"asked for {n} blocks, only {removed_n} removable "
                               f"(of {n_total} candidates; one block per list is kept)"))
    if not chosen:
        report.ok = n == 0
        return
    undo = []
    try:
        for lname, drop in chosen.items():
            _remove_from_list(model, lname, set(drop), count_keys.get(lname), undo)
        if verify:
            with torch.no_grad():
                shapes = [tuple(o.shape) for o in flatten_tensors(
                    model(*example_inputs, **model_call_kwargs(model)))]
            if shapes != ref_shapes:
                raise RuntimeError(f"output shapes changed: {ref_shapes} -> {shapes}")
    except Exception as exc:  # noqa: BLE001 - reported, the model is restored
        for fn in reversed(undo):
            fn()
        report.ok = False
        report.skipped.append(("<model>", f"removing the blocks breaks the model "
                               f"({type(exc).__name__}: {str(exc)[:200]}); left unchanged"))
        report.removed = []
        return
    kept = set()
    for lname in lists:
        length = len(model.get_submodule(lname))
        before = length + len(chosen.get(lname, []))
        report.lists[lname] = (before, length)
        kept.update(f"{lname}.{i}" for i in range(before) if i not in chosen.get(lname, []))
    report.kept = sorted(kept)


def _remove_from_list(model, lname, drop: set[int], count_key, undo) -> None:
    parent_name, _, attr = lname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = model.get_submodule(lname)
    keep = [i for i in range(len(old)) if i not in drop]
    mapping = {i: (keep.index(i) if i in keep else None) for i in range(len(old))}
    # layer_idx-style attributes: a block's position, which the KV cache indexes by
    renumbered = []
    for i in keep:
        for mod in old[i].modules():
            for a in INDEX_ATTRS:
                v = mod.__dict__.get(a)
                if isinstance(v, int) and not isinstance(v, bool) and v == i and mapping[i] != i:
                    renumbered.append((mod, a, v))
                    setattr(mod, a, mapping[i])
    undo.append(lambda r=renumbered: [setattr(m, a, v) for m, a, v in r])
    new = copy.copy(old)  # same class and attributes, its own child dict renumbered 0..k-1
    new._modules = OrderedDict((str(j), old[i]) for j, i in enumerate(keep))
    setattr(parent, attr, new)
    undo.append(lambda: setattr(parent, attr, old))
    cfg = _hf_config(model)
    if cfg is None or count_key is None:
        return
    length = len(old)
    saved = {count_key: getattr(cfg, count_key)}
    for k in _layer_lists(cfg, length):
        v = getattr(cfg, k)
        saved[k] = v
        setattr(cfg, k, type(v)(v[i] for i in keep))
    setattr(cfg, count_key, len(keep))
    record = getattr(cfg, "fastarch_pruned", None)
    if isinstance(record, dict):
        saved["fastarch_pruned"] = {k: (dict(v) if isinstance(v, dict) else v)
                                    for k, v in record.items()}
        for part in ("shapes", "attrs", "buffers"):
            entries = record.get(part) or {}
            renamed = {}
            for name, value in entries.items():
                new_name = _rename(name, lname, mapping)
                if new_name is None:
                    continue
                if part == "attrs" and new_name != name:
                    # a block's recorded position follows it (the KV cache indexes by it)
                    old_i = int(name[len(f"{lname}." if lname else ""):].split(".")[0])
                    value = {a: (mapping[old_i] if a in INDEX_ATTRS and v == old_i else v)
                             for a, v in value.items()}
                renamed[new_name] = value
            record[part] = renamed

    def restore():
        for k, v in saved.items():
            setattr(cfg, k, v)

    undo.append(restore)
