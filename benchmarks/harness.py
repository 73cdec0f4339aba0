"""The one benchmark harness every ``bench_*.py`` script uses.

A benchmark script describes *cases* (one op, one implementation, one pass, one shape) and
how to build a callable for each; the harness does the rest:

* **Isolation.** Every implementation runs in its own worker subprocess (``--worker``), so
  peak memory of one implementation never leaks into another's number, and a crash or an
  out-of-memory kill of one worker costs only that case.
* **Correctness before timing.** The oracle implementation (ours, ``reference``) runs first
  and stores its outputs; every other implementation's first call is compared with them
  (tolerance by dtype) and an implementation that disagrees is reported, never timed.
* **Timing.** GPU: ``triton.testing.do_bench`` (median, p20, p80). CPU: a timed loop after a
  warm-up call, as many repetitions as fit in a time budget (at least one).
* **Memory.** ``peak_mb`` is the memory a call needs *beyond its inputs*: GPU
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was
  allocated before the call; CPU peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the RSS of the same process holding only the inputs.
  Gradient outputs count as the call's memory. The absolute peaks go to the notes file.
* **Out-of-memory is a result**: the row gets ``OOM`` in ``ms``.
* **GEMM peak.** ``gemm_frac`` is the achieved TFLOP/s over the TFLOP/s of ``torch.matmul``
  on ``[N, D] x [D, V]`` measured in the same run (bf16 on GPU as HOUSE_STYLE asks; on CPU
  in the case's dtype, because a CPU's bf16 GEMM is no peak to compare with).

Results: long-format CSV with exactly :data:`COLUMNS` in ``<out>/<stem>_<kind>.csv``
(``kind`` = ``cpu`` or ``cuda``) and a ``.notes.json`` beside it (skipped implementations with
their reasons, absolute memory, repetitions, machine). ``<out>`` is ``runs/benchmarks/``
(git-ignored) unless ``--out`` names another folder; only ``--update-results`` writes the
shipped ``benchmarks/results/`` (:func:`parse`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.paths import REPO_ROOT, RESULTS_DIR, RUNS_DIR, add_output_args, output_dir  # noqa: F401

COLUMNS = [
    "op", "impl", "pass", "N", "D", "V", "dtype", "ms", "ms_p20", "ms_p80",
    "peak_mb", "tflops", "gemm_frac", "device", "torch", "triton", "commit",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: Correctness tolerance per dtype: ``max|got - want| <= atol + rtol * max|want|``.
TOLERANCE = {"fp64": (1e-10, 1e-10), "fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 2e-2)}
#: Outputs larger than this are compared on a fixed random sample of their elements, so
#: the oracle's stored outputs stay small even at GPU sweep shapes.
FULL_COMPARE_ELEMENTS = 1 << 24
SAMPLE_ELEMENTS = 1 << 22
ROW_TAG = "@@BENCH "
MB = 1024.0 * 1024.0


class Skip(Exception):
    """An implementation that cannot run here; the message is the reason."""


# ---------------------------------------------------------------- machine and versions


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(kind: str) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # a missing or broken triton is a fact to record, not a failure
        return ""


def git_commit() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on the machine (a bare GPU box): the commit is unknown, not an error
            return ""

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return ""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "icrm_kernels", "icrm")
    return sha + ("-dirty" if dirty else "")


def environment(kind: str) -> dict:
    return {"device": device_name(kind), "torch": torch.__version__, "triton": triton_version(), "commit": git_commit()}


# ---------------------------------------------------------------- memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak(kind: str) -> float:
    """Free what can be freed, reset the peak counter and return the current usage in MB."""
    gc.collect()
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MB
    _malloc_trim()
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_since_reset(kind: str) -> float:
    if kind == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MB
    return _status_mb("VmHWM")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


def compile_fn(fn):
    """``torch.compile(fn)`` with room for one graph per swept shape and grad mode.

    A worker runs every shape of one implementation; past dynamo's default recompile
    limit (8) it would silently fall back to eager and time the wrong thing.
    """
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    return torch.compile(fn)


# ---------------------------------------------------------------- timing


def time_cpu(fn: Callable[[], object], budget_s: float, max_reps: int, first_ms: float,
             cpu_times: list[float] | None = None) -> list[float]:
    """Timed loop: as many calls as fit in ``budget_s`` (estimated from the warm-up), >= 1.

    Returns wall times (ms); appends the process CPU time of each call (ms, all threads) to
    ``cpu_times``: on a CPU shared with other jobs it tracks the work done better than wall time.
    """
    reps = max(1, min(max_reps, int(budget_s * 1000.0 / max(first_ms, 1e-3))))
    times = []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
        if cpu_times is not None:
            cpu_times.append((time.process_time() - cpu_start) * 1000.0)
    return times


def time_gpu(fn: Callable[[], object]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    ms, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80


def quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), cuts[1], cuts[7]


def gemm_tflops(n: int, d: int, v: int, dtype: torch.dtype, kind: str, budget_s: float = 2.0) -> float:
    """Achieved TFLOP/s of ``torch.matmul`` on ``[N, D] x [D, V]`` (bf16 on GPU)."""
    dtype = torch.bfloat16 if kind == "cuda" else dtype
    a = torch.randn(n, d, device=kind, dtype=dtype)
    b = torch.randn(d, v, device=kind, dtype=dtype)
    try:
        if kind == "cuda":
            ms = time_gpu(lambda: torch.matmul(a, b))[0]
        else:
            start = time.perf_counter()
            torch.matmul(a, b)
            first = (time.perf_counter() - start) * 1000.0
            # The fastest of a few calls: a peak, and less hurt by other jobs than a median.
            ms = min(time_cpu(lambda: torch.matmul(a, b), budget_s, 5, first) + [first])
    except Exception as exc:
        if is_oom(exc):
            return float("nan")
        raise
    finally:
        del a, b
        reset_peak(kind)
    return 2.0 * n * d * v / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------- correctness


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself (float64, CPU) or, when huge, a fixed random sample of it."""
    flat = t.detach().reshape(-1)
    if flat.numel() > FULL_COMPARE_ELEMENTS:
        gen = torch.Generator().manual_seed(1234)
        idx = torch.randint(0, flat.numel(), (SAMPLE_ELEMENTS,), generator=gen).to(flat.device)
        flat = flat[idx]
    return flat.double().cpu()


