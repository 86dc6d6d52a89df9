"""Ψ-Sampler against exact answers: the initial particles against the twisted prior ``pi_T`` (closed form
for a Gaussian data law, whose denoised estimate is linear in ``x_T``; importance-resampled prior draws for a
mixture), the weighted particles against the exact tilt of a Gaussian mixture (``GaussianMixture.tilt``,
the setup and tolerances of ``test_smc_fk.py``), the weights' structure, the NFE, and the ESS against FK
steering's from prior particles where the prior is poor."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers.base import make_grid

from .reference import smooth_mixture

F64 = torch.float64
PROC = sd.VP.cosine()
GMM = smooth_mixture(dim=2, components=3, seed=0)
DEN = GMM.denoiser(PROC)
C = torch.tensor([1.0, -0.5], dtype=F64)
SOLVER, STEPS = "er_sde", 25
# a run started at t = 0.6 (alpha 0.58), where x0_hat(x_T) depends on x_T and the reward-twisted prior is
# far from the prior; the base sampler's output law is then not the mixture, but both samplers target it
MID = sd.schedules.Custom(torch.linspace(0.6, 0.02, STEPS))


def linear(x: torch.Tensor) -> torch.Tensor:
    return x @ C


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def first_node(schedule) -> tuple[float, float, float]:
    """``(t_0, alpha_0, sigma_0)`` of the run's grid."""
    grid = make_grid(PROC, sd.schedules.get(schedule), STEPS)
    return grid.t[0], grid.alpha[0], grid.sigma[0]


def test_initial_particles_are_the_closed_form_twisted_prior():
    """Data ``N(m, diag v)``: ``x0_hat(x) = m + k (x - alpha m)``, ``k = alpha v / (alpha^2 v + sigma^2)``,
    so ``pi_T = N(lam s^2 k c, s^2 I)`` (``s = 1`` here, VP). Measured (8 x 512 chains): mean errors 0.0005,
    0.004 (se 0.016), variances 1.004, 1.010, sliced W2 0.84x the floor."""
    m, v = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.5, 2.0]], dtype=F64)
    gauss = sd.toy.GaussianMixture(m, v, torch.ones(1, dtype=F64))
    lam = 2.0
    _, a, sig = first_node(MID)
    mean = lam * (a * v[0] / (a**2 * v[0] + sig**2)) * C
    x, info, nfe = sd.smc.twisted_prior(
        gauss.denoiser(PROC), linear, lam, shape=(8, 2), particles=512, steps=STEPS, schedule=MID,
        mcmc_steps=30, step_size=0.5, generator=gen(1), dtype=F64,
    )  # fmt: skip
    x = x.reshape(-1, 2)
    assert info.acceptance_rate > 1 - 1e-9  # Phi is linear: pCNL accepts every move
    assert nfe == 31 * 512 and info.evaluations == 31
    assert bool(((x.mean(0) - mean).abs() < 4 / math.sqrt(len(x))).all()), (x.mean(0), mean)
    assert torch.allclose(x.var(0), torch.ones(2, dtype=F64), atol=0.08)

    def exact(n: int, g: torch.Generator) -> torch.Tensor:
        return mean + torch.randn(n, 2, generator=g, dtype=F64)

    floor = sd.metrics.floor(exact, len(x), repeats=3, generator=gen(2))
    assert sd.metrics.sliced_wasserstein(x, exact(len(x), gen(3))) < 1.5 * floor


def test_initial_particles_under_a_process_whose_prior_is_not_standard():
    """The closed form above under EDM (``alpha = 1``, ``sigma_0 = 80``): the prior, the pCNL reference and
    ``pi_T`` have ``s^2 = 1 + 80^2`` (``pi_T = N(lam s^2 k c, s^2 I)``). Measured (8 x 512 chains): variances
    1.004, 1.010 of ``s^2``, mean errors 0.03 and 0.3 (se 1.25). Every other test runs VP (``s = 1``), where a
    chain with the reference ``N(0, I)`` passed them all."""
    m, v = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.5, 2.0]], dtype=F64)
    gauss = sd.toy.GaussianMixture(m, v, torch.ones(1, dtype=F64))
    proc, lam = sd.EDM(), 2.0
    grid = make_grid(proc, sd.schedules.get("karras"), STEPS)
    a, sig = grid.alpha[0], grid.sigma[0]
    s2 = a**2 + sig**2
    mean = lam * s2 * (a * v[0] / (a**2 * v[0] + sig**2)) * C
    x, info, _ = sd.smc.twisted_prior(
        gauss.denoiser(proc), linear, lam, shape=(8, 2), particles=512, steps=STEPS, schedule="karras",
        mcmc_steps=30, step_size=0.5, generator=gen(1), dtype=F64,
    )  # fmt: skip
    x = x.reshape(-1, 2)
    assert info.acceptance_rate > 1 - 1e-9
    assert bool(((x.mean(0) - mean).abs() < 4 * math.sqrt(s2 / len(x))).all()), (x.mean(0), mean)
    assert torch.allclose(x.var(0) / s2, torch.ones(2, dtype=F64), atol=0.08)


