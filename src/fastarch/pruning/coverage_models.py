"""The architectures of the pruning coverage test and sweep: small, random-weight builds.

``COVERAGE`` names ``source:name`` entries; :func:`build` returns ``(model, example_inputs)``.
Images are 32x32 (64x64 where a model needs it); Hugging Face models use 2-layer configs.
"""
from __future__ import annotations

import torch

TORCHVISION = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
    "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "regnet_y_400mf",
    "googlenet", "resnext50_32x4d",
]
# slower ones: in the sweep (bench/bench_pruning.py), not in the CI coverage test
TORCHVISION_SLOW = ["convnext_tiny", "vit_b_16", "swin_t", "resnet50"]
TIMM = [
    "resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixer-small", "resmlp-small",
    "gmlp-small", "mobilevit_xxs", "regnety_002", "ghostnet_050", "lcnet_050",
    "edgenext_xx_small", "repvgg_a0", "mobilenetv2_050", "semnasnet_050", "tinynet_e",
]
HF = [
    "bert", "roberta", "distilbert", "electra", "gpt2", "llama", "mistral", "qwen2", "qwen3",
    "gemma", "gemma2", "phi3", "opt", "gpt_neox",
]
COVERAGE = ([f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]
            + [f"hf:{n}" for n in HF])

# keep transformer depth small where the model accepts it
_TIMM_KW = {
    "vit_tiny_patch16_224": {"img_size": 32, "depth": 2},
    "deit_tiny_patch16_224": {"img_size": 32, "depth": 2},
}
_TIMM_INPUT = {"mobilevit_xxs": 64, "edgenext_xx_small": 64}


def _hf_config(kind: str):
    import transformers

    small = {"vocab_size": 97, "num_hidden_layers": 2, "hidden_size": 64,
             "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 64}
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97,
                                       n_positions=64, bos_token_id=0, eos_token_id=0)
    if kind == "distilbert":
        return transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                                             vocab_size=97, max_position_embeddings=64)
    if kind == "opt":
        return transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=96, vocab_size=97, word_embed_proj_dim=64,
                                      max_position_embeddings=64, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=1)
    if kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        small.update(num_key_value_heads=2, head_dim=16)
        if kind == "phi3":
            small.pop("head_dim")
        if kind in ("gemma", "gemma2", "phi3", "qwen2", "qwen3", "mistral"):
            small.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt_neox":
        small.update(bos_token_id=0, eos_token_id=0)
    return transformers.AutoConfig.for_model(kind, **small)


def _small_mixer(kind: str):
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MixerBlock, MlpMixer, ResBlock, SpatialGatingBlock

    if kind == "mixer-small":
        return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, block_layer=MixerBlock)
    if kind == "resmlp-small":
        return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, mlp_ratio=4,
                        block_layer=ResBlock, stem_norm=False)
    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, mlp_ratio=6,
                    block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)


def build(entry: str):
    """(model in eval mode, example inputs) for a ``source:name`` entry, fixed seed."""
    source, name = entry.split(":", 1)
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        model = getattr(torchvision.models, name)(weights=None, **kw)
        size = 64 if name in ("squeezenet1_1",) else 32
        return model.eval(), (torch.randn(1, 3, size, size),)
    if source == "timm":
        import timm

        if name.endswith("-small"):  # timm's MLP-mixer families at 2 blocks
            return _small_mixer(name).eval(), (torch.randn(1, 3, 32, 32),)
        model = timm.create_model(name, pretrained=False, **_TIMM_KW.get(name, {}))
        size = _TIMM_INPUT.get(name, _TIMM_KW.get(name, {}).get("img_size", 32))
        return model.eval(), (torch.randn(1, 3, size, size),)
    if source == "hf":
        import transformers

        cfg = _hf_config(name)
        if name in ("bert", "roberta", "distilbert", "electra"):
            model = transformers.AutoModel.from_config(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
        return model.eval(), (ids,)
    raise ValueError(f"entry: unknown source {source!r}")
