"""Confidence-ordered decoding (sd.discrete.Confidence: MaskGIT / LLaDA / PC-Sampler) against the exact
oracle (the mixture of tests/discrete_reference.py, V = 3, L = 5: 243 sequences). The exact law of each
score's sampler is computed here by brute force, independently of the sampler's code: from every reachable
partly masked state, every draw of the masked positions' tokens (or, for ``"random"``, every subset of
positions) with its probability, and the positions the score picks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import steerdiff as sd

from .discrete_reference import ancestral_law, mixture, tv, tv_floor

N = 8000
F64 = torch.float64


@pytest.fixture(scope="module")
def mix():
    return mixture()


@pytest.fixture(scope="module")
def den(mix):
    return mix.denoiser(sd.discrete.MaskedProcess(mix.V))


def _freq(V, seed=0):
    f = torch.rand(V, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    return f / f.sum()


def _sampler(score, temperature=1.0, **pc):
    if score == "pc":
        pc = {"frequencies": _freq(3), "lam": 0.25, **pc}
    return sd.discrete.Confidence(score, temperature, **pc)


def _decoded(L, steps, i):
    """Tokens decoded after step ``i`` from ``L`` masked under the linear schedule: ceil(L (i + 1) / N)."""
    return -(-L * (i + 1) // steps)


def _pick(score, cond, z, masked, k, lam=0.25, freq=None):
    """The ``k`` masked positions of highest score (ties to the left), from the exact conditionals ``cond``
    ``(L, V)`` and the drawn tokens ``z`` (one per position, a dict)."""

    def value(j):
        p = cond[j]
        if score == "confidence":
            return float(p[z[j]])
        if score == "margin":
            top = sorted(p.tolist(), reverse=True)
            return top[0] - top[1]
        if score == "entropy":
            return float((p * p.log()).sum())
        c = min(-float(p[z[j]]) * math.log(float(freq[z[j]])), 10.0)
        return math.log(c) - lam * j

    return sorted(masked, key=lambda j: (-value(j), j))[:k]


def exact_law(mix, score, steps, lam=0.25, freq=None):
    """The exact law (``table`` order) of ``Confidence(score, temperature=1)`` from the all-masked sequence
    under the linear schedule, with ``mix``'s exact denoiser."""
    L, V = mix.L, mix.V
    law = {(V,) * L: 1.0}
    for i in range(steps):
        new: dict[tuple[int, ...], float] = {}
        for x, w in law.items():
            masked = [j for j in range(L) if x[j] == V]
            k = _decoded(L, steps, i) - (L - len(masked))
            cond = mix.conditional_log_probs(torch.tensor([x]), V)[0].exp()
            # (positions decoded, the tokens drawn, the probability of the draw)
            if score == "random":  # a uniform k-subset, its tokens drawn independently
                subsets = list(itertools.combinations(masked, k))
                drawn = [
                    (s, dict(zip(s, z, strict=True)))
                    for s in subsets
                    for z in itertools.product(range(V), repeat=k)
                ]
                outcomes = [(s, zd, w / len(subsets)) for s, zd in drawn]
            else:  # every draw of every masked position's token, all of them ranked
                drawn = [
                    dict(zip(masked, z, strict=True)) for z in itertools.product(range(V), repeat=len(masked))
                ]
                outcomes = [(_pick(score, cond, zd, masked, k, lam, freq), zd, w) for zd in drawn]
            for s, zd, q in outcomes:
                y = list(x)
                for j in zd:
                    q *= float(cond[j, zd[j]])
                for j in s:
                    y[j] = zd[j]
                new[tuple(y)] = new.get(tuple(y), 0.0) + q
        law = new
    p = torch.zeros(V**L, dtype=F64)
    for x, w in law.items():
        p[mix.index(torch.tensor([x]))] += w
    return p


@pytest.fixture(scope="module")
def laws(mix):
    """Exact laws of every score at 1, 2, 3 and 5 steps (pc: lam = 0.25, the frequencies of _freq)."""
    return {
        (score, steps): exact_law(mix, score, steps, freq=_freq(mix.V))
        for score in sd.discrete.SCORES
        for steps in (1, 2, 3, 5)
    }


