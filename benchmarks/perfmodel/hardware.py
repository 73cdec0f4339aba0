"""Hardware constants and the efficiency table of the performance model, each with its source.

Everything a prediction assumes about the GPU is here, in one place, so that the sensitivity
table (``benchmarks/predict.py``) can vary it: the GEMM rate, DRAM and L2 bandwidth, the special
function rate, load and lock latencies, and the tensor-core efficiency of each kernel
*structure* (tile, warps, stages, pipelined or not, wgmma or not). No efficiency belongs to an
implementation: CCE's kernels, ours and the bare cuBLAS GEMMs are timed by the structure they
have, so two implementations get the same number only when they run the same structure.

Sources are of three kinds, said per entry: **measured** (on an H100, by this project or a
named third party), **published** (a paper or vendor document, named) or **estimate** (first
principles, the reasoning stated). None of the estimates has been checked against a
measurement of the structure itself: the GPU runbook's sweep is what will check them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    sms: int
    l2_bytes: int
    gemm_tflops: dict          # dtype -> dense GEMM rate the efficiencies are relative to
    dram_tbps: float           # achievable DRAM bandwidth, read + write counted
    l2_tbps: float             # effective L2 -> SM bandwidth (operand tiles, lock-protected adds)
    sfu_tflops: float          # exp2 (special function unit) results per second, 1e12
    clock_ghz: float           # SM clock under a long tensor-core load
    regs_per_sm: int
    smem_per_sm: int
    wgmma: bool                # Hopper's asynchronous warpgroup MMA (Triton uses it on sm_90)

    def flop_per_clock_sm(self, dtype: str) -> float:
        """Dense tensor-core FLOPs per clock per SM at the measured GEMM rate."""
        return self.gemm_tflops[dtype] * 1e12 / (self.sms * self.clock_ghz * 1e9)


#: sm_90: H100 SXM. 132 SMs, 50 MB L2, bf16 GEMM 798 TFLOP/s (measured: cuBLAS 8192^3, the
#: rate every efficiency is relative to, so a large cuBLAS GEMM is 1.0), DRAM ~3.0 TB/s read +
#: write (measured: device-to-device copy); fp32 (IEEE, no tensor cores) scaled by the spec
#: sheet's 67/989. L2: 10 TB/s effective (estimate: published H100 L2 microbenchmarks range from
#: ~5.5 TB/s (a PCIe H100, a simple streaming kernel) to ~12 TB/s; cuBLAS's 128x256 tiles at 798
#: TFLOP/s read 9.4 TB/s of operands from L2, so the effective rate is at least that; the
#: sensitivity table shows 7 and 12). SFU: 3.9 TFLOP/s of exponentials (published: FlashAttention-3,
#: Shah et al. 2024, sec. 3: "989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special functions").
#: Clock 1.755 GHz (the H100 SXM's boost under a sustained tensor load; estimate).
#: sm_80: A100 SXM 80 GB from the spec sheet scaled by the same achievable fractions (not
#: measured here): 312 TFLOP/s bf16 x 798/989, 2.04 TB/s HBM x 3.0/3.35, FP32 19.5 TFLOP/s,
#: L2 ~5 TB/s (estimate), SFU 312/989 x 3.9, no wgmma (mma.sync is its full rate).
ARCHS = {
    "sm_90": Hardware("H100 SXM", 132, 50 * 2**20, {"bf16": 798.0, "fp16": 798.0, "fp32": 798.0 * 67 / 989},
                      3.0, 10.0, 3.9, 1.755, 65536, 233472, True),
    "sm_80": Hardware("A100 SXM 80GB", 108, 40 * 2**20, {"bf16": 252.0, "fp16": 252.0, "fp32": 19.5 * 798 / 989},
                      1.83, 5.0, 1.23, 1.41, 65536, 167936, False),
}
#: Per kernel launch on the GPU timeline (back-to-back launches from one stream; estimate).
LAUNCH_US = 5.0
#: Latency of an operand tile load that misses in registers / shared memory and must come from
#: L2 or HBM, and of a scalar load that hits in L2 (a ``live`` flag). Estimates from published
#: H100 microbenchmarks (L2 hit ~260 cycles, HBM ~500-600 cycles; Luo et al. 2024,
#: "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture"); not measured here.
LOAD_LATENCY_CYCLES = 500
FLAG_LATENCY_CYCLES = 260
#: One lock acquire + release round trip to L2 (atomic CAS, then an atomic exchange) around
#: CCE's load-add-store of a gradient tile; estimate (two L2 atomics), contention not included.
LOCK_LATENCY_CYCLES = 2 * 260
#: A dead K step of a K loop that tests a flag per step (``if live:`` inside the loop): the flag
#: load's latency (not prefetched: the branch needs it) plus ~40 cycles of loop overhead, per CTA;
#: the other resident CTAs of the SM run meanwhile (charged / CTAs per SM). Estimate.
DEAD_STEP_CYCLES = FLAG_LATENCY_CYCLES + 40
#: A program whose tile is ruled dead before its K loop (our dlogits with saved row maxima): the
#: CTA's start (~300 cycles), one round of dependent loads (row maxima, lse, targets) and the flag
#: store, per CTA, charged / CTAs per SM. Estimate.
DEAD_TILE_CYCLES = 300 + LOAD_LATENCY_CYCLES + 200
#: FP32 (non-tensor) operations per logit of a fused softmax epilogue besides its exponential
#: (scale, max, subtract, add; the online rescale per row is negligible). Estimate.
EPILOGUE_FP32_OPS = 4


@dataclass(frozen=True)
class Structure:
    """What decides a kernel's tensor-core efficiency: its tile (``block_m x block_n``, K step
    ``block_k``), warps, pipeline stages, whether its K loop is software-pipelined (a K loop with
    an ``if`` on a loaded value inside is not: each step waits for its loads) and the MMA kind
    (``wgmma``: Hopper's asynchronous warpgroup MMA; ``mma``: ``mma.sync``; ``cublas_<kind>``: a
    cuBLAS kernel, whose efficiency ``CUBLAS[kind]`` is given, not derived). ``extra_latency``: cycles each K step waits
    besides its loads (CCE's gradient locks)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    pipelined: bool
    mma: str
    extra_latency: int = 0
    a_in_registers: bool = False
    ctas: int = 0

    @property
    def key(self) -> tuple:
        return (self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages, self.pipelined, self.mma)

    def label(self) -> str:
        pipe = "pipelined" if self.pipelined else "unpipelined"
        extra = f", +{self.extra_latency} cycles/step" if self.extra_latency else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} {self.num_warps}w {self.num_stages}s {pipe} "
                f"{self.mma}{extra}")


