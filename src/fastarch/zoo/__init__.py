"""The architecture zoo: every timm model, every torchvision model and every Hugging Face
transformers model type, built with random weights and without any download.

Names are ``"<source>/<model>"``: ``"timm/resnet50"``, ``"torchvision/resnet50"``,
``"transformers/llama"``. A bare name (``"resnet50"``) resolves to the first source that has it,
in the order timm, torchvision, transformers.

Example:
    >>> import fastarch
    >>> "timm/resnet50" in fastarch.zoo.names()
    True
    >>> model = fastarch.zoo.create("timm/resnet18", device="meta")  # no memory, no download
    >>> fastarch.zoo.family("timm/resnet18")
    'resnet'
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings

import torch

SOURCES = ("timm", "torchvision", "transformers")
DEVICES = ("meta", "cpu")

__all__ = [
    "SOURCES",
    "ZooError",
    "create",
    "example_inputs",
    "family",
    "names",
    "resolve",
    "source",
]


class ZooError(KeyError):
    """An unknown or unbuildable zoo name (a KeyError whose message lists close names)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _offline():
    # Nothing in the zoo may touch the network: random weights only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.cache
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models())


@functools.cache
def _transformers_names() -> tuple[str, ...]:
    _offline()
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    types = sorted(MODEL_MAPPING_NAMES)
    broken = _known_unbuildable()
    return tuple(t for t in types if t not in broken)


def _known_unbuildable() -> set[str]:
    """Model types recorded as failing to build from their default config by the shipped index
    build (so that names() lists only the types whose default config builds)."""
    try:
        from fastarch.retrieval.index import shipped_build_failures
    except ImportError:
        return set()
    try:
        return {n.split("/", 1)[1] for n in shipped_build_failures() if n.startswith("transformers/")}
    except Exception:  # noqa: BLE001  (an unreadable shipped index must not break the zoo)
        return set()


def names(source: str | None = None) -> list[str]:
    """All zoo names (``"<source>/<model>"``), or only those of ``source``
    (``"timm"``, ``"torchvision"`` or ``"transformers"``). Lists, never downloads."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} or None, got {source!r}")
    out = []
    for src, fn in (("timm", _timm_names), ("torchvision", _torchvision_names),
                    ("transformers", _transformers_names)):
        if source in (None, src):
            out.extend(f"{src}/{n}" for n in fn())
    return out


def _all_model_names(src: str) -> tuple[str, ...]:
    if src == "transformers":
        _offline()
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        return tuple(sorted(MODEL_MAPPING_NAMES))
    return {"timm": _timm_names, "torchvision": _torchvision_names}[src]()


def resolve(name: str) -> str:
    """The full ``"<source>/<model>"`` name of ``name``; raises :class:`ZooError` (a KeyError)
    with close matches when it is not in the zoo."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    name = name.strip()
    if "/" in name:
        src, model = name.split("/", 1)
        if src in SOURCES:
            if model in _all_model_names(src):
                return f"{src}/{model}"
            raise ZooError(_unknown_message(name))
    for src in SOURCES:
        if name in _all_model_names(src):
            return f"{src}/{name}"
    raise ZooError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    import difflib

    bare = name.split("/", 1)[-1]
    pool = {}
    for src in SOURCES:
        for n in _all_model_names(src):
            pool.setdefault(n, f"{src}/{n}")
    close = difflib.get_close_matches(bare, list(pool), n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(pool[c] for c in close)}" if close else ""
    return f"name {name!r} is not in the zoo (timm, torchvision, transformers){hint}"


def source(name: str) -> str:
    """``"timm"``, ``"torchvision"`` or ``"transformers"``."""
    return resolve(name).split("/", 1)[0]


def family(name: str) -> str:
    """The architecture family used as relevance in retrieval benchmarks, never derived from
    similarity of names: the timm module that defines the model (``"resnet"``,
    ``"vision_transformer"``), the torchvision builder module (``"resnet"``, ``"video.resnet"``,
    ``"detection.faster_rcnn"``; quantized builders join their float family), and for
    transformers the model type stripped of its version and variant suffixes
    (``"qwen2_moe"`` -> ``"qwen"``, ``"gpt_neox"`` -> ``"gpt"``)."""
    full = resolve(name)
    src, model = full.split("/", 1)
    if src == "timm":
        import timm.models

        entry = timm.models.model_entrypoint(model)
        return entry.__module__.rsplit(".", 1)[-1].lstrip("_")
    if src == "torchvision":
        import torchvision

        mod = torchvision.models.get_model_builder(model).__module__
        mod = mod.removeprefix("torchvision.models.").removeprefix("quantization.")
        return mod
    return transformers_family(model)


def transformers_family(model_type: str) -> str:
    """Family of a Hugging Face model type: its first word without a trailing version number
    (``"qwen2_moe"`` -> ``"qwen"``, ``"wav2vec2_bert"`` -> ``"wav2vec"``, ``"t5"`` stays)."""
    word = re.split(r"[_\-]", model_type.lower())[0]
    stem = re.sub(r"(v?\d+(\.\d+)?)+$", "", word)
    return stem if len(stem) > 2 else word


# ---------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            old = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except ImportError:
            hf_logging = None
        try:
            yield
        finally:
            if hf_logging is not None:
                hf_logging.set_verbosity(old)


def hf_config(model_type: str):
    """The default config of a transformers model type (no download)."""
    _offline()
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


