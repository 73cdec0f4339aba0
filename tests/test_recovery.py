"""A run that stops early: Ctrl-C saves a checkpoint and says how to continue, the suggested
commands of a run that died before saving lead somewhere (never round in a circle), and a full
disk is one line naming the folder with nothing half-written left behind."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from icrm.checkpoint import list_checkpoints, verify_checkpoint
from icrm.cli import main
from icrm.config import DATA_DIR
from icrm.data import read_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:32]


def train_flags(tmp_path, max_steps: int, **extra) -> list[str]:
    """``icrm train`` on the user's own small file: one BT reward model in ``<out>/bt``."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    flags = {"train_file": str(train_file), "output_dir": str(tmp_path / "out"), "arm": "bt",
             "max_steps": str(max_steps), "per_device_train_batch_size": "2", "max_length": "32",
             "logging_steps": "1", "kernels": "reference", **extra}
    return ["train"] + [item for key, value in flags.items() for item in (f"--{key}", value)]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("icrm: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_continues(tmp_path):
    cmd = [sys.executable, "-m", "icrm.cli", *train_flags(tmp_path, max_steps=600)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "out" / "bt" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"icrm: interrupted by SIGINT at step (\d+)/600; checkpoint saved to (\S+); to continue, "
                         r"rerun the same command with --resume_from_checkpoint latest", last)
    assert match, last
    assert "Traceback" not in err
    step, saved = int(match.group(1)), match.group(2)
    assert 0 < step < 600 and saved == str(tmp_path / "out" / "bt" / f"checkpoint-{step}")
    assert verify_checkpoint(saved) is None

    resumed = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 601))  # every step once: the stopped run's, then the resumed run's


def test_a_run_killed_before_its_first_checkpoint_is_not_a_circle(tmp_path, capsys):
    """A run killed (SIGKILL, power loss) before it saved anything leaves its metrics.jsonl. Each
    command the errors suggest must lead to a run: rerun, 'latest' and 'auto' all name
    --overwrite_output_dir true, and that works."""
    flags = train_flags(tmp_path, max_steps=2)
    stage = tmp_path / "out" / "bt"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    out = tmp_path / "out"

    assert main(flags) == 2
    assert error_line(capsys) == (
        f"icrm: error: output_dir {out} holds a previous run that saved no checkpoint (bt/metrics.jsonl), so there "
        "is nothing to continue; pass --overwrite_output_dir true to start it again, or choose another output_dir")
    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 2
    assert error_line(capsys) == (
        f"icrm: error: resume_from_checkpoint latest: no checkpoint in {out}/{{sft,bt}}: the previous run there "
        "stopped before saving one, so there is nothing to continue; pass --overwrite_output_dir true instead of "
        "--resume_from_checkpoint to start it again")
    assert main(flags + ["--resume_from_checkpoint", "auto"]) == 2
    assert error_line(capsys) == (
        f"icrm: error: output_dir {stage} holds a previous run that saved no checkpoint (metrics.jsonl), so there "
        "is nothing to continue; pass --overwrite_output_dir true to start it again, or choose another output_dir")

    assert main(flags + ["--overwrite_output_dir", "true"]) == 0
    assert [os.path.basename(p) for p in list_checkpoints(str(stage))] == ["checkpoint-2"]
    # With a checkpoint there, the suggestion is to continue it, and that works too.
    assert main(flags) == 2
    assert "pass --resume_from_checkpoint latest to continue it" in error_line(capsys)
    assert main(flags + ["--resume_from_checkpoint", "latest"]) == 0


def _disk_full_at(monkeypatch, where: str):
    """Make the checkpoint-4 save fail with the disk full at ``where``, as each writer reports it."""
    import icrm.checkpoint as ckpt

    def failing(real, path_of, exc):
        def wrapper(*args, **kwargs):
            if "checkpoint-4" in str(path_of(*args)):
                raise exc
            return real(*args, **kwargs)
        return wrapper

    enospc = OSError(errno.ENOSPC, "No space left on device")
    if where == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", failing(ckpt.save_file, lambda state, path: path, enospc))
    elif where == "torch.save":  # the zip writer keeps no errno; it chains a second error while closing
        zip_error = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                                 "data/0: file write failed")
        monkeypatch.setattr(ckpt.torch, "save", failing(torch.save, lambda obj, path, *a: path, zip_error))
    else:
        monkeypatch.setattr(ckpt, "write_manifest", failing(ckpt.write_manifest, lambda path: path, enospc))


@pytest.mark.parametrize("where", ["safetensors", "torch.save", "manifest"])
def test_disk_full_is_one_line_and_leaves_nothing_behind(where, tmp_path, monkeypatch, capsys):
    _disk_full_at(monkeypatch, where)
    assert main(train_flags(tmp_path, max_steps=6, save_steps="2")) == 2
    stage = tmp_path / "out" / "bt"
    assert error_line(capsys) == (
        f"icrm: error: no space left on device while writing checkpoint to {stage}/checkpoint-4; nothing of it was "
        f"kept (newest intact checkpoint: {stage}/checkpoint-2); free space and rerun with --resume_from_checkpoint "
        "latest")
    assert sorted(p for p in os.listdir(stage) if "checkpoint" in p) == ["checkpoint-2"]
    assert verify_checkpoint(str(stage / "checkpoint-2")) is None
    monkeypatch.undo()  # space freed: the suggested command continues from checkpoint-2
    assert main(train_flags(tmp_path, max_steps=6, save_steps="2") + ["--resume_from_checkpoint", "latest"]) == 0
    assert [os.path.basename(p) for p in list_checkpoints(str(stage))] == ["checkpoint-4", "checkpoint-6"]
