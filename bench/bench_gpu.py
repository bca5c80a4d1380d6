"""GPU checks and same-run ratios for every fastarch GPU path, in one process (one device lease).

Sections (each checks its outputs against the fp32 reference on fresh random inputs before it
times anything, and prints its table as soon as it is done):
  ceil   the card's two ceilings: device-to-device copy bandwidth, a bf16 matrix product
  gemv   sparse_gemv (Triton default, CUDA kernel) against F.linear (cuBLAS): Llama-3-8B MLP
         shapes and a 1B shape, batch 1 and 8, sparsity 0..0.9; launch-shape sweep at batch 1;
         the batch at which cuBLAS takes over
  mlp    sparse_mlp (CATS threshold, CoreInfer index) against the dense SwiGLU MLP
  attn   block_sparse_attention (Triton) against SDPA's flash backend (causal) and compiled
         FlexAttention (sliding window, document mask), forward and backward
  nm     nm_linear (2:4, Triton) against F.linear
  models use_attention / sparsify / prune_nm applied to a random Llama on the GPU

Times are medians of CUDA-event timings of CUDA-graph replays (no host launch cost; each graph
runs its call several times, over rotating copies of the weights where they would fit in L2),
the candidates taking turns. A time on this page is per call.

    python bench/bench_gpu.py --out bench/results/gpu_h200.md          # on a GPU
    TRITON_INTERPRET=1 python bench/bench_gpu.py --smoke               # CPU: code paths only
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import fastarch
from fastarch import native
from fastarch.ops import sparse_gemv as sg

LINES: list[str] = []
DEADLINE = [math.inf]


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def table(head: list[str], rows: list[list]) -> None:
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for r in rows:
        emit("| " + " | ".join(str(c) for c in r) + " |")
    emit()


# ---- timing ------------------------------------------------------------------------------------
class Timer:
    """Median ms per call of each candidate; on CUDA by graph replay, candidates in turns."""

    def __init__(self, dev: torch.device, calls: int = 10, reps: int = 15, graphs: bool = True):
        self.dev, self.calls, self.reps = dev, calls, reps
        self.graphs = graphs and dev.type == "cuda"

    def _runner(self, fn):
        calls = self.calls
        if self.dev.type != "cuda":
            return lambda: [fn(i) for i in range(calls)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(3):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        if not self.graphs:
            return lambda: [fn(i) for i in range(calls)]
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(i)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (a candidate that cannot be captured)
            emit(f"  (graph capture failed, timed eagerly: {type(exc).__name__}: "
                 f"{str(exc)[:100]})")
            torch.cuda.synchronize()
            return lambda: [fn(i) for i in range(calls)]
        return g.replay

    def run(self, fns: dict) -> dict:
        runners = {k: self._runner(f) for k, f in fns.items()}
        times = {k: [] for k in fns}
        for _ in range(self.reps):
            for k, r in runners.items():
                if self.dev.type == "cuda":
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                    e0.record()
                    r()
                    e1.record()
                    e1.synchronize()
                    times[k].append(e0.elapsed_time(e1) / self.calls)
                else:
                    t0 = time.perf_counter()
                    r()
                    times[k].append((time.perf_counter() - t0) * 1e3 / self.calls)
        return {k: statistics.median(v) for k, v in times.items()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def check(name: str, out, ref, dtype, failures: list) -> float:
    e = rel_err(out, ref)
    if not e <= TOL[dtype]:
        failures.append(f"{name}: rel err {e:.2e} > {TOL[dtype]:.0e}")
    return e


def n_copies(nbytes: int, dev) -> int:
    """Weight copies to rotate through so that a repeated call never finds its weight in L2."""
    if dev.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 60 << 20)
    return max(1, min(8, -(-3 * l2 // max(1, nbytes))))


# ---- sections ----------------------------------------------------------------------------------
def sec_ceilings(dev, smoke):
    if dev.type != "cuda":
        emit("ceil: skipped (no GPU)\n")
        return
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = Timer(dev, calls=5, reps=5, graphs=False)
    ms = t.run({"copy": lambda i: b.copy_(a)})["copy"]
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = t.run({"mm": lambda i: torch.mm(x, y)})["mm"]
    emit(f"ceilings: D2D copy {2 * n / ms / 1e9:.2f} TB/s (read+write), bf16 8192^3 mm "
         f"{2 * 8192 ** 3 / mm / 1e9:.0f} TFLOP/s\n")


def gap_threshold(vals: torch.Tensor, s: float) -> float:
    """A threshold that drops a fraction ~s of |vals|, placed mid-way in the widest gap among the
    sorted values near that quantile: no value sits within rounding of it, so a kernel and the
    reference (whose sums differ in order) keep the same channels."""
    if s <= 0:
        return 0.0
    v = vals.float().abs().flatten()[:1 << 20].sort().values
    n = v.numel()
    i0 = min(n - 2, max(0, int(s * n)))
    lo, hi = max(0, i0 - n // 50), min(n - 1, i0 + n // 50 + 1)
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    j = lo + int(gaps.argmax())
    return float((v[j] + v[j + 1]) / 2)


def _gemv_inputs(b, i, o, dtype, dev, sparsity, copies):
    x = torch.randn(b, i, device=dev, dtype=dtype)
    w = [torch.randn(o, i, device=dev, dtype=dtype) / math.sqrt(i) for _ in range(copies)]
    w_t = [wi.t().contiguous() for wi in w]
    t = gap_threshold(x, sparsity)
    return x, w, w_t, t


def sec_gemv(dev, smoke):
    fails: list[str] = []
    shapes = [(64, 96), (96, 40)] if smoke else [(4096, 14336), (14336, 4096), (2048, 8192)]
    dtypes = [torch.bfloat16, torch.float32] if smoke else [torch.bfloat16, torch.float16,
                                                             torch.float32]
    cuda_ok = native.cuda_built() and dev.type == "cuda"
    # correctness on awkward batches (the dense hand-over at 17 and 64 included)
    errs = []
    for (i, o) in shapes[:2]:
        for dtype in dtypes:
            for b in ([1, 3, 17] if smoke else [1, 5, 16, 17, 64]):
                for backend in (["triton", "cuda"] if cuda_ok else ["triton"]):
                    os.environ["FASTARCH_GEMV_CUDA_BACKEND"] = backend
                    x, w, w_t, t = _gemv_inputs(b, i, o, dtype, dev, 0.5, 1)
                    bias = torch.randn(o, device=dev, dtype=dtype)
                    got = fastarch.sparse_gemv(x, w_t[0], bias, t)
                    ref = sg.sparse_gemv_reference(x, w_t[0], bias, t)
                    e = check(f"sparse_gemv {backend} {dtype} b{b} {i}x{o}", got, ref, dtype, fails)
                    idx = torch.randperm(i, device=dev)[: i // 3]
                    idx = torch.cat([idx, idx[:5]])  # a channel listed twice counts twice
                    got = fastarch.sparse_gemv_index(x, w_t[0], idx, bias)
                    ref = sg.sparse_gemv_index_reference(x, w_t[0], bias, idx)
                    e2 = check(f"sparse_gemv_index {backend} {dtype} b{b}", got, ref, dtype, fails)
                    rows = torch.randperm(o, device=dev)[: o // 2]
                    got = fastarch.gather_gemv(x, w[0], rows, bias)
                    ref = sg.gather_gemv_reference(x, w[0], bias, rows)
                    e3 = check(f"gather_gemv {backend} {dtype} b{b}", got, ref, dtype, fails)
                    errs.append(max(e, e2, e3))
    os.environ["FASTARCH_GEMV_CUDA_BACKEND"] = "triton"
    emit(f"gemv correctness: {len(errs)} cases, worst rel err {max(errs):.2e}; "
         f"failures: {fails or 'none'}\n")

    timer = Timer(dev, reps=5 if smoke else 15)
    sparsities = [0.0, 0.5] if smoke else [0.0, 0.25, 0.5, 0.7, 0.9]
    rows_out = []
    for (i, o) in shapes:
        for dtype in [torch.bfloat16]:  # (fp16 moves the same bytes)
            for b in [1, 8]:
                for s in sparsities:
                    cp = n_copies(i * o * dtype.itemsize, dev)
                    x, w, w_t, t = _gemv_inputs(b, i, o, dtype, dev, s, cp)
                    fns = {"cublas": lambda j: F.linear(x, w[j % cp]),
                           "triton": lambda j: torch.ops.fastarch.sparse_gemv(x, w_t[j % cp],
                                                                              None, t)}
                    if cuda_ok:
                        fns["cuda"] = lambda j: native._C.sparse_gemv_cuda(x, w_t[j % cp], None, t)
                    ms = timer.run(fns)
                    ideal = 1 / (1 - s) if s < 1 else math.inf
                    row = [f"{i}x{o}", str(dtype).split(".")[1], b, s, f"{ms['cublas'] * 1e3:.1f}",
                           f"{ms['cublas'] / ms['triton']:.2f}x",
                           f"{ms['cublas'] / ms['cuda']:.2f}x" if "cuda" in ms else "-",
                           f"{ideal:.2f}x",
                           f"{i * o * dtype.itemsize / ms['cublas'] / 1e9:.2f}"]
                    rows_out.append(row)
    emit("sparse_gemv vs F.linear (cuBLAS); speed-up = cuBLAS time / kernel time")
    table(["in x out", "dtype", "batch", "sparsity", "cuBLAS us", "triton", "cuda",
           "ideal 1/(1-s)", "cuBLAS TB/s"], rows_out)

    # launch-shape sweep at batch 1 and the batch tile (batch 8), bf16, 50%
    from fastarch.kernels import sparse_gemv as kg
    sweep = [dict()] + ([] if smoke else [
        dict(block_k=32), dict(block_k=128), dict(block_n=64), dict(block_n=256),
        dict(num_warps=8), dict(split=1), dict(block_k=128, block_n=64, num_warps=8)])
    rows_out = []
    for (i, o) in shapes[:2]:
        for b in [1, 8]:
            cp = n_copies(i * o * 2, dev)
            x, w, w_t, t = _gemv_inputs(b, i, o, torch.bfloat16, dev, 0.5, cp)
            fns = {"cublas": lambda j: F.linear(x, w[j % cp])}
            for cfg in sweep:
                kg.TUNE.update({k: None for k in kg.TUNE})
                kg.TUNE.update(cfg)
                cfg_s = ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"
                try:
                    got = kg.sparse_gemv(x, w_t[0], None, t)
                    check(f"tune {cfg} b{b}", got, sg.sparse_gemv_reference(x, w_t[0], None, t),
                          torch.bfloat16, fails)
                    ms = timer.run({**fns,
                                    "k": lambda j: kg.sparse_gemv(x, w_t[j % cp], None, t)})
                except Exception as exc:  # noqa: BLE001  (a launch shape that does not compile)
                    rows_out.append([f"{i}x{o}", b, cfg_s, f"failed: {type(exc).__name__}", "-"])
                    continue
                rows_out.append([f"{i}x{o}", b, cfg_s, f"{ms['k'] * 1e3:.1f}",
                                 f"{ms['cublas'] / ms['k']:.2f}x"])
            kg.TUNE.update({k: None for k in kg.TUNE})
    emit("sparse_gemv Triton launch shapes, bf16, 50% sparsity (speed-up over cuBLAS)")
    table(["in x out", "batch", "config", "kernel us", "vs cuBLAS"], rows_out)

    # where cuBLAS takes over: kernel (dense hand-over disabled) vs cuBLAS by batch, 50%
    rows_out = []
    (i, o) = shapes[0]
    for b in ([1, 2, 16] if smoke else [1, 2, 4, 8, 16, 24, 32, 64]):
        for s in [0.5, 0.9]:
            cp = n_copies(i * o * 2, dev)
            x, w, w_t, t = _gemv_inputs(b, i, o, torch.bfloat16, dev, s, cp)
            ms = timer.run({"cublas": lambda j: F.linear(x, w[j % cp]),
                            "k": lambda j: kg.sparse_gemv(x, w_t[j % cp], None, t)})
            rows_out.append([b, s, f"{ms['cublas'] * 1e3:.1f}", f"{ms['k'] * 1e3:.1f}",
                             f"{ms['cublas'] / ms['k']:.2f}x"])
    emit(f"sparse_gemv Triton kernel vs cuBLAS by batch, {i}x{o} bf16 (dispatch hands batches "
         f"above {sg.GPU_DENSE_ABOVE} to cuBLAS)")
    table(["batch", "sparsity", "cuBLAS us", "kernel us", "kernel speed-up"], rows_out)
    if fails:
        emit("GEMV FAILURES:\n" + "\n".join(fails) + "\n")


def sec_mlp(dev, smoke):
    fails: list[str] = []
    h, inter = (48, 160) if smoke else (4096, 14336)
    rows_out = []
    for dtype in [torch.bfloat16]:
        for b in [1, 8]:
            cp = n_copies(3 * h * inter * dtype.itemsize, dev)
            x = torch.randn(b, h, device=dev, dtype=dtype)
            ws = [(torch.randn(inter, h, device=dev, dtype=dtype) / math.sqrt(h),
                   torch.randn(inter, h, device=dev, dtype=dtype) / math.sqrt(h),
                   torch.randn(h, inter, device=dev, dtype=dtype) / math.sqrt(inter))
                  for _ in range(cp)]
            wts = [wd.t().contiguous() for (_, _, wd) in ws]
            g = F.silu(x.float() @ ws[0][0].float().t())
            for s in [0.0, 0.5, 0.7, 0.9]:
                thr = gap_threshold(g, s)
                k = max(1, int(round(inter * (1 - s))))
                core = torch.randperm(inter, device=dev)[:k]
                got = fastarch.sparse_mlp(x, ws[0][0], wts[0], w_up=ws[0][1], threshold=thr)
                ref = sg.sparse_mlp_reference(x, ws[0][0], ws[0][1], wts[0], None, None, None,
                                              None, thr, "silu")
                check(f"sparse_mlp {dtype} b{b} s{s}", got, ref, dtype, fails)
                got = fastarch.sparse_mlp(x, ws[0][0], wts[0], w_up=ws[0][1], neuron_index=core)
                ref = sg.sparse_mlp_reference(x, ws[0][0], ws[0][1], wts[0], None, None, None,
                                              core, 0.0, "silu")
                check(f"sparse_mlp index {dtype} b{b} s{s}", got, ref, dtype, fails)

                def dense(j):
                    wg, wu, wd = ws[j % cp]
                    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

                ms = timer_for(dev, smoke).run({
                    "dense": dense,
                    # the op itself: the wrapper's index check reads the index on the host
                    "cats": lambda j: torch.ops.fastarch.sparse_mlp(
                        x, ws[j % cp][0], ws[j % cp][1], wts[j % cp], None, None, None, None,
                        thr, "silu"),
                    "core": lambda j: torch.ops.fastarch.sparse_mlp(
                        x, ws[j % cp][0], ws[j % cp][1], wts[j % cp], None, None, None, core,
                        0.0, "silu")})
                rows_out.append([str(dtype).split(".")[1], b, s, f"{ms['dense'] * 1e3:.1f}",
                                 f"{ms['dense'] / ms['cats']:.2f}x",
                                 f"{ms['dense'] / ms['core']:.2f}x"])
    emit(f"sparse_mlp (SwiGLU {h}->{inter}->{h}) vs the dense MLP (3 cuBLAS products); "
         "cats = threshold on the gate, core = CoreInfer neuron index")
    table(["dtype", "batch", "sparsity", "dense us", "cats speed-up", "core speed-up"], rows_out)
    emit(f"mlp failures: {fails or 'none'}\n")


def timer_for(dev, smoke):
    return Timer(dev, reps=5 if smoke else 15)


def sec_attn(dev, smoke):
    from fastarch.attention import and_masks, causal, create_block_mask, document, sliding_window
    from fastarch.kernels import block_sparse_attention as kb

    fails: list[str] = []
    B, H, D = (1, 2, 64) if smoke else (1, 32, 128)
    seqs = [128] if smoke else [4096, 8192]
    dtype = torch.float32 if smoke else torch.bfloat16
    timer = Timer(dev, calls=3, reps=3 if smoke else 10)
    have_flex = dev.type == "cuda"
    if have_flex:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from torch.nn.attention.flex_attention import create_block_mask as flex_bm
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, fullgraph=True)
    rows_out = []
    for S in seqs:
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
        lengths = torch.tensor([S // 8, S // 4, S // 8, S // 2])
        doc_ids = torch.repeat_interleave(torch.arange(4), lengths).to(dev)
        variants = {
            "causal": (causal(), None),
            "window256": (sliding_window(255), lambda b, h, qi, ki: (ki <= qi) & (qi - ki <= 255)),
            "doc-causal": (and_masks(causal(), document(doc_ids)),
                           lambda b, h, qi, ki: (ki <= qi) & (doc_ids[qi] == doc_ids[ki])),
        }
        for name, (spec, mod) in variants.items():
            for bs in ([64] if smoke else [64, 128]):
                bm = create_block_mask(spec, q_len=S, device=dev, block_size=bs)
                ours = lambda j: fastarch.block_sparse_attention(q, k, v, bm)  # noqa: E731
                try:
                    with torch.no_grad():
                        out = ours(0)
                except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory)
                    rows_out.append([S, name, bs, "-", f"failed: {type(exc).__name__}: "
                                     f"{str(exc)[:80]}", "-", "-"])
                    continue
                ref_mask = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
                if name == "window256":
                    ref_mask &= ~torch.ones(S, S, dtype=torch.bool, device=dev).tril(-256)
                if name == "doc-causal":
                    ref_mask &= doc_ids[:, None] == doc_ids[None, :]
                # reference in fp32 on two heads (memory)
                ref = F.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(),
                                                     v[:, :2].float(), attn_mask=ref_mask)
                check(f"attn {name} S{S} bs{bs}", out[:, :2], ref, dtype, fails)
                fns = {"ours": ours}
                if dev.type == "cuda":
                    def sdpa_causal(j):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    fns["sdpa_flash_causal"] = sdpa_causal
                    # (one sequence length for flex: each mask and length is a compile)
                    if have_flex and mod is not None and bs == 128 and S == seqs[-1]:
                        fbm = flex_bm(mod, None, None, S, S, device=dev)
                        fns["flex"] = lambda j: flex(q, k, v, block_mask=fbm)
                with torch.no_grad():
                    ms = timer.run(fns)
                rows_out.append([S, name, bs, f"{bm.computed_fraction():.3f}",
                                 f"{ms['ours']:.3f}",
                                 f"{ms['sdpa_flash_causal'] / ms['ours']:.2f}x"
                                 if "sdpa_flash_causal" in ms else "-",
                                 f"{ms['flex'] / ms['ours']:.2f}x" if "flex" in ms else "-"])
    emit(f"block_sparse_attention forward, B={B} H={H} D={D} {dtype}; ratio = other / ours "
         "(> 1: ours faster)")
    table(["S", "mask", "block", "tiles computed", "ours ms", "vs SDPA flash causal",
           "vs flex"], rows_out)

    # launch options, causal, S = 8192
    S = seqs[-1]
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
    rows_out = []
    for bs in ([64] if smoke else [64, 128]):
        bm = create_block_mask(causal(), q_len=S, device=dev, block_size=bs)
        for nw, ns in ([(None, None)] if smoke else [(4, 2), (4, 3), (8, 2), (8, 3)]):
            kb.FWD_TUNE.update(num_warps=nw, num_stages=ns)
            try:
                with torch.no_grad():
                    ms = timer.run({"ours": lambda j: fastarch.block_sparse_attention(q, k, v, bm)})
                rows_out.append([bs, nw, ns, f"{ms['ours']:.3f}"])
            except Exception as exc:  # noqa: BLE001  (out of shared memory for a config)
                rows_out.append([bs, nw, ns, f"failed: {type(exc).__name__}"])
        kb.FWD_TUNE.update(num_warps=None, num_stages=None)
    emit(f"forward launch options, causal S={S}")
    table(["block", "num_warps", "num_stages", "ms"], rows_out)

    try:
        _attn_decode(dev, smoke, D, dtype, timer, fails)
    except Exception:  # noqa: BLE001  (the backward table below still runs)
        emit(f"decode FAILED:\n```\n{traceback.format_exc()}```\n")
    try:
        _attn_backward(dev, smoke, B, H, D, dtype, seqs, fails)
    except Exception:  # noqa: BLE001
        emit(f"backward FAILED:\n```\n{traceback.format_exc()}```\n")
    emit(f"attention failures: {fails or 'none'}\n")


def _attn_decode(dev, smoke, D, dtype, timer, fails):
    from fastarch.attention import causal, create_block_mask
    from fastarch.kernels import block_sparse_attention as kb

    # decode: Lq = 1 over a KV cache, GQA 32/8
    drows = []
    for lk in ([100] if smoke else [8192, 32768]):
        bsz, hq, hkv = (1, 2, 1) if smoke else (4, 32, 8)
        q = torch.randn(bsz, hq, 1, D, device=dev, dtype=dtype)
        k, v = (torch.randn(bsz, hkv, lk, D, device=dev, dtype=dtype) for _ in range(2))
        bm = create_block_mask(causal(), q_len=1, kv_len=lk, q_offset=lk - 1, device=dev)
        kx, vx = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
        for split in ([None, 2] if smoke else [None, 1, 4, 8, 16]):
            kb.FWD_TUNE["split"] = split
            with torch.no_grad():
                out = fastarch.block_sparse_attention(q, k, v, bm)
                ref = F.scaled_dot_product_attention(q.float(), kx.float(), vx.float())
                check(f"decode Lk{lk} split{split}", out, ref, dtype, fails)
                ms = timer.run({"ours": lambda j: fastarch.block_sparse_attention(q, k, v, bm),
                                "sdpa": lambda j: F.scaled_dot_product_attention(q, kx, vx)})
            gb = 2 * k.numel() * k.element_size() / 1e9
            chosen = kb._decode_splits(1, bsz * hq, -(-lk // 64), dev)
            drows.append([lk, split or f"default ({chosen})",
                          f"{ms['ours'] * 1e3:.1f}", f"{ms['sdpa'] * 1e3:.1f}",
                          f"{ms['sdpa'] / ms['ours']:.2f}x", f"{gb / ms['ours']:.2f}"])
        kb.FWD_TUNE["split"] = None
    emit(f"decode (Lq = 1, B={4 if not smoke else 1}, GQA 32/8, D={D}): ours (key splits) vs "
         "SDPA on the expanded cache")
    table(["Lk", "splits", "ours us", "SDPA us", "ratio", "ours K+V TB/s"], drows)


def _attn_backward(dev, smoke, B, H, D, dtype, seqs, fails):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastarch.attention import causal, create_block_mask

    # backward: dense causal, ours vs SDPA flash
    rows_out = []
    for S in seqs:
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        go = torch.randn(B, H, S, D, device=dev, dtype=dtype)
        for bs in ([64] if smoke else [64, 128]):
            bm = create_block_mask(causal(), q_len=S, device=dev, block_size=bs)
            out = fastarch.block_sparse_attention(q, k, v, bm)
            g_ours = torch.autograd.grad(out, (q, k, v), go)
            qs, ks, vs = (t[:, :2].detach().float().requires_grad_(True) for t in (q, k, v))
            ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            g_ref = torch.autograd.grad(ref, (qs, ks, vs), go[:, :2].float())
            for nm_, a, r in zip("qkv", g_ours, g_ref):
                check(f"attn bwd d{nm_} S{S} bs{bs}", a[:, :2], r, dtype, fails)

            def fb_ours(j):
                o = fastarch.block_sparse_attention(q, k, v, bm)
                return torch.autograd.grad(o, (q, k, v), go)

            fns = {"ours": fb_ours}
            if dev.type == "cuda":
                def fb_sdpa(j):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    return torch.autograd.grad(o, (q, k, v), go)
                fns["sdpa"] = fb_sdpa
            ms = Timer(dev, calls=2, reps=3 if smoke else 7, graphs=False).run(fns)
            rows_out.append([S, bs, f"{ms['ours']:.3f}", f"{ms['sdpa']:.3f}" if "sdpa" in ms
                             else "-", f"{ms['sdpa'] / ms['ours']:.2f}x" if "sdpa" in ms else "-"])

    emit("forward + backward, dense causal: ours vs SDPA flash (ratio = SDPA / ours)")
    table(["S", "block", "ours ms", "SDPA flash ms", "ratio"], rows_out)


def sec_nm(dev, smoke):
    fails: list[str] = []
    shapes = [(64, 40)] if smoke else [(4096, 14336), (14336, 4096)]
    rows_out = []
    for (i, o) in shapes:
        for dtype in ([torch.float32] if smoke else [torch.bfloat16]):
            for b in [1, 8]:
                cp = n_copies(i * o * dtype.itemsize, dev)
                x = torch.randn(b, i, device=dev, dtype=dtype)
                ws = [torch.randn(o, i, device=dev, dtype=dtype) / math.sqrt(i) for _ in range(cp)]
                comp = [fastarch.nm_compress(wi, 2, 4) for wi in ws]
                got = fastarch.nm_linear(x, *comp[0])
                from fastarch.ops.nm_linear import nm_linear_reference
                check(f"nm_linear {dtype} b{b}", got, nm_linear_reference(x, *comp[0], None, 2, 4),
                      dtype, fails)
                ms = timer_for(dev, smoke).run({
                    "dense": lambda j: F.linear(x, ws[j % cp]),
                    "nm": lambda j: fastarch.nm_linear(x, *comp[j % cp])})
                rows_out.append([f"{i}x{o}", str(dtype).split(".")[1], b,
                                 f"{ms['dense'] * 1e3:.1f}", f"{ms['nm'] * 1e3:.1f}",
                                 f"{ms['dense'] / ms['nm']:.2f}x"])
    emit("nm_linear 2:4 (Triton) vs dense F.linear (cuBLAS on the uncompressed weight)")
    table(["in x out", "dtype", "batch", "dense us", "2:4 us", "speed-up"], rows_out)
    emit(f"nm failures: {fails or 'none'}\n")


def sec_models(dev, smoke):
    """The model-level paths on the GPU: use_attention (logits and greedy generate against the
    original), TEAL and CoreInfer sparsify, 2:4 pruning, on a small random Llama in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastarch.pruning.nm import prune_nm

    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = LlamaConfig(vocab_size=512, hidden_size=256 if smoke else 1024,
                      intermediate_size=512 if smoke else 2816, num_hidden_layers=2,
                      num_attention_heads=4 if smoke else 16, num_key_value_heads=2 if smoke else 4,
                      max_position_embeddings=1024)

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(dev, dtype).eval()

    ids = torch.randint(0, 512, (2, 100 if smoke else 300), device=dev)
    prompt = ids[:, :16]
    rows = []
    with torch.no_grad():
        base = fresh()
        ref = base(ids).logits.float()
        ref_gen = base.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        for label, make in [
            ("use_attention causal", lambda m: fastarch.use_attention(m, "causal")),
            ("sparsify teal 0.5", lambda m: fastarch.sparsify(m, 0.5, calib=[{"input_ids": ids}])),
            ("sparsify coreinfer 0.5", lambda m: fastarch.sparsify(m, 0.5, method="coreinfer")),
            ("prune_nm 2:4", lambda m: prune_nm(m, "2:4", measure=False)),
        ]:
            try:
                m = fresh()
                make(m)
                got = m(ids).logits.float()
                gen = m.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
                same = float((gen[:, 16:] == ref_gen[:, 16:]).float().mean())
                rows.append([label, f"{rel_err(got, ref):.2e}", f"{same:.2f}", "ok"])
            except Exception as exc:  # noqa: BLE001
                rows.append([label, "-", "-", f"FAILED {type(exc).__name__}: {str(exc)[:90]}"])
    emit(f"models on the GPU: random Llama ({cfg.hidden_size} hidden, {cfg.num_hidden_layers} "
         f"layers, GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads}) {dtype}: logits rel "
         "err against the original, share of 12 greedy tokens equal")
    table(["change", "logits rel err", "generate agrees", "status"], rows)


SECTIONS = {"ceil": sec_ceilings, "gemv": sec_gemv, "attn": sec_attn, "nm": sec_nm,
            "models": sec_models, "mlp": sec_mlp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        ap.error("no GPU here: use --smoke (with TRITON_INTERPRET=1) to run the code paths on CPU")
    import triton
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    emit(f"# fastarch GPU run: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
         f"triton {triton.__version__}; CUDA kernels built: {native.cuda_built()}")
    given = argv if argv is not None else sys.argv[1:]
    emit(f"command: python bench/bench_gpu.py {' '.join(given)}\n")
    bad = 0
    for sec in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[sec](dev, args.smoke)
        except Exception:  # noqa: BLE001  (one section's failure must not hide the others)
            bad += 1
            emit(f"SECTION {sec} FAILED:\n```\n{traceback.format_exc()}```\n")
        emit(f"({sec}: {time.perf_counter() - t0:.0f} s)\n")
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(LINES) + "\n")
    return 1 if bad or any("FAILURES" in ln or ("failures: [" in ln) for ln in LINES) else 0


if __name__ == "__main__":
    sys.exit(main())
