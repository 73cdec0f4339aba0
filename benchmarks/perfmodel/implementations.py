"""The implementations the model compares, as launches: ours (read from the kernels' launch plan),
Apple's cut-cross-entropy (CCE), Liger-Kernel's fused linear cross-entropy and the bare cuBLAS
GEMMs (the bound the GPU issue's goals are stated against). Each returns the ``KernelCost`` of
every launch of one pass; ``timing.py`` turns them into milliseconds.

What each implementation does, as modelled
------------------------------------------
* ``triton`` (ours): ``_forward_kernel`` (row block x vocab share, online logsumexp; with
  gradients it saves each tile's per-row maximum), ``_merge_kernel``; per backward chunk
  ``_dlogits_kernel`` (decides each tile's live flag from the saved maxima, recomputes only
  live tiles into ``dx``) and ``_dgrad_kernel`` (``dx^T @ hidden`` then ``dx @ W`` over the live
  tiles). Everything is read from ``plan.launch_plan``: grids, orders, chunks, per-step
  accesses, block sizes, warps, stages, and whether a kernel's K loop is pipelined
  (``plan_structure``: the plan's ``pipelined`` where it says it, else ``PIPELINED_DEFAULT``).
  An unpipelined dgrad (a flag test per K step inside the loop) pays ``DEAD_STEP_CYCLES`` per
  dead K step; a pipelined one walks a compacted list of live tiles (a small compaction launch,
  no dead steps).
* ``cce`` (apple/ml-cross-entropy, default options, its real 16-bit configs): forward
  ``_cce_lse_forward_kernel`` 256x128x32, 8 warps, 3 stages, GROUP_B 8, lse merged under a lock
  per row block; backward 128x128x32, 4 warps, 4 stages: every tile's logits recomputed
  (pipelined), filtered tiles skipped, then per D block of 32 a ``dlogits @ C`` and a
  ``dlogits^T @ E`` (K = the 128-wide tile, one operand in registers) added into bf16 ``dE`` /
  ``dC`` under locks (``LOCK_LATENCY_CYCLES`` a step; lock contention not modelled, which favours
  CCE). CCE sorts the vocabulary by frequency before filtering: its live fraction is ours x
  ``CCE_SORTED_LIVE_RATIO`` (below 1).
* ``liger`` (linkedin/Liger-Kernel FLCE, scalar loss): rows in chunks of
  ``next_power_of_2(cdiv(N, cdiv(V, D)))``; per chunk a cuBLAS logits GEMM, a Triton CE kernel
  (bandwidth-bound), ``grad_input[chunk] = grad @ W`` and ``grad_weight += grad^T @ hidden``,
  all in the forward; its GEMMs at ``CUBLAS["liger_chunked"]``.
* ``cublas_1gemm`` (fwd) / ``cublas_3gemm`` (fwd+bwd): the bare ``[N, D] x [D, V]`` GEMM and the
  two backward GEMMs (``[N, V] x [V, D]``, ``[V, N] x [N, D]``) at cuBLAS's large-GEMM efficiency,
  no softmax, analytic traffic (each operand read once, each output written once). The goals:
  ours fwd+bwd within 1.15x of ``cublas_3gemm``, ours fwd at least 85% of ``cublas_1gemm``'s rate.
"""

from __future__ import annotations

import dataclasses

from benchmarks.perfmodel.hardware import (DEAD_STEP_CYCLES, DEAD_TILE_CYCLES, LOAD_LATENCY_CYCLES,
                                           LOCK_LATENCY_CYCLES, Structure, ctas_per_sm)
from benchmarks.perfmodel.simulator import (L2, RMW, READ, WRITE, KernelCost, ModelLaunch, Operands, Shape,
                                            SimLaunch, Tensor, chunked, finish, gemm_accesses, live_tile,
                                            simulate, whole_rows)
from icrm_kernels.linear_logprobs import plan as plan_module

