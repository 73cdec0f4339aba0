"""One full ICRM training step: our fused ops vs an authors-style eager step.

Both steps train a random-init reward model (HF ``LlamaForCausalLM`` + a ``Linear(D, 1)``
value head) next to a frozen random-init generator of the same config, on ``B`` preference
pairs (``2B`` rows of ``T`` tokens, the first quarter of each row is prompt). One step:
generator forward under ``no_grad`` -> pair weights ``2 exp(g_t)``; RM forward ->
per-token log-probs (SFT term on chosen rows) and rewards; ``L = L_sft + 0.1 L_align +
0.9 L_bt`` (ICRM_SPEC.md; ``L_align = L_cons / S`` with the EMA normalizer held at its
initial 0.5); backward; AdamW step.

* ``ours``: backbones give hidden states, ``linear_logprobs_and_rewards`` for the RM and
  ``linear_logprobs`` for the generator (never the ``[T, V]`` logits), ``consistency_loss``.
* ``eager``: the authors' way: each model's full logits (``lm_head`` on every position),
  ``log_softmax(logits.float())`` + ``gather``, value head on the hidden states, and the
  plain-PyTorch consistency loss.

The two share the loss code below and are checked against each other (losses and the LM
head / value head gradients of the first step) before timing. The SFT gradient scale of
the spec (1e-3 on the backbone) is left out: it does not change the cost.
Until the trainer (``icrm/``) lands, this builds the step from the public ops.

Rows: ``op=train_step``, ``pass=fwd+bwd`` (incl. the optimizer step), ``N`` = tokens per
step (2B x T), ``D`` = hidden size, ``V`` = vocabulary. Tokens/s = N / ms. The longest
sequence that fits is found by doubling then bisecting T (multiples of 256): on GPU until
out-of-memory, on CPU under a stated cap on the worker's peak RSS (``--cap-mb``).

Usage::

    python benchmarks/bench_train_step.py --quick   # CPU, tiny Llama config
    python benchmarks/bench_train_step.py           # GPU, ~1.1B Llama-style config, bf16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from harness import Case  # noqa: E402

IMPLS = ("ours", "eager")
IGNORE = -100
REG_RATIO = 0.1
WEIGHT_SCALE = 2.0
EMA_START = 0.5
CONFIGS = {
    # The LM head dominates here, as it does in the paper's gemma-2b (V=256k, D=2048).
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2),
    # TinyLlama-1.1B shape.
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


def param_count(config: str) -> int:
    c = CONFIGS[config]
    d, v, f, L = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    return 2 * v * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d


def make_models(case: Case, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = harness.DTYPES[case.dtype]
    config = LlamaConfig(**CONFIGS[case.extra["config"]], max_position_embeddings=max(case.extra["T"], 2048),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 1B model built on CPU first takes long
        rm = LlamaForCausalLM(config).to(dtype=dtype)
        value_head = torch.nn.Linear(config.hidden_size, 1).to(dtype=dtype)
        generator = LlamaForCausalLM(config).to(dtype=dtype).eval().requires_grad_(False)
    return rm, value_head, generator


def make_batch(case: Case, device: str):
    """``2B`` rows (chosen 0..B-1, rejected B..2B-1) of T tokens, the first T/4 are prompt."""
    pairs, length = case.extra["pairs"], case.extra["T"]
    gen = torch.Generator().manual_seed(length)
    vocab = CONFIGS[case.extra["config"]]["vocab_size"]
    input_ids = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE
    return input_ids.to(device), labels.to(device)


def icrm_loss(logp, rewards, gen_logp, labels, consistency_backend):
    """ICRM total loss from per-token ``logp``, ``rewards``, generator ``gen_logp`` ([2B, T]).

    Position t carries the log-prob of token t+1 (0 where it is ignored).
    ``consistency_backend``: ours picks ``auto``, the eager step the plain-PyTorch reference.
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
    l_cons = icrm_kernels.consistency_loss(rewards, pair_weight, pair_mask, baseline, sign, backend=consistency_backend)
    last = length - 1 - (labels != IGNORE).flip(1).float().argmax(dim=1)
    final = rewards[torch.arange(rows, device=labels.device), last]
    l_bt = -F.logsigmoid(final[:pairs] - final[pairs:]).mean()
    m = loss_mask[:pairs].float()
    l_sft = -((logp[:pairs, :-1] * m).sum(1) / m.sum(1)).mean()
    total = l_sft + REG_RATIO * l_cons / EMA_START + (1 - REG_RATIO) * l_bt
    return total, {"l_sft": l_sft, "l_cons": l_cons, "l_bt": l_bt}


