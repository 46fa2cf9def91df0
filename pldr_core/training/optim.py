"""AdamW as pretraining uses it: (0.9, 0.95), eps 1e-5, weight decay on matrices only."""

from __future__ import annotations

import torch

from pldr_core.parallel import Dist


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, d: Dist) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norms (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-5, **optimizer_impl(d))


def optimizer_impl(d: Dist) -> dict:
    """AdamW's implementation: fused on a single CUDA device, foreach across ranks (FSDP2's sharded
    parameters), the plain loop on CPU.

    With foreach, the host-side work of each CUDA-graph step over a model's many parameter tensors
    cannot keep ahead of the GPU, so steps run slower and unevenly; fused keeps them steady."""
    if d.device.type != "cuda":
        return {}
    return {"foreach": True} if d.enabled else {"fused": True}


def with_optimizer_impl(state: dict, d: Dist) -> dict:
    """An optimizer state dict whose groups ask for this run's implementation: a checkpoint's groups
    carry the one it was saved with (a foreach run's, say), which load_state_dict would restore."""
    impl = {"fused": None, "foreach": None, **optimizer_impl(d)}
    return {**state, "param_groups": [{**group, **impl} for group in state["param_groups"]]}
