"""Process groups and model wrapping for data-parallel training (FSDP2 / DDP only; no model maths).

One launch story: plain ``python`` is a single process; ``torchrun`` sets RANK, WORLD_SIZE and
LOCAL_RANK (on one host or several: nothing here names a host) and every process runs the same loop.
The plan (``plan_for``) replicates the model with DDP or shards it with FSDP2 (``fully_shard`` per
decoder layer, then the root; CUDA only, since gloo has no reduce-scatter).
"""

from __future__ import annotations

import contextlib
import os
import time
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

from pldr_core.errors import PLDRError

PLANS = ("auto", "ddp", "fsdp")


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


def teardown(d: Dist, finished: bool = False) -> None:
    """Destroy the process group this process started. ``finished``: every rank got here without an
    error, so they wait for each other first (a rank that raised must not wait for ranks stuck in a
    collective)."""
    if d.initialized_here and dist.is_initialized():
        if finished:
            dist.barrier()
        # Gloo's worker thread frees the last collective's work after the caller has seen it finish,
        # and that needs the GIL. Destroying the group joins that thread while holding the GIL, so
        # without this pause the two can wait on each other forever (about one 2-process CPU run in five
        # to ten). Sleeping releases the GIL.
        time.sleep(0.2)
        dist.destroy_process_group()


def plan_for(requested: str, d: Dist) -> str:
    """The data-parallel plan of a run: "none" for one process, else "ddp" or "fsdp".

    "auto" is DDP until both plans are measured on GPUs (docs/performance.md says how): a 110M
    model's replica and AdamW state fit one GPU, and DDP's bucketed all-reduce overlapping the
    backward may beat FSDP2's per-layer all-gathers at this size."""
    if requested not in PLANS:
        raise PLDRError(f"unknown --parallel {requested!r}; choose {', '.join(PLANS[:-1])} or {PLANS[-1]}")
    if not d.enabled:
        return "none"
    plan = "ddp" if requested == "auto" else requested
    if plan == "fsdp" and d.device.type != "cuda":
        raise PLDRError("--parallel fsdp needs CUDA devices (gloo on CPU has no reduce-scatter); "
                        "use --parallel ddp")
    return plan


def wrap(model: torch.nn.Module, d: Dist, plan: str) -> torch.nn.Module:
    """The model wrapped for ``plan`` (``plan_for``); as-is for "none". Compile each layer before."""
    if plan == "none":
        return model
    if plan == "fsdp":
        return _fully_shard(model)
    ids = [d.local_rank] if d.device.type == "cuda" else None
    # Gradients as views into the all-reduce buckets: no copy in or out of them per step.
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit, then the root (embedding, final norm, head)."""
    # Parameters stay fp32 (the metric path is fp32 by design); bf16 comes from autocast.
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    layers = list(model.decoder.dec_layers)
    for i, layer in enumerate(layers):
        # The backward needs the last layer first, at once: resharding it would only gather it again.
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp)
    # Gather layer i + 1 while layer i computes; the backward prefetches one layer ahead by itself.
    for layer, nxt in zip(layers, layers[1:]):
        layer.set_modules_to_forward_prefetch([nxt])
    return model


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
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch: DDP's no_sync,
    FSDP2's requires-gradient-sync flag (set on every layer's unit, recursively)."""
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
