"""The particle engine, FK steering, best-of-N and CoDe against exact answers.

Exact targets: a Gaussian mixture tilted by a linear or quadratic reward is a Gaussian mixture
(``GaussianMixture.tilt``), with ``log Z = log E_p[exp(lam r)]`` in closed form
(``tilt_log_normalizer``). The base sampler is ER-SDE (a stochastic multistep solver, so the
engine's resampling of solver history is exercised) at 25 steps, whose discretization bias on these
mixtures (measured with 2^17 plain samples: <= 0.01 in the tilted mean, <= 0.003 in log Z) is well
below the Monte Carlo errors asserted here. DDPM at 50 steps has a first-order bias of ~0.13 in
log Z on the same problem, which is why it is not used for the convergence checks.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import CFG, DynamicThreshold
from steerdiff.noise import Generators
from steerdiff.smc import RowSlice, SMCAlgorithm, StepContext, transition_log_prob
from steerdiff.smc.best_of_n import CoDe
from steerdiff.smc.fk_steering import potential_nodes
from steerdiff.smc.svdd import SVDD
from steerdiff.solvers import Transition

from .reference import half_net, slope, smooth_mixture
from .test_device import _Syncs
from .test_guidance_cfg import counting

F64 = torch.float64
PROC = sd.VP.cosine()
GMM = smooth_mixture(dim=2, components=3, seed=0)
DEN = GMM.denoiser(PROC)
C = torch.tensor([1.0, -0.5], dtype=F64)
SOLVER, STEPS = "er_sde", 25


def linear(x: torch.Tensor) -> torch.Tensor:
    return x @ C


def tilted(lam: float) -> tuple[torch.Tensor, float]:
    """Exact mean and log-normalizer of ``p(x) exp(lam c.x)``."""
    t = GMM.tilt(linear=lam * C)
    return (t.weights[:, None] * t.means).sum(0), GMM.tilt_log_normalizer(linear=lam * C)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- lam = 0 is the base sampler -------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ddpm", "er_sde"])
def test_lam0_is_the_base_sampler(solver):
    """No weights, no resampling, and the same noise: bit-identical to ``sd.sample``."""
    batch, n, steps = 3, 5, 12
    out = sd.smc.fk_steering(
        DEN, linear, lam=0.0, shape=(batch, 2), particles=n, steps=steps, solver=solver, generator=gen(3),
        dtype=F64,
    )  # fmt: skip
    g = gen(3)
    x_T = torch.randn(batch * n, 2, generator=g, dtype=F64)
    ref = sd.sample(DEN, x_T, steps=steps, solver=solver, schedule="karras_jump", generator=g)
    assert out.x.shape == (batch, n, 2)
    assert torch.equal(out.x.reshape(-1, 2), ref)
    assert out.nfe == steps * n
    assert torch.allclose(out.log_w, torch.full((batch, n), -math.log(n), dtype=F64))
    assert not bool(out.trace.resampled.any())
    assert bool((out.trace.log_z == 0).all())
    assert torch.allclose(out.reward, linear(ref).reshape(batch, n))


@pytest.mark.parametrize("solver", ["er_sde", "dpmpp_2m_sde", "sa_solver"])
def test_the_engine_restarts_the_history_across_a_break(solver):
    """RF-Inversion's controlled field jumps at ``t = 1 - stop`` (``Denoiser.breaks``): the engine restarts a
    multistep solver's history after the step across it (``sampling.crossings``), as ``sd.sample`` does, so
    the ``lam = 0`` particles are ``sd.sample``'s bit for bit (before: the history extrapolated controlled
    estimates past the jump, off by 0.24 / 0.71 / 1.3 in max |diff| for these three solvers)."""
    from steerdiff.rf_inversion import ControlledEditing

    edit = ControlledEditing(
        GMM.denoiser(sd.RectifiedFlow()), torch.tensor([[1.0, -1.0]], dtype=F64), 0.7, stop=0.4
    )
    assert edit.breaks() == pytest.approx([0.6])
    batch, n, steps = 2, 3, 10
    x_T = torch.randn(batch * n, 2, generator=gen(1), dtype=F64)
    kw = {"steps": steps, "solver": solver, "schedule": "time_uniform"}
    out = sd.smc.fk_steering(
        edit,
        linear,
        lam=0.0,
        shape=(batch, 2),
        particles=n,
        x_T=x_T.reshape(batch, n, 2),
        generator=gen(3),
        **kw,
    )
    assert torch.equal(out.x.reshape(-1, 2), sd.sample(edit, x_T, generator=gen(3), **kw))


def test_lam0_distribution():
    """Pooled lam = 0 particles (4 x 1024) against the mixture's exact mean and covariance."""
    out = sd.smc.fk_steering(
        DEN, linear, lam=0.0, shape=(4, 2), particles=1024, steps=STEPS, solver=SOLVER, generator=gen(1),
        dtype=F64,
    )  # fmt: skip
    x = out.x.reshape(-1, 2)
    w, mu = GMM.weights, GMM.means
    mean = (w[:, None] * mu).sum(0)
    d = mu - mean
    cov = (w[:, None, None] * (torch.diag_embed(GMM.variances) + d[:, :, None] * d[:, None, :])).sum(0)
    se = (torch.diagonal(cov) / len(x)).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 4 * se).all()), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.1 * float(torch.diagonal(cov).max()))


# --- exactness: E_target[f] and log Z ---------------------------------------------------------------


def test_converges_to_exact_tilt():
    """Weighted E[x] and log Z_hat against the exact tilt: RMSE over 32 rows shrinks like N^-1/2.

    Measured (seed 0): E[x] RMSE 0.359, 0.143, 0.078 and log Z RMSE 0.301, 0.091, 0.053 at
    N = 64, 256, 1024 (slopes 0.55 and 0.62); mean log Z error at N = 1024: -0.018.
    """
    lam, ns, g = 1.0, [64, 256, 1024], gen(0)
    mean, log_z = tilted(lam)
    err, zerr = [], []
    for n in ns:
        out = sd.smc.fk_steering(
            DEN, linear, lam=lam, shape=(32, 2), particles=n, steps=STEPS, solver=SOLVER, generator=g,
            dtype=F64,
        )  # fmt: skip
        err.append(float((out.mean() - mean).pow(2).sum(-1).mean().sqrt()))
        zerr.append(float((out.log_z - log_z).pow(2).mean().sqrt()))
    assert 0.35 < slope(ns, err) < 0.75, err
    assert 0.35 < slope(ns, zerr) < 0.8, zerr
    assert err[-1] < 0.12 and zerr[-1] < 0.08, (err, zerr)
    assert abs(float((out.log_z - log_z).mean())) < 0.04
    assert bool(out.trace.resampled[:-1].all())  # ess_threshold = 1: resampled at every node


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_z_hat_is_unbiased_with_few_particles(ess_threshold):
    """The SMC estimator is unbiased for Z, not log Z: with 4 particles, over 2048 independent rows, the mean
    of ``Z_hat / Z`` is 1 (4 standard errors + 0.01 for the base sampler's bias, <= 0.003 in log Z), while
    ``log Z_hat`` is low by Jensen's gap, which shrinks as the particles grow (16). With adaptive resampling
    (0.5) the increments are weighted by the carried weights, with 1.0 the weights are reset at every node.

    Measured (seed 0, ``lam = 1``): ``E[Z_hat / Z] - 1`` +0.031 +- 0.018 (0.5), +0.028 +- 0.019 (1.0); mean
    ``log Z_hat - log Z`` -0.33 at N = 4, -0.09 at N = 16. Fails with log Z accumulated as the weighted mean
    of the increments (``sum W g``, Jensen's lower bound) or the weights not reset at a resampling.
    """
    lam, rows = 1.0, 2048
    log_z = tilted(lam)[1]
    gaps = []
    for n in (4, 16):
        out = sd.smc.fk_steering(
            DEN, linear, lam=lam, shape=(rows, 2), particles=n, steps=STEPS, solver=SOLVER,
            ess_threshold=ess_threshold, generator=gen(0), dtype=F64,
        )  # fmt: skip
        ratio = (out.log_z - log_z).exp()
        se = float(ratio.std()) / math.sqrt(rows)
        assert abs(float(ratio.mean()) - 1) < 4 * se + 0.01, (n, float(ratio.mean()), se)
        gaps.append(float((out.log_z - log_z).mean()))
    assert -0.5 < gaps[0] < -0.2 and -0.15 < gaps[1] < -0.03, gaps
    events = out.trace.resampled[:-1]
    assert bool(events.any()) and (ess_threshold == 1) == bool(events.all())


@pytest.mark.parametrize("potential", sd.smc.POTENTIALS)
def test_every_potential_targets_the_tilt(potential):
    """The final correction makes every potential's product exp(lam r(x_S)): same target, same Z.

    A z-test over 32 independent rows (4 standard errors, plus 0.02 for the base sampler's bias);
    measured standard errors of the mean: 0.01-0.03 (``sum``: about 0.05, its weights are the most
    uneven).
    """
    lam, rows = 0.5, 32
    mean, log_z = tilted(lam)
    out = sd.smc.fk_steering(
        DEN, linear, lam=lam, potential=potential, interval=8, shape=(rows, 2), particles=512, steps=STEPS,
        solver=SOLVER, generator=gen(7), dtype=F64,
    )  # fmt: skip
    for err in (out.mean() - mean, (out.log_z - log_z)[:, None]):
        se = err.std(0) / math.sqrt(rows)
        assert bool((se < 0.08).all()), se
        assert bool((err.mean(0).abs() < 4 * se + 0.02).all()), (err.mean(0), se)
    assert out.trace.resampled.any(1).nonzero().flatten().tolist() == [0, 8, 16, 24]


def nine_modes() -> sd.toy.GaussianMixture:
    """Modes on {-4, 0, 4}^2, per-coordinate variance 0.3, equal weights."""
    means = torch.tensor(list(itertools.product([-4.0, 0.0, 4.0], repeat=2)), dtype=F64)
    return sd.toy.GaussianMixture(means, torch.full((9, 2), 0.3, dtype=F64), torch.ones(9, dtype=F64))


def test_nine_modes_quadratic_reward():
    """r = -x1^2/100 - x2^2, lam = 1: exact E_target[r] = -0.29072, log Z = -1.43969 (base E[r] = -11.08)."""
    gmm = nine_modes()
    q = torch.diag(torch.tensor([2 / 100, 2.0], dtype=F64))  # r = -x^T Q x / 2
    t = gmm.tilt(quadratic=q)
    second = (t.weights[:, None] * (t.variances + t.means**2)).sum(0)
    exact = float(-second[0] / 100 - second[1])
    log_z = gmm.tilt_log_normalizer(quadratic=q)
    assert exact == pytest.approx(-0.290720, abs=1e-6) and log_z == pytest.approx(-1.439687, abs=1e-6)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return -(x[:, 0] ** 2) / 100 - x[:, 1] ** 2

    for potential in ("difference", "max"):
        out = sd.smc.fk_steering(
            gmm.denoiser(PROC), reward, lam=1.0, potential=potential, shape=(16, 2), particles=1024,
            steps=STEPS, solver=SOLVER, generator=gen(0), dtype=F64,
        )  # fmt: skip
        est = float(out.mean(out.reward).mean())
        assert est == pytest.approx(exact, abs=0.03), (potential, est)
        assert float(out.log_z.mean()) == pytest.approx(log_z, abs=0.1), potential


def recording_den(out: list[torch.Tensor], inputs: list[torch.Tensor] | None = None) -> sd.Denoiser:
    """``DEN`` (an x0-prediction net) that appends each call's output, the denoised estimate, to ``out``
    (and its input ``x`` to ``inputs``)."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = DEN.net(x, t)
        out.append(x0.clone())
        if inputs is not None:
            inputs.append(x.clone())
        return x0

    return sd.Denoiser(net, PROC, prediction="x0", shape=(2,))


def wavy(x: torch.Tensor) -> torch.Tensor:
    """A reward whose value along a denoising path goes up and down (so max, sum and last differ)."""
    return torch.sin(3 * x[:, 0]) + x[:, 1]


def expected_log_potentials(potential: str, lam: float, r: torch.Tensor) -> torch.Tensor:
    """``log G_k`` per particle from the intermediate rewards ``r`` ``(K, batch, particles)`` (Singhal et
    al. 2025, Sec. 3; the module docstring): the incremental log-weight at the k-th potential node."""
    if potential == "difference":
        return lam * torch.diff(r, dim=0, prepend=torch.zeros_like(r[:1]))  # r_0 := 0
    if potential == "max":
        return lam * torch.cummax(r, dim=0).values
    if potential == "sum":
        return lam * torch.cumsum(r, dim=0)
    return lam * r


class RecordIncrements(sd.smc.FKSteering):
    """FK steering that keeps every incremental log-weight it returns, by node."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.inc: dict[int, torch.Tensor] = {}

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        g = super().log_weight(ctx)
        if g is not None:
            self.inc[ctx.i] = g.clone()
        return g


