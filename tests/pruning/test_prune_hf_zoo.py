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
* t5 / bart (encoder-decoders): keyword inputs; embeddings tied inside a sub-model.
* electra: ``embedding_size`` follows the hidden size, or embeddings_project appears.
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
    # at least these (transformers 5.25's Falcon also exposes its heads)
    assert KINDS[kind] <= {r["kind"] for r in report.removed}
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


def seq2seq(kind):
    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4,
                                    vocab_size=97, decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=97,
                                  max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_with_keyword_inputs_saves_and_loads(kind, tmp_path):
    """Keyword inputs (decoder_input_ids) as a dict; BART's embeddings are tied in BartModel,
    a sub-model, so the checkpoint holds them once."""
    model = seq2seq(kind)
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
    report = prune(model, inputs, ratio=0.3)
    assert report.removed and report.param_reduction > 0.05
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(tmp_path / kind)
    again = load_pruned(str(tmp_path / kind))
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no positional parameter 'decoder_ids'"):
        prune(seq2seq(kind), {"input_ids": IDS, "decoder_ids": IDS}, ratio=0.3)


def test_electra_embedding_size_follows_the_hidden_size(tmp_path):
    cfg = transformers.ElectraConfig(hidden_size=64, embedding_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.ElectraForSequenceClassification(cfg).eval()
    prune(model, (IDS,), ratio=0.3)
    assert model.config.embedding_size == model.config.hidden_size < 64
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "electra")
    again = load_pruned(str(tmp_path / "electra"))
    assert not hasattr(again.electra, "embeddings_project")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_heads_and_shared_expert_save_and_load(kind, tmp_path):
    """MoE checkpoints hold each expert apart and transformers stacks them on load: load_pruned
    runs that conversion into the rebuilt model. Here the K/V groups, Qwen2-MoE's shared
    expert and the routed experts' width (their 3-d weights, through a grouped matmul) are
    pruned; the router's experts stay."""
    common = dict(BASE, intermediate_size=96, num_key_value_heads=2, num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4)
    else:
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    original = copy.deepcopy(model)
    width = cfg.intermediate_size if kind == "mixtral" else cfg.moe_intermediate_size
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    assert "heads" in {r["kind"] for r in report.removed}
    experts = model.model.layers[0].mlp.experts
    assert experts.down_proj.shape[-1] < width and experts.down_proj.shape[-1] % 8 == 0
    assert experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[-1]
    assert experts.intermediate_dim == experts.down_proj.shape[-1]
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 4  # every expert kept
    want = logits(model)
    torch.testing.assert_close(want, logits(masked_copy(original, report)), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / kind)
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / kind))), want, atol=1e-5,
                               rtol=1e-5)


def test_moe_widths_differing_between_layers_save_and_load(tmp_path):
    """Per-layer widths the config cannot give: the experts are stacked into the rebuilt model,
    which already has the pruned shapes."""
    cfg = transformers.Qwen2MoeConfig(**BASE, intermediate_size=96, num_key_value_heads=2,
                                      num_experts_per_tok=2, num_experts=4,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # layer 1's shared expert is much weaker: global ranking prunes it more
        model.model.layers[1].mlp.shared_expert.down_proj.weight.mul_(1e-3)
    prune(model, (IDS,), ratio=0.3, global_ranking=True, prune_heads=False)
    widths = [layer.mlp.shared_expert.up_proj.out_features for layer in model.model.layers]
    assert widths[0] != widths[1]
    want = logits(model)
    model.save_pretrained(tmp_path / "moe")
    again = load_pruned(str(tmp_path / "moe"))
    assert [layer.mlp.shared_expert.up_proj.out_features for layer in again.model.layers] == widths
    torch.testing.assert_close(logits(again), want, atol=1e-5, rtol=1e-5)


def test_moe_fallback_through_from_pretrained(tmp_path, monkeypatch):
    """Where transformers' converter cannot be called, from_pretrained loads the checkpoint;
    that needs widths the config gives (pruned alike in every layer), else a clear error."""
    import fastarch.pruning.hf as hf

    monkeypatch.setattr(hf, "_convert_into", lambda model, state: None)
    cfg = transformers.MixtralConfig(**BASE, intermediate_size=96, num_key_value_heads=2,
                                     num_experts_per_tok=2, num_local_experts=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    prune(model, (IDS,), ratio=0.5, exact_only=True)
    want = logits(model)
    model.save_pretrained(tmp_path / "uniform")
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / "uniform"))), want, atol=1e-5,
                               rtol=1e-5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # layer 1's heads much weaker: global ranking removes only those
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
    prune(model, (IDS,), ratio=0.25, global_ranking=True, exact_only=True,
          ignore=[f"model.layers.{i}.mlp.experts" for i in range(2)])
    heads = [layer.self_attn.q_proj.out_features for layer in model.model.layers]
    assert heads[0] != heads[1]
    model.save_pretrained(tmp_path / "per-layer")
    with pytest.raises(ValueError, match="converted on load"):
        load_pruned(str(tmp_path / "per-layer"))


