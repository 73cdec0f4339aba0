"""Every launch the Triton launchers make compiles for sm_90 and sm_80, down to ptxas, without a
GPU (tests/gpu_compile.py, in a subprocess without TRITON_INTERPRET). Catches what the
interpreter cannot: type changes inside loops, unsupported ops, shared-memory overflows."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("op", ["linear_logprobs", "consistency"])
def test_kernels_compile_for_sm90_and_sm80(op):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton install has no bundled ptxas")
    script = os.path.join(os.path.dirname(__file__), "gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, op], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
