"""Where the benchmark scripts write: ``runs/benchmarks/`` (git-ignored) unless told otherwise.

The shipped results in ``benchmarks/results/`` and the README sections generated from them
change only when a script is given ``--update-results``: a smoke run (``--tiny``, ``--quick``)
or a report of a scratch folder never overwrites them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The shipped results (tracked): written only with ``--update-results``.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Where every benchmark, report and plot writes by default (git-ignored).
RUNS_DIR = REPO_ROOT / "runs" / "benchmarks"
#: The top README, whose Performance section ``report.py --update-results`` regenerates.
README = REPO_ROOT / "README.md"


def add_output_args(parser: argparse.ArgumentParser, what: str = "results") -> None:
    """``--out`` and ``--update-results``, the same for every script (see :func:`output_dir`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", default=None,
                       help=f"{what} folder (default: {RUNS_DIR.relative_to(REPO_ROOT)}/, git-ignored)")
    group.add_argument("--update-results", action="store_true",
                       help=f"write the shipped {RESULTS_DIR.relative_to(REPO_ROOT)}/ (and the README sections "
                            "generated from it) instead")


def output_dir(args: argparse.Namespace) -> Path:
    """The folder a script writes: ``--out``, the shipped results with ``--update-results``,
    else ``runs/benchmarks/``: a run never overwrites the shipped results by accident."""
    if getattr(args, "update_results", False):
        return RESULTS_DIR
    return Path(args.out) if getattr(args, "out", None) else RUNS_DIR
