"""nm_linear (2:4, 4:8) against dense F.linear on this CPU, batch 1 and 8, fp32 / bf16.

Run: ``python bench/bench_nm_linear.py`` (prints a markdown table). The memory-bound limit of an
n:m weight is m/n (plus the metadata byte per kept value); the table reports the ratio dense/nm.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from fastarch.ops.nm_linear import nm_compress, nm_linear


def median_ms(fn, repeats=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2048x2048,4096x4096,11008x4096")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| out x in | dtype | pattern | batch | F.linear ms | nm_linear ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(out_f, in_f).to(dtype)
            for n, m in ((2, 4), (4, 8)):
                v, i = nm_compress(w, n, m)
                for batch in (1, 8):
                    x = torch.randn(batch, in_f).to(dtype)
                    with torch.no_grad():
                        t_dense = median_ms(lambda x=x, w=w: F.linear(x, w))
                        t_nm = median_ms(lambda x=x, v=v, i=i, n=n, m=m: nm_linear(x, v, i, None, n, m))
                    print(f"| {shape} | {str(dtype)[6:]} | {n}:{m} | {batch} | {t_dense:.3f} | "
                          f"{t_nm:.3f} | {t_dense / t_nm:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
