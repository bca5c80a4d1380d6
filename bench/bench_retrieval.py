"""Retrieval quality of the zoo index: leave-one-out family retrieval, and query latency.

Relevance is the architecture family (timm module, torchvision builder module, transformers
model-type stem: ``fastarch.zoo.family``), never the name. Every distinct graph of the index is
a query in turn; the others are ranked by cosine similarity of the name-blind graph embedding;
queries whose family has no other member are skipped. Identical graphs are collapsed first
(one row; a row counts as relevant when any of its members is of the query's family).

Metrics at K (binary relevance): MRR@K (reciprocal rank of the first relevant hit, 0 past K),
MAP@K (AP@K = sum over relevant ranks i <= K of precision@i, divided by min(R, K), R = relevant
rows), NDCG@K, P@10.

Families are split in two by a hash of their name: the block weights are tuned (a small grid)
on the queries of "tuning" families only, and the figures are also reported on the "held-out"
families that no tuning saw.

The search vector of a row is its graph embedding fused with the MiniLM embedding of its
automatically written description (made from the graph, never the name) at ``text_weight``;
each block of the graph embedding is first raised entry-wise to a power (``FeatureSpace.power``:
below 1 flattens repeated counts towards presence). Powers, block weights and that share are
tuned together, on tuning families only (``--from-index``: the grid is scored from per-block
similarity matrices, the chosen setting is then measured through the index's own search
vectors, the ones ``fastarch.retrieve`` scans).

Usage:
    python bench/bench_retrieval.py --cache build/retrieval/zoo_graphs.jsonl \
        [--write bench/results/retrieval.md] [--save-index src/fastarch/data/zoo_index.npz]
    python bench/bench_retrieval.py --from-index src/fastarch/data/zoo_index.npz \
        [--write ...] [--save-index ...]   # tune powers, block weights + text of a built
                                           # index, no re-extraction (its blocks are
                                           # recovered from it; every block must have a
                                           # weight above 0)
    nice -n 5 python bench/bench_retrieval.py --recipes src/fastarch/data/zoo_index_recipes.json \
        [--write bench/results/retrieval.md]   # measure compression plans, store the recipes
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

NAR = {"MRR@20": 0.825, "MAP@20": 0.598, "NDCG@20": 0.705}


def held_out(family: str) -> bool:
    return hashlib.blake2b(family.encode(), digest_size=2).digest()[0] % 2 == 1


def loo_order(sims: np.ndarray, kmax: int) -> np.ndarray:
    """Per query row, the other rows best first (the first ``kmax``), from a similarity matrix."""
    sims = np.array(sims, dtype=np.float32, copy=True)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :kmax]


def loo_metrics(index, rows=None, ks=(20, 50, 100)) -> dict:
    """Leave-one-out metrics over ``rows`` (default: every row) as queries, ranking by the
    index's search vectors (what ``fastarch.retrieve`` scans)."""
    return scores_metrics(index.search @ index.search.T, index, rows, ks)


def scores_metrics(sims: np.ndarray, index, rows=None, ks=(20, 50, 100)) -> dict:
    """Leave-one-out metrics of the ranking given by ``sims`` (rows x rows) over ``rows``."""
    fams = [e["family"] for e in index.entries]
    fam_sets = [{e["family"], *e.get("duplicate_families", ())} for e in index.entries]
    names = sorted(set(fams))
    fid = {f: i for i, f in enumerate(names)}
    member = np.zeros((len(index), len(names)), bool)
    for i, fs in enumerate(fam_sets):
        for f in fs:
            if f in fid:
                member[i, fid[f]] = True
    kmax = max(ks)
    order = loo_order(sims, kmax)
    rows = range(len(index)) if rows is None else rows
    out = {f"{m}@{k}": [] for k in ks for m in ("MRR", "MAP", "NDCG")}
    out["P@10"] = []
    n_queries = 0
    for q in rows:
        rel_all = member[:, fid[fams[q]]].copy()
        rel_all[q] = False
        r_total = int(rel_all.sum())
        if r_total == 0:
            continue
        n_queries += 1
        rel = rel_all[order[q]].astype(np.float64)
        rel = np.pad(rel, (0, kmax - len(rel)))  # an index smaller than K: no hits past it
        for k in ks:
            rk = rel[:k]
            hits = np.flatnonzero(rk)
            out[f"MRR@{k}"].append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
            prec = np.cumsum(rk) / np.arange(1, k + 1)
            out[f"MAP@{k}"].append(float((prec * rk).sum() / min(r_total, k)))
            disc = 1.0 / np.log2(np.arange(2, k + 2))
            ideal = disc[: min(r_total, k)].sum()
            out[f"NDCG@{k}"].append(float((rk * disc).sum() / ideal))
        out["P@10"].append(float(rel[:10].mean()))
    res = {m: float(np.mean(v)) if v else float("nan") for m, v in out.items()}
    res["queries"] = n_queries
    return res


def _rows_where(index, pred):
    return [i for i, e in enumerate(index.entries) if pred(e)]


