"""Vocabulary-parallel ``linear_logprobs_and_rewards``: the LM head's rows sharded over the ranks.

    torchrun --nproc_per_node 2 examples/vocab_parallel.py            # CPU (gloo)
    torchrun --nproc_per_node 8 examples/vocab_parallel.py --vocab 128256 --dim 2048   # GPUs (NCCL)

Every rank holds ``V / world`` rows of the head (the last rank takes the remainder), the same
hidden states and the same global targets; each gets the full-vocabulary log-probs and the
gradient of its own rows. Rank 0 checks the result against the unsharded head.
"""

import argparse
import os

import torch
import torch.distributed as dist

import icrm_kernels as ik


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")

    torch.manual_seed(0)  # the same full problem on every rank
    hidden = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    weight = torch.randn(args.vocab, args.dim, device=device) / args.dim**0.5
    value_weight = torch.randn(args.dim, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    per_rank = args.vocab // world
    rows = slice(rank * per_rank, args.vocab if rank == world - 1 else (rank + 1) * per_rank)
    shard = weight[rows].clone().requires_grad_()

    logp, rewards = ik.linear_logprobs_and_rewards(hidden, shard, targets, value_weight, process_group=dist.group.WORLD)
    (logp.sum() + rewards.sum()).backward()

    full_weight = weight.clone().requires_grad_()
    full_hidden = hidden.detach().clone().requires_grad_()
    full_logp, _ = ik.linear_logprobs_and_rewards(full_hidden, full_weight, targets, value_weight.detach())
    full_logp.sum().backward()
    errors = torch.stack([(logp - full_logp).abs().max(), (shard.grad - full_weight.grad[rows]).abs().max()])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"{world} ranks, V = {args.vocab} ({per_rank} rows each): max |logp - unsharded| = {errors[0]:.2e}, "
              f"max |d_weight shard - unsharded| = {errors[1]:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
