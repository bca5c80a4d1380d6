"""More Hugging Face decoder families, each from a tiny random config: pruned with exact units
only it equals the masked model; pruned by 30% (the hidden width too) it saves and
``load_pruned`` rebuilds it exactly. Each family once broke one of these:

* falcon: its linears multiply by ``weight.T`` (``aten.numpy_T``); rotary frequencies of the
  pruned model's head size, which its config cannot hold.
* stablelm: SDPA on K/V repeated per query head, with the K/V head count in a module attribute.
* gemma3_text: per-head q/k norms scaled by ``1 + weight``.
* opt: ``word_embed_proj_dim`` follows the hidden size, or project_in / project_out appear.
* persimmon: per-head q/k LayerNorms sized from hidden // heads in a fresh build.
* bloom (eager only): no attention site is found, so the hidden width stays a multiple of
  the config's head count.
"""
import copy

import pytest
import torch

from fastarch.pruning import load_pruned, masked_copy, prune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(0))
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(kind):
    if kind == "falcon":
        cfg = transformers.FalconConfig(**BASE)
    elif kind == "stablelm":
        cfg = transformers.StableLmConfig(**BASE, intermediate_size=96, num_key_value_heads=2)
    elif kind == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(**BASE, intermediate_size=96, num_key_value_heads=2,
                                            head_dim=16)
    elif kind == "opt":
        cfg = transformers.OPTConfig(**BASE, ffn_dim=96, word_embed_proj_dim=64)
    elif kind == "persimmon":
        cfg = transformers.PersimmonConfig(**BASE, intermediate_size=96)
    else:
        cfg = transformers.BloomConfig(**BASE)
        cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


KINDS = {"falcon": {"channels"}, "stablelm": {"channels", "heads"},
         "gemma3_text": {"channels", "heads"}, "opt": {"channels", "heads"},
         "persimmon": {"channels"}, "bloom": {"channels"}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_units_equal_masked(kind):
    model = build(kind)
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    assert {r["kind"] for r in report.removed} == KINDS[kind]
    torch.testing.assert_close(logits(model), logits(masked_copy(original, report)), atol=1e-5,
                               rtol=1e-5)
    if kind == "stablelm":  # GQA: 4 query heads on 2 K/V heads, one group removed
        attn = model.model.layers[0].self_attn
        assert attn.num_key_value_heads == 1 and model.config.num_key_value_heads == 1
        assert attn.k_proj.out_features == 16 and attn.q_proj.out_features == 32


@pytest.mark.parametrize("kind", list(KINDS))
def test_pruned_hidden_width_saves_and_loads(kind, tmp_path):
    model = build(kind)
    report = prune(model, (IDS,), ratio=0.3)
    assert report.param_reduction > 0.2
    hidden = model.get_input_embeddings().weight.shape[1]
    # a multiple of the head count (of the heads kept, where heads were removed)
    assert hidden < 64 and hidden % model.config.num_attention_heads == 0
    want = logits(model)
    model.save_pretrained(tmp_path / kind)
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / kind))), want, atol=1e-5,
                               rtol=1e-5)
