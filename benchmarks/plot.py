"""Time and memory vs N (and vs V where the CSV sweeps it) per implementation, one PNG per op.

Reads every measured CSV of the results folder (``runs/benchmarks/`` unless ``--out`` names
one; the shipped ``benchmarks/results/`` with ``--update-results``; not the ``predicted_*.csv``
of ``predict.py``), or the CSV files given, and writes, next to each,
``<csv stem>__<op>__vsN.png`` and, when several vocabularies were measured at one N,
``<csv stem>__<op>__vsV.png``: one row of panels per pass, time (ms) on the left, peak
memory (MB, as the CSV defines it) on the right, log-log axes. OOM rows are left out.

Usage::

    python -m benchmarks.plot [--out DIR | --update-results] [DIR/linear_logprobs_cpu.csv ...]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.paths import add_output_args, output_dir  # noqa: E402
from benchmarks.report import measured_csvs  # noqa: E402

IMPL_ORDER = ("triton", "reference", "ours", "eager", "compile", "torch_linear_ce", "liger", "cce")


def read_rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _impl_key(impl: str):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def _panel_grid(rows, axis: str, fixed: tuple[str, ...], title: str, out: Path) -> bool:
    """One figure: a row per pass, columns time and memory, a line per impl vs ``axis``."""
    passes = sorted({r["pass"] for r in rows})
    by_x = defaultdict(list)
    for r in rows:
        ms, mb, x = _num(r["ms"]), _num(r["peak_mb"]), _num(r[axis])
        if ms is not None and x is not None:
            by_x[(r["pass"], r["impl"], x)].append((ms, mb))
    # Repeated measurements of one point (A/B rounds, probes) are drawn as their median.
    series = defaultdict(list)
    for (pass_, impl, x), points in by_x.items():
        mbs = [p[1] for p in points if p[1] is not None]
        series[(pass_, impl)].append((x, statistics.median(p[0] for p in points), statistics.median(mbs) if mbs else None))
    if not any(len({p[0] for p in points}) > 1 for points in series.values()):
        return False
    fig, axes = plt.subplots(len(passes), 2, figsize=(11, 3.6 * len(passes)), squeeze=False)
    for i, pass_ in enumerate(passes):
        impls = sorted({impl for (p, impl) in series if p == pass_}, key=_impl_key)
        for impl in impls:
            points = sorted(series[(pass_, impl)])
            xs = [p[0] for p in points]
            axes[i][0].plot(xs, [p[1] for p in points], marker="o", label=impl)
            mem = [(x, p[2]) for x, p in zip(xs, points) if p[2] is not None and p[2] > 0]
            if mem:
                axes[i][1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
        for j, ylabel in enumerate(("time per call (ms)", "peak memory beyond inputs (MB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis + (" (tokens)" if axis == "N" else " (vocabulary)"))
            ax.set_ylabel(ylabel)
            ax.set_title(f"{pass_}: {ylabel.split(' (')[0]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}  [{', '.join(fixed)}]", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return True


def plot_csv(path: Path) -> list[Path]:
    rows = read_rows(path)
    written = []
    device = rows[0]["device"] if rows else ""
    for op in sorted({r["op"] for r in rows}):
        op_rows = [r for r in rows if r["op"] == op]
        # vs N at the most common (D, V, dtype); vs V at the most common (N, D, dtype).
        for axis, keys in (("N", ("D", "V", "dtype")), ("V", ("N", "D", "dtype"))):
            common = Counter(tuple(r[k] for k in keys) for r in op_rows).most_common(1)
            if not common:
                continue
            fixed_values = common[0][0]
            subset = [r for r in op_rows if tuple(r[k] for k in keys) == fixed_values]
            fixed = tuple(f"{k}={v}" for k, v in zip(keys, fixed_values) if v)
            out = path.with_name(f"{path.stem}__{op}__vs{axis}.png")
            if _panel_grid(subset, axis, fixed, f"{op} on {device}", out):
                written.append(out)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csvs", nargs="*", help="CSV files to plot (default: every measured CSV of the folder)")
    add_output_args(parser, "folder whose CSVs are plotted")
    args = parser.parse_args(argv)
    paths = [Path(a) for a in args.csvs] or measured_csvs(output_dir(args))
    for path in paths:
        plot_csv(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
