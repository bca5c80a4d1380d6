"""Module queries: a model with real weights is read on meta stand-ins (same graph as its own
forward, nothing computed), and a description already in the index reuses its stored text
embedding instead of running MiniLM again."""
import copy

import numpy as np
import pytest
import torch

from fastarch.retrieval.graph import extract_graph
from fastarch.retrieval.retrieve import _graph_on_meta, graph_of_module


def _same_graph(a, b):
    assert a.method == b.method == "trace"
    assert a.labels == b.labels and a.edges == b.edges and a.dims == b.dims
    assert (a.params, a.flops, a.width, a.input_kind) == (b.params, b.flops, b.width,
                                                          b.input_kind)


def test_cpu_model_is_read_on_meta_as_on_its_own_device():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = model.conv1.weight.detach().clone()
    x = torch.randn(1, 3, 224, 224)
    g = graph_of_module(model)
    assert model.conv1.weight.device.type == "cpu" and torch.equal(model.conv1.weight, before)
    _same_graph(g, extract_graph(model, (x,)))  # the real forward on CPU
    with torch.device("meta"):
        on_meta = torchvision.models.resnet18().eval()
    _same_graph(g, extract_graph(on_meta, (x.to("meta"),)))  # how the index rows are read


def test_hf_model_is_read_on_meta_as_on_its_own_device():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(config).eval()
    with torch.device("meta"):
        on_meta = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (1, 16))
    # the index rows are read from models built on meta: the stand-ins give their graph
    # (FLOPs included: on CPU, SDPA runs another kernel, which torch's counter sizes otherwise)
    _same_graph(_graph_on_meta(model, (), {"input_ids": ids}, 60),
                extract_graph(on_meta, (), {"input_ids": ids.to("meta")}))
    real = extract_graph(model, (), {"input_ids": ids})
    assert real.labels == on_meta_labels(on_meta, ids)


def on_meta_labels(model, ids):
    return extract_graph(model, (), {"input_ids": ids.to("meta")}).labels


def test_meta_reading_gives_way_when_the_forward_needs_values():
    class ReadsValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.table = torch.ones(8)  # neither a parameter nor a buffer: stays on CPU

        def forward(self, x):
            return self.lin(x) * self.table

    model = ReadsValues()
    assert _graph_on_meta(model, (torch.randn(1, 8),), {}, 60) is None
    g = graph_of_module(model)  # read on its own device instead
    assert g.method == "trace" and "linear" in g.labels


@pytest.fixture
def text_fused_index(small_text_index):
    """The small index with its text fused at 0.3 into the search vectors, as the shipped one
    does (its own copy of the feature space: the shared fixture is left as it is)."""
    from fastarch.retrieval.index import ArchitectureIndex

    space = copy.copy(small_text_index.space)
    space.text_weight = 0.3
    return ArchitectureIndex(small_text_index.entries, small_text_index.emb,
                             small_text_index.text, space, small_text_index.meta)


def test_known_description_reuses_the_stored_text(text_fused_index, small_records, monkeypatch):
    from fastarch.retrieval import describe as describe_mod
    from fastarch.retrieval.graph import OpGraph

    idx = text_fused_index
    calls = []
    real = describe_mod.embed_texts
    monkeypatch.setattr(describe_mod, "embed_texts",
                        lambda t, **kw: calls.append(t) or real(t, **kw))
    name = "torchvision/resnet50"
    row = idx.row_of[name]
    q = idx.query_vector(OpGraph.from_dict(small_records[name]))
    assert not calls
    np.testing.assert_allclose(q, idx.search[row], atol=1e-6)
    # a graph whose description is not in the index goes through MiniLM
    g = OpGraph.from_dict(small_records[name])
    g.params *= 3  # another size word and count in the description
    q2 = idx.query_vector(g)
    assert len(calls) == 1 and float(q2 @ idx.search[row]) > 0.9


def _record_guesses(monkeypatch):
    import importlib

    retrieve_mod = importlib.import_module("fastarch.retrieval.retrieve")  # not the function
    devices = []
    real = retrieve_mod._guess_inputs

    def guess(model, device):
        devices.append(torch.device(device).type)
        return real(model, device)

    monkeypatch.setattr(retrieve_mod, "_guess_inputs", guess)
    return devices


def test_guessed_inputs_of_a_cpu_model_are_made_on_meta(monkeypatch):
    devices = _record_guesses(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU())
    g = graph_of_module(model)
    assert devices == ["meta"]  # no 1x3x224x224 CPU tensor filled for a reading on meta
    _same_graph(g, extract_graph(model.eval(), (torch.zeros(1, 3, 224, 224),)))


def test_guessed_inputs_are_made_on_the_models_device_when_meta_gives_way(monkeypatch):
    devices = _record_guesses(monkeypatch)

    class ReadsValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.table = torch.ones(8)  # neither a parameter nor a buffer: stays on CPU

        def forward(self, x):
            assert x.device.type == "cpu"  # the real forward gets real inputs
            return self.lin(x) * self.table

    g = graph_of_module(ReadsValues())
    assert devices == ["meta", "cpu"] and g.method == "trace" and "linear" in g.labels


