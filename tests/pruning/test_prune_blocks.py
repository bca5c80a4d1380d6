"""Depth pruning (fastarch.prune_blocks): which blocks are found and scored, the pruned model
equals the original with those blocks skipped, Hugging Face models keep running, saving,
loading and generating (KV cache indexed by renumbered layers, per-layer layer_types), models
that cannot be handled are reported and left unchanged."""
import copy

import pytest
import torch
from torch import nn

import fastarch
from fastarch.pruning import find_block_lists, load_pruned, prune, prune_blocks


class Residual(nn.Module):
    def __init__(self, dim, scale=1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, scales=(1.0, 1e-3, 1e-2, 1.0), dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*[Residual(dim, s) for s in scales])
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def run(model, *args):
    with torch.no_grad():
        return model(*args)


def skipping(model, list_name, removed):
    """Reference: the unpruned model with the removed blocks replaced by the identity."""
    ref = copy.deepcopy(model)
    container = ref.get_submodule(list_name)
    for i in removed:
        container[i] = nn.Identity()
    return ref


def test_cosine_scores_and_removal_equal_reference():
    model = Stack().eval()
    original = copy.deepcopy(model)
    x = torch.randn(4, 5, 8)
    report = prune_blocks(model, x, blocks=2)
    # reference scores: 1 - cos(block input, block output) per token, by hand
    h = run(original.inp, x)
    for i, block in enumerate(original.blocks):
        y = run(block, h)
        want = (1 - torch.nn.functional.cosine_similarity(h, y, dim=-1)).mean().item()
        assert report.scores[f"blocks.{i}"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        h = y
    assert [r["block"] for r in report.removed] == ["blocks.1", "blocks.2"]
    assert len(model.blocks) == 2 and report.lists == {"blocks": (4, 2)}
    torch.testing.assert_close(run(model, x), run(skipping(original, "blocks", [1, 2]), x))
    assert [k for k in model.state_dict() if k.startswith("blocks.")][0] == "blocks.0.fc1.weight"
    assert "blocks.1.fc2.bias" in model.state_dict() and "blocks.2.fc1.weight" not in \
        model.state_dict()
    assert report.params_after < report.params_before and report.flops_after < report.flops_before


def test_magnitude_scores_fraction_and_calib():
    model = Stack(scales=(1.0, 1.0, 1e-2, 1.0)).eval()
    report = prune_blocks(model, torch.randn(2, 8), blocks=0.25, importance="magnitude")
    want = {}
    for i, block in enumerate(Stack(scales=(1.0, 1.0, 1e-2, 1.0)).blocks):
        mats = [p.detach() for p in block.parameters() if p.dim() >= 2]
        total = sum(float(p.pow(2).sum()) for p in mats)
        want[f"blocks.{i}"] = total / sum(p.numel() for p in mats)
    assert report.scores == pytest.approx(want, rel=1e-5)
    assert [r["block"] for r in report.removed] == ["blocks.2"]  # floor(0.25 * 4) = 1
    # calibration batches drive the cosine score: the average over them
    model = Stack().eval()
    batches = [(torch.randn(3, 8),), (torch.randn(5, 8),)]
    report = prune_blocks(model, torch.randn(2, 8), blocks=0, calib=batches)
    assert report.removed == [] and len(model.blocks) == 4
    h = [run(model.inp, b[0]) for b in batches]
    num = den = 0.0
    for hb in h:
        y = run(model.blocks[0], hb)
        num += float((1 - torch.nn.functional.cosine_similarity(hb, y, dim=-1)).sum())
        den += hb.shape[0]
    assert report.scores["blocks.0"] == pytest.approx(num / den, rel=1e-5)


def test_resnet_keeps_downsampling_blocks():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    assert find_block_lists(model) == {f"layer{i}": [0, 1] for i in range(1, 5)}
    report = prune_blocks(model, x, blocks=4)
    kept_reasons = {w for w, why in report.skipped if "shape differs" in why}
    assert kept_reasons == {"layer2.0", "layer3.0", "layer4.0"}
    assert len(report.removed) == 4  # layer1.0 or .1, and the second block of the others
    ref = copy.deepcopy(original)
    for r in report.removed:
        name, i = r["block"].rsplit(".", 1)
        ref.get_submodule(name)[int(i)] = nn.Identity()
    torch.testing.assert_close(run(model, x), run(ref, x))


def test_timm_vit_blocks():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = fastarch.prune_blocks(model, x, blocks=2)
    removed = [int(r["block"].split(".")[1]) for r in report.removed]
    assert len(model.blocks) == 2 and len(removed) == 2
    torch.testing.assert_close(run(model, x), run(skipping(original, "blocks", removed), x))


# ---- Hugging Face ---------------------------------------------------------------------------

IDS = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def assert_generate_matches_greedy(model, steps=5):
    out = model.generate(IDS, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0)
    seq = IDS
    for _ in range(steps):
        seq = torch.cat([seq, hf_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def rebuilt_with(model_class, config, original, list_name, kept, **changes):
    """Reference: a fresh model with `changes` in its config, given the kept blocks' weights."""
    cfg = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    ref = model_class(cfg).eval()
    state = {}
    for k, v in original.state_dict().items():
        prefix = f"{list_name}."
        if k.startswith(prefix):
            i, _, rest = k[len(prefix):].partition(".")
            if int(i) not in kept:
                continue
            k = f"{prefix}{kept.index(int(i))}.{rest}"
        state[k] = v
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_decoder_renumbers_layers(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:  # layers 2 and 3 use a sliding window of 4 tokens
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                                       max_window_layers=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    original = copy.deepcopy(model)
    # keep the last two: the kept layers move to positions 0 and 1
    report = prune_blocks(model, IDS, blocks=2, ignore=["model.layers.2", model.model.layers[3]])
    assert sorted(r["block"] for r in report.removed) == ["model.layers.0", "model.layers.1"]
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    changes = {"num_hidden_layers": 2}
    if kind == "qwen2":
        assert model.config.layer_types == ["sliding_attention"] * 2
        changes["layer_types"] = ["sliding_attention"] * 2
    ref = rebuilt_with(type(model), cfg, original, "model.layers", [2, 3], **changes)
    want = hf_logits(ref)
    torch.testing.assert_close(hf_logits(model), want)
    model.save_pretrained(tmp_path / kind)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    torch.testing.assert_close(hf_logits(again), want)
    assert_generate_matches_greedy(model)
    assert_generate_matches_greedy(again)


def test_gpt2_depth_and_width_in_one_call(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=97, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    report = fastarch.prune(model, (IDS,), ratio=0.25, blocks=1)
    assert report.blocks is not None and len(report.blocks.removed) == 1
    assert {r["kind"] for r in report.removed} >= {"blocks", "heads", "channels"}
    assert report.params_before == params and model.config.n_layer == 3
    assert len(model.transformer.h) == 3
    want = hf_logits(model)
    model.save_pretrained(tmp_path / "gpt2")
    torch.testing.assert_close(hf_logits(load_pruned(str(tmp_path / "gpt2"))), want)
    assert_generate_matches_greedy(model)


def test_width_then_depth_keeps_per_layer_record(tmp_path):
    """A per-layer width record written by prune() is renumbered when blocks go afterwards."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    prune(model, (IDS,), ratio=0.3, global_ranking=True, prune_heads=False)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert len(set(widths)) > 1
    prune_blocks(model, IDS, blocks=1, ignore=["model.layers.1", "model.layers.2"])
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == widths[1:]
    want = hf_logits(model)
    model.save_pretrained(tmp_path / "both")
    again = load_pruned(str(tmp_path / "both"))
    assert [layer.mlp.gate_proj.out_features for layer in again.model.layers] == widths[1:]
    torch.testing.assert_close(hf_logits(again), want)
    # the recorded block positions follow the blocks: the KV cache is indexed by them
    assert [layer.self_attn.layer_idx for layer in again.model.layers] == [0, 1]
    out = again.generate(IDS, max_new_tokens=3, do_sample=False, min_new_tokens=3,
                         pad_token_id=0)
    assert out.shape == (IDS.shape[0], IDS.shape[1] + 3)


def test_bert_encoder_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    original = copy.deepcopy(model)
    report = prune_blocks(model, IDS, blocks=1)
    (i,) = [int(r["block"].rsplit(".", 1)[1]) for r in report.removed]
    kept = [j for j in range(3) if j != i]
    ref = rebuilt_with(type(model), cfg, original, "encoder.layer", kept, num_hidden_layers=2)
    with torch.no_grad():
        want = ref(IDS).last_hidden_state
        torch.testing.assert_close(model(IDS).last_hidden_state, want)
    model.save_pretrained(tmp_path / "bert")
    again = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).last_hidden_state, want)


# ---- not handled: reported, unchanged --------------------------------------------------------

class Shared(nn.Module):
    """One block applied twice, and a parent that indexes its list by position."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Residual(8) for _ in range(3)])

    def forward(self, x):
        x = self.blocks[0](self.blocks[0](x))
        return self.blocks[2](self.blocks[1](x))


def test_unhandled_models_left_unchanged():
    model = Shared().eval()
    x = torch.randn(2, 8)
    before = copy.deepcopy(model.state_dict())
    want = run(model, x)
    report = prune_blocks(model, x, blocks=1)
    assert any(w == "blocks.0" and "called 2 times" in why for w, why in report.skipped)
    # blocks 1 and 2 are candidates, but removing one breaks blocks[2]: undone
    assert not report.ok and report.removed == []
    assert any("left unchanged" in why for _, why in report.skipped)
    assert list(model.state_dict()) == list(before) and len(model.blocks) == 3
    torch.testing.assert_close(run(model, x), want)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    report = prune_blocks(plain, torch.randn(1, 4), blocks=1)
    assert not report.ok and "no list of repeated blocks" in report.skipped[0][1]
    assert len(plain) == 3


def test_gpt2_layer_scaled_attention_not_handled():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=32,
                                  scale_attn_by_inverse_layer_idx=True)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    want = hf_logits(model)
    report = prune_blocks(model, IDS, blocks=1)
    assert not report.ok and "scale_attn_by_inverse_layer_idx" in str(report)
    assert len(model.transformer.h) == 3 and model.config.n_layer == 3
    torch.testing.assert_close(hf_logits(model), want)


def test_keeps_one_block_per_list():
    model = Stack(scales=(1.0, 1e-3)).eval()
    report = prune_blocks(model, torch.randn(2, 8), blocks=5)
    assert len(model.blocks) == 1 and len(report.removed) == 1
    assert any("only 1 removable" in why for _, why in report.skipped)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"blocks": -1}, ValueError, "blocks"),
    ({"blocks": 1.5}, ValueError, "blocks"),
    ({"blocks": "2"}, ValueError, "blocks"),
    ({"blocks": True}, ValueError, "blocks"),
    ({"importance": "l2"}, ValueError, "importance"),
    ({"container": "nope"}, ValueError, "container"),
    ({"container": "inp"}, ValueError, "container"),
    ({"ignore": [3]}, TypeError, "ignore"),
])
def test_bad_arguments(kwargs, exc, word):
    args = {"blocks": 1, **kwargs}
    with pytest.raises(exc, match=word):
        prune_blocks(Stack().eval(), torch.randn(2, 8), **args)
    with pytest.raises(TypeError, match="example_inputs"):
        prune_blocks(Stack(), "x")
    with pytest.raises(ValueError, match="block_importance"):
        prune(Stack(), torch.randn(2, 8), blocks=1, block_importance="l1")


def test_container_argument():
    model = Stack().eval()
    report = prune_blocks(model, torch.randn(2, 8), blocks=1, container="blocks")
    assert report.lists == {"blocks": (4, 3)}
