r"""``steerdiff bench steer``: inference-time steering against exact targets, at matched NFE.

Every target is ``pi(x) ∝ p(x) exp(lam r(x))`` for a Gaussian-mixture prior ``p`` (used through its
exact denoiser under DDPM's linear betas, :func:`steerdiff.bench.posterior.ddpm_process`), and is
itself a Gaussian mixture (:data:`CASES`):

* ``nine_quadratic``: the 2-D nine-mode mixture (means ``{-4, 0, 4}^2``, variance 0.3), ``r(x) =
  -x1^2/100 - x2^2``, ``lam = 1`` (:meth:`~steerdiff.toy.GaussianMixture.tilt`; ``E_pi[r] = -0.2907``);
* ``gmm16_linear``: the 16-d, 8-component prior of ``steerdiff bench posterior`` (``gmm16``),
  ``r(x) = c^T x`` for a fixed random unit ``c``, ``lam = 2``;
* ``nine_class``: the nine-mode mixture conditioned on its class "top row" (``x2 = 4``):
  ``r(x) = log p(c | x)`` (the exact classifier), ``lam = 1``, so ``pi = p(x | c)``;
* ``gmm16_posterior``: the guidance issue's 16-d posterior case (``bench posterior``'s ``gmm16``,
  ``d_y = 2``, ``s = 0.1``, :func:`~steerdiff.bench.posterior.make_case`): ``r(x) = log N(y; A x, s^2 I)``,
  ``lam = 1``, ``pi = p(x | y)``.

Budget: NFE per returned sample ``B`` in :data:`NFES`. The particle methods run ``steps = 100``
DDPM steps (``time_uniform``) with ``N = B / 100`` particles per returned sample (FK correctors, two
networks per step: ``N = B / 200``; DriftLite, two networks and two divergence backward passes per step:
``N = B / 400``), and return one sample per batch row (``out.sample()``); DTS grows one tree per returned
sample with ``B / 100`` rollouts; DPS runs ``B`` DDPM steps. Methods (:data:`METHODS`):

* ``fk_difference``, ``fk_max``: :func:`~steerdiff.smc.fk_steering` with ``lam`` and that potential
  (resampling at every step);
* ``tds``: :func:`~steerdiff.smc.tds` with the likelihood ``exp(lam r)`` (the linear-Gaussian twist
  on the posterior case, ``log_likelihood = lam r`` elsewhere);
* ``svdd``: :func:`~steerdiff.smc.svdd` with ``alpha = 1 / lam`` and ``M = N`` (``B - N + 1`` NFE: its
  node 0 evaluates the one ``x_T`` of a row once, as CoDe's);
* ``dts``: :func:`~steerdiff.smc.dts` (Diffusion Tree Sampling) with ``lam``, the paper's widening
  ``(2, 0.8)`` (not tuned: no method's knobs but DPS's scale are) and ``B / 100`` rollouts, one draw per
  tree. That widening branches at the root for the first 31 rollouts, each then a full 100-step run
  (``B`` NFE exactly at ``B <= 3100``): at these budgets DTS resamples ``B / 100`` base samples by
  ``exp(lam r)``. DTS* (``greedy=True``) is left out: the bench scores samplers of ``pi``, not the best
  reward found, and at these budgets its argmax descent is best-of-N's choice;
* ``best_of_n``, ``code`` (block 5): :func:`~steerdiff.smc.best_of_n`, :func:`~steerdiff.smc.code`
  (they maximize ``r``; baselines, not samplers of ``pi``);
* ``fkc``: Feynman-Kac correctors (:mod:`steerdiff.smc.fk_correctors`) for the product of ``p`` with
  the Gaussian expert ``N(0, Q^{-1})`` -- the quadratic tilt only (other tilts are no product of
  densities);
* ``driftlite``: :func:`~steerdiff.smc.driftlite` (VCG, one Hutchinson probe) on the same product, the
  corrector with a fitted control drift: ``N = B / 400`` particles of ``4 * 100 - 2`` NFE each (no control
  at the step into the clean end), so ``398 N <= B``;
* ``dps``: gradient guidance through ``x0_hat``: :class:`~steerdiff.guidance.DPS` (normalized) on the
  posterior case, :class:`~steerdiff.guidance.RewardGuidance` with the reward ``lam r`` elsewhere;
  per case and NFE the best scale of :data:`DPS_SCALES` (descending from the previous NFE's best).

Metrics, per returned sample set of ``n``: the sliced W2 (256 projections) to ``4 n`` exact target
samples in units of the floor (the mean over 8 sets of ``n`` exact samples, as
:func:`steerdiff.metrics.floor`; the report gives their range, wide in 2-D where the sampling noise of
the mode weights dominates), and the error ``mean r(x) - E_pi[r]`` (``E_pi[r]`` in closed form, by
Monte Carlo with ``2^18`` exact samples for the classifier), beside its noise level ``sd_pi(r) / sqrt(n)``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import metrics, sampling, smc
from ..denoiser import Denoiser
from ..guidance import DPS, RewardGuidance
from ..inverse import LinearOperator, Matrix
from ..processes import Process
from ..solvers.base import NonFiniteError
from ..toy.gmm import GaussianMixture
from . import posterior
from ._figure import panel_figure, write_outputs
from .solvers import Row, csv_table, generator_for

__all__ = [
    "CASES",
    "DPS_SCALES",
    "METHODS",
    "NFES",
    "SteerBench",
    "Target",
    "format_report",
    "make_target",
    "markdown_table",
    "nine_modes",
    "plot",
    "run",
    "write_results",
]

log = logging.getLogger(__name__)

F64 = torch.float64
NFES = (100, 400, 1600)
QUICK_NFES = (400,)
STEPS = 100
CASES = ("nine_quadratic", "gmm16_linear", "nine_class", "gmm16_posterior")
METHODS = ("fk_difference", "fk_max", "tds", "svdd", "dts", "best_of_n", "code", "fkc", "driftlite", "dps")
DPS_SCALES = tuple(m * 10.0**e for e in range(-2, 5) for m in (1, 3))[:-1]  # 0.01 .. 1e4
PROJECTIONS = 256
REFERENCE_FACTOR = 4
FLOOR_REPEATS = 8
HEADLINE = ("gmm16_posterior", 1600)
SOLVER, SCHEDULE = "ddpm", "time_uniform"

Reward = Callable[[Tensor], Tensor]


class _TdsArgs(TypedDict, total=False):
    """The likelihood arguments of :func:`~steerdiff.smc.tds`: a log-likelihood, or a linear-Gaussian
    measurement ``y = A x + noise``."""

    log_likelihood: Reward
    operator: LinearOperator
    y: Tensor
    noise_std: float


class _SmcOptions(TypedDict):
    """The options every particle method of the benchmark runs with."""

    shape: tuple[int, ...]
    particles: int
    steps: int
    solver: str
    schedule: str
    dtype: torch.dtype
    generator: torch.Generator


def nine_modes() -> GaussianMixture:
    """The 2-D nine-mode mixture: means ``{-4, 0, 4}^2``, per-coordinate variance 0.3, equal weights."""
    means = torch.tensor(list(itertools.product([-4.0, 0.0, 4.0], repeat=2)), dtype=F64)
    return GaussianMixture(means, torch.full((9, 2), 0.3, dtype=F64), torch.ones(9, dtype=F64))


@dataclass
class Target:
    """One steering problem ``pi ∝ p exp(lam r)`` with its exact answer and baselines; each of its draws
    has the generator of ``(seed, name, purpose)`` (:func:`~steerdiff.bench.solvers.generator_for`).

    ``tds``: the likelihood arguments of :func:`~steerdiff.smc.tds`; ``guided(scale)``: the DPS-type
    guided denoiser; ``expert``: the Gaussian expert whose product with ``p`` is ``pi`` (or ``None``).
    """

    name: str
    prior: GaussianMixture
    process: Process
    reward: Reward
    lam: float
    target: GaussianMixture
    expected_reward: float
    reward_noise: float
    reference: Tensor
    floor: float
    floor_range: tuple[float, float]
    prior_distance: float
    tds: _TdsArgs
    guided: Callable[[float], Denoiser]
    expert: GaussianMixture | None
    seed: int

    @property
    def den(self) -> Denoiser:
        """The prior's exact denoiser under the target's process."""
        return self.prior.denoiser(self.process)

    def distance(self, x: Tensor) -> float:
        """Sliced W2 of ``x`` to the reference set (``inf`` if ``x`` is not finite)."""
        if not bool(torch.isfinite(x).all()):
            return math.inf
        return _sliced_w2(x, self.reference, self.seed, self.name)

    def reward_error(self, x: Tensor) -> float:
        """``mean r(x) - E_pi[r]``."""
        r = self.reward(x)
        return float(r.mean()) - self.expected_reward if bool(torch.isfinite(r).all()) else math.nan


def _sliced_w2(x: Tensor, y: Tensor, seed: int, name: str) -> float:
    """:func:`steerdiff.metrics.sliced_wasserstein` with the case's :data:`PROJECTIONS` directions."""
    return metrics.sliced_wasserstein(x, y, PROJECTIONS, generator_for(seed, name, "projections"))