#: Live fraction of CCE (vocabulary sorted by frequency) over the live fraction in natural
#: vocabulary order, at the same threshold: published block-level measurements on a real 0.5B
#: model (128x128 tiles, threshold 2^-12) keep 61% of tiles in natural order and 49% after
#: sorting. Applied as a ratio below live fraction 1; at 1 (every tile live) sorting removes none.
CCE_SORTED_LIVE_RATIO = 0.49 / 0.61
#: Whether a kernel's K loop is software-pipelined, where the plan does not say (``pipelined``
#: on the ``Launch`` or its ``KernelConfig``): today's dgrad tests ``if live`` inside its K loop.
PIPELINED_DEFAULT = {"_forward_kernel": True, "_dlogits_kernel": True, "_merge_kernel": True,
                     "_dhidden_kernel": False, "_dweight_kernel": False, "_dgrad_kernel": False}
#: The plan attributes ``plan_structure`` reads (besides the ``KernelConfig`` block sizes, warps
#: and stages), for the report: which ones the plan has today is in the notes.
PLAN_ATTRIBUTES = ("Launch.pipelined", "KernelConfig.pipelined", "KernelConfig.mma")


def cce_live_frac(live: float) -> float:
    return live if live >= 1.0 else live * CCE_SORTED_LIVE_RATIO


def _read(obj, name):
    return getattr(obj, name, None)


def plan_structure(launch: plan_module.Launch, hw, fused: plan_module.Launch | None = None) -> Structure:
    """The ``Structure`` of a plan launch (or of one ``part`` of the ``fused`` dgrad launch, which
    runs with the fused launch's warps and stages): block sizes, warps and stages from its
    ``KernelConfig``; ``pipelined`` from ``Launch.pipelined`` / ``KernelConfig.pipelined`` (the
    part's, then the fused launch's) else ``PIPELINED_DEFAULT``; the MMA kind from
    ``KernelConfig.mma`` else wgmma on a wgmma GPU when the CTA has whole warpgroups and at least
    64 rows (Triton's rule), mma.sync otherwise."""
    cfg = launch.config
    run = (fused or launch).config
    pipelined = next((v for v in (_read(launch, "pipelined"), _read(cfg, "pipelined"),
                                  _read(fused, "pipelined") if fused else None, _read(run, "pipelined"))
                      if v is not None), PIPELINED_DEFAULT.get(launch.kernel, True))
    mma = _read(cfg, "mma") or ("wgmma" if hw.wgmma and run.num_warps % 4 == 0 and cfg.block_m >= 64 else "mma")
    return Structure(cfg.block_m, cfg.block_n, cfg.block_k, run.num_warps, run.num_stages, bool(pipelined), mma)


def plan_attributes_present(p: plan_module.LaunchPlan) -> dict:
    """Which of ``PLAN_ATTRIBUTES`` the plan has today (the others take their defaults)."""
    launch = p.forward[0]
    return {"Launch.pipelined": hasattr(launch, "pipelined"), "KernelConfig.pipelined": hasattr(launch.config, "pipelined"),
            "KernelConfig.mma": hasattr(launch.config, "mma")}


