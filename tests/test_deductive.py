"""`pldr inspect-deductive`: figures equal a direct numpy computation on the dumped tensors, the cached
path reproduces the uncached statistics, one JSON entry per layer and head, plots, bad input."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pldr_cli.app import app
from pldr_core.deductive import Prompt, collect_prompts, inspect_deductive
from tests.conftest import tiny_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("inspect") / "m"
    r = run("init", "--preset", "tiny", "--out", out, "--tokenizer", spm_model, "--seed", 3)
    assert r.exit_code == 0, r.output
    return out


PROMPTS = [Prompt("eos", [3]), Prompt("short", [7, 9, 11, 3]), Prompt("long", list(range(4, 40)))]


def test_cli_figures_equal_numpy_on_dump(model_dir, tmp_path):
    from safetensors.numpy import load_file

    out_json, dump, plots = tmp_path / "i.json", tmp_path / "d.safetensors", tmp_path / "plots"
    r = run("inspect-deductive", model_dir, "--prompt", "", "--prompt", "the metric tensor",
            "--prompt", "the cache keeps keys and values", "--json", out_json, "--dump", dump,
            "--plots", plots, "--new-tokens", 2)
    assert r.exit_code == 0, r.output
    report = json.loads(out_json.read_text())
    tensors = load_file(str(dump))
    L, H = report["shape"]["num_layers"], report["shape"]["num_heads"]
    assert report["tensors"] == ["A_LM", "A_P", "G_LM"] and len(report["prompts"]) == 3
    # One entry per layer and head, each with every figure of every tensor.
    assert sorted((e["layer"], e["head"]) for e in report["entries"]) == [(i, h) for i in range(L)
                                                                         for h in range(H)]
    for e in report["entries"]:
        i, h = e["layer"], e["head"]
        for nm in ("A_LM", "A_P", "G_LM"):
            X = tensors[f"uncached.layers.{i}.{nm}"][:, h]  # [P, dk, dk] float64
            assert X.dtype == np.float64 and X.shape[0] == 3
            fig = e[nm]
            # Two LU factorisations agree to about cond(X) * eps in relative terms (A_LM is nearly
            # singular: det ~ 1e-70), so the tolerance follows the condition number.
            tol = 16 * X.shape[-1] * np.linalg.cond(X) * np.finfo(np.float64).eps
            assert (np.abs(np.array(fig["det"]) - np.linalg.det(X)) <= tol * np.abs(np.linalg.det(X))).all()
            sign, logabs = np.linalg.slogdet(X)
            assert (np.abs(np.array(fig["logabsdet"]) - logabs) <= tol).all()
            np.testing.assert_array_equal(fig["sign"], sign)
            np.testing.assert_array_equal(fig["rank"], np.linalg.matrix_rank(X))
            rmse = np.sqrt(((X - X.mean(0)) ** 2).mean())
            np.testing.assert_allclose(fig["rmse"], rmse, rtol=1e-12)
            np.testing.assert_allclose(fig["rmse_rel"], rmse / abs(X.mean()), rtol=1e-12)
            np.testing.assert_allclose(fig["min"], X.min(axis=(1, 2)), rtol=0)
            asym = np.linalg.norm(X - X.transpose(0, 2, 1), axis=(1, 2)) / np.linalg.norm(X, axis=(1, 2))
            np.testing.assert_allclose(fig["asymmetry"], asym, rtol=1e-12)
            assert fig["rmse"] > 0  # three different prompts give different A_LM / A_P / G_LM
    for i in range(L):
        assert (plots / f"G_LM_layer{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (plots / "rmse_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cache fidelity" in r.output and "layer 1 G_LM" in r.output


def test_kv_g_cached_statistics_identical_to_uncached():
    result = inspect_deductive(tiny_model("learned", seed=1), PROMPTS, new_tokens=3)
    fid = result.report["fidelity"]
    for nm in ("A_LM", "A_P", "G_LM"):
        # The paper reports agreement to 15 decimal places; in float64 ours is exact or within 1e-15.
        assert fid["deductive"][nm]["max_abs_diff"] <= 1e-15, fid["deductive"][nm]
        for stat, agree in fid["stats"][nm].items():
            assert agree["max_abs_diff"] <= 1e-15 or agree["equal_decimals"] is None, (nm, stat, agree)
    for e in result.report["entries"]:
        for nm in ("A_LM", "A_P", "G_LM"):
            assert e[nm]["cached"]["det"] == pytest.approx(e[nm]["det"], rel=1e-13, abs=1e-300)
            assert e[nm]["cached"]["rmse"] == pytest.approx(e[nm]["rmse"], rel=1e-13, abs=1e-300)
            assert e[nm]["cached"]["dag"] == pytest.approx(e[nm]["dag"], rel=1e-12, abs=1e-300)
    logits = fid["logits"]
    assert fid["reference"] == "kv+g"
    assert logits["kv"]["max_abs_diff"] <= 1e-12 and logits["kv"]["argmax_equal"]
    assert logits["g"]["max_abs_diff"] <= 1e-12
    # Without caches A is recomputed from the whole text: only the first step must agree.
    assert logits["none"]["first_step_max_abs_diff"] <= 1e-12
    assert result.tensors["logits.kv+g"].shape == (3, 3, 64)


def test_gcache_file_compared_and_decoded():
    from pldr_core.cache import GCache

    model = tiny_model("learned", seed=2)
    ded = model(torch.tensor([[3]]), return_deductive=True).deductive
    A = torch.stack([d["A_LM"][0] for d in ded]).float()
    G = torch.stack([d["G_LM"][0] for d in ded]).float()
    gc = GCache.from_tensors(A.double(), G.double())
    result = inspect_deductive(model, PROMPTS[:2], gcache=gc, new_tokens=2)
    entry = result.report["entries"][0]["gcache_file"]["G_LM"]
    # The file is float32: its G_LM equals the EOS prompt's to float32 rounding, not to 15 places.
    assert 0 < entry["max_abs_diff_vs_prompts"]
    assert result.report["fidelity"]["logits"]["kv+gfile"]["first_step_max_abs_diff"] > 0
    eos_only = inspect_deductive(model, PROMPTS[:1], gcache=gc, new_tokens=1)
    f = eos_only.report["fidelity"]["logits"]["kv+gfile"]
    assert f["max_abs_diff"] < 1e-4 and f["argmax_equal"]
    assert all(e["gcache_file"]["G_LM"]["max_abs_diff_vs_prompts"] < 1e-5 for e in eos_only.report["entries"])


@pytest.mark.parametrize("g_mode,names", [("identity", ["G_LM"]), ("random", ["G_LM"]),
                                          ("fixed", ["A_LM", "G_LM"])])
def test_models_without_metric_path_report_what_exists(g_mode, names):
    model = tiny_model(g_mode)
    if g_mode == "fixed":
        cfg = model.config
        shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        model.set_fixed_g(torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64))
    result = inspect_deductive(model, PROMPTS, new_tokens=2)
    rep = result.report
    assert rep["tensors"] == names and rep["notes"] and "A_P" not in rep["entries"][0]
    assert rep["fidelity"]["reference"] == "kv" and set(rep["fidelity"]["logits"]) == {"none"}
    assert rep["fidelity"]["logits"]["none"]["max_abs_diff"] <= 1e-12  # G does not depend on the text
    g = rep["entries"][0]["G_LM"]
    if g_mode == "identity":
        assert g["det"] == [1.0] * 3 and g["rmse"] == 0.0
    else:
        assert g["rmse"] <= 1e-15 and g["rank"][0] == model.config.head_dim


def test_data_folder_prompts(tmp_path):
    rows = np.arange(5 * 12, dtype=np.uint16).reshape(5, 12) % 60 + 3
    rows.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"seq_len": 12, "dtype": "uint16"}))
    prompts = collect_prompts(eos_id=3, data_dir=tmp_path, samples=3, max_len=10)
    assert len(prompts) == 3 and all(p.label.startswith("val[") for p in prompts)
    for p in prompts:
        i = int(p.label[4:-1])
        assert p.ids == rows[i, :10].tolist()


def test_bad_input_exit_2(model_dir, tmp_path):
    r = run("inspect", tmp_path / "missing")
    assert r.exit_code == 2 and "not found" in r.output
    r = run("inspect", model_dir, "--prompts-file", tmp_path / "nope.txt")
    assert r.exit_code == 2 and "prompts file" in r.output
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    r = run("inspect", model_dir, "--prompts-file", bad, "--json", tmp_path / "o.json")
    assert r.exit_code == 2 and "UTF-8" in r.output
    assert not (tmp_path / "o.json").exists()
    (tmp_path / "empty.txt").write_text("")
    assert run("inspect", model_dir, "--prompts-file", tmp_path / "empty.txt").exit_code == 2
    r = run("inspect", model_dir, "--data", tmp_path)
    assert r.exit_code == 2 and "meta.json" in r.output
