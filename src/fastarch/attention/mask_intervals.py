"""Tile bounds of a mask predicate: the predicate run once on interval arguments.

:func:`trace_tiles` calls a mask predicate ``fn(b, h, q_idx, kv_idx)`` with :class:`TileInterval`
objects instead of index tensors. Each one holds, for every cell of the tile grid
``(B, H, Qt, Kt)``, bounds ``[lo, hi]`` that contain the value at every position of that tile,
and which of q / kv the value depends on inside the tile. Operators (``+ - * // % << >>``,
comparisons, ``& | ^ ~``, ``abs``), a few torch functions (``where``, ``minimum`` / ``maximum``,
``clamp``, ``logical_*``, ``*_like``) and indexing a small integer tensor (``doc_ids[q_idx]``,
through a min / max table) return new bounds. A bool result then says per tile: surely all
True (lo = 1), surely all False (hi = 0), or unknown, and for unknown tiles whether the value
varies with q only, with kv only, or with both, and whether it is a function of ``q - kv``
alone (values kept as exact affine forms ``cq * q + ckv * kv + c`` find those, and make
comparisons such as ``kv <= q`` exact per tile).

The evaluation is conservative: bounds always contain the true values (floor division and
modulo follow Python / torch sign rules, integer ranges are checked against the dtype so that
nothing wraps). Anything it does not model (float math, reductions, shapes, ``bool()`` of a
value as in data-dependent ``if``, tensors that are not 0-d, an unknown torch function) marks
the trace failed, even when the predicate catches the exception, and :func:`trace_tiles`
returns None: the caller then evaluates the predicate element-wise.
"""
from __future__ import annotations

import torch

Q_DEP, KV_DEP = 1, 2  # bits of TileInterval.dep: the value varies with q / kv inside the tile
_LIMIT = 1 << 62  # int64 bounds stay below this: a sum of two of them cannot wrap
_RANGES = {
    torch.bool: (0, 1), torch.uint8: (0, 255), torch.int8: (-(1 << 7), (1 << 7) - 1),
    torch.int16: (-(1 << 15), (1 << 15) - 1), torch.int32: (-(1 << 31), (1 << 31) - 1),
    torch.int64: (-_LIMIT, _LIMIT),
}
_TABLE_ELEMENTS = 1 << 25  # largest min / max table built for an indexed tensor


class Unsupported(Exception):
    """The predicate did something the interval evaluation does not model."""


class _Trace:
    """State shared by the intervals of one evaluation."""

    __slots__ = ("device", "failed", "q_range", "kv_range")

    def __init__(self, device):
        self.device = device
        self.failed = False
        self.q_range = self.kv_range = None  # (lo, hi) of q / kv per tile, for affine forms

    def fail(self, what: str):
        self.failed = True  # kept even if the predicate catches the exception
        raise Unsupported(what)


