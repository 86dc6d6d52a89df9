"""``steps=None`` (the default) at every entry point taking ``steps`` and ``schedule``: an explicit grid's
count (``len(times)`` nodes then the clean state with ``final="zero"``, ``len(times) - 1`` with
``final="none"`` and in the inversions), else the entry point's own default; a ``steps`` that disagrees
with the grid is refused naming both (:func:`steerdiff.solvers.base.count_steps`).

Before: ``sd.sample(den, x_T, schedule=[999, 600, 300, 0])`` was refused ("steps must equal len(times) = 4
... got steps=10"), at every entry point whose ``steps`` defaulted to a number."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import steerdiff as sd
from steerdiff.inverse import Matrix
from steerdiff.rf_inversion import rf_edit, rf_invert
from steerdiff.solvers.dc_solver import ExactReference, search_ratios

F64 = torch.float64
PROC = sd.VP.discrete(betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2)
GMM = sd.toy.GaussianMixture(
    torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=F64), torch.full((2, 2), 0.3, dtype=F64), torch.ones(2)
)
DEN = GMM.denoiser(PROC)
TIMES = [999.0, 600.0, 300.0, 0.0]  # VP.discrete's t_min is 0: the last time is a node, not the clean state
A = torch.tensor([[1.0, 0.0]], dtype=F64)
Y = torch.tensor([0.5], dtype=F64)
X = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _reward(x: Tensor) -> Tensor:
    return -(x - 1.0).square().sum(-1)


def _out(result: Any) -> Tensor:
    """The tensor a run returns: a sample (of ``(sample, info)``), ``Particles.x``."""
    if isinstance(result, tuple):
        result = result[0]
    return result if isinstance(result, Tensor) else result.x


FLOW = sd.RectifiedFlow()
FLOW_DEN = GMM.denoiser(FLOW)
FLOW_TIMES = [0.999, 0.6, 0.3, 0.001]


def _smc(kw: dict[str, Any]) -> dict[str, Any]:
    return {**kw, "shape": (2, 2), "particles": 3, "generator": _g()}


# run(steps, schedule, final) -> result, the entry point's default steps where no grid is explicit, and the
# final it runs (None: the caller's final= is passed, "none": an inversion's, which has none)
RUNS: dict[str, tuple[Callable[..., Any], int, str | None]] = {
    "sample": (lambda n, s, f: sd.sample(DEN, X, n, "ddim", s, final=f), 10, None),
    "invert": (lambda n, s, f: sd.invert(DEN, X, n, "ddim", s), 10, "none"),
    "ddpm_invert": (lambda n, s, f: sd.ddpm_invert(DEN, X, n, "ddpm", s, generator=_g()).xs[0], 10, "none"),
    "eta_invert": (lambda n, s, f: torch.stack(sd.eta_invert(DEN, X, n, s, generator=_g()).z), 50, "none"),
    "rf_invert": (lambda n, s, f: rf_invert(FLOW_DEN, X, X, 0.5, n, "ddim", s), 10, "none"),
    "rf_edit": (lambda n, s, f: rf_edit(FLOW_DEN, X, X, 1.0, 0.0, 0.25, n, "ddim", s, final=f), 10, None),
    "adjoint": (
        lambda n, s, f: sd.adjoint(DEN, X, lambda x: x.square().sum(), n, s, final=f)[1]["x_T"],
        10,
        None,
    ),
    "paradigms": (lambda n, s, f: sd.paradigms(DEN, X, n, "ddim", s, final=f), 10, None),
    "pcd_sample": (
        lambda n, s, f: sd.guidance.pcd_sample(DEN, X, lambda x: x.clamp(-1, 1), n, "ddim", s, final=f),
        100,
        None,
    ),
    "epsilon_norms": (
        lambda n, s, f: sd.guidance.epsilon_norms(DEN, X, X, n, "ddim", s).sampling,
        10,
        "zero",
    ),
    "pcg": (
        lambda n, s, f: sd.guidance.pcg(DEN, DEN, X, n, 1.5, schedule=s, final=f, generator=_g()),
        10,
        None,
    ),
    "repaint_sample": (
        lambda n, s, f: sd.guidance.repaint_sample(DEN, Matrix(A), Y, X, n, schedule=s, generator=_g()),
        10,
        "zero",
    ),
    "search_ratios": (
        lambda n, s, f: torch.tensor(
            search_ratios(
                DEN, X, n, s, reference=ExactReference(GMM, PROC, X), iters=2, final=f
            ).solver.ratios
        ),
        10,
        None,
    ),
    "run_smc": (
        lambda n, s, f: sd.smc.run_smc(
            DEN, sd.smc.particles.SMCAlgorithm(), steps=n, schedule=s, final=f, **_smc({})
        ),
        100,
        None,
    ),
    "fk_steering": (
        lambda n, s, f: sd.smc.fk_steering(DEN, _reward, 1.0, steps=n, schedule=s, final=f, **_smc({})),
        100,
        None,
    ),
    "tds": (
        lambda n, s, f: sd.smc.tds(
            DEN, Matrix(A), Y, noise_std=0.5, steps=n, schedule=s, final=f, **_smc({})
        ),
        100,
        None,
    ),
    "best_of_n": (
        lambda n, s, f: sd.smc.best_of_n(DEN, _reward, steps=n, schedule=s, final=f, **_smc({})),
        100,
        None,
    ),
    "code": (
        lambda n, s, f: sd.smc.code(DEN, _reward, block=2, steps=n, schedule=s, final=f, **_smc({})),
        100,
        None,
    ),
    "svdd": (
        lambda n, s, f: sd.smc.svdd(DEN, _reward, 0.5, steps=n, schedule=s, final=f, **_smc({})),
        100,
        None,
    ),
    "psi_sampler": (
        lambda n, s, f: sd.smc.psi_sampler(
            DEN, _reward, 1.0, steps=n, schedule=s, final=f, mcmc_steps=2, **_smc({})
        ),
        100,
        None,
    ),
    "afdps": (
        lambda n, s, f: sd.smc.afdps(
            DEN, Matrix(0.1 * A), Y, noise_std=1.0, steps=n, schedule=s, final=f, **_smc({})
        ),
        100,
        None,
    ),
    "fkc": (lambda n, s, f: sd.smc.fkc([DEN], [2.0], steps=n, schedule=s, final=f, **_smc({})), 100, None),
    "driftlite": (
        lambda n, s, f: sd.smc.driftlite([DEN], [2.0], steps=n, schedule=s, final=f, **_smc({})),
        100,
        None,
    ),
    "dts": (
        lambda n, s, f: sd.smc.dts(
            DEN, _reward, 1.0, shape=(2, 2), rollouts=2, steps=n, schedule=s, final=f, generator=_g()
        ),
        50,
        None,
    ),
    "rbf": (
        lambda n, s, f: sd.smc.rbf(
            DEN, _reward, 24, shape=(2, 2), steps=n, schedule=s, final=f, generator=_g()
        ),
        10,
        None,
    ),
}
FLOWS = ("rf_invert", "rf_edit")


def _times(name: str) -> list[float]:
    return FLOW_TIMES if name in FLOWS else TIMES


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("final", ["zero", "none"])
def test_an_explicit_grid_sets_the_step_count(name: str, final: str) -> None:
    run, _, fixed = RUNS[name]
    if fixed is not None and fixed != final:
        pytest.skip(f"{name} runs final={fixed!r} only")
    times = _times(name)
    n = len(times) if final == "zero" else len(times) - 1
    counted, given = _out(run(None, times, final)), _out(run(n, times, final))
    assert torch.equal(counted, given), name
    # a schedule object alike, and a steps that disagrees with the grid is refused naming both
    assert torch.equal(_out(run(None, sd.schedules.Custom(times), final)), given), name
    with pytest.raises(ValueError, match=rf"schedule has {len(times)} times.*got steps={n + 1}"):
        run(n + 1, times, final)


@pytest.mark.parametrize("name", [k for k, (_, default, _) in RUNS.items() if default > 0 and default <= 10])
def test_without_an_explicit_grid_steps_none_is_the_default(name: str) -> None:
    run, default, fixed = RUNS[name]
    final = fixed or "zero"
    assert torch.equal(_out(run(None, "time_uniform", final)), _out(run(default, "time_uniform", final)))


def test_long_defaults_count_their_steps() -> None:
    """The particle methods' 100 (DTS's 50) and pcd_sample's 100, in network evaluations and grids."""
    fk = sd.smc.fk_steering(DEN, _reward, 0.0, shape=(1, 2), particles=1, generator=_g())
    assert fk.nfe == 100
    tree = sd.smc.dts(DEN, _reward, 0.0, shape=(1, 2), rollouts=1, generator=_g())
    assert tree.nfe == 50
    _, info = sd.guidance.pcd_sample(DEN, X, lambda x: x, generator=_g(), return_info=True)
    assert info.grid.steps == 100 and info.nfe == 100


