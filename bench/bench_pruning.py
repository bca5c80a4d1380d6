"""Structured pruning benchmarks and sweeps (plain script; figures as markdown tables).

  python bench/bench_pruning.py --latency     latency vs MACs, pruned 30% / 50%, batch 1 and 32
  python bench/bench_pruning.py --graph-time  time to trace + prune resnet50 and a 1B decoder (meta)
  python bench/bench_pruning.py --quality     digits CNN / ViT accuracy, MiniLM embedding cosine
  python bench/bench_pruning.py --sweep torchvision|timm|hf [--limit N]   success rate

Latency and MACs are measured in the same process on this CPU (median of interleaved rounds).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "pruning"))
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from timing import interleaved

from fastarch.pruning import count_flops, prune


def median_ms(fn, rounds=5):
    fn()
    t = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return 1000 * sorted(t)[len(t) // 2]


def _decoder(hidden=512, layers=4, inter=1376, heads=8, kv=4, vocab=4096, dtype=None):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv, vocab_size=vocab,
                                   max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return (model.to(dtype) if dtype is not None else model).eval()


def latency_models(size):
    """The models of the latency table (builders), images of ``size`` x ``size``."""
    import timm
    import torchvision

    return {
        "resnet50": lambda: torchvision.models.resnet50(weights=None),
        "convnext_tiny": lambda: timm.create_model("convnext_tiny", pretrained=False),
        "vit_small_patch16_224": lambda: timm.create_model(
            "vit_small_patch16_224", pretrained=False, img_size=size),
        "llama-shaped (512 x 4 layers)": _decoder,
        "llama-shaped (1024 x 8 layers)": lambda: _decoder(hidden=1024, layers=8, inter=2816,
                                                           heads=16, kv=4),
    }


def latency_case(name, make, batch, size, seq, rounds, round_to, ratios=(0.3, 0.5)):
    """Dense vs pruned copies of one model: MACs and interleaved median ms of each
    (keys "dense" and each ratio)."""
    torch.manual_seed(0)
    model = make().eval()
    if name.startswith("llama"):
        x = (torch.randint(0, 4096, (batch, seq)),)
        small = (torch.randint(0, 4096, (1, 8)),)
    else:
        x = (torch.randn(batch, 3, size, size),)
        small = (torch.randn(1, 3, size, size),)
    # MACs on the inputs that are timed (a meta-device pass: shapes only, cheap at any batch)
    base_macs = count_flops(model, x) / 2
    variants = {"dense": model}
    macs = {"dense": base_macs}
    for ratio in ratios:
        pruned = copy.deepcopy(model)
        prune(pruned, small, ratio=ratio, round_to=round_to)
        variants[ratio] = pruned
        macs[ratio] = count_flops(pruned, x) / 2
    calls = {k: (lambda mod=m, x=x: mod(*x)) for k, m in variants.items()}
    with torch.no_grad():
        ms = {k: 1000 * v for k, v in interleaved(calls, rounds=rounds, warmup=1).items()}
    return {"macs": macs, "ms": ms}


def latency(args):
    size = args.image
    models = latency_models(size)
    print(f"\n### Latency vs MACs ({platform.machine()}, {torch.get_num_threads()} threads, "
          f"images {size}x{size}, decoder seq {args.seq})\n")
    print(f"round_to={args.round_to}; interleaved timing rounds={args.rounds}\n")
    print("| model | batch | pruned | dense ms | pruned ms | MACs ratio | latency ratio | "
          "latency / MAC reduction |")
    print("|---|---|---|---|---|---|---|---|")
    batches = [int(b) for b in args.batches.split(",")]
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, make in models.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        for batch in batches:
            r = latency_case(name, make, batch, size, args.seq, args.rounds, args.round_to)
            macs, ms = r["macs"], r["ms"]
            base_macs = macs["dense"]
            for ratio in (0.3, 0.5):
                mac_red = 1 - macs[ratio] / base_macs
                lat_red = 1 - ms[ratio] / ms["dense"]
                print(f"| {name} | {batch} | {int(ratio * 100)}% | {ms['dense']:.1f} | "
                      f"{ms[ratio]:.1f} | {macs[ratio] / base_macs:.2f} | "
                      f"{ms[ratio] / ms['dense']:.2f} | {lat_red / mac_red:.2f} |", flush=True)


def graph_time(args):
    import torchvision

    print("\n### Time to build the graph and prune\n")
    print("| model | device | graph s | total prune s |")
    print("|---|---|---|---|")
    for size in (224, 64):
        model = torchvision.models.resnet50(weights=None).eval()
        r = prune(model, torch.randn(1, 3, size, size), ratio=0.3)
        print(f"| resnet50 (input {size}x{size}) | cpu | {r.graph_seconds:.1f} | "
              f"{r.total_seconds:.1f} |", flush=True)
    # a 1B Llama-shaped decoder in bf16 on the CPU (HF masks call .item(): no eager meta run);
    # verify=False: the forward check would need two more copies of the weights
    big = _decoder(hidden=2048, layers=16, inter=8192, heads=32, kv=8, vocab=32000,
                   dtype=torch.bfloat16)
    n = sum(p.numel() for p in big.parameters())
    r = prune(big, (torch.randint(0, 32000, (1, 8)),), ratio=0.3, verify=False)
    print(f"| Llama-shaped {n / 1e9:.2f}B, bf16 | cpu | {r.graph_seconds:.1f} | "
          f"{r.total_seconds:.1f} |", flush=True)


def quality(args):
    import digits

    train_set, test_set = digits.load_digits_tensors()
    print("\n### Quality: scikit-learn digits (test accuracy, 397 images)\n")
    print("| model | dense | pruned 30% | 30% + 3 ep fine-tune | pruned 50% | 50% + 3 ep fine-tune |")
    print("|---|---|---|---|---|---|")
    for arch in ("cnn", "vit"):
        torch.manual_seed(0)
        model = digits.SmallCNN() if arch == "cnn" else digits.small_vit()
        digits.train(model, train_set, epochs=12 if arch == "cnn" else 25)
        row = [f"{digits.accuracy(model, test_set):.3f}"]
        for ratio in (0.3, 0.5):
            pruned = copy.deepcopy(model)
            prune(pruned, train_set[0][:8], ratio=ratio)
            row.append(f"{digits.accuracy(pruned, test_set):.3f}")
            digits.train(pruned, train_set, epochs=3, lr=1e-3)
            row.append(f"{digits.accuracy(pruned, test_set):.3f}")
        print(f"| small {arch.upper()} | " + " | ".join(row) + " |", flush=True)
    try:
        from fastarch.models.minilm import embed, fresh_minilm
    except ImportError:
        return
    texts = [
        "The cat sits on the mat.", "A dog runs in the park.", "Stocks fell sharply today.",
        "The weather is sunny and warm.", "He plays the guitar every evening.",
        "Neural networks learn representations.", "She bought fresh bread at the bakery.",
        "The train was delayed by an hour.", "Quantum computers use qubits.",
        "They watched a movie last night.", "Pruning removes channels from a network.",
        "Paris is the capital of France.",
    ]
    tok, model = fresh_minilm()
    with torch.no_grad():
        ref = embed(texts, model, tok)
    batch = tok(texts, padding=True, return_tensors="pt")
    example = (batch["input_ids"],)
    print("\n### MiniLM (all-MiniLM-L6-v2, pretrained): embedding cosine to the unpruned model\n")
    print("| pruned | importance | mean cosine | min cosine | params |")
    print("|---|---|---|---|---|")
    for importance in ("l2", "activation"):
        tok, m = fresh_minilm()
        before = sum(p.numel() for p in m.parameters())
        prune(m, example, ratio=0.25, importance=importance, prune_heads=False)
        prune(m, example, ratio=2 / 12 + 1e-3, importance=importance, prune_channels=False)
        with torch.no_grad():
            got = embed(texts, m, tok)
        cos = (got * ref).sum(-1)
        after = sum(p.numel() for p in m.parameters())
        print(f"| 25% MLP neurons + 2 heads/layer | {importance} | {cos.mean():.4f} | "
              f"{cos.min():.4f} | {before / 1e6:.1f}M -> {after / 1e6:.1f}M |", flush=True)


def _select(args, names: list[str]) -> list[str]:
    """The sweep's names: --models patterns (fnmatch), then --offset / --limit / --stride."""
    if args.models:
        import fnmatch

        pats = [m.strip() for m in args.models.split(",") if m.strip()]
        # in the order of the patterns (a list sorted by size runs smallest first)
        picked = []
        for pat in pats:
            picked += [n for n in names if fnmatch.fnmatchcase(n, pat) and n not in picked]
        names = picked
    names = names[args.offset:args.offset + args.limit] if args.limit else names[args.offset:]
    return names[::args.stride] if args.stride > 1 else names


