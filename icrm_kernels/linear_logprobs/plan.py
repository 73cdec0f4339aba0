"""The launch plan of the ``linear_logprobs`` Triton kernels: a pure function of the shapes,
the dtype and the architecture (no torch, no triton), so the launchers in ``kernels.py``, the
tests and the performance model (``benchmarks/predict.py``) all read the same plan.

``launch_plan(N, D, V, dtype, arch)`` returns every launch of a forward and of each backward
chunk: kernel name, grid, block configuration, the kernel's own program order
(``Launch.program``), its K steps (``Launch.steps``) and what each step reads and writes
(``Launch.accesses``, which the performance model replays).

Tile orders (``grouped_program``, the Triton matmul tutorial's grouped / swizzled order): a
1-D grid of ``grid_m * grid_n`` programs is walked in groups of ``group_m`` consecutive M
indices; inside a group the M index runs fastest. The ~one wave of programs resident at a time
then covers a ``group_m x grid_n`` rectangle instead of every M index for one N index, so the
operands they share stay in L2.

Forward (``LaunchPlan.forward``):

* ``_forward_kernel``: M = row blocks of ``block_m`` rows, N = the ``vocab_splits`` shares of
  the vocabulary; share ``s`` is the vocab tiles ``split_tiles(s, splits, tiles)`` (sizes
  differ by at most one). A program walks its share tile by tile, each tile a ``tl.dot`` over
  D, folded into an online logsumexp. It stores the share's logsumexp into row ``s`` of the
  fp32 ``partials [splits + 1, N]``; the program whose share holds a row's target stores that
  row's target logit into row ``splits`` (exactly one writer per row, no atomics). With
  ``tile_max``, each tile also stores its per-row maximum of the scaled logits ``z`` into
  ``tile_max [N, tiles]`` (fp16, 2 bytes). ``vocab_splits`` depends on V, D, the dtype and the
  arch, never on N, and no block size depends on N: a row's result is bitwise the same alone
  or in any batch. Many short shares (a few tiles each; 167 of 6 tiles at V = 128256,
  D = 4096, 16-bit, on sm_90) make the launch's last programs short, so its tail leaves SMs
  idle only briefly.
* ``_merge_kernel``: one program per ``MERGE_BLOCK`` rows: ``lse`` = logsumexp of the
  ``splits`` partials in split order (deterministic, per row), ``logp = target - lse``.

Backward, in chunks along ``backward_axis`` (``LaunchPlan.chunks``; ``backward_launches(start,
size)``), two launches a chunk, in order:

* ``backward_axis == "vocab"`` (N < V, the usual case): chunks of ``vocab_chunk`` vocab
  entries, all N rows; the workspace is ``dx [N, vocab_chunk]``. ``d_weight`` rows of the
  chunk are computed completely (K = all N rows) and stored once; ``d_hidden`` is stored by
  the first chunk and loaded, added to and stored by each later one (only the row blocks
  with a live tile in the chunk).
* ``backward_axis == "rows"`` (N >= V): chunks of ``row_chunk`` rows, all V; the workspace
  is ``dx [row_chunk, V]``; the roles swap (``d_hidden`` stored once, ``d_weight``
  accumulated, a vocab tile with no live row block left alone).

Either way each chunk re-reads and rewrites the ``min(N, V) x D`` gradient, and the number
of chunks is the same (the workspace is ``chunk x other axis``), hence the axis rule.

* ``_dlogits_kernel`` (M = row blocks of the chunk, N = vocab tiles; K = D): recomputes a
  logit tile, writes ``dx`` into the workspace (chunk coordinates) in the input dtype and the
  tile's ``live`` flag. With ``tile_max`` (``LaunchPlan.tile_max_bytes > 0``) the flag is
  decided first from the saved row maxima, ``lse`` and the targets, and a dead tile is not
  recomputed (flag 0, nothing else).
* ``_dgrad_kernel``: one launch running the programs of two GEMMs over the live tiles (its
  ``parts``, pids in this order; ``Launch.part(pid)``): ``_dweight_kernel`` (M = vocab
  tiles, N = blocks of hidden dims; K = the chunk's row blocks, one flag a step) and then
  ``_dhidden_kernel`` (M = row blocks, N = blocks of hidden dims; K = the chunk's vocab
  tiles). The long dweight programs go first and the short dhidden ones fill the SMs as
  they free up. ``Launch.accumulate`` says which part loads-adds-stores its output.

The small ``_value_weight_grad_kernel`` (``hidden^T @ grad_rewards``) runs once per backward,
outside the chunks, and is not part of the plan.

``Launch.steps(pid)`` lists what program ``pid`` touches, in order, one tuple per K step
(data-independent: the gradient filter may skip steps at run time); backward indices are the
chunk's own (0 = its first row block / vocab tile):

* ``_forward_kernel`` and ``_dlogits_kernel``: ``(row_block, vocab_tile)`` per logit tile.
* ``_merge_kernel``: ``(row_block, split)`` with ``MERGE_BLOCK``-row blocks.
* ``_dhidden_kernel``: ``(row_block, vocab_tile)`` per flag tile of its K loop, for the
  program's dims block ``program(pid)[1]`` (its ``block_k`` divides the dlogits' ``block_n``:
  ``dlogits.block_n / block_k`` K steps a flag); ``_dweight_kernel``: ``(vocab_tile,
  row_block)`` per flag tile (``dlogits.block_m / block_k`` K steps a flag).

``Launch.accesses(pid)``: per step, the ``Access`` (tensor, rows x columns, read / write /
rmw, and the live flag it depends on) of ``hidden``, ``weight``, ``d_hidden``, ``d_weight``,
``dx``, ``partials`` and ``tile_max``.

Memory bound (issue 10): the extra memory of forward + backward (``workspace_bytes``) stays
within ``WORKSPACE_FRACTION`` of the inputs plus their gradients (hidden and weight, twice):
``lse``, ``tile_max`` (only when it takes at most half of the budget), and the larger of the
forward's partials and the backward's ``dx`` chunk + flags. The chunk is the largest multiple
of the dlogits tile that fits; when even one tile does not (small D), the row maxima are not
saved and the chunk is the largest row / vocab count that fits (its tiles partly masked), down
to one; only when a single row / vocab entry of ``dx`` exceeds the budget (D of a few units)
does the bound not hold (``LaunchPlan.within_budget`` says so).
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
    max_splits: int          # at most this many vocab splits in the forward (``vocab_splits``)
    min_split_tiles: int     # at least this many vocab tiles per split
    #: The forward's and dlogits' K step when it divides D (``configs(..., D)``; 0: never). Their
    #: loads then carry no per-step dims mask (``EVEN_D``), and a wider K step halves the loop
    #: overhead a step (issue-bound at K 16 on sm_90: 116 of 128 MMA clocks a step).
    even_k: int = 0
    even_stages: int = 0     # the pipeline depth with ``even_k`` (shared memory: stages x (A + B))
    #: With ``even_k``: dhidden's and dweight's dims block and K step (``even_k``) too, a wider
    #: tile than the unaligned fallback (which spills at 128 dims on unvectorised loads).
    even_dims: int = 0


def _c(bm, bn, bk, gm, w, s):
    return KernelConfig(bm, bn, bk, gm, w, s)


# 16-bit configurations. The backward's tiles are coupled through the ``live`` flags, one per
# dlogits tile (block_m rows x block_n vocab entries): dhidden's block_m is the dlogits' block_m
# and its block_k divides the dlogits' block_n; dweight's block_m is the dlogits' block_n and
# its block_k divides the dlogits' block_m (``_check_coupling``). The forward's group of group_m
# row blocks x all splits spans several waves (SM count at one CTA per SM: sm_80 108, sm_86 84
# (A10 / 3090: 72-82), sm_89 128-142, sm_90 132); a wave reads group_m row blocks and a band of
# consecutive splits. Registers: 8 warps keep the fp32 accumulator of a 128 x 128 tile at 64
# registers a thread. Two variants per architecture, chosen by D (``configs(..., D)``):
# * D a multiple of ``even_k`` (every real model): loads without a per-step dims mask
#   (``EVEN_D``, vectorised), the forward and dlogits K step ``even_k`` (sm_90: 64, where K 16
#   made dlogits issue-bound; sm_8x: 32, their mma.sync operands live in registers and K 64
#   spilled the forward), and on sm_90 / sm_80 dhidden / dweight tiles 128 x 128 x ``even_k``.
# * any other D (unvectorised, masked loads need more registers): the K step is 16 where ptxas
#   found spills (sm_80's forward, dlogits, dhidden and dweight; sm_90's dlogits), dhidden's
#   tile 128 x 64, and the fused dgrad launch runs with the dweight config's warps (8 on sm_86 /
#   sm_89, where dhidden's 128 x 64 tile spilled at 4).
# Every GEMM K loop is branch-free so Triton software-pipelines it (async copies, async wgmma
# on sm_90): the dgrad kernel walks compacted lists of live tiles (kernels.py).
# Shared memory (stages x (A + B tile)) stays under each architecture's limit.
# tests/gpu_compile.py checks registers, spills, shared memory and the pipelining with ptxas.
_CONFIGS = {
    "sm_90": ArchConfig(
        forward=_c(128, 128, 32, 16, 8, 4), dlogits=_c(128, 128, 16, 8, 8, 4),
        dhidden=_c(128, 64, 32, 8, 8, 4), dweight=_c(128, 64, 32, 4, 8, 4),
        max_splits=256, min_split_tiles=1, even_k=64, even_stages=3, even_dims=128,
    ),
    "sm_80": ArchConfig(
        forward=_c(128, 128, 16, 12, 8, 4), dlogits=_c(128, 128, 16, 8, 8, 4),
        dhidden=_c(128, 64, 16, 8, 8, 4), dweight=_c(128, 64, 16, 4, 8, 4),
        max_splits=256, min_split_tiles=1, even_k=32, even_stages=4, even_dims=128,
    ),
    "sm_86": ArchConfig(
        forward=_c(128, 128, 32, 9, 8, 3), dlogits=_c(128, 64, 32, 8, 8, 3),
        dhidden=_c(128, 64, 32, 8, 8, 3), dweight=_c(64, 64, 32, 4, 8, 3),
        max_splits=256, min_split_tiles=1, even_k=32, even_stages=3,
    ),
    "sm_89": ArchConfig(
        forward=_c(128, 128, 32, 16, 8, 3), dlogits=_c(128, 64, 32, 8, 8, 3),
        dhidden=_c(128, 64, 32, 8, 8, 3), dweight=_c(64, 64, 32, 4, 8, 3),
        max_splits=256, min_split_tiles=1, even_k=32, even_stages=3,
    ),
    "default": ArchConfig(
        forward=_c(64, 64, 32, 8, 4, 2), dlogits=_c(64, 64, 32, 8, 4, 2),
        dhidden=_c(64, 64, 32, 8, 4, 2), dweight=_c(64, 64, 32, 4, 4, 2),
        max_splits=256, min_split_tiles=1,
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


def configs(dtype: str, arch: str, D: int | None = None) -> ArchConfig:
    """The architecture's configuration for ``dtype`` (and ``D``: the forward's and dlogits' K
    step is ``even_k`` where that divides D). fp32 operands take twice the bytes and its ieee
    ``tl.dot`` runs on FMA units with more live registers, so the K steps, the row blocks and the
    dhidden / dweight dims blocks are halved (nothing spills)."""
    _check(dtype, arch)
    cfg = _CONFIGS[arch]
    _check_coupling(cfg)
    if D is not None and cfg.even_k and D % cfg.even_k == 0 and dtype != "fp32":
        def wide(c, **dims):
            return KernelConfig(**{**c.__dict__, "block_k": cfg.even_k, "num_stages": cfg.even_stages, **dims})

        cfg = ArchConfig(**{**cfg.__dict__, "forward": wide(cfg.forward), "dlogits": wide(cfg.dlogits),
                            **({"dhidden": wide(cfg.dhidden, block_n=cfg.even_dims),
                                "dweight": wide(cfg.dweight, block_n=cfg.even_dims)} if cfg.even_dims else {})})
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


def vocab_splits(V: int, dtype: str, arch: str, D: int | None = None) -> int:
    """Vocab shares of the forward: from V, D and the architecture only, never N (batch
    invariance). As many short shares as allowed: a program is then a few vocab tiles, so the
    last programs of the launch leave SMs idle only briefly whatever N is (the shares differ by
    at most one tile, ``split_tiles``). At most ``max_splits``, at least ``min_split_tiles``
    tiles a share, and (given ``D``) few enough that the ``[splits + 2, N]`` fp32 forward
    buffers (``LaunchPlan.forward_bytes``) stay within ``WORKSPACE_FRACTION`` of ``hidden``
    for any N. Within that cap, the largest count down to half of it that divides the tiles
    (equal shares: no program of a wave waits for a longer one), else the cap."""
    cfg = configs(dtype, arch)
    tiles = cdiv(V, cfg.forward.block_n)
    cap = max(1, min(cfg.max_splits, tiles // cfg.min_split_tiles))
    if D is not None:
        cap = max(1, min(cap, int(WORKSPACE_FRACTION * D * DTYPE_BYTES[dtype]) // 4 - 2))
    return next((n for n in range(cap, (cap - 1) // 2, -1) if tiles % n == 0), cap)


def split_tiles(split: int, splits: int, tiles: int) -> tuple[int, int]:
    """Vocab tiles ``[first, last)`` of forward split ``split``: ``tiles * split // splits``
    onwards, so the shares differ by at most one tile."""
    return tiles * split // splits, tiles * (split + 1) // splits


@dataclass(frozen=True)
class Access:
    """One access of a step (``Launch.accesses``): ``tensor`` rows ``[r0, r1)`` x columns
    ``[c0, c1)`` (global coordinates; ``dx`` in the chunk's own), ``mode`` ``"read"``,
    ``"write"`` (a store, nothing read) or ``"rmw"`` (load, add, store). ``live``: ``None``
    always made; ``(row_block, vocab_tile)`` (global, dlogits tiles) only when that tile's flag
    is set; ``"any"`` (a program's epilogue) only when some step of the program was live."""

    tensor: str
    r0: int
    r1: int
    c0: int
    c1: int
    mode: str
    live: tuple[int, int] | str | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel launch: a 1-D grid of ``grid_m * grid_n`` programs in grouped order (the merge
    kernel: ``grid_n = 1``, plain order), and a K loop of ``k_tiles`` steps.

    Backward launches also carry their chunk: ``row0`` / ``rows`` and ``vocab0`` / ``vocab``
    (the rows and vocab entries it covers), ``D``, the flag tile (``flag_m`` x ``flag_n``, the
    dlogits tile) and ``accumulate`` (the output is added to what earlier chunks stored)."""

    kernel: str
    grid: tuple[int, ...]
    config: KernelConfig
    grid_m: int
    grid_n: int
    k_tiles: int       # K steps per program (forward: the most vocab tiles of a split)
    k_total: int = 0   # forward only: vocab tiles in all
    row0: int = 0
    rows: int = 0
    vocab0: int = 0
    vocab: int = 0
    D: int = 0
    flag_m: int = 0
    flag_n: int = 0
    accumulate: bool = False
    tile_max: bool = False  # forward: stores ``tile_max``; dlogits: reads it and skips dead tiles
    parts: tuple = ()       # _dgrad_kernel: the launches whose programs it runs, pids in this order
    #: Every K loop is branch-free and software-pipelined (async copies; async wgmma on sm_90) at a
    #: 16-divisible D: the dgrad parts walk compacted live lists. tests/gpu_compile.py fails otherwise.
    pipelined: bool = True

    def part(self, pid: int) -> tuple["Launch", int]:
        """A fused launch's part and the pid inside it that program ``pid`` runs (itself for
        a plain launch)."""
        if not 0 <= pid < self.grid[0]:
            raise ValueError(f"pid must be in [0, {self.grid[0]}), got {pid}")
        for part in self.parts:
            if pid < part.grid[0]:
                return part, pid
            pid -= part.grid[0]
        return self, pid

    def program(self, pid: int) -> tuple[int, int]:
        """The kernel's own swizzle: ``pid -> (M index, N index)`` (see the module doc)."""
        if self.parts:
            part, local = self.part(pid)
            return part.program(local)
        if not 0 <= pid < self.grid[0]:
            raise ValueError(f"pid must be in [0, {self.grid[0]}), got {pid}")
        if self.kernel == "_merge_kernel":
            return pid, 0
        return grouped_program(pid, self.grid_m, self.grid_n, self.config.group_m)

    def steps(self, pid: int) -> list[tuple[int, int]]:
        """What program ``pid`` touches, in order (tuple formats in the module doc; backward
        indices are the chunk's own, 0 = its first row block / vocab tile)."""
        if self.parts:
            part, local = self.part(pid)
            return part.steps(local)
        m, n = self.program(pid)
        if self.kernel == "_forward_kernel":
            return [(m, t) for t in range(*split_tiles(n, self.grid_n, self.k_total))]
        if self.kernel == "_merge_kernel":
            return [(m, s) for s in range(self.k_tiles)]
        if self.kernel == "_dlogits_kernel":
            return [(m, n)]
        if self.kernel == "_dhidden_kernel":
            return [(m, t) for t in range(self.k_tiles)]
        if self.kernel == "_dweight_kernel":
            return [(m, r) for r in range(self.k_tiles)]
        raise ValueError(f"unknown kernel {self.kernel!r}")

    def accesses(self, pid: int) -> list[tuple[Access, ...]]:
        """What each step of program ``pid`` reads and writes (``Access``); the epilogue's store
        is part of the last step. The performance model replays these."""
        if self.parts:
            part, local = self.part(pid)
            return part.accesses(local)
        c = self.config
        steps = self.steps(pid)
        m, n = self.program(pid)
        if self.kernel == "_forward_kernel":
            out = [(Access("hidden", m * c.block_m, (m + 1) * c.block_m, 0, self.D, "read"),
                    Access("weight", t * c.block_n, (t + 1) * c.block_n, 0, self.D, "read")) for _, t in steps]
            if self.tile_max:
                out = [step + (Access("tile_max", m * c.block_m, (m + 1) * c.block_m, t, t + 1, "write"),)
                       for step, (_, t) in zip(out, steps)]
            store = (Access("partials", n, n + 1, m * c.block_m, (m + 1) * c.block_m, "write"),
                     Access("partials", self.grid_n, self.grid_n + 1, m * c.block_m, (m + 1) * c.block_m, "write"))
            return out[:-1] + [out[-1] + store] if out else [store]
        if self.kernel == "_merge_kernel":
            rows = (m * c.block_m, (m + 1) * c.block_m)
            # the split logsumexps, then the target logits (row ``splits``)
            return [(Access("partials", sp, sp + 1, *rows, "read"),) for sp in [s for _, s in steps] + [self.k_tiles]]
        fm, fn = self.flag_m, self.flag_n
        rb0, vt0 = self.row0 // fm, self.vocab0 // fn
        r_end, v_end = self.row0 + self.rows, self.vocab0 + self.vocab

        def rows_of(rb):  # global rows of the chunk's row block rb
            return self.row0 + rb * fm, min(r_end, self.row0 + (rb + 1) * fm)

        def vocab_of(vt):
            return self.vocab0 + vt * fn, min(v_end, self.vocab0 + (vt + 1) * fn)

        def dx(rb, vt, mode):
            return Access("dx", rb * fm, min(self.rows, (rb + 1) * fm), vt * fn, min(self.vocab, (vt + 1) * fn),
                          mode, (rb0 + rb, vt0 + vt) if mode == "read" else None)

        out_mode = "rmw" if self.accumulate else "write"
        if self.kernel == "_dlogits_kernel":
            out = []
            for rb, vt in steps:
                tile = (Access("hidden", *rows_of(rb), 0, self.D, "read"),
                        Access("weight", *vocab_of(vt), 0, self.D, "read"), dx(rb, vt, "write"))
                if self.tile_max:  # the saved row maxima decide the flag; a dead tile is not recomputed
                    tile = (Access("tile_max", *rows_of(rb), vt0 + vt, vt0 + vt + 1, "read"),) + tuple(
                        Access(a.tensor, a.r0, a.r1, a.c0, a.c1, a.mode, (rb0 + rb, vt0 + vt)) for a in tile)
                out.append(tile)
            return out
        dims = (n * c.block_n, min(self.D, (n + 1) * c.block_n))
        if self.kernel == "_dhidden_kernel":
            out = [(dx(m, vt, "read"), Access("weight", *vocab_of(vt), *dims, "read", (rb0 + m, vt0 + vt)))
                   for _, vt in steps]
            # accumulating: a row block with no live tile in this chunk leaves d_hidden alone
            store = Access("d_hidden", *rows_of(m), *dims, out_mode, "any" if self.accumulate else None)
        else:  # _dweight_kernel
            out = [(dx(rb, m, "read"), Access("hidden", *rows_of(rb), *dims, "read", (rb0 + rb, vt0 + m)))
                   for _, rb in steps]
            store = Access("d_weight", *vocab_of(m), *dims, out_mode, "any" if self.accumulate else None)
        return out[:-1] + [out[-1] + (store,)]


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
    backward_axis: str = "rows"   # "rows": chunks of rows, all V; "vocab": chunks of vocab, all N
    vocab_chunk: int = 0          # vocab entries per chunk ("vocab" axis)
    tile_max_bytes: int = 0       # the saved [N, vocab tiles] row maxima (0: not saved)

    @property
    def forward_bytes(self) -> int:
        """Extra memory of a forward without gradients: ``lse [N]``, the ``[splits, N]`` split
        logsumexps and the ``[N]`` target logits, fp32."""
        return 4 * self.N * (self.vocab_splits + 2)

    @property
    def chunk_size(self) -> int:
        return self.row_chunk if self.backward_axis == "rows" else self.vocab_chunk

    @property
    def num_chunks(self) -> int:
        return cdiv(self.N if self.backward_axis == "rows" else self.V, self.chunk_size)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """``(start, size)`` of each backward chunk along ``backward_axis``, in launch order."""
        total = self.N if self.backward_axis == "rows" else self.V
        return [(a, min(self.chunk_size, total - a)) for a in range(0, total, self.chunk_size)]

    @property
    def budget_bytes(self) -> int:
        """``WORKSPACE_FRACTION`` of inputs + gradients (hidden [N, D] and weight [V, D])."""
        return int(WORKSPACE_FRACTION * 2 * (self.N + self.V) * self.D * DTYPE_BYTES[self.dtype])

    @property
    def within_budget(self) -> bool:
        return self.workspace_bytes <= self.budget_bytes

    def backward_chunk(self, rows: int) -> tuple[Launch, ...]:
        """The backward launches of a row chunk of ``rows`` rows (``0 < rows <= row_chunk``;
        ``backward_axis == "rows"``), at row 0 (``backward_launches`` places it)."""
        if not 0 < rows <= self.row_chunk:
            raise ValueError(f"rows must be in (0, {self.row_chunk}], got {rows}")
        return self.backward_launches(0, rows) if self.backward_axis == "rows" else \
            self.backward_launches(0, self.vocab_chunk)

    def backward_launches(self, start: int, size: int) -> tuple[Launch, ...]:
        """The backward launches (dlogits, dhidden, dweight) of the chunk ``[start, start +
        size)`` along ``backward_axis``."""
        cfg = configs(self.dtype, self.arch, self.D)
        skip = self.tile_max_bytes > 0
        if self.backward_axis == "rows":
            return _backward_launches(start, size, 0, self.V, self.D, cfg, "dweight" if start else "", skip)
        return _backward_launches(0, self.N, start, size, self.D, cfg, "dhidden" if start else "", skip)


def _backward_launches(row0: int, rows: int, vocab0: int, vocab: int, D: int, cfg: ArchConfig,
                       accumulate: str, tile_max: bool) -> tuple[Launch, ...]:
    """The three launches of a chunk of ``rows`` rows x ``vocab`` vocab entries; ``accumulate``
    names the gradient that earlier chunks already hold ("" for the first chunk)."""
    row_blocks = cdiv(rows, cfg.dlogits.block_m)
    vocab_tiles = cdiv(vocab, cfg.dlogits.block_n)
    dh_blocks = cdiv(D, cfg.dhidden.block_n)
    dw_blocks = cdiv(D, cfg.dweight.block_n)
    chunk = dict(row0=row0, rows=rows, vocab0=vocab0, vocab=vocab, D=D, flag_m=cfg.dlogits.block_m,
                 flag_n=cfg.dlogits.block_n)
    dhidden = Launch("_dhidden_kernel", (row_blocks * dh_blocks,), cfg.dhidden, row_blocks, dh_blocks, vocab_tiles,
                     accumulate=accumulate == "dhidden", **chunk)
    dweight = Launch("_dweight_kernel", (vocab_tiles * dw_blocks,), cfg.dweight, vocab_tiles, dw_blocks, row_blocks,
                     accumulate=accumulate == "dweight", **chunk)
    # One launch runs both (they read the same dx and write different gradients): the long
    # dweight programs first, then the short dhidden ones fill the SMs as they free up, so the
    # launch ends with less idle time than either alone and one launch is saved per chunk.
    dgrad = Launch("_dgrad_kernel", (dweight.grid[0] + dhidden.grid[0],), cfg.dweight, 0, 0, 0,
                   parts=(dweight, dhidden), **chunk)
    return (
        Launch("_dlogits_kernel", (row_blocks * vocab_tiles,), cfg.dlogits, row_blocks, vocab_tiles,
               cdiv(D, cfg.dlogits.block_k), tile_max=tile_max, **chunk),
        dgrad,
    )


def flag_bytes(rows: int, V: int, cfg: ArchConfig) -> int:
    return cdiv(rows, cfg.dlogits.block_m) * cdiv(V, cfg.dlogits.block_n)


def backward_axis(N: int, V: int) -> str:
    """Chunk the backward along the larger of N and V: each chunk re-reads and rewrites (load,
    add, store) the gradient of the other axis, ``min(N, V) x D``, and the number of chunks is
    the same either way (the workspace holds ``chunk x other axis``)."""
    return "vocab" if 0 < N < V else "rows"


def launch_plan(N: int, D: int, V: int, dtype: str, arch: str, *, row_chunk: int | None = None,
                vocab_chunk: int | None = None, tile_max: bool | None = None) -> LaunchPlan:
    """The launches for ``hidden [N, D]``, ``weight [V, D]`` in ``dtype`` on ``arch``.

    ``row_chunk`` / ``vocab_chunk`` (private, for tests): force the backward's axis and chunk
    size (rounded up to a multiple of the dlogits ``block_m`` / ``block_n``) instead of the
    plan's axis and the largest chunk within the memory budget. ``tile_max`` (private, for
    tests): force saving the row maxima on or off.

    ``workspace_bytes``: peak extra memory of forward + backward besides inputs, outputs and
    gradients: ``lse [N]`` fp32 (saved by the forward), the saved row maxima (``tile_max_bytes``)
    and the larger of the forward's fp32 partials ``[splits + 1, N]`` and the backward's ``dx
    [chunk rows, chunk vocab]`` in the input dtype + ``live`` flags + the fp32
    ``d_value_weight [D]``.
    """
    for name, value in (("N", N), ("D", D), ("V", V)):
        if not isinstance(value, int) or value < (0 if name == "N" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'N' else 1}, got {value!r}")
    cfg = configs(dtype, arch, D)
    esize = DTYPE_BYTES[dtype]
    splits = vocab_splits(V, dtype, arch, D)
    fwd = cfg.forward
    bm, bn = cfg.dlogits.block_m, cfg.dlogits.block_n
    row_blocks = cdiv(N, fwd.block_m)
    tiles = cdiv(V, fwd.block_n)
    fixed = 4 * N + 4 * D
    budget = int(WORKSPACE_FRACTION * 2 * (N + V) * D * esize)
    axis = "rows" if row_chunk is not None else "vocab" if vocab_chunk is not None else backward_axis(N, V)
    if axis == "rows":
        unit, total, other, forced = bm, N, V, row_chunk
        per_unit = bm * V * esize + cdiv(V, bn)
    else:
        unit, total, other, forced = bn, V, N, vocab_chunk
        per_unit = bn * N * esize + cdiv(N, bm)
    # Row maxima per dlogits tile, fp16 (2 bytes), when the forward's tiles are the dlogits'
    # and they take at most half of the budget (the rest is the backward's chunk).
    if tile_max is None:
        tile_max = fwd.block_n == bn and 0 < 2 * 2 * N * tiles <= budget - fixed
    tile_max_bytes = 2 * N * tiles if tile_max else 0
    if forced is not None:
        chunk = min(max(1, cdiv(forced, unit)), max(1, cdiv(total, unit))) * unit
    elif budget - fixed - tile_max_bytes >= per_unit:
        chunk = min((budget - fixed - tile_max_bytes) // per_unit, max(1, cdiv(total, unit))) * unit
    else:
        # Not even one tile of dx fits (small D): no row maxima, and a chunk of fewer rows /
        # vocab entries than a tile (the tiles partly masked), down to one; only when a single
        # one exceeds the budget does the bound not hold.
        tile_max, tile_max_bytes = False, 0
        chunk = max(1, (budget - fixed - cdiv(N if axis == "vocab" else V, bm if axis == "vocab" else bn)) // (other * esize))
        chunk = min(chunk, max(1, total))
    forward = (
        Launch("_forward_kernel", (row_blocks * splits,), fwd, row_blocks, splits, cdiv(tiles, splits), tiles, D=D,
               tile_max=tile_max_bytes > 0),
        Launch("_merge_kernel", (cdiv(N, MERGE_BLOCK),), KernelConfig(MERGE_BLOCK, 1, 1, 1, 4, 1),
               cdiv(N, MERGE_BLOCK), 1, splits),
    )
    ws_rows, ws_vocab = (chunk, V) if axis == "rows" else (N, chunk)
    workspace = 4 * N + tile_max_bytes + max(4 * (splits + 1) * N,
                                             ws_rows * ws_vocab * esize + flag_bytes(ws_rows, ws_vocab, cfg) + 4 * D)
    p = LaunchPlan(N, D, V, dtype, arch, splits, chunk if axis == "rows" else N, workspace, forward, (),
                   axis, chunk if axis == "vocab" else 0, tile_max_bytes)
    first = p.chunks[0] if N else (0, chunk)
    return LaunchPlan(N, D, V, dtype, arch, splits, p.row_chunk, workspace, forward,
                      p.backward_launches(*first), axis, p.vocab_chunk, tile_max_bytes)
