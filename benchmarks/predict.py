"""A static performance model of ``linear_logprobs``: ours (the launch plan of the Triton kernels),
Apple's cut-cross-entropy (CCE) and Liger-Kernel's fused linear cross-entropy (FLCE), under the
same hardware constants and the same efficiency assumptions. A design tool, not a measurement:
every number it prints is a PREDICTION.

Usage::

    python benchmarks/predict.py --shape 16384,4096,128256 --dtype bf16 --arch sm_90 --format csv
    python benchmarks/predict.py --shape 4096,2048,32000 --shape 16384,4096,128256 --format markdown
    python benchmarks/predict.py --calibrate        # refit the two efficiencies (see CALIBRATION)

For each implementation and pass (``fwd``: inputs without gradients; ``fwd+bwd``: forward and
backward of a scalar loss) it prints FLOPs, DRAM traffic, atomic / lock traffic, extra memory
(bytes beyond the inputs and their gradients) and the predicted time.

The model
---------
* **L2**: one LRU cache of the architecture's L2 size over *cells* (a cell: 128 rows x a strip of
  up to ``D_STRIP`` columns of hidden / weight and their gradients, one ``block_m x block_n``
  tile of the dlogits workspace or of Liger's logits). A miss reads the cell from DRAM; a store
  allocates the cell without reading it and a dirty cell is written back when evicted or at the
  end of the pass (so DRAM = reads + write-backs). One L2 is shared by all launches of a pass, in
  launch order. Coarse cells keep the simulation at a few million accesses at the largest shapes
  (seconds); a cell touched only in part is charged in full, which over-counts a little when
  neighbouring programs are not resident together. H100's L2 is two 25 MB halves; it is modelled
  as one 50 MB LRU.
* **Concurrency**: programs are issued in launch (pid) order, in waves of ``SMs x CTAs per SM``
  (CTAs per SM estimated from the config's registers and shared memory, ``ctas_per_sm``) that
  advance in lockstep, round-robin over their steps (a step: one K iteration of the kernel's own
  ``Launch.steps``; a fused step touches all of D). Ours replays the plan of
  ``icrm_kernels/linear_logprobs/plan.py``: grid, grouped order, vocab splits, backward chunks,
  workspace, and what every step reads and writes (``Launch.accesses``); CCE and Liger are
  described here in the same terms (``ModelLaunch``).
* **Sampling**: a launch whose accesses exceed ``SIM_BUDGET`` is simulated for its first waves
  (at least two) and the rest is extrapolated with the mean DRAM bytes per wave of the second
  half of those simulated (the grouped orders repeat the same pattern group after group); a
  backward made of many identical chunks is simulated for its first two chunks and its last
  (possibly shorter) one, the middle chunks counted as the second.
* **Time per launch**: ``max(FLOPs / (GEMM rate x efficiency x wave utilisation), DRAM bytes /
  DRAM bandwidth, atomic bytes / L2 bandwidth) + LAUNCH_US``. Wave utilisation = busy
  fraction of the ``SMs x CTAs per SM`` slots: programs go in pid order to the first free slot
  (the block scheduler), each as long as its steps (``_utilisation``); for programs of equal
  length that is programs / (whole waves x slots), a last, partial wave leaving SMs idle. Our
  dlogits programs whose tile is dead (skipped) count ``DEAD_TILE_COST`` of a tile, in
  their length and their FLOPs. Kernels with no
  tensor-core work (Liger's cross-entropy kernel, our split merge, memsets, gathers) are
  bandwidth-bound by construction.
* **FLOPs**: forward ``2NDV``; backward ``2NDV`` (logits recomputed; ours: the live tiles
  only, see below) ``+ 2f NDV`` (d_hidden)
  ``+ 2f NDV`` (d_weight), where ``f`` (``--live-frac``) is the fraction of (row block, vocab
  tile) tiles whose gradient survives the filter. Ours and CCE filter the same tiles (which ones:
  a fixed pseudo-random pattern, ``live_tile``); Liger does not filter (``6NDV``). The default
  ``f = 0.2`` is CCE's own assumption in its backward cost model (``_bw_total_ops_fn`` in its
  ``tl_autotune.py``). Vectors of N or V elements (lse, targets, flags) are left out of DRAM
  traffic (well under 1%); our forward's ``[splits, N]`` partials are counted.

Columns: ``flops_t`` (TFLOP), ``dram_gb`` (simulated DRAM reads + write-backs, GB = 1e9 bytes),
``atomic_gb`` (bytes of atomic / lock-protected read-modify-writes, which go to L2),
``extra_mb`` (peak bytes beyond inputs and gradients, MiB), ``inputs_grads_mb`` (hidden and
weight, and for ``fwd+bwd`` their gradients, MiB), ``pred_ms``, ``bound`` (the term that
dominates the predicted time), ``live_frac``.

What each implementation does, as modelled
------------------------------------------
* ``triton`` (ours): ``_forward_kernel`` (row block x vocab split, online logsumexp over the
  split's few vocab tiles; with gradients it also saves each tile's per-row maximum),
  ``_merge_kernel``; per backward chunk (of the vocabulary when N < V, else of rows; see
  plan.py) ``_dlogits_kernel`` (decides each tile's live flag from the saved maxima and
  recomputes only live tiles into ``dx``) and ``_dgrad_kernel`` (the ``dx^T @ hidden``
  programs, then the ``dx @ W`` ones, over live tiles; the gradient of the chunked axis is
  stored once, the other one stored by the first chunk and loaded-added-stored by the
  others). No atomics. FLOPs: forward ``2NDV``, backward ``2NDV (f + (1 - f) DEAD_TILE_COST)
  + 4f NDV``.
* ``cce`` (apple/ml-cross-entropy, default options): ``_cce_lse_forward_kernel`` over (row
  block, vocab tile) tiles, GROUP_B=8 grouped order, 128x128x32 tiles (4 warps fwd, 8 bwd), lse
  merged under a per-row-block lock; with gradients it also atomically adds the per-vocab mean
  logit. ``indexed_neg_dot`` gathers the target logits. Backward: ``dE``, ``dC`` zero-filled in
  the input dtype (``accum_e_fp32 = accum_c_fp32 = False``), then the same tiles recompute the
  logits, skip filtered tiles and add ``dlogits @ C`` into ``dE[rows]`` and ``dlogits^T @ E``
  into ``dC[vocab]`` under locks (load + add + store of bf16 tiles, ``tl_lock_add``): that
  read-modify-write is its atomic traffic. Lock waiting is not modelled (it favours CCE).
* ``liger`` (linkedin/Liger-Kernel FLCE, scalar loss): rows in chunks of
  ``next_power_of_2(cdiv(N, cdiv(V, D)))``; per chunk a cuBLAS ``[chunk, D] x [D, V]`` into
  logits in the input dtype, a Triton kernel (one program per row, 32 warps) reading each row
  twice and writing the gradient in place, ``grad_input[chunk] = grad @ W`` and
  ``grad_weight += grad^T @ hidden_chunk`` (cuBLAS, bf16 accumulator by default), all inside the
  forward; ``grad_input`` / ``grad_weight`` are zero-filled first. cuBLAS is modelled as
  128x128 tiles in grouped order (group 8). ``fwd`` without gradients: the logits GEMM and one
  read of the logits per chunk.

Calibration (``CALIBRATION``, fitted once by ``--calibrate``)
------------------------------------------------------------
Two efficiencies, fitted on one third-party H100 point (huggingface/trl PR #6858: fwd+bwd at
N=16384, D=2048, V=248320, bf16: CCE 92.6 ms, Liger 321 ms), with the hardware constants of
``ARCHS`` and ``f`` at its default: ``triton`` (tensor-core efficiency of Triton ``tl.dot``
kernels, relative to the measured cuBLAS GEMM rate) is fitted to CCE's 92.6 ms and is then used
for EVERY Triton kernel, CCE's and ours alike (fused or plain GEMM); ``cublas`` is fitted to
Liger's 321 ms. Fitted: ``triton`` 0.544 (434 TFLOP/s), ``cublas`` 0.20 (160 TFLOP/s). Liger's
fitted cuBLAS efficiency is far below what cuBLAS reaches on a plain GEMM: the third-party point
includes costs this model does not see (the point is what it is; newer Liger Hopper paths are
much faster and are not modelled).

Not modelled (each is a reason a measurement will differ)
---------------------------------------------------------
Lock and atomic contention (CCE's serialised tile adds; favours CCE); the real position of live
tiles (clustered in frequent tokens, which CCE's vocabulary sort exploits; here pseudo-random,
the same for CCE and ours); L2 partitions and hashing; the measured register and shared memory
use (``ctas_per_sm`` is an estimate); cuBLAS's real kernels (modelled as grouped 128x128 tiles,
without tail effect since cuBLAS picks split-K / stream-K for outputs of few tiles); CCE's fp32
tiles (its 16-bit tiles are used; its backward needs 16-bit inputs, so it has no fp32 fwd+bwd
row); the reward head and ``_value_weight_grad_kernel`` (not part of the plan).
"""

