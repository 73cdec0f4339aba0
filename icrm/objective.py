"""The ICRM objective (ICRM_SPEC.md, the authors' ``pair_taorm`` stage) on per-token tensors.

``L = L_sft + reg_ratio * L_align + (1 - reg_ratio) * L_bt``. ``reg_ratio=0`` is GRM
(Bradley-Terry + the SFT regularizer); ``reg_ratio=0`` with ``sft_logprobs=None`` is plain
Bradley-Terry. The consistency term runs on ``icrm_kernels.consistency_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from icrm_kernels import consistency_loss

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


def last_label_index(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[R]`` position of each row's last label token (the reward is read there)."""
    positions = torch.arange(labels.shape[1], device=labels.device)
    valid = labels != ignore_index
    if not bool(valid.any(dim=1).all()):
        raise ValueError("labels: every row needs at least one label token (!= -100)")
    return torch.where(valid, positions, -1).amax(dim=1)


def sequence_rewards(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``R = r[last label token]`` per row; equals HF's last non-pad token with right padding."""
    index = last_label_index(labels)
    return rewards.gather(1, index[:, None]).squeeze(1)


def pair_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """``loss_mask`` with the first response pair of each row (prompt/response straddle) dropped."""
    first = loss_mask & (loss_mask.long().cumsum(dim=1) == 1)
    return loss_mask & ~first


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
    backend: str = "auto",
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
        reg_ratio, weight_scale, kind, baseline, eps: ICRM_SPEC.md.
        margin: optional ``[B]`` TRL margin: ``L_bt = mean -logsigmoid(R_c - R_r - margin)``.
        center_rewards_coefficient: optional TRL term ``coef * mean((R_c + R_r)^2)``, added to ``loss``.
        backend: ``icrm_kernels`` backend of the consistency op.

    Returns:
        :class:`ICRMLoss` (``omega`` detached; ``smooth_weight`` is S' when training, else S).
    """
    if rewards.dim() != 2 or rewards.shape[0] % 2:
        raise ValueError(f"rewards must have shape [2B, T] (chosen rows first), got {tuple(rewards.shape)}")
    if labels.shape != rewards.shape:
        raise ValueError(f"labels must have the shape of rewards {tuple(rewards.shape)}, got {tuple(labels.shape)}")
    pairs_shape = (rewards.shape[0], rewards.shape[1] - 1)
    for name, t in (("gen_logprobs", gen_logprobs), ("sft_logprobs", sft_logprobs)):
        if t is not None and tuple(t.shape) != pairs_shape:
            raise ValueError(f"{name} must have shape [2B, T-1] = {pairs_shape}, got {tuple(t.shape)}")
    if gen_logprobs is None and reg_ratio != 0:
        raise ValueError(f"gen_logprobs is required when reg_ratio != 0 (got reg_ratio={reg_ratio})")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if not (0.0 <= reg_ratio <= 1.0):
        raise ValueError(f"reg_ratio must lie in [0, 1], got {reg_ratio}")

    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    rewards = rewards.to(acc)
    num_pairs = rewards.shape[0] // 2
    zero = rewards.new_zeros(())

    # Bradley-Terry on the reward at the last label token.
    seq = sequence_rewards(rewards, labels)
    diff = seq[:num_pairs] - seq[num_pairs:]
    if margin is not None:
        diff = diff - margin.to(diff)
    bt_loss = -F.logsigmoid(diff).mean()

    # Consistency between adjacent per-token rewards.
    loss_mask = labels[:, 1:] != IGNORE_INDEX
    if gen_logprobs is not None:
        m = pair_mask(loss_mask)
        weights = weight_scale * torch.exp(gen_logprobs.detach().to(acc))
        other = torch.cat([torch.arange(num_pairs, 2 * num_pairs), torch.arange(num_pairs)]).to(rewards.device)
        detached = rewards.detach()
        if baseline == "row_mean":
            row_baseline = detached.mean(dim=1)
        else:
            on_response = (labels != IGNORE_INDEX).to(acc)
            row_baseline = (detached * on_response).sum(dim=1) / on_response.sum(dim=1)
        base = row_baseline[other]
        sign = torch.cat([rewards.new_ones(num_pairs), -rewards.new_ones(num_pairs)])
        cons_loss = consistency_loss(rewards, weights, m, base, sign, kind=kind, eps=eps, reduction="mean", backend=backend)
        d = torch.sigmoid(sign[:, None] * (detached - base[:, None]))
        mf = m.to(acc)
        omega = (((d[:, :-1] + d[:, 1:]) / 2) * weights * mf).sum() / (mf.sum() + MEAN_EPS)
    else:
        cons_loss, omega = zero, zero
    new_smooth = EMA_DECAY * smooth_weight + (1 - EMA_DECAY) * float(omega) if training and gen_logprobs is not None else smooth_weight
    align_loss = cons_loss / (new_smooth + MEAN_EPS)

    # GRM SFT regularizer on the chosen rows (the backbone-gradient scale lives in the model).
    if sft_logprobs is not None:
        chosen_mask = loss_mask[:num_pairs].to(acc)
        per_row = (sft_logprobs[:num_pairs].to(acc) * chosen_mask).sum(dim=1) / chosen_mask.sum(dim=1).clamp_min(1.0)
        sft_loss = -per_row.mean()
    else:
        sft_loss = zero

    loss = sft_loss + reg_ratio * align_loss + (1 - reg_ratio) * bt_loss
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((seq[:num_pairs] + seq[num_pairs:]) ** 2).mean()
    return ICRMLoss(loss, bt_loss, align_loss, sft_loss, omega.detach(), float(new_smooth), seq.detach())
