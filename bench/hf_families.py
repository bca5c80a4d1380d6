"""Every Hugging Face text decoder family (transformers' causal-LM mapping), each built from a
tiny random config, through the pruner's two promises: with exact units only the pruned model
equals the masked one; pruned by 30% (hidden width included) it saves and ``load_pruned``
rebuilds it exactly. Used by ``python bench/bench_pruning.py --sweep hf``.
"""
from __future__ import annotations

import copy
import inspect
import os
import tempfile

import torch

IDS = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(0))
# one small value for every name a config may use for it; each config takes the ones it knows
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=64,
             n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, ffn_dim=96, d_model=64,
             num_layers=2, num_heads=4, d_ff=96, d_kv=16, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
             decoder_ffn_dim=96, word_embed_proj_dim=64, embedding_size=64, rotary_dim=8,
             num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, kv_lora_rank=32, q_lora_rank=32, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, unpadded_vocab_size=97)
TOL = 1e-4  # of the output's largest magnitude


def family_names() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


MAX_PARAMS = 20e6  # a config that ignored the small sizes (sub-configs): not a tiny model


def build(model_type: str):
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    small = dict(SMALL)
    if "kv_lora_rank" in known:  # MLA: K and V come per query head (transformers repeats them by
        small["num_key_value_heads"] = small["num_attention_heads"]  # heads / K-V heads)
    cfg = cls(**{k: v for k, v in small.items() if k in known})
    with torch.device("meta"):  # size it first: a default-sized build could exhaust memory
        n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"{n / 1e6:.0f}M parameters from the small config (sub-configs keep "
                         "their default sizes)")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _logits(model):
    with torch.no_grad():
        out = model(input_ids=IDS, use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_family(model_type: str, timeout: float = 120.0) -> tuple[bool | None, str]:
    """(True, figures) / (False, the stage and error) / (None, why it was not counted)."""
    from fastarch.pruning import load_pruned, masked_copy, prune

    try:
        model = build(model_type)
        _logits(model)
    except Exception as exc:  # noqa: BLE001 - not a pruning failure: no tiny text model here
        return None, f"build: {type(exc).__name__}: {str(exc)[:90]}"
    stage = "prune exact"
    try:
        original = copy.deepcopy(model)
        report = prune(model, (IDS,), ratio=0.5, exact_only=True, timeout=timeout)
        kinds = "+".join(sorted({r["kind"] for r in report.removed})) or "nothing"
        masked = _rel(_logits(model), _logits(masked_copy(original, report)))
        if masked > TOL:
            return False, f"pruned vs masked {masked:.1e} ({kinds})"
        stage = "prune 30%"
        model = copy.deepcopy(original)
        report = prune(model, (IDS,), ratio=0.3, timeout=timeout)
        if not report.removed and kinds == "nothing":  # unchanged and reported: a failure here
            why = report.skipped[0][1] if report.skipped else "no reason given"
            return False, f"nothing prunable found: {why[:120]}"
        want = _logits(model)
        stage = "save / load_pruned"
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(os.path.join(tmp, "m"))
            again = load_pruned(os.path.join(tmp, "m"))
            reload = _rel(_logits(again), want)
        if reload > TOL:
            return False, f"reloaded vs pruned {reload:.1e}"
        return True, (f"exact: {kinds}, vs masked {masked:.0e}; 30%: {report.param_reduction:.0%}"
                      f" of the parameters, reload {reload:.0e}")
    except Exception as exc:  # noqa: BLE001
        return False, f"{stage}: {type(exc).__name__}: {str(exc)[:110]}"
