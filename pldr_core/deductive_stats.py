"""Figures of deductive tensors (A_LM, A_P, G_LM): per-matrix statistics in float64, the RMSE across
prompts, the DAG term per head, and how closely two results agree."""

from __future__ import annotations

import math

import torch

from pldr_core.dag import dag_loss_term


def matrix_stats(X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-matrix figures of X [..., dk, dk] (float64): det, logabsdet, sign, rank, top_sv_share,
    asymmetry (Frobenius ||X - X^T|| / ||X||) and min entry; each [...]."""
    X = X.to(torch.float64)
    sign, logabsdet = torch.linalg.slogdet(X)
    sv = torch.linalg.svdvals(X)
    tol = sv[..., :1] * X.shape[-1] * torch.finfo(X.dtype).eps
    norm = torch.linalg.matrix_norm(X)
    return {
        "det": torch.linalg.det(X),
        "logabsdet": logabsdet,
        "sign": sign,
        "rank": (sv > tol).sum(-1).to(torch.float64),
        "top_sv_share": sv[..., 0] / sv.sum(-1),
        "asymmetry": torch.linalg.matrix_norm(X - X.transpose(-1, -2)) / norm,
        "min": X.amin(dim=(-2, -1)),
    }


def rmse_across(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSE of X [P, H, dk, dk] around its mean over the P prompts, per head -> ([H], [H] / |mean|).

    rmse_h = sqrt( mean_{p,i,j} (X[p,h,i,j] - mean_p X[p,h,i,j])^2 ); the relative figure divides it by
    |mean_{p,i,j} X[p,h,i,j]|. With a single prompt both are 0.
    """
    X = X.to(torch.float64)
    rmse = (X - X.mean(0, keepdim=True)).pow(2).mean(dim=(0, 2, 3)).sqrt()
    return rmse, rmse / X.mean(dim=(0, 2, 3)).abs()


def dag_per_head(X: torch.Tensor) -> torch.Tensor:
    """The DAG term DL of X [P, H, dk, dk] per head (averaged over prompts) -> [H]."""
    return torch.stack([dag_loss_term(X[:, h]) for h in range(X.shape[1])]).to(torch.float64)


def equal_decimals(diff: float) -> int | None:
    """How many decimal places two numbers agree to, given their absolute difference (None: identical)."""
    if diff == 0:
        return None
    if not math.isfinite(diff):
        return 0
    return max(0, math.floor(-math.log10(diff)))


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two tensors are apart: max |a - b| (NaN where both are NaN counts as equal), whether
    they are identical, and to how many decimals they agree."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(both_nan, 0)
    diff = float(d.max()) if d.numel() else 0.0
    return {"max_abs_diff": diff, "identical": diff == 0.0, "equal_decimals": equal_decimals(diff)}
