"""Exact oracles and embedded default models."""

from . import digits
from .categorical import CategoricalMixture
from .gmm import GaussianMixture, default_benchmark_mixture

__all__ = ["CategoricalMixture", "GaussianMixture", "default_benchmark_mixture", "digits"]
