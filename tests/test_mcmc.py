"""Correctors (ULA, MALA, HMC) against the exact noised marginal of a Gaussian mixture.

Chains start from exact draws of ``p_t`` (``gmm.sample``, then noise): an invariant kernel keeps
every chain's law exactly ``p_t``, so the moments of the final states are compared with the
exact ones within Monte Carlo error (z-scores from the empirical spread), and the sliced W2 to
fresh exact draws with the floor of two exact sets.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import steerdiff as sd

from .reference import noise, smooth_mixture

F64 = torch.float64
T = 0.3  # VP.linear time: alpha = 0.630, sigma = 0.777


@pytest.fixture(scope="module")
def small():
    """Two-dimensional, three components, its noised marginal at T and exact draws of it."""
    gmm = smooth_mixture(dim=2, components=3)
    proc = sd.VP.linear()
    a, s = float(proc.alpha(T)), float(proc.sigma(T))

    def exact(n: int, g: torch.Generator) -> torch.Tensor:
        return a * gmm.sample(n, g) + s * torch.randn(n, gmm.dim, generator=g, dtype=F64)

    w = gmm.weights[:, None]
    mean = a * (w * gmm.means).sum(0)
    second = (w * (a**2 * gmm.variances + s**2 + a**2 * gmm.means**2)).sum(0)
    return gmm, exact, mean, second, (lambda x: gmm.log_prob(x, a, s))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z_moments(x: torch.Tensor, mean: torch.Tensor, second: torch.Tensor) -> float:
    """Largest |z| of the first and second moments of ``x`` against the exact ones."""
    n = x.shape[0]
    z1 = (x.mean(0) - mean) / (x.std(0) / math.sqrt(n))
    z2 = ((x**2).mean(0) - second) / ((x**2).std(0) / math.sqrt(n))
    return float(torch.cat([z1, z2]).abs().max())


# Step sizes large enough that a biased kernel is visible at this sample size: ULA (MALA without
# its Metropolis test) at eps = 0.4 and HMC/MALA with the Metropolis log-ratio's sign flipped fail
# both checks below (test_the_invariance_check_has_power); at eps = 0.1 / h = 0.3 they would pass.
MALA_STEP, HMC_STEP, LEAPFROG = 0.4, 0.75, 5
Z_MAX, SW_MAX = 3.5, 1.5  # exact kernels: max |z| < Z_MAX and sliced W2 < SW_MAX x the floor


def _invariance(
    kernel: sd.mcmc.Kernel, small
) -> tuple[float, float, torch.Tensor, torch.Tensor, sd.mcmc.ChainInfo]:
    """40 moves from 4000 exact draws of p_t: max |z| of the moments, sliced W2 / floor, x0, x, info."""
    _, exact, mean, second, log_prob = small
    n = 4000
    x0 = exact(n, _gen(0))
    x, info = kernel.run(x0, log_prob, steps=40, generator=_gen(1))
    floor = sd.metrics.floor(exact, n, repeats=3, generator=_gen(2))
    sw = sd.metrics.sliced_wasserstein(x, exact(n, _gen(3)), generator=_gen(4))
    return _z_moments(x, mean, second), sw / floor, x0, x, info


@pytest.mark.parametrize(
    ("kernel", "acceptance"),
    [
        (sd.mcmc.MALA(step_size=MALA_STEP), (0.85, 0.95)),
        (sd.mcmc.HMC(step_size=HMC_STEP, leapfrog_steps=LEAPFROG), (0.9, 0.99)),
    ],
    ids=["mala", "hmc"],
)
def test_exact_kernels_leave_the_noised_marginal_invariant(small, kernel, acceptance):
    z, sw_ratio, x0, x, info = _invariance(kernel, small)
    # measured (seed 0): max |z| 0.69 (mala), 1.74 (hmc); over 10 seeds at most 2.35 / 2.11
    assert z < Z_MAX
    # measured 0.88x (mala), 1.07x (hmc) of the floor 0.040; over 10 seeds at most 1.18x / 1.32x
    assert sw_ratio < SW_MAX
    assert (x - x0).abs().mean() > 0.5  # the chains moved (1.3 measured)
    lo, hi = acceptance  # measured 0.911 (mala), 0.953 (hmc)
    assert info.acceptance.shape == (4000,) and lo < info.acceptance_rate < hi


def _flipped_metropolis(log_ratio: torch.Tensor, normal) -> torch.Tensor:
    """The Metropolis test with the log-ratio's sign flipped: a plausible bug, no longer exact."""
    return sd.mcmc.base.metropolis(-log_ratio, normal)


@pytest.mark.parametrize(
    ("biased", "module", "z_min"),
    [
        (sd.mcmc.ULA(step_size=MALA_STEP), None, 5.0),
        (sd.mcmc.MALA(step_size=MALA_STEP), "langevin", 8.0),
        (sd.mcmc.HMC(step_size=HMC_STEP, leapfrog_steps=LEAPFROG), "hmc", 8.0),
    ],
    ids=["ula", "mala_flipped_sign", "hmc_flipped_sign"],
)
def test_the_invariance_check_has_power(small, monkeypatch, biased, module, z_min):
    """Biased kernels at the same steps fail both checks of the invariance test."""
    if module is not None:
        monkeypatch.setattr(getattr(sd.mcmc, module), "metropolis", _flipped_metropolis)
    z, sw_ratio, *_ = _invariance(biased, small)
    # measured (seed 0): max |z| 8.05 (ula), 16.9 (mala), 12.2 (hmc); over 10 seeds at least 6.4,
    # 16.2, 11.1. Sliced W2: 2.5x, 6.5x, 5.0x the floor; over 10 seeds at least 2.0x, 5.9x, 4.4x
    assert z > z_min > Z_MAX
    assert sw_ratio > SW_MAX


def test_ula_is_biased_by_its_step_and_the_bias_shrinks(small):
    _, exact, mean, second, log_prob = small
    n = 20000
    x0 = exact(n, _gen(0))
    var = second - mean**2

    def bias(eps: float) -> float:
        x, info = sd.mcmc.ULA(step_size=eps).run(x0, log_prob, steps=60, generator=_gen(1))
        assert info.acceptance is None and info.evaluations == 60
        return float(x.var(0).sum() / var.sum() - 1)

    big, mid, small_ = bias(0.4), bias(0.1), bias(0.025)
    # O(eps) bias of the variance (eps / (2 v) for a Gaussian): measured 0.20, 0.046, 0.012
    assert big > 0.1 and 0 < mid < big / 3 and small_ < mid / 2
    assert small_ < 0.03


def test_hmc_with_one_leapfrog_step_is_mala(small):
    _, exact, _, _, log_prob = small
    x0 = exact(200, _gen(0))
    eps = 0.3
    xm, im = sd.mcmc.MALA(step_size=eps).run(x0, log_prob, steps=5, generator=_gen(1))
    xh, ih = sd.mcmc.HMC(step_size=math.sqrt(2 * eps), leapfrog_steps=1).run(
        x0, log_prob, steps=5, generator=_gen(1)
    )
    assert torch.allclose(xm, xh, rtol=0, atol=1e-12)
    assert torch.equal(im.acceptance, ih.acceptance) and 0.5 < im.acceptance_rate < 0.95