def test_sample_info_reports_the_counted_steps() -> None:
    for final, n in (("zero", 4), ("none", 3)):
        _, info = sd.sample(DEN, X, schedule=TIMES, final=final, return_info=True)
        assert info.grid.steps == n and info.nfe == sd.solvers.get("unipc").nfe(n, clean_end=final == "zero")
        assert info.grid.t[: len(TIMES)] == TIMES
    _, info = sd.sample(DEN, X, return_info=True)
    assert info.grid.steps == 10


def test_a_list_ending_at_t_min_and_one_ending_at_the_clean_state() -> None:
    """Under EDM (``t_min`` 0.002) a list ending at ``t_min`` is nodes only: ``len`` steps, into the clean
    state; k-diffusion's ``sigmas`` end at the clean state 0, below the range: refused with the fix, whose
    count is then k-diffusion's (``len(sigmas) - 1``)."""
    edm = sd.EDM()
    den, x = GMM.denoiser(edm), 80.0 * X
    at_t_min = [80.0, 10.0, 1.0, 0.002]
    _, info = sd.sample(den, x, solver="ddim", schedule=at_t_min, return_info=True)
    assert info.grid.steps == 4 and info.grid.sigma[-1] == 0.0 and info.grid.t[3] == 0.002
    sigmas = [80.0, 10.0, 1.0, 0.1, 0.0]  # k-diffusion: 4 steps
    for steps in (None, 4):
        with pytest.raises(ValueError, match=r"sigmas\[:-1\]"):
            sd.sample(den, x, steps, "ddim", sigmas)
    out, info = sd.sample(den, x, solver="ddim", schedule=sigmas[:-1], return_info=True)
    assert info.grid.steps == 4 and torch.equal(out, sd.sample(den, x, 4, "ddim", sigmas[:-1]))
    # VP.discrete's 0 is its t_min, a node: no such hint there
    with pytest.raises(ValueError) as err:
        sd.sample(DEN, X, 3, "ddim", TIMES)
    assert "sigmas" not in str(err.value), err.value


