"""DriftLite (Ren et al. 2025) against the Feynman-Kac correctors' exact targets (``tests/test_smc_fkc.py``).

The targets: ``p^2`` of a 2-D two-component mixture and the product ``p1 p2`` of two such mixtures (both
Gaussian mixtures in closed form). DriftLite must keep the weights more even than the plain corrector (mean
ESS over the run) at the same particles and steps without landing further from exact samples (sliced
Wasserstein, beside the floor of two exact sets). The coefficients are checked against
``torch.linalg.lstsq`` / ``torch.linalg.solve`` on hand cases, and on a 1-D Gaussian, where the fields ``x``
and the score span the exact flattening drift, VCG's weights stay even to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import steerdiff as sd
from steerdiff.smc.driftlite import ecg_coefficients, vcg_coefficients
from steerdiff.solvers.base import make_grid
from tests.reference import overlap_log_z
from tests.test_smc_fkc import F64, PROC, errors, gen, mixture, moments_1d, product, z_scores

G1 = mixture([[-1.0, 0.5], [2.0, 0.0]], [[0.5, 0.7], [0.4, 0.5]])
G2 = mixture([[0.0, 1.0], [2.5, -1.0]], [[0.8, 0.6], [0.3, 0.9]], [0.6, 0.4])
G1_1D = mixture([[-0.5], [1.5]], [[0.6], [0.4]])


def log_prob(g: sd.toy.GaussianMixture):
    """``log q_t`` of the mixture noised to time ``t`` (ECG's potentials)."""
    return lambda x, t: g.log_prob(x, float(PROC.alpha(t)), float(PROC.sigma(t)))


def run(method: str, gs: list, betas: list, seed: int, rows: int, n: int, steps: int) -> sd.smc.Particles:
    dens = [g.denoiser(PROC) for g in gs]
    kw = {"shape": (rows, gs[0].dim), "particles": n, "steps": steps, "dtype": F64, "generator": gen(seed)}
    if method == "fkc":
        return sd.smc.fkc(dens, betas, **kw)
    if method == "ecg":
        return sd.smc.driftlite(dens, betas, variant="ecg", log_probs=[log_prob(g) for g in gs], **kw)
    return sd.smc.driftlite(dens, betas, variant=method, **kw)


def draws(out: sd.smc.Particles, seed: int) -> torch.Tensor:
    """``particles`` weighted draws per row, pooled."""
    idx = torch.multinomial(out.log_w.exp(), out.particles, replacement=True, generator=gen(seed))
    x = torch.gather(out.x, 1, idx[..., None].expand(-1, -1, out.x.shape[-1]))
    return x.reshape(-1, out.x.shape[-1])


@pytest.mark.parametrize(
    "case, gs, betas",
    [("anneal", [G1], [2.0]), ("product", [G1, G2], [1.0, 1.0])],
)
def test_driftlite_keeps_the_weights_even_at_no_cost_in_distance(case, gs, betas):
    """32 rows x 32 particles, 50 ``karras_jump`` steps, seeds 0-2; mean ESS / N over the run and sliced
    Wasserstein of 32 weighted draws per row (1024 points) to exact samples.

    Measured (per seed): ``p^2``: ESS fkc 0.702 / 0.704 / 0.722, VCG 0.989 / 0.991 / 0.989, ECG 0.789 /
    0.784 / 0.806; distance (mean of the seeds; floor 0.079) fkc 0.149, VCG 0.088, ECG 0.158 (seeds 0.132 /
    0.236 / 0.106: no better). ``p1 p2``: ESS fkc 0.716 / 0.701 / 0.716, VCG 0.985 / 0.985 / 0.984, ECG
    0.789 / 0.786 / 0.782; distance (floor 0.064) fkc 0.133, VCG 0.116, ECG 0.102.
    """
    target = product(*gs) if len(gs) == 2 else product(gs[0], gs[0])
    ref = target.sample(1024, gen(99))
    floor = sd.metrics.floor(target.sample, 1024, repeats=3, generator=gen(5))
    ess: dict[str, list[float]] = {}
    dist: dict[str, float] = {}
    for method in ("fkc", "vcg", "ecg"):
        runs = [run(method, gs, betas, seed, 32, 32, 50) for seed in range(3)]
        ess[method] = [float(out.trace.ess.mean()) / 32 for out in runs]
        dist[method] = sum(sd.metrics.sliced_wasserstein(draws(o, 100 + k), ref) for k, o in enumerate(runs))
        dist[method] /= 3
    for plain, vcg, ecg in zip(ess["fkc"], ess["vcg"], ess["ecg"], strict=True):
        assert plain < 0.75 and vcg > 0.98, (case, ess)
        assert ecg > plain + 0.05, (case, ess)
    assert dist["vcg"] <= dist["fkc"] + 0.01, (case, dist)
    assert dist["ecg"] <= dist["fkc"] + 0.02, (case, dist)
    for method in ("vcg", "ecg"):
        assert dist[method] < 2.2 * floor, (case, dist, floor)


def test_vcg_flattens_the_weights_where_its_fields_span_the_exact_control():
    """``N(1, 0.5)^2`` in 1-D: the corrector's increment ``(h_{i-1} + h_i) / 2 E``, ``E = 2 |eps|^2``, is
    flattened exactly by ``theta = (0, -(h_{i-1} + h_i) / (2 h_i))`` (``h_1 = 2 |eps|^2 - sigma nabla . eps``,
    the divergence a constant; exact here: ``probes >= D = 1``). Measured: the smallest ESS / N over the run
    1 - 1.3e-9 against fkc's 0.34, the coefficients to 1e-7; and the NFE: the 50 evaluations plus 49 backward
    passes per particle."""
    g = mixture([[1.0]], [[0.5]])
    kw = {"shape": (4, 1), "particles": 64, "steps": 50, "dtype": F64, "generator": gen(0)}
    made: list[sd.smc.DriftLite] = []
    init = sd.smc.DriftLite.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    sd.smc.DriftLite.__init__ = recording
    try:
        out = sd.smc.driftlite([g.denoiser(PROC)], [2.0], **kw)
        small = {"shape": (1, 1), "particles": 4, "steps": 5, "dtype": F64, "generator": gen(1)}
        sd.smc.driftlite([g.denoiser(PROC)], [2.0], variant="ecg", log_probs=[log_prob(g)], **small)
    finally:
        sd.smc.DriftLite.__init__ = init
    plain = sd.smc.fkc([g.denoiser(PROC)], [2.0], **kw)
    assert float(out.trace.ess.min()) / 64 > 1 - 1e-7
    assert float(plain.trace.ess.min()) / 64 < 0.5
    grid = make_grid(PROC, sd.schedules.get("karras_jump"), 50, "zero")
    share = [((grid.h(i - 1) if i else 0.0) + grid.h(i)) / (2 * grid.h(i)) for i in range(49)]
    exact = torch.tensor([[0.0, -c] for c in share], dtype=F64)[:, None].expand(49, 4, 2)
    torch.testing.assert_close(torch.stack(made[0].theta), exact, rtol=0, atol=1e-7)
    # recorded without a graph: each held its node's network graph to the end of the run (a 50000-wide
    # hidden layer, 2 x 32 particles: peak memory 788 MB at 10 steps, 2253 MB at 40; now 495 MB at both)
    # (ECG's with log_probs too: their values were taken with a graph through the particles)
    assert not any(t.requires_grad for m in made for t in m.theta)
    assert out.nfe == (50 + 49) * 64 and plain.nfe == 50 * 64
    ecg = sd.smc.driftlite([g.denoiser(PROC)], [2.0], variant="ecg", **kw)
    assert ecg.nfe == plain.nfe  # ECG without log_probs: the field x alone, no divergence to estimate


def test_the_control_is_a_change_of_the_composed_estimate_in_the_solvers_step():
    """The drift ``b`` moves the composed score by ``b / (2 sigma^2)``, so the DDPM step integrates it as a
    change ``b / (2 alpha_i)`` of the composed estimate (``(alpha_{i+1} / alpha_i) (1 - e^{-2 h}) b / 2``).
    On ``N(1, 0.5)^2`` in 1-D VCG's control is exact, ``b = share_i sigma eps`` (``theta = (0, -share_i)``,
    above), i.e. the composed score ``(beta - share_i / 2) s``: each controlled step is the plain DDPM step
    of the denoiser whose ``eps`` is ``(2 - share_i / 2)`` times the mixture's. Measured at the 9 controlled
    nodes of 10 coarse ``karras_jump`` steps (``alpha_{i+1} / alpha_i`` 1.7-2.2 at the first 7), relative to
    the step's largest mean: at most 6.3e-10; with the factor ``alpha_{i+1} / alpha_i`` dropped 0.41-3.0 at
    the first 7 nodes, inverted 0.65-4.5 (an O(h) change of the drift that no other test here saw)."""
    from steerdiff.solvers.base import Model

    g = mixture([[1.0]], [[0.5]])
    den = g.denoiser(PROC)
    steps, kw = 10, {"particles": 32, "schedule": "karras_jump", "solver": "ddpm", "dtype": F64}
    made: list[tuple[int, torch.Tensor, sd.solvers.base.Transition]] = []
    propose = sd.smc.DriftLite.propose

    def recording(self, ctx, base):
        out = propose(self, ctx, base)
        made.append((ctx.i, ctx.x.detach().clone(), out))
        return out

    sd.smc.DriftLite.propose = recording
    try:
        sd.smc.driftlite([den], [2.0], shape=(2, 1), steps=steps, generator=gen(0), **kw)
    finally:
        sd.smc.DriftLite.propose = propose
    grid = make_grid(PROC, sd.schedules.get("karras_jump"), steps, "zero")
    ddpm = sd.solvers.get("ddpm")
    errors = []
    for i, x, out in made[: steps - 1]:  # the controlled nodes (the step into the clean end carries none)
        share = ((grid.h(i - 1) if i else 0.0) + grid.h(i)) / (2 * grid.h(i))
        scaled = sd.Denoiser(lambda x, t, c=2.0 - share / 2: c * den(x, t).eps, PROC, prediction="eps")
        ref = ddpm.step(Model(scaled), x.reshape(-1, 1), i, grid, ddpm.init_state(grid))
        assert out.std == ref.std  # DDPM's own noise: the control moves the mean alone
        errors.append(float((out.mean.detach().reshape(-1, 1) - ref.mean).abs().max() / ref.mean.abs().max()))
    assert [i for i, _, _ in made[: steps - 1]] == list(range(steps - 1))
    assert max(errors) < 1e-6, errors


def test_coefficients_solve_their_linear_problems():
    """A hand case of 3 rows, 7 particles, 2 fields in 3-D: VCG is the weighted least-squares solution
    (``torch.linalg.lstsq`` of the centered, sqrt-weighted system) and no perturbation lowers the weighted
    variance; ECG solves ``M theta = c`` (``torch.linalg.solve``)."""
    gen0 = gen(3)
    g = torch.randn(3, 7, generator=gen0, dtype=F64)
    h = torch.randn(3, 7, 2, generator=gen0, dtype=F64)
    a = torch.randn(3, 7, 2, generator=gen0, dtype=F64)
    v = torch.randn(3, 7, 2, 3, generator=gen0, dtype=F64)
    log_w = torch.log_softmax(torch.randn(3, 7, generator=gen0, dtype=F64), -1)
    w = log_w.exp()

    theta = vcg_coefficients(g, h, log_w)
    hc = h - (w[..., None] * h).sum(1, keepdim=True)
    gc = g - (w * g).sum(1, keepdim=True)
    ref = torch.linalg.lstsq(w.sqrt()[..., None] * hc, -(w.sqrt() * gc)[..., None]).solution[..., 0]
    torch.testing.assert_close(theta, ref, rtol=1e-10, atol=1e-12)

    def variance(th: torch.Tensor) -> torch.Tensor:
        phi = g + (h * th[:, None]).sum(-1)
        return (w * (phi - (w * phi).sum(1, keepdim=True)) ** 2).sum(1)

    best = variance(theta)
    for d in torch.eye(2, dtype=F64):
        for s in (1e-3, -1e-3):
            assert bool((variance(theta + s * d) > best).all())

    theta = ecg_coefficients(g, a, v, log_w)
    m = torch.einsum("bp,bpid,bpjd->bij", w, v, v)
    c = (w[..., None] * gc[..., None] * a).sum(1)
    torch.testing.assert_close(theta, torch.linalg.solve(m, c), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "ddpm"}, r"driftlite: variant must be one of \['vcg', 'ecg'\], got 'ddpm'"),
        ({"probes": 0}, r"driftlite: probes must be"),
        ({"log_probs": [lambda x, t: x.sum(-1)]}, r"log_probs are ECG's potentials; give them with variant="),
        ({"variant": "ecg", "log_probs": []}, r"log_probs must hold one callable .* per component \(1\)"),
        ({"variant": "ecg", "log_probs": 3}, r"log_probs must be a sequence of callables, got int"),
        ({"group": object()}, r"group: DriftLite fits its drift on all of a row's particles; pass None"),
        ({"betas": [0.0]}, r"driftlite: sum\(betas\) must be > 0"),
        ({"particles": 0}, r"driftlite: particles must be"),
    ],
)
def test_bad_inputs(options, message):
    kw = {"shape": (2, 2), "particles": 4, "steps": 3, "dtype": F64, "betas": [2.0], **options}
    with pytest.raises(ValueError, match=message):
        sd.smc.driftlite([G1.denoiser(PROC)], **kw)


