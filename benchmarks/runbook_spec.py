"""What the GPU runbook runs (stages, budgets, the device tool's calls) and the README section
that describes it: data and text only, imported by both ``gpu_runbook.py`` (which runs the
stages) and ``report.py`` (which renders the section), so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

STAGES = ("tests", "target", "linear_bwd", "linear_fwd", "consistency", "train_step")
STAGE_WHAT = {
    "tests": "`pytest -m cuda tests`: the CUDA kernel tests",
    "target": "`linear_logprobs_and_rewards` at N=16384, D=4096, V=128256, bf16, fwd+bwd then fwd, every "
              "implementation and the bare cuBLAS GEMMs (`cublas_3gemm`, `cublas_1gemm`); the issue's targets checked "
              "on these rows (`targets.json`), the goals against the bare GEMMs included",
    "linear_bwd": "the sweep's fwd+bwd: both ops, N in {4096, 16384} x D in {2048, 4096} x V in {32000, 128256, "
                  "256000} + the ICRM paper shape (6144, 2048, 256000), bf16, smallest shapes first; every row "
                  "also as a ratio to the bare 3-GEMM time of its shape",
    "linear_fwd": "the same sweep, fwd",
    "consistency": "`consistency_loss` fwd+bwd, padded and packed, 64k to 4M tokens",
    "train_step": "one ICRM step of a Llama-3.2-1B-shaped config (ours vs eager), then the longest sequence "
                  "that fits, until the budget runs out",
}
#: Wall-clock seconds per stage on the GPU: 22.5 minutes together, so that with the machine's start,
#: the transfers and each call's setup the run stays within the issue's 25 minutes.
GPU_BUDGETS = {"tests": 150, "target": 240, "linear_bwd": 480, "linear_fwd": 180, "consistency": 90,
               "train_step": 210}
#: The device tool's calls, in order: each stays within one call's 10 minutes.
CALLS = ("tests,target", "linear_bwd", "linear_fwd,consistency", "train_step")
#: What ``--collect`` keeps of a run beside the CSVs (versions, the tests' summary, the targets).
RECORD = "gpu_runbook.json"


def runbook_section(results_dir: Path) -> list[str]:
    """The "GPU runbook" section of ``benchmarks/results/README.md`` (``report.py`` renders it),
    with what ``--collect`` recorded of the last run in ``results_dir``."""
    calls = []
    for i, stages in enumerate(CALLS, 1):
        names = stages.split(",")
        calls.append([i, f"`python3 -m benchmarks.gpu_runbook --stages {stages}`",
                      ", ".join(f"{s} ({GPU_BUDGETS[s]} s)" for s in names),
                      f"at most {sum(GPU_BUDGETS[s] for s in names) / 60:.1f} min + setup"])
    lines = ["## GPU runbook", "",
             "`benchmarks/gpu_runbook.py` is everything a lent GPU machine (H100/H200, torch, Triton and "
             "transformers preinstalled, no package registry) should run, ready so that its time goes to measuring. "
             "Beforehand, on a machine with the package registry: `bash benchmarks/fetch_wheels.sh` (fills the "
             "git-ignored `.whl/` with the liger-kernel and cut-cross-entropy wheels, about 1 MB).", "",
             "The device tool's calls, in order and back to back (a machine stays warm only briefly between calls), "
             "each with `carry: [\".whl\"]` and `timeout_s: 600`; every call first installs the wheels and prints the "
             "versions (setup, well under a minute), since a call may get a fresh machine. The budgets add up to "
             f"{sum(GPU_BUDGETS.values()) / 60:.1f} minutes, leaving room in the issue's 25 for the machine's start "
             "and the transfers:", ""]
    lines += ["| call | command | stages (budget) | expected |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in calls] + [""]
    lines += ["| stage | what |", "|---|---|"] + [f"| `{s}` | {STAGE_WHAT[s]} |" for s in STAGES] + [""]
    lines += ["A stage skips what its budget cannot afford (smallest shapes first, so a cut keeps the rest; notes "
              "say `budget: ...`); `--time-budget-s` (560 s) bounds one call. What comes back: `$OUT/<stage>.tar.gz` "
              "per stage (CSV, notes, plots, the stage's README, `env.json`, its log; `junit.xml` for the tests, "
              "`targets.json` for the target) and `$OUT/runbook.log`, rewritten as each stage goes, so a call that is "
              "cut off still returns what it measured. Then, here:", "",
              "```", "python -m benchmarks.gpu_runbook --collect DIR_WITH_THE_RETURNED_FILES   # into runs/benchmarks: "
              "look first", "python -m benchmarks.gpu_runbook --collect DIR_WITH_THE_RETURNED_FILES --update-results   "
              "# into benchmarks/results + README", "```", "",
              "Shapes that a budget skipped can be run in a later call: "
              "`python3 -m benchmarks.gpu_runbook --stages linear_bwd --shapes 16384x4096x256000`. "
              "`python -m benchmarks.gpu_runbook --dry-run` rehearses every stage on the CPU with tiny shapes "
              "(`tests/test_gpu_runbook.py` runs it in CI).", ""]
    if (results_dir / RECORD).exists():
        rec = json.loads((results_dir / RECORD).read_text())
        env, tests = rec.get("env", {}), rec.get("tests")
        gpu = env.get("gpu") or {}
        lines += [f"**Last collected run** ({'dry run, ' if env.get('dry_run') else ''}{gpu.get('name', 'no GPU')}, "
                  f"torch {env.get('torch')}, Triton {env.get('triton')}, liger-kernel {env.get('liger-kernel')}, "
                  f"cut-cross-entropy {env.get('cut-cross-entropy')}, commit {env.get('commit') or 'unknown'}): "
                  + ("CUDA tests not run" if not tests else
                     f"CUDA tests {tests['verdict']} ({tests.get('tests', '?')} collected, {tests.get('failures', '?')} "
                     f"failed, {tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped, "
                     f"{tests['seconds']:.0f} s)") + ".", ""]
        for c in (rec.get("targets") or {}).get("checks", []):
            verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
            lines.append(f"- {c['target']}: {c['value']}: **{verdict}**")
        lines.append("")
    return lines
