"""The quality study: every arm x seeds x training sizes on the process task, with CIs.

For each (seed, training size): a seed-dependent subset of ``icrm/data/process_train.jsonl``,
one generator SFT, then one reward model per arm (``bt, grm, icrm, icrm_uniform,
icrm_squared``) from the same initialisation, data order and steps, each scored on the held-out
and longer-input pair files (exact prefix values) and best-of-16 sets (``icrm.metrics``).
Arms are paired by seed; the report gives mean and 95% CI per metric and paired differences
against GRM and BT (t intervals over seeds).

Raw rows go to ``--out`` (default ``runs/benchmarks/quality.csv``; the shipped
``benchmarks/results/quality.csv`` only with ``--update-results``; columns ``arm, seed,
train_pairs, metric, value, commit``), appended and flushed after every finished arm, so a
killed study keeps its rows and a rerun skips finished (arm, seed, size) cells.

    python -m benchmarks.bench_quality                 # the full study (~1 h on 2 cores)
    python -m benchmarks.bench_quality --quick         # 2 seeds, 1 size, few steps (smoke test)
    python -m benchmarks.bench_quality --report-only   # summary CSV, plot, README section from the rows
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.paths import RESULTS_DIR, RUNS_DIR
from benchmarks.report import QUALITY_BEGIN as README_BEGIN, QUALITY_END as README_END, split_section

REPO = Path(__file__).resolve().parent.parent
ARMS = ("bt", "grm", "icrm", "icrm_uniform", "icrm_squared")
COLUMNS = ("arm", "seed", "train_pairs", "metric", "value", "commit")
#: Written last for every cell: its presence marks the cell finished.
DONE_METRIC = "train_s"
METRICS = ("pair_accuracy", "value_spearman", "value_auroc", "first_error_acc", "bon_accuracy")
#: Two-sided 95% Student-t quantiles by degrees of freedom (no scipy dependency); 1.96 beyond 30.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ------------------------------------------------------------------------------------------
# Running

def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def finished_cells(path: Path) -> set[tuple[str, int, int]]:
    return {(r["arm"], int(r["seed"]), int(r["train_pairs"])) for r in read_rows(path) if r["metric"] == DONE_METRIC}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append under an exclusive lock (two workers share the file), header first if new."""
    with open(path, "a", newline="") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if fh.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh, fcntl.LOCK_UN)


