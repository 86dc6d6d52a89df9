r"""Sample quality on the embedded 8x8 digits model, and ``steerdiff bench solvers --model digits``.

Metrics (:class:`DigitsModels`), with the committed clean classifier
(:func:`~steerdiff.toy.digits.load_classifier`) as the judge:

* **accuracy** on a target digit: the fraction of samples the classifier labels as that digit;
* **Frechet distance** (:func:`steerdiff.metrics.frechet_distance`): between Gaussians fitted to the
  classifier's 64-d penultimate features of the samples and of the held-out digits
  (:func:`~steerdiff.toy.digits.digits_data` ``"heldout"``: 359 images of all classes, about 36 per
  class) -- the FID recipe of Heusel et al. 2017 with a domain classifier in place of Inception.
  Unconditional samples are compared with the held-out digits of all classes, targeted samples with
  the held-out digits of their class. The estimate is biased upwards by a term that falls as ``1/n``,
  so distances are compared at equal sample counts only; real training images at the same count
  (:meth:`DigitsModels.real`) give the floor.

Solver benchmark (:func:`run`): from one ``x_T = randn(n, 1, 8, 8)`` (float64, seed ``seed``) every
solver of :data:`SOLVERS` with the default schedule at every NFE of :data:`NFES` (the step count whose
NFE equals it; Heun's ``2N - 1`` reaches 5, 9 and 19 instead), unconditional. Each is scored by the
Frechet distance above and by the relative RMSE to the probability-flow ODE solution from the same
``x_T`` (on its first ``n_ref`` samples): :data:`REFERENCE` (DPM-Solver++ 3M, 1,000 Karras steps to
``t_min``, then the denoised estimate; its own error is bounded by its distance to 1,000 DDIM steps,
reported as ``reference_gap``). Baselines: DDPM with all 1,000 timesteps (the stochastic sampler the model was
trained for; Ho et al. 2020), the ODE reference, and real training images. Where diffusers is installed,
its ``DPMSolverMultistepScheduler`` in its default configuration (whose betas are this model's) runs
beside the solvers as the row :data:`DIFFUSERS_ROW`: issue 2's goal (a) on a learned model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import sampling, solvers
from .._checks import choice, integer
from ..denoiser import Denoiser
from ..guidance import CFG
from ..integrations.diffusers_ref import quiet_diffusers
from ..metrics import frechet_distance, relative_rmse
from ..toy import digits as D
from ._figure import pyplot, write_outputs
from .solvers import (
    CFG_SCALES,
    CFG_STEPS,
    GuidedBench,
    format_guided,
    guided_errors,
    pipeline_sampler,
    steps_for_nfe,
)

__all__ = [
    "BASELINES",
    "DDPM_BASELINE",
    "DIFFUSERS_ROW",
    "NFES",
    "REFERENCE",
    "SOLVERS",
    "DigitsModels",
    "DigitsSolverBench",
    "SolverRow",
    "format_report",
    "load_models",
    "plot",
    "run",
    "save_grid",
    "write_results",
]


F64 = torch.float64
SOLVERS = ("unipc", "dpmpp_2m", "dpmpp_3m", "ddim", "euler", "heun", "deis", "ipndm")
NFES = (5, 10, 20)
QUICK_NFES = (10,)
REFERENCE = ("dpmpp_3m", "karras", 1000)  # (solver, schedule, steps): the ODE reference
REFERENCE_CHECK = ("ddim", "karras", 1000)
DDPM_BASELINE = ("ddpm", "leading", 1000)  # every one of the 1,000 training timesteps
BASELINES = ("ddpm", "reference", "real")  # the names DigitsSolverBench.baseline takes
DIFFUSERS_ROW = "diffusers DPMSolverMultistep"  # its default config: this model's betas, 2M, linspace
# guided: CFG toward GUIDED_DIGIT on the first GUIDED_BATCH samples, against GUIDED_REFERENCE_STEPS steps
GUIDED_DIGIT, GUIDED_BATCH, GUIDED_REFERENCE_STEPS = 3, 256, 400


@dataclass
class DigitsModels:
    """The three digits nets, the data splits and the held-out features: the judge of sample quality.

    ``den``: the class-conditional denoiser (:func:`~steerdiff.toy.digits.load_digits_denoiser`);
    ``noisy_classifier``, ``classifier``: the noise-conditional and clean classifiers; ``heldout``
    and ``train``: ``(x, labels)`` of :func:`~steerdiff.toy.digits.digits_data`; ``heldout_features``:
    the clean classifier's features of the held-out images (float64).
    """

    den: Denoiser
    noisy_classifier: D.NoisyDigitsClassifier
    classifier: D.DigitsClassifier
    heldout: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor]
    heldout_features: Tensor

    def features(self, x: Tensor) -> Tensor:
        """The classifier's ``(n, 64)`` float64 features of images ``x`` ``(n, 1, 8, 8)``."""
        with torch.no_grad():
            return self.classifier.features(x.detach().to(F64))

    def accuracy(self, x: Tensor, digit: int) -> float:
        """The fraction of ``x`` the clean classifier labels ``digit`` (a sample with a NaN or inf pixel
        is not recognized: the argmax of its NaN logits would read 0)."""
        with torch.no_grad():
            x = x.detach().to(F64)
            hit = (self.classifier(x).argmax(1) == digit) & torch.isfinite(x).flatten(1).all(1)
            return float(hit.double().mean())

    def frechet(self, x: Tensor, digit: int | None = None) -> float:
        """Frechet distance of ``x``'s features to the held-out digits' (all classes, or ``digit``'s);
        ``inf`` if ``x`` is not finite."""
        if not bool(torch.isfinite(x).all()):
            return math.inf
        ref = self.heldout_features
        if digit is not None:
            ref = ref[self.heldout[1] == digit]
        return frechet_distance(self.features(x), ref)

    def real(self, n: int, digit: int | None = None, seed: int = 0) -> Tensor:
        """``min(n, available)`` training images (all classes, or ``digit``'s), a random subset by ``seed``:
        the floor of :meth:`frechet`."""
        x, y = self.train
        if digit is not None:
            x = x[y == digit]
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx]