def tune(records, raw, grid) -> tuple[dict, list]:
    """Pick the block weights with the best mean of MRR@20, MAP@20, NDCG@20 on tuning
    families only."""
    from fastarch.retrieval.index import ArchitectureIndex

    trials = []
    for weights, itw in grid:
        idx = ArchitectureIndex.from_records(records, text=False, weights=weights,
                                             wl_iteration_weights=itw, raw=raw)
        m = loo_metrics(idx, _rows_where(idx, lambda e: not held_out(e["family"])), ks=(20,))
        score = (m["MRR@20"] + m["MAP@20"] + m["NDCG@20"]) / 3
        trials.append((score, weights, itw, m))
    trials.sort(key=lambda t: -t[0])
    return {"weights": trials[0][1], "wl_iteration_weights": trials[0][2]}, trials


def latency(index) -> dict:
    """Median query latency (ms) over the index: name, text (MiniLM) and module (meta model)."""
    import torch

    from fastarch import zoo
    from fastarch.retrieval.retrieve import retrieve

    names = [e["name"] for e in index.entries][:: max(1, len(index) // 100)]
    retrieve(names[0], k=10, index=index)
    t_name = []
    for n in names:
        t = time.perf_counter()
        retrieve(n, k=10, index=index)
        t_name.append((time.perf_counter() - t) * 1e3)
    texts = ["a small vision transformer with windowed attention",
             "a large language model with rotary embeddings and RMS norm",
             "a mobile convolutional network with depthwise convolutions",
             "a speech recognition model with convolutions and attention"]
    retrieve(texts[0], k=10, index=index)
    t_text = []
    for q in texts * 5:
        t = time.perf_counter()
        retrieve(q, k=10, index=index)
        t_text.append((time.perf_counter() - t) * 1e3)
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    def median_ms(fn, n=9):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    torch.manual_seed(0)
    cpu_model = torchvision.models.resnet18()  # what a user passes: real weights on CPU
    t_mod = median_ms(lambda: retrieve(cpu_model, k=10, index=index))
    # larger graphs (what a user's ViT or decoder costs): layer norms, GELUs, attention
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    vit = timm.create_model("vit_base_patch16_224")
    t_vit = median_ms(lambda: retrieve(vit, k=10, index=index))
    del vit
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32000))
    t_llama = median_ms(lambda: retrieve(llama, k=10, index=index))
    del llama
    meta_model = zoo.create("torchvision/resnet18", device="meta")
    x = torch.zeros(1, 3, 224, 224, device="meta")
    t_meta = median_ms(lambda: retrieve(meta_model, k=10, index=index, example_inputs=x))
    # a graph of no zoo architecture: its description is new, so MiniLM encodes it
    novel = ResNet(BasicBlock, [1, 2, 1, 1])
    t_novel = median_ms(lambda: retrieve(novel, k=10, index=index))
    # its two main parts: the graph read on meta, and MiniLM on the new description
    from fastarch.retrieval.describe import describe, embed_texts, query_in_bf16
    from fastarch.retrieval.retrieve import graph_of_module

    t_novel_graph = median_ms(lambda: graph_of_module(novel))
    description = describe(graph_of_module(novel))
    assert description not in index.row_of_description, "the new graph's description is known"
    t_novel_text = median_ms(lambda: embed_texts([description], bf16=query_in_bf16()))
    from fastarch.models.minilm import embed

    threads = torch.get_num_threads()
    precisions = ("bf16", "fp32") if query_in_bf16() else ("fp32",)
    t_on = {}
    try:
        for n in (1, 2):  # what embed_texts chooses between (describe.query_threads)
            torch.set_num_threads(n)
            for prec in precisions:  # bf16 is what a query uses where the CPU has bf16 dots
                t_on[n, prec] = median_ms(lambda: embed([description], bf16=prec == "bf16"))
    finally:
        torch.set_num_threads(threads)
    q = index.search[0]
    t_scan = []
    for _ in range(200):
        t = time.perf_counter()
        index.hits(index.scores(q), 10)
        t_scan.append((time.perf_counter() - t) * 1e3)
    return {"name": statistics.median(t_name), "text": statistics.median(t_text),
            "module: torchvision resnet18() with weights on CPU": t_mod,
            "module: resnet18 built on meta": t_meta,
            "module: timm vit_base_patch16_224 with weights on CPU": t_vit,
            "module: transformers Llama (8 layers x 512) with weights on CPU": t_llama,
            "module: new graph (ResNet [1,2,1,1], description encoded by MiniLM)": t_novel,
            "- of which: graph read (meta forward, `graph_of_module`)": t_novel_graph,
            "- of which: MiniLM encoding of its description (`embed_texts`)": t_novel_text,
            **{f"- that encoding on {n} thread{'s' * (n > 1)}, {prec}": t
               for (n, prec), t in t_on.items()},
            "scan + top-10 only": statistics.median(t_scan)}


