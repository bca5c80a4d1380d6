"""Sparse GEMV and sparse MLP kernels against the dense PyTorch baseline, same process.

    python bench/bench_sparse_gemv.py             # tables -> bench/results/sparse_gemv.md
    python bench/bench_sparse_gemv.py --quick     # fewer shapes and rounds
    python bench/bench_sparse_gemv.py --gather --no-gemv --no-mlp   # gather_gemv (listed rows)
    pytest bench/bench_sparse_gemv.py --benchmark-only    # pytest-benchmark view

Each kernel and its baseline run in interleaved rounds (bench/timing.py); weights are cycled
through enough copies to exceed the last-level cache and the activations change every call, as
in decoding, where each layer's weights come from memory. Sparsity s means a fraction s of the
input channels (sparse_gemv, per batch row) or of the neurons (sparse_mlp) is skipped; memory
traffic bounds the speed-up at 1/(1-s) for a batch of one.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastarch  # noqa: E402
from timing import copies_to_defeat_cache, interleaved, machine  # noqa: E402

GEMV_SHAPES = {  # name: (out, in); the MLP projections of Llama-3-8B and Llama-3.2-1B
    "14336x4096 (8B up/gate)": (14336, 4096),
    "4096x14336 (8B down)": (4096, 14336),
    "8192x2048 (1B up/gate)": (8192, 2048),
    "2048x8192 (1B down)": (2048, 8192),
    "4096x4096 (8B attn proj)": (4096, 4096),
}
MLP_SHAPES = {"Llama-3-8B MLP (4096, 14336)": (4096, 14336), "Llama-3.2-1B MLP (2048, 8192)": (2048, 8192)}
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEMV_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MLP_BATCHES = (1, 8)


def _thresholds(xs, s):
    """Per-call threshold that skips a fraction s of each x's channels (row-wise for batches:
    one threshold per call, taken over all rows, as a calibrated TEAL threshold is)."""
    if s <= 0:
        return [0.0] * len(xs)
    return [torch.quantile(x.float().abs().flatten(), s).item() for x in xs]


_WEIGHTS: dict = {}


def _gemv_weights(out_f, in_f, dtype):
    """Weight copies (both layouts) for one shape and dtype, made once per process."""
    key = (out_f, in_f, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        n = copies_to_defeat_cache(out_f * in_f * torch.finfo(dtype).bits // 8)
        ws = [(torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype) for _ in range(n)]
        _WEIGHTS[key] = (ws, [w.t().contiguous() for w in ws])
    return _WEIGHTS[key]


def _gemv_inputs(out_f, in_f, dtype, batch, sparsity):
    """The weight copies in both layouts, one input per copy and its threshold."""
    ws, wts = _gemv_weights(out_f, in_f, dtype)
    xs = [torch.randn(batch, in_f, dtype=dtype) for _ in range(len(ws))]
    return ws, wts, xs, _thresholds(xs, sparsity)


def _vs_dense(ws, xs, fast, rounds):
    """F.linear over the weight copies, interleaved with ``fast(k)`` on copy k."""
    n = len(ws)
    i = {"d": 0, "s": 0}

    def dense():
        i["d"] = (i["d"] + 1) % n
        return F.linear(xs[i["d"]], ws[i["d"]])

    def sparse():
        i["s"] = (i["s"] + 1) % n
        return fast(i["s"])

    with torch.no_grad():
        return interleaved({"dense": dense, "fastarch": sparse}, rounds=rounds)


def gemv_case(out_f, in_f, dtype, batch, sparsity, rounds):
    ws, wts, xs, ts = _gemv_inputs(out_f, in_f, dtype, batch, sparsity)
    res = _vs_dense(ws, xs, lambda k: fastarch.sparse_gemv(xs[k], wts[k], None, ts[k]), rounds)
    union = torch.stack([(x.abs() > t).any(0).float().mean() for x, t in zip(xs, ts)]).mean()
    return res, float(union)


def dense_copy_case(out_f, in_f, dtype, batch, sparsity, rounds, from_rows):
    """nn.Linear against SparseLinear with ``dense_copy`` (the measured crossover): the sparse
    kernel below ``from_rows`` rows, F.linear on the (out, in) copy from there on."""
    from fastarch.sparsity.modules import SparseLinear

    ws, wts, xs, ts = _gemv_inputs(out_f, in_f, dtype, batch, sparsity)
    mods = []
    for w, wt, t in zip(ws, wts, ts):  # share the bench's two layouts: no extra copies
        sl = SparseLinear.from_linear(torch.nn.Linear(1, 1, bias=False), t)
        sl.in_features, sl.out_features = in_f, out_f
        sl.weight = torch.nn.Parameter(wt.t(), requires_grad=False)
        if from_rows is not None:
            sl.dense_weight, sl.dense_from = w, from_rows
        mods.append(sl)
    return _vs_dense(ws, xs, lambda k: mods[k](xs[k]), rounds)


def mlp_case(hidden, inter, dtype, batch, sparsity, rounds):
    """Dense SwiGLU MLP vs sparse_mlp over a fixed core-neuron set (CoreInfer decode)."""
    key = ("mlp", hidden, inter, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        n = copies_to_defeat_cache(3 * hidden * inter * torch.finfo(dtype).bits // 8)
        mk = lambda *s: (torch.randn(*s) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        lays = [dict(g=mk(inter, hidden), u=mk(inter, hidden), d=mk(hidden, inter)) for _ in range(n)]
        for lay in lays:
            lay["dt"] = lay["d"].t().contiguous()
        _WEIGHTS[key] = lays
    layers = _WEIGHTS[key]
    n = len(layers)
    keep = max(1, int(round((1 - sparsity) * inter)))
    for lay in layers:
        lay["core"] = torch.randperm(inter)[:keep].sort().values
    xs = [torch.randn(batch, hidden, dtype=dtype) for _ in range(n)]
    i = {"d": 0, "s": 0}

    def dense():
        i["d"] = (i["d"] + 1) % n
        lay, x = layers[i["d"]], xs[i["d"]]
        return F.linear(F.silu(F.linear(x, lay["g"])) * F.linear(x, lay["u"]), lay["d"])

    def sparse():
        i["s"] = (i["s"] + 1) % n
        lay, x = layers[i["s"]], xs[i["s"]]
        return fastarch.sparse_mlp(x, lay["g"], lay["dt"], w_up=lay["u"], neuron_index=lay["core"],
                                   activation="silu")

    return interleaved({"dense": dense, "fastarch": sparse}, rounds=rounds)


GATHER_SHAPES = {"14336x4096 (8B up/gate)": (14336, 4096), "8192x2048 (1B up/gate)": (8192, 2048)}
GATHER_FRACTIONS = (1.0, 0.8, 0.5, 0.3)


def gather_case(out_f, in_f, dtype, batch, fraction, rounds):
    """F.linear over every row vs gather_gemv over a sorted random subset of the output rows
    (Deja Vu style: only the rows a predictor lists), weights in the (out, in) layout of both."""
    ws, _ = _gemv_weights(out_f, in_f, dtype)
    n = len(ws)
    xs = [torch.randn(batch, in_f, dtype=dtype) for _ in range(n)]
    keep = max(1, int(round(fraction * out_f)))
    idxs = [torch.randperm(out_f)[:keep].sort().values for _ in range(n)]
    i = {"d": 0, "s": 0}

    def dense():
        i["d"] = (i["d"] + 1) % n
        return F.linear(xs[i["d"]], ws[i["d"]])

    def gathered():
        i["s"] = (i["s"] + 1) % n
        k = i["s"]
        return fastarch.gather_gemv(xs[k], ws[k], idxs[k])

    return interleaved({"dense": dense, "fastarch": gathered}, rounds=rounds)


def _fmt_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparse_gemv.md"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of " + ",".join(DTYPES))
    ap.add_argument("--batches", default=",".join(map(str, GEMV_BATCHES)))
    ap.add_argument("--shapes", default=None,
                    help="comma list of sparse_gemv shapes OUTxIN (default: " + ", ".join(
                        f"{o}x{i}" for o, i in GEMV_SHAPES.values()) + ")")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--no-mlp", action="store_true", help="skip the sparse_mlp table")
    ap.add_argument("--no-gemv", action="store_true", help="skip the sparse_gemv table")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    ap.add_argument("--dense-copy", action="store_true",
                    help="add the SparseLinear(dense_copy=True) vs nn.Linear table (measured "
                         "crossover to an (out, in) copy for prefill-sized calls)")
    ap.add_argument("--gather", action="store_true",
                    help="add the gather_gemv table (listed output rows vs F.linear over all rows)")
    args = ap.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [float(x) for x in args.sparsities.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = args.rounds or (7 if args.quick else 15)
    gemv_shapes = dict(list(GEMV_SHAPES.items())[:2]) if args.quick else GEMV_SHAPES
    if args.shapes:
        by_size = {f"{o}x{i}": (n, (o, i)) for n, (o, i) in GEMV_SHAPES.items()}
        gemv_shapes = {}
        for key in args.shapes.split(","):
            if key in by_size:
                gemv_shapes[by_size[key][0]] = by_size[key][1]
            else:
                o, i = (int(v) for v in key.split("x"))
                gemv_shapes[key] = (o, i)
    table_shapes = gemv_shapes  # the dense_copy table's, even with --no-gemv
    if args.no_gemv:
        gemv_shapes = {}
    lines = [f"Machine: {machine()}", "",
             "### sparse_gemv vs F.linear (speed-up = dense time / fastarch time; limit 1/(1-s) at batch 1)", "",
             _fmt_row(["shape", "dtype", "batch", "dense ms"] + [f"s={s}" for s in sparsities]
                      + ["fraction of limit at s=0.5", "at s=0.9"]),
             _fmt_row(["---"] * (6 + len(sparsities)))]
    print("\n".join(lines), flush=True)
    for name, (o, i) in gemv_shapes.items():
        for dtype in dtypes:
            for batch in batches:
                cells, dense_ms, frac = [], None, {}
                for s in sparsities:
                    res, union = gemv_case(o, i, dtype, batch, s, rounds)
                    ratio = res["dense"] / res["fastarch"]
                    dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
                    cells.append(f"{ratio:.2f}x" + (f" (u={union:.2f})" if batch > 1 else ""))
                    frac[s] = ratio * (1.0 - s)  # share of the 1/(1-s) memory-traffic limit
                limits = [f"{frac[s]:.0%}" if batch == 1 and s in frac else "n/a" for s in (0.5, 0.9)]
                row = _fmt_row([name, str(dtype).split(".")[-1], batch, f"{dense_ms:.2f}"] + cells
                               + limits)
                lines.append(row)
                print(row, flush=True)
    lines += ["", "u = fraction of input channels active in at least one batch row (the union "
              "a batched call must read).", "",
              "### sparse_mlp (core neurons) vs the dense SwiGLU MLP", "",
              _fmt_row(["shape", "dtype", "batch", "dense ms"] + [f"s={s}" for s in sparsities]),
              _fmt_row(["---"] * (4 + len(sparsities)))]
    print("\n".join(lines[-4:]), flush=True)
    mlp_shapes = dict(list(MLP_SHAPES.items())[:1]) if args.quick else MLP_SHAPES
    if args.no_mlp:
        mlp_shapes = {}
    for name, (h, inter) in mlp_shapes.items():
        for dtype in dtypes:
            for batch in MLP_BATCHES:
                cells, dense_ms = [], None
                for s in sparsities:
                    res = mlp_case(h, inter, dtype, batch, s, max(5, rounds // 2))
                    dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
                    cells.append(f"{res['dense'] / res['fastarch']:.2f}x")
                row = _fmt_row([name, str(dtype).split(".")[-1], batch, f"{dense_ms:.2f}"] + cells)
                lines.append(row)
                print(row, flush=True)
    if args.dense_copy:
        from fastarch.sparsity.modules import dense_crossover

        lines += ["", "### SparseLinear with dense_copy=True vs nn.Linear (the sparse kernel below "
                  "the measured crossover, F.linear on an (out, in) copy from it)", "",
                  _fmt_row(["shape", "dtype", "dense from rows", "batch", "dense ms"]
                           + [f"s={s}" for s in sparsities]),
                  _fmt_row(["---"] * (5 + len(sparsities)))]
        print("\n".join(lines[-4:]), flush=True)
        for name, (o, i) in table_shapes.items():
            for dtype in dtypes:
                ws, _ = _gemv_weights(o, i, dtype)
                from_rows = dense_crossover(ws[0], 0.5)
                for batch in batches:
                    cells, dense_ms = [], None
                    for s in sparsities:
                        res = dense_copy_case(o, i, dtype, batch, s, rounds, from_rows)
                        dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
                        cells.append(f"{res['dense'] / res['fastarch']:.2f}x")
                    row = _fmt_row([name, str(dtype).split(".")[-1], str(from_rows), batch,
                                    f"{dense_ms:.2f}"] + cells)
                    lines.append(row)
                    print(row, flush=True)
    if args.gather:
        lines += ["", "### gather_gemv (only the listed output rows) vs F.linear over all rows", "",
                  _fmt_row(["shape", "dtype", "batch", "dense ms"]
                           + [f"rows={f:g}" for f in GATHER_FRACTIONS]),
                  _fmt_row(["---"] * (4 + len(GATHER_FRACTIONS)))]
        print("\n".join(lines[-4:]), flush=True)
        for name, (o, i) in GATHER_SHAPES.items():
            for dtype in dtypes:
                for batch in batches:
                    cells, dense_ms = [], None
                    for frac in GATHER_FRACTIONS:
                        res = gather_case(o, i, dtype, batch, frac, rounds)
                        dense_ms = res["dense"] * 1e3 if dense_ms is None else dense_ms
                        cells.append(f"{res['dense'] / res['fastarch']:.2f}x")
                    row = _fmt_row([name, str(dtype).split(".")[-1], batch, f"{dense_ms:.2f}"]
                                   + cells)
                    lines.append(row)
                    print(row, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n\nCommand: `python bench/bench_sparse_gemv.py "
                + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    return 0


# ---- pytest-benchmark view (pytest bench/bench_sparse_gemv.py --benchmark-only) --------------------
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("provider", ["torch", "fastarch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemv_1b_up(benchmark, provider, dtype, sparsity):
    o, i = GEMV_SHAPES["4096x4096 (8B attn proj)"]
    w = torch.randn(o, i, dtype=dtype)
    w_t = w.t().contiguous()
    x = torch.randn(1, i, dtype=dtype)
    t = _thresholds([x], sparsity)[0]
    if provider == "torch":
        benchmark(F.linear, x, w)
    else:
        benchmark(fastarch.sparse_gemv, x, w_t, None, t)


if __name__ == "__main__":
    sys.exit(main())
