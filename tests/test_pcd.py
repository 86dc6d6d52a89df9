"""Projected Coupled Diffusion (``sd.guidance.Coupled``, ``sd.guidance.pcd_sample``) against exact answers:
the authors' DDPM update written out, the exact coupled joint of two Gaussian mixtures
(``GaussianMixture.product(...).tilt(...)``), constraints met to float precision, plain ``sample`` for
one uncoupled model."""

from __future__ import annotations

import math
import re

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import Coupled, pcd_sample
from steerdiff.inverse import Matrix
from steerdiff.metrics import sliced_wasserstein

from ._docs import block
from .test_guidance_cfg import learned_variance

F64 = torch.float64
PROC = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
D = 2
G1 = sd.toy.GaussianMixture(
    torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([[0.3, 0.5], [0.4, 0.2]]), torch.tensor([0.4, 0.6])
)
G2 = sd.toy.GaussianMixture(
    torch.tensor([[0.0, -1.0], [0.5, 1.5]]), torch.tensor([[0.6, 0.3], [0.2, 0.4]]), torch.tensor([0.5, 0.5])
)
DIFF = torch.cat([torch.eye(D, dtype=F64), -torch.eye(D, dtype=F64)], 1)  # x1 - x2 on the joint coordinates


def quadratic(x: torch.Tensor) -> torch.Tensor:
    """``c = ||x1 - x2||^2 / 2`` on the stacked state ``(n, 2, D)``."""
    return 0.5 * ((x[:, 0] - x[:, 1]) ** 2).sum(-1)


def dens() -> list[sd.Denoiser]:
    return [G1.denoiser(PROC), G2.denoiser(PROC)]


def exact_joint(gamma: float) -> tuple[sd.toy.GaussianMixture, float]:
    """``p1(x1) p2(x2) exp(-gamma ||x1 - x2||^2 / 2)`` (completing the square per component pair) and its
    ``E||x1 - x2||^2 = sum_k w_k (||D m_k||^2 + tr(D S_k D^T))``."""
    joint = G1.product(G2).tilt(quadratic=gamma * DIFF.T @ DIFF)
    dm = joint.means @ DIFF.T
    spread = torch.einsum("ij,kjl,il->k", DIFF, joint.covariance_matrices, DIFF)
    return joint, float((joint.weights * ((dm**2).sum(-1) + spread)).sum())


def test_product_is_the_independent_joint():
    x = torch.randn(6, 2 * D, dtype=F64, generator=torch.Generator().manual_seed(0))
    full = sd.toy.GaussianMixture(G2.means, torch.diag_embed(G2.variances) + 0.05, G2.weights)
    for other in (G2, full):
        joint = G1.product(other)
        assert joint.full == other.full and len(joint.weights) == 4
        want = G1.log_prob(x[:, :D]) + other.log_prob(x[:, D:])
        assert torch.allclose(joint.log_prob(x), want, rtol=1e-13)
    # the tilted product against the quadratic coupling's closed form for one Gaussian pair:
    # N(0, I) x N(0, I) tilted by gamma: x1 - x2 has variance 2 / (1 + 2 gamma) per coordinate
    std = sd.toy.GaussianMixture(torch.zeros(1, D), torch.ones(1, D), torch.ones(1))
    tilted = std.product(std).tilt(quadratic=3.0 * DIFF.T @ DIFF)
    assert torch.allclose(DIFF @ tilted.covariances[0] @ DIFF.T, 2 / 7 * torch.eye(D, dtype=F64), rtol=1e-13)
    with pytest.raises(ValueError, match=r"product: other must be a GaussianMixture"):
        G1.product(torch.zeros(2))


