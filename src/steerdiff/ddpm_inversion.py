r"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024, "An Edit Friendly DDPM
Noise Space: Inversion and Manipulations"): the noise maps with which a stochastic sampler reproduces a given
clean sample exactly, and with which it *edits* it under another condition or guidance.

A one-step stochastic sampler (DDPM, Ho et al. 2020; DDIM with ``eta > 0``; ...) moves ``x`` from grid node
``i`` to ``i + 1`` by its Gaussian transition (:class:`~steerdiff.solvers.base.Transition`),

    x_{i+1} = mu_i(x_i) + s_i z_i,        z_i ~ N(0, I),

so the ``N`` maps ``z_0 .. z_{N-1}`` and ``x_T = x_{t_0}`` are a latent code of its output. The paper's
inversion: take the clean ``x_0`` as the state at the grid's last node ``t_N`` (as :func:`steerdiff.invert`
does), draw the other nodes' states *independently* from the forward marginals (not a Markov chain),

    x_{t_i} = alpha_i x_0 + sigma_i eps_i,    eps_i ~ N(0, I) independent,   i = 0 .. N-1,

and solve the sampler's step for its noise, one network evaluation per step:

    z_i = (x_{t_{i+1}} - mu_i(x_{t_i})) / s_i.

Sampling from ``x_{t_0}`` with these maps goes through the same states and ends at ``x_0``. Each state the
extraction goes on from is recomputed as the sampler computes it, ``mu_i + s_i z_i`` (the authors' code
does the same to keep the rounding from accumulating), so the replay is bit for bit the extraction's chain
and ends at ``x_0`` up to one rounding of the last step. Editing is sampling with the same maps (and from
the same ``x_T``) under another condition or guidance (``den``); starting at a later node ``t_skip`` from
that node's state, with the maps from there on, keeps more of ``x_0`` (the paper's ``T_skip``).

The maps are not the sampler's native noise: ``x_{t_i}`` and ``x_{t_{i+1}}`` are drawn independently, so
``z_i`` holds ``x_{t_{i+1}}``'s noise ``sigma_{i+1} eps_{i+1}`` and, through ``mu_i``, ``x_{t_i}``'s.
Where the denoised estimate is exact (a point mass), DDPM's ``mu_i = alpha_{i+1} x_0 + sigma_{i+1} e^{-h}
eps_i`` and ``s_i = sigma_{i+1} sqrt(1 - e^{-2h})`` (``h = lam_{i+1} - lam_i``) give
``Var z_i = (1 + e^{-2h}) / (1 - e^{-2h})``, ``~ 1 / h`` for short steps rather than 1, and consecutive maps
share ``eps_{i+1}`` with opposite signs (negatively correlated): the paper's "higher variance, not
independent across timesteps". That variance carries ``x_0``'s structure into an edit.

