"""The CPU kernels compile for hosts without the instructions of the build machine: the setup
builds with -march=native, and the AVX2 / AVX-512 / AVX512-BF16 / AMX paths of csrc/cpu sit
behind their #if guards. A call into a guarded helper from unguarded code builds here and fails
on an older host (or with FASTARCH_CPU_ARCH="", the baseline), so each source is compiled for
the baseline x86-64, for AVX2 and for AVX-512 without BF16 (syntax and types only: no code)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None
    or not SOURCES, reason="needs g++ on x86-64 and the csrc tree (a source checkout)")


@pytest.mark.parametrize("arch", ["x86-64", "x86-64-v3", "skylake-avx512"])
def test_cpu_sources_compile_without_the_build_hosts_instructions(arch):
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-fsyntax-only", "-fopenmp", f"-march={arch}", "-DFASTARCH_WITH_CPU",
             *(f"-I{p}" for p in include_paths()), f"-I{ROOT / 'csrc' / 'cpu'}"]
    for src in SOURCES:
        out = subprocess.run(["g++", *flags, str(src)], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"{src.name} for -march={arch}:\n{out.stderr[-3000:]}"
