"""``fastarch bench``: option parsing, the report it writes, and the end-to-end harness.

No timed assertions: the figures are whatever the machine gives; the tests check that the
report is written with its header, tables and plots, and that bad options fail clearly."""
from __future__ import annotations

import os
import re

import pytest
import torch

from fastarch import cli
from fastarch.benchmark import e2e, report, suite
from fastarch.benchmark.cli import BACKEND_NAMES, MODEL_NAMES, OP_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parse(*argv):
    return cli.build_parser(only="bench").parse_args(["bench", *argv])


def test_parser_defaults_and_lists():
    a = _parse()
    assert a.ops is None and a.models is None and a.backends == list(BACKEND_NAMES)
    a = _parse("--ops", "attention,sparse_gemv", "--models", "llama", "--quick", "--out", "x")
    assert a.ops == ["attention", "sparse_gemv"] and a.models == ["llama"]
    assert a.quick and a.out == "x"
    assert _parse("--ops", "all").ops == list(OP_NAMES)
    assert _parse("--models", "all").models == list(MODEL_NAMES)
    assert set(OP_NAMES) == set(suite.OPS) and set(MODEL_NAMES) == set(e2e.MODEL_NAMES)


@pytest.mark.parametrize("argv,arg,name", [
    (["--ops", "sparse_gemv,bogus_op"], "--ops", "bogus_op"),
    (["--models", "resnet5"], "--models", "resnet5"),
    (["--backends", "eager,tvm2"], "--backends", "tvm2"),
])
def test_bad_names_fail_naming_the_argument(argv, arg, name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {arg}" in err and repr(name) in err and "choose from" in err


def test_missing_bench_dir_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(suite, "bench_dir_candidates", lambda: [tmp_path / "nowhere"])
    rc = cli.main(["bench", "--ops", "sparse_gemv", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "argument --ops" in err and "bench/" in err
    assert "FASTARCH_BENCH_DIR" in err and "--models" in err


def test_header_says_machine_versions_and_command():
    lines = "\n".join(report.header("fastarch bench --quick"))
    assert re.search(r"Machine: .+, \d+ cores", lines)
    assert "ISA:" in lines and "GPU:" in lines
    assert f"torch {torch.__version__}" in lines and "triton" in lines and "fastarch" in lines
    assert re.search(r"Date: \d{4}-\d\d-\d\d", lines)
    assert "Command: `fastarch bench --quick`" in lines
    assert "load average" in lines and "at start" in lines and "at end" in lines
    assert "shared" in "\n".join(report.header("c", load_start=(999.0, 999.0, 999.0)))
    flags = report.cpu_info()["isa"]
    with open("/proc/cpuinfo") as f:
        text = f.read()
    assert ("avx2" in flags) == (" avx2" in text)


def test_quick_sparse_gemv_writes_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["bench", "--quick", "--ops", "sparse_gemv", "--rounds", "1", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    md = (out / "REPORT.md").read_text()
    assert md.startswith("# fastarch benchmark report")
    assert "Command: `fastarch bench --ops sparse_gemv --quick" in md
    assert "## Sparse GEMV" in md and "| s=0.5 |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 2048x512 |")]
    assert len(rows) == 2  # fp32 and bf16, batch 1
    assert all(re.search(r"\| \d+\.\d\dx \|", r) for r in rows)
    png = out / "sparse_gemv_speedup.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "![sparse_gemv_speedup](sparse_gemv_speedup.png)" in md
    assert str(out / "REPORT.md") in capsys.readouterr().out


def test_e2e_tiny_model_eager_vs_inductor(tmp_path):
    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                   torch.nn.Linear(32, 8)).eval()

    x = torch.randn(4, 16)
    case = e2e.ModelCase("tiny-mlp", build, lambda: ((x,), {}), "2-layer MLP")
    res = e2e.run_model(case, backends=("eager", "inductor"), rounds=2, warmup=1)
    assert set(res.ms) == {"eager", "inductor"} and all(v > 0 for v in res.ms.values())
    assert res.outputs_match("inductor") and res.max_abs_diff["inductor"] < 1e-4
    assert res.compile_s["inductor"] > 0 and res.rewrites is None and not res.errors
    md = "\n".join(e2e.markdown([res], ("eager", "inductor"), 2))
    assert "| tiny-mlp |" in md and "inductor vs eager" in md and "(match)" in md
    png = report.bar_plot(str(tmp_path / "e2e.png"), [res.name],
                          {"inductor vs eager": [res.speedup("eager", "inductor")]}, "x", "t")
    assert open(png, "rb").read(8) == PNG_MAGIC


def test_e2e_mismatch_and_missing_backend_are_reported():
    res = e2e.ModelResult("m", "", ms={"eager": 2.0, "inductor": 1.0},
                          max_abs_diff={"inductor": 0.5}, ref_scale=1.0,
                          errors={"fastarch": "not registered here"})
    assert res.outputs_match("inductor") is False
    md = "\n".join(e2e.markdown([res]))
    assert "MISMATCH" in md and "fastarch: not run: not registered here" in md
    assert "| m | 2.00 | 1.00 | n/a |" in md
    with pytest.raises(ValueError, match="backends"):
        e2e.run_model(e2e.ModelCase("x", lambda: None, lambda: ((), {})), backends=("jax",))
    with pytest.raises(ValueError, match="models: unknown model 'nope'"):
        e2e.run(["nope"])


def test_valid_positions_exclude_padding():
    ref = torch.zeros(2, 3, 4)
    got = ref.clone()
    got[1, 2] = 7.0  # a padding position
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert e2e._max_abs_diff(ref, got, valid) == 0.0
    assert e2e._max_abs_diff(ref, got, None) == 7.0
    got[0, 0, 0] = 0.25
    assert e2e._max_abs_diff((ref,), {"x": got}, valid) == 0.25


def test_goal_rules():
    r = e2e.ModelResult("m", "", ms={"inductor": 1.0, "fastarch": 1.02}, rewrites=[])
    assert r.goal().startswith("met")  # no rewrite: within 3%
    r.ms["fastarch"] = 1.05
    assert r.goal().startswith("not met")
    r.rewrites = ["attention: sdpa"]
    r.ms["fastarch"] = 0.9
    assert r.goal().startswith("met")


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_bad_device_fails_naming_the_argument(device, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here: cuda is a valid device")
    rc = cli.main(["bench", "--models", "llama", "--device", device, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "argument --device" in err and repr(device) in err


def test_attention_bench_prepares_every_timed_call_alike(monkeypatch):
    m = suite.bench_module("bench_attention")
    calls = []
    providers = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    m.interleaved_median_ms(providers, 2, m.CacheState("hot"))
    # warm-up, then per round each provider twice in a row: untimed, then timed
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    calls.clear()
    m.interleaved_median_ms(providers, 2, m.CacheState("order"))
    assert calls == ["a", "b"] * 3
    monkeypatch.setattr(m, "last_level_cache_bytes", lambda: 1 << 16)
    cold = m.CacheState("cold")
    assert cold.flush_buf.numel() * 4 == 2 << 16  # twice the last-level cache
    cold.flush_buf.zero_()
    calls.clear()
    m.interleaved_median_ms(providers, 1, cold)
    assert calls == ["a", "b", "a", "b"] and bool((cold.flush_buf == 1).all())
    assert m.last_level_cache_bytes() > 0
    with pytest.raises(ValueError, match="cache must be"):
        m.CacheState("warm")


def test_attention_bench_model_decode_with_a_padded_batch():
    """--model-decode's stepping: a left-padded batch, fp32, where the causal copy's greedy tokens
    equal the original's in every step and a sliding-window copy's steps are timed too."""
    pytest.importorskip("transformers")
    m = suite.bench_module("bench_attention")
    ms, agree = m.run_model_decode(40, 3, ["causal", "sliding_window:8"], torch.float32,
                                   layers=1, hidden=128, heads=4, kv_heads=2, batch=3)
    assert set(ms) == {"original (sdpa)", "causal", "sliding_window:8"}
    assert all(t > 0 for t in ms.values())
    assert agree["original (sdpa)"] == 3 and agree["causal"] == 3
