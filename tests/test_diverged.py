"""The divergence guard (``Model.note_state``, ``steerdiff.solvers.base.DIVERGED``): a run whose state leaves
``1e8 (alpha(t) D + sigma(t))`` -- D the data scale, ``max(1, max |x_start|)`` -- or the finite numbers while
the net's outputs stay finite raises ``sd.NonFiniteError`` naming the step, the time, what moved it and the
argument at fault. Before, every case below returned its huge finite state as a sample, silently (or, rdMC's
inner chains, blamed the sampler's solver for the huge estimate they made)."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

import steerdiff as sd
from steerdiff.mcmc.base import _chain_bound
from steerdiff.solvers.base import (
    DIVERGED,
    Model,
    data_scale,
    diverged_error,
    guard_scale,
    largest,
    moved_error,
    state_bound,
)

from .reference import assert_nan_named_alike_on_an_accelerator, noise, smooth_mixture

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gmm() -> sd.toy.GaussianMixture:
    return smooth_mixture()


def _ve_x_T() -> torch.Tensor:
    return noise(16, 8) * float(sd.VE().sigma(sd.VE().t_max))


def _largest(run: list[torch.Tensor]) -> list[float]:
    return [float(x.abs().max()) for x in run]


def test_bound_is_the_process_scale_times_diverged():
    """``DIVERGED (alpha D + sigma)``, ``D = max(1, size)``: a start of noise under VE (|x_T| ~ 290) makes it
    wider than the unit floor, a start inside the unit ball does not lower it."""
    assert DIVERGED == 1e8
    assert data_scale(0.3) == 1.0 and data_scale(290.0) == 290.0 and data_scale(float("nan")) == 1.0
    assert state_bound(290.0, 1.0, 80.0) == pytest.approx(1e8 * 370.0, rel=1e-15)
    assert state_bound(1.0, 1.0, 0.0) == 1e8


SIZES = [0.0, 0.3, 1.0, 1.0 + 2**-40, 290.0, 3.5e30, 1e300, math.inf, -math.inf, math.nan]


def test_the_bound_rule_lives_once_and_changes_no_number():
    """``D = max(1, size)`` (1 where not finite) is :func:`guard_scale` on a tensor; the host path
    (:func:`data_scale`, each step's :func:`state_bound`) and a standalone chain's device bound
    (``DIVERGED max(1, max |x|)``, ``Kernel.run``) both go through it. The numbers are the two formulas'
    before, bit for bit: ``max(1, size)`` on floats, ``max |x|`` clamped at 1 times 1e8 in ``x``'s dtype,
    capped at its largest number. (Where the two differed, a start holding inf: the chain's bound was the
    dtype's largest number, now ``1e8``, the host rule's; the start's inf fails either at the first move.)"""
    for size in SIZES:
        before = max(1.0, size) if math.isfinite(size) else 1.0
        assert data_scale(size) == before, size
        for alpha, sigma in ((1.0, 0.0), (0.3, 0.7), (0.05, 80.0)):
            assert state_bound(data_scale(size), alpha, sigma) == DIVERGED * (alpha * before + sigma)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
        for size in SIZES[:-3]:
            x = torch.tensor([[size, -0.5 * size], [0.25, -size]]).to(dtype)
            if not bool(largest(x).isfinite()):  # 3.5e30 and 1e300 overflow half precision: below
                continue
            before = (largest(x).clamp_min(1.0) * DIVERGED).clamp_max(torch.finfo(dtype).max)
            got = _chain_bound(x)
            assert got.dtype == dtype and torch.equal(got, before), (dtype, size)
            assert torch.equal(guard_scale(largest(x)), largest(x).clamp_min(1.0)), (dtype, size)
        assert float(guard_scale(torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)).sum()) == 3.0


def test_a_corrector_that_diverges_is_named_at_the_step_it_crosses_the_bound(gmm, monkeypatch):
    """ULA with step_size=10 after DDIM steps under VE (20 steps): its moves are stable at high noise and grow
    the state x1.5-x20 a step from step 8 on (the callback's |x|_max); the run raises at step 17, the first
    state past the bound ``1e8 (D + sigma_17)``, D = max |x_T|, and on the CPU stops there (17 steps of one
    predictor and one corrector call). The same error on an accelerator, read after the run. Before: a
    sample of |x| ~ 1e12 returned."""
    den = gmm.denoiser(sd.VE())
    x_T = _ve_x_T()
    seen: list[torch.Tensor] = []
    kernel = sd.mcmc.ULA(step_size=10.0)
    with pytest.raises(sd.NonFiniteError) as err:
        sd.sample(
            den, x_T, 20, "ddim", corrector=kernel, generator=_gen(), callback=lambda d: seen.append(d["x"])
        )
    sizes = _largest(seen)
    grid = sd.sampling.plan(den, 20, "ddim", sd.sampling.DEFAULT_SCHEDULE, "zero", "test")[1]
    bound = 1e8 * (float(x_T.abs().max()) * grid.alpha[18] + grid.sigma[18])
    assert len(seen) == 17 and sizes[7] < 20 and 1e9 < sizes[16] < bound, sizes  # step 17 raised in the moves
    assert str(err.value).startswith(
        f"the corrector ULA made the state diverge at step 17 (process time t={grid.t[18]:.6g}): an entry is "
        f"NaN/inf or beyond {bound:.3g} = 1e+08 (alpha(t) D + sigma(t))"
    ), str(err.value)
    assert "try a smaller step_size or snr" in str(err.value)
    assert_nan_named_alike_on_an_accelerator(
        lambda: sd.sample(den, x_T, 20, "ddim", corrector=kernel, generator=_gen()), monkeypatch
    )
    # a stable step runs the same grid through: |x| of the data's order
    fine = sd.sample(den, x_T, 20, "ddim", corrector=sd.mcmc.ULA(step_size=0.01), generator=_gen())
    assert float(fine.abs().max()) < 10


def test_an_sde_with_absurd_noise_is_named_at_its_first_churned_step(gmm):
    """EDM's churn with ``s_noise = 1e12``: the first churned step (sigma/alpha within [S_tmin, S_tmax] = 50
    on VP) adds noise 1e12 sigma, past the bound at once; the solver and the noise arguments are named."""
    proc = sd.VP.linear()
    den = gmm.denoiser(proc)
    slv = sd.solvers.EDMStochasticHeun(s_noise=1e12)
    grid = sd.sampling.plan(den, 10, slv, sd.sampling.DEFAULT_SCHEDULE, "zero", "test")[1]
    first = next(i for i, level in enumerate(slv.init_state(grid)["churn"]) if level is not None)
    with pytest.raises(sd.NonFiniteError) as err:
        sd.sample(den, noise(8, 8), 10, slv, generator=_gen())
    msg = str(err.value)
    assert msg.startswith(f"the solver 'edm_sde' made the state diverge at step {first} "), msg
    assert f"t={grid.t[first + 1]:.6g}" in msg and "its noise (eta, s_noise, ...)" in msg
    assert sd.sample(den, noise(8, 8), 10, sd.solvers.EDMStochasticHeun(), generator=_gen()).abs().max() < 10


def test_a_guidance_scale_that_diverges_names_the_guidance(gmm):
    """CFG at scale 1e12 between the mixture and a shifted copy: the first DDIM step moves the state by 1e12
    times the difference of the two denoised estimates: step 0, the guidance scale named."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)
    guided = sd.guidance.CFG(cond, uncond, 1e12)
    with pytest.raises(
        sd.NonFiniteError, match=r"^the solver 'ddim' made the state diverge at step 0 "
    ) as err:
        sd.sample(guided, noise(8, 8), 10, "ddim")
    assert "the guidance scale" in str(err.value)
    assert sd.sample(sd.guidance.CFG(cond, uncond, 3.0), noise(8, 8), 10, "ddim").abs().max() < 100


def test_an_inversion_that_diverges_is_named():
    """DDIM up the grid with a field that amplifies the state (eps = 1e4 x: |x|_max 3 -> 3.3e3 -> 7.0e6, about
    x2e3 a step) raises at step 2, the first past ``1e8 (alpha D + sigma)``, D = max |x_0| = 3; the advice is
    more steps (DDIM has no noise, order or guidance to blame)."""
    proc = sd.VP.linear()
    den = sd.Denoiser(lambda x, t: 1e4 * x, proc, "eps")
    x_0 = 3.0 * torch.ones(2, 4, dtype=F64)
    seen: list[torch.Tensor] = []
    with pytest.raises(sd.NonFiniteError) as err:
        sd.invert(den, x_0, 10, "ddim", callback=lambda d: seen.append(d["x"]))
    step = len(seen)  # the callback runs after the step's check: the step that raised is the next
    assert str(err.value).startswith(f"the solver 'ddim' made the state diverge at step {step} "), str(
        err.value
    )
    assert step == 2 and _largest(seen)[-1] < 1e8 * (3 + 1)
    assert str(err.value).endswith("the steps are too long for the model's field: try more steps")
    tame = sd.Denoiser(lambda x, t: 0.1 * x, proc, "eps")
    assert bool(torch.isfinite(sd.invert(tame, x_0, 10, "ddim")).all())


def test_a_particle_proposal_that_diverges_is_named(gmm):
    """FK steering over DDPM on a CFG denoiser at scale 1e12: the proposal (the DDPM transition) diverges at
    step 0; the algorithm, the solver and the drift named. At scale 2 the same run returns its particles."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)

    def run(scale: float) -> sd.smc.Particles:
        return sd.smc.fk_steering(
            sd.guidance.CFG(cond, uncond, scale), lambda x: -x.pow(2).sum(-1), lam=1.0, shape=(2, 8),
            particles=4, steps=8, solver="ddpm", dtype=F64, generator=_gen(),
        )  # fmt: skip

    with pytest.raises(sd.NonFiniteError) as err:
        run(1e12)
    msg = str(err.value)
    assert re.match(r"^fk_steering's proposal \(solver 'ddpm'\) made the state diverge at step 0 ", msg), msg
    assert "a guidance scale" in msg
    assert float(run(2.0).x.abs().max()) < 100


@pytest.mark.parametrize("kernel", [sd.mcmc.ULA, sd.mcmc.HMC])
def test_a_standalone_chain_that_diverges_names_its_move(kernel):
    """ULA on N(0, 0.01 I) with step_size 1 multiplies the state by -99 a move (HMC's leapfrog with step 1 by
    about -100 a step, its Metropolis test accepts nothing): ULA crosses ``1e8 max(1, |x_0|)`` at move 5 --
    |x_0|_max = 2.2, 2.2 * 99^4 = 2e8 < 2.2e8, 2.2 * 99^5 > 2.2e8 -- and would run on to NaN. HMC's state
    never moves: no error. A step of 1e-3 runs through."""
    x = torch.randn(4, 3, dtype=F64, generator=_gen())

    def log_prob(y: torch.Tensor) -> torch.Tensor:
        return -(y**2).sum(-1) / (2 * 0.01)

    if kernel is sd.mcmc.ULA:
        with pytest.raises(
            sd.NonFiniteError, match=r"^ULA\.run: the chain diverged at its move (\d+) of 200 "
        ) as err:
            kernel(step_size=1.0).run(x, log_prob, steps=200, generator=_gen(1))
        moves = int(re.search(r"its move (\d+)", str(err.value)).group(1))  # type: ignore[union-attr]
        size = float(x.abs().max())
        out, _ = kernel(step_size=1.0).run(x, log_prob, steps=moves - 1, generator=_gen(1))
        assert float(out.abs().max()) <= 1e8 * size  # the move before passes
        assert "step_size=1 is too large" in str(err.value)
    else:
        out, info = kernel(step_size=1.0).run(x, log_prob, steps=20, generator=_gen(1))
        assert torch.equal(out, x) and info.acceptance_rate == 0.0
    out, _ = kernel(step_size=1e-3).run(x, log_prob, steps=50, generator=_gen(1))
    assert float(out.abs().max()) < 5


def test_the_guard_reads_nothing_on_the_host_during_a_run():
    """On ``meta`` (no values: any host read raises) a run of DDPM with a ULA corrector goes through
    ``run_grid`` with the guard recording every state; the flags are read by ``check_finite`` alone."""
    proc = sd.VP.linear()
    A = torch.eye(8, device="meta")
    den = sd.Denoiser(lambda x, t: x @ A, proc, "eps", shape=(8,))
    x = torch.randn(4, 8, device="meta")
    _, grid, slv = sd.sampling.plan(den, 4, "ddpm", "logsnr_uniform", "zero", "test")
    model = Model(den, {}, sd.noise.make_noise(torch.Generator()), scale=5.0)
    y, _ = sd.sampling.run_grid(slv, model, grid, x, kernel=sd.mcmc.ULA(step_size=0.1), corrector_steps=2)
    assert y.device.type == "meta" and model.moves == 4 + 3 * 2  # one per step, one per corrector move


def test_legitimate_runs_far_from_unit_scale_pass(gmm):
    """Data 1e6 times the mixture's scale sampled under VP from unit noise (D = max |x_T| ~ 3): the states
    are within 1e8 (alpha D + sigma) and the sample is the exact ODE's to the solver's accuracy; VE from its
    noise (D ~ 290) and a float16 x_T (state in float32) pass too; an inversion of data of size 1e9 (D =
    1e9) goes up to the noise."""
    big = sd.toy.GaussianMixture(gmm.means * 1e6, gmm.variances * 1e12, gmm.weights)
    proc = sd.VP.linear()
    x = sd.sample(big.denoiser(proc), noise(16, 8), 20)
    exact = big.reference_ode(noise(16, 8), proc, proc.t_max, proc.t_min, denoise=True)
    assert sd.metrics.relative_rmse(x, exact) < 1e-2
    assert sd.sample(gmm.denoiser(sd.VE()), _ve_x_T(), 10, "dpmpp_2m_sde", generator=_gen()).abs().max() < 10
    half = sd.sample(gmm.denoiser(proc), noise(16, 8).half(), 10)
    assert half.dtype == torch.float16 and bool(torch.isfinite(half).all())
    huge = sd.toy.GaussianMixture(gmm.means * 1e9, gmm.variances * 1e18, gmm.weights)
    x_0 = huge.sample(8, generator=_gen())
    assert bool(torch.isfinite(sd.invert(huge.denoiser(proc), x_0, 10, "ddim")).all())


def test_pcg_names_its_corrector_and_repaint_its_step(gmm):
    """pcg with step_scale=30 (3 Langevin moves a node, 20 steps): its corrector's moves diverge at step 2
    (before: a sample of |x| ~ 9e25 returned); at step_scale=1 it returns the data's scale. RePaint (DDPM)
    on a field that amplifies the state (eps = 1e4 x) at step 1 (before: |x| ~ 1e39)."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)

    def pcg(step_scale: float) -> torch.Tensor:
        return sd.guidance.pcg(
            cond, uncond, noise(8, 8), 20, 2.0, step_scale=step_scale, langevin_steps=3, generator=_gen()
        )

    with pytest.raises(
        sd.NonFiniteError, match=r"^pcg's corrector \(ULA\) made the state diverge at step 2 "
    ):
        pcg(30.0)
    assert float(pcg(1.0).abs().max()) < 10
    A = sd.inverse.Matrix(torch.eye(8, dtype=F64)[:4])
    wild = sd.Denoiser(lambda x, t: 1e4 * x, proc, "eps")
    with pytest.raises(sd.NonFiniteError, match=r"^the solver 'ddpm' made the state diverge at step 1 "):
        sd.guidance.repaint_sample(wild, A, torch.zeros(8, 4, dtype=F64), noise(8, 8), 10, generator=_gen())
    tame = sd.guidance.repaint_sample(
        cond, A, torch.zeros(8, 4, dtype=F64), noise(8, 8), 10, generator=_gen()
    )
    assert float(tame.abs().max()) < 10


@pytest.mark.parametrize("window", [1, 4])
def test_paradigms_names_the_step_whose_accepted_node_diverged(gmm, window):
    """ParaDiGMS' Picard iterations over DDIM with CFG at scale 1e12: the node step 0 reaches is out of bounds
    when accepted, in the same device read as the tolerance's flags (before: |x| ~ 5e99 returned). At scale
    3 the run is the sequential sampler's."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)
    with pytest.raises(
        sd.NonFiniteError, match=r"^paradigms: the solver 'ddim' made the state diverge at step 0 "
    ):
        sd.paradigms(sd.guidance.CFG(cond, uncond, 1e12), noise(8, 8), 10, "ddim", window=window)
    guided = sd.guidance.CFG(cond, uncond, 3.0)
    x = sd.paradigms(guided, noise(8, 8), 10, "ddim", window=window, tol=1e-9)
    assert sd.metrics.relative_rmse(x, sd.sample(guided, noise(8, 8), 10, "ddim")) < 1e-6


class _Huge(torch.nn.Module):
    """An x0 net whose estimate is 1e12 from step ``at`` (its call count) on: finite, beyond any bound."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, 1e12) if self.calls > self.at else torch.zeros_like(x)


@pytest.mark.parametrize(("solver", "named"), [("euler", 9), ("ddim", 9), ("dpmpp_2m", 3), ("unipc", 3)])
def test_a_bounded_step_is_guarded_at_the_last_state(solver, named, monkeypatch):
    """Solver.bounded (DDIM with eta = 0, Euler): down the grid a step's x/alpha is a convex combination of
    the last x/alpha and the net's x0, so the guard reads the run's last state alone (one reduction per run,
    not per step: it was a tenth of Euler's overhead at 256x64): a net whose x0 turns 1e12 at step 3 is
    named at the last step (9) there, at step 3 by a multistep solver (its extrapolation is guarded at every
    step). Nothing huge is returned either way. On an accelerator (the states' sizes recorded, compared with
    their bounds at the read after the run) the same step is named."""
    assert (
        sd.solvers.get("euler").bounded and sd.solvers.DDIM().bounded and not sd.solvers.DDIM(eta=0.5).bounded
    )
    assert not sd.solvers.get("dpmpp_2m").bounded

    def run() -> object:
        return sd.sample(sd.Denoiser(_Huge(3), sd.VP.linear(), prediction="x0"), noise(4, 8), 10, solver)

    with pytest.raises(sd.NonFiniteError, match=rf"made the state diverge at step {named} "):
        run()
    assert_nan_named_alike_on_an_accelerator(run, monkeypatch)


def test_off_the_cpu_the_first_bad_move_is_the_earliest_of_flags_and_sizes(gmm, monkeypatch):
    """Off the CPU the guard records each state's size, compared with its bound at the read (one compare a
    run), beside the correctors' finiteness flags: the first bad move is the earliest recorded of either
    kind, a state at its bound passes and the next float past it fails, and the error is the state's."""
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    model = Model(gmm.denoiser(sd.VP.linear()), scale=1.0)
    bound = state_bound(1.0, 1.0, 0.0)
    past = torch.nextafter(torch.tensor(bound, dtype=F64), torch.tensor(math.inf, dtype=F64))
    error = functools.partial(diverged_error, who="the solver 'x'", fix="none")
    moved = functools.partial(moved_error, who="ULA")
    model.note_move(torch.tensor(True), 0, 0.9, moved)
    model.note_state(torch.full((2, 3), bound, dtype=F64), 1, 0.8, 1.0, 0.0, error)  # at the bound: within
    assert model.first_bad_move() is None
    model.note_state(past.expand(2, 3), 2, 0.7, 1.0, 0.0, error)
    model.note_move(torch.tensor(False), 3, 0.6, moved)
    model.note_state(torch.full((2, 3), math.nan, dtype=F64), 4, 0.5, 1.0, 0.0, error)
    assert model.moves == 5 and model.first_bad_move() == 2
    with pytest.raises(sd.NonFiniteError, match=r"^the solver 'x' made the state diverge at step 2 "):
        model.check_finite()


def test_dpm_adaptive_names_its_first_accepted_state_that_diverged(monkeypatch):
    """The adaptive DPM-Solver follows the ODE to its tolerance, so a field whose ODE blows up (eps = -20 x
    under VP: x/alpha grows like exp(20 int sigma dlam)) is followed up to the bound: the first accepted
    state past ``1e8 (alpha D + sigma)`` at its row's level is named with its attempt (22 of the attempts;
    before: a sample of |x| 6.9e51 returned after 154 attempts). A rejected attempt is not a state of the run:
    from ``h_init=100`` the first attempt's ``x_high`` is past its bound (a guard on every attempt names
    attempt 0) but rejected, and the run is named later, at an accepted state. The flag rides in the
    attempt's one read (``tests/test_device.py`` counts it): the same error on a faked accelerator. The
    field ``eps = x`` runs through to the data's scale."""
    proc = sd.VP.linear()
    wild = sd.Denoiser(lambda x, t: -20.0 * x, proc, "eps")
    for h_init, named in ((0.05, 22), (100.0, 25)):
        seen: list[dict] = []
        with pytest.raises(sd.NonFiniteError) as err:
            sd.solvers.dpm_adaptive(wild, noise(4, 8), h_init=h_init, final="none", callback=seen.append)
        msg = str(err.value)
        assert len(seen) == named and msg.startswith(
            f"dpm_adaptive: sample 2's accepted step made the state diverge at step {named} "
        ), msg
        assert "the model's field itself diverges there" in msg
        last = seen[-1]  # the attempt before: within the bound at every row's level
        bound = 1e8 * (float(noise(4, 8).abs().max()) * proc.alpha(last["t"]) + proc.sigma(last["t"]))
        assert bool((last["x"].abs().amax(1) <= bound).all()) and float(last["x"].abs().max()) > 1e7
    assert not any(seen[0]["accepted"].tolist())  # h_init=100: attempt 0 rejected
    assert_nan_named_alike_on_an_accelerator(
        lambda: sd.solvers.dpm_adaptive(wild, noise(4, 8), final="none"), monkeypatch
    )
    tame = sd.solvers.dpm_adaptive(sd.Denoiser(lambda x, t: x, proc, "eps"), noise(4, 8), final="none")
    assert float(tame.abs().max()) < 10


def test_dpm_adaptive_bounds_its_clean_step(monkeypatch):
    """With ``final="zero"`` the run returns the net's denoised estimate at ``t_end``, bounded as ``sample``'s
    clean step is (``1e8 D``), in that step's read: an x0 net that is 0 above ``t_min`` and 1e12 there (the
    clean step's time alone) is named there (before: 1e12 returned). The same on a faked accelerator."""
    proc = sd.VP.linear()
    at_end = float(proc.model_time(proc.t_min))

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t[:, None] <= at_end, 1e12, 0.0).to(x.dtype).expand_as(x)

    wild = sd.Denoiser(net, proc, "x0")
    seen: list[dict] = []
    with pytest.raises(sd.NonFiniteError) as err:
        sd.solvers.dpm_adaptive(wild, noise(4, 8), callback=seen.append)
    bound = 1e8 * float(noise(4, 8).abs().max())
    assert str(err.value).startswith(
        f"dpm_adaptive: sample 0's clean step (its denoised estimate) made the state diverge at step "
        f"{len(seen)} (process time t={proc.t_min:.6g}): an entry is NaN/inf or beyond {bound:.3g} "
    ), str(err.value)
    assert float(seen[-1]["x"].abs().max()) < 10  # the last attempt's state: sane
    assert_nan_named_alike_on_an_accelerator(lambda: sd.solvers.dpm_adaptive(wild, noise(4, 8)), monkeypatch)


