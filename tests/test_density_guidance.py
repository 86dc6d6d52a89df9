"""Density Guidance (Karczewski et al. 2025) against the exact log-density of the Gaussian-mixture oracle.

``gmm.log_prob(x, alpha, sigma)`` is the exact ``log p_t``, so the guided ODE's promise -- ``log p_t(x_t)``
changes at the prescribed rate -- is checked sample by sample: locally (one tiny step), and end to end,
where the only error left is the solver's, shrinking with the number of steps. Samples stop at the
last node (``final="none"``), where ``log p_t`` is exact.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import DensityGuidance, prior_guidance

F64 = torch.float64
KW = {"solver": "unipc", "schedule": "logsnr_uniform", "final": "none"}
PROCESSES = [sd.VP.cosine(), sd.RectifiedFlow()]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian() -> sd.toy.GaussianMixture:
    """One anisotropic Gaussian in 4-d: ``div v`` does not depend on ``x``, so an ``offset`` adds exactly
    ``offset`` to the plain ODE's ``log p`` from the same ``x_T``."""
    var = torch.tensor([[0.3, 1.0, 2.0, 0.05]], dtype=F64)
    return sd.toy.GaussianMixture(
        torch.randn(1, 4, dtype=F64, generator=_gen(0)), var, torch.ones(1, dtype=F64)
    )


def _mixture() -> sd.toy.GaussianMixture:
    """Four components in 8-d, unequal weights and variances."""
    g = _gen(0)
    means, var = 2 * torch.randn(4, 8, dtype=F64, generator=g), 0.2 + torch.rand(4, 8, dtype=F64, generator=g)
    return sd.toy.GaussianMixture(means, var, torch.softmax(torch.randn(4, dtype=F64, generator=g), 0))


def _log_p(law: sd.toy.GaussianMixture, proc: sd.Process, x: torch.Tensor, t: float) -> torch.Tensor:
    return law.log_prob(x, float(proc.alpha(t)), float(proc.sigma(t)))


def _lam_dot(proc: sd.Process, t: float) -> float:
    return float(proc.d_alpha(t) / proc.alpha(t) - proc.d_sigma(t) / proc.sigma(t))


def _frac_dot(proc: sd.Process, t: float) -> float:
    """``d s / d lam`` of the signal fraction ``s = alpha^2 / (alpha^2 + sigma^2)``, from its definition."""
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    lam, h = math.log(a / s), 1e-5
    return (1 / (1 + math.exp(-2 * (lam + h))) - 1 / (1 + math.exp(-2 * (lam - h)))) / (2 * h)


def _local_rate(law, proc, den, x, t, h=1e-6):
    """``d log p_t(x_t) / dt`` along the denoiser's probability-flow ODE, by one DDIM step of ``-h``."""
    pred = den(x, t)
    x_next = pred.renoise(float(proc.alpha(t - h)), float(proc.sigma(t - h)))
    return (_log_p(law, proc, x_next, t - h) - _log_p(law, proc, x, t)) / -h


@pytest.mark.parametrize("proc", PROCESSES, ids=["vp_cosine", "flow"])
def test_rate_is_the_prescribed_one_locally(proc):
    """The guided drift changes ``log p_t`` at the plain rate plus ``k ds/dlam lam'`` (offset: ``s`` the
    signal fraction, ``k = offset / (s(t_min) - s(t_max))``), ``k lam'`` (quantile) or at exactly ``b_t``
    (rate=, exact divergence), at every noise level (finite differences, h = 1e-6)."""
    law = _mixture()
    den = law.denoiser(proc)
    x0 = law.sample(16, _gen(3))
    dg, dq = DensityGuidance(den, offset=-2.0), DensityGuidance(den, quantile=0.3)
    kq = math.sqrt(16) * float(torch.special.ndtri(torch.tensor(0.3, dtype=F64)))
    b = 0.7 - torch.arange(16, dtype=F64) / 10  # a rate per sample

    def rate(t, x):
        return b

    exact = DensityGuidance(den, rate=rate)
    for t in (0.9, 0.5, 0.1, 0.01):
        x = float(proc.alpha(t)) * x0 + float(proc.sigma(t)) * torch.randn(
            16, 8, dtype=F64, generator=_gen(4)
        )
        plain = _local_rate(law, proc, den, x, t)
        extra = _local_rate(law, proc, dg, x, t) - plain
        want = dg.k * _frac_dot(proc, t) * _lam_dot(proc, t)
        assert torch.allclose(extra, torch.full_like(extra, want), rtol=1e-4, atol=1e-4)
        extra = _local_rate(law, proc, dq, x, t) - plain
        assert torch.allclose(extra, torch.full_like(extra, kq * _lam_dot(proc, t)), rtol=1e-4, atol=1e-4)
        assert torch.allclose(_local_rate(law, proc, exact, x, t), b, rtol=1e-4, atol=1e-4)