def fingerprints(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: _fingerprint(t) for name, t in outputs.items()}


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> str | None:
    """None when every output matches the oracle, else a message naming the first mismatch."""
    atol, rtol = TOLERANCE[dtype]
    for name, ref in want.items():
        if name not in got:
            return f"{name}: missing"
        mine = got[name]
        if mine.shape != ref.shape:
            return f"{name}: shape {tuple(mine.shape)} != oracle {tuple(ref.shape)}"
        if not torch.equal(torch.isfinite(mine), torch.isfinite(ref)):
            return f"{name}: non-finite values where the oracle has none (or the reverse)"
        fin = torch.isfinite(ref)
        if not bool(fin.any()):
            continue
        err = (mine[fin] - ref[fin]).abs().max().item()
        bound = atol + rtol * ref[fin].abs().max().item()
        if err > bound:
            return f"{name}: max|diff| = {err:.3g} > {bound:.3g} (atol {atol:g} + rtol {rtol:g} * max|oracle|)"
    return None


# ---------------------------------------------------------------- cases and rows


@dataclass
class Case:
    op: str
    impl: str
    pass_: str
    N: int
    D: int | None
    V: int | None
    dtype: str
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        """Identifies the inputs and expected outputs (everything except ``impl``)."""
        bits = [self.op, self.pass_, str(self.N), str(self.D), str(self.V), self.dtype]
        bits += [f"{k}={v}" for k, v in sorted(self.extra.items())]
        return "|".join(bits)

    def label(self) -> str:
        """How notes and logs name the case."""
        return f"{self.op} {self.impl} {self.pass_} N={self.N} D={self.D} V={self.V} {self.dtype}"

    def to_json(self) -> dict:
        return {"op": self.op, "impl": self.impl, "pass": self.pass_, "N": self.N, "D": self.D,
                "V": self.V, "dtype": self.dtype, "extra": self.extra}

    @staticmethod
    def from_json(obj: dict) -> "Case":
        return Case(obj["op"], obj["impl"], obj["pass"], obj["N"], obj["D"], obj["V"], obj["dtype"], obj.get("extra", {}))


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def make_row(case: Case, env: dict, ms="", p20="", p80="", peak_mb=None, flops=None, gemm=None) -> dict:
    tflops = None
    if flops and isinstance(ms, float):
        tflops = flops / (ms * 1e-3) / 1e12
    frac = tflops / gemm if (tflops is not None and gemm and not math.isnan(gemm)) else None
    return {
        "op": case.op, "impl": case.impl, "pass": case.pass_, "N": case.N, "D": _fmt(case.D), "V": _fmt(case.V),
        "dtype": case.dtype, "ms": _fmt(ms, 5) if ms != "OOM" else "OOM", "ms_p20": _fmt(p20, 5),
        "ms_p80": _fmt(p80, 5), "peak_mb": _fmt(peak_mb, 5), "tflops": _fmt(tflops),
        "gemm_frac": _fmt(frac, 3), **env,
    }


