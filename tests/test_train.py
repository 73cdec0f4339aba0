"""Model wrapper, training loop, checkpoints/resume, export, DDP (CPU, tiny model, few steps)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from icrm import RewardConfig, RewardTrainer
from icrm.config import DATA_DIR
from icrm.data import PreferenceDataset, collate_pairs, read_rows
from icrm.model import (
    RewardModel, apply_lora, build_tiny_tokenizer, check_packing_support, export_sequence_classification, last_hidden,
    load_causal_lm, load_reward_model, packed_runs, shifted_targets, tiny_config,
)
from icrm.objective import sequence_rewards
from icrm.checkpoint import list_checkpoints, verify_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ROWS = read_rows(os.path.join(DATA_DIR, "sort_train.jsonl"))[:96]
EVAL_ROWS = read_rows(os.path.join(DATA_DIR, "sort_eval.jsonl"))[:32]


def tiny_args(tmp_path, **changes) -> RewardConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8, logging_steps=1,
                learning_rate=3e-3, warmup_ratio=0.0, max_length=32, run_sft=False, compare_bt=False,
                kernels="reference", per_device_eval_batch_size=32, eval_file=None)
    base.update(changes)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    ds = PreferenceDataset(TRAIN_ROWS[:3], tok, 32)
    return collate_pairs([ds[i] for i in range(3)], tok.pad_token_id)


# ------------------------------------------------------------------------------------------
# Model

@pytest.mark.parametrize("scale", [0.1, 0.0])
def test_sft_gradient_to_backbone_is_scaled(tok, batch, scale):
    torch.manual_seed(0)
    rm = RewardModel(load_causal_lm("tiny", tok, seed=0), sft_grad_scale=scale, backend="reference").double()
    targets = shifted_targets(batch["labels"])
    coef_r = torch.randn(batch["labels"].shape, dtype=torch.float64)
    coef_l = torch.randn(batch["labels"].shape, dtype=torch.float64)
    params = [p for p in rm.parameters() if p.requires_grad]

    rewards, logp = rm(batch["input_ids"], batch["attention_mask"], targets)
    got = torch.autograd.grad((coef_r * rewards).sum() + (coef_l * logp).sum(), params, allow_unused=True)

    # Eager: full logits; the backbone sees the SFT term's gradient times `scale`, the heads in full.
    hidden = last_hidden(rm.backbone, batch["input_ids"], batch["attention_mask"])
    scaled = scale * hidden + (1 - scale) * hidden.detach()
    ref_rewards = hidden @ rm.score.weight.reshape(-1)
    logits = torch.log_softmax(scaled @ rm.lm_head.weight.T, dim=-1)
    valid = targets != -100
    ref_logp = torch.where(valid, logits.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    torch.testing.assert_close(rewards, ref_rewards)
    torch.testing.assert_close(logp, ref_logp)
    want = torch.autograd.grad((coef_r * ref_rewards).sum() + (coef_l * ref_logp).sum(), params, allow_unused=True)
    for (name, _), g, w in zip([(n, p) for n, p in rm.named_parameters() if p.requires_grad], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


def test_forward_does_not_call_the_lm_head_module(tok, batch):
    causal_lm = load_causal_lm("tiny", tok)
    calls = []
    causal_lm.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    rm = RewardModel(causal_lm, backend="reference")
    rm.lm_head.register_forward_hook(lambda *a: calls.append(1))
    rm(batch["input_ids"], batch["attention_mask"], shifted_targets(batch["labels"]))
    assert calls == []  # hidden states go to the fused op; no [B, T, V] logits module call


def test_export_round_trip_matches_trainer_rewards(tmp_path, tok, batch):
    torch.manual_seed(1)
    rm = RewardModel(load_causal_lm("tiny", tok, seed=3), backend="reference")
    rm = apply_lora(rm, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # non-zero adapters so the merge matters
        for name, p in rm.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    rm.eval()
    with torch.no_grad():
        rewards, _ = rm(batch["input_ids"], batch["attention_mask"])
    expected = sequence_rewards(rewards, batch["labels"])

    out = export_sequence_classification(rm, tok, str(tmp_path / "export"))
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        scores = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert scores.shape == (6, 1)
    torch.testing.assert_close(scores[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    assert hf.config.architectures == ["LlamaForSequenceClassification"]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("score.weight").shape == (1, 64)
    assert not any("lm_head" in k or "lora" in k for k in keys)


def test_qwen2_from_config_json_trains_and_exports(tmp_path, tok, batch):
    """Another architecture, random init from a config.json, tied embeddings (the head copy unties them)."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config_path = tmp_path / "qwen2.json"
    config.to_json_file(str(config_path))
    trainer = RewardTrainer(args=tiny_args(tmp_path, max_steps=2, model_name_or_path=str(config_path)),
                            train_dataset=TRAIN_ROWS[:16])
    trainer.train()
    rm = trainer.model.eval()
    assert rm.lm_head.weight.data_ptr() != rm.backbone.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        expected = sequence_rewards(rm(batch["input_ids"], batch["attention_mask"])[0], batch["labels"])
    hf = AutoModelForSequenceClassification.from_pretrained(export_sequence_classification(rm, tok, str(tmp_path / "hf")))
    assert type(hf).__name__ == "Qwen2ForSequenceClassification"
    with torch.no_grad():
        scores = hf.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Training loop

