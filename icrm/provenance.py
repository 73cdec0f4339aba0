"""What decides the last digits of a CPU run: the CPU model, ATen's kernel path, the libraries, the commit.

Recorded beside measured numbers (the quality study's rows, the default-job table in
docs/trainer.md): the same code, seed and data give the same numbers on every run on one machine
with the same CPU capability and library versions, and can differ on another CPU.
"""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(repo: str = REPO) -> str:
    """Short commit of ``repo``'s checkout ('' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def machine(repo: str = REPO) -> dict[str, str]:
    """``{cpu, aten, torch, transformers, commit}``."""
    import torch
    import transformers

    return {"cpu": cpu_model(), "aten": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": git_commit(repo)}
