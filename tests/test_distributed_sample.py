"""sd.distributed.sample / sample_discrete on 2 and 3 gloo ranks against single-process runs.

Oracle: the single-process sampler (``sd.sample``, ``sd.discrete.sample``, each checked against exact laws
elsewhere) on the whole batch with the same initial noise and per-sample generators; a sample must not
depend on the number of ranks, so the gathered batch equals it bitwise (CPU, float64, exact mixture
denoisers). Batch 7 gives uneven shards (4 + 3, 3 + 2 + 2); batch 2 on 3 ranks leaves one empty. Noise that
differs between the ranks is refused on every rank, naming the argument.
"""

from __future__ import annotations

import contextlib
import datetime
import io

import pytest
import torch
import torch.distributed as dist

import steerdiff as sd

from .distributed import outcomes, spawn

F64 = torch.float64
NULL = -1
N, L_TOK = 7, 3
CL = torch.channels_last


def _gmm(shift: float) -> sd.toy.GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [1.0, -1.5]], dtype=F64) + shift
    return sd.toy.GaussianMixture(
        means, torch.tensor([[0.3, 0.2], [0.25, 0.4]], dtype=F64), torch.ones(2, dtype=F64)
    )


def labelled() -> sd.Denoiser:
    """An exact x0-net ``net(x, t, y)`` with one label per row: ``y = 0 / 1`` a class (mixture shifted by
    -2 / +2), ``NULL`` their equal-weight mixture (unconditional)."""
    process = sd.VP.linear()
    laws = {0: _gmm(-2.0), 1: _gmm(2.0)}
    means = torch.cat([laws[0].means, laws[1].means])
    laws[NULL] = sd.toy.GaussianMixture(means, torch.cat([laws[0].variances] * 2), torch.ones(4, dtype=F64))

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, s = float(process.alpha(t[0])), float(process.sigma(t[0]))
        out = torch.empty_like(x)
        for label, law in laws.items():
            rows = y == label
            if bool(rows.any()):
                out[rows] = law.denoise(x[rows], a, s)
        return out

    return sd.Denoiser(net, process, prediction="x0", shape=(2,))


def plain() -> sd.Denoiser:
    return _gmm(0.0).denoiser(sd.VP.linear())


def guided(n: int) -> sd.Denoiser:
    den = labelled()
    return sd.guidance.CFG(den, den, 3.0, uncond_kwargs={"y": torch.full((n,), NULL)})


def images() -> sd.Denoiser:
    """The exact denoiser of a 4-d mixture seen as ``(2, 1, 2)`` images, whose net returns its input's
    memory layout (as a convolutional net does)."""
    exact = sd.toy.default_benchmark_mixture(dim=4, components=3).denoiser(sd.VP.linear(), shape=(2, 1, 2))
    return sd.Denoiser(
        lambda x, t: torch.empty_like(x).copy_(exact.net(x, t)), exact.process, "x0", shape=(2, 1, 2)
    )


