"""Masked-diffusion samplers against the exact law of a mixture of product-of-categoricals
(``V = 3``, ``L = 5``: 243 sequences). ``first_hitting`` with one step per token samples it exactly, the
ancestral sampler's output law is computed exactly by matrix propagation (tests/discrete_reference.py),
and the sampled distances are compared with those of exact samples of the same size."""

from __future__ import annotations

import itertools

import pytest
import torch

import steerdiff as sd

from .discrete_reference import ancestral_law, mixture, tv, tv_floor

N = 8000  # samples per law: the TV floor is 0.059 (sd 0.0026) on the 243 sequences


@pytest.fixture(scope="module")
def mix():
    return mixture()


@pytest.fixture(scope="module")
def floor(mix):
    return tv_floor(mix.table(), N)


def _tv(mix, x, p=None):
    return tv(mix.index(x), mix.table() if p is None else p)


@pytest.mark.parametrize("schedule", sd.discrete.SCHEDULES)
def test_first_hitting_with_one_step_per_token_samples_the_law(mix, floor, schedule):
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V, schedule=schedule))
    x, info = sd.discrete.sample(
        den, (N, mix.L), sampler="first_hitting", generator=torch.Generator().manual_seed(1), return_info=True
    )
    assert info.nfe == info.steps == mix.L
    assert _tv(mix, x) < floor[0] + 4 * floor[1]  # measured 0.0549 (every schedule: the same draws)


def test_first_hitting_draws_do_not_depend_on_the_schedule_only_its_times(mix):
    # the exact denoiser is time-agnostic; the schedule maps the same uniforms to other times
    runs = {}
    for schedule in ("linear", "cosine"):
        times: list[torch.Tensor] = []
        den = mix.denoiser(sd.discrete.MaskedProcess(mix.V, schedule=schedule))
        x = sd.discrete.sample(
            den, (64, mix.L), sampler="first_hitting", generator=torch.Generator().manual_seed(3),
            callback=lambda d, times=times: times.append(d["t"]),
        )  # fmt: skip
        runs[schedule] = x, torch.stack(times)
    assert torch.equal(runs["linear"][0], runs["cosine"][0])
    lin, cos = runs["linear"][1], runs["cosine"][1]
    # the same alpha at every jump: 1 - t = 1 - sin(pi t' / 2), and the times fall
    torch.testing.assert_close(lin, torch.sin(torch.pi * cos / 2), rtol=0, atol=1e-12)
    assert bool((lin[1:] <= lin[:-1]).all()) and bool((lin > 0).all())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_first_hitting_jumps_at_the_order_statistics_of_the_unmasking_times(mix, schedule):
    # each token unmasks (reverse time) at tau with P(tau < s) = 1 - alpha(s): 1 - alpha(tau) is uniform,
    # and the j-th jump of L tokens is the j-th largest of L uniforms, mean (L - j) / (L + 1)
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    times: list[torch.Tensor] = []
    n = 4000
    sd.discrete.sample(
        mix.denoiser(proc), (n, mix.L), sampler="first_hitting", generator=torch.Generator().manual_seed(6),
        callback=lambda d: times.append(d["t"]),
    )  # fmt: skip
    u = 1 - proc.alpha(torch.stack(times))  # (L, n)
    k = torch.arange(mix.L, 0, -1, dtype=torch.float64)  # the j-th largest: Beta(L - j, j + 1)
    mean, var = k / (mix.L + 1), k * (mix.L + 1 - k) / ((mix.L + 1) ** 2 * (mix.L + 2))
    assert bool(((u.mean(1) - mean).abs() < 4 * torch.sqrt(var / n)).all()), (u.mean(1), mean)


def test_first_hitting_unmasks_a_uniformly_chosen_masked_position(mix):
    # the exact denoiser samples the law in any order, so only the positions show the choice
    x_T = torch.full((N, mix.L), mix.V)
    x_T[:, 1], x_T[:, 4] = 0, 2
    first: list[torch.Tensor] = []
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V))
    sd.discrete.sample(
        den, x_T, sampler="first_hitting", generator=torch.Generator().manual_seed(11),
        callback=lambda d: first.append(d["x"]) if d["i"] == 0 else None,
    )  # fmt: skip
    changed = first[0] != x_T
    assert bool((changed.sum(1) == 1).all())
    freq = changed.double().mean(0)  # 1/3 at the masked positions 0, 2, 3
    expected = torch.tensor([1 / 3, 0, 1 / 3, 1 / 3, 0], dtype=torch.float64)
    assert bool(((freq - expected).abs() < 4 * (2 / 9 / N) ** 0.5).all()), freq