def test_dpm_adaptive_names_the_guidance_scale_of_a_run_that_diverged(gmm):
    """CFG at 1e5 under a loose tolerance (rtol = atol = 5): the accepted states grow past the bound at
    attempt 8, named with the guidance scale (before: the run went on until the state overflowed and the
    mixture's denoiser returned NaN, "the model returned NaN/inf at step 65", blaming the model). At 1e12 with
    the default tolerance the steps shrink (h ~ 5e-9, |x| 3e4 at 2,000 evaluations) and the evaluation cap
    (``max_nfe``) stops the run first; at scale 3 it returns a sample of the data's scale."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)
    with pytest.raises(sd.NonFiniteError) as err:
        sd.solvers.dpm_adaptive(sd.guidance.CFG(cond, uncond, 1e5), noise(4, 8), rtol=5.0, atol=5.0)
    msg = str(err.value)
    assert msg.startswith("dpm_adaptive: sample 2's accepted step made the state diverge at step 8 "), msg
    assert msg.endswith("the guidance scale may be too large: try less")
    with pytest.raises(RuntimeError, match=r"^dpm_adaptive: sample 0 has made \d+ network evaluations"):
        sd.solvers.dpm_adaptive(sd.guidance.CFG(cond, uncond, 1e12), noise(4, 8), max_nfe=300)
    assert float(sd.solvers.dpm_adaptive(sd.guidance.CFG(cond, uncond, 3.0), noise(4, 8)).abs().max()) < 10


def test_ddpm_invert_names_the_step_whose_mean_diverged(gmm, monkeypatch):
    """Edit-friendly DDPM inversion under CFG at 1e12: the states are drawn from q(x_t | x_0), and each noise
    map cancels its step's mean (x_{i+1} = mu_i + s_i z_i is the drawn state whatever mu_i), so the guard
    bounds the mean at the node it reaches: |mu_0| 5.9e10, past ``1e8 (alpha_1 D + sigma_1)`` at step 0, the
    guidance scale named (before: maps of |z| up to 3.2e12 returned, the states sane, so an edit replaying
    them diverged). The same on a faked accelerator; at scale 3 the maps are of the normal's size and replay
    ``x_0``."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)
    x_0 = gmm.sample(4, generator=_gen())

    def run(scale: float) -> sd.EditNoise:
        return sd.ddpm_invert(sd.guidance.CFG(cond, uncond, scale), x_0, 10, generator=_gen())

    grid = sd.sampling.plan(cond, 10, "ddpm", sd.sampling.DEFAULT_SCHEDULE, "none", "test")[1]
    with pytest.raises(sd.NonFiniteError) as err:
        run(1e12)
    bound = 1e8 * (float(x_0.abs().max()) * grid.alpha[1] + grid.sigma[1])
    assert str(err.value) == (
        "ddpm_invert: the solver 'ddpm' (its step's mean) made the state diverge at step 0 (process time "
        f"t={grid.t[1]:.6g}): an entry is NaN/inf or beyond {bound:.3g} = 1e+08 (alpha(t) D + sigma(t)), D "
        "the run's data scale, the model's outputs finite until then; the guidance scale may be too large: "
        "try less"
    )
    assert_nan_named_alike_on_an_accelerator(lambda: run(1e12), monkeypatch)
    monkeypatch.undo()
    tame = run(3.0)
    assert max(float(z.abs().max()) for z in tame.z) < 10
    replay = sd.sample(sd.guidance.CFG(cond, uncond, 3.0), **tame.sample_kwargs())
    assert float((replay - x_0).abs().max()) < 1e-12