class TileInterval:
    """Per-tile bounds ``[lo, hi]`` (int64 tensors broadcastable to the tile grid) of a value of
    integer or bool ``dtype``.

    ``dep`` (uint8, bits Q_DEP / KV_DEP) says what the value varies with inside a tile (0 where
    lo == hi); ``rel`` (bool) where it is a function of ``q - kv`` alone inside the tile;
    ``aff``: None or ``(cq, ckv, c)`` when the value is exactly ``cq * q + ckv * kv + c`` (ints
    cq, ckv; c constant on each tile), which makes comparisons of positions exact and finds the
    relative ones. ``weak``: a Python / 0-d constant, which takes the dtype of the other
    operand as in torch's type promotion."""

    __slots__ = ("lo", "hi", "dep", "rel", "aff", "dtype", "weak", "_trace")

    def __init__(self, lo, hi, dep, dtype, trace, weak=False, rel=None, aff=None):
        self.lo, self.hi, self.dtype, self.weak, self._trace = lo, hi, dtype, weak, trace
        # A value bounded to one number is constant on the tile, whatever its inputs were.
        single = lo == hi
        self.dep = torch.where(single, 0, dep).to(torch.uint8)
        self.rel = single if rel is None else single | rel
        self.aff = aff

    # -- things a tensor would answer that bounds cannot -----------------------------------
    def __bool__(self):
        self._trace.fail("bool() of a traced value (data-dependent control flow)")

    def __len__(self):
        self._trace.fail("len() of a traced value")

    def __iter__(self):
        self._trace.fail("iteration over a traced value")

    def __index__(self):
        self._trace.fail("a traced value used as a Python int")

    __int__ = __float__ = __index__

    def __getattr__(self, name):
        # Only reached for names not defined on the class: tensor methods map to the torch
        # function table, everything else (shape, item, float, sum, ...) fails the trace.
        if name.startswith("_"):
            raise AttributeError(name)
        fn = _METHODS.get(name)
        if fn is None:
            self._trace.fail(f"tensor attribute or method {name!r}")
        return lambda *args, **kwargs: fn(self, *args, **kwargs)

    @property
    def device(self):
        return self._trace.device

    def __repr__(self):
        return f"TileInterval({self.dtype}, lo={self.lo}, hi={self.hi})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        trace = _find_trace(args, kwargs)
        handler = _FUNCTIONS.get(func)
        if handler is None:
            trace.fail(f"torch function {getattr(func, '__name__', func)!r}")
        return handler(*args, **(kwargs or {}))


def _find_trace(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, TileInterval):
            return a._trace
        if isinstance(a, (tuple, list)):
            for x in a:
                if isinstance(x, TileInterval):
                    return x._trace
    raise Unsupported("no traced value among the arguments")


def _lift(x, trace) -> TileInterval:
    """A traced value, or a constant (Python int / bool, 0-d integer or bool tensor)."""
    if isinstance(x, TileInterval):
        return x
    dev = trace.device
    if isinstance(x, bool):
        v = torch.tensor(int(x), device=dev)
        return TileInterval(v, v, torch.zeros((), dtype=torch.uint8, device=dev), torch.bool,
                            trace, weak=True, aff=(0, 0, v))
    if isinstance(x, int):
        if not -_LIMIT < x < _LIMIT:
            trace.fail("a constant beyond 2**62")
        v = torch.tensor(x, device=dev)
        return TileInterval(v, v, torch.zeros((), dtype=torch.uint8, device=dev), torch.int64,
                            trace, weak=True, aff=(0, 0, v))
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype in _RANGES:
        v = x.to(device=dev, dtype=torch.int64)
        return TileInterval(v, v, torch.zeros((), dtype=torch.uint8, device=dev), x.dtype,
                            trace, weak=True, aff=(0, 0, v))
    trace.fail(f"an operand of type {type(x).__name__} (only ints, bools and 0-d int tensors)")


def _dummy(a: TileInterval):
    if a.weak:  # a Python scalar of the same kind, so that torch promotes it as a scalar
        return True if a.dtype == torch.bool else 0
    return torch.empty(1, dtype=a.dtype)


def _result_dtype(a: TileInterval, b: TileInterval):
    if a.weak and b.weak:  # two constants: int unless both are bools
        return torch.bool if a.dtype == b.dtype == torch.bool else torch.int64
    return torch.result_type(_dummy(a), _dummy(b))


_AFF_COEF, _AFF_CONST = 1 << 20, 1 << 40  # affine forms kept only while they stay small