def test_ecg_log_probs_are_one_per_component_of_dens():
    """``log_probs`` holds one callable per component of ``dens``, a zero-``beta`` one's never called (the
    docstring said one per component with ``beta_k != 0``, which the check refused): the run is the one
    without the zero component."""

    def never(x: torch.Tensor, t: float) -> torch.Tensor:
        raise AssertionError("a zero-beta component's log_prob was called")

    dens = [G1.denoiser(PROC), G2.denoiser(PROC)]
    kw = {"shape": (2, 2), "particles": 8, "steps": 4, "dtype": F64, "variant": "ecg"}
    out = sd.smc.driftlite(dens, [2.0, 0.0], log_probs=[log_prob(G1), never], generator=gen(0), **kw)
    ref = sd.smc.driftlite(dens[:1], [2.0], log_probs=[log_prob(G1)], generator=gen(0), **kw)
    assert torch.equal(out.x, ref.x) and torch.equal(out.log_w, ref.log_w)
    with pytest.raises(ValueError, match=r"log_probs must hold one callable .* per component \(2\)"):
        sd.smc.driftlite(dens, [2.0, 0.0], log_probs=[log_prob(G1)], generator=gen(0), **kw)


def test_ecg_log_probs_are_checked():
    with pytest.raises(ValueError, match=r"log_probs must map \(n, \*shape\) to finite log-densities \(n,\)"):
        sd.smc.driftlite([G1.denoiser(PROC)], [2.0], shape=(2, 2), particles=4, steps=3, dtype=F64,
                         variant="ecg", log_probs=[lambda x, t: x])  # fmt: skip


