"""Training losses: token cross-entropy ignoring the pad id, and the DAG terms of A_LM, A_P and G_LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pldr_core.dag import DAG_KEYS, dag_loss_term, dag_terms

__all__ = ["DAG_KEYS", "add_dag_terms", "correct_tokens", "dag_loss_term", "dag_terms", "token_cross_entropy"]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` [B, S, V] against ``targets`` [B, S], pad tokens left out."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad,
                           reduction="sum")


def correct_tokens(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """How many non-pad targets are the argmax of their logits."""
    return ((logits.argmax(-1) == targets) & (targets != pad)).sum()


def add_dag_terms(loss: torch.Tensor, terms: dict[str, torch.Tensor], coeffs, scale: float) -> torch.Tensor:
    """``loss`` plus each DAG term the model has times its coefficient, divided by ``scale`` (the
    micro-batches per step, so the terms count once per optimizer step)."""
    for c, key in zip(coeffs, DAG_KEYS):
        if c and key in terms:
            loss = loss + c * terms[key] / scale
    return loss
