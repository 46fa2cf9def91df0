"""Shared fixtures: the golden reference model, tiny models, a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (the flag is read when kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The golden vectors ship with the tests; PLDR_GOLDEN points the golden tests at another copy.
GOLDEN = Path(os.environ.get("PLDR_GOLDEN", REPO / "tests" / "data" / "golden" / "reference-tiny"))


def load_script(name: str):
    """scripts/NAME.py as a module (imported once), so tests use the scripts' own code."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert (GOLDEN / "expected.safetensors").is_file(), (
        f"golden vectors not found at {GOLDEN}; unset PLDR_GOLDEN or point it at a reference-tiny folder")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_expected(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected.safetensors"))


def golden_config():
    from pldr_core.config import PLDRConfig

    return PLDRConfig(name="golden", vocab_size=300, num_layers=2, d_model=64, num_heads=4, dff=170,
                      A_dff=40, num_reslayerA=2, num_denseA=2, max_seq_len=64)


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    from safetensors.torch import load_file

    from pldr_core.model import PLDRModel

    model = PLDRModel(golden_config()).double().eval()
    model.load_state_dict(load_file(str(golden_dir / "model.safetensors")), strict=True)
    return model


def tiny_model(g_mode: str = "learned", seed: int = 0, dtype=torch.float64, **overrides):
    """A tiny model with non-trivial biases (so tests notice a dropped bias)."""
    from pldr_core.config import preset
    from pldr_core.model import PLDRModel

    torch.manual_seed(seed)
    cfg = preset("tiny", g_mode=g_mode, vocab_size=overrides.pop("vocab_size", 64), **overrides)
    model = PLDRModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("blst") or name.endswith("balst"):
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A small SentencePiece model trained with the paper's settings on generated text."""
    from pldr_core.tokenizer import train_tokenizer

    words = ("the metric tensor of power law graph attention learns a curvature from every prompt "
             "and the cache keeps it for decoding with keys and values in the model").split()
    rng = __import__("random").Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {i}." for i in range(3000)]
    out = tmp_path_factory.mktemp("spm") / "tok"
    return train_tokenizer(lines, out, vocab_size=400)


def cli(*args):
    """Run ``pldr ARGS...`` in-process; the typer Result."""
    from typer.testing import CliRunner

    from pldr_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, spm_model) -> Path:
    """A tiny model directory (learned G) with the spm_model tokenizer."""
    out = tmp_path_factory.mktemp("tiny-model") / "m"
    r = cli("init", "--preset", "tiny", "--out", out, "--tokenizer", spm_model, "--seed", 0)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tiny_gcache(tmp_path_factory, tiny_model_dir) -> Path:
    """A G-cache of tiny_model_dir (the EOS prompt)."""
    out = tmp_path_factory.mktemp("tiny-gcache") / "g.safetensors"
    r = cli("export-gcache", tiny_model_dir, "--out", out, "--tokens", "3")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def token_data(tmp_path_factory, spm_model) -> Path:
    """A token data folder (seq_len 32) encoded with spm_model."""
    root = tmp_path_factory.mktemp("token-data")
    rng = __import__("random").Random(1)
    words = "the metric tensor of power law graph attention learns a curvature from every prompt".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60))
                                                 for _ in range(80)))
    r = cli("tokenize", root / "corpus.txt", "--out", root / "data", "--tokenizer", spm_model, "--seq-len", 32,
            "--val-fraction", 0.1)
    assert r.exit_code == 0, r.output
    return root / "data"
