r"""A network together with how it was trained.

``Denoiser(net, process, prediction)`` turns one network call ``net(x, t_model, **cond)`` into
both the denoised estimate ``x0`` and the noise estimate ``eps`` of
``x_t = alpha x0 + sigma eps``. Solvers only ever see ``(x0, eps)``, never a parameterization.

With ``a = alpha(t)``, ``s = sigma(t)`` and the net output ``f``:

=============  ==============================  =========================================
prediction     meaning of ``f``                conversion
=============  ==============================  =========================================
``eps``        noise ``eps``                   ``x0 = (x - s f) / a``
``x0``         clean data ``x0``               ``eps = (x - a f) / s``
``v``          ``a eps - s x0`` (Salimans &    ``x0 = (a x - s f) / (a^2 + s^2)``,
               Ho 2022)                        ``eps = (s x + a f) / (a^2 + s^2)``
``score``      ``grad log p_t(x) = -eps / s``  ``eps = -s f``
``flow``       ``dx/dt = a' x0 + s' eps``      ``x0 = (s' x - s f) / (a s' - s a')``,
               (Lipman et al. 2022)            ``eps = (a f - a' x) / (a s' - s a')``
=============  ==============================  =========================================
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from ._checks import boolean, caller, choice, ordered, real, sizes, tensor
from ._ops import axpby, kept
from .noise import Generators, take_generator_rows
from .processes import EDM, MeanReverting, Process

_W = TypeVar("_W")

__all__ = [
    "DIFFUSERS_PREDICTIONS",
    "PREDICTIONS",
    "ConsistencyModelDenoiser",
    "CostOfBase",
    "Denoiser",
    "EDMDenoiser",
    "Prediction",
    "check_call",
    "consistency_noise",
    "consistency_process",
    "predict_rows",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
# diffusers' prediction_type of each (a scheduler config's name; DIFFUSERS_PREDICTIONS[name] is ours)
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
_CACHE_SIZE = 4096


class Prediction:
    """What a denoiser says at ``(x, t)``: ``x0`` and ``eps``, with ``x = alpha x0 + sigma eps``.

    Built from one of the two (``given``); the other is derived on first access, so a solver that
    renoises (DDIM, Euler) never pays for it. ``var_interp`` is the learned-variance interpolation
    ``v`` of a ``learned_variance`` denoiser (else ``None``).
    """

    __slots__ = ("_eps", "_x0", "alpha", "sigma", "var_interp", "x")

    def __init__(
        self,
        x: Tensor,
        alpha: float | Tensor,
        sigma: float | Tensor,
        *,
        x0: Tensor | None = None,
        eps: Tensor | None = None,
    ) -> None:
        if (x0 is None) == (eps is None):
            raise ValueError("Prediction: give exactly one of `x0` or `eps`")
        self.x, self.alpha, self.sigma, self._x0, self._eps = x, alpha, sigma, x0, eps
        self.var_interp: Tensor | None = None

    @property
    def given(self) -> Tensor:
        """A held estimate, from which the other is derived: ``x0`` where held (given, or derived
        already: :attr:`x0_given`), else ``eps``."""
        if self._x0 is not None:
            return self._x0
        assert self._eps is not None, "__init__ is given x0 or eps, and neither is dropped"
        return self._eps

    @property
    def x0_given(self) -> bool:
        """Whether ``x0`` is held rather than derived on access (it was given, or derived already).

        Solvers use it to pick, between two algebraically equal updates, the one that reads the
        held estimate: deriving ``eps = (x - alpha x0) / sigma`` and then recombining with ``x``
        cancels catastrophically where ``alpha`` is tiny (zero terminal SNR, Lin et al. 2024).
        """
        return self._x0 is not None

    @property
    def x0(self) -> Tensor:
        """The denoised estimate, ``(x - sigma eps) / alpha`` where the net gave ``eps`` (derived once)."""
        if self._x0 is None:
            self._x0 = axpby(1 / self.alpha, self.x, -self.sigma / self.alpha, self.given)  # eps
        return self._x0

    @property
    def eps(self) -> Tensor:
        """The noise estimate, ``(x - alpha x0) / sigma`` where the net gave ``x0`` (derived once)."""
        if self._eps is None:
            self._eps = axpby(1 / self.sigma, self.x, -self.alpha / self.sigma, self.given)  # x0
        return self._eps

    def renoise(self, alpha: float, sigma: float) -> Tensor:
        """``alpha x0 + sigma eps``: the point at ``(alpha, sigma)`` with the same estimates (the DDIM
        step), from ``x`` and the given estimate in two fused kernels."""
        if self._eps is not None:
            return axpby(alpha / self.alpha, self.x, sigma - alpha * self.sigma / self.alpha, self._eps)
        return axpby(sigma / self.sigma, self.x, alpha - sigma * self.alpha / self.sigma, self.given)  # x0

    def to(self, dtype: torch.dtype, x: Tensor | None = None) -> Prediction:
        """This prediction in ``dtype`` at the point ``x`` (default: ``self.x`` cast to ``dtype``).

        The given estimate, ``var_interp`` and tensor ``alpha``/``sigma`` are cast; the other estimate
        is derived again on access, from ``x``. With ``x`` the full-precision state a half-precision
        net was evaluated at (cast down), the result is what a scheduler that upcasts the net output
        computes (diffusers' ``step``): ``x = alpha x0 + sigma eps`` holds for that ``x``. A
        subclass's extra fields are carried over as they are.
        """
        out = copy.copy(self)  # keeps the subclass and its extra slots
        out.x = self.x.to(dtype) if x is None else x
        if isinstance(self.alpha, Tensor):
            out.alpha = self.alpha.to(dtype)
        if isinstance(self.sigma, Tensor):
            out.sigma = self.sigma.to(dtype)
        given = self.given.to(dtype)
        out._x0, out._eps = (given, None) if self._x0 is not None else (None, given)
        out.var_interp = None if self.var_interp is None else self.var_interp.to(dtype)
        return out


def take_tensor_rows(value: Tensor, rows: Tensor | slice) -> Tensor:
    """``value``'s rows at ``rows``: integer indices (on any device) or a slice."""
    return value[rows] if isinstance(rows, slice) else value.index_select(0, rows.to(value.device))


def take_kwarg_rows(kwargs: dict[str, Any], rows: Tensor | slice, n: int) -> dict[str, Any]:
    """``kwargs`` with every tensor of ``n`` rows (at least 1-d, first dimension ``n``) taken at ``rows``
    (integer indices or a slice), in a new dict; ``kwargs`` itself where none has ``n`` rows. The one
    rule by which per-sample conditions follow particles and ``max_batch`` slices."""
    hit = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n]
    if not hit:
        return kwargs
    return {**kwargs, **{k: take_tensor_rows(kwargs[k], rows) for k in hit}}


