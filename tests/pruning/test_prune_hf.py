"""Hugging Face decoders / encoders (random weights from small configs): heads (MHA, GQA) and
MLP neurons removed, config updated, save_pretrained / load again."""
import copy

import pytest
import torch

from fastarch.pruning import load_pruned, masked_copy, prune

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads=2):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   vocab_size=97, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


IDS = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_llama_heads_and_mlp_equal_masked(kv_heads):
    model = tiny_llama(kv_heads)
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    kinds = sorted({r["kind"] for r in report.removed})
    assert kinds == ["channels", "heads"]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16
    assert attn.k_proj.out_features == (2 if kv_heads == 4 else 1) * 16
    assert model.model.layers[0].mlp.gate_proj.out_features == 48
    assert model.config.num_attention_heads == 2
    assert model.config.num_key_value_heads == (2 if kv_heads == 4 else 1)
    assert model.config.intermediate_size == 48
    torch.testing.assert_close(logits(model, IDS), logits(masked_copy(original, report), IDS),
                               atol=1e-4, rtol=1e-4)


def test_llama_save_and_load(tmp_path):
    model = tiny_llama(2)
    prune(model, (IDS,), ratio=0.3)
    want = logits(model, IDS)
    model.save_pretrained(tmp_path / "uniform")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    torch.testing.assert_close(logits(again, IDS), want, atol=1e-5, rtol=1e-5)
    again = load_pruned(str(tmp_path / "uniform"))
    torch.testing.assert_close(logits(again, IDS), want, atol=1e-5, rtol=1e-5)


def test_per_layer_widths_save_and_load(tmp_path):
    model = tiny_llama(4)
    with torch.no_grad():  # layer 1's MLP is much weaker: global ranking prunes it harder
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    prune(model, (IDS,), ratio=0.3, global_ranking=True, prune_heads=False)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert widths[0] != widths[1]
    want = logits(model, IDS)
    model.save_pretrained(tmp_path / "per-layer")
    again = load_pruned(str(tmp_path / "per-layer"))
    assert [layer.mlp.gate_proj.out_features for layer in again.model.layers] == widths
    torch.testing.assert_close(logits(again, IDS), want, atol=1e-5, rtol=1e-5)


def test_gpt2_heads_split_size():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    assert {r["kind"] for r in report.removed} == {"heads", "channels"}
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 3 * 32)
    torch.testing.assert_close(logits(model, IDS), logits(masked_copy(original, report), IDS),
                               atol=1e-4, rtol=1e-4)


def test_bert_encoder_keeps_hidden_output():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=97)
    model = transformers.BertModel(cfg).eval()
    report = prune(model, (IDS,), ratio=0.5)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 64
    with torch.no_grad():
        out = model(IDS).last_hidden_state
    assert out.shape == (1, 7, 64)  # the hidden size is a model output: not pruned
    assert report.params_after < report.params_before


def test_llama_hidden_width_runs():
    model = tiny_llama(2)
    prune(model, (IDS,), ratio=0.25, prune_heads=False)
    assert model.model.embed_tokens.embedding_dim == 48 and model.config.hidden_size == 48
    assert logits(model, IDS).shape == (1, 7, 97)


def test_llama_hidden_width_keeps_round_to_and_head_multiple():
    # 6 query heads are left and the residual width must stay a multiple of them (the HF
    # config's rule) and of round_to: 80 after rounding to 16 is not a multiple of 6, so the
    # width kept is 96 (lcm 48), not 84
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                   vocab_size=97, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    prune(model, (IDS,), ratio=0.4, round_to=16)
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    assert heads == 6 and hidden == 96
    assert model.model.embed_tokens.embedding_dim == hidden
    assert logits(model, IDS).shape == (1, 7, 97)
