"""Minority sampling on an exact mixture with a rare component.

The mixture: a wide majority component (weight 0.6, variance 1), a narrow one (0.35, variance 0.15)
and a rare one (0.05, variance 0.1) away from both. Its exact log density and responsibilities tell
which samples are minority samples (the rare component; low ``log p``) and which are off the support
(``log p`` below the 0.1% quantile of exact samples).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from scipy.stats import spearmanr

import steerdiff as sd
from steerdiff.guidance import ClassifierGuidance, MinorityGuidance, SelfGuidedMinority
from steerdiff.inverse import Matrix

F64 = torch.float64
STEPS = 50  # DDPM steps of the sampling tests


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def toy():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.5]], dtype=F64)
    variances = torch.tensor([[1.0, 1.0], [0.15, 0.15], [0.1, 0.1]], dtype=F64)
    gmm = sd.toy.GaussianMixture(means, variances, torch.tensor([0.6, 0.35, 0.05], dtype=F64))
    proc = sd.VP.cosine()
    exact_lp = gmm.log_prob(gmm.sample(20000, _gen(5)))
    q = torch.quantile(exact_lp, torch.tensor([0.001, 0.1], dtype=F64))
    x_T = torch.randn(2000, 2, dtype=F64, generator=_gen(0))
    return gmm, proc, gmm.denoiser(proc), (float(q[0]), float(q[1])), x_T


def _shares(gmm, x, quantiles):
    """Shares of samples in the rare component, below the 10% and below the 0.1% quantile of log p."""
    lp = gmm.log_prob(x)
    rare = gmm.log_responsibilities(x).argmax(1) == 2
    return (
        float(rare.double().mean()),
        float((lp < quantiles[1]).double().mean()),
        float((lp < quantiles[0]).double().mean()),
    )


def _ddpm(den, x_T):
    return sd.sample(den, x_T, STEPS, "ddpm", "time_uniform", generator=_gen(1), return_info=True)


# --- the minority score -------------------------------------------------------------------------------


def test_minority_score_is_the_expected_reconstruction_distance():
    """For x0 ~ N(0, v I) Tweedie's reconstruction is linear, x0_hat = k (alpha x0 + sigma eps) with
    k = alpha v / (alpha^2 v + sigma^2), so E||x0 - x0_hat||^2 = (1 - alpha k)^2 ||x0||^2 + k^2 sigma^2 d."""
    gauss = sd.toy.GaussianMixture(
        torch.zeros(1, 3, dtype=F64), torch.full((1, 3), 0.5, dtype=F64), torch.ones(1)
    )
    proc = sd.VP.cosine()
    den = gauss.denoiser(proc)
    x0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [3.0, 3.0, -3.0]], dtype=F64)
    t = 0.5
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    k = a * 0.5 / (a * a * 0.5 + s * s)
    exact = (1 - a * k) ** 2 * (x0 * x0).sum(1) + k * k * s * s * 3
    # 10000 draws a point: 500 copies of each, 20 draws each
    sq = sd.metrics.minority_score(
        den, x0.repeat(500, 1), t, samples=20, distance=lambda u, v: ((u - v) ** 2).sum(1), generator=_gen(0)
    )
    assert torch.allclose(sq.reshape(500, 3).mean(0), exact, rtol=0.03)  # Monte Carlo: measured 0.5e-2
    # "l2" is the norm of the same difference, draw for draw; the default time is 0.6 of the time range
    l2 = sd.metrics.minority_score(den, x0, samples=4, generator=_gen(1))
    g = _gen(1)
    td = proc.t_min + 0.6 * (proc.t_max - proc.t_min)
    a, s = float(proc.alpha(td)), float(proc.sigma(td))
    ref = sum(
        (x0 - gauss.denoise(a * x0 + s * torch.randn(3, 3, dtype=F64, generator=g), a, s)).norm(dim=1)
        for _ in range(4)
    )
    assert torch.allclose(l2, ref / 4, rtol=1e-12, atol=1e-14)


def test_minority_score_orders_samples_by_density(toy):
    """Rank correlation of the score with -log p over exact samples; the top decile of scores holds the
    rare component 5x as often as the data."""
    gmm, _, den, _, _ = toy
    x0 = gmm.sample(4000, _gen(1))
    ms = sd.metrics.minority_score(den, x0, generator=_gen(2))
    rho = spearmanr(ms.numpy(), (-gmm.log_prob(x0)).numpy()).correlation
    assert rho > 0.5  # measured 0.59 (0.72 at t = 0.4 t_max, 0.20 at 0.1: a level, not the density itself)
    rare = gmm.log_responsibilities(x0).argmax(1) == 2
    top = sd.metrics.minority_levels(ms, 10) == 9
    assert 0.03 < float(rare.double().mean()) < 0.07
    assert float(rare[top].double().mean()) > 0.2  # measured 0.26


def test_minority_levels_are_quantile_bins():
    scores = torch.arange(1.0, 101.0)
    levels = sd.metrics.minority_levels(scores, 4)
    assert levels.dtype == torch.int64
    assert levels.bincount().tolist() == [25, 25, 25, 25]
    # level l holds q_{l-1} < s <= q_l (the authors' labelling): the quartiles are 25.75, 50.5, 75.25
    assert levels[[24, 25, 49, 50, 74, 75]].tolist() == [0, 1, 1, 2, 2, 3]  # scores 25, 26, 50, 51, 75, 76
    # new scores by a reference set's levels; beyond its range: the end levels
    new = sd.metrics.minority_levels(torch.tensor([-5.0, 25.75, 26.0, 1e9]), 4, reference=scores)
    assert new.tolist() == [0, 0, 1, 3]


# --- self-guided minority sampling ----------------------------------------------------------------------


def _guided_times(proc):
    """The nodes of the first 30% of the time range (the paper's guidance in early steps only)."""
    grid = sd.solvers.make_grid(proc, sd.schedules.get("time_uniform"), STEPS)
    return [t for t in grid.t[:-1] if t > 0.7 * proc.t_max]


def test_self_guided_minority_samples_the_rare_component(toy):
    """Unguided DDPM lands in the rare component at its weight; self-guidance (w = 2, re-noised to
    t = 0.4, guided in the first 30% of the steps) more than triples that, with few samples off the
    support."""
    gmm, proc, den, q, x_T = toy
    x, info = _ddpm(den, x_T)
    rare, low, off = _shares(gmm, x, q)
    assert 0.035 < rare < 0.065 and low < 0.12 and off < 0.003  # measured 0.049, 0.083, 0.0
    times = _guided_times(proc)
    assert len(times) == 15
    sg = SelfGuidedMinority(den, 2.0, renoise=0.4, times=times, generator=_gen(3))
    x, info = _ddpm(sg, x_T)
    assert info.nfe == STEPS + len(times)  # a guided call re-denoises once: 65
    rare, low, off = _shares(gmm, x, q)
    assert rare > 0.13 and low > 0.11 and off < 0.015  # measured 0.164, 0.132, 0.006


@pytest.mark.parametrize("normalize", [True, False])
def test_self_guided_minority_step_is_the_normalized_loss_gradient(toy, normalize):
    """One guided call against autograd on the paper's loss, written out: eps' = eps - sigma w g / |g|_inf,
    g = grad_x ||x0_hat(x) - sg[x0_hat(alpha_s x0_hat(x) + sigma_s eps, s)]|| averaged over the draws
    (``normalize=False``: g itself, where the average's 1 / samples shows; a sum passed before)."""
    _, proc, den, _, _ = toy
    x = torch.randn(16, 2, dtype=F64, generator=_gen(4)) * 1.5
    t, s, w = 0.8, 0.5, 1.7
    pred = SelfGuidedMinority(den, w, renoise=s, samples=2, normalize=normalize, generator=_gen(5))(x, t)
    g_eps, a_s, s_s = _gen(5), float(proc.alpha(s)), float(proc.sigma(s))
    xr = x.clone().requires_grad_(True)
    x0 = den(xr, t).x0
    loss = 0
    for _ in range(2):
        again = den(a_s * x0.detach() + s_s * torch.randn(16, 2, dtype=F64, generator=g_eps), s).x0
        loss = loss + (x0 - again).norm(dim=1) / 2
    (g,) = torch.autograd.grad(loss.sum(), xr)
    if normalize:
        g = g / g.abs().amax(1, keepdim=True)
    base = den(x, t)
    assert torch.allclose(pred.eps, base.eps - base.sigma * w * g, rtol=1e-10, atol=1e-12)
    assert not pred.eps.requires_grad


def test_dps_over_self_guided_minority_differentiates_its_guidance(toy):
    """DPS over SelfGuidedMinority: the DPS gradient is ``J'^T A^T r / s^2`` with ``J'`` the Jacobian of
    SelfGuidedMinority's guided ``x0`` -- the derivative of its normalized minority gradient included, and
    of its re-noised reconstruction (the paper's ``sg`` stops the gradient in ``L``, not the dependence of
    ``g`` on ``x``) -- against central differences of that ``x0`` (the same ``eps`` at every call). Before,
    SelfGuidedMinority refused DPS's ``x``, which requires grad ('x requires grad, and differentiating
    through SelfGuidedMinority's own gradient is not supported')."""
    _, _, den, _, _ = toy
    A, y, s_y = torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([1.0], dtype=F64), 0.3
    x = torch.randn(3, 2, dtype=F64, generator=_gen(4)) * 1.5
    t = 0.6

    def guided() -> SelfGuidedMinority:
        return SelfGuidedMinority(den, 0.5, renoise=0.4, samples=2, generator=_gen(7))

    pred, g = sd.guidance.DPS(guided(), Matrix(A), y, noise_std=s_y, variant="squared").likelihood_score(x, t)
    x0 = guided()(x, t).x0
    torch.testing.assert_close(pred.x0, x0, rtol=1e-12, atol=1e-14)
    h, eye = 1e-5, torch.eye(2, dtype=F64)
    cols = [(guided()(x + h * e, t).x0 - guided()(x - h * e, t).x0) / (2 * h) for e in eye]  # d x0 / d x_j
    v = ((y - x0 @ A.T) / s_y**2) @ A  # A^T r / s^2
    expected = torch.stack([(c * v).sum(1) for c in cols], dim=1)
    torch.testing.assert_close(g, expected, rtol=1e-7, atol=1e-9)
    # the minority gradient's own derivative is not small here: DPS over den alone is far off
    alone = sd.guidance.DPS(den, Matrix(A), y, noise_std=s_y, variant="squared").likelihood_score(x, t)[1]
    assert float((alone - expected).abs().max()) > 0.1 * float(expected.abs().max())


def test_self_guided_minority_reports_a_nan_net_output(toy):
    """A net that returns NaN in the re-noised evaluation only (the one without gradient): the sampler
    reports it at the step (the gradient's normalization turned it into a zero gradient, an unguided step)."""
    _, proc, den, _, x_T = toy

    def net(x, t):
        out = den.net(x, t)
        return out if torch.is_grad_enabled() else out * math.nan

    sg = SelfGuidedMinority(sd.Denoiser(net, proc, prediction=den.prediction), 1.0, generator=_gen(0))
    with pytest.raises(sd.NonFiniteError, match=r"NaN/inf at step 0"):
        _ddpm(sg, x_T[:8])


def test_self_guided_minority_scale_zero_and_unguided_times_are_the_base(toy):
    _, proc, den, _, x_T = toy
    plain, info = _ddpm(den, x_T[:64])
    for sg in (
        SelfGuidedMinority(den, 0.0),
        SelfGuidedMinority(den, 3.0, times=[0.5 * proc.t_max], generator=_gen(0)),
    ):
        x, info_sg = _ddpm(sg, x_T[:64])
        assert torch.equal(x, plain)  # bitwise: no guided call (0.5 t_max is not a node of the grid)
        assert info_sg.nfe == info.nfe == STEPS


def test_self_guided_minority_per_sample_times(toy):
    """Rows whose time is one of ``times`` are guided, the others are the base's, bitwise."""
    _, _, den, _, x_T = toy
    x, t = x_T[:6], torch.tensor([0.9, 0.5, 0.9, 0.3, 0.5, 0.9], dtype=F64)
    pred = SelfGuidedMinority(den, 1.5, times=[0.9], generator=_gen(2))(x, t)
    base = den(x, t)
    guided = SelfGuidedMinority(den, 1.5, generator=_gen(2))(x, t)
    on = t == 0.9
    assert torch.equal(pred.x0[~on], base.x0[~on])
    assert torch.allclose(pred.x0[on], guided.x0[on], rtol=1e-13, atol=1e-15)
    assert float((pred.x0[on] - base.x0[on]).abs().min()) > 1e-3


def test_self_guided_minority_under_fk_steering_one_generator_per_particle(toy):
    """Under a particle method the re-noising's generators are one per particle, batch-major: a batch row's
    particles are then the same alone as in a batch (max difference 0)."""
    _, _, den, _, x_T = toy

    def run(rows):
        sg = SelfGuidedMinority(den, 1.0, generator=[_gen(100 + 4 * r + j) for r in rows for j in range(4)])
        return sd.smc.fk_steering(
            sg,
            lambda x: x[:, 0],
            lam=1.0,
            shape=(len(rows), 2),
            particles=4,
            steps=5,
            generator=[_gen(r) for r in rows],
            x_T=torch.stack([x_T[4 * r : 4 * r + 4] for r in rows]),
        ).x

    assert torch.equal(run([0, 1])[1], run([1])[0])


def test_self_guided_minority_under_rbf_one_generator_per_row(toy):
    """rbf evaluates some rows at a time (``take_rows``): the re-noising's per-row generators are taken at
    those rows, so a row's search is the same alone as in a batch (max difference 0). Was: the list of the
    whole batch reached a call on one row ('generator: 3 generators for a batch of 1 rows')."""
    _, _, den, _, _ = toy

    def run(rows):
        sg = SelfGuidedMinority(den, 1.0, generator=[_gen(100 + r) for r in rows])
        out = sd.smc.rbf(
            sg, lambda x: x[:, 0], 30, shape=(len(rows), 2), steps=6, generator=[_gen(r) for r in rows]
        )
        return out.x[:, 0], out.row_nfe

    x, nfe = run([0, 1, 2])
    alone, alone_nfe = run([1])
    assert torch.equal(x[1], alone[0]) and int(nfe[1]) == int(alone_nfe[0])


def test_self_guided_minority_nfe_and_seeding(toy):
    _, proc, den, _, x_T = toy
    times = _guided_times(proc)
    sg = SelfGuidedMinority(den, 1.0, samples=3, times=times, generator=_gen(7))
    _, info = sd.sample(sg, x_T[:8], 20, "dpmpp_2m", return_info=True)
    assert info.nfe == 20 + 3  # of its grid's nodes only the first, t_max, is one of the times
    _, info = _ddpm(sg, x_T[:8])
    assert info.nfe == STEPS + 3 * len(times)
    _, info = sd.sample(
        SelfGuidedMinority(den, 1.0, generator=_gen(7)), x_T[:8], 10, "heun", return_info=True
    )
    assert info.nfe == (2 * 10 - 1) * 2  # Heun: 2 evaluations a step (1 in the last), each costs 2
    with pytest.raises(
        ValueError, match=r"SelfGuidedMinority in the denoiser draws noise from torch's global RNG"
    ):
        sd.sample(SelfGuidedMinority(den, 1.0), x_T[:8], 10, "ddpm", generator=_gen(0))
    a = sd.sample(SelfGuidedMinority(den, 1.0, generator=_gen(8)), x_T[:8], 10, "ddpm", generator=_gen(0))
    b = sd.sample(SelfGuidedMinority(den, 1.0, generator=_gen(8)), x_T[:8], 10, "ddpm", generator=_gen(0))
    assert torch.equal(a, b)


def test_self_guided_minority_bad_input(toy):
    _, _, den, _, x_T = toy
    bad = [
        ({"scale": -1.0}, r"scale must be a finite number >= 0, got -1.0"),
        ({"renoise": 2.0}, r"renoise must be a finite number in \[0.001, 0.9946\], got 2.0"),
        ({"samples": 0}, r"samples must be an integer >= 1, got 0"),
        ({"distance": "l3"}, r"distance must be one of \['l2', 'l1'\] or a callable"),
        ({"normalize": "yes"}, r"normalize"),
        ({"times": []}, r"times must be a non-empty sequence of process times or None"),
        ({"times": [0.5, 7.0]}, r"times\[1\] must be a finite number in \[0.001, 0.9946\], got 7.0"),
        ({"generator": 3}, r"generator must be None, a torch.Generator or a non-empty list"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=rf"SelfGuidedMinority: {msg}"):
            SelfGuidedMinority(den, **{"scale": 1.0, **kwargs})
    with pytest.raises(ValueError, match=r"SelfGuidedMinority: den must be a steerdiff Denoiser"):
        SelfGuidedMinority(lambda x, t: x)
    wrong = SelfGuidedMinority(den, 1.0, distance=lambda a, b: (a - b).abs(), generator=_gen(0))
    with pytest.raises(
        ValueError, match=r"SelfGuidedMinority: distance must return a \(4,\) tensor .* got \(4, 2\)"
    ):
        wrong(x_T[:4], 0.5)


# --- minority guidance with a trained level classifier ---------------------------------------------------


def _level_classifier(gmm, proc, den, levels=10, iterations=800):
    """A tiny noise-conditional classifier of minority-score levels, trained as the authors do: score and
    label a data set (quantile levels), then cross-entropy on its noised samples at uniform times."""
    x0 = gmm.sample(8000, _gen(11))
    labels = sd.metrics.minority_levels(sd.metrics.minority_score(den, x0, generator=_gen(12)), levels)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, levels),
    ).to(F64)

    def logits(x, t):
        lam = proc.lam(torch.as_tensor(t, dtype=F64)).reshape(-1, 1).expand(x.shape[0], 1)
        return net(torch.cat([x, lam / 5], dim=1))

    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = _gen(13)
    for _ in range(iterations):
        i = torch.randint(0, len(x0), (512,), generator=g)
        t = proc.t_min + (proc.t_max - proc.t_min) * torch.rand(512, dtype=F64, generator=g)
        xt = proc.alpha(t)[:, None] * x0[i] + proc.sigma(t)[:, None] * torch.randn(
            512, 2, dtype=F64, generator=g
        )
        loss = torch.nn.functional.cross_entropy(logits(xt, t), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits


def test_minority_guidance_samples_the_rare_component(toy):
    """Guidance toward the top of 10 levels: the rare component's share 4x the unguided one (its share
    among the top-level training samples is 0.25), few samples off the support."""
    gmm, proc, den, q, x_T = toy
    clf = _level_classifier(gmm, proc, den)
    x, info = _ddpm(MinorityGuidance(den, clf, level=-1, scale=1.0), x_T)
    assert info.nfe == STEPS
    rare, low, off = _shares(gmm, x, q)
    assert rare > 0.15 and low > 0.25 and off < 0.02  # measured 0.228, 0.344, 0.005
    assert isinstance(MinorityGuidance(den, clf), ClassifierGuidance)
    plain, _ = _ddpm(den, x_T[:64])
    assert torch.equal(_ddpm(MinorityGuidance(den, clf, scale=0.0), x_T[:64])[0], plain)


def test_minority_guidance_is_the_level_log_probability_gradient(toy):
    _, _, den, _, _ = toy
    weights = torch.tensor([[1.0, -2.0], [0.5, 0.3], [-1.0, 1.0]], dtype=F64)

    def clf(x, t):
        return x @ weights.T * t

    x = torch.randn(8, 2, dtype=F64, generator=_gen(0))
    pred = MinorityGuidance(den, clf, level=-1, scale=2.0)(x, 0.5)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(clf(xr, 0.5), 1)[:, 2].sum(), xr)
    base = den(x, 0.5)
    assert torch.allclose(pred.eps, base.eps - base.sigma * 2.0 * g, rtol=1e-12, atol=1e-14)
    assert torch.equal(MinorityGuidance(den, clf, level=2, scale=2.0)(x, 0.5).eps, pred.eps)


