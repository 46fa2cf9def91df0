"""Model configuration: every hyperparameter of the decoder, the G modes, presets, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from pldr_core.errors import PLDRError
from pldr_core.files import atomic_write_text


class _StrEnum(str, enum.Enum):
    """A string enum that compares, hashes, prints and serialises as its value (JSON, safetensors
    metadata, f-strings), so configs written before the enum existed read back unchanged."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, what: str):
        """``value`` as a member; a PLDRError naming ``what`` and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise PLDRError(f"unknown {what} {value!r}; choose one of "
                            f"{', '.join(m.value for m in cls)}") from None


class GMode(_StrEnum):
    """How a model obtains G_LM (the paper's ablations)."""

    LEARNED = "learned"
    """The metric path: A = q^T q through the residual units, then A_LM, A_P and G_LM; trained."""
    IDENTITY = "identity"
    """G_LM = I and no metric path: an ordinary scaled-dot-product-attention LLM."""
    RANDOM = "random"
    """A seeded random G_LM per layer, frozen (its distribution is recorded in the config)."""
    FIXED = "fixed"
    """G_LM (and A_LM) per layer read from a G-cache file, frozen ("transferred" G)."""

    @property
    def has_metric_path(self) -> bool:
        return self is GMode.LEARNED

    @property
    def is_frozen(self) -> bool:
        """G_LM is a fixed tensor held with the weights (random or fixed)."""
        return self in (GMode.RANDOM, GMode.FIXED)


class MetricPrecision(_StrEnum):
    """Operand precision of the metric path's GLU matmuls on the fused (Triton) training path."""

    BF16 = "bf16"
    """bf16 operands, fp32 accumulation, fp32 LayerNorms and residual adds (the fastest)."""
    TF32 = "tf32"
    """TF32 operands."""
    FP32 = "fp32"
    """Full fp32 (IEEE) matmuls."""


logger = logging.getLogger(__name__)

G_MODES = tuple(m.value for m in GMode)
ROPE_STYLES = ("interleaved", "half")
CONFIG_VERSION = 1
# A config file must state these: a default would build a model the weights do not fit.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "A_dff", "num_reslayerA", "num_denseA",
                "max_seq_len")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class PLDRConfig:
    """Hyperparameters of a PLDR-LLM (the paper's "v510" decoder)."""

    name: str = "custom"
    """Free-form label, usually the preset the config came from."""
    vocab_size: int = 32000
    """Rows of the embedding and of the output head."""
    num_layers: int = 5
    """Decoder layers (L)."""
    d_model: int = 896
    """Width of the residual stream (d)."""
    num_heads: int = 14
    """Attention heads (H); head_dim = d_model / num_heads."""
    dff: int | None = None
    """Hidden width of the decoder GLU; None means floor(8 d / 3)."""
    A_dff: int = 170
    """Hidden width of the GLUs inside the metric path's residual units."""
    num_reslayerA: int = 8
    """Residual units in the metric path."""
    num_denseA: int = 2
    """GLUs per residual unit."""
    max_seq_len: int = 1024
    """Context length the model is trained for."""
    rope_style: str = "interleaved"
    """'interleaved' (pairs (0,1),(2,3)...; the paper's v51 models) or 'half' (rotate-half, v52)."""
    rope_base: float = 10000.0
    """Rotary embedding base."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    g_mode: GMode = GMode.LEARNED
    """How G_LM is obtained: 'learned' (metric path), 'identity' (plain SDPA), 'random' (seeded, frozen)
    or 'fixed' (read from a G-cache file, frozen)."""
    g_random_mean: float = 0.0
    """Mean of the normal distribution that g_mode 'random' draws G_LM from."""
    g_random_std: float = 1.0
    """Standard deviation of that distribution."""
    g_random_seed: int = 0
    """Seed of that draw, so the same config always gives the same random G_LM."""
    g_source: str | None = None
    """For g_mode 'fixed': the G-cache file the tensors came from (provenance only)."""
    dag: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """DAG loss coefficients (l1, l2, l3) for A_LM, A_P and G_LM."""
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    version: int = CONFIG_VERSION
    """Config format version."""
    head_dim: int = field(init=False)
    """Derived: d_model // num_heads (dk)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "A_dff", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PLDRError(f"config field {name} must be a positive integer, got {value!r}")
        for name in ("num_reslayerA", "num_denseA"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise PLDRError(f"config field {name} must be a non-negative integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise PLDRError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        self.head_dim = self.d_model // self.num_heads
        if self.head_dim % 2:
            raise PLDRError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.dff is None:
            self.dff = math.floor(8 * self.d_model / 3)
        elif not _is_int(self.dff) or self.dff < 1:
            raise PLDRError(f"config field dff must be a positive integer or null, got {self.dff!r}")
        self.g_mode = GMode.parse(self.g_mode, "g_mode")
        if self.rope_style not in ROPE_STYLES:
            raise PLDRError(
                f"unknown rope_style {self.rope_style!r}; choose one of {', '.join(ROPE_STYLES)}"
            )
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Type and range of the scalar fields a hand-edited config.json can get wrong."""
        for name in ("rope_base", "layer_norm_eps", "g_random_std"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise PLDRError(f"config field {name} must be a positive finite number, got {value!r}")
            setattr(self, name, float(value))
        if not _is_real(self.g_random_mean):
            raise PLDRError(f"config field g_random_mean must be a finite number, got {self.g_random_mean!r}")
        self.g_random_mean = float(self.g_random_mean)
        if not isinstance(self.dag, (list, tuple)) or len(self.dag) != 3 \
                or not all(_is_real(x) and x >= 0 for x in self.dag):
            raise PLDRError(f"dag must hold three non-negative coefficients (l1, l2, l3), got {self.dag!r}")
        self.dag = tuple(float(x) for x in self.dag)
        if not _is_int(self.g_random_seed):
            raise PLDRError(f"config field g_random_seed must be an integer, got {self.g_random_seed!r}")
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise PLDRError(f"config field {name} must be a token id in [0, vocab_size "
                                f"{self.vocab_size}), got {value!r}")
        if not _is_int(self.version) or not 1 <= self.version <= CONFIG_VERSION:
            raise PLDRError(f"config version {self.version!r} is not one this pldr reads (1 to {CONFIG_VERSION})")
        if not isinstance(self.name, str):
            raise PLDRError(f"config field name must be a string, got {self.name!r}")
        if self.g_source is not None and not isinstance(self.g_source, str):
            raise PLDRError(f"config field g_source must be a string or null, got {self.g_source!r}")

    @property
    def has_metric_path(self) -> bool:
        """True when G_LM is computed by the deep residual network (g_mode 'learned')."""
        return self.g_mode.has_metric_path

    @property
    def has_frozen_g(self) -> bool:
        """True when G_LM is a frozen tensor held with the weights (g_mode 'random' or 'fixed')."""
        return self.g_mode.is_frozen

    def replace(self, **changes) -> "PLDRConfig":
        data = self.to_dict()
        data.update(changes)
        return PLDRConfig.from_dict(data)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["dag"] = list(self.dag)
        data["g_mode"] = self.g_mode.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PLDRConfig":
        """Build from a dict (a config.json). The shape fields must be present; fields added later
        take their defaults; derived keys are ignored and unknown ones logged as warnings."""
        if not isinstance(data, dict):
            raise PLDRError(f"a config must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f.init for f in dataclasses.fields(cls)}
        unknown = [str(key) for key in data if key not in fields]
        missing = [name for name in SHAPE_FIELDS if name not in data]
        if missing:
            typos = [f"{k!r}" for k in unknown if difflib.get_close_matches(k, missing, n=1)]
            hint = f" ({', '.join(typos)} is not a field: a typo?)" if typos else ""
            raise PLDRError(f"config lacks the shape field(s) {', '.join(missing)}{hint}; no default "
                            "can match the weights")
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            logger.warning("config field %r is unknown and ignored%s", key, hint)
        return cls(**{k: v for k, v in data.items() if fields.get(k)})

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "PLDRConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PLDRError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PLDRError(f"cannot read config {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except PLDRError as exc:
            raise PLDRError(f"{path}: {exc}") from None


PRESETS: dict[str, dict] = {
    # CPU tests and the quick start: 2 layers, d 32; the whole suite trains it in seconds.
    "tiny": dict(vocab_size=4000, num_layers=2, d_model=32, num_heads=2, dff=85, A_dff=24,
                 num_reslayerA=2, num_denseA=2, max_seq_len=128),
    # A model one GPU trains in minutes: 4 layers, d 256, dk 64 like the paper.
    "small": dict(vocab_size=8000, num_layers=4, d_model=256, num_heads=4, dff=682, A_dff=170,
                  num_reslayerA=4, num_denseA=2, max_seq_len=256),
    # The paper's PLDR-LLM v51 110M shape.
    "paper-110m": dict(vocab_size=32000, num_layers=5, d_model=896, num_heads=14, dff=2389, A_dff=170,
                       num_reslayerA=8, num_denseA=2, max_seq_len=1024),
}


def preset(name: str, **overrides) -> PLDRConfig:
    """A named preset ('tiny', 'small', 'paper-110m') with optional field overrides."""
    if name not in PRESETS:
        raise PLDRError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PLDRConfig(**{"name": name, **PRESETS[name], **overrides})
