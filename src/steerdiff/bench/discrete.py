r"""``steerdiff bench discrete``: masked diffusion samplers' total variation to the exact law, against NFE.

Model: :func:`mixture` of ``seed``, a :class:`~steerdiff.toy.CategoricalMixture` of ``K = 4`` peaked
components (probabilities ``u^4 + 0.02``, weights ``u + 0.5``, ``u ~ U(0, 1)`` from
``torch.Generator().manual_seed(seed)``) over sequences of ``L = 6`` tokens in ``V = 4``: its tokens are
strongly correlated (drawing them independently, what one ancestral step does, is far from the law), and
its ``V^L = 4,096`` sequences are few enough for the exact table of every probability, so the distance
of ``n`` samples to the law is the total variation (TV) ``(1/2) sum_x |p_hat(x) - p(x)|``
(:meth:`~steerdiff.toy.CategoricalMixture.total_variation`). Process: the linear schedule ``alpha(t) =
1 - t``; denoiser: the mixture's exact one, so every distance left is the sampler's.

Every run draws ``n`` sequences from the all-masked batch with the noise of
``torch.Generator().manual_seed(seed + 1)``. Its TV stands beside the floor, the TV of ``n`` exact samples
of the same target (mean and standard deviation over :data:`FLOOR_SETS` sets, ``seed + 2`` for the data's,
``seed + 3`` for ``p(x | y)``'s): a run within :data:`AT_FLOOR` standard deviations above the mean is
indistinguishable from exact samples at this ``n``.

* unguided, target ``p``: ``ancestral`` and ``remdm`` (``"cap"``, each ``eta`` of :data:`ETAS`) at each
  of :data:`STEPS` (NFE = steps; at 1 and 2 steps ReMDM is the ancestral sampler draw for draw: nothing
  is unmasked at ``t = 1`` and ``sigma_max = 0`` at the last step), ``first_hitting`` (one step per
  token: NFE = ``L``, exact with an exact denoiser);
* guided toward the component ``y`` = :data:`LABEL` (the label the mixture's denoiser takes), target
  ``p(x | y)`` (:meth:`~steerdiff.toy.CategoricalMixture.component`):
  :class:`~steerdiff.discrete.ClassifierGuidance` with the exact classifier (scale 1: Bayes' rule, the
  exact conditional denoiser), :class:`~steerdiff.discrete.CFG` at ``w = 1`` (the conditional denoiser,
  1 NFE a step) and at ``w = 3`` (2 NFE a step), each with ``first_hitting`` and ``ancestral`` at
  :data:`GUIDED_STEPS`. CFG at ``w > 1`` has no closed-form target (the geometric mixture is taken per
  position and per step, not the sequence-level ``p(x | y)^w p(x)^{1 - w}``): its TV to ``p(x | y)``
  says how far guidance moves it, not an error. ``p(x | y)`` is one component, a product law, so the
  exact conditional denoiser's tokens are independent whichever unmask together: any sampler of it is
  exact, and these rows test the guidance, not the sampler (with exact models CFG at ``w = 1`` and
  classifier guidance give the same conditional, and from the same noise the same samples);
* particle steering toward the tilted law ``p(x) exp(lam r(x)) / Z`` (``lam`` = :data:`LAM`;
  :meth:`~steerdiff.toy.CategoricalMixture.tilt`) of the per-position reward ``r(x) = sum_i f[i, x^i]``,
  ``f`` ``(L, V)`` uniform in ``[0, 1)`` from ``torch.Generator().manual_seed(seed + 5)``
  (:func:`reward_table`): :func:`~steerdiff.discrete.fk_steering` (potential ``"difference"``, resampling
  at every step) with ``first_hitting`` and ``ancestral`` at :data:`STEER_STEPS`, and
  :func:`~steerdiff.discrete.best_of_n` with ``first_hitting``, each at :data:`PARTICLES` per row (NFE =
  particles x steps), on ``min(n,`` :data:`STEER_N` ``)`` rows (the cost is ``particles`` times a
  sampler's), one draw per row by ``out.sample(generator)`` from the run's generator (``seed + 1``).
  FK steering targets ``p_S(x) exp(lam r(x)) / Z``, ``p_S`` the base sampler's law: ``p`` for
  ``first_hitting`` (whose one draw per row still carries the O(1/N) bias of a weighted particle
  system), the coarse ``ancestral`` law for few steps; each fk row reports its ``log Z`` estimate against
  the exact :meth:`~steerdiff.toy.CategoricalMixture.log_normalizer` as the mean of ``Z_hat / Z`` over
  the rows with its standard error (unbiased for ``Z`` where ``p_S = p``). Best-of-N keeps each row's
  highest reward, which is not the tilted law (it moves further as N grows): its TV to the tilted law
  says how far it is, not an error, as for CFG at ``w > 1``. The floor of the tilted law is that of
  ``min(n, STEER_N)`` exact samples (``seed + 4``).

The default ``n = 32768`` puts the floor of ``p`` near 0.1 with a spread of 0.0014; the samplers and
guidance take about 50 s on one thread, particle steering (4,096 rows) about 25 s more. ``--quick``
takes 2 and 8 steps (guided: 4) on at most 4,096 samples, and :data:`QUICK_PARTICLES` with ``ancestral``
at :data:`QUICK_STEER_STEPS` on at most :data:`QUICK_STEER_N` rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..discrete import (
    CFG,
    ClassifierGuidance,
    MaskedDenoiser,
    MaskedProcess,
    ReMDM,
    Sampler,
    best_of_n,
    fk_steering,
    sample,
)
from ..toy.categorical import CategoricalMixture
from ._figure import panel_figure, write_outputs

__all__ = [
    "AT_FLOOR",
    "ETAS",
    "FLOOR_SETS",
    "GUIDED_STEPS",
    "LABEL",
    "LAM",
    "PARTICLES",
    "QUICK_GUIDED_STEPS",
    "QUICK_N",
    "QUICK_PARTICLES",
    "QUICK_STEER_N",
    "QUICK_STEER_STEPS",
    "QUICK_STEPS",
    "STEER_N",
    "STEER_STEPS",
    "STEPS",
    "TILTED",
    "DiscreteBench",
    "DiscreteRun",
    "Floor",
    "format_report",
    "mixture",
    "plot",
    "reward_table",
    "run",
    "write_results",
]

K, L, V = 4, 6, 4
STEPS = (1, 2, 4, 8, 16, 32, 64)
GUIDED_STEPS = (2, 8, 32)
QUICK_STEPS = (2, 8)
QUICK_GUIDED_STEPS = (4,)
QUICK_N = 4096  # --quick's largest n
ETAS = (0.02, 0.1)  # ReMDM's default and the larger "cap" of its tests
CFG_SCALES = (1.0, 3.0)
LABEL = 0
LAM = 2.0  # the tilt of particle steering
TILTED = "p tilted"  # the target p(x) exp(LAM r(x)) / Z
PARTICLES = (4, 16, 64)
QUICK_PARTICLES = (4, 16)
STEER_STEPS = (2, 8)  # fk_steering's ancestral steps (first_hitting: one per token)
QUICK_STEER_STEPS = (4,)
STEER_N = 4096  # the particle rows' largest n (each costs particles x a sampler's row)
QUICK_STEER_N = 1024
FLOOR_SETS = 8
AT_FLOOR = 3.0  # standard deviations of the floor above its mean
YTICKS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)


def mixture(seed: int) -> CategoricalMixture:
    """The benchmark's model (module docstring): ``K = 4`` components, ``L = 6`` tokens in ``V = 4``."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    probs = torch.rand(K, L, V, generator=g, dtype=torch.float64) ** 4 + 0.02
    return CategoricalMixture(weights, probs)


