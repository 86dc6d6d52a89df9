"""Exact oracles and embedded default models."""

from . import digits
from .gmm import GaussianMixture, default_benchmark_mixture

__all__ = ["GaussianMixture", "default_benchmark_mixture", "digits"]
