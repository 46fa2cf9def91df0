"""pldr bench: the library result's shape and the CLI contract (no timing is asserted)."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from pldr_cli.app import app
from pldr_core.bench import run_bench, train_flops_per_token
from pldr_core.config import preset
from pldr_core.errors import PLDRError

SMALL = dict(preset="tiny", device="cpu", batch=2, seq_len=16, steps=1, decode_batch=2, prompt_len=4,
             new_tokens=3)


def _positive(x):
    return isinstance(x, float) and x > 0


def test_run_bench_reports_every_figure():
    r = run_bench("all", **SMALL)
    assert r["device"] == "cpu" and r["torch"]
    t = r["train"]
    for g in ("learned", "identity"):
        assert _positive(t[g]["tokens_per_s"]) and t[g]["mfu"] is None  # no MFU without a known GPU
    assert t["learned"]["params"] > t["identity"]["params"]
    assert t["metric_precision"] == "fp32"  # the eager metric path: no fused kernels on CPU
    assert t["ratio_learned_identity"] == pytest.approx(
        t["learned"]["tokens_per_s"] / t["identity"]["tokens_per_s"])
    d = r["decode"]
    assert d["batches"] == [1, 2]
    for B in (1, 2):
        row = d[f"batch_{B}"]
        assert set(row["eager"]) == {"no_cache", "kv", "kv_g_prefill", "kv_g_file", "identity_kv"}
        assert set(row["engine"]) == {"kv", "kv_g_prefill", "kv_g_file", "identity_kv"}
        assert all(_positive(v["tokens_per_s"]) for v in row["eager"].values())
        # fp32 on CPU: KV alone and KV+G (prefill) decode the same greedy tokens.
        assert all(row["engine"][k]["same_tokens_as_first"] for k in ("kv", "kv_g_prefill"))
        assert all(v["kernel"] == "torch" for v in row["engine"].values())  # Triton's is CUDA-only
        for v in row["engine"].values():  # the median of interleaved turns
            assert len(v["runs_tokens_per_s"]) == d["engine_repeats"] == 2
            assert min(v["runs_tokens_per_s"]) <= v["tokens_per_s"] <= max(v["runs_tokens_per_s"])
        assert row["ratio_gfile_identity"] == pytest.approx(
            row["engine"]["kv_g_file"]["tokens_per_s"] / row["engine"]["identity_kv"]["tokens_per_s"])


def test_flops_formula_counts_the_metric_path():
    cfg = preset("paper-110m")
    learned = train_flops_per_token(cfg, 1024)
    identity = train_flops_per_token(cfg.replace(g_mode="identity"), 1024)
    # About 6 N per token (N without the embedding table), and the metric path a few percent on top.
    n = 105_606_482 - cfg.vocab_size * cfg.d_model
    assert 6 * n < identity < 6 * n * 1.1
    assert 1.01 < learned / identity < 1.10


def test_run_bench_refuses_bad_input():
    with pytest.raises(PLDRError, match="unknown benchmark"):
        run_bench("speed", device="cpu")
    with pytest.raises(PLDRError, match="metric-precision"):
        run_bench("train", device="cpu", metric_precision="fp16")
    with pytest.raises(PLDRError, match="exceeds"):
        run_bench("train", preset="tiny", device="cpu", seq_len=4096)
    with pytest.raises(PLDRError, match="positive"):
        run_bench("train", preset="tiny", device="cpu", batch=0)
    with pytest.raises(PLDRError, match="--repeats must be a positive"):
        run_bench("decode", preset="tiny", device="cpu", repeats=0)


def test_decode_repeats_sets_the_number_of_turns():
    d = run_bench("decode", **{**SMALL, "decode_batch": 1}, eager_decode=False, repeats=3)["decode"]
    assert d["engine_repeats"] == 3 and "eager" not in d["batch_1"]
    assert all(len(v["runs_tokens_per_s"]) == 3 for v in d["batch_1"]["engine"].values())


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "train", "--preset", "tiny", "--device", "cpu", "--batch", "2",
                                   "--seq-len", "16", "--steps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) >= {"train", "device", "torch"} and "decode" not in data
    assert "ratio learned/identity" in res.output


def test_cli_bench_bad_input_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["bench", "nonsense", "--device", "cpu"])
    assert res.exit_code == 2 and "error:" in res.output
    res = CliRunner().invoke(app, ["bench", "--preset", "huge", "--device", "cpu"])
    assert res.exit_code == 2 and "unknown preset" in res.output
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--json", str(tmp_path)])
    assert res.exit_code == 2


PEER_RUN = dict(SMALL, decode_batch=2, new_tokens=3, eager_decode=False, repeats=2)


def test_peer_row_times_a_same_shape_llama_in_the_same_turns():
    pytest.importorskip("transformers")
    d = run_bench("decode", **PEER_RUN)["decode"]
    for B in (1, 2):
        row = d[f"batch_{B}"]
        peer = row["peer"]
        assert peer["name"] == "hf-llama-static" and peer["transformers"]
        assert _positive(peer["tokens_per_s"]) and len(peer["runs_tokens_per_s"]) == 2
        assert min(peer["runs_tokens_per_s"]) <= peer["tokens_per_s"] <= max(peer["runs_tokens_per_s"])
        ours = {k: v["tokens_per_s"] for k, v in row["engine"].items()}
        assert row["ratio_identity_peer"] == pytest.approx(ours["identity_kv"] / peer["tokens_per_s"])
        assert row["ratio_gfile_peer"] == pytest.approx(ours["kv_g_file"] / peer["tokens_per_s"])


def test_peer_is_the_presets_shape():
    transformers = pytest.importorskip("transformers")
    import torch

    from pldr_core.bench_peer import HFPeer

    cfg = preset("tiny")
    hf = HFPeer(cfg, torch.device("cpu"), torch.float32, max_len=8, compile=False)
    c = hf.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (
        cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.dff, cfg.vocab_size)
    assert not c.tie_word_embeddings and isinstance(hf.model, transformers.LlamaForCausalLM)
    prompt = torch.randint(4, cfg.vocab_size, (2, 3))
    first = hf.generate(prompt, 5)
    assert first.shape == (2, 5)
    assert torch.equal(hf.generate(prompt, 5), first)  # the reused static cache is reset between runs


def test_peer_is_skipped_cleanly_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    d = run_bench("decode", **{**PEER_RUN, "decode_batch": 1})["decode"]
    row = d["batch_1"]
    assert row["peer"] == {"skipped": "transformers is not installed"}
    assert "ratio_identity_peer" not in row and "ratio_gfile_peer" not in row
    assert _positive(row["engine"]["identity_kv"]["tokens_per_s"])


def test_no_peer_leaves_the_row_out():
    d = run_bench("decode", **{**PEER_RUN, "decode_batch": 1}, peer=False)["decode"]
    assert "peer" not in d["batch_1"] and "ratio_identity_peer" not in d["batch_1"]


def test_cli_bench_shows_the_peer(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "decode", "--preset", "tiny", "--device", "cpu", "--decode-batch",
                                   "1", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                                   "--no-eager-decode", "--json", str(out)])
    assert res.exit_code == 0, res.output
    peer = json.loads(out.read_text())["decode"]["batch_1"]["peer"]
    if "skipped" in peer:
        assert "peer   skipped: transformers is not installed" in res.output
    else:
        assert "hf-llama-static" in res.output and "ratio ours/peer" in res.output
