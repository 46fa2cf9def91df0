"""pldr export (HF pldrllm layout, reference .pth, ours) and pldr push: round trips, the card, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_model
from pldr_cli.app import app
from pldr_core.checkpoint import hf_config, load_model, save_model, state_dict_for_save
from pldr_core.errors import PLDRError
from pldr_core.export import export_model
from pldr_core.gcache import write_gcache

runner = CliRunner()
TOKENS = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(0))
G_MODES = ["learned", "identity", "random", "fixed"]
# the fields the port's PldrllmConfig reads (besides model_type and architectures)
PORT_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "head_dim", "hidden_act", "max_position_embeddings", "layer_norm_eps", "use_cache",
               "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta",
               "attention_bias", "glu_bias", "final_bias", "reference_rope", "num_reslayerA", "num_denseA",
               "A_dff", "custom_G_type", "cache_first_G", "torch_dtype"}


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def _model(g_mode, rope="interleaved", seed=0):
    model = tiny_model(g_mode, seed=seed, dtype=torch.float32, rope_style=rope)
    if g_mode == "fixed":
        cfg = model.config
        shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        gen = torch.Generator().manual_seed(seed + 1)
        model.set_fixed_g(torch.randn(shape, generator=gen), torch.rand(shape, generator=gen))
    return model


def _saved(tmp_path, g_mode, rope="interleaved", meta=None):
    model = _model(g_mode, rope)
    save_model(model, tmp_path / "src", meta=meta or {"steps": 12, "tokens_seen": 3072, "final_loss": 4.25,
                                                      "data": {"source": "corpus.txt", "tokens": 9000}})
    return model, tmp_path / "src"


def _assert_same_model(loaded, model):
    want, got = state_dict_for_save(model), state_dict_for_save(loaded)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("rope", ["interleaved", "half"])
@pytest.mark.parametrize("g_mode", G_MODES)
def test_hf_round_trip_is_bitwise_for_every_g_mode_and_rope(tmp_path, g_mode, rope):
    model, src = _saved(tmp_path, g_mode, rope)
    result = export_model(src, tmp_path / "hf", format="hf")
    assert set(result.files) == {"config.json", "model.safetensors", "generation_config.json", "README.md"}
    loaded = load_model(tmp_path / "hf")
    _assert_same_model(loaded, model)
    assert loaded.config.g_mode == g_mode and loaded.config.rope_style == rope
    carried = {k: v for k, v in model.config.to_dict().items() if k not in ("g_source", "dag", "unk_id")}
    assert {k: loaded.config.to_dict()[k] for k in carried} == carried
    # and back to ours: the same weights again
    export_model(tmp_path / "hf", tmp_path / "back", format="pldr")
    _assert_same_model(load_model(tmp_path / "back"), model)


@pytest.mark.parametrize("rope", ["interleaved", "half"])
def test_pth_round_trip_is_bitwise_and_reference_readable(tmp_path, rope):
    model, src = _saved(tmp_path, "learned", rope)
    export_model(src, tmp_path / "m.pth", format="pth")
    obj = torch.load(tmp_path / "m.pth", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "loss", "accuracy"} <= set(obj)
    assert obj["loss"] == 4.25
    assert set(obj["model_state_dict"]) == set(model.state_dict())
    loaded = load_model(tmp_path / "m.pth")
    _assert_same_model(loaded, model)
    assert loaded.config == model.config


@pytest.mark.parametrize("g_mode", ["identity", "random", "fixed"])
def test_pth_refuses_a_model_without_a_metric_path(tmp_path, g_mode):
    _, src = _saved(tmp_path, g_mode)
    r = run("export", src, "--format", "pth", "--out", tmp_path / "m.pth")
    assert r.exit_code == 2 and "learned-G models only" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pth").exists()


def test_hf_files_follow_the_port(tmp_path, spm_model):
    model, _ = _saved(tmp_path, "fixed", "half")
    save_model(model, tmp_path / "src", tokenizer=spm_model)
    r = run("export", tmp_path / "src", "--format", "hf", "--out", tmp_path / "hf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["custom_G_type"] == "external"
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert PORT_FIELDS <= set(data)
    assert data["model_type"] == "pldrllm" and data["architectures"] == ["PldrllmForCausalLM"]
    assert data["reference_rope"] is False and data["torch_dtype"] == "float32"
    assert hf_config(data).g_mode == "fixed"
    cfg = model.config
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    past = sd["decoder.past_G_values"]
    assert past.shape == (cfg.num_layers, 3, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    assert torch.equal(past[1, 2, 0], model.decoder.dec_layers[1].mha1.G_LM)
    assert torch.equal(past[0, 1, 0], model.decoder.dec_layers[0].mha1.A_LM)
    assert sd["decoder.past_G_values_status"].dtype == torch.bool and bool(sd["decoder.past_G_values_status"].all())
    assert not any(k.endswith("mha1.G_LM") or k.endswith("mha1.A_LM") for k in sd)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg.bos_id, cfg.eos_id)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm_model.read_bytes()


def test_hf_tensor_names_of_learned_and_identity_models(tmp_path):
    model, src = _saved(tmp_path, "learned")
    export_model(src, tmp_path / "hf", format="hf")
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(model.state_dict())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["custom_G_type"] is None
    model, src = _saved(tmp_path, "identity")
    export_model(src, tmp_path / "hf-id", format="hf")
    sd = load_file(str(tmp_path / "hf-id" / "model.safetensors"))
    assert json.loads((tmp_path / "hf-id" / "config.json").read_text())["custom_G_type"] == "identity"
    assert torch.equal(sd["decoder.past_G_values"][:, 2, 0],
                       torch.eye(model.config.head_dim).expand_as(sd["decoder.past_G_values"][:, 2, 0]))


def test_hf_export_with_a_gcache_is_a_predefined_g(tmp_path):
    from pldr_core.checkpoint import fingerprint
    from pldr_core.gcache import read_gcache

    model, src = _saved(tmp_path, "learned")
    cfg = model.config
    shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    write_gcache(tmp_path / "g.safetensors", torch.rand(shape), torch.randn(shape), fingerprint=fingerprint(model))
    r = run("export", src, "--format", "hf", "--out", tmp_path / "hf", "--gcache", tmp_path / "g.safetensors")
    assert r.exit_code == 0, r.output
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.g_mode == "fixed" and not any(".plgatt_layer." in k for k in loaded.state_dict())
    want = model(TOKENS, g_cache=read_gcache(tmp_path / "g.safetensors", model)).logits
    assert torch.equal(loaded(TOKENS).logits, want)
    assert "g.safetensors" in (tmp_path / "hf" / "README.md").read_text()


def test_card_from_meta_and_eval_results(tmp_path):
    _, src = _saved(tmp_path, "learned")
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.4321, "acc_stderr,none": 0.01,
                                        "acc_norm,none": 0.3988, "acc_norm_stderr,none": 0.012}}}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    r = run("export", src, "--format", "pldr", "--out", tmp_path / "out", "--eval-results", tmp_path / "eval.json",
            "--license", "mit")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    for text in ("arc_easy", "0.4321", "acc_norm", "4.2500", "3,072", "corpus.txt", "learned", "load_model",
                 f"{load_model(src).num_params():,}"):
        assert text in card, text
    assert load_model(tmp_path / "out").config == load_model(src).config


def test_card_reads_compare_gcache_results(tmp_path):
    from pldr_core.model_card import read_eval_results

    run_ = {"results": {"hellaswag": {"acc,none": 0.25}}}
    (tmp_path / "e.json").write_text(json.dumps({"no_gcache": run_, "gcache": run_}))
    assert set(read_eval_results(tmp_path / "e.json")) == {"no_gcache", "gcache"}
    (tmp_path / "bad.json").write_text(json.dumps({"acc": 1}))
    with pytest.raises(PLDRError, match="no lm-eval"):
        read_eval_results(tmp_path / "bad.json")


@pytest.mark.parametrize("args,match", [
    (["--format", "onnx"], "unknown export format"),
    (["--format", "hf", "--eval-results", "missing.json"], "eval results file not found"),
    (["--format", "pth", "--gcache", "g.safetensors"], "--format hf only"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, match):
    _, src = _saved(tmp_path, "learned")
    r = run("export", src, "--out", tmp_path / "out.pth", *args)
    assert r.exit_code == 2 and match in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.pth").exists()


def test_existing_output_needs_force(tmp_path):
    model, src = _saved(tmp_path, "learned")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("export", src, "--format", "hf", "--out", out)
    assert r.exit_code == 2 and "--force" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run("export", src, "--format", "hf", "--out", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists()
    _assert_same_model(load_model(out), model)


def test_push_dry_run_lists_the_folder_without_network(tmp_path):
    _, src = _saved(tmp_path, "learned")
    export_model(src, tmp_path / "hf", format="hf")
    r = run("push", tmp_path / "hf", "--repo", "me/pldr-tiny", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == ["README.md", "config.json", "generation_config.json",
                                             "model.safetensors"]


@pytest.mark.parametrize("repo,folder,match", [
    ("bad repo name!", "hf", "not a valid Hub repository name"),
    ("me/x", "missing", "not found"),
])
def test_push_checks_its_arguments(tmp_path, repo, folder, match):
    _, src = _saved(tmp_path, "learned")
    export_model(src, tmp_path / "hf", format="hf")
    r = run("push", tmp_path / folder, "--repo", repo, "--dry-run")
    assert r.exit_code == 2 and match in r.output


def test_push_needs_a_token_and_uploads_the_folder(tmp_path, monkeypatch):
    import pldr_core.hub as hub

    _, src = _saved(tmp_path, "learned")
    export_model(src, tmp_path / "hf", format="hf")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    r = run("push", tmp_path / "hf", "--repo", "me/x")
    assert r.exit_code == 2 and "token" in r.output
    calls = []

    class StandInApi:  # records what would go to the Hub
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw["private"]))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw["folder_path"], sorted(kw["allow_patterns"])))
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(hub, "HfApi", StandInApi)
    r = run("push", tmp_path / "hf", "--repo", "me/x", "--token", "hf_test", "--private")
    assert r.exit_code == 0, r.output
    assert calls == [("token", "hf_test"), ("create", "me/x", True),
                     ("upload", "me/x", str(tmp_path / "hf"),
                      ["README.md", "config.json", "generation_config.json", "model.safetensors"])]
