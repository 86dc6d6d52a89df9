"""Classifier-free guidance, its refinements (rescale, interval, CADS), PCG and thresholding.

Oracle: a two-class mixture ``p(x) = (p(x|0) + p(x|1)) / 2`` whose classes are sub-mixtures, with
the exact denoisers of ``p(x|c)`` and ``p(x)`` behind one net that takes a label (``-1``: null). The
guided score must be that of ``p_t(x|c)^w p_t(x)^{1-w}`` at every noise level.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from scipy.integrate import solve_ivp

import steerdiff as sd
from steerdiff.bench._ode import piecewise_ode
from steerdiff.bench.solvers import initial_noise
from steerdiff.guidance import CADS, CFG, DynamicThreshold, pcg

from .reference import half_net, rel_rmse

F64 = torch.float64
NULL = -1


def two_class() -> tuple[sd.toy.GaussianMixture, sd.toy.GaussianMixture, sd.toy.GaussianMixture]:
    """Classes 0 and 1 (two components each, in 2-D) and their equal-weight mixture."""
    m0 = torch.tensor([[-2.0, 0.5], [-1.0, -1.5]], dtype=F64)
    m1 = torch.tensor([[2.0, 0.0], [1.5, 2.0]], dtype=F64)
    var = torch.tensor([[0.3, 0.2], [0.25, 0.4]], dtype=F64)
    ones = torch.ones(2, dtype=F64)
    c0, c1 = sd.toy.GaussianMixture(m0, var, ones), sd.toy.GaussianMixture(m1, var, ones)
    return (
        c0,
        c1,
        sd.toy.GaussianMixture(torch.cat([m0, m1]), torch.cat([var, var]), torch.ones(4, dtype=F64)),
    )


def labelled(process: sd.Process) -> sd.Denoiser:
    """One exact x0-net ``net(x, t, y)``: ``y`` = 0 or 1 a class, ``NULL`` the unconditional law."""
    c0, c1, full = two_class()

    def net(x: torch.Tensor, t: torch.Tensor, y: int) -> torch.Tensor:
        law = full if y == NULL else (c0, c1)[y]
        if bool((t == t[0]).all()):
            return law.denoise(x, float(process.alpha(t[0])), float(process.sigma(t[0])))
        rows = [
            law.denoise(x[k : k + 1], float(process.alpha(tk)), float(process.sigma(tk)))
            for k, tk in enumerate(t)
        ]
        return torch.cat(rows)  # per-sample times

    return sd.Denoiser(net, process, prediction="x0", shape=(2,))


class Impulse:
    """A noise source returning, at its ``k``-th call, a unit impulse in batch row ``k + 2`` (zeros
    elsewhere): row 0 then carries a sampler's affine offset, row 1 its response to ``x_T`` and row
    ``k + 2`` its response to the ``k``-th draw."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(like)
        z[self.calls + 2] = 1.0
        self.calls += 1
        return z


