r"""DriftLite: a control drift fitted per step that keeps the Feynman-Kac correctors' weights even (Ren, Gao,
Ying, Rotskoff & Han 2025, "DriftLite: Lightweight Drift Control for Inference-Time Scaling of Diffusion
Models", arXiv:2509.21655; equation numbers are the paper's).

The targets are :mod:`~steerdiff.smc.fk_correctors`' compositions ``pi_t ∝ prod_k q^k_t^{beta_k}``
(annealing, products of experts, CFG's geometric mixture; the paper's reward tilting is not composed here).
There the particles follow the composed-score SDE and carry the weight rate ``G`` (per unit of the half
log-SNR ``lam``, :meth:`~steerdiff.smc.fk_correctors.Composition.rate` plus the divergence term). The
degree of freedom (Prop. 3.1): for any vector field ``b``, the Feynman-Kac Fokker-Planck equation of
``pi_t`` with drift ``v`` and potential ``g`` is also the one with drift ``v + b`` and potential

    phi = g + h(b),     h(b) = <nabla log pi_t, b> + nabla . b      (so that pi h(b) = nabla . (pi b)),

since ``-nabla . (pi b) + pi h(b) = 0``; ``E_pi[h(b)] = 0``. So adding ``b dlam`` to the particles' moves
and ``h(b) dlam`` to their log-weights leaves ``pi_t`` their weighted marginals, and ``b`` may be chosen to
make ``phi`` flat: the weights then stop degenerating (the exact flattening drift solves a Poisson equation,
Prop. 3.2, out of reach in high dimension). DriftLite takes ``b = sum_j theta_j v_j`` in the span of a few
fields that are at hand (Ansatz 3.3): here

    v_0 = x,                  h_0 = <S, x> + D,
    v_k = sigma^2 s_k = -sigma eps_k,   h_k = <eps_S, eps_k> - sigma nabla . eps_k      (k = 1..K),

the forward drift's direction (``f_t(x) ∝ x``; ``D`` the sample's size) and the components' scores, with
``S = -eps_S / sigma`` the composed score, ``eps_S = sum_k beta_k eps_k`` (the paper's bases for annealing:
score and forward drift; for CFG the two scores span the guidance direction ``s_c - s_u``). The
coefficients ``theta`` are fitted per batch row at every node ``i`` from the weighted particles ``(x_i,
W)`` (Algorithm 1, lines 3-4), ``g`` being the corrector's increment at the node per unit ``lam`` of the
step that follows, ``log G_i / h_i`` (:class:`~steerdiff.smc.fk_correctors.FKCorrector`'s, the trapezoidal
share ``(h_{i-1} + h_i) / (2 h_i)`` of its rate ``E`` plus a term equal for every particle), so that the
control offsets the increment the particles actually receive:

* ``"vcg"`` (variance-controlling guidance, Eq. 3.3): ``theta = argmin Var_W[g + sum_j theta_j h_j]``, a
  weighted least-squares problem, :func:`vcg_coefficients`;
* ``"ecg"`` (energy-controlling guidance, Eq. 3.4 and Ansatz 3.4): the Ritz solution of the Poisson
  equation for ``b = nabla A``, ``A = sum_j theta_j a_j`` with the fields' potentials ``a_0 = |x|^2 / 2``,
  ``a_k = sigma^2 log q^k_t``: ``M theta = c``, ``M_ij = E_W[<v_i, v_j>]``, ``c_i = Cov_W[g, a_i]``,
  :func:`ecg_coefficients`. It needs the values ``log q^k_t(x)`` (up to a constant in ``x``), which a
  denoiser does not give: with ``log_probs`` it uses the scores' fields, without them ``v_0`` alone.

A fit of ``n`` coefficients needs more particles than unknowns: a row whose effective sample size at the
node is below ``2 (n + 1)`` (:data:`MIN_ESS_PER_UNKNOWN`) takes no control there (``theta = 0``: the
corrector's own step and weight). With ``n + 1`` particles the least-squares fit interpolates them through a
near-singular system and its coefficients follow their noise (``steerdiff bench steer``, ``nine_quadratic``
at NFE 1600: 4 particles for 3 fields, 7.77x the floor and rows out to ``|x| = 47``, where ``fkc`` is at
0.93x).

Discretization: the particles move by the corrector's solver (:func:`~steerdiff.smc.fk_correctors.fkc`'s
default, SDE-DPM-Solver++(2M) with its step limit) plus the control, added to the Gaussian transition's
mean as the first-order data-prediction step (DDPM) integrates a change of the composed estimate ``x0``
(``b`` is ``2 sigma^2`` times a change of the score, i.e. ``x0`` moves by ``b / (2 alpha)``, held over the
step):

    x_{i+1} += (alpha_{i+1} / alpha_i) (1 - e^{-2 h_i}) / 2 sum_j theta_j v_j(x_i)  = h_i b(x_i) (1 + O(h_i))

``h_i = lam_{i+1} - lam_i``; their log-weight at node ``i`` gains the corrector's increment plus ``h_i sum_j
theta_j h_j(x_i)`` (the left-point rule of Algorithm 1, line 7), before the node's resampling. Both are
first-order consistent, so the weighted particles converge to ``pi`` as the steps and then the particles
grow, as the corrector's do; but the corrector's own weights are second order (trapezoidal) and its solver's
steps too, so at a given step count the control adds a bias of its own: on ``p^2`` of a 2-D mixture at 100
steps and 32 x 256 particles the weighted ``E[x_2^2]`` is off by +0.026 +- 0.006 with VCG (exact
divergences, ``probes=2``), where the corrector's estimate is within its noise (+-0.015); it falls with the
steps, at first order: +0.032 +- 0.008 / +0.026 +- 0.006 / +0.014 +- 0.008 / +0.007 +- 0.005 at 50 / 100 /
200 / 400 steps (seed 0; at 200 steps and 1024 particles +0.008 +- 0.004). DriftLite pays where the weights
are what limits the estimate: few particles for the target. The step into a clean end (``final="zero"``)
carries no control, as it carries no weight.

Divergences: ``nabla . eps_k`` has no closed form for a network. It is Hutchinson's estimate (Hutchinson
1989, as the paper suggests) ``mean_p z_p^T (d eps_k / dx) z_p`` over ``probes`` Rademacher vectors ``z_p``
drawn from ``generator``, each a vector-Jacobian product through the step's own evaluation (one backward
pass of component ``k``, through each network call it made: counted in ``nfe`` as its ``cost`` evaluations
per particle, 1 for a plain denoiser and 2 for a CFG, though a backward pass costs about twice a forward one
in time); with ``probes`` at least ``D`` the trace is exact, over the ``D`` unit vectors (``D`` backward
passes). ``nabla . x = D``. An unbiased noisy ``h`` keeps the scheme consistent (its noise
adds a variance of order ``h_i^2`` per step to the log-weights). ECG without ``log_probs`` needs none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, integer
from ..denoiser import Denoiser
from ..noise import Generators, check_generators, rand
from ..schedules import ScheduleLike
from ..solvers.base import Solver, Transition
from . import resample as _resample
from .fk_correctors import ComposedPrediction, Composition, FKCorrector, run_composition
from .particles import DEFAULT_SCHEDULE, Particles, RowSlice, SMCAlgorithm, StepContext

__all__ = [
    "MIN_ESS_PER_UNKNOWN",
    "RIDGE",
    "VARIANTS",
    "DriftLite",
    "driftlite",
    "ecg_coefficients",
    "vcg_coefficients",
]

VARIANTS = ("vcg", "ecg")
# the effective sample size a row needs per unknown of its fit (the n coefficients and the mean) to be
# controlled at a node. Below it, a least-squares fit of n coefficients follows the particles' noise: at n + 1
# particles it interpolates them with a near-singular system (`steerdiff bench steer`, nine_quadratic, 4
# particles and 3 fields: 7.77x the floor, rows out to |x| = 47, against fkc's 0.93x)
MIN_ESS_PER_UNKNOWN = 2.0
# the fits' ridge, on their normal equations scaled to a unit diagonal
RIDGE = 1e-12
LogProb = Callable[[Tensor, float], Tensor]


def _moments(values: Tensor, w: Tensor) -> Tensor:
    """``values`` ``(batch, N, ...)`` minus their ``w``-weighted mean over the particles."""
    wv = w.reshape(*w.shape, *([1] * (values.ndim - 2)))
    return values - (wv * values).sum(1, keepdim=True)


def _solve(m: Tensor, c: Tensor) -> Tensor:
    """``theta`` ``(batch, n)`` solving ``m theta = c`` for the symmetric positive semi-definite ``m``
    ``(batch, n, n)``, scaled to a unit diagonal ``s m s`` (``s = diag(m)^{-1/2}``: the fields' scales differ
    by orders where ``sigma`` is small) with a ridge of :data:`RIDGE`: ``theta = s (s m s + RIDGE I)^{-1} s
    c``, by Cholesky without its error check (``torch.linalg.cholesky_ex``) and two triangular solves, which
    read nothing from a CUDA device, where ``torch.linalg.pinv``'s SVD synchronizes it (a sync per node)."""
    s = torch.diagonal(m, dim1=-2, dim2=-1).sqrt().clamp_min(torch.finfo(m.dtype).tiny).reciprocal()
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    chol, _ = torch.linalg.cholesky_ex(s[..., :, None] * m * s[..., None, :] + RIDGE * eye)
    half = torch.linalg.solve_triangular(chol, (s * c)[..., None], upper=False)
    return s * torch.linalg.solve_triangular(chol.mT, half, upper=True)[..., 0]


