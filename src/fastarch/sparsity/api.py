"""``fastarch.sparsify`` / ``fastarch.densify``: activation sparsity on a whole model."""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from fastarch.sparsity import adapters
from fastarch.sparsity.modules import CoreNeuronMLP, SparseLinear, dense_crossover
from fastarch.sparsity.teal import calibrate_thresholds, run_batch

METHODS = ("teal", "coreinfer")
SCOPES = ("mlp", "all")


@dataclasses.dataclass
class ModuleEntry:
    name: str
    kind: str  # "linear" (TEAL) or "mlp" (CoreInfer)
    threshold: float | None = None
    keep: int | None = None
    total: int | None = None
    calib_sparsity: float | None = None
    dense_from: int | None = None  # rows from which an (out, in) copy runs F.linear


@dataclasses.dataclass
class SparsityReport:
    """What :func:`sparsify` changed: the swapped modules with their thresholds or neuron
    budgets, the sparsity reached on the calibration data, and what it could not handle."""
    method: str
    sparsity: float
    scope: str
    model_type: str
    modules: list[ModuleEntry] = dataclasses.field(default_factory=list)
    unsupported: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    calibration: str = ""
    dense_copy_bytes: int = 0  # memory the (out, in) copies of dense_copy take

    @property
    def changed(self) -> bool:
        return bool(self.modules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"fastarch.sparsify: method={self.method} sparsity={self.sparsity:.2f} "
                 f"scope={self.scope} model_type={self.model_type} ({self.calibration})",
                 f"  {len(self.modules)} modules swapped"]
        for m in self.modules:
            if m.kind == "linear":
                cs = "" if m.calib_sparsity is None else f"  calib sparsity {m.calib_sparsity:.3f}"
                dc = "" if m.dense_from is None else f"  dense from {m.dense_from} rows"
                lines.append(f"  {m.name:50s} threshold {m.threshold:.4g}{cs}{dc}")
            else:
                lines.append(f"  {m.name:50s} core neurons {m.keep}/{m.total}")
        if self.dense_copy_bytes:
            lines.append(f"  dense copies for prefill-sized calls: {self.dense_copy_bytes / 2**20:.1f} MiB")
        for name, reason in self.unsupported:
            lines.append(f"  not changed: {name}: {reason}")
        return "\n".join(lines)


def _calib_list(calib) -> list:
    """calib as a list of batches; one tensor or one dict is one batch, not rows or keys."""
    if isinstance(calib, (torch.Tensor, dict)):
        return [calib]
    try:
        out = list(calib)
    except TypeError:
        raise TypeError("calib must be an iterable of batches (tensors, tuples or dicts of model "
                        f"inputs), got {type(calib).__name__}") from None
    if not out:
        raise ValueError("calib is empty: give at least one batch, or None for synthetic inputs")
    return out


