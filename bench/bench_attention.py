"""CPU benchmark of the block-sparse attention family (same-run ratios).

Providers on the same inputs (B=1, fp32 / bf16):
  sdpa-causal      F.scaled_dot_product_attention(is_causal=True)
  sdpa-mask        SDPA with the variant's mask as a dense bool tensor
  flex             torch.compile(flex_attention) with the variant's FlexAttention block mask
  fastarch         fastarch.block_sparse_attention with the variant's block mask
Reported: median time, fraction of tiles computed, block-mask build time, and the scaling
efficiency (time ratio against the ideal ratio of computed tiles, window vs causal).

    python bench/bench_attention.py                  # a few configs (minutes on 2 cores)
    python bench/bench_attention.py --full           # the whole S x H x D x dtype grid
    python bench/bench_attention.py --out bench/results/attention.md
    python bench/bench_attention.py --mask-builds --configs "4096,8,64,float32"   # build cost
    python bench/bench_attention.py --decode        # one query over a KV cache, GQA, vs SDPA
    python bench/bench_attention.py --model-decode  # a GQA Llama's decode steps, use_attention
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastarch
from fastarch.attention import (
    and_masks,
    causal,
    create_block_mask,
    document,
    fixed,
    from_function,
    global_local_random,
    sliding_window,
    strided,
)
from fastarch.attention.topk import KeyBlockSummary, topk_block_mask
from fastarch.ops.block_sparse_attention import dense_mask


def flex_provider(q, k, v, window):
    """Compiled FlexAttention with the same mask, or None when it is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask as flex_bm
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None

    def mod(b, h, qi, ki):
        ok = ki <= qi
        if window is not None:
            ok = ok & (qi - ki <= window)
        return ok

    s = q.shape[2]
    bm = flex_bm(mod, None, None, s, s, device="cpu")
    fa = torch.compile(flex_attention, fullgraph=True)
    try:
        fa(q, k, v, block_mask=bm)
    except Exception as exc:  # noqa: BLE001  (CPU flex needs a working inductor toolchain)
        print(f"  flex unavailable: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    return lambda: fa(q, k, v, block_mask=bm)


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 64 MiB where it reports none."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or (64 << 20)


class CacheState:
    """What each timed call finds in the caches, the same for every provider.

    hot:   the provider's own call, untimed, right before (its inputs and scratch are cached,
           as when Q / K / V come straight from the projections of a model)
    cold:  a write over twice the last-level cache (at most 1 GiB) right before
    order: nothing; each call finds what the provider before it left (until 2026-12-07 the
           only mode: a call after SDPA with a dense mask found nothing cached, the others
           their inputs)
    """

    def __init__(self, mode: str):
        if mode not in ("hot", "cold", "order"):
            raise ValueError(f"cache must be 'hot', 'cold' or 'order', got {mode!r}")
        self.mode = mode
        self.flush_buf = None
        if mode == "cold":
            n = min(2 * last_level_cache_bytes(), 1 << 30)
            self.flush_buf = torch.empty(n // 4, dtype=torch.float32)

    def before(self, fn) -> None:
        if self.mode == "hot":
            fn()
        elif self.mode == "cold":
            self.flush_buf.fill_(1.0)


def interleaved_median_ms(providers: dict, reps: int, cache: CacheState | None = None) -> dict:
    """Median time of each provider, the providers taking turns (one call each per round), so
    that a change in the machine's load hits all of them alike (the machine is shared), each
    timed call prepared by `cache` alike."""
    cache = cache or CacheState("order")
    for fn in providers.values():
        fn()  # warm-up
    times = {name: [] for name in providers}
    for _ in range(reps):
        for name, fn in providers.items():
            cache.before(fn)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def run_config(s, h, d, dtype, window, block_size, reps, with_flex, cache="hot"):
    q, k, v = (torch.randn(1, h, s, d, dtype=dtype) for _ in range(3))
    t0 = time.perf_counter()
    bm_c = create_block_mask(causal(), q_len=s, block_size=block_size, cache=False)
    build_c = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    bm_w = create_block_mask(sliding_window(window), q_len=s, block_size=block_size, cache=False)
    build_w = (time.perf_counter() - t0) * 1e3
    allowed = dense_mask(s, s, *bm_w.op_args(), block_size, 0, bm_w.window_left,
                         bm_w.window_right, 0)[0, 0]
    q1 = q[:, :, -1:].contiguous()  # decode: the newest query over the whole cache
    bm_d = create_block_mask(causal(), q_len=1, kv_len=s, q_offset=s - 1,
                             block_size=block_size)
    providers = {
        "sdpa-causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "fastarch-causal": lambda: fastarch.block_sparse_attention(q, k, v, bm_c),
        "sdpa-mask-window": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
        "fastarch-window": lambda: fastarch.block_sparse_attention(q, k, v, bm_w),
        "sdpa-decode": lambda: F.scaled_dot_product_attention(q1, k, v),
        "fastarch-decode": lambda: fastarch.block_sparse_attention(q1, k, v, bm_d),
    }
    if with_flex:
        f = flex_provider(q, k, v, window)
        if f is not None:
            providers["flex-window"] = f
    rows = interleaved_median_ms(providers, reps, CacheState(cache))
    frac_c, frac_w = bm_c.computed_fraction(), bm_w.computed_fraction()
    ideal = frac_c / frac_w
    got = rows["fastarch-causal"] / rows["fastarch-window"]
    return {
        "times": rows, "frac_causal": frac_c, "frac_window": frac_w,
        "build_causal_ms": build_c, "build_window_ms": build_w,
        "scaling_efficiency": got / ideal,
    }


def build_specs(s):
    """The masks whose uncached build is measured against one attention call with them."""
    def user(b, h, q, kv):  # the fixed pattern as a user function
        return (q // 128 == kv // 128) | (kv % 128 >= 120)

    lengths = [s // 2, s // 4, s - s // 2 - s // 4]
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))

    def window_fn(b, h, q, kv):  # sliding_window(255) as a user function
        return (kv <= q) & (q - kv <= 255)

    def documents_fn(b, h, q, kv):  # causal & document as a user function of a doc_ids tensor
        return (kv <= q) & (ids[q] == ids[kv])

    return {
        "causal & document (3 docs)": and_masks(causal(), document(lengths=lengths)),
        "global_local_random(64, r=2) (BigBird)": global_local_random(block=64, random_blocks=2),
        "strided(64)": strided(64),
        "strided(128, local=32)": strided(128, 32),
        "fixed(128, 8)": fixed(128, 8),
        "causal & user fn, period=128 given": and_masks(causal(), from_function(user,
                                                                                period=128)),
        "causal & user fn, no hint": and_masks(causal(), from_function(user)),
        "user fn: sliding window 256, no hint": from_function(window_fn),
        "user fn: causal & doc_ids[q] == doc_ids[kv], no hint": from_function(documents_fn),
    }


def run_mask_builds(s, h, d, dtype, block_size, reps):
    """Uncached block-mask build vs one attention call with that mask, interleaved."""
    q, k, v = (torch.randn(1, h, s, d, dtype=dtype) for _ in range(3))
    rows = []
    for name, spec in build_specs(s).items():
        bm = create_block_mask(spec, q_len=s, block_size=block_size, cache=False)
        t = interleaved_median_ms({
            "build": lambda spec=spec: create_block_mask(spec, q_len=s, block_size=block_size,
                                                         cache=False),
            "attention": lambda bm=bm: fastarch.block_sparse_attention(q, k, v, bm),
        }, reps)
        rows.append((name, t["build"], t["attention"], bm.computed_fraction()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--window", type=int, default=255, help="left window (keys before the query)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--cache", default="hot", choices=("hot", "cold", "order"),
                    help="what each timed call finds in the caches, alike for every provider: "
                         "its own inputs (hot: an untimed call right before), nothing (cold: a "
                         "write over twice the last-level cache), or whatever the provider "
                         "before it left (order)")
    ap.add_argument("--configs", default=None,
                    help="semicolon-separated S,H,D,dtype list, e.g. '8192,8,64,float32'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="append the table rows to --out")
    ap.add_argument("--mask-builds", action="store_true",
                    help="measure the uncached block-mask build of several masks against one "
                         "attention call with each (goal: build <= 10%% of the call)")
    ap.add_argument("--decode", action="store_true",
                    help="decode calls (one query over a KV cache) against SDPA, the grid of "
                         "--decode-configs")
    ap.add_argument("--decode-configs",
                    default="1024,8,8,64,bfloat16;4096,8,8,64,bfloat16;4096,32,8,128,bfloat16;"
                            "16384,32,8,128,bfloat16;4096,32,8,128,float32;"
                            "4096,32,8,128,float16",
                    help="semicolon-separated S,Hq,Hkv,D,dtype list for --decode")
    ap.add_argument("--model-decode", action="store_true",
                    help="decode steps of a Llama-shaped HF model with use_attention variants "
                         "against the original (SDPA)")
    ap.add_argument("--model-contexts", default="2048,8192")
    ap.add_argument("--model-steps", type=int, default=16)
    ap.add_argument("--model-dtype", default="bfloat16")
    ap.add_argument("--model-batch", type=int, default=1,
                    help="sequences per step; row i of a batch is left-padded by 7 i tokens "
                         "(a padding mask, as in batched generate)")
    ap.add_argument("--model-variants", default="causal;sliding_window:1024;topk:16")
    args = ap.parse_args(argv)
    shown_argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    if args.configs:
        grid = []
        for item in args.configs.split(";"):
            s_, h_, d_, dt_ = item.split(",")
            grid.append((int(s_), int(h_), int(d_), getattr(torch, dt_)))
    elif args.full:
        grid = [(s, h, d, dt) for s in (1024, 4096, 8192) for h in (8, 32) for d in (64, 128)
                for dt in (torch.float32, torch.bfloat16)]
    else:
        grid = [(1024, 8, 64, torch.float32), (4096, 8, 64, torch.float32),
                (4096, 8, 64, torch.bfloat16), (4096, 8, 128, torch.float32)]
    if args.mask_builds:
        return _mask_build_table(args, grid, shown_argv)
    if args.decode:
        return _decode_table(args, shown_argv)
    if args.model_decode:
        return _model_decode_table(args, shown_argv)
    lines = [
        "# Block-sparse attention, CPU",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
         f"torch {torch.__version__}, fastarch CPU capability "
         f"{fastarch.native.cpu_capability()}. B=1, window = {args.window + 1} keys "
         f"(sliding_window({args.window})), block {args.block_size}. Median of {args.reps} "
         f"interleaved runs, ms; caches before each timed call: {args.cache}."),
        "",
        f"Command: `python bench/bench_attention.py {' '.join(shown_argv)}`".rstrip(),
        "",
        ("| S | H | D | dtype | sdpa causal | fastarch causal | ratio | sdpa mask (window) "
         "| flex (window) | fastarch window | vs sdpa-causal | vs flex | tiles causal | "
         "tiles window | scaling eff. | mask build (ms, causal / window) "
         "| decode sdpa / fastarch |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, h, d, dt in grid:
        r = run_config(s, h, d, dt, args.window, args.block_size, args.reps, not args.no_flex,
                       args.cache)
        t = r["times"]
        flex_w = t.get("flex-window")
        row = (f"| {s} | {h} | {d} | {str(dt).replace('torch.', '')} | {t['sdpa-causal']:.1f} | "
               f"{t['fastarch-causal']:.1f} | {t['fastarch-causal'] / t['sdpa-causal']:.2f}x | "
               f"{t['sdpa-mask-window']:.1f} | {flex_w:.1f} | " if flex_w else
               f"| {s} | {h} | {d} | {str(dt).replace('torch.', '')} | {t['sdpa-causal']:.1f} | "
               f"{t['fastarch-causal']:.1f} | {t['fastarch-causal'] / t['sdpa-causal']:.2f}x | "
               f"{t['sdpa-mask-window']:.1f} | n/a | ")
        row += (f"{t['fastarch-window']:.1f} | "
                f"{t['sdpa-causal'] / t['fastarch-window']:.1f}x | "
                f"{(flex_w / t['fastarch-window']) if flex_w else float('nan'):.1f}x | "
                f"{r['frac_causal']:.3f} | {r['frac_window']:.3f} | "
                f"{r['scaling_efficiency']:.0%} | {r['build_causal_ms']:.2f} / "
                f"{r['build_window_ms']:.2f} | {t['sdpa-decode']:.2f} / "
                f"{t['fastarch-decode']:.2f} |")
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.out and args.append:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines[-len(grid):]) + "\n")
    elif args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return text


def run_model_decode(ctx, steps, variants, dtype, layers=4, hidden=1024, heads=16, kv_heads=4,
                     batch=1):
    """Decode steps of a Llama-shaped Hugging Face model (random weights) after a ``ctx``-token
    prompt: the original model (SDPA) and copies with ``fastarch.use_attention(copy, variant)``,
    each with its own KV cache, stepping in turns (one step each per round). With ``batch`` > 1
    row i is left-padded by 7 i tokens (an attention mask). Returns the median step time (ms) per
    model and in how many steps each copy's greedy tokens (all rows) equal the original's."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=1024,
                      max_position_embeddings=ctx + steps + 16)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval().to(dtype)
    models = {"original (sdpa)": base}
    for v in variants:
        m = copy.deepcopy(base)
        fastarch.use_attention(m, v)
        models[v] = m
    ids = torch.randint(1, cfg.vocab_size, (batch, ctx))
    mask = None
    if batch > 1:
        mask = torch.ones(batch, ctx, dtype=torch.long)
        for i in range(batch):
            mask[i, :7 * i] = 0
    state, times, tokens = {}, {n: [] for n in models}, {n: [] for n in models}
    with torch.no_grad():
        for name, m in models.items():
            out = m(ids, attention_mask=mask, use_cache=True)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1), mask)
        for _ in range(steps):
            for name, m in models.items():
                past, tok, am = state[name]
                if am is not None:
                    am = torch.cat([am, torch.ones(batch, 1, dtype=am.dtype)], dim=1)
                t0 = time.perf_counter()
                out = m(tok, past_key_values=past, attention_mask=am, use_cache=True)
                times[name].append(time.perf_counter() - t0)
                nxt = out.logits[:, -1:].argmax(-1)
                tokens[name].append(tuple(nxt.flatten().tolist()))
                state[name] = (out.past_key_values, nxt, am)
    ref = tokens["original (sdpa)"]
    return ({n: statistics.median(t) * 1e3 for n, t in times.items()},
            {n: sum(a == b for a, b in zip(t, ref)) for n, t in tokens.items()})


def _model_decode_table(args, shown_argv):
    variants = [v for v in args.model_variants.split(";") if v]
    dtype = getattr(torch, args.model_dtype)
    lines = [
        "",
        (f"Decode steps of a Llama-shaped model (4 layers, hidden 1024, 16 query / 4 KV heads, "
         f"D=64, random weights, {args.model_dtype}, batch {args.model_batch}"
         f"{' left-padded' if args.model_batch > 1 else ''}) after the prompt, median of "
         f"{args.model_steps} steps taken in turns: {platform.processor() or platform.machine()}"
         f", {args.threads} threads. Command: `python bench/bench_attention.py "
         f"{' '.join(shown_argv)}`"),
        "",
        "| prompt | model | ms / step | vs original | greedy tokens as the original's |",
        "|---|---|---|---|---|",
    ]
    for ctx in (int(c) for c in args.model_contexts.split(",")):
        ms, agree = run_model_decode(ctx, args.model_steps, variants, dtype,
                                     batch=args.model_batch)
        base = ms["original (sdpa)"]
        for name, t in ms.items():
            row = (f"| {ctx} | {name} | {t:.2f} | {base / t:.2f}x | {agree[name]} of "
                   f"{args.model_steps} |")
            print(row, flush=True)
            lines.append(row)
    return _write_table(args, lines)


def _write_table(args, lines) -> str:
    """The table's text, written to (or appended to, with --append) --out when given."""
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a" if args.append else "w") as fh:
            fh.write(text)
    return text


def run_decode(s, hq, hkv, d, dtype, reps, cache="hot"):
    """One query over a cache of s keys (decode): the kernel over the whole cache (causal), with
    a 1024-key sliding window and with the 16 best key blocks (top-k selection; its build from
    the cache's key summary timed apart), and SDPA (enable_gqa where hq != hkv)."""
    q = torch.randn(1, hq, 1, d, dtype=dtype)
    k, v = (torch.randn(1, hkv, s, d, dtype=dtype) for _ in range(2))
    bm_c = create_block_mask(causal(), q_len=1, kv_len=s, q_offset=s - 1, block_size=64)
    bm_w = create_block_mask(sliding_window(1023), q_len=1, kv_len=s, q_offset=s - 1,
                             block_size=64)
    # per head, alike within a GQA group; from the summary of the keys that a KV cache keeps
    # (KeyBlockSummary, extended as keys arrive), so the build timed is a decode step's
    summary = KeyBlockSummary.of(k, 64)
    bm_t = topk_block_mask(q, topk=16, block_size=64, summary=summary)
    providers = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv),
        "fastarch": lambda: fastarch.block_sparse_attention(q, k, v, bm_c),
        "fastarch-window": lambda: fastarch.block_sparse_attention(q, k, v, bm_w),
        "fastarch-topk": lambda: fastarch.block_sparse_attention(q, k, v, bm_t),
    }
    t0 = time.perf_counter()
    for _ in range(reps):
        topk_block_mask(q, topk=16, block_size=64, summary=summary)
    build_t = (time.perf_counter() - t0) / reps * 1e3
    times = interleaved_median_ms(providers, reps, CacheState(cache))
    return times, bm_w.computed_fraction(), bm_t.computed_fraction(), build_t


def _decode_table(args, shown_argv):
    grid = []
    for item in (args.decode_configs or "").split(";"):
        s_, hq_, hkv_, d_, dt_ = item.split(",")
        grid.append((int(s_), int(hq_), int(hkv_), int(d_), getattr(torch, dt_)))
    lines = [
        "",
        (f"Decode (one query over the cache): {platform.processor() or platform.machine()}, "
         f"{args.threads} threads, block 64, median of {args.reps} interleaved runs, ms; caches "
         f"before each timed call: {args.cache}. "
         f"Command: `python bench/bench_attention.py {' '.join(shown_argv)}`"),
        "",
        "| S | Hq | Hkv | D | dtype | sdpa | fastarch (all keys) | time vs sdpa | fastarch, window "
        "1024 | tiles window | fastarch, top-16 blocks | tiles top-k | top-k mask (one step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, hq, hkv, d, dt in grid:
        t, frac, frac_t, build_t = run_decode(s, hq, hkv, d, dt, args.reps, args.cache)
        row = (f"| {s} | {hq} | {hkv} | {d} | {str(dt).replace('torch.', '')} | {t['sdpa']:.3f} "
               f"| {t['fastarch']:.3f} | {t['fastarch'] / t['sdpa']:.2f}x | "
               f"{t['fastarch-window']:.3f} | {frac:.3f} | {t['fastarch-topk']:.3f} | "
               f"{frac_t:.3f} | {build_t:.3f} |")
        print(row, flush=True)
        lines.append(row)
    return _write_table(args, lines)


def _mask_build_table(args, grid, shown_argv):
    lines = [
        "",
        (f"Block-mask build (uncached) vs one attention call with the mask: "
         f"{platform.processor() or platform.machine()}, {args.threads} threads, block "
         f"{args.block_size}, median of {args.reps} interleaved runs, ms. "
         f"Command: `python bench/bench_attention.py {' '.join(shown_argv)}`"),
        "",
        "| S | H | D | dtype | mask | build (ms) | attention (ms) | build / attention | tiles |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, h, d, dt in grid:
        for name, tb, ta, frac in run_mask_builds(s, h, d, dt, args.block_size, args.reps):
            row = (f"| {s} | {h} | {d} | {str(dt).replace('torch.', '')} | {name} | {tb:.1f} | "
                   f"{ta:.1f} | {tb / ta:.1%} | {frac:.3f} |")
            print(row, flush=True)
            lines.append(row)
    return _write_table(args, lines)


if __name__ == "__main__":
    main()
