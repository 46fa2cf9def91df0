"""The DAG measure of the deductive outputs: DL(M) = | log( trace(exp(M o M)) / dk ) |.

Training adds it to the loss (``pldr_core.training.losses``) and ``inspect-deductive`` reports it, so
it lives below both.
"""

from __future__ import annotations

import torch

from pldr_core.attention import LayerDeductive

DAG_KEYS = ("A_LM", "A_P", "G_LM")
"""The deductive outputs with a DAG term, in the order of the config's ``dag`` coefficients."""


def _dag_values(M: torch.Tensor) -> torch.Tensor:
    """| log( trace(exp(M o M)) / dk ) | of every dk x dk matrix in M [..., dk, dk] (matrix exp in fp32)."""
    dk = M.shape[-1]
    E = torch.linalg.matrix_exp((M.float() * M.float()))
    return torch.log(E.diagonal(dim1=-2, dim2=-1).sum(-1) / dk).abs()


def dag_loss_term(M: torch.Tensor) -> torch.Tensor:
    """DL(M) = | log( trace(exp(M o M)) / dk ) | averaged over batch and heads (matrix exp in fp32)."""
    return _dag_values(M).mean()


def dag_terms(deductive: list[LayerDeductive]) -> dict[str, torch.Tensor]:
    """The three DAG terms {A_LM, A_P, G_LM} averaged over layers, for the tensors the model has.

    Each term is the mean over layers of ``dag_loss_term``. When every tensor has one shape, all of
    them go through a single batched matrix exponential: ``torch.linalg.matrix_exp`` costs host syncs
    and several kernels per call, so one call per layer and tensor would slow every logged step.
    """
    tensors = [(key, d[key]) for key in DAG_KEYS for d in deductive if d is not None and key in d]
    if not tensors:
        return {}
    if len({M.shape for _, M in tensors}) == 1:
        per_layer = _dag_values(torch.stack([M for _, M in tensors])).reshape(len(tensors), -1).mean(1)
    else:
        per_layer = torch.stack([dag_loss_term(M) for _, M in tensors])
    out = {}
    for key in dict.fromkeys(k for k, _ in tensors):
        out[key] = per_layer[[i for i, (k, _) in enumerate(tensors) if k == key]].mean()
    return out