def test_ddpm_step_is_the_authors_update():
    """The authors' loop (pusht ``DiffusionUnetLowdimProjCoupPolicy.conditional_sample``) on consecutive
    timesteps: the DDPM step, minus ``scale beta_t / sqrt(alpha_t) grad c(x_t)``, then the projection of
    ``x_{t-1}``, written out in float64 with the same noise draws."""
    scale, lo, hi = 1.5, -1.2, 1.2
    times = [float(t) for t in range(100, 0, -1)]
    x_T = torch.randn(8, 2, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = pcd_sample(
        Coupled(dens(), quadratic, scale),
        x_T,
        lambda x: x.clamp(lo, hi),
        len(times) - 1,
        schedule=times,
        final="none",
        generator=torch.Generator().manual_seed(2),
    )
    g, x = torch.Generator().manual_seed(2), x_T.clone()
    for t in times[:-1]:
        abar, abar_prev = float(PROC.alpha(t)) ** 2, float(PROC.alpha(t - 1)) ** 2
        beta = 1 - abar / abar_prev
        x0 = torch.stack(
            [
                G1.denoise(x[:, 0], abar**0.5, (1 - abar) ** 0.5),
                G2.denoise(x[:, 1], abar**0.5, (1 - abar) ** 0.5),
            ],
            1,
        )
        mean = (abar_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - abar_prev) * x) / (1 - abar)
        std = (beta * (1 - abar_prev) / (1 - abar)) ** 0.5
        grad = torch.stack([x[:, 0] - x[:, 1], x[:, 1] - x[:, 0]], 1)  # grad of ||x1 - x2||^2 / 2
        x = (
            mean
            + std * torch.randn(x.shape, generator=g, dtype=F64)
            - scale * beta / (1 - beta) ** 0.5 * grad
        )
        x = x.clamp(lo, hi)
    assert torch.allclose(out, x, rtol=1e-12, atol=1e-13)
    free = pcd_sample(
        Coupled(dens()),
        x_T,
        lambda x: x.clamp(lo, hi),
        len(times) - 1,
        schedule=times,
        final="none",
        generator=torch.Generator().manual_seed(2),
    )
    assert float((out - free).abs().max()) > 0.1  # the coupling is felt


# measured (n = 1500, 100 DDPM steps): sliced W to exact samples / floor (two exact sets) / independent
# samples, and E||x1 - x2||^2 over its exact value
#   gamma 0: 0.067 / 0.080 / 0.058, 0.98;  0.5: 0.124 / 0.048 / 0.228, 0.717;
#   gamma 2: 0.161 / 0.064 / 0.426, 0.616;  4: 0.160 / 0.051 / 0.497, 0.556
@pytest.mark.parametrize(
    ("gamma", "sw_max", "ratio_lo", "ratio_hi"),
    [(0.0, 0.1, 0.95, 1.05), (0.5, 0.16, 0.65, 0.8), (2.0, 0.2, 0.55, 0.7), (4.0, 0.2, 0.5, 0.64)],
)
def test_coupling_against_the_exact_joint(gamma, sw_max, ratio_lo, ratio_hi):
    """The coupled sampler against ``p1 p2 exp(-gamma c)``. Its intermediate scores are the marginals' plus
    ``-gamma grad c(x_t)``, not the noised target's, so it is biased: it over-couples (E||x1 - x2||^2 at
    0.56-0.72 of the exact value), yet lands 2-3x nearer the target than independent samples do."""
    n = 1500
    joint, e_diff = exact_joint(gamma)
    ref = joint.sample(n, torch.Generator().manual_seed(5))
    x_T = torch.randn(n, 2, D, generator=torch.Generator().manual_seed(1))
    x = sd.sample(
        Coupled(dens(), quadratic, gamma),
        x_T,
        100,
        "ddpm",
        "time_uniform",
        generator=torch.Generator().manual_seed(3),
    )
    sw = sliced_wasserstein(x.reshape(n, -1).double(), ref)
    ratio = float(((x[:, 0] - x[:, 1]) ** 2).sum(-1).mean()) / e_diff
    floor = sliced_wasserstein(joint.sample(n, torch.Generator().manual_seed(6)), ref)
    independent = sliced_wasserstein(G1.product(G2).sample(n, torch.Generator().manual_seed(7)), ref)
    assert sw < sw_max and ratio_lo < ratio < ratio_hi
    if gamma > 0:
        assert sw < 0.6 * independent
    else:  # independent models: at the floor
        assert sw < 1.5 * floor


