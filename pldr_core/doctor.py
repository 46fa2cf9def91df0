"""``pldr doctor``: every check a model directory (and optionally a G-cache) can fail, as findings."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pldr_core.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    detect_layout,
    load_config,
    load_model,
    weights_problems,
)
from pldr_core.config import PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.gcache import check_gcache_fits, read_gcache
from pldr_core.tokenizer import TOKENIZER_FILE, Tokenizer

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass
class Finding:
    check: str
    status: str  # ok | warning | error
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _library_warnings():
    """Collect the library's warnings (unknown config fields) as findings instead of printing them."""
    logger = logging.getLogger("pldr_core")
    handler, propagate = _Collect(), logger.propagate
    saved = logger.handlers[:]
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.messages
    finally:
        logger.handlers, logger.propagate = saved, propagate


def check_model(path: str | Path, gcache: str | Path | None = None) -> list[Finding]:
    """Findings about a model directory (or .pth): config, weights, tokenizer, meta.json, G-cache.

    PLDRError only when ``path`` is no model at all; everything else is a finding.
    """
    path = Path(path)
    layout = detect_layout(path)
    with _library_warnings() as warned:
        findings = _check_all(path, layout, gcache)
    notes = [Finding("config", WARNING, message) for message in dict.fromkeys(warned)]
    return notes + findings


def _check_all(path: Path, layout: str, gcache) -> list[Finding]:
    try:
        config = load_config(path)
    except PLDRError as exc:
        return [Finding("config", ERROR, str(exc))]
    findings = [Finding("config", OK, _shape(config))]
    model = _check_weights(path, layout, config, findings)
    if path.is_dir():
        _check_tokenizer(path, config, findings)
        _check_meta(path, findings)
    if gcache is not None:
        _check_gcache(Path(gcache), config, model, findings)
    return findings


def _shape(config: PLDRConfig) -> str:
    return (f"{config.name}: L {config.num_layers}, d {config.d_model}, H {config.num_heads}, "
            f"V {config.vocab_size}, context {config.max_seq_len}, g_mode {config.g_mode}")


def _check_weights(path: Path, layout: str, config: PLDRConfig, findings: list[Finding]):
    problems = weights_problems(path, config)
    findings += [Finding("weights", ERROR, p) for p in problems]
    if problems:
        return None
    try:
        model = load_model(path)
    except PLDRError as exc:
        findings.append(Finding("weights", ERROR, str(exc)))
        return None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        findings.append(Finding("weights", ERROR, f"{len(bad)} tensor(s) hold nan or inf, e.g. {bad[0]}"))
        return model
    where = path.name if layout == "pth" else f"{WEIGHTS_FILE} ({layout} layout)"
    findings.append(Finding("weights", OK, f"{where}: {len(model.state_dict())} tensors fit the config, "
                                           "all finite"))
    return model


def _check_tokenizer(path: Path, config: PLDRConfig, findings: list[Finding]) -> None:
    file = path / TOKENIZER_FILE
    if not file.is_file():
        findings.append(Finding("tokenizer", WARNING, f"no {TOKENIZER_FILE}: generate and eval need "
                                                      "--tokenizer (or `pldr init --tokenizer`)"))
        return
    try:
        tok = Tokenizer(file)
    except PLDRError as exc:
        findings.append(Finding("tokenizer", ERROR, str(exc)))
        return
    if tok.vocab_size > config.vocab_size:
        findings.append(Finding("tokenizer", ERROR, f"{file} has {tok.vocab_size} pieces, the model's "
                                                    f"vocab_size is {config.vocab_size}: ids past it have no "
                                                    "embedding"))
    elif tok.vocab_size < config.vocab_size:
        findings.append(Finding("tokenizer", WARNING, f"{file} has {tok.vocab_size} pieces, fewer than the "
                                                      f"model's vocab_size {config.vocab_size} (rows unused)"))
    for name, severity in (("eos_id", ERROR), ("pad_id", ERROR), ("bos_id", WARNING), ("unk_id", WARNING)):
        if getattr(tok, name) != getattr(config, name):
            findings.append(Finding("tokenizer", severity, f"{file}: {name} is {getattr(tok, name)}, the "
                                                           f"config says {getattr(config, name)}"))
    if not any(f.check == "tokenizer" for f in findings):
        findings.append(Finding("tokenizer", OK, f"{tok.vocab_size} pieces, special ids match the config"))


def _check_meta(path: Path, findings: list[Finding]) -> None:
    file = path / META_FILE
    if not file.is_file():
        findings.append(Finding("meta.json", WARNING, f"no {META_FILE} (provenance unknown)"))
        return
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        findings.append(Finding("meta.json", ERROR, f"cannot read {file}: {exc}"))
        return
    if not isinstance(meta, dict):
        findings.append(Finding("meta.json", ERROR, f"{file} must hold a JSON object"))
        return
    findings.append(Finding("meta.json", OK, ", ".join(f"{k} {meta[k]}" for k in ("toolkit_version", "steps")
                                                       if k in meta) or "readable"))


def _check_gcache(file: Path, config: PLDRConfig, model, findings: list[Finding]) -> None:
    try:
        cache = read_gcache(file)
    except PLDRError as exc:
        findings.append(Finding("g-cache", ERROR, str(exc)))
        return
    if model is None:
        findings.append(Finding("g-cache", WARNING, f"{file} not compared: the weights did not load"))
        return
    try:
        check_gcache_fits(cache.meta, model, file, force=True)
    except PLDRError as exc:
        findings.append(Finding("g-cache", ERROR, str(exc)))
        return
    try:
        check_gcache_fits(cache.meta, model, file)
    except PLDRError as exc:
        findings.append(Finding("g-cache", WARNING, str(exc)))
        return
    if not config.has_metric_path and not config.has_frozen_g:
        findings.append(Finding("g-cache", WARNING, f"{file} fits, but g_mode {config.g_mode} has no G_LM "
                                                    "to replace"))
        return
    with torch.no_grad():
        finite = all(t.isfinite().all() for t in (cache.A_LM, cache.G_LM) if isinstance(t, torch.Tensor))
    findings.append(Finding("g-cache", OK if finite else ERROR,
                            f"{file} fits the model and was made from it" if finite
                            else f"{file} holds nan or inf"))
