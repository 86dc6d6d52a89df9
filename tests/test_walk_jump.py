"""Walk-jump sampling with accumulated measurements (Saremi, Park & Bach 2024) against exact mixtures.

The conditional score against autograd of the exact joint density of ``k`` measurements; the law of the
running mean and of the jump on Gaussian data in closed form; the sliced W2 to exact data as measurements
accumulate; ``m = 1`` as plain Langevin on ``p_sigma`` and a denoising jump; the mode weights of a
well-separated two-mode mixture ("tunneling") against plain Langevin on the noised density at equal NFE.

``python -m tests.test_walk_jump`` prints docs/mcmc.md's numbers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers.base import NonFiniteError

from .reference import smooth_mixture

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _joint_log_prob(gmm: sd.toy.GaussianMixture, sigma: float, ys: torch.Tensor) -> torch.Tensor:
    """``log p(y_1..y_k)`` of ``y_j = x + sigma n_j``, ``x ~ gmm``, ``ys`` ``(n, k, d)``: per component the
    ``k d``-dimensional Gaussian with covariance ``1 1^T (x) S_c + sigma^2 I``."""
    n, k, d = ys.shape
    terms = []
    for c in range(len(gmm.weights)):
        cov = torch.kron(torch.ones(k, k, dtype=F64), gmm.covariance_matrices[c])
        normal = torch.distributions.MultivariateNormal(
            gmm.means[c].repeat(k), cov + sigma**2 * torch.eye(k * d, dtype=F64)
        )
        terms.append(normal.log_prob(ys.reshape(n, k * d)) + gmm.weights[c].log())
    return torch.logsumexp(torch.stack(terms, -1), -1)


@pytest.mark.parametrize("components", [1, 3])
@pytest.mark.parametrize("process", [sd.VP.linear(), sd.EDM(), sd.RectifiedFlow()], ids=repr)
def test_conditional_score_is_the_exact_joints(components, process):
    """Eq. (1), the denoiser at sigma / sqrt(k) at the running mean, is grad_{y_k} log p(y_1..y_k) of the
    exact joint (a single Gaussian and a full-covariance mixture), under processes of all three kinds
    (alpha = 1, VP, flow): the time of a noise level is right. Measured 7e-15 at most."""
    g = _gen(3)
    means = 2 * torch.randn(components, 2, generator=g, dtype=F64)
    roots = torch.randn(components, 2, 2, generator=g, dtype=F64)
    covs = roots @ roots.mT + 0.2 * torch.eye(2, dtype=F64)
    gmm = sd.toy.GaussianMixture(means, covs, torch.arange(1, components + 1, dtype=F64))
    den, sigma = gmm.denoiser(process), 1.3
    for k in (1, 2, 5):
        ys = 2 * torch.randn(7, k, 2, generator=g, dtype=F64)
        yr = ys.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(_joint_log_prob(gmm, sigma, yr).sum(), yr)
        previous = None if k == 1 else ys[:, :-1].mean(1)
        score = sd.mcmc.walk_jump_score(den, ys[:, -1], previous, k, sigma)
        assert float((score - exact[:, -1]).abs().max()) < 1e-10, k


def _gaussian_running_mean(kernel: str, m: int, n: int = 20000) -> float:
    """Variance of ``ybar_m`` over the exact one, ``x ~ N(0, I_2)``, ``sigma = 2``, 20 steps per measurement;
    the jump of Gaussian data is linear in ``ybar_m`` (``ybar / (1 + sigma^2 / m)``), so its law follows."""
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), torch.ones(1))
    sigma = 2.0
    out = sd.mcmc.walk_jump(
        gmm.denoiser(sd.EDM()), (n, 2), sigma, m, 20, kernel=kernel, dtype=F64, generator=_gen()
    )
    noise = sigma**2 / m  # ybar_m = x + (sigma / sqrt(m)) n
    assert float((out.x - out.y_mean / (1 + noise)).abs().max()) < 1e-12
    return float(out.y_mean.var(0).mean()) / (1 + noise)


@pytest.mark.parametrize("m", [1, 16])
def test_gaussian_data_running_mean_has_its_exact_law(m):
    """On Gaussian data every conditional is Gaussian and ``ybar_m ~ N(0, (1 + sigma^2 / m) I)``: ULMC at
    its defaults (h = 0.5, friction 2) holds the variance to 0.2% (measured 1.0017 / 1.0018 at m = 1 / 16;
    Monte Carlo error 0.7%). ULA at its default h = 0.1 and the same 20 steps reads 1.041 / 1.320: it covers
    a fifth of ULMC's time, and the warm starts' correlation between measurements is left in ``ybar``
    (at 50 steps its O(h) bias remains, 1.05 / 1.06)."""
    ybar = _gaussian_running_mean("ulmc", m)
    assert abs(ybar - 1) < 0.02, ybar
    assert _gaussian_running_mean("ula", m) > 1.03


def _sliced_w_by_measurements(ms: tuple[int, ...], n: int = 2000) -> list[float]:
    """Sliced W2 of walk-jump samples to exact data over the floor, the 2-d three-component smooth mixture,
    ``sigma = 3``, ULMC, 10 steps per measurement."""
    gmm = smooth_mixture(dim=2, components=3)
    den = gmm.denoiser(sd.VP.linear())
    ref = gmm.sample(n, _gen(1))
    floor = sd.metrics.floor(gmm.sample, n, reference=ref)
    return [
        sd.metrics.sliced_wasserstein(
            sd.mcmc.walk_jump(den, (n, 2), 3.0, m, 10, dtype=F64, generator=_gen()).x, ref
        )
        / floor
        for m in ms
    ]


def test_sliced_w_falls_as_measurements_accumulate():
    """m = 1 (classic walk-jump) returns E[x | y] at noise 3, far from the data; the jump's noise sigma /
    sqrt(m) falls with m and so does the distance. Measured 14.2 / 7.0 / 2.6 / 0.84 x the floor at
    m = 1 / 4 / 16 / 64 (the jump from exact draws of ybar_m reads 14.2 / 7.4 / 3.0 / 2.2 on the same
    reference)."""
    ratios = _sliced_w_by_measurements((1, 4, 16, 64))
    assert all(a > 1.5 * b for a, b in itertools.pairwise(ratios)), ratios
    assert ratios[0] > 10 and ratios[-1] < 1.5, ratios


def test_one_measurement_is_langevin_on_the_smoothed_density_then_the_jump():
    """m = 1 with ULA is sd.mcmc.ULA on log p_sigma (the exact mixture's, by autograd) from the same start
    and generator, then the exact denoiser at sigma: to round-off."""
    gmm = smooth_mixture(dim=2, components=3)
    sigma, h, steps = 1.5, 0.1, 30
    y0 = sigma * torch.randn(64, 2, generator=_gen(2), dtype=F64)
    out = sd.mcmc.walk_jump(
        gmm.denoiser(sd.VP.linear()),
        (64, 2),
        sigma,
        1,
        steps,
        kernel="ula",
        step_size=h,
        y_init=y0,
        generator=_gen(),
    )
    y, _ = sd.mcmc.ULA().run(y0, lambda y: gmm.log_prob(y, 1.0, sigma), steps, _gen(), step_size=h * sigma**2)
    assert float((out.y_mean - y).abs().max()) < 1e-10
    assert float((out.x - gmm.denoise(y, 1.0, sigma)).abs().max()) < 1e-10
    assert out.nfe == steps + 1


def test_ulmc_walk_is_the_sachs_scheme_with_the_velocity_carried_across_measurements():
    """The ULMC walk written out from the module docstring (Saremi & Srivastava 2022, Alg. 1): per step ``y +=
    h v / 2``; ``v = eta (v + u h psi / 2) + u h psi / 2 + sqrt(u (1 - eta^2)) z``; ``y += h v / 2``, ``u =
    sigma^2``, ``eta = exp(-gamma h)``, ``psi`` the score (1) of the measurement's conditional, ``v = 0`` at
    the start and carried from one measurement's chain to the next; then the jump at ``sigma / sqrt(m)``: to
    round-off, with the same draws. Before, nothing tested the carry (``v`` reset per measurement passed)."""
    gmm = smooth_mixture(dim=2, components=3)
    den, sigma, m, steps, h, gamma = gmm.denoiser(sd.VP.linear()), 2.0, 3, 4, 0.4, 1.5
    out = sd.mcmc.walk_jump(
        den, (8, 2), sigma, m, steps, step_size=h, friction=gamma, dtype=F64, generator=_gen(4)
    )
    g, u, eta = _gen(4), sigma**2, math.exp(-gamma * h)
    y = sigma * torch.randn(8, 2, generator=g, dtype=F64)
    v, total = torch.zeros_like(y), torch.zeros_like(y)
    for k in range(1, m + 1):
        previous = None if k == 1 else total / (k - 1)
        for _ in range(steps):
            y = y + h * v / 2
            psi = sd.mcmc.walk_jump_score(den, y, previous, k, sigma)
            z = torch.randn(8, 2, generator=g, dtype=F64)
            v = eta * (v + u * h * psi / 2) + u * h * psi / 2 + math.sqrt(u * (1 - eta**2)) * z
            y = y + h * v / 2
        total = total + y
    t = sd.mcmc.measurement_time(den.process, sigma, m)
    jump = den(float(den.process.alpha(t)) * total / m, t).x0
    torch.testing.assert_close(out.y_mean, total / m, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.x, jump, rtol=0, atol=1e-12)
    assert out.nfe == m * steps + 1


TWO_MODES = sd.toy.GaussianMixture(
    torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=F64),
    torch.full((2, 2), 0.25, dtype=F64),
    torch.tensor([0.8, 0.2]),
)


def _heavy(x: torch.Tensor) -> float:
    """The fraction of ``x`` in ``TWO_MODES``' heavier mode (responsibility above one half)."""
    return float((TWO_MODES.log_responsibilities(x)[:, 0] > math.log(0.5)).double().mean())


def _mode_weights(n: int = 1000, sigma: float = 4.5, m: int = 32, steps: int = 40) -> dict[str, float]:
    """Fraction of samples in the heavier mode (exact weight 0.8) of ``TWO_MODES`` (modes 8 apart, std 0.5):
    walk-jump with ``m`` measurements at ``sigma`` (every conditional log-concave: sigma^2 > 4^2 + 0.25,
    the largest posterior variance) against plain Langevin -- ULA, ULMC (walk-jump at one measurement),
    MALA on the exact log-density -- on the density noised at the walk-jump's final noise sigma / sqrt(m),
    each from the same start ``sigma z`` and jumping with the denoiser there, at equal NFE."""
    den = TWO_MODES.denoiser(sd.EDM())
    nfe, s = m * steps + 1, sigma / math.sqrt(m)
    y0 = sigma * torch.randn(n, 2, generator=_gen(), dtype=F64)

    out = {"walk-jump": sd.mcmc.walk_jump(den, (n, 2), sigma, m, steps, y_init=y0, generator=_gen())}
    for kernel in ("ula", "ulmc"):
        out[kernel] = sd.mcmc.walk_jump(
            den, (n, 2), s, 1, nfe - 1, kernel=kernel, y_init=y0, generator=_gen()
        )
    weights = {k: _heavy(v.x) for k, v in out.items()}
    assert {v.nfe for v in out.values()} == {nfe}
    # MALA: nfe - 2 moves (one evaluation each and one at the start) and the jump
    y, _ = sd.mcmc.MALA(step_size=0.3 * s**2).run(
        y0, lambda y: TWO_MODES.log_prob(y, 1.0, s), nfe - 2, _gen()
    )
    weights["mala"] = _heavy(TWO_MODES.denoise(y, 1.0, s))
    return weights


def test_tunneling_recovers_unequal_mode_weights_where_langevin_does_not():
    """The paper's tunneling: measured 0.812 for walk-jump (1281 NFE) against ULA 0.528, ULMC 0.530, MALA
    0.529 (n = 2000; 0.797 / 0.532 / 0.541 / 0.532 with another seed): plain Langevin keeps the split of its
    start, walk-jump the exact 0.8 within Monte Carlo error (0.013 at n = 1000)."""
    weights = _mode_weights()
    assert abs(weights["walk-jump"] - 0.8) < 0.05, weights
    for name in ("ula", "ulmc", "mala"):
        assert abs(weights[name] - 0.8) > 0.2, weights


def test_reproducible_per_seed_and_per_sample_with_exact_nfe():
    gmm = smooth_mixture(dim=2, components=3)
    calls = []
    base = gmm.denoiser(sd.VP.linear())

    def net(x, t):
        calls.append(1)
        return base.net(x, t)

    den = sd.Denoiser(net, sd.VP.linear(), prediction="x0")
    run = lambda gen, n=3: sd.mcmc.walk_jump(den, (n, 2), 2.0, 3, 4, dtype=F64, generator=gen)  # noqa: E731
    a, b = run(_gen(7)), run(_gen(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.y_mean, b.y_mean)
    assert not torch.equal(a.x, run(_gen(8)).x)
    assert a.nfe == 3 * 4 + 1 and len(calls) == 3 * (3 * 4 + 1)
    rows = run([_gen(s) for s in (1, 2, 3)])
    alone = run([_gen(2)], n=1)
    assert float((rows.x[1] - alone.x[0]).abs().max()) < 1e-12


def test_a_non_finite_denoiser_output_is_reported():
    den = sd.Denoiser(lambda x, t: x * float("nan"), sd.EDM(), prediction="x0")
    with pytest.raises(NonFiniteError, match=r"step 1 \(evaluation 1"):
        sd.mcmc.walk_jump(den, (2, 2), 1.0, 2, 3, generator=_gen())


def _recorded(gmm: sd.toy.GaussianMixture, process: sd.Process) -> tuple[sd.Denoiser, list]:
    """``gmm``'s exact denoiser, each call's ``(input, x0)`` recorded."""
    base, seen = gmm.denoiser(process), []

    def net(x, t):
        out = base.net(x, t)
        seen.append((x, out))
        return out

    return sd.Denoiser(net, process, prediction=base.prediction), seen


@pytest.mark.parametrize("kernel", ["ulmc", "ula"])
def test_a_diverging_walk_is_reported_at_the_first_absurd_score_step_not_as_the_models_nan(kernel):
    """Too large a step: the state grows geometrically until the exact denoiser returns NaN (float64: at
    |y| ~ 1e154, before the state overflows; reported as the model's before). The error names the first
    chain step whose score step |xhat - y| exceeds 1e8 sigma (found here from the recorded calls: EDM, one
    measurement, so the net's input is the state) and the step size."""
    gmm, sigma, h = smooth_mixture(dim=2, components=3), 2.0, {"ulmc": 5.0, "ula": 3.0}[kernel]
    den, seen = _recorded(gmm, sd.EDM())
    with pytest.raises(NonFiniteError) as err:
        sd.mcmc.walk_jump(den, (4, 2), sigma, 1, 400, kernel=kernel, step_size=h, dtype=F64, generator=_gen())
    first = next(i for i, (x, x0) in enumerate(seen, 1) if float((x0 - x).abs().max()) > 1e8 * sigma)
    assert len(seen) == first  # raised at once on the CPU
    assert str(err.value) == (
        f"walk_jump: the Langevin chain of measurement 1 diverged at its step {first} (process time t=2, "
        "sigma=2; the model's outputs finite until then): the score's step |xhat - y| exceeded 1e+08 sigma "
        "or was not finite (the state is far outside the data smoothed at sigma); "
        f"step_size={h:g} is too large for kernel='{kernel}' here: take a smaller step_size"
    )
    # a chain started 3e7 sigma away with a stable step comes back (its first score step is 3e7 sigma)
    far = torch.full((4, 2), 3e7 * sigma, dtype=F64)
    out = sd.mcmc.walk_jump(gmm.denoiser(sd.EDM()), (4, 2), sigma, 2, 200, kernel=kernel, y_init=far)
    assert float(out.x.abs().max()) < 5


@pytest.mark.parametrize(("steps", "at"), [(3, "before its step 2"), (1, "after its last step")])
def test_a_state_overflowing_in_one_step_is_reported_as_the_chains(steps, at):
    """A float32 ULA step of eps = 1e38 sigma^2 overflows the state from a finite score: the next
    evaluation, or the jump, would see inf (the model's NaN before)."""
    den, seen = _recorded(smooth_mixture(dim=2, components=3), sd.EDM())
    with pytest.raises(
        NonFiniteError,
        match=rf"measurement 1 diverged {at} \(.*\): the state became NaN/inf; step_size=1e\+38 is too large "
        r"for kernel='ula' here: take a smaller step_size",
    ):
        sd.mcmc.walk_jump(den, (4, 2), 2.0, 1, steps, kernel="ula", step_size=1e38, generator=_gen())
    assert (
        all(bool(torch.isfinite(x).all() and torch.isfinite(x0).all()) for x, x0 in seen) and len(seen) == 1
    )


def test_a_seeded_walk_refuses_a_denoiser_whose_own_noise_the_seed_does_not_reach():
    """As every seeded sampler (``sd.sample``, the particle methods): a ``MonteCarloDenoiser`` without a
    generator of its own draws from torch's global RNG, and one with a single generator draws the whole batch
    from it while ``generator=`` is one per row. Was: both ran, two runs of the first with the same seed
    0.35 apart. With one generator per row on both, a row is the same alone (bitwise)."""
    gmm = smooth_mixture(dim=2, components=3)

    def mc(generator=None):
        return sd.mcmc.MonteCarloDenoiser(
            lambda x0: gmm.log_prob(x0), sd.EDM(), (2,), samples=16, generator=generator
        )

    def run(den, generator, n=2):
        return sd.mcmc.walk_jump(den, (n, 2), 1.0, 2, 3, dtype=F64, generator=generator)

    with pytest.raises(
        ValueError, match=r"^walk_jump: generator: MonteCarloDenoiser in the denoiser draws noise "
    ):
        run(mc(), _gen())
    with pytest.raises(
        ValueError, match=r"^walk_jump: generator: one generator per row .* MonteCarloDenoiser"
    ):
        run(mc(_gen(5)), [_gen(1), _gen(2)])
    both = run(mc([_gen(5), _gen(6)]), [_gen(1), _gen(2)])
    alone = run(mc([_gen(6)]), [_gen(2)], n=1)
    assert torch.equal(both.x[1], alone.x[0])


def test_bad_input():
    gmm = smooth_mixture(dim=2, components=3)
    den = gmm.denoiser(sd.EDM())  # sigma / alpha in [0.002, 80]
    wj = sd.mcmc.walk_jump
    cases = [
        (dict(sigma=0.0), r"sigma must be a finite number > 0, got 0.0"),
        (dict(sigma=100.0), r"noise sigma / sqrt\(k\) = 100 .* \[0\.002, 80\]"),
        (dict(sigma=0.01, measurements=100), r"sigma / sqrt\(measurements\) >= 0\.002"),
        (dict(measurements=0), r"measurements must be an integer >= 1"),
        (dict(steps_per_measurement=0), r"steps_per_measurement must be an integer >= 1"),
        (dict(kernel="mala"), r"kernel must be one of \['ulmc', 'ula'\]"),
        (dict(kernel="ula", friction=1.0), r"friction is a parameter of kernel='ulmc'"),
        (dict(step_size=-1.0), r"step_size must be a finite number > 0"),
        (dict(friction=0.0), r"friction must be a finite number > 0"),
        (dict(shape=(4,)), r"shape must be \(batch, \*sample_shape\)"),
        (dict(shape=(4, 3)), r"shape has sample shape \(3,\), the denoiser expects \(2,\)"),
        (dict(y_init=torch.zeros(3, 2)), r"y_init must be a floating-point tensor of shape \(4, 2\)"),
        (dict(y_init=torch.zeros(4, 2), dtype=F64), r"dtype and device are y_init's"),
        # was: 'the model returned NaN/inf at step 1 (evaluation 1, ...)', the net blamed for the input's
        (
            dict(y_init=torch.zeros(4, 2).index_fill(1, torch.tensor([1]), math.nan)),
            r"y_init contains NaN or",
        ),
        (dict(y_init=torch.full((4, 2), math.inf)), r"^walk_jump: y_init contains NaN or inf"),
        (dict(dtype=torch.int64), r"dtype must be float16, bfloat16, float32 or float64"),
        (dict(generator=[_gen()] * 3), r"generator must be None, one torch.Generator or a list of batch = 4"),
        (dict(den=gmm), r"den must be a steerdiff Denoiser"),
        # sample's arguments went to the net as conditions: a TypeError from inside it
        (
            dict(steps=10),
            r"^walk_jump: steps is an argument of sample, not of walk_jump, which runs Langevin",
        ),
        (dict(solver="ddim", corrector="ula"), r"corrector, solver are arguments of sample"),
    ]
    for change, message in cases:
        kwargs = dict(den=den, shape=(4, 2), sigma=1.0, measurements=2, steps_per_measurement=2) | change
        with pytest.raises(ValueError, match=message):
            wj(**kwargs)
    y = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"previous_mean must be None for k = 1"):
        sd.mcmc.walk_jump_score(den, y, y, 1, 1.0)
    with pytest.raises(ValueError, match=r"previous_mean must have y's shape \(4, 2\)"):
        sd.mcmc.walk_jump_score(den, y, torch.zeros(4, 3), 2, 1.0)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1"):
        sd.mcmc.walk_jump_score(den, y, None, 0, 1.0)
    # were an AttributeError ('GaussianMixture' object has no attribute 'process') and a RuntimeError from
    # inside the net ("shape '[4, 2]' is invalid for input of size 12")
    with pytest.raises(ValueError, match=r"^walk_jump_score: den must be a steerdiff Denoiser"):
        sd.mcmc.walk_jump_score(gmm, y, None, 1, 1.0)
    with pytest.raises(
        ValueError, match=r"^walk_jump_score: y has sample shape \(3,\), the denoiser expects"
    ):
        sd.mcmc.walk_jump_score(den, torch.zeros(4, 3), None, 1, 1.0)


def main() -> None:
    """docs/mcmc.md's numbers."""
    print(
        "sliced W2 / floor at m = 1, 4, 16, 64:",
        [round(r, 2) for r in _sliced_w_by_measurements((1, 4, 16, 64))],
    )
    for m in (1, 16):
        ulmc, ula = _gaussian_running_mean("ulmc", m), _gaussian_running_mean("ula", m)
        print(f"Gaussian data, m = {m}: var ybar / exact: ULMC {ulmc:.4f}, ULA {ula:.4f}")
    print("heavier-mode weight (exact 0.8), n = 2000:", _mode_weights(n=2000))
    den = TWO_MODES.denoiser(sd.EDM())
    for steps in (10, 20, 40):
        out = sd.mcmc.walk_jump(den, (4000, 2), 4.5, 16, steps, dtype=F64, generator=_gen())
        print(
            f"walk-jump, 16 measurements of {steps} steps, n = 4000: heavier-mode weight {_heavy(out.x):.3f}"
        )


if __name__ == "__main__":
    main()
