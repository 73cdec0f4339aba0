"""The static performance model (``python -m benchmarks.predict``, ``benchmarks/perfmodel/``): its
L2 model on cases computable by hand, its FLOP counts, its CSV, that it reads the kernels' own
launch plan, that each term moves the prediction the way it should (unpipelined slower than
pipelined, dead steps and tiles cost more than none, the L2 cap binds for small tiles), that CCE
runs its real configs, the sensitivity table, and its argument errors. No expected time is
hard-coded (it predicts)."""

import dataclasses
import types

import pytest

from benchmarks import predict, report
from benchmarks.perfmodel import hardware, implementations, simulator, timing
from benchmarks.perfmodel.hardware import Structure
from benchmarks.perfmodel.simulator import Shape

MB = 2**20
SMALL = Shape(1024, 256, 4096, "bf16", "sm_90", 0.5)
#: Large enough that the backward is a few chunks of many tiles, small enough for a second.
MID = Shape(2048, 1024, 8192, "bf16", "sm_90", 0.5)


def test_l2_working_set_that_fits_costs_compulsory_misses_only():
    l2 = simulator.L2(50 * MB)
    for _ in range(5):
        for cell in range(10):
            l2.access(("a", cell), MB, simulator.READ)
    assert l2.read_bytes == 10 * MB and l2.write_bytes == 0


def test_l2_streaming_larger_than_the_cache_misses_every_time():
    # LRU with a cyclic sweep over twice its capacity: every access evicts the next one needed.
    l2 = simulator.L2(4 * MB)
    for _ in range(3):
        for cell in range(8):
            l2.access(("a", cell), MB, simulator.READ)
    assert l2.read_bytes == 24 * MB


def test_l2_stores_allocate_without_reading_and_are_written_back_once():
    l2 = simulator.L2(2 * MB)
    l2.access("out", MB, simulator.WRITE)
    l2.access("out", MB, simulator.WRITE)          # hit, still one dirty cell
    l2.access("acc", MB, simulator.RMW)            # read on miss, then dirty
    assert (l2.read_bytes, l2.write_bytes) == (MB, 0)
    l2.access("x", MB, simulator.READ)             # evicts "out": its write-back
    assert l2.write_bytes == MB
    l2.flush()
    assert l2.write_bytes == 2 * MB              # "acc" flushed; the clean "x" costs nothing
    l2.flush()
    assert l2.write_bytes == 2 * MB


def test_lockstep_wave_shares_the_operand_every_program_reads():
    # 4 resident programs, 6 steps; at step k all of them read B[k] and their own A[p]: in lockstep
    # B[k] is read once for the wave, so DRAM = all of A + all of B with an L2 of only 6 cells
    # (one program after the other, B streams through the L2 and is read 4 times).
    def accesses(pid):
        return [[(("A", pid), MB, simulator.READ), (("B", k), MB, simulator.READ)] for k in range(6)]

    launch = simulator.SimLaunch("toy", 4, 4, accesses)
    assert simulator.run_launch(launch, simulator.L2(6 * MB)) == (4 + 6) * MB
    one_at_a_time = simulator.SimLaunch("toy", 4, 1, accesses)
    assert simulator.run_launch(one_at_a_time, simulator.L2(6 * MB)) == (4 + 4 * 6) * MB


def test_sampled_waves_extrapolate_a_steady_pattern_exactly():
    # Every wave streams 3 fresh cells: simulating 2 waves of 10 and extrapolating is exact.
    def accesses(pid):
        return [[(("fresh", pid, k), MB, simulator.READ)] for k in range(3)]

    full = simulator.run_launch(simulator.SimLaunch("t", 40, 4, accesses), simulator.L2(2 * MB), budget=10**9)
    sampled = simulator.run_launch(simulator.SimLaunch("t", 40, 4, accesses), simulator.L2(2 * MB), budget=1)
    assert full == sampled == 40 * 3 * MB