from __future__ import annotations

import argparse
import csv
import functools
import heapq
import io
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from icrm_kernels.linear_logprobs import plan as plan_module

COLUMNS = ["impl", "pass", "N", "D", "V", "dtype", "arch", "flops_t", "dram_gb", "atomic_gb", "extra_mb",
           "inputs_grads_mb", "pred_ms", "bound", "live_frac"]
IMPLS = ("triton", "cce", "liger")
PASSES = ("fwd", "fwd+bwd")
DTYPE_BYTES = plan_module.DTYPE_BYTES


@dataclass(frozen=True)
class Hardware:
    name: str
    sms: int
    l2_bytes: int
    gemm_tflops: dict          # dtype -> dense GEMM rate the efficiencies are relative to
    dram_tbps: float           # achievable DRAM bandwidth, read + write counted
    l2_tbps: float             # L2 bandwidth, the rate of atomic / lock-protected read-modify-writes
    regs_per_sm: int
    smem_per_sm: int


#: Hardware constants, the same for every implementation. sm_90: H100 SXM as measured on this
#: project's machine (132 SMs, 50 MB L2, bf16 8192^3 GEMM 798 TFLOP/s, device-to-device copy
#: ~3.0 TB/s read + write); fp32 (no tensor cores: our and CCE's fp32 path use IEEE fp32,
#: cuBLAS without TF32) scaled by the spec-sheet ratio 67/989 of FP32 to dense BF16. L2
#: bandwidth (published microbenchmarks, not measured here) ~5.5 TB/s. sm_80: A100 SXM 80 GB
#: from the spec sheet scaled by the same achievable fractions (not measured here): 312 TFLOP/s
#: bf16 x 798/989, 2.04 TB/s HBM x 3.0/3.35, FP32 19.5 TFLOP/s, L2 ~4 TB/s.
ARCHS = {
    "sm_90": Hardware("H100 SXM", 132, 50 * 2**20, {"bf16": 798.0, "fp16": 798.0, "fp32": 798.0 * 67 / 989},
                      3.0, 5.5, 65536, 233472),
    "sm_80": Hardware("A100 SXM 80GB", 108, 40 * 2**20, {"bf16": 252.0, "fp16": 252.0, "fp32": 19.5 * 798 / 989},
                      1.83, 4.0, 65536, 167936),
}
#: Per kernel launch on the GPU timeline (back-to-back launches from one stream).
LAUNCH_US = 5.0
#: Accesses simulated per launch before the remaining waves are extrapolated (see module doc).
SIM_BUDGET = 400_000
#: Widest column strip of a hidden / weight cell (see module doc).
D_STRIP = 1024
DEFAULT_LIVE_FRAC = 0.2
#: Time of a dlogits program whose tile is dead (skipped from the saved row maxima), as a
#: fraction of a computed 128 x 128 tile (~40 us at D=4096 on H100): its CTA start, three
#: vector loads and a flag store, a few microseconds.
DEAD_TILE_COST = 1 / 16
#: The third-party point: (N, D, V, dtype, arch) and fwd+bwd ms per implementation.
CALIBRATION_POINT = ((16384, 2048, 248320, "bf16", "sm_90"), {"cce": 92.6, "liger": 321.0})
#: Efficiencies fitted by ``--calibrate`` on CALIBRATION_POINT at live fraction DEFAULT_LIVE_FRAC.
CALIBRATION = {"triton": 0.544, "cublas": 0.2007}

