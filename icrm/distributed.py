"""Several processes under ``torchrun``: joining the group, FSDP2 sharding, and the few
collectives the trainer needs (mean of metrics, one decision for all ranks, barriers).

One process (no ``WORLD_SIZE``) never touches ``torch.distributed``: every helper here is
then a no-op or returns its input.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; joins the process group under ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def launch_rank() -> int:
    """This process's rank as ``torchrun`` sets it (0 outside torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0"))


def shard_with_fsdp(model: torch.nn.Module, decoder: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: one unit per decoder layer (its parameters are gathered just for that
    layer's forward and backward), then the root unit with everything else: embeddings, final
    norm, the value head and the LM-head copy. Every parameter is sharded over the ranks (dim 0).
    ``compute_dtype`` (CUDA bf16/fp16): the gathered parameters are cast to it, gradients are
    reduced in fp32 and the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"fsdp: {type(decoder).__name__} has no `layers` ModuleList of decoder layers to shard")
    kwargs = {}
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def state_options(sharded: bool, saving: bool) -> StateDictOptions:
    """Under FSDP2: full (gathered) tensors, kept on rank 0's CPU when saving; else the module's own."""
    return StateDictOptions(full_state_dict=True, cpu_offload=saving) if sharded else StateDictOptions()


def reduce_mean(metrics: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Each metric averaged over the ranks (every rank gets the same dict)."""
    if world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    vec = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return {k: float(v) / world_size for k, v in zip(keys, vec.tolist())}


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks take one decision)."""
    if world_size == 1:
        return flag
    vec = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(vec)
    return float(vec) > 0.0


def gather_objects(value, world_size: int) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
