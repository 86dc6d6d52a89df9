r"""Characteristic guidance: classifier-free guidance with the branches moved along characteristics.

Zheng & Lan 2024, "Characteristic Guidance: Non-linear Correction for Diffusion Model at Large Guidance
Scale" (ICML 2024). CFG's ``eps_u + w (eps_c - eps_u)`` is the score of ``p_t(x|c)^w p_t(x)^{1-w}``,
which for ``w != 0, 1`` is not the noised ``p(x|c)^w p(x)^{1-w}``: the log-density of a diffused law
obeys a non-linear (viscous Hamilton-Jacobi, from the Fokker-Planck) equation, and a power of two of its
solutions is not a solution. Characteristic guidance evaluates the branches at shifted points instead
(``w`` is the CFG scale, the paper's ``1 + w``):

    z_c = x + (w - 1) dx,     z_u = x + w dx,
    x0' = w x0_c(z_c) - (w - 1) x0_u(z_u),     eps' = w eps_c(z_c) - (w - 1) eps_u(z_u),

(``x = alpha x0' + sigma eps'`` holds for every ``dx``, since ``w z_c - (w - 1) z_u = x``) with the
shift ``dx`` solving the fixed-point equation (the paper's, with its projection ``P`` the identity)

    dx = F(dx) = sigma (eps_u(z_u) - eps_c(z_c)),

equivalently ``x0_u(z_u) = x0_c(z_c)``: the two branches' characteristics -- the straight lines of the
inviscid equation from ``z`` to its denoised estimate -- end at one data point, which the guided estimate
then is. Where the viscous term acts linearly (the paper's harmonic ansatz) this is the exact score of the
noised ``p(x|c)^w p(x)^{1-w}``. For Gaussian data laws it holds exactly: in ``y = x / alpha`` at noise
``v = sigma^2 / alpha^2`` a Gaussian ``N(mu, S)`` has the score ``-(S + v)^{-1} (y - mu)``, which is the data
score ``-S^{-1} (y0 - mu)`` at the end ``y0 = y + v s(y)`` of its characteristic (``E[x0 | x]``), so the
construction gives, to the tolerance of the solve, the exact noised target whenever its precision
``w S_c^{-1} - (w - 1) S_u^{-1}`` is positive definite (tested against the closed form,
``tests/test_characteristic_guidance.py``). Where the covariances are equal it returns CFG's
estimate (CFG is exact there) with ``dx = sigma^2/alpha S^{-1} (mu_c - mu_u)`` (not 0: both branches move
by the same amount, which leaves their difference unchanged).

Solve. In data units ``d = dx / alpha`` the residual is ``r(d) = x0_u(z_u) - x0_c(z_c)`` (``d - F/alpha``),
the disagreement of the two denoised estimates. Starting from ``d = 0`` (CFG's points; see the warm start
below), each iteration
evaluates both branches at the current shift (2 net calls), stops a sample once the root mean square of
its residual over its entries is at most ``tol`` (or ``8 eps(net dtype) sigma / alpha``, the resolution of
the nets' estimates, where that is coarser: half precision at high noise), and otherwise takes the damped
Anderson step (type II, Walker & Ni 2011, as the authors' reference implementation accelerates it), per
sample, with the last ``memory`` differences ``DD`` of shifts and ``DR`` of residuals:

    gamma = argmin ||r_k - DR gamma||^2   (columns normalized, ridge sqrt(eps) of the dtype),
    d_{k+1} = d_k - DD gamma - step (r_k - DR gamma),

which with ``memory = 0`` is the damped fixed-point iteration ``d_{k+1} = d_k - step r_k``. Defaults: the
authors' reference implementation's (``max_iter = 30``, ``tol = 1e-4`` on the same residual in its
``x / alpha`` variables, ``step = 1``, ``memory = 2``).

Memory: at high noise the fixed-point map's Jacobian is the identity up to ``O(alpha^2 / sigma^2)`` in
every direction, so the iteration advances only along the directions its history spans, and ``memory``
must cover the slow ones. Measured (``test_memory_must_span_the_slow_directions_at_extreme_noise`` and ad
hoc runs; ``w = 2``): 8-d Gaussians at rectified flow's ``t_max`` (``sigma / alpha = 999``): 31 of 32
samples fall back to CFG (1.6 off the target's ``x0``), ``memory = 9`` converges in 18 iterations (1.5e-10
off); at ``t <= 0.8`` there, and at every time under DDPM / SD betas and EDM, the default converges (1e-5 to
1e-4 off; CFG 0.2-2.4). A 3-component 4-d mixture (DDPM betas, 64 samples near one component against the
whole mixture): all 64 fall back at ``t = 999`` and ``750`` with ``memory = 2``, 8 and 0 with ``memory = 5``.
The authors keep images within a small memory by their projection onto a few basis directions (below);
here, raise ``memory`` (it holds ``2 memory`` copies of ``x``).

A sample that has not met ``tol`` after ``max_iter`` iterations, or whose residual stopped being finite,
gets CFG's estimate (as the reference implementation falls back), and the call logs a warning on this
module's logger; :attr:`CharacteristicGuidance.unconverged` counts those samples of the latest call. The
reference implementation's regularization and projection onto a few basis directions (for latent image
models that do not converge otherwise) are not provided.

Beyond Gaussian laws the fixed point need not be unique. By default every call starts from ``d = 0``
(CFG's points) and returns the root its Anderson iteration reaches from there (the basin of ``d = 0``; no
root is preferred otherwise), so the guided field is a function of ``(x, t)`` alone, piecewise smooth, with
jumps between neighbouring points; the paper states the fixed point, not which root.

Warm start (``warm_start = c > 0``; the authors' reference implementation, ``CharacteristicGuidanceWebUI``,
``scripts/CharaIte.py``, ``chara_ite_inner_loop``, with ``c`` its ``chara_decay``, 1 by default there): a
call's iteration starts, per sample, from the converged shift ``d'`` of an earlier call at the noise level
``v' = sigma'^2 / alpha'^2``, rescaled to this one's ``v`` (the authors' factor
``(abar' - abar abar') / (abar - abar abar') = v / v'``),

    d_0 = c (v / v') d',      d' = 0 for a sample that did not converge there,

and from ``d_0 = 0`` where no earlier call qualifies. The authors keep one buffer per generation (reset when
it starts). Here the instance remembers its latest 4 calls (3 copies of ``x`` each), and a sample starts
from the most recent that had the same batch (shape, dtype, device), was at a higher noise level for it
(``v' > v``: a staged solver's second call at one time starts from the call before both), and left the
sample where this call finds it:
``y = x / alpha`` within ``2 sqrt(v' - v)`` (root mean square) of that call's probability-flow (DDIM) step
``x0' + sqrt(v / v') (y' - x0')`` (a step's fresh noise is at most ``sqrt(v' - v)`` in these units). A call at
or above every remembered noise level -- a run's first -- forgets them, so a run does not depend on the one
before (``sd.sample`` twice gives the same samples, bit for bit); :meth:`take_rows` gives a copy with no
memory (a particle method's slices each keep their own; :func:`~steerdiff.paradigms` and per-row
adaptive calls, which take rows at every call, start cold). The check cannot tell a resampled or permuted
batch from the same one where the step is long against the noise level (``2 sqrt(v' - v)`` is then
about the samples' spread): such a sample starts from another's shift, and converges, to the same root or
another. A warm-started sample that does not converge gets CFG's estimate at one more evaluation of both
branches at ``x``.

Measured (``python bench/characteristic_warm.py``: UniPC 10 / 20 / 100 steps, SD's betas, ``w = 2 / 4 / 8``,
256 samples; NFE cold -> warm): the 2-d Gaussians of the tests 82-84 -> 82-84, 156-160 -> 148-150, 792-796
-> 682-714 (Anderson's memory 2 spans the plane: it solves the linear problem in about 4 iterations from
anywhere), endpoint errors against the exact flow equal at 10 and 20 steps, 4e-6 - 2e-5 -> 9e-6 - 5e-5 at
100 (each solve stops nearer ``tol``); 8-d Gaussians 146-194 -> 104-150, 280-362 -> 180-236, 1408-1804 ->
682-928, endpoint errors equal but at 100 steps (1e-5 - 4e-5 -> 1.5e-5 - 5e-5). On an 8-d mixture
(``memory = 9``) 344-420 -> 276-316, 596-790 -> 466-504, 2962-3158 -> 1560-2140, with fewer samples
falling back to CFG; where both solves converge at a call the warm one is at the cold one's root in all but
16 of 2487 calls x samples (``w = 8``, 10 steps; 1 of 5020 at 20 steps, none at ``w = 2, 4`` or 100
steps); the endpoints of up to 13 of 256 samples end more than 0.1 apart (calls where one of the solves
falls back to CFG, and the other roots). It changes the cost, and for some samples the root; not the
default.

The jumps, measured (a 3-component 2-d mixture under SD's betas against another as the
unconditional law, ``w = 2``, ``t = 500``): along a line of points 0.011 apart, two neighbours converge (to
``tol``) to shifts ``(-2.70, -0.13)`` and ``(3.56, -0.64)`` and guided ``x0`` 4.8 apart (CFG's largest jump
there 0.028). ODE solvers, :func:`~steerdiff.invert` and :func:`~steerdiff.paradigms` assume a smooth field:
on that mixture at ``w = 1.5`` DDIM's samples at 50 / 100 / 200 / 400 steps differ from those at half
the steps by 0.46 / 0.12 / 0.24 / 0.16 (no convergence), and ``sample(invert(x_0))`` at 50 steps misses
``x_0`` by 1.0-2.2 with ``ddim``, ``dpmpp_2m`` and the default solvers (CFG: 1e-3-0.22).

NFE: ``cost`` is the exact number of network evaluations of the latest call, the sum of the branches'
costs over its iterations (``2 k`` for ``k`` iterations of two plain nets, ``k`` between 1 and
``max_iter``; the output is the converged iteration's own evaluation, no extra call, but for a warm start's
fallback to CFG, 2 more), so :attr:`~steerdiff.sampling.SampleInfo.nfe` is exact. ``scale = 1`` is the
conditional denoiser and ``scale = 0`` the unconditional one, one branch, no iteration. A learned variance
is the conditional branch's at its first evaluation (at ``x``; under a warm start at ``x + (w - 1) dx_0``).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import held_by, integer, real
from ..denoiser import Denoiser, Prediction, override_kwargs, take_wrapped_rows
from .base import Guided, with_estimate
from .cfg import check_pair, same_branch

__all__ = ["CharacteristicGuidance"]

log = logging.getLogger(__name__)


def _rms(v: Tensor) -> Tensor:
    """Per-sample root mean square over all entries, ``(n,)``."""
    return v.reshape(v.shape[0], -1).square().mean(1).sqrt()


class _Anderson:
    """Damped Anderson mixing (type II, Walker & Ni 2011) of the per-sample iteration ``d <- d - step r(d)``,
    with the last ``memory`` differences; iterates and residuals flattened to ``(n, D)``."""

    def __init__(self, memory: int, step: float) -> None:
        self.memory, self.step = memory, step
        self.dd: list[Tensor] = []
        self.dr: list[Tensor] = []
        self.prev: tuple[Tensor, Tensor] | None = None

    def next(self, d: Tensor, r: Tensor) -> Tensor:
        """The next iterate from the current one ``d`` and its residual ``r``."""
        if self.prev is not None and self.memory > 0:
            self.dd.append(d - self.prev[0])
            self.dr.append(r - self.prev[1])
            del self.dd[: -self.memory], self.dr[: -self.memory]
        self.prev = (d, r)
        if not self.dr:
            return d - self.step * r
        dr, dd = torch.stack(self.dr, -1), torch.stack(self.dd, -1)  # (n, D, m)
        norms = torch.linalg.vector_norm(dr, dim=1, keepdim=True).clamp_min(torch.finfo(dr.dtype).tiny)
        q = dr / norms
        gram = (q.mT @ q).double()
        ridge = torch.finfo(r.dtype).eps ** 0.5
        gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        coef = torch.linalg.solve(gram, (q.mT @ r[..., None]).double()).to(r.dtype) / norms.mT
        return d - (dd @ coef)[..., 0] - self.step * (r - (dr @ coef)[..., 0])


# the calls a warm start may start from: a staged solver's stages, or max_batch slices of one object
_MEMO = 4


@dataclass(frozen=True)
class _Memo:
    """What a call leaves for a warm start (detached), per sample: its noise level ``v = sigma^2 / alpha^2``
    ``(n,)``, its point ``y = x / alpha`` and guided ``x0``, and its converged shift ``d = dx / alpha`` (zero
    where it did not converge)."""

    v: Tensor
    y: Tensor
    x0: Tensor
    d: Tensor


class CharacteristicGuidance(Guided):
    """Characteristic guidance (Zheng & Lan 2024): CFG with the branches evaluated at the shifted points
    ``x + (w - 1) dx`` and ``x + w dx`` of a per-step fixed point (see the module docstring).

    Args:
        cond: the conditional denoiser, called with the sampler's ``**cond`` keyword arguments.
        uncond: the unconditional denoiser (same process); may be ``cond`` itself.
        scale: ``w >= 0``, as :class:`~steerdiff.guidance.CFG`'s: 1 is the conditional denoiser, 0 the
            unconditional one.
        uncond_kwargs: keyword arguments that override ``**cond`` for the unconditional call, as
            :class:`~steerdiff.guidance.CFG`'s.
        max_iter: iterations (evaluations of both branches) per call at most, ``>= 1``; 1 is CFG (no warning).
        tol: a sample stops once the root mean square of ``x0_u(z_u) - x0_c(z_c)`` is at most ``tol``
            (data units), ``> 0``, or at most the resolution of the nets' estimates where that is coarser,
            ``8 eps(net dtype) sigma / alpha`` (half precision at high noise: a residual the nets cannot
            resolve would spend ``max_iter`` iterations and fall back to CFG).
        step: the damping (mixing) ``step`` of the Anderson update, in ``(0, 1]``.
        memory: the Anderson history length ``m >= 0``; 0 is the damped fixed-point iteration.
        warm_start: ``c`` in ``[0, 1]``: 0 starts every call from ``d = 0``; otherwise a sample starts from
            ``c (v / v')`` times its converged shift at one of the latest calls where it qualifies (the
            authors' ``chara_decay``; see the module docstring). Refused with ``max_iter = 1`` (CFG).

    After a call: ``cost`` (its network evaluations), ``iterations`` (the iterations it ran),
    ``unconverged`` (its samples that got CFG's estimate, also logged as a warning), ``residual`` (per
    sample, the root mean square residual of the estimate returned; CFG's for an unconverged sample),
    ``shift`` (the ``dx`` used per sample, zeros for an unconverged one) and ``warmed`` (its samples that
    started warm).
    """

    base_arg = "cond"

    def __init__(
        self,
        cond: Denoiser,
        uncond: Denoiser,
        scale: float,
        *,
        uncond_kwargs: dict[str, Any] | None = None,
        max_iter: int = 30,
        tol: float = 1e-4,
        step: float = 1.0,
        memory: int = 2,
        warm_start: float = 0.0,
    ) -> None:
        who = "CharacteristicGuidance"
        super().__init__(cond)
        self.uncond_kwargs = check_pair(who, cond, uncond, uncond_kwargs)
        self.uncond = uncond
        self.scale = real(who, "scale", scale, lo=0)
        self.max_iter = integer(who, "max_iter", max_iter, lo=1)
        self.tol = real(who, "tol", tol, lo=0, lo_open=True)
        self.step = real(who, "step", step, lo=0, hi=1, lo_open=True)
        self.memory = integer(who, "memory", memory, lo=0)
        self.warm_start = real(who, "warm_start", warm_start, lo=0, hi=1)
        if self.warm_start > 0 and self.max_iter == 1:
            raise ValueError(
                f"{who}: warm_start={self.warm_start:g} needs an iteration to start (max_iter >= 2); "
                "max_iter=1 is CFG, which solves nothing: use warm_start=0 with it"
            )
        self._memo: list[_Memo] = []  # the latest calls, most recent last (warm_start > 0)
        self.warmed = 0
        self.cost = (
            cond.cost if self.scale == 1 else uncond.cost if self.scale == 0 else cond.cost + uncond.cost
        )
        if self.scale not in (0.0, 1.0) and (message := same_branch(who, cond, uncond, self.uncond_kwargs)):
            log.warning(message)
        self.iterations = 0
        self.unconverged = 0
        self.residual: Tensor | None = None
        self.shift: Tensor | None = None

    @property
    def guidance_scale(self) -> float:
        """``scale``: what :func:`steerdiff.sampling.guided_max_h` reads."""
        return self.scale

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The guided prediction at ``x``: the branches' nets in ``net_dtype``, the solve and the combination
        in ``x``'s dtype."""
        if self.scale in (0.0, 1.0):  # one branch at x itself: no shift to solve for
            one, kw = (self.base, cond) if self.scale == 1 else (self.uncond, self._ukw(cond, x))
            pred = one.evaluate(x, t, net_dtype, **kw)
            self.cost, self.iterations, self.unconverged, self.warmed = one.cost, 0, 0, 0
            self.residual, self.shift = None, torch.zeros_like(x)
            return pred
        w = held_by("CharacteristicGuidance", "scale", self.scale, x.dtype)
        ukw = self._ukw(cond, x)
        alpha, sigma = self.coefficients(t, x)[:2]
        n, rows = x.shape[0], (-1, *([1] * (x.ndim - 1)))
        tol = self._tol(sigma / alpha, net_dtype, n)
        cost = 0

        def branches(dx: Tensor) -> tuple[Prediction, Prediction]:
            nonlocal cost
            pc = self.base.evaluate(torch.add(x, dx, alpha=w - 1), t, net_dtype, **cond)
            cost += self.base.cost
            pu = self.uncond.evaluate(torch.add(x, dx, alpha=w), t, net_dtype, **ukw)
            cost += self.uncond.cost
            return pc, pu

        d, warm, v = self._start(x, alpha, sigma)  # the shift in data units, dx / alpha
        shift = torch.zeros_like(x)
        pc, pu = branches(d * alpha)  # without a warm start CFG's points: its estimate is the fallback
        ref, x0_held = pc, pc.x0_given
        est, res = self._combine(pc, pu, w, x0_held), _rms(pu.x0 - pc.x0)
        least = res  # the smallest residual reached per sample, for the warning
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        converged = torch.zeros_like(done)
        solver = _Anderson(self.memory, self.step)
        for k in range(self.max_iter):
            if k > 0:
                pc, pu = branches(d * alpha)
            r = pu.x0 - pc.x0
            rms = _rms(r)
            least = torch.fmin(least, rms)
            ok = (rms <= tol) & ~done
            if bool(ok.any()):
                m = ok.reshape(rows)
                est = torch.where(m, self._combine(pc, pu, w, x0_held), est)
                res, shift = torch.where(ok, rms, res), torch.where(m, d * alpha, shift)
                converged = converged | ok
            # out of place, as every update here: DPS and TDS differentiate through the iteration
            done = done | ok | ~torch.isfinite(rms)  # a non-finite residual: given up, CFG's estimate kept
            if bool(done.all()) or k == self.max_iter - 1:
                break
            r = torch.where(done.reshape(rows), 0.0, r)  # finished rows: held, and kept finite
            step = solver.next(d.reshape(n, -1), r.reshape(n, -1)).reshape(x.shape)
            d = torch.where(done.reshape(rows), d, step)
        self.iterations = k + 1
        if warm is not None and bool((warm & ~converged).any()):  # warm-started, given up: CFG's estimate
            pc, pu = branches(torch.zeros_like(x))
            m = (warm & ~converged).reshape(rows)
            est = torch.where(m, self._combine(pc, pu, w, x0_held), est)
            res = torch.where(warm & ~converged, _rms(pu.x0 - pc.x0), res)
        self.cost = cost
        self.unconverged = int((~converged).sum())
        self.residual, self.shift = res, shift
        if self.unconverged and self.max_iter > 1:  # max_iter = 1 is CFG by request: nothing to warn of
            log.warning(
                "CharacteristicGuidance: %d of %d samples did not converge in %d iterations at t=%s (the "
                "worst reached a residual of %.3g, tol %.3g); they get CFG's estimate",
                self.unconverged,
                n,
                self.iterations,
                t if not isinstance(t, Tensor) else t.tolist(),
                float(least[~converged].detach().nan_to_num(math.inf).max()),
                self.tol,
            )
        out = with_estimate(ref, x0=est, x=x) if x0_held else with_estimate(ref, eps=est, x=x)
        if v is not None:
            memo = _Memo(v, (x / alpha).detach(), out.x0.detach(), (shift / alpha).detach())
            self._memo = [*self._memo[1 - _MEMO :], memo]
        return out

    def _start(
        self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The first iterate ``d`` of a call at ``x``, which samples start warm (``None``: none) and the
        samples' noise levels ``v = sigma^2 / alpha^2`` ``(n,)`` (``None`` without a warm start). A sample
        starts from the converged shift ``d'`` of one of the latest calls (the most recent that qualifies),
        ``warm_start * (v / v') d'``, where that call had the same batch (shape, dtype, device), was at a
        higher noise level ``v' > v`` for that sample, and left it where this one is: ``x / alpha`` within
        ``2 sqrt(v' - v)`` (root mean square) of its probability-flow (DDIM) step to ``v``,
        ``x0' + sqrt(v / v') (y' - x0')`` (a step's fresh noise is at most ``sqrt(v' - v)`` in these units);
        otherwise from 0. A call at a noise level at or above every remembered one's (a run's first) forgets
        them."""
        d, self.warmed, n = torch.zeros_like(x), 0, x.shape[0]
        if self.warm_start == 0 or self.max_iter == 1:
            return d, None, None
        if isinstance(sigma, Tensor):  # per-sample times
            v = (sigma / alpha).square().reshape(-1).to(x.dtype).expand(n)
        else:  # a fill on the device: no host-to-device copy
            v = torch.full((n,), (sigma / float(alpha)) ** 2, dtype=x.dtype, device=x.device)
        same = [
            m for m in self._memo if m.y.shape == x.shape and m.y.dtype == x.dtype and m.y.device == x.device
        ]
        if not same or bool((v >= torch.stack([m.v for m in same]).amax(0)).all()):
            self._memo = []
            return d, None, v
        rows = (-1, *([1] * (x.ndim - 1)))
        y = (x / alpha).detach()
        warm = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for m in reversed(same):
            ratio = v / m.v
            step = m.x0 + ratio.sqrt().reshape(rows) * (m.y - m.x0)
            ok = (v < m.v) & ~warm & (_rms(y - step) <= 2 * (m.v - v).clamp_min(0).sqrt())
            d = torch.where(ok.reshape(rows), (self.warm_start * ratio).reshape(rows) * m.d, d)
            warm = warm | ok
        self.warmed = int(warm.sum())
        return d, warm if self.warmed else None, v

    def _tol(self, ratio: float | Tensor, net_dtype: torch.dtype, n: int) -> float | Tensor:
        """The stopping tolerance: ``tol``, or the resolution of the nets' estimates where that is coarser,
        ``8 eps(net_dtype) sigma / alpha`` (an ``eps`` rounded to the net's precision moves ``x0`` by
        ``sigma / alpha`` times it: float16 at high noise, or float32 at rectified flow's ``t_max``); a
        float, or ``(n,)`` for per-sample times."""
        floor = 8 * torch.finfo(net_dtype).eps * ratio
        if isinstance(floor, Tensor):
            return floor.reshape(-1).expand(n).clamp_min(self.tol)
        return max(self.tol, floor)

    def _ukw(self, cond: dict[str, Any], x: Tensor) -> dict[str, Any]:
        return override_kwargs(
            "CharacteristicGuidance", "uncond_kwargs", cond, self.uncond_kwargs, x.shape[0]
        )

    @staticmethod
    def _combine(pc: Prediction, pu: Prediction, w: float, x0_held: bool) -> Tensor:
        """``w c - (w - 1) u`` of the held estimate (``x0`` for an ``x0``-holding conditional branch, else
        ``eps``)."""
        if x0_held:
            return torch.lerp(pu.x0, pc.x0, w)
        return torch.lerp(pu.eps, pc.eps, w)

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """The two branches, ``(cond, uncond)``."""
        return (self.base, self.uncond)

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy with the tensors of ``n`` rows in ``uncond_kwargs`` taken at ``rows``, around the
        branches' ``take_rows``; itself where nothing changes, unless it warm-starts: then always a copy,
        with no memory of the calls before (its rows' first call starts cold)."""
        out = take_wrapped_rows(self, rows, n, ("base", "uncond"), ("uncond_kwargs",))
        if self.warm_start > 0 and self.max_iter > 1:
            out = copy.copy(out) if out is self else out
            out._memo = []
        return out

    def __repr__(self) -> str:
        return f"CharacteristicGuidance({self.base!r}, scale={self.scale})"
