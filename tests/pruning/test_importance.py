"""score_units against a plain per-unit reference (sum over the unit's weight slices)."""
import pytest
import torch
import torchvision

from fastarch.pruning.graph import DependencyGraph
from fastarch.pruning.importance import score_units


def _reference(graph, model, kind):
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    per_index = {}
    for group in graph.groups:
        for name, dim in group.key:
            t = tensors[name].detach().float()
            mag = t.abs() if kind == "l1" else t.pow(2)
            other = [d for d in range(t.dim()) if d != dim]
            per_index[name, dim] = (mag.sum(other) if other else mag).tolist()
    return {r: sum(per_index[key][i] for key, idx in group.positions[r].items() for i in idx)
            for group in graph.groups for r in group.units}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_magnitude_scores_match_the_reference(kind, dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = DependencyGraph(model, (x,))
    model.to(dtype)
    got = score_units(graph, model, kind, (x.to(dtype),))
    want = _reference(graph, model, kind)
    assert set(got) == set(want) and len(got) > 100
    for r, w in want.items():
        assert got[r] == pytest.approx(w, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_scoring_leaves_the_weights_unchanged(dtype):
    # the leading-dim path squares an fp32 copy in place: never the weight itself
    from fastarch.pruning.importance import _per_index

    torch.manual_seed(0)
    for shape in [(6, 5), (4, 3, 2, 2), (7,)]:
        w = torch.randn(shape).to(dtype)
        before = w.clone()
        for dim in range(w.dim()):
            for kind in ("l1", "l2"):
                got = _per_index(w, dim, kind)
                other = [d for d in range(w.dim()) if d != dim]
                mag = w.float().abs() if kind == "l1" else w.float().pow(2)
                assert torch.allclose(got, mag.sum(other) if other else mag, rtol=1e-5)
        assert torch.equal(w, before)
