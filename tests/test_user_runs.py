"""What a new user runs first: their own data (only what they name runs), a tokenizer without a
pad token, a negative number on the command line, progress and a completion line from
``icrm score`` / ``eval``, and SFT of a softcapped (Gemma-2) model."""

import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from icrm import RewardConfig, RewardTrainer, SFTTrainer
from icrm.cli import main
from icrm.config import DATA_DIR
from icrm.data import PreferenceDataset, collate_sft, read_rows
from icrm.model import build_tiny_tokenizer, tiny_config

TRAIN_ROWS = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:32]
EVAL_ROWS = read_rows(os.path.join(DATA_DIR, "sort_eval.jsonl"))[:16]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_own_data_runs_only_what_the_config_names(tmp_path, capsys):
    """A YAML with only train_file / eval_file: one reward model, evaluated on that eval file alone
    (no SFT stage, no baseline arms, no shipped best-of-16 or longer-input files)."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"train_file: {write_jsonl(tmp_path / 'train.jsonl', TRAIN_ROWS)}\n"
                   f"eval_file: {write_jsonl(tmp_path / 'eval.jsonl', EVAL_ROWS)}\n")
    loaded = RewardConfig.from_yaml(str(cfg))
    assert (loaded.run_sft, loaded.compare_bt, loaded.eval_long_file, loaded.bon_file, loaded.bon_long_file) == \
        (False, False, None, None, None)
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--output_dir", str(out), "--max_steps", "2", "--max_length", "32",
                 "--kernels", "reference"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(k for k in summary if k not in ("config", "wall_s")) == ["icrm"]
    assert sorted(os.listdir(out)) == ["icrm", "summary.json"]
    assert not [k for k in summary["icrm"] if k.startswith(("bon_", "value_", "first_error")) or k.endswith("_long")]
    table = capsys.readouterr().out
    assert "pairwise accuracy" in table and "longer inputs" not in table and "best-of-16" not in table
    # The shipped task keeps its whole job, and naming a file opts in on your own data.
    shipped = RewardConfig()
    assert shipped.run_sft and shipped.compare_bt and shipped.bon_long_file.endswith("process_bon_long.jsonl")
    assert RewardConfig(train_file=str(tmp_path / "train.jsonl"), bon_file="b.jsonl", compare_bt=True).bon_file == "b.jsonl"


def test_eval_without_eval_file_is_an_error_naming_the_flag(capsys):
    assert main(["eval", "--model", "/nonexistent"]) == 2
    assert error_line(capsys) == ("icrm: error: eval: --eval_file is required: the preference file to evaluate on "
                                  "(the shipped task's held-out pairs are icrm/data/process_eval.jsonl)")


@pytest.mark.parametrize("value", ["-1e-3", "-0.001", "-inf"])
def test_a_negative_number_reaches_the_range_check(value, capsys):
    assert main(["train", "--learning_rate", value]) == 2
    want = "must be > 0.0, got -0.001" if value != "-inf" else "must be a finite number, got -inf"
    assert error_line(capsys) == f"icrm: error: learning_rate {want}"


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, caplog):
    """``RewardTrainer(model=<HF causal LM>, processing_class=tok)`` where tok has no pad token (TRL's case)."""
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    model = AutoModelForCausalLM.from_config(tiny_config(tok))
    args = RewardConfig(output_dir=str(tmp_path / "run"), train_file=write_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS),
                        eval_file=write_jsonl(tmp_path / "e.jsonl", EVAL_ROWS), max_steps=2,
                        per_device_train_batch_size=4, max_length=32, kernels="reference")
    trainer = RewardTrainer(model=model, args=args, processing_class=tok)
    assert "no pad token; padding with its EOS token '<eos>'" in caplog.text
    assert tok.pad_token_id == tok.eos_token_id == trainer.model.config.pad_token_id
    result = trainer.train()
    assert 0.0 <= result["eval_accuracy"] <= 1.0


def test_score_and_eval_say_what_they_did(tmp_path, capsys):
    tok_rows = write_jsonl(tmp_path / "pairs.jsonl", EVAL_ROWS[:5])
    args = RewardConfig(output_dir=str(tmp_path / "run"), train_file=write_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS),
                        max_steps=1, max_length=32, kernels="reference")
    model_dir = RewardTrainer(args=args).save_model()
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", model_dir, "--input", tok_rows, "--output", str(out), "--disable_tqdm"]) == 0
    assert re.fullmatch(rf"icrm: scored 5 rows -> {re.escape(str(out))} in \d+\.\d s", error_line(capsys))
    assert len(out.read_text().splitlines()) == 5
    assert main(["eval", "--model", model_dir, "--eval_file", tok_rows, "--disable_tqdm"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["eval_accuracy"] >= 0.0
    assert re.fullmatch(rf"icrm: evaluated 5 pairs of {re.escape(tok_rows)} in \d+\.\d s", captured.err.strip())


def test_sft_of_a_softcapped_model_is_its_own_log_likelihood(tmp_path):
    """Gemma-2's final-logit softcap is part of the model: the SFT loss must be the mean token NLL
    of the model's own (softcapped) logits, here computed by HF in float64."""
    tok = build_tiny_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                          sliding_window=4, max_position_embeddings=128, final_logit_softcapping=0.5,
                          attn_logit_softcapping=50.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits of a few units, so that the cap at 0.5 changes every log-prob
        model.get_output_embeddings().weight.mul_(30.0)
    args = RewardConfig(output_dir=str(tmp_path / "sft"), train_file=write_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS),
                        max_length=32, kernels="reference")
    trainer = SFTTrainer(model=model, args=args, processing_class=tok)
    batch = collate_sft(PreferenceDataset(TRAIN_ROWS[:4], tok, 32).examples, tok.pad_token_id)
    with torch.no_grad():
        loss, _ = trainer._loss(batch, training=False)
        gold_model = AutoModelForCausalLM.from_config(config).double().eval()
        gold_model.load_state_dict(model.state_dict())
        logits = gold_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        on = targets != -100
        want = -(logp * on).sum() / on.sum()
        uncapped = trainer.model.lm_head.weight.double()  # the same NLL without the cap is far off
        hidden = gold_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        plain = torch.log_softmax(hidden[:, :-1] @ uncapped.T, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(-(plain * on).sum() / on.sum()) - float(want)) > 1e-2
