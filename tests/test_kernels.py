"""The fused metric path (``MetricPath``, pldr_core.kernels) and the static decode engine (pldr_core.engine)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, load_script, tiny_model

from pldr_core.cache import GCache
from pldr_core.config import MetricPrecision
from pldr_core.engine import DecodeEngine
from pldr_core.errors import PLDRError
from pldr_core.generate import decode_steps
from pldr_core.kernels import MetricPath, optimize_for_training
from pldr_core.model import cast_for_inference

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- fused metric path ------------------------------------------------------------------------------
def test_fused_metric_path_matches_eager_values_and_gradients():
    ref = tiny_model("learned").train()
    fused = copy.deepcopy(ref)
    assert fused.set_metric_path(MetricPath(fused=True)) == ref.config.num_layers and fused.metric_path.fused
    x = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    o_ref, o_fused = ref(x, return_deductive=True), fused(x, return_deductive=True)
    torch.testing.assert_close(o_fused.logits, o_ref.logits, rtol=0, atol=1e-12)
    for d_ref, d_fused in zip(o_ref.deductive, o_fused.deductive):
        for key in ("A", "A_LM", "A_P", "G_LM"):
            torch.testing.assert_close(d_fused[key], d_ref[key], rtol=0, atol=1e-12)
    (o_ref.logits.square().mean()).backward()
    (o_fused.logits.square().mean()).backward()
    grads = dict(fused.named_parameters())
    metric_grads = 0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-12)
        metric_grads += ".reslayerAs." in name and bool(p.grad.abs().sum() > 0)
    assert metric_grads > 0  # the metric path really was differentiated


# ---- Triton kernels for the residual GLU stack (run by Triton's interpreter on CPU) ------------------
def _perturbed_attention(config_name: str, **overrides):
    from pldr_core.build import build_model
    from pldr_core.config import preset

    model = build_model(preset(config_name, g_mode="learned", **overrides), seed=0).float()
    attn = model.decoder.dec_layers[0].mha1
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LayerNorm weights and biases are 1 and 0 at init; make every term count
        for p in attn.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return attn


def _torch_stack(attn, A0):
    A = attn.layernorm1(A0)
    for unit in attn.reslayerAs:
        A = unit(A)
    return A


@pytest.mark.parametrize("config_name,overrides,batch", [
    ("tiny", {}, 2),  # dk 16, hidden 24 (a part of one chunk), 2 units of 2 GLUs
    ("tiny", {}, 8),  # 256 rows: the weight gradients come in 4 row splits, summed outside the op
    ("tiny", {}, 5),  # 160 rows: the last row block is half full (its rows past the end must add nothing)
    ("tiny", {"A_dff": 1}, 2),   # hidden sizes that end inside a chunk, on a chunk's edge, just past it
    ("tiny", {"A_dff": 64}, 2),
    ("tiny", {"A_dff": 65}, 2),
    ("small", {"num_reslayerA": 2, "num_denseA": 3}, 1),  # the paper's dk 64 and hidden 170
])
def test_triton_glu_stack_matches_torch_values_and_gradients(config_name, overrides, batch):
    from pldr_core.kernels import glu_stack

    attn = _perturbed_attention(config_name, **overrides)
    q = torch.randn(batch, attn.num_heads, 7, attn.head_dim, generator=torch.Generator().manual_seed(4))
    A0 = (q.transpose(-1, -2) @ q).requires_grad_(True)
    A0_ref = A0.detach().clone().requires_grad_(True)
    assert glu_stack.supports(attn, A0)
    ref = _torch_stack(attn, A0_ref)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * upstream).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    attn.zero_grad()
    got = glu_stack.glu_stack(attn, A0, precision="ieee")
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A0.grad, A0_ref.grad, rtol=1e-4, atol=1e-5)
    assert len(ref_grads) == 2 + len(attn.reslayerAs) * (2 + 6 * len(attn.reslayerAs[0].denseAs))
    for name, p in attn.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # Every GLU parameter's gradient is handed over in place, not copied by AccumulateGrad (a strided
    # one would be, once per parameter and step): it is a slice of the one buffer that holds that
    # tensor's gradients for all the GLUs (for b3, the LayerNorms' gradients share that buffer).
    glus = [g for unit in attn.reslayerAs for g in unit.denseAs]
    for name in ("gluw1", "gluw2", "gluw3"):
        for kind, p in ((kind, param) for g in glus for kind, param in getattr(g, name).named_parameters()):
            assert p.grad.stride() == p.stride()
            shared = 2 * (len(attn.reslayerAs) + 1) * p.grad.nbytes if (name, kind) == ("gluw3", "bias") else 0
            assert p.grad.untyped_storage().nbytes() == len(glus) * p.grad.nbytes + shared


def _emulated_bf16_stack(attn, A0):
    """The residual GLU stack with every GLU matmul operand rounded to bf16 in the forward and in both
    backward matmuls, fp32 accumulation (the precision study's emulation: one implementation)."""
    study = load_script("metric_precision_study")
    A = attn.layernorm1(A0)
    for unit in attn.reslayerAs:
        h = A
        for g in unit.denseAs:
            a = study.linear(h, g.gluw1.weight, g.gluw1.bias, "bf16")
            b = study.linear(h, g.gluw2.weight, g.gluw2.bias, "bf16")
            h = study.linear(F.silu(a) * b, g.gluw3.weight, g.gluw3.bias, "bf16")
        A = unit.layernormA(A + h)
    return A


def _bf16_stack_errors(attn, A0, robust: bool = False):
    """Relative errors of ``glu_stack(..., "bf16")`` against the emulated bf16 stack and against fp32:
    (output, dA0, worst parameter gradient) for each, as max |error| / max |reference|; ``robust``:
    median |error| / max |reference| for the output and dA0, norm-wise for the parameter gradients."""
    from pldr_core.kernels import glu_stack

    def run(fn):
        x = A0.detach().clone().requires_grad_(True)
        attn.zero_grad()
        y = fn(attn, x)
        (y * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return y.detach(), x.grad, grads

    def rel(a, b, weights=False):
        if robust and weights:
            return ((a - b).norm() / b.norm()).item()
        err = (a - b).abs()
        return ((err.median() if robust else err.max()) / b.abs().max()).item()

    upstream = torch.randn(A0.shape, generator=torch.Generator().manual_seed(5)).to(A0.device)
    got = run(lambda m, x: glu_stack.glu_stack(m, x, precision="bf16"))
    errors = {}
    for name, ref in (("emulated", run(_emulated_bf16_stack)), ("fp32", run(_torch_stack))):
        assert set(got[2]) == set(ref[2]) and all(g.dtype == torch.float32 for g in got[2].values())
        errors[name] = (rel(got[0], ref[0]), rel(got[1], ref[1]),
                        max(rel(got[2][n], ref[2][n], weights=True) for n in ref[2]))
    return errors


def test_triton_glu_stack_bf16_operands():
    # "bf16": every GLU matmul operand rounded to bf16 (round to nearest even) in the forward and in
    # both backward matmuls, fp32 accumulation, everything else fp32. Values and gradients must equal
    # that emulation; against fp32 they differ by bf16 rounding (so the rounding is really on).
    attn = _perturbed_attention("tiny")
    q = torch.randn(2, attn.num_heads, 7, attn.head_dim, generator=torch.Generator().manual_seed(4))
    errors = _bf16_stack_errors(attn, q.transpose(-1, -2) @ q)
    assert max(errors["emulated"]) < 1e-5, errors
    assert min(errors["fp32"]) > 1e-4, errors       # a backward without rounding: ~2e-3 off emulated


def _worst_relative_errors(exact, models, x, runners=None):
    """Largest |grad - exact grad| / max|exact grad| over parameters, and the same for G_LM.

    ``runners`` (default ``models``) are what is called: e.g. compiled wrappers of ``models``."""
    outs = [m(x, return_deductive=True) for m in (exact, *(runners or models))]
    for out in outs:
        out.logits.float().square().mean().backward()
    named = [dict(m.named_parameters()) for m in models]
    worst = [0.0] * len(models)
    for name, p in exact.named_parameters():
        for i, params in enumerate(named):
            err = (params[name].grad.double() - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)
            worst[i] = max(worst[i], err.item())
    g_err = []
    for out in outs[1:]:
        g_err.append(max(((d["G_LM"].double() - e["G_LM"]).abs().max() / e["G_LM"].abs().max()).item()
                         for d, e in zip(out.deductive, outs[0].deductive)))
    return worst, g_err


def test_triton_kernel_in_the_model_is_as_accurate_as_eager_fp32():
    # Both fp32 paths are compared with the float64 model: the kernels must be no less accurate.
    exact = tiny_model("learned").train()
    eager = copy.deepcopy(exact).float()
    fused = copy.deepcopy(eager)
    fused.set_metric_path(MetricPath(fused=True, kernel="triton", precision=MetricPrecision.FP32))
    x = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    (e_eager, e_fused), (g_eager, g_fused) = _worst_relative_errors(exact, [eager, fused], x)
    assert e_fused < 2 * e_eager + 1e-6 and e_fused < 1e-2, (e_eager, e_fused)
    assert g_fused < 2 * g_eager + 1e-6 and g_fused < 1e-4, (g_eager, g_fused)


def test_glu_stack_declines_what_it_cannot_run():
    from pldr_core.kernels import glu_stack

    attn = _perturbed_attention("tiny")
    A0 = torch.randn(1, attn.num_heads, attn.head_dim, attn.head_dim)
    assert glu_stack.supports(attn, A0)
    model = tiny_model("learned")
    model.set_metric_path(MetricPath(fused=True))
    assert _precisions(model) == {MetricPrecision.FP32}
    assert not glu_stack.supports(attn, A0.double())  # float64 (golden checks) keeps the torch path
    with pytest.raises(ValueError, match="precision"):
        glu_stack.glu_stack(attn, A0, precision="fp8")
    with pytest.raises(ValueError, match="kernel"):
        tiny_model("learned").set_metric_path(MetricPath(fused=True, kernel="cuda"))


def _precisions(model) -> set:
    """The metric path precision of every learned-G layer."""
    return {layer.mha1.metric_path.precision for layer in model.decoder.dec_layers}


def test_prepare_metric_path_for_training():
    import inspect

    from pldr_cli.commands import bench, pretrain
    from pldr_core.kernels import DEFAULT_METRIC_PRECISION, prepare_metric_path
    from pldr_core.training import TrainArgs

    # bf16 operands are the default wherever training starts (docs/model.md: numerics of the metric path).
    assert DEFAULT_METRIC_PRECISION == "bf16"
    assert TrainArgs(data="d", out="o").metric_precision == DEFAULT_METRIC_PRECISION
    for command in (pretrain.pretrain, bench.bench):
        option = inspect.signature(command).parameters["metric_precision"].default
        assert option.default == DEFAULT_METRIC_PRECISION
    model = tiny_model("learned")
    assert prepare_metric_path(model, "cpu", metric_precision="fp32") == model.config.num_layers
    assert model.metric_path.fused
    assert _precisions(model) == {MetricPrecision.FP32}
    assert prepare_metric_path(tiny_model("identity"), "cpu") == 0  # nothing to fuse
    assert prepare_metric_path(model, "cpu", metric_precision="bf16") == model.config.num_layers
    assert _precisions(model) == {MetricPrecision.BF16}
    with pytest.raises(PLDRError, match="metric_precision"):
        prepare_metric_path(tiny_model("learned"), "cpu", metric_precision="fp16")


def test_triton_kernels_compile_for_hopper_within_shared_memory():
    # Compiling needs no GPU (Triton ships ptxas). This caught a forward kernel that asked for 464 KiB
    # of shared memory through software pipelining, which only failed on the GPU.
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_compile_kernels.py"), "ieee", "tf32", "bf16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 13
    hopper_max = 227 * 1024  # opt-in shared memory per block on Hopper GPUs
    assert all(0 < v <= hopper_max for v in shared.values()), shared


def test_fused_is_reversible_and_keeps_the_state_dict():
    model = tiny_model("learned")
    keys = list(model.state_dict())
    model.set_metric_path(MetricPath(fused=True))
    assert list(model.state_dict()) == keys
    assert model.set_metric_path(MetricPath()) == model.config.num_layers and not model.metric_path.fused
    identity = tiny_model("identity")
    assert identity.set_metric_path(MetricPath(fused=True)) == 0  # no metric path to set


def test_optimize_for_training_leaves_cpu_models_alone():
    model = tiny_model("learned")
    assert optimize_for_training(model, "cpu") is model and not model.metric_path.fused


# ---- static decode engine ---------------------------------------------------------------------------
def _file_cache(model, prompt):
    gc = GCache.for_model(model, 1)
    model(prompt[:1, :3], g_cache=gc)
    return GCache.from_tensors(gc.A_LM[:, 0].clone(), gc.G_LM[:, 0].clone())


def _cache_kwargs(model, prompt, g_source):
    """(decode_steps kwargs, DecodeEngine kwargs) for one G source; "file" is a G-cache from ``model``'s
    prefill of another prompt (the first row's first 3 tokens)."""
    if g_source == "file":
        gfile = _file_cache(model, prompt)
        return {"g_cache": gfile}, {"g_cache": gfile}
    return {"g_cache": g_source == "prefill"}, {}


@pytest.mark.parametrize("g_mode,g_source,kernel,rope", [
    ("learned", "prefill", "torch", "interleaved"), ("learned", "file", "torch", "interleaved"),
    ("learned", "none", "auto", "interleaved"), ("identity", "none", "auto", "interleaved"),
    ("random", "none", "torch", "interleaved"),
    # The Triton q|k|v kernel (pldr_core.kernels.kv_write) in Triton's interpreter, float64.
    ("learned", "prefill", "triton", "interleaved"), ("learned", "file", "triton", "interleaved"),
    ("random", "none", "triton", "interleaved"), ("learned", "file", "triton", "half"),
])
def test_engine_matches_decode_steps(g_mode, g_source, kernel, rope):
    model = tiny_model(g_mode, rope_style=rope)
    prompt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    kw, ekw = _cache_kwargs(model, prompt, g_source)
    ref = list(decode_steps(model, prompt, 9, kv_cache=True, **kw))
    engine = DecodeEngine(model, batch=3, max_len=16, g_source=g_source, kernel=kernel, **ekw)
    assert engine.kernel == ("triton" if kernel == "triton" else "torch")
    got = list(engine.steps(prompt, 9))
    assert torch.equal(torch.stack([s.token for s in got], 1), torch.stack([s.token for s in ref], 1))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-10)
    # The fast loop gives the same tokens, and the engine is reusable for a second prompt.
    assert torch.equal(engine.generate(prompt, 9), torch.stack([s.token for s in ref], 1))
    assert torch.equal(engine.generate(prompt, 9), torch.stack([s.token for s in ref], 1))
    # A chooser other than the built-in greedy reads each step's logits (not the first step's).
    argmax = lambda logits: logits.argmax(-1)  # noqa: E731
    assert torch.equal(engine.generate(prompt, 9, choose=argmax), torch.stack([s.token for s in ref], 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_decode_qkv_kernel_equals_rope_then_g_k(dtype, style):
    # The kernel against the torch ops it replaces, at a mid-cache position of a middle layer, with a
    # G shared by the rows through a zero stride (the kernel takes any strides outside G's last two
    # dims), and every cache entry other than the written one left as it was.
    from pldr_core.attention import apply_rope, rope_angles
    from pldr_core.kernels.kv_write import decode_qkv

    gen = torch.Generator().manual_seed(0)
    L, B, H, T, dk, p = 3, 2, 4, 10, 16, 7
    qkv = torch.randn(B, 1, 3 * H * dk, generator=gen, dtype=dtype)
    cos, sin = (t.to(dtype) for t in rope_angles(torch.arange(T), dk, 10000.0))
    G = torch.randn(L, 1, H, dk, dk, generator=gen, dtype=dtype).expand(L, B, H, dk, dk)
    k_cache = torch.randn(L, B, H, T, dk, generator=gen, dtype=dtype)
    v_cache = torch.randn(L, B, H, T, dk, generator=gen, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = decode_qkv(qkv, cos, sin, torch.tensor([p]), G, k_cache, v_cache, 1, style == "interleaved")
    q_ref, k, v = qkv.view(B, 1, 3, H, dk).transpose(1, 3).unbind(2)
    c, s = cos[p][None, None, None], sin[p][None, None, None]
    k_ref[1, :, :, p] = (G[1] @ apply_rope(k, c, s, style).transpose(-1, -2)).squeeze(-1)
    v_ref[1, :, :, p] = v[:, :, 0]
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(q, apply_rope(q_ref, c, s, style), **tol)
    torch.testing.assert_close(k_cache, k_ref, **tol)
    assert torch.equal(v_cache, v_ref)
    # Inputs that do not fit the caches are refused, not read or written out of place.
    k_ref = k_cache.clone()
    for bad in (dict(G=G[:, :1]), dict(qkv=qkv[:1]), dict(layer=3), dict(v_cache=v_cache[:, :, :, :5])):
        args = dict(qkv=qkv, cos=cos, sin=sin, pos=torch.tensor([p]), G=G, k_cache=k_cache,
                    v_cache=v_cache, layer=1, interleaved=True)
        with pytest.raises(ValueError, match="decode_qkv"):
            decode_qkv(**{**args, **bad})
    assert torch.equal(k_cache, k_ref)


def test_compiled_engine_with_the_kernel_matches_decode_steps():
    # Under torch.compile the op runs through its fake implementation and in-place mutation of the
    # caches (Triton's interpreter on CPU): the same tokens and, in float64, the same logits.
    model = tiny_model("learned")
    prompt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    kw, ekw = _cache_kwargs(model, prompt, "file")
    ref = list(decode_steps(model, prompt, 6, kv_cache=True, **kw))
    engine = DecodeEngine(model, batch=3, max_len=12, g_source="file", kernel="triton", compile=True, **ekw)
    got = list(engine.steps(prompt, 6))
    assert torch.equal(torch.stack([s.token for s in got], 1), torch.stack([s.token for s in ref], 1))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-10)


def test_decode_qkv_kernel_only_where_it_applies():
    # Power-of-two dk and 32-bit offsets; elsewhere the engine keeps its torch ops, and asking for the
    # kernel is an error.
    from pldr_core.kernels.kv_write import applies

    small, G = torch.empty(2, 1, 2, 8, 16), torch.empty(2, 1, 2, 16, 16)
    assert applies(small, G, 16)
    assert not applies(small, G, 12) and not applies(small, G, 256)
    assert not applies(torch.empty(2**31, device="meta"), G, 16)
    assert not applies(small, torch.empty(2**31, device="meta"), 16)
    model = tiny_model("learned", d_model=24, num_heads=2)  # dk 12
    with pytest.raises(PLDRError, match="power-of-two head size"):
        DecodeEngine(model, batch=1, max_len=8, g_source="prefill", kernel="triton")
    with pytest.raises(PLDRError, match="needs a fixed G_LM"):
        DecodeEngine(tiny_model("learned"), batch=1, max_len=8, g_source="none", kernel="triton")
    assert DecodeEngine(model, batch=1, max_len=8, g_source="prefill").kernel == "torch"
    with pytest.raises(PLDRError, match="unknown kernel"):
        DecodeEngine(model, batch=1, max_len=8, kernel="cuda")


def _bf16_engine_errors(g_mode, g_source, device, **engine_kw):
    """Mean |logit error| against float64 of a bf16 engine and of the bf16 eager model, same tokens."""
    from pldr_core.cache import KVCache

    exact = tiny_model(g_mode).to(device)
    model = cast_for_inference(tiny_model(g_mode, dtype=torch.float32), torch.bfloat16).to(device)
    prompt = torch.randint(4, 64, (8, 12), generator=torch.Generator().manual_seed(3)).to(device)
    kw, ekw = _cache_kwargs(exact, prompt, g_source)
    ref = list(decode_steps(exact, prompt, 8, kv_cache=True, **kw))
    engine = DecodeEngine(model, batch=8, max_len=24, g_source=g_source, **ekw, **engine_kw)
    kv = KVCache.for_model(model, 8, 24)
    gc = GCache.for_model(model, 8) if g_source == "prefill" else ekw.get("g_cache")
    engine.prefill(prompt)
    model(prompt, kv_cache=kv, g_cache=gc)
    err_engine, err_eager = [], []
    for i in range(1, 8):
        token = ref[i - 1].token
        err_engine.append((engine.step(token, prompt.shape[1] + i - 1).double() - ref[i].logits).abs().mean())
        eager = model(token[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        err_eager.append((eager.double() - ref[i].logits).abs().mean())
    return engine, torch.stack(err_engine).mean(), torch.stack(err_eager).mean()


@pytest.mark.parametrize("g_mode,g_source", [("learned", "prefill"), ("learned", "file"), ("random", "none")])
def test_bf16_engine_is_as_accurate_as_the_bf16_eager_model(g_mode, g_source):
    # With a fixed G_LM the engine caches G k where the eager model multiplies q G, so the two round
    # different products to bf16. Against float64, on the same tokens, neither may be worse.
    _, err_engine, err_eager = _bf16_engine_errors(g_mode, g_source, "cpu")
    assert 0 < err_engine <= 1.1 * err_eager, (err_engine, err_eager)


def test_engine_file_g_never_runs_the_metric_path():
    model = tiny_model("learned")
    prompt = torch.randint(4, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    gfile = _file_cache(model, prompt)
    calls = []
    for layer in model.decoder.dec_layers:
        layer.mha1.plgatt_layer.register_forward_hook(lambda *a: calls.append(1))
    DecodeEngine(model, batch=2, max_len=10, g_source="file", g_cache=gfile).generate(prompt, 5)
    assert calls == []


def test_engine_refuses_bad_input():
    model = tiny_model("learned")
    with pytest.raises(PLDRError, match="g_source"):
        DecodeEngine(model, batch=1, max_len=8, g_source="bogus")
    with pytest.raises(PLDRError, match="needs a G-cache"):
        DecodeEngine(model, batch=1, max_len=8, g_source="file")
    engine = DecodeEngine(model, batch=2, max_len=8)
    with pytest.raises(PLDRError, match="batches of 2"):
        engine.generate(torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(PLDRError, match="exceeds"):
        engine.generate(torch.ones(2, 3, dtype=torch.long), 6)


def test_cast_for_inference_keeps_the_metric_path_fp32():
    model = cast_for_inference(tiny_model("learned", dtype=torch.float32), torch.bfloat16)
    for name, p in model.named_parameters():
        metric = ".plgatt_layer." in name or ".reslayerAs." in name or ".mha1.layernorm1." in name
        assert p.dtype == (torch.float32 if metric else torch.bfloat16), name
    prompt = torch.randint(4, 64, (1, 4))
    out = DecodeEngine(model, batch=1, max_len=8, g_source="prefill").generate(prompt, 3)
    assert out.shape == (1, 3)


# ---- GPU: compiled engine and fused training --------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("how", [dict(compile=True), dict(graph=True)], ids=["compiled", "graph"])
@pytest.mark.parametrize("g_source", ["file", "prefill"])
def test_compiled_engine_matches_eager_on_gpu(g_source, how):
    from pldr_core.build import build_model
    from pldr_core.config import preset

    model = build_model(preset("small", g_mode="learned"), seed=0).cuda().eval()
    prompt = torch.randint(4, 8000, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    kw, ekw = _cache_kwargs(model, prompt, g_source)
    ref = torch.stack([s.token for s in decode_steps(model, prompt, 24, kv_cache=True, **kw)], 1)
    eager = DecodeEngine(model, batch=4, max_len=40, g_source=g_source, **ekw).generate(prompt, 24)
    compiled = DecodeEngine(model, batch=4, max_len=40, g_source=g_source, **how, **ekw)
    compiled.generate(prompt, 24)
    got = compiled.generate(prompt, 24)
    assert torch.equal(eager, ref)
    assert torch.equal(got, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("how", [dict(compile=True), dict(graph=True)], ids=["compiled", "graph"])
def test_greedy_chunks_replayed_on_gpu_equal_single_steps(how):
    # The serving path: rows of different lengths, several greedy steps per captured replay, twice
    # (the second chunk starts from the first one's last tokens, left on the device).
    from pldr_core.build import build_model
    from pldr_core.config import preset

    model = build_model(preset("small", g_mode="learned"), seed=0).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 8000, (n,), generator=gen).cuda() for n in (5, 17, 9)]
    gfile = _file_cache(model, prompts[0][None])
    single = DecodeEngine(model, batch=3, max_len=40, g_source="file", g_cache=gfile)
    chunked = DecodeEngine(model, batch=3, max_len=40, g_source="file", g_cache=gfile, **how)
    chunked.warm_up(chunk=6)
    rows = torch.arange(3).cuda()
    token = single.prefill_rows([0, 1, 2], prompts).argmax(-1)
    pos = torch.tensor([len(p) for p in prompts]).cuda()
    chunked.set_rows(rows, chunked.prefill_rows([0, 1, 2], prompts).argmax(-1), pos)
    want = [token]
    for _ in range(12):
        token = single.step_rows(token, pos).argmax(-1)
        want.append(token)
        pos += 1
    first = chunked.greedy_chunk(6).clone()
    second = chunked.greedy_chunk(6)
    assert torch.equal(first, torch.stack(want[:7], 1))
    assert torch.equal(second, torch.stack(want[6:], 1))


@gpu
@needs_cuda
@pytest.mark.parametrize("g_mode,g_source", [("learned", "prefill"), ("learned", "file"), ("random", "none")])
def test_compiled_bf16_engine_with_the_kernel_is_as_accurate_as_eager_on_gpu(g_mode, g_source):
    # The CUDA path as generate and bench run it: compiled, one CUDA graph, the Triton key/value kernel.
    engine, err_engine, err_eager = _bf16_engine_errors(g_mode, g_source, "cuda", compile=True)
    assert engine.kernel == "triton"
    assert 0 < err_engine <= 1.1 * err_eager, (err_engine, err_eager)


@gpu
@needs_cuda
def test_compiled_engine_first_step_at_the_last_position_keeps_the_cache_on_gpu():
    # Capturing the CUDA graph warms the step up first; at the cache's last position that must not
    # write past it (the kernel does not check the position) or anywhere but that position.
    from pldr_core.build import build_model
    from pldr_core.config import preset

    model = build_model(preset("small", g_mode="learned"), seed=0).cuda().eval()
    prompt = torch.randint(4, 8000, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
    engine = DecodeEngine(model, batch=2, max_len=8, g_source="prefill", compile=True)
    assert engine.kernel == "triton"
    logits = engine.prefill(prompt)
    k, v = engine.kv.k.clone(), engine.kv.v.clone()
    got = engine.step(logits.argmax(-1), 7)
    assert torch.equal(engine.kv.k[:, :, :, :7], k[:, :, :, :7])
    assert torch.equal(engine.kv.v[:, :, :, :7], v[:, :, :, :7])
    ref = DecodeEngine(model, batch=2, max_len=8, g_source="prefill")
    ref.prefill(prompt)
    torch.testing.assert_close(got, ref.step(logits.argmax(-1), 7), rtol=1e-4, atol=1e-4)


@gpu
@needs_cuda
def test_fused_compiled_gradients_match_eager_on_gpu():
    from pldr_core.build import build_model
    from pldr_core.config import preset

    # float64 so that the comparison pins the maths, not rounding.
    ref = build_model(preset("small", g_mode="learned"), seed=0).cuda().double().train()
    fused = copy.deepcopy(ref)
    fused.set_metric_path(MetricPath(fused=True))
    x = torch.randint(4, 8000, (2, 64), device="cuda")
    ref(x).logits.square().mean().backward()
    torch.compile(fused)(x).logits.square().mean().backward()
    grads = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-7, atol=1e-10)


@gpu
@needs_cuda
def test_triton_kernels_compiled_are_as_accurate_as_eager_on_gpu():
    from pldr_core.build import build_model
    from pldr_core.config import preset

    exact = build_model(preset("small", g_mode="learned"), seed=0).cuda().double().train()
    eager = copy.deepcopy(exact).float()
    fused = copy.deepcopy(eager)
    fused.set_metric_path(MetricPath(fused=True))  # fp32 kernels, the default
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randint(4, 8000, (4, 128), device="cuda")
    (e_eager, e_fused), (g_eager, g_fused) = _worst_relative_errors(
        exact, [eager, fused], x, runners=[eager, torch.compile(fused)])
    # Against float64, the compiled fp32 kernels within 3x of the eager fp32 model (TF32 would not be).
    assert e_fused < 3 * e_eager + 1e-6 and g_fused < 3 * g_eager + 1e-6, (e_eager, e_fused, g_eager, g_fused)


@gpu
@needs_cuda
def test_bf16_kernels_equal_the_emulated_bf16_stack_on_gpu():
    # The GPU's bf16 branches (bf16 casts, tl.dot on bf16 tiles) against the same emulation as the CPU
    # test, at dk 64 and hidden 170. A value sitting on a bf16 rounding boundary can round the other
    # way after a differently ordered fp32 sum, so single elements may differ by ~1e-3 and the weight
    # gradients, which sum over every row, by ~5e-4 norm-wise: the claim is on median errors for
    # values and dA0 and on norm-wise ones for the weights.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the emulation's fp32 matmuls must be fp32
    try:
        attn = _perturbed_attention("small", num_reslayerA=2, num_denseA=2).cuda()
        q = torch.randn(2, attn.num_heads, 64, attn.head_dim, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(4))
        errors = _bf16_stack_errors(attn, q.transpose(-1, -2) @ q, robust=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    emulated, fp32 = errors["emulated"], errors["fp32"]
    assert emulated[0] < 1e-5 and emulated[1] < 1e-5 and emulated[2] < 3e-3, errors
    assert all(f > 3 * e for f, e in zip(fp32, emulated)), errors  # and bf16 rounding is really on


@gpu
@needs_cuda
@pytest.mark.parametrize("kernel", [True, False])
def test_gram_of_bf16_q_equals_the_fp32_path_on_gpu(kernel):
    # Under autocast the fused path forms A0 = q^T q from bf16 q directly (fp32 accumulation, fp32
    # out): same values and the same gradient as casting q to fp32 first, with the backward as the
    # Triton kernel or as the fp32 matmul.
    from pldr_core.kernels import _Gram

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gen = torch.Generator("cuda").manual_seed(0)
        q = torch.randn(2, 3, 300, 64, device="cuda", generator=gen).bfloat16().requires_grad_(True)
        q_ref = q.detach().clone().requires_grad_(True)
        up = torch.randn(2, 3, 64, 64, device="cuda", generator=gen)
        A = _Gram.apply(q, kernel)
        qf = q_ref.float()  # one cast, as in the eager model: both uses' gradients meet in fp32
        A_ref = torch.matmul(qf.transpose(-1, -2), qf)
        assert A.dtype == torch.float32
        torch.testing.assert_close(A, A_ref, rtol=1e-5, atol=1e-4)
        (A * up).sum().backward()
        (A_ref * up).sum().backward()
        assert q.grad.dtype == torch.bfloat16
        # One bf16 rounding of the same fp32 sums (summed in another order): an ulp of bf16 at most.
        scale = q_ref.grad.float().abs().max()
        torch.testing.assert_close(q.grad.float(), q_ref.grad.float(), rtol=2**-6, atol=1e-3 * scale)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_gram_backward_kernel_rounds_once_from_16_bit_g():
    # dq = q (g + g^T) for bf16 q: the Triton kernel (interpreted here) splits g + g^T into bf16 hi
    # and lo parts and rounds the fp32 sum to bf16 once. Its error against float64 is then that one
    # rounding's; with g + g^T rounded to bf16 alone it would be ~1.4x that.
    from pldr_core.kernels import _gram_kernel_applies

    gen = torch.Generator().manual_seed(0)
    q = (0.5 * torch.randn(2, 3, 200, 64, generator=gen)).bfloat16()
    g = torch.randn(2, 3, 64, 64, generator=gen) * torch.rand(2, 3, 1, 64, generator=gen)
    assert _gram_kernel_applies(q)
    assert not _gram_kernel_applies(q.new_empty(1, 1, 4, 256))  # more shared memory than Hopper has
    assert not _gram_kernel_applies(q.half())
    with pytest.raises(ValueError, match="fp32 g"):
        torch.ops.pldr.gram_backward(q, g.bfloat16())
    got = torch.ops.pldr.gram_backward(q, g)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    sym = (g + g.transpose(-1, -2)).double()
    exact = q.double() @ sym

    def error(x):
        return ((x.double() - exact).norm() / exact.norm()).item()

    one_rounding = error(exact.bfloat16())
    assert error(got) < 1.02 * one_rounding, (error(got), one_rounding)
    assert error((q.double() @ sym.bfloat16().double()).bfloat16()) > 1.2 * one_rounding  # can tell
    # Elementwise: the exact product rounded once, up to one bf16 ulp, plus what 16 bits of g + g^T
    # and fp32 sums may miss (2**-15 of the summed magnitudes) where the sum nearly cancels.
    ulp = exact.abs().bfloat16().double() * 2**-7
    slack = (q.double().abs() @ sym.abs()) * 2**-15
    assert ((got.double() - exact.bfloat16().double()).abs() <= ulp + slack).all()


def test_custom_ops_fake_implementations_match_the_real_ones():
    # torch.compile plans memory from the fake (meta) implementations: their shapes, dtypes and
    # strides must be the real ones' (here with 4 row splits and both operand precisions).
    from pldr_core.kernels import glu_stack

    checks = ("test_schema", "test_faketensor")
    attn = _perturbed_attention("tiny")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, attn.head_dim, generator=gen)
    for precision in ("tf32", "bf16"):
        tensors, eps, per_unit = glu_stack.pack(attn.layernorm1, attn.reslayerAs)
        tensors = [t.detach() for t in tensors]
        fwd_args = (x, *tensors, eps, per_unit, precision)
        torch.library.opcheck(torch.ops.pldr.glu_stack_fwd.default, fwd_args, test_utils=checks)
        _, hs, ys = torch.ops.pldr.glu_stack_fwd(*fwd_args)
        bwd_args = (torch.randn(x.shape, generator=gen), x, hs, ys, *tensors[:5], tensors[6], eps, per_unit,
                    precision)
        torch.library.opcheck(torch.ops.pldr.glu_stack_bwd.default, bwd_args, test_utils=checks)
    q = torch.randn(2, 3, 40, 16, generator=gen).bfloat16()
    g = torch.randn(2, 3, 16, 16, generator=gen)
    torch.library.opcheck(torch.ops.pldr.gram_backward.default, (q, g), test_utils=checks)
