"""fastarch.retrieval.compress: plans, the report, missing techniques, recommend."""
import importlib

import pytest
import torch
from torch import nn

from fastarch.retrieval.compress import Plan, compress, recommend

# the module (fastarch.retrieval.compress is also the name of the function it exports)
compress_module = importlib.import_module("fastarch.retrieval.compress")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("text,plan", [
    ("prune=0.3:l2", Plan(prune_ratio=0.3)),
    ("prune=0.5:l1,sparsity=0.4:teal", Plan(prune_ratio=0.5, prune_importance="l1",
                                            sparsity=0.4)),
    ("attention=sliding_window", Plan(attention="sliding_window")),
], ids=["prune", "prune-sparsity", "attention"])
def test_plan_parse_roundtrip(text, plan):
    assert Plan.parse(text) == plan
    assert Plan.parse(str(plan)) == plan


@pytest.mark.parametrize("bad,match", [
    ("prune=1.5", "prune_ratio"), ("prune=0.3:magic", "prune_importance"),
    ("sparsity=0.5:xyz", "sparsity_method"), ("speed=2", "unknown"), ("", "non-empty"),
], ids=["ratio", "importance", "method", "unknown-item", "empty"])
def test_bad_plans(bad, match):
    with pytest.raises(ValueError, match=match):
        Plan.parse(bad)


def test_compress_prunes_and_measures():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(1, 3, 32, 32)
    model, report = compress(model, {"prune_ratio": 0.5}, example_inputs=x, repeats=2)
    step = {t: s for t, s, _ in report.steps}
    if step["prune"] == "skipped":
        pytest.skip("fastarch.prune is not available in this checkout")
    assert step["prune"] == "applied"
    assert report.params_after < report.params_before
    assert 0 < report.flops_after < report.flops_before
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert model(x).shape == (1, 10)
    assert "prune" in str(report)


def test_missing_technique_is_reported_and_model_kept(monkeypatch):
    monkeypatch.setattr(compress_module, "_technique", lambda name: None)
    torch.manual_seed(0)
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = compress(model, "prune=0.3,sparsity=0.5,attention=sliding_window",
                         example_inputs=torch.randn(1, 3, 16, 16), measure=False)
    assert [(t, s) for t, s, _ in report.steps] == [
        ("prune", "skipped"), ("sparsity", "skipped"), ("attention", "skipped")]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failing_technique_is_reported(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot handle this model")

    monkeypatch.setattr(compress_module, "_technique", lambda name: broken)
    _, report = compress(SmallCNN(), "prune=0.3", example_inputs=torch.randn(1, 3, 16, 16),
                         measure=False)
    assert report.steps[0][:2] == ("prune", "failed") and "cannot handle" in report.steps[0][2]


def test_compress_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        compress("resnet", "prune=0.3")
    with pytest.raises(TypeError, match="plan"):
        compress(SmallCNN(), 0.3)
    with pytest.raises(ValueError, match="meta"):
        compress(SmallCNN().to("meta"), "prune=0.3")


def test_recommend_takes_the_nearest_recipe(small_index):
    recipes = {"torchvision/resnet34": {"plan": "prune=0.3:l2", "measured": {}},
               "torchvision/vit_b_32": {"plan": "sparsity=0.5:teal", "measured": {}}}
    plan, hit, _ = recommend(SmallCNN(), index=small_index, recipes=recipes)
    assert hit.name == "torchvision/resnet34" and plan == Plan(prune_ratio=0.3)
    plan, hit, _ = recommend("torchvision/vit_b_16", index=small_index, recipes=recipes)
    assert hit.name == "torchvision/vit_b_32" and plan == Plan(sparsity=0.5)
    assert recommend(SmallCNN(), index=small_index, recipes={}) is None


def test_recommend_proposes_the_shipped_recipe_of_a_near_architecture():
    """A model that is no recipe architecture (shufflenet v2 x2.0, a width variant) gets the
    measured recipe of its nearest neighbour with one, from the shipped index and recipes."""
    from fastarch import zoo
    from fastarch.retrieval.compress import load_recipes

    recipes = load_recipes()
    assert len(recipes) >= 3
    for r in recipes.values():  # every stored recipe met the bench's quality floor
        m = r["measured"]
        assert m["cosine"] >= m["cosine_floor"] and m["speedup"] >= 1.05
    near = "torchvision/shufflenet_v2_x2_0"
    assert near not in recipes
    found = recommend(zoo.create(near, device="meta"))
    assert found is not None
    plan, hit, recipe = found
    assert "torchvision/shufflenet_v2_x0_5" in (hit.name, *hit.duplicates)
    assert recipe == recipes["torchvision/shufflenet_v2_x0_5"]
    assert plan == Plan.parse(recipe["plan"])
