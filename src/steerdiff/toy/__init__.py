"""Exact oracles and embedded default models."""

from .gmm import GaussianMixture, default_benchmark_mixture

__all__ = ["GaussianMixture", "default_benchmark_mixture"]