READ, WRITE, RMW = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# L2 model
# ------------------------------------------------------------------------------------------------


class L2:
    """LRU cache over cells: ``access(key, nbytes, mode)`` with mode READ (miss: read from DRAM),
    WRITE (allocate without reading, dirty) or RMW (read on miss, dirty). Dirty cells cost a
    write-back when evicted or flushed."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lines: OrderedDict = OrderedDict()  # key -> nbytes (negative: dirty)
        self.used = 0
        self.read_bytes = 0
        self.write_bytes = 0

    @property
    def dram_bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def access(self, key, nbytes: int, mode: int) -> None:
        lines = self.lines
        old = lines.get(key)
        if old is not None:
            lines.move_to_end(key)
            if mode and old > 0:
                lines[key] = -old
            return
        if mode != WRITE:
            self.read_bytes += nbytes
        lines[key] = -nbytes if mode else nbytes
        self.used += nbytes
        while self.used > self.capacity and lines:
            _, size = lines.popitem(last=False)
            if size < 0:
                self.write_bytes -= size
                size = -size
            self.used -= size

    def flush(self) -> None:
        """Write back every dirty cell (end of the pass: results must reach DRAM)."""
        for key, size in self.lines.items():
            if size < 0:
                self.write_bytes -= size
                self.lines[key] = -size


@dataclass(frozen=True)
class Tensor:
    """A 2-D tensor cut into cells of ``cell_rows x cell_cols`` elements; ``tid`` keeps keys apart."""

    tid: int
    rows: int
    cols: int
    esize: int
    cell_rows: int
    cell_cols: int

    def cells(self, r0: int, r1: int, c0: int, c1: int, mode: int) -> tuple:
        """Accesses covering rows [r0, r1) x cols [c0, c1) (clipped to the tensor)."""
        return _cells(self, r0, min(r1, self.rows), c0, min(c1, self.cols), mode)


@functools.lru_cache(maxsize=1 << 18)
def _cells(t: Tensor, r0: int, r1: int, c0: int, c1: int, mode: int) -> tuple:
    """``Tensor.cells``, cached: the same tiles are touched many times."""
    out = []
    for rc in range(r0 // t.cell_rows, plan_module.cdiv(r1, t.cell_rows)):
        nr = min(t.rows, (rc + 1) * t.cell_rows) - rc * t.cell_rows
        for cc in range(c0 // t.cell_cols, plan_module.cdiv(c1, t.cell_cols)):
            nc = min(t.cols, (cc + 1) * t.cell_cols) - cc * t.cell_cols
            out.append(((t.tid, rc, cc), nr * nc * t.esize, mode))
    return tuple(out)


@dataclass
class SimLaunch:
    """One launch for the simulator: ``programs`` in pid order, ``accesses(pid)`` -> one list of
    accesses per step, ``concurrency`` programs resident at once."""

    name: str
    programs: int
    concurrency: int
    accesses: Callable[[int], list]
    flops: float = 0.0
    atomic_bytes: float = 0.0
    eff: str | None = None       # efficiency class of its tensor-core work (None: bandwidth-bound)
    fixed_dram: float = 0.0      # analytic traffic of launches not worth simulating (memsets, gathers)
    slots: int = 0               # SMs x CTAs per SM, for the wave utilisation (0: no tail effect)
    work: Callable[[int], int] | None = None  # steps of program pid, when programs differ in length


@dataclass
class KernelCost:
    name: str
    flops: float
    dram_bytes: float
    atomic_bytes: float
    eff: str | None
    utilisation: float
    count: float = 1.0           # launches this cost stands for (row chunks extrapolated)


def run_launch(launch: SimLaunch, l2: L2, budget: int = SIM_BUDGET) -> float:
    """Simulate ``launch`` on ``l2`` (waves in lockstep, round-robin over steps); returns its DRAM
    bytes, extrapolated past ``budget`` accesses (module doc)."""
    start = l2.dram_bytes
    slots = max(1, launch.concurrency)
    waves = plan_module.cdiv(launch.programs, slots)
    per_wave, done = [], 0
    access = l2.access
    for w in range(waves):
        before = l2.dram_bytes
        progs = [launch.accesses(pid) for pid in range(w * slots, min(launch.programs, (w + 1) * slots))]
        for s in range(max(len(p) for p in progs)):
            for p in progs:
                if s < len(p):
                    for key, nbytes, mode in p[s]:
                        access(key, nbytes, mode)
                    done += len(p[s])
        per_wave.append(l2.dram_bytes - before)
        if done > budget and 2 <= w + 1 < waves:
            tail = per_wave[len(per_wave) // 2:]
            return l2.dram_bytes - start + (waves - w - 1) * sum(tail) / len(tail)
    return l2.dram_bytes - start


def live_tile(row_block: int, vocab_tile: int, frac: float) -> bool:
    """Whether the 128-row x 128-vocab tile survives the gradient filter: a fixed pseudo-random
    pattern (a 32-bit integer mix, no seeds to set) with density ``frac``, the same for CCE and ours."""
    x = (row_block * 0x9E3779B1 + vocab_tile * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return x < frac * 2**32


def ctas_per_sm(cfg: plan_module.KernelConfig, esize: int, hw: Hardware) -> int:
    """Resident CTAs per SM, estimated: registers (an fp32 accumulator of block_m x block_n spread
    over the CTA's threads, twice for the operands in flight, plus 32 for addresses; at most 255
    per thread), shared memory (num_stages x (A + B tiles)) and 2048 threads per SM."""
    threads = 32 * cfg.num_warps
    regs = min(255, 32 + 2 * cfg.block_m * cfg.block_n // threads)
    smem = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * esize
    return max(1, min(hw.regs_per_sm // (regs * threads), hw.smem_per_sm // max(1, smem), 2048 // threads))


def _utilisation(programs: int, slots: int, work: Callable[[int], int] | None = None) -> float:
    """Busy fraction of the launch's ``slots``: programs are dispatched in pid order to the
    first free slot (the hardware block scheduler); ``work(pid)`` is a program's length in
    steps (all equal when ``None``: then whole waves, the last one partial)."""
    if not slots or not programs:
        return 1.0
    if work is None:
        return programs / (plan_module.cdiv(programs, slots) * slots)
    lengths = [work(pid) for pid in range(programs)]
    if len(set(lengths)) == 1:
        return programs / (plan_module.cdiv(programs, slots) * slots)
    if not sum(lengths):
        return 1.0
    free = [0] * min(slots, programs)
    for length in lengths:
        heapq.heapreplace(free, free[0] + length)
    return sum(lengths) / (slots * max(free))


# ------------------------------------------------------------------------------------------------
# The three implementations as launches
# ------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    N: int
    D: int
    V: int
    dtype: str
    arch: str
    live_frac: float

    @property
    def esize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def hw(self) -> Hardware:
        return ARCHS[self.arch]


class Operands:
    """The N x D / V x D tensors of a prediction and their cells (same cells for all impls)."""

    def __init__(self, s: Shape):
        strip = min(s.D, D_STRIP)
        self.hidden = Tensor(0, s.N, s.D, s.esize, 128, strip)
        self.weight = Tensor(1, s.V, s.D, s.esize, 128, strip)
        self.d_hidden = Tensor(2, s.N, s.D, s.esize, 128, strip)
        self.d_weight = Tensor(3, s.V, s.D, s.esize, 128, strip)


@dataclass(frozen=True)
class ModelLaunch:
    """A CCE / Liger launch in the plan's terms: a grouped ``grid_m x grid_n`` grid (the same
    ``grouped_program`` as ours) and ``k_tiles`` steps per program."""

    grid_m: int
    grid_n: int
    group_m: int
    k_tiles: int = 1

    @property
    def programs(self) -> int:
        return self.grid_m * self.grid_n

    def program(self, pid: int) -> tuple[int, int]:
        return plan_module.grouped_program(pid, self.grid_m, self.grid_n, self.group_m)


def _gemm_accesses(order, step_accesses, end_accesses=None):
    """accesses(pid) for a grouped GEMM-like launch: per K step ``step_accesses(m, n, k)``, then
    ``end_accesses(m, n)`` appended to the last step (the epilogue store)."""

    def accesses(pid):
        m, n = order.program(pid)
        steps = [step_accesses(m, n, k) for k in range(order.k_tiles)]
        if end_accesses is not None:
            steps[-1] = steps[-1] + end_accesses(m, n)
        return steps

    return accesses


def _whole_rows(t: Tensor, r0: int, rows: int, mode: int = READ) -> tuple:
    return t.cells(r0, r0 + rows, 0, t.cols, mode)


def ours(s: Shape, with_backward: bool) -> list[KernelCost]:
    """Our kernels, from ``plan.launch_plan`` (read at call time, so a test can replace it): every
    launch's grid, program order and per-step accesses (``Launch.accesses``) are the plan's."""
    p = plan_module.launch_plan(s.N, s.D, s.V, s.dtype, s.arch)
    hw, ops, esize = s.hw, Operands(s), s.esize
    cd = plan_module.configs(s.dtype, s.arch).dlogits
    ws_rows, ws_vocab = (p.row_chunk, s.V) if p.backward_axis == "rows" else (s.N, p.vocab_chunk)
    tensors = {"hidden": ops.hidden, "weight": ops.weight, "d_hidden": ops.d_hidden, "d_weight": ops.d_weight,
               "partials": Tensor(4, p.vocab_splits + 1, s.N, 4, 1, plan_module.MERGE_BLOCK),
               "dx": Tensor(5, ws_rows, ws_vocab, esize, cd.block_m, cd.block_n),
               "tile_max": Tensor(7, s.N, plan_module.cdiv(s.V, cd.block_n), 2, cd.block_m, 8)}
    modes = {"read": READ, "write": WRITE, "rmw": RMW}

    def launch(lc: plan_module.Launch, flops: float, work=None) -> SimLaunch:
        eff = "triton" if flops else None
        slots = hw.sms * min(ctas_per_sm(part.config, esize, hw) for part in lc.parts or (lc,))

        def accesses(pid):
            steps, any_live = [], False
            for step in lc.accesses(pid):
                acc = ()
                for a in step:
                    live = a.live
                    if live == "any":
                        live = any_live
                    elif live is not None:
                        live = live_tile(*live, s.live_frac)
                        any_live = any_live or live
                    if live is None or live:
                        acc += tensors[a.tensor].cells(a.r0, a.r1, a.c0, a.c1, modes[a.mode])
                steps.append(acc)
            return steps

        return SimLaunch(lc.kernel, lc.grid[0], slots, accesses, flops=flops, eff=eff, slots=slots if eff else 0,
                         work=work or (lambda pid: len(lc.steps(pid))))

    l2 = L2(hw.l2_bytes)
    fwd_launch, merge = p.forward
    costs = _simulate([launch(fwd_launch, 2.0 * s.N * s.D * s.V), launch(merge, 0.0)], l2)
    if not with_backward:
        return _finish(costs, l2)

    def chunk_launches(start: int, size: int) -> list[SimLaunch]:
        k1, dgrad = p.backward_launches(start, size)
        flops = 2.0 * k1.rows * s.D * k1.vocab
        if not k1.tile_max:
            return [launch(k1, flops), launch(dgrad, 2 * s.live_frac * flops)]
        # dlogits recomputes the live tiles only; a dead program still starts, loads its row
        # maxima, lse and targets and stores its flag: charged DEAD_TILE_COST of a tile.
        rb0, vt0 = k1.row0 // cd.block_m, k1.vocab0 // cd.block_n

        def k1_work(pid):
            rb, vt = k1.program(pid)
            return 1.0 if live_tile(rb0 + rb, vt0 + vt, s.live_frac) else DEAD_TILE_COST

        k1_flops = flops * (s.live_frac + (1 - s.live_frac) * DEAD_TILE_COST)
        return [launch(k1, k1_flops, k1_work), launch(dgrad, 2 * s.live_frac * flops)]

    costs += _chunked(p.chunks, chunk_launches, l2)
    return _finish(costs, l2)


def cce(s: Shape, with_backward: bool) -> list[KernelCost]:
    """CCE's launches (module doc); its default 16-bit configs: fwd 128x128x32, 4 warps, 3 stages;
    bwd 128x128x32, 8 warps, 3 stages; GROUP_B 8."""
    hw, ops, esize = s.hw, Operands(s), s.esize
    bb = bv = 128
    order = ModelLaunch(plan_module.cdiv(s.N, bb), plan_module.cdiv(s.V, bv), 8)
    fwd_cfg = plan_module.KernelConfig(bb, bv, 32, 8, 4, 3)
    bwd_cfg = plan_module.KernelConfig(bb, bv, 32, 8, 8, 3)
    logits_flops = 2.0 * s.N * s.D * s.V
    tiles = order.programs

    def tile_reads(m, n, _k):
        return _whole_rows(ops.hidden, m * bb, bb) + _whole_rows(ops.weight, n * bv, bv)

    # lse merged under a lock per tile: load + store of block rows' fp32 lse; the mean logit
    # (gradients only): an fp32 atomic add per vocab entry of the tile.
    fwd_atomic = tiles * (2 * 4 * bb + (4 * bv if with_backward else 0))
    slots_f = hw.sms * ctas_per_sm(fwd_cfg, esize, hw)
    launches = [
        SimLaunch("_cce_lse_forward_kernel", tiles, slots_f, _gemm_accesses(order, tile_reads), flops=logits_flops,
                  atomic_bytes=fwd_atomic, eff="triton", slots=slots_f),
        # indexed_neg_dot: the target rows of C gathered, one dot per row
        SimLaunch("indexed_neg_dot", 0, 1, lambda pid: [], fixed_dram=2.0 * s.N * s.D * esize),
    ]
    if with_backward:
        launches.append(SimLaunch("zeros dE, dC", 0, 1, lambda pid: [], fixed_dram=(s.N + s.V) * s.D * esize))

        def bwd_accesses(pid):
            m, n = order.program(pid)
            acc = tile_reads(m, n, 0)
            if live_tile(m, n, s.live_frac):
                acc = acc + _whole_rows(ops.d_hidden, m * bb, bb, RMW) + _whole_rows(ops.d_weight, n * bv, bv, RMW)
            return [acc]

        live = sum(live_tile(*order.program(pid), s.live_frac) for pid in range(tiles)) if tiles <= 2_000_000 \
            else s.live_frac * tiles
        # lock-protected load + store of the bf16 dE tile and dC tile of every live tile
        bwd_atomic = live * 2 * (bb + bv) * s.D * esize
        slots_b = hw.sms * ctas_per_sm(bwd_cfg, esize, hw)
        launches.append(SimLaunch("_cce_backward_kernel", tiles, slots_b, bwd_accesses,
                                  flops=logits_flops * (1 + 2 * s.live_frac), atomic_bytes=bwd_atomic,
                                  eff="triton", slots=slots_b))
    l2 = L2(hw.l2_bytes)
    costs = _simulate(launches, l2)
    return _finish(costs, l2)


def liger_chunk_size(N: int, D: int, V: int) -> int:
    """Liger FLCE's rule: bound the logits chunk to about N x D elements."""
    inc = plan_module.cdiv(V, D)
    chunk = 1 << max(0, (plan_module.cdiv(N, inc) - 1).bit_length())
    return min(chunk, N)


