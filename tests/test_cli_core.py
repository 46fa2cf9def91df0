"""`pldr init` / `pldr info` and the error contract: one line, exit 2, nothing written."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pldr_cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(map(str, args)))


def test_init_then_info_json(tmp_path, spm_model):
    r = run("init", "--preset", "tiny", "--out", tmp_path / "m", "--tokenizer", spm_model, "--seed", 1)
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors",
                                                           "tokenizer.model", "meta.json"}
    r = run("info", tmp_path / "m", "--json")
    data = json.loads(r.stdout)
    from pldr_core.tokenizer import Tokenizer

    assert data["config"]["vocab_size"] == Tokenizer(spm_model).vocab_size and data["tokenizer"] is True
    assert data["params_total"] > data["params_metric"] > 0


def test_info_preset_counts():
    data = json.loads(run("info", "--preset", "paper-110m", "--json").stdout)
    assert (data["params_total"], data["params_metric"]) == (109_689_362, 4_082_880)
    data = json.loads(run("info", "--preset", "paper-110m", "--g-mode", "identity", "--json").stdout)
    assert (data["params_total"], data["params_metric"]) == (105_606_482, 0)


def test_init_without_tokenizer_says_so(tmp_path):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    r = run("info", tmp_path / "m")
    assert "tokenizer" in r.stdout and "none" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["info", "{tmp}/missing"], "not found"),
    (["info", "--preset", "huge"], "unknown preset"),
    (["init", "--out", "{tmp}/x", "--g-mode", "banana"], "unknown g_mode"),
    (["init", "--out", "{tmp}/x", "--g-mode", "fixed"], "--g-file"),
    (["init", "--out", "{tmp}/x", "--tokenizer", "{tmp}/no.model"], "tokenizer model not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    r = run(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_bad_config_and_corrupt_weights_via_cli(tmp_path):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "g_mode": "weird"}))
    r = run("info", tmp_path / "m")
    assert r.exit_code == 2 and "unknown g_mode" in r.output


def test_console_script_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pldr_cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("init", "info"):
        assert cmd in out
    # --help must not import torch (lazy imports keep it well under a second)
    code = "import sys; from pldr_cli.app import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def _edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field", ["vocab_size", "num_layers", "d_model", "num_heads", "A_dff", "num_reslayerA",
                                   "num_denseA", "max_seq_len"])
def test_a_config_without_a_shape_field_names_it(tmp_path, field):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    _edit_config(tmp_path / "m", **{field: None})
    r = run("info", tmp_path / "m")
    assert r.exit_code == 2 and field in r.output and "config.json" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_config_defaults_fill_later_fields_but_not_dff_derivation():
    from pldr_core.config import PLDRConfig, preset

    shape = {k: v for k, v in preset("tiny").to_dict().items()
             if k in ("vocab_size", "num_layers", "d_model", "num_heads", "A_dff", "num_reslayerA", "num_denseA",
                      "max_seq_len")}
    cfg = PLDRConfig.from_dict(shape)
    assert cfg.num_heads == 2 and cfg.dff == 85 and cfg.rope_style == "interleaved"
    assert PLDRConfig(d_model=64, num_heads=4).num_heads == 4  # keyword construction keeps its defaults


def test_unknown_config_field_warns_with_the_close_match(tmp_path, caplog):
    from pldr_core.config import PLDRConfig, preset

    data = {**preset("tiny").to_dict(), "num_head": 2}
    with caplog.at_level("WARNING", logger="pldr_core"):
        PLDRConfig.from_dict(data)
        PLDRConfig.from_dict(preset("tiny").to_dict())  # head_dim (derived, written by to_dict) is known
    assert [r.getMessage() for r in caplog.records] == [
        "config field 'num_head' is unknown and ignored (did you mean 'num_heads'?)"]
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    _edit_config(tmp_path / "m", num_head=2)
    r = run("info", tmp_path / "m")
    assert r.exit_code == 0 and "warning: config field 'num_head' is unknown" in r.stderr


def test_typo_of_a_shape_field_is_named_in_the_error(tmp_path):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    _edit_config(tmp_path / "m", num_heads=None, num_head=2)
    r = run("info", tmp_path / "m")
    assert r.exit_code == 2 and "num_heads" in r.stderr and "'num_head'" in r.stderr


@pytest.mark.parametrize("change,needle", [
    ({"rope_base": -1}, "rope_base"), ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"dag": "abc"}, "dag"), ({"eos_id": 9999}, "eos_id"), ({"dff": 0}, "dff"),
    ({"num_heads": "2"}, "num_heads"), ({"version": 99}, "version"), ({"g_random_std": 0}, "g_random_std"),
])
def test_config_values_are_checked(tmp_path, change, needle):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    _edit_config(tmp_path / "m", **change)
    r = run("info", tmp_path / "m")
    assert r.exit_code == 2 and needle in r.stderr and len(r.output.strip().splitlines()) == 1


def _corrupt(model_dir, how, tmp_path):
    f = model_dir / "model.safetensors"
    if how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[:-100])
        return "truncated"
    if how == "png":
        f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        return "not a safetensors file"
    if how == "other_shape":
        assert run("init", "--out", tmp_path / "o", "--vocab-size", 80).exit_code == 0
        f.write_bytes((tmp_path / "o" / "model.safetensors").read_bytes())
        return "the config expects"
    if how == "other_mode":
        assert run("init", "--out", tmp_path / "o", "--g-mode", "identity").exit_code == 0
        f.write_bytes((tmp_path / "o" / "model.safetensors").read_bytes())
        return "lacks 70 tensor(s)"
    if how == "int_dtype":
        from safetensors.torch import load_file, save_file

        sd = load_file(str(f))
        sd["final_layer.weight"] = sd["final_layer.weight"].to(__import__("torch").int32)
        save_file(sd, str(f))
        return "dtype I32"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "png", "other_shape", "other_mode", "int_dtype"])
def test_info_reads_the_weights_header(tmp_path, how):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    needle = _corrupt(tmp_path / "m", how, tmp_path)
    r = run("info", tmp_path / "m")
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "model.safetensors" in r.stderr and not r.stdout


def _findings(r):
    return [(f["check"], f["status"]) for f in json.loads(r.stdout)["findings"]]


def test_doctor_reports_each_check_and_a_gcache_against_the_model(tmp_path, spm_model):
    m = tmp_path / "m"
    assert run("init", "--out", m, "--tokenizer", spm_model).exit_code == 0
    assert run("export-gcache", m, "--out", tmp_path / "g.safetensors", "--tokens", "3").exit_code == 0
    r = run("doctor", m, "--gcache", tmp_path / "g.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert _findings(r) == [("config", "ok"), ("weights", "ok"), ("tokenizer", "ok"), ("meta.json", "ok"),
                            ("g-cache", "ok")]
    assert run("init", "--out", tmp_path / "other", "--tokenizer", spm_model, "--seed", 3).exit_code == 0
    r = run("doctor", tmp_path / "other", "--gcache", tmp_path / "g.safetensors", "--json")
    assert r.exit_code == 0 and ("g-cache", "warning") in _findings(r)  # same shape, another model
    assert run("init", "--out", tmp_path / "wide", "--preset", "small").exit_code == 0
    r = run("doctor", tmp_path / "wide", "--gcache", tmp_path / "g.safetensors", "--json")
    assert r.exit_code == 2 and ("g-cache", "error") in _findings(r)
    r = run("doctor", m, "--gcache", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and "not found" in r.stdout


def test_doctor_finds_tokenizer_config_meta_and_weights_problems(tmp_path, spm_model):
    m = tmp_path / "m"
    assert run("init", "--out", m, "--vocab-size", 100).exit_code == 0
    (m / "tokenizer.model").write_bytes(spm_model.read_bytes())  # more pieces than embedding rows
    _edit_config(m, num_head=2)
    (m / "meta.json").write_text("{not json")
    sd_path = m / "model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(sd_path))
    sd["final_layer.bias"][0] = float("nan")
    save_file(sd, str(sd_path))
    r = run("doctor", m, "--json")
    assert r.exit_code == 2
    found = json.loads(r.stdout)["findings"]
    assert ("config", "warning") in _findings(r) and ("meta.json", "error") in _findings(r)
    assert any(f["check"] == "tokenizer" and f["status"] == "error" and "pieces" in f["detail"] for f in found)
    assert any(f["check"] == "weights" and "nan" in f["detail"] and "final_layer.bias" in f["detail"]
               for f in found)
    r = run("doctor", m)  # the table names the failing checks
    assert r.exit_code == 2 and "error" in r.stdout and "meta.json" in r.stdout


def test_doctor_on_a_truncated_model(tmp_path):
    assert run("init", "--out", tmp_path / "m").exit_code == 0
    _corrupt(tmp_path / "m", "truncated", tmp_path)
    r = run("doctor", tmp_path / "m", "--json")
    assert r.exit_code == 2 and ("weights", "error") in _findings(r)