def test_eta_invert_names_the_source_branch_that_diverged(gmm, monkeypatch):
    """Eta Inversion with a source branch under CFG at 1e12: its step from the inversion's state x_{t_0} has a
    mean of |x| ~ 5e10, past ``1e8 (alpha_1 D + sigma_1)``: named at step 0, ``source``'s guidance scale
    blamed (before: maps of normal size, |z| <= 2.9, returned, each chosen against a branch at 4e10-7e11).
    The inversion itself is DDIM's (``sd.invert``, guarded in ``run_grid``). The same on a faked
    accelerator; with the source at scale 3 the maps are the normal's."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)
    x_0 = gmm.sample(4, generator=_gen())

    def run(scale: float) -> sd.EditNoise:
        return sd.eta_invert(cond, x_0, 10, source=sd.guidance.CFG(cond, uncond, scale), generator=_gen())

    grid = sd.sampling.plan(cond, 10, "ddim", sd.sampling.DEFAULT_SCHEDULE, "none", "test")[1]
    with pytest.raises(sd.NonFiniteError) as err:
        run(1e12)
    msg = str(err.value)
    assert msg.startswith(
        "eta_invert: the source branch's step (EtaDDIM, source) made the state diverge at step 0 (process "
        f"time t={grid.t[1]:.6g})"
    ), msg
    assert msg.endswith("source's guidance scale may be too large: try less")
    assert_nan_named_alike_on_an_accelerator(lambda: run(1e12), monkeypatch)
    monkeypatch.undo()
    assert max(float(z.abs().max()) for z in run(3.0).z) < 5


def test_psi_sampler_names_its_initial_chains_when_they_diverge(monkeypatch):
    """Ψ-Sampler's pCNL chains at node 0 on a unit Gaussian (x0_hat = alpha x under VP) with a linear reward
    and lam = 1e12: pi_T is N(lam alpha_0 s^2 w, s^2), which pCNL samples exactly (its first move goes 1.2e9
    out), past ``1e8 (alpha_0 D + sigma_0)``, D of the chains' start: named at move 1, lam blamed. Before:
    the particle run took the chains' states as its x_T, their size as its data scale, and returned |x| ~
    3.5e7. The same on a faked accelerator; at lam = 1 the samples are of the data's scale."""
    proc = sd.VP.linear()
    unit = sd.toy.GaussianMixture(
        torch.zeros(1, 8, dtype=F64), torch.ones(1, 8, dtype=F64), torch.ones(1, dtype=F64)
    )

    def run(lam: float) -> sd.smc.Particles:
        return sd.smc.psi_sampler(
            unit.denoiser(proc), lambda x: x.sum(-1), lam, shape=(2, 8), particles=4, steps=8, mcmc_steps=10,
            dtype=F64, generator=_gen(),
        )  # fmt: skip

    with pytest.raises(sd.NonFiniteError) as err:
        run(1e12)
    msg = str(err.value)
    assert msg.startswith(
        "psi_sampler's initial chains (pCNL, at their move 1 of 10) made the state diverge at step 0 "
        f"(process time t={proc.t_max:.6g})"
    ), msg
    assert msg.endswith("lam may be too large for this reward: try less")
    assert_nan_named_alike_on_an_accelerator(lambda: run(1e12), monkeypatch)
    monkeypatch.undo()
    assert float(run(1.0).x.abs().max()) < 10


