"""Vocabulary-parallel ``linear_logprobs`` (``process_group=``) on 2 and 4 gloo ranks.

Every rank builds the same full problem (fixed seed), keeps its contiguous shard of the LM
head's rows (uneven shard sizes), and runs the op on its shard. Its outputs and gradients
(``hidden``, its shard of ``weight`` and ``bias``, the replicated value head) must meet the
three-way rule against the float64 reference on the FULL head, sliced to the shard.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_three_way

import icrm_kernels as ik
from icrm_kernels.linear_logprobs import reference as ref

N, D = 13, 8
#: Uneven shard sizes per world size; V = their sum.
SHARDS = {2: [7, 10], 4: [5, 4, 6, 3]}
IGNORE = -100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, dtype, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for case in cases:
            _check_case(rank, world, backend, dtype, **case)
        _check_bad_target(rank, world)
        if dtype == torch.float32:
            _check_dtensor_weight(rank, world)
    finally:
        dist.destroy_process_group()


def _problem(world, seed, dtype, with_bias):
    """The full problem in float64, with targets on every shard boundary and ignored rows."""
    sizes = SHARDS[world]
    vocab = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, D, generator=g, dtype=torch.float64) / D**0.5
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    value_weight = torch.randn(D, generator=g, dtype=torch.float64)
    value_bias = torch.randn(1, generator=g, dtype=torch.float64)
    starts = [sum(sizes[:r]) for r in range(world)]
    boundary = sorted({t for s in starts for t in (s - 1, s) if 0 <= t < vocab} | {vocab - 1})
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[: len(boundary)] = torch.tensor(boundary)
    targets[-2:] = IGNORE
    grad_logp = torch.randn(N, generator=g, dtype=torch.float64)
    grad_rewards = torch.randn(N, generator=g, dtype=torch.float64)
    return sizes, starts, (hidden, weight, bias, value_weight, value_bias), targets, grad_logp, grad_rewards


def _run(inputs, targets, grad_logp, grad_rewards, dtype, options, rows=None, **kwargs):
    """Outputs and gradients of the op on ``inputs`` cast to ``dtype`` (weight/bias sliced to ``rows``)."""
    leaves = []
    for i, t in enumerate(inputs):
        if t is None:
            leaves.append(None)
            continue
        t = t[rows] if rows is not None and i in (1, 2) else t
        leaves.append(t.to(dtype, copy=True).requires_grad_())
    hidden, weight, bias, value_weight, value_bias = leaves
    logp, rewards = kwargs.pop("fn")(hidden, weight, targets, value_weight, bias, value_bias, options, **kwargs)
    (logp * grad_logp.to(logp.dtype) + rewards * grad_rewards.to(rewards.dtype)).sum().backward()
    names = ("hidden", "weight", "bias", "value_weight", "value_bias")
    grads = {f"d_{n}": t.grad for n, t in zip(names, leaves) if t is not None}
    return {"logp": logp.detach(), "rewards": rewards.detach(), **grads}


def _reference(hidden, weight, targets, value_weight, bias, value_bias, options):
    logp = ref.linear_logprobs_reference(hidden, weight, targets, bias, options["temperature"], options["softcap"], IGNORE)
    return logp, ref.rewards_reference(hidden, value_weight, value_bias)


def _public(hidden, weight, targets, value_weight, bias, value_bias, options, **kwargs):
    return ik.linear_logprobs_and_rewards(hidden, weight, targets, value_weight, bias=bias, value_bias=value_bias,
                                          ignore_index=IGNORE, **options, **kwargs)


def _check_case(rank, world, backend, dtype, seed, with_bias, temperature, softcap):
    sizes, starts, inputs, targets, grad_logp, grad_rewards = _problem(world, seed, dtype, with_bias)
    options = dict(temperature=temperature, softcap=softcap)
    shard = slice(starts[rank], starts[rank] + sizes[rank])
    gold = _run(inputs, targets, grad_logp, grad_rewards, torch.float64, options, fn=_reference)
    eager = _run(inputs, targets, grad_logp, grad_rewards, dtype, options, fn=_reference)
    kern = _run(inputs, targets, grad_logp, grad_rewards, dtype, options, rows=shard, fn=_public,
                backend=backend, process_group=dist.group.WORLD)
    for name in gold:
        g, e = gold[name], eager[name]
        if name in ("d_weight", "d_bias"):
            g, e = g[shard], e[shard]
        assert_three_way(kern[name], e, g, dtype, name=f"rank {rank}/{world} seed {seed} {backend} {name}")


def _check_bad_target(rank, world):
    """A target past the FULL vocabulary is refused on every rank, naming the full V."""
    vocab = sum(SHARDS[world])
    hidden = torch.zeros(2, D)
    weight = torch.zeros(SHARDS[world][rank], D)
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {vocab}\)"):
        ik.linear_logprobs(hidden, weight, torch.tensor([0, vocab]), process_group=dist.group.WORLD, backend="reference")


def _check_dtensor_weight(rank, world):
    """A ``Shard(0)`` DTensor head (torch's even chunks) needs no process_group; its gradient is a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _, _, inputs, targets, grad_logp, grad_rewards = _problem(world, 2, torch.float32, True)
    hidden, weight, bias, value_weight, value_bias = inputs
    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(weight.float(), mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias.float(), mesh, [Shard(0)]).requires_grad_()
    h = hidden.float().requires_grad_()
    logp = ik.linear_logprobs(h, w, targets, bias=b, ignore_index=IGNORE, backend="reference")
    (logp * grad_logp.float()).sum().backward()
    gold_w, gold_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    gold = ref.linear_logprobs_reference(hidden, gold_w, targets, gold_b, 1.0, None, IGNORE)
    (gold * grad_logp).sum().backward()
    where = f"rank {rank}/{world} DTensor weight"
    torch.testing.assert_close(logp.double(), gold.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} logp: {m}")
    torch.testing.assert_close(w.grad.full_tensor().double(), gold_w.grad, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{where} d_weight: {m}")
    torch.testing.assert_close(b.grad.full_tensor().double(), gold_b.grad, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{where} d_bias: {m}")
    with pytest.raises(ValueError, match="bias: a DTensor LM head must be Shard"):
        ik.linear_logprobs(h, w, targets, bias=bias.float(), backend="reference")


CASES = [
    dict(seed=0, with_bias=True, temperature=1.0, softcap=None),
    dict(seed=1, with_bias=False, temperature=0.7, softcap=3.0),
]


def _spawn(world, backend, dtype, cases):
    mp.spawn(_worker, args=(world, _free_port(), backend, dtype, cases), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_reference_matches_full_vocab_gold(world):
    _spawn(world, "reference", torch.float32, CASES)


def test_vocab_parallel_float64_is_the_gold():
    _spawn(2, "reference", torch.float64, CASES[:1])


@pytest.mark.interpret
def test_vocab_parallel_triton_matches_full_vocab_gold():
    _spawn(2, "triton", torch.float32, CASES)


def test_process_group_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="process_group was given but torch.distributed is not initialized"):
        ik.linear_logprobs(torch.zeros(2, D), torch.zeros(3, D), torch.zeros(2, dtype=torch.long),
                           process_group=object(), backend="reference")