Which sampler: any stochastic solver whose step returns its Gaussian transition and keeps no history
(``ddpm``, ``DDIM(eta > 0)``, ``euler_ancestral``, ``euler_maruyama``, ``flow_sde``, ``dpm_2_ancestral``,
``dpmpp_2s_ancestral``, ``lcm``, ``tcd``, ``cps``); one that draws noise inside its step (``dpmpp_sde``,
``edm_sde``, ``restart``) or reads the trajectory's past (``dpmpp_2m_sde``, ``er_sde``, ``sa_solver``) has no
such map and is refused, as is a deterministic one (``sd.invert`` inverts those) and one with a step that
draws no noise on the grid (``tcd``'s last step on SD's betas, ``edm_sde`` outside its churn range: the drawn
state there is out of its reach). The paper uses DDPM (DDIM's ``eta = 1``), 100 steps of Stable Diffusion,
classifier-free guidance 3.5 for the source prompt and 15 for the target (the authors' ``main_run.py``
defaults; ``skip`` there is a list of ``T_skip`` values): invert with ``sd.guidance.CFG(den, den, 3.5,
uncond_kwargs=...)`` and the source condition, edit with a CFG of scale 15 and the target's. Unlike the
authors' code, which ends with the deterministic step into ``sigma = 0`` (its map set to 0, so the
reconstruction is ``x_0`` only up to that step's denoising), the grid here ends at its last noisy node
(``final="none"``) and the reconstruction is exact.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import schedules as _schedules
from . import solvers as _solvers
from ._checks import boolean, integer
from .denoiser import Denoiser, check_denoiser
from .noise import Generators, RefusedNoise, ReplayNoise, check_generators, randn
from .sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T
from .schedules import ScheduleLike
from .solvers.base import (
    Grid,
    Model,
    Solver,
    Transition,
    advance,
    count_steps,
    diverged_error,
    keeps_history,
    make_grid,
    work_dtype,
)

__all__ = ["EditNoise", "ddpm_invert"]

log = logging.getLogger(__name__)

FITTING = (
    "a one-step stochastic solver whose step returns its Gaussian transition (ddpm, DDIM(eta > 0), "
    "euler_ancestral, euler_maruyama, flow_sde, dpm_2_ancestral, dpmpp_2s_ancestral, lcm, tcd, cps)"
)
# sample's keyword arguments that ddpm_invert has none of: given to it they would reach the net as conditions
SAMPLE_ONLY = ("final", "callback", "corrector", "corrector_steps", "snr", "return_info")


@dataclass
class EditNoise:
    """The result of :func:`ddpm_invert`: the states ``xs`` at the grid's ``N + 1`` nodes (``xs[0]`` is
    ``x_T``; ``xs[N]`` is ``x_0`` up to rounding), the ``N`` noise maps ``z`` and ``noise``, the
    :class:`~steerdiff.noise.ReplayNoise` that replays them as a sampler's ``generator``; ``times`` the
    nodes' process times, ``solver`` the solver they belong to, ``nfe`` the inversion's network
    evaluations (one per step for ``ddpm``, times the denoiser's cost); ``dtype`` that of ``x_0``.

    The states and maps are in the run's work dtype (:func:`~steerdiff.solvers.base.work_dtype`: float32 for
    a half-precision ``x_0``, whose net runs in half precision as in ``sample``); :meth:`sample_kwargs` hands
    the start state over in ``dtype``, so the replay's net runs as the extraction's did. In half precision the
    replay from ``skip = 0`` is exact (``x_T`` is drawn representable in ``dtype``); from a later node it
    starts from that state rounded to ``dtype``.

    Memory: ``2 N + 1`` copies of the batch in the work dtype, on ``x_0``'s device (``noise`` holds the
    tensors of ``z``, not copies): 201 at the paper's 100 steps. The replay moves each map to the run's
    device and dtype as it is drawn."""

    xs: list[Tensor]
    z: list[Tensor]
    noise: ReplayNoise
    times: list[float]
    solver: Solver
    nfe: int
    dtype: torch.dtype

    @property
    def x_T(self) -> Tensor:
        """The state at the grid's first node (in ``dtype``), where sampling with :attr:`noise` starts."""
        return self.xs[0].to(self.dtype)

    @property
    def steps(self) -> int:
        """The number of steps ``N``."""
        return len(self.z)

    def sample_kwargs(self, skip: int = 0) -> dict[str, Any]:
        """The arguments of :func:`steerdiff.sample` that replay the maps from node ``skip``
        (``0 <= skip < N``; the paper's ``T_skip``): ``x_T`` (the state there), ``steps`` (``N - skip``),
        ``solver``, ``schedule`` (the nodes from ``skip`` on), ``final="none"`` and ``generator``
        (:attr:`noise`). ``sd.sample(den, **inv.sample_kwargs(skip), **cond)`` edits under ``den`` and
        ``cond``; with the inversion's own it returns ``xs[N]``."""
        skip = integer("EditNoise.sample_kwargs", "skip", skip, lo=0, hi=self.steps - 1)
        return {
            "x_T": self.xs[skip].to(self.dtype),
            "steps": self.steps - skip,
            "solver": self.solver,
            "schedule": _schedules.Custom(self.times[skip:]),
            "final": "none",
            "generator": self.noise,
        }


def _check_solver(who: str, solver: str | Solver, slv: Solver, grid: Grid) -> None:
    if not slv.noisy_on(grid):
        raise ValueError(
            f"{who}: solver={solver!r} is deterministic (draws no noise on this grid): it has no noise maps "
            f"to extract (sd.invert inverts its ODE); use {FITTING}"
        )
    if keeps_history(slv, grid):
        raise ValueError(
            f"{who}: solver {slv.name!r} keeps a history of the trajectory in its state, so its transition "
            f"is not one of the state alone; use {FITTING}"
        )


def _noise_map(who: str, slv: Solver, out: Tensor | Transition, x_next: Tensor, i: int) -> Tensor:
    """``(x_next - mean) / std`` of step ``i``'s transition; a ``ValueError`` where it draws no noise."""
    if not isinstance(out, Transition) or not bool(torch.as_tensor(out.std).gt(0).all()):
        raise ValueError(
            f"{who}: solver {slv.name!r} draws no noise at step {i}, so no noise map leads to the drawn "
            f"state there; use {FITTING}"
        )
    return (x_next - out.mean) / out.std


def ddpm_invert(
    den: Denoiser,
    x_0: Tensor,
    steps: int | None = None,
    solver: str | Solver = "ddpm",
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    generator: Generators = None,
    progress: bool = False,
    **cond: Any,
) -> EditNoise:
    """The edit-friendly noise maps of ``x_0`` (module docstring): the states of the ``steps + 1`` nodes of
    the grid of ``sample(den, x_T, steps, solver, schedule, final="none")`` drawn independently from
    ``q(x_t | x_0)`` (``x_0`` at the last node), and the maps with which ``solver`` goes through them.

    ``sd.sample(den, **inv.sample_kwargs(), **cond)`` returns ``x_0`` (bit for bit ``inv.xs[-1]``);
    ``sd.sample(other, **inv.sample_kwargs(skip), **other_cond)`` edits it (equivalently
    ``sd.sample(other, inv.x_T, steps, solver, schedule, final="none", generator=inv.noise)`` for
    ``skip = 0``).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` under the source condition (guided ones included; not
            one that draws noise itself, whose draws a replay would not repeat).
        x_0: the clean samples, shape ``(batch, ...)``, taken as the state at the grid's last node.
        steps: number of steps ``N``, default (``None``) 10 or ``len(times) - 1`` for explicit times; the
            inversion evaluates the step once per step (``EditNoise.nfe``:
            ``N`` for ``ddpm``, times ``den.cost``).
        solver: a one-step stochastic solver that returns its Gaussian transition: a name or an instance
            (default ``"ddpm"``); deterministic, multistep and in-step-noise solvers are refused.
        schedule: as :func:`~steerdiff.sample`'s; its ``steps + 1`` nodes (explicit times: ``steps``, if
            given, must be ``len(times) - 1``).
        generator: where the states ``x_{t_i}`` are drawn from: ``None``, a ``torch.Generator`` or one per
            batch row (a list: row ``b``'s states and maps then depend only on ``generator[b]``).
        progress: show a tqdm bar.
        **cond: passed to the network on every call (the source condition).

    Raises:
        ValueError: bad arguments (the message names the argument and what is accepted).
        NonFiniteError: the network returned NaN/inf, or a step's mean ``mu_i`` diverged: an entry beyond
            :func:`~steerdiff.solvers.base.state_bound` at the node it reaches (``D`` of ``x_0``; the state
            ``mu_i + s_i z_i`` is the drawn one whatever ``mu_i``, so the maps would carry the divergence).
    """
    who = "ddpm_invert"
    check_denoiser(who, "den", den)
    size = check_x_T(den, x_0, who, "x_0")
    if own := den.own_noise():
        raise ValueError(
            f"{who}: den: {', '.join(dict.fromkeys(name for name, _ in own))} draws noise of its own, "
            "which a replay of the maps would not repeat; pass a denoiser that does not"
        )
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "which extracts noise maps on the grid of sample(..., final='none'); accepted: den, x_0, steps, "
        "solver, schedule, generator, progress and the net's conditions (**cond)",
    )
    sched = _schedules.get(schedule, who)
    steps = count_steps(who, steps, sched, "none", only=who, process=den.process)
    progress = boolean(who, "progress", progress)
    generator = check_generators(who, generator, len(x_0))
    grid = make_grid(den.process, sched, steps, "none", only=who)
    slv = _solvers.get(solver, who)
    _check_solver(who, solver, slv, grid)
    x0 = x_0.to(work_dtype(x_0.dtype))
    noisy = zip(grid.alpha[:-1], grid.sigma[:-1], strict=True)
    # q(x_t | x_0) at every noisy node, independently (noisiest first), and x_0 at the last
    xs = [alpha * x0 + sigma * randn(x0.shape, generator, x0.dtype, x0.device) for alpha, sigma in noisy]
    xs[0] = xs[0].to(x_0.dtype).to(x0.dtype)  # sample_kwargs hands x_T over in x_0's dtype
    xs.append(x0)
    no_draw = RefusedNoise(
        f"{who}: solver {slv.name!r} draws noise inside its step, which has no single noise map to extract; "
        f"use {FITTING}"
    )
    model = Model(den, cond, no_draw, net_dtype=x_0.dtype, scale=size)
    # the divergence guard on the step's mean mu_i, at the node it reaches: the state mu_i + s_i z_i is the
    # drawn one whatever mu_i (z_i cancels it), so a step that diverges shows in mu_i (and in z_i, which an
    # edit replays under another field)
    diverged = functools.partial(
        diverged_error,
        who=f"{who}: the solver {slv.name!r} (its step's mean)",
        fix="the guidance scale may be too large: try less"
        if den.guided
        else "the steps are too long for the model's field: try more steps",
    )
    state = slv.init_state(grid)
    z: list[Tensor] = []
    indices = tqdm(range(steps), desc=who, leave=False) if progress else range(steps)
    for i in indices:
        out = slv.step(model, xs[i], i, grid, state)
        z.append(_noise_map(who, slv, out, xs[i + 1], i))
        assert isinstance(out, Transition)  # _noise_map refused any other step
        model.note_state(out.mean, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged)
        # the state as the sampler computes it from z_i: the replay then goes through these very states
        xs[i + 1] = advance(out, lambda *_, zi=z[-1]: zi, grid.t[i], grid.t[i + 1])
    model.check_finite()
    log.debug("ddpm_invert %s with %s: %d steps, %d NFE", tuple(x_0.shape), slv.name, steps, model.nfe)
    return EditNoise(xs, z, ReplayNoise(grid, z, slv), list(grid.t), slv, model.nfe, x_0.dtype)