@pytest.mark.parametrize("method", ["dts", "rbf"])
def test_a_tree_search_that_diverges_names_its_rollout_or_candidate(gmm, method, monkeypatch):
    """The tree searches' own loops over DDPM on a CFG denoiser at scale 1e12: the first state a solver step
    makes (dts: rollout 1's step 0; rbf: a candidate of node 1, drawn from step 0's transition) is past the
    bound ``1e8 (alpha D + sigma)``, D the initial noise's std (1 under VP). Before: both returned a sample of
    max |x| 1.7e77 (dts, 4 rollouts; its ``best`` too) / 2.0e77 (rbf, budget 64). The same error on an
    accelerator (read after the run, or at a reward's check); at scale 2 the data's scale."""
    proc = sd.VP.linear()
    cond, uncond = gmm.denoiser(proc), smooth_mixture(seed=3).denoiser(proc)

    def run(scale: float) -> sd.smc.Particles:
        den, kw = sd.guidance.CFG(cond, uncond, scale), {"shape": (2, 8), "steps": 8, "solver": "ddpm"}
        gens = [_gen(b) for b in range(2)]
        if method == "dts":
            return sd.smc.dts(
                den, lambda x: -x.pow(2).sum(-1), 1.0, rollouts=4, dtype=F64, generator=gens, **kw
            )
        return sd.smc.rbf(den, lambda x: -x.pow(2).sum(-1), 64, dtype=F64, generator=gens, **kw)

    who = "dts's rollout 1" if method == "dts" else "rbf's candidate"
    with pytest.raises(sd.NonFiniteError) as err:
        run(1e12)
    msg = str(err.value)
    assert msg.startswith(f"{who} (solver 'ddpm') made the state diverge at step 0 "), msg
    assert "the guidance scale" in msg
    assert_nan_named_alike_on_an_accelerator(lambda: run(1e12), monkeypatch)
    monkeypatch.undo()
    assert float(run(2.0).x.abs().max()) < 100