def test_rate_at_integer_nodes_of_a_discrete_process():
    """``VP.discrete``'s log-SNR is piecewise linear between integer times, where discrete schedules put
    their nodes: ``rate=`` takes the derivatives of the segment below the node, the one sampling crosses.
    Measured max |rate - b| (SD's betas, h = 1e-3): 5.2e-5 / 1.1e-4 at t = 100 / 10; with the segment
    above (floor(t)) it was 5.9e-3 / 0.074."""
    law, proc = _mixture(), sd.VP.scaled_linear()
    den = law.denoiser(proc)
    x0 = law.sample(16, _gen(3))
    b = 0.7 - torch.arange(16, dtype=F64) / 10
    exact = DensityGuidance(den, rate=lambda t, x: b)
    z = torch.randn(16, 8, dtype=F64, generator=_gen(4))
    for t in (100.0, 10.0):
        x = float(proc.alpha(t)) * x0 + float(proc.sigma(t)) * z
        assert torch.allclose(_local_rate(law, proc, exact, x, t, h=1e-3), b, rtol=0, atol=5e-4)


def test_quantile_is_the_paper_rule():
    """``quantile=q``: ``eta = 1 + sqrt(2 D) Phi^{-1}(q) / ||eps||^2`` (paper eq. 14); ``offset``:
    ``eta = 1 + k (ds/dlam) / ||eps||^2``, ``ds/dlam = 2 s (1 - s)`` of the signal fraction ``s``."""
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    x = torch.randn(8, 8, dtype=F64, generator=_gen(1))
    k = math.sqrt(16) * float(torch.special.ndtri(torch.tensor(0.3, dtype=F64)))
    base = den(x, 0.4)
    eta = 1 + k / base.eps.pow(2).sum(1, keepdim=True)
    assert torch.allclose(DensityGuidance(den, quantile=0.3)(x, 0.4).eps, eta * base.eps, rtol=1e-12, atol=0)
    dg = DensityGuidance(den, offset=-3.0)
    s = float(proc.alpha(0.4)) ** 2 / (float(proc.alpha(0.4)) ** 2 + float(proc.sigma(0.4)) ** 2)
    eta = 1 + dg.k * 2 * s * (1 - s) / base.eps.pow(2).sum(1, keepdim=True)
    assert torch.allclose(dg(x, 0.4).eps, eta * base.eps, rtol=1e-12, atol=0)
    ends = [
        float(proc.alpha(t)) ** 2 / (float(proc.alpha(t)) ** 2 + float(proc.sigma(t)) ** 2)
        for t in (proc.t_min, proc.t_max)
    ]
    assert dg.k == pytest.approx(-3.0 / (ends[0] - ends[1]), rel=1e-12)


def test_per_sample_times_and_no_grad():
    """A ``(batch,)`` time tensor gives the float time's prediction (to rounding); ``rate=`` takes its
    divergence also under ``torch.no_grad()`` and returns a detached prediction."""
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    x = torch.randn(6, 8, dtype=F64, generator=_gen(2))
    zero = DensityGuidance(den, rate=lambda t, x: torch.zeros(x.shape[0], dtype=x.dtype))
    for dg in (DensityGuidance(den, offset=-1.0), DensityGuidance(den, quantile=0.3), zero):
        per_sample = dg(x, torch.full((6,), 0.5, dtype=F64)).eps
        assert torch.allclose(per_sample, dg(x, 0.5).eps, rtol=0, atol=1e-14)
    with torch.no_grad():
        assert not zero(x, 0.5).eps.requires_grad


