"""Building a fresh model (``pldr init``, pretraining from scratch, tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from pldr_core.checkpoint import save_model
from pldr_core.config import GMode, PLDRConfig
from pldr_core.config import preset as make_preset
from pldr_core.errors import PLDRError
from pldr_core.gcache import read_gcache
from pldr_core.model import PLDRModel
from pldr_core.tokenizer import Tokenizer


def build_model(config: PLDRConfig, *, seed: int = 0, g_file: str | Path | None = None) -> PLDRModel:
    """A randomly initialised model; g_mode 'fixed' takes its frozen G_LM from ``g_file``."""
    if config.g_mode is GMode.FIXED and g_file is None:
        raise PLDRError("g_mode fixed needs a G-cache file (--g-file), e.g. from `pldr export-gcache`")
    if g_file is not None and config.g_mode is not GMode.FIXED:
        raise PLDRError("--g-file is only used with --g-mode fixed")
    torch.manual_seed(seed)
    if g_file is not None:
        config = config.replace(g_source=str(g_file))
    model = PLDRModel(config)
    if g_file is not None:

        gc = read_gcache(g_file)
        try:
            model.set_fixed_g(gc.G_LM[:, 0], gc.A_LM[:, 0])
        except PLDRError as exc:
            raise PLDRError(f"--g-file {g_file}: {exc}") from None
    return model


def init_model_dir(*, preset: str, out: str | Path, g_mode: str = "learned", g_file=None,
                   tokenizer=None, vocab_size: int | None = None, seed: int = 0):
    overrides = {"g_mode": g_mode}
    if tokenizer is not None:

        tok = Tokenizer(tokenizer)
        overrides["vocab_size"] = vocab_size or tok.vocab_size
        if vocab_size is not None and vocab_size < tok.vocab_size:
            raise PLDRError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    elif vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    config = make_preset(preset, **overrides)
    model = build_model(config, seed=seed, g_file=g_file)
    path = save_model(model, out, tokenizer=tokenizer, meta={"created_by": "pldr init", "seed": seed,
                                                             "steps": 0, "tokens_seen": 0})
    return path, model
