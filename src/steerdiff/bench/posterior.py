r"""``steerdiff bench posterior``: inverse-problem guidance against the exact posterior.

Prior: a Gaussian mixture, used through its exact denoiser under DDPM's linear betas
(``VP.discrete(betas=linspace(1e-4, 0.02, 1000))``, the schedule of the DPS, MCG, RePaint and
MCGdiff papers):

* ``gmm16``: :func:`~steerdiff.toy.default_benchmark_mixture` with 16 dimensions, 8 components;
* ``gmm64``: the embedded default model (64 dimensions, 10 components);
* ``grid8``, ``grid80``: the 25-component prior of Cardoso et al. 2023 ("Monte Carlo guided
  diffusion for Bayesian linear inverse problems", Sec. 5): means ``(8i, 8j, 8i, 8j, ...)`` for
  ``i, j in {-2, ..., 2}``, unit covariances, weights ``chi^2_1`` draws (normalized).

Observation (as Cardoso et al.): ``A`` is a ``(d_y, d)`` standard normal matrix whose singular values
are replaced by sorted ``U(0, 1)`` draws; ``y = A x* + s n`` with ``x*`` a prior draw. The exact
posterior is :meth:`~steerdiff.toy.GaussianMixture.posterior`.

Metric: sliced W2 (256 fixed projections) of ``n`` samples to ``4 n`` exact posterior samples,
beside the floor (``n`` exact samples, :func:`steerdiff.metrics.floor`) and the prior's distance
(``n`` prior samples). Every method runs ``sd.sample(..., solver="ddpm", schedule="time_uniform")``
(NFE = steps) from the same ``x_T`` and noise seed, except RePaint's resampling
(:func:`~steerdiff.guidance.repaint_sample`, its NFE at most the budget).

Methods and step-size grids (:data:`METHODS`); per case and NFE the step is tuned by descending
along the grid (from the default at NFE 50, from the previous NFE's best after that) to a local
minimum, in-sample (on the ``x_T``, noise and reference set the reported distance uses); every run is
in the CSV:

* ``dps``: :class:`~steerdiff.guidance.DPS`, ``variant="normalized"``; ``dps_squared``: ``"squared"``;
* ``dps_alg1``: the published loop literally (Chung et al. 2023 Alg. 1, the official code's step
  ``zeta grad ||r||`` added to every DDPM iterate, :func:`dps_alg1`);
* ``mcg``: :class:`~steerdiff.guidance.MCG` (normalized gradient + projection); ``pigdm``:
  :class:`~steerdiff.guidance.PiGDM`; ``repaint``: resampling ``(U, j)`` in ``(1, 1)``, ``(2, 1)``,
  ``(4, 10)``, ``(10, 10)`` (the paper's), each with the most steps whose NFE fits the budget.

Cases: by default 12 -- each prior with ``(d_y, s)`` in ``(1, 1)``, ``(2, 0.1)``, ``(4, 0.01)``
(every ``d_y`` and every noise level once per prior); ``full_grid`` runs all 36.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import metrics, sampling
from ..denoiser import Denoiser
from ..guidance import DPS, MCG, PiGDM, repaint_nfe, repaint_sample
from ..inverse import Inpaint, LinearOperator, Matrix
from ..processes import VP, Process
from ..schedules import get as get_schedule
from ..solvers.base import NonFiniteError, make_grid
from ..solvers.ddim import ancestral_split
from ..toy.gmm import GaussianMixture, default_benchmark_mixture
from ._figure import panel_figure, write_outputs
from .sde import steps_within
from .solvers import Row, csv_table, generator_for

__all__ = [
    "CASES",
    "DIMS_Y",
    "FULL_CASES",
    "INPAINT_CASES",
    "METHODS",
    "NFES",
    "NOISES",
    "OPERATORS",
    "PRIORS",
    "Case",
    "Method",
    "PosteriorBench",
    "ddpm_process",
    "dps_alg1",
    "format_report",
    "grid_prior",
    "make_case",
    "make_prior",
    "markdown_table",
    "mcgdiff_operator",
    "plot",
    "run",
    "tune",
    "write_results",
]

log = logging.getLogger(__name__)

F64 = torch.float64
NFES = (50, 100, 200)
QUICK_NFES = (50,)
PRIORS = ("gmm16", "gmm64", "grid8", "grid80")
DIMS_Y = (1, 2, 4)
NOISES = (0.01, 0.1, 1.0)
CASES = tuple((p, dy, s) for p in PRIORS for dy, s in ((1, 1.0), (2, 0.1), (4, 0.01)))
FULL_CASES = tuple((p, dy, s) for p in PRIORS for dy in DIMS_Y for s in NOISES)
QUICK_CASES = (("gmm16", 2, 0.1),)
INPAINT_CASES = (("gmm16", 8, 0.01, "inpaint"), ("gmm64", 32, 0.01, "inpaint"), ("grid8", 4, 0.01, "inpaint"))
OPERATORS = ("random", "inpaint")
PROJECTIONS = 256
REFERENCE_FACTOR = 4
HEADLINE = "gmm16"


def ddpm_process() -> Process:
    """DDPM's linear betas, ``linspace(1e-4, 0.02, 1000)`` (Ho et al. 2020)."""
    return VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))