def load_models(weights: str | Path | None = None) -> DigitsModels:
    """Load the digits nets from the folder ``weights`` (default: the committed ones,
    :data:`~steerdiff.toy.digits.WEIGHTS_DIR`) and the data splits.

    Raises:
        FileNotFoundError: a weights file is missing (the message says how to train it).
        ValueError: ``weights`` is a file, not a folder.
    """
    if weights is not None and Path(weights).is_file():
        raise ValueError(
            f"load_models: weights must be a folder of digits_*.safetensors, got the file {weights}"
        )
    den = D.load_digits_denoiser(D.weights_path("denoiser", weights))
    noisy = D.load_noisy_classifier(D.weights_path("noisy_classifier", weights))
    clf = D.load_classifier(D.weights_path("classifier", weights))
    heldout, train = D.digits_data("heldout"), D.digits_data("train")
    with torch.no_grad():
        feats = clf.features(heldout[0].to(F64))
    return DigitsModels(den, noisy, clf, heldout, train, feats)


def save_grid(rows: Sequence[tuple[str, Tensor]], path: str | Path, title: str | None = None) -> bool:
    """Write a PNG grid of 8x8 digits: one row of images per ``(label, images (k, 1, 8, 8))``, labelled
    on the left; pixel values in ``[-1, 1]`` (clipped) shown black to white, NaN (an unknown pixel) in
    red. Returns ``False`` (and logs) if matplotlib is not installed."""
    for label, x in rows:
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != D.DIGITS_SHAPE:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"save_grid: row {label!r} must be images of shape (k, 1, 8, 8), got {shape}")
    plt = pyplot()
    if plt is None:
        return False
    cols, cell = max(x.shape[0] for _, x in rows), 9  # 8 pixels and a 1-pixel gap
    canvas = torch.tensor([0.25, 0.35, 0.5]).expand(len(rows) * cell + 1, cols * cell + 1, 3).clone()
    for r, (_, x) in enumerate(rows):
        imgs = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).reshape(-1, 8, 8)[:cols]
        rgb = imgs[..., None].expand(*imgs.shape, 3).clone()
        rgb[imgs.isnan()] = torch.tensor([0.6, 0.2, 0.2])
        for c, img in enumerate(rgb):
            canvas[1 + r * cell : r * cell + cell, 1 + c * cell : c * cell + cell] = img
    fig, ax = plt.subplots(figsize=(1.8 + 0.4 * cols, 0.5 + 0.4 * len(rows)))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.set_yticks([r * cell + 4.5 for r in range(len(rows))], [label for label, _ in rows])
    ax.set_xticks([])
    ax.tick_params(length=0, labelsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@dataclass
class SolverRow:
    """One run: ``solver`` (``schedule``, ``steps``) at ``nfe``; its Frechet distance to the held-out
    digits, relative RMSE to the ODE reference (``nan`` where not defined) and seconds."""

    solver: str
    schedule: str
    steps: int
    nfe: int
    fd: float
    rmse: float
    seconds: float


@dataclass
class DigitsSolverBench:
    """The solver runs (:class:`SolverRow`), the baselines (``ddpm``, ``reference``, ``real``: rows with
    ``rmse = nan`` except the reference's 0; the reference's ``fd`` is ``nan`` unless it ran on all ``n``
    samples), the sample counts (``n`` for the Frechet distances, ``n_ref`` for the RMSE) and the
    reference's own error bound (relative RMSE between the two 1,000-step ODE solutions)."""

    n: int
    seed: int
    nfes: tuple[int, ...]
    n_ref: int
    rows: list[SolverRow] = field(default_factory=list)
    baselines: list[SolverRow] = field(default_factory=list)
    reference_gap: float = math.nan
    guided: GuidedBench | None = None

    def row(self, solver: str, nfe: int) -> SolverRow | None:
        """The run of ``solver`` at the NFE column ``nfe`` (Heun: the largest NFE it reaches up to it)."""
        cands = [r for r in self.rows if r.solver == solver and r.nfe <= nfe]
        return max(cands, key=lambda r: r.nfe, default=None)

    def baseline(self, solver: str) -> SolverRow:
        """The baseline row named ``solver``: ``"ddpm"``, ``"reference"`` or ``"real"`` (the row whose
        ``solver`` reads ``real (k training images)``)."""
        choice("DigitsSolverBench.baseline", "solver", solver, BASELINES)
        return next(r for r in self.baselines if r.solver.split(" (")[0] == solver)

    def fd_ratio(self, solver: str = sampling.DEFAULT_SOLVER, nfe: int = 10) -> float:
        """``solver``'s Frechet distance at ``nfe`` over DDPM's at 1,000 steps (issue 6: <= 1.5)."""
        row = self.row(solver, nfe)
        return math.nan if row is None else row.fd / self.baseline("ddpm").fd

    def default_vs_diffusers(self) -> dict[int, float]:
        """Per NFE, the default solver's relative RMSE over :data:`DIFFUSERS_ROW`'s (where both ran)."""
        out = {}
        for k in self.nfes:
            ours, theirs = self.row(sampling.DEFAULT_SOLVER, k), self.row(DIFFUSERS_ROW, k)
            if ours is not None and theirs is not None and ours.nfe == theirs.nfe == k:
                out[k] = ours.rmse / theirs.rmse
        return out


def _timed_sample(
    den: Denoiser, x_T: Tensor, solver: str, schedule: str, steps: int, seed: int, progress: bool = False
) -> tuple[Tensor, int, float]:
    start = time.perf_counter()
    with torch.no_grad():
        x, info = sampling.sample(
            den,
            x_T,
            steps,
            solver,
            schedule,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
            return_info=True,
            label=D.NULL_LABEL,
        )
    return x, info.nfe, time.perf_counter() - start


def _diffusers_scheduler() -> Callable[[], Any] | None:
    """diffusers' ``DPMSolverMultistepScheduler`` class (its default config), ``None`` without diffusers."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        return None
    return DPMSolverMultistepScheduler


def _diffusers_row(
    m: DigitsModels, scheduler: Callable[[], Any], x_T: Tensor, nfe: int, ref: Tensor
) -> SolverRow:
    """:data:`DIFFUSERS_ROW` at ``nfe`` steps (one net call each), driven as a pipeline drives it."""
    run = pipeline_sampler(DIFFUSERS_ROW, scheduler, x_T, label=D.NULL_LABEL).run
    start = time.perf_counter()
    with torch.no_grad(), quiet_diffusers():
        x = run(m.den, nfe)
    secs = time.perf_counter() - start
    return SolverRow(
        DIFFUSERS_ROW, "linspace", nfe, nfe, m.frechet(x), relative_rmse(x[: len(ref)], ref), secs
    )


def _guided(
    m: DigitsModels,
    x_T: Tensor,
    scales: Sequence[float],
    steps: Sequence[int],
    scheduler: Callable[[], Any] | None,
) -> GuidedBench | None:
    """:func:`~steerdiff.bench.solvers.guided_errors` for CFG toward :data:`GUIDED_DIGIT`."""
    if not scales or not steps:
        return None

    def make(w: float) -> Denoiser:
        return CFG(m.den, m.den, w, uncond_kwargs={"label": D.NULL_LABEL})

    with torch.no_grad():
        theirs = (
            None if scheduler is None else pipeline_sampler(DIFFUSERS_ROW, scheduler, x_T, label=GUIDED_DIGIT)
        )
        return guided_errors(make, x_T, scales, steps, theirs, GUIDED_REFERENCE_STEPS, label=GUIDED_DIGIT)


def run(
    n: int = 4096,
    seed: int = 0,
    n_ref: int = 512,
    nfes: Sequence[int] = NFES,
    solver_names: Sequence[str] = SOLVERS,
    weights: str | Path | None = None,
    models: DigitsModels | None = None,
    progress: bool = False,
    guided_scales: Sequence[float] = CFG_SCALES,
    guided_steps: Sequence[int] = CFG_STEPS,
    with_diffusers: bool = True,
) -> DigitsSolverBench:
    """Run the digits solver benchmark (see the module docstring) on ``n`` samples.

    With diffusers installed (and ``with_diffusers``), :data:`DIFFUSERS_ROW` runs at each NFE of
    ``nfes`` on the same ``x_T``.
    Guided: classifier-free guidance toward :data:`GUIDED_DIGIT` at ``guided_scales`` and
    ``guided_steps`` on the first :data:`GUIDED_BATCH` samples
    (:func:`~steerdiff.bench.solvers.guided_errors`; diffusers' default
    ``DPMSolverMultistepScheduler``, whose betas are this model's, where diffusers is installed).

    The Frechet distances use all ``n`` samples (at ``n = 1024`` the distance of one sampler still
    moves by +-20% from seed to seed, mostly with the share of each class in the draw; at 4,096 the
    ratio of two samplers is stable to about 0.1); the relative RMSE to the ODE reference uses the
    first ``min(n_ref, n)`` of them (the 1,000-step references are only run there). ``models`` (from
    :func:`load_models`) is loaded from ``weights`` when not given. The stochastic DDPM baseline draws
    its noise from ``seed + 1``. ``n``: an integer >= 2 (a Frechet distance needs a covariance),
    ``n_ref`` >= 1, ``seed`` >= 0 (checked before anything runs).
    """
    n = integer("bench.digits.run", "n", n, lo=2)
    n_ref = integer("bench.digits.run", "n_ref", n_ref, lo=1)
    seed = integer("bench.digits.run", "seed", seed, lo=0)
    m = models if models is not None else load_models(weights)
    schedule = sampling.DEFAULT_SCHEDULE
    x_T = torch.randn(n, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    k = min(n_ref, n)
    result = DigitsSolverBench(n, seed, tuple(nfes), n_ref=k)
    scheduler = _diffusers_scheduler() if with_diffusers else None
    runs = (len(solver_names) + (scheduler is not None)) * len(nfes)
    bar = tqdm(total=2 + runs + 1, desc="bench digits", disable=not progress)
    ref, ref_nfe, ref_s = _timed_sample(m.den, x_T[:k], *REFERENCE, seed)
    bar.update()
    check, _, _ = _timed_sample(m.den, x_T[:k], *REFERENCE_CHECK, seed)
    bar.update()
    result.reference_gap = relative_rmse(check, ref)
    for name in solver_names:
        nfe_of = solvers.get(name).nfe
        for nfe in nfes:
            steps = steps_for_nfe(nfe_of, nfe)
            if steps is None:  # e.g. Heun (2N - 1): the largest NFE it reaches below
                steps = max((k for k in range(1, nfe + 1) if nfe_of(k) <= nfe), default=None)
            if steps is not None:
                x, used, secs = _timed_sample(m.den, x_T, name, schedule, steps, seed)
                result.rows.append(
                    SolverRow(name, schedule, steps, used, m.frechet(x), relative_rmse(x[:k], ref), secs)
                )
            bar.update()
    if scheduler is not None:
        for nfe in nfes:
            result.rows.append(_diffusers_row(m, scheduler, x_T, nfe, ref))
            bar.update()
    result.guided = _guided(m, x_T[:GUIDED_BATCH], guided_scales, guided_steps, scheduler)
    ddpm, ddpm_nfe, ddpm_s = _timed_sample(m.den, x_T, *DDPM_BASELINE, seed + 1, progress=progress)
    bar.update()
    bar.close()
    real = m.real(n, seed=seed)
    result.baselines = [
        SolverRow("ddpm", DDPM_BASELINE[1], DDPM_BASELINE[2], ddpm_nfe, m.frechet(ddpm), math.nan, ddpm_s),
        SolverRow(
            "reference",
            REFERENCE[1],
            REFERENCE[2],
            ref_nfe,
            m.frechet(ref) if k == n else math.nan,
            0.0,
            ref_s,
        ),
        SolverRow(f"real ({len(real)} training images)", "-", 0, 0, m.frechet(real), math.nan, 0.0),
    ]
    return result


def format_report(result: DigitsSolverBench) -> str:
    """The table: per solver, Frechet distance and relative RMSE to the ODE reference at each NFE;
    then the baselines and the issue-6 ratio."""
    nf = result.nfes
    head = (
        "| solver | "
        + " | ".join(f"FD @{k}" for k in nf)
        + " | "
        + " | ".join(f"rel. RMSE @{k}" for k in nf)
        + " |"
    )
    lines = [
        f"Digits (8x8), unconditional, n = {result.n} (RMSE: first {result.n_ref}), seed {result.seed}, "
        f"schedule {sampling.DEFAULT_SCHEDULE}: Frechet distance (FD) to the held-out digits on the "
        f"classifier's features, and relative RMSE to the 1,000-step ODE solution "
        f"({REFERENCE[0]}, {REFERENCE[1]}) from the same x_T",
        "",
        head,
        "|---" * (1 + 2 * len(nf)) + "|",
    ]
    names = list(dict.fromkeys(r.solver for r in result.rows))
    short = False
    for name in names:
        cells = [result.row(name, k) for k in nf]
        short = short or any(r is not None and r.nfe != k for r, k in zip(cells, nf, strict=True))
        fds = [
            "—" if r is None else f"{r.fd:.2f}" + ("" if r.nfe == k else f" ({r.nfe})")
            for r, k in zip(cells, nf, strict=True)
        ]
        errs = ["—" if r is None else f"{r.rmse:.2e}" for r in cells]
        lines.append(f"| {name} | " + " | ".join(fds) + " | " + " | ".join(errs) + " |")
    lines.append("")
    for b in result.baselines:
        what = f"{b.solver} ({b.schedule}, {b.steps} steps, NFE {b.nfe})" if b.nfe else b.solver
        fd = f"FD {b.fd:.2f}" if math.isfinite(b.fd) else f"(run on the first {result.n_ref} samples)"
        lines.append(f"{what}: {fd}" + (f", {b.seconds:.1f} s" if b.seconds else ""))
    lines.append(
        f"reference error bound (vs {REFERENCE_CHECK[0]}, {REFERENCE_CHECK[2]} steps): "
        f"relative RMSE {result.reference_gap:.1e}"
    )
    if 10 in nf:
        lines.append(
            f"FD ratio {sampling.DEFAULT_SOLVER} NFE 10 / DDPM 1000: {result.fd_ratio():.2f} "
            "(issue 6: <= 1.5)"
        )
    ratios = result.default_vs_diffusers()
    if ratios:
        lines.append(
            f"relative RMSE sd.sample's default ({sampling.DEFAULT_SOLVER}) / {DIFFUSERS_ROW} (its default "
            "config): "
            + ", ".join(f"NFE {k}: {v:.3f}" for k, v in ratios.items())
            + " (issue 2 (a), set on the mixture: <= 0.2 at NFE 10 and 20)"
        )
    if short:
        lines.append("(k): the solver's NFE where it cannot reach the column's (Heun: 2N - 1)")
    if result.guided is not None:
        lines += ["", *format_guided(result.guided, f"digit {GUIDED_DIGIT}")]
    return "\n".join(lines)


def write_results(result: DigitsSolverBench, out: str | Path) -> tuple[Path, Path | None]:
    """``OUT/digits_solvers.csv`` (one line per run and baseline) and ``OUT/digits_solvers.png``."""
    header = ["solver", "schedule", "steps", "nfe", "frechet_distance", "rel_rmse_vs_ode", "seconds"]
    rows = (
        [r.solver, r.schedule, r.steps, r.nfe, f"{r.fd:.6g}", f"{r.rmse:.6g}", f"{r.seconds:.3f}"]
        for r in [*result.rows, *result.baselines]
    )
    return write_outputs(out, "digits_solvers", header, rows, lambda path: plot(result, path))


def plot(result: DigitsSolverBench, path: str | Path) -> bool:
    """Two panels against NFE: Frechet distance (with DDPM 1000, the ODE reference and real images as
    lines) and relative RMSE to the ODE reference (log-log). ``False`` if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_fd, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10").colors
    for k, name in enumerate(dict.fromkeys(r.solver for r in result.rows)):
        rows = sorted((r for r in result.rows if r.solver == name), key=lambda r: r.nfe)
        xs = [r.nfe for r in rows]
        c = colors[k % len(colors)]
        ax_fd.plot(xs, [r.fd for r in rows], "-o", ms=3, color=c, label=name)
        ax_err.loglog(xs, [r.rmse for r in rows], "-o", ms=3, color=c, label=name)
    for b, style in zip(result.baselines, ("--", ":", "-."), strict=True):
        if math.isfinite(b.fd):
            label = f"{b.solver} ({b.steps} steps)" if b.nfe else b.solver
            ax_fd.axhline(b.fd, color="black", lw=1, ls=style, label=label)
    for ax in (ax_fd, ax_err):
        ax.set_xscale("log")
        ax.set_xticks(list(result.nfes), [str(v) for v in result.nfes])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("NFE")
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("Frechet distance to held-out digits")
    ax_err.set_ylabel("relative RMSE vs 1,000-step ODE solution")
    ax_fd.legend(fontsize=7)
    fig.suptitle(f"Solvers on the learned 8x8 digits model (n = {result.n}, unconditional)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
