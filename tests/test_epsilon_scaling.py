"""Epsilon Scaling (Ning et al. 2024): ``sd.guidance.EpsilonScaling`` and ``sd.guidance.epsilon_norms``.

The wrapper divides the noise estimate by ``lambda(t) = k t + b`` and recomputes ``x0`` from it; checked
against the hand computation for eps, x0 and v nets, to the bit at ``lambda = 1``, through CFG (linear in
eps, so both orders agree), and on the exact Gaussian-mixture denoiser, which has no exposure bias: there
any ``lambda != 1`` moves the sampler away from the exact probability-flow ODE solution.
"""

from __future__ import annotations

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import CFG, EpsilonNorms, EpsilonScaling, epsilon_norms

from .reference import rel_rmse

F64 = torch.float64
PROCESS = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
W = torch.tensor([[0.9, -0.3, 0.2], [0.1, 1.1, -0.4], [0.3, 0.2, 0.8]], dtype=F64)


def linear_net(x: torch.Tensor, t: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """An arbitrary net output depending on x and t (any prediction type reads it as its own)."""
    return x @ W.T * (1 + t[:, None] / 2000) + 0.05 + shift


def gmm() -> sd.toy.GaussianMixture:
    means = torch.tensor([[-1.5, 0.5, 0.0], [1.0, -1.0, 1.5]], dtype=F64)
    var = torch.tensor([[0.2, 0.3, 0.1], [0.4, 0.1, 0.25]], dtype=F64)
    return sd.toy.GaussianMixture(means, var, torch.tensor([0.4, 0.6], dtype=F64))


def x_at(seed: int = 0, n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize(("k", "b"), [(0.0, 1.02), (-4e-5, 1.03), (2e-4, 0.95)])
def test_matches_the_hand_computation(prediction, k, b):
    den = sd.Denoiser(linear_net, PROCESS, prediction=prediction)
    x, t = x_at(), 637.0
    a, s = float(PROCESS.alpha(t)), float(PROCESS.sigma(t))
    out = linear_net(x, torch.full((5,), t, dtype=F64))
    # v = a eps - s x0; score = -eps / s
    eps = {"eps": out, "x0": (x - a * out) / s, "v": s * x + a * out, "score": -s * out}[prediction]
    lam = k * t + b
    pred = EpsilonScaling(den, k=k, b=b)(x, t)
    torch.testing.assert_close(pred.eps, eps / lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.x0, (x - s * eps / lam) / a, rtol=1e-12, atol=1e-12)
    # per-sample times: each row as at its own scalar time
    ts = torch.tensor([0.0, 100.0, 400.5, 800.0, 999.0], dtype=F64)
    rows = EpsilonScaling(den, k=k, b=b)(x, ts)
    for i, ti in enumerate(ts.tolist()):
        one = EpsilonScaling(den, k=k, b=b)(x[i : i + 1], ti)
        torch.testing.assert_close(rows.x0[i : i + 1], one.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows.eps[i : i + 1], one.eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_lambda_one_is_the_identity_to_the_bit(prediction):
    den = sd.Denoiser(linear_net, PROCESS, prediction=prediction)
    x = x_at(1)
    for t in (500.0, torch.tensor([3.0, 250.0, 500.0, 750.0, 999.0], dtype=F64)):
        ref, got = den(x, t), EpsilonScaling(den, k=0.0, b=1.0)(x, t)
        assert torch.equal(got.x0, ref.x0) and torch.equal(got.eps, ref.eps)
    exact = gmm().denoiser(PROCESS)
    x_T = x_at(2, 64)
    for solver in ("ddim", "dpmpp_2m", "unipc"):
        ref = sd.sample(exact, x_T, 10, solver)
        assert torch.equal(sd.sample(EpsilonScaling(exact), x_T, 10, solver), ref)
    g = torch.Generator
    ref = sd.sample(exact, x_T, 20, "ddpm", generator=g().manual_seed(0))
    assert torch.equal(sd.sample(EpsilonScaling(exact), x_T, 20, "ddpm", generator=g().manual_seed(0)), ref)


@pytest.mark.parametrize("name", sd.solvers.available())
def test_every_solver_takes_it(name):
    """Each registered solver: the same bits at lambda = 1, the same NFE, another result at b = 1.05."""
    den = gmm().denoiser(PROCESS)
    x_T = x_at(2, 16)

    def run(d: sd.Denoiser) -> tuple[torch.Tensor, int]:
        x, info = sd.sample(d, x_T, 6, name, generator=torch.Generator().manual_seed(0), return_info=True)
        return x, info.nfe

    (ref, nfe), (one, nfe1), (scaled, nfe2) = (
        run(den),
        run(EpsilonScaling(den)),
        run(EpsilonScaling(den, b=1.05)),
    )
    assert torch.equal(one, ref) and nfe == nfe1 == nfe2
    assert rel_rmse(scaled, ref) > 0.02  # 0.057 at the least


def test_scaling_moves_the_exact_model_off_its_ode_solution():
    """The exact denoiser has no exposure bias: at lambda = 1 the sampler converges to the ODE solution
    (1.4e-4 at 50 UniPC steps, 8.8e-6 at 100); at b != 1 it converges to another curve, 1.0e-2 away at
    b = 1.003, 3.6e-2 at 1.01, 9.0e-2 at 1.03 and 2.7e-2 at 0.99, whatever the step count."""
    law = gmm()
    den = law.denoiser(PROCESS)
    x_T = x_at(3, 256)
    ref = law.reference_ode(x_T, PROCESS, PROCESS.t_max, PROCESS.t_min, denoise=True)

    def err(b: float, steps: int) -> float:
        return rel_rmse(sd.sample(EpsilonScaling(den, b=b), x_T, steps, "unipc"), ref)

    assert err(1.0, 50) < 3e-4 and err(1.0, 100) < 2e-5
    far = {b: err(b, 50) for b in (1.003, 1.01, 1.03, 0.99)}
    assert far[1.003] > 0.008 and far[1.003] < far[1.01] < far[1.03] and far[0.99] > 0.02
    assert err(1.01, 100) == pytest.approx(far[1.01], rel=0.02)  # a different limit, not a step error


def test_composes_with_cfg_in_either_order():
    cond = sd.Denoiser(linear_net, PROCESS, prediction="v")
    uncond = sd.Denoiser(lambda x, t: linear_net(x, t, shift=0.3), PROCESS, prediction="v")
    x = x_at(4)
    outer = EpsilonScaling(CFG(cond, uncond, 3.0), k=-2e-5, b=1.02)
    inner = CFG(EpsilonScaling(cond, k=-2e-5, b=1.02), EpsilonScaling(uncond, k=-2e-5, b=1.02), 3.0)
    ts = torch.tensor([10.0, 200.0, 420.0, 800.0, 990.0], dtype=F64)
    for t, lam in ((420.0, 1.02 - 2e-5 * 420), (ts, (1.02 - 2e-5 * ts)[:, None])):
        a, b = outer(x, t), inner(x, t)
        torch.testing.assert_close(a.eps, b.eps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.x0, b.x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.eps, CFG(cond, uncond, 3.0)(x, t).eps / lam, rtol=1e-12, atol=1e-12)
    assert outer.cost == 2 and outer.guidance_scale == 3.0  # CFG's default solver and NFE pass through
    x_T = x_at(5, 8)
    _, info = sd.sample(outer, x_T, 6, return_info=True)
    assert info.nfe == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"b": 0.0}, r"lambda\(t\) = k t \+ b must be > 0 .*lambda\(t_min = 0\) = 0"),
        (
            {"b": 1.0, "k": -0.002},
            r"must be > 0 on den's process times \[0, 999\], got lambda\(t_max = 999\)",
        ),
        ({"b": float("nan")}, r"EpsilonScaling: b must be a finite number"),
        ({"k": float("inf")}, r"EpsilonScaling: k must be a finite number"),
        ({"b": True}, r"EpsilonScaling: b must be a finite number"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    den = sd.Denoiser(linear_net, PROCESS, prediction="eps")
    with pytest.raises(ValueError, match=message):
        EpsilonScaling(den, **kwargs)
    with pytest.raises(ValueError, match=r"EpsilonScaling: den must be"):
        EpsilonScaling(linear_net)  # type: ignore[arg-type]


def test_epsilon_norms_of_the_exact_model_match_training():
    """On the exact denoiser an accurate sampler's states follow the noised marginals, so the norm ratio is 1
    up to sampling noise at every node (max 0.018 off at 20 UniPC steps), and the fits read it back. (At 8
    DDIM steps it falls to 0.89 at the last node: the ratio also measures the solver's own error.)"""
    law = gmm()
    den = law.denoiser(PROCESS)
    g = torch.Generator().manual_seed(0)
    data = law.sample(4000, generator=g)
    x_T = torch.randn(4000, 3, dtype=F64, generator=g)
    norms = epsilon_norms(den, data, x_T, 20, "unipc", generator=torch.Generator().manual_seed(1))
    assert isinstance(norms, EpsilonNorms) and len(norms.t) == 20  # x_T's node and 19 noisy ones
    assert norms.t[0] == PROCESS.t_max and bool((norms.t.diff() < 0).all())
    assert float((norms.ratio - 1).abs().max()) < 0.025
    k, b = norms.linear()
    assert abs(norms.uniform() - 1) < 0.005 and abs(k) < 3e-5 and abs(b - 1) < 0.015
    assert repr(EpsilonScaling(den, k=k, b=b)).startswith("EpsilonScaling(Denoiser(")
    with pytest.raises(
        ValueError, match=r"epsilon_norms: data has sample shape \(2,\), the denoiser expects \(3,\)"
    ):
        epsilon_norms(den, data[:, :2], x_T, 4, "ddim")


def test_epsilon_norms_linear_fit_is_least_squares():
    norms = EpsilonNorms(
        torch.tensor([900.0, 500.0, 100.0], dtype=F64),
        torch.tensor([1.0, 1.02, 1.1], dtype=F64),
        torch.ones(3, dtype=F64),
    )
    k, b = norms.linear()
    # closed form: k = cov(t, r) / var(t), b = mean(r) - k mean(t)
    t, r = norms.t, norms.ratio
    kk = float(((t - t.mean()) * (r - r.mean())).sum() / ((t - t.mean()) ** 2).sum())
    assert k == pytest.approx(kk, rel=1e-10) and b == pytest.approx(
        float(r.mean() - kk * t.mean()), rel=1e-10
    )
    one = EpsilonNorms(norms.t[:1], norms.sampling[:1], norms.training[:1])
    assert one.linear() == (0.0, 1.0)