def _gather_logprobs(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = targets.clamp(min=0)
    return torch.where(targets != IGNORE, logp.gather(-1, safe[..., None]).squeeze(-1), 0.0)


def build(case: Case, device: str):
    import icrm_kernels

    rm, value_head, generator = make_models(case, device)
    input_ids, labels = make_batch(case, device)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # token t+1 at t
    params = list(rm.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    backend = "auto"

    def forward_ours():
        with torch.no_grad():
            gen_hidden = generator.model(input_ids).last_hidden_state
            gen_logp = icrm_kernels.linear_logprobs(gen_hidden, generator.lm_head.weight, targets, backend=backend)
        hidden = rm.model(input_ids).last_hidden_state
        logp, rewards = icrm_kernels.linear_logprobs_and_rewards(
            hidden, rm.lm_head.weight, targets, value_head.weight, value_bias=value_head.bias, backend=backend)
        return logp, rewards, gen_logp

    def forward_eager():
        with torch.no_grad():
            gen_logp = _gather_logprobs(generator(input_ids).logits, targets)
        out = rm(input_ids, output_hidden_states=True)
        logp = _gather_logprobs(out.logits, targets)
        rewards = value_head(out.hidden_states[-1]).squeeze(-1).float()
        return logp, rewards, gen_logp

    forward = {"ours": forward_ours, "eager": forward_eager}[case.impl]

    def step() -> dict:
        total, parts = icrm_loss(*forward(), labels, "auto" if case.impl == "ours" else "reference")
        total.backward()
        out = {"loss": total.detach().reshape(1), **{k: v.detach().reshape(1) for k, v in parts.items()},
               "d_lm_head": rm.lm_head.weight.grad, "d_value_head": value_head.weight.grad}
        optimizer.step()
        # Gradients live in ``out`` only, so memory measured between steps excludes them.
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


BENCH = harness.Benchmark(stem="train_step", script=__file__, build=build, oracle="ours", gemm_peak=False)


def make_case(impl, config, pairs, length, dtype, unchecked=False) -> Case:
    extra = {"config": config, "pairs": pairs, "T": length}
    if unchecked:
        extra["unchecked"] = True
    return Case("train_step", impl, "fwd+bwd", 2 * pairs * length, CONFIGS[config]["hidden_size"],
                CONFIGS[config]["vocab_size"], dtype, extra)


def fits(result_rows, notes_cases, cap_mb, kind) -> bool:
    """A probe fits when it produced a timed row (no OOM) and, on CPU, its peak RSS <= cap."""
    if not result_rows or result_rows[-1]["ms"] in ("", "OOM"):
        return False
    return kind == "cuda" or notes_cases[-1]["peak_abs_mb"] <= cap_mb


def longest_fitting(impl, config, pairs, dtype, kind, cap_mb, t_max, rows, notes) -> dict:
    """Doubling from T=256, then bisection in steps of 256; every probe is a row."""
    def probe(length):
        case = make_case(impl, config, pairs, length, dtype, unchecked=True)
        got_rows, got_notes = harness.run_cases(BENCH, [case], kind, budget_s=0.0, max_reps=1)
        rows.extend(got_rows)
        notes["skipped"].extend(got_notes["skipped"])
        notes["cases"].extend(got_notes["cases"])
        ok = fits(got_rows, got_notes["cases"], cap_mb, kind)
        peak = got_notes["cases"][-1]["peak_abs_mb"] if got_notes["cases"] else None
        print(f"[train_step] probe {impl} T={length}: {'fits' if ok else 'does not fit'} (peak RSS {peak} MB)", flush=True)
        return ok

    good, capped = longest(probe, t_max)
    return {"impl": impl, "max_T": good, "search_cap_T": t_max, "hit_search_cap": capped}


def longest(fits_at, t_max: int, step: int = 256) -> tuple[int, bool]:
    """Largest multiple of ``step`` <= ``t_max`` where ``fits_at`` holds (0 if none), assuming
    it holds below some threshold only; and whether the search stopped at ``t_max``.
    Doubles from ``step``, then bisects between the last fit and the first failure."""
    good, length = 0, step
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
    args = parser.parse_args(argv)
    kind = harness.device_kind()
    mode = "tiny" if args.tiny else "quick" if args.quick else kind
    config, pairs, length, dtype, t_max = {
        "tiny": ("tiny", 1, 128, "fp32", 256),
        "quick": ("small", 1, 512, "fp32", 16384),
        "cpu": ("small", 2, 1024, "fp32", 32768),
        "cuda": ("1b", 2, 1024, "bf16", 65536),
    }[mode]
    impls = IMPLS if args.impls is None else tuple(args.impls.split(","))
    budget = args.budget_s if args.budget_s is not None else {"tiny": 0.02, "quick": 3.0}.get(mode, 10.0)
    rows, notes = harness.run_cases(BENCH, [make_case(i, config, pairs, length, dtype) for i in impls], kind,
                                    budget_s=budget, max_reps=5)
    notes.update(mode=mode, config=config, config_params=CONFIGS[config], params_per_model=param_count(config),
                 pairs=pairs, checked_T=length, cap_mb=None if kind == "cuda" else args.cap_mb, max_T=[])
    if not args.no_max_t:
        for impl in impls:
            notes["max_T"].append(longest_fitting(impl, config, pairs, dtype, kind, args.cap_mb, t_max, rows, notes))
            print("[train_step] " + json.dumps(notes["max_T"][-1]), flush=True)
    harness.write_results("train_step", kind, rows, notes, Path(args.out), append=args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
