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