def test_initial_particles_match_importance_resampled_prior_draws():
    """The mixture, ``lam = 4``, from ``t = 0.6``: ``pi_T``'s mean and second moments by self-normalized
    importance sampling of 2^18 prior draws (ESS 1.1e4), and sliced W2 to a resample of them against the
    floor of two such resamples. Measured: max |z| 2.2, sliced W2 1.31x the floor, acceptance 0.91."""
    lam = 4.0
    t0, *_ = first_node(MID)
    x, info, _ = sd.smc.twisted_prior(
        DEN, linear, lam, shape=(4, 2), particles=1024, steps=STEPS, schedule=MID, mcmc_steps=40,
        step_size=0.3, generator=gen(4), dtype=F64,
    )  # fmt: skip
    x = x.reshape(-1, 2)
    prior = torch.randn(2**18, 2, generator=gen(5), dtype=F64)
    w = torch.softmax(lam * linear(DEN(prior, t0).x0), 0)
    assert 1 / float((w**2).sum()) > 1e4
    for f in (x, x**2, x[:, :1] * x[:, 1:]):
        exact = (w[:, None] * f_of(prior, f, x)).sum(0)
        z = (f.mean(0) - exact) / (f.std(0) / math.sqrt(len(f)))
        assert float(z.abs().max()) < 4, (z, exact)
    assert 0.8 < info.acceptance_rate < 0.97

    def draws(n: int, g: torch.Generator) -> torch.Tensor:
        return prior[torch.multinomial(w, n, replacement=True, generator=g)]

    floor = sd.metrics.floor(draws, len(x), repeats=3, generator=gen(6))
    assert sd.metrics.sliced_wasserstein(x, draws(len(x), gen(7))) < 1.5 * floor