def run_group(job: dict) -> str:
    """One (seed, size): SFT once, then the arms not yet in the CSV. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from icrm.config import RewardConfig
    from icrm.data import read_rows as read_data
    from icrm.train import train_arms

    seed, size, arms, out = job["seed"], job["train_pairs"], job["arms"], Path(job["out"])
    pool = read_data(RewardConfig.__dataclass_fields__["train_file"].default)
    train = random.Random(1000 + seed).sample(pool, size)
    workdir = tempfile.mkdtemp(prefix=f"icrm-quality-s{seed}-n{size}-")
    cfg = RewardConfig(output_dir=workdir, seed=seed, max_steps=job["rm_steps"], sft_max_steps=job["sft_steps"],
                       logging_steps=max(1, job["rm_steps"] // 4), save_total_limit=1, kernels="reference",
                       cpu_threads=1, reward_model_init=job["rm_init"])
    start = time.perf_counter()

    def write(arm, result):
        rows = [{"arm": arm, "seed": seed, "train_pairs": size, "metric": k, "value": f"{float(v):.6g}",
                 "commit": job["commit"]} for k, v in result.items()
                if isinstance(v, (int, float)) and k not in ("step", DONE_METRIC)]
        rows.append({"arm": arm, "seed": seed, "train_pairs": size, "metric": DONE_METRIC,
                     "value": f"{result[DONE_METRIC]:.3g}", "commit": job["commit"]})
        append_rows(out, rows)

    try:
        train_arms(cfg, arms, train_dataset=train, echo=lambda *_: None, save=False, on_arm=write)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return f"seed {seed} size {size}: {', '.join(arms)} in {time.perf_counter() - start:.0f} s"


def run_study(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_cells(out)
    commit = git_commit()
    jobs = []
    for seed in range(args.seeds):  # seeds outermost: a cut-off study has every size for its first seeds
        for size in args.sizes:
            todo = [a for a in args.arms if (a, seed, size) not in done]
            if todo:
                jobs.append({"seed": seed, "train_pairs": size, "arms": todo, "out": str(out), "commit": commit,
                             "rm_steps": args.rm_steps, "sft_steps": args.sft_steps, "rm_init": args.rm_init})
    notes = {"commit": commit, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
             "seeds": args.seeds, "sizes": args.sizes, "arms": list(args.arms), "rm_steps": args.rm_steps,
             "sft_steps": args.sft_steps, "reward_model_init": args.rm_init, "workers": args.workers,
             "cells_already_done": len(done), "groups_to_run": len(jobs)}
    out.with_suffix(".notes.json").write_text(json.dumps(notes, indent=1) + "\n")
    print(f"{len(jobs)} (seed, size) groups to run, {len(done)} cells already done; rows -> {out}", flush=True)
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        for message in pool.imap_unordered(run_group, jobs):
            print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------------
# Report

def t_interval(values: np.ndarray) -> tuple[float, float]:
    """``(mean, half-width of the 95% t interval)``; half-width nan for one value."""
    n = len(values)
    if n < 2:
        return float(np.mean(values)), float("nan")
    df = n - 1
    q = T975.get(df) or (T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96)
    return float(np.mean(values)), float(q * np.std(values, ddof=1) / math.sqrt(n))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (metric, size, arm): mean, CI, n; and the paired difference vs GRM and vs BT over common seeds."""
    table: dict[tuple, dict[int, float]] = {}
    for r in rows:
        table.setdefault((r["metric"], int(r["train_pairs"]), r["arm"]), {})[int(r["seed"])] = float(r["value"])
    out = []
    for (metric, size, arm), by_seed in sorted(table.items()):
        seeds = sorted(s for s, v in by_seed.items() if math.isfinite(v))
        if not seeds:
            continue
        mean, ci = t_interval(np.array([by_seed[s] for s in seeds]))
        rec = {"metric": metric, "train_pairs": size, "arm": arm, "n": len(seeds), "mean": mean, "ci95": ci}
        for ref in ("grm", "bt"):
            other = table.get((metric, size, ref), {})
            common = [s for s in seeds if math.isfinite(other.get(s, float("nan")))]
            if arm != ref and len(common) >= 2:
                d_mean, d_ci = t_interval(np.array([by_seed[s] - other[s] for s in common]))
                rec[f"diff_vs_{ref}"], rec[f"diff_vs_{ref}_ci95"] = d_mean, d_ci
        out.append(rec)
    return out


def _fmt(mean, ci) -> str:
    return f"{mean:.3f} ± {ci:.3f}" if math.isfinite(ci) else f"{mean:.3f}"


def _fmt_diff(rec, ref) -> str:
    if f"diff_vs_{ref}" not in rec:
        return ""
    d, ci = rec[f"diff_vs_{ref}"], rec[f"diff_vs_{ref}_ci95"]
    sign = "**" if abs(d) > ci else ""  # the CI excludes 0
    return f"{sign}{d:+.3f} ± {ci:.3f}{sign}"


LABELS = {"pair_accuracy": "pairwise accuracy", "value_spearman": "Spearman(reward, V)",
          "value_auroc": "AUROC reachable (V > 0)", "first_error_acc": "first-error localisation",
          "bon_accuracy": "best-of-16 correct"}


def _metric_keys(summary: list[dict]) -> list[str]:
    present = {r["metric"] for r in summary}
    return [m + s for s in ("", "_long") for m in METRICS if m + s in present]


def _label(key: str) -> str:
    return LABELS[key.removesuffix("_long")] + (", long" if key.endswith("_long") else "")