# (zoo name, builder kwargs): small configs for the transformers, so that a run stays short;
# the recipe is stored under the zoo name with the config it was measured on
RECIPE_MODELS = [
    ("torchvision/resnet18", {}), ("torchvision/mobilenet_v2", {}),
    ("torchvision/mobilenet_v3_small", {}), ("torchvision/squeezenet1_1", {}),
    ("torchvision/shufflenet_v2_x0_5", {}),
    ("timm/resnet10t", {}), ("timm/efficientnet_b0", {}), ("timm/convnext_atto", {}),
    ("timm/vit_tiny_patch16_224", {}), ("timm/mobilevit_xxs", {}),
    ("transformers/bert", {"num_hidden_layers": 2, "hidden_size": 256,
                           "num_attention_heads": 4, "intermediate_size": 1024}),
    ("transformers/distilbert", {"n_layers": 2, "dim": 256, "n_heads": 4, "hidden_dim": 1024}),
    ("transformers/gpt2", {"n_layer": 2, "n_embd": 256, "n_head": 4}),
    ("transformers/llama", {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 688}),
    ("transformers/qwen2", {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 688}),
]
RECIPE_SEQ_LEN = 128  # tokens per example for the transformers
COSINE_FLOOR = 0.9  # output cosine vs dense that a recipe must reach
MIN_SPEEDUP = 1.05


def recipe_plans(name: str) -> list[str]:
    """Candidate plans: structured pruning (ratio x criterion) for every model, activation
    sparsity where fastarch.sparsify knows the model (transformers, ViT), an attention variant
    for the decoders and encoders."""
    plans = ["prune=0.05:l2", "prune=0.1:l2", "prune=0.1:l1", "prune=0.2:l2", "prune=0.3:l2"]
    if name.startswith("transformers/") or "vit_" in name:
        plans += ["sparsity=0.3:teal", "sparsity=0.5:teal"]
    if name in ("transformers/gpt2", "transformers/llama", "transformers/qwen2"):
        plans += ["attention=sliding_window:64"]
    elif name == "transformers/bert":
        plans += ["attention=local:32"]
    return plans


def _random_like(args, kwargs, gen, vocab: int):
    """Inputs shaped as ``(args, kwargs)`` with random values (token ids below ``vocab``)."""
    import torch

    def fill(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return torch.randint(0, vocab, t.shape, generator=gen, dtype=t.dtype)

    return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}