def _default_calibration(model: nn.Module, kind: adapters.ModelKind, seed: int = 0):
    """Synthetic batches when the caller gives none (real text or images calibrate better)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if kind.family == "hf":
        vocab = int(getattr(model.config, "vocab_size", 1000))
        return [{"input_ids": torch.randint(0, vocab, (2, 64), generator=g).to(device)}
                for _ in range(4)]
    if kind.family == "timm":
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img is not None:  # built with another img_size than its pretrained config's
            size = (size[0], *(tuple(img) if isinstance(img, (tuple, list)) else (img, img)))
        return [torch.randn(2, *size, generator=g).to(device) for _ in range(2)]
    raise ValueError("calib is required for a model fastarch does not know")


def sparsify(model: nn.Module, sparsity: float = 0.5, method: str = "teal", calib=None,
             scope: str = "mlp", allow_unknown: bool = False, refine: int = 1,
             dense_copy: bool | int = False) -> SparsityReport:
    """Swap a model's linear layers (TEAL) or MLPs (CoreInfer) for sparse ones, in place.

    Args:
        model: a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma / GPT-2 / BERT model or a
            timm ViT (others: see ``allow_unknown``).
        sparsity: target fraction of skipped input channels (TEAL) or of skipped neurons
            (CoreInfer), in [0, 1).
        method: ``"teal"``: a calibrated magnitude threshold on the input of every linear layer in
            scope; ``"coreinfer"``: core neurons chosen from the prefill of each prompt and fixed
            while decoding (decoders only).
        calib: TEAL calibration batches (an iterable of dicts of model kwargs, tensors or tuples).
            None: synthetic random inputs, with a warning.
        scope: ``"mlp"`` (MLP linears) or ``"all"`` (every linear in the layer stack).
        allow_unknown: apply TEAL to the linears of the longest block list of a model type fastarch
            does not know, instead of reporting it and leaving it unchanged.
        refine: extra TEAL calibration passes run on the sparsified model, so that thresholds
            account for the sparsity of earlier layers.
        dense_copy: TEAL only. Calls with many rows (a prefill: tokens x batch) have a full union
            of active channels and gain nothing from skipping; where the dense GEMM on the
            usual ``(out, in)`` weight is faster than the sparse kernel on the input-major one
            (bf16 / fp16 on CPUs with AMX or AVX512-BF16 from a few rows on), an ``(out, in)``
            copy runs them as ``F.linear``. ``True``: the row count where dense starts to win is
            measured here once per weight shape and dtype, and a copy is kept only for layers
            where it wins by 128 rows; an int: a copy for every layer, used from that many rows.
            ``False`` (default): one copy of each weight, every call on the sparse kernel. The
            copies double those weights' memory (``report.dense_copy_bytes``).

    Returns:
        A :class:`SparsityReport`. The model is modified in place; :func:`densify` undoes it.

    Example:
        >>> report = fastarch.sparsify(model, sparsity=0.5, method="teal", calib=batches)
        >>> print(report)
        >>> fastarch.densify(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity) \
            or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(dense_copy, (bool, int)) or (not isinstance(dense_copy, bool) and dense_copy < 1):
        raise ValueError(f"dense_copy must be True, False or a row count >= 1, got {dense_copy!r}")
    if dense_copy is not False and method != "teal":
        raise ValueError("dense_copy applies to method='teal' (CoreInfer's prefill already runs "
                         "the dense modules)")
    kind = adapters.describe_model(model)
    report = SparsityReport(method, float(sparsity), scope, kind.model_type)
    if not kind.known and not (allow_unknown and method == "teal"):
        reason = (f"model type {kind.model_type!r} is not one fastarch knows "
                  "(Llama, Mistral, Qwen2/3, Gemma, GPT-2, BERT, timm ViT)")
        if method == "teal":
            reason += "; pass allow_unknown=True to sparsify the linears of its layer stack"
        report.unsupported.append(("<model>", reason))
        warnings.warn(f"fastarch.sparsify: {reason}; the model is left unchanged", stacklevel=2)
        return report
    if any(isinstance(m, (SparseLinear, CoreNeuronMLP)) for m in model.modules()):
        raise ValueError("model is already sparsified; call fastarch.densify(model) first")
    if method == "teal":
        _apply_teal(model, kind, sparsity, calib, scope, refine, report)
        if dense_copy is not False:
            _keep_dense_copies(model, report, sparsity, dense_copy)
    else:
        _apply_coreinfer(model, kind, sparsity, report)
    return report


