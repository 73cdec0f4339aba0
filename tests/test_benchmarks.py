"""Each benchmark script still runs (tiny shapes, seconds): CSV columns, rows, notes, plots, report;
every script answers ``--help``; a run without ``--update-results`` leaves the shipped results
and the README byte for byte as they were.

Benchmarks are not tests: nothing here looks at a timing. The ``torch.compile``-based
implementations (``compile``, ``cce`` on CPU) are left out to keep this under a minute;
the benchmark runs themselves cover them.
"""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench_train_step, report

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
#: Every script of the package, run as ``python -m benchmarks.<name>``.
SCRIPTS = ("bench_linear_logprobs", "bench_consistency", "bench_train_step", "bench_quality", "filter_accuracy",
           "gpu_runbook", "plot", "predict", "report")
COLUMNS = ["op", "impl", "pass", "N", "D", "V", "dtype", "ms", "ms_p20", "ms_p80", "peak_mb", "tflops",
           "gemm_frac", "device", "torch", "triton", "commit"]


def run(script, *args, out=None, timeout=240):
    """``python -m benchmarks.<script> *args [--out out]`` from the repository root; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The workers pick their backend themselves; the interpreter is for kernel tests only.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args,
                           *(["--out", str(out)] if out is not None else [])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def shipped_bytes() -> dict:
    """``{path: sha256}`` of every tracked file a benchmark, plot or report could write."""
    listed = subprocess.run(["git", "ls-files", "benchmarks/results", "README.md"], cwd=REPO, capture_output=True,
                            text=True).stdout.split()
    paths = listed or [str(p.relative_to(REPO)) for p in (BENCH / "results").iterdir()] + ["README.md"]
    return {p: hashlib.sha256((REPO / p).read_bytes()).hexdigest() for p in paths if (REPO / p).is_file()}


def read(path):
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    kind = "cuda" if _has_cuda() else "cpu"
    logs = {
        "linear_logprobs": run("bench_linear_logprobs", "--tiny", "--impls",
                               "reference,eager,torch_linear_ce,triton", out=out),
        "consistency": run("bench_consistency", "--tiny", "--impls", "reference,triton", out=out),
        "train_step": run("bench_train_step", "--tiny", "--no-max-t", out=out),
    }
    return out, kind, logs


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def test_linear_logprobs_rows_and_skips(results):
    out, kind, logs = results
    rows = read(out / f"linear_logprobs_{kind}.csv")
    timed = {(r["op"], r["impl"], r["pass"]) for r in rows if r["ms"] not in ("", "OOM")}
    for op in ("linear_logprobs", "linear_logprobs_and_rewards"):
        for p in ("fwd", "fwd+bwd"):
            assert {(op, "reference", p), (op, "eager", p), (op, "torch_linear_ce", p)} <= timed
    assert all(float(r["peak_mb"]) >= -1 for r in rows if r["peak_mb"])
    notes = json.loads((out / f"linear_logprobs_{kind}.notes.json").read_text())
    if kind == "cpu":
        skipped = {s["label"].split()[1] for s in notes["skipped"]}
        assert "triton" in skipped or "triton" in {r["impl"] for r in rows}
        assert "SKIPPED" in logs["linear_logprobs"]


def test_consistency_rows(results):
    out, kind, _ = results
    rows = read(out / f"consistency_{kind}.csv")
    ops = {r["op"] for r in rows if r["impl"] == "reference" and r["ms"]}
    assert ops == {"consistency_loss_padded", "consistency_loss_packed"}
    assert json.loads((out / f"consistency_{kind}.notes.json").read_text())["copy_gbps"] > 0


def test_train_step_rows(results):
    out, kind, _ = results
    rows = read(out / f"train_step_{kind}.csv")
    assert {r["impl"] for r in rows if r["ms"] not in ("", "OOM")} == {"ours", "eager"}


@pytest.mark.parametrize("threshold, t_max, expected", [
    (5000, 16384, (4864, False)),   # doubling to 8192 fails, bisection lands on the last fitting multiple
    (100, 16384, (0, False)),       # nothing fits
    (10**9, 4096, (4096, True)),    # everything fits up to the search cap
    (1024, 16384, (1024, False)),
])
def test_longest_fitting_search(threshold, t_max, expected):
    probes = []

    def fits_at(length):
        probes.append(length)
        return length <= threshold

    assert bench_train_step.longest(fits_at, t_max) == expected
    assert all(p % 256 == 0 and p <= t_max for p in probes)


def test_longest_fitting_stops_at_its_deadline_without_probing(monkeypatch):
    ran = []
    monkeypatch.setattr(bench_train_step.harness, "run_cases", lambda *a, **k: ran.append(a) or ([], {}))
    notes = {"skipped": [], "cases": []}
    got = bench_train_step.longest_fitting("ours", "tiny", 1, "fp32", "cpu", 2048, 4096, [], notes, deadline=0.0)
    assert ran == []
    assert got == {"impl": "ours", "max_T": 0, "search_cap_T": 4096, "search_start_T": 256, "hit_search_cap": False,
                   "stopped_by_budget": True}


def test_plot_and_report(results):
    out, _, _ = results
    before = shipped_bytes()
    run("plot", *[str(p) for p in sorted(out.glob("*.csv"))])
    assert list(out.glob("*.png"))
    run("report", str(out))
    text = (out / "README.md").read_text()
    assert "linear_logprobs" in text and "train_step" in text and "consistency_loss_packed" in text
    assert "## Performance" in (out / "performance_section.md").read_text()
    assert shipped_bytes() == before  # a report of another folder never touches the README


def test_benchmarks_is_a_package_without_path_hacks_or_import_cycles():
    for path in BENCH.rglob("*.py"):  # (the runbook adds the peers' scratch site at run time: allowed)
        assert not re.search(r"sys\.path\.insert\(.*(__file__|BENCH|REPO)", path.read_text()), path.name
    # report renders the runbook's section from runbook_spec; it does not import the runbook
    probe = ("import sys, benchmarks.report, benchmarks.plot; "
             "assert 'benchmarks.gpu_runbook' not in sys.modules, sorted(m for m in sys.modules if 'bench' in m)")
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    assert "usage:" in run(script, "--help", timeout=120)


def test_default_runs_leave_the_shipped_results_alone():
    """Without ``--out`` the scripts write ``runs/benchmarks/`` (git-ignored), never the tracked
    results or README: a tiny bench, the plots, the report and the model, byte for byte."""
    before = shipped_bytes()
    assert before
    run("bench_linear_logprobs", "--tiny", "--impls", "reference,eager", "--ops", "linear_logprobs")
    run("plot")
    run("report")
    run("predict", "--shape", "256,128,1024", "--impls", "triton,cublas_3gemm")
    assert shipped_bytes() == before
    runs = REPO / "runs" / "benchmarks"
    assert (runs / "linear_logprobs_cpu.csv").exists() and (runs / "README.md").exists()
    assert (runs / "predicted_sm_90.csv").exists()


def test_readme_performance_section(results, tmp_path):
    """The top README's Performance section is rendered from the CSVs between its markers."""
    out, _, _ = results
    section = report.summary(out)
    assert "## Performance" in section and "`linear_logprobs`" in section and "longest T that fits" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    assert report.update_readme(readme, section)
    text = readme.read_text()
    assert "old" not in text and section in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert (REPO / "README.md").read_text().count(report.README_BEGIN) == 1


