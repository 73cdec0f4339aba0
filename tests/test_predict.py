"""The static performance model ``benchmarks/predict.py``: its L2 model on cases computable by
hand, its FLOP counts, its CSV, that it reads the kernels' own launch plan, that its calibration
reproduces the third-party point, and its argument errors. No timing is asserted (it predicts)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import predict  # noqa: E402

MB = 2**20
SMALL = predict.Shape(1024, 256, 4096, "bf16", "sm_90", 0.2)


def test_l2_working_set_that_fits_costs_compulsory_misses_only():
    l2 = predict.L2(50 * MB)
    for _ in range(5):
        for cell in range(10):
            l2.access(("a", cell), MB, predict.READ)
    assert l2.read_bytes == 10 * MB and l2.write_bytes == 0


def test_l2_streaming_larger_than_the_cache_misses_every_time():
    # LRU with a cyclic sweep over twice its capacity: every access evicts the next one needed.
    l2 = predict.L2(4 * MB)
    for _ in range(3):
        for cell in range(8):
            l2.access(("a", cell), MB, predict.READ)
    assert l2.read_bytes == 24 * MB


def test_l2_stores_allocate_without_reading_and_are_written_back_once():
    l2 = predict.L2(2 * MB)
    l2.access("out", MB, predict.WRITE)
    l2.access("out", MB, predict.WRITE)          # hit, still one dirty cell
    l2.access("acc", MB, predict.RMW)            # read on miss, then dirty
    assert (l2.read_bytes, l2.write_bytes) == (MB, 0)
    l2.access("x", MB, predict.READ)             # evicts "out": its write-back
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
        return [[(("A", pid), MB, predict.READ), (("B", k), MB, predict.READ)] for k in range(6)]

    launch = predict.SimLaunch("toy", 4, 4, accesses)
    assert predict.run_launch(launch, predict.L2(6 * MB)) == (4 + 6) * MB
    one_at_a_time = predict.SimLaunch("toy", 4, 1, accesses)
    assert predict.run_launch(one_at_a_time, predict.L2(6 * MB)) == (4 + 4 * 6) * MB


def test_sampled_waves_extrapolate_a_steady_pattern_exactly():
    # Every wave streams 3 fresh cells: simulating 2 waves of 10 and extrapolating is exact.
    def accesses(pid):
        return [[(("fresh", pid, k), MB, predict.READ)] for k in range(3)]

    full = predict.run_launch(predict.SimLaunch("t", 40, 4, accesses), predict.L2(2 * MB), budget=10**9)
    sampled = predict.run_launch(predict.SimLaunch("t", 40, 4, accesses), predict.L2(2 * MB), budget=1)
    assert full == sampled == 40 * 3 * MB


@pytest.mark.parametrize("live_frac", [0.2, 1.0])
def test_flops_follow_the_2ndv_formulas(live_frac):
    s = predict.Shape(SMALL.N, SMALL.D, SMALL.V, "bf16", "sm_90", live_frac)
    g = 2 * s.N * s.D * s.V
    # ours saves the row maxima here, so dlogits recomputes the live tiles only (a dead one
    # charged DEAD_TILE_COST of a tile)
    assert predict.plan_module.launch_plan(s.N, s.D, s.V, "bf16", "sm_90").tile_max_bytes > 0
    dlogits = live_frac + (1 - live_frac) * predict.DEAD_TILE_COST
    expect = {("triton", "fwd"): g, ("triton", "fwd+bwd"): g * (1 + dlogits + 2 * live_frac),
              ("cce", "fwd"): g, ("cce", "fwd+bwd"): g * (2 + 2 * live_frac),
              ("liger", "fwd"): g, ("liger", "fwd+bwd"): 3 * g}
    for (impl, pass_), flops in expect.items():
        assert predict.predict(impl, pass_, s).totals()[0] == pytest.approx(flops, rel=1e-12), (impl, pass_)


def test_csv_has_one_row_per_impl_and_pass_with_the_issue_columns(capsys):
    assert predict.main(["--shape", "1024,256,4096", "--format", "csv", "--arch", "sm_80"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split(",")
    assert header[:13] == ["impl", "pass", "N", "D", "V", "dtype", "arch", "flops_t", "dram_gb", "atomic_gb",
                           "extra_mb", "inputs_grads_mb", "pred_ms"]
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert sorted((r["impl"], r["pass"]) for r in rows) == sorted(
        (i, p) for i in ("triton", "cce", "liger") for p in ("fwd", "fwd+bwd"))
    for r in rows:
        assert (r["N"], r["D"], r["V"], r["dtype"], r["arch"]) == ("1024", "256", "4096", "bf16", "sm_80")
        assert float(r["pred_ms"]) > 0 and float(r["dram_gb"]) > 0
    atomic = {(r["impl"], r["pass"]): float(r["atomic_gb"]) for r in rows}
    assert atomic[("triton", "fwd+bwd")] == 0 and atomic[("cce", "fwd+bwd")] > 0


def test_markdown_and_table_say_predicted(capsys):
    for fmt in ("markdown", "table"):
        predict.main(["--shape", "1024,256,4096", "--format", fmt, "--impls", "triton"])
        assert "PREDICTED, NOT MEASURED" in capsys.readouterr().out


def test_our_prediction_reads_the_kernels_launch_plan(monkeypatch):
    # Vocabulary chunks: every chunk re-reads and rewrites d_hidden (load, add, store; 64 MB,
    # more than the L2), so forcing smaller chunks costs DRAM traffic; the extra memory is the
    # plan's workspace.
    SHAPE = (16384, 2048, 32768)
    s = predict.Shape(*SHAPE, "bf16", "sm_90", 0.2)
    before = predict.predict("triton", "fwd+bwd", s).row()
    calls = []
    original = predict.plan_module.launch_plan

    def smaller_chunks(N, D, V, dtype, arch):
        calls.append((N, D, V, dtype, arch))
        return original(N, D, V, dtype, arch, vocab_chunk=256)

    default = original(*SHAPE, "bf16", "sm_90")
    assert default.backward_axis == "vocab" and default.vocab_chunk >= 512
    monkeypatch.setattr(predict.plan_module, "launch_plan", smaller_chunks)
    after = predict.predict("triton", "fwd+bwd", s).row()
    assert calls and calls[0] == (*SHAPE, "bf16", "sm_90")
    assert float(after["dram_gb"]) > float(before["dram_gb"])
    assert float(after["extra_mb"]) == pytest.approx(original(*SHAPE, "bf16", "sm_90", vocab_chunk=256)
                                                     .workspace_bytes / MB, abs=0.06)


def test_row_chunks_when_n_is_at_least_v_rewrite_d_weight_per_chunk():
    # N >= V: chunks of rows; d_weight (64 MB, more than the L2) is stored by the first chunk
    # and loaded, added and stored by each later one: at least its reads reach DRAM.
    s = predict.Shape(16384, 2048, 16384, "bf16", "sm_90", 1.0)
    plan = predict.plan_module.launch_plan(s.N, s.D, s.V, "bf16", "sm_90")
    assert plan.backward_axis == "rows" and plan.num_chunks > 1
    dram = float(predict.predict("triton", "fwd+bwd", s).row()["dram_gb"])
    assert dram * 1e9 > (plan.num_chunks - 1) * s.V * s.D * 2


def test_utilisation_dispatches_programs_to_the_first_free_slot():
    # equal programs: whole waves, the last one partial
    assert predict._utilisation(5, 4) == pytest.approx(5 / 8)
    assert predict._utilisation(5, 4, lambda pid: 3) == pytest.approx(5 / 8)
    # lengths 4, 1, 1, 1, 1 on 2 slots: slot A runs the 4, slot B the four 1s: makespan 4, busy 8 of 8
    assert predict._utilisation(5, 2, lambda pid: 4 if pid == 0 else 1) == pytest.approx(1.0)
    # lengths 1, 1, 4 on 2 slots: the 4 starts at 1, makespan 5, busy 6 of 10
    assert predict._utilisation(3, 2, lambda pid: 4 if pid == 2 else 1) == pytest.approx(0.6)


def test_extra_memory_is_the_plans_workspace_and_liger_keeps_a_logits_chunk():
    plan = predict.plan_module.launch_plan(SMALL.N, SMALL.D, SMALL.V, "bf16", "sm_90")
    assert predict.extra_bytes("triton", SMALL, True) == plan.workspace_bytes
    assert predict.extra_bytes("triton", SMALL, False) == plan.forward_bytes == 4 * SMALL.N * (plan.vocab_splits + 2)
    chunk = predict.liger_chunk_size(SMALL.N, SMALL.D, SMALL.V)
    assert chunk == 64  # next_power_of_2(cdiv(1024, cdiv(4096, 256)))
    assert predict.extra_bytes("liger", SMALL, True) >= chunk * SMALL.V * 2


@pytest.mark.slow
def test_calibration_reproduces_the_third_party_point():
    (n, d, v, dtype, arch), targets = predict.CALIBRATION_POINT
    s = predict.Shape(n, d, v, dtype, arch, predict.DEFAULT_LIVE_FRAC)
    for impl, ms in targets.items():
        assert predict.predict(impl, "fwd+bwd", s).ms == pytest.approx(ms, rel=0.01), impl


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
        predict.main(argv + ["--shape", "64,64,64"] if argv[0] != "--shape" else argv)
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


def test_report_renders_predictions_apart_and_labelled(tmp_path, capsys):
    import report

    predict.main(["--shape", "1024,256,4096", "--format", "csv", "--out", str(tmp_path / "predicted_sm_90.csv")])
    capsys.readouterr()
    assert report.measured_csvs(tmp_path) == []
    for text in (report.render(tmp_path), report.summary(tmp_path)):
        assert "PREDICTED, NOT MEASURED" in text and "fitted to CCE's 92.6 ms" in text
        assert "| 1024 | 256 | 4096 | bf16 | fwd+bwd | triton |" in text
    assert "Under this model, ours against CCE" in report.summary(tmp_path)


def test_several_live_fractions_add_backward_rows_only():
    shape = (SMALL.N, SMALL.D, SMALL.V)
    rows = predict.rows_for([shape], "bf16", "sm_90", [0.2, 1.0], impls=("triton", "cce"))
    passes = [(r["impl"], r["pass"], float(r["live_frac"])) for r in rows]
    assert sorted(passes) == sorted([("triton", "fwd", 0.2), ("cce", "fwd", 0.2),
                                     ("triton", "fwd+bwd", 0.2), ("cce", "fwd+bwd", 0.2),
                                     ("triton", "fwd+bwd", 1.0), ("cce", "fwd+bwd", 1.0)])
    ms = {(r["impl"], float(r["live_frac"])): float(r["pred_ms"]) for r in rows if r["pass"] == "fwd+bwd"}
    assert ms[("triton", 1.0)] > ms[("triton", 0.2)]  # every tile live costs more than a filtered fifth
    assert predict._live_frac("0.2,0.05,1") == [0.2, 0.05, 1.0]
