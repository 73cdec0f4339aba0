"""The ``torch.library`` ops (``icrm_kernels._custom_ops``): ``opcheck`` on CPU for each op, and a
reward-model step through ``linear_logprobs_and_rewards`` + ``consistency_loss`` that
``torch.compile(fullgraph=True)`` captures whole (any graph break raises) and that gives the
eager step's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F


import icrm_kernels as ik
from icrm_kernels import _custom_ops as ops

N, D, V = 9, 6, 13


def _linear_inputs(dtype, with_bias, with_value, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype) if with_bias else None
    value_weight = torch.randn(D, generator=g, dtype=dtype) if with_value else None
    value_bias = torch.randn(1, generator=g, dtype=dtype) if with_value else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 4]] = -100
    return hidden, weight, bias, targets, value_weight, value_bias


def _requiring_grad(tensors):
    return tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


LINEAR_CASES = [
    # (dtype, bias, value head, temperature, softcap)
    (torch.float32, True, True, 1.0, None),
    (torch.float32, False, False, 0.7, 3.0),
    (torch.float64, True, True, 1.3, 2.0),
]


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype, with_bias, with_value, temperature, softcap", LINEAR_CASES)
def test_opcheck_linear_logprobs_reference(dtype, with_bias, with_value, temperature, softcap):
    inputs = _linear_inputs(dtype, with_bias, with_value)
    _assert_opcheck(ops.linear_logprobs_forward, _requiring_grad(inputs) + (temperature, softcap, -100, "reference", None))
    with torch.no_grad():
        logp, _, lse = ops.linear_logprobs_forward(*inputs, temperature, softcap, -100, "reference", None)
    hidden, weight, bias, targets, value_weight, value_bias = (None if t is None else t.detach() for t in inputs)
    grad = torch.randn(N, dtype=logp.dtype, generator=torch.Generator().manual_seed(1))
    for needs in ([True] * 5, [False, True, with_bias, False, with_value]):
        _assert_opcheck(ops.linear_logprobs_backward, (
            grad, grad if with_value else None, hidden, weight, bias, targets, value_weight, value_bias, lse,
            temperature, softcap, -100, "reference", None, needs,
        ))


@pytest.mark.interpret
def test_opcheck_linear_logprobs_triton():
    inputs = _linear_inputs(torch.float32, True, True)
    _assert_opcheck(ops.linear_logprobs_forward, _requiring_grad(inputs) + (1.0, 3.0, -100, "triton", None))


def _consistency_inputs(packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    if packed:
        cu_seqlens = torch.tensor([0, 5, 6, 14])
        shape, rows = (14,), 3
    else:
        cu_seqlens, shape, rows = None, (3, 7), 3
    pairs = shape if packed else (rows, shape[1] - 1)
    rewards = torch.randn(shape, generator=g)
    weights = torch.rand(pairs, generator=g) + 0.5
    mask = torch.rand(pairs, generator=g) > 0.3
    baseline = torch.randn(rows, generator=g)
    sign = torch.tensor([1, -1, 1])
    return rewards, weights, mask, baseline, sign, cu_seqlens


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_consistency_triton(packed, reduction):
    rewards, weights, mask, baseline, sign, cu_seqlens = _consistency_inputs(packed)
    args = (rewards.requires_grad_(), weights, mask, baseline, sign, cu_seqlens, "log", 1e-6, reduction)
    _assert_opcheck(ops.consistency_loss_forward, args)
    with torch.no_grad():
        _, mask_total = ops.consistency_loss_forward(*args)
    grad = torch.ones(()) if reduction == "mean" else torch.ones(weights.shape)
    _assert_opcheck(ops.consistency_loss_backward, (grad, rewards.detach(), weights, mask, baseline, sign, cu_seqlens,
                                                    mask_total, "log", 1e-6, reduction))


# ----------------------------------------------------------------------------------------------
# A reward-model step under torch.compile(fullgraph=True)

B, T = 2, 6  # pairs, tokens per row


class _TinyRewardModel(torch.nn.Module):
    """Embedding + one MLP layer standing in for the decoder; the fused heads are the real ones."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V)
        self.score = torch.nn.Linear(D, 1)

    def forward(self, input_ids, targets, generator_logp):
        hidden = torch.tanh(self.mlp(self.embed(input_ids)))
        logp, rewards = ik.linear_logprobs_and_rewards(
            hidden, self.lm_head.weight, targets, self.score.weight, bias=self.lm_head.bias,
            value_bias=self.score.bias, softcap=5.0, backend="reference",
        )
        on_response = (targets != -100).float()
        sft = -(logp * on_response).sum() / on_response.sum()
        margin = rewards[:B, -2] - rewards[B:, -2]
        bt = -F.logsigmoid(margin).mean()
        weights = 2.0 * generator_logp[:, :-1].exp()
        sign = torch.cat([torch.ones(B), -torch.ones(B)])
        baseline = (rewards * on_response).sum(1) / on_response.sum(1)
        align = ik.consistency_loss(rewards, weights, on_response[:, :-1], baseline, sign, backend="reference")
        return sft + 0.1 * align + 0.9 * bt


def _step_inputs():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, V, (2 * B, T), generator=g)
    targets = torch.cat([input_ids[:, 1:], torch.full((2 * B, 1), -100)], dim=1)
    targets[:, :2] = -100  # the prompt
    generator_logp = -torch.rand(2 * B, T, generator=g)
    return input_ids, targets, generator_logp


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_reward_model_step_compiles_fullgraph(compiler):
    torch.manual_seed(0)
    model = _TinyRewardModel()
    inputs = _step_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(*inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_targets_are_still_checked_under_compile():
    """The range check moved into the op: a bad target raises inside a fullgraph-compiled call."""
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w, t: ik.linear_logprobs(h, w, t, backend="reference"), fullgraph=True,
                       backend="aot_eager")
    hidden, weight = torch.randn(3, D), torch.randn(V, D)
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V}\)"):
        fn(hidden, weight, torch.tensor([0, V, 1]))
