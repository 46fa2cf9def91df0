"""The model's decode step (``PLDRModel.decode_step``) is its eager forward with a KV-cache, in float64."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from pldr_core.cache import GCache, KVCache
from pldr_core.engine import DecodeEngine
from pldr_core.kernels import MetricPath


def _file_cache(model, prompt):
    gc = GCache.for_model(model, 1)
    model(prompt[:1, :3], g_cache=gc)
    return GCache.from_tensors(gc.A_LM[:, 0].clone(), gc.G_LM[:, 0].clone())


@pytest.mark.parametrize("g_mode,g_source,kernel", [
    ("learned", "prefill", "torch"), ("learned", "file", "torch"), ("learned", "none", "torch"),
    ("identity", "none", "torch"), ("random", "none", "torch"),
    ("learned", "file", "triton"), ("random", "none", "triton"),  # Triton's interpreter
])
def test_decode_step_equals_the_eager_forward_with_a_kv_cache(g_mode, g_source, kernel):
    model = tiny_model(g_mode)
    prompt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    gfile = _file_cache(model, prompt) if g_source == "file" else None
    # The engine only allocates the step's buffers and prefills them through the eager model.
    engine = DecodeEngine(model, batch=3, max_len=12, g_source=g_source, g_cache=gfile, kernel=kernel)
    assert engine.kernel == kernel
    kv = KVCache.for_model(model, 3, 12)
    gc = GCache.for_model(model, 3) if g_source == "prefill" else gfile
    ref = model(prompt, kv_cache=kv, g_cache=gc).logits[:, -1]
    torch.testing.assert_close(engine.prefill(prompt), ref, rtol=0, atol=1e-12)
    pos = torch.tensor([prompt.shape[1]])
    for _ in range(6):
        token = ref.argmax(-1)
        got = model.decode_step(token, pos, engine.state)
        ref = model(token[:, None], kv_cache=kv, g_cache=gc).logits[:, -1]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        pos += 1


def test_decode_step_runs_the_layers_own_metric_path():
    # With the KV-cache alone a learned model recomputes G_LM from the frozen A in every step, through
    # the layer's own PLGAParams with its MetricPath: the fused setting gives the same logits.
    model = tiny_model("learned")
    prompt = torch.randint(4, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    calls = []
    for layer in model.decoder.dec_layers:
        layer.mha1.plgatt_layer.register_forward_hook(lambda *a: calls.append(1))
    outs = []
    for path in (MetricPath(), MetricPath(fused=True, kernel="torch")):
        model.set_metric_path(path)
        engine = DecodeEngine(model, batch=2, max_len=8, g_source="none")
        token = engine.prefill(prompt).argmax(-1)
        calls.clear()
        outs.append(model.decode_step(token, torch.tensor([4]), engine.state))
        assert len(calls) == model.config.num_layers
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
