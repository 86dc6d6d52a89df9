"""The masked process and the exact oracle of masked diffusion, against closed forms and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd

from .discrete_reference import mixture, states, tv, tv_floor

F64 = torch.float64


@pytest.mark.parametrize(
    ("schedule", "alpha_1"),
    [("linear", 0.0), ("cosine", 0.0), ("loglinear", 1e-3), ("geometric", math.exp(-20))],
)
def test_schedules_fall_from_one_and_invert(schedule, alpha_1):
    proc = sd.discrete.MaskedProcess(4, schedule=schedule)
    t = torch.linspace(0, 1, 101, dtype=F64)
    a = proc.alpha(t)
    assert abs(float(a[0]) - (math.exp(-1e-3) if schedule == "geometric" else 1.0)) < 1e-15
    assert abs(float(a[-1]) - alpha_1) < 1e-15
    assert bool((a[1:] < a[:-1]).all())
    torch.testing.assert_close(proc.t_of_alpha(a), t, rtol=0, atol=1e-9)
    expected = {
        "linear": 1 - t,
        "cosine": 1 - torch.sin(math.pi * t / 2),  # MaskGIT's / MD4's
        "loglinear": torch.exp(torch.log1p(-(1 - 1e-3) * t)),  # MDLM: exp(-total noise)
        "geometric": torch.exp(-(1e-3 ** (1 - t)) * 20**t),
    }[schedule]
    torch.testing.assert_close(a, expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(proc.total_noise(t[:-1]), -torch.log(a[:-1]), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_law_of_x_t_is_the_closed_form(schedule):
    mix = mixture(L=3)  # x_t over {0, 1, 2, mask}^3: 64 sequences
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    t = 0.4
    every = states(mix.L, mix.V)
    for at in (0.0, 1.0, t):  # alpha = 1: the clean law; alpha = 0: all masked
        q = mix.noised_log_prob(every, proc, at).exp()
        assert abs(float(q.sum()) - 1) < 1e-12
    assert abs(float(mix.noised_log_prob(torch.full((1, mix.L), mix.V), proc, 1.0))) < 1e-15
    n = 20000
    x_t = proc.noise(mix.sample(n, torch.Generator().manual_seed(0)), t, torch.Generator().manual_seed(1))
    codes = (x_t * (mix.V + 1) ** torch.arange(mix.L - 1, -1, -1)).sum(-1)
    mean, sd_ = tv_floor(q, n)
    # measured: linear 0.0200 / cosine 0.0155, floors 0.0201 / 0.0182 (sd 0.002 / 0.003); from t = 0.5's
    # law 0.145 / 0.161
    assert tv(codes, q) < mean + 4 * sd_
    masked = (x_t == mix.V).double().mean()
    alpha = float(proc.alpha(torch.tensor(t)))
    assert abs(float(masked) - (1 - alpha)) < 4 * math.sqrt(alpha * (1 - alpha) / (n * mix.L))


def test_noise_takes_one_time_per_row():
    proc = sd.discrete.MaskedProcess(5)
    x0 = torch.zeros(3, 4000, dtype=torch.long)
    x_t = proc.noise(x0, torch.tensor([0.0, 0.5, 1.0]), torch.Generator().manual_seed(0))
    assert bool((x_t[0] == 0).all()) and bool((x_t[2] == 5).all())
    assert abs(float((x_t[1] == 5).double().mean()) - 0.5) < 4 * math.sqrt(0.25 / 4000)
    assert bool((proc.noise(x0, torch.tensor([1.0])) == 5).all())  # one time for every row


def test_the_exact_denoiser_is_the_monte_carlo_posterior():
    mix = mixture()
    m = mix.V
    x_t = torch.tensor([[0, m, 2, m, m]])
    exact = mix.conditional_log_probs(x_t, m).exp()[0]  # (L, V)
    x0 = mix.sample(200_000, torch.Generator().manual_seed(7))
    kept = x0[(x0[:, 0] == 0) & (x0[:, 2] == 2)]  # masking ignores the values: condition by rejection
    assert len(kept) > 5000
    for j in (1, 3, 4):
        freq = torch.bincount(kept[:, j], minlength=mix.V).double() / len(kept)
        se = torch.sqrt(exact[j] * (1 - exact[j]) / len(kept))
        assert bool(((freq - exact[j]).abs() < 4 * se).all()), (j, freq, exact[j])
    # all masked: the marginals sum_k w_k P_k
    marginal = torch.einsum("k,klv->lv", mix.weights, mix.probs)
    torch.testing.assert_close(mix.conditional_log_probs(torch.full((1, mix.L), m), m).exp()[0], marginal)


@pytest.mark.parametrize("vocab_size", [3, 4])  # the mask after the tokens, or among the logits (MDLM)
def test_the_denoiser_carries_tokens_over_and_never_predicts_the_mask(vocab_size):
    mix = mixture()
    proc = sd.discrete.MaskedProcess(vocab_size, mask_id=3)
    den = mix.denoiser(proc)
    x_t = torch.tensor([[0, 3, 2, 3, 1], [3, 3, 3, 3, 3]])
    log_p = den.log_probs(x_t, torch.tensor([0.3, 1.0]))
    assert log_p.shape == (2, 5, vocab_size) and log_p.dtype == F64
    torch.testing.assert_close(den.log_probs(x_t, torch.tensor([0.3])), log_p)  # one time for both rows
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 5, dtype=F64))
    unmasked = x_t != 3
    assert bool(
        (log_p[unmasked].argmax(-1) == x_t[unmasked]).all() and (log_p[unmasked].max(-1).values == 0).all()
    )
    torch.testing.assert_close(log_p[~unmasked][:, :3], mix.conditional_log_probs(x_t, 3)[~unmasked])
    if vocab_size == 4:
        assert bool((log_p[..., 3] == -torch.inf).all())


def test_a_net_favouring_the_mask_gets_its_logit_removed():
    proc = sd.discrete.MaskedProcess(3, mask_id=1)  # a tokenizer's [MASK] at 1: clean ids 0 and 2
    logits = torch.tensor([[[0.0, 50.0, math.log(3)]] * 2], dtype=F64)
    den = sd.discrete.MaskedDenoiser(lambda x, t: logits, proc)
    p = den.log_probs(torch.tensor([[1, 0]]), 0.5).exp()
    torch.testing.assert_close(p[0, 0], torch.tensor([0.25, 0.0, 0.75], dtype=F64))
    torch.testing.assert_close(p[0, 1], torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    assert float(logits[0, 0, 1]) == 50.0  # the net's own tensor is left as it is


def test_draw_is_the_gumbel_max_trick_in_float64():
    # Zheng et al. 2024: float32 Gumbel noise truncates the tail; the draws are float64 uniforms' argmax
    p = torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=F64)
    log_p = torch.log(p).expand(20000, 4)
    got = sd.discrete.draw(log_p, torch.Generator().manual_seed(0))
    u = torch.rand(log_p.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(got, (log_p - torch.log(-torch.log(u))).argmax(-1))
    u32 = torch.rand(log_p.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(got, (log_p - torch.log(-torch.log(u32))).argmax(-1))  # float32's are others
    freq = torch.bincount(got, minlength=4).double() / len(got)
    assert bool(((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / len(got))).all()), freq


def test_the_table_and_log_prob_agree_and_sum_to_one():
    mix = mixture(L=4, V=3, K=2)
    p = mix.table()
    assert abs(float(p.sum()) - 1) < 1e-12
    x = torch.tensor([[2, 0, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(p[mix.index(x)], mix.log_prob(x).exp(), rtol=1e-14, atol=0)
    by_hand = sum(
        float(mix.weights[k] * math.prod(mix.probs[k, i, x[0, i]] for i in range(4))) for k in range(2)
    )
    assert abs(float(p[mix.index(x)][0]) - by_hand) < 1e-15
    n = 20000
    mean, sd_ = tv_floor(p, n)
    assert (
        mix.total_variation(mix.sample(n, torch.Generator().manual_seed(0))) < mean + 4 * sd_
    )  # 0.0219, 0.0206


def test_the_law_of_x_t_takes_its_time_in_float64():
    """``noised_log_prob`` at ``t = 0.3`` is the closed form with ``alpha(0.3)`` in float64 (it read ``t`` as
    a float32 tensor, ``alpha`` off by 1.2e-8: the law off by up to 3e-8 relative)."""
    mix = mixture(L=3)
    proc = sd.discrete.MaskedProcess(mix.V)
    x_t = torch.tensor([[0, 1, 3], [3, 3, 3], [2, 0, 1]])
    alpha = 1 - 0.3
    log_terms = torch.log(mix.weights)[None] + torch.stack(
        [
            torch.where(
                x_t[:, i, None] < 3,
                torch.log(alpha * mix.probs[:, i, x_t[:, i].clamp(max=2)]).T,
                math.log(1 - alpha),
            )
            for i in range(3)
        ],
        -1,
    ).sum(-1)
    torch.testing.assert_close(
        mix.noised_log_prob(x_t, proc, 0.3), torch.logsumexp(log_terms, -1), rtol=1e-14, atol=0
    )


@pytest.mark.parametrize(
    ("process", "x0", "message"),
    [
        (
            sd.discrete.MaskedProcess(3),
            torch.zeros(2, 4),
            r"MaskedProcess.noise: x0 must hold integer token ids",
        ),
        (
            sd.discrete.MaskedProcess(3),
            torch.full((2, 4), 3),
            r"x0 must hold clean ids in \[0, 2\], got 3 at",
        ),
        (sd.discrete.MaskedProcess(4, mask_id=1), torch.full((2, 4), 1), r"clean ids in \[0, 3\] other than"),
        (
            sd.discrete.MaskedProcess(3),
            torch.full((2, 4), 9),
            r"x0 must hold clean ids in \[0, 2\], got 9 at",
        ),
        (sd.discrete.MaskedProcess(3), torch.zeros(4, dtype=torch.long), r"x0 must be a batch of sequences"),
        (
            sd.discrete.UniformProcess(3),
            torch.full((2, 4), -1),
            r"UniformProcess.noise: x0 must hold clean ids",
        ),
        (
            sd.discrete.UniformProcess(3),
            torch.zeros(2, 4, dtype=torch.bool),
            r"x0 must hold integer token ids",
        ),
        (
            sd.discrete.MaskedProcess(256),
            torch.zeros(2, 4, dtype=torch.uint8),
            r"dtype that holds the ids up to 256",
        ),
    ],
)
def test_noise_refuses_x0_that_is_no_batch_of_clean_tokens(process, x0, message):
    # a float x0 came back as float "tokens", a mask or an id past the vocabulary as a token of x_t, and a
    # uint8 x0 under a mask id of 256 raised torch's RuntimeError from full_like
    with pytest.raises(ValueError, match=message):
        process.noise(x0, 0.5)


# weights (0.4, 0.6); token 2 is impossible at position 0, and at position 1 under component 0; component 0
# has token 0 alone at position 0, component 1 token 1 alone there
SPARSE = sd.toy.CategoricalMixture(
    torch.tensor([0.4, 0.6], dtype=F64),
    torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0]], [[0, 1.0, 0], [0.2, 0.3, 0.5]]], dtype=F64),
)
M = 3  # the mask id


def test_a_state_of_probability_zero_has_log_probability_minus_inf():
    x = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    want = torch.tensor([math.log(0.4 * 0.5), math.log(0.6 * 0.5), -math.inf, -math.inf], dtype=F64)
    torch.testing.assert_close(SPARSE.log_prob(x), want, rtol=1e-15, atol=0)
    proc = sd.discrete.MaskedProcess(3)  # alpha = 1 - t
    x_t = torch.tensor([[M, 2], [2, M], [0, M]])
    want_t = [math.log(0.6 * 0.5 * 0.5 * 0.5), -math.inf, math.log(0.4 * 0.5 * 0.5)]
    torch.testing.assert_close(SPARSE.noised_log_prob(x_t, proc, 0.5), torch.tensor(want_t, dtype=F64))


def test_the_conditional_law_is_exact_where_the_unmasked_tokens_are_possible_and_refused_where_not():
    """Responsibilities (0, 1) given token 2 at position 1, (1, 0) given token 0 at position 0, the weights
    with all masked: each position's law by hand. Unmasked tokens of probability 0 under every component
    have no conditional law: a ValueError naming x_t (was: NaN), also through the denoiser; with a label
    ``y = k`` the law is component k's (module docstring), whatever x_t."""
    x_t = torch.tensor([[M, 2], [0, M], [M, M]])
    want = torch.tensor(
        [
            [[0, 1.0, 0], [0.2, 0.3, 0.5]],
            [[1.0, 0, 0], [0.5, 0.5, 0]],
            [[0.4, 0.6, 0], [0.4 * 0.5 + 0.6 * 0.2, 0.4 * 0.5 + 0.6 * 0.3, 0.6 * 0.5]],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(SPARSE.conditional_log_probs(x_t, M).exp(), want, rtol=1e-15, atol=0)
    den = SPARSE.denoiser(sd.discrete.MaskedProcess(3))
    impossible = torch.tensor([[0, M], [2, M]])
    message = r"conditional_log_probs: x_t row 1 has probability zero: its unmasked tokens are impossible"
    with pytest.raises(ValueError, match=message):
        SPARSE.conditional_log_probs(impossible, M)
    with pytest.raises(ValueError, match=message):
        den.log_probs(impossible, torch.full((2,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=message):
        SPARSE.conditional_log_probs(impossible, M, y=torch.tensor([0, -1]))  # row 1: the mixture's law
    given = SPARSE.conditional_log_probs(impossible, M, y=torch.tensor([-1, 1])).exp()
    torch.testing.assert_close(given, torch.stack([want[1], SPARSE.probs[1]]), rtol=1e-15, atol=0)


def test_the_classifier_is_exact_where_the_sequence_is_possible_and_refused_where_not():
    clf = SPARSE.classifier(1, M)
    t = torch.zeros(3, dtype=F64)
    got = clf(torch.tensor([[M, 2], [0, M], [M, M]]), t)
    torch.testing.assert_close(got, torch.tensor([0.0, -math.inf, math.log(0.6)], dtype=F64))
    with pytest.raises(ValueError, match=r"classifier: x row 2 has probability zero: its unmasked tokens"):
        clf(torch.tensor([[M, 2], [0, M], [2, M]]), t)
