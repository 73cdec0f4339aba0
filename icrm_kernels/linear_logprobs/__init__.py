"""Op (2), the LM-head projection + log-softmax + gather of the target's log-prob, with op (1),
the per-token reward head, fused into it (``linear_logprobs_and_rewards`` reads each hidden
row once for both outputs). The ``[N, V]`` logits are never stored by the Triton kernels or
by the chunked reference path.

* ``reference.py``: plain PyTorch (naive oracle + row-chunked CPU path).
* ``kernels.py``: the Triton kernels and their ``autograd.Function``.
* ``parallel.py``: the vocabulary-parallel form (``process_group=``): the head's rows sharded
  over ranks, one all-reduce merges the shards' logsumexps.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._validate import (
    check_positive,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_targets,
    check_tensor,
)
from .reference import linear_logprobs_auto_reference, rewards_reference

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: no DTensor weights to accept
    DTensor = ()

__all__ = ["linear_logprobs", "linear_logprobs_and_rewards"]


def _check_inputs(hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index,
                  check_target_range=True):
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("targets", targets, floating=False)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got a 0-dim tensor")
    dim = hidden.shape[-1]
    check_shape("weight", weight, [None, dim], "[V, D] with D = hidden.shape[-1]")
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have at least one row (V >= 1), got shape " + str(tuple(weight.shape)))
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(targets.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        check_shape("bias", bias, [vocab], "[V] with V = weight.shape[0]")
    if value_weight is not None:
        check_tensor("value_weight", value_weight, floating=True)
        if value_weight.shape not in ((dim,), (1, dim)):
            raise ValueError(f"value_weight must have shape [{dim}] or [1, {dim}] (D = hidden.shape[-1]), got {tuple(value_weight.shape)}")
    if value_bias is not None:
        check_tensor("value_bias", value_bias, floating=True)
        if value_bias.shape not in ((), (1,)):
            raise ValueError(f"value_bias must be a scalar tensor of shape [] or [1], got {tuple(value_bias.shape)}")
    check_same_dtype("hidden", hidden, weight=weight, bias=bias, value_weight=value_weight, value_bias=value_bias)
    check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias, value_weight=value_weight, value_bias=value_bias)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if check_target_range:
        check_targets(targets, vocab, ignore_index)


def resolve_filter_eps(grad_filter_eps, dtype: torch.dtype) -> float | None:
    """``None | "auto" | float >= 0`` -> the threshold the kernels use (None: off). ``"auto"``:
    ``finfo(dtype).eps / 32`` for fp16 / bf16 (cut-cross-entropy's default), off for fp32."""
    if grad_filter_eps is None:
        return None
    if isinstance(grad_filter_eps, str):
        if grad_filter_eps != "auto":
            raise ValueError(f"grad_filter_eps must be None, 'auto' or a float >= 0, got {grad_filter_eps!r}")
        return None if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps / 32
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)) or not grad_filter_eps >= 0:
        raise ValueError(f"grad_filter_eps must be None, 'auto' or a float >= 0, got {grad_filter_eps!r}")
    return float(grad_filter_eps)


def _run(hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index, backend,
         grad_filter_eps, process_group):
    if isinstance(value_bias, (int, float)) and not isinstance(value_bias, bool) and isinstance(hidden, torch.Tensor):
        value_bias = torch.tensor(float(value_bias), dtype=hidden.dtype, device=hidden.device)
    # A vocabulary shard's V is not the full V: the parallel path checks the targets' range itself;
    # under torch.compile the custom op does (the check syncs with the host).
    compiling = torch.compiler.is_compiling()
    if isinstance(weight, DTensor):
        from .parallel import local_shard

        weight, bias, process_group = local_shard(weight, bias, process_group)
    _check_inputs(hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index,
                  check_target_range=process_group is None and not compiling)
    grad_filter_eps = resolve_filter_eps(grad_filter_eps, hidden.dtype)
    lead = targets.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1).to(torch.int64)
    temperature, softcap = float(temperature), None if softcap is None else float(softcap)
    resolved = _dispatch.select_backend(backend, hidden, weight)
    args = (temperature, softcap, ignore_index, resolved, grad_filter_eps, process_group, compiling)
    live = None if compiling else (targets1d != ignore_index).nonzero().squeeze(1)
    if live is None or live.shape[0] == targets1d.shape[0]:
        logp, rewards = _vocab_op(hidden2d, weight, targets1d, bias, value_weight, value_bias, *args)
    else:
        # Rows without a target skip the vocabulary: the LM-head GEMMs, forward and backward, run
        # on the rows that carry one (the rejected rows and prompt tokens of a reward-model step
        # are 50-75% of them); the reward, a [D] dot product, is computed for every row.
        logp_live, _ = _vocab_op(hidden2d.index_select(0, live), weight, targets1d.index_select(0, live), bias,
                                 None, None, *args)
        logp = logp_live.new_zeros(targets1d.shape).index_copy(0, live, logp_live)
        rewards = None if value_weight is None else rewards_reference(hidden2d, value_weight, value_bias)
    return logp.reshape(lead), None if rewards is None else rewards.reshape(lead)


