"""torch.compile(fullgraph=True): the block-mask builder traces into the graph, so neither the
sequence length (dynamic shapes) nor the mask contents cause a recompilation."""
import pytest
import torch

from fastarch.attention import BlockSparseAttention, use_attention


def counting_backend():
    calls = {"n": 0}

    def backend(gm, example_inputs):
        calls["n"] += 1
        return gm.forward

    return calls, backend


def test_module_one_graph_for_all_lengths():
    torch._dynamo.reset()
    attn = BlockSparseAttention("sliding_window:24", block_size=16)
    calls, backend = counting_backend()
    f = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True, dynamic=True,
                      backend=backend)
    for length in (40, 44, 61, 100):
        q, k, v = (torch.randn(1, 4, length, 64) for _ in range(3))
        k, v = k[:, :2], v[:, :2]
        torch.testing.assert_close(f(q, k, v), attn(q, k, v))
    assert calls["n"] == 1


def test_llama_fullgraph_one_compile():
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    use_attention(model, "causal")
    calls, backend = counting_backend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch.no_grad():
        for length in (40, 53):
            ids = torch.randint(0, 96, (1, length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    assert calls["n"] == 1
