"""The one place that decides which implementation runs: ``auto | triton | reference``.

* ``reference``: plain PyTorch (``*/reference.py``), the CPU path and the test oracle.
* ``triton``: the fused Triton kernels (``*/kernels.py``). Runs on CUDA tensors, or on
  CPU tensors when ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported.
  An explicit ``triton`` request never falls back silently: it raises with the reason.
* ``auto``: Triton on CUDA tensors when Triton imports, reference everywhere else
  (CPU, or the interpreter, which is a debugging tool and not a fast path).
* float64 inputs always mean the reference (the kernels accumulate in fp32), and bfloat16 is
  refused under the interpreter (its bf16 ``tl.dot`` is wrong); ``triton`` raises for both.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")

#: Read once at import, like Triton itself does: the interpreter must be chosen before
#: ``triton`` is first imported, so changing the variable later has no effect.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Opt-in autotuning for the consistency kernels (fixed, documented block sizes otherwise; the
#: linear_logprobs kernels always follow their launch plan, linear_logprobs/plan.py).
AUTOTUNE = os.environ.get("ICRM_KERNELS_AUTOTUNE", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why ``import triton`` fails here, or None when it works."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_backend_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None when they can."""
    err = triton_import_error()
    if err is not None:
        return f"triton is not importable ({err})"
    devices = {t.device.type for t in tensors if t is not None}
    dtypes = {t.dtype for t in tensors if t is not None}
    if torch.float64 in dtypes:
        return (
            "the Triton kernels take float16, bfloat16 or float32 inputs (fp32 accumulation), got float64; "
            "float64 is the reference's gold path: use backend='reference'"
        )
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        if TRITON_INTERPRET:
            if torch.bfloat16 in dtypes:
                return (
                    "bfloat16 inputs cannot run under TRITON_INTERPRET=1 (the interpreter's bfloat16 tl.dot "
                    "gives wrong results); use float32/float16 there, a CUDA device, or backend='reference'"
                )
            return None
        return (
            "the inputs are CPU tensors and TRITON_INTERPRET=1 was not set before "
            "triton was imported; use a CUDA device, backend='reference', or run "
            "with TRITON_INTERPRET=1 (slow, for debugging)"
        )
    return f"the Triton kernels need CUDA tensors (or CPU under TRITON_INTERPRET=1), got devices {sorted(devices)}"


def select_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` to ``"triton"`` or ``"reference"`` for these input tensors."""
    _check_backend_name(backend)
    if backend == "reference":
        return "reference"
    reason = triton_unavailable_reason(*tensors)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' was requested but cannot run: {reason}")
        return "triton"
    on_cuda = all(t.device.type == "cuda" for t in tensors if t is not None)
    return "triton" if (reason is None and on_cuda) else "reference"
