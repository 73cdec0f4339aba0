"""Milliseconds from launch costs, under a set of ``Assumptions`` (the sensitivity table varies
them without simulating the L2 again).

Time of a launch: ``max(compute, L2, DRAM) + LAUNCH_US``, where

* compute = sum over its tensor-core work of ``FLOPs / (GEMM rate x efficiency(structure) x wave
  utilisation)`` + exponentials / the SFU rate + ``EPILOGUE_FP32_OPS`` per exponential at the FP32
  rate + overhead cycles (dead K steps, dead tiles) / (SMs x clock). The softmax is added, not
  overlapped with the MMAs (Triton kernels without warp specialisation; an upper bound);
* L2 = (operand bytes each Triton tile reads from L2, ``(bm + bn) x bk`` per K step, + atomic /
  lock bytes) / L2 bandwidth: the cap that binds for small tiles (cuBLAS's given rate already
  includes its L2 traffic);
* DRAM = the simulated DRAM bytes / DRAM bandwidth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from benchmarks.perfmodel import implementations
from benchmarks.perfmodel.hardware import EPILOGUE_FP32_OPS, LAUNCH_US, efficiency, l2_bytes_per_flop
from benchmarks.perfmodel.simulator import KernelCost, Shape


@dataclass(frozen=True)
class Assumptions:
    """What the sensitivity table varies: every Triton efficiency x ``eff_scale``; the L2
    bandwidth (``l2_tbps``, None: the architecture's); our dgrad's pipelining (None: the plan's)."""

    eff_scale: float = 1.0
    l2_tbps: float | None = None
    dgrad_pipelined: bool | None = None


BASE = Assumptions()


def kernel_ms(k: KernelCost, s: Shape, a: Assumptions = BASE) -> tuple[float, str]:
    """One launch's predicted time (ms) and what bounds it (compute, l2 or dram)."""
    hw, esize = s.hw, s.esize
    rate = hw.gemm_tflops[s.dtype] * 1e12
    util = k.utilisation or 1.0
    mma = sum(f / (rate * efficiency(st, hw, esize, a.eff_scale)[0] * util) for f, st in k.work)
    softmax = k.exps / (hw.sfu_tflops * 1e12) + k.exps * EPILOGUE_FP32_OPS / (hw.gemm_tflops["fp32"] * 1e12)
    overhead = k.overhead_cycles / (hw.sms * hw.clock_ghz * 1e9)
    # cuBLAS's given efficiency is a measured rate that already includes its L2 traffic (its
    # clusters multicast operands): only Triton structures are capped here.
    l2_bytes = sum(f * l2_bytes_per_flop(st, esize) for f, st in k.work if not st.mma.startswith("cublas_")) \
        + k.atomic_bytes
    terms = {"compute": mma + softmax + overhead,
             "l2": l2_bytes / ((a.l2_tbps or hw.l2_tbps) * 1e12),
             "dram": k.dram_bytes / (hw.dram_tbps * 1e12)}
    bound = max(terms, key=terms.get)
    return (terms[bound] + LAUNCH_US * 1e-6) * 1e3, bound


def costs(impl: str, pass_: str, s: Shape, dgrad_pipelined: bool | None = None, cache: dict | None = None) -> tuple:
    """The launches' costs (the L2 simulation: seconds at the largest shapes); ``cache`` (a dict)
    keeps them for a re-timing under other assumptions."""
    key = (impl, pass_, s, dgrad_pipelined if impl == "triton" else None)
    if cache is not None and key in cache:
        return cache[key]
    model = implementations.MODELS[impl]
    with_backward = pass_ == "fwd+bwd"
    out = tuple(model(s, with_backward, dgrad_pipelined) if impl == "triton" else model(s, with_backward))
    if cache is not None:
        cache[key] = out
    return out


@dataclass
class Prediction:
    impl: str
    pass_: str
    shape: Shape
    kernels: list = field(default_factory=list)
    ms: float = 0.0
    bound: str = ""

    def totals(self) -> tuple[float, float, float]:
        """FLOPs, DRAM bytes, atomic bytes of the whole pass."""
        return tuple(sum(getattr(k, name) * k.count for k in self.kernels)
                     for name in ("flops", "dram_bytes", "atomic_bytes"))

    def l2_bytes(self) -> float:
        esize = self.shape.esize
        return sum((sum(f * l2_bytes_per_flop(st, esize) for f, st in k.work) + k.atomic_bytes) * k.count
                   for k in self.kernels)


def predict(impl: str, pass_: str, s: Shape, a: Assumptions = BASE, cache: dict | None = None) -> Prediction:
    kernels = list(costs(impl, pass_, s, a.dgrad_pipelined, cache))
    pred = Prediction(impl, pass_, s, kernels)
    by_bound: dict = {}
    for k in kernels:
        ms, bound = kernel_ms(k, s, a)
        pred.ms += ms * k.count
        by_bound[bound] = by_bound.get(bound, 0.0) + ms * k.count
    pred.bound = max(by_bound, key=by_bound.get) if by_bound else ""
    return pred


def structures(impl: str, pass_: str, s: Shape, a: Assumptions = BASE, cache: dict | None = None) -> list[dict]:
    """Each distinct structure of a pass with its efficiency and source (for the notes)."""
    seen = {}
    for k in costs(impl, pass_, s, a.dgrad_pipelined, cache):
        for _, st in k.work:
            if st not in seen:
                eff, source = efficiency(st, s.hw, s.esize, a.eff_scale)
                seen[st] = {"impl": impl, "kernel": k.name, "structure": st.label(), "efficiency": round(eff, 3),
                            "l2_bytes_per_flop": round(l2_bytes_per_flop(st, s.esize), 5), "source": source}
    return list(seen.values())


def replace_shape(s: Shape, **kw) -> Shape:
    return dataclasses.replace(s, **kw)
