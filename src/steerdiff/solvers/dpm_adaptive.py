r"""Adaptive step-size DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps", Sec. 3.3, App. C, Alg. 4-5): samples to a tolerance
rather than a step count.

A step of length ``h`` in the half log-SNR ``lam`` from level ``s`` to ``t`` (``lam_t = lam_s + h``) takes
an embedded pair of singlestep DPM-Solvers that share their evaluations (the updates of
:mod:`steerdiff.solvers.dpm_solver`, their intermediate points at fractions ``r_a`` of ``h``):

    DPM-Solver-12 (order=2): x_low  = DPM-Solver-1 (DDIM),               1 evaluation
                             x_high = DPM-Solver-2, r_1 = 1/2,            2 evaluations (the first shared)
    DPM-Solver-23 (order=3): x_low  = DPM-Solver-2, r_1 = 1/3,            2 evaluations
                             x_high = DPM-Solver-3, r_1, r_2 = 1/3, 2/3,  3 evaluations (two shared)

so a step costs ``order`` evaluations, accepted or rejected. Its error is measured against the mixed
tolerance of Hairer et al. (1993, Sec. II.4), as Alg. 4-5 write it, the RMS over the ``D`` entries of a
sample:

    delta = max(atol, rtol * max(|x_low|, |x_prev|)),   E = || (x_high - x_low) / delta ||_2 / sqrt(D),

``x_prev`` being the lower-order solution of the last accepted step (``x_T`` at first; the authors' code and
k-diffusion's ``sample_dpm_adaptive`` keep it so). ``E <= 1`` accepts the step (the state goes on from
``x_high``: local extrapolation); accepted or not the next step is

    h <- min(theta h E^{-1/order}, lam_end - lam_s),   theta = 0.9.

The exponent is ``1 / (k + 1)`` for the lower order ``k = order - 1``: ``x_high - x_low`` estimates the
lower-order solution's local error, ``O(h^{k+1})``, so ``E^{-1/(k+1)}`` is the step that would have made
``E = 1`` (Hairer et al., Eq. 4.13, ``q = min(p, p_hat)``), as in the authors' reference code
(``E^{-1/order}``) and k-diffusion's controller; ``E^{-1/k}`` would double the correction at order 2. Defaults
as the paper's
(``h_init = 0.05``, ``rtol = 0.05``, ``atol = 0.0078``: about 1/255 of an image's ``[-1, 1]`` range -- for
other data, scale ``atol`` to it).

k-diffusion's ``sample_dpm_adaptive`` has the same pair, ``delta`` and ``x_prev`` but another controller (at
its defaults, ``pcoeff = dcoeff = 0``): ``h <- h f``, ``f = 1 + atan(E^{-1/order} - 1)`` (no ``theta``; ``f <
1 + pi/2``), the step accepted where ``f >= 0.81``, i.e. ``E <= 1.53`` at order 2 and ``E <= 1.90`` at order
3, not ``E <= 1``; and one ``E`` for the batch, the RMS over all its entries. The same ``rtol`` / ``atol``
accept larger errors there. Its PID terms (Söderlind) and ``eta`` noise are not here.

Step control is per sample: each row keeps its own ``h``, level and ``x_prev``, and is accepted or rejected
on its own ``E``, so a sample is the same whatever batch it is drawn in (DESIGN's reproducibility; the
denoiser is called at per-row times, one batched call per stage on the rows not yet at the end). The
authors' code takes one ``h`` for the batch from the largest ``E`` (k-diffusion from the batch's RMS): a
batch of ``B`` samples then pays for its worst sample at every step and a sample depends on its batch.

NFE: ``order`` per step attempt of the rows still running (rejected attempts included), plus one into a
clean end (``final="zero"``: the denoised estimate at ``t_end``, as :func:`steerdiff.sample` returns).
:class:`AdaptiveInfo` gives the run's network evaluations (each batched call's cost summed, a guided
denoiser's included) and each sample's own count, accepted and rejected steps, and accepted grid.

On an accelerator an attempt syncs twice: one host read (the rows' ``E``, the calls' finiteness flags and the
divergence guard's, which the accept / reject decision needs) and one host-to-device copy (the attempt's rows,
times, bounds and update weights, computed on the host in float64 from the last decision, when the device has
no work queued).

The divergence guard (:func:`~steerdiff.solvers.base.state_bound`): an accepted ``x_high`` with an entry
NaN/inf or beyond ``1e8 (alpha D + sigma)`` at its row's new level (``D`` of ``x_T``), or a denoised estimate
of the clean step beyond ``1e8 D``, is a :class:`~steerdiff.solvers.base.NonFiniteError` naming the attempt
and the sample, in the read the step makes anyway; a rejected attempt is not a state of the run. The steps
follow the ODE to the tolerance, so what diverges there is the field itself (a guidance scale, a net that
amplifies the state).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import boolean, choice, integer, real
from .._ops import laid_out_as
from ..denoiser import Denoiser, Prediction, check_denoiser, predict_rows
from .base import (
    FINALS,
    data_scale,
    diverged_error,
    nonfinite_error,
    state_bound,
    to_sample_dtype,
    work_dtype,
)
from .dpm_solver import Coefficients, levels_at, midpoint_weight, third_order_weight, update_weights

__all__ = ["MAX_NFE", "SAMPLE_ONLY", "AdaptiveInfo", "dpm_adaptive"]

# sample's keyword arguments that dpm_adaptive has none of: in **cond they would reach the net
SAMPLE_ONLY = ("steps", "solver", "schedule", "generator", "corrector", "corrector_steps", "snr")
THETA = 0.9  # the safety factor of Alg. 4-5 (Hairer et al.'s "fac")
MAX_NFE = 10_000  # dpm_adaptive's default cap on one sample's network evaluations (about 70x rtol 1e-3's)
FRACTIONS = {2: (1 / 2,), 3: (1 / 3, 2 / 3)}  # r_a of the intermediate points: Alg. 4 (DPM-Solver-2), Alg. 5


@dataclass
class AdaptiveInfo:
    """What a :func:`dpm_adaptive` run cost and where it stepped.

    ``nfe``: network evaluations of the run (the cost of each batched call summed; rejected attempts and the
    step into a clean end included). Per sample (lists of the batch's length): ``nfe_per_sample`` (the
    evaluations of the calls the sample took part in: ``order`` times its attempts, plus 1 with
    ``final="zero"``, for a plain denoiser), ``accepted`` and ``rejected`` steps, and the accepted grid
    ``lam`` / ``t`` (half log-SNR and process time, from ``t_start`` to ``t_end``; ``accepted + 1``
    entries)."""

    nfe: int
    nfe_per_sample: list[int]
    accepted: list[int]
    rejected: list[int]
    lam: list[list[float]]
    t: list[list[float]]


class _Calls:
    """The denoiser called on a subset of the batch at per-row times: evaluations counted (in all and per
    sample) and each call's per-row finiteness kept on the device (:meth:`flags`), read with the step's
    errors and checked by :meth:`check`: one host read per step."""

    def __init__(self, den: Denoiser, cond: dict[str, Any], n: int, net_dtype: torch.dtype | None) -> None:
        self.den, self.cond, self.n, self.net_dtype = den, cond, n, net_dtype
        self.nfe = 0
        self.per_sample = [0] * n
        self._pending: list[tuple[Tensor, int, list[float]]] = []
        self._calls = 0

    def __call__(
        self, x: Tensor, t_rows: Tensor, times: list[float], rows: list[int], index: Tensor
    ) -> Prediction:
        """``den`` on the rows ``index`` (sample numbers ``rows``) at the times ``t_rows`` (float64, on
        ``x``'s device; ``times`` on the host, for a message)."""
        pred, cost = predict_rows(self.den, x, t_rows, index, self.n, self.net_dtype, self.cond)
        self.nfe += cost
        for r in rows:
            self.per_sample[r] += cost
        self._pending.append((torch.isfinite(pred.given.detach()).flatten(1).all(1), self._calls, times))
        self._calls += 1
        return pred

    def flags(self) -> Tensor:
        """Each row's flag in the calls since the last check, 1 where its estimate was not finite (float64, on
        the device: read at once with the step's errors; zeros pass)."""
        return torch.cat([flags for flags, _, _ in self._pending]).logical_not().double()

    def check(self, step: int, bad: list[float]) -> None:
        """:class:`~steerdiff.solvers.base.NonFiniteError` naming ``step`` (the step attempt), the call
        and the time of the first row flagged in ``bad`` (:meth:`flags`, read), in the calls made since the
        last check."""
        pending, self._pending = self._pending, []
        if not any(bad):
            return
        at = 0
        for _, call, times in pending:
            for j, time in enumerate(times):
                if bad[at + j]:
                    raise nonfinite_error(step, call, time)
            at += len(times)


def _weights(
    algorithm: str, frm: list[Coefficients], to: list[Coefficients], c: list[float] | None, from_x0: bool
) -> list[float]:
    """The weights ``a``, ``b``, ``d`` (each for every row, in that order) of the update of
    :func:`~steerdiff.solvers.dpm_solver.update_weights` with a level pair per row, from ``frm[r]`` to
    ``to[r]``, with ``c[r]`` (``None``: no higher-order term)."""
    cs: list[float | None] = [None] * len(frm) if c is None else list(c)
    w = [update_weights(algorithm, a, b, from_x0, cr) for a, b, cr in zip(frm, to, cs, strict=True)]
    return [v for column in zip(*w, strict=True) for v in column]


def _update(w: Tensor, x: Tensor, f: Tensor, x0: Tensor | None, d: Tensor | None = None) -> Tensor:
    """:func:`~steerdiff.solvers.dpm_solver.update` with per-row weights ``w = (a, b, d)`` (:func:`_weights`,
    on the device): the first-order step from the estimate ``f`` (``x0``: the net's where it gave one, noise
    prediction) plus ``d D`` (``D`` a difference of estimates)."""
    a, b, dw = w
    out = a * x + b * (f if x0 is None else x0)
    return out if d is None else out + dw * d


@overload
def dpm_adaptive(
    den: Denoiser,
    x_T: Tensor,
    order: int = ...,
    rtol: float = ...,
    atol: float = ...,
    h_init: float = ...,
    t_start: float | None = ...,
    t_end: float | None = ...,
    *,
    final: str = ...,
    data_form: bool = ...,
    max_nfe: int | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[False] = ...,
    **cond: Any,
) -> Tensor: ...


@overload
def dpm_adaptive(
    den: Denoiser,
    x_T: Tensor,
    order: int = ...,
    rtol: float = ...,
    atol: float = ...,
    h_init: float = ...,
    t_start: float | None = ...,
    t_end: float | None = ...,
    *,
    final: str = ...,
    data_form: bool = ...,
    max_nfe: int | None = ...,
    callback: Callable[[dict[str, Any]], None] | None = ...,
    progress: bool = ...,
    return_info: Literal[True],
    **cond: Any,
) -> tuple[Tensor, AdaptiveInfo]: ...


def dpm_adaptive(
    den: Denoiser,
    x_T: Tensor,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    t_start: float | None = None,
    t_end: float | None = None,
    *,
    final: str = "zero",
    data_form: bool = False,
    max_nfe: int | None = MAX_NFE,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    return_info: bool = False,
    **cond: Any,
) -> Tensor | tuple[Tensor, AdaptiveInfo]:
    """Sample ``den`` from ``x_T`` with the adaptive step-size DPM-Solver to the tolerance ``rtol`` /
    ``atol`` (module docstring: Lu et al. 2022, Alg. 4-5, per-sample step control).

    Args:
        den: the :class:`~steerdiff.denoiser.Denoiser` (guided ones included; called at per-row times).
            One that draws noise at every call (``den.own_noise()``: ``SelfGuidedMinority``,
            ``DensityGuidance(probes=)``, RePaint; CADS while it anneals) is a random field, whose error
            estimate does not shrink with the step: it runs, at many more attempts (the tests' 8-d
            ``smooth_mixture()``, VP cosine, 16 samples, defaults, attempts of the slowest sample / network
            evaluations of the run: plain 15 / 46; ``SelfGuidedMinority`` ``w = 1`` 698 / 4190, ``w = 0.1``
            74 / 446; ``DensityGuidance(rate=0)`` 15 with the exact divergence, 48 with 2 Hutchinson probes;
            tests/test_dpm_adaptive.py).
            ``SelfGuidedMinority(times=)`` guides at listed times only, which adaptive steps rarely hit
            (every 5th node of a 50-step grid: guided at ``t_max`` alone).
        x_T: the noise at ``t_start``, shape ``(batch, ...)``, as for :func:`steerdiff.sample` (its dtype is
            the result's; float16/bfloat16 run the net in it and the solver in float32).
        order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23, default; fewer evaluations at tight tolerances).
        rtol: relative tolerance, a number > 0 (default 0.05).
        atol: absolute tolerance, a number > 0 (default 0.0078, for data in ``[-1, 1]``).
        h_init: the first step in log-SNR, a number > 0 (default 0.05).
        t_start: process time to start from, in ``[t_min, t_max]`` (default ``t_max``).
        t_end: process time to solve to, in ``[t_min, t_max]`` and less noisy than ``t_start`` (default
            ``t_min``).
        final: ``"zero"`` (default): then one evaluation more, returning the denoised estimate at ``t_end``
            (:func:`steerdiff.sample`'s clean end); ``"none"``: the state at ``t_end``.
        data_form: integrate the data prediction (DPM-Solver++, Lu et al. 2022b) instead of the noise
            prediction of the paper's algorithm (default False).
        max_nfe: the network evaluations one sample's step attempts may make (an integer >= 1, default
            :data:`MAX_NFE`, about 70x a run at rtol 1e-3; ``None``: no limit; ``final="zero"``'s clean step
            comes after): an attempt that would pass it is a
            ``RuntimeError`` naming its time and step, where a field too stiff for the tolerance (a large
            guidance scale: CFG at 1e3 on the tests' mixture took over 25,000 evaluations a sample and was
            still running) would otherwise keep shrinking its steps for minutes.
        callback: called after every step attempt with ``{"i", "t", "sigma", "x", "denoised", "nfe",
            "accepted", "error"}``: the attempt's index, each sample's time and ``sigma`` (float64 tensors of
            the batch's length) after it, the state, each sample's latest denoised estimate, the run's
            evaluations so far, whether each sample's attempt was accepted (False for the samples already at
            ``t_end``) and its ``E`` (NaN for those); once more after the clean step of ``final="zero"``
            (``sigma`` 0, ``accepted`` all True, ``error`` 0). Read-only.
        progress: show a tqdm bar (one tick per attempt).
        return_info: also return an :class:`AdaptiveInfo`.
        **cond: passed to the network on every call; tensors with one row per sample follow their samples.
            Not the keywords of :func:`~steerdiff.sampling.sample` that this function lacks
            (:data:`SAMPLE_ONLY`: ``steps``, ``solver``, ``schedule``, ``generator``, ``corrector``,
            ``corrector_steps``, ``snr``), which would reach the net.

    Raises:
        ValueError: bad arguments (the message names the argument and the accepted values).
        NonFiniteError: the network returned NaN/inf (the message names the step attempt, the evaluation
            and the time), or an accepted state diverged (the divergence guard, module docstring).
        FloatingPointError: a sample's step fell to nothing (its levels no longer distinct in float64, or
            ``h`` NaN): the error estimate does not shrink with the step there.
    """
    from ..sampling import check_sample_only, check_x_T  # sampling imports this package: here, once loaded

    who = "dpm_adaptive"
    check_denoiser(who, "den", den)
    scale = data_scale(check_x_T(den, x_T, who))  # the divergence guard's D
    check_sample_only(
        who,
        cond,
        SAMPLE_ONLY,
        "which chooses its own steps (rtol, atol) with its own deterministic solver (order) and moves no "
        "corrector; accepted: den, x_T, order, rtol, atol, h_init, t_start, t_end, final, data_form, "
        "callback, progress, return_info and the net's conditions (**cond)",
    )
    order = integer(who, "order", order, lo=2, hi=3)
    rtol = real(who, "rtol", rtol, lo=0, lo_open=True)
    atol = real(who, "atol", atol, lo=0, lo_open=True)
    h_init = real(who, "h_init", h_init, lo=0, lo_open=True)
    max_nfe = None if max_nfe is None else integer(who, "max_nfe", max_nfe, lo=1)
    final = choice(who, "final", final, FINALS)
    data_form = boolean(who, "data_form", data_form)
    progress = boolean(who, "progress", progress)
    return_info = boolean(who, "return_info", return_info)
    if callback is not None and not callable(callback):
        raise ValueError(f"{who}: callback must be None or a callable(dict), got {type(callback).__name__}")
    p = den.process
    t0 = p.t_max if t_start is None else real(who, "t_start", t_start, lo=p.t_min, hi=p.t_max)
    t1 = p.t_min if t_end is None else real(who, "t_end", t_end, lo=p.t_min, hi=p.t_max)
    start, end = (
        (float(a), float(s), float(lam)) for a, s, lam in zip(*p.coefficients([t0, t1]), strict=True)
    )
    if not start[2] < end[2]:
        raise ValueError(
            f"{who}: t_end={t1:g} must be less noisy than t_start={t0:g} (lam {end[2]:.6g} <= {start[2]:.6g})"
        )

    algorithm = "dpmsolver++" if data_form else "dpmsolver"

    def estimate(pred: Prediction) -> Tensor:
        """The estimate the updates integrate: ``x0`` (data form) or ``eps``."""
        return pred.x0 if data_form else pred.eps

    n, fractions = len(x_T), FRACTIONS[order]
    forms = (True,) if data_form else (False, True)  # from_x0 of the updates (update_weights)
    x = x_T.to(work_dtype(x_T.dtype))
    calls = _Calls(den, cond, n, x_T.dtype if x.dtype != x_T.dtype else None)
    level: list[Coefficients] = [start] * n  # each sample's current level, time, step and x_prev
    t_now, h, error = [t0] * n, [h_init] * n, [math.nan] * n
    x_prev = x
    info = AdaptiveInfo(
        0, calls.per_sample, [0] * n, [0] * n, [[start[2]] for _ in range(n)], [[t0] for _ in range(n)]
    )
    denoised = torch.zeros_like(x) if callback is not None else None
    active, step = list(range(n)), 0
    attempt = order * den.cost  # one attempt's evaluations of a sample
    diverged = functools.partial(
        diverged_error,
        fix="the guidance scale may be too large: try less"
        if den.guided
        else "the steps follow the ODE to rtol, atol: the model's field itself diverges there",
    )
    bar = tqdm(desc=who, leave=False) if progress else None
    while active:
        if max_nfe is not None and (late := [r for r in active if calls.per_sample[r] + attempt > max_nfe]):
            r = late[0]
            raise RuntimeError(
                f"{who}: sample {r} has made {calls.per_sample[r]} network evaluations and is at t = "
                f"{t_now[r]:.6g}, its step down to h = {h[r]:.3g} in log-SNR (attempt {step}): the field is "
                f"too stiff for rtol={rtol:g}, atol={atol:g} (a large guidance scale?); loosen them, raise "
                "max_nfe (None: no limit), or sample a fixed grid with steerdiff.sample"
            )
        m, frm = len(active), [level[r] for r in active]
        hs = [min(h[r], end[2] - lv[2]) for r, lv in zip(active, frm, strict=True)]
        last = [h[r] >= end[2] - lv[2] for r, lv in zip(active, frm, strict=True)]
        k = len(fractions) + 1  # the intermediate levels and the step's end, per row
        levels = levels_at(
            p, [lv[2] + c * hh for lv, hh in zip(frm, hs, strict=True) for c in (*fractions, 1.0)]
        )
        inner = [[levels[j * k + a] for j in range(m)] for a in range(k - 1)]
        to_t = [t1 if z else levels[j * k + k - 1][0] for j, z in enumerate(last)]
        to = [end if z else levels[j * k + k - 1][1] for j, z in enumerate(last)]
        for j, r in enumerate(active):  # every level of the step distinct (h has not underflowed, nor is NaN)
            lams = [frm[j][2], *(lvls[j][1][2] for lvls in inner), to[j][2]]
            if not all(a < b for a, b in itertools.pairwise(lams)):
                raise FloatingPointError(
                    f"{who}: the step of sample {r} fell to h = {hs[j]:.3g} at t = {t_now[r]:.6g} (attempt "
                    f"{step}; E = {error[r]:.3g} at the one before): the error does not shrink with the step"
                )
        # the updates' levels and higher-order weights: DPM-Solver-1 / -2 (r_1 = 1/2) at order 2, DPM-Solver-2
        # (r_1 = 1/3) / -3 (r_1, r_2 = 1/3, 2/3; u_2 as in Alg. 2) at order 3
        mid = [[lv for _, lv in lvls] for lvls in inner]
        h_of = [[b[2] - a[2] for a, b in zip(frm, lvls, strict=True)] for lvls in (*mid, to)]
        c_mid = [midpoint_weight(algorithm, hh, h1) for h1, hh in zip(h_of[0], h_of[-1], strict=True)]
        updates: list[tuple[list[Coefficients], list[float] | None]]
        if order == 2:  # u_1, x_low, x_high
            updates = [(mid[0], None), (to, None), (to, c_mid)]
        else:  # u_1, x_low, u_2, x_high
            c_u2 = [third_order_weight(algorithm, h2, h1) for h2, h1 in zip(h_of[1], h_of[0], strict=True)]
            c_3 = [third_order_weight(algorithm, hh, h2) for hh, h2 in zip(h_of[2], h_of[1], strict=True)]
            updates = [(mid[0], None), (to, c_mid), (mid[1], c_u2), (to, c_3)]
        # one copy per attempt: the rows, each call's times, the bounds of the divergence guard at the step's
        # end (state_bound) and the updates' weights (both forms of the noise prediction's: from eps, or from
        # the x0 a net gives, known at its first call)
        times = [[t_now[r] for r in active], *([t for t, _ in lvls] for lvls in inner)]
        bounds = [state_bound(scale, lv[0], lv[1]) for lv in to]
        host = [float(r) for r in active] + [t for ts in times for t in ts] + bounds
        host += [v for to_, c in updates for form in forms for v in _weights(algorithm, frm, to_, c, form)]
        packed = torch.tensor(host, dtype=torch.float64, device=x.device)
        index, t_dev = packed[:m].long(), packed[m : m * (1 + order)].view(order, m)
        limits = packed[m * (1 + order) : m * (2 + order)]
        w = packed[m * (2 + order) :].view(len(updates), len(forms), 3, m, *[1] * (x.ndim - 1)).to(x.dtype)

        xs = x.index_select(0, index)
        pred = calls(xs, t_dev[0], times[0], active, index)
        if denoised is not None:
            denoised = denoised.index_copy(0, index, pred.x0)
        x0_s = pred.x0 if not data_form and pred.x0_given else None  # an x0 net's: dpm_solver.update
        wt = w[:, forms.index(data_form or x0_s is not None)]
        f_s = estimate(pred)
        u_1 = _update(wt[0], xs, f_s, x0_s)
        d_1 = estimate(calls(u_1, t_dev[1], times[1], active, index)) - f_s
        if order == 2:  # DPM-Solver-1 against DPM-Solver-2
            x_low = _update(wt[1], xs, f_s, x0_s)
            x_high = _update(wt[2], xs, f_s, x0_s, d_1)
        else:  # DPM-Solver-2 against DPM-Solver-3
            x_low = _update(wt[1], xs, f_s, x0_s, d_1)
            u_2 = _update(wt[2], xs, f_s, x0_s, d_1)
            d_2 = estimate(calls(u_2, t_dev[2], times[2], active, index)) - f_s
            x_high = _update(wt[3], xs, f_s, x0_s, d_2)
        prev = x_prev.index_select(0, index)
        delta = torch.maximum(x_low.abs(), prev.abs()).mul_(rtol).clamp_min_(atol)
        e_dev = ((x_high - x_low) / delta).flatten(1).double().square().mean(1).sqrt()
        # the divergence guard: 1 where x_high is NaN/inf or beyond its bound (read, acted on where accepted)
        beyond = (x_high.detach().flatten(1).abs().amax(1).double() <= limits).logical_not().double()
        read = torch.cat([e_dev, beyond, calls.flags()]).tolist()  # the attempt's one read: E and the flags
        calls.check(step, read[2 * m :])
        errors = read[:m]
        ok = [e <= 1.0 for e in errors]
        for j, r in enumerate(active):  # a rejected attempt is not a state of the run
            if ok[j] and read[m + j]:
                raise diverged(step, to_t[j], who=f"{who}: sample {r}'s accepted step", bound=bounds[j])
        if any(ok):  # the accepted rows (E <= 1, decided alike on the device) go on from x_high
            took = (e_dev <= 1.0).view(-1, *[1] * (x.ndim - 1))
            x = x.index_copy(0, index, torch.where(took, x_high, xs))
            x_prev = x_prev.index_copy(0, index, torch.where(took, x_low, prev))
        for j, r in enumerate(active):
            if ok[j]:
                level[r], t_now[r] = to[j], to_t[j]
                info.accepted[r] += 1
                info.lam[r].append(to[j][2])
                info.t[r].append(to_t[j])
            else:
                info.rejected[r] += 1
            error[r] = errors[j]
            h[r] = THETA * hs[j] * (math.inf if errors[j] == 0 else errors[j] ** (-1 / order))
        if callback is not None:
            flags, err = torch.zeros(n, dtype=torch.bool), torch.full((n,), math.nan, dtype=torch.float64)
            flags[active], err[active] = torch.tensor(ok), torch.tensor(errors, dtype=torch.float64)
            callback(
                {
                    "i": step,
                    "t": torch.tensor(t_now, dtype=torch.float64),
                    "sigma": torch.tensor([lv[1] for lv in level], dtype=torch.float64),
                    "x": x,
                    "denoised": denoised,
                    "nfe": calls.nfe,
                    "accepted": flags,
                    "error": err,
                }
            )
        active = [r for j, r in enumerate(active) if not (ok[j] and last[j])]
        step += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if final == "zero":
        everyone = torch.arange(n, device=x.device)
        t_end_rows = torch.full((n,), t1, dtype=torch.float64, device=x.device)
        x = calls(x, t_end_rows, [t1] * n, list(range(n)), everyone).x0
        clean = state_bound(scale, 1.0, 0.0)  # the guard on the denoised estimate, as sample's clean step
        beyond = (x.detach().flatten(1).abs().amax(1).double() <= clean).logical_not().double()
        read = torch.cat([beyond, calls.flags()]).tolist()
        calls.check(step, read[n:])
        if (row := next((j for j in range(n) if read[j]), None)) is not None:
            raise diverged(
                step, t1, who=f"{who}: sample {row}'s clean step (its denoised estimate)", bound=clean
            )
        if callback is not None:
            callback(
                {
                    "i": step,
                    "t": torch.full((n,), t1, dtype=torch.float64),
                    "sigma": torch.zeros(n, dtype=torch.float64),
                    "x": x,
                    "denoised": x,
                    "nfe": calls.nfe,
                    "accepted": torch.ones(n, dtype=torch.bool),
                    "error": torch.zeros(n, dtype=torch.float64),
                }
            )
    x = laid_out_as(to_sample_dtype(who, x, x_T.dtype), x_T)  # the rows' updates made x contiguous
    if return_info:
        info.nfe = calls.nfe
        return x, info
    return x
