"""The microbenchmark suite behind ``fastarch bench --ops``: each op runs the cases that
bench/bench_<op>.py defines and turns their figures into a report section and plots.

Where the code lives, and why: the cases (what is timed, on which inputs, against which
baseline) are defined once, in the source checkout's ``bench/`` scripts, which stay runnable on
their own (STYLE: benchmarks live outside the package). This module only chooses the grid
(``quick`` or full), collects the figures and draws them, so the two can never disagree. The
price: ``--ops`` needs the checkout's ``bench/`` folder (found next to an editable install, in
the working directory, or through ``FASTARCH_BENCH_DIR``) and says so clearly when it is
missing; the end-to-end comparison (``--models``, :mod:`fastarch.benchmark.e2e`) needs nothing
outside the package, so an installed wheel can run it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from fastarch.benchmark.report import Section, line_plot, table


class BenchUnavailable(RuntimeError):
    """The source checkout's bench/ folder, which the microbenchmarks need, was not found."""


def bench_dir_candidates() -> list[Path]:
    out = []
    if os.environ.get("FASTARCH_BENCH_DIR"):
        out.append(Path(os.environ["FASTARCH_BENCH_DIR"]))
    import fastarch

    out.append(Path(fastarch.__file__).resolve().parents[2] / "bench")  # src/fastarch -> root
    out.append(Path.cwd() / "bench")
    return out


def find_bench_dir() -> Path | None:
    """The checkout's bench/ folder (it holds timing.py), or None."""
    for d in bench_dir_candidates():
        if (d / "timing.py").is_file():
            return d.resolve()
    return None


def require_bench_dir() -> Path:
    d = find_bench_dir()
    if d is None:
        looked = ", ".join(str(p) for p in bench_dir_candidates())
        raise BenchUnavailable(
            "fastarch bench --ops runs the microbenchmarks of a fastarch source checkout's bench/ "
            f"folder, which was not found (looked in: {looked}). Run it from a checkout, or set "
            "FASTARCH_BENCH_DIR=/path/to/fastarch/bench. The end-to-end comparison "
            "(--models) needs no checkout.")
    return d


