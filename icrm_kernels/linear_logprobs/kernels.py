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

Every launch (grid, tile order, block sizes, vocab splits, backward axis and chunk, whether
row maxima are saved) comes from ``plan.launch_plan(N, D, V, dtype, arch)``, a pure function
that tests, the compile check (tests/gpu_compile.py) and the performance model
(benchmarks/predict.py) read as well: the kernels do what the model times.

Forward (``_forward_kernel`` + ``_merge_kernel``): program ``pid`` takes (row block, vocab
split) in the grouped order of ``plan.grouped_program`` (the ``_grouped`` twin below), so the
programs resident at one time share a few row blocks and a band of splits: the hidden row
blocks and the weight tiles they are reading stay in L2. Split ``s`` of ``S`` is the vocab tiles
``[s*T//S, (s+1)*T//S)`` (``plan.split_tiles``, T tiles in all); ``S`` is large (167 shares of
6 tiles at V=128256, D=4096, bf16), so the programs are short and the launch's last wave leaves
SMs idle only briefly (wave filling), with ``S`` capped so the fp32 partials ``[S + 1, N]``
stay within 10% of ``hidden``. Each logit tile is a ``tl.dot`` over D with fp32 accumulation,
folded at once into an online logsumexp. Split 0 also computes the reward in the D loop of its
first tile. The program whose share holds a row's target stores its logit into the one
``[N]`` target row of the partials (one writer, no atomics). When gradients are needed and the
plan says so, each tile also stores its per-row maximum of ``z`` (after bias, softcap and
temperature) as fp16 into ``tile_max [N, T]`` (33 MB at the shape above). ``_merge_kernel``
combines the ``S`` logsumexps per row in split order. ``S`` depends on V, D, the dtype and the
architecture, never on N, no block size depends on N, and a row's tiles never mix with other
rows, so a row's log-prob and reward are bitwise the same alone or inside any batch (batch
invariance). Saved for the backward: ``lse [N]`` fp32 and ``tile_max``.

Backward, in chunks along the plan's ``backward_axis``, two launches per chunk, no atomics:
the vocabulary when N < V (the usual case: chunks of ``vocab_chunk`` entries, all N rows,
workspace ``dx [N, vocab_chunk]``), the rows otherwise (``dx [row_chunk, V]``).

* ``_dlogits_kernel``: for each (row block, vocab tile) of the chunk, first the saved row
  maxima: a row whose ``tile_max - lse`` (raised by the fp16 rounding) is below ``ln(eps)``
  (``-104`` with no filter: ``exp`` underflows to 0) contributes nothing, and a tile with no
  such row is not recomputed (flag 0). Otherwise it recomputes the logit tile, forms the
  softmax part ``dx = -g p / T (1 - tanh^2)`` and stores it in the input dtype into the
  workspace, plus the tile's ``live`` flag from the exact filter test (``p >= eps``).
* The one-hot term ``g / T (1 - tanh(x_y / c)^2)`` at each target is not in ``dx``: a target
  never makes its tile live (with 128-row blocks the targets alone kept 3.5-12% of tiles live).
  The launcher sorts the rows by (row chunk, target) once per backward and recomputes
  ``x_y = hidden . weight[y] + bias[y]`` in fp32 (softcap only); ``_dgrad_kernel`` adds the term.
* Between the two launches, two ``torch.sort`` calls compact the flags into per-row-block lists
  of live vocab tiles and per-tile lists of live row blocks (ascending: the order of the sum).