def affine_law(run, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact output mean and variance of a sampler that is affine in ``(x_T, noise)`` (Gaussian data),
    for ``x_T ~ N(0, I)``: ``run(x_T, noise_source)`` makes ``draws`` noise draws."""
    x = torch.zeros(draws + 2, 1, dtype=F64)
    x[1] = 1.0
    source = Impulse()
    out = run(x, source)
    assert source.calls == draws
    return out[0, 0], ((out[1:, 0] - out[0, 0]) ** 2).sum()


@pytest.fixture(scope="module")
def den(sd_process):
    return labelled(sd_process)


def _grad_log(law: sd.toy.GaussianMixture, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(law.log_prob(xr, a, s).sum(), xr)
    return g


# --- the CFG score is the score of the gamma-powered density -------------------------------------


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0, 7.5])
def test_cfg_is_the_powered_score(sd_process, den, w):
    _, c1, full = two_class()
    guided = CFG(den, den, w, uncond_kwargs={"y": NULL})
    x = 2 * torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    for t in (999.0, 700.0, 300.0, 40.0, 5.0):
        a, s = float(sd_process.alpha(t)), float(sd_process.sigma(t))
        score = w * _grad_log(c1, x, a, s) + (1 - w) * _grad_log(full, x, a, s)
        pred = guided(x, t, y=1)
        assert guided.cost == (1 if w in (0.0, 1.0) else 2)
        # measured <= 2.0e-13 (relative)
        assert float((pred.eps + s * score).abs().max() / (s * score).abs().max()) < 1e-11


def test_scale_one_and_zero_are_the_conditional_and_unconditional_denoisers(den):
    x_T = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = {"steps": 12, "solver": "dpmpp_2m", "return_info": True}
    cond, info_c = sd.sample(den, x_T, y=1, **kw)
    uncond, _ = sd.sample(den, x_T, y=NULL, **kw)
    one, info_1 = sd.sample(CFG(den, den, 1.0, uncond_kwargs={"y": NULL}), x_T, y=1, **kw)
    zero, info_0 = sd.sample(CFG(den, den, 0.0, uncond_kwargs={"y": NULL}), x_T, y=1, **kw)
    assert float((one - cond).abs().max()) <= 1e-12 and float((zero - uncond).abs().max()) <= 1e-12
    assert info_1.nfe == info_0.nfe == info_c.nfe == 12  # one net where one estimate suffices


@pytest.mark.parametrize("name", sd.solvers.available())
def test_cfg_composes_with_every_solver(den, name):
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

    def run(d: sd.Denoiser, **cond):
        return sd.sample(
            d, x_T, steps=6, solver=name, generator=torch.Generator().manual_seed(7), return_info=True, **cond
        )

    plain, info = run(den, y=1)
    guided, info_g = run(CFG(den, den, 3.0, uncond_kwargs={"y": NULL}), y=1)
    one, info_1 = run(CFG(den, den, 1.0, uncond_kwargs={"y": NULL}), y=1)
    assert bool(torch.isfinite(guided).all())
    assert info_g.nfe == 2 * info.nfe == 2 * info.solver.nfe(6)
    assert info_1.nfe == info.nfe and torch.equal(one, plain)
    assert float((guided - plain).abs().max()) > 1e-3  # guidance did something


# --- CFG-rescale ----------------------------------------------------------------------------------


def _std(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).std(dim=1)


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_rescale_matches_the_conditional_std(den, space):
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    plain = CFG(den, den, 6.0, uncond_kwargs={"y": NULL})
    full = CFG(den, den, 6.0, uncond_kwargs={"y": NULL}, rescale=1.0, rescale_space=space)
    mixed = CFG(den, den, 6.0, uncond_kwargs={"y": NULL}, rescale=0.7, rescale_space=space)
    for t in (900.0, 400.0, 50.0):
        pc, pg = den(x, t, y=1), plain(x, t, y=1)
        a, s = pc.alpha, pc.sigma

        def get(p: sd.Prediction, a: float = a, s: float = s) -> torch.Tensor:
            return {"x0": p.x0, "eps": p.eps, "v": a * p.eps - s * p.x0}[space]

        ratio = (_std(get(pc)) / _std(get(pg)))[:, None]
        assert torch.allclose(_std(get(full(x, t, y=1))), _std(get(pc)), rtol=1e-12)  # Lin et al. Eq. 15
        assert torch.allclose(get(full(x, t, y=1)), get(pg) * ratio, rtol=1e-12, atol=1e-13)
        assert torch.allclose(get(mixed(x, t, y=1)), get(pg) * (0.7 * ratio + 0.3), rtol=1e-12, atol=1e-13)


def test_scale_zero_with_rescale_is_the_unconditional_prediction_rescaled(den):
    """``w = 0`` with CFG-rescale is the unconditional prediction at the conditional one's std (Lin et al.
    Eq. 15-16 at ``w = 0``): both branches, cost 2 before and after a call. Returning the unconditional
    prediction as it is, and a cost of 1 before the first call, passed every other test."""
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    guided = CFG(den, den, 0.0, uncond_kwargs={"y": NULL}, rescale=0.7)
    assert guided.cost == 2
    for t in (900.0, 400.0, 50.0):
        pc, pu = den(x, t, y=1), den(x, t, y=NULL)
        ratio = (_std(pc.x0) / _std(pu.x0))[:, None]
        assert float((ratio - 1).abs().max()) > 0.1  # the rescale moves the samples the classes disagree on
        torch.testing.assert_close(guided(x, t, y=1).x0, pu.x0 * (0.7 * ratio + 0.3), rtol=1e-12, atol=1e-13)
        assert guided.cost == 2


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_rescale_matches_diffusers_on_the_raw_output(sd_process, prediction):
    """diffusers' ``guidance_rescale`` (``rescale_noise_cfg``, applied to the net's raw eps or v output) is
    ``rescale_space=prediction``: equal to rounding on fixed eps / v nets of image-shaped samples."""
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    g = torch.Generator().manual_seed(4)
    out_c, out_u = (torch.randn(4, 3, 4, 4, dtype=F64, generator=g) for _ in range(2))
    cond = sd.Denoiser(lambda x, t: out_c, sd_process, prediction=prediction)
    uncond = sd.Denoiser(lambda x, t: out_u, sd_process, prediction=prediction)
    x = torch.randn(4, 3, 4, 4, dtype=F64, generator=g)
    pred = CFG(cond, uncond, 5.0, rescale=0.7, rescale_space=prediction)(x, 400.0)
    theirs = guider_utils.rescale_noise_cfg(out_u + 5.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
    ours = pred.eps if prediction == "eps" else pred.alpha * pred.eps - pred.sigma * pred.x0
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_rescale_one_entry_and_zero_spread(sd_process):
    """Lin et al.'s std is over all entries (population std): with one entry per sample both stds are 0,
    and a sample whose guided prediction has no spread is left unrescaled -- finite, not 0/0."""
    c = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 2.0]], dtype=F64)
    u = torch.tensor([[1.0, 1.0], [0.5, 0.0], [0.5, 0.5]], dtype=F64)
    w, phi = 3.0, 0.7
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    for cols in ([0], [0, 1]):  # (B, 1): one entry per row; (B, 2): row 0 has a constant guided x0
        cc, uu = c[:, cols], u[:, cols]
        guided = CFG(_fixed(cc, sd_process), _fixed(uu, sd_process), w, rescale=phi)(x[:, cols], 500.0).x0
        plain = uu + w * (cc - uu)
        if len(cols) == 1:  # both stds are 0: the plain CFG estimate
            torch.testing.assert_close(guided, plain, rtol=0, atol=1e-15)
            continue
        # row 0: guided [1, 1] (std 0), unrescaled; rows 1, 2 by hand: population stds 1 / 2.5 and 1 / 3
        ratio = torch.tensor([1.0, 1.0 / 2.5, 1.0 / 3.0], dtype=F64)[:, None]
        expected = torch.cat([plain[:1], plain[1:] * (phi * ratio[1:] + 1 - phi)])
        assert plain[1].tolist() == [2.0, -3.0] and plain[2].tolist() == [-1.0, 5.0]
        torch.testing.assert_close(guided, expected, rtol=1e-14, atol=1e-15)


# --- guidance interval ----------------------------------------------------------------------------


def test_interval_guides_inside_only(sd_process, den):
    lo, hi = 0.5, 3.0
    guided = CFG(den, den, 4.0, uncond_kwargs={"y": NULL}, interval=(lo, hi))
    plain = CFG(den, den, 4.0, uncond_kwargs={"y": NULL})
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    seen = set()
    for t in (999.0, 800.0, 600.0, 400.0, 200.0, 100.0, 20.0):
        r = float(sd_process.sigma(t) / sd_process.alpha(t))
        inside = lo < r <= hi
        seen.add(inside)
        ref = plain(x, t, y=1) if inside else den(x, t, y=1)
        assert torch.equal(guided(x, t, y=1).eps, ref.eps) and guided.cost == (2 if inside else 1)
    assert seen == {True, False}
    # per-sample times: row by row as above
    ts = torch.tensor([999.0, 400.0, 100.0, 400.0, 20.0, 800.0, 600.0, 200.0], dtype=F64)
    for g in (guided, CFG(den, den, 0.0, uncond_kwargs={"y": NULL}, interval=(lo, hi))):
        rows = torch.cat([g(x[k : k + 1], float(ts[k]), y=1).eps for k in range(8)])
        assert torch.allclose(g(x, ts, y=1).eps, rows, rtol=1e-12, atol=1e-14) and g.cost == 2
    # the NFE counts 2 at the nodes inside, 1 outside
    _, info = sd.sample(guided, x, steps=20, solver="ddim", return_info=True, y=1)
    ratios = [s / a for s, a in zip(info.grid.sigma[:-1], info.grid.alpha[:-1], strict=True)]
    assert info.nfe == sum(2 if lo < r <= hi else 1 for r in ratios) and 20 < info.nfe < 40


def test_interval_is_open_below_and_closed_above():
    """Kynkaanniemi et al. guide where ``lo < sigma / alpha <= hi``: at ``sigma = hi`` exactly (EDM, where
    ``sigma / alpha`` is the time itself) the step is guided, at ``sigma = lo`` it is the conditional one;
    per-sample times row by row likewise (a half-open boundary the other way passed every other test)."""
    _, c1, full = two_class()
    proc = sd.EDM()
    cond, uncond = c1.denoiser(proc), full.denoiser(proc)
    lo, hi = 0.5, 2.0
    guided = CFG(cond, uncond, 3.0, interval=(lo, hi))
    plain = CFG(cond, uncond, 3.0)
    x = 2 * torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    for t, inside in ((lo, False), (hi, True), (1.0, True), (4.0, False)):
        ref = plain(x, t) if inside else cond(x, t)
        assert torch.equal(guided(x, t).x0, ref.x0) and guided.cost == (2 if inside else 1)
    ts = torch.tensor([lo, hi, 1.0, 4.0], dtype=F64)
    out = guided(x, ts)
    for k, inside in enumerate((False, True, True, False)):
        ref = (plain if inside else cond)(x[k : k + 1], float(ts[k]))
        torch.testing.assert_close(out.x0[k : k + 1], ref.x0, rtol=1e-12, atol=1e-14)


def test_interval_rows_outside_keep_the_conditional_x0_at_zero_snr():
    """Per-sample times, some outside the interval: those rows are the conditional prediction itself, the
    x0 a v-net holds, also in float32 where alpha is tiny (zero terminal SNR). Before, every row was
    rebuilt from eps, x0 -> eps -> x0 through x: 2.6e-4 relative off the conditional x0 at t = 999."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    proc = sd.VP.discrete(betas=betas, rescale_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    mu, w = torch.randn(16, generator=g, dtype=F64), torch.randn(16, 16, generator=g, dtype=F64) / 4

    def net(v: torch.Tensor, t: torch.Tensor, c: float = 1.0) -> torch.Tensor:
        a, s = proc.alpha(t.double())[:, None], proc.sigma(t.double())[:, None]
        v64 = v.double()
        x0 = c * mu + a * (v64 - a * mu) + 0.1 * torch.tanh(v64 @ w)
        return (a * (v64 - a * x0) / s - s * x0).to(v.dtype)

    den = sd.Denoiser(net, proc, "v")
    cfg = CFG(den, den, 3.0, uncond_kwargs={"c": 0.0}, interval=(0.28, 2.9))
    t = torch.tensor([999.0, 999.0, 300.0, 300.0], dtype=F64)  # sigma / alpha: 4096 (outside), 0.88 (inside)
    x = torch.randn(4, 16, generator=g, dtype=torch.float32)
    out, cond = cfg(x, t), den(x, t)
    assert torch.equal(out.x0[:2], cond.x0[:2])
    inside = CFG(den, den, 3.0, uncond_kwargs={"c": 0.0})(x[2:], 300.0)
    torch.testing.assert_close(out.x0[2:], inside.x0, rtol=1e-6, atol=1e-6)


def test_interval_rows_outside_keep_an_eps_nets_eps_under_rescale():
    """The same for an eps net near the clean end, with CFG-rescale in x0 (which derives the conditional
    x0 before the rows are merged): rows outside are the conditional eps itself in float32 (1.0e-4
    relative off when the derived x0 was merged and eps derived back through x)."""
    proc = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=F64) / 4

    def net(v: torch.Tensor, t: torch.Tensor, c: float = 1.0) -> torch.Tensor:
        return (0.5 * torch.tanh(v.double() @ w) + 0.2 * c).to(v.dtype)

    den = sd.Denoiser(net, proc, "eps")
    cfg = CFG(den, den, 3.0, uncond_kwargs={"c": 0.0}, interval=(0.28, 2.9), rescale=0.5)
    t = torch.tensor([0.0, 0.0, 300.0, 300.0], dtype=F64)  # sigma / alpha: 0.01 (outside), 1.24 (inside)
    x = 3 * torch.randn(4, 16, generator=g, dtype=torch.float32)
    out = cfg(x, t)
    assert torch.equal(out.eps[:2], den(x, t).eps[:2])
    inside = CFG(den, den, 3.0, uncond_kwargs={"c": 0.0}, rescale=0.5)(x[2:], 300.0)
    torch.testing.assert_close(out.eps[2:], inside.eps, rtol=1e-5, atol=1e-5)