def test_mala_acceptance_falls_with_the_step(small):
    _, exact, _, _, log_prob = small
    x0 = exact(1000, _gen(0))
    rates = [
        sd.mcmc.MALA(step_size=e).run(x0, log_prob, 3, _gen(1))[1].acceptance_rate for e in (0.05, 0.5, 3.0)
    ]
    # measured 0.998, 0.88, 0.27
    assert 1 > rates[0] > rates[1] > rates[2] > 0


# --- predictor-corrector in sd.sample --------------------------------------------------------


@pytest.fixture(scope="module")
def pc():
    gmm = smooth_mixture()
    proc = sd.VP.scaled_linear()

    def log_prob(x: torch.Tensor, t: float) -> torch.Tensor:
        return gmm.log_prob(x, float(proc.alpha(t)), float(proc.sigma(t)))

    n = 1000
    ref = gmm.sample(n, _gen(9))
    return gmm, proc, log_prob, noise(n, 8, seed=3), ref


def _sw(x, ref) -> float:
    return sd.metrics.sliced_wasserstein(x, ref, generator=_gen(5))


def test_hmc_corrector_takes_the_langevin_step_as_sqrt_2_eps_and_a_given_step_as_it_is(pc):
    """Under ``snr`` the HMC corrector's leapfrog step is ``h = sqrt(2 eps)`` of the Langevin step ``eps``
    (:meth:`~steerdiff.mcmc.HMC.step_from_langevin`), so with one leapfrog step it is the MALA corrector at
    ``eps`` in ``sd.sample``, draw for draw; a given ``step_size`` is ``h`` itself. Nothing tested either
    before: ``h = sqrt(eps)``, or a given step mapped as a Langevin one, passed the suite."""
    gmm, proc, log_prob, x_T, _ = pc
    den = gmm.denoiser(proc)
    kw = {"steps": 5, "solver": "ddim", "schedule": "time_uniform", "corrector_steps": 2, "return_info": True}
    runs = {
        "snr": (sd.mcmc.MALA(log_prob=log_prob), sd.mcmc.HMC(log_prob=log_prob, leapfrog_steps=1)),
        "given": (
            sd.mcmc.MALA(log_prob=log_prob, step_size=0.02),
            sd.mcmc.HMC(log_prob=log_prob, leapfrog_steps=1, step_size=0.2),
        ),
    }
    for name, (mala, hmc) in runs.items():
        xm, im = sd.sample(den, x_T[:200], corrector=mala, generator=_gen(4), **kw)
        xh, ih = sd.sample(den, x_T[:200], corrector=hmc, generator=_gen(4), **kw)
        torch.testing.assert_close(xh, xm, rtol=0, atol=1e-12, msg=name)
        for cm, ch in zip(im.corrector, ih.corrector, strict=True):
            assert float(ch.step_size) == pytest.approx(math.sqrt(2 * float(cm.step_size)), rel=1e-12)
            assert torch.equal(cm.acceptance, ch.acceptance)
        # the moves were tested, some rejected: measured 0.963-0.995 (snr), 0.990-0.998 (given); at 0.99 a
        # node's 400 moves are all accepted once in ~55 draws, so "some rejected" is asked of the run
        rates = [c.acceptance_rate for c in im.corrector]
        assert all(0.5 < r <= 1 for r in rates) and min(rates) < 1, name
        plain = sd.sample(den, x_T[:200], steps=5, solver="ddim", schedule="time_uniform")
        assert float((xm - plain).abs().max()) > 0.1, name  # the corrector moved the samples


def test_predictor_corrector_improves_on_the_predictor(pc):
    gmm, proc, log_prob, x_T, ref = pc
    den = gmm.denoiser(proc)
    kw = {"steps": 5, "solver": "ddim", "schedule": "time_uniform", "return_info": True}
    base = _sw(sd.sample(den, x_T, **kw)[0], ref)
    ula, iu = sd.sample(den, x_T, corrector="ula", corrector_steps=3, generator=_gen(4), **kw)
    mala = sd.mcmc.MALA(log_prob=log_prob)
    xm, im = sd.sample(den, x_T, corrector=mala, corrector_steps=3, generator=_gen(4), **kw)
    hmc = sd.mcmc.HMC(log_prob=log_prob, leapfrog_steps=3)
    xh, ih = sd.sample(den, x_T, corrector=hmc, generator=_gen(4), **kw)
    # floor 0.090; measured: ddim 0.259, +ULA 0.181, +MALA 0.174, +HMC 0.113
    assert _sw(ula, ref) < 0.8 * base and _sw(xm, ref) < 0.8 * base and _sw(xh, ref) < 0.6 * base
    # exact NFE: 5 predictor calls, 4 corrected nodes (none at the clean end)
    assert iu.nfe == 5 + 4 * 3 and im.nfe == 5 + 4 * (1 + 3) and ih.nfe == 5 + 4 * (1 + 3)
    assert len(im.corrector) == 4 and [c.t for c in im.corrector] == im.grid.t[1:-1]
    assert all(0.9 < c.acceptance_rate < 1 for c in im.corrector)  # measured 0.98-0.99


def test_ula_on_the_denoiser_score_is_ula_on_the_log_density(pc):
    gmm, proc, log_prob, x_T, _ = pc
    calls: list[float] = []

    def net(x, t):
        calls.append(float(t[0]))
        return gmm.denoise(x, float(proc.alpha(float(t[0]))), float(proc.sigma(float(t[0]))))

    den = sd.Denoiser(net, proc, prediction="x0")
    kw = {"steps": 4, "solver": "dpmpp_2m", "schedule": "logsnr_uniform", "return_info": True}
    x1, i1 = sd.sample(den, x_T[:50], corrector="ula", corrector_steps=2, generator=_gen(1), **kw)
    x2, i2 = sd.sample(
        den, x_T[:50], corrector=sd.mcmc.ULA(log_prob=log_prob), corrector_steps=2, generator=_gen(1), **kw
    )
    assert torch.allclose(x1, x2, rtol=0, atol=1e-9)
    assert i1.nfe == i2.nfe == 4 + 3 * 2 and len(calls) == i1.nfe + 4  # the score calls count as NFE


@pytest.mark.parametrize("kernel", ["ula", "mala", "hmc"])
def test_a_backward_pass_through_a_log_prob_corrector_is_exact(pc, kernel):
    """Differentiating ``sample`` through a corrector given a ``log_prob``: its gradient is taken with its own
    graph where the state requires grad, so autograd matches central differences (it was taken detached:
    0.36 relative error for ULA)."""
    gmm, proc, log_prob, x_T, _ = pc
    den = gmm.denoiser(proc)
    w = torch.randn(3, 8, dtype=F64, generator=_gen(2))
    make = {"ula": sd.mcmc.ULA, "mala": sd.mcmc.MALA, "hmc": sd.mcmc.HMC}[kernel]

    def loss(x: torch.Tensor) -> torch.Tensor:
        kw = {
            "corrector": make(log_prob=log_prob, step_size=0.05),
            "corrector_steps": 2,
            "generator": _gen(3),
        }
        return (sd.sample(den, x, 4, "ddim", "time_uniform", **kw) * w).sum()

    x = x_T[:3].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(fd.numel()):
            e = torch.zeros(fd.numel(), dtype=F64)
            e[i] = 1e-5
            fd.view(-1)[i] = (loss(x_T[:3] + e.view_as(fd)) - loss(x_T[:3] - e.view_as(fd))) / 2e-5
    assert float((grad - fd).norm() / fd.norm()) < 1e-6


