"""Triton kernels of consistency_loss: loss and d_rewards against the float64 gold with the
three-way rule, padded and packed, every kind and reduction (``interpret``: CPU under
TRITON_INTERPRET=1; ``cuda``: realistic shapes and bf16)."""


import pytest
import torch
from conftest import assert_three_way, poison_allocations
from hypothesis import given, settings
from hypothesis import strategies as st

import icrm_kernels as ik
from icrm_kernels import _dispatch
from icrm_kernels.consistency import KINDS, REDUCTIONS
from icrm_kernels.consistency import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_padded(s, t, dtype, *, seed=0, mask_p=0.75, scale=2.0, device=DEVICE):
    """float64 master tensors (rounded through ``dtype``) for the padded form."""
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(s, t, generator=g, dtype=torch.float64) * scale).to(dtype).double()
    weights = (2 * torch.rand(s, max(t - 1, 0), generator=g, dtype=torch.float64)).to(dtype).double()
    mask = torch.rand(s, max(t - 1, 0), generator=g) < mask_p
    baseline = torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double()
    sign = torch.where(torch.arange(s) % 2 == 0, 1.0, -1.0)
    return [x.to(device) for x in (rewards, weights, mask, baseline, sign)]


def make_packed(lengths, dtype, *, seed=0, mask_p=0.75, device=DEVICE):
    n = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype).double()
    weights = (2 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype).double()
    mask = torch.rand(n, generator=g) < mask_p
    baseline = torch.randn(len(lengths), generator=g, dtype=torch.float64).to(dtype).double()
    sign = torch.tensor([1 if i % 2 == 0 else -1 for i in range(len(lengths))])  # int sign
    cu = torch.tensor([0] + lengths).cumsum(0)
    return [x.to(device) for x in (rewards, weights, mask, baseline, sign)], cu.to(device)


def run(tensors, dtype, backend, upstream_seed=1, **kwargs):
    rewards, weights, mask, baseline, sign = tensors
    r = rewards.to(dtype).detach().requires_grad_()
    loss = ik.consistency_loss(r, weights.to(dtype), mask, baseline.to(dtype), sign, backend=backend, **kwargs)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(loss)
    (d_rewards,) = torch.autograd.grad((loss * g).sum(), [r])
    return loss, d_rewards


def check_three_way(tensors, dtype, **kwargs):
    kern = run(tensors, dtype, "triton", **kwargs)
    eager = run(tensors, dtype, "reference", **kwargs)
    gold = run(tensors, torch.float64, "reference", **kwargs)
    assert kern[0].dtype == torch.float32 and kern[1].dtype == dtype
    for name, k, e, g in zip(("loss", "d_rewards"), kern, eager, gold):
        assert_three_way(k, e, g, dtype, name)
    return kern, gold


# --------------------------------------------------------------------------- interpreter

INTERP_DTYPES = [torch.float32, torch.float16]
#: Segment lengths with empty and length-1 segments and ones crossing the interpreter's
#: 64-position blocks.
LENGTHS = [5, 0, 1, 64, 65, 130, 2, 37]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_matches_gold(kind, reduction, dtype):
    check_three_way(make_padded(6, 150, dtype, seed=KINDS.index(kind)), dtype, kind=kind, reduction=reduction)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_matches_gold(kind, reduction, dtype):
    tensors, cu = make_packed(LENGTHS, dtype, seed=KINDS.index(kind))
    (loss, _), _ = check_three_way(tensors, dtype, kind=kind, reduction=reduction, cu_seqlens=cu)
    if reduction == "none":  # the pair leaving each segment is always 0
        assert torch.equal(loss[cu[1:][cu[1:] > cu[:-1]] - 1], torch.zeros(7, device=loss.device))


@pytest.mark.interpret
@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 140), min_size=1, max_size=6),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_packed_random_segments(lengths, kind, reduction, seed):
    tensors, cu = make_packed(lengths, torch.float32, seed=seed)
    check_three_way(tensors, torch.float32, kind=kind, reduction=reduction, cu_seqlens=cu)


