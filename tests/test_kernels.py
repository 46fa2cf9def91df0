"""The fused metric path (pldr_core.kernels) and the static decode engine (pldr_core.engine)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from pldr_core.cache import GCache
from pldr_core.engine import DecodeEngine, cast_for_inference
from pldr_core.errors import PLDRError
from pldr_core.generate import decode_steps
from pldr_core.kernels import disable_fused, enable_fused, is_fused, optimize_for_training

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- fused metric path ------------------------------------------------------------------------------
def test_fused_metric_path_matches_eager_values_and_gradients():
    ref = tiny_model("learned").train()
    fused = copy.deepcopy(ref)
    assert enable_fused(fused) == ref.config.num_layers and is_fused(fused)
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


def test_fused_is_reversible_and_keeps_the_state_dict():
    model = tiny_model("learned")
    keys = list(model.state_dict())
    enable_fused(model)
    assert list(model.state_dict()) == keys
    assert disable_fused(model) == model.config.num_layers and not is_fused(model)
    identity = tiny_model("identity")
    assert enable_fused(identity) == 0  # no metric path to swap


def test_optimize_for_training_leaves_cpu_models_alone():
    model = tiny_model("learned")
    assert optimize_for_training(model, "cpu") is model and not is_fused(model)


# ---- static decode engine ---------------------------------------------------------------------------
def _file_cache(model, prompt):
    gc = GCache.for_model(model, 1)
    model(prompt[:1, :3], g_cache=gc)
    return GCache.from_tensors(gc.A_LM[:, 0].clone(), gc.G_LM[:, 0].clone())


@pytest.mark.parametrize("g_mode,g_source", [
    ("learned", "prefill"), ("learned", "file"), ("learned", "none"), ("identity", "none"),
    ("random", "none"),
])
def test_engine_matches_decode_steps(g_mode, g_source):
    model = tiny_model(g_mode)
    prompt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    kw, ekw = {"g_cache": g_source == "prefill"}, {}
    if g_source == "file":
        gfile = _file_cache(model, prompt)
        kw, ekw = {"g_cache": gfile}, {"g_cache": gfile}
    ref = list(decode_steps(model, prompt, 9, kv_cache=True, **kw))
    engine = DecodeEngine(model, batch=3, max_len=16, g_source=g_source, **ekw)
    got = list(engine.steps(prompt, 9))
    assert torch.equal(torch.stack([s.token for s in got], 1), torch.stack([s.token for s in ref], 1))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-10)
    # The fast loop gives the same tokens, and the engine is reusable for a second prompt.
    assert torch.equal(engine.generate(prompt, 9), torch.stack([s.token for s in ref], 1))
    assert torch.equal(engine.generate(prompt, 9), torch.stack([s.token for s in ref], 1))


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
@pytest.mark.parametrize("g_source", ["file", "prefill"])
def test_compiled_engine_matches_eager_on_gpu(g_source):
    from pldr_core.config import preset
    from pldr_core.init import build_model

    model = build_model(preset("small", g_mode="learned"), seed=0).cuda().eval()
    prompt = torch.randint(4, 8000, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    kw, ekw = {"g_cache": True}, {}
    if g_source == "file":
        gfile = _file_cache(model, prompt)
        kw, ekw = {"g_cache": gfile}, {"g_cache": gfile}
    ref = torch.stack([s.token for s in decode_steps(model, prompt, 24, kv_cache=True, **kw)], 1)
    eager = DecodeEngine(model, batch=4, max_len=40, g_source=g_source, **ekw).generate(prompt, 24)
    compiled = DecodeEngine(model, batch=4, max_len=40, g_source=g_source, compile=True, **ekw)
    compiled.generate(prompt, 24)
    got = compiled.generate(prompt, 24)
    assert torch.equal(eager, ref)
    assert torch.equal(got, ref)


@gpu
@needs_cuda
def test_fused_compiled_gradients_match_eager_on_gpu():
    from pldr_core.config import preset
    from pldr_core.init import build_model

    # float64 so that the comparison pins the maths, not rounding.
    ref = build_model(preset("small", g_mode="learned"), seed=0).cuda().double().train()
    fused = copy.deepcopy(ref)
    enable_fused(fused)
    x = torch.randint(4, 8000, (2, 64), device="cuda")
    ref(x).logits.square().mean().backward()
    torch.compile(fused)(x).logits.square().mean().backward()
    grads = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-7, atol=1e-10)
