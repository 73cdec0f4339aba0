"""The GPU runbook: one command that, on a bare offline GPU machine, installs, checks and measures.

On a lent GPU machine (torch, Triton and transformers preinstalled, no package registry) it:

1. makes the project importable from the working tree (``PYTHONPATH``: nothing to build or
   download) and installs the carried peer wheels (``.whl/``: liger-kernel, cut-cross-entropy,
   fetched beforehand by ``benchmarks/fetch_wheels.sh``) with ``pip --no-index`` into a
   scratch folder; peers without wheels are marked skipped with the reason;
2. prints the GPU and library versions (``env.json`` in every stage's bundle);
3. runs the stages asked for, in this order, each within its wall-clock budget
   (:data:`STAGE_WHAT`, :data:`GPU_BUDGETS`; 22.5 minutes together):

   - ``tests``: ``pytest -m cuda tests``, the CUDA kernel tests (150 s);
   - ``target``: linear_logprobs_and_rewards at N=16384, D=4096, V=128256, bf16, fwd+bwd then
     fwd, every implementation, then the issue's targets checked on those rows (240 s);
   - ``linear_bwd`` / ``linear_fwd``: the sweep (both ops, N in {4096, 16384} x D in {2048,
     4096} x V in {32000, 128256, 256000} + the ICRM paper shape), smallest shapes first
     (480 s / 180 s);
   - ``consistency``: consistency_loss fwd+bwd, padded and packed, 64k to 4M tokens (90 s);
   - ``train_step``: one ICRM step of a Llama-3.2-1B-shaped config, ours vs eager, then the
     longest sequence that fits until the budget runs out (210 s).

   A stage skips the shapes it cannot afford (``skipped``, reason ``budget: ...``); a bench
   call that overruns is killed and its cases recorded as cut off.

Every stage writes ``<out>/<stage>.tar.gz`` (its CSVs in the house columns, ``.notes.json``,
PNG plots, a README rendered by ``report.py``, its log, ``env.json``) when it starts and again
after every bench call, so a run that is cut off still returns what it measured;
``<out>/runbook.log`` has the whole log. At most 7 files, at the top of ``<out>``, named with
letters, digits, ``.``, ``_`` and ``-`` only (the device tool's ``$OUT`` rules). ``<out>`` is
``$OUT`` when set, else ``runs/gpu``.

The device tool allows 10 minutes a call and 30 minutes in all, so the runbook runs in the
four calls of :data:`CALLS` (``--time-budget-s``, default 560 s, bounds one call), each with
``carry: [".whl"]``::

    python3 -m benchmarks.gpu_runbook --stages tests,target             # <= 6.5 min + setup
    python3 -m benchmarks.gpu_runbook --stages linear_bwd               # <= 8 min + setup
    python3 -m benchmarks.gpu_runbook --stages linear_fwd,consistency   # <= 4.5 min + setup
    python3 -m benchmarks.gpu_runbook --stages train_step               # <= 3.5 min + setup

Back on a machine with the repository, merge what came back (rows merged by case; plots and
READMEs regenerated) into ``runs/benchmarks`` to look at it, then into the shipped
``benchmarks/results`` and the README's Performance section::

    python -m benchmarks.gpu_runbook --collect DIR_WITH_THE_RETURNED_FILES
    python -m benchmarks.gpu_runbook --collect DIR_WITH_THE_RETURNED_FILES --update-results

The runbook runs from the repository root (``python3 -m benchmarks.gpu_runbook``; on a bare
machine ``PYTHONPATH=$PWD`` is all it needs) and starts every bench as ``python -m benchmarks.<bench>``.

``--dry-run`` runs the same stages on the CPU with tiny shapes and the plain PyTorch
implementations (``tests/test_gpu_runbook.py`` runs it in CI, so the runbook cannot rot).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.paths import REPO_ROOT, RESULTS_DIR, RUNS_DIR
from benchmarks.runbook_spec import CALLS, GPU_BUDGETS, RECORD, STAGE_WHAT, STAGES  # noqa: F401

LINEAR_OPS = ("linear_logprobs", "linear_logprobs_and_rewards")
TARGET_OP = "linear_logprobs_and_rewards"
#: Peer implementations that come from carried wheels: impl -> (distribution, module).
PEERS = {"liger": ("liger-kernel", "liger_kernel"), "cce": ("cut-cross-entropy", "cut_cross_entropy")}
#: Relative cost of a pass in the budget's work units (fwd+bwd is about three GEMMs of fwd's one).
PASS_WEIGHT = {"fwd": 1.0, "fwd+bwd": 3.0}
#: The CUDA tests (on a CPU, the dry run collects them and they skip).
PYTEST_ARGS = ("-m", "cuda", "tests")


@dataclass(frozen=True)
class Profile:
    """What differs between the GPU run and the CPU dry run; the stages themselves do not."""

    target: tuple[int, int, int]
    grid: tuple[tuple[int, int, int], ...]
    dtype: str
    impls: tuple[str, ...]
    ours: str
    budgets: dict
    shapes_per_chunk: int
    #: Prior cost of one bench call: seconds fixed (process starts, GEMM rate), per case, per work unit.
    chunk_overhead_s: float
    s_per_case: float
    s_per_unit: float
    bench_flags: tuple[str, ...] = ()
    consistency_impls: tuple[str, ...] = ("reference", "triton", "compile")
    #: Seconds of the train_step budget kept from the longest-T search (its checked steps).
    search_reserve_s: float = 90.0


def _gpu_profile() -> Profile:
    from benchmarks.bench_linear_logprobs import GPU_GRID, IMPLS, PAPER_SHAPE

    # Most wanted first (others after): a bench call cut off by its budget keeps the implementations it finished.
    first = ("reference", "triton", "cublas_3gemm", "cublas_1gemm", "cce", "liger", "eager", "torch_linear_ce", "compile")
    impls = tuple(sorted(IMPLS, key=lambda i: first.index(i) if i in first else len(first)))
    return Profile(target=(16384, 4096, 128256), grid=tuple(GPU_GRID) + (PAPER_SHAPE,), dtype="bf16", impls=impls,
                   ours="triton", budgets=GPU_BUDGETS, shapes_per_chunk=4, chunk_overhead_s=30.0, s_per_case=1.5,
                   s_per_unit=3e-14)


#: CPU rehearsal: tiny shapes, the PyTorch implementations without torch.compile (its C++
#: builds would take most of CI's minute), no longest-T search.
DRY = Profile(target=(64, 32, 500), grid=((32, 16, 100), (64, 32, 500)), dtype="fp32",
              impls=("reference", "eager", "cublas_3gemm", "cublas_1gemm"),
              ours="reference", budgets={s: 120 for s in STAGES}, shapes_per_chunk=2, chunk_overhead_s=6.0,
              s_per_case=0.5, s_per_unit=1e-9, bench_flags=("--tiny",), consistency_impls=("reference",),
              search_reserve_s=float("inf"))


# ---------------------------------------------------------------- the time budget (pure)


def chunk_cost(shapes, ops, passes, impls) -> tuple[int, float]:
    """``(cases, work units)`` of one bench call; a unit is N*D*V of one op and pass, fwd+bwd weighing 3."""
    cases = len(shapes) * len(ops) * len(passes) * len(impls)
    units = sum(n * d * v for n, d, v in shapes) * len(ops) * sum(PASS_WEIGHT[p] for p in passes) * len(impls)
    return cases, units


def prior_s(cases: int, units: float, profile: Profile) -> float:
    """The profile's prior guess of a bench call's seconds."""
    return profile.chunk_overhead_s + cases * profile.s_per_case + units * profile.s_per_unit


def estimate_s(prior: float, done: list[tuple[float, float]]) -> float:
    """Seconds a bench call should take: its prior, scaled by how the largest call run so far
    (``done``: ``(prior, seconds)`` each; the nearest in size, calls run smallest first) compared
    with its own prior."""
    if not done:
        return prior
    done_prior, done_s = max(done)
    return prior * done_s / done_prior


def affordable(estimate: float, left_s: float, calibrated: bool, margin: float = 1.2) -> bool:
    """Start a bench call when its estimate, with a safety margin, fits the time left. Before
    any call has calibrated the estimate it is only a guess: then any time left will do (the
    call is cut off if it overruns)."""
    if left_s <= 0:
        return False
    return not calibrated or estimate * margin <= left_s


def stage_budgets(stages, defaults: dict, call_s: float, overrides: dict) -> dict:
    """Each stage's budget: its default or override, never more than the call's budget."""
    return {s: min(float(overrides.get(s, defaults[s])), call_s) for s in stages}


# ---------------------------------------------------------------- output


class Log:
    """Prints and appends to ``<out>/runbook.log`` (and to the current stage's log)."""

    def __init__(self, path: Path):
        self.path = path
        self.stage_path: Path | None = None
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            for path in (self.path, self.stage_path):
                if path is not None:
                    with path.open("a") as fh:
                        fh.write(text + "\n")


@dataclass
class Run:
    args: argparse.Namespace
    profile: Profile
    out: Path
    work: Path
    log: Log
    env: dict
    peers_skipped: dict
    deadline: float
    #: (prior, seconds) of the bench calls of the linear stages run in this call: the budget's history.
    history: list = field(default_factory=list)

    def kind(self) -> str:
        return "cpu" if self.args.dry_run else "cuda"


def bundle(run: Run, stage: str) -> Path:
    """``<out>/<stage>.tar.gz`` of the stage folder, replaced atomically (a kill mid-write
    leaves the previous bundle)."""
    target = run.out / f"{stage}.tar.gz"
    tmp = run.out / f".{stage}.tar.gz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(run.work / stage, arcname=stage)
    os.replace(tmp, target)
    return target


def child_env(run_env: dict) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks pick their backends themselves
    env.update(run_env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(run: Run, cmd: list[str], timeout_s: float) -> tuple[int | None, float]:
    """Runs ``cmd`` from the repository root, its output into the logs; kills its whole
    process group (the bench's workers too) after ``timeout_s``. Returns (exit code or None
    when cut off, seconds)."""
    run.log("$ " + " ".join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(run.env["child_env"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def pump():
        for line in proc.stdout:
            run.log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout_s, 0.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, time.monotonic() - start


# ---------------------------------------------------------------- setup


def install_peers(wheels: Path, site: Path, log: Log) -> dict:
    """Installs the carried wheels into ``site``; returns ``{impl: reason}`` of peers that
    cannot run (empty when all are importable)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        reason = (f"no wheels: {wheels} {'has no *.whl' if wheels.is_dir() else 'does not exist'} (run "
                  "benchmarks/fetch_wheels.sh where the package registry is reachable, and carry .whl)")
        log(f"peers: {reason}")
        return {impl: reason for impl in PEERS}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, found)]
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        reason = f"pip could not install the wheels in {wheels}: {tail}"
        log(f"peers: {reason}")
        return {impl: reason for impl in PEERS}
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    skipped = {}
    for impl, (dist, module) in PEERS.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # a peer that does not import is a result to record, not a crash
            skipped[impl] = f"{dist} not importable after installing {wheels}: {type(exc).__name__}: {exc}"
            log(f"peers: {skipped[impl]}")
    return skipped


def versions(site: Path | None) -> dict:
    """GPU, driver and library versions (what the report needs to say what was measured)."""
    import torch

    from benchmarks import harness

    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "triton": harness.triton_version(), "commit": harness.git_commit(),
            "cpu": harness.cpu_model(), "hostname": platform.node()}
    for dist in ("transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = q.stdout.strip()
    else:
        info["gpu"] = None
    info["site"] = str(site) if site else None
    return info


# ---------------------------------------------------------------- stages


def record_skipped(run: Run, stage: str, stem: str, skipped: list[tuple[str, str]]) -> None:
    """Adds ``skipped`` notes, ``(label, reason)`` each, beside the stage's CSV (which then
    exists, with the house columns, even when nothing ran)."""
    from benchmarks import harness

    entries = [{"label": label, "status": "skipped", "reason": reason} for label, reason in skipped]
    harness.write_results(stem, run.kind(), [], {"skipped": entries}, run.work / stage, append=True)


def linear_chunks(profile: Profile, stage: str, only=None) -> list[tuple[list, tuple, tuple]]:
    """``(shapes, ops, passes)`` per bench call of a linear stage, smallest work first;
    ``only``: the shapes to keep (all when None)."""
    def keep(shape):
        return only is None or shape in only

    if stage == "target":
        # fwd+bwd, the pass the targets are about, in a bench call of its own and first.
        return [([profile.target], (TARGET_OP,), (p,)) for p in ("fwd+bwd", "fwd")] if keep(profile.target) else []
    passes = ("fwd+bwd",) if stage == "linear_bwd" else ("fwd",)
    rest = [s for s in profile.grid if s != profile.target and keep(s)]
    rest.sort(key=lambda s: s[0] * s[1] * s[2])
    chunks = [(rest[i:i + profile.shapes_per_chunk], LINEAR_OPS, passes) for i in range(0, len(rest), profile.shapes_per_chunk)]
    if profile.target in profile.grid and keep(profile.target):
        # The target stage measures the target op at the target shape; the other op runs here.
        chunks.append(([profile.target], tuple(op for op in LINEAR_OPS if op != TARGET_OP), passes))
    return sorted(chunks, key=lambda c: chunk_cost(*c, profile.impls)[1])


def _rows(csv_path: Path) -> list[dict]:
    from benchmarks import report

    return report.load(csv_path)[0] if csv_path.exists() else []


def _cases(shapes, ops, passes, impls, dtype):
    from benchmarks.bench_linear_logprobs import runs_pass
    from benchmarks.harness import Case

    return [Case(op, impl, p, n, d, v, dtype) for (n, d, v) in shapes for op in ops for p in passes for impl in impls
            if runs_pass(impl, p)]


def stage_linear(run: Run, stage: str, budget: float) -> None:
    from benchmarks import harness

    profile, start = run.profile, time.monotonic()
    impls = tuple(i for i in profile.impls if i not in run.peers_skipped)
    for shapes, ops, passes in linear_chunks(profile, stage, run.args.shape_list):
        def skip(impls_, reason):
            record_skipped(run, stage, "linear_logprobs",
                           [(c.label(), reason(c)) for c in _cases(shapes, ops, passes, impls_, profile.dtype)])

        skip([i for i in PEERS if i in run.peers_skipped], lambda c: run.peers_skipped[c.impl])
        prior = prior_s(*chunk_cost(shapes, ops, passes, impls), profile)
        left = min(budget - (time.monotonic() - start), run.deadline - time.monotonic())
        est = estimate_s(prior, run.history)
        label = " ".join("x".join(map(str, s)) for s in shapes) + f" {','.join(ops)} {','.join(passes)}"
        if not affordable(est, left, calibrated=bool(run.history)):
            reason = f"budget: estimated {est:.0f} s, {max(left, 0):.0f} s left of stage {stage}'s {budget:.0f} s"
            run.log(f"[{stage}] skip {label}: {reason}")
            skip(impls, lambda c: reason)
            continue
        run.log(f"[{stage}] {label}: estimated {est:.0f} s, {left:.0f} s left")
        cmd = [sys.executable, "-m", "benchmarks.bench_linear_logprobs", "--shapes",
               ",".join("x".join(map(str, s)) for s in shapes), "--ops", ",".join(ops), "--passes", ",".join(passes),
               "--impls", ",".join(impls), "--dtype", profile.dtype, "--out", str(run.work / stage), "--append"]
        if run.args.dry_run:
            cmd += ["--budget-s", "0.02"]
        rc, took = run_child(run, cmd, left)
        if rc == 0:
            run.history.append((prior, took))
        else:
            # The bench saves after each implementation: only the cases without a row are lost.
            csv_path = run.work / stage / f"linear_logprobs_{run.kind()}.csv"
            have = {harness.row_key(r) for r in _rows(csv_path)}
            lost = [c for c in _cases(shapes, ops, passes, impls, profile.dtype)
                    if harness.row_key(harness.make_row(c, {})) not in have]
            why = (f"budget: cut off after {took:.0f} s ({budget:.0f} s stage budget)" if rc is None
                   else f"bench_linear_logprobs.py exited with {rc} (see the stage log)")
            record_skipped(run, stage, "linear_logprobs", [(c.label(), why) for c in lost])
        bundle(run, stage)
    if stage == "target":
        write_targets(run, stage)


def write_targets(run: Run, stage: str) -> None:
    from benchmarks import report

    rows = _rows(run.work / stage / f"linear_logprobs_{run.kind()}.csv")
    n, d, v = run.profile.target
    target = dict(report.TARGET, N=n, D=d, V=v, dtype=run.profile.dtype)
    checks = report.target_check(rows, target, ours=run.profile.ours)
    (run.work / stage / "targets.json").write_text(json.dumps({"target": target, "ours": run.profile.ours,
                                                               "checks": checks}, indent=1) + "\n")
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
        run.log(f"[target] {c['target']}: {c['value']} -> {verdict}")


def stage_tests(run: Run, stage: str, budget: float) -> None:
    junit = run.work / stage / "junit.xml"
    # -v: one line per test as it finishes, so a cut-off run still says which passed.
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *PYTEST_ARGS]
    rc, took = run_child(run, cmd, min(budget, run.deadline - time.monotonic()))
    summary = {"command": cmd[1:], "exit_code": rc, "seconds": round(took, 1),
               "verdict": "cut off: budget" if rc is None else "passed" if rc == 0 else "failed"}
    if junit.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        summary.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    (run.work / stage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    run.log(f"[tests] {summary['verdict']} (exit {rc}, {took:.0f} s)")


def stage_consistency(run: Run, stage: str, budget: float) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_consistency", *run.profile.bench_flags,
           "--impls", ",".join(run.profile.consistency_impls), "--out", str(run.work / stage)]
    _one_bench(run, stage, budget, cmd, "consistency")


def stage_train_step(run: Run, stage: str, budget: float) -> None:
    left = min(budget, run.deadline - time.monotonic())
    search = max(left - run.profile.search_reserve_s, 0.0)
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", *run.profile.bench_flags,
           "--search-budget-s", f"{search:.0f}", "--out", str(run.work / stage)]
    _one_bench(run, stage, budget, cmd, "train_step")


def _one_bench(run: Run, stage: str, budget: float, cmd: list[str], stem: str) -> None:
    rc, took = run_child(run, cmd, min(budget, run.deadline - time.monotonic()))
    csv_path = run.work / stage / f"{stem}_{run.kind()}.csv"
    if rc != 0:
        why = f"budget: cut off after {took:.0f} s" if rc is None else f"{Path(cmd[1]).name} exited with {rc} (see the stage log)"
        run.log(f"[{stage}] {why}" + ("" if csv_path.exists() else "; no results"))
        record_skipped(run, stage, stem, [(stem, why)])


STAGE_FUNCS = {"tests": stage_tests, "target": stage_linear, "linear_bwd": stage_linear, "linear_fwd": stage_linear,
               "consistency": stage_consistency, "train_step": stage_train_step}


def finish_stage(run: Run, stage: str) -> str:
    """Plots and the stage's README from its CSVs; returns what the stage left, in words."""
    from benchmarks import plot
    from benchmarks import report

    folder = run.work / stage
    rows = skipped = 0
    for path in sorted(folder.glob("*.csv")):
        path_rows, notes = report.load(path)
        rows += len(path_rows)
        skipped += len(notes.get("skipped", []))
        try:
            plot.plot_csv(path)
        except Exception as exc:  # a plot that fails must not cost the measured numbers
            run.log(f"[{stage}] plot of {path.name} failed: {type(exc).__name__}: {exc}")
    if any(folder.glob("*.csv")):
        (folder / "README.md").write_text(report.render(folder))
    if (folder / "summary.json").exists():
        return "tests " + json.loads((folder / "summary.json").read_text())["verdict"]
    return f"{rows} rows, {skipped} not timed (see the notes)"


# ---------------------------------------------------------------- collect (back home)


def collect(src: Path, into: Path) -> list[Path]:
    """Merges the CSVs of every ``<stage>.tar.gz`` in ``src`` into ``into`` (rows of the same
    case replaced), then regenerates the plots and the READMEs there."""
    from benchmarks import harness
    from benchmarks import plot
    from benchmarks import report

    bundles = sorted(src.glob("*.tar.gz"), key=lambda p: STAGES.index(p.name[:-7]) if p.name[:-7] in STAGES else len(STAGES))
    if not bundles:
        raise SystemExit(f"--collect: expected <stage>.tar.gz files from the runbook in {src}, found none")
    merged, record = set(), {}
    with tempfile.TemporaryDirectory(prefix="icrm_collect_") as tmp:
        for path in bundles:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
        rehearsal = [p.parent.name for p in Path(tmp).glob("*/env.json") if json.loads(p.read_text()).get("dry_run")]
        if rehearsal and into.resolve() == RESULTS_DIR.resolve():
            raise SystemExit(f"--collect: the bundles of {', '.join(sorted(rehearsal))} come from a --dry-run; they are "
                             f"not merged into {into} (name another folder with --into)")
        for stage in STAGES:
            for csv_path in sorted((Path(tmp) / stage).glob("*.csv")):
                rows, notes = report.load(csv_path)
                stem, kind = csv_path.stem.rsplit("_", 1)
                merged.add(harness.write_results(stem, kind, rows, notes, into, append=True))
            for name, key in (("summary.json", "tests"), ("targets.json", "targets"), ("env.json", "env")):
                if (Path(tmp) / stage / name).exists():
                    record.setdefault(key, json.loads((Path(tmp) / stage / name).read_text()))
    if record:
        # What the README's runbook section says of the run: machine, versions, tests, targets.
        record["env"].pop("child_env", None)
        (into / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record, indent=1))
    for path in sorted(merged):
        plot.plot_csv(path)
    # the shipped results (--update-results) also refresh the README's Performance section
    report.main(["--update-results"] if into.resolve() == RESULTS_DIR.resolve() else [str(into)])
    return sorted(merged)


# ---------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, PyTorch implementations only")
    parser.add_argument("--out", default=None, help="where the bundles go (default: $OUT, else runs/gpu)")
    parser.add_argument("--wheels", default=str(REPO_ROOT / ".whl"), help="folder of the carried peer wheels")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--time-budget-s", type=float, default=560.0,
                        help="this call's wall-clock budget (the device tool stops a call at 600 s)")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's budget (repeatable)")
    parser.add_argument("--shapes", default=None, metavar="NxDxV,...",
                        help="run only these shapes in the linear stages (e.g. to finish a sweep a budget cut short)")
    parser.add_argument("--collect", default=None, metavar="DIR",
                        help="merge the bundles in DIR into --into and regenerate the plots and reports there")
    into = parser.add_mutually_exclusive_group()
    into.add_argument("--into", default=str(RUNS_DIR), help="results folder for --collect (default: %(default)s)")
    into.add_argument("--update-results", action="store_true",
                      help="--collect into the shipped benchmarks/results and regenerate the README's Performance section")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: expected a comma-separated subset of {','.join(STAGES)}, got {','.join(unknown)}")
    args.stage_list = [s for s in STAGES if s in stages]  # always in runbook order
    overrides = {}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            overrides[name] = float(seconds)
        except ValueError:
            parser.error(f"--budget: expected STAGE=SECONDS, got {item!r}")
        if name not in STAGES:
            parser.error(f"--budget: expected a stage of {','.join(STAGES)}, got {name!r}")
    args.overrides = overrides
    if args.shapes is None:
        args.shape_list = None
    else:
        from benchmarks.bench_linear_logprobs import parse_shapes

        args.shape_list = parse_shapes(args.shapes)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.collect:
        collect(Path(args.collect), RESULTS_DIR if args.update_results else Path(args.into))
        return 0
    start = time.monotonic()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is initialised: CPU even on a GPU machine
    out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "runs" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icrm_runbook_"))
    log = Log(out / "runbook.log")
    log(f"== gpu_runbook {'--dry-run ' if args.dry_run else ''}stages {','.join(args.stage_list)}; "
        f"out {out}; work {work}; call budget {args.time_budget_s:.0f} s")
    profile = DRY if args.dry_run else _gpu_profile()
    site = work / "site"
    peers_skipped = install_peers(Path(args.wheels), site, log)
    if args.dry_run:
        for impl in PEERS:
            peers_skipped.setdefault(impl, "not in the dry run (CPU, tiny shapes, PyTorch implementations only)")
    pythonpath = [str(site)] if site.exists() else []
    child = {"PYTHONPATH": os.pathsep.join(pythonpath + [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if args.dry_run:
        child.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env = versions(site if site.exists() else None)
    env.update(dry_run=args.dry_run, peers_skipped=peers_skipped, child_env=child)
    # The project runs from the working tree (no build, no download): check that it imports there.
    probe = subprocess.run([sys.executable, "-c", "import icrm, icrm_kernels; print(icrm_kernels.__file__)"],
                           cwd=REPO_ROOT, env=child_env(child), capture_output=True, text=True)
    if probe.returncode != 0:
        log(f"the project does not import from {REPO_ROOT}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        return 2
    env["icrm_kernels"] = probe.stdout.strip()
    if not args.dry_run and env["gpu"] is None:
        log("no CUDA GPU visible: use --dry-run for the CPU rehearsal")
        return 2
    log("versions: " + json.dumps({k: v for k, v in env.items() if k != "child_env"}))
    run = Run(args, profile, out, work, log, env, peers_skipped, deadline=start + args.time_budget_s)
    budgets = stage_budgets(args.stage_list, profile.budgets, args.time_budget_s, args.overrides)
    for stage in args.stage_list:
        folder = work / stage
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        log.stage_path = folder / "log.txt"
        t0 = time.monotonic()
        log(f"== stage {stage}: budget {budgets[stage]:.0f} s, {run.deadline - t0:.0f} s left in this call")
        bundle(run, stage)
        STAGE_FUNCS[stage](run, stage, budgets[stage])
        left = finish_stage(run, stage)
        log(f"== stage {stage} done in {time.monotonic() - t0:.0f} s: {left} -> {out / (stage + '.tar.gz')}")
        log.stage_path = None
        bundle(run, stage)
    log(f"== gpu_runbook done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