def test_corrector_is_batch_invariant_with_per_sample_generators(pc):
    gmm, proc, log_prob, x_T, _ = pc
    den = gmm.denoiser(proc)
    # an explicit step: the snr rule uses batch-mean norms, so it depends on the batch
    mala = sd.mcmc.MALA(log_prob=log_prob, step_size=0.01)
    kw = {"steps": 4, "solver": "ddim", "schedule": "time_uniform", "corrector": mala, "corrector_steps": 2}
    xs = sd.sample(den, x_T[:3], generator=[_gen(10 + b) for b in range(3)], **kw)
    x1 = sd.sample(den, x_T[1:2], generator=[_gen(11)], **kw)
    assert torch.allclose(xs[1:2], x1, rtol=0, atol=1e-12)


def test_a_kernel_with_one_generator_is_refused_under_per_row_generators(pc):
    """A kernel given one generator of its own draws every row's moves from it, so under the run's
    per-row list each row would depend on the batch (measured before: 3.4 from the row alone, MALA
    at step 0.05, 20 DDPM steps): refused, naming both. A kernel with one generator per row keeps
    row ``b`` of a batch equal to the row alone."""
    gmm, proc, log_prob, x_T, _ = pc
    den = gmm.denoiser(proc)
    kw = {"steps": 4, "solver": "ddpm", "schedule": "time_uniform", "corrector_steps": 2}

    def run(rows: list[int], own: list[int]) -> torch.Tensor:
        mala = sd.mcmc.MALA(log_prob=log_prob, step_size=0.05, generator=[_gen(s) for s in own])
        return sd.sample(den, x_T[rows], generator=[_gen(r) for r in rows], corrector=mala, **kw)

    batch = run([0, 1, 2], [50, 51, 52])
    torch.testing.assert_close(batch[2:3], run([2], [52]), rtol=0, atol=1e-12)
    assert float((batch[2:3] - run([2], [99])).abs().max()) > 1e-2  # the kernel's own generator is used
    one = sd.mcmc.MALA(log_prob=log_prob, step_size=0.05, generator=_gen(3))
    with pytest.raises(
        ValueError, match=r"generator: one generator per row .* the corrector MALA draws the whole"
    ):
        sd.sample(den, x_T[:3], generator=[_gen(r) for r in range(3)], corrector=one, **kw)
    # one generator for the run too: allowed
    assert sd.sample(den, x_T[:3], generator=_gen(0), corrector=one, **kw).shape == (3, 8)


def test_run_refuses_a_brownian_tree():
    """``Kernel.run`` draws at a fixed time, where a Brownian tree's increment is 0 (before: MALA ran
    noiseless, its result the same for every seed, acceptance 1.0): refused, naming the kernel."""
    x = torch.randn(4, 2, generator=_gen(0), dtype=F64)
    tree = sd.noise.BrownianTreeNoise(x, 0.0, 1.0, seed=1)
    for kernel in (sd.mcmc.ULA(step_size=0.1), sd.mcmc.MALA(step_size=0.1), sd.mcmc.HMC(step_size=0.1)):
        name = type(kernel).__name__
        with pytest.raises(
            ValueError, match=rf"{name}\.run: generator is a Brownian tree, which has no noise"
        ):
            kernel.run(x, lambda y: -(y**2).sum(-1), steps=2, generator=tree)
    # one generator per row: row b's chain is the row's alone
    rows, _ = sd.mcmc.MALA(step_size=0.3).run(
        x, lambda y: -(y**2).sum(-1), 5, [_gen(s) for s in (4, 5, 6, 7)]
    )
    alone, _ = sd.mcmc.MALA(step_size=0.3).run(x[1:2], lambda y: -(y**2).sum(-1), 5, [_gen(5)])
    torch.testing.assert_close(rows[1:2], alone, rtol=0, atol=1e-12)