def sweep_hf(args):
    """--sweep hf: every transformers causal-LM family from a tiny config (bench/hf_families.py)."""
    import hf_families

    rows = []
    for name in _select(args, hf_families.family_names()):
        t0 = time.perf_counter()
        good, reason = hf_families.check_family(name, timeout=args.timeout)
        rows.append((name, good, reason, time.perf_counter() - t0))
        state = {None: "NOT COUNTED", True: "ok", False: "FAIL"}[good]
        print(f"{name}: {state} {reason} ({rows[-1][3]:.1f} s)", flush=True)
    return rows


def sweep(args):
    from fastarch.pruning.check import check_model

    if args.sweep == "hf":
        return _sweep_report(args, sweep_hf(args))
    if args.sweep == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)

        def build(n):
            kw = {"aux_logits": False, "init_weights": False} if n in ("googlenet", "inception_v3") else {}
            return torchvision.models.get_model(n, weights=None, **kw), 224 if n in (
                "inception_v3",) or n.startswith(("vit", "swin", "maxvit")) else 64
    else:
        import timm

        names = timm.list_models()

        def build(n):
            return timm.create_model(n, pretrained=False), 0
    rows = []
    for name in _select(args, names):
        t0 = time.perf_counter()
        if args.max_params:
            # count on the meta device first: building a 7B model for real only to skip it took
            # 28 GB and the OOM killer ended the sweep (vit_7b_patch16_dinov3)
            try:
                with torch.device("meta"):
                    n_meta = sum(p.numel() for p in build(name)[0].parameters())
            except Exception:  # noqa: BLE001  (counted on the real build below)
                n_meta = 0
            if n_meta > args.max_params * 1e6:
                rows.append((name, None, f"size: {n_meta / 1e6:.0f}M parameters > --max-params "
                             f"{args.max_params}M (the check holds 5 copies)", 0.0))
                print(f"{name}: NOT TRIED {rows[-1][2]}", flush=True)
                continue
        try:
            model, size = build(name)
        except Exception as exc:  # noqa: BLE001  (not a pruning failure: the zoo cannot build it)
            rows.append((name, None, f"build: {type(exc).__name__}: {str(exc)[:100]}", 0.0))
            print(f"{name}: NOT BUILT {rows[-1][2]}", flush=True)
            continue
        n_params = sum(p.numel() for p in model.parameters())
        if args.max_params and n_params > args.max_params * 1e6:
            rows.append((name, None, f"size: {n_params / 1e6:.0f}M parameters > --max-params "
                         f"{args.max_params}M (the check holds 5 copies)", 0.0))
            print(f"{name}: NOT TRIED {rows[-1][2]}", flush=True)
            del model
            continue
        try:
            if not size:
                cfg = getattr(model, "pretrained_cfg", {}) or {}
                size = cfg.get("input_size", (3, 224, 224))[-1]
            res = check_model(model.eval(), (torch.randn(1, 3, size, size),), timeout=args.timeout)
        except Exception as exc:  # noqa: BLE001
            res = {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:120]}"}
        del model
        gc.collect()
        rows.append((name, res["ok"], res.get("reason", ""), time.perf_counter() - t0))
        print(f"{name}: {'ok' if res['ok'] else 'FAIL ' + res['reason']} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return _sweep_report(args, rows)


def _sweep_report(args, rows):
    ok = sum(1 for r in rows if r[1])
    tried = [r for r in rows if r[1] is not None]
    summary = (f"{args.sweep}: {ok}/{len(tried)} = {100 * ok / max(len(tried), 1):.1f}% pass "
               f"({len(rows) - len(tried)} of {len(rows)} names not counted: not buildable with "
               "default arguments, or over --max-params)")
    print("\n" + summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Pruning sweep: {args.sweep}\n\n{summary}\n\nCommand: `python "
                    f"bench/bench_pruning.py {' '.join(sys.argv[1:])}`"
                    "\n\n| model | result | reason | s |\n| --- | --- | --- | --- |\n")
            for name, good, reason, sec in rows:
                state = "not counted" if good is None else ("ok" if good else "FAIL")
                f.write(f"| {name} | {state} | {reason.replace('|', '/')} | {sec:.1f} |\n")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--latency", action="store_true")
    p.add_argument("--graph-time", action="store_true")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--sweep", choices=["torchvision", "timm", "hf"])
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--stride", type=int, default=1,
                   help="sweep every K-th model of the sorted list (a deterministic sample)")
    p.add_argument("--out", default="", help="write the sweep's table (markdown) here")
    p.add_argument("--max-params", type=float, default=0,
                   help="sweep: skip (and list) models above this many million parameters")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--image", type=int, default=160)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--batches", default="1,32", help="--latency: comma list of batch sizes")
    p.add_argument("--models", default="",
                   help="--latency: comma list of model name prefixes (default: all four); "
                        "--sweep: comma list of name patterns (fnmatch) to check, run in this order")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.graph_time:
        graph_time(args)
    if args.quality:
        quality(args)
    if args.latency:
        latency(args)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