def findings(summary: list[dict], arm: str, ref: str) -> list[str]:
    """One line per size: the metrics where ``arm`` is better / worse than ``ref`` (95% CI of the paired
    difference excludes 0) and how many show no resolvable difference."""
    lines = []
    for size in sorted({r["train_pairs"] for r in summary}):
        better, worse, same = [], [], 0
        for r in summary:
            if r["arm"] != arm or r["train_pairs"] != size or r["metric"] not in _metric_keys(summary) \
                    or f"diff_vs_{ref}" not in r:
                continue
            d, ci = r[f"diff_vs_{ref}"], r[f"diff_vs_{ref}_ci95"]
            text = f"{_label(r['metric'])} {d:+.3f} ± {ci:.3f}"
            if d - ci > 0:
                better.append(text)
            elif d + ci < 0:
                worse.append(text)
            else:
                same += 1
        lines.append(f"* {size} pairs, {arm} vs {ref}: better on {'; '.join(better) or 'no metric'}; "
                     f"worse on {'; '.join(worse) or 'no metric'}; no resolvable difference on {same}.")
    return lines


def render_section(rows: list[dict], summary: list[dict], notes: dict, csv_name: str, plot_name: str) -> str:
    cells = {(r["arm"], r["seed"], r["train_pairs"]) for r in rows if r["metric"] == DONE_METRIC}
    expected = len(notes.get("arms", ARMS)) * notes.get("seeds", 0) * len(notes.get("sizes", []))
    seeds = sorted({int(r["seed"]) for r in rows if r["metric"] == DONE_METRIC})
    lines = [README_BEGIN, "", "## Quality study: BT, GRM, ICRM and two ablations on the process task", "",
             f"Generated by `python -m benchmarks.bench_quality --report-only` from [`{csv_name}`]({csv_name}) "
             f"(study commit `{notes.get('commit', '?')}`, started {notes.get('started', '?')}). "
             f"**{len(cells)} of {expected or '?'} (arm, seed, size) cells finished** (seeds {seeds}). "
             + notes.get("remark", ""), "",
             f"Setup: the tiny built-in model on the shipped process task (docs/trainer.md). Per (seed, size): a "
             f"seed-dependent subset of `icrm/data/process_train.jsonl`, one generator SFT "
             f"({notes.get('sft_steps', '?')} steps), then every arm for {notes.get('rm_steps', '?')} optimizer "
             f"steps (batch 16) from the same start (`reward_model_init: {notes.get('reward_model_init', '?')}`) "
             "and the same data order, so arms are paired by seed. Metrics on `process_eval.jsonl` (500 pairs, "
             "4-8 numbers), `process_eval_long.jsonl` (300 pairs, 9-12 numbers: `long`) and the best-of-16 sets "
             "(200 prompts each). Mean ± half-width of the 95% t interval over seeds; paired differences, "
             "**bold** where the interval excludes 0. No hyperparameter was tuned on these files: every arm uses "
             "the authors' defaults (reg_ratio 0.1, weight_scale 2, sft_grad_scale 1e-3).", "",
             "What the study found (mechanical summary of the paired differences):", ""]
    for arm, ref in (("icrm", "grm"), ("icrm", "bt"), ("grm", "bt"), ("icrm_uniform", "grm"), ("icrm_squared", "grm")):
        lines += findings(summary, arm, ref)
    lines += ["", f"![quality]({plot_name})", ""]
    keyed = {(r["metric"], r["train_pairs"], r["arm"]): r for r in summary}
    arms = [a for a in ARMS if any(r["arm"] == a for r in summary)]
    for size in sorted({r["train_pairs"] for r in summary}):
        lines += [f"### {size} training pairs", "", "| metric | " + " | ".join(arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for key in _metric_keys(summary):
            cells = [_fmt(keyed[(key, size, a)]["mean"], keyed[(key, size, a)]["ci95"]) + f" (n={keyed[(key, size, a)]['n']})"
                     if (key, size, a) in keyed else "" for a in arms]
            lines.append(f"| {_label(key)} | " + " | ".join(cells) + " |")
        for ref in ("grm", "bt"):
            others = [a for a in arms if a != ref]
            lines += ["", f"Paired difference vs {ref.upper()} ({size} pairs):", "",
                      "| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
            for key in _metric_keys(summary):
                lines.append(f"| {_label(key)} | " + " | ".join(_fmt_diff(keyed.get((key, size, a), {}), ref)
                                                           for a in others) + " |")
        lines.append("")
    ref = {r["metric"]: r["mean"] for r in summary if r["metric"].startswith(("bon_random", "bon_oracle"))}
    if ref:
        lines += ["Best-of-16 references (the same for every arm): random pick " +
                  f"{ref.get('bon_random', float('nan')):.3f} (long {ref.get('bon_random_long', float('nan')):.3f}), "
                  f"oracle {ref.get('bon_oracle', float('nan')):.3f} (long {ref.get('bon_oracle_long', float('nan')):.3f}).", ""]
    lines.append(README_END)
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _metric_keys(summary)
    cols = 5
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3.4 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, arm in enumerate(ARMS):
            recs = sorted((r for r in summary if r["metric"] == key and r["arm"] == arm), key=lambda r: r["train_pairs"])
            if recs:
                xs = np.array([r["train_pairs"] for r in recs]) * (1 + 0.04 * (i - 2))  # dodge the error bars
                ax.errorbar(xs, [r["mean"] for r in recs], yerr=[r["ci95"] if math.isfinite(r["ci95"]) else 0 for r in recs],
                            marker="o", capsize=3, label=arm)
        sizes = sorted({r["train_pairs"] for r in summary})
        ax.set_xscale("log"), ax.set_title(_label(key), fontsize=10), ax.set_xlabel("training pairs")
        ax.set_xticks(sizes, [str(n) for n in sizes]), ax.minorticks_off()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(out: Path, readme: Path) -> str:
    rows = read_rows(out)
    if not rows:
        raise SystemExit(f"{out}: no rows yet")
    notes_path = out.with_suffix(".notes.json")
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    summary = summarize(rows)
    summary_path = out.with_name(out.stem + "_summary.csv")
    with open(summary_path, "w", newline="") as fh:
        fields = ["metric", "train_pairs", "arm", "n", "mean", "ci95", "diff_vs_grm", "diff_vs_grm_ci95",
                  "diff_vs_bt", "diff_vs_bt_ci95"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)
    plot_path = out.with_suffix(".png")
    plot(summary, plot_path)
    section = render_section(rows, summary, notes, out.name, plot_path.name)
    if readme.exists():
        text = readme.read_text()
        parts = split_section(text, README_BEGIN, README_END)
        text = parts[0] + section + parts[2] if parts else text.rstrip("\n") + "\n\n" + section + "\n"
        readme.write_text(text)
    print(f"wrote {summary_path}, {plot_path}, section in {readme}")
    return section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RUNS_DIR / "quality.csv"), help="raw rows CSV (appended, resumable)")
    parser.add_argument("--readme", default=str(RUNS_DIR / "README.md"),
                        help="README whose quality section is rewritten (only if it exists)")
    parser.add_argument("--update-results", action="store_true",
                        help=f"write {RESULTS_DIR.relative_to(REPO)}/quality.csv and its README instead")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[500, 1000, 4000])
    parser.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    parser.add_argument("--rm-steps", type=int, default=600, help="optimizer steps of every reward model")
    parser.add_argument("--sft-steps", type=int, default=600, help="optimizer steps of the generator SFT")
    parser.add_argument("--rm-init", default="generator", choices=("generator", "base"))
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 torch thread each)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 500 pairs, 60 + 60 steps (a smoke test)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the summary, plot and README section")
    args = parser.parse_args(argv)
    if args.update_results:
        args.out, args.readme = str(RESULTS_DIR / "quality.csv"), str(RESULTS_DIR / "README.md")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        parser.error(f"--arms: unknown arm(s) {bad}; expected some of {ARMS}")
    if args.quick:
        args.seeds, args.sizes, args.rm_steps, args.sft_steps = 2, [500], 60, 60
    if not args.report_only:
        run_study(args)
    report(Path(args.out), Path(args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
