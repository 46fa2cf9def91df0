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


@pytest.mark.parametrize("g_mode,g_source,kernel,attention", [
    ("learned", "prefill", "torch", "torch"), ("learned", "file", "torch", "torch"),
    ("learned", "none", "torch", "torch"), ("identity", "none", "torch", "torch"),
    ("random", "none", "torch", "torch"),
    # Triton's interpreter
    ("learned", "file", "triton", "torch"), ("random", "none", "triton", "torch"),
    ("learned", "file", "triton", "triton"), ("learned", "none", "torch", "triton"),
    ("identity", "none", "torch", "triton"),
])
def test_decode_step_equals_the_eager_forward_with_a_kv_cache(g_mode, g_source, kernel, attention):
    model = tiny_model(g_mode)
    prompt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    gfile = _file_cache(model, prompt) if g_source == "file" else None
    # The engine only allocates the step's buffers and prefills them through the eager model.
    engine = DecodeEngine(model, batch=3, max_len=12, g_source=g_source, g_cache=gfile, kernel=kernel,
                          attention=attention)
    assert (engine.kernel, engine.attention) == (kernel, attention)
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


@pytest.mark.parametrize("g_mode,g_source,kernel,attention", [
    ("learned", "prefill", "torch", "torch"), ("learned", "file", "torch", "torch"),
    ("learned", "none", "torch", "torch"), ("identity", "none", "torch", "torch"),
    ("learned", "prefill", "triton", "triton"), ("random", "none", "triton", "torch"),
    ("identity", "none", "torch", "triton"),
])
def test_rows_at_their_own_positions_decode_as_each_row_alone(g_mode, g_source, kernel, attention):
    # Continuous batching: rows prefilled one at a time with prompts of different lengths, then stepped
    # together, each at its own position, give each row the logits of its own eager forward.
    model = tiny_model(g_mode)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 64, (n,), generator=gen) for n in (3, 6, 1)]
    gfile = _file_cache(model, prompts[1][None]) if g_source == "file" else None
    engine = DecodeEngine(model, batch=3, max_len=14, g_source=g_source, g_cache=gfile, kernel=kernel,
                          attention=attention)
    refs = []
    for row, ids in enumerate(prompts):
        kv = KVCache.for_model(model, 1, 14)
        gc = GCache.for_model(model, 1) if g_source == "prefill" else gfile
        ref = model(ids[None], kv_cache=kv, g_cache=gc).logits[0, -1]
        torch.testing.assert_close(engine.prefill_row(row, ids), ref, rtol=0, atol=1e-12)
        refs.append([kv, gc, ref])
    pos = torch.tensor([len(ids) for ids in prompts])
    for _ in range(5):
        tokens = torch.stack([ref.argmax(-1) for _, _, ref in refs])
        got = engine.step_rows(tokens, pos)
        for row, (kv, gc, _) in enumerate(refs):
            refs[row][2] = model(tokens[row].view(1, 1), kv_cache=kv, g_cache=gc).logits[0, -1]
            torch.testing.assert_close(got[row], refs[row][2], rtol=0, atol=1e-10)
        pos += 1
    # A row prefilled again (a new request in a freed row) leaves the others where they were.
    again = engine.prefill_row(0, prompts[1])
    alone = model(prompts[1][None], g_cache=gfile).logits[0, -1]
    torch.testing.assert_close(again, alone, rtol=0, atol=1e-12)
    got = engine.step_rows(tokens, pos)
    torch.testing.assert_close(got[1:], torch.stack([model(t.view(1, 1), kv_cache=kv, g_cache=gc).logits[0, -1]
                                                     for t, (kv, gc, _) in zip(tokens[1:], refs[1:])]),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("g_mode,g_source", [("learned", "file"), ("identity", "none"), ("random", "none")])
def test_rows_prefilled_together_equal_rows_prefilled_alone(g_mode, g_source):
    # Where G_LM does not come from the prompt, one right-padded forward prefills several rows exactly
    # as each alone: causal attention keeps the padding out of every prompt's positions.
    model = tiny_model(g_mode)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 64, (n,), generator=gen) for n in (4, 1, 7)]
    gfile = _file_cache(model, prompts[2][None]) if g_source == "file" else None
    alone = DecodeEngine(model, batch=4, max_len=12, g_source=g_source, g_cache=gfile)
    together = DecodeEngine(model, batch=4, max_len=12, g_source=g_source, g_cache=gfile)
    rows = [3, 0, 1]
    want = torch.stack([alone.prefill_row(r, p) for r, p in zip(rows, prompts)])
    torch.testing.assert_close(together.prefill_rows(rows, prompts), want, rtol=0, atol=1e-12)
    pos = torch.tensor([len(prompts[1]), len(prompts[2]), 0, len(prompts[0])])
    tokens = torch.tensor([5, 6, 7, 8])
    for _ in range(3):
        torch.testing.assert_close(together.step_rows(tokens, pos)[rows], alone.step_rows(tokens, pos)[rows],
                                   rtol=0, atol=1e-10)
        pos += 1
    if g_mode == "learned":  # G_LM from each prompt (A would see padding): each row alone
        alone = DecodeEngine(model, batch=4, max_len=12, g_source="prefill")
        together = DecodeEngine(model, batch=4, max_len=12, g_source="prefill")
        assert not together.fixed_g
        want = torch.stack([alone.prefill_row(r, p) for r, p in zip(rows, prompts)])
        torch.testing.assert_close(together.prefill_rows(rows, prompts), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(together.step_rows(tokens, pos)[rows], alone.step_rows(tokens, pos)[rows],
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("g_mode,g_source", [("learned", "prefill"), ("learned", "file"), ("identity", "none")])
def test_greedy_chunk_equals_greedy_steps_one_at_a_time(g_mode, g_source):
    # Several greedy steps in one launch, tokens chosen and fed back on the device, give each row the
    # tokens of single steps; a row that reaches the last position stays there (its later steps
    # rewrite it) and the other rows are unaffected.
    model = tiny_model(g_mode)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 64, (n,), generator=gen) for n in (3, 9, 1)]
    gfile = _file_cache(model, prompts[0][None]) if g_source == "file" else None
    chunked = DecodeEngine(model, batch=3, max_len=12, g_source=g_source, g_cache=gfile)
    single = DecodeEngine(model, batch=3, max_len=12, g_source=g_source, g_cache=gfile)
    rows = [0, 1, 2]
    first = chunked.prefill_rows(rows, prompts).argmax(-1)
    torch.testing.assert_close(single.prefill_rows(rows, prompts).argmax(-1), first)
    pos = torch.tensor([len(p) for p in prompts])
    chunked.set_rows(torch.tensor(rows), first, pos)
    want, token = [first], first
    for _ in range(4):  # row 1 (9 + 1 + 4 > 12) reaches the last position
        token = single.step_rows(token, pos.clamp(max=11)).argmax(-1)
        want.append(token)
        pos += 1
    got = chunked.greedy_chunk(2).clone()
    assert torch.equal(got[:, 0], first) and torch.equal(got[:, 1:], torch.stack(want[1:3], 1))
    got = chunked.greedy_chunk(2)  # past the cache, row 1 would fail to write its keys
    assert torch.equal(got[:, 0], want[2])
    assert torch.equal(got[[0, 2], 1:], torch.stack(want[3:5], 1)[[0, 2]])
    with pytest.raises(Exception, match="at least one step"):
        chunked.greedy_chunk(0)
