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


POWERS = {"wl": 0.25, "motif": 0.25, "shape": 0.5}


@pytest.fixture(scope="module")
def powered_index(small_records):
    return ArchitectureIndex.from_records(small_records, text=True, text_weight=0.3,
                                          power=POWERS)


def test_powers_apply_per_block_to_the_search_vectors(powered_index):
    space = powered_index.space
    assert space.power == dict(POWERS, stats=1.0)
    blocks = space.blocks(powered_index.emb)
    names = ("wl", "motif", "stats", "shape")
    parts = []
    for n, b in zip(names, blocks):
        b = b ** space.power[n]  # the blocks are non-negative but for stats (power 1)
        parts.append(space.weights[n] * b / np.maximum(np.linalg.norm(b, axis=1,
                                                                      keepdims=True), 1e-12))
    g = np.concatenate(parts, axis=1)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    d = g.shape[1]
    np.testing.assert_allclose(powered_index.search[:, :d], np.sqrt(0.7) * g, atol=1e-5)

def test_stored_embedding_is_the_one_before_powers(powered_index, small_index):
    # so that the blocks of a built index can be recovered and re-tuned
    np.testing.assert_allclose(powered_index.emb, small_index.emb, atol=1e-6)


def test_power_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown block"):
        FeatureSpace(power={"colour": 0.5})
    for bad in (0.0, -1.0, 1.5, "half"):
        with pytest.raises(ValueError, match="power"):
            FeatureSpace(power={"wl": bad})


def test_module_query_with_powers_is_made_like_the_rows(powered_index, small_records):
    from fastarch.retrieval.graph import OpGraph

    for name in ("torchvision/resnet50", "torchvision/swin_t"):
        q = powered_index.query_vector(OpGraph.from_dict(small_records[name]))
        np.testing.assert_allclose(q, powered_index.search[powered_index.row_of[name]],
                                   atol=2e-3)


def test_save_load_keeps_the_powers(powered_index, tmp_path):
    from fastarch.retrieval.index import FORMAT_VERSION

    loaded = ArchitectureIndex.load(powered_index.save(tmp_path / "p.npz"))
    assert loaded.meta["format_version"] == FORMAT_VERSION == 3
    assert loaded.space.power == powered_index.space.power
    np.testing.assert_allclose(loaded.search, powered_index.search, atol=3e-3)


def test_version_2_file_reads_without_powers(fused_index, tmp_path):
    old = dict(fused_index.meta, format_version=2)
    old["space"] = {k: v for k, v in fused_index.space.to_dict().items() if k != "power"}
    v2 = ArchitectureIndex(fused_index.entries, fused_index.emb, fused_index.text,
                           fused_index.space, old)
    loaded = ArchitectureIndex.load(v2.save(tmp_path / "v2.npz"))
    assert set(loaded.space.power.values()) == {1.0}
    np.testing.assert_allclose(loaded.search, fused_index.search, atol=3e-3)


def test_retrieve_by_name_ranks_as_the_bench_does():
    """The shipped index and the query path agree: a zoo name's neighbours from retrieve()
    are the bench's leave-one-out ranking of that row (the same search vectors)."""
    import bench_retrieval as br

    from fastarch.retrieval.index import shipped_index

    index = shipped_index()
    order = br.loo_order(index.search @ index.search.T, 10)
    names = ["timm/resnet50", "torchvision/mobilenet_v2", "timm/vit_base_patch16_224",
             "transformers/llama", "transformers/bert"]
    for name in names:
        row = index.row_of[name]
        got = [h.name for h in retrieve(name, k=10)]
        assert got == [index.entries[j]["name"] for j in order[row]], name


def test_bench_tunes_on_tuning_families_only(fused_index, tmp_path, monkeypatch):
    import bench_retrieval as br

    path = fused_index.save(tmp_path / "f.npz")
    held = {i for i, e in enumerate(fused_index.entries) if br.held_out(e["family"])}
    assert held, "the small zoo should have a held-out family"
    monkeypatch.setattr(br, "FUSION_GRID", {"power_wl": [1.0, 0.25], "power_hist": [1.0],
                                            "motif": [0.3], "stats": [0.5], "shape": [0.5],
                                            "text_weight": [0.0, 0.3]})
    scored_rows = []
    real = br.scores_metrics

    def spy(sims, index, rows=None, ks=(20, 50, 100)):
        scored_rows.append(None if rows is None else list(rows))
        return real(sims, index, rows, ks)

    monkeypatch.setattr(br, "scores_metrics", spy)
    trials, tuning = br.tune_fusion(ArchitectureIndex.load(path))
    assert len(trials) == len(scored_rows) == 4
    for rows in scored_rows:  # every setting was scored on tuning-family queries only
        assert rows and not set(rows) & held
    assert [t[0] for t in trials] == sorted((t[0] for t in trials), reverse=True)
    monkeypatch.setattr(br, "scores_metrics", real)
    out = tmp_path / "saved.npz"
    assert br.main(["--from-index", str(path), "--write", str(tmp_path / "r.md"),
                    "--save-index", str(out)]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "held-out families" in text and "Ablation" in text
    best = trials[0]
    saved = ArchitectureIndex.load(out)
    assert saved.space.power["wl"] == best[3][0] and saved.space.text_weight == best[2]
