"""``fastarch index build`` and ``fastarch retrieve QUERY -k 10``."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

__all__ = ["add_index_parser", "add_retrieve_parser", "zoo_build_order"]


def zoo_build_order(sources=None) -> list[str]:
    """Zoo names (all transformers model types, including those whose default config may not
    build, so that failures are recorded), interleaved across sources so that a partial build
    covers all three."""
    from fastarch import zoo

    sources = list(sources or zoo.SOURCES)
    lists = []
    for src in sources:
        if src == "transformers":
            lists.append([f"transformers/{t}" for t in zoo._all_model_names("transformers")])
        else:
            lists.append(zoo.names(src))
    return [n for group in itertools.zip_longest(*lists) for n in group if n]


def add_index_parser(subparsers):
    p = subparsers.add_parser("index", help="build the architecture index of the zoo")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    b = sub.add_parser("build", help="read every zoo architecture and write an index file "
                                     "(resumable: graphs are cached as they are read)")
    b.add_argument("--out", default="zoo_index.npz", help="index file to write")
    b.add_argument("--cache", default=None,
                   help="graph cache (JSON lines) read and appended; default OUT.graphs.jsonl")
    b.add_argument("--source", action="append", choices=("timm", "torchvision", "transformers"),
                   help="only these sources (repeatable)")
    b.add_argument("--names", nargs="+", help="only these zoo names")
    b.add_argument("--limit", type=int, default=None, help="only the first N names")
    b.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    b.add_argument("--time-limit", type=float, default=40.0,
                   help="seconds per model before it is recorded as failed (default 40)")
    b.add_argument("--nice", type=int, default=0, help="niceness of the workers")
    b.add_argument("--retry", default="",
                   help="read again cached models with these statuses, comma-separated "
                        "(failed, build_failed, partial, module_tree)")
    b.add_argument("--no-text", action="store_true", help="skip MiniLM text embeddings")
    b.add_argument("--settings", choices=("shipped", "default"), default="shipped",
                   help="search settings: 'shipped' (default) the block weights, powers and "
                        "text share the shipped index was tuned with, so the rebuilt index "
                        "searches as it does; 'default' every block weighted above 0 and no "
                        "powers or text fusion (an index to re-tune with bench_retrieval.py "
                        "--from-index: a block of weight 0 cannot be recovered)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_run_index_build)
    i = sub.add_parser("info", help="what an index file holds")
    i.add_argument("path", nargs="?", default=None, help="index file (default: the shipped one)")
    i.set_defaults(func=_run_index_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run_index_build(args) -> int:
    from fastarch import zoo
    from fastarch.retrieval.build import extract_all
    from fastarch.retrieval.index import ArchitectureIndex, shipped_settings

    if args.names:
        names = [zoo.resolve(n) for n in args.names]
    else:
        names = zoo_build_order(args.source)
    if args.limit is not None:
        if args.limit < 1:
            print("fastarch index build: --limit must be positive", file=sys.stderr)
            return 2
        names = names[: args.limit]
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".graphs.jsonl")
    records = extract_all(names, cache, jobs=args.jobs, time_limit=args.time_limit,
                          nice=args.nice, progress=not args.no_progress,
                          retry=tuple(s for s in args.retry.split(",") if s))
    wanted = set(names)
    records = {n: r for n, r in records.items() if n in wanted}
    settings = shipped_settings() if args.settings == "shipped" else {}
    index = ArchitectureIndex.from_records(records, text=not args.no_text,
                                           progress=not args.no_progress, **settings)
    index.save(out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB): {index.coverage()}; "
          f"{len(index.meta['failed'])} could not be read (graph cache: {cache}); "
          f"search settings: {args.settings}")
    return 0


def _run_index_info(args) -> int:
    from fastarch.retrieval.index import ArchitectureIndex, shipped_index_path

    path = Path(args.path) if args.path else shipped_index_path()
    index = ArchitectureIndex.load(path)
    print(f"{path}: format {index.meta['format_version']}, built {index.meta.get('created')}")
    print(index.coverage())
    return 0


def add_retrieve_parser(subparsers):
    p = subparsers.add_parser("retrieve", help="nearest zoo architectures to a name or a text")
    p.add_argument("query", nargs="+", help="a zoo name (timm/resnet50) or a description")
    p.add_argument("-k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--kind", choices=("auto", "name", "text"), default="auto")
    p.add_argument("--index", default=None, help="index file (default: the shipped one)")
    p.set_defaults(func=_run_retrieve)


def _run_retrieve(args) -> int:
    from fastarch.retrieval.index import ArchitectureIndex
    from fastarch.retrieval.retrieve import retrieve
    from fastarch.zoo import ZooError

    query = " ".join(args.query)
    try:
        index = ArchitectureIndex.load(args.index) if args.index else None
        hits = retrieve(query, k=args.k, kind=args.kind, index=index)
    except (ZooError, ValueError, FileNotFoundError) as exc:
        print(f"fastarch retrieve: {exc}", file=sys.stderr)
        return 2
    print(f"{'score':>6}  {'name':<52} {'family':<24} size")
    for h in hits:
        print(h)
    return 0


def add_compress_parser(subparsers):
    p = subparsers.add_parser(
        "compress", help="retrieve -> build -> compress -> measure -> save a zoo architecture")
    p.add_argument("query", nargs="+", help="a zoo name, or a description (its best hit is used)")
    p.add_argument("--plan", default="recommend",
                   help="e.g. 'prune=0.3:l2,sparsity=0.5:teal,attention=sliding_window', or "
                        "'recommend' (the recipe of the nearest architectures that have one)")
    p.add_argument("--out", default=None, help="save the compressed model here (torch.save)")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes")
    p.set_defaults(func=_run_compress)


def _run_compress(args) -> int:
    import json

    import torch

    from fastarch import zoo
    from fastarch.retrieval.compress import Plan, compress, recommend
    from fastarch.retrieval.retrieve import retrieve

    query = " ".join(args.query)
    try:
        if any(c.isspace() for c in query):
            name = retrieve(query, k=1)[0].name
            print(f"best match for {query!r}: {name}")
        else:
            name = zoo.resolve(query)
        if args.plan == "recommend":
            found = recommend(name)
            if found is None:
                print(f"fastarch compress: no recipe near {name}; give --plan", file=sys.stderr)
                return 2
            plan, hit, _ = found
            print(f"plan {plan} (recipe of {hit.name})")
        else:
            plan = Plan.parse(args.plan)
    except (KeyError, ValueError) as exc:
        print(f"fastarch compress: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = zoo.create(name, device="cpu")
    ex_args, ex_kwargs = zoo.example_inputs(name, model, device="cpu")
    example = ex_kwargs or ex_args
    model, report = compress(model, plan, example_inputs=example, repeats=args.repeats)
    print(report)
    if args.out:
        torch.save({"name": name, "model": model, "report": report.to_dict()}, args.out)
        Path(args.out).with_suffix(".json").write_text(json.dumps(report.to_dict(), indent=1))
        print(f"saved {args.out}")
    return 0
