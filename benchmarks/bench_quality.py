"""The quality study: reward-model start x arm x training size x seed on the process task.

For each (seed, training size): a seed-dependent subset of ``icrm/data/process_train.jsonl`` and
one generator SFT of the pretrained tiny base (``icrm/data/tiny_base``); then, for each
reward-model start (``base`` = the pretrained base, ``generator`` = the SFT-ed generator,
``random`` = random weights), one reward model per arm (``bt, grm, icrm, icrm_uniform``) with the
same data order and steps, scored by ``icrm.metrics`` on ``process_eval.jsonl`` (500 pairs, exact
prefix values) and ``process_bon.jsonl`` (200 prompts, best-of-N over the distinct of 16 samples).
Arms and starts are paired by seed. The pre-registered primary endpoints and the tests are in
``benchmarks/results/quality_preregistration.md``; the report applies them (paired sign-flip
permutation tests over seeds, Holm within the primary family and, apart, within the exploratory one).

Rows go to ``--out`` (default ``runs/benchmarks/quality.csv``; the shipped
``benchmarks/results/quality.csv``, its README section and the top-level README's summary only with
``--update-results``; long format, one row per metric
with the cell, its hyperparameters and the machine: CPU model, ATen CPU capability, torch and
transformers versions, commit), appended after every finished arm, so a killed study keeps its rows
and a rerun skips finished cells.

    python -m benchmarks.bench_quality                    # the full study (69 min measured on one shared core)
    python -m benchmarks.bench_quality --validation ...   # score on the validation split (hyperparameter choice)
    python -m benchmarks.bench_quality --quick            # seconds-scale smoke run, written under runs/
    python -m benchmarks.bench_quality --report-only      # tests, summary, plot and README section from the rows
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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.paths import RESULTS_DIR, RUNS_DIR
from benchmarks.report import QUALITY_BEGIN as README_BEGIN, QUALITY_END as README_END, split_section

from icrm.provenance import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO / "icrm" / "data"
STARTS = ("base", "generator", "random")
ARMS = ("bt", "grm", "icrm", "icrm_uniform", "icrm_squared")
DEFAULT_ARMS = ("bt", "grm", "icrm", "icrm_uniform")
META = ("cpu", "aten", "torch", "transformers", "commit")
COLUMNS = ("start", "arm", "seed", "train_pairs", "rm_lr", "rm_steps", "sft_lr", "sft_steps", "eval_split", "metric", "value", *META)
#: Written last for every cell: its presence marks the cell finished.
DONE_METRIC = "train_s"
METRICS = ("pair_accuracy", "bon_accuracy", "value_spearman", "value_spearman_within", "value_auroc",
           "value_auroc_within", "first_error_acc", "first_error_at_eos")
#: Arm-free references, written with every cell (the same for every arm of a split).
REFERENCES = ("first_error_chance", "bon_random", "bon_oracle", "bon_candidates")
#: The pre-registered primary family: ICRM - GRM from the pretrained base, both sizes.
PRIMARY_START, PRIMARY_METRICS, PRIMARY_PAIR = "base", ("pair_accuracy", "bon_accuracy"), ("icrm", "grm")
#: Exploratory comparisons within a start (arm a - arm b) and between starts for one arm.
ARM_CONTRASTS = (("icrm", "grm"), ("icrm", "bt"), ("grm", "bt"), ("icrm_uniform", "grm"), ("icrm", "icrm_uniform"),
                 ("icrm_squared", "grm"))
START_CONTRASTS = (("base", "generator"), ("base", "random"))
PERMUTATIONS, PERMUTATION_SEED = 100_000, 0
#: Two-sided 95% Student-t quantiles by degrees of freedom (no scipy dependency); 1.96 beyond 30.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
SPLITS = {"eval": ("process_eval.jsonl", "process_bon.jsonl"), "val": ("process_val.jsonl", "process_bon_val.jsonl")}


# ------------------------------------------------------------------------------------------
# Running

def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cell_key(row: dict) -> tuple:
    return (row["start"], row["arm"], int(row["seed"]), int(row["train_pairs"]), float(row["rm_lr"]),
            int(row["rm_steps"]), float(row["sft_lr"]), int(row["sft_steps"]), row["eval_split"])


def finished_cells(path: Path) -> set[tuple]:
    return {cell_key(r) for r in read_rows(path) if r["metric"] == DONE_METRIC}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append under an exclusive lock, header first if new."""
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
    """One (start, seed, size): the generator SFT, then the arms not yet in the CSV. Runs in a worker."""
    import torch

    torch.set_num_threads(1)
    from icrm.config import RewardConfig
    from icrm.data import read_rows as read_data
    from icrm.train import train_arms

    seed, size, out = job["seed"], job["train_pairs"], Path(job["out"])
    pool = read_data(str(DATA / "process_train.jsonl"))
    train = random.Random(1000 + seed).sample(pool, size)
    eval_file, bon_file = (str(DATA / name) for name in SPLITS[job["eval_split"]])
    workdir = tempfile.mkdtemp(prefix=f"icrm-quality-s{seed}-n{size}-")
    cfg = RewardConfig(output_dir=workdir, seed=seed, max_steps=job["rm_steps"], learning_rate=job["rm_lr"],
                       sft_max_steps=job["sft_steps"], sft_learning_rate=job["sft_lr"], logging_steps=job["rm_steps"], save_strategy="no",
                       kernels="reference", cpu_threads=1, eval_file=eval_file, bon_file=bon_file,
                       eval_long_file=None, bon_long_file=None)
    meta = {**job["meta"], "seed": seed, "train_pairs": size, "rm_lr": job["rm_lr"], "rm_steps": job["rm_steps"],
            "sft_lr": job["sft_lr"], "sft_steps": job["sft_steps"], "eval_split": job["eval_split"]}
    start = time.perf_counter()
    try:
        train_arms(cfg, [], train_dataset=train, echo=lambda *_: None, save=False)  # the generator SFT only
        generator = os.path.join(workdir, "sft", "final")
        for rm_start, arms in job["todo"]:
            def write(arm, result, rm_start=rm_start):
                base = {**meta, "start": rm_start, "arm": arm}
                rows = [{**base, "metric": k, "value": f"{float(result[k]):.6g}"} for k in METRICS + REFERENCES
                        if k in result]
                rows.append({**base, "metric": DONE_METRIC, "value": f"{result[DONE_METRIC]:.3g}"})
                append_rows(out, rows)

            stage = cfg.replace(output_dir=os.path.join(workdir, rm_start), run_sft=False,
                                generator_name_or_path=generator, reward_model_init=rm_start)
            train_arms(stage, arms, train_dataset=train, echo=lambda *_: None, save=False, on_arm=write)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return f"start {job['todo'][0][0]} seed {seed} size {size}: {sum(len(a) for _, a in job['todo'])} cells in {time.perf_counter() - start:.0f} s"