@pytest.mark.parametrize("potential", sd.smc.POTENTIALS)
def test_potential_increments_are_exact(potential):
    """Each potential's per-step log-weight, recomputed from the rewards the run evaluated.

    With ``ess_threshold = 0`` nothing is resampled, so every particle is its own ancestry. The reward
    is evaluated on the step's denoised estimate at the potential nodes ``{1, 4, 7, 10}``
    (``interval = 3`` in ``window = (1, 11)``, 12 steps) and on the final sample; from those ``r_k``:
    the per-particle increments ``log G_k`` and the final correction ``lam r_S - sum_k log G_k``, and
    the running ``log Z = log mean_j exp(sum_{m <= k} log G_m^j)`` of the trace, to 1e-10. (The final
    weights alone cannot tell the potentials apart: every path's product is ``exp(lam r_S)``.)
    """
    lam, batch, n, steps = 0.7, 2, 6, 12
    nodes = sorted(potential_nodes(steps, 3, (1, 11)))
    assert nodes == [1, 4, 7, 10]
    x0s: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return wavy(x)

    kw = dict(shape=(batch, 2), particles=n, steps=steps, solver=SOLVER, dtype=F64)
    out = sd.smc.fk_steering(
        recording_den(x0s), reward, lam=lam, potential=potential, interval=3, window=(1, 11),
        ess_threshold=0.0, generator=gen(4), **kw,
    )  # fmt: skip
    assert not bool(out.trace.resampled.any())
    # the reward saw the denoised estimates at the potential nodes (in order), then the final sample
    assert len(x0s) == steps and len(seen) == len(nodes) + 1
    for k, i in enumerate(nodes):
        assert torch.equal(seen[k], x0s[i]), i
    assert torch.equal(seen[-1], out.x.reshape(-1, 2))
    r = torch.stack([wavy(z) for z in seen]).reshape(len(nodes) + 1, batch, n)
    r_s = r[-1]

    def log_z_trace(pot: str) -> torch.Tensor:
        cum = torch.cumsum(expected_log_potentials(pot, lam, r[:-1]), dim=0)
        z = torch.zeros(steps + 1, batch, dtype=F64)
        for k, i in enumerate(nodes):
            z[i:] = torch.logsumexp(cum[k], -1) - math.log(n)
        z[steps] = torch.logsumexp(lam * r_s, -1) - math.log(n)
        return z

    expected = log_z_trace(potential)
    assert torch.allclose(out.trace.log_z, expected, rtol=0, atol=1e-10)
    assert torch.allclose(out.log_w, lam * r_s - torch.logsumexp(lam * r_s, -1, keepdim=True), atol=1e-12)
    for other in sd.smc.POTENTIALS:  # the check has power: every other potential's trace is far off
        if other != potential:
            assert float((log_z_trace(other) - expected).abs().max()) > 0.05, other

    # per particle: the increments the hook returns, on the same paths (same generator, no resampling)
    alg = RecordIncrements(lam, potential, set(nodes))
    again = sd.smc.run_smc(DEN, alg, reward=wavy, ess_threshold=0.0, generator=gen(4), **kw)
    assert torch.equal(again.x, out.x) and torch.equal(again.trace.log_z, out.trace.log_z)
    log_g = expected_log_potentials(potential, lam, r[:-1])
    assert sorted(alg.inc) == [*nodes, steps]
    for k, i in enumerate(nodes):
        assert torch.allclose(alg.inc[i], log_g[k], rtol=0, atol=1e-12), i
    assert torch.allclose(alg.inc[steps], lam * r_s - log_g.sum(0), rtol=0, atol=1e-12)


# --- the hooks: a twisted proposal with its exact weight ----------------------------------------------


class ShiftedProposal(SMCAlgorithm):
    """A TDS-shaped plug-in: proposal mean shifted by ``delta * std``, weight ``log p(x | base) -
    log q(x | proposal)`` (exact), no reward: the weighted particles target the base sampler."""

    name = "shifted"

    def __init__(self, delta: torch.Tensor, correct: bool = True) -> None:
        self.delta, self.correct = delta, correct

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        base, prop = ctx.base_prev, ctx.proposal_prev
        if not self.correct or base is None or base.std == 0:
            return None
        return transition_log_prob(ctx.x, base) - transition_log_prob(ctx.x, prop)

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        if base.std == 0:
            return base
        return Transition(base.mean + self.delta * base.std, base.std)


def test_twisted_proposal_hook_is_exact():
    """Measured: error 0.03 (corrected) vs 1.39 (uncorrected); log Z_hat -0.001 (exact: 0)."""
    delta = torch.tensor([0.2, -0.15], dtype=F64)
    exact = (GMM.weights[:, None] * GMM.means).sum(0)
    kw = dict(shape=(16, 2), particles=512, steps=STEPS, solver=SOLVER, ess_threshold=0.5, dtype=F64)
    out = sd.smc.run_smc(DEN, ShiftedProposal(delta), generator=gen(0), **kw)
    assert float((out.mean().mean(0) - exact).norm()) < 0.1
    assert abs(float(out.log_z.mean())) < 0.03  # Z = 1: the proposal is corrected exactly
    assert bool(out.trace.resampled.any())
    wrong = sd.smc.run_smc(DEN, ShiftedProposal(delta, correct=False), generator=gen(0), **kw)
    assert float((wrong.mean().mean(0) - exact).norm()) > 0.7  # the check has power


class JacobianProbe(SMCAlgorithm):
    """``grad = True``: ``ctx.x0`` is differentiable w.r.t. ``ctx.x``; records ``d sum(x0) / dx``."""

    name = "probe"
    grad = True

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor]] = []

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if not ctx.final:
            self.seen.append((ctx.i, torch.autograd.grad(ctx.x0.sum(), ctx.x)[0]))
        return None


def test_grad_hook_gives_the_exact_jacobian():
    """Gaussian data: ``x0 = mu + alpha v (x - alpha mu) / (alpha^2 v + sigma^2)``, so the gradient of
    ``sum(x0)`` is ``alpha v / (alpha^2 v + sigma^2)`` per coordinate at every node."""
    var = torch.tensor([0.5, 2.0], dtype=F64)
    gauss = sd.toy.GaussianMixture(
        torch.tensor([[1.0, -1.0]], dtype=F64), var[None], torch.ones(1, dtype=F64)
    )
    probe = JacobianProbe()
    out = sd.smc.run_smc(
        gauss.denoiser(PROC), probe, (2, 2), particles=3, steps=6, solver=SOLVER, generator=gen(0), dtype=F64
    )
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_jump"), 6)
    assert [i for i, _ in probe.seen] == list(range(6))
    for i, g in probe.seen:
        a, s = grid.alpha[i], grid.sigma[i]
        assert torch.allclose(g, (a * var / (a * a * var + s * s)).expand(2, 3, 2), rtol=1e-10)
    assert not out.x.requires_grad


class ValueGradProbe(SMCAlgorithm):
    """``grad = True``: records ``(sum(x0), d sum(x0) / dx)`` from ``ctx.value_grad`` and the most rows its
    function was given."""

    name = "probe"
    grad = True
    sliced_grad = True

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.rows = 0

    def _sum(self, rows: RowSlice) -> tuple[torch.Tensor, torch.Tensor]:
        assert rows.x0 is not None
        self.rows = max(self.rows, rows.x.shape[0])
        v = rows.x0.sum(1)
        return v, v

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if not ctx.final:
            self.seen.append((ctx.i, *ctx.value_grad("probe", "sum(x0)", self._sum)))
        return None


