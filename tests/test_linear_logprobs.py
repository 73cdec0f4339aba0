"""Reference path of linear_logprobs(_and_rewards): gradcheck, chunked vs naive (three-way
rule against a float64 gold), ignore_index, softcap/temperature, shapes, bad input."""

import math

import pytest
import torch
from conftest import assert_three_way
from hypothesis import given, settings
from hypothesis import strategies as st

import icrm_kernels as ik
from icrm_kernels.linear_logprobs import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(n, d, v, dtype=torch.float32, *, scale=1.0, bias=True, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        targets[i] = -100
    value_weight = (torch.randn(d, generator=g) / math.sqrt(d)).to(dtype)
    value_bias = torch.randn((), generator=g).to(dtype)
    return hidden, weight, b, targets, value_weight, value_bias


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (None, 0.7), (3.0, 1.0), (2.5, 1.3)])
@pytest.mark.parametrize("path", ["naive", "chunked"])
def test_gradcheck_float64_all_inputs(softcap, temperature, path):
    hidden, weight, bias, targets, vw, vb = make_inputs(9, 5, 11, torch.float64, ignore=(2,), scale=2.0)
    args = leaves(hidden, weight, bias, vw, vb)

    def fn(h, w, b, value_weight, value_bias):
        if path == "naive":
            logp = ref.linear_logprobs_reference(h, w, targets, b, temperature, softcap)
        else:
            logp = ref.linear_logprobs_chunked(h, w, targets, b, temperature, softcap, chunk_rows=4)
        return logp, ref.rewards_reference(h, value_weight, value_bias)

    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_public_api_float64():
    hidden, weight, bias, targets, vw, vb = make_inputs(6, 4, 7, torch.float64, ignore=(0,))
    args = leaves(hidden, weight, bias, vw, vb)

    def fn(h, w, b, value_weight, value_bias):
        return ik.linear_logprobs_and_rewards(
            h, w, targets, value_weight, bias=b, value_bias=value_bias, softcap=4.0, temperature=0.9, backend="reference"
        )

    assert torch.autograd.gradcheck(fn, args)


# --------------------------------------------------------------------------- three-way rule


def run_all_grads(fn, hidden, weight, bias, targets, vw, vb):
    """Outputs and every gradient of fn, for a fixed random upstream gradient."""
    h, w, b, v, c = leaves(hidden, weight, bias, vw, vb)
    logp, rewards = fn(h, w, b, targets, v, c)
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
    g_rew = torch.randn(rewards.shape, generator=g, dtype=torch.float64).to(rewards.dtype)
    torch.autograd.backward([logp, rewards], [g_logp, g_rew])
    out = {"logp": logp, "rewards": rewards, "d_hidden": h.grad, "d_weight": w.grad, "d_value_weight": v.grad, "d_value_bias": c.grad}
    if b is not None:
        out["d_bias"] = b.grad
    return out


def naive(h, w, b, t, v, c, temperature=1.0, softcap=None):
    return ref.linear_logprobs_reference(h, w, t, b, temperature, softcap), ref.rewards_reference(h, v, c)


def chunked(h, w, b, t, v, c, temperature=1.0, softcap=None, chunk_rows=5):
    return ref.linear_logprobs_chunked(h, w, t, b, temperature, softcap, chunk_rows=chunk_rows), ref.rewards_reference(h, v, c)


def check_three_way(inputs, dtype, impl, impl_kw=(), **kw):
    gold = run_all_grads(lambda *a: naive(*a, **kw), *[x.double() if x is not None and x.is_floating_point() else x for x in inputs])
    eager = run_all_grads(lambda *a: naive(*a, **kw), *inputs)
    kern = run_all_grads(lambda *a: impl(*a, **kw, **dict(impl_kw)), *inputs)
    for name in gold:
        assert kern[name].dtype == eager[name].dtype, name
        assert_three_way(kern[name], eager[name], gold[name], dtype, name)
    return kern


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v", [(1, 3, 1), (7, 5, 3), (33, 17, 1000)])
def test_chunked_matches_gold(dtype, n, d, v):
    inputs = make_inputs(n, d, v, dtype, ignore=(0,) if n > 1 else ())
    check_three_way(inputs, dtype, chunked)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,temperature", [(30.0, 1.0), (None, 0.5), (5.0, 2.0)])