@contextlib.contextmanager
def _parameters_on_meta():
    """Builders that compute with tensors while building (e.g. torchvision RegNet's width
    schedule) cannot run under ``torch.device("meta")``; instead, build on CPU and move each
    parameter and buffer to meta as it is registered, so that no weight is allocated or
    initialised."""
    register_parameter = torch.nn.Module.register_parameter
    register_buffer = torch.nn.Module.register_buffer

    def parameter_to_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return register_parameter(module, name, param)

    def buffer_to_meta(module, name, tensor, persistent=True):
        if tensor is not None:
            tensor = tensor.to("meta")
        return register_buffer(module, name, tensor, persistent)

    torch.nn.Module.register_parameter = parameter_to_meta
    torch.nn.Module.register_buffer = buffer_to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter
        torch.nn.Module.register_buffer = register_buffer


def create(name: str, device: str = "meta", **kwargs) -> torch.nn.Module:
    """Build zoo model ``name`` with random weights, in eval mode, without any download.

    ``device="meta"`` (default) allocates nothing: parameters have shapes only, which is what
    graph extraction and parameter counting need; ``device="cpu"`` gives a runnable model.
    Detection and segmentation builders get ``weights_backbone=None``. Extra ``kwargs`` go to
    the builder (e.g. ``num_classes``).

    Example:
        >>> m = fastarch.zoo.create("torchvision/resnet18", device="cpu")
        >>> m(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    full = resolve(name)
    src, model = full.split("/", 1)
    _offline()
    try:
        try:
            return _build(src, model, device, kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            if device != "meta" or "meta" not in str(exc):
                raise
            with _parameters_on_meta():
                return _build(src, model, "cpu", kwargs)
    except ZooError:
        raise
    except Exception as exc:
        raise RuntimeError(f"zoo model {full!r} could not be built on {device}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _build(src, model, device, kwargs):
    """Run the builder of ``src`` with every tensor created on ``device``."""
    kwargs = dict(kwargs)
    with _quiet(), torch.device(device):
        if src == "timm":
            import timm

            m = timm.create_model(model, pretrained=False, **kwargs)
        elif src == "torchvision":
            import inspect

            import torchvision

            builder = torchvision.models.get_model_builder(model)
            params = inspect.signature(builder).parameters
            if "weights_backbone" in params:
                kwargs.setdefault("weights_backbone", None)
            m = builder(weights=None, **kwargs)
        else:
            from transformers import AutoModel

            config = hf_config(model)
            for key, value in kwargs.items():
                setattr(config, key, value)
            if hasattr(config, "use_cache"):
                config.use_cache = False
            m = AutoModel.from_config(config)
    return m.eval()


def example_inputs(name: str, model: torch.nn.Module | None = None, device: str = "meta",
                   seq_len: int = 16):
    """``(args, kwargs)`` for one forward pass of zoo model ``name`` (batch 1): the timm default
    input size, 224x224 images for torchvision (video clips, image pairs for optical flow,
    a list of images for detection), ``seq_len`` tokens or the model's main input for
    transformers (``use_cache=False``)."""
    full = resolve(name)
    src, model_name = full.split("/", 1)
    dev = torch.device(device)
    if src == "timm":
        import timm

        cfg = getattr(model, "pretrained_cfg", None) or timm.models.get_pretrained_cfg(model_name)
        size = tuple(getattr(cfg, "input_size", None) or cfg.get("input_size", (3, 224, 224))) \
            if cfg is not None else (3, 224, 224)
        return (torch.zeros(1, *size, device=dev),), {}
    if src == "torchvision":
        fam = family(full)
        if fam.startswith("video."):
            return (torch.zeros(1, 3, 16, 112, 112, device=dev),), {}
        if fam.startswith("optical_flow."):
            img = torch.zeros(1, 3, 128, 128, device=dev)
            return (img, img.clone()), {}
        if fam.startswith("detection."):
            return ([torch.zeros(3, 224, 224, device=dev)],), {}
        size = 299 if "inception" in fam else 224
        return (torch.zeros(1, 3, size, size, device=dev),), {}
    return (), _hf_inputs(model_name, model, dev, seq_len)


def _hf_inputs(model_type, model, dev, seq_len):
    config = model.config if model is not None else hf_config(model_type)
    main = getattr(model, "main_input_name", "input_ids") if model is not None else "input_ids"

    def sub(attr, default):
        for c in (config, getattr(config, "vision_config", None), getattr(config, "encoder", None),
                  getattr(config, "audio_config", None), getattr(config, "text_config", None)):
            if c is not None and getattr(c, attr, None) not in (None, 0):
                return getattr(c, attr)
        return default

    kwargs = {}
    if main == "pixel_values":
        size = sub("image_size", 224)
        if isinstance(size, (list, tuple)):
            size = tuple(int(s) for s in size[-2:])
        elif isinstance(size, dict):
            size = (int(size.get("height", 224)), int(size.get("width", 224)))
        else:
            size = (int(size), int(size))
        kwargs[main] = torch.zeros(1, int(sub("num_channels", 3)), *size, device=dev)
    elif main == "input_values":
        kwargs[main] = torch.zeros(1, 16000, device=dev)
    elif main == "input_features":
        kwargs[main] = torch.zeros(1, int(sub("num_mel_bins", 80)), 3000, device=dev)
    else:
        kwargs[main] = torch.zeros(1, seq_len, dtype=torch.long, device=dev)
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.zeros(1, 8, dtype=torch.long, device=dev)
    kwargs["use_cache"] = False
    return kwargs
