"""Attention written as matmuls (Hugging Face attn_implementation="eager", timm without
fused_attn) prunes whole heads as SDPA does: the config's head counts follow, and the model
saves and loads again. Also: parameters shared by every head (Qwen3's q_norm / k_norm, a hand
made per-head-dim scale) keep their shape and leave the heads prunable."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastarch.pruning import load_pruned, masked_copy, prune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))


def hf_model(kind, impl):
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=97, max_position_embeddings=64)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       vocab_size=97, max_position_embeddings=64)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97,
                                      n_positions=32, bos_token_id=0, eos_token_id=0)
    else:
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, vocab_size=97)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(cfg).eval()
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def outputs(model):
    with torch.no_grad():
        if isinstance(model, transformers.BertModel):
            return model(IDS).last_hidden_state
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("kind,impl", [("llama", "eager"), ("gpt2", "eager"), ("bert", "eager"),
                                       ("qwen3", "eager"), ("qwen3", "sdpa")])
def test_heads_pruned_config_updated_and_reloaded(kind, impl, tmp_path):
    model = hf_model(kind, impl)
    assert model.config._attn_implementation == impl
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    heads = [r for r in report.removed if r["kind"] == "heads"]
    assert heads and all(r["removed"] == r["before"] // 2 for r in heads)
    want = outputs(model)
    torch.testing.assert_close(want, outputs(masked_copy(original, report)), atol=1e-5,
                               rtol=1e-5)
    cfg = model.config
    assert getattr(cfg, "num_attention_heads", None) == 2 or getattr(cfg, "n_head", None) == 2
    if kind in ("llama", "qwen3"):
        assert cfg.num_key_value_heads == 1
    if kind == "qwen3":  # the per-head-dim norms are shared by the heads: they keep their size
        attn = model.model.layers[0].self_attn
        assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.shape == (16,)
        assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16
    model.save_pretrained(tmp_path / kind)
    torch.testing.assert_close(outputs(load_pruned(str(tmp_path / kind))), want, atol=1e-5,
                               rtol=1e-5)


def test_timm_vit_unfused_attention_prunes_heads():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = prune(model, (x,), ratio=0.5, exact_only=True)
    assert "heads" in {r["kind"] for r in report.removed}
    assert [b.attn.num_heads for b in model.blocks] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_copy(original, report)(x), atol=1e-5,
                                   rtol=1e-5)


class ScaledHeads(nn.Module):
    """Attention whose queries are scaled per head dim by one vector shared by every head."""

    def __init__(self, dim=32, heads=4, head_dim=8):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.q_scale = nn.Parameter(torch.linspace(0.5, 1.5, head_dim))
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q * self.q_scale, k, v)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_parameter_shared_by_heads_stays_whole():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledHeads(), ScaledHeads()).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)
    report = prune(model, (x,), ratio=0.5, prune_channels=False)
    assert [r["kind"] for r in report.removed] == ["heads", "heads"]
    for m in model:
        assert m.q_scale.shape == (8,) and m.qkv.out_features == 3 * 2 * 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_copy(original, report)(x), atol=1e-5,
                                   rtol=1e-5)


class GroupScaled(nn.Module):
    """An MLP whose hidden channels are scaled by a vector broadcast over 4 groups: channel c of
    every group shares scale[c], so they go together."""

    def __init__(self, dim=16, groups=4, per=6):
        super().__init__()
        self.groups, self.per = groups, per
        self.up = nn.Linear(dim, groups * per)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, per))
        self.down = nn.Linear(groups * per, dim)

    def forward(self, x):
        h = self.up(x).relu().unflatten(-1, (self.groups, -1)) * self.scale
        return self.down(h.flatten(-2))


def test_parameter_broadcast_over_groups_goes_with_its_channels():
    torch.manual_seed(0)
    model = GroupScaled().eval()
    original = copy.deepcopy(model)
    x = torch.randn(3, 16)
    report = prune(model, (x,), ratio=0.5)
    assert model.scale.shape == (3,) and model.up.out_features == 12
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_copy(original, report)(x), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("kind", ["gemma", "gemma3", "neox"])
def test_reload_rebuilds_scales_and_renamed_weights(kind, tmp_path):
    """Gemma's non-persistent embed_scale is sqrt(hidden) of the model before pruning, not of the
    pruned config; GPT-NeoX saves its lm_head as embed_out."""
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=97)
    if kind == "neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common))
    elif kind == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **common, num_key_value_heads=2, head_dim=16))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, num_key_value_heads=2, head_dim=16))
    model.eval()
    prune(model, (IDS,), ratio=0.5)
    assert model.config.hidden_size == 32
    want = outputs(model)
    model.save_pretrained(tmp_path / kind)
    again = load_pruned(str(tmp_path / kind))
    if kind != "neox":
        assert again.model.embed_tokens.embed_scale.item() == 8.0  # sqrt(64)
    torch.testing.assert_close(outputs(again), want, atol=1e-5, rtol=1e-5)


class KeysAsValues(nn.Module):
    """Eager attention that reuses K as V: the P V matmul looks like Q K^T (two per-head
    operands); it is the same attention, one site, whose head size is D, not the key length."""

    def __init__(self, dim=32, heads=4, head_dim=8):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.qk = nn.Linear(dim, 2 * heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return x + self.o((p @ k).transpose(1, 2).reshape(b, t, -1))


def test_keys_reused_as_values_is_one_site():
    from fastarch.pruning.graph import DependencyGraph

    torch.manual_seed(0)
    model = KeysAsValues().eval()
    x = torch.randn(2, 7, 32)
    graph = DependencyGraph(model, (x,))
    assert [(s.q_heads, s.head_dim) for s in graph.attention] == [(4, 8)]
    original = copy.deepcopy(model)
    report = prune(model, (x,), ratio=0.5, prune_channels=False)
    assert [r["kind"] for r in report.removed] == ["heads"] and model.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_copy(original, report)(x), atol=1e-5,
                                   rtol=1e-5)


def test_dict_inputs_with_use_cache_and_a_bad_value():
    model = hf_model("llama", "sdpa")
    report = prune(model, {"input_ids": IDS, "use_cache": False}, ratio=0.3)
    assert report.removed
    with pytest.raises(ValueError, match="'return_dict' is not a tensor"):
        prune(hf_model("llama", "sdpa"), {"input_ids": IDS, "return_dict": True}, ratio=0.3)
