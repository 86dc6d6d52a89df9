r"""Projected Coupled Diffusion (Luan, Goh, Ng & Ling 2025, "Projected Coupled Diffusion for Test-Time
Constrained Joint Generation", arXiv:2508.10531): ``K`` correlated samples from ``K`` pretrained denoisers
(possibly different nets), coupled by a cost and kept in a constraint set.

The joint target is ``p_1(x^1) ... p_K(x^K) exp(-scale c(x^1, ..., x^K))``. Two pieces:

* :class:`Coupled`, one denoiser over the stacked state ``x = (x^1, ..., x^K)``, shape
  ``(batch, K, *shape)`` (``x[:, k]`` is model ``k``'s sample): model ``k`` denoises ``x[:, k]`` and the
  coupled guidance ``g = -scale grad_x c(x_t)``, the cost at the noisy state, is added to the stacked score
  (:func:`~steerdiff.guidance.add_score`): ``eps'^k = eps^k + sigma scale grad_{x^k} c(x_t)``. Every solver
  runs it, deterministic or stochastic: at ``t -> 0`` the score is the target's, in between it is the sum of
  the marginal scores and the cost's gradient at the noisy state -- not the score of the noised target,
  so the sampled law is an approximation that over-couples: on ``tests/test_pcd.py``'s two mixtures with
  ``c = ||x^1 - x^2||^2 / 2``, ``E||x^1 - x^2||^2`` is 0.72 / 0.62 / 0.56 of the exact joint's at ``scale``
  0.5 / 2 / 4 (100 DDPM steps; sliced W2 0.12-0.16 against 0.23-0.50 for independent samples).
* :func:`pcd_sample`, the paper's sampler: the steps of a solver on ``den`` (a :class:`Coupled`; default
  DDPM, the paper's) with the state projected after every step, ``x_{i+1} <- P(x_{i+1})``, the clean step
  included, so every sample lies in the constraint set ``C`` of ``P`` (to the precision of ``P``).

With ``solver="ddpm"`` on the consecutive timesteps of a discrete VP, one step from ``t`` to ``t - 1`` is

    x^k_{t-1} = P( m^k_t(x^k_t) - scale kappa_t grad_{x^k} c(x_t) + s_t z^k ),
    kappa_t = beta_t / sqrt(1 - beta_t),

``m^k_t`` and ``s_t`` the unguided DDPM mean and standard deviation of model ``k``; ``kappa_t`` is the
posterior-mean weight of ``x0`` times Tweedie's ``sigma^2 / alpha`` (as for :class:`~steerdiff.guidance.DPS`).
That is the authors' code (``pusht/.../diffusion_unet_lowdim_proj_coup_policy.py``): the DDPM step, then
``- grad_scale * beta_t / sqrt(alpha_t) * grad c`` with the cost at ``x_t`` (their default,
``point_estimate=False``), then the projection of ``x_{t-1}`` -- the state, not the denoised estimate.
Their multi-robot code puts the gradient at the DDPM mean instead of ``x_t`` and weights it by the
posterior variance ``s_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` instead of ``kappa_t`` (near it away
from ``t = 0``, smaller close to it). A coupling through the denoised estimates
(their ``point_estimate=True``, a gradient through every net) is not implemented here.

The projection is a sampler's move, not a denoiser's: a denoiser returns estimates at the solver's state
and cannot move it. :func:`pcd_sample` is :func:`~steerdiff.sample` with ``project`` applied after every
step (:func:`~steerdiff.sampling.run_grid`); a multistep solver restarts its history after each projection
(:meth:`~steerdiff.solvers.base.Solver.moved`), so it runs at first order -- as the paper, take DDPM. An
affine set ``{A x = y}`` of a :mod:`steerdiff.inverse` operator ``op`` on the stacked sample shape has the
projection ``lambda x: x + op.pinv(y - op.forward(x))``; a box has ``lambda x: x.clamp(lo, hi)``.

The gradient step is explicit: for a cost of curvature ``L`` it needs ``scale kappa_i L < 2`` on every
step ``i`` (``kappa_i`` reaches 0.2 on 100 time-uniform steps of the usual linear betas: the quadratic
coupling above, ``L = 2``, diverges there at ``scale = 8`` and not on 1000 steps).

NFE: ``K`` network evaluations per call (the sum of the models' costs); the coupling gradient is the
cost's alone (no network in it), the projection none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import held_by, real
from ..denoiser import Denoiser, Prediction, check_denoiser
from ..sampling import SampleInfo, sample_as
from ..schedules import ScheduleLike
from ..solvers.base import Solver
from .base import Guided, add_score, grad_leaf, grad_on, process_difference, value_grad

__all__ = ["Coupled", "pcd_sample"]

Cost = Callable[[Tensor], Tensor]


class Coupled(Guided):
    """``K`` denoisers on the stacked state ``(batch, K, *shape)``, coupled by ``-scale grad c`` (see the
    module).

    Args:
        denoisers: the ``K >= 1`` models, one process (their nets, predictions and time maps may differ),
            one sample shape where known, all with a learned variance or none.
        cost: ``c``, a differentiable map of the stacked state ``(n, K, *shape)`` to ``(n,)`` costs, or
            ``None`` for no coupling (independent samples; with :func:`pcd_sample`, the paper's
            projection-only ablation).
        scale: ``>= 0``, the weight of the cost in the target ``prod_k p_k exp(-scale c)``; 0 is no coupling.

    Model ``k`` gets the sampler's ``**cond`` as it is. The stacked prediction holds the models' ``x0`` where
    every one holds it, else their ``eps``; ``var_interp`` stacked where they have a learned variance.
    ``cost`` (the attribute) is the network evaluations of the latest call, the sum of the models'.
    """

    base_arg = "denoisers"

    def __init__(self, denoisers: Sequence[Denoiser], cost: Cost | None = None, scale: float = 1.0) -> None:
        who = "Coupled"
        if isinstance(denoisers, Denoiser) or not isinstance(denoisers, Sequence) or len(denoisers) == 0:
            raise ValueError(
                f"{who}: denoisers must be a non-empty list of steerdiff Denoisers (one per coupled sample), "
                f"got {type(denoisers).__name__}"
            )
        dens = tuple(check_denoiser(who, f"denoisers[{k}]", d) for k, d in enumerate(denoisers))
        first = dens[0]
        super().__init__(first)
        for k, d in enumerate(dens[1:], 1):
            off = process_difference(d, first)
            if off is not None:
                raise ValueError(
                    f"{who}: denoisers must share a process (one grid steps them all), denoisers[{k}] has "
                    f"{d.process!r}, denoisers[0] {first.process!r}: {off}"
                )
            if d.shape is not None and first.shape is not None and d.shape != first.shape:
                raise ValueError(
                    f"{who}: denoisers must have one sample shape (the state stacks them), denoisers[{k}] "
                    "has "
                    f"{d.shape}, denoisers[0] {first.shape}"
                )
            if d.learned_variance != first.learned_variance:
                raise ValueError(
                    f"{who}: denoisers must all have a learned variance or none, denoisers[{k}] has "
                    f"learned_variance={d.learned_variance}, denoisers[0] {first.learned_variance}"
                )
        if cost is not None and not callable(cost):
            raise ValueError(
                f"{who}: cost must be None or a callable(x) -> (n,) costs, got {type(cost).__name__}"
            )
        self.denoisers = dens
        self.coupling = cost
        self.scale = real(who, "scale", scale, lo=0)
        known = next((d.shape for d in dens if d.shape is not None), None)
        self.shape = None if known is None else (len(dens), *known)
        self.cost = sum(d.cost for d in dens)

    @property
    def guidance_scale(self) -> float | None:
        """The largest of the models' CFG scales (the most cautious default solver); ``None`` if none has
        one."""
        scales = [s for s in (d.guidance_scale for d in self.denoisers) if s is not None]
        return max(scales) if scales else None

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        k = len(self.denoisers)
        if x.ndim < 2 or x.shape[1] != k:
            raise ValueError(
                f"Coupled: x must be the stacked state (batch, {k}, *shape) of its {k} denoisers, "
                f"got {tuple(x.shape)}"
            )
        preds = [d.evaluate(x[:, j].contiguous(), t, net_dtype, **cond) for j, d in enumerate(self.denoisers)]
        self.cost = sum(d.cost for d in self.denoisers)
        alpha, sigma = self.coefficients(t, x)[:2]
        if all(p.x0_given for p in preds):
            pred = Prediction(x, alpha, sigma, x0=torch.stack([p.x0 for p in preds], 1))
        else:
            pred = Prediction(x, alpha, sigma, eps=torch.stack([p.eps for p in preds], 1))
        variances = [p.var_interp for p in preds if p.var_interp is not None]
        if variances:  # all or none: checked at construction
            pred.var_interp = torch.stack(variances, 1)
        if self.coupling is None or self.scale == 0:
            return pred
        scale = held_by("Coupled", "scale", self.scale, x.dtype)
        with grad_on("Coupled", x) as nested:
            xr = grad_leaf(x)
            value = self.coupling(xr)
            if not isinstance(value, Tensor) or value.shape != (x.shape[0],):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"Coupled: cost must return one value per sample, ({x.shape[0]},), got {got}"
                )
            g = value_grad("Coupled", "cost", value, xr, create_graph=nested)
        return add_score(pred, -scale * g)

    def describe_shape(self) -> str:
        """``shape``, ``(K, *shape)``, with the stacked layout named: ``K`` and the models' sample shape."""
        k, inner = len(self.denoisers), None if self.shape is None else self.shape[1:]
        return (
            f"{self.shape}: Coupled's stacked state is (batch, K, *shape), K = {k} models of sample shape "
            f"{inner}"
        )

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """The ``K`` models."""
        return self.denoisers

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy whose models are their ``take_rows(rows, n)``; itself where none changes."""
        taken = tuple(d.take_rows(rows, n) for d in self.denoisers)
        if all(a is b for a, b in zip(taken, self.denoisers, strict=True)):
            return self
        out = copy.copy(self)
        out.denoisers, out.base = taken, taken[0]
        return out

    def __repr__(self) -> str:
        return f"Coupled({list(self.denoisers)!r}, scale={self.scale:g})"


def pcd_sample(
    den: Denoiser,
    x_T: Tensor,
    project: Callable[[Tensor], Tensor],
    steps: int | None = None,
    solver: str | Solver = "ddpm",
    schedule: ScheduleLike = "time_uniform",
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Projected Coupled Diffusion (see the module): :func:`~steerdiff.sample` of ``den`` with the state
    projected, ``x <- project(x)``, after every step, the final clean one included.

    Args:
        den: the denoiser, a :class:`Coupled` for PCD (any denoiser: projected sampling of one model).
        x_T: initial noise, ``(batch, K, *shape)`` for a :class:`Coupled` of ``K`` models.
        project: ``P``, a map of the state ``(batch, K, *shape)`` onto the constraint set, returning a tensor
            of its shape, dtype and device (the solver state's: float32 for a half-precision ``x_T``).
        steps: grid steps, default (``None``) 100 or the explicit grid's count (as ``sample``'s); with
            ``final="zero"`` (default) the last one returns the denoised estimate, then projected.
        solver: default ``"ddpm"``, the paper's; any solver runs, a multistep one at first order (its
            history restarts after each projection); ``pndm`` / ``plms`` redo their warm-up on every step
            (4 / 2 evaluations a step: 154 / 78 NFE against 58 / 42 unprojected, 20 steps, ``K = 2``).
        schedule: default ``"time_uniform"``, as DDPM.
        **kwargs: ``sample``'s other keywords (``final``, ``generator``, ``callback``, ``return_info``, ...)
            and the net's conditions.

    Returns:
        ``sample``'s result; NFE ``den.cost`` per evaluation (``K`` for ``K`` plain models), so ``K`` per
            step under DDPM.
    """
    if not callable(project):
        raise ValueError(
            "pcd_sample: project must be a callable(x) -> x onto the constraint set, got "
            f"{type(project).__name__} (without a projection, sample the Coupled denoiser with "
            "steerdiff.sample)"
        )
    return sample_as(
        "pcd_sample", den, x_T, steps, solver, schedule, project=project, default_steps=100, **kwargs
    )