def test_the_class_checks_its_generator():
    """``DriftLite(comp, generator=...)``: a ValueError naming ``DriftLite``'s ``generator`` at construction,
    and a list of the wrong length at the first probes (before: 'generator must be None, ...' from inside the
    run, naming no one, and 'generator: 5 generators for a batch of 2 rows')."""
    comp = sd.smc.Composition([G1.denoiser(PROC)], [2.0])
    with pytest.raises(
        ValueError, match=r"DriftLite: generator must be None, a torch.Generator or a non-empty"
    ):
        sd.smc.DriftLite(comp, generator=3)
    alg = sd.smc.DriftLite(comp, generator=[gen(k) for k in range(5)])
    with pytest.raises(ValueError, match=r"DriftLite: generator must be .* a list of batch = 2 of them"):
        sd.smc.run_smc(comp, alg, (2, 2), particles=4, steps=3, dtype=F64, generator=gen(1))


def test_run_smc_refuses_group_for_the_algorithm():
    comp = sd.smc.Composition([G1.denoiser(PROC)], [2.0])
    assert sd.smc.DriftLite(comp).shardable is False


def test_vcg_on_the_cfg_target():
    """``p(x|c)^3 p(x)^{-2}`` of ``tests/test_smc_fkc.py``'s two-class 1-D mixture (exact moments by
    quadrature), 32 rows x 64 particles, 50 steps: mean ESS / N fkc 0.878, VCG 0.999; VCG's ``E[x]``,
    ``E[x^2]`` off by -0.021 +- 0.019, -0.050 +- 0.057 (fkc: -0.015 +- 0.045, -0.030 +- 0.125)."""
    uncond = mixture([[-2.0], [1.5]], [[0.5], [0.5]], [0.3, 0.7])
    cond = mixture([[1.5]], [[0.5]])
    exact = moments_1d(lambda x: 3.0 * cond.log_prob(x) - 2.0 * uncond.log_prob(x))
    dens = [uncond.denoiser(PROC), cond.denoiser(PROC)]
    kw = {"shape": (32, 1), "particles": 64, "steps": 50, "dtype": F64, "generator": gen(0)}
    out = sd.smc.driftlite(dens, [-2.0, 3.0], **kw)
    plain = sd.smc.fkc(dens, [-2.0, 3.0], **kw)
    assert float(out.trace.ess.mean()) / 64 > 0.99 > 0.9 > float(plain.trace.ess.mean()) / 64
    bias, se = z_scores(errors(out, exact))
    assert bool((bias.abs() <= 4 * se + 0.03).all()), (bias, se)