def override_kwargs(
    who: str, name: str, cond: dict[str, Any], override: dict[str, Any], n: int
) -> dict[str, Any]:
    """``{**cond, **override}`` for a call on ``n`` samples; a ``ValueError`` naming ``name[key]`` where
    an override of a per-sample condition (a tensor of ``n`` rows) has as many dimensions but another
    number of rows than ``n`` or 1 (it would fail inside the net, or broadcast wrongly)."""
    for k, v in override.items():
        c = cond.get(k)
        if (
            isinstance(v, Tensor)
            and isinstance(c, Tensor)
            and v.ndim == c.ndim > 0
            and c.shape[0] == n
            and v.shape[0] not in (1, n)
        ):
            raise ValueError(
                f"{who}: {name}[{k!r}] has {v.shape[0]} rows, but the condition {k!r} it overrides has one "
                f"per sample ({n} in this call): give {name}[{k!r}] one row per sample of the batch the "
                "sampler is called with (shape[0] for a particle method, which gives each particle its batch "
                "row's), or one for all (first dimension 1, or a 0-d tensor)"
            )
    return {**cond, **override}


def _per_sample(value: Tensor, x: Tensor) -> Tensor | float:
    """A float64 scalar or ``(batch,)`` tensor as something that broadcasts against ``x``."""
    if value.ndim == 0:
        return float(value)
    return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def take_wrapped_rows(
    wrapper: _W,
    rows: Tensor | slice,
    n: int,
    parts: tuple[str, ...] = ("base",),
    kwargs: tuple[str, ...] = (),
) -> _W:
    """``take_rows(rows, n)`` of a denoiser that wraps others (guidance, continuous or discrete), or that
    draws noise of its own: a copy whose ``parts`` (attribute names: denoisers, or other objects with a
    ``take_rows(rows, n)`` such as CFG's :class:`~steerdiff.guidance.CADS`; ``None`` skipped) are their
    ``take_rows`` (one held twice, as a CFG's ``uncond`` that is its ``base``, stays one), whose
    keyword-argument dicts ``kwargs`` have their tensors of ``n`` rows taken at ``rows``, and whose
    generators (the attributes :attr:`Denoiser.noise_generators` names) have a list of ``n``, one per row,
    taken at ``rows`` (:func:`~steerdiff.noise.take_generator_rows`: row ``rows[k]``'s generator draws
    row ``k``, the noise the row gets in a whole batch); ``wrapper`` itself where nothing changes."""
    taken: dict[int, Any] = {}
    new: dict[str, Any] = {}
    for name in parts:
        part = getattr(wrapper, name)
        if part is None:
            continue
        if id(part) not in taken:
            taken[id(part)] = part.take_rows(rows, n)
        new[name] = taken[id(part)]
    new.update({name: take_kwarg_rows(getattr(wrapper, name), rows, n) for name in kwargs})
    # a discrete wrapper (no Denoiser) draws no noise of its own
    for name in getattr(wrapper, "noise_generators", ()):
        new[name] = take_generator_rows(getattr(wrapper, name), rows, n)
    if all(value is getattr(wrapper, name) for name, value in new.items()):
        return wrapper
    out = copy.copy(wrapper)
    for name, value in new.items():
        setattr(out, name, value)
    return out


