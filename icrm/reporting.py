"""What a run tells the user: ``metrics.jsonl`` (and TensorBoard), ``training.png``, the main
job's metric table, and the peak memory figure logged with every record."""

from __future__ import annotations

import json
import os
import resource

import torch

from .config import ARMS
from .io_safety import atomic_path


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class RunLog:
    """``<output_dir>/metrics.jsonl`` (one JSON record per line, written by rank 0 only) and, with
    ``report_to: tensorboard``, the same scalars under ``<output_dir>/runs``."""

    def __init__(self, output_dir: str, report_to: list[str] | None, is_main: bool):
        self.path, self.is_main = os.path.join(output_dir, "metrics.jsonl"), is_main
        self.tensorboard = None
        if report_to and "tensorboard" in report_to and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("report_to: tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "runs"))

    def restart(self, history: list[dict]) -> None:
        """Rewrite ``metrics.jsonl`` as ``history`` (a resumed run's past, once: replayed steps are not appended twice)."""
        if self.is_main:
            with atomic_path(self.path) as tmp, open(tmp, "w") as fh:
                fh.writelines(json.dumps(record) + "\n" for record in history)

    def append(self, record: dict) -> None:
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key if key.startswith("eval_") else f"train/{key}", value, record["step"])
            self.tensorboard.flush()


def plot_training(history: list[dict], path: str) -> str | None:
    """``training.png``: loss parts and accuracy against the optimizer step (None without matplotlib or records)."""
    try:
        import matplotlib
    except ImportError:
        print("icrm: matplotlib is not installed; skipping training.png (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    if not rows:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "bt_loss", "align_loss", "sft_loss"):
        if key in rows[0]:
            ax_loss.plot(steps, [r[key] for r in rows], label=key)
    ax_loss.set_xlabel("step"), ax_loss.set_title("training loss"), ax_loss.legend()
    if "accuracy" in rows[0]:
        ax_acc.plot(steps, [r["accuracy"] for r in rows], label="train (batch)")
        evals = [r for r in history if "eval_accuracy" in r]
        if evals:
            ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval")
        ax_acc.set_ylim(0, 1), ax_acc.set_xlabel("step"), ax_acc.set_title("pairwise accuracy"), ax_acc.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


#: Rows of the main job's table: (metric key, label).
TABLE_ROWS = (
    ("pair_accuracy", "pairwise accuracy"), ("value_spearman", "Spearman(token reward, V)"),
    ("value_auroc", "AUROC reachable (V > 0)"), ("first_error_acc", "first-error localisation"),
    ("bon_accuracy", "best-of-16 correct (distinct)"),
)


def metric_table(summary: dict, arms: list[str], names: list[str] | None = None) -> str:
    """One text table: a row per metric (held-out and longer inputs), a column per arm (``names``:
    the column titles, default the arms' printed names)."""
    names = names or [ARMS[a][0] for a in arms]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<34s}" + "".join(f"{n:>{width}s}" for n in names)]
    for suffix, title in (("", "held-out (eval_file, bon_file)"), ("_long", "longer inputs (eval_long_file, bon_long_file)")):
        keys = [(k + suffix, label) for k, label in TABLE_ROWS if any(k + suffix in summary.get(a, {}) for a in arms)]
        if not keys:
            continue
        lines.append(title)
        for key, label in keys:
            cells = "".join(f"{summary[a].get(key, float('nan')):>{width}.4f}" for a in arms)
            lines.append(f"  {label:<32s}{cells}")
        ref = next((summary[a] for a in arms if "first_error_chance" + suffix in summary[a]), None)
        if ref:
            lines.append(f"  {'(first error: chance)':<32s}{ref['first_error_chance' + suffix]:>{width}.4f}")
        ref = next((summary[a] for a in arms if "bon_random" + suffix in summary[a]), None)
        if ref:
            lines.append(f"  {'(best-of-N: random / oracle)':<32s}{ref['bon_random' + suffix]:>{width}.4f}"
                         f"{ref['bon_oracle' + suffix]:>{width}.4f}")
    if len(lines) == 1:
        lines.append("  (nothing evaluated: set eval_file)")
    return "\n".join(lines)