def test_chunked_softcap_temperature(dtype, softcap, temperature):
    inputs = make_inputs(21, 8, 257, dtype, scale=4.0, ignore=(3, 4))
    check_three_way(inputs, dtype, chunked, softcap=softcap, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_large_logits(dtype):
    """Logits of +-80: exp overflows without the max shift; results must stay finite."""
    inputs = make_inputs(16, 8, 300, dtype, scale=80.0)
    kern = check_three_way(inputs, dtype, chunked, impl_kw={"chunk_rows": 3})
    assert all(bool(torch.isfinite(t).all()) for t in kern.values())


def test_chunked_no_bias_partial_grads():
    hidden, weight, _, targets, _, _ = make_inputs(10, 6, 40, bias=False, ignore=(1,))
    h = hidden.clone().requires_grad_(True)
    out = ref.linear_logprobs_chunked(h, weight, targets, chunk_rows=3)
    out.sum().backward()
    h_gold = hidden.double().requires_grad_(True)
    ref.linear_logprobs_reference(h_gold, weight.double(), targets).sum().backward()
    torch.testing.assert_close(h.grad.double(), h_gold.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


# --------------------------------------------------------------------------- semantics


def test_ignored_rows_are_zero_without_gradient():
    hidden, weight, bias, targets, vw, vb = make_inputs(8, 4, 20, ignore=(0, 5))
    h = hidden.clone().requires_grad_(True)
    logp = ik.linear_logprobs(h, weight, targets, bias=bias, backend="reference")
    assert logp[0] == 0 and logp[5] == 0 and bool((logp[[1, 2, 3]] < 0).all())
    logp.sum().backward()
    assert bool((h.grad[[0, 5]] == 0).all()) and bool((h.grad[1] != 0).any())


@pytest.mark.parametrize("path", [naive, chunked])
def test_all_ignored(path):
    hidden, weight, bias, targets, vw, vb = make_inputs(6, 4, 9)
    targets[:] = -100
    h, w = leaves(hidden, weight)
    logp, _ = path(h, w, None, targets, vw, vb)
    logp.sum().backward()
    assert bool((logp == 0).all()) and bool((h.grad == 0).all()) and bool((w.grad == 0).all())


def test_custom_ignore_index_and_int32_targets():
    hidden, weight, _, targets, _, _ = make_inputs(5, 4, 9, bias=False)
    targets[2] = 7
    a = ik.linear_logprobs(hidden, weight, targets.to(torch.int32), ignore_index=7)
    assert a[2] == 0 and a.dtype == torch.float32


def test_leading_dims_flattened_and_restored():
    hidden, weight, bias, targets, vw, vb = make_inputs(12, 6, 30)
    lp, rw = ik.linear_logprobs_and_rewards(hidden.view(3, 4, 6), weight, targets.view(3, 4), vw, bias=bias, value_bias=vb)
    lp_flat, rw_flat = ik.linear_logprobs_and_rewards(hidden, weight, targets, vw.view(1, 6), bias=bias, value_bias=float(vb))
    assert lp.shape == (3, 4) and rw.shape == (3, 4)
    torch.testing.assert_close(lp.reshape(-1), lp_flat)
    torch.testing.assert_close(rw.reshape(-1), rw_flat)


def test_logprobs_normalize():
    """exp(logp) summed over every possible target of a row is 1."""
    hidden, weight, bias, _, _, _ = make_inputs(1, 5, 13, torch.float64)
    every = torch.arange(13)
    logp = ik.linear_logprobs(hidden.expand(13, 5), weight, every, bias=bias, softcap=2.0, temperature=0.6)
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_auto_reference_switches_to_chunked(monkeypatch):
    """backend='reference' runs the chunked path above CHUNKED_ABOVE logits, with equal results."""
    hidden, weight, bias, targets, _, _ = make_inputs(40, 8, 50, ignore=(2,))
    calls = []
    real = ref._ChunkedLinearLogprobs.apply
    monkeypatch.setattr(ref._ChunkedLinearLogprobs, "apply", lambda *a: calls.append(1) or real(*a))
    small = ik.linear_logprobs(hidden, weight, targets, bias=bias, backend="reference")
    assert not calls
    monkeypatch.setattr(ref, "CHUNKED_ABOVE", 100)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 7 * 50)
    big = ik.linear_logprobs(hidden, weight, targets, bias=bias, backend="reference")
    assert calls
    torch.testing.assert_close(small, big)


def test_nan_propagates_without_raising():
    hidden, weight, bias, targets, vw, vb = make_inputs(4, 4, 10)
    hidden[1, 0] = float("nan")
    for path in (naive, chunked):
        logp, rewards = path(hidden, weight, bias, targets, vw, vb)
        assert torch.isnan(logp[1]) and torch.isnan(rewards[1])
        assert bool(torch.isfinite(logp[[0, 2, 3]]).all())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 9),
    v=st.integers(1, 40),
    chunk_rows=st.integers(1, 8),
    softcap=st.sampled_from([None, 1.5, 30.0]),
    temperature=st.floats(0.25, 4.0),
    n_ignored=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_equals_naive_float64(n, d, v, chunk_rows, softcap, temperature, n_ignored, seed):
    hidden, weight, bias, targets, vw, vb = make_inputs(n, d, v, torch.float64, scale=3.0, seed=seed, ignore=range(min(n, n_ignored)))
    a = run_all_grads(lambda *x: naive(*x, temperature=temperature, softcap=softcap), hidden, weight, bias, targets, vw, vb)
    b = run_all_grads(
        lambda *x: chunked(*x, temperature=temperature, softcap=softcap, chunk_rows=chunk_rows), hidden, weight, bias, targets, vw, vb
    )
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-10, msg=name)
    assert bool((a["logp"] <= 1e-12).all())


