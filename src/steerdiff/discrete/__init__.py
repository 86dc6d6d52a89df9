"""Discrete (masked, absorbing-state) diffusion: the process, the denoiser contract and its samplers.

>>> import steerdiff as sd
>>> proc = sd.discrete.MaskedProcess(vocab_size=V, schedule="linear")   # mask id V
>>> den = sd.discrete.MaskedDenoiser(net, proc)                         # net(x_t, t) -> logits (B, L, V)
>>> x0 = sd.discrete.sample(den, (batch, L), steps=64, sampler="ancestral", generator=g)

The exact oracle is :class:`steerdiff.toy.CategoricalMixture`.
"""

from .ancestral import Ancestral
from .base import Model, Sampler
from .categorical import draw
from .denoiser import MaskedDenoiser, check_tokens
from .first_hitting import FirstHitting
from .process import SCHEDULES, MaskedProcess
from .remdm import ReMDM
from .sampling import SampleInfo, available, get, sample

__all__ = [
    "SCHEDULES",
    "Ancestral",
    "FirstHitting",
    "MaskedDenoiser",
    "MaskedProcess",
    "Model",
    "ReMDM",
    "SampleInfo",
    "Sampler",
    "available",
    "check_tokens",
    "draw",
    "get",
    "sample",
]
