"""The ``steerdiff`` command line.

    steerdiff demo [--out DIR] [--digit D] [--n N] [--seed S] [--weights DIR] [--threads T]
    steerdiff bench solvers [--out DIR] [--batch B] [--seed S] [--quick] [--no-diffusers] [--threads T]
        [--draws D | --model digits [--weights DIR]]
    steerdiff bench sde [--out DIR] [--n N] [--seed S] [--quick] [--no-diffusers]
    steerdiff bench invert [--out DIR] [--n N] [--seed S] [--quick] [--no-diffusers]
    steerdiff bench posterior [--out DIR] [--n N] [--seed S] [--quick | --all | --inpaint]
    steerdiff bench steer [--out DIR] [--n N] [--seed S] [--quick]
    steerdiff bench overhead [--out DIR] [--device DEV] [--shape BxCx...]... [--steps K] [--repeats R]
        [--threads T]
    steerdiff bench longstep [--out DIR] [--n N] [--seed S] [--quick] [--process NAME]...
    steerdiff bench guided [--out DIR] [--n N] [--draws D] [--seed S] [--quick] [--problem NAME]...
        [--validate]
    steerdiff bench discrete [--out DIR] [--n N] [--seed S] [--quick]
    steerdiff bench parallel [--out DIR] [--n N] [--seed S] [--quick]
    steerdiff bench distributed [--out DIR] [--seed S] [--quick]
    steerdiff bench epsilon [--out DIR] [--n N] [--seed S] [--draws D] [--b B...] [--no-calibration] [--quick]
    steerdiff sample --out FILE.{pt,npy,png} [--model {gmm,digits}] [--n N] [--steps K] [--solver NAME]
        [--schedule NAME] [--seed S] [--guidance {none,cfg,classifier}] [--label D] [--scale W]
        [--weights DIR]
    steerdiff train digits --out DIR [--seed S] [--quick] [--threads T]

Every command but ``train`` takes ``--no-progress``; ``python -m steerdiff`` is the same command line.
``bench solvers`` runs :mod:`steerdiff.bench.solvers` and writes ``solvers.csv``, ``solvers.txt`` and
``solvers.png`` to ``--out`` (``--model digits``: :mod:`steerdiff.bench.digits`); ``sample`` draws from
the embedded default model (the benchmark's 64-dimensional Gaussian mixture under Stable Diffusion's
betas, through its exact denoiser) or, with ``--model digits``, the 8x8 digits model;
``demo`` runs :mod:`steerdiff.demo`.
Tables go to stdout; diagnostics go through :mod:`logging` (``-v`` for progress messages).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from . import __version__, sampling, schedules, solvers
from .solvers.base import ODE_MAX_H, ODE_MAX_H_RATIO

__all__ = ["build_parser", "main"]

SAMPLE_FORMATS = (".pt", ".npy", ".png")


def echo(text: str) -> None:
    """The CLI's output: one block of text to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun`` in its number: ``1 step``, ``2 steps`` (a plural in ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _integer(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """The argparse type of an integer option ``>= lo`` (and ``<= hi``): its message says so for ``1.5`` or
    ``x`` too."""
    accepted = f">= {lo}" if hi is None else f"from {lo} to {hi}"

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = lo - 1
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {accepted}, got {value!r}")
        return n

    return parse


# seeds of 32 bits, as numpy's: the runs' seed + k and training's seed * 1000 + k stay within torch's 64
_positive, _at_least_two, _seed = _integer(1), _integer(2), _integer(0, 2**32 - 1)
# intra-op threads: at most one per CPU (more only contend, and torch's count is a 32-bit integer)
_threads = _integer(1, os.cpu_count() or 1)


FLOAT32_MAX = torch.finfo(torch.float32).max


def _scale(value: str) -> float:
    """The argparse type of ``--scale``: a number from 0 to float32's largest (the digits model's outputs
    are float32, and CFG weighs them by the scale in their dtype)."""
    try:
        w = float(value)
    except ValueError:
        w = math.nan
    if not 0 <= w <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a number from 0 to {FLOAT32_MAX:.4g} (float32), got {value!r}"
        )
    return w


def _positive_real(value: str) -> float:
    """The argparse type of ``bench epsilon --b``: a finite number > 0."""
    try:
        b = float(value)
    except ValueError:
        b = math.nan
    if not 0 < b < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return b


def _digit(value: str) -> int:
    """The argparse type of ``--label`` and ``--digit``: a class 0-9 of the digits model."""
    try:
        d = int(value)
    except ValueError:
        d = -1
    if not 0 <= d <= 9:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9 (a class of the digits model), got {value!r}")
    return d


def _shape(value: str) -> tuple[int, ...]:
    """The argparse type of ``--shape``: a batch size and a sample shape, positive integers joined by ``x``
    (``256x64``)."""
    try:
        shape = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a batch size and a sample shape joined by x, like 256x64 or 4x4x64x64; got {value!r}"
        )
    return shape


def _device(value: str) -> str:
    """The argparse type of ``--device``: a torch device that is available here."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a torch device ({err}), got {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {value!r}")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        here = ", ".join(f"cuda:{i}" for i in range(count))
        raise argparse.ArgumentTypeError(f"{value!r}: the CUDA devices here are {here}")
    return value