def test_value_grad_gives_the_exact_jacobian_in_slices():
    """``ctx.value_grad`` through ``x0``: the exact gradient (as ``test_grad_hook_gives_the_exact_jacobian``)
    in one piece and in slices of ``max_batch = 4`` of the 2 x 3 rows, where the function sees 4 rows at
    most and the slice-wise evaluation is the step's own (the same NFE); the values and gradients agree."""
    var = torch.tensor([0.5, 2.0], dtype=F64)
    gauss = sd.toy.GaussianMixture(
        torch.tensor([[1.0, -1.0]], dtype=F64), var[None], torch.ones(1, dtype=F64)
    )
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_jump"), 6)
    probes, outs = {}, {}
    for max_batch in (None, 4):
        probes[max_batch] = probe = ValueGradProbe()
        outs[max_batch] = sd.smc.run_smc(
            gauss.denoiser(PROC), probe, (2, 2), particles=3, steps=6, solver=SOLVER, generator=gen(0),
            dtype=F64, max_batch=max_batch,
        )  # fmt: skip
        assert [i for i, _, _ in probe.seen] == list(range(6))
        for i, _, g in probe.seen:
            a, s = grid.alpha[i], grid.sigma[i]
            assert torch.allclose(g, (a * var / (a * a * var + s * s)).expand(2, 3, 2), rtol=1e-10)
    assert (probes[None].rows, probes[4].rows) == (6, 4)
    assert outs[None].nfe == outs[4].nfe == 6 * 3
    for (_, v1, g1), (_, v2, g2) in zip(probes[None].seen, probes[4].seen, strict=True):
        torch.testing.assert_close(v2, v1, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(g2, g1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(outs[4].x, outs[None].x, rtol=1e-14, atol=1e-14)


class AutogradProbe(SMCAlgorithm):
    """``grad`` without ``sliced_grad``: ``torch.autograd.grad`` of ``sum |x0|^2`` w.r.t. ``ctx.x`` in
    ``log_weight``, as ``grad`` algorithms have written it from the start."""

    name = "autograd probe"
    grad = True

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.final:
            return None
        v = -(ctx.x0**2).sum(-1)
        (g,) = torch.autograd.grad(v.sum(), ctx.x)
        ctx.state["g"] = g.detach()
        return 0.1 * v.detach()

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        return Transition(base.mean + 0.01 * ctx.state["g"], base.std)


def test_a_grad_algorithm_without_sliced_grad_keeps_the_steps_graph_under_max_batch():
    """``max_batch`` slices the network but not the step's graph of an algorithm that differentiates
    ``ctx.x0`` itself: the same particles and weights as in one piece, at the same NFE (since 7aab1e6 its
    ``torch.autograd.grad`` raised "element 0 of tensors does not require grad" under ``max_batch``)."""
    kw = {"particles": 4, "steps": 6, "solver": SOLVER, "dtype": F64}
    outs = [
        sd.smc.run_smc(DEN, AutogradProbe(), (2, 2), generator=gen(0), max_batch=max_batch, **kw)
        for max_batch in (None, 3)
    ]
    assert outs[0].nfe == outs[1].nfe == 6 * 4
    torch.testing.assert_close(outs[1].x, outs[0].x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(outs[1].log_w, outs[0].log_w, rtol=1e-14, atol=1e-14)


# --- best-of-N and CoDe ------------------------------------------------------------------------------


def expected_max(n: int) -> float:
    """E[max of n i.i.d. r = c.x], x ~ GMM: r is a 1-D mixture; E[max] = int r d(F(r)^n), by quadrature."""
    mu = GMM.means @ C
    sd_r = (GMM.variances @ (C * C)).sqrt()
    r = torch.linspace(
        float(mu.min() - 10 * sd_r.max()), float(mu.max() + 10 * sd_r.max()), 200_001, dtype=F64
    )
    cdf = (GMM.weights * 0.5 * (1 + torch.erf((r[:, None] - mu) / (sd_r * math.sqrt(2))))).sum(-1)
    fn = cdf**n
    return float(r[-1] - torch.trapezoid(fn, r))  # int r dF^n = r_max - int F^n dr


@pytest.mark.parametrize(("solver", "steps"), [("er_sde", STEPS), ("dpmpp_2m", 100)])
def test_best_of_n_expected_max(solver, steps):
    """Mean best reward over 256 rows against the exact E[max of 16] = 2.5051; a deterministic solver
    is fine (DPM-Solver++(2M) at 25 steps inflates Var[c.x] by 3.6% and E[max] by 0.07, so 100)."""
    n = 16
    out = sd.smc.best_of_n(
        DEN, linear, shape=(256, 2), particles=n, steps=steps, solver=solver, generator=gen(0), dtype=F64
    )
    best = out.reward.max(-1).values
    assert float(best.mean()) == pytest.approx(expected_max(n), abs=4 * float(best.std()) / 16)
    assert torch.equal(linear(out.sample(gen(1))), best)  # the point mass is on the best
    assert torch.allclose(out.ess(), torch.ones(256, dtype=F64))
    assert out.nfe == steps * n


@pytest.mark.parametrize("method", ["best_of_n", "fk_steering", "code"])
def test_final_none_scores_the_samples_returned(method):
    """With ``final="none"`` the last node is noisy: the final rewards are those of the samples
    returned, ``r(x_S)`` (not of their denoised estimates, which would cost ``particles`` more
    evaluations), and FK steering's final weight is ``lam r(x_S)`` over the ancestry's potentials."""
    kw = dict(shape=(8, 2), particles=4, steps=10, solver=SOLVER, generator=gen(0), dtype=F64, final="none")
    run = {
        "best_of_n": lambda: sd.smc.best_of_n(DEN, linear, **kw),
        "fk_steering": lambda: sd.smc.fk_steering(DEN, linear, lam=2.0, potential="difference", **kw),
        "code": lambda: sd.smc.code(DEN, linear, block=3, **kw),
    }
    out = run[method]()
    assert torch.allclose(out.reward, linear(out.x.flatten(0, 1)).reshape(8, 4), rtol=0, atol=1e-12)
    assert out.nfe == (9 * 4 + 1 if method == "code" else 10 * 4)  # code's node 0: the one start per row


def test_code_one_branch_is_the_base_sampler():
    out = sd.smc.code(
        DEN, linear, shape=(4, 2), particles=1, block=3, steps=10, solver=SOLVER, generator=gen(2), dtype=F64
    )
    g = gen(2)
    x_T = torch.randn(4, 2, generator=g, dtype=F64)
    ref = sd.sample(DEN, x_T, steps=10, solver=SOLVER, schedule="karras_jump", generator=g)
    assert torch.equal(out.x[:, 0], ref)


@pytest.mark.parametrize("alpha", [0.0, 0.5, math.inf])
def test_svdd_one_candidate_is_the_base_sampler(alpha):
    """``M = 1``: one candidate per step, nothing to select, so the run is ``sd.sample``'s bit for bit
    with the same generator (before: for ``alpha > 0`` each node drew its selection's uniform from the
    generator, shifting every later noise draw: a different sample, max |diff| 3.0 here)."""
    out = sd.smc.svdd(
        DEN, linear, alpha, shape=(4, 2), particles=1, steps=10, solver=SOLVER, generator=gen(2), dtype=F64
    )
    g = gen(2)
    x_T = torch.randn(4, 2, generator=g, dtype=F64)
    ref = sd.sample(DEN, x_T, steps=10, solver=SOLVER, schedule="karras_jump", generator=g)
    assert torch.equal(out.x[:, 0], ref)
    assert torch.equal(out.reward[:, 0], linear(ref))
    assert out.nfe == 10


def test_code_steers_towards_reward():
    """All branches start from one x_T; selection every block raises the reward above the base
    sampler's exact mean, and more branches raise it more."""
    base = float((GMM.weights * (GMM.means @ C)).sum())
    means = {}
    for n in (2, 8):
        out = sd.smc.code(
            DEN,
            linear,
            shape=(128, 2),
            particles=n,
            block=5,
            steps=STEPS,
            solver=SOLVER,
            generator=gen(0),
            dtype=F64,
        )
        means[n] = float(linear(out.sample()).mean())
        assert out.nfe == (STEPS - 1) * n + 1  # node 0 evaluates the common x_T once
        assert bool(out.trace.resampled[0].all()) and bool(out.trace.resampled[5].all())
        assert not bool(out.trace.resampled[1].any())
    assert base + 0.3 < means[2] < means[8], (base, means)


def _ddpm_step(
    grid: sd.solvers.Grid, i: int, x: torch.Tensor, x0: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """DDPM's step by hand, a draw from the posterior ``q(x_{i+1} | x_i, x0_hat)``; the draws in the
    order the engine makes them (``batch * particles`` rows of the sample shape)."""
    a0, a1, s1 = grid.alpha[i], grid.alpha[i + 1], grid.sigma[i + 1]
    e = math.exp(-2 * (grid.lam[i + 1] - grid.lam[i]))
    mean = e * a1 / a0 * x + a1 * (1 - e) * x0
    z = torch.randn(x.reshape(-1, x.shape[-1]).shape, generator=g, dtype=F64).reshape(x.shape)
    return mean + s1 * math.sqrt(1 - e) * z


def test_code_selects_the_best_denoised_branch():
    """CoDe reproduced by hand: DDPM (Ho et al. Eq. 6-7) from one common ``x_T``; at each block node
    ``i = 2, 4, 6`` every branch of a row continues from the branch whose *denoised estimate*
    ``x0_hat(x_i)`` (the step's own prediction, not the noisy ``x_i``) has the largest reward.

    Same generator, same draws (``x_T``, then one ``randn`` per stochastic step; the forced selection
    draws nothing), so the hand-made run must match to rounding. Node 6 is the last step, which
    returns ``x0_hat`` itself: every final particle of a row is exactly the best candidate there.
    """
    batch, n, steps, block = 3, 5, 7, 2
    xs: list[torch.Tensor] = []
    x0s: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return wavy(x)

    out = sd.smc.code(
        recording_den(x0s, xs), reward, shape=(batch, 2), particles=n, block=block, steps=steps,
        solver="ddpm", generator=gen(5), dtype=F64,
    )  # fmt: skip
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_jump"), steps)
    g = gen(5)
    x = torch.randn(batch, 1, 2, generator=g, dtype=F64).expand(batch, n, 2)  # one x_T per row
    picks = []
    for i in range(steps):
        # node 0 evaluates each row's x_T once (its copies are discarded by the selection)
        seen_x = xs[i].reshape(batch, 1 if i == 0 else n, 2)
        assert torch.allclose(seen_x, x[:, : seen_x.shape[1]], rtol=0, atol=1e-12), i
        x0 = DEN(x.reshape(-1, 2), grid.t[i]).x0.reshape(batch, n, 2)
        if i % block == 0:  # select: the common x_T at node 0, else each row's best denoised branch
            best = torch.zeros(batch, dtype=torch.long)
            if i > 0:
                assert torch.equal(seen[len(picks)], x0s[i])  # the reward scored the denoised estimates
                best = wavy(x0.reshape(-1, 2)).reshape(batch, n).argmax(-1)
                picks.append(best)
            x = x[torch.arange(batch), best][:, None].expand(batch, n, 2)
            x0 = x0[torch.arange(batch), best][:, None].expand(batch, n, 2)
        if i == steps - 1:
            x = x0
            break
        x = _ddpm_step(grid, i, x, x0, g)
    assert len(picks) == 3 and len(seen) == 4  # block nodes 2, 4, 6, then the final samples
    assert torch.allclose(out.x, x, rtol=0, atol=1e-10)
    last = x0s[steps - 1].reshape(batch, n, 2)[torch.arange(batch), picks[-1]]
    assert torch.equal(out.x, last[:, None].expand(batch, n, 2))
    assert torch.equal(seen[-1], out.x.reshape(-1, 2))
    # the check has power: scoring the noisy x_i would have picked other branches
    noisy = [wavy(xs[i]).reshape(batch, n).argmax(-1) for i in (2, 4, 6)]
    assert any(not torch.equal(p, q) for p, q in zip(picks, noisy, strict=True))


def test_svdd_selects_by_softmax_of_the_denoised_values():
    """SVDD-PM (Li et al. 2024, Alg. 1) reproduced by hand: DDPM from one common ``x_T``; at each node
    ``i >= 1`` every candidate of a row continues from candidate ``k ~ softmax_j(r(x0_hat(x_i^j)) / alpha)``,
    drawn by the inverse CDF of one uniform per row (drawn before the step's noise). Same generator,
    same draws: the hand-made run must match to rounding, and some picks are not the argmax."""
    batch, n, steps, alpha = 3, 5, 6, 0.3
    out = sd.smc.svdd(
        DEN,
        wavy,
        alpha,
        shape=(batch, 2),
        particles=n,
        steps=steps,
        solver="ddpm",
        generator=gen(5),
        dtype=F64,
    )
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_jump"), steps)
    g, rows = gen(5), torch.arange(batch)
    x = torch.randn(batch, 1, 2, generator=g, dtype=F64).expand(batch, n, 2)  # one x_T per row
    not_argmax = 0
    for i in range(steps):
        x0 = DEN(x.reshape(-1, 2), grid.t[i]).x0.reshape(batch, n, 2)
        k = torch.zeros(batch, dtype=torch.long)
        if i > 0:
            v = wavy(x0.reshape(-1, 2)).reshape(batch, n)
            u = torch.rand(batch, 1, generator=g, dtype=F64)
            k = (torch.softmax(v / alpha, -1).cumsum(-1) <= u).sum(-1).clamp(max=n - 1)
            not_argmax += int((k != v.argmax(-1)).sum())
        x, x0 = x[rows, k][:, None].expand(batch, n, 2), x0[rows, k][:, None].expand(batch, n, 2)
        if i == steps - 1:
            x = x0
            break
        x = _ddpm_step(grid, i, x, x0, g)
    assert torch.allclose(out.x, x, rtol=0, atol=1e-10)
    assert not_argmax > 0
    assert out.nfe == (steps - 1) * n + 1


@pytest.mark.parametrize("method", ["svdd", "code"])
def test_one_start_methods_refuse_an_x_T_whose_rows_differ(method):
    """SVDD (Li et al. 2024, Alg. 1) and CoDe (Singh et al. 2025, Alg. 1) branch every candidate of a row
    from one ``x_T``: the engine keeps each row's first particle at node 0. Before: an ``x_T`` of ``(batch,
    particles, ...)`` distinct draws ran, its particles 1.. discarded unread (the same result as an ``x_T``
    whose rows repeat their first particle). Now refused naming the row; a repeated start runs, as the
    default's one start per row (``x_T=None``, same generator) does."""
    run = getattr(sd.smc, method)
    kw = {"particles": 4, "steps": 6, "solver": "ddpm", "dtype": F64}
    x_T = torch.randn(3, 4, 2, generator=gen(1), dtype=F64)
    repeated = x_T[:, :1].expand_as(x_T).clone()
    repeated[2, 3] += 1e-9  # row 2's last particle differs, slightly
    with pytest.raises(
        ValueError, match=rf"^{method}: x_T: the particles of batch row 2 differ, .*first particle"
    ):
        run(DEN, wavy, x_T=repeated, generator=gen(2), **kw)
    with pytest.raises(ValueError, match=rf"^{method}: x_T: the particles of batch row 0 differ"):
        run(DEN, wavy, x_T=x_T, generator=gen(2), **kw)
    # one start per row, repeated: the run the default makes from the one start it draws, draw for draw
    default = run(DEN, wavy, shape=(3, 2), generator=gen(2), **kw)
    g = gen(2)
    first = torch.randn(3, 1, 2, generator=g, dtype=F64).expand(3, 4, 2)
    given = run(DEN, wavy, x_T=first, generator=g, **kw)  # g after the default's draw of x_T
    assert torch.equal(given.x, default.x) and torch.equal(given.log_w, default.log_w)


@pytest.mark.parametrize("method", ["svdd", "code"])
def test_one_start_node_0_evaluates_each_row_once(method, monkeypatch):
    """Node 0 of SVDD / CoDe takes its step on each row's first particle alone: the others are its copies,
    and the selection there keeps the first. The same run as one evaluating every copy (the engine without
    ``one_start``, from the same repeated ``x_T``) to rounding, with ``M - 1`` fewer evaluations per row
    and per call of that step, the rows the net saw: here a staged solver (2 calls a step), ``max_batch``
    slices and a per-row condition of the net (repeated for the particles, sliced with the rows)."""
    seen: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return DEN.net(x, t) + shift

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(2,))
    shift = torch.tensor([[0.1, -0.2], [0.0, 0.3], [-0.4, 0.2]], dtype=F64)
    x_T = torch.randn(3, 1, 2, generator=gen(4), dtype=F64).expand(3, 4, 2)
    kw = dict(particles=4, steps=6, solver="dpm_2_ancestral", x_T=x_T, max_batch=5, shift=shift)
    alg, args = (SVDD, (0.5,)) if method == "svdd" else (CoDe, ())
    run = getattr(sd.smc, method)
    once = run(den, wavy, *args, generator=gen(5), **kw)
    rows_once, seen[:] = sum(seen), []
    monkeypatch.setattr(alg, "one_start", None)
    every = run(den, wavy, *args, generator=gen(5), **kw)
    assert torch.allclose(once.x, every.x, rtol=0, atol=1e-12)
    assert torch.allclose(once.log_w, every.log_w, rtol=0, atol=1e-9)
    assert every.nfe - once.nfe == 2 * 3 and sum(seen) - rows_once == 2 * 3 * 3
    assert once.nfe == 2 + 4 * 2 * 4 + 4 and every.nfe == 6 * 2 * 4 - 4  # 2 calls a step, 1 to the clean end


@pytest.mark.parametrize("alpha", [1e-320, 1e-300])
def test_svdd_tiny_alpha_is_the_argmax_limit(alpha):
    """``softmax_j(v_j / alpha)`` tends to the argmax as ``alpha -> 0``: the logits are taken as
    ``(v_j - max v) / alpha`` (0 for the best, ``-inf`` for the rest once ``alpha`` is tiny). Before:
    ``v / alpha`` was ``+-inf`` for every candidate at ``alpha = 1e-320`` (NaN weights: the selection
    fell on the last candidate, and the run's final node raised "weight zero")."""
    svdd = sd.smc.SVDD(alpha)
    values = torch.tensor([[-3.0, -1.0, -2.0], [5.0, 7.0, 6.0], [0.25, 0.0, 0.0]], dtype=F64)
    ctx = types.SimpleNamespace(i=1, x0=values, reward=lambda z: z, gather=lambda v, last=False: v)
    for seed in range(8):
        idx = svdd.resample(ctx, torch.zeros_like(values), gen(seed))
        assert idx.tolist() == [[1] * 3, [1] * 3, [0] * 3]
    kw = dict(shape=(4, 2), particles=4, steps=5, solver=SOLVER, final="none", dtype=F64)
    out = sd.smc.svdd(DEN, linear, alpha, generator=gen(0), **kw)  # noisy, distinct final candidates
    best = out.reward.argmax(-1)
    assert torch.equal(out.weights, torch.nn.functional.one_hot(best, 4).to(F64))


# --- chunking, memory, conditioning, reproducibility --------------------------------------------------


def shifted_den(seen: list[int]) -> sd.Denoiser:
    """The mixture moved by a per-sample ``shift`` (cond), recording the rows of every net call."""

    def net(x: torch.Tensor, t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        alpha = float(PROC.alpha(float(t.reshape(-1)[0])))
        return DEN.net(x - alpha * shift, t) + shift

    return sd.Denoiser(net, PROC, prediction="x0", shape=(2,))


def test_max_batch_and_cond():
    """Chunked evaluation gives the same run; per-row cond is repeated for the particles; the network
    and the reward see at most ``max_batch`` rows."""
    shift = torch.tensor([[0.0, 0.0], [3.0, -2.0]], dtype=F64)
    kw = dict(lam=1.0, shape=(2, 2), particles=16, steps=10, solver=SOLVER, dtype=F64, shift=shift)
    seen: list[int] = []
    scored: list[int] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        scored.append(x.shape[0])
        return linear(x)

    full = sd.smc.fk_steering(shifted_den(seen), reward, generator=gen(0), **kw)
    assert max(seen) == max(scored) == 32
    seen.clear()
    scored.clear()
    chunked = sd.smc.fk_steering(shifted_den(seen), reward, generator=gen(0), max_batch=7, **kw)
    assert max(seen) == max(scored) == 7
    assert torch.allclose(chunked.x, full.x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked.log_w, full.log_w, rtol=1e-12, atol=1e-12)
    assert float((full.mean()[1] - full.mean()[0] - shift[1]).norm()) < 1.0  # row 1 lives at its shift


SHIFTS = torch.tensor([[0.0, 0.0], [3.0, -2.0], [-1.0, 2.5]], dtype=F64)  # the condition, per batch row
NULLS = torch.tensor([[0.5, 0.5], [-2.0, 1.0], [1.5, -0.5]], dtype=F64)  # CFG's null condition, per row


@pytest.mark.parametrize("method", ["fk_steering", "wrapped", "best_of_n", "svdd", "code", "tds", "fkc"])
def test_cfg_per_row_uncond_kwargs_follow_the_particles(method):
    """CFG whose null condition differs per batch row (``uncond_kwargs={"shift": (batch, 2)}``, beside a
    per-row ``shift`` in ``**cond``) under every particle method: each particle of row ``b`` sees row
    ``b``'s null, so row ``b`` of a 3-row run is bit for bit row ``b`` run alone with its null broadcast
    (``(2,)``), and the same to 1e-12 in slices of ``max_batch`` (before: a size mismatch inside the net
    at the first step, 12 rows of ``x`` against 3 of the null)."""
    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]], dtype=F64))
    seen: list[int] = []

    def run(rows: list[int], nulls: torch.Tensor, max_batch: int | None = None) -> sd.smc.Particles:
        guided: sd.Denoiser = CFG(shifted_den(seen), shifted_den(seen), 2.5, uncond_kwargs={"shift": nulls})
        kw = dict(shape=(len(rows), 2), particles=4, steps=8, dtype=F64, max_batch=max_batch)
        kw |= dict(generator=[gen(10 + r) for r in rows], shift=SHIFTS[rows])
        return {
            "fk_steering": lambda: sd.smc.fk_steering(guided, linear, lam=2.0, solver=SOLVER, **kw),
            "wrapped": lambda: sd.smc.fk_steering(DynamicThreshold(guided), linear, solver=SOLVER, **kw),
            "best_of_n": lambda: sd.smc.best_of_n(guided, linear, solver=SOLVER, **kw),
            "svdd": lambda: sd.smc.svdd(guided, linear, 0.5, solver=SOLVER, **kw),
            "code": lambda: sd.smc.code(guided, linear, block=3, solver=SOLVER, **kw),
            "tds": lambda: sd.smc.tds(guided, op, torch.tensor([0.3], dtype=F64), noise_std=0.2, **kw),
            "fkc": lambda: sd.smc.fkc_anneal(guided, 2.0, **kw),  # a CFG component; max_batch: its slices
        }[method]()

    batch = run([0, 1, 2], NULLS)
    assert max(seen) == 12
    for b in range(3):
        alone = run([b], NULLS[b])
        assert torch.equal(batch.x[b], alone.x[0]) and torch.equal(batch.log_w[b], alone.log_w[0]), b
        assert batch.nfe == alone.nfe
    assert not torch.equal(run([1], NULLS[0]).x[0], batch.x[1])  # the null matters
    seen.clear()
    chunked = run([0, 1, 2], NULLS, max_batch=5)
    assert max(seen) == 5
    torch.testing.assert_close(chunked.x, batch.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.log_w, batch.log_w, rtol=0, atol=1e-12)
    assert chunked.nfe == batch.nfe


