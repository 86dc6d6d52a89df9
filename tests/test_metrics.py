import math

import pytest
import torch

import steerdiff as sd


def test_relative_rmse_value_and_shape_check():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x = ref + torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # ||x - ref||^2 = 3, ||ref||^2 = 25 (means over the same 4 entries)
    assert sd.metrics.relative_rmse(x, ref) == pytest.approx((3 / 25) ** 0.5, rel=1e-15)
    assert sd.metrics.relative_rmse(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        sd.metrics.relative_rmse(x, ref[:1])


def test_sliced_wasserstein_of_a_shift():
    # for Y = X + v, W_2(theta^T X, theta^T Y) = |theta . v| exactly, so SW_2 = |v| / sqrt(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    sw = sd.metrics.sliced_wasserstein(x, x + v, 4000, torch.Generator().manual_seed(1))
    assert sw == pytest.approx(0.5, rel=0.03)
    same = sd.metrics.sliced_wasserstein(x, x.clone(), 64, torch.Generator().manual_seed(1))
    assert same == pytest.approx(0.0, abs=1e-12)
    # the same generator state gives the same projections
    a = sd.metrics.sliced_wasserstein(x, x + v, 8, torch.Generator().manual_seed(5))
    b = sd.metrics.sliced_wasserstein(x, x + v, 8, torch.Generator().manual_seed(5))
    assert a == b
    # a set against its own duplicate (sizes n and 2n) is the same law as against itself
    sorted_ = sd.metrics.sliced_wasserstein(x, x + v, 64, torch.Generator().manual_seed(5))
    doubled = sd.metrics.sliced_wasserstein(x, torch.cat([x, x]) + v, 64, torch.Generator().manual_seed(5))
    assert doubled == pytest.approx(sorted_, rel=1e-12)
    # the block matching (sizes 500 and 1000) against POT's general 1-D solver on the same projections
    ot = pytest.importorskip("ot")
    y = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    theta = torch.randn(4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    block = sd.metrics.sliced_wasserstein(x, y, 32, torch.Generator().manual_seed(2))
    assert block == pytest.approx(float(ot.sliced_wasserstein_distance(x, y, projections=theta)), rel=1e-9)
    with pytest.raises(ValueError, match="dimensions differ"):
        sd.metrics.sliced_wasserstein(x, x[:, :3])


def test_control_variates_where_the_projected_laws_are_their_gaussian_fits():
    """Nguyen & Ho's control variates where ``W_2^2(theta) = c G(theta)`` exactly.

    A shift ``Y = X + v``: ``W_2^2(theta) = (theta . v)^2``, the lower variate itself (``c = 1``). A scaling
    about the mean ``Y = m + a (X - m)``: equal means and ``W_2^2(theta) = (a - 1)^2 theta^T S theta``,
    ``c = (a - 1)^2 / (1 + a^2)`` times the upper variate. With the paper's coefficient (variance of ``G``
    about its known mean) the estimate of ``SW_2^2`` is then
    ``c (E G + (mean G - E G)^3 / mean (G - E G)^2)``: off by the cube of the plain average's deviation.
    Measured at 64 directions, seeds 1-3, relative errors of ``SW_2``: lower 1.2e-4 / 1.4e-4 / 1.2e-3
    (plain 3.3e-2 / 3.4e-2 / 6.2e-2), upper 3.7e-7 / 4.0e-3 / 3.1e-3 (plain 3.2e-3 / 6.6e-2 / 6.2e-2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0])
    v = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    m, a = x.mean(dim=0), 1.8
    cases = [  # (y, variate, exact SW_2)
        (x + v, "lower", float(v.norm()) / 2),
        (m + a * (x - m), "upper", (a - 1) * math.sqrt(float(((x - m) ** 2).mean(dim=0).sum()) / 4)),
    ]
    for y, cv, exact in cases:
        for seed in (1, 2, 3):

            def error(variate, y=y, exact=exact, seed=seed):
                sw = sd.metrics.sliced_wasserstein(x, y, 64, torch.Generator().manual_seed(seed), variate)
                return abs(sw / exact - 1)

            assert error(cv) < 5e-3 and error(cv) < error(False) / 10
    assert sd.metrics.sliced_wasserstein(x, y, 64, control_variates=True) == sd.metrics.sliced_wasserstein(
        x, y, 64, control_variates="upper"
    )
    # one direction: no coefficient to fit, the plain value, on the block path and on POT's (sizes 400, 300)
    y = torch.randn(300, 4, generator=g, dtype=torch.float64) + v
    for other in (x[:400] + v, y):
        plain = sd.metrics.sliced_wasserstein(x[:400], other, 1, torch.Generator().manual_seed(2))
        for cv in ("lower", "upper"):
            got = sd.metrics.sliced_wasserstein(x[:400], other, 1, torch.Generator().manual_seed(2), cv)
            assert got == pytest.approx(plain, rel=1e-12)
    accepted = r"control_variates must be False, True or one of \['lower', 'upper'\], got 'both'"
    with pytest.raises(ValueError, match=accepted):
        sd.metrics.sliced_wasserstein(x, x, control_variates="both")


def test_control_variates_cut_the_variance_without_a_measurable_bias():
    """Two Gaussian sample sets (8-d, 256 each, N(0, diag(0.3..2)) against N(m, diag(1.5..0.5))), 200 seeds of
    directions at 16 and 64 projections. Reference: the lower-variate SW_2^2 with 32 x 1024 directions
    (0.36470, standard error 2.6e-4), which the plain one with the same directions matches (0.36414, s.e.
    2.2e-3). Measured: variance of the returned SW_2 over the seeds against the plain one's, lower / upper
    0.130 / 0.303 at 16 projections, 0.0186 / 0.155 at 64. The paper's coefficient, fitted on the same
    directions, biases by O(1/L): mean SW_2^2 -1.3% / -2.2% off at 16 (-2.0 / -2.2 standard errors),
    +0.38% / -0.17% at 64 (+2.5 / -0.4; the lower variate over 1000 seeds: +0.08%, +0.8)."""
    g = torch.Generator().manual_seed(0)
    d = 8
    f64 = torch.float64
    x = torch.randn(256, d, generator=g, dtype=f64) * torch.linspace(0.3, 2.0, d, dtype=f64).sqrt()
    y = torch.linspace(-0.8, 0.8, d, dtype=f64) + torch.randn(256, d, generator=g, dtype=f64) * (
        torch.linspace(1.5, 0.5, d, dtype=f64).sqrt()
    )

    def draws(projections, cv, seeds):
        return torch.tensor(
            [
                sd.metrics.sliced_wasserstein(x, y, projections, torch.Generator().manual_seed(s), cv)
                for s in seeds
            ],
            dtype=torch.float64,
        )

    ref_seeds = range(10_000, 10_032)
    ref, ref_plain = (draws(1024, cv, ref_seeds) ** 2 for cv in ("lower", False))
    se_ref = float(ref.std()) / math.sqrt(len(ref))
    assert abs(float(ref_plain.mean() - ref.mean())) < 3 * float(ref_plain.std()) / math.sqrt(len(ref))
    for projections, bound in ((16, {"lower": 0.2, "upper": 0.45}), (64, {"lower": 0.03, "upper": 0.25})):
        plain = draws(projections, False, range(200))
        for cv in ("lower", "upper"):
            sw = draws(projections, cv, range(200))
            assert float(sw.var() / plain.var()) < bound[cv]
            se = math.hypot(float((sw**2).std()) / math.sqrt(len(sw)), se_ref)
            assert abs(float((sw**2).mean() - ref.mean())) < 3 * se


def _mmd_by_hand(x: list[list[float]], y: list[list[float]], h: float) -> float:
    """The unbiased MMD^2 (Gretton et al. 2012, Lemma 6) pair by pair, k(a, b) = exp(-|a - b|^2 / (2 h^2))."""

    def k(a: list[float], b: list[float]) -> float:
        return math.exp(-sum((u - v) ** 2 for u, v in zip(a, b, strict=True)) / (2 * h * h))

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_is_the_u_statistic_on_hand_computed_points():
    # x = {0, 2}, y = {0, 4}, h = 2: k(0, 2) = e^-1/2, k(0, 4) = e^-2, k(2, 4) = e^-1/2, so
    # U = e^-1/2 + e^-2 - (1 + e^-2 + 2 e^-1/2) / 2 = (e^-2 - 1) / 2 = -0.432 (negative: unbiased),
    # while the V-statistic (diagonals kept) is (1 - e^-1/2) / 2 = +0.197
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [4.0]], dtype=torch.float64)
    assert sd.metrics.mmd(x, y, bandwidth=2.0) == pytest.approx((math.exp(-2) - 1) / 2, rel=1e-14)
    # median heuristic: pooled squared distances {0 x2, 4 x6, 16 x4} (ordered pairs), median 4, so h = 2
    assert sd.metrics.mmd(x, y) == pytest.approx((math.exp(-2) - 1) / 2, rel=1e-14)
    # unequal sizes in 2-D (n(n-1) and m(m-1) differ), against the pair-by-pair sum
    xs = [[0.0, 0.0], [1.0, 0.5], [-0.5, 2.0]]
    ys = [[0.3, -1.0], [2.0, 1.0]]
    got = sd.metrics.mmd(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64), 1.5)
    assert got == pytest.approx(_mmd_by_hand(xs, ys, 1.5), rel=1e-13)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_mmd_expectation_is_the_closed_form(delta):
    """E[MMD^2] for N(0, I) against N(delta e_1, I) in d dims with the kernel exp(-|a-b|^2 / (2 h^2)).

    For a ~ N(p, I), b ~ N(q, I): E k(a, b) = c exp(-|p - q|^2 / (2 (h^2 + 2))), c = (h^2 / (h^2 + 2))^{d/2},
    so the unbiased estimate has mean 2 c (1 - exp(-delta^2 / (2 (h^2 + 2)))). The biased V-statistic
    is off by about (1 - c) (1/n + 1/m): measured 29 (delta 0) and 8.2 (delta 1) standard errors.
    """
    d, h, n, m, repeats = 3, 1.5, 40, 60, 200
    c = (h * h / (h * h + 2)) ** (d / 2)
    exact = 2 * c * (1 - math.exp(-(delta**2) / (2 * (h * h + 2))))
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([delta, 0.0, 0.0], dtype=torch.float64)
    values = torch.tensor(
        [
            sd.metrics.mmd(
                torch.randn(n, d, generator=g, dtype=torch.float64),
                torch.randn(m, d, generator=g, dtype=torch.float64) + shift,
                bandwidth=h,
            )
            for _ in range(repeats)
        ]
    )
    se = float(values.std()) / math.sqrt(repeats)
    assert abs(float(values.mean()) - exact) < 3.5 * se  # measured z 0.37 and -0.77 (delta 0, 1)


def test_mmd_detects_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(400, 3, generator=g, dtype=torch.float64) for _ in range(2))
    assert abs(sd.metrics.mmd(a, b)) < 0.01 and sd.metrics.mmd(a, b + 1.0) > 0.1


def test_floor_is_the_metric_between_exact_sets():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    # the mean of the metric over independent pairs, drawn here from the same generator stream
    g = torch.Generator().manual_seed(4)
    pairs = [(gmm.sample(200, g), gmm.sample(200, g)) for _ in range(4)]
    metric = lambda a, b: sd.metrics.sliced_wasserstein(a, b, 64, torch.Generator().manual_seed(1))  # noqa: E731
    explicit = sum(metric(a, b) for a, b in pairs) / 4
    got = sd.metrics.floor(gmm.sample, 200, metric, repeats=4, generator=torch.Generator().manual_seed(4))
    assert got == pytest.approx(explicit, rel=1e-12)
    # every set is a fresh draw: no set compared with itself or reused
    seen: list[torch.Tensor] = []
    sd.metrics.floor(gmm.sample, 50, lambda a, b: seen.extend([a, b]) or 0.0, repeats=3)
    assert len(seen) == 6 and all(s.shape == (50, 2) for s in seen)
    assert all(not torch.equal(seen[i], seen[j]) for i in range(6) for j in range(i))
    # ... so it is the metric's mean over independent exact pairs (another stream: within its spread)
    values = [metric(gmm.sample(200, g), gmm.sample(200, g)) for _ in range(40)]
    mean = sum(values) / 40
    se = (sum((v - mean) ** 2 for v in values) / 39 / 40) ** 0.5
    spread = (sum((v - mean) ** 2 for v in values) / 39 / 4) ** 0.5  # the floor's own std (4 repeats)
    assert abs(got - mean) < 3.5 * math.hypot(se, spread)  # measured z 1.08
    small = sd.metrics.floor(gmm.sample, 200, repeats=4)
    large = sd.metrics.floor(gmm.sample, 1600, repeats=4)
    assert 0 < large < small  # the floor shrinks with the sample size


def test_sliced_wasserstein_without_a_generator_is_reproducible():
    """No generator: the directions of a generator seeded 0, so repeated calls (and ``floor`` with a
    seeded generator, which calls it without one) give the same value (they drew from the global RNG)."""
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(64, 5, generator=g, dtype=torch.float64),
        torch.randn(64, 5, generator=g, dtype=torch.float64),
    )
    seeded = sd.metrics.sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    assert sd.metrics.sliced_wasserstein(a, b) == seeded
    assert sd.metrics.sliced_wasserstein(a, b) == seeded
    gmm = sd.toy.default_benchmark_mixture(dim=8, components=4)
    floors = [
        sd.metrics.floor(gmm.sample, 100, repeats=2, generator=torch.Generator().manual_seed(1)) for _ in "ab"
    ]
    assert floors[0] == floors[1]


def test_floor_against_a_fixed_reference():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    ref = gmm.sample(4000, torch.Generator().manual_seed(9))
    seen = []
    value = sd.metrics.floor(gmm.sample, 100, lambda a, b: seen.append(b) or 1.0, repeats=3, reference=ref)
    assert value == 1.0 and len(seen) == 3 and all(b is ref for b in seen)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        # before: a torch TypeError from randn for projections=2.5
        (
            lambda x: sd.metrics.sliced_wasserstein(x, x, projections=2.5),
            ["projections", "integer >= 1", "2.5"],
        ),
        (lambda x: sd.metrics.sliced_wasserstein(x, x, projections=0), ["projections", "integer >= 1", "0"]),
        (lambda x: sd.metrics.sliced_wasserstein(x, x, projections="8"), ["projections", "'8'"]),
        (lambda x: sd.metrics.mmd(x, x, bandwidth=math.nan), ["mmd", "bandwidth", "> 0", "nan"]),
        (lambda x: sd.metrics.mmd(x, x, bandwidth="1"), ["mmd", "bandwidth", "'1'"]),
        (lambda x: sd.metrics.mmd(x, x, bandwidth=0.0), ["mmd", "bandwidth", "> 0"]),
        (lambda x: sd.metrics.floor(lambda n, g: x, 2.5), ["floor", "n must be an integer >= 2", "2.5"]),
        (lambda x: sd.metrics.floor(lambda n, g: x, 8, repeats=0.5), ["floor", "repeats", "integer >= 1"]),
        # before: AttributeError ('numpy.ndarray' / 'list' object has no attribute ...) or a bare TypeError
        (
            lambda x: sd.metrics.sliced_wasserstein(x.numpy(), x),
            ["sliced_wasserstein", "x must be a torch.Tensor"],
        ),
        (lambda x: sd.metrics.mmd(x, x.tolist()), ["mmd", "y must be a torch.Tensor", "list"]),
        (
            lambda x: sd.metrics.frechet_distance(x, None),
            ["frechet_distance", "feats_b must be a torch.Tensor"],
        ),
        (lambda x: sd.metrics.relative_rmse(x, x.numpy()), ["relative_rmse", "ref must be a torch.Tensor"]),
        (lambda x: sd.metrics.floor(x, 8), ["floor", "sample must be callable"]),
    ],
)
def test_bad_options_name_the_argument(call, words):
    with pytest.raises(ValueError) as err:
        call(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    msg = str(err.value)
    assert all(w in msg for w in words), msg


def test_mmd_median_heuristic_of_coinciding_samples_says_to_pass_a_bandwidth():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"median heuristic gives bandwidth 0.*pass a bandwidth > 0"):
        sd.metrics.mmd(x, x)
    assert sd.metrics.mmd(x, x, bandwidth=1.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    ("x", "y", "got"),
    [
        (torch.zeros(0, 2), torch.zeros(5, 2), "x has shape (0, 2)"),
        (torch.zeros(5, 2), torch.zeros(0, 2), "y has shape (0, 2)"),
        (torch.tensor(1.0), torch.zeros(5, 1), "x has shape ()"),
        (torch.zeros(5, 0), torch.zeros(5, 0), "x has shape (5, 0)"),
        (torch.zeros(1, 3), torch.zeros(5, 3), "x has shape (1, 3)"),
    ],
)
@pytest.mark.parametrize("metric", ["sliced_wasserstein", "mmd", "frechet_distance"])
def test_empty_sample_sets_are_refused_by_name(metric, x, y, got):
    """Before: torch's RuntimeError "cannot reshape tensor of 0 elements" for an empty set or samples of
    no entries (sliced_wasserstein read 0.0 for the latter), an IndexError for a 0-d tensor."""
    if metric == "frechet_distance":
        got = got.replace("x has", "feats_a has").replace("y has", "feats_b has")
    with pytest.raises(ValueError) as err:
        getattr(sd.metrics, metric)(x, y)
    assert str(err.value) == f"{metric}: need at least 2 samples of at least one entry in each set, {got}"


def test_relative_rmse_of_no_entries_is_refused():
    """Before: nan (a mean over no entries), read as an error of nan without a word."""
    with pytest.raises(ValueError, match=r"^relative_rmse: x and ref have no entries, shape \(0, 2\)$"):
        sd.metrics.relative_rmse(torch.zeros(0, 2), torch.zeros(0, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_mmd_median_heuristic_names_non_finite_samples(bad):
    """Before: a NaN sample made the median NaN, reported as "bandwidth 0 (most samples coincide)"; an inf
    one gave MMD^2 = nan. With a bandwidth given, a non-finite sample gives NaN, as in the other metrics."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x.clone() + 1.0
    y[3, 1] = bad
    message = r"^mmd: the median heuristic needs finite samples; y has NaN or inf$"
    with pytest.raises(ValueError, match=message):
        sd.metrics.mmd(x, y)
    assert math.isnan(sd.metrics.mmd(x, y, bandwidth=1.0))


@pytest.mark.parametrize("ref", [torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64)])
def test_relative_rmse_of_a_zero_reference_is_refused(ref):
    """The relative error of a zero reference is undefined: it read inf (or NaN for x = 0) silently."""
    for x in (torch.ones_like(ref), torch.zeros_like(ref)):
        with pytest.raises(ValueError, match=r"^relative_rmse: ref is all zero; .*nonzero entry$"):
            sd.metrics.relative_rmse(x, ref)


@pytest.mark.parametrize("size", [1e-200, 1e200])
def test_relative_rmse_of_a_tiny_or_huge_reference(size):
    """The value does not depend on the units: the squares of 1e-200 underflowed (0 / 0 = NaN) and
    those of 1e200 overflowed (inf / inf = NaN); the example of the first test, scaled."""
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    x = ref + torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert sd.metrics.relative_rmse(x * size, ref * size) == pytest.approx((3 / 25) ** 0.5, rel=1e-15)


def test_mmd_of_a_tiny_bandwidth_is_the_coincidence_limit():
    """As h -> 0 the kernel is 1 on coinciding points and 0 elsewhere: x = {0, 2}, y = {0, 4} share one
    of their 4 cross pairs, so MMD^2 -> 0 + 0 - 2 / 4. h = 1e-200 read NaN (h^2 underflowed to 0, and
    the diagonal's 0 / 0)."""
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [4.0]], dtype=torch.float64)
    assert sd.metrics.mmd(x, y, bandwidth=1e-200) == -0.5