def _make(lo, hi, ins, dtype, trace, *, dep=None, rel=None, aff=None) -> TileInterval:
    """A computed value from the operands ``ins``: by default it varies with whatever they
    vary with and is relative where they all are."""
    mn, mx = _RANGES[dtype]
    if bool(((lo < mn) | (hi > mx)).any()):
        trace.fail(f"a value outside the range of {dtype} (it would wrap)")
    if dep is None:
        dep = torch.zeros((), dtype=torch.uint8, device=trace.device)
        for x in ins:
            dep = dep | x.dep
    if rel is None:
        rel = torch.ones((), dtype=torch.bool, device=trace.device)
        for x in ins:
            rel = rel & x.rel
    if aff is not None:
        cq, ckv, c = aff
        if max(abs(cq), abs(ckv)) >= _AFF_COEF or bool((c.abs() >= _AFF_CONST).any()):
            aff = None
        elif cq == -ckv:
            rel = torch.ones_like(rel)  # cq * (q - kv) + c
    return TileInterval(lo, hi, dep, dtype, trace, rel=rel, aff=aff)  # never a scalar


def _aff_combine(a, b, sa, sb):
    """The affine form of ``sa * a + sb * b`` (ints sa, sb), or None."""
    if a.aff is None or b.aff is None:
        return None
    return (sa * a.aff[0] + sb * b.aff[0], sa * a.aff[1] + sb * b.aff[1],
            sa * a.aff[2] + sb * b.aff[2])


def _global_constant(a):
    """The value of an operand that is one constant everywhere, or None."""
    first = a.lo.flatten()[0]
    if bool(((a.lo == a.hi) & (a.lo == first)).all()):
        return int(first)
    return None


def _binary(op):
    """Lift both operands, then call ``op(a, b, dtype)`` with torch's result dtype."""
    def handler(x, y):
        trace = _find_trace((x, y), None)
        a, b = _lift(x, trace), _lift(y, trace)
        dtype = _result_dtype(a, b)
        mn, mx = _RANGES[dtype]
        for c in (a, b):
            # torch converts a scalar to the tensor's dtype first, wrapping: int8 < 1000 is False
            if c.weak and not mn <= int(c.lo) <= mx:
                trace.fail(f"a constant outside the range of {dtype}")
        return op(a, b, dtype, trace)
    return handler


def _arith_dtype(dtype, trace):
    if dtype == torch.bool:
        trace.fail("arithmetic on bools")  # torch's bool + bool is a logical or, not a sum
    return dtype


# ---- arithmetic --------------------------------------------------------------------------------
def _add(a, b, dtype, trace):
    return _make(a.lo + b.lo, a.hi + b.hi, (a, b), _arith_dtype(dtype, trace), trace,
                 aff=_aff_combine(a, b, 1, 1))


def _sub(a, b, dtype, trace):
    return _make(a.lo - b.hi, a.hi - b.lo, (a, b), _arith_dtype(dtype, trace), trace,
                 aff=_aff_combine(a, b, 1, -1))


def _mul(a, b, dtype, trace):
    _arith_dtype(dtype, trace)
    big = max(float(a.lo.abs().max()), float(a.hi.abs().max())) * max(
        float(b.lo.abs().max()), float(b.hi.abs().max()))
    if big >= _LIMIT:
        trace.fail("a product beyond 2**62")
    p = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    aff = None
    for x, k in ((a, _global_constant(b)), (b, _global_constant(a))):
        if aff is None and k is not None and x.aff is not None:
            aff = (x.aff[0] * k, x.aff[1] * k, x.aff[2] * k)
    return _make(p.amin(0), p.amax(0), (a, b), dtype, trace, aff=aff)


def _constant(b, trace) -> int:
    """The value of an operand that must be one constant on the whole grid."""
    c = _global_constant(b)
    if c is None:
        trace.fail("a divisor or shift count that is not one constant")
    return c


def _constant_divisor(b, trace) -> int:
    c = _constant(b, trace)
    if c == 0:
        trace.fail("division by zero")
    return c


def _floordiv(a, b, dtype, trace):
    c = _constant_divisor(b, trace)
    lo = torch.div(a.lo, c, rounding_mode="floor")
    hi = torch.div(a.hi, c, rounding_mode="floor")
    if c < 0:  # x // c is non-increasing in x
        lo, hi = hi, lo
    return _make(lo, hi, (a,), _arith_dtype(dtype, trace), trace)


