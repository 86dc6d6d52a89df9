"""Particles: weighted particle systems over stochastic solvers (sequential Monte Carlo).

* :mod:`~steerdiff.smc.resample` -- resamplers ``(log_w, generator) -> indices`` and ESS.
* :mod:`~steerdiff.smc.particles` -- :class:`Particles`, :class:`Trace` and the engine
  :func:`run_smc` with its hooks (:class:`SMCAlgorithm`, :class:`StepContext`).
* :func:`fk_steering` -- Feynman-Kac steering (Singhal et al. 2025).
* :func:`afdps` -- the approximation-free diffusion posterior sampler for ``y = A x + s n``: the posterior's
  PDE along the diffusion, simulated with weighted particles (Chen et al. 2025).
* :func:`fkc_anneal`, :func:`fkc_product`, :func:`fkc_cfg`, :func:`fkc` -- Feynman-Kac correctors
  (Skreta et al. 2025).
* :func:`driftlite` -- DriftLite's variance- / energy-controlling drift over the correctors (Ren et al.
  2025).
* :func:`best_of_n`, :func:`code` -- best-of-N and blockwise best-of-N (CoDe, Singh et al. 2025).
* :func:`tds` -- the twisted diffusion sampler (Wu et al. 2023).
* :func:`svdd` -- soft value-based decoding (Li et al. 2024).
* :func:`dts` -- Diffusion Tree Sampling and, with ``greedy=True``, Diffusion Tree Search (Jain et al. 2025);
  :class:`TreeSamples` its result.
* :func:`rbf` -- Rollover Budget Forcing, a search under a total NFE budget (Kim et al. 2025);
  :class:`RolloverSamples` its result.
* :func:`psi_sampler` -- FK steering from pCNL draws of the reward-twisted prior (Ψ-Sampler, Yoon et al.
  2025); :func:`twisted_prior` draws those initial particles.
"""

from . import resample
from .afdps import AFDPS, afdps
from .best_of_n import BestOfN, CoDe, best_of_n, code
from .driftlite import DriftLite, driftlite
from .dts import TreeSamples, dts
from .fk_correctors import Composition, FKCorrector, FKCStepLimit, fkc, fkc_anneal, fkc_cfg, fkc_product
from .fk_steering import POTENTIALS, FKSteering, fk_steering
from .particles import (
    Particles,
    RowSlice,
    SMCAlgorithm,
    StepContext,
    Trace,
    run_smc,
    stochastic_solvers,
    transition_log_prob,
)
from .psi_sampler import PsiSampler, psi_sampler, twisted_prior
from .rbf import RolloverSamples, rbf
from .resample import ess, multinomial, residual, stratified, systematic
from .svdd import SVDD, svdd
from .tds import TDS, Twist, tds

__all__ = [
    "AFDPS",
    "POTENTIALS",
    "SVDD",
    "TDS",
    "BestOfN",
    "CoDe",
    "Composition",
    "DriftLite",
    "FKCStepLimit",
    "FKCorrector",
    "FKSteering",
    "Particles",
    "PsiSampler",
    "RolloverSamples",
    "RowSlice",
    "SMCAlgorithm",
    "StepContext",
    "Trace",
    "TreeSamples",
    "Twist",
    "afdps",
    "best_of_n",
    "code",
    "driftlite",
    "dts",
    "ess",
    "fk_steering",
    "fkc",
    "fkc_anneal",
    "fkc_cfg",
    "fkc_product",
    "multinomial",
    "psi_sampler",
    "rbf",
    "resample",
    "residual",
    "run_smc",
    "stochastic_solvers",
    "stratified",
    "svdd",
    "systematic",
    "tds",
    "transition_log_prob",
    "twisted_prior",
]