# --- CADS -----------------------------------------------------------------------------------------


def test_the_interval_ends_are_no_breaks_the_guided_default_is_better_without(gmm, sd_process, monkeypatch):
    """CFG at scale 4 toward two of the tests' mixture's four components within EDM2-S's interval ``(0.28,
    2.9]`` (Kynkaenniemi et al. 2024), SD betas, ``time_uniform``, against the exact guided ODE (DOP853
    piecewise between the interval's ends). CFG declares no break, so ``sd.sample`` does not restart a
    multistep solver's history at the ends: the guided default (DPM-Solver++(2M) here) is at 0.0454 / 0.0162
    / 0.00705 at 10 / 20 / 40 steps, its one-step history through the jump acting as a trapezoid rule across
    it; with the ends as breaks (the restart) it would be at 0.0630 / 0.0187 / 0.0125 (measured). UniPC-3
    would gain (0.0495 / 0.0203 / 0.0109 with the restart; it stalls at 0.0474 / 0.0246 / 0.0331 without),
    the default is what the choice serves (``python bench/breaks.py``: 1.7x over 24 cases)."""
    part = sd.toy.GaussianMixture(gmm.means[:2], gmm.variances[:2], gmm.weights[:2])
    cond, uncond = part.denoiser(sd_process), gmm.denoiser(sd_process)
    cfg = CFG(cond, uncond, 4.0, interval=(0.28, 2.9))
    guided = CFG(cond, uncond, 4.0)
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert cfg.breaks() == ()
    p = sd_process
    ends = [float(p.t_of_lam(-math.log(r))) for r in (0.28, 2.9)]

    def pieces(t):
        return guided if 0.28 < float(p.sigma(t) / p.alpha(t)) <= 2.9 else cond

    exact = piecewise_ode(pieces, p, x_T, p.t_max, p.t_min, ends)

    def errors(solver):
        return [
            rel_rmse(sd.sample(cfg, x_T, n, solver, "time_uniform", final="none"), exact)
            for n in (10, 20, 40)
        ]

    default, unipc = errors(None), errors("unipc")
    assert default == pytest.approx((0.04540, 0.01620, 0.00705), rel=0.01)
    assert unipc == pytest.approx((0.04740, 0.02460, 0.03310), rel=0.01)
    monkeypatch.setattr(CFG, "own_breaks", lambda self: tuple(ends), raising=False)  # the restart at the ends
    restarted, unipc_restarted = errors(None), errors("unipc")
    assert restarted == pytest.approx((0.06300, 0.01872, 0.01248), rel=0.01)
    assert unipc_restarted == pytest.approx((0.04947, 0.02032, 0.01090), rel=0.01)
    assert all(d < r for d, r in zip(default, restarted, strict=True))


def test_cads_schedule_and_rescaling():
    cads = CADS("emb", noise_scale=0.25, tau1=0.6, tau2=0.9, generator=torch.Generator().manual_seed(0))
    assert [cads.gamma(u) for u in (0.0, 0.6, 0.75, 0.84, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0.2, 0, 0])
    y = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert cads.anneal(y, 0.3) is y  # gamma = 1: the condition as given
    for u in (0.75, 0.95):
        out = cads.anneal(y, u)
        assert not torch.allclose(out, y)
        assert torch.allclose(out.mean(1), y.mean(1), atol=1e-14) and torch.allclose(_std(out), _std(y))
    # psi = 0: sqrt(gamma) y + s sqrt(1 - gamma) n, with n the generator's next draw
    raw = CADS("emb", 0.25, psi=0.0, generator=torch.Generator().manual_seed(9)).anneal(y, 0.84)
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert torch.allclose(raw, math.sqrt(0.2) * y + 0.25 * math.sqrt(0.8) * n, rtol=1e-14)


