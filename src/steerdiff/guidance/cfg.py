r"""Classifier-free guidance and its refinements, as a denoiser.

:class:`CFG` combines a conditional and an unconditional denoiser (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", Eq. 6) with the guidance scale ``w`` (diffusers'
``guidance_scale``; the paper's ``w`` is ``scale - 1``):

    eps = eps_u + w (eps_c - eps_u),      i.e.   grad log p_t(x|c)^w p_t(x)^{1-w},

the score of the *gamma-powered* density at every noise level (``w = 1``: the conditional
denoiser, ``w = 0``: the unconditional one). Options, each from its paper:

* ``rescale = phi`` -- CFG-rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed", Sec. 3.4, Eq. 15-16): the guided prediction is rescaled to the per-sample
  standard deviation of the conditional one, ``x_r = x_cfg std(x_c) / std(x_cfg)``, and mixed,
  ``phi x_r + (1 - phi) x_cfg``, with population standard deviations over all entries of a
  sample. A sample whose guided ``std(x_cfg)`` is 0 (e.g. one entry per sample) has no spread to
  match and is left unrescaled. It is applied to ``x0`` by default (``rescale_space="x0"``): the
  over-exposure it corrects is in the image the sampler converges to, and the paper's v-prediction
  output is ``-x0`` at the zero-SNR start where guidance acts first; ``"eps"`` and ``"v"`` apply
  it to those outputs (diffusers' ``guidance_rescale`` acts on the raw net output, eps or v).
* ``interval = (lo, hi)`` -- guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying
  Guidance in a Limited Interval Improves Sample and Distribution Quality"): guided where
  the EDM noise level ``sigma / alpha`` lies in ``(lo, hi]``, the conditional prediction elsewhere
  (EDM2-S's best: ``(0.28, 2.9]``).
* ``cads = CADS(...)`` -- condition-annealed sampling (Sadat et al. 2024, "CADS: Unleashing the
  Diversity of Diffusion Models through Condition-Annealed Sampling", the annealing schedule,
  noising and re-standardization of the condition): the conditional
  net sees a noised, re-standardized condition early in sampling.

Its predictor-corrector reading is :func:`steerdiff.guidance.pcg`.

NFE: ``CFG.cost`` is the number of network evaluations of the latest call (the sampler reads it
after every call, so :attr:`SampleInfo.nfe` is exact, and a wrapper around ``CFG`` reads it in
turn): the sum of the costs of the branches it called -- 2 where guidance is applied, 1 outside
the guidance interval or where one estimate suffices (``w = 1``: conditional only; ``w = 0``
without rescale: unconditional only). Before the first call it is what a call inside the interval
costs. Two calls of a batch ``n`` count 2 per sample whether or not a net batches them.

Learned variance: the guided prediction carries the conditional branch's ``var_interp``
(the unconditional one's where only that branch is evaluated), the convention of diffusers' DiT
pipeline, whose kept half of the batch is the conditional one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, held_by, real
from ..denoiser import Denoiser, Prediction, check_denoiser, override_kwargs, take_wrapped_rows
from ..noise import Generators, check_generators, randn, take_generator_rows
from .base import Guided, process_difference, with_estimate

__all__ = ["CADS", "CFG"]

log = logging.getLogger(__name__)

RESCALE_SPACES = ("x0", "eps", "v")


def _per_sample_std(v: Tensor) -> Tensor:
    """Per-sample population standard deviation (``correction=0``, Lin et al.'s ``std`` over all
    entries; 0, not NaN, for one entry) over all but the batch dimension, shaped to broadcast, in
    ``v``'s dtype: ``||v - mean(v)|| / sqrt(n)`` in two passes, at least in float32 (``Tensor.std(dim=1)``
    takes 6-13 times as long on CPU)."""
    flat = v.reshape(v.shape[0], -1).to(torch.promote_types(v.dtype, torch.float32))
    std = torch.linalg.vector_norm(flat - flat.mean(1, keepdim=True), dim=1) / math.sqrt(flat.shape[1])
    return std.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))


def _lerp(u: Tensor, c: Tensor, w: float) -> Tensor:
    """``u + w (c - u)`` in one kernel, in the promoted dtype of ``u`` and ``c``."""
    dtype = torch.promote_types(u.dtype, c.dtype)
    return torch.lerp(u.to(dtype), c.to(dtype), w)


@dataclass
class CADS:
    r"""Condition annealing of the tensor condition ``cond[key]`` (Sadat et al. 2024, CADS: the
    annealing schedule, the noising and the rescaling of the condition).

    With ``u`` the process time normalized to ``[0, 1]`` (``(t - t_min) / (t_max - t_min)``; 1 is
    pure noise) and the piecewise-linear schedule ``gamma(u) = clip((tau2 - u) / (tau2 - tau1), 0, 1)``
    (1 below ``tau1``, 0 above ``tau2``):

        y^   = sqrt(gamma) y + s sqrt(1 - gamma) n,                n ~ N(0, I)       (noising)
        y^_r = (y^ - mean(y^)) / std(y^) * std(y) + mean(y)                        (rescaling)
        y'   = psi y^_r + (1 - psi) y^                                             (mixing)

    with per-sample means and standard deviations over the condition's entries. Fresh noise is
    drawn from ``generator`` at every call where ``gamma < 1``; where ``gamma = 1`` (and for
    ``noise_scale = 0``, which turns the annealing off) ``y`` is passed unchanged. ``cond[key]``
    must be a floating tensor with one row per sample (an embedding, not an integer label).

    ``generator``: one ``torch.Generator`` for the whole batch, or a list with one per row of
    ``cond[key]`` (row ``b``'s ``n`` from ``generator[b]``, so a row does not depend on its batch;
    needed under a sampler's per-row list, which refuses a single one). ``None``: torch's global
    RNG (refused by a seeded sampler).
    """

    key: str
    noise_scale: float
    tau1: float = 0.6
    tau2: float = 0.9
    psi: float = 1.0
    generator: Generators = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ValueError(f"CADS: key must be the name of the net's condition argument, got {self.key!r}")
        self.generator = check_generators("CADS", self.generator)
        self.noise_scale = real("CADS", "noise_scale", self.noise_scale, lo=0)
        self.tau1 = real("CADS", "tau1", self.tau1, lo=0, hi=1)
        self.tau2 = real("CADS", "tau2", self.tau2, lo=0, hi=1)
        if not self.tau1 < self.tau2:
            raise ValueError(f"CADS: need tau1 < tau2, got tau1={self.tau1}, tau2={self.tau2}")
        self.psi = real("CADS", "psi", self.psi, lo=0, hi=1)

    def take_rows(self, rows: Tensor | slice, n: int) -> CADS:
        """This CADS for a call on the rows ``rows`` of a batch of ``n``: a per-row list of ``n`` generators
        taken at ``rows`` (:func:`~steerdiff.noise.take_generator_rows`), in a copy; itself otherwise."""
        g = take_generator_rows(self.generator, rows, n)
        return self if g is self.generator else dataclasses.replace(self, generator=g)

    def gamma(self, u: float | Tensor) -> float | Tensor:
        """The annealing schedule at normalized time ``u`` (a float, or a tensor of them)."""
        g = (self.tau2 - u) / (self.tau2 - self.tau1)
        return g.clamp(0.0, 1.0) if isinstance(g, Tensor) else min(max(g, 0.0), 1.0)

    def anneal(self, y: Tensor, u: float | Tensor) -> Tensor:
        """The annealed condition ``y'`` at normalized time ``u``."""
        if not isinstance(y, Tensor) or not y.is_floating_point() or y.ndim < 1:
            raise ValueError(
                f"CADS: the condition {self.key!r} must be a floating tensor (an embedding), got "
                f"{type(y).__name__ if not isinstance(y, Tensor) else y.dtype}"
            )
        g = self.gamma(u)
        if self.noise_scale == 0 or (not isinstance(g, Tensor) and g == 1.0):
            return y
        a: float | Tensor
        b: float | Tensor
        if isinstance(g, Tensor):
            g = g.to(device=y.device, dtype=y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
            a, b = g.sqrt(), self.noise_scale * (1 - g).sqrt()
        else:
            a, b = math.sqrt(g), self.noise_scale * math.sqrt(1 - g)
        n = randn(y.shape, self.generator, y.dtype, y.device)
        y_hat = a * y + b * n
        if self.psi == 0:
            return y_hat
        if y.ndim < 2 or y[0].numel() < 2:
            raise ValueError(
                f"CADS: rescaling (psi > 0) needs a condition with several entries per sample, got shape "
                f"{tuple(y.shape)}"
            )
        dims = tuple(range(1, y.ndim))
        mean_y, mean_h = y.mean(dims, keepdim=True), y_hat.mean(dims, keepdim=True)
        rescaled = (y_hat - mean_h) / _per_sample_std(y_hat) * _per_sample_std(y) + mean_y
        return self.psi * rescaled + (1 - self.psi) * y_hat


def check_pair(who: str, cond: object, uncond: object, uncond_kwargs: object) -> dict[str, Any]:
    """A copy of ``uncond_kwargs`` (``{}`` for None) once ``cond`` and ``uncond`` are denoisers of one
    process and ``uncond_kwargs`` is a dict or None, else a ``ValueError`` naming ``who``: :class:`CFG`, or
    :func:`~steerdiff.guidance.pcg`, whose arguments these are when it builds its CFG."""
    c, u = check_denoiser(who, "cond", cond), check_denoiser(who, "uncond", uncond)
    off = process_difference(c, u)
    if off is not None:
        raise ValueError(
            f"{who}: cond and uncond must share a process, got {c.process} and {u.process}: {off}"
        )
    if uncond_kwargs is not None and not isinstance(uncond_kwargs, dict):
        raise ValueError(f"{who}: uncond_kwargs must be a dict, got {type(uncond_kwargs).__name__}")
    return dict(uncond_kwargs or {})


def same_branch(who: str, cond: object, uncond: object, uncond_kwargs: dict[str, Any]) -> str | None:
    """The warning for a guidance whose two branches are one call (``uncond`` is ``cond`` and no
    ``uncond_kwargs`` override the condition): the guided prediction is the conditional one at twice the
    NFE; ``None`` where the branches differ."""
    if uncond is not cond or uncond_kwargs:
        return None
    return (
        f"{who}: uncond is cond and no uncond_kwargs tell the unconditional call apart: both branches "
        "evaluate the conditional prediction, which the guidance returns at twice the NFE. Give the "
        'unconditional branch: uncond_kwargs={"label": null} (the net\'s keyword and its null condition, '
        "as a net trained with condition dropout takes it), or another denoiser as uncond"
    )


class CFG(Guided):
    """Classifier-free guidance ``eps_u + scale (eps_c - eps_u)`` (Ho & Salimans 2022, Eq. 6).

    Args:
        cond: the conditional denoiser, called with the sampler's ``**cond`` keyword arguments.
        uncond: the unconditional denoiser (same process); may be ``cond`` itself.
        scale: ``w >= 0``: 1 is the conditional denoiser, 0 the unconditional one, > 1 guidance.
        uncond_kwargs: keyword arguments that override ``**cond`` for the unconditional call: one
            net with a null label is ``CFG(den, den, 5.0, uncond_kwargs={"y": null})``, sampled as
            ``sd.sample(guided, x_T, y=labels)``. A value may be one for all samples (a number, a 0-d
            tensor, a tensor the net broadcasts) or one per sample: a tensor whose first dimension is
            the batch size the sampler is called with (``x_T.shape[0]``; ``shape[0]`` for the particle
            methods of :mod:`steerdiff.smc`, which call the net on ``batch x particles`` rows and give
            every particle of batch row ``b`` row ``b``'s entry), the rule the sampler's ``**cond``
            follows there. A tensor that overrides a per-sample condition of ``**cond`` (a tensor of
            the same number of dimensions with one row per sample) must have one row per sample too,
            or one row (or none: 0-d) for all; any other number of rows is a ``ValueError``.
        rescale: ``phi`` in ``[0, 1]`` of CFG-rescale (Lin et al. 2024, Eq. 15-16; diffusers'
            ``guidance_rescale``); 0 is off.
        rescale_space: ``"x0"`` (default), ``"eps"`` or ``"v"``: where the standard deviations are
            matched (see the module docstring).
        interval: ``(lo, hi)``: guidance only where ``lo < sigma/alpha <= hi`` (Kynkäänniemi et al.
            2024); the conditional prediction elsewhere. ``None``: everywhere. The prediction jumps at the
            ends, yet CFG declares no break (:meth:`~steerdiff.Denoiser.breaks`): restarting a multistep
            solver's history there would cost the guided default (DPM-Solver++(2M) / UniPC-2) 1.7x in
            geometric mean over 24 cases, whose one-step history averages the two fields across the step
            over an end, though UniPC-3 would gain (0.74x) (``python bench/breaks.py``).
        cads: a :class:`CADS` annealing the conditional call's ``cond[cads.key]``.

    ``CFG(den, den, w)`` without ``uncond_kwargs`` or ``cads`` evaluates one call twice: the conditional
    prediction at twice the NFE; it logs a warning (module :mod:`logging`, once, when made) where a call
    evaluates both branches (``w`` not 1, nor 0 without rescale).

    ``cost`` is the sum of the called branches' costs: 2, or 1 for a call that evaluates one net
    only (see the module docstring). A half-precision run (:meth:`evaluate`) runs only the branches'
    nets in half precision; the combination and the rescale are in the solver state's dtype.
    """

    base_arg = "cond"

    def __init__(
        self,
        cond: Denoiser,
        uncond: Denoiser,
        scale: float,
        *,
        uncond_kwargs: dict[str, Any] | None = None,
        rescale: float = 0.0,
        rescale_space: str = "x0",
        interval: tuple[float, float] | None = None,
        cads: CADS | None = None,
    ) -> None:
        super().__init__(cond)
        self.uncond_kwargs = check_pair("CFG", cond, uncond, uncond_kwargs)
        self.uncond = uncond
        self.scale = real("CFG", "scale", scale, lo=0)
        self.rescale = real("CFG", "rescale", rescale, lo=0, hi=1)
        self.rescale_space = choice("CFG", "rescale_space", rescale_space, RESCALE_SPACES)
        if interval is not None:
            if not isinstance(interval, Sequence) or len(interval) != 2:
                raise ValueError(f"CFG: interval must be a pair (lo, hi) of noise levels, got {interval!r}")
            lo = real("CFG", "interval[0] (lo)", interval[0], lo=0)
            hi = real("CFG", "interval[1] (hi)", interval[1], lo=0, finite=False)
            if not lo < hi:
                raise ValueError(f"CFG: interval needs lo < hi, got {interval!r}")
            interval = (lo, hi)
        self.interval = interval
        if cads is not None and not isinstance(cads, CADS):
            raise ValueError(f"CFG: cads must be a steerdiff.guidance.CADS, got {type(cads).__name__}")
        self.cads = cads
        if self.scale == 1:
            self.cost = cond.cost
        elif self.scale == 0 and self.rescale == 0:
            self.cost = uncond.cost
        else:
            self.cost = cond.cost + uncond.cost
            if cads is None and (message := same_branch("CFG", cond, uncond, self.uncond_kwargs)):
                log.warning(message)

    def _inside(self, t: float | Tensor, x: Tensor) -> bool | Tensor:
        """Whether ``t`` is in the guidance interval: a bool, or per sample for a tensor ``t``."""
        if self.interval is None:
            return True
        lo, hi = self.interval
        a, s = self.coefficients(t, x)[:2]
        if isinstance(a, Tensor):
            r = torch.where(a > 0, s / a.clamp_min(torch.finfo(a.dtype).tiny), math.inf).reshape(-1)
            inside = (r > lo) & (r <= hi)
            n = int(inside.sum())  # one host read: all, none or some samples guided
            return True if n == inside.numel() else (False if n == 0 else inside)
        ratio = s / a if a > 0 else math.inf
        return lo < ratio <= hi

    def _cond_kwargs(self, t: float | Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        if self.cads is None:
            return cond
        key = self.cads.key
        if key not in cond:
            raise ValueError(f"CADS: the sampler passed no condition {key!r}; got {sorted(cond)}")
        p = self.process
        u = (t.to(torch.float64) if isinstance(t, Tensor) else float(t)) - p.t_min
        return {**cond, key: self.cads.anneal(cond[key], u / (p.t_max - p.t_min))}

    def _space(self, p: Prediction) -> Tensor:
        if self.rescale_space == "x0":
            return p.x0
        if self.rescale_space == "eps":
            return p.eps
        return p.alpha * p.eps - p.sigma * p.x0

    def _from_space(self, p: Prediction, v: Tensor) -> Prediction:
        if self.rescale_space == "x0":
            return with_estimate(p, x0=v)
        if self.rescale_space == "eps":
            return with_estimate(p, eps=v)
        a, s = p.alpha, p.sigma  # x = a x0 + s eps, v = a eps - s x0  =>  x0 = (a x - s v) / (a^2 + s^2)
        return with_estimate(p, x0=(a * p.x - s * v) / (a * a + s * s))

    def guide(self, pc: Prediction, pu: Prediction) -> Prediction:
        """The guided prediction from the conditional ``pc`` and unconditional ``pu`` ones at the same
        ``(x, t)``: the CFG combination (in ``x0`` when the conditional net gives ``x0``, else in
        ``eps``; the same by linearity), then CFG-rescale if ``rescale > 0``. A scale beyond the largest
        number of their dtype (1e39 on float32) is a ``ValueError``."""
        w = held_by("CFG", "scale", self.scale, torch.promote_types(pc.x.dtype, pu.x.dtype))
        if pc._x0 is not None:
            out = with_estimate(pc, x0=_lerp(pu.x0, pc.x0, w))
        else:
            out = with_estimate(pc, eps=_lerp(pu.eps, pc.eps, w))
        if self.rescale == 0:
            return out
        ref, guided = self._space(pc), self._space(out)
        sd_ref, sd_guided = _per_sample_std(ref), _per_sample_std(guided)
        ratio = sd_ref / torch.where(sd_guided > 0, sd_guided, 1.0)  # no spread: left unrescaled
        factor = torch.where(sd_guided > 0, self.rescale * ratio + (1 - self.rescale), 1.0)
        return self._from_space(out, guided * factor)

    @property
    def guidance_scale(self) -> float:
        """``scale``: what :func:`steerdiff.sampling.guided_max_h` reads."""
        return self.scale

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The branches' nets in ``net_dtype`` (:meth:`~steerdiff.denoiser.Denoiser.evaluate`), the
        combination and the rescale in ``x``'s dtype."""
        inside = self._inside(t, x)
        if inside is False or self.scale == 1:  # the conditional prediction (rescale is then the identity)
            pred = self.base.evaluate(x, t, net_dtype, **self._cond_kwargs(t, cond))
            self.cost = self.base.cost
            return pred
        ukw = override_kwargs("CFG", "uncond_kwargs", cond, self.uncond_kwargs, x.shape[0])
        if inside is True and self.scale == 0 and self.rescale == 0:  # the unconditional prediction
            pred = self.uncond.evaluate(x, t, net_dtype, **ukw)
            self.cost = self.uncond.cost
            return pred
        pc = self.base.evaluate(x, t, net_dtype, **self._cond_kwargs(t, cond))
        x0_held = pc.x0_given  # read before guide (CFG-rescale in x0 derives an eps net's x0)
        cost = self.base.cost  # read now: cond and uncond may be one wrapper whose cost varies
        out = self.guide(pc, self.uncond.evaluate(x, t, net_dtype, **ukw))
        self.cost = cost + self.uncond.cost
        if isinstance(inside, Tensor):  # per-sample times, some outside the interval
            m = inside.reshape(-1, *([1] * (x.ndim - 1)))
            if x0_held:  # the estimate pc holds: rows outside are pc's, not taken through x and back
                return with_estimate(pc, x0=torch.where(m, out.x0, pc.x0))
            return with_estimate(pc, eps=torch.where(m, out.eps, pc.eps))
        return out

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """The two branches, ``(cond, uncond)``."""
        return (self.base, self.uncond)

    def own_noise(self) -> list[tuple[str, Generators]]:
        """The branches' and ``CADS``'s."""
        own = [("CADS", self.cads.generator)] if self.cads is not None else []
        return [*super().own_noise(), *own]

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy with the tensors of ``n`` rows in ``uncond_kwargs`` taken at ``rows``, around the
        branches' ``take_rows``; itself where nothing changes."""
        return take_wrapped_rows(self, rows, n, ("base", "uncond", "cads"), ("uncond_kwargs",))

    def __repr__(self) -> str:
        return f"CFG({self.base!r}, scale={self.scale})"