def test_rows_with_too_few_particles_for_the_fit_take_no_control():
    """A product of two 2-D mixtures (VCG's 3 fields: ``x`` and two scores) with 4 particles per row: the
    effective sample size is at most 4, below ``2 (3 + 1)``, so every node's ``theta`` is 0 and the run
    takes the corrector's steps (its weights ``fkc``'s up to the Hutchinson draws, which shift the generator).
    Before, the fit interpolated the 4 particles: ``bench steer``'s nine_quadratic at NFE 1600 ended 7.77x
    the floor, rows out to ``|x| = 47``, where ``fkc`` was at 0.93x. With 16 particles rows are fit."""
    made: list[sd.smc.DriftLite] = []
    init = sd.smc.DriftLite.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    dens = [G1.denoiser(PROC), G2.denoiser(PROC)]
    kw = {"shape": (3, 2), "steps": 10, "dtype": F64, "generator": gen(0)}
    sd.smc.DriftLite.__init__ = recording
    try:
        sd.smc.driftlite(dens, [1.0, 1.0], particles=4, **kw)
        sd.smc.driftlite(dens, [1.0, 1.0], particles=16, **kw)
    finally:
        sd.smc.DriftLite.__init__ = init
    assert all(bool((t == 0).all()) for t in made[0].theta) and len(made[0].theta) == 9
    assert any(bool((t != 0).any()) for t in made[1].theta)


