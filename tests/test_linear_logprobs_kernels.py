"""Triton kernels of linear_logprobs(_and_rewards): outputs and every gradient against the
float64 gold with the three-way rule (``interpret``: CPU under TRITON_INTERPRET=1, small shapes;
``cuda``: realistic shapes, bf16, and the N*V > 2^31 memory check)."""

import math

import pytest
import torch
from conftest import assert_three_way, poison_allocations

import icrm_kernels as ik
from icrm_kernels import _dispatch
from icrm_kernels.linear_logprobs import kernels, plan
from icrm_kernels.linear_logprobs import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_NAMES = ("hidden", "weight", "bias", "value_weight", "value_bias")


def make_inputs(n, d, v, dtype, *, bias=True, value=True, ignore=(), seed=0, device=DEVICE):
    """``dict`` of float64 master inputs (cast per run) and int64 targets."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden": torch.randn(n, d, generator=g, dtype=torch.float64),
        "weight": torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d)),
        "bias": torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None,
        "value_weight": torch.randn(1, d, generator=g, dtype=torch.float64) / math.sqrt(d) if value else None,
        "value_bias": torch.randn(1, generator=g, dtype=torch.float64) if value else None,
    }
    # Round through the test dtype once, so gold and eager see the same values.
    inputs = {k: None if t is None else t.to(dtype).to(torch.float64).to(device) for k, t in inputs.items()}
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignore)] = -100
    return inputs, targets.to(device)


def run(inputs, targets, dtype, backend, requires_grad=INPUT_NAMES, upstream_seed=1, **kwargs):
    """Outputs and gradients of one call: ``{name: tensor}`` (``logp``, ``rewards``, ``d_<input>``)."""
    leaves = {
        k: None if t is None else t.to(dtype).detach().requires_grad_(k in requires_grad) for k, t in inputs.items()
    }
    if leaves["value_weight"] is None:
        logp = ik.linear_logprobs(
            leaves["hidden"], leaves["weight"], targets, bias=leaves["bias"], backend=backend, **kwargs
        )
        rewards = None
    else:
        logp, rewards = ik.linear_logprobs_and_rewards(
            leaves["hidden"], leaves["weight"], targets, leaves["value_weight"],
            bias=leaves["bias"], value_bias=leaves["value_bias"], backend=backend, **kwargs,
        )
    out = {"logp": logp, "rewards": rewards}
    wanted = [k for k, t in leaves.items() if t is not None and t.requires_grad]
    if wanted:
        g = torch.Generator().manual_seed(upstream_seed)
        grad_logp = torch.randn(logp.shape, generator=g).to(logp)
        loss = (logp * grad_logp).sum()
        if rewards is not None:
            loss = loss + (rewards * torch.randn(rewards.shape, generator=g).to(rewards)).sum()
        for k, grad in zip(wanted, torch.autograd.grad(loss, [leaves[k] for k in wanted])):
            assert grad.dtype == dtype and grad.shape == leaves[k].shape, k
            out["d_" + k] = grad
    return out


def chunk_rounding_slack(name, gold, dtype, n, d, v):
    """The documented extra error of the 16-bit gradient that the backward accumulates over its
    chunks in its own dtype (kernels.py header): ``d_hidden`` on the vocabulary axis,
    ``d_weight`` / ``d_bias`` on the row axis. Each chunk after the first adds one rounding, at
    most an ulp of a partial sum (bounded here by 2 max|gold|)."""
    if dtype == torch.float32 or n == 0:
        return 0.0
    arch = kernels._arch_key(torch.device(DEVICE))
    p = plan.launch_plan(n, d, v, kernels._DTYPE_NAMES[dtype], arch, row_chunk=kernels._ROW_CHUNK,
                         vocab_chunk=kernels._VOCAB_CHUNK, tile_max=kernels._TILE_MAX)
    if name not in (("d_hidden",) if p.backward_axis == "vocab" else ("d_weight", "d_bias")):
        return 0.0
    return (p.num_chunks - 1) * torch.finfo(dtype).eps * gold.abs().max().item()


def check_three_way(inputs, targets, dtype, requires_grad=INPUT_NAMES, **kwargs):
    kern = run(inputs, targets, dtype, "triton", requires_grad, **kwargs)
    kwargs.pop("grad_filter_eps", None)  # the reference never filters
    eager = run(inputs, targets, dtype, "reference", requires_grad, **kwargs)
    gold = run(inputs, targets, torch.float64, "reference", requires_grad, **kwargs)
    assert set(kern) == set(gold), f"outputs/gradients differ: {sorted(kern)} vs {sorted(gold)}"
    (n, d), v = inputs["hidden"].shape, inputs["weight"].shape[0]
    for name in gold:
        if gold[name] is None:
            assert kern[name] is None, name
        else:
            assert kern[name].dtype == (torch.float32 if name in ("logp", "rewards") else dtype), name
            slack = chunk_rounding_slack(name, gold[name], dtype, n, d, v)
            assert_three_way(kern[name], eager[name], gold[name], dtype, name, slack)
    return kern, gold


# --------------------------------------------------------------------------- interpreter

INTERP_DTYPES = [torch.float32, torch.float16]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize(
    "bias,value,softcap,temperature",
    [
        (False, False, None, 1.0),
        (True, False, 4.0, 0.7),
        (True, True, None, 1.3),
        (False, True, 2.5, 1.0),
    ],
)
def test_matches_gold_odd_shapes(dtype, bias, value, softcap, temperature):
    # N, D, V not multiples of the interpreter blocks (16, 16, 32): partial tiles on every axis.
    inputs, targets = make_inputs(37, 41, 101, dtype, bias=bias, value=value, ignore=(3, 20))
    check_three_way(inputs, targets, dtype, softcap=softcap, temperature=temperature)


@pytest.mark.interpret
@pytest.mark.parametrize("n,d,v", [(1, 1, 1), (1, 3, 2), (2, 16, 32), (17, 17, 33), (5, 70, 7)])
def test_tiny_and_boundary_shapes(n, d, v):
    """Shapes below one block, exactly one block, and one past it on each axis."""
    inputs, targets = make_inputs(n, d, v, torch.float32, seed=n + d + v)
    check_three_way(inputs, targets, torch.float32, softcap=2.0)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_matches_gold_medium_shape(dtype):
    """The largest interpreter shape: 13 row blocks x 16 vocab tiles x 4 D chunks."""
    inputs, targets = make_inputs(200, 64, 500, dtype, ignore=range(0, 200, 9), seed=7)
    check_three_way(inputs, targets, dtype, softcap=10.0, temperature=0.8)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_online_lse_across_tiles_with_far_apart_maxima(dtype):
    """Logits ~ +-80 whose maximum sits in a different vocab tile per row: the running sum must
    be rescaled across tiles (first tile near -80, a later one near +80, or the reverse)."""
    n, d, v = 24, 20, 160  # 5 vocab tiles of 32
    inputs, targets = make_inputs(n, d, v, dtype, bias=False, seed=3)
    hidden, weight = inputs["hidden"].clone(), inputs["weight"].clone() * 0.5
    tile = torch.arange(v, device=hidden.device) // 32
    # The last hidden feature is +-1 per row and the last weight column +-80 per tile.
    weight[:, -1] = torch.tensor([-80.0, 0.0, 40.0, 80.0, -40.0], dtype=torch.float64, device=hidden.device)[tile]
    hidden[:, -1] = torch.where(torch.arange(n, device=hidden.device) % 2 == 0, 1.0, -1.0)
    inputs.update(hidden=hidden.to(dtype).double(), weight=weight.to(dtype).double())
    targets[: n // 2] = torch.randint(0, v, (n // 2,), generator=torch.Generator().manual_seed(5)).to(targets)
    kern, gold = check_three_way(inputs, targets, dtype, temperature=0.9)
    logits = (inputs["hidden"] @ inputs["weight"].T).abs()
    assert logits.max() > 70, "the test must reach logits near +-80"
    assert torch.isfinite(kern["logp"]).all()


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_ignore_index_rows_and_custom_ignore_index(dtype):
    inputs, targets = make_inputs(33, 24, 70, dtype, ignore=range(0, 33, 3))
    targets = torch.where(targets == -100, torch.full_like(targets, -1), targets)
    kern, _ = check_three_way(inputs, targets, dtype, ignore_index=-1, softcap=5.0)
    ignored = targets == -1
    assert torch.equal(kern["logp"][ignored], torch.zeros_like(kern["logp"][ignored]))


@pytest.mark.interpret
@pytest.mark.parametrize("value", [False, True])
def test_all_rows_ignored(value):
    inputs, targets = make_inputs(20, 24, 50, torch.float32, value=value)
    targets[:] = -100
    kern, _ = check_three_way(inputs, targets, torch.float32)
    assert torch.equal(kern["logp"], torch.zeros_like(kern["logp"]))
    assert torch.equal(kern["d_weight"], torch.zeros_like(kern["d_weight"]))
    assert torch.equal(kern["d_bias"], torch.zeros_like(kern["d_bias"]))
    if not value:  # with a value head, hidden still gets the reward gradient
        assert torch.equal(kern["d_hidden"], torch.zeros_like(kern["d_hidden"]))


@pytest.mark.interpret
@pytest.mark.parametrize(
    "requires_grad",
    [("hidden",), ("weight",), ("bias",), ("value_weight",), ("hidden", "value_bias"), ("weight", "value_weight")],
)
def test_partial_requires_grad(requires_grad):
    inputs, targets = make_inputs(19, 24, 45, torch.float32, ignore=(4,))
    kern, _ = check_three_way(inputs, targets, torch.float32, requires_grad=requires_grad, softcap=3.0)
    assert sorted(k for k in kern if k.startswith("d_")) == sorted("d_" + k for k in requires_grad)


@pytest.mark.interpret
@pytest.mark.parametrize("value_weight_shape,value_bias_shape", [((24,), None), ((24,), ()), ((1, 24), None)])
def test_value_head_shapes_and_no_value_bias(value_weight_shape, value_bias_shape):
    inputs, targets = make_inputs(19, 24, 45, torch.float32, ignore=(0,))
    inputs["value_weight"] = inputs["value_weight"].reshape(value_weight_shape)
    inputs["value_bias"] = None if value_bias_shape is None else inputs["value_bias"].reshape(value_bias_shape)
    check_three_way(inputs, targets, torch.float32)


@pytest.mark.interpret
def test_only_one_output_used():
    """Backward with grad_logp or grad_rewards missing (the other output unused)."""
    inputs, targets = make_inputs(18, 20, 40, torch.float32, ignore=(1,))
    results = {}
    for impl in ("triton", "reference"):
        leaves = [inputs[k].float().requires_grad_() for k in INPUT_NAMES]
        h, w, b, vw, vb = leaves
        logp, rewards = ik.linear_logprobs_and_rewards(h, w, targets, vw, bias=b, value_bias=vb, backend=impl)
        g_r = torch.autograd.grad(rewards.sum(), leaves, allow_unused=True)
        logp, rewards = ik.linear_logprobs_and_rewards(h, w, targets, vw, bias=b, value_bias=vb, backend=impl)
        g_l = torch.autograd.grad(logp.sum(), leaves, allow_unused=True)
        results[impl] = (g_r, g_l)
    for kern, eager in zip(results["triton"], results["reference"]):
        for name, k, e in zip(INPUT_NAMES, kern, eager):
            if e is None or not bool(e.abs().max() > 0):
                assert k is None or bool((k == 0).all()), name
            else:
                torch.testing.assert_close(k, e, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_outputs_poisoned_with_nan(monkeypatch):
    """Every buffer the kernels overwrite starts as NaN: an unwritten tile would show."""
    poison_allocations(monkeypatch, kernels)
    inputs, targets = make_inputs(35, 40, 99, torch.float32, ignore=(0, 34))
    check_three_way(inputs, targets, torch.float32, softcap=6.0)
    with torch.no_grad():
        check_three_way(inputs, targets, torch.float32, requires_grad=())


@pytest.mark.interpret
def test_no_grad_path_runs_forward_only(monkeypatch):
    """The frozen-generator path: the forward kernel only, no autograd Function, nothing saved."""
    applied = []
    real_apply = kernels._LinearLogprobsFunction.apply

    def spy(*args):
        applied.append(True)
        return real_apply(*args)

    monkeypatch.setattr(kernels._LinearLogprobsFunction, "apply", spy)
    inputs, targets = make_inputs(17, 24, 40, torch.float32, value=False)
    h, w, b = (inputs[k].float().requires_grad_() for k in ("hidden", "weight", "bias"))
    with torch.no_grad():
        logp = ik.linear_logprobs(h, w, targets, bias=b, backend="triton")
    assert logp.grad_fn is None and not applied
    logp_frozen = ik.linear_logprobs(h.detach(), w.detach(), targets, bias=b.detach(), backend="triton")
    assert logp_frozen.grad_fn is None and not applied
    logp_grad = ik.linear_logprobs(h, w, targets, bias=b, backend="triton")
    assert logp_grad.grad_fn is not None and applied == [True]
    assert torch.equal(logp, logp_frozen) and torch.equal(logp, logp_grad.detach())


@pytest.mark.interpret
def test_weight_grad_accumulates_across_calls():
    inputs, targets = make_inputs(21, 24, 50, torch.float32, ignore=(2,))
    _, targets2 = make_inputs(21, 24, 50, torch.float32, seed=9)
    grads = {}
    for impl in ("triton", "reference"):
        h, w, b = (inputs[k].float().requires_grad_() for k in ("hidden", "weight", "bias"))
        ik.linear_logprobs(h, w, targets, bias=b, backend=impl).sum().backward()
        ik.linear_logprobs(h, w, targets2, bias=b, softcap=3.0, backend=impl).mul(0.5).sum().backward()
        grads[impl] = (h.grad, w.grad, b.grad)
    h, w, b = (inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    ik.linear_logprobs(h, w, targets, bias=b, backend="reference").sum().backward()
    ik.linear_logprobs(h, w, targets2, bias=b, softcap=3.0, backend="reference").mul(0.5).sum().backward()
    gold = (h.grad, w.grad, b.grad)
    for name, k, e, g in zip(("hidden", "weight", "bias"), grads["triton"], grads["reference"], gold):
        assert_three_way(k, e, g, torch.float32, "accumulated d_" + name)


@pytest.mark.interpret
def test_non_contiguous_and_batched_inputs():
    inputs, targets = make_inputs(2 * 3 * 7, 24, 45, torch.float32, ignore=(5,))
    # hidden as a [2, 7, 3, D] tensor transposed to [2, 3, 7, D]; weight a strided view.
    hidden = inputs["hidden"].float().reshape(2, 7, 3, 24).transpose(1, 2)
    weight_wide = torch.zeros(45, 48, dtype=torch.float32, device=hidden.device)
    weight_wide[:, ::2] = inputs["weight"].float()
    weight = weight_wide[:, ::2]
    tgt = targets.reshape(2, 7, 3).transpose(1, 2)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    out = {}
    for impl in ("triton", "reference"):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp = ik.linear_logprobs(h, w, tgt, softcap=4.0, backend=impl)
        out[impl] = (logp, *torch.autograd.grad(logp.sum(), [h, w]))
    for k, e in zip(out["triton"], out["reference"]):
        assert k.shape == e.shape
        torch.testing.assert_close(k, e, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_empty_batch():
    inputs, _ = make_inputs(0, 16, 40, torch.float32)
    h, w, vw = (inputs[k].float().requires_grad_() for k in ("hidden", "weight", "value_weight"))
    targets = torch.zeros(0, dtype=torch.int64, device=h.device)
    logp, rewards = ik.linear_logprobs_and_rewards(h, w, targets, vw, backend="triton")
    assert logp.shape == (0,) and rewards.shape == (0,)
    d_w, d_vw = torch.autograd.grad(logp.sum() + rewards.sum(), [w, vw])
    assert torch.equal(d_w, torch.zeros_like(w)) and torch.equal(d_vw, torch.zeros_like(vw))


@pytest.mark.interpret
def test_backend_triton_refuses_what_it_cannot_run(monkeypatch):
    inputs, targets = make_inputs(4, 16, 40, torch.float32)
    h, w = inputs["hidden"], inputs["weight"]
    with pytest.raises(RuntimeError, match="bfloat16 inputs cannot run under TRITON_INTERPRET=1"):
        ik.linear_logprobs(h.bfloat16(), w.bfloat16(), targets, backend="triton")
    with pytest.raises(RuntimeError, match="got float64"):
        ik.linear_logprobs(h, w, targets, backend="triton")
    # auto never picks the interpreter, and float64 / bf16 never error under auto.
    for dtype in (torch.float64, torch.bfloat16, torch.float32):
        assert ik.linear_logprobs(h.to(dtype), w.to(dtype), targets).dtype == ref.accumulate_dtype(dtype)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was not set"):
        ik.linear_logprobs(h.float(), w.float(), targets, backend="triton")


# --------------------------------------------------------------------------- v2 paths

BACKWARD_PATHS = {
    # name: ({plan override: value}, grad_filter_eps); the others' overrides stay None
    "one_chunk_unfiltered": ({"_ROW_CHUNK": 10_000}, None),
    "rows_unfiltered": ({"_ROW_CHUNK": 16}, None),
    "rows_filtered": ({"_ROW_CHUNK": 16}, "auto"),
    "rows_filtered_strong_tile_max": ({"_ROW_CHUNK": 32, "_TILE_MAX": True}, 1e-3),
    "rows_filtered_no_tile_max": ({"_ROW_CHUNK": 16, "_TILE_MAX": False}, "auto"),
    "vocab_one_chunk": ({"_VOCAB_CHUNK": 10_000}, None),
    "vocab_unfiltered": ({"_VOCAB_CHUNK": 64}, None),
    "vocab_filtered_tile_max": ({"_VOCAB_CHUNK": 64, "_TILE_MAX": True}, "auto"),
    "vocab_filtered_strong_tile_max": ({"_VOCAB_CHUNK": 96, "_TILE_MAX": True}, 1e-3),
    "vocab_filtered_no_tile_max": ({"_VOCAB_CHUNK": 64, "_TILE_MAX": False}, 1e-3),
}


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("path", sorted(BACKWARD_PATHS))
def test_backward_paths_three_way(monkeypatch, dtype, path):
    """Workspace in one chunk or several (the last one partial) along rows or the vocabulary,
    gradient filter off / auto / strong (1e-3, far above auto), the saved row maxima gating
    dlogits or not: three-way on every output and gradient. (That the filter does skip tiles
    is test_filter_skips_tiles_and_off_switch's job.)"""
    overrides, eps = BACKWARD_PATHS[path]
    for name, value in overrides.items():
        monkeypatch.setattr(kernels, name, value)
    inputs, targets = make_inputs(70, 40, 230, dtype, ignore=(3, 50), seed=11)
    inputs["hidden"] = inputs["hidden"] * 2.0  # a sharper softmax: many entries below 1e-3
    check_three_way(inputs, targets, dtype, softcap=8.0, temperature=0.9, grad_filter_eps=eps)


@pytest.mark.interpret
def test_filter_skips_tiles_and_off_switch(monkeypatch):
    """With a peaked distribution the filter clears flags; with it off only all-zero tiles
    (ignored rows) are skipped. A target never makes its tile live (the one-hot term is added
    from the sorted target rows): with the threshold huge only tiles holding a softmax entry
    >= 0.9 stay live, and the gradients of the target rows in dead tiles are still exact."""
    monkeypatch.setattr(kernels, "_ROW_CHUNK", 10_000)
    flags = []
    real_empty = kernels._empty

    def spy(shape, dtype, device):
        out = real_empty(shape, dtype, device)
        if dtype == torch.uint8:
            flags.append(out)
        return out

    monkeypatch.setattr(kernels, "_empty", spy)
    inputs, targets = make_inputs(48, 32, 320, torch.float32, value=False, ignore=range(32, 48), seed=2)
    # Trained-LM-like: the mass sits on a few frequent tokens (the first tile, through the bias),
    # and so do the targets; targets of the second row block also sit in tile 3 (dead).
    inputs["bias"] = torch.where(torch.arange(320) < 32, 0.0, -25.0).double()
    targets[:32] = torch.arange(32) % 32
    targets[16:20] = torch.tensor([96, 97, 100, 127])
    live, grads = {}, {}
    for eps in (None, 1e-3, 0.9):
        flags.clear()
        grads[eps] = run(inputs, targets, torch.float32, "triton", ("hidden", "weight"), grad_filter_eps=eps)
        live[eps] = flags[-1].clone()
    # The 16 ignored rows never reach the kernels (the op passes only rows with a target).
    assert live[None].shape == (2, 10)
    assert live[None].all(), "off: every tile of a valid row block is live"
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(live[1e-3].bool(), expected), "1e-3: only the tile holding the mass; tile 3's targets do not count"
    h, w, b = (inputs[k] for k in ("hidden", "weight", "bias"))
    p = torch.softmax(h @ w.T + b, dim=1)
    valid = targets != -100
    peak = (p[valid].reshape(32, 10, 32) >= 0.9).any(2)
    assert torch.equal(live[0.9].bool(), peak.reshape(2, 16, 10).any(1)), "0.9: tiles with an entry >= 0.9 only"
    gold = run(inputs, targets, torch.float64, "reference", ("hidden", "weight"))
    for row in (96, 97, 100, 127):  # their whole gradient is the one-hot term (p there ~ e^-25)
        assert torch.allclose(grads[1e-3]["d_weight"][row].double(), gold["d_weight"][row], atol=1e-5), row
        assert gold["d_weight"][row].abs().max() > 0.1, row


@pytest.mark.interpret
@pytest.mark.parametrize("saved", [True, False])
def test_saved_row_maxima_skip_dead_tiles(monkeypatch, saved):
    """With the forward's row maxima the backward does not recompute a tile whose softmax
    entries all sit below the filter: NaN weight rows there (swapped in after the forward)
    leave every gradient finite; without them (or with a recompute) the NaN reaches d_hidden."""
    n, d, v = 48, 32, 320  # 10 vocab tiles of 32; the mass on tile 0, tiles 5..9 dead
    inputs, targets = make_inputs(n, d, v, torch.float32, value=False, seed=2)
    h, w = inputs["hidden"].float(), inputs["weight"].float()
    b = torch.where(torch.arange(v) < 32, 0.0, -25.0)
    targets = targets % 160
    kw = dict(temperature=1.0, softcap=None, ignore_index=-100)
    p = plan.launch_plan(n, d, v, "fp32", "interpreter", tile_max=True)
    monkeypatch.setattr(kernels, "_TILE_MAX", True)
    tile_max = kernels.tile_max_buffer(h, w) if saved else None
    assert p.tile_max_bytes > 0 and (tile_max is None or tile_max.shape == (n, p.forward[0].k_total))
    _, _, lse = kernels.forward_launch(h, w, b, targets, None, None, tile_max=tile_max, **kw)
    w_bad = w.clone()
    w_bad[160:] = float("nan")
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    dh, dw, db, _, _ = kernels.backward_launch(g, None, h, w_bad, b, targets, None, lse, needs=(True, True, True, False, False),
                                               grad_filter_eps=1e-3, tile_max=tile_max, **kw)
    if saved:
        assert torch.isfinite(dh).all() and torch.isfinite(db).all()
        assert torch.equal(db[160:], torch.zeros(160)) and torch.equal(dw[160:], torch.zeros(160, d))
    else:
        assert torch.isnan(dh).all()


@pytest.mark.interpret
def test_grouped_swizzle_matches_plan():
    """The kernels' ``_grouped`` (Triton) and ``plan.grouped_program`` (Python) agree on every pid."""
    for grid_m, grid_n, group_m in [(7, 3, 2), (13, 5, 4), (1, 9, 8), (10, 1, 3), (6, 6, 6)]:
        out = torch.full((grid_m * grid_n, 2), -1, dtype=torch.int32)
        kernels._grouped_probe[(grid_m * grid_n,)](out, grid_m, grid_n, GROUP_M=group_m)
        want = [plan.grouped_program(pid, grid_m, grid_n, group_m) for pid in range(grid_m * grid_n)]
        assert out.tolist() == [list(w) for w in want], (grid_m, grid_n, group_m)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_batch_invariance(dtype):
    """A row's log-prob and reward are bitwise the same alone and inside batches of several sizes
    (at any position): no block size or split depends on N, no reduction mixes rows."""
    n_max, d, v = 40, 24, 200  # 7 vocab tiles -> 3 splits under the interpreter
    inputs, targets = make_inputs(n_max, d, v, dtype, seed=5)
    h, w, b, vw, vb = (inputs[k].to(dtype) for k in INPUT_NAMES)
    row = 7

    def one(idx):
        logp, rewards = ik.linear_logprobs_and_rewards(
            h[idx], w, targets[idx], vw, bias=b, value_bias=vb, softcap=5.0, backend="triton"
        )
        return logp, rewards

    alone = one(torch.tensor([row]))
    for size in (2, 17, 33, 40):
        others = [i for i in range(n_max) if i != row][: size - 1]
        position = size // 2
        idx = torch.tensor(others[:position] + [row] + others[position:])
        logp, rewards = one(idx)
        assert torch.equal(logp[position : position + 1], alone[0]), size
        assert torch.equal(rewards[position : position + 1], alone[1]), size


@pytest.mark.interpret
@pytest.mark.parametrize("override", [("_ROW_CHUNK", 16), ("_VOCAB_CHUNK", 64)])
def test_backward_is_deterministic(monkeypatch, override):
    monkeypatch.setattr(kernels, *override)
    inputs, targets = make_inputs(45, 24, 150, torch.float16, ignore=(1,), seed=8)
    first = run(inputs, targets, torch.float16, "triton", softcap=3.0)
    second = run(inputs, targets, torch.float16, "triton", softcap=3.0)
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _reference_logits(h, w, b, softcap, temperature):
    x = h @ w.T + b
    return (softcap * torch.tanh(x / softcap)) / temperature


@pytest.mark.interpret
def test_vocab_parallel_contract():
    """forward_launch / backward_launch on vocabulary shards: global target ids with
    ``vocab_start``, targets outside the shard, and an external (global) lse."""
    n, d, v, split = 21, 24, 150, 70
    inputs, targets = make_inputs(n, d, v, torch.float64, ignore=(4,), seed=9)
    targets[:5] = torch.tensor([0, 69, 70, 149, 100])  # both sides of the shard boundary
    h, w, b = inputs["hidden"], inputs["weight"], inputs["bias"]
    temperature, softcap, ignore = 0.8, 6.0, -100
    valid = targets != ignore
    z = _reference_logits(h, w, b, softcap, temperature)
    shards = [(0, slice(0, split)), (split, slice(split, v))]
    lses = []
    for start, cols in shards:
        logp, rewards, lse = kernels.forward_launch(
            h.float(), w[cols].float(), b[cols].float(), targets, None, None,
            temperature=temperature, softcap=softcap, ignore_index=ignore, vocab_start=start,
        )
        z_local = z[:, cols]
        lse_local = torch.logsumexp(z_local, dim=1)
        local_t = targets - start
        inside = valid & (local_t >= 0) & (local_t < z_local.shape[1])
        t_logit = torch.where(inside, z_local.gather(1, local_t.clamp(0, z_local.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        want = torch.where(valid, t_logit - lse_local, 0.0)
        assert rewards is None
        torch.testing.assert_close(lse.double(), lse_local, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
        lses.append(lse)
    lse_global = torch.logsumexp(torch.stack(lses), dim=0)
    # Gold: the full-vocabulary gradient of sum(g * logp), by autograd in float64.
    g = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    gold_logp = ref.linear_logprobs_reference(*leaves[:2], targets, leaves[2], temperature, softcap, ignore)
    gold = torch.autograd.grad((gold_logp * g).sum(), leaves)
    d_hidden = torch.zeros(n, d, dtype=torch.float64)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore, needs=(True, True, True, False, False))
    for start, cols in shards:
        dh, dw, db, dvw, dvb = kernels.backward_launch(
            g.float(), None, h.float(), w[cols].float(), b[cols].float(), targets, None, lse_global,
            vocab_start=start, grad_filter_eps=None, **kw,
        )
        assert dvw is None and dvb is None
        d_hidden += dh.double()
        torch.testing.assert_close(dw.double(), gold[1][cols], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(db.double(), gold[2][cols], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_hidden, gold[0], rtol=1e-4, atol=1e-5)


def test_grad_filter_eps_argument():
    from icrm_kernels.linear_logprobs import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float16) == 2.0**-15
    assert resolve_filter_eps("auto", torch.float32) is None and resolve_filter_eps(None, torch.bfloat16) is None
    assert resolve_filter_eps(0, torch.float32) == 0.0 and resolve_filter_eps(1e-3, torch.float32) == 1e-3
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    for bad in ("fast", -1.0, True, float("nan")):
        with pytest.raises(ValueError, match="grad_filter_eps must be None, 'auto' or a float >= 0"):
            ik.linear_logprobs(h, w, torch.zeros(3, dtype=torch.int64), grad_filter_eps=bad, backend="reference")


# --------------------------------------------------------------------------- CUDA

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (30.0, 0.7)])
def test_cuda_realistic_shapes(dtype, softcap, temperature):
    """Random inputs give a flat softmax, where the bf16 "auto" filter drops more than the
    rounding error (kernels.py header): the exact path here, the filter on peaked data below."""
    inputs, targets = make_inputs(1031, 1000, 32003, dtype, ignore=range(0, 1031, 7))
    check_three_way(inputs, targets, dtype, softcap=softcap, temperature=temperature, grad_filter_eps=None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_filter_auto_on_peaked_distribution(dtype):
    """The default filter where it pays off: the mass on the first 1024 (frequent) tokens, the
    targets among them; the tiles past them are skipped and the three-way rule still holds."""
    n, d, v = 1031, 1000, 32003
    inputs, targets = make_inputs(n, d, v, dtype, ignore=range(0, n, 7), seed=6)
    inputs["bias"] = torch.where(torch.arange(v, device="cuda") < 1024, 0.0, -25.0).double()
    targets = torch.where(targets == -100, targets, targets % 1024)
    check_three_way(inputs, targets, dtype, softcap=30.0, grad_filter_eps="auto")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_far_apart_maxima_and_all_ignored_blocks(dtype):
    inputs, targets = make_inputs(515, 256, 50001, dtype, seed=4)
    targets[:300] = -100  # whole row blocks ignored
    # +-80 offsets alternating every 4096 vocab entries, through the bias: the running max jumps
    # between tiles. (Through a weight column, as in the interpreter test, d_hidden would carry
    # 80 * (bf16 rounding of dx) and test the documented bf16 cast of dx rather than the lse.)
    tile_sign = torch.where(torch.arange(50001, device="cuda") // 4096 % 2 == 0, -1.0, 1.0).double()
    inputs["bias"] = 80.0 * tile_sign + inputs["bias"]
    check_three_way(inputs, targets, dtype)


@pytest.mark.cuda
def test_cuda_no_nv_buffer_when_nv_exceeds_int32():
    """N * V > 2^31 in bf16: int64 indexing stays right, and the extra memory of forward +
    backward stays within 10% of inputs + gradients (the plan's workspace; no fp32 copy of
    d_hidden / d_weight), which an N x V buffer (4.4 GB here) could never meet."""
    n, d, v = 17000, 2048, 128256
    assert n * v > 2**31
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[-5:] = v - 1  # the last rows and last vocab entries: the largest offsets
    torch.cuda.synchronize()
    inputs_bytes = (hidden.numel() + weight.numel()) * 2
    grads_bytes = inputs_bytes
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # the inputs (plus whatever earlier tests left alive)
    logp = ik.linear_logprobs(hidden, weight, targets, backend="triton")
    logp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    workspace = kernels.launch_plan_for(hidden, weight).workspace_bytes
    assert workspace <= 0.1 * (inputs_bytes + grads_bytes)
    # peak <= gradients + 10% of (inputs + gradients) (+ 1 MiB for targets-sized temporaries).
    assert extra <= grads_bytes + 0.1 * (inputs_bytes + grads_bytes) + 2**20, f"{extra / 2**20:.0f} MiB over the inputs"
    # Correctness at this size too (three-way, against the chunked reference in bf16 and fp64).
    kern = {"logp": logp.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad}
    runs = {}
    for ref_dtype in (dtype, torch.float64):
        h, w = hidden.detach().to(ref_dtype).requires_grad_(), weight.detach().to(ref_dtype).requires_grad_()
        lp = ik.linear_logprobs(h, w, targets, backend="reference")
        lp.sum().backward()
        runs[ref_dtype] = {"logp": lp.detach(), "d_hidden": h.grad, "d_weight": w.grad}
        del h, w, lp
    for name in kern:
        gold = runs[torch.float64][name]
        slack = chunk_rounding_slack(name, gold, dtype, n, d, v)
        assert_three_way(kern[name], runs[dtype][name], gold, dtype, name, slack)
