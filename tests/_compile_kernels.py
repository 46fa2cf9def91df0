"""Compile the metric-path Triton kernels for sm_90 (H100/H200) without a GPU; print shared memory.

Run by tests/test_kernels.py in a subprocess: the test process runs Triton in interpreter mode, which
cannot compile. Arguments: the precisions to compile.
"""

import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pldr_core.kernels import _glu_triton as k
from pldr_core.kernels.glu_stack import BLOCK_F, TUNING

shape = dict(U=8, J=2, D=64, FP=192, BF=BLOCK_F)  # paper-110m: 8 units of 2 GLUs, dk 64, A_dff 170
out = {}
for name, scalars in (("fwd", ["N", "eps"]), ("bwd_data", ["N", "eps"]), ("bwd_weights", ["N", "rows_per_split"])):
    fn = getattr(k, "_" + name)
    tuning = dict(TUNING[name])
    consts = {**{p: shape[p] for p in ("U", "J", "D", "FP", "BF") if p in fn.arg_names}, "BM": tuning.pop("BM")}
    for prec in sys.argv[1:]:
        consts["PREC"] = prec
        sig = {a: ("constexpr" if a in consts else "i32" if a in ("N", "rows_per_split") else
                   "fp32" if a == "eps" else "*fp32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=tuning)
        out[f"{name}/{prec}"] = compiled.metadata.shared
print(json.dumps(out))
