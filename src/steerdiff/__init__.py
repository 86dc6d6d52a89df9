"""steerdiff: fast and steerable sampling of pretrained diffusion and flow models.

>>> import steerdiff as sd
>>> proc = sd.VP.discrete(betas=betas)
>>> den = sd.Denoiser(net, proc, prediction="eps")
>>> x0 = sd.sample(den, x_T, steps=10, solver="dpmpp_2m", schedule="karras")
"""

from . import (
    ddpm_inversion,
    discrete,
    distributed,
    eta_inversion,
    guidance,
    inverse,
    mcmc,
    metrics,
    noise,
    processes,
    rf_inversion,
    schedules,
    smc,
    solvers,
    toy,
)
from .adjoint import AdjointInfo, adjoint
from .ddpm_inversion import EditNoise, ddpm_invert
from .denoiser import ConsistencyModelDenoiser, Denoiser, EDMDenoiser, Prediction
from .eta_inversion import EtaNoise, eta_invert
from .inversion import invert
from .paradigms import ParadigmsInfo, paradigms
from .processes import EDM, VE, VP, MeanReverting, Process, RectifiedFlow, SubVP
from .reprocessed import Reprocessed
from .sampling import SampleInfo, sample
from .solvers.base import NonFiniteError

__all__ = [
    "EDM",
    "VE",
    "VP",
    "AdjointInfo",
    "ConsistencyModelDenoiser",
    "Denoiser",
    "EDMDenoiser",
    "EditNoise",
    "EtaNoise",
    "MeanReverting",
    "NonFiniteError",
    "ParadigmsInfo",
    "Prediction",
    "Process",
    "RectifiedFlow",
    "Reprocessed",
    "SampleInfo",
    "SubVP",
    "adjoint",
    "ddpm_inversion",
    "ddpm_invert",
    "discrete",
    "distributed",
    "eta_inversion",
    "eta_invert",
    "guidance",
    "inverse",
    "invert",
    "mcmc",
    "metrics",
    "noise",
    "paradigms",
    "processes",
    "rf_inversion",
    "sample",
    "schedules",
    "smc",
    "solvers",
    "toy",
]

__version__ = "0.1.0"
