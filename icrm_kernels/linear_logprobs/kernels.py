"""Triton kernels for op (2), the linear log-prob gather, with op (1), the reward head, fused in.

Math (docs/math.md)::

    x = hidden @ weight.T + bias                      [N, V], never stored
    z = softcap * tanh(x / softcap) / temperature     (softcap optional)
    lse = logsumexp_j z_j,  logp = z[target] - lse    (0 where target == ignore_index)
    reward = hidden @ value_weight + value_bias       [N]

    p_j = exp(z_j - lse),  dz_j = g * (1[j = target] - p_j)    (g = 0 on ignored rows)
    dx_j = dz_j / temperature * (1 - tanh(x_j / softcap)^2)
    d_hidden = dx @ weight + g_r * value_weight,  d_weight = dx^T @ hidden,  d_bias = sum_rows dx
    d_value_weight = hidden^T @ g_r,  d_value_bias = sum g_r

Every launch (grid, tile order, block sizes, vocab splits, backward row chunk) comes from
``plan.launch_plan(N, D, V, dtype, arch)``, a pure function that tests, the compile check
(tests/gpu_compile.py) and the performance model (benchmarks/predict.py) read as well.

Forward (``_forward_kernel`` + ``_merge_kernel``): program ``pid`` takes (row block, vocab
split) in the grouped order of ``plan.grouped_program`` (the ``_grouped`` twin below), so the
programs resident at one time share a few row blocks and all splits: the hidden row blocks and
the weight tiles they are reading stay in L2 instead of every row block being re-read from DRAM
for every vocabulary tile. A program walks its split's vocab tiles; each logit tile is a
``tl.dot`` over D with fp32 accumulation, folded at once into an online logsumexp and the target
logit. Split 0 also computes the reward in the D loop of its first tile (each hidden row read
once for both). ``_merge_kernel`` combines the ``[splits, N]`` partials per row in split order.
The number of splits depends on V and the architecture only and no block size on N, and a
row's tiles never mix with other rows, so a row's log-prob and reward are bitwise the same alone
or inside any batch (batch invariance). Only ``lse [N]`` fp32 is saved for the backward.

Backward, in chunks of ``row_chunk`` rows, three launches per chunk, no atomics:

* ``_dlogits_kernel``: recompute the chunk's logit tiles (grouped order), form ``dx`` and store
  it in the input dtype into a workspace ``[row_chunk, V]``, plus a ``live`` flag per (row
  block, vocab tile).
* ``_dhidden_kernel``: ``d_hidden[chunk] = dx @ weight`` as a GEMM over K = V that skips the
  vocab tiles whose flag is 0 for its row block; fp32 accumulation in registers, one rounding
  to the output dtype; ``g_r * value_weight`` is added in its epilogue.
* ``_dweight_kernel``: ``d_weight[tile] += dx^T @ hidden[chunk]`` over K = the chunk's rows,
  skipping row blocks whose flag is 0 and the whole output tile (no load, no store) when all of
  its flags are 0; ``d_bias`` (column sums of dx) from the same pass.

Memory: the workspace is sized (``plan.launch_plan``) to at most 10% of inputs + gradients
(hidden and weight), e.g. 230 MB at N=16384, D=4096, V=128256 bf16 (budget 237 MB); there is
no fp32 copy of ``d_hidden`` or ``d_weight``. ``d_hidden`` is complete within a chunk (one
rounding per element, as eager). ``d_weight`` / ``d_bias`` reduce over all N rows, which no
bounded workspace holds at once, so they are accumulated over the chunks in their own dtype:
one more rounding per chunk (19 chunks at the shape above). For fp32 inputs that is exact fp32
accumulation; for fp16 / bf16 it costs accuracy: at 13 chunks (interpreter, fp16) the d_weight
error was 3.3x the eager reference's (1.5x with one chunk), so the tests bound 16-bit d_weight /
d_bias with the three-way rule plus one ulp of max|gold| per extra chunk. cut-cross-entropy's
default is coarser (bf16 atomics, one rounding per tile). An exact alternative within the same
memory is two passes (rows-chunked for d_hidden, vocabulary-chunked for d_weight), at the price
of recomputing the logits twice (backward 2G + 2fG instead of G + 2fG).
Determinism: every output element is written by one program with a fixed reduction order and
the chunks run in order, so the backward is bitwise deterministic (no ``deterministic=`` switch
is needed). FLOPs: forward G, backward G (recompute) + 2fG (the filtered GEMMs, f = fraction of
live tiles), G = 2NVD, as in cut-cross-entropy.

Gradient filter (``grad_filter_eps``, cut-cross-entropy's ``filter_eps``): a tile is live when
some valid row has ``|1[j = target] - p_j| >= eps`` (the softmax gradient before the upstream
scale, so the test is scale-free), or a NaN. A skipped tile drops only softmax entries below
eps. ``"auto"`` = ``finfo(dtype).eps / 32`` for fp16 / bf16 (CCE's default: 2^-12 for bf16,
2^-15 for fp16), off for fp32; ``None`` = off (then only all-zero tiles are skipped: exact).
Its effect against the float64 gold (benchmarks/filter_accuracy.py: the rule applied in
float64 with the sm_90 128 x 128 tile, N=512, D=256, V=32000; error = max|x - gold| /
max|gold|, next to the error of the inputs and result rounded to the dtype):

    ======  =====  ==========  ==========  ===========  ===========  ============  ============
    dist    dtype  eps         live tiles  d_hidden     d_weight     rounded       rounded
                                           filter err   filter err   d_hidden err  d_weight err
    ======  =====  ==========  ==========  ===========  ===========  ============  ============
    peaked  bf16   2^-12       16.0%       6.9e-4       8.4e-5       5.1e-3        3.8e-3
    peaked  fp16   2^-15       25.6%       4.6e-4       1.2e-5       6.2e-4        4.4e-4
    flat    bf16   2^-12       47.5%       1.8e-2       2.9e-4       3.5e-3        4.4e-3
    flat    fp16   2^-15       100%        0            0            3.8e-4        4.0e-4
    ======  =====  ==========  ==========  ===========  ===========  ============  ============

The filter pays off where the softmax mass sits on few, frequent tokens; on a flat
distribution at bf16 it drops enough of the ``-p`` term to exceed the rounding error, so pass
``grad_filter_eps=None`` for untrained or high-temperature heads.

Block sizes: per architecture in ``plan.py`` (sm_80, sm_86, sm_89, sm_90, a generic fallback
and a small interpreter set), checked against each architecture's registers, spills and shared
memory by tests/gpu_compile.py. ``ICRM_KERNELS_AUTOTUNE`` does not apply to these kernels: the
plan is what runs. fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (never tf32). Index
math is int64 (rows * D, cols * D and rows * V can pass 2^31).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import plan as _plan

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """``pid -> (m, n)`` in grouped order: ``plan.grouped_program``, the same formula."""
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _grouped_probe(out_ptr, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Test hook: writes ``_grouped`` of every pid (compared with ``plan.grouped_program``)."""
    pid = tl.program_id(0)
    m, n = _grouped(pid, grid_m, grid_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, m)
    tl.store(out_ptr + 2 * pid + 1, n)


