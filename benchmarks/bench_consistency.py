"""Speed and memory of ``consistency_loss`` forward + backward, padded and packed.

Implementations: ``reference`` (ours, plain PyTorch; the oracle), ``triton`` (ours) and
``compile`` (``torch.compile`` of the reference function). Ops in the CSV:
``consistency_loss_padded`` (rows of T = 1024 tokens) and ``consistency_loss_packed``
(segments of 256..1792 tokens described by ``cu_seqlens``); ``N`` is the total number of
tokens, ``D`` and ``V`` are empty, so are ``tflops`` and ``gemm_frac`` (no GEMM here).

Memory-bound op, so the report gives GB/s: :func:`bytes_moved` counts the minimum traffic
of a fused forward + backward (read rewards, weights and mask twice, write the reward
gradient) and the notes carry the device's measured copy bandwidth (``copy_`` between two
resident 256 MiB buffers: read + write) to compare with.

Usage::

    python -m benchmarks.bench_consistency --quick     # CPU
    python -m benchmarks.bench_consistency             # GPU: 64k .. 4M tokens
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import Case

IMPLS = ("reference", "triton", "compile")
LAYOUTS = ("padded", "packed")
ROW_TOKENS = 1024


def token_counts(mode: str) -> list[int]:
    if mode == "tiny":
        return [2048, 4096]
    if mode == "quick":
        return [1 << 16, 1 << 18, 1 << 20]
    return [1 << 16, 1 << 18, 1 << 20, 1 << 22]


def bytes_moved(case: Case) -> int:
    """Minimal HBM/DRAM traffic of a fused fwd+bwd: 2 x (rewards + weights + mask) + grad."""
    item = harness.DTYPES[case.dtype].itemsize
    return case.N * (2 * (item + item + 1) + item)


def make_inputs(case: Case, device: str) -> dict:
    gen = torch.Generator().manual_seed(case.N)
    dtype = harness.DTYPES[case.dtype]
    n = case.N
    if case.op.endswith("packed"):
        lengths = torch.randint(256, 1793, (n // 256 + 1,), generator=gen)
        cum = torch.cumsum(lengths, 0)
        lengths = lengths[: int((cum < n).sum()) + 1]
        lengths[-1] -= int(lengths.sum()) - n
        lengths = lengths[lengths > 0]
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]).to(torch.int32)
        shape, pair_shape, rows = (n,), (n,), lengths.numel()
    else:
        rows = n // ROW_TOKENS
        cu_seqlens = None
        shape, pair_shape = (rows, ROW_TOKENS), (rows, ROW_TOKENS - 1)
    rewards = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    weights = (2 * torch.rand(pair_shape, generator=gen)).to(device=device, dtype=dtype)
    mask = (torch.rand(pair_shape, generator=gen) < 0.9).to(device)
    baseline = torch.randn(rows, generator=gen).to(device=device, dtype=dtype)
    sign = torch.where(torch.arange(rows) % 2 == 0, 1, -1).to(device=device, dtype=torch.int32)
    return dict(rewards=rewards, weights=weights, mask=mask, baseline=baseline, sign=sign,
                cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device))


def build(case: Case, device: str):
    import icrm_kernels
    from icrm_kernels.consistency.reference import consistency_loss_packed_reference, consistency_loss_reference

    x = make_inputs(case, device)
    rewards = x["rewards"].requires_grad_(True)
    packed = x["cu_seqlens"] is not None
    if case.impl == "compile":
        fn = harness.compile_fn(consistency_loss_packed_reference if packed else consistency_loss_reference)
        extra = (x["cu_seqlens"],) if packed else ()

        def forward():
            return fn(rewards, x["weights"], x["mask"], x["baseline"], x["sign"], *extra)
    else:
        def forward():
            return icrm_kernels.consistency_loss(rewards, x["weights"], x["mask"], x["baseline"], x["sign"],
                                                 cu_seqlens=x["cu_seqlens"], backend=case.impl)

    def run() -> dict:
        rewards.grad = None
        loss = forward()
        loss.backward()
        return {"loss": loss.detach().reshape(1), "d_rewards": rewards.grad}

    return run


def copy_gbps(kind: str) -> float:
    """Measured copy bandwidth (GB/s, read + write) between two resident 256 MiB buffers."""
    src = torch.ones(1 << 26, dtype=torch.float32, device=kind)
    dst = torch.zeros_like(src)
    if kind == "cuda":
        ms = harness.time_gpu(lambda: dst.copy_(src))[0]
    else:
        dst.copy_(src)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            times.append((time.perf_counter() - start) * 1000.0)
        ms = harness.quantiles(times)[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


BENCH = harness.Benchmark(stem="consistency", module="benchmarks.bench_consistency", build=build, gemm_peak=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if harness.worker_main(BENCH, argv):
        return 0
    args = harness.parse(harness.common_args(__doc__.splitlines()[0]), argv)
    kind = harness.device_kind()
    mode = "tiny" if args.tiny else "quick" if args.quick else kind
    impls = IMPLS if args.impls is None else tuple(args.impls.split(","))
    cases = [Case(f"consistency_loss_{layout}", impl, "fwd+bwd", n, None, None, "fp32")
             for layout in LAYOUTS for n in token_counts(mode) for impl in impls]
    budget = args.budget_s if args.budget_s is not None else {"tiny": 0.02, "quick": 1.0}.get(mode, 5.0)
    save = harness.saver("consistency", kind, Path(args.out), append=args.append)
    extra = {"mode": mode, "row_tokens": ROW_TOKENS,
             "bytes_model": "N * (2 * (4 + 4 + 1) + 4) bytes for fp32: read rewards, weights, mask twice, write grad"}
    rows, notes = harness.run_cases(BENCH, cases, kind, budget_s=budget, max_reps=10,
                                    on_progress=lambda rows, notes: save(rows, {**notes, **extra}))
    save(rows, {**notes, **extra, "copy_gbps": copy_gbps(kind)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