def bench_module(name: str):
    """Import bench/<name>.py (the scripts import their neighbours, e.g. ``timing``)."""
    d = str(require_bench_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    return importlib.import_module(name)


@dataclasses.dataclass
class RunOptions:
    quick: bool = False
    out_dir: str = "."
    rounds: int | None = None  # None: each op's default
    progress: Callable = lambda it, **kw: it  # tqdm-like wrapper


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- sparse GEMV / sparse MLP ------------------------------------------------------------------
def run_sparse_gemv(o: RunOptions) -> Section:
    m = bench_module("bench_sparse_gemv")
    if o.quick:
        shapes = {"2048x512": (2048, 512), "512x2048": (512, 2048)}
        mlp_shapes = {"MLP (256, 1024)": (256, 1024)}
        batches, rounds = (1,), o.rounds or 5
    else:
        shapes, mlp_shapes, rounds = m.GEMV_SHAPES, m.MLP_SHAPES, o.rounds or 15
        batches = getattr(m, "GEMV_BATCHES", (1, 8))
    mlp_batches = batches if o.quick else getattr(m, "MLP_BATCHES", (1, 8))
    sparsities = m.SPARSITIES
    dtypes = (torch.float32, torch.bfloat16)
    cases = [(n, s, dt, b) for n, s in shapes.items() for dt in dtypes for b in batches]
    rows, series = [], {}
    for name, (out_f, in_f), dtype, batch in o.progress(cases, desc="sparse_gemv"):
        ratios, dense_ms, union = [], None, None
        for s in sparsities:
            res, union = m.gemv_case(out_f, in_f, dtype, batch, s, rounds)
            dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
            ratios.append(res["dense"] / res["fastarch"])
        cells = [f"{r:.2f}x" + (f" (u={union:.2f})" if batch > 1 else "") for r in ratios]
        rows.append([name, _dt(dtype), batch, f"{dense_ms:.3f}"] + cells)
        series[f"{name} {_dt(dtype)} b{batch}"] = (list(sparsities), ratios)
    limit = [s for s in sparsities if s < 1]
    series["limit 1/(1-s), batch 1"] = (limit, [1 / (1 - s) for s in limit])
    mlp_rows = []
    mcases = [(n, s, dt, b) for n, s in mlp_shapes.items() for dt in dtypes for b in mlp_batches]
    for name, (h, inter), dtype, batch in o.progress(mcases, desc="sparse_mlp"):
        cells, dense_ms = [], None
        for s in sparsities:
            res = m.mlp_case(h, inter, dtype, batch, s, max(5, rounds // 2))
            dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
            cells.append(f"{res['dense'] / res['fastarch']:.2f}x")
        mlp_rows.append([name, _dt(dtype), batch, f"{dense_ms:.3f}"] + cells)
    png = line_plot(os.path.join(o.out_dir, "sparse_gemv_speedup.png"), series,
                    "activation sparsity s (fraction of input channels skipped)",
                    "speed-up over F.linear (x)", "sparse_gemv vs dense F.linear", hline=1.0)
    sp = [f"s={s}" for s in sparsities]
    lines = ["## Sparse GEMV and sparse MLP (bench/bench_sparse_gemv.py cases)", "",
             f"Speed-up = dense time / fastarch time, interleaved rounds={rounds}; weights cycled "
             "through enough copies to exceed the last-level cache. u = fraction of input "
             "channels active in at least one batch row.", ""]
    lines += table(["shape (out x in)", "dtype", "batch", "dense ms"] + sp, rows) + [""]
    lines += ["sparse_mlp (core neurons) vs the dense SwiGLU MLP:", ""]
    lines += table(["shape (hidden, inter)", "dtype", "batch", "dense ms"] + sp, mlp_rows)
    return Section("sparse_gemv", lines, [png])


# ---- block-sparse attention --------------------------------------------------------------------
ATTN_PROVIDERS = ("sdpa-causal", "fastarch-causal", "sdpa-mask-window", "fastarch-window",
                  "flex-window", "sdpa-decode", "fastarch-decode")


def run_attention(o: RunOptions) -> Section:
    m = bench_module("bench_attention")
    if o.quick:
        lengths, h, d, window, reps, flex = (256, 512, 1024), 2, 64, 127, o.rounds or 3, False
    else:
        lengths, h, d, window, reps, flex = (512, 1024, 2048, 4096, 8192), 8, 64, 255, \
            o.rounds or 5, True
    dtype, block = torch.float32, 64
    results = {}
    for s in o.progress(lengths, desc="attention"):
        results[s] = m.run_config(s, h, d, dtype, window, block, reps, flex)
    provs = [p for p in ATTN_PROVIDERS if any(p in r["times"] for r in results.values())]
    rows = []
    for s, r in results.items():
        t = r["times"]
        rows.append([s] + [f"{t[p]:.2f}" if p in t else "n/a" for p in provs]
                    + [f"{r['frac_causal']:.3f}", f"{r['frac_window']:.3f}",
                       f"{t['sdpa-causal'] / t['fastarch-window']:.2f}x"])
    series = {p: ([s for s in results if p in results[s]["times"]],
                  [results[s]["times"][p] for s in results if p in results[s]["times"]])
              for p in provs}
    png = line_plot(os.path.join(o.out_dir, "attention_seq_len.png"), series, "sequence length S",
                    "median ms per call", f"attention, B=1 H={h} D={d} fp32, window "
                    f"{window + 1} keys, block {block}", logx=True, logy=True)
    lines = ["## Block-sparse attention vs SDPA (bench/bench_attention.py cases)", "",
             f"B=1, H={h}, D={d}, float32, sliding window of {window + 1} keys, block {block}; "
             f"median ms of {reps} interleaved runs, each timed call right after an untimed "
             "one of its own. `decode`: one query over S keys. "
             + ("" if flex else "FlexAttention not run (quick: its compile takes minutes). "), ""]
    lines += table(["S"] + [f"{p} ms" for p in provs]
                   + ["tiles causal", "tiles window", "window vs sdpa-causal"], rows)
    return Section("attention", lines, [png])


# ---- structured pruning: latency vs MACs --------------------------------------------------------
def run_pruning(o: RunOptions) -> Section:
    m = bench_module("bench_pruning")
    if o.quick:
        import torchvision

        size, seq, batches, rounds, round_to = 64, 32, (1,), o.rounds or 3, 8
        models = {"resnet18": lambda: torchvision.models.resnet18(weights=None),
                  "llama-shaped (256 x 2 layers)": lambda: m._decoder(
                      hidden=256, layers=2, inter=688, heads=4, kv=2)}
    else:
        size, seq, batches, rounds, round_to = 160, 64, (1, 32), o.rounds or 5, 8
        models = m.latency_models(size)
    cases = [(n, f, b) for n, f in models.items() for b in batches]
    rows, series = [], {}
    for name, make, batch in o.progress(cases, desc="pruning"):
        r = m.latency_case(name, make, batch, size, seq, rounds, round_to)
        macs, ms = r["macs"], r["ms"]
        keys = ["dense"] + [k for k in macs if k != "dense"]
        series[f"{name} b{batch}"] = ([macs[k] / 1e9 for k in keys], [ms[k] for k in keys])
        for k in keys[1:]:
            mac_red, lat_red = 1 - macs[k] / macs["dense"], 1 - ms[k] / ms["dense"]
            rows.append([name, batch, f"{int(k * 100)}%", f"{macs['dense'] / 1e9:.3f}",
                         f"{macs[k] / 1e9:.3f}", f"{ms['dense']:.2f}", f"{ms[k]:.2f}",
                         f"{ms[k] / ms['dense']:.2f}", f"{lat_red / mac_red:.2f}"])
    png = line_plot(os.path.join(o.out_dir, "pruning_latency_vs_macs.png"), series,
                    "GMACs per forward (dense, pruned 30%, pruned 50%)", "median ms",
                    f"structured pruning: latency vs MACs (images {size}x{size}, seq {seq})",
                    logx=True, logy=True, logx_base=10)
    lines = ["## Structured pruning: latency vs MACs (bench/bench_pruning.py latency cases)", "",
             f"Dense and pruned copies timed in interleaved rounds ({rounds}); images "
             f"{size}x{size}, decoder sequence {seq}, round_to={round_to}. The last column is "
             "latency reduction / MAC reduction (1.0 = latency falls as fast as MACs).", ""]
    lines += table(["model", "batch", "pruned", "dense GMACs", "pruned GMACs", "dense ms",
                    "pruned ms", "latency ratio", "latency / MAC reduction"], rows)
    return Section("pruning", lines, [png])


# ---- N:M linear ---------------------------------------------------------------------------------
def run_nm_linear(o: RunOptions) -> Section:
    # the grid of bench/bench_nm_linear.py (its default --shapes), timed interleaved
    timing = bench_module("timing")
    import torch.nn.functional as F

    from fastarch.ops.nm_linear import nm_compress, nm_linear

    shapes = ["1024x1024"] if o.quick else ["2048x2048", "4096x4096", "11008x4096"]
    rounds = o.rounds or (5 if o.quick else 30)
    cases = [(sh, dt, nm, b) for sh in shapes for dt in (torch.float32, torch.bfloat16)
             for nm in ((2, 4), (4, 8)) for b in (1, 8)]
    rows = []
    for shape, dtype, (n, mm), batch in o.progress(cases, desc="nm_linear"):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = torch.randn(out_f, in_f).to(dtype)
        v, i = nm_compress(w, n, mm)
        x = torch.randn(batch, in_f).to(dtype)
        with torch.no_grad():
            t = timing.interleaved({"dense": lambda: F.linear(x, w),
                                    "nm": lambda: nm_linear(x, v, i, None, n, mm)}, rounds=rounds)
        rows.append([shape, _dt(dtype), f"{n}:{mm}", batch, f"{t['dense'] * 1e3:.3f}",
                     f"{t['nm'] * 1e3:.3f}", f"{t['dense'] / t['nm']:.2f}x"])
    lines = ["## N:M sparse linear vs F.linear (bench/bench_nm_linear.py grid)", "",
             f"Interleaved rounds={rounds} (the standalone script times each provider in turn). "
             "Memory-bound limit of an n:m weight: m/n plus the index metadata.", ""]
    lines += table(["out x in", "dtype", "pattern", "batch", "F.linear ms", "nm_linear ms",
                    "speed-up"], rows)
    return Section("nm_linear", lines)


# ---- activation sparsity end to end (bench_sparsify) -------------------------------------------
def run_sparsify(o: RunOptions) -> Section:
    m = bench_module("bench_sparsify")
    lines = ["## Activation sparsity on models (bench/bench_sparsify.py)", ""]
    steps = o.rounds or (8 if o.quick else 24)
    parts = [("MiniLM embedding quality", m.minilm_section),
             ("Llama decode", lambda: m.llama_section(o.quick, steps))]
    for label, fn in o.progress(parts, desc="sparsify"):
        try:
            lines += fn() + [""]
        except Exception as exc:  # noqa: BLE001  (e.g. the pretrained MiniLM is not installed)
            lines += [f"{label}: not run ({type(exc).__name__}: {str(exc)[:200]})", ""]
    if o.quick:
        lines.append("Quick: the Llama decoder is the 0.2B `--small` one.")
    return Section("sparsify", lines)


# ---- retrieval (shipped zoo index) -------------------------------------------------------------
def run_retrieval(o: RunOptions) -> Section:
    m = bench_module("bench_retrieval")
    from fastarch.retrieval.index import shipped_index

    index = shipped_index()
    ks = (20,) if o.quick else (20, 50, 100)
    steps = ["metrics", "latency"]
    met, lat = {}, {}
    for step in o.progress(steps, desc="retrieval"):
        if step == "metrics":
            met = m.loo_metrics(index, None, ks)
        else:
            lat = m.latency(index)
    keys = [k for k in met if k != "queries"]
    lines = ["## Architecture retrieval on the shipped zoo index (bench/bench_retrieval.py)", "",
             f"Leave-one-out family retrieval over {len(index)} distinct architectures "
             f"({met.get('queries', '?')} queries); query latency, median ms.", ""]
    lines += table(keys, [[f"{met[k]:.3f}" for k in keys]]) + [""]
    lines += table(["query", "median ms"], [[k, f"{v:.2f}"] for k, v in lat.items()])
    return Section("retrieval", lines)


# ---- compile backend attention dispatch --------------------------------------------------------
def run_compile(o: RunOptions) -> Section:
    m = bench_module("bench_compile")
    lengths = [128, 512] if o.quick else [128, 256, 512, 1024, 2048]
    dtypes = [torch.float32] if o.quick else [torch.float32, torch.bfloat16]
    rows = []
    for n in o.progress(lengths, desc="compile"):
        rows += m.run([n], dtypes, rounds=o.rounds or 7)
    text = m.markdown(rows, "fastarch bench --ops compile" + (" --quick" if o.quick else ""))
    return Section("compile", text.splitlines())


OPS: dict[str, Callable[[RunOptions], Section]] = {
    "sparse_gemv": run_sparse_gemv,
    "sparsify": run_sparsify,
    "attention": run_attention,
    "pruning": run_pruning,
    "nm_linear": run_nm_linear,
    "retrieval": run_retrieval,
    "compile": run_compile,
}
