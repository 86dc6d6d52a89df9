"""Guidance: denoisers that wrap a denoiser and steer it (every solver works with every guidance)."""

from .base import Guided, add_score, denoise_with_grad, require_grad

__all__ = ["Guided", "add_score", "denoise_with_grad", "require_grad"]
