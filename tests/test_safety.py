"""Nothing lost, every fault a clear error: outputs, output_dir, checkpoints, non-finite values, data."""

import json
import os
import shutil

import pytest
import torch

from icrm import RewardConfig, RewardTrainer
from icrm.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint
from icrm.cli import main
from icrm.config import DATA_DIR
from icrm.data import PreferenceDataset, read_rows
from icrm.io_safety import IcrmError, atomic_path
from icrm.model import RewardModel, build_tiny_tokenizer, load_causal_lm, save_reward_model

ROWS = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:32]


def tiny_args(out, **changes) -> RewardConfig:
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=8, logging_steps=1, learning_rate=3e-3,
                warmup_ratio=0.0, max_length=32, run_sft=False, compare_bt=False, kernels="reference", eval_file=None)
    base.update(changes)
    return RewardConfig(**base)


def losses(history) -> dict[int, float]:
    """``{step: loss}``, asserting no step is logged twice."""
    steps = [r["step"] for r in history if "loss" in r]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("icrm: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail the test if a model is built: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr("icrm.trainers.load_causal_lm", refuse)
    monkeypatch.setattr("icrm.trainers.build_reward_model", refuse)


# ------------------------------------------------------------------------------------------
# Output files

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("rm") / "final"
    save_reward_model(RewardModel(load_causal_lm("tiny", tok, seed=0), backend="reference"), tok, str(folder))
    return str(folder)


def test_score_refuses_its_input_as_output(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    before = open(src).read()
    os.symlink(src, tmp_path / "link.jsonl")
    for output in (src, str(tmp_path / "link.jsonl")):
        assert main(["score", "--model", model_dir, "--input", src, "--output", output]) == 2
        assert "is the input file" in one_line_error(capsys)
        assert open(src).read() == before


@pytest.mark.parametrize("bad_input", ["missing", "malformed", "folder"])
def test_score_bad_input_keeps_the_existing_output(tmp_path, model_dir, capsys, bad_input):
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    src = {"missing": tmp_path / "nope.jsonl", "malformed": tmp_path / "bad.jsonl", "folder": tmp_path}[bad_input]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "sort : 1", "response": "1"}\n{oops\n')
    assert main(["score", "--model", model_dir, "--input", str(src), "--output", str(out)]) == 2
    message = one_line_error(capsys)
    assert str(src) in message and (bad_input != "malformed" or "line 2" in message)
    assert out.read_text() == "earlier results\n"


def test_score_crash_midway_keeps_the_existing_output(tmp_path, model_dir, monkeypatch):
    import icrm.inference

    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "sort : 2 1", "response": "1 2"}] * 3)
    real, calls = icrm.inference._score_inputs, []

    def crash_on_third(row, tokenizer):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-way")
        return real(row, tokenizer)

    monkeypatch.setattr(icrm.inference, "_score_inputs", crash_on_third)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        main(["score", "--model", model_dir, "--input", src, "--output", str(out)])
    assert out.read_text() == "earlier results\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp, open(tmp, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]
    with atomic_path(str(target)) as tmp, open(tmp, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.json"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mine.txt").write_text("keep")
    with pytest.raises(IcrmError, match="not a saved model folder"):  # save_model(path) into a folder of files
        with atomic_path(str(tmp_path / "docs"), directory=True):
            pass
    assert (tmp_path / "docs" / "mine.txt").read_text() == "keep"


