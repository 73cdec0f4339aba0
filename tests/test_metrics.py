"""The process metrics against hand-computed cases, and the arm switch against the objective it names."""

import numpy as np
import pytest
import torch

from icrm import metrics
from icrm.config import ARMS, RewardConfig
from icrm.model import build_tiny_tokenizer
from icrm.objective import icrm_loss


def test_rankdata_spearman_auroc_by_hand():
    assert metrics.rankdata([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1 2 3, y = 1 3 2: 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
    assert metrics.spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert np.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))
    # positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs won 1 + 1 + 0 + 1 of 4
    assert metrics.auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert metrics.auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(metrics.auroc([0.1, 0.2], [1, 1]))


def test_word_end_tokens_on_the_word_level_tokenizer():
    tok = build_tiny_tokenizer()
    assert metrics.word_end_tokens(tok, "3 7 12") == [0, 1, 2, 3]  # three words, then EOS


def test_process_metrics_by_hand():
    rows = [
        {"chosen_values": [0.5, 1.0, 1.0], "rejected_values": [0.0, 0.0, 0.0], "first_error": 0},
        {"chosen_values": [0.8, 1.0, 1.0], "rejected_values": [0.8, 0.0, 0.0], "first_error": 1},
    ]
    # rewards: [last prompt token, after word 0, after word 1, at EOS]
    rewards = [np.array([0.0, 0.6, 0.9, 1.0]), np.array([0.0, -0.5, -0.6, -0.7]),   # row 0: largest drop at word 0
               np.array([0.0, 0.7, 0.8, 0.2]), np.array([0.0, 0.4, 0.3, -1.0])]     # row 1: largest drop at EOS, not word 1
    out = metrics.process_metrics(rows, rewards)
    assert out["pair_accuracy"] == pytest.approx(1.0)  # 1.0 > -0.7, 0.2 > -1.0
    assert out["first_error_acc"] == pytest.approx(0.5)
    assert out["first_error_chance"] == pytest.approx(1 / 3)  # three candidate positions (two words, EOS) per row
    assert out["first_error_at_eos"] == pytest.approx(0.5)  # row 1's largest drop is at EOS
    # Within each response: chosen 0 ranks (1 2 3) vs (1 2.5 2.5) -> sqrt(3)/2; chosen 1 (2 3 1) vs (1 2.5 2.5) -> 0;
    # rejected 1 (3 2 1) vs (3 1.5 1.5) -> sqrt(3)/2; rejected 0 has constant V (skipped).
    assert out["value_spearman_within"] == pytest.approx((np.sqrt(3) / 2 * 2) / 3)
    # Only rejected 1 has both reachable (0.4) and lost (0.3, -1.0) prefixes: AUROC 1.
    assert out["value_auroc_within"] == pytest.approx(1.0)
    scores = [0.6, 0.9, 1.0, -0.5, -0.6, -0.7, 0.7, 0.8, 0.2, 0.4, 0.3, -1.0]
    values = [0.5, 1.0, 1.0, 0.0, 0.0, 0.0, 0.8, 1.0, 1.0, 0.8, 0.0, 0.0]
    assert out["value_spearman"] == pytest.approx(metrics.spearman(scores, values))
    # reachable: 0.6 0.9 1.0 0.7 0.8 0.2 0.4 (7); not: -0.5 -0.6 -0.7 0.3 -1.0 (5); only 0.3 > 0.2 is lost
    assert out["value_auroc"] == pytest.approx(1 - 1 / 35)
    # A reward falling with position (0, -1, -2): within rejected 1 (V 0.8 0 0) the reachable prefix comes
    # first, AUROC 1; within chosen 0 (V 0.5 1 1) Spearman -sqrt(3)/2, chosen 1 the same, rejected 1 +sqrt(3)/2.
    base = metrics.position_baseline(rows)
    assert base["value_auroc_within"] == pytest.approx(1.0)
    assert base["value_spearman_within"] == pytest.approx(-np.sqrt(3) / 2 / 3)
    assert base["value_spearman"] == pytest.approx(metrics.spearman([0, -1, -2] * 4, values))
    with pytest.raises(ValueError, match="chosen_values has 3 entries"):
        metrics.process_metrics(rows, [np.zeros(5)] * 4)


