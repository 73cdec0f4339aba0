"""The ICRM objective (docs/math.md, the authors' ``pair_taorm`` stage) on per-token tensors.

``L = L_sft + reg_ratio * L_align + (1 - reg_ratio) * L_bt``. ``reg_ratio=0`` is GRM
(Bradley-Terry + the SFT regularizer); ``reg_ratio=0`` with ``sft_logprobs=None`` is plain
Bradley-Terry. The consistency term runs on ``icrm_kernels.consistency_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icrm_kernels import consistency_loss
from icrm_kernels.consistency.reference import segment_ids

IGNORE_INDEX = -100
#: EMA of the consistency normalizer: ``S <- EMA_DECAY * S + (1 - EMA_DECAY) * omega``.
EMA_DECAY = 0.95
#: Initial value of the EMA ``S``.
INITIAL_SMOOTH_WEIGHT = 0.5
#: The spec's fixed guards in the normalizers (distinct from the loss's ``eps``).
MEAN_EPS = 1e-6
BASELINES = ("row_mean", "response_mean")


@dataclass
class ICRMLoss:
    loss: torch.Tensor
    bt_loss: torch.Tensor
    align_loss: torch.Tensor
    sft_loss: torch.Tensor
    omega: torch.Tensor
    smooth_weight: float
    #: ``R [2B]``: each row's reward at its last label token (chosen rows first).
    sequence_rewards: torch.Tensor | None = None


def packed_loss_mask(labels: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``[N]``: position i predicts a label token of its own segment (``labels[i+1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:-1] = (labels[1:] != IGNORE_INDEX) & (seg[1:] == seg[:-1])
    return mask


def pair_mask(loss_mask: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Packed ``loss_mask [N]`` with the first response pair of each segment (the one straddling
    prompt and response) dropped; ``seg [N]`` is the segment of each position."""
    running = loss_mask.long().cumsum(0)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    # Count of loss positions before each segment: running - mask, read at the segment's start.
    before = torch.zeros(int(seg.max()) + 1, dtype=torch.long, device=seg.device)
    before[seg[starts]] = running[starts] - loss_mask[starts].long()
    first = loss_mask & (running - before[seg] == 1)
    return loss_mask & ~first


def last_label_index(labels: torch.Tensor, seg: torch.Tensor | None = None, num_segments: int | None = None) -> torch.Tensor:
    """Position of each row's (``[S, T]``) or segment's (``[N]`` + ``seg``) last label token."""
    valid = labels != IGNORE_INDEX
    if seg is None:
        positions = torch.arange(labels.shape[1], device=labels.device)
        index = torch.where(valid, positions, -1).amax(dim=1)
    else:
        positions = torch.arange(labels.shape[0], device=labels.device)
        index = torch.full((num_segments,), -1, dtype=torch.long, device=labels.device)
        index = index.scatter_reduce(0, seg, torch.where(valid, positions, -1), reduce="amax")
    if bool((index < 0).any()):
        raise ValueError("labels: every row needs at least one label token (!= -100)")
    return index