def test_run_smc_with_the_class_counts_the_backward_passes():
    """``run_smc(comp, DriftLite(comp), ...)`` counts the divergences' backward passes in ``nfe`` as
    ``driftlite`` does (two components, 10 steps, 8 particles: 2 * 10 forward evaluations and 9 * 2 backward
    passes each, one per component at each of the 9 controlled nodes; was: 160, the forward ones alone,
    where ``driftlite`` counted 304); the run itself is the same."""
    g = mixture([[1.0]], [[0.5]])
    dens, betas = [g.denoiser(PROC), G1_1D.denoiser(PROC)], [1.0, 1.0]
    opts = {"particles": 8, "steps": 10, "dtype": F64, "solver": "ddpm"}
    x_T = torch.randn(2, 8, 1, dtype=F64, generator=gen(3))
    out = sd.smc.driftlite(dens, betas, shape=(2, 1), x_T=x_T, generator=gen(1), **opts)
    comp = sd.smc.Composition(dens, betas)
    alg = sd.smc.DriftLite(comp, generator=gen(1))
    direct = sd.smc.run_smc(comp, alg, (2, 1), x_T=x_T, generator=gen(1), **opts)
    assert out.nfe == direct.nfe == (2 * 10 + 9 * 2) * 8 and alg.backward == 9 * 2
    assert torch.equal(direct.x, out.x) and torch.equal(direct.log_w, out.log_w)


