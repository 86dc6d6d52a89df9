"""Linear measurement operators for inverse problems: ``y = A x + noise_std * n``."""

from .operators import RCOND, Blur, Downsample, Inpaint, LinearOperator, Matrix

__all__ = ["RCOND", "Blur", "Downsample", "Inpaint", "LinearOperator", "Matrix"]
