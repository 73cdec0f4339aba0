"""DDP and FSDP2 under ``torchrun`` on CPU (gloo) against a single process on the same global batch,
and resume across world sizes (1 -> 2 ranks sharded -> 1).

The objective here is plain Bradley-Terry (``reg_ratio 0``, no SFT term): a mean over pairs, so
the mean of two ranks' losses on 4 pairs each IS the loss on the 8 pairs, and the averaged
gradients are the single process's. (The SFT and consistency terms normalise by each rank's
own token/pair counts, as in TRL's DDP, so they match a single process only approximately.)
The learning rate is constant (the runs differ in max_steps). With ``per_device_train_batch_size`` x world size fixed at 8, the data order puts the same 8
pairs in each global step on 1 and 2 ranks, so every logged loss must agree to fp32 rounding.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from icrm import RewardConfig, RewardTrainer
from icrm.config import DATA_DIR
from icrm.data import read_rows
from icrm.model import load_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 8
# reward_model_init random: `icrm train` then starts where RewardTrainer's built-in model does (random init).
COMMON = dict(run_sft=False, compare_bt=False, reward_model_init="random", reg_ratio=0.0, sft_regularizer=False,
              save_steps=2, save_total_limit=5, logging_steps=1,
              max_length=32, learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler_type="constant", eval_file="",
              kernels="reference")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:64]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _losses(output_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in open(os.path.join(output_dir, "metrics.jsonl")).read().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _single(output_dir, train_file, max_steps, **changes):
    args = RewardConfig(output_dir=str(output_dir), train_file=train_file, max_steps=max_steps,
                        per_device_train_batch_size=GLOBAL_BATCH, **{**COMMON, **changes})
    RewardTrainer(args=args).train()
    return _losses(output_dir)


def _torchrun(output_dir, train_file, max_steps, *flags):
    """``icrm train`` on 2 gloo ranks; returns the ICRM stage's folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "icrm.cli", "train",
           "--train_file", train_file, "--output_dir", str(output_dir), "--max_steps", str(max_steps),
           "--per_device_train_batch_size", str(GLOBAL_BATCH // 2), *flags]
    for key, value in COMMON.items():
        cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun {' '.join(flags)} failed:\n{proc.stderr[-4000:]}"
    # FSDP2 warns when a unit's forward returns a view (its backward hook could be lost); ours return none.
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-4000:]
    return output_dir / "icrm"


def _assert_same_losses(got, want, what):
    assert got, f"{what}: no losses logged"
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-6), f"{what}: step {step} loss {loss} != single {want[step]}"


def test_ddp_and_fsdp_match_one_process_and_resume_across_world_sizes(tmp_path, train_file):
    single = _single(tmp_path / "single", train_file, max_steps=6)
    assert sorted(single) == [1, 2, 3, 4, 5, 6]

    ddp = _torchrun(tmp_path / "ddp", train_file, 4)
    _assert_same_losses(_losses(ddp), single, "2-rank DDP")

    # FSDP2 on 2 ranks resumes the single process's checkpoint-2 (1 -> 2 ranks) and runs steps 3-4.
    fsdp = _torchrun(tmp_path / "fsdp", train_file, 4, "--fsdp", "true",
                     "--resume_from_checkpoint", str(tmp_path / "single" / "checkpoint-2"))
    fsdp_losses = _losses(fsdp)
    assert sorted(fsdp_losses) == [1, 2, 3, 4]  # 1-2 from the resumed checkpoint's history, 3-4 run by FSDP2
    _assert_same_losses(fsdp_losses, single, "2-rank FSDP2 resumed from 1 process")
    state = json.loads((fsdp / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2

    # Its checkpoint is one full file: the same tensors as the single process's at step 4 ...
    sharded, full = load_file(fsdp / "checkpoint-4" / "model.safetensors"), load_file(tmp_path / "single" / "checkpoint-4" / "model.safetensors")
    assert sharded.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(sharded[name], full[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # ... the export from the sharded run loads as a plain reward model ...
    exported, _ = load_reward_model(str(fsdp / "final"))
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, sharded[name], msg=lambda m: f"export {name}: {m}")
    # ... and one process resumes it (2 -> 1 ranks) exactly where the single run went on.
    resumed = _single(tmp_path / "resumed", train_file, max_steps=6, fsdp=True,
                      resume_from_checkpoint=str(fsdp / "checkpoint-4"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 5-6 run here
    _assert_same_losses(resumed, single, "1 process resumed from 2-rank FSDP2")


def test_fsdp_sft_stage_saves_a_full_model_without_view_warnings(tmp_path, train_file):
    """The SFT stage under FSDP2 (its root unit is CausalLMLogprobs): no view-tensor warning, and its
    checkpoint, gathered from the shards, resumes in one process."""
    flags = ["--train_file", train_file, "--max_length", "32", "--kernels", "reference", "--save_steps", "2",
             "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "sft")]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "icrm.cli", "sft", *flags, "--max_steps", "2", "--fsdp", "true"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-4000:]
    resumed = subprocess.run([sys.executable, "-m", "icrm.cli", "sft", *flags, "--max_steps", "3",
                              "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 3


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("false", False), (True, True), ("full_shard", True), ("full_shard auto_wrap", True),
    (["full_shard", "auto_wrap"], True), ("", False), ([], False),
])
def test_fsdp_field_reads_trl_values(value, expected):
    assert RewardConfig.from_dict({"fsdp": value}).fsdp is expected


@pytest.mark.parametrize("values, message", [
    ({"fsdp": "shard_grad_op"}, "fsdp: icrm runs FSDP2"), ({"fsdp": "full_shard offload"}, "fsdp: icrm runs FSDP2"),
    ({"fsdp": True, "use_peft": True}, "fsdp and use_peft"),
])
def test_fsdp_bad_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig.from_dict(values)