@pytest.mark.parametrize("idle,torch_threads,expected", [
    (0, 2, 1), (1, 2, 2), (3, 4, 2), (1, 1, 1), (0, 1, 1),
], ids=["busy", "one-idle", "many-idle", "torch-one-thread", "busy-one-thread"])
def test_query_is_encoded_on_two_threads_only_with_an_idle_cpu(monkeypatch, idle, torch_threads,
                                                               expected):
    from fastarch.models import minilm
    from fastarch.retrieval import describe

    seen = []

    def embed(texts, batch_size=64, bf16=False):
        seen.append(torch.get_num_threads())
        if texts == ["fails"]:
            raise RuntimeError("encoder failed")
        return torch.zeros(len(texts), 384)

    monkeypatch.setattr(minilm, "embed", embed)
    monkeypatch.setattr(describe, "_idle_cpus", lambda: idle)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(torch_threads)
        assert describe.embed_texts(["a new description"]).shape == (1, 384)
        assert seen == [expected] and torch.get_num_threads() == torch_threads
        with pytest.raises(RuntimeError, match="encoder failed"):
            describe.embed_texts(["fails"])
        assert torch.get_num_threads() == torch_threads  # restored after a failure too
    finally:
        torch.set_num_threads(before)


def test_idle_cpus_reads_the_machine():
    from fastarch.retrieval.describe import _idle_cpus

    import os

    idle = _idle_cpus()  # this test's own thread is running: at most all CPUs but one idle
    assert isinstance(idle, int) and 0 <= idle <= max(0, (os.cpu_count() or 1) - 1)


@pytest.mark.parametrize("runnable,own,cpus,idle", [
    (1, 1, 2, 1),  # only this thread: the other CPU is idle
    (2, 1, 2, 0),  # another process's task
    (2, 2, 2, 1),  # this process's own OpenMP worker, still spinning
    (3, 2, 2, 0),
    (3, 1, 8, 5),
], ids=["alone", "other-job", "own-worker", "own-worker-and-job", "8-cpus"])
def test_idle_cpus_does_not_count_this_process(tmp_path, monkeypatch, runnable, own, cpus, idle):
    import os

    from fastarch.retrieval import describe

    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.52 0.61 0.70 {runnable}/84 1234\n")
    monkeypatch.setattr(describe, "_own_runnable_threads", lambda: own)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert describe._idle_cpus(str(loadavg)) == idle
    assert describe._idle_cpus(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("env,has_bf16,expected", [
    (None, True, True), ("0", True, False), (None, False, False), ("1", False, False),
], ids=["bf16-cpu", "env-off", "no-bf16-cpu", "env-on-no-bf16-cpu"])
def test_new_descriptions_are_encoded_in_bf16_only_on_bf16_cpus(
        monkeypatch, text_fused_index, small_records, env, has_bf16, expected):
    from fastarch.models import minilm
    from fastarch.retrieval import describe
    from fastarch.retrieval.graph import OpGraph

    seen = []
    monkeypatch.setattr(minilm, "embed",
                        lambda texts, batch_size=64, bf16=False: seen.append((texts, bf16))
                        or torch.ones(len(texts), 384))
    monkeypatch.setattr(minilm, "cpu_has_bf16_matmul", lambda: has_bf16)
    if env is None:
        monkeypatch.delenv("FASTARCH_QUERY_BF16", raising=False)
    else:
        monkeypatch.setenv("FASTARCH_QUERY_BF16", env)
    assert describe.query_in_bf16() is expected
    idx = text_fused_index
    g = OpGraph.from_dict(small_records["torchvision/resnet50"])
    g.params *= 3  # a description the index does not hold
    idx.query_vector(g)
    assert seen == [([describe.describe(g)], expected)]
    seen.clear()  # embed_texts itself: fp32 unless asked (text queries, index builds)
    describe.embed_texts(["a text"])
    describe.embed_texts(["a text"] * 9, bf16=True)
    assert [b for _, b in seen] == [False, True]


def test_bf16_query_embedding_is_close_to_fp32():
    from fastarch.models.minilm import embed

    texts = ["A small convolutional neural network (CNN) for images (vision) with 11.7M "
             "parameters, 3.6G FLOPs per example, 18 layers deep and 512 wide. It uses 20 "
             "convolutions (kernel sizes 1, 3, 7); 8 residual connections.",
             "a small vision transformer with windowed attention", "x"]
    f32 = embed(texts, batch_size=1)
    b16 = embed(texts, batch_size=1, bf16=True)
    assert b16.dtype == torch.float32 and b16.shape == f32.shape
    cos = (f32 * b16).sum(-1)
    assert bool((cos > 0.9995).all()), cos  # measured >= 0.99997 over the index descriptions
    assert not torch.equal(f32, b16)  # the bf16 path really ran in another precision
    others = (f32[:, None] * f32[None]).sum(-1).fill_diagonal_(-1).amax(-1)
    assert bool((cos > others).all())  # closer to its fp32 self than to any other text
