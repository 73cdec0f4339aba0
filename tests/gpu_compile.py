"""Compile every Triton kernel launch of one op exactly as the launcher issues it, for sm_80,
sm_86, sm_89 and sm_90, on a machine without a GPU, and check the result against each
architecture's limits.

``python tests/gpu_compile.py linear_logprobs|consistency [--arch sm_90 ...]``: the op's
launchers run on CPU tensors with each ``@triton.jit`` kernel replaced by a recorder and the
plan of the target architecture; every recorded launch goes through Triton's own runtime binder
(``create_function_from_signature`` + ``JITFunction._pack_args``: the signature, constexprs and
the divisibility-by-16 / alignment attributes a real launch gets) and then ``triton.compile`` for
that architecture, down to a cubin with the ptxas bundled in Triton's wheel. Then it FAILS when:

* ptxas (``-v``, run again on the kernel's PTX) reports spill stores / loads, or more than 255
  registers;
* the kernel's shared memory (``metadata.shared`` plus ptxas's static smem) exceeds the
  architecture's per-block limit (``plan.SMEM_LIMIT``);
* a GEMM kernel's fp32 launch (ieee asked) has tf32 instructions in its PTX, or its 16-bit
  launch on sm_90 has no ``wgmma`` (on sm_8x no ``mma.sync``);
* a tensor pointer offset or a tensor product is 32-bit in the TTIR (index math must be int64:
  rows * D, cols * D, rows * V pass 2^31);
* a GEMM launch whose ``D`` the binder specialised as divisible by 16 (every real model) is not
  software-pipelined: no async copies (``cp.async`` / TMA) in its TTGIR, or, 16-bit on sm_90, a
  ``warp_group_dot`` that is not async or no ``wgmma.wait_group`` that leaves a group in flight
  (``wait_group 0`` only: every K step waits for its MMA). A branch inside a K loop (the
  ``if live`` of the old dgrad kernel) breaks pipelining and fails here.

This proves nothing about numerics (the ``interpret`` and ``cuda`` tests do that). Needs
``TRITON_INTERPRET`` unset, so it runs as a subprocess (tests/test_gpu_compile.py). Works with
the pinned Triton and with Triton 3.6 (the binder API is the same there).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton's first import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from icrm_kernels.consistency import kernels as consistency_kernels  # noqa: E402
from icrm_kernels.linear_logprobs import kernels as linear_kernels  # noqa: E402
from icrm_kernels.linear_logprobs import plan  # noqa: E402

CAPABILITY = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
MAX_REGISTERS = 255


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` records the launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def record(module, names, scenario, arch):
    """Run ``scenario`` with ``module``'s kernels ``names`` replaced by recorders and the
    launchers planning for ``arch``."""
    originals = {name: getattr(module, name) for name in names}
    recorders = [Recorder(fn) for fn in originals.values()]
    real_arch_key = linear_kernels._arch_key
    for name, recorder in zip(names, recorders):
        setattr(module, name, recorder)
    linear_kernels._arch_key = lambda device: arch
    try:
        scenario()
    finally:
        linear_kernels._arch_key = real_arch_key
        for name, fn in originals.items():
            setattr(module, name, fn)
    return recorders


def bind(fn, args, kwargs, backend):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` computes them."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def ptxas_report(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    smem = re.search(r"(\d+) bytes smem", log)
    return {"registers": int(regs.group(1)) if regs else 0, "spill": sum(spills), "static_smem": int(smem.group(1)) if smem else 0}


def pipelining_problems(kernel, capability, operand) -> list[str]:
    """Why a GEMM launch's K loops are not software-pipelined (none: pipelined)."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    problems = []
    if "async_copy_global_to_local" not in ttgir and "async_tma_copy" not in ttgir:
        problems.append("no async copies (cp.async / TMA) in the TTGIR: the K loop is not pipelined")
    if capability >= 90 and operand in ("*fp16", "*bf16"):
        dots = re.findall(r"warp_group_dot [^\n]*", ttgir)
        sync = [d for d in dots if "isAsync = true" not in d]
        if sync:
            problems.append(f"{len(sync)} of {len(dots)} warp_group_dot ops are synchronous")
        if not any(int(n) > 0 for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)):
            problems.append("wgmma.wait_group 0 only: every K step waits for its MMA")
    return problems


def check_launch(name, gemm, signature, kernel, capability, arch, aligned=False):
    """``(failures, ptxas report, shared bytes)`` of one compiled launch (no failures: fine).
    ``aligned``: the launch's ``D`` is specialised as divisible by 16 (pipelining is required)."""
    problems = []
    report = ptxas_report(kernel.asm["ptx"], capability)
    shared = kernel.metadata.shared + report["static_smem"]
    limit = plan.SMEM_LIMIT[arch]
    if report["spill"]:
        problems.append(f"spills {report['spill']} bytes")
    if report["registers"] > MAX_REGISTERS:
        problems.append(f"{report['registers']} registers > {MAX_REGISTERS}")
    if shared > limit:
        problems.append(f"{shared} B shared memory > {limit} B ({arch})")
    ptx = kernel.asm["ptx"]
    operand = next(t for t in signature.values() if t.startswith("*"))  # the first pointer: the inputs' dtype
    if gemm:
        if operand == "*fp32" and "tf32" in ptx:
            problems.append("fp32 launch has tf32 instructions in its PTX (ieee was asked)")
        mma = "wgmma" if capability >= 90 else "mma.sync"
        if operand in ("*fp16", "*bf16") and mma not in ptx:
            problems.append(f"16-bit GEMM without {mma}")
        if aligned:
            problems += pipelining_problems(kernel, capability, operand)
    ttir = kernel.asm["ttir"]
    narrow_ptr = re.findall(r"tt\.addptr %\S+, %\S+ : tensor<[^>]*>, tensor<[0-9x]+xi32>", ttir)
    narrow_mul = re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", ttir)
    if narrow_ptr or narrow_mul:
        problems.append(f"{len(narrow_ptr)} i32 tensor pointer offsets and {len(narrow_mul)} i32 tensor "
                        "products in the TTIR (index math must be int64)")
    return problems, report, shared


