"""SGDD (split Gibbs discrete diffusion posterior sampling) against the exact posterior of a mixture,
enumerated over its 81 sequences, and against the exact law of its own output, propagated over every
sequence (``discrete_reference.sgdd_law``, independent of the sampler's code)."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers.base import NonFiniteError

from .discrete_reference import mixture, sequences, sgdd_law, tv, tv_floor

F64 = torch.float64
MIX = mixture(L=4, V=3, K=3)
X = sequences(4, 3)
F = torch.rand(4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
PROC = sd.discrete.UniformProcess(3)
DEN = MIX.denoiser(PROC)


def tilt(x: torch.Tensor) -> torch.Tensor:
    """A per-position log-likelihood, ``3 sum_i F[i, x^i]``: its posterior is ``MIX.tilt(F, 3)``."""
    return 3.0 * F[torch.arange(4), x].sum(-1)


def parity(x: torch.Tensor) -> torch.Tensor:
    """A log-likelihood of all tokens together, ``3 [sum_i x^i = 1 mod 3]`` (the paper's XOR task's kind)."""
    return 3.0 * (x.sum(-1) % 3 == 1).to(F64)


def posterior(log_likelihood) -> torch.Tensor:
    """``p(x) exp(l(x)) / Z`` over every sequence, in ``table`` order."""
    p = MIX.table() * log_likelihood(X).exp()
    return p / p.sum()


def distance(law: torch.Tensor, target: torch.Tensor) -> float:
    return 0.5 * float((law - target).abs().sum())


def test_the_enumerated_posterior_is_the_mixture_tilt():
    torch.testing.assert_close(posterior(tilt), MIX.tilt(F, 3.0).table(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("log_likelihood", [tilt, parity])
def test_samples_follow_the_exact_law_of_the_algorithm(log_likelihood):
    """The implementation is the algorithm: 8,000 chains within the floor of exact draws of its output's
    exact law (6 iterations of 2 denoising steps and 10 Metropolis-Hastings steps)."""
    law = sgdd_law(MIX, PROC, log_likelihood, 6, 2, 10, 2e-5)
    x = sd.discrete.sgdd(
        DEN, log_likelihood, shape=(8000, 4), iterations=6, denoise_steps=2, mh_steps=10,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    floor, sd_floor = tv_floor(law, 8000)
    assert tv(MIX.index(x), law) < floor + 4 * sd_floor


def test_the_exact_law_approaches_the_posterior_as_iterations_grow():
    """Exact laws (2 denoising steps, 20 Metropolis-Hastings steps an iteration): 0.337 / 0.201 / 0.0862 in
    TV from the posterior at 1 / 4 / 16 iterations (docs/discrete.md: 0.047 at 50, 0.029 at 200), against
    0.420 for the prior and 0.341 for the likelihood alone."""
    target = posterior(tilt)
    prior, alone = distance(MIX.table(), target), distance(torch.softmax(tilt(X), 0), target)
    exact = {n: distance(sgdd_law(MIX, PROC, tilt, n, 2, 20, 2e-5), target) for n in (1, 4, 16)}
    assert exact[1] > exact[4] > exact[16]
    assert exact[16] < 0.1 < 0.3 * prior and 0.3 < exact[1] < alone


def test_samples_reach_the_floor_of_the_posterior_and_beat_the_prior():
    """100 iterations (NFE 200): 4,000 chains 0.051 from the posterior, floor 0.044 ± 0.005; the prior's
    samples (the unguided model) 0.42."""
    target = posterior(tilt)
    x, info = sd.discrete.sgdd(
        DEN, tilt, shape=(4000, 4), iterations=100, denoise_steps=2, mh_steps=20,
        generator=torch.Generator().manual_seed(0), return_info=True,
    )  # fmt: skip
    assert info.nfe == 200
    floor, sd_floor = tv_floor(target, 4000)
    assert tv(MIX.index(x), target) < floor + 4 * sd_floor
    unguided = sd.discrete.sample(DEN, (4000, 4), steps=32, generator=torch.Generator().manual_seed(0))
    assert tv(MIX.index(unguided), target) > 0.35


def test_one_iteration_without_metropolis_hastings_is_the_ancestral_sampler():
    x = sd.discrete.sgdd(DEN, tilt, shape=(50, 4), iterations=1, denoise_steps=5, mh_steps=0,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    y = sd.discrete.sample(DEN, (50, 4), steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, y)


def test_nfe_likelihood_calls_and_reproducibility():
    calls = {"net": 0, "l": 0}

    def net(x_t, t):
        calls["net"] += 1
        return DEN.net(x_t, t)

    def counted(x):
        calls["l"] += 1
        return tilt(x)

    den = sd.discrete.UniformDenoiser(net, PROC, time_map=DEN.time_map)
    gens = [torch.Generator().manual_seed(k) for k in range(6)]
    x, info = sd.discrete.sgdd(den, counted, shape=(6, 4), iterations=7, denoise_steps=3, mh_steps=5,
                               generator=gens, return_info=True)  # fmt: skip
    assert (info.nfe, calls["net"]) == (21, 21)
    assert (info.likelihood_calls, calls["l"]) == (42, 42)
    assert info.times.tolist() == torch.linspace(1, 2e-5, 7, dtype=F64).tolist()
    assert info.acceptance.shape == (7,) and bool(((info.acceptance >= 0) & (info.acceptance <= 1)).all())
    # one generator per row: a row is the same whatever its batch; one generator: the same per seed
    y = sd.discrete.sgdd(den, tilt, shape=(2, 4), iterations=7, denoise_steps=3, mh_steps=5,
                         generator=[torch.Generator().manual_seed(k) for k in range(2)])  # fmt: skip
    assert torch.equal(x[:2], y)
    runs = [sd.discrete.sgdd(DEN, tilt, shape=(6, 4), iterations=3, denoise_steps=2, mh_steps=5,
                             generator=torch.Generator().manual_seed(1)) for _ in range(2)]  # fmt: skip
    assert torch.equal(*runs)


def test_a_differentiable_log_likelihood_keeps_no_graph_across_steps():
    """A log-likelihood that builds a graph (a parameter, as a classifier's): each call's saved tensors are
    freed once the chain moves on. The accepted values were kept with their graphs, chained by ``torch.where``
    over an iteration's Metropolis-Hastings steps: up to 23 calls' tensors alive (their activations, for a
    network; 200 steps an iteration by default); now 1, the call's own."""
    table = torch.nn.Parameter(F.clone())
    saved: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []

    def log_likelihood(x: torch.Tensor) -> torch.Tensor:
        h = table[torch.arange(4), x]
        saved.append(weakref.ref(h))  # h is saved by the product's backward
        alive.append(sum(r() is not None for r in saved))
        return 3.0 * (h * h).sum(-1)

    x = sd.discrete.sgdd(DEN, log_likelihood, shape=(5, 4), iterations=2, denoise_steps=1, mh_steps=20,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(alive) == 42 and max(alive) == 1, alive
    assert not x.requires_grad


def test_bad_input_is_refused():
    kw = {"shape": (2, 4), "iterations": 2, "denoise_steps": 1, "mh_steps": 1}
    cases = [
        (
            {"den": MIX.denoiser(sd.discrete.MaskedProcess(3))},
            r"den must be a steerdiff.discrete.UniformDenoiser",
        ),
        ({"log_likelihood": 3}, r"log_likelihood must be callable, got int"),
        ({"shape": (2, 4, 1)}, r"shape must be a shape \(batch, length\), got \(2, 4, 1\)"),
        ({"iterations": 0}, r"iterations must be an integer >= 1, got 0"),
        ({"denoise_steps": 0}, r"denoise_steps must be an integer >= 1, got 0"),
        ({"mh_steps": -1}, r"mh_steps must be an integer >= 0, got -1"),
        ({"t_min": 0.0}, r"t_min must be a finite number in \(0, 1\), got 0.0"),
        ({"t_min": 1.0}, r"t_min must be a finite number in \(0, 1\), got 1.0"),
        (
            {"log_likelihood": lambda x: x.sum(-1, keepdim=True)},
            r"must return a real tensor of shape \(2,\), got ",
        ),
        (
            {"log_likelihood": lambda x: x.sum(-1) > 3},
            r"must return a real tensor of shape \(2,\), got torch.bool \(2,\)",
        ),
        (
            {"log_likelihood": lambda x: torch.full((len(x),), math.nan)},
            r"returned NaN or \+inf at iteration 0",
        ),
        ({"generator": [torch.Generator()]}, r"generator"),
    ]
    for change, message in cases:
        args = {"den": DEN, "log_likelihood": tilt, **kw, **change}
        with pytest.raises(ValueError, match=rf"discrete.sgdd: .*{message}"):
            sd.discrete.sgdd(args.pop("den"), args.pop("log_likelihood"), **args)
    nan = sd.discrete.UniformDenoiser(lambda x, t: torch.full((len(x), 4, 3), math.nan), PROC)
    with pytest.raises(
        NonFiniteError, match=r"discrete.sgdd: at step 0 .*UniformDenoiser: the network returned NaN"
    ):
        sd.discrete.sgdd(nan, tilt, **kw)
