"""Reference consistency loss: an independent loop transcription of docs/math.md (values and
hand-derived gradients, which pins the stop-gradient rules), gradcheck, packed == padded,
reductions, dispatch and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import icrm_kernels as ik
from icrm_kernels import _dispatch
from icrm_kernels.consistency.reference import KINDS

EPS = 1e-6


def make_padded(s=4, t=9, dtype=torch.float64, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(s, t, generator=g, dtype=torch.float64) * scale).to(dtype)
    weights = (2 * torch.rand(s, t - 1, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(s, t - 1, generator=g) > 0.3
    baseline = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(s)], dtype=dtype)
    return rewards, weights, mask, baseline, sign


def spec_loss_and_grad(rewards, weights, mask, baseline, sign, kind, reduction="mean"):
    """Scalar loops straight from the spec, with the gradient derived by hand."""
    loss, grad, count = 0.0, [[0.0] * len(row) for row in rewards], 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for s, row in enumerate(rewards):
        sg, b = sign[s], baseline[s]
        d = [sig(sg * (r - b)) for r in row]
        dd_dr = [sg * x * (1 - x) for x in d]
        for t in range(len(row) - 1):
            w, m = weights[s][t], float(mask[s][t])
            count += m
            a, c = d[t], d[t + 1]
            if kind == "log":
                l = -(math.log(a + EPS) * c + a * math.log(c + EPS)) / 2
                g_a, g_c = -c / (2 * (a + EPS)), -a / (2 * (c + EPS))
            elif kind == "log_nosg":
                l = -(math.log(a + EPS) + math.log(c + EPS)) / 2
                g_a, g_c = -1 / (2 * (a + EPS)), -1 / (2 * (c + EPS))
            elif kind == "product":
                l, g_a, g_c = 1 - a * c, -c, -a
            else:
                diff = row[t + 1] - row[t]
                loss += w * m * diff**2
                grad[s][t] += w * m * -2 * diff
                grad[s][t + 1] += w * m * 2 * diff
                continue
            loss += w * m * l
            grad[s][t] += w * m * g_a * dd_dr[t]
            grad[s][t + 1] += w * m * g_c * dd_dr[t + 1]
    norm = count + 1e-6 if reduction == "mean" else 1.0
    return loss / norm, torch.tensor(grad, dtype=torch.float64) / norm


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_spec_transcription_and_hand_gradient(kind, reduction):
    rewards, weights, mask, baseline, sign = make_padded()
    r = rewards.clone().requires_grad_(True)
    loss = ik.consistency_loss(r, weights, mask, baseline, sign, kind=kind, reduction=reduction, backend="reference")
    loss.backward()
    want, want_grad = spec_loss_and_grad(rewards.tolist(), weights.tolist(), mask.tolist(), baseline.tolist(), sign.tolist(), kind, reduction)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    torch.testing.assert_close(r.grad, want_grad, rtol=1e-9, atol=1e-12)


# 'log' is left out on purpose: its stop-gradient makes autograd differ from finite
# differences by design; its gradient is pinned against the hand derivation above.
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "log"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_padded_and_packed(kind, reduction):
    rewards, weights, mask, baseline, sign = make_padded(3, 6)
    assert torch.autograd.gradcheck(
        lambda r: ik.consistency_loss(r, weights, mask, baseline, sign, kind=kind, reduction=reduction), (rewards.requires_grad_(True),)
    )
    cu = torch.tensor([0, 4, 5, 11])
    flat = torch.randn(11, dtype=torch.float64, requires_grad=True)
    w, m = torch.rand(11, dtype=torch.float64), torch.ones(11)
    assert torch.autograd.gradcheck(
        lambda r: ik.consistency_loss(r, w, m, baseline, sign, kind=kind, reduction=reduction, cu_seqlens=cu), (flat,)
    )


def pad_to_packed(rewards, weights, mask, lengths):
    """Pack rows of the given lengths; the packed pair mask at a segment end is arbitrary (1)."""
    parts = [(rewards[s, :n], torch.cat([weights[s, : n - 1], weights.new_ones(1)]), torch.cat([mask[s, : n - 1], mask.new_ones(1)]))
             for s, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return (*[torch.cat(x) for x in zip(*parts)], cu)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_padded(kind):
    rewards, weights, mask, baseline, sign = make_padded(5, 8, torch.float32, seed=3)
    lengths = [8, 3, 1, 6, 2]
    for s, n in enumerate(lengths):  # padding never counts in the padded form
        mask[s, max(n - 1, 0):] = False
    flat_r, flat_w, flat_m, cu = pad_to_packed(rewards, weights, mask, lengths)
    for reduction in ("mean", "sum"):
        padded = ik.consistency_loss(rewards, weights, mask, baseline, sign, kind=kind, reduction=reduction)
        packed = ik.consistency_loss(flat_r, flat_w, flat_m, baseline, sign, kind=kind, reduction=reduction, cu_seqlens=cu)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    per_pair = ik.consistency_loss(flat_r, flat_w, flat_m, baseline, sign, kind=kind, reduction="none", cu_seqlens=cu)
    assert per_pair.shape == (sum(lengths),)
    assert bool((per_pair[cu[1:].long() - 1] == 0).all()), "pairs leaving a segment must not count"


def test_reductions_and_output_dtype():
    rewards, weights, mask, baseline, sign = make_padded(3, 5, torch.float16)
    none = ik.consistency_loss(rewards, weights, mask, baseline, sign, reduction="none")
    assert none.shape == (3, 4) and none.dtype == torch.float32
    total = ik.consistency_loss(rewards, weights, mask, baseline, sign, reduction="sum")
    mean = ik.consistency_loss(rewards, weights, mask, baseline, sign, reduction="mean")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / (mask.sum() + 1e-6))


def test_empty_mask_gives_zero_and_finite_gradient():
    rewards, weights, mask, baseline, sign = make_padded(2, 4, torch.float32)
    r = rewards.clone().requires_grad_(True)
    loss = ik.consistency_loss(r, weights, torch.zeros_like(mask), baseline, sign)
    loss.backward()
    assert loss.item() == 0 and bool((r.grad == 0).all())


def test_baseline_and_weights_are_constants():
    rewards, weights, mask, baseline, sign = make_padded(2, 5)
    b, w = baseline.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    loss = ik.consistency_loss(rewards.requires_grad_(True), w, mask, b, sign)
    loss.backward()
    assert b.grad is None and w.grad is None and rewards.grad is not None


def test_module_wrapper():
    rewards, weights, mask, baseline, sign = make_padded(2, 5)
    mod = ik.ConsistencyLoss(kind="product", reduction="sum")
    torch.testing.assert_close(mod(rewards, weights, mask, baseline, sign), ik.consistency_loss(rewards, weights, mask, baseline, sign, kind="product", reduction="sum"))


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), kind=st.sampled_from(KINDS), seed=st.integers(0, 999))
def test_property_packed_equals_padded(lengths, kind, seed):
    s, t = len(lengths), max(lengths)
    rewards, weights, mask, baseline, sign = make_padded(s, t + 1, seed=seed)
    rewards, weights, mask = rewards[:, :t], weights[:, : t - 1], mask[:, : t - 1].clone()
    for i, n in enumerate(lengths):
        mask[i, max(n - 1, 0):] = False
    flat_r, flat_w, flat_m, cu = pad_to_packed(rewards, weights, mask, lengths)
    padded = ik.consistency_loss(rewards, weights, mask, baseline, sign, kind=kind)
    packed = ik.consistency_loss(flat_r, flat_w, flat_m, baseline, sign, kind=kind, cu_seqlens=cu)
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_resolution(monkeypatch):
    cpu = torch.zeros(1)
    assert _dispatch.select_backend("reference", cpu) == "reference"
    assert _dispatch.select_backend("auto", cpu) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.select_backend("fast", cpu)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    assert _dispatch.select_backend("auto", cpu) == "reference"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select_backend("triton", cpu)


# --------------------------------------------------------------------------- bad input

R, Wt, M, B, S = torch.randn(2, 5), torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2), torch.tensor([1.0, -1.0])
RN, WN, MN = torch.randn(7), torch.rand(7), torch.ones(7)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((R, Wt, torch.ones(2, 5), B, S), {}, ValueError, r"mask must have shape \[2, 4\]"),
        ((R, torch.rand(2, 5), M, B, S), {}, ValueError, r"weights must have shape \[2, 4\]"),
        ((R, Wt, M, torch.zeros(3), S), {}, ValueError, r"baseline must have shape \[2\]"),
        ((R, Wt, M, B, torch.tensor([1.0, 0.0])), {}, ValueError, r"sign must hold only \+1"),
        ((R, Wt.double(), M, B, S), {}, TypeError, r"weights has dtype torch.float64 but rewards has dtype torch.float32"),
        ((R.long(), Wt, M, B, S), {}, TypeError, r"rewards must have a floating dtype"),
        ((R, Wt, M, B, S), {"kind": "cosine"}, ValueError, r"kind must be one of"),
        ((R, Wt, M, B, S), {"reduction": "max"}, ValueError, r"reduction must be one of"),
        ((R, Wt, M, B, S), {"backend": "gpu"}, ValueError, r"backend must be one of"),
        ((R, Wt, M, B, S), {"eps": -1.0}, ValueError, r"eps must be a number >= 0"),
        ((RN, WN, MN, B, S), {}, ValueError, r"rewards must have shape \[S, T\]"),
        ((RN, WN, MN, B, S), {"cu_seqlens": torch.tensor([1, 3, 7])}, ValueError, r"cu_seqlens must start at 0"),
        ((RN, WN, MN, B, S), {"cu_seqlens": torch.tensor([0, 5, 3])}, ValueError, r"cu_seqlens must be non-decreasing"),
        ((RN, WN, MN, B, S), {"cu_seqlens": torch.tensor([0, 3, 6])}, ValueError, r"cu_seqlens must end at N = rewards.shape\[0\] = 7"),
        ((RN, WN, MN, B, S), {"cu_seqlens": torch.tensor([0.0, 3.0, 7.0])}, TypeError, r"cu_seqlens must have an integer dtype"),
        ((RN, WN, torch.ones(6), B, S), {"cu_seqlens": torch.tensor([0, 3, 7])}, ValueError, r"mask must have shape \[7\]"),
        ((RN, WN, MN, torch.zeros(3), S), {"cu_seqlens": torch.tensor([0, 3, 7])}, ValueError, r"baseline must have shape \[2\]"),
    ],
)
def test_bad_input_consistency(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ik.consistency_loss(*args, **kwargs)


def test_nan_rewards_propagate():
    rewards, weights, mask, baseline, sign = make_padded(2, 5)
    mask[:] = True
    rewards[0, 2] = float("nan")
    assert torch.isnan(ik.consistency_loss(rewards, weights, mask, baseline, sign))
