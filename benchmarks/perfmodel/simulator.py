"""The traffic side of the performance model: an LRU model of the L2 driven by each launch's
program order, and the launch descriptions it runs (see ``benchmarks/predict.py`` for the
model as a whole).

* **L2**: one LRU cache of the architecture's L2 size over *cells* (a cell: 128 rows x a strip of
  up to ``D_STRIP`` columns of hidden / weight and their gradients, one ``block_m x block_n``
  tile of the dlogits workspace or of Liger's logits). A miss reads the cell from DRAM; a store
  allocates the cell without reading it and a dirty cell is written back when evicted or at the
  end of the pass (so DRAM = reads + write-backs). One L2 is shared by all launches of a pass, in
  launch order. A cell touched only in part is charged in full. H100's L2 is two 25 MB halves;
  it is modelled as one 50 MB LRU.
* **Concurrency**: programs are issued in launch (pid) order, in waves of ``SMs x CTAs per SM``
  that advance in lockstep, round-robin over their steps.
* **Sampling**: a launch whose accesses exceed ``SIM_BUDGET`` is simulated for its first waves
  (at least two) and the rest extrapolated with the mean DRAM bytes per wave of the second half
  of those simulated; a backward of many identical chunks is simulated for its first two chunks
  and its last, the middle ones counted as the second.
"""

from __future__ import annotations

import functools
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from benchmarks.perfmodel.hardware import ARCHS, Hardware
from icrm_kernels.linear_logprobs import plan as plan_module

DTYPE_BYTES = plan_module.DTYPE_BYTES
#: Accesses simulated per launch before the remaining waves are extrapolated.
SIM_BUDGET = 400_000
#: Widest column strip of a hidden / weight cell.
D_STRIP = 1024

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
    work: tuple = ()             # tensor-core work: ((FLOPs, Structure), ...); () = bandwidth-bound
    atomic_bytes: float = 0.0
    exps: float = 0.0            # exponentials of a fused softmax (special function unit)
    overhead_cycles: float = 0.0  # SM-cycles of work that is neither MMA nor traffic (dead steps, tiles)
    fixed_dram: float = 0.0      # analytic traffic of launches not worth simulating (memsets, gathers)
    slots: int = 0               # SMs x CTAs per SM, for the wave utilisation (0: no tail effect)
    program_steps: Callable[[int], float] | None = None  # length of program pid, when programs differ


@dataclass
class KernelCost:
    """What a launch costs, before timing (``timing.kernel_ms`` turns it into milliseconds)."""

    name: str
    work: tuple                  # ((FLOPs, Structure), ...)
    dram_bytes: float
    atomic_bytes: float
    utilisation: float
    count: float = 1.0           # launches this cost stands for (row chunks extrapolated)
    exps: float = 0.0
    overhead_cycles: float = 0.0

    @property
    def flops(self) -> float:
        return sum(f for f, _ in self.work)


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


def utilisation(programs: int, slots: int, work: Callable[[int], int] | None = None) -> float:
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
# Shapes, operands and launch descriptions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
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


def gemm_accesses(order, step_accesses, end_accesses=None):
    """accesses(pid) for a grouped GEMM-like launch: per K step ``step_accesses(m, n, k)``, then
    ``end_accesses(m, n)`` appended to the last step (the epilogue store)."""

    def accesses(pid):
        m, n = order.program(pid)
        steps = [step_accesses(m, n, k) for k in range(order.k_tiles)]
        if end_accesses is not None:
            steps[-1] = steps[-1] + end_accesses(m, n)
        return steps

    return accesses


def whole_rows(t: Tensor, r0: int, rows: int, mode: int = READ) -> tuple:
    return t.cells(r0, r0 + rows, 0, t.cols, mode)



def simulate(launches: list[SimLaunch], l2: L2, count: float = 1.0) -> list[KernelCost]:
    out = []
    for launch in launches:
        dram = run_launch(launch, l2) if launch.programs else launch.fixed_dram
        out.append(KernelCost(launch.name, launch.work, dram, launch.atomic_bytes,
                              utilisation(launch.programs, launch.slots, launch.program_steps), count,
                              launch.exps, launch.overhead_cycles))
    return out


def chunked(chunks: list[tuple[int, int]], chunk_launches, l2: L2) -> list[KernelCost]:
    """Chunks ``(start, size)``: the first two and the last simulated, the middle ones counted as
    the second."""
    if not chunks:
        return []
    simulated = sorted({0, min(1, len(chunks) - 1), len(chunks) - 1})
    costs = []
    for i in simulated:
        count = len(chunks) - (len(simulated) - 1) if i == 1 and len(chunks) > 3 else 1
        costs += simulate(chunk_launches(*chunks[i]), l2, count)
    return costs


def finish(costs: list[KernelCost], l2: L2) -> list[KernelCost]:
    """End of the pass: dirty cells are written back, charged to the last launch."""
    before = l2.dram_bytes
    l2.flush()
    if costs:
        costs[-1].dram_bytes += l2.dram_bytes - before
    return costs