def ours(s: Shape, with_backward: bool, dgrad_pipelined: bool | None = None) -> list[KernelCost]:
    """Our kernels, from ``plan.launch_plan`` (read at call time, so a test can replace it).
    ``dgrad_pipelined`` overrides the plan's dgrad pipelining (the sensitivity table's what-if)."""
    p = plan_module.launch_plan(s.N, s.D, s.V, s.dtype, s.arch)
    hw, ops, esize = s.hw, Operands(s), s.esize
    cd = plan_module.configs(s.dtype, s.arch).dlogits
    ws_rows, ws_vocab = (p.row_chunk, s.V) if p.backward_axis == "rows" else (s.N, p.vocab_chunk)
    tensors = {"hidden": ops.hidden, "weight": ops.weight, "d_hidden": ops.d_hidden, "d_weight": ops.d_weight,
               "partials": Tensor(4, p.vocab_splits + 1, s.N, 4, 1, plan_module.MERGE_BLOCK),
               "dx": Tensor(5, ws_rows, ws_vocab, esize, cd.block_m, cd.block_n),
               "tile_max": Tensor(7, s.N, plan_module.cdiv(s.V, cd.block_n), 2, cd.block_m, 8)}
    modes = {"read": READ, "write": WRITE, "rmw": RMW}

    def structure(lc, fused=None):
        st = plan_structure(lc, hw, fused)
        if fused is not None and dgrad_pipelined is not None:
            st = Structure(*st.key[:5], dgrad_pipelined, st.mma)
        return st

    def launch(lc: plan_module.Launch, work: tuple = (), program_steps=None, **kw) -> SimLaunch:
        parts = lc.parts or (lc,)
        ctas = min(ctas_per_sm(structure(part, lc if lc.parts else None), esize, hw) for part in parts)
        slots = hw.sms * ctas

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

        return SimLaunch(lc.kernel, lc.grid[0], slots, accesses, work=work, slots=slots if work else 0,
                         program_steps=program_steps or (lambda pid: len(lc.steps(pid))), **kw)

    l2 = L2(hw.l2_bytes)
    fwd_launch, merge = p.forward
    logits = 1.0 * s.N * s.V
    costs = simulate([launch(fwd_launch, ((2.0 * s.N * s.D * s.V, structure(fwd_launch)),), exps=logits),
                      launch(merge)], l2)
    if not with_backward:
        return finish(costs, l2)
    f = s.live_frac

    def chunk_launches(start: int, size: int) -> list[SimLaunch]:
        launches = p.backward_launches(start, size)
        k1 = next(lc for lc in launches if lc.kernel == "_dlogits_kernel")
        dgrad = next(lc for lc in launches if lc.kernel == "_dgrad_kernel")
        # launches the plan may add around them (e.g. a live-tile compaction): bandwidth-bound
        others = [SimLaunch(lc.kernel, 0, 1, lambda pid: []) for lc in launches if lc not in (k1, dgrad)]
        flops = 2.0 * k1.rows * s.D * k1.vocab
        k1_st = structure(k1)
        parts = dgrad.parts or (dgrad,)
        dgrad_work = tuple((2 * f * flops / len(parts), structure(part, dgrad)) for part in parts)
        out = list(others)
        # The dgrad's two parts: an unpipelined K loop tests a flag every K step (a dead step
        # costs DEAD_STEP_CYCLES); a pipelined one walks the compacted live tiles (one compaction
        # launch per chunk, a list head load per program).
        dead_cycles = 0.0
        for part, (_, st) in zip(parts, dgrad_work):
            ctas = ctas_per_sm(st, esize, hw)
            k_per_flag = (k1.flag_n if part.kernel == "_dhidden_kernel" else k1.flag_m) / part.config.block_k
            if st.pipelined:
                dead_cycles += part.grid[0] * LOAD_LATENCY_CYCLES / ctas
            else:
                dead_cycles += (1 - f) * part.grid[0] * part.k_tiles * k_per_flag * DEAD_STEP_CYCLES / ctas
        if any(st.pipelined for _, st in dgrad_work) and not others:
            flags = plan_module.flag_bytes(k1.rows, k1.vocab, plan_module.configs(s.dtype, s.arch))
            out.append(SimLaunch("live-tile compaction", 0, 1, lambda pid: [], fixed_dram=3 * flags))
        dgrad_launch = launch(dgrad, dgrad_work, overhead_cycles=dead_cycles)
        if not k1.tile_max:
            return [launch(k1, ((flops, k1_st),), exps=k1.rows * k1.vocab)] + out + [dgrad_launch]
        # dlogits recomputes the live tiles only; a dead program still starts, loads its row
        # maxima, lse and targets and stores its flag: DEAD_TILE_CYCLES, charged apart (the wave
        # utilisation is that of the live programs).
        rb0, vt0 = k1.row0 // cd.block_m, k1.vocab0 // cd.block_n
        ctas = ctas_per_sm(k1_st, esize, hw)

        def k1_steps(pid):
            rb, vt = k1.program(pid)
            return 1.0 if live_tile(rb0 + rb, vt0 + vt, f) else 0.0

        dead_tiles = (1 - f) * k1.grid[0]
        return [launch(k1, ((f * flops, k1_st),), k1_steps, exps=f * k1.rows * k1.vocab,
                       overhead_cycles=dead_tiles * DEAD_TILE_CYCLES / ctas)] + out + [dgrad_launch]

    costs += chunked(p.chunks, chunk_launches, l2)
    return finish(costs, l2)


#: CCE's default 16-bit configurations (its ``tl_autotune`` defaults): forward BLOCK_B x BLOCK_V x
#: BLOCK_D 256x128x32, 8 warps, 3 stages; backward 128x128x32, 4 warps, 4 stages; GROUP_B 8.
CCE_FWD = Structure(256, 128, 32, 8, 3, True, "wgmma")
CCE_BWD = Structure(128, 128, 32, 4, 4, True, "wgmma")
#: CCE's backward gradient step: per D block, a [128, 128] x [128, 32] dot (K = the vocab or row
#: tile, dlogits in registers) and a lock-protected load-add-store: unpipelined, lock latency.
CCE_GRAD = Structure(128, 32, 128, 4, 4, False, "wgmma", extra_latency=LOCK_LATENCY_CYCLES, a_in_registers=True)


