"""The architecture index: duplicates, file format, queries and their errors."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fastarch import zoo
from fastarch.retrieval.index import FORMAT_VERSION, ArchitectureIndex, shipped_index_path
from fastarch.retrieval.retrieve import RetrievalWarning, retrieve


class MyResNet(nn.Module):
    """A user's own residual CNN, not in the zoo."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32)) for _ in range(4))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


class MyTransformer(nn.Module):
    def __init__(self, d=64, layers=3):
        super().__init__()
        self.embed = nn.Embedding(100, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True)
                                    for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


class Untraceable(MyResNet):
    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # fine on CPU, but the stem output goes through nonzero below
            x = x[torch.nonzero(x.flatten()).flatten()[:1]]
        raise RuntimeError("custom op the tracer cannot follow")


def test_identical_graphs_are_collapsed(small_index):
    row = small_index.row_of["torchvision/resnet18"]
    assert small_index.row_of["torchvision/quantized_resnet18"] == row
    entry = small_index.entries[row]
    assert entry["name"] == "torchvision/resnet18"  # the plainest name represents the group
    assert entry["duplicates"] == ["torchvision/quantized_resnet18"]
    assert len(small_index) == 11 and small_index.meta["architectures"] == 12


def test_embeddings_are_unit_vectors(small_index):
    norms = np.linalg.norm(small_index.emb, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("query,family", [
    ("torchvision/resnet18", "resnet"),
    ("torchvision/vit_b_16", "vision_transformer"),
    ("torchvision/swin_t", "swin_transformer"),
    ("torchvision/efficientnet_b0", "efficientnet"),
], ids=["resnet18", "vit_b_16", "swin_t", "efficientnet_b0"])
def test_name_query_finds_its_family_first(small_index, query, family):
    hits = retrieve(query, k=3, index=small_index)
    assert hits[0].family == family
    assert query not in {h.name for h in hits}  # the query itself is excluded
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hit_fields(small_index):
    hit = retrieve("torchvision/resnet18", k=1, index=small_index)[0]
    assert hit.name == "torchvision/resnet34" and hit.source == "torchvision"
    assert hit.params == 21797672 and hit.flops > 7e9 and -1 <= hit.score <= 1
    assert "torchvision/resnet34" in str(hit)


def test_k_larger_than_the_index(small_index):
    assert len(retrieve("torchvision/resnet50", k=100, index=small_index)) == len(small_index) - 1


def test_module_query(small_index):
    hits = retrieve(MyResNet(), k=2, index=small_index)
    assert [h.family for h in hits] == ["resnet", "resnet"]


def test_module_query_with_explicit_inputs(small_index):
    hits = retrieve(MyTransformer(), k=2, index=small_index,
                    example_inputs=torch.zeros(1, 8, dtype=torch.long))
    assert {h.family for h in hits} <= {"vision_transformer", "swin_transformer"}


def test_untraceable_module_warns_and_answers(small_index):
    with pytest.warns(RetrievalWarning, match="only in part"):
        hits = retrieve(Untraceable(), k=3, index=small_index)
    assert len(hits) == 3 and hits[0].family == "resnet"


def test_zoo_name_missing_from_the_index_is_read_on_the_fly(small_index):
    hits = retrieve("timm/resnet10t", k=2, index=small_index)
    assert hits[0].family == "resnet"


def test_text_query(small_text_index):
    hits = retrieve("a vision transformer with shifted window attention", k=2,
                    index=small_text_index)
    assert {h.family for h in hits} == {"swin_transformer"}
    e = small_text_index.entries[small_text_index.row_of["torchvision/resnet50"]]
    assert "resnet" not in e["description"].lower()  # descriptions never see the name
    assert "convolutional" in e["description"]


@pytest.mark.parametrize("query,kind,error,match", [
    ("", "auto", ValueError, "empty"),
    ("   ", "auto", ValueError, "empty"),
    ("resnet5O", "auto", KeyError, "close names"),
    ("timm/nope", "name", KeyError, "not in the zoo"),
    (3, "auto", TypeError, "query"),
    ("resnet50", "picture", ValueError, "kind"),
], ids=["empty", "blank", "typo", "unknown-prefixed", "int", "bad-kind"])
def test_bad_queries(small_index, query, kind, error, match):
    with pytest.raises(error, match=match):
        retrieve(query, k=3, kind=kind, index=small_index)


@pytest.mark.parametrize("k", [0, -1, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_k(small_index, k):
    with pytest.raises(ValueError, match="k must"):
        retrieve("torchvision/resnet18", k=k, index=small_index)


def test_save_load_roundtrip(small_text_index, tmp_path):
    path = small_text_index.save(tmp_path / "idx.npz")
    loaded = ArchitectureIndex.load(path)
    assert [e["name"] for e in loaded.entries] == [e["name"] for e in small_text_index.entries]
    np.testing.assert_allclose(loaded.emb, small_text_index.emb, atol=2e-3)  # float16 on disk
    a = retrieve("torchvision/swin_t", k=3, index=loaded)
    b = retrieve("torchvision/swin_t", k=3, index=small_text_index)
    assert [h.name for h in a] == [h.name for h in b]


def test_load_errors(tmp_path, small_index):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ArchitectureIndex.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a fastarch index"):
        ArchitectureIndex.load(bad)
    small_index.meta["format_version"] = FORMAT_VERSION + 1
    try:
        small_index.save(tmp_path / "future.npz")
    finally:
        small_index.meta["format_version"] = FORMAT_VERSION
    with pytest.raises(ValueError, match="format version"):
        ArchitectureIndex.load(tmp_path / "future.npz")


def test_shipped_index():
    path = shipped_index_path()
    assert path.exists() and path.stat().st_size < 50 * 2**20
    index = ArchitectureIndex.load(path)
    assert len(index) > 500 and index.text is not None
    assert set(index.meta["by_source"]) == set(zoo.SOURCES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a name in the shipped index needs no tracing
        hits = retrieve("timm/resnet50", k=10)
    assert sum(h.family == "resnet" for h in hits) >= 5


@pytest.mark.parametrize("text", [False, True], ids=["search", "text"])
def test_scores_are_the_rows_cosines(small_text_index, text):
    idx = small_text_index
    matrix = idx.text if text else idx.search
    for row in range(len(idx)):
        q = matrix[row]
        ref = matrix.astype(np.float64) @ q.astype(np.float64)
        scores = idx.scores(q, text=text)
        assert scores.dtype == np.float32 and scores.shape == (len(idx),)
        np.testing.assert_allclose(scores, ref, rtol=0, atol=2e-6)
        assert [h.name for h in idx.hits(scores, 5)] == [h.name for h in idx.hits(matrix @ q, 5)]
