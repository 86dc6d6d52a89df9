"""Discrete diffusion, masked (absorbing-state) or uniform-noise: the processes, the denoiser contract and
the samplers.

>>> import steerdiff as sd
>>> proc = sd.discrete.MaskedProcess(vocab_size=V, schedule="linear")   # mask id V
>>> den = sd.discrete.MaskedDenoiser(net, proc)                         # net(x_t, t) -> logits (B, L, V)
>>> x0 = sd.discrete.sample(den, (batch, L), steps=64, sampler="ancestral", generator=g)
>>> x0 = sd.discrete.sample(den, (batch, L), 64, sd.discrete.Confidence("margin", 0.0))  # LLaDA-style
>>> guided = sd.discrete.CFG(den, den, 3.0, uncond_kwargs={"y": null})  # a denoiser: every sampler
>>> x0 = sd.discrete.sample(guided, (batch, L), sampler="first_hitting", y=labels)
>>> out = sd.discrete.fk_steering(den, reward, lam, shape=(batch, L), particles=16, steps=64)  # Particles
>>> out = sd.discrete.svdd(den, reward, alpha, shape=(batch, L), particles=8, steps=64)  # Particles
>>> uproc = sd.discrete.UniformProcess(vocab_size=V, schedule="linear")  # uniform noise, no mask
>>> uden = sd.discrete.UniformDenoiser(net, uproc)                     # net(x_t, t) -> logits of x_0
>>> x0 = sd.discrete.sample(uden, (batch, L), steps=64, generator=g)  # D3PM / SEDD ancestral steps
>>> x = sd.discrete.sgdd(uden, log_likelihood, shape=(batch, L), iterations=50)  # posterior p(x) exp(l(x))

The exact oracle is :class:`steerdiff.toy.CategoricalMixture`.
"""

from .ancestral import Ancestral
from .base import Model, Sampler
from .categorical import draw
from .cfg import CFG
from .classifier import ClassifierGuidance
from .confidence import SCORES, Confidence
from .denoiser import MaskedDenoiser, TokenDenoiser, UniformDenoiser, check_tokens
from .first_hitting import FirstHitting
from .guided import Guided
from .process import SCHEDULES, MaskedProcess, Schedule, UniformProcess
from .remdm import ReMDM
from .sampling import SampleInfo, available, get, sample
from .sgdd import SGDDInfo, sgdd
from .steering import best_of_n, fk_steering
from .svdd import svdd

__all__ = [
    "CFG",
    "SCHEDULES",
    "SCORES",
    "Ancestral",
    "ClassifierGuidance",
    "Confidence",
    "FirstHitting",
    "Guided",
    "MaskedDenoiser",
    "MaskedProcess",
    "Model",
    "ReMDM",
    "SGDDInfo",
    "SampleInfo",
    "Sampler",
    "Schedule",
    "TokenDenoiser",
    "UniformDenoiser",
    "UniformProcess",
    "available",
    "best_of_n",
    "check_tokens",
    "draw",
    "fk_steering",
    "get",
    "sample",
    "sgdd",
    "svdd",
]
