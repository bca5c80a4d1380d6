"""Folding weight-standardised convolutions into plain ones, so that they can be pruned exactly.

timm's ``StdConv2d`` / ``StdConv2dSame`` (BiT ResNet-V2, ViT hybrids) and ``ScaledStdConv2d`` /
``ScaledStdConv2dSame`` (NF-ResNets, NFNets) compute their weight in ``forward``: each output
filter is standardised over (in, kh, kw) (the Scaled ones then multiply by ``gain * scale``).
Removing input channels of such a conv changes the filter statistics, so the pruning graph
blocks them. The computed weight does not depend on the input, so in inference the module equals
a plain convolution with that weight: :func:`fold_weight_standardization` swaps each one for that
convolution (same stride, padding, dilation, groups, bias), after which pruning is exact.
Training the folded model trains plain convolutions (the standardisation is gone).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

_TIMM_CLASSES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def _std_conv_types() -> tuple:
    """timm's weight-standardised conv classes, if timm is loaded (a model that holds one has
    loaded it; timm is not imported for models that do not use it)."""
    mod = sys.modules.get("timm.layers.std_conv")
    if mod is None:
        return ()
    return tuple(getattr(mod, n) for n in _TIMM_CLASSES if hasattr(mod, n))


def standardized_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module.forward`` convolves with: the same ``F.batch_norm`` call as timm's
    (biased variance, ``eps``; ``gain * scale`` as the affine weight for the Scaled variants),
    so the folded weight is bit for bit the one the module uses."""
    gain = getattr(module, "gain", None)
    affine = None if gain is None else (gain * module.scale).view(-1)
    with torch.no_grad():
        return F.batch_norm(module.weight.reshape(1, module.out_channels, -1), None, None,
                            weight=affine, training=True, momentum=0.0,
                            eps=module.eps).reshape_as(module.weight)


def folded_conv(module: nn.Module) -> nn.Conv2d:
    """A plain convolution that computes what ``module`` (a timm weight-standardised conv)
    computes in inference. The *Same variants whose TF "SAME" padding depends on the input size
    (``same_pad``: a stride above 1, or an odd ``dilation * (kernel - 1)``) become timm's
    ``Conv2dSame``, which pads the input with ``pad_same`` exactly as they do; the others (and
    the non-Same classes) an ``nn.Conv2d`` with the module's static padding."""
    bias = module.bias is not None
    args = (module.in_channels, module.out_channels, module.kernel_size, module.stride)
    kw = {"dilation": module.dilation, "groups": module.groups, "bias": bias, "device": "meta"}
    if getattr(module, "same_pad", False):
        from timm.layers import Conv2dSame

        new = Conv2dSame(*args, padding=0, **kw)
    else:
        new = nn.Conv2d(*args, padding=module.padding, padding_mode=module.padding_mode, **kw)
    new.weight = nn.Parameter(standardized_weight(module),
                              requires_grad=module.weight.requires_grad)
    if bias:
        new.bias = nn.Parameter(module.bias.detach().clone(),
                                requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def fold_weight_standardization(model: nn.Module) -> list:
    """Replace, in place, every timm weight-standardised conv of ``model`` by
    :func:`folded_conv`. Returns ``[(parent, name, original module), ...]`` for
    :func:`unfold_weight_standardization`. ``model`` itself is never replaced (a bare
    ``StdConv2d`` is left as it is)."""
    types = _std_conv_types()
    if not types:
        return []
    swaps = []
    folded: dict = {}  # a module registered under several names is folded once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in types:
                if id(child) not in folded:
                    folded[id(child)] = folded_conv(child)
                setattr(parent, name, folded[id(child)])
                swaps.append((parent, name, child))
    return swaps


def unfold_weight_standardization(swaps: list) -> None:
    """Put back the modules that :func:`fold_weight_standardization` replaced."""
    for parent, name, original in reversed(swaps):
        setattr(parent, name, original)
