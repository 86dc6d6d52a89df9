r"""Feynman-Kac correctors (Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet,
Brekelmans, Tong & Neklyudov 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and
Product of Experts", ICML; equation numbers are the paper's).

Given diffusion models with noised marginals ``q^k_t`` (scores ``s_k = -eps_k / sigma``), sample the
*composed* marginals (Eq. 15 and Prop. D.5)

    pi_t(x) ∝ prod_k q^k_t(x)^{beta_k},      B = sum_k beta_k > 0:

annealing ``q^beta`` (Eq. 20), a product of experts ``q^1 q^2`` (Eq. 24) and the geometric average
``q(x)^{1-w} q(x|c)^w`` that classifier-free guidance aims at (Prop. 3.1). Their score
``sum_k beta_k s_k`` in the reverse SDE (the heuristic of Eq. 16) does *not* give ``pi_t`` as
marginals; weighting it does. With the forward process ``dx = f_t(x) dt + g_t dW``
(``f_t(x) = (d log alpha / dt) x``, ``g_t^2 = -2 sigma^2 d lam / dt``) the weighted SDE (Eq. 8, in
generation time ``s``) is

    dx = (-f_t(x) + g_t^2 sum_k beta_k s_k(x)) ds + g_t dW,
    dw = [ (B - 1) <nabla, f_t> + g_t^2 / 2 (|sum_k beta_k s_k|^2 - sum_k beta_k |s_k|^2) ] ds,

which is Prop. 3.1 / Eq. 19 for CFG (``beta = (1 - w, w)``: ``dw = g^2/2 w (w - 1) |s_u - s_c|^2 ds``),
Prop. 3.2 / Eq. 21-22 for annealing (``dw = (beta - 1) (<nabla, f> + g^2/2 beta |s|^2) ds``) and
Prop. 3.3 / Eq. 26-27 at ``beta = 1`` for the product (``dw = (<nabla, f> + g^2 <s_1, s_2>) ds``).
(Derivation: expand ``d log pi_t / ds`` with each ``q^k``'s Fokker-Planck equation, Eq. 14, and
collect what the SDE's own Fokker-Planck operator does not account for, Eq. 12-13; the Laplacian
terms cancel exactly for this drift.) The weight does not depend on the noise level: the family
``drift -f + (1 + zeta^2) g^2/2 sum_k beta_k s_k, noise zeta g`` (Eq. 21 and 28 with ``a``) has the
same ``dw``, so every reverse-SDE solver of it (DDPM and SDE-DPM-Solver++: ``zeta = 1``; ``DDIM(eta)``:
``zeta = eta``, e.g. the tempered-noise SDE of Eq. 23 at ``eta = beta^{-1/2}``) is corrected by the
same weights.

In the half log-SNR ``lam = log(alpha / sigma)`` (``g^2 ds = 2 sigma^2 d lam``) and with the mean
``eps_bar = sum_k beta_k eps_k / B`` the score part is, exactly,

    g^2/2 (...) ds = E(x, lam) d lam,    E = B (B - 1) |eps_bar|^2 - sum_k beta_k |eps_k - eps_bar|^2

(summed over the sample; free of cancellation: CFG has ``B = 1`` and ``E = w (w - 1) |eps_c - eps_u|^2``).
The potential at grid node ``i`` is the trapezoidal rule for ``int E d lam`` taken node by node, plus
the divergence term integrated exactly (``D`` values per sample, ``h_i = lam_{i+1} - lam_i``):

    log G_i = (h_{i-1} + h_i) / 2 E(x_i) + D (B - 1) log(alpha_i / alpha_{i+1}),

with ``h_{-1} = 0`` and ``h_i = 0`` for the step into a clean end (a grid ending at a noisy node
adds ``h_{S-1}/2 E(x_S)`` at the last node: one more evaluation per particle). ``E(x_i)`` comes from
the solver's own evaluation at node ``i``; the particles are resampled on these weights (Sec. 4,
Eq. 9) and estimates are self-normalized (Eq. 10). The weighted particles at the last noisy node
target ``pi_t`` there; with ``final="zero"`` the last step is the usual jump to the clean state,
``x0 = (x - sigma sum_k beta_k eps_k) / alpha`` (Tweedie's estimate under the composed score), which
carries no weight: its error is that of stopping at the smallest noise level, ``O(sigma_min^2)``.

Exactness: the weighted SDE is exact in continuous time; the solver and the quadrature are
consistent, so the weighted particles converge to ``pi`` as the steps and then the particles grow.
The discretization error is large where ``h |B (B - 1)| |eps|^2`` is: at high noise the potential is
a Gaussian ``exp(c |x|^2)``, not integrable once ``h >~ 1 / (2 |B - 1|)``, so coarse grids fail (at 15
``karras_jump`` steps the example below keeps an ESS of 1 over half the run). For ``B != 1`` the particles
themselves diverge on such grids, weighted or not: at high noise the composed estimate
``x0 = (x - sigma sum_k beta_k eps_k) / alpha ~ (1 - B) x / alpha`` grows like ``e^{-lam}``, and a
data-prediction SDE step, which holds it fixed over the step, multiplies ``x`` by ``B e^{-h} + (1 - B) e^h``
(first order: DDPM) where the SDE contracts it by ``e^{-(2 B - 1) h}``. The step is explicit in that term:
unstable once ``h > log(B / (B - 1))`` (0.69 at ``B = 2``), and 2M's extrapolation once ``h >~ 0.37`` at
``B = 2`` (0.60 at ``B = 1.5``, 0.21 at ``B = 3``). ``karras_jump``'s steps below ``lam = 0`` are 0.55-1.04
at 10 steps, 0.39-0.77 at 15 and 0.28-0.55 at 20 (``VP.cosine``), so plain 2M's particles grow: on
``N(0, 2)^2`` (1-D, uncorrected) its ``E[x^2]`` is 6554, 1.93 and 0.85 at 10, 15 and 20 steps (the exact
limit of its linear recursion, which the particles match; the SDE's value is 0.66, the target 1), and on 2-D
mixtures (``beta = 2``, or a product) the particles reach ``|x| ~ 10^2`` at 10 and 15 steps where DDPM's
stay bounded. CFG (``B = 1``) has no such term. So for ``B > 1`` the default (:func:`fkc_solver`) takes
every step longer than 2M's bound on this linear test, :func:`fkc_max_h` (``log(sqrt(4 + 2 / (B - 1)) -
1)``: 0.371 at ``B = 2``), at first order. What remains: the first-order step is itself unstable beyond
``log(B / (B - 1))`` and the weights fail beyond ``~1 / (2 |B - 1|)``, so very coarse grids still fail
(``B = 2``, 10 ``karras_jump`` steps: SW 3.6 to the exact ``p^2`` of a 2-D mixture, floor 0.033; from 15
steps 0.54 and at 20 0.29, where plain 2M gave 35 and 1.40; at ``B = 3`` 15 steps diverge, 20 do not).

The bound is the low-SNR worst case: for data of standard deviation ``s`` the stiff term fades once
``alpha s >~ sigma`` (the composed estimate is ``(1 - c) x / alpha``, ``c = B / (1 + s^2 e^{2 lam}) <= B``),
and held at every step it lowers the order of the long low-noise steps of finer grids (30 steps, one seed:
a product of two 2-D mixtures 0.135 against plain 2M's 0.073, floor 0.042). Given that scale (``fkc(...,
data_std=s)``: the smallest standard deviation of the components' data along any direction, locally),
:class:`FKCStepLimit` lifts the bound on the steps after a node where ``c <= 1``, past which 2M has no
stiff instability at any step length. Measured (sliced Wasserstein to exact samples, mean of 5 seeds of 16
x 256 particles, ``karras_jump``, ``data_std`` the smallest component standard deviation; before -> with
it, at 10 / 15 / 20 / 30 / 50 steps): ``p^2`` of a 2-D mixture (``VP.cosine``, floor 0.033) 3.22 / 0.538 /
0.311 / 0.255 / 0.087 -> 3.54 / 0.499 / 0.274 / 0.221 / 0.087; the product above 3.22 / 0.426 / 0.311 /
0.145 / 0.086 -> 3.22 / 0.367 / 0.268 / 0.095 / 0.086 (plain 2M 0.085 at 30); on ten other problems
(``B`` = 2, 3, 4; ``VP.linear``, ``scaled_linear``, rectified flow, EDM; ``logsnr_uniform``; data from
``s`` = 0.05) the error falls to as little as 0.60x (30-50 steps: 0.64-0.77x on four), grows by over 3% in two
cells, both ``VP.linear``'s product of three 3-D mixtures at 20 steps (0.574 -> 0.599) and ``logsnr_uniform``
at 10 steps (20.0 -> 21.1, where both fail; as ``p^2`` at 10 steps above, 1.10x: one step of ``h = 1.48``
taken at second order); within 3% from 100 steps. Freezing ``c`` at the step's noise level instead (the
frozen-coefficient limit ``fkc_max_h(c)``, which relaxes the bound everywhere ``c < B``) gains more where it
helps (down to 0.24x) but cost 1.64x and 1.32x at 20 and 15 steps on two of those problems. Too large a
``data_std`` lifts the bound where the term is still stiff: the 8-d mixture with standard deviations
0.05-0.5 given 0.25 or 0.5 loses 1.16x at 15 steps (0.87 -> 1.01).

Measured on a 1-D
``N(0, 2)`` with ``beta = 2`` (exact variance 1; the uncorrected SDE tends to 0.66): DDPM's error in
the variance is -0.54, -0.33, -0.19, -0.10 at 25, 50, 100, 200 steps (the exact infinite-particle
limit: first order), plain SDE-DPM-Solver++(2M)'s -0.001 +- 0.025 at 50 steps and -0.03 +- 0.02
at 100 (16 x 1024 particles); on 2-D test problems (4096 particles) its error in ``E[x^2]``
is up to 0.16 at 50 steps and within 1.5 standard errors of 0 at 100. Members of the family with
less noise converge far more slowly (``DDIM(eta=0.5)``: -0.60 at 100 steps), or not at all: at high noise
the corrected law is an unstable fixed point of the weighted dynamics once ``zeta^2 < (B - 1) / B``
(annealing; Gaussian analysis), so the errors of the steps grow instead of dying out (``er_sde``'s default
noise scale stays far off at any step and particle count; ``ERSDE(noise_scale="sde")`` converges).

Particle efficiency is low for ``B >= 2``, by the method, not the discretization: on the high-noise linear
test (in ``lam``: ``dx = -(2 B - 1) x dlam + sqrt(2) dW``, rate ``B (B - 1) |x|^2``) a state's expected future
weight is ``∝ exp((B - 1) |x|^2 / 2)`` and ``pi_t = N(0, I / B)``, so its second moment under ``pi_t`` is
finite only for ``2 (B - 1) / B < 1``: SMC's asymptotic variance is infinite from ``B = 2`` on (the border:
that ratio is 0.97 and 0.985 in DDPM's exact discrete model at 200 and 400 steps), resampling at any threshold
cannot help, and a row's estimate converges more slowly than ``N^{-1/2}``. Measured (64 rows, default solver,
100 steps, ``N_eff = N Var_iid / Var_rows`` of ``E[x_1]``; an independent minimal SMC reproduces the spread
and resampling counts): ``p^2`` of a 2-D two-component mixture ends at ESS ``0.78 N`` after 6-10 resamplings,
yet the SD of its rows' ``E[x_1]`` is 0.36 at ``N = 256``, 3.7x that of ``N`` i.i.d. draws (``N_eff / N``
0.15, 0.07, 0.04 at ``N`` = 64, 256, 1024; alike at 50 and 200 steps, for a product of two mixtures, and
0.29-0.08 for a Gaussian ``p^2``), while the mean over rows is within 2 standard errors of exact in every one
of these 27 cells: pool rows (``out.mean().mean(0)``) rather than trust one.

The engine's ``log Z`` estimates ``log(Z_end / Z_start)`` with
``Z_t = int prod_k q^k_t(x)^{beta_k} dx`` when the initial particles are drawn from ``pi_{t_0}``
(default: ``N(0, (alpha_0^2 + sigma_0^2) / B)``, exact where every ``q^k_{t_0}`` is the prior).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import schedules as _schedules
from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, real, sample_dtype
from ..denoiser import Denoiser, Prediction, check_denoiser, override_kwargs, take_kwarg_rows
from ..distributed.group import spread_run
from ..guidance.base import Guided, process_difference
from ..guidance.cfg import same_branch
from ..noise import Generators, check_generators, randn
from ..schedules import ScheduleLike
from ..solvers.base import FINALS, Grid, Solver, count_steps, make_grid
from ..solvers.cps import CPS
from ..solvers.dpmpp_sde import DPMSolverSDEMultistep
from ..solvers.tcd import TCD
from . import resample as _resample
from .particles import (
    DEFAULT_SCHEDULE,
    DEFAULT_STEPS,
    Particles,
    SMCAlgorithm,
    StepContext,
    _check_batching,
    _row_chunks,
    particle_shape,
    run_smc,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FKC_SOLVER",
    "ComposedPrediction",
    "Composition",
    "FKCStepLimit",
    "FKCorrector",
    "fkc",
    "fkc_anneal",
    "fkc_cfg",
    "fkc_max_h",
    "fkc_product",
    "fkc_solver",
    "run_composition",
]

# stochastic solvers that are not reverse-SDE discretizations: TCD / LCM and CPS re-noise each step to a fixed
# share of the next noise level (no SDE as the steps shrink), so the corrector's weights do not apply to them
NOT_REVERSE_SDE = (TCD, CPS)

DEFAULT_FKC_SOLVER = "dpmpp_2m_sde"


def fkc_max_h(total: float) -> float:
    r"""The longest step (in log-SNR) at which SDE-DPM-Solver++(2M) (midpoint, ``eta = 1``) is stable at
    high noise for a composition with ``B = sum_k beta_k = total``: ``log(sqrt(4 + 2 / (B - 1)) - 1)``
    for ``B > 1`` (0.90 at ``B = 1.25``, 0.60 at 1.5, 0.371 at 2, 0.212 at 3, 0.115 at 5; about
    ``log(2 / (B - 1)) / 2`` near 1), ``inf`` for ``B <= 1``.

    The linear test at low SNR (``sigma ~ 1``, ``alpha ~ e^lam``, components ``q^k_t ~ N(0, I)``):
    ``eps_k = x``, so the composed estimate is ``x0 = (1 - B) x / alpha``, and the step of
    :mod:`steerdiff.solvers.dpmpp_sde` (``x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h} x_i + alpha_{i+1} S``,
    ``W_1 = 1 - e^{-2h}``; the noise enters the mean only through ``x_i``) with equal steps,
    ``S = W_1 (3/2 m_i - 1/2 m_{i-1})``, is with ``y = e^h``, ``G = B - 1``

        x_{i+1} = a x_i + b x_{i-1},    a = 1/y - 3/2 G (y - 1/y),    b = G (y^2 - 1) / 2.

    The natural scale of ``x`` is constant there (``Var x ~ 1``; the exact uncorrected SDE contracts
    ``x`` by ``e^{-(2 B - 1) h}``), so the step is stable while the companion matrix ``[[a, b], [1, 0]]``
    has spectral radius <= 1. For ``G > 0`` its roots (of ``z^2 - a z - b``, product ``-b < 0``) are real
    and of opposite signs, and the negative one passes -1 first: ``1 + a - b = 0``, i.e. ``G (y - 1)(y + 3)
    = 2``, ``y = sqrt(4 + 2 / G) - 1`` (the positive one passes 1 at ``G (y + 1)(y - 3) = 2``, ``y > 3``).
    The first-order step (``S = W_1 m_i``) multiplies ``x`` by
    ``B e^{-h} + (1 - B) e^h``: stable up to ``log(B / (B - 1))``, longer than this bound for every
    ``B > 1``, so steps beyond it are taken at first order (:func:`fkc_solver`).

    ``B = 1`` (CFG) has no such term (``x0`` does not grow like ``1 / alpha``). For ``B < 1`` the term is
    positive feedback, not stiff: the recursion's roots are a complex pair of modulus ``sqrt((1 - B)(y^2
    - 1) / 2)``, past 1 from ``h = log((3 - B) / (1 - B)) / 2`` (``>= log(5) / 2 = 0.80`` for ``B >= 1/2``),
    and the first-order multiplier ``B e^{-h} + (1 - B) e^h`` is positive and passes 1 from ``log(B / (1 -
    B))``, earlier than 2M for ``B < 3/4``; below ``B = 1/2`` the uncorrected SDE expands ``x`` itself.
    Lowering the order buys no stability there, so there is no limit.
    """
    total = real("fkc_max_h", "total", total, lo=0, lo_open=True)
    if total <= 1:
        return math.inf
    return math.log(math.sqrt(4.0 + 2.0 / (total - 1.0)) - 1.0)


@dataclass(frozen=True)
class FKCStepLimit:
    r"""The long-step limit of :func:`fkc_solver`'s SDE-DPM-Solver++(2M) by the step's noise level, for a
    composition with ``B = sum_k beta_k = total`` whose components' data have a standard deviation of at
    least ``s = data_std`` along every direction, locally (within a mixture component): a rule ``(grid, i) ->
    limit`` for the solver's ``max_h`` (:func:`~steerdiff.solvers.base.step_order`),

        limit(step i) = fkc_max_h(B) while c(lam_{i-1}) > 1, none once c(lam_{i-1}) <= 1,
        c(lam) = B / (1 + s^2 e^{2 lam})      (<= 1 from lam = log(sqrt(B - 1) / s) on).

    :func:`fkc_max_h`'s linear test at every noise level: components ``N(0, s^2 I)`` have ``eps_k = sigma x /
    (alpha^2 s^2 + sigma^2)``, so the composed estimate is ``x0 = (1 - c) x / alpha`` with the stiffness
    ``c`` above (``sigma`` times the slope of the composed ``eps``). For any data ``sigma d eps_k / dx = I -
    alpha^2 Cov_k[x0 | x] / sigma^2 <= I`` (Tweedie), so ``c <= B``, with equality at low SNR:
    ``data_std = 0`` is every data set's worst case, :func:`fkc_max_h` of ``B`` at every step. In ``v = x /
    sigma`` the step of :mod:`steerdiff.solvers.dpmpp_sde` (weights ``w_0 = W_1 (1 + r)``, ``w_1 = -W_1 r``
    of ``m_i, m_{i-1}``, ``r = h / (2 h_0)``, ``W_1 = 1 - e^{-2h}``, ``y = e^h``, ``y_0 = e^{h_0}``, ``h_0``
    the step before) is, whatever the process (only ``lam`` enters),

        v_{i+1} = a v_i + b v_{i-1},    a = 1/y - w_0 (c_i - 1) y,    b = -w_1 (c_{i-1} - 1) y y_0,
        1 + a - b = (1 + 1/y) [1 - (e^h - 1)((1 + r)(c_i - 1) + r y_0 (c_{i-1} - 1))]

    (at ``c_i = c_{i-1} = B``, ``v = x`` at ``sigma = 1``, :func:`fkc_max_h`'s recursion). ``c`` falls as
    ``lam`` grows, so once ``c_{i-1} <= 1`` both terms are ``<= 0`` and the roots sum to ``a > 0``: the step's
    matrix ``[[a, b], [1, 0]]`` has no eigenvalue at or below -1 whatever ``h`` and ``h_0``, the stiff
    instability is gone (``c < 1`` is the positive feedback of :func:`fkc_max_h`, which a lower order does not
    cure). Before that the step keeps the low-SNR bound. (Freezing ``c`` at ``lam_{i-1}`` in between, i.e.
    the root of ``1 + a - b = 0``, ``fkc_max_h(c)`` at equal steps, relaxes more but holds only where ``c``
    varies slowly, and it falls from ``B`` to 1 within about one unit of ``lam``: measured, it lets through
    steps that cost 1.32x and 1.64x on two held-out problems at 15 and 20 steps; see the module docstring.)
    """

    total: float
    data_std: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", real("FKCStepLimit", "total", self.total, lo=0, lo_open=True))
        object.__setattr__(self, "data_std", real("FKCStepLimit", "data_std", self.data_std, lo=0))

    def stiffness(self, lam: float) -> float:
        """``c(lam) = B / (1 + s^2 e^{2 lam})``: the composed estimate is ``(1 - c) x / alpha`` on the linear
        test."""
        if self.data_std == 0:
            return self.total
        z = 2.0 * (lam + math.log(self.data_std))
        return self.total / (1.0 + math.exp(z)) if z < 700 else 0.0

    def __call__(self, grid: Grid, i: int) -> float:
        """The limit for step ``i`` of ``grid``: none where :meth:`stiffness` at ``lam_{i-1}`` (``lam_0`` for
        the first step) is ``<= 1``, else :func:`fkc_max_h` of ``B``."""
        return math.inf if self.stiffness(grid.lam[max(i - 1, 0)]) <= 1 else fkc_max_h(self.total)


def fkc_solver(total: float, data_std: float = 0.0) -> str | Solver:
    """:func:`fkc`'s default solver for ``B = sum_k beta_k = total``: SDE-DPM-Solver++(2M)
    (:data:`DEFAULT_FKC_SOLVER`), whose steps longer than its :class:`FKCStepLimit` at the step's noise level
    are first order where ``B > 1`` (``DPMSolverSDEMultistep(max_h=FKCStepLimit(B, data_std),
    max_h_ratio=0.0)``, which replaces its default long-step rule, :data:`~steerdiff.solvers.base.SDE_MAX_H`;
    with ``data_std = 0``, :func:`fkc_max_h` of ``B`` at every step); unchanged for ``B <= 1``."""
    limit = FKCStepLimit(real("fkc_solver", "total", total, lo=0, lo_open=True), data_std)
    if total <= 1:
        return DEFAULT_FKC_SOLVER
    return DPMSolverSDEMultistep(order=2, max_h=limit, max_h_ratio=0.0)


class ComposedPrediction(Prediction):
    """A :class:`~steerdiff.denoiser.Prediction` of the composed score that also carries its
    components' noise estimates ``parts`` (one tensor per component, ``x``'s shape) and what each cost in
    the call, ``costs`` (network evaluations per sample: a backward pass through ``parts[k]`` goes through
    ``costs[k]`` network calls)."""

    __slots__ = ("costs", "parts")

    def __init__(
        self,
        x: Tensor,
        alpha: Any,
        sigma: Any,
        eps: Tensor,
        parts: tuple[Tensor, ...],
        costs: tuple[int, ...],
    ) -> None:
        super().__init__(x, alpha, sigma, eps=eps)
        self.parts, self.costs = parts, costs


def _dict_or_none(who: str, name: str, value: object) -> None:
    """A ``ValueError`` naming ``who`` and ``name`` unless ``value`` is a dict or None."""
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{who}: {name} must be a dict or None, got {type(value).__name__}")


def _components(
    who: str,
    dens: Sequence[Denoiser],
    betas: Sequence[float],
    kwargs: Sequence[dict[str, Any] | None] | None,
    max_batch: int | None,
) -> tuple[list[Denoiser], list[float], list[dict[str, Any] | None], int | None]:
    """:class:`Composition`'s arguments checked, as lists (``kwargs``: one ``None`` per component for
    ``None``), else a ``ValueError`` naming ``who``: the class, or the public function that builds one."""
    for name, value in (("dens", dens), ("betas", betas), ("kwargs", kwargs)):
        if not isinstance(value, Iterable) and (value is not None or name != "kwargs"):
            raise ValueError(
                f"{who}: {name} must be a sequence (one per component), got {type(value).__name__}"
            )
    dens, betas = list(dens), [real(who, f"betas[{k}]", b) for k, b in enumerate(betas)]
    kwargs = [None] * len(dens) if kwargs is None else list(kwargs)
    if not dens or len(betas) != len(dens) or len(kwargs) != len(dens):
        raise ValueError(
            f"{who}: dens, betas and kwargs must be non-empty and of one length, got {len(dens)}, "
            f"{len(betas)} and {len(kwargs)}"
        )
    for k, (d, kw) in enumerate(zip(dens, kwargs, strict=True)):
        check_denoiser(who, f"dens[{k}]", d)
        off = process_difference(dens[0], d)
        if off is not None:
            raise ValueError(
                f"{who}: all denoisers must share a process, got {dens[0].process} and {d.process}: {off}"
            )
        _dict_or_none(who, f"kwargs[{k}]", kw)
    if not sum(betas) > 0:
        raise ValueError(f"{who}: sum(betas) must be > 0, got {sum(betas)} for betas {betas}")
    return dens, betas, kwargs, _check_batching(who, dens, max_batch)


class Composition(Guided):
    """The denoiser of the composed density ``prod_k q^k_t(x)^{beta_k}``: ``eps = sum_k beta_k eps_k``,
    i.e. the score ``sum_k beta_k s_k`` (Skreta et al. 2025, Eq. 16), combined in ``eps`` (not in
    ``x0``: the two agree only for ``sum_k beta_k = 1``).

    Args:
        dens: the component denoisers (same process); one net may appear several times with
            different ``kwargs``.
        betas: the exponents ``beta_k`` (finite reals, ``B = sum_k beta_k > 0``); components with
            ``beta_k = 0`` are not evaluated.
        kwargs: per component, keyword arguments that override the sampler's ``**cond`` for its call
            (e.g. a null label for the unconditional one); ``None``: none. Under
            :func:`~steerdiff.smc.run_smc` their tensors of ``batch`` rows follow the particles, as
            those of ``**cond`` do (:meth:`take_rows`).
        max_batch: evaluate every component on at most this many rows at a time.

    A call returns a :class:`ComposedPrediction` (the components' ``eps`` in ``parts``) and costs the
    sum of its components' costs in that call (one network evaluation per component with
    ``beta_k != 0``, or what a guided component spent).
    """

    def __init__(
        self,
        dens: Sequence[Denoiser],
        betas: Sequence[float],
        kwargs: Sequence[dict[str, Any] | None] | None = None,
        max_batch: int | None = None,
    ) -> None:
        dens, betas, kwargs, max_batch = _components("Composition", dens, betas, kwargs, max_batch)
        keep = [k for k, b in enumerate(betas) if b != 0]
        super().__init__(dens[keep[0]])
        self.dens = tuple(dens[k] for k in keep)
        self.betas = tuple(betas[k] for k in keep)
        self.kwargs = tuple(dict(kwargs[k] or {}) for k in keep)
        self.max_batch = max_batch
        self.cost = sum(d.cost for d in self.dens)

    def _eps(
        self, k: int, x: Tensor, t: float | Tensor, dtype: torch.dtype, cond: dict[str, Any]
    ) -> tuple[Tensor, int]:
        """Component ``k``'s ``eps`` (in slices of ``max_batch`` rows, its per-sample keyword arguments
        sliced with them: :meth:`~steerdiff.denoiser.Denoiser.take_rows`) and its cost in this call."""
        den, kw = (
            self.dens[k],
            override_kwargs("Composition", f"kwargs[{k}]", cond, self.kwargs[k], x.shape[0]),
        )
        out, used = [], den
        for sl, xs, ts, cs in _row_chunks(self.max_batch, x, t, kw):
            used = den if sl is None else den.take_rows(sl, x.shape[0])
            out.append(used.evaluate(xs, ts, dtype, **cs).eps)
        # read after the call: a component's cost may vary (a CFG interval)
        return out[0] if len(out) == 1 else torch.cat(out), used.cost

    def evaluate(
        self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any
    ) -> ComposedPrediction:
        """The components' nets in ``net_dtype``, their combination in ``x``'s dtype."""
        parts, costs = [], []
        for k in range(len(self.dens)):
            eps, c = self._eps(k, x, t, net_dtype, cond)
            parts.append(eps)
            costs.append(c)
        self.cost = sum(costs)
        eps = self.betas[0] * parts[0]
        for beta, e in zip(self.betas[1:], parts[1:], strict=True):
            eps = eps + beta * e
        alpha, sigma = self.coefficients(t, x)[:2]
        return ComposedPrediction(x, alpha, sigma, eps, tuple(parts), tuple(costs))

    def rate(self, pred: ComposedPrediction) -> Tensor:
        """``E = B (B - 1) |eps_bar|^2 - sum_k beta_k |eps_k - eps_bar|^2`` per sample, ``(n,)`` float64:
        the corrector's weight per unit ``lam`` (see the module docstring)."""
        b = sum(self.betas)
        parts = [p.reshape(p.shape[0], -1).to(torch.float64) for p in pred.parts]
        if len(parts) == 1:  # annealing: eps_bar is the one eps, no spread
            return (b * (b - 1)) * torch.linalg.vecdot(parts[0], parts[0])
        bar = sum(beta * p for beta, p in zip(self.betas, parts, strict=True)) / b
        rate = (b * (b - 1)) * torch.linalg.vecdot(bar, bar)
        for beta, p in zip(self.betas, parts, strict=True):
            d = p - bar
            rate = rate - beta * torch.linalg.vecdot(d, d)
        return rate

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """Its components (those with ``beta_k != 0``)."""
        return self.dens

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy with its components' ``take_rows`` and the tensors of ``n`` rows in ``kwargs`` taken at
        ``rows``; itself where nothing changes."""
        dens = tuple(den.take_rows(rows, n) for den in self.dens)
        kwargs = tuple(take_kwarg_rows(kw, rows, n) for kw in self.kwargs)
        if all(a is b for a, b in zip((*dens, *kwargs), (*self.dens, *self.kwargs), strict=True)):
            return self
        out = copy.copy(self)
        out.dens, out.kwargs, out.base = dens, kwargs, dens[0]
        return out

    def __repr__(self) -> str:
        return f"Composition({list(self.dens)!r}, betas={self.betas})"


class FKCorrector(SMCAlgorithm):
    """The Feynman-Kac corrector weights as engine hooks (see the module docstring).

    The particles follow the solver driven by ``composition``, which must be the denoiser given to
    :func:`~steerdiff.smc.run_smc`; ``log_weight`` at node ``i`` is the trapezoidal share of
    ``int E d lam`` plus the divergence term. ``correct=False`` is the uncorrected composed-score SDE
    (no weights, no resampling).
    """

    name = "fkc"
    shardable = True
    needs_transition = True

    def __init__(self, composition: Composition, correct: bool = True) -> None:
        if not isinstance(composition, Composition):
            raise ValueError(
                f"FKCorrector: composition must be a Composition, got {type(composition).__name__}"
            )
        self.composition, self.correct = composition, boolean("FKCorrector", "correct", correct)

    def log_weight(self, ctx: StepContext) -> Tensor | None:
        g, i = ctx.grid, ctx.i
        if not self.correct or g.sigma[i] == 0:  # the jump into a clean end carries no weight
            return None
        left = g.h(i - 1) if i > 0 else 0.0
        right = g.h(i) if i < g.steps and g.sigma[i + 1] > 0 else 0.0
        pred = ctx.prediction()
        if not isinstance(pred, ComposedPrediction):
            raise ValueError("FKCorrector: run_smc must be given the corrector's Composition as its denoiser")
        log_g = 0.5 * (left + right) * self.composition.rate(pred).reshape(ctx.x.shape[:2])
        div = sum(self.composition.betas) - 1
        if right > 0 and div != 0:
            log_g = log_g + math.prod(ctx.x.shape[2:]) * div * math.log(g.alpha[i] / g.alpha[i + 1])
        return log_g


@spread_run
def fkc(
    dens: Sequence[Denoiser],
    betas: Sequence[float],
    *,
    shape: tuple[int, ...] | None = None,
    particles: int = 16,
    steps: int | None = None,
    kwargs: Sequence[dict[str, Any] | None] | None = None,
    correct: bool = True,
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
    """Feynman-Kac correctors for ``prod_k q^k(x)^{beta_k}`` (Skreta et al. 2025, Prop. D.5; see the
    module docstring).

    Args:
        dens: the component denoisers (same process).
        betas: the exponents ``beta_k`` (finite, ``sum > 0``).
        shape: ``(batch, *sample_shape)``; may be left out where ``x_T`` is given (read off it; a shape given
            with it must agree).
        particles: ``N >= 1`` per batch row. ``steps``: solver steps (fine steps matter for ``B != 1``:
            high-noise steps longer than ``log(B / (B - 1))`` in log-SNR (0.69 at ``B = 2``) are unstable
            even at first order, so at ``B = 2`` 10 ``karras_jump`` steps fail and 15 do not, at ``B = 3`` 15
            fail and 20 do not; see the module docstring); ``None``: 100, or an explicit grid's count
            (:func:`~steerdiff.smc.run_smc`).
        kwargs: per component, overrides of ``**cond`` for its call (see :class:`Composition`); tensors
            with ``batch`` rows are repeated for the particles, as those in ``**cond`` are.
        correct: ``False`` runs the uncorrected composed-score SDE (equal weights, no resampling): the
            heuristic that the correctors fix.
        ess_threshold: resample a row when ``ESS < ess_threshold * N`` (default 0.5).
        solver: a stochastic solver of the reverse-SDE family that returns a Gaussian transition (not
            :data:`NOT_REVERSE_SDE`'s ``lcm`` / ``tcd`` / ``cps``)
            (``None``: :func:`fkc_solver` of ``B`` and ``data_std``, SDE-DPM-Solver++(2M) with the steps
            longer than its :class:`FKCStepLimit` at first order; ``"ddpm"`` is the target-score SDE of
            Eq. 22, first order; a solver given is used as it is); ``schedule``, ``final``, ``resampler``,
            ``dtype``, ``device``, ``generator``, ``progress``, ``group``, ``cond``: see
            :func:`~steerdiff.smc.run_smc`.
        data_std: for the default solver: the smallest standard deviation of the components' data along any
            direction, locally (within a mixture component; :class:`FKCStepLimit`), ``>= 0``. 0 (default)
            assumes nothing: every step is held to the low-SNR bound :func:`fkc_max_h` of ``B``; a scale lets
            the low-noise steps, where the stiff term is gone, keep second order (see the module docstring;
            too large a scale lifts the bound where the term is still stiff). Only with ``solver=None``.
        max_batch: evaluate each component on at most this many rows at a time.
        x_T: initial particles ``(batch, particles, *sample_shape)``; default
            ``sqrt((alpha_0^2 + sigma_0^2) / B)`` times standard normal (the composed prior).

    Returns:
        :class:`~steerdiff.smc.Particles`: ``x``, normalized ``log_w`` (self-normalized estimates of
        ``E_pi[f]`` with :meth:`~steerdiff.smc.Particles.mean`), ``nfe`` (per batch row: ``K * steps *
        particles`` for ``K`` components with ``beta_k != 0`` and a one-evaluation step; ``K *
        particles`` more with ``final="none"``), ``trace`` (``log_z`` as in the module docstring).
    """
    who = "fkc"  # also for the wrappers, whose own arguments they check themselves
    return run_composition(
        who, dens, betas, lambda comp: FKCorrector(comp, boolean(who, "correct", correct)), shape=shape,
        particles=particles, steps=steps, kwargs=kwargs, ess_threshold=ess_threshold, resampler=resampler,
        solver=solver, data_std=data_std, schedule=schedule, final=final, max_batch=max_batch, x_T=x_T,
        dtype=dtype, device=device, generator=generator, progress=progress, group=group, **cond,
    )  # fmt: skip


def run_composition(
    who: str,
    dens: Sequence[Denoiser],
    betas: Sequence[float],
    algorithm: Callable[[Composition], SMCAlgorithm],
    *,
    shape: tuple[int, ...] | None,
    particles: int,
    steps: int | None,
    kwargs: Sequence[dict[str, Any] | None] | None,
    ess_threshold: float,
    resampler: str | _resample.Resampler,
    solver: str | Solver | None,
    data_std: float,
    schedule: ScheduleLike,
    final: str,
    max_batch: int | None,
    x_T: Tensor | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    generator: Generators,
    progress: bool,
    group: Any,
    **cond: Any,
) -> Particles:
    """:func:`fkc`'s run for any algorithm over the :class:`Composition` of ``dens`` and ``betas``
    (``algorithm(composition)`` makes it): the arguments checked (messages name ``who``), the default
    solver :func:`fkc_solver` of ``B`` and ``data_std``, the composed prior as the default ``x_T``, then
    :func:`~steerdiff.smc.run_smc` with the composition as its denoiser. The arguments are :func:`fkc`'s."""
    batch, *sample_shape = particle_shape(who, shape, x_T)
    check_generators(who, generator, batch)
    n = integer(who, "particles", particles, lo=1)
    final = choice(who, "final", final, FINALS)
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, final, DEFAULT_STEPS)
    comp = Composition(*_components(who, dens, betas, kwargs, max_batch))
    alg = algorithm(comp)
    data_std = real(who, "data_std", data_std, lo=0)
    if solver is None:
        solver = fkc_solver(sum(comp.betas), data_std)
    elif data_std != 0:
        raise ValueError(f"{who}: data_std sets the default solver's step limit; give it with solver=None")
    elif isinstance(_solvers.get(solver, who), NOT_REVERSE_SDE):
        raise ValueError(
            f"{who}: solver={solver!r} re-noises each step to a fixed share of the noise level rather than "
            "discretizing the reverse SDE whose marginals the corrector's weights assume; use a reverse-SDE "
            "solver: ddpm, dpmpp_2m_sde, DDIM(eta > 0), euler_maruyama, flow_sde, ... (None: the default)"
        )
    if x_T is None:  # the composed prior, drawn from the generator as run_smc draws its own
        dtype = None if dtype is None else sample_dtype(who, "dtype", dtype)
        device = device_or_none(who, "device", device)
        grid = make_grid(comp.process, sched, steps, final)
        scale = math.sqrt((grid.alpha[0] ** 2 + grid.sigma[0] ** 2) / sum(comp.betas))
        x_T = scale * randn((batch, n, *sample_shape), generator, dtype, device)
    return run_smc(
        comp, alg, shape, particles=particles, steps=steps, solver=solver, schedule=schedule,
        final=final, ess_threshold=ess_threshold, resampler=resampler, x_T=x_T, dtype=dtype,
        device=device, generator=generator, progress=progress, group=group, **cond,
    )  # fmt: skip