def test_bench_quality_runs_resumes_and_reports(tmp_path):
    """The quality study on a toy budget: rows per cell with the machine, a rerun skips finished cells,
    the report renders the primary family and the tests."""
    out, readme = tmp_path / "quality.csv", tmp_path / "README.md"
    readme.write_text("# Results\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "benchmarks.bench_quality", "--seeds", "2", "--sizes", "16", "--arms", "grm,icrm",
            "--starts", "base,random", "--seeds-random", "1", "--rm-steps", "1", "--sft-steps", "1", "--out", str(out),
            "--readme", str(readme)]
    for expected in ("3 (start, seed, size) groups to run (6 cells)", "0 (start, seed, size) groups to run (0 cells), 6 cells"):
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert expected in proc.stdout
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:4] == ["start", "arm", "seed", "train_pairs"]
    assert {r["aten"] for r in rows} == {torch.backends.cpu.get_cpu_capability()} and all(r["torch"] for r in rows)
    assert {"pair_accuracy", "value_spearman_within", "value_auroc_within", "first_error_acc", "first_error_chance",
            "bon_accuracy", "bon_random", "bon_candidates", "train_s"} <= {r["metric"] for r in rows}
    assert {(r["start"], r["seed"]) for r in rows} == {("base", "0"), ("base", "1"), ("random", "0")}
    text = readme.read_text()
    assert "<!-- quality:begin -->" in text and "6 of 6 cells finished" in text and "Primary endpoints" in text
    with open(tmp_path / "quality_tests.csv") as fh:
        tests = list(csv.DictReader(fh))
    assert [(t["metric"], t["family"]) for t in tests if t["start"] == "base" and t["a"] == "icrm"] == [
        ("pair_accuracy", "primary"), ("bon_accuracy", "primary")] + [
        (m, "exploratory") for m in ("value_spearman", "value_spearman_within", "value_auroc", "value_auroc_within",
                                     "first_error_acc", "first_error_at_eos")]
    assert (tmp_path / "quality.png").exists() and (tmp_path / "quality_summary.csv").exists()


