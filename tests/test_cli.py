"""Every `icrm` subcommand: --help, and one real invocation on tiny settings."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from icrm.cli import main
from icrm.config import DATA_DIR, RewardConfig
from icrm.data import read_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--kernels", "reference",
        "--logging_steps", "1", "--eval_long_file", "none", "--bon_file", "none", "--bon_long_file", "none"]
#: On its own train_file `icrm train` runs one reward model unless told more: here the whole pipeline.
PIPELINE = ["--run_sft", "true", "--sft_max_steps", "2", "--compare_bt", "true"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:24]
    held_out = read_rows(os.path.join(DATA_DIR, "sort_eval.jsonl"))[:12]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def trained(files):
    """One `icrm train` run (SFT -> ICRM -> BT) shared by the eval/score/export tests."""
    out = files / "runs"
    code = main(["train", *TINY, *PIPELINE, "--train_file", str(files / "train.jsonl"),
                 "--eval_file", str(files / "eval.jsonl"), "--output_dir", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("command", [None, "train", "sft", "eval", "score", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: icrm" in text
    if command in ("train", "sft"):
        for f in dataclasses.fields(RewardConfig):  # every field, with its default
            assert f"--{f.name}" in text, f.name
        assert "(default: 0.1)" in text and "(default: 'tiny')" in text


def test_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "icrm.cli", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_train_runs_sft_and_every_arm(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    for stage in ("sft", "bt", "grm", "icrm"):
        assert summary[stage]["step"] == 2
    assert 0.0 <= summary["icrm"]["eval_accuracy"] <= 1.0 and 0.0 <= summary["bt"]["eval_accuracy"] <= 1.0
    assert (trained / "sft" / "final" / "config.json").exists()
    assert (trained / "icrm" / "training.png").exists() and (trained / "icrm" / "metrics.jsonl").exists()
    bt_log = [json.loads(x) for x in (trained / "bt" / "metrics.jsonl").read_text().splitlines()]
    assert bt_log[0]["align_loss"] == 0.0 and bt_log[0]["sft_loss"] == 0.0  # plain Bradley-Terry
    grm_log = [json.loads(x) for x in (trained / "grm" / "metrics.jsonl").read_text().splitlines()]
    assert grm_log[0]["align_loss"] == 0.0 and grm_log[0]["sft_loss"] > 0.0  # GRM: the SFT term, no consistency
    assert summary["config"]["reward_model_init"] == "base"


def test_train_resume_latest_finishes_every_stage(trained, files, capsys):
    before = json.loads((trained / "summary.json").read_text())
    assert main(["train", *TINY, *PIPELINE, "--train_file", str(files / "train.jsonl"),
                 "--eval_file", str(files / "eval.jsonl"), "--output_dir", str(trained),
                 "--resume_from_checkpoint", "latest"]) == 0
    after = json.loads((trained / "summary.json").read_text())
    for stage in ("bt", "grm", "icrm"):  # nothing left to train: same models, same held-out numbers
        assert after[stage]["step"] == 2
        assert after[stage]["eval_accuracy"] == before[stage]["eval_accuracy"]
        assert after[stage]["eval_margin"] == pytest.approx(before[stage]["eval_margin"], rel=1e-6)


def test_train_with_yaml_config(files, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_file: {files / 'train.jsonl'}\neval_file: null\nrun_sft: false\ncompare_bt: false\n"
                   f"reg_ratio: 0.5\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", "--config", str(cfg), *TINY, "--use_peft", "true", "--lora_r", "4",
                 "--gradient_checkpointing", "true"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["config"]["reg_ratio"] == 0.5


def test_sft(files, tmp_path, capsys):
    assert main(["sft", *TINY, "--train_file", str(files / "train.jsonl"), "--eval_file", str(files / "eval.jsonl"),
                 "--output_dir", str(tmp_path / "sft")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and result["eval_loss"] > 0
    assert os.path.exists(os.path.join(result["model_dir"], "model.safetensors"))


def test_eval(trained, files, capsys):
    assert main(["eval", "--model", str(trained / "icrm" / "final"), "--eval_file", str(files / "eval.jsonl"),
                 "--kernels", "reference"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("eval_accuracy", "eval_margin", "eval_bt_loss", "eval_token_reward_mean", "eval_token_reward_std"):
        assert key in result
    assert "value_spearman" not in result  # no prefix values in this file


def test_eval_process_metrics(trained, tmp_path, capsys):
    """Rows with exact prefix values add the process metrics; a best-of-N file adds bon_accuracy."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in read_rows(os.path.join(DATA_DIR, "process_eval.jsonl"))[:16]))
    bon = tmp_path / "bon.jsonl"
    bon.write_text("".join(json.dumps(r) + "\n" for r in read_rows(os.path.join(DATA_DIR, "process_bon.jsonl"))[:4]))
    assert main(["eval", "--model", str(trained / "grm" / "final"), "--eval_file", str(pairs), "--bon_file", str(bon),
                 "--max_length", "64", "--kernels", "reference"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("eval_accuracy", "pair_accuracy", "value_spearman", "value_auroc", "first_error_acc", "bon_accuracy"):
        assert -1.0 <= result[key] <= 1.0, key
    assert result["pair_accuracy"] == result["eval_accuracy"]  # the same pairs, two code paths


def test_score(trained, tmp_path):
    rows = [{"prompt": "sort : 3 1 2\n", "response": "1 2 3"},
            {"prompt": "sort : 3 1 2\n", "chosen": "1 2 3", "rejected": "2 1 3"},
            {"messages": [{"role": "user", "content": "sort : 2 1"}, {"role": "assistant", "content": "1 2"}]},
            {"prompt": "sort : 1"}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--model", str(trained / "icrm" / "final"), "--input", str(src), "--output", str(dst)]) == 0
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(out) == 4
    assert out[0]["response_tokens"] == ["1", "2", "3", "<eos>"] and len(out[0]["response_token_rewards"]) == 4
    assert out[0]["response_reward"] == out[0]["response_token_rewards"][-1]
    assert out[1]["chosen_reward"] == pytest.approx(out[0]["response_reward"], abs=1e-5)
    assert "rejected_reward" in out[1] and "response_reward" in out[2] and "error" in out[3]


def test_export(trained, tmp_path, capsys):
    assert main(["export", "--model", str(trained / "icrm" / "final"), "--output", str(tmp_path / "hf")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 64)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[7, 8, 9]])).logits.shape == (1, 1)


def test_bad_value_is_a_clear_error(capsys):
    assert main(["train", "--learning_rate", "-1"]) == 2
    assert "learning_rate must be > 0.0" in capsys.readouterr().err
    assert main(["eval", "--model", "/nonexistent"]) == 2


def test_shipped_config_is_the_default_job():
    from icrm.config import CONFIG_DIR

    assert RewardConfig.from_yaml(os.path.join(CONFIG_DIR, "tiny.yaml")) == RewardConfig()


@pytest.mark.slow
def test_default_main_job(tmp_path, capsys):
    """The README's `icrm train` (defaults; only output_dir moved): every arm learns the shipped task
    and the table reports the process metrics (their values are the study's business, not a test's)."""
    assert main(["train", "--output_dir", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "ICRM" in line and "GRM" in line)
    assert header.split() == ["BT", "GRM", "ICRM"]
    for label in ("pairwise accuracy", "Spearman", "AUROC", "first-error localisation", "best-of-16", "longer inputs"):
        assert label in text
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    for arm in ("bt", "grm", "icrm"):  # the default seed gives about 0.90 for each (chance: 0.5)
        assert summary[arm]["pair_accuracy"] > 0.8, arm
        assert -1 <= summary[arm]["value_spearman_long"] <= 1 and 0 <= summary[arm]["bon_accuracy_long"] <= 1
