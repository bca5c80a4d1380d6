"""fastarch.sparsify / densify on real model classes (random weights from small configs)."""
import warnings

import pytest
import torch
from torch import nn

import fastarch
from fastarch.sparsity import CoreNeuronMLP, SparseLinear, measure_sparsity
from fastarch.ops import sparse_gemv as sg

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=211, max_position_embeddings=128)


def _hf(model_type):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=211,
                                   n_positions=128)
        return AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "bert":
        cfg = AutoConfig.for_model("bert", **SMALL)
        return AutoModel.from_config(cfg).eval()
    extra = {"num_key_value_heads": 2, "head_dim": 16}
    cfg = AutoConfig.for_model(model_type, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 211, (n, t), generator=g)


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _MaskedInputs:
    """Reference for TEAL: the dense model with each swapped layer's input masked by hooks."""

    def __init__(self, dense, thresholds):
        self.handles = []
        for name, t in thresholds.items():
            mod = dense.get_submodule(name)
            self.handles.append(mod.register_forward_pre_hook(
                lambda m, a, t=t: (torch.where(a[0].abs() > t, a[0], torch.zeros_like(a[0])),)))

    def remove(self):
        for h in self.handles:
            h.remove()


HF_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "bert"]


@pytest.mark.parametrize("model_type", HF_TYPES)
@pytest.mark.parametrize("scope", ["mlp", "all"])
def test_teal_equals_masked_dense_model(model_type, scope):
    import copy

    torch.manual_seed(0)
    model = _hf(model_type)
    dense = copy.deepcopy(model)
    calib = [{"input_ids": _ids(seed=s)} for s in range(3)]
    report = fastarch.sparsify(model, sparsity=0.5, method="teal", calib=calib, scope=scope)
    assert report.changed and not report.unsupported
    swapped = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert sorted(swapped) == sorted(e.name for e in report.modules)
    if scope == "mlp":
        assert all(("mlp" in n) or ("intermediate" in n) or ("output.dense" in n) for n in swapped)
    else:
        assert len(swapped) > len(dict(fastarch.sparsity.adapters.linear_modules(dense, "mlp")))
    # exact spec: the dense model with masked inputs
    hooks = _MaskedInputs(dense, {e.name: e.threshold for e in report.modules})
    ids = _ids(seed=9)
    torch.testing.assert_close(_out(model, ids), _out(dense, ids), rtol=1e-4, atol=1e-4)
    hooks.remove()
    # and it really is sparse on the calibration data
    for e in report.modules:
        assert abs(e.calib_sparsity - 0.5) < 0.05, e
    # densify restores the dense model exactly
    assert fastarch.densify(model) == len(swapped)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    torch.testing.assert_close(_out(model, ids), _out(dense, ids))
    assert set(model.state_dict()) == set(dense.state_dict())


def test_sparsity_zero_changes_nothing():
    import copy

    model = _hf("llama")
    dense = copy.deepcopy(model)
    fastarch.sparsify(model, sparsity=0.0, calib=[{"input_ids": _ids()}])
    ids = _ids(seed=5)
    torch.testing.assert_close(_out(model, ids), _out(dense, ids), rtol=1e-5, atol=1e-5)


def test_teal_held_out_sparsity_within_two_points():
    model = _hf("llama")
    calib = [{"input_ids": _ids(4, 64, seed=s)} for s in range(4)]
    held = [{"input_ids": _ids(4, 64, seed=100 + s)} for s in range(3)]
    for target in (0.25, 0.5, 0.7):
        fastarch.densify(model)
        fastarch.sparsify(model, sparsity=target, calib=calib)
        achieved = measure_sparsity(model, held)
        assert achieved and all(abs(v - target) <= 0.02 for v in achieved.values()), achieved


def test_timm_vit_teal():
    timm = pytest.importorskip("timm")
    import copy

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=5).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = fastarch.sparsify(model, sparsity=0.4, calib=[torch.randn(2, 3, 32, 32)])
    assert len(report.modules) == 4  # fc1 and fc2 of two blocks
    hooks = _MaskedInputs(dense, {e.name: e.threshold for e in report.modules})
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
    hooks.remove()
    rep2 = fastarch.sparsify(copy.deepcopy(dense), sparsity=0.4, method="coreinfer")
    assert not rep2.changed and "encoder" in rep2.unsupported[0][1]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "gpt2"])
