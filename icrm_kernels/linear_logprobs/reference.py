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

The chunked loops are :func:`forward_launch` / :func:`backward_launch`, with the same contract
as the Triton launchers (global targets and a ``vocab_start`` for a block of the head's rows,
a backward that takes the full vocabulary's ``lse``), so the vocabulary-parallel path
(``parallel.py``) and the ``torch.library`` ops (``icrm_kernels._custom_ops``) run either backend.

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


def _chunk_rows(chunk_rows: int | None, vocab: int) -> int:
    return chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // max(1, vocab))


def local_targets(targets, ignore_index: int, vocab_start: int, vocab: int):
    """``(in_shard [N] bool, local ids [N])``: which targets fall in this weight's rows
    ``[vocab_start, vocab_start + V)``, and their row there (0 where they do not)."""
    local = targets - vocab_start
    in_shard = (targets != ignore_index) & (local >= 0) & (local < vocab)
    return in_shard, torch.where(in_shard, local, torch.zeros_like(local))


@torch.no_grad()
def forward_launch(hidden2d, weight, bias, targets, value_weight, value_bias, *, temperature: float,
                   softcap: float | None, ignore_index: int, vocab_start: int = 0, chunk_rows: int | None = None):
    """The chunked forward with the Triton launchers' contract, no autograd.

    hidden2d [N, D], weight [V, D] (rows ``vocab_start ..`` of the full head), targets [N] global
    ids -> ``(logp [N], rewards [N] or None, lse [N])`` in the accumulation dtype. ``lse`` is over
    these V rows; a target outside them contributes no target logit (``logp = -lse``); rows whose
    target is ``ignore_index`` give 0. Extra memory: one ``[chunk_rows, V]`` buffer.
    """
    acc = accumulate_dtype(hidden2d.dtype)
    weight_acc = weight.to(acc)
    bias_acc = None if bias is None else bias.to(acc)
    in_shard, local = local_targets(targets, ignore_index, vocab_start, weight.shape[0])
    n = hidden2d.shape[0]
    chunk_rows = _chunk_rows(chunk_rows, weight.shape[0])
    lse = torch.empty(n, dtype=acc, device=hidden2d.device)
    target_logit = torch.empty(n, dtype=acc, device=hidden2d.device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(n, start + chunk_rows))
        z, _ = _chunk_logits(hidden2d[rows].to(acc), weight_acc, bias_acc, temperature, softcap)
        target_logit[rows] = z.gather(1, local[rows, None]).squeeze(1)
        # logsumexp in place: one [chunk, V] buffer in all.
        row_max = z.amax(dim=1)
        lse[rows] = z.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
        del z
    logp = torch.where(in_shard, target_logit, torch.zeros((), dtype=acc, device=lse.device)) - lse
    logp = torch.where(targets != ignore_index, logp, torch.zeros((), dtype=acc, device=lse.device))
    rewards = None if value_weight is None else rewards_reference(hidden2d, value_weight, value_bias)
    return logp, rewards, lse


@torch.no_grad()
def backward_launch(grad_logp, grad_rewards, hidden2d, weight, bias, targets, value_weight, lse, *,
                    temperature: float, softcap: float | None, ignore_index: int, vocab_start: int = 0,
                    needs=(True, True, True, True, True), chunk_rows: int | None = None):
    """The chunked backward with the Triton launchers' contract: ``(d_hidden [N, D], d_weight [V, D],
    d_bias [V], d_value_weight [D], d_value_bias [1])`` in the accumulation dtype, None where
    ``needs`` (same order) is false or the input is absent.

    ``lse`` may be the logsumexp over the FULL vocabulary (vocabulary-parallel backward): the
    softmax of these rows is then ``exp(z - lse)`` and a target outside them gives only that
    ``-softmax`` term. ``grad_logp`` or ``grad_rewards`` may be None (no gradient from it).
    """
    need_hidden, need_weight, need_bias, need_value_weight, need_value_bias = needs
    acc = lse.dtype
    n, device = hidden2d.shape[0], lse.device
    d_hidden = torch.zeros(hidden2d.shape, dtype=acc, device=device) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None
    d_bias = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_bias and bias is not None else None
    if grad_logp is not None and (need_hidden or need_weight or d_bias is not None):
        weight_acc = weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        in_shard, local = local_targets(targets, ignore_index, vocab_start, weight.shape[0])
        grad = torch.where(targets != ignore_index, grad_logp.to(acc), torch.zeros((), dtype=acc, device=device))
        target_grad = torch.where(in_shard, grad, torch.zeros((), dtype=acc, device=device))
        chunk_rows = _chunk_rows(chunk_rows, weight.shape[0])
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            h = hidden2d[rows].to(acc)
            z, tanh = _chunk_logits(h, weight_acc, bias_acc, temperature, softcap, keep_tanh=True)
            # dz_j = g * (1[j = y] - softmax_j); chained through 1/temperature and softcap.
            dz = z.sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])
            dz.scatter_add_(1, local[rows, None], target_grad[rows, None])
            dx = dz.div_(temperature) if temperature != 1.0 else dz
            if softcap is not None:
                dx.mul_(tanh.square_().neg_().add_(1.0))
            if need_hidden:
                d_hidden[rows] = dx @ weight_acc
            if need_weight:
                d_weight.addmm_(dx.T, h)
            if d_bias is not None:
                d_bias += dx.sum(0)
            del z, tanh, dz, dx
    d_value_weight = d_value_bias = None
    if grad_rewards is not None and value_weight is not None:
        grad_rewards = grad_rewards.to(acc)
        if need_hidden:
            d_hidden.addr_(grad_rewards, value_weight.reshape(-1).to(acc))
        if need_value_weight:
            d_value_weight = grad_rewards @ hidden2d.to(acc)
        if need_value_bias:
            d_value_bias = grad_rewards.sum().reshape(1)
    return d_hidden, d_weight, d_bias, d_value_weight, d_value_bias


def cast_grad(grad, like):
    """An accumulator -> the gradient of ``like`` (its dtype and shape); None stays None."""
    return None if grad is None else grad.to(like.dtype).reshape(like.shape)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Row-chunked log-prob gather; saves only ``lse [N]`` and recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, ignore_index, chunk_rows):
        options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, chunk_rows=chunk_rows)
        logp, _, lse = forward_launch(hidden, weight, bias, targets, None, None, **options)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options = options
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3]) + (False, False)
        d_hidden, d_weight, d_bias, _, _ = backward_launch(
            grad_logp, None, hidden, weight, bias, targets, None, lse, needs=needs, **ctx.options
        )
        return cast_grad(d_hidden, hidden), cast_grad(d_weight, weight), cast_grad(d_bias, bias), None, None, None, None, None


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
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, temperature, softcap, ignore_index, chunk_rows)


def linear_logprobs_auto_reference(hidden, weight, targets, bias, temperature, softcap, ignore_index):
    """``backend="reference"``: the naive oracle on small inputs, the chunked path on large ones."""
    if hidden.shape[0] * weight.shape[0] > CHUNKED_ABOVE:
        return linear_logprobs_chunked(hidden, weight, targets, bias, temperature, softcap, ignore_index)
    return linear_logprobs_reference(hidden, weight, targets, bias, temperature, softcap, ignore_index)
