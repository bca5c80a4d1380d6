"""Same-run timing for ratios: candidates are called in interleaved rounds (A B A B ...) so that
a change of machine load affects every candidate alike, and each reports its median."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 3,
                min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - start < min_time:
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        r += 1
    return {k: statistics.median(v) for k, v in times.items()}


def l3_bytes() -> int:
    """Size of the last-level cache (default 32 MiB when /sys does not say)."""
    try:
        base = "/sys/devices/system/cpu/cpu0/cache"
        sizes = []
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
            sizes.append(int(s.rstrip("KM")) * mult)
        return max(sizes)
    except (OSError, ValueError):
        return 32 << 20


def copies_to_defeat_cache(nbytes: int) -> int:
    """How many distinct copies of a weight to cycle through so that it never sits in cache."""
    return max(1, min(8, -(-4 * l3_bytes() // max(1, nbytes))))


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
