"""Structured pruning on hand-made and torchvision / timm models: physical removal equals the
masked model, targets, importances, ignore, bad input, models that cannot be handled."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastarch
from fastarch.pruning import DependencyGraph, masked_copy, prune


def run(model, x):
    with torch.no_grad():
        return model(x)


class Zoo(nn.Module):
    """Residual add, concat, depthwise + grouped conv, squeeze-excite, flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.mix = nn.Conv2d(24, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.se_down = nn.Conv2d(32, 8, 1)
        self.se_up = nn.Conv2d(8, 32, 1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + F.relu(self.a(x))  # residual: stem and a are coupled
        x = torch.cat([x, self.b(x)], dim=1)  # concat: 16 + 8 channels
        x = F.relu(self.mix(F.relu(self.dw(x))))
        x = F.relu(self.grouped(x))
        s = torch.sigmoid(self.se_up(F.relu(self.se_down(x.mean((2, 3), keepdim=True)))))
        x = F.adaptive_avg_pool2d(x * s, 4)
        return self.head(x.flatten(1))


def _equal_masked(model, x, ratio=0.3, **kw):
    model.eval()
    original = copy.deepcopy(model)
    report = prune(model, x, ratio=ratio, exact_only=True, **kw)
    masked = masked_copy(original, report)
    assert report.removed, "nothing was pruned"
    torch.testing.assert_close(run(model, x), run(masked, x), atol=1e-4, rtol=1e-4)
    assert report.params_after < report.params_before
    return report


def test_zoo_groups_and_equal_masked():
    model = Zoo()
    x = torch.randn(2, 3, 16, 16)
    graph = DependencyGraph(model.eval(), (x,))
    by_kind = {g.kind: g for g in graph.groups}
    assert by_kind["groups"].size == 4  # the grouped conv goes whole groups at a time
    modules = [{n.rsplit(".", 1)[0] for n, _ in g.key} for g in graph.groups]
    assert {"stem", "a", "bn", "dw", "mix"} <= modules[0]  # residual couples stem and a
    assert {"b", "dw", "mix"} <= modules[1] and "stem" not in modules[1]  # concat offsets
    _equal_masked(model, x, ratio=0.5)
    assert model.grouped.groups == 2 and model.grouped.out_channels == 16
    assert model.dw.groups == model.dw.out_channels == 12
    assert model.head.in_features == model.grouped.out_channels * 16


def test_resnet18_equal_masked():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    _equal_masked(model, torch.randn(1, 3, 32, 32))
    assert model.fc.out_features == 1000  # the output layer keeps its classes


def test_vit_heads_and_mlp_equal_masked():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    report = _equal_masked(model, torch.randn(1, 3, 32, 32), ratio=0.34)
    kinds = {r["kind"] for r in report.removed}
    assert kinds == {"heads", "channels"}
    assert model.blocks[0].attn.num_heads == 2
    assert model.blocks[0].attn.qkv.out_features == 3 * 2 * 64


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parallel_vit_blocks_prune_mlp_and_report_heads(qkv_bias):
    """timm's parallel blocks (ParallelScalingBlock: one in_proj cut by ``self.in_split`` into
    MLP | q | k | v): the MLP neurons go and the stored sizes follow; the heads cannot go (the
    block reshapes the attention output to its input's width) and are reported."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, img_size=32,
                              depth=2, embed_dim=64, num_heads=4, qkv_bias=qkv_bias)
    report = _equal_masked(model, torch.randn(2, 3, 32, 32), ratio=0.3)
    for blk in model.blocks:
        hidden = blk.mlp_out_proj.in_features
        assert hidden == 320 - 96
        assert blk.in_split == [hidden, 64, 64, 64]
        assert blk.in_proj.out_features == hidden + 3 * 64
        assert blk.num_heads == 4
    assert {r["kind"] for r in report.removed} == {"channels"}
    heads = [why for where, why in report.skipped if where.startswith("heads")]
    assert len(heads) == 2 and all("breaks the forward pass" in why for why in heads)


def test_vit_residual_width_runs():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5)
    assert any(r["kind"] == "channels" and not r["exact"] for r in report.removed)
    assert model.patch_embed.proj.out_channels == 96
    assert run(model, x).shape == (1, 1000)


def test_ratio_zero_changes_nothing():
    model = Zoo().eval()
    before = copy.deepcopy(model.state_dict())
    report = prune(model, torch.randn(1, 3, 16, 16), ratio=0.0)
    assert report.removed == [] and report.params_after == report.params_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("target", ["params", "flops"])
def test_budget_targets(target):
    model = Zoo().eval()
    x = torch.randn(1, 3, 16, 16)
    report = prune(model, x, ratio=0.4, target=target)
    got = report.param_reduction if target == "params" else report.flop_reduction
    assert 0.4 <= got <= 0.6, got
    assert run(model, x).shape == (1, 10)


def test_latency_target_reports_times():
    # Real timings: only what does not depend on the machine's load is asserted here.
    model = Zoo().eval()
    x = torch.randn(4, 3, 16, 16)
    report = prune(model, x, ratio=0.3, target="latency")
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert run(model, x).shape == (4, 10)


def test_latency_target_searches_the_measured_ratio(monkeypatch):
    # The search itself, with a deterministic clock: a forward pass "takes" time in proportion
    # to the model's FLOPs, so a 30% latency budget must land near a 30% FLOP reduction.
    import fastarch.pruning.api as api

    x = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(api, "measure_latency_ms",
                        lambda m, inputs, **kw: 1e-6 * api.count_flops(m, inputs))
    model = Zoo().eval()
    report = prune(model, x, ratio=0.3, target="latency")
    assert report.removed
    assert 0.3 <= report.flop_reduction <= 0.45, report.flop_reduction
    assert report.latency_after_ms == pytest.approx(1e-6 * report.flops_after)
    assert run(model, x).shape == (4, 10)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "activation", "random"])
def test_importance_keeps_strong_channels(importance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:8] *= 1e-3  # neurons 0..7 are near zero everywhere
        model[0].bias[:8] *= 1e-3
        model[2].weight[:, :8] *= 1e-3
    x = torch.randn(32, 8)
    prune(model, x, ratio=0.5, importance=importance)
    assert model[0].out_features == 8 and model[2].in_features == 8
    if importance != "random":
        # the surviving neurons are the strong ones: their weights are not tiny
        assert model[0].weight.abs().mean() > 1e-2


def test_bn_scale_importance():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 0.01, 1.0, 0.01, 1.0, 0.01]))
    prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, importance="bn_scale")
    assert torch.all(model[1].weight == 1.0)


def test_round_to_and_global_ranking():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                          nn.Linear(48, 4)).eval()
    x = torch.randn(4, 8)
    prune(model, x, ratio=0.3, round_to=8)
    assert model[0].out_features == 48 and model[2].out_features == 40  # ceil to 8s
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        model2[2].weight.mul_(1e-3)  # the second layer is globally the weakest
    report = prune(model2, x, ratio=0.3, global_ranking=True)
    assert report.removed and model2[2].out_features < model2[0].out_features
    assert run(model2, x).shape == (4, 4)


def test_ignore_keeps_module_shape():
    model = Zoo().eval()
    report = prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, ignore=[model.a, "b"])
    assert model.a.out_channels == 16 and model.b.out_channels == 8
    assert any(reason.startswith("ignored") for _, reason in report.skipped)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_is_reported_and_unchanged():
    model = DataDependent()
    before = copy.deepcopy(model.state_dict())
    report = prune(model, torch.ones(1, 4), ratio=0.5)
    assert not report.ok and report.skipped and report.removed == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class UsesFFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.fft.rfft(self.a(x), dim=-1).abs()  # an op the graph does not know
        return self.d(F.relu(self.c(F.relu(self.b(x))))).sum(-1, keepdim=True) + y.sum(-1, keepdim=True)


def test_unknown_op_blocks_only_its_channels():
    model = UsesFFT().eval()
    x = torch.randn(2, 8)
    report = prune(model, x, ratio=0.5)
    assert model.a.out_features == 8  # a feeds the FFT: untouched and reported
    assert any("fft" in reason for _, reason in report.skipped)
    assert model.b.out_features == 4 and model.c.out_features == 4
    assert run(model, x).shape == (2, 1)


def test_timeout_reports_and_leaves_model():
    model = Zoo()
    report = prune(model, torch.randn(1, 3, 16, 16), ratio=0.5, timeout=1e-4)
    assert not report.ok and "time limit" in report.skipped[0][1]
    assert model.a.out_channels == 16


def test_report_text():
    report = prune(Zoo().eval(), torch.randn(1, 3, 16, 16), ratio=0.3)
    text = str(report)
    assert "params" in text and "removed" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"importance": "magic"}, "importance"),
        ({"target": "energy"}, "target"),
        ({"round_to": 0}, "round_to"),
        ({"pattern": "3:4"}, "pattern"),
    ],
    ids=["ratio-1.5", "ratio-nan", "importance", "target", "round_to", "pattern"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune(Zoo(), torch.randn(1, 3, 16, 16), **kwargs)


def test_bad_model_and_inputs():
    with pytest.raises(TypeError, match="model"):
        prune("resnet", torch.randn(1, 3))
    with pytest.raises(TypeError, match="example_inputs"):
        prune(Zoo(), "image")
    with pytest.raises(ValueError, match="example_inputs"):
        prune(Zoo(), torch.randn(1, 5, 16, 16))


def test_exported_from_package():
    assert fastarch.prune is prune


def test_computed_conv_weight_is_not_pruned_blindly():
    """A weight-standardised conv (timm ScaledStdConv2d: batch statistics over each filter's
    input side) takes a computed weight: neither of its sides may be removed, or the pruned
    model would silently differ from the masked one (found on timm's NF-ResNets). Unless folded
    into a plain conv first (the default, tests/pruning/test_std_conv.py), it is left whole."""
    layers = pytest.importorskip("timm.layers")
    from fastarch.pruning.check import check_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          layers.ScaledStdConv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = (torch.randn(2, 3, 12, 12),)
    res = check_model(model, x, ratio=0.5)
    assert "pruned != masked" not in res["reason"]
    pruned = copy.deepcopy(model)
    fastarch.prune(pruned, x, ratio=0.5, fold_weight_standardization=False)
    assert pruned[2].weight.shape == model[2].weight.shape
    assert pruned[0].weight.shape == model[0].weight.shape  # feeds the standardised conv


def test_check_model_tells_rounding_from_a_real_difference(monkeypatch):
    """Over the bound in fp32, check_model measures the two models again in float64: rounding
    then vanishes (the model passes), a real difference does not (it fails)."""
    import fastarch.pruning.check as check

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    x = (torch.randn(2, 3, 16, 16),)
    res = check.check_model(model, x, ratio=0.5, tol=1e-12)  # below fp32 rounding
    assert res["ok"], res
    assert res["max_diff"] > 1e-12 * 1.0 and res["max_diff_fp64"] <= 1e-12

    real_masked_copy = check.masked_copy

    def off_by_a_bit(model, report):  # a mask that is wrong by 1e-3 in one weight
        m = real_masked_copy(model, report)
        with torch.no_grad():
            m[-1].bias[0] += 1e-3
        return m

    monkeypatch.setattr(check, "masked_copy", off_by_a_bit)
    res = check.check_model(model, x, ratio=0.5, tol=1e-4)
    assert not res["ok"] and "pruned != masked" in res["reason"]
    assert res["max_diff_fp64"] == pytest.approx(1e-3, rel=1e-3)


class GroupNormNet(nn.Module):
    """conv -> GroupNorm -> conv, the GroupNorm as a module (``num_groups`` attribute) or as a
    functional call with the group count written in the code."""

    def __init__(self, groups, functional=False, affine=True):
        super().__init__()
        self.functional = functional
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.norm = nn.GroupNorm(groups, 24, affine=affine)
        self.c2 = nn.Conv2d(24, 5, 3)
        with torch.no_grad():  # distinct per-group magnitudes, so the ranking matters
            self.c1.weight.mul_(torch.linspace(0.2, 2.0, 24).view(24, 1, 1, 1))
            if affine:
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.c1(x)
        y = F.group_norm(y, 6) if self.functional else self.norm(y)
        return self.c2(F.relu(y))


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_loses_whole_groups_exactly(affine):
    model = GroupNormNet(6, affine=affine).eval()
    x = torch.randn(2, 3, 9, 9)
    report = _equal_masked(model, x, ratio=0.5)
    assert report.removed[0]["kind"] == "groups" and report.removed[0]["exact"]
    # 3 of 6 groups of 4 channels removed; the group size is unchanged
    assert model.c1.out_channels == 12 and model.norm.num_channels == 12
    assert model.norm.num_groups == 3
    assert run(model, x).shape == (2, 5, 7, 7)


def test_group_norm_with_one_group_is_not_exact():
    # one group normalises over all channels: removing some changes the statistics
    model = GroupNormNet(1).eval()
    x = torch.randn(2, 3, 9, 9)
    report = prune(copy.deepcopy(model), x, ratio=0.5)
    assert report.removed and not report.removed[0]["exact"]
    assert not prune(model, x, ratio=0.5, exact_only=True).removed


def test_group_norm_with_a_constant_group_count_is_left_whole():
    model = GroupNormNet(6, functional=True).eval()
    x = torch.randn(2, 3, 9, 9)
    report = prune(model, x, ratio=0.5)
    assert model.c1.out_channels == 24
    assert any("group count" in reason for _, reason in report.skipped)
    assert run(model, x).shape == (2, 5, 7, 7)


class GroupStd(nn.Module):
    """x / std over groups of channels, written with reshape as timm's EvoNorm S0 does. The
    group count is an attribute (``reshape(B, self.groups, C // self.groups, ...)``), a number
    in the code, or follows the channels (``reshape(B, -1, self.group_size, ...)``)."""

    def __init__(self, channels, groups, how):
        super().__init__()
        self.how = how
        if how == "attribute":
            self.groups = groups
        self.group_size = channels // groups
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        b, c, h, w = x.shape
        if self.how == "attribute":
            g = x.reshape(b, self.groups, c // self.groups, h, w)
        elif self.how == "literal":
            g = x.reshape(b, 4, c // 4, h, w)
        else:
            g = x.reshape(b, -1, self.group_size, h, w)
        std = g.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt()
        return (g / std).reshape(b, c, h, w) * self.weight.view(1, -1, 1, 1)


class GroupStdNet(nn.Module):
    """conv -> group std -> depthwise conv -> group std -> conv: the second norm sees channels
    the first already made whole-group units, so its labels do not vary inside a group."""

    def __init__(self, how):
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.n1 = GroupStd(24, 4, how)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.n2 = GroupStd(24, 4, how)
        self.c2 = nn.Conv2d(24, 5, 3)
        with torch.no_grad():
            self.c1.weight.mul_(torch.linspace(0.2, 2.0, 24).view(24, 1, 1, 1))

    def forward(self, x):
        return self.c2(F.relu(self.n2(self.dw(F.relu(self.n1(self.c1(x)))))))


@pytest.mark.parametrize("how", ["attribute", "follows"])
def test_reshape_group_statistic_loses_whole_groups_exactly(how):
    # 24 channels in 4 groups of 6: half the groups go, the group size stays 6
    model = GroupStdNet(how).eval()
    x = torch.randn(2, 3, 9, 9)
    _equal_masked(model, x, ratio=0.5)
    assert model.c1.out_channels == 12 and model.dw.out_channels == 12
    if how == "attribute":
        assert model.n1.groups == 2 and model.n2.groups == 2  # not 4 groups of 3
    assert run(model, x).shape == (2, 5, 7, 7)


def test_reshape_group_statistic_with_a_constant_group_count_is_left_whole():
    # reshape(b, 4, c // 4, ...): the 4 cannot follow, and 4 groups of fewer channels would
    # mix what the groups hold (a wrong answer, not an error): those channels stay
    model = GroupStdNet("literal").eval()
    x = torch.randn(2, 3, 9, 9)
    report = prune(model, x, ratio=0.5)
    assert model.c1.out_channels == 24 and model.dw.out_channels == 24
    assert any("fixed-size" in reason for _, reason in report.skipped), report.skipped
    assert run(model, x).shape == (2, 5, 7, 7)


def test_channel_shuffle_halves_still_prune():
    # channel_shuffle(x, 2) is view(b, 2, c // 2, h, w) with the 2 written in the code; each
    # half holds many units, which go from both halves alike, so the 2 never changes
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    _equal_masked(model, torch.randn(1, 3, 64, 64), ratio=0.3)
    # a block's branch output is one half of the next shuffle (24 and 96 channels unpruned)
    assert model.stage2[1].branch2[5].out_channels < 24
    assert model.stage4[1].branch2[5].out_channels < 96


def test_ignore_names_are_checked():
    model = Zoo().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        prune(model, x, ratio=0.5, ignore=["nope"])
    prune(model, x, ratio=0.5, ignore="a")  # one name, not its characters
    assert model.a.out_channels == 16
    with pytest.raises(ValueError, match="calib is empty"):
        prune(Zoo().eval(), x, ratio=0.5, importance="activation", calib=[])