@pytest.mark.parametrize("kind", ["olmoe", "minimax_m2"])
def test_moe_routed_by_topk_prunes_experts_and_hidden(kind, tmp_path):
    """Routers that pick experts with topk (and gather their weights) over experts stacked as
    3-d weights: before, topk / index / gather blocked the whole model ("nothing prunable").
    Now the experts' width and the hidden width go, the router keeps every expert, the router's
    ``hidden_dim`` follows, and the result saves and reloads."""
    extra = dict(intermediate_size=96, num_key_value_heads=2, num_experts_per_tok=2,
                 num_experts=4)
    cls = transformers.OlmoeConfig if kind == "olmoe" else transformers.MiniMaxM2Config
    if kind == "minimax_m2":
        extra.update(num_local_experts=4, head_dim=16)
        extra.pop("num_experts")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**BASE, **extra)).eval()
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    assert "channels" in {r["kind"] for r in report.removed}
    torch.testing.assert_close(logits(model), logits(masked_copy(original, report)), atol=1e-5,
                               rtol=1e-5)
    model = copy.deepcopy(original)
    report = prune(model, (IDS,), ratio=0.3)
    mlp = model.model.layers[0].mlp
    hidden = model.get_input_embeddings().weight.shape[1]
    assert hidden < 64 and mlp.gate.weight.shape == (4, hidden) and mlp.gate.hidden_dim == hidden
    assert mlp.experts.down_proj.shape[1:] == (hidden, mlp.experts.intermediate_dim)
    assert mlp.experts.intermediate_dim % 8 == 0 and mlp.experts.intermediate_dim < 96
    assert not [w for w, why in report.skipped if "topk" in why or "index" in why]
    want = logits(model)
    model.save_pretrained(tmp_path / kind)
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / kind))), want, atol=1e-5,
                               rtol=1e-5)


def test_expert_width_multiple_of_8_under_global_ranking():
    """torch's grouped matmul (what transformers runs outside export) wants 16-byte strides: the
    experts' width stays a multiple of 8 whatever the ranking picks."""
    cfg = transformers.MixtralConfig(**BASE, intermediate_size=96, num_key_value_heads=2,
                                     num_experts_per_tok=2, num_local_experts=4)
    for global_ranking in (False, True):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        prune(model, (IDS,), ratio=0.37, global_ranking=global_ranking)
        for layer in model.model.layers:
            width = layer.mlp.experts.down_proj.shape[-1]
            assert width % 8 == 0 and (width <= 96 if global_ranking else width < 96)
        with torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()