def test_export_refuses_the_model_folder_and_non_empty_folders(tmp_path, model_dir, capsys):
    weights = open(os.path.join(model_dir, "model.safetensors"), "rb").read()
    assert main(["export", "--model", model_dir, "--output", model_dir]) == 2
    assert "is the input" in one_line_error(capsys)
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", "--model", model_dir, "--output", str(tmp_path)]) == 2
    assert "not an empty folder" in one_line_error(capsys)
    assert open(os.path.join(model_dir, "model.safetensors"), "rb").read() == weights
    assert (tmp_path / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------
# output_dir

def test_second_run_into_the_same_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    args = tiny_args(tmp_path / "run", max_steps=2)
    RewardTrainer(args=args, train_dataset=ROWS).train()
    with pytest.raises(IcrmError, match="holds a previous run"):
        RewardTrainer(args=args, train_dataset=ROWS).train()
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    monkeypatch.setattr("icrm.trainers.load_causal_lm", lambda *a, **k: pytest.fail("model built before the check"))
    cli = ["train", "--run_sft", "false", "--compare_bt", "false", "--train_file", train_file, "--eval_file", "",
           "--output_dir", str(tmp_path / "run")]
    assert main(cli) == 2  # `icrm train` puts stage folders inside: the whole folder counts
    assert "holds a previous run" in one_line_error(capsys)


def test_cli_refuses_a_previous_pipeline_run_before_building_a_model(tmp_path, capsys, no_model_build):
    (tmp_path / "icrm" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "icrm" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert main(["train", "--output_dir", str(tmp_path), "--run_sft", "false"]) == 2
    message = one_line_error(capsys)
    assert "previous run" in message and "icrm/checkpoint-4" in message and "--overwrite_output_dir" in message


@pytest.mark.parametrize("command", ["train", "sft"])
def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, capsys, no_model_build, monkeypatch, command):
    monkeypatch.setattr("icrm.trainers.SFTTrainer.__init__", lambda *a, **k: pytest.fail("trainer built before the check"))
    (tmp_path / "taken").write_text("a file")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert main([command, "--output_dir", str(output_dir), "--logging_steps", "1000", "--max_steps", "200"]) == 2
        assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "taken").read_text() == "a file"


def test_unwritable_output_dir_is_named(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("icrm.io_safety.tempfile.TemporaryFile", denied)  # tests may run as root: fake it
    trainer = RewardTrainer(args=tiny_args(tmp_path / "ro", logging_steps=1000), train_dataset=ROWS)
    with pytest.raises(IcrmError, match=f"output_dir {tmp_path / 'ro'} is not writable .Permission denied"):
        trainer.train()
    assert trainer.global_step == 0  # found before any step, not at the first metrics write


def test_overwrite_output_dir_removes_only_the_previous_runs_files(tmp_path):
    out = tmp_path / "run"
    RewardTrainer(args=tiny_args(out, max_steps=4, save_steps=1, save_total_limit=3), train_dataset=ROWS).train()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-99").mkdir()  # same name pattern, not written by icrm
    (out / "checkpoint-99" / "weights.bin").write_text("mine too")
    args = tiny_args(out, max_steps=2, overwrite_output_dir=True)
    with pytest.raises(IcrmError, match="checkpoint-99, which icrm did not write"):
        RewardTrainer(args=args, train_dataset=ROWS).train()
    assert len(list_checkpoints(str(out))) == 3  # nothing was removed by the refusal
    shutil.move(str(out / "checkpoint-99"), str(tmp_path / "elsewhere"))
    trainer = RewardTrainer(args=args, train_dataset=ROWS)
    trainer.train()
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl", "notes.txt", "training.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------------------------------
# Checkpoints: manifest, fallback, resume

@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A 3-step run with checkpoint-1..3 and its losses."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = RewardTrainer(args=tiny_args(out, save_steps=1, save_total_limit=3), train_dataset=ROWS)
    trainer.train()
    return out, losses(trainer.log_history)


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _scribble(path):
    """Random bytes inside the file, size unchanged (a bad disk or a stray write)."""
    gen = torch.Generator().manual_seed(0)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        fh.write(bytes(torch.randint(0, 256, (64,), generator=gen, dtype=torch.uint8).tolist()))


@pytest.mark.parametrize("name, damage", [("model.safetensors", _truncate), ("trainer_state.json", _truncate),
                                          ("optimizer.pt", _truncate), ("model.safetensors", _scribble)])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, three_checkpoints, caplog, name, damage):
    source, expected = three_checkpoints
    out = tmp_path / "run"
    shutil.copytree(source, out)
    damage(str(out / "checkpoint-3" / name))
    assert name in verify_checkpoint(str(out / "checkpoint-3"))
    trainer = RewardTrainer(args=tiny_args(out, save_steps=1, save_total_limit=3, resume_from_checkpoint="latest"),
                            train_dataset=ROWS)
    with caplog.at_level("WARNING", logger="icrm"):
        trainer.train()
    assert f"checkpoint-3/{name}" in caplog.text and "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert losses(trainer.log_history) == pytest.approx(expected)  # step 3 redone exactly
    assert verify_checkpoint(str(out / "checkpoint-3")) is None  # written again, intact
    assert (out / "damaged-checkpoint-3").is_dir()  # kept for inspection, never resumed or counted
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_stops_naming_them(tmp_path, three_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], out)
    for step in (1, 2, 3):
        _scribble(str(out / f"checkpoint-{step}" / "model.safetensors"))
    with pytest.raises(IcrmError, match="no intact checkpoint.*checkpoint-3/model.safetensors.*checkpoint-1"):
        RewardTrainer(args=tiny_args(out, resume_from_checkpoint="latest"), train_dataset=ROWS).train()