def plan_jobs(args, done: set[tuple], meta: dict) -> list[dict]:
    """(start, seed, size) groups with their unfinished arms. The first of ``--starts`` (the
    pre-registered primary start) runs first for all its seeds, so a cut-off study has it complete;
    then seeds in order, each with the other starts, so those share their seeds; sizes innermost.
    The random start only for its first ``seeds_random`` seeds. The generator SFT is redone per
    group (the same weights for a seed and size: it is deterministic on one machine)."""
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    order = [(args.starts[0], seed) for seed in seeds] + [(s, seed) for seed in seeds for s in args.starts[1:]]
    jobs = []
    for rm_start, seed in order:
        if rm_start == "random" and seed - args.seed_offset >= args.seeds_random:
            continue
        for size in args.sizes:
            key = lambda arm: (rm_start, arm, seed, size, float(args.rm_lr), args.rm_steps,  # noqa: E731
                               float(args.sft_lr), args.sft_steps, args.eval_split)
            arms = [a for a in args.arms if key(a) not in done]
            if arms:
                jobs.append({"seed": seed, "train_pairs": size, "todo": [(rm_start, arms)], "out": str(args.out),
                             "meta": meta, "rm_steps": args.rm_steps, "rm_lr": args.rm_lr, "sft_lr": args.sft_lr,
                             "sft_steps": args.sft_steps, "eval_split": args.eval_split})
    return jobs