class CostOfBase:
    """The ``cost`` of a denoiser that wraps another, ``base`` (guidance, continuous or discrete): the network
    evaluations of its latest call, which the sampler reads after each call -- ``base.cost`` read at that
    moment (exact where ``base``'s cost varies from call to call) unless the wrapper assigns its own
    (``self.cost = ...``, e.g. a CFG summing its branches'). Listed before the denoiser class it mixes in."""

    base: Any
    _cost: int | None = None

    @property
    def cost(self) -> int:
        """Network evaluations of the latest call: ``base.cost`` unless the wrapper assigned one."""
        return int(self.base.cost) if self._cost is None else self._cost

    @cost.setter
    def cost(self, value: int) -> None:
        self._cost = value


class Denoiser:
    """A network, its noise process and its prediction type.

    Args:
        net: ``net(x, t_model, **cond) -> Tensor`` of ``x``'s shape.
        process: the :class:`~steerdiff.processes.Process` the net was trained on.
        prediction: one of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"flow"``.
        time_map: maps process time (float64) to the net's time input; defaults to
            ``process.model_time`` (the identity: for ``VP.discrete`` the timestep index).
        shape: the shape of one sample, if known; :func:`steerdiff.sample` then checks ``x_T``.
        learned_variance: the net returns ``2C`` channels (dim 1): the prediction, then ``r`` in
            ``[-1, 1]`` giving the interpolation ``v = (r + 1) / 2`` of the log variance between the
            posterior variance and ``beta`` (Improved DDPM, Nichol & Dhariwal 2021, Eq. 15; the
            ``learned_range`` of their code and of diffusers), stored as ``Prediction.var_interp``
            and used by the DDPM sampler.

    Calling ``den(x, t, **cond)`` with a float ``t`` (or a ``(batch,)`` tensor of times) returns a
    :class:`Prediction`; it costs exactly ``cost`` net calls (one here; a guided denoiser of
    :mod:`steerdiff.guidance` that calls its nets more often says how many).
    """

    cost: int = 1
    guided: ClassVar[bool] = False  # True for the guided wrappers (steerdiff.guidance.Guided)
    # True where the time the net is evaluated at depends on the state (TimeShift): invert refuses it
    state_time: ClassVar[bool] = False
    # the attributes holding the generators of the noise it draws itself (each None, one torch.Generator or
    # a list, one per row): take_wrapped_rows takes a per-row list at the rows of a call on part of the batch
    noise_generators: ClassVar[tuple[str, ...]] = ()

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale ``w`` of ``eps_u + w (eps_c - eps_u)`` this denoiser
        applies, where it is one (:class:`~steerdiff.guidance.CFG`); ``None`` otherwise. The guided
        default solver's long-step limit grows as ``w`` falls (:func:`steerdiff.sampling.guided_max_h`)."""
        return None

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: Process,
        prediction: str = "eps",
        time_map: Callable[[Tensor], Tensor] | None = None,
        shape: tuple[int, ...] | None = None,
        learned_variance: bool = False,
    ) -> None:
        if prediction not in PREDICTIONS:
            ours = DIFFUSERS_PREDICTIONS.get(prediction) if isinstance(prediction, str) else None
            hint = f" (diffusers' prediction_type {prediction!r} is prediction={ours!r})" if ours else ""
            raise ValueError(f"Denoiser: unknown prediction={prediction!r}; accepted: {PREDICTIONS}{hint}")
        if not isinstance(process, Process):
            raise ValueError(f"Denoiser: `process` must be a steerdiff Process, got {type(process)}")
        if not callable(net):
            raise ValueError(f"Denoiser: `net` must be callable as net(x, t, **cond), got {type(net)}")
        if time_map is not None and not callable(time_map):
            raise ValueError(
                f"Denoiser: `time_map` must be None or callable as time_map(t) -> Tensor, "
                f"got {type(time_map)}"
            )
        self.net = net
        self.process = process
        self.prediction = prediction
        self.time_map = time_map if time_map is not None else process.model_time
        self.shape = sizes("Denoiser", "shape", shape) if shape is not None else None
        self.learned_variance = boolean("Denoiser", "learned_variance", learned_variance)
        # per-time caches: a solver asks for the same few times over and over (schedule arithmetic is
        # float64 tensor work that would otherwise dominate the per-step overhead)
        self._coefs: dict[float, tuple[float, float, float, float]] = {}
        self._times: dict[tuple[float, torch.device, torch.dtype, int], Tensor] = {}

    def net_time(self, t: float | Tensor, x: Tensor) -> Tensor:
        """The ``(batch,)`` time tensor handed to the net."""
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        if isinstance(t, Tensor) and t.ndim > 0:
            if t.ndim != 1 or t.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"Denoiser: per-sample times t must have shape ({x.shape[0]},) (one per row of x), "
                    f"got {tuple(t.shape)}"
                )
            return self.time_map(t.to(torch.float64)).to(device=x.device, dtype=dtype).expand(x.shape[0])
        if len(self._times) > _CACHE_SIZE:
            self._times.clear()
        key = (float(t), x.device, dtype, x.shape[0])
        known = self._times.get(key)  # a solver's time seen before: no closure made for kept (0.3 us a call)
        if known is not None:
            return known

        def make() -> Tensor:  # a fill on the device: no host-to-device copy
            value = float(self.time_map(torch.tensor(key[0], dtype=torch.float64)))
            return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)

        return kept(self._times, key, make)

    def coefficients(self, t: float | Tensor, x: Tensor) -> tuple[Tensor | float, ...]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t``: floats for a scalar time, else per-sample tensors
        broadcasting against ``x`` (the derivatives only for ``prediction="flow"``, 0 otherwise)."""
        p, flow = self.process, self.prediction == "flow"
        if isinstance(t, Tensor) and t.ndim > 0:
            tt = t.to(torch.float64)
            derivs = (p.d_alpha(tt), p.d_sigma(tt)) if flow else (torch.zeros_like(tt),) * 2
            return tuple(_per_sample(c, x) for c in (p.alpha(tt), p.sigma(tt), *derivs))
        key = float(t)
        c = self._coefs.get(key)
        if c is None:
            if len(self._coefs) > _CACHE_SIZE:
                self._coefs.clear()
            da, ds = (float(p.d_alpha(key)), float(p.d_sigma(key))) if flow else (0.0, 0.0)
            a, s, _ = p.coefficients(key)  # one pass (VP: lam once, not once each for alpha and sigma)
            c = self._coefs[key] = (float(a), float(s), da, ds)
        return c

    def __call__(self, x: Tensor, t: float | Tensor, /, **cond: Any) -> Prediction:
        """The prediction at ``x`` and process time ``t`` (a float, or one per row), ``**cond`` passed to the
        net. ``x`` and ``t`` are positional-only, so that ``**cond`` may hold any name (``x=``, ``t=``)."""
        check_call(type(self).__name__, x, t)
        return self._evaluate(x, t, x.dtype, cond)

    def describe_shape(self) -> str:
        """The sample shape this denoiser expects (:attr:`shape`, known), as a message about a wrong one
        names it: the tuple here; a denoiser of a stacked state adds its layout
        (:class:`~steerdiff.guidance.Coupled`), a wrapper gives its base's."""
        return str(self.shape)

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """The denoisers this one calls: ``()`` here; a wrapper's ``base``
        (:class:`~steerdiff.guidance.Guided`), both branches of a :class:`~steerdiff.guidance.CFG`, every
        model of a :class:`~steerdiff.guidance.Coupled` or component of a :class:`~steerdiff.smc.Composition`.
        The one way to reach inside a wrapper: :meth:`own_noise` collects through it,
        :func:`~steerdiff.invert` walks it for a denoiser it refuses (:attr:`state_time`)."""
        return ()

    def own_noise(self) -> list[tuple[str, Generators]]:
        """The parts of this denoiser that draw noise themselves (guided wrappers such as ``RePaint``
        and ``CADS``), each with its generator: ``None`` (torch's global RNG, out of reach of a
        sampler's ``generator``), one ``torch.Generator`` (the whole batch drawn from it) or a list
        (one per row). Samplers check them against their own ``generator``
        (:func:`~steerdiff.sampling.check_seeded`). Here: those of :meth:`inner_denoisers`, each
        distinct one once (``[]`` for a plain denoiser); a wrapper that draws noise adds itself."""
        distinct = {id(d): d for d in self.inner_denoisers()}.values()
        return [src for d in distinct for src in d.own_noise()]

    def breaks(self) -> tuple[float, ...]:
        """The process times at which this denoiser's prediction may jump, increasing, each once: its
        :meth:`own_breaks` and those of its :meth:`inner_denoisers` (an inner denoiser's on another process,
        as :class:`~steerdiff.Reprocessed`'s base, mapped to this one's time of equal log-SNR,
        ``t_of_lam(lam_inner(b))``); ``()`` for a plain denoiser.

        Between consecutive breaks ``b_k < b_{k+1}`` the prediction is smooth in ``t`` on ``(b_k, b_{k+1}]``:
        at a break it takes the value of the less noisy side, as RF-Inversion's window ``start <= 1 - t <
        stop`` does (:class:`~steerdiff.rf_inversion.ControlledEditing`; CFG's guidance interval declares
        none, measured: see :class:`~steerdiff.guidance.CFG`). After a step whose
        nodes lie on two pieces, :func:`~steerdiff.sampling.run_grid` restarts the solver's history
        (:meth:`~steerdiff.solvers.base.Solver.moved`), so that no multistep extrapolation mixes
        estimates from both sides of a jump; so do the particle engine (:func:`~steerdiff.smc.run_smc`) and
        :func:`~steerdiff.paradigms` (:func:`~steerdiff.sampling.crossings`)."""
        out = set(self.own_breaks())
        for d in {id(d): d for d in self.inner_denoisers()}.values():
            for b in d.breaks():
                out.add(b if d.process is self.process else float(self.process.t_of_lam(d.process.lam(b))))
        return tuple(sorted(b for b in out if math.isfinite(b)))

    def crosses(self, t_a: float, t_b: float) -> bool:
        """Whether this denoiser's predictions at the times ``t_a`` and ``t_b`` (any order) may lie on two
        pieces of its field (:meth:`breaks`): a break ``b`` of :meth:`own_breaks` with ``min <= b < max``,
        or a crossing of an inner denoiser between its times of equal log-SNR. What
        :func:`~steerdiff.sampling.crossings` restarts a solver's history on, after each step. A wrapper
        that evaluates its inner denoisers at other times than its own (:class:`~steerdiff.guidance.
        TimeShift`: a time chosen per sample from a window) overrides it: its jumps then need not happen
        at fixed times."""
        lo, hi = min(t_a, t_b), max(t_a, t_b)
        if any(lo <= b < hi for b in self.own_breaks()):
            return True
        for d in {id(d): d for d in self.inner_denoisers()}.values():
            if d.process is self.process:
                a, b = t_a, t_b
            else:
                a, b = (float(d.process.t_of_lam(self.process.lam(t))) for t in (t_a, t_b))
            if d.crosses(a, b):
                return True
        return False

    def own_breaks(self) -> tuple[float, ...]:
        """The times at which this denoiser itself switches its prediction, on top of its inner denoisers'
        (:meth:`breaks`): ``()`` here; a wrapper that switches (RF-Inversion's editing window) overrides
        it."""
        return ()

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """This denoiser for calls whose sample ``k`` is sample ``rows[k]`` of a batch of ``n``: the
        per-sample state it holds of its own (tensors of ``n`` rows, as :class:`~steerdiff.guidance.CFG`'s
        ``uncond_kwargs`` or an inverse-problem wrapper's ``y`` may be) taken at ``rows``, in a copy;
        itself where it holds none (here). ``rows``: integer indices or a slice.

        The particle methods of :mod:`steerdiff.smc` call it once with each batch row repeated for its
        particles, and again per slice of ``max_batch`` rows (as :class:`~steerdiff.smc.Composition`
        does for its own ``max_batch``): what they do with the tensors of the sampler's ``**cond``.
        """
        return self

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The prediction at ``x`` with the network run in ``net_dtype`` (a half-precision net under a
        float32 solver state, see :func:`steerdiff.solvers.base.work_dtype`).

        The net gets ``x`` cast to ``net_dtype``; its output is cast back to ``x``'s dtype and
        converted to ``(x0, eps)`` there, at ``x`` itself: what diffusers' schedulers compute from
        an upcast ``model_output`` and the float32 ``sample``. A wrapper that overrides ``__call__``
        (guidance) is called in ``net_dtype`` -- it may call nets of its own -- and its prediction is
        cast back at ``x`` (:meth:`Prediction.to`), unless it overrides ``evaluate`` too, to keep its
        own arithmetic in ``x``'s dtype and pass ``net_dtype`` on to its nets (CFG, RePaint, SMC).
        """
        check_call(f"{type(self).__name__}.evaluate", x, t)
        if type(self).__call__ is Denoiser.__call__:  # checked: the net's call itself, not __call__ again
            return self._evaluate(x, t, net_dtype, cond)
        if x.dtype == net_dtype:
            return self(x, t, **cond)
        return self(x.to(net_dtype), t, **cond).to(x.dtype, x)

    def _evaluate(
        self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, cond: dict[str, Any]
    ) -> Prediction:
        given = self.net_input(x, t)  # .to only for another dtype: a no-op call costs 1 us of each evaluation
        f = self.net(given if given.dtype == net_dtype else given.to(net_dtype), self.net_time(t, x), **cond)
        if not isinstance(f, Tensor):
            raise ValueError(
                f"Denoiser: net returned a {type(f).__name__}, not a Tensor (a diffusers model returns an "
                "output object: steerdiff.integrations.diffusers.denoiser_from_diffusers(model, "
                "scheduler.config) unwraps it, as does net=lambda x, t, **c: model(x, t, **c).sample)"
            )
        expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if self.learned_variance else x.shape
        if f.shape != expected:  # the hint's doubled shape only here: this runs at every evaluation
            doubled = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
            hint = (
                " (twice the channels: a net that also predicts its variance, as DiT's, IF's and improved "
                "DDPM's do, is sd.Denoiser(..., learned_variance=True))"
                if f.shape == doubled and not self.learned_variance
                else ""
            )
            got = tuple(f.shape)
            raise ValueError(f"Denoiser: net returned shape {got}, expected {tuple(expected)}{hint}")
        f = f if f.dtype == x.dtype else f.to(x.dtype)
        if not self.learned_variance:
            return self.convert(f, x, t)
        f, r = f.chunk(2, dim=1)
        pred = self.convert(f, x, t)
        pred.var_interp = (r + 1) / 2
        return pred

    def net_input(self, x: Tensor, t: float | Tensor) -> Tensor:
        """What the net is given at ``(x, t)``: ``x`` itself (:class:`EDMDenoiser` scales it)."""
        return x

    def convert(self, f: Tensor, x: Tensor, t: float | Tensor) -> Prediction:
        """Turn a raw net output ``f`` at ``(x, t)`` into ``(x0, eps)``."""
        a, s, da, ds = self.coefficients(t, x)
        if self.prediction == "eps":
            return Prediction(x, a, s, eps=f)
        if self.prediction == "x0":
            return Prediction(x, a, s, x0=f)
        if self.prediction == "score":
            return Prediction(x, a, s, eps=f * -s)
        if self.prediction == "v":
            n = a * a + s * s
            return Prediction(x, a, s, x0=axpby(a / n, x, -s / n, f))
        det = a * ds - s * da
        return Prediction(x, a, s, x0=axpby(ds / det, x, -s / det, f))

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r}, process={self.process!r})"


def predict_rows(
    den: Denoiser,
    x: Tensor,
    t_rows: Tensor,
    rows: Tensor,
    n: int,
    net_dtype: torch.dtype | None,
    cond: dict[str, Any],
) -> tuple[Prediction, int]:
    """One batched call of ``den`` on ``x`` whose row ``r`` is at process time ``t_rows[r]`` (float64) and is
    sample ``rows[r]`` of a batch of ``n`` (its per-sample state and ``cond``'s tensors taken at ``rows``:
    :meth:`Denoiser.take_rows`, :func:`take_kwarg_rows`), the net in ``net_dtype`` (``None``: ``x``'s;
    :meth:`Denoiser.evaluate`): the prediction and the call's cost in network evaluations. What
    :func:`steerdiff.paradigms` (a window of grid nodes) and :func:`steerdiff.solvers.dpm_adaptive` (each
    sample at its own time) call."""
    part = den.take_rows(rows, n)
    kwargs = take_kwarg_rows(cond, rows, n)
    pred = part(x, t_rows, **kwargs) if net_dtype is None else part.evaluate(x, t_rows, net_dtype, **kwargs)
    return pred, part.cost


def edm_noise(t: Tensor) -> Tensor:
    """EDM's net time ``c_noise = log(sigma) / 4`` at ``t = sigma`` (Karras et al. 2022, Table 1)."""
    return 0.25 * torch.log(t)


