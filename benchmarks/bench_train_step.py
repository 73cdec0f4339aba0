"""One full ICRM training step: the trainer's step (our fused ops) vs an authors-style eager step.

Both steps train a random-init reward model (an HF ``LlamaForCausalLM``'s decoder, a value head
``score: Linear(D, 1)`` and a trainable copy of the LM head: ``icrm.model.RewardModel``) next to
a frozen random-init generator of the same config (``icrm.model.Generator``), on ``B``
preference pairs (``2B`` rows of ``T`` tokens, the first quarter of each row is prompt). One
step: generator forward under ``no_grad`` -> pair weights ``2 exp(g_t)``; RM forward ->
per-token log-probs (SFT term on chosen rows) and rewards; ``L = L_sft + 0.1 L_align + 0.9 L_bt``
(docs/math.md; ``L_align = L_cons / S'`` with the EMA ``S' = 0.95 S + 0.05 omega``, ``S`` starting
at 0.5; the SFT gradient reaching the backbone scaled by 1e-3); backward; gradient clipping at
1.0; AdamW step.

* ``ours``: the trainer's own step, on ``[2B, T]`` rows, or with ``--packed`` padding-free
  (``padding_free: true``: the 2B sequences packed into one row with ``cu_seqlens`` and
  restarting ``position_ids``, as the trainer's collator packs them; results go to
  ``train_step_packed_<device>.csv``). ``icrm.train.RewardTrainer.training_step`` (its loop body:
  ``RewardModel`` -> ``linear_logprobs_and_rewards``, ``Generator`` -> ``linear_logprobs``, never
  the ``[T, V]`` logits; ``icrm.objective.icrm_loss`` with ``consistency_loss`` backend ``auto``
  and the authors' ``row_mean`` baseline; backward), then the trainer's optimizer step
  (clipping + AdamW + scheduler).
* ``eager``: the authors' way, transcribed here independently of ``icrm/``: each model's full
  logits (its LM head on every position of every row), ``log_softmax(logits.float())`` +
  ``gather``, the value head on the hidden states, the loss written out below with the
  plain-PyTorch consistency loss, ``clip_grad_norm_`` and ``torch.optim.AdamW``, on ``[2B, T]``
  rows (the authors pad; every row here has the full length, so nothing is padded). It uses
  the trainer's modules only as weight containers (same init, same parameters).

The two are checked against each other before timing: the loss and its parts, ``omega``, and
the gradients of the LM-head copy, the value head and the input embeddings after the first
step's backward (as the optimizer step sees them, i.e. after clipping in both).
On GPU both run with the weights in bf16 and no autocast (the trainer's ``bf16`` flag would
add fp32 master weights under autocast; it is left off so the two steps hold the same weights).

Rows: ``op=train_step``, ``pass=fwd+bwd`` (incl. the optimizer step), ``N`` = tokens per
step (2B x T), ``D`` = hidden size, ``V`` = vocabulary. Tokens/s = N / ms. The longest
sequence that fits is found by doubling then bisecting T (multiples of 256): on GPU until
out-of-memory, on CPU under a stated cap on the worker's peak RSS (``--cap-mb``). ``--quick``
searches up to T = 16384 (32768 tokens per pair) on the small config (``--t-max`` overrides).

Packed rows and attention: every row here has the full length, so the ``[2B, T]`` layout holds
no padding either; packing changes only the attention. transformers turns a packed row's
restarting ``position_ids`` into a dense ``[n, n]`` block-diagonal mask, and PyTorch's CPU SDPA
with a mask needs O(n^2) memory, so the trainer hands the decoder runs of whole sequences of at
most ``icrm.model.PACKED_RUN_TOKENS`` (1024) tokens, a longer sequence alone (causal, no mask: SDPA's
memory-efficient kernel), and concatenates the hidden states back into the packed row
(``icrm.model.last_hidden``): attention memory linear in the tokens. From T = 1024 on, each
sequence is a run of its own (the two of T = 512 share one). (Before that, the packed search
stopped at T = 4096 under the 2048 MB cap, with 1 GB extra at T = 4096.)

Usage::

    python -m benchmarks.bench_train_step --quick   # CPU, small Llama config
    python -m benchmarks.bench_train_step           # GPU, Llama-3.2-1B-style config (D=2048, V=128256), bf16
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case

IMPLS = ("ours", "eager")
IGNORE = -100
# The hyper-parameters both steps use (the trainer's defaults, except the learning rate).
LEARNING_RATE = 1e-5
REG_RATIO = 0.1
WEIGHT_SCALE = 2.0
EMA_START = 0.5
EMA_DECAY = 0.95
MEAN_EPS = 1e-6
SFT_GRAD_SCALE = 1e-3
MAX_GRAD_NORM = 1.0
IMPL_NOTES = {
    "ours": "the trainer's step: `icrm.train.RewardTrainer.training_step` (RewardModel + Generator on the fused "
            "`linear_logprobs(_and_rewards)`, no `[T, V]` logits; `icrm.objective.icrm_loss`; backward) + its "
            "optimizer step (clipping, AdamW)",
    "eager": "authors-style, transcribed in the bench: full logits of both LM heads, `log_softmax` + `gather`, "
             "plain-PyTorch consistency loss; checked against `ours` (loss parts, omega, LM-head / value-head / "
             "embedding gradients) before timing",
}
LOSS_KEYS = ("loss", "sft_loss", "align_loss", "bt_loss", "omega")
CONFIGS = {
    # The LM head dominates here, as it does in the paper's gemma-2b (V=256k, D=2048).
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2),
    # Llama-3.2-1B shape (D=2048, V=128256): the vocabulary the GPU issue asks for.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
}


def param_count(config: str) -> int:
    """Parameters of the reward model (decoder + LM-head copy + value head); the generator has as many."""
    c = CONFIGS[config]
    d, v, f, L = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    return 2 * v * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d


def make_models(case: Case, device: str):
    """``(RewardModel, Generator)`` of the trainer, random init (seeded: both impls get the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from icrm.model import Generator, RewardModel

    dtype = harness.DTYPES[case.dtype]
    config = LlamaConfig(**CONFIGS[case.extra["config"]], max_position_embeddings=max(case.extra["T"], 2048),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 1B model built on CPU first takes long
        rm = RewardModel(LlamaForCausalLM(config), sft_grad_scale=SFT_GRAD_SCALE, backend="auto").to(dtype=dtype)
        generator = Generator(LlamaForCausalLM(config), backend="auto").to(dtype=dtype)
    return rm, generator


def make_batch(case: Case, device: str):
    """``2B`` rows (chosen 0..B-1, rejected B..2B-1) of T tokens, the first T/4 are prompt.

    Every row has the full length, so there is no padding and no attention mask."""
    pairs, length = case.extra["pairs"], case.extra["T"]
    gen = torch.Generator().manual_seed(length)
    vocab = CONFIGS[case.extra["config"]]["vocab_size"]
    input_ids = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE
    return input_ids.to(device), labels.to(device)


def _grads(rm) -> dict:
    return {"d_lm_head": rm.lm_head.weight.grad, "d_value_head": rm.score.weight.grad,
            "d_embed": rm.backbone.get_input_embeddings().weight.grad}


# ---------------------------------------------------------------- ours: the trainer's step

def build_ours(case: Case, device: str):
    from icrm.config import RewardConfig
    from icrm.model import build_tiny_tokenizer
    from icrm.train import RewardTrainer

    rm, generator = make_models(case, device)
    input_ids, labels = make_batch(case, device)
    packed = case.extra.get("packed", False)
    args = RewardConfig(learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
                        lr_scheduler_type="constant", warmup_ratio=0.0, reg_ratio=REG_RATIO,
                        weight_scale=WEIGHT_SCALE, sft_grad_scale=SFT_GRAD_SCALE, kernels="auto",
                        padding_free=packed, baseline="row_mean",
                        cpu_threads=0,  # keep the harness's thread count
                        eval_file=None, bf16=False)
    # The tokenizer is only for datasets and saving, neither of which a step touches.
    trainer = RewardTrainer(model=rm, args=args, processing_class=build_tiny_tokenizer(), generator=generator)
    trainer._build_optimizer(total_steps=1)
    trainer.model.train()
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        from icrm.data import _pack_rows

        # The trainer's own packing of the same 2B sequences (prompt = the first T/4 of each).
        rows = input_ids.shape[0]
        batch = {k: v.to(device) for k, v in _pack_rows(input_ids.tolist(), [input_ids.shape[1] // 4] * rows).items()}

    def step() -> dict:
        metrics = trainer.training_step(batch)
        out = {k: torch.tensor([metrics[k]], dtype=torch.float64) for k in LOSS_KEYS}
        out.update(_grads(trainer.model))
        trainer._optimizer_step()  # clips the gradients in place, AdamW, scheduler, zero_grad(set_to_none)
        return out

    return step


# ---------------------------------------------------------------- eager: the authors' way

def icrm_loss(logp, rewards, gen_logp, labels, smooth_weight):
    """ICRM total loss from per-token ``logp``, ``rewards``, generator ``gen_logp`` ([2B, T]).

    Position t carries the log-prob of token t+1 (0 where it is ignored). Returns
    ``(total, parts)``; ``parts["smooth_weight"]`` is the updated EMA ``S'`` (a float).
    """
    import icrm_kernels

    rows, length = rewards.shape
    pairs = rows // 2
    loss_mask = labels[:, 1:] != IGNORE  # [2B, T-1]: pair (t, t+1) is on the response
    first = loss_mask.float().argmax(dim=1)
    pair_mask = loss_mask.clone()
    pair_mask[torch.arange(rows, device=labels.device), first] = False  # drop the prompt/response straddle
    pair_weight = WEIGHT_SCALE * gen_logp[:, :-1].exp()
    row_mean = rewards.detach().mean(dim=1)
    baseline = torch.cat([row_mean[pairs:], row_mean[:pairs]])
    sign = torch.cat([torch.ones(pairs), -torch.ones(pairs)]).to(device=labels.device, dtype=torch.int32)
    l_cons = icrm_kernels.consistency_loss(rewards, pair_weight, pair_mask, baseline, sign, backend="reference")
    # omega: mean over the pairs of the weighted mean preference probability of both tokens.
    d = torch.sigmoid(sign[:, None].float() * (rewards.detach() - baseline[:, None]))
    m = pair_mask.float()
    omega = ((d[:, :-1] + d[:, 1:]) / 2 * pair_weight * m).sum() / (m.sum() + MEAN_EPS)
    new_smooth = EMA_DECAY * smooth_weight + (1 - EMA_DECAY) * float(omega)
    l_align = l_cons / (new_smooth + MEAN_EPS)
    last = length - 1 - (labels != IGNORE).flip(1).float().argmax(dim=1)
    final = rewards[torch.arange(rows, device=labels.device), last]
    l_bt = -F.logsigmoid(final[:pairs] - final[pairs:]).mean()
    chosen = loss_mask[:pairs].float()
    l_sft = -((logp[:pairs, :-1] * chosen).sum(1) / chosen.sum(1)).mean()
    total = l_sft + REG_RATIO * l_align + (1 - REG_RATIO) * l_bt
    return total, {"sft_loss": l_sft, "align_loss": l_align, "bt_loss": l_bt, "omega": omega,
                   "smooth_weight": new_smooth}


def _gather_logprobs(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = targets.clamp(min=0)
    return torch.where(targets != IGNORE, logp.gather(-1, safe[..., None]).squeeze(-1), 0.0)


def build_eager(case: Case, device: str):
    rm, generator = make_models(case, device)
    rm.train()
    input_ids, labels = make_batch(case, device)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # token t+1 at t
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    state = {"smooth_weight": EMA_START}

    def forward():
        with torch.no_grad():
            gen_hidden = generator.backbone(input_ids).last_hidden_state
            gen_logp = _gather_logprobs(generator.lm_head(gen_hidden), targets)  # [2B, T, V] logits
        hidden = rm.backbone(input_ids).last_hidden_state
        # The SFT term's gradient reaches the backbone scaled by SFT_GRAD_SCALE; same value.
        scaled = SFT_GRAD_SCALE * hidden + (1 - SFT_GRAD_SCALE) * hidden.detach()
        logp = _gather_logprobs(rm.lm_head(scaled), targets)  # [2B, T, V] logits
        rewards = rm.score(hidden).squeeze(-1).float()
        return logp, rewards, gen_logp

    def step() -> dict:
        total, parts = icrm_loss(*forward(), labels, state["smooth_weight"])
        state["smooth_weight"] = parts.pop("smooth_weight")
        total.backward()
        out = {"loss": total.detach().reshape(1), **{k: v.detach().reshape(1) for k, v in parts.items()}, **_grads(rm)}
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        # Gradients live in ``out`` only, so memory measured between steps excludes them.
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


def build(case: Case, device: str):
    return {"ours": build_ours, "eager": build_eager}[case.impl](case, device)


BENCH = harness.Benchmark(stem="train_step", module="benchmarks.bench_train_step", build=build, oracle="ours", gemm_peak=False)


def make_case(impl, config, pairs, length, dtype, unchecked=False, packed=False) -> Case:
    extra = {"config": config, "pairs": pairs, "T": length, "packed": packed}
    if unchecked:
        extra["unchecked"] = True
    return Case("train_step", impl, "fwd+bwd", 2 * pairs * length, CONFIGS[config]["hidden_size"],
                CONFIGS[config]["vocab_size"], dtype, extra)


def fits(result_rows, notes_cases, cap_mb, kind) -> bool:
    """A probe fits when it produced a timed row (no OOM) and, on CPU, its peak RSS <= cap."""
    if not result_rows or result_rows[-1]["ms"] in ("", "OOM"):
        return False
    return kind == "cuda" or notes_cases[-1]["peak_abs_mb"] <= cap_mb


def longest_fitting(impl, config, pairs, dtype, kind, cap_mb, t_max, rows, notes, deadline=math.inf,
                    t_start=256, packed=False) -> dict:
    """Doubling from ``t_start``, then bisection in steps of 256; every probe is a row.

    No probe starts after ``deadline`` (``time.monotonic()``): the search then reports the
    longest T that fitted so far and ``stopped_by_budget``."""
    stopped = False

    def probe(length):
        # Past the deadline a probe reports "does not fit" without running: the search then
        # ends on the longest T that fitted so far.
        nonlocal stopped
        if time.monotonic() > deadline:
            stopped = True
            return False
        case = make_case(impl, config, pairs, length, dtype, unchecked=True, packed=packed)
        got_rows, got_notes = harness.run_cases(BENCH, [case], kind, budget_s=0.0, max_reps=1)
        rows.extend(got_rows)
        notes["skipped"].extend(got_notes["skipped"])
        notes["cases"].extend(got_notes["cases"])
        ok = fits(got_rows, got_notes["cases"], cap_mb, kind)
        peak = got_notes["cases"][-1]["peak_abs_mb"] if got_notes["cases"] else None
        print(f"[train_step] probe {impl} T={length}: {'fits' if ok else 'does not fit'} (peak RSS {peak} MB)", flush=True)
        return ok

    good, capped = longest(probe, t_max, start=t_start)
    result = {"impl": impl, "max_T": good, "search_cap_T": t_max, "search_start_T": t_start, "hit_search_cap": capped}
    return {**result, "stopped_by_budget": True} if stopped else result


def longest(fits_at, t_max: int, step: int = 256, start: int | None = None) -> tuple[int, bool]:
    """Largest multiple of ``step`` <= ``t_max`` where ``fits_at`` holds (0 if none), assuming
    it holds below some threshold only; and whether the search stopped at ``t_max``.
    Doubles from ``start`` (default ``step``), then bisects between the last fit and the first
    failure (from 0 when ``start`` itself fails)."""
    good, length = 0, start or step
    while length <= t_max:
        if not fits_at(length):
            break
        good, length = length, length * 2
    else:
        return good, True
    bad = length
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if fits_at(mid):
            good = mid
        else:
            bad = mid
    return good, False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if harness.worker_main(BENCH, argv):
        return 0
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--cap-mb", type=float, default=2048.0, help="CPU: peak-RSS cap of a worker for 'fits'")
    parser.add_argument("--no-max-t", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--t-max", type=int, default=None, help="cap of the longest-sequence search (default per mode)")
    parser.add_argument("--search-budget-s", type=float, default=math.inf,
                        help="start no search probe later than this many seconds after the start, the time split "
                             "evenly between the implementations' searches (the results so far are kept)")
    parser.add_argument("--start-t", type=int, default=256, help="first T of the longest-sequence search (doubled)")
    parser.add_argument("--packed", action="store_true", help="ours: padding-free packed rows (train_step_packed_*.csv)")
    args = harness.parse(parser, argv)
    start = time.monotonic()
    kind = harness.device_kind()
    mode = "tiny" if args.tiny else "quick" if args.quick else kind
    config, pairs, length, dtype, t_max = {
        "tiny": ("tiny", 1, 128, "fp32", 256),
        "quick": ("small", 1, 512, "fp32", 16384),  # 16384 per sequence: 32768 tokens per pair
        "cpu": ("small", 2, 1024, "fp32", 32768),
        "cuda": ("1b", 2, 1024, "bf16", 65536),
    }[mode]
    t_max = args.t_max or t_max
    load_start = os.getloadavg()[0]
    impls = IMPLS if args.impls is None else tuple(args.impls.split(","))
    budget = args.budget_s if args.budget_s is not None else {"tiny": 0.02, "quick": 3.0}.get(mode, 10.0)
    rows, notes = harness.run_cases(BENCH, [make_case(i, config, pairs, length, dtype, packed=args.packed) for i in impls],
                                    kind, budget_s=budget, max_reps=5)
    notes.update(mode=mode, config=config, config_params=CONFIGS[config], params_per_model=param_count(config),
                 pairs=pairs, checked_T=length, cap_mb=None if kind == "cuda" else args.cap_mb, max_T=[],
                 impls={k: v for k, v in IMPL_NOTES.items() if k in impls}, packed=args.packed)

    def checkpoint():
        # After the checked steps and after each search, so that a run cut off later keeps them.
        notes["loadavg"] = {"start": load_start, "end": os.getloadavg()[0]}
        save(rows, notes)

    save = harness.saver("train_step_packed" if args.packed else "train_step", kind, Path(args.out), append=args.append)
    checkpoint()
    if not args.no_max_t:
        for i, impl in enumerate(impls):
            # Each search gets an equal share of the search time still left.
            now = time.monotonic()
            deadline = now + (start + args.search_budget_s - now) / (len(impls) - i)
            notes["max_T"].append(longest_fitting(impl, config, pairs, dtype, kind, args.cap_mb, t_max, rows, notes,
                                                  deadline=deadline, t_start=args.start_t, packed=args.packed))
            print("[train_step] " + json.dumps(notes["max_T"][-1]), flush=True)
            checkpoint()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
