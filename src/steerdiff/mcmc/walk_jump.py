r"""Walk-jump sampling with accumulated measurements: a chain of log-concave Markov chains.

Saremi, Park & Bach 2024 (ICLR), "Chain of Log-Concave Markov Chains"; the case ``m = 1`` is walk-jump
sampling (Saremi & Hyvarinen 2019, "Neural Empirical Bayes", JMLR 20). A sampler of the data law
``p(x)`` of a denoiser at **one** noise scale ``sigma``, through ``m`` noisy measurements of the same
``x``,

    y_k = x + sigma n_k,   n_k ~ N(0, I) independent,   k = 1, ..., m.

Since ``prod_k N(y_k; x, sigma^2 I) ∝ exp(-sum_k |y_k - ybar|^2 / (2 sigma^2)) N(ybar; x, sigma^2 I / k)``
with ``ybar = (y_1 + ... + y_k) / k``, the measurements reach ``x`` only through their running mean, a
single measurement at noise ``sigma / sqrt(k)``:

    log p(y_1..y_k) = -sum_j |y_j - ybar|^2 / (2 sigma^2) + log p_{sigma/sqrt(k)}(ybar) + const,

and with Tweedie's formula ``grad log p_s(ybar) = (E[x | ybar; s] - ybar) / s^2`` the score of the
``k``-th conditional is

    grad_{y_k} log p(y_k | y_1..y_{k-1}) = (xhat(ybar_k; sigma / sqrt(k)) - y_k) / sigma^2,     (1)

``xhat(y; s) = E[x | x + s n = y]``, the denoiser at noise ``s`` evaluated at the running mean
``ybar_k = ybar_{k-1} + (y_k - ybar_{k-1}) / k`` (which moves with ``y_k``). Its Hessian is
``(Cov[x | y_1..y_k] / sigma^2 - I) / sigma^2``: each conditional is log-concave wherever the posterior
covariance is below ``sigma^2 I`` -- everywhere once ``sigma`` exceeds the radius of a ball holding the
data (``Cov <= R^2 I`` there), the paper's log-concavity result, and more so as ``k`` grows -- and
``1 / sigma^2``-smooth there. The **walk** samples ``y_1 ~ p(y_1)``
(``p_sigma``, the data smoothed at ``sigma``), then ``y_2 ~ p(y_2 | y_1)``, ..., ``y_m``, each by a
Langevin chain on the score (1); the **jump** is the empirical-Bayes estimate

    xhat = E[x | y_1..y_m] = xhat(ybar_m; sigma / sqrt(m)).

With every conditional sampled exactly, ``ybar_m`` is an exact draw of ``x + (sigma / sqrt(m)) n`` and the
jump its posterior mean: the output's law approaches ``p(x)`` as ``sigma / sqrt(m) -> 0`` (a posterior mean
is smoother than a draw), while ``sigma`` itself may stay large enough for every chain to be log-concave.
So modes are weighted as the chain on ``y_1`` weights them, on the smoothed ``p_sigma``, where they are not
separated (the paper's "tunneling"); that first chain, the least concentrated, is the one that needs the
steps (``tests/test_walk_jump.py``).

**Kernels** (``kernel=``), both preconditioned by ``u = sigma^2``, the inverse of the conditionals'
smoothness constant ``L = 1 / sigma^2`` (Cheng et al. 2018's ``u = 1 / L``), so that ``step_size`` ``h``
is free of the data's scale:

* ``"ulmc"`` (default, the paper's): the underdamped Langevin diffusion ``dy = v dt``, ``dv = -gamma v dt +
  u grad log p(y) dt + sqrt(2 gamma u) dW`` (stationary law ``p(y) N(v; 0, u I)``) discretized as Sachs,
  Leimkuhler & Danos 2017 do (the walk of Saremi & Srivastava 2022, "Multimeasurement Generative Models",
  Alg. 1), with ``eta = exp(-gamma h)``::

      y <- y + h v / 2;   psi = grad log p(y)
      v <- eta (v + u h psi / 2) + u h psi / 2 + sqrt(u (1 - eta^2)) z;   y <- y + h v / 2

  ``gamma = friction`` (default 2, Cheng et al.'s), ``v = 0`` at the start of the walk and carried from
  one measurement's chain to the next (at stationarity it is ``N(0, u I)`` independent of ``y``, the next
  chain's stationary velocity law, ``u`` being the same). Default ``h = 0.5``.
* ``"ula"``: the overdamped step of :class:`~steerdiff.mcmc.ULA`, ``y <- y + eps grad log p(y) + sqrt(2 eps)
  z`` with ``eps = h sigma^2``. Default ``h = 0.1``.

The chain of ``y_1`` starts at ``y_init`` (default ``sigma z``, ``z ~ N(0, I)``: the smoothing noise
around the origin), that of ``y_k`` at ``y_{k-1}`` (a warm start, free of evaluations).

**Time of a noise level.** For ``x_t = alpha(t) x_0 + sigma(t) eps``, ``x_t / alpha`` is ``x_0`` plus noise
``sigma(t) / alpha(t)``: the denoiser at noise ``s`` is the denoiser's ``x0`` at ``alpha(t_s) ybar`` and
``t_s = process.t_of_sigma_ratio(s)``. Every ``sigma / sqrt(k)``, ``k = 1..m``, must lie in the process's
range ``[sigma_ratio(t_min), sigma_ratio(t_max)]`` (a ``ValueError`` otherwise). For a
:class:`~steerdiff.processes.MeanReverting` denoiser the samples are of ``x - mu``, as every solver's.

**Cost** (NFE, each a call of the denoiser, ``den.cost`` network evaluations): ``steps_per_measurement``
per measurement (one score (1) per ULA move or ULMC step) and one for the jump, ``m *
steps_per_measurement + 1`` in all, exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, device_or_none, integer, real, sample_dtype, sizes
from ..denoiser import Denoiser, check_denoiser, check_sample_shape
from ..noise import Generators, check_generators, make_noise, randn
from ..processes import Process
from ..solvers.base import DIVERGED, Model, NonFiniteError
from .base import Normal, Point, Target, chain, fixed_time
from .langevin import ULA

__all__ = ["KERNELS", "WalkJump", "measurement_time", "walk_jump", "walk_jump_score"]

KERNELS = ("ulmc", "ula")
_DEFAULT_STEP = {"ulmc": 0.5, "ula": 0.1}
_DEFAULT_FRICTION = 2.0
# sample's keyword arguments that the chains (walk-jump's, Denoising MCMC's) have no use for: in **cond they
# would reach the net as conditions; refused by name (denoising_mcmc takes a solver of its own)
CHAIN_SAMPLE_ONLY = (
    "steps",
    "schedule",
    "final",
    "callback",
    "corrector",
    "corrector_steps",
    "snr",
    "progress",
    "return_info",
)
CHAIN_SAMPLE_ONLY_WHY = (
    "which runs Langevin chains, not sample's steps; "
    "the other keyword arguments are the net's conditions (**cond)"
)


# A score step |xhat - y| (per entry) beyond DIVERGED * sigma is a diverged chain (DIVERGED: the library's
# divergence guard, steerdiff.solvers.base): at a sampled state the residual is of the order of sigma (a few
# sigma per entry: y is x plus sigma-noise), and a chain started 3e7 sigma away from the data comes back with
# a stable step (tests/test_walk_jump.py); an unstable one grows it geometrically until the denoiser, or the
# state, overflows (the exact mixture's denoiser returns NaN at |y| ~ 1e154 in float64, one step before the
# state overflows; then reported as the model's NaN, or, with ULA, a state of 1e89 returned as a sample).


@dataclass
class WalkJump:
    """What :func:`walk_jump` returns.

    Attributes:
        x: the jump ``E[x | y_1..y_m]``, ``(batch, *sample_shape)``: the samples.
        y_mean: the running mean ``ybar_m`` of the measurements (a draw of ``x + (sigma / sqrt(m)) n``
            where every chain mixed).
        nfe: denoiser evaluations (network calls), ``m * steps_per_measurement + 1`` times ``den.cost``.
    """

    x: Tensor
    y_mean: Tensor
    nfe: int


def measurement_time(process: Process, sigma: float, k: int, who: str = "walk_jump") -> float:
    """The process time ``t`` at which ``sigma(t) / alpha(t) = sigma / sqrt(k)`` (the noise of the mean of
    ``k`` measurements); a ``ValueError`` naming ``who`` where the process does not reach it (or where
    ``sigma`` is not a finite number > 0, ``k`` not an integer >= 1)."""
    sigma = real(who, "sigma", sigma, lo=0, lo_open=True)
    s = sigma / math.sqrt(integer(who, "k", k, lo=1))
    lo, hi = (float(process.sigma_ratio(t)) for t in (process.t_min, process.t_max))
    if not lo <= s <= hi:
        raise ValueError(
            f"{who}: the noise sigma / sqrt(k) = {s:.6g} (sigma={sigma:g}, k={k}) is outside the denoiser's "
            f"range of sigma(t) / alpha(t), [{lo:.6g}, {hi:.6g}] on t in [{process.t_min:g}, "
            f"{process.t_max:g}]: take sigma <= {hi:.6g} and sigma / sqrt(measurements) >= {lo:.6g}"
        )
    return min(max(float(process.t_of_sigma_ratio(s)), process.t_min), process.t_max)


def initial_state(
    who: str,
    shape: tuple[int, ...],
    scale: float,
    y_init: Tensor | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    generator: Generators,
) -> Tensor:
    """A chain's start in variance-exploding coordinates: ``y_init`` (a floating-point tensor of ``shape``,
    whose dtype and device are the run's; finite; ``dtype`` and ``device`` refused beside it), or ``scale z``,
    ``z ~ N(0, I)`` from ``generator`` in ``dtype`` (default float32) on ``device``; a ``ValueError`` naming
    ``who`` otherwise."""
    if y_init is None:
        kind = torch.float32 if dtype is None else sample_dtype(who, "dtype", dtype)
        return scale * randn(shape, generator, kind, device_or_none(who, "device", device))
    if dtype is not None or device is not None:
        raise ValueError(f"{who}: dtype and device are y_init's where it is given; pass neither beside it")
    if not isinstance(y_init, Tensor) or not y_init.is_floating_point() or tuple(y_init.shape) != shape:
        got = f"shape {tuple(y_init.shape)}" if isinstance(y_init, Tensor) else type(y_init).__name__
        raise ValueError(f"{who}: y_init must be a floating-point tensor of shape {shape}, got {got}")
    if not bool(torch.isfinite(y_init).all()):  # else reported as the model's NaN at its first evaluation
        raise ValueError(f"{who}: y_init contains NaN or inf")
    return y_init


def _score(model: Model, y: Tensor, previous: Tensor, k: int, sigma: float, t: float, alpha: float) -> Tensor:
    """Eq. (1) at ``y_k = y`` given the mean ``previous`` of ``y_1..y_{k-1}`` (ignored for ``k = 1``): one
    counted call of ``model`` at ``t``, the time of noise ``sigma / sqrt(k)`` (``alpha = alpha(t)``)."""
    mean = previous + (y - previous) / k
    return (model(alpha * mean, t, k).x0 - y) / sigma**2


def walk_jump_score(
    den: Denoiser, y: Tensor, previous_mean: Tensor | None, k: int, sigma: float, **cond: Any
) -> Tensor:
    """The score (1) of ``p(y_k | y_1..y_{k-1})`` at ``y_k = y``: ``(xhat(ybar_k; sigma / sqrt(k)) - y) /
    sigma^2``, ``ybar_k = ((k - 1) previous_mean + y) / k``; ``previous_mean`` is the mean of ``y_1..y_{k-1}``
    (``None`` for ``k = 1``, where it is the score of ``p_sigma``). One call of ``den`` (``**cond`` passed to
    its net)."""
    who = "walk_jump_score"
    check_denoiser(who, "den", den)
    k = integer(who, "k", k, lo=1)
    sigma = real(who, "sigma", sigma, lo=0, lo_open=True)
    if not isinstance(y, Tensor) or y.ndim == 0 or not y.is_floating_point():
        raise ValueError(f"{who}: y must be a floating-point tensor of shape (batch, ...), got {y!r:.60}")
    check_sample_shape(f"{who}: y", den, tuple(y.shape[1:]))
    if (previous_mean is None) != (k == 1):
        raise ValueError(f"{who}: previous_mean must be None for k = 1 and a tensor of y's shape for k > 1")
    if previous_mean is not None and (
        not isinstance(previous_mean, Tensor) or previous_mean.shape != y.shape
    ):
        got = (
            tuple(previous_mean.shape) if isinstance(previous_mean, Tensor) else type(previous_mean).__name__
        )
        raise ValueError(f"{who}: previous_mean must have y's shape {tuple(y.shape)}, got {got}")
    t = measurement_time(den.process, sigma, k, who)
    previous = y if previous_mean is None else previous_mean
    return _score(Model(den, cond), y, previous, k, sigma, t, float(den.process.alpha(t)))


def _diverged(
    step: int,
    t: float,
    *,
    chain_step: int | None,
    what: str,
    kernel: str,
    h: float,
    sigma: float,
    before: bool = False,
) -> NonFiniteError:
    """The error for a walk that diverged in measurement ``step``'s chain at its step ``chain_step`` (or,
    ``before``, in a step before it, found as that step's input; ``None``: after its last), at process time
    ``t``, where ``what`` happened."""
    at = (
        "after its last step"
        if chain_step is None
        else f"{'before' if before else 'at'} its step {chain_step}"
    )
    return NonFiniteError(
        f"walk_jump: the Langevin chain of measurement {step} diverged {at} (process time t={t:.6g}, "
        f"sigma={sigma:g}; the model's outputs finite until then): {what}; step_size={h:g} is too large for "
        f"kernel={kernel!r} here: take a smaller step_size"
    )


def _watched(
    model: Model, score: Callable[[Tensor], Tensor], k: int, t: float, sigma: float, error: Callable[..., Any]
) -> Callable[[Tensor], Tensor]:
    """``score`` of measurement ``k``'s chain, the state and the score checked at each call (the chain's
    steps, from 1) with the model's outputs (:meth:`~steerdiff.solvers.base.Model.note_move`: read at once
    on the CPU, at the end of the run elsewhere): a state that is not finite (recorded before the call, so
    that it, not the model's NaN on it, is reported), a score ``psi`` whose step ``sigma^2 |psi| = |xhat -
    y|`` exceeds ``DIVERGED * sigma`` in an entry or is not finite (after it: the model's own NaN is the
    model's) raise ``error`` (:func:`_diverged` with the run's arguments)."""
    calls = 0
    state = "the state became NaN/inf"
    far = (
        f"the score's step |xhat - y| exceeded {DIVERGED:g} sigma or was not finite (the state is far "
        "outside the data smoothed at sigma)"
    )

    def watched(y: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        model.note_move(
            torch.isfinite(y).all(), k, t, functools.partial(error, chain_step=calls, what=state, before=True)
        )
        psi = score(y)
        big = psi.detach().abs().amax().to(torch.float32) <= DIVERGED / sigma  # False for NaN
        model.note_move(big, k, t, functools.partial(error, chain_step=calls, what=far))
        return psi

    return watched


def _underdamped(
    y: Tensor,
    v: Tensor,
    score: Callable[[Tensor], Tensor],
    steps: int,
    h: float,
    friction: float,
    u: float,
    normal: Normal,
) -> tuple[Tensor, Tensor]:
    """``steps`` steps of the Sachs et al. (2017) discretization of underdamped Langevin (module docstring)
    from ``(y, v)``; one score evaluation each."""
    eta = math.exp(-friction * h)
    kick, spread = u * h / 2, math.sqrt(u * -math.expm1(-2 * friction * h))
    for _ in range(steps):
        y = y + (h / 2) * v
        psi = score(y)
        v = eta * (v + kick * psi) + kick * psi + spread * normal(y)
        y = y + (h / 2) * v
    return y, v


def walk_jump(
    den: Denoiser,
    shape: Sequence[int],
    sigma: float,
    measurements: int,
    steps_per_measurement: int,
    *,
    kernel: str = "ulmc",
    step_size: float | None = None,
    friction: float | None = None,
    y_init: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **cond: Any,
) -> WalkJump:
    """Samples of ``den``'s data law by walk-jump sampling with ``measurements`` accumulated measurements at
    noise ``sigma`` (Saremi, Park & Bach 2024; module docstring for the equations).

    Args:
        den: any :class:`~steerdiff.denoiser.Denoiser`; called at the times of noise ``sigma / sqrt(k)``.
        shape: ``(batch, *sample_shape)``.
        sigma: the measurement noise, ``> 0``; ``sigma`` and ``sigma / sqrt(measurements)`` within the
            process's range of ``sigma(t) / alpha(t)``.
        measurements: ``m >= 1`` (1: walk-jump sampling).
        steps_per_measurement: Langevin steps per measurement's chain, ``>= 1``.
        kernel: ``"ulmc"`` (underdamped, the paper's) or ``"ula"``.
        step_size: ``h``, in units where the conditionals' curvature is at most 1 (``u = sigma^2``); default
            0.5 for ``"ulmc"``, 0.1 for ``"ula"`` (ULA's step ``eps = h sigma^2``).
        friction: ``gamma`` of ``"ulmc"`` (default 2); refused with ``"ula"``.
        y_init: where the chain of ``y_1`` starts, of ``shape`` (default ``sigma z``); its dtype and device
            are the samples'.
        dtype, device: of the samples where ``y_init`` is not given (default float32, the generator's device);
            refused beside ``y_init``.
        generator: one ``torch.Generator``, or a list with one per sample (a sample is then the same
            whatever its batch), for every draw. Given, a part of ``den`` that draws noise of its own
            (``den.own_noise()``: a ``MonteCarloDenoiser``, guidance wrappers) must have a generator too, one
            per row where this is (:func:`~steerdiff.sampling.check_seeded`; a ``ValueError`` otherwise).
        **cond: passed to the net at every call.

    Returns:
        :class:`WalkJump`: ``x`` (the samples), ``y_mean``, ``nfe = m * steps_per_measurement + 1`` calls.

    Raises:
        NonFiniteError: the model returned NaN/inf (naming the measurement and evaluation), or a chain
            diverged (too large a ``step_size``: naming the measurement, the chain step and the step size):
            a state not finite, or a score step ``|xhat - y|`` beyond ``1e8 sigma`` in an entry (read with
            the model's flags: at once on the CPU, at the end of the run elsewhere).

    >>> out = sd.mcmc.walk_jump(den, (1000, 2), 4.5, measurements=32, steps_per_measurement=40, generator=g)
    """
    from ..sampling import check_sample_only, check_seeded  # sampling imports this package: here, once loaded

    who = "walk_jump"
    check_denoiser(who, "den", den)
    check_sample_only(who, cond, (*CHAIN_SAMPLE_ONLY, "solver"), CHAIN_SAMPLE_ONLY_WHY)
    shape = sizes(who, "shape", shape)
    if len(shape) < 2:
        raise ValueError(f"{who}: shape must be (batch, *sample_shape), at least 2 entries, got {shape}")
    check_sample_shape(f"{who}: shape", den, shape[1:])
    sigma = real(who, "sigma", sigma, lo=0, lo_open=True)
    m = integer(who, "measurements", measurements, lo=1)
    steps = integer(who, "steps_per_measurement", steps_per_measurement, lo=1)
    kernel = choice(who, "kernel", kernel, KERNELS)
    h = _DEFAULT_STEP[kernel] if step_size is None else real(who, "step_size", step_size, lo=0, lo_open=True)
    if kernel == "ula" and friction is not None:
        raise ValueError(f"{who}: friction is a parameter of kernel='ulmc', not of kernel='ula'")
    gamma = _DEFAULT_FRICTION if friction is None else real(who, "friction", friction, lo=0, lo_open=True)
    generator = check_generators(who, generator, shape[0])
    check_seeded(den, generator, who)  # a part of den drawing noise the seed does not reach, or not per row
    times = [measurement_time(den.process, sigma, k, who) for k in range(1, m + 1)]
    alphas = [float(den.process.alpha(t)) for t in times]
    y = initial_state(who, shape, sigma, y_init, dtype, device, generator)
    source = make_noise(generator)
    model = Model(den, cond)
    total = torch.zeros_like(y)  # y_1 + ... + y_{k-1}
    v = torch.zeros_like(y)
    error = functools.partial(_diverged, kernel=kernel, h=h, sigma=sigma)
    for k, (t, alpha) in enumerate(zip(times, alphas, strict=True), start=1):
        previous = total / max(k - 1, 1)
        exact = functools.partial(_score, model, previous=previous, k=k, sigma=sigma, t=t, alpha=alpha)
        score = _watched(model, exact, k, t, sigma, error)
        normal = fixed_time(source, t)
        if kernel == "ulmc":
            y, v = _underdamped(y, v, score, steps, h, gamma, sigma**2, normal)
        else:
            y, _ = chain(ULA(), Point(y), Target(score=score), steps, h * sigma**2, normal)
        total = total + y
    last = functools.partial(error, chain_step=None, what="the state became NaN/inf")  # ybar_m's input
    model.note_move(torch.isfinite(y).all(), m, times[-1], last)
    y_mean = total / m
    x = model(alphas[-1] * y_mean, times[-1], m).x0
    model.check_finite()
    return WalkJump(x, y_mean, model.nfe)