def _creatable(folder: Path) -> None:
    """Refuse, before a run, a ``folder`` that could not be created or written to: its nearest existing
    ancestor (itself where it exists) must be a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the folder {str(existing)!r} is not writable")


def _out_dir(value: str) -> Path:
    """The argparse type of a benchmark's, the demo's and training's ``--out``: a folder that is there or
    can be created."""
    folder = Path(value)
    _creatable(folder)
    return folder


def _weights_dir(value: str) -> Path:
    """The argparse type of ``--weights``: a folder (a missing one, or missing files in it, get the
    loader's message, which says how to train them)."""
    folder = Path(value)
    if folder.exists() and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a file, not a folder of digits_*.safetensors")
    return folder


def _sample_path(value: str) -> Path:
    """The argparse type of ``sample --out``: a file of :data:`SAMPLE_FORMATS` whose folder is there or can
    be created."""
    path = Path(value)
    if path.suffix not in SAMPLE_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: the file must end in one of {', '.join(SAMPLE_FORMATS)}"
        )
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder, not a file")
    _creatable(path.parent)
    return path


def _bench_arguments(p: argparse.ArgumentParser, quick: str, seed: str, diffusers: bool = True) -> None:
    """The options every benchmark takes (``--no-diffusers`` where it compares with diffusers)."""
    p.add_argument("--out", type=_out_dir, default="out", help="output folder (default: out)")
    p.add_argument("--seed", type=_seed, default=0, help=f"{seed} (default: 0)")
    p.add_argument("--quick", action="store_true", help=quick)
    if diffusers:
        p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``steerdiff`` and its sub-commands."""
    from .bench.discrete import QUICK_GUIDED_STEPS, QUICK_N, QUICK_PARTICLES, QUICK_STEER_N, QUICK_STEPS
    from .bench.distributed import FULL, QUICK
    from .bench.guided import PROBLEMS
    from .bench.longstep import PROCESSES
    from .demo import CFG_SCALE, CLASSIFIER_SCALE

    parser = argparse.ArgumentParser(
        prog="steerdiff",
        description="Fast, steerable sampling of diffusion and flow models, checked against exact answers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO)")
    parser.add_argument("--version", action="version", version=f"steerdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks against exact answers", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bs = bench_sub.add_parser(
        "solvers",
        help="solver error vs NFE on the exact model, beside diffusers",
        description=(
            "Relative RMSE vs the exact sample of every solver x schedule at NFE 3..50 on the default "
            "64-d Gaussian mixture under SD betas; diffusers' schedulers on the same model and noise; "
            "sampler overhead per step. Writes OUT/solvers.csv, OUT/solvers.png and OUT/solvers.txt."
        ),
    )
    _bench_arguments(
        bs, "NFE 5 and 10 only, short overhead timing (--model digits: NFE 10, batch <= 256)", "seed of x_T"
    )
    bs.add_argument(
        "--batch", type=_positive, default=None, help="samples in x_T (default: 1024; --model digits: 4096)"
    )
    bs.add_argument(
        "--model",
        choices=("gmm", "digits"),
        default="gmm",
        help="gmm: the exact 64-d mixture (default); digits: the learned 8x8 digits model, scored by "
        "Frechet distance and by distance to a 1,000-step ODE solution (OUT/digits_solvers.{csv,png,txt})",
    )
    bs.add_argument(
        "--weights",
        type=_weights_dir,
        default=None,
        help="--model digits: its weights folder (default: committed)",
    )
    bs.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch intra-op threads during the run (default: 1; small tensors: more threads only contend)",
    )
    bs.add_argument(
        "--draws",
        type=_positive,
        default=None,
        help="--model gmm: independent draws of x_T (seeds SEED, SEED + 1, ...) that (a) and (b) pool "
        "(default: 16)",
    )
    bs.set_defaults(func=_bench_solvers, parser=bs)
    bd = bench_sub.add_parser(
        "sde",
        help="stochastic samplers' sliced W2 to the exact distribution, beside diffusers",
        description=(
            "Sliced W2 to exact samples of every stochastic sampler (time_uniform and karras "
            "schedules) at NFE 10..200 on the default 64-d Gaussian mixture under SD betas, beside "
            "the floor and diffusers' DDPM, EulerAncestral, SDE-DPM-Solver++ and SA-Solver. Writes "
            "OUT/sde.csv, OUT/sde.png and OUT/sde.txt."
        ),
    )
    _bench_arguments(bd, "NFE 20 and 100 only", "seed of x_T; the noise uses seed + 1")
    bd.add_argument("--n", type=_at_least_two, default=4096, help="samples, >= 2 (default: 4096)")
    bd.set_defaults(func=_bench_sde)
    bi = bench_sub.add_parser(
        "invert",
        help="deterministic inversion (sd.invert) vs the exact one, beside diffusers' inverse schedulers",
        description=(
            "Relative RMSE vs the exact inversion (the probability-flow ODE over each run's own grid) of "
            "sd.invert with every deterministic solver x schedule at NFE 3..50, from exact samples of the "
            "default 64-d Gaussian mixture under SD betas; diffusers' DDIMInverseScheduler and "
            "DPMSolverMultistepInverseScheduler on the same samples; the defaults and their round trips at "
            "10 and 20 steps. Writes OUT/invert.csv, OUT/invert.png and OUT/invert.txt."
        ),
    )
    _bench_arguments(bi, "NFE 5 and 10 only", "seed of the clean samples x_0")
    bi.add_argument("--n", type=_positive, default=256, help="clean samples (default: 256)")
    bi.set_defaults(func=_bench_invert)
    bp = bench_sub.add_parser(
        "posterior",
        help="inverse-problem guidance (DPS, MCG, PiGDM, RePaint) vs the exact posterior",
        description=(
            "Sliced W2 to the exact posterior of DPS (both variants and the literal Alg. 1), MCG, PiGDM "
            "and RePaint at NFE 50/100/200 with tuned steps, on Gaussian-mixture priors (16-d, 64-d, "
            "MCGdiff's 25-component grid in 8 and 80 d) under y = A x + noise. Writes OUT/posterior.csv, "
            "OUT/posterior.png and OUT/posterior.txt."
        ),
    )
    _bench_arguments(bp, "one 16-d case at NFE 50, n <= 512", "seed of the problems, x_T and noise", False)
    bp.add_argument("--n", type=_at_least_two, default=1024, help="samples per run, >= 2 (default: 1024)")
    bp.add_argument("--all", action="store_true", help="all 36 (prior, d_y, noise) cases (slow)")
    bp.add_argument(
        "--inpaint",
        action="store_true",
        help="the inpainting cases instead (Inpaint operators); writes OUT/posterior_inpaint.{csv,png,txt}",
    )
    bp.set_defaults(func=_bench_posterior, parser=bp)
    bst = bench_sub.add_parser(
        "steer",
        help="particle steering (FK, TDS, SVDD, DTS, best-of-N, CoDe, FKC, DriftLite), DPS vs exact targets",
        description=(
            "Sliced W2 to exact reward-tilted, class-conditional and posterior Gaussian-mixture targets, "
            "and the error of E[r], against NFE per returned sample (100/400/1600) for FK steering, TDS, "
            "SVDD, Diffusion Tree Sampling, best-of-N, CoDe, FK correctors, DriftLite and tuned DPS. Writes "
            "OUT/steer.csv, OUT/steer.png and OUT/steer.txt."
        ),
    )
    _bench_arguments(bst, "NFE 400 only, n <= 256", "seed of the problems and the noise", False)
    bst.add_argument(
        "--n", type=_at_least_two, default=1024, help="returned samples per run, >= 2 (default: 1024)"
    )
    bst.set_defaults(func=_bench_steer)
    bo = bench_sub.add_parser(
        "overhead",
        help="time per step outside the net, beside diffusers' scheduler.step (CPU or an accelerator)",
        description=(
            "Median time per step of sd.sample (dpmpp_2m, unipc, ddim, euler) and of a pipeline's loop "
            "around the matching diffusers scheduler, with a free net, on float32 samples of each "
            "--shape on --device. Writes OUT/overhead.csv, OUT/overhead.png and OUT/overhead.txt."
        ),
    )
    bo.add_argument("--out", type=_out_dir, default="out", help="output folder (default: out)")
    bo.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cuda (default: cpu)")
    bo.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=None,
        help="sample shape as BxCx..., repeatable (default: 256x64 and 4x4x64x64)",
    )
    bo.add_argument("--steps", type=_positive, default=20, help="steps per run (default: 20)")
    bo.add_argument("--repeats", type=_positive, default=30, help="timed runs (default: 30)")
    bo.add_argument("--threads", type=_threads, default=1, help="torch intra-op threads (default: 1)")
    bo.add_argument("--no-progress", action="store_true", help="no progress bars")
    bo.set_defaults(func=_bench_overhead)
    bl = bench_sub.add_parser(
        "longstep",
        help="multistep solvers with and without their long-step rule, against the exact answer",
        description=(
            "Relative RMSE of dpmpp_2m, dpmpp_3m, unipc and mrs with their default long-step rule and "
            "without it (max_h=inf) on the 16-d default mixture under six processes, every schedule, "
            "3-50 steps, for every case the rule changes. Writes OUT/longstep.csv, OUT/longstep.png and "
            "OUT/longstep.txt."
        ),
    )
    _bench_arguments(bl, "10 and 20 steps only", "seed of x_T", False)
    bl.add_argument("--n", type=_positive, default=256, help="samples (default: 256)")
    bl.add_argument(
        "--process",
        choices=PROCESSES,
        action="append",
        default=None,
        help="only this process, repeatable (default: all)",
    )
    bl.set_defaults(func=_bench_longstep)
    bg = bench_sub.add_parser(
        "guided",
        help="solvers for guided denoisers (the guided default and its alternatives), against the guided ODE",
        description=(
            "Relative RMSE of sd.sample's guided default, DPM-Solver++(2M) plain, with a flat and with the "
            "scale-dependent long-step limit, UniPC-2, UniPC-3 and DDIM under classifier-free guidance "
            "(scales 2, 4, 7.5; 3-20 steps) on the 16-d and 64-d default mixtures under several processes, "
            "against the guided ODE's 800-step solution. Writes OUT/guided.csv, OUT/guided.png and "
            "OUT/guided.txt. --validate: the default against the old default (2M with the scale's limit "
            "below 15 steps, UniPC-2 without one from there) on other data (other x_T, the digits model, "
            "other schedules; 3-30 steps); writes OUT/guided_validation.{csv,png,txt}."
        ),
    )
    _bench_arguments(bg, "scales 2 and 7.5 at 5 and 15 steps only", "seed of x_T (draw k: seed + k)", False)
    bg.add_argument(
        "--n",
        type=_positive,
        default=256,
        help="samples per draw (default: 256; --validate's digits: <= 256)",
    )
    bg.add_argument(
        "--draws",
        type=_positive,
        default=2,
        help="independent draws of x_T (seeds SEED, SEED + 1, ...), pooled; with --validate in every set, "
        "the digits model's too (default: 2)",
    )
    bg.add_argument(
        "--problem",
        choices=PROBLEMS,
        action="append",
        default=None,
        help="only this mixture dimension and process, repeatable (default: all)",
    )
    bg.add_argument(
        "--validate",
        action="store_true",
        help="the validation sets instead (x_T seeds seed+100.., the digits model, other schedules)",
    )
    bg.set_defaults(func=_bench_guided)
    bdi = bench_sub.add_parser(
        "discrete",
        help="masked diffusion samplers and guidance: total variation to the exact law vs NFE",
        description=(
            "Total variation to the exact law (all 4,096 sequences of a 4-component CategoricalMixture, "
            "L = 6, V = 4, exact denoiser, linear schedule) of ancestral and remdm (eta 0.02, 0.1) at 1-64 "
            "steps and first_hitting, and of classifier guidance (exact classifier) and CFG (w = 1, 3) "
            "toward a component with first_hitting and ancestral at 2, 8 and 32 steps, and of FK steering "
            "(first_hitting; ancestral at 2 and 8 steps) and best-of-N (first_hitting) at 4, 16 and 64 "
            "particles toward the law tilted by exp(2 r) of a per-position reward (on min(n, 4096) rows, "
            "with the log Z estimate against the exact one), each beside the floor of as many exact "
            "samples. Writes OUT/discrete.csv, OUT/discrete.png and OUT/discrete.txt."
        ),
    )
    _bench_arguments(
        bdi,
        f"steps {' and '.join(map(str, QUICK_STEPS))} (guided: {', '.join(map(str, QUICK_GUIDED_STEPS))}) "
        f"only, n <= {QUICK_N}; particles {' and '.join(map(str, QUICK_PARTICLES))} on <= {QUICK_STEER_N} "
        "rows",
        "seed of the model; the noise uses seed + 1, the floors seed + 2, seed + 3 and seed + 4, the "
        "steering reward seed + 5",
        False,
    )
    bdi.add_argument(
        "--n",
        type=_positive,
        default=32768,
        help="samples per run (default: 32768; particle steering: at most 4096 rows)",
    )
    bdi.set_defaults(func=_bench_discrete)
    bpa = bench_sub.add_parser(
        "parallel",
        help="ParaDiGMS (sd.paradigms): parallel iterations and error against the sequential sampler",
        description=(
            "Parallel iterations, sequential batched network calls (against sd.sample's NFE), NFE, distance "
            "to sd.sample's result and error against the exact answer (DDIM, UniPC, DPM-Solver++(2M), Heun: "
            "the exact ODE solution; DDPM, dpmpp_sde: sliced W2 to exact samples) of sd.paradigms with DDIM "
            "and DDPM at 50, 200 and 1000 steps, UniPC, DPM-Solver++(2M) and the staged Heun and dpmpp_sde "
            "at 50 and 200, windows 4, 16 and 64, tolerances 0.1 and 0.01, on the default 64-d Gaussian "
            "mixture under SD betas. Writes OUT/parallel.csv, OUT/parallel.png and OUT/parallel.txt."
        ),
    )
    _bench_arguments(
        bpa, "50 and 200 steps, windows 4 and 16 only", "seed of x_T; the noise uses seed + 1", False
    )
    bpa.add_argument("--n", type=_at_least_two, default=256, help="samples, >= 2 (default: 256)")
    bpa.set_defaults(func=_bench_parallel)
    bdt = bench_sub.add_parser(
        "distributed",
        help="group= on gloo CPU ranks: time at 1 and 2 ranks, non-net share, equality with 1 rank",
        description=(
            "Spawns gloo CPU ranks (one torch thread each) at world sizes 1 and 2 and times, with the same "
            f"work at each, on the digits model: sd.distributed.sample ({FULL.samples} samples, "
            f"{FULL.sample_steps} steps of the default solver), sd.smc.fk_steering with group= "
            f"({FULL.batch} rows x {FULL.particles} particles, {FULL.smc_steps} DDPM steps, the digits "
            "classifier's reward, "
            f"ess_threshold 0.5) and sd.paradigms with group= ({FULL.paradigms_samples} samples, DDPM "
            f"{FULL.paradigms_steps} steps, window {FULL.window}): the median time, the speed-up of 2 ranks "
            "over 1, the same run with a free net (the non-net share), resampling events or Picard "
            "iterations, and the largest difference to the 1-rank result. CPU and gloo, not GPUs and NCCL. "
            "Writes OUT/distributed.csv, OUT/distributed.png and OUT/distributed.txt."
        ),
    )
    _bench_arguments(
        bdt,
        f"{QUICK.samples} samples, {QUICK.batch} x {QUICK.particles} particles, {QUICK.paradigms_samples} "
        f"samples of {QUICK.paradigms_steps} steps; {QUICK.repeats} timed run",
        "seed of the noise (paradigms' solver noise: seed + 1)",
        False,
    )
    bdt.set_defaults(func=_bench_distributed)
    be = bench_sub.add_parser(
        "epsilon",
        help="Epsilon Scaling (sd.guidance.EpsilonScaling) on the digits model: FD with and without it",
        description=(
            "Frechet distance to the held-out digits of the digits model sampled unconditionally by DDPM "
            "(50 and 100 leading steps) and DDIM (10 and 20 steps), without Epsilon Scaling, with the "
            "uniform b and the line k t + b calibrated by sd.guidance.epsilon_norms, and with each fixed b; "
            "about 2 min on 2 idle cores with the defaults. Writes OUT/epsilon.csv, OUT/epsilon.png and "
            "OUT/epsilon.txt."
        ),
    )
    _bench_arguments(
        be,
        "DDIM at 10 steps and b = 1.01 only",
        "seed of x_T of the first draw (draw k: seed + k; its DDPM noise seed + k + 1, its calibration "
        "seed + k + 100)",
        False,
    )
    be.add_argument("--n", type=_at_least_two, default=1024, help="samples per run, >= 2 (default: 1024)")
    be.add_argument(
        "--draws", type=_positive, default=2, help="draws of x_T (seeds SEED, SEED + 1, ...) (default: 2)"
    )
    be.add_argument(
        "--b",
        type=_positive_real,
        nargs="+",
        default=None,
        help="the fixed b values (default: 0.99 0.995 1.005 1.01 1.02)",
    )
    be.add_argument("--no-calibration", action="store_true", help="only b = 1 and the fixed b values")
    be.set_defaults(func=_bench_epsilon)

    sp = sub.add_parser(
        "sample",
        help="write samples of the default model (or the digits model) to a file",
        description=(
            "Sample the embedded default model (64-d Gaussian mixture, SD betas, exact denoiser) or, with "
            "--model digits, the 8x8 digits model (unconditional, with --label, or guided toward it) from "
            "standard normal x_T and write the samples to a .pt or .npy file (digits: or a .png grid)."
        ),
    )
    sp.add_argument(
        "--out", type=_sample_path, required=True, help="output file, .pt or .npy (.png: a grid, digits)"
    )
    sp.add_argument(
        "--model",
        choices=("gmm", "digits"),
        default="gmm",
        help="gmm: the exact 64-d mixture (default); digits: the embedded 8x8 digits model",
    )
    sp.add_argument(
        "--guidance",
        choices=("none", "cfg", "classifier"),
        default="none",
        help="digits only (default: none)",
    )
    sp.add_argument(
        "--label", type=_digit, default=None, help="digits: the class 0-9 (default: unconditional)"
    )
    sp.add_argument(
        "--scale",
        type=_scale,
        default=None,
        help=f"guidance scale, with --guidance (default: the demo's, cfg {CFG_SCALE:g}, classifier "
        f"{CLASSIFIER_SCALE:g})",
    )
    sp.add_argument(
        "--weights", type=_weights_dir, default=None, help="digits weights folder (default: committed)"
    )
    sp.add_argument("--n", type=_positive, default=16, help="number of samples (default: 16)")
    sp.add_argument("--steps", type=_positive, default=10, help="solver steps (default: 10)")
    sp.add_argument(
        "--solver",
        choices=solvers.available(),
        default=None,
        help=f"default: {sampling.DEFAULT_SOLVER} (first order on a step longer than "
        f"{ODE_MAX_H:g} in log-SNR and {ODE_MAX_H_RATIO:g}x the one before); "
        "with --guidance dpmpp_2m (first order on steps longer than "
        f"{sampling.GUIDED_MAX_H} in log-SNR at scale {sampling.GUIDED_MAX_H_SCALE:g}, longer ones at lower "
        f"scales), UniPC-2 where every step is within it and from {sampling.GUIDED_CORRECTOR_FROM} steps "
        "(its long steps first order too)",
    )
    sp.add_argument(
        "--schedule",
        choices=schedules.available(),
        default=sampling.DEFAULT_SCHEDULE,
        help="default: %(default)s",
    )
    sp.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of x_T and, through seed + 1, of stochastic samplers' noise; sample i is the same "
        "whatever --n (default: 0)",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_sample, parser=sp)

    dm = sub.add_parser(
        "demo",
        help="sample and steer the embedded 8x8 digits model: table + OUT/demo.png",
        description=(
            "Unconditional digits at NFE 10 (UniPC, DDIM) against 1,000-step DDPM; CFG, classifier guidance, "
            "FK steering and TDS toward a digit; inpainting of the lower half with DPS and TDS. Prints "
            "classifier accuracy on the digit, Frechet distance to held-out digits and wall time; writes "
            "OUT/demo.png and OUT/demo.csv."
        ),
    )
    dm.add_argument("--out", type=_out_dir, default="out", help="output folder (default: out)")
    dm.add_argument("--digit", type=_digit, default=3, help="target digit 0-9 (default: 3)")
    dm.add_argument("--n", type=_at_least_two, default=512, help="samples per row, >= 2 (default: 512)")
    dm.add_argument("--seed", type=_seed, default=0, help="seed (default: 0)")
    dm.add_argument("--no-progress", action="store_true", help="no progress bars")
    dm.add_argument(
        "--weights", type=_weights_dir, default=None, help="digits weights folder (default: committed)"
    )
    dm.add_argument("--threads", type=_threads, default=1, help="torch intra-op threads (default: 1)")
    dm.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train the embedded models", description="Train embedded models.")
    train_sub = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    td = train_sub.add_parser(
        "digits",
        help="the 8x8 digits denoiser and classifiers (CPU, minutes)",
        description=(
            "Train the class-conditional denoiser, the noise-conditional classifier and the clean "
            "classifier on scikit-learn's 8x8 digits and write OUT/digits_*.safetensors."
        ),
    )
    td.add_argument(
        "--out",
        type=_out_dir,
        required=True,
        help="output folder (required: the package's committed weights, which the loaders read by default, "
        "are replaced only where it names their folder, steerdiff/toy/weights; load others with --weights)",
    )
    td.add_argument("--seed", type=_seed, default=0, help="training seed (default: 0)")
    td.add_argument("--quick", action="store_true", help="a few steps per net (smoke test)")
    td.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch intra-op threads (default: 1, as for the committed weights; the bits depend on it)",
    )
    td.set_defaults(func=_train_digits, parser=td)
    return parser


T = TypeVar("T")


def _with_threads(n: int, run: Callable[[], T]) -> T:
    """``run()`` with ``n`` torch intra-op threads, restoring the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _report(report: str, out: Path, stem: str, csv_path: Path, png_path: Path | None) -> int:
    """Print ``report``, keep it as ``OUT/stem.txt`` (the numbers docs/benchmarks.md quotes) and list the
    files."""
    txt = out / f"{stem}.txt"
    txt.write_text(report + "\n")
    echo(report)
    echo(f"\nwrote {csv_path}, {txt}" + (f" and {png_path}" if png_path is not None else ""))
    return 0