@spread_run
def fkc_anneal(den: Denoiser, beta: float, **options: Any) -> Particles:
    """Annealing: sample ``p(x)^beta / Z`` (Skreta et al. 2025, Prop. 3.2 with the target-score drift
    ``beta s`` of Eq. 22; weight rate ``(beta - 1) (<nabla, f> + g^2/2 beta |s|^2)``). ``beta > 0``;
    ``**options`` as for :func:`fkc` (``shape`` or ``x_T`` is required); ``solver=DDIM(eta=beta ** -0.5)``
    is the tempered-noise SDE of Eq. 23 (same weights; first order, so it needs more steps; for ``beta > 2``
    its ``zeta^2 = 1 / beta`` is below the stable ``(beta - 1) / beta`` of the module docstring and it
    stalls short of the target; use the default there).

    Example:
        >>> out = sd.smc.fkc_anneal(den, 2.0, shape=(4, 2), particles=256, steps=100, generator=g)
        >>> out.mean()   # E[x] under p^2 / Z, per row: each about as noisy as 15-40 i.i.d. draws, not 256
        >>> out.mean().mean(0)   # pooled over the 4 rows (see the module docstring on efficiency)
    """
    check_denoiser("fkc_anneal", "den", den)
    return fkc([den], [real("fkc_anneal", "beta", beta, lo=0, lo_open=True)], **options)


