"""Benchmarks behind ``steerdiff bench ...``: tables of numbers against exact answers, not timed tests.

* :mod:`steerdiff.bench.solvers` -- solver accuracy at fixed NFE on the exact Gaussian-mixture
  model, beside diffusers' schedulers, and per-step sampler overhead.
* :mod:`steerdiff.bench.sde` -- stochastic samplers' sliced W2 to the exact distribution.
* :mod:`steerdiff.bench.posterior` -- inverse-problem guidance against exact posteriors.
* :mod:`steerdiff.bench.steer` -- particle steering against exact tilted targets and posteriors.
* :mod:`steerdiff.bench.discrete` -- masked diffusion samplers and guidance: total variation to the
  exact law of a small categorical mixture.
"""
