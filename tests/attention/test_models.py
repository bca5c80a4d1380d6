"""use_attention on Hugging Face and timm models: causal / full equal the original model,
generate with a KV cache gives the same tokens, other variants change the output."""
import copy

import pytest
import torch
from torch import nn

import fastarch
from fastarch.attention import BlockSparseAttention, use_attention

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 96, "hidden_size": 128, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4}


def hf_models():
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    return {
        "llama-gqa4": (LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=1), "causal"),
        "mistral-window": (MistralForCausalLM,
                           MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=24),
                           "causal"),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, num_key_value_heads=2), "causal"),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32),
                  "causal"),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=96, n_embd=128, n_layer=2, n_head=4,
                                             bos_token_id=0, eos_token_id=0), "causal"),
        "bert": (BertModel, BertConfig(**SMALL), "full"),
    }


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", list(hf_models()))
def test_hf_equal_to_original(name):
    cls, cfg, variant = hf_models()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.set_attn_implementation("sdpa")
    original = copy.deepcopy(model)
    ids = torch.randint(1, 96, (2, 41))
    report = use_attention(model, variant)
    assert report and len(report.swapped) == 2 and not report.skipped
    assert model.config._attn_implementation == "fastarch"
    # padding: left for decoders, right for the encoder
    mask = torch.ones_like(ids)
    if variant == "causal":
        mask[0, :6] = 0
    else:
        mask[0, -6:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got, want = _out(model(ids, **kwargs)), _out(original(ids, **kwargs))
            keep = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)
    if variant == "causal":
        gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        torch.testing.assert_close(model.generate(ids[:, :9], **gen),
                                   original.generate(ids[:, :9], **gen))


def test_hf_sliding_window_variant_changes_output_and_generates():
    cls, cfg, _ = hf_models()["llama-gqa4"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(1, 96, (1, 70))
    use_attention(model, "sliding_window:16")
    with torch.no_grad():
        got, want = model(ids).logits, original(ids).logits
    torch.testing.assert_close(got[:, :16], want[:, :16], atol=2e-5, rtol=2e-5)  # inside window
    assert (got[:, 16:] - want[:, 16:]).abs().max() > 1e-3
    out = model.generate(ids[:, :20], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 25)


def test_timm_vit_equal_to_original():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48,
                              depth=2).eval()
    original = copy.deepcopy(model)
    report = use_attention(model, "full")
    assert len(report.swapped) == 2
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=2e-5, rtol=2e-5)
    # same parameters (the wrapper holds the original module)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in original.parameters())


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_default_variant_is_the_models_own(name):
    cls, cfg, variant = hf_models()[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(1, 96, (2, 23))
    assert use_attention(model).variant == variant
    with torch.no_grad():
        torch.testing.assert_close(_out(model(ids)), _out(original(ids)), atol=2e-5, rtol=2e-5)


def test_default_for_bert_built_as_a_decoder_is_causal():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    model = BertLMHeadModel(BertConfig(**SMALL, is_decoder=True)).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(1, 96, (1, 19))
    assert use_attention(model).variant == "causal"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5, rtol=2e-5)


def test_causal_on_an_encoder_warns():
    cls, cfg, _ = hf_models()["bert"]
    with pytest.warns(UserWarning, match="attends both ways"):
        use_attention(cls(cfg).eval(), "causal")


@pytest.mark.parametrize("name,layout", [("resnet18", "no attention module"),
                                         ("swin_tiny_patch4_window7_224", "WindowAttention")])
def test_timm_without_vit_attention_reported_and_unchanged(name, layout):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="model unchanged"):
        report = use_attention(model)
    assert not report and any(layout in reason for _, reason in report.skipped)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("block_size", [0, -16, 2.5, True])
def test_bad_block_size(block_size):
    cls, cfg, _ = hf_models()["llama-gqa4"]
    with pytest.raises(ValueError, match="block_size"):
        use_attention(cls(cfg).eval(), block_size=block_size)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseAttention("causal", block_size=block_size)


def test_unsupported_model_reported_and_unchanged():
    model = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="model unchanged"):
        report = use_attention(model, "causal")
    assert not report and "neither" in report.skipped[0][1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be"):
        use_attention("llama", "causal")
    with pytest.raises(ValueError, match="unknown attention variant"):
        use_attention(model, "nope")


def test_module_matches_sdpa_with_padding_mask():
    attn = BlockSparseAttention("causal", block_size=16)
    q, k, v = (torch.randn(2, 4, 30, 64) for _ in range(3))
    pad = torch.ones(2, 1, 30, 30, dtype=torch.bool)
    pad[0, :, :, :3] = False
    allowed = pad & torch.ones(30, 30, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(attn(q, k, v, attn_mask=pad), want, atol=1e-5, rtol=1e-5)
    assert fastarch.use_attention is use_attention


def test_module_reuses_block_mask_of_same_padding_mask_until_written():
    attn = BlockSparseAttention("causal", block_size=16)
    q, k, v = (torch.randn(1, 2, 20, 64) for _ in range(3))
    pad = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    pad[..., :4] = False
    first = attn.block_mask(q, k, pad)
    assert attn.block_mask(q, k, pad) is first  # next layer, same mask tensor
    pad[..., :8] = False  # written in place: must not reuse the stale block mask
    allowed = pad & torch.ones(20, 20, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = attn(q, k, v, attn_mask=pad)
    torch.testing.assert_close(got[:, :, 8:], want[:, :, 8:], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :, :8], torch.zeros_like(got[:, :, :8]))


def test_hf_attention_entry_with_a_softcap_keeps_one_module():
    """transformers' "fastarch" entry with a model's softcap (Gemma 2) attends with it, through
    one softcapped module per attention object (kept, so its routing is kept too)."""
    from fastarch.attention import create_block_mask
    from fastarch.attention import models as models_mod
    from fastarch.ops.block_sparse_attention import block_sparse_attention

    torch.manual_seed(0)
    attn = BlockSparseAttention("causal", block_size=16)

    class Layer(torch.nn.Module):
        is_causal = True

    layer = Layer()
    object.__setattr__(layer, "_fastarch_attention", attn)
    q, k, v = (torch.randn(1, 4, 40, 32) for _ in range(3))
    bm = create_block_mask(attn.mask, q_len=40, kv_len=40, block_size=16)
    want = block_sparse_attention(q, k, v, bm, scale=0.3, softcap=5.0).transpose(1, 2)
    for _ in range(2):
        out, _ = models_mod._hf_attention_forward(layer, q, k, v, None, scaling=0.3,
                                                  softcap=5.0)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert models_mod._softcapped(attn, 5.0) is models_mod._softcapped(attn, 5.0)
    assert models_mod._softcapped(attn, 5.0).softcap == 5.0
    assert models_mod._softcapped(attn, 2.0) is not models_mod._softcapped(attn, 5.0)
