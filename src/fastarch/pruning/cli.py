"""``fastarch prune``: structured, whole-block or N:M pruning of a zoo model, with a report.

The model is any name of ``fastarch.zoo`` (``resnet50``, ``timm/vit_small_patch16_224``,
``torchvision/mobilenet_v3_small``, ``transformers/llama`` ...), built with random weights and
no download. It is pruned on this machine's CPU with ``fastarch.prune``; the report gives
parameters and FLOPs before/after, what was removed, what could not be handled, and the
median latency of one forward pass before and after (batch 1, measured here).
"""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="structured / N:M pruning of a zoo model; prints what it removed and gained",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a fastarch.zoo name (timm, torchvision or transformers)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--ratio", type=float, default=None,
                     help="fraction of the units of every group to remove (default 0.3)")
    tgt.add_argument("--params", type=float, default=None, metavar="FRACTION",
                     help="fraction of the parameters to remove (searched)")
    tgt.add_argument("--flops", type=float, default=None, metavar="FRACTION",
                     help="fraction of the FLOPs to remove (searched)")
    tgt.add_argument("--latency", type=float, default=None, metavar="FRACTION",
                     help="fraction of the measured CPU latency to remove (searched)")
    p.add_argument("--criterion", default="l2",
                   choices=["l1", "l2", "taylor", "bn_scale", "activation", "random"],
                   help="importance score of a unit (default l2)")
    p.add_argument("--nm", default=None, choices=["2:4", "4:8"],
                   help="make every Linear N:M sparse instead of removing channels")
    p.add_argument("--blocks", type=_block_count, default=None, metavar="N",
                   help="remove N whole blocks (an int) or that fraction of them (e.g. 0.25) "
                        "first; alone it prunes depth only, with --ratio etc. width too")
    p.add_argument("--block-criterion", default="cosine", choices=["cosine", "magnitude"],
                   help="block score: cosine (block influence on the example input, default) "
                        "or magnitude (data-free)")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of this")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank units over all groups instead of per group")
    p.add_argument("--ignore", nargs="*", default=[], metavar="MODULE",
                   help="module names whose shapes must not change")
    p.add_argument("--no-fold-std-conv", dest="fold_std_conv", action="store_false",
                   help="leave timm's weight-standardised convs (BiT, NF-ResNets, NFNets) whole "
                        "instead of folding them into plain convs and pruning them")
    p.add_argument("--seq-len", type=int, default=32, help="tokens of the example input (text models)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="save the pruned model: a directory (save_pretrained) for transformers "
                        "models, else a file written with torch.save(model)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every removed group")
    p.set_defaults(func=run)


def _block_count(text: str):
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks: a count or a fraction, got {text!r}") from None
    if value < 0 or isinstance(value, float) and value >= 1:
        raise argparse.ArgumentTypeError(
            f"--blocks: a count >= 0 or a fraction in [0, 1), got {text!r}")
    return value


def _target(args) -> tuple[str, float]:
    for name in ("params", "flops", "latency"):
        value = getattr(args, name)
        if value is not None:
            return name, value
    default = 0.0 if getattr(args, "blocks", None) is not None else 0.3  # --blocks alone: depth
    return "ratio", default if args.ratio is None else args.ratio


