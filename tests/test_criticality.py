"""pldr criticality: the order parameter against float64 recomputations, per-head figures, the
commutant residual, the spike detector, the JSON's token ids, Avg0 and the error contract."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from pldr_cli.app import app
from pldr_core.attention import apply_rope, rope_tables
from pldr_core.criticality import (
    OrderAccumulator,
    Protocol,
    SpikeDetector,
    commutant_mask,
    commutant_residual,
    criticality_probe,
    measure_criticality,
    reading,
)

runner = CliRunner()
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
KINDS = ("A", "A_LM", "A_P", "G_LM")


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("crit") / "m"
    assert run("init", "--preset", "tiny", "--out", out, "--tokenizer", spm_model, "--seed", 2).exit_code == 0
    return out


def _direct(model, ids):
    """{kind: [L, H, dk, dk] float64} from the model's own forward pass (no library code)."""
    out = model(torch.tensor([ids]), return_deductive=True).deductive
    return {k: torch.stack([d[k][0] for d in out]).double() for k in KINDS}


def _op(X1, XC):
    return math.sqrt(float(((X1 - XC) ** 2).mean())) / abs(float(XC.mean()))


def test_op_is_zero_when_run1_is_run_C():
    X = {k: torch.randn(2, 3, 4, 4, dtype=torch.float64) + 1 for k in KINDS}
    acc = OrderAccumulator(2, "cpu")
    acc.add(X, {k: v + 0.1 for k, v in X.items()}, X)
    assert acc.order_parameter("1C") == {k: 0.0 for k in KINDS}
    assert all(v > 0 for v in acc.order_parameter("12").values())


def test_op_of_learned_model_pinned_against_float64_forward():
    model = tiny_model()
    with torch.no_grad():
        r = measure_criticality(model, PROMPTS, Protocol(samples=3, new_tokens=6, drift_tokens=2))
        s = r.samples
        X1 = {k: torch.stack([_direct(model, x.prompt_ids + x.run1_ids)[k] for x in s]) for k in KINDS}
        X2 = {k: torch.stack([_direct(model, x.prompt_ids + x.run2_ids)[k] for x in s]) for k in KINDS}
        XC = {k: torch.stack([_direct(model, x.prompt_ids)[k] for x in s]) for k in KINDS}
    assert [x.prompt_ids for x in s] == PROMPTS and all(len(x.run1_ids) >= 1 for x in s)
    for k in KINDS:
        assert r.order_parameter[k] == pytest.approx(_op(X1[k], XC[k]), rel=1e-10)
        assert r.order_parameter_12[k] == pytest.approx(
            math.sqrt(float(((X1[k] - X2[k]) ** 2).mean())) / abs(float(X1[k].mean())), rel=1e-10)
        for i in range(2):
            assert r.per_layer[i]["order_parameter"][k] == pytest.approx(_op(X1[k][:, i], XC[k][:, i]), rel=1e-10)
        for run, X in (("1", X1), ("2", X2), ("C", XC)):
            assert r.stats[run][k]["mean"] == pytest.approx(float(X[k].mean()), rel=1e-9)
            assert r.stats[run][k]["std"] == pytest.approx(float(X[k].std(unbiased=False)), rel=1e-6)
        assert r.order_parameter[k] > 0
    # per-head g_rms and the drift at t = 1 from the same tensors
    g = X1["G_LM"].pow(2).mean((-2, -1)).sqrt().mean(0)
    assert r.per_head[1]["g_rms"] == pytest.approx(float(g[0, 1]), rel=1e-10)
    with torch.no_grad():
        G1 = torch.stack([_direct(model, x.prompt_ids + x.run1_ids[:1])["G_LM"] for x in s])
    d = (G1 - XC["G_LM"])[:, 1]
    eps = (d.pow(2).mean((1, 2, 3)).sqrt() / G1[:, 1].pow(2).mean((1, 2, 3)).sqrt()).mean()
    assert r.eps_G[0]["t"] == 1 and r.eps_G[0]["samples"] == 3
    assert r.eps_G[0]["eps_G"][1] == pytest.approx(float(eps), rel=1e-10)
    assert r.eps_G[0]["max_abs_diff"][1] == pytest.approx(float(d.abs().max()), rel=1e-10)
    assert r.per_head[0]["entropy_over_log_S"] <= 1.0 + 1e-12
    assert "near-critical" in reading(r) or "sub-critical" in reading(r)


