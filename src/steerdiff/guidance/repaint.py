r"""RePaint (Lugmayr, Danelljan, Romero, Yu, Timofte & Van Gool 2022, "RePaint: Inpainting using
Denoising Diffusion Probabilistic Models", CVPR): replacement of the known region, with resampling.

Their Alg. 1 at step ``t``: the known pixels of ``x_{t-1}`` are a forward sample of the observation,
``alpha_{t-1} y + sigma_{t-1} n``; the unknown ones come from the DDPM step from ``x_t``; the two are
merged; and ``U - 1`` times the merged ``x_{t-1}`` is noised back to ``t`` (``q(x_t | x_{t-1})``) and
the step redone ("resampling", which harmonizes the unknown region with the known one). Their
schedule jumps back ``j`` steps at a time (``j = 10``, ``U = 10`` on 250 steps) instead of one.

Two pieces here:

* :class:`RePaint`, a denoiser wrapper (every solver): at ``(x_t, t)`` the measured component of
  ``x_t`` is replaced by a fresh forward sample, ``x_t <- x_t + A^+ (alpha y + sigma A z - A x_t)``,
  the base denoiser runs there, and its ``x0`` is made consistent, ``x0 <- x0 + A^+ (y - A x0)``.
  For :class:`~steerdiff.inverse.Inpaint` (``A^+ = A^T``) these are the paper's "known pixels from
  ``alpha y + sigma z``" and "known pixels of the final image = ``y``"; any operator with a
  pseudo-inverse works the same way on its row space. With ``solver="ddpm"`` this is Alg. 1 with
  ``U = 1``: the unknown region follows the DDPM step (the null-space part of ``x_t`` is untouched by
  the replacement), and the known region of the state is redrawn at every evaluation -- in Alg. 1
  it is drawn once per step and used at the next evaluation, which has the same law (independent
  of the unknown region either way).
* :func:`repaint_sample`, Alg. 1 with resampling jumps: DDPM steps with :class:`RePaint` over a grid
  of ``steps`` nodes ``0`` (``x_T``) to ``steps - 1`` (Alg. 1's ``x_1``), then the clean state
  ``steps``; each time it reaches a jump node ``k`` -- ``steps - 1`` and every ``j``-th node back
  towards ``x_T``, ``k = steps - 1 - m j >= j`` -- it noises the state back to node ``k - j`` with the
  forward transition ``q(x_{k-j} | x_k)`` and descends again, ``resample - 1`` times per such node.
  NFE is :func:`repaint_nfe`.

The jump nodes are those of the authors' code (``get_schedule_jump(t_T=steps, jump_length=j,
jump_n_sample=U)``, whose entries are the 0-based levels of the state, ``-1`` the clean one; node
``k`` is level ``steps - 1 - k``). At ``j = 1`` that is Alg. 1 exactly: every step is redone but the
last, ``x_1 -> x_0`` ("if u < U and t > 1"). diffusers' ``RePaintScheduler`` builds the same list,
but ``RePaintPipeline`` evaluates the net at each entry, so its jumps sit one node nearer the clean
end, from ``steps, steps - j, ... > j``: at ``j = 1`` it redoes the final step into ``x_0`` and never
the first one from ``x_T``, which Alg. 1 does the other way round; the NFE is the same.

RePaint takes ``y`` as exact (noiseless inpainting); with a noisy observation the samples' measured
component is ``y`` itself, a bias of order the noise level. No gradients are needed.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import Tensor

from .. import schedules as _schedules
from .._checks import boolean, integer
from ..denoiser import Denoiser, Prediction, check_denoiser
from ..inverse.operators import LinearOperator
from ..noise import Generators, check_generators, make_noise, randn
from ..sampling import SampleInfo, check_seeded, check_x_T, diverged_step
from ..schedules import ScheduleLike
from ..solvers._exp import noising
from ..solvers.base import DEFAULT_STEPS, Model, advance, make_grid, to_sample_dtype, work_dtype
from ..solvers.ddpm import DDPM
from ._measurement import MeasurementGuided
from .base import with_estimate

__all__ = ["RePaint", "repaint_nfe", "repaint_sample"]


class RePaint(MeasurementGuided):
    """Replace the measured component of ``x_t`` by a forward sample of ``y``; make ``x0`` consistent.

    Args:
        base: the prior's denoiser.
        operator: the measurement operator (an :class:`~steerdiff.inverse.Inpaint` mask for the paper's
            setting; any operator with ``pinv``).
        y: the observation, ``operator.shape_out`` (broadcast over the batch) or one per sample,
            taken as exact.
        generator: draws the forward samples ``z`` of the replacement: one ``torch.Generator`` for
            the whole batch, or a list with one per row (row ``b``'s ``z`` from ``generator[b]``, so a
            row does not depend on its batch; needed under a sampler's per-row list, which refuses a
            single one; under a particle method one per particle, batch-major). ``None``: torch's
            global RNG (refused by a seeded sampler).
    """

    noise_generators = ("generator",)

    def __init__(
        self, base: Denoiser, operator: LinearOperator, y: Tensor, generator: Generators = None
    ) -> None:
        super().__init__(base, operator, y)
        generator = check_generators("RePaint", generator)
        self.check_pinv()
        self.generator = generator

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The replacement and the projection in ``x``'s dtype, the base's net in ``net_dtype``
        (:meth:`~steerdiff.denoiser.Denoiser.evaluate`)."""
        op, y = self.operator, self.observation(x)
        alpha, sigma = self.coefficients(t, x)[:2]
        z = randn(x.shape, self.generator, x.dtype, x.device)
        # x + A^+ (alpha y + sigma A z - A x), with A^+ (sigma A z - A x) = A^+ A (sigma z - x)
        known = x + op.pinv(op.forward(sigma * z - x)) + alpha * op.pinv(y)
        pred = self.base.evaluate(known, t, net_dtype, **cond)
        return with_estimate(pred, x=x, x0=self.project(pred.x0))

    def own_noise(self) -> list[tuple[str, Generators]]:
        """``base``'s and its replacement noise's."""
        return [*super().own_noise(), ("RePaint", self.generator)]

    def __repr__(self) -> str:
        return f"RePaint({self.base!r})"