def test_cfg_per_row_uncond_kwargs_of_another_batch_are_refused():
    """A per-row null of 2 rows for a batch of 3 (the condition it overrides has 3): a ValueError naming
    ``uncond_kwargs`` under a particle method and under ``sd.sample`` (before: a size mismatch inside the
    net); one null for all (``(1, 2)``) is the broadcast one."""
    den = shifted_den([])
    wrong = CFG(den, den, 2.5, uncond_kwargs={"shift": NULLS[:2]})
    words = (
        r"CFG: uncond_kwargs\['shift'\] has 2 rows, but the condition 'shift' it overrides has one per sample"
    )
    kw = dict(shape=(3, 2), particles=4, steps=4, dtype=F64, shift=SHIFTS)
    with pytest.raises(ValueError, match=words):
        sd.smc.fk_steering(wrong, linear, **kw)
    with pytest.raises(ValueError, match=words):
        sd.smc.best_of_n(wrong, linear, max_batch=5, **kw)
    x_T = torch.randn(3, 2, dtype=F64, generator=gen(1))
    with pytest.raises(ValueError, match=words):
        sd.sample(wrong, x_T, 4, "ddpm", generator=gen(2), shift=SHIFTS)
    # Composition's kwargs override **cond by the same rule (it raised inside the net)
    comp = sd.smc.Composition([den, den], [1.0, 1.0], kwargs=[None, {"shift": NULLS[:2]}])
    with pytest.raises(ValueError, match=r"Composition: kwargs\[1\]\['shift'\] has 2 rows"):
        sd.sample(comp, x_T, 4, "ddpm", generator=gen(2), shift=SHIFTS)
    one = sd.smc.fk_steering(
        CFG(den, den, 2.5, uncond_kwargs={"shift": NULLS[:1]}), linear, generator=gen(3), **kw
    )
    flat = sd.smc.fk_steering(
        CFG(den, den, 2.5, uncond_kwargs={"shift": NULLS[0]}), linear, generator=gen(3), **kw
    )
    assert torch.equal(one.x, flat.x)


def test_reproducible_per_seed():
    kw = dict(lam=2.0, shape=(2, 2), particles=32, steps=10, solver=SOLVER, dtype=F64)
    a = sd.smc.fk_steering(DEN, linear, generator=gen(9), **kw)
    b = sd.smc.fk_steering(DEN, linear, generator=gen(9), **kw)
    assert (
        torch.equal(a.x, b.x) and torch.equal(a.log_w, b.log_w) and torch.equal(a.trace.log_z, b.trace.log_z)
    )


def test_nfe_counts_the_net_calls_of_a_guided_denoiser():
    """Around CFG with a guidance interval (1 net call per evaluation outside, 2 inside) the engine's
    NFE per batch row is the rows the net evaluated divided by the batch (before: 2 per step); also with
    a per-row null, whose CFG the engine calls in copies (its rows taken for the particles and slices)."""
    den, rows = counting(PROC)
    guided = CFG(den, den, 3.0, uncond_kwargs={"y": 1}, interval=(0.5, 3.0))
    per_row = CFG(
        den, den, 3.0, uncond_kwargs={"y": torch.tensor([[1.0], [-1.0]], dtype=F64)}, interval=(0.5, 3.0)
    )
    batch, n, steps = 2, 3, 10
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_jump"), steps)
    inside = sum(0.5 < s / a <= 3.0 for s, a in zip(grid.sigma[:-1], grid.alpha[:-1], strict=True))
    assert 0 < inside < steps
    kw = dict(shape=(batch, 2), particles=n, steps=steps, solver="ddpm", dtype=F64)
    runs = [
        lambda mb: sd.smc.run_smc(guided, SMCAlgorithm(), generator=gen(0), max_batch=mb, **kw),
        lambda mb: sd.smc.fk_steering(guided, linear, lam=1.0, generator=gen(0), max_batch=mb, **kw),
        lambda mb: sd.smc.fk_steering(DynamicThreshold(guided), linear, generator=gen(0), max_batch=mb, **kw),
        lambda mb: sd.smc.fk_steering(
            DynamicThreshold(per_row), linear, generator=gen(0), max_batch=mb, **kw
        ),
    ]
    for run in runs:
        for max_batch in (None, 4):
            rows.clear()
            out = run(max_batch)
            assert sum(rows) == batch * out.nfe == batch * n * (steps + inside), (out.nfe, sum(rows))


# --- half precision: the net in float16/bfloat16, the particles in float32 -----------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["fk_steering", "tds"])
def test_half_precision_runs_the_particles_in_float32(method, dtype):
    """A half-precision ``x_T``: the same particles, weights and log Z, to the bit, as a float32 run whose
    net rounds its input and output to ``dtype`` (chunked, resampled, with TDS's gradients through the
    net); the rewards see float32 particles, ``Particles.x`` has ``x_T``'s dtype."""
    seen: list[torch.dtype] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return x.double() @ C

    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]]))
    y = torch.tensor([1.0])

    def run(net, x_T: torch.Tensor) -> sd.smc.Particles:
        den = sd.Denoiser(net, PROC, prediction="eps", shape=(2,))
        kw = dict(shape=(3, 2), particles=8, steps=10, solver=SOLVER, max_batch=5, x_T=x_T, generator=gen(4))
        if method == "tds":
            return sd.smc.tds(den, op, y, noise_std=0.5, **kw)
        return sd.smc.fk_steering(den, reward, lam=2.0, **kw)

    x_T = torch.randn(3, 8, 2, generator=gen(2)).to(dtype)
    half = run(half_net(GMM, PROC), x_T)
    ref = run(half_net(GMM, PROC, round_input=dtype), x_T.float())
    assert half.x.dtype == dtype
    assert torch.equal(half.x, ref.x.to(dtype))
    assert torch.equal(half.log_w, ref.log_w) and torch.equal(half.trace.log_z, ref.trace.log_z)
    assert bool(half.trace.resampled.any())
    assert method == "tds" or set(seen) == {torch.float32}


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_memory_1024_particles_64_dim():
    """1,024 particles of the 64-dim benchmark mixture, 64 steps, max_batch 128: peak RSS growth.

    Measured: +18 to +36 MiB (the particles themselves are 0.5 MiB per (1024, 64) float64 tensor).
    """
    gmm = sd.toy.default_benchmark_mixture(dim=64, components=10)
    base = gmm.denoiser(PROC)
    seen: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return base.net(x, t)

    den = sd.Denoiser(net, PROC, prediction="x0", shape=(64,))
    c = torch.randn(64, generator=gen(0), dtype=F64) / 8

    def run(particles: int, steps: int) -> sd.smc.Particles:
        return sd.smc.fk_steering(
            den, lambda x: x @ c, lam=1.0, shape=(1, 64), particles=particles, steps=steps, solver=SOLVER,
            max_batch=128, generator=gen(0), dtype=F64,
        )  # fmt: skip

    run(8, 4)  # warm-up: allocator and caches
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _rss_kib("VmRSS")
    seen.clear()
    out = run(1024, 64)
    peak_mib = (_rss_kib("VmHWM") - before) / 1024
    assert max(seen) == 128 and out.nfe == 64 * 1024
    assert peak_mib < 96, f"peak RSS growth {peak_mib:.1f} MiB"
    assert bool(torch.isfinite(out.x).all())


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fk_steering", "best_of_n", "fkc", "driftlite", "dts"])
def test_sample_keywords_are_refused_not_passed_to_the_net(method):
    """callback / corrector / corrector_steps / snr are sample's: in a particle method's **cond they reached
    the net, which ignored them where it takes **kwargs (the run went on without the corrector asked for)."""
    seen: list[str] = []

    def net(x: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.extend(kw)
        return DEN.net(x, t)

    den = sd.Denoiser(net, DEN.process, DEN.prediction, shape=DEN.shape)
    run = {
        "fk_steering": lambda **kw: sd.smc.fk_steering(den, linear, **kw),
        "best_of_n": lambda **kw: sd.smc.best_of_n(den, linear, **kw),
        "fkc": lambda **kw: sd.smc.fkc([den, den], [0.5, 0.5], **kw),
        "driftlite": lambda **kw: sd.smc.driftlite([den, den], [0.5, 0.5], **kw),
        "dts": lambda **kw: sd.smc.dts(den, linear, rollouts=2, **kw),
    }[method]
    kw = {"shape": (2, 2), "steps": 4, "generator": torch.Generator().manual_seed(0)}
    if method != "dts":
        kw["particles"] = 2
    with pytest.raises(ValueError, match=rf"^{method}: corrector, snr are arguments of sample, not of "):
        run(corrector="ula", snr=0.1, **kw)
    assert not seen


def test_bad_input():
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64)
    for thr in (-0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="ess_threshold"):
            sd.smc.fk_steering(DEN, linear, ess_threshold=thr, **kw)
    with pytest.raises(ValueError, match="particles"):
        sd.smc.fk_steering(DEN, linear, **{**kw, "particles": 0})
    with pytest.raises(ValueError, match=r"reward returned NaN or inf at node \d+"):
        sd.smc.fk_steering(DEN, lambda x: torch.where(x[:, 0] > 0, float("nan"), 0.0), **kw)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        sd.smc.fk_steering(DEN, lambda x: x, **kw)
    with pytest.raises(ValueError, match="reward must be a callable"):
        sd.smc.fk_steering(DEN, None, **kw)
    # a complex reward was cast to float64, its imaginary part dropped with only a torch warning
    with pytest.raises(ValueError, match=r"^fk_steering: reward must return real rewards, got complex128$"):
        sd.smc.fk_steering(DEN, lambda x: torch.complex(x[:, 0], x[:, 1]), **kw)
    for solver in ("ddim", "dpmpp_2m", "unipc"):
        with pytest.raises(ValueError, match=r"stochastic solver.*'ddpm'.*'er_sde'"):
            sd.smc.fk_steering(DEN, linear, **{**kw, "solver": solver})
    assert "ddpm" in sd.smc.stochastic_solvers() and "ddim" not in sd.smc.stochastic_solvers()
    sd.smc.fk_steering(DEN, linear, **{**kw, "solver": sd.solvers.DDIM(eta=1.0)})  # stochastic DDIM is fine
    # flow_sde and cps are in the accepted list; at noise_level 0 the message named 'flow_sde' / 'cps' as the
    # deterministic solver, contradicting that list: the instance given is named
    for solver in (sd.solvers.FlowSDE(noise_level=0.0), sd.solvers.CPS(noise_level=0.0)):
        with pytest.raises(ValueError, match=rf"solver {re.escape(repr(solver))} is deterministic"):
            sd.smc.fk_steering(DEN, linear, **{**kw, "solver": solver})
    with pytest.raises(ValueError, match="potential"):
        sd.smc.fk_steering(DEN, linear, potential="mean", **kw)
    with pytest.raises(ValueError, match="lam"):
        sd.smc.fk_steering(DEN, linear, lam=float("inf"), **kw)
    with pytest.raises(ValueError, match=r"^fk_steering: window must be \(start, stop\) grid nodes"):
        sd.smc.fk_steering(DEN, linear, window=(3, 9), **kw)
    with pytest.raises(ValueError, match="interval"):
        sd.smc.fk_steering(DEN, linear, interval=0, **kw)
    with pytest.raises(ValueError, match="shape"):
        sd.smc.fk_steering(DEN, linear, **{**kw, "shape": (2, 3)})
    with pytest.raises(ValueError, match="block"):
        sd.smc.code(DEN, linear, block=0, **kw)
    with pytest.raises(ValueError, match="resampler"):
        sd.smc.fk_steering(DEN, linear, resampler="bootstrap", **kw)
    with pytest.raises(ValueError, match="needs Gaussian transitions"):

        class Needs(SMCAlgorithm):
            needs_transition = True

        sd.smc.run_smc(DEN, Needs(), **{**kw, "solver": "edm_sde"})


