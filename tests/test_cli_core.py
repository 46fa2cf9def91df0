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