def test_hutchinson_probes_per_row_make_a_row_independent_of_its_batch():
    """``generator=`` one per row: a row's probes are its own, so under the sampler's per-row generators
    (which refuse a guidance drawing the whole batch from one) a row is the same in any batch (measured
    1.8e-15 apart; other seeds: 0.087). Before, a list was refused, so Hutchinson's estimate could not run
    with per-row seeds, though the sampler's refusal asked for one."""
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    x_T = torch.randn(4, 8, dtype=F64, generator=_gen(1))

    def run(rows, seed=10):
        dg = DensityGuidance(
            den,
            rate=lambda t, x: torch.zeros(x.shape[0], dtype=x.dtype),
            probes=2,
            generator=[_gen(seed + r) for r in rows],
        )
        return sd.sample(dg, x_T[rows], 6, generator=[_gen(20 + r) for r in rows], **KW)

    whole = run([0, 1, 2, 3])
    assert torch.allclose(whole[2:], run([2, 3]), rtol=0, atol=1e-12)
    assert (whole[2:] - run([2, 3], seed=30)).abs().max() > 1e-3  # the probes are the rows' own draws


@pytest.mark.parametrize("proc", PROCESSES, ids=["vp_cosine", "flow"])
def test_offset_shifts_a_gaussian_log_density_exactly(proc):
    """Gaussian law: ``log p`` of the guided sample is the plain one's plus ``offset``, up to the solver's
    error. UniPC-3 on log-SNR-uniform grids, 256 samples, offset -2; measured max |error| (VP cosine /
    flow): 20 steps 0.197 / 0.408, 40 steps 0.029 / 0.078, 80 steps 3.6e-3 / 1.0e-2 (the paper's rate,
    uniform in lam, 0.083 / 0.61, 8.8e-4 / 2.4e-3, 2.9e-4 / 2.9e-4: its k is 5 times smaller where the
    offset's rate peaks, at lam = 0)."""
    law = _gaussian()
    den = law.denoiser(proc)
    x_T = torch.randn(256, 4, dtype=F64, generator=_gen(1))
    errors = []
    for steps in (20, 40, 80):
        plain, info = sd.sample(den, x_T, steps, return_info=True, **KW)
        guided = sd.sample(DensityGuidance(den, offset=-2.0), x_T, steps, **KW)
        t_end = info.grid.t[-1]
        gain = _log_p(law, proc, guided, t_end) - _log_p(law, proc, plain, t_end)
        errors.append(float((gain + 2.0).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.1 and errors[2] < 0.015


def _quantile_for(k: float, d: int) -> float:
    """The ``quantile`` whose rate is ``k`` per unit of lam in ``d`` dimensions (``sqrt(2 d) Phi^-1(q)``)."""
    return float(torch.special.ndtr(torch.tensor(k / math.sqrt(2 * d), dtype=F64)))


@pytest.mark.parametrize("proc", PROCESSES, ids=["vp_cosine", "flow"])
def test_offset_under_the_samplers_defaults(proc):
    """``sd.sample(DensityGuidance(den, offset=-2), x_T, 40)`` with the defaults (``karras_capped``, default
    solver, clean end): the mean gain over the plain run is the offset within the log-SNR-uniform run's
    tolerance. Gaussian law, 256 samples, measured VP cosine / flow: -2.0093 / -2.0132 (max error 0.044 /
    0.060); ``final="none"`` -2.0091 / -2.0122; log-SNR-uniform ``final="none"`` -2.0050 / -2.0128.
    The paper's rate, uniform in lam (``quantile`` giving the same total, as ``offset`` had it before):
    -2.370 / -6.102 under the defaults (flow: 44.7 nats off on one sample), -2.216 / -2.165 on the
    log-SNR-uniform grid with its clean end, -2.006 / -2.016 at its last noisy node: the clean step
    takes one more unit of lam of gain (``k``), and the long first step in lam (``karras_capped``:
    h = 1.50 / 3.64) weights the guidance (e^h - 1) / h times (2.3 / 10.2) (module docstring)."""
    law = _gaussian()
    den = law.denoiser(proc)
    dg = DensityGuidance(den, offset=-2.0)
    x_T = torch.randn(256, 4, dtype=F64, generator=_gen(1))

    def gain(x: torch.Tensor, y: torch.Tensor, a: float, s: float) -> torch.Tensor:
        return law.log_prob(x, a, s) - law.log_prob(y, a, s)

    plain = sd.sample(den, x_T, 40)
    g = gain(sd.sample(dg, x_T, 40), plain, 1.0, 0.0)
    assert abs(float(g.mean()) + 2) < 0.03 and float((g + 2).abs().max()) < 0.1
    for kw in ({"final": "none"}, {"schedule": "logsnr_uniform", "final": "none"}):
        plain, info = sd.sample(den, x_T, 40, return_info=True, **kw)
        t_end = info.grid.t[-1]
        a, s = float(proc.alpha(t_end)), float(proc.sigma(t_end))
        assert abs(float(gain(sd.sample(dg, x_T, 40, **kw), plain, a, s).mean()) + 2) < 0.03, kw
    # the lam-uniform rule with the same total misses under the defaults
    span = float(proc.lam(proc.t_min) - proc.lam(proc.t_max))
    uniform = DensityGuidance(den, quantile=_quantile_for(-2.0 / span, 4))
    miss = float(gain(sd.sample(uniform, x_T, 40), sd.sample(den, x_T, 40), 1.0, 0.0).mean()) + 2
    assert miss < -0.3


def test_offset_zero_is_the_plain_ode():
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    x_T = torch.randn(32, 8, dtype=F64, generator=_gen(1))
    plain, info = sd.sample(den, x_T, 12, "dpmpp_2m", return_info=True)
    guided, ginfo = sd.sample(DensityGuidance(den, offset=0.0), x_T, 12, "dpmpp_2m", return_info=True)
    assert torch.equal(guided, plain)
    assert ginfo.nfe == info.nfe == 12


@pytest.mark.parametrize(
    ("proc", "bounds"), [(PROCESSES[0], (0.02, 0.5)), (PROCESSES[1], (0.05, 0.5))], ids=["vp", "flow"]
)
def test_rate_prescribes_the_final_log_density(proc, bounds):
    """``rate=`` a constant ``b``: every sample ends at exactly ``log p_T(x_T) + b (t_end - t_T)``, whatever
    its path (8-d mixture, ``b`` set 1 nat below the lowest plain change). Exact divergence: the error
    shrinks with steps (std measured VP / flow: 0.092 / 0.20 at 20 steps, 0.0051 / 0.021 at 40);
    Hutchinson with 4 probes: unbiased (mean -0.020 / -0.071 at 40 steps) but noisier (std 0.23 / 0.35),
    at 5 rather than 9 evaluations a step."""
    law = _mixture()
    den = law.denoiser(proc)
    x_T = torch.randn(128, 8, dtype=F64, generator=_gen(1))
    spread = {}
    for probes, steps in ((None, 20), (None, 40), (4, 40)):
        plain, info = sd.sample(den, x_T, steps, return_info=True, **KW)
        t0, t_end = info.grid.t[0], info.grid.t[-1]
        start = _log_p(law, proc, x_T, t0)
        total = float((_log_p(law, proc, plain, t_end) - start).min()) - 1.0
        b = torch.full((128,), total / (t_end - t0), dtype=F64)
        gen = None if probes is None else _gen(5)
        dg = DensityGuidance(den, rate=lambda t, x, b=b: b, probes=probes, generator=gen)
        out, oinfo = sd.sample(dg, x_T, steps, return_info=True, **KW)
        err = _log_p(law, proc, out, t_end) - (start + total)
        spread[probes, steps] = float(err.std())
        assert oinfo.nfe == steps * (1 + (8 if probes is None else probes))
        if probes is not None:
            assert abs(float(err.mean())) < 0.1
    assert spread[None, 20] > spread[None, 40]
    assert spread[None, 40] < bounds[0] and spread[4, 40] < bounds[1]
    assert spread[4, 40] > 10 * spread[None, 40]


def test_density_guidance_against_prior_guidance():
    """At the same mean ``log p_0`` (the prior scale found by bisection), Density Guidance's offset lands
    each sample nearer its target ``log p_plain + offset`` than Prior Guidance (scaled ``x_T``) and moves
    fewer samples to another component (8-d mixture, VP cosine, UniPC-3, 40 log-SNR-uniform steps, 512
    samples). Measured, offset -2: std of the gain 0.39 against 1.45 (prior scale 1.239), same
    component as the plain sample 97.7% against 91.4%; offset -4: 0.69 / 2.42 (scale 1.447), 95.3% / 86.3%.
    (The paper's uniform rate, ``offset``'s before: 0.58 / 1.42, 95.5% / 92.0%.)"""
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    x_T = torch.randn(512, 8, dtype=F64, generator=_gen(1))
    plain, info = sd.sample(den, x_T, 40, return_info=True, **KW)
    t_end = info.grid.t[-1]
    a, s = float(proc.alpha(t_end)), float(proc.sigma(t_end))

    def gain(x):
        return law.log_prob(x, a, s) - law.log_prob(plain, a, s)

    def component(x):
        return law.log_responsibilities(x, a, s).argmax(1)

    dg = sd.sample(DensityGuidance(den, offset=-2.0), x_T, 40, **KW)
    target = float(gain(dg).mean())
    lo, hi = 1.0, 2.0  # the mean gain falls as the scale grows
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi)
            if float(gain(sd.sample(den, prior_guidance(x_T, mid), 40, **KW)).mean()) > target
            else (lo, mid)
        )
    prior = sd.sample(den, prior_guidance(x_T, (lo + hi) / 2), 40, **KW)
    assert abs(float(gain(prior).mean()) - target) < 1e-3
    assert abs(target + 2.0) < 0.1  # measured -2.051
    assert float(gain(dg).std()) < 0.5 < 1.2 < float(gain(prior).std())  # measured 0.394 / 1.449
    same_dg = float((component(dg) == component(plain)).double().mean())
    same_prior = float((component(prior) == component(plain)).double().mean())
    assert same_dg > same_prior  # measured 0.977 / 0.914


