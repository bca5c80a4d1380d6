"""Name-blind embeddings of operator graphs.

Three blocks, each computed from the :class:`~fastarch.retrieval.graph.OpGraph` alone:

* Weisfeiler-Lehman subtree features: node labels refined ``iterations`` times from their
  predecessors and successors, every (iteration, label) hashed into ``WL_DIM`` buckets;
  counts are log-scaled, weighted by inverse document frequency over the index, L2-normalised.
* Motif histogram: the graph cut at its residual additions (the ``add`` of two computed tensors)
  into blocks, each block a multiset of op labels hashed into ``MOTIF_DIM`` buckets, plus the
  depth-2 WL label of every residual addition (the shape of what a block adds back). Repeated
  blocks are what characterise a family (Neural Architecture Retrieval's motifs).
* Layer shapes: a histogram of (op kind, weight shape), exact and in powers of two (graphs
  read before shapes were recorded have an empty block).
* Global statistics: log params, log FLOPs, log depth, log width, the share of each op kind and
  the kind of input (image, text, audio, video), standardised over the index.

The blocks are weighted and concatenated; cosine similarity of the result is the score. The
search vectors also raise each block to a power (``FeatureSpace.power``, entry-wise, then
L2-normalised again) before weighting: an exponent below 1 flattens the counts towards
presence/absence, so a bucket that a big model repeats many times no longer outweighs the
buckets that say which kinds of layers and connections the graph has at all.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np

from fastarch.retrieval.graph import OpGraph

__all__ = [
    "MOTIF_DIM",
    "STAT_KINDS",
    "WL_DIM",
    "FeatureSpace",
    "raw_features",
    "wl_hash",
    "wl_labels",
]

WL_DIM = 2048
MOTIF_DIM = 512
SHAPE_DIM = 512
WL_ITERATIONS = 3
# op kinds whose share of the graph is a statistic
STAT_KINDS = ("conv", "conv.dw", "conv.k1", "linear", "matmul", "attention", "softmax",
              "layer_norm", "batch_norm", "group_norm", "math", "relu", "gelu", "silu",
              "sigmoid", "hardswish", "add", "mul", "concat", "max_pool", "avg_pool",
              "global_pool", "roll", "rnn", "embedding", "resize", "conv_transpose", "topk")
# what the network reads (from its example inputs, not its name)
INPUT_KINDS = ("image", "text", "audio", "video")
N_STATS = 4 + len(STAT_KINDS) + len(INPUT_KINDS)
BLOCKS = ("wl", "motif", "stats", "shape")  # in the order of the embedding's columns


def _h(*parts) -> int:
    """A stable 63-bit hash (Python's hash() of str changes between processes)."""
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _neighbours(g: OpGraph):
    preds = [[] for _ in g.labels]
    succs = [[] for _ in g.labels]
    for s, d in g.edges:
        if 0 <= s < len(g.labels) and 0 <= d < len(g.labels) and s != d:
            preds[d].append(s)
            succs[s].append(d)
    return preds, succs


def wl_labels(g: OpGraph, iterations: int = WL_ITERATIONS) -> list[list[int]]:
    """Per iteration, the WL label (int) of every node; iteration 0 is the op label."""
    preds, succs = _neighbours(g)
    cur = [_h("op", label) for label in g.labels]
    out = [cur]
    for it in range(1, iterations + 1):
        nxt = [
            _h(it, cur[v], tuple(sorted(cur[p] for p in preds[v])),
               tuple(sorted(cur[s] for s in succs[v])))
            for v in range(len(cur))
        ]
        out.append(nxt)
        cur = nxt
    return out


def wl_hash(g: OpGraph, iterations: int = WL_ITERATIONS, labels=None) -> str:
    """Hex digest of the graph's WL label multiset: identical graphs hash the same."""
    labels = labels or wl_labels(g, iterations)
    counts = sorted(Counter(labels[-1]).items())
    return hashlib.blake2b(repr((len(g.labels), counts)).encode(), digest_size=12).hexdigest()


def _kind(label: str) -> str:
    return label.split(".", 1)[0]


def _stat_kinds(label: str):
    k = _kind(label)
    if k.startswith("conv") and k != "conv_transpose":
        yield "conv"
        if ".dw" in label:
            yield "conv.dw"
        if ".k1" in label:
            yield "conv.k1"
    elif label in ("add", "mul"):  # residual add / gating mul between computed tensors
        yield label
    else:
        yield k


def shape_counts(g: OpGraph) -> np.ndarray:
    """Histogram of layer shapes: (op kind, exact weight shape) and (op kind, shape in powers
    of two), hashed into ``SHAPE_DIM`` buckets. Zero when the graph has no shapes."""
    out = np.zeros(SHAPE_DIM, np.float32)
    for label, dims in zip(g.labels, g.dims or ()):
        if not dims:
            continue
        kind = _kind(label)
        out[_h("shape", kind, tuple(dims)) % SHAPE_DIM] += 1
        coarse = tuple(int(round(math.log2(max(d, 1)))) for d in dims)
        out[_h("shape2", kind, coarse) % SHAPE_DIM] += 1
    return out


def raw_features(g: OpGraph, iterations: int = WL_ITERATIONS):
    """``(wl_counts, motif_counts, stats, wl_hash, shape_counts)``: un-normalised blocks of one
    graph."""
    labels = wl_labels(g, iterations)
    wl = np.zeros((iterations + 1, WL_DIM), np.float32)
    for it, layer in enumerate(labels):
        for lab, c in Counter(layer).items():
            wl[it, lab % WL_DIM] += c
    motif = np.zeros(MOTIF_DIM, np.float32)
    # blocks between residual adds, in execution order
    block: list[str] = []
    for i, label in enumerate(g.labels):
        if label == "add":
            if block:
                motif[_h("block", tuple(sorted(Counter(block).items()))) % MOTIF_DIM] += 1
            motif[_h("res", labels[min(2, iterations)][i]) % MOTIF_DIM] += 1
            block = []
        elif not label.endswith(".c"):
            block.append(label)
    if block:
        motif[_h("block", tuple(sorted(Counter(block).items()))) % MOTIF_DIM] += 1
    n = max(1, len(g.labels))
    kinds = Counter(k for label in g.labels for k in _stat_kinds(label))
    stats = np.array(
        [math.log10(max(g.params, 1)), math.log10(max(g.flops, 1)),
         math.log2(max(g.depth, 1)), math.log2(max(g.width, 1))]
        + [kinds.get(k, 0) / n for k in STAT_KINDS]
        + [float(g.input_kind == k) for k in INPUT_KINDS], np.float32)
    return wl, motif, stats, wl_hash(g, iterations, labels), shape_counts(g)


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class FeatureSpace:
    """How raw blocks become one embedding: IDF and standardisation fitted on the index, and
    block weights. Stored in the index file so that queries land in the same space."""

    def __init__(self, idf=None, stat_mean=None, stat_std=None, weights=None,
                 wl_iteration_weights=None, text_weight: float = 0.0, power=None):
        self.idf = None if idf is None else np.asarray(idf, np.float32)
        self.stat_mean = None if stat_mean is None else np.asarray(stat_mean, np.float32)
        self.stat_std = None if stat_std is None else np.asarray(stat_std, np.float32)
        self.weights = {"wl": 1.0, "motif": 0.6, "stats": 0.5, "shape": 0.5}
        self.weights.update(weights or {})
        self.wl_iteration_weights = list(wl_iteration_weights or [1.0, 1.0, 1.0, 1.0])
        # share (of squared norm) of the description's MiniLM embedding in the search vector
        self.text_weight = float(text_weight)
        if not 0.0 <= self.text_weight < 1.0:
            raise ValueError(f"text_weight must be in [0, 1), got {text_weight!r}")
        # per-block exponent applied to the search vectors (1 = the block as embedded)
        self.power = {k: 1.0 for k in BLOCKS}
        for k, v in (power or {}).items():
            if k not in self.power:
                raise ValueError(f"power: unknown block {k!r} (blocks: {list(BLOCKS)})")
            if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                raise ValueError(f"power[{k!r}] must be in (0, 1], got {v!r}")
            self.power[k] = float(v)

    @property
    def dim(self) -> int:
        return WL_DIM + MOTIF_DIM + N_STATS + SHAPE_DIM

    def fit(self, wl: np.ndarray, stats: np.ndarray) -> FeatureSpace:
        """``wl``: (N, iterations+1, WL_DIM) counts; ``stats``: (N, N_STATS)."""
        present = (wl.sum(axis=1) > 0).sum(axis=0)  # documents containing each bucket
        n = wl.shape[0]
        self.idf = np.log((1 + n) / (1 + present)).astype(np.float32) + 1.0
        self.stat_mean = stats.mean(axis=0)
        self.stat_std = stats.std(axis=0) + 1e-3
        return self

    def transform(self, wl: np.ndarray, motif: np.ndarray, stats: np.ndarray,
                  shape: np.ndarray | None = None) -> np.ndarray:
        """Embeddings (N, dim), L2-normalised, from batched raw blocks."""
        if shape is None:
            shape = np.zeros((wl.shape[0], SHAPE_DIM), np.float32)
        w = np.asarray(self.wl_iteration_weights, np.float32)[: wl.shape[1]]
        wl_vec = (np.log1p(wl) * w[None, :, None]).sum(axis=1) * self.idf[None, :]
        parts = [
            self.weights["wl"] * _l2(wl_vec),
            self.weights["motif"] * _l2(np.log1p(motif)),
            self.weights["stats"] * _l2((stats - self.stat_mean) / self.stat_std),
            self.weights["shape"] * _l2(np.log1p(shape)),
        ]
        return _l2(np.concatenate(parts, axis=1)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "wl_iteration_weights": self.wl_iteration_weights,
                "text_weight": self.text_weight, "power": self.power}

    @classmethod
    def from_arrays(cls, idf, stat_mean, stat_std, cfg: dict) -> FeatureSpace:
        return cls(idf, stat_mean, stat_std, cfg.get("weights"), cfg.get("wl_iteration_weights"),
                   cfg.get("text_weight", 0.0), cfg.get("power"))

    def blocks(self, emb: np.ndarray) -> list[np.ndarray]:
        """The L2-normalised blocks (WL, motif, stats, shape) of embeddings made by
        :meth:`transform` (a block of weight 0, or empty, comes back as zeros)."""
        cuts = np.cumsum([0, WL_DIM, MOTIF_DIM, N_STATS, SHAPE_DIM])
        return [_l2(np.asarray(emb[:, a:b], np.float32)) for a, b in zip(cuts[:-1], cuts[1:])]

    def reweight(self, emb: np.ndarray, weights: dict) -> np.ndarray:
        """Embeddings made with this space's block weights, re-made with ``weights`` (no
        re-extraction: each block is recovered from ``emb``; a block whose weight was 0 stays
        0). Updates ``self.weights``."""
        for k, v in weights.items():
            if k not in self.weights:
                raise ValueError(f"weights: unknown block {k!r} (blocks: {list(self.weights)})")
            if self.weights[k] == 0 and v != 0:
                raise ValueError(f"weights: block {k!r} had weight 0 and cannot be recovered")
        self.weights = dict(self.weights, **weights)
        parts = [self.weights[n] * b for n, b in zip(BLOCKS, self.blocks(emb))]
        return _l2(np.concatenate(parts, axis=1)).astype(np.float32)

    def powered(self, emb: np.ndarray) -> np.ndarray:
        """Embeddings with each block raised entry-wise to its ``power`` (sign kept) and
        L2-normalised again, then weighted as before; ``emb`` itself when every power is 1."""
        emb = np.asarray(emb, np.float32)
        if all(p == 1.0 for p in self.power.values()):
            return emb
        parts = []
        for n, b in zip(BLOCKS, self.blocks(emb)):
            p = self.power[n]
            if p != 1.0:
                b = _l2(np.sign(b) * np.abs(b) ** p)
            parts.append(self.weights[n] * b)
        return _l2(np.concatenate(parts, axis=1)).astype(np.float32)

    def fuse(self, emb: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        """The search vectors: graph embeddings (blocks raised to ``power``, see
        :meth:`powered`), with the description's text embedding appended at ``text_weight``
        (graph embeddings alone when it is 0 or there is none)."""
        emb = self.powered(emb)
        if text is None or self.text_weight <= 0:
            return emb
        a = self.text_weight
        return np.concatenate([math.sqrt(1 - a) * _l2(emb),
                               math.sqrt(a) * _l2(np.asarray(text, np.float32))],
                              axis=-1).astype(np.float32)
