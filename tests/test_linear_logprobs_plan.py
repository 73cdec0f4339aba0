"""The launch plan of the linear_logprobs kernels (plan.py, pure Python): memory bound at the
target shapes, batch invariance of the forward plan, the grouped order, coverage of every tile,
the coupling of the backward tiles, and the dispatch rule (``auto`` picks Triton on CUDA)."""

import types

import pytest
import torch

from icrm_kernels import _dispatch
from icrm_kernels.linear_logprobs import plan

TARGET_SHAPES = [(16384, 4096, 128256), (4096, 2048, 256000)]


@pytest.mark.parametrize("arch", plan.ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("n,d,v", TARGET_SHAPES)
def test_workspace_within_ten_percent_at_target_shapes(n, d, v, dtype, arch):
    p = plan.launch_plan(n, d, v, dtype, arch)
    inputs_and_grads = 2 * (n * d + v * d) * 2
    assert p.workspace_bytes <= 0.10 * inputs_and_grads, (p.workspace_bytes, inputs_and_grads)
    assert p.within_budget and p.budget_bytes <= 0.10 * inputs_and_grads
    # The budget is used, not wasted: one more tile of dx along the chunked axis would not fit.
    cfg = plan.configs(dtype, arch).dlogits
    unit, other = (cfg.block_m, v) if p.backward_axis == "rows" else (cfg.block_n, n)
    assert p.backward_axis == "vocab" and p.chunk_size % unit == 0
    assert p.workspace_bytes + unit * other * 2 > p.budget_bytes
    assert p.num_chunks == -(-v // p.chunk_size) == len(p.chunks)


@pytest.mark.parametrize("arch", ["sm_90", "sm_86", "interpreter"])
@pytest.mark.parametrize("n,d,v", [(1, 64, 32000), (300, 128, 32000), (4096, 512, 32000), (2, 16, 1000), (9, 8, 50)])
def test_workspace_within_bound_down_to_one_row(n, d, v, arch):
    """Small D: fewer vocab entries (N < V) or rows than a tile per chunk, still within 10%,
    unless one of them (a column or row of dx) plus lse is already over it (``within_budget``
    then says so)."""
    p = plan.launch_plan(n, d, v, "bf16", arch)
    cfg = plan.configs("bf16", arch).dlogits
    other = n if p.backward_axis == "vocab" else v
    one = 4 * n + 4 * d + other * 2 + -(-other // (cfg.block_m if p.backward_axis == "vocab" else cfg.block_n))
    assert p.within_budget == (p.workspace_bytes <= p.budget_bytes)
    if one <= p.budget_bytes:
        assert p.within_budget, (p.chunk_size, p.workspace_bytes, p.budget_bytes)
    else:
        assert p.chunk_size == 1
    total = v if p.backward_axis == "vocab" else n
    assert p.chunk_size >= 1 and p.num_chunks * p.chunk_size >= total


def test_workspace_bytes_formula():
    p = plan.launch_plan(1000, 512, 32000, "bf16", "sm_90")
    cfg = plan.configs("bf16", "sm_90")
    assert p.backward_axis == "vocab" and p.row_chunk == 1000
    flags = -(-1000 // cfg.dlogits.block_m) * -(-p.vocab_chunk // cfg.dlogits.block_n)
    assert p.tile_max_bytes in (0, 2 * 1000 * -(-32000 // cfg.forward.block_n))
    assert p.workspace_bytes == 4 * 1000 + p.tile_max_bytes + max(
        4 * (p.vocab_splits + 1) * 1000, 1000 * p.vocab_chunk * 2 + flags + 4 * 512)


@pytest.mark.parametrize("arch", plan.KEYS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_forward_plan_does_not_depend_on_n(arch, dtype):
    """Batch invariance starts here: the splits and every forward block size are the same for
    every N (the kernels' per-row arithmetic then depends on D, V and the arch only)."""
    plans = [plan.launch_plan(n, 96, 5000, dtype, arch) for n in (1, 7, 128, 1000, 70000)]
    assert len({p.vocab_splits for p in plans}) == 1
    assert len({p.forward[0].config for p in plans}) == 1
    assert len({(p.forward[0].k_tiles, p.forward[0].k_total) for p in plans}) == 1


@pytest.mark.parametrize("grid_m,grid_n,group_m", [(1, 1, 4), (7, 3, 2), (13, 8, 16), (5, 40, 3), (64, 1, 8)])
def test_grouped_program_is_a_bijection_in_groups(grid_m, grid_n, group_m):
    seen = [plan.grouped_program(pid, grid_m, grid_n, group_m) for pid in range(grid_m * grid_n)]
    assert sorted(seen) == [(m, n) for m in range(grid_m) for n in range(grid_n)]
    # Consecutive pids stay inside one group of group_m rows.
    for pid, (m, _) in enumerate(seen):
        assert m // group_m == pid // (group_m * grid_n)


@pytest.mark.parametrize("arch", ["sm_90", "sm_86", "interpreter"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_steps_cover_every_tile_once(arch, dtype):
    n, d, v = 1000, 300, 9000
    p = plan.launch_plan(n, d, v, dtype, arch, row_chunk=300)
    fwd = p.forward[0]
    steps = [s for pid in range(fwd.grid[0]) for s in fwd.steps(pid)]
    assert sorted(steps) == [(m, t) for m in range(fwd.grid_m) for t in range(fwd.k_total)]
    assert fwd.grid_n == p.vocab_splits
    last_rows = n - (p.num_chunks - 1) * p.row_chunk
    for rows in (p.row_chunk, last_rows):
        dlogits, dgrad = p.backward_chunk(rows)
        dweight, dhidden = dgrad.parts
        assert dlogits.grid_m == -(-rows // dlogits.config.block_m)
        tiles = sorted(s for pid in range(dlogits.grid[0]) for s in dlogits.steps(pid))
        assert tiles == [(m, t) for m in range(dlogits.grid_m) for t in range(dlogits.grid_n)]
        for pid in range(dhidden.grid[0]):
            m, _ = dhidden.program(pid)
            assert dhidden.steps(pid) == [(m, t) for t in range(dlogits.grid_n)]
        for pid in range(dweight.grid[0]):
            t, _ = dweight.program(pid)
            assert dweight.steps(pid) == [(t, r) for r in range(dlogits.grid_m)]
        assert dhidden.grid_n * dhidden.config.block_n >= d and dweight.grid_m == dlogits.grid_n
    assert p.backward == p.backward_chunk(min(p.row_chunk, n))


@pytest.mark.parametrize("arch", plan.KEYS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_backward_tiles_are_coupled_and_fit_shared_memory(arch, dtype):
    cfg = plan.configs(dtype, arch)
    dl, dh, dw = cfg.dlogits, cfg.dhidden, cfg.dweight
    assert dh.block_m == dl.block_m and dl.block_n % dh.block_k == 0
    assert dw.block_m == dl.block_n and dl.block_m % dw.block_k == 0
    if arch in plan.SMEM_LIMIT:
        esize = plan.DTYPE_BYTES[dtype]
        for c in (cfg.forward, dl, dh, dw):
            # The pipelined operand buffers alone (the compile check reads the real figure).
            assert c.num_stages * (c.block_m + c.block_n) * c.block_k * esize <= plan.SMEM_LIMIT[arch], c


def test_arch_keys_and_bad_arguments():
    assert plan.arch_of((9, 0)) == "sm_90" and plan.arch_of((8, 9)) == "sm_89"
    assert plan.arch_of((8, 6)) == "sm_86" and plan.arch_of((8, 0)) == "sm_80"
    assert plan.arch_of((7, 5)) == "default" and plan.arch_of(None) == "interpreter"
    with pytest.raises(ValueError, match="dtype must be one of"):
        plan.launch_plan(4, 4, 4, "fp64", "sm_90")
    with pytest.raises(ValueError, match="arch must be one of"):
        plan.launch_plan(4, 4, 4, "bf16", "sm_75")
    with pytest.raises(ValueError, match="D must be an int >= 1"):
        plan.launch_plan(4, 0, 4, "bf16", "sm_90")
    with pytest.raises(ValueError, match="rows must be in"):
        plan.launch_plan(4, 4, 4, "bf16", "sm_90").backward_chunk(0)


def _fake_cuda_tensor(dtype):
    """What select_backend looks at (device and dtype), on a machine without a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_picks_triton_for_cuda_tensors(monkeypatch, dtype):
    monkeypatch.setattr(_dispatch, "triton_import_error", lambda: None)
    hidden, weight = _fake_cuda_tensor(dtype), _fake_cuda_tensor(dtype)
    assert _dispatch.select_backend("auto", hidden, weight) == "triton"
    assert _dispatch.select_backend("triton", hidden, weight) == "triton"
    assert _dispatch.select_backend("reference", hidden, weight) == "reference"
    # float64 stays on the reference (the kernels accumulate in fp32); CPU tensors too.
    assert _dispatch.select_backend("auto", _fake_cuda_tensor(torch.float64), weight) == "reference"
    cpu = types.SimpleNamespace(device=torch.device("cpu"), dtype=dtype)
    assert _dispatch.select_backend("auto", cpu, cpu) == "reference"
    monkeypatch.setattr(_dispatch, "triton_import_error", lambda: "ImportError: no triton")
    assert _dispatch.select_backend("auto", hidden, weight) == "reference"
