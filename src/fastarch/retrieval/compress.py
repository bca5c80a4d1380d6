"""Compression applied to a (retrieved) architecture: one plan, one report, measured here.

:func:`compress` applies a :class:`Plan` with the technique functions of fastarch
(``fastarch.prune``, ``fastarch.sparsify``, ``fastarch.use_attention``); a technique that is
not available or that cannot handle the model is reported (with the reason) and leaves the model
as it was. :func:`recommend` proposes the plan stored with the nearest retrieved architectures
that have one (recipes measured by ``bench/bench_retrieval.py --recipes``).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

__all__ = ["CompressionReport", "Plan", "compress", "load_recipes", "recipes_path", "recommend"]

_IMPORTANCE = ("l1", "l2", "taylor", "bn_scale", "activation", "random")
_SPARSITY_METHODS = ("teal", "coreinfer")


@dataclasses.dataclass
class Plan:
    """What to apply: structured pruning (``prune_ratio`` of channels/heads by
    ``prune_importance``), activation sparsity (``sparsity`` by ``sparsity_method``) and an
    attention variant (``attention``, a ``fastarch.use_attention`` variant name). Zero / None
    switches a technique off.

    ``Plan.parse("prune=0.3:l2,sparsity=0.5:teal,attention=sliding_window")`` reads the CLI form.
    """

    prune_ratio: float = 0.0
    prune_importance: str = "l2"
    sparsity: float = 0.0
    sparsity_method: str = "teal"
    attention: str | None = None

    def __post_init__(self):
        for field in ("prune_ratio", "sparsity"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"plan {field} must be a number in [0, 1), got {v!r}")
        if self.prune_importance not in _IMPORTANCE:
            raise ValueError(f"plan prune_importance must be one of {_IMPORTANCE}, "
                             f"got {self.prune_importance!r}")
        if self.sparsity_method not in _SPARSITY_METHODS:
            raise ValueError(f"plan sparsity_method must be one of {_SPARSITY_METHODS}, "
                             f"got {self.sparsity_method!r}")
        if self.attention is not None and not isinstance(self.attention, str):
            raise ValueError(f"plan attention must be a variant name or None, "
                             f"got {self.attention!r}")

    @classmethod
    def parse(cls, text: str) -> Plan:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("plan must be a non-empty string such as 'prune=0.3:l2,sparsity=0.5'")
        kw = {}
        for part in text.split(","):
            key, _, full = part.strip().partition("=")
            value, _, option = full.partition(":")
            try:
                if key == "prune":
                    kw["prune_ratio"] = float(value)
                    if option:
                        kw["prune_importance"] = option
                elif key == "sparsity":
                    kw["sparsity"] = float(value)
                    if option:
                        kw["sparsity_method"] = option
                elif key == "attention":
                    kw["attention"] = full or None  # variants take options: local:64
                else:
                    raise ValueError(f"plan: unknown item {key!r} (prune, sparsity, attention)")
            except ValueError as exc:
                raise ValueError(f"plan: cannot read {part.strip()!r}: {exc}") from exc
        return cls(**kw)

    @classmethod
    def of(cls, plan) -> Plan:
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, str):
            return cls.parse(plan)
        if isinstance(plan, dict):
            unknown = set(plan) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"plan has unknown keys {sorted(unknown)}")
            return cls(**plan)
        raise TypeError(f"plan must be a Plan, a dict or a string, got {type(plan).__name__}")

    def __str__(self):
        parts = []
        if self.prune_ratio:
            parts.append(f"prune={self.prune_ratio:g}:{self.prune_importance}")
        if self.sparsity:
            parts.append(f"sparsity={self.sparsity:g}:{self.sparsity_method}")
        if self.attention:
            parts.append(f"attention={self.attention}")
        return ",".join(parts) or "nothing"


@dataclasses.dataclass
class CompressionReport:
    """What :func:`compress` changed, with params, FLOPs and latency measured before and after
    on this device (median of ``repeats`` forward passes on the example inputs)."""

    plan: Plan
    steps: list = dataclasses.field(default_factory=list)  # (technique, status, detail)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    device: str = "cpu"

    @property
    def speedup(self) -> float | None:
        if self.latency_before_ms and self.latency_after_ms:
            return self.latency_before_ms / self.latency_after_ms
        return None

    def __str__(self):
        from fastarch.retrieval.graph import human

        lines = [f"fastarch.compress: plan {self.plan}",
                 f"  params {human(self.params_before)} -> {human(self.params_after)}, "
                 f"FLOPs {human(self.flops_before)} -> {human(self.flops_after)}"]
        if self.latency_before_ms is not None:
            lines.append(f"  latency on {self.device}: {self.latency_before_ms:.2f} ms -> "
                         f"{self.latency_after_ms:.2f} ms (x{self.speedup:.2f})")
        lines += [f"  {t:<10} {s:<8} {d}" for t, s, d in self.steps]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["plan"] = str(self.plan)
        return d


def _technique(name: str):
    """A fastarch technique function, or None when it is not available in this install."""
    import importlib

    import fastarch

    fn = getattr(fastarch, name, None)
    home = {"prune": "fastarch.pruning", "sparsify": "fastarch.sparsity",
            "use_attention": "fastarch.attention"}[name]
    if fn is None:
        try:
            fn = getattr(importlib.import_module(home), name, None)
        except ImportError:
            fn = None
    return fn


def _measure(model, args, kwargs, repeats):
    from fastarch.retrieval.graph import _FlopCounter, count_params

    counter = _FlopCounter()
    with torch.no_grad():
        with counter:
            model(*args, **kwargs)
        times = []
        for i in range(repeats + 3):
            t = time.perf_counter()
            model(*args, **kwargs)
            if i >= 3:  # three warm-up runs
                times.append((time.perf_counter() - t) * 1e3)
    return count_params(model), counter.total, statistics.median(times) if times else None


def compress(model: torch.nn.Module, plan, calib=None, example_inputs=None, *,
             measure: bool = True, repeats: int = 10):
    """Apply ``plan`` to ``model`` (in place) and measure it; returns ``(model, report)``.

    Args:
        model: any ``nn.Module`` on CPU (a zoo model: ``fastarch.zoo.create(name, "cpu")``).
        plan: a :class:`Plan`, a dict of its fields, or its string form
            (``"prune=0.3:l2,sparsity=0.5:teal,attention=sliding_window"``).
        calib: calibration batches for activation sparsity / activation-based pruning.
        example_inputs: a tensor, tuple or dict for one forward pass (guessed when omitted).
        measure: measure latency before and after (median of ``repeats`` passes).

    Each technique runs through its fastarch function; a technique that is missing from this
    install, or that reports the model as unsupported, is listed in ``report.steps`` with the
    reason, and the model keeps its previous state for that technique.

    Example:
        >>> model = fastarch.zoo.create("torchvision/resnet18", device="cpu")
        >>> model, report = fastarch.compress(model, "prune=0.3:l2")
        >>> print(report)
    """
    from fastarch.retrieval.retrieve import _guess_inputs

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = Plan.of(plan)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if device.type == "meta":
        raise ValueError("model is on the meta device: build it with device='cpu' to compress it")
    if example_inputs is None:
        guessed = _guess_inputs(model, device)
        if guessed is None:
            raise ValueError("example_inputs: none given and none could be guessed for this model")
        args, kwargs = guessed
        kwargs = {k: (v.normal_() if v.is_floating_point() else v)
                  if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        args = tuple(a.normal_() if a.is_floating_point() else a for a in args)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    model.eval()
    report = CompressionReport(plan, device=str(device))
    if measure:
        report.params_before, report.flops_before, report.latency_before_ms = _measure(
            model, args, kwargs, repeats)

    def step(name, fn_name, call):
        fn = _technique(fn_name)
        if fn is None:
            report.steps.append((name, "skipped", f"fastarch.{fn_name} is not available"))
            return
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = call(fn)
        except Exception as exc:  # noqa: BLE001  (reported, never raised past the plan)
            report.steps.append((name, "failed", f"{type(exc).__name__}: {exc}"[:300]))
            return
        unsupported = getattr(result, "unsupported", None) or getattr(result, "skipped", None)
        changed = getattr(result, "changed", None)
        if changed is None and hasattr(result, "params_after"):
            changed = bool(result.removed) if hasattr(result, "removed") else True
        status = "applied" if changed or changed is None else "skipped"
        detail = str(result).splitlines()[0] if result is not None else ""
        if unsupported:
            detail += f"; not handled: {unsupported[:3]}"
        if caught:
            detail += f"; warnings: {str(caught[0].message)[:120]}"
        report.steps.append((name, status, detail[:400]))

    if plan.prune_ratio:
        prune_args = args or tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        step("prune", "prune", lambda fn: fn(model, prune_args, ratio=plan.prune_ratio,
                                             importance=plan.prune_importance, calib=calib))
    if plan.sparsity:
        step("sparsity", "sparsify", lambda fn: fn(model, sparsity=plan.sparsity,
                                                    method=plan.sparsity_method, calib=calib))
    if plan.attention:
        step("attention", "use_attention", lambda fn: fn(model, plan.attention))
    if measure:
        try:
            report.params_after, report.flops_after, report.latency_after_ms = _measure(
                model, args, kwargs, repeats)
        except Exception as exc:  # noqa: BLE001
            report.steps.append(("measure", "failed", f"compressed model does not run: {exc}"))
    return model, report


def recipes_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "zoo_index_recipes.json"


def load_recipes(path=None) -> dict:
    """``{zoo name: {"plan": str, "measured": {...}}}``: plans that measured well (bench)."""
    path = Path(path) if path else recipes_path()
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def recommend(model, k: int = 20, index=None, recipes: dict | None = None):
    """The plan of the nearest retrieved architectures that have a measured recipe.

    ``model`` is anything :func:`fastarch.retrieve` accepts (a module, a zoo name). Returns
    ``(Plan, hit, recipe)`` for the best-ranked hit with a recipe (the model's own recipe first
    when it is a zoo name that has one), or ``None`` when none of the ``k`` nearest has one.

    Example:
        >>> plan, hit, recipe = fastarch.recommend(my_model)
        >>> model, report = fastarch.compress(my_model, plan)
    """
    from fastarch.retrieval.retrieve import retrieve

    recipes = load_recipes() if recipes is None else recipes
    if isinstance(model, str):
        from fastarch import zoo

        full = zoo.resolve(model)
        if full in recipes:
            from fastarch.retrieval.index import Hit

            own = Hit(full, full.split("/")[0], zoo.family(full), 1.0, 0, 0)
            return Plan.parse(recipes[full]["plan"]), own, recipes[full]
    for hit in retrieve(model, k=k, index=index):
        for name in (hit.name, *hit.duplicates):
            if name in recipes:
                return Plan.parse(recipes[name]["plan"]), hit, recipes[name]
    return None
