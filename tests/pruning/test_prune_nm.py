"""fastarch.prune(..., pattern="2:4"): N:M weights by magnitude or Wanda, sparse form only where
it measures faster."""
import pytest
import torch
from torch import nn

import fastarch
from fastarch.pruning.nm import NMLinear, prune_nm


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_pattern_sparsity_and_output(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    model = _mlp()
    x = torch.randn(4, 32)
    report = fastarch.prune(model, x, pattern=pattern)
    assert len(report.removed) == 2
    for layer in (model[0], model[2]):
        w = layer.dense_weight() if isinstance(layer, NMLinear) else layer.weight
        nz = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert (nz <= n).all()
    assert model(x).shape == (4, 8)


def test_forced_sparse_equals_masked_dense():
    model = _mlp()
    x = torch.randn(3, 32)
    dense = _mlp()
    dense.load_state_dict(model.state_dict())
    prune_nm(dense, "2:4", measure=False)  # stays dense with zeros
    layer = NMLinear.from_linear(model[0], 2, 4)
    torch.testing.assert_close(layer(x), dense[0](x), atol=1e-5, rtol=1e-5)


def test_wanda_uses_activations():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[:, 0::4] = 0.5  # small weights on inputs 0, 4 ...
    model = nn.Sequential(lin).eval()
    x = torch.randn(64, 8)
    x[:, 0::4] *= 100  # ... but huge activations there: Wanda keeps them
    prune_nm(model, "2:4", importance="activation", calib=[(x,)], measure=False)
    assert (model[0].weight[:, 0::4] != 0).all()
    model2 = nn.Sequential(nn.Linear(8, 4)).eval()
    model2[0].load_state_dict(lin.state_dict())
    with torch.no_grad():
        model2[0].weight.fill_(1.0)
        model2[0].weight[:, 0::4] = 0.5
    prune_nm(model2, "2:4", importance="l2", measure=False)
    assert (model2[0].weight[:, 0::4] == 0).all()  # magnitude drops them


def test_ignore_and_indivisible_width():
    model = nn.Sequential(nn.Linear(30, 16), nn.Linear(16, 8)).eval()
    report = prune_nm(model, "2:4", ignore=[model[1]], measure=False)
    assert report.removed == [] and "multiple of 4" in report.skipped[0][1]