def _apply_teal(model, kind, sparsity, calib, scope, refine, report):
    targets = dict(adapters.linear_modules(model, scope))
    if not targets:
        report.unsupported.append(("<model>", f"no linear layers found in scope {scope!r}"))
        warnings.warn("fastarch.sparsify: no linear layers in scope; model unchanged", stacklevel=3)
        return
    if calib is None:
        warnings.warn("fastarch.sparsify: no calib batches given; calibrating TEAL thresholds on "
                      "synthetic random inputs (pass real data for real thresholds)", stacklevel=3)
        calib = _default_calibration(model, kind)
        report.calibration = "synthetic calibration"
    else:
        calib = _calib_list(calib)
        report.calibration = f"{len(calib)} calibration batches"
    was_training = model.training
    model.eval()
    try:
        thresholds = calibrate_thresholds(model, targets, calib, sparsity)
        swapped = {}
        for name, mod in targets.items():
            sl = SparseLinear.from_linear(mod, thresholds[name])
            adapters.set_submodule(model, name, sl)
            swapped[name] = sl
        for _ in range(max(0, refine)):  # re-fit on the sparsified model
            thresholds = calibrate_thresholds(model, swapped, calib, sparsity)
            for name, sl in swapped.items():
                sl.threshold = thresholds[name]
        achieved = measure_sparsity(model, calib)
    finally:
        model.train(was_training)
    for name, sl in swapped.items():
        report.modules.append(ModuleEntry(name, "linear", threshold=sl.threshold,
                                          calib_sparsity=achieved.get(name)))


def _keep_dense_copies(model, report, sparsity, dense_copy) -> None:
    mods = dict(model.named_modules())
    for entry in report.modules:
        sl = mods.get(entry.name)
        if not isinstance(sl, SparseLinear):
            continue
        rows = dense_copy if dense_copy is not True else dense_crossover(sl.weight, sparsity)
        if rows is None:
            continue
        sl.keep_dense_copy(rows)
        entry.dense_from = rows
        report.dense_copy_bytes += sl.dense_weight.numel() * sl.dense_weight.element_size()


def _apply_coreinfer(model, kind, sparsity, report):
    if not kind.decoder:
        report.unsupported.append(("<model>", f"{kind.model_type} is an encoder: CoreInfer needs a "
                                   "prefill/decode split (use method='teal')"))
        warnings.warn("fastarch.sparsify: CoreInfer applies to decoders only; model unchanged",
                      stacklevel=3)
        return
    for name, mod, spec, reason in adapters.mlp_modules(model):
        if spec is None:
            report.unsupported.append((name, reason))
            continue
        core = CoreNeuronMLP(mod, spec, sparsity)
        adapters.set_submodule(model, name, core)
        report.modules.append(ModuleEntry(name, "mlp", keep=core.keep, total=core.inter))
    if not report.modules:
        warnings.warn("fastarch.sparsify: no MLP could be swapped; model unchanged", stacklevel=3)
        return
    if not any(h is _new_prompt for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_new_prompt, with_kwargs=True)
    report.calibration = "core neurons chosen at each prefill"


def _new_prompt(model, args, kwargs):
    """Before a call that starts a sequence (no KV cache, or an empty one), every CoreInfer MLP
    forgets the last prompt's core neurons: a one-token prompt then chooses its own."""
    past = kwargs.get("cache")  # transformers >= 5.2x; past_key_values before
    if past is None:
        past = kwargs.get("past_key_values")
    if past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0):
        for mod in model.modules():
            if isinstance(mod, CoreNeuronMLP):
                mod.reset()


@torch.no_grad()
def measure_sparsity(model: nn.Module, batches) -> dict[str, float]:
    """Fraction of input channels each SparseLinear skipped over ``batches`` (held-out data)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    for m in layers.values():
        m.track, m.seen, m.skipped = True, 0, 0
    try:
        for batch in batches:
            run_batch(model, batch)
    finally:
        for m in layers.values():
            m.track = False
    return {n: (m.skipped / m.seen if m.seen else float("nan")) for n, m in layers.items()}


def densify(model: nn.Module) -> int:
    """Undo :func:`sparsify` in place: every sparse module goes back to its dense original.
    Returns the number of modules restored."""
    restored = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseLinear):
            adapters.set_submodule(model, name, mod.to_dense())
            restored += 1
        elif isinstance(mod, CoreNeuronMLP):
            original = mod.original
            for child in (mod.spec.w_in, mod.spec.w_out):
                lin = getattr(original, child)
                lin.weight = nn.Parameter(lin.weight.detach().contiguous(),
                                          requires_grad=lin.weight.requires_grad)
            adapters.set_submodule(model, name, original)
            restored += 1
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _new_prompt:  # by identity: a deep copy's handle would point at the original
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return restored
