"""icrm_kernels: fused, memory-bounded ops for ICRM reward-model training.

Public API (see README.md and docs/math.md for the math)::

    linear_logprobs(hidden, weight, targets, *, bias, temperature, softcap, ignore_index, backend)
    linear_logprobs_and_rewards(hidden, weight, targets, value_weight, *, bias, value_bias, ...)
    consistency_loss(rewards, weights, mask, baseline, sign, *, kind, eps, reduction, cu_seqlens, backend)

``backend`` is ``"auto" | "triton" | "reference"``, resolved in ``icrm_kernels._dispatch``.
``linear_logprobs*`` take ``process_group=`` for a vocabulary-sharded LM head. Under
``torch.compile`` the ops run as ``torch.library`` custom ops (``icrm_kernels._custom_ops``).
"""

from .consistency import ConsistencyLoss, consistency_loss
from .linear_logprobs import linear_logprobs, linear_logprobs_and_rewards
from . import _custom_ops  # noqa: E402,F401  (registers the torch.library ops torch.compile calls)

__version__ = "0.1.0"

__all__ = ["linear_logprobs", "linear_logprobs_and_rewards", "consistency_loss", "ConsistencyLoss", "__version__"]
