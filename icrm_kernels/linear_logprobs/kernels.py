"""Triton kernels for op (2), the linear log-prob gather, with op (1), the reward head, fused in.

Math (docs/math.md)::

    x = hidden @ weight.T + bias                      [N, V], never stored
    z = softcap * tanh(x / softcap) / temperature     (softcap optional)
    lse = logsumexp_j z_j,  logp = z[target] - lse    (0 where target == ignore_index)
    reward = hidden @ value_weight + value_bias       [N]

    dz_j = g * (1[j = target] - exp(z_j - lse))       (g = 0 on ignored rows)
    dx_j = dz_j / temperature * (1 - tanh(x_j / softcap)^2)
    d_hidden = dx @ weight + g_r * value_weight,  d_weight = dx^T @ hidden,  d_bias = sum_rows dx
    d_value_weight = hidden^T @ g_r,  d_value_bias = sum g_r

Forward (``_forward_kernel``): a program takes a block of ``BLOCK_N`` rows and one of
``splits`` contiguous shares of the vocabulary, and walks its share in tiles of ``BLOCK_V``; each
logit tile is a ``tl.dot`` over D in chunks of ``BLOCK_D`` with fp32 accumulation and is folded at
once into a running max / running sum logsumexp and into the target logit (picked by
``cols == target``). The program writes its share's logsumexp and target logit to ``[splits, N]``
partials, which torch combines (``logsumexp`` over splits; a few bytes per row, deterministic);
splitting V keeps the GPU busy when N / BLOCK_N alone is under a wave (``_vocab_splits``). Only
``lse [N]`` (fp32) is saved for the backward. The reward ``hidden @ value_weight`` rides along in
the D loop of the first vocab tile (split 0), so the hidden rows it needs are the ones already
loaded for the logits (each row read once for both).

Backward split: ONE kernel (``_backward_kernel``) over (row block, vocab block) tiles, as in
cut-cross-entropy. A tile recomputes its logits, forms ``dx`` and then, chunk by chunk over D,
adds ``dx @ weight[tile]`` into ``d_hidden[rows]`` and ``dx^T @ hidden[rows]`` into
``d_weight[tile]`` with fp32 atomics. Why not separate d_hidden / d_weight kernels: each of
them reduces over the other axis (V for d_hidden, N for d_weight) and its output tile is a full
``[BLOCK, D]`` row strip; with D in the thousands that strip cannot live in registers, so a
separate kernel would either recompute every logit tile once per D chunk (D / BLOCK_D times the
forward's GEMM) or stream its accumulator through global memory anyway. The single kernel
computes each logit tile exactly once (the forward cost again) and makes both products from it.
The price: the reductions use float atomics, so ``d_hidden`` / ``d_weight`` / ``d_bias`` are not
bitwise deterministic run to run (the consistency loss is), and for fp16/bf16 inputs the fp32
accumulators ``[N, D]`` and ``[V, D]`` exist until the final cast (for fp32 inputs the
accumulators ARE the returned gradients). Tiles whose rows are all ignored are skipped, and so is
each product whose gradient is not needed (``ctx.needs_input_grad``). The value-head gradient
``hidden^T @ g_r`` is a small deterministic kernel of its own (``_value_weight_grad_kernel``).

Block sizes: fixed per architecture (``_FIXED_CONFIGS``), autotuned only with
``ICRM_KERNELS_AUTOTUNE=1``. They are first, untuned choices sized to the shared memory of each
generation (GPU tuning has its own issue):

* interpreter (CPU, tests): BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, small so tests span many tiles;
* sm_90 (H100/H200, 228 KB smem): BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, 8 warps, 3 stages;
* sm_80/sm_86/sm_89 (A100, Ada, 100-164 KB smem): BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, 8 warps, 3 stages;
* anything else: BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, 4 warps, 2 stages.

fp32 inputs halve BLOCK_D (twice the bytes per element; ``tl.dot`` runs with
``input_precision="ieee"`` so fp32 is not silently rounded to tf32). In the backward, ``dx`` is
cast to the input dtype for its two products (tensor cores for fp16/bf16, as in
cut-cross-entropy); accumulation is fp32 throughout. Index math is int64 (rows * D and
cols * D can pass 2^31; no N x V index exists).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


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
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits ``z [BLOCK_N, BLOCK_V]`` (fp32, -inf on columns >= V), the tanh of the softcap (for
    the backward chain; 0 without softcap) and ``reward_acc`` plus ``hidden[rows] @ value_weight``
    when ``add_reward``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
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
        tanh = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        z = acc * inv_temperature
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, tanh, reward_acc


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, value_weight_ptr, value_bias_ptr,
    split_lse_ptr, split_target_ptr, rewards_ptr,
    N, V, D, num_splits, ignore_index, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_VALUE: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    # This program's share of the vocabulary: whole tiles, split 0 first (it adds the reward).
    split = tl.program_id(1)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    reward = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z, _, reward = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, value_weight_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, reward, v0 == 0,
            HAS_BIAS, HAS_SOFTCAP, HAS_VALUE, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        # Online logsumexp: rescale the running sum to the new running max.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)

    # Per-split logsumexp (-inf for an empty split) and target logit (0 when not in this split).
    tl.store(split_lse_ptr + split * N + rows, run_max + tl.log(run_sum), mask=row_mask)
    tl.store(split_target_ptr + split * N + rows, target_logit, mask=row_mask)
    if HAS_VALUE:
        if split == 0:
            if HAS_VALUE_BIAS:
                reward += tl.load(value_bias_ptr).to(tl.float32)
            tl.store(rewards_ptr + rows, reward, mask=row_mask)


@triton.jit
def _backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    N, V, D, ignore_index, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = targets != ignore_index
    # Ignored rows have no gradient: a tile of only ignored rows has nothing to add.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        g = tl.where(valid, tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        z, tanh, _ = _logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, hidden_ptr, rows, cols, row_mask, col_mask, D,
            inv_temperature, softcap, g, False,
            HAS_BIAS, HAS_SOFTCAP, False, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
        dx = g[:, None] * (onehot - tl.exp(z - lse[:, None])) * inv_temperature
        if HAS_SOFTCAP:
            dx = dx * (1.0 - tanh * tanh)
        dx = tl.where(row_mask[:, None] & col_mask[None, :], dx, 0.0)
        # Relaxed atomics: only the final sums matter, and the kernel's end orders them.
        if NEED_BIAS:
            tl.atomic_add(d_bias_ptr + cols, tl.sum(dx, axis=0), mask=col_mask, sem="relaxed")
        if NEED_HIDDEN or NEED_WEIGHT:
            dx_in = dx.to(hidden_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_mask = dims < D
                if NEED_HIDDEN:
                    w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
                    tl.atomic_add(
                        d_hidden_ptr + rows[:, None] * D + dims[None, :],
                        tl.dot(dx_in, w, input_precision=DOT_PRECISION),
                        mask=row_mask[:, None] & dim_mask[None, :], sem="relaxed",
                    )
                if NEED_WEIGHT:
                    h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                    tl.atomic_add(
                        d_weight_ptr + cols[:, None] * D + dims[None, :],
                        tl.dot(tl.trans(dx_in), h, input_precision=DOT_PRECISION),
                        mask=col_mask[:, None] & dim_mask[None, :], sem="relaxed",
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

#: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) for 16-bit inputs, by arch (see module doc).
_FIXED_CONFIGS = {
    "interpreter": (16, 32, 16, 1, 1),
    9: (128, 128, 64, 8, 3),
    8: (128, 128, 32, 8, 3),
    "default": (64, 64, 32, 4, 2),
}

_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [
        (64, 64, 32, 4, 2), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 256, 64, 8, 3),
    ]
]

#: Block sizes of the small value-head gradient kernel (a bandwidth-bound column reduction).
_VALUE_GRAD_BLOCK_N, _VALUE_GRAD_BLOCK_D = 64, 64

# Autotuned variants exist only with ICRM_KERNELS_AUTOTUNE=1 and run only on CUDA (the
# interpreter always takes the fixed blocks). The backward accumulates with atomics, so its
# buffers are zeroed between trial runs. Keys leave out N, which changes every batch.
_forward_tuned = _backward_tuned = None
if _dispatch.AUTOTUNE:
    _forward_tuned = triton.autotune(_AUTOTUNE_CONFIGS, key=["V", "D", "HAS_VALUE"])(_forward_kernel)
    _backward_tuned = triton.autotune(
        _AUTOTUNE_CONFIGS,
        key=["V", "D", "NEED_HIDDEN", "NEED_WEIGHT", "NEED_BIAS"],
        reset_to_zero=["d_hidden_ptr", "d_weight_ptr", "d_bias_ptr"],
    )(_backward_kernel)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fully overwrites comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernel_and_config(fixed, tuned, device: torch.device, dtype: torch.dtype):
    """``(kernel, launch meta)``: the autotuned kernel on CUDA when tuning is on, else the
    fixed kernel with this architecture's blocks."""
    if tuned is not None and device.type == "cuda":
        return tuned, {}
    return fixed, _block_config(device, dtype)