def test_falcon_hidden_keeps_an_even_quotient_for_rope(tmp_path):
    """Falcon's config derives head_dim = hidden // heads (a property) and its RoPE validator
    refuses an odd one on save, even though the modules keep their real head size: at 32% the
    plan's 44 channels (11 per head) become 48."""
    cfg = transformers.FalconConfig(**BASE)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    prune(model, (IDS,), ratio=0.32)
    hidden = model.config.hidden_size
    assert hidden < 64 and (hidden // model.config.num_attention_heads) % 2 == 0
    want = logits(model)
    model.save_pretrained(tmp_path / "falcon")
    torch.testing.assert_close(logits(load_pruned(str(tmp_path / "falcon"))), want, atol=1e-5,
                               rtol=1e-5)


def _phi3(layers=3):
    cfg = transformers.Phi3Config(**{**BASE, "num_attention_heads": 8, "num_hidden_layers": layers},
                                  intermediate_size=96, num_key_value_heads=4)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_phi3_fused_qkv_heads_prune_per_layer_and_reload(tmp_path):
    """Phi-3 cuts its fused qkv by constant slices at config.num_attention_heads * head_dim:
    heads go from all three pieces, and a layer whose head count differs from the config's
    gets its own counts (LayerConfig), kept through save_pretrained / load_pruned."""
    from fastarch.pruning.removal import LayerConfig

    model = _phi3()
    with torch.no_grad():  # unequal layers: global ranking prunes them unequally
        w = model.model.layers[1].self_attn.qkv_proj.weight
        w.mul_(0.02)
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.4, exact_only=True, global_ranking=True)
    assert "heads" in {r["kind"] for r in report.removed}, report.skipped
    widths = [layer.self_attn.qkv_proj.out_features for layer in model.model.layers]
    assert len(set(widths)) > 1 and min(widths) < 128, widths  # per-layer head counts
    for layer in model.model.layers:
        attn = layer.self_attn
        q = attn.o_proj.in_features // attn.head_dim
        assert attn.qkv_proj.out_features == (q + 2 * attn.num_key_value_heads) * attn.head_dim
        assert attn.config.num_attention_heads == q
        assert isinstance(attn.config, LayerConfig) == (q != model.config.num_attention_heads)
    ref = logits(masked_copy(original, report))
    got = logits(model)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    # the shared config still reaches the layers: an attribute set on it is seen through
    model.config.some_flag = 3
    assert all(layer.self_attn.config.some_flag == 3 for layer in model.model.layers)
    model.save_pretrained(tmp_path / "m")
    again = load_pruned(str(tmp_path / "m"))
    torch.testing.assert_close(logits(again), got, rtol=0, atol=1e-6)
    with torch.no_grad():  # decoding with a KV cache runs on the per-layer counts
        out = again.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_slices_that_do_not_tile_heads_still_fix_the_channels():
    """A constant slice of channels that are not whole attention heads keeps its size: the
    channels it cuts are not pruned (reported), the rest of the model is."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 12)
            self.b = torch.nn.Linear(5, 4)
            self.c = torch.nn.Linear(7, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h[:, :5]) + self.c(h[:, 5:])

    net = Net().eval()
    report = prune(net, (torch.randn(2, 8),), ratio=0.5)
    assert net.a.out_features == 12 and net.b.in_features == 5
    assert any("fixed-size" in why for _, why in report.skipped)


def test_big_bird_saves_the_attention_class_it_runs(tmp_path):
    """BigBird swaps its block-sparse attention for full attention on inputs shorter than its
    blocks (at the first forward, for good): the pruned model is saved as full attention, or a
    fresh build sizes its block-sparse heads from the pruned config and fails on the weights."""
    cfg = transformers.BigBirdConfig(**BASE, intermediate_size=96, block_size=4,
                                     num_random_blocks=2)
    assert cfg.attention_type == "block_sparse"
    torch.manual_seed(0)
    model = transformers.BigBirdModel(cfg).eval()
    prune(model, (IDS,), ratio=0.3)
    assert model.config.attention_type == "original_full"
    with torch.no_grad():
        want = model(IDS).last_hidden_state
    model.save_pretrained(tmp_path / "bb")
    again = load_pruned(str(tmp_path / "bb"))
    assert again.config.attention_type == "original_full"
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_bamba_keeps_a_hidden_size_its_config_refuses(tmp_path):
    """Bamba's config derives the Mamba width as mamba_expand * hidden_size and checks it against
    mamba_n_heads * mamba_d_head on save: a pruned hidden size would fail that, so the config keeps
    the old one, the report says so, and load_pruned rebuilds the pruned widths from the record."""
    cfg = transformers.BambaConfig(**{**BASE, "num_key_value_heads": 2}, intermediate_size=96,
                                   mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                                   mamba_chunk_size=8, attn_layer_indices=[1])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    report = prune(model, (IDS,), ratio=0.3)
    hidden = model.model.embed_tokens.weight.shape[1]
    assert hidden < 64
    assert model.config.hidden_size == 64
    assert model.config.fastarch_pruned["config_kept"] == {"hidden_size": hidden}
    assert any(m == "config" and "hidden_size stays 64" in why for m, why in report.skipped)
    want = logits(model)
    model.save_pretrained(tmp_path / "bamba")
    again = load_pruned(str(tmp_path / "bamba"))
    assert again.model.embed_tokens.weight.shape[1] == hidden
    torch.testing.assert_close(logits(again), want, atol=1e-5, rtol=1e-5)


def test_jetmoe_experts_split_by_run_time_sizes():
    """JetMoE splits the routed tokens by ``expert_size.tolist()`` (sizes known only at run
    time), runs each expert on ``weight[i]`` of a stacked (experts, out, in) weight, and scatters
    attention-expert outputs back with ``index_add``: the graph follows all three, every expert
    loses the same channels, and the pruned model equals the masked one."""
    cfg = transformers.JetMoeConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                    num_key_value_heads=2, kv_channels=16, intermediate_size=96,
                                    max_position_embeddings=64, num_local_experts=4,
                                    num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    original = copy.deepcopy(model)
    report = prune(model, (IDS,), ratio=0.5, exact_only=True)
    mlp = model.model.layers[0].mlp
    # the experts' neurons (gate | up halves of input_linear, the inputs of output_linear), the
    # same in every expert; the hidden width stays (the attention experts' output is scattered
    # into a zeros tensor of the config's width)
    up, down = mlp.input_linear.weight.shape, mlp.output_linear.weight.shape
    assert up[0] == down[0] == 4 and up[1] < 192 and up[1] == 2 * down[2], (up, down)
    assert not [why for _, why in report.skipped if "split_with_sizes" in why]
    torch.testing.assert_close(logits(model), logits(masked_copy(original, report)), atol=1e-5,
                               rtol=1e-5)
