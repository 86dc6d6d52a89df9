"""Resamplers and ESS: unbiased offspring counts, variance ordering, exact structural properties.

Each resampler is run on many independent copies of one weight vector at once (one batch row per
copy), so the offspring counts ``O_i`` are i.i.d. draws whose mean must be ``N W_i`` (z-test at a
fixed seed) and whose variances order as the theory says: multinomial has ``Var O_i =
N W_i (1 - W_i)`` exactly, stratified/residual/systematic have less.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.smc import resample as rs

F64 = torch.float64
N = 8
REPS = 20_000
# non-uniform weights with a zero weight, a dominant particle and values straddling integers of N W
W = torch.tensor([0.31, 0.0, 0.05, 0.12, 0.2, 0.07, 0.1, 0.15], dtype=F64)
LOG_W = W.log()  # log 0 = -inf: a zero weight


def counts(name: str, seed: int = 0, log_w: torch.Tensor = LOG_W) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = rs.get(name)(log_w.expand(REPS, -1).contiguous(), g)
    assert idx.shape == (REPS, log_w.shape[0]) and idx.dtype == torch.long
    return rs.offspring(idx).to(F64)


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_offspring_unbiased(name):
    o = counts(name)
    assert bool((o.sum(-1) == N).all())
    assert float(o[:, 1].max()) == 0  # a zero weight is never drawn
    mean, sd = o.mean(0), o.std(0)
    expected = N * W
    z = (mean - expected) / (sd / math.sqrt(REPS)).clamp_min(1e-12)
    # deterministic parts (sd = 0) must match exactly; the rest within 4.5 standard errors
    assert torch.allclose(mean[sd == 0], expected[sd == 0], atol=1e-12)
    assert float(z[sd > 0].abs().max()) < 4.5, (name, z)


def test_variance_ordering():
    var = {name: counts(name, seed=1).var(0) for name in rs.RESAMPLERS}
    exact_multinomial = N * W * (1 - W)
    # multinomial matches its exact variance (within 5% where it is not 0)
    nz = exact_multinomial > 0
    assert torch.allclose(var["multinomial"][nz], exact_multinomial[nz], rtol=0.05)
    # residual: the R left are multinomial on the fractional parts f_i: Var O_i = f_i (1 - f_i / R)
    frac = N * W - (N * W).floor()
    exact_residual = frac * (1 - frac / frac.sum())
    nz = exact_residual > 0
    assert torch.allclose(var["residual"][nz], exact_residual[nz], rtol=0.05)
    total = {k: float(v.sum()) for k, v in var.items()}
    # measured (seed 1): multinomial 6.44, residual 3.33, stratified 1.67, systematic 1.33
    assert total["residual"] < 0.6 * total["multinomial"], total
    for name in ("stratified", "systematic"):
        assert total[name] < 0.3 * total["multinomial"], total
    for name in ("stratified", "systematic", "residual"):
        assert bool((var[name] <= exact_multinomial * 1.05 + 1e-12).all()), name
    assert total["systematic"] < total["stratified"] < total["residual"], total


def test_structural_properties():
    """Systematic: each count is floor(N W_i) or ceil(N W_i); residual keeps floor(N W_i) copies;
    stratified: counts differ from N W_i by less than 2."""
    nw = N * W
    o = counts("systematic", seed=2)
    assert bool(((o >= nw.floor()) & (o <= nw.ceil())).all())
    o = counts("residual", seed=2)
    assert bool((o >= nw.floor()).all())
    o = counts("stratified", seed=2)
    assert bool(((o - nw).abs() < 2).all())


def test_uniform_weights_systematic_is_identity():
    g = torch.Generator().manual_seed(0)
    idx = rs.systematic(torch.zeros(5, 16, dtype=F64), g)
    assert torch.equal(idx, torch.arange(16).expand(5, 16))


def test_reproducible_per_seed():
    log_w = torch.randn(4, 32, generator=torch.Generator().manual_seed(5), dtype=F64)
    for name, fn in rs.RESAMPLERS.items():
        a = fn(log_w, torch.Generator().manual_seed(7))
        b = fn(log_w, torch.Generator().manual_seed(7))
        assert torch.equal(a, b), name


def test_ess():
    assert torch.allclose(rs.ess(torch.zeros(3, 10, dtype=F64)), torch.full((3,), 10.0, dtype=F64))
    one_hot = torch.full((1, 10), -math.inf, dtype=F64)
    one_hot[0, 3] = 0.0
    assert float(rs.ess(one_hot)) == pytest.approx(1.0)
    log_w = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), dtype=F64)
    w = torch.softmax(log_w, -1)
    assert torch.allclose(rs.ess(log_w), 1 / (w * w).sum(-1), rtol=1e-12)
    assert torch.allclose(rs.ess(log_w + 123.0), rs.ess(log_w), rtol=1e-12)  # scale-free
    assert sd.smc.ess is rs.ess
    with pytest.raises(
        ValueError, match=r"^ess: log_w must be a tensor of log-weights, got list"
    ):  # was TypeError
        rs.ess([0.0, 1.0])


def test_ess_of_float32_log_weights_far_from_zero():
    """``2 logsumexp(log_w) - logsumexp(2 log_w)`` is a difference of two numbers near ``2 max log_w``: in
    float32 at ``1e6`` (spacing 0.125) it was 10% off the ESS of the very same weights (measured: 0.105 at
    ``1e6``, 1.3e-3 at ``1e4``). Relative to the row's largest log-weight it keeps float32's accuracy."""
    k = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    for offset in (1e4, 1e6):
        log_w = (offset + k / 16).to(torch.float32)  # exactly representable in float32
        exact = rs.ess((k / 16).to(F64))  # the same weights
        got = rs.ess(log_w)
        assert got.dtype == torch.float32
        assert torch.allclose(got.to(F64), exact, rtol=1e-5, atol=0), (offset, got, exact)
    # rows with no distribution stay NaN, a one-hot row is 1
    odd = torch.tensor(
        [[-math.inf] * 3, [math.nan, 0.0, 0.0], [math.inf, 0.0, 0.0], [5.0, -math.inf, -math.inf]]
    )
    assert rs.ess(odd)[:3].isnan().all() and float(rs.ess(odd)[3]) == 1.0
    # no particles (was NaN, then amax's IndexError), or no log-weights at all (an integer tensor ran)
    for bad, got in (
        (torch.zeros(2, 0), "torch.float32 (2, 0)"),
        (torch.zeros(2, 3, dtype=torch.long), "torch.int64 (2, 3)"),
    ):
        with pytest.raises(ValueError) as e:
            rs.ess(bad)
        assert (
            str(e.value)
            == f"ess: log_w must be floating log-weights with particles >= 1 (the last dimension), got {got}"
        )


def test_indices_from_counts():
    c = torch.tensor([[2, 0, 1, 1], [0, 0, 0, 4]])
    assert rs.indices_from_counts(c).tolist() == [[0, 0, 2, 3], [3, 3, 3, 3]]


def test_bad_input():
    with pytest.raises(ValueError, match="log_w"):
        rs.systematic(torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="log_w"):
        rs.multinomial(torch.zeros(2, 0, dtype=F64))
    with pytest.raises(ValueError, match="resampler"):
        rs.get("bootstrap")


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_bad_input_names_the_resampler(name):
    """The messages named the argument alone ("log_w must be ...", "generator must be None, ...", "generator:
    1 generators for a batch of 2 rows"), not the resampler called."""
    fn = rs.RESAMPLERS[name]
    for call, message in [
        (
            lambda: fn(torch.zeros(8, dtype=F64), None),
            f"{name}: log_w must be a floating (batch, particles) tensor with particles >= 1, got (8,)",
        ),
        (
            lambda: fn(torch.zeros(2, 3, dtype=F64), "seed"),
            f"{name}: generator must be None, one torch.Generator or a list of batch = 2 of them (one per "
            "batch row), got str",
        ),
        (
            lambda: fn(torch.zeros(2, 3, dtype=F64), [torch.Generator()]),
            f"{name}: generator must be None, one torch.Generator or a list of batch = 2 of them (one per "
            "batch row), got a list of 1",
        ),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message


# rows with no distribution: a NaN weight, a +inf weight, every weight zero
NO_DIST = torch.tensor(
    [[0.0, 0.0, 0.0, 0.0], [math.nan, 0.0, 0.0, 0.0], [math.inf, 0.0, 0.0, 0.0], [-math.inf] * 4], dtype=F64
)


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_rows_without_a_distribution(name, monkeypatch):
    """CPU tensors are refused naming the row (before: [3, 3, 3, 3] from systematic, [4, 4, 4, 4] =
    N from residual); on an accelerator (tensors that are not CPU ones, faked: no device read) the
    indices stay in [0, N), so they cannot take another row's particles before run_smc reports."""
    fn = rs.RESAMPLERS[name]
    for row in (1, 2, 3):
        with pytest.raises(ValueError) as e:
            fn(NO_DIST[[0, row]], torch.Generator().manual_seed(0))
        assert (
            str(e.value) == f"{name}: log_w has no distribution in row 1 (a NaN or +inf weight, or all -inf)"
        )
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    idx = fn(NO_DIST, torch.Generator().manual_seed(0))
    assert idx.shape == (4, 4) and int(idx.min()) >= 0 and int(idx.max()) <= 3, idx


@pytest.mark.parametrize("n", [9, 10, 100])
def test_residual_keeps_every_particle_of_equal_weights(n):
    """Equal weights: N W_i = 1, one copy of each particle and nothing left to draw. In float64 N W_i is
    0.99...9 for these N; its floor, 0, made every offspring multinomial (count variance 0.9, not 0)."""
    log_w = torch.zeros(50, n, dtype=F64)
    idx = rs.residual(log_w, torch.Generator().manual_seed(0))
    assert torch.equal(idx, torch.arange(n).expand(50, n))


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_largest_uniform_never_selects_a_trailing_zero_weight(name, monkeypatch):
    """The largest uniform ``torch.rand`` returns, ``1 - 2^-53``, makes systematic's and stratified's
    last point ``(N - 1 + U) / N`` round to 1.0 (for N = 3), past every cumulative sum: the index was
    capped at ``N - 1``, a zero weight (before: ``[0, 1, 2]`` for weights ``(1, 1, 0)``)."""
    top = 1 - 2.0**-53
    monkeypatch.setattr(
        rs,
        "_uniform",
        lambda log_w, g, cols=None: torch.full((log_w.shape[0], cols or log_w.shape[1]), top, dtype=F64),
    )
    log_w = torch.tensor([[0.0, 0.0, -math.inf], [-math.inf, 0.0, -math.inf], [0.0, 1.0, 2.0]], dtype=F64)
    idx = rs.RESAMPLERS[name](log_w, None)
    assert int(idx[:2].max()) == 1, idx  # never particle 2 (zero weight) in rows 0 and 1
    assert int(idx[2].max()) == 2  # a positive last weight is still reached


def test_systematic_exact_expected_counts(monkeypatch):
    """Exact expectation over systematic's one uniform ``U`` per row (the counts are piecewise constant
    in ``U``; a midpoint grid of 2^16 values integrates them to within 8 breakpoints / 2^16):
    ``E[O_i] = N W_i``, and every count is ``floor(N W_i)`` or ``ceil(N W_i)``."""
    k = 2**16
    grid = ((torch.arange(k, dtype=F64) + 0.5) / k)[:, None]
    monkeypatch.setattr(rs, "_uniform", lambda log_w, g, cols=None: grid)
    o = rs.offspring(rs.systematic(LOG_W.expand(k, -1).contiguous(), None)).to(F64)
    assert float((o.mean(0) - N * W).abs().max()) < 8 / k
    nw = N * W
    assert bool(((o >= nw.floor()) & (o <= nw.ceil())).all())


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_smallest_uniform_never_selects_a_leading_zero_weight(name, monkeypatch):
    """``torch.rand`` may return 0.0 (systematic's first point is then ``u_1 = 0``): ``a = min{i : W_1 + ... +
    W_i > u}`` is the first particle of positive weight, never a zero weight before it (which a search for
    ``>=`` would give: ``W_1 = 0 >= 0``)."""
    monkeypatch.setattr(
        rs,
        "_uniform",
        lambda log_w, g, cols=None: torch.zeros(log_w.shape[0], cols or log_w.shape[1], dtype=F64),
    )
    log_w = torch.tensor([[-math.inf, 0.0, 0.0], [-math.inf, -math.inf, 0.0], [0.0, 1.0, 2.0]], dtype=F64)
    idx = rs.RESAMPLERS[name](log_w, None)
    assert int(idx[0].min()) == 1 and torch.equal(idx[1], torch.full((3,), 2)), idx
    assert int(idx[2].min()) == 0  # a positive first weight is still reached


@pytest.mark.parametrize("name", sorted(rs.RESAMPLERS))
def test_any_normalization_of_the_log_weights(name):
    """The contract takes log-weights of any normalization: shifted by a constant far past ``exp``'s range
    (``exp(800) = inf``, ``exp(-800) = 0`` in float64; ``exp(96)`` overflows float32), the same generator
    gives the same ancestors (the values are multiples of 1/16, exact in float32 and after the shifts)."""
    k = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(3))
    log_w = k.to(F64) / 16 - 2
    want = rs.RESAMPLERS[name](log_w, torch.Generator().manual_seed(9))
    for shifted in (log_w + 800, log_w - 800, (log_w + 96).float()):
        got = rs.RESAMPLERS[name](shifted, torch.Generator().manual_seed(9))
        assert torch.equal(got, want), (name, shifted.dtype)


def test_residual_near_integer_counts_and_its_exact_remainder():
    """``N W_1`` within ``FLOOR_TOL`` below an integer (``2 - 4e-11``) keeps that integer's copies, and its
    residual weight, ``-4e-11`` by round-off, is zero, not a negative weight whose log is NaN (which spoils
    the whole row's draw of the remainder): with ``N W = (2 - 4e-11, 1.2, 0.8, 0)`` the one particle left
    goes to particle 1 w.p. 0.2 and to particle 2 w.p. 0.8, exactly (the fractional parts), so the offspring
    counts are ``(2, 2, 0, 0)`` or ``(2, 1, 1, 0)``, the first with frequency 0.2 within 4.5 standard
    errors."""
    w = torch.tensor([0.5 - 1e-11, 0.3, 0.2 + 1e-11, 0.0], dtype=F64)
    o = rs.offspring(rs.residual(w.log().expand(REPS, 4).contiguous(), torch.Generator().manual_seed(0)))
    a, b = torch.tensor([2, 2, 0, 0]), torch.tensor([2, 1, 1, 0])
    first, second = (o == a).all(-1), (o == b).all(-1)
    assert bool((first | second).all()), o[~(first | second)][:4]
    p, se = 0.2, math.sqrt(0.2 * 0.8 / REPS)
    assert abs(float(first.double().mean()) - p) < 4.5 * se