def repaint_nfe(steps: int, resample: int = 1, jump: int = 1) -> int:
    """Denoiser calls of :func:`repaint_sample`:
    ``steps + (resample - 1) jump floor((steps - 1) / jump)``, ``floor((steps - 1) / jump)`` jump nodes
    (``jump = 1``: ``(steps - 1) resample + 1``, Alg. 1's ``U`` evaluations per step but the last). The
    NFE is this times the denoiser's ``cost`` (2 for a :class:`~steerdiff.guidance.CFG` that guides)."""
    steps = integer("repaint_nfe", "steps", steps, lo=1)
    resample = integer("repaint_nfe", "resample", resample, lo=1)
    jump = integer("repaint_nfe", "jump", jump, lo=1)
    return steps + (resample - 1) * jump * ((steps - 1) // jump)


@overload
def repaint_sample(
    den: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    *,
    resample: int = ...,
    jump: int = ...,
    schedule: ScheduleLike = ...,
    generator: Generators = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def repaint_sample(
    den: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    *,
    resample: int = ...,
    jump: int = ...,
    schedule: ScheduleLike = ...,
    generator: Generators = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, SampleInfo]: ...


@overload
def repaint_sample(
    den: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    /,
    x_T: Tensor,
    steps: int | None = ...,
    *,
    resample: int = ...,
    jump: int = ...,
    schedule: ScheduleLike = ...,
    generator: Generators = ...,
    return_info: bool,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]: ...


def repaint_sample(
    den: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    /,
    x_T: Tensor,
    steps: int | None = None,
    *,
    resample: int = 1,
    jump: int = 1,
    schedule: ScheduleLike = "time_uniform",
    generator: Generators = None,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """RePaint's Alg. 1 with resampling jumps (see the module): a sample of ``den`` given ``y = A x0``.

    ``den``, ``operator`` and ``y`` are positional-only, so that ``**cond`` may hold any name: a class
    label ``y=`` for the net, say, as ``repaint_sample(den, operator, y_obs, x_T, steps, y=labels)``.

    Args:
        den: the prior's denoiser (wrapped here in :class:`RePaint`).
        operator, y: the measurement (``y`` exact).
        x_T: initial noise, ``(batch, *operator.shape_in)``. The result has its dtype; for
            float16/bfloat16 the state, the DDPM steps and the replacement are float32 and only the
            net runs in ``x_T``'s dtype, as in :func:`steerdiff.sample`.
        steps: grid nodes (``final="zero"``: the last step returns the denoised estimate); ``None`` (the
            default): an explicit grid's count (``schedule`` a list of times), else 10, as for
            :func:`steerdiff.sample`.
        resample: ``U``, the passes over each jump interval (1: no resampling).
        jump: ``j``, the jump length in grid steps, from the nodes ``steps - 1 - m j >= j`` (see the
            module); from ``j >= steps`` on there is none, so nothing is resampled (the NFE,
            :func:`repaint_nfe`, is then ``steps``).
        schedule: the grid's schedule (default ``"time_uniform"``, as DDPM).
        generator: all randomness (DDPM noise, forward jumps, replacement samples): one
            ``torch.Generator``, or a list with one per row of ``x_T`` (row ``b`` from ``generator[b]``
            alone: a row is the same run alone or in any batch).
        return_info: also return a :class:`~steerdiff.SampleInfo` (NFE = :func:`repaint_nfe` times
            ``den.cost``: 2 for a :class:`~steerdiff.guidance.CFG` that guides).
    """
    resample = integer("repaint_sample", "resample", resample, lo=1)
    jump = integer("repaint_sample", "jump", jump, lo=1)
    return_info = boolean("repaint_sample", "return_info", return_info)
    check_denoiser("repaint_sample", "den", den)
    size = check_x_T(den, x_T, "repaint_sample")
    guided = RePaint(den, operator, y, generator)
    check_seeded(guided, generator, "repaint_sample")
    sched = _schedules.get(schedule, "repaint_sample")
    grid = make_grid(den.process, sched, steps, who="repaint_sample", default=DEFAULT_STEPS)
    solver = DDPM()
    model = Model(guided, cond, make_noise(generator, "repaint_sample"), net_dtype=x_T.dtype, scale=size)
    diverged = diverged_step(solver, model)
    state = solver.init_state(grid)
    passes = [0] * (grid.steps + 1)
    x, i = x_T.to(work_dtype(x_T.dtype)), 0
    while i < grid.steps:
        x = advance(solver.step(model, x, i, grid, state), model.noise, grid.t[i], grid.t[i + 1])
        model.note_state(x, i, grid.t[i + 1], grid.alpha[i + 1], grid.sigma[i + 1], diverged)
        i += 1
        if jump <= i < grid.steps and (grid.steps - 1 - i) % jump == 0 and passes[i] < resample - 1:
            passes[i] += 1
            back = i - jump  # forward transition q(x_back | x_i): mean ratio x_i, variance the rest
            ratio, std = noising((grid.alpha[i], grid.sigma[i]), (grid.alpha[back], grid.sigma[back]))
            x = ratio * x + std * model.noise(grid.t[i], grid.t[back], x)
            i = back
    model.check_finite()
    x = to_sample_dtype("repaint_sample", x, x_T.dtype)
    if return_info:
        return x, SampleInfo(model.nfe, grid, solver, sched)
    return x
