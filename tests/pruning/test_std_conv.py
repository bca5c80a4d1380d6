"""Weight-standardised convolutions (timm StdConv2d, ScaledStdConv2d and their *Same variants):
the folded plain conv computes what the module computes, pruning through folded convs equals
the masked (folded) model, fold_weight_standardization=False keeps them blocked, and a model
that is not pruned is not folded either."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from fastarch.pruning import masked_copy, prune
from fastarch.pruning.std_conv import fold_weight_standardization, folded_conv

layers = pytest.importorskip("timm.layers")

STD_CONVS = (layers.StdConv2d, layers.StdConv2dSame, layers.ScaledStdConv2d,
             layers.ScaledStdConv2dSame)


def run(model, x):
    with torch.no_grad():
        return model(x)


def _randomise(conv):
    """Gains and biases away from their init (1 and 0), so that a fold that drops them fails."""
    with torch.no_grad():
        if getattr(conv, "gain", None) is not None:
            conv.gain.uniform_(0.5, 2.0)
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


# (class, constructor kwargs, input shape): dynamic SAME padding (stride 2 on an odd size, an
# even kernel), static padding, grouped, no bias, 1x1
CASES = [
    (layers.StdConv2d, {"kernel_size": 3}, (1, 3, 32, 32)),
    (layers.StdConv2d, {"kernel_size": 3, "stride": 2, "groups": 3, "bias": True}, (2, 6, 13, 13)),
    (layers.StdConv2dSame, {"kernel_size": 3, "stride": 2}, (1, 3, 13, 13)),
    (layers.StdConv2dSame, {"kernel_size": 4}, (1, 3, 15, 15)),
    (layers.StdConv2dSame, {"kernel_size": 3}, (1, 3, 32, 32)),
    (layers.ScaledStdConv2d, {"kernel_size": 3, "gamma": 1.7}, (1, 3, 32, 32)),
    (layers.ScaledStdConv2d, {"kernel_size": 1, "bias": False}, (2, 5, 7, 9)),
    (layers.ScaledStdConv2dSame, {"kernel_size": 3, "stride": 2, "groups": 3}, (1, 6, 13, 13)),
    (layers.ScaledStdConv2dSame, {"kernel_size": 5, "dilation": 2}, (1, 3, 17, 17)),
]


@pytest.mark.parametrize("cls, kwargs, shape", CASES, ids=[
    f"{c.__name__}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + "-" + "x".join(map(str, s))
    for c, kw, s in CASES])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "bf16"])
def test_folded_conv_equals_module(cls, kwargs, shape, dtype, tol):
    torch.manual_seed(0)
    conv = cls(shape[1], 8 if kwargs.get("groups", 1) == 1 else 9, **kwargs)
    conv = _randomise(conv).to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    folded = folded_conv(conv)
    assert type(folded) in (nn.Conv2d, layers.Conv2dSame)
    assert folded.weight.dtype == dtype
    assert not any(n == "gain" for n, _ in folded.named_parameters())
    torch.testing.assert_close(run(folded, x), run(conv, x), atol=tol, rtol=tol)
    # the folded weight is a weight, not a view of the module's: pruning one leaves the other
    assert folded.weight.data_ptr() != conv.weight.data_ptr()


class StdModel(nn.Module):
    """A stem, the four std-conv classes in a chain (one inside a residual add), a plain 1x1
    conv and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = _randomise(layers.ScaledStdConv2d(16, 16, 3, gamma=1.5))
        self.b = _randomise(layers.StdConv2dSame(16, 24, 3, stride=2, bias=True))
        self.c = _randomise(layers.ScaledStdConv2dSame(24, 24, 3))
        self.d = _randomise(layers.StdConv2d(24, 32, 3, stride=2))
        self.mix = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.a(x))  # residual: stem and a are coupled
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        x = torch.relu(self.mix(torch.relu(self.d(x))))
        return self.head(x.mean((2, 3)))


def _std_types(model):
    return [type(m) for m in model.modules() if type(m) in STD_CONVS]


