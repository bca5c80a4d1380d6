"""Hugging Face specifics: keep ``model.config`` true to the pruned shapes, and load it back.

Uniform changes (every layer pruned alike) are written to the usual config keys
(``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``). Per-layer widths cannot be expressed there, so the exact pruned shapes and module
attributes are also stored in ``config.fastarch_pruned``; :func:`load_pruned` rebuilds the model
from its config, applies them, and loads the weights.
"""
from __future__ import annotations

import torch
from torch import nn

# word_embed_proj_dim (OPT) and embedding_size (ELECTRA): where they differ from the hidden
# size a fresh build adds a projection
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "word_embed_proj_dim",
               "embedding_size")
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
            "shared_expert_intermediate_size", "moe_intermediate_size")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
             "decoder_attention_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")


def _int_attrs(mod: nn.Module) -> dict:
    out = {}
    for k, v in mod.__dict__.items():
        if k.startswith("_") and k != "_fastarch_heads":
            continue
        if isinstance(v, bool):
            continue
        # floats too: a scale set at construction from the head size (GPTBigCode's scaling)
        # would be rebuilt from the config's hidden size / head count
        if isinstance(v, (int, float)) or (isinstance(v, tuple) and v and
                                           all(isinstance(x, int) for x in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


SMALL_BUFFER = 4096  # elements: rotary frequencies and scales, not causal-mask buffers


def _small_buffers(model: nn.Module) -> dict:
    """The small buffers that ``state_dict`` leaves out (non-persistent) and a fresh build
    computes from the config, by name: [shape, values]."""
    out = {}
    for path, mod in model.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None and 0 < buf.numel() <= SMALL_BUFFER and (
                    buf.is_floating_point() or buf.dtype in (torch.int32, torch.int64)):
                out[f"{path}.{name}" if path else name] = [
                    list(buf.shape), buf.detach().cpu().reshape(-1).tolist()]
    return out


def _get(cfg, key):
    """A config value, None where there is none (or it is per layer: Gemma4's head_dim raises
    on global access)."""
    try:
        return getattr(cfg, key, None)
    except Exception:  # noqa: BLE001
        return None


CONFIG_KEYS = HIDDEN_KEYS + FFN_KEYS + HEAD_KEYS + KV_KEYS + ("head_dim",)


def update_config(model: nn.Module, graph, shapes: dict) -> list[str]:
    """Write the pruned widths to ``model.config`` (and the exact shapes to
    ``config.fastarch_pruned``). Returns notes on keys left at their old value because the
    config class's own validation refuses the pruned one (see :func:`_keep_valid`)."""
    cfg = model.config
    before = {k: _get(cfg, k) for k in CONFIG_KEYS}
    record = {"shapes": {n: list(new) for n, (_, new) in shapes.items()}, "attrs": {}}
    # a smaller hidden size also changes, in a fresh build, weights that kept their width (an
    # MQA c_attn sized hidden + 2 * head_dim): record every parameter's shape
    for n, p in model.named_parameters(remove_duplicate=False):
        record["shapes"].setdefault(n, list(p.shape))
    # the size attributes of every module, not only the pruned ones: a fresh build sizes some
    # from the config even where pruning kept them (Persimmon's per-head q_layernorm from
    # hidden // heads, Bloom's head_dim)
    # and the per-layer head counts of modules that read them from self.config (Phi-3)
    from fastarch.pruning.removal import LayerConfig

    record["layer_configs"] = {}
    for path, mod in model.named_modules():
        record["attrs"][path] = _int_attrs(mod)
        if isinstance(mod.__dict__.get("config"), LayerConfig):
            record["layer_configs"][path] = dict(mod.config.__dict__["_over"])
    # scalars kept out of the checkpoint but built from the config: Gemma's embed_scale is
    # sqrt(hidden) of the model that was pruned, not of the pruned config
    # (and Falcon's rotary frequencies, of the head size the config no longer gives)
    record["buffers"] = _small_buffers(model)
    prev = getattr(cfg, "fastarch_pruned", None)
    if isinstance(prev, dict):  # pruned twice: merge
        prev["shapes"].update(record["shapes"])
        prev.setdefault("layer_configs", {}).update(record["layer_configs"])
        prev.setdefault("buffers", {}).update(record["buffers"])
        for k, v in record["attrs"].items():
            prev["attrs"].setdefault(k, {}).update(v)
        record = prev
    cfg.fastarch_pruned = record

    # a model that switched its attention class at run time (BigBird: block_sparse ->
    # original_full for short inputs, never back) is saved as the class it now runs: a fresh
    # build of the other class would size its attention from the config, not from the record
    cfg_type = _get(cfg, "attention_type")
    if isinstance(cfg_type, str):
        for mod in model.modules():
            run = mod.__dict__.get("attention_type")
            if isinstance(run, str) and run != cfg_type:
                cfg.attention_type = run
                break

    # uniform changes into the ordinary keys
    old_hidden = None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        for n, p in model.named_parameters(remove_duplicate=False):
            if p is emb.weight and n in shapes:
                old_hidden, new_hidden = shapes[n][0][1], shapes[n][1][1]
                for key in HIDDEN_KEYS:
                    if _get(cfg, key) == old_hidden:
                        setattr(cfg, key, new_hidden)
                break
    heads = [getattr(model.get_submodule(s.module), "_fastarch_heads", (s.q_heads, s.kv_heads))
             for s in graph.attention if _has(model, s.module)]
    if graph.attention:
        head_dim = graph.attention[0].head_dim
        if len({h[0] for h in heads}) == 1 and heads:
            q0 = graph.attention[0].q_heads
            hidden = next((_get(cfg, k) for k in HIDDEN_KEYS
                           if isinstance(_get(cfg, k), int)), None)
            for key in HEAD_KEYS:
                if _get(cfg, key) == q0:
                    setattr(cfg, key, heads[0][0])
                    if hidden and heads[0][0] and hidden % heads[0][0]:
                        # e.g. BERT refuses hidden % heads != 0 at construction: load_pruned
                        # builds with the original count, then applies the pruned attributes
                        record.setdefault("build", {}).setdefault(key, q0)
            for key in KV_KEYS:  # units are whole K/V heads with their query heads
                kv = _get(cfg, key)
                # one K/V head (MQA, or GQA down to one group) stays one: only query heads go
                if isinstance(kv, int) and kv > 1 and q0 % kv == 0:
                    setattr(cfg, key, heads[0][0] // (q0 // kv))
        if _get(cfg, "head_dim") is not None or old_hidden is not None or heads:
            try:
                cfg.head_dim = head_dim
            except Exception:  # noqa: BLE001 - a property, or a per-layer attribute
                pass
    for key in FFN_KEYS:
        old = _get(cfg, key)
        if key == "n_inner" and old is None and hasattr(cfg, "n_embd"):
            old = 4 * (old_hidden or cfg.n_embd)
        if not isinstance(old, int):
            continue
        new_vals = set()
        for n, (o, nw) in shapes.items():
            # a linear's (out, in), or the last two of MoE experts' stacked (experts, out, in)
            if (len(o) == 2 and n.endswith("weight")) or \
                    (len(o) == 3 and n.endswith(("down_proj", "w2"))):
                for a, b in ((-2, -1), (-1, -2)):
                    if o[a] == old and nw[a] != old and o[b] != old:
                        new_vals.add(nw[a])
        if len(new_vals) == 1:
            setattr(cfg, key, new_vals.pop())
    return _keep_valid(cfg, before)


def _keep_valid(cfg, before: dict) -> list[str]:
    """Some configs validate widths they derive from others: Bamba's Mamba width is
    ``mamba_expand * hidden_size`` and must split into ``mamba_n_heads`` heads, and
    ``save_pretrained`` runs that check. Where the pruned values fail it, the changed keys go
    back to their old values (one at a time, then all) until it passes; the modules keep their
    pruned widths, which ``config.fastarch_pruned`` records for :func:`load_pruned`."""
    validate = getattr(cfg, "validate", None)
    if not callable(validate):
        return []
    try:
        validate()
        return []
    except Exception as exc:  # noqa: BLE001 - the config class's own error
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1].strip()[:160]}"
    changed = {k: (old, _get(cfg, k)) for k, old in before.items() if _get(cfg, k) != old}
    if not changed:
        return []
    kept = None
    for key, (old, new) in changed.items():
        setattr(cfg, key, old)
        try:
            validate()
            kept = [key]
            break
        except Exception:  # noqa: BLE001
            setattr(cfg, key, new)
    if kept is None:
        for key, (old, _) in changed.items():
            setattr(cfg, key, old)
        kept = list(changed)
        try:
            validate()
        except Exception:  # noqa: BLE001 - invalid before pruning too: nothing more to do
            pass
    record = cfg.fastarch_pruned
    record.setdefault("config_kept", {}).update({k: changed[k][1] for k in kept})
    return [f"{k} stays {changed[k][0]} in the config (pruned width {changed[k][1]}): "
            f"{type(cfg).__name__} refuses it ({error}); load_pruned rebuilds the pruned "
            "widths from config.fastarch_pruned" for k in kept]


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _apply_attrs(model: nn.Module, record: dict) -> None:
    for path, attrs in record.get("attrs", {}).items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:  # built another way when first run (BigBird's attention type)
            continue
        for k, v in attrs.items():
            setattr(mod, k, tuple(v) if isinstance(v, list) else v)


def _apply_buffers(model: nn.Module, record: dict) -> None:
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, (shape, values) in record.get("buffers", {}).items():
        old = buffers.get(name)
        if old is None:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._buffers[attr] = torch.tensor(values, dtype=old.dtype, device=old.device).reshape(shape)


def _apply_layer_configs(model: nn.Module, record: dict) -> None:
    from fastarch.pruning.removal import LayerConfig

    for path, over in record.get("layer_configs", {}).items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if mod.__dict__.get("config") is not None:
            mod.config = LayerConfig(mod.config, over)


def apply_pruned_shapes(model: nn.Module, record: dict) -> nn.Module:
    """Give a freshly built model the pruned shapes and attributes stored in ``record``."""
    _apply_attrs(model, record)
    _apply_layer_configs(model, record)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    replaced: dict[int, torch.Tensor] = {}
    for name, shape in record.get("shapes", {}).items():
        if name not in tensors:
            continue
        old = tensors[name]
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        new = replaced.get(id(old))
        if new is None:
            data = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(
                old, nn.Parameter) else data
            replaced[id(old)] = new
        if isinstance(old, nn.Parameter):
            mod._parameters[attr] = new
        else:
            mod._buffers[attr] = new
    _apply_buffers(model, record)
    return model


def _checkpoint_names(model: nn.Module, state: dict) -> dict | None:
    """Checkpoint names as the model calls them: transformers renames some weights on load
    (GPT-NeoX's ``embed_out`` is ``lm_head``) and back on save. None where weights must be
    converted, not only renamed (MoE experts saved one by one, stacked in the model)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers before 5 renamed nothing
        return state
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return state
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key in own:  # already the model's name (as transformers' loader keeps it)
            out[key] = value
            continue
        new, converted = rename_source_key(key, renames, converters)
        if converted is not None:
            return None
        out[new] = value
    return out


def _convert_into(model: nn.Module, state: dict):
    """Load ``state`` into the rebuilt (pruned-shape) model through transformers' load-time
    weight conversion; (missing, unexpected) names, or None where that API is not there."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        info, _ = convert_and_load_state_dict_in_model(
            model=model, state_dict=state,
            load_config=LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model)))
    except ImportError:
        return None
    if info.mismatched_keys or info.error_msgs:
        raise ValueError(f"path: weights that do not fit the rebuilt model "
                         f"{sorted(info.mismatched_keys)[:3]} {info.error_msgs[:2]}")
    return sorted(info.missing_keys), sorted(info.unexpected_keys)