def cce(s: Shape, with_backward: bool) -> list[KernelCost]:
    """CCE's launches (module doc), its real configs ``CCE_FWD`` / ``CCE_BWD`` / ``CCE_GRAD``."""
    hw, ops, esize = s.hw, Operands(s), s.esize
    live_frac = cce_live_frac(s.live_frac)
    grad_st = dataclasses.replace(CCE_GRAD, ctas=ctas_per_sm(CCE_BWD, esize, hw))  # the backward kernel's CTAs
    fb, fv = CCE_FWD.block_m, CCE_FWD.block_n
    fwd_order = ModelLaunch(plan_module.cdiv(s.N, fb), plan_module.cdiv(s.V, fv), 8)
    logits_flops = 2.0 * s.N * s.D * s.V

    def reads(bb, bv):
        def tile_reads(m, n, _k):
            return whole_rows(ops.hidden, m * bb, bb) + whole_rows(ops.weight, n * bv, bv)
        return tile_reads

    # lse merged under a lock per tile: load + store of the block rows' fp32 lse; the mean logit
    # (gradients only): an fp32 atomic add per vocab entry of the tile.
    tiles_f = fwd_order.programs
    fwd_atomic = tiles_f * (2 * 4 * fb + (4 * fv if with_backward else 0))
    slots_f = hw.sms * ctas_per_sm(CCE_FWD, esize, hw)
    launches = [
        SimLaunch("_cce_lse_forward_kernel", tiles_f, slots_f, gemm_accesses(fwd_order, reads(fb, fv)),
                  work=((logits_flops, CCE_FWD),), atomic_bytes=fwd_atomic, exps=1.0 * s.N * s.V, slots=slots_f),
        # indexed_neg_dot: the target rows of C gathered, one dot per row
        SimLaunch("indexed_neg_dot", 0, 1, lambda pid: [], fixed_dram=2.0 * s.N * s.D * esize),
    ]
    if with_backward:
        bb, bv = CCE_BWD.block_m, CCE_BWD.block_n
        order = ModelLaunch(plan_module.cdiv(s.N, bb), plan_module.cdiv(s.V, bv), 8)
        tiles = order.programs
        tile_reads = reads(bb, bv)
        launches.append(SimLaunch("zeros dE, dC", 0, 1, lambda pid: [], fixed_dram=(s.N + s.V) * s.D * esize))

        def bwd_accesses(pid):
            m, n = order.program(pid)
            acc = tile_reads(m, n, 0)
            if live_tile(m, n, live_frac):
                acc = acc + whole_rows(ops.d_hidden, m * bb, bb, RMW) + whole_rows(ops.d_weight, n * bv, bv, RMW)
            return [acc]

        live = sum(live_tile(*order.program(pid), live_frac) for pid in range(tiles)) if tiles <= 2_000_000 \
            else live_frac * tiles
        # lock-protected load + store of the bf16 dE tile and dC tile of every live tile
        bwd_atomic = live * 2 * (bb + bv) * s.D * esize
        slots_b = hw.sms * ctas_per_sm(CCE_BWD, esize, hw)
        grad_flops = logits_flops * 2 * live / tiles
        launches.append(SimLaunch("_cce_backward_kernel", tiles, slots_b, bwd_accesses,
                                  work=((logits_flops, CCE_BWD), (grad_flops, grad_st)), atomic_bytes=bwd_atomic,
                                  exps=1.0 * s.N * s.V, slots=slots_b))
    l2 = L2(hw.l2_bytes)
    return finish(simulate(launches, l2), l2)


def liger_chunk_size(N: int, D: int, V: int) -> int:
    """Liger FLCE's rule: bound the logits chunk to about N x D elements."""
    inc = plan_module.cdiv(V, D)
    chunk = 1 << max(0, (plan_module.cdiv(N, inc) - 1).bit_length())
    return min(chunk, N)