* ``_dgrad_kernel``: one launch, two roles: first the programs of ``d_weight[tile] = dx[:,
  tile]^T @ hidden`` (K = the tile's live row blocks) plus ``onehot^T @ hidden[rows of the
  tile's targets]`` and ``d_bias``, then those of ``d_hidden = dx @ weight[chunk]`` (K = the row
  block's live vocab tiles) with ``coef * weight[target]`` (a row gather) and ``g_r *
  value_weight`` added where ``d_hidden`` is first stored. Its K loops have no branch inside
  (the old ``if live`` per step kept Triton from pipelining them: one buffer and ``wgmma
  wait_group 0`` every step), so they run with async copies and async wgmma (checked by
  tests/gpu_compile.py). The long dweight programs go first and the short dhidden ones fill the
  SMs as they free up.

Reduction order and rounding. Vocabulary axis: ``d_weight`` / ``d_bias`` rows of a chunk are a
single fp32 sum over all N rows (row blocks in order), rounded once, as eager; ``d_hidden``
reduces over V, which no bounded workspace holds at once, so it is one fp32 partial per chunk
folded into the stored value in chunk order (``load + acc``, rounded to the dtype each time:
21 roundings at N=16384, D=4096, V=128256 bf16). Row axis: the roles swap (``d_hidden`` one
rounding, ``d_weight`` / ``d_bias`` one per row chunk). A gradient row or tile with nothing
live in a later chunk is left as it is (no load, no store). For fp32 inputs the chunked
accumulation is exact fp32 accumulation; for fp16 / bf16 each extra chunk adds at most an ulp
of a partial sum, so the tests bound the chunk-accumulated 16-bit gradient with the three-way
rule plus one ulp of max|gold| per extra chunk (with main's row-major chunks it was
``d_weight``: at 13 chunks, interpreter, fp16, 3.3x the eager reference's error, 1.5x with one
chunk). cut-cross-entropy's default is coarser (bf16 atomics, one rounding per tile).

Memory: workspace (``dx`` chunk + flags), ``lse`` and ``tile_max`` stay within 10% of inputs +
gradients (hidden and weight): 234 MB at N=16384, D=4096, V=128256 bf16 (budget 237 MB), of it
33 MB row maxima; no fp32 copy of ``d_hidden`` or ``d_weight``, which come from ``torch.empty``
(every element is stored by the first chunk that covers it). Determinism: every output
element is written by one program with a fixed reduction order and the chunks run in order,
so the backward is bitwise deterministic (no ``deterministic=`` switch is needed). FLOPs:
forward G, backward f'G (the recompute of the tiles the row maxima cannot rule out: f' >= f,
f' = 1 without saved maxima) + 2fG (the filtered GEMMs), f = fraction of live tiles, G = 2NVD
(cut-cross-entropy: G + 2fG).

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
import math

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
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_VALUE: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Logits ``z [BLOCK_M, BLOCK_N]`` (fp32, -inf on columns >= V), the tanh of the softcap (for
    the backward chain; 0 without softcap) and ``reward_acc`` plus ``hidden[rows] @ value_weight``
    when ``add_reward``. ``EVEN_D`` (BLOCK_K divides D): the K loop loads with the row / column
    masks only, no per-step dims mask."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dims = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        if EVEN_D:
            h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None], other=0.0)
        else:
            dim_mask = dims < D
            h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_VALUE:
            if add_reward:
                vw = tl.load(value_weight_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
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
    split_lse_ptr, target_logit_ptr, tile_max_ptr, rewards_ptr,
    N, V, D, vocab_start, ignore_index, inv_temperature, softcap, grid_m, num_splits, total_tiles,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_VALUE: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr,
    STORE_TILE_MAX: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row_block, split = _grouped(tl.program_id(0), grid_m, num_splits, GROUP_M)
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    # Targets are global ids; this weight holds [vocab_start, vocab_start + V). The local id, as
    # int32 (V < 2^31), or -1 when ignored or outside (it then matches no column, masked or not).
    local_target = targets - vocab_start
    local_target = tl.where((targets != ignore_index) & (local_target >= 0) & (local_target < V),
                            local_target, -1).to(tl.int32)
    # This program's share of the vocabulary: tiles [s*T//S, (s+1)*T//S) (plan.split_tiles),
    # split 0 first (it adds the reward).
    # (split * tiles < 2^31: at most 256 splits of V / BLOCK_N tiles; int32 keeps registers free)
    first_tile = split * total_tiles // num_splits
    last_tile = (split + 1) * total_tiles // num_splits

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    reward = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(first_tile, last_tile):
        cols = tl.cast(t, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (t: an int under the interpreter)
        col_mask = cols < V
        z, _, reward = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, value_weight_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, reward, t == 0,
            HAS_BIAS, HAS_SOFTCAP, HAS_VALUE, EVEN_D, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        tile_max = tl.max(z, axis=1)
        if STORE_TILE_MAX:
            # The backward's dlogits skips a tile whose row maxima bound every softmax entry
            # below the filter (an upper bound kept through the fp16 rounding there).
            tl.store(tile_max_ptr + rows * total_tiles + t, tile_max.to(tl.float16), mask=row_mask)
        # Online logsumexp: rescale the running sum to the new running max.
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        is_target = (t * BLOCK_N + tl.arange(0, BLOCK_N))[None, :] == local_target[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    tl.store(split_lse_ptr + split.to(tl.int64) * N + rows, run_max + tl.log(run_sum), mask=row_mask)
    # One writer per row: the program whose share holds the target (none when it is outside
    # this weight or ignored; the merge then does not read it).
    in_share = (local_target >= first_tile * BLOCK_N) & (local_target < last_tile * BLOCK_N)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & in_share)
    if HAS_VALUE:
        if split == 0:
            if HAS_VALUE_BIAS:
                reward += tl.load(value_bias_ptr).to(tl.float32)
            tl.store(rewards_ptr + rows, reward, mask=row_mask)


@triton.jit
def _merge_kernel(
    split_lse_ptr, target_logit_ptr, targets_ptr, logp_ptr, lse_ptr,
    N, V, vocab_start, num_splits, ignore_index,
    BLOCK: tl.constexpr,
):
    """``lse = logsumexp over splits`` (in split order), ``logp = target logit - lse`` (``-lse``
    for a target outside this weight, 0 on ignored rows), per row: the same bits whatever N is."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        run_max = tl.maximum(run_max, tl.load(split_lse_ptr + s * N + rows, mask=row_mask, other=0.0))
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        total += tl.exp(tl.load(split_lse_ptr + s * N + rows, mask=row_mask, other=0.0) - run_max)
    lse = run_max + tl.log(total)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = targets != ignore_index
    inside = valid & (targets - vocab_start >= 0) & (targets - vocab_start < V)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_mask & inside, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, tl.where(valid, target_logit - lse, 0.0), mask=row_mask)


@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, lse_ptr, grad_ptr, valid_ptr, tile_max_ptr, dx_ptr, live_ptr,
    row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, total_tiles, D,
    inv_temperature, softcap, filter_eps, log_eps, grid_m, grid_n,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TILE_MAX: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The softmax part ``dx = -g p / T (1 - tanh^2)`` of one (row block, vocab tile) of the chunk
    into the workspace (only when live) and the tile's ``live`` flag. The one-hot term of the
    targets is not here: ``_dgrad_kernel`` adds it from the sorted target rows, so a target never
    makes a tile live. Chunk coordinates: rows ``row0 + local``, vocab ``vocab0 + cl``.
    ``valid [N]`` (uint8): the row has a target and a nonzero upstream gradient."""
    row_block, tile = _grouped(tl.program_id(0), grid_m, grid_n, GROUP_M)
    local = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < rows_in_chunk
    rows = row0 + local
    cl = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cl < vocab_in_chunk
    cols = vocab0 + cl
    valid = tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0
    g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0)
    live = tl.max(valid.to(tl.int32), axis=0) * 0
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    maybe = valid
    if TILE_MAX:
        # Every softmax entry of a row is at most exp(t - lse), t its saved (fp16) tile maximum,
        # raised by the fp16 rounding; below eps (or underflowing to 0 with no filter) the row
        # adds nothing here. NaNs and an overflowed -inf recompute.
        t = tl.load(tile_max_ptr + rows * total_tiles + vocab0 // BLOCK_N + tile, mask=row_mask,
                    other=float("-inf")).to(tl.float32)
        bound = t + tl.abs(t) * 0.0009765625 + 0.00006103515625 - lse
        maybe = valid & ((bound >= log_eps) | (lse != lse) | (t != t) | (t == float("-inf")))
    # Ignored rows, rows without upstream gradient and (TILE_MAX) rows below the filter add nothing.
    if tl.max(maybe.to(tl.int32), axis=0) > 0:
        z, tanh, _ = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, hidden_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, g, False,
            HAS_BIAS, HAS_SOFTCAP, False, EVEN_D, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        p = tl.exp(z - lse[:, None])
        dx = -g[:, None] * p * inv_temperature
        if HAS_SOFTCAP:
            dx = dx * (1.0 - tanh * tanh)
        in_tile = valid[:, None] & col_mask[None, :]
        dx = tl.where(in_tile, dx, 0.0)
        # Live: a softmax entry at or above the filter (eps = 0: any nonzero one), or a NaN.
        keep = (in_tile & (p >= filter_eps) & (p > 0.0)) | (dx != dx)
        live = tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0)
        if live > 0:
            tl.store(dx_ptr + local[:, None] * dx_stride + cl[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
    tl.store(live_ptr + row_block * grid_n + tile, live.to(tl.uint8))


@triton.jit
def _dweight_part(
    pid, dx_ptr, hidden_ptr, d_weight_ptr, d_bias_ptr, live_rows_ptr, live_count_ptr,
    sorted_rows_ptr, sorted_coef_ptr, sorted_col_ptr, segments_ptr,
    row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, D, vocab_tiles, dim_blocks, row_blocks,
    ACCUMULATE: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, FLAG_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``d_weight[tile, dims] (+)= dx[:, tile]^T @ hidden[chunk, dims] + onehot^T @ hidden`` and
    (dims block 0) ``d_bias[tile] (+)= sum_rows (dx + onehot)[:, tile]``, a fp32 sum rounded once.

    The K loop walks only the live row blocks of the tile (``live_rows [tile, :live_count[tile]]``,
    ascending: the fixed order of a deterministic sum), ``FLAG_M / BLOCK_K`` steps each, with no
    branch inside, so Triton pipelines it (async copies, async wgmma). Then the one-hot term:
    the rows whose target lies in this tile, ``segments[tile] .. segments[tile + 1]`` of the
    rows sorted by target (``sorted_rows``, coefficient ``g / T (1 - tanh_y^2)``, target column).
    BLOCK_M is the dlogits' vocab tile. Not ACCUMULATE: always stored (zeros when nothing is
    live); ACCUMULATE: loaded, added and stored only when something was added."""
    tile, dim_block = _grouped(pid, vocab_tiles, dim_blocks, GROUP_M)
    cl = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cl < vocab_in_chunk
    cols = vocab0 + cl
    dims = dim_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_mask = dims < D
    STEPS: tl.constexpr = FLAG_M // BLOCK_K
    # Without d_weight only the dims-block-0 programs have work (d_bias).
    if dim_block < (dim_blocks if NEED_WEIGHT else 1):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        count = tl.load(live_count_ptr + tile)
        for i in range(0, count * STEPS):
            rb = tl.load(live_rows_ptr + tile * row_blocks + i // STEPS)
            local = rb.to(tl.int64) * FLAG_M + (i % STEPS) * BLOCK_K + tl.arange(0, BLOCK_K)
            row_mask = local < rows_in_chunk
            dx = tl.load(dx_ptr + local[:, None] * dx_stride + cl[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if NEED_WEIGHT:
                h = tl.load(hidden_ptr + (row0 + local)[:, None] * D + dims[None, :],
                            mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(dx), h, acc, input_precision=DOT_PRECISION)
            if NEED_BIAS:
                bias_acc += tl.sum(dx.to(tl.float32), axis=0)
        seg_start = tl.load(segments_ptr + tile)
        seg_end = tl.load(segments_ptr + tile + 1)
        for j in range(seg_start, seg_end, BLOCK_K):
            idx = j + tl.arange(0, BLOCK_K)
            in_seg = idx < seg_end
            rows = tl.load(sorted_rows_ptr + idx, mask=in_seg, other=0).to(tl.int64)
            coef = tl.load(sorted_coef_ptr + idx, mask=in_seg, other=0.0)
            col = tl.load(sorted_col_ptr + idx, mask=in_seg, other=-1)
            onehot = tl.where(cols[:, None] == col[None, :], coef[None, :], 0.0)  # [vocab, rows]
            if NEED_WEIGHT:
                h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :],
                            mask=in_seg[:, None] & dim_mask[None, :], other=0.0)
                acc = tl.dot(onehot.to(h.dtype), h, acc, input_precision=DOT_PRECISION)
            if NEED_BIAS:
                bias_acc += tl.sum(onehot, axis=1)
        if (count + seg_end - seg_start) + (0 if ACCUMULATE else 1) > 0:
            if NEED_WEIGHT:
                out = d_weight_ptr + cols[:, None] * D + dims[None, :]
                out_mask = col_mask[:, None] & dim_mask[None, :]
                if ACCUMULATE:
                    acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
                tl.store(out, acc.to(d_weight_ptr.dtype.element_ty), mask=out_mask)
            if NEED_BIAS:
                if dim_block == 0:
                    if ACCUMULATE:
                        bias_acc += tl.load(d_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                    tl.store(d_bias_ptr + cols, bias_acc.to(d_bias_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _dhidden_part(
    pid, dx_ptr, weight_ptr, grad_rewards_ptr, value_weight_ptr, d_hidden_ptr, live_tiles_ptr, live_count_ptr,
    row_coef_ptr, row_target_ptr,
    row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, D, row_blocks, dim_blocks, vocab_tiles,
    ACCUMULATE: tl.constexpr, HAS_REWARD_GRAD: tl.constexpr, FLAG_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``d_hidden[rows, dims] (+)= dx[rows, chunk] @ weight[chunk, dims]``, a fp32 sum over the
    row block's live tiles of the chunk (``live_tiles [row_block, :live_count[row_block]]``,
    ascending; ``FLAG_N / BLOCK_K`` steps each; no branch in the loop: pipelined). Not
    ACCUMULATE (the store that first writes these rows): plus the one-hot term
    ``coef * weight[target, dims]`` (a row gather; ``row_target`` is the local target row of
    the weight or -1) and ``g_r * value_weight``. ACCUMULATE: loaded, added and stored only
    when some tile is live."""
    row_block, dim_block = _grouped(pid, row_blocks, dim_blocks, GROUP_M)
    local = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < rows_in_chunk
    dims = dim_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_mask = dims < D
    STEPS: tl.constexpr = FLAG_N // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    count = tl.load(live_count_ptr + row_block)
    for i in range(0, count * STEPS):
        vt = tl.load(live_tiles_ptr + row_block * vocab_tiles + i // STEPS)
        cl = vt.to(tl.int64) * FLAG_N + (i % STEPS) * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = cl < vocab_in_chunk
        dx = tl.load(dx_ptr + local[:, None] * dx_stride + cl[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + (vocab0 + cl)[:, None] * D + dims[None, :],
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = tl.dot(dx, w, acc, input_precision=DOT_PRECISION)
    rows = row0 + local
    out = d_hidden_ptr + rows[:, None] * D + dims[None, :]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if ACCUMULATE:
        if count > 0:
            acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(out, acc.to(d_hidden_ptr.dtype.element_ty), mask=out_mask)
    else:
        target = tl.load(row_target_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        coef = tl.load(row_coef_ptr + rows, mask=row_mask, other=0.0)
        has_target = target >= 0
        w_target = tl.load(weight_ptr + target[:, None] * D + dims[None, :],
                           mask=has_target[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
        acc += coef[:, None] * w_target
        if HAS_REWARD_GRAD:
            g_r = tl.load(grad_rewards_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            value_weight = tl.load(value_weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
            acc += g_r[:, None] * value_weight[None, :]
        tl.store(out, acc.to(d_hidden_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dgrad_kernel(
    dx_ptr, hidden_ptr, weight_ptr, grad_rewards_ptr, value_weight_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    live_tiles_ptr, tile_count_ptr, live_rows_ptr, row_count_ptr,
    sorted_rows_ptr, sorted_coef_ptr, sorted_col_ptr, segments_ptr, row_coef_ptr, row_target_ptr,
    row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, D, row_blocks, vocab_tiles,
    pid_offset, dweight_programs, dw_dim_blocks, dh_dim_blocks,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    ACC_HIDDEN: tl.constexpr, ACC_WEIGHT: tl.constexpr, HAS_REWARD_GRAD: tl.constexpr,
    FLAG_M: tl.constexpr, FLAG_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr, DW_GROUP_M: tl.constexpr,
    DH_BLOCK_N: tl.constexpr, DH_BLOCK_K: tl.constexpr, DH_GROUP_M: tl.constexpr,
):
    """Both GEMMs over the chunk's ``dx`` in one launch (``plan``'s ``_dgrad_kernel``, whose
    parts ``_dweight_kernel`` / ``_dhidden_kernel`` are ``_dweight_part`` / ``_dhidden_part``
    here): pids below ``dweight_programs`` run the dweight role, the rest the dhidden role, each
    with its own block sizes; ``pid_offset`` skips the dweight range when only d_hidden is
    needed (the launch then covers the dhidden range only, and vice versa)."""
    pid = tl.program_id(0) + pid_offset
    if pid < dweight_programs:
        if NEED_WEIGHT or NEED_BIAS:
            _dweight_part(
                pid, dx_ptr, hidden_ptr, d_weight_ptr, d_bias_ptr, live_rows_ptr, row_count_ptr,
                sorted_rows_ptr, sorted_coef_ptr, sorted_col_ptr, segments_ptr,
                row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, D, vocab_tiles, dw_dim_blocks, row_blocks,
                ACC_WEIGHT, NEED_WEIGHT, NEED_BIAS, FLAG_M, DOT_PRECISION, FLAG_N, DW_BLOCK_N, DW_BLOCK_K, DW_GROUP_M,
            )
    else:
        if NEED_HIDDEN:
            _dhidden_part(
                pid - dweight_programs, dx_ptr, weight_ptr, grad_rewards_ptr, value_weight_ptr, d_hidden_ptr,
                live_tiles_ptr, tile_count_ptr, row_coef_ptr, row_target_ptr,
                row0, rows_in_chunk, vocab0, vocab_in_chunk, dx_stride, D, row_blocks, dh_dim_blocks, vocab_tiles,
                ACC_HIDDEN, HAS_REWARD_GRAD, FLAG_N, DOT_PRECISION, FLAG_M, DH_BLOCK_N, DH_BLOCK_K, DH_GROUP_M,
            )


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
#: Private test overrides of the plan (None: the plan's own choice): the backward's row chunk
#: or vocab chunk (forcing that axis), and saving the row maxima on or off.
_ROW_CHUNK: int | None = None
#: Rows per step of the backward's fp32 recompute of the target logits (softcap chain): the
#: gathered weight rows take at most this x D x 4 bytes.
_TARGET_LOGIT_ROWS = 4096
_VOCAB_CHUNK: int | None = None
_TILE_MAX: bool | None = None


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
def _cached_plan(n, d, v, dtype, arch, row_chunk, vocab_chunk, tile_max):
    return _plan.launch_plan(n, d, v, dtype, arch, row_chunk=row_chunk, vocab_chunk=vocab_chunk, tile_max=tile_max)


def launch_plan_for(hidden: torch.Tensor, weight: torch.Tensor) -> _plan.LaunchPlan:
    """The plan the launchers follow for these inputs."""
    n, d = hidden.shape
    return _cached_plan(n, d, weight.shape[0], _DTYPE_NAMES[hidden.dtype], _arch_key(hidden.device),
                        _ROW_CHUNK, _VOCAB_CHUNK, _TILE_MAX)


def tile_max_buffer(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The ``[N, vocab tiles]`` fp16 row-maxima buffer the plan saves for the backward
    (``forward_launch(tile_max=)``, ``backward_launch(tile_max=)``), or None when it saves none."""
    p = launch_plan_for(hidden, weight)
    if p.tile_max_bytes == 0 or hidden.shape[0] == 0:
        return None
    return _empty((hidden.shape[0], p.forward[0].k_total), torch.float16, hidden.device)


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
                   ignore_index, vocab_start=0, tile_max=None):
    """hidden2d [N, D], weight [V_local, D] (vocab rows ``[vocab_start, vocab_start + V_local)``),
    bias [V_local] or None, targets [N] int64 GLOBAL ids, value_weight [D] or None, value_bias [1]
    or None -> ``(logp [N], rewards [N] or None, lse [N])``, fp32, no autograd.

    ``lse`` is the logsumexp over this weight's rows; a target outside them (and not
    ``ignore_index``) gives ``logp = -lse``. ``tile_max``: None, or ``tile_max_buffer(hidden2d,
    weight)`` to fill with the row maxima that ``backward_launch`` uses to skip dead tiles.
    """
    hidden, weight, targets = hidden2d.contiguous(), weight.contiguous(), targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    fwd, merge = launch_plan_for(hidden, weight).forward
    splits = fwd.grid_n
    # Row s < splits: split s's logsumexp; row splits: the target logits (one writer per row).
    partials = _empty((splits + 1, n), torch.float32, device)
    rewards = _empty((n,), torch.float32, device) if value_weight is not None else None
    logp, lse = _empty((n,), torch.float32, device), _empty((n,), torch.float32, device)
    if n > 0:
        _forward_kernel[fwd.grid](
            hidden, weight, bias, targets, value_weight, value_bias,
            partials, partials[splits], tile_max, rewards,
            n, v, d, vocab_start, ignore_index, 1.0 / temperature, _softcap_arg(softcap),
            fwd.grid_m, splits, fwd.k_total,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_VALUE=value_weight is not None, HAS_VALUE_BIAS=value_bias is not None,
            STORE_TILE_MAX=tile_max is not None, EVEN_D=d % fwd.config.block_k == 0,
            **_meta(fwd, DOT_PRECISION=_dot_precision(hidden.dtype)),
        )
        _merge_kernel[merge.grid](
            partials, partials[splits], targets, logp, lse, n, v, vocab_start, splits, ignore_index,
            BLOCK=merge.config.block_m, num_warps=merge.config.num_warps,
        )
    return logp, rewards, lse


def _live_lists(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``live [M, K]`` flags -> ``(lists [M, K] int32, counts [M] int32)``: row ``m`` of ``lists``
    starts with the live K indices of ``m`` in ascending order (``counts[m]`` of them), so the
    dgrad K loops walk only live tiles, in the order of a deterministic sum."""
    dead = (live == 0).to(torch.uint8).contiguous()
    lists = torch.sort(dead, dim=1, stable=True).indices.to(torch.int32).contiguous()
    return lists, (1 - dead).sum(1, dtype=torch.int32)


def _onehot_rows(hidden, weight, bias, targets, g, *, vocab_start, ignore_index, temperature, softcap, row_chunk):
    """The one-hot part of the logit gradient, ``dx[i, y_i] += coef_i``, handled apart from the
    tiles (a target never makes its tile live). Returns ``valid [N] uint8`` (the row adds a
    softmax term: a target and a nonzero upstream gradient), ``row_target [N] int32`` (the
    target's row of this weight, -1 when ignored, outside this shard or without gradient),
    ``coef [N] fp32`` (``g / T * (1 - tanh(x_y / c)^2)``: the softcap's chain at the target
    logit ``x_y = hidden . weight[y] + bias[y]``, recomputed in fp32 in row chunks of at most
    ``_TARGET_LOGIT_ROWS`` x D) and the rows sorted by ``(row chunk, row_target)`` for the
    dweight role: ``(keys, rows, coef, col)``; ``row_chunk``: rows per backward row chunk."""
    n, v = targets.shape[0], weight.shape[0]
    valid = (targets != ignore_index) & (g != 0)
    local = targets - vocab_start
    owned = valid & (local >= 0) & (local < v)
    row_target = torch.where(owned, local, -1).to(torch.int32)
    coef = g / temperature
    if softcap is not None:
        safe = local.clamp(0, v - 1)
        x = torch.empty(n, dtype=torch.float32, device=g.device)
        for r0 in range(0, n, _TARGET_LOGIT_ROWS):
            rows = slice(r0, r0 + _TARGET_LOGIT_ROWS)
            x[rows] = (hidden[rows].float() * weight.index_select(0, safe[rows]).float()).sum(1)
        if bias is not None:
            x += bias.float().index_select(0, safe)
        tanh = torch.tanh(x / softcap)
        coef = coef * (1.0 - tanh * tanh)
    coef = torch.where(owned, coef, torch.zeros((), device=g.device))
    chunk_of_row = torch.arange(n, device=targets.device) // row_chunk
    big = torch.iinfo(torch.int64).max
    keys = torch.where(owned, chunk_of_row * (v + 1) + local, big)
    keys, order = torch.sort(keys, stable=True)
    return valid.to(torch.uint8), row_target, coef, (keys, order.to(torch.int32), coef[order], row_target[order])


def backward_launch(grad_logp, grad_rewards, hidden2d, weight, bias, targets, value_weight, lse, *,
                    temperature, softcap, ignore_index, vocab_start=0, needs=(True,) * 5, grad_filter_eps=None,
                    tile_max=None):
    """Gradients ``(d_hidden, d_weight, d_bias, d_value_weight, d_value_bias)`` in the inputs'
    dtype (None where ``needs`` says no or the input is None), no autograd.

    grad_logp [N] or None, grad_rewards [N] or None, lse [N] fp32: may be a GLOBAL logsumexp
    (softmax = exp(z - lse)); targets are global ids, one outside this weight's rows
    ``[vocab_start, vocab_start + V_local)`` adds no one-hot term. ``grad_filter_eps``: a float
    (resolved, see ``linear_logprobs.resolve_filter_eps``) or None (off). ``tile_max``: the
    buffer ``forward_launch`` filled (dead tiles are then not recomputed), or None.
    """
    hidden, weight, targets, lse = hidden2d.contiguous(), weight.contiguous(), targets.contiguous(), lse.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_hidden, need_weight, need_bias, need_value_weight, need_value_bias = needs
    need_bias = need_bias and bias is not None
    has_value = value_weight is not None and grad_rewards is not None
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    # Every element is stored by the first chunk that covers it (module doc), so no zero fill.
    d_hidden = _empty((n, d), dtype, device) if need_hidden else None
    d_weight = _empty((v, d), weight.dtype, device) if need_weight else None
    d_bias = _empty((v,), bias.dtype, device) if need_bias else None
    if grad_rewards is not None:
        grad_rewards = grad_rewards.contiguous().to(torch.float32)
    if n > 0 and (need_hidden or need_weight or need_bias):
        p = launch_plan_for(hidden, weight)
        g = torch.zeros(n, dtype=torch.float32, device=device) if grad_logp is None else grad_logp.contiguous().float()
        valid, row_target, row_coef, (keys, sorted_rows, sorted_coef, sorted_col) = _onehot_rows(
            hidden, weight, bias, targets, g, vocab_start=vocab_start, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, row_chunk=p.row_chunk)
        k1, _ = p.backward
        dx = _empty((min(p.row_chunk, n), v) if p.backward_axis == "rows" else (n, min(p.vocab_chunk, v)), dtype, device)
        live = _empty((k1.grid_m, k1.grid_n), torch.uint8, device)
        precision = _dot_precision(dtype)
        eps = 0.0 if grad_filter_eps is None else grad_filter_eps
        # exp(x) of fp32 is 0 below about -103.3: with no filter a tile below that adds nothing.
        log_eps = math.log(eps) if eps > 0 else -104.0
        use_tile_max = tile_max is not None and p.tile_max_bytes > 0
        flag_n = k1.config.block_n
        for start, size in p.chunks:
            k1, dgrad = p.backward_launches(start, size)
            chunk_live = live.view(-1)[: k1.grid_m * k1.grid_n].view(k1.grid_m, k1.grid_n)
            _dlogits_kernel[k1.grid](
                hidden, weight, bias, lse, g, valid, tile_max if use_tile_max else lse, dx, chunk_live,
                k1.row0, k1.rows, k1.vocab0, k1.vocab, dx.shape[1], p.forward[0].k_total, d,
                1.0 / temperature, _softcap_arg(softcap), eps, log_eps, k1.grid_m, k1.grid_n,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, TILE_MAX=use_tile_max,
                EVEN_D=d % k1.config.block_k == 0, **_meta(k1, DOT_PRECISION=precision),
            )
            live_tiles, tile_count = _live_lists(chunk_live)
            live_rows, row_count = _live_lists(chunk_live.t())
            # The sorted target rows of each vocab tile of the chunk (and of its row chunk).
            edges = (k1.vocab0 + torch.arange(k1.grid_n + 1, device=device) * flag_n).clamp(max=k1.vocab0 + k1.vocab)
            segments = torch.searchsorted(keys, (k1.row0 // p.row_chunk) * (v + 1) + edges).to(torch.int32)
            dweight, dhidden = dgrad.parts
            need_dw = need_weight or need_bias
            first = 0 if need_dw else dweight.grid[0]
            last = dgrad.grid[0] if need_hidden else dweight.grid[0]
            cfg = dgrad.config
            _dgrad_kernel[(last - first,)](
                dx, hidden, weight, grad_rewards, value_weight, d_hidden, d_weight, d_bias,
                live_tiles, tile_count, live_rows, row_count,
                sorted_rows, sorted_coef, sorted_col, segments, row_coef, row_target,
                k1.row0, k1.rows, k1.vocab0, k1.vocab, dx.shape[1], d, k1.grid_m, k1.grid_n,
                first, dweight.grid[0], dweight.grid_n, dhidden.grid_n,
                NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
                ACC_HIDDEN=dhidden.accumulate, ACC_WEIGHT=dweight.accumulate, HAS_REWARD_GRAD=has_value,
                FLAG_M=k1.config.block_m, FLAG_N=flag_n, DOT_PRECISION=precision,
                DW_BLOCK_N=dweight.config.block_n, DW_BLOCK_K=dweight.config.block_k, DW_GROUP_M=dweight.config.group_m,
                DH_BLOCK_N=dhidden.config.block_n, DH_BLOCK_K=dhidden.config.block_k, DH_GROUP_M=dhidden.config.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    else:
        # No logit gradient to form: d_weight / d_bias are zero, d_hidden the reward term alone.
        for grad in (d_hidden, d_weight, d_bias):
            if grad is not None:
                grad.zero_()
        if need_hidden and has_value:
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
    """``(logp [N], rewards [N] or None)``; saves ``lse [N]`` and (when the plan says so) the
    fp16 row maxima ``[N, vocab tiles]`` besides the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, value_weight, value_bias, targets, temperature, softcap, ignore_index,
                grad_filter_eps):
        tile_max = tile_max_buffer(hidden, weight)
        logp, rewards, lse = forward_launch(
            hidden, weight, bias, targets, value_weight, value_bias,
            temperature=temperature, softcap=softcap, ignore_index=ignore_index, tile_max=tile_max,
        )
        ctx.save_for_backward(hidden, weight, bias, value_weight, targets, lse, tile_max)
        ctx.temperature, ctx.softcap, ctx.ignore_index = temperature, softcap, ignore_index
        ctx.grad_filter_eps = grad_filter_eps
        ctx.has_value_bias = value_bias is not None
        return logp, rewards

    @staticmethod
    def backward(ctx, grad_logp, grad_rewards):
        hidden, weight, bias, value_weight, targets, lse, tile_max = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        needs[4] = needs[4] and ctx.has_value_bias
        grads = backward_launch(
            grad_logp, grad_rewards, hidden, weight, bias, targets, value_weight, lse,
            temperature=ctx.temperature, softcap=ctx.softcap, ignore_index=ctx.ignore_index,
            needs=tuple(needs), grad_filter_eps=ctx.grad_filter_eps, tile_max=tile_max,
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
