"""Where the compile backend's attention rewrite pays: torch.ops.fastarch.sdpa vs SDPA with the
same mask (same-run, interleaved ratios).

For each mask (the shapes Hugging Face builds inside compiled models) and sequence length:
  sdpa          F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  (what Inductor runs)
  kernel+plan   the block-sparse path forced, the mask analysed on every call (one layer)
  kernel        the block-sparse path forced, the plan cached (every further layer sharing the
                mask, as in a model)
  dispatch      fastarch.sdpa with its default thresholds (what the backend gives you)
Ratios are SDPA time / candidate time (> 1 = faster than SDPA). The thresholds in
src/fastarch/compile/attention.py (MIN_PAIRS, MAX_FRACTION) come from this table: the dispatch
column must never fall clearly below 1.

    python bench/bench_compile.py --out bench/results/compile.md
    python bench/bench_compile.py --quick            # two lengths, fp32
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, machine  # noqa: E402

import fastarch.compile.attention as A  # noqa: E402


def masks(b: int, n: int) -> dict[str, torch.Tensor]:
    i = torch.arange(n)
    causal = i.view(-1, 1) >= i.view(1, -1)
    left = torch.ones(b, 1, 1, n, dtype=torch.bool)
    left[-1, ..., : n // 4] = False
    right = torch.ones(b, 1, 1, n, dtype=torch.bool)
    right[-1, ..., n // 2:] = False
    docs = i // max(1, n // 4)
    return {
        "causal + left pad 25%": causal & left,
        "sliding window 128": causal & (i.view(-1, 1) - i.view(1, -1) < 128),
        "4 documents, causal": causal & (docs.view(-1, 1) == docs.view(1, -1)),
        "key padding 50% (BERT)": right.expand(b, 1, n, n),
    }


def run(lengths, dtypes, b=2, h=8, d=64, rounds=7):
    rows = []
    for dtype in dtypes:
        for n in lengths:
            q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))
            for name, m in masks(b, n).items():
                plan = A.plan_attention(q, k, v, m, min_pairs=0, max_fraction=1.0, cache=False)
                default = A.plan_attention(q, k, v, m, cache=False)

                def forced(cache):
                    def f():
                        if not cache:
                            A._PLANS.clear()
                        p = A.plan_attention(q, k, v, m, min_pairs=0, max_fraction=1.0,
                                             cache=True)
                        bm = p.block_mask
                        if bm is None:
                            return F.scaled_dot_product_attention(q, k, v, m)
                        return torch.ops.fastarch.block_sparse_attention(
                            q, k, v, *bm.op_args(), None, None, bm.block_size, 0, -1, -1, 0,
                            d ** -0.5, 0.0)
                    return f

                def dispatch():
                    A._PLANS.clear()  # worst case: one layer per mask
                    return A.sdpa(q, k, v, m)

                t = interleaved({
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, m),
                    "kernel+plan": forced(False),
                    "kernel": forced(True),
                    "dispatch": dispatch,
                }, rounds=rounds, warmup=1)
                rows.append((str(dtype).replace("torch.", ""), n, name, plan.fraction,
                             default.kind, t))
                print(f"{rows[-1][0]:8s} {n:5d} {name:24s} tiles {plan.fraction:4.2f} "
                      f"sdpa {t['sdpa'] * 1e3:8.2f} ms  kernel+plan x{t['sdpa'] / t['kernel+plan']:.2f}"
                      f"  kernel x{t['sdpa'] / t['kernel']:.2f}  dispatch({default.kind}) "
                      f"x{t['sdpa'] / t['dispatch']:.2f}", flush=True)
    return rows


def markdown(rows, command: str) -> str:
    out = ["## Compile backend: the attention rewrite (fastarch.sdpa vs SDPA with the same mask)",
           "",
           f"Machine: {machine()}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
           f"Command: `{command}`",
           "",
           "B=2, H=8, D=64. Ratios: SDPA time / candidate time (> 1 = faster). `kernel+plan`: the "
           "mask analysed on the call (one layer); `kernel`: plan cached (further layers sharing "
           "the mask); `dispatch`: fastarch.sdpa with the default thresholds, plan not cached "
           f"(MIN_PAIRS={A.MIN_PAIRS}, MAX_FRACTION={A.MAX_FRACTION}).",
           "",
           "| dtype | L | mask | tiles visited | SDPA ms | kernel+plan | kernel | dispatch (path) |",
           "|---|---:|---|---:|---:|---:|---:|---|"]
    for dt, n, name, frac, kind, t in rows:
        out.append(f"| {dt} | {n} | {name} | {frac:.2f} | {t['sdpa'] * 1e3:.2f} | "
                   f"{t['sdpa'] / t['kernel+plan']:.2f}x | {t['sdpa'] / t['kernel']:.2f}x | "
                   f"{t['sdpa'] / t['dispatch']:.2f}x ({kind}) |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two lengths, fp32 only")
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    lengths = [256, 1024] if args.quick else [128, 256, 512, 1024, 2048]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = run(lengths, dtypes)
    md = markdown(rows, "python bench/bench_compile.py" + (" --quick" if args.quick else "")
                  + (f" --out {args.out}" if args.out else ""))
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
