"""icrm.objective.icrm_loss against an independent, loop-by-loop transcription of docs/math.md."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from icrm.objective import icrm_loss, pair_mask, sequence_rewards

IGNORE = -100


def spec_loss(rewards, labels, gen_lp, sft_lp, *, smooth_weight, training, reg_ratio, weight_scale, kind, baseline, eps):
    """docs/math.md read literally, one row and one position at a time (float64)."""
    rows, length = rewards.shape
    pairs = rows // 2
    last = [max(t for t in range(length) if labels[s, t] != IGNORE) for s in range(rows)]
    seq = [rewards[s, last[s]] for s in range(rows)]
    bt = sum(-F.logsigmoid(seq[i] - seq[pairs + i]) for i in range(pairs)) / pairs

    weighted, count, omega_num = 0.0, 0.0, 0.0
    for s in range(rows):
        sigma = 1.0 if s < pairs else -1.0
        other = s + pairs if s < pairs else s - pairs
        if baseline == "row_mean":
            b = rewards[other].detach().mean()
        else:
            on = [t for t in range(length) if labels[other, t] != IGNORE]
            b = sum(rewards[other, t].detach() for t in on) / len(on)
        d = torch.sigmoid(sigma * (rewards[s] - b))
        first_dropped = False
        for t in range(length - 1):
            if labels[s, t + 1] == IGNORE:
                continue
            if not first_dropped:  # the pair straddling prompt and response
                first_dropped = True
                continue
            w = weight_scale * torch.exp(gen_lp[s, t].detach())
            if kind == "log":
                l = -(torch.log(d[t] + eps) * d[t + 1].detach() + d[t].detach() * torch.log(d[t + 1] + eps)) / 2
            elif kind == "log_nosg":
                l = -(torch.log(d[t] + eps) + torch.log(d[t + 1] + eps)) / 2
            elif kind == "product":
                l = 1 - d[t] * d[t + 1]
            else:
                l = (rewards[s, t + 1] - rewards[s, t]) ** 2
            weighted = weighted + w * l
            count += 1
            omega_num = omega_num + (d[t].detach() + d[t + 1].detach()) / 2 * w
    cons = weighted / (count + 1e-6)
    omega = omega_num / (count + 1e-6)
    s_used = 0.95 * smooth_weight + 0.05 * float(omega) if training else smooth_weight
    align = cons / (s_used + 1e-6)

    if sft_lp is None:
        sft = torch.zeros((), dtype=rewards.dtype)
    else:
        per_row = []
        for s in range(pairs):
            ts = [t for t in range(length - 1) if labels[s, t + 1] != IGNORE]
            per_row.append(sum(sft_lp[s, t] for t in ts) / len(ts))
        sft = -sum(per_row) / pairs
    total = sft + reg_ratio * align + (1 - reg_ratio) * bt
    return total, bt, align, sft, omega, s_used


def make_batch(pairs=3, length=9, vocab=11, seed=0, dtype=torch.float64):
    """Rows with different prompt lengths and right padding; chosen rows first."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    labels = torch.full((rows, length), IGNORE)
    for s in range(rows):
        prompt = 1 + (s % 3)
        end = length - (s % 2) * 2
        labels[s, prompt:end] = torch.randint(0, vocab, (end - prompt,), generator=gen)
    rewards = torch.randn(rows, length, generator=gen, dtype=dtype).requires_grad_()
    gen_lp = -torch.rand(rows, length - 1, generator=gen, dtype=dtype) * 3
    sft_lp = (-torch.rand(rows, length - 1, generator=gen, dtype=dtype) * 3).requires_grad_()
    return rewards, labels, gen_lp, sft_lp


