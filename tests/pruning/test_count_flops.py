"""FLOPs counted on the meta device equal the real forward's count; the faster prune pipeline
(meta counts, verification on the model itself) keeps every check it had."""
import pytest
import torch
import torchvision
from torch import nn

from fastarch.pruning import count_flops, prune
from fastarch.pruning.api import _flops_on_meta


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg), (torch.randint(0, 100, (1, 8)),)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    return transformers.BertModel(cfg), (torch.randint(0, 100, (2, 9)),)


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2), \
        (torch.randn(2, 3, 32, 32),)


def _torchvision_vit():  # nn.MultiheadAttention: fused CPU kernel under no_grad
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=4, hidden_dim=32, mlp_dim=64), \
        (torch.randn(2, 3, 32, 32),)


def _encoder_layers():  # nn.TransformerEncoderLayer: fused CPU kernel under no_grad
    layer = nn.TransformerEncoderLayer(32, 4, 48, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), (torch.randn(2, 5, 32),)


MODELS = {
    "resnet18": lambda: (torchvision.models.resnet18(), (torch.randn(1, 3, 40, 40),)),
    "mobilenet_v3": lambda: (torchvision.models.mobilenet_v3_small(), (torch.randn(1, 3, 40, 40),)),
    "swin_t": lambda: (torchvision.models.swin_t(), (torch.randn(1, 3, 64, 64),)),
    "timm_vit": _timm_vit,
    "torchvision_vit": _torchvision_vit,
    "encoder_layers": _encoder_layers,
    "hf_bert": _bert,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_meta_count_equals_real_count(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    on_meta = _flops_on_meta(model, inputs)
    assert on_meta is not None, "expected this model to run on the meta device"
    real = count_flops(model, inputs, meta=False)
    assert real > 0
    assert on_meta[0] == real == count_flops(model, inputs)
    with torch.no_grad():
        out = model(*inputs)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    assert on_meta[1][0] == tuple(out.shape)


def test_attention_flops_are_counted_on_the_cpu():
    # torch has no CPU formula for its fused attention kernels; the count includes them
    model, inputs = _encoder_layers()
    model.eval()
    batch, length, dim = inputs[0].shape
    ffn = 48
    per_layer = 2 * batch * length * dim * dim * 4 + 4 * batch * length * length * dim \
        + 4 * batch * length * dim * ffn
    assert count_flops(model, inputs, meta=False) == 2 * per_layer


def test_hf_decoder_falls_back_to_the_real_count():
    model, inputs = _llama()
    model.eval()
    assert _flops_on_meta(model, inputs) is None  # its mask code calls .item()
    flops = count_flops(model, inputs)
    assert flops == count_flops(model, inputs, meta=False) > 0
    report = prune(model, inputs, ratio=0.5)
    assert report.ok and 0 < report.flops_after < report.flops_before
    assert report.flops_after == count_flops(model, inputs, meta=False)


def test_prune_reports_the_real_counts():
    torch.manual_seed(0)
    model, inputs = MODELS["resnet18"]()
    model.eval()
    before = count_flops(model, inputs, meta=False)
    report = prune(model, inputs, ratio=0.3)
    assert report.flops_before == before
    assert report.flops_after == count_flops(model, inputs, meta=False) < before


class _Caching(nn.Module):
    """Keeps a tensor made in forward as a plain attribute (like lazily built tables)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.ones_like(x)
        return self.lin(x) * self.table


def test_meta_count_leaves_the_model_untouched():
    model = _Caching().eval()
    x = torch.randn(2, 4)
    weight = model.lin.weight
    assert count_flops(model, (x,)) == 2 * 2 * 4 * 4
    assert model.table is None and model.lin.weight is weight and not weight.is_meta
    assert model(x).shape == (2, 4)


class _ChecksWidth(nn.Module):
    """The second conv's output width is checked in Python: the traced graph cannot see it,
    so pruning that group breaks the real forward and verification must leave it whole."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        if y.shape[1] != 8:
            raise ValueError("c2 must keep 8 channels")
        return self.head(y.mean((2, 3)))


def test_verification_restores_the_groups_that_break_the_forward():
    torch.manual_seed(0)
    model = _ChecksWidth().eval()
    x = torch.randn(1, 3, 8, 8)
    c2_weight = model.c2.weight
    report = prune(model, x, ratio=0.5)
    assert report.ok
    assert any("breaks the forward pass" in reason for _, reason in report.skipped)
    assert model.c1.out_channels == 4 and model.c1.weight.shape[0] == 4
    assert model.c2.out_channels == 8 and model.c2.weight.shape == (8, 4, 3, 3)
    assert model.c2.weight is not c2_weight  # its input side was pruned with c1
    assert set(report.shapes) == {"c1.weight", "c1.bias", "c2.weight"}
    assert model(x).shape == (1, 2)
    assert report.flops_after == count_flops(model, (x,), meta=False)


class _OnlyMeta(nn.Module):
    """Runs on meta tensors but not on real ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        if not x.is_meta:
            raise RuntimeError("no kernel for this input")
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("verify", [True, False])
def test_a_model_that_does_not_run_on_the_inputs_is_still_refused(verify):
    model = _OnlyMeta().eval()
    with pytest.raises(ValueError, match="does not run on them"):
        prune(model, torch.randn(2, 4), ratio=0.5, verify=verify)
    assert model.a.weight.shape == (8, 4)
