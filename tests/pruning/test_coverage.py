"""Coverage: torchvision, timm (CNN, ViT, hybrid, MLP-mixer) and Hugging Face encoders /
decoders, random weights, small inputs. Each is pruned 30%: the forward runs with the same
output shapes, ratio 0 changes nothing, and the physically pruned model equals the masked model
within 1e-4 of the output's scale (fp32) on the groups where that is exact (no norm statistics over the channels)."""
import pytest

from fastarch.pruning.check import check_model
from fastarch.pruning.coverage_models import COVERAGE, build


def test_at_least_40_architectures():
    assert len(COVERAGE) >= 40
    assert {e.split(":")[0] for e in COVERAGE} == {"torchvision", "timm", "hf"}


@pytest.mark.parametrize("entry", COVERAGE)
def test_prune_30_percent(entry):
    if entry.startswith("hf:"):
        pytest.importorskip("transformers")
    if entry.startswith("timm:"):
        pytest.importorskip("timm")
    model, inputs = build(entry)
    result = check_model(model, inputs, ratio=0.3)
    assert result["ok"], result["reason"]
    assert result["param_reduction"] > 0.05
    assert result["rel_diff"] <= 1e-4