def run_study(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_cells(out)
    meta = machine(str(REPO))
    jobs = plan_jobs(args, done, meta)
    cells = sum(len(a) for j in jobs for _, a in j["todo"])
    notes_path = out.with_suffix(".notes.json")
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    notes.setdefault("runs", []).append({
        **meta, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seeds": args.seeds,
        "seed_offset": args.seed_offset, "seeds_random": args.seeds_random, "sizes": args.sizes,
        "starts": list(args.starts), "arms": list(args.arms), "rm_steps": args.rm_steps, "rm_lr": args.rm_lr,
        "sft_lr": args.sft_lr, "sft_steps": args.sft_steps, "eval_split": args.eval_split, "cells_already_done": len(done),
        "cells_to_run": cells})
    notes_path.write_text(json.dumps(notes, indent=1) + "\n")
    print(f"{len(jobs)} (start, seed, size) groups to run ({cells} cells), {len(done)} cells already done; rows -> {out}",
          flush=True)
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        for message in pool.imap(run_group, jobs):
            print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------------
# Statistics

def t_interval(values: np.ndarray) -> tuple[float, float]:
    """``(mean, half-width of the 95% t interval)``; half-width nan for one value."""
    n = len(values)
    if n < 2:
        return float(np.mean(values)), float("nan")
    df = n - 1
    q = T975[df] if df in T975 else 1.96
    return float(np.mean(values)), float(q * np.std(values, ddof=1) / math.sqrt(n))


def sign_flip_p(diffs: np.ndarray, permutations: int = PERMUTATIONS, seed: int = PERMUTATION_SEED) -> float:
    """Two-sided paired sign-flip permutation p-value of mean(diffs) = 0: exact (all 2^n sign vectors)
    for n <= 16, else ``permutations`` random sign vectors from a fixed seed, ``(1 + hits) / (1 + draws)``."""
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    if n == 0:
        return float("nan")
    observed = abs(diffs.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        means = np.abs(signs @ diffs) / n
        return float(np.mean(means >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, permutations - start), n))
        hits += int(np.sum(np.abs(signs @ diffs) / n >= observed - 1e-12))
    return (1 + hits) / (1 + permutations)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); nan stays nan."""
    finite = [(p, i) for i, p in enumerate(p_values) if math.isfinite(p)]
    adjusted = [float("nan")] * len(p_values)
    running, m = 0.0, len(finite)
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def by_seed(rows: list[dict], split: str = "eval") -> dict[tuple, dict[int, float]]:
    """``{(start, size, metric, arm): {seed: value}}`` of the finished cells of one split."""
    done = {cell_key(r) for r in rows if r["metric"] == DONE_METRIC}
    table: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r["eval_split"] == split and cell_key(r) in done:
            table.setdefault((r["start"], int(r["train_pairs"]), r["metric"], r["arm"]), {})[int(r["seed"])] = float(r["value"])
    return table


def summarize(table: dict) -> list[dict]:
    out = []
    for (rm_start, size, metric, arm), values in sorted(table.items()):
        finite = np.array([v for v in values.values() if math.isfinite(v)])
        if len(finite):
            mean, ci = t_interval(finite)
            out.append({"start": rm_start, "train_pairs": size, "metric": metric, "arm": arm, "n": len(finite),
                        "mean": mean, "ci95": ci})
    return out


def paired_test(table: dict, a: tuple, b: tuple) -> dict | None:
    """Paired difference ``a - b`` over the seeds both have (keys ``(start, size, metric, arm)``)."""
    xa, xb = table.get(a, {}), table.get(b, {})
    seeds = sorted(s for s in xa if s in xb and math.isfinite(xa[s]) and math.isfinite(xb[s]))
    if len(seeds) < 2:
        return None
    diffs = np.array([xa[s] - xb[s] for s in seeds])
    mean, ci = t_interval(diffs)
    return {"n": len(seeds), "diff": mean, "ci95": ci, "p": sign_flip_p(diffs)}


def all_tests(table: dict) -> list[dict]:
    """The primary family and the exploratory one, each Holm-adjusted within itself."""
    starts = sorted({k[0] for k in table}, key=STARTS.index)
    sizes = sorted({k[1] for k in table})
    metrics = [m for m in METRICS if any(k[2] == m for k in table)]
    tests = []
    for rm_start in starts:
        for size in sizes:
            for metric in metrics:
                for a, b in ARM_CONTRASTS:
                    res = paired_test(table, (rm_start, size, metric, a), (rm_start, size, metric, b))
                    if res:
                        primary = rm_start == PRIMARY_START and metric in PRIMARY_METRICS and (a, b) == PRIMARY_PAIR
                        tests.append({"family": "primary" if primary else "exploratory", "start": rm_start,
                                      "train_pairs": size, "metric": metric, "a": a, "b": b, **res})
    for s1, s2 in START_CONTRASTS:
        for size in sizes:
            for metric in metrics:
                for arm in ARMS:
                    res = paired_test(table, (s1, size, metric, arm), (s2, size, metric, arm))
                    if res:
                        tests.append({"family": "exploratory", "start": f"{s1}-{s2}", "train_pairs": size,
                                      "metric": metric, "a": arm, "b": arm, **res})
    for family in ("primary", "exploratory"):
        members = [t for t in tests if t["family"] == family]
        for t, p in zip(members, holm([t["p"] for t in members])):
            t["p_holm"] = p
    return tests


# ------------------------------------------------------------------------------------------
# Report

LABELS = {"pair_accuracy": "pairwise accuracy", "bon_accuracy": "best-of-N (distinct of 16) correct",
          "value_spearman": "Spearman(reward, V), pooled", "value_spearman_within": "Spearman(reward, V), within response",
          "value_auroc": "AUROC reachable (V > 0), pooled", "value_auroc_within": "AUROC reachable, within response",
          "first_error_acc": "first-error localisation", "first_error_at_eos": "largest drop at EOS (rejected)"}


def _fmt(mean, ci) -> str:
    return f"{mean:.3f} ± {ci:.3f}" if math.isfinite(ci) else f"{mean:.3f}"


def _p(p) -> str:
    return "-" if not math.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _contrast(t: dict) -> str:
    return f"{t['a']} - {t['b']}" if t["a"] != t["b"] else f"{t['a']}: start {t['start']}"


def kernel_path_check(rows: list[dict], checks: list[Path]) -> list[str]:
    """One line per rerun of some cells under another ATen CPU capability (``ATEN_CPU_CAPABILITY``):
    the largest difference from the same cells' rows."""
    main = {(cell_key(r), r["metric"]): float(r["value"]) for r in rows if r["metric"] != DONE_METRIC}
    lines = []
    for path in checks:
        other = [r for r in read_rows(path) if r["metric"] != DONE_METRIC]
        diffs = [abs(float(r["value"]) - main[(cell_key(r), r["metric"])]) for r in other
                 if (cell_key(r), r["metric"]) in main]
        if diffs:
            cells = len({cell_key(r) for r in other})
            lines.append(f"ATen `{other[0]['aten']}` rerun of {cells} cells ([`{path.name}`]({path.name})): largest "
                         f"difference {max(diffs):.2g} over {len(diffs)} metric rows")
    return lines