def test_bad_input():
    law, proc = _mixture(), sd.VP.cosine()
    den = law.denoiser(proc)
    with pytest.raises(ValueError, match=r"give exactly one of offset, quantile or rate, got none"):
        DensityGuidance(den)
    with pytest.raises(ValueError, match=r"got \['offset', 'quantile'\]"):
        DensityGuidance(den, offset=1.0, quantile=0.5)
    with pytest.raises(ValueError, match=r"quantile must be a finite number in \(0, 1\), got 1.0"):
        DensityGuidance(den, quantile=1.0)
    with pytest.raises(ValueError, match=r"offset must be a finite number, got nan"):
        DensityGuidance(den, offset=math.nan)
    with pytest.raises(ValueError, match=r"probes and generator are for rate="):
        DensityGuidance(den, offset=1.0, probes=4)
    with pytest.raises(ValueError, match=r"probes must be an integer >= 1, got 0"):
        DensityGuidance(den, rate=lambda t, x: x[:, 0], probes=0)
    with pytest.raises(ValueError, match=r"rate must be a function"):
        DensityGuidance(den, rate=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"generator must be None, a torch.Generator or a non-empty list"):
        DensityGuidance(den, rate=lambda t, x: x[:, 0], probes=2, generator=3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=re.escape("rate(t, x) must return a tensor of shape (4,), got (4, 1)")
    ):
        DensityGuidance(den, rate=lambda t, x: x[:, :1])(torch.zeros(4, 8, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"prior_guidance: scale must be a finite number > 0, got 0.0"):
        prior_guidance(torch.zeros(2, 8), 0.0)