def linear_logprobs_scenario():
    """Every kernel variant the launchers make: each dtype with bias, value head and softcap on a
    model-like shape (dims divisible by 16, as real models have), and bf16 / fp32 bare on an
    odd shape (no divisibility attributes); N < V chunks the backward along the vocabulary,
    the last case (N > V) along the rows."""
    cases = [(torch.bfloat16, True, (300, 1024, 4096)), (torch.float16, True, (300, 1024, 4096)),
             (torch.float32, True, (300, 1024, 4096)), (torch.bfloat16, False, (37, 100, 1001)),
             (torch.float32, False, (37, 100, 1001)), (torch.bfloat16, False, (1001, 100, 300))]
    for dtype, full, (n, d, v) in cases:
        hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
        weight = torch.randn(v, d, dtype=dtype, requires_grad=True)
        bias = torch.randn(v, dtype=dtype, requires_grad=True) if full else None
        value_weight = torch.randn(d, dtype=dtype, requires_grad=True) if full else None
        value_bias = torch.randn(1, dtype=dtype, requires_grad=True) if full else None
        targets = torch.randint(0, v, (n,))
        logp, rewards = linear_kernels.linear_logprobs_triton(
            hidden, weight, targets, bias, value_weight, value_bias, 0.7, 30.0 if full else None, -100,
            None if dtype == torch.float32 else 1e-4,
        )
        loss = logp.nan_to_num().sum() + (0 if rewards is None else rewards.nan_to_num().sum())
        loss.backward()


def consistency_scenario():
    for dtype, kinds in ((torch.float32, ("log", "log_nosg", "product", "squared")), (torch.bfloat16, ("log",))):
        for kind in kinds:
            for reduction in ("mean", "none"):
                padded = (torch.randn(2, 9, dtype=dtype, requires_grad=True), torch.rand(2, 8, dtype=dtype), torch.rand(2, 8) > 0.5, None)
                packed = (torch.randn(9, dtype=dtype, requires_grad=True), torch.rand(9, dtype=dtype), torch.rand(9) > 0.5, torch.tensor([0, 4, 9]))
                for rewards, weights, mask, cu_seqlens in (padded, packed):
                    out = consistency_kernels.consistency_loss_triton(
                        rewards, weights, mask, torch.zeros(2, dtype=dtype), torch.tensor([1, -1]), kind, 1e-6, reduction, cu_seqlens
                    )
                    out.nan_to_num().sum().backward()


LINEAR_KERNELS = ("_forward_kernel", "_merge_kernel", "_dlogits_kernel", "_dgrad_kernel", "_value_weight_grad_kernel")
#: op -> (kernels module, kernel names, scenario, the kernels whose launches are GEMMs: fp32 ones
#: must not use tf32, 16-bit ones must use the tensor cores). Every op fails on the same findings.
OPS = {
    "linear_logprobs": (linear_kernels, LINEAR_KERNELS, linear_logprobs_scenario,
                        {"_forward_kernel", "_dlogits_kernel", "_dgrad_kernel"}),
    "consistency": (consistency_kernels, ("_forward_kernel", "_backward_kernel"), consistency_scenario, set()),
}


def main(op, archs):
    module, names, scenario, gemm_kernels = OPS[op]
    compiled, failures = 0, []
    for arch in archs:
        capability = CAPABILITY[arch]
        target = GPUTarget("cuda", capability, 32)
        backend = make_backend(target)
        seen = set()
        for recorder in record(module, names, scenario, arch):
            assert recorder.launches, f"{recorder.fn.__name__} was never launched"
            for args, kwargs in recorder.launches:
                signature, constexprs, attrs, options = bind(recorder.fn, args, kwargs, backend)
                key = (recorder.fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(options))
                if key in seen:
                    continue
                seen.add(key)
                kernel = triton.compile(ASTSource(recorder.fn, signature, constexprs, attrs), target=target, options=options.__dict__)
                compiled += 1
                name = recorder.fn.__name__
                d_index = recorder.fn.arg_names.index("D") if "D" in recorder.fn.arg_names else None
                aligned = d_index is not None and ["tt.divisibility", 16] in attrs.get((d_index,), [])
                problems, report, shared = check_launch(name, name in gemm_kernels, signature, kernel, capability, arch,
                                                        aligned)
                dtype = next(t for t in signature.values() if t.startswith("*"))[1:]
                line = (f"{arch} {recorder.fn.__name__} ({dtype}, warps={options.num_warps}, stages={options.num_stages}): "
                        f"{report['registers']} regs, {report['spill']} B spill, {shared} B shared")
                print(line + (" FAIL: " + "; ".join(problems) if problems else ""), flush=True)
                failures += [line + ": " + p for p in problems]
    print(f"compiled {compiled} launches, {len(failures)} failing")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=sorted(OPS))
    parser.add_argument("--arch", nargs="+", choices=plan.ARCHS, default=list(plan.ARCHS))
    args = parser.parse_args()
    main(args.op, args.arch)