@pytest.mark.parametrize("live_frac", [0.2, 1.0])
def test_flops_follow_the_2ndv_formulas(live_frac):
    s = dataclasses.replace(SMALL, live_frac=live_frac)
    g = 2 * s.N * s.D * s.V
    # ours saves the row maxima here, so dlogits recomputes the live tiles only (a dead one costs
    # cycles, not FLOPs); CCE recomputes every tile and filters at its sorted live fraction
    assert implementations.plan_module.launch_plan(s.N, s.D, s.V, "bf16", "sm_90").tile_max_bytes > 0
    cce_f = implementations.cce_live_frac(live_frac)
    expect = {("triton", "fwd"): (g, 1e-12), ("triton", "fwd+bwd"): (g * (1 + 3 * live_frac), 1e-12),
              ("cce", "fwd"): (g, 1e-12), ("cce", "fwd+bwd"): (g * (2 + 2 * cce_f), 0.05),
              ("liger", "fwd"): (g, 1e-12), ("liger", "fwd+bwd"): (3 * g, 1e-12),
              ("cublas_1gemm", "fwd"): (g, 1e-12), ("cublas_3gemm", "fwd+bwd"): (3 * g, 1e-12)}
    for (impl, pass_), (flops, rel) in expect.items():
        assert timing.predict(impl, pass_, s).totals()[0] == pytest.approx(flops, rel=rel), (impl, pass_)