def test_cads_in_cfg(sd_process):
    _, c1, full = two_class()
    seen: list[tuple[float, torch.Tensor]] = []

    def net(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        tt = float(t.reshape(-1)[0])
        seen.append((tt, emb))
        law = full if bool((emb == 0).all()) else c1
        return law.denoise(x, float(sd_process.alpha(tt)), float(sd_process.sigma(tt))) + 0.1 * emb[:, :2]

    den = sd.Denoiser(net, sd_process, prediction="x0")
    emb = torch.randn(6, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    null = {"emb": torch.zeros_like(emb)}
    plain = sd.sample(CFG(den, den, 3.0, uncond_kwargs=null), x_T, steps=10, solver="ddim", emb=emb)
    off = sd.sample(
        CFG(den, den, 3.0, uncond_kwargs=null, cads=CADS("emb", 0.0)), x_T, steps=10, solver="ddim", emb=emb
    )
    assert torch.equal(off, plain)  # noise scale 0: plain CFG
    # a seeded run with a CADS drawing from torch's global RNG is refused (not reproducible by its seed)
    with pytest.raises(ValueError, match=r"generator: CADS .* global RNG"):
        sd.sample(
            CFG(den, den, 3.0, uncond_kwargs=null, cads=CADS("emb", 0.5)), x_T, steps=10, solver="ddim",
            generator=torch.Generator(), emb=emb,
        )  # fmt: skip
    seen.clear()
    cads = CADS("emb", 0.5, generator=torch.Generator().manual_seed(4))
    annealed = sd.sample(
        CFG(den, den, 3.0, uncond_kwargs=null, cads=cads), x_T, steps=10, solver="ddim", emb=emb
    )
    assert float((annealed - plain).abs().max()) > 1e-3
    span = sd_process.t_max - sd_process.t_min
    conditional = [(t, e) for t, e in seen if not bool((e == 0).all())]
    assert len(conditional) == 10
    for t, e in conditional:
        if (t - sd_process.t_min) / span <= 0.6:
            assert e is emb
        else:
            assert not torch.equal(e, emb) and torch.allclose(_std(e), _std(emb))


def test_cads_normalizes_the_time_over_the_process_range():
    """CADS's ``u`` is ``(t - t_min) / (t_max - t_min)``: on a process whose range starts far from 0
    (VP.linear on ``[0.5, 1]``) ``t = 0.875`` is ``u = 0.75``, ``gamma = 0.5``, and the conditional net sees
    ``sqrt(0.5) y + s sqrt(0.5) n`` (``psi = 0``), also per sample (``t = 0.98``: ``u = 0.96``,
    ``gamma = 0``). Dividing by ``t_max`` alone (``u = 0.375``, ``gamma = 1``) passed every other test,
    whose processes start at 0."""
    proc = sd.VP.linear(t_min=0.5)
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        seen.append(emb)
        return torch.zeros_like(x) + emb[:, :2]

    den = sd.Denoiser(net, proc, prediction="x0")
    emb = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    null = {"emb": torch.zeros_like(emb)}
    for t, gamma in ((0.875, torch.full((3, 1), 0.5, dtype=F64)),
                     (torch.tensor([0.875, 0.98, 0.6], dtype=F64),
                      torch.tensor([[0.5], [0.0], [1.0]], dtype=F64))):  # fmt: skip
        cads = CADS("emb", 0.25, psi=0.0, generator=torch.Generator().manual_seed(9))
        seen.clear()
        CFG(den, den, 3.0, uncond_kwargs=null, cads=cads)(x, t, emb=emb)
        n = torch.randn(emb.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
        want = gamma.sqrt() * emb + 0.25 * (1 - gamma).sqrt() * n
        torch.testing.assert_close(seen[0], want, rtol=1e-14, atol=1e-14)
        assert torch.equal(seen[1], null["emb"])  # the unconditional call is not annealed


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_cads_takes_one_generator_per_row(sd_process):
    """A list of generators, one per row of the condition: row ``b``'s noise is ``generator[b]``'s,
    and under ``sd.sample``'s per-row list row ``b`` of a batch is that row alone. One CADS generator
    under a per-row list makes each row depend on the batch (measured before: 0.25 from the row
    alone, CFG 3 + CADS 0.25, 30 DDPM steps): refused, naming both (also by ``pcg``)."""
    _, c1, full = two_class()

    def net(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        tt = float(t.reshape(-1)[0])
        law = full if bool((emb == 0).all()) else c1
        return law.denoise(x, float(sd_process.alpha(tt)), float(sd_process.sigma(tt))) + 0.1 * emb[:, :2]

    den = sd.Denoiser(net, sd_process, prediction="x0")
    emb = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    # psi = 0: row b is sqrt(gamma) y_b + s sqrt(1 - gamma) n_b, n_b generator[b]'s draw
    raw = CADS("emb", 0.25, psi=0.0, generator=_gens([5, 6, 7, 8])).anneal(emb, 0.84)
    n1 = torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=F64)
    torch.testing.assert_close(
        raw[1], math.sqrt(0.2) * emb[1] + 0.25 * math.sqrt(0.8) * n1, rtol=1e-14, atol=0
    )

    def guided(cads: CADS, rows: list[int]) -> CFG:
        return CFG(den, den, 3.0, uncond_kwargs={"emb": torch.zeros(len(rows), 8, dtype=F64)}, cads=cads)

    def run(rows: list[int]) -> torch.Tensor:
        cads = CADS("emb", 0.5, generator=_gens([100 + r for r in rows]))
        return sd.sample(guided(cads, rows), x_T[rows], 10, "ddpm", generator=_gens(rows), emb=emb[rows])

    batch = run([0, 1, 2, 3])
    for r in (0, 3):
        torch.testing.assert_close(batch[r : r + 1], run([r]), rtol=0, atol=1e-12)

    one = guided(CADS("emb", 0.5, generator=torch.Generator().manual_seed(4)), [0, 1, 2, 3])
    words = r"generator: one generator per row .* CADS draws the whole batch from one torch\.Generator"
    with pytest.raises(ValueError, match=words):
        sd.sample(one, x_T, 10, "ddpm", generator=_gens([0, 1, 2, 3]), emb=emb)
    with pytest.raises(ValueError, match=words):
        pcg(
            one,
            den,
            x_T,
            4,
            2.0,
            uncond_kwargs={"emb": torch.zeros_like(emb)},
            generator=_gens([0, 1, 2, 3]),
            emb=emb,
        )
    with pytest.raises(
        ValueError, match=r"CADS: generator must be None, a torch\.Generator or a non-empty list"
    ):
        CADS("emb", 0.5, generator=7)


# --- predictor-corrector guidance (Bradley & Nakkiran 2024) --------------------------------------

MC, VC, MU, VU = 1.0, 0.25, -0.5, 1.5  # conditional N(1, 0.25), unconditional N(-0.5, 1.5)


def _sde_limit(process: sd.Process, w: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Mean and variance at ``t_min`` of the reverse SDE with the CFG score at scale ``w`` from
    ``N(0, 1)`` at ``t_max`` (Gaussian scores: ``dm/dt = f m + g^2 (A m - Ab)``,
    ``dv/dt = 2 f v + 2 g^2 A v - g^2``), and those of the powered law ``p^{c,w}`` at ``t_min``."""

    def coef(t: float) -> tuple[float, float, float, float]:
        a, s = float(process.alpha(t)), float(process.sigma(t))
        f = float(process.d_alpha(t)) / a
        g2 = 2 * s * float(process.d_sigma(t)) - 2 * f * s * s
        vc, vu = a * a * VC + s * s, a * a * VU + s * s
        return f, g2, w / vc + (1 - w) / vu, w * a * MC / vc + (1 - w) * a * MU / vu

    def rhs(t: float, y: list[float]) -> list[float]:
        f, g2, prec, shift = coef(t)
        return [f * y[0] + g2 * (prec * y[0] - shift), 2 * f * y[1] + 2 * g2 * prec * y[1] - g2]

    sol = solve_ivp(rhs, (process.t_max, process.t_min), [0.0, 1.0], method="DOP853", rtol=1e-11, atol=1e-12)
    _, _, prec, shift = coef(process.t_min)
    return (float(sol.y[0, -1]), float(sol.y[1, -1])), (shift / prec, 1 / prec)


@pytest.mark.parametrize("w", [2.0, 4.0])
def test_pcg_and_cfg_ddpm_share_the_sde_limit(w):
    """CFG-DDPM at scale ``w`` and PCG (DDIM on ``p(x|c)`` + one Langevin move on ``p^{c, 2w-1}``)
    both converge, at first order, to the reverse SDE with the CFG score, which is not the powered law.
    Exact output moments (Gaussian data: both samplers are affine in their noise)."""
    proc = sd.VP.linear()
    cond = sd.toy.GaussianMixture([[MC]], [[VC]], [1.0]).denoiser(proc)
    uncond = sd.toy.GaussianMixture([[MU]], [[VU]], [1.0]).denoiser(proc)
    limit, powered = _sde_limit(proc, w)
    kw = {"schedule": "logsnr_uniform", "final": "none"}
    errors = {}
    for n in (50, 200):
        ddpm = affine_law(
            lambda x, z, n=n: sd.sample(CFG(cond, uncond, w), x, n, "ddpm", generator=z, **kw), n
        )
        pc = affine_law(lambda x, z, n=n: pcg(cond, uncond, x, n, 2 * w - 1, generator=z, **kw), n)
        for name, (m, v) in (("ddpm", ddpm), ("pcg", pc)):
            errors[name, n] = max(abs(float(m) - limit[0]), abs(float(v) - limit[1]))
    # measured (w=2): ddpm 2.1e-2 -> 5.8e-3, pcg 4.4e-3 -> 1.2e-3; (w=4): 1.0e-2 -> 2.8e-3, 3.1e-3 -> 7.6e-4
    for name in ("ddpm", "pcg"):
        assert errors[name, 50] / errors[name, 200] > 3.0 and errors[name, 200] < 6e-3
    gap = max(abs(powered[0] - limit[0]), abs(powered[1] - limit[1]))
    assert gap > 5 * max(errors["ddpm", 200], errors["pcg", 200])  # measured: 0.11 (w=2), 0.084 (w=4)


@pytest.mark.parametrize("accelerator", [False, True])
def test_pcg_names_the_first_nan_on_an_accelerator_too(sd_process, monkeypatch, accelerator):
    """A NaN at the net's 4th call, pcg's predictor at step 1 (t = 905): the CPU stops there; on an
    accelerator (faked: tensors not CPU ones) the deferred check must name the same evaluation, not the
    corrector's later one at step 1 that the NaN spoiled next (t = 787; found on an H100)."""
    calls = 0

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return 0.1 * x * (math.nan if calls == 4 else 1.0)

    if accelerator:
        monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    den = sd.Denoiser(net, sd_process, "eps")
    with pytest.raises(sd.NonFiniteError, match=r"step 1 \(evaluation 2, process time t=905\.07"):
        pcg(den, den, torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), 8, 2.0)


def test_pcg_nfe_and_gamma_one(den):
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    _, info = pcg(
        den,
        den,
        x_T,
        10,
        3.0,
        langevin_steps=2,
        uncond_kwargs={"y": NULL},
        generator=torch.Generator(),
        return_info=True,
        y=1,
    )
    assert info.nfe == 10 + 9 * 2 * 2 and len(info.corrector) == 9  # no correction at the clean end
    for gamma in (1.0, 0.0):  # one branch of CFG per move (the docstring said 2 for gamma = 0)
        _, info = pcg(
            den,
            den,
            x_T,
            10,
            gamma,
            uncond_kwargs={"y": NULL},
            generator=torch.Generator(),
            return_info=True,
            y=1,
        )
        assert info.nfe == 10 + 9


def test_pcg_refuses_a_brownian_tree_and_takes_one_generator_per_row(den):
    """PCG's only noise is its Langevin moves' at fixed times, where a Brownian tree has none (before:
    the run was silently noiseless, equal to one with zero noise): refused, naming ``pcg``. One
    generator per row: row ``b`` of a batch is the row alone."""
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    kw = {"uncond_kwargs": {"y": NULL}, "y": 1}
    tree = sd.noise.BrownianTreeNoise(x_T, den.process.t_min, den.process.t_max, seed=1)
    with pytest.raises(ValueError, match=r"pcg: generator is a Brownian tree, which has no noise at a fixed"):
        pcg(den, den, x_T, 10, 3.0, generator=tree, **kw)
    batch = pcg(den, den, x_T, 10, 3.0, generator=_gens([0, 1, 2, 3]), **kw)
    torch.testing.assert_close(
        batch[2:3], pcg(den, den, x_T[2:3], 10, 3.0, generator=_gens([2]), **kw), rtol=0, atol=1e-12
    )
    assert (
        float((batch[2:3] - pcg(den, den, x_T[2:3], 10, 3.0, generator=_gens([9]), **kw)).abs().max()) > 1e-2
    )


def test_pcg_passes_a_net_condition_named_cond(den):
    """``cond`` and ``uncond`` are positional-only: a net whose condition is called ``cond`` (latent
    diffusion's ``apply_model(x, t, cond)``) gets it from ``**kwargs`` and ``uncond_kwargs`` (before: a
    TypeError, multiple values for ``cond``), bit for bit the run of two nets with the class baked in."""
    seen = []

    def net(x: torch.Tensor, t: torch.Tensor, cond: int) -> torch.Tensor:
        seen.append(cond)
        return den.net(x, t, cond)

    def baked(y: int) -> sd.Denoiser:
        return sd.Denoiser(lambda x, t: den.net(x, t, y), den.process, "x0", shape=(2,))

    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    named = sd.Denoiser(net, den.process, "x0", shape=(2,))
    out = pcg(named, named, x_T, 6, 3.0, uncond_kwargs={"cond": NULL}, generator=_gens([0, 1, 2, 3]), cond=1)
    assert sorted(set(seen)) == [NULL, 1] and len(seen) == 6 + 5 * 2
    assert torch.equal(out, pcg(baked(1), baked(NULL), x_T, 6, 3.0, generator=_gens([0, 1, 2, 3])))


@pytest.mark.parametrize("steps", [0, 2.5, "10"])  # None: the default 10 (test_steps_count)
def test_pcg_names_a_bad_steps(den, steps):
    """It was named ``make_grid: steps``, the internal function's."""
    x_T = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"^pcg: steps must be an integer >= 1, got"):
        pcg(den, den, x_T, steps, 3.0, uncond_kwargs={"y": NULL}, y=1)


@pytest.mark.parametrize(
    ("dtype", "change", "message"),
    [
        (
            torch.float32,
            {"gamma": 1e39},
            r"gamma must be at most 3\.403e\+38 in magnitude, the largest float32",
        ),
        (
            torch.float16,
            {"gamma": 1e39},
            r"gamma must be at most 3\.403e\+38 in magnitude, the largest float32",
        ),
        (F64, {"uncond": 3}, r"uncond must be a steerdiff Denoiser, got int"),
        (F64, {"cond": None}, r"cond must be a steerdiff Denoiser, got NoneType"),
        (F64, {"uncond": labelled(sd.VP.cosine())}, r"cond and uncond must share a process, got VP"),
        (F64, {"uncond_kwargs": [NULL]}, r"uncond_kwargs must be a dict, got list"),
        (F64, {"uncond_kwargs": {"y": torch.full((3,), NULL)}}, r"uncond_kwargs\['y'\] has 3 rows, but"),
        (F64, {"final": "nope"}, r"final must be one of \['zero', 'none'\], got 'nope'"),
    ],
    ids=["gamma-float32", "gamma-float16", "uncond", "cond", "process", "uncond_kwargs", "rows", "final"],
)
def test_pcg_names_its_own_arguments(den, dtype, change, message):
    """Errors about pcg's arguments name pcg and the argument: they named the CFG it builds
    (``CFG: scale``, raised at the first Langevin move, for a gamma beyond float32 in its float32 run;
    ``CFG: uncond_kwargs['y']``, ``CFG: cond``...) or ``make_grid: final``."""
    args = {"cond": den, "uncond": den, "uncond_kwargs": {"y": NULL}, **change}
    gamma = args.pop("gamma", 3.0)
    x_T = torch.zeros(4, 2, dtype=dtype)
    with pytest.raises(ValueError, match=rf"^pcg: {message}"):
        pcg(args.pop("cond"), args.pop("uncond"), x_T, 4, gamma, y=torch.ones(4, dtype=torch.long), **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pcg_half_precision_runs_only_the_nets_in_half(sd_process, dtype):
    """A half-precision ``x_T``: exactly a float32 run (steps, Langevin moves and the CFG combination in
    float32) whose nets round their input and output to ``dtype``, returned in ``dtype``."""
    c0, _, full = two_class()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(6)).to(dtype)
    runs = []
    for rounding, x in ((None, x_T), (dtype, x_T.float())):
        cond, uncond = (
            sd.Denoiser(half_net(law, sd_process, round_input=rounding), sd_process) for law in (c0, full)
        )
        runs.append(
            pcg(cond, uncond, x, 8, 3.0, langevin_steps=2, generator=torch.Generator().manual_seed(2))
        )
    assert runs[0].dtype == dtype and runs[1].dtype == torch.float32
    assert torch.equal(runs[0], runs[1].to(dtype))


# --- dynamic thresholding -------------------------------------------------------------------------


def _fixed(x0: torch.Tensor, process: sd.Process) -> sd.Denoiser:
    return sd.Denoiser(lambda x, t: x0, process, prediction="x0")


def test_dynamic_threshold_values(sd_process):
    x0 = torch.tensor(
        [[0.5, -1.0, 2.0, -4.0, 3.0], [0.2, -0.4, 0.9, 0.1, -0.3], [5.0, -6.0, 7.0, 8.0, 9.0]], dtype=F64
    )
    x, t = torch.randn(3, 5, dtype=F64), 500.0
    # p = 0.75 of 5 sorted |values|: position 3 -> 3.0, (s < 1 -> 1), 8.0
    pred = DynamicThreshold(_fixed(x0, sd_process), 0.75)(x, t)
    expected = torch.stack([x0[0].clamp(-3, 3) / 3, x0[1], x0[2].clamp(-8, 8) / 8])
    assert torch.allclose(pred.x0, expected, rtol=1e-15)
    assert torch.allclose(pred.eps, (x - pred.alpha * expected) / pred.sigma, rtol=1e-13)
    # p = 0.6: position 2.4 -> 2 + 0.4 (3 - 2) = 2.4 in row 0, 7.4 in row 2, there capped at max_value 5
    pred = DynamicThreshold(_fixed(x0, sd_process), 0.6, max_value=5.0)(x, t)
    assert torch.allclose(pred.x0[0], x0[0].clamp(-2.4, 2.4) / 2.4, rtol=1e-14)
    assert torch.equal(pred.x0[2], torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0], dtype=F64))
    # static clipping
    pred = DynamicThreshold(_fixed(x0, sd_process), None, max_value=1.5)(x, t)
    assert torch.equal(pred.x0, x0.clamp(-1.5, 1.5))


