"""Tiny tour of the three public ops on random CPU tensors (no downloads, a second or two)."""

import torch

import icrm_kernels as ik


def main() -> None:
    torch.manual_seed(0)
    n, d, v = 12, 32, 500
    hidden = torch.randn(n, d, requires_grad=True)
    lm_weight = (torch.randn(v, d) / d**0.5).requires_grad_(True)
    value_weight = torch.zeros(1, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[:3] = -100  # prompt tokens: no log-prob, no gradient

    logprobs, rewards = ik.linear_logprobs_and_rewards(hidden, lm_weight, targets, value_weight, softcap=30.0)
    print("log-probs     ", [round(x, 3) for x in logprobs.tolist()])

    rows = rewards.view(2, 6)  # two sequences of 6 tokens: chosen, rejected
    weights = 2.0 * logprobs.view(2, 6)[:, 1:].detach().exp()
    mask = targets.view(2, 6)[:, 1:] != -100
    baseline = rows.detach().mean(1).flip(0)  # each row against the other row's mean reward
    loss = ik.consistency_loss(rows, weights, mask, baseline, torch.tensor([1.0, -1.0]))
    (loss - logprobs.sum() / 9).backward()
    print("consistency loss", round(loss.item(), 5))
    print("grad norms     hidden %.4f  lm_weight %.4f  value_weight %.4f" % (hidden.grad.norm(), lm_weight.grad.norm(), value_weight.grad.norm()))


if __name__ == "__main__":
    main()