def test_ten_step_run_loss_decreases(tmp_path):
    trainer = RewardTrainer(args=tiny_args(tmp_path), train_dataset=TRAIN_ROWS, eval_dataset=EVAL_ROWS)
    result = trainer.train()
    losses = [r["loss"] for r in trainer.log_history if "loss" in r]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "bt_loss", "align_loss", "sft_loss", "omega", "smooth_weight", "accuracy", "margin",
                "min_reward", "mean_reward", "max_reward", "num_tokens", "lr", "tokens_per_s", "peak_mem_gb", "grad_norm"):
        assert key in lines[0], key
    assert lines[0]["smooth_weight"] != 0.5  # the EMA moved
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and "eval_token_reward_std" in result
    assert (run / "training.png").exists() and [os.path.basename(p) for p in list_checkpoints(str(run))] == ["checkpoint-10"]
    for folder in (trainer.save_model(), str(run / "checkpoint-10")):  # both load on their own
        rm, _ = load_reward_model(folder, backend="reference")
        torch.testing.assert_close(rm.score.weight, trainer.model.score.weight)


@pytest.mark.parametrize("use_peft", [False, True])
def test_resume_continues_exactly(tmp_path, tok, use_peft):
    """With dropout on (attention dropout, or LoRA dropout), so a resume that does not restore
    the RNG state draws other masks and fails."""
    config = tiny_config(tok)
    config.attention_dropout = 0.0 if use_peft else 0.3
    config.to_json_file(str(tmp_path / "tiny_dropout.json"))
    args = tiny_args(tmp_path, max_steps=6, save_steps=3, save_total_limit=3, output_dir=str(tmp_path / "a"),
                     use_peft=use_peft, lora_r=4, lora_dropout=0.3, model_name_or_path=str(tmp_path / "tiny_dropout.json"))
    full = RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:40])  # 5 batches: crosses an epoch
    full.train()
    assert [os.path.basename(p) for p in list_checkpoints(args.output_dir)] == ["checkpoint-3", "checkpoint-6"]
    with safe_open(os.path.join(args.output_dir, "checkpoint-3", "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    assert {"score.weight", "lm_head.weight"} <= stored
    if use_peft:  # adapters + heads only; the base is rebuilt from model_name_or_path and the seed
        assert all("lora_" in k or not k.startswith("backbone.") for k in stored)
    resumed = RewardTrainer(args=args.replace(output_dir=str(tmp_path / "b"),
                                              resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3")),
                            train_dataset=TRAIN_ROWS[:40])
    resumed.train()
    a = [(r["step"], r["loss"], r["smooth_weight"]) for r in full.log_history if "loss" in r]
    b = [(r["step"], r["loss"], r["smooth_weight"]) for r in resumed.log_history if "loss" in r]
    assert [s for s, _, _ in b] == [1, 2, 3, 4, 5, 6]
    for (sa, la, wa), (sb, lb, wb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-6, abs=1e-7) and wa == pytest.approx(wb, rel=1e-9)
    for (name, pa), pb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_runs_group_whole_sequences():
    cu_seqlens = torch.tensor([0, 5, 14, 17, 29, 36, 40])
    assert packed_runs(cu_seqlens, 1000) == [(0, 40)]
    # 5 + 9 fill a run; 3 + 12 > 14 leaves the 3 alone; 12 + 7 > 14; 7 + 4 share one.
    assert packed_runs(cu_seqlens, 14) == [(0, 14), (14, 17), (17, 29), (29, 40)]
    assert packed_runs(cu_seqlens, 1) == [(0, 5), (5, 14), (14, 17), (17, 29), (29, 36), (36, 40)]
    assert packed_runs(torch.tensor([0, 3000]), 1024) == [(0, 3000)]


@pytest.mark.parametrize("run_tokens", [10_000, 40, 1])  # one decoder call; runs of several sequences; each alone
def test_packed_hidden_states_match_per_sequence_and_padded(tok, monkeypatch, run_tokens):
    """Packed (in runs of at most ``run_tokens``), per-sequence and padded forwards give the same
    rewards, SFT log-probs and parameter gradients (float64), for sequences of unequal lengths."""
    import icrm.model

    monkeypatch.setattr(icrm.model, "PACKED_RUN_TOKENS", run_tokens)
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 23, 5, 31, 12, 18]
    seqs = [torch.randint(6, len(tok), (n,), generator=gen) for n in lengths]
    coef_r = [torch.randn(n, generator=gen, dtype=torch.float64) for n in lengths]
    coef_l = [torch.randn(n, generator=gen, dtype=torch.float64) for n in lengths]
    rm = RewardModel(load_causal_lm("tiny", tok, seed=0), sft_grad_scale=0.5, backend="reference").double()
    check_packing_support(rm.backbone)  # the trainer's start-up check holds for this model
    params = [p for p in rm.parameters() if p.requires_grad]

    def run(input_ids, attention_mask, position_ids, cu_seqlens, labels, pick):
        """-> per-sequence rewards and log-probs (``pick(out, i)`` cuts sequence i) and the gradients."""
        rewards, logp = rm(input_ids, attention_mask, shifted_targets(labels, cu_seqlens), position_ids, cu_seqlens)
        rewards = [pick(rewards, i) for i in range(len(seqs))]
        logp = [pick(logp, i) for i in range(len(seqs))]
        loss = sum((r * c).sum() + (lp * c2).sum() for r, lp, c, c2 in zip(rewards, logp, coef_r, coef_l))
        return rewards, logp, torch.autograd.grad(loss, params)

    cu = torch.tensor([0] + lengths).cumsum(0)
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = run(packed_ids, None, position_ids, cu, packed_ids, lambda x, i: x[0, cu[i]:cu[i + 1]])

    per_seq = [[], [], None]
    for i, s in enumerate(seqs):
        r, lp = rm(s[None], None, shifted_targets(s[None]))
        per_seq[0].append(r[0])
        per_seq[1].append(lp[0])
    loss = sum((r * c).sum() + (lp * c2).sum() for r, lp, c, c2 in zip(*per_seq[:2], coef_r, coef_l))
    per_seq[2] = torch.autograd.grad(loss, params)

    width = max(lengths)
    padded_ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        padded_ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s, 1, s
    padded = run(padded_ids, mask, None, None, labels, lambda x, i: x[i, :lengths[i]])

    for name, other in (("per-sequence", per_seq), ("padded", padded)):
        for what, a, b in zip(("rewards", "sft logprobs", "gradients"), packed, other):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=f"packed vs {name}: {what}")


def test_packing_check_refuses_a_decoder_that_attends_across_sequences(tok, monkeypatch):
    import transformers.masking_utils

    decoder = load_causal_lm("tiny", tok, seed=0).model
    check_packing_support(decoder)
    # As a model whose causal mask ignores position_ids: one causal block over the packed row.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="attends across packed sequences"):
        check_packing_support(decoder)


@pytest.mark.parametrize("trainer_cls,run_tokens", [("reward", None), ("reward", 40), ("sft", 40)])
def test_padding_free_matches_padded(tmp_path, monkeypatch, trainer_cls, run_tokens):
    """Same losses packed and padded, the packed row in one decoder call or in runs (``run_tokens``)."""
    import icrm.model
    from icrm import SFTTrainer

    runs = []
    if run_tokens is not None:
        monkeypatch.setattr(icrm.model, "PACKED_RUN_TOKENS", run_tokens)
        real_runs = icrm.model.packed_runs
        monkeypatch.setattr(icrm.model, "packed_runs", lambda *a: runs.append(real_runs(*a)) or runs[-1])
    logs = []
    for packed in (False, True):
        args = tiny_args(tmp_path, max_steps=3, padding_free=packed, baseline="response_mean",
                         output_dir=str(tmp_path / f"packed{packed}"), gradient_accumulation_steps=2)
        cls = RewardTrainer if trainer_cls == "reward" else SFTTrainer
        trainer = cls(args=args, train_dataset=TRAIN_ROWS[:48], eval_dataset=EVAL_ROWS[:8])
        result = trainer.train()
        logs.append(([r["loss"] for r in trainer.log_history if "loss" in r], result))
    (padded, padded_eval), (packed, packed_eval) = logs
    assert run_tokens is None or max(map(len, runs)) > 1  # the packed rows did take several decoder calls
    assert packed == pytest.approx(padded, rel=1e-4, abs=1e-5)
    assert packed_eval["eval_loss"] == pytest.approx(padded_eval["eval_loss"], rel=1e-4)


@pytest.mark.interpret
@pytest.mark.parametrize("packed", [False, True])
def test_triton_kernels_train_like_the_reference(tmp_path, packed):
    """The trainer on the Triton kernels (interpreter on CPU) gives the reference's losses and grad norms."""
    import importlib.util

    if importlib.util.find_spec("icrm_kernels.linear_logprobs.kernels") is None:
        pytest.skip("the Triton kernels are not in this checkout yet")
    logs = []
    for kernels in ("reference", "triton"):
        args = tiny_args(tmp_path, max_steps=2, per_device_train_batch_size=4, kernels=kernels, padding_free=packed,
                         sft_grad_scale=0.1, output_dir=str(tmp_path / kernels))
        trainer = RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:16])
        trainer.train()
        logs.append([(r["loss"], r["align_loss"], r["sft_loss"], r["grad_norm"]) for r in trainer.log_history if "loss" in r])
    for ref, tri in zip(*logs):
        assert tri == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_keep_last_k_and_resume_latest(tmp_path):
    args = tiny_args(tmp_path, max_steps=4, save_steps=1, save_total_limit=2)
    RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:32]).train()
    assert [os.path.basename(p) for p in list_checkpoints(args.output_dir)] == ["checkpoint-3", "checkpoint-4"]
    again = RewardTrainer(args=args.replace(resume_from_checkpoint="latest"), train_dataset=TRAIN_ROWS[:32])
    again.train()
    assert again.global_step == 4  # nothing left to do
    assert not [n for n in os.listdir(args.output_dir) if n.startswith("tmp-") or n.endswith(".old")]