@dataclass
class Benchmark:
    """What a bench script tells the harness.

    ``build(case, device)`` returns a zero-argument callable that runs the case once and
    returns its outputs as ``{name: tensor}`` (gradients included for ``fwd+bwd``); it
    raises :class:`Skip` when the implementation cannot run here. Calls must be
    repeatable (the callable resets any gradients it accumulates).
    ``flops(case)`` gives the FLOPs of one call, or None. ``oracle`` names the
    implementation every other one is checked against. ``gemm_peak``: measure the
    ``[N, D] x [D, V]`` GEMM for ``gemm_frac``.
    """

    stem: str
    module: str                  # the script as a module (``benchmarks.bench_x``): workers run ``python -m`` it
    build: Callable[[Case, str], Callable[[], dict]]
    flops: Callable[[Case], float | None] = lambda case: None
    oracle: str = "reference"
    gemm_peak: bool = True
    #: Implementations whose first call costs what later calls cost (no compilation, no
    #: lazily created state): on CPU, their checked first call may be the timed sample.
    first_call_is_steady: tuple = ()
    #: Implementations that are timed but not checked (bounds such as the bare GEMMs: they
    #: compute something else than the op).
    unchecked_impls: tuple = ()


# ---------------------------------------------------------------- worker (one implementation)


def run_worker(bench: Benchmark, cases: list[Case], expected_dir: Path, kind: str, budget_s: float, max_reps: int) -> None:
    """Runs ``cases`` (all of one implementation) here and prints one tagged JSON line per case."""
    torch.manual_seed(0)
    for case in cases:
        result = _run_one(bench, case, expected_dir, kind, budget_s, max_reps)
        print(ROW_TAG + json.dumps(result), flush=True)


def _emit(case, status, **kw):
    return {"case": case.to_json(), "status": status, **kw}


