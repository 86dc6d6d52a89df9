r"""A denoiser with no trained model: ``E[x0 | x_t]`` of a target known up to a constant, by Monte Carlo.

Reverse Diffusion Monte Carlo (rdMC; Huang, Dong, Hao, Ma & Zhang, ICLR 2024, "Reverse Diffusion Monte
Carlo", arXiv:2307.02037) samples an unnormalized density ``p(x0) ∝ exp(log_prob(x0))`` with the reverse
diffusion, the score of each noised marginal ``p_t`` estimated as a posterior mean instead of learned.
Under ``x_t = alpha x0 + sigma eps`` the posterior of ``x0`` given ``x_t = x`` is

    q(x0 | x) ∝ p(x0) N(x; alpha x0, sigma^2 I) ∝ p(x0) N(x0; x / alpha, (sigma / alpha)^2 I),

and Tweedie's formula gives the denoiser and the score from its mean (the score as an expectation under
``q``, the paper's "score matching as mean estimation"; rdMC writes it in the Ornstein-Uhlenbeck time
``T - t``, ``alpha = e^{-(T-t)}``, ``sigma^2 = 1 - e^{-2(T-t)}``)::

    x0_hat(x) = E_q[x0],    eps_hat = (x - alpha x0_hat) / sigma,
    grad log p_t(x) = -(x - alpha x0_hat) / sigma^2 = -eps_hat / sigma.

:class:`MonteCarloDenoiser` estimates ``E_q[x0]`` from ``samples`` draws started from the Gaussian factor of
``q``, ``y_i = x / alpha + (sigma / alpha) z_i``, either way rdMC's public reimplementations do:

* ``method="importance"``: self-normalized importance sampling with that Gaussian as the proposal; the
  weights are ``w_i ∝ p(y_i)`` (the Gaussian cancels), ``x0_hat = sum_i w_i y_i / sum_i w_i``, and the
  effective sample size ``(sum w)^2 / sum w^2`` of the latest call is kept in :attr:`~MonteCarloDenoiser.ess`.
  Needs ``log_prob``'s values only. Exact as ``samples`` grows, with error ``O(1 / sqrt(samples))``; the
  proposal widens as ``sigma / alpha`` grows, so the ESS falls at high noise, the faster the higher the
  dimension.
* ``method="langevin"``: rdMC's inner loop, ``inner`` ULA moves (:class:`~steerdiff.mcmc.ULA`) on
  ``log q`` from each draw, ``grad log q(y) = grad log p(y) + alpha (x - alpha y) / sigma^2``, and the mean of
  the chains' last states. The step is ``h = 1 / (1 / step_size + alpha^2 / sigma^2)``: ``step_size``
  where the target's curvature rules, below the Gaussian factor's stability limit ``sigma^2 / alpha^2``
  where that one does (at low noise). Biased by ``O(h)`` and by the chains' unmixed start; needs gradients.
  The chains are bounded by the divergence guard (a state NaN/inf or beyond ``1e8 max(1, max |y|)`` of the
  draws they started from, :data:`~steerdiff.solvers.base.DIVERGED`): on the CPU a
  :class:`~steerdiff.NonFiniteError` at that call names the move and ``step_size``; on an accelerator the
  estimate is made NaN, which the sampler names as the model's at that step (no read per call).

Both estimates are differentiable in ``x`` (guidance that differentiates the denoiser, such as DPS; a
backward pass through the sampler). ``"importance"``: through the weights (``log_prob`` differentiable);
the derivative of the estimate itself. ``"langevin"``: Tweedie's second identity
``d E_q[x0] / dx = (alpha / sigma^2) Cov_q[x0]`` with Stein's identity
``E_q[(x0 - x0_hat) grad log q^T] = -I`` (``grad log q = grad log p - (alpha^2 / sigma^2)(x0 - x / alpha)``)
gives

    d E_q[x0] / dx = (I + E_q[(x0 - x0_hat) grad log p(x0)^T]) / alpha,

estimated over the chains' last states (``samples >= 2``; one more gradient of ``log_prob`` per chain, so a
differentiated call costs ``samples * (inner + 1)``). The covariance form itself would inherit ULA's
inflated variance (``1 / (1 - h P / 2)`` on a Gaussian of precision ``P``; ``h P`` nears 1 at low noise):
on the four-mode mixture at ``t = 0.05`` its Jacobian was 27% off the exact one where this one is 3%. The
Stein form's own error grows with the target's precision instead, so it is the better one at low noise
only: on a VP mixture (2048 chains) 2.1% against 45% at ``alpha^2 / sigma^2 = 80``, 4.2% against 9.8% at
8.5, but 25% against 13% at 0.24 (where the chains had not mixed either). The chains' pathwise derivative
would need Hessian-vector products of ``log_prob`` through every move.

The cost is counted in target evaluations: each call costs :attr:`~MonteCarloDenoiser.cost` ``= samples``
(importance: values of ``log_prob``) or ``samples * inner`` (langevin: values with gradients) per row, so a
sampler's NFE is the number of target evaluations per sample.

Where to start. A solver started at the process's noise end needs ``x_T`` from ``p_T``, which is the standard
normal only where ``alpha_T`` is 0; rdMC starts its reverse process at a moderate, finite time ``T`` (early
stopping; why, as measured here: at ``alpha -> 0`` ``q`` is ``p`` itself and the draws of its Gaussian factor
miss it, the ESS falls to 1), from an ``x_T`` of ``p_T`` itself: its reimplementations draw
``N(0, sigma_T^2 I)`` and move it with ULA on ``p_T``, the score estimated as above (SLIPS' rdMC; ZOD-MC runs
its RDMC baseline from ``T = 2``, ``alpha_T = e^{-2}``, ``sigma_T / alpha_T = 7.3``). Here: a process whose
noise end is that ``T`` (e.g. ``VP.cosine(t_max=...)``, or a :class:`~steerdiff.schedules.Custom` grid from
it) and :meth:`MonteCarloDenoiser.warm_start`. Its remaining error is the warm start's: on modes still apart
at ``T`` the ULA moves, with the estimate's noise in their score, leave the mode weights of ``p_T`` off by a
few percent, which the reverse process keeps.

The paper's body was not retrievable here: the estimator is written from the posterior above, its inner
loops as the abstract and two public reimplementations describe them (SLIPS, Grenioux et al. 2024, its
``rdmc.py`` baseline: importance sampling from this Gaussian, then MALA; ZOD-MC, He et al. 2024, its
``score_estimators.py``: ULA from this Gaussian, the mean of the chains).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, integer, real, sizes
from .._ops import first_false
from ..denoiser import Denoiser, Prediction, check_call, take_wrapped_rows
from ..noise import Generators, check_fixed_time, check_generators, make_noise, randn
from ..processes import Process
from ..solvers.base import DIVERGED, NonFiniteError
from .base import MoveGuard, Point, Target, _chain_bound, _value_and_grad, chain, fixed_time
from .langevin import ULA

__all__ = ["MonteCarloDenoiser"]


def _first(t: float | Tensor) -> float:
    """The (first) time of a call, for messages."""
    return float(torch.as_tensor(t).flatten()[0])


def _per_row(c: float | Tensor) -> float | Tensor:
    """A coefficient of :meth:`Denoiser.coefficients` (a float, or ``(n, 1, ...)`` per row) for draws shaped
    ``(n, samples, ...)``: a per-row tensor gets the draws' dimension."""
    return c.unsqueeze(1) if isinstance(c, Tensor) else c


