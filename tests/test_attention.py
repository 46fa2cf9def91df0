"""PLGA: fused SDPA equals the explicit formula; one layer equals a hand-written float64 computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from pldr_core.attention import apply_rope, rope_angles


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("g_mode", ["learned", "identity", "random"])
def test_fused_attention_equals_explicit_formula(dtype, tol, g_mode):
    model = tiny_model(g_mode, dtype=dtype)
    tokens = torch.randint(4, 64, (3, 17))
    fused = model(tokens)
    explicit = model(tokens, explicit=True, return_attention=True)
    torch.testing.assert_close(fused.logits, explicit.logits, atol=tol, rtol=tol)
    w = explicit.attentions[0]
    assert w.shape == (3, model.config.num_heads, 17, 17)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.all(w.triu(1) == 0), "attention weights must be causal"


def _hand_rope(x, positions, base):
    # interleaved pairs (2i, 2i+1) rotated by pos * base^(-2i/dk), written out element by element
    out = x.clone()
    dk = x.shape[-1]
    for s, pos in enumerate(positions):
        for i in range(dk // 2):
            theta = pos * base ** (-2 * i / dk)
            c, si = math.cos(theta), math.sin(theta)
            a, b = x[..., s, 2 * i], x[..., s, 2 * i + 1]
            out[..., s, 2 * i] = a * c - b * si
            out[..., s, 2 * i + 1] = b * c + a * si
    return out


def test_one_plga_layer_equals_hand_written_float64():
    model = tiny_model("learned", dtype=torch.float64)
    mha = model.decoder.dec_layers[0].mha1
    B, S, d = 2, 9, model.config.d_model
    H, dk = model.config.num_heads, model.config.head_dim
    x = torch.randn(B, S, d, dtype=torch.float64)
    pos = torch.arange(S).expand(B, S)
    out, ded, _ = mha(x, pos, layer=0, need_deductive=True)

    def heads(t):
        return t.view(B, S, H, dk).permute(0, 2, 1, 3)

    q = _hand_rope(heads(x @ mha.wq.weight.T + mha.wq.bias), range(S), 10000.0)
    k = _hand_rope(heads(x @ mha.wk.weight.T + mha.wk.bias), range(S), 10000.0)
    v = heads(x @ mha.wv.weight.T + mha.wv.bias)

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * mod.weight + mod.bias

    def glu(t, g):
        a = t @ g.gluw1.weight.T + g.gluw1.bias
        b = t @ g.gluw2.weight.T + g.gluw2.bias
        return (a * torch.sigmoid(a) * b) @ g.gluw3.weight.T + g.gluw3.bias

    A = ln(q.transpose(-1, -2) @ q, mha.layernorm1)
    for unit in mha.reslayerAs:
        h = A
        for g in unit.denseAs:
            h = glu(h, g)
        A = ln(A + h, unit.layernormA)
    p = mha.plgatt_layer
    z = p.Wlst @ A + p.blst
    A_LM = z * z * torch.sigmoid(z) + 1e-9
    A_P = torch.exp(p.pwlst * torch.log(A_LM))
    G = p.alst @ A_P + p.balst
    scores = (q @ G) @ k.transpose(-1, -2) / math.sqrt(dk)
    scores = scores + torch.triu(torch.full((S, S), -1e9, dtype=torch.float64), 1)
    att = torch.exp(scores - scores.amax(-1, keepdim=True))
    att = att / att.sum(-1, keepdim=True)
    ref = (att @ v).permute(0, 2, 1, 3).reshape(B, S, d) @ mha.dense.weight.T + mha.dense.bias

    torch.testing.assert_close(out, ref, atol=1e-11, rtol=0)
    for name, t in (("A", A), ("A_LM", A_LM), ("A_P", A_P), ("G_LM", G)):
        torch.testing.assert_close(ded[name], t, atol=1e-11, rtol=1e-11)


def test_half_rope_rotates_first_and_second_half_pairs():
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    cos, sin = rope_angles(torch.arange(3)[None], 8, 10000.0)
    y = apply_rope(x, cos[:, None], sin[:, None], "half")
    theta = 2 * 10000.0 ** (-2 * 1 / 8)  # position 2, pair (1, 5)
    a, b = x[0, 0, 2, 1], x[0, 0, 2, 5]
    assert torch.isclose(y[0, 0, 2, 1], a * math.cos(theta) - b * math.sin(theta))
    assert torch.isclose(y[0, 0, 2, 5], b * math.cos(theta) + a * math.sin(theta))
    # and it is a different model from the interleaved style
    assert not torch.allclose(y, apply_rope(x, cos[:, None], sin[:, None], "interleaved"))


def test_identity_g_equals_plain_sdpa_attention():
    model = tiny_model("identity", dtype=torch.float64)
    mha = model.decoder.dec_layers[1].mha1
    B, S, d, H = 2, 7, model.config.d_model, model.config.num_heads
    x = torch.randn(B, S, d, dtype=torch.float64)
    out, _, _ = mha(x, torch.arange(S).expand(B, S), layer=1)
    cos, sin = rope_angles(torch.arange(S)[None], d // H, 10000.0)

    def heads(lin):
        return lin(x).view(B, S, H, d // H).transpose(1, 2)

    q = apply_rope(heads(mha.wq), cos[:, None], sin[:, None], "interleaved")
    k = apply_rope(heads(mha.wk), cos[:, None], sin[:, None], "interleaved")
    ref = F.scaled_dot_product_attention(q, k, heads(mha.wv), is_causal=True)
    ref = mha.dense(ref.transpose(1, 2).reshape(B, S, d))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert not any(n for n, _ in model.named_parameters() if "plgatt" in n or "reslayerA" in n)


def test_metric_path_is_float32_under_bf16_autocast():
    model = tiny_model("learned", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(4, 64, (2, 8)), return_deductive=True)
    assert out.deductive[0]["G_LM"].dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_dag_terms_formula():
    from pldr_core.training.losses import dag_loss_term, dag_terms

    M = torch.randn(2, 3, 4, 4)
    expected = torch.stack([
        torch.log(torch.trace(torch.linalg.matrix_exp(M[b, h] * M[b, h])) / 4).abs()
        for b in range(2) for h in range(3)]).mean()
    torch.testing.assert_close(dag_loss_term(M), expected)
    assert dag_loss_term(torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.0)  # trace(exp 0) = dk
    model = tiny_model("learned", dtype=torch.float32)
    terms = dag_terms(model(torch.randint(4, 64, (1, 6)), return_deductive=True).deductive)
    assert set(terms) == {"A_LM", "A_P", "G_LM"} and all(torch.isfinite(t) for t in terms.values())


@pytest.mark.parametrize("same_shapes", [True, False])
def test_dag_terms_are_the_layer_mean_of_dag_loss_term_with_its_gradient(same_shapes):
    # dag_terms batches every tensor into one matrix exponential when the shapes allow: the values
    # and the gradients (the terms can be in the loss) are those of one dag_loss_term per layer.
    from pldr_core.training.losses import dag_loss_term, dag_terms

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4, 4)] * 3 if same_shapes else [(2, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4)]
    deductive = [{k: (0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).requires_grad_()
                  for k in ("A_LM", "A_P", "G_LM")} for s in shapes]
    deductive.insert(1, None)  # a layer without deductive outputs is skipped
    got = dag_terms(deductive)
    layers = [d for d in deductive if d is not None]
    want = {k: torch.stack([dag_loss_term(d[k]) for d in layers]).mean() for k in ("A_LM", "A_P", "G_LM")}
    assert list(got) == ["A_LM", "A_P", "G_LM"]
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
    if same_shapes:  # one [dk, dk] matrix per tensor works as it did per layer
        flat = [{k: d[k][0, 0] for k in d} for d in layers]
        torch.testing.assert_close(dag_terms(flat)["G_LM"],
                                   torch.stack([dag_loss_term(d["G_LM"]) for d in flat]).mean())
    inputs = [d[k] for d in layers for k in ("A_LM", "A_P", "G_LM")]
    g_got = torch.autograd.grad(sum(got.values()), inputs)
    g_want = torch.autograd.grad(sum(want.values()), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