def grid_prior(dim: int, generator: torch.Generator) -> GaussianMixture:
    """Cardoso et al.'s 25-component prior in ``dim`` (even) dimensions: means ``(8i, 8j)`` repeated,
    ``i, j in {-2..2}``, identity covariances, weights ``z^2``, ``z ~ N(0, 1)`` (normalized)."""
    means = torch.tensor(
        [[8.0 * i, 8.0 * j] * (dim // 2) for i in range(-2, 3) for j in range(-2, 3)], dtype=F64
    )
    weights = torch.randn(25, generator=generator, dtype=F64) ** 2
    return GaussianMixture(means, torch.ones(25, dim, dtype=F64), weights)


def make_prior(name: str, seed: int) -> GaussianMixture:
    """The prior called ``name`` (:data:`PRIORS`)."""
    if name == "gmm16":
        return default_benchmark_mixture(16, 8, seed=generator_for(seed, "prior", name).initial_seed())
    if name == "gmm64":  # the embedded default at seed 0; no other draw takes a small-integer seed
        return default_benchmark_mixture(64, 10, seed=seed)
    if name in ("grid8", "grid80"):  # one set of weights for both
        return grid_prior(int(name[4:]), generator_for(seed, "prior", "grid"))
    raise ValueError(f"unknown prior {name!r}; accepted: {PRIORS}")


def mcgdiff_operator(dim: int, dim_y: int, generator: torch.Generator) -> Tensor:
    """``U diag(s) V^T`` from the SVD of a standard normal ``(dim_y, dim)`` matrix, ``s`` sorted uniforms."""
    u, _, vh = torch.linalg.svd(torch.randn(dim_y, dim, generator=generator, dtype=F64), full_matrices=False)
    s = torch.rand(dim_y, generator=generator, dtype=F64).sort(descending=True).values
    return u @ torch.diag(s) @ vh


@dataclass
class Case:
    """One inverse problem: prior, observation, exact posterior, reference samples and baselines.
    ``key``: ``(seed, prior, dim_y, noise_std, operator)``, under which each of its draws has its own
    generator (:func:`~steerdiff.bench.solvers.generator_for`)."""

    prior_name: str
    dim_y: int
    noise_std: float
    gmm: GaussianMixture
    process: Process
    operator: LinearOperator
    A: Tensor
    y: Tensor
    posterior: GaussianMixture
    x_T: Tensor
    reference: Tensor
    floor: float
    prior_distance: float
    key: tuple[int, str, int, float, str]

    @property
    def label(self) -> str:
        """``prior[ inpaint] d_y=... s=...``: the case in the tables."""
        kind = " inpaint" if isinstance(self.operator, Inpaint) else ""
        return f"{self.prior_name}{kind} d_y={self.dim_y} s={self.noise_std:g}"

    @property
    def den(self) -> Denoiser:
        """The prior's exact denoiser under the case's process."""
        return self.gmm.denoiser(self.process)

    def distance(self, x: Tensor) -> float:
        """Sliced W2 of ``x`` to the reference set (``inf`` if ``x`` is not finite)."""
        if not bool(torch.isfinite(x).all()):
            return math.inf
        return sliced_w2(x, self.reference, self.key)

    def noise_generator(self) -> torch.Generator:
        """The generator of every method's sampling noise (the same for all)."""
        return generator_for(*self.key, "noise")


def sliced_w2(x: Tensor, y: Tensor, key: tuple[int, str, int, float, str]) -> float:
    """:func:`steerdiff.metrics.sliced_wasserstein` with the case ``key``'s :data:`PROJECTIONS` directions."""
    return metrics.sliced_wasserstein(x, y, PROJECTIONS, generator_for(*key, "projections"))


def make_case(
    prior: str, dim_y: int, noise_std: float, n: int, seed: int = 0, operator: str = "random"
) -> Case:
    """Build a case; every draw is seeded by ``(seed, prior, dim_y, noise_std, operator)`` and its purpose.

    ``operator="random"``: Cardoso et al.'s random ``A`` (:func:`mcgdiff_operator`); ``"inpaint"``:
    :class:`~steerdiff.inverse.Inpaint` observing the first ``dim_y`` coordinates.
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; accepted: {OPERATORS}")
    gmm = make_prior(prior, seed)
    key = (seed, prior, dim_y, noise_std, operator)
    g = generator_for(*key, "observation")
    if operator == "random":
        op: LinearOperator = Matrix(mcgdiff_operator(gmm.dim, dim_y, g))
    else:
        op = Inpaint(torch.arange(gmm.dim) < dim_y)
    A = op.to_dense(dtype=F64)
    y = A @ gmm.sample(1, g)[0] + noise_std * torch.randn(dim_y, generator=g, dtype=F64)
    post = gmm.posterior(A, y, noise_std)
    reference = post.sample(REFERENCE_FACTOR * n, generator_for(*key, "reference"))
    floor = metrics.floor(
        post.sample,
        n,
        lambda a, b: sliced_w2(a, b, key),
        repeats=3,
        generator=generator_for(*key, "floor"),
        reference=reference,
    )
    prior_dist = sliced_w2(gmm.sample(n, generator_for(*key, "prior samples")), reference, key)
    x_T = torch.randn(n, gmm.dim, generator=generator_for(*key, "x_T"), dtype=F64)
    return Case(
        prior, dim_y, noise_std, gmm, ddpm_process(), op, A, y, post, x_T, reference, floor, prior_dist, key
    )


def dps_alg1(
    den: Denoiser, A: Tensor, y: Tensor, x_T: Tensor, steps: int, zeta: float, generator: torch.Generator
) -> Tensor:
    """Chung et al. 2023, Alg. 1, literally: at every step
    ``x_{i+1} = DDPM(x_i, x0_hat(x_i)) - zeta grad_{x_i} ||y - A x0_hat||`` (the official code's step on the
    norm; per-sample norms) on the ``time_uniform`` grid of ``steps`` nodes; the last step returns
    ``x0_hat - zeta grad``."""
    grid = make_grid(den.process, get_schedule("time_uniform"), steps)
    dps = DPS(den, Matrix(A), y, scale=1.0)  # likelihood_score: g = -grad ||r||
    x = x_T
    for i in range(grid.steps):
        pred, g = dps.likelihood_score(x, grid.t[i])
        if grid.is_final_clean(i):
            return pred.x0 + zeta * g
        sigma_det, std = ancestral_split(grid, i, 1.0)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = pred.renoise(grid.alpha[i + 1], sigma_det) + std * z + zeta * g
    return x


Setting = TypeVar("Setting", bound=float | tuple[int, int])  # a step size or scale; RePaint's (U, j)


def _ddpm(case: Case, den: Denoiser, steps: int) -> tuple[Tensor, int]:
    x, info = sampling.sample(
        den,
        case.x_T,
        steps=steps,
        solver="ddpm",
        schedule="time_uniform",
        generator=case.noise_generator(),
        return_info=True,
    )
    return x, info.nfe


def _repaint(case: Case, config: tuple[int, int], budget: int) -> tuple[Tensor, int]:
    resample, jump = config
    steps = steps_within(lambda k: repaint_nfe(k, resample, jump), budget)
    if steps is None:
        raise ValueError(f"repaint U={resample} j={jump}: no step count fits in {budget} NFE")
    x, info = repaint_sample(
        case.den,
        case.operator,
        case.y,
        case.x_T,
        steps,
        resample=resample,
        jump=jump,
        generator=case.noise_generator(),
        return_info=True,
    )
    return x, info.nfe


@dataclass(frozen=True)
class Method(Generic[Setting]):
    """A method, its tuning grid (ordered), the grid index to start from and how to run it at a budget."""

    name: str
    grid: tuple[Setting, ...]
    start: int
    run: Callable[[Case, Setting, int], tuple[Tensor, int]]
    walk: bool = True  # descend along the grid (else: try every value)

    def label(self, value: Setting) -> str:
        """How a value of the method's setting reads in the tables."""
        if isinstance(value, tuple):
            return f"U={value[0]} j={value[1]}"
        return f"scale={value:g}" if self.name != "dps_alg1" else f"zeta={value:g}"

    def tuned(self, case: Case, nfes: Sequence[int]) -> list[tuple[str, dict[int, float]]]:
        """``(label, {nfe: sliced W2})`` of every run of :func:`tune`."""
        return [(self.label(value), errors) for value, errors in tune(case, self, nfes).items()]


def _log_grid(lo: int, hi: int) -> tuple[float, ...]:
    """``1e{lo}, 3e{lo}, ..., 1e{hi}``."""
    return tuple(float(f"{m}e{e}") for e in range(lo, hi + 1) for m in (1, 3) if not (e == hi and m == 3))


METHODS: tuple[Method[float] | Method[tuple[int, int]], ...] = (
    Method(
        "dps",
        _log_grid(-2, 4),
        6,
        lambda c, v, n: _ddpm(c, DPS(c.den, c.operator, c.y, c.noise_std, scale=v), n),
    ),
    Method(
        "dps_squared",
        _log_grid(-5, 1),
        10,
        lambda c, v, n: _ddpm(c, DPS(c.den, c.operator, c.y, c.noise_std, scale=v, variant="squared"), n),
    ),
    Method(
        "dps_alg1",
        _log_grid(-3, 1),
        6,
        lambda c, v, n: (dps_alg1(c.den, c.A, c.y, c.x_T, n, v, c.noise_generator()), n),
    ),
    Method(
        "mcg",
        (0.0, *_log_grid(-1, 4)),
        3,
        lambda c, v, n: _ddpm(c, MCG(c.den, c.operator, c.y, c.noise_std, scale=v), n),
    ),
    Method(
        "pigdm",
        _log_grid(-1, 2),
        2,
        lambda c, v, n: _ddpm(c, PiGDM(c.den, c.operator, c.y, c.noise_std, scale=v), n),
    ),
    Method("repaint", ((1, 1), (2, 1), (4, 10), (10, 10)), 0, _repaint, walk=False),
)


def _evaluate(case: Case, method: Method[Setting], value: Setting, budget: int) -> float:
    try:
        x, nfe = method.run(case, value, budget)
    except NonFiniteError:
        return math.inf
    if nfe > budget:
        raise RuntimeError(f"{method.name} {value} spent {nfe} NFE over the budget {budget}")
    return case.distance(x)


def tune(case: Case, method: Method[Setting], nfes: Sequence[int]) -> dict[Setting, dict[int, float]]:
    """Errors ``{value: {nfe: sliced W2}}`` of every run: at each NFE a descent along ``method.grid``
    from the previous NFE's best (from ``method.start`` at the first) to a local minimum, or every
    value when ``method.walk`` is false."""
    runs: dict[Setting, dict[int, float]] = {}
    start = method.start
    for nfe in nfes:

        def err(i: int, nfe: int = nfe) -> float:
            value = method.grid[i]
            if nfe not in runs.setdefault(value, {}):
                runs[value][nfe] = _evaluate(case, method, value, nfe)
            return runs[value][nfe]

        if not method.walk:
            for i in range(len(method.grid)):
                err(i)
            continue
        i = start
        while i > 0 and math.isinf(err(i)):  # diverged: smaller steps are the stable side
            i -= 1
        while True:
            nbrs = [j for j in (i - 1, i + 1) if 0 <= j < len(method.grid)]
            j = min(nbrs, key=err)
            if err(j) >= err(i):
                break
            i = j
        start = i
    return runs


@dataclass
class PosteriorBench:
    """Everything ``steerdiff bench posterior`` measured. ``rows``: per case (``source``), method and
    setting (``schedule``), sliced W2 per NFE; each case also has a ``floor`` and a ``prior`` row."""

    nfes: tuple[int, ...]
    n: int
    seed: int
    cases: list[str]
    rows: list[Row]
    seconds: dict[str, float] = field(default_factory=dict)

    def of(self, source: str) -> list[Row]:
        """The rows of one source."""
        return [r for r in self.rows if r.source == source]

    def baseline(self, case: str, kind: str) -> float:
        """The case's ``"floor"`` or ``"prior"`` distance."""
        return next(iter(next(r for r in self.of(case) if r.method == kind).errors.values()))

    def best(self, case: str, method: str, nfe: int) -> tuple[float, str]:
        """Smallest sliced W2 of ``method`` at ``nfe`` over its settings, and that setting."""
        rows = [r for r in self.of(case) if r.method == method and nfe in r.errors]
        r = min(rows, key=lambda r: r.errors[nfe])
        return r.errors[nfe], r.schedule


def run(
    n: int = 1024,
    seed: int = 0,
    quick: bool = False,
    full_grid: bool = False,
    progress: bool = False,
    cases: Sequence[tuple[str, int, float] | tuple[str, int, float, str]] | None = None,
    inpaint: bool = False,
) -> PosteriorBench:
    """Run the benchmark on :data:`CASES` (``full_grid``: :data:`FULL_CASES`; ``quick``: one 16-d case,
    NFE 50, ``n`` capped at 512)."""
    nfes = QUICK_NFES if quick else NFES
    if cases is None:
        cases = QUICK_CASES if quick else INPAINT_CASES if inpaint else FULL_CASES if full_grid else CASES
    if quick:
        n = min(n, 512)
    rows: list[Row] = []
    labels: list[str] = []
    seconds: dict[str, float] = {}
    for prior, dim_y, noise, *operator in tqdm(cases, desc="cases", disable=not progress):
        t0 = time.perf_counter()
        case = make_case(prior, dim_y, noise, n, seed, *operator)
        labels.append(case.label)
        rows.append(Row(case.label, "floor", "", dict.fromkeys(nfes, case.floor)))
        rows.append(Row(case.label, "prior", "", dict.fromkeys(nfes, case.prior_distance)))
        for method in METHODS:
            for label, errors in method.tuned(case, nfes):
                rows.append(Row(case.label, method.name, label, errors))
        seconds[case.label] = time.perf_counter() - t0
        log.info("%s: %.1f s", case.label, seconds[case.label])
    return PosteriorBench(tuple(nfes), n, seed, labels, rows, seconds)


def _ratio(result: PosteriorBench, case: str, method: str, nfe: int) -> float:
    return result.best(case, method, nfe)[0] / result.baseline(case, "floor")


def format_report(result: PosteriorBench) -> str:
    """Per case the best setting of each method at each NFE (in units of the floor), then per method the
    median over cases, and how each method compares with DPS at the largest NFE."""
    names = [m.name for m in METHODS]
    top = result.nfes[-1]
    lines = [
        f"Sliced W2 of {result.n} samples to {REFERENCE_FACTOR * result.n} exact posterior samples, in units "
        f"of the floor ({result.n} exact samples); DDPM linear betas, solver ddpm (time_uniform), seed "
        f"{result.seed}; best step per method, case and NFE, chosen in-sample (on the x_T, noise and "
        "reference set it is scored on; all runs in the CSV).",
    ]
    for nfe in result.nfes:
        lines += [
            "",
            f"NFE {nfe}:",
            f"{'case':<24}{'floor':>8}{'prior':>8}" + "".join(f"{m:>12}" for m in names),
        ]
        for case in result.cases:
            fl = result.baseline(case, "floor")
            lines.append(
                f"{case:<24}{fl:>8.3g}{result.baseline(case, 'prior') / fl:>8.1f}"
                + "".join(f"{_ratio(result, case, m, nfe):>12.2f}" for m in names)
            )
    lines += ["", "median over cases (x floor):", f"{'method':<14}" + "".join(f"{n:>8}" for n in result.nfes)]
    for m in names:
        meds = [statistics.median(_ratio(result, c, m, nfe) for c in result.cases) for nfe in result.nfes]
        lines.append(f"{m:<14}" + "".join(f"{v:>8.2f}" for v in meds))
    for ref in ("dps", "dps_alg1"):
        lines += ["", f"against {ref} at NFE {top} (ratio of sliced W2, < 1: better; cases where better):"]
        for m in names:
            if m == ref:
                continue
            ratios = [result.best(c, m, top)[0] / result.best(c, ref, top)[0] for c in result.cases]
            wins = sum(r < 1 for r in ratios)
            lines.append(
                f"    {m:<12} median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
                f"better in {wins}/{len(ratios)}"
            )
    head = [c for c in result.cases if c.startswith(HEADLINE + " ")]
    if head:
        lines += ["", f"{HEADLINE} at NFE {top}, best settings:"]
        for c in head:
            parts = [f"{m} {_ratio(result, c, m, top):.2f}x ({result.best(c, m, top)[1]})" for m in names]
            lines.append(f"    {c}: " + ", ".join(parts))
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())]
    return "\n".join(lines)


