"""Compile every Triton kernel launch of one op for real GPU targets, on a machine without a GPU.

``python tests/gpu_compile.py linear_logprobs|consistency``: the op's launchers run on CPU
tensors with each ``@triton.jit`` kernel replaced by a recorder and the block configuration of
the target architecture, and every recorded launch (the exact arguments and meta-parameters
the launcher passes) goes through ``triton.compile`` for sm_90 and sm_80, down to a cubin with
the ptxas bundled in Triton's wheel. This catches what the interpreter never checks (loop-carried
types, constexpr misuse, dot shapes, shared memory). It proves nothing about numerics: the
``cuda`` tests do that on a GPU. Needs ``TRITON_INTERPRET`` unset, so it runs as a subprocess.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # before triton's first import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from icrm_kernels.consistency import kernels as consistency_kernels  # noqa: E402
from icrm_kernels.linear_logprobs import kernels as linear_kernels  # noqa: E402

TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
}
CAPABILITIES = (90, 80)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` records the launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def record(module, names, scenario):
    """Run ``scenario`` with ``module``'s kernels ``names`` replaced by recorders."""
    originals = {name: getattr(module, name) for name in names}
    recorders = [Recorder(fn) for fn in originals.values()]
    for name, recorder in zip(names, recorders):
        setattr(module, name, recorder)
    try:
        scenario()
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return recorders


def launch_signature(fn, args, kwargs):
    """``(signature, constexprs, options)`` for ``triton.compile`` from one recorded launch."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs, options


def linear_logprobs_scenario():
    n, d, v = 40, 48, 300
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for full in (True, False):
            hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
            weight = torch.randn(v, d, dtype=dtype, requires_grad=True)
            bias = torch.randn(v, dtype=dtype, requires_grad=True) if full else None
            value_weight = torch.randn(d, dtype=dtype, requires_grad=True) if full else None
            value_bias = torch.randn(1, dtype=dtype, requires_grad=True) if full else None
            targets = torch.randint(0, v, (n,))
            logp, rewards = linear_kernels.linear_logprobs_triton(
                hidden, weight, targets, bias, value_weight, value_bias, 0.7, 30.0 if full else None, -100
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


OPS = {
    "linear_logprobs": (linear_kernels, ("_forward_kernel", "_backward_kernel", "_value_weight_grad_kernel"), linear_logprobs_scenario),
    "consistency": (consistency_kernels, ("_forward_kernel", "_backward_kernel"), consistency_scenario),
}


def main(op):
    module, names, scenario = OPS[op]
    real_arch_key = linear_kernels._arch_key
    compiled = 0
    for capability in CAPABILITIES:
        # The launchers pick this architecture's fixed blocks (the recorders never run anything).
        arch = capability // 10
        linear_kernels._arch_key = lambda device: arch if arch in linear_kernels._FIXED_CONFIGS else "default"
        try:
            recorders = record(module, names, scenario)
        finally:
            linear_kernels._arch_key = real_arch_key
        seen = set()
        for recorder in recorders:
            assert recorder.launches, f"{recorder.fn.__name__} was never launched"
            for args, kwargs in recorder.launches:
                signature, constexprs, options = launch_signature(recorder.fn, args, kwargs)
                key = (recorder.fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())), tuple(options.items()))
                if key in seen:
                    continue
                seen.add(key)
                target = GPUTarget("cuda", capability, 32)
                kernel = triton.compile(ASTSource(recorder.fn, signature, constexprs), target=target, options=options)
                compiled += 1
                dtype = next(t for t in signature.values() if t.startswith("*"))[1:]
                print(f"sm_{capability} {recorder.fn.__name__} ({dtype}, {options}): {kernel.metadata.shared} B shared", flush=True)
    print(f"compiled {compiled} launches")


if __name__ == "__main__":
    main(sys.argv[1])