@pytest.mark.parametrize("sampler", [sd.discrete.Ancestral(), sd.discrete.ReMDM(0.5)])
def test_the_last_step_unmasks_every_token_where_alpha_0_is_below_one(mix, sampler):
    # geometric: alpha(0) = exp(-1e-3); the last step takes alpha_s = 1, not alpha(0), which would leave a
    # token masked with probability about 1e-3 (about 10 of these 10,000) and remask some with ReMDM
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V, schedule="geometric"))
    for steps in (1, 2):
        x = sd.discrete.sample(den, (2000, mix.L), steps, sampler, generator=torch.Generator().manual_seed(0))
        assert bool((x != mix.V).all())


def test_first_hitting_fills_in_the_exact_conditional(mix):
    # positions 0 and 3 given: the rest is sampled from p(x | x^0 = 2, x^3 = 0); they stay
    x_T = torch.full((N, mix.L), mix.V)
    x_T[:, 0], x_T[:, 3] = 2, 0
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V))
    x, info = sd.discrete.sample(
        den, x_T, sampler="first_hitting", generator=torch.Generator().manual_seed(2), return_info=True
    )
    assert info.nfe == 3
    assert bool((x[:, 0] == 2).all() and (x[:, 3] == 0).all())
    p = mix.table()
    codes = torch.arange(len(p))
    given = (codes // mix.V**4 % mix.V == 2) & (codes // mix.V % mix.V == 0)
    cond = torch.where(given, p, 0.0) / p[given].sum()
    mean, sd_ = tv_floor(cond, N)
    assert _tv(mix, x, cond) < mean + 4 * sd_  # measured 0.0197 against 0.0181 +- 0.0032
    assert _tv(mix, x) > 0.5  # far from the unconditional law: 0.814


def test_ancestral_samples_its_exact_law_which_is_biased_at_few_steps(mix, floor):
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V))
    law = ancestral_law(mix, den.process, 2)
    x, info = sd.discrete.sample(
        den, (N, mix.L), 2, generator=torch.Generator().manual_seed(4), return_info=True
    )
    assert info.nfe == 2
    mean, sd_ = tv_floor(law, N)
    assert _tv(mix, x, law) < mean + 4 * sd_  # measured 0.0636 against its floor 0.0623 +- 0.0032
    assert _tv(mix, x) > floor[0] + 20 * floor[1]  # the law is 0.145 from the data's: measured 0.164


def test_ancestral_bias_is_first_order_in_the_step():
    # exact TV between the ancestral law and the data: 0.2775, 0.0751, 0.0192, 0.00484 at 1, 4, 16, 64
    # steps (linear schedule): tokens unmasked in one step are drawn independently
    mix = mixture()
    p = mix.table()
    proc = sd.discrete.MaskedProcess(mix.V)
    d = [0.5 * float((ancestral_law(mix, proc, n) - p).abs().sum()) for n in (1, 4, 16, 64)]
    torch.testing.assert_close(
        torch.tensor(d), torch.tensor([0.2775, 0.0751, 0.0192, 0.00484]), rtol=5e-3, atol=0
    )
    assert 3.9 < d[2] / d[3] < 4.0  # 3.97: the bias is about 0.31 / N


def test_ancestral_with_many_steps_samples_the_law(mix, floor):
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V, schedule="cosine"))
    x = sd.discrete.sample(den, (N, mix.L), 64, generator=torch.Generator().manual_seed(5))
    assert _tv(mix, x) < floor[0] + 4 * floor[1]  # measured 0.0611; the exact law is 0.0057 from the data


