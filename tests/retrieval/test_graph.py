"""Operator graph extraction: labels, edges, params/FLOPs/depth, and the fallbacks."""
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastarch import zoo
from fastarch.retrieval.graph import OpGraph, extract_graph, module_tree_graph


class Residual(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return x + self.drop(h).view(x.shape) + 1.0


def test_mlp_chain():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Flatten(), nn.Dropout(),
                          nn.Linear(16, 3))
    g = extract_graph(model, (torch.zeros(2, 4),))
    assert g.method == "trace" and g.error == ""
    assert g.labels == ["linear", "relu", "linear"]  # flatten/dropout are folded away
    assert sorted(g.edges) == [(0, 1), (1, 2)]
    assert g.depth == 2 and g.width == 16
    assert g.params == 4 * 16 + 16 + 16 * 3 + 3


def test_residual_add_has_two_computed_inputs():
    g = extract_graph(Residual(), (torch.zeros(1, 8),))
    assert g.labels == ["linear", "relu", "linear", "add", "add.c"]
    add = g.labels.index("add")
    assert {s for s, d in g.edges if d == add} == {2}  # the input x is not a node
    assert (add, add + 1) in g.edges


@pytest.mark.parametrize("conv,label", [
    (nn.Conv2d(8, 8, 3, groups=8), "conv2d.k3.dw"),
    (nn.Conv2d(8, 16, 1), "conv2d.k1"),
    (nn.Conv2d(8, 16, 3, stride=2), "conv2d.k3.s2"),
    (nn.Conv2d(8, 16, 3, groups=2), "conv2d.k3.g"),
    (nn.Conv1d(8, 16, 5), "conv1d.k5"),
], ids=["depthwise", "pointwise", "strided", "grouped", "conv1d"])
def test_conv_labels(conv, label):
    shape = (1, 8, 12, 12) if isinstance(conv, nn.Conv2d) else (1, 8, 12)
    g = extract_graph(conv.to("meta"), (torch.zeros(shape, device="meta"),))
    assert g.labels == [label]


def test_resnet18_on_meta_matches_cpu_flops():
    meta = zoo.create("torchvision/resnet18", device="meta")
    g = extract_graph(meta, (torch.zeros(1, 3, 224, 224, device="meta"),))
    assert g.method == "trace"
    ops = g.op_counts
    assert ops["conv2d"] == 20 and ops["batch_norm"] == 20 and ops["linear"] == 1
    assert ops["add"] == 8  # one residual addition per basic block
    torch.manual_seed(0)
    cpu = zoo.create("torchvision/resnet18", device="cpu")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cpu(torch.randn(1, 3, 224, 224))
    assert g.flops == counter.get_total_flops()
    assert g.params == sum(p.numel() for p in cpu.parameters())
    assert g.depth == 18  # 17 convolutions on the longest path + the classifier


def test_hf_model_with_meta_masks_traces_fully():
    model = zoo.create("transformers/bert", device="meta")
    args, kwargs = zoo.example_inputs("transformers/bert", model)
    g = extract_graph(model, args, kwargs)
    assert g.method == "trace", g.error
    assert g.op_counts["attention"] == 12 and g.input_kind == "text"


class StopsHalfWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        x = self.a(x)
        idx = torch.nonzero(x)  # data-dependent: impossible on meta
        return self.norm(self.b(x[idx]))


def test_partial_trace_keeps_what_was_read():
    g = extract_graph(StopsHalfWay().to("meta"), (torch.zeros(1, 4, device="meta"),))
    assert g.method == "partial" and "nonzero" in g.error
    assert g.labels == ["linear", "linear", "layer_norm"]  # read + unreached leaves
    assert g.edges == [(0, 1), (1, 2)]


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        raise RuntimeError("this model cannot run")


def test_module_tree_when_forward_fails():
    g = extract_graph(Fails(), (torch.zeros(1, 3, 8, 8),))
    assert g.method == "module_tree" and "cannot run" in g.error
    assert g.labels == ["conv2d.k3", "linear"]
    assert module_tree_graph(Fails()) == (["conv2d.k3", "linear"], [(0, 1)])


class Sleeps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        time.sleep(30)
        return self.fc(x)


def test_time_limit_stops_a_slow_forward():
    start = time.perf_counter()
    g = extract_graph(Sleeps(), (torch.zeros(1, 2),), time_limit=0.3)
    assert time.perf_counter() - start < 10
    assert g.method == "module_tree" and "longer than" in g.error


def test_roundtrip_dict():
    g = extract_graph(Residual(), (torch.zeros(1, 8),))
    h = OpGraph.from_dict(g.to_dict())
    assert h.labels == g.labels and h.edges == g.edges and h.params == g.params


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        extract_graph(lambda x: x, (torch.zeros(1),))



def test_iter_tensors_reads_nested_arguments_in_order():
    from fastarch.retrieval.graph import _iter_tensors

    t = [torch.zeros(i) for i in range(7)]
    nested = (t[0], 1, [t[1], (t[2], {"a": t[3]})], torch.Size([2]))
    assert [x.numel() for x in _iter_tensors(nested)] == [0, 1, 2]  # the dict: 4th level
    assert [x.numel() for x in _iter_tensors({"x": t[6], "y": (t[1],)})] == [6, 1]
    assert _iter_tensors(t[2])[0] is t[2] and _iter_tensors(3) == []
