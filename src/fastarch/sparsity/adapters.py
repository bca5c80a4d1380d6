"""Where activation sparsity applies in the models we know: their MLPs and linear layers.

Known: Hugging Face Llama, Mistral, Qwen2, Qwen3, Gemma (1/2/3), GPT-2 and BERT, and timm
Vision Transformers. :func:`describe_model` says what a model is; :func:`mlp_modules` finds its
MLPs with an :class:`MLPSpec` that tells the sparse modules how to read them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

GATED_HF_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"}
HF_TYPES = GATED_HF_TYPES | {"gpt2", "bert"}
DECODER_TYPES = GATED_HF_TYPES | {"gpt2"}


@dataclasses.dataclass
class ModelKind:
    family: str  # "hf" | "timm" | "unknown"
    model_type: str  # HF model_type, "vit" for timm, or the class name
    decoder: bool
    known: bool


def describe_model(model: nn.Module) -> ModelKind:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        return ModelKind("hf", model_type, model_type in DECODER_TYPES, model_type in HF_TYPES)
    cls = type(model).__name__
    if cls == "VisionTransformer" and type(model).__module__.startswith("timm"):
        return ModelKind("timm", "vit", False, True)
    return ModelKind("unknown", cls, False, False)


def activation_name(act: nn.Module | Callable) -> str | None:
    """The sparse_mlp activation that equals ``act``, or None if it is not one of ours."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(act, nn.ReLU) or name == "ReLUActivation":
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name in ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh", "GELUPytorchTanh",
                "FastGELUActivation"):
        return "gelu_tanh"
    if name == "GELUActivation":
        return "gelu"
    return None


@dataclasses.dataclass
class MLPSpec:
    """How to read one MLP: its child names, weight layouts and dense maths."""
    children: tuple[str, ...]
    w_in: str
    w_up: str | None
    w_out: str
    in_layout: str  # "out_in" (nn.Linear) or "in_out" (HF Conv1D)
    out_layout: str
    activation: str
    act_child: str
    dropout_child: str | None = None

    def intermediate(self, mlp: nn.Module) -> int:
        w = getattr(mlp, self.w_in).weight
        return w.shape[0] if self.in_layout == "out_in" else w.shape[1]

    def hidden(self, mlp: nn.Module, x):
        act = getattr(mlp, self.act_child)
        h = act(getattr(mlp, self.w_in)(x))
        if self.w_up is not None:
            h = h * getattr(mlp, self.w_up)(x)
        return h

    def output(self, mlp: nn.Module, h):
        return self.finish(mlp, getattr(mlp, self.w_out)(h))

    def finish(self, mlp: nn.Module, y):
        if self.dropout_child is not None:
            y = getattr(mlp, self.dropout_child)(y)
        return y


def _gated_spec(mlp: nn.Module) -> MLPSpec | None:
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    act = activation_name(mlp.act_fn)
    if act is None:
        return None
    return MLPSpec(children=("gate_proj", "up_proj", "down_proj", "act_fn"), w_in="gate_proj",
                   w_up="up_proj", w_out="down_proj", in_layout="out_in", out_layout="out_in",
                   activation=act, act_child="act_fn")


def _gpt2_spec(mlp: nn.Module) -> MLPSpec | None:
    if not all(hasattr(mlp, n) for n in ("c_fc", "c_proj", "act")):
        return None
    act = activation_name(mlp.act)
    if act is None:
        return None
    return MLPSpec(children=("c_fc", "c_proj", "act", "dropout"), w_in="c_fc", w_up=None,
                   w_out="c_proj", in_layout="in_out", out_layout="in_out", activation=act,
                   act_child="act", dropout_child="dropout")