#: cuBLAS as the model sees it: large grouped tiles (for the L2 cap), its efficiency given.
CUBLAS_LARGE = Structure(128, 256, 64, 8, 4, True, "cublas_large")
CUBLAS_LIGER = Structure(128, 256, 64, 8, 4, True, "cublas_liger_chunked")


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
        gemm = ((2.0 * rows * s.D * s.V, CUBLAS_LIGER),)

        def mm_step(m, n, _k):
            return (whole_rows(ops.hidden, row0 + m * bt, min(bt, rows - m * bt))
                    + whole_rows(ops.weight, n * bt, bt)
                    + logits.cells(m * bt, (m + 1) * bt, n * bt, (n + 1) * bt, WRITE))

        def ce_accesses(pid):
            first_pass = [logits.cells(pid * bt, (pid + 1) * bt, v * bt, (v + 1) * bt, READ) for v in range(vt_n)]
            if not with_backward:
                return first_pass
            return first_pass + [logits.cells(pid * bt, (pid + 1) * bt, v * bt, (v + 1) * bt, RMW) for v in range(vt_n)]

        out = [SimLaunch("liger logits mm", mm.programs, gemm_slots, gemm_accesses(mm, mm_step), work=gemm),
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
            SimLaunch("liger grad_input mm", dgrad.programs, gemm_slots, gemm_accesses(dgrad, dgrad_step, dgrad_end),
                      work=gemm),
            SimLaunch("liger grad_weight addmm", wgrad.programs, gemm_slots, gemm_accesses(wgrad, wgrad_step, wgrad_end),
                      work=gemm)]

    l2 = L2(hw.l2_bytes)
    costs = []
    if with_backward:
        costs = simulate([SimLaunch("zeros grad_input, grad_weight", 0, 1, lambda pid: [],
                                    fixed_dram=(s.N + s.V) * s.D * esize)], l2)
    costs += chunked([(a, min(chunk, s.N - a)) for a in range(0, s.N, chunk)], chunk_launches, l2)
    return finish(costs, l2)


def cublas_gemms(s: Shape, with_backward: bool) -> list[KernelCost]:
    """The bare GEMMs (module doc): analytic, no L2 simulation (each operand read once, each
    output written once; cuBLAS's tiles keep its operands in L2 at these shapes)."""
    e, N, D, V = s.esize, s.N, s.D, s.V
    flops = 2.0 * N * D * V
    logits_gemm = KernelCost("cublas logits = hidden @ weight^T", ((flops, CUBLAS_LARGE),), (N * D + V * D + N * V) * e,
                             0.0, 1.0)
    if not with_backward:
        return [logits_gemm]
    return [logits_gemm,
            KernelCost("cublas d_hidden = dlogits @ weight", ((flops, CUBLAS_LARGE),), (N * V + V * D + N * D) * e, 0.0, 1.0),
            KernelCost("cublas d_weight = dlogits^T @ hidden", ((flops, CUBLAS_LARGE),), (N * V + N * D + V * D) * e,
                       0.0, 1.0)]


def extra_bytes(impl: str, s: Shape, with_backward: bool) -> int:
    """Memory beyond the inputs and their gradients."""
    N, D, V, esize = s.N, s.D, s.V, s.esize
    if impl == "triton":
        p = plan_module.launch_plan(N, D, V, s.dtype, s.arch)
        return p.workspace_bytes if with_backward else p.forward_bytes
    if impl == "cce":
        locks = 4 * plan_module.cdiv(N, CCE_FWD.block_m)
        if not with_backward:
            return 4 * N + locks + 4 * N  # lse, locks, the gathered target logits
        nd_locks = plan_module.cdiv(D, 64)
        # lse, mean logit and vocab order (V each), the dE / dC locks
        return 4 * N + 4 * N + 4 * V + 4 * V + locks + 4 * nd_locks * (plan_module.cdiv(N, 128) + plan_module.cdiv(V, 128))
    if impl in ("cublas_1gemm", "cublas_3gemm"):
        return N * V * esize  # the logits (and, backward, the [N, V] gradient in their place)
    chunk = liger_chunk_size(N, D, V)
    return chunk * V * esize + 4 * N + N  # logits chunk, fp32 loss, target mask


MODELS = {"triton": ours, "cce": cce, "liger": liger, "cublas_1gemm": cublas_gemms, "cublas_3gemm": cublas_gemms}