def _load_converted(path: str, model_class, record, kwargs) -> nn.Module:
    """A checkpoint whose weights transformers converts on load (MoE experts): its own
    from_pretrained loads it, which works where the config gives every pruned width (heads or
    widths pruned alike in every layer); the shapes are then checked against the record."""
    what = f"path: {model_class.__name__}'s weights are converted on load"
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the rebuild
        raise ValueError(f"{what}, which load_pruned leaves to transformers, and it could not "
                         f"build the pruned widths from the config: {str(exc)[:300]}") from exc
    shapes = (record or {}).get("shapes", {})
    for name, p in model.named_parameters(remove_duplicate=False):
        if shapes and name not in shapes:
            raise ValueError(f"{what}, and the rebuild has a weight the pruned model had not: "
                             f"{name}")
        if name in shapes and list(p.shape) != list(shapes[name]):
            raise ValueError(f"{what}, and the config does not give the pruned shape of {name}: "
                             f"{list(p.shape)} built, {shapes[name]} saved (widths that differ "
                             "between layers)")
    if record:
        _apply_attrs(model, record)
        _apply_buffers(model, record)
    return model.eval()


def load_pruned(path: str, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`fastarch.prune`.

    Example:
        >>> model = load_pruned("out/pruned-llama")  # doctest: +SKIP
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    record = getattr(config, "fastarch_pruned", None)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch) if arch else transformers.AutoModel
    build = (record or {}).get("build") or {}
    truth = {k: getattr(config, k) for k in build}
    for k, v in build.items():  # a count the class refuses to build with (see update_config)
        setattr(config, k, v)
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config, **kwargs)
    else:
        model = model_class._from_config(config, **kwargs)
    for k, v in truth.items():
        setattr(model.config, k, v)
    if record:
        apply_pruned_shapes(model, record)
    import glob
    import os

    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(f))
    if not state:
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu")
    named = _checkpoint_names(model, state)
    if named is not None:
        missing, unexpected = model.load_state_dict(named, strict=False)
    else:  # MoE experts saved one by one: transformers' own converter stacks them
        loaded = _convert_into(model, state)
        if loaded is None:  # its internals moved: from_pretrained, where the config suffices
            return _load_converted(path, model_class, record, kwargs)
        missing, unexpected = loaded
    tied = set()  # declared by the model and by its sub-models (BartModel's embed_tokens)
    for prefix, sub in model.named_modules():
        for key in getattr(sub, "_tied_weights_keys", None) or []:
            tied.add(f"{prefix}.{key}" if prefix else key)
    missing = [m for m in missing if m not in tied]
    if unexpected:
        raise ValueError(f"path: unexpected weights {unexpected[:5]}")
    if missing:  # a weight the rebuilt model has and the checkpoint lacks would stay as built
        raise ValueError(f"path: the checkpoint lacks weights of the rebuilt model {missing[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model
