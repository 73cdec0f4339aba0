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
from icrm.config import DATA_DIR, TRL_FIXED
from icrm.data import PreferenceDataset, collate_pairs, read_rows
from icrm.model import build_tiny_tokenizer, load_causal_lm, load_reward_model, load_tokenizer, tiny_config
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
            "--model_name_or_path", str(config_path), "--output_dir", str(out), "--run_sft", "true"]
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
    # transformers 5's AutoTokenizer forces Qwen2Tokenizer on any qwen2 folder (right for Qwen's own
    # tokenizer, not for the built-in one used here; docs/trainer.md), so that family reads it as saved.
    hf_tok = load_tokenizer(None, str(hf_dir)) if family == "qwen2.5" else AutoTokenizer.from_pretrained(str(hf_dir))
    for row, scored in zip(EVAL_ROWS, icrm_scores):
        for side in ("chosen", "rejected"):
            enc = hf_tok(row["prompt"] + row[side], return_tensors="pt")
            assert enc["input_ids"][0, -1] == hf_tok.eos_token_id
            with torch.no_grad():
                reward = hf(**enc).logits[0, 0].item()
            assert reward == pytest.approx(scored[f"{side}_reward"], abs=1e-4)
    # And the export back into icrm: `icrm score` on it gives the same rewards.
    again = tmp_path / "scores_hf.jsonl"
    assert main(["score", "--model", str(hf_dir), "--input", str(files / "eval.jsonl"), "--output", str(again),
                 "--max_length", "32", "--kernels", "reference"]) == 0
    for first, second in zip(icrm_scores, (json.loads(x) for x in again.read_text().splitlines())):
        assert second["chosen_tokens"] == first["chosen_tokens"]
        for key in ("chosen_reward", "rejected_reward"):
            assert second[key] == pytest.approx(first[key], abs=1e-4)


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