def test_coreinfer_decode_uses_core_neurons(model_type):
    import copy

    torch.manual_seed(0)
    model = _hf(model_type)
    dense = copy.deepcopy(model)
    report = fastarch.sparsify(model, sparsity=0.5, method="coreinfer")
    cores = [m for m in model.modules() if isinstance(m, CoreNeuronMLP)]
    assert len(cores) == 2 and report.modules[0].keep == report.modules[0].total // 2
    prompt = _ids(1, 12, seed=3)
    with torch.no_grad():
        # prefill equals the dense model (it runs densely) and picks the core neurons
        torch.testing.assert_close(model(input_ids=prompt).logits, dense(input_ids=prompt).logits)
        assert all(c.core.numel() == c.keep for c in cores)
        # a decode step computes exactly the MLP restricted to the core neurons
        mlp = cores[0]
        x = torch.randn(1, 1, 64)
        w_up = mlp._w_up()
        want = sg.sparse_mlp_reference(x[0], mlp._w_in(), w_up, mlp._w_out_t(),
                                       mlp._bias(mlp.spec.w_in), None, mlp._bias(mlp.spec.w_out),
                                       mlp.core, 0.0, mlp.spec.activation)
        torch.testing.assert_close(mlp(x)[0], want, rtol=1e-4, atol=1e-5)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, 18)
    # densify gives the dense model back
    fastarch.densify(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt).logits, dense(input_ids=prompt).logits)


def test_coreinfer_new_prompt_chooses_new_core_neurons(monkeypatch):
    """A second generate (here with a one-token prompt) must not decode with the last prompt's
    core neurons: its first step runs densely and chooses its own. The decode steps of one
    generate keep them."""
    import copy

    torch.manual_seed(0)
    model = _hf("llama")
    fastarch.sparsify(model, sparsity=0.5, method="coreinfer")
    fresh = copy.deepcopy(model)  # never saw a prompt
    mlp = next(m for m in model.modules() if isinstance(m, CoreNeuronMLP))
    chosen = []
    choose = CoreNeuronMLP._choose_core
    monkeypatch.setattr(CoreNeuronMLP, "_choose_core",
                        lambda self, h: (chosen.append(h.shape[-2]), choose(self, h))[1])
    with torch.no_grad():
        model.generate(_ids(1, 12, seed=3), max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert chosen == [12, 12]  # the prefill, in each of the two MLPs; no decode step
        first = mlp.core.clone()
        one = _ids(1, 1, seed=5)
        a = model.generate(one, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        b = fresh.generate(one, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert not torch.equal(mlp.core, first)
    assert torch.equal(a, b)
    # decode steps (a cache that is not empty) keep the prompt's core neurons
    with torch.no_grad():
        out = model(input_ids=_ids(1, 6, seed=6), use_cache=True)
        core = mlp.core.clone()
        model(input_ids=_ids(1, 1, seed=7), past_key_values=out.past_key_values)
    assert torch.equal(mlp.core, core)
    fastarch.densify(model)
    assert not model._forward_pre_hooks


def test_coreinfer_zero_sparsity_generates_like_dense():
    import copy

    model = _hf("llama")
    dense = copy.deepcopy(model)
    fastarch.sparsify(model, sparsity=0.0, method="coreinfer")
    prompt = _ids(1, 10, seed=4)
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=5, do_sample=False)
        b = dense.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_unknown_model_is_reported_and_unchanged():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="not one fastarch knows"):
        report = fastarch.sparsify(model, sparsity=0.5, calib=[torch.randn(4, 8)])
    assert not report.changed and "Sequential" in report.unsupported[0][1]
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # opting in applies TEAL to the linears of the layer stack
    report = fastarch.sparsify(model, sparsity=0.5, calib=[torch.randn(4, 8)], allow_unknown=True)
    assert len(report.modules) == 2


class _Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.fc1(x).relu())