class EDMDenoiser(Denoiser):
    r"""The preconditioned denoiser of Karras et al. 2022 (EDM), Sec. 5 and Table 1, on the process
    ``x = x0 + sigma eps`` (:class:`~steerdiff.processes.EDM`, ``t = sigma``), with ``s_d = sigma_data``
    the standard deviation of the data::

        D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        c_skip = s_d^2 / (sigma^2 + s_d^2)      c_out = sigma s_d / sqrt(sigma^2 + s_d^2)
        c_in = 1 / sqrt(sigma^2 + s_d^2)        c_noise = log(sigma) / 4

    ``output="edm"``: ``F`` is the paper's (diffusers' EDM schedulers' ``prediction_type="epsilon"``);
    ``"v"``: ``c_out`` negated (their ``"v_prediction"``): ``F`` is then the v (Salimans & Ho 2022)
    ``a eps - s x0 / s_d`` of the variance-preserving point ``c_in x = a x0 / s_d + s eps``
    (``a = s_d c_in``, ``s = sigma c_in``). The net gets ``c_in x`` (:meth:`net_input`) and
    ``time_map(sigma)`` (default ``c_noise``); the denoiser's ``x0`` is ``D``, its ``eps`` ``(x - x0) /
    sigma``.
    """

    OUTPUTS = ("edm", "v")

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: EDM,
        sigma_data: float = 0.5,
        output: str = "edm",
        time_map: Callable[[Tensor], Tensor] | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        who = "EDMDenoiser"
        if not isinstance(process, EDM):
            raise ValueError(f"{who}: process must be a steerdiff EDM process, got {type(process).__name__}")
        self.sigma_data = real(who, "sigma_data", sigma_data, lo=0, lo_open=True)
        self.output = choice(who, "output", output, self.OUTPUTS)
        super().__init__(net, process, "x0", edm_noise if time_map is None else time_map, shape)

    def net_input(self, x: Tensor, t: float | Tensor) -> Tensor:
        """``c_in x = x / sqrt(sigma^2 + s_d^2)``."""
        s = self.coefficients(t, x)[1]
        return x * (s * s + self.sigma_data**2) ** -0.5

    def convert(self, f: Tensor, x: Tensor, t: float | Tensor) -> Prediction:
        """``x0 = c_skip x + c_out f``."""
        a, s, _, _ = self.coefficients(t, x)
        d2 = self.sigma_data**2
        n = s * s + d2
        c_out = s * self.sigma_data * n**-0.5
        return Prediction(x, a, s, x0=axpby(d2 / n, x, c_out if self.output == "edm" else -c_out, f))

    def __repr__(self) -> str:
        sd, out = self.sigma_data, self.output
        return f"EDMDenoiser(sigma_data={sd:g}, output={out!r}, process={self.process!r})"