def render_section(rows: list[dict], tests: list[dict], summary: list[dict], notes: dict, csv_name: str,
                   plot_name: str, tests_name: str, checks: list[Path] = (), position: dict | None = None) -> str:
    done = {cell_key(r) for r in rows if r["metric"] == DONE_METRIC and r["eval_split"] == "eval"}
    run = (notes.get("runs") or [{}])[-1]
    expected = len(run.get("arms", [])) * len(run.get("sizes", [])) * (
        run.get("seeds", 0) * len([s for s in run.get("starts", []) if s != "random"])
        + run.get("seeds_random", 0) * ("random" in run.get("starts", [])))
    cells_by_start = {s: len([c for c in done if c[0] == s]) for s in STARTS}
    seeds_by_start = {s: len({c[2] for c in done if c[0] == s}) for s in STARTS}
    machines = sorted({(r["cpu"], r["aten"], r["torch"], r["transformers"]) for r in rows if r["metric"] == DONE_METRIC})
    train_s = [float(r["value"]) for r in rows if r["metric"] == DONE_METRIC and r["eval_split"] == "eval"]
    lines = [README_BEGIN, "", "## Quality study: reward-model start x objective on the process task", "",
             f"Generated by `python -m benchmarks.bench_quality --report-only` from [`{csv_name}`]({csv_name}) "
             f"(tests: [`{tests_name}`]({tests_name})). Pre-registration: "
             "[`quality_preregistration.md`](quality_preregistration.md), committed before the run. "
             f"**{len(done)} of {expected or '?'} cells finished** "
             f"({', '.join(f'{s}: {cells_by_start[s]} cells, {seeds_by_start[s]} seeds' for s in STARTS)}). "
             + notes.get("remark", ""), "",
             f"Setup: the tiny built-in model; its pretrained base `icrm/data/tiny_base` (`scripts/pretrain_base.py`); "
             f"per (seed, size) a seed-dependent subset of `icrm/data/process_train.jsonl` and one generator SFT of the "
             f"base ({run.get('sft_steps', '?')} steps); then every arm for {run.get('rm_steps', '?')} AdamW steps at "
             f"lr {run.get('rm_lr', '?')} (batch 16, cosine) from each start with the same data order. Metrics on "
             "`process_eval.jsonl` (500 pairs) and `process_bon.jsonl` (200 prompts, best-of-N over the distinct "
             "responses of 16 samples). Hyperparameters: see the pre-registration (authors' values where they exist, "
             "the rest chosen on the validation split). Mean ± half-width of the 95% t interval over seeds. "
             f"Training time per cell (the reward model's steps only, one thread on a shared core): median "
             f"{np.median(train_s) if train_s else float('nan'):.1f} s.", "",
             "Machine(s) of the rows: " + "; ".join(f"{c} (ATen `{a}`, torch {t}, transformers {tf})"
                                                   for c, a, t, tf in machines) + ". The rows are the same on every "
             "run on one machine with the same CPU capability and library versions. Kernel-path check on the same "
             "machine: " + ("; ".join(kernel_path_check(rows, list(checks))) or "none run") + ".", "",
             "### Primary endpoints (pre-registered: ICRM - GRM from the pretrained base, Holm over these four)", "",
             "| endpoint | pairs | seeds | ICRM - GRM | 95% CI | p (sign-flip) | p (Holm) |", "|---|---|---|---|---|---|---|"]
    for t in (t for t in tests if t["family"] == "primary"):
        lines.append(f"| {LABELS[t['metric']]} | {t['train_pairs']} | {t['n']} | {t['diff']:+.4f} | "
                     f"[{t['diff'] - t['ci95']:+.4f}, {t['diff'] + t['ci95']:+.4f}] | {_p(t['p'])} | **{_p(t['p_holm'])}** |")
    explor = [t for t in tests if t["family"] == "exploratory"]
    survive = sorted((t for t in explor if t["p_holm"] < 0.05), key=lambda t: t["p_holm"])
    lines += ["", f"### Exploratory ({len(explor)} comparisons, Holm within them; {len(survive)} below 0.05)", "",
              "Every other contrast is exploratory: the arm contrasts within each start and the start contrasts "
              "within each arm, on all metrics. Those with a Holm-adjusted p below 0.05:", "",
              "| start | pairs | metric | contrast | difference (95% CI) | p (Holm) |", "|---|---|---|---|---|---|"]
    for t in survive:
        lines.append(f"| {t['start']} | {t['train_pairs']} | {LABELS[t['metric']]} | {_contrast(t)} | "
                     f"{t['diff']:+.3f} [{t['diff'] - t['ci95']:+.3f}, {t['diff'] + t['ci95']:+.3f}] | {_p(t['p_holm'])} |")
    lines += ["", f"![quality]({plot_name})", ""]
    keyed = {(r["start"], r["train_pairs"], r["metric"], r["arm"]): r for r in summary}
    arms = [a for a in ARMS if any(r["arm"] == a for r in summary)]
    refs = {(r["start"], r["train_pairs"], r["metric"]): r for r in summary if r["metric"] in REFERENCES}
    for rm_start in [s for s in STARTS if any(r["start"] == s for r in summary)]:
        for size in sorted({r["train_pairs"] for r in summary if r["start"] == rm_start}):
            lines += [f"#### start `{rm_start}`, {size} training pairs", "", "| metric | " + " | ".join(arms) + " |",
                      "|---|" + "---|" * len(arms)]
            for metric in METRICS:
                cells = [_fmt(keyed[k]["mean"], keyed[k]["ci95"]) + f" (n={keyed[k]['n']})"
                         if (k := (rm_start, size, metric, a)) in keyed else "" for a in arms]
                if any(cells):
                    lines.append(f"| {LABELS[metric]} | " + " | ".join(cells) + " |")
            lines.append("")
    ref = {m: next((r["mean"] for k, r in refs.items() if k[2] == m), float("nan")) for m in REFERENCES}
    lines += [f"Chance and references (the same for every cell): first-error localisation by a uniform pick over "
              f"the candidate positions {ref['first_error_chance']:.3f}; best-of-N over distinct candidates: "
              f"{ref['bon_candidates']:.2f} distinct responses per prompt on average, uniform pick "
              f"{ref['bon_random']:.3f}, oracle {ref['bon_oracle']:.3f}."]
    if position:
        lines[-1] += (" A reward that only falls with position (word i scores -i, no token read; "
                      "`icrm.metrics.position_baseline` on `process_eval.jsonl`) scores Spearman "
                      f"{position['value_spearman']:+.3f} pooled / {position['value_spearman_within']:+.3f} within response "
                      f"and AUROC {position['value_auroc']:.3f} pooled / {position['value_auroc_within']:.3f} within response: "
                      "the within-response AUROC is only informative against that.")
    lines += ["", README_END]
    return "\n".join(lines)