def vcg_coefficients(g: Tensor, h: Tensor, log_w: Tensor) -> Tensor:
    """VCG's coefficients (Ren et al. 2025, Eq. 3.3): per batch row, ``theta = argmin_theta Var_W[g + h
    theta]`` over the particles weighted by ``W = exp(log_w)``, i.e. the least-squares solution of
    ``sqrt(W) (h - E_W h) theta = -sqrt(W) (g - E_W g)``, by its normal equations scaled to a unit diagonal
    with a ridge of :data:`RIDGE` (the pseudo-inverse's solution where the system is well posed; where
    ``h``'s centered columns are dependent, the damped one, near the minimum-norm one).

    Args:
        g: the potential rate per particle, ``(batch, N)``.
        h: the basis' control potentials ``h_j`` per particle, ``(batch, N, n)``.
        log_w: normalized log-weights ``(batch, N)``.

    Returns:
        ``theta`` ``(batch, n)``, float64.
    """
    w = torch.exp(log_w.to(torch.float64))
    root = w.sqrt()[..., None]
    a = root * _moments(h.to(torch.float64), w)
    y = -root * _moments(g.to(torch.float64)[..., None], w)
    return _solve(a.mT @ a, (a.mT @ y)[..., 0])


def ecg_coefficients(g: Tensor, a: Tensor, v: Tensor, log_w: Tensor) -> Tensor:
    """ECG's coefficients (Ren et al. 2025, Eq. 3.4 with Ansatz 3.4): per batch row, the Ritz minimizer of
    ``E_W[|sum_j theta_j v_j|^2 / 2 - g sum_j theta_j a_j]`` with ``v_j = nabla a_j``, i.e. ``M theta = c``,
    ``M_ij = E_W[<v_i, v_j>]``, ``c_i = E_W[(g - E_W g) a_i]`` (scaled and with a ridge, as
    :func:`vcg_coefficients`).

    Args:
        g: the potential rate per particle, ``(batch, N)``.
        a: the scalar bases ``a_j`` per particle, ``(batch, N, n)``.
        v: their gradients ``(batch, N, n, D)``.
        log_w: normalized log-weights ``(batch, N)``.

    Returns:
        ``theta`` ``(batch, n)``, float64.
    """
    w = torch.exp(log_w.to(torch.float64))
    v = v.to(torch.float64)
    m = torch.einsum("bp,bpid,bpjd->bij", w, v, v)
    c = torch.einsum("bp,bp,bpi->bi", w, _moments(g.to(torch.float64), w), a.to(torch.float64))
    return _solve(m, c)