def liger(s: Shape, with_backward: bool) -> list[KernelCost]:
    hw, ops, esize = s.hw, Operands(s), s.esize
    chunk = liger_chunk_size(s.N, s.D, s.V)
    bt = 128
    logits = Tensor(6, chunk, s.V, esize, bt, bt)
    # cuBLAS's tiles: one CTA per SM for the L2 model; no tail effect (cuBLAS picks split-K /
    # stream-K kernels for outputs of few tiles, such as grad_input's [chunk, D])
    gemm_slots = hw.sms
    # Liger's CE kernel: one program per row with 32 warps, two per SM: rows in flight, as
    # 128-row programs.
    ce_slots = max(1, 2 * hw.sms // bt)
    vt_n = plan_module.cdiv(s.V, bt)

    def chunk_launches(row0: int, rows: int) -> list[SimLaunch]:
        rb_n = plan_module.cdiv(rows, bt)
        dt_n = plan_module.cdiv(s.D, bt)
        mm = ModelLaunch(rb_n, vt_n, 8)

        def mm_step(m, n, _k):
            return (_whole_rows(ops.hidden, row0 + m * bt, min(bt, rows - m * bt))
                    + _whole_rows(ops.weight, n * bt, bt)
                    + logits.cells(m * bt, (m + 1) * bt, n * bt, (n + 1) * bt, WRITE))

        def ce_accesses(pid):
            first_pass = [logits.cells(pid * bt, (pid + 1) * bt, v * bt, (v + 1) * bt, READ) for v in range(vt_n)]
            if not with_backward:
                return first_pass
            return first_pass + [logits.cells(pid * bt, (pid + 1) * bt, v * bt, (v + 1) * bt, RMW) for v in range(vt_n)]

        out = [SimLaunch("liger logits mm", mm.programs, gemm_slots, _gemm_accesses(mm, mm_step),
                         flops=2.0 * rows * s.D * s.V, eff="cublas"),
               SimLaunch("liger_cross_entropy_kernel", rb_n, ce_slots, ce_accesses)]
        if not with_backward:
            return out
        dgrad = ModelLaunch(rb_n, dt_n, 8, vt_n)

        def dgrad_step(m, n, k):
            return (logits.cells(m * bt, (m + 1) * bt, k * bt, (k + 1) * bt, READ)
                    + ops.weight.cells(k * bt, (k + 1) * bt, n * bt, (n + 1) * bt, READ))

        def dgrad_end(m, n):
            return ops.d_hidden.cells(row0 + m * bt, row0 + min(rows, (m + 1) * bt), n * bt, (n + 1) * bt, WRITE)

        wgrad = ModelLaunch(vt_n, dt_n, 8, rb_n)

        def wgrad_step(m, n, k):
            return (logits.cells(k * bt, (k + 1) * bt, m * bt, (m + 1) * bt, READ)
                    + ops.hidden.cells(row0 + k * bt, row0 + min(rows, (k + 1) * bt), n * bt, (n + 1) * bt, READ))

        def wgrad_end(m, n):
            return ops.d_weight.cells(m * bt, (m + 1) * bt, n * bt, (n + 1) * bt, RMW)

        return out + [
            SimLaunch("liger grad_input mm", dgrad.programs, gemm_slots, _gemm_accesses(dgrad, dgrad_step, dgrad_end),
                      flops=2.0 * rows * s.D * s.V, eff="cublas"),
            SimLaunch("liger grad_weight addmm", wgrad.programs, gemm_slots, _gemm_accesses(wgrad, wgrad_step, wgrad_end),
                      flops=2.0 * rows * s.D * s.V, eff="cublas")]

    l2 = L2(hw.l2_bytes)
    costs = []
    if with_backward:
        costs = _simulate([SimLaunch("zeros grad_input, grad_weight", 0, 1, lambda pid: [],
                                     fixed_dram=(s.N + s.V) * s.D * esize)], l2)
    costs += _chunked([(a, min(chunk, s.N - a)) for a in range(0, s.N, chunk)], chunk_launches, l2)
    return _finish(costs, l2)


def _simulate(launches: list[SimLaunch], l2: L2, count: float = 1.0) -> list[KernelCost]:
    out = []
    for launch in launches:
        dram = run_launch(launch, l2) if launch.programs else launch.fixed_dram
        out.append(KernelCost(launch.name, launch.flops, dram, launch.atomic_bytes, launch.eff,
                              _utilisation(launch.programs, launch.slots, launch.work), count))
    return out


def _chunked(chunks: list[tuple[int, int]], chunk_launches, l2: L2) -> list[KernelCost]:
    """Chunks ``(start, size)``: the first two and the last simulated, the middle ones counted as
    the second."""
    if not chunks:
        return []
    simulated = sorted({0, min(1, len(chunks) - 1), len(chunks) - 1})
    costs = []
    for i in simulated:
        count = len(chunks) - (len(simulated) - 1) if i == 1 and len(chunks) > 3 else 1
        costs += _simulate(chunk_launches(*chunks[i]), l2, count)
    return costs


def _finish(costs: list[KernelCost], l2: L2) -> list[KernelCost]:
    """End of the pass: dirty cells are written back, charged to the last launch."""
    before = l2.dram_bytes
    l2.flush()
    if costs:
        costs[-1].dram_bytes += l2.dram_bytes - before
    return costs


# ------------------------------------------------------------------------------------------------
# Time, memory, rows
# ------------------------------------------------------------------------------------------------


def kernel_ms(k: KernelCost, s: Shape, eff: dict) -> tuple[float, str]:
    """One launch's predicted time (ms) and what bounds it."""
    hw = s.hw
    terms = {
        "compute": k.flops / (hw.gemm_tflops[s.dtype] * 1e12 * eff[k.eff] * k.utilisation) if k.eff else 0.0,
        "dram": k.dram_bytes / (hw.dram_tbps * 1e12),
        "atomic": k.atomic_bytes / (hw.l2_tbps * 1e12),
    }
    bound = max(terms, key=terms.get)
    return (terms[bound] + LAUNCH_US * 1e-6) * 1e3, bound


def extra_bytes(impl: str, s: Shape, with_backward: bool) -> int:
    """Memory beyond the inputs and their gradients."""
    N, D, V, esize = s.N, s.D, s.V, s.esize
    if impl == "triton":
        p = plan_module.launch_plan(N, D, V, s.dtype, s.arch)
        return p.workspace_bytes if with_backward else p.forward_bytes
    if impl == "cce":
        locks = 4 * plan_module.cdiv(N, 128)
        if not with_backward:
            return 4 * N + locks + 4 * N  # lse, locks, the gathered target logits
        nd_locks = plan_module.cdiv(D, 64)
        # lse, mean logit and vocab order (V each), the dE / dC locks
        return 4 * N + 4 * N + 4 * V + 4 * V + locks + 4 * nd_locks * (plan_module.cdiv(N, 128) + plan_module.cdiv(V, 128))
    chunk = liger_chunk_size(N, D, V)
    return chunk * V * esize + 4 * N + N  # logits chunk, fp32 loss, target mask


MODELS = {"triton": ours, "cce": cce, "liger": liger}


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

    def row(self) -> dict:
        s = self.shape
        with_backward = self.pass_ == "fwd+bwd"
        flops, dram, atomic = self.totals()
        inputs = (s.N + s.V) * s.D * s.esize * (2 if with_backward else 1)
        return {"impl": self.impl, "pass": self.pass_, "N": s.N, "D": s.D, "V": s.V, "dtype": s.dtype, "arch": s.arch,
                "flops_t": f"{flops / 1e12:.4g}", "dram_gb": f"{dram / 1e9:.4g}", "atomic_gb": f"{atomic / 1e9:.4g}",
                "extra_mb": f"{extra_bytes(self.impl, s, with_backward) / 2**20:.1f}",
                "inputs_grads_mb": f"{inputs / 2**20:.1f}", "pred_ms": f"{self.ms:.4g}", "bound": self.bound,
                "live_frac": f"{s.live_frac:g}"}


def predict(impl: str, pass_: str, s: Shape, eff: dict | None = None) -> Prediction:
    eff = CALIBRATION if eff is None else eff
    kernels = MODELS[impl](s, pass_ == "fwd+bwd")
    pred = Prediction(impl, pass_, s, kernels)
    by_bound: dict = {}
    for k in kernels:
        ms, bound = kernel_ms(k, s, eff)
        pred.ms += ms * k.count
        by_bound[bound] = by_bound.get(bound, 0.0) + ms * k.count
    pred.bound = max(by_bound, key=by_bound.get) if by_bound else ""
    return pred


def calibrate() -> dict:
    """Fit CALIBRATION: the efficiency at which the model reproduces each third-party time."""
    (N, D, V, dtype, arch), targets = CALIBRATION_POINT
    s = Shape(N, D, V, dtype, arch, DEFAULT_LIVE_FRAC)
    fitted = {}
    for impl, eff_key in (("cce", "triton"), ("liger", "cublas")):
        kernels = MODELS[impl](s, True)

        def total(e):
            return sum(kernel_ms(k, s, {**CALIBRATION, eff_key: e})[0] * k.count for k in kernels)

        lo, hi = 1e-3, 2.0
        if total(hi) > targets[impl]:
            raise ValueError(f"{impl}: even at efficiency {hi} the model exceeds {targets[impl]} ms "
                             "(its memory terms alone are too slow); the constants in ARCHS are off")
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid) > targets[impl] else (lo, mid)
        fitted[eff_key] = round((lo + hi) / 2, 4)
    return fitted


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def parse_shapes(values: list[str]) -> list[tuple[int, int, int]]:
    shapes = []
    for value in values:
        for item in value.split(";"):
            parts = item.strip().split(",")
            try:
                n, d, v = (int(x) for x in parts)
            except ValueError:
                raise ValueError(f"--shape must be N,D,V (three integers, several separated by ';'), got {item!r}") from None
            if min(n, d, v) < 1:
                raise ValueError(f"--shape must have N, D, V >= 1, got {item!r}")
            shapes.append((n, d, v))
    return shapes


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    header = COLUMNS
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(str(r[c]) for c in header) + " |" for r in rows]
        return "PREDICTED, NOT MEASURED (benchmarks/predict.py)\n\n" + "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in header]
    lines = ["  ".join(c.rjust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(header, widths)) for r in rows]
    return "PREDICTED, NOT MEASURED (benchmarks/predict.py)\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", default=[], metavar="N,D,V",
                        help="shape to predict (repeatable, or several separated by ';')")
    parser.add_argument("--dtype", default="bf16", help=f"one of {tuple(DTYPE_BYTES)}")
    parser.add_argument("--arch", default="sm_90", help=f"one of {tuple(ARCHS)}")
    parser.add_argument("--format", default="table", help="table | csv | markdown")
    parser.add_argument("--live-frac", default=str(DEFAULT_LIVE_FRAC),
                        help="fraction of logit tiles whose gradient survives the filter (0..1]; several, "
                        "comma-separated, add fwd+bwd rows for each")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--out", type=Path, help="also write the CSV to this file (and the calibration and "
                        "hardware next to it, <out stem>.notes.json, for benchmarks/report.py)")
    parser.add_argument("--calibrate", action="store_true", help="refit CALIBRATION on the third-party point and print it")
    args = parser.parse_args(argv)
    try:
        if args.calibrate:
            print(f"CALIBRATION = {calibrate()}")
            return 0
        rows = rows_for(parse_shapes(args.shape or ["16384,4096,128256"]), args.dtype, args.arch,
                        _live_frac(args.live_frac), _impls(args.impls), args.format)
    except ValueError as exc:
        parser.error(str(exc))
    print(render(rows, args.format), end="")
    if args.out:
        args.out.write_text(render(rows, "csv"))
        args.out.with_suffix(".notes.json").write_text(json.dumps(notes(args.arch), indent=1) + "\n")
    return 0