@triton.jit
def _tanh(y):
    # libdevice.tanh is unavailable under the interpreter; exp(-2|y|) never overflows, and the
    # odd Taylor series takes over near 0 where 1 - exp(-2|y|) would cancel.
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y2 = a * a
    small = a * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, bias_ptr, value_weight_ptr,
    rows, cols, row_mask, col_mask, D,
    inv_temperature, softcap, reward_acc, add_reward,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_VALUE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Logits ``z [BLOCK_M, BLOCK_N]`` (fp32, -inf on columns >= V), the tanh of the softcap (for
    the backward chain; 0 without softcap) and ``reward_acc`` plus ``hidden[rows] @ value_weight``
    when ``add_reward``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dims = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        dim_mask = dims < D
        h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_VALUE:
            if add_reward:
                vw = tl.load(value_weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
                reward_acc += tl.sum(h.to(tl.float32) * vw[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        tanh = _tanh(acc / softcap)
        z = tanh * (softcap * inv_temperature)
    else:
        tanh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        z = acc * inv_temperature
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, tanh, reward_acc


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, value_weight_ptr, value_bias_ptr,
    split_lse_ptr, split_target_ptr, rewards_ptr,
    N, V, D, vocab_start, ignore_index, inv_temperature, softcap, grid_m, num_splits, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_VALUE: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row_block, split = _grouped(tl.program_id(0), grid_m, num_splits, GROUP_M)
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    # This program's share of the vocabulary: whole tiles, split 0 first (it adds the reward).
    v_start = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_N)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    reward = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < V
        z, _, reward = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, value_weight_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, reward, v0 == 0,
            HAS_BIAS, HAS_SOFTCAP, HAS_VALUE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        # Online logsumexp: rescale the running sum to the new running max.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        # Targets are global ids; this weight holds [vocab_start, vocab_start + V) (a target past
        # its end must not match a masked column of the last tile).
        is_target = (cols[None, :] + vocab_start == targets[:, None]) & col_mask[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    partial = split.to(tl.int64) * N + rows
    tl.store(split_lse_ptr + partial, run_max + tl.log(run_sum), mask=row_mask)
    tl.store(split_target_ptr + partial, target_logit, mask=row_mask)
    if HAS_VALUE:
        if split == 0:
            if HAS_VALUE_BIAS:
                reward += tl.load(value_bias_ptr).to(tl.float32)
            tl.store(rewards_ptr + rows, reward, mask=row_mask)


@triton.jit
def _merge_kernel(
    split_lse_ptr, split_target_ptr, targets_ptr, logp_ptr, lse_ptr,
    N, num_splits, ignore_index,
    BLOCK: tl.constexpr,
):
    """``lse = logsumexp over splits``, ``logp = sum of target partials - lse`` (0 on ignored
    rows), per row, splits in order: the same bits whatever N is."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        run_max = tl.maximum(run_max, tl.load(split_lse_ptr + s * N + rows, mask=row_mask, other=0.0))
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        total += tl.exp(tl.load(split_lse_ptr + s * N + rows, mask=row_mask, other=0.0) - run_max)
        target_logit += tl.load(split_target_ptr + s * N + rows, mask=row_mask, other=0.0)
    lse = run_max + tl.log(total)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, tl.where(targets != ignore_index, target_logit - lse, 0.0), mask=row_mask)


@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, dx_ptr, live_ptr,
    row_start, rows_in_chunk, V, D, vocab_start, ignore_index, inv_temperature, softcap, filter_eps,
    grid_m, grid_n,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``dx`` of one (row block, vocab tile) of the chunk into the workspace (only when live) and
    the tile's ``live`` flag."""
    row_block, tile = _grouped(tl.program_id(0), grid_m, grid_n, GROUP_M)
    local = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < rows_in_chunk
    rows = row_start + local
    cols = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < V
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0)
    valid = valid & (g != 0.0)
    live = tl.max(valid.to(tl.int32), axis=0) * 0
    # Ignored rows and rows without upstream gradient add nothing.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        z, tanh, _ = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, hidden_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, g, False,
            HAS_BIAS, HAS_SOFTCAP, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        dz = tl.where(cols[None, :] + vocab_start == targets[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
        dx = g[:, None] * dz * inv_temperature
        if HAS_SOFTCAP:
            dx = dx * (1.0 - tanh * tanh)
        in_tile = valid[:, None] & col_mask[None, :]
        dx = tl.where(in_tile, dx, 0.0)
        adz = tl.abs(dz)
        # Live: an entry above the filter (eps = 0: any nonzero entry), or a NaN to propagate.
        keep = (in_tile & (adz >= filter_eps) & (adz > 0.0)) | (dx != dx)
        live = tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0)
        if live > 0:
            tl.store(dx_ptr + local[:, None] * V + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
    tl.store(live_ptr + row_block * grid_n + tile, live.to(tl.uint8))


@triton.jit
def _dhidden_kernel(
    dx_ptr, live_ptr, weight_ptr, grad_rewards_ptr, value_weight_ptr, d_hidden_ptr,
    row_start, rows_in_chunk, V, D, grid_m, grid_n, vocab_tiles,
    HAS_REWARD_GRAD: tl.constexpr, FLAG_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``d_hidden[rows, dims] = dx[rows, :] @ weight[:, dims] (+ g_r * value_weight[dims])``
    over the live vocab tiles (``FLAG_N`` wide, the dlogits' tile; BLOCK_K divides it)."""
    row_block, dim_block = _grouped(tl.program_id(0), grid_m, grid_n, GROUP_M)
    local = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < rows_in_chunk
    dims = dim_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_mask = dims < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, vocab_tiles * FLAG_N, BLOCK_K):
        if tl.load(live_ptr + row_block * vocab_tiles + k0 // FLAG_N) != 0:
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            col_mask = cols < V
            dx = tl.load(dx_ptr + local[:, None] * V + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
            acc = tl.dot(dx, w, acc, input_precision=DOT_PRECISION)
    rows = row_start + local
    if HAS_REWARD_GRAD:
        g_r = tl.load(grad_rewards_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        value_weight = tl.load(value_weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
        acc += g_r[:, None] * value_weight[None, :]
    tl.store(d_hidden_ptr + rows[:, None] * D + dims[None, :], acc.to(d_hidden_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def _dweight_kernel(
    dx_ptr, live_ptr, hidden_ptr, d_weight_ptr, d_bias_ptr,
    row_start, rows_in_chunk, V, D, grid_m, grid_n, row_blocks,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, FLAG_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``d_weight[tile, dims] += dx[:, tile]^T @ hidden[chunk, dims]`` and (dims block 0)
    ``d_bias[tile] += sum_rows dx[:, tile]`` over the live row blocks (``FLAG_M`` rows, the
    dlogits' row block; BLOCK_K divides it). BLOCK_M is the dlogits' vocab tile and
    ``grid_m`` the number of vocab tiles."""
    tile, dim_block = _grouped(tl.program_id(0), grid_m, grid_n, GROUP_M)
    cols = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < V
    dims = dim_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_mask = dims < D
    any_live = 0
    for rb in range(0, row_blocks):
        any_live = tl.maximum(any_live, tl.load(live_ptr + rb * grid_m + tile).to(tl.int32))
    # Nothing live for this vocab tile: its gradient stays as it is (no load, no store). Without
    # d_weight only the dims-block-0 programs have work (d_bias).
    work = any_live > 0
    if not NEED_WEIGHT:
        work = work & (dim_block == 0)
    if work:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in range(0, row_blocks * FLAG_M, BLOCK_K):
            if tl.load(live_ptr + (r0 // FLAG_M) * grid_m + tile) != 0:
                local = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
                row_mask = local < rows_in_chunk
                dx = tl.load(dx_ptr + local[:, None] * V + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                if NEED_WEIGHT:
                    h = tl.load(hidden_ptr + (row_start + local)[:, None] * D + dims[None, :],
                                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                    acc = tl.dot(tl.trans(dx), h, acc, input_precision=DOT_PRECISION)
                if NEED_BIAS:
                    bias_acc += tl.sum(dx.to(tl.float32), axis=0)
        if NEED_WEIGHT:
            out = d_weight_ptr + cols[:, None] * D + dims[None, :]
            out_mask = col_mask[:, None] & dim_mask[None, :]
            acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(out, acc.to(d_weight_ptr.dtype.element_ty), mask=out_mask)
        if NEED_BIAS:
            if dim_block == 0:
                bias_acc += tl.load(d_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                tl.store(d_bias_ptr + cols, bias_acc.to(d_bias_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _value_weight_grad_kernel(
    hidden_ptr, grad_rewards_ptr, d_value_weight_ptr, N, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``d_value_weight[dims] = hidden[:, dims]^T @ grad_rewards``: one program per D chunk, a
    fixed-order loop over N (deterministic)."""
    dims = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        g = tl.load(grad_rewards_ptr + rows, mask=row_mask, other=0.0)
        acc += tl.sum(h.to(tl.float32) * g[:, None], axis=0)
    tl.store(d_value_weight_ptr + dims, acc, mask=dim_mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

#: Block sizes of the small value-head gradient kernel (a bandwidth-bound column reduction).
_VALUE_GRAD_BLOCK_N, _VALUE_GRAD_BLOCK_D = 64, 64
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Private test override of the backward row chunk (None: the plan's budget-sized chunk).
_ROW_CHUNK: int | None = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fully overwrites comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _arch_key(device: torch.device) -> str:
    """The plan's configuration key of a device: ``"interpreter"`` for CPU tensors, else the
    CUDA architecture (``plan.arch_of``; shared with the consistency kernels)."""
    if device.type != "cuda":
        return "interpreter"
    return _plan.arch_of(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=256)
def _cached_plan(n, d, v, dtype, arch, row_chunk):
    return _plan.launch_plan(n, d, v, dtype, arch, row_chunk=row_chunk)


def launch_plan_for(hidden: torch.Tensor, weight: torch.Tensor) -> _plan.LaunchPlan:
    """The plan the launchers follow for these inputs."""
    n, d = hidden.shape
    return _cached_plan(n, d, weight.shape[0], _DTYPE_NAMES[hidden.dtype], _arch_key(hidden.device), _ROW_CHUNK)


def _meta(launch: _plan.Launch, **constexprs) -> dict:
    cfg = launch.config
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32 (the three-way rule compares with fp32 eager).
    return "ieee" if dtype == torch.float32 else "tf32"


def _softcap_arg(softcap):
    return 1.0 if softcap is None else softcap


def forward_launch(hidden2d, weight, bias, targets, value_weight, value_bias, *, temperature, softcap,
                   ignore_index, vocab_start=0):
    """hidden2d [N, D], weight [V_local, D] (vocab rows ``[vocab_start, vocab_start + V_local)``),
    bias [V_local] or None, targets [N] int64 GLOBAL ids, value_weight [D] or None, value_bias [1]
    or None -> ``(logp [N], rewards [N] or None, lse [N])``, fp32, no autograd.

    ``lse`` is the logsumexp over this weight's rows; a target outside them (and not
    ``ignore_index``) gives ``logp = -lse``.
    """
    hidden, weight, targets = hidden2d.contiguous(), weight.contiguous(), targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    fwd, merge = launch_plan_for(hidden, weight).forward
    splits = fwd.grid_n
    split_lse = _empty((splits, n), torch.float32, device)
    split_target = _empty((splits, n), torch.float32, device)
    rewards = _empty((n,), torch.float32, device) if value_weight is not None else None
    logp, lse = _empty((n,), torch.float32, device), _empty((n,), torch.float32, device)
    if n > 0:
        _forward_kernel[fwd.grid](
            hidden, weight, bias, targets, value_weight, value_bias,
            split_lse, split_target, rewards,
            n, v, d, vocab_start, ignore_index, 1.0 / temperature, _softcap_arg(softcap),
            fwd.grid_m, splits, fwd.k_tiles,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_VALUE=value_weight is not None, HAS_VALUE_BIAS=value_bias is not None,
            **_meta(fwd, DOT_PRECISION=_dot_precision(hidden.dtype)),
        )
        _merge_kernel[merge.grid](
            split_lse, split_target, targets, logp, lse, n, splits, ignore_index,
            BLOCK=merge.config.block_m, num_warps=merge.config.num_warps,
        )
    return logp, rewards, lse


def backward_launch(grad_logp, grad_rewards, hidden2d, weight, bias, targets, value_weight, lse, *,
                    temperature, softcap, ignore_index, vocab_start=0, needs=(True,) * 5, grad_filter_eps=None):
    """Gradients ``(d_hidden, d_weight, d_bias, d_value_weight, d_value_bias)`` in the inputs'
    dtype (None where ``needs`` says no or the input is None), no autograd.

    grad_logp [N] or None, grad_rewards [N] or None, lse [N] fp32: may be a GLOBAL logsumexp
    (softmax = exp(z - lse)); targets are global ids, one outside this weight's rows
    ``[vocab_start, vocab_start + V_local)`` adds no one-hot term. ``grad_filter_eps``: a float
    (resolved, see ``linear_logprobs.resolve_filter_eps``) or None (off).
    """
    hidden, weight, targets, lse = hidden2d.contiguous(), weight.contiguous(), targets.contiguous(), lse.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_hidden, need_weight, need_bias, need_value_weight, need_value_bias = needs
    need_bias = need_bias and bias is not None
    has_value = value_weight is not None and grad_rewards is not None
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    d_hidden = _empty((n, d), dtype, device) if need_hidden else None
    # Accumulated over row chunks in their own dtype (see the module doc): start from zero.
    d_weight = torch.zeros((v, d), dtype=weight.dtype, device=device) if need_weight else None
    d_bias = torch.zeros((v,), dtype=bias.dtype, device=device) if need_bias else None
    if grad_rewards is not None:
        grad_rewards = grad_rewards.contiguous().to(torch.float32)
    if n > 0 and (need_hidden or need_weight or need_bias):
        p = launch_plan_for(hidden, weight)
        grad_logp = torch.zeros(n, dtype=torch.float32, device=device) if grad_logp is None else grad_logp.contiguous()
        dlogits, _, _ = p.backward
        dx = _empty((min(p.row_chunk, n), v), dtype, device)
        live = _empty((dlogits.grid_m, dlogits.grid_n), torch.uint8, device)
        precision = _dot_precision(dtype)
        eps = 0.0 if grad_filter_eps is None else grad_filter_eps
        for row_start in range(0, n, p.row_chunk):
            rows = min(p.row_chunk, n - row_start)
            k_dx, k_dh, k_dw = p.backward_chunk(rows)
            _dlogits_kernel[k_dx.grid](
                hidden, weight, bias, targets, lse, grad_logp, dx, live,
                row_start, rows, v, d, vocab_start, ignore_index, 1.0 / temperature, _softcap_arg(softcap), eps,
                k_dx.grid_m, k_dx.grid_n,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                **_meta(k_dx, DOT_PRECISION=precision),
            )
            if need_hidden:
                _dhidden_kernel[k_dh.grid](
                    dx, live, weight, grad_rewards, value_weight, d_hidden,
                    row_start, rows, v, d, k_dh.grid_m, k_dh.grid_n, k_dh.k_tiles,
                    HAS_REWARD_GRAD=has_value, FLAG_N=k_dx.config.block_n, **_meta(k_dh, DOT_PRECISION=precision),
                )
            if need_weight or need_bias:
                _dweight_kernel[k_dw.grid](
                    dx, live, hidden, d_weight, d_bias,
                    row_start, rows, v, d, k_dw.grid_m, k_dw.grid_n, k_dw.k_tiles,
                    NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, FLAG_M=k_dx.config.block_m,
                    **_meta(k_dw, DOT_PRECISION=precision),
                )
    elif need_hidden:
        # No logit gradient to form: d_hidden is the reward term alone (or zero).
        d_hidden.zero_()
        if has_value:
            d_hidden.addr_(grad_rewards.to(dtype), value_weight.to(dtype))
    d_value_weight = d_value_bias = None
    if value_weight is not None:
        if need_value_weight:
            d_value_weight = torch.zeros(d, dtype=dtype, device=device)
            if has_value and n > 0:
                acc = _empty((d,), torch.float32, device)
                _value_weight_grad_kernel[(triton.cdiv(d, _VALUE_GRAD_BLOCK_D),)](
                    hidden, grad_rewards, acc, n, d, BLOCK_N=_VALUE_GRAD_BLOCK_N, BLOCK_D=_VALUE_GRAD_BLOCK_D,
                )
                d_value_weight = acc.to(dtype)
        if need_value_bias:
            d_value_bias = (grad_rewards.sum() if has_value else torch.zeros((), device=device)).to(dtype).reshape(1)
    return d_hidden, d_weight, d_bias, d_value_weight, d_value_bias


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class _LinearLogprobsFunction(torch.autograd.Function):
    """``(logp [N], rewards [N] or None)``; saves only ``lse [N]`` besides the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, value_weight, value_bias, targets, temperature, softcap, ignore_index,
                grad_filter_eps):
        logp, rewards, lse = forward_launch(
            hidden, weight, bias, targets, value_weight, value_bias,
            temperature=temperature, softcap=softcap, ignore_index=ignore_index,
        )
        ctx.save_for_backward(hidden, weight, bias, value_weight, targets, lse)
        ctx.temperature, ctx.softcap, ctx.ignore_index = temperature, softcap, ignore_index
        ctx.grad_filter_eps = grad_filter_eps
        ctx.has_value_bias = value_bias is not None
        return logp, rewards

    @staticmethod
    def backward(ctx, grad_logp, grad_rewards):
        hidden, weight, bias, value_weight, targets, lse = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        needs[4] = needs[4] and ctx.has_value_bias
        grads = backward_launch(
            grad_logp, grad_rewards, hidden, weight, bias, targets, value_weight, lse,
            temperature=ctx.temperature, softcap=ctx.softcap, ignore_index=ctx.ignore_index,
            needs=tuple(needs), grad_filter_eps=ctx.grad_filter_eps,
        )
        return (*grads, None, None, None, None, None)


def linear_logprobs_triton(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    targets1d: torch.Tensor,
    bias: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    value_bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    grad_filter_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden2d [N, D], weight [V, D], targets1d [N] int64, bias [V], value_weight [D] or [1, D],
    value_bias [] or [1] -> ``(logp [N] fp32, rewards [N] fp32 or None)``.

    Inputs are validated by the caller; ``grad_filter_eps`` is resolved (float or None). Under
    ``torch.no_grad`` (or when nothing requires grad) only the forward kernels run and nothing is
    saved: the frozen-generator path.
    """
    hidden, weight, targets = hidden2d.contiguous(), weight.contiguous(), targets1d.contiguous()
    bias = None if bias is None else bias.contiguous()
    vw = None if value_weight is None else value_weight.reshape(-1).contiguous()
    vb = None if value_bias is None else value_bias.reshape(1).contiguous()
    inputs = (hidden, weight, bias, vw, vb)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        logp, rewards, _ = forward_launch(
            hidden, weight, bias, targets, vw, vb, temperature=temperature, softcap=softcap, ignore_index=ignore_index
        )
        return logp, rewards
    return _LinearLogprobsFunction.apply(
        hidden, weight, bias, vw, vb, targets, temperature, softcap, ignore_index, grad_filter_eps
    )
