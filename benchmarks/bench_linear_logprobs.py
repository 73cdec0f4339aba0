"""Speed and memory of ``linear_logprobs`` / ``linear_logprobs_and_rewards`` vs eager, compile and peers.

Implementations (``impl``):

* ``eager``: full ``[N, V]`` logits, ``log_softmax``, ``gather`` (+ a separate reward GEMV),
  the way the ICRM authors' code gets token log-probs.
* ``compile``: ``torch.compile`` of that eager code.
* ``torch_linear_ce``: ``torch.nn.functional.linear_cross_entropy(..., reduction="none")``
  with ``options=LinearCrossEntropyOptions()`` (its chunked path; logp = -loss).
* ``liger``: Liger-Kernel ``LigerFusedLinearCrossEntropyLoss(reduction="none")``.
* ``cce``: Apple cut-cross-entropy ``linear_cross_entropy(..., reduction="none")`` with
  ``impl="cce"`` on GPU and ``impl="torch_compile"`` on CPU (logp = -loss).
* ``triton`` / ``reference``: ours, ``backend="triton"`` / ``backend="reference"`` (row-chunked
  recompute on large N*V). ``reference`` is the oracle every other output is checked against.
* ``cublas_1gemm`` (fwd) / ``cublas_3gemm`` (fwd+bwd): the bound the GPU goals are stated against,
  timed in the same run and not checked (they compute something else): ``torch.matmul`` of
  ``hidden @ weight^T`` into ``[N, V]`` logits, and for fwd+bwd also ``logits @ weight`` and
  ``logits^T @ hidden`` (the two backward GEMMs, the logits standing in for their gradient), no
  softmax. Goals: ours fwd+bwd within 1.15x of ``cublas_3gemm``, ours fwd at least 85% of
  ``cublas_1gemm``'s rate (``report.target_check``).
* ``reference_naive`` (``--naive-vs-chunked`` only): the library's unchunked oracle
  ``linear_logprobs_reference`` (full logits, ``logsumexp``), the "naive" of the foundation issue.

Passes: ``fwd`` runs under ``torch.no_grad()`` (the frozen generator's use);
``fwd+bwd`` runs the forward with autograd and backpropagates fixed random output
gradients into ``hidden``, ``weight`` (and ``value_weight``). FLOPs: 2NDV / 6NDV
(+ 2ND / 6ND for the reward head); recomputation is not counted.

Usage::

    python -m benchmarks.bench_linear_logprobs --quick      # CPU set, < 5 min on 2 idle cores
    python -m benchmarks.bench_linear_logprobs --naive-vs-chunked 3   # eager vs reference A/B
    python -m benchmarks.bench_linear_logprobs              # GPU sweep + ICRM paper recipe
    python -m benchmarks.bench_linear_logprobs --shapes 16384x4096x128256 --passes fwd+bwd  # chosen shapes

On a GPU the sweep is the GPU issue's grid (N in {4096, 16384} x D in {2048, 4096} x V in
{32000, 128256, 256000}, bf16) plus the paper recipe; ``benchmarks/gpu_runbook.py`` runs it
shape by shape within a time budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import Case, Skip

OPS = ("linear_logprobs", "linear_logprobs_and_rewards")
IMPLS = ("reference", "eager", "compile", "torch_linear_ce", "liger", "cce", "triton", "cublas_1gemm", "cublas_3gemm")
#: The bare-GEMM bounds and the one pass each is timed in.
BOUND_PASS = {"cublas_1gemm": "fwd", "cublas_3gemm": "fwd+bwd"}
PASSES = ("fwd", "fwd+bwd")
#: ICRM paper recipe (gemma-2b): 3 pairs x 1024 tokens x 2 rows = 6144 tokens, D=2048, V=256000.
PAPER_SHAPE = (6144, 2048, 256000)
#: The GPU issue's grid: (N, D, V), bf16.
GPU_GRID = [(n, d, v) for n in (4096, 16384) for d in (2048, 4096) for v in (32000, 128256, 256000)]


def shapes(mode: str) -> list[tuple[str, int, int, int, str]]:
    """(op, N, D, V, dtype) per mode; every shape runs every pass and implementation."""
    if mode == "tiny":
        return [(op, 64, 32, 500, "fp32") for op in OPS]
    if mode == "quick":
        # linear_logprobs only: on CPU the reward head is one more GEMV, and every extra
        # shape costs a torch.compile of its own (the 5-minute budget).
        return [("linear_logprobs", n, 512, 32000, "fp32") for n in (1024, 4096, 8192)]
    if mode == "cpu":
        return [(op, n, 512, v, "fp32") for op in OPS for n in (1024, 4096, 8192) for v in (32000, 128256)]
    return [(op, n, d, v, "bf16") for op in OPS for (n, d, v) in GPU_GRID + [PAPER_SHAPE]]


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"4096x2048x32000,16384x4096x128256"`` -> ``[(N, D, V), ...]``."""
    parts = [item.split("x") for item in text.split(",")]
    if not all(len(p) == 3 and all(x.isdigit() and int(x) > 0 for x in p) for p in parts):
        raise SystemExit(f"--shapes: expected comma-separated NxDxV of positive integers (e.g. 16384x4096x128256), "
                         f"got {text!r}")
    return [(int(n), int(d), int(v)) for n, d, v in parts]


