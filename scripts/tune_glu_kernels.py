"""Time and check the metric path's Triton kernels per tile configuration and matmul precision (GPU).

For the next person tuning ``pldr_core.kernels.glu_stack.TUNING``: at the paper-110m shape (batch 16 x
1024 by default) it times each kernel (forward, backward for the data, backward for the weights) for a
grid of (rows per program, hidden chunk width, warps, stages) and each operand precision (ieee, tf32,
bf16; TUNING has one table for bf16 and one that ieee and tf32 share), and reports each precision's worst
error against the same stack in float64 (output, dA0, and the W1/W3 gradients, each as max |error| /
max |exact|). Nothing is written; paste the best rows into TUNING.

    python scripts/tune_glu_kernels.py                     # ieee, tf32, bf16
    python scripts/tune_glu_kernels.py --precisions ieee --batch 8
"""

from __future__ import annotations

import argparse
import copy

import torch

from pldr_core.build import build_model
from pldr_core.config import preset
from pldr_core.kernels import glu_stack as gs

GRID = {  # (rows per program, hidden chunk width, warps, stages)
    "fwd": [(32, 32, 4, 1), (64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 1), (128, 32, 8, 2), (128, 64, 8, 1)],
    "bwd_data": [(64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 1), (64, 64, 8, 1), (128, 32, 8, 2),
                 (128, 64, 8, 1)],
    "bwd_weights": [(32, 32, 4, 1), (64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 1), (64, 64, 4, 2),
                    (64, 64, 8, 1), (128, 32, 8, 1), (128, 64, 8, 1)],
}


def _time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _rel(a: torch.Tensor, exact: torch.Tensor) -> float:
    return ((a.double() - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["ieee", "tf32", "bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this script times GPU kernels: it needs a CUDA device")

    model = build_model(preset("paper-110m", g_mode="learned"), seed=0)
    attn = model.decoder.dec_layers[0].mha1.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = 0.3 * torch.randn(args.batch, attn.num_heads, args.seq_len, attn.head_dim, device="cuda", generator=gen)
    A0 = q.transpose(-1, -2) @ q
    x = A0.reshape(-1, attn.head_dim).contiguous()

    # The float64 reference: the torch modules, autograd for dA0 and the weight gradients.
    exact_attn = copy.deepcopy(attn).double()
    x64 = x.double().requires_grad_(True)
    h = exact_attn.layernorm1(x64)
    for unit in exact_attn.reslayerAs:
        h = unit(h)
    dy = torch.randn(h.shape, device="cuda", generator=gen, dtype=torch.float64)
    h.backward(dy)
    glus = [g for unit in exact_attn.reslayerAs for g in unit.denseAs]
    exact_w1 = torch.stack([g.gluw1.weight.grad for g in glus])
    exact_w3 = torch.stack([g.gluw3.weight.grad for g in glus])
    hidden = exact_w1.shape[1]

    tensors, eps, per_unit = gs.pack(attn.layernorm1, attn.reslayerAs)
    tensors = [t.detach() for t in tensors]
    dy32 = dy.float()

    def fwd(prec):
        return torch.ops.pldr.glu_stack_fwd(x, *tensors, eps, per_unit, prec)

    def bwd(prec, saved):
        _, hs, ys = saved
        return torch.ops.pldr.glu_stack_bwd(dy32, x, hs, ys, *tensors[:5], tensors[6], eps, per_unit, prec)

    print(f"rows {x.shape[0]}, {len(glus)} GLUs, hidden {hidden}")
    for prec in args.precisions:
        saved = fwd(prec)
        grads = bwd(prec, saved)
        errors = (_rel(saved[0], h.detach()), _rel(grads[0], x64.grad),
                  _rel(grads[1].sum(0), exact_w1), _rel(grads[5].sum(0), exact_w3))
        print(f"{prec}: error vs float64  out {errors[0]:.2e}  dA0 {errors[1]:.2e}  "
              f"dW1 {errors[2]:.2e}  dW3 {errors[3]:.2e}")
        table = gs.tuning(prec)
        for name, grid in GRID.items():
            default = dict(table[name])
            for bm, bf, warps, stages in grid:
                table[name] = {"BM": bm, "BF": bf, "num_warps": warps, "num_stages": stages}
                label = f"{name:12s} BM={bm:<4d} BF={bf:<3d} warps={warps} stages={stages}"
                try:
                    ms = _time_ms(lambda: fwd(prec)) if name == "fwd" else _time_ms(lambda: bwd(prec, saved))
                    print(f"  {label}: {1000 * ms:8.1f} us" + ("" if name == "fwd" else "  (both backward kernels)"))
                except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                    print(f"  {label}: failed: {exc!r:.120}")
                finally:
                    table[name] = default
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
