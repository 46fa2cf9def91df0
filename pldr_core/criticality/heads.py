"""Per-head diagnostics at the last position of a read-out pass, the spectra, and the G-cache drift."""

from __future__ import annotations

import math

import torch

RANK_FACTOR = 64
"""Singular values above RANK_FACTOR * eps(float32) * s1 count towards the numerical rank."""


def rope_pair_index(dk: int, rope_style: str) -> torch.Tensor:
    """[dk]: the rotary frequency index of every coordinate: i for (2i, 2i+1) interleaved, i for
    (i, i + dk/2) rotate-half. Coordinates of one pair share an index (and a frequency)."""
    idx = torch.arange(dk)
    return idx // 2 if rope_style == "interleaved" else idx % (dk // 2)


def commutant_mask(dk: int, rope_style: str) -> torch.Tensor:
    """[dk, dk] bool: True where G[a, b] couples two coordinates of the same rotary frequency."""
    pair = rope_pair_index(dk, rope_style)
    return pair[:, None] == pair[None, :]


def commutant_residual(G: torch.Tensor, rope_style: str) -> torch.Tensor:
    """||G - P(G)||_F / ||G||_F for G [..., dk, dk], P keeping only same-frequency entries."""
    G = G.double()
    mask = commutant_mask(G.shape[-1], rope_style).to(G.device)
    off = G.masked_fill(mask, 0.0)
    return torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(G)


def numerical_rank(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, s2/s1) of M [..., dk, dk]: singular values above 64 * eps_fp32 * s1 are counted."""
    sv = torch.linalg.svdvals(M.double())
    tol = RANK_FACTOR * torch.finfo(torch.float32).eps * sv[..., :1]
    return (sv > tol).sum(-1).double(), sv[..., 1] / sv[..., 0]


def head_figures(readout, rope_style: str) -> dict[str, torch.Tensor]:
    """Per layer and head ([L, H] each) of one sample's read-out: attention entropy of the last query
    row (and over log S), head output RMS, g_rms, a_row_energy, ranks and s2/s1 of A and A_LM, norms
    and commutant residual of G_LM."""
    T = readout.tensors
    w = torch.stack(readout.attentions)  # [L, H, S]
    S = w.shape[-1]
    plogp = torch.where(w > 0, w * torch.log(w.clamp_min(1e-300)), torch.zeros_like(w))
    entropy = -plogp.sum(-1)
    out = {"entropy": entropy, "entropy_over_log_S": entropy / math.log(S) if S > 1 else torch.zeros_like(entropy),
           "head_out_rms": readout.head_out.pow(2).mean(-1).sqrt()}
    G = T["G_LM"]
    out["g_rms"] = G.pow(2).mean((-2, -1)).sqrt()
    A = T["A"]
    col_mean = A.mean(-2, keepdim=True)  # mean over i of A_ik, per column k
    out["a_row_energy"] = (A - col_mean).pow(2).mean((-2, -1)) / A.pow(2).mean((-2, -1))
    for kind in ("A", "A_LM"):
        if kind in T:
            out[f"rank_{kind}"], out[f"s2_over_s1_{kind}"] = numerical_rank(T[kind])
    out["G_LM_spectral_norm"] = torch.linalg.matrix_norm(G, ord=2)
    out["G_LM_frobenius_norm"] = torch.linalg.matrix_norm(G)
    out["commutant_residual"] = commutant_residual(G, rope_style)
    return out


PER_HEAD = ("entropy", "entropy_over_log_S", "head_out_rms", "g_rms", "a_row_energy")
SPECTRA = ("rank_A", "s2_over_s1_A", "rank_A_LM", "s2_over_s1_A_LM", "G_LM_spectral_norm",
           "G_LM_frobenius_norm", "commutant_residual")


class HeadAccumulator:
    """Means over samples of ``head_figures`` (ranks also their minimum), as JSON-able rows."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.mins: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, figs: dict[str, torch.Tensor]) -> None:
        for k, v in figs.items():
            v = v.double().cpu()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.mins[k] = torch.minimum(self.mins[k], v) if k in self.mins else v.clone()
        self.n += 1

    def rows(self, names: tuple[str, ...]) -> list[dict]:
        if not self.n:
            return []
        names = [k for k in names if k in self.sums]
        L, H = self.sums[names[0]].shape
        rows = []
        for i in range(L):
            for h in range(H):
                row = {"layer": i, "head": h}
                for k in names:
                    row[k] = float(self.sums[k][i, h]) / self.n
                    if k.startswith("rank_"):
                        row[f"{k}_min"] = int(self.mins[k][i, h])
                rows.append(row)
        return rows


class DriftAccumulator:
    """eps_G = RMS(G_t - G_C) / RMS(G_t) and max |G_t - G_C| per new token t and layer."""

    def __init__(self):
        self.eps: dict[int, list[torch.Tensor]] = {}
        self.max_abs: dict[int, list[torch.Tensor]] = {}

    def add(self, t: int, G_t: torch.Tensor, G_C: torch.Tensor) -> None:
        """G_t, G_C [L, H, dk, dk]."""
        d = (G_t - G_C).flatten(1)
        eps = d.pow(2).mean(1).sqrt() / G_t.flatten(1).pow(2).mean(1).sqrt()
        self.eps.setdefault(t, []).append(eps.cpu())
        self.max_abs.setdefault(t, []).append(d.abs().amax(1).cpu())

    def rows(self) -> list[dict]:
        """One row per t: eps_G per layer (mean over samples) and max |diff| per layer (max)."""
        return [{"t": t, "samples": len(self.eps[t]),
                 "eps_G": torch.stack(self.eps[t]).mean(0).tolist(),
                 "max_abs_diff": torch.stack(self.max_abs[t]).amax(0).tolist()}
                for t in sorted(self.eps)]
