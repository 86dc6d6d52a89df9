"""Exact answers of guided ODEs on the Gaussian-mixture oracle, by scipy's DOP853 (rtol = atol = 1e-11), for
the benchmarks and tests that measure solvers across a jump of the field (``bench/breaks.py``,
``bench/rf_default.py``, ``tests/test_guidance_cfg.py``, ``tests/test_rf_inversion.py``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ..denoiser import Denoiser
from ..processes import Process
from ..toy.gmm import GaussianMixture

__all__ = ["controlled_ode", "piecewise_ode"]


def piecewise_ode(
    pieces: Callable[[float], Denoiser],
    process: Process,
    x: Tensor,
    t_from: float,
    t_to: float,
    cuts: Sequence[float],
) -> Tensor:
    """The probability-flow ODE from ``x`` at ``t_from`` to ``t_to`` (down or up), in the DDIM variables
    ``xbar = x / alpha``, ``s = sigma / alpha`` (``dxbar/ds = eps``), piece by piece between the ``cuts``
    strictly inside: on each piece the field of ``pieces(t_mid)``, a denoiser that does not jump inside it."""
    inside = [b for b in cuts if min(t_from, t_to) < b < max(t_from, t_to)]
    nodes = [t_from, *sorted(inside, reverse=t_from > t_to), t_to]
    z = x / float(process.alpha(t_from))
    for a, b in itertools.pairwise(nodes):
        field = pieces(0.5 * (a + b))

        def f(s: float, zz: np.ndarray, field: Denoiser = field) -> np.ndarray:
            t = float(process.t_of_lam(-math.log(s)))
            xs = torch.from_numpy(zz).reshape(x.shape) * float(process.alpha(t))
            return field(xs, t).eps.reshape(-1).numpy()

        ratio = [float(process.sigma(v) / process.alpha(v)) for v in (a, b)]
        sol = solve_ivp(f, ratio, z.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
        z = torch.from_numpy(sol.y[:, -1]).reshape(x.shape)
    return z * float(process.alpha(t_to))


def controlled_ode(
    gmm: GaussianMixture, x: Tensor, y: Tensor, w: float, t_from: float, t_to: float, toward_noise: bool
) -> Tensor:
    """RF-Inversion's controlled ODE (Rout et al. 2025) under rectified flow from ``x`` at ``t_from`` to
    ``t_to`` with the oracle's exact velocity ``u = eps - x0 = (x - x0) / t``: ``dx/dt = u + w ((y - x) / (1 -
    t) - u)`` towards the noise ``y`` (Eq. 8), ``u + w ((x - y) / t - u)`` towards the image ``y`` (Eq. 15),
    ``w`` constant over the interval."""

    def f(t: float, z: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(z).reshape(x.shape)
        u = (xs - gmm.denoise(xs, 1 - t, t)) / t
        pull = (y - xs) / (1 - t) if toward_noise else (xs - y) / t
        return (u + w * (pull - u)).reshape(-1).numpy()

    sol = solve_ivp(f, (t_from, t_to), x.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
    return torch.from_numpy(sol.y[:, -1]).reshape(x.shape)