# each without steps (positional order unchanged: pcg's gamma after it, by keyword), and with sd.sample's 10
OMITTED = {
    "paradigms": (
        lambda: sd.paradigms(DEN, X, return_info=True),
        lambda: sd.paradigms(DEN, X, 10, return_info=True),
    ),
    "pcg": (
        lambda: sd.guidance.pcg(DEN, DEN, X, gamma=1.5, generator=_g(), return_info=True),
        lambda: sd.guidance.pcg(DEN, DEN, X, 10, 1.5, generator=_g(), return_info=True),
    ),
    "repaint_sample": (
        lambda: sd.guidance.repaint_sample(DEN, Matrix(A), Y, X, generator=_g(), return_info=True),
        lambda: sd.guidance.repaint_sample(DEN, Matrix(A), Y, X, 10, generator=_g(), return_info=True),
    ),
}


@pytest.mark.parametrize("name", OMITTED)
def test_steps_omitted_is_the_sample_default(name: str) -> None:
    """``paradigms``, ``pcg``, ``repaint_sample`` had no default ``steps``: now ``sd.sample``'s, bitwise."""
    omitted, given = OMITTED[name]
    (x, info), (ref, ref_info) = omitted(), given()
    assert torch.equal(x, ref) and info.grid.steps == 10 and info.nfe == ref_info.nfe > 0


def test_pcg_gamma_stays_required() -> None:
    """``pcg``'s ``gamma`` follows ``steps``: its default ``None`` exists only for the signature, refused."""
    for run in (lambda: sd.guidance.pcg(DEN, DEN, X), lambda: sd.guidance.pcg(DEN, DEN, X, 4)):
        with pytest.raises(ValueError, match=r"^pcg: gamma is required, a real number >= 0"):
            run()
