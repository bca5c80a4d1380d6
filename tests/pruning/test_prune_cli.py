"""``fastarch prune``: in-process and as a subprocess, on small zoo models."""
import os
import subprocess
import sys

import pytest
import torch

from fastarch.cli import COMMANDS, main


def _numbers(out: str, key: str):
    line = next(ln for ln in out.splitlines() if ln.startswith(key))
    before, after = line.split("->")
    return before.split()[-1], after.split()[0]


def test_prune_registered():
    assert COMMANDS["prune"] == "fastarch.pruning.cli:add_parser"


def test_prune_in_process_saves_a_smaller_model(tmp_path, capsys):
    out = tmp_path / "m.pt"
    rc = main(["prune", "torchvision/mobilenet_v3_small", "--ratio", "0.5", "--no-latency",
               "--out", str(out), "-v"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "removed channels:" in text
    pruned = torch.load(out, weights_only=False)
    n_after = sum(p.numel() for p in pruned.parameters())
    import torchvision

    n_before = sum(p.numel() for p in torchvision.models.mobilenet_v3_small().parameters())
    assert n_after < 0.8 * n_before
    y = pruned(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_prune_subprocess_reports_latency_and_flops():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "fastarch.cli", "prune", "timm/resnet10t",
                           "--flops", "0.3", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "latency" in proc.stdout and "ms ->" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FLOPs"))
    pct = float(line.split("(")[1].split("%")[0])
    assert 20 <= pct <= 45, line  # searched to about 30% fewer FLOPs


def test_prune_hf_round_trip(tmp_path, capsys):
    out = tmp_path / "bert"
    # a zoo transformers model is the default config (BERT base): prune its heads and neurons
    rc = main(["prune", "transformers/bert", "--ratio", "0.25", "--no-latency", "--seq-len", "8",
               "--out", str(out)])
    assert rc == 0
    from fastarch.pruning import load_pruned

    m = load_pruned(str(out)).eval()
    assert m.config.num_attention_heads < 12
    with torch.no_grad():
        y = m(torch.randint(0, m.config.vocab_size, (1, 8))).last_hidden_state
    assert y.shape[:2] == (1, 8) and torch.isfinite(y).all()


def test_prune_nm_in_process(capsys):
    rc = main(["prune", "timm/mixer_s32_224", "--nm", "2:4", "--no-latency"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "removed n:m:" in text
    before, after = _numbers(text, "params")
    assert before != after


def test_prune_blocks_in_process(capsys):
    rc = main(["prune", "timm/vit_tiny_patch16_224", "--blocks", "3", "--no-latency", "-v"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "removed blocks: 3 of 12 units in 1 groups" in text
    assert "pruning: blocks 3 (cosine)," in text
    before, after = _numbers(text, "params")
    assert float(after[:-1]) < float(before[:-1])


@pytest.mark.parametrize("value", ["1.5", "-2", "two"])
def test_prune_blocks_bad_value(value, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "torchvision/resnet18", "--blocks", value])
    assert "--blocks" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["prune", "no_such_model_xyz"], "no_such_model_xyz"),
    (["prune", "torchvision/resnet18", "--ratio", "1.5"], "--ratio"),
    (["prune", "torchvision/resnet18", "--round-to", "0"], "--round-to"),
])
def test_prune_bad_arguments(argv, msg):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert msg in str(exc.value)


def test_prune_targets_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "torchvision/resnet18", "--ratio", "0.3", "--params", "0.3"])
    assert "not allowed with" in capsys.readouterr().err
