"""Benchmarks, the static performance model and the GPU runbook of icrm-kernels.

A package: run each script as a module from the repository root, e.g.
``python -m benchmarks.bench_linear_logprobs --tiny``, ``python -m benchmarks.predict``,
``python -m benchmarks.report``. Every script writes under ``runs/benchmarks/`` (git-ignored)
unless given ``--out DIR``; only ``--update-results`` writes the shipped ``benchmarks/results/``
and the README sections generated from it (``benchmarks/paths.py``).
"""