def example_inputs(name: str, model, seq_len: int) -> tuple:
    """Positional example inputs for ``model`` (random, so that importance scores mean something)."""
    import torch

    from fastarch import zoo

    args, kwargs = zoo.example_inputs(name, model, device="cpu", seq_len=seq_len)
    kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    if args and kwargs or len(kwargs) > 1:
        raise SystemExit(f"fastarch prune: {name} needs several inputs "
                         f"({', '.join(kwargs)}); only single-input models are supported here")
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(x, torch.Tensor):
        raise SystemExit(f"fastarch prune: {name} takes a {type(x).__name__} input; "
                         "only tensor-input models are supported here")
    if x.is_floating_point():
        return (torch.randn_like(x),)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    return (torch.randint(0, vocab, x.shape),)


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _save(model, out: str) -> str:
    import torch

    if hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None:
        model.save_pretrained(out)
        return (f"saved to {out}/ (reload with fastarch.pruning.load_pruned({out!r}) or "
                "from_pretrained)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    torch.save(model, out)
    return f"saved to {out} (reload with torch.load({out!r}, weights_only=False))"


def run(args) -> int:
    import torch

    import fastarch
    from fastarch import zoo
    from fastarch.pruning.api import count_flops, count_params, measure_latency_ms

    target, value = _target(args)
    if not 0 <= value < 1:
        raise SystemExit(f"fastarch prune: --{target} must be in [0, 1), got {value}")
    if args.round_to < 1:
        raise SystemExit(f"fastarch prune: --round-to must be >= 1, got {args.round_to}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        full = zoo.resolve(args.model)
    except KeyError as exc:
        raise SystemExit(f"fastarch prune: {exc}") from None
    torch.manual_seed(args.seed)
    model = zoo.create(full, device="cpu").eval()
    inputs = example_inputs(full, model, args.seq_len)
    print(f"model: {full} (random weights), input {tuple(inputs[0].shape)}")

    params_before = count_params(model)
    flops_before = count_flops(model, inputs)
    lat_before = None if args.no_latency else measure_latency_ms(model, inputs, repeats=7)
    if args.nm:
        report = fastarch.prune(model, inputs, pattern=args.nm, importance=args.criterion,
                                ignore=args.ignore, blocks=args.blocks,
                                block_importance=args.block_criterion)
        what = f"N:M {args.nm} ({args.criterion})"
    else:
        report = fastarch.prune(model, inputs, ratio=value, importance=args.criterion,
                                target=target, ignore=args.ignore, round_to=args.round_to,
                                global_ranking=args.global_ranking, blocks=args.blocks,
                                block_importance=args.block_criterion,
                                fold_weight_standardization=args.fold_std_conv)
        what = f"{target} {value:g} ({args.criterion}" + (", global" if args.global_ranking
                                                         else "") + ")"
    if args.blocks is not None:
        depth = f"blocks {args.blocks:g} ({args.block_criterion})"
        depth_only = target == "ratio" and value == 0 and not args.nm
        what = depth if depth_only else f"{depth}, then {what}"
    params_after = count_params(model) if not args.nm else report.params_after
    flops_after = count_flops(model, inputs)
    lat_after = None if args.no_latency else measure_latency_ms(model, inputs, repeats=7)

    print(f"pruning: {what}, {report.total_seconds:.2f} s"
          + (f" (graph {report.graph_seconds:.2f} s)" if report.graph_seconds else ""))
    print(f"params  {_fmt(params_before):>9} -> {_fmt(params_after):>9} "
          f"({100 * (1 - params_after / max(params_before, 1)):.1f}% fewer"
          + (", counted as stored non-zeros" if args.nm else "") + ")")
    flop_note = ", N:M counted dense by torch's FLOP counter" if args.nm else ""
    print(f"FLOPs   {_fmt(flops_before):>9} -> {_fmt(flops_after):>9} "
          f"({100 * (1 - flops_after / max(flops_before, 1)):.1f}% fewer{flop_note})")
    if lat_before is not None:
        print(f"latency {lat_before:8.2f} ms -> {lat_after:8.2f} ms ({lat_before / lat_after:.2f}x, "
              f"batch 1, {torch.get_num_threads()} threads, this CPU)")
    kinds: dict[str, list[int]] = {}
    for r in report.removed:
        k = kinds.setdefault(r["kind"], [0, 0, 0])
        k[0] += 1
        k[1] += r["removed"]
        k[2] += r["before"]
    for kind, (groups, removed, before) in sorted(kinds.items()):
        print(f"removed {kind}: {removed:,} of {before:,} units in {groups} groups")
    if not report.removed:
        print("removed: nothing")
    if report.folded:
        print(f"folded: the weight standardisation of {report.folded} convs into plain convs "
              "(same inference output; fine-tuning the model now trains plain convs)")
    if args.verbose:
        for r in report.removed:
            print(f"  {r['removed']}/{r['before']} {r['group']}")
    for where, reason in report.skipped:
        print(f"not pruned: {where or '<model>'}: {reason}")
    if args.out:
        print(_save(model, args.out))
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="fastarch")
    add_parser(p.add_subparsers())
    a = p.parse_args(["prune"] + sys.argv[1:])
    sys.exit(a.func(a))