def test_dynamic_threshold_matches_diffusers(sd_process):
    diffusers = pytest.importorskip("diffusers")
    x0 = 2.5 * torch.randn(4, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    ours = DynamicThreshold(_fixed(x0, sd_process), 0.9, max_value=3.0)(torch.randn_like(x0), 300.0).x0
    assert torch.allclose(ours, sched._threshold_sample(x0), rtol=1e-14)


def test_thresholded_sampling_stays_in_range(den):
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    x, info = sd.sample(
        DynamicThreshold(CFG(den, den, 5.0, uncond_kwargs={"y": NULL})),
        x_T,
        10,
        "dpmpp_2m",
        return_info=True,
        y=1,
    )
    assert float(x.abs().max()) <= 1.0 and info.nfe == 20  # the last step returns the thresholded x0
    unclipped = sd.sample(CFG(den, den, 5.0, uncond_kwargs={"y": NULL}), x_T, 10, "dpmpp_2m", y=1)
    assert float(unclipped.abs().max()) > 1.5


@pytest.mark.parametrize("percentile", [0.995, None], ids=["dynamic", "static"])
def test_threshold_keeps_an_inf_estimate_for_the_nan_check(sd_process, percentile):
    """A net returning inf in one entry of one sample at its 3rd call (fp16 overflow, say): the sampler
    names that step. Clipped, the entry became 1 (the 0.995-quantile of 1024 entries stays finite) and
    the run returned finite samples, silently."""
    calls = 0

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = 0.5 * torch.tanh(x)
        if calls == 3:
            out[0, 2] = math.inf
        return out

    den = DynamicThreshold(sd.Denoiser(net, sd_process, "x0"), percentile, None if percentile else 1.0)
    x_T = torch.randn(4, 1024, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(sd.NonFiniteError, match=r"NaN/inf at step 2 \(evaluation 3"):
        sd.sample(den, x_T, 6, "ddim")


# --- learned variance and NFE through wrappers ------------------------------------------------------


def learned_variance(process: sd.Process, dim: int = 2, seen: list | None = None) -> sd.Denoiser:
    """A smooth eps-net with Improved DDPM's learned variance (``2C`` outputs, the second half ``r`` in
    ``(-1, 1)``), depending on ``x``, ``t`` and a label ``y``; ``seen`` records the net's inputs."""

    def net(x: torch.Tensor, t: torch.Tensor, y: int = 0) -> torch.Tensor:
        if seen is not None:
            seen.append(x.detach().clone())
        u = t[:, None] / 1000
        eps = torch.tanh(0.8 * x + 0.3 * y) * (1 - 0.5 * u)
        r = 0.9 * torch.tanh(0.7 * x.flip(1) + u - 0.5 + 0.4 * y)
        return torch.cat([eps, r], 1)

    return sd.Denoiser(net, process, "eps", shape=(dim,), learned_variance=True)


def test_cfg_keeps_the_learned_variance(sd_process):
    """CFG of a learned-variance net with itself is the net: DDPM must use its learned variance, not
    fall back to fixed_small (before: up to 0.6 apart). With distinct branches the guided prediction
    carries the conditional branch's ``var_interp`` (diffusers' DiT convention)."""
    lv = learned_variance(sd_process)
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(4))

    def run(d: sd.Denoiser) -> torch.Tensor:
        return sd.sample(d, x_T, 20, "ddpm", generator=torch.Generator().manual_seed(5))

    plain = run(lv)
    fixed_small = sd.Denoiser(lambda x, t: lv.net(x, t)[:, :2], sd_process, "eps")
    assert float((plain - run(fixed_small)).abs().max()) > 0.1  # the variance matters here
    for guided in (
        CFG(lv, lv, 1.0),
        CFG(lv, lv, 3.0),
        CFG(lv, lv, 3.0, rescale=0.7),
        CFG(lv, lv, 3.0, interval=(0.5, 3.0)),
        CFG(lv, lv, 0.0, rescale=0.5),
    ):
        # measured 0 (1.6e-14 with rescale: the round trip through x0 at alpha ~ 0.07)
        assert float((run(guided) - plain).abs().max()) < 1e-12, guided
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    ts = torch.tensor([999.0, 400.0, 100.0, 400.0, 20.0], dtype=F64)  # per-sample, some outside
    for t in (900.0, 400.0, 50.0, ts):
        pc, pu = lv(x, t, y=1), lv(x, t, y=0)
        assert not torch.equal(pc.var_interp, pu.var_interp)
        for g in (
            CFG(lv, lv, 3.0, uncond_kwargs={"y": 0}),
            CFG(lv, lv, 3.0, uncond_kwargs={"y": 0}, rescale=0.7, rescale_space="v"),
            CFG(lv, lv, 3.0, uncond_kwargs={"y": 0}, interval=(0.5, 3.0)),
            DynamicThreshold(CFG(lv, lv, 3.0, uncond_kwargs={"y": 0}), 0.9),
        ):
            assert torch.equal(g(x, t, y=1).var_interp, pc.var_interp), (g, t)
        assert torch.equal(CFG(lv, lv, 0.0, uncond_kwargs={"y": 0})(x, t, y=1).var_interp, pu.var_interp)


def counting(process: sd.Process) -> tuple[sd.Denoiser, list[int]]:
    """An eps-net with a label, recording the rows of every call."""
    rows: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor, y: int = 0) -> torch.Tensor:
        rows.append(x.shape[0])
        return torch.tanh(0.8 * x + 0.3 * y)

    return sd.Denoiser(net, process, "eps", shape=(2,)), rows