class DriftLite(SMCAlgorithm):
    """DriftLite's control over the Feynman-Kac corrector of ``composition`` as engine hooks (see the module
    docstring): ``log_weight`` adds the control's potential to the corrector's increment and keeps the
    control's displacement in ``ctx.state``, ``propose`` adds it to the transition's mean.

    Args:
        composition: the :class:`~steerdiff.smc.fk_correctors.Composition` given to
            :func:`~steerdiff.smc.run_smc` as its denoiser.
        variant: ``"vcg"`` or ``"ecg"``.
        probes: Hutchinson probes per divergence (``>= D``: exact).
        log_probs: for ``"ecg"``, one callable per component of the composition (those with ``beta_k !=
            0``), ``(x (n, *shape), t) -> log q^k_t(x)`` ``(n,)`` up to a constant in ``x``; ``None``: the
            field ``x`` alone.
        generator: where the probes are drawn from (as :func:`~steerdiff.smc.run_smc`'s ``generator``).

    ``theta`` (one ``(batch, n)`` tensor per controlled node) and ``backward`` (network backward passes per
    particle: a component's ``cost`` per probe) are recorded as the run goes; they count in
    :func:`~steerdiff.smc.run_smc`'s ``nfe`` (one evaluation per particle each,
    :meth:`~steerdiff.smc.StepContext.count`).
    """

    name = "driftlite"
    grad = True
    shardable = False  # the fit needs every particle of a row on one process
    needs_transition = True

    def __init__(
        self,
        composition: Composition,
        variant: str = "vcg",
        probes: int = 1,
        log_probs: Sequence[LogProb] | None = None,
        generator: Generators = None,
    ) -> None:
        who = "DriftLite"
        self.corrector = FKCorrector(composition)
        self.variant = choice(who, "variant", variant, VARIANTS)
        self.probes = integer(who, "probes", probes, lo=1)
        if log_probs is not None:
            if self.variant != "ecg":
                raise ValueError(f"{who}: log_probs are ECG's potentials; give them with variant='ecg'")
            log_probs = _callables(who, log_probs, len(composition.dens))
        self.log_probs = log_probs
        self.scores = self.variant == "vcg" or log_probs is not None
        self.generator = check_generators(who, generator)
        self.theta: list[Tensor] = []
        self.backward = 0

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        inc = self.corrector.log_weight(ctx)
        g, i = ctx.grid, ctx.i
        if inc is None or i == g.steps or g.sigma[i + 1] == 0:  # no step, or the jump into a clean end
            return inc
        pred = ctx.prediction()
        assert isinstance(pred, ComposedPrediction)  # the corrector's log_weight checked it
        x = ctx.x.detach()
        batch, n = x.shape[:2]
        sigma = g.sigma[i]
        eps_s = pred.eps.detach().reshape(batch, n, -1).to(torch.float64)
        flat = x.reshape(batch, n, -1).to(torch.float64)
        size = flat.shape[-1]
        fields, pots = [flat], [-torch.linalg.vecdot(eps_s, flat) / sigma + size]
        scalars = [0.5 * torch.linalg.vecdot(flat, flat)]
        if self.scores:
            for k, eps in enumerate(pred.parts):
                e = eps.detach().reshape(batch, n, -1).to(torch.float64)
                fields.append(-sigma * e)
                pots.append(torch.linalg.vecdot(eps_s, e) - sigma * self._divergence(ctx, eps, pred.costs[k]))
                if self.log_probs is not None:
                    scalars.append(sigma**2 * ctx.map_rows(partial(_log_prob, self.log_probs[k])))
        dt = g.h(i)
        # the node's increment per unit lam of the step it leads: what the control offsets (without its graph:
        # theta, kept for the run, would hold every node's network graph to the end)
        rate = inc.detach() / dt
        h = torch.stack(pots, -1)
        if self.variant == "vcg":
            theta = vcg_coefficients(rate, h, ctx.log_w)
        else:
            theta = ecg_coefficients(rate, torch.stack(scalars, -1), torch.stack(fields, 2), ctx.log_w)
        # a row whose weighted particles are too few for its len(fields) coefficients and their mean takes
        # no control at this node (FKC's step): the fit would follow their noise (MIN_ESS_PER_UNKNOWN)
        ess = torch.exp(-torch.logsumexp(2.0 * ctx.log_w.to(torch.float64), 1))
        theta = torch.where(ess[:, None] >= MIN_ESS_PER_UNKNOWN * (len(fields) + 1), theta, 0.0)
        self.theta.append(theta)
        # the control as a change of the composed estimate, integrated as the data-prediction step does it
        scale = g.alpha[i + 1] / g.alpha[i] * -math.expm1(-2.0 * dt) / 2.0
        drift = scale * torch.einsum("bj,bpjd->bpd", theta, torch.stack(fields, 2))
        ctx.state["drift"] = drift.reshape(x.shape).to(x.dtype)
        return inc + dt * torch.einsum("bj,bpj->bp", theta, h)

    def _divergence(self, ctx: StepContext, eps: Tensor, cost: int) -> Tensor:
        """``nabla . eps`` per particle ``(batch, N)`` float64: Hutchinson's estimate over ``probes``
        Rademacher vectors, or the exact trace over the unit vectors where ``probes >= D``; one backward
        pass each, through the ``cost`` network calls that made ``eps`` (counted as as many evaluations)."""
        leaf = ctx.x
        size = math.prod(leaf.shape[2:])
        if self.probes >= size:
            eye = torch.eye(size, dtype=leaf.dtype, device=leaf.device)
            probes = [eye[j].expand((*leaf.shape[:2], size)).reshape(leaf.shape) for j in range(size)]
        else:
            check_generators("DriftLite", self.generator, leaf.shape[0])  # a list: one per batch row
            probes = [
                torch.where(rand(leaf.shape, self.generator, leaf.dtype, leaf.device) < 0.5, -1.0, 1.0).to(
                    leaf.dtype
                )
                for _ in range(self.probes)
            ]
        total = torch.zeros(leaf.shape[:2], dtype=torch.float64, device=leaf.device)
        for z in probes:
            (vjp,) = torch.autograd.grad(eps, leaf, grad_outputs=z.reshape(eps.shape), retain_graph=True)
            total = total + (vjp * z).flatten(2).sum(-1, dtype=torch.float64)
        self.backward += len(probes) * cost
        ctx.count(len(probes) * cost)
        return total if self.probes >= size else total / len(probes)

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        drift = ctx.state.pop("drift", None)
        return base if drift is None else Transition(base.mean + drift, base.std)