#: Audit events that change the filesystem (``open`` counts when it opens for writing).
_FS_CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink", "os.link",
               "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move"}


def _changes_fs(event, args) -> bool:
    if event == "open":
        _, mode, flags = args
        return bool((isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR))
    return event in _FS_CHANGES


def _save_killed_at(trainer, kill_at: int) -> int | None:
    """Run ``trainer.save_checkpoint()`` in a forked child that SIGKILLs itself just before its
    ``kill_at``-th filesystem change (0: never). -> the number of changes a whole save makes,
    or None when the child was killed. Independent of how the save names or moves things."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        count = 0

        def hook(event, args):
            nonlocal count
            if _changes_fs(event, args):
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        trainer.save_checkpoint()
        os.write(write_fd, str(count).encode())
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + 120
    while True:  # bounded wait: a child stuck after fork fails the test instead of hanging it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked save did not finish within 120 s")
        time.sleep(0.01)
    with os.fdopen(read_fd) as fh:
        reported = fh.read()
    if kill_at:
        assert os.WIFSIGNALED(status) and not reported, f"the save finished before change {kill_at}"
        return None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and reported
    return int(reported)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("step_saved_before", [False, True])
def test_kill_at_every_point_of_a_save_leaves_complete_checkpoints(tmp_path, step_saved_before):
    """SIGKILL before each filesystem change of saving checkpoint-2 (writing, manifest,
    promotion, rotation). Every ``checkpoint-N`` left must be complete (its manifest holds),
    and resuming ``latest`` must load the newest one with exactly the weights of its step.
    ``step_saved_before``: an older checkpoint-2 is in place (a step saved again after resuming
    from an earlier checkpoint), so the promotion has to replace it."""
    out = tmp_path / "run"
    args = tiny_args(tmp_path, max_steps=1, save_total_limit=1, output_dir=str(out), per_device_train_batch_size=4)
    trainer = RewardTrainer(args=args, train_dataset=TRAIN_ROWS[:8])
    trainer.train()
    weights = {1: {k: v.clone() for k, v in trainer._model_state().items()}}
    trainer.args = args.replace(save_total_limit=2)
    trainer.global_step = 2
    if step_saved_before:
        with torch.no_grad():
            trainer.model.score.weight.add_(1.0)
        trainer.save_checkpoint()
        weights["old 2"] = {k: v.clone() for k, v in trainer._model_state().items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01)
    weights[2] = {k: v.clone() for k, v in trainer._model_state().items()}
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    total = _save_killed_at(trainer, 0)
    assert total >= 5
    resumer = RewardTrainer(args=args.replace(max_steps=2), train_dataset=TRAIN_ROWS[:8])
    resumer._build_optimizer(2)
    for kill_at in range(1, total + 1):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        _save_killed_at(trainer, kill_at)
        folders = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()]
        assert folders, f"kill at change {kill_at}/{total}: no checkpoint left"
        for name in folders:
            assert (out / name / "checksums.json").exists(), f"kill at change {kill_at}/{total}: {name} is partial"
            assert verify_checkpoint(str(out / name)) is None, f"kill at change {kill_at}/{total}: {name} is damaged"
        newest = resumer._load_checkpoint("latest")
        step = resumer.global_step
        assert newest == list_checkpoints(str(out))[-1] and step in (1, 2)
        candidates = [weights[1]] if step == 1 else [weights[2]] + ([weights["old 2"]] if step_saved_before else [])
        state = resumer._model_state()
        assert any(all(torch.equal(state[k], w[k]) for k in w) for w in candidates), f"kill at change {kill_at}"


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """2 ranks x 4 pairs under torchrun (gloo) = 1 process x 8 pairs: same losses, same weights.

    Bradley-Terry (a mean over pairs, no per-rank EMA or token mean), so the per-rank means
    average to the global one and DDP's averaged gradient is the global gradient.
    """
    out = tmp_path / "ddp"
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS[:48]))
    settings = dict(max_steps=3, logging_steps=1, max_length=32, reg_ratio=0.0, sft_regularizer=False, learning_rate=3e-3,
                    warmup_ratio=0.0, kernels="reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "icrm.cli", "train",
           "--run_sft", "false", "--compare_bt", "false", "--reward_model_init", "random",
           "--per_device_train_batch_size", "4", "--train_file",
           str(train_file), "--eval_file", "", "--output_dir", str(out)]
    cmd += [x for k, v in settings.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = out / "icrm"
    lines = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # rank 0 writes, once per step
    state = json.loads((stage / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["smooth_weight"]) == 2
    assert (stage / "checkpoint-3" / "rng_state_1.pt").exists()

    single = RewardTrainer(args=tiny_args(tmp_path, output_dir=str(tmp_path / "single"), per_device_train_batch_size=8,
                                          **settings), train_dataset=TRAIN_ROWS[:48])
    single.train()
    for key in ("loss", "bt_loss", "accuracy", "grad_norm"):
        want = [r[key] for r in single.log_history if "loss" in r]
        assert [r[key] for r in lines] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    with safe_open(str(stage / "checkpoint-3" / "model.safetensors"), "pt") as fh:
        for name, value in single._model_state().items():
            # Adam turns float rounding in small gradients into update noise (seen: 2e-5); one
            # step moves a weight by ~lr = 3e-3, so a different global batch would show.
            torch.testing.assert_close(fh.get_tensor(name), value, rtol=0, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", -1.0), ("reg_ratio", 2.0), ("max_length", 1), ("per_device_train_batch_size", 0),
     ("consistency_kind", "cubic"), ("baseline", "median"), ("kernels", "cuda"), ("save_total_limit", 0),
     ("gradient_accumulation_steps", 1.5), ("warmup_ratio", 1.5), ("cpu_threads", -1)],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**{field: value})


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 0.01\nmax_steps: 5\nlora_target_modules: [q_proj]\n")
    cfg = RewardConfig.from_yaml(str(path), {"max_steps": "7", "use_peft": "true", "eval_file": "none"})
    assert (cfg.learning_rate, cfg.max_steps, cfg.use_peft, cfg.eval_file) == (0.01, 7, True, None)
    assert cfg.lora_target_modules == ["q_proj"]
    with pytest.raises(ValueError, match="unknown config field"):
        RewardConfig.from_dict({"learning_rat": 1})
    with pytest.raises(ValueError, match="max_steps must be of type int"):
        RewardConfig.from_dict({"max_steps": "many"})