def _second_moments(gmm: GaussianMixture) -> Tensor:
    """``E[x x^T]`` of a mixture, ``(d, d)``."""
    mm = gmm.means[:, :, None] * gmm.means[:, None, :]
    return (gmm.weights[:, None, None] * (gmm.covariance_matrices + mm)).sum(0)


def _quadratic_mean(gmm: GaussianMixture, q: Tensor) -> float:
    """``E[-x^T Q x / 2]`` under ``gmm``."""
    return float(-0.5 * (q * _second_moments(gmm)).sum())


def _class_log_prob(gmm: GaussianMixture, members: list[int]) -> Reward:
    """The exact classifier ``log p(c | x) = log sum_{k in c} w_k N(x; mu_k, S_k) - log p(x)``."""
    sub = GaussianMixture(gmm.means[members], gmm.covariances[members], gmm.weights[members])
    log_wc = math.log(float(gmm.weights[members].sum()))

    def log_prob(x: Tensor) -> Tensor:
        return log_wc + sub.log_prob(x) - gmm.log_prob(x)

    return log_prob


def make_target(name: str, n: int, seed: int = 0) -> Target:
    """The case ``name`` (:data:`CASES`) with a reference set of ``4 n`` exact target samples."""
    proc = posterior.ddpm_process()
    expert = None
    tds: _TdsArgs
    reward: Reward
    if name in ("nine_quadratic", "nine_class"):
        prior = nine_modes()
        lam = 1.0
        if name == "nine_quadratic":
            q = torch.diag(torch.tensor([2 / 100, 2.0], dtype=F64))  # r = -x^T Q x / 2

            def reward(x: Tensor) -> Tensor:
                return -(x[:, 0] ** 2) / 100 - x[:, 1] ** 2

            target = prior.tilt(quadratic=q)
            expected = _quadratic_mean(target, q)
            expert = GaussianMixture(torch.zeros(1, 2, dtype=F64), 1 / torch.diag(q)[None], torch.ones(1))
        else:
            members = [k for k in range(9) if float(prior.means[k, 1]) == 4.0]
            reward = _class_log_prob(prior, members)
            target = GaussianMixture(prior.means[members], prior.covariances[members], prior.weights[members])
            mc = target.sample(2**18, generator_for(seed, name, "expected reward"))
            expected = float(reward(mc).mean())
        tds = {"log_likelihood": lambda x: lam * reward(x)}
        den = prior.denoiser(proc)

        def guided(scale: float) -> Denoiser:
            return RewardGuidance(den, lambda x: lam * reward(x), scale)

    elif name == "gmm16_linear":
        prior = posterior.make_prior("gmm16", seed)
        lam = 2.0
        c = torch.randn(prior.dim, generator=generator_for(seed, name, "reward direction"), dtype=F64)
        c = c / c.norm()

        def reward(x: Tensor) -> Tensor:
            return x @ c

        target = prior.tilt(linear=lam * c)
        expected = float((target.weights[:, None] * target.means).sum(0) @ c)
        tds = {"log_likelihood": lambda x: lam * reward(x)}
        den = prior.denoiser(proc)

        def guided(scale: float) -> Denoiser:
            return RewardGuidance(den, lambda x: lam * reward(x), scale)

    elif name == "gmm16_posterior":
        case = posterior.make_case("gmm16", 2, 0.1, n, seed)
        prior, A, y, s = case.gmm, case.A, case.y, case.noise_std
        lam = 1.0
        const = -0.5 * A.shape[0] * math.log(2 * math.pi * s * s)

        def reward(x: Tensor) -> Tensor:
            return const - 0.5 * ((x @ A.T - y) ** 2).sum(-1) / (s * s)

        target = case.posterior
        resid = y - target.means @ A.T
        trace = torch.einsum("ij,kjl,il->k", A, target.covariance_matrices, A)
        expected = const - 0.5 * float((target.weights * ((resid**2).sum(-1) + trace)).sum()) / (s * s)
        tds = {"operator": Matrix(A), "y": y, "noise_std": s}
        den = prior.denoiser(proc)

        def guided(scale: float) -> Denoiser:
            return DPS(den, Matrix(A), y, s, scale=scale)

    else:
        raise ValueError(f"unknown case {name!r}; accepted: {CASES}")
    reference = target.sample(REFERENCE_FACTOR * n, generator_for(seed, name, "reference"))
    g = generator_for(seed, name, "floor")
    exact = [_sliced_w2(target.sample(n, g), reference, seed, name) for _ in range(FLOOR_REPEATS)]
    floor = sum(exact) / len(exact)  # metrics.floor's draws and mean
    prior_distance = _sliced_w2(
        prior.sample(n, generator_for(seed, name, "prior samples")), reference, seed, name
    )
    noise = float(reward(reference).std()) / math.sqrt(n)
    return Target(
        name, prior, proc, reward, lam, target, expected, noise, reference, floor,
        (min(exact) / floor, max(exact) / floor), prior_distance, tds, guided, expert, seed,
    )  # fmt: skip