def _write(result: Any, out: Path, stem: str, report: str, **plot: Any) -> int:
    """Write ``OUT/stem.csv``, ``OUT/stem.png`` and ``OUT/stem.txt`` and print ``report``."""
    from .bench import solvers as bench
    from .bench._figure import write_outputs

    header, rows = bench.csv_table(result)
    csv_path, png_path = write_outputs(out, stem, header, rows, lambda path: bench.plot(result, path, **plot))
    return _report(report, out, stem, csv_path, png_path)


def _digits_models(weights: Path | None) -> Any:
    """The digits models (:func:`steerdiff.bench.digits.load_models`); a missing weights file (or one that
    is not the model's safetensors file) exits with the loader's message (which says how to train them)."""
    from .bench.digits import load_models

    try:
        return load_models(weights)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"steerdiff: {err}") from None


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    models = _digits_models(args.weights)
    result = _with_threads(
        args.threads,
        lambda: demo.run_demo(
            args.out, n=args.n, digit=args.digit, seed=args.seed, progress=not args.no_progress,
            models=models,
        ),
    )  # fmt: skip
    echo(demo.format_table(result))
    return 0


def _bench_digits(args: argparse.Namespace) -> int:
    from .bench import digits
    from .bench.solvers import CFG_SCALES, CFG_STEPS, QUICK_CFG_SCALES, QUICK_CFG_STEPS

    batch = args.batch or 4096
    if batch < 2:
        args.parser.error("--model digits needs --batch >= 2 (a Frechet distance needs a covariance)")
    models = _digits_models(args.weights)
    n, nfes = (min(batch, 256), digits.QUICK_NFES) if args.quick else (batch, digits.NFES)
    scales, steps = (QUICK_CFG_SCALES, QUICK_CFG_STEPS) if args.quick else (CFG_SCALES, CFG_STEPS)
    result = _with_threads(
        args.threads,
        lambda: digits.run(
            n=n,
            seed=args.seed,
            nfes=nfes,
            models=models,
            progress=not args.no_progress,
            guided_scales=scales,
            guided_steps=steps,
            with_diffusers=not args.no_diffusers,
        ),
    )
    csv_path, png_path = digits.write_results(result, args.out)
    return _report(digits.format_report(result), args.out, "digits_solvers", csv_path, png_path)