def test_denoising_mcmc_names_the_chain_move_that_diverged(gmm, monkeypatch):
    """Denoising MCMC's Langevin moves ``y <- y + h (xhat - y) + ...`` (h = step_size = 0.5) on a field that
    amplifies the state (eps = -3 x: xhat = (1 + 3 s) y, ``y`` grows by ``1 + 3 h s`` a move) cross
    ``1e8 max(1, max |y_0|)`` at move 31 of 34. Before: a sample of max |x| 5.6e10 returned (its chain state
    1.1e10; the denoising's own guard, D = that state, let it through). The same error on an accelerator (one
    read after the chain); on the mixture's exact denoiser the same run returns the data's scale."""
    proc, sig = sd.VP.linear(), torch.logspace(-1, 0.5, 6, dtype=F64)
    wild = sd.Denoiser(lambda x, t: -3.0 * x, proc, "eps")

    def run(den: sd.Denoiser, logits) -> sd.mcmc.DenoisingMCMC:  # type: ignore[no-untyped-def]
        gens = [_gen(b) for b in range(8)]
        return sd.mcmc.denoising_mcmc(
            den, (8, 8), sig, logits, 2, thin=2, burn_in=30, step_size=0.5, dtype=F64, generator=gens
        )

    def flat(y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(y), 6, dtype=y.dtype)

    with pytest.raises(sd.NonFiniteError) as err:
        run(wild, flat)
    assert str(err.value).startswith(
        "denoising_mcmc: the chain diverged at its move 31 of 34 (sweep 31; an entry NaN/inf or beyond 1e+08 "
        "max(1, max |y|) of the start y"
    ), str(err.value)
    assert "step_size=0.5 is too large" in str(err.value)
    assert_nan_named_alike_on_an_accelerator(lambda: run(wild, flat), monkeypatch)
    monkeypatch.undo()
    out = run(gmm.denoiser(proc), lambda y: gmm.noise_level_logits(y, sig))
    assert float(out.x.abs().max()) < 10