#: The top-level README's generated summary of the study (the prose around it is written by hand).
SUMMARY_BEGIN, SUMMARY_END = "<!-- quality-summary:begin -->", "<!-- quality-summary:end -->"


def render_summary(tests: list[dict]) -> str:
    """The primary family and the count of exploratory contrasts that survive Holm, for the README."""
    lines = [SUMMARY_BEGIN, "| primary endpoint (start `base`, ICRM - GRM) | pairs | seeds | difference [95% CI] | p (Holm) |",
             "|---|---|---|---|---|"]
    for t in (t for t in tests if t["family"] == "primary"):
        lines.append(f"| {LABELS[t['metric']]} | {t['train_pairs']} | {t['n']} | {t['diff']:+.3f} "
                     f"[{t['diff'] - t['ci95']:+.3f}, {t['diff'] + t['ci95']:+.3f}] | {_p(t['p_holm'])} |")
    explor = [t for t in tests if t["family"] == "exploratory"]
    lines += ["", f"Exploratory: {sum(t['p_holm'] < 0.05 for t in explor)} of {len(explor)} contrasts have a "
              "Holm-adjusted p below 0.05 (listed in the results README).", SUMMARY_END]
    return "\n".join(lines)


def splice(path: Path, begin: str, end: str, section: str) -> None:
    """Replace ``begin ... end`` in ``path`` with ``section`` (appended when the markers are missing)."""
    text = path.read_text() if path.exists() else ""
    parts = split_section(text, begin, end)
    path.write_text(parts[0] + section + parts[2] if parts else text.rstrip("\n") + "\n\n" + section + "\n")