def test_quality_statistics_by_hand():
    sys.path.insert(0, str(BENCH))
    import bench_quality as bq

    # Exact sign flips for n <= 16: diffs (1, 2, 3) have mean 2; of the 8 sign vectors only (+ + +) and
    # (- - -) reach |mean| >= 2, so p = 2 / 8.
    assert bq.sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.25)
    assert bq.sign_flip_p(np.zeros(4)) == pytest.approx(1.0)
    # Monte Carlo beyond 16: 30 equal positive diffs are as extreme as it gets: p = (1 + hits) / (1 + draws).
    p = bq.sign_flip_p(np.ones(30), permutations=1000)
    assert 1 / 1001 <= p < 0.01
    # Holm: sorted 0.01, 0.02, 0.04 -> 3 x 0.01, 2 x 0.02 (kept monotone), 1 x 0.04; nan stays nan.
    adjusted = bq.holm([0.04, 0.01, float("nan"), 0.02])
    assert adjusted[:2] == pytest.approx([0.04, 0.03]) and np.isnan(adjusted[2]) and adjusted[3] == pytest.approx(0.04)
    assert bq.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 capped at 1, then monotone
    mean, half = bq.t_interval(np.array([1.0, 2.0, 3.0]))
    assert (mean, half) == pytest.approx((2.0, 4.303 * 1.0 / np.sqrt(3)))


def test_default_job_table_splices_the_printed_table(tmp_path):
    """scripts/default_job_table.py takes the table exactly as `icrm train` printed it, between the markers."""
    sys.path.insert(0, str(REPO / "scripts"))
    import default_job_table as djt

    printed = ("[sft] generator saved\n\n" + " " * 44 + "BT         GRM        ICRM\nheld-out (eval_file, bon_file)\n"
               "  pairwise accuracy                     0.9000      0.9120      0.9180\n"
               "  reward models start from the base; wall time 195 s; outputs in runs/default_job\n")
    output, doc = tmp_path / "out.txt", tmp_path / "doc.md"
    output.write_text(printed)
    doc.write_text(f"intro\n{djt.BEGIN}\nold table\n{djt.END}\noutro\n")
    assert djt.main(["--from-output", str(output), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "0.9000      0.9120      0.9180" in text and "[sft]" not in text and "ATen" in text
    with pytest.raises(ValueError, match="no 'BT GRM ICRM' table"):
        djt.table_of("no table here")
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- default-job:begin -->"):
        djt.main(["--from-output", str(output), "--doc", str(doc)])
