"""The decode step's attention kernel (pldr_core.kernels.decode_attn) against its torch formulation.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), fp32/fp64 only."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO

from pldr_core.kernels.decode_attn import BLOCK_T, applies, decode_attention, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L, B, H = 3, 3, 2
T = 2 * BLOCK_T + 5  # the last block is partly past the cache's end
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _inputs(dtype, dk, seed=0):
    """q [B, H, 1, dk] as a transposed view (strides of the step's own q), caches [L, B, H, T, dk]. The
    keys grow along T, so that the running maximum of the kernel's online softmax moves block by block."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, dk, generator=gen, dtype=dtype).transpose(1, 2)
    growth = torch.linspace(0.5, 2, T, dtype=dtype)[:, None]
    k = torch.randn(L, B, H, T, dk, generator=gen, dtype=dtype) * growth
    v = torch.randn(L, B, H, T, dk, generator=gen, dtype=dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _explicit(q, k_cache, v_cache, layer, pos):
    """The attention row by row from its definition, in float64: softmax(q k / sqrt(dk)) v over 0..pos."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        p = int(pos[b if pos.numel() > 1 else 0])
        k, v = k_cache[layer, b, :, :p + 1].double().cpu(), v_cache[layer, b, :, :p + 1].double().cpu()
        w = torch.softmax(q[b].double().cpu() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out[b] = w @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dk", [8, 16])
@pytest.mark.parametrize("positions", [[BLOCK_T + 1], [0, T - 1, BLOCK_T - 1]], ids=["shared", "per-row"])
def test_kernel_equals_the_torch_formulation(dtype, dk, positions):
    # Layer 1 of 3, so a read of the wrong layer shows; the keys and values past each row's position
    # are NaN in the kernel's caches, so reading one (or weighting it by 0) shows too.
    q, k, v = _inputs(dtype, dk)
    pos = torch.tensor(positions, device=DEVICE)
    ref = reference(q, k, v, 1, pos)
    torch.testing.assert_close(ref.double().cpu(), _explicit(q, k, v, 1, pos), rtol=0, atol=TOL[dtype])
    past = torch.arange(T, device=DEVICE)[None, :, None] > pos.view(-1, 1, 1)  # [1 or B, T, 1]
    k_nan = k.masked_fill(past[None, :, None], float("nan"))
    v_nan = v.masked_fill(past[None, :, None], float("nan"))
    out = decode_attention(q, k_nan, v_nan, 1, pos)
    assert out.shape == (B, H, 1, dk) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL[dtype])


def test_a_shared_position_is_every_row_at_that_position():
    q, k, v = _inputs(torch.float64, 16, seed=1)
    one = decode_attention(q, k, v, 2, torch.tensor([7], device=DEVICE))
    every = decode_attention(q, k, v, 2, torch.tensor([7, 7, 7], device=DEVICE))
    assert torch.equal(one, every)
    assert not torch.allclose(one, decode_attention(q, k, v, 2, torch.tensor([7, 8, 7], device=DEVICE)))


def test_compiled_step_attends_over_the_cache_it_just_wrote():
    # As in the decode step: write the new key and value at pos (tensor indices into the whole cache),
    # then attend. fullgraph: no graph break around the op; the op runs after the write (its fake
    # implementation gives the shape, functionalization the order).
    q, k, v = _inputs(torch.float32, 8, seed=2)
    gen = torch.Generator().manual_seed(3)
    new_k, new_v = (torch.randn(B, H, 8, generator=gen).to(DEVICE) for _ in range(2))
    pos, lid = torch.tensor([BLOCK_T + 2], device=DEVICE), torch.tensor([1], device=DEVICE)

    def step(q, k_cache, v_cache, pos):
        k_cache[lid, :, :, pos] = new_k[None]
        v_cache[lid, :, :, pos] = new_v[None]
        return decode_attention(q, k_cache, v_cache, 1, pos) * 2

    k_ref, v_ref = k.clone(), v.clone()
    k_ref[lid, :, :, pos] = new_k[None]
    v_ref[lid, :, :, pos] = new_v[None]
    out = torch.compile(step, fullgraph=True)(q, k, v, pos)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(out, 2 * reference(q, k_ref, v_ref, 1, pos), rtol=0, atol=2e-5)


def test_inputs_that_do_not_fit_are_refused():
    q, k, v = _inputs(torch.float32, 8)
    pos = torch.tensor([3], device=DEVICE)
    for bad in (dict(q=q[:2]), dict(v_cache=v[:, :, :, :5]), dict(layer=3), dict(layer=-1),
                dict(pos=torch.tensor([3, 4], device=DEVICE)), dict(pos=torch.tensor([3.0], device=DEVICE)),
                dict(k_cache=k.transpose(-1, -2).contiguous().transpose(-1, -2)),
                *([dict(pos=pos.cpu())] if DEVICE == "cuda" else [])):
        args = {**dict(q=q, k_cache=k, v_cache=v, layer=1, pos=pos), **bad}
        with pytest.raises(ValueError, match="decode_attention"):
            decode_attention(**args)


def test_applies_only_where_the_kernel_runs(monkeypatch):
    q, k = torch.empty(1, 2, 1, 16), torch.empty(2, 1, 2, 8, 16)
    assert applies(q, k, 16)
    assert not applies(q, k, 12) and not applies(q, k, 256)
    assert not applies(q, torch.empty(2**31, device="meta"), 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not applies(q, k, 16)  # CPU tensors need the interpreter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_kernel_is_as_accurate_as_the_bf16_torch_formulation_on_gpu():
    q, k, v = (t.bfloat16() for t in _inputs(torch.float32, 64, seed=4))
    pos = torch.tensor([0, T - 1, BLOCK_T], device=DEVICE)
    exact = _explicit(q, k, v, 0, pos)
    err_kernel = (decode_attention(q, k, v, 0, pos).double().cpu() - exact).abs().mean()
    err_torch = (reference(q, k, v, 0, pos).double().cpu() - exact).abs().mean()
    assert err_kernel <= 1.1 * err_torch


def test_kernel_compiles_for_hopper():
    # Compiling needs no GPU (Triton ships ptxas); the interpreter would not notice a kernel that fails to
    # lower (an fp64 exp, a loop-carried scalar) or outgrows a block's shared memory.
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_compile_decode_attn.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 12 and all(0 <= s <= 227 * 1024 for s in shared.values()), shared
