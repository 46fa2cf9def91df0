"""Compile the metric-path Triton kernels for sm_90 (Hopper) without a GPU; print shared memory.

Run by tests/test_kernels.py in a subprocess: the test process runs Triton in interpreter mode, which
cannot compile. Arguments: the precisions to compile.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pldr_core.kernels import _glu_triton as k
from pldr_core.kernels.glu_stack import tuning

shape = dict(U=8, J=2, D=64, F=170, FA=176)  # paper-110m: 8 units of 2 GLUs, dk 64, A_dff 170 (176 padded)
out = {}
for name in ("fwd", "bwd_data", "bwd_weights"):
    fn = getattr(k, "_" + name)
    for prec in sys.argv[1:]:
        options = dict(tuning(prec)[name])
        consts = {**{p: shape[p] for p in ("U", "J", "D", "F", "FA") if p in fn.arg_names},
                  "BM": options.pop("BM"), "BF": options.pop("BF"), "PREC": prec}
        bf16 = {"W1", "W2", "W3", "HS", "DG"} if prec == "bf16" else set()  # what glu_stack passes as bf16
        sig = {a: ("constexpr" if a in consts else "i32" if a in ("N", "rows_per_split") else
                   "fp32" if a == "eps" else "*bf16" if a in bf16 else "*fp32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        out[f"{name}/{prec}"] = compiled.metadata.shared
# The backward of A0 = q^T q for bf16 q (pldr_core.kernels._gram_backward).
sig = {"Q": "*bf16", "G": "*fp32", "DQ": "*bf16", "S": "i32", "D": "constexpr", "BM": "constexpr"}
for dk in (16, 32, 64, 128):  # the head sizes _gram_kernel_applies takes
    src = ASTSource(fn=k._gram_bwd, signature=sig, constexprs={(4,): dk, (5,): 128})
    out[f"gram_bwd/bf16/dk{dk}"] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).metadata.shared
print(json.dumps(out))