def _arch_key(device: torch.device):
    """Which fixed configuration a device gets: ``"interpreter"``, a CUDA major version, or
    ``"default"`` (shared with the consistency kernels)."""
    if device.type != "cuda":
        return "interpreter"
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in _FIXED_CONFIGS else "default"


def _block_config(device: torch.device, dtype: torch.dtype) -> dict:
    key = _arch_key(device)
    block_n, block_v, block_d, num_warps, num_stages = _FIXED_CONFIGS[key]
    if dtype == torch.float32 and key != "interpreter":
        block_d //= 2
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)


def _grid(config: dict, *sizes_and_meta_keys):
    """Grid of ``cdiv(size, BLOCK)`` per axis (``size`` itself where the key is None); works for
    fixed and autotuned block sizes."""

    def grid(meta):
        return tuple(size if key is None else triton.cdiv(size, meta[key]) for size, key in sizes_and_meta_keys)

    return grid(config) if config else grid


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32 (the three-way rule compares with fp32 eager).
    return "ieee" if dtype == torch.float32 else "tf32"


def _vocab_splits(n: int, v: int, device: torch.device) -> int:
    """How many programs share one row block's vocabulary in the forward.

    With one program per row block, N = 16k rows at BLOCK_N = 128 fill 128 programs: under one
    wave on an H100 (132 SMs), and a generator batch of 2k rows fills 16. Splitting V until
    there are about two programs per SM (at least 4096 vocab entries each) keeps the GPU busy;
    the [splits, N] partials are combined by a logsumexp in torch. An empty split (possible
    when the tile count does not divide well) contributes -inf and changes nothing. The
    interpreter uses 2 splits whenever V spans 2 tiles, so the tests run the combine.
    """
    if device.type != "cuda":
        return min(2, triton.cdiv(v, _FIXED_CONFIGS["interpreter"][1]))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, 128)), triton.cdiv(v, 4096)))


