r"""Geometry-Inspired Time Scheduling (GITS; Chen, Zhou, Wang, Shen & Lyu, "On the Trajectory Regularity of
ODE-based Diffusion Sampling", ICML 2024, arXiv:2405.11326, Sec. 5; the authors' ``gits-main/gits_utils.py``
in ``zju-pi/diff-sampler``): a time grid fitted to a model by dynamic programming over a teacher trajectory.

Sampling trajectories of the probability-flow ODE share one regular shape whatever sample they end at, so
a schedule fitted on a few of them serves all. GITS

1. runs a *teacher*: ``M`` fine steps of a solver (the authors: iPNDM over 61 polynomial, i.e. Karras
   ``rho = 7``, timestamps) from a small batch of ``x_T`` (the authors: 256), keeping the state ``x_i`` at
   every node ``t_i`` and the network's estimate there (``x0_i``, ``eps_i``);
2. prices every coarse step ``i -> j`` of the fine grid (``i < j``) by how far one DDIM step -- the Euler
   step of the ODE in ``y = x / alpha``, ``s = sigma / alpha`` -- from the teacher's state at ``t_i``,
   with the teacher's estimate there, lands from the teacher's state at ``t_j``::

       c_ij = mean over the batch of || y_i + (s_j - s_i) eps_i - y_j ||_2 = || x0_i + s_j eps_i - y_j ||_2

   (the authors' ``metric="l2"``; their default ``"dev"``, the change of the trajectory's deviation from the
   straight line ``x_T -> x_0``, is not implemented). With ``final="zero"`` the fine grid ends in the clean
   state (``s = 0``, the teacher's sample), where the step lands at ``x0_i``;
3. picks the ``K``-step path ``0 = p_0 < p_1 < ... < p_K = E`` (``E`` the fine grid's end) through the fine
   nodes minimising ``sum_m coeff^m c_{p_m p_{m+1}}`` by dynamic programming (:func:`optimal_path`):
   ``V_1(j) = c_jE``, ``V_k(j) = min_{j < i < E} c_ji + coeff V_{k-1}(i)``. ``coeff = 1`` (the default
   here) is the plain sum of local errors; the authors' default ``coeff = 1.15`` (later steps weigh more),
   tuned with their ``"dev"`` metric, did worse with this one on the benchmark below. Not the authors': by
   default (``max_ratio=2``, :data:`MAX_RATIO`) no step but the last into a noisy node is longer in ``lam``
   than twice the one before (the program then runs over pairs of nodes, :func:`optimal_path`): the plain
   program prices DDIM steps, which extrapolate nothing, and its grids cross the band where the denoised
   estimate settles in one step 3.6-5.6 times the one before, over which third-order multistep solvers
   extrapolate their quadratic (``max_ratio=None``: the authors' program).

The one-time cost is the teacher's NFE, ``M`` (:attr:`GITS.nfe`); the grid for each step count is then a
dynamic program over the cost matrix, cached. The student solver is any: the cost is the DDIM step's
whatever solver then runs the grid (as in the authors' code, whose students are Euler, iPNDM, DPM-Solver++,
UniPC, ...).

Measured on the solver benchmark (:mod:`steerdiff.bench.solvers`'s mixture and SD betas, exact denoiser;
``python bench/gits.py``): see :class:`GITS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import choice, device_or_none, integer, real, sample_dtype, sizes
from .denoiser import Denoiser
from .noise import randn
from .processes import Process, difference
from .schedules import Schedule, ScheduleLike
from .schedules import get as get_schedule

__all__ = ["GITS", "MAX_RATIO", "TEACHERS", "cost_matrix", "optimal_path"]

F64 = torch.float64

# Teachers whose one network evaluation per step is at the node's own state, so that the callback's denoised
# estimate after step i is the estimate at node i (a staged solver's or a corrector's is not)
TEACHERS = ("ddim", "deis", "dpmpp_2m", "euler", "ipndm", "lms")

# GITS's default step-ratio rule: no step (but the last into a noisy node) longer in lam than twice the one
# before (the ratio of the multistep solvers' long-step rule, steerdiff.solvers.base.ODE_MAX_H_RATIO). The
# plain DP prices DDIM steps, which extrapolate nothing, and on the solver benchmark crosses the band where
# the denoised estimate settles (lam -0.7 -> 0.8) in one step 3.6-5.6 times the one before: third-order
# multistep solvers extrapolate their quadratic across it (error there 0.016 -> 0.78 for dpmpp_3m at 8
# steps, first order 0.095), and the solvers' rule, which needs the step longer than 2 as well, does not
# fire. Lowering that limit instead changes 112 of the longstep bench's 2,664 cases, 63 for the worse
# (bench/longstep_limit.py --max-h 1).
# Numbers: GITS.
MAX_RATIO = 2.0


def cost_matrix(y: Tensor, x0: Tensor, s: Sequence[float]) -> Tensor:
    r"""GITS's cost of the DDIM step ``i -> j`` from the teacher's state ``i`` to the teacher's state ``j``.

    ``y``: ``(E + 1, batch, ...)`` the teacher's states in ``x / alpha`` at its nodes ``0..E``; ``x0``:
    ``(E, batch, ...)`` its denoised estimates at the nodes ``0..E-1``; ``s``: ``sigma / alpha`` at the
    ``E + 1`` nodes (``0`` at a clean end). Returns the ``(E + 1, E + 1)`` float64 matrix
    ``c_ij = mean_b || x0_i + s_j eps_i - y_j ||_2`` for ``i < j``, ``eps_i = (y_i - x0_i) / s_i``, and
    ``inf`` elsewhere (no step)."""
    st = torch.tensor(list(s), dtype=F64)
    if y.ndim < 2 or y.shape[0] < 2 or x0.shape != (y.shape[0] - 1, *y.shape[1:]) or st.shape != y.shape[:1]:
        raise ValueError(
            f"cost_matrix: y must be (E + 1, batch, ...) with E >= 1, x0 (E, batch, ...) and s "
            f"E + 1 numbers, got y {tuple(y.shape)}, x0 {tuple(x0.shape)}, s of {st.numel()}"
        )
    e = y.shape[0] - 1
    out = torch.full((e + 1, e + 1), torch.inf, dtype=F64)
    yf, x0f = y.reshape(e + 1, y.shape[1], -1).to(F64), x0.reshape(e, y.shape[1], -1).to(F64)
    for i in range(e):
        eps = (yf[i] - x0f[i]) / st[i]
        pred = x0f[i] + st[i + 1 :, None, None] * eps  # (E - i, batch, d): the landing points
        out[i, i + 1 :] = torch.linalg.vector_norm(pred - yf[i + 1 :], dim=-1).mean(-1)
    return out


def optimal_path(
    cost: Tensor,
    steps: int,
    coeff: float = 1.0,
    lam: Sequence[float] | None = None,
    max_ratio: float | None = None,
    free_last: int = 1,
) -> list[int]:
    r"""The ``steps``-step path ``0 = p_0 < ... < p_steps = E`` through the nodes of ``cost`` (an
    ``(E + 1, E + 1)`` matrix, ``cost[i, j]`` the price of the step ``i -> j``) minimising
    ``sum_m coeff^m cost[p_m, p_{m+1}]``: the dynamic program of GITS (see the module docstring).
    ``steps`` must be in ``1..E``.

    With ``max_ratio`` (a number >= 1; ``lam``, the ``E + 1`` nodes' log-SNR, increasing, then needed) every
    step but the last ``free_last`` is at most ``max_ratio`` times the step before it in ``lam``:
    ``lam_{p_{m+1}} - lam_{p_m} <= max_ratio (lam_{p_m} - lam_{p_{m-1}})``. The program then runs over the
    pairs (previous node, node): ``V_1(i, j) = c_jE``, ``V_k(i, j) = min c_jl + coeff V_{k-1}(j, l)`` over the
    ``l`` the rule allows after ``i -> j`` (a run of nodes: a prefix minimum, ``O(E^2)`` per step count)."""
    if not isinstance(cost, Tensor) or cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        got = tuple(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
        raise ValueError(f"optimal_path: cost must be a square (E + 1, E + 1) tensor with E >= 1, got {got}")
    e = cost.shape[0] - 1
    steps = integer("optimal_path", "steps", steps, lo=1, hi=e)
    coeff = real("optimal_path", "coeff", coeff, lo=0, lo_open=True)
    c = cost.to(F64)
    if max_ratio is not None:
        max_ratio = real("optimal_path", "max_ratio", max_ratio, lo=1)
        free_last = integer("optimal_path", "free_last", free_last, lo=1)
        lt = torch.tensor(list(lam), dtype=F64) if lam is not None else None
        if lt is None or lt.shape != (e + 1,) or not bool((lt[1:] > lt[:-1]).all()):
            raise ValueError(
                f"optimal_path: lam must be {e + 1} increasing numbers (the nodes' log-SNR) with max_ratio, "
                f"got {None if lt is None else lt.tolist()}"
            )
        path = _ratio_path(c, steps, coeff, lt, max_ratio, free_last)
    else:
        path = _plain_path(c, steps, coeff)
    if path is None:
        rule = (
            ""
            if max_ratio is None
            else f" and keeps max_ratio={max_ratio:g} (no step but the last {free_last} longer in lam than "
            f"{max_ratio:g} times the one before)"
        )
        raise ValueError(
            f"optimal_path: no {steps}-step path from node 0 to node {e} has a finite cost{rule}"
        )
    return path


def _plain_path(c: Tensor, steps: int, coeff: float) -> list[int] | None:
    """:func:`optimal_path` without a step-ratio rule (``None`` where no path has a finite cost)."""
    e = c.shape[0] - 1
    # value[k][j]: the least cost from node j to E in exactly k steps; pick[k][j]: its next node
    value = [torch.full((e + 1,), torch.inf, dtype=F64), c[:, e].clone()]
    pick = [torch.zeros(e + 1, dtype=torch.long), torch.full((e + 1,), e, dtype=torch.long)]
    for _ in range(2, steps + 1):
        # the next node i is an intermediate one (i < E); inf outside i > j from the cost matrix
        total = c[:, :e] + coeff * value[-1][None, :e]
        best, arg = total.min(dim=1)
        value.append(best)
        pick.append(arg)
    path = [0]
    for k in range(steps, 0, -1):
        path.append(int(pick[k][path[-1]]))
    return path if path[-1] == e and bool(torch.isfinite(value[steps][0])) else None


def _ratio_path(
    c: Tensor, steps: int, coeff: float, lam: Tensor, max_ratio: float, free_last: int
) -> list[int] | None:
    """:func:`optimal_path` with its step-ratio rule, over (previous node, node) pairs; the previous node
    ``E + 1`` stands for none (the first step, free). After ``i -> j`` the rule allows the next nodes ``l``
    with ``lam_l <= lam_j + max_ratio (lam_j - lam_i)``, a run ``j < l <= L(i, j)`` (``lam`` increases): the
    best of them is a prefix minimum over ``l``, so a step count costs ``O(E^2)``, not ``O(E^3)``."""
    e = c.shape[0] - 1
    reach = lam[None, :] + max_ratio * (lam[None, :] - lam[:, None])  # (E + 1, E + 1): after i -> j
    reach = torch.cat([reach, torch.full((1, e + 1), torch.inf, dtype=F64)])  # i = E + 1: none
    last = (torch.searchsorted(lam[:e].contiguous(), reach.contiguous(), right=True) - 1).clamp(min=0)
    cols = torch.arange(e + 1)[None, :].expand(e + 2, e + 1)
    # value[i, j]: the least cost from node j to E in k steps, having come from i; picks: the next node
    value = c[:, e][None, :].expand(e + 2, e + 1).clone()
    picks = [torch.full((e + 2, e + 1), e, dtype=torch.long)]
    for k in range(2, steps + 1):  # k steps left; the next node l < E
        best, arg = torch.cummin(c[:, :e] + coeff * value[: e + 1, :e], dim=1)  # (E + 1, E): over l' <= l
        upto = last if k > free_last else torch.full_like(last, e - 1)
        value, pick = best[cols, upto], arg[cols, upto]
        picks.append(pick)
    if not bool(torch.isfinite(value[e + 1, 0])):
        return None
    path, before = [0], e + 1
    for k in range(steps, 0, -1):
        before, nxt = path[-1], int(picks[k - 1][before, path[-1]])
        path.append(nxt)
    return path if path[-1] == e else None


TEACHER_STEPS = 60  # the authors' teacher: 60 steps, from 61 timestamps


class GITS(Schedule):
    r"""Geometry-Inspired Time Scheduling (Chen et al. 2024; see :mod:`steerdiff.gits`), as
    ``sd.schedules.GITS``: the grid that a dynamic program picks from a teacher's fine grid, fitted once to
    ``den`` on ``samples`` draws of ``x_T``.

    Args:
        den: the denoiser to fit the schedule to; the schedule serves its process only: one of that kind
            and time range whose ``alpha`` and ``sigma`` agree to :data:`~steerdiff.processes.EQUIVALENT_RTOL`
            of the scale (:func:`~steerdiff.processes.equivalent`; the same betas as diffusers forms them
            in float32 do), else a ``ValueError`` saying what differs and by how much.
        shape: the shape of one sample (default ``den.shape``).
        samples: draws of ``x_T ~ N(0, I)`` the teacher runs from (an integer >= 1; the authors: 256).
        generator: the ``torch.Generator`` they are drawn with, on its own device and then moved to
            ``device`` (:func:`steerdiff.noise.randn`: a CPU generator draws the same ``x_T`` for any device;
            ``None``: torch's global RNG).
        teacher: the teacher's solver, one of :data:`TEACHERS` (default ``"ipndm"``, the authors').
        teacher_steps: its steps ``M`` (an integer >= 2; default ``None``: 60, the authors', from 61
            timestamps, or the count of a list ``teacher_schedule``,
            :func:`~steerdiff.solvers.base.count_steps`).
        teacher_schedule: its schedule (default ``"karras"``, ``rho = 7``, the authors' "polynomial"): the
            candidate nodes.
        coeff: the weight ``coeff^m`` of the ``m``-th step's cost (a finite number > 0; default 1, the plain
            sum of local errors; the authors' 1.15 did worse on the benchmark, see below).
        max_ratio: no step but the last into a noisy node longer in ``lam`` than ``max_ratio`` times the one
            before (a finite number >= 1; default 2, :data:`MAX_RATIO`); ``None``: the authors' program. A
            node count no path through the teacher's nodes keeps it for (a teacher grid whose steps in ``lam``
            grow by more, e.g. ``[80, 72, 53, 19, 0.002]`` of ``EDM`` for 4 and 5 nodes) is a ``ValueError``
            saying so.
        final: ``"zero"`` (default) to fit grids for :func:`steerdiff.sample`'s ``final="zero"`` (``steps``
            nodes, then the clean state, which the teacher also ends in), ``"none"`` for ``final="none"``
            (``steps + 1`` nodes, the last the teacher's last node). A run with the other ``final`` is refused
            (:func:`~steerdiff.solvers.base.make_grid`, :attr:`~steerdiff.schedules.Schedule.final`): asked
            for its ``steps + 1`` nodes a ``"zero"`` fit would give the first ``steps + 1`` of a path into the
            clean state, and ``"zero"`` runs would add a step after a ``"none"`` fit's last node.
        dtype, device: of the teacher's ``x_T`` (default float32, CPU); its states and estimates are kept on
            the CPU in float64 for the cost.
        **cond: passed to the network on every teacher call.

    The teacher runs here, once: :attr:`nfe` network calls per sample (``M``). Each step count's grid is
    then the dynamic program's (cached in :attr:`grids`): ``n`` nodes, the first ``t_max``, a subset of the
    teacher's nodes. Not a name for ``schedule=``: it needs a model, as guidance wrappers need theirs.

    Measured on the solver benchmark (``python bench/gits.py``; the tables in docs/schedules.md),
    fitted on 256 draws of ``x_T`` and scored on 1024 others, relative RMSE vs the exact ODE at NFE 5 / 6 /
    8 / 10: ``ipndm`` 0.184 / 0.161 / 0.109 / 0.058 against 0.227 / 0.190 / 0.119 / 0.073 on its best named
    schedule, ``ddim`` 0.225 / 0.205 / 0.180 / 0.160 against 0.253 / 0.232 / 0.209 / 0.188. The step-ratio
    rule (``max_ratio``): with the authors' program (``None``) ``unipc`` (order 3) is 0.640 / 0.731 / 0.758 /
    0.281 at NFE 7 / 8 / 9 / 10 and ``dpmpp_3m`` 0.613 / 0.763 / 0.802 / 0.308, with the default (2) 0.121 /
    0.074 / 0.078 / 0.131 and 0.140 / 0.115 / 0.122 / 0.119 (``UniPC(order=2)`` 0.133 / 0.059 / 0.034 /
    0.029; ``ddim`` 0.194 / 0.171 / 0.163 / 0.160 without, 0.184 / 0.180 / 0.171 / 0.160 with).
    """

    name = "gits"

    def __init__(
        self,
        den: Denoiser,
        shape: Sequence[int] | None = None,
        samples: int = 256,
        generator: torch.Generator | None = None,
        teacher: str = "ipndm",
        teacher_steps: int | None = None,
        teacher_schedule: ScheduleLike = "karras",
        coeff: float = 1.0,
        max_ratio: float | None = MAX_RATIO,
        final: str = "zero",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **cond: Any,
    ) -> None:
        # here, not at the top: steerdiff.schedules exports GITS, and solvers and sampling import schedules
        from .sampling import sample
        from .solvers.base import FINALS, count_steps, make_grid

        if not isinstance(den, Denoiser):
            raise ValueError(f"GITS: den must be a steerdiff Denoiser, got {type(den).__name__}")
        if shape is None:
            if den.shape is None:
                raise ValueError("GITS: shape (of one sample) is needed where den.shape is not set")
            shape = den.shape
        shape = sizes("GITS", "shape", shape)
        samples = integer("GITS", "samples", samples, lo=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"GITS: generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.teacher = choice("GITS", "teacher", teacher, TEACHERS)
        self.teacher_schedule = get_schedule(teacher_schedule, "GITS")
        self.coeff = real("GITS", "coeff", coeff, lo=0, lo_open=True)
        self.max_ratio = None if max_ratio is None else real("GITS", "max_ratio", max_ratio, lo=1)
        self.final = choice("GITS", "final", final, FINALS)
        if teacher_steps is None:  # 60, or a list teacher_schedule's count
            teacher_steps = count_steps("GITS", None, self.teacher_schedule, self.final, TEACHER_STEPS)
        self.teacher_steps = integer("GITS", "teacher_steps", teacher_steps, lo=2)
        self.process: Process = den.process

        dtype = sample_dtype("GITS", "dtype", dtype)
        x_T = randn((samples, *shape), generator, dtype, device_or_none("GITS", "device", device))
        states, x0 = [x_T], []

        def record(d: dict[str, Any]) -> None:
            # on the CPU, as the cost matrix and the grid's alpha are (and off the accelerator's memory)
            states.append(d["x"].to("cpu", F64, copy=True))
            x0.append(d["denoised"].to("cpu", F64, copy=True))

        grid = make_grid(self.process, self.teacher_schedule, self.teacher_steps, self.final)
        _, info = sample(
            den,
            x_T,
            steps=self.teacher_steps,
            solver=self.teacher,
            schedule=self.teacher_schedule,
            final=self.final,
            callback=record,
            return_info=True,
            **cond,
        )
        alpha = torch.tensor(grid.alpha, dtype=F64).reshape(-1, *[1] * (x_T.ndim))
        y = torch.stack([states[0].to("cpu", F64), *states[1:]]) / alpha
        s = [sg / a for sg, a in zip(grid.sigma, grid.alpha, strict=True)]
        self.teacher_times: list[float] = grid.t[: len(grid.t) - grid.clean_end]
        """The candidate nodes: the teacher's grid (without its clean end)."""
        self.teacher_lam: list[float] = list(grid.lam)
        """Their log-SNR ``lam`` (then ``inf``, the clean end, with ``final="zero"``), for the ratio rule."""
        self.cost = cost_matrix(y, torch.stack(x0[: grid.steps]), s)
        """The ``(E + 1, E + 1)`` cost matrix (:func:`cost_matrix`; node ``E`` the clean state with
        ``final="zero"``)."""
        self.nfe: int = info.nfe
        """Network calls per sample the fit made (the teacher's)."""
        self.grids: dict[int, Tensor] = {}
        """The grids made so far, by node count."""

    def nodes(self, process: Process, n: int) -> Tensor:
        # the range too: the grid's first node is the fitted process's t_max (EDM(sigma_max=80) and
        # EDM(sigma_max=160) have the same alpha and sigma)
        fitted = self.process
        off = difference(process, fitted)
        if off is None and (process.t_min, process.t_max) != (fitted.t_min, fitted.t_max):
            off = (
                f"another time range ([{process.t_min:g}, {process.t_max:g}] against "
                f"[{fitted.t_min:g}, {fitted.t_max:g}])"
            )
        if off is not None:
            raise ValueError(
                f"{self!r}: process {process!r} is not the one it was fitted to, {fitted!r}: {off}; fit a "
                "GITS with a denoiser of this process"
            )
        if n not in self.grids:
            e = self.cost.shape[0] - 1
            steps = n if self.final == "zero" else n - 1
            if not 1 <= steps <= e:
                lo, hi = (1, e) if self.final == "zero" else (2, e + 1)
                raise ValueError(
                    f"{self!r}: {n} nodes asked; fitted with final={self.final!r} it gives {lo} to {hi} "
                    f"nodes (teacher_steps={self.teacher_steps}); raise teacher_steps for more"
                )
            # the last step into a noisy node is free: lower_order_final takes it at order <= 2
            free = 2 if self.final == "zero" else 1
            try:
                path = optimal_path(self.cost, steps, self.coeff, self.teacher_lam, self.max_ratio, free)
            except ValueError as err:
                if self.max_ratio is None:
                    raise
                # the rule leaves no path where the teacher's grid has a gap in lam over max_ratio times the
                # steps before it that a path of this length must cross at a ruled step
                raise ValueError(
                    f"{self!r}: no grid of {n} nodes through the teacher's nodes keeps max_ratio="
                    f"{self.max_ratio:g} ({err}); fit it with max_ratio=None (the authors' program) or a "
                    "larger one, or with a teacher grid of more even steps in lam, or ask for another number "
                    "of nodes"
                ) from None
            self.grids[n] = torch.tensor([self.teacher_times[p] for p in path[:n]], dtype=F64)
        return self.grids[n].clone()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a fit pickled before the step-ratio rule (no max_ratio, teacher_lam): the authors' program, which
        # made the grids it has cached; lam of its nodes (then the clean end's inf), which it does not read
        if "max_ratio" not in state:
            state = {**state, "max_ratio": None}
            state.setdefault(
                "teacher_lam",
                state["process"].lam(state["teacher_times"]).tolist()
                + [math.inf] * (state["final"] == "zero"),
            )
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"GITS(teacher={self.teacher!r}, teacher_steps={self.teacher_steps}, coeff={self.coeff:g}, "
            f"max_ratio={self.max_ratio if self.max_ratio is None else format(self.max_ratio, 'g')}, "
            f"final={self.final!r})"
        )
