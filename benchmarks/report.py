"""Renders a results folder's README and the top README's "Performance" section from its CSVs.

Reads ``<folder>/*.csv`` and their ``.notes.json`` (machine, skipped implementations, absolute
memory) and the PNGs ``plot.py`` wrote, and writes ``<folder>/README.md`` and
``<folder>/performance_section.md`` (the top README's section, to look at). The folder is
``runs/benchmarks/`` (git-ignored) unless named; only ``--update-results`` renders the shipped
``benchmarks/results/`` and splices the section into ``README.md``. Nothing here is typed by
hand: rerun the benchmarks, then
``python -m benchmarks.plot --update-results && python -m benchmarks.report --update-results``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.paths import README, RESULTS_DIR, RUNS_DIR
from benchmarks.runbook_spec import runbook_section

IMPL_ORDER = ("triton", "reference", "ours", "eager", "compile", "torch_linear_ce", "liger", "cce", "cublas_1gemm",
              "cublas_3gemm")
#: The bare-GEMM bound of each pass (``bench_linear_logprobs.py``), measured in the same run.
BOUND_IMPL = {"fwd": "cublas_1gemm", "fwd+bwd": "cublas_3gemm"}
KIND_TITLE = {"cpu": "CPU", "cuda": "GPU"}


PREDICTED_PREFIX = "predicted_"
#: The quality study (``benchmarks/bench_quality.py``) renders its own CSVs and README section.
QUALITY_PREFIX = "quality"
QUALITY_BEGIN, QUALITY_END = "<!-- quality:begin -->", "<!-- quality:end -->"


def measured_csvs(results_dir: Path) -> list[Path]:
    """The benchmark CSVs; ``predicted_*.csv`` (``benchmarks/predict.py``) are rendered apart."""
    return sorted(p for p in results_dir.glob("*.csv") if not p.name.startswith((PREDICTED_PREFIX, QUALITY_PREFIX)))


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _ms(text) -> str:
    x = _num(text)
    if x is None:
        return text or "-"
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _mb(text) -> str:
    x = _num(text)
    return "-" if x is None else f"{x:,.0f}"


def _impl_key(impl):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines + [""]


def load(path: Path):
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    notes_path = path.with_suffix(".notes.json")
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    return rows, notes


def _reps(notes) -> dict:
    return {c["label"]: c for c in notes.get("cases", [])}


def _label(r) -> str:
    return f"{r['op']} {r['impl']} {r['pass']} N={r['N']} D={r['D'] or None} V={r['V'] or None} {r['dtype']}"


def shape_tables(rows, notes, gemm: bool) -> list[str]:
    """Per op and pass: one row per shape and implementation."""
    out = []
    cases = _reps(notes)
    for op in sorted({r["op"] for r in rows}):
        for pass_ in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["op"] == op and r["pass"] == pass_]
            if not sel:
                continue
            sel.sort(key=lambda r: (int(r["N"]), _num(r["D"]) or 0, _num(r["V"]) or 0, _impl_key(r["impl"])))
            cpu_run = any(c.get("cpu_ms") for c in notes.get("cases", []))
            header = ["N", "D", "V", "dtype", "impl", "ms (median)", "p20-p80"] + (["CPU ms"] if cpu_run else []) + [
                "peak MB", "reps"]
            bounds = {(r["N"], r["D"], r["V"], r["dtype"]): _num(r["ms"]) for r in sel if r["impl"] == BOUND_IMPL[pass_]}
            if gemm:
                header += ["TFLOP/s", "of GEMM peak"] + ([f"x bare {BOUND_IMPL[pass_]}"] if bounds else [])
            body = []
            for r in sel:
                note = cases.get(_label(r), {})
                reps = note.get("reps")
                line = [r["N"], r["D"], r["V"], r["dtype"], r["impl"], _ms(r["ms"]),
                        f"{_ms(r['ms_p20'])}-{_ms(r['ms_p80'])}" if r["ms_p20"] else ""]
                if cpu_run:
                    line.append(_ms(str(note["cpu_ms"])) if note.get("cpu_ms") else "-")
                line += [_mb(r["peak_mb"]),
                        "do_bench" if reps is None and r["ms"] != "OOM" else (reps or "")]
                if gemm:
                    bound, ms = bounds.get((r["N"], r["D"], r["V"], r["dtype"])), _num(r["ms"])
                    line += [r["tflops"] or "", f"{float(r['gemm_frac']):.0%}" if r["gemm_frac"] else ""]
                    if bounds:
                        line.append(f"{ms / bound:.2f}x" if bound and ms else "-")
                body.append(line)
            out += [f"**{op}, {pass_}**", ""] + _table(header, body)
    return out


def skipped_lines(notes) -> list[str]:
    """Skipped / mismatching / OOM implementations, grouped by reason."""
    by_reason = defaultdict(list)
    for s in notes.get("skipped", []):
        parts = s["label"].split()
        # A case's label is "op impl pass ..."; a whole stage cut off is named by its op alone.
        impl = parts[1] if len(parts) > 1 else "all"
        by_reason[(impl, s["status"], s["reason"])].append(s["label"])
    lines = []
    for (impl, status, reason), labels in sorted(by_reason.items()):
        lines.append(f"- `{impl}` {status} in {len(labels)} case(s): {reason}")
    return lines + [""] if lines else []


def _median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def naive_vs_chunked(rows, notes, source: str) -> list[str]:
    """The foundation issue's number: naive (full logits) vs our chunked reference, fwd+bwd.

    With several rows per implementation and N (the A/B rounds), the medians are compared.
    """
    cases = defaultdict(list)
    for c in notes.get("cases", []):
        cases[c["label"]].append(c)
    groups = defaultdict(list)
    for r in rows:
        if r["op"] == "linear_logprobs" and r["pass"] == "fwd+bwd" and r["impl"] in ("eager", "reference_naive", "reference"):
            groups[(r["impl"], r["N"], r["D"], r["V"])].append(r)

    def stats(sel):
        labels = {_label(r) for r in sel}
        return dict(ms=_median(_num(r["ms"]) for r in sel), mb=_median(_num(r["peak_mb"]) for r in sel),
                    abs=_median(c["peak_abs_mb"] for lab in labels for c in cases.get(lab, [])),
                    cpu=_median(c.get("cpu_ms") for lab in labels for c in cases.get(lab, [])),
                    each=", ".join(_ms(r["ms"]) for r in sel), n=len(sel))

    body = []
    pairs = sorted({(k[1:], k[0]) for k in groups if k[0] != "reference"}, key=lambda p: (int(p[0][0]), p[1]))
    for shape, naive in pairs:
        if ("reference", *shape) not in groups:
            continue
        e, c = stats(groups[(naive, *shape)]), stats(groups[("reference", *shape)])
        if e["ms"] is None or c["ms"] is None:
            continue
        body.append([f"`{naive}`", *shape, min(e["n"], c["n"]), f"{e['ms']:,.0f} ({e['each']})", f"{c['ms']:,.0f} ({c['each']})",
                     f"{e['ms'] / c['ms']:.2f}x", f"{e['cpu'] / c['cpu']:.2f}x" if e["cpu"] and c["cpu"] else "-",
                     _mb(e["mb"]), _mb(c["mb"]), f"{e['mb'] / c['mb']:.1f}x", _mb(e["abs"]), _mb(c["abs"])])
    if not body:
        return []
    header = ["naive", "N", "D", "V", "rounds", "naive ms (each)", "chunked ms (each)", "wall time naive/chunked",
              "CPU time naive/chunked", "naive extra MB", "chunked extra MB", "extra memory naive/chunked",
              "naive peak RSS MB", "chunked peak RSS MB"]
    return [f"**Naive vs our chunked reference** (`linear_logprobs`, fp32, forward + backward; {source})", "",
            "Naive: `eager` (full logits, `log_softmax`, `gather`: the authors' way) and, in the A/B run, "
            "`reference_naive` (the library's unchunked oracle: full logits, `logsumexp`). Chunked: `reference` "
            "(rows in chunks of 2^25 logits, 1048 rows at V=32000, logits recomputed in the backward). "
            "Target of the foundation issue: at least 4x less extra memory than naive at no more time. "
            "Medians over the rounds; a ratio above 1 favours the chunked path. Extra MB is peak RSS minus the "
            "RSS of the process holding the inputs. CPU time (process user + system time of the call, all "
            "threads) is less disturbed than wall time by other jobs on a shared machine.", ""
            ] + _table(header, body)


#: The GPU issue's targets, for forward + backward of this op and shape, measured in one run.
TARGET = {"op": "linear_logprobs_and_rewards", "pass": "fwd+bwd", "N": 16384, "D": 4096, "V": 128256, "dtype": "bf16"}
TARGET_GEMM_FRAC = 0.60
TARGET_EXTRA_MEMORY = 0.10
#: Against the bare GEMMs of the same run: fwd+bwd within this factor of the three GEMMs' time,
#: and the forward at least this fraction of one GEMM's rate (its time over ours).
TARGET_OVER_3GEMM = 1.15
TARGET_FWD_OF_1GEMM = 0.85
ITEMSIZE = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def target_check(rows, target: dict = TARGET, ours: str = "triton") -> list[dict]:
    """The GPU issue's targets at ``target``'s shape, from one run's rows.

    Returns ``[{"target", "value", "met"}]``; ``met`` is None where a number is missing (not
    measured, OOM, skipped). Bare GEMMs: ours over ``cublas_3gemm`` (fwd+bwd) and ``cublas_1gemm``
    over ours (fwd, the target's shape), both timed in the same run. GEMM fraction: 6NDV FLOPs per call (the reward head's 6ND left
    out) over the same run's ``torch.matmul`` rate on ``[N, D] x [D, V]``. Extra memory: peak
    beyond the inputs (``peak_mb``, which holds the gradients) minus the gradients, over inputs
    + gradients (hidden, weight, value_weight in the run's dtype, int64 targets).
    """
    sel = {r["impl"]: r for r in rows if all(str(r[k]) == str(v) for k, v in target.items())}
    fwd = {r["impl"]: r for r in rows if r["pass"] == "fwd"
           and all(str(r[k]) == str(v) for k, v in target.items() if k != "pass")}

    def ms(impl):
        return _num(sel[impl]["ms"]) if impl in sel else None

    n, d, v, item = target["N"], target["D"], target["V"], ITEMSIZE[target["dtype"]]
    mine = ms(ours)
    checks = []
    for peer, name in (("cce", "cut-cross-entropy"), ("liger", "Liger-Kernel")):
        theirs = ms(peer)
        value = f"{ours} {_ms(sel.get(ours, {}).get('ms'))} ms, {peer} {_ms(sel.get(peer, {}).get('ms'))} ms"
        checks.append({"target": f"faster than {name}", "value": value,
                       "met": None if not (mine and theirs) else mine < theirs})
    row = sel.get(ours, {})
    tflops, frac = _num(row.get("tflops")), _num(row.get("gemm_frac"))
    if mine and tflops and frac:
        gemm = tflops / frac
        achieved = 6.0 * n * d * v / (mine * 1e-3) / 1e12
        checks.append({"target": f">= {TARGET_GEMM_FRAC:.0%} of the run's bf16 GEMM rate (6NDV)",
                       "value": f"{achieved:.4g} / {gemm:.4g} TFLOP/s = {achieved / gemm:.1%}",
                       "met": achieved / gemm >= TARGET_GEMM_FRAC})
    else:
        checks.append({"target": f">= {TARGET_GEMM_FRAC:.0%} of the run's bf16 GEMM rate (6NDV)", "value": "not measured",
                       "met": None})
    for name, goal, pair, ratio_of in (
            (f"fwd+bwd within {TARGET_OVER_3GEMM}x of the bare 3-GEMM cuBLAS time", TARGET_OVER_3GEMM,
             (sel.get(ours), sel.get("cublas_3gemm")), lambda o, b: o / b),
            (f"fwd >= {TARGET_FWD_OF_1GEMM:.0%} of one cuBLAS GEMM's rate", TARGET_FWD_OF_1GEMM,
             (fwd.get(ours), fwd.get("cublas_1gemm")), lambda o, b: b / o)):
        o, b = (_num(r["ms"]) if r else None for r in pair)
        if o and b:
            value = ratio_of(o, b)
            text = f"{ours} {_ms(str(o))} ms, bare GEMM(s) {_ms(str(b))} ms: " + (
                f"{value:.2f}x" if "within" in name else f"{value:.0%}")
            met = value <= goal if "within" in name else value >= goal
        else:
            text, met = "not measured", None
        checks.append({"target": name, "value": text, "met": met})
    params_mb = (n * d + v * d + d) * item / (1024.0 * 1024.0)
    inputs_grads_mb = 2 * params_mb + n * 8 / (1024.0 * 1024.0)
    peak = _num(row.get("peak_mb"))
    extra = None if peak is None else (peak - params_mb) / inputs_grads_mb
    checks.append({"target": f"peak extra memory <= {TARGET_EXTRA_MEMORY:.0%} of inputs + grads",
                   "value": "not measured" if extra is None else
                   f"{peak - params_mb:.4g} MB beyond inputs and grads / {inputs_grads_mb:.4g} MB = {extra:.1%}",
                   "met": None if extra is None else extra <= TARGET_EXTRA_MEMORY})
    return checks


def target_lines(rows) -> list[str]:
    shape = ", ".join(f"{k}={TARGET[k]}" for k in ("N", "D", "V"))
    body = [[c["target"], c["value"], {True: "met", False: "NOT met", None: "not measured"}[c["met"]]]
            for c in target_check(rows)]
    return [f"**GPU targets** (`{TARGET['op']}`, {TARGET['pass']}, {shape}, {TARGET['dtype']}; ours = `triton`, "
            "all numbers from the same run)", ""] + _table(["target", "measured", "verdict"], body)


def consistency_tables(rows, notes) -> list[str]:
    copy = notes.get("copy_gbps")
    out = [f"Bytes model: {notes.get('bytes_model', '')}. Measured copy bandwidth of this device: "
           f"{copy:.1f} GB/s (`copy_` between two resident 256 MiB buffers, read + write)." if copy else "", ""]
    for op in sorted({r["op"] for r in rows}):
        sel = sorted((r for r in rows if r["op"] == op), key=lambda r: (int(r["N"]), _impl_key(r["impl"])))
        body = []
        for r in sel:
            ms = _num(r["ms"])
            gbps = int(r["N"]) * (2 * (4 + 4 + 1) + 4) / (ms * 1e-3) / 1e9 if ms else None
            body.append([r["N"], r["impl"], _ms(r["ms"]), f"{_ms(r['ms_p20'])}-{_ms(r['ms_p80'])}", _mb(r["peak_mb"]),
                         f"{gbps:.2f}" if gbps else "-", f"{gbps / copy:.1%}" if gbps and copy else "-"])
        out += [f"**{op}, fwd+bwd**", ""] + _table(
            ["tokens", "impl", "ms", "p20-p80", "peak MB", "GB/s", "of copy bandwidth"], body)
    return out


def train_step_tables(rows, notes) -> list[str]:
    cases = _reps(notes)
    all_cases = defaultdict(list)
    for c in notes.get("cases", []):
        all_cases[c["label"]].append(c)
    out = [f"Config `{notes.get('config')}` {notes.get('config_params')}: {notes.get('params_per_model', 0) / 1e6:.1f} M "
           f"parameters per model (RM trained + generator frozen), {notes.get('pairs')} pair(s) = "
           f"{2 * (notes.get('pairs') or 0)} rows per step"
           + (", `ours` on padding-free packed rows (one row per step)." if notes.get("packed") else "."), ""]
    for impl, text in (notes.get("impls") or {}).items():
        out.append(f"- `{impl}`: {text}")
    if notes.get("impls"):
        out.append("")
    if notes.get("loadavg"):
        load = notes["loadavg"]
        out += [f"Load average (1 min) of the machine: {load['start']:.1f} at the start of the run, "
                f"{load['end']:.1f} at its end.", ""]
    # The checked run and the memory probe may measure the same T: one line, medians.
    groups = defaultdict(list)
    for r in rows:
        groups[(int(r["N"]), r["impl"])].append(r)
    body = []
    for (tokens, impl), sel in sorted(groups.items(), key=lambda kv: (kv[0][0], _impl_key(kv[0][1]))):
        ms = _median(_num(r["ms"]) for r in sel)
        length = tokens // (2 * (notes.get("pairs") or 1))
        peak_abs = cases.get(_label(sel[0]), {}).get("peak_abs_mb")
        cpu = _median(c.get("cpu_ms") for c in all_cases.get(_label(sel[0]), []))
        body.append([length, tokens, impl, len(sel), f"{ms:,.0f}" if ms else "OOM", f"{tokens / (ms * 1e-3):,.0f}" if ms else "-",
                     f"{cpu:,.0f}" if cpu else "-", _mb(str(_median(_num(r["peak_mb"]) for r in sel))), _mb(peak_abs)])
    out += _table(["T", "tokens/step", "impl", "runs", "ms/step (median)", "tokens/s", "CPU ms/step", "extra MB",
                   "peak RSS MB"], body)
    cap = notes.get("cap_mb")
    if notes.get("max_T"):
        rule = f"peak RSS of the worker process <= {cap:.0f} MB" if cap else "no CUDA out-of-memory"
        start = notes["max_T"][0].get("search_start_T", 256)
        out += [f"**Longest sequence that fits** ({rule}; T doubled from {start}, then bisected in steps of 256):", ""]
        out += _table(["impl", "max T", "note"], [
            [m["impl"], m["max_T"], "search stopped by the time budget (a lower bound)" if m.get("stopped_by_budget")
             else f"search capped at T={m['search_cap_T']}" if m["hit_search_cap"] else ""]
            for m in notes["max_T"]])
    return out


def render(results_dir: Path = RESULTS_DIR) -> str:
    lines = ["# Performance", "",
             "Generated by `benchmarks/report.py` from the CSVs in this folder "
             "(`python -m benchmarks.bench_<op> --quick --update-results` on CPU, without `--quick` on a GPU; then "
             "`python -m benchmarks.plot --update-results && python -m benchmarks.report --update-results`).", "",
             "How to read the numbers:", "",
             "- `ms`: median wall time of one call; `p20-p80` its spread. GPU: `triton.testing.do_bench`. "
             "CPU: a timed loop after a warm-up call that is also the correctness check; calls longer "
             "than the time budget run once (`reps` = 1; for uncompiled implementations that checked "
             "first call is the sample). The CPU is shared with other jobs: the committed CPU numbers were "
             "measured at a load average of about 0.5-2 on 2 cores; runs at a load of 3-6 were 2-3x slower "
             "in wall time (and up to 100x for the many small ops of `consistency_loss`). `CPU ms` (user + "
             "system time of the worker process during the call, both threads) is less disturbed by such "
             "load than wall time.",
             "- `peak MB` is the memory a call needs *beyond its inputs*, gradients included: "
             "CPU: peak RSS of the worker process during the call minus the RSS of the same process "
             "holding only the inputs (each implementation runs in its own process; the peak is reset "
             "between cases through `/proc/self/clear_refs`). GPU: `torch.cuda.max_memory_allocated` "
             "during one call minus what was allocated before it.",
             "- Every implementation's output (log-probs, and gradients for fwd+bwd) was checked against "
             "ours (`reference`) before it was timed; one that disagrees is listed as a mismatch, not timed.",
             "- `TFLOP/s`: 2NDV (fwd) or 6NDV (fwd+bwd) per call; `of GEMM peak`: that over the TFLOP/s of "
             "`torch.matmul` on `[N, D] x [D, V]` measured in the same run (bf16 on GPU, the run's dtype on CPU, "
             "the fastest of a few calls). On the shared CPU the GEMM and the op were timed at different moments "
             "of the other jobs' load, so a fraction above 100% only says the op was timed at a quieter moment.",
             ""]
    order = ("linear_logprobs", "consistency", "train_step")
    csvs = sorted(measured_csvs(results_dir),
                  key=lambda p: (order.index(p.stem.rsplit("_", 1)[0]) if p.stem.rsplit("_", 1)[0] in order else len(order), p.name))
    kinds = sorted({p.stem.rsplit("_", 1)[1] for p in csvs})
    if "cuda" not in kinds:
        lines += ["**GPU numbers are pending**: no GPU was available when these were measured; "
                  "the GPU sweep (N in {4096, 16384} x D in {2048, 4096} x V in {32000, 128256, 256000}, bf16, "
                  "plus the ICRM paper recipe N=6144, D=2048, V=256000), the CUDA tests, `consistency_loss` and the "
                  "train step run with the GPU runbook (last section).", ""]
    for path in csvs:
        rows, notes = load(path)
        stem, kind = path.stem.rsplit("_", 1)
        if stem == "linear_logprobs_naive_vs_chunked":
            continue  # rendered inside the linear_logprobs section
        device = rows[0]["device"] if rows else notes.get("device", "")
        versions = f"torch {rows[0]['torch']}, triton {rows[0]['triton']}, commit {rows[0]['commit']}" if rows else ""
        lines += [f"## `{stem}` on {KIND_TITLE.get(kind, kind)}: {device}", "", f"{versions}; mode `{notes.get('mode')}`.", ""]
        if stem == "linear_logprobs":
            ab = results_dir / f"linear_logprobs_naive_vs_chunked_{kind}.csv"
            if ab.exists():
                lines += naive_vs_chunked(*load(ab), "alternating A/B rounds, a fresh process per call, "
                                          "from `bench_linear_logprobs.py --naive-vs-chunked`")
            lines += naive_vs_chunked(rows, notes, "from the sweep below")
            if kind == "cuda":
                lines += target_lines(rows)
            lines += shape_tables(rows, notes, gemm=True)
        elif stem == "consistency":
            lines += consistency_tables(rows, notes)
        elif stem.startswith("train_step"):
            lines += train_step_tables(rows, notes)
        else:
            lines += shape_tables(rows, notes, gemm=False)
        skipped = skipped_lines(notes)
        if skipped:
            lines += ["Not timed:", ""] + skipped
        for png in sorted(results_dir.glob(f"{path.stem}__*.png")):
            lines += [f"![{png.stem}]({png.name})", ""]
    lines += predicted_section(results_dir)
    lines += runbook_section(results_dir)
    return "\n".join(lines).rstrip() + "\n"


def _predicted_intro(notes) -> str:
    hw, cal = notes.get("hardware", {}), notes.get("calibration_check", {})
    check = ""
    if cal:
        model, published = cal.get("model_ms", {}), cal.get("published_ms", {})
        point = cal.get("point", {})
        check = (f" Check against the one published H100 point (fwd+bwd, N={point.get('N')}, D={point.get('D')}, "
                 f"V={point.get('V')}, {point.get('source')}): CCE published {published.get('cce')} ms, model "
                 f"{model.get('cce live 0.5')} ms at live 0.5 / {model.get('cce live 0.2')} ms at live 0.2 (CCE is not "
                 f"fitted); Liger published {published.get('liger')} ms, model {model.get('liger live 0.5')} ms (its "
                 f"chunked cuBLAS efficiency, {notes.get('cublas', {}).get('liger_chunked')}, is fitted to it).")
    return (f"**Predicted, not measured.** `python -m benchmarks.predict` (`benchmarks/perfmodel/`), on "
            f"{hw.get('name', '?')} constants ({hw.get('sms')} SMs, bf16 GEMM {hw.get('gemm_tflops', {}).get('bf16')} "
            f"TFLOP/s measured with cuBLAS, DRAM {hw.get('dram_tbps')} TB/s, L2 {hw.get('l2_tbps')} TB/s, exponentials "
            f"{hw.get('sfu_tflops')} TFLOP/s). Every kernel is timed by its *structure* (tile, K step, warps, stages, "
            f"pipelined or not, wgmma or not), never by a per-implementation fit: an efficiency per structure (most are "
            f"first-principles estimates, each source listed in the results README), an L2-bandwidth cap per tile shape, "
            f"the softmax's exponentials, a cost per dead K step or dead tile, DRAM from an LRU model of the L2 driven by "
            f"each launch order; ours read from `icrm_kernels/linear_logprobs/plan.py`, CCE with its real configs "
            f"(fwd 256x128x32, 8 warps, 3 stages; bwd 128x128x32, 4 warps, 4 stages) and its vocabulary sort (its live "
            f"fraction x {notes.get('cce_sorted_live_ratio')}), Liger with its row chunks, `cublas_1gemm` / "
            f"`cublas_3gemm` the bare GEMMs (no softmax). `live` = fraction of 128x128 logit tiles whose gradient "
            f"survives the filter, in natural vocabulary order (published block-level measurements on a real 0.5B "
            f"model: 61%; 0.5 is the default, 0.2 optimistic)." + check)


def _predicted_rows(rows) -> list[list[str]]:
    body = []
    for r in sorted(rows, key=lambda r: (int(r["N"]), int(r["D"]), int(r["V"]), r["pass"], float(r["live_frac"]),
                                         _impl_key(r["impl"]))):
        share = float(r["extra_mb"]) / float(r["inputs_grads_mb"])
        live = r["live_frac"] if r["pass"] == "fwd+bwd" and not r["impl"].startswith(("cublas", "liger")) else "-"
        body.append([r["N"], r["D"], r["V"], r["dtype"], r["pass"], live, r["impl"], r["pred_ms"], r["bound"],
                     r["flops_t"], r["dram_gb"], r.get("l2_gb", ""), r["atomic_gb"], _mb(r["extra_mb"]), f"{share:.1%}"])
    return body


_PREDICTED_HEADER = ["N", "D", "V", "dtype", "pass", "live", "impl", "predicted ms", "bound by", "TFLOP", "DRAM GB",
                     "L2 GB", "atomic GB", "extra MB", "extra / (inputs + grads)"]


def _sensitivity_table(notes) -> list[str]:
    """Every impl's ms and ours against the goals, under each assumption varied alone."""
    rows = notes.get("sensitivity", [])
    if not rows:
        return []
    goals = notes.get("goals", {})
    impls = list(rows[0]["ms"])
    header = ["assumption", "value"] + [f"{k} ms" for k in impls] + [
        f"ours fwd+bwd / 3-GEMM (goal <= {goals.get('fwd_bwd_over_3gemm')}x)",
        f"ours fwd vs 1 GEMM (goal >= {goals.get('fwd_gemm_fraction', 0):.0%})"]
    body = [[r["assumption"], r["value"]] + [f"{r['ms'][k]:.4g}" for k in impls]
            + [f"{r['fwd_bwd_over_3gemm']:.2f}x", f"{r['fwd_gemm_fraction']:.0%}"] for r in rows]
    h = notes.get("headline", {})
    return [f"**Sensitivity** (N={h.get('N')}, D={h.get('D')}, V={h.get('V')}, {h.get('dtype')}; each assumption "
            f"varied alone from the base, live {h.get('live_frac')}; PREDICTED):", ""] + _table(header, body)


def _structures_table(notes) -> list[str]:
    body = [[f"`{s['impl']}`", f"`{s['kernel']}`", s["structure"], f"{s['efficiency']:.3f}", s["l2_bytes_per_flop"],
             s["source"]] for s in notes.get("structures", [])]
    if not body:
        return []
    present = notes.get("plan_attributes_read", {}).get("present", {})
    missing = [k for k, v in present.items() if not v]
    defaults = notes.get("plan_attributes_read", {}).get("pipelined_default", {})
    unpiped = [k for k, v in defaults.items() if not v]
    plan_note = (f" Plan attributes read besides the block sizes, warps and stages: "
                 f"{', '.join(f'`{k}`' for k in present)}; absent from today's plan: "
                 f"{', '.join(f'`{k}`' for k in missing) or 'none'} (then {', '.join(f'`{k}`' for k in unpiped)} "
                 f"count as unpipelined, the other kernels as pipelined, and wgmma on sm_90).") if present else ""
    return (["**Kernel structures** at the headline shape (efficiency relative to the measured cuBLAS rate; L2 "
             "bytes per FLOP set the L2 cap)." + plan_note, ""]
            + _table(["impl", "kernel", "structure", "efficiency", "L2 B/FLOP", "source"], body))


def predicted_section(results_dir: Path) -> list[str]:
    """``predicted_<arch>.csv``: one table per file, headed and labelled as a prediction, with its
    structures, sensitivity table and goals."""
    lines = []
    for path in sorted(results_dir.glob(f"{PREDICTED_PREFIX}*.csv")):
        rows, notes = load(path)
        if not rows:
            continue
        arch = path.stem[len(PREDICTED_PREFIX):]
        shapes = ";".join(dict.fromkeys(f"{r['N']},{r['D']},{r['V']}" for r in rows))
        fracs = ",".join(dict.fromkeys(r["live_frac"] for r in rows if r["pass"] == "fwd+bwd"))
        lines += [f"## `linear_logprobs` on {arch}: PREDICTED, NOT MEASURED", "", _predicted_intro(notes), "",
                  f"Written by `python -m benchmarks.predict --shape '{shapes}' --dtype {rows[0]['dtype']} --arch {arch} "
                  f"--live-frac {fracs} --update-results` (a few minutes on 2 cores).", ""]
        lines += _table(_PREDICTED_HEADER, _predicted_rows(rows))
        lines += _predicted_verdict(rows, notes) + _sensitivity_table(notes) + _structures_table(notes)
    return lines


README_BEGIN, README_END = "<!-- performance:begin -->", "<!-- performance:end -->"


def summary(results_dir: Path = RESULTS_DIR) -> str:
    """The top README's short "Performance" section: per op and device, the largest measured N
    (fwd+bwd) per implementation, and the train step's longest sequence; full tables linked."""
    rel = "benchmarks/results"
    lines = ["## Performance", "",
             f"Generated by `benchmarks/report.py` from the CSVs in `{rel}/`; every table and plot is in "
             f"[`{rel}/README.md`]({rel}/README.md). Extra MB = memory beyond the inputs, gradients included.", ""]
    csvs = measured_csvs(results_dir)
    if not any(p.stem.endswith("_cuda") for p in csvs):
        lines += ["**GPU numbers are pending** (no GPU has been lent to this project yet); the CPU numbers "
                  "below compare the PyTorch paths. The GPU runbook that measures them is described in the results "
                  "README.", ""]
    for path in csvs:
        stem, kind = path.stem.rsplit("_", 1)
        rows, notes = load(path)
        if not rows or stem == "linear_logprobs_naive_vs_chunked":
            continue
        lines += [f"**`{stem}`, {KIND_TITLE.get(kind, kind)} ({rows[0]['device']})**", ""]
        if stem.startswith("train_step"):
            fits = {m["impl"]: m for m in notes.get("max_T", [])}
            by_impl = defaultdict(list)
            for r in rows:
                by_impl[r["impl"]].append(r)
            common = set.intersection(*({int(r["N"]) for r in rs} for rs in by_impl.values()))
            n_common = max(common) if common else None
            body = []
            for impl in sorted(by_impl, key=_impl_key):
                at = [r for r in by_impl[impl] if int(r["N"]) == n_common and _num(r["ms"])]
                m = fits.get(impl)
                longest = "-" if m is None else f"{m['max_T']}{'+' if m['hit_search_cap'] else ''}"
                speed = [f"{int(r['N']) / _num(r['ms']) * 1000:,.0f}" for r in at[:1]] or ["-"]
                body.append([impl, longest, n_common or "-", *speed, _ms(at[0]["ms"]) if at else "-", _mb(at[0]["peak_mb"]) if at else "-"])
            lines += _table(["impl", "longest T that fits", "tokens/step (largest run by all)", "tokens/s",
                             "ms/step", "extra MB"], body)
        else:
            body = []
            for op in sorted({r["op"] for r in rows}):
                sel = [r for r in rows if r["op"] == op and r["pass"] == "fwd+bwd"]
                if not sel:
                    continue
                n_max = max(int(r["N"]) for r in sel)
                for r in sorted((r for r in sel if int(r["N"]) == n_max), key=lambda r: _impl_key(r["impl"])):
                    body.append([f"`{op}`", r["impl"], r["N"], r["D"] or "-", r["V"] or "-", r["dtype"], _ms(r["ms"]), _mb(r["peak_mb"])])
            lines += _table(["op", "impl", "N", "D", "V", "dtype", "ms (fwd+bwd)", "extra MB"], body)
        for png in sorted(results_dir.glob(f"{path.stem}__*.png"))[:1]:
            lines += [f"![{png.stem}]({rel}/{png.name})", ""]
    for path in sorted(results_dir.glob(f"{PREDICTED_PREFIX}*.csv")):
        rows, notes = load(path)
        if not rows:
            continue
        first = (rows[0]["N"], rows[0]["D"], rows[0]["V"], rows[0]["dtype"])
        sel = [r for r in rows if (r["N"], r["D"], r["V"], r["dtype"]) == first]
        lines += [f"**`linear_logprobs` on {path.stem[len(PREDICTED_PREFIX):]}: PREDICTED, NOT MEASURED** "
                  f"(`python -m benchmarks.predict`; all shapes, kernel structures and sources in the results README)", "",
                  _predicted_intro(notes), ""]
        lines += _table(_PREDICTED_HEADER, _predicted_rows(sel)) + _predicted_verdict(sel, notes) + _sensitivity_table(notes)
    return "\n".join(lines).rstrip() + "\n"


def _predicted_verdict(rows, notes) -> list[str]:
    """Where ours is predicted ahead and where BEHIND, in words, at the first shape: against CCE
    and Liger at each live fraction, and against the GPU issue's goals (the bare GEMMs)."""
    first = (rows[0]["N"], rows[0]["D"], rows[0]["V"], rows[0]["dtype"])
    sel = [r for r in rows if (r["N"], r["D"], r["V"], r["dtype"]) == first]
    fwd = {r["impl"]: float(r["pred_ms"]) for r in sel if r["pass"] == "fwd"}
    bound3 = next((float(r["pred_ms"]) for r in sel if r["impl"] == "cublas_3gemm"), None)
    liger = next((float(r["pred_ms"]) for r in sel if r["impl"] == "liger" and r["pass"] == "fwd+bwd"), None)
    goals = notes.get("goals", {})
    behind, ahead = [], []

    def compare(what, ours, theirs, name):
        if ours and theirs:
            (behind if ours > theirs else ahead).append(f"{what}: {ours:.4g} ms vs {name} {theirs:.4g} ms "
                                                        f"({ours / theirs - 1:+.0%})")

    compare("fwd", fwd.get("triton"), fwd.get("cce"), "CCE")
    for frac in sorted({r["live_frac"] for r in sel if r["pass"] == "fwd+bwd"}, key=float):
        ms = {r["impl"]: float(r["pred_ms"]) for r in sel if r["pass"] == "fwd+bwd" and r["live_frac"] == frac}
        compare(f"fwd+bwd at live {frac}", ms.get("triton"), ms.get("cce"), "CCE")
        compare(f"fwd+bwd at live {frac}", ms.get("triton"), liger, "Liger")
    goal_lines = []
    base = next((r for r in notes.get("sensitivity", []) if r["assumption"] == "base"), None)
    if base:
        g3, g1, gm = goals.get("fwd_bwd_over_3gemm"), goals.get("fwd_gemm_fraction"), goals.get("extra_over_inputs_grads")
        for name, value, goal, met in (
                (f"fwd+bwd / bare 3-GEMM cuBLAS time (goal <= {g3}x)", f"{base['fwd_bwd_over_3gemm']:.2f}x", g3,
                 base["fwd_bwd_over_3gemm"] <= g3),
                (f"fwd rate / one cuBLAS GEMM's (goal >= {g1:.0%})", f"{base['fwd_gemm_fraction']:.0%}", g1,
                 base["fwd_gemm_fraction"] >= g1),
                (f"extra memory / (inputs + grads) (goal <= {gm:.0%})", f"{base['extra_over_inputs_grads']:.1%}", gm,
                 base["extra_over_inputs_grads"] <= gm)):
            goal_lines.append(f"- {name}: {value}, {'predicted met' if met else '**predicted NOT met**'}")
    h = notes.get("headline", {})
    out = []
    if behind:
        out.append("**Where ours is predicted BEHIND** (same model for all): " + "; ".join(behind) + ".")
    if ahead:
        out.append("Predicted ahead: " + "; ".join(ahead) + ".")
    if goal_lines:
        out += ["", f"**GPU goals, predicted** (N={h.get('N')}, D={h.get('D')}, V={h.get('V')}, {h.get('dtype')}, "
                f"live {h.get('live_frac')}; PREDICTED, NOT MEASURED; the GPU runbook measures them):", ""] + goal_lines
    return out + [""] if out else []


def split_section(text: str, begin: str, end: str) -> tuple[str, str, str] | None:
    """``(before begin, between the markers, after end)`` of ``text``; None unless it has both."""
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    return head, body, tail


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the performance markers of ``readme``; False if it has none."""
    parts = split_section(readme.read_text(), README_BEGIN, README_END)
    if parts is None:
        return False
    head, _, tail = parts
    readme.write_text(f"{head}{README_BEGIN}\n{section}{README_END}{tail}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("results_dir", nargs="?", default=None,
                       help=f"folder of the CSVs to render (default: {RUNS_DIR.relative_to(RUNS_DIR.parents[1])}/)")
    where.add_argument("--update-results", action="store_true",
                       help=f"render the shipped {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}/ and update the "
                            "Performance section of README.md")
    args = parser.parse_args(argv)
    results_dir = RESULTS_DIR if args.update_results else Path(args.results_dir or RUNS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / "README.md"
    text = render(results_dir)
    old = out.read_text() if out.exists() else ""
    quality = split_section(old, QUALITY_BEGIN, QUALITY_END)
    if quality is not None:  # keep bench_quality.py's section
        text = text.rstrip("\n") + "\n\n" + QUALITY_BEGIN + quality[1] + QUALITY_END + "\n"
    out.write_text(text)
    print(f"wrote {out}")
    section = summary(results_dir)
    if args.update_results:
        if update_readme(README, section):
            print(f"updated the Performance section of {README}")
    else:
        (results_dir / "performance_section.md").write_text(section)
        print(f"wrote {results_dir / 'performance_section.md'} (README.md is updated only with --update-results)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
