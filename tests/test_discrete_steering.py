"""Particle steering of masked diffusion (sd.discrete.fk_steering, sd.discrete.best_of_n) against exact
laws: the tilt of a mixture of product-of-categoricals by a per-position reward is again one
(CategoricalMixture.tilt, checked against the enumerated table), first_hitting samples the mixture
exactly, and the ancestral sampler's exact output law comes from tests/discrete_reference.py, so the
steered target p_S(x) exp(lam r(x)) / Z and its log Z are known exactly (V = 3, L = 5: 243 sequences)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import steerdiff as sd

from .discrete_reference import ancestral_law, mixture, tv, tv_floor

F64 = torch.float64
MIX = mixture()
PROC = sd.discrete.MaskedProcess(MIX.V)
DEN = MIX.denoiser(PROC)
F = torch.rand(MIX.L, MIX.V, generator=torch.Generator().manual_seed(0), dtype=F64)  # r(x) = sum_i F[i, x^i]
LAM = 2.0
SEQS = torch.tensor(list(itertools.product(range(MIX.V), repeat=MIX.L)))  # table order


def reward(x):
    return F[torch.arange(MIX.L), x.long()].sum(-1)


def seed(s):
    return torch.Generator().manual_seed(s)


def test_tilt_is_the_enumerated_tilted_table_and_log_normalizer_its_sum():
    probs = MIX.probs.clone()
    probs[1, 2, 0] = 0.0  # a zero probability stays zero
    mix = sd.toy.CategoricalMixture(MIX.weights, probs)
    for lam in (LAM, -0.7):
        brute = mix.table() * torch.exp(lam * reward(SEQS))
        torch.testing.assert_close(mix.tilt(F, lam).table(), brute / brute.sum(), rtol=1e-12, atol=1e-15)
        assert mix.log_normalizer(F, lam) == pytest.approx(math.log(float(brute.sum())), rel=1e-13)
    assert mix.log_normalizer(F, 0.0) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match=r"f must hold the per-position rewards, shape \(L, V\) = \(5, 3\)"):
        mix.tilt(F[:, :2], LAM)
    with pytest.raises(ValueError, match=r"log_normalizer: f must be finite"):
        mix.log_normalizer(torch.where(F > 0.5, math.nan, F), LAM)
    with pytest.raises(ValueError, match=r"tilt: lam"):
        mix.tilt(F, math.inf)


def _expected_reward(p):
    return float((p * reward(SEQS)).sum())


def test_fk_steering_on_first_hitting_approaches_the_exact_tilted_law_as_particles_grow():
    # first_hitting samples the mixture exactly: the target is MIX.tilt(F, LAM), 0.257 in TV from MIX.
    # Measured (4000 rows of 4 / 16 / 64 particles): the self-normalized estimate of E_target[r], SMC's
    # O(1/N) bias, -0.0586 / -0.0113 / -0.0034 (standard errors 0.0034 / 0.0017 / 0.0009); weighted by
    # each row's Z estimate, unbiased at every N, -0.0045 / 0.0031 / 0.0001; Z_hat / Z 0.997 / 0.999 /
    # 1.002 (+- 0.007 / 0.003 / 0.002); one draw per row 0.114 / 0.071 / 0.080 in TV from the target
    # (exact draws 0.077 +- 0.004)
    target = MIX.tilt(F, LAM).table()
    exact_r, z = _expected_reward(target), math.exp(MIX.log_normalizer(F, LAM))
    rows = 4000
    floor = tv_floor(target, rows)
    errors, drawn = [], []
    for n in (4, 16, 64):
        out = sd.discrete.fk_steering(
            DEN, reward, LAM, shape=(rows, MIX.L), particles=n, sampler="first_hitting", generator=seed(n)
        )
        assert out.x.shape == (rows, n, MIX.L) and out.nfe == n * MIX.L
        torch.testing.assert_close(out.reward, reward(out.x.reshape(-1, MIX.L)).reshape(rows, n))
        est, z_hat = out.mean(out.reward), out.log_z.exp()
        errors.append(abs(float(est.mean()) - exact_r))
        # Z_hat is unbiased for Z, and Z_hat sum_j W_j f(x_j) for Z E_target[f]: their ratio over the rows
        assert abs(float(z_hat.mean()) - z) < 4 * float(z_hat.std()) / rows**0.5, (n, float(z_hat.mean()), z)
        ratio = float((z_hat * est).sum() / z_hat.sum())
        se = float((z_hat * (est - ratio)).std() / z_hat.mean()) / rows**0.5
        assert abs(ratio - exact_r) < 4 * se, (n, ratio, exact_r, se)
        drawn.append(tv(MIX.index(out.sample(seed(100 + n))), target))
    assert errors[0] > errors[1] > errors[2] and errors[2] < errors[0] / 8, errors  # 1/N: 16 times smaller
    assert drawn[0] > floor[0] + 4 * floor[1] > drawn[2], (drawn, floor)


def test_fk_steering_targets_the_base_samplers_own_law_tilted():
    # ancestral with 4 steps samples its exact law p_4 (0.075 from the data): the target is p_4 tilted, 0.068
    # in TV from the data tilted; one draw per row of 64 particles: 0.0844 from p_4 tilted (floor 0.0768
    # +- 0.0050), 0.112 from the data tilted
    p4 = ancestral_law(MIX, PROC, 4) * torch.exp(LAM * reward(SEQS))
    z, p4 = float(p4.sum()), p4 / p4.sum()
    rows = 4000
    out = sd.discrete.fk_steering(
        DEN, reward, LAM, shape=(rows, MIX.L), particles=64, steps=4, generator=seed(1)
    )
    x = out.sample(seed(2))
    floor = tv_floor(p4, rows)
    assert tv(MIX.index(x), p4) < floor[0] + 4 * floor[1]
    assert tv(MIX.index(x), MIX.tilt(F, LAM).table()) > floor[0] + 4 * floor[1]
    z_hat = out.log_z.exp()
    assert abs(float(z_hat.mean()) - z) < 4 * float(z_hat.std()) / rows**0.5


def test_the_estimates_are_the_papers_and_a_resampled_particle_takes_its_ancestors_time():
    # node i scores x0_hat: x_{i+1}'s tokens, a draw from p(x_0 | x_i) where still masked. At node 0 of
    # first_hitting (x_0 all masked) every position of x0_hat is a draw from its marginal, the token
    # unmasked included (the argmax of p(x_0 | x_0) would put the mode there); at the last node x0_hat
    # is x_S (scoring x_i would draw its last token again). A resampled particle takes its ancestor's
    # tokens and time: first_hitting's next time is below it (each particle's own time: no test failed)
    seen, times = [], []

    def r(x):
        seen.append(x.reshape(rows, n, MIX.L).clone())
        return reward(x)

    def net(x, t, y=None):
        times.append(t.reshape(rows, n).clone())
        return DEN.net(x, t, y=y)

    def flip(log_w, generator):  # a known ancestry
        return torch.arange(n - 1, -1, -1).expand(log_w.shape)

    rows, n, L = 500, 8, MIX.L
    den = sd.discrete.MaskedDenoiser(net, PROC, time_map=lambda t: t)
    out = sd.discrete.fk_steering(
        den, r, LAM, shape=(rows, L), particles=n, sampler="first_hitting", resampler=flip, generator=seed(11)
    )
    anc = torch.where(out.trace.resampled[:, :, None], torch.arange(n - 1, -1, -1), torch.arange(n))
    assert bool(out.trace.resampled[:L].float().mean() > 0.9)
    marginal = DEN.log_probs(torch.full((1, L), PROC.mask_id), torch.ones(1)).exp()[0, :, : MIX.V]
    freq = torch.nn.functional.one_hot(seen[0].reshape(-1, L), MIX.V).to(F64).mean(0)
    se = (marginal * (1 - marginal) / (rows * n)).sqrt()
    assert bool(((freq - marginal).abs() < 4 * se).all()), (freq, marginal)
    assert torch.equal(torch.take_along_dim(seen[L - 1], anc[L - 1][..., None], 1), out.x)
    for k in range(L - 1):
        assert bool((times[k + 1] <= torch.take_along_dim(times[k], anc[k], 1)).all()), k


@pytest.mark.parametrize("potential", sd.smc.POTENTIALS)
@pytest.mark.parametrize("sampler", ["ancestral", "remdm"])
def test_the_final_correction_makes_every_paths_weight_exp_lam_r(potential, sampler):
    # without resampling a particle's weight is the product of its potentials: exp(lam r(x_S)) for every
    # potential, whatever the intermediate estimates
    out = sd.discrete.fk_steering(
        DEN, reward, LAM, potential, shape=(6, MIX.L), particles=8, steps=5, sampler=sampler,
        ess_threshold=0.0, generator=seed(3),
    )  # fmt: skip
    log_r = LAM * reward(out.x.reshape(-1, MIX.L)).reshape(6, 8)
    torch.testing.assert_close(
        out.log_w, log_r - torch.logsumexp(log_r, -1, keepdim=True), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(out.log_z, torch.logsumexp(log_r, -1) - math.log(8), rtol=0, atol=1e-12)
    assert not bool(out.trace.resampled.any()) and out.trace.log_z.shape == (6, 6)


@pytest.mark.parametrize("potential", sd.smc.POTENTIALS)
def test_log_z_is_unbiased_for_every_potential(potential):
    # measured Z_hat / Z at 16 particles, interval 2, 2000 rows: 1.003 / 1.005 / 0.956 / 1.011 (standard
    # errors 0.004 / 0.010 / 0.038 / 0.006; median final ESS 16 / 6.6 / 4.4 / 9.1); sum and immediate
    # degenerate further at interval 1, as on the continuous side (final ESS 4.3 and 5.7 of 16)
    rows, z = 2000, math.exp(MIX.log_normalizer(F, LAM))
    out = sd.discrete.fk_steering(
        DEN, reward, LAM, potential, shape=(rows, MIX.L), particles=16, sampler="first_hitting", interval=2,
        generator=seed(4),
    )  # fmt: skip
    z_hat = out.log_z.exp()
    assert abs(float(z_hat.mean()) - z) < 4 * float(z_hat.std()) / rows**0.5
    assert {i for row in out.trace.events for i in row} == {0, 2, 4}  # every interval-th step, threshold 1


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
def test_lam_zero_is_the_base_sampler_and_best_of_n_its_best_draw(sampler):
    steps = 6 if sampler == "ancestral" else None
    base = sd.discrete.sample(DEN, (3 * 5, MIX.L), steps, sampler, generator=seed(5)).reshape(3, 5, MIX.L)
    out = sd.discrete.fk_steering(
        DEN, reward, 0.0, shape=(3, MIX.L), particles=5, steps=steps, sampler=sampler, generator=seed(5)
    )
    assert torch.equal(out.x, base)
    assert bool((out.log_w == -math.log(5)).all()) and bool((out.log_z == 0).all())
    assert not bool(out.trace.resampled.any())
    best = sd.discrete.best_of_n(
        DEN, reward, particles=5, shape=(3, MIX.L), steps=steps, sampler=sampler, generator=seed(5)
    )
    assert torch.equal(best.x, base) and best.nfe == out.nfe
    r = reward(base.reshape(-1, MIX.L)).reshape(3, 5)
    torch.testing.assert_close(best.reward, r)
    assert torch.equal(best.sample(seed(0)), base[torch.arange(3), r.argmax(-1)])
    assert bool((best.log_w.exp().sum(-1) == 1).all()) and best.trace is None


class Counting:
    """The exact net (its label y as the mixture's), counting calls and recording the labels' rows."""

    def __init__(self):
        self.calls, self.labels = 0, []

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.labels.append(y)
        return DEN.net(x, t, y=y)


def test_nfe_is_particles_times_the_network_calls_and_per_row_conditions_follow_the_particles():
    net = Counting()
    den = sd.discrete.MaskedDenoiser(net, PROC)
    y = torch.tensor([0, 2])
    out = sd.discrete.fk_steering(den, reward, LAM, shape=(2, MIX.L), particles=3, steps=7, y=y)
    assert net.calls == 7 and out.nfe == 3 * 7
    assert all(torch.equal(lab, y.repeat_interleave(3)) for lab in net.labels)
    cfg = sd.discrete.CFG(den, den, 2.0, uncond_kwargs={"y": -1})  # 2 calls a step
    out = sd.discrete.fk_steering(cfg, reward, LAM, shape=(2, MIX.L), particles=3, steps=7, y=y)
    assert out.nfe == 2 * 3 * 7 and net.calls == 7 + 14
    best = sd.discrete.best_of_n(den, reward, particles=4, shape=(2, MIX.L), sampler="first_hitting")
    assert best.nfe == 4 * MIX.L


def test_a_guided_denoisers_per_row_tensors_follow_the_particles():
    # CFG's uncond_kwargs of batch rows, as the message of a mismatch asks: each particle gets its batch
    # row's (refused before: "uncond_kwargs['y'] has 2 rows, but ... (6 in this call)"); lam = 0 is then
    # discrete.sample on the rows repeated for the particles, draw for draw
    y, null = torch.tensor([0, 2]), torch.tensor([1, -1])
    cfg = sd.discrete.CFG(DEN, DEN, 2.0, uncond_kwargs={"y": null})
    out = sd.discrete.fk_steering(
        cfg, reward, 0.0, shape=(2, MIX.L), particles=3, steps=4, generator=seed(10), y=y
    )
    flat = sd.discrete.CFG(DEN, DEN, 2.0, uncond_kwargs={"y": null.repeat_interleave(3)})
    base = sd.discrete.sample(flat, (6, MIX.L), 4, generator=seed(10), y=y.repeat_interleave(3))
    assert torch.equal(out.x, base.reshape(2, 3, MIX.L))
    best = sd.discrete.best_of_n(cfg, reward, particles=3, shape=(2, MIX.L), steps=4, generator=seed(10), y=y)
    assert torch.equal(best.x, out.x)
    assert cfg.uncond_kwargs["y"] is null  # the caller's denoiser is left as it is


@pytest.mark.parametrize("potential", ["difference", "immediate"])
@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
def test_a_rows_result_does_not_depend_on_its_batch_with_per_row_generators(sampler, potential):
    # first_hitting takes as many steps as the batch's most masked row (5 here, 3 for row 1 alone): a row
    # done gets no potentials in the steps after (immediate's would weight and resample it again)
    steps = 5 if sampler == "ancestral" else None
    x_T = torch.tensor([[3, 3, 1, 3, 3], [0, 3, 3, 3, 2], [3, 3, 3, 3, 3]])
    kw = {
        "potential": potential,
        "particles": 6,
        "steps": steps,
        "sampler": sampler,
        "resampler": "multinomial",
    }
    out = sd.discrete.fk_steering(DEN, reward, LAM, x_T=x_T, generator=[seed(7), seed(8), seed(9)], **kw)
    one = sd.discrete.fk_steering(DEN, reward, LAM, x_T=x_T[1:2], generator=[seed(8)], **kw)
    assert torch.equal(out.x[1:2], one.x) and torch.equal(out.log_w[1:2], one.log_w)
    assert torch.equal(out.log_z[1:2], one.log_z) and torch.equal(out.reward[1:2], one.reward)
    k = len(one.trace.ess) - 1  # the solo run's steps; then its final node
    assert torch.equal(out.trace.ess[:k, 1:2], one.trace.ess[:k]) and bool(out.trace.resampled.any())
    assert torch.equal(out.trace.ess[-1, 1:2], one.trace.ess[-1])  # the final correction
    assert bool(((out.trace.ess[k:-1, 1] - 6).abs() < 1e-12).all()) and not bool(
        out.trace.resampled[k:, 1].any()
    )
    given = x_T != MIX.V  # given tokens stay in every particle
    assert torch.equal(
        torch.where(given[:, None], out.x, 0), torch.where(given, x_T, 0)[:, None].expand_as(out.x)
    )


def test_nothing_to_unmask_returns_the_given_tokens():
    x_T = torch.tensor([[0, 1, 2, 0, 1]])
    out = sd.discrete.fk_steering(DEN, reward, LAM, x_T=x_T, particles=4, sampler="first_hitting")
    assert torch.equal(out.x, x_T[:, None].expand(1, 4, MIX.L)) and out.nfe == 0
    assert bool((out.log_w == -math.log(4)).all())
    assert float(out.log_z[0]) == pytest.approx(LAM * float(reward(x_T)[0]), rel=1e-14)
    # no steps, so no nodes: interval is still checked (it was accepted, whatever it was)
    for bad in (0, "2"):
        with pytest.raises(ValueError, match=r"^discrete\.fk_steering: interval must be an integer >= 1"):
            sd.discrete.fk_steering(DEN, reward, LAM, x_T=x_T, sampler="first_hitting", interval=bad)


def _nan_at(step):
    calls = []

    def r(x):
        calls.append(1)
        out = reward(x)
        return out * math.nan if len(calls) == step + 1 else out

    return r


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"particles": 0}, r"discrete\.fk_steering: particles must be an integer >= 1"),
        ({"potential": "best"}, r"discrete\.fk_steering: potential must be one of"),
        ({"lam": math.nan}, r"discrete\.fk_steering: lam"),
        ({"ess_threshold": 1.5}, r"discrete\.fk_steering: ess_threshold"),
        ({"interval": 0}, r"discrete\.fk_steering: interval"),
        ({"window": (2, 9)}, r"discrete\.fk_steering: window must be \(start, stop\) grid nodes"),
        ({"resampler": "bogus"}, r"discrete\.fk_steering: unknown resampler='bogus'"),
        ({"sampler": "euler"}, r"discrete\.fk_steering: unknown sampler='euler'"),
        ({"x_T": (2, 3, 5)}, r"discrete\.fk_steering: x_T must be a shape \(batch, length\)"),
        # shape=, as sd.smc.fk_steering takes it, or x_T=: exactly one
        (
            {"x_T": None, "shape": (2, 3, 5)},
            r"discrete\.fk_steering: shape must be a shape \(batch, length\), got",
        ),
        ({"x_T": None}, r"discrete\.fk_steering: pass one of shape=\(batch, length\)"),
        ({"shape": (2, MIX.L)}, r"discrete\.fk_steering: pass one of shape=\(batch, length\)"),
        ({"generator": [torch.Generator()]}, r"discrete\.fk_steering: generator must be .* batch = 2"),
        (
            {"reward": lambda x: reward(x)[:, None]},
            r"reward must return a real tensor of shape \(n,\) = \(6,\)",
        ),
        (
            {"reward": lambda x: reward(x)[:-1]},
            r"shape \(n,\) = \(6,\) .* got torch.float64 \(5,\) at step 0",
        ),
        ({"reward": lambda x: None}, r"reward must return a real tensor .* got NoneType at step 0"),
        ({"reward": _nan_at(2)}, r"discrete\.fk_steering: reward returned NaN or inf at step 2"),
        ({"reward": _nan_at(4), "steps": 4}, r"reward returned NaN or inf at the final samples"),
        ({"reward": "r"}, r"discrete\.fk_steering: reward must be a callable"),
        ({"den": MIX}, r"discrete\.fk_steering: den must be a steerdiff\.discrete\.MaskedDenoiser"),
        # the base sampler's and the network's errors name the entry point too (they said discrete.sample)
        ({"steps": 0}, r"^discrete\.fk_steering: steps must be an integer >= 1"),
        ({"sampler": "first_hitting", "steps": 4}, r"^discrete\.fk_steering: first_hitting unmasks one"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    args = {"den": DEN, "reward": reward, "lam": LAM, "x_T": (2, MIX.L), "particles": 3, "steps": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        sd.discrete.fk_steering(**args)


def test_an_overflowing_tilt_names_the_potentials():
    # finite rewards whose lam * r overflows: the message named log_weight, a hook this API does not have
    with pytest.raises(
        ValueError, match=r"^discrete\.fk_steering: lam \* reward \(the potentials\) returned NaN"
    ):
        sd.discrete.fk_steering(DEN, reward, 1e308, shape=(2, MIX.L), particles=3, steps=5)


def test_a_nan_from_the_network_names_the_entry_point_and_the_step():
    def net(x, t):
        out = DEN.net(x, t)
        return out * math.nan if float(t.min()) < 0.5 else out

    den = sd.discrete.MaskedDenoiser(net, PROC)
    with pytest.raises(sd.NonFiniteError, match=r"^discrete\.fk_steering: at step 3 "):
        sd.discrete.fk_steering(den, reward, LAM, shape=(2, MIX.L), particles=3, steps=5)


def test_the_checks_a_device_run_defers_are_read_at_the_end(monkeypatch):
    # off the CPU an out-of-range ancestor index is clamped and a non-finite log Z kept, both to be read
    # once at the end of the run (as sd.smc does): they were never read, the run returned clamped
    # particles and log_z NaN. Every tensor reads as off the CPU here
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))

    def bad(log_w, generator):
        return torch.full(log_w.shape, log_w.shape[1])

    args = {"den": DEN, "x_T": (2, MIX.L), "particles": 3, "steps": 3}
    with pytest.raises(
        ValueError, match=r"resampler 'bad' returned an ancestor index outside \[0, particles\)"
    ):
        sd.discrete.fk_steering(reward=reward, lam=LAM, resampler=bad, **args)
    with pytest.raises(ValueError, match=r"^discrete\.fk_steering: .*NaN or \+inf at node 0 \(batch row 0\)"):
        sd.discrete.fk_steering(reward=lambda x: reward(x) * 1e200, lam=1e200, **args)


def test_best_of_n_refuses_bad_input():
    with pytest.raises(ValueError, match=r"discrete\.best_of_n: particles must be an integer >= 1"):
        sd.discrete.best_of_n(DEN, reward, particles=0, shape=(2, MIX.L), steps=3)
    with pytest.raises(
        ValueError, match=r"discrete\.best_of_n: reward returned NaN or inf at the final samples"
    ):
        sd.discrete.best_of_n(DEN, lambda x: reward(x) * math.nan, particles=2, shape=(2, MIX.L), steps=3)


def test_the_readme_example_steers_to_the_tilted_law():
    from ._docs import block

    scope: dict[str, object] = {"torch": torch, "sd": sd, "print": lambda *a: None}
    exec(compile(block("# Discrete (masked) diffusion"), "docs/discrete.md", "exec"), scope)
    mix, f, xs, out = scope["mix"], scope["f"], scope["xs"], scope["out"]
    law = mix.tilt(f, 2.0).table()
    mean, sd_ = tv_floor(law, len(xs))
    assert tv(mix.index(xs), law) < mean + 4 * sd_
    assert out.nfe == 16 * mix.L and out.x.shape == (2000, 16, mix.L)
