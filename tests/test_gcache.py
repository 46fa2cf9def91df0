"""G-cache export: file contents, reductions, the spread report, the reader's
checks, and the `pldr export-gcache` contract."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_model
from pldr_cli.app import app
from pldr_core.cache import GCache
from pldr_core.checkpoint import fingerprint, load_model
from pldr_core.errors import PLDRError
from pldr_core.gcache import export_gcache, g_spread, read_gcache

PROMPTS = [[3], [5, 9, 17, 3], [40, 2, 8, 8, 21, 33, 7, 3]]
runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned", seed=4, dtype=torch.float32)


def prefill_g(model, ids):
    gc = GCache.for_model(model, 1)
    with torch.no_grad():
        model(torch.tensor([ids]), g_cache=gc)
    return gc.A_LM[:, 0], gc.G_LM[:, 0]


def file_tensors(path, L):
    t = load_file(str(path))
    return (torch.stack([t[f"layers.{i}.A_LM"] for i in range(L)]),
            torch.stack([t[f"layers.{i}.G_LM"] for i in range(L)]))


def test_export_first_writes_the_prefill_g(model, tmp_path):
    res = export_gcache(model, PROMPTS, tmp_path / "g.safetensors", labels=["", "a", "b"])
    L = model.config.num_layers
    A, G = file_tensors(res.path, L)
    A0, G0 = prefill_g(model, PROMPTS[0])
    assert torch.equal(A, A0) and torch.equal(G, G0) and G.dtype == torch.float32
    assert G.shape == (L, model.config.num_heads, model.config.head_dim, model.config.head_dim)
    with safe_open(str(res.path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pldr-gcache" and meta["fingerprint"] == fingerprint(model)
    assert (meta["count"], meta["reduction"], json.loads(meta["prompts"])) == ("3", "first", ["", "a", "b"])
    assert (meta["num_layers"], meta["num_heads"], meta["head_dim"]) == ("2", "2", "16")
    # the per-prompt tensors are each prompt's own prefill G (unpadded)
    for n, ids in enumerate(PROMPTS):
        assert torch.equal(res.per_prompt_G[n], prefill_g(model, ids)[1])


def test_export_mean(model, tmp_path):
    res = export_gcache(model, PROMPTS, tmp_path / "g.safetensors", reduce="mean")
    A, G = file_tensors(res.path, model.config.num_layers)
    each = [prefill_g(model, ids) for ids in PROMPTS]
    torch.testing.assert_close(G, torch.stack([g for _, g in each]).mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(A, torch.stack([a for a, _ in each]).mean(0), atol=1e-6, rtol=0)
    assert not torch.allclose(G, each[0][1], atol=1e-4)  # the prompts really differ


def test_spread_equals_a_direct_computation(model, tmp_path):
    res = export_gcache(model, PROMPTS, tmp_path / "g.safetensors")
    Gs = np.stack([prefill_g(model, ids)[1].double().numpy() for ids in PROMPTS])  # [N, L, H, dk, dk]
    for layer, row in enumerate(res.spread):
        x = Gs[:, layer]
        mean = x.mean(axis=0)
        rmse = np.sqrt(((x - mean) ** 2).mean())
        assert row["rmse"] == pytest.approx(rmse, rel=1e-6) and rmse > 0
        assert row["mean_abs"] == pytest.approx(np.abs(mean).mean(), rel=1e-6)
        assert row["rel_rmse"] == pytest.approx(rmse / np.abs(mean).mean(), rel=1e-6)
    one = g_spread(res.per_prompt_G[:1])
    assert all(r["rmse"] == 0.0 for r in one)


@pytest.mark.parametrize("g_mode", ["identity", "random", "fixed"])
def test_export_refuses_models_without_metric_path(tmp_path, g_mode):
    m = tiny_model(g_mode, dtype=torch.float32)
    with pytest.raises(PLDRError, match="no metric path"):
        export_gcache(m, [[3]], tmp_path / "g.safetensors")
    assert not (tmp_path / "g.safetensors").exists()


def test_reader_checks(model, tmp_path):
    path = export_gcache(model, PROMPTS[:1], tmp_path / "g.safetensors").path
    gc = read_gcache(path, model)
    assert gc.source == "file" and torch.equal(gc.G_LM[:, 0], prefill_g(model, [3])[1])
    other = tiny_model("learned", seed=5, dtype=torch.float32)
    with pytest.raises(PLDRError, match="another model"):
        read_gcache(path, other)
    assert read_gcache(path, other, force=True).filled
    wider = tiny_model("learned", seed=5, dtype=torch.float32, num_heads=4)
    with pytest.raises(PLDRError, match="heads"):
        read_gcache(path, wider, force=True)
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(path.read_bytes()[:-100])
    junk = tmp_path / "j.safetensors"
    junk.write_bytes(b"\x00" * 64)
    for bad in (trunc, junk):
        with pytest.raises(PLDRError, match="not a readable G-cache"):
            read_gcache(bad, model)


# ---- CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    d = tmp_path_factory.mktemp("exp") / "m"
    assert run_cli("init", "--preset", "tiny", "--out", d, "--tokenizer", spm_model, "--seed", 3).exit_code == 0
    return d


def test_cli_export_default_prompt_is_eos(model_dir, tmp_path):
    out = tmp_path / "g.safetensors"
    r = run_cli("export-gcache", model_dir, "--out", out)
    assert r.exit_code == 0, r.output
    m = load_model(model_dir)
    A, G = file_tensors(out, m.config.num_layers)
    assert torch.equal(G, prefill_g(m, [m.config.eos_id])[1])
    assert read_gcache(out, m).meta["fingerprint"] == fingerprint(m)


def test_cli_export_json_spread(model_dir, tmp_path, spm_model):
    from pldr_core.tokenizer import Tokenizer

    texts = ["the metric tensor", "power law graph attention", "keys and values"]
    (tmp_path / "p.txt").write_text("\n".join(texts[1:]) + "\n")
    out = tmp_path / "g.safetensors"
    r = run_cli("export-gcache", model_dir, "--out", out, "--prompt", texts[0], "--prompts-file",
                tmp_path / "p.txt", "--reduce", "mean", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["count"] == 3 and data["reduction"] == "mean" and data["prompts"] == texts
    m = load_model(model_dir)
    tok = Tokenizer(spm_model)
    Gs = torch.stack([prefill_g(m, tok.encode(t))[1] for t in texts])
    assert data["prompt_tokens"] == [len(tok.encode(t)) for t in texts]
    for row, want in zip(data["spread"], g_spread(Gs)):
        assert row["rmse"] == pytest.approx(want["rmse"], rel=1e-9) and row["rmse"] > 0
        assert row["rel_rmse"] == pytest.approx(want["rel_rmse"], rel=1e-9)
    torch.testing.assert_close(file_tensors(out, m.config.num_layers)[1], Gs.mean(0), atol=1e-6, rtol=0)
    r = run_cli("export-gcache", model_dir, "--out", tmp_path / "g2.safetensors", "--prompt", "a",
                "--prompt", "b")
    assert r.exit_code == 0 and "layer 1: rmse" in r.stdout


def test_cli_export_errors(model_dir, tmp_path):
    ident = tmp_path / "ident"
    bare = tmp_path / "bare"
    assert run_cli("init", "--preset", "tiny", "--g-mode", "identity", "--out", ident).exit_code == 0
    assert run_cli("init", "--preset", "tiny", "--out", bare).exit_code == 0
    out = tmp_path / "g.safetensors"
    cases = [
        ([ident, "--out", out], "no metric path"),
        ([bare, "--out", out, "--prompt", "hello"], "tokenizer"),
        ([model_dir, "--out", out, "--reduce", "median"], "--reduce"),
        ([model_dir, "--out", out, "--prompts-file", tmp_path / "nope.txt"], "not found"),
        ([model_dir, "--out", out, "--tokens", "3,x"], "integer ids"),
        ([tmp_path / "nomodel", "--out", out], "not found"),
    ]
    for args, words in cases:
        r = run_cli("export-gcache", *args)
        assert r.exit_code == 2, (args, r.output)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    # raw ids need no tokenizer
    assert run_cli("export-gcache", bare, "--out", out, "--tokens", "3", "--tokens", "7,8,3").exit_code == 0
    assert out.is_file()
