"""Op (3), the ICRM weighted adjacent-difference consistency loss, padded or packed.

* ``reference.py``: plain PyTorch (autograd backward), the oracle and CPU path.
* ``kernels.py``: one Triton program per row/segment, with a hand-written backward.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._validate import check_choice, check_cu_seqlens, check_same_device, check_same_dtype, check_shape, check_tensor
from .reference import KINDS, REDUCTIONS, consistency_loss_packed_reference, consistency_loss_reference

__all__ = ["consistency_loss", "ConsistencyLoss", "KINDS", "REDUCTIONS"]


def _check_inputs(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens):
    # Under torch.compile the value checks of sign and cu_seqlens are skipped: they sync with the host.
    compiling = torch.compiler.is_compiling()
    check_tensor("rewards", rewards, floating=True)
    check_tensor("weights", weights, floating=True)
    check_tensor("mask", mask)
    check_tensor("baseline", baseline, floating=True)
    check_tensor("sign", sign)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards must have shape [S, T] (padded form; pass cu_seqlens for packed [N]), got {tuple(rewards.shape)}")
        num_rows, length = rewards.shape
        pairs = [num_rows, max(length - 1, 0)]
        check_shape("weights", weights, pairs, "[S, T-1]: entry t weighs the pair (t, t+1)")
        check_shape("mask", mask, pairs, "[S, T-1], the same shape as weights")
    else:
        if rewards.dim() != 1:
            raise ValueError(f"rewards must have shape [N] in the packed form (cu_seqlens given), got {tuple(rewards.shape)}")
        total = rewards.shape[0]
        check_shape("weights", weights, [total], "[N]: entry i weighs the pair (i, i+1)")
        check_shape("mask", mask, [total], "[N], the same shape as weights")
        cu_seqlens = cu_seqlens.to(torch.int64) if compiling else check_cu_seqlens(cu_seqlens, total)
        num_rows = cu_seqlens.shape[0] - 1
    what = "one per row" if cu_seqlens is None else "one per segment, S = len(cu_seqlens) - 1"
    check_shape("baseline", baseline, [num_rows], what)
    check_shape("sign", sign, [num_rows], what)
    if sign.numel() and not compiling and not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError(f"sign must hold only +1 (chosen) and -1 (rejected), got values {torch.unique(sign).tolist()[:6]}")
    check_same_dtype("rewards", rewards, weights=weights, baseline=baseline)
    check_same_device("rewards", rewards, weights=weights, mask=mask, baseline=baseline, sign=sign, cu_seqlens=cu_seqlens)
    return cu_seqlens


def consistency_loss(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    baseline: torch.Tensor,
    sign: torch.Tensor,
    *,
    kind: str = "log",
    eps: float = 1e-6,
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """ICRM consistency loss between adjacent per-token rewards.

    Padded form: ``rewards [S, T]``, ``weights [S, T-1]``, ``mask [S, T-1]`` (entry t is the
    pair (t, t+1)), ``baseline [S]``, ``sign [S]`` (+1 chosen, -1 rejected).
    Packed form (``cu_seqlens [S+1]`` given): ``rewards``, ``weights``, ``mask`` are ``[N]``
    and entry i is the pair (i, i+1); a pair leaving its segment never counts.

    ``weights`` and ``baseline`` are treated as constants (detached). ``mask`` may be bool or
    numeric. ``kind``: ``log | log_nosg | product | squared`` (docs/math.md).
    ``reduction``: ``mean`` = ``sum(w*m*l) / (sum(m) + 1e-6)``, ``sum``, or ``none`` (the
    per-pair ``w*m*l``, shaped like ``weights``). Returns float32 (float64 for float64 input);
    the gradient reaches ``rewards`` only.
    """
    cu_seqlens = _check_inputs(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens)
    eps = float(eps)
    if _dispatch.select_backend(backend, rewards) == "triton":
        if torch.compiler.is_compiling():
            from .._custom_ops import consistency_loss_op

            return consistency_loss_op(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens)
        from .kernels import consistency_loss_triton

        return consistency_loss_triton(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens)
    if cu_seqlens is None:
        return consistency_loss_reference(rewards, weights, mask, baseline, sign, kind, eps, reduction)
    return consistency_loss_packed_reference(rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction)


class ConsistencyLoss(torch.nn.Module):
    """Module form of :func:`consistency_loss` with the options fixed at construction."""

    def __init__(self, kind: str = "log", eps: float = 1e-6, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kind, self.eps, self.reduction, self.backend = kind, eps, reduction, backend

    def forward(self, rewards, weights, mask, baseline, sign, cu_seqlens=None):
        return consistency_loss(
            rewards, weights, mask, baseline, sign,
            kind=self.kind, eps=self.eps, reduction=self.reduction, cu_seqlens=cu_seqlens, backend=self.backend,
        )