def consistency_noise(sigma_min: float, t: Tensor) -> Tensor:
    """The net time of a consistency model (Song et al. 2023; their code and diffusers'
    ``CMStochasticIterativeScheduler``) at process time ``t`` of :class:`ConsistencyModelDenoiser`:
    ``1000 * 0.25 * log(sigma + 1e-44)`` at the noise level ``sigma = sqrt(t^2 + sigma_min^2)``."""
    return 250 * torch.log(torch.sqrt(t * t + sigma_min**2) + 1e-44)


def consistency_process(sigma_min: float, sigma_max: float, t_min: float | None = None) -> EDM:
    """The process of a consistency model on the noise levels ``[sigma_min, sigma_max]``
    (:class:`ConsistencyModelDenoiser`): ``x = x_eps + t z`` with ``t = sqrt(sigma^2 - sigma_min^2)``,
    :class:`~steerdiff.processes.EDM` on ``[t_min, sqrt(sigma_max^2 - sigma_min^2)]`` (``t_min`` default
    ``sigma_min``)."""
    lo, hi = ordered(
        "consistency_process", "sigma_min", sigma_min, "sigma_max", sigma_max, lo=0, lo_open=True
    )
    top = math.sqrt(hi * hi - lo * lo)
    bottom = lo if t_min is None else real("consistency_process", "t_min", t_min, lo=0, hi=top, lo_open=True)
    return EDM(bottom, top)


