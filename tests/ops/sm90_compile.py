"""Compile fastarch's Triton kernels for an H100 / H200 (sm_90) without a GPU.

Run in a subprocess by test_triton_sm90.py with TRITON_INTERPRET=0 (under the interpreter that
the rest of the suite uses, ``@triton.jit`` makes functions that cannot be compiled). The
interpreter runs the kernels' arithmetic on CPU; only the compiler finds what it rejects (types,
layouts, shared memory). Prints one JSON object: case -> {"ok", "shared", "mma", "error"}.
"""
from __future__ import annotations

import importlib
import json
import sys

import triton
import triton.compiler as tc
from triton.backends.compiler import GPUTarget


def _load(name):
    # the package's own modules (the subprocess runs with TRITON_INTERPRET=0, so their
    # @triton.jit functions are compilable ones)
    return importlib.import_module(f"fastarch.kernels.{name}")


def compile_kernel(fn, types, consts, num_warps, num_stages, aligned=()):
    """types: argument -> Triton type ("*bf16", "fp32"; others i32); aligned: arguments known
    to be multiples of 16 (as the launcher's specialisation sees contiguous tensors)."""
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    src = tc.ASTSource(fn=fn, signature=sig, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def cases():
    kg = _load("sparse_gemv")
    kb = _load("block_sparse_attention")
    kn = _load("nm_linear")
    out = {}
    for dt in ("bf16", "fp16", "fp32"):
        for b in (1, 16):
            block_b, block_k, block_n, _, nw = kg._rows_config(b, 4096, 14336, _Cpu())
            types = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "idx_ptr": "*i64", "bias_ptr": f"*{dt}",
                     "y_ptr": "*fp32", "threshold": "fp32"}
            consts = dict(HAS_IDX=False, X_GATHER=True, USE_THRESHOLD=True, HAS_BIAS=True,
                          ATOMIC=True, UPCAST=False, BLOCK_B=block_b, BLOCK_K=block_k,
                          BLOCK_N=block_n)
            out[f"rows_axpy-{dt}-b{b}"] = (kg._rows_axpy, types, consts, nw, 3,
                                           ("x_ptr", "w_ptr", "y_ptr", "N", "stride_x"))
    # the down pass of sparse_mlp: the fp32 hidden against a bf16 weight, listed rows
    block_b, block_k, block_n, _, nw = kg._rows_config(16, 4096, 4096, _Cpu())
    out["rows_axpy-mlp-down-bf16"] = (
        kg._rows_axpy, {"x_ptr": "*fp32", "w_ptr": "*bf16", "idx_ptr": "*i64",
                        "bias_ptr": "*bf16", "y_ptr": "*fp32", "threshold": "fp32"},
        dict(HAS_IDX=True, X_GATHER=False, USE_THRESHOLD=False, HAS_BIAS=False, ATOMIC=True,
             UPCAST=False, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n), nw, 3, ())
    out["mlp_hidden-bf16"] = (
        kg._mlp_hidden, {"x_ptr": "*bf16", "w_in_ptr": "*bf16", "w_up_ptr": "*bf16",
                         "b_in_ptr": "*bf16", "b_up_ptr": "*bf16", "idx_ptr": "*i64",
                         "h_ptr": "*fp32", "threshold": "fp32"},
        dict(ACT=0, GATED=True, HAS_B_IN=True, HAS_B_UP=True, BLOCK_K=32, BLOCK_I=128), 4, 3, ())
    out["gather_rows_dot-bf16"] = (
        kg._gather_rows_dot, {"x_ptr": "*bf16", "w_ptr": "*bf16", "idx_ptr": "*i64",
                              "bias_ptr": "*bf16", "y_ptr": "*fp32"},
        dict(HAS_BIAS=True, BLOCK_K=32, BLOCK_I=128), 4, 3, ())
    out["nm_linear-bf16"] = (
        kn._nm_linear_kernel, {"x_ptr": "*bf16", "v_ptr": "*bf16", "i_ptr": "*u8",
                               "bias_ptr": "*bf16", "y_ptr": "*bf16"},
        dict(N=2, M=4, HAS_BIAS=True, BLOCK_O=32, BLOCK_K=128), 4, 3, ())
    attn_aligned = ("Q", "K", "V", "O", "DO", "LSE", "DI", "DQ", "DK", "DV", "sqb", "sqh", "sql",
                    "skb", "skh", "skl", "svb", "svh", "svl", "sob", "soh", "sol")
    common = {"LSE": "*fp32", "NUM": "*i32", "IDX": "*i32", "FNUM": "*i32", "FIDX": "*i32",
              "TM": "*u8", "TMI": "*i32", "QDOC": "*i64", "KDOC": "*i64", "ALIBI": "*fp32",
              "REL": "*fp32", "PACC": "*fp32", "PM": "*fp32", "PL": "*fp32", "scale": "fp32",
              "softcap": "fp32"}
    flags = dict(HAS_FULL=True, HAS_TM=True, HAS_DOC=True, HAS_ALIBI=True, HAS_SOFTCAP=True,
                 HAS_REL=True)
    for block in (64, 128):
        opts = kb._launch_opts(kb.FWD_TUNE, block, 128)
        out[f"attn-fwd-bf16-B{block}-D128"] = (
            kb._bsa_fwd, {**common, **{n: "*bf16" for n in "QKVO"}},
            dict(flags, IEEE=False, UPCAST=False, SPLIT=False, BLOCK=block, BLOCK_D=128),
            opts["num_warps"], opts["num_stages"], attn_aligned)
    opts = kb._launch_opts(kb.FWD_TUNE, 64, 128)
    out["attn-fwd-decode-split-bf16-B64-D128"] = (
        kb._bsa_fwd, {**common, **{n: "*bf16" for n in "QKVO"}},
        dict(flags, IEEE=False, UPCAST=False, SPLIT=True, BLOCK=64, BLOCK_D=128),
        opts["num_warps"], opts["num_stages"], attn_aligned)
    opts = kb._launch_opts(kb.BWD_TUNE, 64, 128)
    out["attn-bwd-bf16-B64-D128"] = (
        kb._bsa_bwd, {**common, **{n: "*bf16" for n in ("Q", "K", "V", "DO")},
                      "DI": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32"},
        dict(flags, LOWP=True, BLOCK=64, BLOCK_D=128), opts["num_warps"], opts["num_stages"],
        attn_aligned)
    return out


class _Cpu:  # _rows_config's device argument: not CUDA (the split does not matter here)
    type = "cpu"


def main(selected=None):
    results = {}
    for name, (fn, types, consts, nw, ns, aligned) in cases().items():
        if selected and name not in selected:
            continue
        try:
            k = compile_kernel(fn, types, consts, nw, ns, aligned)
            ptx = k.asm["ptx"]
            results[name] = {"ok": True, "shared": int(k.metadata.shared),
                             "mma": "wgmma" in ptx or "mma.sync" in ptx}
        except Exception as exc:  # noqa: BLE001  (reported, the test fails on it)
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or None)
