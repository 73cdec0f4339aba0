"""The launch plan's forward splits and backward chunks (icrm_kernels/linear_logprobs/plan.py,
pure Python): equal wave-filling vocab shares within the memory bound, vocabulary-major or
row-major chunks that write every gradient tile exactly once (then load-add-store it), the
fused dweight + dhidden launch, the saved row maxima, and the per-step accesses that the
performance model replays."""

from collections import Counter

import pytest

from icrm_kernels.linear_logprobs import plan


def test_target_shape_plan():
    p = plan.launch_plan(16384, 4096, 128256, "bf16", "sm_90")
    fwd = p.forward[0]
    # 1002 vocab tiles in 167 equal shares of 6 (at most 202 shares keep the [splits + 2, N]
    # fp32 buffers within 10% of hidden at D = 4096; 167 is the largest divisor below)
    assert (p.vocab_splits, fwd.k_total, fwd.k_tiles) == (167, 1002, 6)
    assert {len(fwd.steps(pid)) for pid in range(fwd.grid[0])} == {6}
    assert 4 * (202 + 2) <= 0.1 * 4096 * 2 < 4 * (203 + 2)
    assert p.backward_axis == "vocab" and p.vocab_chunk == 48 * 128 and p.num_chunks == 21
    assert p.tile_max_bytes == 2 * 16384 * 1002 and p.within_budget
    # the budget is used: one more vocab tile of dx would not fit
    cfg = plan.configs("bf16", "sm_90").dlogits
    assert p.workspace_bytes + cfg.block_n * 16384 * 2 > p.budget_bytes


@pytest.mark.parametrize("v", [1000, 32000, 128256, 151936, 248320])
@pytest.mark.parametrize("d", [64, 512, 2048, 4096])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_vocab_splits_ignore_n_and_keep_partials_within_the_bound(v, d, dtype):
    splits = {plan.launch_plan(n, d, v, dtype, "sm_90").vocab_splits for n in (1, 7, 128, 1000, 70000)}
    assert len(splits) == 1
    s = splits.pop()
    # the forward's fp32 partials ([splits + 2, N]) within 10% of hidden for every N
    assert 4 * (s + 2) <= plan.WORKSPACE_FRACTION * d * plan.DTYPE_BYTES[dtype]
    tiles = -(-v // plan.configs(dtype, "sm_90").forward.block_n)
    shares = [b - a for a, b in (plan.split_tiles(i, s, tiles) for i in range(s))]
    assert sum(shares) == tiles and max(shares) - min(shares) <= 1 and min(shares) >= 1


def _outputs(p, tensor):
    """(chunk index, mode, live, rows, cols) of every store of ``tensor`` in the backward."""
    out = []
    for i, (start, size) in enumerate(p.chunks):
        _, dgrad = p.backward_launches(start, size)
        for pid in range(dgrad.grid[0]):
            for step in dgrad.accesses(pid):
                out += [(i, a.mode, a.live, (a.r0, a.r1), (a.c0, a.c1)) for a in step if a.tensor == tensor]
    return out


@pytest.mark.parametrize("n,v,axis", [(200, 700, "vocab"), (700, 200, "rows")])
def test_every_gradient_tile_is_stored_once_then_accumulated(n, v, axis):
    d = 40
    forced = {"vocab_chunk": 96} if axis == "vocab" else {"row_chunk": 48}
    p = plan.launch_plan(n, d, v, "bf16", "interpreter", **forced)
    assert p.backward_axis == axis and p.num_chunks > 2
    # the gradient of the chunked axis: each tile written once, by one chunk, never loaded
    chunked, other = ("d_weight", "d_hidden") if axis == "vocab" else ("d_hidden", "d_weight")
    stores = _outputs(p, chunked)
    assert {m for _, m, _, _, _ in stores} == {"write"}
    assert Counter((r, c) for _, _, _, r, c in stores).most_common(1)[0][1] == 1
    assert sum((r[1] - r[0]) * (c[1] - c[0]) for _, _, _, r, c in stores) == (v if axis == "vocab" else n) * d
    # the other gradient: stored by the first chunk, loaded-added-stored (when live) by the rest
    acc = _outputs(p, other)
    first = [x for x in acc if x[0] == 0]
    assert {(m, live) for _, m, live, _, _ in first} == {("write", None)}
    assert sum((r[1] - r[0]) * (c[1] - c[0]) for _, _, _, r, c in first) == (n if axis == "vocab" else v) * d
    assert {(m, live) for i, m, live, _, _ in acc if i} == {("rmw", "any")}


def test_dgrad_runs_the_dweight_programs_then_the_dhidden_ones():
    p = plan.launch_plan(300, 256, 1000, "bf16", "interpreter")
    dlogits, dgrad = p.backward_launches(*p.chunks[1])
    dweight, dhidden = dgrad.parts
    assert dgrad.grid[0] == dweight.grid[0] + dhidden.grid[0]
    assert dgrad.part(0) == (dweight, 0) and dgrad.part(dweight.grid[0]) == (dhidden, 0)
    assert dgrad.steps(dweight.grid[0] + 3) == dhidden.steps(3)
    # the coupled tiles: dweight's K loop is dlogits' row blocks, dhidden's its vocab tiles
    assert (dweight.grid_m, dweight.k_tiles) == (dlogits.grid_n, dlogits.grid_m)
    assert (dhidden.grid_m, dhidden.k_tiles) == (dlogits.grid_m, dlogits.grid_n)
    with pytest.raises(ValueError, match="pid"):
        dgrad.part(dgrad.grid[0])


def test_dlogits_reads_the_saved_maxima_and_gates_the_tile_on_its_flag():
    p = plan.launch_plan(300, 256, 1000, "bf16", "interpreter")
    assert p.tile_max_bytes == 2 * 300 * -(-1000 // 32) and p.forward[0].tile_max
    start, size = p.chunks[1]
    dlogits, _ = p.backward_launches(start, size)
    cfg = plan.configs("bf16", "interpreter").dlogits
    for pid in range(dlogits.grid[0]):
        rb, vt = dlogits.program(pid)
        (step,) = dlogits.accesses(pid)
        assert step[0].tensor == "tile_max" and step[0].live is None
        assert {a.live for a in step[1:]} == {(rb, start // cfg.block_n + vt)}
        assert [a.tensor for a in step[1:]] == ["hidden", "weight", "dx"]
    off = plan.launch_plan(300, 256, 1000, "bf16", "interpreter", tile_max=False)
    assert off.tile_max_bytes == 0 and all(a.live is None for a in off.backward[0].accesses(0)[0])


def test_forward_accesses_read_each_tile_and_store_the_partials():
    p = plan.launch_plan(100, 48, 1000, "bf16", "interpreter")
    fwd, merge = p.forward
    writes = Counter()
    for pid in range(fwd.grid[0]):
        steps = fwd.accesses(pid)
        assert len(steps) == len(fwd.steps(pid))
        writes.update((a.tensor, a.r0) for step in steps for a in step if a.mode == "write")
    # split logsumexp rows 0..splits-1 and the target-logit row: one store per row block each
    assert {k: v for k, v in writes.items() if k[0] == "partials"} == {
        ("partials", s): fwd.grid_m * (fwd.grid_n if s == p.vocab_splits else 1) for s in range(p.vocab_splits + 1)}
    assert len(merge.accesses(0)) == p.vocab_splits + 1
