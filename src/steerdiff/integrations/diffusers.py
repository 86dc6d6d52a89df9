r"""steerdiff inside diffusers: a :class:`~steerdiff.denoiser.Denoiser` from a diffusers model and
its scheduler config, and a diffusers scheduler that runs steerdiff's solvers in any pipeline.

Usage::

    from steerdiff.integrations.diffusers import SteerdiffScheduler, denoiser_from_diffusers

    pipe.scheduler = SteerdiffScheduler.from_config(pipe.scheduler.config)  # guided default, karras_capped
    images = pipe(prompt, num_inference_steps=10).images

    den = denoiser_from_diffusers(pipe.unet, pipe.scheduler.config)   # the same net, for sd.sample
    x0 = sd.sample(den, x_T, steps=10, schedule="karras", encoder_hidden_states=emb)

**The model** a config describes (its process, prediction, net time and thresholding) is read by
:mod:`steerdiff.integrations.diffusers_config` (:func:`process_from_config`,
:func:`denoiser_from_diffusers`, re-exported here).

**The scheduler.** :meth:`SteerdiffScheduler.set_timesteps` builds the grid of ``schedule`` and
runs the solver once on a zero network to learn where it evaluates the net (the times depend on
the grid only): ``timesteps`` lists them in call order, so a multistage solver lists more entries
than steps (Heun: ``2N - 1``, as diffusers' Heun). A steerdiff solver calls the model itself; a
pipeline calls the net and hands the output to :meth:`~SteerdiffScheduler.step`. ``step`` bridges
the two by replay: it re-runs the current solver step from its start (a checkpoint of ``x`` and
the solver state, kept at every completed step) with a model that returns the outputs received
so far and halts at the first evaluation not made yet; the point it asks for is ``prev_sample``.
Each step is thus run twice or so (the solver arithmetic, never the net), and the result is that
of :func:`steerdiff.sample` with the same net, ``x_T`` and noise, to the bit on CPU. A re-run gets
new containers of the checkpoint's state and its very tensors, which steps build anew and never
write in place (a solver of one's own must not either).

**Inversion.** With ``inverse=True`` the scheduler is an editing pipeline's ``inverse_scheduler``
(``StableDiffusionDiffEditPipeline``, ``StableDiffusionPix2PixZeroPipeline``): ``set_timesteps`` reverses
the grid the sampling run of ``final="none"`` takes (:meth:`~steerdiff.solvers.base.Grid.reversed`) and
the same replay runs the solver up it, from the clean sample at ``timesteps[0]``: the pipeline's loop
returns what :func:`steerdiff.invert` returns, to the bit on CPU.

``step`` reads its ``timestep``: the first one places the run (img2img pipelines that slice
``timesteps`` without :meth:`~SteerdiffScheduler.set_begin_index` begin where it is, as diffusers'
multistep schedulers do), and every one must be ``timesteps[step_index]``.

Noise for stochastic solvers is drawn, in :func:`steerdiff.sample`'s order, from the scheduler's
``noise`` (a ``torch.Generator``, a list of them, or a :mod:`steerdiff.noise` source) if one was
given, else from the ``generator`` the pipeline passes to ``step``, else from torch's global RNG;
draws inside a step are recorded and replayed. ``step`` takes the pipeline's ``eta`` (``pipe(eta=...)``;
pipelines pass it where the signature has it) as DDIMScheduler does: a ``ddim`` run steps as
``DDIM(eta)``, a ``tcd`` / ``lcm`` run takes it as its ``gamma`` (TCDScheduler's ``eta``), other solvers
and inverse runs refuse ``eta > 0``; ``eta=0``, the pipelines' default, leaves the solver as configured.
``step`` also takes DDIMScheduler's ``use_clipped_model_output`` (for ``ddim`` runs), the ``variance_noise``
of DDIMScheduler and DPMSolverMultistepScheduler (the call's one draw) and UnCLIPScheduler's ``prev_timestep``
(checked), and refuses LTX's ``per_token_timesteps`` and Cosmos' ``pred_original_sample`` by name.
Half-precision pipelines: the solver runs in float32 and ``prev_sample`` is cast back, as diffusers'
schedulers do. ``step`` returns copies,
never the solver's state, and takes the entries of ``sample`` that differ from the ``prev_sample``
it returned (the pipeline's edits, in place or not); the others keep their float32 values. The
comparison is skipped where ``sample`` is the returned tensor itself and its version counter says
no torch op wrote to it (``prev_sample`` is made outside ``inference_mode``, to have one); a write
that bypasses the counter (through ``.data`` or a NumPy view) is not seen.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar, Literal, overload

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput
from torch import Tensor

from .. import schedules as _schedules
from .. import solvers as _solvers
from .._checks import boolean, choice, device_or_none, integer, real, real_array, tensor
from .._ops import first_false
from ..denoiser import ConsistencyModelDenoiser, Denoiser, EDMDenoiser, Prediction
from ..guidance import ConsistencyBoundary, DynamicThreshold, with_estimate
from ..inversion import default_inversion_solver, deterministic_solvers
from ..noise import NoiseSource, PerSampleNoise, check_rows, make_noise
from ..processes import VE, Process, RectifiedFlow
from ..sampling import DEFAULT_SCHEDULE, crossings, default_solver, guided_solver
from ..schedules import Schedule, ScheduleLike
from ..solvers.base import (
    FINALS,
    Grid,
    Model,
    Solver,
    Transition,
    advance,
    count_steps,
    make_grid,
    map_state,
    work_dtype,
)
from .diffusers_config import (
    _CM_CLASS,
    _COSINE_CLASS,
    _EDM_CLASSES,
    _FLOW_CLASSES,
    _LCM_CLASS,
    _TCD_CLASS,
    F64,
    _consistency_model,
    _denoiser,
    _is_consistency,
    _is_cosine,
    _is_edm,
    _is_flow,
    _Spec,
    _spec,
    consistency_schedule,
    denoiser_from_diffusers,
    process_from_config,
)

__all__ = [
    "SteerdiffScheduler",
    "SteerdiffSchedulerOutput",
    "consistency_schedule",
    "denoiser_from_diffusers",
    "process_from_config",
]

# --- the scheduler: a solver run driven by the pipeline's net calls -------------------------------


@dataclass
class SteerdiffSchedulerOutput(SchedulerOutput):
    """``prev_sample``: where the pipeline evaluates the net next (after the last call: the result);
    ``pred_original_sample``: the denoised estimate of the evaluation just received."""

    pred_original_sample: Tensor | None = None


class _Halt(Exception):
    """The solver asked for an evaluation the pipeline has not made yet, at ``x``."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x


class _Recorded:
    """A 'network' that returns the output it was handed (the pipeline's)."""

    output: Tensor

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.output


def _recorded(den: Denoiser) -> _Recorded:
    """The :class:`_Recorded` net of one of the scheduler's denoisers (a thresholding wrapper shares it)."""
    net = den.net
    assert isinstance(net, _Recorded), "the scheduler builds its denoisers over a _Recorded net"
    return net


def _zero_noise(t_from: float, t_to: float, like: Tensor) -> Tensor:
    return torch.zeros_like(like)


class _StepNoise:
    """The noise drawn inside the current solver step: replayed when the step is re-run."""

    def __init__(self) -> None:
        self.draws: list[Tensor] = []
        self.used = 0
        self.source: NoiseSource = make_noise(None)

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        if self.used == len(self.draws):
            self.draws.append(self.source(t_from, t_to, like))
        self.used += 1
        return self.draws[self.used - 1]


class _GivenDraw:
    """The noise of one :meth:`SteerdiffScheduler.step` call given by the caller (its ``variance_noise``,
    as DDIMScheduler and DPMSolverMultistepScheduler take it): the call's one new draw, moved to the
    draw's dtype and device; a second draw in the same call is a ``ValueError``."""

    def __init__(self, noise: Tensor, solver: Solver) -> None:
        self.noise, self.solver, self.used = noise, solver, False

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        if self.used:
            raise ValueError(
                f"step: variance_noise is the noise of one draw, and {self.solver!r} draws more than once "
                "between two net evaluations here; leave variance_noise out (the run cannot go on: call "
                "set_timesteps to start again)"
            )
        self.used = True
        return self.noise.to(device=like.device, dtype=like.dtype, copy=True)


class _RawEps(DynamicThreshold):
    """DDIMScheduler's step with ``use_clipped_model_output`` ``False`` / ``None``: the thresholded (clipped)
    ``x0'`` beside the net's own ``eps``, which are one prediction at ``x + alpha (x0' - x0)``, not at ``x``:
    returned there, so that the DDIM step ``alpha' x0' + sigma' eps`` (:meth:`Prediction.renoise
    <steerdiff.denoiser.Prediction.renoise>`) is diffusers'. Only the ``ddim`` solver is given it (a solver
    that reads ``x`` beside the prediction would take a wrong pair)."""

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        x0 = self.threshold(pred.x0)
        return with_estimate(pred, x0=x0, x=pred.alpha * x0 + pred.sigma * pred.eps)


class _Tape(Model):
    """The model the solver sees in :meth:`SteerdiffScheduler.step`: the current step's earlier
    evaluations are replayed, the pipeline's new output is used once, and the next evaluation
    halts the run. Counts and checks the new evaluations as :class:`Model` does."""

    noise: _StepNoise

    def __init__(self, den: Denoiser, times: list[float]) -> None:
        super().__init__(den, None, _StepNoise())
        self.net = _recorded(den)
        self.times = times
        self.preds: list[Prediction] = []
        self.used = 0
        self.pending: Tensor | None = None

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        if self.used == len(self.preds):
            if self.pending is None:
                raise _Halt(x)
            if self.nfe >= len(self.times) or t != self.times[self.nfe]:
                raise RuntimeError(
                    f"the solver evaluates at t={t:.6g} where set_timesteps planned "
                    f"{self.times[self.nfe] if self.nfe < len(self.times) else 'no evaluation'}: its "
                    "evaluation times depend on the sample, which SteerdiffScheduler does not support"
                )
            self.net.output, self.pending = self.pending, None
            self.preds.append(super().__call__(x, t, step))
        self.used += 1
        return self.preds[self.used - 1]


class _Probe(Model):
    """The model of :func:`_plan`'s dry run: zero noise; records each evaluation's ``(t, step, at the
    step's input)``. Its prediction is the denoiser's of a zero net output (finite: no count or check
    of :class:`Model`'s), made without the net's time, whose cache is per dtype and batch size (not
    the run's)."""

    def __init__(self, den: Denoiser) -> None:
        super().__init__(den, None, _zero_noise)
        self.evals: list[tuple[float, int, bool]] = []
        self.x_in: Tensor | None = None
        self.zero = torch.zeros(1, 1, dtype=F64)
        self.half = torch.full((1, 1), 0.5, dtype=F64)  # learned variance: the interpolation of r = 0

    def __call__(self, x: Tensor, t: float, step: int) -> Prediction:
        self.evals.append((t, step, x is self.x_in))
        pred = self.denoiser.convert(self.zero, x, t)
        if self.denoiser.learned_variance:
            pred.var_interp = self.half
        return pred