def _bench_solvers(args: argparse.Namespace) -> int:
    from .bench import solvers as bench

    if args.model == "digits":
        if args.draws is not None:
            args.parser.error("--draws pools draws of the gmm model; --model digits runs one x_T (--batch)")
        return _bench_digits(args)
    if args.weights is not None:
        args.parser.error("--weights needs --model digits")
    result = _with_threads(
        args.threads,
        lambda: bench.run(
            batch=args.batch or 1024,
            seed=args.seed,
            quick=args.quick,
            with_diffusers=not args.no_diffusers,
            progress=not args.no_progress,
            draws=args.draws or bench.DRAWS,
        ),
    )
    return _write(result, args.out, "solvers", bench.format_report(result))


def _bench_sde(args: argparse.Namespace) -> int:
    from .bench import sde

    result = _with_threads(
        1,
        lambda: sde.run(
            n=args.n,
            seed=args.seed,
            quick=args.quick,
            with_diffusers=not args.no_diffusers,
            progress=not args.no_progress,
        ),
    )
    return _write(
        result,
        args.out,
        "sde",
        sde.format_report(result),
        ylabel="sliced W2 to exact samples",
        title="Stochastic samplers on the exact 64-d Gaussian mixture: steerdiff solid, diffusers dashed",
        references=[("floor (exact samples)", result.floor), ("exact ODE from the same x_T", result.ode)],
    )