def test_export_tokenizer_keeps_a_bos_in_front(tok):
    """A tokenizer that adds BOS itself (Llama-3 style) keeps it; EOS goes at the end."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from icrm.model import tokenizer_appending_eos

    with_bos = copy.deepcopy(tok)
    bos = with_bos.convert_tokens_to_ids("<|system|>")  # stands in for <|begin_of_text|>
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<|system|> $A", pair="<|system|> $A $B:1",
                                                                   special_tokens=[("<|system|>", bos)])
    exported = tokenizer_appending_eos(with_bos)
    assert exported("sort : 2 1")["input_ids"] == [bos] + tok("sort : 2 1")["input_ids"] + [tok.eos_token_id]
    assert exported("sort : 2 1", add_special_tokens=False)["input_ids"] == tok("sort : 2 1")["input_ids"]


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
    for run, model in enumerate((None, AutoModelForSequenceClassification.from_pretrained(str(trl_model)))):  # a folder, an object
        args = RewardConfig(**base, model_name_or_path=str(trl_model), reg_ratio=0.0, sft_regularizer=False)
        args = args.replace(output_dir=str(tmp_path / f"run{run}"))  # a second run into one output_dir is refused
        trainer = RewardTrainer(model=model, args=args, train_dataset=TRAIN_ROWS[:16], processing_class=tok)
        batch = collate_pairs(PreferenceDataset(TRAIN_ROWS[:4], tok, 32).examples, tok.pad_token_id)
        with torch.no_grad():
            rewards = sequence_rewards(trainer.model.eval()(batch["input_ids"], batch["attention_mask"])[0], batch["labels"])
        torch.testing.assert_close(rewards, expected.T.reshape(-1), rtol=1e-5, atol=1e-5)  # chosen rows first
        trainer.train()
    saved, _ = load_reward_model(trainer.save_model(), backend="reference")  # and back out for eval / score / export
    with torch.no_grad():
        torch.testing.assert_close(saved.eval()(batch["input_ids"], batch["attention_mask"])[0],
                                   trainer.model.eval()(batch["input_ids"], batch["attention_mask"])[0])
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


def test_classifier_trained_with_pad_equal_to_eos_is_flagged(tmp_path, tok):
    """TRL pads with EOS when a tokenizer has no pad; HF then reads such a model before the EOS."""
    config = tiny_config(tok, hidden_size=32)
    config.num_labels, config.pad_token_id = 1, tok.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(tmp_path / "m"))
    with pytest.warns(UserWarning, match="token before EOS"):
        load_causal_lm(str(tmp_path / "m"), tok)


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


# ------------------------------------------------------------------------------------------
# TRL's RewardConfig files

TRL_YAML = """\
output_dir: {out}
learning_rate: 0.003
lr_scheduler_type: cosine
lr_scheduler_kwargs: {{min_lr_rate: 0.1}}
warmup_steps: 0.25
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
gradient_accumulation_steps: 1
max_steps: 8
logging_steps: 0.25
eval_strategy: steps
eval_steps: 0.5
save_strategy: steps
save_steps: 0.5
save_total_limit: 5
report_to: none
max_length: 32
bf16: true
gradient_checkpointing: false
optim: adamw_torch
adam_epsilon: 1e-8
weight_decay: 0.0
max_grad_norm: 1.0
seed: 42
center_rewards_coefficient: 0.01
"""


def test_trl_reward_config_yaml_runs(tmp_path, files):
    """One YAML file, read by TRL 1.16's RewardConfig and by icrm (with icrm's data fields added)."""
    from trl import RewardConfig as TRLConfig

    text = TRL_YAML.format(out=tmp_path / "run")
    TRLConfig(**yaml.safe_load(text), use_cpu=True)  # TRL accepts the file as it is
    path = tmp_path / "cfg.yaml"
    path.write_text(text + f"train_file: {files / 'train.jsonl'}\neval_file: {files / 'eval.jsonl'}\n"
                           "run_sft: false\ncompare_bt: false\nkernels: reference\n")
    args = RewardConfig.from_yaml(str(path))
    assert args.report_to is None and args.warmup_steps == 0.25 and args.eval_steps == 0.5
    with pytest.warns(UserWarning, match="bf16: true is ignored on cpu"):
        trainer = RewardTrainer(args=args)
    trainer.train()
    logged = [r["step"] for r in trainer.log_history if "loss" in r]
    evals = [r["step"] for r in trainer.log_history if "eval_accuracy" in r]
    assert logged == [2, 4, 6, 8] and evals == [4, 8, 8]  # fractions of 8 steps; the final evaluation too
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-4", "checkpoint-8", "metrics.jsonl", "training.png"]
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.003)  # min_lr_rate reached at the end


@pytest.mark.parametrize("strategy", ["epoch", "no"])
def test_eval_and_save_strategies(tmp_path, strategy):
    args = RewardConfig(output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=8,
                        max_length=32, run_sft=False, compare_bt=False, kernels="reference", eval_strategy=strategy,
                        save_strategy=strategy, eval_steps=1, save_steps=1, save_total_limit=5)
    trainer = RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:16], eval_dataset=EVAL_ROWS[:8])
    trainer.train()  # 2 batches per epoch, 4 steps
    evals = [r["step"] for r in trainer.log_history if "eval_accuracy" in r]
    saved = sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-"))
    if strategy == "epoch":
        assert evals == [2, 4, 4] and saved == ["checkpoint-2", "checkpoint-4"]
    else:
        assert evals == [4] and saved == []
    if strategy == "epoch":  # 32 rows in 5 batches an epoch, 2 per step: epoch 1 ends inside step 3, epoch 2 at step 5
        args = args.replace(output_dir=str(tmp_path / "accum"), gradient_accumulation_steps=2, save_strategy="no",
                            per_device_train_batch_size=7)
        trainer = RewardTrainer(args=args, train_dataset=TRAIN_ROWS, eval_dataset=EVAL_ROWS[:8])
        trainer.train()
        assert [r["step"] for r in trainer.log_history if "eval_accuracy" in r] == [3, 5, 6]


def test_warmup_steps_and_scheduler_kwargs():
    args = RewardConfig(warmup_steps=0.1, warmup_ratio=0.5)  # warmup_steps wins, as in transformers
    assert args.warmup_steps == 0.1
    assert RewardConfig(warmup_steps=3).warmup_steps == 3
    factor = lr_lambda("cosine", 10, 110, num_cycles=0.5, min_lr_rate=0.2)
    assert factor(9) == pytest.approx(10 / 11) and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.2 + 0.8 * 0.5) and factor(110) == pytest.approx(0.2)
    assert lr_lambda("cosine", 0, 100, num_cycles=1.0)(50) == pytest.approx(0.0)  # a full cycle is back down


@pytest.mark.parametrize("values, message", [
    ({"report_to": "wandb"}, "report_to"), ({"report_to": ["tensorboard", "all"]}, "report_to"),
    ({"eval_strategy": "best"}, "eval_strategy"), ({"save_strategy": "sometimes"}, "save_strategy"),
    ({"warmup_steps": 1.5}, "warmup_steps"), ({"save_steps": -0.5}, "save_steps"), ({"logging_steps": 0}, "logging_steps"),
    ({"lr_scheduler_kwargs": {"power": 2}}, "lr_scheduler_kwargs"), ({"max_length_policy": "keep_end"}, "max_length_policy"),
    ({"optim": "sgd"}, "optim"), ({"adam_epsilon": 1e-6}, "adam_epsilon"), ({"push_to_hub": True}, "push_to_hub"),
])
def test_trl_fields_bad_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig.from_dict(values)


def test_cli_parses_trl_field_types():
    args = RewardConfig.from_dict({"save_steps": "0.25", "logging_steps": "5", "report_to": "none",
                                   "lr_scheduler_kwargs": '{"min_lr_rate": 0.1}', "eval_steps": "null"})
    assert (args.save_steps, args.logging_steps, args.report_to, args.eval_steps) == (0.25, 5, None, 5)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_report_to_tensorboard(tmp_path):
    args = RewardConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, max_length=32,
                        run_sft=False, compare_bt=False, kernels="reference", eval_file=None, report_to=["tensorboard"],
                        logging_steps=1)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:16])
        return
    RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:16]).train()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "run" / "runs"))


def test_docs_table_lists_every_trl_reward_config_field():
    from trl import RewardConfig as TRLConfig

    with open(os.path.join(REPO, "docs", "trainer.md")) as fh:
        text = fh.read()
    table = text[text.index("### Every TRL `RewardConfig` field"):]
    rows = {}
    for line in table.splitlines()[4:]:
        if not line.startswith("| `"):
            break
        name, status = [c.strip() for c in line.strip("|").split("|")[:2]]
        rows[name.strip("`")] = status
    assert sorted(rows) == sorted(f.name for f in dataclasses.fields(TRLConfig))
    ours = {f.name for f in dataclasses.fields(RewardConfig)}
    for name, status in rows.items():
        assert status in ("same", "different", "accepted", "not supported"), (name, status)
        assert (status in ("same", "different")) == (name in ours), name
        assert (status == "accepted") == (name in TRL_FIXED), name


# ------------------------------------------------------------------------------------------
# Non-default trainer options, each against a direct computation with plain torch / HF modules

@pytest.mark.parametrize("option", ["gen_temperature", "softcap", "value_head_bias", "generator_folder"])
def test_non_default_option_reaches_the_loss(option, tmp_path, tok):
    """The trainer's loss equals ``icrm_loss`` on inputs computed directly: rewards ``hidden @ w + b``,
    generator log-probs from the generator's own HF forward (HF applies Gemma-2's softcap), divided
    by ``gen_temperature``, SFT log-probs from the head copy's full logits (softcapped likewise)."""
    config = family_config("gemma2" if option == "softcap" else "llama3.2", len(tok))
    if option == "softcap":
        config.final_logit_softcapping = 0.5  # small enough to change every log-prob
    config_path = tmp_path / "config.json"
    config.to_json_file(str(config_path))
    changes = {"gen_temperature": {"gen_temperature": 0.5}, "softcap": {}, "value_head_bias": {"value_head_bias": True},
               "generator_folder": {"generator_name_or_path": str(tmp_path / "generator")}}[option]
    if option == "generator_folder":
        torch.manual_seed(123)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "generator"))
    args = RewardConfig(output_dir=str(tmp_path / "run"), model_name_or_path=str(config_path), max_length=32,
                        run_sft=False, compare_bt=False, kernels="reference", eval_file=None, reg_ratio=0.5, **changes)
    trainer = RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:8], processing_class=tok)
    rm = trainer.model.eval()
    if option == "value_head_bias":
        with torch.no_grad():
            rm.score.bias.fill_(0.75)
    batch = collate_pairs(PreferenceDataset(TRAIN_ROWS[:3], tok, 32).examples, tok.pad_token_id)
    with torch.no_grad():
        out, rewards, _ = trainer._forward(batch, training=False)

        # Direct computation.
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        hidden = rm.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        want_rewards = hidden @ rm.score.weight[0] + (0.75 if option == "value_head_bias" else 0.0)
        if option == "generator_folder":
            generator = AutoModelForCausalLM.from_pretrained(str(tmp_path / "generator"))
        else:  # the starting model, rebuilt from the same seed
            generator = load_causal_lm(str(config_path), tok, seed=args.seed)
        gen_logits = generator.eval()(input_ids=ids, attention_mask=mask).logits / args.gen_temperature
        gen_logp = torch.log_softmax(gen_logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        gen_logp = torch.where(targets != -100, gen_logp, 0.0)[:, :-1]
        head_logits = hidden @ rm.lm_head.weight.T
        if option == "softcap":
            head_logits = 0.5 * torch.tanh(head_logits / 0.5)
        sft_targets = targets.clone()
        sft_targets[labels.shape[0] // 2:] = -100  # the SFT term reads the chosen rows only
        sft_logp = torch.log_softmax(head_logits, -1).gather(-1, sft_targets.clamp_min(0)[..., None])[..., 0]
        sft_logp = torch.where(sft_targets != -100, sft_logp, 0.0)[:, :-1]
        want = icrm_loss(want_rewards, labels, gen_logp, sft_logp, smooth_weight=trainer.smooth_weight, training=False,
                         reg_ratio=0.5, backend="reference")
    torch.testing.assert_close(rewards, want_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.align_loss, want.align_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sft_loss, want.sft_loss, rtol=1e-5, atol=1e-6)