def reward_table(seed: int) -> Tensor:
    """The steering reward's ``f`` ``(L, V)``, float64 uniform in ``[0, 1)`` from ``seed + 5``'s stream:
    ``r(x) = sum_i f[i, x^i]``."""
    return torch.rand(L, V, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)


def _reward(f: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> sum_i f[i, x^i]``, float64 ``(n,)`` of tokens ``(n, L)``."""
    positions = torch.arange(L)
    return lambda x: f[positions, x].sum(-1)


@dataclass
class Floor:
    """The TV of ``n`` exact samples to their law: mean and standard deviation over independent sets."""

    mean: float
    std: float


@dataclass
class DiscreteRun:
    """One run: its guidance (``"none"``, ``"classifier"``, ``"cfg w=1"``, ``"fk lam=2"``, ``"best_of_n"``,
    ...), sampler, steps, network evaluations (per output row), target (``"p"``, ``"p(x|y=0)"`` or
    :data:`TILTED`), TV to the target and wall time; ``closed_form``: whether the target is the law the run
    approaches (not for CFG at ``w > 1`` nor best-of-N, whose TV measures how far they move the law);
    ``particles``: per row, for the particle methods (else ``None``); ``z_ratio``, ``z_se``: FK steering's
    mean ``Z_hat / Z`` over the rows and its standard error."""

    guidance: str
    sampler: str
    steps: int
    nfe: int
    target: str
    tv: float
    seconds: float
    closed_form: bool = True
    particles: int | None = None
    z_ratio: float | None = None
    z_se: float | None = None

    @property
    def label(self) -> str:
        """The sampler, with its steps for a particle method (whose series runs over ``particles``)."""
        return self.sampler if self.particles is None else f"{self.sampler} x{self.steps}"


@dataclass
class DiscreteBench:
    """Every run, the floor of each target, and the settings (``steer_n``: the particle methods' rows)."""

    runs: list[DiscreteRun]
    floors: dict[str, Floor]
    n: int
    steer_n: int
    seed: int
    seconds: float

    def excess(self, r: DiscreteRun) -> float:
        """``(TV - floor mean) / floor std``: the run's distance above exact samples', in their spread."""
        f = self.floors[r.target]
        return (r.tv - f.mean) / f.std

    def at_floor(self, r: DiscreteRun) -> bool | None:
        """Whether the run is indistinguishable from exact samples of its target, within :data:`AT_FLOOR`
        std; ``None`` where the target is not its law (``closed_form`` false)."""
        return self.excess(r) <= AT_FLOOR if r.closed_form else None

    def series(self) -> dict[tuple[str, str], list[DiscreteRun]]:
        """The runs by (guidance, :attr:`DiscreteRun.label`), in order."""
        out: dict[tuple[str, str], list[DiscreteRun]] = {}
        for r in self.runs:
            out.setdefault((r.guidance, r.label), []).append(r)
        return out


@dataclass
class _Case:
    guidance: str
    sampler: str
    method: str | Sampler
    steps: int | None
    den: MaskedDenoiser
    target: str
    cond: dict[str, Any]
    closed_form: bool = True


def _cases(
    mix: CategoricalMixture, den: MaskedDenoiser, steps: Sequence[int], guided_steps: Sequence[int]
) -> list[_Case]:
    """The unguided runs (target ``p``), then each guided denoiser's (target ``p(x | y)``)."""
    cases = [_Case("none", "ancestral", "ancestral", k, den, "p", {}) for k in steps]
    for eta in ETAS:
        cases += [_Case("none", f"remdm eta={eta:g}", ReMDM(eta), k, den, "p", {}) for k in steps]
    cases.append(_Case("none", "first_hitting", "first_hitting", None, den, "p", {}))
    target = f"p(x|y={LABEL})"
    classifier = ClassifierGuidance(den, mix.classifier(LABEL, den.process.mask_id))
    guided: list[tuple[str, MaskedDenoiser, dict[str, Any], bool]] = [("classifier", classifier, {}, True)]
    for w in CFG_SCALES:  # w = 1: the conditional denoiser; w > 1: no closed-form target
        guided.append((f"cfg w={w:g}", CFG(den, den, w, uncond_kwargs={"y": -1}), {"y": LABEL}, w == 1))
    for name, g_den, cond, exact in guided:
        cases.append(_Case(name, "first_hitting", "first_hitting", None, g_den, target, cond, exact))
        cases += [_Case(name, "ancestral", "ancestral", k, g_den, target, cond, exact) for k in guided_steps]
    return cases


def _floor(law: CategoricalMixture, n: int, seed: int) -> Floor:
    """The TV of :data:`FLOOR_SETS` sets of ``n`` exact draws from ``law`` (``seed``'s stream)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor([law.total_variation(law.sample(n, g)) for _ in range(FLOOR_SETS)])
    return Floor(float(d.mean()), float(d.std()))


def _steered(
    mix: CategoricalMixture,
    den: MaskedDenoiser,
    f: Tensor,
    law: CategoricalMixture,
    n: int,
    seed: int,
    particles: Sequence[int],
    steer_steps: Sequence[int],
    progress: bool,
) -> list[DiscreteRun]:
    """FK steering and best-of-N with the reward of ``f`` toward ``law``, :data:`TILTED` (``mix.tilt(f,
    LAM)``), on ``n`` rows (module docstring), one draw per row."""
    reward, log_z = _reward(f), mix.log_normalizer(f, LAM)
    fk = f"fk lam={LAM:g}"
    cases: list[tuple[str, str, int | None, int]] = [
        (fk, sampler, k, m)
        for sampler, k in [("first_hitting", None)] + [("ancestral", k) for k in steer_steps]
        for m in particles
    ]
    cases += [("best_of_n", "first_hitting", None, m) for m in particles]
    runs = []
    for guidance, sampler, steps, m in tqdm(
        cases, desc="discrete steering", disable=not progress, leave=False
    ):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed + 1)
        if guidance == fk:
            out = fk_steering(
                den,
                reward,
                LAM,
                "difference",
                shape=(n, L),
                particles=m,
                steps=steps,
                sampler=sampler,
                generator=g,
            )
            z = torch.exp(out.log_z - log_z)
            z_ratio: float | None = float(z.mean())
            z_se: float | None = float(z.std() / n**0.5)
        else:
            out = best_of_n(den, reward, shape=(n, L), particles=m, steps=steps, sampler=sampler, generator=g)
            z_ratio = z_se = None
        tv = law.total_variation(out.sample(g))
        seconds = time.perf_counter() - t0
        runs.append(
            DiscreteRun(
                guidance,
                sampler,
                out.nfe // m,
                out.nfe,
                TILTED,
                tv,
                seconds,
                guidance == fk,
                m,
                z_ratio,
                z_se,
            )
        )
    return runs


def run(n: int = 32768, seed: int = 0, quick: bool = False, progress: bool = True) -> DiscreteBench:
    """Every run of the module docstring on ``n`` samples (``quick``: steps :data:`QUICK_STEPS`, guided
    :data:`QUICK_GUIDED_STEPS`, ``n`` at most :data:`QUICK_N`; particle steering on at most
    :data:`STEER_N` rows, :data:`QUICK_STEER_N` and :data:`QUICK_PARTICLES` with ``quick``)."""
    start = time.perf_counter()
    if quick:
        n = min(n, QUICK_N)
    steer_n = min(n, QUICK_STEER_N if quick else STEER_N)
    mix = mixture(seed)
    den = mix.denoiser(MaskedProcess(vocab_size=V, schedule="linear"))
    f = reward_table(seed)
    laws = {"p": mix, f"p(x|y={LABEL})": mix.component(LABEL), TILTED: mix.tilt(f, LAM)}
    floors = {
        name: _floor(law, steer_n if name == TILTED else n, seed + 2 + i)
        for i, (name, law) in enumerate(laws.items())
    }
    cases = _cases(mix, den, QUICK_STEPS if quick else STEPS, QUICK_GUIDED_STEPS if quick else GUIDED_STEPS)
    runs = []
    for c in tqdm(cases, desc="discrete", disable=not progress, leave=False):
        t0 = time.perf_counter()
        x, info = sample(
            c.den,
            (n, L),
            c.steps,
            c.method,
            generator=torch.Generator().manual_seed(seed + 1),
            return_info=True,
            **c.cond,
        )
        tv = laws[c.target].total_variation(x)
        seconds = time.perf_counter() - t0
        runs.append(
            DiscreteRun(c.guidance, c.sampler, info.steps, info.nfe, c.target, tv, seconds, c.closed_form)
        )
    particles, steer_steps = (QUICK_PARTICLES, QUICK_STEER_STEPS) if quick else (PARTICLES, STEER_STEPS)
    runs += _steered(mix, den, f, laws[TILTED], steer_n, seed, particles, steer_steps, progress)
    return DiscreteBench(runs, floors, n, steer_n, seed, time.perf_counter() - start)


def _first_at_floor(result: DiscreteBench, runs: Sequence[DiscreteRun]) -> str:
    """The NFE from which every run of a series is at the floor, or ``"not reached"``."""
    if not runs[0].closed_form:
        return "no closed-form target"
    for i, r in enumerate(runs):
        if all(result.at_floor(s) for s in runs[i:]):
            return f"NFE {r.nfe}"
    return "not reached"


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else "yes" if flag else "no"


def _z(r: DiscreteRun) -> str:
    """``Z_hat / Z +- se``, or empty where the run estimates no ``Z``."""
    return "" if r.z_ratio is None else f"{r.z_ratio:.3f} +- {r.z_se:.3f}"


def format_report(result: DiscreteBench) -> str:
    """The settings and floors, per series the NFE from which it is at the floor, and one line per run."""
    floors = "; ".join(f"{name} {f.mean:.4f} +- {f.std:.4f}" for name, f in result.floors.items())
    lines = [
        f"Masked diffusion on the exact CategoricalMixture (K = {K}, L = {L}, V = {V}: {V**L:,} sequences; "
        f"seed {result.seed}), linear schedule, exact denoiser; {result.n} samples per run, total variation "
        "(TV) to the exact law of the target",
        f"particle steering: {result.steer_n} rows per run, one draw each (Particles.sample), toward "
        f"{TILTED} = p(x) exp({LAM:g} r(x)) / Z, r(x) = sum_i f[i, x^i], f uniform (L, V) from seed + 5; "
        "N = particles per row, NFE = N x steps; Zhat/Z: mean over the rows of exp(log_z - exact log Z) "
        "+- its standard error",
        f"floor (TV of as many exact samples, mean +- std over {FLOOR_SETS} sets): {floors}",
        f"at floor: TV <= floor mean + {AT_FLOOR:g} std (indistinguishable from exact samples at this n). "
        f"cfg w>1 and best_of_n have no closed-form target: their TV is to p(x|y={LABEL}) / {TILTED}, how "
        "far they move the law; fk with ancestral targets its sampler's law tilted",
        "",
        "at the floor from (every run at that NFE and above):",
    ]
    lines += [
        f"  {guidance:11s} {label:17s} {_first_at_floor(result, runs)}"
        for (guidance, label), runs in result.series().items()
    ]
    lines += [
        "",
        f"{'guidance':11s} {'sampler':16s} {'target':10s} {'steps':>5s} {'N':>3s} {'NFE':>4s} {'TV':>7s}"
        f" {'(TV-floor)/std':>14s}  {'at floor':8s}  Zhat/Z",
    ]
    lines += [
        f"{r.guidance:11s} {r.sampler:16s} {r.target:10s} {r.steps:5d} {r.particles or '':>3} {r.nfe:4d}"
        f" {r.tv:7.4f} {result.excess(r):14.1f}  {_yes_no(result.at_floor(r)):8s}  {_z(r)}".rstrip()
        for r in result.runs
    ]
    lines += ["", f"wall time: {result.seconds:.1f} s"]
    return "\n".join(lines)


def plot(result: DiscreteBench, path: str | Path) -> bool:
    """TV against NFE (log-log), one panel per target, a line per series, the target's floor as a band
    (mean +- :data:`AT_FLOOR` std), and FK steering's ``Z_hat / Z`` (+- 2 standard errors) against NFE.
    ``False`` (logged) if matplotlib is not installed."""
    series = result.series()
    titles = {f"target {name}": name for name in result.floors}
    z_title = f"FK steering: Zhat / Z (+- 2 se), {result.steer_n} rows"

    def draw_z(ax: Any, colors: Sequence[Any]) -> None:
        ax.axhline(1.0, color="grey", lw=0.8)
        mine = [(key, runs) for key, runs in series.items() if runs[0].z_ratio is not None]
        for color, ((guidance, label), runs) in zip(colors, mine, strict=False):
            ax.errorbar(
                [r.nfe for r in runs],
                [r.z_ratio for r in runs],
                [2 * (r.z_se or 0.0) for r in runs],
                color=color,
                marker="o",
                ms=4,
                capsize=3,
                label=f"{guidance}, {label}",
            )
        ax.set(xscale="log", ylabel="Zhat / Z")
        ax.legend(fontsize=7)

    def draw(ax: Any, title: str, colors: Sequence[Any]) -> None:
        if title == z_title:
            draw_z(ax, colors)
            return
        target = titles[title]
        f = result.floors[target]
        ax.axhspan(f.mean - AT_FLOOR * f.std, f.mean + AT_FLOOR * f.std, color="grey", alpha=0.25)
        size = result.steer_n if target == TILTED else result.n
        ax.axhline(f.mean, color="grey", lw=0.8, label=f"floor ({size} exact samples) +- {AT_FLOOR:g} std")
        mine = [(key, runs) for key, runs in series.items() if runs[0].target == target]
        tvs = [f.mean] + [r.tv for _, runs in mine for r in runs]
        for color, ((guidance, label), runs) in zip(colors, mine, strict=False):
            name = label if guidance == "none" else f"{guidance}, {label}"
            closed = runs[0].closed_form
            style = {"marker": "o", "ms": 4} if closed else {"marker": "x", "ms": 8, "ls": "--"}
            ax.plot([r.nfe for r in runs], [r.tv for r in runs], color=color, label=name, **style)
        ax.set(xscale="log", yscale="log")
        ticks = [v for v in YTICKS if min(tvs) / 1.2 <= v <= max(tvs) * 1.2]
        ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
        ax.legend(fontsize=7)

    top = max(r.nfe for r in result.runs)
    return panel_figure(
        path,
        [*titles, z_title],
        draw,
        cols=2,
        panel_size=(5.5, 4.5),
        suptitle=f"Masked diffusion, exact {K}-component mixture (L = {L}, V = {V}), {result.n} samples",
        ylabel="total variation to the target",
        xticks=[2**i for i in range((top - 1).bit_length() + 1)],
        xlabel="NFE",
    )


def write_results(result: DiscreteBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/discrete.csv`` (one line per run; ``particles``, ``z_ratio``, ``z_se`` empty where not a
    particle method / FK steering) and ``OUT/discrete.png``."""
    header = [
        "guidance",
        "sampler",
        "target",
        "steps",
        "nfe",
        "tv",
        "floor_mean",
        "floor_std",
        "at_floor",
        "seconds",
        "particles",
        "z_ratio",
        "z_se",
    ]
    rows = (
        [
            r.guidance,
            r.sampler,
            r.target,
            r.steps,
            r.nfe,
            f"{r.tv:.6g}",
            f"{result.floors[r.target].mean:.6g}",
            f"{result.floors[r.target].std:.6g}",
            _yes_no(result.at_floor(r)),
            f"{r.seconds:.3g}",
            r.particles or "",
            "" if r.z_ratio is None else f"{r.z_ratio:.6g}",
            "" if r.z_se is None else f"{r.z_se:.6g}",
        ]
        for r in result.runs
    )
    return write_outputs(out, "discrete", header, rows, lambda path: plot(result, path))
