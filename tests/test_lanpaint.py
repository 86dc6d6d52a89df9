"""LanPaint (sd.guidance.LanPaint + the corrector sd.mcmc.BiGLangevin) against the exact inpainting
posterior of a Gaussian mixture: distance to exact samples falling with the Langevin moves, ahead of
RePaint and DPS at the same NFE, the known entries exact, NFE exact, per-sample reproducibility, errors."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import LanPaint, lanpaint_nfe
from steerdiff.inverse import Inpaint
from steerdiff.mcmc import BiGLangevin, Point
from steerdiff.mcmc.lanpaint import _oscillator
from steerdiff.solvers.base import Model

F64 = torch.float64
PROC = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
UNKNOWN = [1, 3]
N = 2000  # samples
STEPS = 10


def _mixture(d: int = 4, k: int = 3, seed: int = 0) -> sd.toy.GaussianMixture:
    """Three full-covariance components in 4-d: the inpainting posterior is correlated and multimodal."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(k, d, generator=g, dtype=F64)
    covs = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
        covs.append(q @ torch.diag(0.05 + 0.5 * torch.rand(d, generator=g, dtype=F64)) @ q.T)
    return sd.toy.GaussianMixture(means, torch.stack(covs), 0.5 + torch.rand(k, generator=g, dtype=F64))


