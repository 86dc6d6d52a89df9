r"""Epsilon Scaling against exposure bias, as a denoiser (Ning et al. 2024, "Elucidating the Exposure Bias
in Diffusion Models", ICLR 2024, Sec. 5; code: ADM-ES / EDM-ES).

A net is trained on forward-noised data ``x_t = alpha x0 + sigma eps`` but sampled on the sampler's own
states, which drift from them (exposure bias); the paper measures that the net's noise estimate is
then larger in norm than in training, ``||eps_theta(x_hat_t, t)|| > ||eps_theta(x_t, t)||``, and divides it
at sampling time by

    lambda(t) = k t + b,         eps' = eps / lambda(t),        x0' = (x - sigma eps') / alpha,

(their DDPM step ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta / lambda_t) / sqrt(alpha_t)
+ sigma_t z``; ``k = 0`` is their "uniform schedule" ``lambda = b``, which their code uses by default, e.g.
``b = 1.017`` for CIFAR-10 ADM at 100 steps, 1.004-1.006 for the larger models). :class:`EpsilonScaling`
applies it to any denoiser, so every solver takes it: for a net that predicts ``x0``, ``v``, ``score`` or
``flow`` it scales the ``eps`` that prediction implies, ``eps = (x - alpha x0) / sigma``, and the ``x0``
the solver sees is the one of the scaled ``eps``:

    x0' = x0 + (1 - 1 / lambda) (sigma / alpha) eps,

computed in that form from the held ``x0``. ``t`` is the process time the solver passes (for
``VP.discrete`` the training timestep index ``0 .. N-1``; for other processes their own time, so a
``k`` fitted on one process does not carry over to another). ADM-ES's code indexes its ``lambda`` list
by the *respaced* step (ADM's ``SpacedDiffusion`` renumbers the ``S`` sampling steps ``0 .. S-1``), not
the training timestep: the same for its default uniform schedule (``k = 0``), while a slope ``k_S`` per
respaced step is ``k = k_S (S - 1) / (N - 1)`` per timestep here (on ADM's evenly spaced timesteps).

Where ``alpha`` is 0 (a schedule rescaled to zero terminal SNR) no ``x0`` gives the scaled ``eps``
(``x = sigma eps`` there), and near it ``x0'`` grows as ``(1 - 1 / lambda) (sigma / alpha) eps``: with a
``v`` net on ``VP.discrete(..., rescale_zero_snr=True)`` (``alpha(t_max) = 3.2e-5``) ``b = 1.01`` adds
305 ``eps`` to the first node's ``x0``, and the sample of the exact mixture's ``v`` net lands 6.4 (relative
RMSE) from the unscaled one after 10 DDIM steps; the line ``k t + b`` with ``lambda(t_max) = 1`` (same
``b``) moves it by 0.0098.

The paper picks ``lambda`` by matching norms: :func:`epsilon_norms` measures the mean ``||eps_theta||`` on
a sampler's states and on forward-noised training data at the same times, and :class:`EpsilonNorms`
gives their ratio per node, its mean (the uniform ``b``) and the least-squares line ``k t + b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import Denoiser, Prediction
from ..sampling import DEFAULT_SCHEDULE, check_sample_only, check_x_T, sample_as
from ..schedules import ScheduleLike
from ..solvers.base import Solver
from .base import Guided, with_estimate

__all__ = ["EpsilonNorms", "EpsilonScaling", "epsilon_norms"]

F64 = torch.float64


class EpsilonScaling(Guided):
    """Epsilon Scaling: the base's noise estimate divided by ``lambda(t) = k t + b`` (``x0`` recomputed).

    Args:
        den: the denoiser whose ``eps`` (or the ``eps`` its prediction implies) is scaled.
        k: the slope of ``lambda`` in the process time (0: the paper's uniform schedule).
        b: the intercept (``lambda = b`` for ``k = 0``; ``b > 1`` shrinks the noise estimate).

    ``lambda`` must be positive on the process's time range ``[t_min, t_max]`` (a ``ValueError`` otherwise).
    ``k = 0, b = 1`` returns the base's estimates to the bit. ``cost`` is ``den``'s: no further network
    evaluation. Classifier-free guidance is linear in ``eps``, so ``EpsilonScaling(CFG(c, u, w))`` equals
    ``CFG(EpsilonScaling(c), EpsilonScaling(u), w)``.
    """

    base_arg = "den"

    def __init__(self, den: Denoiser, k: float = 0.0, b: float = 1.0) -> None:
        super().__init__(den)
        who = "EpsilonScaling"
        self.k, self.b = real(who, "k", k), real(who, "b", b)
        p = den.process
        ends = {"t_min": p.t_min, "t_max": p.t_max}
        for name, t in ends.items():  # lambda is linear: positive on the range iff at both ends
            if not self.k * t + self.b > 0:
                raise ValueError(
                    f"{who}: lambda(t) = k t + b must be > 0 on den's process times [{p.t_min:g}, "
                    f"{p.t_max:g}], got lambda({name} = {t:g}) = {self.k * t + self.b:g} (k={k!r}, b={b!r})"
                )

    def lam(self, t: float | Tensor, x: Tensor) -> float | Tensor:
        """``lambda(t) = k t + b``: a float for a scalar time, else per-sample values broadcasting against
        ``x`` (in ``x``'s dtype)."""
        if isinstance(t, Tensor) and t.ndim > 0:
            lam = self.k * t.to(F64) + self.b
            return lam.to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.k * float(t) + self.b

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        inv = 1 / self.lam(t, x)
        if not pred.x0_given:
            return with_estimate(pred, eps=pred.eps * inv)
        # x0' = (x - sigma eps / lambda) / alpha from the held x0, without going through x twice
        a, s = pred.alpha, pred.sigma
        if isinstance(inv, float) and isinstance(a, float) and isinstance(s, float):
            return with_estimate(pred, x0=torch.add(pred.x0, pred.eps, alpha=(1 - inv) * s / a))
        return with_estimate(pred, x0=pred.x0 + ((1 - inv) * s / a) * pred.eps)

    def __repr__(self) -> str:
        return f"EpsilonScaling({self.base!r}, k={self.k:g}, b={self.b:g})"


@dataclass
class EpsilonNorms:
    """Mean noise-estimate norms at the nodes ``t`` (float64, from the noise end) of a sampler's grid:
    ``sampling`` on the sampler's states, ``training`` on forward-noised data (:func:`epsilon_norms`)."""

    t: Tensor
    sampling: Tensor
    training: Tensor

    @property
    def ratio(self) -> Tensor:
        """``lambda`` at every node: ``sampling / training`` (the paper's norm matching)."""
        return self.sampling / self.training

    def uniform(self) -> float:
        """The uniform schedule's ``b``: the mean of :attr:`ratio` over the nodes."""
        return float(self.ratio.mean())

    def linear(self) -> tuple[float, float]:
        """``(k, b)``: the least-squares line ``k t + b`` through :attr:`ratio` (``k = 0`` on one node)."""
        if len(self.t) < 2:
            return 0.0, self.uniform()
        design = torch.stack([self.t, torch.ones_like(self.t)], 1)
        k, b = torch.linalg.lstsq(design, self.ratio[:, None]).solution[:, 0].tolist()
        return k, b


def _mean_norm(eps: Tensor) -> float:
    return float(torch.linalg.vector_norm(eps.reshape(len(eps), -1).to(F64), dim=1).mean())


SAMPLE_ONLY = (
    "final",
    "callback",
    "corrector",
    "corrector_steps",
    "snr",
    "progress",
    "return_info",
    "project",
    "default_steps",
)
SAMPLE_ONLY_WHY = (
    "which measures the states of sample(den, x_T, steps, solver, schedule, generator=generator) at its "
    "noisy nodes; accepted: den, data, x_T, steps, solver, schedule, generator and the net's conditions "
    "(**cond)"
)


def epsilon_norms(
    den: Denoiser,
    data: Tensor,
    x_T: Tensor,
    steps: int | None = None,
    solver: str | Solver | None = None,
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **cond: Any,
) -> EpsilonNorms:
    """Measure the exposure bias of ``den`` under a sampler: at every node ``t`` of the grid where the
    state is noisy (``x_T``'s included, the clean end excluded), the mean ``||eps_theta(x_hat_t, t)||``
    over the sampler's states ``x_hat_t`` (:func:`~steerdiff.sampling.sample` from ``x_T`` with ``steps``,
    ``solver``, ``schedule``, ``generator``; ``steps`` default ``None``: 10, or an explicit grid's count)
    and the mean ``||eps_theta(x_t, t)||`` over ``x_t = alpha(t) data + sigma(t) z`` (fresh ``z`` per node,
    drawn from ``generator``, or from its first generator where it is a list). Their ratio is the paper's
    ``lambda_t`` (Ning et al. 2024, Sec. 5).

    ``data`` is clean training data of den's sample shape, any count; ``cond`` is passed to every call, so
    per-sample conditions must match both batches (an int label does). Costs one sampling run plus two
    network evaluations per node, without gradients. The other keyword arguments of :func:`sample`
    (``final``, ``callback``, a corrector, ...) are refused: the run measured is the plain one.
    """
    check_sample_only("epsilon_norms", cond, SAMPLE_ONLY, SAMPLE_ONLY_WHY)
    check_x_T(den, x_T, "epsilon_norms")
    check_x_T(den, data, "epsilon_norms", name="data")
    nodes: list[tuple[float, Tensor]] = []

    def record(info: dict[str, Any]) -> None:
        if float(info["sigma"]) > 0:
            nodes.append((float(info["t"]), info["x"].clone()))

    with torch.no_grad():
        out = sample_as(
            "epsilon_norms",
            den,
            x_T,
            steps,
            solver,
            schedule,
            generator=generator,
            callback=record,
            return_info=True,
            **cond,
        )
        assert isinstance(out, tuple), "return_info=True"
        run = out[1]
        nodes.insert(0, (float(run.grid.t[0]), x_T))
        g = generator[0] if isinstance(generator, Sequence) else generator
        p, ts, sampling, training = den.process, [], [], []
        for t, x in nodes:
            z = torch.randn(data.shape, generator=g, dtype=data.dtype).to(data.device)
            a, s = float(p.alpha(t)), float(p.sigma(t))
            ts.append(t)
            sampling.append(_mean_norm(den(x.to(x_T.dtype), t, **cond).eps))
            training.append(_mean_norm(den(a * data + s * z, t, **cond).eps))
    return EpsilonNorms(
        torch.tensor(ts, dtype=F64), torch.tensor(sampling, dtype=F64), torch.tensor(training, dtype=F64)
    )