def test_a_kernel_generator_must_be_generators_one_per_row(pc):
    """The kernel's own ``generator`` is a generator or one per row, checked before sampling. Before: a
    Brownian tree there was taken as the moves' noise source and gave them none at their fixed time
    (ULA then the same for tree seeds 0 and 1, max difference 0.0, deterministic gradient ascent; MALA
    failed inside the Metropolis draw on a shape error); a list of 3 for a batch of 4 ran the first
    predictor step and the first score call (2 network calls), then failed naming only ``generator``, which
    holds 4."""
    gmm, proc, _, x_T, _ = pc
    x = x_T[:4]
    calls = [0]

    def net(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return gmm.denoise(y, float(proc.alpha(float(t[0]))), float(proc.sigma(float(t[0]))))

    den = sd.Denoiser(net, proc, prediction="x0")
    tree = sd.noise.BrownianTreeNoise(x, proc.t_min, proc.t_max, seed=0)
    for kernel in (sd.mcmc.ULA, sd.mcmc.MALA, sd.mcmc.HMC):
        with pytest.raises(
            ValueError, match=rf"{kernel.__name__}: generator must be .* got BrownianTreeNoise"
        ):
            kernel(step_size=0.05, generator=tree)
    with pytest.raises(ValueError, match=r"ULA: generator must be .* got int"):
        sd.mcmc.ULA(generator=5)
    three = sd.mcmc.ULA(step_size=0.05, generator=[_gen(s) for s in range(3)])
    with pytest.raises(ValueError, match=r"corrector ULA: generator must be .* batch = 4 .* got a list of 3"):
        sd.sample(den, x, steps=3, solver="ddim", corrector=three, generator=[_gen(s) for s in range(4)])
    assert calls[0] == 0  # refused before the first network call


def test_a_corrector_without_a_generator_is_refused_under_replayed_noise(pc):
    """Replayed noise maps (``sd.ddpm_invert(...).sample_kwargs()``) hold one draw per solver step and none
    for moves at a fixed time. Before: a corrector without a generator of its own ran the first predictor
    step (one network call), then failed inside the replay ("ReplayNoise: a draw for a step from
    t_from=0.738 to t_to=0.738, which is no step of the 6-step grid ... (another grid, or a solver that
    draws inside its step)"), naming neither the corrector nor the fix. Now refused before any call; with a
    generator of its own the corrector runs and the replay is kept."""
    gmm, proc, _, _, _ = pc
    den = gmm.denoiser(proc)
    calls = [0]

    def net(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return gmm.denoise(y, float(proc.alpha(float(t[0]))), float(proc.sigma(float(t[0]))))

    counted = sd.Denoiser(net, proc, prediction="x0")
    kw = sd.ddpm_invert(den, gmm.sample(4, _gen(0)), 6, "ddpm", generator=_gen(1)).sample_kwargs()
    with pytest.raises(
        ValueError, match=r"^corrector: generator replays noise maps, .*; give the kernel a generator$"
    ):
        sd.sample(counted, **kw, corrector="ula")
    assert calls[0] == 0
    x = sd.sample(counted, **kw, corrector=sd.mcmc.ULA(step_size=1e-3, generator=_gen(3)))
    assert x.shape == (4, 8) and calls[0] == 6 + 6  # 6 steps (final='none'), a score call after each


def test_a_log_prob_corrector_under_inference_mode_is_refused_before_any_call(pc):
    """A kernel's ``log_prob`` needs its gradient, which ``torch.inference_mode()`` forbids: before, the
    refusal came at the first corrected node, after the first predictor step's network calls (2 for Heun);
    now before any. The denoiser's score (``"ula"``) needs no gradient and still runs there."""
    gmm, proc, log_prob, x_T, _ = pc
    base = gmm.denoiser(proc)
    calls = [0]

    def net(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return base.net(y, t)

    den = sd.Denoiser(net, proc, prediction=base.prediction)
    kw = {"steps": 3, "solver": "heun", "schedule": "time_uniform", "generator": _gen(0)}
    for kernel in (sd.mcmc.MALA(log_prob=log_prob), sd.mcmc.ULA(log_prob=log_prob, step_size=0.01)):
        name = type(kernel).__name__
        with torch.inference_mode(), pytest.raises(ValueError) as e:
            sd.sample(den, x_T[:4], corrector=kernel, **kw)
        assert str(e.value) == (
            f"sample: the corrector {name}'s log_prob(x, t): its gradient is needed, which "
            "torch.inference_mode() forbids"
        )
        assert calls[0] == 0, name
    with torch.inference_mode():
        x, info = sd.sample(den, x_T[:4], corrector="ula", return_info=True, **kw)
    assert torch.isfinite(x).all() and info.nfe == 2 * 3 - 1 + 2 == calls[0]


def test_bad_corrector_input(pc):
    gmm, proc, log_prob, x_T, _ = pc
    den = gmm.denoiser(proc)
    x = x_T[:4]
    with pytest.raises(ValueError, match="needs the noised log-density"):
        sd.sample(den, x, steps=3, solver="ddim", corrector="mala")
    with pytest.raises(ValueError, match="needs the noised log-density"):
        sd.sample(den, x, steps=3, solver="ddim", corrector="hmc")
    with pytest.raises(ValueError, match="unknown corrector"):
        sd.sample(den, x, steps=3, solver="ddim", corrector="langevin")
    with pytest.raises(ValueError, match="corrector_steps"):
        sd.sample(den, x, steps=3, solver="ddim", corrector="ula", corrector_steps=0)
    with pytest.raises(ValueError, match="snr"):
        sd.sample(den, x, steps=3, solver="ddim", corrector="ula", snr=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        sd.mcmc.MALA(step_size=0.0)
    with pytest.raises(ValueError, match="leapfrog_steps"):
        sd.mcmc.HMC(leapfrog_steps=0)
    tree = sd.noise.BrownianTreeNoise(x, proc.t_min, proc.t_max)
    with pytest.raises(
        ValueError, match=r"corrector: generator is a Brownian tree.*give the kernel a generator"
    ):
        sd.sample(den, x, steps=3, solver="ddim", corrector="ula", generator=tree)

    def detached(y: torch.Tensor, t: float) -> torch.Tensor:
        with torch.no_grad():
            return log_prob(y, t)

    with pytest.raises(ValueError, match="not differentiable"):
        sd.sample(den, x, steps=3, solver="ddim", corrector=sd.mcmc.MALA(log_prob=detached))
    with pytest.raises(ValueError, match=r"must return a \(4,\) tensor"):
        sd.mcmc.MALA(step_size=0.1).run(x, lambda y: y.sum(), steps=1)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        sd.mcmc.MALA(step_size=0.1).run(x, lambda y: -(y**2).sum(-1), steps=1)
    # under torch.no_grad the corrector still differentiates a differentiable log_prob
    with torch.no_grad():
        sd.sample(den, x, steps=3, solver="ddim", corrector=sd.mcmc.MALA(log_prob=log_prob))


def test_snr_step_needs_no_host_read_and_a_zero_score_is_reported_after_the_run(pc):
    """The snr step is a device tensor: on ``meta`` (no values at all) a corrected node runs for
    ULA on the denoiser's score and for HMC on a log-density. A zero score gives an infinite step,
    reported by sd.sample after the run with the node's time (not as a NaN from the network)."""
    _, proc, _, x_T, _ = pc
    A = torch.eye(8, device="meta")
    den = sd.Denoiser(lambda x, t: x @ A, proc, "eps", shape=(8,))
    x = torch.randn(4, 8, device="meta")
    source = sd.noise.make_noise(torch.Generator())
    for kernel in (sd.mcmc.ULA(), sd.mcmc.HMC(log_prob=lambda y, t: -(y**2).sum(1), leapfrog_steps=2)):
        model = sd.solvers.Model(den, {}, source)
        y, info = sd.mcmc.correct(kernel, model, x, 500.0, 0.5, 0, 2, 0.16)
        assert y.device.type == "meta" and y.shape == (4, 8) and info.step_size.device.type == "meta"

    # eps = 0: the score -eps / sigma is zero at every node
    zero = sd.Denoiser(lambda x, t: torch.zeros_like(x), proc, "eps")
    with pytest.raises(ValueError, match=r"corrector at t=.*snr step size is inf.*explicit step_size"):
        sd.sample(zero, x_T[:4], steps=3, solver="ddim", corrector="ula", generator=_gen(2))
    # the rule: 2 (snr sqrt(d) / mean_i ||grad_i||)^2; rows of norm 3 and 5 in d = 4, snr 0.2: 0.02
    grad = torch.tensor([[3.0, 0, 0, 0], [0, 0, 4.0, 3.0]])
    assert float(sd.mcmc.snr_step_size(grad, 0.2)) == pytest.approx(0.02, rel=1e-12)
    # grad not a batched tensor: named (was an AttributeError on .shape, or an IndexError for a 0-d one)
    for bad in (grad.tolist(), None, torch.tensor(1.0), torch.zeros(0, 4)):
        with pytest.raises(ValueError, match=r"^snr_step_size: grad must be a non-empty tensor"):
            sd.mcmc.snr_step_size(bad, 0.2)


@dataclasses.dataclass
class _Shift(sd.mcmc.Kernel):
    """A move that adds 1 to every entry (no test): where a solver keeps it, the shift is exact."""

    def move(self, p, target, step_size, normal):  # type: ignore[no-untyped-def]
        return sd.mcmc.Point(p.x + 1.0), None


def _zero_noise(t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like)


# One-step maps that differ from the probability-flow ODE's where x0 = 0 (their mean under noise): their
# exact value is that of their own per-step map (DDPM-like 1.0429, EDM's churn 1.1738, ER-SDE 1.2627,
# Euler-Maruyama 0.7005), checked by hand; with eps = 0 every one but Euler-Maruyama's (and Flow-GRPO's SDE,
# the same step with another diffusion) is alpha_{i+1} / alpha_i.
_OWN_MAP_AT_X0_ZERO = (
    "accel_ddpm",
    "cps",
    "ddpm",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "edm_sde",
    "er_sde",
    "euler_ancestral",
    "lcm",
    "sa_solver",
    "tcd",
)


def test_an_empty_batch_under_an_snr_step_is_an_empty_sample(pc):
    """An empty batch samples to an empty tensor with an snr-stepped corrector as without one (and as with a
    fixed step): no score norm to take the step from, so the step is NaN (reported, not raised), the NFE
    counted as for any batch. Was: snr_step_size's ValueError for an empty grad, from sd.sample."""
    _, proc, log_prob, x_T, _ = pc
    den = pc[0].denoiser(proc)
    kw = {"steps": 5, "solver": "ddim", "schedule": "time_uniform", "return_info": True}
    plain = sd.sample(den, x_T[:0], **kw)[0]
    assert plain.shape == (0, 8) and plain.dtype == x_T.dtype
    for kernel in ("ula", sd.mcmc.HMC(log_prob=log_prob, leapfrog_steps=2)):
        x, info = sd.sample(den, x_T[:0], corrector=kernel, corrector_steps=2, generator=_gen(1), **kw)
        some = sd.sample(den, x_T[:3], corrector=kernel, corrector_steps=2, generator=_gen(1), **kw)[1]
        assert x.shape == plain.shape and x.dtype == plain.dtype and info.nfe == some.nfe
        assert len(info.corrector) == 4 and all(math.isnan(c.step_size) for c in info.corrector)


@pytest.mark.parametrize(
    "solver", [s for s in sd.solvers.available() if s not in ("euler_maruyama", "flow_sde")]
)
@pytest.mark.parametrize("zero", ["x0", "eps"])
def test_the_next_step_starts_from_the_corrected_state(solver, zero):
    """A denoiser predicting ``x0 = 0`` (``eps = 0``) makes every solver's step linear and exact,
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i`` (``alpha_{i+1} / alpha_i``), so a shift ``c`` made at each
    noisy node ``i >= 1`` ends as ``sum_i sigma_N / sigma_i c`` = 1.2795 (``sum_i alpha_N / alpha_i c`` =
    41.79; stochastic solvers with zero noise). Before: UniPC redid the step from ``x_{i-1}`` with its
    corrector and dropped every move but the last (1.0); singlestep DPM-Solver rebuilt a macro-step's end
    from its start (1.2161; 63.4 with eps = 0); the multistep solvers extrapolated through the jump the
    move makes in their estimates: eps for iPNDM (-10.66), LMS (1.1595), DEIS (1.2755), x0 for DPM-Solver++
    (2M 66.9, 3M 54.4), UniPC (54.4), MRS (78.0), SA-Solver, SDE-DPM-Solver++ and ER-SDE (with eps = 0)."""
    if zero == "x0" and solver in _OWN_MAP_AT_X0_ZERO:
        pytest.skip("its mean map is not the ODE's where x0 = 0 (tested where eps = 0)")
    den = sd.Denoiser(lambda x, t: torch.zeros_like(x), sd.VP.linear(), prediction=zero)
    x_T = torch.randn(3, 4, generator=_gen(0), dtype=F64)
    kw = {"steps": 6, "solver": solver, "schedule": "logsnr_uniform", "final": "none", "return_info": True}
    base, info = sd.sample(den, x_T, generator=_zero_noise, **kw)
    shifted, _ = sd.sample(den, x_T, corrector=_Shift(step_size=1.0), generator=_zero_noise, **kw)
    c = info.grid.sigma if zero == "x0" else info.grid.alpha
    exact = sum(c[-1] / c[i] for i in range(1, len(c)))
    torch.testing.assert_close(shifted - base, torch.full_like(base, exact), rtol=1e-12, atol=1e-12)


def test_multistep_estimates_restart_after_a_corrector():
    """PC sampling (2 ULA / MALA moves per node, 20 steps) with stochastic multistep solvers and the
    default UniPC: their x0 estimates jump at each move (by about move / alpha at low noise) and
    extrapolating through the jumps spread the samples. Sliced W2 to 2000 exact draws (floor 0.054):
    before, SA-Solver and SDE-DPM-Solver++(3M) ULA 0.135, MALA 0.125 (both 0.064-0.072 without a
    corrector), UniPC ULA 0.082; now 0.058, 0.075 and 0.052."""
    gmm, proc = smooth_mixture(), sd.VP.scaled_linear()

    def log_prob(x: torch.Tensor, t: float) -> torch.Tensor:
        return gmm.log_prob(x, float(proc.alpha(t)), float(proc.sigma(t)))

    n = 2000
    ref, x_T, den = gmm.sample(n, _gen(9)), noise(n, 8, seed=3), gmm.denoiser(proc)
    floor = _sw(gmm.sample(n, _gen(11)), ref)
    mala = sd.mcmc.MALA(log_prob=log_prob)
    for solver in ("sa_solver", "dpmpp_3m_sde", "unipc"):
        kw = {"steps": 20, "solver": solver, "corrector_steps": 2, "generator": _gen(4)}
        ula = _sw(sd.sample(den, x_T, corrector="ula", **kw), ref)
        assert ula < 1.25 * floor, (solver, ula, floor)
        if solver != "unipc":
            assert _sw(sd.sample(den, x_T, corrector=mala, **kw), ref) < 1.6 * floor, solver


def test_a_non_finite_log_prob_gradient_is_reported_as_the_correctors(pc):
    """ULA on a kernel's ``log_prob`` whose gradient is NaN at the last node (``t = 0``): before,
    ``final="none"`` returned NaN samples without an error and ``final="zero"`` blamed the model's
    next evaluation ("the model returned NaN/inf at step 3")."""
    gmm, proc, log_prob, x_T, _ = pc

    def nan_below(y: torch.Tensor, t: float) -> torch.Tensor:
        return log_prob(y, t) + (torch.sqrt(y[:, 0] - 100.0) * 0 if t == 0 else 0)

    den = gmm.denoiser(proc)
    kernel = sd.mcmc.ULA(log_prob=nan_below, step_size=1e-3)
    kw = {"steps": 4, "solver": "ddim", "schedule": "time_uniform", "corrector": kernel, "generator": _gen(0)}
    for final, step in (("none", 3), ("zero", 2)):
        with pytest.raises(
            sd.NonFiniteError, match=rf"the corrector made NaN/inf at step {step} \(process time t=0\)"
        ):
            sd.sample(den, x_T[:4], final=final, **kw)
    finite = sd.mcmc.ULA(log_prob=log_prob, step_size=1e-3)
    _, info = sd.sample(den, x_T[:4], **{**kw, "corrector": finite}, return_info=True)
    assert all(bool(c.finite) for c in info.corrector) and len(info.corrector) == 3


def test_a_nan_log_prob_under_metropolis_is_reported_not_rejected(pc):
    """MALA / HMC on a ``log_prob`` that is NaN on half of space: before, every move into (or out of) it
    was rejected and the run returned with a low acceptance and ``finite`` True; now :meth:`Kernel.run`
    raises and the corrector in ``sd.sample`` reports the node. ``-inf`` (outside the support) is a value:
    moves there are rejected, no error."""

    def nan_right(y: torch.Tensor) -> torch.Tensor:
        v = -0.5 * (y**2).sum(-1)
        return torch.where(y[:, 0] > 0, torch.full_like(v, math.nan), v)

    def outside_right(y: torch.Tensor) -> torch.Tensor:
        v = -0.5 * (y**2).sum(-1)
        return torch.where(y[:, 0] > 0, torch.full_like(v, -math.inf), v)

    x = -torch.rand(64, 3, dtype=F64, generator=_gen(1)) - 0.05  # all left of the NaN half-space
    for kernel in (sd.mcmc.MALA(step_size=0.5), sd.mcmc.HMC(step_size=0.5)):
        name = type(kernel).__name__
        with pytest.raises(sd.NonFiniteError, match=rf"{name}\.run: log_prob returned NaN"):
            kernel.run(x, nan_right, steps=3, generator=_gen(0))
        y, info = kernel.run(x, outside_right, steps=3, generator=_gen(0))
        assert bool(info.finite) and bool((y[:, 0] <= 0).all())  # moves to the right rejected
        assert 0.1 < info.acceptance_rate < 0.95, (name, info.acceptance_rate)

    gmm, proc, log_prob, x_T, _ = pc

    def nan_late(y: torch.Tensor, t: float) -> torch.Tensor:
        v = log_prob(y, t)
        return torch.where(y[:, 0] > 0, torch.full_like(v, math.nan), v) if t < 0.5 else v

    kernel = sd.mcmc.MALA(log_prob=nan_late, step_size=1e-3)
    kw = {"steps": 4, "solver": "ddim", "schedule": "time_uniform", "corrector": kernel, "generator": _gen(0)}
    with pytest.raises(sd.NonFiniteError, match=r"the corrector made NaN/inf at step \d"):
        sd.sample(gmm.denoiser(proc), x_T[:64], final="none", **kw)


def test_a_score_corrector_move_that_overflows_is_reported_as_the_correctors(pc):
    """ULA on the model's score with a step that overflows the state: the corrector's move made it NaN/inf,
    the model's next evaluation only took it as input. Before, "the model returned NaN/inf at step 0
    (evaluation 4)" (a move within the chain) and "... at step 1" (the chain's last move, evaluated by the
    next predictor step). Deferred as the model's check is off the CPU (``eager`` False): nothing is read
    during the run, :meth:`Model.check_finite` names the corrector after it."""
    gmm, proc, _, x_T, _ = pc
    den = gmm.denoiser(proc)
    x = x_T[:3].float()
    for size, moves in ((1e30, 5), (1e39, 1)):  # float32: 1e30 * score, then inf; inf at the first move
        kernel = sd.mcmc.ULA(step_size=size)
        with pytest.raises(sd.NonFiniteError, match=r"^the corrector ULA made the state diverge at step 0 "):
            sd.sample(den, x, 4, "ddim", corrector=kernel, corrector_steps=moves, generator=_gen(0))
        _, grid, slv = sd.sampling.plan(den, 4, "ddim", "logsnr_uniform", "zero", "test")
        model = sd.solvers.base.Model(den)
        model.eager = False
        sd.sampling.run_grid(slv, model, grid, x, kernel=kernel, corrector_steps=moves)  # no read: no raise
        assert model.first_nonfinite() is not None  # the model's outputs on the NaN state are NaN too
        t = f"{grid.t[1]:.6g}"
        with pytest.raises(
            sd.NonFiniteError, match=rf"^the corrector ULA .* at step 0 \(process time t={t}\)"
        ):
            model.check_finite()
    fine = sd.sample(den, x, 4, "ddim", corrector=sd.mcmc.ULA(step_size=1e-3), generator=_gen(0))
    assert bool(torch.isfinite(fine).all())


# --- exact one-move laws on a correlated Gaussian N(m, S) --------------------------------------

_M = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
_L = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [-0.3, 0.4, 0.5]], dtype=F64)
_S = _L @ _L.T  # eigenvalues 0.131, 0.756, 1.612
_P = torch.linalg.inv(_S)


def _gauss_log_prob(x: torch.Tensor) -> torch.Tensor:
    r = x - _M
    return -0.5 * ((r @ _P) * r).sum(-1) - 0.5 * torch.logdet(2 * math.pi * _S)


def _gauss_grad(x: torch.Tensor) -> torch.Tensor:
    return -(x - _M) @ _P


def _spy(module, monkeypatch, accept: bool | None = None) -> list[torch.Tensor]:
    """Record the Metropolis log-ratios ``module`` computes (``accept``: force the test's outcome)."""
    seen: list[torch.Tensor] = []
    real = module.metropolis

    def spy(log_ratio: torch.Tensor, normal) -> torch.Tensor:
        seen.append(log_ratio.clone())
        return (
            real(log_ratio, normal)
            if accept is None
            else torch.full_like(log_ratio, accept, dtype=torch.bool)
        )

    monkeypatch.setattr(module, "metropolis", spy)
    return seen


def test_mala_log_ratio_is_the_langevin_proposal_ratio(monkeypatch):
    """For given ``(x, x')``: ``log p(x') - log p(x) + log q(x | x') - log q(x' | x)`` with
    ``q(x' | x) = N(x'; x + eps grad log p(x), 2 eps I)`` (Roberts & Tweedie 1996); measured max
    difference 5e-15."""
    seen = _spy(sd.mcmc.langevin, monkeypatch)
    eps = 0.37
    x = _M + torch.randn(64, 3, generator=_gen(1), dtype=F64) @ _L.T
    x_new = x + 0.9 * torch.randn(64, 3, generator=_gen(2), dtype=F64)
    z = (x_new - x - eps * _gauss_grad(x)) / math.sqrt(2 * eps)
    draws = iter([z, torch.zeros(64, dtype=F64)])
    target = sd.mcmc.Target(log_prob=_gauss_log_prob)
    sd.mcmc.MALA().move(sd.mcmc.Point(x), target, eps, lambda like: next(draws))

    def log_q(to: torch.Tensor, frm: torch.Tensor) -> torch.Tensor:
        r = to - frm - eps * _gauss_grad(frm)
        return -(r**2).sum(-1) / (4 * eps) - 1.5 * math.log(4 * math.pi * eps)

    exact = _gauss_log_prob(x_new) - _gauss_log_prob(x) + log_q(x, x_new) - log_q(x_new, x)
    torch.testing.assert_close(seen[0], exact, rtol=0, atol=1e-12)
    assert float(exact.exp().clamp(max=1).mean()) < 0.9  # not a trivially accepted set (0.39)


def test_hmc_leapfrog_is_reversible_and_its_log_ratio_is_minus_the_energy_change(monkeypatch):
    """``L = 7`` leapfrog steps of ``h = 0.4`` from ``(x, m)`` to ``(x', m')``, then from ``(x', -m')``
    back: ``(x, -m)`` to float precision (measured 7e-16 / 2e-15), and the log-ratio is
    ``H(x, m) - H(x', m')`` with ``H = -log p + |m|^2 / 2`` (measured 9e-16; |dH| up to 2.8)."""
    seen = _spy(sd.mcmc.hmc, monkeypatch, accept=True)
    h, steps = 0.4, 7
    visited: list[torch.Tensor] = []

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        visited.append(x.detach().clone())
        return _gauss_log_prob(x)

    def leapfrog(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visited.clear()
        draws = iter([m])
        y = (
            sd.mcmc.HMC(leapfrog_steps=steps)
            .move(sd.mcmc.Point(x), sd.mcmc.Target(log_prob=log_prob), h, lambda like: next(draws))[0]
            .x
        )
        # the final momentum from the last drift and kick: m' = (x_L - x_{L-1}) / h + (h / 2) grad(x_L)
        return y, (visited[-1] - visited[-2]) / h + h / 2 * _gauss_grad(visited[-1])

    x = _M + torch.randn(16, 3, generator=_gen(8), dtype=F64) @ _L.T
    m = torch.randn(16, 3, generator=_gen(9), dtype=F64)
    y, m_y = leapfrog(x, m)
    energy = lambda x_, m_: -_gauss_log_prob(x_) + 0.5 * (m_**2).sum(-1)  # noqa: E731
    torch.testing.assert_close(seen[0], energy(x, m) - energy(y, m_y), rtol=0, atol=1e-12)
    back, m_back = leapfrog(y, -m_y)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(m_back, -m, rtol=0, atol=1e-12)
    assert float((y - x).abs().max()) > 0.5 and float(seen[0].abs().max()) > 1.0


def test_ula_one_move_law_from_the_target_is_exact():
    """From exact draws of ``N(m, S)`` one ULA move ``x + eps grad log p(x) + sqrt(2 eps) z`` is exactly
    ``N(m, S + eps^2 S^{-1})`` (``(I - eps P) S (I - eps P) + 2 eps I``, ``P = S^{-1}``): its bias. At
    eps = 0.2, 100k draws: max |z| of the covariance entries 0.86 against that law, 70 against ``S``."""
    n, eps = 100_000, 0.2
    x0 = _M + torch.randn(n, 3, generator=_gen(3), dtype=F64) @ _L.T
    x1, _ = sd.mcmc.ULA(step_size=eps).run(x0, _gauss_log_prob, steps=1, generator=_gen(4))

    def z_cov(c: torch.Tensor) -> float:
        se = torch.sqrt((c**2 + torch.outer(c.diag(), c.diag())) / n)
        return float(((torch.cov(x1.T) - c) / se).abs().max())

    law = _S + eps**2 * _P
    assert float(((x1.mean(0) - _M) / (law.diag() / n).sqrt()).abs().max()) < 4
    assert z_cov(law) < 4 and z_cov(_S) > 20


def test_corrector_arguments_without_a_corrector_are_refused(pc):
    """``corrector_steps`` / ``snr`` other than the default were silently ignored without a corrector
    (and ``snr`` with a kernel that has its own ``step_size``): each is a ValueError naming it, before
    any network call; the defaults still pass, and ``snr`` is checked whatever the kernel."""
    gmm, proc, _, x_T, _ = pc
    den = gmm.denoiser(proc)
    x = x_T[:4]
    kw = {"steps": 3, "solver": "ddim"}
    with pytest.raises(ValueError, match=r"sample: corrector_steps has no effect without corrector=.*=3"):
        sd.sample(den, x, corrector_steps=3, **kw)
    with pytest.raises(ValueError, match=r"sample: snr has no effect without corrector=.*got snr=0\.3"):
        sd.sample(den, x, snr=0.3, **kw)
    with pytest.raises(ValueError, match="sample: snr has no effect without corrector"):
        sd.sample(den, x, snr=float("nan"), **kw)
    with pytest.raises(ValueError, match=r"sample: snr has no effect with a corrector that has a step_size"):
        sd.sample(den, x, corrector=sd.mcmc.ULA(step_size=0.01), snr=-1.0, **kw)
    for snr in (float("nan"), float("inf"), 0.0, "0.3"):
        with pytest.raises(ValueError, match="sample: snr must be a finite number > 0"):
            sd.sample(den, x, corrector="ula", snr=snr, **kw)
    for steps in (0, 1.5, "2", None):
        with pytest.raises(ValueError, match="sample: corrector_steps must be an integer >= 1"):
            sd.sample(den, x, corrector="ula", corrector_steps=steps, **kw)
    ref = sd.sample(den, x, **kw)
    torch.testing.assert_close(sd.sample(den, x, corrector_steps=1, snr=0.16, **kw), ref, rtol=0, atol=0)
    # the defaults as numpy scalars (read from a config) are the defaults: np.int64(1) was refused
    torch.testing.assert_close(
        sd.sample(den, x, corrector_steps=np.int64(1), snr=np.float64(0.16), **kw), ref, rtol=0, atol=0
    )


@pytest.mark.parametrize("kernel", [sd.mcmc.ULA, sd.mcmc.MALA, sd.mcmc.HMC])
def test_kernel_run_names_itself_and_the_argument(kernel):
    """``Kernel.run`` named its steps ``chain: steps`` and its step size as the class's, and took x as a
    tensor without a check (a list: AttributeError ``'list' object has no attribute 'detach'``): each
    bad argument is a ValueError naming ``<Kernel>.run`` and it."""
    k = kernel(step_size=0.1)
    x = torch.zeros(4, 2, dtype=F64)
    lp = lambda y: -(y**2).sum(-1)  # noqa: E731
    who = rf"^{kernel.__name__}\.run"
    for steps in (0, 1.5, "2"):
        with pytest.raises(ValueError, match=rf"{who}: steps must be an integer >= 1"):
            k.run(x, lp, steps=steps)
    for bad in ([[0.0, 0.0]] * 4, x.numpy(), torch.zeros(4, 2, dtype=torch.long), torch.tensor(0.0)):
        with pytest.raises(
            ValueError, match=rf"{who}: x must be a floating-point tensor of shape \(n, \.\.\.\)"
        ):
            k.run(bad, lp, steps=1)
    with pytest.raises(ValueError, match=rf"{who}: log_prob must be callable"):
        k.run(x, None, steps=1)
    with pytest.raises(ValueError, match=rf"{who}: step_size must be a finite number > 0"):
        k.run(x, lp, steps=1, step_size=-1.0)
    for gen in (5, [_gen(0)] * 3):
        with pytest.raises(
            ValueError, match=rf"{who}: generator must be None, one torch.Generator or a list"
        ):
            k.run(x, lp, steps=1, generator=gen)
    out, _ = k.run(x, lp, steps=2, generator=_gen(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_bad_log_prob_is_named_with_its_caller_and_signature(pc):
    """Before: 'log_prob(x) must return a (4,) tensor, got (4, 2)' named no function, and under
    sd.sample called the kernel's log_prob(x, t) 'log_prob(x)'."""
    gmm, proc, log_prob, x_T, _ = pc
    x = x_T[:4]
    rows = lambda y: y  # noqa: E731 -- (n, d), not (n,)
    with pytest.raises(ValueError) as e:
        sd.mcmc.MALA(step_size=0.1).run(x, rows, steps=1)
    assert str(e.value) == "MALA.run: log_prob(x) must return a (4,) tensor, got (4, 8)"
    with torch.inference_mode(), pytest.raises(ValueError) as e:
        sd.mcmc.HMC(step_size=0.1).run(x, lambda y: -(y**2).sum(-1), steps=1)
    assert str(e.value) == (
        "HMC.run: log_prob(x): its gradient is needed, which torch.inference_mode() forbids"
    )
    den = gmm.denoiser(proc)
    with pytest.raises(ValueError) as e:
        sd.sample(den, x, steps=3, solver="ddim", corrector=sd.mcmc.MALA(log_prob=lambda y, t: y))
    assert str(e.value) == "sample: the corrector MALA's log_prob(x, t) must return a (4,) tensor, got (4, 8)"

    def detached(y: torch.Tensor, t: float) -> torch.Tensor:
        return log_prob(y, t).detach()

    with pytest.raises(ValueError) as e:
        sd.sample(den, x, steps=3, solver="ddim", corrector=sd.mcmc.HMC(log_prob=detached))
    assert str(e.value).startswith("sample: the corrector HMC's log_prob(x, t) is not differentiable in x")


def test_ula_stationary_law_on_a_gaussian_is_its_known_bias():
    """ULA ``x' = x + h grad log p(x) + sqrt(2h) z`` on ``N(m, S)`` is the linear recursion
    ``x' - m = (I - h P)(x - m) + sqrt(2h) z`` (``P = S^{-1}``), whose stationary covariance ``C`` solves
    ``C = (I - h P) C (I - h P) + 2h I``: per eigenvalue ``l`` of ``S``, ``c = 2h / (1 - (1 - h/l)^2) =
    l / (1 - h / (2l))``, i.e. ``C = S (I - (h/2) P)^{-1}`` (stable for ``h < 2 l_min``; derived here, ULA
    as in Roberts & Tweedie 1996, Bernoulli 2(4)). 300 moves from exact draws of ``N(m, S)``
    (contraction ``max |1 - h/l| = 0.94`` a move): the chain's covariance is ``C`` within its standard
    errors (measured max |z| 2.5), and far from ``S`` (measured 15.9)."""
    n, h = 20_000, 0.1
    x0 = _M + torch.randn(n, 3, generator=_gen(5), dtype=F64) @ _L.T
    x, info = sd.mcmc.ULA(step_size=h).run(x0, _gauss_log_prob, steps=300, generator=_gen(6))
    assert info.acceptance is None and info.evaluations == 300
    law = _S @ torch.linalg.inv(torch.eye(3, dtype=F64) - (h / 2) * _P)

    def z_cov(c: torch.Tensor) -> float:
        se = torch.sqrt((c**2 + torch.outer(c.diag(), c.diag())) / n)
        return float(((torch.cov(x.T) - c) / se).abs().max())

    assert float(((x.mean(0) - _M) / (law.diag() / n).sqrt()).abs().max()) < 4
    assert z_cov(law) < 4 and z_cov(_S) > 10


def test_mala_per_sample_acceptance_is_the_closed_form_probability():
    """One MALA move on ``N(0, s^2)`` (1-d) from ``x`` proposes ``x' = (1 - eps/s^2) x + sqrt(2 eps) z`` and
    accepts with probability ``a(x) = E_z min(1, p(x') q(x | x') / (p(x) q(x' | x)))``, ``q(y | x) =
    N(y; x - eps x / s^2, 2 eps)`` (Roberts & Tweedie 1996): here by quadrature over ``z``. Rows start at
    ``x = 0`` and at ``x = 2.5`` (a(x) = 0.640 and 0.930 by quadrature); each row's acceptance is its
    own fraction of accepted moves (0 or 1 for one move; a batch-wide mean would give both groups the same
    rate), and the group means are ``a(x)`` within 4 standard errors."""
    s2, eps, n = 1.0, 1.2, 4000

    def log_p(x):
        return -0.5 * x**2 / s2

    def log_q(y, x):
        return -((y - x + eps * x / s2) ** 2) / (4 * eps)

    z = np.linspace(-12, 12, 200_001)
    phi = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    starts = (0.0, 2.5)
    a = []
    for x in starts:
        y = (1 - eps / s2) * x + math.sqrt(2 * eps) * z
        r = log_p(y) - log_p(x) + log_q(x, y) - log_q(y, x)
        a.append(float(np.trapezoid(phi * np.minimum(1.0, np.exp(np.minimum(r, 0.0))), z)))
    x0 = torch.tensor(starts, dtype=F64).repeat_interleave(n)[:, None]
    _, info = sd.mcmc.MALA(step_size=eps).run(x0, lambda x: log_p(x[:, 0]), steps=1, generator=_gen(7))
    acc = info.acceptance
    assert acc.shape == (2 * n,) and bool(((acc == 0) | (acc == 1)).all())
    for k, ak in enumerate(a):
        rate = float(acc[k * n : (k + 1) * n].mean())
        assert abs(rate - ak) < 4 * math.sqrt(ak * (1 - ak) / n), (starts[k], rate, ak)
    assert a[1] - a[0] > 0.2  # the two starts are told apart (0.29 apart, 14 standard errors)
    # several moves: each row's acceptance is its own count of accepted moves over 4 (some rows 1 to 3)
    _, info4 = sd.mcmc.MALA(step_size=eps).run(x0, lambda x: log_p(x[:, 0]), steps=4, generator=_gen(8))
    acc4 = info4.acceptance
    assert torch.equal(acc4 * 4, (acc4 * 4).round()) and bool(((acc4 > 0) & (acc4 < 1)).any())


def test_hmc_log_ratio_on_a_gaussian_is_the_shadow_hamiltonians_remainder(monkeypatch):
    """On ``N(m, S)`` leapfrog of step ``h`` conserves the shadow Hamiltonian ``H~(x, m) = |m|^2 / 2 +
    r^T (P - (h^2/4) P^2) r / 2`` (``r = x - m``, ``P = S^{-1}``) exactly, for any number of steps: per
    eigen-direction ``w^2`` of ``P`` it is ``p^2/2 + w^2 x^2 (1 - h^2 w^2 / 4) / 2``, the modified energy of
    Stormer-Verlet for the harmonic oscillator (Leimkuhler & Reich 2004, "Simulating Hamiltonian Dynamics"),
    which one kick-drift-kick step maps to itself. With ``H = H~ + (h^2/8) |grad log p(x)|^2`` the
    Metropolis log-ratio ``H(x, m) - H(x', m')`` is ``(h^2/8)(|grad(x)|^2 - |grad(x')|^2)``: a function of
    the two positions alone, no momentum read from the kernel. Measured max difference 2.4e-15 (log-ratios
    up to 1.15)."""
    seen = _spy(sd.mcmc.hmc, monkeypatch, accept=True)
    h = 0.45
    x = _M + torch.randn(32, 3, generator=_gen(10), dtype=F64) @ _L.T
    target = sd.mcmc.Target(log_prob=_gauss_log_prob)
    normal = sd.mcmc.base.fixed_time(sd.noise.make_noise(_gen(11)), 0.0)
    for steps in (1, 2, 6):
        seen.clear()
        y = sd.mcmc.HMC(leapfrog_steps=steps).move(sd.mcmc.Point(x), target, h, normal)[0].x
        g2 = lambda v: (_gauss_grad(v) ** 2).sum(-1)  # noqa: E731
        torch.testing.assert_close(seen[0], h**2 / 8 * (g2(x) - g2(y)), rtol=0, atol=1e-12)
        assert float(seen[0].abs().max()) > 0.3 and float((y - x).abs().max()) > 0.3
