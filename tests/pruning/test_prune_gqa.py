"""Head pruning with grouped K/V heads. GQA (Llama, Mistral, Qwen2: 8 query heads on 2 K/V heads)
loses whole K/V groups with their query heads; MQA (one K/V head shared by every query head:
GPTBigCode multi_query, a hand-made module) loses query heads and keeps its K/V head. Each case:
the pruned model equals the masked one, config and module attributes agree, it saves, loads and
generates with a KV cache like a greedy decode without cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastarch.pruning import load_pruned, masked_copy, prune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
HD = 8  # head dim of the GQA configs


def gqa_model(kind):
    common = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=HD, vocab_size=97, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=5)
    else:
        cfg = transformers.Qwen2Config(**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def bigcode_mqa():
    cfg = transformers.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=97,
                                        n_positions=64, multi_query=True)
    torch.manual_seed(0)
    return transformers.GPTBigCodeForCausalLM(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def assert_generate_matches_greedy(model, steps=5):
    """generate (KV cache) against a greedy loop that recomputes the whole sequence each step."""
    out = model.generate(IDS, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                         pad_token_id=0)
    seq = IDS
    for _ in range(steps):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def kept_rows(pruned_w, full_w, rows_per_unit):
    """Which units (blocks of rows) of full_w the pruned weight kept, in order."""
    units = full_w.reshape(-1, rows_per_unit, full_w.shape[-1])
    kept = []
    for block in pruned_w.reshape(-1, rows_per_unit, pruned_w.shape[-1]):
        match = [i for i in range(units.shape[0]) if torch.equal(units[i], block)]
        assert len(match) == 1
        kept.append(match[0])
    return kept


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_gqa_keeps_whole_kv_groups(kind, tmp_path):
    model = gqa_model(kind)
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, prune_channels=False)
    assert {r["kind"] for r in report.removed} == {"heads"}
    torch.testing.assert_close(logits(model), logits(masked_copy(original, report)),
                               atol=1e-5, rtol=1e-5)
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 1
    for layer, ref in zip(model.model.layers, original.model.layers):
        attn, ref_attn = layer.self_attn, ref.self_attn
        assert attn.q_proj.out_features == 4 * HD and attn.o_proj.in_features == 4 * HD
        assert attn.k_proj.out_features == HD and attn.v_proj.out_features == HD
        assert attn.num_key_value_groups == 4
        # the query heads kept are exactly the 4 of the K/V group kept
        (g,) = kept_rows(attn.k_proj.weight, ref_attn.k_proj.weight, HD)
        assert kept_rows(attn.v_proj.weight, ref_attn.v_proj.weight, HD) == [g]
        assert kept_rows(attn.q_proj.weight, ref_attn.q_proj.weight, HD) == \
            [4 * g + i for i in range(4)]
    want = logits(model)
    model.save_pretrained(tmp_path / kind)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / kind))), want,
                               atol=1e-6, rtol=1e-6)
    assert_generate_matches_greedy(again)


def test_mqa_bigcode_prunes_query_heads_keeps_kv(tmp_path):
    model = bigcode_mqa()
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, prune_channels=False)
    assert [r["removed"] for r in report.removed] == [2, 2]
    assert {r["kind"] for r in report.removed} == {"heads"}
    torch.testing.assert_close(logits(model), logits(masked_copy(original, report)),
                               atol=1e-5, rtol=1e-5)
    hd = 16
    for block, ref in zip(model.transformer.h, original.transformer.h):
        attn = block.attn
        assert attn.num_heads == 2 and attn.kv_heads == 1 and attn.num_key_value_groups == 2
        assert attn.c_attn.out_features == 2 * hd + 2 * hd and attn.c_proj.in_features == 2 * hd
        # the shared K/V head (the last 2 * hd rows) is untouched
        torch.testing.assert_close(attn.c_attn.weight[-2 * hd:], ref.attn.c_attn.weight[-2 * hd:])
    assert model.config.n_head == 2 and model.config.multi_query
    want = logits(model)
    model.save_pretrained(tmp_path / "mqa")
    again = load_pruned(str(tmp_path / "mqa"))
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)
    assert_generate_matches_greedy(again)


def test_mqa_bigcode_heads_and_hidden_round_trip(tmp_path):
    """Hidden width pruned too: the fused c_attn (hidden + 2 * head_dim) keeps its shape on load."""
    model = bigcode_mqa()
    prune(model, (IDS,), ratio=0.5)
    assert model.config.n_embd == 32 and model.transformer.h[0].attn.num_heads == 2
    want = logits(model)
    model.save_pretrained(tmp_path / "mqa")
    again = load_pruned(str(tmp_path / "mqa"))
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)
    assert_generate_matches_greedy(model)


class TinyMQA(nn.Module):
    """Multi-query attention written by hand: K/V of one head, shared by expanding (the
    repeat_kv way) or through SDPA's enable_gqa."""

    def __init__(self, dim=32, heads=4, head_dim=8, shared="expand"):
        super().__init__()
        self.num_heads, self.head_dim, self.shared = heads, head_dim, shared
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(dim, 2 * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 1, 2 * self.head_dim).transpose(1, 2).chunk(2, dim=-1)
        if self.shared == "expand":
            k, v = k.expand(b, q.shape[1], t, -1), v.expand(b, q.shape[1], t, -1)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("shared", ["expand", "enable_gqa"])
def test_hand_made_mqa_equal_masked(shared):
    torch.manual_seed(0)
    model = TinyMQA(shared=shared).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)
    report = prune(model, (x,), ratio=0.5, prune_channels=False)
    assert [(r["kind"], r["before"], r["removed"]) for r in report.removed] == [("heads", 4, 2)]
    assert model.num_heads == 2 and model.q.out_features == 16 and model.o.in_features == 16
    torch.testing.assert_close(model.kv.weight, original.kv.weight)  # the shared head stays
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_copy(original, report)(x),
                                   atol=1e-5, rtol=1e-5)
