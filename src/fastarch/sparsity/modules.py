"""nn.Modules that run the sparse GEMV ops, made from the modules of an existing model.

Neither module copies a weight: the input-major layout the kernels want is stored as the
parameter's data and the original parameter becomes a transposed *view* of it, so the original
module (and its state_dict keys) keep working, and :func:`fastarch.densify` restores them.
The one exception is opt-in: :meth:`SparseLinear.keep_dense_copy` (``sparsify(...,
dense_copy=True)``) keeps an ``(out, in)`` copy for prefill-sized calls where the dense GEMM wins.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from fastarch.ops import sparse_gemv as ops

# row counts tried by :func:`dense_crossover` (1: a layer too small for skipping to pay for
# the call); above the last the kernel is assumed to keep its lead
CROSSOVER_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
_CROSSOVER_CACHE: dict = {}


def _transposed_storage(weight: nn.Parameter) -> nn.Parameter:
    """The same values and shape, stored transposed: ``result.t()`` is contiguous. One copy,
    after which the old storage is released."""
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


class SparseLinear(nn.Linear):
    """A linear layer that skips input channels with ``|x| <= threshold`` (TEAL).

    ``weight`` keeps the nn.Linear shape ``(out, in)`` but is stored input-major (a transposed
    view of a contiguous ``(in, out)`` tensor), which is the layout the sparse GEMV kernel reads.

    Example:
        >>> sl = SparseLinear.from_linear(model.mlp.down_proj, threshold=0.02)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        w_t = self.weight.detach().t().contiguous()
        self.weight = nn.Parameter(w_t.t())
        self.threshold = float(threshold)
        self.source_type: type | None = None  # class to restore on densify (Linear / HF Conv1D)
        self.track = False
        self.seen = 0
        self.skipped = 0
        self.dense_from: int | None = None  # see keep_dense_copy
        self.register_buffer("dense_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float = 0.0) -> "SparseLinear":
        """Make one from an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2), sharing storage."""
        if isinstance(module, nn.Linear):
            in_f, out_f, out_in = module.in_features, module.out_features, True
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            in_f, out_f, out_in = module.weight.shape[0], module.weight.shape[1], False
        else:
            raise TypeError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = in_f, out_f
        if out_in:
            new.weight = _transposed_storage(module.weight)
        else:  # Conv1D stores (in, out) contiguous: the view .t() is already (out, in)
            new.weight = nn.Parameter(module.weight.detach().contiguous().t(),
                                      requires_grad=module.weight.requires_grad)
        new.bias = module.bias
        new.threshold = float(threshold)
        new.source_type = type(module)
        new.track, new.seen, new.skipped = False, 0, 0
        new.dense_from = None
        new.register_buffer("dense_weight", None, persistent=False)
        return new

    def keep_dense_copy(self, from_rows: int) -> None:
        """Also keep the weight in the usual ``(out, in)`` layout and run calls of ``from_rows``
        rows and more (tokens x batch) as a plain ``F.linear`` on it.

        Prefill-sized calls have a full union of active channels, so the sparse kernel only pays
        its skipping overhead there, and on CPUs with AMX or AVX512-BF16 the dense GEMM, packed
        for the ``(out, in)`` layout, beats any kernel on the input-major one. The cost is a
        second copy of the weight (a non-persistent buffer: state_dict keys stay the same).

        The dense path skips nothing, so with it a call's result depends on its row count (a
        sequence batched with others crosses ``from_rows`` sooner). It is taken only where no
        gradient is wanted (``torch.no_grad()`` or a frozen weight); with one the sparse kernel
        runs, as without a copy. In eager mode the copy follows ``weight`` (``load_state_dict``,
        an in-place edit, ``.to()``); a compiled module does not check: call this again after
        changing the weight."""
        if isinstance(from_rows, bool) or not isinstance(from_rows, int) or from_rows < 1:
            raise ValueError(f"from_rows must be an int >= 1, got {from_rows!r}")
        self.dense_from = from_rows
        self._refresh_dense()

    def _refresh_dense(self) -> None:
        with torch.no_grad():
            self.dense_weight = self.weight.detach().contiguous()
        self._dense_key = (self.weight.data_ptr(), self.weight._version)

    def drop_dense_copy(self) -> None:
        """Forget the ``(out, in)`` copy: every call runs the sparse kernel again."""
        self.dense_weight = None
        self.dense_from = None

    def to_dense(self) -> nn.Module:
        """The equivalent dense module (nn.Linear, or Conv1D for GPT-2), weights contiguous."""
        if self.source_type is not None and self.source_type.__name__ == "Conv1D":
            dense = self.source_type.__new__(self.source_type)
            nn.Module.__init__(dense)
            dense.nf = self.out_features
            dense.nx = self.in_features
            dense.weight = nn.Parameter(self.weight.detach().t().contiguous(),
                                        requires_grad=self.weight.requires_grad)
            dense.bias = self.bias
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        dense.weight = nn.Parameter(self.weight.detach().contiguous(),
                                    requires_grad=self.weight.requires_grad)
        dense.bias = self.bias
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = getattr(self, "dense_from", None)  # (None in modules pickled before it existed)
        dense = rows is not None and self.dense_weight is not None and x.dim() > 0 and \
            x.numel() >= rows * self.in_features and \
            not (torch.is_grad_enabled() and self.weight.requires_grad)
        if dense and not torch.compiler.is_compiling() and \
                self._dense_key != (self.weight.data_ptr(), self.weight._version):
            self._refresh_dense()  # the weight was loaded, edited or moved since the copy
        if self.track and not dense and not torch.compiler.is_compiling():
            # (calls on the dense copy skip nothing and are not what the kernel sees)
            with torch.no_grad():
                self.seen += x.numel()
                self.skipped += int((x.abs() <= self.threshold).sum())
        if dense:
            return F.linear(x, self.dense_weight, self.bias)
        return ops.sparse_gemv(x, self.weight.t(), self.bias, self.threshold)

    def extra_repr(self) -> str:
        extra = "" if self.dense_from is None else f", dense from {self.dense_from} rows"
        return f"{super().extra_repr()}, threshold={self.threshold:.4g}{extra}"


def _time_call(fn, reps: int, sync) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def dense_crossover(weight: torch.Tensor, sparsity: float, reps: int = 5,
                    margin: float = 0.97) -> int | None:
    """The smallest row count from :data:`CROSSOVER_ROWS` at which ``F.linear`` on the
    ``(out, in)`` weight is faster than the sparse kernel on the input-major one (by more than
    ``1 - margin``) there and at the next count, measured here on random inputs with a fraction
    ``sparsity`` of each row below the threshold; None where the kernel is not beaten up to the
    last count (where one reading at the last count decides). Measure on a quiet machine: a
    busy one can move the answer. Cached per
    shape, dtype, device and thread count: the answer is a property of the machine."""
    out_f, in_f = weight.shape
    key = (out_f, in_f, weight.dtype, str(weight.device), torch.get_num_threads(),
           round(float(sparsity), 3))
    if key in _CROSSOVER_CACHE:
        return _CROSSOVER_CACHE[key]
    w = weight.detach().contiguous()
    w_t = w.t().contiguous()
    sync = (lambda: torch.cuda.synchronize(w.device)) if w.is_cuda else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    found, first = None, None
    for rows in CROSSOVER_ROWS:
        x = torch.randn(rows, in_f, generator=g).to(device=w.device, dtype=w.dtype)
        t = float(torch.quantile(x.float().abs().flatten(), sparsity)) if sparsity > 0 else 0.0
        kernel = lambda: ops.sparse_gemv(x, w_t, None, t)  # noqa: E731
        dense = lambda: F.linear(x, w)  # noqa: E731
        kernel(), dense()  # warm up (first-call packing, thread pool)
        tk = _time_call(kernel, reps, sync)
        td = _time_call(dense, reps, sync)
        if td < margin * tk:
            if first is not None or rows == CROSSOVER_ROWS[-1]:
                found = first if first is not None else rows
                break
            first = rows  # confirmed by the next count: one noisy reading decides nothing
        else:
            first = None
    _CROSSOVER_CACHE[key] = found
    return found


class CoreNeuronMLP(nn.Module):
    """An MLP that, during decoding, computes only its *core neurons* (CoreInfer).

    On a prefill call (more than one token per sequence) it runs densely and picks the core
    neurons of the sentence: each token votes for its ``keep`` most active neurons and the
    ``keep`` neurons with the most votes (ties broken by mean activation) are kept. On decode
    calls (one token per sequence) only those neurons are computed, with the fused
    ``sparse_mlp`` kernel: gate/up rows and down columns of the other neurons are never read.

    The original MLP's child modules are registered under their own names, so state_dict keys
    do not change; the original module is restored by :func:`fastarch.densify`.
    """

    def __init__(self, original: nn.Module, spec: "MLPSpec", sparsity: float):  # noqa: F821
        super().__init__()
        object.__setattr__(self, "original", original)  # not a child: keys stay the same
        self.spec = spec
        for name in spec.children:
            setattr(self, name, getattr(original, name))
        w_in_mod = getattr(original, spec.w_in)
        # make the down projection input-major in place: (inter, out) contiguous
        down = getattr(original, spec.w_out)
        if spec.out_layout == "out_in":  # nn.Linear (out, inter): store it (inter, out)
            down.weight = _transposed_storage(down.weight)
        # (a Conv1D down projection is (inter, out) already)
        if spec.in_layout == "in_out":  # Conv1D (hidden, inter): store it (inter, hidden)
            w_in_mod.weight = _transposed_storage(w_in_mod.weight)
        self.inter = spec.intermediate(original)
        self.keep = max(1, int(round((1.0 - sparsity) * self.inter)))
        self.sparsity = sparsity
        self.register_buffer("core", torch.empty(0, dtype=torch.long), persistent=False)

    # weights in kernel layout (all contiguous, no copies)
    def _w_in(self):
        w = getattr(self.original, self.spec.w_in).weight
        return w if self.spec.in_layout == "out_in" else w.t()

    def _w_up(self):
        if self.spec.w_up is None:
            return None
        return getattr(self.original, self.spec.w_up).weight

    def _w_out_t(self):
        w = getattr(self.original, self.spec.w_out).weight
        return w.t() if self.spec.out_layout == "out_in" else w

    def _bias(self, name):
        if name is None:
            return None
        return getattr(getattr(self.original, name), "bias", None)

    @torch.no_grad()
    def _choose_core(self, h: torch.Tensor) -> None:
        a = h.detach().abs().reshape(-1, h.shape[-1]).float()
        k = min(self.keep, a.shape[-1])
        votes = torch.zeros(a.shape[-1], device=a.device)
        votes.scatter_add_(0, a.topk(k, dim=-1).indices.reshape(-1),
                           torch.ones(a.shape[0] * k, device=a.device))
        # votes dominate; the mean activation (scaled below 1) breaks ties
        score = votes + a.mean(0) / (a.mean(0).max() + 1e-12) * 0.5
        self.core = score.topk(k).indices.sort().values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        if tokens > 1 or self.core.numel() == 0:
            # a prefill, or the first step of a one-token prompt: dense, and its core is chosen
            h = self.spec.hidden(self.original, x)
            self._choose_core(h)
            return self.spec.output(self.original, h)
        y = ops.sparse_mlp(
            x, self._w_in(), self._w_out_t(), w_up=self._w_up(), b_in=self._bias(self.spec.w_in),
            b_up=self._bias(self.spec.w_up), b_out=self._bias(self.spec.w_out),
            neuron_index=self.core, activation=self.spec.activation,
        )
        return self.spec.finish(self.original, y)

    def reset(self) -> None:
        """Forget the core neurons: the next call chooses them again (a new prompt)."""
        self.core = self.core.new_empty(0)

    def extra_repr(self) -> str:
        return f"keep={self.keep}/{self.inter} core neurons, activation={self.spec.activation}"
