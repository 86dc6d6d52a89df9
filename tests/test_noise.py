"""Noise sources: per-sample generators are batch-size invariant, the Brownian tree gives additive
unit-variance increments and couples runs with different step counts, bad generators are refused."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff._brownian import SeedHash

from .reference import noise, rel_rmse

F64 = torch.float64


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("solver", ["ddpm", "euler_maruyama", "euler_ancestral"])
def test_per_sample_generators_are_batch_size_invariant(gmm, sd_process, solver):
    den, x_T = gmm.denoiser(sd_process), noise(5, 8)
    kw = {"steps": 12, "solver": solver, "schedule": "time_uniform"}
    batch = sd.sample(den, x_T, generator=_gens([10, 11, 12, 13, 14]), **kw)
    for row in (0, 3):
        alone = sd.sample(den, x_T[row : row + 1], generator=_gens([10 + row]), **kw)
        assert torch.allclose(batch[row : row + 1], alone, rtol=0, atol=1e-12)
    # and the noise matters: another seed for row 0 gives another sample
    other = sd.sample(den, x_T[:1], generator=_gens([99]), **kw)
    assert rel_rmse(other, batch[:1]) > 1e-2


def _tree(like: torch.Tensor, seed: int = 3) -> sd.noise.BrownianTreeNoise:
    return sd.noise.BrownianTreeNoise(like, 0.0, 999.0, seed=seed)


def test_brownian_increments_are_additive():
    like = torch.zeros(2, 6, dtype=F64)
    tree = _tree(like)
    a, b, c = 900.0, 512.25, 40.5  # sampling order: decreasing time
    whole = tree(a, c, like) * math.sqrt(a - c)
    parts = tree(a, b, like) * math.sqrt(a - b) + tree(b, c, like) * math.sqrt(b - c)
    assert torch.allclose(whole, parts, rtol=0, atol=1e-12)
    # the same query gives the same increment; the two rows are independent paths
    assert torch.equal(tree(a, b, like), tree(a, b, like))
    assert not torch.allclose(whole[0], whole[1])


def test_brownian_increments_have_unit_variance():
    n = 20000
    like = torch.zeros(1, n, dtype=F64)
    tree = _tree(like)
    tol = 5 * math.sqrt(2 / n)  # 5 standard errors of a sample variance
    z1, z2 = tree(999.0, 700.0, like), tree(700.0, 1.5, like)
    for z in (z1, z2):
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
        assert abs(float(z.var()) - 1) < tol
    assert abs(float((z1 * z2).mean())) < 5 / math.sqrt(n)  # disjoint intervals: independent


@pytest.mark.parametrize(
    "solver",
    [
        "ddpm",
        sd.solvers.DDIM(eta=0.5),
        "euler_ancestral",
        "euler_maruyama",
        "edm_sde",
        sd.solvers.EDMStochasticHeun(s_tmin=0.0, s_tmax=math.inf),
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
        "dpmpp_sde",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "sa_solver",
        "er_sde",
        "accel_ddpm",
        sd.solvers.Restart(restart_info=[(0.1, 2.0, 2, 3), (0.3, 5.0, 1, 3)]),
        "tcd",
        "lcm",
    ],
    ids=str,
)
@pytest.mark.parametrize("final", ["zero", "none"])
def test_every_draw_of_a_run_is_on_its_own_range_of_time(gmm, final, solver):
    """A Brownian tree's draws are independent only on disjoint ranges of time, so every draw a run makes
    must have a range of its own, and a nonempty one (an empty range gets no noise from a tree). edm_sde
    drew its churn on ``[t_i, t^]``, which overlapped the steps before: 31 pairs at 40 karras steps."""
    ranges: list[tuple[float, float]] = []

    def record(t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
        ranges.append((min(t_from, t_to), max(t_from, t_to)))
        return torch.zeros_like(like)

    sd.sample(gmm.denoiser(sd.EDM()), noise(2, 8), 40, solver, "karras", final=final, generator=record)
    assert len(ranges) >= 3 and all(hi > lo for lo, hi in ranges), ranges
    overlaps = [(a, b) for a, b in itertools.combinations(ranges, 2) if a[0] < b[1] and b[0] < a[1]]
    assert not overlaps, overlaps[:3]


@pytest.mark.slow  # 10-17 s: in make test-slow, out of make test's default run
def test_brownian_tree_couples_step_counts(gmm, sd_process):
    # Euler-Maruyama converges strongly on one Brownian path: 400 and 1600 steps agree closely;
    # with independent noise they are unrelated draws. Measured: 2.7e-3 vs 1.3.
    den, x_T = gmm.denoiser(sd_process), noise(1, 8)
    kw = {"solver": "euler_maruyama", "schedule": "time_uniform"}

    def tree() -> sd.noise.BrownianTreeNoise:
        return sd.noise.BrownianTreeNoise(x_T, sd_process.t_min, sd_process.t_max, seed=5)

    fine = sd.sample(den, x_T, steps=1600, generator=tree(), **kw)
    coupled = sd.sample(den, x_T, steps=400, generator=tree(), **kw)
    independent = sd.sample(den, x_T, steps=400, generator=torch.Generator().manual_seed(5), **kw)
    assert rel_rmse(coupled, fine) < 1e-2
    assert rel_rmse(independent, fine) > 0.1


def test_brownian_tree_returns_noise_in_the_states_dtype(gmm, sd_process):
    """The path is kept in the work dtype of the tensor it was built from (float32 for bfloat16) and
    each increment comes back in the dtype of the state it is added to. Before: a tree built from a
    bfloat16 ``x_T`` gave bfloat16 noise to the float32 state, and a float64 tree turned a float32
    run into a float64 one after its first stochastic step."""
    x64 = noise(3, 8)
    like32 = x64.float()
    a, b = 700.0, 300.0
    # built from bfloat16: the float32 tree of the same seed, bit for bit
    bf16_tree, f32_tree = _tree(x64.bfloat16()), _tree(like32)
    z = bf16_tree(a, b, like32)
    assert z.dtype == torch.float32 and torch.equal(z, f32_tree(a, b, like32))
    assert bf16_tree(a, b, x64.bfloat16()).dtype == torch.bfloat16
    # a float64 tree queried at a float32 state: its float64 increment, rounded to float32
    f64_tree = _tree(x64)
    z64 = f64_tree(a, b, x64)
    assert z64.dtype == F64 and torch.equal(f64_tree(a, b, like32), z64.float())

    seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def spy(source: sd.noise.NoiseSource) -> sd.noise.NoiseSource:
        def draw(t_from: float, t_to: float, like: torch.Tensor) -> torch.Tensor:
            z = source(t_from, t_to, like)
            seen.add((like.dtype, z.dtype))
            return z

        return draw

    den, kw = gmm.denoiser(sd_process), {"steps": 10, "solver": "euler_maruyama", "schedule": "time_uniform"}
    for x_T, built in ((x64.bfloat16(), x64.bfloat16()), (like32, x64)):
        seen.clear()
        tree = sd.noise.BrownianTreeNoise(built, sd_process.t_min, sd_process.t_max, seed=1)
        out = sd.sample(den, x_T, generator=spy(tree), **kw)
        assert seen == {(torch.float32, torch.float32)} and out.dtype == x_T.dtype


def test_generator_list_of_wrong_length(gmm, sd_process):
    with pytest.raises(ValueError, match=r"generator: 3 generators for a batch of 5"):
        sd.sample(gmm.denoiser(sd_process), noise(5, 8), steps=4, solver="ddpm", generator=_gens([0, 1, 2]))
    with pytest.raises(ValueError, match="generator"):
        sd.sample(gmm.denoiser(sd_process), noise(2, 8), steps=4, solver="ddpm", generator=[0, 1])


@pytest.mark.parametrize(
    ("generator", "words"),
    [
        ("abc", ["generator must be", "torch.Generator", "a list of them", "noise source", "str", "'abc'"]),
        (b"ab", ["generator must be", "bytes"]),
        (5, ["generator must be", "int"]),
        ([], ["generator: a list must hold one torch.Generator per sample", "empty list"]),
        ([torch.Generator(), 1.5], ["generator: a list must hold one torch.Generator", "float"]),
    ],
)
def test_bad_generator_names_the_accepted_types(gmm, sd_process, generator, words):
    # before: a str counted as a list and was reported as "a list must hold one torch.Generator"
    with pytest.raises(ValueError) as err:
        sd.sample(gmm.denoiser(sd_process), noise(2, 8), steps=2, solver="ddpm", generator=generator)
    msg = str(err.value)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("fn", ["randn", "rand"])
def test_draws_on_the_generators_device_then_moves(monkeypatch, fn):
    """A CPU generator with a sample on another device (torch refuses such a generator): the numbers
    are drawn on the generator's device and moved, so they equal the CPU draws (diffusers'
    ``randn_tensor`` convention). ``meta`` stands in for an accelerator here."""
    seen: list[object] = []
    real = getattr(torch, fn)

    def spy(*args: object, **kw: object) -> torch.Tensor:
        seen.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(torch, fn, spy)
    draw = getattr(sd.noise, fn)
    out = draw((3, 2), torch.Generator().manual_seed(0), torch.float32, "meta")
    assert out.device.type == "meta" and out.shape == (3, 2) and seen == [torch.device("cpu")]
    cpu = draw((3, 2), torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert torch.equal(cpu, real((3, 2), generator=torch.Generator().manual_seed(0)))
    # the sources of sd.sample use it: a CPU generator with a meta-device sample
    like = torch.empty(2, 3, device="meta")
    seen.clear()
    if fn == "randn":
        assert sd.noise.GeneratorNoise(torch.Generator())(0.0, 1.0, like).device.type == "meta"
        assert sd.noise.PerSampleNoise([torch.Generator(), torch.Generator()])(0.0, 1.0, like).shape == (2, 3)
        assert seen == [torch.device("cpu")] * 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        # before: torchsde's "Initial time 5.0 should be less than terminal time 1.0."
        ((5.0, 1.0), ["BrownianTreeNoise", "need t_min < t_max", "t_min=5.0", "t_max=1.0"]),
        ((1.0, 1.0), ["need t_min < t_max"]),
        ((0.0, math.inf), ["t_max", "finite", "inf"]),
        (("0", 1.0), ["t_min", "'0'"]),
        ((0.0, 1.0, 2.5), ["seed must be an integer", "2.5"]),
        ((0.0, 1.0, [1, 2]), ["seed has 2 seeds for a batch of 3"]),
        ((0.0, 1.0, [1, 2, 3.5]), ["seed[2] must be an integer", "3.5"]),
        # before: torchsde's "expected non-negative integer", naming no argument
        ((0.0, 1.0, -1), ["seed must be an integer >= 0", "-1"]),
        ((0.0, 1.0, [1, -2, 3]), ["seed[1] must be an integer >= 0", "-2"]),
    ],
)
def test_brownian_tree_names_bad_arguments(args, words):
    with pytest.raises(ValueError) as err:
        sd.noise.BrownianTreeNoise(torch.zeros(3, 2), *args)
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    with pytest.raises(ValueError, match=r"like must be a batched floating tensor.*got str"):
        sd.noise.BrownianTreeNoise("x", 0.0, 1.0)


@pytest.mark.parametrize("fn", ["randn", "rand"])
def test_draw_takes_one_generator_per_row(fn):
    # row b from generator[b], whatever the other rows (before: AttributeError on a list)
    draw = getattr(sd.noise, fn)
    rows = draw((3, 2, 4), [torch.Generator().manual_seed(s) for s in (5, 6, 7)], torch.float64, "cpu")
    alone = draw((1, 2, 4), [torch.Generator().manual_seed(6)], torch.float64, "cpu")
    assert torch.equal(rows[1:2], alone)
    assert torch.equal(rows[0], draw((2, 4), torch.Generator().manual_seed(5), torch.float64, "cpu"))
    # consecutive rows of one generator (a particle method's) come from one call: as one draw of them
    g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    shared = draw((5, 3, 5), [g, g, g, h, h], torch.float64, "cpu")
    ref_g = draw((3, 3, 5), torch.Generator().manual_seed(1), torch.float64, "cpu")
    ref_h = draw((2, 3, 5), torch.Generator().manual_seed(2), torch.float64, "cpu")
    assert torch.equal(shared, torch.cat([ref_g, ref_h]))
    with pytest.raises(ValueError, match=r"generator: 2 generators for a batch of 3 rows"):
        draw((3, 2), [torch.Generator()] * 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"generator must be None, a torch\.Generator or a list of them"):
        draw((2, 3), [torch.Generator(), 5], torch.float32, "cpu")


def test_brownian_tree_normalizes_by_the_interval_it_resolves():
    """torchsde's tree resolves times to 1e-6 (6 decimals): the increment over [0.3, 0.3000015] is the
    one over [0.3, 0.300001], divided by sqrt(1e-6) (before: by sqrt(1.5e-6), std 0.82); two times that
    round to one point give 0 (before: torchsde recursed without end, RecursionError)."""
    n = 20000
    big = torch.zeros(1, n, dtype=F64)
    tree = sd.noise.BrownianTreeNoise(big, 0.0, 1.0, seed=2)
    z = tree(0.3000015, 0.3, big)
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)  # measured 0.989
    like = torch.zeros(2, 3, dtype=F64)
    small = sd.noise.BrownianTreeNoise(like, 0.0, 1.0, seed=2)
    assert torch.equal(small(0.3000003, 0.3, like), torch.zeros_like(like))
    assert small(0.300001, 0.3, like).abs().min() > 0


def test_brownian_tree_refuses_a_step_outside_its_range(gmm, sd_process):
    """A tree over k-diffusion's sigma range [0.002, 80] under a VP process of times [0, 999]: every
    step above 80 was clamped to [80, 80] and got no noise, silently (8 of ddpm's 9 draws here)."""
    den, x_T = gmm.denoiser(sd_process), noise(2, 8)
    tree = sd.noise.BrownianTreeNoise(x_T, 0.002, 80.0, seed=1)
    with pytest.raises(ValueError, match=r"a step from t_from=999\.0 .* \[0\.002, 80\.0\]"):
        sd.sample(den, x_T, steps=10, solver="ddpm", schedule="time_uniform", generator=tree)
    # inside the range, and within its resolution of the ends: as before
    like = torch.zeros(2, 3, dtype=F64)
    tree = _tree(like)
    assert torch.equal(tree(999.0 + 5e-7, 500.0, like), tree(999.0, 500.0, like))
    assert torch.equal(tree(10.0, -5e-7, like), tree(10.0, 0.0, like))


def test_brownian_tree_refuses_a_state_of_another_shape():
    """Built for (2, 4): a (3, 4) state raised torch's reshape error, a (4, 2) one got the two paths
    reshaped across its rows, silently."""
    tree = sd.noise.BrownianTreeNoise(torch.zeros(2, 4), 0.0, 1.0, seed=0)
    for shape in ((3, 4), (4, 2)):
        msg = f"like has shape {shape}, the tree was built for (2, 4)"
        with pytest.raises(ValueError, match=re.escape(msg)):
            tree(0.9, 0.1, torch.zeros(shape))
    assert tree(0.9, 0.1, torch.zeros(2, 4, dtype=F64)).shape == (2, 4)


def _torchsde_increments(
    like: torch.Tensor, t0: float, t1: float, seeds: list[int]
) -> Callable[[float, float], torch.Tensor]:
    """The increments BrownianTreeNoise drew before it queried the batch at once: one torchsde tree per
    sample, ``torch.cat`` of their increments over ``[lo, hi]``."""
    torchsde = pytest.importorskip("torchsde")  # a dev dependency: the library no longer uses it

    trees = [
        torchsde.BrownianInterval(
            t0=t0, t1=t1, size=(1, *like.shape[1:]), dtype=like.dtype, entropy=s, tol=1e-6, halfway_tree=True
        )
        for s in seeds
    ]
    return lambda lo, hi: torch.cat([tree(lo, hi) for tree in trees])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cache", [None, 3])
def test_brownian_tree_draws_are_torchsdes_per_sample_trees(dtype, cache):
    """The batch's paths are queried together now (shared nodes, seeds hashed for all samples, one draw per
    split node and sample): each increment is still the one of torchsde's tree of the sample's seed, bit for
    bit, in sampling order, backwards and re-queried (restart), from the nodes kept or drawn again (a cache
    of 3 nodes); so a sample's path does not depend on its batch. Measured 3.1 s per query at 1000 samples
    of 64 dims in float64 before, 0.23 s now (0.11 s with cache_size=128)."""
    like = torch.zeros(4, 3, 5, dtype=dtype)
    seeds = [7, 8, 2**40 + 3, 2**300]  # seeds of 1, 2 and 10 words: numpy hashes them apart
    tree = sd.noise.BrownianTreeNoise(like, 0.002, 80.0, seed=seeds)
    if cache is not None:
        tree.paths.cache = cache
    old = _torchsde_increments(like, 0.002, 80.0, seeds)
    times = [80.0, 61.3, 40.25, 12.0, 3.1, 0.7, 0.002]
    queries = [*itertools.pairwise(times), (0.7, 2.5), (2.5, 9.9), (40.25, 61.3), (80.0, 0.002), (3.1, 12.0)]
    for t_from, t_to in queries:
        lo, hi = min(t_from, t_to), max(t_from, t_to)
        want = (1 if t_to > t_from else -1) / math.sqrt(hi - lo) * old(lo, hi)
        assert torch.equal(tree(t_from, t_to, like), want), (t_from, t_to)
    alone = sd.noise.BrownianTreeNoise(like[2:3], 0.002, 80.0, seed=[seeds[2]])
    assert torch.equal(alone(61.3, 0.7, like[2:3]), tree(61.3, 0.7, like)[2:3])


def test_seed_hash_is_numpys_seed_sequence():
    """The seeds of a node are hashed for all samples at once: numpy's SeedSequence, first word of state."""
    seeds = [0, 1, 5, 2**32 - 1, 2**32, 2**64 + 9, 2**256 - 1, 2**256, 3 * 2**290 + 1, 123456789]
    for key in [(), (0, 0), (5, 2), (2**30 + 3, 31), (2**40 + 1, 41)]:
        want = [np.random.SeedSequence(s, spawn_key=key, pool_size=8).generate_state(1)[0] for s in seeds]
        assert SeedHash(seeds).first_words(key).tolist() == want, key


@pytest.mark.parametrize(("cache_size", "most"), [(None, 55), (128, 25)])
def test_brownian_tree_draws_once_per_new_split(cache_size, most):
    """A sampling run's queries walk down the tree: torchsde drew each split node's noise for each child
    and, with 45 nodes kept per tree, drew the top of the path again at every query (70 draws per query
    and sample at 30 steps on [0, 999]); now a split draws once for both children, for the whole batch's
    rows: 52 draws per query with the default 45 kept nodes (the memory of before), and with 128 kept,
    about two queries' paths, about one draw per new split, 23 per query (measured 23.1)."""
    like = torch.zeros(3, 4, dtype=F64)
    kw = {} if cache_size is None else {"cache_size": cache_size}
    tree = sd.noise.BrownianTreeNoise(like, 0.0, 999.0, seed=0, **kw)
    draws: list[int] = []
    randn = tree.paths._randn

    def counted(seeds: np.ndarray) -> torch.Tensor:
        draws.append(len(seeds))
        return randn(seeds)

    tree.paths._randn = counted  # type: ignore[method-assign]
    times = torch.linspace(999.0, 0.0, 31).tolist()
    for t_from, t_to in itertools.pairwise(times):
        tree(t_from, t_to, like)
    assert set(draws) == {3} and len(draws) / 30 < most, len(draws) / 30
    assert len(tree.paths.cached) == tree.paths.cache == (cache_size or 45)  # the memory kept, in copies


def test_brownian_tree_cache_size_is_checked():
    with pytest.raises(ValueError, match=r"BrownianTreeNoise: cache_size must be an integer >= 1"):
        sd.noise.BrownianTreeNoise(torch.zeros(2, 3), 0.0, 1.0, cache_size=0)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_sample_checks_a_generator_list_whatever_the_solver(solver):
    # before: a deterministic solver never drew, so 2 generators for 3 rows passed with ddim (ddpm refused)
    gmm, proc = sd.toy.default_benchmark_mixture(dim=4), sd.VP.scaled_linear()
    x_T = torch.zeros(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"generator: 2 generators for a batch of 3 rows"):
        sd.sample(gmm.denoiser(proc), x_T, 4, solver, generator=[torch.Generator()] * 2)


@pytest.mark.parametrize("fn", [sd.noise.rand, sd.noise.randn])
def test_a_shard_keeps_its_rows_of_the_whole_batchs_draws(fn):
    # a rank's rows of 6 (two batch rows of 3 particles): the numbers one process draws there, and the
    # generators left as that process leaves them
    rows = torch.tensor([1, 2, 4, 5])
    for per_row in (False, True):
        seeds = [torch.Generator().manual_seed(s) for s in (0, 1)]
        alone = [seeds[0]] if not per_row else [g for g in seeds for _ in range(3)]
        whole = fn((6, 4), alone if per_row else alone[0], torch.float64, None)
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        source = gens[0] if not per_row else [g for g in gens for _ in range(3)]
        shard = sd.noise.Shard(source, 6, rows)
        assert torch.equal(fn((4, 4), shard, torch.float64, None), whole[rows])
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(seeds, gens, strict=True))
    with pytest.raises(ValueError, match=r"^generator: a shard of 4 rows asked for 3 rows$"):
        fn((3, 4), sd.noise.Shard(None, 6, rows), torch.float64, None)
