"""Triton kernels for op (3), the ICRM consistency loss, padded or packed (``cu_seqlens``).

Math (docs/math.md), per row/segment s with sign ``sigma`` and detached baseline ``b``::

    d_t = sigmoid(sigma * (r_t - b))
    log:      l_t = -(log(d_t + eps) * sg(d_{t+1}) + sg(d_t) * log(d_{t+1} + eps)) / 2
    log_nosg: l_t = -(log(d_t + eps) + log(d_{t+1} + eps)) / 2
    product:  l_t = 1 - d_t * d_{t+1}
    squared:  l_t = (r_{t+1} - r_t)^2
    per-pair  p_t = w_t * m_t * l_t;  sum = sum p_t;  mean = sum / (sum m_t + 1e-6)

    dr_t = c_t * dl_t/dr_t + c_{t-1} * dl_{t-1}/dr_t,   c_t = dL/dp_t * w_t * m_t
    with dl/dd through the non-stop-gradient terms only and dd_t/dr_t = sigma * d_t * (1 - d_t).

Both kernels run one program per row (padded) or segment (packed) and walk it in blocks of
``BLOCK`` positions. A row/segment is addressed by ``(reward base, pair base, length)``:
padded row s is ``(s*T, s*(T-1), T)`` with T-1 pair slots, packed segment s is
``(cu[s], cu[s], cu[s+1] - cu[s])`` with one pair slot per position (the last one, which would
leave the segment, is always 0). The forward writes each program's partial ``sum p`` and
``sum m``; torch sums those ``[S]`` partials, so the reduction is deterministic (no atomics).
The per-pair terms are fp32 like the reference's, but the sums run in fp64 and are rounded to
fp32 once: a scalar of a few thousand pairs would otherwise be off by an fp32 ulp of the total,
more than the three-way rule allows over an eager sum that happens to round well.
The backward gives each position to exactly one program, which recomputes the two pairs the
position belongs to, (t-1, t) and (t, t+1): no atomics there either.

Block size: ``BLOCK`` = 512 positions with 8 warps on every GPU and dtype, i.e. two positions
per thread (a bandwidth-bound 1-D stream; one row of a typical batch is a few blocks); 64 under
the interpreter so tests cross blocks. Two per thread because each position holds int64
offsets, three rewards and two pair factors (backward) or two fp64 running sums (forward), and
at four or eight per thread ptxas spilled 8-16 bytes: the sm_90 fp32 forward at 1024 x 4 warps
(Triton 3.9), an fp32 backward at 1024 x 8 warps (sm_80/86/89 with Triton 3.9, sm_90 with 3.6),
at 512 x 4 (sm_86/89) and 256 x 2 (sm_89), and the bf16 forward at 2048 x 16 (all Triton 3.9).
Every two-per-thread config, 256 x 4, 512 x 8 and 1024 x 16, compiles for sm_80/86/89/90 with
no spill under Triton 3.6 and 3.9 (512 x 8: at most 40 registers); tests/gpu_compile.py fails
on any spill. ``ICRM_KERNELS_AUTOTUNE=1`` tunes over those three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..linear_logprobs import kernels as _linear_kernels
from ..linear_logprobs.kernels import _empty
from .reference import MEAN_EPS

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pair_terms(r_t, r_next, sign, baseline, eps, KIND: tl.constexpr):
    """Per-pair loss ``l_t`` and its derivatives ``dl/dr_t``, ``dl/dr_{t+1}`` (fp32)."""
    if KIND == "squared":
        diff = r_next - r_t
        return diff * diff, -2.0 * diff, 2.0 * diff
    d_t = tl.sigmoid(sign * (r_t - baseline))
    d_next = tl.sigmoid(sign * (r_next - baseline))
    if KIND == "log":
        loss = -(tl.log(d_t + eps) * d_next + d_t * tl.log(d_next + eps)) * 0.5
        dl_dd_t = -0.5 * d_next / (d_t + eps)
        dl_dd_next = -0.5 * d_t / (d_next + eps)
    elif KIND == "log_nosg":
        loss = -(tl.log(d_t + eps) + tl.log(d_next + eps)) * 0.5
        dl_dd_t = -0.5 / (d_t + eps)
        dl_dd_next = -0.5 / (d_next + eps)
    else:  # product
        loss = 1.0 - d_t * d_next
        dl_dd_t = -d_next
        dl_dd_next = -d_t
    return loss, dl_dd_t * sign * d_t * (1.0 - d_t), dl_dd_next * sign * d_next * (1.0 - d_next)


@triton.jit
def _segment(cu_seqlens_ptr, seg, T, PACKED: tl.constexpr):
    """``(reward base, pair base, length)`` of row/segment ``seg`` (int64)."""
    if PACKED:
        start = tl.load(cu_seqlens_ptr + seg)
        return start, start, tl.load(cu_seqlens_ptr + seg + 1) - start
    return seg * T, seg * (T - 1), seg * 0 + T


@triton.jit
def _forward_kernel(
    rewards_ptr, weights_ptr, mask_ptr, baseline_ptr, sign_ptr, cu_seqlens_ptr,
    per_pair_ptr, loss_partial_ptr, mask_partial_ptr,
    T, eps,
    KIND: tl.constexpr, PACKED: tl.constexpr, STORE_PER_PAIR: tl.constexpr, BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    r_base, p_base, length = _segment(cu_seqlens_ptr, seg, T, PACKED)
    # Pair slots: one per position when packed, T - 1 per padded row.
    if PACKED:
        slots = length
    else:
        slots = length - 1
    baseline = tl.load(baseline_ptr + seg).to(tl.float32)
    sign = tl.load(sign_ptr + seg).to(tl.float32)
    loss_acc = tl.zeros((BLOCK,), dtype=tl.float64)
    mask_acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for t0 in range(0, slots, BLOCK):
        t = t0 + tl.arange(0, BLOCK).to(tl.int64)
        is_pair = t < length - 1
        r_t = tl.load(rewards_ptr + r_base + t, mask=is_pair, other=0.0).to(tl.float32)
        r_next = tl.load(rewards_ptr + r_base + t + 1, mask=is_pair, other=0.0).to(tl.float32)
        w = tl.load(weights_ptr + p_base + t, mask=is_pair, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + p_base + t, mask=is_pair, other=0).to(tl.float32)
        loss, _, _ = _pair_terms(r_t, r_next, sign, baseline, eps, KIND)
        per_pair = tl.where(is_pair, w * m * loss, 0.0)
        if STORE_PER_PAIR:
            tl.store(per_pair_ptr + p_base + t, per_pair, mask=t < slots)
        loss_acc += per_pair.to(tl.float64)
        mask_acc += m.to(tl.float64)
    tl.store(loss_partial_ptr + seg, tl.sum(loss_acc, axis=0))
    tl.store(mask_partial_ptr + seg, tl.sum(mask_acc, axis=0))


@triton.jit
def _backward_kernel(
    rewards_ptr, weights_ptr, mask_ptr, baseline_ptr, sign_ptr, cu_seqlens_ptr,
    grad_ptr, grad_stride, d_rewards_ptr,
    T, eps,
    KIND: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    r_base, p_base, length = _segment(cu_seqlens_ptr, seg, T, PACKED)
    baseline = tl.load(baseline_ptr + seg).to(tl.float32)
    sign = tl.load(sign_ptr + seg).to(tl.float32)
    for t0 in range(0, length, BLOCK):
        t = t0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = t < length
        starts_pair = t < length - 1  # pair (t, t+1)
        ends_pair = (t >= 1) & inside  # pair (t-1, t)
        r_t = tl.load(rewards_ptr + r_base + t, mask=inside, other=0.0).to(tl.float32)
        r_next = tl.load(rewards_ptr + r_base + t + 1, mask=starts_pair, other=0.0).to(tl.float32)
        r_prev = tl.load(rewards_ptr + r_base + t - 1, mask=ends_pair, other=0.0).to(tl.float32)
        c_start = (
            tl.load(grad_ptr + (p_base + t) * grad_stride, mask=starts_pair, other=0.0).to(tl.float32)
            * tl.load(weights_ptr + p_base + t, mask=starts_pair, other=0.0).to(tl.float32)
            * tl.load(mask_ptr + p_base + t, mask=starts_pair, other=0).to(tl.float32)
        )
        c_end = (
            tl.load(grad_ptr + (p_base + t - 1) * grad_stride, mask=ends_pair, other=0.0).to(tl.float32)
            * tl.load(weights_ptr + p_base + t - 1, mask=ends_pair, other=0.0).to(tl.float32)
            * tl.load(mask_ptr + p_base + t - 1, mask=ends_pair, other=0).to(tl.float32)
        )
        _, dl_start, _ = _pair_terms(r_t, r_next, sign, baseline, eps, KIND)
        _, _, dl_end = _pair_terms(r_prev, r_t, sign, baseline, eps, KIND)
        d_r = tl.where(starts_pair, c_start * dl_start, 0.0) + tl.where(ends_pair, c_end * dl_end, 0.0)
        tl.store(d_rewards_ptr + r_base + t, d_r.to(d_rewards_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

#: Positions per block: the same on every GPU architecture, small under the interpreter. Two
#: positions per thread (BLOCK = 64 * num_warps) in every config: more spills (module doc).
_BLOCK_GPU, _BLOCK_INTERPRETER, _NUM_WARPS = 512, 64, 8
_AUTOTUNE_CONFIGS = [triton.Config({"BLOCK": 64 * w}, num_warps=w) for w in (4, 8, 16)]

# With ICRM_KERNELS_AUTOTUNE=1, on CUDA only (the interpreter takes the fixed block). Every
# output is written, not accumulated, so trial runs need no reset.
_forward_tuned = _backward_tuned = None
if _dispatch.AUTOTUNE:
    _forward_tuned = triton.autotune(_AUTOTUNE_CONFIGS, key=["T", "KIND", "PACKED"])(_forward_kernel)
    _backward_tuned = triton.autotune(_AUTOTUNE_CONFIGS, key=["T", "KIND", "PACKED"])(_backward_kernel)


def _kernel_and_config(fixed, tuned, device: torch.device):
    if tuned is not None and device.type == "cuda":
        return tuned, {}
    interpreter = _linear_kernels._arch_key(device) == "interpreter"
    return fixed, dict(BLOCK=_BLOCK_INTERPRETER if interpreter else _BLOCK_GPU, num_warps=_NUM_WARPS)


def _as_loadable(mask: torch.Tensor) -> torch.Tensor:
    # bool as its bytes (zero-copy): the kernels read masks as numbers.
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _Problem:
    """Contiguous inputs and the launch geometry shared by forward and backward."""

    def __init__(self, rewards, weights, mask, baseline, sign, cu_seqlens):
        self.rewards, self.weights = rewards.contiguous(), weights.contiguous()
        self.mask, self.baseline, self.sign = _as_loadable(mask), baseline.contiguous(), sign.contiguous()
        self.cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
        self.packed = cu_seqlens is not None
        self.num_segments = baseline.shape[0]
        self.T = 0 if self.packed else rewards.shape[1]

    def args(self):
        return self.rewards, self.weights, self.mask, self.baseline, self.sign, self.cu_seqlens


def _forward_launch(problem: _Problem, kind: str, eps: float, store_per_pair: bool):
    """``(per_pair [fp32] or None, loss_partial [S], mask_partial [S] [fp64])``."""
    device = problem.rewards.device
    per_pair = _empty(problem.weights.shape, torch.float32, device) if store_per_pair else None
    loss_partial = _empty((problem.num_segments,), torch.float64, device)
    mask_partial = _empty((problem.num_segments,), torch.float64, device)
    if problem.num_segments > 0:
        kernel, config = _kernel_and_config(_forward_kernel, _forward_tuned, device)
        kernel[(problem.num_segments,)](
            *problem.args(), per_pair, loss_partial, mask_partial, problem.T, eps,
            KIND=kind, PACKED=problem.packed, STORE_PER_PAIR=store_per_pair, **config,
        )
    return per_pair, loss_partial, mask_partial


def _backward_launch(problem: _Problem, kind: str, eps: float, grad: torch.Tensor, grad_stride: int):
    d_rewards = _empty(problem.rewards.shape, problem.rewards.dtype, problem.rewards.device)
    if problem.num_segments > 0:
        kernel, config = _kernel_and_config(_backward_kernel, _backward_tuned, problem.rewards.device)
        kernel[(problem.num_segments,)](
            *problem.args(), grad, grad_stride, d_rewards, problem.T, eps,
            KIND=kind, PACKED=problem.packed, **config,
        )
    return d_rewards


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def loss_forward(rewards, weights, mask, baseline, sign, cu_seqlens, kind: str, eps: float, reduction: str):
    """``(loss, mask_total)``: fp32 loss (a scalar for ``mean``/``sum``, the per-pair ``w*m*l``
    for ``none``) and the fp64 ``sum(mask)`` the ``mean`` backward needs (None for ``none``)."""
    problem = _Problem(rewards, weights, mask, baseline, sign, cu_seqlens)
    per_pair, loss_partial, mask_partial = _forward_launch(problem, kind, eps, store_per_pair=reduction == "none")
    if reduction == "none":
        return per_pair, None
    out = loss_partial.sum()
    mask_total = mask_partial.sum()
    if reduction == "mean":
        out = out / (mask_total + MEAN_EPS)
    return out.to(torch.float32), mask_total


def loss_backward(grad_out, rewards, weights, mask, baseline, sign, cu_seqlens, mask_total, kind: str, eps: float,
                  reduction: str) -> torch.Tensor:
    """``d_rewards`` (rewards' shape and dtype) from the loss's gradient ``grad_out``."""
    problem = _Problem(rewards, weights, mask, baseline, sign, cu_seqlens)
    if reduction == "none":
        grad, grad_stride = grad_out.contiguous().to(torch.float32), 1
    else:
        grad, grad_stride = grad_out.reshape(1).to(torch.float32), 0
        if reduction == "mean":
            grad = grad / (mask_total + MEAN_EPS)
    return _backward_launch(problem, kind, eps, grad, grad_stride)


class _ConsistencyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction):
        out, mask_total = loss_forward(rewards, weights, mask, baseline, sign, cu_seqlens, kind, eps, reduction)
        ctx.save_for_backward(rewards, weights, mask, baseline, sign, cu_seqlens, mask_total)
        ctx.kind, ctx.eps, ctx.reduction = kind, eps, reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        d_rewards = loss_backward(grad_out, *ctx.saved_tensors, ctx.kind, ctx.eps, ctx.reduction)
        return (d_rewards,) + (None,) * 8


def consistency_loss_triton(rewards, weights, mask, baseline, sign, kind, eps, reduction, cu_seqlens):
    """Padded: rewards [S, T], weights/mask [S, T-1]; packed (cu_seqlens [S+1] int64):
    rewards/weights/mask [N]. baseline/sign [S]. Returns fp32: a scalar for ``mean``/``sum``,
    the per-pair ``w*m*l`` shaped like ``weights`` for ``none``. Inputs are validated by the
    caller; the gradient reaches ``rewards`` only (``weights`` and ``baseline`` are constants)."""
    return _ConsistencyLossFunction.apply(
        rewards, weights.detach(), mask.detach(), baseline.detach(), sign.detach(), cu_seqlens, kind, float(eps), reduction
    )