class ConsistencyModelDenoiser(Denoiser):
    r"""A consistency model (Song et al. 2023, "Consistency Models", Sec. 3 and App. C; its released nets,
    diffusers' ``ConsistencyModelPipeline``): a net ``F`` whose output goes through the boundary condition

        f(x, sigma) = c_skip x + c_out F(c_in x; c_noise)
        c_skip = s_d^2 / ((sigma - e)^2 + s_d^2)     c_out = (sigma - e) s_d / sqrt(sigma^2 + s_d^2)
        c_in = 1 / sqrt(sigma^2 + s_d^2)             c_noise = 250 log(sigma)  (consistency_noise)

    with ``e = sigma_min``, so that ``f(x, e) = x``: ``f`` is the consistency function, the point at noise
    level ``e`` of the probability-flow ODE of ``x = x0 + sigma z`` through ``x`` -- an ``x_e``, not an
    ``x0``. Its process is therefore that of ``x_e``, ``x = x_e + t z`` with ``t = sqrt(sigma^2 - e^2)``
    (:func:`consistency_process`: :class:`~steerdiff.processes.EDM` in ``t``; ``x0 + sigma z`` has the law
    of ``x_e + t z`` when ``x_e`` has that of ``x0 + e z``), whose clean end ``t = 0`` is ``sigma = e``: the
    denoiser's ``x0`` is ``f``, its ``eps`` ``(x - f) / t``. The ``lcm`` solver's step ``x0 + t_{i+1} z`` is
    then Song et al.'s multistep consistency sampling (Alg. 1), ``f + sqrt(tau^2 - e^2) z``, and a run into
    the clean end returns ``f`` at the last node, as ``CMStochasticIterativeScheduler`` does. The net gets
    ``c_in x`` (:meth:`net_input`) and ``time_map(t)`` (default :func:`consistency_noise`).

    Args:
        net: ``net(c_in x, c_noise, **cond) -> F``.
        sigma_min, sigma_max: the noise levels ``[e, sigma_max]`` the model was trained on (0.002, 80).
        sigma_data: ``s_d`` (0.5).
        time_map: the net's time at process time ``t`` (default ``consistency_noise(sigma_min, t)``).
        shape: the shape of one sample, if known.
        t_min: the process's smallest sampling time ``t`` (default ``sigma_min``).
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        time_map: Callable[[Tensor], Tensor] | None = None,
        shape: tuple[int, ...] | None = None,
        t_min: float | None = None,
    ) -> None:
        who = "ConsistencyModelDenoiser"
        self.sigma_min, self.sigma_max = ordered(
            who, "sigma_min", sigma_min, "sigma_max", sigma_max, lo=0, lo_open=True
        )
        process = consistency_process(self.sigma_min, self.sigma_max, t_min)
        self.sigma_data = real(who, "sigma_data", sigma_data, lo=0, lo_open=True)
        # a partial, not a lambda: a scheduler holding the denoiser pickles
        default = functools.partial(consistency_noise, self.sigma_min)
        super().__init__(net, process, "x0", default if time_map is None else time_map, shape)

    def noise_level(self, t: float | Tensor) -> float | Tensor:
        """The noise level ``sigma = sqrt(t^2 + sigma_min^2)`` of ``x = x0 + sigma z`` at process time ``t``
        (a float or a tensor, as given)."""
        return (t * t + self.sigma_min**2) ** 0.5

    def net_input(self, x: Tensor, t: float | Tensor) -> Tensor:
        """``c_in x = x / sqrt(sigma^2 + s_d^2)``."""
        sigma = self.noise_level(self.coefficients(t, x)[1])
        return x * (sigma * sigma + self.sigma_data**2) ** -0.5

    def convert(self, f: Tensor, x: Tensor, t: float | Tensor) -> Prediction:
        """``x0 = c_skip x + c_out f``, the consistency function."""
        a, s, _, _ = self.coefficients(t, x)
        sigma, d2 = self.noise_level(s), self.sigma_data**2
        gap = sigma - self.sigma_min
        c_out = gap * self.sigma_data * (sigma * sigma + d2) ** -0.5
        return Prediction(x, a, s, x0=axpby(d2 / (gap * gap + d2), x, c_out, f))

    def __repr__(self) -> str:
        return (
            f"ConsistencyModelDenoiser(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, "
            f"sigma_data={self.sigma_data:g}, process={self.process!r})"
        )


def check_call(who: str, x: object, t: object) -> None:
    """The checks of a call ``den(x, t)``, cheap enough for every network evaluation: ``x`` a tensor, ``t``
    a finite real number (not a ``bool``) or a tensor of times, else a ``ValueError`` naming ``who`` and
    the argument. A tensor ``t`` is checked finite only on the CPU (a read of a GPU tensor would sync)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{who}: x must be a tensor of shape (batch, ...), got {type(x).__name__}")
    if type(t) is float and math.isfinite(t):  # the solvers' times: no abstract-class check (about 1 us)
        return
    if isinstance(t, Tensor):
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{who}: t must be a tensor of real times, got a {t.dtype} tensor")
        if t.is_cpu and not (math.isfinite(t) if t.ndim == 0 else bool(torch.isfinite(t).all())):
            raise ValueError(f"{who}: t must be finite, got {t!r:.80}")
        return
    if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t):
        raise ValueError(
            f"{who}: t must be a finite number or a tensor of times (0-d, or one per row of x), got {t!r:.60}"
        )


