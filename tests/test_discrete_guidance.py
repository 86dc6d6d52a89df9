"""Guidance of masked diffusion (``sd.discrete.CFG``, ``sd.discrete.ClassifierGuidance``) against exact laws
of a mixture of product-of-categoricals (``V = 3``, ``L = 5``, 3 components) with the component as the
label: its conditional law is the component, its exact classifier the component's responsibility given
the unmasked tokens. Guided log-probabilities are checked against direct formulas on all 1,024 partly
masked sequences, the exact output law of ``first_hitting`` is computed over the orders of unmasking
(tests/discrete_reference.py), and samples are compared with the total-variation floor of exact samples."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import steerdiff as sd

from .discrete_reference import ancestral_law, first_hitting_law, mixture, states, tv, tv_floor

MIX = mixture()
PROC = sd.discrete.MaskedProcess(MIX.V)
DEN = MIX.denoiser(PROC)  # net(x_t, t, y=None): y = k the component's denoiser, y = -1 the mixture's
Y = 1  # the label guided towards
COMP = MIX.component(Y)
X = states(MIX.L, MIX.V)  # every partly masked sequence
MASKED = X == MIX.V
N = 8000
T = torch.tensor(0.5)


def _probs(den):
    return den.log_probs(X, T).exp()


def _tv(mix, x, p):
    return tv(mix.index(x), p)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_cfg_is_the_per_position_geometric_mixture():
    pc = COMP.probs[0].expand(len(X), -1, -1)  # p(x_0 | x_t, y): the component, whatever x_t
    pu = MIX.conditional_log_probs(X, MIX.V).exp()
    for w in (0.5, 3.0):
        guided = sd.discrete.CFG(DEN, DEN, w, uncond_kwargs={"y": -1})
        got = guided.log_probs(X, T, y=Y).exp()
        q = pc**w * pu ** (1 - w)
        torch.testing.assert_close(got[MASKED], (q / q.sum(-1, keepdim=True))[MASKED], rtol=0, atol=1e-14)
        torch.testing.assert_close(got[~MASKED], _probs(DEN)[~MASKED], rtol=0, atol=0)  # carried over
        assert guided.cost == 2
    for w, branch in ((1.0, pc), (0.0, pu)):
        guided = sd.discrete.CFG(COMP.denoiser(PROC), DEN, w)
        torch.testing.assert_close(_probs(guided)[MASKED], branch[MASKED], rtol=0, atol=1e-15)
        assert guided.cost == 1


def test_cfg_of_one_call_twice_warns_once(caplog):
    """As :class:`steerdiff.guidance.CFG`: ``CFG(den, den, w)`` without ``uncond_kwargs`` is the conditional
    model at twice the NFE (measured here); one warning per instance, none where the branches differ or one
    is called."""
    with caplog.at_level(logging.WARNING, logger="steerdiff.discrete.cfg"):
        same = sd.discrete.CFG(DEN, DEN, 3.0)
        for _ in range(2):
            got = same.log_probs(X, T, y=Y)
            assert same.cost == 2
            assert float((got - DEN.log_probs(X, T, y=Y)).abs().nan_to_num().max()) < 1e-12
        (record,) = [r for r in caplog.records if r.name == "steerdiff.discrete.cfg"]
        assert record.levelno == logging.WARNING
        assert record.getMessage().startswith("CFG: uncond is cond and no uncond_kwargs tell")
        assert 'uncond_kwargs={"label": null}' in record.getMessage()
        caplog.clear()
        for w in (0.0, 1.0):
            sd.discrete.CFG(DEN, DEN, w)
        sd.discrete.CFG(DEN, DEN, 3.0, uncond_kwargs={"y": -1})
        sd.discrete.CFG(COMP.denoiser(PROC), DEN, 3.0)
        assert not caplog.records


def test_cfg_of_exact_models_is_classifier_guidance_with_the_exact_classifier():
    # p(x_0^i = v | x_t, y) / p(x_0^i = v | x_t) = p(y | x_t^{i <- v}) / p(y | x_t): the geometric mixture
    # at scale w is the denoiser tilted by the exact classifier to the power w
    for w in (0.5, 2.0):
        cfg = sd.discrete.CFG(COMP.denoiser(PROC), DEN, w)
        cg = sd.discrete.ClassifierGuidance(DEN, MIX.classifier(Y, MIX.V), w)
        torch.testing.assert_close(_probs(cfg), _probs(cg), rtol=0, atol=1e-14)


def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional():
    cg = sd.discrete.ClassifierGuidance(DEN, MIX.classifier(Y, MIX.V))
    got = _probs(cg)
    torch.testing.assert_close(got[MASKED], COMP.probs[0].expand(len(X), -1, -1)[MASKED], rtol=0, atol=1e-15)
    torch.testing.assert_close(got[~MASKED], _probs(DEN)[~MASKED], rtol=0, atol=0)
    # so first_hitting's law, over every order of unmasking, is p(x | y): exact to rounding
    torch.testing.assert_close(first_hitting_law(cg, MIX.L, MIX.V), COMP.table(), rtol=0, atol=1e-15)


class _OnSupport:
    """``den`` called only on the partly masked sequences that ``mix`` gives a positive probability (its
    law elsewhere set to 0: states that no sampler reaches, of no law), for :func:`first_hitting_law`."""

    def __init__(self, den, mix):
        self.den, self.mix, self.process = den, mix, den.process

    def log_probs(self, x, t):
        out = torch.full((*x.shape, self.mix.V), -math.inf, dtype=torch.float64)
        ok = self.mix.noised_log_prob(x, self.process, 0.5) > -math.inf
        out[ok] = self.den.log_probs(x[ok], t)
        return out


def test_classifier_guidance_skips_candidates_of_prior_probability_zero():
    # token 2 never at position 0; tokens impossible in some components only elsewhere: the candidates of
    # prior probability zero are sequences of probability zero, which have no p(y | x) (the exact
    # classifier refuses them), and are never drawn
    probs = MIX.probs.clone()
    probs[:, 0, 2] = 0
    probs[Y, 1, 0] = probs[0, 3, 1] = probs[2, 4, 2] = 0
    mix = sd.toy.CategoricalMixture(MIX.weights, probs)
    den, comp = mix.denoiser(PROC), mix.component(Y)
    ok = comp.noised_log_prob(X, PROC, 0.5) > -math.inf  # the states possible under the label
    masked = MASKED & ok[:, None]
    for w in (1.0, 2.0):
        cg = sd.discrete.ClassifierGuidance(den, mix.classifier(Y, MIX.V), w)
        got = cg.log_probs(X[ok], T).exp()
        # Bayes' rule at w = 1: the label's law; at w = 2 the geometric mixture p_y^2 / p
        want = sd.discrete.CFG(comp.denoiser(PROC), den, w).log_probs(X[ok], T).exp()
        torch.testing.assert_close(got[masked[ok]], want[masked[ok]], rtol=0, atol=1e-14)
        assert int((got[masked[ok]] == 0).sum()) == int(
            (comp.probs[0] == 0).expand(len(X), -1, -1)[masked].sum()
        )
    cg = sd.discrete.ClassifierGuidance(den, mix.classifier(Y, MIX.V))
    torch.testing.assert_close(
        first_hitting_law(_OnSupport(cg, comp), MIX.L, MIX.V), comp.table(), rtol=0, atol=1e-15
    )
    x = sd.discrete.sample(cg, (2000, MIX.L), sampler="first_hitting", generator=_gen(4))
    mean, sd_ = tv_floor(comp.table(), 2000)
    assert _tv(mix, x, comp.table()) < mean + 4 * sd_  # measured 0.0606 against 0.0639 +- 0.0065


def test_cfg_at_scale_1_samples_each_rows_component_and_at_0_the_mixture():
    labels = torch.tensor([0, 2]).repeat_interleave(N // 2)  # one net with a label, -1 its null label
    for w in (1.0, 0.0):
        guided = sd.discrete.CFG(DEN, DEN, w, uncond_kwargs={"y": -1})
        x, info = sd.discrete.sample(
            guided, (N, MIX.L), sampler="first_hitting", generator=_gen(1), return_info=True, y=labels
        )
        assert info.nfe == MIX.L  # one branch evaluated per call
        if w == 1:
            # measured 0.0829 / 0.0551 against the floors 0.0778 +- 0.0035 / 0.0535 +- 0.0045
            for half, k in ((slice(0, N // 2), 0), (slice(N // 2, N), 2)):
                p = MIX.component(k).table()
                mean, sd_ = tv_floor(p, N // 2)
                assert _tv(MIX, x[half], p) < mean + 4 * sd_
        else:
            mean, sd_ = tv_floor(MIX.table(), N)
            assert _tv(MIX, x, MIX.table()) < mean + 4 * sd_  # measured 0.0549, floor 0.0589 +- 0.0026


def test_cfg_beyond_1_samples_its_exact_law_which_is_not_the_tilted_law():
    guided = sd.discrete.CFG(COMP.denoiser(PROC), DEN, 3.0)
    law = first_hitting_law(guided, MIX.L, MIX.V)
    x, info = sd.discrete.sample(
        guided, (N, MIX.L), sampler="first_hitting", generator=_gen(2), return_info=True
    )
    assert info.nfe == 2 * MIX.L
    mean, sd_ = tv_floor(law, N)
    assert _tv(MIX, x, law) < mean + 4 * sd_  # measured 0.0231 against 0.0240 +- 0.0026
    pc, pu = COMP.table(), MIX.table()
    tilted = pc**3 * pu**-2
    tilted /= tilted.sum()
    d = [0.5 * float((a - b).abs().sum()) for a, b in ((law, pc), (law, tilted), (tilted, pc))]
    # the per-step geometric mixture guides harder than the sequence-level p(x | y)^3 p(x)^-2
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.32987, 0.15629, 0.21934]), rtol=1e-4, atol=0)


def test_classifier_guidance_samples_the_conditional_with_first_hitting_batched_or_not():
    calls = []

    def counted(x, t):
        calls.append(len(x))
        return MIX.classifier(Y, MIX.V)(x, t)

    runs = []
    for batch_size in (None, 5000):
        calls.clear()
        x, info = sd.discrete.sample(
            sd.discrete.ClassifierGuidance(DEN, counted, batch_size=batch_size), (N, MIX.L),
            sampler="first_hitting", generator=_gen(3), return_info=True,
        )  # fmt: skip
        assert info.nfe == MIX.L  # the classifier is not a network evaluation of the diffusion model
        # every masked position's V candidates: N V (5 + 4 + 3 + 2 + 1) sequences in all
        assert sum(calls) == N * MIX.V * 15
        assert len(calls) == (
            MIX.L if batch_size is None else sum(math.ceil(N * MIX.V * m / 5000) for m in range(1, 6))
        )
        runs.append(x)
    assert torch.equal(*runs)
    mean, sd_ = tv_floor(COMP.table(), N)
    assert _tv(MIX, runs[0], COMP.table()) < mean + 4 * sd_  # measured 0.0437 against 0.0429 +- 0.0030


def test_classifier_guidance_with_the_ancestral_sampler_in_one_step():
    # the guided denoiser is the component's, a product law: tokens drawn together are then drawn right,
    # and one ancestral step samples p(x | y), where unguided it is 0.2775 from the mixture
    assert 0.5 * float((ancestral_law(COMP, PROC, 1) - COMP.table()).abs().sum()) < 1e-12
    x, info = sd.discrete.sample(
        sd.discrete.ClassifierGuidance(DEN, MIX.classifier(Y, MIX.V)), (N, MIX.L), 1, generator=_gen(4),
        return_info=True,
    )  # fmt: skip
    assert info.nfe == 1
    mean, sd_ = tv_floor(COMP.table(), N)
    assert _tv(MIX, x, COMP.table()) < mean + 4 * sd_  # measured 0.0449 against 0.0429 +- 0.0030


class Flaky:
    """The exact classifier (or net), NaN at call ``nan_at``."""

    def __init__(self, f, nan_at):
        self.f, self.nan_at, self.calls = f, nan_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.f(*args, **kwargs)
        return torch.full_like(out, math.nan) if self.calls == self.nan_at else out


def test_the_classifier_sees_each_candidate_at_its_rows_time():
    # log_prob_y(x, t) is called on the candidates x_t^{i <- v} of every masked position, each with the time
    # of its row (a time-dependent classifier p(y | x_t, t)); the exact classifier ignores t, so a
    # ClassifierGuidance that passed any other time sampled the same law
    seen = []

    def log_prob_y(x, t):
        seen.append((x.clone(), t.clone()))
        return torch.zeros(len(x), dtype=torch.float64)

    x_t = torch.full((3, MIX.L), MIX.V)
    x_t[1, :3] = torch.tensor([0, 2, 1])  # masked: 5, 2 and 5 positions
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    sd.discrete.ClassifierGuidance(DEN, log_prob_y, batch_size=7).log_probs(x_t, t)
    x, when = (torch.cat(v) for v in zip(*seen, strict=True))
    rows, pos = torch.nonzero(x_t == MIX.V, as_tuple=True)
    assert torch.equal(when, t[rows].repeat_interleave(MIX.V))
    want = x_t[rows].repeat_interleave(MIX.V, dim=0)
    want[torch.arange(len(want)), pos.repeat_interleave(MIX.V)] = torch.arange(MIX.V).repeat(len(rows))
    assert torch.equal(x, want)


def test_nan_from_the_classifier_or_a_branch_names_the_step():
    cg = sd.discrete.ClassifierGuidance(DEN, Flaky(MIX.classifier(Y, MIX.V), 3))
    with pytest.raises(
        sd.NonFiniteError, match=r"at step 2 \(evaluation 3, .*log_prob_y returned NaN or \+inf"
    ):
        sd.discrete.sample(cg, (2, MIX.L), sampler="first_hitting")
    uncond = sd.discrete.MaskedDenoiser(Flaky(DEN.net, 2), PROC)
    with pytest.raises(
        sd.NonFiniteError,
        match=r"at step 1 \(evaluations 3-4, .*CFG's unconditional branch: MaskedDenoiser: .*NaN or \+inf",
    ):
        sd.discrete.sample(sd.discrete.CFG(COMP.denoiser(PROC), uncond, 2.0), (2, MIX.L), 4)


def test_disjoint_supports_are_refused():
    def only(v):
        return sd.discrete.MaskedDenoiser(
            lambda x, t: torch.where(torch.arange(3) == v, 0.0, -math.inf).expand(*x.shape, 3), PROC
        )

    with pytest.raises(sd.NonFiniteError, match=r"CFG: at the masked position \[0, 0\] .* no clean token"):
        sd.discrete.sample(sd.discrete.CFG(only(0), only(1), 2.0), (2, MIX.L), 4)
    never = sd.discrete.ClassifierGuidance(only(0), lambda x, t: torch.where(x[:, 0] == 0, -math.inf, 0.0))
    with pytest.raises(sd.NonFiniteError, match=r"ClassifierGuidance: at the masked position \[0, 0\]"):
        sd.discrete.sample(never, (2, MIX.L), 4)


CLF = MIX.classifier(Y, MIX.V)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sd.discrete.CFG(DEN, DEN, "2"), r"CFG: scale must be a finite number >= 0, got '2'"),
        (lambda: sd.discrete.CFG(DEN, DEN, -1.0), r"CFG: scale must be a finite number >= 0, got -1.0"),
        (lambda: sd.discrete.CFG(MIX, DEN, 2.0), r"CFG: cond must be a steerdiff.discrete.MaskedDenoiser"),
        (lambda: sd.discrete.CFG(DEN, MIX, 2.0), r"CFG: uncond must be a steerdiff.discrete.MaskedDenoiser"),
        (
            lambda: sd.discrete.CFG(DEN, MIX.denoiser(sd.discrete.MaskedProcess(3, schedule="cosine")), 2.0),
            r"CFG: uncond must share the process MaskedProcess\(.*'linear'\), got .*'cosine'",
        ),
        (lambda: sd.discrete.CFG(DEN, DEN, 2.0, uncond_kwargs=[1]), r"uncond_kwargs must be a dict or None"),
        (lambda: sd.discrete.ClassifierGuidance(DEN, 1), r"log_prob_y must be callable \(x, t\) -> \(n,\)"),
        (lambda: sd.discrete.ClassifierGuidance(DEN, CLF, math.nan), r"scale must be a finite number >= 0"),
        (
            lambda: sd.discrete.ClassifierGuidance(DEN, CLF, batch_size=0),
            r"batch_size must be an integer >= 1",
        ),
        (
            lambda: sd.discrete.sample(
                sd.discrete.ClassifierGuidance(DEN, lambda x, t: CLF(x, t)[:, None]), (2, MIX.L), 4
            ),
            r"log_prob_y must return a floating tensor of shape \(30,\), .* got torch.float64 \(30, 1\)",
        ),
        (
            lambda: sd.discrete.sample(
                sd.discrete.ClassifierGuidance(DEN, lambda x, t: x.sum(1)), (2, MIX.L), 4
            ),
            r"log_prob_y must return a floating tensor .* got torch.int64 \(30,\)",
        ),
        (lambda: sd.discrete.sample(DEN, (2, MIX.L), 4, y=3), r"y must be a component in \[0, 2\] or -1"),
        (lambda: MIX.classifier(3, MIX.V), r"classifier: y must be an integer in \[0, 2\], got 3"),
        (lambda: MIX.classifier(0, 1), r"mask_id must lie outside the tokens \[0, 2\]"),
        (lambda: MIX.component(-1), r"component: k must be an integer in \[0, 2\]"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