def test_fold_keeps_model_output():
    model = StdModel().eval()
    x = torch.randn(2, 3, 32, 32)
    folded = copy.deepcopy(model)
    swaps = fold_weight_standardization(folded)
    assert len(swaps) == 4 and not _std_types(folded)
    torch.testing.assert_close(run(folded, x), run(model, x), atol=1e-5, rtol=1e-5)


def test_prune_folds_and_equals_masked():
    model = StdModel().eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5, exact_only=True)
    assert report.folded == 4
    assert "folded the weight standardisation of 4 convs" in str(report)
    assert not _std_types(model)
    # channels go on both sides of the folded convs (before, the chain was blocked end to end)
    assert model.a.weight.shape[1] < 16 and model.b.weight.shape[0] < 24
    assert model.b.weight.shape[1] < 16  # through timm's dynamic SAME padding (stride 2)
    assert model.c.weight.shape[1] < 24 and model.d.weight.shape[0] < 32
    assert not any("computed weight" in reason for _, reason in report.skipped)
    masked = masked_copy(original, report)
    assert not _std_types(masked)
    torch.testing.assert_close(run(model, x), run(masked, x), atol=1e-4, rtol=1e-4)
    assert report.params_after < report.params_before
    assert _std_types(original) == [type(original.a), type(original.b), type(original.c),
                                    type(original.d)]  # masked_copy folds a copy only


def test_fold_off_keeps_std_convs_blocked():
    model = StdModel().eval()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    report = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5,
                   fold_weight_standardization=False)
    assert report.folded == 0 and "folded" not in str(report)
    assert len(_std_types(model)) == 4
    assert any("computed weight" in reason for _, reason in report.skipped)
    for name in ("stem.weight", "a.weight", "b.weight", "c.weight", "d.weight"):
        assert model.get_parameter(name).shape == shapes[name], name


def test_nothing_pruned_leaves_std_convs():
    """Every group ignored: nothing is pruned, so the model is not folded either."""
    model = StdModel().eval()
    before = copy.deepcopy(model)
    report = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, ignore=[""])
    assert not report.removed and report.folded == 0
    assert len(_std_types(model)) == 4
    for (n, p), q in zip(model.named_parameters(), before.parameters()):
        assert torch.equal(p, q), n


def test_an_error_while_pruning_leaves_std_convs(monkeypatch):
    """prune raising after the fold (here: in the importance scores) gives the model back as
    it was given, not folded."""
    import fastarch.pruning.api as api

    def fail(*args, **kwargs):
        raise RuntimeError("scores failed")

    monkeypatch.setattr(api, "score_units", fail)
    model = StdModel().eval()
    with pytest.raises(RuntimeError, match="scores failed"):
        prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    assert len(_std_types(model)) == 4


def _small_nfnet():
    """dm_nfnet_f0's config (ScaledStdConv2dSame with dynamic SAME padding, grouped convs,
    squeeze-excite, deep stem) at one block per stage and narrow widths."""
    nfnet = pytest.importorskip("timm.models.nfnet")
    cfg = dataclasses.replace(nfnet.model_cfgs["dm_nfnet_f0"], depths=(1, 1, 1, 1),
                              channels=(32, 64, 96, 128), stem_chs=32, group_size=16,
                              num_features=128, skipinit=False)  # skipinit: zero branch gains
    return nfnet.NormFreeNet(cfg, num_classes=10)


def _nf_resnet26():
    timm = pytest.importorskip("timm")
    return timm.create_model("nf_resnet26", pretrained=False, num_classes=10)


@pytest.mark.parametrize("build, size", [(_small_nfnet, 64), (_nf_resnet26, 64)],
                         ids=["nfnet-small-64", "nf_resnet26-64"])
def test_timm_normfree_prunes_exactly(build, size):
    from fastarch.pruning.check import check_model

    torch.manual_seed(0)
    model = build().eval()
    n_std = len(_std_types(model))
    assert n_std > 0
    x = (torch.randn(1, 3, size, size),)
    res = check_model(model, x, ratio=0.3)
    assert res["ok"], res["reason"]
    assert res["rel_diff"] <= 1e-4 and res["param_reduction"] > 0.05
    report = prune(model, x, ratio=0.3)
    assert report.folded == n_std and not _std_types(model)