def _timm_spec(mlp: nn.Module) -> MLPSpec | None:
    if not all(hasattr(mlp, n) for n in ("fc1", "fc2", "act")):
        return None
    act = activation_name(mlp.act)
    if act is None or not isinstance(mlp.fc1, nn.Linear):
        return None
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return None  # a norm between fc1 and fc2 would not be applied by sparse_mlp
    return MLPSpec(children=("fc1", "act", "drop1", "norm", "fc2", "drop2"), w_in="fc1",
                   w_up=None, w_out="fc2", in_layout="out_in", out_layout="out_in",
                   activation=act, act_child="act", dropout_child="drop2")


def _under(name: str, root: str) -> bool:
    return not root or name == root or name.startswith(root + ".")


def language_root(model: nn.Module) -> str:
    """Where the language model sits in a Hugging Face model: "" for a plain decoder or encoder,
    ``model.language_model`` for a multimodal one (whose vision tower is not sparsified)."""
    if describe_model(model).family != "hf" or getattr(
            getattr(model, "config", None), "is_encoder_decoder", False):
        return ""  # an encoder-decoder: its own two stacks, not a language model inside
    get = getattr(model, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a model without a decoder to give
        dec = None
    if isinstance(dec, nn.Module):
        for name, mod in model.named_modules():
            if mod is dec:
                return name
    return ""


def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module, MLPSpec | None, str]]:
    """(qualified name, module, spec or None, reason if None) for every MLP of a known model."""
    kind = describe_model(model)
    root = language_root(model)
    found = []
    for name, mod in model.named_modules():
        if not _under(name, root):
            continue
        cls = type(mod).__name__
        if kind.model_type in GATED_HF_TYPES and cls.endswith("MLP"):
            spec = _gated_spec(mod)
        elif kind.model_type == "gpt2" and cls == "GPT2MLP":
            spec = _gpt2_spec(mod)
        elif kind.family == "timm" and cls in ("Mlp", "GluMlp", "SwiGLU"):
            spec = _timm_spec(mod) if cls == "Mlp" else None
        else:
            continue
        reason = "" if spec else f"{cls}: activation or layout not supported by sparse_mlp"
        found.append((name, mod, spec, reason))
    return found


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _block_list(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The longest nn.ModuleList / nn.Sequential of blocks in the language model: a
    transformer's layer stack."""
    best = None
    root = language_root(model)
    for name, mod in model.named_modules():
        if not _under(name, root):
            continue
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return best


def linear_modules(model: nn.Module, scope: str) -> list[tuple[str, nn.Module]]:
    """The linear layers TEAL sparsifies: in the MLPs (scope="mlp") or everywhere in the layer
    stack (scope="all"); never embeddings, heads or poolers."""
    kind = describe_model(model)
    blocks = _block_list(model)
    if blocks is None:
        return []
    prefix = blocks[0] + "." if blocks[0] else ""
    if not kind.known:
        scope = "all"  # fastarch cannot tell the MLPs of a model it does not know
    # the blocks: a bare linear kept in the same nn.Sequential as blocks is a stem or a head
    # (unknown models), not one of them; a stack of bare linears is an MLP, all kept
    children = list(blocks[1].named_children())
    has_blocks = any(not _is_linear(m) and any(_is_linear(x) for x in m.modules())
                     for _, m in children)
    keep = tuple(prefix + child for child, m in children if not (has_blocks and _is_linear(m)))
    out = []
    for name, mod in model.named_modules():
        if not _is_linear(mod) or not any(name == k or name.startswith(k + ".") for k in keep):
            continue
        if scope == "all":
            out.append((name, mod))
            continue
        last = name.split(".")
        if kind.model_type == "bert":
            # BertIntermediate.dense and BertOutput.dense (not attention.output.dense)
            if name.endswith("intermediate.dense") or (
                name.endswith("output.dense") and "attention" not in last
            ):
                out.append((name, mod))
        elif kind.model_type == "gpt2":
            if ".mlp." in name:
                out.append((name, mod))
        elif kind.family == "timm":
            if ".mlp." in name:
                out.append((name, mod))
        elif ".mlp." in name:
            out.append((name, mod))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