def markdown_table(result: PosteriorBench) -> str:
    """The tables of docs/benchmarks.md, in units of the floor: per method the median over cases of its
    best sliced W2 at each NFE (and in how many cases it beats ``dps`` at the largest), then every case at
    the largest NFE."""
    names = [m.name for m in METHODS]
    top = result.nfes[-1]
    cases = result.cases
    lines = [
        f"| median over {len(cases)} cases (x floor) | "
        + " | ".join(f"NFE {n}" for n in result.nfes)
        + f" | beats `dps` at NFE {top} |",
        "|" + "---|" * (len(result.nfes) + 2),
    ]
    for m in names:
        meds = [statistics.median(_ratio(result, c, m, n) for c in cases) for n in result.nfes]
        wins = sum(result.best(c, m, top)[0] < result.best(c, "dps", top)[0] for c in cases)
        lines.append(
            f"| `{m}` | " + " | ".join(f"{v:.2f}" for v in meds) + f" | {'-' if m == 'dps' else wins} |"
        )
    lines += [
        "",
        f"| NFE {top}, x floor | prior | " + " | ".join(f"`{m}`" for m in names) + " |",
        "|" + "---|" * (len(names) + 2),
    ]
    for c in cases:
        prior = result.baseline(c, "prior") / result.baseline(c, "floor")
        lines.append(
            f"| {c} | {prior:.1f} | " + " | ".join(f"{_ratio(result, c, m, top):.2f}" for m in names) + " |"
        )
    return "\n".join(lines)