def _forward_launch(hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index):
    """Returns ``(logp [N], lse [N], rewards [N] or None)``, all fp32."""
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    splits = _vocab_splits(n, v, device)
    split_lse = _empty((splits, n), torch.float32, device)
    split_target = _empty((splits, n), torch.float32, device)
    rewards = _empty((n,), torch.float32, device) if value_weight is not None else None
    if n > 0:
        kernel, config = _kernel_and_config(_forward_kernel, _forward_tuned, device, hidden.dtype)
        kernel[_grid(config, (n, "BLOCK_N"), (splits, None))](
            hidden, weight, bias, targets, value_weight, value_bias,
            split_lse, split_target, rewards,
            n, v, d, splits, ignore_index, 1.0 / temperature, 1.0 if softcap is None else softcap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_VALUE=value_weight is not None, HAS_VALUE_BIAS=value_bias is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            **config,
        )
    lse = torch.logsumexp(split_lse, dim=0)
    logp = torch.where(targets != ignore_index, split_target.sum(0) - lse, 0.0)
    return logp, lse, rewards


def _backward_launch(hidden, weight, targets, bias, lse, grad_logp, temperature, softcap, ignore_index,
                     need_hidden, need_weight, need_bias):
    """fp32 accumulators ``(d_hidden [N, D], d_weight [V, D], d_bias [V])``, None where not needed."""
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    d_hidden = torch.zeros((n, d), dtype=torch.float32, device=device) if need_hidden else None
    d_weight = torch.zeros((v, d), dtype=torch.float32, device=device) if need_weight else None
    d_bias = torch.zeros((v,), dtype=torch.float32, device=device) if need_bias else None
    if n == 0:
        return d_hidden, d_weight, d_bias
    kernel, config = _kernel_and_config(_backward_kernel, _backward_tuned, device, hidden.dtype)
    kernel[_grid(config, (n, "BLOCK_N"), (v, "BLOCK_V"))](
        hidden, weight, bias, targets, lse, grad_logp,
        d_hidden, d_weight, d_bias,
        n, v, d, ignore_index, 1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
        DOT_PRECISION=_dot_precision(hidden.dtype),
        **config,
    )
    return d_hidden, d_weight, d_bias