def _rdmc(inner: int, step_size: float) -> sd.mcmc.MonteCarloDenoiser:
    """rdMC's Langevin estimator of N(0, 0.01 I) in 4-d (precision 100) under VP.cosine stopped at 0.8."""
    return sd.mcmc.MonteCarloDenoiser(
        lambda y: -(y**2).sum(-1) / (2 * 0.01), sd.VP.cosine(t_max=0.8), (4,), samples=8, method="langevin",
        inner=inner, step_size=step_size, generator=_gen(0),
    )  # fmt: skip


def test_rdmc_inner_chains_that_diverge_name_their_move(monkeypatch):
    """The Monte Carlo denoiser's inner ULA chains on ``q(x0 | x_t)`` with step_size 1 (h ~ 1 at t = 0.8 on a
    target of precision 100: x(-99) a move) cross ``1e8 max(1, max |y|)`` of their start draws at move 5 of 5,
    at the sampler's first call. Before: the estimate 1e9 times the data's scale made the sampler's step
    diverge, and the error blamed "the solver 'ddpm' ... its noise" (step 0). On an accelerator (no read per
    call) the estimate is made NaN and the sampler names the step and time of that call as the model's NaN.
    At step_size 1e-3 the run returns the data's scale."""
    x_T = torch.randn(2, 4, dtype=F64, generator=_gen(1))

    def run(step_size: float) -> torch.Tensor:
        return sd.sample(_rdmc(5, step_size), x_T, 5, "ddpm", generator=_gen(2))

    with pytest.raises(sd.NonFiniteError) as err:
        run(1.0)
    assert str(err.value).startswith(
        "MonteCarloDenoiser: an inner chain diverged at its move 5 of 5 (an entry NaN/inf or beyond 1e+08 "
        "max(1, max |y|) of the draws it started from, the log_prob sound until then): step_size=1 is too "
        "large for this log_prob: take a smaller step_size (at t=0.8)"
    ), str(err.value)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
        with pytest.raises(
            sd.NonFiniteError,
            match=r"^the model returned NaN/inf at step 0 \(evaluation 1, process time t=0.8\)",
        ):
            run(1.0)
    assert float(run(1e-3).abs().max()) < 5


