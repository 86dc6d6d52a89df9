"""Edit-friendly DDPM inversion (``sd.ddpm_invert``; Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024).

Exact answers: replaying the maps returns ``x_0`` bit for bit (the extraction's own chain) on VP and
rectified flow with three different transitions; the states are independent draws of ``q(x_t | x_0)``; on
Gaussian data every map's mean and variance have a closed form (the step is affine in ``x_0`` and the two
independent draws), which the maps match; on the mixture oracle the maps are measured against the point-mass
formulas of the module docstring. Editing a conditional two-Gaussian model is measured against DDIM inversion
and fresh noise.

``python -m tests.test_ddpm_inversion`` prints the editing table quoted in docs/inversion.md.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import CFG
from steerdiff.noise import ReplayNoise
from steerdiff.solvers import DDIM

F64 = torch.float64
VP = sd.VP.scaled_linear()
FLOW = sd.RectifiedFlow()
SCHEDULE = "time_uniform"  # the paper's grid: DDPM's evenly spaced timesteps
NULL = -1


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def x_0(gmm):
    return gmm.sample(16, generator=gen(5))


# --- exact reconstruction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [VP, FLOW], ids=["vp", "flow"])
@pytest.mark.parametrize("solver", ["ddpm", DDIM(eta=1.0), "flow_sde"], ids=["ddpm", "ddim_eta1", "flow_sde"])
def test_replay_reconstructs_x0(gmm, x_0, process, solver):
    """Sampling with the maps from ``x_T`` goes through the extraction's states and returns ``x_0`` (max
    error 5.6e-17 on VP, 0 under flow; ``inv.xs[-1]`` bit for bit), through ``sample_kwargs`` and through
    ``sample``'s own arguments alike; the inversion spends one evaluation per step."""
    den = gmm.denoiser(process)
    inv = sd.ddpm_invert(den, x_0, 12, solver, SCHEDULE, generator=gen(0))
    assert inv.nfe == inv.steps == len(inv.z) == 12 and len(inv.xs) == 13
    out = sd.sample(den, **inv.sample_kwargs())
    assert torch.equal(out, inv.xs[-1])
    assert (out - x_0).abs().max() < 1e-12
    seen: list[torch.Tensor] = []
    again = sd.sample(
        den,
        inv.x_T,
        12,
        solver,
        SCHEDULE,
        final="none",
        generator=inv.noise,
        callback=lambda d: seen.append(d["x"]),
    )
    assert torch.equal(again, out)
    assert all(torch.equal(a, b) for a, b in zip(seen, inv.xs[1:], strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_replays_with_the_net_in_half(gmm, x_0, dtype):
    """A half-precision ``x_0``: the states and maps are float32 and the net runs in ``dtype`` in the
    inversion and in the replay, whose ``x_T`` is handed over in ``dtype`` (drawn representable there): from
    ``skip = 0`` the replay is ``xs[-1]`` in ``dtype`` bit for bit; from node 5 it starts from that state
    rounded, and ends 1.4e-3 (float16) / 1.4e-2 (bfloat16) from ``x_0``, twice the rounding of ``x_0``
    itself."""
    base = gmm.denoiser(VP)
    seen = set()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.add(x.dtype)
        return base(x.double(), float(t[0])).x0.to(x.dtype)

    den = sd.Denoiser(net, VP, prediction="x0")
    inv = sd.ddpm_invert(den, x_0.to(dtype), 12, "ddpm", SCHEDULE, generator=gen(0))
    assert inv.xs[0].dtype == inv.z[0].dtype == torch.float32 and seen == {dtype}
    out = sd.sample(den, **inv.sample_kwargs())
    assert out.dtype == dtype and seen == {dtype} and torch.equal(out, inv.xs[-1].to(dtype))
    later = sd.sample(den, **inv.sample_kwargs(5)).double()
    rounding = float((x_0.to(dtype).double() - x_0).abs().max())
    assert (later - x_0).abs().max() < 2.5 * rounding


def test_nfe_counts_net_calls(gmm, x_0):
    """``nfe`` is the net's calls: one per step for ``ddpm``, two for a CFG denoiser and for the two-stage
    ``dpmpp_2s_ancestral``."""
    calls = []
    base = gmm.denoiser(VP)
    den = sd.Denoiser(lambda x, t, y=0: calls.append(1) or base(x, float(t[0])).x0, VP, prediction="x0")
    assert sd.ddpm_invert(den, x_0, 7, "ddpm", SCHEDULE, generator=gen(0)).nfe == len(calls) == 7
    calls.clear()
    guided = CFG(den, den, 3.5, uncond_kwargs={"y": 1})
    assert sd.ddpm_invert(guided, x_0, 7, "ddpm", SCHEDULE, generator=gen(0)).nfe == len(calls) == 14
    calls.clear()
    assert (
        sd.ddpm_invert(den, x_0, 7, "dpmpp_2s_ancestral", SCHEDULE, generator=gen(0)).nfe == len(calls) == 14
    )


def test_states_are_independent_draws_of_the_marginals(gmm):
    """``xs[i] = alpha_i x_0 + sigma_i eps_i`` with ``eps_i`` standard normal and independent across nodes
    (the paper's construction, not a Markov chain): over 4096 x 8 draws the standardized noises have mean
    0 and variance 1 to 0.03 and cross-node correlations below 0.03 (a forward Markov chain's neighbours
    correlate by ``sigma_i / sigma_{i+1}``, 0.3-0.99 here); per-row generators give each row's states
    whatever the batch."""
    den = gmm.denoiser(VP)
    x = gmm.sample(4096, generator=gen(1))
    inv = sd.ddpm_invert(den, x, 6, "ddpm", SCHEDULE, generator=gen(2))
    grid = sd.solvers.base.make_grid(VP, sd.schedules.get(SCHEDULE), 6, "none")
    eps = torch.stack(
        [(xs - a * x) / s for xs, a, s in zip(inv.xs[:-1], grid.alpha, grid.sigma, strict=False)]
    )
    assert eps.mean(dim=(1, 2)).abs().max() < 0.03
    assert (eps.var(dim=(1, 2)) - 1).abs().max() < 0.03
    flat = eps.reshape(6, -1)
    corr = torch.corrcoef(flat) - torch.eye(6, dtype=F64)
    assert corr.abs().max() < 0.03
    rows = [gen(10 + b) for b in range(4)]
    whole = sd.ddpm_invert(den, x[:4], 6, "ddpm", SCHEDULE, generator=rows)
    alone = sd.ddpm_invert(den, x[2:3], 6, "ddpm", SCHEDULE, generator=[gen(12)])
    assert torch.equal(whole.xs[0][2:3], alone.xs[0]) and torch.equal(whole.z[3][2:3], alone.z[3])


# --- the maps are not standard normal -----------------------------------------------------------------------


def test_maps_on_gaussian_data_match_closed_form():
    """On Gaussian data ``N(m, diag v)`` the DDPM step's mean is affine in ``x_t``, so ``z_i`` is affine in
    ``x_0`` and the two independent draws: with ``k = a v / (a^2 v + s^2)`` (the posterior gain at the step's
    start ``(a, s)``), ``B = a' k + s_det (1 - a k) / s`` and the target ``(a*, s*)`` (the next node's, or
    ``(1, 0)`` into ``x_0``): ``E z = (a* - a') m / c`` and
    ``Var z = ((a* - B a)^2 v + B^2 s^2 + s*^2) / c^2``. The measured variance (8192 x 8 draws) matches it
    to 3% at every step; it is 1.97-4.6 inside the grid (10 steps), 115 at the last step into ``x_0``: not
    1."""
    m = torch.linspace(-1.0, 1.5, 8, dtype=F64)
    v = torch.linspace(0.2, 1.2, 8, dtype=F64)
    law = sd.toy.GaussianMixture(m[None], v[None], torch.ones(1, dtype=F64))
    x = law.sample(8192, generator=gen(3))
    steps = 10
    inv = sd.ddpm_invert(law.denoiser(VP), x, steps, "ddpm", SCHEDULE, generator=gen(4))
    grid = sd.solvers.base.make_grid(VP, sd.schedules.get(SCHEDULE), steps, "none")
    variances = []
    for i, z in enumerate(inv.z):
        a, s, a1, s1 = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        h = grid.lam[i + 1] - grid.lam[i]
        c, s_det = s1 * math.sqrt(-math.expm1(-2 * h)), s1 * math.exp(-h)
        target_a, target_s = (1.0, 0.0) if i == steps - 1 else (a1, s1)
        k = a * v / (a**2 * v + s**2)
        b = a1 * k + s_det * (1 - a * k) / s
        mean = (target_a - a1) * m / c
        var = ((target_a - b * a) ** 2 * v + b**2 * s**2 + target_s**2) / c**2
        assert torch.allclose(z.mean(0), mean, atol=4 * float(var.max().sqrt()) / math.sqrt(len(x)))
        assert torch.allclose(z.var(0), var, rtol=0.05)
        assert abs(float(z.var(0).mean() / var.mean()) - 1) < 0.03
        variances.append(float(var.mean()))
    assert min(variances) > 1.9 and variances[-1] > 100


@pytest.mark.parametrize("process", [VP, FLOW], ids=["vp", "flow"])
def test_maps_on_mixture_have_high_variance_and_anticorrelate(gmm, process):
    """The mixture oracle (2048 samples, 20 ``time_uniform`` steps): the maps' variance is 3.4-7.1 (VP; flow
    1.0-6.9, 1 only at the first step, where ``h`` is long) against the point-mass formula
    ``(1 + e^{-2h}) / (1 - e^{-2h})`` (3.5-6.2 on VP): at least it everywhere, above it where the denoised
    estimate errs (5.3 against 2.5 at the last noisy node), and far above at the last step into ``x_0`` (56
    on VP, 2900 under flow: the estimate's residual over a small ``s``). Consecutive maps correlate at
    -0.42..-0.50, within 0.03 of the formula's ``-e^{-h'} / sqrt((1 + e^{-2h})(1 + e^{-2h'}))`` (about -1/2)
    but at the last three steps: not independent standard normals."""
    x = gmm.sample(2048, generator=gen(3))
    inv = sd.ddpm_invert(gmm.denoiser(process), x, 20, "ddpm", SCHEDULE, generator=gen(4))
    z = torch.stack(inv.z)
    var = z.var(dim=(1, 2))
    lam = [float(process.lam(torch.tensor(t, dtype=F64))) for t in inv.times]
    e = torch.tensor([math.exp(-2 * (lam[i + 1] - lam[i])) for i in range(20)], dtype=F64)
    point = (1 + e) / (1 - e)
    assert (var[:-1] > 0.95 * point[:-1]).all()
    assert var[2:-1].min() > 2 and var[-1] > 50
    corr = torch.stack([torch.corrcoef(z[i : i + 2].reshape(2, -1))[0, 1] for i in range(19)])
    predicted = -e[1:].sqrt() / ((1 + e[:-1]) * (1 + e[1:])).sqrt()
    assert (corr - predicted)[:-3].abs().max() < 0.03 and corr.max() < -0.4


# --- editing ------------------------------------------------------------------------------------------------


def two_gaussians() -> tuple[sd.Denoiser, sd.toy.GaussianMixture, sd.toy.GaussianMixture]:
    """Class 0 ``N(-2, diag(0.2..1))`` and class 1 ``N(2, diag(1..0.2))`` in 8-d behind one exact x0-net
    ``net(x, t, y)`` (``y = NULL``: their equal-weight mixture)."""
    v0 = torch.linspace(0.2, 1.0, 8, dtype=F64)
    c0 = sd.toy.GaussianMixture(torch.full((1, 8), -2.0, dtype=F64), v0[None], torch.ones(1, dtype=F64))
    c1 = sd.toy.GaussianMixture(
        torch.full((1, 8), 2.0, dtype=F64), v0.flip(0)[None], torch.ones(1, dtype=F64)
    )
    full = sd.toy.GaussianMixture(
        torch.cat([c0.means, c1.means]), torch.stack([v0, v0.flip(0)]), torch.ones(2, dtype=F64)
    )

    def net(x: torch.Tensor, t: torch.Tensor, y: int) -> torch.Tensor:
        law = full if y == NULL else (c0, c1)[y]
        return law.denoise(x, float(VP.alpha(t[0])), float(VP.sigma(t[0])))

    return sd.Denoiser(net, VP, prediction="x0", shape=(8,)), c0, c1


def edit_table(n: int = 256, steps: int = 50) -> dict[tuple[str, str], tuple[float, float]]:
    """Class-0 samples edited to class 1 (``y = 0 -> 1``) by each method, plain and with the paper's CFG
    scales (3.5 source / 15 target): ``(structure, in class 1)``. Structure is the mean distance between the
    whitened deviations ``(x_0 - mu_0) / sqrt(v_0)`` and ``(x_edit - mu_1) / sqrt(v_1)`` over that of two
    independent samples (0: the deviation kept, 1: none of it); in class 1: the fraction more likely under
    class 1."""
    den, c0, c1 = two_gaussians()
    x0 = c0.sample(n, generator=gen(1))
    w0 = (x0 - c0.means[0]) / c0.variances[0].sqrt()
    out = {}
    for label, (src, tar) in {
        "plain": (den, den),
        "cfg 3.5/15": (
            CFG(den, den, 3.5, uncond_kwargs={"y": NULL}),
            CFG(den, den, 15.0, uncond_kwargs={"y": NULL}),
        ),
    }.items():
        inv = sd.ddpm_invert(src, x0, steps, "ddpm", SCHEDULE, generator=gen(2), y=0)
        edits = {"ddpm_invert": sd.sample(tar, **inv.sample_kwargs(), y=1)}
        x_T = sd.invert(src, x0, steps, "ddim", SCHEDULE, y=0)
        edits["ddim invert"] = sd.sample(tar, x_T, steps, "ddim", SCHEDULE, final="none", y=1)
        fresh = torch.randn(n, 8, dtype=F64, generator=gen(3))
        edits["fresh noise"] = sd.sample(
            tar, fresh, steps, "ddpm", SCHEDULE, final="none", generator=gen(4), y=1
        )
        for method, x in edits.items():
            w1 = (x - c1.means[0]) / c1.variances[0].sqrt()
            structure = float((w1 - w0).norm(dim=1).mean()) / math.sqrt(2 * 8)
            out[label, method] = (structure, float((c1.log_prob(x) > c0.log_prob(x)).double().mean()))
    return out


def test_edit_moves_class_and_keeps_structure():
    """Measured (256 samples, 50 steps): structure 0.063 / 0.20 / 0.95 (ddpm_invert / DDIM inversion / fresh
    noise) plain, 0.18 / 0.74 / 0.95 with CFG 3.5 / 15; every edit lands in class 1."""
    table = edit_table()
    for label in ("plain", "cfg 3.5/15"):
        ours, ddim, fresh = (table[label, m] for m in ("ddpm_invert", "ddim invert", "fresh noise"))
        assert ours[1] == ddim[1] == fresh[1] == 1.0
        assert fresh[0] > 0.85
        assert ours[0] < 0.5 * ddim[0] and ours[0] < 0.25 * fresh[0]
    assert table["plain", "ddpm_invert"][0] < 0.08 and table["cfg 3.5/15", "ddpm_invert"][0] < 0.22


def test_skip_trades_the_edit_for_fidelity():
    """Starting at a later node keeps more of ``x_0``: the distance to it falls 11.3 / 10.2 / 4.6 / 0.49 at
    ``skip`` = 0 / 20 / 40 / 49 of 50 and the edit leaves class 1 (1 / 1 / 0.05 / 0); with the source's own
    condition every ``skip`` returns ``x_0`` exactly; ``sample_kwargs(skip)`` is ``sample`` on the nodes from
    ``skip`` from ``xs[skip]``."""
    den, c0, c1 = two_gaussians()
    x0 = c0.sample(128, generator=gen(1))
    inv = sd.ddpm_invert(den, x0, 50, "ddpm", SCHEDULE, generator=gen(2), y=0)
    dist, in_1 = [], []
    for skip in (0, 20, 40, 49):
        x = sd.sample(den, **inv.sample_kwargs(skip), y=1)
        dist.append(float((x - x0).norm(dim=1).mean()))
        in_1.append(float((c1.log_prob(x) > c0.log_prob(x)).double().mean()))
        assert torch.equal(sd.sample(den, **inv.sample_kwargs(skip), y=0), inv.xs[-1])
    assert dist == sorted(dist, reverse=True) and dist[0] > 10 and dist[-1] < 0.6
    assert in_1[:2] == [1.0, 1.0] and in_1[2] < 0.2 and in_1[3] == 0.0
    by_hand = sd.sample(den, inv.xs[40], 10, "ddpm", inv.times[40:], final="none", generator=inv.noise, y=1)
    assert torch.equal(by_hand, sd.sample(den, **inv.sample_kwargs(40), y=1))


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "match"),
    [
        ("ddim", r"solver='ddim' is deterministic .* use a one-step stochastic solver"),
        (DDIM(eta=0.0), r"is deterministic"),
        ("unipc", r"is deterministic .*sd\.invert"),
        ("dpmpp_2m_sde", r"'dpmpp_2m_sde' keeps a history"),
        ("sa_solver", r"keeps a history"),
        ("dpmpp_sde", r"'dpmpp_sde' draws noise inside its step"),
        ("er_sde", r"keeps a history"),
        ("nope", r"ddpm_invert: unknown solver='nope'"),
    ],
)
def test_refuses_solvers_without_a_noise_map(gmm, x_0, solver, match):
    with pytest.raises(ValueError, match=match):
        sd.ddpm_invert(gmm.denoiser(VP), x_0, 6, solver, SCHEDULE)