@spread_run
def fkc_product(
    den1: Denoiser,
    den2: Denoiser,
    *,
    kwargs1: dict[str, Any] | None = None,
    kwargs2: dict[str, Any] | None = None,
    **options: Any,
) -> Particles:
    """Product of experts: sample ``p1(x) p2(x) / Z`` (Skreta et al. 2025, Prop. 3.3 at ``beta = 1``,
    Eq. 26-27): drift score ``s1 + s2``, weight rate ``<nabla, f> + g^2 <s1, s2>``. ``kwargs1`` and
    ``kwargs2`` override ``**cond`` for each expert's call; ``**options`` as for :func:`fkc`.
    NFE: 2 per particle per step."""
    for name, d in (("den1", den1), ("den2", den2)):
        check_denoiser("fkc_product", name, d)
    for name, kw in (("kwargs1", kwargs1), ("kwargs2", kwargs2)):
        _dict_or_none("fkc_product", name, kw)
    return fkc([den1, den2], [1.0, 1.0], kwargs=[kwargs1, kwargs2], **options)


@spread_run
def fkc_cfg(
    cond: Denoiser,
    uncond: Denoiser,
    scale: float,
    *,
    uncond_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Particles:
    """Classifier-free guidance, corrected: sample ``p(x|c)^w p(x)^{1-w} / Z`` (Skreta et al. 2025,
    Prop. 3.1, Eq. 19): the CFG drift ``eps_u + w (eps_c - eps_u)`` (that of
    :class:`~steerdiff.guidance.CFG` at ``scale = w``) with the weight rate
    ``g^2/2 w (w - 1) |s_c - s_u|^2``. ``uncond`` may be ``cond`` with ``uncond_kwargs`` (e.g. a null
    label); the condition goes in ``**options`` as for :func:`fkc`. The target must be normalizable
    (for ``w > 1``, ``p(x)`` may not decay faster than ``p(x|c)``). NFE: 2 per particle per step (1 for
    ``w`` = 0 or 1).
    """
    for name, d in (("cond", cond), ("uncond", uncond)):
        check_denoiser("fkc_cfg", name, d)
    _dict_or_none("fkc_cfg", "uncond_kwargs", uncond_kwargs)
    w = real("fkc_cfg", "scale", scale)
    if w not in (0.0, 1.0) and (message := same_branch("fkc_cfg", cond, uncond, uncond_kwargs or {})):
        log.warning(message)
    return fkc([uncond, cond], [1.0 - w, w], kwargs=[uncond_kwargs, None], **options)
