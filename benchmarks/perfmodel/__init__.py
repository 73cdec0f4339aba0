"""The static performance model of ``linear_logprobs`` (``python -m benchmarks.predict`` is its
command line): ``hardware`` (constants and the efficiency table, each with its source),
``simulator`` (the L2 model and launch descriptions), ``implementations`` (ours from the
kernels' launch plan, CCE, Liger, the bare cuBLAS GEMMs) and ``timing`` (milliseconds under a
set of assumptions). Every number it gives is a PREDICTION, not a measurement.
"""