def sequence_rewards(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``R = r[last label token]`` per row of ``[S, T]``; equals HF's last non-pad token with right padding."""
    index = last_label_index(labels)
    return rewards.gather(1, index[:, None]).squeeze(1)


def _segment_mean(values: torch.Tensor, weights: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    total = values.new_zeros(num_segments).index_add_(0, seg, values * weights)
    return total / values.new_zeros(num_segments).index_add_(0, seg, weights)


def icrm_loss(
    rewards: torch.Tensor,
    labels: torch.Tensor,
    gen_logprobs: torch.Tensor | None,
    sft_logprobs: torch.Tensor | None,
    *,
    smooth_weight: float,
    training: bool = True,
    reg_ratio: float = 0.1,
    weight_scale: float = 2.0,
    kind: str = "log",
    baseline: str = "row_mean",
    eps: float = 1e-6,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    uniform_weights: bool = False,
) -> ICRMLoss:
    """ICRM loss of one batch of ``B`` preference pairs stacked as ``2B`` rows, chosen first.

    Args:
        rewards: ``[2B, T]`` value-head reward at every position.
        labels: ``[2B, T]`` token ids on the response, -100 elsewhere.
        gen_logprobs: ``[2B, T-1]`` frozen generator's ``log p(labels[:, t+1])`` at position t
            (may be None when ``reg_ratio == 0``).
        sft_logprobs: ``[2B, T-1]`` the trained LM head's log-probs, same alignment; only the
            chosen rows are used. None: no SFT term.
        smooth_weight: the EMA ``S`` before this step (0.5 at the start of training).
        training: update ``S' = 0.95 S + 0.05 omega`` and divide by ``S'``; else divide by ``S``.
        reg_ratio, weight_scale, kind, baseline, eps: docs/math.md.
        margin: optional ``[B]`` TRL margin: ``L_bt = mean -logsigmoid(R_c - R_r - margin)``.
        center_rewards_coefficient: optional TRL term ``coef * mean((R_c + R_r)^2)``, added to ``loss``.
        cu_seqlens: packed (padding-free) form: ``[2B + 1]`` segment offsets, chosen segments
            first; ``rewards``, ``labels``, ``gen_logprobs`` and ``sft_logprobs`` are then ``[N]``
            and entry i of the log-probs is ``log p(labels[i+1])`` (ignored at segment ends).
            ``row_mean`` then averages a segment's own tokens (there is no padding).
        backend: ``icrm_kernels`` backend of the consistency op.
        uniform_weights: the ``icrm_uniform`` ablation: every pair weight is ``weight_scale``
            (as if the generator gave every token probability 1); ``gen_logprobs`` is then unused.

    Returns:
        :class:`ICRMLoss` (``omega`` detached; ``smooth_weight`` is S' when training, else S).
    """
    if gen_logprobs is None and reg_ratio != 0 and not uniform_weights:
        raise ValueError(f"gen_logprobs is required when reg_ratio != 0 (got reg_ratio={reg_ratio})")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if not (0.0 <= reg_ratio <= 1.0):
        raise ValueError(f"reg_ratio must lie in [0, 1], got {reg_ratio}")
    if cu_seqlens is None:
        rewards, labels, gen_logprobs, sft_logprobs, cu_seqlens = _flatten_padded(rewards, labels, gen_logprobs, sft_logprobs)
    else:
        _check_packed(rewards, labels, gen_logprobs, sft_logprobs, cu_seqlens)
    if uniform_weights and reg_ratio != 0:
        # exp(0) = 1: the consistency term with the generator's probabilities taken out.
        gen_logprobs = torch.zeros_like(rewards)

    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.to(acc)
    num_rows = cu_seqlens.numel() - 1
    num_pairs = num_rows // 2
    seg = segment_ids(cu_seqlens, rewards.shape[0])
    zero = rewards.new_zeros(())

    # Bradley-Terry on the reward at the last label token.
    seq = rewards[last_label_index(labels, seg, num_rows)]
    diff = seq[:num_pairs] - seq[num_pairs:]
    if margin is not None:
        diff = diff - margin.to(diff)
    bt_loss = -F.logsigmoid(diff).mean()

    # Consistency between adjacent per-token rewards (entry i is the pair (i, i+1)).
    loss_mask = packed_loss_mask(labels, seg)
    if gen_logprobs is not None:
        m = pair_mask(loss_mask, seg)
        weights = weight_scale * torch.exp(gen_logprobs.detach().to(acc))
        detached = rewards.detach()
        on_response = (labels != IGNORE_INDEX).to(acc)
        row_baseline = _segment_mean(detached, torch.ones_like(detached) if baseline == "row_mean" else on_response,
                                     seg, num_rows)
        other = torch.cat([torch.arange(num_pairs, num_rows), torch.arange(num_pairs)]).to(rewards.device)
        base = row_baseline[other]
        sign = torch.cat([rewards.new_ones(num_pairs), -rewards.new_ones(num_pairs)])
        cons_loss = consistency_loss(rewards, weights, m, base, sign, kind=kind, eps=eps, reduction="mean",
                                     cu_seqlens=cu_seqlens, backend=backend)
        d = torch.sigmoid(sign[seg] * (detached - base[seg]))
        d_next = torch.cat([d[1:], d[-1:]])  # the last entry is masked out (no successor)
        mf = m.to(acc)
        omega = ((d + d_next) / 2 * weights * mf).sum() / (mf.sum() + MEAN_EPS)
    else:
        cons_loss, omega = zero, zero
    new_smooth = EMA_DECAY * smooth_weight + (1 - EMA_DECAY) * float(omega) if training and gen_logprobs is not None else smooth_weight
    align_loss = cons_loss / (new_smooth + MEAN_EPS)

    # GRM SFT regularizer on the chosen rows (the backbone-gradient scale lives in the model).
    if sft_logprobs is not None:
        chosen = (seg < num_pairs).to(acc) * loss_mask.to(acc)
        token_sum = rewards.new_zeros(num_rows).index_add_(0, seg, sft_logprobs.to(acc) * chosen)[:num_pairs]
        count = rewards.new_zeros(num_rows).index_add_(0, seg, chosen)[:num_pairs]
        sft_loss = -(token_sum / count.clamp_min(1.0)).mean()
    else:
        sft_loss = zero

    loss = sft_loss + reg_ratio * align_loss + (1 - reg_ratio) * bt_loss
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((seq[:num_pairs] + seq[num_pairs:]) ** 2).mean()
    return ICRMLoss(loss, bt_loss, align_loss, sft_loss, omega.detach(), float(new_smooth), seq.detach())


def _flatten_padded(rewards, labels, gen_logprobs, sft_logprobs):
    """Padded ``[2B, T]`` inputs -> the packed form (one segment per row, padding included)."""
    if rewards.dim() != 2 or rewards.shape[0] % 2:
        raise ValueError(f"rewards must have shape [2B, T] (chosen rows first), got {tuple(rewards.shape)}")
    if labels.shape != rewards.shape:
        raise ValueError(f"labels must have the shape of rewards {tuple(rewards.shape)}, got {tuple(labels.shape)}")
    rows, length = rewards.shape
    flat = []
    for name, t in (("gen_logprobs", gen_logprobs), ("sft_logprobs", sft_logprobs)):
        if t is not None and tuple(t.shape) != (rows, length - 1):
            raise ValueError(f"{name} must have shape [2B, T-1] = {(rows, length - 1)}, got {tuple(t.shape)}")
        flat.append(None if t is None else F.pad(t, (0, 1)).reshape(-1))
    cu_seqlens = torch.arange(0, rows * length + 1, length, device=rewards.device)
    return rewards.reshape(-1), labels.reshape(-1), flat[0], flat[1], cu_seqlens


def _check_packed(rewards, labels, gen_logprobs, sft_logprobs, cu_seqlens):
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [N] in the packed form (cu_seqlens given), got {tuple(rewards.shape)}")
    if cu_seqlens.dim() != 1 or (cu_seqlens.numel() - 1) % 2 or cu_seqlens.numel() < 3:
        raise ValueError(f"cu_seqlens must have shape [2B + 1] (B >= 1 pairs), got {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != rewards.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to N = {rewards.shape[0]}, got {cu_seqlens.tolist()}")
    for name, t in (("labels", labels), ("gen_logprobs", gen_logprobs), ("sft_logprobs", sft_logprobs)):
        if t is not None and tuple(t.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} must have shape [N] = {tuple(rewards.shape)} in the packed form, got {tuple(t.shape)}")