def _mod_bounds(lo, hi, c):
    """Bounds of ``x % c`` (Python sign rule: the sign of c) for x in [lo, hi], c > 0."""
    same = torch.div(lo, c, rounding_mode="floor") == torch.div(hi, c, rounding_mode="floor")
    # one period: x % c = x - c * floor(x / c) is x shifted, so the bounds shift with it
    rlo = torch.where(same, torch.remainder(lo, c), 0)
    rhi = torch.where(same, torch.remainder(hi, c), c - 1)
    return rlo, rhi


def _mod(a, b, dtype, trace):
    c = _constant_divisor(b, trace)
    if c > 0:
        lo, hi = _mod_bounds(a.lo, a.hi, c)
    else:  # x % c == -((-x) % -c)
        nlo, nhi = _mod_bounds(-a.hi, -a.lo, -c)
        lo, hi = -nhi, -nlo
    return _make(lo, hi, (a,), _arith_dtype(dtype, trace), trace)


def _shift(left):
    def op(a, b, dtype, trace):
        c = _constant(b, trace)
        if not 0 <= c < 62:
            trace.fail("a shift count outside [0, 62)")
        if left:
            return _mul(a, _lift(1 << c, trace), dtype, trace)
        # x >> c is floor(x / 2**c) for two's complement ints, negative ones included
        return _make(a.lo >> c, a.hi >> c, (a,), _arith_dtype(dtype, trace), trace)
    return op


def _neg(x):
    a = _lift(x, _find_trace((x,), None))
    _arith_dtype(a.dtype, a._trace)
    aff = None if a.aff is None else (-a.aff[0], -a.aff[1], -a.aff[2])
    return _make(-a.hi, -a.lo, (a,), a.dtype, a._trace, aff=aff)


def _abs(x):
    a = _lift(x, _find_trace((x,), None))
    _arith_dtype(a.dtype, a._trace)
    lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, 0))
    hi = torch.maximum(a.hi.abs(), a.lo.abs())
    return _make(lo, hi, (a,), a.dtype, a._trace)


# ---- comparisons: bool bounds are 0 / 1 -------------------------------------------------------
def _compare(kind):
    def op(a, b, dtype, trace):
        if kind == "lt":
            lo, hi = a.hi < b.lo, a.lo < b.hi
        elif kind == "le":
            lo, hi = a.hi <= b.lo, a.lo <= b.hi
        elif kind == "gt":
            lo, hi = a.lo > b.hi, a.hi > b.lo
        elif kind == "ge":
            lo, hi = a.lo >= b.hi, a.hi >= b.lo
        else:
            surely = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            maybe = (a.lo <= b.hi) & (b.lo <= a.hi)
            lo, hi = (surely, maybe) if kind == "eq" else (~maybe, ~surely)
        rel = None
        diff = _aff_combine(a, b, 1, -1)
        if diff is not None:
            # a - b = dq * q + dk * kv + c exactly: its range over the tile is exact (q and kv
            # appearing on both sides cancel), and the result is relative when dk == -dq.
            dq, dk, c = diff
            tq, tk = trace.q_range, trace.kv_range
            dlo = (torch.minimum(dq * tq[0], dq * tq[1]) + torch.minimum(dk * tk[0], dk * tk[1])
                   + c)
            dhi = (torch.maximum(dq * tq[0], dq * tq[1]) + torch.maximum(dk * tk[0], dk * tk[1])
                   + c)
            zlo, zhi = {"lt": (dhi < 0, dlo < 0), "le": (dhi <= 0, dlo <= 0),
                        "gt": (dlo > 0, dhi > 0), "ge": (dlo >= 0, dhi >= 0),
                        "eq": ((dlo == 0) & (dhi == 0), (dlo <= 0) & (dhi >= 0)),
                        "ne": ((dlo > 0) | (dhi < 0), (dlo != 0) | (dhi != 0))}[kind]
            lo, hi = lo | zlo, hi & zhi  # both bounds hold: keep the tighter
            if dq == -dk:
                rel = torch.ones((), dtype=torch.bool, device=trace.device)
        out = _make(lo.long(), hi.long(), (a, b), torch.bool, trace)
        if rel is not None:
            out.rel = rel | out.rel
        return out
    return op


