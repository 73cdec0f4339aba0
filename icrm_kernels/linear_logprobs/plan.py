"""The launch plan of the ``linear_logprobs`` Triton kernels: a pure function of the shapes,
the dtype and the architecture (no torch, no triton), so the launchers in ``kernels.py``, the
tests and the performance model (``benchmarks/predict.py``) all read the same plan.

``launch_plan(N, D, V, dtype, arch)`` returns every launch of a forward and of one backward
row chunk: kernel name, grid, block configuration, and the kernel's own program order
(``Launch.program``) and access order (``Launch.steps``).

Tile orders (``grouped_program``, the Triton matmul tutorial's grouped / swizzled order): a
1-D grid of ``grid_m * grid_n`` programs is walked in groups of ``group_m`` consecutive M
indices; inside a group the M index runs fastest. The ~one wave of programs resident at a time
then covers a ``group_m x grid_n`` rectangle instead of every M index for one N index, so the
operands they share stay in L2.

Launches (``M`` / ``N`` axes of each grid, ``K`` the reduction loop):

* ``_forward_kernel``: M = row blocks of ``block_m`` rows, N = the ``vocab_splits`` contiguous
  shares of the vocabulary. A program walks its share tile by tile (``block_n`` vocab entries),
  each tile a ``tl.dot`` over D in ``block_k`` chunks. ``vocab_splits`` depends on V and the
  arch only, never on N, and no block size depends on N: a row's result is bitwise the same
  alone or in any batch.
* ``_merge_kernel``: one program per ``MERGE_BLOCK`` rows combines the ``[splits, N]`` partial
  logsumexps and target logits in split order (deterministic, per row).
* Backward, per chunk of ``row_chunk`` rows (``backward_chunk(rows)``):
  ``_dlogits_kernel`` (M = row blocks of the chunk, N = vocab tiles; K = D) writes
  ``dx [rows, V]`` in the input dtype and the ``live`` flags ``[row blocks, vocab tiles]``;
  ``_dhidden_kernel`` (M = row blocks, N = blocks of ``block_n`` hidden dims; K = V in steps
  of ``block_k``, which divides the dlogits' ``block_n``: each flag covers
  ``dlogits.block_n / block_k`` K steps);
  ``_dweight_kernel`` (M = vocab tiles, N = blocks of hidden dims; K = the chunk's rows in
  steps of ``block_k``, which divides the dlogits' ``block_m``).
  Every chunk issues these three launches; the last chunk has ``N - (chunks-1) * row_chunk``
  rows, so its dlogits / dhidden grids have fewer row blocks and the dweight K loop is
  shorter. ``LaunchPlan.backward`` is the launches of a full first chunk.
  The small ``_value_weight_grad_kernel`` (``hidden^T @ grad_rewards``) runs once per backward,
  outside the chunks, and is not part of the plan.

``Launch.steps(pid)`` lists what program ``pid`` touches, in order, one tuple per K step
(data-independent: the gradient filter may skip some steps of dhidden / dweight at run time):

* ``_forward_kernel`` and ``_dlogits_kernel``: ``(row_block, vocab_tile)`` per logit tile
  (each tile reads ``block_m`` hidden rows and ``block_n`` weight rows, all of D).
* ``_merge_kernel``: ``(row_block, split)`` with ``MERGE_BLOCK``-row blocks.
* ``_dhidden_kernel``: ``(row_block, vocab_tile)`` per flag tile of its K loop (``dx[rows,
  tile]`` and ``weight[tile, dims]``, read in ``dlogits.block_n / block_k`` K steps), for the
  program's dims block ``program(pid)[1]``.
* ``_dweight_kernel``: ``(vocab_tile, row_block)`` per flag tile of its K loop (``dx[rows,
  tile]`` and ``hidden[rows, dims]``, in ``dlogits.block_m / block_k`` K steps).

Row blocks in the backward are counted inside the chunk (0 = the chunk's first rows).

Memory bound (issue 10): the extra memory of forward + backward (``workspace_bytes``) stays
within ``WORKSPACE_FRACTION`` of the inputs plus their gradients (hidden and weight, twice).
``row_chunk`` is the largest multiple of the dlogits ``block_m`` that fits; when even one row
block of ``dx`` does not fit (small D), it is the largest row count that fits (the row blocks
then partly masked), down to one row; only when a single row of ``dx`` plus ``lse`` exceeds the
budget (D of a few units) does the bound not hold (``LaunchPlan.within_budget`` says so).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
#: All configuration keys: the real architectures, the CPU interpreter and a generic fallback.
KEYS = ARCHS + ("interpreter", "default")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
#: Largest dynamic shared memory per block (bytes, with the opt-in) of each architecture.
SMEM_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
#: Extra memory allowed, as a fraction of inputs + gradients (hidden, weight) in their dtype.
WORKSPACE_FRACTION = 0.10
#: Rows per program of the split-merge kernel (a bandwidth-bound elementwise pass).
MERGE_BLOCK = 1024


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ArchConfig:
    """Everything the plan takes from an architecture, for 16-bit inputs (see ``_configs``)."""

    forward: KernelConfig
    dlogits: KernelConfig
    dhidden: KernelConfig
    dweight: KernelConfig
    max_splits: int          # vocab splits of the forward (the N axis of its grouped order)
    min_split_tiles: int     # fewer vocab tiles than this per split: use fewer splits


def _c(bm, bn, bk, gm, w, s):
    return KernelConfig(bm, bn, bk, gm, w, s)


# 16-bit configurations. The backward's tiles are coupled through the ``live`` flags, one per
# dlogits tile (block_m rows x block_n vocab entries): dhidden's block_m is the dlogits' block_m
# and its block_k divides the dlogits' block_n; dweight's block_m is the dlogits' block_n and
# its block_k divides the dlogits' block_m (``_check_coupling``). group_m x max_splits is about
# one wave of forward programs (SM count at one CTA per SM): sm_80 108 SMs, sm_86 84 (A10 /
# 3090: 72-82), sm_89 128-142, sm_90 132. Registers: 8 warps keep the fp32 accumulator of a
# 128 x 128 tile at 64 registers a thread and a K step of 32 keeps the two operand pointer
# tiles at 32 registers each, so nothing spills (sm_80's dlogits takes K steps of 16: with
# Triton 3.6 its softcap epilogue spilled at 32); shared memory (stages x (A + B tile)) stays
# under each architecture's limit. tests/gpu_compile.py checks both with ptxas.
_CONFIGS = {
    "sm_90": ArchConfig(
        forward=_c(128, 128, 32, 16, 8, 4), dlogits=_c(128, 128, 32, 8, 8, 4),
        dhidden=_c(128, 128, 32, 8, 8, 4), dweight=_c(128, 64, 32, 4, 8, 4),
        max_splits=8, min_split_tiles=16,
    ),
    "sm_80": ArchConfig(
        forward=_c(128, 128, 32, 12, 8, 4), dlogits=_c(128, 128, 16, 8, 8, 4),
        dhidden=_c(128, 128, 32, 8, 8, 4), dweight=_c(128, 64, 32, 4, 8, 4),
        max_splits=8, min_split_tiles=16,
    ),
    "sm_86": ArchConfig(
        forward=_c(128, 128, 32, 9, 8, 3), dlogits=_c(128, 64, 32, 8, 8, 3),
        dhidden=_c(128, 64, 32, 8, 8, 3), dweight=_c(64, 64, 32, 4, 4, 3),
        max_splits=8, min_split_tiles=16,
    ),
    "sm_89": ArchConfig(
        forward=_c(128, 128, 32, 16, 8, 3), dlogits=_c(128, 64, 32, 8, 8, 3),
        dhidden=_c(128, 64, 32, 8, 8, 3), dweight=_c(64, 64, 32, 4, 4, 3),
        max_splits=8, min_split_tiles=16,
    ),
    "default": ArchConfig(
        forward=_c(64, 64, 32, 8, 4, 2), dlogits=_c(64, 64, 32, 8, 4, 2),
        dhidden=_c(64, 64, 32, 8, 4, 2), dweight=_c(64, 64, 32, 4, 4, 2),
        max_splits=4, min_split_tiles=16,
    ),
    # Small blocks so that interpreter tests span many tiles, splits and chunks; dhidden and
    # dweight take two K steps per flag tile.
    "interpreter": ArchConfig(
        forward=_c(16, 32, 16, 2, 1, 1), dlogits=_c(16, 32, 16, 2, 1, 1),
        dhidden=_c(16, 16, 16, 2, 1, 1), dweight=_c(32, 16, 8, 2, 1, 1),
        max_splits=3, min_split_tiles=2,
    ),
}


def _check_coupling(cfg: ArchConfig) -> None:
    dl, dh, dw = cfg.dlogits, cfg.dhidden, cfg.dweight
    if not (dh.block_m == dl.block_m and dl.block_n % dh.block_k == 0
            and dw.block_m == dl.block_n and dl.block_m % dw.block_k == 0):
        raise ValueError(f"backward tiles are not coupled through the live flags: {cfg}")


def arch_of(capability: tuple[int, int] | None) -> str:
    """Configuration key of a CUDA compute capability (``None``: the CPU interpreter)."""
    if capability is None:
        return "interpreter"
    key = {(8, 0): "sm_80", (8, 6): "sm_86", (8, 7): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90"}
    return key.get(tuple(capability), "default")


def configs(dtype: str, arch: str) -> ArchConfig:
    """The architecture's configuration for ``dtype``. fp32 operands take twice the bytes and
    its ieee ``tl.dot`` runs on FMA units with more live registers, so the K steps, the row
    blocks and the dhidden / dweight dims blocks are halved (nothing spills)."""
    _check(dtype, arch)
    cfg = _CONFIGS[arch]
    _check_coupling(cfg)
    if dtype != "fp32" or arch == "interpreter":
        return cfg
    half = lambda c, **kw: KernelConfig(**{**c.__dict__, **kw})  # noqa: E731
    return ArchConfig(
        forward=half(cfg.forward, block_m=cfg.forward.block_m // 2, block_k=max(16, cfg.forward.block_k // 2)),
        dlogits=half(cfg.dlogits, block_m=cfg.dlogits.block_m // 2, block_k=max(16, cfg.dlogits.block_k // 2)),
        dhidden=half(cfg.dhidden, block_m=cfg.dhidden.block_m // 2, block_n=cfg.dhidden.block_n // 2,
                     block_k=cfg.dhidden.block_k // 2),
        dweight=half(cfg.dweight, block_n=cfg.dweight.block_n // 2, block_k=cfg.dweight.block_k // 2),
        max_splits=cfg.max_splits, min_split_tiles=cfg.min_split_tiles,
    )


def _check(dtype: str, arch: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if arch not in KEYS:
        raise ValueError(f"arch must be one of {KEYS}, got {arch!r}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouped_program(pid: int, grid_m: int, grid_n: int, group_m: int) -> tuple[int, int]:
    """``pid -> (m, n)`` in grouped order; the kernels run the same formula (``_grouped`` in
    kernels.py, compared with this one by a test)."""
    in_group = group_m * grid_n
    first_m = (pid // in_group) * group_m
    size_m = min(grid_m - first_m, group_m)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


def vocab_splits(V: int, dtype: str, arch: str) -> int:
    """Vocab shares of the forward: from V and the architecture only (batch invariance). Each
    share is ``cdiv(tiles, splits)`` whole tiles; the count is then trimmed so none is empty."""
    cfg = configs(dtype, arch)
    tiles = cdiv(V, cfg.forward.block_n)
    splits = max(1, min(cfg.max_splits, tiles // cfg.min_split_tiles))
    return cdiv(tiles, cdiv(tiles, splits))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: a 1-D grid of ``grid_m * grid_n`` programs in grouped order (the merge
    kernel: ``grid_n = 1``, plain order), and a K loop of ``k_tiles`` steps."""

    kernel: str
    grid: tuple[int, ...]
    config: KernelConfig
    grid_m: int
    grid_n: int
    k_tiles: int       # K loop length in flag / vocab tiles (forward: tiles per split, the last may have fewer)
    k_total: int = 0   # forward only: vocab tiles in all

    def program(self, pid: int) -> tuple[int, int]:
        """The kernel's own swizzle: ``pid -> (M index, N index)`` (see the module doc)."""
        if not 0 <= pid < self.grid[0]:
            raise ValueError(f"pid must be in [0, {self.grid[0]}), got {pid}")
        if self.kernel == "_merge_kernel":
            return pid, 0
        return grouped_program(pid, self.grid_m, self.grid_n, self.config.group_m)

    def steps(self, pid: int) -> list[tuple[int, int]]:
        """What program ``pid`` touches, in order (tuple formats in the module doc)."""
        m, n = self.program(pid)
        if self.kernel == "_forward_kernel":
            # k_tiles = vocab tiles per split; split n covers [n * k_tiles, (n + 1) * k_tiles).
            return [(m, t) for t in range(n * self.k_tiles, min(self.k_total, (n + 1) * self.k_tiles))]
        if self.kernel == "_merge_kernel":
            return [(m, s) for s in range(self.k_tiles)]
        if self.kernel == "_dlogits_kernel":
            return [(m, n)]
        if self.kernel == "_dhidden_kernel":
            return [(m, t) for t in range(self.k_tiles)]
        if self.kernel == "_dweight_kernel":
            return [(m, r) for r in range(self.k_tiles)]
        raise ValueError(f"unknown kernel {self.kernel!r}")