def test_refuses_bad_arguments(gmm, x_0):
    den = gmm.denoiser(VP)
    with pytest.raises(ValueError, match=r"ddpm_invert: x_0 has sample shape \(4,\), the denoiser expects"):
        sd.ddpm_invert(gmm.denoiser(VP, shape=(8,)), x_0[:, :4])
    with pytest.raises(ValueError, match=r"ddpm_invert: x_0 must be batched"):
        sd.ddpm_invert(den, x_0[0])
    with pytest.raises(ValueError, match=r"ddpm_invert: steps"):
        sd.ddpm_invert(den, x_0, 0)
    with pytest.raises(
        ValueError, match=r"ddpm_invert: generator must be None, one torch.Generator or a list"
    ):
        sd.ddpm_invert(den, x_0, generator=[gen(0)] * 3)
    with pytest.raises(ValueError, match=r"ddpm_invert: final is an argument of sample, not of ddpm_invert"):
        sd.ddpm_invert(den, x_0, final="zero")
    # explicit times: steps + 1 of them, in the words of ddpm_invert, which has no final (the message was
    # sample's, "Custom: steps must equal len(times) = 3 with final='zero' (the default), ...")
    with pytest.raises(
        ValueError,
        match=r"^ddpm_invert: schedule has 3 times, .* final='none'\) runs down: steps must be len\(times\) "
        r"- 1 = 2, got steps=5$",
    ):
        sd.ddpm_invert(den, x_0, 5, schedule=[900.0, 500.0, 100.0])

    class Noisy(sd.Denoiser):
        def own_noise(self):
            return [("Noisy", None)]

    noisy = Noisy(lambda x, t: den(x, float(t[0])).x0, VP, prediction="x0")
    with pytest.raises(ValueError, match=r"ddpm_invert: den: Noisy draws noise of its own"):
        sd.ddpm_invert(noisy, x_0)
    inv = sd.ddpm_invert(den, x_0, 6, "ddpm", SCHEDULE)
    for skip in (-1, 6):
        with pytest.raises(ValueError, match=r"EditNoise.sample_kwargs: skip"):
            inv.sample_kwargs(skip)