def test_csv_has_one_row_per_impl_and_pass_with_the_issue_columns(capsys):
    assert predict.main(["--shape", "1024,256,4096", "--format", "csv", "--arch", "sm_80", "--live-frac", "0.5",
                         "--no-write"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split(",")
    assert header == predict.COLUMNS
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert sorted((r["impl"], r["pass"]) for r in rows) == sorted(
        [(i, p) for i in ("triton", "cce", "liger") for p in ("fwd", "fwd+bwd")]
        + [("cublas_1gemm", "fwd"), ("cublas_3gemm", "fwd+bwd")])
    for r in rows:
        assert (r["N"], r["D"], r["V"], r["dtype"], r["arch"]) == ("1024", "256", "4096", "bf16", "sm_80")
        assert float(r["pred_ms"]) > 0 and float(r["dram_gb"]) > 0
    atomic = {(r["impl"], r["pass"]): float(r["atomic_gb"]) for r in rows}
    assert atomic[("triton", "fwd+bwd")] == 0 and atomic[("cce", "fwd+bwd")] > 0


def test_markdown_and_table_say_predicted(capsys):
    for fmt in ("markdown", "table"):
        predict.main(["--shape", "1024,256,4096", "--format", fmt, "--impls", "triton", "--no-write"])
        assert "PREDICTED, NOT MEASURED" in capsys.readouterr().out


def test_our_prediction_reads_the_kernels_launch_plan(monkeypatch):
    # Vocabulary chunks: every chunk re-reads and rewrites d_hidden (load, add, store; 64 MB,
    # more than the L2), so forcing smaller chunks costs DRAM traffic; the extra memory is the
    # plan's workspace.
    SHAPE = (16384, 2048, 32768)
    s = Shape(*SHAPE, "bf16", "sm_90", 0.2)
    before = predict.row(timing.predict("triton", "fwd+bwd", s))
    calls = []
    original = implementations.plan_module.launch_plan

    def smaller_chunks(N, D, V, dtype, arch):
        calls.append((N, D, V, dtype, arch))
        return original(N, D, V, dtype, arch, vocab_chunk=256)

    default = original(*SHAPE, "bf16", "sm_90")
    assert default.backward_axis == "vocab" and default.vocab_chunk >= 512
    monkeypatch.setattr(implementations.plan_module, "launch_plan", smaller_chunks)
    after = predict.row(timing.predict("triton", "fwd+bwd", s))
    assert calls and calls[0] == (*SHAPE, "bf16", "sm_90")
    assert float(after["dram_gb"]) > float(before["dram_gb"])
    assert float(after["extra_mb"]) == pytest.approx(original(*SHAPE, "bf16", "sm_90", vocab_chunk=256)
                                                     .workspace_bytes / MB, abs=0.06)


def test_row_chunks_when_n_is_at_least_v_rewrite_d_weight_per_chunk():
    # N >= V: chunks of rows; d_weight (64 MB, more than the L2) is stored by the first chunk
    # and loaded, added and stored by each later one: at least its reads reach DRAM.
    s = Shape(16384, 2048, 16384, "bf16", "sm_90", 1.0)
    plan = implementations.plan_module.launch_plan(s.N, s.D, s.V, "bf16", "sm_90")
    assert plan.backward_axis == "rows" and plan.num_chunks > 1
    dram = float(predict.row(timing.predict("triton", "fwd+bwd", s))["dram_gb"])
    assert dram * 1e9 > (plan.num_chunks - 1) * s.V * s.D * 2


def test_utilisation_dispatches_programs_to_the_first_free_slot():
    # equal programs: whole waves, the last one partial
    assert simulator.utilisation(5, 4) == pytest.approx(5 / 8)
    assert simulator.utilisation(5, 4, lambda pid: 3) == pytest.approx(5 / 8)
    # lengths 4, 1, 1, 1, 1 on 2 slots: slot A runs the 4, slot B the four 1s: makespan 4, busy 8 of 8
    assert simulator.utilisation(5, 2, lambda pid: 4 if pid == 0 else 1) == pytest.approx(1.0)
    # lengths 1, 1, 4 on 2 slots: the 4 starts at 1, makespan 5, busy 6 of 10
    assert simulator.utilisation(3, 2, lambda pid: 4 if pid == 2 else 1) == pytest.approx(0.6)


def test_extra_memory_is_the_plans_workspace_and_liger_keeps_a_logits_chunk():
    plan = implementations.plan_module.launch_plan(SMALL.N, SMALL.D, SMALL.V, "bf16", "sm_90")
    assert implementations.extra_bytes("triton", SMALL, True) == plan.workspace_bytes
    assert implementations.extra_bytes("triton", SMALL, False) == plan.forward_bytes == 4 * SMALL.N * (plan.vocab_splits + 2)
    chunk = implementations.liger_chunk_size(SMALL.N, SMALL.D, SMALL.V)
    assert chunk == 64  # next_power_of_2(cdiv(1024, cdiv(4096, 256)))
    assert implementations.extra_bytes("liger", SMALL, True) >= chunk * SMALL.V * 2
    assert implementations.extra_bytes("cublas_3gemm", SMALL, True) == SMALL.N * SMALL.V * 2  # the logits


@pytest.mark.slow
def test_calibration_reproduces_liger_and_checks_cce_unfitted():
    (n, d, v, dtype, arch), targets = hardware.CALIBRATION_POINT
    s = Shape(n, d, v, dtype, arch, predict.DEFAULT_LIVE_FRAC)
    assert timing.predict("liger", "fwd+bwd", s).ms == pytest.approx(targets["liger"], rel=0.01)
    check = predict.calibration_check()
    assert set(check["model_ms"]) == {"cce live 0.5", "cce live 0.2", "liger live 0.5", "liger live 0.2"}


@pytest.mark.parametrize("argv, name", [
    (["--shape", "1024,256"], "--shape"),
    (["--shape", "1024,0,4096"], "--shape"),
    (["--dtype", "fp8"], "--dtype"),
    (["--arch", "sm_75"], "--arch"),
    (["--live-frac", "0"], "--live-frac"),
    (["--live-frac", "most"], "--live-frac"),
    (["--format", "xml"], "--format"),
    (["--impls", "triton,flash"], "--impls"),
])
def test_bad_arguments_name_the_argument(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        predict.main((argv + ["--shape", "64,64,64"] if argv[0] != "--shape" else argv) + ["--no-write"])
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


def test_report_renders_predictions_apart_and_labelled(tmp_path, capsys):
    predict.main(["--shape", "1024,256,4096", "--out", str(tmp_path)])
    capsys.readouterr()
    assert report.measured_csvs(tmp_path) == []
    for text in (report.render(tmp_path), report.summary(tmp_path)):
        assert "PREDICTED, NOT MEASURED" in text and "never by a per-implementation fit" in text
        assert "| 1024 | 256 | 4096 | bf16 | fwd+bwd | 0.5 | triton |" in text
        assert "`cublas_3gemm`" in text and "**Sensitivity**" in text
        assert "goal <= 1.15x" in text and "goal >= 85%" in text
    summary = report.summary(tmp_path)
    assert "predicted BEHIND" in summary or "Predicted ahead" in summary
    assert "**Kernel structures**" in report.render(tmp_path)


def test_several_live_fractions_add_backward_rows_only():
    shape = (SMALL.N, SMALL.D, SMALL.V)
    rows = predict.rows_for([shape], "bf16", "sm_90", [0.2, 1.0], impls=("triton", "cce", "cublas_3gemm"))
    passes = [(r["impl"], r["pass"], float(r["live_frac"])) for r in rows]
    assert sorted(passes) == sorted([("triton", "fwd", 0.2), ("cce", "fwd", 0.2),
                                     ("triton", "fwd+bwd", 0.2), ("cce", "fwd+bwd", 0.2), ("cublas_3gemm", "fwd+bwd", 0.2),
                                     ("triton", "fwd+bwd", 1.0), ("cce", "fwd+bwd", 1.0)])
    ms = {(r["impl"], float(r["live_frac"])): float(r["pred_ms"]) for r in rows if r["pass"] == "fwd+bwd"}
    assert ms[("triton", 1.0)] > ms[("triton", 0.2)]  # every tile live costs more than a filtered fifth
    assert ms[("cce", 1.0)] > ms[("cce", 0.2)]
    assert predict._live_frac("0.2,0.05,1") == [0.2, 0.05, 1.0]


# ---------------------------------------------------------------- the model's terms, one by one


H100 = hardware.ARCHS["sm_90"]


def test_unpipelined_structure_is_slower_and_our_dgrad_follows_the_plan():
    piped = Structure(128, 64, 32, 8, 4, True, "wgmma")
    unpiped = dataclasses.replace(piped, pipelined=False)
    assert hardware.efficiency(unpiped, H100)[0] < hardware.efficiency(piped, H100)[0]
    # the what-if on the same plan: our dgrad unpipelined (flag test per K step) is slower
    slow = timing.predict("triton", "fwd+bwd", MID, timing.Assumptions(dgrad_pipelined=False)).ms
    fast = timing.predict("triton", "fwd+bwd", MID, timing.Assumptions(dgrad_pipelined=True)).ms
    assert slow > fast


def test_plan_structure_reads_pipelined_from_the_plan_else_the_named_default():
    cfg = implementations.plan_module.configs("bf16", "sm_90").dweight
    bare = types.SimpleNamespace(kernel="_dweight_kernel", config=cfg)
    said = types.SimpleNamespace(kernel="_dweight_kernel", config=cfg, pipelined=True)
    assert implementations.plan_structure(bare, H100).pipelined is implementations.PIPELINED_DEFAULT["_dweight_kernel"]
    assert implementations.plan_structure(said, H100).pipelined is True
    st = implementations.plan_structure(said, H100)
    assert (st.block_m, st.block_n, st.block_k, st.num_warps, st.num_stages) == (
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    assert st.mma == "wgmma" and implementations.plan_structure(said, hardware.ARCHS["sm_80"]).mma == "mma"


@pytest.mark.parametrize("constant", ["DEAD_STEP_CYCLES", "DEAD_TILE_CYCLES"])
def test_dead_steps_and_dead_tiles_cost_more_than_nothing(constant, monkeypatch):
    s = dataclasses.replace(MID, live_frac=0.2)
    a = timing.Assumptions(dgrad_pipelined=False)
    charged = timing.predict("triton", "fwd+bwd", s, a).ms
    monkeypatch.setattr(implementations, constant, 0)
    assert timing.predict("triton", "fwd+bwd", s, a).ms < charged
    # and more dead tiles cost more: at a lower live fraction the dead part's cost grows
    monkeypatch.undo()
    k = [c for c in timing.costs("triton", "fwd+bwd", dataclasses.replace(s, live_frac=0.1)) if c.name == "_dlogits_kernel"]
    k_more_live = [c for c in timing.costs("triton", "fwd+bwd", dataclasses.replace(s, live_frac=0.9))
                   if c.name == "_dlogits_kernel"]
    assert k[0].overhead_cycles > k_more_live[0].overhead_cycles > 0


def test_l2_cap_binds_for_a_small_tile_not_a_large_one():
    flops = 1e12
    for tile, bound in (((64, 64), "l2"), ((256, 128), "compute")):
        st = Structure(*tile, 64, 8, 4, True, "wgmma")
        cost = simulator.KernelCost("gemm", ((flops, st),), 0.0, 0.0, 1.0)
        assert timing.kernel_ms(cost, SMALL)[1] == bound, tile
    st = Structure(64, 64, 64, 8, 4, True, "wgmma")
    cost = simulator.KernelCost("gemm", ((flops, st),), 0.0, 0.0, 1.0)
    slow_l2 = timing.kernel_ms(cost, SMALL, timing.Assumptions(l2_tbps=5.0))[0]
    assert slow_l2 > timing.kernel_ms(cost, SMALL)[0]
    # cuBLAS's measured rate already includes its L2 traffic: not capped again
    blas = simulator.KernelCost("gemm", ((flops, implementations.CUBLAS_LARGE),), 0.0, 0.0, 1.0)
    assert timing.kernel_ms(blas, SMALL, timing.Assumptions(l2_tbps=1.0))[1] == "compute"


def test_cce_runs_its_real_configs_and_sorts_its_vocabulary():
    labels = {s["structure"] for s in timing.structures("cce", "fwd+bwd", SMALL)}
    assert "256x128x32 8w 3s pipelined wgmma" in labels and "128x128x32 4w 4s pipelined wgmma" in labels
    assert implementations.cce_live_frac(0.61) == pytest.approx(0.49)
    assert implementations.cce_live_frac(1.0) == 1.0
    # the sort makes CCE's gradient work smaller than at our unsorted fraction
    sorted_flops = timing.predict("cce", "fwd+bwd", SMALL).totals()[0]
    g = 2 * SMALL.N * SMALL.D * SMALL.V
    assert sorted_flops < g * (2 + 2 * SMALL.live_frac)


def test_bare_gemms_are_the_lower_bound_of_every_implementation():
    for pass_, bound in (("fwd", "cublas_1gemm"), ("fwd+bwd", "cublas_3gemm")):
        floor = timing.predict(bound, pass_, MID).ms
        for impl in ("triton", "cce", "liger"):
            assert timing.predict(impl, pass_, MID).ms > floor, (impl, pass_)
    assert timing.predict("cublas_3gemm", "fwd+bwd", MID).ms == pytest.approx(
        3 * timing.predict("cublas_1gemm", "fwd", MID).ms, rel=0.05)


def test_sensitivity_rows_present_and_moving_the_right_way():
    # A shape with a few waves a launch: at SMALL (1024 x 256 x 4096) the 10% workspace budget
    # cuts the backward into many tiny chunks whose launch latency and wave quantisation, not the
    # GEMM work, set the time (there live 1.0 came out below live 0.5), so no direction holds.
    rows = predict.sensitivity((4096, 1024, 16384), "bf16", "sm_90", cache={})
    by = {(r["assumption"], r["value"]): r for r in rows}
    assert {("base", "live 0.5"), ("live fraction", "0.2"), ("live fraction", "1"), ("Triton efficiencies", "x 0.85"),
            ("Triton efficiencies", "x 1.15"), ("L2 bandwidth", "7 TB/s"), ("L2 bandwidth", "12 TB/s")} <= set(by)
    base = by[("base", "live 0.5")]
    for r in rows:
        assert {"fwd_bwd_over_3gemm", "fwd_gemm_fraction", "extra_over_inputs_grads"} <= set(r)
        assert set(r["ms"]) == {"triton fwd", "triton fwd+bwd", "cce fwd", "cce fwd+bwd", "liger fwd", "liger fwd+bwd",
                                "cublas_1gemm fwd", "cublas_3gemm fwd+bwd"}
    assert by[("Triton efficiencies", "x 0.85")]["ms"]["triton fwd"] > base["ms"]["triton fwd"]
    assert by[("Triton efficiencies", "x 1.15")]["ms"]["cce fwd"] < base["ms"]["cce fwd"]
    assert by[("live fraction", "1")]["ms"]["triton fwd+bwd"] > base["ms"]["triton fwd+bwd"]
    assert by[("L2 bandwidth", "7 TB/s")]["ms"]["triton fwd+bwd"] >= base["ms"]["triton fwd+bwd"]
    assert by[("live fraction", "0.2")]["ms"]["triton fwd+bwd"] < base["ms"]["triton fwd+bwd"]
    assert by[("our dgrad", "unpipelined (flag test per K step)")]["ms"]["triton fwd+bwd"] > base["ms"]["triton fwd+bwd"]
    assert base["ms"]["cublas_3gemm fwd+bwd"] == by[("Triton efficiencies", "x 0.85")]["ms"]["cublas_3gemm fwd+bwd"]


def test_notes_name_every_structure_with_a_source_and_the_plan_attributes_read():
    notes = predict.notes("sm_90", shape=(SMALL.N, SMALL.D, SMALL.V), cache={}, check=False)
    assert notes["structures"] and all(s["source"] for s in notes["structures"])
    assert set(notes["plan_attributes_read"]["present"]) == set(implementations.PLAN_ATTRIBUTES)
    assert notes["goals"] == {"fwd_bwd_over_3gemm": 1.15, "fwd_gemm_fraction": 0.85, "extra_over_inputs_grads": 0.10}
