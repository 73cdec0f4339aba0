"""The GPU runbook's CPU rehearsal (``--dry-run``) and its budget logic, so the runbook cannot rot.

One dry run (tiny shapes, reference and eager only, about a minute on 2 cores) with no wheel
folder, the ``linear_fwd`` stage given no budget (its shapes are skipped) and ``consistency``
cut off after 2 s (its bench call is killed): every stage must still leave its bundle, the
stages before and after keep their results, and ``$OUT`` obeys the device tool's rules.
Nothing here looks at a timing.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_benchmarks import COLUMNS

from benchmarks import gpu_runbook, harness

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

STAGES = gpu_runbook.STAGES


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the benchmarks choose themselves
    env.pop("OUT", None)
    cmd = [sys.executable, "-m", "benchmarks.gpu_runbook", "--dry-run", "--out", str(out), "--work", str(work),
           "--wheels", str(work / "no_wheels_here"), "--budget", "linear_fwd=0", "--budget", "consistency=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def members(out: Path, stage: str) -> dict:
    """``{name: bytes}`` of the files in a stage's bundle."""
    with tarfile.open(out / f"{stage}.tar.gz") as tar:
        return {Path(m.name).relative_to(stage).as_posix(): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def csv_rows(data: bytes) -> list[dict]:
    reader = csv.DictReader(io.StringIO(data.decode()))
    assert reader.fieldnames == COLUMNS
    return list(reader)


def timed(rows) -> set:
    return {(r["op"], r["impl"], r["pass"], r["N"]) for r in rows if re.fullmatch(r"[0-9.e+-]+", r["ms"])}


@pytest.mark.slow
def test_out_obeys_the_device_tools_rules(dry_run):
    out, _ = dry_run
    entries = sorted(out.iterdir())
    assert len(entries) <= 8
    assert all(p.is_file() and not p.is_symlink() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in entries)
    assert {p.name for p in entries} == {f"{s}.tar.gz" for s in STAGES} | {"runbook.log"}


@pytest.mark.slow
def test_every_stage_wrote_its_results(dry_run):
    out, _ = dry_run
    tests = members(out, "tests")
    summary = json.loads(tests["summary.json"])
    assert summary["verdict"] == "passed" and summary["tests"] == summary["skipped"] > 0  # on CPU every cuda test skips
    for stage in STAGES:
        files = members(out, stage)
        assert json.loads(files["env.json"])["torch"] and files["log.txt"]
        if stage != "tests":
            stem = {"consistency": "consistency", "train_step": "train_step"}.get(stage, "linear_logprobs")
            csv_rows(files[f"{stem}_cpu.csv"])  # present, with the house columns, even where nothing ran
            assert f"{stem}_cpu.notes.json" in files
    target = csv_rows(members(out, "target")["linear_logprobs_cpu.csv"])
    bounds = {("cublas_1gemm", "fwd"), ("cublas_3gemm", "fwd+bwd")}  # the bare GEMMs, one pass each
    assert timed(target) == {("linear_logprobs_and_rewards", impl, p, "64") for impl, p in
                             {(i, p) for i in ("reference", "eager") for p in ("fwd", "fwd+bwd")} | bounds}
    checks = json.loads(members(out, "target")["targets.json"])["checks"]
    assert len(checks) == 6 and all(c["met"] is None for c in checks[:2])  # no peers in the dry run
    against_bounds = [c for c in checks if "bare 3-GEMM" in c["target"] or "one cuBLAS GEMM" in c["target"]]
    assert len(against_bounds) == 2 and all(c["met"] is not None for c in against_bounds)
    bwd = csv_rows(members(out, "linear_bwd")["linear_logprobs_cpu.csv"])
    # The grid at fwd+bwd, except the target op at the target shape (the target stage's).
    assert timed(bwd) == {(op, impl, "fwd+bwd", n) for impl in ("reference", "eager", "cublas_3gemm")
                          for op, n in [("linear_logprobs", "32"), ("linear_logprobs_and_rewards", "32"), ("linear_logprobs", "64")]}
    train = csv_rows(members(out, "train_step")["train_step_cpu.csv"])
    assert {r["impl"] for r in train if r["ms"]} == {"ours", "eager"}
    assert "README.md" in members(out, "linear_bwd")


@pytest.mark.slow
def test_missing_wheels_mark_the_peers_skipped(dry_run):
    out, stdout = dry_run
    assert "no wheels:" in stdout and "fetch_wheels.sh" in stdout
    files = members(out, "target")
    skipped = json.loads(files["linear_logprobs_cpu.notes.json"])["skipped"]
    for peer in ("liger", "cce"):
        reasons = {s["reason"] for s in skipped if s["label"].split()[1] == peer}
        assert len(reasons) == 1 and "does not exist" in reasons.pop()
    assert b"`liger` skipped" in files["README.md"]


@pytest.mark.slow
def test_cut_off_stages_keep_the_other_stages_results(dry_run):
    out, stdout = dry_run
    fwd = members(out, "linear_fwd")
    assert csv_rows(fwd["linear_logprobs_cpu.csv"]) == []
    reasons = {s["label"].split()[1]: s["reason"] for s in json.loads(fwd["linear_logprobs_cpu.notes.json"])["skipped"]}
    assert reasons["reference"].startswith("budget: estimated") and reasons["eager"].startswith("budget: estimated")
    cons = members(out, "consistency")
    assert json.loads(cons["consistency_cpu.notes.json"])["skipped"][0]["reason"].startswith("budget: cut off")
    # Before and after the cut stages, the results are whole.
    assert timed(csv_rows(members(out, "linear_bwd")["linear_logprobs_cpu.csv"]))
    assert timed(csv_rows(members(out, "train_step")["train_step_cpu.csv"]))
    assert "== gpu_runbook done" in (out / "runbook.log").read_text()


@pytest.mark.slow
def test_collect_merges_the_bundles(dry_run, tmp_path):
    out, _ = dry_run
    merged = gpu_runbook.collect(out, tmp_path)
    assert {p.name for p in merged} == {"linear_logprobs_cpu.csv", "consistency_cpu.csv", "train_step_cpu.csv"}
    rows = csv_rows((tmp_path / "linear_logprobs_cpu.csv").read_bytes())
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and {r["N"] for r in rows} == {"32", "64"}
    readme = (tmp_path / "README.md").read_text()
    assert "## GPU runbook" in readme and "--stages linear_bwd" in readme
    assert "**Last collected run** (dry run, no GPU" in readme and "CUDA tests passed" in readme
    assert "peak extra memory <= 10%" in readme and json.loads((tmp_path / gpu_runbook.RECORD).read_text())["tests"]
    # A rehearsal never lands in the committed results.
    before = sorted((BENCH / "results").iterdir())
    with pytest.raises(SystemExit, match="come from a --dry-run"):
        gpu_runbook.collect(out, BENCH / "results")
    assert sorted((BENCH / "results").iterdir()) == before


def test_install_peers_says_why_a_peer_cannot_run(tmp_path):
    log = []
    empty = tmp_path / "wheels"
    empty.mkdir()
    skipped = gpu_runbook.install_peers(empty, tmp_path / "site", log.append)
    assert set(skipped) == {"liger", "cce"} and "has no *.whl" in skipped["cce"] and "fetch_wheels.sh" in log[0]
    (empty / "broken.whl").write_text("not a wheel")
    skipped = gpu_runbook.install_peers(empty, tmp_path / "site", log.append)
    assert skipped["liger"].startswith("pip could not install the wheels in")


def test_budget_logic():
    profile = gpu_runbook.DRY
    assert gpu_runbook.estimate_s(10.0, []) == 10.0
    # Scaled by the largest call run so far: it took twice its prior.
    assert gpu_runbook.estimate_s(30.0, [(5.0, 4.0), (10.0, 20.0)]) == pytest.approx(60.0)
    assert gpu_runbook.affordable(10.0, 12.0, calibrated=True) and not gpu_runbook.affordable(10.0, 11.9, calibrated=True)
    # An uncalibrated guess never skips while time is left; no time left always skips.
    assert gpu_runbook.affordable(100.0, 1.0, calibrated=False) and not gpu_runbook.affordable(1.0, 0.0, calibrated=False)
    assert gpu_runbook.stage_budgets(["tests", "target"], {"tests": 180, "target": 120}, 150.0, {"target": 5}) == {
        "tests": 150.0, "target": 5.0}
    cases, units = gpu_runbook.chunk_cost([(2, 3, 5)], ("a", "b"), ("fwd", "fwd+bwd"), ("x",))
    assert (cases, units) == (4, 2 * 3 * 5 * 2 * 4)
    assert gpu_runbook.prior_s(cases, units, profile) == pytest.approx(
        profile.chunk_overhead_s + 4 * profile.s_per_case + units * profile.s_per_unit)


def test_linear_chunks_cover_the_grid_smallest_first():
    profile = gpu_runbook._gpu_profile()
    # the oracle, ours, then the bare GEMMs of the goals: a cut-off call keeps them
    assert profile.impls[:4] == ("reference", "triton", "cublas_3gemm", "cublas_1gemm")
    for stage, passes in (("linear_bwd", ("fwd+bwd",)), ("linear_fwd", ("fwd",))):
        chunks = gpu_runbook.linear_chunks(profile, stage)
        covered = [(s, op) for shapes, ops, p in chunks for s in shapes for op in ops]
        assert all(p == passes for _, _, p in chunks)
        expected = {(s, op) for s in profile.grid for op in gpu_runbook.LINEAR_OPS} - {(profile.target, gpu_runbook.TARGET_OP)}
        assert len(covered) == len(set(covered)) and set(covered) == expected
        costs = [gpu_runbook.chunk_cost(*c, profile.impls)[1] for c in chunks]
        assert costs == sorted(costs)
    assert gpu_runbook.linear_chunks(profile, "target") == [([profile.target], (gpu_runbook.TARGET_OP,), (p,))
                                                            for p in ("fwd+bwd", "fwd")]
    only = [(4096, 2048, 32000)]
    assert [c[0] for c in gpu_runbook.linear_chunks(profile, "linear_fwd", only)] == [only]
    assert gpu_runbook.linear_chunks(profile, "target", only) == []


def test_bad_arguments_get_a_clear_error(capsys):
    for argv, expected in ((["--stages", "tests,bogus"], "--stages: expected"), (["--budget", "tests"], "--budget: expected"),
                           (["--shapes", "1x2"], "--shapes: expected")):
        with pytest.raises(SystemExit) as exc:
            gpu_runbook.parse_args(argv)
        assert expected in capsys.readouterr().err + str(exc.value.code)


def test_saver_keeps_what_a_cut_off_bench_finished(tmp_path):
    """The benches save after each implementation; the first save replaces an older file."""
    env = {"device": "d", "torch": "t", "triton": "", "commit": ""}

    def row(impl):
        return harness.make_row(harness.Case("op", impl, "fwd", 4, 2, 3, "fp32"), env, 1.0, 1.0, 1.0, 0.5)

    harness.write_results("x", "cpu", [row("old")], {"skipped": [], "cases": []}, tmp_path)
    save = harness.saver("x", "cpu", tmp_path)
    notes = {"skipped": [{"label": "op cce fwd N=4 D=2 V=3 fp32", "status": "skipped", "reason": "r"}], "cases": [],
             "mode": "m"}
    save([row("reference")], notes)
    save([row("reference"), row("eager")], notes)
    assert [r["impl"] for r in csv_rows((tmp_path / "x_cpu.csv").read_bytes())] == ["reference", "eager"]
    written = json.loads((tmp_path / "x_cpu.notes.json").read_text())
    assert written["skipped"] == notes["skipped"] and written["mode"] == "m"
