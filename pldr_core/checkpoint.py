"""Model directories: save, load, and import of the two public layouts.

Layouts ``load_model`` reads:
- ours: config.json + model.safetensors (+ tokenizer.model, meta.json);
- a Hugging Face "pldrllm" directory: config.json with model_type "pldrllm" + model.safetensors;
- a reference training checkpoint: a ``.pth``/``.pt`` dict with ``model_state_dict``, read with
  ``torch.load(weights_only=True)``; its config is inferred from the tensor shapes.
Weights are safetensors everywhere else; pickle is never loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pldr_core._version import __version__
from pldr_core.config import GMode, PLDRConfig
from pldr_core.errors import PLDRError
from pldr_core.files import atomic_dir, atomic_write_text
from pldr_core.model import PLDRModel
from pldr_core.tokenizer import TOKENIZER_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers (never save ``_orig_mod.`` names)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (``_orig_mod.``, ``module.``) anywhere in the names."""
    out = {}
    for name, t in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        out[name] = t
    return out


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = clean_state_dict(unwrap(model).state_dict())
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model(model: PLDRModel, out: str | Path, *, tokenizer: str | Path | None = None,
               meta: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a model directory atomically (a crash leaves the old directory or none, never half)."""

    out = Path(out)
    base = unwrap(model)
    info = {
        "toolkit": "pldr",
        "toolkit_version": __version__,
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "g_mode": base.config.g_mode.value,
        "params_total": base.num_params(),
    }
    info.update(meta or {})
    with atomic_dir(out) as tmp:
        base.config.to_json(tmp / CONFIG_FILE)
        save_file(state_dict_for_save(base), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        atomic_write_text(tmp / META_FILE, json.dumps(info, indent=2, default=str) + "\n")
    return out


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---- layout detection and loading ------------------------------------------------------------
def detect_layout(path: str | Path) -> str:
    """'pldr', 'hf' or 'pth' for a model path; PLDRError when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise PLDRError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "pth"
        raise PLDRError(f"{path} is a file but not a .pth/.pt checkpoint; pass a model directory")
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise PLDRError(f"{path} has no {CONFIG_FILE}: not a model directory (make one with `pldr init`)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PLDRError(f"cannot read {cfg}: {exc}") from None
    if not isinstance(data, dict):
        raise PLDRError(f"{cfg} must hold a JSON object")
    if data.get("model_type") == "pldrllm":
        return "hf"
    return "pldr"


def load_config(path: str | Path) -> PLDRConfig:
    """The config of any layout, without loading weights (``.pth``: inferred from the shapes)."""
    layout = detect_layout(path)
    path = Path(path)
    if layout == "pldr":
        return PLDRConfig.from_json(path / CONFIG_FILE)
    if layout == "hf":
        return hf_config(json.loads((path / CONFIG_FILE).read_text()))
    return _read_pth(path)[1]


def load_model(path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> PLDRModel:
    """Load a model from our model directory, a HF "pldrllm" directory or a reference ``.pth``."""
    layout = detect_layout(path)
    path = Path(path)
    if layout == "pth":
        sd, config = _read_pth(path)
    else:
        sd = _read_safetensors(path / WEIGHTS_FILE)
        if layout == "hf":
            config = hf_config(json.loads((path / CONFIG_FILE).read_text()))
            sd = _hf_state_dict(sd, config)
        else:
            config = PLDRConfig.from_json(path / CONFIG_FILE)
    model = PLDRModel(config)
    load_weights(model, sd, path)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:

    if not file.is_file():
        raise PLDRError(f"weights file not found: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PLDRError(f"{file} is not a readable safetensors file ({exc})") from None


def _read_pth(file: Path) -> tuple[dict[str, torch.Tensor], PLDRConfig]:
    """The state dict and config of a ``.pth``: its ``config`` dict where pldr wrote one, else inferred."""
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise PLDRError(f"cannot read {file} as a weights-only checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    config = obj.get("config") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PLDRError(f"{file} holds no model_state_dict of tensors")
    sd = clean_state_dict(obj)
    return sd, PLDRConfig.from_dict(config) if isinstance(config, dict) else config_from_state_dict(sd)


def load_weights(model: PLDRModel, sd: dict, source: Path) -> None:
    """Copy the state dict ``sd`` (read from ``source``) into ``model``; PLDRError naming the first
    missing, unexpected or mis-shaped tensor when they do not fit its config."""
    sd = {k: v for k, v in clean_state_dict(sd).items() if ".rotary_embedding." not in k}
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise PLDRError(f"weights in {source} do not fit its config: {'; '.join(parts)}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise PLDRError(f"weights in {source}: {k} has shape {list(sd[k].shape)}, "
                            f"the config expects {list(t.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


# ---- the Hugging Face "pldrllm" layout --------------------------------------------------------
def hf_config(data: dict) -> PLDRConfig:
    """Map a HF ``PldrllmConfig`` JSON onto our config."""
    heads = data.get("num_attention_heads", 14)
    head_dim = data.get("head_dim", 64)
    d = data.get("hidden_size") or heads * head_dim
    g_type = data.get("custom_G_type")
    # "random" is our seeded random G only where pldr wrote its seed; otherwise a frozen, fixed G
    g_mode = {None: GMode.LEARNED, "identity": GMode.IDENTITY,
              "random": GMode.RANDOM if "g_random_seed" in data else GMode.FIXED,
              "external": GMode.FIXED}.get(g_type)
    if g_mode is None:
        raise PLDRError(f"unknown custom_G_type {g_type!r} in the HF config")
    return PLDRConfig(
        name=data.get("_name_or_path") or "hf-pldrllm",
        vocab_size=data.get("vocab_size", 32000), num_layers=data.get("num_hidden_layers", 5),
        d_model=d, num_heads=heads, dff=data.get("intermediate_size"), A_dff=data.get("A_dff", 170),
        num_reslayerA=data.get("num_reslayerA", 8), num_denseA=data.get("num_denseA", 2),
        max_seq_len=data.get("max_position_embeddings", 1024),
        rope_style="interleaved" if data.get("reference_rope", True) else "half",
        rope_base=float(data.get("rope_theta", 10000.0)),
        layer_norm_eps=data.get("layer_norm_eps", 1e-6), g_mode=g_mode,
        g_random_mean=data.get("g_random_mean", 0.0), g_random_std=data.get("g_random_std", 1.0),
        g_random_seed=data.get("g_random_seed", 0),
        g_source=f"hf custom_G_type={g_type}" if g_type else None,
        pad_id=data.get("pad_token_id") or 0, bos_id=data.get("bos_token_id", 2),
        eos_id=data.get("eos_token_id", 3),
    )


def _hf_state_dict(sd: dict, config: PLDRConfig) -> dict:
    """HF tensor names equal the reference ones, plus ``decoder.past_G_values`` for predefined G."""
    sd = {k: v for k, v in sd.items() if k not in ("decoder.past_G_values_status",)}
    past = sd.pop("decoder.past_G_values", None)
    if config.has_frozen_g:
        if past is None:
            raise PLDRError("HF model with a predefined G has no decoder.past_G_values tensor")
        # [L, 3, 1, H, dk, dk]: index 1 is A_LM, index 2 is G_LM
        for i in range(config.num_layers):
            sd[f"decoder.dec_layers.{i}.mha1.A_LM"] = past[i, 1, 0]
            sd[f"decoder.dec_layers.{i}.mha1.G_LM"] = past[i, 2, 0]
    return sd


# ---- the reference .pth layout -----------------------------------------------------------------
def config_from_state_dict(sd: dict) -> PLDRConfig:
    """Infer the hyperparameters of a reference checkpoint from its tensor names and shapes."""
    try:
        V, d = sd["decoder.embedding.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.dec_layers\.(\d+)\.", k))}
        L = max(layers) + 1
        dff = sd["decoder.dec_layers.0.ffn.gluw1.weight"].shape[0]
        pfx = "decoder.dec_layers.0.mha1."
        if pfx + "plgatt_layer.Wlst" in sd:
            H, dk, _ = sd[pfx + "plgatt_layer.Wlst"].shape
            units = {int(m.group(1)) for k in sd if (m := re.match(re.escape(pfx) + r"reslayerAs\.(\d+)\.", k))}
            dense = {int(m.group(1)) for k in sd
                     if (m := re.match(re.escape(pfx) + r"reslayerAs\.0\.denseAs\.(\d+)\.", k))}
            A_dff = sd[pfx + "reslayerAs.0.denseAs.0.gluw1.weight"].shape[0] if units else 170
            g_mode = GMode.LEARNED
            num_units, num_dense = len(units), len(dense)
        else:
            raise PLDRError("checkpoint has no metric path (plgatt_layer); only learned-G reference "
                            "checkpoints can be imported")
    except KeyError as exc:
        raise PLDRError(f"not a PLDR-LLM state dict: tensor {exc} is missing") from None
    return PLDRConfig(name="reference-pth", vocab_size=V, num_layers=L, d_model=d, num_heads=H,
                      dff=dff, A_dff=A_dff, num_reslayerA=num_units, num_denseA=num_dense, g_mode=g_mode)


# ---- fingerprint -------------------------------------------------------------------------------
def fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of every weight's name, shape and float32 bytes: identifies a model's
    weights independently of the dtype or device it is loaded in."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict_for_save(model).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


# ---- weights header check (no tensor data read) --------------------------------------------------
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
                         "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 << 20


def read_safetensors_header(file: str | Path) -> dict[str, dict]:
    """Tensor entries (dtype, shape, data_offsets) of a safetensors file from its header alone.

    The file is an 8-byte little-endian header length, that many bytes of JSON, then the tensor data;
    PLDRError when the header is unreadable or the file is shorter than the data it describes.
    """
    file = Path(file)
    if not file.is_file():
        raise PLDRError(f"weights file not found: {file}")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise PLDRError(f"{file} is not a safetensors file ({size} bytes: too short for a header)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise PLDRError(f"{file} is not a safetensors file (its first 8 bytes announce a {n:,}-byte "
                            f"header in a {size:,}-byte file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PLDRError(f"{file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise PLDRError(f"{file} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            begin, end = int(begin), int(end)
            count = 1
            for dim in shape:
                count *= int(dim)
            nbytes = count * _SAFETENSORS_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise PLDRError(f"{file}: the header entry of tensor {name} is malformed") from None
        if end - begin != nbytes or begin < 0:
            raise PLDRError(f"{file}: tensor {name} ({dtype} {shape}) claims {end - begin} bytes, needs {nbytes}")
        if end > data_size:
            raise PLDRError(f"{file} is truncated: tensor {name} ends at byte {8 + n + end:,} of a "
                            f"{size:,}-byte file")
    return header


def expected_tensors(config: PLDRConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a model of ``config`` saves (built on the meta device)."""
    with torch.device("meta"):
        model = PLDRModel(config)
    return {k: tuple(t.shape) for k, t in model.state_dict().items() if ".rotary_embedding." not in k}


def weights_problems(path: str | Path, config: PLDRConfig | None = None) -> list[str]:
    """What is wrong with a model directory's weights file against its config, read from the header:
    unreadable or truncated file, missing or unexpected tensors, wrong shapes, non-float dtypes."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "pth":
        return []  # the config is inferred from the tensors themselves
    config = config or load_config(path)
    file = path / WEIGHTS_FILE
    try:
        header = read_safetensors_header(file)
    except PLDRError as exc:
        return [str(exc)]
    expected = expected_tensors(config)
    if layout == "hf":
        header = {k: v for k, v in header.items() if not k.startswith("decoder.past_G_values")}
        if config.g_mode is GMode.FIXED:  # A_LM and G_LM come packed in decoder.past_G_values
            expected = {k: v for k, v in expected.items() if not k.endswith((".A_LM", ".G_LM"))}
    found = {k: v for k, v in clean_state_dict(header).items() if ".rotary_embedding." not in k}
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"{file} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{file} holds {len(unexpected)} tensor(s) the config has no place for, "
                        f"e.g. {unexpected[0]}")
    for name, shape in expected.items():
        entry = found.get(name)
        if entry is None:
            continue
        if tuple(entry["shape"]) != shape:
            problems.append(f"{file}: {name} has shape {list(entry['shape'])}, the config expects {list(shape)}")
        elif entry["dtype"] not in _FLOAT_DTYPES:
            problems.append(f"{file}: {name} has dtype {entry['dtype']}, expected a float type")
    return problems
