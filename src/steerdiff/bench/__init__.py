"""Benchmarks behind ``steerdiff bench ...``: tables of numbers against exact answers, not timed tests.

* :mod:`steerdiff.bench.solvers` -- solver accuracy at fixed NFE on the exact Gaussian-mixture
  model, beside diffusers' schedulers, and per-step sampler overhead.
"""