@pytest.mark.parametrize("kind", ["log", "log_nosg", "product", "squared"])
@pytest.mark.parametrize("baseline", ["row_mean", "response_mean"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_spec_loss_and_gradients(kind, baseline, training):
    opts = dict(smooth_weight=0.37, training=training, reg_ratio=0.3, weight_scale=2.0, kind=kind, baseline=baseline, eps=1e-6)
    rewards, labels, gen_lp, sft_lp = make_batch(seed=zlib.crc32(f"{kind}/{baseline}".encode()) % 1000)  # fixed across processes
    got = icrm_loss(rewards, labels, gen_lp, sft_lp, backend="reference", **opts)
    g_rewards, g_sft = torch.autograd.grad(got.loss, (rewards, sft_lp))

    ref_rewards = rewards.detach().clone().requires_grad_()
    ref_sft = sft_lp.detach().clone().requires_grad_()
    total, bt, align, sft, omega, s_used = spec_loss(ref_rewards, labels, gen_lp, ref_sft, **opts)
    r_rewards, r_sft = torch.autograd.grad(total, (ref_rewards, ref_sft))

    torch.testing.assert_close(got.loss, total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.bt_loss, bt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.align_loss, align, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sft_loss, sft, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.omega, torch.as_tensor(omega, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert math.isclose(got.smooth_weight, s_used, rel_tol=1e-12)
    assert not got.omega.requires_grad
    torch.testing.assert_close(g_rewards, r_rewards, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_sft, r_sft, rtol=1e-9, atol=1e-12)


def test_smooth_weight_update_order():
    rewards, labels, gen_lp, sft_lp = make_batch()
    train = icrm_loss(rewards, labels, gen_lp, sft_lp, smooth_weight=0.5, training=True, backend="reference")
    assert math.isclose(train.smooth_weight, 0.95 * 0.5 + 0.05 * float(train.omega), rel_tol=1e-12)
    evaluation = icrm_loss(rewards, labels, gen_lp, sft_lp, smooth_weight=0.5, training=False, backend="reference")
    assert evaluation.smooth_weight == 0.5
    # Training divides by S' (already updated), eval by S.
    ratio = evaluation.align_loss.item() / train.align_loss.item()
    assert math.isclose(ratio, (train.smooth_weight + 1e-6) / (0.5 + 1e-6), rel_tol=1e-9)


def test_float32_matches_float64():
    rewards, labels, gen_lp, sft_lp = make_batch(seed=5)
    gold = icrm_loss(rewards, labels, gen_lp, sft_lp, smooth_weight=0.5, backend="reference")
    low = icrm_loss(rewards.detach().float(), labels, gen_lp.float(), sft_lp.detach().float(), smooth_weight=0.5, backend="reference")
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss.double(), gold.loss.detach(), rtol=1e-5, atol=1e-6)


def test_grm_reduction_is_sft_plus_bt():
    rewards, labels, gen_lp, sft_lp = make_batch(seed=1)
    grm = icrm_loss(rewards, labels, None, sft_lp, smooth_weight=0.5, reg_ratio=0.0)
    torch.testing.assert_close(grm.loss, grm.sft_loss + grm.bt_loss)
    assert float(grm.align_loss) == 0.0 and grm.smooth_weight == 0.5
    # Giving the generator with reg_ratio=0 leaves the loss unchanged.
    with_gen = icrm_loss(rewards, labels, gen_lp, sft_lp, smooth_weight=0.5, reg_ratio=0.0, backend="reference")
    torch.testing.assert_close(with_gen.loss, grm.loss)


def test_bradley_terry_reduction():
    rewards, labels, _, _ = make_batch(seed=2)
    bt = icrm_loss(rewards, labels, None, None, smooth_weight=0.5, reg_ratio=0.0)
    seq = sequence_rewards(rewards, labels)
    pairs = seq.shape[0] // 2
    expected = -F.logsigmoid(seq[:pairs] - seq[pairs:]).mean()
    torch.testing.assert_close(bt.loss, expected)
    torch.testing.assert_close(bt.loss, bt.bt_loss)
    (grad,) = torch.autograd.grad(bt.loss, rewards)
    # Only the last label token of each row gets a gradient.
    assert int((grad != 0).sum()) == rewards.shape[0]


def test_margin_and_centering_follow_trl():
    rewards, labels, _, _ = make_batch(seed=3)
    margin = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = icrm_loss(rewards, labels, None, None, smooth_weight=0.5, reg_ratio=0.0, margin=margin,
                    center_rewards_coefficient=0.01)
    seq = sequence_rewards(rewards, labels)
    expected = -F.logsigmoid(seq[:3] - seq[3:] - margin).mean() + 0.01 * ((seq[:3] + seq[3:]) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)


def test_pair_mask_drops_first_response_pair():
    loss_mask = torch.tensor([False, True, True, True, False, True, True, False, False])
    seg = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2])
    assert pair_mask(loss_mask, seg).tolist() == [False, False, True, True, False, False, True, False, False]


def pack(rewards, labels, gen_lp, sft_lp):
    """Drop the right padding of a padded batch: the packed inputs and their cu_seqlens."""
    lengths = [int((labels[s] != IGNORE).nonzero().max()) + 1 for s in range(labels.shape[0])]
    cu = torch.tensor([0] + lengths).cumsum(0)
    pad = lambda t: F.pad(t, (0, 1))  # noqa: E731  [S, T-1] -> [S, T]
    cat = lambda t: torch.cat([t[s, :n] for s, n in enumerate(lengths)])  # noqa: E731
    return cat(rewards), cat(labels), cat(pad(gen_lp)), cat(pad(sft_lp)), cu, lengths


@pytest.mark.parametrize("kind", ["log", "squared"])
def test_packed_equals_padded_with_response_mean(kind):
    rewards, labels, gen_lp, sft_lp = make_batch(seed=11)
    opts = dict(smooth_weight=0.4, reg_ratio=0.3, kind=kind, baseline="response_mean", backend="reference")
    padded = icrm_loss(rewards, labels, gen_lp, sft_lp, **opts)
    g_padded = torch.autograd.grad(padded.loss, rewards)[0]
    p_rewards, p_labels, p_gen, p_sft, cu, lengths = pack(rewards.detach(), labels, gen_lp, sft_lp.detach())
    p_rewards.requires_grad_()
    packed = icrm_loss(p_rewards, p_labels, p_gen, p_sft, cu_seqlens=cu, **opts)
    g_packed = torch.autograd.grad(packed.loss, p_rewards)[0]
    for name in ("loss", "bt_loss", "align_loss", "sft_loss", "omega"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(g_packed, torch.cat([g_padded[s, :n] for s, n in enumerate(lengths)]))


def test_packed_row_mean_averages_the_segment_only():
    rewards, labels, gen_lp, sft_lp = make_batch(seed=12)
    p_rewards, p_labels, p_gen, p_sft, cu, lengths = pack(rewards.detach(), labels, gen_lp, sft_lp.detach())
    got = icrm_loss(p_rewards, p_labels, p_gen, p_sft, cu_seqlens=cu, smooth_weight=0.5, backend="reference")
    # Fill each padded row's tail with the row's own mean: the padded row mean then equals the
    # segment mean, so the padded spec gives the packed answer.
    filled = rewards.detach().clone()
    for s, n in enumerate(lengths):
        filled[s, n:] = filled[s, :n].mean()
    want = spec_loss(filled, labels, gen_lp, sft_lp.detach(), smooth_weight=0.5, training=True, reg_ratio=0.1,
                     weight_scale=2.0, kind="log", baseline="row_mean", eps=1e-6)
    torch.testing.assert_close(got.loss, want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.align_loss, want[2], rtol=1e-10, atol=1e-12)


def test_reward_read_at_last_label_token():
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE], [IGNORE, IGNORE, 5, 6]])
    rewards = torch.arange(8.0).reshape(2, 4)
    assert sequence_rewards(rewards, labels).tolist() == [2.0, 7.0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rewards=torch.zeros(3, 5)), "rewards must have shape"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels must have the shape"),
        (dict(gen_logprobs=torch.zeros(2, 5)), "gen_logprobs must have shape"),
        (dict(gen_logprobs=None), "gen_logprobs is required"),
        (dict(baseline="median"), "baseline must be one of"),
        (dict(reg_ratio=1.5), "reg_ratio must lie"),
    ],
)
def test_errors_name_the_argument(change, message):
    args = dict(rewards=torch.zeros(2, 5), labels=torch.tensor([[IGNORE, 1, 2, 3, 4]] * 2),
                gen_logprobs=torch.zeros(2, 4), sft_logprobs=None, smooth_weight=0.5)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        icrm_loss(**args)


def test_row_without_labels_is_rejected():
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, IGNORE]])
    with pytest.raises(ValueError, match="at least one label token"):
        icrm_loss(torch.zeros(2, 3), labels, None, None, smooth_weight=0.5, reg_ratio=0.0)