def test_numpy_integers_are_integers_in_shape_and_window():
    """``shape`` and ``window`` took only Python ``int``: ``shape=(np.int64(2), 2)`` was refused as "not of
    positive integers" and ``window=(np.int64(1), np.int64(7))`` as not grid nodes, where ``steps``,
    ``particles`` and ``interval`` accept any integer. The same run now, bit for bit; a bad entry is named."""
    kw = dict(particles=4, steps=8, interval=2, solver=SOLVER, dtype=F64)
    ref = sd.smc.fk_steering(DEN, linear, shape=(2, 2), window=(1, 7), generator=gen(0), **kw)
    out = sd.smc.fk_steering(
        DEN,
        linear,
        shape=(np.int64(2), np.int32(2)),
        window=(np.int64(1), np.int64(7)),
        generator=gen(0),
        **kw,
    )
    assert torch.equal(out.x, ref.x) and torch.equal(out.log_w, ref.log_w)
    assert out.trace.resampled.any(1).nonzero().flatten().tolist() == [1, 3, 5]
    with pytest.raises(ValueError) as e:
        sd.smc.fk_steering(DEN, linear, shape=(2, 0), **kw)
    assert str(e.value) == "fk_steering: shape[1] must be an integer >= 1, got 0"


def test_potential_nodes_a_run_never_reaches_are_refused():
    """``FKSteering``'s nodes are the nodes ``ctx.i = 0..steps - 1`` of a run: node ``steps`` is the final
    one (its correction always applies), and one beyond is never reached. Those were silently never
    used (nodes {2, 8} with 5 steps gave a potential at 2 alone); the run now refuses them, naming
    ``nodes``, the values and the range, before any evaluation. Nodes within the range still run."""
    kw = dict(particles=3, steps=5, solver=SOLVER, dtype=F64)
    scored: list[int] = []

    def reward(x: torch.Tensor) -> torch.Tensor:
        scored.append(x.shape[0])
        return linear(x)

    for nodes, shown in (({2, 8}, "8"), ({5}, "5"), (range(0, 12, 2), "6, 8, 10")):
        message = (
            rf"^FKSteering: nodes \{{{shown}\}} are never reached by a run of steps=5, which applies them at "
            r"grid nodes 0\.\.4 \(0 <= node < steps; node 5 is the final one"
        )
        with pytest.raises(ValueError, match=message):
            sd.smc.run_smc(DEN, sd.smc.FKSteering(1.0, "difference", nodes), (2, 2), reward=reward, **kw)
        assert scored == []  # refused before the run
    seen: list[int] = []

    class Seen(sd.smc.FKSteering):
        def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
            g = super().log_weight(ctx)
            if g is not None and not ctx.final:
                seen.append(ctx.i)
            return g

    sd.smc.run_smc(DEN, Seen(1.0, "difference", {0, 4}), (2, 2), reward=linear, generator=gen(), **kw)
    assert seen == [0, 4]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"x_T": torch.zeros(2, 4, 2, dtype=torch.long)}, "x_T must have a floating dtype"),
        ({"x_T": torch.full((2, 4, 2), math.nan, dtype=F64)}, "x_T contains NaN or inf"),
        ({"dtype": torch.long}, "dtype must be float16, bfloat16, float32 or float64"),
        ({"device": 2.5}, "device must be a torch.device or a device string"),
        ({"device": True}, "device must be a torch.device or a device string"),
        (
            {"device": "gpu0"},
            r"device must be a torch.device or a device string torch accepts .* or None, got 'gpu0'",
        ),
        ({"device": -1}, "device must be a torch.device or a device string"),
    ],
)
@pytest.mark.parametrize("method", ["fk_steering", "fkc"])
def test_bad_x_T_or_dtype_is_refused(method, bad, message):
    """As ``sd.sample`` refuses them (an integer x_T ran and returned integer garbage, dtype=long raised a
    raw NotImplementedError from randn; device=2.5 ran on the CPU, "gpu0" raised torch's RuntimeError)."""
    kw = {"shape": (2, 2), "particles": 4, "steps": 3, **bad}
    with pytest.raises(ValueError, match=message):
        if method == "fkc":
            sd.smc.fkc_anneal(DEN, 2.0, **kw)
        else:
            sd.smc.fk_steering(DEN, linear, **kw)


def test_particles_resample_and_mean_check_their_input():
    """Out-of-range ancestors wrapped to another particle silently; a 1-d or float index gave raw torch
    errors, a list of values an AttributeError."""
    out = sd.smc.fk_steering(DEN, linear, shape=(2, 2), particles=4, steps=3, dtype=F64)
    picked = out.resample(torch.tensor([[3, 0, 0], [1, 1, 2]]))
    assert torch.equal(picked.x[0], out.x[0, [3, 0, 0]]) and picked.x.shape == (2, 3, 2)
    torch.testing.assert_close(picked.weights, torch.full((2, 3), 1 / 3, dtype=F64))
    for bad, message in [
        (torch.tensor([[0, 9], [1, -7]]), r"lie in \[0, particles\) = \[0, 4\), got -7..9"),
        (torch.tensor([0, 1]), r"integers of shape \(batch, n\) = \(2, n >= 1\)"),
        (torch.tensor([[0.0, 1.0], [0.0, 1.0]]), "torch.float32"),
    ]:
        with pytest.raises(ValueError, match=r"^Particles\.resample: indices must .*" + message):
            out.resample(bad)
    # the messages named the argument alone, not the method (nor did sample check its generator)
    for call, message in [
        (
            lambda: out.mean([1, 2]),
            "Particles.mean: values must be a tensor (batch, particles, ...) = (2, 4), got list",
        ),
        (
            lambda: out.sample(generator=[gen(0)]),
            "Particles.sample: generator must be None, one torch.Generator or a list of batch = 2 of them "
            "(one per batch row), got a list of 1",
        ),
        (
            lambda: sd.smc.Particles(out.x, out.log_w).log_z,
            "Particles.log_z: these particles carry no trace (no log Z estimate)",
        ),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message


def test_particles_carry_no_graph_across_steps():
    """A net with trainable parameters, outside ``torch.no_grad()``: the run holds no autograd graph (it
    kept one through every step, its memory growing with them, resampling having no gradient)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2).double()
    den = sd.Denoiser(lambda x, t: 0.1 * net(x), PROC, "eps")
    for out in (
        sd.smc.fk_steering(den, linear, shape=(2, 2), particles=4, steps=3, dtype=F64),
        sd.smc.best_of_n(den, linear, shape=(2, 2), particles=4, steps=3, dtype=F64),
        sd.smc.svdd(den, linear, 0.5, shape=(2, 2), particles=4, steps=3, dtype=F64),
    ):
        assert not out.x.requires_grad and not out.reward.requires_grad


def test_huge_log_weights_stay_normalized():
    """Rewards of 1e20: each row's log-weights still sum to one (``lw - logsumexp(lw)`` near 1e20 lost the
    particles' differences to rounding: logsumexp read log 4, the weights summing to 4)."""
    out = sd.smc.fk_steering(
        DEN, lambda x: 1e20 * x[:, 0], potential="max", shape=(3, 2), particles=4, steps=5, dtype=F64
    )
    torch.testing.assert_close(torch.logsumexp(out.log_w, -1), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    assert bool(torch.isfinite(out.trace.log_z).all())


OBS = torch.tensor([[0.3], [-0.8], [1.1]], dtype=F64)  # DPS's observation, per batch row


@pytest.mark.parametrize("method", ["fk_steering", "best_of_n", "svdd", "code", "fkc"])
def test_per_sample_observations_in_a_wrapper_follow_the_particles(method):
    """DPS with one observation per batch row (``y`` of ``batch`` rows) under every particle method: each
    particle of row ``b`` is guided by row ``b``'s, so row ``b`` of a 3-row run is bit for bit row ``b``
    run alone with its observation broadcast (``(1,)``), and the same to 1e-12 in slices of ``max_batch``
    (before: refused, a batch's worth always and any per-sample ``y`` under ``max_batch``). A ``y`` of
    ``batch x particles`` rows, each row's repeated (the old contract), is the same run, also in slices;
    another row count is refused by name before sampling."""
    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]], dtype=F64))

    def run(rows: list[int], y: torch.Tensor, max_batch: int | None = None) -> sd.smc.Particles:
        guided = sd.guidance.DPS(DEN, op, y, noise_std=0.2)
        kw = dict(shape=(len(rows), 2), particles=4, steps=8, solver=SOLVER, dtype=F64, max_batch=max_batch)
        kw["generator"] = [gen(10 + r) for r in rows]
        return {
            "fk_steering": lambda: sd.smc.fk_steering(guided, linear, lam=2.0, **kw),
            "best_of_n": lambda: sd.smc.best_of_n(guided, linear, **kw),
            "svdd": lambda: sd.smc.svdd(guided, linear, 0.5, **kw),
            "code": lambda: sd.smc.code(guided, linear, block=3, **kw),
            "fkc": lambda: sd.smc.fkc_anneal(guided, 2.0, **kw),  # a DPS component; max_batch: its slices
        }[method]()

    batch = run([0, 1, 2], OBS)
    for b in range(3):
        alone = run([b], OBS[b])
        assert torch.equal(batch.x[b], alone.x[0]) and torch.equal(batch.log_w[b], alone.log_w[0]), b
    assert not torch.equal(run([1], OBS[0]).x[0], batch.x[1])  # the observation matters
    expanded = OBS.repeat_interleave(4, dim=0)
    assert torch.equal(run([0, 1, 2], expanded).x, batch.x)
    for y in (OBS, expanded):
        chunked = run([0, 1, 2], y, max_batch=5)
        torch.testing.assert_close(chunked.x, batch.x, rtol=0, atol=1e-12)
        torch.testing.assert_close(chunked.log_w, batch.log_w, rtol=0, atol=1e-12)
        assert chunked.nfe == batch.nfe
    for max_batch in (None, 5):
        with pytest.raises(
            ValueError, match=r"DPS: y holds 2 observations .* give one for all \(\(1,\)\) or 3 or 12"
        ):
            run([0, 1, 2], OBS[:2], max_batch)