def test_replay_refuses_another_run(gmm, x_0):
    """The maps belong to one grid, solver and batch: anything else is a ``ValueError`` before the first
    step (``sample``) or at the first draw (any other user of the source)."""
    den = gmm.denoiser(VP)
    inv = sd.ddpm_invert(den, x_0, 6, "ddpm", SCHEDULE, generator=gen(0))
    run = inv.sample_kwargs()
    with pytest.raises(ValueError, match=r"sample: generator replays noise maps made on the 6-step grid"):
        sd.sample(den, **{**run, "steps": 5, "schedule": SCHEDULE})
    with pytest.raises(ValueError, match=r"replays noise maps made on .* and this run's grid is 6 steps"):
        sd.sample(den, **{**run, "schedule": "karras"})
    with pytest.raises(ValueError, match=r"with a clean end; a run must take its nodes"):
        sd.sample(den, inv.x_T, 6, "ddpm", SCHEDULE, generator=inv.noise)
    with pytest.raises(
        ValueError, match=r"made for solver DDPM\(.*\), and this run's solver is EulerAncestral"
    ):
        sd.sample(den, **{**run, "solver": "euler_ancestral"})
    with pytest.raises(ValueError, match=r"and this run's solver is DDPM\(order=1, variance='fixed_large'\)"):
        sd.sample(den, **{**run, "solver": sd.solvers.DDPM(variance="fixed_large")})
    with pytest.raises(ValueError, match=r"maps of shape \(16, 8\) .* the run's x_T has shape \(8, 8\)"):
        sd.sample(den, **{**run, "x_T": inv.x_T[:8]})
    noise = inv.noise
    with pytest.raises(ValueError, match=r"ReplayNoise: a draw for a step from t_from=.* which is no step"):
        noise(inv.times[0], inv.times[2], inv.x_T)
    with pytest.raises(ValueError, match=r"ReplayNoise: a draw of shape \(4, 8\), and the maps have shape"):
        noise(inv.times[0], inv.times[1], inv.x_T[:4])
    with pytest.raises(ValueError, match=r"ReplayNoise: z must hold one map per step of grid, 6, got 5"):
        ReplayNoise(inv.noise.grid, inv.z[:-1], inv.solver)
    other = gmm.denoiser(sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)))
    with pytest.raises(ValueError, match=r"this run's process .* has another alpha or sigma at those times"):
        sd.sample(other, **run)