def test_per_head_figures_recomputed():
    model = tiny_model()
    with torch.no_grad():
        r = measure_criticality(model, [PROMPTS[0]], Protocol(samples=1, new_tokens=2, drift_tokens=0,
                                                              temperature=1e-6, top_p=1.0))
        ids = r.samples[0].prompt_ids + r.samples[0].run1_ids
        out = model(torch.tensor([ids]), return_attention=True, return_deductive=True)
    w = out.attentions[1][0, 0, -1]
    ent = float(-(w * w.log()).sum())
    A = out.deductive[1]["A"][0, 0]
    energy = float(((A - A.mean(0, keepdim=True)) ** 2).mean() / (A ** 2).mean())
    row = next(h for h in r.per_head if h["layer"] == 1 and h["head"] == 0)
    assert row["entropy"] == pytest.approx(ent, rel=1e-9)
    assert row["entropy_over_log_S"] == pytest.approx(ent / math.log(len(ids)), rel=1e-9)
    assert row["a_row_energy"] == pytest.approx(energy, rel=1e-9)
    G = out.deductive[1]["G_LM"][0, 0]
    spec = next(h for h in r.spectra if h["layer"] == 1 and h["head"] == 0)
    assert spec["G_LM_spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(G, ord=2)), rel=1e-9)
    sv = torch.linalg.svdvals(A)
    assert spec["rank_A"] == int((sv > 64 * torch.finfo(torch.float32).eps * sv[0]).sum())


@pytest.mark.parametrize("g_mode", ["identity", "random"])
def test_constant_g_has_op_zero_and_still_reports_A(g_mode):
    model = tiny_model(g_mode=g_mode)
    r = measure_criticality(model, PROMPTS[:2], Protocol(samples=2, new_tokens=4))
    assert r.order_parameter["G_LM"] == 0.0
    assert math.isfinite(r.order_parameter["A"]) and r.order_parameter["A"] > 0
    assert "0 by definition" in r.notes[0] and "0 by definition" in reading(r)
    assert criticality_probe(model, np.array(PROMPTS[:1] * 2), new_tokens=3).op_G_LM == 0.0


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_commutant_residual(style):
    dk = 8
    mask = commutant_mask(dk, style)
    gen = torch.Generator().manual_seed(0)
    # a G built from 2x2 blocks [[a, b], [-b, a]] on each rotary pair commutes with every rotation
    G = torch.zeros(dk, dk, dtype=torch.float64)
    pairs = [(2 * i, 2 * i + 1) if style == "interleaved" else (i, i + dk // 2) for i in range(dk // 2)]
    for a0, a1 in pairs:
        a, b = torch.randn(2, generator=gen, dtype=torch.float64)
        G[a0, a0], G[a1, a1], G[a0, a1], G[a1, a0] = a, a, b, -b
    x = torch.randn(1, 1, 5, dk, generator=gen, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(5)[None] * 3 + 1, dk, 10000.0)
    torch.testing.assert_close(apply_rope(x @ G, cos, sin, style), apply_rope(x, cos, sin, style) @ G)
    assert float(commutant_residual(G, style)) == pytest.approx(0.0, abs=1e-15)
    R = torch.randn(dk, dk, generator=gen, dtype=torch.float64).masked_fill(mask, 0.0)
    assert float(commutant_residual(R, style)) == pytest.approx(1.0, abs=1e-15)
    full = torch.randn(dk, dk, generator=gen, dtype=torch.float64)
    assert 0.0 < float(commutant_residual(full, style)) < 1.0


def test_spike_detector_flags_a_planted_spike_and_nothing_in_a_smooth_curve():
    rng = np.random.default_rng(0)
    steps = np.arange(2000)
    smooth = 2.0 + 6.0 * np.exp(-steps / 300) + rng.normal(0, 0.02, steps.size)
    det = SpikeDetector()
    assert [det.update(int(s), float(v)) for s, v in zip(steps, smooth)].count(None) == steps.size
    assert det.count == 0
    spiked = smooth.copy()
    spiked[1200] += 1.0
    det = SpikeDetector()
    records = [r for s, v in zip(steps, spiked) if (r := det.update(int(s), float(v))) is not None]
    assert [r.step for r in records] == [1200] and det.count == 1
    assert records[0].to_dict()["kind"] == "spike" and records[0].score > det.threshold
    assert det.summary() == {"spikes": 1, "spike_steps": [1200]}


def test_probe_is_cheap_and_keeps_train_mode():
    model = tiny_model().train()
    rows = np.array([PROMPTS[2] * 2] * 4)
    p = criticality_probe(model, rows, new_tokens=4, prompts=3)
    assert model.training and p.samples == 3
    assert len(p.per_layer_G_LM) == len(p.per_layer_A) == 2
    assert p.op_G_LM > 0 and p.op_A > 0 and set(p.to_dict()) >= {"op_G_LM", "op_A"}


def test_cli_json_recomputable_from_its_token_ids(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the metric tensor of power law\n\nkeys and values in the model and the cache\n")
    out = tmp_path / "crit.json"
    r = run("criticality", model_dir, "--prompts-file", prompts, "--samples", 3, "--new-tokens", 6,
            "--drift-tokens", 2, "--json", out, "--plots", tmp_path / "plots", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "OP(G_LM) =" in r.output and "OP per layer" in r.output
    doc = json.loads(out.read_text())
    assert {"protocol", "order_parameter", "order_parameter_12", "stats", "per_layer", "per_head", "eps_G",
            "spectra", "samples"} <= set(doc)
    assert set(doc["order_parameter"]) == set(KINDS) and set(doc["stats"]) == {"1", "2", "C"}
    assert doc["protocol"]["top_p"] == 0.8 and len(doc["samples"]) == 2
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"op_per_layer.png", "eps_G.png",
                                                                 "entropy_per_head.png"}
    from pldr_core.checkpoint import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        X1 = {k: [] for k in KINDS}
        XC = {k: [] for k in KINDS}
        for s in doc["samples"]:
            for k, v in _direct(model, s["prompt_ids"] + s["run1_ids"]).items():
                X1[k].append(v)
            for k, v in _direct(model, s["prompt_ids"]).items():
                XC[k].append(v)
    for k in KINDS:
        assert doc["order_parameter"][k] == pytest.approx(_op(torch.stack(X1[k]), torch.stack(XC[k])), rel=1e-4)


def test_cli_data_folder(tmp_path, spm_model):
    from pldr_core.data import tokenize_corpus

    src = tmp_path / "c.txt"
    src.write_text("\n".join(f"the metric tensor keeps the cache {i} and the model" for i in range(300)))
    tokenize_corpus([str(src)], tmp_path / "tok", tokenizer=spm_model, seq_len=32, val_fraction=0.1)
    bare = tmp_path / "bare"
    assert run("init", "--preset", "tiny", "--out", bare, "--seed", 1, "--vocab-size", 400).exit_code == 0
    r = run("criticality", bare, "--data", tmp_path / "tok", "--samples", 2, "--new-tokens", 3,
            "--json", tmp_path / "d.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "d.json").read_text())
    assert len(doc["samples"]) == 2 and all(len(s["prompt_ids"]) == 32 for s in doc["samples"])


def test_bad_input_one_line_exit_2(model_dir, tmp_path):
    bare = tmp_path / "bare"
    assert run("init", "--preset", "tiny", "--out", bare).exit_code == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        ([bare], "tokenizer"),
        ([model_dir, "--samples", 0], "--samples"),
        ([model_dir, "--top-p", 1.5], "--top-p"),
        ([model_dir, "--prompts-file", empty], "no prompts"),
        ([model_dir, "--new-tokens", 200], "context"),
    ]
    for args, needle in cases:
        r = run("criticality", *args, "--json", tmp_path / "x.json")
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x.json").exists()


def test_avg0_group_and_average():
    from pldr_core.tasks import AVG0_METRICS, avg0, expand_tasks

    assert expand_tasks("pldr_avg0") == ["arc_easy", "hellaswag", "openbookqa", "piqa", "social_iqa",
                                         "winogrande"]
    assert expand_tasks("pldr_avg0,arc_challenge,piqa")[-1] == "arc_challenge"
    results = {"results": {t: {"acc,none": 0.3, "acc_norm,none": 0.5} for t in AVG0_METRICS}}
    results["results"]["winogrande"] = {"acc,none": 0.6}
    got = avg0(results)
    assert got["tasks"]["social_iqa"] == {"metric": "acc", "value": pytest.approx(30.0)}
    assert got["average"] == pytest.approx((50 * 4 + 30 + 60) / 6)
    del results["results"]["piqa"]
    assert avg0(results) is None