def _value_weight_grad_launch(hidden, grad_rewards):
    n, d = hidden.shape
    d_value_weight = _empty((d,), torch.float32, hidden.device)
    _value_weight_grad_kernel[(triton.cdiv(d, _VALUE_GRAD_BLOCK_D),)](
        hidden, grad_rewards, d_value_weight, n, d,
        BLOCK_N=_VALUE_GRAD_BLOCK_N, BLOCK_D=_VALUE_GRAD_BLOCK_D,
    )
    return d_value_weight


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class _LinearLogprobsFunction(torch.autograd.Function):
    """``(logp [N], rewards [N] or None)``; saves only ``lse [N]`` besides the inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, value_weight, value_bias, targets, temperature, softcap, ignore_index):
        logp, lse, rewards = _forward_launch(
            hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index
        )
        ctx.save_for_backward(hidden, weight, bias, value_weight, targets, lse)
        ctx.temperature, ctx.softcap, ctx.ignore_index = temperature, softcap, ignore_index
        ctx.value_bias_dtype = None if value_bias is None else value_bias.dtype
        return logp, rewards

    @staticmethod
    def backward(ctx, grad_logp, grad_rewards):
        hidden, weight, bias, value_weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias, need_value_weight, need_value_bias = ctx.needs_input_grad[:5]
        d_hidden = d_weight = d_bias = d_value_weight = d_value_bias = None
        if grad_logp is not None and (need_hidden or need_weight or need_bias):
            d_hidden, d_weight, d_bias = _backward_launch(
                hidden, weight, targets, bias, lse, grad_logp.contiguous(), ctx.temperature, ctx.softcap,
                ctx.ignore_index, need_hidden, need_weight, need_bias and bias is not None,
            )
        if grad_rewards is not None and value_weight is not None:
            grad_rewards = grad_rewards.contiguous().to(torch.float32)
            if need_hidden:
                if d_hidden is None:
                    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                d_hidden.addr_(grad_rewards, value_weight.to(torch.float32))
            if need_value_weight:
                d_value_weight = _value_weight_grad_launch(hidden, grad_rewards)
            if need_value_bias:
                d_value_bias = grad_rewards.sum().reshape(1)
        return (
            _cast(d_hidden, hidden.dtype), _cast(d_weight, weight.dtype),
            _cast(d_bias, None if bias is None else bias.dtype),
            _cast(d_value_weight, None if value_weight is None else value_weight.dtype),
            _cast(d_value_bias, ctx.value_bias_dtype),
            None, None, None, None,
        )


def _cast(grad, dtype):
    """fp32 accumulator -> gradient in the input's dtype (no copy when that is fp32)."""
    return None if grad is None else grad.to(dtype)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden2d [N, D], weight [V, D], targets1d [N] int64, bias [V], value_weight [D] or [1, D],
    value_bias [] or [1] -> ``(logp [N] fp32, rewards [N] fp32 or None)``.

    Inputs are validated by the caller. Under ``torch.no_grad`` (or when nothing requires grad)
    only the forward kernel runs and nothing is saved: the frozen-generator path.
    """
    hidden, weight, targets = hidden2d.contiguous(), weight.contiguous(), targets1d.contiguous()
    bias = None if bias is None else bias.contiguous()
    vw = None if value_weight is None else value_weight.reshape(-1).contiguous()
    vb = None if value_bias is None else value_bias.reshape(1).contiguous()
    inputs = (hidden, weight, bias, vw, vb)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        logp, _, rewards = _forward_launch(hidden, weight, targets, bias, vw, vb, temperature, softcap, ignore_index)
        return logp, rewards
    logp, rewards = _LinearLogprobsFunction.apply(hidden, weight, bias, vw, vb, targets, temperature, softcap, ignore_index)
    return logp, rewards
