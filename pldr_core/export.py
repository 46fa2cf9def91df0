"""Export a model to the author's Hugging Face "pldrllm" layout, the reference training ``.pth``, or our
own layout, each with a model card. The writers are the inverse of the readers in ``checkpoint``.

What each target holds:
- hf: every G mode. learned -> custom_G_type None; identity -> "identity"; fixed -> "external"; random ->
  "random" (with its seed, so pldr reads it back as random). A frozen G travels as
  ``decoder.past_G_values`` [L, 3, 1, H, dk, dk] (index 1 A_LM, index 2 G_LM). A learned model with a
  G-cache becomes "external" without its metric path. Not carried: the DAG coefficients, unk id and
  the G-cache's provenance (these go in the card).
- pth: learned G only (the reference model always has its metric path); the config travels as a plain
  dict next to ``model_state_dict``, which the reference code ignores.
- pldr: our layout, unchanged, plus the card.
The directory layouts get a README.md model card; a .pth is one file and has none.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pldr_core.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    detect_layout,
    load_config,
    load_model,
    read_meta,
    save_model,
    state_dict_for_save,
)
from pldr_core.config import GMode, PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_dir, atomic_path, atomic_write_text
from pldr_core.gcache import read_gcache
from pldr_core.model import PLDRModel, _is_metric_param
from pldr_core.model_card import DEFAULT_LICENSE, model_card, read_eval_results
from pldr_core.tokenizer import TOKENIZER_FILE

FORMATS = ("hf", "pth", "pldr")
CARD_FILE = "README.md"
GENERATION_CONFIG_FILE = "generation_config.json"
HF_G_TYPES = {GMode.LEARNED: None, GMode.IDENTITY: "identity", GMode.RANDOM: "random", GMode.FIXED: "external"}


@dataclass
class ExportResult:
    """What ``export_model`` wrote."""

    path: Path
    format: str
    files: list[str]
    g_mode: GMode
    custom_G_type: str | None = None

    def summary(self) -> dict:
        return {"path": str(self.path), "format": self.format, "files": self.files,
                "g_mode": self.g_mode.value, "custom_G_type": self.custom_G_type}


def export_model(source: str | Path, out: str | Path, *, format: str, force: bool = False,
                 license: str = DEFAULT_LICENSE, eval_results: str | Path | None = None,
                 gcache: str | Path | None = None, tokenizer: str | Path | None = None) -> ExportResult:
    """Write ``source`` (any layout ``load_model`` reads) to ``out`` in ``format``; checks every input
    before anything is written, and writes atomically."""
    if format not in FORMATS:
        raise PLDRError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, format, force)
    config = load_config(source)
    check_target(config, format, gcache=gcache is not None)
    scores = read_eval_results(eval_results) if eval_results is not None else None
    tok = _tokenizer_file(source, tokenizer)
    model = load_model(source, device="cpu", dtype=torch.float32)
    g = read_gcache(gcache, model) if gcache is not None else None
    meta = read_meta(source) if Path(source).is_dir() else {}
    if format == "pth":
        return _write_pth(model, out, meta)
    card = dict(meta=meta, license=license, scores=scores, params_total=model.num_params(),
                params_metric=model.num_params(metric_only=True))
    if format == "hf":
        # with a G-cache the port sees a predefined G: it reads back (and is described) as g_mode fixed
        card_cfg = config if g is None else config.replace(g_mode=GMode.FIXED, g_source=str(gcache))
        return _write_hf(model, out, tok, model_card(card_cfg, layout="hf", **card), g)
    extra = {CARD_FILE: model_card(config, layout="pldr", **card).encode()}
    save_model(model, out, tokenizer=tok, meta=meta, extra_files=extra)
    return ExportResult(out, "pldr", sorted(p.name for p in out.iterdir()), config.g_mode)


def check_target(config: PLDRConfig, format: str, *, gcache: bool = False) -> None:
    """PLDRError when ``format`` cannot hold a model of ``config`` (with a G-cache when ``gcache``)."""
    if gcache and format != "hf":
        raise PLDRError("--gcache applies to --format hf only (it becomes the port's predefined G)")
    if gcache and not config.has_metric_path:
        raise PLDRError(f"--gcache needs a learned-G model; this one has g_mode {config.g_mode} and "
                        f"already fixes G_LM")
    if format == "pth" and not config.has_metric_path:
        raise PLDRError(f"the reference .pth layout holds learned-G models only (the reference model always "
                        f"has its metric path); export g_mode {config.g_mode} with --format hf or pldr")


def _check_out(out: Path, format: str, force: bool) -> None:
    if format == "pth":
        if out.is_dir():
            raise PLDRError(f"--out {out} is a directory; --format pth writes one file such as model.pth")
        if out.suffix not in (".pth", ".pt"):
            raise PLDRError(f"--out {out} must end in .pth or .pt for --format pth")
        if out.exists() and not force:
            raise PLDRError(f"{out} exists; pass --force to replace it")
    elif out.exists():
        if not out.is_dir():
            raise PLDRError(f"--out {out} is a file; give a directory for --format {format}")
        if any(out.iterdir()) and not force:
            raise PLDRError(f"{out} is not empty; pass --force to replace it")


def _tokenizer_file(source, tokenizer) -> Path | None:
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise PLDRError(f"tokenizer file not found: {tokenizer}")
        return Path(tokenizer)
    found = Path(source) / TOKENIZER_FILE
    return found if Path(source).is_dir() and found.is_file() else None


# ---- the Hugging Face "pldrllm" layout --------------------------------------------------------
def hf_config_dict(config: PLDRConfig, custom_G_type: str | None) -> dict:
    """The port's ``PldrllmConfig`` fields for ``config`` (the inverse of ``checkpoint.hf_config``)."""
    data = {
        "architectures": ["PldrllmForCausalLM"], "model_type": "pldrllm", "_name_or_path": config.name,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.dff, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len, "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps, "use_cache": True, "output_pldr_attentions": False,
        "pad_token_id": config.pad_id, "bos_token_id": config.bos_id, "eos_token_id": config.eos_id,
        "tie_word_embeddings": False, "rope_theta": config.rope_base, "rope_scaling": None,
        "attention_bias": True, "glu_bias": True, "final_bias": True,
        "reference_rope": config.rope_style == "interleaved", "attention_dropout": 0.0,
        "num_reslayerA": config.num_reslayerA, "num_denseA": config.num_denseA, "A_dff": config.A_dff,
        "custom_G_type": custom_G_type, "cache_first_G": False, "torch_dtype": "float32",
    }
    if config.g_mode is GMode.RANDOM:
        # extra keys the port keeps as attributes; pldr reads them back as the seeded random G
        data.update(g_random_mean=config.g_random_mean, g_random_std=config.g_random_std,
                    g_random_seed=config.g_random_seed)
    return data