@dataclass(frozen=True)
class LaunchPlan:
    N: int
    D: int
    V: int
    dtype: str
    arch: str
    vocab_splits: int
    row_chunk: int
    workspace_bytes: int
    forward: tuple[Launch, ...]
    backward: tuple[Launch, ...]

    @property
    def num_chunks(self) -> int:
        return cdiv(self.N, self.row_chunk)

    @property
    def budget_bytes(self) -> int:
        """``WORKSPACE_FRACTION`` of inputs + gradients (hidden [N, D] and weight [V, D])."""
        return int(WORKSPACE_FRACTION * 2 * (self.N + self.V) * self.D * DTYPE_BYTES[self.dtype])

    @property
    def within_budget(self) -> bool:
        return self.workspace_bytes <= self.budget_bytes

    def backward_chunk(self, rows: int) -> tuple[Launch, ...]:
        """The backward launches of a chunk of ``rows`` rows (``0 < rows <= row_chunk``)."""
        if not 0 < rows <= self.row_chunk:
            raise ValueError(f"rows must be in (0, {self.row_chunk}], got {rows}")
        return _backward_launches(rows, self.D, self.V, configs(self.dtype, self.arch))


def _backward_launches(rows: int, D: int, V: int, cfg: ArchConfig) -> tuple[Launch, ...]:
    row_blocks = cdiv(rows, cfg.dlogits.block_m)
    vocab_tiles = cdiv(V, cfg.dlogits.block_n)
    dh_blocks = cdiv(D, cfg.dhidden.block_n)
    dw_blocks = cdiv(D, cfg.dweight.block_n)
    return (
        Launch("_dlogits_kernel", (row_blocks * vocab_tiles,), cfg.dlogits, row_blocks, vocab_tiles, cdiv(D, cfg.dlogits.block_k)),
        Launch("_dhidden_kernel", (row_blocks * dh_blocks,), cfg.dhidden, row_blocks, dh_blocks, vocab_tiles),
        Launch("_dweight_kernel", (vocab_tiles * dw_blocks,), cfg.dweight, vocab_tiles, dw_blocks, row_blocks),
    )