#: cuBLAS structures (given, not derived). ``large``: one big GEMM (the 3-GEMM bound, Liger's
#: logits GEMM): 1.0 by definition of the rate (measured, cuBLAS 8192^3; a [16384, 4096] x
#: [4096, 128256] GEMM is as large). ``liger_chunked``: Liger's per-chunk GEMMs (a few hundred
#: rows: grad_input with K = V and split-K, grad_weight with K = chunk, bf16 accumulation into
#: d_weight every chunk), fitted to Liger's published 321 ms (huggingface/trl PR #6858, see
#: ``CALIBRATION_POINT``): it carries every cost of Liger's loop the model does not see.
CUBLAS = {"large": 1.0, "liger_chunked": 0.2007}
#: The third-party point: (N, D, V, dtype, arch) and fwd+bwd ms per implementation. Liger's
#: fits ``CUBLAS["liger_chunked"]``; CCE's is NOT fitted: the report shows the model's CCE time
#: at this point next to it, as a check of the efficiency table.
CALIBRATION_POINT = ((16384, 2048, 248320, "bf16", "sm_90"), {"cce": 92.6, "liger": 321.0})

#: Pipelined Triton structures with a number of their own (measured or published); every other
#: pipelined structure is estimated by ``_pipelined_estimate``. Empty today: no Triton kernel of
#: these shapes has been measured on an H100 by this project, and no published measurement of
#: these exact configurations was found. The GPU sweep's per-kernel timings go here.
MEASURED: dict = {}
#: The best a Triton wgmma kernel reaches against cuBLAS on a large bf16 GEMM (estimate:
#: Triton's matmul tutorials report Hopper fp16 GEMMs at roughly 0.8-0.95 of cuBLAS for large
#: square shapes with 128x256x64 / 256x128x64 tiles, 3-4 stages and TMA).
TRITON_WGMMA_MAX = 0.90
#: Loss per K step size (estimate: each K step pays a barrier, a wgmma wait and its address
#: arithmetic; a 16-deep step is one wgmma k-group per warpgroup, so that fixed cost is
#: spread over 4x less work than at 64).
K_STEP_FACTOR = {64: 1.0, 128: 1.0, 32: 0.85, 16: 0.65}
#: Loss per tile area (estimate: smaller tiles read more shared memory per FLOP and have fewer
#: independent wgmmas in flight; 64x64 needs ~128 B/clock of shared memory per SM at full rate,
#: the limit).
TILE_FACTOR = {128 * 256: 1.0, 128 * 128: 0.92, 128 * 64: 0.80, 128 * 32: 0.65, 64 * 64: 0.65}
#: mma.sync instead of wgmma on sm_90 (estimate: about two thirds of the wgmma rate).
MMA_SYNC_ON_HOPPER = 0.65