# ---- bitwise / logical ------------------------------------------------------------------------
def _bitwise(kind):
    def op(a, b, dtype, trace):
        dep = (a, b)
        if dtype == torch.bool:  # logical: monotone in both operands (xor is not)
            if kind == "and":
                return _make(a.lo & b.lo, a.hi & b.hi, dep, dtype, trace)
            if kind == "or":
                return _make(a.lo | b.lo, a.hi | b.hi, dep, dtype, trace)
            known = (a.lo == a.hi) & (b.lo == b.hi)
            v = a.lo ^ b.lo
            return _make(torch.where(known, v, 0), torch.where(known, v, 1), dep, dtype, trace)
        # integers: bounds for non-negative operands below 2**52; exact where both are constant
        if bool(((a.lo < 0) | (b.lo < 0)).any()):
            trace.fail("bitwise operations on negative ints")
        top = torch.maximum(a.hi, b.hi)
        if bool((top >= (1 << 52)).any()):
            trace.fail("bitwise operations on ints beyond 2**52")
        ones = torch.pow(2, torch.floor(torch.log2(top.double() + 1)).long() + 1) - 1  # >= top
        if kind == "and":
            lo, hi = torch.zeros_like(top), torch.minimum(a.hi, b.hi)
        elif kind == "or":
            lo, hi = torch.maximum(a.lo, b.lo), ones
        else:
            lo, hi = torch.zeros_like(top), ones
        known = (a.lo == a.hi) & (b.lo == b.hi)
        exact = {"and": a.lo & b.lo, "or": a.lo | b.lo, "xor": a.lo ^ b.lo}[kind]
        lo, hi = torch.where(known, exact, lo), torch.where(known, exact, hi)
        return _make(lo, hi, dep, dtype, trace)
    return op


def _invert(x):
    a = _lift(x, _find_trace((x,), None))
    if a.dtype == torch.bool:
        return _make(1 - a.hi, 1 - a.lo, (a,), torch.bool, a._trace)
    if a.dtype == torch.uint8:
        a._trace.fail("~ on uint8")
    aff = None if a.aff is None else (-a.aff[0], -a.aff[1], -a.aff[2] - 1)
    return _make(-a.hi - 1, -a.lo - 1, (a,), a.dtype, a._trace, aff=aff)  # ~x == -x - 1


def _to_bool(x):
    a = _lift(x, _find_trace((x,), None))
    if a.dtype == torch.bool:
        return a
    return _compare("ne")(a, _lift(0, a._trace), torch.bool, a._trace)


def _logical(kind):
    def handler(x, y):
        trace = _find_trace((x, y), None)
        a, b = _to_bool(_lift(x, trace)), _to_bool(_lift(y, trace))
        return _bitwise(kind)(a, b, torch.bool, trace)
    return handler


def _logical_not(x):
    return _invert(_to_bool(x))


# ---- selection and constants ------------------------------------------------------------------
def _where(cond, x, y):
    trace = _find_trace((cond, x, y), None)
    c, a, b = _lift(cond, trace), _lift(x, trace), _lift(y, trace)
    if c.dtype != torch.bool:
        trace.fail("torch.where with a non-bool condition")
    t, f = c.lo == 1, c.hi == 0
    lo = torch.where(t, a.lo, torch.where(f, b.lo, torch.minimum(a.lo, b.lo)))
    hi = torch.where(t, a.hi, torch.where(f, b.hi, torch.maximum(a.hi, b.hi)))
    # a known condition picks one branch: the value varies only as that branch does
    dep = torch.where(t, a.dep, torch.where(f, b.dep, c.dep | a.dep | b.dep))
    rel = torch.where(t, a.rel, torch.where(f, b.rel, c.rel & a.rel & b.rel))
    return _make(lo, hi, (c, a, b), _result_dtype(a, b), trace, dep=dep, rel=rel)