def test_cfg_of_one_call_twice_warns_once(sd_process, caplog):
    """``CFG(den, den, w)`` with nothing that tells its branches apart returns the conditional prediction at
    two net calls per call (measured here): one warning per instance says so and how to give the
    unconditional branch. A CFG whose branches differ (``uncond_kwargs``, another denoiser, ``cads``) or that
    calls one branch (``w`` = 1, ``w`` = 0) logs none."""
    den, rows = counting(sd_process)
    other, _ = counting(sd_process)
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="steerdiff.guidance.cfg"):
        same = CFG(den, den, 4.0)
        rows.clear()
        preds = [same(x, t, y=1) for t in (900.0, 500.0, 50.0)]
        assert len(rows) == 6 and same.cost == 2  # two net calls per guided call
        for t, p in zip((900.0, 500.0, 50.0), preds, strict=True):
            assert torch.equal(p.eps, den(x, t, y=1).eps)  # the conditional prediction
        (record,) = [r for r in caplog.records if r.name == "steerdiff.guidance.cfg"]
        assert record.levelno == logging.WARNING
        message = record.getMessage()
        assert message.startswith(
            "CFG: uncond is cond and no uncond_kwargs tell the unconditional call apart"
        )
        assert "twice the NFE" in message and 'uncond_kwargs={"label": null}' in message
        assert "another denoiser as uncond" in message
        caplog.clear()
        CFG(den, den, 4.0, cads=CADS("y", 0.0))
        for quiet in (
            CFG(den, den, 4.0, uncond_kwargs={"y": NULL}),
            CFG(den, other, 4.0),
            CFG(den, den, 1.0),
            CFG(den, den, 0.0),
        ):
            quiet(x, 500.0, y=1)
        assert not caplog.records


def test_nested_wrappers_report_the_net_calls(sd_process):
    """A wrapper's cost is its base's at every call: around CFG with an interval (1 net call outside,
    2 inside) the reported NFE is the calls made (before: 2 per step)."""
    den, rows = counting(sd_process)
    inner = CFG(den, den, 3.0, uncond_kwargs={"y": 1}, interval=(0.5, 3.0))
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    grid = sd.solvers.make_grid(sd_process, sd.schedules.get("karras"), 10)
    inside = sum(0.5 < s / a <= 3.0 for s, a in zip(grid.sigma[:-1], grid.alpha[:-1], strict=True))
    assert 0 < inside < 10
    cases = [
        (DynamicThreshold(inner), 10 + inside),
        (CFG(DynamicThreshold(inner), den, 2.0), 2 * 10 + inside),  # + one uncond call per step
        (DynamicThreshold(DynamicThreshold(inner, 0.9)), 10 + inside),
    ]
    for guided, expected in cases:
        rows.clear()
        _, info = sd.sample(guided, x_T, 10, "euler", schedule="karras", return_info=True)
        assert len(rows) == expected and info.nfe == expected, (guided, len(rows), info.nfe)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"scale": -1.0}, ["scale", "-1.0"]),
        ({"scale": float("nan")}, ["scale", "nan"]),
        ({"scale": "3"}, ["scale", "'3'"]),
        ({"rescale": 1.5}, ["rescale", "1.5"]),
        ({"rescale_space": "latent"}, ["rescale_space", "'latent'", "x0"]),
        ({"interval": (3.0, 1.0)}, ["interval", "lo < hi"]),
        ({"interval": 2.0}, ["interval", "pair"]),
        ({"uncond_kwargs": [1]}, ["uncond_kwargs", "dict"]),
        ({"cads": 0.1}, ["cads", "CADS"]),
    ],
)
def test_bad_cfg_arguments(den, kwargs, words):
    args = {"scale": 2.0, **kwargs}
    scale = args.pop("scale")
    with pytest.raises(ValueError) as e:
        CFG(den, den, scale, **args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cfg_tells_apart_processes_that_agree_at_three_times():
    """``same_process`` compared alpha and sigma at t_min, the midpoint and t_max only: two IR-SDE tables
    equal there but not at step 25 passed as one process. It compares 257 times now."""
    proc = sd.MeanReverting.cosine(100)
    table = proc.theta_bars.clone()
    table[25] = 0.5 * (table[24] + table[26])  # still increasing; equal at steps 1, 50, 51 and 100
    other = sd.MeanReverting.discrete(table)
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    mu = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="share a process"):
        CFG(proc.denoiser(net, mu), other.denoiser(net, mu), 2.0)
    CFG(proc.denoiser(net, mu), sd.MeanReverting.cosine(100).denoiser(net, mu), 2.0)  # an equal table


