"""`fastarch index build` (resumable) and `fastarch retrieve`."""
import json

from fastarch.cli import main
from fastarch.retrieval.index import ArchitectureIndex


def test_index_build_is_resumable(tmp_path, capsys):
    out = tmp_path / "idx.npz"
    argv = ["index", "build", "--out", str(out), "--no-text", "--no-progress",
            "--names", "torchvision/alexnet", "torchvision/squeezenet1_0"]
    assert main(argv) == 0
    cache = tmp_path / "idx.npz.graphs.jsonl"
    first = cache.read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in first) == [
        "torchvision/alexnet", "torchvision/squeezenet1_0"]
    assert "2 architectures" in capsys.readouterr().out
    # a second run with one more name reads only that one
    assert main(argv + ["torchvision/squeezenet1_1"]) == 0
    lines = cache.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    index = ArchitectureIndex.load(out)
    assert sorted(index.row_of) == ["torchvision/alexnet", "torchvision/squeezenet1_0",
                                    "torchvision/squeezenet1_1"]
    assert main(["index", "info", str(out)]) == 0
    assert "3 architectures" in capsys.readouterr().out


def test_retrieve_cli(small_index, tmp_path, capsys):
    path = small_index.save(tmp_path / "idx.npz")
    assert main(["retrieve", "torchvision/vit_b_16", "-k", "2", "--index", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "torchvision/vit_b_32" in lines[1]


def test_retrieve_cli_unknown_name(small_index, tmp_path, capsys):
    path = small_index.save(tmp_path / "idx.npz")
    assert main(["retrieve", "resnet5O", "--index", str(path)]) == 2
    assert "close names" in capsys.readouterr().err


def test_index_build_searches_as_the_shipped_index(tmp_path, capsys):
    """A rebuilt index uses the shipped index's tuned settings, and its rows are the shipped
    rows: the same graphs and descriptions, so in the shipped feature space (IDF and
    standardisation fitted on the whole zoo) they give the shipped search vectors."""
    import numpy as np

    from fastarch.retrieval.build import read_cache
    from fastarch.retrieval.graph import OpGraph
    from fastarch.retrieval.index import shipped_index

    # each the representative of its row in the shipped index (a duplicate's row describes
    # another model: same graph, other widths)
    names = ["torchvision/squeezenet1_0", "timm/resnet10t", "timm/mobilevit_xxs"]
    out = tmp_path / "idx.npz"
    assert main(["index", "build", "--out", str(out), "--no-progress", "--names", *names]) == 0
    assert "search settings: shipped" in capsys.readouterr().out
    built, ship = ArchitectureIndex.load(out), shipped_index()
    assert built.space.to_dict() == ship.space.to_dict()
    assert ship.space.text_weight > 0 and any(p != 1.0 for p in ship.space.power.values())
    records = read_cache(tmp_path / "idx.npz.graphs.jsonl")
    for name in names:
        i, row = built.row_of[name], ship.row_of[name]
        assert ship.entries[row]["name"] == name
        assert built.entries[i]["wl_hash"] == ship.entries[row]["wl_hash"]
        assert built.entries[i]["description"] == ship.entries[row]["description"]
        np.testing.assert_allclose(built.text[i], ship.text[row], atol=2e-3)
        emb = ship.embed_graph(OpGraph.from_dict(records[name]))
        search = ship.space.fuse(emb[None], built.text[i][None])[0]
        assert float(search @ ship.search[row]) > 0.9999, name
    # the default settings are another search (and what a re-tunable build uses)
    assert main(["index", "build", "--out", str(tmp_path / "d.npz"), "--no-progress",
                 "--settings", "default", "--names", *names]) == 0
    plain = ArchitectureIndex.load(tmp_path / "d.npz")
    assert plain.space.text_weight == 0.0 and set(plain.space.power.values()) == {1.0}
    assert all(w > 0 for w in plain.space.weights.values())
