"""KV-cache and G-cache as explicit, preallocated objects passed into ``forward``.

- ``KVCache``: post-RoPE k and v per layer, preallocated for prompt + max_new_tokens, plus the metric
  tensor A of the prefill. With it on, A is frozen at the prompt (the paper's behaviour). (A decode
  step with a fixed G_LM caches G_LM k instead of k: one product per new key, not per query.)
- ``GCache``: per layer (A_LM, G_LM), either taken from the prefill of the current prompt or loaded from
  a G-cache file; in the second case the metric path never runs, not even at prefill.

The two are independent: pass either, both or neither. Rows may have different lengths (batched
generation of prompts of different lengths); ``row(b)`` gives a view of one row that writes through.
"""

from __future__ import annotations

import torch

from pldr_core.attention import metric_dtype
from pldr_core.errors import PLDRError


class _RowFlags:
    """Per-row 'filled' flags shared by a cache and its ``row(b)`` views (a view sees only its row)."""

    _state: dict
    _rows: list[int] | None

    def _own_rows(self):
        return self._rows if self._rows is not None else range(len(self._state["filled"]))

    def _all_filled(self) -> bool:
        return all(self._state["filled"][r] for r in self._own_rows())

    def _none_filled(self) -> bool:
        return not any(self._state["filled"][r] for r in self._own_rows())

    def _set_filled(self, value: bool) -> None:
        for r in self._own_rows():
            self._state["filled"][r] = value

    def _view_of(self, view, b: int):
        view._rows = [b if self._rows is None else self._rows[b]]
        return view


class KVCache(_RowFlags):
    """Preallocated keys/values [L, B, H, T, dk], per-row lengths [B], and the frozen A [L, B, H, dk, dk]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, A: torch.Tensor | None, lengths: torch.Tensor,
                 state: dict):
        self.k, self.v, self.A, self.lengths = k, v, A, lengths
        self._state = state  # shared between a cache and its row views: {"filled": [bool per row]}
        self._rows = None

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, num_heads: int, head_dim: int, max_len: int,
                 metric: bool, device=None, dtype=torch.float32) -> "KVCache":
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        v = torch.zeros(shape, device=device, dtype=dtype)
        A = (torch.zeros(num_layers, batch, num_heads, head_dim, head_dim, device=device,
                         dtype=metric_dtype(dtype))
             if metric else None)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(k, v, A, lengths, {"filled": [False] * batch})

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, device=None, dtype=None) -> "KVCache":
        """A cache sized for ``model`` (prompt + max_new_tokens = ``max_len`` positions per row)."""
        p = next(model.parameters())
        cfg = model.config
        return cls.allocate(num_layers=cfg.num_layers, batch=batch, num_heads=cfg.num_heads,
                            head_dim=cfg.head_dim, max_len=max_len, metric=cfg.has_metric_path,
                            device=device or p.device, dtype=dtype or p.dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def filled(self) -> bool:
        """True once the prefill has run: A is frozen and later calls are decode steps."""
        return self._all_filled()

    @property
    def empty(self) -> bool:
        """True while none of its rows holds anything (allocated or reset, not yet advanced): their
        lengths are then known to be 0 without reading them from the device."""
        return self._none_filled()

    def row(self, b: int) -> "KVCache":
        """A view of row ``b`` (for prefilling prompts of different lengths one at a time)."""
        sl = slice(b, b + 1)
        return self._view_of(KVCache(self.k[:, sl], self.v[:, sl], None if self.A is None else self.A[:, sl],
                                     self.lengths[sl], self._state), b)

    def reset(self) -> None:
        self.lengths.zero_()
        self._set_filled(False)

    def store_A(self, layer: int, A: torch.Tensor) -> None:
        self.A[layer].copy_(A)

    def begin(self, positions: torch.Tensor, end: int | None = None) -> None:
        """Called by the model once per forward, before the layers: checks room for ``positions``
        [B, S] and builds the mask they share. ``end``: one past the last position, where the caller
        knows it (a prefill into an empty cache); else it is read from the device (one host sync per
        forward, not one per layer)."""
        if end is None:
            end = int(positions.max()) + 1
        if end > self.max_len:
            raise PLDRError(
                f"KV-cache holds {self.max_len} positions per row; allocate it for prompt + max_new_tokens"
            )
        keys = torch.arange(end, device=positions.device)
        self._end = end
        self._mask = keys[None, None, :] <= positions[:, :, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v [B, H, S, dk] at ``positions`` [B, S]; return the keys, values and the bool mask
        [B, S, T'] over the T' cached positions that any query may see (see ``begin``)."""
        B, H, S, dk = k.shape
        idx = positions[:, None, :, None].expand(B, H, S, dk)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        end = self._end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], self._mask

    def advance(self, positions: torch.Tensor) -> None:
        """Called by the model after all layers ran: lengths move past ``positions``; A is frozen."""
        self.lengths.copy_(positions[:, -1] + 1)
        self._set_filled(True)