@pytest.mark.parametrize("gs, betas", [([G1], [2.0]), ([G1, G2], [1.0, 1.0])], ids=["anneal", "product"])
def test_vcg_log_z_is_the_exact_one(gs, betas):
    """The control's potential ``h(b) = <S, b> + nabla . b`` has mean 0 under ``pi_t``, so the weights still
    estimate ``log Z_t`` (``int q_t^2``, ``int q1_t q2_t``: closed form), and VCG's even weights sharpen
    it: 32 rows x 64 particles, 50 steps, measured ``p^2`` -0.0070 +- 0.0054 (fkc -0.42 +- 0.17), ``p1
    p2`` +0.0016 +- 0.0068 (fkc -0.38 +- 0.15). Nothing tested the potentials' parts that are constant in
    ``x`` (the divergence ``nabla . x = D``), which leave the fit and the normalized weights unchanged:
    with ``-D`` for ``+D`` this read -0.99 +- 0.02 on ``p1 p2``."""
    a, b = (gs * 2)[:2]
    grid = make_grid(PROC, sd.schedules.get("karras_jump"), 50, "zero")
    exact = overlap_log_z(a, b, grid.alpha[-2], grid.sigma[-2]) - overlap_log_z(
        a, b, grid.alpha[0], grid.sigma[0]
    )
    dens = [g.denoiser(PROC) for g in gs]
    kw = {"shape": (32, 2), "particles": 64, "steps": 50, "dtype": F64}
    out = sd.smc.driftlite(dens, betas, generator=gen(0), **kw)
    plain = sd.smc.fkc(dens, betas, generator=gen(0), **kw)
    bias, se = z_scores((out.log_z - exact)[:, None])
    assert abs(float(bias)) <= 4 * float(se) + 0.01, (float(bias), float(se), exact)
    assert float(se) < 0.1 * float(z_scores((plain.log_z - exact)[:, None])[1])