def test_projection_meets_the_constraints_to_float_precision():
    """An affine equality ``A x = y`` on the stacked sample (projection ``x + A^+ (y - A x)``) and a box:
    met by every sample to round-off, where the unprojected run misses them by O(1)."""
    g = torch.Generator().manual_seed(4)
    op = Matrix(torch.randn(2, 2 * D, generator=g, dtype=F64), shape_in=(2, D))
    y = torch.tensor([0.5, -1.0], dtype=F64)
    den = Coupled(dens(), quadratic, 1.0)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        x_T = torch.randn(64, 2, D, generator=g).to(dtype)
        yy = y.to(dtype)
        x = pcd_sample(
            den,
            x_T,
            lambda v, yy=yy: v + op.pinv(yy - op.forward(v)),
            50,
            generator=torch.Generator().manual_seed(0),
        )
        assert x.dtype == dtype
        assert float((op.forward(x) - yy).abs().max()) < tol
        free = sd.sample(den, x_T, 50, "ddpm", "time_uniform", generator=torch.Generator().manual_seed(0))
        assert float((op.forward(free) - yy).abs().max()) > 1.0
    x_T = torch.randn(64, 2, D, generator=g, dtype=F64)
    x = pcd_sample(den, x_T, lambda v: v.clamp(-0.5, 0.25), 50, generator=torch.Generator().manual_seed(0))
    assert float(x.min()) >= -0.5 and float(x.max()) <= 0.25
    assert float(((x == 0.25) | (x == -0.5)).double().mean()) > 0.15  # the box binds


def test_identity_projection_is_sample_and_restarts_a_multistep_solver():
    den = Coupled(dens(), quadratic, 1.0)
    x_T = torch.randn(16, 2, D, dtype=F64, generator=torch.Generator().manual_seed(8))
    a, info = pcd_sample(
        den, x_T, lambda v: v, 20, generator=torch.Generator().manual_seed(0), return_info=True
    )
    b = sd.sample(den, x_T, 20, "ddpm", "time_uniform", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and info.nfe == 2 * 20  # K = 2 net calls per step
    # a multistep solver restarts after every projection: DPM-Solver++(2M) at first order is DDIM
    two_m = pcd_sample(den, x_T, lambda v: v, 10, solver="dpmpp_2m", schedule="karras")
    ddim = sd.sample(den, x_T, 10, "ddim", "karras")
    assert torch.allclose(two_m, ddim, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sd.sample(den, x_T, 10, "dpmpp_2m", "karras"), ddim, atol=1e-3)


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_2m", "unipc"])
def test_one_uncoupled_model_is_plain_sample(solver):
    den = G1.denoiser(PROC)
    x_T = torch.randn(12, D, dtype=F64, generator=torch.Generator().manual_seed(9))
    rows = [torch.Generator().manual_seed(i) for i in range(12)]
    want = sd.sample(den, x_T, 15, solver, generator=rows)
    for coupled in (Coupled([den]), Coupled([den], lambda x: (x**2).sum((1, 2)), 0.0)):
        rows = [torch.Generator().manual_seed(i) for i in range(12)]
        got, info = sd.sample(coupled, x_T[:, None], 15, solver, generator=rows, return_info=True)
        assert got.shape == (12, 1, D) and torch.equal(got[:, 0], want)
        assert info.nfe == sd.solvers.get(solver).nfe(15)


def test_mixed_predictions_and_learned_variance_stack():
    """An eps-net and an x0-net of the same mixture give one stacked prediction (held as eps); learned
    variances are stacked per model."""
    x0_den = G2.denoiser(PROC)

    def eps_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = PROC.alpha(t[0].double()), PROC.sigma(t[0].double())
        return (x - a * x0_den.net(x, t)) / s

    eps_den = sd.Denoiser(eps_net, PROC, "eps", shape=(D,))
    x = torch.randn(5, 2, D, dtype=F64, generator=torch.Generator().manual_seed(2))
    same = Coupled([x0_den, x0_den], quadratic, 0.7)(x, 300.0)
    mixed = Coupled([x0_den, eps_den], quadratic, 0.7)(x, 300.0)
    assert same.x0_given and not mixed.x0_given
    assert torch.allclose(mixed.x0, same.x0, rtol=1e-12, atol=1e-12)
    lv = learned_variance(PROC, D)
    pred = Coupled([lv, lv])(x, 300.0, y=1)
    one = lv(x[:, 1].contiguous(), 300.0, y=1)
    assert pred.var_interp is not None and torch.equal(pred.var_interp[:, 1], one.var_interp)


def test_coupling_gradient_is_the_score_of_the_cost():
    """``eps' = eps + sigma scale grad c``: the stacked prediction's score moves by ``-scale grad c``."""
    x = torch.randn(7, 2, D, dtype=F64, generator=torch.Generator().manual_seed(3))
    t, scale = 500.0, 1.7
    free = Coupled(dens())(x, t)
    coupled = Coupled(dens(), quadratic, scale)(x, t)
    grad = torch.stack([x[:, 0] - x[:, 1], x[:, 1] - x[:, 0]], 1)
    s = float(PROC.sigma(t))
    assert torch.allclose(-coupled.eps / s, -free.eps / s - scale * grad, rtol=1e-12, atol=1e-12)


def test_a_backward_pass_through_coupled_sampling_is_exact():
    """Autograd through ``sd.sample(Coupled(...))`` with respect to ``x_T`` (the coupling gradient inside
    differentiated too: ``grad_on``'s ``nested``) equals central differences of the run. Before, the
    coupling gradient was taken on a detached copy of ``x`` without a graph, so the cost's Hessian was
    missing from the outer gradient: 0.89 relative error, silently (earlier still, a RuntimeError)."""
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 2, D, dtype=F64, generator=g)
    w = torch.randn(2, 2, D, dtype=F64, generator=g)

    def run(x: torch.Tensor) -> torch.Tensor:
        return (sd.sample(Coupled(dens(), quadratic, 0.05), x, 4, "ddim") * w).sum()

    xr = x_T.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(run(xr), xr)
    h, fd = 1e-5, torch.zeros(x_T.numel(), dtype=F64)
    with torch.no_grad():
        for i in range(x_T.numel()):
            e = torch.zeros(x_T.numel(), dtype=F64)
            e[i] = h
            fd[i] = (run(x_T + e.reshape(x_T.shape)) - run(x_T - e.reshape(x_T.shape))) / (2 * h)
    torch.testing.assert_close(grad.reshape(-1), fd, rtol=1e-7, atol=1e-8)


