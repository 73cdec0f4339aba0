"""Every launch the Triton launchers make compiles for sm_80, sm_86, sm_89 and sm_90, down to
ptxas, without a GPU (tests/gpu_compile.py, in a subprocess without TRITON_INTERPRET), with the
specialisation a real launch gets, and fits each architecture: no spills, at most 255 registers,
shared memory under the limit, no tf32 in fp32 launches, int64 index math. Catches what the
interpreter cannot: type changes inside loops, unsupported ops, resource overflows."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("op", ["linear_logprobs", "consistency"])
def test_kernels_compile_and_fit_every_architecture(op):
    triton = pytest.importorskip("triton")
    from triton.backends.nvidia.compiler import get_ptxas

    # Triton is installed: a missing ptxas is a broken setup, not a reason to skip.
    for capability in (80, 90):
        ptxas = get_ptxas(capability).path
        assert ptxas and os.path.exists(ptxas), f"triton {triton.__version__} has no ptxas for sm_{capability}: {ptxas!r}"
    script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, op], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