def image_noise(n: int) -> torch.Tensor:
    return torch.randn(n, 2, 1, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def gens(n: int, seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def noise(n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def mixture() -> sd.toy.CategoricalMixture:
    probs = torch.tensor([[[0.7, 0.2, 0.1]] * L_TOK, [[0.1, 0.3, 0.6]] * L_TOK], dtype=F64)
    return sd.toy.CategoricalMixture(torch.tensor([0.4, 0.6]), probs)


def partly_masked(n: int, mask_id: int) -> torch.Tensor:
    """Token ids with 0 to 3 masked positions per row (first_hitting's steps: the most masked row's count)."""
    x = torch.zeros(n, L_TOK, dtype=torch.long)
    for i in range(n):
        x[i, : i % (L_TOK + 1)] = mask_id
    return x


def _runs(group, n: int, world: int):
    """Every mode on this rank's shard of ``n``; with ``world == 3`` also batch 2 (an empty rank)."""
    ds = sd.distributed
    out = {
        "default": ds.sample(plain(), noise(n), 6, group=group),
        "ddpm": ds.sample(plain(), noise(n), 6, "ddpm", group=group, generator=gens(n)),
        "seed": ds.sample(plain(), None, 6, "ddpm", group=group, shape=(n, 2), seed=5, dtype=F64),
        "cfg": ds.sample(guided(n), noise(n), 6, group=group, y=labels(n)),
        "shard": ds.sample(
            plain(), noise(n), 6, "ddpm", group=group, generator=gens(n), gather=False, return_info=True
        ),
    }
    proc = sd.discrete.MaskedProcess(3)
    den = mixture().denoiser(proc)
    cfg = sd.discrete.CFG(den, den, 2.0, uncond_kwargs={"y": torch.full((n,), NULL)})
    out["discrete"] = ds.sample_discrete(cfg, (n, L_TOK), 4, group=group, seed=9, y=labels(n))
    out["first_hitting"] = ds.sample_discrete(
        den, partly_masked(n, proc.mask_id), sampler="first_hitting", group=group, generator=gens(n)
    )
    rank, again = dist.get_rank(), gens(n)
    ds.sample(plain(), noise(n), 6, "ddpm", group=group, generator=again)
    # each rank drew from its shard's generators only: the list's states differ between the ranks now
    out["again"] = ds.sample(plain(), noise(n), 6, "ddpm", group=group, generator=again)
    x_T = image_noise(n)  # channels_last on rank 0 alone: the same values, so the same noise
    out["channels_last"] = ds.sample(
        images(),
        x_T.contiguous(memory_format=CL) if rank == 0 else x_T,
        6,
        "ddpm",
        group=group,
        generator=gens(n),
    )
    # noise that differs between the ranks: refused on every rank; a short timeout fails a rank left waiting
    quick = dist.new_group(timeout=datetime.timedelta(seconds=20))
    differing = {
        "x_T": lambda: ds.sample(plain(), noise(n) + rank, 6, group=quick),
        "x_T's rows": lambda: ds.sample(plain(), noise(n).roll(rank, 0), 6, group=quick),
        "generator": lambda: ds.sample(
            plain(), noise(n), 6, "ddpm", group=quick, generator=gens(n, 100 * rank)
        ),
        "seed": lambda: ds.sample(plain(), None, 6, "ddpm", group=quick, shape=(n, 2), seed=5 + rank),
        "x_T or shape": lambda: ds.sample(
            plain(),
            noise(n) if rank else None,
            6,
            "ddpm",
            group=quick,
            generator=gens(n) if rank else None,
            **({} if rank else {"shape": (n, 2), "seed": 100, "dtype": F64}),
        ),
        "tokens": lambda: ds.sample_discrete(
            den, partly_masked(n, proc.mask_id).roll(rank, 0), 4, group=quick, seed=9
        ),
        "discrete seed": lambda: ds.sample_discrete(den, (n, L_TOK), 4, group=quick, seed=9 + rank),
        "discrete generator": lambda: ds.sample_discrete(
            den, (n, L_TOK), 4, group=quick, generator=gens(n, 9 + 100 * rank)
        ),
    }
    out["differing"] = {}
    for key, call in differing.items():
        try:
            call()
            out["differing"][key] = "accepted"
        except ValueError as e:
            out["differing"][key] = str(e)

    def fail_on_rank_1(state: dict) -> None:
        if dist.get_rank() == 1:
            raise ArithmeticError("rank 1's own failure")

    bars = io.StringIO(), io.StringIO()  # one bar for the group: rank 0's
    with contextlib.redirect_stderr(bars[0]):
        ds.sample(plain(), noise(n), 2, group=group, progress=True)
    with contextlib.redirect_stderr(bars[1]):
        ds.sample_discrete(den, (n, L_TOK), 2, group=group, seed=9, progress=True)
    out["bars"] = tuple("/2 [" in bar.getvalue() for bar in bars)
    try:
        ds.sample(plain(), noise(n), 2, group=group, callback=fail_on_rank_1)
    except Exception as e:  # every rank raises: rank 1 its error, the others naming it
        out["failure"] = f"{type(e).__name__}: {e}"
    if world == 3:
        out["small"] = ds.sample(
            plain(), None, 6, "ddpm", group=group, shape=(2, 2), seed=5, dtype=F64, return_info=True
        )
        out["small_discrete"] = ds.sample_discrete(den, (2, L_TOK), 4, group=group, seed=9)
    return out


def _single(n: int) -> dict[str, torch.Tensor]:
    """The same runs on this process, on the whole batch."""
    x_T, g = sd.distributed.seeded((n, 2), 5, dtype=F64)
    proc = sd.discrete.MaskedProcess(3)
    den = mixture().denoiser(proc)
    cfg = sd.discrete.CFG(den, den, 2.0, uncond_kwargs={"y": torch.full((n,), NULL)})
    again = gens(n)
    sd.sample(plain(), noise(n), 6, "ddpm", generator=again)
    return {
        "again": sd.sample(plain(), noise(n), 6, "ddpm", generator=again),
        "channels_last": sd.sample(
            images(), image_noise(n).contiguous(memory_format=CL), 6, "ddpm", generator=gens(n)
        ),
        "default": sd.sample(plain(), noise(n), 6),
        "ddpm": sd.sample(plain(), noise(n), 6, "ddpm", generator=gens(n)),
        "seed": sd.sample(plain(), x_T, 6, "ddpm", generator=g),
        "cfg": sd.sample(guided(n), noise(n), 6, y=labels(n)),
        "discrete": sd.discrete.sample(cfg, (n, L_TOK), 4, generator=gens(n, 9), y=labels(n)),
        "first_hitting": sd.discrete.sample(
            den, partly_masked(n, proc.mask_id), sampler="first_hitting", generator=gens(n)
        ),
        "small_discrete": sd.discrete.sample(den, (2, L_TOK), 4, generator=gens(2, 9)),
    }


def close(x: torch.Tensor, want: torch.Tensor) -> None:
    """Token ids equal; samples to 1e-12: ``sd.sample`` on one process already gives a sample in a batch of 3
    and of 7 to 5.6e-16 only (seed mode, ddpm; the mixture's products round by batch size)."""
    if want.is_floating_point():
        torch.testing.assert_close(x, want, rtol=0, atol=1e-12)
    else:
        assert torch.equal(x, want)


# three ranks: in make test-slow, out of make test's default run (two ranks stay in it)
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_same_samples_as_one_process(world):
    single = _single(N)
    shards = sd.distributed.Ranks(0, world).sizes(N)
    starts = [sum(shards[:k]) for k in range(world)]
    for rank, out in enumerate(spawn(_runs, world, N, world)):
        for key, want in single.items():
            if key.startswith("small") and world != 3:
                continue
            assert out[key].dtype == want.dtype
            close(out[key], want)
        assert out["bars"] == ((True, True) if rank == 0 else (False, False))
        # sd.sample keeps a channels_last x_T's layout; so does the gathered batch (was: contiguous)
        assert single["channels_last"].is_contiguous(memory_format=CL)
        assert out["channels_last"].is_contiguous(memory_format=CL) == (rank == 0)
        for key, names in {
            "x_T": "x_T differs",
            "x_T's rows": "x_T differs",
            "generator": "generator differs",
            "seed": "seed differs",
            "x_T or shape": "x_T, generator, shape, seed, dtype differ",
            "tokens": "x_T differs",
            "discrete seed": "seed differs",
            "discrete generator": "generator differs",
        }.items():
            who = "sample_discrete" if key in ("tokens", "discrete seed", "discrete generator") else "sample"
            assert out["differing"][key] == (
                f"distributed.{who}: {names} between the group's ranks; every rank must make the same call: "
                "the same x_T (the whole batch's), generators seeded alike (not with the rank), the same "
                "shape=, seed= and dtype=: each rank samples its shard of the batch it is given"
            )
        x, info = out["shard"]
        close(x, single["ddpm"][starts[rank] : starts[rank] + shards[rank]])
        assert info.nfe == 6  # each rank's evaluations, on its shard: the single-process count
        if rank == 1:
            assert out["failure"] == "ArithmeticError: rank 1's own failure"
        else:
            assert out["failure"] == (
                f"RuntimeError: distributed.sample: rank(s) [1] of the group failed (each raised its error); "
                f"so stops rank {rank}"
            )
        if world == 3:  # batch 2: shards 1, 1, 0
            x, info = out["small"]
            close(x, single["seed"][:2])  # sample i's noise is seed + i's, whatever the batch
            assert info.nfe == (0 if rank == 2 else 6)
            assert torch.equal(out["small_discrete"], single["small_discrete"])


def test_seeded_rows_are_the_batch_rows_and_one_process_is_sd_sample():
    x_T, g = sd.distributed.seeded((N, 2), 5, dtype=F64)
    part, _ = sd.distributed.seeded((N, 2), 5, range(3, 5), dtype=F64)
    assert torch.equal(part, x_T[3:5])  # sample i's noise is its generator's, seed + i
    assert torch.equal(x_T[1], torch.randn(2, generator=torch.Generator().manual_seed(6), dtype=F64))
    x, info = sd.distributed.sample(
        guided(N), None, 6, "ddpm", group=None, shape=(N, 2), seed=5, dtype=F64, return_info=True, y=labels(N)
    )
    assert torch.equal(x, sd.sample(guided(N), x_T, 6, "ddpm", generator=g, y=labels(N)))
    assert info.nfe == 12  # CFG: two evaluations per step


def _bad(**kw):
    args = {"den": plain(), "x_T": noise(N), "steps": 4, "group": None, **kw}
    return lambda: sd.distributed.sample(**args)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_bad(group=3), r"distributed.sample: group must be None .* got int"),
        (_bad(shape=(N, 2), seed=1), r"distributed.sample: x_T, shape: give x_T .* not both"),
        (_bad(x_T=None), r"x_T, shape: give x_T .* got neither"),
        (_bad(seed=1), r"distributed.sample: seed goes with shape="),
        (_bad(device="cpu"), r"distributed.sample: device goes with shape="),
        (
            _bad(x_T=None, shape=(N, 2), seed=1.5),
            r"distributed.sample: seed must be an integer >= 0, got 1.5",
        ),
        (_bad(x_T=None, shape=(N, 2)), r"distributed.sample: seed must be an integer >= 0, got None"),
        (
            _bad(x_T=None, shape=(N, 3), seed=0),
            r"distributed.sample: shape has sample shape \(3,\), the denoiser",
        ),
        (_bad(x_T=None, shape=(N,), seed=0), r"distributed.sample: shape must be a batch's"),
        (_bad(x_T=None, shape=(N, 2), seed=0, generator=gens(N)), r"generator goes with x_T"),
        (
            _bad(generator=gens(N - 1)),
            r"generator must be None or a list of one torch.Generator per sample \(7\).*"
            r"got a list of 6",
        ),
        (
            _bad(generator=torch.Generator()),
            r"distributed.sample: generator must be None or a list .* got Generator",
        ),
        (
            _bad(solver="ddpm"),
            r"distributed.sample: generator: the run draws noise \(ddpm\): pass one generator",
        ),
        (_bad(x_T=noise(N)[:0]), r"distributed.sample: x_T has no samples"),
        (_bad(gather="no"), r"distributed.sample: gather must be True or False"),
        (_bad(corrector="ula", generator=gens(N)), r"distributed.sample: corrector must have a step_size"),
        (
            _bad(den=sd.guidance.RePaint(plain(), sd.inverse.Matrix(torch.eye(2, dtype=F64)), noise(N))),
            r"distributed.sample: den: RePaint draws noise of its own",
        ),
        (_bad(steps=0), r"distributed.sample: steps must be an integer >= 1"),
        (
            lambda: sd.distributed.seeded((N, 2), 0, range(5, 9)),
            r"distributed.seeded: rows must be None or a non-empty range\(start, stop\) within range\(7\)",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_discrete_arguments():
    den = mixture().denoiser(sd.discrete.MaskedProcess(3))
    for kw, match in [
        ({}, r"distributed.sample_discrete: seed, generator: every sampler draws noise; .* got neither"),
        ({"seed": 1, "generator": gens(N)}, r"seed, generator: .* not both"),
        ({"seed": "1"}, r"distributed.sample_discrete: seed must be an integer >= 0, got '1'"),
        ({"generator": gens(2)}, r"generator must be None or a list of one torch.Generator per sample \(7\)"),
        ({"seed": 0, "group": "world"}, r"distributed.sample_discrete: group must be None"),
    ]:
        with pytest.raises(ValueError, match=match):
            sd.distributed.sample_discrete(den, (N, L_TOK), 4, **{"group": None, **kw})


def _refused_on_last(group) -> tuple[list[list[str]], list[float], torch.Tensor]:
    """sample and sample_discrete with an argument refused on the last rank alone (steps, seed, the shape),
    in each mode (x_T; shape= and seed=; a shape of tokens), on a group whose collectives time out after 6 s;
    every rank's outcome gathered after each (:func:`~tests.distributed.outcomes`); then a run that goes
    through on the same group."""
    ds = sd.distributed
    quick = dist.new_group(timeout=datetime.timedelta(seconds=6))
    last = dist.get_rank() == dist.get_world_size() - 1
    den = mixture().denoiser(sd.discrete.MaskedProcess(3))
    runs = (
        lambda: ds.sample(plain(), noise(N), -1 if last else 6, "ddpm", group=quick, generator=gens(N)),
        lambda: ds.sample(plain(), None, 6, "ddpm", group=quick, shape=(N, 2), seed=-1 if last else 5),
        lambda: ds.sample_discrete(den, (N,) if last else (N, L_TOK), 4, group=quick, seed=9),
    )
    said, seconds = outcomes(quick, runs)
    return said, seconds, ds.sample(plain(), noise(N), 6, "ddpm", group=quick, generator=gens(N))


def test_an_argument_refused_on_one_rank_is_raised_by_every_rank():
    """The last rank raises its own ValueError and the other a RuntimeError naming it, at once (the set-up
    ends in the all_reduce of the arguments' agreement, which carries every rank's failure flag). Was: the
    last rank raised alone, the other waited at that all_reduce until the group's 6 s timeout. The run after
    them equals the one-process run bitwise."""
    own = [
        "ValueError: distributed.sample: steps must be an integer >= 1, got -1",
        "ValueError: distributed.sample: seed must be an integer >= 0, got -1",
        "ValueError: distributed.sample_discrete: x_T must be a shape (batch, length)",
    ]
    alone = sd.sample(plain(), noise(N), 6, "ddpm", generator=gens(N))
    for said, seconds, after in spawn(_refused_on_last, 2, timeout=150):
        for (other, last), mine in zip(said, own, strict=True):
            assert last.startswith(mine), (last, mine)
            who = mine.split(":")[1].strip()
            assert (
                other
                == f"RuntimeError: {who}: rank(s) [1] of the group failed (each raised its error); "
                + ("so stops rank 0")
            ), other
        assert max(seconds) < 3, seconds
        assert torch.equal(after, alone)
