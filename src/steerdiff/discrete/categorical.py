r"""Categorical draws in float64, by the Gumbel-max trick.

``argmax_v (log p_v + g_v)`` with ``g_v = -log(-log u_v)``, ``u_v`` uniform, is a draw from ``p``. The
uniforms and the arithmetic are float64: with float32 Gumbel noise the largest ``g`` is capped (``u`` has
24 bits), which truncates the tail of ``p`` and lowers the effective temperature over large
vocabularies (Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and
Exploit Inaccurate Categorical Sampling").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..noise import Draws, rand

__all__ = ["draw"]


def draw(log_p: Tensor, generator: Draws) -> Tensor:
    """One draw per row of ``log_p`` ``(batch, ..., V)`` (log-probabilities, ``-inf`` for impossible
    values) from its last axis, as int64 ``(batch, ...)``; the uniforms come from ``generator`` as
    :func:`steerdiff.noise.rand` draws them (row ``b`` from ``generator[b]`` where a list)."""
    u = rand(log_p.shape, generator, torch.float64, log_p.device)
    return torch.argmax(log_p.to(torch.float64) - torch.log(-torch.log(u)), dim=-1)