def test_minority_bad_input(toy):
    gmm, _, den, _, x_T = toy
    with pytest.raises(ValueError, match=r"MinorityGuidance: classifier must be callable"):
        MinorityGuidance(den, "clf")
    with pytest.raises(ValueError, match=r"MinorityGuidance: level must be an integer, got 1.5"):
        MinorityGuidance(den, lambda x, t: x, level=1.5)
    with pytest.raises(
        ValueError, match=re.escape("MinorityGuidance: level must be in [-2, 1] for a classifier")
    ):
        MinorityGuidance(den, lambda x, t: x, level=2)(x_T[:4], 0.5)
    with pytest.raises(
        ValueError, match=re.escape("MinorityGuidance: classifier must return (4, L) logits, got (4,)")
    ):
        MinorityGuidance(den, lambda x, t: x.sum(1))(x_T[:4], 0.5)
    x0 = gmm.sample(8, _gen(0))
    ms = sd.metrics.minority_score
    with pytest.raises(ValueError, match=r"minority_score: den must be a steerdiff Denoiser"):
        ms(None, x0)
    with pytest.raises(
        ValueError, match=r"minority_score: x0 has sample shape \(3,\), the denoiser expects \(2,\)"
    ):
        ms(den, torch.zeros(4, 3, dtype=F64))
    with pytest.raises(
        ValueError, match=r"minority_score: t must be a finite number in \[0.001, 0.9946\], got 1.5"
    ):
        ms(den, x0, 1.5)
    with pytest.raises(ValueError, match=r"minority_score: samples must be an integer >= 1, got 0"):
        ms(den, x0, samples=0)
    with pytest.raises(ValueError, match=r"minority_score: distance must be one of \['l2', 'l1'\]"):
        ms(den, x0, distance="lpips")
    with pytest.raises(
        ValueError, match=r"minority_score: generator must be None, one torch.Generator or a list of"
    ):
        ms(den, x0, generator=[_gen(0)] * 3)
    lv = sd.metrics.minority_levels
    with pytest.raises(ValueError, match=r"minority_levels: levels must be an integer >= 2, got 1"):
        lv(torch.ones(4), 1)
    with pytest.raises(
        ValueError, match=r"minority_levels: scores must be a non-empty 1-d tensor of finite scores"
    ):
        lv(torch.tensor([1.0, math.nan]), 2)
    with pytest.raises(ValueError, match=r"minority_levels: reference must be a non-empty 1-d tensor"):
        lv(torch.ones(4), 2, reference=torch.ones(2, 2))
