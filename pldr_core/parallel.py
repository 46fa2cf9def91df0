"""Process groups and model wrapping for data-parallel training (FSDP2 / DDP only; no model maths).

One launch story: plain ``python`` is a single process; ``torchrun --nproc-per-node N`` sets RANK,
WORLD_SIZE and LOCAL_RANK and every process runs the same loop. On CUDA the model is sharded with FSDP2
(``fully_shard`` per decoder layer, then the root); on CPU (gloo, which has no reduce-scatter) it is
replicated with DDP.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Read the torchrun environment, pick the device and start the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        here = True
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, initialized_here=here)


def teardown(d: Dist) -> None:
    if d.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2 on CUDA (each decoder layer its own unit, then the root), DDP on CPU; as-is for one process."""
    if not d.enabled:
        return model
    if d.device.type == "cuda":
        # Parameters stay fp32 (the metric path is fp32 by design); bf16 comes from autocast.
        mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for layer in model.decoder.dec_layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return DDP(model)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: bool, d: Dist) -> bool:
    """True on every rank when any rank raised the flag (Ctrl-C reaches ranks at different times)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def state_options(full: bool = True, broadcast: bool = False):
    return StateDictOptions(full_state_dict=full, cpu_offload=True, broadcast_from_rank0=broadcast)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict with plain names; a collective under FSDP2."""
    return get_model_state_dict(model, options=state_options())


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """Full optimizer state keyed by parameter names; a collective under FSDP2."""
    return get_optimizer_state_dict(model, optimizer, options=state_options())


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state (``full_optimizer_state``) into this rank's optimizer."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=state_options())


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 flag)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``; FSDP2's sharded gradients give a DTensor, made whole here."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
