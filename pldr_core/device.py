"""Picking the device and dtype a command runs on (one place, one set of error messages)."""

from __future__ import annotations

import torch

from pldr_core.errors import PLDRError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) -> CUDA when available, else CPU; anything else must exist here."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PLDRError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PLDRError(f"device {device} asked for, but torch sees no CUDA device; use --device cpu")
    return dev


def resolve_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise PLDRError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or float64")
    return DTYPES[name]


def ids_on(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``, copied without waiting for the work queued there (from
    pinned memory on CUDA; a plain copy from pageable memory waits for the stream to drain)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