def _extremum(kind):
    def op(a, b, dtype, trace):
        f = torch.minimum if kind == "min" else torch.maximum
        return _make(f(a.lo, b.lo), f(a.hi, b.hi), (a, b), _arith_dtype(dtype, trace),
                     trace)
    return op


def _clamp(x, min=None, max=None):  # noqa: A002  (torch's argument names)
    out = _lift(x, _find_trace((x,), None))
    if min is not None:
        out = _FUNCTIONS[torch.maximum](out, min)
    if max is not None:
        out = _FUNCTIONS[torch.minimum](out, max)
    return out


def _like(fill):
    def handler(x, *args, dtype=None, **kwargs):
        a = _lift(x, _find_trace((x,), None))
        v = fill if fill is not None else args[0] if args else kwargs.get("fill_value")
        dtype = a.dtype if dtype is None else dtype
        if dtype not in _RANGES or isinstance(v, float) or not isinstance(v, (int, bool)):
            a._trace.fail("a constant that is not an int or bool")
        c = torch.tensor(int(v), device=a._trace.device)
        return _make(c, c, (), dtype, a._trace, aff=(0, 0, c))
    return handler


def _cast(dtype):
    def handler(x, *args, **kwargs):
        a = _lift(x, _find_trace((x,), None))
        if dtype == torch.bool:
            return _to_bool(a)
        return _make(a.lo, a.hi, (a,), dtype, a._trace, aff=a.aff)  # the same values
    return handler


def _to(x, *args, **kwargs):
    a = _lift(x, _find_trace((x,), None))
    dtype = kwargs.get("dtype")
    for v in args:
        if isinstance(v, torch.dtype):
            dtype = v
        elif not isinstance(v, (str, torch.device)):
            a._trace.fail(".to() with an argument that is not a dtype or device")
    if dtype is None:
        return a
    if dtype not in _RANGES:
        a._trace.fail(f".to({dtype})")
    return _cast(dtype)(a)


# ---- indexing a tensor: per-tile min / max through a sparse table ----------------------------
def _getitem(tensor, index):
    trace = _find_trace((index,) if not isinstance(index, tuple) else index, None)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _RANGES:
        trace.fail("indexing something that is not an integer or bool tensor")
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) != tensor.dim() or tensor.numel() == 0:
        trace.fail("indexing that does not give one index per dimension")
    parts = [_lift(p, trace) for p in parts]
    for p, n in zip(parts, tensor.shape):
        if p.dtype == torch.bool:
            trace.fail("boolean mask indexing")
        if bool(((p.lo < 0) | (p.hi >= n)).any()):
            trace.fail("an index that may be negative or out of range")
    row = torch.zeros((), dtype=torch.long, device=trace.device)
    for p, n in zip(parts[:-1], tensor.shape[:-1]):  # leading indices: one value per tile
        if not bool((p.lo == p.hi).all()):
            trace.fail("a varying index in a leading dimension")
        row = row * n + p.lo
    last = parts[-1]
    lmin, lmax = _range_tables(tensor.reshape(-1, tensor.shape[-1]).to(trace.device), trace)
    length = last.hi - last.lo + 1
    k = torch.floor(torch.log2(length.double())).long()
    k = k - ((1 << k) > length).long()  # 2**k <= length, whatever log2's rounding did
    second = last.hi - (1 << k) + 1
    levels, rows, n = lmin.shape
    base = (k * rows + row) * n
    first_at, second_at = torch.broadcast_tensors(base + last.lo, base + second)

    def pick(table, at):  # index_select of flat positions: no parallel stall at small sizes
        return table.view(-1).index_select(0, at.reshape(-1)).view(at.shape)

    lo = torch.minimum(pick(lmin, first_at), pick(lmin, second_at))
    hi = torch.maximum(pick(lmax, first_at), pick(lmax, second_at))
    return _make(lo, hi, parts, tensor.dtype, trace)


