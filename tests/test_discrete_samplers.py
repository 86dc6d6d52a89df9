"""Masked-diffusion samplers against the exact law of a mixture of product-of-categoricals
(``V = 3``, ``L = 5``: 243 sequences). ``first_hitting`` with one step per token samples it exactly, the
ancestral sampler's output law is computed exactly by matrix propagation (tests/discrete_reference.py),
and the sampled distances are compared with those of exact samples of the same size."""

from __future__ import annotations

import itertools
import math

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
        sd.discrete.ReMDM(0.5, "loop", t_on=0.7, t_off=0.3, alpha_on=0.6),
    ],
)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_step_keeps_the_process_marginal(mix, sampler, schedule):
    # a token is unmasked at s with probability alpha(s), remasking or not: ReMDM's masked tokens unmask
    # more often, (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t), to make up for the remasked ones; with
    # "loop" alpha is that of the process time tau (held at alpha_on in the window)
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    n, steps, seen = 2000, 8, []
    sd.discrete.sample(
        mix.denoiser(proc), (n, mix.L), steps, sampler, generator=torch.Generator().manual_seed(12),
        callback=lambda d: seen.append((d["x"] != mix.V).double().mean()),
    )  # fmt: skip
    tau = getattr(sampler, "time", lambda u, _: u)
    alpha = proc.alpha(
        torch.tensor([tau(1 - (i + 1) / steps, proc) for i in range(steps)], dtype=torch.float64)
    )
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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_remdm_loop_samples_its_exact_law(schedule):
    # L = 3, V = 2, 8 steps, window [0.05, 0.55], alpha_on = 0.5: 3 steps take alpha from alpha(1) to 0.5, 3
    # loop steps hold it there (sigma = min(1, 0.5 / 0.5) = 1: every decoded token remasked, every masked one
    # unmasked given them), the last decodes the rest
    small = mixture(L=3, V=2)
    proc = sd.discrete.MaskedProcess(small.V, schedule=schedule)
    law = ancestral_law(small, proc, 8, eta=1.0, strategy="loop", alpha_on=0.5)
    times: list[torch.Tensor] = []
    x, info = sd.discrete.sample(
        small.denoiser(proc), (4 * N, small.L), 8, sd.discrete.ReMDM(1.0, "loop", alpha_on=0.5),
        return_info=True, generator=torch.Generator().manual_seed(8),
        callback=lambda d: times.append(d["t"][0]),
    )  # fmt: skip
    assert info.nfe == 8
    # the process times: T = t_of_alpha(0.5) (0.5 linear), T + (u - t_on) (1 - T) / (1 - t_on) above t_on, T
    # in the window, u T / t_off below t_off (only the last step's 0 on this grid)
    hold = float(proc.t_of_alpha(torch.tensor(0.5)))
    phase1 = [hold + (u - 0.55) * (1 - hold) / 0.45 for u in (0.875, 0.75, 0.625)]
    torch.testing.assert_close(
        torch.stack(times), torch.tensor([*phase1, *[hold] * 4, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(proc.alpha(torch.stack(times)[3]), torch.tensor(0.5, dtype=torch.float64))
    if schedule == "linear":
        torch.testing.assert_close(
            torch.tensor(phase1, dtype=torch.float64),
            torch.tensor([31 / 36, 13 / 18, 7 / 12], dtype=torch.float64),
        )
    mean, sd_ = tv_floor(law, 4 * N)
    assert _tv(small, x, law) < mean + 4 * sd_  # measured 0.0026 / 0.0052 against 0.0059 +- 0.0012
    assert _tv(small, x, ancestral_law(small, proc, 8, strategy="loop", alpha_on=0.5)) > 0.02  # 0.042 / 0.041


@pytest.mark.parametrize(("eta", "sigma"), [(0.3, 0.3), (0.9, 2 / 3)])
def test_remdm_loop_remasks_min_eta_sigma_max_in_its_window(mix, eta, sigma):
    # alpha_on = 0.6: sigma_max = (1 - 0.6) / 0.6 = 2/3, so a loop step remasks a decoded token with
    # probability min(eta, 2/3) and unmasks a masked one with sigma 0.6 / 0.4; 8 steps, the paper's window
    # [0.05, 0.55]: steps 4-6 are the loop's, step 3 (from 0.625) is not. The exact-law tests take eta = 1
    # (sigma = sigma_max) or 0, and the marginal test holds for any sigma: a loop step of eta * sigma_max
    # (0.2 / 0.6 here) passed them all
    n, states = 4000, []
    sd.discrete.sample(
        mix.denoiser(sd.discrete.MaskedProcess(mix.V)), (n, mix.L), 8,
        sd.discrete.ReMDM(eta, "loop", alpha_on=0.6), generator=torch.Generator().manual_seed(13),
        callback=lambda d: states.append(d["x"]),
    )  # fmt: skip
    for i in (3, 4, 5, 6):
        before, after = states[i - 1] != mix.V, states[i] != mix.V
        remasked = float((before & ~after).sum() / before.sum())
        unmasked = float((~before & after).sum() / (~before).sum())
        want = (sigma, sigma * 0.6 / 0.4) if i > 3 else (0.0, None)
        assert abs(remasked - want[0]) < 4 * math.sqrt(want[0] * (1 - want[0]) / float(before.sum())) + 1e-12
        if want[1] is not None:
            se = math.sqrt(want[1] * (1 - want[1]) / float((~before).sum()))
            assert abs(unmasked - want[1]) < 4 * se, (i, unmasked, want)


@pytest.mark.parametrize(("schedule", "alpha_on"), [("linear", 2 / 3), ("cosine", 0.5)])
def test_remdm_loop_without_remasking_is_ancestral_on_the_other_steps(mix, schedule, alpha_on):
    # eta = 0: the loop steps unmask nothing and remask nothing (they still call the network), so the law is
    # the ancestral sampler's on the other steps' process times. 8 steps, window [0.25, 0.5] (2 loop steps),
    # alpha_on at the process time T = 1/3: phase 1's 4 steps cover [1/3, 1] and phase 3's 2 steps [0, 1/3],
    # the uniform grid of 6 steps, so the law is exactly 6-step ancestral's (TV 0.0506 / 0.0592 to the data)
    states = []
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    loop = sd.discrete.ReMDM(0.0, "loop", t_on=0.5, t_off=0.25, alpha_on=alpha_on)
    x = sd.discrete.sample(
        mix.denoiser(proc), (N, mix.L), 8, loop,
        generator=torch.Generator().manual_seed(4), callback=lambda d: states.append(d["x"]),
    )  # fmt: skip
    assert all(torch.equal(states[3], s) for s in states[4:6])  # steps 4 and 5 of 8 are the loop's
    assert not torch.equal(states[2], states[3]) and not bool((x == mix.V).any())
    six = ancestral_law(mix, proc, 6)
    law = ancestral_law(mix, proc, 8, 0.0, "loop", t_on=0.5, t_off=0.25, alpha_on=alpha_on)
    torch.testing.assert_close(law, six, rtol=0, atol=1e-12)
    mean, sd_ = tv_floor(six, N)
    assert _tv(mix, x, six) < mean + 4 * sd_  # measured 0.0624 / 0.0576 against 0.060 +- 0.003


def test_remdm_loop_costs_an_exact_denoiser_accuracy_at_equal_nfe():
    # exact laws' TV to the data (linear schedule, the paper's t_on = 0.55, t_off = 0.05), NFE = steps:
    #   steps                    8       16      32      64
    #   ancestral                0.0382  0.0192  0.0097  0.0048
    #   remdm cap 0.02           0.0382  0.0194  0.0102  0.0059
    #   loop alpha_on = 0.9:
    #     eta = 0                0.0684  0.0370  0.0188  0.0096
    #     eta = 0.02             0.0625  0.0305  0.0129  0.0054
    #     eta = 0.1              0.0473  0.0214  0.0136  0.0124
    #     eta = 0.5 (sigma 1/9)  0.0460  0.0215  0.0147  0.0138
    #   loop alpha_on = 0.8:
    #     eta = 0.02             0.0580  0.0320  0.0144  0.0067
    #     eta = 0.1              0.0454  0.0249  0.0154  0.0126
    #     eta = 0.5              0.0424  0.0353  0.0305  0.0283
    #   loop alpha_on = 0.95:
    #     eta = 0.02             0.0668  0.0317  0.0133  0.0054
    #     eta = 0.1, 0.5 (1/19)  0.0585  0.0248  0.0106  0.0071
    #   loop alpha_on = 0.45 (alpha(t_on), what loop held before), eta = 0.02: 0.0857 / 0.0258 at 16 / 64
    # The loop steps (eta > 0 against eta = 0, the same other steps) now help: 18 % / 44 % closer at 16 / 64
    # steps with eta = 0.02, 42 % at 16 with eta = 0.1. But at equal NFE loop still loses to ancestral at
    # every N: the window takes half the grid, so the decoding runs on half the steps; the best of these
    # settings is 1.1 times ancestral's distance (0.0424 / 0.0214 / 0.0106 / 0.0054 at 8 / 16 / 32 / 64),
    # against 2.5-5 times with alpha held at 0.45. Larger eta stalls with N (each loop step re-draws a
    # fixed fraction of the tokens, each drawn with some of its neighbours masked).
    mix = mixture()
    p = mix.table()
    proc = sd.discrete.MaskedProcess(mix.V)
    d = {
        (name, n): 0.5 * float((ancestral_law(mix, proc, n, eta, strategy, alpha_on=a) - p).abs().sum())
        for name, eta, strategy, a in (
            ("ancestral", 0.0, "cap", 0.9),
            ("off", 0.0, "loop", 0.9),
            ("loop", 0.02, "loop", 0.9),
            ("old", 0.02, "loop", 0.45),
        )
        for n in (16, 64)
    }
    torch.testing.assert_close(
        torch.tensor(list(d.values())),
        torch.tensor([0.01925, 0.00484, 0.03705, 0.00959, 0.03046, 0.00543, 0.08569, 0.02577]),
        rtol=5e-3,
        atol=0,
    )
    assert all(d["loop", n] < 0.85 * d["off", n] for n in (16, 64))  # the loop steps help
    assert all(d["ancestral", n] < d["loop", n] < 1.6 * d["ancestral", n] for n in (16, 64))  # still loses
    assert all(d["old", n] > 2.5 * d["loop", n] for n in (16, 64))  # alpha_on near 1, not alpha(t_on)
    # under the cosine schedule (ancestral 0.0448 / 0.0227 / 0.0114 / 0.0057 at 8 / 16 / 32 / 64) the best
    # loop is within 1-5 % from 16 steps (0.0229 / 0.0114 / 0.0060) and wins at 8 only: alpha_on = 0.8,
    # eta = 0.5 0.0436
    cosine = sd.discrete.MaskedProcess(mix.V, schedule="cosine")
    loop, plain = (
        0.5 * float((ancestral_law(mix, cosine, 8, **kw) - p).abs().sum())
        for kw in ({"eta": 0.5, "strategy": "loop", "alpha_on": 0.8}, {})
    )
    torch.testing.assert_close(
        torch.tensor([loop, plain]), torch.tensor([0.04364, 0.04483]), rtol=2e-3, atol=0
    )
    assert loop < plain


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear"])
def test_remdm_hold_time_is_float64_exact(schedule):
    # alpha_on = 0.9 went through a float32 tensor (0.89999998): the held time was off by ~3e-8
    proc = sd.discrete.MaskedProcess(vocab_size=3, schedule=schedule)
    hold = sd.discrete.ReMDM(strategy="loop", alpha_on=0.9).hold_time(proc)
    assert abs(float(proc.alpha(torch.tensor(hold, dtype=torch.float64))) - 0.9) < 1e-14
