"""Reading the whole zoo: one operator graph per architecture, appended to a JSON-lines cache.

The work runs in worker processes (``python -m fastarch.retrieval.build --worker``) that read
names on stdin and print one JSON record per model; the parent appends each record to the cache
as soon as it arrives. So a build is resumable (names already in the cache are skipped), a model
that hangs past its time limit or crashes its worker is recorded as failed and the worker is
restarted, and ``jobs > 1`` runs several workers side by side.
"""
from __future__ import annotations

import gc
import json
import os
import queue as _queue
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["extract_all", "extract_record", "read_cache"]


def read_cache(path: str | os.PathLike) -> dict[str, dict]:
    """``{name: record}`` from a cache file (a later record of a name wins; torn lines from an
    interrupted write are skipped)."""
    records: dict[str, dict] = {}
    path = Path(path)
    if not path.exists():
        return records
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "name" in rec:
                records[rec["name"]] = rec
    return records


def extract_record(name: str, time_limit: float = 60.0) -> dict:
    """Build zoo model ``name`` on meta and read its graph; a dict ready for the cache."""
    from fastarch import zoo
    from fastarch.retrieval.graph import extract_graph

    start = time.perf_counter()
    rec = {"name": name, "source": name.split("/", 1)[0]}
    try:
        rec["family"] = zoo.family(name)
    except Exception as exc:  # noqa: BLE001
        rec["family"] = "unknown"
        rec["error"] = f"family: {exc}"
    try:
        model = zoo.create(name, device="meta")
    except Exception as exc:  # noqa: BLE001
        rec.update(status="build_failed", error=str(exc)[:300],
                   seconds=round(time.perf_counter() - start, 3))
        return rec
    try:
        args, kwargs = zoo.example_inputs(name, model, device="meta", seq_len=16)
    except Exception as exc:  # noqa: BLE001
        args, kwargs = None, None
        rec["error"] = f"inputs: {exc}"[:300]
    if args is None:
        from fastarch.retrieval.graph import OpGraph, _module_tree, count_params, module_tree_graph

        labels, edges = module_tree_graph(model)
        graph = OpGraph(labels, edges, method="module_tree", params=count_params(model),
                        error=rec.get("error", ""), dims=_module_tree(model)[1])
    else:
        graph = extract_graph(model, args, kwargs, time_limit=time_limit)
        for retry in _retries(name, model, graph, args, kwargs):
            if time.perf_counter() - start > time_limit:
                break
            again = extract_graph(*retry, time_limit=time_limit)
            if (again.method == "trace", len(again)) > (graph.method == "trace", len(graph)):
                graph = again
            if graph.method == "trace":
                break
    rec.update(graph.to_dict())
    rec["depth"] = graph.depth
    rec["status"] = graph.method
    rec["seconds"] = round(time.perf_counter() - start, 3)
    del model
    gc.collect()
    return rec