class CountingRM(torch.nn.Module):
    """Stub reward model: the reward at position t is the running sum of the token ids so far."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, *_):
        return (input_ids * attention_mask).cumsum(1).float(), None


def test_word_rewards_and_best_of_n_by_hand():
    tok = build_tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    [r] = metrics.word_rewards(CountingRM(), tok, [("sort : 3 1\n", "1 3")], max_length=16)
    prompt = ids("sort") + ids(":") + ids("3") + ids("1")
    assert r.tolist() == [prompt, prompt + ids("1"), prompt + ids("1") + ids("3"), prompt + ids("1") + ids("3") + tok.eos_token_id]
    # Bigger numbers have bigger ids here, so the stub prefers the response with the largest sum.
    # Duplicates collapse: group 0 has 3 distinct candidates (a uniform pick over all 5 would be right 1 in 5).
    groups = [{"prompt": "sort : 3 1\n", "responses": ["1 3", "3 1", "1 4", "1 4", "3 1"],
               "correct": [True, False, False, False, False]},
              {"prompt": "sort : 5 2\n", "responses": ["2 5", "2", "2 5"], "correct": [True, False, True]}]
    assert metrics.distinct_candidates(groups[1]) == (["2 5", "2"], [True, False])
    out = metrics.best_of_n(CountingRM(), tok, groups, max_length=16)
    assert out == {"bon_accuracy": 0.5, "bon_random": pytest.approx((1 / 3 + 1 / 2) / 2), "bon_oracle": 1.0,
                   "bon_candidates": 2.5}
    with pytest.raises(ValueError, match="max_length=3 is too short"):
        metrics.word_rewards(CountingRM(), tok, [("sort : 3 1\n", "1 3")], max_length=3)


def test_every_arm_folder_is_a_stage_folder():
    """`icrm train` refuses / overwrites a previous run by its stage folders: every arm's must be one."""
    from icrm.pipeline import STAGE_DIRS

    assert {"sft", *ARMS} <= set(STAGE_DIRS)


def test_arms_set_the_objective_fields():
    fields = {a: RewardConfig(arm=a) for a in ARMS}
    assert (fields["bt"].reg_ratio, fields["bt"].sft_regularizer) == (0.0, False)
    assert (fields["grm"].reg_ratio, fields["grm"].sft_regularizer) == (0.0, True)
    for a in ("icrm", "icrm_uniform", "icrm_squared"):
        assert fields[a].reg_ratio == 0.1 and fields[a].sft_regularizer
    assert fields["icrm_uniform"].uniform_weights and not fields["icrm"].uniform_weights
    assert fields["icrm_squared"].consistency_kind == "squared" and fields["icrm"].consistency_kind == "log"
    assert [fields[a].arm_name() for a in ARMS] == [ARMS[a][0] for a in ARMS]
    assert RewardConfig(reg_ratio=0.0).arm_name() == "GRM"  # names follow the fields without an arm too
    with pytest.raises(ValueError, match="arm must be one of"):
        RewardConfig(arm="dpo")
    with pytest.raises(ValueError, match="needs reg_ratio > 0"):
        RewardConfig(arm="icrm", reg_ratio=0.0)


def _batch(seed=0, pairs=3, length=9):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(2 * pairs, length, generator=g, dtype=torch.float64)
    labels = torch.randint(3, 50, (2 * pairs, length), generator=g)
    labels[:, :3] = -100
    gen = torch.randn(2 * pairs, length - 1, generator=g, dtype=torch.float64).clamp(max=0)
    sft = torch.randn(2 * pairs, length - 1, generator=g, dtype=torch.float64).clamp(max=0)
    return rewards, labels, gen, sft


def _loss(cfg, rewards, labels, gen, sft):
    return icrm_loss(rewards, labels, None if cfg.uniform_weights or cfg.reg_ratio == 0 else gen,
                     sft if cfg.sft_regularizer else None, smooth_weight=0.5, reg_ratio=cfg.reg_ratio,
                     kind=cfg.consistency_kind, uniform_weights=cfg.uniform_weights)