def _run_one(bench, case, expected_dir, kind, budget_s, max_reps):
    device = "cuda" if kind == "cuda" else "cpu"
    key_file = expected_dir / (hashlib.sha1(case.key().encode()).hexdigest()[:16] + ".pt")
    want = None
    # ``unchecked`` cases repeat a checked case's code at another size (e.g. a memory probe).
    checked = not case.extra.get("unchecked", False) and case.impl not in bench.unchecked_impls
    if checked and case.impl != bench.oracle:
        if not key_file.exists():
            return _emit(case, "skipped", reason=f"no {bench.oracle} output to check against (it failed or was not run)")
    try:
        fn = bench.build(case, device)
        first_base = reset_peak(kind)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if kind == "cuda":
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - start) * 1000.0
        first_cpu_ms = (time.process_time() - cpu_start) * 1000.0
        first_peak = peak_since_reset(kind)
        got = fingerprints(out)
        del out
    except Skip as exc:
        return _emit(case, "skipped", reason=str(exc))
    except Exception as exc:
        if is_oom(exc):
            return _emit(case, "oom", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
        return _emit(case, "skipped", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    if not checked:
        pass
    elif case.impl == bench.oracle:
        torch.save(got, key_file)
    else:
        # Loaded only now, so that it is in no process's peak or baseline.
        want = torch.load(key_file)
        mismatch = compare(got, want, case.dtype)
        if mismatch is not None:
            return _emit(case, "mismatch", reason=f"output disagrees with {bench.oracle}: {mismatch}")
    del got, want
    if kind == "cpu" and case.impl in bench.first_call_is_steady and first_ms >= budget_s * 1000.0:
        # A call longer than the whole budget, with nothing to compile or initialise lazily:
        # the checked first call is the one timed sample (saves a long repeat on CPU).
        return _emit(case, "ok", ms=first_ms, p20=first_ms, p80=first_ms, peak_mb=first_peak - first_base,
                     peak_abs_mb=first_peak, baseline_mb=first_base, reps=1, first_ms=first_ms, cpu_ms=first_cpu_ms)
    try:
        # Peak memory of steady-state calls (after warm-up / compilation), then timing.
        baseline_mb = reset_peak(kind)
        if kind == "cuda":
            fn()
            peak_abs = peak_since_reset(kind)
            ms, p20, p80 = time_gpu(fn)
            reps = cpu_ms = None
        else:
            cpu_times = []
            times = time_cpu(fn, budget_s, max_reps, first_ms, cpu_times)
            peak_abs = peak_since_reset(kind)
            ms, p20, p80 = quantiles(times)
            reps, cpu_ms = len(times), statistics.median(cpu_times)
    except Exception as exc:
        if is_oom(exc):
            return _emit(case, "oom", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
        return _emit(case, "skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    return _emit(case, "ok", ms=ms, p20=p20, p80=p80, peak_mb=peak_abs - baseline_mb, peak_abs_mb=peak_abs,
                 baseline_mb=baseline_mb, reps=reps, first_ms=first_ms, cpu_ms=cpu_ms)


# ---------------------------------------------------------------- driver


def _launch(bench: Benchmark, cases: list[Case], expected_dir: Path, kind: str, budget_s: float, max_reps: int,
            worker_args: list[str]) -> tuple[list[dict], int, str]:
    payload = json.dumps({"cases": [c.to_json() for c in cases], "expected_dir": str(expected_dir),
                          "budget_s": budget_s, "max_reps": max_reps})
    env = dict(os.environ)
    # Return every allocation above 128 KiB to the OS on free, so RSS tracks live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen([sys.executable, "-m", bench.module, "--worker", payload, *worker_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    results = []
    for line in proc.stdout:
        if line.startswith(ROW_TAG):
            results.append(json.loads(line[len(ROW_TAG):]))
    stderr = proc.stderr.read()
    proc.wait()
    return results, proc.returncode, stderr


def run_cases(bench: Benchmark, cases: list[Case], kind: str, budget_s: float, max_reps: int,
              worker_args: list[str] = (), on_progress: Callable[[list, dict], None] | None = None
              ) -> tuple[list[dict], dict]:
    """Runs every case, one worker process per implementation (oracle first).

    Returns the CSV rows and the notes (skipped/mismatch/OOM reasons, absolute memory);
    ``on_progress(rows, notes)`` gets them so far after each implementation (see :func:`saver`).
    """
    env = environment(kind)
    notes = {"device": env["device"], "kind": kind, "peak_mb": _PEAK_MEANING[kind], "skipped": [], "cases": []}
    rows = []
    gemm_cache: dict = {}
    by_impl: dict[str, list[Case]] = {}
    for case in cases:
        by_impl.setdefault(case.impl, []).append(case)
    order = sorted(by_impl, key=lambda impl: impl != bench.oracle)
    with tempfile.TemporaryDirectory(prefix="icrm_bench_") as tmp:
        for impl in order:
            pending, collected = list(by_impl[impl]), []
            t0 = time.perf_counter()
            while pending:
                results, rc, stderr = _launch(bench, pending, Path(tmp), kind, budget_s, max_reps, list(worker_args))
                done = {Case.from_json(r["case"]).key() for r in results}
                if rc != 0 and len(results) < len(pending):
                    # The worker died on the first unfinished case: killed (OOM) or crashed.
                    dead = next(c for c in pending if c.key() not in done)
                    status = "oom" if rc in (-9, 137) else "skipped"
                    tail = stderr.strip().splitlines()[-1:] or [""]
                    results.append(_emit(dead, status, reason=f"worker exited with {rc}: {tail[0][:300]}"))
                    done.add(dead.key())
                collected += results
                pending = [c for c in pending if c.key() not in done]
            print(f"[{bench.stem}] {impl}: {time.perf_counter() - t0:.1f} s", flush=True)
            _collect(bench, collected, rows, notes, env, kind, gemm_cache)
            if on_progress is not None:
                on_progress(rows, notes)
    return rows, notes


_PEAK_MEANING = {
    "cpu": "peak RSS of the worker process during the timed calls minus its RSS holding only the inputs (MB)",
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory allocated before it (inputs) (MB)",
}


def _collect(bench, results, rows, notes, env, kind, gemm_cache):
    for res in results:
        case = Case.from_json(res["case"])
        status = res["status"]
        label = case.label()
        if status == "ok":
            gemm = None
            if bench.gemm_peak and case.D and case.V:
                shape = (case.N, case.D, case.V, case.dtype)
                if shape not in gemm_cache:
                    gemm_cache[shape] = gemm_tflops(case.N, case.D, case.V, DTYPES[case.dtype], kind)
                gemm = gemm_cache[shape]
            rows.append(make_row(case, env, res["ms"], res["p20"], res["p80"], res["peak_mb"], bench.flops(case), gemm))
            notes["cases"].append({"label": label, "peak_abs_mb": round(res["peak_abs_mb"], 1),
                                   "baseline_mb": round(res["baseline_mb"], 1), "reps": res["reps"],
                                   "first_ms": round(res["first_ms"], 2), "gemm_tflops": gemm,
                                   "cpu_ms": None if res.get("cpu_ms") is None else round(res["cpu_ms"], 2)})
            print(f"  {label}: {res['ms']:.2f} ms, +{res['peak_mb']:.0f} MB", flush=True)
        elif status == "oom":
            rows.append(make_row(case, env, ms="OOM"))
            notes["skipped"].append({"label": label, "status": "OOM", "reason": res["reason"]})
            print(f"  {label}: OOM ({res['reason']})", flush=True)
        else:
            notes["skipped"].append({"label": label, "status": status, "reason": res["reason"]})
            print(f"  {label}: {status.upper()}: {res['reason']}", flush=True)


def row_key(row: dict) -> tuple:
    """What identifies a case's row in a CSV (everything but the measurements and machine)."""
    return tuple(str(row[k]) for k in ("op", "impl", "pass", "N", "D", "V", "dtype"))


def write_results(stem: str, kind: str, rows: list[dict], notes: dict, out_dir: Path = RUNS_DIR,
                  append: bool = False) -> Path:
    """Writes ``<stem>_<kind>.csv`` (exactly :data:`COLUMNS`) and its ``.notes.json``.

    ``append`` merges into an existing file (a sweep split over several runs, or one run that
    saves as it goes): rows of the same case are replaced, notes lists extended by the entries
    they do not hold yet, other notes keys kept unless ``notes`` gives them anew.
    """
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}_{kind}.csv"
    notes_path = path.with_suffix(".notes.json")
    if append and path.exists():
        with path.open() as fh:
            old_rows = list(csv.DictReader(fh))
        new_keys = {row_key(r) for r in rows}
        rows = [r for r in old_rows if row_key(r) not in new_keys] + rows
        if notes_path.exists():
            old_notes = json.loads(notes_path.read_text())
            notes = {**old_notes, **notes}
            for name in ("skipped", "cases"):
                old_list = old_notes.get(name, [])
                notes[name] = old_list + [entry for entry in notes.get(name, []) if entry not in old_list]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    notes_path.write_text(json.dumps(notes, indent=1) + "\n")
    print(f"wrote {path} ({len(rows)} rows)", flush=True)
    return path


def saver(stem: str, kind: str, out_dir: Path, append: bool = False) -> Callable[[list, dict], None]:
    """``save(rows, notes)`` that writes the results so far (:func:`write_results`) each time it
    is called, so that a run cut off later keeps them; the first call replaces an existing file
    unless ``append``, later calls merge into what the earlier ones wrote."""
    state = {"append": append}

    def save(rows: list, notes: dict) -> None:
        # A copy: write_results merges into the notes it is given.
        write_results(stem, kind, list(rows), json.loads(json.dumps(notes)), out_dir, append=state["append"])
        state["append"] = True

    return save


def worker_main(bench: Benchmark, argv: list[str]) -> bool:
    """If ``argv`` asks for a worker, run it and return True (the script then exits)."""
    if "--worker" not in argv:
        return False
    payload = json.loads(argv[argv.index("--worker") + 1])
    cases = [Case.from_json(c) for c in payload["cases"]]
    run_worker(bench, cases, Path(payload["expected_dir"]), device_kind(), payload["budget_s"], payload["max_reps"])
    return True


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the small CPU shape set (a few minutes on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--impls", default=None, help="comma-separated implementations to run (default: all)")
    add_output_args(parser)
    parser.add_argument("--budget-s", type=float, default=None, help="CPU: seconds of timed calls per case")
    parser.add_argument("--append", action="store_true", help="merge into the existing CSV (a sweep split over runs)")
    return parser



def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``args.out`` resolved by :func:`output_dir` (a str)."""
    args = parser.parse_args(argv)
    args.out = str(output_dir(args))
    return args