class MonteCarloDenoiser(Denoiser):
    r"""The denoiser ``E[x0 | x_t]`` of the unnormalized density ``exp(log_prob(x0))``, by Monte Carlo under
    the posterior ``q(x0 | x_t) ∝ p(x0) N(x_t; alpha x0, sigma^2 I)`` (Reverse Diffusion Monte Carlo,
    Huang et al., ICLR 2024; the math, the two methods and the cost in the module docstring). A
    :class:`~steerdiff.denoiser.Denoiser`: every solver, guidance and particle method takes it.

    Args:
        log_prob: ``log_prob(x0) -> (m,)``, the target's log-density up to a constant at ``m`` points
            ``(m, *shape)``; differentiable for ``method="langevin"``, and for ``"importance"`` where the
            estimate is differentiated in ``x`` (DPS-like guidance: the weights' derivative gives
            ``d x0_hat / d x``, a consistent estimate of ``(alpha / sigma^2) Cov_q[x0]``; ``"langevin"``
            estimates it over its chains, module docstring). ``-inf`` outside the support is
            accepted (weight 0); a NaN or ``+inf``, or ``-inf`` at every draw of a row (``"importance"``),
            or NaN or a non-finite gradient where it is finite at a point a chain visited
            (``"langevin"``), is a ``ValueError`` at that call on the CPU; on an accelerator, where a
            call reads nothing from the device, it makes the estimate NaN, which the sampler reports at
            the end of its run (:class:`~steerdiff.NonFiniteError` naming the step) and
            :meth:`warm_start` at its end.
        process: the forward process; its ``alpha`` must be positive on the grid used.
        shape: the shape of one sample.
        samples: Monte Carlo draws per row and call (an integer >= 1).
        method: ``"importance"`` (default) or ``"langevin"``.
        inner: ULA moves per draw (an integer >= 1); only with ``method="langevin"``.
        step_size: ULA's step on the target, ``h = 1 / (1 / step_size + alpha^2 / sigma^2)`` at each noise
            level (a number > 0); only with ``method="langevin"``, required there.
        generator: the draws' source: one ``torch.Generator``, a list with one per row (row ``b``'s draws from
            ``generator[b]``: a row's estimate is then the same whatever its batch) or ``None`` (torch's
            global RNG; a seeded sampler refuses it: :func:`~steerdiff.sampling.check_seeded`).

    Attributes:
        cost: target evaluations per row of the latest call (``samples``, or ``samples * inner``; ``samples *
            (inner + 1)`` for a ``"langevin"`` call differentiated in ``x``).
        ess: ``(n,)`` float64, the effective sample size ``1 / sum_i wbar_i^2`` of the normalized weights of
            the latest call (``method="importance"``; ``None`` before a call and for ``"langevin"``).
    """

    METHODS = ("importance", "langevin")
    noise_generators = ("generator",)

    def __init__(
        self,
        log_prob: Callable[[Tensor], Tensor],
        process: Process,
        shape: tuple[int, ...],
        samples: int = 256,
        method: str = "importance",
        inner: int | None = None,
        step_size: float | None = None,
        generator: Generators = None,
    ) -> None:
        who = "MonteCarloDenoiser"
        if not callable(log_prob):
            raise ValueError(
                f"{who}: log_prob must be callable as log_prob(x0) -> (m,), got {log_prob!r:.60}"
            )
        if not isinstance(process, Process):
            raise ValueError(f"{who}: process must be a steerdiff Process, got {type(process).__name__}")
        self.samples = integer(who, "samples", samples, lo=1)
        self.method = choice(who, "method", method, self.METHODS)
        if self.method == "importance":
            given = [k for k, v in (("inner", inner), ("step_size", step_size)) if v is not None]
            if given:
                raise ValueError(
                    f"{who}: {' and '.join(given)} are for method='langevin' (its ULA moves), not "
                    "'importance'"
                )
            self.inner, self.step_size = None, None
            cost = self.samples
        else:
            if inner is None or step_size is None:
                raise ValueError(
                    f"{who}: method='langevin' needs inner (ULA moves per draw, an integer >= 1) and "
                    "step_size (a number > 0)"
                )
            self.inner = integer(who, "inner", inner, lo=1)
            self.step_size = real(who, "step_size", step_size, lo=0, lo_open=True)
            cost = self.samples * self.inner
        self.generator = check_generators(who, generator)
        super().__init__(log_prob, process, "x0", shape=sizes(who, "shape", shape))
        self.log_prob = log_prob
        self.cost = cost
        self.ess: Tensor | None = None

    def own_noise(self) -> list[tuple[str, Generators]]:
        """The Monte Carlo draws': ``[("MonteCarloDenoiser", generator)]``."""
        return [("MonteCarloDenoiser", self.generator)]

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy whose per-row generators (a list of ``n``) are taken at ``rows``; itself otherwise."""
        return take_wrapped_rows(self, rows, n, ())

    def _evaluate(
        self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, cond: dict[str, Any]
    ) -> Prediction:
        who = type(self).__name__
        if cond:
            raise ValueError(f"{who}: log_prob takes no conditions, got {sorted(cond)}")
        if x.shape[1:] != self.shape:
            raise ValueError(f"{who}: x must be (batch, *{self.shape}), got {tuple(x.shape)}")
        a, s, _, _ = self.coefficients(t, x)
        n, m = x.shape[0], self.samples
        z = randn((n, m, *x.shape[1:]), self.generator, x.dtype, x.device)
        ar, sr = _per_row(a), _per_row(s)
        y = (x.unsqueeze(1) + sr * z) / ar  # the Gaussian factor of q: N(x / alpha, (sigma / alpha)^2 I)
        if self.method == "importance":
            lp = self.log_prob(y.reshape(n * m, *x.shape[1:]))
            if not isinstance(lp, Tensor) or tuple(lp.shape) != (n * m,):
                got = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise ValueError(f"{who}: log_prob must return a ({n * m},) tensor, got {got}")
            lp = lp.to(torch.float64).reshape(n, m)  # not detached: the weights carry d x0 / d x (below)
            # NaN, +inf, or no draw of a row in the support: the weights are 0 / 0 and the row's estimate NaN.
            # Read at once on the CPU; on an accelerator that NaN estimate is the sampler's to report, at the
            # end of its run (solvers.base.Model: no device read per call)
            if lp.is_cpu and bool((lp.isnan() | (lp == torch.inf)).any() | (lp == -torch.inf).all(1).any()):
                raise ValueError(
                    f"{who}: log_prob must return finite numbers or -inf (outside the support), with a "
                    f"finite one among each row's {m} draws; got NaN or +inf, or -inf at every draw of a row "
                    f"(take more samples), at t={_first(t):g}"
                )
            w = torch.softmax(lp, dim=1)
            self.ess = 1 / w.detach().pow(2).sum(1)
            x0 = torch.einsum("nm,nm...->n...", w, y.to(torch.float64))
        else:
            assert self.inner is not None, "set for method='langevin'"
            chains, ok = self._langevin(x.detach(), y.detach(), ar, sr)
            # a chain that diverged (the divergence guard: a move's state NaN/inf or beyond DIVERGED max(1,
            # max |y|) of the draws it started from, the log_prob sound until then), or a NaN log_prob, or a
            # non-finite gradient where it is finite, at a point a chain visited (ULA reads the gradient
            # alone: a NaN value would pass silently): read at once on the CPU; on an accelerator the
            # estimate is made NaN, for the sampler to report at the end of its run (naming the step)
            sound = ok.all()
            first = first_false(ok.all(0)) if ok.is_cpu else None
            if first is not None and bool(ok[1, first]):
                raise NonFiniteError(
                    f"{who}: an inner chain diverged at its move {first + 1} of {self.inner} (an entry "
                    f"NaN/inf or beyond {DIVERGED:g} max(1, max |y|) of the draws it started from, the "
                    f"log_prob sound until then): step_size={self.step_size:g} is too large for this "
                    f"log_prob: take a smaller step_size (at t={_first(t):g})"
                )
            if first is not None:
                raise ValueError(
                    f"{who}: log_prob must return finite numbers or -inf (outside the support), with a "
                    "finite gradient where it is finite; got NaN or a non-finite gradient at a point a chain "
                    f"visited (or the chains left the finite numbers: take a smaller step_size), at "
                    f"t={_first(t):g}"
                )
            x0 = torch.where(sound, chains.mean(1), torch.nan)
            differentiated = x.requires_grad and torch.is_grad_enabled()
            if differentiated:
                x0 = x0 + self._stein_jvp(chains, x0, x - x.detach(), a)
            self.cost = m * (self.inner + int(differentiated))
        return Prediction(x, a, s, x0=x0.to(x.dtype))

    def _stein_jvp(self, chains: Tensor, mean: Tensor, dx: Tensor, a: float | Tensor) -> Tensor:
        """``(dx + C dx) / alpha`` with ``C`` the chains' sample covariance of ``x0`` and ``grad log p(x0)``
        (per row): zero (``dx = x - sg[x]``), its derivative in ``x`` the estimate of ``d E_q[x0] / dx =
        (I + E_q[(x0 - x0_hat) grad log p(x0)^T]) / alpha`` (module docstring). One gradient of ``log_prob``
        per chain; a ``ValueError`` for ``samples = 1``."""
        who, m = type(self).__name__, self.samples
        if m < 2:
            raise ValueError(
                f"{who}: method='langevin' estimates d x0_hat / dx from a covariance over its chains, which "
                "needs samples >= 2, got samples=1"
            )
        n = chains.shape[0]
        flat = chains.reshape(n * m, *chains.shape[2:])
        _, score = _value_and_grad(self.log_prob, flat, f"{who}: log_prob")
        c = (chains - mean.unsqueeze(1)).flatten(2)  # (n, m, D)
        proj = torch.einsum("nmd,nd->nm", score.reshape(n, m, -1), dx.flatten(1).to(c.dtype))
        return (dx + (torch.einsum("nm,nmd->nd", proj, c) / (m - 1)).reshape(mean.shape)) / a

    def _langevin(self, x: Tensor, y: Tensor, a: float | Tensor, s: float | Tensor) -> tuple[Tensor, Tensor]:
        """``inner`` ULA moves on ``log q(. | x)`` from the draws ``y`` ``(n, samples, ...)``: last states,
        and ``(2, inner)`` bool flags (no device read): after each move, whether every state is within the
        divergence guard's ``DIVERGED max(1, max |y|)`` (:func:`~steerdiff.mcmc.base._chain_bound`; so
        finite), and whether no ``log_prob`` evaluation so far was NaN or had a non-finite gradient where
        finite (:attr:`~steerdiff.mcmc.base.Target.sound`)."""
        assert self.inner is not None and self.step_size is not None, "set for method='langevin'"
        n, m, shape = x.shape[0], self.samples, x.shape[1:]
        flat = (n * m, *shape)
        a2, s2 = a * a, s * s
        h = 1 / (1 / self.step_size + a2 / s2)
        xs, log_prob = x.unsqueeze(1), self.log_prob

        def log_q(v: Tensor) -> Tensor:
            r = (xs - a * v.reshape(n, m, *shape)).reshape(n * m, -1)
            scale = s2.reshape(n, 1).expand(n, m).reshape(-1) if isinstance(s2, Tensor) else s2
            return log_prob(v) - r.pow(2).sum(-1) / (2 * scale)

        def normal(like: Tensor) -> Tensor:
            return randn((n, m, *shape), self.generator, like.dtype, like.device).reshape(like.shape)

        step = (
            h.expand(n, m, *([1] * len(shape))).reshape(n * m, *([1] * len(shape)))
            if isinstance(h, Tensor)
            else h
        )
        target = Target(log_prob=log_q, name=f"{type(self).__name__}: log_prob(x0)")
        guard = MoveGuard(_chain_bound(y), lambda: target.sound)
        out, _ = chain(ULA(), Point(y.reshape(flat)), target, self.inner, step, normal, moved=guard)
        return out.reshape(n, m, *shape), guard.flags()

    def warm_start(
        self, x: Tensor, t: float, moves: int, step_size: float, generator: Generators = None
    ) -> Tensor:
        """``moves`` ULA moves on ``p_t`` from ``x``, the score ``-eps / sigma`` of this denoiser at ``t``:
        rdMC's initialization of its early-stopped reverse process (module docstring), e.g. from
        ``x = sigma(t) * randn`` at the process's ``t_max``. Costs ``moves * cost`` target evaluations a row.
        ``generator``: the moves' noise (one, or one per row of ``x``; the estimates draw from the denoiser's
        own). A move whose state is NaN/inf or beyond ``1e8 max(1, max |x|)`` (the divergence guard, as
        :meth:`~steerdiff.mcmc.Kernel.run`'s) is a :class:`~steerdiff.NonFiniteError` naming the move and
        ``step_size`` where the score estimates were finite until then, else a ``ValueError`` (one device
        read per warm start)."""
        who = f"{type(self).__name__}.warm_start"
        check_call(who, x, t)
        moves = integer(who, "moves", moves, lo=1)
        step_size = real(who, "step_size", step_size, lo=0, lo_open=True)
        check_fixed_time(who, generator, "pass a torch.Generator or a list of them (one per row)")
        noise = make_noise(check_generators(who, generator, x.shape[0]), who)
        sigma = float(self.process.sigma(torch.tensor(float(t), dtype=torch.float64)))
        finite: list[Tensor] = []  # whether each score estimate is finite (NaN from a call on an accelerator)

        def score(v: Tensor) -> Tensor:
            eps = self(v, t).eps
            finite.append(torch.isfinite(eps).all() if not finite else finite[-1] & torch.isfinite(eps).all())
            return eps * (-1 / sigma)

        # the divergence guard on each move (as Kernel.run's): its state within DIVERGED max(1, max |x|)
        guard = MoveGuard(_chain_bound(x), lambda: finite[-1])
        out, _ = chain(
            ULA(), Point(x), Target(score=score), moves, step_size, fixed_time(noise, float(t)), moved=guard
        )
        # one read per warm start (on the CPU a call raised at once): the estimates' NaN on an accelerator
        bad = guard.first_bad()
        if bad is not None and bad[1]:
            raise NonFiniteError(
                f"{who}: the chain diverged at its move {bad[0] + 1} of {moves} (an entry NaN/inf or beyond "
                f"{DIVERGED:g} max(1, max |x|) of the start x, the score estimates finite until then): "
                f"step_size={step_size:g} is too large for this target at t={float(t):g}: take a smaller "
                "step_size"
            )
        if bad is not None:
            raise ValueError(
                f"{who}: the moves reached NaN/inf: log_prob returned NaN or +inf, or -inf at every draw "
                "of a row, or a non-finite gradient (method='langevin'), or the moves diverged (take a "
                f"smaller step_size than {step_size:g})"
            )
        return out

    def __repr__(self) -> str:
        extra = "" if self.method == "importance" else f", inner={self.inner}, step_size={self.step_size:g}"
        return (
            f"MonteCarloDenoiser(samples={self.samples}, method={self.method!r}{extra}, "
            f"process={self.process!r})"
        )
