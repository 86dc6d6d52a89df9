"""Uniform-noise discrete diffusion: the process, the exact oracle denoiser and the ancestral sampler, against
brute-force enumeration of every sequence and the exact law of the sampler propagated over all states."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers.base import NonFiniteError

from .discrete_reference import (
    brute_posterior,
    kernel,
    mixture,
    sequences,
    tv,
    tv_floor,
    uniform_ancestral_law,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def mix4() -> sd.toy.CategoricalMixture:
    return mixture(L=4, V=3, K=3)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear", "geometric"])
def test_the_process_shares_the_masked_schedules(schedule):
    t = torch.linspace(0, 1, 11, dtype=F64)
    u, m = sd.discrete.UniformProcess(3, schedule=schedule), sd.discrete.MaskedProcess(3, schedule=schedule)
    torch.testing.assert_close(u.alpha(t), m.alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(u.t_of_alpha(u.alpha(t)), t, rtol=0, atol=1e-9)
    assert repr(u).startswith(f"UniformProcess(vocab_size=3, schedule={schedule!r}")


def test_the_law_of_x_t_is_the_closed_form(mix4):
    proc = sd.discrete.UniformProcess(3)
    X = sequences(4, 3)
    for t in (0.0, 0.3, 0.8, 1.0):
        Q = kernel(1 - t, 3)
        expected = torch.stack([(mix4.table() * Q[row[None, :], X].prod(-1)).sum() for row in X])
        torch.testing.assert_close(mix4.noised_log_prob(X, proc, t).exp(), expected, rtol=1e-12, atol=0)
    # samples of the process: at the floor of exact samples of that law (n = 8000)
    x0 = mix4.sample(8000, torch.Generator().manual_seed(1))
    x_t = proc.noise(x0, 0.5, torch.Generator().manual_seed(2))
    law = mix4.noised_log_prob(X, proc, 0.5).exp()
    floor, sd_floor = tv_floor(law, 8000)
    assert tv(mix4.index(x_t), law) < floor + 4 * sd_floor
    # one time per row: row 0 untouched at t = 0, the other uniform at t = 1 whatever x0
    x = proc.noise(torch.zeros(2, 2000, dtype=torch.long), torch.tensor([0.0, 1.0]), torch.Generator())
    assert bool((x[0] == 0).all())
    assert abs(float((x[1] == 0).double().mean()) - 1 / 3) < 0.04


@pytest.mark.parametrize("y", [None, 1])
def test_the_exact_denoiser_is_the_enumerated_posterior(y):
    mix = mixture(L=3, V=3, K=2, seed=3)
    proc = sd.discrete.UniformProcess(3)
    den = mix.denoiser(proc)
    assert isinstance(den, sd.discrete.UniformDenoiser)
    x_t = sequences(3, 3)
    t = torch.linspace(0, 1, len(x_t), dtype=F64)  # one time per row, t = 0 and t = 1 included
    got = den.log_probs(x_t, t, **({} if y is None else {"y": y})).exp()
    target = mix if y is None else mix.component(y)
    expected = torch.stack(
        [brute_posterior(target, x_t[n : n + 1], 1 - float(t[n]))[0] for n in range(len(x_t))]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def test_the_exact_denoiser_at_t_0_of_a_mixture_with_impossible_tokens_is_x_t():
    """At ``t = 0`` (``alpha = 1``) ``x_0 = x_t``, also where a component gives a token of ``x_t``
    probability 0 (it was NaN there: ``0 / 0`` in that component's posterior, whose responsibility is 0), and
    the enumerated posterior at ``t = 0.5``."""
    probs = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0]], [[0, 1.0, 0], [0.2, 0.3, 0.5]]], dtype=F64)
    mix = sd.toy.CategoricalMixture(torch.tensor([0.4, 0.6], dtype=F64), probs)
    den = mix.denoiser(sd.discrete.UniformProcess(3))
    x_t = torch.tensor([[0, 1], [1, 2], [0, 0]])
    got = den.log_probs(x_t, torch.tensor([0.0, 0.0, 0.5], dtype=F64)).exp()
    torch.testing.assert_close(got[:2], torch.nn.functional.one_hot(x_t[:2], 3).to(F64), rtol=0, atol=0)
    torch.testing.assert_close(got[2], brute_posterior(mix, x_t[2:], 0.5)[0], rtol=0, atol=1e-14)


def test_the_exact_denoiser_at_t_0_refuses_a_state_of_probability_zero():
    """At ``t = 0`` a state impossible under every component (token 2 at position 0), or under the label's
    component, has no posterior: a ValueError naming x_t (was: NaN, and logits all -inf at a position given
    the label); at ``t = 0.5`` the same state is possible and its posterior the enumerated one."""
    probs = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0]], [[0, 1.0, 0], [0.2, 0.3, 0.5]]], dtype=F64)
    mix = sd.toy.CategoricalMixture(torch.tensor([0.4, 0.6], dtype=F64), probs)
    den = mix.denoiser(sd.discrete.UniformProcess(3))
    x_t = torch.tensor([[1, 2], [2, 0]])
    message = r"uniform_log_probs: x_t row {} has probability zero: at alpha = 1 \(t = 0\) its tokens are"
    with pytest.raises(ValueError, match=message.format(1)):
        den.log_probs(x_t, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match=message.format(0)):  # impossible under component 0
        den.log_probs(x_t, torch.tensor([0.0, 0.5], dtype=F64), y=torch.tensor([0, -1]))
    got = den.log_probs(x_t, torch.tensor([0.0, 0.5], dtype=F64), y=torch.tensor([1, -1])).exp()
    torch.testing.assert_close(got[0], torch.nn.functional.one_hot(x_t[0], 3).to(F64), rtol=0, atol=0)
    torch.testing.assert_close(got[1], brute_posterior(mix, x_t[1:], 0.5)[0], rtol=0, atol=1e-14)


def test_the_reverse_step_is_bayes_rule_on_the_kernels():
    proc = sd.discrete.UniformProcess(4, schedule="cosine")
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(4, (6, 5), generator=g)
    log_p0 = torch.log_softmax(3 * torch.randn(6, 5, 4, generator=g, dtype=F64), -1)
    t = torch.tensor([1.0, 0.9, 0.6, 0.5, 0.2, 0.05], dtype=F64)
    s = t - torch.tensor([0.1, 0.3, 0.6, 0.01, 0.2, 0.05], dtype=F64)
    a_t, a_s = proc.alpha(t), proc.alpha(s)
    a_s[-1] = 1.0  # the last step's
    got = proc.reverse_log_probs(x_t, log_p0, a_t, a_s).exp()
    for b in range(6):
        Q_t, Q_s, Q_ts = kernel(float(a_t[b]), 4), kernel(float(a_s[b]), 4), kernel(float(a_t[b] / a_s[b]), 4)
        for i in range(5):
            j = int(x_t[b, i])
            expected = sum(
                log_p0[b, i, v].exp() * Q_ts[j, :] * Q_s[:, v] / Q_t[j, v] for v in range(4)
            )  # q(x_s | x_t = j, x_0 = v) averaged over p(x_0 | x_t)
            torch.testing.assert_close(got[b, i], expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(got[-1], log_p0[-1].exp(), rtol=0, atol=1e-14)  # alpha_s = 1: x_0 itself


def test_ancestral_sampling_reaches_the_data_law(mix4):
    """The exact law of the sampler (propagated over all 81 sequences) nears the data as 1/N; its samples
    match that law, and at 64 steps the data, within the floor of exact samples (n = 8000)."""
    proc = sd.discrete.UniformProcess(3)
    p = mix4.table()
    dist = {n: 0.5 * float((uniform_ancestral_law(mix4, proc, n) - p).abs().sum()) for n in (1, 4, 16, 64)}
    # measured 0.2513 / 0.0823 / 0.0204 / 0.0050 (about 0.32 / N): each 4x the steps 3.1-4.1 times closer
    assert dist[1] > dist[4] > dist[16] > dist[64]
    for a, b in ((1, 4), (4, 16), (16, 64)):
        assert 2.5 < dist[a] / dist[b] < 4.5
    assert dist[64] < 0.008
    den = mix4.denoiser(proc)
    n = 8000
    floor, sd_floor = tv_floor(p, n)
    for steps in (2, 64):
        x, info = sd.discrete.sample(
            den, (n, 4), steps=steps, generator=torch.Generator().manual_seed(steps), return_info=True
        )
        assert info.nfe == steps and x.dtype == torch.long
        law = uniform_ancestral_law(mix4, proc, steps)
        own_floor, own_sd = tv_floor(law, n)
        assert tv(mix4.index(x), law) < own_floor + 4 * own_sd
        if steps == 64:
            assert mix4.total_variation(x) < floor + 4 * sd_floor


def test_runs_are_reproducible_per_seed_and_per_row(mix4):
    den = mix4.denoiser(sd.discrete.UniformProcess(3, schedule="loglinear"))
    gens = [torch.Generator().manual_seed(k) for k in range(5)]
    a = sd.discrete.sample(den, (5, 4), steps=6, generator=gens)
    b = sd.discrete.sample(
        den, (3, 4), steps=6, generator=[torch.Generator().manual_seed(k) for k in range(3)]
    )
    assert torch.equal(a[:3], b)
    c = sd.discrete.sample(den, (5, 4), steps=6, generator=torch.Generator().manual_seed(9))
    d = sd.discrete.sample(den, (5, 4), steps=6, generator=torch.Generator().manual_seed(9))
    assert torch.equal(c, d)
    # a tensor x_T is taken as the noisy tokens at t = 1 (left as it is)
    x_T = torch.zeros(5, 4, dtype=torch.int32)
    out = sd.discrete.sample(den, x_T, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.int32 and bool((x_T == 0).all())


def test_bad_input_is_refused(mix4):
    proc = sd.discrete.UniformProcess(3)
    den = mix4.denoiser(proc)
    with pytest.raises(ValueError, match=r"UniformProcess: vocab_size must be an integer >= 2, got 1"):
        sd.discrete.UniformProcess(1)
    with pytest.raises(ValueError, match=r"UniformProcess: schedule must be one of"):
        sd.discrete.UniformProcess(3, schedule="sqrt")
    with pytest.raises(ValueError, match=r"UniformProcess.noise: t must be a time in \[0, 1\]"):
        proc.noise(torch.zeros(2, 4, dtype=torch.long), 1.5)
    with pytest.raises(
        ValueError,
        match=r"UniformDenoiser: process must be a steerdiff.discrete.UniformProcess, got MaskedProcess",
    ):
        sd.discrete.UniformDenoiser(lambda x, t: x, sd.discrete.MaskedProcess(3))
    with pytest.raises(
        ValueError,
        match=r"MaskedDenoiser: process must be a steerdiff.discrete.MaskedProcess, got UniformProcess",
    ):
        sd.discrete.MaskedDenoiser(lambda x, t: x, proc)
    with pytest.raises(
        ValueError, match=r"a UniformDenoiser takes sampler in \['ancestral'\] .*got 'first_hitting'"
    ):
        sd.discrete.sample(den, (2, 4), sampler="first_hitting")
    with pytest.raises(ValueError, match=r"a UniformDenoiser takes sampler in \['ancestral'\] .*got 'remdm'"):
        sd.discrete.sample(den, (2, 4), steps=4, sampler="remdm")
    with pytest.raises(
        ValueError, match=r"discrete.sample: x_T must hold ids in \[0, 2\], got 3 at \[0, 1\]"
    ):
        sd.discrete.sample(den, torch.tensor([[0, 3, 0, 0]]), steps=2)
    with pytest.raises(ValueError, match=r"discrete.sample: steps must be an integer >= 1"):
        sd.discrete.sample(den, (2, 4), steps=0)
    with pytest.raises(
        ValueError, match=r"CategoricalMixture.denoiser: .* or a UniformProcess of vocab_size 3"
    ):
        mix4.denoiser(sd.discrete.UniformProcess(4))
    with pytest.raises(
        ValueError, match=r"fk_steering: den must be a steerdiff.discrete.MaskedDenoiser, got UniformDenoiser"
    ):
        sd.discrete.fk_steering(den, lambda x: x.sum(-1).double(), 1.0, shape=(2, 4), particles=2, steps=2)
    wrong = sd.discrete.UniformDenoiser(lambda x, t: torch.zeros(len(x), 4, 2), proc)
    with pytest.raises(
        ValueError, match=r"UniformDenoiser: net must return floating logits of shape \(2, 4, 3\)"
    ):
        sd.discrete.sample(wrong, (2, 4), steps=2)
    nan = sd.discrete.UniformDenoiser(lambda x, t: torch.full((len(x), 4, 3), math.nan), proc)
    with pytest.raises(NonFiniteError, match=r"at step 0 .*UniformDenoiser: the network returned NaN"):
        sd.discrete.sample(nan, (2, 4), steps=2)
    empty = sd.discrete.UniformDenoiser(lambda x, t: torch.full((len(x), 4, 3), -math.inf), proc)
    with pytest.raises(NonFiniteError, match=r"UniformDenoiser: at a position the network's logits are -inf"):
        sd.discrete.sample(empty, (2, 4), steps=2)


def test_the_readme_snippet_runs_and_samples_the_data_and_the_posterior():
    from ._docs import block

    mix = mixture(L=5, V=3, K=3)
    scope = {"sd": sd, "torch": torch, "mix": mix, "V": 3, "L": 5, "print": lambda *a: None}
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the snippet's g
        exec(compile(block("## Uniform-noise discrete diffusion"), "docs/discrete.md", "exec"), scope)
    floor, sd_floor = tv_floor(mix.table(), 4000)
    assert mix.total_variation(scope["xu"]) < floor + 4 * sd_floor
    # SGDD at NFE 200 on 243 sequences: 0.082 from the posterior (floor 0.070 ± 0.004), the prior 0.367
    target = mix.tilt(scope["g"], 3.0)
    assert target.total_variation(scope["xs"]) < 0.25 * 0.5 * float(
        (mix.table() - target.table()).abs().sum()
    )