def test_remdm_sigma_is_capped_or_rescaled():
    # linear schedule, 4 steps: sigma_max = min(1, (1 - alpha_s) / alpha_t) = 1, 1, 0.5, 0 (alpha_s = 1 last)
    a_t = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    a_s = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    cap = sd.discrete.ReMDM(0.3, "cap").sigma(a_t, a_s)
    rescale = sd.discrete.ReMDM(0.3, "rescale").sigma(a_t, a_s)
    torch.testing.assert_close(
        cap, torch.tensor([0.3, 0.3, 0.3, 0.0], dtype=torch.float64), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(
        rescale, torch.tensor([0.3, 0.3, 0.15, 0.0], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_remdm_without_remasking_is_the_ancestral_sampler(mix):
    den = mix.denoiser(sd.discrete.MaskedProcess(mix.V, schedule="cosine"))
    runs = [
        sd.discrete.sample(den, (256, mix.L), 6, sampler, generator=torch.Generator().manual_seed(9))
        for sampler in ("ancestral", sd.discrete.ReMDM(eta=0.0))
    ]
    assert torch.equal(*runs)


def test_remdm_samples_its_exact_law_and_keeps_the_given_tokens():
    # L = 3, V = 2 (8 sequences), 3 steps, the largest remasking (sigma = sigma_max): the law is 0.0467 from
    # the ancestral sampler's; the given tokens of an infilling run are never masked again
    small = mixture(L=3, V=2)
    proc = sd.discrete.MaskedProcess(small.V)
    law = ancestral_law(small, proc, 3, eta=1.0, strategy="rescale")
    x, info = sd.discrete.sample(
        small.denoiser(proc), (N, small.L), 3, sd.discrete.ReMDM(1.0, "rescale"),
        generator=torch.Generator().manual_seed(8), return_info=True,
    )  # fmt: skip
    assert info.nfe == 3
    mean, sd_ = tv_floor(law, N)
    assert _tv(small, x, law) < mean + 4 * sd_  # measured 0.0067 against 0.0117 +- 0.0036
    assert _tv(small, x, ancestral_law(small, proc, 3)) > 0.03  # measured 0.0458
    x_T = torch.tensor([[small.V, 1, small.V]]).repeat(500, 1)
    states = [x_T]
    x = sd.discrete.sample(
        small.denoiser(proc), x_T, 8, sd.discrete.ReMDM(1.0, "rescale"),
        generator=torch.Generator().manual_seed(0), callback=lambda d: states.append(d["x"]),
    )  # fmt: skip
    assert all(bool((s[:, 1] == 1).all()) for s in states)
    remasked = sum(int(((a != small.V) & (b == small.V)).sum()) for a, b in itertools.pairwise(states))
    assert remasked > 100  # the other tokens were masked again: 1517 times in 8 steps of 500 rows


@pytest.mark.parametrize(
    "sampler",
    [
        sd.discrete.Ancestral(),
        sd.discrete.ReMDM(0.3, "cap"),
        sd.discrete.ReMDM(0.8, "rescale"),
        sd.discrete.ReMDM(0.5, "loop", t_on=0.7, t_off=0.3),
    ],
)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_step_keeps_the_process_marginal(mix, sampler, schedule):
    # a token is unmasked at s with probability alpha(s), remasking or not: ReMDM's masked tokens unmask
    # more often, (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), to make up for the remasked ones; with
    # "loop" alpha is that of the process time tau (held at alpha(t_on) in the window)
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    n, steps, seen = 2000, 8, []
    sd.discrete.sample(
        mix.denoiser(proc), (n, mix.L), steps, sampler, generator=torch.Generator().manual_seed(12),
        callback=lambda d: seen.append((d["x"] != mix.V).double().mean()),
    )  # fmt: skip
    tau = getattr(sampler, "time", float)
    alpha = proc.alpha(torch.tensor([tau(1 - (i + 1) / steps) for i in range(steps)], dtype=torch.float64))
    se = torch.sqrt(alpha * (1 - alpha) / (n * mix.L))
    assert bool(((torch.stack(seen) - alpha).abs() <= 4 * se).all()), (torch.stack(seen), alpha)


def test_remdm_costs_an_exact_denoiser_accuracy():
    # remasking corrects an imperfect denoiser's mistakes; with the exact one it only adds tokens drawn
    # together, so at equal steps it is further from the data than ancestral (0.0192 / 0.0048 at 16 / 64)
    mix = mixture()
    p = mix.table()
    proc = sd.discrete.MaskedProcess(mix.V)
    d = [0.5 * float((ancestral_law(mix, proc, n, 0.1, "cap") - p).abs().sum()) for n in (16, 64)]
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.02448, 0.0135]), rtol=5e-3, atol=0)