def test_rdmc_warm_start_that_diverges_names_its_move(monkeypatch):
    """rdMC's warm start, ULA on ``p_t`` at t = 0.8 with the estimator's score (20 inner moves of 1e-3: the
    estimate keeps 0.12 of the chains' start, the score about -0.88 x / sigma^2), step_size 10: x(-8.7) a
    move, past ``1e8 max(1, max |x|)`` at move 9 of 20. Before: returned max |x| 2.0e19 (the end state was
    only checked finite). The same error on an accelerator (one read per warm start); step_size 0.1 returns
    the data's scale."""
    x = 0.95 * torch.randn(8, 4, dtype=F64, generator=_gen(1))

    def run(step_size: float) -> torch.Tensor:
        return _rdmc(20, 1e-3).warm_start(x, 0.8, 20, step_size, generator=_gen(3))

    with pytest.raises(
        sd.NonFiniteError,
        match=r"^MonteCarloDenoiser\.warm_start: the chain diverged at its move 9 of 20 \(an entry NaN/inf "
        r"or beyond 1e\+08 max\(1, max \|x\|\) of the start x, the score estimates finite until then\): "
        r"step_size=10 is too large",
    ):
        run(10.0)
    assert_nan_named_alike_on_an_accelerator(lambda: run(10.0), monkeypatch)
    monkeypatch.undo()
    assert float(run(0.1).abs().max()) < 5


