r"""DC-Solver (Zhao, Wang, Zhou & Lu, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic
Compensation", ECCV 2024, arXiv:2409.03755): UniPC with the estimate at each node *dynamically compensated*,
by ratios fitted once to a model against a ground-truth trajectory.

UniPC's corrector moves ``x_i`` after the network was evaluated at the *predicted* ``x_i``, so the estimate
``m_i`` that the next prediction (and the next correction) extrapolates from belongs to a point the
trajectory no longer passes: the predictor-corrector *misalignment*. DC replaces it, before the predictor
from node ``i``, by the Lagrange polynomial through the ``K + 1`` newest estimates (``K = dc_order``, the
authors' 2) read at a time shifted by the step's *compensation ratio* ``rho_i``::

    t*_i = rho_i t_i + (1 - rho_i) t_{i-1},
    m_i <- sum_{k=0..K} l_k(t*_i) m_{i-k},   l_k(t) = prod_{j != k} (t - t_{i-j}) / (t_{i-k} - t_{i-j}),

in the process time ``t`` (the network's time input, as in the authors' code: ``dynamic_compensation`` in
``stable-diffusion/ldm/models/diffusion/dc_solver/dc_solver.py`` and in
``diffusers/src/diffusers/schedulers/scheduling_dcsolver_multistep.py`` of github.com/wl-zhao/DC-Solver).
The compensated estimate stays in the history, so later steps extrapolate through it too. ``rho_i = 1``
leaves ``m_i`` as it is (``l_k(t_i) = [k = 0]``): all ratios 1 is UniPC exactly. The first ``K`` steps
have fewer than ``K + 1`` estimates and are not compensated (their ratios must be 1; the authors' CPR
also fixes them there). The step into a clean end returns the compensated denoised estimate (the authors'
last step is a first-order prediction to ``t_min ~ 0`` from it).

**Ratio search** (:func:`search_ratios`; the paper's search stage, the authors' ``search_dc`` /
``find_optim_ratio``): greedily, step by step on a few draws of ``x_T`` (the paper: 10), ``rho_i`` minimises
``|| x_{i+1}(rho_i) - x^gt_{i+1} ||^2`` (mean over the batch and entries), where ``x_{i+1}(rho_i)`` is the
state after the step from node ``i`` -- predicted, and corrected with one more network call where a
correction follows -- and ``x^gt`` the ground-truth trajectory at the node (the authors' code: a 200-step
DDIM run; here the exact ODE of a :class:`~steerdiff.toy.GaussianMixture`, :class:`ExactReference`, or a fine
run of UniPC-3, :class:`SolverReference`), by ``iters`` steps of AdamW (``lr = 0.1``, torch's default weight
decay 0.01, from ``rho = 1``; the authors: 40 iterations in their Stable-Diffusion code, 20 in the diffusers
one), with the gradient through the network. The fitted ratio is then applied and the search moves on.

**Cascade polynomial regression** (:class:`CPR`; the authors' ``cascade_polynomial_regression``): the
ratios of one model change smoothly with the step count, so a table of searched ones predicts those of an
unseen NFE ``N``: ``rho(s; N) = sum_{a=0..p} c_a(N) (s / N)^a`` for the 1-based step ``s``, each ``c_a`` a
quadratic in ``N / 50``, fitted by least squares (linear in the coefficients; the authors use scipy's
``curve_fit``). ``p = 4``: the paper's ``p_3`` (as a summary of the paper quotes it; the authors' code takes
it from the size of its coefficient file). The authors cascade one more level, between the two: the
coefficients of ``c_a`` quadratics in the guidance scale ``w / 12``, theirs quadratics in ``N / 50``; that
level is not implemented here.

The paper's text was not at hand here, so no equation numbers are cited: the rules above are read from the
authors' code (the files named above, ``search_dc``, ``find_optim_ratio``, ``cascade_polynomial_regression``)
and agree with a summary of the paper (``t' = rho t_i + (1 - rho) t_{i-1}``, ``K = 2``, ``rho_0 = rho_1 = 1``,
40 AdamW iterations on 10 draws, ``p_1 = p_2 = 2``, ``p_3 = 4``). Where the run differs from the authors':
a clean end, where UniPC here returns the denoised estimate of the last (uncorrected) prediction, so the
search's loss at the step into the last noisy node compares that prediction, and the last ratio compensates
the returned estimate.

Measured on the solver benchmark (``python bench/dc_solver.py``; docs/solvers.md): see :class:`DCSolver`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, overload

import torch
from torch import Tensor

from .._checks import integer, real
from .._ops import lincomb
from ..denoiser import Denoiser
from ..processes import Process
from ..schedules import ScheduleLike
from ..schedules import get as get_schedule
from ._poly import lagrange_basis
from .base import DEFAULT_STEPS, FINALS, Grid, History, Model, make_grid, work_dtype
from .unipc import UniPC

if TYPE_CHECKING:
    from ..toy import GaussianMixture

__all__ = ["CPR", "DCSearch", "DCSolver", "ExactReference", "SolverReference", "dc_weights", "search_ratios"]

F64 = torch.float64
GRID_RTOL = 1e-4
"""How far, relative to its span in ``t``, a run's grid may be from the one the ratios were searched on."""