def test_reproducible_and_per_sample():
    den = Coupled(dens(), quadratic, 1.0)
    x_T = torch.randn(6, 2, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    box = lambda v: v.clamp(-1, 1)  # noqa: E731

    def run(rows: range, seed: int = 0) -> torch.Tensor:
        return pcd_sample(
            den, x_T[list(rows)], box, 20, generator=[torch.Generator().manual_seed(seed + i) for i in rows]
        )

    a = run(range(6))
    assert torch.equal(a, run(range(6)))
    # a sample does not depend on its batch (to the mixture oracle's batched round-off, as plain sample)
    assert torch.allclose(a[2:4], run(range(2, 4)), rtol=0, atol=1e-14)
    assert not torch.allclose(a, run(range(6), seed=100))


def test_bad_input():
    den = G1.denoiser(PROC)
    with pytest.raises(ValueError, match=r"Coupled: denoisers must be a non-empty list"):
        Coupled([])
    with pytest.raises(ValueError, match=r"Coupled: denoisers must be a non-empty list"):
        Coupled(den)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Coupled: denoisers\[1\] must be a steerdiff Denoiser"):
        Coupled([den, "net"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"Coupled: denoisers must share a process .*, denoisers\[1\] has"):
        Coupled([den, G2.denoiser(sd.VP.cosine())])
    with pytest.raises(ValueError, match=r"Coupled: denoisers must have one sample shape"):
        Coupled(
            [den, sd.toy.GaussianMixture(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1)).denoiser(PROC)]
        )
    with pytest.raises(ValueError, match=r"Coupled: denoisers must all have a learned variance or none"):
        Coupled([den, learned_variance(PROC, D)])
    with pytest.raises(ValueError, match=r"Coupled: cost must be None or a callable"):
        Coupled([den, den], 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Coupled: scale must be"):
        Coupled([den, den], quadratic, -1.0)
    with pytest.raises(ValueError, match=r"Coupled: scale must be"):
        Coupled([den, den], quadratic, math.nan)
    coupled = Coupled([den, den], quadratic)
    x = torch.randn(4, 2, D, dtype=F64)
    with pytest.raises(ValueError, match=r"Coupled: x must be the stacked state \(batch, 2, \*shape\)"):
        coupled(torch.randn(4, 3, D, dtype=F64), 100.0)
    # a wrong sample shape names the stacked layout and K, wherever a sample shape is checked
    layout = (
        r"the denoiser expects \(2, 2\): Coupled's stacked state is \(batch, K, \*shape\), K = 2 models of "
        r"sample shape \(2,\)$"
    )
    for bad in ((4, D), (4, 3, D)):
        with pytest.raises(
            ValueError, match=rf"^sample: x_T has sample shape {re.escape(str(bad[1:]))}, {layout}"
        ):
            sd.sample(coupled, torch.randn(*bad, dtype=F64), 5, "ddpm")
    with pytest.raises(ValueError, match=rf"^fk_steering: shape has sample shape \(3, 2\), {layout}"):
        sd.smc.fk_steering(coupled, lambda v: -quadratic(v), lam=1.0, shape=(4, 3, D), particles=2, steps=5)
    # and so does a wrapper of it (Guided, Reprocessed: describe_shape is its base's)
    for wrapper in (sd.guidance.EpsilonScaling(coupled, 0.1), sd.Reprocessed(coupled, sd.VP.cosine())):
        with pytest.raises(ValueError, match=rf"^sample: x_T has sample shape \(2,\), {layout}"):
            sd.sample(wrapper, torch.randn(4, D, dtype=F64), 5, "ddpm")
    with pytest.raises(
        ValueError, match=r"Coupled: cost must return one value per sample, \(4,\), got \(4, 2\)"
    ):
        Coupled([den, den], lambda v: v[:, 0])(x, 100.0)
    with pytest.raises(ValueError, match=r"Coupled: cost does not depend differentiably on x"):
        Coupled([den, den], lambda v: quadratic(v.detach()))(x, 100.0)
    with pytest.raises(ValueError, match=r"pcd_sample: project must be a callable"):
        pcd_sample(coupled, x, None, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pcd_sample: project must return a tensor of the state's shape"):
        pcd_sample(coupled, x, lambda v: v[:, 0], 5)
    with pytest.raises(ValueError, match=r"pcd_sample: project must return .* state's shape, dtype"):
        pcd_sample(coupled, x, lambda v: v.float(), 5)


def test_project_is_refused_by_the_other_entry_points():
    """``project`` is ``pcd_sample``'s: through the keywords of ``sample``, ``rf_edit`` or ``adjoint`` (whose
    gradient would ignore it) it is refused, naming the entry point, not applied unannounced."""
    den = Coupled(dens(), quadratic)
    x = torch.randn(4, 2, D, dtype=F64, generator=torch.Generator().manual_seed(5))
    box = lambda v: v.clamp(-0.1, 0.1)  # noqa: E731
    flow = sd.toy.GaussianMixture(G1.means, G1.variances, G1.weights).denoiser(sd.RectifiedFlow())
    y = torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(6))
    calls = {
        "sample": lambda: sd.sample(den, x, 5, "ddim", project=box),
        "rf_edit": lambda: sd.rf_inversion.rf_edit(flow, y, y, project=box),
        "adjoint": lambda: sd.adjoint(den, x, lambda v: v.sum(), 5, project=box),
    }
    for who, call in calls.items():
        with pytest.raises(ValueError, match=rf"{who}: project is an argument of .*pcd_sample"):
            call()


def test_invert_refuses_a_state_time_model_in_any_slot():
    """``invert`` refuses a model that evaluates its net at a time chosen from the state (``TimeShift``) in
    every slot of a :class:`Coupled`, not only in the first (its ``base``); without one it inverts (uncoupled:
    each model's inversion, stacked)."""
    plain, shifted = G1.denoiser(PROC), sd.guidance.TimeShift(G2.denoiser(PROC))
    x = torch.randn(4, 2, D, dtype=F64, generator=torch.Generator().manual_seed(7))
    for models in ([shifted, plain], [plain, shifted]):
        with pytest.raises(ValueError, match=r"invert: den: TimeShift evaluates the net at a time chosen"):
            sd.invert(Coupled(models, quadratic), x, 5)
    got = sd.invert(Coupled(dens()), x, 10, "dpmpp_2m")
    want = torch.stack([sd.invert(d, x[:, k].contiguous(), 10, "dpmpp_2m") for k, d in enumerate(dens())], 1)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_readme_snippet_runs_with_what_it_is_given():
    # "given two denoisers of one process, a sample shape, a batch size n and a generator g"
    den_a, den_b = dens()
    scope = {"sd": sd, "torch": torch, "den_a": den_a, "den_b": den_b, "shape": (D,), "n": 8}
    scope["g"] = torch.Generator().manual_seed(0)
    exec(compile(block("**Projected Coupled Diffusion**"), "docs/guidance.md", "exec"), scope)
    x = scope["x"]
    assert x.shape == (8, 2, D) and float(x.abs().max()) <= 1.0