def test_taken_observations_have_their_own_cache():
    """``MeasurementGuided.take_rows``: a copy with ``y`` taken (and cached on its own: the original's
    cached ``y`` is not reused), itself where ``y`` is one for all or already has the call's rows; a
    slice of a batch it does not match is refused by name."""
    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]], dtype=F64))
    dps = sd.guidance.DPS(DEN, op, OBS, noise_std=0.2)
    x = torch.zeros(3, 2, dtype=F64)
    assert torch.equal(dps.observation(x), OBS)
    taken = dps.take_rows(torch.tensor([2, 2, 0, 1]), 3)
    assert isinstance(taken, sd.guidance.DPS) and taken is not dps and taken.base is DEN
    assert torch.equal(taken.observation(torch.zeros(4, 2, dtype=F64)), OBS[[2, 2, 0, 1]])
    assert torch.equal(taken.take_rows(slice(1, 3), 4).observation(x[:2]), OBS[[2, 0]])
    assert torch.equal(dps.observation(x), OBS)  # the original's cache untouched
    assert dps.take_rows(torch.tensor([0, 0, 1]), 2) is dps  # one per call row already
    one = sd.guidance.DPS(DEN, op, OBS[0], noise_std=0.2)
    assert one.take_rows(torch.tensor([0, 0, 1]), 2) is one
    with pytest.raises(
        ValueError, match=r"DPS: y holds 3 observations for calls on 2 samples taken from a batch of 4"
    ):
        dps.take_rows(slice(0, 2), 4)


def test_a_per_sample_observation_is_converted_once_per_max_batch_slice(monkeypatch):
    """Under ``max_batch`` each slice's copy of DPS is made once per run and keeps its converted ``y``
    (on a GPU a host-to-device copy): 3 conversions for 12 rows in slices of 5 over 20 steps (60 when a
    new copy was taken for every slice at every step), and the same particles as without slices."""
    from steerdiff.guidance._measurement import MeasurementGuided

    misses = [0]
    observation = MeasurementGuided.observation

    def counted(self, x):
        hit = self._y.get((x.device, x.dtype))
        misses[0] += hit is None or hit[0] is not self.y
        return observation(self, x)

    monkeypatch.setattr(MeasurementGuided, "observation", counted)
    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]], dtype=F64))
    dps = sd.guidance.DPS(DEN, op, OBS, noise_std=0.2)
    kw = {"lam": 1.0, "shape": (3, 2), "particles": 4, "steps": 20, "dtype": F64}
    whole = sd.smc.fk_steering(dps, linear, generator=gen(1), **kw)
    assert misses[0] == 1
    misses[0] = 0
    sliced = sd.smc.fk_steering(dps, linear, generator=gen(1), max_batch=5, **kw)
    assert misses[0] == 3
    torch.testing.assert_close(sliced.x, whole.x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("particles", [5, 7, 16])
def test_uniform_weights_are_not_resampled_at_threshold_one(particles):
    """``ess_threshold = 1`` resamples where the ESS is below N; equal weights (a constant reward) have
    ESS = N up to rounding (4.999.. for N = 5) and are never resampled."""
    out = sd.smc.fk_steering(
        DEN, lambda x: torch.zeros(x.shape[0], dtype=x.dtype), lam=1.0, shape=(3, 2), particles=particles,
        steps=8, ess_threshold=1.0, solver=SOLVER, generator=gen(1), dtype=F64,
    )  # fmt: skip
    assert not bool(out.trace.resampled.any())
    torch.testing.assert_close(out.trace.ess, torch.full_like(out.trace.ess, float(particles)))


@pytest.mark.parametrize("method", ["fk_steering", "best_of_n", "svdd", "code", "fkc", "tds"])
def test_one_generator_per_batch_row_makes_each_row_batch_independent(method):
    """``generator=[g_0, ..., g_{B-1}]``: row ``b``'s initial particles, step noise and resampling come
    from ``g_b`` alone, so a row is bit for bit the same run alone or in a batch (DESIGN: per-sample
    reproducibility, as ``sd.sample`` with a list); one generator for all rows is unchanged."""
    y = torch.tensor([[0.3], [0.1], [-0.4]], dtype=F64)
    op = sd.inverse.Matrix(torch.tensor([[1.0, 0.5]], dtype=F64))

    def run(rows: slice, seeds: list[int]) -> sd.smc.Particles:
        kw = dict(shape=(len(seeds), 2), particles=8, steps=12, solver=SOLVER, dtype=F64)
        kw["generator"] = [gen(s) for s in seeds]
        return {
            "fk_steering": lambda: sd.smc.fk_steering(DEN, linear, lam=2.0, **kw),
            "best_of_n": lambda: sd.smc.best_of_n(DEN, linear, **kw),
            "svdd": lambda: sd.smc.svdd(DEN, linear, 0.5, **kw),
            "code": lambda: sd.smc.code(DEN, linear, block=3, **kw),
            "fkc": lambda: sd.smc.fkc_anneal(DEN, 2.0, **kw),
            "tds": lambda: sd.smc.tds(DEN, op, y[rows], noise_std=0.2, **kw),
        }[method]()

    batch, alone = run(slice(0, 3), [11, 12, 13]), run(slice(1, 2), [12])
    assert torch.equal(batch.x[1], alone.x[0]) and torch.equal(batch.log_w[1], alone.log_w[0])
    assert not torch.equal(batch.x[0], batch.x[1])
    draws = batch.sample(generator=[gen(1), gen(2), gen(3)])
    assert torch.equal(draws[1:2], alone.sample(generator=[gen(2)]))


@pytest.mark.parametrize(
    ("noiseless", "noisy"),
    [
        (sd.solvers.EulerAncestral(eta=0.0), sd.solvers.EulerAncestral(eta=0.5)),
        (sd.solvers.DPMSolverSDEMultistep(eta=0.0), sd.solvers.DPMSolverSDEMultistep(eta=0.5)),
        (sd.solvers.DPMSolverSDE(eta=0.0), sd.solvers.DPMSolverSDE(eta=0.5)),
        (sd.solvers.SASolver(tau=0.0), sd.solvers.SASolver(tau=lambda t: 0.0 if t < 0.5 else 1.0)),
        (sd.solvers.ERSDE(noise_scale="ode"), sd.solvers.ERSDE(noise_scale="sde")),
        (sd.solvers.EDMStochasticHeun(s_churn=0.0), sd.solvers.EDMStochasticHeun(s_churn=10.0)),
        (sd.solvers.EDMStochasticHeun(s_noise=0.0), sd.solvers.EDMStochasticHeun(s_noise=0.5)),
        (sd.solvers.FlowSDE(noise_level=0.0), sd.solvers.FlowSDE(noise_level=0.7)),
        (sd.solvers.CPS(noise_level=0.0), sd.solvers.CPS(noise_level=0.8)),
    ],
    ids=lambda solver: re.sub(r" at 0x[0-9a-f]+", "", repr(solver)),  # the same ids in every process (xdist)
)
def test_a_stochastic_family_without_noise_is_deterministic(noiseless, noisy):
    """A stochastic solver's options that draw no noise (eta = 0, tau = 0, ER-SDE's "ode", no churn)
    make it deterministic, as DDIM(eta=0): particle methods refuse it. Before, they accepted it and the
    resampled copies never diverged (16 particles collapsed onto 5 distinct paths under fk_steering)."""
    assert not noiseless.stochastic and noisy.stochastic
    kw = dict(shape=(1, 2), particles=4, steps=5, dtype=F64, generator=gen(0))
    with pytest.raises(ValueError, match="deterministic"):
        sd.smc.fk_steering(DEN, linear, solver=noiseless, **kw)
    sd.smc.fk_steering(DEN, linear, solver=noisy, **kw)  # accepted


@pytest.mark.parametrize(
    ("solver", "schedule", "quiet", "noisy"),
    [
        ("ddpm", "karras", (1,), 2),  # one step: the jump to the clean end only (accepted before)
        ("restart", "karras", (10, 19), 20),
        (sd.solvers.Restart(restart_info=[]), "karras", (10, 19), None),
        ("edm_sde", "karras", (2,), 3),
        (sd.solvers.SASolver(tau=lambda t: 0.0), "karras", (5,), None),
        (sd.solvers.SASolver(tau=lambda t: float(t > 0.5)), "karras", (), 5),
    ],
)
def test_a_solver_that_adds_no_noise_on_the_grid_is_refused(solver, schedule, quiet, noisy):
    """``Solver.noisy_on(grid)``: Restart's automatic plan restarts only from 20 steps on (and
    ``restart_info=[]`` never), EDM's churn acts only at nodes with ``sigma/alpha`` in ``[s_tmin, s_tmax]``
    (on VP cosine no noisy node of Karras' 2 steps is, one of 3 is), SA-Solver's ``tau`` function may vanish
    on the whole grid; elsewhere their steps are the probability-flow ODE's and draw no noise, so particle
    methods refuse them as they refuse DDIM(eta=0). Before, fk_steering accepted restart at 10 and 19 steps
    and its 16 particles collapsed onto 2 distinct paths (6 at 20 steps, which restart)."""
    kw = dict(shape=(1, 2), particles=16, dtype=F64, generator=gen(0), schedule=schedule)
    for steps in quiet:
        with pytest.raises(ValueError, match=r"adds noise nowhere on this grid"):
            sd.smc.fk_steering(DEN, linear, lam=2.0, steps=steps, solver=solver, **kw)
    if noisy is not None:
        out = sd.smc.fk_steering(DEN, linear, lam=2.0, steps=noisy, solver=solver, **kw)
        assert len(torch.unique(out.x[0], dim=0)) > 2


@pytest.mark.parametrize(
    ("generator", "got"),
    [
        ([gen(0), gen(1), gen(2)], "a list of 3"),
        ([gen(0), 1], "a list of 2 whose [1] is int"),
        (sd.noise.GeneratorNoise(gen(0)), "GeneratorNoise"),
        (3, "int"),
        ("seed", "str"),  # was "a list of 4 whose [0] is str"
    ],
)
def test_particle_methods_name_a_bad_generator(generator, got):
    # before: AttributeError 'list' object has no attribute 'device'
    kw = dict(shape=(2, 2), particles=4, steps=3, solver=SOLVER, dtype=F64, generator=generator)
    calls = {
        "fk_steering": lambda: sd.smc.fk_steering(DEN, linear, **kw),
        "best_of_n": lambda: sd.smc.best_of_n(DEN, linear, **kw),
        "svdd": lambda: sd.smc.svdd(DEN, linear, **kw),
        "fkc": lambda: sd.smc.fkc_anneal(DEN, 2.0, **kw),
    }
    for who, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert f"{who}: generator must be None, one torch.Generator or a list of batch = 2 of them" in msg, (
            msg
        )
        assert f"got {got}" in msg, msg


class _KnownEvents(SMCAlgorithm):
    """Weights that collapse row 0 at nodes 1 and 3 (ESS 1.0002 < N / 2), keep row 1 uniform, and a forced
    selection of every row at node 4: the resampling events are known in advance."""

    name = "known_events"

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.final:
            return None
        inc = torch.zeros(ctx.x.shape[:2], dtype=F64)
        if ctx.i in (1, 3):
            inc[0, 1:] = -10.0
        return inc

    def resample(self, ctx: StepContext, log_w: torch.Tensor, generator: torch.Generator | None):
        if ctx.i == 4:
            return torch.arange(log_w.shape[1]).expand(log_w.shape).flip(1)
        return None


def test_trace_events_lists_the_resampled_nodes_per_row():
    out = sd.smc.run_smc(
        DEN, _KnownEvents(), (2, 2), particles=4, steps=6, solver=SOLVER, dtype=F64,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.trace.events == [[1, 3, 4], [4]]
    assert out.trace.resampled.shape == (7, 2)
    assert out.trace.ess[1, 0] < 1.001 and out.trace.ess[1, 1] == pytest.approx(4.0, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda kw: sd.smc.fk_steering(DEN, linear, potential="mean", **kw),
            "fk_steering: potential must be one of ['difference', 'max', 'sum', 'immediate'], got 'mean'",
        ),
        (
            lambda kw: sd.smc.fk_steering(DEN, linear, progress="no", **kw),
            "fk_steering: progress must be True or False, got 'no'",
        ),
        (
            lambda kw: sd.smc.fkc_anneal(DEN, 2.0, correct="no", **kw),
            "fkc: correct must be True or False, got 'no'",
        ),
        # final was checked by the grid alone, named make_grid, a function the caller never called
        (
            lambda kw: sd.smc.fk_steering(DEN, linear, final="last", **kw),
            "fk_steering: final must be one of ['zero', 'none'], got 'last'",
        ),
        (
            lambda kw: sd.smc.fkc_anneal(DEN, 2.0, final="last", **kw),
            "fkc: final must be one of ['zero', 'none'], got 'last'",
        ),
        (
            lambda kw: sd.smc.run_smc(DEN, SMCAlgorithm(), final=None, **kw),
            "run_smc: final must be one of ['zero', 'none'], got None",
        ),
    ],
)
def test_option_messages_name_the_owner(call, message):
    with pytest.raises(ValueError) as e:
        call(dict(shape=(2, 2), particles=4, steps=5, dtype=F64))
    assert str(e.value) == message


# --- what the engine resamples and checks ------------------------------------------------------------

_Pair = collections.namedtuple("_Pair", "state tag")


@dataclasses.dataclass(frozen=True)
class _Frozen:
    state: dict


class _UserBox:
    def __init__(self, state: dict) -> None:
        self.state = state


@dataclasses.dataclass(eq=False)
class _BoxedERSDE(sd.solvers.ERSDE):
    """ER-SDE with its state (a History in a dict) kept inside another container."""

    name: ClassVar[str] = "boxed_er_sde"
    box: str = "deque"

    def init_state(self, grid: sd.solvers.Grid) -> dict:
        inner = super().init_state(grid)
        make = {
            "deque": lambda: collections.deque([inner], maxlen=1),
            "namedtuple": lambda: _Pair(inner, "tag"),
            "frozen dataclass": lambda: _Frozen(inner),
            "user class": lambda: _UserBox(inner),
        }
        return {"box": make[self.box]()}

    def step(
        self, model: sd.solvers.Model, x: torch.Tensor, i: int, grid: sd.solvers.Grid, state: dict
    ) -> torch.Tensor | Transition:
        box = state["box"]
        return super().step(model, x, i, grid, box[0] if isinstance(box, collections.deque) else box.state)