@pytest.mark.parametrize("dim", [1, 2])
def test_ecg_score_fields_on_a_centered_gaussian_are_the_x_field(dim):
    """On ``N(0, v I)^2`` each noised score is a multiple of ``x`` (``sigma^2 s = -(sigma^2 / V) x``), so ECG
    with ``log_probs`` (fields ``x`` and ``sigma^2 s``, potentials ``|x|^2 / 2`` and ``sigma^2 log q_t``,
    the exact divergence: ``probes = D``) spans the same drifts as ECG without (``x`` alone) and must make
    the same run: the Ritz solution is the same drift, its potential ``h(b)`` the same increment (to
    rounding, 7e-15). This pins that each field's potential and control potential match the field:
    ``a_k = sigma log q_t`` for ``sigma^2 log q_t``, or ``+ sigma nabla . eps_k`` in ``h_k``, passed every
    other test here."""
    g = mixture([[0.0] * dim], [[0.5] * dim])
    kw = {"shape": (4, dim), "particles": 32, "steps": 20, "dtype": F64, "probes": dim, "variant": "ecg"}
    fields = sd.smc.driftlite([g.denoiser(PROC)], [2.0], log_probs=[log_prob(g)], generator=gen(0), **kw)
    alone = sd.smc.driftlite([g.denoiser(PROC)], [2.0], generator=gen(0), **kw)
    plain = sd.smc.fkc(
        [g.denoiser(PROC)], [2.0], shape=(4, dim), particles=32, steps=20, dtype=F64, generator=gen(0)
    )
    torch.testing.assert_close(fields.x, alone.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(fields.log_w, alone.log_w, rtol=0, atol=1e-11)
    torch.testing.assert_close(fields.log_z, alone.log_z, rtol=0, atol=1e-11)
    assert float((fields.x - plain.x).abs().max()) > 0.1  # the control moved the particles


def test_a_guided_components_backward_passes_count_its_cost():
    """A backward pass through a component's evaluation goes through every network call it made: for a CFG
    component (cost 2) each probe's vector-Jacobian product is two network backward passes, as its forward
    is two evaluations. 5 steps, 4 particles, 1 probe: a plain component (5 + 4) * 4 = 36; CFG (2 * 5 + 2 *
    4) * 4 = 72 (was 56: the backward passes counted 1 each) and ``DriftLite.backward`` 8 (was 4)."""
    made: list[sd.smc.DriftLite] = []
    init = sd.smc.DriftLite.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    cfg = sd.guidance.CFG(G1.denoiser(PROC), G2.denoiser(PROC), 1.5)
    kw = {"shape": (1, 2), "particles": 4, "steps": 5, "dtype": F64, "probes": 1}
    sd.smc.DriftLite.__init__ = recording
    try:
        plain = sd.smc.driftlite([G1.denoiser(PROC)], [2.0], generator=gen(0), **kw)
        guided = sd.smc.driftlite([cfg], [2.0], generator=gen(0), **kw)
        both = sd.smc.driftlite([G1.denoiser(PROC), cfg], [1.0, 1.0], generator=gen(0), **kw)
    finally:
        sd.smc.DriftLite.__init__ = init
    assert plain.nfe == (5 + 4) * 4 and made[0].backward == 4
    assert guided.nfe == (2 * 5 + 2 * 4) * 4 and made[1].backward == 8
    assert both.nfe == (3 * 5 + 3 * 4) * 4 and made[2].backward == 12


class _Linalg(TorchFunctionMode):
    """Records the ``torch.linalg`` functions called that synchronize a CUDA device with the CPU (PyTorch's
    documentation: the SVD and eigen-decompositions, and the factorizations that check their errors)."""

    SYNCING = ("pinv", "svd", "svdvals", "eigh", "eigvalsh", "lstsq", "solve", "inv", "cholesky", "det")

    def __init__(self) -> None:
        super().__init__()
        self.called: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if (
            getattr(func, "__module__", "") == "torch._C._linalg"
            and name.removeprefix("linalg_") in self.SYNCING
        ):
            self.called.add(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["vcg", "ecg"])
def test_the_fit_reads_nothing_from_the_device(variant):
    """The per-node fit solves its small systems by a Cholesky factorization without its error check
    (``torch.linalg.cholesky_ex``), which reads nothing from a CUDA device; ``torch.linalg.pinv`` (an
    SVD) synchronized it at every controlled node, a sync per step. Its solutions are the pseudo-inverse's
    where the system is well posed (``test_coefficients_solve_their_linear_problems``, to 1e-10)."""
    kw = {"shape": (2, 2), "particles": 16, "steps": 4, "dtype": F64, "variant": variant}
    with _Linalg() as mode:
        sd.smc.driftlite([G1.denoiser(PROC), G2.denoiser(PROC)], [1.0, 1.0], generator=gen(0), **kw)
    assert not mode.called, mode.called