def _fmt(times: Sequence[float]) -> str:
    """A grid's times for a message: ``[t_0, t_1, ..., t_N]`` to 4 significant digits."""
    return "[" + ", ".join(f"{t:.4g}" for t in times) + "]"


Reference = Callable[[Grid], list[Tensor]]
"""A ground-truth trajectory: the states at a grid's nodes ``1..N`` (at a clean end, the clean sample)."""


@overload
def dc_weights(times: Sequence[float], rho: float) -> list[float]: ...


@overload
def dc_weights(times: Sequence[float], rho: Tensor) -> list[Tensor]: ...


def dc_weights(times: Sequence[float], rho: float | Tensor) -> list[float] | list[Tensor]:
    """The Lagrange weights ``l_k(t*)`` of the estimates at ``times = (t_i, t_{i-1}, ..., t_{i-K})`` at the
    shifted time ``t* = rho t_i + (1 - rho) t_{i-1}``: a polynomial in ``rho`` (a float, or a tensor to
    differentiate). Nodes in units of the last step, ``u = (t - t_i) / (t_i - t_{i-1})``, so
    ``u* = rho - 1``."""
    unit = times[0] - times[1]
    u = rho - 1.0
    return [
        sum(c * u**m for m, c in enumerate(coef))
        for coef in lagrange_basis([(t - times[0]) / unit for t in times])
    ]  # type: ignore[return-value]