def test_arm_switch_gives_the_intended_objective():
    rewards, labels, gen, sft = _batch()
    out = {a: _loss(RewardConfig(arm=a), rewards, labels, gen, sft) for a in ARMS}
    icrm = out["icrm"]
    # BT: the Bradley-Terry term alone; GRM: + the SFT term = ICRM's objective with reg_ratio 0.
    assert out["bt"].loss == pytest.approx(float(icrm.bt_loss))
    assert out["grm"].loss == pytest.approx(float(icrm.bt_loss + icrm.sft_loss))
    grm_as_icrm = icrm_loss(rewards, labels, gen, sft, smooth_weight=0.5, reg_ratio=0.0)
    assert out["grm"].loss == pytest.approx(float(grm_as_icrm.loss))
    assert icrm.loss == pytest.approx(float(icrm.sft_loss + 0.1 * icrm.align_loss + 0.9 * icrm.bt_loss))
    # Uniform weights = a generator that gives every token probability 1; squared = kind "squared".
    certain = icrm_loss(rewards, labels, torch.zeros_like(gen), sft, smooth_weight=0.5, reg_ratio=0.1)
    assert out["icrm_uniform"].loss == pytest.approx(float(certain.loss))
    assert float(out["icrm_uniform"].align_loss) != pytest.approx(float(icrm.align_loss))
    squared = icrm_loss(rewards, labels, gen, sft, smooth_weight=0.5, reg_ratio=0.1, kind="squared")
    assert out["icrm_squared"].loss == pytest.approx(float(squared.loss))
    assert float(squared.align_loss) != pytest.approx(float(icrm.align_loss))


@pytest.mark.parametrize("init", ["base", "generator", "random"])
def test_reward_model_init_picks_the_start(init, tmp_path, monkeypatch):
    """`reward_model_init`: the reward model's backbone starts from the pretrained base (the built-in
    model's), the SFT-ed generator or random weights; the generator is the SFT of the pretrained base
    in every case; icrm_uniform runs without a generator."""
    from icrm import train as train_mod
    from icrm.data import read_rows
    from icrm.config import DATA_DIR
    from icrm.model import load_causal_lm
    from icrm.pretrain import BASE_DIR

    seen = {}

    def fake_train(self, resume_from_checkpoint=None):
        seen[self.args.arm] = (self.model.backbone.embed_tokens.weight.detach().clone(),
                               None if self.generator is None else
                               self.generator.backbone.embed_tokens.weight.detach().clone())
        return {"step": 0}

    monkeypatch.setattr(train_mod.RewardTrainer, "train", fake_train)
    rows = read_rows(f"{DATA_DIR}/process_train.jsonl")[:8]
    cfg = RewardConfig(output_dir=str(tmp_path), sft_max_steps=2, sft_learning_rate=0.05, max_length=32,
                       per_device_train_batch_size=4, kernels="reference", eval_file=None, eval_long_file=None,
                       bon_file=None, bon_long_file=None, reward_model_init=init)
    train_mod.train_arms(cfg, ["icrm", "icrm_uniform"], train_dataset=rows, echo=lambda *_: None, save=False)
    tok = build_tiny_tokenizer()
    base = load_causal_lm(BASE_DIR, tok).get_input_embeddings().weight
    random_init = load_causal_lm("tiny", tok, seed=cfg.seed).get_input_embeddings().weight
    sft = load_causal_lm(str(tmp_path / "sft" / "final"), tok).get_input_embeddings().weight
    assert not torch.equal(base, sft) and not torch.equal(base, random_init)
    # The SFT moved the pretrained base a little (2 steps), not a random init.
    assert (sft - base).abs().max() < (sft - random_init).abs().max()
    rm_start, generator = seen["icrm"]
    assert torch.equal(rm_start, {"base": base, "generator": sft, "random": random_init}[init])
    assert torch.equal(generator, sft)
    assert seen["icrm_uniform"][1] is None


def test_reward_model_init_is_validated():
    with pytest.raises(ValueError, match="reward_model_init must be one of .*'random'.*got 'pretrained'"):
        RewardConfig(reward_model_init="pretrained")