@pytest.mark.interpret
@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_padded(kind):
    """The same rows, padded (tail masked) and packed: equal loss and equal d_rewards per token."""
    lengths = [7, 1, 70, 33, 2, 66]
    s, t = len(lengths), max(lengths)
    rewards, weights, mask, baseline, sign = make_padded(s, t, torch.float32, seed=4)
    for i, n in enumerate(lengths):
        mask[i, max(n - 1, 0):] = False
    keep = torch.arange(t, device=rewards.device)[None, :] < torch.tensor(lengths, device=rewards.device)[:, None]
    flat_r = rewards[keep]
    pairs = torch.cat([weights, torch.zeros(s, 1, dtype=weights.dtype, device=weights.device)], 1)
    flat_w = pairs[keep]
    flat_m = torch.cat([mask, torch.zeros(s, 1, dtype=torch.bool, device=mask.device)], 1)[keep]
    cu = torch.tensor([0] + lengths, device=rewards.device).cumsum(0)
    for reduction in ("mean", "sum"):
        loss_pad, d_pad = run([rewards, weights, mask, baseline, sign], torch.float32, "triton", kind=kind, reduction=reduction)
        loss_pk, d_pk = run([flat_r, flat_w, flat_m, baseline, sign], torch.float32, "triton", kind=kind, reduction=reduction, cu_seqlens=cu)
        torch.testing.assert_close(loss_pk, loss_pad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_pk, d_pad[keep], rtol=1e-6, atol=1e-7)
        assert torch.equal(d_pad[~keep], torch.zeros_like(d_pad[~keep]))


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True])
def test_empty_mask_and_degenerate_shapes(packed):
    if packed:
        tensors, cu = make_packed([3, 0, 1, 40], torch.float32)
        kw = {"cu_seqlens": cu}
    else:
        tensors, kw = make_padded(3, 40, torch.float32), {}
    tensors[2] = torch.zeros_like(tensors[2])  # nothing counts
    for reduction in REDUCTIONS:
        (loss, d_r), _ = check_three_way(tensors, torch.float32, kind="log", reduction=reduction, **kw)
        assert torch.equal(d_r, torch.zeros_like(d_r)) and bool((loss == 0).all())
    # Padded rows of length 1 (no pair at all) and zero rows.
    for s, t in ((3, 1), (0, 5)):
        check_three_way(make_padded(s, t, torch.float32), torch.float32, kind="log", reduction="mean")
        check_three_way(make_padded(s, t, torch.float32), torch.float32, kind="squared", reduction="none")


@pytest.mark.interpret
def test_numeric_mask_and_sign_dtypes():
    rewards, weights, mask, baseline, sign = make_padded(4, 70, torch.float32, seed=2)
    soft_mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)).to(mask.device) * mask
    for m in (soft_mask, soft_mask.half(), mask.to(torch.int32)):
        for sg in (sign, sign.to(torch.int64), sign.half()):
            check_three_way([rewards, weights, m, baseline, sg], torch.float32, kind="log_nosg", reduction="mean")


@pytest.mark.interpret
def test_non_contiguous_inputs():
    rewards, weights, mask, baseline, sign = make_padded(3, 140, torch.float32, seed=5)
    wide = torch.zeros(3, 280, dtype=rewards.dtype, device=rewards.device)
    wide[:, ::2] = rewards
    r_view = wide[:, ::2]
    w_t = weights.T.contiguous().T
    m_t = mask.T.contiguous().T
    assert not r_view.is_contiguous() and not w_t.is_contiguous()
    for reduction in REDUCTIONS:
        check_three_way([r_view, w_t, m_t, baseline, sign], torch.float32, kind="product", reduction=reduction)


@pytest.mark.interpret
def test_outputs_poisoned_with_nan(monkeypatch):
    poison_allocations(monkeypatch, kernels)
    tensors, cu = make_packed(LENGTHS, torch.float32, seed=3)
    for reduction in REDUCTIONS:
        check_three_way(tensors, torch.float32, kind="log", reduction=reduction, cu_seqlens=cu)
        check_three_way(make_padded(5, 131, torch.float32), torch.float32, kind="log", reduction=reduction)


@pytest.mark.interpret
def test_deterministic():
    tensors, cu = make_packed(LENGTHS * 3, torch.float32, seed=6)
    first = run(tensors, torch.float32, "triton", kind="log", cu_seqlens=cu)
    second = run(tensors, torch.float32, "triton", kind="log", cu_seqlens=cu)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.interpret
def test_nan_reward_propagates():
    rewards, weights, mask, baseline, sign = make_padded(2, 9, torch.float32)
    mask[:] = True
    rewards[0, 4] = float("nan")
    loss = ik.consistency_loss(rewards.float(), weights.float(), mask, baseline.float(), sign, backend="triton")
    assert torch.isnan(loss)


@pytest.mark.interpret
def test_backend_triton_refuses_what_it_cannot_run(monkeypatch):
    rewards, weights, mask, baseline, sign = make_padded(2, 9, torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16 inputs cannot run under TRITON_INTERPRET=1"):
        ik.consistency_loss(rewards.bfloat16(), weights.bfloat16(), mask, baseline.bfloat16(), sign, backend="triton")
    with pytest.raises(RuntimeError, match="got float64"):
        ik.consistency_loss(rewards, weights, mask, baseline, sign, backend="triton")
    assert ik.consistency_loss(rewards, weights, mask, baseline, sign).dtype == torch.float64  # auto: reference
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was not set"):
        ik.consistency_loss(rewards.float(), weights.float(), mask, baseline.float(), sign, backend="triton")


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_realistic_shapes(kind, reduction, dtype):
    check_three_way(make_padded(16, 4097, dtype), dtype, kind=kind, reduction=reduction)
    lengths = [4096, 1, 0, 3000, 2049, 1024, 7] * 4
    tensors, cu = make_packed(lengths, dtype)
    check_three_way(tensors, dtype, kind=kind, reduction=reduction, cu_seqlens=cu)


@pytest.mark.cuda
def test_cuda_deterministic():
    tensors, cu = make_packed([4096, 3000, 2049] * 20, torch.float32)
    first = run(tensors, torch.float32, "triton", kind="log", cu_seqlens=cu)
    second = run(tensors, torch.float32, "triton", kind="log", cu_seqlens=cu)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