class GCache(_RowFlags):
    """Per-layer A_LM and G_LM, [L, B or 1, H, dk, dk]; ``source`` is 'prefill' or 'file'."""

    def __init__(self, A_LM: torch.Tensor, G_LM: torch.Tensor, source: str, state: dict, meta=None):
        self.A_LM, self.G_LM, self.source = A_LM, G_LM, source
        self._state = state
        self._rows = None
        self.meta = dict(meta or {})

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, num_heads: int, head_dim: int, device=None,
                 dtype=torch.float32) -> "GCache":
        """An empty cache that the prefill of the current prompt fills."""
        shape = (num_layers, batch, num_heads, head_dim, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype), "prefill", {"filled": [False] * batch})

    @classmethod
    def for_model(cls, model, batch: int, device=None) -> "GCache":
        cfg = model.config
        p = next(model.parameters())
        return cls.allocate(num_layers=cfg.num_layers, batch=batch, num_heads=cfg.num_heads,
                            head_dim=cfg.head_dim, device=device or p.device, dtype=metric_dtype(p.dtype))

    @classmethod
    def from_tensors(cls, A_LM: torch.Tensor, G_LM: torch.Tensor, meta=None) -> "GCache":
        """A filled cache from [L, H, dk, dk] tensors (a G-cache file); shared by every batch row."""
        if A_LM.shape != G_LM.shape or G_LM.dim() != 4:
            raise PLDRError(f"G-cache tensors must both be [L, H, dk, dk], got {tuple(A_LM.shape)} "
                            f"and {tuple(G_LM.shape)}")
        return cls(A_LM[:, None], G_LM[:, None], "file", {"filled": [True]}, meta)

    @property
    def filled(self) -> bool:
        return self.source == "file" or self._all_filled()

    def row(self, b: int) -> "GCache":
        if self.source == "file":
            return self
        sl = slice(b, b + 1)
        view = GCache(self.A_LM[:, sl], self.G_LM[:, sl], self.source, self._state, self.meta)
        return self._view_of(view, b)

    def to(self, device=None, dtype=None) -> "GCache":
        out = GCache(self.A_LM.to(device=device, dtype=dtype), self.G_LM.to(device=device, dtype=dtype),
                     self.source, self._state, self.meta)
        out._rows = self._rows
        return out

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A_LM[layer], self.G_LM[layer]

    def store(self, layer: int, A_LM: torch.Tensor, G_LM: torch.Tensor) -> None:
        if self.source == "file":
            raise PLDRError("a G-cache loaded from a file is read-only")
        self.A_LM[layer].copy_(A_LM)
        self.G_LM[layer].copy_(G_LM)

    def mark_filled(self) -> None:
        self._set_filled(True)

    def reset(self) -> None:
        if self.source != "file":
            self._set_filled(False)
