"""Vocabulary-parallel ``linear_logprobs``: the LM head's rows sharded over a process group.

Each rank holds a contiguous shard of the head's rows (shards in rank order, sizes may
differ), the same ``hidden [N, D]`` and the same GLOBAL ``targets [N]``. The log-prob of a
target is ``z_y - logsumexp_j z_j`` over the full vocabulary, and a logsumexp splits over
shards: ``lse = logsumexp_r lse_r``. So every rank runs the ordinary local launcher on its
shard (``lse_r``, and ``z_y`` where it owns the target) and ONE all-reduce of a
``[world + 1, N]`` buffer (rank r writes ``lse_r`` into row r, the owner adds ``z_y`` into
the last row) gives every rank the full-vocabulary log-probs: exact (no running max to agree
on), and ``world * N`` floats of traffic against the ``N * V`` logits never gathered.

Backward: with the GLOBAL ``lse`` the local launcher's ``dz = g * (1[y] - exp(z - lse))`` is
exactly this shard's slice of the full ``dz``, so ``d_weight`` and ``d_bias`` are local and
``d_hidden`` is the sum of the shards' ``dz_r @ W_r``: one all-reduce of ``[N, D]``. The
upstream gradient must be the same on every rank (the loss is computed from the replicated
log-probs, as in Megatron's vocab-parallel cross entropy).

The reward head ``hidden @ value_weight + value_bias`` is replicated, not sharded: every rank
computes it locally (autograd, outside the collective) and gets identical gradients for it.

The local work is ``forward_launch`` / ``backward_launch`` of ``reference.py`` or of
``kernels.py`` (the same contract), picked by ``icrm_kernels._dispatch``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .._validate import check_targets
from .reference import cast_grad, local_targets, rewards_reference


def launchers(backend: str, grad_filter_eps: float | None = None):
    """``(forward_launch, backward_launch)`` of the resolved backend (``"triton" | "reference"``);
    the Triton backward filters with the resolved ``grad_filter_eps`` (None: exact), the
    reference never filters."""
    if backend == "triton":
        from . import kernels

        return kernels.forward_launch, functools.partial(kernels.backward_launch, grad_filter_eps=grad_filter_eps)
    from . import reference

    return reference.forward_launch, reference.backward_launch


def local_shard(weight, bias, process_group):
    """A ``DTensor`` weight (and bias) ``Shard(0)`` over a 1-D device mesh -> ``(local rows,
    local bias, the mesh's process group)``: its chunks are contiguous and in rank order, the
    layout ``process_group=`` expects. Gradients flow back to the DTensors."""
    from torch.distributed.tensor import DTensor, Shard

    def rows_of(name, t):
        if not isinstance(t, DTensor) or t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
            got = f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh" if isinstance(t, DTensor) \
                else f"a {type(t).__name__}"
            raise ValueError(f"{name}: a DTensor LM head must be Shard(0) over a 1-D device mesh (vocabulary "
                             f"parallel), and so must its bias; got {got}")
        return t.to_local()

    group = weight.device_mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("process_group differs from the device mesh of the DTensor weight; pass one of them")
    return rows_of("weight", weight), None if bias is None else rows_of("bias", bias), group


def shard_layout(process_group, local_vocab: int, device: torch.device) -> tuple[int, int]:
    """``(vocab_start, full V)`` of this rank's shard: shards are contiguous and in rank order."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_vocab
    dist.all_reduce(sizes, group=process_group)
    return int(sizes[:rank].sum()), int(sizes.sum())


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, vocab_start, process_group, backend, grad_filter_eps):
        forward_launch, _ = launchers(backend)
        # The Triton forward saves each tile's row maxima of this shard; with the global lse they
        # bound the shard's softmax, so the backward skips dead tiles exactly as unsharded.
        extra = {}
        if backend == "triton" and any(ctx.needs_input_grad[:3]):
            from .kernels import tile_max_buffer

            extra["tile_max"] = tile_max_buffer(hidden, weight)
        logp_local, _, lse_local = forward_launch(hidden, weight, bias, targets, None, None,
                                                  vocab_start=vocab_start, **options, **extra)
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        valid = targets != options["ignore_index"]
        owner, _ = local_targets(targets, options["ignore_index"], vocab_start, weight.shape[0])
        merged = torch.zeros((world + 1, targets.shape[0]), dtype=lse_local.dtype, device=lse_local.device)
        merged[rank] = lse_local
        # The launcher gives logp = z_y - lse_r for an owned target; adding lse_r back gives z_y.
        merged[world] = torch.where(owner, logp_local + lse_local, torch.zeros((), dtype=lse_local.dtype, device=lse_local.device))
        dist.all_reduce(merged, group=process_group)
        lse = torch.logsumexp(merged[:world], dim=0)
        logp = torch.where(valid, merged[world] - lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, extra.get("tile_max"))
        ctx.options, ctx.vocab_start, ctx.process_group = options, vocab_start, process_group
        ctx.launchers = (backend, grad_filter_eps)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse, tile_max = ctx.saved_tensors
        _, backward_launch = launchers(*ctx.launchers)
        extra = {} if tile_max is None else {"tile_max": tile_max}
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias, _, _ = backward_launch(
            grad_logp.contiguous(), None, hidden, weight, bias, targets, None, lse,
            vocab_start=ctx.vocab_start, needs=(need_hidden, need_weight, need_bias, False, False), **ctx.options,
            **extra,
        )
        if d_hidden is not None:
            # Every rank's shard contributes to every row of d_hidden: sum them (no vocab gather).
            dist.all_reduce(d_hidden, group=ctx.process_group)
        return cast_grad(d_hidden, hidden), cast_grad(d_weight, weight), cast_grad(d_bias, bias), None, None, None, None, None, None


def vocab_parallel_linear_logprobs(hidden2d, weight, targets1d, bias, value_weight, value_bias, temperature,
                                   softcap, ignore_index, process_group, backend, grad_filter_eps):
    """hidden2d [N, D], weight [V_r, D] (this rank's rows), targets1d [N] global ids, bias [V_r],
    value_weight [D] or [1, D], value_bias [] or [1] -> ``(logp [N], rewards [N] or None)`` over
    the full vocabulary, on every rank. ``backend`` and ``grad_filter_eps`` are resolved (the filter
    is local to each shard's tiles, with the global softmax); inputs are validated by the caller
    except the targets' range, which needs the full V (checked here)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (or pass process_group=None)")
    vocab_start, vocab = shard_layout(process_group, weight.shape[0], hidden2d.device)
    check_targets(targets1d, vocab, ignore_index)
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    hidden2d, weight = hidden2d.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    logp = _VocabParallelLinearLogprobs.apply(hidden2d, weight, bias, targets1d.contiguous(), options, vocab_start,
                                              process_group, backend, grad_filter_eps)
    rewards = None if value_weight is None else rewards_reference(hidden2d, value_weight, value_bias)
    return logp, rewards
