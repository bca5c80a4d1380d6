"""The "fastarch" torch.compile backend: registration, options, rewrites, and compiled-vs-eager
outputs on real model classes (small random configs, built offline)."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastarch
import fastarch.compile.attention as A
from fastarch.compile import CompileOptions, clear_reports, compile_backend, explain, reports


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    clear_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture
def force_block_sparse(monkeypatch):
    """Small test models: take the block-sparse path whenever the mask allows it."""
    monkeypatch.setattr(A, "MIN_PAIRS", 0)
    monkeypatch.setattr(A, "MAX_FRACTION", 1.0)
    A._PLANS.clear()


def _rewritten(kind="attention"):
    return [e for r in reports() for e in r.rewritten() if e.pass_name == kind]


class MaskedAttention(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv, self.out, self.h = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def _window(n, w):
    i = torch.arange(n)
    return (i.view(-1, 1) >= i.view(1, -1)) & (i.view(-1, 1) - i.view(1, -1) < w)


def test_registered_as_dynamo_backend():
    from torch._dynamo.backends.registry import lookup_backend

    assert "fastarch" in torch._dynamo.list_backends()
    assert lookup_backend("fastarch") is compile_backend
    assert fastarch.compile_backend is compile_backend


def test_info_reports_the_backend():
    import io

    report = fastarch.info(file=io.StringIO())
    assert report["compile_backend"] == "fastarch -> fastarch.compile.backend:compile_backend"


def test_options():
    assert CompileOptions.parse(None).rewrites == ("attention", "sparsity")
    o = CompileOptions.parse({"rewrites": "attention", "sparsity": 0.25, "max_autotune": False})
    assert o.rewrites == ("attention",) and o.sparsity == 0.25
    assert o.inductor == {"max_autotune": False}  # unknown keys go to Inductor
    with pytest.raises(ValueError, match=r"options\['rewrites'\].*'flash'"):
        CompileOptions.parse({"rewrites": ["flash"]})
    with pytest.raises(ValueError, match=r"options\['sparsity'\]"):
        CompileOptions.parse({"sparsity": 1.5})
    with pytest.raises(TypeError, match="options must be a dict"):
        CompileOptions.parse(["attention"])


def test_masked_sdpa_is_rewritten_and_matches_eager(force_block_sparse, caplog):
    m = MaskedAttention().eval()
    x, mask = torch.randn(2, 150, 32), _window(150, 40)
    with torch.no_grad():
        ref = m(x, mask)
        before = A.STATS["block_sparse"]
        with caplog.at_level(logging.INFO, logger="fastarch.compile"):
            out = torch.compile(m, backend="fastarch", fullgraph=True)(x, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert A.STATS["block_sparse"] > before
    assert len(_rewritten()) == 1
    assert "fastarch.sdpa" in caplog.text  # what was rewritten is logged


def test_mode_and_inductor_options_pass_through():
    m = MaskedAttention().eval()
    x, mask = torch.randn(1, 20, 32), _window(20, 5)
    with torch.no_grad():
        out = torch.compile(m, backend="fastarch", mode="max-autotune-no-cudagraphs")(x, mask)
        torch.testing.assert_close(out, m(x, mask), atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()
        out = torch.compile(m, backend="fastarch", options={"epilogue_fusion": False})(x, mask)
        torch.testing.assert_close(out, m(x, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="not_an_inductor_option"):
        with torch.no_grad():
            torch.compile(m, backend="fastarch", options={"not_an_inductor_option": 1})(x, mask)


def test_small_static_attention_is_left_to_sdpa():
    m = MaskedAttention().eval()
    res = explain(m, torch.randn(1, 16, 32), _window(16, 4))
    assert res.rewritten() == []
    (entry,) = [e for r in res.reports for e in r.entries if e.pass_name == "attention"]
    assert "below the size where the kernel pays" in entry.reason


def test_rewrites_can_be_switched_off(force_block_sparse):
    m = MaskedAttention().eval()
    x, mask = torch.randn(2, 20, 32), _window(20, 5)
    with torch.no_grad():
        out = torch.compile(m, backend="fastarch", options={"rewrites": []})(x, mask)
    torch.testing.assert_close(out, m(x, mask), atol=1e-5, rtol=1e-5)
    assert _rewritten() == []


def test_training_graphs_are_left_alone():
    m = MaskedAttention()
    x, mask = torch.randn(2, 20, 32), _window(20, 5)
    out = torch.compile(m, backend="fastarch")(x, mask)
    out.sum().backward()
    assert m.qkv.weight.grad is not None
    assert _rewritten() == [] and "gradients" in reports()[0].note
    torch.testing.assert_close(out, m(x, mask), atol=1e-5, rtol=1e-5)


def test_explain_reports_rewrites_without_compiling(force_block_sparse):
    m = MaskedAttention().eval()
    res = explain(m, torch.randn(1, 16, 32), _window(16, 4))
    assert res.graph_count == 1 and res.graph_break_count == 0
    assert [e.pass_name for e in res.rewritten()] == ["attention"]
    assert "1 rewrite(s)" in str(res)
    with pytest.raises(TypeError, match="model must be callable"):
        explain(3)


def test_sparsity_option_applies_teal_thresholds_from_the_example_inputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    x = torch.randn(1, 24)
    with torch.no_grad():
        out = torch.compile(m, backend="fastarch", options={"sparsity": 0.5})(x)
        # the spec, by hand: each linear's input thresholded at the median of its |input|
        def teal(v, lin):
            a = v.abs().flatten()
            t = a.kthvalue(int(round(0.5 * a.numel()))).values
            return F.linear(torch.where(v.abs() > t, v, 0), lin.weight, lin.bias)
        ref = teal(F.relu(teal(x, m[0])), m[2])
    assert len(_rewritten("sparsity")) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, m(x), atol=1e-3)  # it did sparsify


# ---- real model classes ----------------------------------------------------------------------------
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def _padded_batch(n, vocab=128, left=True):
    ids = torch.randint(0, vocab, (2, n))
    am = torch.ones(2, n, dtype=torch.long)
    if left:
        am[1, : n // 3] = 0
    else:
        am[1, 2 * n // 3:] = 0
    return ids, am


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_hf_models_compiled_match_eager(force_block_sparse, arch):
    import transformers as T

    if arch == "llama":
        m, left = _llama(), True
    elif arch == "gpt2":
        m, left = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                                 n_positions=256)).eval(), True
    else:
        m, left = T.BertModel(T.BertConfig(hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=128)).eval(), False
    ids, am = _padded_batch(140, left=left)
    before = A.STATS["block_sparse"]
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am)[0]
        out = torch.compile(m, backend="fastarch", fullgraph=True)(input_ids=ids,
                                                                    attention_mask=am)[0]
    keep = am.bool()  # padded query positions are unspecified in HF outputs
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-4, rtol=2e-4)
    assert len(_rewritten()) == 2  # one SDPA call per layer
    assert A.STATS["block_sparse"] > before


def test_sliding_window_model_takes_the_kernel_with_default_thresholds():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                        sliding_window=64)
    m = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 600))
    A._PLANS.clear()
    before = A.STATS["block_sparse"]
    with torch.no_grad():
        out = torch.compile(m, backend="fastarch", fullgraph=True)(input_ids=ids).logits
        torch.testing.assert_close(out, m(input_ids=ids).logits, atol=2e-4, rtol=2e-4)
    assert len(_rewritten()) == 2
    assert A.STATS["block_sparse"] - before == 2  # both layers, default MIN_PAIRS / MAX_FRACTION


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_timm_models_compiled_match_eager(name):
    timm = pytest.importorskip("timm")
    kw = {"img_size": 64} if name.startswith("vit") else {}
    m = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = torch.compile(m, backend="fastarch", fullgraph=True)(x)
        torch.testing.assert_close(out, m(x), atol=1e-4, rtol=1e-4)
    assert _rewritten() == []  # no mask, nothing to rewrite: plain Inductor
    assert len(reports()) == 1


def test_no_recompile_when_sequence_length_changes(force_block_sparse):
    m = _llama()
    c = torch.compile(m, backend="fastarch", dynamic=True, fullgraph=True)
    compiled = []
    with torch.no_grad():
        for n in (70, 96, 131):
            ids, am = _padded_batch(n)
            out = c(input_ids=ids, attention_mask=am).logits
            compiled.append(len(reports()))
            keep = am.bool()
            torch.testing.assert_close(out[keep], m(input_ids=ids, attention_mask=am).logits[keep],
                                       atol=2e-4, rtol=2e-4)
    # (Dynamo may call the backend twice for the first compile: it restarts the analysis once
    # to turn float attributes into graph inputs; that is not a recompilation)
    assert compiled[0] >= 1 and compiled[1:] == [compiled[0]] * 2, compiled
    assert len(reports()[-1].rewritten()) == 2
