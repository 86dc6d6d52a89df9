r"""Density Guidance: the probability-flow ODE steered so that ``log p_t(x_t)`` follows a prescribed rate.

Karczewski, Heinonen & Garg 2025, "Devil is in the Details: Density Guidance for Detail-Aware
Generation with Flow Models" (ICML 2025, arXiv:2502.05807), Sections 4-5.

Along any path ``dx/dt = u_t(x)`` the log-density of the *model's* marginal at the moving point obeys
(chain rule plus the Fokker-Planck / continuity equation ``d_t log p_t = -div v - s . v`` of the
probability-flow drift ``v`` and score ``s = grad log p_t``)

    d log p_t(x_t) / dt = -div v_t(x_t) + s_t(x_t) . (u_t(x_t) - v_t(x_t)),

so the plain ODE (``u = v``) changes it by ``-div v`` (the instantaneous change of variables). Density
Guidance takes the drift closest to ``v`` whose rate is a prescribed ``b_t(x)``: a step along the score,

    u_t = v_t + (b_t + div v_t) / ||s_t||^2  s_t                                       (paper, eq. 11).

With ``x_t = alpha x0 + sigma eps`` the drift is ``v = (alpha'/alpha) x + sigma^2 lam' s`` (``lam = log
(alpha / sigma)``, ``sigma^2 lam' = -g^2 / 2``), so ``u`` is the probability-flow drift of the rescaled
score ``eta s`` -- the denoiser's ``eps`` times ``eta`` -- with

    eta_t(x) = 1 + (b_t + div v_t) / (lam'(t) ||eps||^2),   div v = D alpha'/alpha - sigma lam' tr(d eps/dx),

and every solver that integrates the probability-flow ODE integrates the guided one (in continuous time
``log p_t(x_t)`` then changes at exactly ``b_t``; a solver's step adds its own discretization error).

The paper's practical rule adds to the plain rate one proportional to ``lam'``, ``b_t = -div v + k lam'``
(its ``b^q`` with ``k = sqrt(2 D) Phi^{-1}(q)``, eq. 13): then ``div v`` cancels and

    eta_t(x) = 1 + k / ||eps||^2                                                       (eq. 14),

at no cost beyond the base denoiser's; ``log p`` gains ``k (lam_end - lam_start)`` over and above the
plain rate along the guided path (for a Gaussian law, where ``div v`` does not depend on ``x``, exactly
``k`` per unit of ``lam`` more than the plain ODE from the same ``x_T``): ``quantile=``. The *Prior Guidance*
baseline the paper analyses rescales the initial noise instead (:func:`prior_guidance`).

``offset=`` spreads a total over the path with another rate of the same family (eq. 11 allows any
``b_t``; this one is ours, not the paper's): ``b_t = -div v + k (ds/dlam) lam'`` with the signal fraction
``s = alpha^2 / (alpha^2 + sigma^2) = sigmoid(2 lam)``, ``ds/dlam = 2 s (1 - s) = sech(lam)^2 / 2``, and
``k = offset / (s(t_min) - s(t_max))``, so ``eta = 1 + k sech(lam)^2 / (2 ||eps||^2)`` and the gain up to a
node is the offset times the fraction of ``s`` covered. Why not the paper's uniform rate: a solver takes
the denoised estimate, or its polynomial in ``lam``, as slowly varying over a step, and in ``x / sigma``

    d(x / sigma)/dlam = e^lam x0_hat,   x0_hat = x0_base - e^{-lam} r(lam) eps / ||eps||^2,

where ``r`` is the gain per unit of ``lam``: the guidance's part of ``x0_hat`` varies as ``e^{-lam} r``.
With ``r = k`` constant a first-order step of length ``h`` (``eps / ||eps||^2`` frozen) applies it
``(e^h - 1) / h`` times the exact ``h``: the default schedule's first step (``karras_capped``, ``h`` = 1.50
on VP cosine, 3.64 on rectified flow) 2.3 / 10.2 times, at ``t_max`` where a small ``||x_T||`` makes
``eta`` far from 1; and the clean end (``final="zero"``) is the step ``h = inf`` onto ``x0_hat``, whose extra
``-(sigma/alpha) k eps/||eps||^2`` moves ``log p`` by ``k`` more -- one more unit of ``lam`` past ``t_min``,
where the rate is not defined. With ``r = k sech(lam)^2 / 2`` the guided part of ``x0_hat``,
``-2 k e^lam / (1 + e^{2 lam})^2 eps / ||eps||^2``, is bounded and vanishes at both ends (as ``e^lam`` at
high noise, ``e^{-3 lam}`` at low noise): long steps there carry none of it, and the clean step adds
``r(lam(t_min))`` ~ ``2 k e^{-2 lam(t_min)}`` (1.6e-4 nats on VP cosine at ``offset=-2``, 4e-6 on flow).

Measured (``tests/test_density_guidance.py::test_offset_under_the_samplers_defaults``: a 4-d Gaussian,
``offset=-2``, 256 samples, 40 steps, mean gain over the plain run from the same ``x_T``, VP cosine /
rectified flow): ``sd.sample``'s defaults -2.009 / -2.013 (max error 0.044 / 0.060), log-SNR-uniform grid
to the last node -2.005 / -2.013. The paper's uniform rate with the same total (``quantile``; it was
``offset``'s): -2.370 / -6.102 under the defaults (flow: 44.7 nats off on one sample), -2.216 / -2.165 on a
log-SNR-uniform grid with the clean end, -2.006 / -2.016 at its last node: use ``quantile`` with
``schedule="logsnr_uniform"`` and ``final="none"`` (then denoise with the base). Per sample, on
log-SNR-uniform grids the uniform rate is the more exact one where it works (max error 8.8e-4 / 2.4e-3 at
40 steps against 0.029 / 0.078: ``offset``'s rate peaks at ``lam = 0``, 5 / 7 times the uniform ``k``).

The stochastic extension (noise projected orthogonally to the score plus a Laplacian drift correction)
is not a denoiser: it needs its own SDE step and is not provided. Under a stochastic solver the scaled
score also enters the reverse SDE's added drift, which then no longer matches the SDE's noise, so ``log p``
is not held to the rate: use an ODE solver. (8-d mixture, VP cosine, ``offset=-2``, 512 samples, the same
noise with and without guidance, 40 / 200 log-SNR-uniform steps: mean gain -1.64 / -1.67 ``ddpm``,
-1.57 / -1.64 ``euler_maruyama``, -1.74 / -1.67 ``dpmpp_2m_sde``, -1.90 / -1.91 ``flow_sde``; UniPC's ODE
-2.05 / -2.05, its spread 0.39 / 0.39 the path's own ``-div v``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import integer, real, tensor
from ..denoiser import Denoiser, Prediction
from ..noise import Generators, check_generators, rand
from .base import Guided, add_score, denoise_with_grad, grad_on, hold

__all__ = ["DensityGuidance", "prior_guidance"]

Rate = Callable[[float | Tensor, Tensor], Tensor]


class DensityGuidance(Guided):
    r"""Density Guidance (Karczewski et al. 2025): the base's probability-flow ODE with ``log p_t(x_t)``
    changing at a prescribed rate, as a guided denoiser whose ``eps`` is the base's times ``eta_t(x)``
    (module docstring). Give exactly one of:

    - ``offset``, a total: ``eta = 1 + k sech(lam)^2 / (2 ||eps||^2)`` with ``k = offset / (s(t_min) -
      s(t_max))``, ``s = alpha^2 / (alpha^2 + sigma^2)`` (module docstring: the paper's ``b^q`` rule with
      its rate per unit of ``lam`` reweighted by ``ds/dlam``, so that long steps at either end and the
      clean step carry none of it), so that a path over the process's whole range ``[t_min, t_max]``
      gains ``offset`` nats of ``log p`` beyond the plain rate (a grid from ``t_a`` down to ``t_b`` gains
      ``k (s(t_b) - s(t_a))``). ``offset = 0`` is the base, bit for bit.
    - ``quantile`` ``q`` in (0, 1) (the paper's parameterization): ``k = sqrt(2 D) Phi^{-1}(q)``, ``D``
      the sample's size; ``q > 0.5`` raises ``log p_0``, ``q < 0.5`` lowers it.
    - ``rate``: the paper's ``b_t``, a function ``rate(t, x) -> (batch,)`` giving the prescribed
      ``d log p_t(x_t) / dt`` in the process's time (``t`` as the sampler passes it: a float, or a
      ``(batch,)`` tensor). This needs ``div v``, from autograd through the base: ``probes=None``
      takes the exact trace of ``d eps / dx`` (``D`` vector-Jacobian products, for small ``D``),
      ``probes=m`` Hutchinson's estimate with ``m`` Rademacher vectors drawn from ``generator``
      (unbiased; ``log p`` then follows ``b_t`` up to the estimate's noise): ``None`` (torch's global
      RNG), one ``torch.Generator``, or one per row, so that a row does not depend on its batch (needed
      under a sampler's per-row list of generators; under a particle method one per particle).

    Cost per call: ``base.cost`` for ``offset`` / ``quantile``; with ``rate``, ``base.cost`` times
    ``1 + D`` (exact trace) or ``1 + probes``, counting each vector-Jacobian product (a backward pass
    through the net) as one network evaluation -- unlike the one backward pass per call of
    :class:`~steerdiff.guidance.DPS`, :class:`~steerdiff.guidance.RewardGuidance` and
    :class:`~steerdiff.guidance.SelfGuidedMinority`, which their costs do not count: compare NFE across
    them with that in mind.
    """

    noise_generators = ("generator",)

    def __init__(
        self,
        base: Denoiser,
        *,
        offset: float | None = None,
        quantile: float | None = None,
        rate: Rate | None = None,
        probes: int | None = None,
        generator: Generators = None,
    ) -> None:
        super().__init__(base)
        who = "DensityGuidance"
        given = [
            name for name, v in (("offset", offset), ("quantile", quantile), ("rate", rate)) if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"{who}: give exactly one of offset, quantile or rate, got {given or 'none'}")
        if rate is None and (probes is not None or generator is not None):
            raise ValueError(f"{who}: probes and generator are for rate= (the divergence), not {given[0]}=")
        if rate is not None and not callable(rate):
            raise ValueError(
                f"{who}: rate must be a function (t, x) -> (batch,) tensor, got {type(rate).__name__}"
            )
        self.offset = None if offset is None else real(who, "offset", offset)
        self.quantile = (
            None
            if quantile is None
            else real(who, "quantile", quantile, lo=0, hi=1, lo_open=True, hi_open=True)
        )
        self.rate, self.generator = rate, check_generators(who, generator)
        self.probes = None if probes is None else integer(who, "probes", probes, lo=1)
        self.k = 0.0  # offset's log-density per unit of the signal fraction; quantile's is per call
        if self.offset is not None:  # every built-in process has a finite log-SNR range (zero SNR clamped)
            p = base.process
            frac = torch.sigmoid(2 * p.lam(torch.tensor([p.t_min, p.t_max], dtype=torch.float64)))
            self.k = self.offset / float(frac[0] - frac[1])

    def own_noise(self) -> list[tuple[str, Generators]]:
        """``base``'s, and Hutchinson's probes' where ``rate`` and ``probes`` are given."""
        own = [("DensityGuidance", self.generator)] if self.probes is not None else []
        return [*super().own_noise(), *own]

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The base prediction with ``eps`` scaled by ``eta_t(x)`` (class docstring)."""
        self._cost = None  # base.cost, unless rate= counts its vector-Jacobian products below
        if self.rate is None:
            pred = self.base.evaluate(x, t, net_dtype, **cond)
            if self.quantile is None and self.k == 0:
                return pred
            per_lam: float | Tensor  # d log p / d lam over the plain rate
            if self.quantile is None:  # k ds/dlam, s = sigmoid(2 lam): 2 s (1 - s) = sech(lam)^2 / 2
                lam = self.base.process.lam(t.to(torch.float64) if isinstance(t, Tensor) else float(t))
                per_lam = (
                    (self.k * 0.5 * torch.cosh(lam).pow(-2)).to(device=x.device, dtype=x.dtype).reshape(-1)
                )
            else:
                per_lam = math.sqrt(2 * x[0].numel()) * _ndtri(self.quantile)
            extra = per_lam / _sq_norm(pred.eps)  # eta - 1
        else:
            pred, extra = self._rate_step(x, t, net_dtype, **cond)
        return add_score(pred, _rows(-extra, x) * pred.eps / pred.sigma)

    def _rate_step(
        self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any
    ) -> tuple[Prediction, Tensor]:
        """The detached base prediction and ``eta - 1 = (b + div v) / (lam' ||eps||^2)``."""
        who = "DensityGuidance"
        n, d = x.shape[0], x[0].numel()
        m = d if self.probes is None else self.probes
        with grad_on(who, x) as nested:
            xr, pred = denoise_with_grad(who, self.base, x, t, net_dtype, **cond)
            base_cost = int(self.base.cost)
            eps = pred.eps
            trace = torch.zeros(n, dtype=x.dtype, device=x.device)
            for j in range(m):
                if self.probes is None:  # exact: the j-th diagonal entry of d eps / dx
                    z = torch.zeros(n, d, dtype=x.dtype, device=x.device)
                    z[:, j] = 1
                    z = z.reshape(x.shape)
                else:  # Rademacher probe: E[z . (J z)] = tr J
                    z = torch.where(rand(x.shape, self.generator, x.dtype, x.device) < 0.5, -1.0, 1.0).to(
                        x.dtype
                    )
                (g,) = torch.autograd.grad(eps, xr, z, retain_graph=nested or j + 1 < m, create_graph=nested)
                trace = trace + (g * z).flatten(1).sum(1)
            trace = trace / (1 if self.probes is None else m)
        self.cost = base_cost * (1 + m)
        assert self.rate is not None, "called for rate= only"
        b = tensor(who, "rate(t, x)", self.rate(t, x))
        if b.shape != (n,):
            raise ValueError(f"{who}: rate(t, x) must return a tensor of shape ({n},), got {tuple(b.shape)}")
        p = self.base.process
        tt = t.to(torch.float64) if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)
        # the derivatives on the side sampling moves to: VP.discrete's are those of the segment below an
        # integer node, where the schedules put their nodes (floor(t) alone would take the one above)
        t_in = torch.nextafter(tt, torch.full_like(tt, -math.inf)).clamp(min=0)
        dlog_a = p.d_alpha(t_in) / p.alpha(t_in)
        lam_dot, dlog_a, s = (
            v.to(device=x.device, dtype=x.dtype).reshape(-1)
            for v in (dlog_a - p.d_sigma(t_in) / p.sigma(t_in), dlog_a, p.sigma(tt))
        )
        div_v = d * dlog_a - s * lam_dot * trace
        held = hold(pred, pred.x0_given, nested)
        extra = (b.to(x.dtype) + div_v) / (lam_dot * _sq_norm(held.eps))
        return held, extra


def _ndtri(q: float) -> float:
    """``Phi^{-1}(q)``, the standard normal quantile."""
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


def _sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared norm ``(batch,)``."""
    return v.flatten(1).pow(2).sum(1)


def _rows(v: Tensor, x: Tensor) -> Tensor:
    """A ``(batch,)`` tensor broadcasting against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def prior_guidance(x_T: Tensor, scale: float) -> Tensor:
    r"""Prior Guidance (the baseline Karczewski et al. 2025 analyse, Section 3): the initial noise scaled,
    ``scale x_T``. Where score alignment holds (the pushed-forward prior score makes an acute angle with
    the data score) ``log p_0`` of the ODE's sample rises as ``scale`` falls below 1 (``log p_T(x_T)``
    rises) and falls above it; unlike :class:`DensityGuidance` it sets no value of ``log p_0``. ``scale``:
    a finite number > 0."""
    scale = real("prior_guidance", "scale", scale, lo=0, lo_open=True)
    return tensor("prior_guidance", "x_T", x_T) * scale