def _pipelined_estimate(st: Structure, hw: Hardware) -> tuple[float, str]:
    """The efficiency of a pipelined Triton structure: TRITON_WGMMA_MAX x the K-step factor x
    the tile factor x (2 stages: 0.9) x (mma.sync on a wgmma GPU: MMA_SYNC_ON_HOPPER)."""
    k = K_STEP_FACTOR.get(st.block_k, 0.65 if st.block_k < 16 else 1.0)
    area = st.block_m * st.block_n
    tile = TILE_FACTOR.get(area) or max(0.5, min(1.0, TILE_FACTOR[128 * 128] * (area / (128 * 128)) ** 0.12))
    stages = 1.0 if st.num_stages >= 3 else 0.9
    mma = MMA_SYNC_ON_HOPPER if (hw.wgmma and st.mma != "wgmma") else 1.0
    return TRITON_WGMMA_MAX * k * tile * stages * mma, "estimate (K step, tile, stages, MMA kind)"


def ctas_per_sm(st: Structure, esize: int, hw: Hardware) -> int:
    """Resident CTAs per SM, estimated: registers (an fp32 accumulator of block_m x block_n spread
    over the CTA's threads, twice for the operands in flight, plus 32 for addresses; at most 255
    per thread), shared memory (num_stages x (A + B tiles)) and 2048 threads per SM."""
    if st.ctas:
        return st.ctas
    threads = 32 * st.num_warps
    regs = min(255, 32 + 2 * st.block_m * st.block_n // threads)
    smem = max(1, st.num_stages) * (st.block_m + st.block_n) * st.block_k * esize
    return max(1, min(hw.regs_per_sm // (regs * threads), hw.smem_per_sm // max(1, smem), 2048 // threads))


def efficiency(st: Structure, hw: Hardware, esize: int = 2, scale: float = 1.0) -> tuple[float, str]:
    """``(efficiency relative to the GEMM rate, its source)`` of a structure. ``scale``
    multiplies the Triton entries (the sensitivity table's ± on the efficiency table).

    Unpipelined (estimate): each K step computes for ``t = 2 bm bn bk / (FLOPs per clock per SM x
    pipelined efficiency)`` cycles and then waits for its next loads (``LOAD_LATENCY_CYCLES`` +
    ``extra_latency``); the other resident CTAs compute meanwhile, hiding ``(CTAs - 1) x t`` of
    the wait. Efficiency = pipelined x t / max(t, wait + t - (CTAs - 1) t)."""
    if st.mma.startswith("cublas_"):
        kind = st.mma[len("cublas_"):]
        return CUBLAS[kind], f"cuBLAS {kind} (see CUBLAS)"
    measured_key = (*st.key[:5], True, st.mma)
    if measured_key in MEASURED:
        piped, source = MEASURED[measured_key]
    else:
        piped, source = _pipelined_estimate(st, hw)
    piped = min(1.0, piped * scale)
    if st.pipelined and not st.extra_latency:
        return piped, source
    t = 2.0 * st.block_m * st.block_n * st.block_k / (hw.flop_per_clock_sm("bf16") * piped)
    wait = (0 if st.pipelined else LOAD_LATENCY_CYCLES) + st.extra_latency
    ctas = ctas_per_sm(st, esize, hw)
    exposed = max(0.0, wait - (ctas - 1) * t)
    return piped * t / (t + exposed), source + f"; unpipelined: {wait} cycles a step, {ctas} CTAs/SM (estimate)"


def l2_bytes_per_flop(st: Structure, esize: int) -> float:
    """Operand bytes a tile reads from L2 per FLOP: per K step ``(bm + bn) x bk`` elements for
    ``2 bm bn bk`` FLOPs (the L2-bandwidth cap: time >= FLOPs x this / L2 bandwidth)."""
    return ((0 if st.a_in_registers else st.block_m) + st.block_n) * esize / (2.0 * st.block_m * st.block_n)
