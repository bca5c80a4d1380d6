"""The whole-zoo reader: records, resumability, and workers that hang or crash."""
import json
import sys
import time

from fastarch.retrieval import build
from fastarch.retrieval.build import extract_all, extract_record, read_cache

# a stand-in worker: answers "ok/..." at once, never answers "hang/...", dies on "crash/..."
FAKE_WORKER = r'''
import json, sys, time, os
for line in sys.stdin:
    name = line.strip()
    print(json.dumps({"start": name}), flush=True)
    if name.startswith("hang/"):
        time.sleep(600)
    if name.startswith("crash/"):
        os._exit(3)
    print(json.dumps({"name": name, "source": "fake", "status": "trace", "labels": ["linear"],
                      "edges": []}), flush=True)
'''


def test_hanging_and_crashing_workers_are_recorded_and_replaced(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(build, "WORKER_COMMAND", [sys.executable, str(script)])
    names = ["ok/a", "hang/b", "ok/c", "crash/d", "ok/e"]
    start = time.perf_counter()
    records = extract_all(names, tmp_path / "cache.jsonl", time_limit=1, hang_limit=2.0,
                          progress=False)
    assert time.perf_counter() - start < 60
    assert {n: r["status"] for n, r in records.items()} == {
        "ok/a": "trace", "hang/b": "failed", "ok/c": "trace", "crash/d": "failed",
        "ok/e": "trace"}
    assert "killed" in records["hang/b"]["error"] and "crashed" in records["crash/d"]["error"]
    # resumable: nothing left to do; --retry failed reads only the failed ones again
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    extract_all(names, tmp_path / "cache.jsonl", progress=False)
    assert (tmp_path / "cache.jsonl").read_text().splitlines() == lines
    monkeypatch.setattr(build, "WORKER_COMMAND", [sys.executable, str(script)])
    extract_all(["ok/a", "crash/d"], tmp_path / "cache.jsonl", progress=False, retry=("failed",))
    new = (tmp_path / "cache.jsonl").read_text().splitlines()[len(lines):]
    assert [json.loads(line)["name"] for line in new] == ["crash/d"]


def test_read_cache_skips_torn_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"name": "a", "status": "trace"}\n{"name": "b", "sta\n'
                    '{"name": "a", "status": "partial"}\n')
    assert read_cache(path) == {"a": {"name": "a", "status": "partial"}}
    assert read_cache(tmp_path / "missing.jsonl") == {}


def test_extract_record():
    rec = extract_record("torchvision/alexnet", time_limit=30)
    assert rec["status"] == "trace" and rec["family"] == "alexnet"
    assert rec["labels"].count("conv2d.k3") == 3 and rec["depth"] == 8
    bad = extract_record("transformers/autoformer", time_limit=30)
    assert bad["status"] == "build_failed" and "prediction_length" in bad["error"]