def test_unknown_model_stem_and_head_are_left_dense():
    """One nn.Sequential holding a stem, the blocks and a head: only the blocks are the stack."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Block(), _Block(), _Block(), nn.Linear(16, 4))
    report = fastarch.sparsify(model, sparsity=0.5, calib=[torch.randn(32, 8)],
                               allow_unknown=True)
    assert sorted(e.name for e in report.modules) == sorted(
        f"{i}.fc{j}" for i in (1, 2, 3) for j in (1, 2))
    assert type(model[0]) is nn.Linear and type(model[4]) is nn.Linear


@pytest.mark.parametrize("method", ["teal", "coreinfer"])
def test_multimodal_gemma3_sparsifies_the_language_model_only(method):
    text = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, vocab_size=211)
    # a vision tower with more layers than the language model: the longest stack
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=2,
                                             image_size=32, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    ids = _ids(t=16)
    want = _out(model, ids)
    report = fastarch.sparsify(model, sparsity=0.5, method=method, calib=[{"input_ids": ids}])
    names = [e.name for e in report.modules]
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert not report.unsupported
    assert not any(isinstance(m, (SparseLinear, CoreNeuronMLP))
                   for m in model.model.vision_tower.modules())
    assert _out(model, ids).shape == want.shape
    fastarch.densify(model)
    torch.testing.assert_close(_out(model, ids), want)


def test_bad_arguments():
    model = _hf("llama")
    with pytest.raises(ValueError, match="sparsity"):
        fastarch.sparsify(model, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        fastarch.sparsify(model, sparsity=float("nan"))
    with pytest.raises(ValueError, match="method"):
        fastarch.sparsify(model, method="magic")
    with pytest.raises(ValueError, match="scope"):
        fastarch.sparsify(model, scope="attention")
    with pytest.raises(TypeError, match="model"):
        fastarch.sparsify("llama")
    fastarch.sparsify(model, sparsity=0.3, calib=[{"input_ids": _ids()}])
    with pytest.raises(ValueError, match="already sparsified"):
        fastarch.sparsify(model, sparsity=0.3, calib=[{"input_ids": _ids()}])


def test_synthetic_calibration_warns():
    model = _hf("qwen2")
    with pytest.warns(UserWarning, match="synthetic"):
        report = fastarch.sparsify(model, sparsity=0.5)
    assert report.changed and report.calibration == "synthetic calibration"


def test_sparsified_model_compiles_without_graph_breaks():
    model = _hf("llama")
    fastarch.sparsify(model, sparsity=0.5, calib=[{"input_ids": _ids()}], scope="all")
    layer = model.model.layers[0]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        eager = layer.mlp(x)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(layer.mlp)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(layer.mlp, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


def test_calib_forms():
    # one tensor / one dict is one batch (it was iterated by rows / keys); empty is an error
    for calib in (_ids(), {"input_ids": _ids()}):
        report = fastarch.sparsify(_hf("llama"), sparsity=0.5, calib=calib)
        assert report.calibration == "1 calibration batches" and report.modules
    with pytest.raises(ValueError, match="calib is empty"):
        fastarch.sparsify(_hf("llama"), sparsity=0.5, calib=[])


def test_timm_vit_synthetic_calib_uses_the_model_image_size():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=1, num_classes=5).eval()
    with pytest.warns(UserWarning, match="synthetic"):
        report = fastarch.sparsify(model, sparsity=0.4)
    assert len(report.modules) == 2


# ---- dense_copy: prefill-sized calls on an (out, in) copy -----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_copy_runs_large_calls_densely_and_small_ones_sparsely(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(67, 45).to(dtype)
    sl = SparseLinear.from_linear(lin, threshold=0.5)
    ref_dense = lambda x: torch.nn.functional.linear(x.float(), sl.weight.float(), sl.bias.float())
    ref_sparse = lambda x: ref_dense(torch.where(x.abs() > 0.5, x, torch.zeros_like(x)))
    sl.keep_dense_copy(4)
    assert sl.dense_weight.is_contiguous() and sl.dense_weight.shape == (45, 67)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    small = torch.randn(3, 67).to(dtype)  # 3 rows < 4: the sparse kernel, threshold applied
    big = torch.randn(2, 2, 67).to(dtype)  # 4 rows: dense, nothing skipped
    with torch.no_grad():
        torch.testing.assert_close(sl(small).float(), ref_sparse(small), **tol)
        torch.testing.assert_close(sl(big).float(), ref_dense(big), **tol)
        assert not torch.allclose(ref_dense(big), ref_sparse(big), atol=1e-3)  # paths differ
        assert list(sl.state_dict()) == ["weight", "bias"]  # the copy is not saved
        sl.drop_dense_copy()
        torch.testing.assert_close(sl(big).float(), ref_sparse(big), **tol)


def test_dense_copy_bad_rows():
    sl = SparseLinear.from_linear(nn.Linear(8, 4))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="from_rows"):
            sl.keep_dense_copy(bad)


def test_sparsify_dense_copy_report_densify_and_compile():
    model = _hf("llama")
    calib = [{"input_ids": _ids()}]
    ids = _ids(1, 9, seed=3)
    ref = _out(model, ids)
    report = fastarch.sparsify(model, sparsity=0.5, calib=calib, dense_copy=8)
    assert report.dense_copy_bytes == sum(
        m.dense_weight.numel() * m.dense_weight.element_size() for m in model.modules()
        if isinstance(m, SparseLinear))
    assert report.dense_copy_bytes > 0 and all(e.dense_from == 8 for e in report.modules)
    assert "dense from 8 rows" in str(report)
    # a 9-token prefill runs every swapped layer densely: the dense model's logits
    torch.testing.assert_close(_out(model, ids), ref, rtol=1e-4, atol=1e-4)
    mlp = model.model.layers[0].mlp
    for x in (torch.randn(1, 1, 64), torch.randn(1, 12, 64)):  # both paths under fullgraph
        with torch.no_grad():
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x),
                                       rtol=1e-5, atol=1e-5)
    fastarch.densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    torch.testing.assert_close(_out(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_sparsify_dense_copy_measured(monkeypatch):
    from fastarch.sparsity import modules

    model = _hf("qwen2")
    # the measurement decides per shape: dense wins from 16 rows on one shape, never on others
    calls = []

    def fake(weight, sparsity, **kw):
        calls.append(tuple(weight.shape))
        return 16 if weight.shape[0] == 160 else None

    monkeypatch.setattr("fastarch.sparsity.api.dense_crossover", fake)
    report = fastarch.sparsify(model, sparsity=0.5, calib=[{"input_ids": _ids()}], dense_copy=True)
    by_name = {e.name: e.dense_from for e in report.modules}
    for name, rows in by_name.items():
        mod = model.get_submodule(name)
        assert rows == (16 if mod.out_features == 160 else None)
        assert (mod.dense_weight is not None) == (rows is not None)
    assert any(r == 16 for r in by_name.values()) and any(r is None for r in by_name.values())
    assert calls
    # the real measurement returns a row count from the list or None, and caches it
    w = torch.randn(48, 96)
    got = modules.dense_crossover(w, 0.5, reps=1)
    assert got is None or got in modules.CROSSOVER_ROWS
    assert modules.dense_crossover(w, 0.5, reps=1) == got


def test_sparsify_dense_copy_bad_arguments():
    model = _hf("llama")
    with pytest.raises(ValueError, match="dense_copy"):
        fastarch.sparsify(model, sparsity=0.5, dense_copy=0)
    with pytest.raises(ValueError, match="dense_copy"):
        fastarch.sparsify(model, sparsity=0.5, dense_copy="yes")
    with pytest.raises(ValueError, match="dense_copy"):
        fastarch.sparsify(model, sparsity=0.5, method="coreinfer", dense_copy=True)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.parametrize("dense_wins, want", [
    ({2}, None),  # one reading alone (noise) decides nothing
    ({4, 8, 16, 32, 64, 128}, 4),
    ({1, 2, 4, 8, 16, 32, 64, 128}, 1),  # a layer too small for skipping to pay
    ({2, 16, 32, 64, 128}, 16),
    ({128}, 128),
])
def test_dense_crossover_needs_two_counts_in_a_row(monkeypatch, dense_wins, want):
    from fastarch.sparsity import modules

    rows_iter = iter([r for r in modules.CROSSOVER_ROWS for _ in (0, 1)])

    def fake_time(fn, reps, sync):  # kernel then dense for each row count, in order
        rows = next(rows_iter)
        fake_time.kernel = not getattr(fake_time, "kernel", False)
        if fake_time.kernel:
            return 1.0
        return 0.5 if rows in dense_wins else 1.0

    monkeypatch.setattr(modules, "_time_call", fake_time)
    monkeypatch.setattr(modules, "_CROSSOVER_CACHE", {})
    assert modules.dense_crossover(torch.randn(16, 32), 0.5, reps=1) == want


def test_dense_copy_follows_the_weight_and_leaves_gradients_to_the_kernel():
    torch.manual_seed(0)
    sl = SparseLinear.from_linear(nn.Linear(16, 8), threshold=0.3)
    sl.keep_dense_copy(2)
    x = torch.randn(4, 16)
    new = nn.Linear(16, 8)
    sl.load_state_dict(new.state_dict())  # in-place copy into the weight: the copy follows
    with torch.no_grad():
        torch.testing.assert_close(sl(x), new(x), rtol=1e-5, atol=1e-5)
        sl.weight.mul_(2)  # an in-place edit too
        torch.testing.assert_close(sl(x), torch.nn.functional.linear(x, 2 * new.weight, new.bias),
                                   rtol=1e-5, atol=1e-5)
    # with a gradient wanted the sparse kernel runs (the copy is detached): weight.grad arrives
    y = sl(x)
    y.sum().backward()
    assert sl.weight.grad is not None and sl.weight.grad.abs().sum() > 0
    masked = torch.where(x.abs() > 0.3, x, torch.zeros_like(x))
    torch.testing.assert_close(y, torch.nn.functional.linear(masked, sl.weight, sl.bias),
                               rtol=1e-5, atol=1e-5)


def test_dense_copy_calls_are_not_counted_as_skipping():
    sl = SparseLinear.from_linear(nn.Linear(16, 8), threshold=10.0)  # skips every channel
    sl.keep_dense_copy(4)
    sl.track, sl.seen, sl.skipped = True, 0, 0
    with torch.no_grad():
        sl(torch.randn(8, 16))  # dense: not counted
        sl(torch.randn(1, 16))  # kernel: counted, all skipped
    assert sl.seen == 16 and sl.skipped == 16