def runs_pass(impl: str, pass_: str) -> bool:
    """Every implementation runs both passes except the bounds, one each (``BOUND_PASS``)."""
    return BOUND_PASS.get(impl, pass_) == pass_


def flops(case: Case) -> float:
    per_row = case.D * case.V + (case.D if case.op == "linear_logprobs_and_rewards" else 0)
    return (2.0 if case.pass_ == "fwd" else 6.0) * case.N * per_row


def make_inputs(case: Case, device: str) -> dict:
    """Deterministic inputs for a case: the same on every worker of one device.

    Drawn on the device itself: a [256000, 4096] weight drawn on the CPU takes seconds per
    case, which a GPU sweep of a few hundred cases cannot spend."""
    gen = torch.Generator(device=device).manual_seed(case.N * 7 + case.V)
    dtype = harness.DTYPES[case.dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    hidden = randn(case.N, case.D)
    weight = randn(case.V, case.D, scale=case.D**-0.5)
    targets = torch.randint(0, case.V, (case.N,), generator=gen, device=device)
    value_weight = randn(case.D, scale=case.D**-0.5)
    grad_logp = torch.randn(case.N, generator=gen, device=device)
    grad_rewards = torch.randn(case.N, generator=gen, device=device)
    return dict(hidden=hidden, weight=weight, targets=targets, value_weight=value_weight,
                grad_logp=grad_logp, grad_rewards=grad_rewards)


# ------------------------------------------------------------------ log-prob of each impl


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _peer_logprobs(impl: str, device: str):
    """``(hidden, weight, targets) -> logp [N]`` for a peer, or raise Skip with the reason."""
    if impl == "eager":
        return eager_logprobs
    if impl == "reference_naive":
        from icrm_kernels.linear_logprobs.reference import linear_logprobs_reference

        return linear_logprobs_reference
    if impl == "compile":
        return harness.compile_fn(eager_logprobs)
    if impl == "torch_linear_ce":
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy"):
            raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none", options=options).float()
    if impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise Skip(f"liger-kernel not importable: {type(exc).__name__}: {exc}") from None
        if device != "cuda":
            raise Skip("liger-kernel's fused linear cross-entropy is Triton-only and needs a GPU "
                       "(on CPU it fails with 'RuntimeError: 0 active drivers')")
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, y: -loss(w, h, y).float()
    if impl == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise Skip(f"cut-cross-entropy not importable: {type(exc).__name__}: {exc}") from None
        cce_impl = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none", impl=cce_impl).float()
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def bare_gemms(case: Case, device: str):
    """``cublas_1gemm`` / ``cublas_3gemm``: the bare GEMMs of the op's shape (module doc)."""
    x = make_inputs(case, device)
    hidden, weight = x["hidden"], x["weight"]

    def run() -> dict:
        logits = torch.matmul(hidden, weight.T)
        if case.impl == "cublas_3gemm":
            torch.matmul(logits, weight)
            torch.matmul(logits.T, hidden)
        return {}

    return run


def build(case: Case, device: str):
    """The callable one measurement runs: forward (no_grad) or forward + backward."""
    import icrm_kernels

    if case.impl in BOUND_PASS:
        return bare_gemms(case, device)
    x = make_inputs(case, device)
    with_rewards = case.op == "linear_logprobs_and_rewards"
    backward = case.pass_ == "fwd+bwd"
    hidden, weight, targets, value_weight = x["hidden"], x["weight"], x["targets"], x["value_weight"]
    leaves = [hidden, weight] + ([value_weight] if with_rewards else [])
    for t in leaves:
        t.requires_grad_(backward)

    if case.impl in ("triton", "reference"):
        if with_rewards:
            def forward():
                return icrm_kernels.linear_logprobs_and_rewards(hidden, weight, targets, value_weight, backend=case.impl)
        else:
            def forward():
                return icrm_kernels.linear_logprobs(hidden, weight, targets, backend=case.impl), None
    else:
        logprobs = _peer_logprobs(case.impl, device)

        def forward():
            rewards = (hidden @ value_weight).float() if with_rewards else None
            return logprobs(hidden, weight, targets), rewards

    def run() -> dict:
        with torch.set_grad_enabled(backward):
            logp, rewards = forward()
            out = {"logp": logp.detach()}
            if rewards is not None:
                out["rewards"] = rewards.detach()
            if backward:
                loss = (logp * x["grad_logp"]).sum()
                if rewards is not None:
                    loss = loss + (rewards * x["grad_rewards"]).sum()
                loss.backward()
                out["d_hidden"], out["d_weight"] = hidden.grad, weight.grad
                if with_rewards:
                    out["d_value_weight"] = value_weight.grad
        # The gradients live in ``out`` only, so memory measured between calls excludes them.
        for t in leaves:
            t.grad = None
        return out

    return run


BENCH = harness.Benchmark(stem="linear_logprobs", module="benchmarks.bench_linear_logprobs", build=build, flops=flops,
                          first_call_is_steady=("reference", "reference_naive", "eager", "torch_linear_ce"),
                          unchecked_impls=tuple(BOUND_PASS))


def naive_vs_chunked(rounds: int, kind: str, out: Path) -> None:
    """The foundation issue's comparison: naive (``eager`` and the library's unchunked
    ``reference_naive``) vs the chunked ``reference`` at N=8192, D=512, V=32000, fp32, fwd+bwd,
    in alternating rounds (fresh workers each) so that load from other jobs on a shared CPU
    hits all alike. One row per round and implementation."""
    rows, notes = [], None
    for i in range(rounds):
        got_rows, got_notes = harness.run_cases(
            BENCH, [Case("linear_logprobs", impl, "fwd+bwd", 8192, 512, 32000, "fp32") for impl in ("reference", "eager", "reference_naive")],
            kind, budget_s=0.0, max_reps=1)
        rows += got_rows
        if notes is None:
            notes = got_notes
        else:
            notes["cases"] += got_notes["cases"]
            notes["skipped"] += got_notes["skipped"]
        print(f"[naive_vs_chunked] round {i + 1}/{rounds} done", flush=True)
    notes.update(mode=f"naive_vs_chunked x{rounds}", rounds=rounds)
    harness.write_results("linear_logprobs_naive_vs_chunked", kind, rows, notes, out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if harness.worker_main(BENCH, argv):
        return 0
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--naive-vs-chunked", type=int, default=0, metavar="ROUNDS",
                        help="only run naive (eager, reference_naive) vs chunked reference at N=8192, D=512, "
                             "V=32000 fp32 fwd+bwd, alternating, ROUNDS times")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (split a long GPU sweep)")
    parser.add_argument("--n", default=None, help="comma-separated N values to keep from the mode's shapes")
    parser.add_argument("--shapes", default=None, metavar="NxDxV,...", help="run these shapes instead of the mode's")
    parser.add_argument("--dtype", default=None, choices=sorted(harness.DTYPES),
                        help="dtype of --shapes (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated passes (fwd, fwd+bwd)")
    args = harness.parse(parser, argv)
    kind = harness.device_kind()
    if args.naive_vs_chunked:
        naive_vs_chunked(args.naive_vs_chunked, kind, Path(args.out))
        return 0
    mode = "tiny" if args.tiny else "quick" if args.quick else kind
    impls = IMPLS if args.impls is None else tuple(args.impls.split(","))
    ops, passes = args.ops.split(","), args.passes.split(",")
    for name, got, allowed in (("--ops", ops, OPS), ("--passes", passes, PASSES)):
        if not set(got) <= set(allowed):
            raise SystemExit(f"{name}: expected a comma-separated subset of {','.join(allowed)}, got {','.join(got)}")
    sizes = None if args.n is None else {int(n) for n in args.n.split(",")}
    if args.shapes is None:
        grid = shapes(mode)
    else:
        dtype = args.dtype or ("bf16" if mode == "cuda" else "fp32")
        grid = [(op, n, d, v, dtype) for op in OPS for (n, d, v) in parse_shapes(args.shapes)]
    cases = [Case(op, impl, p, n, d, v, dt) for (op, n, d, v, dt) in grid for p in passes for impl in impls
             if op in ops and (sizes is None or n in sizes) and runs_pass(impl, p)]
    budget = args.budget_s if args.budget_s is not None else {"tiny": 0.02, "quick": 1.5}.get(mode, 10.0)
    save = harness.saver("linear_logprobs", kind, Path(args.out), append=args.append)
    rows, notes = harness.run_cases(BENCH, cases, kind, budget_s=budget, max_reps=5 if mode != "tiny" else 2,
                                    on_progress=lambda rows, notes: save(rows, dict(notes, mode=mode)))
    save(rows, dict(notes, mode=mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
