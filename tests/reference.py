"""Shared test oracles: small exact mixtures, the exact reference sample, and diffusers runs.

``diffusers_sample`` drives a diffusers scheduler with the *exact* Gaussian-mixture model, the
way a pipeline does (``init_noise_sigma``, ``scale_model_input``, ``step``); ``nodes_of`` reads
the timesteps it used, so that ``sd.schedules.Custom(nodes_of(sched))`` runs steerdiff on the
same grid. Those two, ``eps_net`` and ``sd_betas_config`` live in
:mod:`steerdiff.integrations.diffusers_ref` (shared with the benchmark) and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.integrations.diffusers_ref import diffusers_sample as diffusers_sample
from steerdiff.integrations.diffusers_ref import eps_net as eps_net
from steerdiff.integrations.diffusers_ref import nodes_of as nodes_of
from steerdiff.integrations.diffusers_ref import sd_betas_config as sd_betas_config
from steerdiff.metrics import relative_rmse

F64 = torch.float64
rel_rmse = relative_rmse

# Parity with a reference implementation (diffusers; k-diffusion for edm_sde), as relative RMSE. PARITY is
# the contract (README, docs/correctness.md: "to better than 1e-4"); each parity test asserts its
# scheduler's PARITY_BOUND, close to the largest value its parametrizations measure, so that a tenfold
# regression fails. Where diffusers steps in float32 (its sigma / alphas_cumprod tables; our side is
# float64) the gap is float32 rounding amplified by the steps and may differ on other CPU/BLAS builds (the
# order-3 SDE case measures 1.1e-5 with AVX2/AVX512 kernels, 6.0e-6 with ATEN_CPU_CAPABILITY=default): those
# bounds are the smallest 1-2-5 value at least 4x the measured maximum (4-10x headroom); float64-only
# comparisons get the smallest at least 2x (2-5x). Measured: torch 2.13 CPU, diffusers 0.42.1, max over
# every parametrization and over ATEN_CPU_CAPABILITY=avx512/avx2/default; docs/solvers.md quotes AVX512.
PARITY = 1e-4
PARITY_BOUND: dict[str, float] = {
    # deterministic (tests/test_solvers_basic.py, test_dpm_solver.py, test_unipc.py, test_deis_ipndm_lms.py)
    "DDIMScheduler": 2e-6,  # 3.2e-7
    "EulerDiscreteScheduler": 1e-5,  # 1.3e-6
    "HeunDiscreteScheduler": 1e-5,  # 1.4e-6
    "DPMSolverSinglestepScheduler": 2e-6,  # 4.4e-7 (dpmsolver++)
    "DPMSolverSinglestepScheduler(dpmsolver)": 5e-5,  # 1.0e-5 (order 3, 4 steps; > 1e-6 only at 4-5 steps)
    "DPMSolverMultistepScheduler": 2e-6,  # 3.7e-7 (3.9e-7 with default kernels)
    "UniPCMultistepScheduler": 2e-6,  # 3.7e-7, every intermediate state included
    "DEISMultistepScheduler": 5e-5,  # 8.0e-6 (order 3; orders 1-2 1.3e-6)
    "IPNDMScheduler": 5e-7,  # 1.1e-7
    "LMSDiscreteScheduler": 5e-6,  # 6.1e-7
    "PNDMScheduler": 2e-6,  # 4.9e-7 (PRK and PLMS modes)
    # inversion (test_invert.py)
    "DPMSolverMultistepInverseScheduler": 2e-5,  # 4.5e-6 (leading, 10 steps; linspace 1.3e-6)
    "DDIMInverseScheduler(t-independent eps)": 5e-6,  # 5.4e-7
    # stochastic, same draws (test_stochastic_basic.py, test_dpmpp_sde.py, test_sa_solver.py, ...)
    "DDPMScheduler": 5e-6,  # 7.5e-7
    "DDIMScheduler(eta)": 5e-6,  # 5.8e-7 (6.4e-7 with default kernels)
    "EulerAncestralDiscreteScheduler": 1e-5,  # 2.3e-6 (linspace, 25 steps; the others < 6.5e-7)
    "DPMSolverMultistepScheduler(sde-dpmsolver++)": 5e-6,  # 6.8e-7 (order 2; 7.2e-7 default kernels)
    "DPMSolverMultistepScheduler(sde-dpmsolver++, order 3)": 5e-5,  # 1.1e-5 (third_order="diffusers")
    "DPMSolverSDEScheduler": 2e-5,  # 2.9e-6
    "KDPM2DiscreteScheduler": 5e-6,  # 5.4e-7 (test_dpm_2.py)
    "KDPM2AncestralDiscreteScheduler": 2e-5,  # 2.7e-6 (linspace, 25 steps; the others < 6.8e-7)
    "SASolverScheduler": 1e-4,  # 1.9e-5 (its own float32 sigmas)
    "SASolverScheduler(float64)": 1e-13,  # 2.8e-14 (sigmas recomputed in float64)
    "DPMSolverMultistepScheduler(heun)": 5e-6,  # 1.2e-6 (mrs on SD's VP process; 1.25e-6 default kernels)
    "TCDScheduler": 5e-6,  # 5.6e-7 (tests/test_tcd.py; 8 steps, gamma 1; 5.7e-7 default kernels)
    "LCMScheduler": 5e-6,  # 7.9e-7 (1 step; its boundary condition by ConsistencyBoundary)
    "CMStochasticIterativeScheduler": 5e-6,  # 1.07e-6 (its float32 sigmas; 4 steps, clip_denoised)
    "CMStochasticIterativeScheduler(float64)": 1e-14,  # 3.9e-15 (its sigmas recomputed in float64)
    "k-diffusion sample_heun": 1e-14,  # 3.3e-15 (edm_sde; float64 on both sides)
}


def smooth_mixture(dim: int = 8, components: int = 4, seed: int = 0) -> sd.toy.GaussianMixture:
    """A well-conditioned mixture (std 0.55-0.9): solver error is smooth in the step size."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=F64)
    variances = 0.3 + 0.5 * torch.rand(components, dim, generator=g, dtype=F64)
    return sd.toy.GaussianMixture(means, variances, torch.ones(components, dtype=F64))