def test_bad_cfg_pairs_and_conditions(sd_process, den):
    c0, _, _ = two_class()
    with pytest.raises(ValueError, match="uncond must be a steerdiff Denoiser"):
        CFG(den, lambda x, t: x, 2.0)
    with pytest.raises(ValueError, match="share a process"):
        CFG(den, c0.denoiser(sd.VP.linear()), 2.0)
    x = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="no condition 'emb'"):
        CFG(den, den, 2.0, uncond_kwargs={"y": NULL}, cads=CADS("emb", 0.1))(x, 999.0, y=1)
    with pytest.raises(ValueError, match="floating tensor"):
        CFG(den, den, 2.0, uncond_kwargs={"y": NULL}, cads=CADS("y", 0.1))(x, 999.0, y=1)
    for bad in ({"noise_scale": -0.1}, {"tau1": 0.9, "tau2": 0.5}, {"psi": 2.0}):
        with pytest.raises(ValueError, match="CADS"):
            CADS("emb", **{"noise_scale": 0.1, **bad})
    for bad in ({"percentile": 1.5}, {"percentile": 0.9, "max_value": 0.5}, {"percentile": None}):
        with pytest.raises(ValueError, match="DynamicThreshold"):
            DynamicThreshold(den, **bad)
    x_T = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="gamma"):
        pcg(den, den, x_T, 5, -1.0, y=1)
    with pytest.raises(ValueError, match="langevin_steps"):
        pcg(den, den, x_T, 5, 2.0, langevin_steps=0, y=1)


def _cfg_toward_two(process: sd.Process, scale: float) -> tuple[CFG, torch.Tensor, torch.Tensor]:
    """CFG at ``scale`` toward the first two components of the 16-d default mixture (the whole mixture
    unconditional) under ``process``, 256 x_T (the benches' draw of seed 0, independent of the mixture:
    ``Generator().manual_seed(0)`` is the stream its means come from), and the guided ODE solved from them
    in 800 steps (DPM-Solver++(2M), log-SNR-uniform grid)."""
    full = sd.toy.default_benchmark_mixture(dim=16)
    part = sd.toy.GaussianMixture(full.means[:2], full.variances[:2], full.weights[:2])
    x_T = initial_noise(256, 16, 0).to(F64)
    cfg = CFG(part.denoiser(process), full.denoiser(process), scale)
    return cfg, x_T, sd.sample(cfg, x_T, 800, "dpmpp_2m", "logsnr_uniform")


def test_guided_denoisers_get_a_second_order_default(sd_process):
    """``sd.sample`` without ``solver``: UniPC-3 (with its long-step guard) for a plain denoiser; for
    a guided one (any ``Guided``, e.g. CFG, classifier guidance) DPM-Solver++(2M) below 15 steps
    (steps longer than ``guided_max_h(scale)`` first order: 0.8 at CFG scale 7.5 and for a guided
    denoiser without a CFG scale) unless every step after the first is within that limit, then UniPC-2
    (the same predictor with UniPC's corrector; first order above ``guided_corrector_max_h``), and
    UniPC-2 from 15 (first order above ``guided_max_h(scale)``); an explicit solver always wins. The
    reason, on the 16-d default mixture under SD betas with CFG at scale 7.5 toward two of its
    components, against the guided ODE solved in 800 steps (DPM-Solver++(2M) on the log-SNR-uniform
    grid, 9.7e-5 from UniPC-3 on the time-uniform one), relative error measured at 10 / 15 / 20 steps:
    the default 0.185 / 8.3e-3 / 4.8e-3, 2M alone 0.183 / 2.3e-2 / 1.2e-2, UniPC-3 99 / 1.7e2 / 53
    (third-order extrapolation of the guided estimate is unstable at such scales, Lu et al. 2022b)."""
    cfg, x_T, ref = _cfg_toward_two(sd_process, 7.5)
    plain = cfg.uncond
    grad = sd.guidance.RewardGuidance(plain, lambda x0: -(x0**2).sum(1), 0.5)
    guarded, unipc_2 = (
        sd.solvers.DPMSolverPPMultistep(order=2, max_h=0.8, max_h_ratio=0.0),
        sd.solvers.UniPC(order=2, max_h=0.8, max_h_ratio=0.0),
    )
    # below 15 steps UniPC-2 where every step after the first is within 0.8 (on SD betas' karras_capped
    # from 11 steps), its steps above guided_corrector_max_h (0.508 here) predicted at first order
    short = sd.solvers.UniPC(order=2, max_h=sd.sampling.guided_corrector_max_h(7.5), max_h_ratio=0.0)
    assert sd.sampling.guided_corrector_max_h(7.5) == pytest.approx(0.508, abs=1e-3)
    for steps in (5, 9, 10, 14, 15, 20):
        guided = guarded if steps < 11 else short if steps < 15 else unipc_2
        grid = sd.solvers.base.make_grid(sd_process, sd.schedules.get("karras_capped"), steps)
        assert sd.sampling.default_solver(plain, steps) == sd.solvers.UniPC(max_h=2.0, max_h_ratio=2.0)
        for den in (cfg, grad):
            assert sd.solvers.get(sd.sampling.default_solver(den, steps, grid)) == guided
            assert sd.sampling.default_solver(den, steps) == (guarded if steps < 15 else unipc_2)  # no grid
            assert sd.sample(den, x_T[:4], steps, return_info=True)[1].solver == guided
    assert sd.sample(cfg, x_T[:4], 5, "unipc", return_info=True)[1].solver.name == "unipc"
    with pytest.raises(ValueError, match="steps"):
        sd.sampling.default_solver(cfg, 0)

    assert rel_rmse(sd.sample(cfg, x_T, 800, "unipc", "time_uniform"), ref) < 3e-4
    assert rel_rmse(sd.sample(cfg, x_T, 10), ref) < 0.2
    for steps, bound in [(15, 0.02), (20, 0.01)]:
        err = rel_rmse(sd.sample(cfg, x_T, steps), ref)
        assert err < bound and err < 0.5 * rel_rmse(sd.sample(cfg, x_T, steps, "dpmpp_2m"), ref)
        assert rel_rmse(sd.sample(cfg, x_T, steps, "unipc"), ref) > 10


def test_the_guided_default_corrects_from_15_steps_under_rectified_flow():
    """The same mixture and CFG at scale 4 under rectified flow on ``karras_capped``: from 15 steps UniPC's
    corrector takes the default below half of DPM-Solver++(2M)'s error (measured 0.0146 against 0.0341 at
    15 steps, 0.0078 against 0.0174 at 20). At 10 steps every step is within ``guided_max_h(4) = 1.18``,
    so the default is UniPC-2 with the steps above ``guided_corrector_max_h(4) = 0.79`` predicted at first
    order: 0.046 against 2M's 0.052 (UniPC-2 with every step at second order gets 0.031 on this grid).
    The limits are for grids whose long steps fall elsewhere: on ``karras`` (steps up to 2.7 in log-SNR
    at the low-noise end at 14 steps) UniPC-2 at second order throughout ends 1.06 / 0.84 from the guided
    ODE at 10 / 15 steps (the default 0.37 / 0.062), and at scale 7.5 10.8 / 6.0 at 15 / 20 steps (the
    default, every step longer than ``guided_max_h(7.5) = 0.8`` predicted at first order, 0.26 / 0.043)."""
    cfg, x_T, ref = _cfg_toward_two(sd.RectifiedFlow(), 4.0)
    for steps in (15, 20):
        assert rel_rmse(sd.sample(cfg, x_T, steps), ref) < 0.5 * rel_rmse(
            sd.sample(cfg, x_T, steps, "dpmpp_2m"), ref
        )
    assert rel_rmse(sd.sample(cfg, x_T, 10), ref) < 0.9 * rel_rmse(sd.sample(cfg, x_T, 10, "dpmpp_2m"), ref)
    second_order = sd.solvers.UniPC(order=2, max_h=math.inf)
    for scale, steps in ((4.0, (10, 15)), (7.5, (15, 20))):
        cfg, x_T, ref = _cfg_toward_two(sd.RectifiedFlow(), scale)
        for n in steps:
            default = rel_rmse(sd.sample(cfg, x_T, n, schedule="karras"), ref)
            assert default < 0.4 and default < 0.4 * rel_rmse(
                sd.sample(cfg, x_T, n, second_order, "karras"), ref
            )