@pytest.mark.parametrize("box", ["deque", "namedtuple", "frozen dataclass"])
def test_solver_state_in_a_container_is_resampled(box):
    """The same run as er_sde's own (list/dict) state, bit for bit. Before: a deque or a dataclass kept
    the old particles' history (E[x0_0] 1.31 against the exact 1.19), a
    namedtuple raised TypeError."""
    kw = dict(lam=2.0, shape=(2, 2), particles=16, steps=12, dtype=F64)
    ref = sd.smc.fk_steering(DEN, linear, solver=SOLVER, generator=gen(4), **kw)
    out = sd.smc.fk_steering(DEN, linear, solver=_BoxedERSDE(box=box), generator=gen(4), **kw)
    assert bool(ref.trace.resampled.any())
    assert torch.equal(out.x, ref.x) and torch.equal(out.log_w, ref.log_w)


def test_solver_state_in_an_unknown_object_is_refused():
    with pytest.raises(ValueError) as e:
        sd.smc.fk_steering(
            DEN, linear, lam=2.0, shape=(2, 2), particles=8, steps=6, solver=_BoxedERSDE(box="user class"),
            generator=gen(0), dtype=F64,
        )  # fmt: skip
    assert str(e.value) == (
        "the solver state holds a _UserBox with tensors in it, which the particle engine cannot resample "
        "with the particles; keep per-particle tensors in a dict, list, tuple, namedtuple, "
        "collections.deque, dataclass or steerdiff.solvers.History"
    )


