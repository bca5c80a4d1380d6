"""Unhinted user predicates classified from tile bounds: the block mask stands for exactly the
element mask, whether the bounds follow the predicate (library masks written as plain functions,
random predicates built from the supported operators) or fall back to the element-wise path
(float math, reductions, data-dependent control flow, overflow, non-bool results)."""
import random

import pytest
import torch

from fastarch.attention import (
    and_masks,
    causal,
    create_block_mask,
    document,
    from_function,
    or_masks,
    sliding_window,
)
from fastarch.attention import block_mask as block_mask_mod
from fastarch.attention.mask_intervals import trace_tiles
from fastarch.ops.block_sparse_attention import block_sparse_attention

from test_block_mask import expected, represented  # noqa: E402  (the same checks)

LENGTHS = [(1, 1, 0), (63, 63, 0), (65, 65, 0), (129, 129, 0), (1000, 1000, 0), (40, 129, 89),
           (7, 300, 293)]
DOC_IDS = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 1, 250, 333, 316]))


@pytest.fixture
def element_wise_calls(monkeypatch):
    """Counts the calls of the element-wise (fallback) classification."""
    calls = []
    real = block_mask_mod._classify_predicate

    def spy(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(block_mask_mod, "_classify_predicate", spy)
    return calls


def build(spec, lq, lk, off, bs, batch=1, heads=1):
    return create_block_mask(spec, q_len=lq, kv_len=lk, q_offset=off, block_size=bs,
                             batch=batch, heads=heads, cache=False)


# The library's masks as plain functions, with no hint.
PLAIN = {
    "causal": lambda b, h, q, kv: kv <= q,
    "window(37)": lambda b, h, q, kv: (q - kv >= 0) & (q - kv <= 37),
    "window-both(9,23)": lambda b, h, q, kv: (kv - q).abs() <= torch.where(kv > q, 23, 9),
    "prefix-lm(70)": lambda b, h, q, kv: (kv <= q) | (kv < 70),
    "strided(16)": lambda b, h, q, kv: (kv <= q) & ((q - kv < 16) | ((q - kv) % 16 == 0)),
    "fixed(24,3)": lambda b, h, q, kv: (kv <= q) & ((q // 24 == kv // 24) | (kv % 24 >= 21)),
    "documents": lambda b, h, q, kv: DOC_IDS[q] == DOC_IDS[kv],
    "causal-documents": lambda b, h, q, kv: (kv <= q) & (DOC_IDS[q] == DOC_IDS[kv]),
    "bigbird-like": lambda b, h, q, kv: ((q // 32 - kv // 32).abs() <= 1) | (kv < 32) | (q < 32),
    "dilated": lambda b, h, q, kv: (kv <= q) & ((q - kv) % 3 == 0) & (q - kv < 90),
    "not-upper": lambda b, h, q, kv: ~(kv > q) ^ (q == kv) | torch.logical_and(q < 5, kv < 5),
}
COMBOS = {
    "causal&plain-fixed": lambda: and_masks(causal(), from_function(PLAIN["fixed(24,3)"])),
    "window&plain-docs": lambda: and_masks(sliding_window(50), from_function(PLAIN["documents"])),
    "docs&plain-strided": lambda: and_masks(document(DOC_IDS), from_function(PLAIN["strided(16)"])),
    "plain-causal|plain-window-right": lambda: or_masks(
        from_function(PLAIN["causal"]), from_function(lambda b, h, q, kv: kv - q <= 5)),
}


@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("name", list(PLAIN) + list(COMBOS))
def test_plain_functions_are_exact_from_bounds(name, lengths, bs, element_wise_calls):
    spec = COMBOS[name]() if name in COMBOS else from_function(PLAIN[name], name=name)
    lq, lk, off = lengths
    if "doc" in name and max(lk, lq + off) > DOC_IDS.numel():
        pytest.skip("the document ids cover 1000 positions")
    bm = build(spec, lq, lk, off, bs)
    assert torch.equal(represented(bm), expected(spec, lq, lk, off))
    assert element_wise_calls == []  # classified from the bounds, no element-wise pass


def test_bench_predicate_keeps_few_bitmaps(element_wise_calls):
    # causal & "fixed(128, 8)" as a function: only the summary columns need a bitmap (rows
    # shared by every tile), the diagonal is cut by the causal descriptor in the kernel.
    user = from_function(lambda b, h, q, kv: (q // 128 == kv // 128) | (kv % 128 >= 120))
    spec = and_masks(causal(), user)
    bm = build(spec, 4096, 4096, 0, 64)
    assert element_wise_calls == []
    assert bm.tile_masks.shape[0] == 1 and bm.window_right == 0
    hinted = build(and_masks(causal(), from_function(user.mask_mod, period=128)), 4096, 4096,
                   0, 64)
    assert bm.computed_fraction() == hinted.computed_fraction()
    small = build(spec, 300, 300, 0, 64)
    assert torch.equal(represented(small), expected(spec, 300, 300, 0))
    # A sliding window as a function: the cut tiles are relative (a function of q - kv), one
    # diagonal of values each, shared along a tile diagonal.
    window = build(from_function(lambda b, h, q, kv: (kv <= q) & (q - kv <= 255)), 4096, 4096,
                   0, 64)
    assert element_wise_calls == [] and window.tile_masks.shape[0] == 2
    assert window.computed_fraction() == build(sliding_window(255), 4096, 4096, 0,
                                               64).computed_fraction()


# ---- random predicates ------------------------------------------------------------------------
IDS = torch.randint(-3, 6, (1100,), generator=torch.Generator().manual_seed(1))


def _rand_int(rng, depth):
    """(fn, text) of a random int expression of (b, h, q, kv) that uses at least one of them."""
    if depth == 0 or rng.random() < 0.25:
        name = rng.choice(["q", "kv", "q", "kv", "b", "h"])
        return (lambda b, h, q, kv, i="bhqk".index(name[0]): (b, h, q, kv)[i]), name
    x, tx = _rand_int(rng, depth - 1)
    y, ty = _rand_int(rng, depth - 1)
    c = rng.choice([-7, -3, -2, -1, 1, 2, 3, 5, 16, 64])
    op = rng.choice(["+", "-", "*c", "*", "//", "%", "//e", "abs", "neg", "min", "max",
                     "clamp", "ids", "where", ">>", "<<", "&", "|", "^", "+c"])
    if op == "+":
        return (lambda *a: x(*a) + y(*a)), f"({tx} + {ty})"
    if op == "+c":
        return (lambda *a: c + x(*a)), f"({c} + {tx})"
    if op == "-":
        return (lambda *a: x(*a) - y(*a)), f"({tx} - {ty})"
    if op == "*c":
        return (lambda *a: x(*a) * c), f"({tx} * {c})"
    if op == "*":
        return (lambda *a: x(*a) * y(*a)), f"({tx} * {ty})"
    if op == "//":
        return (lambda *a: x(*a) // c), f"({tx} // {c})"
    if op == "%":
        return (lambda *a: x(*a) % c), f"({tx} % {c})"
    if op == "//e":  # a divisor that is not one constant: the bounds give up
        return (lambda *a: x(*a) // (y(*a).abs() + 1)), f"({tx} // (|{ty}| + 1))"
    if op == "abs":
        return (lambda *a: x(*a).abs()), f"|{tx}|"
    if op == "neg":
        return (lambda *a: -x(*a)), f"-{tx}"
    if op == "min":
        return (lambda *a: torch.minimum(x(*a), y(*a))), f"min({tx}, {ty})"
    if op == "max":
        return (lambda *a: torch.maximum(x(*a), y(*a))), f"max({tx}, {ty})"
    if op == "clamp":
        return (lambda *a: torch.clamp(x(*a), min=-c, max=abs(c) * 7)), f"clamp({tx})"
    if op == "ids":
        return (lambda *a: IDS[torch.clamp(x(*a), 0, IDS.numel() - 1)]), f"ids[{tx}]"
    if op == "where":
        cnd, tc = _rand_bool(rng, depth - 1)
        return (lambda *a: torch.where(cnd(*a), x(*a), c)), f"where({tc}, {tx}, {c})"
    s = abs(c) % 4
    if op == ">>":
        return (lambda *a: x(*a) >> s), f"({tx} >> {s})"
    if op == "<<":
        return (lambda *a: x(*a) << s), f"({tx} << {s})"
    return ({"&": lambda *a: x(*a) & y(*a), "|": lambda *a: x(*a) | y(*a),
             "^": lambda *a: x(*a) ^ y(*a)}[op]), f"({tx} {op} {ty})"


def _rand_bool(rng, depth):
    if depth <= 0 or rng.random() < 0.5:
        x, tx = _rand_int(rng, max(depth, 1))
        if rng.random() < 0.5:
            y, ty = _rand_int(rng, max(depth - 1, 0))
        else:
            k = rng.randint(-20, 200)
            y, ty = (lambda *a: k), str(k)
        cmp = rng.choice(["<", "<=", ">", ">=", "==", "!="])
        f = {"<": lambda *a: x(*a) < y(*a), "<=": lambda *a: x(*a) <= y(*a),
             ">": lambda *a: x(*a) > y(*a), ">=": lambda *a: x(*a) >= y(*a),
             "==": lambda *a: x(*a) == y(*a), "!=": lambda *a: x(*a) != y(*a)}[cmp]
        return f, f"({tx} {cmp} {ty})"
    x, tx = _rand_bool(rng, depth - 1)
    y, ty = _rand_bool(rng, depth - 1)
    op = rng.choice(["&", "|", "^", "~", "land", "lor", "lnot", "where"])
    if op == "~":
        return (lambda *a: ~x(*a)), f"~{tx}"
    if op == "land":
        return (lambda *a: torch.logical_and(x(*a), y(*a))), f"and({tx}, {ty})"
    if op == "lor":
        return (lambda *a: x(*a).logical_or(y(*a))), f"or({tx}, {ty})"
    if op == "lnot":
        return (lambda *a: torch.logical_not(x(*a))), f"not({tx})"
    if op == "where":
        z, tz = _rand_bool(rng, depth - 1)
        return (lambda *a: torch.where(x(*a), y(*a), z(*a))), f"where({tx}, {ty}, {tz})"
    return ({"&": lambda *a: x(*a) & y(*a), "|": lambda *a: x(*a) | y(*a),
             "^": lambda *a: x(*a) ^ y(*a)}[op]), f"({tx} {op} {ty})"


@pytest.mark.parametrize("seed", range(8))
def test_random_predicates_are_exact(seed, element_wise_calls):
    rng = random.Random(seed)
    from_bounds = 0
    for case in range(40):
        fn, text = _rand_bool(rng, rng.randint(1, 3))
        lq, lk, off = rng.choice(LENGTHS[:4] + LENGTHS[5:] + ([LENGTHS[4]] if case == 0 else []))
        bs = rng.choice([1, 4, 16, 32, 64])
        batch, heads = rng.choice([(1, 1), (2, 1), (1, 3)])
        spec = from_function(fn, per_batch=batch > 1, per_head=heads > 1, name=text)
        spec = rng.choice([lambda s: s, lambda s: and_masks(causal(), s),
                           lambda s: and_masks(sliding_window(40, 3), s),
                           lambda s: or_masks(sliding_window(0, 2), s)])(spec)
        before = len(element_wise_calls)
        bm = build(spec, lq, lk, off, bs, batch, heads)
        from_bounds += len(element_wise_calls) == before
        want = expected(spec, lq, lk, off, batch, heads)
        assert torch.equal(represented(bm, batch, heads), want), (text, lq, lk, off, bs)
    assert from_bounds >= 20  # most of them are classified from the bounds


def test_bounds_contain_the_values():
    """The bounds themselves, tile by tile, against the element-wise values."""
    rng = random.Random(11)
    bs, lq, lk = 8, 70, 90
    t0 = torch.arange(0, lq, bs)
    k0 = torch.arange(0, lk, bs)
    q1, k1 = torch.clamp(t0 + bs, max=lq) - 1, torch.clamp(k0 + bs, max=lk) - 1
    traced = relative = 0
    for _ in range(150):
        fn, text = _rand_bool(rng, 3)
        out = trace_tiles(fn, 1, 1, t0 + 5, q1 + 5, k0, k1, "cpu")
        if out is None:
            continue
        traced += 1
        surely, never, dep, rel = (x[0, 0] for x in out)
        q = torch.arange(lq).view(-1, 1) + 5
        kv = torch.arange(lk).view(1, -1)
        vals = torch.broadcast_to(fn(torch.zeros(1, 1, dtype=torch.long),
                                     torch.zeros(1, 1, dtype=torch.long), q, kv), (lq, lk))
        for i, j in zip(*torch.nonzero(torch.ones_like(surely), as_tuple=True)):
            tile = vals[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
            assert not surely[i, j] or tile.all(), text
            assert not never[i, j] or not tile.any(), text
            if not (surely[i, j] or never[i, j]):
                if int(dep[i, j]) == 2:  # varies with kv only: every row is the same
                    assert (tile == tile[:1]).all(), text
                elif int(dep[i, j]) == 1:
                    assert (tile == tile[:, :1]).all(), text
                if rel[i, j]:  # a function of q - kv: constant along each diagonal
                    relative += 1
                    assert (tile[1:, 1:] == tile[:-1, :-1]).all(), text
    assert traced > 75 and relative > 20


# ---- what the bounds do not follow: element-wise, still exact ----------------------------------
def _catches(b, h, q, kv):
    try:
        return q.sum() > kv  # a reduction: unsupported on bounds
    except Exception:  # noqa: BLE001
        return q > kv


def _type_switch(b, h, q, kv):
    if isinstance(q, torch.Tensor):
        return kv <= q
    return kv > q  # what the bounds would see: the corner check must catch it


IDS32 = torch.arange(1100, dtype=torch.int32)
IDS8 = (torch.arange(1100) % 100).to(torch.int8)
FALLBACK = {
    "float": lambda b, h, q, kv: q.float() * 0.5 >= kv,
    "true-division": lambda b, h, q, kv: q / 3 >= kv,
    "reduction": lambda b, h, q, kv: kv <= q.max() - 3,
    "data-dependent-if": lambda b, h, q, kv: (q >= kv) if (q > 10).any() else (q < kv),
    "catches-the-failure": _catches,
    "isinstance": _type_switch,
    "int64-overflow": lambda b, h, q, kv: (q + 1) * (1 << 40) * (kv + 1) * (1 << 30) > 0,
    "int32-overflow": lambda b, h, q, kv: IDS32[q] * 70000 * 70000 > IDS32[kv],
    "int8-scalar-wraps": lambda b, h, q, kv: (IDS8[q] < 1000) & (kv <= q),  # 1000 -> -24
    "non-bool": lambda b, h, q, kv: (q - kv) % 3,
    "in-place": lambda b, h, q, kv: (q.add_(0) >= kv),
    "negative-bitwise": lambda b, h, q, kv: ((q - kv) & 6) != 0,
}


@pytest.mark.parametrize("name", list(FALLBACK))
def test_unfollowed_predicates_fall_back_exactly(name, element_wise_calls):
    spec = and_masks(sliding_window(200, 10), from_function(FALLBACK[name], name=name))
    for lq, lk, off in ((65, 65, 0), (40, 129, 89)):
        bm = build(spec, lq, lk, off, 16)
        assert torch.equal(represented(bm), expected(spec, lq, lk, off)), (lq, lk, off)
    if name != "negative-bitwise":  # that one is traced where q >= kv, the bounds fail elsewhere
        assert element_wise_calls == [spec.name, spec.name]


def test_attention_with_descriptor_and_bitmaps():
    """The kernel applies the descriptor (causal, per-batch documents) and the bitmaps of the
    predicate together, including partial tiles that have no bitmap."""
    docs = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([30, 50, 70])),
                        torch.repeat_interleave(torch.arange(2), torch.tensor([77, 73]))])
    spec = and_masks(causal(), document(docs),
                     from_function(lambda b, h, q, kv: ((q // 8 + kv // 8 * (h + 1)) % 3 != 0)
                                   | (kv % 16 == 15), per_head=True))
    batch, heads, lq, lk = 2, 3, 150, 150
    bm = build(spec, lq, lk, 0, 16, batch, heads)
    allowed = expected(spec, lq, lk, 0, batch, heads)
    assert torch.equal(represented(bm, batch, heads), allowed)
    assert bm.q_doc_ids is not None and bool((bm.tile_mask_index == -1).any())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, lq, 64, generator=gen)
    k = torch.randn(batch, 1, lk, 64, generator=gen)
    v = torch.randn(batch, 1, lk, 64, generator=gen)
    out = block_sparse_attention(q, k, v, bm)
    s = (q @ k.transpose(-1, -2)) * 0.125
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out, p @ v, atol=2e-5, rtol=2e-5)


def test_indexing_bounds_are_tight():
    """``tensor[idx]`` over an index range gives the exact min / max of that range (a sparse
    table of windows of 2**k), for 1-D and 2-D tensors with a constant leading index."""
    from fastarch.attention.mask_intervals import TileInterval, _Trace  # the bounds themselves

    gen = torch.Generator().manual_seed(3)
    table = torch.randint(-50, 50, (3, 777), generator=gen)
    lo = torch.randint(0, 777, (400,), generator=gen)
    hi = torch.clamp(lo + torch.randint(0, 300, (400,), generator=gen), max=776)
    trace = _Trace("cpu")
    idx = TileInterval(lo, hi, torch.tensor(1, dtype=torch.uint8), torch.int64, trace)
    row = TileInterval(torch.tensor(2), torch.tensor(2), torch.tensor(0, dtype=torch.uint8),
                       torch.int64, trace)
    for got, src in ((table[0][idx], table[0]), (table[row, idx], table[2])):
        want_lo = torch.stack([src[a:b + 1].min() for a, b in zip(lo.tolist(), hi.tolist())])
        want_hi = torch.stack([src[a:b + 1].max() for a, b in zip(lo.tolist(), hi.tolist())])
        assert torch.equal(got.lo, want_lo) and torch.equal(got.hi, want_hi)
    assert not trace.failed
