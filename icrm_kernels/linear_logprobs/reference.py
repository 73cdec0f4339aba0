"""Plain-PyTorch linear log-prob gather and reward head: the test oracle and the CPU path.

Math (docs/math.md, op 2): ``x = hidden @ weight.T + bias``, ``z = softcap(x) / temperature``
with ``softcap(x) = c * tanh(x / c)``, ``logp = z[target] - logsumexp(z)``; rows whose
target is ``ignore_index`` give 0 and no gradient. Op 1: ``reward = hidden @ value_weight + value_bias``.

Two versions of op 2:

* :func:`linear_logprobs_reference` materialises the ``[N, V]`` logits and lets autograd
  do the backward. Short and obviously right; the oracle every test compares against.
* :func:`linear_logprobs_chunked` walks the rows in chunks and recomputes each chunk's
  logits in its own backward, so the extra memory is ``O(chunk_rows * V)`` instead of
  ``O(N * V)``. This is what ``backend="reference"`` runs on large inputs.

Everything accumulates in float32 (float64 when the inputs are float64, for the gold).
"""

from __future__ import annotations

import torch

#: Elements of one chunk of logits in the chunked path (128 MB in fp32; 1024 rows at V=32k).
CHUNK_ELEMENTS = 1 << 25
#: Above this many logits (N * V), ``backend="reference"`` switches to the chunked path.
CHUNKED_ABOVE = 1 << 22


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden, weight, bias, temperature: float, softcap: float | None) -> torch.Tensor:
    acc = accumulate_dtype(hidden.dtype)
    x = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        x = x + bias.to(acc)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """hidden [N, D], weight [V, D], targets [N], bias [V] -> logprobs [N] (fp32, fp64 for fp64)."""
    z = _logits(hidden, weight, bias, temperature, softcap)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = z.gather(1, safe_targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def rewards_reference(
    hidden: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden [N, D], value_weight [D] or [1, D], value_bias [] or [1] -> rewards [N]."""
    acc = accumulate_dtype(hidden.dtype)
    rewards = hidden.to(acc) @ value_weight.reshape(-1).to(acc)
    if value_bias is not None:
        rewards = rewards + value_bias.to(acc).reshape(())
    return rewards


def _chunk_logits(h, weight_acc, bias_acc, temperature: float, softcap: float | None, keep_tanh: bool = False):
    """Logits of one chunk of rows without autograd, computed in place: ``(z, tanh)``, where
    ``tanh`` is ``tanh(x / softcap)``, kept (a second buffer) only for the backward chain."""
    x = h @ weight_acc.T if bias_acc is None else torch.addmm(bias_acc, h, weight_acc.T)
    if softcap is None:
        return (x.div_(temperature) if temperature != 1.0 else x), None
    tanh = x.div_(softcap).tanh_()
    if not keep_tanh:
        return tanh.mul_(softcap / temperature), None
    return tanh * (softcap / temperature), tanh


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Row-chunked log-prob gather; saves only ``lse [N]`` and recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index, chunk_rows):
        acc = accumulate_dtype(hidden.dtype)
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            z, _ = _chunk_logits(hidden[rows].to(acc), weight_acc, bias_acc, temperature, softcap)
            target_logit = z.gather(1, safe_targets[rows, None]).squeeze(1)
            # logsumexp in place: one [chunk, V] buffer in all.
            row_max = z.amax(dim=1)
            lse[rows] = z.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
            logp[rows] = target_logit - lse[rows]
            del z
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse)
        ctx.temperature, ctx.softcap, ctx.chunk_rows = temperature, softcap, chunk_rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, safe_targets, valid, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        temperature, softcap = ctx.temperature, ctx.softcap
        acc = lse.dtype
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        grad = torch.where(valid, grad_logp.to(acc), torch.zeros((), dtype=acc, device=lse.device))

        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_rows):
            rows = slice(start, min(n, start + ctx.chunk_rows))
            g = grad[rows, None]
            h = hidden[rows].to(acc)
            z, tanh = _chunk_logits(h, weight_acc, bias_acc, temperature, softcap, keep_tanh=True)
            # dz_j = g * (1[j = y] - softmax_j); chained through 1/temperature and softcap.
            dz = z.sub_(lse[rows, None]).exp_().mul_(-g)
            dz.scatter_add_(1, safe_targets[rows, None], g)
            dx = dz.div_(temperature) if temperature != 1.0 else dz
            if softcap is not None:
                dx.mul_(tanh.square_().neg_().add_(1.0))
            if need_hidden:
                d_hidden[rows] = (dx @ weight_acc).to(hidden.dtype)
            if need_weight:
                d_weight.addmm_(dx.T, h)
            if need_bias:
                d_bias += dx.sum(0)
            del z, tanh, dz, dx
        return (
            d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
            None, None, None, None, None,
        )


def linear_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Same result as :func:`linear_logprobs_reference`, extra memory O(chunk_rows * V)."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, temperature, softcap, ignore_index, chunk_rows)


def linear_logprobs_auto_reference(hidden, weight, targets, bias, temperature, softcap, ignore_index):
    """``backend="reference"``: the naive oracle on small inputs, the chunked path on large ones."""
    if hidden.shape[0] * weight.shape[0] > CHUNKED_ABOVE:
        return linear_logprobs_chunked(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    return linear_logprobs_reference(hidden, weight, targets, bias, temperature, softcap, ignore_index)