@dataclass
class DCSolver(UniPC):
    r"""DC-Solver: UniPC-p (data prediction) with the estimate at node ``i`` compensated by ``ratios[i]``
    (see :mod:`steerdiff.solvers.dc_solver`); one NFE per step, as UniPC.

    Args:
        ratios: one compensation ratio per step (the run's step count; the first ``dc_order`` must be 1),
            from :func:`search_ratios` or :class:`CPR`; ``None``: all 1, which is UniPC. After a restart of
            the history (a step across a break of the denoiser, :meth:`~steerdiff.denoiser.Denoiser.breaks`;
            a corrector's move) the next ``dc_order`` steps hold too few estimates to compensate, as the first
            ones: a ratio other than 1 there is refused when the run reaches it (``ValueError``), not
            ignored (:func:`search_ratios` leaves them 1; a :class:`CPR` prediction for such a run needs
            those steps set to 1).
        grid_t: the process times of the grid ``ratios`` were searched on (:func:`search_ratios` sets them):
            a run on another grid (another schedule, final or process; off by more than :data:`GRID_RTOL` of
            its span, which an equivalent process's, a float32 table, is not) is refused; ``None``: any grid
            of ``len(ratios)`` steps (ratios given alone, or from :class:`CPR`).
        dc_order: ``K``, the degree of the Lagrange polynomial through the ``K + 1`` newest estimates
            (1-3; the authors' 2).
        order, variant, corrector, lower_order_final, max_h, max_h_ratio: UniPC's (:class:`UniPC`);
            ``prediction`` must be ``"data"`` (the authors' ``predict_x0=True``: the noise form's update
            reads the newest estimate outside the history).

    Not a name for ``solver=``: its ratios are fitted to a model and a step count.

    Measured on the solver benchmark (``python bench/dc_solver.py``; the numbers in docs/solvers.md).
    """

    name: ClassVar[str] = "dc_solver"
    ratios: Sequence[float] | None = None
    grid_t: Sequence[float] | None = None
    dc_order: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        if self.prediction != "data":
            raise ValueError(
                f"{who}: prediction must be 'data' (the compensated estimate is x0), got {self.prediction!r}"
            )
        self.dc_order = integer(who, "dc_order", self.dc_order, lo=1, hi=3)
        if self.ratios is not None:
            if isinstance(self.ratios, str | bytes) or not isinstance(self.ratios, Sequence):
                raise ValueError(
                    f"{who}: ratios must be a sequence of numbers or None, got {self.ratios!r:.60}"
                )
            ratios = [real(who, "ratios", r) for r in self.ratios]
            if any(r != 1.0 for r in ratios[: self.dc_order]):
                raise ValueError(
                    f"{who}: ratios[:{self.dc_order}] must be 1 (the first dc_order={self.dc_order} steps "
                    f"have too few estimates to compensate), got {ratios[: self.dc_order]}"
                )
            self.ratios = ratios
        if self.grid_t is not None:
            if (
                self.ratios is None
                or isinstance(self.grid_t, str | bytes)
                or not isinstance(self.grid_t, Sequence)
            ):
                raise ValueError(
                    f"{who}: grid_t must be None or, with ratios, a sequence of numbers, got "
                    f"{self.grid_t!r:.60}"
                )
            self.grid_t = [real(who, "grid_t", t) for t in self.grid_t]
            if len(self.grid_t) != len(self.ratios) + 1:
                raise ValueError(
                    f"{who}: grid_t must hold one time per node, len(ratios) + 1 = {len(self.ratios) + 1}, "
                    f"got {len(self.grid_t)}"
                )

    def init_state(self, grid: Grid) -> dict[str, Any]:
        if self.ratios is not None and len(self.ratios) != grid.steps:
            raise ValueError(
                f"{type(self).__name__}: ratios has {len(self.ratios)} entries, one per step is needed: the "
                f"run has {grid.steps} steps"
            )
        if self.grid_t is not None:
            # to 1e-4 of the span: an equivalent process's grid (a float32 table) is off by 3.5e-6 .. 3e-5
            off = max(abs(a - b) for a, b in zip(self.grid_t, grid.t, strict=True))
            if off > GRID_RTOL * abs(grid.t[0] - grid.t[-1]):
                raise ValueError(
                    f"{type(self).__name__}: the ratios were searched on the grid t = {_fmt(self.grid_t)}, "
                    f"the run's is t = {_fmt(grid.t)}, off by up to {off:.3g} (another schedule, final or "
                    "process): search them on this one"
                )
        state = super().init_state(grid)
        state["m"] = History(max(self.order, self.dc_order + 1))  # diffusers' DC buffer: max(p, K + 1)
        return state

    def _times(self, i: int, grid: Grid) -> list[float]:
        return [grid.t[i - k] for k in range(self.dc_order + 1)]

    def _ratio(self, i: int) -> float:
        return 1.0 if self.ratios is None else self.ratios[i]

    def _held_ratio(self, i: int, held: int) -> float:
        """``ratios[i]``, the step holding ``held`` estimates; a ``ValueError`` where it is not 1 but fewer
        than ``dc_order + 1`` are held: after a restart of the history (a step across a break of the
        denoiser, :func:`~steerdiff.sampling.crossings`; a corrector's move; a projection), whose ``dc_order``
        steps cannot be compensated, as the run's first ones cannot (``ratios[:dc_order]`` must be 1)."""
        rho = self._ratio(i)
        if held <= self.dc_order and rho != 1.0:
            raise ValueError(
                f"{type(self).__name__}: ratios[{i}] = {rho:g}, but step {i} holds {held} estimate(s) of "
                f"the field, fewer than dc_order + 1 = {self.dc_order + 1}: the history restarted before it "
                "(after a step across a break of the denoiser, Denoiser.breaks, a corrector's move or a "
                f"projection), and the dc_order = {self.dc_order} steps after a restart, as the first ones, "
                "cannot be compensated: their ratios must be 1 (search_ratios on this denoiser leaves them "
                "so)"
            )
        return rho

    def _compensate(self, start: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> None:
        hist = state["m"]
        if (rho := self._held_ratio(i, len(hist.values))) != 1.0:
            hist.values[0] = lincomb(dc_weights(self._times(i, grid), rho), hist.values[: self.dc_order + 1])

    def _clean(self, x0: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        values = [x0, *state["m"].values]
        if (rho := self._held_ratio(i, len(values))) == 1.0:
            return x0
        return lincomb(dc_weights(self._times(i, grid), rho), values[: self.dc_order + 1])


class ExactReference:
    """The exact probability-flow ODE trajectory of ``gmm`` under ``process`` from ``x_T`` at ``t_start``
    (default ``process.t_max``), at the nodes of any grid that starts there: chained
    :meth:`~steerdiff.toy.GaussianMixture.reference_ode` solves (DOP853, ``rtol = 1e-10``), each from the
    nearest state already solved above the node (kept: grids of several step counts share them, so a state
    depends, to the solver's tolerance, on the nodes asked for before it). A clean
    end's state is the exact denoiser at ``t_min`` of the state there (the answer :func:`steerdiff.sample`
    approximates)."""

    def __init__(
        self, gmm: GaussianMixture, process: Process, x_T: Tensor, t_start: float | None = None
    ) -> None:
        from ..toy import GaussianMixture  # here: steerdiff.toy imports the solvers

        if not isinstance(gmm, GaussianMixture):
            raise ValueError(
                f"ExactReference: gmm must be a steerdiff GaussianMixture, got {type(gmm).__name__}"
            )
        self.gmm, self.process = gmm, process
        self.t_start = process.t_max if t_start is None else real("ExactReference", "t_start", t_start)
        self.states: dict[float, Tensor] = {self.t_start: x_T.to(F64)}

    def at(self, t: float) -> Tensor:
        """The exact state at process time ``t`` from ``process.t_min`` to ``t_start``."""
        t = real("ExactReference.at", "t", t, lo=self.process.t_min, hi=self.t_start)
        if t not in self.states:
            above = min(s for s in self.states if s >= t)
            self.states[t] = self.gmm.reference_ode(self.states[above], self.process, above, t)
        return self.states[t]

    def __call__(self, grid: Grid) -> list[Tensor]:
        if grid.t[0] != self.t_start:
            raise ValueError(
                f"ExactReference: the grid starts at t={grid.t[0]:g}, the reference at {self.t_start:g}"
            )
        noisy = grid.t[1 : grid.steps + 1 - grid.clean_end]
        out = [self.at(t) for t in noisy]
        if grid.clean_end:
            p, t = self.process, self.process.t_min
            out.append(self.gmm.denoise(self.at(t), float(p.alpha(t)), float(p.sigma(t))))
        return out


class SolverReference:
    """A ground-truth trajectory from a fine run: UniPC-3 over each step of the grid split into ``sub`` steps
    uniform in log-SNR (and, before a clean end, the same from the last noisy node down to ``t_min``), from
    ``x_T``; the states at the grid's nodes. The authors used a 200-step DDIM run."""

    def __init__(self, den: Denoiser, x_T: Tensor, sub: int = 20, **cond: Any) -> None:
        self.den, self.x_T, self.cond = den, x_T, cond
        self.sub = integer("SolverReference", "sub", sub, lo=1)
        self.nfe = 0
        """Network calls per sample of the runs so far."""

    def __call__(self, grid: Grid) -> list[Tensor]:
        from ..sampling import sample  # here: sampling imports the solvers
        from ..schedules import Custom

        p = self.den.process
        ends = grid.t[: grid.steps + 1 - grid.clean_end]
        if grid.clean_end and ends[-1] > p.t_min:
            ends = [*ends, p.t_min]
        lam = [float(p.lam(t)) for t in ends]
        times, marks = [ends[0]], []
        for a, b in itertools.pairwise(lam):
            times += [float(p.t_of_lam(a + (b - a) * (k + 1) / self.sub)) for k in range(self.sub)]
            marks.append(len(times) - 2)  # the callback's step index that lands on node b
        times[-1] = ends[-1]
        states: dict[int, Tensor] = {}
        final = "zero" if grid.clean_end else "none"
        out, info = sample(
            self.den,
            self.x_T,
            steps=len(times) if grid.clean_end else len(times) - 1,
            solver=UniPC(order=3),
            schedule=Custom(times),
            final=final,
            callback=lambda d: states.__setitem__(d["i"], d["x"]),
            return_info=True,
            **self.cond,
        )
        self.nfe += info.nfe
        noisy = [states[k] for k in marks[: grid.steps - grid.clean_end]]
        return [*noisy, out] if grid.clean_end else noisy


@dataclass
class DCSearch:
    """The result of :func:`search_ratios`: the fitted solver and the search's network calls per sample
    (the reference's not included)."""

    solver: DCSolver
    nfe: int


@dataclass
class _Search(DCSolver):
    """DCSolver that fits each step's ratio before applying it (:func:`search_ratios`)."""

    model: Model | None = None
    refs: list[Tensor] = field(default_factory=list)
    jumps: frozenset[int] = frozenset()
    iters: int = 40
    lr: float = 0.1

    def _fit(self, loss: Callable[[Tensor], Tensor], like: Tensor) -> float:
        rho = torch.nn.Parameter(torch.ones((), dtype=like.dtype, device=like.device))
        opt = torch.optim.AdamW([rho], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.iters):
                # by rho alone: a net's parameters that require grad are left as they are
                (rho.grad,) = torch.autograd.grad(loss(rho), rho)
                opt.step()
        return float(rho.detach())

    def _compensate(self, start: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> None:
        hist = state["m"]
        if len(hist.values) > self.dc_order:
            assert isinstance(self.ratios, list) and self.model is not None
            model, values, lam = self.model, list(hist.values), list(hist.at)
            k = self._order(i, grid, len(values))
            # a correction follows unless the clean end or a restart at a break (jumps) does
            last = i + 1 == grid.steps or grid.is_final_clean(i + 1)
            corrects = self.corrector and not last and i not in self.jumps
            times, target = self._times(i, grid), self.refs[i]

            def loss(rho: Tensor) -> Tensor:
                w = dc_weights(times, rho)
                m = [sum(wk * v for wk, v in zip(w, values, strict=False)), *values[1:]]
                x = self._update(grid, start, i, i + 1, m[:k], lam[:k], None)
                if corrects:
                    x = self._update(grid, start, i, i + 1, m[:k], lam[:k], model(x, grid.t[i + 1], i + 1).x0)
                return torch.nn.functional.mse_loss(x, target)

            self.ratios[i] = self._fit(loss, start)
        super()._compensate(start, i, grid, state)

    def _clean(self, x0: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        values = [x0, *state["m"].values]
        if len(values) > self.dc_order:
            assert isinstance(self.ratios, list)
            times, target = self._times(i, grid), self.refs[i]

            def loss(rho: Tensor) -> Tensor:
                w = dc_weights(times, rho)
                return torch.nn.functional.mse_loss(
                    sum(wk * v for wk, v in zip(w, values, strict=False)), target
                )

            self.ratios[i] = self._fit(loss, x0)
        return super()._clean(x0, i, grid, state)


def search_ratios(
    den: Denoiser,
    x_T: Tensor,
    steps: int | None = None,
    schedule: ScheduleLike | None = None,
    *,
    solver: DCSolver | None = None,
    reference: Reference | None = None,
    iters: int = 40,
    lr: float = 0.1,
    final: str = "zero",
    **cond: Any,
) -> DCSearch:
    """Fit DC-Solver's compensation ratios to ``den`` on the draws ``x_T`` (module docstring: the greedy
    per-step AdamW search against a ground-truth trajectory).

    Args:
        den: the denoiser (its process sets the grid).
        x_T: the draws of the initial noise the search runs from (the paper: 10).
        steps, schedule, final: the run the ratios are for, as :func:`steerdiff.sample`'s (defaults
            ``sd.sample``'s: ``steps=None`` is 10, or an explicit grid's count).
        solver: a :class:`DCSolver` whose options (order, variant, dc_order, ...) the fitted one keeps; its
            ratios are ignored (default ``DCSolver()``: UniPC-3, bh2, ``K = 2``).
        reference: the ground truth at the grid's nodes (:data:`Reference`): :class:`ExactReference` for a
            Gaussian mixture; default a :class:`SolverReference` fine run of ``den``.
        iters, lr: AdamW iterations per step and learning rate (an integer >= 1, a number > 0).
        **cond: passed to the network on every call.

    Deterministic for given inputs. The search evaluates the denoiser ``iters`` times per compensated step
    whose state a correction follows, plus ``steps`` times for the run itself (:attr:`DCSearch.nfe` counts
    network calls: ``den.cost`` each, 2 for classifier-free guidance). Needs autograd (not under
    ``torch.inference_mode()``); a half-precision ``x_T`` runs the network in it and the rest in float32, as
    :func:`steerdiff.sample`. The fitted solver runs on this grid only (:attr:`DCSolver.grid_t`). Where
    ``den``'s field jumps (:meth:`~steerdiff.denoiser.Denoiser.breaks`: RF-Inversion's editing window) the
    search's run restarts its history after the step across the jump, as :func:`steerdiff.sample` restarts
    the fitted solver's (:func:`~steerdiff.sampling.crossings`), and fits that step's ratio to the prediction
    alone (no correction follows it there); the steps of the warm-up after it keep ratio 1.
    """
    from ..sampling import DEFAULT_SCHEDULE, crossings  # here: sampling imports the solvers

    who = "search_ratios"
    if not isinstance(den, Denoiser):
        raise ValueError(f"{who}: den must be a steerdiff Denoiser, got {type(den).__name__}")
    if not isinstance(x_T, Tensor) or x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"{who}: x_T must be a tensor of at least one draw (batch first), got {x_T!r:.60}")
    if solver is None:
        solver = DCSolver()
    if not isinstance(solver, DCSolver):
        raise ValueError(
            f"{who}: solver must be a DCSolver (its options are kept), got {type(solver).__name__}"
        )
    if reference is not None and not callable(reference):
        raise ValueError(
            f"{who}: reference must be a callable grid -> states (ExactReference, ...), got {reference!r:.60}"
        )
    iters = integer(who, "iters", iters, lo=1)
    lr = real(who, "lr", lr, lo=0, lo_open=True)
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{who}: needs autograd (the loss's gradient in the ratio, through the network); call it outside "
            "torch.inference_mode() (torch.no_grad() is fine)"
        )
    if final not in FINALS:
        raise ValueError(f"{who}: final must be one of {FINALS}, got {final!r}")
    sched = get_schedule(DEFAULT_SCHEDULE if schedule is None else schedule, who)
    grid = make_grid(den.process, sched, steps, final, who=who, default=DEFAULT_STEPS)
    refs = (SolverReference(den, x_T, **cond) if reference is None else reference)(grid)
    if len(refs) != grid.steps or any(r.shape != x_T.shape for r in refs):
        raise ValueError(f"{who}: reference must give {grid.steps} states of x_T's shape {tuple(x_T.shape)}")
    fitted = ("ratios", "grid_t")  # the search's own, not options
    options = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver) if f.name not in fitted}
    # as sd.sample: a half-precision x_T is the net's dtype, the state and the ratio are in float32
    dtype = work_dtype(x_T.dtype)
    model = Model(den, cond, net_dtype=x_T.dtype)
    refs = [r.to(device=x_T.device, dtype=dtype) for r in refs]
    jumps = crossings(den, grid)
    search = _Search(
        **options, ratios=[1.0] * grid.steps, model=model, refs=refs, jumps=jumps, iters=iters, lr=lr
    )
    state, x = search.init_state(grid), x_T.to(dtype)
    with torch.no_grad():  # the run carries no graph: each fit differentiates its own loss (_fit)
        for i in range(grid.steps):
            x = search.step(model, x, i, grid, state)
            if i in jumps:  # the field jumps before the next evaluation: sd.sample restarts the history
                search.moved(state)
    model.check_finite()
    return DCSearch(dataclasses.replace(solver, ratios=list(search.ratios or ()), grid_t=grid.t), model.nfe)


@dataclass(frozen=True)
class CPR:
    """Cascade polynomial regression of compensation ratios over the step count (module docstring):
    ``rho(s; N) = sum_{a=0..p} sum_{b=0..2} coef[a][b] (s / N)^a (N / 50)^b`` for the 1-based step
    ``s > dc_order``, 1 before; ``p = len(coef) - 1`` (the paper's ``p_3 = 4``). Fit it with :meth:`fit`;
    ``cpr(nfe)`` gives the ratios of a run of ``nfe`` steps."""

    coef: tuple[tuple[float, ...], ...]
    dc_order: int = 2

    def __post_init__(self) -> None:
        coef = self.coef
        if (
            isinstance(coef, str | bytes)
            or not isinstance(coef, Sequence)
            or not coef
            or any(isinstance(r, str | bytes) or not isinstance(r, Sequence) or len(r) != 3 for r in coef)
        ):
            raise ValueError(
                f"CPR: coef must be p + 1 >= 1 rows of 3 numbers (the quadratic in N / 50 of each power of "
                f"s / N), got {coef!r:.80}"
            )
        object.__setattr__(self, "coef", tuple(tuple(real("CPR", "coef", c) for c in r) for r in coef))
        object.__setattr__(self, "dc_order", integer("CPR", "dc_order", self.dc_order, lo=1, hi=3))

    @staticmethod
    def _features(s: int, n: int, degree: int) -> list[float]:
        return [(s / n) ** a * (n / 50) ** b for a in range(degree + 1) for b in range(3)]

    @classmethod
    def fit(cls, table: Mapping[int, Sequence[float]], dc_order: int = 2, degree: int = 4) -> CPR:
        """Least squares over ``table``: searched ratios by step count (each ``N`` entries), from at least
        three step counts (the quadratic in ``N``) of at least ``degree + 1`` steps past ``dc_order`` each
        (a table that leaves a coefficient free is refused); ``degree``: ``p``, in ``s / N`` (1-6, the
        paper's 4)."""
        dc_order = integer("CPR.fit", "dc_order", dc_order, lo=1, hi=3)
        degree = integer("CPR.fit", "degree", degree, lo=1, hi=6)
        if not isinstance(table, Mapping) or len(table) < 3:
            raise ValueError(
                f"CPR.fit: table must map at least 3 step counts to their ratios, got {table!r:.80}"
            )
        rows, values = [], []
        for n, ratios in table.items():
            n = integer("CPR.fit", "table's step count", n, lo=dc_order + 1)
            if len(ratios) != n:
                raise ValueError(f"CPR.fit: table[{n}] must hold {n} ratios, got {len(ratios)}")
            for s in range(dc_order + 1, n + 1):
                rows.append(cls._features(s, n, degree))
                values.append(real("CPR.fit", f"table[{n}]", ratios[s - 1]))
        design = torch.tensor(rows, dtype=F64)
        if (rank := int(torch.linalg.matrix_rank(design))) < design.shape[1]:
            raise ValueError(
                f"CPR.fit: the table determines {rank} of the {design.shape[1]} coefficients: it needs 3 "
                f"step counts with at least degree + 1 = {degree + 1} steps past dc_order={dc_order} each "
                f"(or a lower degree), got {sorted(table)}"
            )
        sol = torch.linalg.lstsq(design, torch.tensor(values, dtype=F64)[:, None]).solution
        c = sol[:, 0].tolist()
        return cls(tuple(tuple(c[3 * a : 3 * a + 3]) for a in range(degree + 1)), dc_order)

    def __call__(self, nfe: int) -> list[float]:
        nfe = integer("CPR", "nfe", nfe, lo=1)
        flat = [c for row in self.coef for c in row]
        degree = len(self.coef) - 1
        return [
            1.0
            if s <= self.dc_order
            else math.fsum(c * f for c, f in zip(flat, self._features(s, nfe, degree), strict=True))
            for s in range(1, nfe + 1)
        ]