def test_the_guided_default_takes_long_steps_at_first_order():
    """Strong guidance at few steps: CFG at scale 7.5 makes the guided estimate stiff enough that
    DPM-Solver++(2M) with steps longer than 0.8 in log-SNR diverges where DDIM does not (the stability
    bound is in :mod:`steerdiff.solvers.dpmpp`); the guided default takes those steps at first order.
    Measured (256 samples against the 800-step guided ODE), default / plain 2M / DDIM: SD betas
    4 steps 0.70 / 4.3 / 0.70, 5 steps 0.34 / 6.3 / 0.34, 6 steps 0.32 / 1.3 / 0.32, 8 steps 0.36 / 2.3 /
    0.31 (some steps at second order there, 1.15x DDIM); rectified flow 5 steps 0.46 / 3.2 / 0.46, 6 steps
    0.82 / 4.7 / 0.82. Where 2M holds (SD betas at 7 steps, rectified flow at 7-9) the three are within
    1.25x of each other (SD 7 steps 0.27 / 0.28 / 0.32)."""
    for process, steps in [(sd.VP.scaled_linear(), (4, 5, 6, 8)), (sd.RectifiedFlow(), (5, 6))]:
        cfg, x_T, ref = _cfg_toward_two(process, 7.5)
        for n in steps:
            default = rel_rmse(sd.sample(cfg, x_T, n), ref)
            assert default <= (1.0001 if n < 8 else 1.2) * rel_rmse(sd.sample(cfg, x_T, n, "ddim"), ref)
            assert 3 * default < rel_rmse(sd.sample(cfg, x_T, n, "dpmpp_2m"), ref)


def test_the_guided_guard_loosens_as_the_cfg_scale_falls():
    """``guided_max_h``: 0.8 from CFG scale 7.5 up and for a guided denoiser without a CFG scale,
    ``0.8 sqrt(6.5 / (scale - 1))`` below (1.18 at 4, 2.04 at 2), no limit from 1 down; the default
    solver of a CFG denoiser carries it. At scale 2 that keeps plain 2M, which the flat 0.8 guard
    would replace by DDIM on every step of a 5-step run: on the 16-d mixture under SD betas
    (256 samples, against the 800-step guided ODE) at 5 / 6 steps, measured 0.083 / 0.061 (plain 2M,
    the guarded 2M) against 0.335 / 0.263 (flat 0.8, which is DDIM there). Every step there is within
    the limit, so the default is UniPC-2 (``guided_solver`` with the grid): at 4-8 steps 0.183 / 0.090 /
    0.0606 / 0.0402 / 0.0262 against 2M's 0.212 / 0.083 / 0.0608 / 0.0416 / 0.0326, better but at 5
    steps (1.09x), 0.94x in geometric mean."""
    max_h = sd.sampling.guided_max_h
    assert max_h(None) == max_h(7.5) == max_h(12.0) == 0.8
    assert max_h(4.0) == pytest.approx(0.8 * math.sqrt(6.5 / 3)) and max_h(2.0) == pytest.approx(
        0.8 * math.sqrt(6.5)
    )
    assert max_h(1.0) == max_h(0.0) == math.inf
    cfg, x_T, ref = _cfg_toward_two(sd.VP.scaled_linear(), 2.0)
    reward = sd.guidance.RewardGuidance(cfg.uncond, lambda x0: -(x0**2).sum(1), 0.5)
    assert cfg.guidance_scale == 2.0 and reward.guidance_scale is None
    # a wrapper around CFG keeps CFG's scale and default solver (a no-op clip took the flat guard,
    # 0.090 -> 0.335 at 5 steps)
    clip = DynamicThreshold(cfg, None, 1e6)
    assert clip.guidance_scale == 2.0 and sd.sampling.default_solver(clip, 5) == sd.sampling.default_solver(
        cfg, 5
    )
    assert sd.sampling.default_solver(cfg, 5) == sd.solvers.DPMSolverPPMultistep(
        max_h=max_h(2.0), max_h_ratio=0.0
    )
    flat = sd.solvers.DPMSolverPPMultistep(max_h=0.8, max_h_ratio=0.0)
    for n in (5, 6):
        guarded = rel_rmse(sd.sample(cfg, x_T, n, sd.sampling.guided_solver(n, 2.0)), ref)
        assert guarded == rel_rmse(sd.sample(cfg, x_T, n, "dpmpp_2m"), ref)
        assert guarded < 0.3 * rel_rmse(sd.sample(cfg, x_T, n, flat), ref)
    # every step is within 2.04, so the default is UniPC-2 (first order above 1.49): ahead of 2M but at 5
    ratios = [
        rel_rmse(sd.sample(cfg, x_T, n), ref) / rel_rmse(sd.sample(cfg, x_T, n, "dpmpp_2m"), ref)
        for n in range(4, 9)
    ]
    assert max(ratios) < 1.1 and math.prod(ratios) ** (1 / len(ratios)) < 0.95


class _CallOnly(sd.guidance.Guided):
    """A wrapper written the old way: ``__call__`` only (it then runs whole in the net's dtype)."""

    def __call__(self, x, t, **cond):
        pred = self.base(x, t, **cond)
        return sd.guidance.with_estimate(pred, x0=pred.x0.clamp(-3, 3))


def test_a_guided_subclass_may_implement_call_or_must_say_evaluate(sd_process, den):
    """A ``__call__``-only subclass works under a half-precision ``x_T`` and in a particle method (the
    whole wrapper in the net's dtype, as ``Denoiser.evaluate`` runs such wrappers); one with neither
    names what to implement (it was a bare NotImplementedError)."""
    c0, _, _ = two_class()
    base = c0.denoiser(sd_process)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = sd.sample(_CallOnly(base), x_T.half(), 6, "ddim")
    assert out.dtype == torch.float16
    ref = sd.sample(DynamicThreshold(base, None, 3.0), x_T.half(), 6, "ddim")  # the same clamp, in float32
    assert float((out.float() - ref.float()).abs().max()) < 2e-2
    p = sd.smc.fk_steering(_CallOnly(base), lambda x: -x[:, 0], lam=1.0, shape=(2, 2), particles=3, steps=4)
    assert p.x.shape == (2, 3, 2)
    with pytest.raises(NotImplementedError, match=r"Bare must implement evaluate\(x, t, net_dtype"):
        type("Bare", (sd.guidance.Guided,), {})(base)(x_T, 500.0)


def test_option_messages_name_the_owner(den):
    x_T = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError) as e:
        CFG(den, den, 2.0, rescale_space="latent")
    assert str(e.value) == "CFG: rescale_space must be one of ['x0', 'eps', 'v'], got 'latent'"
    with pytest.raises(ValueError) as e:
        pcg(den, den, x_T, 4, 2.0, uncond_kwargs={"y": NULL}, return_info="yes", y=1)
    assert str(e.value) == "pcg: return_info must be True or False, got 'yes'"


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda den: sd.guidance.CFG("den", den, 2.0), "CFG: cond must be a steerdiff Denoiser"),
        (lambda den: sd.guidance.CFG(den, None, 2.0), "CFG: uncond must be a steerdiff Denoiser"),
        (
            lambda den: sd.guidance.DynamicThreshold(None),
            "DynamicThreshold: den must be a steerdiff Denoiser",
        ),
        (
            lambda den: sd.guidance.pcg(1.0, den, torch.zeros(2, 2), 3, 0.5),
            "pcg: cond must be a steerdiff Denoiser",
        ),
        (
            lambda den: sd.guidance.pcg(den, [den], torch.zeros(2, 2), 3, 0.5),
            "pcg: uncond must be a steerdiff",
        ),
    ],
)
def test_a_wrapped_denoiser_that_is_none_is_named_by_its_argument(den, make, name):
    """The check of the wrapped denoiser names the wrapper's own argument (CFG's was "base"; pcg read
    ``cond.shape`` first and raised an AttributeError, then named the CFG it builds)."""
    with pytest.raises(ValueError, match=name):
        make(den)