def hf_state_dict(model: PLDRModel, g_cache=None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The port's tensors for ``model`` and its custom_G_type (the inverse of ``checkpoint._hf_state_dict``)."""
    cfg = model.config
    sd = state_dict_for_save(model)
    if g_cache is not None:  # the metric path is replaced by the cached A_LM, G_LM
        sd = {k: v for k, v in sd.items() if not _is_metric_param(k)}
        A_LM, G_LM = g_cache.A_LM[:, 0], g_cache.G_LM[:, 0]
        g_type = "external"
    elif cfg.g_mode is GMode.LEARNED:
        return sd, None
    elif cfg.g_mode is GMode.IDENTITY:
        shape = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        A_LM, G_LM = torch.zeros(shape), torch.eye(cfg.head_dim).expand(shape)
        g_type = "identity"
    else:
        layers = range(cfg.num_layers)
        A_LM = torch.stack([sd.pop(f"decoder.dec_layers.{i}.mha1.A_LM") for i in layers])
        G_LM = torch.stack([sd.pop(f"decoder.dec_layers.{i}.mha1.G_LM") for i in layers])
        g_type = HF_G_TYPES[cfg.g_mode]
    # [L, 3, 1, H, dk, dk]: index 0 A (not kept), 1 A_LM, 2 G_LM, as the port's G-cache holds them
    past = torch.stack([torch.zeros_like(G_LM), A_LM.to(G_LM.dtype), G_LM], dim=1)[:, :, None]
    sd["decoder.past_G_values"] = past.to("cpu", torch.float32).contiguous()
    sd["decoder.past_G_values_status"] = torch.ones(cfg.num_layers, dtype=torch.bool)
    return sd, g_type


def _write_hf(model: PLDRModel, out: Path, tok: Path | None, card: str, g_cache) -> ExportResult:
    cfg = model.config
    sd, g_type = hf_state_dict(model, g_cache)
    generation = {"_from_model_config": True, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
                  "pad_token_id": cfg.pad_id}
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(hf_config_dict(cfg, g_type), indent=2) + "\n")
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_text(tmp / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2) + "\n")
        if tok is not None:
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        atomic_write_text(tmp / CARD_FILE, card)
    g_mode = cfg.g_mode if g_cache is None else GMode.FIXED
    return ExportResult(out, "hf", sorted(p.name for p in out.iterdir()), g_mode, g_type)


# ---- the reference .pth layout -----------------------------------------------------------------
def _write_pth(model: PLDRModel, out: Path, meta: dict) -> ExportResult:
    """The dict the reference ``save_model`` writes (model_state_dict, optimizer_state_dict, loss,
    accuracy; its ``load_model`` reads all four) plus our config."""
    loss = meta.get("final_loss")
    obj = {"model_state_dict": state_dict_for_save(model), "optimizer_state_dict": None,
           "loss": float(loss) if isinstance(loss, (int, float)) else None, "accuracy": None,
           "config": model.config.to_dict()}
    with atomic_path(out) as tmp:
        torch.save(obj, tmp)
    return ExportResult(out, "pth", [out.name], model.config.g_mode)


def exported_files(folder: str | Path) -> list[Path]:
    """The files ``pldr push`` would upload from ``folder`` (a model directory of ours or HF layout)."""
    folder = Path(folder)
    layout = detect_layout(folder)
    if layout == "pth":
        raise PLDRError(f"{folder} is a .pth file; push a directory (`pldr export MODEL --format hf --out DIR`)")
    if not (folder / WEIGHTS_FILE).is_file():
        raise PLDRError(f"{folder} has no {WEIGHTS_FILE}: not a model directory to push")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
