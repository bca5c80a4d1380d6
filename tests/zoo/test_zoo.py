"""fastarch.zoo: names, families and building without downloads."""
import socket

import pytest
import torch

import fastarch
from fastarch import zoo


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the zoo tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_names_cover_the_three_sources(no_network):
    names = zoo.names()
    assert len(names) == len(set(names))
    by_source = {s: zoo.names(s) for s in zoo.SOURCES}
    assert len(by_source["timm"]) > 1000
    assert len(by_source["torchvision"]) > 100
    assert len(by_source["transformers"]) > 400
    assert sum(map(len, by_source.values())) == len(names)
    assert all(n.split("/", 1)[0] in zoo.SOURCES for n in names)
    assert {"timm/resnet50", "torchvision/resnet50", "torchvision/fasterrcnn_resnet50_fpn",
            "transformers/llama", "transformers/bert"} <= set(names)


def test_names_leave_out_types_whose_default_config_does_not_build():
    from fastarch.retrieval.index import shipped_build_failures

    failures = set(shipped_build_failures())
    assert "transformers/autoformer" in failures  # needs prediction_length in its config
    assert not failures & set(zoo.names())
    with pytest.raises(RuntimeError, match="could not be built"):
        zoo.create("transformers/autoformer")


def test_names_rejects_unknown_source():
    with pytest.raises(ValueError, match="source"):
        zoo.names("keras")


@pytest.mark.parametrize("name,family", [
    ("timm/resnet50", "resnet"),
    ("timm/vit_tiny_patch16_224", "vision_transformer"),
    ("torchvision/resnet18", "resnet"),
    ("torchvision/quantized_resnet18", "resnet"),
    ("torchvision/fasterrcnn_resnet50_fpn", "detection.faster_rcnn"),
    ("torchvision/r3d_18", "video.resnet"),
    ("transformers/qwen2_moe", "qwen"),
    ("transformers/gpt_neox", "gpt"),
    ("transformers/t5", "t5"),
    ("transformers/wav2vec2-bert", "wav2vec"),
], ids=lambda v: v.replace("/", "-") if isinstance(v, str) else v)
def test_family(name, family):
    assert zoo.family(name) == family


def test_resolve_bare_and_prefixed_names():
    assert zoo.resolve("resnet50") == "timm/resnet50"  # timm first, then torchvision
    assert zoo.resolve("torchvision/resnet50") == "torchvision/resnet50"
    assert zoo.resolve("llama") == "transformers/llama"
    assert zoo.source("squeezenet1_0") == "torchvision"


def test_unknown_name_lists_close_names():
    with pytest.raises(KeyError, match="resnet50"):
        zoo.resolve("resnet5O")
    with pytest.raises(zoo.ZooError, match="not in the zoo"):
        zoo.create("timm/not_a_model")


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_name(bad):
    with pytest.raises(ValueError, match="name"):
        zoo.resolve(bad)


def test_bad_device():
    with pytest.raises(ValueError, match="device"):
        zoo.create("timm/resnet18", device="cuda:7")


@pytest.mark.parametrize("name", ["timm/resnet18", "torchvision/fasterrcnn_resnet50_fpn",
                                  "transformers/bert"],
                         ids=["timm-resnet18", "torchvision-fasterrcnn", "transformers-bert"])
def test_create_on_meta_allocates_nothing(name, no_network):
    model = zoo.create(name, device="meta")
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert not model.training


def test_fastarch_zoo_is_exported():
    assert fastarch.zoo.create is zoo.create


def test_create_on_cpu_runs_with_example_inputs(no_network):
    torch.manual_seed(0)
    model = zoo.create("torchvision/squeezenet1_1", device="cpu")
    args, kwargs = zoo.example_inputs("torchvision/squeezenet1_1", model, device="cpu")
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_transformers_example_inputs_disable_cache():
    model = zoo.create("transformers/bert", device="meta")
    args, kwargs = zoo.example_inputs("transformers/bert", model, device="meta", seq_len=8)
    assert args == () and kwargs["use_cache"] is False
    assert kwargs["input_ids"].shape == (1, 8) and kwargs["input_ids"].dtype == torch.long