def noise(batch: int, dim: int, seed: int = 1, dtype: torch.dtype = F64) -> Tensor:
    """``randn(batch, dim)`` from ``torch.Generator().manual_seed(seed)`` in float64, the draws the tests'
    bounds were measured on (the benches' :func:`~steerdiff.bench.solvers.initial_noise` takes another
    stream, apart from the one the default mixture's means come from)."""
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def exact_sample(gmm: sd.toy.GaussianMixture, process: sd.Process, x_T: Tensor) -> Tensor:
    """What ``sd.sample`` approximates by default: ODE from ``t_max`` to ``t_min``, then denoise."""
    return gmm.reference_ode(x_T, process, process.t_max, process.t_min, denoise=True)


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of ``-log(error)`` against ``log(steps)``: the observed order."""
    xs = [math.log(s) for s in steps]
    ys = [-math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


class Noise64:
    """Standard normal draws made in float64 from one seed, then cast: the same noise in every dtype."""

    def __init__(self, seed: int = 3) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.g, dtype=torch.float64).to(like.dtype)


def smooth_v_net(process: sd.Process, mu: Tensor, w: Tensor):
    """The ``v`` of a smooth ``x0`` predictor, ``x0 = mu + alpha (x - alpha mu) + 0.1 tanh(x w)``, computed in
    float64 and returned in the input's dtype: a net whose own rounding is only its output's (the float32
    precision tests at zero terminal SNR)."""

    def net(x: Tensor, t: Tensor) -> Tensor:
        a, s = process.alpha(t.double())[:, None], process.sigma(t.double())[:, None]
        x64 = x.double()
        x0 = mu + a * (x64 - a * mu) + 0.1 * torch.tanh(x64 @ w)
        return (a * (x64 - a * x0) / s - s * x0).to(x.dtype)

    return net


def half_net(
    gmm: sd.toy.GaussianMixture,
    process: sd.Process,
    prediction: str = "eps",
    round_input: torch.dtype | None = None,
):
    """A net with half-precision input/output: the exact mixture's estimate, returned in the dtype of
    the input it got (or, with ``round_input``, computed at ``x`` rounded to that dtype and returned
    in ``x``'s dtype: a half-precision net seen from a float32 caller)."""

    def net(x: Tensor, t: Tensor) -> Tensor:
        xin = x if round_input is None else x.to(round_input)
        tt = float(t.reshape(-1)[0])
        a, s = float(process.alpha(tt)), float(process.sigma(tt))
        x0 = gmm.denoise(xin.double(), a, s)
        eps = (xin.double() - a * x0) / s
        f = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
        return f.to(xin.dtype).to(x.dtype)

    return net


class Replay:
    """A noise source that returns recorded standard normal draws in order; ``calls`` counts them."""

    def __init__(self, draws: list[Tensor]) -> None:
        self.draws, self.calls = list(draws), 0

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        z = self.draws[self.calls]
        self.calls += 1
        assert z.shape == like.shape
        return z.to(like.dtype)


class Record:
    """A noise source drawing from a seeded generator; ``log`` keeps every ``(t_from, z)``."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.log: list[tuple[float, Tensor]] = []

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        z = torch.randn(like.shape, generator=self.g, dtype=like.dtype)
        self.log.append((t_from, z))
        return z

    @property
    def drawn(self) -> list[Tensor]:
        return [z for _, z in self.log]


def drive(
    solver: sd.solvers.Solver, den: sd.Denoiser, x_T: Tensor, grid: sd.solvers.Grid, draws: list[Tensor]
) -> tuple[Tensor, list[Tensor | sd.solvers.Transition]]:
    """Run ``solver`` step by hand, drawing ``x = mean + std * z`` from ``draws`` (in order) for every
    :class:`~steerdiff.solvers.Transition`; returns the result and the steps' outputs."""
    outs: list[Tensor | sd.solvers.Transition] = []
    model, state, x = sd.solvers.Model(den, noise=Replay(draws)), solver.init_state(grid), x_T
    for i in range(grid.steps):
        out = solver.step(model, x, i, grid, state)
        outs.append(out)
        if isinstance(out, sd.solvers.Transition):
            x = out.mean + out.std * model.noise(grid.t[i], grid.t[i + 1], out.mean)
        else:
            x = out
    return x, outs


def assert_keeps_point_marginal(solver: sd.solvers.Solver, process: sd.Process, schedule: str) -> None:
    """Data = a point ``mu``: the denoiser is exact and every higher-order term vanishes, so each
    step must map ``N(alpha_i mu, sigma_i^2)`` onto ``N(alpha_{i+1} mu, sigma_{i+1}^2)``: its gain, the
    std of the transition it returns and the noise it draws itself (``model.noise``; the ``k``-th draw
    of a step is 1 in row ``k + 2``, 0 elsewhere: the rows' differences are the draws' weights)."""
    mu = torch.tensor([[0.7, -1.3]], dtype=F64)
    den = sd.Denoiser(lambda x, t: mu.expand_as(x), process, prediction="x0")
    grid = sd.solvers.make_grid(process, sd.schedules.get(schedule), 6)
    draws = [0]

    def one_hot(t_from: float, t_to: float, like: Tensor) -> Tensor:
        z = torch.zeros_like(like)
        z[2 + draws[0]] = 1.0
        draws[0] += 1
        return z

    model = sd.solvers.Model(den, noise=one_hot)
    state = solver.init_state(grid)
    for i in range(grid.steps - 1):
        draws[0] = 0
        x = grid.alpha[i] * mu + torch.tensor([0.0, grid.sigma[i], 0.0, 0.0], dtype=F64)[:, None]
        out = solver.step(model, x, i, grid, state)
        mean, std = (out.mean, out.std) if isinstance(out, sd.solvers.Transition) else (out, 0.0)
        gain = float((mean[1] - mean[0]).mean()) / grid.sigma[i]
        inner = (mean[2:] - mean[0]).mean(-1)
        assert torch.allclose(mean[0], grid.alpha[i + 1] * mu[0], rtol=1e-12, atol=1e-12)
        var = gain**2 * grid.sigma[i] ** 2 + float(inner.pow(2).sum()) + std**2
        assert math.isclose(var, grid.sigma[i + 1] ** 2, rel_tol=1e-10)


def importance_posterior_mean(
    x: Tensor, x0: Tensor, alpha: float, sigma: float
) -> tuple[Tensor, Tensor, float]:
    """Self-normalized importance estimate of ``E[x0 | x_t = x]`` from prior draws ``x0``: the
    estimate, its delta-method standard error per coordinate, and the effective sample size."""
    logw = -((x - alpha * x0) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.exp(logw - logw.max())
    est = (w[:, None] * x0).sum(0) / w.sum()
    se = ((w[:, None] ** 2 * (x0 - est) ** 2).sum(0)).sqrt() / w.sum()
    return est, se, float(w.sum() ** 2 / (w**2).sum())


def assert_nan_named_alike_on_an_accelerator(
    run: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run()`` (a net that returns NaN at some call) raises one :class:`steerdiff.NonFiniteError`, naming a
    step, on the CPU (at that call) and on an accelerator (faked: tensors that are not CPU ones; the net's
    check deferred to the end of the run)."""
    with pytest.raises(sd.NonFiniteError) as cpu:
        run()
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    with pytest.raises(sd.NonFiniteError) as accelerator:
        run()
    assert str(accelerator.value) == str(cpu.value) and "step" in str(cpu.value)


def overlap_log_z(
    g1: sd.toy.GaussianMixture, g2: sd.toy.GaussianMixture, alpha: float, sigma: float
) -> float:
    """``log int q1_t q2_t dx`` of two diagonal mixtures noised to ``alpha, sigma``: a double sum of Gaussian
    overlaps (``g1 = g2``: ``log int q_t^2``)."""
    s = alpha**2 * (g1.variances[:, None] + g2.variances[None]) + 2 * sigma**2
    d = alpha * (g1.means[:, None] - g2.means[None])
    log_w = (
        g1.weights.log()[:, None]
        + g2.weights.log()[None]
        - 0.5 * (d * d / s + torch.log(2 * math.pi * s)).sum(-1)
    )
    return float(torch.logsumexp(log_w.reshape(-1), 0))
