"""Block re-weighting and text fusion of the index: rows and outside queries land in the same
space, and the bench tunes on tuning families only."""
import sys
from pathlib import Path

import numpy as np
import pytest

from fastarch.retrieval.features import FeatureSpace
from fastarch.retrieval.index import ArchitectureIndex
from fastarch.retrieval.retrieve import retrieve

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.fixture(scope="module")
def fused_index(small_records):
    return ArchitectureIndex.from_records(small_records, text=True, text_weight=0.3)


def test_no_text_weight_searches_graph_embeddings(small_index):
    assert small_index.space.text_weight == 0.0
    np.testing.assert_array_equal(small_index.search, small_index.emb)


def test_fused_rows_are_unit_vectors_with_both_parts(fused_index):
    s = fused_index.search
    assert s.shape == (len(fused_index), fused_index.emb.shape[1] + fused_index.text.shape[1])
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-4)
    d = fused_index.emb.shape[1]
    np.testing.assert_allclose(np.linalg.norm(s[:, d:], axis=1), np.sqrt(0.3), atol=1e-4)


def test_module_query_is_fused_like_the_rows(fused_index, small_records):
    from fastarch.retrieval.graph import OpGraph

    name = "torchvision/resnet50"
    q = fused_index.query_vector(OpGraph.from_dict(small_records[name]))
    row = fused_index.search[fused_index.row_of[name]]
    assert q.shape == row.shape
    np.testing.assert_allclose(q, row, atol=2e-3)


def test_module_query_on_fused_index(fused_index):
    import torchvision

    hits = retrieve(torchvision.models.resnet101(), k=3, index=fused_index)
    assert hits[0].family == "resnet"


def test_reweight_recovers_blocks(small_index, small_records):
    space = FeatureSpace.from_arrays(small_index.space.idf, small_index.space.stat_mean,
                                     small_index.space.stat_std, small_index.space.to_dict())
    same = space.reweight(small_index.emb, {})
    np.testing.assert_allclose(same, small_index.emb, atol=1e-5)
    w = {"motif": 0.1, "stats": 0.2}
    again = space.reweight(small_index.emb, w)
    ref = FeatureSpace(small_index.space.idf, small_index.space.stat_mean,
                       small_index.space.stat_std, dict(small_index.space.weights, **w),
                       small_index.space.wl_iteration_weights)
    assert space.weights == ref.weights
    built = ArchitectureIndex.from_records(small_records, text=False, weights=ref.weights)
    np.testing.assert_allclose(again, built.emb, atol=1e-5)  # as if built with those weights
    with pytest.raises(ValueError, match="unknown block"):
        space.reweight(small_index.emb, {"colour": 1.0})
    space.reweight(small_index.emb, {"shape": 0.0})
    with pytest.raises(ValueError, match="cannot be recovered"):
        space.reweight(again, {"shape": 1.0})
    with pytest.raises(ValueError, match="text_weight"):
        FeatureSpace(text_weight=1.0)


def test_save_load_keeps_the_fusion(fused_index, tmp_path):
    loaded = ArchitectureIndex.load(fused_index.save(tmp_path / "f.npz"))
    assert loaded.space.text_weight == 0.3
    np.testing.assert_allclose(loaded.search, fused_index.search, atol=3e-3)


def test_bench_tunes_on_tuning_families_only(fused_index, tmp_path, monkeypatch):
    import bench_retrieval as br

    path = fused_index.save(tmp_path / "f.npz")
    tuned_rows = []
    real = br.loo_metrics

    def spy(index, rows=None, ks=(20, 50, 100)):
        if ks == (20,) and rows is not None:
            tuned_rows.append(list(rows))
        return real(index, rows, ks)

    monkeypatch.setattr(br, "loo_metrics", spy)
    monkeypatch.setattr(br, "FUSION_GRID", {"motif": [0.3], "stats": [0.5], "shape": [0.5],
                                            "text_weight": [0.0, 0.3]})
    assert br.main(["--from-index", str(path), "--write", str(tmp_path / "r.md")]) == 0
    assert len(tuned_rows) == 2
    held = {i for i, e in enumerate(fused_index.entries) if br.held_out(e["family"])}
    assert held, "the small zoo should have a held-out family"
    for rows in tuned_rows:
        assert rows and not set(rows) & held
    assert "held-out families" in (tmp_path / "r.md").read_text()