def _plain(den: Denoiser) -> Denoiser:
    """``den`` without the config's boundary condition and thresholding
    (:class:`~steerdiff.guidance.ConsistencyBoundary`, :class:`~steerdiff.guidance.DynamicThreshold`)."""
    if isinstance(den, ConsistencyBoundary):
        den = den.base
    return den.base if isinstance(den, DynamicThreshold) else den


def _plan(den: Denoiser, solver: Solver, grid: Grid, jumps: frozenset[int]) -> list[tuple[float, int, bool]]:
    """Where ``solver`` evaluates the net on ``grid``, in call order: a dry run of the run's denoiser
    ``den`` (unthresholded) on a zero net output, without calling the net (:class:`_Probe`), so that the
    run finds ``den``'s per-time caches filled; the history restarted after the steps ``jumps``, as the run
    restarts it."""
    probe = _Probe(_plain(den))
    x, state = torch.zeros(1, 1, dtype=F64), solver.init_state(grid)
    for i in range(grid.steps):
        probe.x_in = x
        out = solver.step(probe, x, i, grid, state)
        x = out.mean if isinstance(out, Transition) else out
        if i in jumps:
            solver.moved(state)
    return probe.evals


def _fork(state: Any) -> Any:
    """A copy of solver state for one run of a step from the checkpoint: its containers are new
    (:func:`~steerdiff.solvers.base.map_state`), so the steps' rebinding and pushing leave the
    checkpoint as it was; its tensors and numbers are shared, as steps never write a state tensor in
    place (they build new ones); any other object is deep-copied."""
    return map_state(state, _same, copy.deepcopy)


def _same(t: Tensor) -> Tensor:
    return t


class _AlphasCumprod:
    """``alphas_cumprod[timestep]`` of a run (:attr:`SteerdiffScheduler.alphas_cumprod`): ``alpha^2`` at the
    process time of the entry ``timestep`` of ``timesteps`` (``net_times``, with ``alpha`` at each)."""

    def __init__(self, net_times: list[float], alpha: Tensor) -> None:
        self._net_times, self._alpha = net_times, alpha

    def __getitem__(self, timestep: Any) -> Tensor:
        value = _timestep_value(timestep, "alphas_cumprod")
        if value not in self._net_times:
            raise ValueError(
                f"alphas_cumprod[{value:g}]: only the entries of scheduler.timesteps index it (the times of "
                f"the run set_timesteps made: {self._net_times or 'none yet, call set_timesteps first'})"
            )
        return self._alpha[self._net_times.index(value)] ** 2


@dataclass
class _Run:
    """One pipeline run: its solver, the grid (from the begin index on), the plan, the tape, the
    checkpoint (``x`` and the solver state at the start of step ``i``) and the steps across a break of the
    pipeline's field (:attr:`SteerdiffScheduler.breaks`), after which the solver's history restarts."""

    solver: Solver
    grid: Grid
    evals: list[tuple[float, int, bool]]
    tape: _Tape
    state: dict[str, Any]
    jumps: frozenset[int]
    x: Tensor | None = None
    i: int = 0
    started: bool = False
    done: bool = False
    at_input: bool = False  # the last halt asked for the net at the step's input x
    sent: Tensor | None = None  # the last prev_sample, kept apart from the copy the pipeline got
    given: weakref.ref[Tensor] | None = None  # that copy, not kept alive
    given_version: int = 0  # its version counter when it was returned
    passed: list[tuple[int, Tensor]] = field(default_factory=list)  # device timesteps, checked at the end

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without ``given`` (a weak reference does not pickle): an unpickled run compares the
        next ``sample`` with ``sent`` entry by entry instead."""
        return {**self.__dict__, "given": None}


def _versioned_copy(t: Tensor) -> Tensor:
    """A copy of ``t`` with a version counter (which every in-place torch op on it or a view of it
    bumps), made outside inference mode where it is on: inference tensors have none."""
    if not torch.is_inference_mode_enabled():
        return t.clone()
    with torch.inference_mode(False):
        return t.clone()


def _unchanged(run: _Run, sample: Tensor) -> bool:
    """Whether ``sample`` is the ``prev_sample`` the pipeline got, not written to since: no entry of it
    can differ from what was sent (writes that bypass the version counter, through ``.data`` or a
    NumPy view, are not seen)."""
    return run.given is not None and run.given() is sample and sample._version == run.given_version


def _sigmas(den: Denoiser, times: list[float], grid: Grid) -> Tensor:
    """diffusers' ``sigmas`` of a run: the noise level at each entry of ``timesteps``, then at the run's
    end (0 for a clean end), in the convention of the config's own schedulers: the flow time ``sigma``
    for flow-matching configs (FlowMatchEuler's, UniPC's ``use_flow_sigmas``), ``sigma / alpha`` for VP
    ones (Euler's, DPMSolver's); for consistency models ``sigma`` of ``x0 + sigma z``, the clean end
    ``sigma_min`` (CMStochasticIterativeScheduler's)."""
    process, plain = den.process, _plain(den)
    t = torch.tensor([*times, grid.t[-1]], dtype=F64)
    if isinstance(plain, ConsistencyModelDenoiser):
        if grid.clean_end:
            t[-1] = 0.0
        return torch.as_tensor(plain.noise_level(t))
    s = process.sigma(t) if isinstance(process, RectifiedFlow) else process.sigma_ratio(t)
    if grid.clean_end:
        s[-1] = 0.0
    return s


def _timestep_value(timestep: Any, who: str = "step", name: str = "timestep") -> float:
    """A pipeline's ``timestep`` (a number or a one-element tensor) as the float32 value it holds; else a
    ``ValueError`` naming ``who``, the call it was given to, and ``name``, the argument."""
    try:
        value = torch.as_tensor(timestep)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{who}: {name} must be a number or a one-element tensor, got {timestep!r:.60}")
    return float(value.reshape(()).to(torch.float32))


def _check_invertible(solver: Solver, given: Any) -> None:
    """A ``ValueError`` for a stochastic ``solver`` (given as ``given``) in an inverse run, as
    :func:`steerdiff.invert` refuses it."""
    if solver.stochastic:
        raise ValueError(
            f"SteerdiffScheduler: solver={given!r} is stochastic, and inverse=True runs the deterministic "
            f"probability-flow ODE (as sd.invert); accepted: {deterministic_solvers()} or a deterministic "
            "Solver instance (e.g. DDIM(eta=0))"
        )


def _check_sampler(cfg: Mapping[str, Any], spec: _Spec) -> None:
    """A ``ValueError`` for a config whose sampling a scheduler cannot take: a ScoreSdeVeScheduler's (a
    :class:`~steerdiff.processes.VE` process), whose pipeline runs its predictor-corrector loop through
    ``step_pred`` / ``step_correct`` and hands the net ``scheduler.sigmas``; a consistency model's with
    ``s_noise`` other than 1 (CMStochasticIterative scales its fresh noise by it, ``lcm`` draws the forward
    process's own)."""
    if isinstance(spec.process, VE):
        raise ValueError(
            "SteerdiffScheduler: a ScoreSdeVeScheduler config (a variance-exploding score model) is not "
            "supported: ScoreSdeVePipeline calls step_pred / step_correct, not step; sample its net with "
            "sd.sample(denoiser_from_diffusers(unet, config), sigma_max * x_T, steps, solver) instead"
        )
    s_noise = cfg.get("s_noise", 1.0)
    if spec.consistency is not None and s_noise != 1.0:
        raise ValueError(
            f"SteerdiffScheduler: s_noise={s_noise!r} of a CMStochasticIterativeScheduler config is not "
            "supported: its consistency sampling (lcm) draws the forward process's own noise; accepted: 1.0 "
            "(the released models' setting)"
        )


def _tail(grid: Grid, j: int) -> Grid:
    """The grid from node ``j`` on."""
    return Grid(grid.process, grid.t[j:], grid.alpha[j:], grid.sigma[j:], grid.lam[j:], grid.clean_end)


def _flow_shift(cfg: dict[str, Any], s: Tensor, mu: float | None) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's shift of custom flow times ``s``, as
    :meth:`steerdiff.schedules.FlowShift.shifted` of the config's shift: ``shift``, or with
    ``use_dynamic_shifting`` ``mu`` (``time_shift_type``), then ``shift_terminal``. UniPC's flow configs
    (``use_flow_sigmas``: Wan, SkyReels) name the shift ``flow_shift`` and shift alike."""
    respaced = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
    if respaced:
        raise ValueError(
            f"set_timesteps: custom sigmas with {respaced[0]}=True are not supported (pass the final "
            "sigmas, or num_inference_steps and a steerdiff schedule)"
        )
    terminal = cfg.get("shift_terminal") or None  # diffusers stretches where it is truthy
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("set_timesteps: mu is required with use_dynamic_shifting=True (as in diffusers)")
        mu = real("set_timesteps", "mu", mu)
        kind = cfg.get("time_shift_type", "exponential")
        return _schedules.FlowShift(mu=mu, time_shift_type=kind, shift_terminal=terminal).shifted(s)
    shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
    return _schedules.FlowShift(shift=shift, shift_terminal=terminal).shifted(s)


def _custom_times(
    spec: _Spec,
    cfg: dict[str, Any],
    timesteps: Sequence[float] | None,
    sigmas: Sequence[float] | None,
    mu: float | None,
) -> Tensor:
    """The process times of a pipeline's custom grid: ``timesteps`` are the net's times of the nodes, read
    by the inverse of the config's net time (:class:`~steerdiff.integrations.diffusers_config.NetTime`:
    ``log(sigma) / 4`` for EDM configs, ``2 atan(sigma) / pi`` for cosine ones, ``1000 t`` for flow ones;
    a VP config's are its process times, the integer timesteps); ``sigmas`` are noise levels in the
    convention of the config's diffusers schedulers -- flow times (before the shift, which is applied as
    :func:`_flow_shift` says) for flow configs, ``sigma / alpha`` (Karras') for VP ones, a trailing 0
    (diffusers' terminal) dropped: the end is the scheduler's ``final``; for EDM configs positions on the
    sigma ramp (:func:`_edm_ramp`). Times beyond the model's range are clipped to it.
    A consistency model's config takes ``timesteps`` only, CMStochasticIterativeScheduler's ramp indices
    (:func:`consistency_schedule`)."""
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if spec.consistency is not None:
        if name == "sigmas":
            raise ValueError(
                "set_timesteps: a consistency model's config (CMStochasticIterativeScheduler's) takes no "
                "sigmas; pass num_inference_steps or timesteps (indices on its sigma ramp, as that scheduler "
                "takes them)"
            )
        return consistency_schedule(cfg, timesteps=values).grid
    v = real_array("set_timesteps", name, values)
    flow, p, net = isinstance(spec.process, RectifiedFlow), spec.process, spec.time_map
    if name == "sigmas" and spec.sigma_data is not None:
        return _edm_ramp(cfg, p, v, values)
    if name == "timesteps" and net is not None:
        if not (flow or spec.sigma_data is not None):  # a VP config's custom timesteps are integer ones
            raise ValueError(
                "set_timesteps: custom timesteps need discrete timesteps (timestep_type='continuous')"
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"set_timesteps: timesteps must be finite numbers, got {values!r}")
        t = net.inverse(v)
        if bool(t.isnan().any()):
            raise ValueError(
                f"set_timesteps: timesteps of {net.owner} are its net's times {net.domain}, got {values!r}"
            )
    else:
        if name == "sigmas" and len(v) > 1 and v[-1] == 0:
            v = v[:-1]
        low = v >= 0 if name == "timesteps" else v > 0
        if not bool(torch.isfinite(v).all() & low.all()):
            accepted = ">= 0" if name == "timesteps" else "> 0 (a trailing 0 aside)"
            raise ValueError(f"set_timesteps: {name} must be finite numbers {accepted}, got {values!r}")
        t = v if name == "timesteps" else _flow_shift(cfg, v, mu) if flow else p.t_of_sigma_ratio(v)
    t = t.clamp(p.t_min, p.t_max)
    if not bool((t[1:] < t[:-1]).all()):
        up = " (with inverse=True too: the sampling run's nodes, which it goes up)" * bool(cfg.get("inverse"))
        raise ValueError(
            f"set_timesteps: {name} must be strictly decreasing{up} within the model's range (process times "
            f"[{p.t_min:g}, {p.t_max:g}] after clipping), got {values!r}"
        )
    return t


def _edm_ramp(cfg: dict[str, Any], process: Process, ramp: Tensor, values: Any) -> Tensor:
    """The process times (noise levels) of an EDM config's custom ``sigmas``, which EDMEulerScheduler reads
    as positions on its ramp, 0 at ``sigma_max`` and 1 at ``sigma_min``: for ``sigma_schedule="karras"``
    Karras et al.'s (2022) Eq. 5, ``(s_max^(1/rho) + r (s_min^(1/rho) - s_max^(1/rho)))^rho`` (the config's
    ``rho``), for ``"exponential"`` ``s_max (s_min / s_max)^r``, log-uniform in between. (diffusers' own
    exponential ramp takes only the positions' number, evenly spaced: the same nodes where they are.)"""
    if not (ramp.numel() >= 1 and bool(torch.isfinite(ramp).all() & (ramp >= 0).all() & (ramp <= 1).all())):
        raise ValueError(
            "set_timesteps: sigmas of an EDM config are positions on its sigma ramp (0: sigma_max, 1: "
            f"sigma_min), as EDMEulerScheduler reads them: finite numbers in [0, 1], got {values!r}"
        )
    if not bool((ramp[1:] > ramp[:-1]).all()):
        raise ValueError(
            "set_timesteps: sigmas of an EDM config (positions on its sigma ramp) must be strictly "
            f"increasing, got {values!r}"
        )
    lo, hi = process.t_min, process.t_max
    default = "exponential" if _is_cosine(cfg) else "karras"  # the config's class's default
    kind = choice(
        "set_timesteps", "sigma_schedule", cfg.get("sigma_schedule", default), ("karras", "exponential")
    )
    if kind == "karras":
        rho = real("set_timesteps", "rho", cfg.get("rho", 7.0), lo=0, lo_open=True)
        a, b = hi ** (1 / rho), lo ** (1 / rho)
        sigma = (a + ramp * (b - a)) ** rho
    else:
        sigma = hi * (lo / hi) ** ramp
    return process.t_of_sigma_ratio(sigma).clamp(lo, hi)


def _node_net_times(timesteps: Any, sigmas: Any, n: int) -> Tensor:
    """``timesteps`` passed with ``sigmas``: the net's times of the nodes, one per sigma (as
    FlowMatchEulerDiscreteScheduler checks); the first ``n`` (a trailing-0 sigma is no node)."""
    v = real_array("set_timesteps", "timesteps", timesteps)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"set_timesteps: timesteps must be finite numbers, got {timesteps!r}")
    if v.numel() != len(real_array("set_timesteps", "sigmas", sigmas)):
        raise ValueError(
            f"set_timesteps: timesteps and sigmas passed together must have the same length, got "
            f"{v.numel()} timesteps and {len(sigmas)} sigmas"
        )
    return v[:n]


def _node_time_map(nodes: Tensor, net_times: Tensor) -> Callable[[Tensor], Tensor]:
    """The net's time at process time ``t`` where the pipeline gives each node's (CogView4: the net
    sees its timesteps while the sigmas are shifted): piecewise linear through ``(nodes[k],
    net_times[k])``, along the end segments beyond them, constant for one node; exact at the nodes.
    A partial of :func:`_node_time` (not a closure: a scheduler holding it pickles)."""
    return functools.partial(_node_time, nodes.flip(0), net_times.flip(0))  # increasing in t


def _node_time(xp: Tensor, fp: Tensor, t: Tensor) -> Tensor:
    """:func:`_node_time_map`'s map through the points ``(xp[k], fp[k])``, ``xp`` increasing."""
    if xp.numel() == 1:
        return torch.full_like(t, float(fp[0]))
    flat = t.reshape(-1)
    j = torch.searchsorted(xp, flat).clamp(1, xp.numel() - 1)
    return torch.lerp(fp[j - 1], fp[j], (flat - xp[j - 1]) / (xp[j] - xp[j - 1])).reshape(t.shape)


# options of diffusers' schedulers that choose their grid or solver, which a SteerdiffScheduler takes as
# schedule= and solver=: passed to from_config they would be kept in the config and ignored
_DIFFUSERS_SAMPLING_OPTIONS = {
    "timestep_spacing": "schedule='leading', 'trailing' or 'linspace'",
    "use_karras_sigmas": "schedule='karras' (the default, karras_capped, is Karras' ramp with capped steps)",
    "use_exponential_sigmas": "schedule='exponential'",
    "use_beta_sigmas": "schedule=steerdiff.schedules.Beta() (alpha = beta = 0.6, diffusers' beta sigmas)",
    "use_lu_lambdas": "schedule='logsnr_uniform'",
    "solver_order": "solver=, e.g. 'dpmpp_3m' or steerdiff.solvers.UniPC(order=3)",
    "algorithm_type": "solver=, e.g. 'dpmpp_2m', 'dpmpp_2m_sde' or 'dpm_solver'",
}

_Kind = Literal["solver", "schedule"]


_NESTED = "solver"  # the key of an option that is a solver, in the config's stored form (_stored_form)


def _options(obj: Solver | Schedule) -> dict[str, Any]:
    """An instance's constructor options: a solver's dataclass fields its constructor takes (a solver with a
    constructor of its own, :class:`~steerdiff.solvers.SelfRecurrence`, fixes ``order``), a schedule's
    attributes."""
    if not is_dataclass(obj):
        return dict(vars(obj))
    takes = inspect.signature(type(obj)).parameters
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name in takes}