def _dist(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_exact_laws_and_their_bias(mix, laws):
    # exact TV to the data (linear schedule, temperature 1; ancestral: 0.2775 / 0.1455 / 0.0991 / 0.0751 /
    # 0.0605 at 1 / 2 / 3 / 4 / 5 steps; 4 steps not computed here):
    #   steps:        1       2       3       4       5
    #   random      0.2775  0.1284  0.0689  0.0430  0 (one token a step in a random order: exact)
    #   margin      0.2775  0.1521  0.1383  0.0679  0 (the order depends on the state only: exact)
    #   entropy     0.2775  0.1593  0.1265  0.0762  0
    #   confidence  0.2775  0.3634  0.4229  0.5088  0.5995 (ranked by the drawn token's p: mode-seeking)
    #   pc          0.2775  0.2997  0.3507  0.4292  0.5052 (lam = 0.25, non-uniform frequencies)
    p = mix.table()
    d = {key: _dist(law, p) for key, law in laws.items()}
    for key, law in laws.items():
        assert abs(float(law.sum()) - 1) < 1e-12, key
    one = _dist(ancestral_law(mix, sd.discrete.MaskedProcess(mix.V), 1), p)
    for score in sd.discrete.SCORES:  # one step decodes every token at once, whatever the order
        assert abs(d[score, 1] - one) < 1e-12
    for score in ("random", "margin", "entropy"):
        assert d[score, 5] < 1e-12
    assert d["confidence", 5] > 0.5 and d["pc", 5] > 0.5
    for steps in (2, 3):  # random < margin, entropy < confidence, pc
        assert d["random", steps] < min(d["margin", steps], d["entropy", steps]) - 0.01
        assert (
            max(d["margin", steps], d["entropy", steps]) < min(d["confidence", steps], d["pc", steps]) - 0.1
        )
    # confidence gets worse with more steps: it decodes first where the drawn token is likely
    assert d["confidence", 2] < d["confidence", 3] < d["confidence", 5]
    torch.testing.assert_close(
        torch.tensor(
            [d["random", 2], d["margin", 2], d["entropy", 2], d["confidence", 2], d["pc", 2]], dtype=F64
        ),
        torch.tensor([0.12842, 0.15209, 0.15932, 0.36344, 0.29965], dtype=F64),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("score", sd.discrete.SCORES)
def test_samples_match_the_exact_law(mix, den, laws, score):
    law = laws[score, 3]
    x, info = sd.discrete.sample(
        den, (N, mix.L), 3, _sampler(score), generator=torch.Generator().manual_seed(7), return_info=True
    )
    assert info.nfe == info.steps == 3
    mean, sd_ = tv_floor(law, N)
    assert tv(mix.index(x), law) < mean + 4 * sd_


def test_random_is_the_random_order_sampler(mix, den):
    # one token a step: the data's law, as first_hitting's (TV beside the floor of exact samples)
    p = mix.table()
    mean, sd_ = tv_floor(p, N)
    for sampler, steps in ((sd.discrete.Confidence("random"), mix.L), ("first_hitting", None)):
        x = sd.discrete.sample(den, (N, mix.L), steps, sampler, generator=torch.Generator().manual_seed(3))
        assert tv(mix.index(x), p) < mean + 4 * sd_


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear"])
@pytest.mark.parametrize("steps", [3, 8, 10, 40])
def test_one_call_a_step_and_the_counts_follow_the_schedule(schedule, steps):
    L, V = 1000, 4
    proc = sd.discrete.MaskedProcess(V, schedule=schedule)
    calls = []

    def net(x, t):
        calls.append(t)
        return torch.randn(*x.shape, V, generator=torch.Generator().manual_seed(len(calls)))

    # 1000 masked: at 10 steps 1000 alpha(0.7) = 300.00000000000006 in float64 (300.00001 in float32)
    x_T = torch.full((3, L), V)
    x_T[1, ::3] = 1  # 666 masked
    x_T[2, :990] = 2  # 10 masked
    states = [x_T]
    x, info = sd.discrete.sample(
        sd.discrete.MaskedDenoiser(net, proc), x_T, steps, "confidence", return_info=True,
        generator=torch.Generator().manual_seed(0), callback=lambda d: states.append(d["x"]),
    )  # fmt: skip
    assert info.nfe == len(calls) == steps
    assert bool((x != V).all()) and torch.equal(x[x_T != V], x_T[x_T != V])
    alpha = {
        "linear": lambda t: 1 - t,
        "cosine": lambda t: 1 - math.sin(math.pi * t / 2),
        "loglinear": lambda t: 1 - (1 - 1e-3) * t,
    }[schedule]
    for row, m in enumerate((1000, 666, 10)):
        done = [int((s[row] != x_T[row]).sum()) for s in states]
        for i in range(steps):
            fraction = 1.0 if i == steps - 1 else (alpha(1 - (i + 1) / steps) - alpha(1)) / (1 - alpha(1))
            want = math.ceil(round(m * fraction, 9))
            if schedule == "linear":  # in integers: ceil(m (i + 1) / N)
                assert want == _decoded(m, steps, i)
            if m >= steps and i < steps - 1:  # MaskGIT's rule: a token a step, one left for each later step
                paced = min(m - (steps - 1 - i), max(want, done[i] + 1))
                assert paced == want or schedule == "cosine", (row, i)  # linear, loglinear: the schedule's
                want = paced
            assert done[i + 1] == want, (row, i)
    if schedule == "linear" and steps in (8, 10, 40):  # N divides M: LLaDA's counts, M / N a step
        assert [int((b[0] != a[0]).sum()) for a, b in itertools.pairwise(states)] == [1000 // steps] * steps


@pytest.mark.parametrize("schedule", ["cosine", "geometric"])
def test_every_step_decodes_a_token_where_the_row_has_one_per_step(mix, den, schedule):
    # cosine at N = M = 5 gave the counts 1, 0, 2, 1, 1 (geometric 1, 3, 1, 0, 0): a network call that
    # decoded nothing (53 of 256 calls at N = M = 256), and "random" / "margin" two tokens drawn together,
    # biased (chi-square 1695 / 13858 on 242 degrees of freedom at 200,000 samples). MaskGIT's rule: at
    # least one token a step, and one left for each later step; then one token a step at N = M, the data's law
    proc = sd.discrete.MaskedProcess(mix.V, schedule=schedule)
    exact = mix.denoiser(proc)
    p = mix.table()
    mean, sd_ = tv_floor(p, N)
    for score in ("random", "margin"):
        counts: list[int] = []
        x = sd.discrete.sample(
            exact, (N, mix.L), mix.L, sd.discrete.Confidence(score),
            generator=torch.Generator().manual_seed(3),
            callback=lambda d, counts=counts: counts.append(int((d["x"][0] != mix.V).sum())),
        )  # fmt: skip
        assert counts == [1, 2, 3, 4, 5], (score, counts)
        assert tv(mix.index(x), p) < mean + 4 * sd_, score
    # 1000 masked, 256 steps: the schedule's counts alone decoded nothing at 13 (cosine) / 88 steps
    big = torch.zeros(1, 1000, dtype=torch.bool)
    masked, decoded = ~big, []
    for i in range(256):
        k = int(sd.discrete.Confidence.counts(proc, big, masked, i, 256)[0])
        decoded.append(k)
        masked[0, : sum(decoded)] = False
    assert min(decoded) >= 1 and sum(decoded) == 1000


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_tokens_are_drawn_at_the_temperature(mix, den, temperature):
    # one step decodes every position from p(x_0^j | all masked)^(1/T) normalized, independently: the
    # frequencies of each position's tokens against the tempered marginals (a sampler that ignored T, drawing
    # from p itself, is 74 / 34 standard errors off at T = 0.5 / 2 at the worst position)
    n = 20000
    x = sd.discrete.sample(
        den, (n, mix.L), 1, sd.discrete.Confidence("margin", temperature),
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    p = mix.conditional_log_probs(torch.full((1, mix.L), mix.V), mix.V)[0].exp()  # (L, V)
    tempered = p ** (1 / temperature) / (p ** (1 / temperature)).sum(-1, keepdim=True)
    freq = torch.nn.functional.one_hot(x, mix.V).to(F64).mean(0)
    se = torch.sqrt(tempered * (1 - tempered) / n)
    assert bool(((freq - tempered).abs() < 4 * se).all()), (freq, tempered)
    assert float(((tempered - p).abs() / se).max()) > 30


@pytest.mark.parametrize("score", ["confidence", "margin", "entropy"])
def test_ties_go_to_the_left(score):
    # equal logits everywhere: every position scores alike, so the decoding runs left to right
    L = 300
    den = sd.discrete.MaskedDenoiser(lambda x, t: torch.zeros(*x.shape, 4), sd.discrete.MaskedProcess(4))
    states = []
    sd.discrete.sample(
        den, (2, L), 3, sd.discrete.Confidence(score, 0.0), callback=lambda d: states.append(d["x"] != 4)
    )
    for i, decoded in enumerate(states):
        assert decoded.sum(1).tolist() == [100 * (i + 1)] * 2 and bool(decoded[:, : 100 * (i + 1)].all())


def test_confidence_at_temperature_zero_picks_the_argmax_positions(mix, den):
    # deterministic; each step decodes exactly the k masked positions a brute force over the oracle's
    # conditionals ranks highest by max_v p(v) (ties to the left), with their argmax tokens
    g = torch.Generator().manual_seed(5)
    x_T = torch.where(
        torch.rand(64, mix.L, generator=g) < 0.3, torch.randint(0, mix.V, (64, mix.L), generator=g), mix.V
    )
    x_T[0] = mix.V
    steps = 3
    states = [x_T]
    sampler = sd.discrete.Confidence("confidence", 0.0)
    x = sd.discrete.sample(den, x_T, steps, sampler, callback=lambda d: states.append(d["x"]))
    assert torch.equal(
        x, sd.discrete.sample(den, x_T, steps, sampler, generator=torch.Generator().manual_seed(9))
    )
    for i, (a, b) in enumerate(itertools.pairwise(states)):
        cond = mix.conditional_log_probs(a, mix.V).exp()
        for r in range(len(a)):
            masked = [j for j in range(mix.L) if a[r, j] == mix.V]
            m = int((x_T[r] == mix.V).sum())
            k = _decoded(m, steps, i) - (m - len(masked))
            best = sorted(masked, key=lambda j: (-float(cond[r, j].max()), j))[:k]
            want = a[r].clone()
            for j in best:
                want[j] = int(cond[r, j].argmax())
            assert torch.equal(b[r], want), (i, r)


def test_pc_with_a_large_lam_decodes_left_to_right(mix, den):
    # lam = 50: exp(-50) between neighbours outweighs any calibrated confidence ratio (here < e^7)
    orders = []
    sampler = sd.discrete.Confidence("pc", lam=50.0, frequencies=_freq(mix.V))
    sd.discrete.sample(
        den, (500, mix.L), mix.L, sampler, generator=torch.Generator().manual_seed(1),
        callback=lambda d: orders.append((d["x"] != mix.V).sum(0)),
    )  # fmt: skip
    for i, decoded in enumerate(orders):  # after step i: positions 0..i, in every row
        assert decoded.tolist() == [500] * (i + 1) + [0] * (mix.L - i - 1)
    x_T = torch.tensor([[mix.V, 0, mix.V, mix.V, 2]]).repeat(200, 1)  # masked: 0, 2, 3
    states = [x_T]
    sd.discrete.sample(den, x_T, 2, sampler, callback=lambda d: states.append(d["x"]))
    assert bool((states[1][:, 0] != mix.V).all() and (states[1][:, 2] != mix.V).all())  # ceil(3 / 2) = 2
    assert bool((states[1][:, 3] == mix.V).all())


def test_pc_clips_the_calibrated_confidence():
    # token 0 has p = 0.6 .. 0.95 from left to right and frequency 1e-8: -p log f = 11.1 .. 17.5, all above
    # clip = 10, so every position scores 10 and the ties decode left to right; unclipped (clip = inf) the
    # largest -p log f, the rightmost, goes first (the frequencies of the other tests never reach the clip)
    L, V = 6, 3
    p0 = torch.linspace(0.6, 0.95, L, dtype=F64)
    probs = torch.stack([p0, (1 - p0) / 2, (1 - p0) / 2], -1)
    den = sd.discrete.MaskedDenoiser(
        lambda x, t: torch.log(probs).expand(*x.shape, V), sd.discrete.MaskedProcess(V)
    )
    f = torch.tensor([1e-8, 0.5, 0.5 - 1e-8], dtype=F64)
    for clip, order in ((10.0, range(L)), (math.inf, range(L - 1, -1, -1))):
        states = []
        sampler = sd.discrete.Confidence("pc", 0.0, lam=0.0, frequencies=f, clip=clip)
        x = sd.discrete.sample(den, (1, L), L, sampler, callback=lambda d, s=states: s.append(d["x"][0] != V))
        assert torch.equal(x, torch.zeros(1, L, dtype=torch.long))
        first = [int(torch.nonzero(b & ~a)[0]) for a, b in itertools.pairwise([states[0] & False, *states])]
        assert first == list(order), clip


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
def test_pc_without_position_weight_and_uniform_frequencies_is_confidence(den, mix, temperature):
    # lam = 0, f = 1/V: the score is min(p(xhat) log V, clip) = p(xhat) log V, ranked as p(xhat)
    runs = [
        sd.discrete.sample(den, (2000, mix.L), steps, sampler, generator=torch.Generator().manual_seed(4))
        for steps in (2, 5)
        for sampler in (
            sd.discrete.Confidence("confidence", temperature),
            sd.discrete.Confidence("pc", temperature, lam=0.0, frequencies=torch.full((mix.V,), 1 / mix.V)),
        )
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


@pytest.mark.parametrize("score", sd.discrete.SCORES)
def test_a_row_is_the_same_whatever_its_batch(den, mix, score):
    x_T = torch.tensor([[3, 3, 3, 3, 3], [0, 3, 2, 3, 1], [3, 1, 3, 3, 3]])
    sampler = _sampler(score)
    batch = sd.discrete.sample(
        den, x_T, 4, sampler, generator=[torch.Generator().manual_seed(s) for s in (20, 21, 22)]
    )
    for r in range(3):
        alone = sd.discrete.sample(
            den, x_T[r : r + 1], 4, sampler, generator=[torch.Generator().manual_seed(20 + r)]
        )
        assert torch.equal(batch[r : r + 1], alone)
    # and the rows are not the same draw: 200 rows of one seed each differ
    many = sd.discrete.sample(
        den, (200, mix.L), 4, sampler, generator=[torch.Generator().manual_seed(s) for s in range(200)]
    )
    assert len(torch.unique(many, dim=0)) > 20


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sd.discrete.Confidence("low_confidence"), r"score must be one of \['confidence', 'margin'"),
        (
            lambda: sd.discrete.Confidence("pc", lam=-0.1, frequencies=[0.5, 0.5]),
            r"lam must be a finite number >= 0",
        ),
        (lambda: sd.discrete.Confidence("pc"), r"score='pc' needs the reference token frequencies"),
        (
            lambda: sd.discrete.Confidence("pc", frequencies=[0.5, 0.4, 0.2]),
            r"summing to 1.*got a sum of 1.1",
        ),
        (
            lambda: sd.discrete.Confidence("pc", frequencies=[1.5, -0.5]),
            r"distribution.*got negative entries",
        ),
        (
            lambda: sd.discrete.Confidence("pc", frequencies=[[0.5, 0.5]]),
            r"frequencies must be a non-empty 1-d",
        ),
        (lambda: sd.discrete.Confidence("pc", frequencies=[0.5, 0.5], clip=0), r"clip must be a number > 0"),
        (
            lambda: sd.discrete.Confidence("margin", lam=0.5),
            r"lam, frequencies and clip are the 'pc' score's",
        ),
        (lambda: sd.discrete.Confidence(temperature=-1), r"temperature must be a finite number >= 0"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_frequencies_of_another_vocabulary_and_bad_steps(den, mix):
    sampler = sd.discrete.Confidence("pc", frequencies=[0.25] * 4)
    with pytest.raises(ValueError, match=r"one frequency per token id .*\(vocab_size = 3\), got 4"):
        sd.discrete.sample(den, (2, mix.L), 2, sampler)
    with pytest.raises(ValueError, match=r"discrete.sample: steps must be an integer >= 1, got None"):
        sd.discrete.sample(den, (2, mix.L), None, "confidence")
    assert "confidence" in sd.discrete.available()
    assert repr(sd.discrete.Confidence("pc", 0, frequencies=[1.0])) == (
        "Confidence(score='pc', temperature=0, lam=0.25, clip=10)"
    )
