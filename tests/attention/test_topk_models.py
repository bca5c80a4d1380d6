"""use_attention(model, "topk:K"): data-dependent top-k key blocks on Hugging Face decoders (prefill
and decode over a KV cache) and timm ViT, each call checked against the fp32 reference with the
block mask rebuilt from scratch; with K covering every block the model is unchanged."""
import copy

import pytest
import torch

from fastarch.attention import TopKAttention, topk_block_mask, use_attention
from fastarch.ops.block_sparse_attention import block_sparse_attention_reference

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 96, "hidden_size": 128, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4}


def _llama(kv_heads=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=kv_heads)).eval()
    model.set_attn_implementation("sdpa")
    return model


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2)).eval()
    model.set_attn_implementation("sdpa")
    return model


def _spy(attn: TopKAttention):
    """Record every call's inputs and output."""
    calls = []
    inner = attn.forward

    def forward(q, k, v, **kw):
        out = inner(q, k, v, **kw)
        calls.append((q.detach(), k.detach(), v.detach(), kw, out.detach()))
        return out

    object.__setattr__(attn, "forward", forward)
    return calls


def _check_calls(calls, topk, block_size):
    assert calls
    for q, k, v, kw, out in calls:
        lq, lk = q.shape[2], k.shape[2]
        bm = topk_block_mask(q, k, topk=topk, block_size=block_size, q_offset=lk - lq)
        ref, _ = block_sparse_attention_reference(
            q, k, v, *bm.op_args(), None, None, block_size, bm.q_offset, bm.window_left,
            bm.window_right, bm.prefix_len, kw["scale"], 0.0)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama-gqa4", "qwen2-gqa2"])
def test_topk_covering_all_blocks_equals_original(make):
    model = make()
    original = copy.deepcopy(model)
    report = use_attention(model, "topk:100", block_size=16)
    assert report.variant == "topk:100" and len(report.swapped) == 2
    ids = torch.randint(1, 96, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5, rtol=2e-5)
    got = model.generate(ids[:1, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = original.generate(ids[:1, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_topk_prefill_and_decode_match_reference():
    model = _llama()
    original = copy.deepcopy(model)
    attn = TopKAttention(2, block_size=16, min_keys=0)
    use_attention(model, attn)
    calls = _spy(attn)
    ids = torch.randint(1, 96, (1, 70))
    with torch.no_grad():
        got = model(ids).logits
        want = original(ids).logits
    # The first 32 positions see at most 2 blocks: nothing dropped there; later rows differ.
    torch.testing.assert_close(got[:, :32], want[:, :32], atol=2e-5, rtol=2e-5)
    assert (got[:, 48:] - want[:, 48:]).abs().max() > 1e-3
    _check_calls(calls, 2, 16)

    calls.clear()
    attn.stats.update(summary_built=0, summary_extended=0)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 76)
    # prefill builds each layer's summary once; the 5 decode steps extend it
    assert attn.stats["summary_built"] == 2 and attn.stats["summary_extended"] == 10
    assert any(c[0].shape[2] == 1 for c in calls)  # decode calls were checked too
    _check_calls(calls, 2, 16)


def test_topk_summary_rebuilt_for_a_new_sequence():
    model = _llama()
    attn = TopKAttention(2, block_size=16, min_keys=0)
    use_attention(model, attn)
    calls = _spy(attn)
    torch.manual_seed(3)
    for _ in range(2):  # the second prompt must not extend the first prompt's summaries
        ids = torch.randint(1, 96, (1, 40))
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    _check_calls(calls, 2, 16)


def test_topk_with_padding_mask():
    model = _llama(kv_heads=2)
    original = copy.deepcopy(model)
    use_attention(model, "topk:100", block_size=16)
    ids = torch.randint(1, 96, (2, 37))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = original(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 5:], want[0, 5:], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)


def test_topk_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48,
                              depth=2).eval()
    original = copy.deepcopy(model)
    wide = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 48)  # 9 patches + class token: 3 tiles of 4
    use_attention(wide, "topk:100", block_size=4)
    attn = TopKAttention(2, block_size=4, causal=False, min_keys=0)
    report = use_attention(model, attn, block_size=4)
    assert len(report.swapped) == 2
    calls = _spy(attn)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), original(x), atol=2e-5, rtol=2e-5)
        assert (model(x) - original(x)).abs().max() > 1e-4
    assert calls
    for q, k, v, kw, out in calls:  # bidirectional selection, checked against the reference
        bm = topk_block_mask(q, k, topk=2, block_size=4, causal=False)
        ref, _ = block_sparse_attention_reference(q, k, v, *bm.op_args(), None, None, 4, 0, -1,
                                                  -1, 0, kw["scale"], 0.0)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_topk_bad_variant():
    model = _llama()
    with pytest.raises(ValueError, match="topk:K"):
        use_attention(model, "topk:0")
    with pytest.raises(ValueError, match="topk must be"):
        TopKAttention(0)