@functools.cache
def _case() -> tuple[sd.toy.GaussianMixture, Inpaint, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    gmm = _mixture()
    op, y = Inpaint(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)), torch.tensor([0.5, -1.0], dtype=F64)
    post = gmm.posterior(op.to_dense(), y, 1e-4)  # y taken as exact: a noise far below every scale here
    ref = post.sample(N, generator=torch.Generator().manual_seed(9))[:, UNKNOWN]
    floor = sd.metrics.floor(
        lambda m, g: post.sample(m, generator=g)[:, UNKNOWN], N, generator=torch.Generator().manual_seed(3)
    )
    x_T = torch.randn(N, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    return gmm, op, y, ref, x_T, floor


def _sw(x: torch.Tensor) -> float:
    return sd.metrics.sliced_wasserstein(x[:, UNKNOWN], _case()[3])


@functools.cache
def _lanpaint(moves: int, friction: float | None = None) -> tuple[torch.Tensor, sd.SampleInfo]:
    """The run of the distance tests (cached: two tests read the one at 10 moves)."""
    gmm, op, y, _, x_T, _ = _case()
    return sd.sample(
        LanPaint(gmm.denoiser(PROC), op, y),
        x_T,
        STEPS,
        solver="ddim",
        corrector=BiGLangevin(step_size=1.0, lam=1.0, friction=friction),
        corrector_steps=moves,
        generator=torch.Generator().manual_seed(2),
        return_info=True,
    )


def test_lanpaint_approaches_the_exact_posterior_as_the_moves_grow() -> None:
    """Asymptotic exactness: DDIM, 10 steps, eta = 1, lambda = 1, K moves per node. Measured sliced W2 to
    2000 exact posterior samples (floor 0.0372): the replace-x0 wrapper alone 0.535; K = 2, 5, 10, 20:
    0.298, 0.142, 0.087, 0.054 (1.45x the floor; NFE 10 + 9 K, exactly). With momentum (friction 1):
    0.062 at K = 10, 0.047 at K = 20 (1.25x the floor); friction 2 is slower (0.079 at K = 20)."""
    gmm, op, y, _, x_T, floor = _case()
    alone = _sw(sd.sample(LanPaint(gmm.denoiser(PROC), op, y), x_T, STEPS, solver="ddim"))
    errors = []
    for k in (2, 5, 10, 20):
        x, info = _lanpaint(k)
        assert info.nfe == lanpaint_nfe(STEPS, k) == STEPS + (STEPS - 1) * k
        assert torch.equal(x[:, [0, 2]], y.expand(N, 2))  # the known entries are y exactly
        errors.append(_sw(x))
    assert 0.03 < floor < 0.045
    assert alone > 0.45
    assert all(b < 0.75 * a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1.6 * floor, (errors, floor)
    cfg = sd.guidance.CFG(gmm.denoiser(PROC), gmm.denoiser(PROC), 2.0)  # 2 evaluations a call
    info = sd.sample(
        LanPaint(cfg, op, y),
        x_T[:4],
        STEPS,
        "ddim",
        corrector="lanpaint",
        corrector_steps=3,
        return_info=True,
    )[1]
    assert info.nfe == 2 * lanpaint_nfe(STEPS, 3)
    x, info = _lanpaint(20, friction=1.0)
    assert info.nfe == lanpaint_nfe(STEPS, 20) and torch.equal(x[:, [0, 2]], y.expand(N, 2))
    assert _sw(x) < 1.4 * floor and _sw(x) < 0.95 * errors[-1], (_sw(x), errors[-1], floor)


def test_lanpaint_beats_repaint_and_dps_at_the_same_nfe() -> None:
    """NFE 100 (10 steps, 10 moves): LanPaint 0.087; RePaint with 11 passes per step (Alg. 1, jump 1:
    NFE 100) 0.212 (0.168 with 20 steps at NFE 210); DPS (DDPM, 100 steps, the normalized step with
    noise_std 0.01) 0.190 at its best scale of 0.3, 1, 3, 10, 20, 30 (10; 0.29 at 3, 0.56 at 20)."""
    gmm, op, y, _, x_T, _ = _case()
    den = gmm.denoiser(PROC)
    lp, info = _lanpaint(10)
    g = torch.Generator().manual_seed(2)
    rp, rinfo = sd.guidance.repaint_sample(den, op, y, x_T, STEPS, resample=11, generator=g, return_info=True)
    dps, dinfo = sd.sample(
        sd.guidance.DPS(den, op, y, noise_std=0.01, scale=10.0),
        x_T,
        100,
        solver="ddpm",
        generator=torch.Generator().manual_seed(2),
        return_info=True,
    )
    assert info.nfe == rinfo.nfe == dinfo.nfe == 100
    e_lp, e_rp, e_dps = _sw(lp), _sw(rp), _sw(dps)
    assert e_lp < 0.12, e_lp
    assert e_lp < 0.6 * e_rp and e_lp < 0.6 * e_dps, (e_lp, e_rp, e_dps)


def test_lanpaint_rows_do_not_depend_on_the_batch() -> None:
    """One generator per row (the run's, which the moves use too; the underdamped velocity as well):
    each row alone equals its row in the batch."""
    gmm, op, y, _, _, _ = _case()
    x_T = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    lp = LanPaint(gmm.denoiser(PROC), op, y)
    for friction in (None, 2.0):

        def run(rows: list[int], friction: float | None = friction) -> torch.Tensor:
            gens = [torch.Generator().manual_seed(10 + r) for r in rows]
            kernel = BiGLangevin(step_size=1.0, lam=1.0, friction=friction)
            return sd.sample(
                lp, x_T[rows], 4, solver="ddim", corrector=kernel, corrector_steps=2, generator=gens
            )

        batch = run([0, 1, 2, 3])
        for r in range(4):
            torch.testing.assert_close(run([r])[0], batch[r], rtol=1e-12, atol=1e-12)
        assert not torch.equal(batch, run([0, 1, 2, 3], None if friction else 2.0))  # momentum changes it


def test_big_score_is_the_bidirectional_combination_of_exact_scores() -> None:
    """The moves' score, one counted evaluation: unknown entries ``grad log p_t`` (autograd of the exact
    noised log-density); known entries ``(1 + lam) grad log q(x_t | y) - lam grad log p_t`` with
    ``q(x_t | y) = N(alpha y, sigma^2)``."""
    gmm, op, y, _, _, _ = _case()
    model = Model(LanPaint(gmm.denoiser(PROC), op, y))
    t, lam = 300.0, 2.0
    a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = BiGLangevin(lam=lam).target(model, t, s, 0).evaluate(Point(x)).grad
    assert model.nfe == 1
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(gmm.log_prob(xr, a, s).sum(), xr)
    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    want = torch.where(known, (1 + lam) * (a * y_full - x) / s**2 - lam * score, score)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("friction", [None, 0.7], ids=["overdamped", "underdamped"])
def test_moves_are_the_module_equations_written_out(friction: float | None) -> None:
    """Three moves at one node against the module's equations, written out here with the exact noised
    denoiser, torch's matrix exponential and Cholesky factor, and the same normal draws: the known part
    relaxes over ``h = beta eta (1 + lam)`` towards ``m`` with variance ``sigma^2 / (1 + lam)``, the unknown
    part over ``h = eta`` with variance ``sigma^2``; the first move is the full flow from the start's mean,
    each later one half a flow, the kick ``h (m_new - m)`` (on the position, or on the velocity, which
    starts from ``N(0, v)``), half a flow. ``lam = 2``, ``beta = 0.5``: each factor of the known part
    differs from the unknown part's (a known part stepped by ``beta eta``, kicked by ``eta``, or with the
    unknown part's velocity law passed the posterior tests)."""
    gmm, op, y, _, _, _ = _case()
    lam, beta, eta, t = 2.0, 0.5, 0.4, 300.0
    a, s = float(PROC.alpha(t)), float(PROC.sigma(t))
    gen = torch.Generator().manual_seed(11)
    x = a * torch.randn(5, 4, generator=gen, dtype=F64)
    draws = [torch.randn(5, 4, generator=gen, dtype=F64) for _ in range(11)]
    kernel = BiGLangevin(step_size=eta, lam=lam, beta=beta, friction=friction)
    model = Model(LanPaint(gmm.denoiser(PROC), op, y))
    target, normal, p = kernel.target(model, t, s, 0), iter(draws), Point(x)
    for _ in range(3):
        p, _ = kernel.move(p, target, eta, lambda like: next(normal))
    assert model.nfe == 3

    known = torch.tensor([True, False, True, False])
    y_full = torch.tensor([y[0], 0.0, y[1], 0.0], dtype=F64)
    h, var = (
        torch.tensor([k, u, k, u], dtype=F64) for k, u in ((beta * eta * (1 + lam), eta), (s * s / 3, s * s))
    )
    z = iter(draws)

    def mean(v: torch.Tensor) -> torch.Tensor:
        x0 = gmm.denoise(v, a, s)
        return a * torch.where(known, y_full, x0) + torch.where(known, lam / (1 + lam) * (v - a * x0), 0.0)

    if friction is None:

        def flow(v: torch.Tensor, m: torch.Tensor, part: float) -> torch.Tensor:
            e = torch.exp(-part * h)
            return m + e * (v - m) + (var * (1 - e * e)).sqrt() * next(z)

        m = mean(x)
        v = flow(x, m, 1.0)
        for _ in range(2):
            v = flow(v, m, 0.5)
            new = mean(v)
            v = flow(v + h * (new - m), m, 0.5)
            m = new
    else:
        gen_matrix = torch.tensor([[0.0, 1.0], [-1.0, -friction]], dtype=F64)

        def flow2(v: torch.Tensor, w: torch.Tensor, m: torch.Tensor, part: float):  # type: ignore[no-untyped-def]
            z1, z2 = next(z), next(z)
            ends = []
            for hh in (eta, beta * eta * (1 + lam)):
                E = torch.linalg.matrix_exp(part * hh * gen_matrix)
                L = torch.linalg.cholesky(torch.eye(2, dtype=F64) - E @ E.T)
                u = v - m
                sd_ = var.sqrt()
                ends.append(
                    (
                        m + E[0, 0] * u + E[0, 1] * w + sd_ * L[0, 0] * z1,
                        E[1, 0] * u + E[1, 1] * w + sd_ * (L[1, 0] * z1 + L[1, 1] * z2),
                    )
                )
            (xu, wu), (xk, wk) = ends
            return torch.where(known, xk, xu), torch.where(known, wk, wu)

        w = var.sqrt() * next(z)
        m = mean(x)
        v, w = flow2(x, w, m, 1.0)
        for _ in range(2):
            v, w = flow2(v, w, m, 0.5)
            new = mean(v)
            v, w = flow2(v, w + h * (new - m), m, 0.5)
            m = new
    assert len(list(z)) == len(list(normal)) == (6 if friction is None else 0)  # the same draws, as many
    torch.testing.assert_close(p.x, v, rtol=1e-12, atol=1e-12)


def test_oscillator_step_is_the_exact_flow() -> None:
    """The underdamped step's ``E = exp(h [[0, 1], [-1, -gamma]])`` against torch's matrix exponential
    (under-, critically and over-damped) and its noise keeps ``N(0, I)``: ``E E^T + L L^T = I``."""
    for gamma in (0.5, 2.0, 6.0):
        for h in (0.1, 1.0):
            (e11, e12, e21, e22), (l11, l21, l22) = _oscillator(h, gamma)
            e = torch.tensor([[e11, e12], [e21, e22]], dtype=F64)
            exact = torch.linalg.matrix_exp(h * torch.tensor([[0.0, 1.0], [-1.0, -gamma]], dtype=F64))
            torch.testing.assert_close(e, exact, rtol=0, atol=1e-12)
            lo = torch.tensor([[l11, 0.0], [l21, l22]], dtype=F64)
            torch.testing.assert_close(e @ e.T + lo @ lo.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)


def test_oscillator_step_far_over_damped() -> None:
    """A stiff step (``gamma h`` in the thousands: friction 100 at a known-part step of 20, i.e. step_size
    10, or friction 1e4) is finite and exact: against mpmath's 50-digit matrix exponential to 1e-15 (was an
    OverflowError from ``cosh(k h)``, ``k h`` ~ 1000, for (100, 20) and (1e4, 2))."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    for gamma, h in ((100.0, 20.0), (1e4, 2.0), (1e4, 1e-4)):
        (e11, e12, e21, e22), (l11, l21, l22) = _oscillator(h, gamma)
        exact = mp.expm(mp.matrix([[0, 1], [-1, -gamma]]) * h)
        want = torch.tensor([[float(exact[i, j]) for j in range(2)] for i in range(2)], dtype=F64)
        e = torch.tensor([[e11, e12], [e21, e22]], dtype=F64)
        torch.testing.assert_close(e, want, rtol=0, atol=1e-15)
        lo = torch.tensor([[l11, 0.0], [l21, l22]], dtype=F64)
        torch.testing.assert_close(e @ e.T + lo @ lo.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)


def test_lanpaint_bad_input() -> None:
    gmm, op, y, _, x_T, _ = _case()
    den = gmm.denoiser(PROC)
    with pytest.raises(ValueError, match=r"LanPaint: operator acts on samples of shape \(3,\)"):
        LanPaint(den, Inpaint(torch.tensor([1.0, 0.0, 1.0], dtype=F64)), y)
    with pytest.raises(ValueError, match=r"LanPaint: y must have shape \(2,\)"):
        LanPaint(den, op, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"LanPaint: operator must be a steerdiff.inverse.LinearOperator"):
        LanPaint(den, torch.ones(4), y)  # type: ignore[arg-type]
    for kw, name in (({"lam": -1.0}, "lam"), ({"beta": 0.0}, "beta"), ({"friction": 0.0}, "friction")):
        with pytest.raises(ValueError, match=rf"BiGLangevin: {name}"):
            BiGLangevin(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"BiGLangevin: step_size"):
        BiGLangevin(step_size=None)
    with pytest.raises(ValueError, match=r"BiGLangevin.run: BiGLangevin targets the BiG score"):
        BiGLangevin().run(x_T[:4], lambda x: -0.5 * (x * x).sum(1))  # was a bare AssertionError
    with pytest.raises(ValueError, match=r"must be sd.guidance.LanPaint\(den, operator, y\)"):
        sd.sample(den, x_T[:4], 4, solver="ddim", corrector="lanpaint", generator=torch.Generator())


def test_lanpaint_nfe_counts_the_solvers_evaluations_plus_one_per_move() -> None:
    """``lanpaint_nfe`` is a one-evaluation solver's count; Heun's ``2 N - 1`` evaluations (final="zero") plus
    the same ``(N - 1) K`` moves, one evaluation each (the docs state the NFE for a one-evaluation solver)."""
    gmm, op, y, _, x_T, _ = _case()
    for solver, steps, evals in (("ddim", 4, 4), ("heun", 4, 7), ("dpmpp_2m", 5, 5)):
        info = sd.sample(
            LanPaint(gmm.denoiser(PROC), op, y), x_T[:4], steps, solver, corrector="lanpaint",
            corrector_steps=3, generator=torch.Generator().manual_seed(0), return_info=True,
        )[1]  # fmt: skip
        assert info.nfe == evals + (steps - 1) * 3, (solver, info.nfe)
    assert lanpaint_nfe(4, 3) == 4 + 3 * 3


if __name__ == "__main__":  # the step-size and lambda sweep quoted in BiGLangevin's docstring
    gmm_, op_, y_, _, x_T_, floor_ = _case()
    print(f"floor {floor_:.3f}")
    for k in (5, 10, 20):
        for name, values in (("step_size", (0.2, 0.5, 1.0, 2.0, 4.0)), ("lam", (0.0, 1.0, 4.0))):
            row = []
            for v in values:
                x = sd.sample(
                    LanPaint(gmm_.denoiser(PROC), op_, y_), x_T_, STEPS, solver="ddim",
                    corrector=BiGLangevin(**{"step_size": 1.0, "lam": 1.0, name: v}), corrector_steps=k,
                    generator=torch.Generator().manual_seed(2),
                )  # fmt: skip
                row.append(f"{v:g}: {_sw(x):.3f}")
            print(f"K = {k:2d}  {name:9s} " + "  ".join(row))