def _callables(who: str, values: object, n: int) -> list[LogProb]:
    """``values`` as a list of ``n`` callables, else a ``ValueError`` naming ``who``'s ``log_probs``."""
    if not isinstance(values, Iterable) or isinstance(values, str | bytes):
        raise ValueError(f"{who}: log_probs must be a sequence of callables, got {type(values).__name__}")
    out = list(values)
    if len(out) != n or not all(callable(f) for f in out):
        raise ValueError(
            f"{who}: log_probs must hold one callable (x, t) -> log q_t(x) per component ({n}), got "
            f"{[type(f).__name__ for f in out]}"
        )
    return out


def _log_prob(fn: LogProb, rows: RowSlice) -> Tensor:
    """``fn`` at the rows' particles and time, checked: ``(n,)`` finite values, as float64, without a graph
    (values only: a graph through the particles would be held by the recorded ``theta``)."""
    x = rows.x.detach()
    out = fn(x, float(rows.t))
    shaped = isinstance(out, Tensor) and tuple(out.shape) == (x.shape[0],)
    if not shaped or not bool(torch.isfinite(out).all()):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"driftlite: log_probs must map (n, *shape) to finite log-densities (n,); for n = {x.shape[0]} "
            f"one returned {got} (or non-finite values)"
        )
    return out.detach().to(torch.float64)