def test_explicit_damaged_checkpoint_is_named(tmp_path, three_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], out)
    _truncate(str(out / "checkpoint-2" / "optimizer.pt"))
    with pytest.raises(IcrmError, match="checkpoint-2/optimizer.pt has .* bytes"):
        RewardTrainer(args=tiny_args(tmp_path / "new", resume_from_checkpoint=str(out / "checkpoint-2")),
                      train_dataset=ROWS).train()


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, three_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], out)
    trainer = RewardTrainer(args=tiny_args(out, max_steps=2, save_total_limit=3,
                                           resume_from_checkpoint=str(out / "checkpoint-1")), train_dataset=ROWS)
    trainer.train()
    names = sorted(os.listdir(out))
    assert [n for n in names if "checkpoint" in n] == ["checkpoint-1", "checkpoint-2", "superseded-checkpoint-2",
                                                       "superseded-checkpoint-3"]
    assert losses(trainer.log_history) == pytest.approx({1: three_checkpoints[1][1], 2: three_checkpoints[1][2]})


def test_checkpoint_without_manifest_is_checked_as_it_is_read(tmp_path, three_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], out)
    for step in (2, 3):
        os.remove(out / f"checkpoint-{step}" / MANIFEST)  # as written before manifests
    _truncate(str(out / "checkpoint-3" / "optimizer.pt"))
    trainer = RewardTrainer(args=tiny_args(out, resume_from_checkpoint="latest"), train_dataset=ROWS)
    trainer.train()
    assert losses(trainer.log_history) == pytest.approx(three_checkpoints[1])


def test_resume_latest_with_nothing_to_resume(tmp_path, caplog):
    with pytest.raises(IcrmError, match="no checkpoint in"):
        RewardTrainer(args=tiny_args(tmp_path / "a", resume_from_checkpoint="latest"), train_dataset=ROWS).train()
    trainer = RewardTrainer(args=tiny_args(tmp_path / "b", max_steps=1, resume_from_checkpoint="auto"), train_dataset=ROWS)
    with caplog.at_level("WARNING", logger="icrm"):
        trainer.train()
    assert "starting from scratch" in caplog.text and trainer.global_step == 1


def test_metrics_hold_each_step_once_after_resume(tmp_path):
    out = tmp_path / "run"
    RewardTrainer(args=tiny_args(out, max_steps=4, save_steps=2), train_dataset=ROWS).train()
    shutil.rmtree(out / "checkpoint-4")  # killed after logging steps 3-4, before their checkpoint
    RewardTrainer(args=tiny_args(out, max_steps=4, save_steps=2, resume_from_checkpoint="latest"),
                  train_dataset=ROWS).train()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------
# Non-finite values

def nan_loss_at_step(trainer, step):
    real = trainer._loss

    def loss(batch, training):
        value, metrics = real(batch, training)
        if training and trainer.global_step + 1 == step:
            value, metrics = value * float("nan"), {**metrics, "loss": float("nan")}
        return value, metrics

    trainer._loss = loss