# --- the methods at a budget -------------------------------------------------------------------------


def _smc_options(t: Target, n: int, particles: int) -> _SmcOptions:
    return {
        "shape": (n, t.prior.dim),
        "particles": particles,
        "steps": STEPS,
        "solver": SOLVER,
        "schedule": SCHEDULE,
        "dtype": F64,
        "generator": generator_for(t.seed, t.name, "particles"),
    }


def _per_particle(method: str) -> int:
    """The NFE one particle (one DTS rollout) is given of a returned sample's budget."""
    return {"fkc": 2 * STEPS, "driftlite": 4 * STEPS}.get(method, STEPS)


def _spent(method: str, budget: int) -> int:
    """The NFE per returned sample ``method`` spends at ``budget``: ``budget``, but DriftLite's last step
    (into the clean end) has no control, hence no divergence backward passes (two fewer per particle), and
    SVDD's and CoDe's node 0 evaluates the one ``x_T`` of a row once (``N - 1`` fewer)."""
    if method == "driftlite":
        return budget // _per_particle(method) * (4 * STEPS - 2)
    if method in ("svdd", "code"):
        return budget - (budget // _per_particle(method) - 1)
    return budget


def _run_method(t: Target, method: str, budget: int, n: int) -> tuple[Tensor, int] | None:
    """``(samples (n, d), NFE per returned sample)`` of ``method`` at ``budget``, or ``None`` where the
    method does not apply or does not fit."""
    per = _per_particle(method)
    if budget % per or (method in ("fkc", "driftlite") and t.expert is None):
        return None
    opts = _smc_options(t, n, budget // per)
    if method in ("fk_difference", "fk_max"):
        out = smc.fk_steering(t.den, t.reward, t.lam, method[3:], **opts)
    elif method == "tds":
        args = t.tds.copy()  # the observation is positional-only
        out = smc.tds(t.den, args.pop("operator", None), args.pop("y", None), **args, **opts)
    elif method == "svdd":
        out = smc.svdd(t.den, t.reward, 1 / t.lam, **opts)
    elif method == "dts":
        out = smc.dts(
            t.den, t.reward, t.lam, shape=opts["shape"], rollouts=opts["particles"], steps=STEPS,
            solver=SOLVER, schedule=SCHEDULE, dtype=F64, generator=opts["generator"],
        )  # fmt: skip
    elif method == "best_of_n":
        out = smc.best_of_n(t.den, t.reward, **opts)
    elif method == "code":
        out = smc.code(t.den, t.reward, block=5, **opts)
    elif method in ("fkc", "driftlite"):
        assert t.expert is not None
        expert = t.expert.denoiser(t.process)
        if method == "fkc":
            out = smc.fkc_product(t.den, expert, **opts)
        else:
            out = smc.driftlite([t.den, expert], [1.0, 1.0], **opts)
    else:
        raise ValueError(f"unknown method {method!r}; accepted: {METHODS}")
    x = out.sample(generator_for(t.seed, t.name, "returned sample"))
    return x, out.nfe


def _run_dps(t: Target, scale: float, budget: int, n: int) -> tuple[Tensor, int]:
    x_T = torch.randn(n, t.prior.dim, generator=generator_for(t.seed, t.name, "x_T"), dtype=F64)
    x, info = sampling.sample(
        t.guided(scale),
        x_T,
        steps=budget,
        solver=SOLVER,
        schedule=SCHEDULE,
        generator=generator_for(t.seed, t.name, "noise"),
        return_info=True,
    )
    return x, info.nfe


# --- the benchmark -----------------------------------------------------------------------------------


@dataclass
class SteerBench:
    """Everything ``steerdiff bench steer`` measured. ``rows``: per case (``source``) and method, the
    sliced W2 to the target in units of the floor (``schedule = "sw2/floor"``) and the error of
    ``E[r]`` (``schedule = "E[r] error"``) per NFE per returned sample; DPS also has one row per scale
    (``"sw2/floor scale=..."``). ``seconds``: wall time per case; ``method_seconds``: per method, over the
    cases (DPS's tuning included)."""

    nfes: tuple[int, ...]
    n: int
    seed: int
    cases: list[str]
    rows: list[Row]
    floors: dict[str, float] = field(default_factory=dict)
    floor_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    prior: dict[str, float] = field(default_factory=dict)
    dps_scale: dict[tuple[str, int], float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    method_seconds: dict[str, float] = field(default_factory=dict)

    def value(self, case: str, method: str, nfe: int, metric: str = "sw2/floor") -> float:
        """A table entry (``nan`` where the method did not run)."""
        for r in self.rows:
            if r.source == case and r.method == method and r.schedule == metric:
                return r.errors.get(nfe, math.nan)
        return math.nan


def _tune_dps(t: Target, nfes: Sequence[int], n: int) -> dict[float, dict[int, tuple[float, float]]]:
    """``{scale: {nfe: (sw2, E[r] error)}}``: per NFE a descent along :data:`DPS_SCALES` from the
    previous NFE's best (from scale 1 at the first) to a local minimum of the sliced W2."""
    runs: dict[float, dict[int, tuple[float, float]]] = {}
    start = DPS_SCALES.index(1.0)
    for nfe in nfes:

        def err(i: int, nfe: int = nfe) -> float:
            scale = DPS_SCALES[i]
            if nfe not in runs.setdefault(scale, {}):
                try:
                    x, used = _run_dps(t, scale, nfe, n)
                    assert used == nfe
                    runs[scale][nfe] = (t.distance(x), t.reward_error(x))
                except NonFiniteError:
                    runs[scale][nfe] = (math.inf, math.nan)
            return runs[scale][nfe][0]

        i = start
        while True:
            nbrs = [j for j in (i - 1, i + 1) if 0 <= j < len(DPS_SCALES)]
            j = min(nbrs, key=err)
            if err(j) >= err(i):
                break
            i = j
        start = i
    return runs


def run(
    n: int = 1024,
    seed: int = 0,
    quick: bool = False,
    progress: bool = False,
    cases: Sequence[str] | None = None,
) -> SteerBench:
    """Run the benchmark on :data:`CASES` at :data:`NFES` (``quick``: NFE 400 only, ``n <= 256``)."""
    nfes = QUICK_NFES if quick else NFES
    if quick:
        n = min(n, 256)
    names = list(CASES if cases is None else cases)
    result = SteerBench(tuple(nfes), n, seed, names, [])
    for name in tqdm(names, desc="cases", disable=not progress):
        t0 = time.perf_counter()
        t = make_target(name, n, seed)
        fl = t.floor
        result.floors[name], result.floor_range[name], result.expected[name] = (
            fl,
            t.floor_range,
            t.expected_reward,
        )
        result.noise[name], result.prior[name] = t.reward_noise, t.prior_distance / fl
        for method in METHODS:
            t1 = time.perf_counter()
            sw2, err = Row(name, method, "sw2/floor"), Row(name, method, "E[r] error")
            if method == "dps":
                runs = _tune_dps(t, nfes, n)
                for scale, by_nfe in runs.items():
                    result.rows.append(
                        Row(
                            name,
                            "dps",
                            f"sw2/floor scale={scale:g}",
                            {k: v[0] / fl for k, v in by_nfe.items()},
                        )
                    )
                for nfe in nfes:
                    scale = min((s for s in runs if nfe in runs[s]), key=lambda s: runs[s][nfe][0])
                    result.dps_scale[name, nfe] = scale
                    sw2.errors[nfe], err.errors[nfe] = runs[scale][nfe][0] / fl, runs[scale][nfe][1]
            else:
                for nfe in nfes:
                    got = _run_method(t, method, nfe, n)
                    if got is None:
                        continue
                    x, used = got
                    if used != _spent(method, nfe):
                        raise RuntimeError(f"{method} spent {used} NFE per sample, not {_spent(method, nfe)}")
                    sw2.errors[nfe], err.errors[nfe] = t.distance(x) / fl, t.reward_error(x)
            if sw2.errors:
                result.rows += [sw2, err]
            spent = time.perf_counter() - t1
            result.method_seconds[method] = result.method_seconds.get(method, 0.0) + spent
        result.seconds[name] = time.perf_counter() - t0
        log.info("%s: %.1f s", name, result.seconds[name])
    return result


# --- reports -------------------------------------------------------------------------------------------


def _cell(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2f}"


def _headline(result: SteerBench) -> str | None:
    case, nfe = HEADLINE
    if case not in result.cases or nfe not in result.nfes:
        return None
    a, b = result.value(case, "tds", nfe), result.value(case, "dps", nfe)
    scale = result.dps_scale.get((case, nfe), math.nan)
    return (
        f"{case} at NFE {nfe} per sample: TDS ({nfe // STEPS} particles, {STEPS} steps) sliced W2 "
        f"{a:.2f}x floor vs DPS ({nfe} steps, best scale {scale:g}) {b:.2f}x floor: TDS lower by "
        f"{(1 - a / b) * 100:.0f}% (ratio {a / b:.2f})"
    )


def format_report(result: SteerBench) -> str:
    """Per case and NFE, every method's sliced W2 (x floor) and error of ``E[r]``; the headline."""
    lines = [
        f"Steering to exact targets pi ∝ p exp(lam r): sliced W2 of {result.n} returned samples to "
        f"{REFERENCE_FACTOR * result.n} exact ones (x floor: {result.n} exact samples) and the error of "
        f"E[r]; DDPM linear betas, {SOLVER} ({SCHEDULE}), particle methods {STEPS} steps x NFE/{STEPS} "
        f"particles (fkc: NFE/{2 * STEPS}; driftlite: NFE/{4 * STEPS}, {4 * STEPS - 2} NFE each), dts "
        f"NFE/{STEPS} rollouts of {STEPS} steps (widening (2, 0.8)), DPS NFE steps (best scale, chosen "
        f"in-sample: on the x_T, noise and reference set it is scored on); seed {result.seed}.",
    ]
    methods = list(dict.fromkeys(r.method for r in result.rows))
    for case in result.cases:
        lo, hi = result.floor_range[case]
        lines += [
            "",
            f"{case}: floor {result.floors[case]:.4g} (exact sets read {lo:.2f}-{hi:.2f}x), prior "
            f"{result.prior[case]:.1f}x floor, "
            f"E_pi[r] = {result.expected[case]:.4f} (noise level {result.noise[case]:.3f})",
            f"{'method':<15}" + "".join(f"{'sw2@' + str(k):>10}" for k in result.nfes)
            + "".join(f"{'dE[r]@' + str(k):>12}" for k in result.nfes),
        ]  # fmt: skip
        for m in methods:
            sw = [result.value(case, m, k) for k in result.nfes]
            er = [result.value(case, m, k, "E[r] error") for k in result.nfes]
            if all(math.isnan(v) for v in sw):
                continue
            lines.append(
                f"{m:<15}" + "".join(f"{_cell(v):>10}" for v in sw) + "".join(f"{_cell(v):>12}" for v in er)
            )
        scales = ", ".join(
            f"{k}: {result.dps_scale[case, k]:g}" for k in result.nfes if (case, k) in result.dps_scale
        )
        lines.append(f"dps best scales: {scales}")
    head = _headline(result)
    if head:
        lines += ["", head]
    lines += [
        "",
        "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()),
        "by method: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.method_seconds.items()),
    ]
    return "\n".join(lines)


def markdown_table(result: SteerBench) -> str:
    """The table of docs/benchmarks.md: per case and method, sliced W2 (x floor) at each NFE and the error
    of ``E[r]`` at the largest."""
    top = result.nfes[-1]
    methods = list(dict.fromkeys(r.method for r in result.rows))
    head = (
        "| method | "
        + " | ".join(
            f"{c} (sw2 ×floor @ {'/'.join(map(str, result.nfes))}; ΔE[r] @ {top})" for c in result.cases
        )
        + " |"
    )
    lines = [head, "|" + "---|" * (len(result.cases) + 1)]
    for m in methods:
        cells = []
        for c in result.cases:
            sw = [result.value(c, m, k) for k in result.nfes]
            if all(math.isnan(v) for v in sw):
                cells.append("—")
                continue
            er = result.value(c, m, top, "E[r] error")
            cells.append(
                " / ".join(_cell(v) for v in sw) + f"; {_cell(er) if math.isnan(er) else f'{er:+.3f}'}"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    floors = " | ".join(
        f"floor {result.floors[c]:.3g} (exact sets {lo:.2f}–{hi:.2f}×), prior {result.prior[c]:.0f}×"
        for c, (lo, hi) in ((c, result.floor_range[c]) for c in result.cases)
    )
    lines.append(f"| (exact samples) | {floors} |")
    return "\n".join(lines)


def plot(result: SteerBench, path: str | Path) -> bool:
    """One panel per case: each method's sliced W2 (x floor) against NFE per returned sample, with the
    floor and the range of the exact sample sets. Returns ``False`` (and logs) if matplotlib is not
    installed."""
    methods = list(dict.fromkeys(r.method for r in result.rows))

    def draw(ax: Any, case: str, colors: Sequence[Any]) -> None:
        for c, m in enumerate(methods):
            pts = [(k, result.value(case, m, k)) for k in result.nfes]
            pts = [(k, v) for k, v in pts if math.isfinite(v)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.loglog(xs, ys, "-o", ms=3, color=colors[c % len(colors)], label=m)
        ax.axhline(1.0, color="black", lw=1, ls=":", label="floor")
        ax.axhspan(*result.floor_range[case], color="grey", alpha=0.15, lw=0, label="exact samples' range")

    return panel_figure(
        path,
        result.cases,
        draw,
        cols=2,
        panel_size=(5.5, 3.8),
        suptitle="Steering to exact tilted / conditional Gaussian-mixture targets (DDPM, 100 steps)",
        ylabel="sliced W2 / floor",
        xticks=result.nfes,
        xlabel="NFE per returned sample",
    )


def write_results(result: SteerBench, out: Path) -> tuple[Path, Path | None]:
    """``OUT/steer.csv`` (the shared :func:`~steerdiff.bench.solvers.csv_table` layout: ``source`` is the
    case, ``schedule`` the metric) and ``OUT/steer.png``."""
    return write_outputs(out, "steer", *csv_table(result), lambda path: plot(result, path))