def _retries(name, model, graph, args, kwargs):
    """Other ways to run a model whose first forward stopped part way: bfloat16 (grouped-GEMM
    MoE layers accept nothing else), and images beside the tokens (multimodal transformers)."""
    import torch

    if graph.method == "trace":
        return
    if "BFloat16" in graph.error:
        model.to(torch.bfloat16)

        def cast(t):
            return t.to(torch.bfloat16) if t.is_floating_point() else t

        yield (model, tuple(cast(a) for a in args),
               {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    if vision is not None and "pixel_values" not in kwargs:
        size = getattr(vision, "image_size", 224) or 224
        if isinstance(size, (list, tuple)):
            size = size[-1]
        channels = getattr(vision, "num_channels", 3) or 3
        extra = dict(kwargs, pixel_values=torch.zeros(1, int(channels), int(size), int(size),
                                                       device="meta"))
        yield model, args, extra


def _worker(time_limit: float) -> int:
    """Read names on stdin, print ``{"start": name}`` then the record of each, one JSON a line."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging

    logging.disable(logging.WARNING)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a model prints must not corrupt the protocol
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        out.write(json.dumps({"start": name}) + "\n")
        out.flush()
        try:
            rec = extract_record(name, time_limit=time_limit)
        except BaseException as exc:  # noqa: BLE001  (also the time limit firing late)
            rec = {"name": name, "source": name.split("/", 1)[0], "status": "failed",
                   "error": f"{type(exc).__name__}: {exc}"[:300]}
        out.write(json.dumps(rec) + "\n")
        out.flush()
    return 0


# how a worker is started (tests replace it with a stand-in)
WORKER_COMMAND = [sys.executable, "-m", "fastarch.retrieval.build", "--worker"]


class _Worker:
    """A worker process; a thread reads its stdout into a queue (reading the pipe directly
    with select would miss lines already buffered by Python)."""

    def __init__(self, time_limit: float, nice: int, inbox: _queue.Queue):
        cmd = WORKER_COMMAND + ["--time-limit", str(time_limit)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.current: str | None = None
        self.since = time.monotonic()
        self.done = 0
        self.reader = threading.Thread(target=self._read, args=(inbox,), daemon=True)
        self.reader.start()

    def _read(self, inbox):
        for line in self.proc.stdout:
            inbox.put((self, line))
        inbox.put((self, None))  # end of output: the worker exited or died

    def send(self, name: str):
        self.current = name
        self.since = time.monotonic()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass


def extract_all(names: list[str], cache: str | os.PathLike, jobs: int = 1,
                time_limit: float = 60.0, nice: int = 0, restart_every: int = 100,
                progress: bool = True, retry: tuple[str, ...] = (),
                hang_limit: float | None = None) -> dict[str, dict]:
    """Read every name not yet in ``cache`` (appending records), return all cached records.

    A model gets ``time_limit`` seconds inside its worker; a worker silent for ``hang_limit``
    (default ``2 * time_limit + 60``) seconds (a hang in native code) or one that dies is killed, the model is
    recorded as failed, and a fresh worker goes on. Workers are replaced every
    ``restart_every`` models to bound memory. Cached records whose status is in ``retry``
    (e.g. ``("failed", "partial")``) are read again; the new record replaces the old.
    """
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = read_cache(cache)
    todo = [n for n in names if n not in done or done[n].get("status") in retry]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), initial=len(names) - len(todo), unit="model",
                   desc="reading graphs", dynamic_ncols=True)
    hard = hang_limit if hang_limit is not None else 2 * time_limit + 60
    queue = list(reversed(todo))
    workers: list[_Worker] = []
    inbox: _queue.Queue = _queue.Queue()
    with cache.open("a") as sink:

        def save(rec):
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            done[rec["name"]] = rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(rec["name"][-40:], refresh=False)

        def feed(w):
            if queue and w.done < restart_every:
                w.send(queue.pop())
                return True
            return False

        try:
            while queue or any(w.current for w in workers):
                while len(workers) < max(1, jobs) and queue:
                    w = _Worker(time_limit, nice, inbox)
                    workers.append(w)
                    feed(w)
                try:
                    w, line = inbox.get(timeout=min(5.0, hard / 4))
                except _queue.Empty:
                    w, line = None, None
                if w is not None and w in workers:
                    if line is None:  # the worker died (a crash in native code)
                        if w.current:
                            save({"name": w.current, "source": w.current.split("/", 1)[0],
                                  "status": "failed", "error": "worker crashed"})
                        w.kill()
                        workers.remove(w)
                    else:
                        try:
                            msg = json.loads(line)
                        except json.JSONDecodeError:
                            msg = {}
                        if msg.get("name") and msg["name"] == w.current:
                            save(msg)
                            w.done += 1
                            w.current = None
                            if not feed(w):
                                w.proc.stdin.close()
                                w.kill()
                                workers.remove(w)
                now = time.monotonic()
                for w in list(workers):
                    if w.current and now - w.since > hard:
                        save({"name": w.current, "source": w.current.split("/", 1)[0],
                              "status": "failed", "error": f"no answer in {hard:g} s (killed)"})
                        w.kill()
                        workers.remove(w)
        finally:
            for w in workers:
                w.kill()
            if bar is not None:
                bar.close()
    return done


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--time-limit", type=float, default=60.0)
    a = p.parse_args()
    if a.worker:
        sys.exit(_worker(a.time_limit))