# --------------------------------------------------------------------------- bad input

H, W, T = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weight": torch.randn(10, 7)}, ValueError, r"weight must have shape \[\*, 8\]"),
        ({"targets": torch.tensor([1, 2, 10, 0])}, ValueError, r"targets must lie in \[0, 10\)"),
        ({"targets": torch.tensor([1, -1, 0, 0])}, ValueError, r"targets must lie in"),
        ({"targets": torch.tensor([1.0, 2.0, 3.0, 0.0])}, TypeError, r"targets must have an integer dtype"),
        ({"targets": torch.tensor([1, 2, 3])}, ValueError, r"targets must have shape \(4,\)"),
        ({"hidden": torch.randn(4, 8, dtype=torch.float64), "weight": torch.randn(10, 8, dtype=torch.float16)}, TypeError, r"weight has dtype torch.float16 but hidden has dtype torch.float64"),
        ({"bias": torch.randn(9)}, ValueError, r"bias must have shape \[10\]"),
        ({"bias": torch.randn(10, dtype=torch.float64)}, TypeError, r"bias has dtype"),
        ({"hidden": torch.randint(0, 3, (4, 8))}, TypeError, r"hidden must have a floating dtype"),
        ({"hidden": [[1.0]]}, TypeError, r"hidden must be a torch.Tensor"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, r"temperature"),
        ({"softcap": 0.0}, ValueError, r"softcap must be a finite number > 0"),
        ({"softcap": -3.0}, ValueError, r"softcap"),
        ({"backend": "cuda"}, ValueError, r"backend must be one of \('auto', 'triton', 'reference'\)"),
        ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
    ],
)
def test_bad_input_linear_logprobs(kwargs, exc, match):
    args = {"hidden": H, "weight": W, "targets": T, **kwargs}
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=match):
        ik.linear_logprobs(h, w, t, **args)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"value_weight": torch.randn(7)}, ValueError, r"value_weight must have shape \[8\] or \[1, 8\]"),
        ({"value_weight": torch.randn(2, 8)}, ValueError, r"value_weight must have shape"),
        ({"value_weight": None}, TypeError, r"value_weight must be a torch.Tensor"),
        ({"value_bias": torch.randn(2)}, ValueError, r"value_bias must be a scalar tensor"),
        ({"value_weight": torch.randn(8, dtype=torch.float64)}, TypeError, r"value_weight has dtype"),
    ],
)
def test_bad_input_rewards(kwargs, exc, match):
    args = {"value_weight": torch.randn(8), **kwargs}
    vw = args.pop("value_weight")
    with pytest.raises(exc, match=match):
        ik.linear_logprobs_and_rewards(H, W, T, vw, **args)


def test_rows_without_target_skip_the_vocabulary(monkeypatch):
    """Only the rows that carry a target reach the LM-head computation (issue 18 item 4); the
    rewards of every row and all gradients equal the float64 gold of the uncompacted op."""
    import importlib

    op = importlib.import_module("icrm_kernels.linear_logprobs")  # the package (the name is also the function)

    seen = []
    real = op.linear_logprobs_auto_reference

    def spy(hidden, *args):
        seen.append(hidden.shape[0])
        return real(hidden, *args)

    g = torch.Generator().manual_seed(4)
    n, d, v = 24, 8, 50
    leaves = [torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64),
              torch.randn(d, generator=g, dtype=torch.float64)]
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.arange(n) % 4 != 0] = -100  # 6 of 24 rows carry a target (an RM step: chosen responses)
    upstream = torch.randn(2, n, generator=g, dtype=torch.float64)

    def run(compact):
        xs = [t.clone().requires_grad_() for t in leaves]
        if compact:
            logp, rewards = ik.linear_logprobs_and_rewards(xs[0], xs[1], targets, xs[2], softcap=3.0, backend="reference")
        else:  # the gold: every row through the plain reference
            logp = ref.linear_logprobs_reference(xs[0], xs[1], targets, None, 1.0, 3.0, -100)
            rewards = xs[0] @ xs[2]
        loss = (logp * upstream[0]).sum() + (rewards * upstream[1]).sum()
        return [logp, rewards, *torch.autograd.grad(loss, xs)]

    monkeypatch.setattr(op, "linear_logprobs_auto_reference", spy)
    got = run(True)
    assert seen == [6], f"the vocabulary computation saw {seen} rows, expected only the 6 with a target"
    for name, a, b in zip(("logp", "rewards", "d_hidden", "d_weight", "d_value_weight"), got, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