def plot(result: PosteriorBench, path: str | Path) -> bool:
    """One panel per case: each method's best sliced W2 (x floor) against NFE, with the prior's level.
    Returns ``False`` (and logs) if matplotlib is not installed."""

    def draw(ax: Any, case: str, colors: Sequence[Any]) -> None:
        for c, m in enumerate(m.name for m in METHODS):
            ys = [_ratio(result, case, m, nfe) for nfe in result.nfes]
            ax.loglog(result.nfes, ys, "-o", ms=3, color=colors[c], label=m)
        ax.axhline(1.0, color="black", lw=1, ls=":", label="floor")
        prior = result.baseline(case, "prior") / result.baseline(case, "floor")
        ax.axhline(prior, color="grey", lw=1, ls="-.", label="prior")

    return panel_figure(
        path,
        result.cases,
        draw,
        cols=3,
        panel_size=(4.2, 3.2),
        suptitle="Inverse problems on exact Gaussian-mixture priors: best step per method (DDPM, NFE=steps)",
        ylabel="sliced W2 / floor",
        xticks=result.nfes,
    )


def write_results(result: PosteriorBench, out: Path, stem: str = "posterior") -> tuple[Path, Path | None]:
    """``OUT/{stem}.csv`` (the shared :func:`~steerdiff.bench.solvers.csv_table` layout: ``source`` is the
    case, ``schedule`` the setting) and ``OUT/{stem}.png``."""
    return write_outputs(out, stem, *csv_table(result), lambda path: plot(result, path))
