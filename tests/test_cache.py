"""Cache semantics (docs/caches.md) on a tiny model (the golden tests pin them to the reference too)."""

import pytest
import torch
from conftest import tiny_model

from pldr_core.cache import GCache, KVCache
from pldr_core.generate import decode_steps
from pldr_core.model import PLDRModel


def _run(model, prompt, n, **kw):
    steps = list(decode_steps(model, prompt, n, **kw))
    return torch.stack([s.token for s in steps], 1), torch.stack([s.logits for s in steps], 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned", seed=3)


def test_kv_plus_g_equals_kv_only(model):
    prompt = torch.randint(4, 64, (2, 7))
    t_kvg, l_kvg = _run(model, prompt, 10, kv_cache=True, g_cache=True)
    t_kv, l_kv = _run(model, prompt, 10, kv_cache=True, g_cache=False)
    t_g, l_g = _run(model, prompt, 10, kv_cache=False, g_cache=True)
    assert torch.equal(t_kvg, t_kv) and torch.equal(t_kvg, t_g)
    torch.testing.assert_close(l_kvg, l_kv, atol=1e-12, rtol=0)
    torch.testing.assert_close(l_kvg, l_g, atol=1e-12, rtol=0)


def test_no_cache_recomputes_A_from_the_whole_text(model):
    prompt = torch.randint(4, 64, (1, 6))
    tokens, logits = _run(model, prompt, 6, kv_cache=False, g_cache=False)
    text = prompt
    for step in range(6):
        full = model(text).logits[:, -1]
        torch.testing.assert_close(logits[:, step], full, atol=1e-12, rtol=0)
        text = torch.cat([text, tokens[:, step:step + 1]], 1)


def test_prefill_logits_equal_full_forward(model):
    tokens = torch.randint(4, 64, (3, 9))
    kv = KVCache.for_model(model, 3, 12)
    gc = GCache.for_model(model, 3)
    torch.testing.assert_close(model(tokens, kv_cache=kv, g_cache=gc).logits, model(tokens).logits,
                               atol=1e-12, rtol=0)
    assert kv.filled and gc.filled and kv.lengths.tolist() == [9, 9, 9]


def test_gcache_from_file_equals_fixed_g_model(model):
    gc = GCache.for_model(model, 1)
    model(torch.tensor([[3]]), g_cache=gc)
    A_LM, G_LM = gc.A_LM[:, 0].clone(), gc.G_LM[:, 0].clone()
    fixed = PLDRModel(model.config.replace(g_mode="fixed")).double().eval()
    sd = {k: v for k, v in model.state_dict().items() if k in fixed.state_dict()}
    fixed.load_state_dict(sd, strict=False)
    fixed.set_fixed_g(G_LM, A_LM)
    tokens = torch.randint(4, 64, (2, 11))
    gfile = GCache.from_tensors(A_LM, G_LM)
    assert torch.equal(model(tokens, g_cache=gfile).logits, fixed(tokens).logits)
    t1, l1 = _run(model, tokens[:, :5], 6, kv_cache=True, g_cache=gfile)
    t2, l2 = _run(fixed, tokens[:, :5], 6, kv_cache=True, g_cache=False)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)


def test_row_views_prefill_prompts_of_different_lengths(model):
    prompts = [torch.randint(4, 64, (1, n)) for n in (3, 8)]
    kv = KVCache.for_model(model, 2, 16)
    gc = GCache.for_model(model, 2)
    last = []
    for b, p in enumerate(prompts):
        last.append(model(p, kv_cache=kv.row(b), g_cache=gc.row(b)).logits[:, -1])
    assert kv.filled and gc.filled and kv.lengths.tolist() == [3, 8]
    # one batched decode step continues each row at its own position
    nxt = torch.stack([l.argmax(-1) for l in last], 0)  # [2, 1]
    batched = model(nxt, kv_cache=kv, g_cache=gc).logits[:, -1]
    for b, p in enumerate(prompts):
        alone = list(decode_steps(model, p, 2, kv_cache=True, g_cache=True))[1].logits
        torch.testing.assert_close(batched[b:b + 1], alone, atol=1e-12, rtol=0)


def test_kv_cache_is_preallocated_and_refuses_overflow(model):
    kv = KVCache.for_model(model, 1, 5)
    assert kv.k.shape[3] == 5
    model(torch.randint(4, 64, (1, 5)), kv_cache=kv)
    from pldr_core.errors import PLDRError

    with pytest.raises(PLDRError, match="KV-cache holds 5 positions"):
        model(torch.tensor([[4]]), kv_cache=kv)


@pytest.mark.parametrize("g_mode", ["identity", "random"])
def test_cached_decoding_without_metric_path(g_mode):
    m = tiny_model(g_mode)
    prompt = torch.randint(4, 64, (1, 6))
    t1, l1 = _run(m, prompt, 6, kv_cache=True, g_cache=True)
    t2, l2 = _run(m, prompt, 6, kv_cache=False, g_cache=False)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=0)
