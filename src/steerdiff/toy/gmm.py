r"""Gaussian mixtures: data whose denoiser, density and probability-flow ODE are known exactly.

For ``x0 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha x0 + sigma eps`` the noised marginal is
``sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)`` and, with responsibilities ``r_k(x_t)``
under it, Tweedie's formula gives the exact denoiser

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^{-1} (x_t - alpha mu_k)).

``S_k`` is diagonal (``(k, d)`` variances; elementwise arithmetic and matrix products) or full
(``(k, d, d)``; each ``S_k = U_k diag(lam_k) U_k^T`` is eigendecomposed once, so every noise level
is diagonal in the basis ``U_k``: ``alpha^2 S_k + sigma^2 I = U_k diag(alpha^2 lam_k + sigma^2) U_k^T``).

Closed-form operations that stay in the family (Bishop, *Pattern Recognition and Machine
Learning*, 2006, sec. 2.3.3): :meth:`GaussianMixture.posterior` conditions on a linear-Gaussian
observation ``y = A x0 + s n``, :meth:`GaussianMixture.tilt` multiplies by ``exp(b^T x - x^T Q x / 2)``,
:meth:`GaussianMixture.product` joins two independent mixtures.

The reference solution of the probability-flow ODE is integrated with scipy's DOP853 in
k-diffusion's variables ``y = x/alpha``, ``s = sigma/alpha``, where ``dy/ds = eps(y, s)`` is
smooth down to ``s = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .._checks import Bounds, boolean, integer, real, real_array, sizes, tensor
from ..denoiser import Denoiser
from ..processes import MeanReverting, Process

__all__ = ["GaussianMixture", "default_benchmark_mixture"]

F64 = torch.float64


class GaussianMixture:
    """A mixture of Gaussians in ``d`` dimensions, diagonal or full covariances.

    Args:
        means: ``(k, d)``, finite.
        covariances: ``(k, d)`` per-coordinate variances (diagonal covariances, finite, all > 0) or
            ``(k, d, d)`` symmetric positive definite matrices.
        weights: ``(k,)`` finite and positive, normalized here.
        allow_singular: accept positive *semi*-definite full covariances (eigenvalues down to
            ``-1e-10 lam_max``; those below ``1e-12 lam_max`` set to 0), as :meth:`posterior` with
            ``noise_std = 0`` returns; such a mixture has no density at ``sigma = 0``
            (``log_prob`` and ``denoise`` raise there).

    Attributes: ``means``, ``covariances`` (as given, float64, symmetrized), ``variances``
    (``(k, d)`` per-coordinate variances, the diagonals), ``weights``, ``full`` (bool).
    """

    def __init__(
        self, means: Tensor, covariances: Tensor, weights: Tensor, *, allow_singular: bool = False
    ) -> None:
        self.means = tensor("GaussianMixture", "means", means, F64)
        cov = tensor("GaussianMixture", "covariances", covariances, F64)
        w = tensor("GaussianMixture", "weights", weights, F64)
        if self.means.ndim != 2:
            raise ValueError(f"GaussianMixture: means must be (k, d), got {tuple(self.means.shape)}")
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError("GaussianMixture: means must be finite")
        k, d = self.means.shape
        if cov.shape not in ((k, d), (k, d, d)):
            raise ValueError(
                f"GaussianMixture: covariances must be (k, d) = {(k, d)} variances or (k, d, d) = "
                f"{(k, d, d)} matrices, got {tuple(cov.shape)}"
            )
        if w.shape != (k,) or not bool(((w > 0) & torch.isfinite(w)).all()):
            raise ValueError(f"GaussianMixture: weights must be ({k},), finite and positive")
        self.full = cov.ndim == 3
        self._singular = boolean("GaussianMixture", "allow_singular", allow_singular) and self.full
        if self.full:
            scale = cov.abs().amax(dim=(-2, -1)).clamp_min(1e-300)
            asym = (cov - cov.mT).abs().amax(dim=(-2, -1)) / scale
            if not bool(torch.isfinite(cov).all()) or float(asym.max()) > 1e-10:
                raise ValueError("GaussianMixture: covariances must be finite and symmetric")
            cov = 0.5 * (cov + cov.mT)
            lam, self._basis = torch.linalg.eigh(cov)  # S_k = U_k diag(lam_k) U_k^T
            ok = (lam >= -1e-10 * lam[:, -1:].clamp_min(0)) if allow_singular else (lam > 0)
            if not bool(ok.all()):
                raise ValueError(
                    "GaussianMixture: covariances must be positive definite (pass allow_singular=True for "
                    "semi-definite), "
                    f"smallest eigenvalue {float(lam.min()):.3g}"
                )
            if allow_singular:  # round-off eigenvalues of a semi-definite matrix are exact zeros
                lam = torch.where(lam > 1e-12 * lam[:, -1:], lam, torch.zeros_like(lam))
            self._eig = lam
            self._root = (self._basis * lam.sqrt()[:, None, :]) @ self._basis.mT  # symmetric S_k^{1/2}
            self.variances = torch.diagonal(cov, dim1=-2, dim2=-1).clone()
        else:
            if not bool(((cov > 0) & torch.isfinite(cov)).all()):
                raise ValueError("GaussianMixture: covariances (variances) must be finite and > 0")
            self.variances = cov
        self.covariances = cov
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        """The dimension ``d`` of a sample."""
        return self.means.shape[1]

    @property
    def covariance_matrices(self) -> Tensor:
        """``(k, d, d)`` covariance matrices (``diag(variances)`` for a diagonal mixture)."""
        return self.covariances if self.full else torch.diag_embed(self.variances)

    def _flat(self, x: Tensor, who: str, name: str = "x") -> Tensor:
        """``x`` of shape ``(n, *sample_shape)``, ``prod(sample_shape) = d``, as float64 ``(n, d)`` on CPU;
        else a ``ValueError`` naming ``who`` (the public method) and ``name``."""
        x = tensor(who, name, x)
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"{who}: {name} must be (batch, ...) with {self.dim} values per sample, got {tuple(x.shape)}"
            )
        return x.to(device="cpu", dtype=F64).reshape(x.shape[0], self.dim)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws, float64 ``(n, d)``: ``mu_k + S_k^{1/2} z`` (symmetric square root)."""
        n = integer(f"{type(self).__name__}.sample", "n", n, lo=1)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        if self.full:  # component by component: O(n d) memory, not a (n, d, d) gather of the roots
            out = self.means[k]
            for j in torch.unique(k).tolist():
                rows = k == j
                out[rows] += z[rows] @ self._root[j].mT
            return out
        return self.means[k] + self.variances[k].sqrt() * z

    def _noised(self, x: Tensor, alpha: float, sigma: float, who: str) -> tuple[Tensor, Tensor, Tensor]:
        """Full path at one noise level: ``log w_k + log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I)``
        ``(n, k)``, the eigenbasis coordinates ``z = U_k^T (x - alpha mu_k)`` ``(n, k, d)`` and the
        eigenvalues ``alpha^2 lam_k + sigma^2`` ``(k, d)``."""
        var = alpha**2 * self._eig + sigma**2
        if not bool((var > 0).all()):
            raise ValueError(f"{who}: singular covariances have no density at sigma = 0; use sigma > 0")
        z = torch.einsum("nd,kde->nke", x, self._basis) - alpha * torch.einsum(
            "kd,kde->ke", self.means, self._basis
        )
        quad = (z * z / var).sum(-1)
        ll = -0.5 * (quad + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return ll + self.weights.log(), z, var

    def _marginal(self, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        return alpha * self.means, alpha**2 * self.variances + sigma**2

    def _log_resp(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """Diagonal path: ``log w_k + log N(x; mean_k, var_k)``, shape ``(n, k)``."""
        prec = 1 / var  # (k, d); the quadratic form expanded into matrix products
        big = (x * x) @ prec.T + (mean * mean * prec).sum(-1)
        quad = big - 2 * x @ (mean * prec).T
        # the expansion cancels to the round-off of ``big`` where x lies near a mean far from the origin in
        # its standard deviations (|mu| / std = 1e8: log-density off by 4); those pairs are summed directly
        i, j = (big > 1e4 * (quad.abs() + 1)).nonzero(as_tuple=True)
        if len(i):
            quad = quad.index_put((i, j), ((x[i] - mean[j]) ** 2 * prec[j]).sum(-1))
        ll = -0.5 * (quad + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return ll + self.weights.log()

    def _log_joint(self, x: Tensor, alpha: float, sigma: float, who: str) -> Tensor:
        """``log w_k + log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I)``, ``(n, k)``, for flat ``x``."""
        if self.full:
            return self._noised(x, alpha, sigma, who)[0]
        mean, var = self._marginal(alpha, sigma)
        return self._log_resp(x, mean, var)

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """Log density ``(n,)`` of ``x`` under the noised marginal at ``(alpha, sigma)`` (clean by
        default); float64 on ``x``'s device."""
        who = f"{type(self).__name__}.log_prob"
        return torch.logsumexp(self._log_joint(self._flat(x, who), alpha, sigma, who), dim=-1).to(_device(x))

    def noise_level_logits(self, y: Tensor, sigmas: Tensor, log_prior: Tensor | None = None) -> Tensor:
        """The exact noise-level posterior's logits ``log pi_k + log q_k(y)``, ``(n, K)`` float64 on ``y``'s
        device: ``q_k`` the mixture noised in variance-exploding coordinates, ``y = x0 + s_k n`` (the
        ``log_prob`` at ``alpha = 1``, ``sigma = s_k``), for ``sigmas`` ``(K,)``, all ``> 0``, and a prior
        ``pi`` over them (``log_prior`` ``(K,)``, normalized here; default uniform). Its softmax is
        ``p(k | y)``, what a noise-level classifier learns (:func:`steerdiff.mcmc.denoising_mcmc`)."""
        who = f"{type(self).__name__}.noise_level_logits"
        levels = real_array(who, "sigmas", sigmas)
        if not bool((levels > 0).all()) or not bool(torch.isfinite(levels).all()):
            raise ValueError(f"{who}: sigmas must be finite and > 0, got {levels.tolist()}")
        if log_prior is None:
            prior = torch.full_like(levels, -math.log(levels.numel()))
        else:
            prior = self._vector(log_prior, levels.numel(), who, "log_prior")
            prior = prior - torch.logsumexp(prior, 0)
        flat = self._flat(y, who, "y")
        ll = [torch.logsumexp(self._log_joint(flat, 1.0, float(s), who), -1) for s in levels]
        return (torch.stack(ll, -1) + prior).to(_device(y))

    def log_responsibilities(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """``log p(k | x_t = x)`` ``(n, k)``, float64 on ``x``'s device: the posterior over components of
        the noised marginal at ``(alpha, sigma)`` (clean by default); its argmax is the component ``x``
        belongs to."""
        who = f"{type(self).__name__}.log_responsibilities"
        lj = self._log_joint(self._flat(x, who), alpha, sigma, who)
        return (lj - torch.logsumexp(lj, dim=-1, keepdim=True)).to(_device(x))

    def denoise(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact ``E[x0 | x_t = x]``; computed in float64 on CPU, returned in ``x``'s dtype and device."""
        who = f"{type(self).__name__}.denoise"
        x = tensor(who, "x", x)  # its dtype and device are the result's
        xd = self._flat(x, who)
        if self.full:
            lr, z, var = self._noised(xd, alpha, sigma, who)
        else:
            mean, var = self._marginal(alpha, sigma)
            lr = self._log_resp(xd, mean, var)
        # responsibilities (n, k); not torch.softmax, whose CPU kernel always goes parallel and stalls
        # for milliseconds per call on a busy machine
        r = torch.exp(lr - torch.logsumexp(lr, dim=-1, keepdim=True))
        if self.full:  # E[x0 | x, k] = mu_k + U_k diag(alpha lam_k / var_k) z_k
            corr = torch.einsum("nke,kde->nkd", r[:, :, None] * (alpha * self._eig / var) * z, self._basis)
            out = r @ self.means + corr.sum(1)
        else:
            gain = alpha * self.variances / var  # (k, d): E[x0 | x, k] = means_k + gain_k (x - mean_k)
            out = r @ (self.means - gain * mean) + xd * (r @ gain)
        return out.to(device=x.device, dtype=x.dtype).reshape(x.shape)

    def denoiser(self, process: Process, shape: Sequence[int] | None = None) -> Denoiser:
        """The exact ``x0``-predicting :class:`Denoiser` under ``process`` (net time = process time), on
        samples of ``shape`` (default ``(dim,)``; e.g. ``(1, 4, 4)`` for a 16-d mixture seen as images,
        for the image operators of :mod:`steerdiff.inverse`): the mixture lives on the flattened sample."""
        shape = (self.dim,) if shape is None else sizes("denoiser", "shape", shape)
        if math.prod(shape) != self.dim:
            raise ValueError(f"denoiser: shape {shape} does not hold the mixture's dim = {self.dim} entries")

        def net(x: Tensor, t: Tensor) -> Tensor:
            flat = x.reshape(x.shape[0], self.dim)
            x0 = _at_times(
                flat, t, lambda xs, u: self.denoise(xs, float(process.alpha(u)), float(process.sigma(u)))
            )
            return x0.reshape(x.shape)

        return Denoiser(net, process, prediction="x0", shape=shape)

    def _point(self, v: Tensor, who: str, name: str) -> Tensor:
        """``v``, ``d`` finite values in any shape (a ``(d,)`` vector, one ``(1, d)`` sample), as a float64
        ``(d,)`` vector, else a ``ValueError`` naming ``who`` and ``name``."""
        v = tensor(who, name, v, F64)
        if v.numel() != self.dim or not bool(torch.isfinite(v).all()):
            raise ValueError(f"{who}: {name} must have {self.dim} finite values, got shape {tuple(v.shape)}")
        return v.reshape(-1)

    def _vector(self, v: Tensor, size: int, who: str, name: str) -> Tensor:
        v = tensor(who, name, v, F64)
        if v.shape != (size,) or not bool(torch.isfinite(v).all()):
            raise ValueError(f"{who}: {name} must be a finite ({size},) vector, got shape {tuple(v.shape)}")
        return v

    def _matrix(self, m: Tensor, shape: tuple[int, int], who: str, name: str) -> Tensor:
        m = tensor(who, name, m, F64)
        if m.shape != shape or not bool(torch.isfinite(m).all()):
            raise ValueError(f"{who}: {name} must be a finite {shape} matrix, got shape {tuple(m.shape)}")
        return m

    def posterior(self, A: Tensor, y: Tensor, noise_std: float) -> GaussianMixture:
        """The exact law of ``x0`` given one observation ``y = A x0 + noise_std n``, ``n ~ N(0, I_m)``.

        ``A``: ``(m, d)``; ``y``: ``(m,)`` (a single observation, not a batch); ``noise_std >= 0``
        (0 needs every ``A S_k A^T`` nonsingular). Per component (Bishop 2006, eq. 2.81-2.82, 2.115),
        with ``C_k = A S_k A^T + s^2 I`` and gain ``K_k = S_k A^T C_k^{-1}``:
        ``mu_k' = mu_k + K_k (y - A mu_k)``, ``S_k' = S_k - K_k C_k K_k^T`` and weights
        ``w_k' ∝ w_k N(y; A mu_k, C_k)``. Returns a full-covariance mixture (semi-definite when
        ``noise_std = 0``: the posterior then lives on ``{A x = y}``).
        """
        who = f"{type(self).__name__}.posterior"
        A = tensor(who, "A", A, F64)
        if A.ndim != 2 or A.shape[1] != self.dim or not bool(torch.isfinite(A).all()):
            raise ValueError(f"{who}: A must be a finite (m, {self.dim}) matrix, got shape {tuple(A.shape)}")
        m = A.shape[0]
        y = self._vector(y, m, who, "y")
        noise_std = real(who, "noise_std", noise_std, lo=0)
        s_ax = self.covariance_matrices @ A.T  # (k, d, m) = S_k A^T
        c = A @ s_ax + noise_std**2 * torch.eye(m, dtype=F64)  # (k, m, m)
        chol, info = torch.linalg.cholesky_ex(0.5 * (c + c.mT))
        # singular to float64 precision: whether the factorization of an exactly singular C_k fails or
        # ends in a round-off pivot depends on the LAPACK build, so small pivots count as failures
        pivots = chol.diagonal(dim1=-2, dim2=-1) ** 2
        tiny = 64 * m * torch.finfo(F64).eps * c.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
        if bool((info > 0).any()) or bool((pivots <= tiny).any()):
            raise ValueError(
                f"{who}: A S_k A^T + noise_std^2 I is singular to float64 precision with noise_std = "
                f"{noise_std:g}: use a larger noise_std (noise_std = 0 needs every A S_k A^T nonsingular: "
                "A of full row rank, at most as many rows as columns)"
            )
        resid = y - self.means @ A.T  # (k, m)
        sol = torch.cholesky_solve(resid[:, :, None], chol)[:, :, 0]  # C_k^{-1} (y - A mu_k)
        logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        log_lik = -0.5 * ((resid * sol).sum(-1) + logdet + m * math.log(2 * math.pi))
        means = self.means + (s_ax @ sol[:, :, None])[:, :, 0]
        # Joseph form S_k' = (I - K_k A) S_k (I - K_k A)^T + s^2 K_k K_k^T (= S_k - K_k C_k K_k^T): PSD by
        # construction and accurate to relative round-off where S_k' << S_k (A of full column rank and
        # small s). The difference S_k - K_k C_k K_k^T cancels there: 1.4e-4 relative off at s = 1e-6 and
        # indefinite round-off at s = 0 (a point-mass posterior), which the constructor refused.
        gain = torch.cholesky_solve(s_ax.mT, chol).mT  # K_k = S_k A^T C_k^{-1}, (k, d, m)
        root = self._root if self.full else torch.diag_embed(self.variances.sqrt())
        left = (torch.eye(self.dim, dtype=F64) - gain @ A) @ root
        cov = left @ left.mT + noise_std**2 * gain @ gain.mT
        return _from_log_weights(means, 0.5 * (cov + cov.mT), self.weights.log() + log_lik, True)

    def _tilt_parts(
        self, linear: Tensor | None, quadratic: Tensor | None, who: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tilted means, covariances (``(k, d)`` when staying diagonal) and ``log Z_k`` with
        ``Z_k = E_{N(mu_k, S_k)}[exp(b^T x - x^T Q x / 2)]``; errors name ``who``."""
        d = self.dim
        b = torch.zeros(d, dtype=F64) if linear is None else self._vector(linear, d, who, "linear")
        if quadratic is None and not self.full:  # mu + S b, S kept; log Z = b^T mu + b^T S b / 2
            return (
                self.means + self.variances * b,
                self.variances,
                self.means @ b + 0.5 * (self.variances * b * b).sum(-1),
            )
        s = self.covariance_matrices
        eye = torch.eye(d, dtype=F64)
        if quadratic is None:
            q = torch.zeros(d, d, dtype=F64)
        else:
            q = self._matrix(quadratic, (d, d), who, "quadratic")
            if float((q - q.T).abs().max()) > 1e-10 * max(float(q.abs().max()), 1e-300):
                raise ValueError(f"{who}: quadratic must be symmetric")
            q = 0.5 * (q + q.T)
        # S' = (S^{-1} + Q)^{-1} = (I + S Q)^{-1} S, without inverting S
        m = eye + s @ q  # (k, d, d); S^{-1} + Q = S^{-1} M
        lu, piv, info = torch.linalg.lu_factor_ex(m)
        if bool((info > 0).any()):
            raise ValueError(f"{who}: quadratic makes S_k^{{-1}} + Q singular: the tilt is not normalizable")
        cov = torch.linalg.lu_solve(lu, piv, s)
        cov = 0.5 * (cov + cov.mT)
        # normalizable iff I + S^{1/2} Q S^{1/2} > 0 (= S^{1/2} (S^{-1} + Q) S^{1/2}; for a semi-definite S
        # the condition on its support), checked for every mixture, also those built allow_singular
        root = self._root if self.full else torch.diag_embed(self.variances.sqrt())
        if not bool((torch.linalg.eigvalsh(eye + root @ q @ root) > 0).all()):
            raise ValueError(
                f"{who}: quadratic must keep S_k^{{-1}} + Q positive definite (normalizable tilt)"
            )
        # x = mu + u, u ~ N(0, S): r = r(mu) + c^T u - u^T Q u / 2 with c = b - Q mu, so
        # mu' = mu + S' c and log Z_k = r(mu_k) + c^T S' c / 2 - log det(I + S Q) / 2
        c = b - self.means @ q
        means = self.means + (cov @ c[:, :, None])[:, :, 0]
        r_mu = self.means @ b - 0.5 * ((self.means @ q) * self.means).sum(-1)
        _, logdet = torch.linalg.slogdet(m)
        return means, cov, r_mu + 0.5 * (c * (cov @ c[:, :, None])[:, :, 0]).sum(-1) - 0.5 * logdet

    def tilt(self, linear: Tensor | None = None, quadratic: Tensor | None = None) -> GaussianMixture:
        """The exact reward-tilted law ``p(x) exp(r(x)) / Z`` for ``r(x) = b^T x - x^T Q x / 2``.

        ``linear``: ``b``, ``(d,)``; ``quadratic``: ``Q``, ``(d, d)`` symmetric with every
        ``S_k^{-1} + Q`` positive definite (``Q`` may be indefinite). Per component (completing the
        square): ``S_k' = (S_k^{-1} + Q)^{-1}``, ``mu_k' = S_k' (S_k^{-1} mu_k + b)``, weights
        ``w_k' ∝ w_k Z_k``, ``Z_k = E_{N(mu_k, S_k)}[exp r]``; ``log Z`` is :meth:`tilt_log_normalizer`.
        A diagonal mixture tilted by a linear reward stays diagonal.
        """
        means, cov, log_z = self._tilt_parts(linear, quadratic, f"{type(self).__name__}.tilt")
        return _from_log_weights(means, cov, self.weights.log() + log_z, self._singular)

    def tilt_log_normalizer(self, linear: Tensor | None = None, quadratic: Tensor | None = None) -> float:
        """``log Z = log E_p[exp(b^T x - x^T Q x / 2)] = logsumexp_k(log w_k + log Z_k)`` of :meth:`tilt`."""
        log_z = self._tilt_parts(linear, quadratic, f"{type(self).__name__}.tilt_log_normalizer")[2]
        return float(torch.logsumexp(self.weights.log() + log_z, dim=0))

    def shifted(self, shift: Tensor) -> GaussianMixture:
        """The law of ``x0 + shift`` (``shift``: ``(d,)``): means moved, covariances and weights kept."""
        shift = self._point(shift, f"{type(self).__name__}.shifted", "shift")
        return GaussianMixture(self.means + shift, self.covariances, self.weights, allow_singular=True)

    def product(self, other: GaussianMixture) -> GaussianMixture:
        """The law of ``(x, y)``, ``x ~ self`` and ``y ~ other`` independent, on the concatenated ``d + d'``
        coordinates: components ``(i, j)`` (row-major) with means ``(mu_i, nu_j)``, block-diagonal covariances
        and weights ``w_i v_j``; diagonal where both are. With :meth:`tilt` it gives coupled laws, e.g.
        ``p(x) q(y) exp(-gamma ||x - y||^2 / 2)`` with ``Q = gamma [[I, -I], [-I, I]]``."""
        if not isinstance(other, GaussianMixture):
            raise ValueError(
                f"{type(self).__name__}.product: other must be a GaussianMixture, got {type(other).__name__}"
            )
        k, j, d = len(self.weights), len(other.weights), self.dim
        means = torch.cat([self.means.repeat_interleave(j, 0), other.means.repeat(k, 1)], dim=1)
        weights = (self.weights[:, None] * other.weights[None, :]).reshape(-1)
        if not (self.full or other.full):
            cov = torch.cat([self.variances.repeat_interleave(j, 0), other.variances.repeat(k, 1)], dim=1)
        else:
            cov = torch.zeros(k * j, d + other.dim, d + other.dim, dtype=F64)
            cov[:, :d, :d] = self.covariance_matrices.repeat_interleave(j, 0)
            cov[:, d:, d:] = other.covariance_matrices.repeat(k, 1, 1)
        return GaussianMixture(means, cov, weights, allow_singular=self._singular or other._singular)

    def mean_reverting_marginal(self, process: MeanReverting, mu: Tensor, t: float) -> GaussianMixture:
        """Exact ``p(x_t | mu)`` of mean-reverting diffusion (IR-SDE) from ``x0`` of this law: the
        mixture with means ``alpha m_k + (1 - alpha) mu`` and covariances ``alpha^2 S_k + sigma^2 I``
        (``alpha = e^{-thetabar_t}``, ``sigma^2 = lambda^2 (1 - alpha^2)``), ``t`` in
        ``[0, process.t_max]``."""
        who = f"{type(self).__name__}.mean_reverting_marginal"
        process = _mean_reverting(who, process)
        t = real(who, "t", t, lo=0, hi=process.t_max)
        mu = self._point(mu, who, "mu")
        a, s = float(process.alpha(t)), float(process.sigma(t))
        noise = s * s * (torch.eye(self.dim, dtype=F64) if self.full else 1.0)
        return GaussianMixture(
            a * self.means + (1 - a) * mu, a * a * self.covariances + noise, self.weights, allow_singular=True
        )

    def mean_reverting_denoiser(self, process: MeanReverting, mu: Tensor) -> Denoiser:
        """The exact denoiser of mean-reverting diffusion towards ``mu`` (``(d,)``), built the way a
        user builds one, :meth:`MeanReverting.denoiser` around an ``x0``-predicting net that sees
        ``x`` and ``mu``: ``E[x0 | x_t, mu] = mu + E[y0 | y_t]`` with ``y0 ~`` :meth:`shifted` ``(-mu)``."""
        who = f"{type(self).__name__}.mean_reverting_denoiser"
        process = _mean_reverting(who, process)
        mu = self._point(mu, who, "mu")
        ys = self.shifted(-mu)

        def net(x: Tensor, t: Tensor, mu: Tensor) -> Tensor:
            m = mu.to(x)
            return _at_times(
                x, t, lambda xs, u: ys.denoise(xs - m, float(process.alpha(u)), float(process.sigma(u))) + m
            )

        return process.denoiser(net, mu, prediction="x0", shape=(self.dim,))

    def reference_ode(
        self,
        x_T: Tensor,
        process: Process,
        t_start: float | None,
        t_end: float | None = None,
        denoise: bool = False,
        rtol: float = 1e-10,
        atol: float = 1e-10,
    ) -> Tensor:
        """Probability-flow ODE solution from ``x_T`` at ``t_start`` to ``t_end``.

        ``t_start`` and ``t_end`` are process times in ``[process.t_min, process.t_max]`` (a
        ``ValueError`` outside); ``t_end=None`` integrates to the clean state ``sigma = 0``, and
        ``t_start=None`` from it (``x_T`` is then a clean sample: inversions that start at ``alpha = 1``,
        as diffusers' ``DDIMInverseScheduler`` by default). With
        ``denoise=True`` the exact denoiser is applied at ``t_end``:
        ``reference_ode(x_T, p, p.t_max, p.t_min, denoise=True)`` is the exact answer
        :func:`steerdiff.sample` approximates by default (solve to ``t_min``, return the denoised
        estimate there). DOP853 at ``rtol=1e-10`` on the CPU; float64, ``x_T``'s shape and device; not
        differentiable (an ``x_T`` that requires grad is detached).
        """
        who = f"{type(self).__name__}.reference_ode"
        span: Bounds = {"lo": process.t_min, "hi": process.t_max}
        if t_start is not None:
            t_start = real(who, "t_start", t_start, **span)
        if t_end is not None:
            t_end = real(who, "t_end", t_end, **span)
        rtol = real(who, "rtol", rtol, lo=0, lo_open=True)
        atol = real(who, "atol", atol, lo=0, lo_open=True)
        if t_start is None:
            a0, s0 = 1.0, 0.0
        else:
            a0, s0 = float(process.alpha(t_start)), float(process.sigma(t_start))
        if t_end is None:
            a1, s1 = 1.0, 0.0
        else:
            a1, s1 = float(process.alpha(t_end)), float(process.sigma(t_end))
        x_T = tensor(who, "x_T", x_T).detach()  # its shape and device are the result's; a constant
        shape = x_T.shape
        y0 = (self._flat(x_T, who, "x_T").reshape(-1) / a0).numpy()
        n = shape[0]

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            yt = torch.from_numpy(y).reshape(n, self.dim)
            # in (y, s): alpha = 1/sqrt(1+s^2) is irrelevant -- use the equivalent EDM pair (1, s)
            if s == 0:  # eps = (y - D(y, s)) / s -> 0 as s -> 0 for positive variances
                return np.zeros_like(y)
            return ((yt - self.denoise(yt, 1.0, s)) / s).reshape(-1).numpy()

        sol = solve_ivp(rhs, (s0 / a0, s1 / a1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE failed: {sol.message}")
        x = (torch.from_numpy(sol.y[:, -1]).reshape(shape) * a1).to(F64)
        return (self.denoise(x, a1, s1) if denoise and s1 > 0 else x).to(x_T.device)


def _mean_reverting(who: str, process: object) -> MeanReverting:
    """``process`` if it is a :class:`~steerdiff.processes.MeanReverting`, else a ``ValueError`` naming
    ``who`` and ``process``."""
    if not isinstance(process, MeanReverting):
        raise ValueError(f"{who}: process must be a steerdiff MeanReverting process, got {process!r:.60}")
    return process


def _device(x: Tensor | Any) -> torch.device:
    """Where a result for ``x`` goes: ``x``'s device (the CPU for array-likes)."""
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _at_times(x: Tensor, t: Tensor, denoise: Callable[[Tensor, float], Tensor]) -> Tensor:
    """``denoise(rows, u)`` of the rows of ``x`` at each distinct time ``u`` of ``t`` (one time, or one
    per sample): a single call when all times are equal; an empty batch gives an empty result."""
    tt = t.reshape(-1).to(F64)
    if tt.numel() > 0 and bool((tt == tt[0]).all()):
        return denoise(x, float(tt[0]))
    out = torch.empty_like(x)
    for u in torch.unique(tt).tolist():
        rows = tt == u
        out[rows] = denoise(x[rows], u)
    return out


def _from_log_weights(means: Tensor, cov: Tensor, log_w: Tensor, allow_singular: bool) -> GaussianMixture:
    """The mixture with unnormalized log-weights ``log_w``; components whose weight underflows in float64
    (below ``1e-300`` of the largest) carry no mass and are dropped."""
    keep = log_w - log_w.max() > math.log(1e-300)
    w = torch.exp(log_w[keep] - log_w.max())
    return GaussianMixture(means[keep], cov[keep], w, allow_singular=allow_singular)


def default_benchmark_mixture(dim: int = 64, components: int = 10, seed: int = 0) -> GaussianMixture:
    """The embedded default: a ``dim``-dimensional, ``components``-component diagonal mixture.

    Means ~ N(0, I), per-coordinate standard deviations log-uniform in [0.05, 0.5], Dirichlet(2)
    weights; fixed by ``seed``.
    """
    dim = integer("default_benchmark_mixture", "dim", dim, lo=1)
    components = integer("default_benchmark_mixture", "components", components, lo=1)
    seed = integer("default_benchmark_mixture", "seed", seed)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    log_std = math.log(0.05) + (math.log(0.5) - math.log(0.05)) * torch.rand(
        components, dim, generator=g, dtype=F64
    )
    w = -torch.log(torch.rand(components, generator=g, dtype=F64)) - torch.log(
        torch.rand(components, generator=g, dtype=F64)
    )  # Gamma(2, 1) as a sum of two exponentials: Dirichlet(2) after normalization
    return GaussianMixture(means, (2 * log_std).exp(), w)