def flag_bytes(rows: int, V: int, cfg: ArchConfig) -> int:
    return cdiv(rows, cfg.dlogits.block_m) * cdiv(V, cfg.dlogits.block_n)


def launch_plan(N: int, D: int, V: int, dtype: str, arch: str, *, row_chunk: int | None = None) -> LaunchPlan:
    """The launches for ``hidden [N, D]``, ``weight [V, D]`` in ``dtype`` on ``arch``.

    ``row_chunk`` (private, for tests): force the backward chunk size instead of the largest one
    within the memory budget.

    ``workspace_bytes``: peak extra memory of forward + backward besides inputs, outputs and
    gradients: ``lse [N]`` fp32 (saved by the forward) plus the larger of the forward's
    ``[splits, N]`` fp32 partials (two buffers) and the backward's ``dx [row_chunk, V]`` in the
    input dtype + ``live`` flags + the fp32 ``d_value_weight [D]``.
    """
    for name, value in (("N", N), ("D", D), ("V", V)):
        if not isinstance(value, int) or value < (0 if name == "N" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'N' else 1}, got {value!r}")
    cfg = configs(dtype, arch)
    esize = DTYPE_BYTES[dtype]
    splits = vocab_splits(V, dtype, arch)
    fwd = cfg.forward
    row_blocks = cdiv(N, fwd.block_m)
    tiles = cdiv(V, fwd.block_n)
    per_split = cdiv(tiles, splits)
    forward = (
        Launch("_forward_kernel", (row_blocks * splits,), fwd, row_blocks, splits, per_split, tiles),
        Launch("_merge_kernel", (cdiv(N, MERGE_BLOCK),), KernelConfig(MERGE_BLOCK, 1, 1, 1, 4, 1),
               cdiv(N, MERGE_BLOCK), 1, splits),
    )

    bm = cfg.dlogits.block_m
    fixed = 4 * N + 4 * D
    budget = int(WORKSPACE_FRACTION * 2 * (N + V) * D * esize)
    per_block = bm * V * esize + cdiv(V, cfg.dlogits.block_n)
    if row_chunk is not None:
        chunk = max(1, row_chunk)
    elif budget - fixed >= per_block:
        chunk = (budget - fixed) // per_block * bm
    else:
        # Not even one row block fits (small D): fewer rows per chunk, the tiles partly masked.
        chunk = max(1, (budget - fixed - cdiv(V, cfg.dlogits.block_n)) // (V * esize))
    chunk = min(chunk, max(1, cdiv(N, bm) * bm))
    workspace = 4 * N + max(2 * 4 * splits * N, chunk * V * esize + flag_bytes(chunk, V, cfg) + 4 * D)
    backward = _backward_launches(min(chunk, N) if N else chunk, D, V, cfg)
    return LaunchPlan(N, D, V, dtype, arch, splits, chunk, workspace, forward, backward)
