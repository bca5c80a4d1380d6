"""``fastarch bench``: run the microbenchmarks and the end-to-end comparison, write a markdown
report with PNG plots.

    fastarch bench                                   # every op and every model (long)
    fastarch bench --quick --ops sparse_gemv,attention
    fastarch bench --models resnet50,vit_tiny,bert,gpt2,llama --out /tmp/bench
"""
from __future__ import annotations

import argparse
import os
import sys

OP_NAMES = ("sparse_gemv", "sparsify", "attention", "pruning", "nm_linear", "retrieval",
            "compile")
MODEL_NAMES = ("resnet50", "vit_tiny", "bert", "gpt2", "llama", "mistral")
BACKEND_NAMES = ("eager", "inductor", "fastarch")


def _names(kind: str, choices: tuple[str, ...]):
    """argparse type: a comma-separated subset of ``choices`` (or "all"), in the given order."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad)) or '(empty list)'}; choose from "
                f"{', '.join(choices)} (comma-separated) or 'all'")
        return list(dict.fromkeys(items))

    parse.__name__ = f"{kind} list"
    return parse


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="run the benchmark suite and write a markdown report with plots",
        description="Run the microbenchmarks (CPU) and the end-to-end comparison eager vs "
        "torch.compile with Inductor vs with the fastarch backend, and write a markdown report "
        "(REPORT.md) with PNG plots. Without --ops or --models every op and every model runs.")
    p.add_argument("--ops", type=_names("op", OP_NAMES), default=None,
                   help=f"microbenchmarks to run: {', '.join(OP_NAMES)} or all (they need a "
                        "source checkout's bench/ folder)")
    p.add_argument("--models", type=_names("model", MODEL_NAMES), default=None,
                   help=f"end-to-end models: {', '.join(MODEL_NAMES)} or all (eager vs "
                        "torch.compile inductor vs fastarch, CPU)")
    p.add_argument("--backends", type=_names("backend", BACKEND_NAMES),
                   default=list(BACKEND_NAMES), help="end-to-end backends (default all three)")
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results in a source checkout, else "
                        "./fastarch-bench)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds (default: each benchmark's own)")
    p.add_argument("--seq", type=int, default=None, help="end to end: tokens per text input")
    p.add_argument("--image", type=int, default=None, help="end to end: image side")
    p.add_argument("--device", default="cpu",
                   help="end to end: cpu (default) or cuda (when a GPU is available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a shared machine, 1 avoids the large swings of "
                        "oversubscribed OpenMP threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def default_out_dir() -> str:
    from fastarch.benchmark.suite import find_bench_dir

    d = find_bench_dir()
    return str(d / "results") if d is not None else os.path.abspath("fastarch-bench")


def _progress(disabled: bool):
    from tqdm.auto import tqdm

    def wrap(it, desc=None, leave=True):
        return tqdm(it, desc=desc, leave=leave, disable=disabled, file=sys.stderr,
                    dynamic_ncols=True)

    return wrap


def run(args, argv: list[str] | None = None) -> int:
    from fastarch.benchmark import e2e, report, suite

    load_start = report.load_average()
    ops, models = args.ops, args.models
    if ops is None and models is None:
        ops, models = list(OP_NAMES), list(MODEL_NAMES)
    if args.rounds is not None and args.rounds < 1:
        print("fastarch bench: error: argument --rounds: must be >= 1", file=sys.stderr)
        return 2
    if models:
        try:
            e2e.check_device(args.device)
        except ValueError as exc:
            print(f"fastarch bench: error: argument --device: {exc}", file=sys.stderr)
            return 2
    if ops:
        try:
            suite.require_bench_dir()
        except suite.BenchUnavailable as exc:
            print(f"fastarch bench: error: argument --ops: {exc}", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = os.path.abspath(args.out or default_out_dir())
    os.makedirs(out_dir, exist_ok=True)
    progress = _progress(args.no_progress)
    opts = suite.RunOptions(quick=args.quick, out_dir=out_dir, rounds=args.rounds,
                            progress=progress)
    sections, failed = [], []
    for name in ops or []:
        try:
            sections.append(suite.OPS[name](opts))
        except Exception as exc:  # noqa: BLE001  (one failing op does not lose the others)
            failed.append(name)
            sections.append(report.Section(name, [f"## {name}: failed", "",
                                                  f"`{type(exc).__name__}: {exc}`"]))
    if models:
        results = e2e.run(models, args.backends, quick=args.quick, rounds=args.rounds,
                          seq=args.seq, image=args.image, progress=progress,
                          device=args.device)
        bars = {f"{b} vs eager": [r.speedup("eager", b) for r in results]
                for b in args.backends if b != "eager"}
        png = report.bar_plot(os.path.join(out_dir, "e2e_speedup.png"),
                              [r.name for r in results], bars, "speed-up over eager (x)",
                              f"torch.compile backends vs eager, {args.device}", hline=1.0)
        sections.append(report.Section("e2e", e2e.markdown(results, args.backends,
                                                           args.rounds, args.device), [png]))
        failed += [f"{r.name}/{b}" for r in results for b in r.errors
                   if "not registered" not in r.errors[b]]
    command = report.command_line(argv if argv is not None else _argv(args))
    path = report.write(out_dir, command, sections, load_start=load_start)
    print(f"report: {path}")
    for s in sections:
        for p in s.plots:
            print(f"plot: {p}")
    if failed:
        print(f"failed: {', '.join(failed)} (see the report)", file=sys.stderr)
        return 1
    return 0


def _argv(args) -> list[str]:
    """The command as typed (``fastarch bench ...``); rebuilt from the parsed options when the
    command was called from Python."""
    if sys.argv[1:2] == ["bench"]:
        return sys.argv[1:]
    out = ["bench"]
    for key in ("ops", "models"):
        if getattr(args, key):
            out += [f"--{key}", ",".join(getattr(args, key))]
    if args.backends != list(BACKEND_NAMES):
        out += ["--backends", ",".join(args.backends)]
    out += ["--quick"] if args.quick else []
    if args.device != "cpu":
        out += ["--device", args.device]
    for key in ("out", "rounds", "seq", "image", "threads"):
        if getattr(args, key) is not None:
            out += [f"--{key}", str(getattr(args, key))]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fastarch.benchmark.cli [options]``: the same as ``fastarch bench``."""
    parser = argparse.ArgumentParser(prog="fastarch")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["bench", *argv])
    return run(args, ["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