def test_rbf_bounds_its_returned_sample():
    """rbf's returned sample is the last step's point from the kept state (``final="zero"``: its denoised
    estimate): an x0 net that returns 1e12 at the last searched node's time alone makes every candidate
    there finite and the sample 1e12, past ``1e8 (alpha_N D + sigma_N)`` = 1e8 at the last step (3 of 4).
    Before: returned max |x| 1.0e12."""
    proc, gens = sd.VP.linear(), lambda: [_gen(b) for b in range(2)]
    times: list[float] = []

    def seen(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(float(t.min()))
        return torch.zeros_like(x)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return -x.pow(2).sum(-1)

    kw = {"shape": (2, 8), "steps": 4, "solver": "ddpm", "dtype": F64}
    tame = sd.smc.rbf(sd.Denoiser(seen, proc, "x0"), reward, 16, generator=gens(), **kw)
    assert float(tame.x.abs().max()) == 0.0
    late = sd.Denoiser(lambda x, t: torch.where(t[:, None] <= min(times), 1e12, 0.0).expand_as(x), proc, "x0")
    with pytest.raises(
        sd.NonFiniteError, match=r"^rbf's last step \(solver 'ddpm'\) made the state diverge at step 3 "
    ):
        sd.smc.rbf(late, reward, 16, generator=gens(), **kw)