def _registered(kind: _Kind, obj: Solver | Schedule) -> bool:
    """Whether ``obj``'s class is the one its ``name`` resolves to in steerdiff's registry."""
    get = _solvers.get if kind == "solver" else _schedules.get
    try:
        return type(get(obj.name)) is type(obj)
    except ValueError:
        return False


def _stored_form(kind: _Kind, obj: Solver | Schedule) -> dict[str, Any]:
    """``{"name": registry name, **options}``, or for a class outside the registry ``{"class":
    "module:QualName", **options}``, as JSON holds it (tuples become lists); an option that is itself a
    solver (:class:`~steerdiff.solvers.SelfRecurrence`'s ``inner``) as ``{"solver": its stored form}``."""
    cls = type(obj)
    key = {"name": obj.name} if _registered(kind, obj) else {"class": f"{cls.__module__}:{cls.__qualname__}"}
    options = _options(obj)
    nested = {k: {_NESTED: _stored_form("solver", v)} for k, v in options.items() if isinstance(v, Solver)}
    return json.loads(json.dumps({**key, **options, **nested}))


def _import_class(kind: _Kind, path: str) -> type:
    """The Solver or Schedule subclass at ``"module:QualName"``. A config may come from anywhere (a hub
    download) and importing a module runs its code: steerdiff's own modules are imported as needed, any
    other only if it is imported already (``sys.modules``; whoever defined the class has imported its
    module), else a ``ValueError`` that says to import it first."""
    module, _, qualname = path.partition(":")
    if module != "steerdiff" and not module.startswith("steerdiff.") and module not in sys.modules:
        raise ValueError(
            f"{kind} class {path!r}: its module {module!r} is not imported, and a scheduler config does not "
            "import modules other than steerdiff's (importing one runs its code, and a config may come from "
            f"anywhere); import {module!r} yourself first if you trust it, then load the config"
        )
    try:
        cls = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{kind} class {path!r} cannot be imported: {err}") from None
    base = Solver if kind == "solver" else Schedule
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{kind} class {path!r} is not a steerdiff {base.__name__}")
    return cls


@overload
def _resolve(kind: Literal["solver"], value: Any) -> Solver: ...
@overload
def _resolve(kind: Literal["schedule"], value: Any) -> Schedule: ...
def _resolve(kind: _Kind, value: Any) -> Solver | Schedule:
    """The solver (``kind="solver"``) or schedule that ``value`` names or is, or that the config
    describes (:func:`_stored_form`): that class built with the stored options."""
    get = _solvers.get if kind == "solver" else _schedules.get
    if not isinstance(value, Mapping):
        return get(value, "SteerdiffScheduler")
    options: dict[str, Any] = {  # a solver given as an option (_stored_form)
        k: _resolve("solver", v[_NESTED]) if isinstance(v, Mapping) and list(v) == [_NESTED] else v
        for k, v in value.items()
    }
    path = options.pop("class", None)
    name = options.pop("name", None)
    cls = type(get(name, "SteerdiffScheduler")) if path is None else _import_class(kind, path)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"{kind}={dict(value)!r} does not describe a {kind}: {err}") from None


def _describe(kind: _Kind, value: Any, obj: Solver | Schedule) -> str | list[float] | dict[str, Any]:
    """What the config stores for ``value`` (resolved to ``obj``), so that ``from_config`` and
    ``from_pretrained`` rebuild it: a name as given, a :class:`~steerdiff.schedules.Custom`
    grid as its times, another instance as :func:`_stored_form`. ``ValueError`` where the rebuilt
    object would differ (a class that cannot be imported by its name, such as one defined in a
    function; options that JSON does not hold or the class does not take)."""
    if isinstance(value, str):
        return value
    if isinstance(obj, _schedules.Custom):
        return obj.grid.tolist()
    if isinstance(obj, _schedules.GITS):  # its grids come from a fit to a model, which no config holds
        # a list has no final to check: say which runs this fit's grid serves, and how many of its nodes
        runs, nodes = (
            ("final='zero' (not inverse)", "steps")
            if obj.final == "zero"
            else ("final='none' or inverse=True", "steps + 1")
        )
        raise ValueError(
            f"SteerdiffScheduler: schedule={obj!r} is fitted to a model and cannot be kept in the scheduler "
            f"config; pass the grid of the steps you will run, schedule=gits(process, {nodes}).tolist() "
            "(with process = the denoiser's, e.g. scheduler.denoiser.process), for a scheduler of "
            f"{runs} only, the runs of its final"
        )
    try:
        stored = _stored_form(kind, obj)
        again = _resolve(kind, stored)
        same = type(again) is type(obj) and _stored_form(kind, again) == stored
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(
            f"SteerdiffScheduler: {kind}={obj!r} cannot be kept in the scheduler config, which rebuilds a "
            f"{kind} from its registry name or importable class and its options (define the class at "
            "module level, with its options as its constructor's arguments)"
        )
    if _takes_variance_type(value):  # kept without: the config's variance_type gives it, when loaded too
        del stored["variance"]
    return stored