def _range_tables(flat: torch.Tensor, trace):
    """Level k holds min / max over ``flat[:, i : i + 2**k]`` (windows cut at the end)."""
    rows, n = flat.shape
    levels = max(1, n.bit_length())
    if rows * n * levels > _TABLE_ELEMENTS:
        trace.fail("an indexed tensor too large for a min / max table")
    mins, maxs = [flat.long()], [flat.long()]
    for k in range(1, levels):
        s = 1 << (k - 1)
        pm, px = mins[-1], maxs[-1]
        mins.append(torch.cat([torch.minimum(pm[:, :-s], pm[:, s:]), pm[:, n - s:]], 1)
                    if s < n else pm)
        maxs.append(torch.cat([torch.maximum(px[:, :-s], px[:, s:]), px[:, n - s:]], 1)
                    if s < n else px)
    return torch.stack(mins), torch.stack(maxs)


# ---- dispatch tables --------------------------------------------------------------------------
_BINARY = {
    "add": _add, "sub": _sub, "mul": _mul, "floor_divide": _floordiv, "remainder": _mod,
    "lt": _compare("lt"), "le": _compare("le"), "gt": _compare("gt"), "ge": _compare("ge"),
    "eq": _compare("eq"), "ne": _compare("ne"),
    "bitwise_and": _bitwise("and"), "bitwise_or": _bitwise("or"), "bitwise_xor": _bitwise("xor"),
    "bitwise_left_shift": _shift(True), "bitwise_right_shift": _shift(False),
    "minimum": _extremum("min"), "maximum": _extremum("max"),
}
_DUNDER = {"add": "add", "sub": "sub", "mul": "mul", "floordiv": "floor_divide",
           "mod": "remainder", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq",
           "ne": "ne", "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
           "lshift": "bitwise_left_shift", "rshift": "bitwise_right_shift"}
_ALIASES = {"greater": "gt", "greater_equal": "ge", "less": "lt", "less_equal": "le",
            "not_equal": "ne"}

_FUNCTIONS: dict = {}
_METHODS: dict = {}


def _guarded(handler):
    """Any error inside a handler (bad arguments, ``out=``, an unmodelled case) fails the
    trace, so that a predicate catching it cannot go on with a different computation."""
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001
            _find_trace(args, kwargs).fail(f"{type(exc).__name__}: {exc}")
    return run


def _register(name, handler, *owners):
    handler = _guarded(handler)
    for owner in owners:
        f = getattr(owner, name, None)
        if f is not None:
            _FUNCTIONS[f] = handler
    _METHODS.setdefault(name, handler)
    return handler


def _refuse(what):
    def method(self, *args, **kwargs):
        self._trace.fail(what)
    return method


