"""The graph reader's stand-ins for torch's Python meta kernels give what torch's give (shape,
strides, dtype) on awkward shapes, dtypes and layouts, count the same FLOPs, and leave the
cases they were not checked on to torch."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

from fastarch.retrieval import graph as graph_mod
from fastarch.retrieval import meta_shortcuts as ms
from fastarch.retrieval.graph import extract_graph

aten = torch.ops.aten
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def _same(fast, real):
    fast = fast if isinstance(fast, tuple) else (fast,)
    real = real if isinstance(real, tuple) else (real,)
    assert [(t.shape, t.stride(), t.dtype, t.device) for t in fast] == \
        [(t.shape, t.stride(), t.dtype, t.device) for t in real]


def _bn_input(shape, dtype, layout):
    if layout == "sliced":  # not dense in any memory format: torch's kernel decides
        return _meta((2 * shape[0],) + shape[1:], dtype)[::2]
    x = _meta(shape, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape,layout", [
    ((2, 8), "contiguous"), ((1, 8, 5), "contiguous"), ((1, 8, 7, 7), "contiguous"),
    ((1, 8, 7, 7), "channels_last"), ((1, 8, 1, 1), "channels_last"),
    ((3, 8, 3, 4, 5), "channels_last"), ((2, 8, 5, 1), "contiguous"), ((2, 8, 3), "sliced"),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_batch_norm_eval(dtype, shape, layout, affine):
    x = _bn_input(shape, dtype, layout)
    w, b = (_meta(8), _meta(8)) if affine else (None, None)
    stats = _meta(8, torch.bfloat16), _meta(8)
    real = aten.native_batch_norm.default(x, w, b, *stats, False, 0.1, 1e-5)
    fast = ms.batch_norm_eval(x, w, b, *stats, False, 0.1, 1e-5)
    if layout == "sliced":
        assert fast is None
    else:
        _same(fast, real)


def test_batch_norm_leaves_training_and_other_devices_to_torch():
    x, c = _meta((2, 4, 3)), _meta(4)
    assert ms.batch_norm_eval(x, c, c, c, c, True, 0.1, 1e-5) is None
    assert ms.batch_norm_eval(x, c, c, None, None, False, 0.1, 1e-5) is None
    cpu = torch.zeros(4)
    assert ms.batch_norm_eval(torch.zeros(2, 4, 3), cpu, cpu, cpu, cpu, False, 0.1, 1e-5) is None


CONV_CASES = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((1, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 1),
    ((2, 8, 13, 11), (8, 1, 3, 3), 1, 1, 1, 8),  # depthwise
    ((1, 8, 5, 123), (16, 4, 3, 5), (2, 3), (0, 2), (1, 2), 2),
    ((1, 16, 1, 1), (32, 16, 1, 1), 1, 0, 1, 1),
    ((3, 4, 63), (6, 4, 5), 2, 1, 3, 1),  # conv1d
    ((1, 4, 5, 6, 7), (8, 2, 3, 1, 3), 1, 1, 1, 2),  # conv3d
    ((0, 4, 9, 9), (8, 4, 3, 3), 1, 0, 1, 1),  # empty batch
    ((1, 4, 3, 3), (8, 4, 3, 3), 1, 0, 1, 1),  # output 1x1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-w" +
                         "x".join(map(str, c[1])))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_convolution(dtype, case, bias, channels_last):
    xs, ws, s, p, d, groups = case
    n = len(xs) - 2
    s, p, d = ([v] * n if isinstance(v, int) else list(v) for v in (s, p, d))
    x, w = _meta(xs, dtype), _meta(ws, dtype)
    if channels_last and n == 2:
        x = x.to(memory_format=torch.channels_last)
    b = _meta(ws[0], dtype) if bias else None
    args = (x, w, b, s, p, d, False, [0] * n, groups)
    real = aten.convolution.default(*args)
    fast = ms.convolution(*args)
    _same(fast, real)
    assert ms.convolution_flops(*args, out_val=fast) == \
        flop_registry[aten.convolution](*args, out_val=real)


def test_convolution_leaves_other_cases_to_torch():
    x, w = _meta((1, 4, 8, 8)), _meta((8, 4, 3, 3))
    ok = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    assert ms.convolution(x, w, None, *ok) is not None
    assert ms.convolution(x, _meta((4, 8, 3, 3)), None, [1, 1], [0, 0], [1, 1], True, [0, 0],
                          1) is None  # transposed
    assert ms.convolution(x, _meta((8, 4, 9, 9)), None, *ok) is None  # kernel > input
    assert ms.convolution(x, _meta((8, 3, 3, 3)), None, *ok) is None  # channels do not fit
    assert ms.convolution(x, w.to(torch.bfloat16), None, *ok) is None  # mixed dtypes
    assert ms.convolution(x, w, _meta(7), *ok) is None  # bias of another size
    with pytest.raises(RuntimeError):  # and torch raises for these, as before
        aten.convolution.default(x, _meta((8, 4, 9, 9)), None, *ok)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("m,k,n,bias", [
    (1, 512, 1000, (1000,)), (5, 123, 7, (7,)), (3, 4, 6, (3, 6)), (3, 4, 6, (1, 6)),
    (3, 4, 6, (3, 1)), (2, 3, 4, (1,)), (1, 1, 1, (1, 1)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("transposed_weight", [True, False], ids=["w.t()", "w"])
def test_addmm(dtype, m, k, n, bias, transposed_weight):
    mat2 = _meta((n, k), dtype).t() if transposed_weight else _meta((k, n), dtype)
    args = (_meta(bias, dtype), _meta((m, k), dtype), mat2)
    _same(ms.addmm(*args), aten.addmm.default(*args))


def test_addmm_leaves_other_cases_to_torch():
    assert ms.addmm(_meta(4), _meta((2, 3)), _meta((3, 4), torch.bfloat16)) is None
    assert ms.addmm(_meta(5), _meta((2, 3)), _meta((3, 4))) is None  # bias does not fit
    assert ms.addmm(_meta(4, torch.long), _meta((2, 3), torch.long),
                    _meta((3, 4), torch.long)) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape,dim", [
    ((1, 512, 7, 7), [-1, -2]), ((2, 3, 5), [1]), ((2, 3, 5), [0, 2]), ((4, 1, 1), [-1]),
    ((7,), [0]), ((2, 3, 4, 5, 6), [2, 3, 4]),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else "d" + ",".join(map(str, v)))
@pytest.mark.parametrize("keepdim", [True, False], ids=["keepdim", "dropdim"])
def test_mean_dim(dtype, shape, dim, keepdim):
    x = _meta(shape, dtype)
    _same(ms.mean_dim(x, dim, keepdim), aten.mean.dim(x, dim, keepdim))


def test_mean_dim_leaves_other_cases_to_torch():
    x = _meta((2, 3, 4))
    assert ms.mean_dim(x, [1, 1]) is None  # repeated dim
    assert ms.mean_dim(x, []) is None and ms.mean_dim(x, None) is None  # all dims
    assert ms.mean_dim(x, [1], dtype=torch.float64) is None
    assert ms.mean_dim(x.transpose(0, 2), [1]) is None  # not contiguous
    assert ms.mean_dim(_meta((2, 3), torch.long), [1]) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape,nd", [((2, 197, 768), 1), ((1, 7, 7, 96), 1), ((5,), 1),
                                      ((3, 4, 6), 2), ((1, 1, 1), 3)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"n{v}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_layer_norm(dtype, shape, nd, affine):
    x = _meta(shape, dtype)
    norm = list(shape[-nd:])
    w, b = (_meta(norm, dtype), _meta(norm, dtype)) if affine else (None, None)
    _same(ms.layer_norm(x, norm, w, b, 1e-6), aten.native_layer_norm.default(x, norm, w, b, 1e-6))


def test_layer_norm_leaves_other_cases_to_torch():
    x = _meta((2, 3, 4))
    assert ms.layer_norm(x.transpose(0, 2), [2]) is None  # not contiguous
    assert ms.layer_norm(x, [3]) is None  # does not match the trailing dims
    assert ms.layer_norm(x, []) is None
    assert ms.layer_norm(x, [4], _meta(4, torch.float16), None) is None  # mixed dtypes
    assert ms.layer_norm(x, [4], _meta(5), None) is None
    assert ms.layer_norm(_meta((2, 4), torch.long), [4]) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", [(1, 12, 197, 197), (3, 5), (7,), ()], ids=str)
def test_elementwise_and_softmax(dtype, shape):
    x, y = _meta(shape, dtype), _meta(shape, dtype)
    for approximate in ("none", "tanh"):
        _same(ms.unary_like(x, approximate=approximate), aten.gelu.default(x, approximate=approximate))
    dim = -1 if shape else 0
    _same(ms.safe_softmax(x, dim), aten._safe_softmax.default(x, dim))
    _same(ms.binary_same(x, y), aten.add.Tensor(x, y))
    _same(ms.binary_same(x, y, alpha=2), aten.add.Tensor(x, y, alpha=2))
    _same(ms.binary_same(x, y), aten.mul.Tensor(x, y))
    for c in (0.125, 3, True):
        if type(c) is bool:
            assert ms.mul_scalar(x, c) is None
        else:
            _same(ms.mul_scalar(x, c), aten.mul.Scalar(x, c))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("a,b", [
    ((2, 8, 5, 5), (2, 8, 1, 1)), ((2, 8, 1, 1), (2, 8, 5, 5)), ((3, 7, 16), (16,)),
    ((16,), (3, 7, 16)), ((1, 1, 5, 8), (2, 4, 5, 8)), ((4, 1), (1, 6)), ((3, 1, 2), (1, 4, 1)),
    ((), (2, 3)),
], ids=lambda v: "x".join(map(str, v)) or "scalar")
def test_broadcasting_add_mul(dtype, a, b):
    x, y = _meta(a, dtype), _meta(b, dtype)
    _same(ms.binary_same(x, y), aten.add.Tensor(x, y))
    _same(ms.binary_same(x, y), aten.mul.Tensor(x, y))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", [(2, 56, 56, 96), (4, 4), (7,)], ids=str)
def test_other_unary_ops(dtype, shape):
    x = _meta(shape, dtype)
    for op in (aten.sigmoid.default, aten.silu.default, aten.neg.default):
        _same(ms.unary_like(x), op(x))
    for t in (x, _meta(shape, torch.bool)):
        if len(shape) >= 2:
            _same(ms.same_layout(t, 1), aten.tril.default(t, 1))
        _same(ms.same_layout(t, [3], [0]), aten.roll.default(t, [3], [0]))
    for e in (2, 0.5, -1):
        _same(ms.pow_scalar(x, e), aten.pow.Tensor_Scalar(x, e))
    for op in (aten.silu_.default, aten.relu_.default):
        y = _meta(shape, dtype)
        _same(ms.inplace_unary(y), op(y))
        assert ms.inplace_unary(y) is y


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("layout", ["heads", "channels_last", "transposed"])
def test_add_mul_keep_a_shared_dense_layout(dtype, layout):
    def make():
        if layout == "heads":  # (B, L, H, D) memory seen as (B, H, L, D)
            return _meta((2, 7, 4, 8), dtype).transpose(1, 2)
        if layout == "channels_last":
            return _meta((2, 8, 5, 5), dtype).to(memory_format=torch.channels_last)
        return _meta((6, 3), dtype).t()
    x, y = make(), make()
    assert not x.is_contiguous()
    _same(ms.binary_same(x, y), aten.add.Tensor(x, y))
    _same(ms.binary_same(x, y), aten.mul.Tensor(x, y))


def test_elementwise_leaves_other_cases_to_torch():
    x = _meta((2, 3))
    assert ms.unary_like(_meta((2, 3), torch.long)) is None
    assert ms.unary_like(_meta((2, 0, 3))) is None  # an empty dimension
    assert ms.unary_like(_meta((4, 6))[:, :3]) is None  # not dense: torch decides
    assert ms.unary_like(_meta((1, 2, 1))[:, :1]) is None  # one element
    assert ms.safe_softmax(x, -1, torch.float64) is None  # a cast
    assert ms.safe_softmax(x.t(), 0) is None
    assert ms.binary_same(x, _meta((4, 3))) is None  # shapes that do not broadcast
    assert ms.binary_same(x, _meta((2, 3), torch.float16)) is None  # type promotion
    assert ms.binary_same(x, torch.zeros(())) is None  # a CPU scalar tensor
    assert ms.mul_scalar(x, 1j) is None and ms.mul_scalar(x, torch.tensor(2.0)) is None
    assert ms.mul_scalar(_meta((2, 3), torch.int32), 0.5) is None  # would promote
    assert ms.pow_scalar(x, torch.tensor(2.0)) is None
    assert ms.same_layout(x.t()) is None
    assert ms.inplace_unary(_meta((2, 3), torch.long)) is None


def _random_layout(rng, shape):
    """A meta tensor broadcastable to ``shape``: some dims 1 or dropped, then contiguous,
    channels last, permuted, or a slice of a larger tensor."""
    s = [d if rng.random() < 0.7 else 1 for d in shape]
    if rng.random() < 0.3:
        s = s[rng.randint(0, len(s)):]
    r = rng.random()
    if len(s) == 4 and r < 0.2:
        return _meta(s).to(memory_format=torch.channels_last)
    if len(s) >= 2 and r < 0.6:
        p = list(range(len(s)))
        rng.shuffle(p)
        return _meta([s[i] for i in p]).permute([p.index(i) for i in range(len(s))])
    x = _meta([v * rng.choice([1, 1, 2]) for v in s])
    return x[tuple(slice(0, v) for v in s)] if s else x


def test_elementwise_strides_match_torch_on_random_layouts():
    # the stride order of the outputs (TensorIterator's) on 3000 random pairs of layouts
    import random

    rng = random.Random(0)
    checked = unary = 0
    for _ in range(3000):
        shape = [rng.choice([1, 1, 2, 3, 4]) for _ in range(rng.randint(0, 5))]
        a, b = _random_layout(rng, shape), _random_layout(rng, shape)
        try:
            want = aten.add.Tensor(a, b)
        except RuntimeError:
            assert ms.binary_same(a, b) is None
            continue
        _same(ms.binary_same(a, b), want)
        _same(ms.binary_same(a, b), aten.mul.Tensor(a, b))
        checked += 1
        for fast, real in ((ms.unary_like(a), aten.neg.default(a)),
                           (ms.unary_like(b), aten.gelu.default(b)),
                           (ms.mul_scalar(a, 0.5), aten.mul.Scalar(a, 0.5)),
                           (ms.pow_scalar(b, 2), aten.pow.Tensor_Scalar(b, 2))):
            if fast is not None:  # None: a layout left to torch (anything but row-major)
                _same(fast, real)
                unary += 1
    assert checked > 2500 and unary > 2000


class _Mixed(nn.Module):
    """Every op with a stand-in, and a few cases that go to torch (transposed conv, channels
    last, a training-mode norm in eval mode's place)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.seq = nn.Sequential(nn.Conv1d(3, 6, 5), nn.BatchNorm1d(6))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.dw(h)
        h = self.norm(self.up(h.contiguous(memory_format=torch.channels_last)))
        v = self.head(h.mean((-1, -2)))
        return v, self.seq(v.unsqueeze(1).expand(-1, 3, -1).repeat(1, 1, 4))


@pytest.mark.parametrize("model_fn", [
    _Mixed,
    lambda: pytest.importorskip("torchvision").models.resnet18(),
    lambda: pytest.importorskip("torchvision").models.mobilenet_v3_small(),
    lambda: pytest.importorskip("timm").create_model("vit_tiny_patch16_224"),
    lambda: pytest.importorskip("torchvision").models.convnext_tiny(),
], ids=["mixed", "resnet18", "mobilenet_v3_small", "vit_tiny", "convnext_tiny"])
def test_graph_is_the_same_with_and_without_the_shortcuts(monkeypatch, model_fn):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_fn().eval()
    x = _meta((1, 3, 32, 32) if isinstance(model, _Mixed) else (1, 3, 224, 224))
    fast = extract_graph(model, (x,))
    monkeypatch.setattr(graph_mod, "META_SHORTCUTS", {})
    monkeypatch.setattr(graph_mod, "FLOP_SHORTCUTS", {})
    plain = extract_graph(model, (x,))
    assert fast.method == plain.method == "trace", (fast.error, plain.error)
    assert (fast.labels, fast.edges, fast.dims, fast.flops, fast.width, fast.params) == \
        (plain.labels, plain.edges, plain.dims, plain.flops, plain.width, plain.params)
    assert fast.flops > 0


def _count_shortcut_calls(monkeypatch, model):
    """{op: [made by the stand-in, left to torch]} over one graph read of ``model`` on meta."""
    calls = {op: [0, 0] for op in ms.META_SHORTCUTS}
    for op, fn in list(ms.META_SHORTCUTS.items()):
        def counted(*a, _fn=fn, _op=op, **kw):
            out = _fn(*a, **kw)
            calls[_op][out is None] += 1
            return out
        monkeypatch.setitem(graph_mod.META_SHORTCUTS, op, counted)
    extract_graph(model, (_meta((1, 3, 224, 224)),))
    return calls


def test_shortcut_cases_cover_what_a_resnet_calls(monkeypatch):
    """Every batch_norm / convolution / addmm / mean call of a ResNet read on meta is made by
    a stand-in, not by torch's kernel (otherwise this reader is as slow as before)."""
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = tv.models.resnet18().eval()
    calls = _count_shortcut_calls(monkeypatch, model)
    conv_ops = {"aten.native_batch_norm.default": [20, 0], "aten.convolution.default": [20, 0],
                "aten.addmm.default": [1, 0], "aten.mean.dim": [1, 0]}
    assert {str(op): c for op, c in calls.items() if str(op) in conv_ops} == conv_ops


def test_shortcut_cases_cover_what_a_vit_calls(monkeypatch):
    """The same for the layer norms, GELUs, attention softmaxes and residual adds of a ViT."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224").eval()
    calls = _count_shortcut_calls(monkeypatch, model)
    for name in ("aten.native_layer_norm.default", "aten.gelu.default", "aten.add.Tensor"):
        made, left = next(c for op, c in calls.items() if str(op) == name)
        assert made >= 12 and left == 0, (name, made, left)


def test_cpu_tensors_go_to_torch():
    x, w, c = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.zeros(2)
    assert ms.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1) is None
    assert ms.convolution(x.to("meta"), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                          1) is None  # one tensor off meta
    assert ms.addmm(torch.zeros(3), torch.zeros(1, 2), torch.zeros(2, 3)) is None
    assert ms.mean_dim(x, [-1]) is None
    assert ms.batch_norm_eval(x, c, c, c, c, False, 0.1, 1e-5) is None
