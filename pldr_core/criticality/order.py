"""The order parameter: read-outs of A, A_LM, A_P and G_LM and their pooled differences.

For each tensor kind X, every entry is pooled over samples, layers, heads and the dk x dk grid:
OP(X) = sqrt(mean((X_1 - X_C)^2)) / |mean(X_C)| (run 1 against the prompt alone, what the G-cache of
that prompt holds) and OP_12(X) = sqrt(mean((X_1 - X_2)^2)) / |mean(X_1)| (two sampled runs). Sums are
accumulated in float64 one sample at a time, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pldr_core.attention import DEDUCTIVE_NAMES, apply_rope, rope_tables

KINDS = DEDUCTIVE_NAMES
"""The tensor kinds the order parameter is computed for: A, A_LM, A_P, G_LM."""


@dataclass
class Readout:
    """One sample's tensors from one uncached forward pass, each [L, H, dk, dk] float64."""

    tensors: dict[str, torch.Tensor]
    attentions: list[torch.Tensor] | None = None
    """Per layer [H, S] float64: the last query row of the attention weights (run 1 only)."""
    head_out: torch.Tensor | None = None
    """[L, H, dk] float64: each head's attention output at the last position (run 1 only)."""


def _capture_inputs(model):
    """Forward pre-hooks that keep each attention layer's input x and positions (for v, and for q
    where the model has no metric path); returns (store, handles)."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.decoder.dec_layers):
        def hook(module, args, kwargs, i=i):
            store[i] = (args[0], args[1])
        handles.append(layer.mha1.register_forward_pre_hook(hook, with_kwargs=True))
    return store, handles


def _queries(attn, x, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE q and plain v [1, H, S, dk] of one attention layer, from its public modules."""
    B, S, _ = x.shape
    H, dk = attn.num_heads, attn.head_dim
    q = attn.wq(x).view(B, S, H, dk).transpose(1, 2)
    v = attn.wv(x).view(B, S, H, dk).transpose(1, 2)
    cos, sin = rope_tables(positions, dk, attn.rope_base)
    return apply_rope(q, cos, sin, attn.rope_style), v


def substitute_A(q: torch.Tensor) -> torch.Tensor:
    """For a model without a metric path: A as q^T q / S, the mean outer product of the post-RoPE
    queries (a LayerNorm would leave every row with mean 0, and |mean(A_C)| is OP's denominator)."""
    q = q.double()
    return torch.matmul(q.transpose(-1, -2), q) / q.shape[-2]


@torch.no_grad()
def readout(model, ids: list[int], *, diagnostics: bool = False) -> Readout:
    """A, A_LM, A_P, G_LM of every layer and head from one uncached forward pass over ``ids``.

    A model without a metric path gets ``substitute_A``; identity G gets G_LM = I (constant), so its
    OP(G_LM) is 0 as it is by definition. ``diagnostics`` also returns the attention weights' last
    row and each head's output at the last position.
    """
    device = next(model.parameters()).device
    cfg = model.config
    x = torch.tensor([ids], dtype=torch.long, device=device)
    store, handles = _capture_inputs(model)
    try:
        out = model(x, return_deductive=True, return_attention=diagnostics)
    finally:
        for h in handles:
            h.remove()
    per_kind: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    head_out, last_rows = [], []
    for i, (layer, ded) in enumerate(zip(model.decoder.dec_layers, out.deductive)):
        attn = layer.mha1
        need_q = not cfg.has_metric_path
        if need_q or diagnostics:
            q, v = _queries(attn, *store[i])
        for k in KINDS:
            if k in ded:
                per_kind[k].append(ded[k][0].double())
        if need_q:
            per_kind["A"].append(substitute_A(q)[0])
        if "G_LM" not in ded:
            eye = torch.eye(cfg.head_dim, dtype=torch.float64, device=device)
            per_kind["G_LM"].append(eye.expand(cfg.num_heads, -1, -1))
        if diagnostics:
            w = out.attentions[i][0, :, -1].double()  # [H, S]
            last_rows.append(w)
            head_out.append(torch.einsum("hs,hsd->hd", w, v[0].double()))
    tensors = {k: torch.stack(v) for k, v in per_kind.items() if v}
    return Readout(tensors, attentions=last_rows or None,
                   head_out=torch.stack(head_out) if head_out else None)


class _Moments:
    """Per-layer sums of x and x^2 and the entry count, in float64."""

    def __init__(self, L: int, device):
        self.s = torch.zeros(L, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(L, dtype=torch.float64, device=device)
        self.n = torch.zeros(L, dtype=torch.float64, device=device)

    def add(self, X: torch.Tensor) -> None:
        X = X.reshape(X.shape[0], -1)
        self.s += X.sum(1)
        self.s2 += (X * X).sum(1)
        self.n += X.shape[1]

    def mean(self, layer: int | None = None) -> float:
        s, n = (self.s.sum(), self.n.sum()) if layer is None else (self.s[layer], self.n[layer])
        return float(s / n) if n > 0 else float("nan")

    def std(self) -> float:
        n = float(self.n.sum())
        if n == 0:
            return float("nan")
        m = float(self.s.sum()) / n
        return math.sqrt(max(float(self.s2.sum()) / n - m * m, 0.0))


class OrderAccumulator:
    """Streams samples (runs 1, 2 and C of each) into the pooled and per-layer order parameters."""

    def __init__(self, L: int, device):
        self.L, self.device = L, device
        self.runs: dict[str, dict[str, _Moments]] = {r: {} for r in ("1", "2", "C")}
        self.diff: dict[str, dict[str, _Moments]] = {"1C": {}, "12": {}}

    def _m(self, table: dict, kind: str) -> _Moments:
        if kind not in table:
            table[kind] = _Moments(self.L, self.device)
        return table[kind]

    def add(self, run1: dict, run2: dict, runC: dict) -> None:
        for kind in KINDS:
            if kind not in run1:
                continue
            X1, X2, XC = run1[kind], run2[kind], runC[kind]
            for name, X in (("1", X1), ("2", X2), ("C", XC)):
                self._m(self.runs[name], kind).add(X)
            self._m(self.diff["1C"], kind).add(X1 - XC)
            self._m(self.diff["12"], kind).add(X1 - X2)

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in self.runs["1"]]

    def _op(self, pair: str, kind: str, layer: int | None = None) -> float:
        d = self.diff[pair][kind]
        ref = self.runs["C" if pair == "1C" else "1"][kind]
        s2, n = (d.s2.sum(), d.n.sum()) if layer is None else (d.s2[layer], d.n[layer])
        mean = ref.mean(layer)
        return float(torch.sqrt(s2 / n)) / abs(mean) if mean != 0 else float("inf")

    def order_parameter(self, pair: str = "1C") -> dict[str, float]:
        return {k: self._op(pair, k) for k in self.kinds}

    def per_layer(self) -> list[dict]:
        return [{"layer": i,
                 "order_parameter": {k: self._op("1C", k, i) for k in self.kinds},
                 "order_parameter_12": {k: self._op("12", k, i) for k in self.kinds}}
                for i in range(self.L)]

    def stats(self) -> dict[str, dict[str, dict[str, float]]]:
        return {r: {k: {"mean": m.mean(), "std": m.std()} for k, m in table.items()}
                for r, table in self.runs.items()}


def pooled_op(X1: torch.Tensor, XC: torch.Tensor) -> float:
    """OP of stacked tensors (any shape, entries pooled): sqrt(mean((X1 - XC)^2)) / |mean(XC)|."""
    X1, XC = X1.double(), XC.double()
    return float(torch.sqrt(((X1 - XC) ** 2).mean()) / XC.mean().abs())
