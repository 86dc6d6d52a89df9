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
  classifier guidance give the same conditional, and from the same noise the same samples).

The default ``n = 32768`` puts the floor of ``p`` near 0.1 with a spread of 0.0014 and runs in about
50 s on one thread; ``--quick`` takes 2 and 8 steps (guided: 4) on at most 4,096 samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..discrete import CFG, ClassifierGuidance, MaskedDenoiser, MaskedProcess, ReMDM, Sampler, sample
from ..toy.categorical import CategoricalMixture
from ._figure import panel_figure, write_outputs

__all__ = [
    "AT_FLOOR",
    "ETAS",
    "FLOOR_SETS",
    "GUIDED_STEPS",
    "LABEL",
    "QUICK_GUIDED_STEPS",
    "QUICK_N",
    "QUICK_STEPS",
    "STEPS",
    "DiscreteBench",
    "DiscreteRun",
    "Floor",
    "format_report",
    "mixture",
    "plot",
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
FLOOR_SETS = 8
AT_FLOOR = 3.0  # standard deviations of the floor above its mean
YTICKS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)


def mixture(seed: int) -> CategoricalMixture:
    """The benchmark's model (module docstring): ``K = 4`` components, ``L = 6`` tokens in ``V = 4``."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    probs = torch.rand(K, L, V, generator=g, dtype=torch.float64) ** 4 + 0.02
    return CategoricalMixture(weights, probs)


@dataclass
class Floor:
    """The TV of ``n`` exact samples to their law: mean and standard deviation over independent sets."""

    mean: float
    std: float


@dataclass
class DiscreteRun:
    """One run: its guidance (``"none"``, ``"classifier"``, ``"cfg w=1"``, ...), sampler, steps, network
    evaluations, target (``"p"`` or ``"p(x|y=0)"``), TV to the target and wall time; ``closed_form``:
    whether the target is the law the run approaches (not for CFG at ``w > 1``, whose TV to ``p(x | y)``
    measures how far guidance moves the law)."""

    guidance: str
    sampler: str
    steps: int
    nfe: int
    target: str
    tv: float
    seconds: float
    closed_form: bool = True


@dataclass
class DiscreteBench:
    """Every run, the floor of each target, and the settings."""

    runs: list[DiscreteRun]
    floors: dict[str, Floor]
    n: int
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
        """The runs by (guidance, sampler), in order."""
        out: dict[tuple[str, str], list[DiscreteRun]] = {}
        for r in self.runs:
            out.setdefault((r.guidance, r.sampler), []).append(r)
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


def run(n: int = 32768, seed: int = 0, quick: bool = False, progress: bool = True) -> DiscreteBench:
    """Every run of the module docstring on ``n`` samples (``quick``: steps :data:`QUICK_STEPS`, guided
    :data:`QUICK_GUIDED_STEPS`, ``n`` at most :data:`QUICK_N`)."""
    start = time.perf_counter()
    if quick:
        n = min(n, QUICK_N)
    mix = mixture(seed)
    den = mix.denoiser(MaskedProcess(vocab_size=V, schedule="linear"))
    laws = {"p": mix, f"p(x|y={LABEL})": mix.component(LABEL)}
    floors = {name: _floor(law, n, seed + 2 + i) for i, (name, law) in enumerate(laws.items())}
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
    return DiscreteBench(runs, floors, n, seed, time.perf_counter() - start)


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


def format_report(result: DiscreteBench) -> str:
    """The settings and floors, per series the NFE from which it is at the floor, and one line per run."""
    floors = "; ".join(f"{name} {f.mean:.4f} +- {f.std:.4f}" for name, f in result.floors.items())
    lines = [
        f"Masked diffusion on the exact CategoricalMixture (K = {K}, L = {L}, V = {V}: {V**L:,} sequences; "
        f"seed {result.seed}), linear schedule, exact denoiser; {result.n} samples per run, total variation "
        "(TV) to the exact law of the target",
        f"floor (TV of {result.n} exact samples, mean +- std over {FLOOR_SETS} sets): {floors}",
        f"at floor: TV <= floor mean + {AT_FLOOR:g} std (indistinguishable from exact samples at this n). "
        f"cfg w>1 has no closed-form target: its TV is to p(x|y={LABEL}), how far guidance moves the law",
        "",
        "at the floor from (every run at that NFE and above):",
    ]
    lines += [
        f"  {guidance:11s} {sampler:16s} {_first_at_floor(result, runs)}"
        for (guidance, sampler), runs in result.series().items()
    ]
    lines += [
        "",
        f"{'guidance':11s} {'sampler':16s} {'target':10s} {'steps':>5s} {'NFE':>4s} {'TV':>7s}"
        f" {'(TV-floor)/std':>14s}  at floor",
    ]
    lines += [
        f"{r.guidance:11s} {r.sampler:16s} {r.target:10s} {r.steps:5d} {r.nfe:4d} {r.tv:7.4f}"
        f" {result.excess(r):14.1f}  {_yes_no(result.at_floor(r))}"
        for r in result.runs
    ]
    lines += ["", f"wall time: {result.seconds:.1f} s"]
    return "\n".join(lines)


def plot(result: DiscreteBench, path: str | Path) -> bool:
    """TV against NFE (log-log), one panel per target, a line per series, the target's floor as a band
    (mean +- :data:`AT_FLOOR` std). ``False`` (logged) if matplotlib is not installed."""
    series = result.series()
    titles = {f"target {name}": name for name in result.floors}

    def draw(ax: Any, title: str, colors: Sequence[Any]) -> None:
        target = titles[title]
        f = result.floors[target]
        ax.axhspan(f.mean - AT_FLOOR * f.std, f.mean + AT_FLOOR * f.std, color="grey", alpha=0.25)
        ax.axhline(
            f.mean, color="grey", lw=0.8, label=f"floor ({result.n} exact samples) +- {AT_FLOOR:g} std"
        )
        mine = [(key, runs) for key, runs in series.items() if runs[0].target == target]
        tvs = [f.mean] + [r.tv for _, runs in mine for r in runs]
        for color, ((guidance, sampler), runs) in zip(colors, mine, strict=False):
            label = sampler if guidance == "none" else f"{guidance}, {sampler}"
            style = (
                {"marker": "x", "ms": 8, "ls": "--"}
                if guidance.startswith("cfg")
                else {"marker": "o", "ms": 4}
            )
            ax.plot([r.nfe for r in runs], [r.tv for r in runs], color=color, label=label, **style)
        ax.set(xscale="log", yscale="log")
        ticks = [v for v in YTICKS if min(tvs) / 1.2 <= v <= max(tvs) * 1.2]
        ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
        ax.legend(fontsize=7)

    return panel_figure(
        path,
        list(titles),
        draw,
        cols=2,
        panel_size=(5.5, 4.5),
        suptitle=f"Masked diffusion, exact {K}-component mixture (L = {L}, V = {V}), {result.n} samples",
        ylabel="total variation to the target",
        xticks=sorted({r.nfe for r in result.runs}),
        xlabel="NFE",
    )


def write_results(result: DiscreteBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/discrete.csv`` (one line per run) and ``OUT/discrete.png``."""
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
        ]
        for r in result.runs
    )
    return write_outputs(out, "discrete", header, rows, lambda path: plot(result, path))