def check_denoiser(who: str | None, name: str, value: object) -> Denoiser:
    """``value`` if it is a :class:`Denoiser`, else a ``ValueError`` naming ``name`` (after ``who:`` where
    given): the one check of a denoiser argument where it enters the library."""
    if not isinstance(value, Denoiser):
        prefix = caller(who)
        raise ValueError(f"{prefix}{name} must be a steerdiff Denoiser, got {type(value).__name__}")
    return value


def check_sample_shape(what: str, den: Denoiser, sample_shape: tuple[int, ...]) -> None:
    """A ``ValueError`` where ``den`` declares a sample shape other than ``sample_shape``, naming ``what``
    (the argument after its entry point, ``"sample: x_T"``, ``"dts: shape"``) and the shape ``den`` expects
    (:meth:`Denoiser.describe_shape`)."""
    if den.shape is not None and tuple(sample_shape) != den.shape:
        raise ValueError(
            f"{what} has sample shape {tuple(sample_shape)}, the denoiser expects {den.describe_shape()}"
        )


class MeanRevertingDenoiser(Denoiser):
    """The denoiser of ``y = x - mu`` for a net trained on ``x`` under a
    :class:`~steerdiff.processes.MeanReverting` process: made and documented by
    :meth:`MeanReverting.denoiser <steerdiff.processes.MeanReverting.denoiser>`. The net's ``v`` is
    MRS's velocity, turned into the ``x0`` of ``y`` here."""

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: MeanReverting,
        mu: Tensor,
        prediction: str = "eps",
        shape: tuple[int, ...] | None = None,
    ) -> None:
        who = "MeanReverting.denoiser"
        prediction = choice(who, "prediction", prediction, ("eps", "x0", "v", "score"))
        if not callable(net):
            raise ValueError(
                f"{who}: net must be callable as net(x, t, mu=mu, **cond), got {type(net).__name__}"
            )
        mu = tensor(who, "mu", mu)
        if mu.dtype == torch.bool or mu.is_complex() or not bool(torch.isfinite(mu).all()):
            got = "NaN or inf" if mu.is_floating_point() else f"a {mu.dtype} tensor"
            raise ValueError(f"{who}: mu must be finite real numbers (a tensor or array), got {got}")
        super().__init__(self._y_net, process, "x0" if prediction == "v" else prediction, shape=shape)
        self.x_net, self.mu, self.net_prediction = net, mu, prediction
        self.mean_reverting = process  # self.process, typed as the mean-reverting process
        self._mu_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # mu copied once per device, dtype

    def _y_net(self, y: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self._check_call(y, cond)
        m = kept(self._mu_on, (y.device, y.dtype), lambda: self.mu.to(device=y.device, dtype=y.dtype))
        f = self.x_net(y + m, t, mu=m, **cond)
        if self.net_prediction == "x0":
            return f - m
        if self.net_prediction == "v":  # y_0 = alpha y - (sigma / lambda) v
            p, tt = self.mean_reverting, t.to(torch.float64)
            a, s = (c.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1))) for c in (p.alpha(tt), p.sigma(tt)))
            return a * y - (s / p.stationary_std) * f
        return f

    def _check_call(self, y: Tensor, cond: dict[str, Any]) -> None:
        """A ``ValueError`` naming ``mu`` where it does not broadcast to the samples ``y`` without changing
        their shape (``y + mu`` would fail inside torch or grow the batch) or where the sampler's conditions
        hold a ``mu`` of their own (the net would get it twice)."""
        who, shape = "MeanReverting.denoiser", tuple(self.mu.shape)
        if "mu" in cond:
            raise ValueError(
                f"{who}: the net gets this denoiser's mu; a condition named mu (a keyword of the sampler) "
                "would be a second one: give mu to MeanReverting.denoiser only"
            )
        try:
            fits = torch.broadcast_shapes(shape, y.shape) == y.shape
        except RuntimeError:
            fits = False
        if not fits:
            ys = tuple(y.shape)
            raise ValueError(
                f"{who}: mu has shape {shape}, which does not broadcast to the samples' {ys}: give one mu of "
                f"shape {ys[1:]} for all samples or one per sample, {ys}"
            )

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy with a per-sample ``mu`` (``n`` rows) taken at ``rows``; itself for a shared one."""
        mu, shape = self.mu, self.shape
        per_sample = mu.ndim >= 2 and (shape is None or mu.ndim == len(shape) + 1)
        if not per_sample or len(mu) != n:
            return self
        # a copy, not built again: the rows of a checked mu need no second check (a device read per call)
        out = copy.copy(self)
        out.mu, out._mu_on, out.net = take_tensor_rows(mu, rows), {}, out._y_net  # net: bound to the copy
        return out
