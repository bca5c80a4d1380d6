"""The Triton kernels compile for an H100 / H200 (sm_90) with their default launch options, and
the attention launcher steps down its pipeline stages when a configuration does not fit."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
H100_SHARED_PER_BLOCK = 232448  # bytes of shared memory a block may opt into on sm_90


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton cannot compile for CUDA without a GPU: {exc}")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(compiled):
    bad = {k: v["error"] for k, v in compiled.items() if not v["ok"]}
    assert not bad, bad
    assert len(compiled) >= 14


def test_default_launch_options_fit_in_shared_memory(compiled):
    for name, res in compiled.items():
        assert res["shared"] <= H100_SHARED_PER_BLOCK, (name, res["shared"])


def test_tensor_core_paths_use_mma(compiled):
    # the attention tiles and the 16-row GEMV tile (bf16 / fp16) must reach the matrix units
    for name in ("attn-fwd-bf16-B64-D128", "attn-fwd-bf16-B128-D128", "attn-bwd-bf16-B64-D128",
                 "attn-fwd-decode-split-bf16-B64-D128",
                 "rows_axpy-bf16-b16", "rows_axpy-fp16-b16"):
        assert compiled[name]["mma"], name


def test_attention_launch_steps_down_stages(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from fastarch.kernels import block_sparse_attention as kb

    calls = []

    class FakeKernel:
        fn = type("F", (), {"__name__": "fake_kernel"})

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **consts):
                calls.append(num_stages)
                if num_stages > 1:
                    raise OutOfResources(300000, H100_SHARED_PER_BLOCK, "shared memory")
            return launch

    monkeypatch.setattr(kb, "_STAGES_THAT_FIT", {})
    import torch

    args = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    kb._launch(FakeKernel(), (1,), args, {"BLOCK": 128}, {"num_warps": 8, "num_stages": 3})
    assert calls == [3, 2, 1]
    kb._launch(FakeKernel(), (1,), args, {"BLOCK": 128}, {"num_warps": 8, "num_stages": 3})
    assert calls == [3, 2, 1, 1]  # remembered: no second retry
    # another requested stage count is its own entry (a sweep's 2 is not the default's memo)
    kb._launch(FakeKernel(), (1,), args, {"BLOCK": 64}, {"num_warps": 8, "num_stages": 3})
    kb._launch(FakeKernel(), (1,), args, {"BLOCK": 64}, {"num_warps": 8, "num_stages": 2})
    assert calls[4:] == [3, 2, 1, 2, 1]
    with pytest.raises(OutOfResources):
        class Never(FakeKernel):
            def __getitem__(self, grid):
                def launch(*a, **k):
                    raise OutOfResources(1, 0, "shared memory")
                return launch
        kb._launch(Never(), (1,), args, {"BLOCK": 64}, {"num_warps": 4, "num_stages": 2})
