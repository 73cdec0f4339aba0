"""``torch.library`` registration of the ops, so ``torch.compile(fullgraph=True)`` sees each as one
graph node (with a fake implementation for shapes and a registered backward) instead of
breaking the graph at an ``autograd.Function`` or a data-dependent argument check.

Registered (namespace ``icrm_kernels``):

* ``linear_logprobs_forward`` / ``linear_logprobs_backward``: the launchers of
  ``linear_logprobs/reference.py`` or ``linear_logprobs/kernels.py`` (one contract,
  ``forward_launch`` / ``backward_launch``); the forward saves only ``lse [N]``.
* ``consistency_loss_forward`` / ``consistency_loss_backward``: the Triton consistency kernels.
  The consistency reference needs no op: it is plain torch ops, which the compiler traces (and
  fuses) itself.

The public functions call these ops while ``torch.compiler.is_compiling()``; eager calls go to
the ``autograd.Function`` paths directly, which compute the same thing without the dispatcher
round trip. The backend is resolved by ``icrm_kernels._dispatch`` before the op is called and
passed in as ``"triton"`` or ``"reference"``. The targets' range check, which needs a host
sync, runs inside the forward op (so it still raises under ``torch.compile``); the consistency
op skips the value checks of ``sign`` and ``cu_seqlens`` under compile (see ``consistency_loss``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_targets
from .linear_logprobs.parallel import launchers
from .linear_logprobs.reference import accumulate_dtype, cast_grad


def _none_as_empty(t: Tensor | None, like: Tensor) -> Tensor:
    # Custom ops return tensors, never None: an empty tensor stands for "absent".
    return like.new_empty(0) if t is None else t


# ----------------------------------------------------------------------------------------------
# linear_logprobs (+ rewards)


@torch.library.custom_op("icrm_kernels::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, value_weight: Tensor | None,
    value_bias: Tensor | None, temperature: float, softcap: float | None, ignore_index: int, backend: str,
    grad_filter_eps: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, D], weight [V, D], bias [V], targets [N] int64, value_weight [D], value_bias [1]
    -> ``(logp [N], rewards [N] (or [0] without a value head), lse [N])``, fp32 (fp64 for fp64)."""
    check_targets(targets, weight.shape[0], ignore_index)
    forward_launch, _ = launchers(backend)
    logp, rewards, lse = forward_launch(hidden, weight, bias, targets, value_weight, value_bias,
                                        temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    return logp, _none_as_empty(rewards, logp), lse


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, targets, value_weight, value_bias, temperature, softcap, ignore_index, backend,
      grad_filter_eps):
    n, acc = hidden.shape[0], accumulate_dtype(hidden.dtype)
    rows = n if value_weight is not None else 0
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(rows, dtype=acc), hidden.new_empty(n, dtype=acc)