def _as_float(log_w: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return sd.smc.systematic(log_w, generator).double()


def _one_short(log_w: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return sd.smc.systematic(log_w, generator)[:, :-1]


def _as_list(log_w: torch.Tensor, generator: Generators = None) -> list:
    return sd.smc.systematic(log_w, generator).tolist()


def _shifted(log_w: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return sd.smc.systematic(log_w, generator) + log_w.shape[1]


def _as_int32(log_w: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    return sd.smc.systematic(log_w, generator).to(torch.int32)


@pytest.mark.parametrize(
    ("resampler", "message"),
    [
        (_as_float, "got torch.float64 of shape (2, 4)"),
        (_one_short, "got torch.int64 of shape (2, 3)"),
        (_as_list, "got list"),
    ],
)
def test_a_resamplers_output_is_checked(resampler, message):
    """Before: RuntimeError / AttributeError from inside the engine."""
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64, generator=gen(0))
    with pytest.raises(ValueError) as e:
        sd.smc.fk_steering(DEN, linear, resampler=resampler, **kw)
    name = resampler.__name__
    assert str(e.value) == (
        f"resampler {name!r} must return integer ancestor indices of shape (batch, particles) = (2, 4), "
        + message
    )


def test_a_resamplers_indices_are_checked():
    """Out of range: refused naming the resampler and the node (before: IndexError); int32: taken."""
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64, generator=gen(0))
    with pytest.raises(ValueError) as e:
        sd.smc.fk_steering(DEN, linear, resampler=_shifted, **kw)
    assert str(e.value) == (
        "resampler '_shifted' returned an ancestor index outside [0, particles) = [0, 4) at node 0"
    )
    int32 = sd.smc.fk_steering(DEN, linear, resampler=_as_int32, **{**kw, "generator": gen(1)})
    assert torch.equal(int32.x, sd.smc.fk_steering(DEN, linear, **{**kw, "generator": gen(1)}).x)


def _off_by_one(log_w: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    idx = sd.smc.systematic(log_w, generator)
    idx[0, -1] = log_w.shape[1]  # row 0 only: flat, the first particle of row 1
    return idx


class _RowProbe(SMCAlgorithm):
    """Random weights (every node resampled at threshold 1); records row 0's parents at node 1."""

    name = "row_probe"

    def __init__(self) -> None:
        self.parents: torch.Tensor | None = None

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.i == 1:
            self.parents = ctx.x_prev[0]
        return torch.randn(ctx.x.shape[:2], generator=gen(ctx.i), dtype=F64)


@pytest.mark.parametrize("accelerator", [False, True])
def test_an_out_of_range_index_never_crosses_batch_rows(accelerator, monkeypatch):
    """An index == N in row 0 took row 1's first particle, silently. CPU tensors
    are refused at once; on an accelerator (tensors that are not CPU ones, faked) the index is clamped
    into the row and the run ends with the error (no device read per step)."""
    if accelerator:
        monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    x_T = torch.randn(2, 4, 2, generator=gen(0), dtype=F64)
    x_T[1] += 100.0  # row 1's particles, tagged
    probe = _RowProbe()
    with pytest.raises(ValueError) as e:
        sd.smc.run_smc(
            DEN, probe, (2, 2), particles=4, steps=3, solver=SOLVER, resampler=_off_by_one, ess_threshold=1.0,
            x_T=x_T, generator=gen(0),
        )  # fmt: skip
    assert (
        str(e.value)
        == "resampler '_off_by_one' returned an ancestor index outside [0, particles) = [0, 4) at node 0"
    )
    if accelerator:
        assert float(probe.parents.abs().max()) < 10  # before: 101.4 (row 1's particle)


class _BadSelection(SMCAlgorithm):
    name = "bad_selection"

    def __init__(self, shift: int, dtype: torch.dtype = torch.long) -> None:
        self.shift, self.dtype = shift, dtype

    def resample(self, ctx: StepContext, log_w: torch.Tensor, generator: torch.Generator | None):
        if ctx.i == 2:
            return (torch.arange(log_w.shape[1]) + self.shift).expand(log_w.shape).to(self.dtype)
        return None


def test_a_resample_hooks_output_is_checked():
    """Before: only the shape was checked (an index of N took a particle of the next row)."""
    kw = dict(shape=(2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64, generator=gen(0))
    with pytest.raises(ValueError) as e:
        sd.smc.run_smc(DEN, _BadSelection(1), **kw)
    assert str(e.value) == (
        "bad_selection: resample returned an ancestor index outside [0, particles) = [0, 4) at node 2"
    )
    with pytest.raises(ValueError) as e:
        sd.smc.run_smc(DEN, _BadSelection(0, F64), **kw)
    assert str(e.value) == (
        "bad_selection: resample must return integer ancestor indices of shape (batch, particles) = (2, 4), "
        "got torch.float64 of shape (2, 4)"
    )


class _SetWeight(SMCAlgorithm):
    """Zero increments, but ``value`` for row 1 (particle 0 only unless ``whole_row``) at node ``at``."""

    name = "set_weight"

    def __init__(self, value: float, at: int, whole_row: bool = False) -> None:
        self.value, self.at, self.whole_row = value, at, whole_row

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        inc = torch.zeros(ctx.x.shape[:2], dtype=F64)
        if ctx.i == self.at:
            inc[1, slice(None) if self.whole_row else 0] = self.value
        return inc


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize(
    ("alg", "message"),
    [
        (_SetWeight(math.nan, 2), "log_weight returned NaN or +inf at node 2 (batch row 1)"),
        (_SetWeight(math.inf, 5), "log_weight returned NaN or +inf at node 5 (batch row 1)"),
        (
            _SetWeight(-math.inf, 3, whole_row=True),
            "log_weight gave every particle of batch row 1 weight zero",
        ),
    ],
)
def test_nonfinite_weights_are_reported(alg, message, accelerator, monkeypatch):
    """Before: accepted, ending in NaN weights and log Z. CPU tensors at once, an
    accelerator's (faked) at the end of the run; the built-in resampler then sees NaN weights and must
    stay in range (residual returned N)."""
    if accelerator:
        monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    with pytest.raises(ValueError) as e:
        sd.smc.run_smc(
            DEN, alg, (2, 2), particles=4, steps=5, solver=SOLVER, resampler="residual", dtype=F64,
            generator=gen(0),
        )  # fmt: skip
    assert str(e.value).startswith(f"set_weight: {message}"), str(e.value)
    ok = sd.smc.run_smc(DEN, _SetWeight(-math.inf, 3), (2, 2), particles=4, steps=5, solver=SOLVER, dtype=F64)
    assert ok.log_w[1, 0] == -math.inf and bool(torch.isfinite(ok.log_z).all())  # one zero weight is fine


def test_no_reward_names_the_argument():
    class Needs(SMCAlgorithm):
        def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
            return ctx.reward(ctx.x)

    with pytest.raises(ValueError) as e:
        sd.smc.run_smc(DEN, Needs(), (2, 2), particles=4, steps=3, solver=SOLVER, dtype=F64)
    assert str(e.value) == "ctx.reward: this run has no reward; pass reward= to run_smc"


def test_transition_log_prob_float32_is_accumulated_in_float64():
    """A twisted proposal's correction ``log N(x; base) - log N(x; proposal)`` at 32,768 dimensions in
    float32 against float64: the squares were summed in float32, 2.5e-3 nats off at worst over 32
    particles; accumulated in float64, 1.5e-5."""
    g = torch.Generator().manual_seed(0)
    d, s = 4 * 64 * 64 * 2, 0.01
    mean = torch.randn(4, 8, d, generator=g)
    prop = mean + s * s * 300 * torch.randn(4, 8, d, generator=g) / math.sqrt(d)
    x = prop + s * torch.randn(mean.shape, generator=g)

    def w(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return transition_log_prob(x, Transition(a, s)) - transition_log_prob(x, Transition(b, s))

    ref = w(x.double(), mean.double(), prop.double())
    got = w(x, mean, prop)
    assert got.dtype == F64 and float(ref.abs().median()) > 1.0
    assert float((got - ref).abs().max()) < 1e-4


def test_transition_log_prob_of_point_masses():
    """``std = 0``: a point mass (0 at its mean, -inf elsewhere); before: ValueError."""
    x = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]], dtype=F64)  # (batch 2, particles 1, 2)
    assert transition_log_prob(x, Transition(x.clone(), 0.0)).tolist() == [[0.0], [0.0]]
    assert transition_log_prob(x, Transition(x + torch.tensor([0.0, 1e-12], dtype=F64), 0.0)).tolist() == [
        [-math.inf],
        [-math.inf],
    ]
    std = torch.tensor([0.0, 2.0], dtype=F64)  # degenerate in the first coordinate only
    mean = x + torch.tensor([0.0, 1.0], dtype=F64)
    gauss = -0.125 - math.log(2.0) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(
        transition_log_prob(x, Transition(mean, std)), torch.full((2, 1), gauss, dtype=F64)
    )
    with pytest.raises(ValueError, match=r"transition_log_prob: std must be >= 0, got -1.0"):
        transition_log_prob(x, Transition(x, -1.0))


def test_transition_log_prob_is_exact_and_its_differences_keep_float32_accuracy():
    """A scalar std: the Gaussian log-density in closed form (float64 out), and in float32 the difference
    of two at the same std (a twisted proposal's weight, at 16,384 values per particle and std 1e-3)
    within 5e-6 of float64: the constants summed per value in float32 cost 2.3e-5 before."""
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(2, 3, 5, generator=g, dtype=F64)
    want = -0.5 * ((x - mean) / 0.7).pow(2).sum(-1) - 5 * (math.log(0.7) + 0.5 * math.log(2 * math.pi))
    got = transition_log_prob(x, Transition(mean, 0.7))
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    s, mean = 1e-3, torch.randn(2, 8, 16384, generator=g)
    x, other = (
        mean + s * torch.randn(mean.shape, generator=g),
        mean + 0.3 * s * torch.randn(mean.shape, generator=g),
    )

    def weight(v: torch.Tensor, m: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return transition_log_prob(v, Transition(m, s)) - transition_log_prob(v, Transition(o, s))

    ref = weight(x.double(), mean.double(), other.double())
    assert float((weight(x, mean, other) - ref).abs().max() / ref.abs().max()) < 5e-6


class _UnguardedShift(SMCAlgorithm):
    """The twisted proposal as the hook docs write it, with no special case for the clean last step."""

    name = "unguarded_shift"

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.x_prev is None:
            return None
        return transition_log_prob(ctx.x, ctx.base_prev) - transition_log_prob(ctx.x, ctx.proposal_prev)

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        return Transition(base.mean + self.delta * base.std, base.std)


def test_a_twisted_proposal_runs_through_the_clean_step():
    """final="zero": the clean step is the point mass Transition(x0, 0.0), the proposal keeps it, and the
    correction there is 0: the guarded run's particles, weights equal to rounding. Before: ValueError
    (no density at std = 0, ShiftProposal)."""
    delta = torch.tensor([0.2, -0.15], dtype=F64)
    kw = dict(shape=(2, 2), particles=64, steps=STEPS, solver=SOLVER, ess_threshold=0.5, dtype=F64)
    out = sd.smc.run_smc(DEN, _UnguardedShift(delta), generator=gen(0), **kw)
    ref = sd.smc.run_smc(DEN, ShiftedProposal(delta), generator=gen(0), **kw)
    assert bool(ref.trace.resampled.any())
    assert torch.equal(out.x, ref.x)
    torch.testing.assert_close(out.log_w, ref.log_w, rtol=0, atol=1e-13)


def test_the_checks_read_the_device_once_per_run():
    """On the meta device (an accelerator without values, as in test_device.py) the index and weight
    checks add reads at the end of the run only: the same count at 6 and 12 steps."""
    net = torch.nn.Linear(2, 2, device="meta")
    den = sd.Denoiser(lambda x, t: net(x) * t[:, None], PROC, "eps")

    def reads(steps: int) -> int:
        with _Syncs() as mode:
            out = sd.smc.fk_steering(
                den, lambda z: z[:, 0], lam=1.0, shape=(2, 2), particles=4, steps=steps, solver=SOLVER,
                resampler=_as_int32, device="meta",
            )  # fmt: skip
        assert out.x.is_meta
        return mode.count["read"]

    assert reads(6) == reads(12) <= 4


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((1.0, "difference", 5), "nodes"),
        ((1.0, "difference", None), "nodes"),
        ((1.0, "difference", {1, "a"}), "nodes"),
        ((1.0, "difference", {-1, 2}), "nodes"),
        ((1.0, "difference", {1.5}), "nodes"),
        ((1.0, "difference", {True}), "nodes"),
        (("x", "difference", {1}), "lam"),
        ((float("nan"), "difference", {1}), "lam"),
        ((1.0, "mean", {1}), "potential"),
    ],
)
def test_fk_steering_class_names_its_bad_arguments(args, name):
    """``FKSteering(lam, potential, nodes)`` with nodes not a collection of integers >= 0 failed later in
    the run (``argument of type 'int' is not iterable``) or silently never weighted (``{-1}``, ``{'a'}``),
    and named lam / potential as ``fk_steering``: the class now names itself and the argument, by the same
    check as the function (``check_arguments``)."""
    with pytest.raises(ValueError, match=rf"^FKSteering: {name} must be"):
        sd.smc.FKSteering(*args)
    alg = sd.smc.FKSteering(1, "max", range(0, 4, 2))
    assert (alg.lam, alg.potential, alg.nodes) == (1.0, "max", {0, 2})


def test_dtype_and_device_with_x_t_must_agree_with_it():
    """``dtype=`` / ``device=`` are of the default x_T: with an x_T of another they were ignored (a float16
    x_T with dtype=float64 ran in float16); now refused, naming the argument. Agreeing ones are taken."""
    den = smooth_mixture(dim=2, components=2).denoiser(sd.VP.cosine())
    x_T = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    kw = dict(shape=(1, 2), particles=3, steps=3, x_T=x_T, generator=torch.Generator().manual_seed(1))
    for bad, said in (({"dtype": torch.float64}, "dtype=torch.float64"), ({"device": "meta"}, "device=meta")):
        with pytest.raises(ValueError, match=rf"fk_steering: {said} is for the default x_T; x_T is"):
            sd.smc.fk_steering(den, lambda z: z.sum(-1), **kw, **bad)
    for fine in ({"dtype": torch.float16}, {"device": "cpu"}, {"device": "cpu:0"}):
        assert sd.smc.fk_steering(den, lambda z: z.sum(-1), **kw, **fine).x.dtype == torch.float16


def test_particles_sample_draws_from_the_weights():
    """``Particles.sample`` is one draw per batch row from ``W``: over 20000 rows of the same weights (a zero
    weight, a dominant one) the frequency of each particle is ``W_i`` within 4.5 binomial standard errors
    ``sqrt(W_i (1 - W_i) / rows)``, and a zero weight is never drawn. With one generator per row, row ``b``'s
    draw is that of ``generator[b]`` alone (the same row run by itself)."""
    w = torch.tensor([0.31, 0.0, 0.05, 0.12, 0.2, 0.07, 0.1, 0.15], dtype=F64)
    rows, n = 20_000, w.shape[0]
    x = torch.arange(n, dtype=F64).expand(rows, n)[..., None]  # particle i's value is i
    p = sd.smc.Particles(x, w.log().expand(rows, n))
    drawn = p.sample(generator=gen(0))
    assert drawn.shape == (rows, 1)
    freq = torch.bincount(drawn[:, 0].long(), minlength=n).to(F64) / rows
    se = (w * (1 - w) / rows).sqrt()
    assert float(freq[1]) == 0.0
    z = ((freq - w) / se)[w > 0]
    assert float(z.abs().max()) < 4.5, (freq, w)
    few = sd.smc.Particles(x[:3], p.log_w[:3])
    got = few.sample(generator=[gen(5), gen(6), gen(7)])
    for b, seed in enumerate((5, 6, 7)):
        alone = sd.smc.Particles(x[b : b + 1], p.log_w[b : b + 1]).sample(generator=gen(seed))
        assert torch.equal(got[b], alone[0])


class _FirstNode(SMCAlgorithm):
    """Keeps the particles and the grid the hooks see at node 0; no weights."""

    name = "first_node"

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.i == 0:
            self.x, self.grid = ctx.x.clone(), ctx.grid
        return None


@pytest.mark.parametrize("process", [sd.VE(sigma_max=50.0), sd.EDM(), sd.RectifiedFlow(), PROC])
def test_initial_particles_have_the_processs_prior_scale(process):
    """The default start is ``x_0 = sqrt(alpha_0^2 + sigma_0^2) z``, ``z ~ N(0, I)`` (as ``sd.sample``'s
    ``x_T``): 50 for ``VE(sigma_max=50)``, 80 for EDM, not the standard normal a VP starts from (the draw is
    the generator's ``randn``, exactly)."""
    alg = _FirstNode()
    sd.smc.run_smc(GMM.denoiser(process), alg, (2, 2), particles=3, steps=4, generator=gen(2), dtype=F64)
    scale = math.hypot(alg.grid.alpha[0], alg.grid.sigma[0])
    assert scale > 40 or process is PROC or isinstance(process, sd.RectifiedFlow), scale
    z = torch.randn(2, 3, 2, generator=gen(2), dtype=F64)
    torch.testing.assert_close(alg.x, scale * z, rtol=1e-15, atol=0)


@pytest.mark.parametrize("potential", sd.smc.POTENTIALS)
def test_threshold_zero_is_importance_sampling_on_the_base_paths(potential):
    """``ess_threshold = 0`` never resamples: the weights never move a particle nor draw from the generator,
    so the particles are the base sampler's (``lam = 0``, the same generator and ``x_T``) bitwise, and the
    weights are the exact importance weights ``W ∝ exp(lam r(x_S))`` (every potential's product telescopes
    to it), with ``log Z = log mean_j exp(lam r(x_S^j))``."""
    lam, batch, n = 0.8, 3, 5
    x_T = torch.randn(batch, n, 2, generator=gen(1), dtype=F64)
    kw = dict(particles=n, steps=8, solver=SOLVER, x_T=x_T, interval=2)
    base = sd.smc.fk_steering(DEN, wavy, lam=0.0, generator=gen(2), **kw)
    out = sd.smc.fk_steering(
        DEN, wavy, lam=lam, potential=potential, ess_threshold=0.0, generator=gen(2), **kw
    )
    assert torch.equal(out.x, base.x) and not bool(out.trace.resampled.any())
    r = wavy(out.x.reshape(-1, 2)).reshape(batch, n)
    torch.testing.assert_close(out.log_w, torch.log_softmax(lam * r, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.log_z, torch.logsumexp(lam * r, -1) - math.log(n), rtol=0, atol=1e-12)


class _ReadsAfterSelection(SMCAlgorithm):
    """A forced selection (``flip``: particle ``j`` takes ancestor ``N - 1 - j``) at node ``at``; records
    what ``log_weight`` sees there before it and what ``propose`` sees after it."""

    name = "reads_after_selection"

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, {}

    def _read(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {
            "x": ctx.x.clone(), "x0": ctx.x0.clone(), "x_prev": ctx.x_prev.clone(),
            "base_prev": ctx.base_prev.mean.clone(), "proposal_prev": ctx.proposal_prev.mean.clone(),
        }  # fmt: skip

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.i == self.at:
            self.seen["before"] = self._read(ctx)
        return None

    def resample(self, ctx: StepContext, log_w: torch.Tensor, generator: Generators) -> torch.Tensor | None:
        return torch.arange(log_w.shape[1]).flip(0).expand(log_w.shape) if ctx.i == self.at else None

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        if ctx.i == self.at:
            self.seen["after"], self.t = self._read(ctx), ctx.t
        return base


def test_propose_sees_the_selected_particles_prediction_and_parents():
    """After a selection, ``propose``'s context is the ancestors': ``x``, ``x0`` and the parents' ``x_prev``,
    ``base_prev``, ``proposal_prev`` are those ``log_weight`` saw at the ancestor indices, and ``x0`` is the
    oracle's exact ``E[x_0 | x_i]`` at the selected particles."""
    alg = _ReadsAfterSelection(at=3)
    sd.smc.run_smc(DEN, alg, (2, 2), particles=4, steps=6, solver="ddpm", generator=gen(0), dtype=F64)
    before, after = alg.seen["before"], alg.seen["after"]
    for name, value in before.items():
        assert torch.equal(after[name], value.flip(1)), name
    exact = DEN(after["x"].reshape(-1, 2), alg.t).x0.reshape(after["x"].shape)
    torch.testing.assert_close(after["x0"], exact, rtol=0, atol=1e-12)


def learned_variance_den() -> sd.Denoiser:
    """``DEN`` on ``(1, 2)`` samples with a learned variance (Improved DDPM's ``r = tanh(x)``, per entry):
    DDPM's transitions then have a per-entry std tensor."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = DEN.net(x.reshape(-1, 2), t).reshape(x.shape)
        return torch.cat([x0, torch.tanh(x)], dim=1)

    return sd.Denoiser(net, PROC, prediction="x0", shape=(1, 2), learned_variance=True)


class ShiftedPerEntry(ShiftedProposal):
    """:class:`ShiftedProposal` for a std that may be a tensor (a point mass is a float 0)."""

    def log_weight(self, ctx: StepContext) -> torch.Tensor | None:
        base, prop = ctx.base_prev, ctx.proposal_prev
        if not self.correct or base is None or not isinstance(base.std, torch.Tensor):
            return None
        return transition_log_prob(ctx.x, base) - transition_log_prob(ctx.x, prop)

    def propose(self, ctx: StepContext, base: Transition) -> Transition:
        if not isinstance(base.std, torch.Tensor):
            return base
        assert base.std.shape == base.mean.shape  # (batch, particles, 1, 2), as the particles
        return Transition(base.mean + self.delta * base.std, base.std)


def test_twisted_proposal_with_a_per_entry_std_is_exact():
    """With a learned variance the base transition's std is a tensor of the particles' shape, and the hooks
    see it so: the shifted proposal, corrected by the exact log-density ratio, targets the base sampler
    (weighted mean against 4 x 2048 base samples within 4 standard errors of the difference; ``Z_hat`` of
    the base law, 1, within 4 standard errors over the rows), where uncorrected it is far off.

    Measured (seed 0): the difference is 0.6 and -1.6 standard errors (0.035, 0.019), uncorrected 31 and -23;
    mean ``log Z_hat`` -0.019."""
    den, delta = learned_variance_den(), torch.tensor([0.2, -0.15], dtype=F64)
    kw = dict(particles=512, steps=STEPS, solver="ddpm", dtype=F64)
    base = sd.smc.run_smc(den, SMCAlgorithm(), (4, 1, 2), generator=gen(1), **{**kw, "particles": 2048})
    ref = base.x.reshape(-1, 2)
    rows = 16
    out = sd.smc.run_smc(den, ShiftedPerEntry(delta), (rows, 1, 2), ess_threshold=0.5, generator=gen(0), **kw)
    assert bool(out.trace.resampled.any())
    est = out.mean().reshape(rows, 2)
    se = (est.var(0) / rows + ref.var(0) / len(ref)).sqrt()
    assert bool(((est.mean(0) - ref.mean(0)).abs() < 4 * se).all()), (est.mean(0), ref.mean(0), se)
    z = out.log_z.exp()  # unbiased for Z = 1 (log Z_hat is not: Jensen)
    assert abs(float(z.mean()) - 1) < 4 * float(z.std()) / math.sqrt(rows), z
    wrong = sd.smc.run_smc(
        den, ShiftedPerEntry(delta, correct=False), (rows, 1, 2), generator=gen(0), **kw
    ).mean()
    assert float(((wrong.reshape(rows, 2).mean(0) - ref.mean(0)) / se).abs().max()) > 10


def test_a_float32_reward_is_weighted_in_float64():
    """The reward's values are taken as float64 before any arithmetic: with float32 particles and a float32
    reward, ``out.reward`` is float64 and the final log-weights are ``log_softmax(lam r)`` with ``lam r``
    formed in float64 (to 1e-12; in float32 it is 4e-8 off at ``lam = 0.7``)."""
    lam = 0.7
    out = sd.smc.fk_steering(
        DEN, wavy, lam=lam, potential="immediate", shape=(3, 2), particles=6, steps=6, ess_threshold=0.0,
        generator=gen(0),
    )  # fmt: skip
    assert out.x.dtype == torch.float32 and out.reward.dtype == F64
    r = wavy(out.x.reshape(-1, 2)).reshape(3, 6)
    assert r.dtype == torch.float32 and torch.equal(out.reward, r.to(F64))
    torch.testing.assert_close(out.log_w, torch.log_softmax(lam * r.to(F64), -1), rtol=0, atol=1e-12)
