"""Langevin/MALA/HMC correctors at a fixed noise level, on any differentiable log-density.

>>> x, info = sd.mcmc.MALA(step_size=0.05).run(x, log_prob, steps=100, generator=g)
>>> info.acceptance_rate
>>> sd.sample(den, x_T, steps=10, solver="ddim", corrector="ula", corrector_steps=1, snr=0.16)

:mod:`~steerdiff.mcmc.langevin` (ULA, MALA), :mod:`~steerdiff.mcmc.hmc` (HMC),
:mod:`~steerdiff.mcmc.pcnl` (pCNL, for a Gaussian reference times a likelihood),
:mod:`~steerdiff.mcmc.lanpaint` (LanPaint's moves for inpainting), :mod:`~steerdiff.mcmc.walk_jump`
(walk-jump sampling with accumulated measurements, a sampler of its own),
:mod:`~steerdiff.mcmc.denoising` (Denoising MCMC: a Gibbs chain over data and noise level, each state
denoised from its level),
:mod:`~steerdiff.mcmc.monte_carlo` (a denoiser of an unnormalized density by Monte Carlo, Reverse
Diffusion Monte Carlo), the shared state
and loop in :mod:`~steerdiff.mcmc.base`, the predictor-corrector hook of :func:`steerdiff.sample`
in :mod:`~steerdiff.mcmc.corrector`.
"""

from .base import ChainInfo, Kernel, Point, Target, chain, snr_step_size
from .corrector import available, check_corrector, correct, get
from .denoising import DenoisingMCMC, denoising_mcmc
from .hmc import HMC
from .langevin import MALA, ULA
from .lanpaint import BiGLangevin, Projected
from .monte_carlo import MonteCarloDenoiser
from .pcnl import PCNL
from .walk_jump import WalkJump, measurement_time, walk_jump, walk_jump_score

__all__ = [
    "HMC",
    "MALA",
    "PCNL",
    "ULA",
    "BiGLangevin",
    "ChainInfo",
    "DenoisingMCMC",
    "Kernel",
    "MonteCarloDenoiser",
    "Point",
    "Projected",
    "Target",
    "WalkJump",
    "available",
    "chain",
    "check_corrector",
    "correct",
    "denoising_mcmc",
    "get",
    "measurement_time",
    "snr_step_size",
    "walk_jump",
    "walk_jump_score",
]