def driftlite(
    dens: Sequence[Denoiser],
    betas: Sequence[float],
    *,
    shape: tuple[int, ...] | None = None,
    variant: str = "vcg",
    particles: int = 16,
    steps: int | None = None,
    kwargs: Sequence[dict[str, Any] | None] | None = None,
    probes: int = 1,
    log_probs: Sequence[LogProb] | None = None,
    ess_threshold: float = 0.5,
    resampler: str | _resample.Resampler = "systematic",
    solver: str | Solver | None = None,
    data_std: float = 0.0,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    final: str = "zero",
    max_batch: int | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: Generators = None,
    progress: bool = False,
    group: Any = None,
    **cond: Any,
) -> Particles:
    """DriftLite (Ren et al. 2025; see the module docstring) for ``prod_k q^k(x)^{beta_k}``: the Feynman-Kac
    corrector of :func:`~steerdiff.smc.fkc` with a control drift ``b = sum_j theta_j v_j`` fitted at every
    node (VCG or ECG) and its compensating potential in the weights::

        x_{i+1} = solver step of the composed score from x_i + h_i b(x_i) + noise,
        log w  += fkc's increment at x_i + h_i (<S, b> + nabla . b)(x_i),     h_i = lam_{i+1} - lam_i.

    Annealing ``p^beta``: ``driftlite([den], [beta], ...)``; a product ``p1 p2``: ``[den1, den2], [1, 1]``;
    CFG's ``p(x|c)^w p(x)^{1-w}``: ``[uncond, cond], [1 - w, w]`` with ``kwargs=[uncond_kwargs, None]``.

    Args:
        dens, betas, shape, particles, steps, kwargs, ess_threshold, resampler, solver, data_std, schedule,
            final, max_batch, x_T, dtype, device, generator, progress, cond: as for :func:`~steerdiff.smc.fkc`
            (``generator`` also draws the Hutchinson probes; ``shape`` may be left out where ``x_T`` is
            given).
        variant: ``"vcg"`` (default; the fields ``x`` and the components' scores) or ``"ecg"`` (the scores'
            fields only with ``log_probs``).
        probes: Hutchinson probes per divergence of a score field, ``>= 1`` (``>= D``, the sample's size:
            the exact trace).
        log_probs: for ``"ecg"``: one callable per component of ``dens`` (in its order; those of the
            components with ``beta_k = 0`` are not called), ``(x, t) -> log q^k_t(x)`` ``(n,)`` (up to a
            constant in ``x``; e.g. a :class:`~steerdiff.toy.GaussianMixture`'s ``log_prob`` at the process's
            ``alpha(t), sigma(t)``).
        group: not supported (the fit needs all of a row's particles on one process): ``None``.

    Returns:
        :class:`~steerdiff.smc.Particles`, as :func:`~steerdiff.smc.fkc`'s; ``nfe`` counts, per batch row,
        ``C * steps * particles`` network evaluations (``C`` the components' summed ``cost``: ``K`` for
        ``K`` plain denoisers with ``beta_k != 0``, a CFG counting 2) plus one per network backward pass of
        the divergences (``C * min(probes, D)`` per particle at every controlled node, the ``steps - 1``
        nodes before the last step with ``final="zero"``; none for ECG without ``log_probs``).
    """
    who = "driftlite"
    variant = choice(who, "variant", variant, VARIANTS)
    probes = integer(who, "probes", probes, lo=1)
    if log_probs is not None and variant != "ecg":
        raise ValueError(f"{who}: log_probs are ECG's potentials; give them with variant='ecg'")
    if group is not None:
        raise ValueError(f"{who}: group: DriftLite fits its drift on all of a row's particles; pass None")
    betas = list(betas) if isinstance(betas, Iterable) else betas

    def make(comp: Composition) -> DriftLite:
        lps = None if log_probs is None else _callables(who, log_probs, len(betas))
        kept = None if lps is None else [f for f, b in zip(lps, betas, strict=True) if b != 0]
        return DriftLite(comp, variant, probes, kept, generator)

    return run_composition(
        who, dens, betas, make, shape=shape, particles=particles, steps=steps, kwargs=kwargs,
        ess_threshold=ess_threshold, resampler=resampler, solver=solver, data_std=data_std, schedule=schedule,
        final=final, max_batch=max_batch, x_T=x_T, dtype=dtype, device=device, generator=generator,
        progress=progress, group=group, **cond,
    )  # fmt: skip