def _vocab_op(hidden2d, weight, targets1d, bias, value_weight, value_bias, temperature, softcap, ignore_index,
              resolved, grad_filter_eps, process_group, compiling):
    """The resolved implementation on ``hidden2d [N, D]``: ``(logp [N], rewards [N] or None)``."""
    if process_group is not None:
        from .parallel import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(hidden2d, weight, targets1d, bias, value_weight, value_bias,
                                              temperature, softcap, ignore_index, process_group, resolved,
                                              grad_filter_eps)
    if compiling:
        from .._custom_ops import linear_logprobs_op

        return linear_logprobs_op(hidden2d, weight, targets1d, bias, value_weight, value_bias, temperature,
                                  softcap, ignore_index, resolved, grad_filter_eps)
    if resolved == "triton":
        from .kernels import linear_logprobs_triton

        return linear_logprobs_triton(hidden2d, weight, targets1d, bias, value_weight, value_bias, temperature,
                                      softcap, ignore_index, grad_filter_eps)
    logp = linear_logprobs_auto_reference(hidden2d, weight, targets1d, bias, temperature, softcap, ignore_index)
    return logp, None if value_weight is None else rewards_reference(hidden2d, value_weight, value_bias)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    grad_filter_eps: float | str | None = "auto",
    process_group=None,
) -> torch.Tensor:
    """Log-probability of each target token under ``softcap(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[N, D]`` (or ``[..., D]``) hidden states, any float dtype.
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[N]`` (or ``[...]``) integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature: > 0; divides the (soft-capped) logits.
        softcap: optional > 0 logit cap ``c * tanh(x / c)`` applied before the temperature.
        ignore_index: target value whose rows give 0 and no gradient; those rows never reach
            the vocabulary (outside ``torch.compile`` the op runs the LM head on the other rows).
        backend: ``"auto" | "triton" | "reference"`` (see ``icrm_kernels._dispatch``).
        grad_filter_eps: the Triton backward's gradient filter (``kernels.py`` header): vocab
            tiles whose softmax entries ``p_j`` stay below it for every row of the tile are
            skipped (the targets' one-hot term is always exact). ``"auto"``: ``finfo(dtype).eps / 32`` for fp16 / bf16
            (cut-cross-entropy's default), off for fp32; ``None``: off (exact); or a float >= 0.
            The reference backend never filters.
        process_group: vocabulary parallelism (``icrm_kernels.linear_logprobs.parallel``). When
            given, ``weight`` ``[V_r, D]`` and ``bias`` ``[V_r]`` are this rank's contiguous shard
            of the head's rows (shards in rank order), ``hidden`` and the GLOBAL ``targets`` are
            the same on every rank, and every rank gets the full-vocabulary log-probs. The
            gradient flowing in must be the same on every rank; ``hidden``'s gradient comes back
            summed over the shards, ``weight``'s and ``bias``'s are this shard's. A ``DTensor``
            ``weight`` (and ``bias``) placed ``Shard(0)`` on a 1-D device mesh is taken as this
            layout over the mesh's group, without ``process_group``.

    Returns:
        ``[N]`` (or ``[...]``) float32 log-probs (float64 for float64 inputs). Gradients
        flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes. NaN/inf in the
        inputs propagate to the outputs of the rows they touch; they never raise.
    """
    logp, _ = _run(hidden, weight, targets, bias, None, None, temperature, softcap, ignore_index, backend, grad_filter_eps,
                   process_group)
    return logp


def linear_logprobs_and_rewards(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    value_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    value_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    grad_filter_eps: float | str | None = "auto",
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_logprobs` plus the per-token reward ``hidden @ value_weight + value_bias``.

    ``value_weight`` is ``[D]`` or ``[1, D]`` (an ``nn.Linear(D, 1).weight``), ``value_bias``
    a number or a tensor of shape ``[]`` or ``[1]``; the other arguments as there. Rewards are computed for every row, ignored targets included.
    With ``process_group`` the LM head is vocabulary-sharded as in :func:`linear_logprobs`; the value
    head is replicated (every rank computes the rewards and gets the same value-head gradients).

    Returns:
        ``(logprobs [N], rewards [N])``, both float32 (float64 for float64 inputs).
    """
    if value_weight is None:
        raise TypeError("value_weight must be a torch.Tensor of shape [D] or [1, D], got None")
    return _run(hidden, weight, targets, bias, value_weight, value_bias, temperature, softcap, ignore_index, backend,
                grad_filter_eps, process_group)
