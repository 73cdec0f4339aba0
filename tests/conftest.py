"""Test setup shared by every test file.

Triton's interpreter must be chosen before ``triton`` is first imported, so it is set here,
at conftest import, on machines without a GPU: ``interpret`` tests then run the Triton
kernels on CPU tensors. On a GPU machine the real compiler is used and ``interpret`` tests
are skipped (the ``cuda`` tests cover the kernels there).
"""

import os
import random

import numpy as np
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from icrm_kernels import _dispatch  # noqa: E402

#: Absolute tolerance of the three-way rule per test dtype (HOUSE_STYLE.md).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_three_way(kern, eager, gold, dtype, name="", slack=0.0):
    """HOUSE_STYLE three-way rule: ``max|kern - gold| <= 2 * max|eager - gold| + atol``.

    ``gold`` is the float64 reference, ``eager`` the reference in the test dtype, ``kern``
    the implementation under test. NaN anywhere in ``kern`` fails (unless gold has it too).
    ``slack``: a documented extra error of the implementation (e.g. the 16-bit d_weight
    accumulated over row chunks in linear_logprobs' kernels), added to the bound.
    """
    __tracebackhide__ = True
    assert kern is not None, f"{name}: no value (gradient missing?)"
    assert kern.shape == gold.shape, f"{name}: shape {tuple(kern.shape)} != gold {tuple(gold.shape)}"
    kern, eager, gold = kern.double(), eager.double(), gold.double()
    same_nan = torch.equal(torch.isnan(kern), torch.isnan(gold))
    assert same_nan, f"{name}: NaN pattern differs from gold ({int(torch.isnan(kern).sum())} NaN in result)"
    finite = ~torch.isnan(gold)
    if not bool(finite.any()):
        return
    err = (kern - gold)[finite].abs().max().item()
    ref_err = (eager - gold)[finite].abs().max().item()
    bound = 2 * ref_err + ATOL[dtype] + slack
    assert err <= bound, f"{name}: max|kern-gold| = {err:.3g} > 2*max|eager-gold| + atol = {bound:.3g} ({dtype})"


def poison_allocations(monkeypatch, kernels_module):
    """Make ``kernels_module._empty`` (the launchers' output allocator) return NaN-filled
    buffers (integer ones all-ones bits, e.g. a ``live`` flag set), so a tile the kernels
    forget to write shows up as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(kernels_module, "_empty", nan_empty)


@pytest.fixture(autouse=True)
def _fixed_rng():
    """Every test starts from the same RNG state, so a failure reproduces in the next run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(
        reason="interpreter tests run only without a GPU (TRITON_INTERPRET=1); the cuda tests cover the kernels here"
        if HAS_CUDA
        else f"triton is not importable: {_dispatch.triton_import_error()}"
    )
    interp_ok = not HAS_CUDA and _dispatch.TRITON_INTERPRET and _dispatch.triton_import_error() is None
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "interpret" in item.keywords and not interp_ok:
            item.add_marker(skip_interp)
