"""The road to and from Hugging Face / TRL: real model families (tied embeddings, Gemma-2
softcaps), the export's tokenizer, sequence-classification folders as input, tokenizer round
trips, TRL config files, and the trainer's non-default options against direct computations."""

import dataclasses
import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from icrm import RewardConfig, RewardTrainer
from icrm.cli import main
from icrm.config import DATA_DIR
from icrm.data import PreferenceDataset, collate_pairs, read_rows
from icrm.model import build_tiny_tokenizer, load_tokenizer, tiny_config
from icrm.objective import icrm_loss, sequence_rewards
from icrm.train import lr_lambda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ROWS = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:32]
EVAL_ROWS = read_rows(os.path.join(DATA_DIR, "sort_eval.jsonl"))[:16]
TINY = ["--max_length", "32", "--per_device_train_batch_size", "4", "--kernels", "reference", "--logging_steps", "1",
        "--compare_bt", "false"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, rows in (("train.jsonl", TRAIN_ROWS), ("eval.jsonl", EVAL_ROWS)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def family_config(family: str, vocab_size: int):
    """Tiny configs shaped like the models people use: tied embeddings everywhere, Llama-3.2's
    rope scaling, Qwen2.5's qkv bias, Gemma-2's logit softcaps and alternating sliding windows."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if family == "llama3.2":
        return LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "qwen2.5":
        return Qwen2Config(**common, use_sliding_window=False)
    return Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0)


@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5", "gemma2"])
def test_model_family_trains_resumes_and_exports(family, files, tmp_path, tok, capsys):
    """`icrm train` (SFT -> ICRM) and `icrm export` on a tied-embedding config.json; then resume."""
    config_path = tmp_path / f"{family}.json"
    family_config(family, len(tok)).to_json_file(str(config_path))
    out = tmp_path / "run"
    data = ["--train_file", str(files / "train.jsonl"), "--eval_file", str(files / "eval.jsonl"),
            "--model_name_or_path", str(config_path), "--output_dir", str(out)]
    assert main(["train", *TINY, *data, "--sft_max_steps", "2", "--max_steps", "2", "--save_steps", "1"]) == 0
    # Resume: the SFT checkpoint stored the tied matrix once; both names come back, still one tensor.
    assert main(["train", *TINY, *data, "--sft_max_steps", "3", "--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    sft = AutoModelForCausalLM.from_pretrained(str(out / "sft" / "final"))
    assert sft.get_output_embeddings().weight is sft.get_input_embeddings().weight
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["step"] == 3 and summary["icrm"]["step"] == 3
    with open(out / "sft" / "metrics.jsonl") as fh:
        assert [json.loads(x)["step"] for x in fh if '"loss"' in x] == [1, 2, 3]  # resumed, not restarted

    hf_dir = tmp_path / "hf"
    assert main(["export", "--model", str(out / "icrm" / "final"), "--output", str(hf_dir)]) == 0
    capsys.readouterr()
    scores_file = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(out / "icrm" / "final"), "--input", str(files / "eval.jsonl"),
                 "--output", str(scores_file), "--max_length", "32", "--kernels", "reference"]) == 0
    icrm_scores = [json.loads(x) for x in scores_file.read_text().splitlines()]
    # Raw text, plain transformers: the export's tokenizer appends EOS itself.
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    hf_tok = load_tokenizer(None, str(hf_dir)) if family == "qwen2.5" else AutoTokenizer.from_pretrained(str(hf_dir))
    for row, scored in zip(EVAL_ROWS, icrm_scores):
        for side in ("chosen", "rejected"):
            enc = hf_tok(row["prompt"] + row[side], return_tensors="pt")
            assert enc["input_ids"][0, -1] == hf_tok.eos_token_id
            with torch.no_grad():
                reward = hf(**enc).logits[0, 0].item()
            assert reward == pytest.approx(scored[f"{side}_reward"], abs=1e-4)


def test_exported_tokenizer_files_load_on_transformers_4(tmp_path, tok):
    """The export's tokenizer files use only what transformers 4.45+ understands: the generic
    fast class and a TemplateProcessing post-processor that appends EOS (see docs/trainer.md)."""
    from icrm.model import RewardModel, export_sequence_classification, load_causal_lm

    out = export_sequence_classification(RewardModel(load_causal_lm("tiny", tok), backend="reference"), tok,
                                         str(tmp_path / "hf"))
    config = json.loads(open(os.path.join(out, "tokenizer_config.json")).read())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "add_eos_token" not in config and "add_bos_token" not in config
    post = json.loads(open(os.path.join(out, "tokenizer.json")).read())["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert [next(iter(p)) for p in post["single"]] == ["Sequence", "SpecialToken"]
    assert post["single"][-1]["SpecialToken"]["id"] == "<eos>"
    assert post["special_tokens"]["<eos>"]["ids"] == [tok.eos_token_id]
    python4 = os.environ.get("ICRM_TRANSFORMERS4_PYTHON")  # optional: a Python with transformers 4.x installed
    if python4:
        import subprocess

        code = (f"from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained({out!r}); "
                "print(type(t).__name__, t('sort : 3 1 2')['input_ids'])")
        proc = subprocess.run([python4, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split(" ", 1)[1].strip() == str(tok("sort : 3 1 2 <eos>")["input_ids"])


def test_tokenizer_round_trip_same_class_and_ids(tmp_path, tok):
    """A built-in tokenizer saved in a qwen2-typed folder (icrm's model save) reloads as itself:
    transformers 5's AutoTokenizer would swap in Qwen2Tokenizer, which splits numbers into digits."""
    from icrm.model import RewardModel, load_causal_lm, load_reward_model, save_reward_model

    config_path = tmp_path / "qwen.json"
    family_config("qwen2.5", len(tok)).to_json_file(str(config_path))
    rm = RewardModel(load_causal_lm(str(config_path), tok), backend="reference")
    save_reward_model(rm, tok, str(tmp_path / "rm"))
    _, reloaded = load_reward_model(str(tmp_path / "rm"), backend="reference")
    assert type(reloaded) is type(tok)
    texts = [r["prompt"] + r[side] for r in read_rows(os.path.join(DATA_DIR, "sort_eval.jsonl")) for side in ("chosen", "rejected")]
    assert reloaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert load_tokenizer(None, str(tmp_path / "rm"))(texts)["input_ids"] == tok(texts)["input_ids"]


# ------------------------------------------------------------------------------------------
# Sequence-classification folders in: TRL's output and our export

@pytest.fixture(scope="module")
def trl_model(tmp_path_factory, tok):
    """A tiny Llama reward model trained for a few steps by TRL's RewardTrainer, saved by TRL."""
    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer as TRLTrainer

    root = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    config = tiny_config(tok, hidden_size=32)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    args = TRLConfig(output_dir=str(root / "out"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                     report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=32, dataset_num_proc=None)
    trainer = TRLTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(TRAIN_ROWS))
    trainer.train()
    trainer.save_model(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    return root / "model"


def _hf_pair_rewards(folder, tok, rows):
    """Reference: HF's own classifier on icrm's tokenization (prompt + response + EOS), one row at a time."""
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    ds = PreferenceDataset(rows, tok, 32)
    with torch.no_grad():
        return [(hf(input_ids=torch.tensor([e.chosen_ids])).logits.item(),
                 hf(input_ids=torch.tensor([e.rejected_ids])).logits.item()) for e in ds.examples]


def test_eval_and_score_a_trl_model(trl_model, files, tmp_path, tok, capsys):
    expected = _hf_pair_rewards(trl_model, tok, EVAL_ROWS)
    assert main(["eval", "--model", str(trl_model), "--eval_file", str(files / "eval.jsonl"), "--max_length", "32",
                 "--kernels", "reference"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval_accuracy"] == pytest.approx(sum(c > r for c, r in expected) / len(expected))
    assert metrics["eval_margin"] == pytest.approx(sum(c - r for c, r in expected) / len(expected), abs=1e-5)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(trl_model), "--input", str(files / "eval.jsonl"), "--output", str(out),
                 "--max_length", "32", "--kernels", "reference"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    for (c, r), row in zip(expected, got):
        assert row["chosen_reward"] == pytest.approx(c, abs=1e-5) and row["rejected_reward"] == pytest.approx(r, abs=1e-5)


def test_fine_tune_a_trl_model_keeps_its_score_head(trl_model, tmp_path, tok):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                max_length=32, run_sft=False, compare_bt=False, kernels="reference", eval_file=None)
    expected = torch.tensor(_hf_pair_rewards(trl_model, tok, TRAIN_ROWS[:4]))
    for model in (None, AutoModelForSequenceClassification.from_pretrained(str(trl_model))):  # a folder, an object
        args = RewardConfig(**base, model_name_or_path=str(trl_model), reg_ratio=0.0, sft_regularizer=False)
        trainer = RewardTrainer(model=model, args=args, train_dataset=TRAIN_ROWS[:16], processing_class=tok)
        batch = collate_pairs(PreferenceDataset(TRAIN_ROWS[:4], tok, 32).examples, tok.pad_token_id)
        with torch.no_grad():
            rewards = sequence_rewards(trainer.model.eval()(batch["input_ids"], batch["attention_mask"])[0], batch["labels"])
        torch.testing.assert_close(rewards, expected.T.reshape(-1), rtol=1e-5, atol=1e-5)  # chosen rows first
        trainer.train()
    # ICRM needs a causal LM for the generator and the SFT term: a clear error, then the documented way.
    with pytest.raises(ValueError, match="sft_regularizer"):
        RewardTrainer(args=RewardConfig(**base, model_name_or_path=str(trl_model), reg_ratio=0.0), processing_class=tok)
    with pytest.raises(ValueError, match="generator_name_or_path"):
        RewardTrainer(args=RewardConfig(**base, model_name_or_path=str(trl_model), sft_regularizer=False),
                      processing_class=tok)
    generator_dir = tmp_path / "generator"
    AutoModelForCausalLM.from_config(tiny_config(tok, hidden_size=32)).save_pretrained(str(generator_dir))
    args = RewardConfig(**base, model_name_or_path=str(trl_model), sft_regularizer=False,
                        generator_name_or_path=str(generator_dir))
    assert RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:16], processing_class=tok).train()["step"] == 2


def test_reward_trainer_takes_a_causal_lm_object(tmp_path, tok):
    torch.manual_seed(0)
    causal_lm = AutoModelForCausalLM.from_config(tiny_config(tok, hidden_size=32))
    args = RewardConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, max_length=32,
                        run_sft=False, compare_bt=False, kernels="reference", eval_file=None)
    trainer = RewardTrainer(model=causal_lm, args=args, train_dataset=TRAIN_ROWS[:16], processing_class=tok)
    assert trainer.model.backbone is causal_lm.model  # trained in place, as TRL does
    before = causal_lm.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, causal_lm.model.layers[0].mlp.up_proj.weight)
