r"""RF-Inversion: controlled inversion and editing on rectified flows (Rout, Chen, Ruiz, Kumar, Caramanis,
Shakkottai & Chu 2025, "Semantic Image Inversion and Editing using Rectified Stochastic Differential
Equations", ICLR).

The paper's times run the other way from steerdiff's: its image-to-noise process ``Y`` has ``Y_0`` the image
and ``Y_1`` the noise, so its time is :class:`~steerdiff.processes.RectifiedFlow`'s ``t`` (``x_t = (1 - t) x_0
+ t eps``), while its generative process ``X`` runs ``tau = 1 - t`` from the noise ``X_0`` to the image
``X_1``. With the model's velocity ``u = dx/dt = eps - x0`` (``v = dX/dtau = -u``):

* Controlled forward ODE (their Eq. 8, Alg. 1), from the image ``y_0`` at ``t = 0`` up to the noise, pulled
  towards a fixed noise sample ``y_1 ~ N(0, I)`` by the controller guidance ``gamma`` in ``[0, 1]``::

      dx/dt = u(x, t) + gamma (u(x, t | y_1) - u(x, t)),        u(x, t | y_1) = (y_1 - x) / (1 - t);

  ``gamma = 0`` is the plain ODE inversion (:func:`~steerdiff.inversion.invert`), ``gamma = 1`` the straight
  line from ``x`` to ``y_1``.
* Controlled reverse ODE (their Eq. 15, Alg. 2), from the inverted noise down to the image, pulled towards the
  reference image ``y_0`` by ``eta_tau``::

      dX/dtau = v(X, tau) + eta_tau (v(X, tau | y_0) - v(X, tau)),   v(X, tau | y_0) = (y_0 - X) / (1 - tau),

  i.e. ``dx/dt = u + eta (u(x, t | y_0) - u)`` with ``u(x, t | y_0) = (x - y_0) / t``; ``eta_tau = eta`` for
  ``start <= tau < stop`` and 0 elsewhere (the paper's starting and stopping times); ``eta = 0`` is plain
  sampling (:func:`~steerdiff.sampling.sample`).

Both conditional fields are the probability-flow ODEs of a denoiser that knows the answer: ``u(x, t | y_1)``
is that of the prediction ``eps = y_1`` (so ``x0 = (x - t y_1) / (1 - t)``), ``u(x, t | y_0)`` that of
``x0 = y_0`` (so ``eps = (x - (1 - t) y_0) / t``). The velocity ``eps - x0`` of a prediction consistent with
``x`` (``x = (1 - t) x0 + t eps``) is affine in it, so the controlled drift *is* the probability-flow ODE of
the prediction interpolated between the model's and the conditional one's, with weight ``gamma`` (or
``eta_tau``): :class:`ControlledInversion` and :class:`ControlledEditing` are guidance wrappers
(:class:`~steerdiff.guidance.Guided`) returning that prediction, and every deterministic solver integrates the
controlled ODE -- ``ddim`` (the default here) is the paper's Euler step ``x + (t' - t) u``; higher-order
solvers (``unipc``, ``dpmpp_2m``, ...) run it too, at their order where the drift is smooth (below), and
restart their history after the step across the jump at an editing window's end (:class:`ControlledEditing`,
:meth:`~steerdiff.denoiser.Denoiser.breaks`). The
interpolation acts on the estimate the model gave (``x0`` or ``eps``), so ``gamma = 0`` / ``eta = 0`` returns
the model's prediction bit for bit. At ``gamma = 1`` (``eta = 1``) the predictions are constant along the
ODE's straight-line solution and the DDIM step is exact.

The controlled drift is singular where the control pulls to: with ``e = x - y_1``,
``de/dt = -gamma e / (1 - t) + (1 - gamma) u`` gives ``e ~ (1 - t)^gamma`` near ``t = 1`` (and
``x - y_0 ~ t^eta`` near ``t = 0`` for a window reaching ``tau = 1``), so the solution is only Hoelder there
and no solver keeps its order up to ``t_max``: on the 8-d mixture of the tests
(``tests/test_rf_inversion.py``; ``gamma = 0.5``, ``time_uniform``, relative RMSE against the exact controlled
ODE) at 5 / 10 / 20 / 40 steps ``ddim`` is at 0.29 / 0.20 / 0.13 / 0.084, ``dpmpp_2m`` 0.29 / 0.19 / 0.12 /
0.071, UniPC's noise form 0.29 / 0.18 / 0.11 / 0.070 and ``heun`` (twice the NFE) 0.20 / 0.13 / 0.080 / 0.047:
slopes 0.5-0.8, against 0.14 / 0.036 at 10 / 40 steps for ``ddim`` at ``gamma = 0``. Only rectified flow is
accepted: the paper derives the controller (a linear quadratic regulator) and its time window there.

With ``solver=None``, :func:`~steerdiff.inversion.invert` and :func:`~steerdiff.sampling.sample` give these
wrappers their base's default: the unguided one for a plain denoiser (UniPC-3; its noise form up the grid),
the guided one (:func:`~steerdiff.sampling.guided_solver`) around classifier-free guidance. The guided
default is for CFG's drift ``u_u + w (u_c - u_u)``, ``w > 1``, which extrapolates past the net's outputs and
stiffens the ODE; the controlled drift interpolates (``gamma``, ``eta`` in ``[0, 1]``) towards a closed-form
field, one net evaluation per step as in the paper (Alg. 1, lines 6-8: the unconditional field, the
conditional one, their combination). ``python bench/rf_default.py`` (16-d default mixture, 64 samples,
relative RMSE against the exact controlled ODE; ``time_uniform`` and ``karras_capped`` at 5-40 steps):
unguided / guided default 0.86 in geometric mean over 24 inversions (``gamma`` 0.25 / 0.5 / 0.75; range
0.24-1.04) and 0.97 over 32 edits (four windows; 0.53-1.55, the worst at 40 steps on ``[0, 0.25)``, 3.5e-3
against 2.2e-3, both restarted at the window's end and far below ``ddim``'s 1.5e-2; 0.75 before that
restart, partly from a jump inside a long step that UniPC-3's history happened to average: ``eta = 0.7`` on
``[0, 0.25)`` at 10 steps, 0.031 then, 0.30 now, as ``ddim``).

:func:`rf_invert` runs the first up :func:`~steerdiff.inversion.invert`'s grid ``t_N < ... < t_0 = t_max``
(``t_max < 1``: at ``gamma = 1`` it ends at the line's point ``y_1 - (1 - t_0) (y_1 - x_0) / (1 - t_N)``),
:func:`rf_edit` the second down :func:`~steerdiff.sampling.sample`'s.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from . import solvers as _solvers
from ._checks import real, tensor
from .denoiser import Denoiser, Prediction, check_denoiser, take_kwarg_rows, take_wrapped_rows
from .guidance.base import Guided, with_estimate
from .inversion import deterministic_solvers, invert_as
from .processes import RectifiedFlow
from .sampling import DEFAULT_SCHEDULE, SampleInfo, check_x_T, sample_as
from .schedules import ScheduleLike
from .solvers.base import Solver

__all__ = ["ControlledEditing", "ControlledInversion", "rf_edit", "rf_invert"]


def _check_flow(who: str, den: Denoiser) -> None:
    if not isinstance(den.process, RectifiedFlow):
        raise ValueError(
            f"{who}: den must be a denoiser under sd.RectifiedFlow (RF-Inversion's controller is derived for "
            f"x_t = (1 - t) x_0 + t eps), got process {den.process!r}"
        )


def _target(who: str, name: str, value: object) -> Tensor:
    y = tensor(who, name, value)
    if not y.is_floating_point() or not bool(torch.isfinite(y).all()):
        raise ValueError(f"{who}: {name} must be a tensor of finite floating-point values, got {value!r:.60}")
    return y


def _window(who: str, eta: float, start: float, stop: float) -> tuple[float, float, float]:
    """``(eta, start, stop)`` of :class:`ControlledEditing`: each in [0, 1], start <= stop."""
    eta, start, stop = (
        real(who, k, v, lo=0, hi=1) for k, v in (("eta", eta), ("start", start), ("stop", stop))
    )
    if stop < start:
        raise ValueError(
            f"{who}: the window needs start <= stop (times tau = 1 - t in [0, 1]), got start={start}, "
            f"stop={stop}"
        )
    return eta, start, stop


def _weight(w: float | Tensor, x: Tensor) -> float | Tensor:
    """A float weight, or per-sample weights ``(batch,)`` shaped to broadcast against ``x``."""
    if isinstance(w, Tensor):
        return w.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return w


class _Controlled(Guided):
    """A rectified-flow denoiser whose prediction is interpolated towards a known answer ``target``."""

    base_arg = "den"

    def __init__(self, den: Denoiser, target: Tensor) -> None:
        super().__init__(den)
        _check_flow(type(self).__name__, den)
        self.target = target

    @property
    def guided(self) -> bool:  # type: ignore[override]
        """``base``'s: the control adds no stiffness the guided default is for (module docstring)."""
        return self.base.guided

    def weight(self, t: float | Tensor) -> float | Tensor:
        """The controller guidance at ``t`` (a float, or a ``(batch,)`` tensor for a tensor ``t``)."""
        raise NotImplementedError

    def known(self, pred: Prediction, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The conditional prediction's ``(x0, eps)``, only the one matching ``pred``'s given estimate."""
        raise NotImplementedError

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        w = self.weight(t)
        if not isinstance(w, Tensor) and w == 0:
            return pred
        x0_c, eps_c = self.known(pred, self.target.to(device=x.device, dtype=x.dtype))
        w = _weight(w, x)
        if x0_c is not None:
            return with_estimate(pred, x0=torch.lerp(pred.x0, x0_c, w))
        assert eps_c is not None, "known() returns the estimate pred holds"
        return with_estimate(pred, eps=torch.lerp(pred.eps, eps_c, w))

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy around ``den.take_rows(rows, n)`` whose per-sample target (``n`` rows) is taken at
        ``rows``."""
        out = take_wrapped_rows(self, rows, n)
        target = take_kwarg_rows({"target": self.target}, rows, n)["target"]
        if target is not self.target:
            out = copy.copy(out) if out is self else out
            out.target = target
        return out


class ControlledInversion(_Controlled):
    r"""RF-Inversion's controlled forward ODE (Rout et al. 2025, Eq. 8) as a denoiser: the prediction whose
    velocity is ``u + gamma ((y_1 - x) / (1 - t) - u)``,

        eps' = (1 - gamma) eps + gamma y_1,      x0' = (1 - gamma) x0 + gamma (x - t y_1) / (1 - t)

    (the one ``den`` gives, ``x0`` or ``eps``, is interpolated; the other follows from ``x``). Run it up the
    grid with :func:`~steerdiff.inversion.invert` (or :func:`rf_invert`).

    Args:
        den: a denoiser under :class:`~steerdiff.processes.RectifiedFlow`.
        y_1: the noise sample the inversion is pulled towards, the shape of a batch of ``x`` (or one sample
            broadcast over it).
        gamma: the controller guidance, in ``[0, 1]``: 0 the plain inversion, 1 the straight line to ``y_1``.

    ``cost`` is ``den``'s (no extra network evaluation).
    """

    def __init__(self, den: Denoiser, y_1: Tensor, gamma: float = 0.5) -> None:
        super().__init__(den, _target("ControlledInversion", "y_1", y_1))
        self.gamma = real("ControlledInversion", "gamma", gamma, lo=0, hi=1)

    def weight(self, t: float | Tensor) -> float:
        return self.gamma

    def known(self, pred: Prediction, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if pred.x0_given:
            return (pred.x - pred.sigma * y) / pred.alpha, None
        return None, y

    def __repr__(self) -> str:
        return f"ControlledInversion({self.base!r}, gamma={self.gamma})"


class ControlledEditing(_Controlled):
    r"""RF-Inversion's controlled reverse ODE (Rout et al. 2025, Eq. 15, Alg. 2) as a denoiser: the prediction
    whose velocity ``dx/dt`` is ``u + eta_tau ((x - y_0) / t - u)``, with ``eta_tau = eta`` where the paper's
    time ``tau = 1 - t`` has ``start <= tau < stop`` and 0 elsewhere,

        x0' = (1 - eta_tau) x0 + eta_tau y_0,      eps' = (1 - eta_tau) eps + eta_tau (x - (1 - t) y_0) / t

    (the one ``den`` gives is interpolated). Run it down the grid with :func:`~steerdiff.sampling.sample` (or
    :func:`rf_edit`), typically with the edit prompt in ``den``'s conditions. The window is one of time,
    read at every evaluation of any solver: Euler (``ddim``) steers the steps whose start node ``t_i`` has
    ``start <= 1 - t_i < stop``. diffusers' community ``FluxRFInversionPipeline`` counts steps instead,
    ``int(start N) <= i < int(stop N)``: the same on a grid ``t_i = 1 - i / N`` where ``start N`` and
    ``stop N`` are whole. The drift jumps at the window's ends, ``t = 1 - stop`` and ``1 - start``
    (:meth:`own_breaks`), and a solver sees the jump only at its evaluations: the step across it is first
    order in any solver, and a staged one (``heun``, ``dpm_solver``) mixes the two drifts inside it (also
    where ``stop`` is a node: the end stage there is uncontrolled). A multistep solver's history
    (``dpmpp_2m``, ``unipc``) would carry controlled predictions past the jump into its extrapolation;
    :func:`~steerdiff.sampling.sample` restarts it after the step across
    (:func:`~steerdiff.sampling.crossings`). On the tests' 8-d mixture (``eta = 0.7``, ``stop = 0.4``,
    ``time_uniform``, relative RMSE against the exact piecewise ODE at 10 / 20 / 40 steps) the default
    UniPC-3 is then at 0.018 / 0.0057 / 0.0016 (0.14 / 0.10 / 0.058 without the restart), ``dpmpp_2m``
    0.013 / 0.0045 / 0.0016, ``ddim`` 0.060 / 0.031 / 0.016, ``heun`` 0.16 / 0.11 / 0.062. Where the jump
    falls inside a long step the restart costs what the old history's averaging across it had gained
    (the default window ``[0, 0.25)`` at 10 steps: 0.13 against 0.021; ``python bench/breaks.py``).

    Args:
        den: a denoiser under :class:`~steerdiff.processes.RectifiedFlow`.
        y_0: the reference image, the shape of a batch of ``x`` (or one sample broadcast over it).
        eta: the controller guidance, in ``[0, 1]``: 0 plain sampling, 1 the straight line to ``y_0``.
        start, stop: the window of paper time ``tau = 1 - t`` in which ``eta`` acts,
            ``0 <= start <= stop <= 1``; default ``[0, 0.25)``, the first quarter from the noise (diffusers'
            community pipeline's).

    ``cost`` is ``den``'s (no extra network evaluation).
    """

    def __init__(
        self, den: Denoiser, y_0: Tensor, eta: float = 1.0, start: float = 0.0, stop: float = 0.25
    ) -> None:
        super().__init__(den, _target("ControlledEditing", "y_0", y_0))
        self.eta, self.start, self.stop = _window("ControlledEditing", eta, start, stop)

    def weight(self, t: float | Tensor) -> float | Tensor:
        if isinstance(t, Tensor):
            # in float64: torch.where of two Python floats would give torch's default dtype (float32)
            tau = 1 - t.to(torch.float64)
            return self.eta * ((tau >= self.start) & (tau < self.stop)).to(torch.float64)
        return self.eta if self.start <= 1 - t < self.stop else 0.0

    def own_breaks(self) -> tuple[float, ...]:
        """The window's ends ``t = 1 - stop`` and ``1 - start`` inside the process's time range, where the
        control switches on or off (none at ``eta = 0`` or for an empty window;
        :meth:`~steerdiff.Denoiser.breaks`)."""
        if self.eta == 0 or self.start == self.stop:
            return ()
        p = self.process
        return tuple(t for t in (1 - self.stop, 1 - self.start) if p.t_min < t < p.t_max)

    def known(self, pred: Prediction, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if pred.x0_given:
            return y, None
        return None, (pred.x - pred.alpha * y) / pred.sigma

    def __repr__(self) -> str:
        return f"ControlledEditing({self.base!r}, eta={self.eta}, start={self.start}, stop={self.stop})"


def _check_pair(who: str, wrapped: _Controlled, x_name: str, x: Tensor, y_name: str) -> None:
    check_x_T(wrapped, x, who, name=x_name)
    if wrapped.target.shape != x.shape:
        raise ValueError(
            f"{who}: {y_name} must have {x_name}'s shape {tuple(x.shape)}, got {tuple(wrapped.target.shape)}"
        )


def _check_solver(who: str, solver: str | Solver, ode: str) -> None:
    """A ``ValueError`` naming ``who`` unless ``solver`` is a deterministic solver (a name or an instance)."""
    if _solvers.get(solver, who, deterministic_solvers()).stochastic:
        raise ValueError(
            f"{who}: solver={solver!r} is stochastic, and the {ode} is deterministic (an SDE on the "
            f"controlled prediction has other marginals); accepted: {deterministic_solvers()} or a "
            "deterministic Solver instance"
        )


def rf_invert(
    den: Denoiser,
    x_0: Tensor,
    y_1: Tensor,
    gamma: float = 0.5,
    steps: int | None = None,
    solver: str | Solver = "ddim",
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """RF-Inversion (Rout et al. 2025, Alg. 1): the controlled forward ODE from the image ``x_0`` up to the
    noise, pulled towards ``y_1``: :func:`~steerdiff.inversion.invert` of :class:`ControlledInversion`.

    Args:
        den: a denoiser under :class:`~steerdiff.processes.RectifiedFlow` (with the source prompt, if any, in
            ``**kwargs``).
        x_0: the images, shape ``(batch, ...)``, taken as the state at the grid's last node.
        y_1: the noise to pull towards, ``x_0``'s shape (``torch.randn_like(x_0)``, as the paper draws it).
        gamma: the controller guidance in ``[0, 1]`` (0: ``sd.invert``; 1: the line to ``y_1``).
        steps, schedule: as ``invert``'s (``steps`` default ``None``: 10, or ``len(times) - 1``).
        solver: a deterministic solver (:func:`~steerdiff.inversion.deterministic_solvers`); default
            ``"ddim"``, under rectified flow the paper's Euler step.
        **kwargs: ``invert``'s other keywords and the net's conditions.

    Returns:
        ``invert``'s result: the structured noise at the grid's first node ``t_max`` (and the ``SampleInfo``
        with ``return_info=True``).
    """
    check_denoiser("rf_invert", "den", den)  # the arguments named after rf_invert, not the class it builds
    _check_flow("rf_invert", den)
    wrapped = ControlledInversion(
        den, _target("rf_invert", "y_1", y_1), real("rf_invert", "gamma", gamma, lo=0, hi=1)
    )
    _check_pair("rf_invert", wrapped, "x_0", x_0, "y_1")
    _check_solver("rf_invert", solver, "controlled forward ODE")
    return invert_as("rf_invert", wrapped, x_0, steps, solver, schedule, **kwargs)


def rf_edit(
    den: Denoiser,
    x_T: Tensor,
    y_0: Tensor,
    eta: float = 1.0,
    start: float = 0.0,
    stop: float = 0.25,
    steps: int | None = None,
    solver: str | Solver = "ddim",
    schedule: ScheduleLike = DEFAULT_SCHEDULE,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """RF-Inversion's editing (Rout et al. 2025, Alg. 2): the controlled reverse ODE from the inverted noise
    ``x_T`` down to the image, pulled towards the reference ``y_0`` while ``start <= 1 - t < stop``:
    :func:`~steerdiff.sampling.sample` of :class:`ControlledEditing`.

    Args:
        den: a denoiser under :class:`~steerdiff.processes.RectifiedFlow` (the edit prompt in ``**kwargs``).
        x_T: the inverted noise (:func:`rf_invert`'s result), shape ``(batch, ...)``.
        y_0: the reference images, ``x_T``'s shape.
        eta, start, stop: the controller guidance in ``[0, 1]`` and its window of paper time ``tau = 1 - t``
            (:class:`ControlledEditing`).
        steps, schedule: as ``sample``'s (``steps`` default ``None``: 10, or the explicit grid's count).
        solver: a deterministic solver (:func:`~steerdiff.inversion.deterministic_solvers`); default
            ``"ddim"``, under rectified flow the paper's Euler step (a multistep solver is nearer the exact
            controlled ODE from 20 steps on, its history restarted at the window's ends:
            :class:`ControlledEditing`).
        **kwargs: ``sample``'s other keywords (``final``, ``return_info``, ...) and the net's conditions.

    Returns:
        ``sample``'s result.
    """
    check_denoiser("rf_edit", "den", den)  # the arguments named after rf_edit, not the class it builds
    _check_flow("rf_edit", den)
    wrapped = ControlledEditing(den, _target("rf_edit", "y_0", y_0), *_window("rf_edit", eta, start, stop))
    _check_pair("rf_edit", wrapped, "x_T", x_T, "y_0")
    _check_solver("rf_edit", solver, "controlled reverse ODE")
    return sample_as("rf_edit", wrapped, x_T, steps, solver, schedule, **kwargs)