def _bench_invert(args: argparse.Namespace) -> int:
    from .bench import invert

    result = _with_threads(
        1,
        lambda: invert.run(
            n=args.n,
            seed=args.seed,
            quick=args.quick,
            with_diffusers=not args.no_diffusers,
            progress=not args.no_progress,
        ),
    )
    return _write(
        result,
        args.out,
        "invert",
        invert.format_report(result),
        ylabel="relative RMSE vs the exact inversion",
        title="Inverting exact samples of the 64-d mixture (SD betas): steerdiff solid, diffusers dashed",
    )


def _bench_posterior(args: argparse.Namespace) -> int:
    from .bench import posterior

    cases = [option for option in ("--quick", "--all", "--inpaint") if getattr(args, option[2:])]
    if len(cases) > 1:
        args.parser.error(f"{' and '.join(cases)}: each chooses the cases, give one of them")
    result = _with_threads(
        1,
        lambda: posterior.run(
            n=args.n,
            seed=args.seed,
            quick=args.quick,
            full_grid=args.all,
            inpaint=args.inpaint,
            progress=not args.no_progress,
        ),
    )
    stem = "posterior_inpaint" if args.inpaint else "posterior"
    csv_path, png_path = posterior.write_results(result, args.out, stem)
    report = posterior.format_report(result) + "\n\n" + posterior.markdown_table(result)
    return _report(report, args.out, stem, csv_path, png_path)