def f_of(prior: torch.Tensor, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The statistic ``f`` of ``x`` (``x``, ``x^2`` or ``x_1 x_2``) evaluated on ``prior`` instead."""
    if f.shape[1] == 1:
        return prior[:, :1] * prior[:, 1:]
    return prior**2 if torch.equal(f, x**2) else prior


def test_weights_are_the_reward_gained_after_the_initial_node():
    """Without resampling every path's weight is ``exp(lam (r(x_S) - r_0(x_T)))``: node 0 adds nothing
    (its factor ``exp(lam r_0)`` is in the initial law), the final correction completes the telescoping
    sum. ``x_T`` read back from :func:`twisted_prior` with the same seed; measured max difference 7.5e-15 (7.9
    with a node-0 weight ``exp(lam r_0)``, FK steering's)."""
    lam, kw = 3.0, dict(shape=(3, 2), particles=64, steps=STEPS, schedule=MID, dtype=F64)
    out = sd.smc.psi_sampler(DEN, linear, lam, ess_threshold=0.0, solver=SOLVER, generator=gen(8), **kw)
    x_T, _, _ = sd.smc.twisted_prior(DEN, linear, lam, generator=gen(8), **kw)
    r0 = linear(DEN(x_T.reshape(-1, 2), first_node(MID)[0]).x0).reshape(3, 64)
    expected = torch.log_softmax(lam * (linear(out.x) - r0), -1)
    torch.testing.assert_close(out.log_w, expected, rtol=0, atol=1e-10)
    assert torch.allclose(out.trace.ess[0], torch.full((3,), 64.0, dtype=F64), rtol=1e-12)
    assert not bool(out.trace.resampled.any())
    assert out.nfe == STEPS * 64 + 26 * 64  # the run's, then the chains' 25 moves and their start


def test_chains_in_slices_and_per_row_generators():
    """``max_batch`` slices the chains' evaluations (graphs included) without changing them (measured max
    difference 4e-16) or their NFE; with one generator per batch row a row's chains are the same alone
    (bitwise)."""
    kw = dict(shape=(2, 2), particles=6, steps=STEPS, schedule=MID, mcmc_steps=8, step_size=0.4, dtype=F64)
    whole, info, nfe = sd.smc.twisted_prior(DEN, linear, 2.0, generator=gen(3), **kw)
    sliced, info_s, nfe_s = sd.smc.twisted_prior(DEN, linear, 2.0, generator=gen(3), max_batch=5, **kw)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)
    assert nfe == nfe_s == 9 * 6 and torch.equal(info.acceptance, info_s.acceptance)
    both, _, _ = sd.smc.twisted_prior(DEN, linear, 2.0, generator=[gen(4), gen(5)], **kw)
    alone, _, _ = sd.smc.twisted_prior(DEN, linear, 2.0, generator=[gen(5)], **{**kw, "shape": (1, 2)})
    assert torch.equal(both[1], alone[0])


def test_weighted_particles_target_the_exact_tilt():
    """``test_smc_fk.py``'s check: z-test over 32 rows of 512 particles (4 standard errors, plus 0.02 for
    the base sampler's bias) of the weighted mean against the exact tilt; ``log_z`` against ``log Z - log
    Z_T`` (``Z_T = E_prior[exp(lam r_0)]`` by 2^18 prior draws). Measured: mean errors -0.018, -0.004 (se
    0.014, 0.014); log_z error 3e-5 (se 0.013)."""
    lam, rows = 1.0, 32
    tilt = GMM.tilt(linear=lam * C)
    mean = (tilt.weights[:, None] * tilt.means).sum(0)
    t0, *_ = first_node("karras_jump")
    prior = torch.randn(2**18, 2, generator=gen(9), dtype=F64)
    log_zt = float(torch.logsumexp(lam * linear(DEN(prior, t0).x0), 0)) - math.log(len(prior))
    log_z = GMM.tilt_log_normalizer(linear=lam * C) - log_zt
    out = sd.smc.psi_sampler(
        DEN,
        linear,
        lam,
        shape=(rows, 2),
        particles=512,
        steps=STEPS,
        solver=SOLVER,
        generator=gen(7),
        dtype=F64,
    )
    for err in (out.mean() - mean, (out.log_z - log_z)[:, None]):
        se = err.std(0) / math.sqrt(rows)
        assert bool((se < 0.08).all()), se
        assert bool((err.mean(0).abs() < 4 * se + 0.02).all()), (err.mean(0), se)


def test_higher_ess_than_fk_steering_where_the_prior_is_poor():
    """From ``t = 0.6`` with ``lam = 4``, 8 rows of 256 particles, resampling below ESS N/2: FK steering's
    prior particles lose most of their weight at the first potentials, Ψ-Sampler's do not. Measured: the
    smallest ESS of a row over the run, mean over rows, 117 (Ψ) against 16 (FK); weighted means (2.91,
    -1.26) and (2.52, -1.07) against (2.80, -1.16) from 2^17 importance-weighted base samples (ESS 196).
    Ψ spends 13056 NFE per row (6656 in the chains), FK 6400; FK at 512 particles (12800 NFE): 31 of 512."""
    kw = dict(
        shape=(8, 2), particles=256, steps=STEPS, schedule=MID, solver=SOLVER, ess_threshold=0.5, dtype=F64
    )
    psi = sd.smc.psi_sampler(DEN, linear, 4.0, generator=gen(0), **kw)
    fk = sd.smc.fk_steering(DEN, linear, 4.0, generator=gen(0), **kw)
    ess_psi, ess_fk = (float(o.trace.ess.min(0).values.mean()) for o in (psi, fk))
    assert ess_psi > 90 and ess_fk < 30 and ess_psi > 4 * ess_fk, (ess_psi, ess_fk)


def test_lam_zero_is_fk_steerings_base_sampler():
    """``lam = 0``: ``pi_T`` is the prior, so no chains: fk_steering's run at ``lam = 0``, the same draws
    (bitwise) and NFE, with a reward that need not be differentiable. Was: 26 chain evaluations per particle
    first (128 NFE per row against the run's 24 here) and a ValueError for the detached reward."""
    kw = dict(shape=(2, 2), particles=4, steps=6, solver=SOLVER, dtype=F64)

    def detached(x: torch.Tensor) -> torch.Tensor:
        return linear(x).detach()

    psi = sd.smc.psi_sampler(DEN, detached, 0.0, generator=gen(0), **kw)
    fk = sd.smc.fk_steering(DEN, detached, 0.0, generator=gen(0), **kw)
    assert torch.equal(psi.x, fk.x) and torch.equal(psi.log_w, fk.log_w)
    assert psi.nfe == fk.nfe == 6 * 4


def test_bad_input():
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64)
    with pytest.raises(ValueError, match=r"^psi_sampler: reward\(x0_hat\(x_T\)\) is not differentiable"):
        sd.smc.psi_sampler(DEN, lambda x: linear(x).detach(), **kw)
    with pytest.raises(ValueError, match=r"psi_sampler: reward\(x0_hat\(x_T\)\) must return a \(8,\) tensor"):
        sd.smc.psi_sampler(DEN, lambda x: x, **kw)
    with pytest.raises(ValueError, match="reward must be a callable"):
        sd.smc.psi_sampler(DEN, None, **kw)
    with pytest.raises(ValueError, match=r"^psi_sampler: group: the initial chains are not spread"):
        sd.smc.psi_sampler(DEN, linear, group=object(), **kw)
    with pytest.raises(ValueError, match=r"^psi_sampler needs a stochastic solver.*'ddpm'"):
        sd.smc.psi_sampler(DEN, linear, **{**kw, "solver": "ddim"})
    # a stochastic solver that draws no noise on the grid (one step, into the clean end): refused before the
    # chains (was: after them, 5 x 8 network rows evaluated)
    rows = []
    counted = sd.Denoiser(lambda x, t: rows.append(len(x)) or DEN.net(x, t), PROC, prediction="x0")
    with pytest.raises(
        ValueError, match=r"^psi_sampler needs a stochastic solver.*'er_sde'.* on this grid of 1 steps"
    ):
        sd.smc.psi_sampler(counted, linear, mcmc_steps=4, **{**kw, "steps": 1})
    assert rows == []
    # sample's keywords and a bad progress, refused before the chains as fk_steering refuses them before its
    # run: were a TypeError from inside the net (corrector= passed to it as a condition) and a ValueError
    # after the chains (5 x 8 network rows each)
    with pytest.raises(ValueError, match=r"^psi_sampler: corrector is an argument of sample, not of psi_"):
        sd.smc.psi_sampler(counted, linear, mcmc_steps=4, corrector="ula", **kw)
    chain_kw = {k: v for k, v in kw.items() if k != "solver"}
    for name, value in (("callback", print), ("solver", SOLVER)):  # psi_sampler's solver= too
        with pytest.raises(
            ValueError, match=rf"^twisted_prior: {name} is an argument of sample, not of twist"
        ):
            sd.smc.twisted_prior(counted, linear, 1.0, mcmc_steps=4, **{name: value}, **chain_kw)
    with pytest.raises(ValueError, match=r"^psi_sampler: progress must be True or False"):
        sd.smc.psi_sampler(counted, linear, mcmc_steps=4, progress="yes", **kw)
    assert rows == []
    for name, value in (("mcmc_steps", 0), ("step_size", 0.0), ("lam", math.nan), ("ess_threshold", 2.0)):
        with pytest.raises(ValueError, match=rf"psi_sampler: {name}"):
            sd.smc.psi_sampler(DEN, linear, **{**kw, name: value})
    with pytest.raises(
        ValueError, match=r"psi_sampler: x_T must be \(batch, particles, \*shape\) = \(2, 4, 2\)"
    ):
        sd.smc.psi_sampler(DEN, linear, x_T=torch.zeros(2, 2, dtype=F64), **kw)
    # checked as run_smc checks them, before the chains (they were torch's errors from inside the chains, or
    # none: a NaN x_T was reported as a NaN reward)
    with pytest.raises(ValueError, match=r"^psi_sampler: x_T contains NaN or inf"):
        sd.smc.psi_sampler(DEN, linear, x_T=torch.full((2, 4, 2), math.nan, dtype=F64), **kw)
    with pytest.raises(ValueError, match=r"^psi_sampler: x_T must have a floating dtype"):
        sd.smc.psi_sampler(DEN, linear, x_T=torch.zeros(2, 4, 2, dtype=torch.int64), **kw)
    for dtype in (torch.int64, "float32"):
        with pytest.raises(ValueError, match=r"^psi_sampler: dtype must be float16, bfloat16, float32 or"):
            sd.smc.psi_sampler(DEN, linear, **{**kw, "dtype": dtype})
    with pytest.raises(ValueError, match=r"^psi_sampler: device must be a torch.device"):
        sd.smc.psi_sampler(DEN, linear, device="nope", **kw)
    with pytest.raises(
        ValueError, match=r"^psi_sampler: shape has sample shape \(3,\), the denoiser expects"
    ):
        sd.smc.psi_sampler(DEN, linear, **{**kw, "shape": (2, 3)})
    with pytest.raises(
        sd.NonFiniteError, match=r"psi_sampler: reward\(x0_hat\(x_T\)\) or its gradient is NaN"
    ):
        sd.smc.psi_sampler(DEN, lambda x: linear(x).sqrt(), **kw)