def test_nonfinite_loss_stops_the_run_and_saves_nothing_from_it(tmp_path):
    trainer = RewardTrainer(args=tiny_args(tmp_path / "run", save_steps=1), train_dataset=ROWS)
    nan_loss_at_step(trainer, 2)
    with pytest.raises(IcrmError, match="non-finite loss or gradient at step 2.*checkpoint-1"):
        trainer.train()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))] == ["checkpoint-1"]
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_nonfinite_loss_skipped_and_counted_when_asked(tmp_path):
    reference = RewardTrainer(args=tiny_args(tmp_path / "ref"), train_dataset=ROWS)
    reference.train()
    trainer = RewardTrainer(args=tiny_args(tmp_path / "run", on_nonfinite="skip"), train_dataset=ROWS)
    nan_loss_at_step(trainer, 3)
    result = trainer.train()
    last = trainer.log_history[-1]
    assert result["skipped_steps"] == 1 and last["step"] == 3 and last["skipped_steps"] == 1 and "loss" not in last
    got, want = losses(trainer.log_history), losses(reference.log_history)
    assert list(got) == [1, 2] and [got[1], got[2]] == pytest.approx([want[1], want[2]])
    for (name, got), want in zip(trainer.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.isfinite(got).all(), name
    assert verify_checkpoint(str(tmp_path / "run" / "checkpoint-3")) is None


def test_nonfinite_model_is_never_saved(tmp_path):
    trainer = RewardTrainer(args=tiny_args(tmp_path / "run", max_steps=1), train_dataset=ROWS)
    trainer.train()
    with torch.no_grad():
        trainer.model.score.weight[0, 0] = float("inf")
    trainer.global_step = 2
    with pytest.raises(IcrmError, match="score.weight holds non-finite"):
        trainer.save_checkpoint()
    with pytest.raises(IcrmError, match="non-finite"):
        trainer.save_model()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))] == ["checkpoint-1"]
    assert not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------------------------------
# Data and config

def test_unknown_tokens_and_identical_pairs_warn_with_counts(tok, caplog):
    english = [{"prompt": "What is the capital of France?\n", "chosen": "Paris, of course.", "rejected": "It is London."}] * 4
    with caplog.at_level("WARNING", logger="icrm"):
        PreferenceDataset(english, tok, 32, name="train")
    assert "train: 52 of 80 tokens (65%) are the unknown token '<unk>'" in caplog.text
    caplog.clear()
    ties = [{"prompt": "sort : 2 1\n", "chosen": "1 2", "rejected": "1 2"}] * 2 + \
           [{"prompt": "sort : 2 1\n", "chosen": "1 2", "rejected": "2 1"}] * 3
    with caplog.at_level("WARNING", logger="icrm"):
        PreferenceDataset(ties, tok, 32, name="train")
    assert "train: 2 of 5 pairs have chosen == rejected" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="icrm"):  # the shipped data raises neither
        PreferenceDataset(ROWS, tok, 64)
    assert caplog.text == ""


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_byte_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    text = "".join(json.dumps(r) + "\n" for r in ROWS[:3]) if suffix == ".jsonl" else json.dumps(ROWS[:3], indent=1)
    lines = text.encode().split(b"\n")
    lines[2] = lines[2][:5] + b"\xff" + lines[2][5:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(IcrmError, match=rf"{path} is not UTF-8 text: line 3, column 6: byte 0xff"):
        read_rows(str(path))


def test_folder_as_data_file(tmp_path):
    with pytest.raises(IcrmError, match=f"data file {tmp_path} is a folder"):
        read_rows(str(tmp_path))


def test_yaml_errors_are_one_line(tmp_path, capsys, no_model_build):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rate: 0.01\nmax_steps: [1\nseed: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"config file {cfg}: YAML syntax error at line 3" in one_line_error(capsys)
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing_model", "models/../x", "a/b/c"])
def test_model_path_neither_folder_nor_hub_id(tmp_path, capsys, no_model_build, path):
    assert main(["train", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", path]) == 2
    assert f"model_name_or_path {path}: no such folder, and not a Hugging Face hub id" in one_line_error(capsys)


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(IcrmError):
        main(["--debug", "train", "--output_dir", str(tmp_path), "--model_name_or_path", "/no/such/model"])