def notes(arch: str) -> dict:
    """What a reader of the predicted table needs: hardware, efficiencies and where they come from."""
    hw = ARCHS[arch]
    (n, d, v, dtype, cal_arch), targets = CALIBRATION_POINT
    return {"hardware": {"name": hw.name, "sms": hw.sms, "l2_mb": hw.l2_bytes / 2**20, "gemm_tflops": hw.gemm_tflops,
                         "dram_tbps": hw.dram_tbps, "l2_tbps": hw.l2_tbps},
            "calibration": CALIBRATION,
            "calibration_point": {"N": n, "D": d, "V": v, "dtype": dtype, "arch": cal_arch, "fwd+bwd ms": targets,
                                  "source": "huggingface/trl PR #6858"},
            "launch_us": LAUNCH_US}


def _live_frac(text: str) -> list[float]:
    """``--live-frac``: one fraction or several separated by commas (the first one is the headline)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--live-frac must be numbers in (0, 1] separated by commas, got {text!r}")
        values.append(value)
    return values


def _impls(text: str) -> list[str]:
    impls = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in impls if x not in IMPLS]
    if bad or not impls:
        raise ValueError(f"--impls must be a comma-separated subset of {','.join(IMPLS)}, got {text!r}")
    return impls


def rows_for(shapes, dtype: str, arch: str, live_frac, impls=IMPLS, fmt: str = "table") -> list[dict]:
    """Rows for each shape x impl x pass; ``live_frac`` is one fraction or a list of them (the forward
    does not depend on it, so its rows come once, with the first fraction)."""
    fracs = [live_frac] if isinstance(live_frac, (int, float)) else list(live_frac)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {tuple(ARCHS)} (architectures with hardware constants), got {arch!r}")
    if fmt not in ("table", "csv", "markdown"):
        raise ValueError(f"--format must be one of table, csv, markdown, got {fmt!r}")
    rows = []
    for n, d, v in shapes:
        for i, frac in enumerate(fracs):
            s = Shape(n, d, v, dtype, arch, frac)
            for impl in impls:
                for pass_ in PASSES:
                    if pass_ == "fwd" and i > 0:
                        continue
                    if impl == "cce" and pass_ == "fwd+bwd" and dtype == "fp32":
                        continue  # CCE's backward requires 16-bit inputs
                    rows.append(predict(impl, pass_, s).row())
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
