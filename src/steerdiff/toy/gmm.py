r"""Gaussian mixtures: data whose denoiser, density and probability-flow ODE are known exactly.

For ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` and ``x_t = alpha x0 + sigma eps`` the noised marginal
is ``sum_k w_k N(alpha mu_k, diag(alpha^2 v_k + sigma^2))`` and, with responsibilities
``r_k(x_t)`` under it, Tweedie's formula gives the exact denoiser

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha v_k / (alpha^2 v_k + sigma^2) (x_t - alpha mu_k)).

The reference solution of the probability-flow ODE is integrated with scipy's DOP853 in
k-diffusion's variables ``y = x/alpha``, ``s = sigma/alpha``, where ``dy/ds = eps(y, s)`` is
smooth down to ``s = 0``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ..denoiser import Denoiser
from ..processes import MeanReverting, Process

__all__ = ["GaussianMixture", "default_benchmark_mixture"]

F64 = torch.float64


class GaussianMixture:
    """A mixture of diagonal Gaussians in ``d`` dimensions.

    Args:
        means: ``(k, d)``.
        variances: ``(k, d)`` per-coordinate variances (diagonal covariances), all > 0.
        weights: ``(k,)`` positive, normalized here.
    """

    def __init__(self, means: Tensor, variances: Tensor, weights: Tensor) -> None:
        self.means = torch.as_tensor(means, dtype=F64)
        self.variances = torch.as_tensor(variances, dtype=F64)
        w = torch.as_tensor(weights, dtype=F64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (k, d), got {tuple(self.means.shape)}")
        if self.variances.shape != self.means.shape:
            raise ValueError(
                f"variances must be (k, d) = {tuple(self.means.shape)}, got {tuple(self.variances.shape)}"
            )
        if w.shape != (self.means.shape[0],) or not bool((w > 0).all()):
            raise ValueError(f"weights must be ({self.means.shape[0]},) and positive")
        if not bool((self.variances > 0).all()):
            raise ValueError("variances must be > 0")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` of shape ``(n, *sample_shape)``, ``prod(sample_shape) = d``, as float64 ``(n, d)`` on CPU."""
        x = torch.as_tensor(x)
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"{name} must be (batch, ...) with {self.dim} values per sample, got {tuple(x.shape)}"
            )
        return x.to(device="cpu", dtype=F64).reshape(x.shape[0], self.dim)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws, float64 ``(n, d)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        return self.means[k] + self.variances[k].sqrt() * z

    def _marginal(self, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        return alpha * self.means, alpha**2 * self.variances + sigma**2

    def _log_resp(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``log w_k + log N(x; mean_k, var_k)``, shape ``(n, k)``."""
        prec = 1 / var  # (k, d); the quadratic form expanded into matrix products
        quad = (x * x) @ prec.T - 2 * x @ (mean * prec).T + (mean * mean * prec).sum(-1)
        ll = -0.5 * (quad + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return ll + self.weights.log()

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """Log density of ``x`` under the noised marginal at ``(alpha, sigma)`` (clean by default)."""
        x = self._flat(x)
        mean, var = self._marginal(alpha, sigma)
        return torch.logsumexp(self._log_resp(x, mean, var), dim=-1)

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact ``E[x0 | x_t = x]``; computed in float64 on CPU, returned in ``x``'s dtype and device."""
        xd = self._flat(x)
        mean, var = self._marginal(alpha, sigma)
        lr = self._log_resp(xd, mean, var)
        # responsibilities (n, k); not torch.softmax, whose CPU kernel always goes parallel and stalls
        # for milliseconds per call on a busy machine
        r = torch.exp(lr - torch.logsumexp(lr, dim=-1, keepdim=True))
        gain = alpha * self.variances / var  # (k, d): E[x0 | x, k] = means_k + gain_k (x - mean_k)
        out = r @ (self.means - gain * mean) + xd * (r @ gain)
        return out.to(device=x.device, dtype=x.dtype).reshape(x.shape)

    def denoiser(self, process: Process) -> Denoiser:
        """The exact ``x0``-predicting :class:`Denoiser` under ``process`` (net time = process time)."""

        def net(x: Tensor, t: Tensor) -> Tensor:
            tt = float(t.reshape(-1)[0])
            return self.denoise(x, float(process.alpha(tt)), float(process.sigma(tt)))

        return Denoiser(net, process, prediction="x0", shape=(self.dim,))

    def shifted(self, shift: Tensor) -> GaussianMixture:
        """The law of ``x0 + shift`` (``shift``: ``(d,)``): means moved, variances and weights kept."""
        shift = torch.as_tensor(shift, dtype=F64).reshape(-1)
        if shift.shape != (self.dim,):
            raise ValueError(f"shift must have {self.dim} values, got {tuple(shift.shape)}")
        return GaussianMixture(self.means + shift, self.variances, self.weights)

    def mean_reverting_marginal(self, process: MeanReverting, mu: Tensor, t: float) -> GaussianMixture:
        """Exact ``p(x_t | mu)`` of mean-reverting diffusion (IR-SDE) from ``x0`` of this law: the
        mixture with means ``alpha m_k + (1 - alpha) mu`` and variances ``alpha^2 v_k + sigma^2``
        (``alpha = e^{-thetabar_t}``, ``sigma^2 = lambda^2 (1 - alpha^2)``)."""
        a, s = float(process.alpha(t)), float(process.sigma(t))
        mu = torch.as_tensor(mu, dtype=F64).reshape(-1)
        return GaussianMixture(a * self.means + (1 - a) * mu, a * a * self.variances + s * s, self.weights)

    def mean_reverting_denoiser(self, process: MeanReverting, mu: Tensor) -> Denoiser:
        """The exact denoiser of mean-reverting diffusion towards ``mu`` (``(d,)``), built the way a
        user builds one, :meth:`MeanReverting.denoiser` around an ``x0``-predicting net that sees
        ``x`` and ``mu``: ``E[x0 | x_t, mu] = mu + E[y0 | y_t]`` with ``y0 ~`` :meth:`shifted` ``(-mu)``."""
        mu = torch.as_tensor(mu, dtype=F64).reshape(-1)
        ys = self.shifted(-mu)

        def net(x: Tensor, t: Tensor, mu: Tensor) -> Tensor:
            tt = float(t.reshape(-1)[0])
            y0 = ys.denoise(x - mu.to(x), float(process.alpha(tt)), float(process.sigma(tt)))
            return y0 + mu.to(x)

        return process.denoiser(net, mu, prediction="x0", shape=(self.dim,))

    def reference_ode(
        self,
        x_T: Tensor,
        process: Process,
        t_start: float,
        t_end: float | None = None,
        denoise: bool = False,
        rtol: float = 1e-10,
        atol: float = 1e-10,
    ) -> Tensor:
        """Probability-flow ODE solution from ``x_T`` at ``t_start`` to ``t_end``.

        ``t_end=None`` integrates to the clean state ``sigma = 0``. With ``denoise=True`` the exact
        denoiser is applied at ``t_end``: ``reference_ode(x_T, p, p.t_max, p.t_min, denoise=True)``
        is the exact answer :func:`steerdiff.sample` approximates by default (solve to ``t_min``,
        return the denoised estimate there). DOP853 at ``rtol=1e-10``; float64, ``x_T``'s shape.
        """
        a0, s0 = float(process.alpha(t_start)), float(process.sigma(t_start))
        if t_end is None:
            a1, s1 = 1.0, 0.0
        else:
            a1, s1 = float(process.alpha(t_end)), float(process.sigma(t_end))
        shape = x_T.shape
        y0 = (self._flat(x_T, "x_T").reshape(-1) / a0).numpy()
        n = shape[0]

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            yt = torch.from_numpy(y).reshape(n, self.dim)
            # in (y, s): alpha = 1/sqrt(1+s^2) is irrelevant -- use the equivalent EDM pair (1, s)
            d = self.denoise(yt, 1.0, s)
            if s == 0:  # eps = (y - D(y, s)) / s -> 0 as s -> 0 for positive variances
                return np.zeros_like(y)
            return ((yt - d) / s).reshape(-1).numpy()

        sol = solve_ivp(rhs, (s0 / a0, s1 / a1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE failed: {sol.message}")
        x = (torch.from_numpy(sol.y[:, -1]).reshape(shape) * a1).to(F64)
        return self.denoise(x, a1, s1) if denoise and s1 > 0 else x


def default_benchmark_mixture(dim: int = 64, components: int = 10, seed: int = 0) -> GaussianMixture:
    """The embedded default: a ``dim``-dimensional, ``components``-component diagonal mixture.

    Means ~ N(0, I), per-coordinate standard deviations log-uniform in [0.05, 0.5], Dirichlet(2)
    weights; fixed by ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    log_std = math.log(0.05) + (math.log(0.5) - math.log(0.05)) * torch.rand(
        components, dim, generator=g, dtype=F64
    )
    w = -torch.log(torch.rand(components, generator=g, dtype=F64)) - torch.log(
        torch.rand(components, generator=g, dtype=F64)
    )  # Gamma(2, 1) as a sum of two exponentials: Dirichlet(2) after normalization
    return GaussianMixture(means, (2 * log_std).exp(), w)