def test_remdm_loop_samples_its_exact_law():
    # L = 3, V = 2, 8 linear steps, window [0.05, 0.55]: 4 ancestral steps to t = 0.55 (alpha 0.45), 3 loop
    # steps held there (sigma = min(eta, 0.55 / 0.45) = 1: every decoded token remasked, a masked one
    # unmasked with probability 0.45 / 0.55), the last step decodes the rest; the law is 0.0331 from eta = 0's
    small = mixture(L=3, V=2)
    proc = sd.discrete.MaskedProcess(small.V)
    law = ancestral_law(small, proc, 8, eta=1.0, strategy="loop")
    times: list[torch.Tensor] = []
    x, info = sd.discrete.sample(
        small.denoiser(proc), (4 * N, small.L), 8, sd.discrete.ReMDM(1.0, "loop"), return_info=True,
        generator=torch.Generator().manual_seed(8), callback=lambda d: times.append(d["t"][0]),
    )  # fmt: skip
    assert info.nfe == 8
    # the process times: tau(u) = u above t_on, t_on in the window, u t_on / t_off below t_off
    torch.testing.assert_close(
        torch.stack(times),
        torch.tensor([0.875, 0.75, 0.625, 0.55, 0.55, 0.55, 0.55, 0.0], dtype=torch.float64),
    )
    mean, sd_ = tv_floor(law, 4 * N)
    assert _tv(small, x, law) < mean + 4 * sd_  # measured 0.0059 against 0.0060 +- 0.0013
    assert _tv(small, x, ancestral_law(small, proc, 8, strategy="loop")) > 0.02  # measured 0.0360


def test_remdm_loop_without_remasking_holds_the_state_in_its_window(mix):
    # eta = 0: the loop steps unmask nothing and remask nothing (they still call the network), so the law
    # is the ancestral sampler's on the other steps read through tau, not the plain ancestral sampler's
    states = []
    proc = sd.discrete.MaskedProcess(mix.V)
    x = sd.discrete.sample(
        mix.denoiser(proc), (256, mix.L), 8, sd.discrete.ReMDM(0.0, "loop"),
        generator=torch.Generator().manual_seed(4), callback=lambda d: states.append(d["x"]),
    )  # fmt: skip
    assert all(torch.equal(states[3], s) for s in states[4:7])  # steps 4..6 of 8 are the loop's
    assert not torch.equal(states[2], states[3]) and not bool((x == mix.V).any())
    p = mix.table()
    d = [
        0.5 * float((q - p).abs().sum())
        for q in (ancestral_law(mix, proc, 8, 0.0, "loop"), ancestral_law(mix, proc, 8))
    ]
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.09564, 0.03818]), rtol=5e-3, atol=0)


def test_remdm_loop_costs_an_exact_denoiser_accuracy_at_equal_nfe():
    # exact laws' TV to the data (linear schedule, the paper's t_on = 0.55, t_off = 0.05), NFE = steps:
    #   steps              8       16      32      64
    #   ancestral          0.0382  0.0193  0.0097  0.0048
    #   remdm cap 0.02     0.0382  0.0194  0.0102  0.0059
    #   loop eta = 0       0.0956  0.0876  0.0473  0.0268
    #   loop eta = 0.02    0.0939  0.0857  0.0457  0.0258
    #   loop eta = 0.1     0.0897  0.0836  0.0463  0.0279
    #   loop eta = 0.5     0.0986  0.0986  0.0627  0.0451
    # The loop steps (eta = 0.02 against eta = 0: the same other steps) bring the law 2-4 % closer, but the
    # window takes half the grid and the 5 % after it decodes the 55 % of tokens still masked at once, so
    # at equal NFE loop is 2.5-5 times further from the data than ancestral. A narrow window late loses less
    # but still loses: t_on = 0.2, t_off = 0.1, eta = 0.02 at 16 / 64 steps 0.0206 / 0.0052.
    mix = mixture()
    p = mix.table()
    proc = sd.discrete.MaskedProcess(mix.V)
    d = {
        (name, n): 0.5 * float((ancestral_law(mix, proc, n, eta, strategy) - p).abs().sum())
        for name, eta, strategy in (("ancestral", 0.0, "cap"), ("off", 0.0, "loop"), ("loop", 0.02, "loop"))
        for n in (16, 64)
    }
    torch.testing.assert_close(
        torch.tensor(list(d.values())),
        torch.tensor([0.01925, 0.00484, 0.08761, 0.02684, 0.08569, 0.02577]),
        rtol=5e-3,
        atol=0,
    )
    assert all(d["loop", n] < d["off", n] and d["loop", n] > 2.5 * d["ancestral", n] for n in (16, 64))
