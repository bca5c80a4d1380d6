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


def _keep_top_n_along_inputs(w_in_out, n, m, input_norms=None):
    """Reference: for every output column of a (in, out) weight, keep the n highest |w| (times
    the input's norm for Wanda) of each run of m consecutive inputs (a loop, independent of
    nm_compress)."""
    out = torch.zeros_like(w_in_out)
    score = w_in_out.abs() if input_norms is None else w_in_out.abs() * input_norms[:, None]
    for j in range(w_in_out.shape[1]):
        for start in range(0, w_in_out.shape[0], m):
            top = score[start:start + m, j].topk(n).indices
            out[start + top, j] = w_in_out[start + top, j]
    return out


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_weights_become_2_4():
    model = _tiny_gpt2()
    conv1d = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    report = fastarch.prune(model, torch.randint(0, 61, (1, 6)), pattern="2:4")
    pruned = {r["group"].split(":")[0] for r in report.removed}
    assert set(conv1d) <= pruned
    for name, before in conv1d.items():
        mod = model.get_submodule(name)
        w = mod.dense_weight().t() if isinstance(mod, NMLinear) else mod.weight.detach()
        torch.testing.assert_close(w, _keep_top_n_along_inputs(before, 2, 4))
    assert report.params_after < report.params_before


def test_conv1d_sparse_form_equals_conv1d():
    model = _tiny_gpt2()
    mlp = model.transformer.h[0].mlp.c_fc  # (32 in, 128 out)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        mlp.weight.copy_(_keep_top_n_along_inputs(mlp.weight, 2, 4))
        layer = NMLinear.from_linear(mlp, 2, 4)
        assert (layer.in_features, layer.out_features) == (32, 128)
        torch.testing.assert_close(layer(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_conv1d_wanda_scores_inputs():
    model = _tiny_gpt2()
    ids = torch.randint(0, 61, (4, 6))
    c_attn = model.transformer.h[0].attn.c_attn
    seen = []
    hook = c_attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        model(ids)
    hook.remove()
    want = _keep_top_n_along_inputs(c_attn.weight.detach(), 2, 4, seen[0].norm(dim=0))
    report = prune_nm(model, "2:4", importance="activation", calib=[(ids,)], measure=False)
    assert len(report.removed) == 8  # every Conv1D; lm_head is tied to the embedding
    torch.testing.assert_close(c_attn.weight.detach(), want)  # dense form: zeros in place


def test_tied_lm_head_left_whole():
    model = _tiny_gpt2()
    emb = model.transformer.wte.weight.detach().clone()
    report = prune_nm(model, "2:4", measure=False)
    assert any(n == "lm_head" and "tied" in why for n, why in report.skipped)
    torch.testing.assert_close(model.transformer.wte.weight, emb)
