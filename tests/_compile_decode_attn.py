"""Compile the decode-attention Triton kernel for sm_90 (Hopper) without a GPU; print shared memory.

Run by tests/test_decode_attn.py in a subprocess: the test process runs Triton in interpreter mode,
which cannot compile. bf16, fp32 and fp64 caches, from the smallest head size to the largest.
"""

import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pldr_core.kernels import _attn_triton
from pldr_core.kernels.decode_attn import BLOCK_T

fn = _attn_triton._decode_attn
out = {}
for dtype, acc in (("bf16", tl.float32), ("fp32", tl.float32), ("fp64", tl.float64)):
    for dk in (2, 16, 64, 128):
        consts = {"D": dk, "BT": BLOCK_T, "ACC": acc}
        sig = {a: ("constexpr" if a in consts else "*i64" if a == "pos_ptr" else
                   f"*{dtype}" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
        constexprs = {(fn.arg_names.index(a),): v for a, v in consts.items()}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        out[f"{dtype}/dk{dk}"] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).metadata.shared
print(json.dumps(out))