def _build_tables():
    owners = (torch, torch.Tensor, torch._C.TensorBase)
    for name, op in _BINARY.items():
        _register(name, _binary(op), *owners)
    for alias, name in _ALIASES.items():
        _register(alias, _binary(_BINARY[name]), *owners)
    for dunder, name in _DUNDER.items():
        fwd = _register(f"__{dunder}__", _binary(_BINARY[name]), torch.Tensor,
                        torch._C.TensorBase)
        # operators on a TileInterval itself; Python reflects comparisons by itself
        setattr(TileInterval, f"__{dunder}__", lambda self, other, f=fwd: f(self, other))
        if dunder not in ("lt", "le", "gt", "ge", "eq", "ne"):
            _register(f"__r{dunder}__", lambda x, y, f=fwd: f(y, x), torch.Tensor,
                      torch._C.TensorBase)
            setattr(TileInterval, f"__r{dunder}__", lambda self, other, f=fwd: f(other, self))
    unary = {}
    for name, handler in (("neg", _neg), ("negative", _neg), ("__neg__", _neg), ("abs", _abs),
                          ("__abs__", _abs), ("absolute", _abs), ("bitwise_not", _invert),
                          ("__invert__", _invert), ("logical_not", _logical_not),
                          ("logical_and", _logical("and")), ("logical_or", _logical("or")),
                          ("logical_xor", _logical("xor")), ("where", _where),
                          ("clamp", _clamp), ("clip", _clamp),
                          ("zeros_like", _like(0)), ("ones_like", _like(1)),
                          ("full_like", _like(None)), ("bool", _cast(torch.bool)),
                          ("long", _cast(torch.int64)), ("int", _cast(torch.int32)),
                          ("to", _to), ("__getitem__", _getitem)):
        unary[name] = _register(name, handler, *owners)
    TileInterval.__neg__ = lambda self: unary["__neg__"](self)
    TileInterval.__abs__ = lambda self: unary["__abs__"](self)
    TileInterval.__invert__ = lambda self: unary["__invert__"](self)
    TileInterval.__pos__ = lambda self: self
    TileInterval.__hash__ = object.__hash__
    # Python operators that would otherwise raise a TypeError the predicate could catch, or
    # (the in-place ones) mutate a tensor the caller still uses: all fail the trace.
    for name in ("truediv", "rtruediv", "pow", "rpow", "matmul", "rmatmul", "divmod",
                 "rdivmod", "setitem", "contains", "call", "round", "iadd", "isub",
                 "imul", "ifloordiv", "imod", "iand", "ior", "ixor", "ilshift", "irshift",
                 "itruediv", "ipow"):
        setattr(TileInterval, f"__{name}__", _refuse(f"the {name} operator"))


_build_tables()


def trace_tiles(fn, nb: int, nh: int, q_lo, q_hi, kv_lo, kv_hi, device):
    """Evaluate the predicate ``fn(b, h, q_idx, kv_idx)`` on tile bounds.

    ``q_lo`` / ``q_hi`` (Qt,) and ``kv_lo`` / ``kv_hi`` (Kt,): the first and last position of
    each query / key tile; ``b`` takes the values ``0 .. nb - 1`` and ``h`` ``0 .. nh - 1``.
    Returns ``(surely_true, surely_false, dep, rel)``, each (nb, nh, Qt, Kt): dep (uint8 bits
    Q_DEP / KV_DEP) says what an unknown tile's value varies with, rel where it is a function
    of ``q - kv`` alone. None when the predicate used something not modelled or did not return
    a bool.
    """
    trace = _Trace(device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    q = (q_lo.long().view(1, 1, -1, 1), q_hi.long().view(1, 1, -1, 1))
    kv = (kv_lo.long().view(1, 1, 1, -1), kv_hi.long().view(1, 1, 1, -1))
    trace.q_range, trace.kv_range = q, kv

    def leaf(lo, hi, dep, aff):
        return TileInterval(lo, hi, torch.tensor(dep, dtype=torch.uint8, device=device),
                            torch.int64, trace, aff=aff)

    b = torch.arange(nb, device=device).view(-1, 1, 1, 1)
    h = torch.arange(nh, device=device).view(1, -1, 1, 1)
    args = (leaf(b, b, 0, (0, 0, b)), leaf(h, h, 0, (0, 0, h)),
            leaf(*q, Q_DEP, (1, 0, zero)), leaf(*kv, KV_DEP, (0, 1, zero)))
    try:
        out = fn(*args)
    except Exception:  # noqa: BLE001  (whatever went wrong, the exact evaluation decides)
        return None
    if trace.failed or not isinstance(out, TileInterval) or out.dtype != torch.bool:
        return None
    shape = (nb, nh, q_lo.numel(), kv_lo.numel())
    try:
        lo, hi, dep, rel = (t.expand(shape) for t in (out.lo, out.hi, out.dep, out.rel))
    except RuntimeError:  # a result that does not fit the grid
        return None
    return lo == 1, hi == 0, dep, rel
