"""Plain-PyTorch ICRM consistency loss (docs/math.md, op 3): the test oracle and the CPU path.

For a row with sign ``s`` (+1 chosen, -1 rejected) and detached baseline ``b``:
``d_t = sigmoid(s * (r_t - b))`` and, per adjacent pair ``(t, t+1)``,

* ``log``:      ``-(log(d_t + eps) * sg(d_{t+1}) + sg(d_t) * log(d_{t+1} + eps)) / 2``
* ``log_nosg``: ``-(log(d_t + eps) + log(d_{t+1} + eps)) / 2``
* ``product``:  ``1 - d_t * d_{t+1}``
* ``squared``:  ``(r_{t+1} - r_t) ** 2``

weighted by the detached ``weights`` and the ``mask``; ``mean`` reduces to
``sum(w * m * l) / (sum(m) + 1e-6)``. Autograd does the backward; ``sg`` is ``.detach()``.
"""

from __future__ import annotations

import torch

KINDS = ("log", "log_nosg", "product", "squared")
REDUCTIONS = ("mean", "sum", "none")
#: The spec's fixed normalizer guard in ``mean`` (distinct from the loss's ``eps``).
MEAN_EPS = 1e-6


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_loss(d_t, d_next, r_t, r_next, kind: str, eps: float) -> torch.Tensor:
    """Per-pair loss ``l_t`` of the given kind (all arguments broadcast together)."""
    if kind == "log":
        return -(torch.log(d_t + eps) * d_next.detach() + d_t.detach() * torch.log(d_next + eps)) / 2
    if kind == "log_nosg":
        return -(torch.log(d_t + eps) + torch.log(d_next + eps)) / 2
    if kind == "product":
        return 1 - d_t * d_next
    if kind == "squared":
        return (r_next - r_t) ** 2
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _reduce(per_pair: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    return per_pair.sum() / (mask.sum() + MEAN_EPS)


def consistency_loss_reference(rewards, weights, mask, baseline, sign, kind="log", eps=1e-6, reduction="mean"):
    """Padded form: rewards [S, T], weights/mask [S, T-1], baseline/sign [S]."""
    acc = _accumulate_dtype(rewards.dtype)
    r = rewards.to(acc)
    d = torch.sigmoid(sign.to(acc)[:, None] * (r - baseline.detach().to(acc)[:, None]))
    loss = pair_loss(d[:, :-1], d[:, 1:], r[:, :-1], r[:, 1:], kind, eps)
    m = mask.to(acc)
    return _reduce(weights.detach().to(acc) * m * loss, m, reduction)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[N]`` index of the segment each packed position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def consistency_loss_packed_reference(
    rewards, weights, mask, baseline, sign, cu_seqlens, kind="log", eps=1e-6, reduction="mean"
):
    """Packed form: rewards/weights/mask [N], cu_seqlens [S+1], baseline/sign [S].

    Entry i is the pair (i, i+1); the pair leaving a segment (its last position) never counts.
    """
    acc = _accumulate_dtype(rewards.dtype)
    n = rewards.shape[0]
    seg = segment_ids(cu_seqlens, n)
    r = rewards.to(acc)
    d = torch.sigmoid(sign.to(acc)[seg] * (r - baseline.detach().to(acc)[seg]))
    inside = torch.zeros(n, dtype=torch.bool, device=rewards.device)
    inside[:-1] = seg[:-1] == seg[1:]
    # Position N-1 has no successor; pair it with itself and mask it out below.
    d_next = torch.cat([d[1:], d[-1:]])
    r_next = torch.cat([r[1:], r[-1:]])
    loss = torch.where(inside, pair_loss(d, d_next, r, r_next, kind, eps), torch.zeros((), dtype=acc, device=r.device))
    m = mask.to(acc) * inside
    return _reduce(weights.detach().to(acc) * m * loss, m, reduction)