@torch.library.custom_op("icrm_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(
    grad_logp: Tensor, grad_rewards: Tensor | None, hidden: Tensor, weight: Tensor, bias: Tensor | None,
    targets: Tensor, value_weight: Tensor | None, value_bias: Tensor | None, lse: Tensor, temperature: float,
    softcap: float | None, ignore_index: int, backend: str, grad_filter_eps: float | None, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(hidden, weight, bias, value_weight, value_bias)`` in their dtypes; ``[0]``
    where ``needs`` (same order) is false or the input is absent."""
    _, backward_launch = launchers(backend, grad_filter_eps)
    grads = backward_launch(grad_logp.contiguous(), grad_rewards, hidden, weight, bias, targets, value_weight, lse,
                            temperature=temperature, softcap=softcap, ignore_index=ignore_index, needs=tuple(needs))
    inputs = (hidden, weight, bias, value_weight, value_bias)
    return tuple(_none_as_empty(cast_grad(g, x) if x is not None else None, hidden) for g, x in zip(grads, inputs))


@linear_logprobs_backward.register_fake
def _(grad_logp, grad_rewards, hidden, weight, bias, targets, value_weight, value_bias, lse, temperature, softcap,
      ignore_index, backend, grad_filter_eps, needs):
    inputs = (hidden, weight, bias, value_weight, value_bias)
    return tuple(torch.empty_like(x) if need and x is not None else hidden.new_empty(0) for x, need in zip(inputs, needs))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, value_weight, value_bias, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, value_weight, value_bias, output[2])
    ctx.options = tuple(options)  # temperature, softcap, ignore_index, backend, grad_filter_eps


def _linear_backward(ctx, grad_logp, grad_rewards, _grad_lse):
    hidden, weight, bias, targets, value_weight, value_bias, lse = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5)]
    grad_rewards = grad_rewards if value_weight is not None else None
    grads = linear_logprobs_backward(grad_logp, grad_rewards, hidden, weight, bias, targets, value_weight, value_bias,
                                     lse, *ctx.options, needs)
    d_hidden, d_weight, d_bias, d_value_weight, d_value_bias = (g if need else None for g, need in zip(grads, needs))
    return d_hidden, d_weight, d_bias, None, d_value_weight, d_value_bias, None, None, None, None, None


linear_logprobs_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_logprobs_op(hidden2d, weight, targets1d, bias, value_weight, value_bias, temperature, softcap,
                       ignore_index, backend, grad_filter_eps):
    """The ops' form of ``linear_logprobs_triton``: ``(logp [N], rewards [N] or None)``."""
    vw = None if value_weight is None else value_weight.reshape(-1)
    vb = None if value_bias is None else value_bias.reshape(1)
    bias = None if bias is None else bias.contiguous()
    logp, rewards, _ = linear_logprobs_forward(hidden2d.contiguous(), weight.contiguous(), bias, targets1d, vw, vb,
                                               temperature, softcap, ignore_index, backend, grad_filter_eps)
    return logp, None if value_weight is None else rewards


# ----------------------------------------------------------------------------------------------
# consistency_loss (Triton)


@torch.library.custom_op("icrm_kernels::consistency_loss_forward", mutates_args=())
def consistency_loss_forward(
    rewards: Tensor, weights: Tensor, mask: Tensor, baseline: Tensor, sign: Tensor, cu_seqlens: Tensor | None,
    kind: str, eps: float, reduction: str,
) -> tuple[Tensor, Tensor]:
    """``(loss fp32, sum(mask) fp64 [] or [0] for reduction='none')`` from the Triton kernels."""
    from .consistency.kernels import loss_forward

    out, mask_total = loss_forward(rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction)
    return out, _none_as_empty(mask_total, rewards.new_empty(0, dtype=torch.float64))


@consistency_loss_forward.register_fake
def _(rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction):
    shape = weights.shape if reduction == "none" else ()
    mask_total = rewards.new_empty(0 if reduction == "none" else (), dtype=torch.float64)
    return rewards.new_empty(shape, dtype=torch.float32), mask_total


@torch.library.custom_op("icrm_kernels::consistency_loss_backward", mutates_args=())
def consistency_loss_backward(
    grad_out: Tensor, rewards: Tensor, weights: Tensor, mask: Tensor, baseline: Tensor, sign: Tensor,
    cu_seqlens: Tensor | None, mask_total: Tensor, kind: str, eps: float, reduction: str,
) -> Tensor:
    from .consistency.kernels import loss_backward

    # mask_total is the [0] placeholder for reduction='none', which does not read it.
    return loss_backward(grad_out, rewards, weights, mask, baseline, sign, cu_seqlens, mask_total, kind, eps, reduction)


@consistency_loss_backward.register_fake
def _(grad_out, rewards, weights, mask, baseline, sign, cu_seqlens, mask_total, kind, eps, reduction):
    return torch.empty_like(rewards)


def _consistency_setup_context(ctx, inputs, output):
    rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction = inputs
    ctx.save_for_backward(rewards, weights, mask, baseline, sign, cu_seqlens, output[1])
    ctx.options = (kind, eps, reduction)


def _consistency_backward(ctx, grad_out, _grad_mask_total):
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    return (consistency_loss_backward(grad_out, *ctx.saved_tensors, *ctx.options),) + (None,) * 8


consistency_loss_forward.register_autograd(_consistency_backward, setup_context=_consistency_setup_context)


def consistency_loss_op(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens):
    """The ops' form of ``consistency_loss_triton`` (same arguments and result)."""
    out, _ = consistency_loss_forward(rewards.contiguous(), weights.detach().contiguous(), mask.detach().contiguous(),
                                      baseline.detach().contiguous(), sign.detach().contiguous(), cu_seqlens, kind,
                                      float(eps), reduction)
    return out
