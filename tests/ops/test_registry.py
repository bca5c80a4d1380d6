"""The op registry: Python schema strings equal the native ones (csrc/ops.cpp is the one list),
every op has a fake kernel, and fastarch.info reports each op."""
import io
import os

import pytest
import torch

import fastarch
from fastarch import native
from fastarch.ops.registry import OPS


@pytest.mark.skipif(not native.native_loaded(), reason="fastarch._C is not built")
@pytest.mark.parametrize("name", sorted(OPS))
def test_python_schema_equals_native(name):
    native_schema = str(getattr(torch.ops.fastarch, name).default._schema)
    parsed = str(torch._C.parse_schema("fastarch::" + OPS[name].schema))
    assert native_schema == parsed


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_a_fake_kernel(name):
    qual = f"fastarch::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta") or \
        torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CompositeExplicitAutograd") or \
        torch.library.get_kernel(qual, "Meta") is not None


def test_info_lists_every_op():
    buf = io.StringIO()
    report = fastarch.info(file=buf)
    text = buf.getvalue()
    assert report["torch"] == torch.__version__
    for name in OPS:
        assert name in report["ops"] and name in text
    expected_cpu = "C++" if native.native_loaded() else "reference"
    assert all(b["cpu"] == expected_cpu for b in report["ops"].values())
    paths = report["cpu_gemv_bf16"]
    assert "cpu_gemv_bf16" in text
    if native.native_loaded():
        assert paths == "widening" or set(paths.split(",")) <= {"bf16-dot", "amx"}, paths
    attn = report["cpu_attention"]
    assert "cpu_attention" in text
    if native.native_loaded():
        bf16, f32, *rest = attn.split(", ")
        assert bf16 in ("bf16 amx", "bf16 bf16-dot", "bf16 fp32-tiles"), attn
        assert f32 in ("fp32 brgemm", "fp32 avx2", "fp32 mkl"), attn
        # the grouped decode is built with AVX-512 (cpu_capability: the build's ISA), unless
        # FASTARCH_ATTN_DECODE_GROUP=0 turns it off
        grouped = (native.cpu_capability() == "avx512"
                   and os.environ.get("FASTARCH_ATTN_DECODE_GROUP", "1")[:1] != "0")
        assert rest == (["grouped decode"] if grouped else []), attn
        if "amx" in paths.split(","):  # the CPU has AMX tiles: attention finds them too
            assert bf16 == "bf16 amx", attn


@pytest.mark.skipif(not native.cuda_built(), reason="the CUDA kernels are not built here")
def test_cuda_kernels_are_bound():
    # The CUDA chooser calls these; a build that lost a binding would only fail on a GPU.
    for name in ("sparse_gemv_cuda", "sparse_gemv_index_cuda", "gather_gemv_cuda", "sparse_mlp_cuda"):
        assert callable(getattr(native._C, name)), name
