"""``use_attention``: run the attention of Hugging Face and timm models on the fastarch kernel.

* Hugging Face (Llama, Mistral, Qwen2/3, GPT-2, BERT): the models call their attention through
  ``transformers``' attention interface; we register a ``"fastarch"`` implementation (and its mask
  function: the boolean SDPA mask, or None when the plain pattern suffices) and switch the model
  to it. The variant is stored on each attention module. KV caches work unchanged (the kernel
  gets the whole cache and places the queries at its end).
* timm ViT: each ``Attention`` module is replaced by a module with the same weights whose
  attention runs on the kernel.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from fastarch.attention import masks as M
from fastarch.attention.module import BlockSparseAttention, resolve_variant
from fastarch.attention.topk import TopKAttention

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert")
_REGISTERED = False
_warned_dropout = False


@dataclasses.dataclass
class AttentionSwapReport:
    """What :func:`use_attention` did: the modules now on the kernel, and what it left alone."""

    variant: str
    swapped: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)

    def __bool__(self) -> bool:
        return bool(self.swapped)


def _hf_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None,
                          softcap: float | None = None, sliding_window: int | None = None,
                          **kwargs):
    """The ``"fastarch"`` entry of transformers' attention interface: returns (B, L, H, D)."""
    global _warned_dropout
    attn = getattr(module, "_fastarch_attention", None)
    if dropout > 0.0 or attn is None:
        # Training-time dropout on the probabilities is not in the kernel: use SDPA there.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if dropout > 0.0 and not _warned_dropout:
            _warned_dropout = True
            warnings.warn("fastarch attention: dropout > 0 (training mode) runs on SDPA",
                          RuntimeWarning, stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if isinstance(attn, TopKAttention):
        # Data-dependent selection; the module keeps its layer's key-block summary between
        # decode steps. (A model's own sliding window is not combined with the selection.)
        out = attn(query, key, value, scale=scaling, attn_mask=attention_mask,
                   causal=bool(getattr(module, "is_causal", True)), softcap=softcap or None,
                   state=module)
        return out.transpose(1, 2).contiguous(), None
    if sliding_window is not None and attn.mask is _CAUSAL:
        # The model's own sliding window (Mistral, Qwen2 with use_sliding_window) on top of causal.
        attn = _sliding(attn, sliding_window)
    if softcap:
        attn = _softcapped(attn, softcap)
    out = attn(query, key, value, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


_CAUSAL = resolve_variant("causal")
_SLIDING: dict = {}


def _sliding(attn: BlockSparseAttention, window: int) -> BlockSparseAttention:
    key = (window, attn.block_size)
    if key not in _SLIDING:
        _SLIDING[key] = BlockSparseAttention(M.sliding_window(window - 1),
                                             block_size=attn.block_size)
    return _SLIDING[key]


def _softcapped(attn: BlockSparseAttention, softcap: float) -> BlockSparseAttention:
    """attn with the model's softcap (Gemma 2), made once per (attn, softcap) and kept on attn:
    a fresh module per call would drop the routing it keeps for its last shapes."""
    made = attn.__dict__.setdefault("_fastarch_softcapped", {})
    if softcap not in made:
        made[softcap] = BlockSparseAttention(attn.mask, block_size=attn.block_size,
                                             softcap=softcap)
    return made[softcap]


def _register_hf() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("fastarch", _hf_attention_forward)
    AttentionMaskInterface.register("fastarch", sdpa_mask)
    _REGISTERED = True


def _is_hf(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers not installed
        return False
    return isinstance(model, PreTrainedModel)


def _use_hf(model, attn, report) -> None:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in HF_MODEL_TYPES:
        reason = (f"Hugging Face model type {model_type!r} is not supported "
                  f"(supported: {', '.join(HF_MODEL_TYPES)})")
        report.skipped.append(("", reason))
        return
    if getattr(model.config, "is_encoder_decoder", False) or getattr(
            model.config, "add_cross_attention", False):
        report.skipped.append(("", "cross-attention models are not supported"))
        return
    _register_hf()
    targets = [(n, m) for n, m in model.named_modules()
               if type(m).__name__.endswith(("Attention", "SelfAttention"))
               and any(isinstance(getattr(c, "weight", None), torch.Tensor)
                       for c in m.children())]
    if not targets:
        report.skipped.append(("", "no attention modules found"))
        return
    for name, m in targets:
        # A plain attribute, not a submodule: the model's state_dict stays as it was.
        object.__setattr__(m, "_fastarch_attention", attn)
        report.swapped.append(name)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("fastarch")
    else:  # older transformers
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = "fastarch"


class TimmAttention(nn.Module):
    """timm's ViT ``Attention`` with the same weights, attention on the fastarch kernel."""

    def __init__(self, inner: nn.Module, attn: BlockSparseAttention | TopKAttention):
        super().__init__()
        self.inner = inner
        self.attn = attn

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        a = self.inner
        if self.training and a.attn_drop.p > 0:
            return a(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        attn = self.attn
        if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.dtype == torch.bool:
            attn_mask = attn_mask[None, None]
        if isinstance(attn, TopKAttention):
            x = attn(q, k, v, scale=a.scale, attn_mask=attn_mask, causal=bool(is_causal))
            return self._finish(x, b, n, gate)
        if is_causal and attn.mask is not _CAUSAL:
            attn = BlockSparseAttention(M.and_masks(attn.mask, _CAUSAL),
                                        block_size=attn.block_size)
        x = attn(q, k, v, scale=a.scale, attn_mask=attn_mask)
        return self._finish(x, b, n, gate)

    def _finish(self, x, b, n, gate):
        a = self.inner
        x = x.transpose(1, 2).reshape(b, n, getattr(a, "attn_dim", a.num_heads * a.head_dim))
        x = getattr(a, "norm", nn.Identity())(x)
        if gate is not None:
            x = x * gate
        x = a.proj(x)
        return a.proj_drop(x)


def _use_timm(model, attn, report) -> None:
    try:
        from timm.models.vision_transformer import Attention as TimmViTAttention
    except ImportError:
        report.skipped.append(("", "timm is not installed"))
        return
    for name, m in list(model.named_modules()):
        if type(m) is not TimmViTAttention:
            cls = type(m).__name__
            if cls.endswith("Attention") and "timm" in type(m).__module__:
                # Swin's WindowAttention, attention of other layouts
                reason = f"{type(m).__module__}.{cls} is not timm's ViT Attention"
                report.skipped.append((name, reason))
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], TimmAttention(m, attn))
        report.swapped.append(name)


def _is_encoder(model) -> bool:
    """BERT and timm ViTs attend both ways; the decoders attend causally."""
    if _is_hf(model):  # BERT, unless built as a decoder (BertLMHeadModel, is_decoder=True)
        return getattr(model.config, "model_type", None) == "bert" and not getattr(
            model.config, "is_decoder", False)
    return True  # timm: only its ViTs are swapped


def use_attention(model: nn.Module, variant=None, *,
                  block_size: int = 64) -> AttentionSwapReport:
    """Run the attention of ``model`` on the fastarch block-sparse kernel with ``variant``.

    Supported: Hugging Face Llama, Mistral, Qwen2, Qwen3, GPT-2, BERT (the model switches to the
    ``"fastarch"`` attention implementation; ``generate`` with a KV cache works) and timm ViT
    models (their ``Attention`` modules are wrapped). With ``"causal"`` (decoders) or ``"full"``
    (BERT, ViT) the outputs equal the original model's. Other models are left unchanged and the
    reason is in the returned report.

    Args:
        model: the model, modified in place.
        variant: None (the default) for the model's own pattern: ``"causal"`` in decoders,
            ``"full"`` in BERT and ViT. Or ``"causal"``, ``"full"``, ``"sliding_window:W"``, ``"local:W"``,
            ``"prefix_lm:P"``, ``"strided:S"``, ``"fixed:S"``, a :class:`MaskSpec`, or
            ``"topk:K"`` / a :class:`TopKAttention`: data-dependent selection of the K best key
            blocks per query tile (Quest-style, shared by a GQA group; causal in decoders,
            bidirectional in BERT / ViT); in decoding each layer extends its key-block summary
            with the new keys only. ``"topk:K"`` with K at least the number of key blocks equals
            ``"causal"`` / ``"full"``, and so does a call over fewer keys than the module's
            ``min_keys`` (on CPU by default ``TOPK_MIN_KEYS_CPU``, where selecting costs more
            than it saves; pass ``TopKAttention(K, min_keys=0)`` to select at every length).
        block_size: the kernel's tile size.

    Example:
        >>> model = LlamaForCausalLM(LlamaConfig(...)).eval()
        >>> report = fastarch.use_attention(model, "sliding_window:256")
        >>> model.generate(input_ids, max_new_tokens=20)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if variant is None:
        variant = "full" if _is_encoder(model) else "causal"
    attn = _make_attention(variant, block_size)
    report = AttentionSwapReport(variant=attn.name if isinstance(attn, TopKAttention)
                                 else attn.mask.name)
    if _is_hf(model):
        _use_hf(model, attn, report)
    elif "timm" in type(model).__module__:
        _use_timm(model, attn, report)
    else:
        reason = (f"{type(model).__name__} is neither a supported Hugging Face nor a timm ViT "
                  "model")
        report.skipped.append(("", reason))
    if not report.swapped:
        if not report.skipped:
            report.skipped.append(("", f"{type(model).__name__} has no attention module that "
                                   "fastarch can run"))
        warnings.warn(f"fastarch.use_attention: model unchanged ({report.skipped[0][1]})",
                      stacklevel=2)
    elif variant == "causal" and _is_encoder(model):
        warnings.warn("fastarch.use_attention: 'causal' on a model that attends both ways "
                      f"({type(model).__name__}): its outputs change; None keeps its own "
                      "pattern", stacklevel=2)
    return report


def _make_attention(variant, block_size: int):
    """The attention object a variant stands for: a TopKAttention for ``"topk:K"`` (or one
    given), else a BlockSparseAttention over the resolved mask."""
    if isinstance(variant, TopKAttention):
        return variant
    if isinstance(variant, str) and variant.partition(":")[0] == "topk":
        arg = variant.partition(":")[2]
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"unknown attention variant {variant!r}: 'topk:K' needs K >= 1 "
                             "key blocks per query tile")
        return TopKAttention(int(arg), block_size=block_size)
    return BlockSparseAttention(resolve_variant(variant), block_size=block_size)