def _main_output(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def _cosine(a, b) -> float:
    """Mean over the batch of the cosine of each example's flattened output."""
    import torch

    a, b = a.float().flatten(1), b.float().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def make_recipes(path, models=RECIPE_MODELS, rounds: int = 15, floor: float = COSINE_FLOOR,
                 log=print) -> tuple[dict, list]:
    """For each model: try each candidate plan on a copy of the dense model, measure the output
    cosine against dense on random inputs (4 examples not used for calibration or pruning) and
    the latency of dense and compressed in interleaved rounds in this process
    (``timing.interleaved``), and keep the fastest plan that reaches ``floor`` with a speed-up
    of at least ``MIN_SPEEDUP`` as the model's recipe. Returns ``(recipes, trials)``; the
    recipes file is rewritten after every model (an interrupted run keeps what it measured)."""
    import copy
    import json
    import os
    import warnings

    import torch
    from timing import interleaved, machine

    from fastarch import zoo
    from fastarch.retrieval.compress import compress

    # one thread: batch-1 forwards of small models on a shared 2-core machine vary far less
    # than with two threads fighting other jobs (ratios from two threads swung 2-3x)
    torch.set_num_threads(1)
    recipes, trials = {}, []
    where = f"{machine()}, load average {os.getloadavg()[0]:.1f} at start"
    for name, config in models:
        t_model = time.perf_counter()
        torch.manual_seed(0)
        try:
            dense = zoo.create(name, device="cpu", **config).eval()
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: not built ({exc})")
            continue
        a, kw = zoo.example_inputs(name, dense, device="cpu", seq_len=RECIPE_SEQ_LEN)
        vocab = min(int(getattr(getattr(dense, "config", None), "vocab_size", 1000) or 1000), 1000)
        gen = torch.Generator().manual_seed(1)
        example = _random_like(a, kw, gen, vocab)
        calib = [(_random_like(a, kw, gen, vocab)) for _ in range(2)]
        calib = [c[1] if c[1] else c[0] for c in calib]
        # 4 evaluation examples (batch 4), never seen by calibration or pruning
        ea, ekw = _random_like(tuple(t.expand(4, *t.shape[1:]) for t in a),
                               {k: v.expand(4, *v.shape[1:]) if isinstance(v, torch.Tensor)
                                and v.dim() else v for k, v in kw.items()}, gen, vocab)
        with torch.no_grad():
            ref = _main_output(dense(*ea, **ekw))
        ex = example[1] if example[1] else example[0]
        best = None
        for plan in recipe_plans(name):
            model = copy.deepcopy(dense)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, rep = compress(model, plan, calib=calib, example_inputs=ex, measure=False)
            failed = [f"{t}: {d}" for t, st, d in rep.steps if st != "applied"]
            row = {"model": name, "plan": plan, "applied": not failed, "cosine": None,
                   "speedup": None}
            if not failed:
                try:
                    with torch.no_grad():
                        row["cosine"] = _cosine(ref, _main_output(model(*ea, **ekw)))
                        fa, fkw = example
                        t = interleaved({"dense": lambda: dense(*fa, **fkw),
                                         "plan": lambda: model(*fa, **fkw)},
                                        rounds=rounds, warmup=2, min_time=1.0)
                    row.update(dense_ms=t["dense"] * 1e3, plan_ms=t["plan"] * 1e3,
                               speedup=t["dense"] / t["plan"])
                except Exception as exc:  # noqa: BLE001
                    failed = [f"run: {type(exc).__name__}: {exc}"[:200]]
                    row["applied"] = False
            row["params_before"] = sum(p.numel() for p in dense.parameters())
            row["params_after"] = sum(p.numel() for p in model.parameters())
            row["note"] = "; ".join(failed)[:200]
            trials.append(row)
            log(f"{name:32} {plan:34} " + (
                f"cos {row['cosine']:.4f} x{row['speedup']:.2f} "
                f"({row['dense_ms']:.1f} -> {row['plan_ms']:.1f} ms)" if row["applied"]
                else f"not applied: {row['note'][:90]}"))
            ok = row["applied"] and row["cosine"] >= floor and row["speedup"] >= MIN_SPEEDUP
            if ok and (best is None or row["speedup"] > best["speedup"]):
                best = row
            del model
        if best is not None:
            recipes[name] = {"plan": best["plan"], "measured": {
                "speedup": round(best["speedup"], 3), "cosine": round(best["cosine"], 4),
                "latency_dense_ms": round(best["dense_ms"], 2),
                "latency_ms": round(best["plan_ms"], 2),
                "params_before": best["params_before"], "params_after": best["params_after"],
                "config": config, "inputs": "batch 1: " + (
                    f"{RECIPE_SEQ_LEN} random tokens" if name.startswith("transformers/")
                    else "random image of the default size"),
                "cosine_floor": floor, "machine": where + " (shared, loaded: ratios are noisy)",
                "date": time.strftime("%Y-%m-%d"),
                "source": "bench/bench_retrieval.py --recipes"}}
        log(f"{name}: recipe {best['plan'] if best else 'none'} "
            f"({time.perf_counter() - t_model:.0f} s)")
        del dense
        Path(path).write_text(json.dumps(recipes, indent=1, sort_keys=True) + "\n")
    return recipes, trials


def recipes_markdown(recipes: dict, trials: list, command: str, seconds: float) -> str:
    import os

    from timing import machine

    md = ["## Compression recipes (fastarch.recommend)", "",
          f"Machine: {machine()}; shared with other jobs and loaded (load average "
          f"{os.getloadavg()[0]:.1f} at the end), CPU only; date "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {seconds / 60:.1f} min.",
          f"Command: `{command}`", "",
          "Each candidate plan is applied (`fastarch.compress`) to a copy of the dense model "
          "(random weights: the zoo builds without downloads; the transformers in a small "
          "config), compared with dense on 4 random examples never used for pruning or "
          f"calibration (output cosine), and timed against dense in interleaved rounds in the "
          f"same process (batch 1, median). The recipe is the fastest plan with cosine >= "
          f"{COSINE_FLOOR} and speed-up >= {MIN_SPEEDUP}; it is stored in "
          "`src/fastarch/data/zoo_index_recipes.json`, which `fastarch.recommend` reads.", "",
          "| architecture | recipe | speed-up | cosine | dense ms | ms | params |",
          "|---|---|---:|---:|---:|---:|---|"]
    from fastarch.retrieval.graph import human

    names = list(dict.fromkeys(t["model"] for t in trials))
    for n in names:
        r = recipes.get(n)
        if r is None:
            md.append(f"| {n} | none met the floor | | | | | |")
            continue
        m = r["measured"]
        md.append(f"| {n} | `{r['plan']}` | {m['speedup']:.2f} | {m['cosine']:.4f} | "
                  f"{m['latency_dense_ms']:.1f} | {m['latency_ms']:.1f} | "
                  f"{human(m['params_before'])} -> {human(m['params_after'])} |")
    md += ["", "<details><summary>every candidate</summary>", "",
           "| architecture | plan | cosine | speed-up | note |", "|---|---|---:|---:|---|"]
    for t in trials:
        cos = f"{t['cosine']:.4f}" if t["cosine"] is not None else ""
        sp = f"{t['speedup']:.2f}" if t["speedup"] is not None else ""
        md.append(f"| {t['model']} | `{t['plan']}` | {cos} | {sp} | "
                  f"{t['note'].replace('|', '/')[:120]} |")
    md += ["", "</details>", ""]
    return "\n".join(md)


def replace_section(path, body: str) -> None:
    """Put ``body`` (a markdown section starting with its ``## `` heading) into the file at
    ``path`` in place of the section of the same heading, or at its end."""
    path = Path(path)
    heading = body.splitlines()[0]
    lines = path.read_text().splitlines() if path.exists() else []
    if heading in lines:
        a = lines.index(heading)
        b = next((i for i in range(a + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[a:b] = body.rstrip("\n").splitlines() + [""]
    else:
        lines += [""] + body.rstrip("\n").splitlines()
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def _table(rows: list[tuple[str, dict]], metrics) -> str:
    head = "| queries | n | " + " | ".join(metrics) + " |\n"
    head += "|---|---:|" + "---:|" * len(metrics) + "\n"
    for label, m in rows:
        head += f"| {label} | {m['queries']} | " + " | ".join(
            f"{m[k]:.3f}" for k in metrics) + " |\n"
    return head


def reweighted(index, weights: dict, text_weight: float, power: dict | None = None):
    """A copy of ``index`` with its blocks re-weighted, its text fused at ``text_weight`` and
    its search vectors' blocks raised to ``power`` (default: all 1)."""
    import copy

    from fastarch.retrieval.features import BLOCKS
    from fastarch.retrieval.index import FORMAT_VERSION, ArchitectureIndex

    space = copy.deepcopy(index.space)
    emb = space.reweight(index.emb, weights)
    space.text_weight = float(text_weight) if index.text is not None else 0.0
    space.power = {k: float((power or {}).get(k, 1.0)) for k in BLOCKS}
    meta = dict(index.meta, space=space.to_dict(), format_version=FORMAT_VERSION)
    return ArchitectureIndex(index.entries, emb, index.text, space, meta)


# block weights relative to WL; power_wl for the WL block, power_hist for the motif and
# layer-shape histograms (the stats block is never powered)
FUSION_GRID = {"power_wl": [1.0, 0.5, 0.25], "power_hist": [1.0, 0.25],
               "motif": [0.0, 0.15, 0.3], "stats": [0.05, 0.1, 0.25],
               "shape": [0.1, 0.25, 0.4, 0.6], "text_weight": [0.0, 0.2, 0.3, 0.4]}


def _powers(pw: float, ph: float) -> dict:
    return {"wl": pw, "motif": ph, "shape": ph}


class _BlockGrams:
    """Per-block cosine matrices of an index's rows (blocks raised to given powers), so that
    the search similarities of any block weights and text share are a weighted sum of them:
    exactly what the fused search vectors give, without re-making them for every setting."""

    def __init__(self, base, power: dict):
        from fastarch.retrieval.features import BLOCKS, _l2

        blocks = base.space.blocks(base.emb)
        self.grams, self.nonempty = {}, {}
        for n, b in zip(BLOCKS, blocks):
            p = power.get(n, 1.0)
            if p != 1.0:
                b = _l2(np.sign(b) * np.abs(b) ** p)
            self.grams[n] = b @ b.T
            self.nonempty[n] = (np.abs(b).sum(axis=1) > 0).astype(np.float32)
        t = None if base.text is None else _l2(base.text)
        self.text = None if t is None else t @ t.T

    def sims(self, weights: dict, text_weight: float) -> np.ndarray:
        num = sum(w * w * self.grams[n] for n, w in weights.items() if w)
        norm = np.sqrt(sum(w * w * self.nonempty[n] for n, w in weights.items() if w))
        s = num / np.maximum(np.outer(norm, norm), 1e-12)
        if self.text is not None and text_weight > 0:
            s = (1 - text_weight) * s + text_weight * self.text
        return s


def _tuning_score(m: dict) -> float:
    return (m["MRR@20"] + m["MAP@20"] + m["NDCG@20"]) / 3


def tune_fusion(base) -> tuple[list, list]:
    """Score every setting of ``FUSION_GRID`` on the queries of tuning families only; the
    trials ``(score, weights, text_weight, (power_wl, power_hist))``, best first, and the
    tuning rows."""
    start = dict(base.space.weights)
    tuning = _rows_where(base, lambda e: not held_out(e["family"]))
    trials = []
    t0 = time.perf_counter()
    for pw, ph in itertools.product(FUSION_GRID["power_wl"], FUSION_GRID["power_hist"]):
        grams = _BlockGrams(base, _powers(pw, ph))
        for mo, st, sh, tw in itertools.product(*(FUSION_GRID[k] for k in (
                "motif", "stats", "shape", "text_weight"))):
            w = {"wl": start["wl"], "motif": mo * start["wl"], "stats": st * start["wl"],
                 "shape": sh * start["wl"]}
            m = scores_metrics(grams.sims(w, tw), base, tuning, ks=(20,))
            trials.append((_tuning_score(m), w, tw, (pw, ph)))
        best_here = max((t for t in trials if t[3] == (pw, ph)), key=lambda t: t[0])
        print(f"powers wl {pw} hist {ph}: best tuning score {best_here[0]:.4f} "
              f"({best_here[1]}, text {best_here[2]}; {time.perf_counter() - t0:.0f} s)",
              flush=True)
    trials.sort(key=lambda t: -t[0])
    return trials, tuning


def from_index(a) -> int:
    """Tune block powers, block weights and text fusion of a built index on tuning families
    only."""
    from fastarch.retrieval.index import ArchitectureIndex

    base = ArchitectureIndex.load(a.from_index)
    for block in ("motif", "stats", "shape"):
        if base.space.weights[block] == 0:
            raise SystemExit(f"{a.from_index}: block {block!r} has weight 0 (it cannot be "
                             "recovered): give an index built with every block")
    trials, tuning = tune_fusion(base)
    best_score, best_w, best_tw, (best_pw, best_ph) = trials[0]
    index = reweighted(base, best_w, best_tw, _powers(best_pw, best_ph))
    # the grid's score of the chosen setting, measured again through the index's own search
    # vectors (the ones retrieve() scans)
    check = _tuning_score(loo_metrics(index, tuning, ks=(20,)))
    if abs(check - best_score) > 2e-3:
        raise SystemExit(f"tuning score {best_score:.4f} from the block grams but {check:.4f} "
                         "from the search vectors: they should agree")
    ks = (20, 50, 100)
    held = _rows_where(index, lambda e: held_out(e["family"]))
    groups = [("all", None)]
    for src in ("timm", "torchvision", "transformers"):
        groups.append((src, _rows_where(index, lambda e, s=src: e["source"] == s)))
    groups.append(("tuning families", tuning))
    groups.append(("held-out families", held))
    results = [(label, loo_metrics(index, rows, ks)) for label, rows in groups]

    # ablation: each setting measured through its own index's search vectors
    def best_of(pred):
        return next((t for t in trials if pred(t[3])), None)

    settings = [("input index as built (its block weights, no text, no powers)", base)]
    for label, t in [
            ("best of the grid without powers (the previous method: block weights + text)",
             best_of(lambda p: p == (1.0, 1.0))),
            ("best with a power on WL only", best_of(lambda p: p[0] != 1.0 and p[1] == 1.0)),
            ("best with powers on the histograms only",
             best_of(lambda p: p[0] == 1.0 and p[1] != 1.0))]:
        if t is not None:
            settings.append((f"{label}: powers {_powers(*t[3])}, text {t[2]}",
                             reweighted(base, t[1], t[2], _powers(*t[3]))))
    settings.append(("chosen setting without text", reweighted(base, best_w, 0.0,
                                                               _powers(best_pw, best_ph))))
    settings.append(("chosen setting (shipped)", index))
    abl = [(label, loo_metrics(idx, tuning, (20,)), loo_metrics(idx, None, (20,)),
            loo_metrics(idx, held, (20,))) for label, idx in settings]
    goal = []
    for label, m in [("all queries", results[0][1]), ("held-out families", results[-1][1])]:
        parts = [f"{k} {m[k]:.3f} {'>' if m[k] > v else '<='} {v} "
                 f"({'met' if m[k] > v else 'NOT met'})" for k, v in NAR.items()]
        goal.append(f"- {label}: " + "; ".join(parts))
    lat = latency(index) if a.save_index else {}
    if a.save_index:
        index.save(a.save_index)
        print(f"saved {a.save_index} ({Path(a.save_index).stat().st_size / 2**20:.1f} MiB)")
    m20 = ["MRR@20", "MAP@20", "NDCG@20", "P@10"]
    more = ["MRR@50", "MAP@50", "NDCG@50", "MRR@100", "MAP@100", "NDCG@100"]
    md = ["# Architecture retrieval (fastarch.retrieve)", "",
          "Machine: AMD EPYC (x86_64, AVX2 only, no AVX-512), 2 cores shared with other jobs "
          f"(loaded), CPU only; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
          "Command: `python bench/bench_retrieval.py --from-index " + a.from_index
          + (f" --save-index {a.save_index}" if a.save_index else "")
          + (f" --write {a.write}" if a.write else "") + "`", "",
          "## Coverage", "", f"{index.coverage()} (index built {base.meta.get('created')}; "
          "graphs not re-extracted for this run: the blocks of each row are recovered from its "
          "stored embedding and re-weighted).", "",
          "## Leave-one-out family retrieval (names never seen)", "",
          "Relevance = same family (timm module / torchvision builder module / transformers "
          "model-type stem). Each distinct graph queries all others (all sources together); "
          "rows are grouped by the query's source. Search vector: the graph embedding (WL, "
          "motif, stats, layer-shape blocks, each raised entry-wise to its power and "
          "re-normalised, then weighted) fused with the MiniLM embedding of the "
          "automatically written description (made from the graph, not the name); "
          "`fastarch.retrieve` scans the same vectors.", "",
          _table(results, m20), "", _table(results, more), "",
          f"Neural Architecture Retrieval (real architectures): MRR@20 {NAR['MRR@20']}, "
          f"MAP@20 {NAR['MAP@20']}, NDCG@20 {NAR['NDCG@20']} (their zoo and relevance "
          "definition differ, so the comparison is indicative only).", "",
          "Goal (beat these figures), judged on this run:", "", *goal, "",
          f"Tuned on tuning families only (grid of {len(trials)}: {FUSION_GRID}; score = mean "
          f"of MRR/MAP/NDCG@20 on tuning-family queries): powers {index.space.power}, block "
          f"weights {index.space.weights}, text_weight {best_tw}. Held-out families were never "
          "scored while choosing.", "",
          "Tried earlier and not kept: a supervised projection (shrinkage LDA, fitted on tuning "
          "families: raised tuning-family figures in-sample only) and query expansion. Tried "
          "with this change on the same stored index (scratch scripts, judged on tuning "
          "families) and not kept: re-ranking by neighbourhood overlap of the kNN graph "
          "(k 5-40, any mix: -0.005 to -0.06 on the tuning score), score-space query "
          "expansion (top 1-5: within +-0.001), hubness correction (CSLS, k 1-50: lower), "
          "reciprocal-rank fusion of the graph, text and shape rankings instead of the "
          "weighted sum (lower), centring blocks on the corpus mean (within +-0.001), and "
          "scale-free statistics (op shares, FLOPs per parameter, parameters per width^2, "
          "recovered from the stored blocks: no gain).", "",
          "### Ablation", "",
          "Each row: its own search vectors, leave-one-out at 20 (MRR / MAP / NDCG).", "",
          "| setting | tuning score | all MRR@20 | all MAP@20 | all NDCG@20 | held-out MRR@20 "
          "| held-out MAP@20 | held-out NDCG@20 |",
          "|---|---:|---:|---:|---:|---:|---:|---:|",
          *[f"| {label} | {_tuning_score(t):.4f} | {m['MRR@20']:.3f} | {m['MAP@20']:.3f} | "
            f"{m['NDCG@20']:.3f} | {h['MRR@20']:.3f} | {h['MAP@20']:.3f} | {h['NDCG@20']:.3f} |"
            for label, t, m, h in abl], ""]
    if lat:
        md += ["## Query latency (median, ms, over the whole index)", "",
               "| query | ms |", "|---|---:|"]
        md += [f"| {k} | {v:.2f} |" for k, v in lat.items()]
        md += ["", "Text queries include the MiniLM encoding of the query (model loaded once); "
               "module queries include reading the graph (one forward on meta) and, with text "
               "fusion, the MiniLM encoding of its description. Loaded shared machine.", ""]
    text = "\n".join(md)
    print(text)
    if a.write:
        Path(a.write).write_text(text)
    return 0


LATENCY_NOTE = (
    "Text queries include the MiniLM encoding of the query (model loaded once). Module "
    "queries read the graph with one forward on meta (a model with real weights is run on "
    "meta stand-ins of its parameters, `torch.func.functional_call`: its real CPU forward "
    "made the query ~2 s) and fuse the MiniLM embedding of its written description: a "
    "description already in the index (any zoo architecture) reuses the stored embedding, a "
    "new one is encoded (~75 tokens, the larger part of the new-graph row) in bf16 where the "
    "CPU has bf16 dot products (`describe.query_in_bf16`; text queries stay fp32), on two "
    "threads when a CPU is idle as the query starts and on one otherwise "
    "(`describe.query_threads`: two threads are several times slower when another job keeps "
    "the other core busy). The "
    "rest of a module query is the meta forward itself: the outputs of batch_norm, "
    "convolution, addmm, mean, layer_norm, SDPA's softmax and the common elementwise ops are "
    "made directly (same metadata, `retrieval/meta_shortcuts.py`) instead of by torch's Python "
    "meta kernels, and guessed "
    "inputs are made on meta, not filled on the CPU. Every query ends with the scan of the "
    "index, `ArchitectureIndex.scores` (a dot product per row on the calling thread: numpy's "
    "threaded OpenBLAS gemv took ~8 ms with the other core busy and its spinning workers "
    "slowed the next query's MiniLM encoding ~2x; on an idle machine it is 0.3 ms against "
    "~0.9 ms, which is why name queries went from ~0.3 to ~1.5 ms).")


def latency_only(a, argv) -> int:
    import os

    from fastarch.retrieval.index import shipped_index

    index = shipped_index()
    load = os.getloadavg()[0]
    lat = latency(index)
    md = ["## Query latency (median, ms, over the whole index)", "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"shared with other jobs (load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end), CPU only; date "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `python "
          f"bench/bench_retrieval.py {' '.join(argv or sys.argv[1:])}`", "",
          "| query | ms |", "|---|---:|", *[f"| {k} | {v:.2f} |" for k, v in lat.items()], "",
          LATENCY_NOTE, ""]
    text = "\n".join(md)
    print(text)
    if a.write:
        replace_section(a.write, text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="build/retrieval/zoo_graphs.jsonl")
    p.add_argument("--write", default=None, help="markdown file for the figures")
    p.add_argument("--save-index", default=None, help="also write the tuned index (with text)")
    p.add_argument("--no-tune", action="store_true")
    p.add_argument("--recipes", default=None,
                   help="measure candidate compression plans on ~16 small zoo models, write "
                        "the best plan of each (quality floor, speed-up) here (then exit; "
                        "--write replaces the recipes section of that file)")
    p.add_argument("--latency", action="store_true",
                   help="only measure query latency on the shipped index (--write replaces "
                        "the latency section of that file)")
    p.add_argument("--models", nargs="+", default=None, help="with --recipes: only these")
    p.add_argument("--from-index", default=None,
                   help="tune block powers, block weights and text fusion of this built "
                        "index (no graph cache needed)")
    a = p.parse_args(argv)
    if a.latency:
        return latency_only(a, argv)
    if a.from_index:
        return from_index(a)
    if a.recipes:
        t0 = time.perf_counter()
        models = RECIPE_MODELS
        if a.models:
            models = [m for m in RECIPE_MODELS if m[0] in a.models]
        recipes, trials = make_recipes(a.recipes, models)
        print(f"{len(recipes)} recipes written to {a.recipes}")
        command = "nice -n 5 python bench/bench_retrieval.py " + " ".join(argv or sys.argv[1:])
        md = recipes_markdown(recipes, trials, command, time.perf_counter() - t0)
        print(md)
        if a.write:
            replace_section(a.write, md)
        return 0

    from fastarch.retrieval.build import read_cache
    from fastarch.retrieval.features import raw_features
    from fastarch.retrieval.graph import OpGraph
    from fastarch.retrieval.index import ArchitectureIndex

    t0 = time.perf_counter()
    records = read_cache(a.cache)
    ok = {n: r for n, r in records.items()
          if r.get("status") in ("trace", "partial", "module_tree") and r.get("labels")}
    raw = {n: raw_features(OpGraph.from_dict(r)) for n, r in ok.items()}
    t_raw = time.perf_counter() - t0
    print(f"{len(records)} records, {len(ok)} graphs, features in {t_raw:.0f} s", flush=True)

    default = ({"wl": 1.0, "motif": 0.6, "stats": 0.5, "shape": 0.5}, [1.0, 1.0, 1.0, 1.0])
    grid = [default]
    if not a.no_tune:
        for mo, st, sh in itertools.product([0.3, 0.6, 1.0], [0.5, 1.0], [0.0, 0.5, 1.0, 1.5]):
            for itw in ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 0.25]):
                grid.append(({"wl": 1.0, "motif": mo, "stats": st, "shape": sh}, itw))
    best, trials = tune(records, raw, grid)
    print("best", best, f"(tuning score {trials[0][0]:.3f}; default "
          f"{next(t[0] for t in trials if (t[1], t[2]) == default):.3f})", flush=True)

    index = ArchitectureIndex.from_records(records, text=a.save_index is not None, raw=raw,
                                           weights=best["weights"],
                                           wl_iteration_weights=best["wl_iteration_weights"])
    ks = (20, 50, 100)
    groups = [("all", None)]
    for src in ("timm", "torchvision", "transformers"):
        groups.append((src, _rows_where(index, lambda e, s=src: e["source"] == s)))
    groups.append(("tuning families", _rows_where(index, lambda e: not held_out(e["family"]))))
    groups.append(("held-out families", _rows_where(index, lambda e: held_out(e["family"]))))
    results = [(label, loo_metrics(index, rows, ks)) for label, rows in groups]
    # ablations with the tuned weights: single blocks
    abl = []
    zero = {"wl": 0.0, "motif": 0.0, "stats": 0.0, "shape": 0.0}
    for label, w in [("WL only", dict(zero, wl=1.0)), ("motifs only", dict(zero, motif=1.0)),
                     ("global stats only", dict(zero, stats=1.0)),
                     ("layer shapes only", dict(zero, shape=1.0)),
                     ("all but layer shapes", dict(best["weights"], shape=0.0))]:
        idx = ArchitectureIndex.from_records(records, text=False, raw=raw, weights=w,
                                             wl_iteration_weights=best["wl_iteration_weights"])
        abl.append((label, loo_metrics(idx, None, (20,))))
    lat = latency(index) if a.save_index else {}
    if a.save_index:
        index.save(a.save_index)
        print(f"saved {a.save_index} ({Path(a.save_index).stat().st_size / 2**20:.1f} MiB)")

    metrics20 = ["MRR@20", "MAP@20", "NDCG@20", "P@10"]
    metrics_more = ["MRR@50", "MAP@50", "NDCG@50", "MRR@100", "MAP@100", "NDCG@100"]
    statuses = {}
    for r in records.values():
        statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
    md = ["# Architecture retrieval (fastarch.retrieve)", "",
          f"Machine: {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores (shared), CPU only; "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
          f"Command: `python bench/bench_retrieval.py --cache {a.cache}"
          + (f" --save-index {a.save_index}" if a.save_index else "")
          + (f" --write {a.write}" if a.write else "") + "`", "",
          "## Coverage", "",
          f"{index.coverage()}. Reading status of the {len(records)} zoo entries attempted: "
          + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + ".",
          "`trace`: full forward on meta; `partial`: forward stopped part way (the unreached "
          "leaf modules appended from the module tree); `module_tree`: module tree only; "
          "`build_failed`: the default config/builder does not build; `failed`: timed out or "
          "crashed.", "",
          "## Leave-one-out family retrieval (graph embedding, names never seen)", "",
          "Relevance = same family (timm module / torchvision builder module / transformers "
          "model-type stem). Each distinct graph queries all others (all sources together); "
          "rows are grouped by the query's source.", "",
          _table(results, metrics20), "",
          _table(results, metrics_more), "",
          f"Neural Architecture Retrieval (real architectures): MRR@20 {NAR['MRR@20']}, "
          f"MAP@20 {NAR['MAP@20']}, NDCG@20 {NAR['NDCG@20']} (their zoo and relevance "
          "definition differ, so the comparison is indicative only).", "",
          f"Tuned weights (on tuning families only): {best}; grid of {len(grid)} settings.", "",
          "### Ablation (all queries, tuned WL iteration weights)", "",
          _table(abl, ["MRR@20", "MAP@20", "NDCG@20", "P@10"]), ""]
    if lat:
        md += ["## Query latency (median, ms, over the whole index)", "",
               "| query | ms |", "|---|---:|"]
        md += [f"| {k} | {v:.2f} |" for k, v in lat.items()]
        md += ["", "Text queries include the MiniLM encoding of the query (model loaded once); "
               "module queries include reading the graph (one forward on meta).", ""]
    text = "\n".join(md)
    print(text)
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
