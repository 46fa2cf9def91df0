"""Training losses: token cross-entropy ignoring the pad id, and the DAG terms of A_LM, A_P and G_LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pldr_core.attention import LayerDeductive

DAG_KEYS = ("A_LM", "A_P", "G_LM")
"""The deductive outputs with a DAG term, in the order of the config's ``dag`` coefficients."""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` [B, S, V] against ``targets`` [B, S], pad tokens left out."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad,
                           reduction="sum")


def correct_tokens(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """How many non-pad targets are the argmax of their logits."""
    return ((logits.argmax(-1) == targets) & (targets != pad)).sum()


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


def add_dag_terms(loss: torch.Tensor, terms: dict[str, torch.Tensor], coeffs, scale: float) -> torch.Tensor:
    """``loss`` plus each DAG term the model has times its coefficient, divided by ``scale`` (the
    micro-batches per step, so the terms count once per optimizer step)."""
    for c, key in zip(coeffs, DAG_KEYS):
        if c and key in terms:
            loss = loss + c * terms[key] / scale
    return loss