def plot(summary: list[dict], path: Path, position: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("pair_accuracy", "bon_accuracy", "value_spearman_within", "value_auroc_within", "first_error_acc")
    starts = [s for s in STARTS if any(r["start"] == s for r in summary)]
    fig, axes = plt.subplots(len(starts), len(metrics), figsize=(4 * len(metrics), 3.2 * len(starts)), squeeze=False)
    for row, rm_start in enumerate(starts):
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for i, arm in enumerate(ARMS):
                recs = sorted((r for r in summary if (r["start"], r["metric"], r["arm"]) == (rm_start, metric, arm)),
                              key=lambda r: r["train_pairs"])
                if recs:
                    xs = np.array([r["train_pairs"] for r in recs]) * (1 + 0.04 * (i - 2))  # dodge the error bars
                    ax.errorbar(xs, [r["mean"] for r in recs], yerr=[r["ci95"] if math.isfinite(r["ci95"]) else 0
                                                                      for r in recs], marker="o", capsize=3, label=arm)
            chance = {"bon_accuracy": "bon_random", "first_error_acc": "first_error_chance"}.get(metric)
            level = [r["mean"] for r in summary if r["metric"] == chance]
            if level:
                ax.axhline(float(np.mean(level)), color="grey", linestyle="--", linewidth=1, label="chance")
            if position and metric in position:
                ax.axhline(position[metric], color="black", linestyle=":", linewidth=1, label="falls with position")
            sizes = sorted({r["train_pairs"] for r in summary})
            ax.set_xscale("log"), ax.set_xticks(sizes, [str(n) for n in sizes]), ax.minorticks_off()
            ax.set_title(f"{LABELS[metric]}\nstart: {rm_start}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def report(out: Path, readme: Path | None, summary_readme: Path | None = None) -> str:
    rows = read_rows(out)
    if not any(r["metric"] == DONE_METRIC and r["eval_split"] == "eval" for r in rows):
        raise SystemExit(f"{out}: no finished cells on the evaluation split yet")
    notes_path = out.with_suffix(".notes.json")
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    table = by_seed(rows)
    summary, tests = summarize(table), all_tests(table)
    summary_path, tests_path, plot_path = (out.with_name(out.stem + suffix) for suffix in ("_summary.csv", "_tests.csv", ".png"))
    write_csv(summary_path, summary)
    if tests:
        write_csv(tests_path, tests)
    from icrm.data import read_rows as read_data
    from icrm.metrics import position_baseline

    position = position_baseline(read_data(str(DATA / SPLITS["eval"][0])))
    plot(summary, plot_path, position)
    checks = sorted(out.parent.glob(out.stem + "_cpu_check_*.csv"))
    section = render_section(rows, tests, summary, notes, out.name, plot_path.name, tests_path.name, checks, position)
    if readme is not None:
        splice(readme, README_BEGIN, README_END, section)
    if summary_readme is not None and tests:
        splice(summary_readme, SUMMARY_BEGIN, SUMMARY_END, render_summary(tests))
    print(f"wrote {summary_path}, {tests_path}, {plot_path}" + (f", section in {readme}" if readme else "")
          + (f", summary in {summary_readme}" if summary_readme and tests else ""))
    return section


def validation_table(out: Path) -> str:
    """Per (lr, steps, size): validation means over seeds and starts of each arm, and their average
    over arms (the selection criterion in the pre-registration)."""
    rows = [r for r in read_rows(out) if r["eval_split"] == "val"]
    done = {cell_key(r) for r in rows if r["metric"] == DONE_METRIC}
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        if cell_key(r) in done and r["metric"] in ("pair_accuracy", "bon_accuracy"):
            key = (float(r["rm_lr"]), int(r["rm_steps"]), float(r["sft_lr"]), int(r["sft_steps"]), r["start"], int(r["train_pairs"]), r["metric"])
            groups.setdefault(key, {}).setdefault(r["arm"], []).append(float(r["value"]))
    lines = ["| lr | steps | sft lr | sft steps | start | pairs | metric | " + " | ".join(DEFAULT_ARMS) + " | mean over arms |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(DEFAULT_ARMS) + 1)]
    for key, arms in sorted(groups.items()):
        means = [float(np.mean(arms[a])) if a in arms else float("nan") for a in DEFAULT_ARMS]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(f"{m:.3f}" for m in means)
                     + f" | {np.nanmean(means):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="raw rows CSV (appended, resumable); default "
                        "benchmarks/results/quality.csv, with --quick runs/quality_quick/quality.csv")
    parser.add_argument("--readme", default=None, help="README whose quality section is rewritten "
                        "(default benchmarks/results/README.md; with --quick or --validation none)")
    parser.add_argument("--summary-readme", default=None, help="README whose quality-summary markers get the primary "
                        "table (default the top-level README.md with the default --readme; otherwise none)")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed (validation runs use seeds apart)")
    parser.add_argument("--seeds-random", type=int, default=None, help="seeds of the random start (default --seeds)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[500, 1000])
    parser.add_argument("--starts", type=lambda s: s.split(","), default=list(STARTS))
    parser.add_argument("--arms", type=lambda s: s.split(","), default=list(DEFAULT_ARMS))
    parser.add_argument("--rm-steps", type=int, default=150, help="optimizer steps of every reward model")
    parser.add_argument("--rm-lr", type=float, default=3e-3, help="peak learning rate of every reward model")
    parser.add_argument("--sft-steps", type=int, default=150, help="optimizer steps of the generator SFT")
    parser.add_argument("--sft-lr", type=float, default=1e-3, help="peak learning rate of the generator SFT")
    parser.add_argument("--validation", action="store_true", help="score on the validation split "
                        "(process_val.jsonl, process_bon_val.jsonl) and print the selection table")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1 torch thread each)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 500 pairs, 20 + 20 steps, under runs/")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tests, summary, plot and README section")
    parser.add_argument("--update-results", action="store_true",
                        help="write benchmarks/results/quality.csv, its README section and README.md's summary "
                             "(default: everything under runs/benchmarks/)")
    args = parser.parse_args(argv)
    for name, given, allowed in (("--arms", args.arms, ARMS), ("--starts", args.starts, STARTS)):
        bad = [a for a in given if a not in allowed]
        if bad:
            parser.error(f"{name}: unknown value(s) {bad}; expected some of {allowed}")
    if args.quick:
        args.seeds, args.sizes, args.rm_steps, args.sft_steps = 2, [500], 20, 20
    args.seeds_random = args.seeds if args.seeds_random is None else args.seeds_random
    args.eval_split = "val" if args.validation else "eval"
    default_out = REPO / "runs" / "quality_quick" / "quality.csv" if args.quick else (
        RESULTS / "quality.csv" if args.update_results else RUNS_DIR / "quality.csv")
    args.out = Path(args.out or default_out)
    readme = Path(args.readme) if args.readme else (
        None if args.quick or args.validation else RESULTS / "README.md" if args.update_results else RUNS_DIR / "README.md")
    if not args.report_only:
        run_study(args)
    summary_readme = Path(args.summary_readme) if args.summary_readme else (
        REPO / "README.md" if readme == RESULTS / "README.md" else None)
    if args.validation:
        print(validation_table(args.out))
    else:
        report(args.out, readme, summary_readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