def test_paradigms_checks_the_replayed_run(gmm, x_0):
    """``sd.paradigms`` given the maps checks the run as ``sample`` does: with another solver on the maps'
    grid it used to replay them silently (DDIM(eta=0.5) ran on DDPM's maps); with the inversion's own it
    returns ``x_0`` up to its tolerance."""
    den = gmm.denoiser(VP)
    inv = sd.ddpm_invert(den, x_0, 6, "ddpm", SCHEDULE, generator=gen(0))
    run = {k: v for k, v in inv.sample_kwargs().items() if k != "x_T"}
    with pytest.raises(ValueError, match=r"paradigms: generator replays noise maps made for solver DDPM"):
        sd.paradigms(den, inv.x_T, **{**run, "solver": DDIM(eta=0.5)})
    with pytest.raises(ValueError, match=r"paradigms: generator replays noise maps of shape \(16, 8\)"):
        sd.paradigms(den, inv.x_T[:8], **run)
    out = sd.paradigms(den, inv.x_T, **run, tol=1e-10)
    assert (out - x_0).abs().max() < 1e-8


if __name__ == "__main__":
    for (label, method), (structure, in_1) in edit_table().items():
        print(f"{label:11s} {method:12s} structure {structure:.3f}  in class 1 {in_1:.2f}")