def _takes_variance_type(solver: Any) -> bool:
    """Whether the ``solver`` a scheduler is given (or its config stores) is DDPM by its name without a
    variance of its own, ``"ddpm"`` or ``{"name": "ddpm", ...}`` without ``"variance"``: the config's
    ``variance_type`` chooses it (:meth:`SteerdiffScheduler._configured_solver`)."""
    if isinstance(solver, Mapping):
        return solver.get("name") == "ddpm" and "variance" not in solver
    return isinstance(solver, str) and solver == "ddpm"


class SteerdiffScheduler(SchedulerMixin, ConfigMixin):
    r"""A diffusers scheduler that samples with a steerdiff solver and schedule.

    ``pipe.scheduler = SteerdiffScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m",
    schedule="karras")`` keeps the model description of any supported diffusers scheduler config
    (see :func:`denoiser_from_diffusers`); ``num_inference_steps`` is :func:`steerdiff.sample`'s
    ``steps``. With the same net, initial noise and noise generator the pipeline returns what
    ``sd.sample(denoiser_from_diffusers(net, config), x_T, steps, solver, schedule, final=final,
    generator=g)`` returns (the module docstring explains how; with ``solver=None``, ``solver`` is
    ``steerdiff.sampling.guided_solver(steps, guidance_scale, grid)``, unguided from scale 1 down; a ``ddim``
    run of a config that clips x0 does so with ``step(..., use_clipped_model_output=True)``, as its default
    is DDIMScheduler's pairing of the clipped x0 with the net's eps).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            variance_type, rescale_betas_zero_snr, timestep_type, snr_shift_scale, use_flow_sigmas,
            invert_sigmas: the model, as in diffusers' configs.
        sigma_min, sigma_max, sigma_data: an EDM config's model (``origin`` an EDM scheduler): the process
            ``x = x0 + sigma eps`` on ``[sigma_min, sigma_max]`` and Karras et al.'s preconditioning
            (:class:`~steerdiff.denoiser.EDMDenoiser`); :meth:`scale_model_input` is then ``c_in x``,
            ``timesteps`` are ``0.25 log(sigma)`` (``origin`` CosineDPMSolverMultistepScheduler, Stable
            Audio Open's: ``2 atan(sigma) / pi``) and ``init_noise_sigma`` is ``sqrt(sigma_max^2 + 1)``, as
            diffusers' EDM schedulers have them, and ``set_timesteps(sigmas=...)`` reads positions on the
            config's sigma ramp, as ``EDMEulerScheduler`` does; with ``origin``
            CMStochasticIterativeScheduler a consistency model's
            (:class:`~steerdiff.denoiser.ConsistencyModelDenoiser`; its ``rho``, ``clip_denoised`` and
            ``s_noise``, which must be 1, are read from the config): ``lcm`` on
            :func:`consistency_schedule`'s grid by default, ``timesteps`` ``250 log(sigma)``,
            :meth:`scale_model_input` ``c_in x``, ``init_noise_sigma`` ``sigma_max``, the ``timesteps`` of
            ``set_timesteps`` ramp indices, as that scheduler has them. ``None`` (default) for other models.
        timestep_scaling: an LCM config's (``origin`` LCMScheduler): the net's estimate goes through LCM's
            boundary condition at ``timestep_scaling`` times its timestep
            (:class:`~steerdiff.guidance.ConsistencyBoundary`); TCDScheduler configs carry it unused.
        thresholding, dynamic_thresholding_ratio, sample_max_value, clip_sample, clip_sample_range:
            the denoised estimate's post-processing, as in diffusers' configs (DDPM's takes
            ``clip_sample=True`` by default; this class ``False``).
        origin: the diffusers scheduler class the config came from (set by :meth:`from_config`;
            flow-matching and unsupported classes are told apart by it).
        solver: a name of :func:`steerdiff.solvers.available`, a Solver instance, or an instance as
            the config stores it (``{"name": ..., **options}``); default
            (``None``): for LCM, TCD and consistency-model configs their schedulers' samplers (``"lcm"``;
            ``"tcd"``, gamma 0.3: TCDScheduler's default ``eta``; ``"lcm"``), else :func:`steerdiff.sample`'s
            default for guided denoisers at the step count
            :meth:`set_timesteps` gets (below 15 DPM-Solver++(2M), its long steps at first order, or
            UniPC-2 where every step is short enough; UniPC-2 from 15;
            :func:`steerdiff.sampling.guided_solver`): pipelines apply
            classifier-free guidance outside the scheduler. With ``guidance_scale <= 1`` (the
            pipeline does not guide) it is the unguided default (UniPC-3,
            :func:`steerdiff.sampling.default_solver`). The name ``"ddpm"`` (as ``{"name": "ddpm"}``
            too, without a ``"variance"``) takes the config's ``variance_type`` as DDPMScheduler does
            (``fixed_large``: the forward step's ``beta``; ``fixed_small``, ``fixed_small_log``: the
            posterior's; ``fixed_large_log``, which DDPMScheduler turns into NaN, is refused); ``DDPM()``
            its own ``variance``.
        guidance_scale: the pipeline's classifier-free guidance scale, which the scheduler does not
            see otherwise: the guided default's long-step limits grow as it falls
            (:func:`steerdiff.sampling.guided_max_h` and ``guided_corrector_max_h``: 2.04 and 1.49 at
            scale 2), and from 1 down the default is the unguided one; ``None`` (default): unknown,
            guided, with the limit of scale 7.5 (0.8 in log-SNR). Pass 1 for unguided pipelines
            (``DDPMPipeline``). A finite number ``>= 0``, as :class:`~steerdiff.guidance.CFG` takes its
            ``scale`` (else a ``ValueError`` naming it).
        schedule: a name of :func:`steerdiff.schedules.available`, a Schedule instance (or as the
            config stores it), or a custom grid (process times; kept as that list); default (``None``):
            for LCM and TCD configs the timesteps their net was distilled at, as their schedulers take
            them (:class:`~steerdiff.schedules.LCM` with the config's ``original_inference_steps``, default
            50; with ``final="none"`` ending at timestep 0, ``clean_node=True``), for consistency-model
            configs CMStochasticIterativeScheduler's grid (:func:`consistency_schedule`), else
            :func:`steerdiff.sample`'s default, ``karras_capped`` (for a run of an EDM config with
            ``final_sigmas_type="sigma_min"`` and ``final="none"``, which is to end at ``sigma_min``, its
            whole ramp: ``KarrasCapped(max_nodes=1)``; below 15 nodes ``karras_capped`` ends above
            ``sigma_min``, where a jump to the clean state would follow). The name ``"leading"`` adds the
            config's ``steps_offset`` as diffusers' ``leading`` spacing does (Stable Diffusion's 1: 901, 801,
            ..., 1 at 10 steps); ``Leading()`` does not. The name ``"lcm"`` takes the config's
            ``original_inference_steps`` (and ``clean_node`` as the default); ``LCM()`` its own.
        final: ``"zero"`` (end with the denoised estimate) or ``"none"``, as in ``sd.sample``; not used
            with ``inverse=True``. :meth:`from_config` of an EDM config with
            ``final_sigmas_type="sigma_min"`` gives ``"none"``.
        inverse: run :func:`steerdiff.invert` instead of ``sd.sample``, as an editing pipeline's
            ``inverse_scheduler`` (``DDIMInverseScheduler``, ``DPMSolverMultistepInverseScheduler``):
            :meth:`set_timesteps` builds the grid ``final="none"`` gives and reverses it
            (:meth:`~steerdiff.solvers.base.Grid.reversed`), so that ``timesteps`` rise from the clean
            sample's, and the pipeline's loop from the clean sample returns what ``sd.invert(den, x_0,
            steps, solver, schedule)`` returns (the module docstring). ``solver`` must be deterministic
            (:func:`steerdiff.inversion.deterministic_solvers`; else a ``ValueError``); its default is
            :func:`~steerdiff.inversion.default_inversion_solver`'s: UniPC-3's noise form where the pipeline
            does not guide (``guidance_scale <= 1``; pass the scale the pipeline's inversion takes: 1 for
            Pix2Pix-Zero's by default, 7.5 for DiffEdit's), else ``guided_solver`` as above.
            ``init_noise_sigma`` is 1; the run begins at ``timesteps[0]`` (no img2img begin index) and may
            stop early (DiffEdit's ``inpaint_strength`` drops the last timesteps; ``prev_sample`` is where
            the next evaluation would be: for a solver of one evaluation per step, the state at its node);
            :meth:`add_noise` is refused; :attr:`alphas_cumprod` serves the pipelines' noise regularization.
        noise: where stochastic solvers draw from, ahead of the pipeline's ``generator``: a
            ``torch.Generator``, a list of them (one per sample) or a noise source; not saved in
            the config.
        breaks: the process times where the pipeline's field jumps (:attr:`breaks`: the solver's history
            restarts after the step across one); not saved in the config.

    Solver and schedule instances are kept in the config as their registry name (a class of one's own:
    its import path) and options, so that ``save_pretrained`` / ``from_pretrained`` rebuild them; one
    that cannot be (a class defined in a function) is refused here. A config's class is imported only from
    steerdiff's modules, elsewhere only if its module is imported already (importing a module runs its code,
    and a config may be a download): import your own module before loading the config. The scheduler
    follows its config as it is when a run is planned (:meth:`set_timesteps`), as diffusers' schedulers
    read theirs when they run: pipelines patch it after construction (``clip_sample=False``,
    ``steps_offset=1`` on old Stable Diffusion configs). ``step`` follows its own counter and checks
    the pipeline's ``timestep`` against it; the first ``timestep`` places the run where no begin index was
    set. Where a pipeline changes the sample between calls (inpainting; in place or
    not), the changed entries are taken where the solver evaluates at a step's input (the first
    evaluation of every usual solver step), and ignored at intermediate stages (Heun's second).
    """

    order = 1
    # diffusers' ConfigMixin declares it as a plain attribute, though it is only read from the class
    ignore_for_config: ClassVar[list[str]] = ["noise", "breaks"]  # type: ignore[misc]
    # diffusers drops these schedulers' config keys silently (they are kept as hidden config)
    _compatibles: ClassVar[list[str]] = [
        *(e.name for e in KarrasDiffusionSchedulers),
        *_FLOW_CLASSES,
        *_EDM_CLASSES,
        _LCM_CLASS,
        _TCD_CLASS,
        _CM_CLASS,
    ]
    # the sampler of a consistency(-distilled) model's own scheduler: the default solver for its config
    _CONSISTENCY_SOLVERS: ClassVar[dict[str, str]] = {_LCM_CLASS: "lcm", _TCD_CLASS: "tcd", _CM_CLASS: "lcm"}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        timestep_type: str = "discrete",
        snr_shift_scale: float = 1.0,
        use_flow_sigmas: bool = False,
        invert_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float | None = None,
        timestep_scaling: float | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        origin: str | None = None,
        solver: str | Solver | Mapping[str, Any] | None = None,
        schedule: ScheduleLike | Mapping[str, Any] | None = None,
        final: str = "zero",
        guidance_scale: float | None = None,
        inverse: bool = False,
        noise: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
        breaks: Sequence[float] = (),
    ) -> None:
        choice("SteerdiffScheduler", "final", final, FINALS)
        boolean("SteerdiffScheduler", "inverse", inverse)
        if guidance_scale is not None:  # saved as a plain float
            guidance_scale = real("SteerdiffScheduler", "guidance_scale", guidance_scale, lo=0)  # as CFG's
            self.register_to_config(guidance_scale=guidance_scale)
        self._solver = None if solver is None else _resolve("solver", solver)  # None: per step count
        self._schedule = None if schedule is None else _resolve("schedule", schedule)  # None: the config's
        self.register_to_config(
            solver=None if self._solver is None else _describe("solver", solver, self._solver),
            schedule=None if self._schedule is None else _describe("schedule", schedule, self._schedule),
        )
        self._seen: Mapping[str, Any] | None = None  # the config object the model was read from
        self._model: _Spec
        self._model_den: Denoiser
        self._follow_config()
        self._configured_solver()  # a config option the named solver cannot take is refused here already
        if inverse and self._solver is not None:
            _check_invertible(self._solver, solver)
        self._den = self._model_den
        self.noise = noise
        self.breaks = breaks
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._times: list[float] = []  # process times of ``timesteps``
        self._net_times: list[float] = []  # ``timesteps`` on the CPU
        self._run: _Run | None = None
        self._begin_index: int | None = None
        self._raw: tuple[DynamicThreshold, _RawEps] | None = None  # _raw_eps's

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """Build from any diffusers scheduler config; ``kwargs`` (``solver``, ``schedule``,
        ``final``, ``noise``, ...) override it. Keys other schedulers use are kept in the config
        and ignored (passed as ``kwargs``, those that choose diffusers' grid or solver --
        ``timestep_spacing``, ``use_karras_sigmas``, ``solver_order``, ... -- are a ``ValueError``
        that says which ``schedule`` or ``solver`` to pass), but for an EDM config's
        ``final_sigmas_type="sigma_min"`` (EDMEuler, EDMDPMSolver and CosineDPMSolver), whose runs
        end with the sample at ``sigma_min``, not the denoised estimate: it gives ``final="none"``
        where ``final`` is not passed. (Their ramps end at ``sigma_min`` already, and their last
        step, from there to ``sigma_min`` again, costs a net call and changes nothing: their ``N``
        steps are our ``N - 1``.) A VP config's schedulers (DPMSolver, UniPC, Euler) end such a run
        with a step to ``sigma`` of timestep 0, in general not a node of their timesteps, which
        ``final="none"`` would drop: there the key is ignored (``final="zero"`` takes that step, into the
        clean end). The config's defaults are its class's (``_use_default_values`` is resolved)."""
        if not isinstance(config, dict):
            raise ValueError(
                f"from_config: config must be a scheduler config dict, got {type(config).__name__}"
            )
        for key, instead in _DIFFUSERS_SAMPLING_OPTIONS.items():
            if key in kwargs:
                raise ValueError(
                    f"from_config: {key}={kwargs[key]!r} is an option of diffusers' schedulers, which "
                    "SteerdiffScheduler does not read (its grid is schedule's, its steps solver's); pass "
                    f"{instead}"
                )
        cfg = {k: v for k, v in config.items() if k != "_use_default_values"}
        # a clear error for an unsupported model before diffusers drops keys; a clip_sample or thresholding
        # the config's class ignores (CogVideoX's, UniPC's without predict_x0) is not carried over
        spec = _spec(cfg)
        _check_sampler(cfg, spec)
        if spec.threshold is None:
            cfg["clip_sample"] = cfg["thresholding"] = False
        name = cfg.get("_class_name")
        if name != cls.__name__ and "origin" not in cfg:
            made_in_code = None
            if _is_flow(cfg):
                made_in_code = _FLOW_CLASSES[0]
            elif _is_edm(cfg):
                made_in_code = _COSINE_CLASS if _is_cosine(cfg) else _EDM_CLASSES[0]
            elif _is_consistency(cfg):
                made_in_code = _CM_CLASS
            cfg["origin"] = name if isinstance(name, str) else made_in_code
        if (
            cfg.get("final_sigmas_type") == "sigma_min"
            and _is_edm(cfg)
            and "final" not in cfg
            and "final" not in kwargs
        ):
            cfg["final"] = "none"
        noise, breaks = kwargs.pop("noise", None), kwargs.pop("breaks", ())
        out = super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)
        made = out[0] if return_unused_kwargs else out
        made.noise, made.breaks = noise, breaks
        return out

    @property
    def noise(self) -> torch.Generator | Sequence[torch.Generator] | NoiseSource | None:
        """The scheduler's own noise for stochastic solvers (``None``: the pipeline's ``generator``)."""
        return self._noise

    @noise.setter
    def noise(self, value: torch.Generator | Sequence[torch.Generator] | NoiseSource | None) -> None:
        ok = value is None or isinstance(value, torch.Generator) or callable(value)
        if isinstance(value, (list, tuple)):
            ok = bool(value) and all(isinstance(g, torch.Generator) for g in value)
        if not ok:
            raise ValueError(
                "noise must be a torch.Generator, a list of them (one per sample) or a noise source, "
                f"got {type(value).__name__}"
            )
        self._noise = value

    @property
    def breaks(self) -> tuple[float, ...]:
        """The process times (of :attr:`denoiser`'s process) where the pipeline's field jumps, sorted: a
        pipeline that switches its guidance at a time, as RF-Inversion's editing window does
        (:meth:`~steerdiff.denoiser.Denoiser.breaks`; ``ControlledEditing(...).breaks()`` on
        ``scheduler.denoiser.process``). :meth:`set_timesteps` reads them: after the step across one
        (:func:`~steerdiff.sampling.crossings`) the solver restarts its history, as :func:`steerdiff.sample`
        restarts it for a denoiser with those breaks. Default ``()``; not saved in the config."""
        return self._breaks

    @breaks.setter
    def breaks(self, value: Sequence[float]) -> None:
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"breaks must be a list or tuple of process times (numbers), got {type(value).__name__}"
            )
        self._breaks = tuple(sorted({real("SteerdiffScheduler", "breaks", b) for b in value}))

    def _follow_config(self) -> None:
        """Read the model (and the solver and schedule, where their entries changed) from the config if
        it is another object than the one last read. Pipelines patch a scheduler's config after it is
        built (``scheduler._internal_dict = FrozenDict(new_config)``: StableDiffusionPipeline sets
        ``clip_sample=False`` and ``steps_offset=1`` on old configs) and diffusers' schedulers read the
        patched config when they run; this is called where a run is planned (:meth:`set_timesteps`) and
        by the properties that read the model, never per step (a check of identity)."""
        config = self.config
        if config is self._seen:
            return
        model = _spec(dict(config))  # the model the config describes
        _check_sampler(config, model)
        seen, solver, schedule = self._seen, self._solver, self._schedule
        if seen is not None and config["solver"] != seen["solver"]:
            solver = None if config["solver"] is None else _resolve("solver", config["solver"])
        if seen is not None and config["schedule"] != seen["schedule"]:
            schedule = None if config["schedule"] is None else _resolve("schedule", config["schedule"])
        den = _denoiser(_Recorded(), model)  # shared by the runs of that model
        # read in full before any is kept: a config that fails is read again (and refused) at the next call
        self._seen, self._solver, self._schedule = config, solver, schedule
        self._model, self._model_den = model, den

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the pipeline's ``x_T``: for EDM configs ``sqrt(sigma_max^2 + 1)``, as diffusers' EDM
        schedulers have it (of the current config), for consistency models ``sigma_max``, as
        CMStochasticIterativeScheduler has it; else 1, and 1 for an inverse scheduler (its run starts from
        the clean sample)."""
        self._follow_config()
        model = self._model
        if self.config["inverse"] or (model.sigma_data is None and model.consistency is None):
            return 1.0
        if model.consistency is not None:
            return model.consistency[1]
        return float((model.process.t_max**2 + 1) ** 0.5)

    @property
    def alphas_cumprod(self) -> _AlphasCumprod:
        """``alphas_cumprod[timestep]``, ``alpha(t)^2`` (float32) at an entry ``timestep`` of ``timesteps``
        (``t`` the process time of the run's evaluation there; at an integer timestep of a ``VP.discrete``
        config diffusers' ``alphas_cumprod[timestep]``), as pipelines read it: the noise regularization of
        ``StableDiffusionPix2PixZeroPipeline.invert`` (``num_reg_steps=5`` by default) and of
        ``StableDiffusionDiffEditPipeline.invert`` reads its ``inverse_scheduler``'s. Other timesteps are a
        ``ValueError``."""
        alpha = self._den.process.alpha(torch.tensor(self._times, dtype=F64))
        return _AlphasCumprod(list(self._net_times), alpha.to(torch.float32))

    @property
    def denoiser(self) -> Denoiser:
        """The model (``.process``, ``.prediction``, ``.time_map``), over the pipeline's outputs; a
        :class:`~steerdiff.guidance.DynamicThreshold` where the config thresholds or clips. That of the
        run :meth:`set_timesteps` planned; before the first, that of the current config."""
        if self._run is None:
            self._follow_config()
            self._den = self._model_den
        return self._den

    @property
    def begin_index(self) -> int | None:
        """The first step a pipeline runs (img2img), as set by :meth:`set_begin_index`; ``None`` if unset."""
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """Index in ``timesteps`` of the evaluation ``step`` takes next (``None`` before the first)."""
        run = self._run
        if run is None or not run.started:
            return None
        return len(self._times) - len(run.evals) + run.tape.nfe

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (img2img; call after :meth:`set_timesteps`). It must
        be the first evaluation of a solver step, at the step's input: the run is then
        ``sd.sample`` on the grid's nodes from that step on. Without it the first ``step``'s
        ``timestep`` says where the run begins. After :meth:`set_timesteps` it must be an index of
        ``timesteps`` or their number (an empty run: SDXL img2img's ``denoising_start`` near 1 slices
        ``timesteps`` to nothing and still calls this)."""
        end = len(self._times) if self._run is not None else None
        self._begin_index = integer("set_begin_index", "begin_index", begin_index, lo=0, hi=end)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        original_inference_steps: int | None = None,
        strength: float | None = None,
    ) -> None:
        """The grid of a run; ``timesteps`` are then the net's times in call order and ``sigmas`` their
        noise levels followed by the run's end, as diffusers' schedulers have them (flow times for
        flow-matching configs, ``sigma / alpha`` for VP ones; a trailing 0 with ``final="zero"``).

        Pass one of: ``num_inference_steps`` (the ``schedule``'s grid of that many steps; ``mu`` is
        ignored), or a custom grid as diffusers' schedulers take it, its nodes followed by the step
        ``final`` says: ``timesteps``, the net's times of the nodes (for EDM configs ``log(sigma) / 4``,
        for cosine ones ``2 atan(sigma) / pi`` in ``[0, 1)``, as ``timesteps`` list them; diffusers' EDM
        schedulers take none), or ``sigmas``, their noise levels
        as the config's own scheduler reads them -- for flow-matching configs flow times, shifted as
        ``FlowMatchEulerDiscreteScheduler`` shifts them (``shift``, UniPC's ``flow_shift``, or
        ``use_dynamic_shifting`` with ``mu``, then ``shift_terminal``), so pipelines that always pass
        sigmas (Flux and its kin) run on the grid their own scheduler would use; for VP configs
        ``sigma / alpha`` (Karras'), a trailing 0 dropped. For EDM configs, as ``EDMEulerScheduler`` reads
        them, ``sigmas`` are no noise levels but positions on the config's sigma ramp, strictly increasing
        in ``[0, 1]`` (0: ``sigma_max``, 1: ``sigma_min``; ``torch.linspace(0, 1, n)`` is the ramp of
        ``num_inference_steps=n``): ``sigma_schedule="karras"`` gives Karras et al.'s sigmas with the
        config's ``rho``, ``"exponential"`` log-uniform ones (diffusers' exponential ramp reads only the
        positions' number, as if evenly spaced). Nodes beyond the model's range are clipped to it.
        ``timesteps`` and ``sigmas`` together (CogView4, GLM-Image; FlowMatchEuler takes both): the
        nodes are the sigmas' and ``timesteps`` are the net's times there, as given; for the run the
        net's time is piecewise linear in process time through the nodes' (multistage solvers' inner
        evaluations).

        ``original_inference_steps`` and ``strength`` (in ``(0, 1]``), as ``LCMScheduler`` and
        ``TCDScheduler`` take them (LatentConsistencyModelPipeline passes the first, its img2img pipeline
        both): with ``num_inference_steps`` they are the options of an :class:`~steerdiff.schedules.LCM`
        schedule (the default of LCM and TCD configs; ``None``: the schedule's, for the default and the
        name ``"lcm"`` the config's ``original_inference_steps`` and strength 1), which other schedules
        refuse unless ``None`` or strength 1; with custom ``timesteps`` or ``sigmas`` ``strength`` keeps
        the last ``int(n * strength)`` of the ``n`` nodes, as those schedulers keep custom timesteps.
        (``TCDScheduler`` given ``original_inference_steps`` explicitly takes the nodes from all training
        timesteps instead, an ``LCM(original_steps=num_train_timesteps)`` grid; here it is the distillation
        schedule's for both.)

        With ``inverse=True`` the grid, custom or not, is the one of ``final="none"`` (custom nodes as for
        sampling: decreasing, ``num_nodes - 1`` steps), reversed: ``timesteps`` and ``sigmas`` rise, the
        latter ending at the first node's noise level.

        A call that fails (a bad argument or combination, a grid the schedule or solver refuses, a ``device``
        the tensors cannot move to) leaves the scheduler as it was: the run set up before goes on.
        """
        saved = dict(vars(self))  # the attributes a failed call puts back (the call only rebinds them)
        try:
            self._set_timesteps(
                num_inference_steps, device, mu, timesteps, sigmas, original_inference_steps, strength
            )
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise

    def _set_timesteps(
        self,
        num_inference_steps: int | None,
        device: str | torch.device | None,
        mu: float | None,
        timesteps: Sequence[float] | None,
        sigmas: Sequence[float] | None,
        original_inference_steps: int | None,
        strength: float | None,
    ) -> None:
        """:meth:`set_timesteps`, which puts the attributes back where this raises."""
        device = device_or_none("set_timesteps", "device", device)
        given = [
            k
            for k, v in (
                ("num_inference_steps", num_inference_steps),
                ("timesteps", timesteps),
                ("sigmas", sigmas),
            )
            if v is not None
        ]
        both = given == ["timesteps", "sigmas"]
        if len(given) != 1 and not both:
            raise ValueError(
                "set_timesteps: pass one of num_inference_steps, timesteps or sigmas (or timesteps and "
                f"sigmas together); got {given or 'none'}"
            )
        self._follow_config()
        final, inverse = self._final(), self.config["inverse"]
        node_map: Callable[[Tensor], Tensor] | None = None  # the net's times the pipeline gives with sigmas
        if strength is not None:
            strength = real("set_timesteps", "strength", strength, lo=0, hi=1, lo_open=True)
        if original_inference_steps is not None:
            original_inference_steps = integer(
                "set_timesteps", "original_inference_steps", original_inference_steps, lo=1
            )
        if num_inference_steps is not None:
            # diffusers' name for make_grid's steps
            steps = integer("set_timesteps", "num_inference_steps", num_inference_steps, lo=1)
            schedule = self._grid_schedule(steps, original_inference_steps, strength)
        else:
            nodes = _custom_times(self._model, dict(self.config), None if both else timesteps, sigmas, mu)
            if both:
                net_times = _node_net_times(timesteps, sigmas, len(nodes))
                node_map = _node_time_map(nodes, net_times)
            part = 1.0 if strength is None else strength
            kept = min(int(len(nodes) * part), len(nodes))  # LCMScheduler's img2img of custom timesteps
            if kept < 1 + (final == "none"):
                raise ValueError(
                    f"set_timesteps: strength={part:g} keeps int({len(nodes)} * strength) = {kept} of "
                    f"the {len(nodes)} custom nodes, too few for a run with final={final!r}; raise strength"
                )
            nodes = nodes[len(nodes) - kept :]
            schedule = _schedules.Custom(nodes)
            steps = count_steps("set_timesteps", None, schedule, final, None)  # the nodes' count
        # the config's model with the run's net times: the runs with the config's own share one denoiser
        # (its per-time caches stay filled), a custom time map gets its own
        self._den = (
            self._model_den if node_map is None else _denoiser(_Recorded(), self._model, time_map=node_map)
        )
        grid = make_grid(self._den.process, schedule, steps, final)
        solver = self._configured_solver() or self._default_solver(grid)
        if inverse:  # sd.invert's run: the same solver loop up the reversed grid
            _check_invertible(solver, self.config["solver"])
            grid = grid.reversed()
        jumps = crossings(self._breaks, grid)
        evals = _plan(self._den, solver, grid, jumps)
        self._times = [t for t, _, _ in evals]
        self._run = _Run(solver, grid, evals, _Tape(self._den, self._times), solver.init_state(grid), jumps)
        self._begin_index = None
        self.num_inference_steps = grid.steps
        self.order = sum(1 for _, i, _ in evals if i == 0)
        net_steps = self._den.time_map(torch.tensor(self._times, dtype=F64)).to(torch.float32)
        self._net_times = net_steps.tolist()  # on the CPU, for step's checks
        self.timesteps = net_steps.to(device)
        self.sigmas = _sigmas(self._den, self._times, grid).to(device, torch.float32)

    def _final(self) -> str:
        """The run's end: the config's ``final``; ``"none"`` for an inverse run, whose grid is the one of
        ``final="none"`` reversed."""
        return "none" if self.config["inverse"] else str(self.config["final"])

    def _configured_solver(self) -> Solver | None:
        """The ``solver`` the scheduler was given (``None``: the default, chosen per grid); the name
        ``"ddpm"`` (or ``{"name": "ddpm"}`` without a ``"variance"``, the config's form of it) with the
        variance of the config's ``variance_type``, as DDPMScheduler takes it:
        ``fixed_small`` (``None``: DDPMScheduler's default) and ``fixed_small_log`` (the same std,
        ``exp(log(beta~) / 2)``) the posterior's ``beta~``, ``fixed_large`` the forward step's ``beta``;
        ``learned_range`` is the net's (:class:`~steerdiff.solvers.DDPM` draws with it whatever its
        ``variance``). ``fixed_large_log`` is refused: DDPMScheduler takes the square root of that log
        variance, NaN at every noisy step. A :class:`~steerdiff.solvers.DDPM` instance keeps its own
        ``variance`` (as ``Leading()`` its own offset)."""
        solver, variance = self._solver, self.config["variance_type"]
        if not _takes_variance_type(self.config["solver"]) or variance not in (
            "fixed_large",
            "fixed_large_log",
        ):
            return solver
        if variance == "fixed_large_log":
            raise ValueError(
                "SteerdiffScheduler: variance_type='fixed_large_log' with solver='ddpm' is not supported: "
                "diffusers' DDPMScheduler takes the square root of this log variance (NaN at every noisy "
                "step); the variance it names, beta, is variance_type='fixed_large'; accepted with 'ddpm': "
                "'fixed_small', 'fixed_small_log', 'fixed_large', 'learned_range' (a DDPM instance, e.g. "
                "DDPM(variance='fixed_large'), keeps its own variance)"
            )
        assert isinstance(solver, _solvers.DDPM), "the name 'ddpm' resolves to DDPM"
        return replace(solver, variance="fixed_large")

    def _default_solver(self, grid: Grid) -> Solver:
        """The solver of a run on (the sampling) ``grid`` without a ``solver``: for LCM, TCD and
        consistency-model configs their schedulers' samplers; for a guided pipeline (``guidance_scale``
        ``None`` or above 1) :func:`~steerdiff.sampling.guided_solver`, for sampling and inversion alike (as
        :func:`~steerdiff.inversion.default_inversion_solver` for a guided denoiser); else
        :func:`~steerdiff.sampling.default_solver`, or for an inverse run ``default_inversion_solver``'s
        (UniPC-3 in its noise form). An inverse run takes no consistency sampler (they draw noise)."""
        scale, inverse = self.config["guidance_scale"], self.config["inverse"]
        consistency = self._CONSISTENCY_SOLVERS.get(self.config["origin"])
        if consistency is not None and not inverse:
            return _solvers.get(consistency)
        if scale is None or scale > 1:  # pipelines guide only above 1
            return guided_solver(grid.steps, scale, grid)
        den = _plain(self._den)
        return default_inversion_solver(den, grid.steps, grid) if inverse else default_solver(den, grid.steps)

    def _grid_schedule(self, steps: int, original_steps: int | None, strength: float | None) -> Schedule:
        """The schedule of a run of ``steps`` (``num_inference_steps``): the config's
        (:class:`SteerdiffScheduler`'s ``schedule``; for a consistency model's config by default
        CMStochasticIterativeScheduler's grid, :func:`consistency_schedule`, of ``steps`` nodes and the
        clean end, or with ``final="none"`` of ``steps + 1``), with ``set_timesteps``' LCM options
        ``original_steps`` and ``strength`` (``None``: the schedule's), which only an
        :class:`~steerdiff.schedules.LCM` schedule takes."""
        name, cfg = self.config["schedule"], self.config
        if name == "leading":  # by name: diffusers' leading, the config's offset
            schedule: Schedule = _schedules.Leading(steps_offset=cfg.get("steps_offset", 0))
        elif name is None and cfg["origin"] == _CM_CLASS:
            extra = int(self._final() == "none")  # the grid's last node is the run's end
            n = _consistency_model(dict(cfg))[3]
            if steps > n - 1 - extra:
                end = ", and one more node for the end of final='none'" if extra else ""
                raise ValueError(
                    f"set_timesteps: num_inference_steps must be an integer in [1, {n - 1 - extra}] (nodes "
                    f"at ramp indices below num_train_timesteps - 1 = {n - 1}, sigma_min{end}), got {steps!r}"
                )
            schedule = consistency_schedule(dict(cfg), steps + extra)
        elif name == "lcm" or (name is None and cfg["origin"] in self._CONSISTENCY_SOLVERS):
            schedule = _schedules.LCM(
                cfg.get("original_inference_steps", 50), clean_node=self._final() == "none"
            )
        elif self._schedule is not None:
            schedule = self._schedule
        elif cfg.get("final_sigmas_type") == "sigma_min" and _is_edm(dict(cfg)) and self._final() == "none":
            # the run is to end with the sample at sigma_min: the default's whole ramp, down to it (below
            # max_nodes karras_capped's nodes end above it, where a jump to the clean state would follow)
            schedule = _schedules.KarrasCapped(max_nodes=1)
        else:
            schedule = _schedules.get(DEFAULT_SCHEDULE)
        if isinstance(schedule, _schedules.LCM):
            return _schedules.LCM(
                schedule.original_steps if original_steps is None else original_steps,
                schedule.strength if strength is None else strength,
                schedule.clean_node,
            )
        given = [f"original_inference_steps={original_steps}"] if original_steps is not None else []
        if strength is not None and strength != 1:
            given.append(f"strength={strength:g}")
        if given:
            # the lcm schedule is for VP nets: a consistency model's config has no grid that takes them
            hint = (
                ""
                if cfg["origin"] == _CM_CLASS
                else "pass schedule='lcm' (the default for LCM and TCD configs), or "
            )
            raise ValueError(
                f"set_timesteps: {', '.join(given)}: options of the lcm schedule only (LCMScheduler's and "
                f"TCDScheduler's grids), not of this run's {schedule!r}; {hint}leave them out"
            )
        return schedule

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The net's input at the evaluation :meth:`step` takes next (before the first, the one
        ``timestep`` begins the run at): the sample itself, except for EDM configs and consistency models
        ``c_in sample`` (as diffusers' EDM schedulers and CMStochasticIterativeScheduler scale it;
        :meth:`EDMDenoiser.net_input <steerdiff.denoiser.EDMDenoiser.net_input>`)."""
        den = _plain(self._den)
        if not isinstance(den, (EDMDenoiser, ConsistencyModelDenoiser)):
            return sample
        run = self._run
        if run is None:
            raise ValueError("scale_model_input: call set_timesteps first")
        k = self.step_index
        if k is None:
            k = self._begin(run, timestep, "scale_model_input")
        if k >= len(self._times):
            raise ValueError(f"scale_model_input: the run's {len(self._times)} evaluations are done")
        return den.net_input(sample, self._times[k])

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha(t) x0 + sigma(t) noise`` (the forward process the net was trained on; for a consistency
        model ``x0 + sigma noise`` at its noise level, as CMStochasticIterativeScheduler adds it) at the
        process times of ``timesteps``, which must be entries of ``self.timesteps`` (one, or one per sample
        of the batch ``original_samples`` and ``noise`` broadcast to). Not for an inverse scheduler
        (``inverse=True``), whose run takes the noise level up itself."""
        if self.config["inverse"]:
            raise ValueError(
                "add_noise: an inverse scheduler (inverse=True) brings the clean sample up the noise levels "
                "by the probability-flow ODE and adds no noise; noise it with a forward SteerdiffScheduler "
                "(inverse=False)"
            )
        if self._run is None:
            raise ValueError("add_noise: call set_timesteps first")
        for name, value in (("original_samples", original_samples), ("noise", noise)):
            if not isinstance(value, Tensor):
                raise ValueError(f"add_noise: {name} must be a tensor, got {type(value).__name__}")
        ts = tensor("add_noise", "timesteps", timesteps).reshape(-1).to(self.timesteps.device, torch.float32)
        n = max(v.shape[0] if v.ndim else 1 for v in (original_samples, noise))  # the broadcast batch
        if ts.numel() not in (1, n):
            raise ValueError(
                f"add_noise: timesteps must hold one entry or one per sample ({n}), got {ts.numel()}"
            )
        match = ts[:, None] == self.timesteps[None, :]
        if not bool(match.any(1).all()):
            raise ValueError(f"add_noise: timesteps {ts.tolist()} are not all entries of scheduler.timesteps")
        t = torch.tensor([self._times[j] for j in match.int().argmax(1).tolist()], dtype=F64)
        a, s, _ = self._den.process.coefficients(t)
        plain = _plain(self._den)
        if isinstance(plain, ConsistencyModelDenoiser):
            s = torch.as_tensor(plain.noise_level(s))
        shape = (-1, *[1] * (original_samples.ndim - 1))
        device, dtype = original_samples.device, original_samples.dtype
        a, s = (
            a.to(device=device, dtype=dtype).reshape(shape),
            s.to(device=device, dtype=dtype).reshape(shape),
        )
        return a * original_samples + s * noise

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise` (``sample`` is the clean one)."""
        return self.add_noise(sample, noise, timestep)

    def _begin(self, run: _Run, timestep: Any, who: str = "step") -> int:
        """The index in ``timesteps`` where the run begins: the begin index if one was set, else that of
        the first ``timestep`` -- among equal entries the one at a step's input (diffusers' multistep
        schedulers begin at the first timestep's index; Heun, which lists its nodes twice, at the
        second match, as here). ``who``: the call ``timestep`` was given to, which errors name."""
        if self._begin_index is not None:
            return self._begin_index
        value = _timestep_value(timestep, who)  # one read from the device per run, as diffusers
        matches = [n for n, v in enumerate(self._net_times) if v == value]
        if not matches:
            raise ValueError(
                f"{who}: timestep={value:g} is not an entry of scheduler.timesteps; pass them in order"
            )
        return next((n for n in matches if run.evals[n][2]), matches[0])

    def _start(self, run: _Run, k: int) -> None:
        """Begin at ``timesteps[k]``: run the solver on the grid from the step that starts there."""
        if k != 0 and self.config["inverse"]:
            raise ValueError(
                f"an inverse run (inverse=True) begins at timesteps[0], the clean sample's, not at "
                f"timesteps[{k}] (set_begin_index({k}) or the first step's timestep): it has no img2img "
                "start; to stop below the noisiest node, stop calling step (prev_sample is the state there)"
            )
        if k == 0:
            if not run.evals[0][2]:  # the pipeline's first net call is at its sample, the solver's is not
                raise ValueError(
                    f"{run.solver!r} moves the sample before its first evaluation on this grid (edm_sde's "
                    "churn where the first node's sigma/alpha is within [s_tmin, s_tmax]; accel_ddpm's "
                    "noise before every evaluation), while a pipeline calls the net at its sample first; use "
                    "a grid that starts at the model's top (t_max) or above s_tmax, a lower s_tmax, or "
                    "another solver"
                )
            return
        firsts = {i: n for n, (_, i, _) in reversed(list(enumerate(run.evals)))}  # step -> first eval
        j = next((i for i, n in firsts.items() if n == k and run.evals[n][2]), None)
        if j is None:
            raise ValueError(
                f"the run cannot begin at timesteps[{k}] (set_begin_index({k}) or the first step's "
                f"timestep): it is not where a step of {run.solver!r} starts (at its input sample); begin "
                "at a step start"
            )
        tail, jumps = _tail(run.grid, j), frozenset(i - j for i in run.jumps if i >= j)
        evals = _plan(self._den, run.solver, tail, jumps)
        if [t for t, _, _ in evals] != self._times[k:]:
            # a warm-up that evaluates more (pndm's Runge-Kutta, plms's improved Euler) starts again there
            raise ValueError(
                f"the run cannot begin at timesteps[{k}] (set_begin_index({k}) or the first step's "
                f"timestep), the start of step {j}: {run.solver!r} begun there evaluates the net "
                f"{len(evals)} times, not the {len(self._times) - k} that timesteps[{k}:] list (its "
                "warm-up starts again); a pipeline cannot begin its run after step 0 (img2img): use a "
                "solver whose evaluations per step do not change with the warm-up (e.g. ipndm for pndm, "
                "plms)"
            )
        run.grid, run.evals, run.state, run.jumps = tail, evals, run.solver.init_state(tail), jumps
        run.tape.times = [t for t, _, _ in evals]

    def _check_timestep(self, timestep: Any, k: int) -> bool:
        """``timestep`` must be ``timesteps[k]``, ``k`` the call's step index: checked now for a number or a
        CPU tensor (else a ``ValueError``); ``True`` for a tensor on another device, to be checked at the end
        of the run (:meth:`_check_passed`: no device read per step)."""
        if isinstance(timestep, Tensor) and not timestep.is_cpu and timestep.numel() == 1:
            return True
        if _timestep_value(timestep) != self._net_times[k]:
            self._refuse_timestep(k, timestep)
        return False

    def _check_passed(self, run: _Run) -> None:
        """The deferred checks of :meth:`_check_timestep`, read from the device at once."""
        if run.passed:
            flags = torch.stack([t.reshape(()) == self.timesteps[k] for k, t in run.passed])
            j = first_false(flags)
            if j is not None:
                self._refuse_timestep(*run.passed[j])

    def _raw_eps(self, den: DynamicThreshold) -> _RawEps:
        """The :class:`_RawEps` of the run's thresholding denoiser ``den`` (made once per denoiser)."""
        if self._raw is None or self._raw[0] is not den:
            self._raw = (den, _RawEps(den.base, den.percentile, den.max_value))
        return self._raw[1]

    def _check_prev_timestep(self, prev_timestep: Any, k: int) -> None:
        """``prev_timestep`` (UnCLIPScheduler's) must be ``timesteps[k + 1]``, the next evaluation's, ``k``
        the call's step index; else a ``ValueError`` (a read from the device for a tensor on a GPU)."""
        value = _timestep_value(prev_timestep, "step", "prev_timestep")
        due = self._net_times[k + 1] if k + 1 < len(self._net_times) else None
        if value != due:
            where = f"timesteps[{k + 1}] = {due:g}" if due is not None else "none (the run's last evaluation)"
            raise ValueError(
                f"step: prev_timestep={value:g}, where the run's next evaluation is at {where} (step_index "
                f"{k}); SteerdiffScheduler steps to the next entry of its timesteps: pass that, or None"
            )

    def _refuse_timestep(self, k: int, timestep: Any) -> None:
        raise ValueError(
            f"step: timestep={_timestep_value(timestep):g} where scheduler.timesteps[{k}] = "
            f"{self._net_times[k]:g} was due (step_index {k}); pass the entries of timesteps in order"
        )

    def _eta_solver(self, solver: Solver, eta: Any) -> Solver:
        """The solver of :meth:`step` given ``eta`` (see there): ``solver``, the run's, at ``eta = 0``; else
        its DDIM with that ``eta``, its TCD with that ``gamma``, or a ``ValueError``. These take the net at
        the times the run planned whatever their noise (one evaluation per step, at its input)."""
        eta = real("step", "eta", eta, lo=0)
        if eta == 0:
            return solver
        if self.config["inverse"]:
            raise ValueError(
                f"step: eta={eta:g} in an inverse run (inverse=True), which runs the deterministic "
                "probability-flow ODE (as sd.invert; DDIMInverseScheduler takes no eta); accepted: eta=0"
            )
        if isinstance(solver, _solvers.DDIM):
            return replace(solver, eta=eta)
        if isinstance(solver, _solvers.TCD) and eta <= 1:
            return replace(solver, gamma=eta)
        raise ValueError(
            f"step: eta={eta:g} (DDIMScheduler's stochastic DDIM update, TCDScheduler's gamma) is no option "
            f"of this run's solver {solver!r}; accepted: eta=0 (the pipelines' default) with any solver, "
            "eta >= 0 with solver='ddim' (DDIM(eta), as DDIMScheduler), eta in [0, 1] with 'tcd' or 'lcm' "
            "(their gamma, as TCDScheduler)"
        )

    def _advance(self, run: _Run, solver: Solver) -> Tensor:
        """Re-run ``solver`` (the run's, or with :meth:`step`'s ``eta``) from the checkpoint until it asks for
        an evaluation not made yet (return that point) or the run ends (return the result); completed steps
        move the checkpoint."""
        tape, noise = run.tape, run.tape.noise
        assert run.x is not None, "step() sets x where the run starts"
        while run.i < run.grid.steps:
            state = _fork(run.state)
            tape.used = noise.used = 0
            try:
                out = solver.step(tape, run.x, run.i, run.grid, state)
            except _Halt as halt:
                run.at_input = halt.x is run.x
                return halt.x
            x = advance(out, noise, run.grid.t[run.i], run.grid.t[run.i + 1])  # as steerdiff.sample does
            if run.i in run.jumps:  # the next evaluation is across a jump of the field (run_grid's restart)
                solver.moved(state)
            run.x, run.state, run.i = x, state, run.i + 1
            tape.preds.clear()
            noise.draws.clear()
        run.done = True
        tape.check_finite()
        return run.x

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        variance_noise: Tensor | None = None,
        prev_timestep: Any = None,
        per_token_timesteps: Any = None,
        pred_original_sample: Tensor | None = None,
    ) -> SteerdiffSchedulerOutput | tuple[Tensor, Tensor]:
        """Take the net's output at the current evaluation and return where it is needed next.

        ``model_output`` is the net's output at ``sample`` and ``timestep``, which must be
        ``timesteps[step_index]`` (else a ``ValueError``; checked at the end of the run for a timestep
        on a GPU); the first call's ``timestep`` sets the begin index if none was set. Both are
        floating-point tensors of one shape (learned variance: ``model_output`` has twice the channels);
        a refused call leaves the run as it was. The pipeline's guidance is applied. After the last
        call ``prev_sample`` is the result. ``generator`` feeds stochastic solvers unless the scheduler
        has its own ``noise``.

        ``eta`` (pipelines pass theirs, ``pipe(eta=...)``, where ``step`` takes it; default 0) is
        DDIMScheduler's: above 0 a :class:`~steerdiff.solvers.DDIM` run (``solver="ddim"``) steps as
        ``DDIM(eta)``, DDIMScheduler's stochastic update, and a :class:`~steerdiff.solvers.TCD` one
        (``"tcd"``, ``"lcm"``) takes it as its ``gamma``, in ``[0, 1]``, as TCDScheduler does; other solvers
        have no such option and refuse it (a ``ValueError``), as an inverse run (``inverse=True``, the
        deterministic ODE) does. ``eta=0``, the pipelines' default, leaves the solver as configured
        (``DDIM(eta=0.5)`` keeps its 0.5; a TCD solver its ``gamma``, where TCDScheduler in a pipeline at
        the default runs ``gamma = 0``: give ``solver=TCD(gamma=0)`` for that).

        ``use_clipped_model_output`` (``DDIMPipeline`` passes it, ``None`` by default) is DDIMScheduler's for
        a :class:`~steerdiff.solvers.DDIM` run of a config that clips or thresholds x0 (``clip_sample``,
        ``thresholding``): ``None`` or ``False`` steps with the clipped ``x0'`` beside the net's own ``eps``,
        ``alpha' x0' + sqrt(sigma'^2 - c^2) eps (+ c z)`` (the prediction at ``x + alpha (x0' - x0)``, whose
        DDIM step that is), ``True`` with the eps of the clipped x0, ``(x - alpha x0') / sigma``, as
        :func:`steerdiff.sample` steps with a thresholding denoiser (``denoiser_from_diffusers``). Other
        solvers step with the consistent pair whatever it says; without clipping the two are one.

        ``variance_noise`` (LEDITS++, CycleDiffusion; DDIMScheduler's and DPMSolverMultistepScheduler's): the
        standard normal noise of the call's stochastic step, of ``sample``'s shape, used as the one draw the
        solver makes before the next evaluation (ahead of the scheduler's ``noise`` and of ``generator``); a
        call that draws none (a deterministic solver, ``eta=0`` DDIM, the step into the clean end) ignores it,
        as those schedulers do; a solver that draws twice in one call refuses it (a ``ValueError``).

        ``prev_timestep`` (UnCLIPScheduler's; the Kandinsky prior and unCLIP pipelines pass it): the timestep
        the step goes to, which must be the next entry of ``timesteps`` (``None``: the next, or the end;
        else a ``ValueError``). ``per_token_timesteps`` (LTX's conditioning: a timestep per token, the
        conditioning tokens' at their own noise level) and ``pred_original_sample`` (Cosmos', with a rewind of
        the scheduler's private step index) are refused unless ``None``: the run steps the whole sample at one
        noise level from the net's output.
        """
        if use_clipped_model_output is not None:
            boolean("step", "use_clipped_model_output", use_clipped_model_output)
        if per_token_timesteps is not None:
            raise ValueError(
                "step: per_token_timesteps (a timestep per token, LTXConditionPipeline's conditioning tokens "
                "at their own noise level) is not supported: SteerdiffScheduler's solvers step the whole "
                "sample at one process time (a per-token time would need a per-token grid in every solver); "
                "use the pipeline's own FlowMatchEulerDiscreteScheduler, or pass per_token_timesteps=None"
            )
        if pred_original_sample is not None:
            raise ValueError(
                "step: pred_original_sample (Cosmos' pipelines hand EDMEulerScheduler a denoised estimate of "
                "their own, and rewind its _step_index) is not supported: SteerdiffScheduler derives the "
                "estimate from model_output and follows its own step counter; pass pred_original_sample=None"
            )
        run = self._run
        if run is None:
            raise ValueError("step: call set_timesteps first")
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, Tensor):
                raise ValueError(f"step: {name} must be a tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise ValueError(f"step: {name} must be a floating-point tensor, got {value.dtype}")
        shape = tuple(sample.shape)  # the net's output at sample (learned variance: twice its channels)
        if _plain(self._den).learned_variance and sample.ndim > 1:
            shape = (shape[0], 2 * shape[1], *shape[2:])
        if tuple(model_output.shape) != shape:
            raise ValueError(
                f"step: model_output has shape {tuple(model_output.shape)}, expected {shape} (the net's "
                f"output at sample, of shape {tuple(sample.shape)})"
            )
        return_dict = boolean("step", "return_dict", return_dict)
        solver = self._eta_solver(run.solver, eta)
        # checked before the run changes: a refused call leaves it as it was
        source = make_noise(self._noise if self._noise is not None else generator, "step")
        if isinstance(source, PerSampleNoise):  # checked whatever the solver, as sd.sample does
            who = "step" if self._noise is None else "step (scheduler.noise)"
            check_rows(source.generators, len(sample), who)
        if variance_noise is not None:
            if not isinstance(variance_noise, Tensor) or not variance_noise.is_floating_point():
                raise ValueError(
                    "step: variance_noise must be a floating-point tensor of sample's shape (the step's "
                    f"standard normal noise), got {type(variance_noise).__name__}"
                )
            if variance_noise.shape != sample.shape:
                raise ValueError(
                    f"step: variance_noise has shape {tuple(variance_noise.shape)}, expected sample's "
                    f"{tuple(sample.shape)}"
                )
            source = _GivenDraw(variance_noise, solver)
        if run.done:
            raise ValueError(
                f"step: called more than the {len(self._times)} times of scheduler.timesteps; "
                "call set_timesteps to start a new run"
            )
        work = work_dtype(sample.dtype)
        if run.x is not None and sample.shape != run.x.shape:
            raise ValueError(
                f"step: sample has shape {tuple(sample.shape)}, the run's is {tuple(run.x.shape)} (the first "
                "step's sample); call set_timesteps to start a run of another shape"
            )
        k = self.step_index
        first = k is None
        if k is None:
            k = self._begin(run, timestep)
        deferred = self._check_timestep(timestep, k)  # before the run takes the call's sample
        if prev_timestep is not None:
            self._check_prev_timestep(prev_timestep, k)
        if first:
            self._start(run, k)
            run.x, run.started = sample.to(work, copy=True), True
        elif run.at_input and not _unchanged(run, sample):  # the entries the pipeline changed (inpainting)
            assert run.x is not None and run.sent is not None, "an earlier step set them"
            run.x = torch.where(sample == run.sent, run.x, sample.to(work))
        if deferred:
            run.passed.append((k, timestep))
        run.tape.noise.source = source
        run.tape.denoiser = self._den
        clipped = use_clipped_model_output  # DDIMScheduler's option, for its solver
        if not clipped and isinstance(solver, _solvers.DDIM) and isinstance(self._den, DynamicThreshold):
            run.tape.denoiser = self._raw_eps(self._den)
        run.tape.pending = model_output.to(work)
        x = self._advance(run, solver)
        if run.done:
            self._check_passed(run)
        run.sent, last = x.to(sample.dtype), run.tape.last
        assert last is not None, "the evaluation of the pipeline's output was made in _advance"
        prev, x0 = _versioned_copy(run.sent), last.x0.to(sample.dtype, copy=True)
        run.given, run.given_version = weakref.ref(prev), prev._version
        if not return_dict:
            return prev, x0
        return SteerdiffSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])