def _bench_steer(args: argparse.Namespace) -> int:
    from .bench import steer

    result = _with_threads(
        1, lambda: steer.run(n=args.n, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    )
    csv_path, png_path = steer.write_results(result, args.out)
    report = steer.format_report(result) + "\n\n" + steer.markdown_table(result)
    return _report(report, args.out, "steer", csv_path, png_path)


def _bench_overhead(args: argparse.Namespace) -> int:
    from .bench import overhead

    shapes = args.shape or overhead.SHAPES
    result = _with_threads(
        args.threads,
        lambda: overhead.run(shapes, args.device, args.steps, args.repeats, progress=not args.no_progress),
    )
    csv_path, png_path = overhead.write_results(result, args.out)
    return _report(overhead.format_report(result), args.out, "overhead", csv_path, png_path)


def _bench_longstep(args: argparse.Namespace) -> int:
    from .bench import longstep

    result = _with_threads(
        1,
        lambda: longstep.run(
            n=args.n, seed=args.seed, quick=args.quick, progress=not args.no_progress, only=args.process
        ),
    )
    csv_path, png_path = longstep.write_results(result, args.out)
    return _report(longstep.format_report(result), args.out, "longstep", csv_path, png_path)


def _bench_guided(args: argparse.Namespace) -> int:
    from .bench import guided

    kw: dict[str, Any] = dict(
        n=args.n,
        seed=args.seed,
        draws=args.draws,
        quick=args.quick,
        progress=not args.no_progress,
        only=args.problem,
    )
    if args.validate:
        checked = _with_threads(1, lambda: guided.validate(**kw))
        csv_path, png_path = guided.write_validation(checked, args.out)
        return _report(guided.format_validation(checked), args.out, "guided_validation", csv_path, png_path)
    result = _with_threads(1, lambda: guided.run(**kw))
    csv_path, png_path = guided.write_results(result, args.out)
    return _report(guided.format_report(result), args.out, "guided", csv_path, png_path)


def _bench_parallel(args: argparse.Namespace) -> int:
    from .bench import parallel

    result = _with_threads(
        1, lambda: parallel.run(n=args.n, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    )
    csv_path, png_path = parallel.write_results(result, args.out)
    return _report(parallel.format_report(result), args.out, "parallel", csv_path, png_path)


def _bench_epsilon(args: argparse.Namespace) -> int:
    from .bench import epsilon

    models = _digits_models(None)
    result = _with_threads(
        1,
        lambda: epsilon.run(
            models,
            n=args.n,
            seeds=range(args.seed, args.seed + args.draws),
            b_values=epsilon.FIXED_B if args.b is None else args.b,
            calibrate=not args.no_calibration,
            quick=args.quick,
            progress=not args.no_progress,
        ),
    )
    csv_path, png_path = epsilon.write_results(result, args.out)
    return _report(epsilon.format_report(result), args.out, "epsilon", csv_path, png_path)


def _bench_distributed(args: argparse.Namespace) -> int:
    from .bench import distributed

    result = distributed.run(seed=args.seed, quick=args.quick, progress=not args.no_progress)
    csv_path, png_path = distributed.write_results(result, args.out)
    return _report(distributed.format_report(result), args.out, "distributed", csv_path, png_path)


def _bench_discrete(args: argparse.Namespace) -> int:
    from .bench import discrete

    result = _with_threads(
        1, lambda: discrete.run(n=args.n, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    )
    csv_path, png_path = discrete.write_results(result, args.out)
    return _report(discrete.format_report(result), args.out, "discrete", csv_path, png_path)


def _sample_noise(args: argparse.Namespace, den: Any) -> list[torch.Generator] | None:
    """One generator per sample for a stochastic solver, seeded from ``seed + 1``'s stream: sample ``i`` is
    the same whatever ``--n`` (as ``x_T``'s rows are, drawn from ``seed`` alone). None for a deterministic
    one, which draws nothing (the same output): each CPU generator holds ~2.7 KB, 5.4 GB at ``--n 2e6``."""
    solver = sampling.default_solver(den, args.steps) if args.solver is None else solvers.get(args.solver)
    if not solver.stochastic:
        return None
    seeds = torch.randint(2**62, (args.n,), generator=torch.Generator().manual_seed(args.seed + 1))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _draw(
    args: argparse.Namespace, den: Any, x_T: torch.Tensor, **cond: Any
) -> tuple[torch.Tensor, sampling.SampleInfo]:
    """:func:`~steerdiff.sampling.sample` with ``sample``'s options. Options the library refuses (more
    steps than an integer spacing has timesteps) exit with its message, as argparse's errors do; a run
    that turns NaN (a huge ``--scale``) exits with the step it did so at."""
    try:
        return sampling.sample(
            den, x_T, args.steps, args.solver, args.schedule, progress=not args.no_progress,
            generator=_sample_noise(args, den), return_info=True, **cond,
        )  # fmt: skip
    except ValueError as err:
        solver = args.solver or "the default solver"
        used = f"--solver: {solver}, --schedule: {args.schedule}, --steps: {args.steps}"
        cast(argparse.ArgumentParser, args.parser).error(f"{err} ({used})")
    except solvers.NonFiniteError as err:
        raise SystemExit(f"steerdiff sample: {err}") from None


def _sample_digits(args: argparse.Namespace) -> int:
    from . import guidance
    from .bench.digits import save_grid
    from .demo import CFG_SCALE, CLASSIFIER_SCALE
    from .toy.digits import DIGITS_SHAPE, NULL_LABEL

    if args.guidance != "none" and args.label is None:
        args.parser.error(f"--guidance {args.guidance} needs --label 0-9")
    if args.guidance == "none" and args.scale is not None:
        args.parser.error("--scale needs --guidance cfg or --guidance classifier")
    m = _digits_models(args.weights)
    den, label = m.den, NULL_LABEL if args.label is None else args.label
    if args.guidance == "cfg":
        scale = CFG_SCALE if args.scale is None else args.scale
        den = guidance.CFG(m.den, m.den, scale, uncond_kwargs={"label": NULL_LABEL})
    elif args.guidance == "classifier":
        scale, nc, d = CLASSIFIER_SCALE if args.scale is None else args.scale, m.noisy_classifier, label
        den = guidance.ClassifierGuidance(m.den, lambda x, t, **_: nc.log_prob(x, t, d), scale)
        label = NULL_LABEL  # classifier guidance steers the unconditional model
    x_T = torch.randn(args.n, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    with torch.set_grad_enabled(args.guidance == "classifier"):
        x, info = _draw(args, den, x_T, label=label)
    x = x.detach()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    what = f"{info.solver.name}, {args.schedule}, {_count(args.steps, 'step')}, NFE {info.nfe}"
    if args.guidance != "none":
        what += f", {args.guidance} scale {scale:g} toward {args.label}"
    elif args.label is not None:
        what += f", label {args.label}"
    if args.out.suffix == ".png":
        rows = [("", x[i : i + 16]) for i in range(0, len(x), 16)]
        if not save_grid(rows, args.out, f"digits: {what}"):
            raise SystemExit(
                "steerdiff sample: a .png needs matplotlib (pip install matplotlib); use .pt or .npy"
            )
    elif args.out.suffix == ".pt":
        torch.save(x, args.out)
    else:
        np.save(args.out, x.numpy())
    echo(f"wrote {_count(args.n, 'digit')} to {args.out} ({what})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .bench.solvers import default_model, initial_noise

    if args.model == "digits":
        return _sample_digits(args)
    if (
        args.out.suffix == ".png"
        or args.guidance != "none"
        or args.label is not None
        or args.scale is not None
        or args.weights is not None
    ):
        args.parser.error(".png output, --guidance, --label, --scale and --weights need --model digits")
    gmm, proc = default_model()
    x_T = initial_noise(args.n, gmm.dim, args.seed)
    x, info = _draw(args, gmm.denoiser(proc), x_T)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".pt":
        torch.save(x, args.out)
    else:
        np.save(args.out, x.numpy())
    echo(
        f"wrote {_count(args.n, 'sample')} of shape {tuple(x.shape[1:])} to {args.out} "
        f"({info.solver.name}, {args.schedule}, {_count(args.steps, 'step')}, NFE {info.nfe})"
    )
    return 0


def _train_digits(args: argparse.Namespace) -> int:
    from .toy import train_digits

    result = _with_threads(args.threads, lambda: train_digits.train(args.out, args.seed, args.quick))
    echo(train_digits.format_report(result))
    return 0


# torch's CPU allocator raises a plain RuntimeError (posix_memalign: "can't allocate memory", malloc: "not
# enough memory"), its C++ allocations std::bad_alloc; CUDA and MPS raise torch.OutOfMemoryError
CPU_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "std::bad_alloc")
SIZES = ("n", "batch", "draws", "steps")  # the integer options that size a run (and --shape)


def _out_of_memory(command: str, args: argparse.Namespace, err: Exception) -> SystemExit | None:
    """The one-line exit for ``err`` where it is running out of memory, naming the options that size the
    run (those with a value, given or default) and quoting the error's first line; ``None`` for any other
    error."""
    if not isinstance(err, MemoryError | torch.OutOfMemoryError) and not any(
        words in str(err) for words in CPU_OUT_OF_MEMORY
    ):
        return None
    sizes = [f"--{k} {v}" for k in SIZES if (v := getattr(args, k, None)) is not None]
    sizes += [f"--shape {'x'.join(map(str, s))}" for s in getattr(args, "shape", None) or []]
    reason = str(err).strip().split("\n")[0]
    return SystemExit(
        f"{command}: ran out of memory"
        + (f" with {', '.join(sizes)}: give smaller sizes" if sizes else "")
        + (f" ({reason})" if reason else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``steerdiff``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    command = f"steerdiff {args.command}" + (f" {args.bench}" if args.command == "bench" else "")
    try:
        return args.func(args)
    except OSError as err:  # a write that fails after --out's checks (a full disk, a folder removed)
        raise SystemExit(f"{command}: {err}") from None
    except ImportError as err:  # an optional dependency: scikit-learn (the digits), diffusers (overhead)
        raise SystemExit(f"{command}: {err}; pip install -e '.[dev]' installs the optional ones") from None
    except (MemoryError, RuntimeError) as err:  # a huge --n or --steps (torch.OutOfMemoryError included)
        out = _out_of_memory(command, args, err)
        if out is None:
            raise
        raise out from None


if __name__ == "__main__":
    sys.exit(main())
