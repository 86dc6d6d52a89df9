"""Particles: weighted particle systems over stochastic solvers (sequential Monte Carlo).

* :mod:`~steerdiff.smc.resample` -- resamplers ``(log_w, generator) -> indices`` and ESS.
* :mod:`~steerdiff.smc.particles` -- :class:`Particles`, :class:`Trace` and the engine
  :func:`run_smc` with its hooks (:class:`SMCAlgorithm`, :class:`StepContext`).
* :func:`fk_steering` -- Feynman-Kac steering (Singhal et al. 2025).
* :func:`best_of_n`, :func:`code` -- best-of-N and blockwise best-of-N (CoDe, Singh et al. 2025).
"""

from . import resample
from .best_of_n import BestOfN, CoDe, best_of_n, code
from .fk_steering import POTENTIALS, FKSteering, fk_steering
from .particles import (
    Particles,
    SMCAlgorithm,
    StepContext,
    Trace,
    run_smc,
    stochastic_solvers,
    transition_log_prob,
)
from .resample import ess, multinomial, residual, stratified, systematic

__all__ = [
    "POTENTIALS",
    "BestOfN",
    "CoDe",
    "FKSteering",
    "Particles",
    "SMCAlgorithm",
    "StepContext",
    "Trace",
    "best_of_n",
    "code",
    "ess",
    "fk_steering",
    "multinomial",
    "resample",
    "residual",
    "run_smc",
    "stochastic_solvers",
    "stratified",
    "systematic",
    "transition_log_prob",
]
