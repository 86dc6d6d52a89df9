"""Linear measurement operators for inverse problems: ``y = A x + noise_std * n``."""

from .operators import Blur, Downsample, Inpaint, LinearOperator, Matrix, cutoff

__all__ = ["Blur", "Downsample", "Inpaint", "LinearOperator", "Matrix", "cutoff"]
