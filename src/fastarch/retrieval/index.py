"""The architecture index: one name-blind embedding per distinct architecture graph, a MiniLM
embedding of its written description, and what a hit reports (source, family, params, FLOPs).

Architectures whose graphs are identical (same WL hash) share one row; the others are listed
as its ``duplicates``. The file is a compressed ``.npz`` (float16 embeddings plus a JSON header
with a format version), so the index of the whole zoo ships inside the package.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from fastarch.retrieval.features import FeatureSpace, raw_features
from fastarch.retrieval.graph import OpGraph

__all__ = [
    "FORMAT_VERSION",
    "ArchitectureIndex",
    "Hit",
    "shipped_build_failures",
    "shipped_index",
    "shipped_index_path",
    "shipped_settings",
]

# 3: the feature space has per-block powers for the search vectors (version 2 files, which
# have none, read as powers of 1)
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
_GRAPH_OK = ("trace", "partial", "module_tree")


@dataclasses.dataclass
class Hit:
    """One retrieved architecture: build it with ``fastarch.zoo.create(hit.name)``."""

    name: str
    source: str
    family: str
    score: float
    params: int
    flops: int
    depth: int = 0
    width: int = 0
    duplicates: tuple[str, ...] = ()

    def __str__(self):
        from fastarch.retrieval.graph import human

        dup = f"  (+{len(self.duplicates)} identical)" if self.duplicates else ""
        return (f"{self.score:6.3f}  {self.name:<52} {self.family:<24} "
                f"params {human(self.params):>6}  FLOPs {human(self.flops):>6}{dup}")


def shipped_index_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "zoo_index.npz"


class ArchitectureIndex:
    """Rows of distinct architectures with graph and text embeddings.

    Build with :meth:`from_records` (records from :mod:`fastarch.retrieval.build`), save with
    :meth:`save`, load with :meth:`load`; the shipped one is :func:`shipped_index`.
    """

    def __init__(self, entries: list[dict], emb: np.ndarray, text: np.ndarray | None,
                 space: FeatureSpace, meta: dict):
        self.entries = entries
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.text = None if text is None else np.ascontiguousarray(text, dtype=np.float32)
        self.space = space
        self.meta = meta
        # what name and module queries scan: graph embeddings fused with the description's
        # text embedding (space.text_weight), one unit vector per row
        self.search = space.fuse(self.emb, self.text)
        self.row_of: dict[str, int] = {}
        for i, e in enumerate(entries):
            self.row_of[e["name"]] = i
            for d in e.get("duplicates", ()):
                self.row_of[d] = i

    def __len__(self):
        return len(self.entries)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: dict[str, dict] | list[dict], text: bool = True,
                     weights: dict | None = None, wl_iteration_weights=None,
                     raw: dict | None = None, progress: bool = False,
                     text_weight: float = 0.0, power: dict | None = None) -> ArchitectureIndex:
        """Index of the graphs in ``records`` (failed ones are listed in ``meta['failed']``).
        ``raw`` may hold precomputed ``raw_features`` by name (for tuning); ``weights``,
        ``wl_iteration_weights``, ``text_weight`` and ``power`` configure the
        :class:`~fastarch.retrieval.features.FeatureSpace`."""
        recs = list(records.values()) if isinstance(records, dict) else list(records)
        ok = [r for r in recs if r.get("status") in _GRAPH_OK and r.get("labels")]
        failed = sorted(r["name"] for r in recs if r not in ok)
        ok.sort(key=lambda r: r["name"])
        raw = dict(raw or {})
        it = ok
        if progress:
            from tqdm import tqdm

            it = tqdm(ok, desc="embedding graphs", unit="graph", dynamic_ncols=True)
        groups: dict[str, list[dict]] = {}
        for r in it:
            if r["name"] not in raw:
                raw[r["name"]] = raw_features(OpGraph.from_dict(r))
            groups.setdefault(raw[r["name"]][3], []).append(r)
        entries, wl, motif, stats, shape, graphs = [], [], [], [], [], []
        for h, members in groups.items():
            # the representative: the plainest name (shortest, then alphabetical)
            members.sort(key=lambda r: (len(r["name"]), r["name"]))
            rep = members[0]
            g = OpGraph.from_dict(rep)
            entries.append({
                "name": rep["name"], "source": rep.get("source", rep["name"].split("/")[0]),
                "family": rep.get("family", "unknown"), "params": int(rep.get("params", 0)),
                "flops": int(rep.get("flops", 0)), "depth": int(rep.get("depth", g.depth)),
                "width": int(rep.get("width", 0)), "method": rep.get("status", ""),
                "wl_hash": h, "duplicates": [m["name"] for m in members[1:]],
                "duplicate_families": sorted({m.get("family", "") for m in members[1:]}),
            })
            w, mo, st, _, sh = raw[rep["name"]]
            wl.append(w)
            motif.append(mo)
            stats.append(st)
            shape.append(sh)
            graphs.append(g)
        order = sorted(range(len(entries)), key=lambda i: entries[i]["name"])
        entries = [entries[i] for i in order]
        graphs = [graphs[i] for i in order]
        wl = np.stack([wl[i] for i in order])
        motif = np.stack([motif[i] for i in order])
        stats = np.stack([stats[i] for i in order])
        shape = np.stack([shape[i] for i in order])
        space = FeatureSpace(weights=weights, wl_iteration_weights=wl_iteration_weights,
                             text_weight=text_weight if text else 0.0, power=power)
        space.fit(wl, stats)
        emb = space.transform(wl, motif, stats, shape)
        text_emb = None
        if text:
            from fastarch.retrieval.describe import describe, embed_texts

            descriptions = [describe(g) for g in graphs]
            for e, d in zip(entries, descriptions):
                e["description"] = d
            text_emb = embed_texts(descriptions)
        by_source = {}
        for r in recs:
            s = by_source.setdefault(r.get("source", r["name"].split("/")[0]),
                                     {"records": 0, "indexed": 0})
            s["records"] += 1
            s["indexed"] += r in ok
        meta = {
            "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                        time.gmtime()),
            "architectures": len(ok), "rows": len(entries), "failed": failed,
            "build_failed": sorted(r["name"] for r in recs if r.get("status") == "build_failed"),
            "by_source": by_source, "space": space.to_dict(),
        }
        return cls(entries, emb, text_emb, space, meta)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index (compressed npz, float16 embeddings)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = dict(self.meta, entries=self.entries)
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "emb": self.emb.astype(np.float16),
            "idf": self.space.idf.astype(np.float32),
            "stat_mean": self.space.stat_mean, "stat_std": self.space.stat_std,
        }
        if self.text is not None:
            arrays["text"] = self.text.astype(np.float16)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArchitectureIndex:
        """Read an index file; raises ValueError naming the file when it is not one."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"index file {str(path)!r} does not exist "
                                    "(build one with `fastarch index build`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                emb, idf = z["emb"], z["idf"]
                mean, std = z["stat_mean"], z["stat_std"]
                text = z["text"] if "text" in z.files else None
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a fastarch index file: {exc}") from exc
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"index file {str(path)!r} has format version {version}, this "
                             f"fastarch reads versions {READABLE_VERSIONS}: rebuild it")
        entries = header.pop("entries")
        space = FeatureSpace.from_arrays(idf, mean, std, header.get("space", {}))
        return cls(entries, emb, text, space, header)

    # -- queries --------------------------------------------------------------------------
    def embed_graph(self, g: OpGraph) -> np.ndarray:
        wl, motif, stats, _, shape = raw_features(g)
        return self.space.transform(wl[None], motif[None], stats[None], shape[None])[0]

    def query_vector(self, g: OpGraph) -> np.ndarray:
        """The search vector of a graph outside the index, made as the rows' are: its graph
        embedding, fused (when the index fuses text) with the MiniLM embedding of its
        automatically written description."""
        emb = self.embed_graph(g)[None]
        text = None
        if self.text is not None and self.space.text_weight > 0:
            from fastarch.retrieval.describe import describe, embed_texts, query_in_bf16

            description = describe(g)
            row = self.row_of_description.get(description)
            # a description already in the index was encoded when it was built: its stored
            # embedding is the one MiniLM gives for that text (so a zoo architecture's query
            # vector is its row's), only new texts go through MiniLM (~10-20 ms here in bf16;
            # the text carries 0.3 of the fused vector, see query_in_bf16 for what bf16 moves)
            text = (self.text[row][None] if row is not None
                    else embed_texts([description], bf16=query_in_bf16()))
        return self.space.fuse(emb, text)[0]

    @functools.cached_property
    def row_of_description(self) -> dict[str, int]:
        """``{description: row}`` of the rows' written descriptions (empty without text)."""
        if self.text is None:
            return {}
        return {e["description"]: i for i, e in enumerate(self.entries) if e.get("description")}

    def scores(self, q: np.ndarray, text: bool = False) -> np.ndarray:
        """Cosine similarity of ``q`` with every row: its search vector, or with ``text=True``
        its description's text embedding (both unit vectors).

        Computed on the calling thread, not by ``matrix @ q``: numpy's OpenBLAS runs a gemv
        of this size (1428 x 3492) on all cores and its workers then spin on them; on the
        2-core machine with another job on the other core that made the scan ~8 ms and the
        next query's MiniLM encoding ~2x slower. The search vectors go through ``np.vecdot``
        (a dot product per row: 0.9 ms, against 1.8 ms for einsum and 0.3 ms for OpenBLAS on
        an idle machine), the text embeddings through einsum (0.1 ms), which kept the top-10
        order of float64 scores on all rows but one of the shipped index. The sums are the
        same products added in another order (float32 rounding, below 5e-7)."""
        q = np.asarray(q, np.float32)
        if text or not hasattr(np, "vecdot"):  # np.vecdot: numpy 2
            return np.einsum("ij,j->i", self.text if text else self.search, q)
        return np.vecdot(self.search, q)

    def hits(self, scores: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[Hit]:
        k = min(k, len(self.entries) - len(exclude))
        if k <= 0:
            return []
        scores = scores.astype(np.float32, copy=True)
        if exclude:
            scores[list(exclude)] = -np.inf
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        out = []
        for i in top:
            e = self.entries[i]
            out.append(Hit(e["name"], e["source"], e["family"], float(scores[i]), e["params"],
                           e["flops"], e.get("depth", 0), e.get("width", 0),
                           tuple(e.get("duplicates", ()))))
        return out

    def coverage(self) -> str:
        parts = [f"{v['indexed']}/{v['records']} {k}" for k, v in
                 sorted(self.meta.get("by_source", {}).items())]
        return (f"{self.meta.get('architectures', len(self))} architectures in {len(self)} "
                f"distinct graphs ({', '.join(parts)})")


@functools.lru_cache(maxsize=1)
def shipped_index() -> ArchitectureIndex:
    """The prebuilt index of the zoo that ships in the package (loaded once)."""
    return ArchitectureIndex.load(shipped_index_path())


SETTING_KEYS = ("weights", "wl_iteration_weights", "text_weight", "power")


@functools.lru_cache(maxsize=1)
def _shipped_header() -> dict:
    path = shipped_index_path()
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return json.loads(bytes(z["header"]).decode())


def shipped_settings() -> dict:
    """The search settings of the shipped index: ``{"weights", "wl_iteration_weights",
    "text_weight", "power"}``, keyword arguments of :meth:`ArchitectureIndex.from_records`.

    They are kept in one place, the shipped file's header, which the bench that tunes them
    writes (``bench/bench_retrieval.py --from-index ... --save-index``); ``fastarch index build``
    reads them from there, so a rebuilt index searches with the tuned settings. Empty when no
    index ships (the builder then uses the :class:`FeatureSpace` defaults).
    """
    space = _shipped_header().get("space", {})
    return {k: json.loads(json.dumps(space[k])) for k in SETTING_KEYS if k in space}


@functools.lru_cache(maxsize=1)
def shipped_build_failures() -> tuple[str, ...]:
    """Names the shipped index build could not build (read from its header only)."""
    return tuple(_shipped_header().get("build_failed", ()))
