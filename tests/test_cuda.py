"""What steerdiff promises of an accelerator, checked on a real one (``tests/test_device.py`` checks
the sync counts on the ``meta`` device instead, on any machine).

Every run here is made twice, on the device under test and on the CPU, from the same ``x_T`` and the same
noise, and the device run must be the CPU run: float64 to ``F64_TOL`` relative (CUDA's float64 transcendentals
may differ from the CPU's in the last ulp, so not bitwise), float32 on the device against float64 on the CPU
to float32 accuracy, float16 / bfloat16 loosely (finite, in ``x_T``'s dtype, near the float32 run). The same
noise on both sides comes from one CPU generator per row (diffusers' convention: a CPU generator gives the
same numbers whatever the sample's device), or from float64 draws on the CPU cast to the run's dtype
(``_Noise64``) where the two runs' dtypes differ. The model is the exact Gaussian-mixture oracle
(``sd.toy.GaussianMixture``; it computes on the CPU in float64 and returns on the input's device), small
``torch.nn.Linear`` nets on the device, or the embedded digits model moved to the device. Covered: every
registered solver and schedule, the processes and interpolant conversion (``sd.Reprocessed``), half precision,
no device sync per step (CUDA's sync debug mode: at 6 and at 12 steps the same count), guidance and the
inverse operators (LanPaint, ``CharacteristicGuidance``, ``MinorityGuidance`` and ``SelfGuidedMinority`` with
per-row CPU generators too; ``TimeShift``), the particle methods (AFDPS with ``y`` on the device,
DriftLite, the trees of ``sd.smc.dts`` and ``sd.smc.rbf``'s search, its candidates and NFE per row, too),
the adaptive DPM-Solver's per-sample steps (``TimeShift`` at their per-row times too), the MCMC correctors
and PCG, walk-jump sampling (``sd.mcmc.walk_jump``), Denoising MCMC (``sd.mcmc.denoising_mcmc``) and the
Monte Carlo denoiser (``MonteCarloDenoiser``, its warm start too),
``SteerdiffScheduler`` in a diffusers-style loop, the digits model, autograd through ``sd.sample`` and
AdjointDEIS (``sd.adjoint``: the CPU run's gradients in ``x_T`` and a condition), the edit-friendly DDPM
inversion (``sd.ddpm_invert``: exact reconstruction on the device, maps extracted on the CPU replayed there),
``BrownianTreeNoise`` against torchsde's trees on the device, generators on the device, the metrics, and
discrete diffusion (``sd.discrete``: every sampler and ``Confidence``'s scores, ``CFG``,
``ClassifierGuidance``, ``fk_steering`` and ``best_of_n`` draw the CPU run's tokens, as do the uniform
process's ancestral sampler and ``sgdd``; at most one host read per network call, ``sgdd`` one more per
iteration), ParaDiGMS (``sd.paradigms``, staged solvers too: the CPU run's samples, windows and NFE; one
device read per Picard iteration), and runs spread over a real NCCL process group (``tests/distributed.py``'s
``spawn`` with ``backend="nccl"``, one rank per GPU: a world of 1 on one GPU, 2 on two or more; NCCL takes
CUDA tensors only): ``sd.distributed.sample`` (``shape=``/``seed=`` on the device, ``x_T`` with per-sample
CUDA generators, a failing rank) and ``sample_discrete``, ``sd.smc.fk_steering`` (resampling at some nodes,
the global RNG), ``svdd``, ``best_of_n``, ``sd.discrete.fk_steering`` / ``best_of_n`` on device tokens,
``sd.paradigms``, and a NaN from one rank's net raised alike by every rank, each with ``group=`` equal to the
same run on the GPU alone.

Run with ``make test-cuda`` (``pytest tests/test_cuda.py`` on a machine with a GPU); ``make test``
skips the module where there is none. ``STEERDIFF_TEST_DEVICE`` names the device under test (default
``cuda``); ``STEERDIFF_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs every test but the sync-debug
and NCCL ones on the CPU as a dry run (the comparisons then hold trivially; the code paths run).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import steerdiff as sd
from steerdiff.guidance import (
    CFG,
    DPS,
    MCG,
    CharacteristicGuidance,
    ClassifierGuidance,
    DynamicThreshold,
    MinorityGuidance,
    PiGDM,
    RewardGuidance,
    SelfGuidedMinority,
    TimeShift,
)
from steerdiff.integrations.diffusers_ref import run_scheduler
from steerdiff.inverse import Blur, Downsample, Inpaint, Matrix
from steerdiff.paradigms import ParadigmsInfo
from steerdiff.toy import digits as D

from .distributed import spawn
from .reference import eps_net, noise, sd_betas_config, smooth_mixture

DEVICE = os.environ.get("STEERDIFF_TEST_DEVICE", "cuda")
KIND = torch.device(DEVICE).type


def _available(device: str) -> bool:
    """Whether tensors can be made on ``device`` (for CUDA without initializing it)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _available(DEVICE),
    reason=f"device {DEVICE!r} (STEERDIFF_TEST_DEVICE) is not available here; run on a machine with one",
)
cuda_only = pytest.mark.skipif(KIND != "cuda", reason="sync debug mode exists on CUDA only")

F64 = torch.float64
F64_TOL = 1e-10  # float64 on the device vs float64 on the CPU, relative to the largest entry
F32_TOL = 1e-5  # float32 on the device vs float64 on the CPU (measured on the CPU: at most 3.7e-7)
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 5e-2}  # vs the float32 run (measured: 1.1e-3, 8.2e-3)

PROC = sd.VP.scaled_linear()
GMM = smooth_mixture()  # 8-d, 4 components
DEN = GMM.denoiser(PROC)
# a class c: the first two components; p(c) their weight, p(x | c) their mixture
CLASS = sd.toy.GaussianMixture(GMM.means[:2], GMM.variances[:2], GMM.weights[:2])
CLASS_DEN = CLASS.denoiser(PROC)
LOG_P_CLASS = math.log(float(GMM.weights[:2].sum()))
IMAGE = (1, 2, 4)  # the mixture's samples seen as images, for Inpaint and Blur
IMAGE_DEN = GMM.denoiser(PROC, shape=IMAGE)
BATCH, STEPS = 16, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_G = _gen(11)
A = torch.randn(3, 8, generator=_G, dtype=F64)
Y = GMM.sample(1, _G)[0] @ A.T + 0.1 * torch.randn(3, generator=_G, dtype=F64)
MASK = (torch.rand(IMAGE, generator=_G) < 0.5).to(F64)
Y_IMAGE = GMM.sample(1, _G).reshape(1, *IMAGE)
KERNEL = torch.tensor([[0.1, 0.2, 0.1], [0.15, 0.3, 0.15]], dtype=F64)
B = torch.randn(8, generator=_G, dtype=F64)
LEVELS = torch.randn(3, 8, generator=_G, dtype=F64)  # a linear classifier of 3 minority-score levels


def _solver(name: str) -> str | sd.solvers.Solver:
    """The registered solver ``name``; Restart with a restart interval, which by default it takes only
    from 20 steps on (below, it draws no noise)."""
    return sd.solvers.Restart(restart_info=[(0.5, 2.0, 2, 2)]) if name == "restart" else name


def _rows(n: int, seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per row: the same draws whatever the device of the samples."""
    return [_gen(seed + b) for b in range(n)]


class _Noise64:
    """A noise source drawing float64 on the CPU (one generator per row) and casting to the state's
    dtype and device: the same noise for a float32 run on the device and a float64 run on the CPU."""

    def __init__(self, rows: int, seed: int = 0) -> None:
        self.generators = _rows(rows, seed)

    def __call__(self, t_from: float, t_to: float, like: Tensor) -> Tensor:
        return sd.noise.randn(like.shape, self.generators, F64, "cpu").to(like)


def _expect(out: Tensor, ref: Tensor, tol: float, dtype: torch.dtype | None = None) -> None:
    """``out`` is on the device under test, in ``dtype`` (default: ``ref``'s), and equals ``ref``:
    ``max |out - ref| <= tol * max |ref|`` over the finite entries, non-finite ones (``-inf``
    log-weights) equal."""
    assert out.device.type == KIND, out.device
    assert out.dtype == (ref.dtype if dtype is None else dtype), out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    finite = r.isfinite()
    assert torch.equal(o.isfinite(), finite) and torch.equal(o[~finite], r[~finite])
    err, scale = float((o - r)[finite].abs().max()), float(r[finite].abs().max())
    assert err <= tol * scale, f"max |out - ref| = {err:.3g} > {tol:g} * {scale:.3g}"


def _expect_float(out: float, ref: float, tol: float = F64_TOL) -> None:
    assert math.isfinite(out) and abs(out - ref) <= tol * abs(ref), (out, ref)


def _log_p(law: sd.toy.GaussianMixture, x: Tensor, t: float | Tensor) -> Tensor:
    """``log p_t(x)`` of ``law`` noised to process time ``t`` (float64, on ``x``'s device)."""
    return law.log_prob(x, float(PROC.alpha(t)), float(PROC.sigma(t)))


def _log_p_class(x: Tensor, t: float | Tensor) -> Tensor:
    """The exact noisy classifier ``log p(c | x_t) = log p(c) + log p_t(x | c) - log p_t(x)``."""
    return LOG_P_CLASS + _log_p(CLASS, x, t) - _log_p(GMM, x, t)


def _level_logits(x: Tensor, t: float | Tensor) -> Tensor:
    """Logits of 3 levels, linear in ``x`` (a noise-conditional classifier's shape), on ``x``'s device."""
    return x @ LEVELS.to(x).T


def _reward(x: Tensor) -> Tensor:
    """A linear reward ``b . x`` on flattened samples, on their device."""
    return x.reshape(x.shape[0], -1) @ B.to(x)


# --- every solver and schedule: the exact oracle sampled on the device ------------------------------


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_solver_float64_equals_the_cpu_run(solver: str) -> None:
    x_T = noise(BATCH, 8)
    ref = sd.sample(DEN, x_T, STEPS, _solver(solver), generator=_rows(BATCH))
    out = sd.sample(DEN, x_T.to(DEVICE), STEPS, _solver(solver), generator=_rows(BATCH))
    _expect(out, ref, F64_TOL)


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_solver_float32_on_the_device_is_the_float64_run_to_float32_accuracy(solver: str) -> None:
    x_T = noise(BATCH, 8)
    ref = sd.sample(DEN, x_T, STEPS, _solver(solver), generator=_Noise64(BATCH))
    out = sd.sample(DEN, x_T.float().to(DEVICE), STEPS, _solver(solver), generator=_Noise64(BATCH))
    _expect(out, ref, F32_TOL, dtype=torch.float32)


# solvers fitted to the model (classes, not names), fitted once on the CPU to the oracle of PROC: their
# tables serve any denoiser of PROC on 8-d samples
FITTED: dict[str, Callable[[], sd.solvers.Solver]] = {
    "dpm_solver_v3": functools.cache(
        lambda: sd.solvers.DPMSolverV3(
            sd.solvers.fit_ems(DEN, shape=(8,), samples=32, nodes=12, generator=_gen(5))
        )
    ),
}


@pytest.mark.parametrize("name", FITTED)
def test_fitted_solver_float64_equals_the_cpu_run(name: str) -> None:
    x_T = noise(BATCH, 8)
    ref = sd.sample(DEN, x_T, STEPS, FITTED[name]())
    _expect(sd.sample(DEN, x_T.to(DEVICE), STEPS, FITTED[name]()), ref, F64_TOL)
    ref = sd.sample(DEN, x_T, STEPS, FITTED[name]())  # float32 on the device, its tables copied anew
    _expect(sd.sample(DEN, x_T.float().to(DEVICE), STEPS, FITTED[name]()), ref, F32_TOL, dtype=torch.float32)


# vp's sigma/alpha (0.0105 to 152) lie beyond SD's betas (0.029 to 14.6): it refuses PROC, on either device
@pytest.mark.parametrize("schedule", [s for s in sd.schedules.available() if s != "vp"])
def test_schedule_float64_equals_the_cpu_run(schedule: str) -> None:
    x_T = noise(BATCH, 8)
    ref = sd.sample(DEN, x_T, STEPS, "dpmpp_2m", schedule)
    _expect(sd.sample(DEN, x_T.to(DEVICE), STEPS, "dpmpp_2m", schedule), ref, F64_TOL)


def test_gits_fitted_on_the_device_is_the_cpu_fit() -> None:
    # x_T drawn from a CPU generator on any device; the teacher's states kept on the CPU for the cost
    fits = [
        sd.schedules.GITS(DEN, samples=32, generator=_gen(3), teacher_steps=20, dtype=F64, device=device)
        for device in ("cpu", DEVICE)
    ]
    torch.testing.assert_close(fits[1].cost, fits[0].cost, rtol=F64_TOL, atol=0)
    assert torch.equal(fits[1](PROC, 6), fits[0](PROC, 6))


PROCESSES: dict[str, Callable[[], tuple[sd.Process, sd.Denoiser, str]]] = {
    "vp_scaled_linear": lambda: (PROC, DEN, "unipc"),
    "vp_zero_snr": lambda: (
        p := sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64), rescale_zero_snr=True),
        GMM.denoiser(p),
        "dpmpp_2m",
    ),
    "vp_linear": lambda: (p := sd.VP.linear(), GMM.denoiser(p), "unipc"),
    "vp_cosine": lambda: (p := sd.VP.cosine(), GMM.denoiser(p), "ddpm"),
    "ve": lambda: (p := sd.VE(), GMM.denoiser(p), "heun"),
    "edm": lambda: (p := sd.EDM(), GMM.denoiser(p), "edm_sde"),
    "rectified_flow": lambda: (p := sd.RectifiedFlow(), GMM.denoiser(p), "euler"),
    "mean_reverting": lambda: (
        p := sd.MeanReverting(theta_min=0.3, theta_max=8.0, stationary_std=0.5),
        GMM.mean_reverting_denoiser(p, torch.linspace(-1.0, 1.0, 8, dtype=F64)),
        "mrs",
    ),
    "mean_reverting_cosine": lambda: (
        p := sd.MeanReverting.cosine(100, 0.005, stationary_std=0.5),
        GMM.mean_reverting_denoiser(p, torch.linspace(-1.0, 1.0, 8, dtype=F64)),
        "unipc",
    ),
    # interpolant conversion (sd.Reprocessed): a rectified-flow model on a VP path and a VP model on rectified
    # flow's (its range narrowed to the shared log-SNR: den.process)
    "reprocessed_flow_on_vp": lambda: (
        p := sd.VP.linear(),
        sd.Reprocessed(GMM.denoiser(sd.RectifiedFlow()), p),
        "ddpm",
    ),
    "reprocessed_vp_on_flow": lambda: (
        (den := sd.Reprocessed(GMM.denoiser(PROC), sd.RectifiedFlow())).process,
        den,
        "flow_sde",
    ),
}


@pytest.mark.parametrize("name", PROCESSES)
def test_process_float64_equals_the_cpu_run(name: str) -> None:
    """Each process's time tables and coefficients on the device, with a solver suited to it; a converted
    denoiser's time and state maps too."""
    proc, den, solver = PROCESSES[name]()
    scale = float((proc.alpha(proc.t_max) ** 2 + proc.sigma(proc.t_max) ** 2).sqrt())
    x_T = scale * noise(BATCH, 8)
    ref = sd.sample(den, x_T, STEPS, _solver(solver), generator=_rows(BATCH))
    _expect(sd.sample(den, x_T.to(DEVICE), STEPS, _solver(solver), generator=_rows(BATCH)), ref, F64_TOL)


def test_default_sampler_on_the_device_reaches_the_exact_ode_solution() -> None:
    """Against the oracle's probability-flow ODE solution (DOP853): the float32 device run's error is the
    float64 CPU run's (measured on the CPU: 1.5e-3 at 20 steps, float32 4e-8 from it)."""
    x_T = noise(BATCH, 8)
    exact = GMM.reference_ode(x_T, PROC, PROC.t_max, PROC.t_min, denoise=True)
    cpu = sd.metrics.relative_rmse(sd.sample(DEN, x_T, 20), exact)
    out = sd.sample(DEN, x_T.float().to(DEVICE), 20)
    assert out.device.type == KIND and out.dtype == torch.float32
    assert cpu < 1e-2 and abs(sd.metrics.relative_rmse(out.cpu(), exact) - cpu) < 1e-5, cpu


def test_oracle_answers_on_the_input_device() -> None:
    """The mixture computes on the CPU in float64 and answers on the input's device: the denoiser, the
    log-density and responsibilities, the reference ODE (which answered on the CPU for device input)."""
    x = noise(4, 8)
    xd = x.to(DEVICE)
    for f in (
        lambda v: GMM.denoise(v, 0.8, 0.6),
        lambda v: GMM.log_prob(v, 0.8, 0.6),
        lambda v: GMM.log_responsibilities(v),
        lambda v: GMM.reference_ode(v, PROC, 500.0, PROC.t_min, denoise=True),
    ):
        got, ref = f(xd), f(x)
        assert got.device.type == KIND and got.dtype == F64
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)


# --- no device sync per step ------------------------------------------------------------------------


def _syncs(run: Callable[[], object]) -> int:
    """The synchronizing CUDA operations ``run()`` makes, as sync debug mode reports them (a warning
    each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing CUDA operation" in str(w.message) for w in seen)


def _flags_host_to_device_copies() -> bool:
    """Whether sync debug mode reports a blocking copy from (pageable) host memory to the device."""
    return _syncs(lambda: torch.ones(4).to(DEVICE)) > 0


def _linear_eps_den() -> sd.Denoiser:
    """A small eps net on the device (a fixed ``Linear``, output damped so that runs stay finite)."""
    net = torch.nn.Linear(8, 8, device=DEVICE).requires_grad_(False)
    return sd.Denoiser(lambda x, t: 0.1 * net(x), PROC, "eps")


@cuda_only
@pytest.mark.parametrize("solver", sd.solvers.available())
def test_no_sync_per_step(solver: str) -> None:
    """As many syncs at 6 steps as at 12: only the run's own (the x_T and NaN checks, a copy or two)."""
    den, x_T = _linear_eps_den(), torch.randn(4, 8, device=DEVICE)
    sd.sample(den, x_T, 6, _solver(solver))  # first use of each kernel

    def count(steps: int) -> int:
        return _syncs(lambda: sd.sample(den, x_T, steps, _solver(solver)))

    few, many = count(6), count(12)
    assert few == many and few <= 4, (few, many)


@cuda_only
@pytest.mark.parametrize("name", FITTED)
def test_fitted_solver_no_sync_per_step(name: str) -> None:
    """As ``test_no_sync_per_step``: a fitted solver's per-step tables are copied to the device without a
    sync (from pinned memory), once per grid, device and dtype."""
    den, x_T = _linear_eps_den(), torch.randn(4, 8, device=DEVICE)
    sd.sample(den, x_T, 3, FITTED[name]())  # first use of each kernel

    def count(steps: int) -> int:
        return _syncs(lambda: sd.sample(den, x_T, steps, FITTED[name]()))

    few, many = count(6), count(12)
    assert few == many and few <= 4, (few, many)


@cuda_only
@pytest.mark.parametrize("kind", ["cpu_rows", "cpu", "device"])
def test_noise_from_a_cpu_generator_is_one_copy_per_draw(kind: str) -> None:
    """DDPM draws once per step. CPU generators (one per row, or one) draw on the host: one copy of the
    stacked rows per draw, so one more sync per step where sync debug mode reports host-to-device
    copies; a generator on the device adds none."""
    den, x_T = _linear_eps_den(), torch.randn(4, 8, device=DEVICE)

    def generator() -> torch.Generator | list[torch.Generator]:
        if kind == "cpu_rows":
            return _rows(4)
        return _gen(0) if kind == "cpu" else torch.Generator(device=DEVICE).manual_seed(0)

    sd.sample(den, x_T, 3, "ddpm", generator=generator())

    def count(steps: int) -> int:
        return _syncs(lambda: sd.sample(den, x_T, steps, "ddpm", generator=generator()))

    per_draw = 1 if kind != "device" and _flags_host_to_device_copies() else 0
    few, many = count(6), count(12)
    assert many - few == 6 * per_draw, (few, many, per_draw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_brownian_tree_on_the_device_is_torchsdes_per_sample_trees(dtype: torch.dtype) -> None:
    """BrownianTreeNoise on the device draws each row from its own device generator (``normal_`` per row
    and node): bit for bit the increments of torchsde's tree per sample on the device, which it replaced
    (checked on the CPU in ``tests/test_noise.py``; on a GPU the generators are CUDA's)."""
    torchsde = pytest.importorskip("torchsde")
    like = torch.zeros(3, 5, dtype=dtype, device=DEVICE)
    seeds = [7, 2**40 + 3, 11]
    tree = sd.noise.BrownianTreeNoise(like, 0.002, 80.0, seed=seeds)
    kw = {"t0": 0.002, "t1": 80.0, "size": (1, 5), "dtype": dtype, "device": like.device}
    old = [torchsde.BrownianInterval(**kw, entropy=s, tol=1e-6, halfway_tree=True) for s in seeds]
    times = [80.0, 61.3, 40.25, 12.0, 3.1, 0.7, 0.002]
    for t_from, t_to in [*itertools.pairwise(times), (0.7, 2.5), (80.0, 0.002)]:
        lo, hi = min(t_from, t_to), max(t_from, t_to)
        want = (1 if t_to > t_from else -1) / math.sqrt(hi - lo) * torch.cat([w(lo, hi) for w in old])
        assert torch.equal(tree(t_from, t_to, like), want), (t_from, t_to)


@functools.cache
def _b_on_device() -> Tensor:
    """``B`` in float32 on the device, copied once (a copy per call would be a sync per step)."""
    return B.to(DEVICE, torch.float32)


def _device_reward(x: Tensor) -> Tensor:
    return x @ _b_on_device()


def _device_classifier(x: Tensor, t: float | Tensor) -> Tensor:
    return x @ _b_on_device()


@functools.cache
def _levels_on_device() -> Tensor:
    """``LEVELS`` in float32 on the device, copied once."""
    return LEVELS.to(DEVICE, torch.float32)


def _device_level_logits(x: Tensor, t: float | Tensor) -> Tensor:
    return x @ _levels_on_device().T


def _device_log_prob(x: Tensor, t: float | Tensor) -> Tensor:
    return -0.5 * x.square().sum(-1)


_SMC_SMALL: dict[str, Any] = {"shape": (2, 8), "particles": 4, "device": DEVICE}
_FLAT_MASK = MASK.reshape(8)
# guided, corrected and particle runs ``run(den, x_T, steps)`` around a net on the device, with rewards,
# classifiers and densities on the device (operators and observations on the CPU, moved once per run)
STEERED: dict[str, Callable[[sd.Denoiser, Tensor, int], object]] = {
    "cfg": lambda den, x, n: sd.sample(CFG(den, den, 3.0), x, n, "dpmpp_2m"),
    "classifier": lambda den, x, n: sd.sample(ClassifierGuidance(den, _device_classifier), x, n, "ddpm"),
    "dps": lambda den, x, n: sd.sample(DPS(den, Matrix(A), Y, noise_std=0.1), x, n, "ddpm"),
    # the same net read as an x0 net: as an eps net its x0 does not contract, and PiGDM's step grew past
    # the divergence guard at step 5 of 12 on every seed tried (the run on the exact denoiser stays finite)
    "pigdm": lambda den, x, n: sd.sample(
        PiGDM(sd.Denoiser(den.net, PROC, "x0"), Matrix(A), Y, noise_std=0.1), x, n, "ddpm"
    ),
    "mcg": lambda den, x, n: sd.sample(MCG(den, Matrix(A), Y, noise_std=0.1), x, n, "ddpm"),
    "threshold": lambda den, x, n: sd.sample(DynamicThreshold(den, 0.9), x, n, "dpmpp_2m"),
    "minority": lambda den, x, n: sd.sample(MinorityGuidance(den, _device_level_logits), x, n, "ddpm"),
    "self_guided_minority": lambda den, x, n: sd.sample(SelfGuidedMinority(den, 1.0), x, n, "ddpm"),
    "reprocessed": lambda den, x, n: sd.sample(sd.Reprocessed(den, sd.RectifiedFlow()), x, n, "flow_sde"),
    "repaint": lambda den, x, n: sd.guidance.repaint_sample(
        den, Inpaint(_FLAT_MASK), Y_IMAGE.reshape(8)[_FLAT_MASK == 1], x, n, resample=2, jump=2
    ),
    "pcg": lambda den, x, n: sd.guidance.pcg(den, den, x, n, 2.0),
    "ula": lambda den, x, n: sd.sample(den, x, n, "ddpm", corrector="ula"),
    "time_shift": lambda den, x, n: sd.sample(TimeShift(den, window=10), x, n, "dpmpp_2m"),
    "mala": lambda den, x, n: sd.sample(
        den, x, n, "ddpm", corrector=sd.mcmc.MALA(log_prob=_device_log_prob, step_size=0.01)
    ),
    "fk_steering": lambda den, x, n: sd.smc.fk_steering(den, _device_reward, lam=2.0, steps=n, **_SMC_SMALL),
    "tds": lambda den, x, n: sd.smc.tds(den, Matrix(A), Y, noise_std=0.3, steps=n, **_SMC_SMALL),
    "tds_classifier": lambda den, x, n: sd.smc.tds(den, classifier=_device_classifier, steps=n, **_SMC_SMALL),
    "best_of_n": lambda den, x, n: sd.smc.best_of_n(den, _device_reward, steps=n, **_SMC_SMALL),
    "svdd": lambda den, x, n: sd.smc.svdd(den, _device_reward, 0.5, steps=n, **_SMC_SMALL),
    "fkc_cfg": lambda den, x, n: sd.smc.fkc_cfg(den, den, 2.0, steps=n, **_SMC_SMALL),
    # the per-node fit by a Cholesky solve without its error check (torch.linalg.pinv, an SVD, synced)
    "driftlite": lambda den, x, n: sd.smc.driftlite([den], [2.0], steps=n, **_SMC_SMALL),
    "driftlite_ecg": lambda den, x, n: sd.smc.driftlite([den], [2.0], variant="ecg", steps=n, **_SMC_SMALL),
    "monte_carlo": lambda den, x, n: sd.sample(
        sd.mcmc.MonteCarloDenoiser(lambda y: -0.5 * y.square().sum(-1), den.process, (8,), samples=4),
        x,
        n,
        "ddpm",
    ),
}


@pytest.mark.parametrize("name", STEERED)
def test_steered_runs_stay_finite(name: str) -> None:
    """The sync checks below run each entry at 3, 6 and 12 steps: here, where a CPU can run it too, each
    such run ends finite (a fixture that diverged would fail there with the guard's error, not a count)."""
    run, den = STEERED[name], _linear_eps_den()
    for steps, seed in itertools.product((3, 6, 12), range(3)):
        torch.manual_seed(seed)
        out = run(den, torch.randn(4, 8, device=DEVICE), steps)
        assert bool(torch.isfinite(getattr(out, "x", out)).all()), (steps, seed)


@cuda_only
@pytest.mark.parametrize("name", STEERED)
def test_steered_runs_no_sync_per_step(name: str) -> None:
    """Guidance (gradients included), correctors and particle methods (weights, ESS, per-row adaptive
    resampling): the same syncs at 6 and 12 steps."""
    run, den, x_T = STEERED[name], _linear_eps_den(), torch.randn(4, 8, device=DEVICE)
    run(den, x_T, 3)
    few, many = _syncs(lambda: run(den, x_T, 6)), _syncs(lambda: run(den, x_T, 12))
    assert few == many, (few, many)


@cuda_only
@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm", "unipc"])
def test_scheduler_no_sync_per_step(solver: str) -> None:
    """``SteerdiffScheduler`` in a pipeline loop on the device: timestep checks deferred, edits found
    without reading the device; the same syncs at 6 and 12 steps."""
    pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    net = torch.nn.Linear(8, 8, device=DEVICE).requires_grad_(False)
    x_T = torch.randn(4, 8, device=DEVICE)

    def run(steps: int) -> Tensor:
        sched = SteerdiffScheduler.from_config(sd_betas_config(), solver=_solver(solver))
        return _pipeline_loop(sched, lambda x, t: 0.1 * net(x), x_T, steps, None)

    run(3)
    few, many = _syncs(lambda: run(6)), _syncs(lambda: run(12))
    assert few == many, (few, many)


def _nan_at_call(k: int, device: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A damped ``Linear`` eps net (the same weights on any device) whose ``k``-th call returns NaN."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8).requires_grad_(False).to(device)
    calls = 0

    def f(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        out = 0.1 * net(x)
        return out * math.nan if calls == k else out

    return f


NAN_RUNS: dict[str, Callable[[sd.Denoiser, Tensor], object]] = {
    **{
        s: functools.partial(lambda s, den, x: sd.sample(den, x, 8, _solver(s)), s)
        for s in sd.solvers.available()
    },
    "ula": lambda den, x: sd.sample(den, x, 8, "ddpm", corrector="ula"),
    "fk_steering": lambda den, x: sd.smc.fk_steering(
        den, lambda v: v.sum(-1), lam=2.0, steps=8, shape=(2, 8), particles=2, device=x.device
    ),
    "pcg": lambda den, x: sd.guidance.pcg(den, den, x, 8, 2.0),
    "characteristic": lambda den, x: sd.sample(CharacteristicGuidance(den, den, 2.0), x, 8),
    # which node an evaluation is at follows the rewards of rbf's draws: per-row CPU generators, the same
    # draws on both devices (the global RNG's differ: step 2 on the CPU, 3 on an H200)
    "rbf": lambda den, x: sd.smc.rbf(
        den, lambda v: v.sum(-1), 16, shape=(2, 8), steps=8, device=x.device, generator=_rows(2)
    ),
    "adjoint": lambda den, x: sd.adjoint(den, x, lambda v: v.square().sum(), 8),
    "walk_jump": lambda den, x: sd.mcmc.walk_jump(den, (4, 8), 2.0, 3, 4, device=x.device),
    "denoising_mcmc": lambda den, x: sd.mcmc.denoising_mcmc(
        den, (4, 8), [0.5, 1.0], lambda y: torch.zeros(len(y), 2, device=y.device), 1, device=x.device
    ),
}


@pytest.mark.parametrize("name", NAN_RUNS)
def test_nan_from_the_net_names_the_same_step_as_on_the_cpu(name: str) -> None:
    """A NaN from the net at its 4th call: on the device the check is deferred to the end of the run (no
    sync per step), and the error names the same step, evaluation and time as the CPU's immediate one."""
    messages = []
    for device in ("cpu", DEVICE):
        den = sd.Denoiser(_nan_at_call(4, device), PROC, "eps")
        with pytest.raises(sd.NonFiniteError) as err:
            NAN_RUNS[name](den, torch.randn(4, 8, generator=_gen(1)).to(device))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "step" in messages[0], messages


# --- half precision -----------------------------------------------------------------------------------


def _linear_net(dtype: torch.dtype) -> torch.nn.Module:
    """The same fixed ``Linear`` eps net in ``dtype`` on the device."""
    net = torch.nn.Linear(8, 8, dtype=F64)
    with torch.no_grad():
        net.weight.copy_(0.2 * torch.randn(8, 8, generator=_gen(3), dtype=F64))
        net.bias.copy_(0.1 * torch.randn(8, generator=_gen(4), dtype=F64))
    return net.to(DEVICE, dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("net", ["oracle", "linear"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm", "dpmpp_2m_sde"])
def test_half_precision_on_the_device(solver: str, net: str, dtype: torch.dtype) -> None:
    """A float16 / bfloat16 ``x_T`` and net on the device: the result has ``x_T``'s dtype and device,
    is finite and is near the float32 run from the same (rounded) ``x_T`` with the same noise."""

    def den(dt: torch.dtype) -> sd.Denoiser:
        if net == "oracle":  # returns the input's dtype: a half-precision net seen from outside
            return DEN
        lin = _linear_net(dt)
        return sd.Denoiser(lambda x, t: lin(x), PROC, "eps")

    x_T = noise(BATCH, 8).to(DEVICE, dtype)
    half = sd.sample(den(dtype), x_T, STEPS, solver, generator=_Noise64(BATCH))
    full = sd.sample(den(torch.float32), x_T.float(), STEPS, solver, generator=_Noise64(BATCH))
    assert bool(torch.isfinite(half).all())
    _expect(half, full, HALF_TOL[dtype], dtype=dtype)


# --- guidance and inverse operators ------------------------------------------------------------------

GUIDED: dict[str, Callable[[], sd.Denoiser]] = {
    "cfg": lambda: CFG(CLASS_DEN, DEN, 3.0),
    "cfg_rescale_interval": lambda: CFG(CLASS_DEN, DEN, 3.0, rescale=0.7, interval=(0.5, 3.0)),
    "classifier": lambda: ClassifierGuidance(DEN, _log_p_class, 1.0),
    "reward": lambda: RewardGuidance(DEN, _reward, 0.5),
    "dps": lambda: DPS(DEN, Matrix(A), Y, noise_std=0.1, scale=0.5),
    "dps_squared": lambda: DPS(DEN, Matrix(A), Y, noise_std=0.1, scale=0.002, variant="squared"),
    "dps_inpaint": lambda: DPS(IMAGE_DEN, Inpaint(MASK), Inpaint(MASK)(Y_IMAGE)[0], noise_std=0.05),
    "pigdm": lambda: PiGDM(DEN, Matrix(A), Y, noise_std=0.1),
    "pigdm_blur": lambda: PiGDM(
        IMAGE_DEN, Blur(KERNEL, IMAGE), Blur(KERNEL, IMAGE)(Y_IMAGE)[0], noise_std=0.1
    ),
    "mcg": lambda: MCG(DEN, Matrix(A), Y, noise_std=0.1, scale=0.5),
    "threshold": lambda: DynamicThreshold(DEN, 0.9, max_value=1.2),
    "characteristic": lambda: CharacteristicGuidance(CLASS_DEN, DEN, 3.0),  # its Anderson solve per sample
    "minority": lambda: MinorityGuidance(DEN, _level_logits, level=-1, scale=2.0),
    # its re-noising drawn from one CPU generator per row; guided at every node, or at every other one
    "self_guided_minority": lambda: SelfGuidedMinority(DEN, 1.0, generator=_rows(BATCH, 40)),
    "self_guided_minority_times": lambda: SelfGuidedMinority(
        DEN,
        1.0,
        times=sd.solvers.make_grid(PROC, sd.schedules.get("karras_capped"), STEPS).t[:-1][::2],
        generator=_rows(BATCH, 40),
    ),
    # the window's times and noise levels made on the device (float64 transcendentals: the argmin's ties
    # apart, the CPU's choice)
    "time_shift": lambda: TimeShift(DEN, window=20),
}


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("name", GUIDED)
def test_guidance_float64_equals_the_cpu_run(name: str, solver: str) -> None:
    """Each guided denoiser built once per run (its operator's device caches fresh); ``y`` given on the
    CPU, moved by the library."""
    den = GUIDED[name]()
    x_T = noise(BATCH, 8).reshape(BATCH, *(den.shape or (8,)))
    ref = sd.sample(den, x_T, STEPS, solver, generator=_rows(BATCH))
    out = sd.sample(GUIDED[name](), x_T.to(DEVICE), STEPS, solver, generator=_rows(BATCH))
    _expect(out, ref, F64_TOL)
    plain = sd.sample(den.base, x_T, STEPS, solver, generator=_rows(BATCH))
    assert float((ref - plain).abs().max()) > 1e-3  # the guidance acts


def test_repaint_float64_equals_the_cpu_run() -> None:
    x_T = noise(BATCH, 8).reshape(BATCH, *IMAGE)
    y = Inpaint(MASK)(Y_IMAGE)[0]

    def run(x: Tensor) -> Tensor:
        return sd.guidance.repaint_sample(
            IMAGE_DEN, Inpaint(MASK), y, x, STEPS, resample=2, jump=2, generator=_rows(BATCH)
        )

    _expect(run(x_T.to(DEVICE)), run(x_T), F64_TOL)


@pytest.mark.parametrize("friction", [None, 1.0])
def test_lanpaint_float64_equals_the_cpu_run(friction: float | None) -> None:
    """LanPaint's projected denoiser and its BiG Langevin moves (overdamped and with momentum)."""
    x_T = noise(BATCH, 8).reshape(BATCH, *IMAGE)
    y = Inpaint(MASK)(Y_IMAGE)[0]
    den = sd.guidance.LanPaint(IMAGE_DEN, Inpaint(MASK), y)

    def run(x: Tensor) -> Tensor:
        kernel = sd.mcmc.BiGLangevin(friction=friction)
        return sd.sample(den, x, STEPS, "ddim", corrector=kernel, corrector_steps=2, generator=_rows(BATCH))

    _expect(run(x_T.to(DEVICE)), run(x_T), F64_TOL)


OPERATORS: dict[str, Callable[[], sd.inverse.LinearOperator]] = {
    "matrix": lambda: Matrix(A),
    "inpaint": lambda: Inpaint(MASK),
    "blur_circular": lambda: Blur(KERNEL, IMAGE),
    "blur_zero": lambda: Blur(KERNEL, IMAGE, padding="zero"),
    "downsample": lambda: Downsample(2, IMAGE),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_float64_equals_the_cpu(name: str) -> None:
    """``forward``, ``adjoint``, ``pinv`` and ``aat_solve`` (where the operator has them) on the device."""
    op = OPERATORS[name]()
    x = noise(BATCH, 8).reshape(BATCH, *op.shape_in)
    y = op.forward(x) + 0.1
    shifts = torch.linspace(0.1, 1.0, BATCH, dtype=F64)
    calls: list[tuple[Callable[[Tensor], Tensor], Tensor]] = [(op.forward, x), (op.adjoint, y)]
    if name != "blur_zero":  # zero padding has no diagonalization: no cheap pinv / solve
        calls += [
            (op.pinv, y),
            (lambda v: op.aat_solve(v, 0.3), y),
            (lambda v: op.aat_solve(v, shifts.to(v.device)), y),  # one shift per sample
        ]
    for f, arg in calls:
        _expect(f(arg.to(DEVICE)), f(arg), F64_TOL)
    _expect(op.to_dense(device=DEVICE), op.to_dense(), F64_TOL)


# --- particle methods --------------------------------------------------------------------------------

SMC: dict[str, Callable[..., sd.smc.Particles]] = {
    "fk_steering": lambda **kw: sd.smc.fk_steering(DEN, _reward, lam=2.0, **kw),
    "fk_steering_max_interval": lambda **kw: sd.smc.fk_steering(
        DEN, _reward, lam=2.0, potential="max", interval=3, ess_threshold=0.5, **kw
    ),
    "tds": lambda **kw: sd.smc.tds(DEN, Matrix(A), Y, noise_std=0.3, **kw),
    "tds_classifier": lambda **kw: sd.smc.tds(DEN, classifier=_log_p_class, **kw),
    # y on the device under test, the CPU run's too (device=None: the run is where its draws are); a weak A
    # (std^2 |A|^2 / s^2 < 1 at 8 steps)
    "afdps": lambda **kw: sd.smc.afdps(DEN, Matrix(0.1 * A), Y.to(DEVICE), noise_std=1.0, **kw),
    "best_of_n": lambda **kw: sd.smc.best_of_n(DEN, _reward, **kw),
    "code": lambda **kw: sd.smc.code(DEN, _reward, block=3, **kw),
    "svdd": lambda **kw: sd.smc.svdd(DEN, _reward, 0.5, **kw),
    "fkc_anneal": lambda **kw: sd.smc.fkc_anneal(DEN, 2.0, **kw),
    "fkc_product": lambda **kw: sd.smc.fkc_product(DEN, CLASS_DEN, **kw),
    "fkc_cfg": lambda **kw: sd.smc.fkc_cfg(CLASS_DEN, DEN, 2.0, **kw),
    "driftlite_vcg": lambda **kw: sd.smc.driftlite([CLASS_DEN, DEN], (2.0, -1.0), **kw),
    "driftlite_ecg": lambda **kw: sd.smc.driftlite([DEN], (2.0,), variant="ecg", **kw),
    # rollover budget forcing: best-of-n's budget (particles x steps evaluations a row), searched node by node
    "rbf": lambda particles, **kw: sd.smc.rbf(DEN, _reward, particles * kw["steps"], initial=2, **kw),
}


def _expect_particles(out: sd.smc.Particles, ref: sd.smc.Particles) -> None:
    """Same samples, log-weights, log Z estimates and resampling events, NFE and rewards (``rbf``: the same
    search, each row's candidates and evaluations)."""
    _expect(out.x, ref.x, F64_TOL)
    _expect(out.log_w, ref.log_w, F64_TOL)
    assert out.nfe == ref.nfe
    assert (out.trace is None) == (ref.trace is None) and (out.reward is None) == (ref.reward is None)
    if ref.trace is not None:
        _expect(out.trace.log_z, ref.trace.log_z, F64_TOL)
        assert torch.equal(out.trace.resampled.cpu(), ref.trace.resampled)
    if ref.reward is not None:
        _expect(out.reward, ref.reward, F64_TOL)
    if isinstance(ref, sd.smc.RolloverSamples):
        assert isinstance(out, sd.smc.RolloverSamples)
        for got, want in ((out.row_nfe, ref.row_nfe), (out.candidates, ref.candidates)):
            assert got is not None and want is not None and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("name", SMC)
def test_particle_method_float64_equals_the_cpu_run(name: str) -> None:
    kw: dict[str, Any] = {"shape": (4, 8), "particles": 8, "steps": STEPS, "dtype": F64}
    ref = SMC[name](generator=_rows(4), **kw)
    out = SMC[name](generator=_rows(4), device=DEVICE, **kw)
    _expect_particles(out, ref)
    _expect(out.sample(generator=_gen(9)), ref.sample(generator=_gen(9)), F64_TOL)


@pytest.mark.parametrize("greedy", [False, True])
def test_dts_float64_equals_the_cpu_run(greedy: bool) -> None:
    """The trees' tensor tables, Boltzmann / UCT selection and the per-row rollouts on the device."""
    kw: dict[str, Any] = {"shape": (3, 8), "rollouts": 12, "steps": STEPS, "dtype": F64, "greedy": greedy}
    if not greedy:
        kw["samples"] = 4
    ref = sd.smc.dts(DEN, _reward, 2.0, generator=_rows(3), **kw)
    out = sd.smc.dts(DEN, _reward, 2.0, generator=_rows(3), device=DEVICE, **kw)
    _expect(out.x, ref.x, F64_TOL)
    _expect(out.best, ref.best, F64_TOL)
    _expect(out.value, ref.value, F64_TOL)
    assert torch.equal(out.row_nfe.cpu(), ref.row_nfe)


@pytest.mark.parametrize("solver", sd.smc.stochastic_solvers())
def test_fk_steering_with_every_stochastic_solver(solver: str) -> None:
    """The engine resamples each solver's state (histories, multistep buffers) on the device."""
    kw: dict[str, Any] = {
        "shape": (2, 8),
        "particles": 6,
        "steps": STEPS,
        "dtype": F64,
        "solver": _solver(solver),
    }
    ref = sd.smc.fk_steering(DEN, _reward, lam=2.0, generator=_rows(2), **kw)
    _expect_particles(sd.smc.fk_steering(DEN, _reward, lam=2.0, generator=_rows(2), device=DEVICE, **kw), ref)


@pytest.mark.parametrize("resampler", sd.smc.resample.RESAMPLERS)
def test_resampler_float64_equals_the_cpu_run(resampler: str) -> None:
    """Each resampler's uniforms drawn on the CPU per row, its indices computed on the device."""
    kw: dict[str, Any] = {
        "shape": (4, 8),
        "particles": 8,
        "steps": STEPS,
        "dtype": F64,
        "resampler": resampler,
    }
    ref = sd.smc.fk_steering(DEN, _reward, lam=2.0, generator=_rows(4), **kw)
    _expect_particles(sd.smc.fk_steering(DEN, _reward, lam=2.0, generator=_rows(4), device=DEVICE, **kw), ref)
    assert bool(ref.trace.resampled.any())


# --- MCMC correctors and PCG ---------------------------------------------------------------------------

KERNELS: dict[str, Callable[[], str | sd.mcmc.Kernel]] = {
    "ula_snr": lambda: "ula",
    "ula": lambda: sd.mcmc.ULA(step_size=0.01),
    "mala": lambda: sd.mcmc.MALA(log_prob=lambda x, t: _log_p(GMM, x, t), step_size=0.01),
    "mala_snr": lambda: sd.mcmc.MALA(log_prob=lambda x, t: _log_p(GMM, x, t)),
    "hmc": lambda: sd.mcmc.HMC(log_prob=lambda x, t: _log_p(GMM, x, t), step_size=0.05, leapfrog_steps=3),
}


@pytest.mark.parametrize("name", KERNELS)
def test_corrector_float64_equals_the_cpu_run(name: str) -> None:
    x_T = noise(BATCH, 8)

    def run(x: Tensor) -> tuple[Tensor, sd.SampleInfo]:
        return sd.sample(
            DEN, x, 6, "ddpm", "time_uniform", corrector=KERNELS[name](), corrector_steps=2,
            generator=_rows(BATCH), return_info=True,
        )  # fmt: skip

    (out, info), (ref, ref_info) = run(x_T.to(DEVICE)), run(x_T)
    _expect(out, ref, F64_TOL)
    assert info.nfe == ref_info.nfe and len(info.corrector) == len(ref_info.corrector) == 5
    for c, r in zip(info.corrector, ref_info.corrector, strict=True):
        _expect_float(float(c.step_size), float(r.step_size))
        if r.acceptance is not None:
            _expect(c.acceptance, r.acceptance, F64_TOL)


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_kernel_run_float64_equals_the_cpu(kernel: str) -> None:
    """A kernel on a plain differentiable density (the clean mixture) from exact samples."""
    k = sd.mcmc.MALA(step_size=0.02) if kernel == "mala" else sd.mcmc.HMC(step_size=0.1, leapfrog_steps=4)
    x = GMM.sample(BATCH, _gen(5))

    def log_prob(v: Tensor) -> Tensor:
        return GMM.log_prob(v).to(v.device)

    out, info = k.run(x.to(DEVICE), log_prob, steps=10, generator=_rows(BATCH))
    ref, ref_info = k.run(x, log_prob, steps=10, generator=_rows(BATCH))
    _expect(out, ref, F64_TOL)
    _expect(info.acceptance, ref_info.acceptance, F64_TOL)


def test_pcg_float64_equals_the_cpu_run() -> None:
    x_T = noise(BATCH, 8)

    def run(x: Tensor) -> Tensor:
        return sd.guidance.pcg(CLASS_DEN, DEN, x, STEPS, 2.0, langevin_steps=2, generator=_rows(BATCH))

    _expect(run(x_T.to(DEVICE)), run(x_T), F64_TOL)


@pytest.mark.parametrize("kernel", ["ulmc", "ula"])
def test_walk_jump_float64_equals_the_cpu_run(kernel: str) -> None:
    """Walk-jump sampling with accumulated measurements (``sd.mcmc.walk_jump``) at per-row CPU generators:
    the CPU run's jumps, measurement means and NFE."""

    def run(device: str) -> sd.mcmc.WalkJump:
        return sd.mcmc.walk_jump(
            DEN, (BATCH, 8), 2.0, 4, 5, kernel=kernel, dtype=F64, device=device, generator=_rows(BATCH)
        )

    out, ref = run(DEVICE), run("cpu")
    _expect(out.x, ref.x, F64_TOL)
    _expect(out.y_mean, ref.y_mean, F64_TOL)
    assert out.nfe == ref.nfe == 4 * 5 + 1


@pytest.mark.parametrize("level_update", ["sample", "argmax"])
def test_denoising_mcmc_float64_equals_the_cpu_run(level_update: str) -> None:
    """Denoising MCMC (``sd.mcmc.denoising_mcmc``) at per-row CPU generators, the exact level posterior, a
    stochastic denoising solver: the CPU run's levels, chain states, samples and NFE."""
    sigmas = torch.tensor([0.3, 0.8, 2.0], dtype=F64)

    def run(device: str) -> sd.mcmc.DenoisingMCMC:
        return sd.mcmc.denoising_mcmc(
            DEN, (BATCH, 8), sigmas, lambda y: GMM.noise_level_logits(y, sigmas), 2, thin=3, burn_in=4,
            level_update=level_update, denoise_steps=4, solver="dpmpp_2m_sde", dtype=F64, device=device,
            generator=_rows(BATCH),
        )  # fmt: skip

    out, ref = run(DEVICE), run("cpu")
    assert torch.equal(out.level.cpu(), ref.level) and out.x.device.type == KIND
    _expect(out.y, ref.y, F64_TOL)
    _expect(out.x, ref.x, F64_TOL)
    assert out.nfe == ref.nfe == (4 + 2 * 3) + 2 * 4


MONTE_CARLO: dict[str, Callable[[], sd.mcmc.MonteCarloDenoiser]] = {
    "importance": lambda: sd.mcmc.MonteCarloDenoiser(
        GMM.log_prob, PROC, (8,), 32, generator=_rows(BATCH, 60)
    ),
    "langevin": lambda: sd.mcmc.MonteCarloDenoiser(
        GMM.log_prob, PROC, (8,), 8, "langevin", inner=2, step_size=0.01, generator=_rows(BATCH, 60)
    ),
}


@pytest.mark.parametrize("method", MONTE_CARLO)
def test_monte_carlo_denoiser_float64_equals_the_cpu_run(method: str) -> None:
    """The Monte Carlo denoiser of the mixture's density (its draws from CPU generators per row, the density
    on the device): rdMC's warm start at an early-stopped time, then DDPM from there, the CPU run's samples
    and NFE."""
    t = float(PROC.t_of_sigma_ratio(3.0))
    x_T = float(PROC.sigma(t)) * noise(BATCH, 8)
    grid = sd.solvers.make_grid(PROC, sd.schedules.get("karras_capped"), STEPS)
    nodes = [float(v) for v in grid.t[:-1] if v < t]

    def run(x: Tensor) -> tuple[Tensor, Tensor, sd.SampleInfo]:
        den = MONTE_CARLO[method]()
        start = den.warm_start(x, t, 3, 0.05, generator=_rows(BATCH, 80))
        out, info = sd.sample(
            den, start, len(nodes) + 1, "ddpm", sd.schedules.Custom([t, *nodes]), generator=_rows(BATCH),
            return_info=True,
        )  # fmt: skip
        return start, out, info

    (start, out, info), (ref_start, ref, ref_info) = run(x_T.to(DEVICE)), run(x_T)
    _expect(start, ref_start, F64_TOL)
    _expect(out, ref, F64_TOL)
    assert info.nfe == ref_info.nfe


# --- SteerdiffScheduler in a diffusers-style loop -------------------------------------------------------


def _pipeline_loop(
    sched: Any,
    net: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    steps: int,
    generator: list[torch.Generator] | None,
) -> Tensor:
    """A pipeline's denoising loop with ``set_timesteps`` on ``x_T``'s device."""
    return run_scheduler(sched, net, x_T, steps, generator, device=x_T.device)[0]


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_scheduler_float64_equals_the_cpu_run(solver: str) -> None:
    pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    from .test_integration_diffusers import MOVES_FIRST

    if solver in MOVES_FIRST:
        pytest.skip("refused in a pipeline (test_integration_diffusers.test_pipeline_is_sd_sample)")
    x_T = noise(BATCH, 8)

    def run(x: Tensor) -> Tensor:
        sched = SteerdiffScheduler.from_config(sd_betas_config(), solver=_solver(solver))
        out = _pipeline_loop(sched, eps_net(GMM, PROC), x, STEPS, _rows(BATCH))
        assert sched.timesteps.device.type == x.device.type
        return out

    _expect(run(x_T.to(DEVICE)), run(x_T), F64_TOL)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_diffusers_pipeline_moved_to_the_device(dtype: torch.dtype, tol: float) -> None:
    """``DDPMPipeline`` with a small random UNet moved to the device (and to float16, as pipelines are
    run) and ``SteerdiffScheduler(solver="dpmpp_2m")``: its images equal those of the same pipeline
    with diffusers' ``DPMSolverMultistepScheduler`` (the same algorithm on the same trailing
    timesteps), images in [0, 1] to ``tol`` (measured on the CPU: 3.6e-7 float32, 2.0e-3 float16).
    TF32 off: CUDA runs float32 convolutions in TF32 by default, whose rounding of the two pipelines'
    slightly different inputs alone moved the images by 3.0e-4 on an H100."""
    diffusers = pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    from .test_integration_diffusers import _unet

    unet = _unet().to(DEVICE, dtype)
    theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ours = SteerdiffScheduler.from_config(theirs.config, solver="dpmpp_2m", schedule="trailing")

    def images(scheduler: Any) -> Tensor:
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = pipe(batch_size=2, generator=_gen(7), num_inference_steps=8, output_type="pt").images
        return torch.as_tensor(out)

    got, ref = images(ours), images(theirs)
    assert float((got - ref).abs().max()) < tol, float((got - ref).abs().max())


# --- the embedded digits model ------------------------------------------------------------------------


@pytest.mark.parametrize("label", [3, D.NULL_LABEL, "cfg"])
def test_digits_model_on_the_device_equals_the_cpu_run(label: int | str) -> None:
    """10 steps of 8 images, float32 on both sides (the net's own dtype; measured against a float64 copy
    of the net on the CPU: at most 2.8e-6 relative)."""

    def run(device: str) -> Tensor:
        den = D.load_digits_denoiser(device=device)
        x_T = torch.randn(8, 1, 8, 8, generator=_gen(2)).to(device)
        if label == "cfg":
            guided = CFG(den, den, 2.0, uncond_kwargs={"label": D.NULL_LABEL})
            return sd.sample(guided, x_T, 10, label=torch.arange(8, device=device) % 10)
        return sd.sample(den, x_T, 10, label=label)

    _expect(run(DEVICE), run("cpu"), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_digits_model_in_half_precision_on_the_device(dtype: torch.dtype) -> None:
    """The nets cast to half precision on the device (what a GPU user does): 10 steps near the float32
    run, pixels in [-1, 1] (measured on the CPU: 1.4e-3 float16, 1.0e-2 bfloat16)."""
    x_T = torch.randn(8, 1, 8, 8, generator=_gen(3)).to(DEVICE)
    den = D.load_digits_denoiser(device=DEVICE)
    ref = sd.sample(den, x_T, 10, label=3)
    den.net.to(dtype)
    out = sd.sample(den, x_T.to(dtype), 10, label=3)
    assert out.device.type == KIND and out.dtype == dtype
    assert float((out.float() - ref).abs().max()) < {torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]


@cuda_only
def test_digits_model_no_sync_per_step() -> None:
    den, x_T = D.load_digits_denoiser(device=DEVICE), torch.randn(4, 1, 8, 8, device=DEVICE)
    sd.sample(den, x_T, 6, label=3)
    few, many = (_syncs(lambda n=n: sd.sample(den, x_T, n, label=3)) for n in (6, 12))
    assert few == many, (few, many)


# --- autograd --------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    """An eps net with parameters in the weights and the time features (float64)."""

    def __init__(self) -> None:
        super().__init__()
        g = _gen(1)
        self.w = torch.nn.Parameter(0.3 * torch.randn(8, 8, generator=g, dtype=F64))
        self.freq = torch.nn.Parameter(torch.randn(8, generator=g, dtype=F64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) + torch.sin(t[:, None] / 1000 * self.freq)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "unipc", "ddpm", "dpmpp_2m_sde"])
def test_gradient_through_sample_equals_the_cpu_gradient(solver: str) -> None:
    """The gradient of a loss on ``sd.sample``'s output with respect to ``x_T`` and the net's parameters."""
    x_T, target = noise(4, 8, seed=2), noise(4, 8, seed=3)

    def grads(device: str) -> tuple[Tensor, ...]:
        net = _Net().to(device)
        x = x_T.to(device, copy=True).requires_grad_(True)
        out = sd.sample(sd.Denoiser(net, PROC, "eps"), x, 6, solver, generator=_rows(4))
        (out - target.to(device)).square().sum().backward()
        return x.grad, net.w.grad, net.freq.grad

    for out, ref in zip(grads(DEVICE), grads("cpu"), strict=True):
        assert float(ref.abs().max()) > 1e-6
        _expect(out, ref, F64_TOL)


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_adjoint_gradients_equal_the_cpu_gradients(order: int, final: str) -> None:
    """AdjointDEIS (``sd.adjoint``) on the device: the forward run, ``dL/dx_T`` and ``dL/d shift`` (a
    conditioning tensor given on the device) of the CPU run, the same evaluations and vector-Jacobian
    products, and the same re-solved ``x_T``."""
    x_T, target = noise(4, 8, seed=2), noise(4, 8, seed=3)
    den = sd.Denoiser(lambda x, t, shift: DEN.net(x, t) + shift, PROC, "x0", shape=(8,))

    def run(device: str) -> tuple[Tensor, Tensor, Tensor, Any]:
        shift = torch.full((8,), 0.1, dtype=F64, device=device, requires_grad=True)
        goal = target.to(device)
        x0, grads, info = sd.adjoint(
            den, x_T.to(device), lambda x: (x - goal).square().sum(), STEPS, solver_order=order, final=final,
            return_info=True, shift=shift,
        )  # fmt: skip
        return x0, grads["x_T"], grads["shift"], info

    *out, info = run(DEVICE)
    *ref, ref_info = run("cpu")
    for o, r in zip(out, ref, strict=True):
        assert float(r.abs().max()) > 1e-6
        _expect(o, r, F64_TOL)
    _expect(info.x_T_resolved, ref_info.x_T_resolved, F64_TOL)
    assert (info.forward_nfe, info.backward_nfe, info.vjps) == (
        ref_info.forward_nfe,
        ref_info.backward_nfe,
        ref_info.vjps,
    )


# --- edit-friendly DDPM inversion ------------------------------------------------------------------------

INVERTED: dict[str, tuple[sd.Denoiser, str]] = {
    "ddpm": (DEN, "ddpm"),
    "ddim_eta1": (DEN, sd.solvers.DDIM(eta=1.0)),
    "flow_sde": (GMM.denoiser(sd.RectifiedFlow()), "flow_sde"),
}


@pytest.mark.parametrize("name", INVERTED)
def test_ddpm_inversion_on_the_device_reconstructs_and_replays_cpu_maps(name: str) -> None:
    """``sd.ddpm_invert`` of exact samples on the device (its ``q(x_t | x_0)`` draws from CPU generators per
    row): the CPU run's states and noise maps, and the replay through ``sample`` returns ``x_0`` (its last
    state bit for bit). Maps extracted on the CPU, replayed from ``x_T`` on the device (each draw moved
    there): the CPU replay, ``x_0`` again."""
    den, solver = INVERTED[name]
    x_0 = GMM.sample(BATCH, _gen(6))
    ref = sd.ddpm_invert(den, x_0, STEPS, solver, generator=_rows(BATCH))
    inv = sd.ddpm_invert(den, x_0.to(DEVICE), STEPS, solver, generator=_rows(BATCH))
    assert inv.nfe == ref.nfe == STEPS
    for out, want in zip([*inv.xs, *inv.z], [*ref.xs, *ref.z], strict=True):
        _expect(out, want, F64_TOL)
    out = sd.sample(den, **inv.sample_kwargs())
    assert torch.equal(out, inv.xs[-1])
    _expect(out, x_0, 1e-12)
    replay = sd.sample(den, **{**ref.sample_kwargs(), "x_T": ref.x_T.to(DEVICE)})
    _expect(replay, sd.sample(den, **ref.sample_kwargs()), F64_TOL)
    _expect(replay, x_0, 1e-12)


# --- masked (discrete) diffusion -------------------------------------------------------------------------
# The exact CategoricalMixture oracle computes on its input's device (float64). Every draw (Gumbel-max
# uniforms, unmasking coins, positions, resampling) comes from one CPU generator per row, drawn on the host
# and copied, so the device run sees the CPU run's uniforms; the float64 log-probabilities they are
# compared with differ by an ulp at most, which flips a comparison only at an exact tie: the tokens are
# the CPU run's, exactly, and the weights and log Z estimates equal to F64_TOL.

CAT = sd.toy.CategoricalMixture(
    torch.rand(3, generator=_gen(21), dtype=F64) + 0.5,
    torch.rand(3, 5, 4, generator=_gen(22), dtype=F64) ** 4,
)
CAT_DEN = CAT.denoiser(sd.discrete.MaskedProcess(vocab_size=4, schedule="linear"))
CAT_F = torch.rand(5, 4, generator=_gen(23), dtype=F64)
CAT_X = torch.tensor([[4, 1, 4, 4, 0], [4, 4, 4, 4, 4], [2, 4, 3, 4, 4]])  # mask id 4: partly masked rows
CAT_GUIDED = {
    "cfg": (sd.discrete.CFG(CAT_DEN, CAT_DEN, 3.0, uncond_kwargs={"y": -1}), {"y": 0}),
    "classifier": (sd.discrete.ClassifierGuidance(CAT_DEN, CAT.classifier(0, 4)), {}),
}
# every registered sampler, and confidence-ordered decoding's other scores (greedy, random, PC-Sampler's)
CAT_SAMPLERS: dict[str, str | sd.discrete.Sampler] = {
    **{s: s for s in sd.discrete.available()},
    "confidence_margin_greedy": sd.discrete.Confidence("margin", temperature=0.0),
    "confidence_entropy": sd.discrete.Confidence("entropy"),
    "confidence_random": sd.discrete.Confidence("random"),
    "confidence_pc": sd.discrete.Confidence("pc", frequencies=[0.4, 0.3, 0.2, 0.1]),
}
# uniform-noise discrete diffusion: ancestral sampling, and SGDD's split Gibbs posterior sampling (a log-
# likelihood on the device); run(den, n, **kw) with n steps / iterations
CAT_UNIFORM_DEN = CAT.denoiser(sd.discrete.UniformProcess(4))
UNIFORM_RUNS: dict[str, Callable[..., Tensor]] = {
    "ancestral": lambda den, n, **kw: sd.discrete.sample(den, (3, 5), n, "ancestral", **kw),
    "sgdd": lambda den, n, **kw: sd.discrete.sgdd(
        den, _cat_reward, shape=(3, 5), iterations=n, denoise_steps=2, mh_steps=8, **kw
    ),
}


def _steps(sampler: str | sd.discrete.Sampler) -> int | None:
    return None if sampler == "first_hitting" else 6


@functools.cache
def _cat_f_on(device: torch.device) -> Tensor:
    """``CAT_F`` on ``device``, copied once (SGDD calls its log-likelihood at every Metropolis-Hastings step:
    a copy per call would be a sync per step)."""
    return CAT_F.to(device)


def _cat_reward(x: Tensor) -> Tensor:
    """``r(x) = sum_i f[i, x^i]`` on ``x``'s device."""
    return _cat_f_on(x.device)[torch.arange(5, device=x.device), x].sum(-1)


def _expect_tokens(out: Tensor, ref: Tensor) -> None:
    assert out.device.type == KIND, out.device
    assert out.dtype == ref.dtype and torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("start", ["shape", "tokens"])
@pytest.mark.parametrize("name", CAT_SAMPLERS)
def test_discrete_sampler_on_the_device_draws_the_cpu_tokens(name: str, start: str) -> None:
    """From the all-masked batch (``device=``) or partly masked tokens on the device (they stay)."""
    sampler = CAT_SAMPLERS[name]
    if start == "shape":
        ref = sd.discrete.sample(CAT_DEN, (3, 5), _steps(sampler), sampler, generator=_rows(3))
        out = sd.discrete.sample(CAT_DEN, (3, 5), _steps(sampler), sampler, generator=_rows(3), device=DEVICE)
    else:
        ref = sd.discrete.sample(CAT_DEN, CAT_X, _steps(sampler), sampler, generator=_rows(3))
        out = sd.discrete.sample(CAT_DEN, CAT_X.to(DEVICE), _steps(sampler), sampler, generator=_rows(3))
        given = CAT_X != 4
        assert torch.equal(ref[given], CAT_X[given])
    _expect_tokens(out, ref)
    assert not bool((ref == 4).any())


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
@pytest.mark.parametrize("name", CAT_GUIDED)
def test_discrete_guidance_on_the_device_draws_the_cpu_tokens(name: str, sampler: str) -> None:
    den, cond = CAT_GUIDED[name]
    ref = sd.discrete.sample(den, (3, 5), _steps(sampler), sampler, generator=_rows(3), **cond)
    out = sd.discrete.sample(den, (3, 5), _steps(sampler), sampler, generator=_rows(3), device=DEVICE, **cond)
    _expect_tokens(out, ref)


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
@pytest.mark.parametrize("method", ["fk_steering", "best_of_n", "svdd"])
def test_discrete_steering_on_the_device_equals_the_cpu_run(method: str, sampler: str) -> None:
    """Particles, weights, rewards, log Z and resampling events of the CPU run, and the same final draw
    (SVDD: its candidates' selection by ``softmax(v / alpha)`` with the ``"draw"`` estimate)."""
    kw: dict[str, Any] = {"shape": (3, 5), "steps": _steps(sampler), "sampler": sampler}
    if method == "fk_steering":
        run = functools.partial(sd.discrete.fk_steering, CAT_DEN, _cat_reward, 2.0, particles=8, **kw)
    elif method == "svdd":
        run = functools.partial(
            sd.discrete.svdd, CAT_DEN, _cat_reward, 0.5, particles=8, estimate="draw", **kw
        )
    else:
        run = functools.partial(sd.discrete.best_of_n, CAT_DEN, _cat_reward, particles=8, **kw)
    ref, out = run(generator=_rows(3)), run(generator=_rows(3), device=DEVICE)
    _expect_particles(out, ref)
    if ref.trace is not None:
        assert bool(ref.trace.resampled.any())  # the resampling path ran
    _expect_tokens(out.sample(generator=_gen(9)), ref.sample(generator=_gen(9)))


@pytest.mark.parametrize("name", UNIFORM_RUNS)
def test_uniform_discrete_on_the_device_draws_the_cpu_tokens(name: str) -> None:
    """From uniform tokens drawn per row (SGDD: its Metropolis-Hastings proposals and coins too)."""
    n = 6 if name == "ancestral" else 3
    ref = UNIFORM_RUNS[name](CAT_UNIFORM_DEN, n, generator=_rows(3))
    _expect_tokens(UNIFORM_RUNS[name](CAT_UNIFORM_DEN, n, generator=_rows(3), device=DEVICE), ref)
    assert int(ref.min()) >= 0 and int(ref.max()) <= 3


def test_sgdd_takes_a_log_likelihood_computed_on_the_cpu() -> None:
    """Chains on the device, ``log_likelihood`` returning CPU values (a CPU scorer): moved to the chains'
    device, as ``fk_steering``'s rewards are (it raised: ``Expected all tensors to be on the same device``),
    the run is the CPU one."""
    kw = {"shape": (3, 5), "iterations": 3, "denoise_steps": 2, "mh_steps": 8}
    ref = sd.discrete.sgdd(CAT_UNIFORM_DEN, _cat_reward, generator=_rows(3), **kw)
    out = sd.discrete.sgdd(
        CAT_UNIFORM_DEN, lambda x: _cat_reward(x.cpu()), generator=_rows(3), device=DEVICE, **kw
    )
    _expect_tokens(out, ref)


def _embedding_den() -> sd.discrete.MaskedDenoiser:
    """A small net on the device: logits from an ``Embedding`` of each token (mask id 4 included)."""
    net = torch.nn.Embedding(5, 4, device=DEVICE).requires_grad_(False)
    return sd.discrete.MaskedDenoiser(lambda x, t: net(x), sd.discrete.MaskedProcess(vocab_size=4))


@cuda_only
@pytest.mark.parametrize("name", CAT_SAMPLERS)
def test_discrete_sample_reads_the_host_at_most_once_per_step(name: str) -> None:
    """The denoiser's NaN / no-clean-token checks are read together once per network call (as on meta in
    tests/test_discrete_api.py): 6 more steps, at most 6 more syncs. ``first_hitting`` takes one step per
    masked token: 6 more tokens."""
    sampler, den = CAT_SAMPLERS[name], _embedding_den()
    sd.discrete.sample(den, (4, 6), 6, "ancestral", device=DEVICE)  # first use of each kernel

    def count(k: int) -> int:
        shape, steps = ((4, k), None) if sampler == "first_hitting" else ((4, 6), k)
        return _syncs(lambda: sd.discrete.sample(den, shape, steps, sampler, device=DEVICE))

    few, many = count(6), count(12)
    assert many - few <= 6, (few, many)


@cuda_only
@pytest.mark.parametrize("name", UNIFORM_RUNS)
def test_uniform_discrete_reads_the_host_at_most_once_per_call(name: str) -> None:
    """A uniform-noise ``Embedding`` net on the device: one read per network call (ancestral: 6 more steps,
    at most 6 more syncs), and SGDD one more per iteration, its log-likelihood's NaN check (2 calls an
    iteration: 6 more iterations, at most 18 more)."""
    net = torch.nn.Embedding(4, 4, device=DEVICE).requires_grad_(False)
    den = sd.discrete.UniformDenoiser(lambda x, t: net(x), sd.discrete.UniformProcess(4))
    run = UNIFORM_RUNS[name]
    run(den, 2, device=DEVICE)  # first use of each kernel
    few, many = (_syncs(lambda n=n: run(den, n, device=DEVICE)) for n in (6, 12))
    assert many - few <= 6 * (1 if name == "ancestral" else 3), (few, many)


# --- generators --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", sd.smc.stochastic_solvers())
def test_generator_on_the_device(solver: str) -> None:
    """A generator on the device: the same seed gives the same run, another seed another; and the run is
    a CPU run fed the same draws from an equally seeded device generator (moved to the CPU)."""
    x_T = noise(BATCH, 8)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=DEVICE).manual_seed(seed)

    out = sd.sample(DEN, x_T.to(DEVICE), STEPS, _solver(solver), generator=gen(5))
    assert torch.equal(out, sd.sample(DEN, x_T.to(DEVICE), STEPS, _solver(solver), generator=gen(5)))
    other = sd.sample(DEN, x_T.to(DEVICE), STEPS, _solver(solver), generator=gen(6))
    assert float((out - other).abs().max()) > 1e-3
    g = gen(5)

    def drawn(t_from: float, t_to: float, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=g, dtype=like.dtype, device=DEVICE).to(like.device)

    _expect(out, sd.sample(DEN, x_T, STEPS, _solver(solver), generator=drawn), F64_TOL)


@pytest.mark.parametrize("solver", sd.smc.stochastic_solvers())
def test_one_cpu_generator_drives_a_device_run(solver: str) -> None:
    x_T = noise(BATCH, 8)
    ref = sd.sample(DEN, x_T, STEPS, _solver(solver), generator=_gen(5))
    _expect(sd.sample(DEN, x_T.to(DEVICE), STEPS, _solver(solver), generator=_gen(5)), ref, F64_TOL)


def test_particles_with_a_device_generator_are_reproducible() -> None:
    def run(seed: int) -> sd.smc.Particles:
        return sd.smc.fk_steering(
            DEN, _reward, lam=2.0, shape=(4, 8), particles=8, steps=STEPS, dtype=F64, device=DEVICE,
            generator=torch.Generator(device=DEVICE).manual_seed(seed),
        )  # fmt: skip

    a, b = run(1), run(1)
    assert a.x.device.type == KIND and torch.equal(a.x, b.x) and torch.equal(a.log_w, b.log_w)
    assert float((a.x - run(2).x).abs().max()) > 1e-3


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_float64_equals_the_cpu_run(order: int, shift: bool) -> None:
    """Per-sample step control on the device: the CPU run's samples, accepted grids and NFE; with
    ``TimeShift`` too, its shifted times made from the per-row times on the device."""
    den = TimeShift(DEN, window=20) if shift else DEN

    def run(x_T: Tensor) -> tuple[Tensor, Any]:
        return sd.solvers.dpm_adaptive(den, x_T, order=order, rtol=0.01, atol=1e-3, return_info=True)

    (out, info), (ref, ref_info) = run(noise(BATCH, 8).to(DEVICE)), run(noise(BATCH, 8))
    _expect(out, ref, F64_TOL)
    assert (info.nfe, info.accepted, info.rejected) == (ref_info.nfe, ref_info.accepted, ref_info.rejected)


# --- ParaDiGMS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "steps"), [("ddpm", 30), ("dpmpp_2m", 20), ("heun", 20), ("dpmpp_sde", 20)]
)
def test_paradigms_on_the_device_equals_the_cpu_run(solver: str, steps: int) -> None:
    """The windows' stacked rows, the replayed noise (CPU generators per row) and a multistep state on the
    device: the CPU run's samples, windows, strides and NFE."""

    def run(x_T: Tensor) -> tuple[Tensor, ParadigmsInfo]:
        return sd.paradigms(DEN, x_T, steps, solver, window=8, generator=_rows(4), return_info=True)

    ref, ref_info = run(noise(4, 8))
    out, info = run(noise(4, 8).to(DEVICE))
    _expect(out, ref, F64_TOL)
    assert (info.windows, info.strides, info.nfe) == (ref_info.windows, ref_info.strides, ref_info.nfe)
    assert ref_info.iterations < steps


@cuda_only
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_paradigms_reads_the_device_once_per_iteration(solver: str) -> None:
    """An iteration's convergence and NaN flags come to the host in one read, its only sync: the grid's
    times and tolerances go over once per run (from pinned memory), a staged solver's stage times are
    filled on the device. It copied its rows' times and tolerances at every iteration (6 copies per
    iteration, Heun's 15, counted on ``meta``: ``tests/test_device.py``), each a sync where sync debug mode
    reports host-to-device copies. The iterations differ between the runs (window 2: 6 steps in at most
    6, 16 in at least 8)."""
    den, x_T = _linear_eps_den(), torch.randn(4, 8, device=DEVICE)

    def count(steps: int) -> tuple[int, int]:
        infos: list[ParadigmsInfo] = []
        syncs = _syncs(
            lambda: infos.append(sd.paradigms(den, x_T, steps, solver, window=2, return_info=True)[1])
        )
        return syncs, infos[0].iterations

    count(6)  # first use of each kernel
    (few, few_it), (many, many_it) = count(6), count(16)
    assert many_it > few_it and many - few == many_it - few_it, (few, many, few_it, many_it)


# --- runs spread over NCCL ranks ------------------------------------------------------------------------
# Each run of NCCL_RUNS on every rank of a real NCCL process group (one GPU: a world of 1; two or more: 2),
# its particles and samples on the rank's GPU, against the same run on that GPU alone (group=None): NCCL
# takes CUDA tensors only, so a collective fed a CPU tensor (a flag, a time, a state) fails here and
# nowhere else. Equal as on gloo (tests/test_distributed_*.py): token ids, counts and messages exactly,
# floats to 1e-12 (the shards' matrix products on the GPU may round by their row count). _on_ranks runs on
# any backend: spawn(_on_ranks, world) gives the same comparisons on gloo CPU ranks (all pass at 1, 2, 3).

nccl_only = pytest.mark.skipif(
    KIND != "cuda" or not (dist.is_available() and dist.is_nccl_available()),
    reason="NCCL runs on CUDA devices, with a torch built with it",
)


def _last_rank(group: Any) -> bool:
    """Whether this process is the last rank of ``group`` (alone, ``None``: yes)."""
    return group is None or dist.get_rank(group) == dist.get_world_size(group) - 1


def _summary(p: sd.smc.Particles) -> dict[str, Any]:
    trace = p.trace
    return {
        "x": p.x,
        "log_w": p.log_w,
        "nfe": p.nfe,
        "reward": p.reward,
        "ess": None if trace is None else trace.ess,
        "resampled": None if trace is None else trace.resampled,
        "log_z": None if trace is None else trace.log_z,
        "sample": p.sample(generator=_rows(len(p.x), 9)),
    }


def _device_rows(n: int, device: torch.device, seed: int = 100) -> list[torch.Generator]:
    """One generator per row on ``device`` (the rank's GPU)."""
    return [torch.Generator(device).manual_seed(seed + b) for b in range(n)]


def _sample_seeded(group: Any, device: torch.device) -> dict[str, Any]:
    # no device= with the group: under NCCL the samples and their generators default to the rank's GPU
    where = device if group is None else None
    x, info = sd.distributed.sample(
        DEN, None, 6, "ddpm", group=group, shape=(5, 8), seed=5, dtype=F64, device=where, return_info=True
    )
    return {"x": x, "nfe": info.nfe}


def _sample_x_T(group: Any, device: torch.device) -> dict[str, Any]:
    x_T = noise(5, 8).to(device)
    return {"x": sd.distributed.sample(DEN, x_T, 6, "ddpm", group=group, generator=_device_rows(5, device))}


def _sample_failing(group: Any, device: torch.device) -> dict[str, Any]:
    """The last rank's callback raises (alone: the run's): every rank raises after one all_reduce of flags."""

    def fail(state: dict[str, Any]) -> None:
        if _last_rank(group):
            raise ArithmeticError("the last rank's own failure")

    try:
        sd.distributed.sample(DEN, noise(5, 8).to(device), 2, group=group, callback=fail)
    except (ArithmeticError, RuntimeError) as e:
        return {"said": f"{type(e).__name__}: {e}"}
    return {"said": None}


def _sample_discrete(group: Any, device: torch.device) -> dict[str, Any]:
    return {
        "shape": sd.distributed.sample_discrete(
            CAT_DEN, (5, 5), 4, group=group, seed=9, device=device if group is None else None
        ),
        "tokens": sd.distributed.sample_discrete(
            CAT_DEN, CAT_X.to(device), 4, group=group, generator=_device_rows(3, device)
        ),
    }


def _fk_steering(group: Any, device: torch.device) -> dict[str, Any]:
    # ess_threshold 0.5: 13 of the 16 nodes resample (the test checks some do not)
    return _summary(
        sd.smc.fk_steering(
            DEN, _reward, lam=2.0, shape=(2, 8), particles=7, steps=STEPS, ess_threshold=0.5, dtype=F64,
            device=device, generator=_rows(2), group=group,
        )
    )  # fmt: skip


def _fk_global_rng(group: Any, device: torch.device) -> dict[str, Any]:
    # generator=None: the device's global RNG, its state gathered from every rank and compared
    torch.manual_seed(11)
    return _summary(
        sd.smc.fk_steering(
            DEN, _reward, lam=2.0, shape=(2, 8), particles=7, steps=STEPS, ess_threshold=0.5, dtype=F64,
            device=device, group=group,
        )
    )  # fmt: skip


def _svdd(group: Any, device: torch.device) -> dict[str, Any]:
    return _summary(
        sd.smc.svdd(
            DEN, _reward, 0.5, shape=(2, 8), particles=7, steps=STEPS, dtype=F64, device=device,
            generator=torch.Generator(device).manual_seed(4), group=group,
        )
    )  # fmt: skip


def _best_of_n(group: Any, device: torch.device) -> dict[str, Any]:
    return _summary(
        sd.smc.best_of_n(
            DEN, _reward, shape=(2, 8), particles=7, steps=STEPS, dtype=F64, device=device,
            generator=_rows(2, 5), group=group,
        )
    )  # fmt: skip


def _fk_nan(group: Any, device: torch.device) -> dict[str, Any]:
    """The net NaN below t = 500 on the last rank only (alone: everywhere): every rank raises one message."""
    last = _last_rank(group)

    def net(x: Tensor, t: Tensor) -> Tensor:
        return DEN.net(x, t) * (math.nan if last and float(t.reshape(-1)[0]) < 500 else 1.0)

    try:
        sd.smc.fk_steering(
            sd.Denoiser(net, PROC, "x0", shape=(8,)), _reward, shape=(2, 8), particles=7, steps=STEPS,
            dtype=F64, device=device, generator=_rows(2), group=group,
        )  # fmt: skip
    except sd.NonFiniteError as e:
        return {"said": str(e)}
    return {"said": None}


def _discrete_fk_steering(group: Any, device: torch.device) -> dict[str, Any]:
    # from partly masked tokens on the device; ess_threshold 0.7: 8 of the 18 row-nodes resample
    return _summary(
        sd.discrete.fk_steering(
            CAT_DEN, _cat_reward, 2.0, x_T=CAT_X.to(device), particles=7, steps=6, ess_threshold=0.7,
            generator=_rows(3), group=group,
        )
    )  # fmt: skip


def _discrete_best_of_n(group: Any, device: torch.device) -> dict[str, Any]:
    return _summary(
        sd.discrete.best_of_n(
            CAT_DEN, _cat_reward, shape=(3, 5), particles=7, sampler="first_hitting", device=device,
            generator=_rows(3, 5), group=group,
        )
    )  # fmt: skip


def _discrete_nan(group: Any, device: torch.device) -> dict[str, Any]:
    """The net NaN below t = 0.5 on the last rank only (alone: everywhere): one message on every rank."""
    last = _last_rank(group)

    def net(x: Tensor, t: Tensor) -> Tensor:
        return CAT_DEN.net(x, t) * (math.nan if last and float(t.min()) < 0.5 else 1.0)

    try:
        sd.discrete.fk_steering(
            sd.discrete.MaskedDenoiser(net, CAT_DEN.process), _cat_reward, shape=(3, 5), particles=7, steps=8,
            device=device, generator=_rows(3), group=group,
        )  # fmt: skip
    except sd.NonFiniteError as e:
        return {"said": str(e)}
    return {"said": None}


def _paradigms_run(x_T: Tensor, steps: int, solver: str, group: Any, **kw: Any) -> dict[str, Any]:
    x, info = sd.paradigms(DEN, x_T, steps, solver, window=8, group=group, return_info=True, **kw)
    return {"x": x, "windows": info.windows, "strides": info.strides, "nfe": info.nfe}


def _paradigms(group: Any, device: torch.device) -> dict[str, Any]:
    # 40 window rows split over the ranks, the window's cost a max over them
    return _paradigms_run(noise(5, 8).to(device), 30, "ddpm", group, generator=_device_rows(5, device))


def _paradigms_global_rng(group: Any, device: torch.device) -> dict[str, Any]:
    # generator=None: the device's global RNG, its state checked alike on every rank (the one collective of
    # a world of 1, where the windows are not split)
    torch.manual_seed(3)
    return _paradigms_run(noise(5, 8).to(device), 20, "ddpm", group)


def _paradigms_multistep(group: Any, device: torch.device) -> dict[str, Any]:
    return _paradigms_run(noise(5, 8).to(device), 20, "unipc", group)


NCCL_RUNS: dict[str, Callable[[Any, torch.device], dict[str, Any]]] = {
    "distributed.sample shape= seed=": _sample_seeded,
    "distributed.sample x_T": _sample_x_T,
    "distributed.sample failing rank": _sample_failing,
    "distributed.sample_discrete": _sample_discrete,
    "fk_steering": _fk_steering,
    "fk_steering generator=None": _fk_global_rng,
    "svdd": _svdd,
    "best_of_n": _best_of_n,
    "fk_steering NaN": _fk_nan,
    "discrete.fk_steering": _discrete_fk_steering,
    "discrete.best_of_n": _discrete_best_of_n,
    "discrete.fk_steering NaN": _discrete_nan,
    "paradigms": _paradigms,
    "paradigms generator=None": _paradigms_global_rng,
    "paradigms unipc": _paradigms_multistep,
}


def _on_ranks(group: Any) -> dict[str, Any]:
    """Each of NCCL_RUNS over ``group`` and alone, on this rank's device (its GPU under NCCL, else the CPU):
    both runs' values moved to the CPU and the device types of their tensors; a run that raises gives its
    message instead, so that one failing run hides no other."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    out: dict[str, Any] = {}
    for name, run in NCCL_RUNS.items():
        try:
            runs = [run(group, device), run(None, device)]
        except Exception as e:  # reported by the test of that run
            out[name] = f"{type(e).__name__}: {e}"
            continue
        devices = {v.device.type for r in runs for v in r.values() if isinstance(v, Tensor)}
        out[name] = (
            *({k: v.cpu() if isinstance(v, Tensor) else v for k, v in r.items()} for r in runs),
            devices,
        )
    return out


@pytest.fixture(scope="module")
def nccl_ranks() -> list[dict[str, Any]]:
    """:func:`_on_ranks` on 2 NCCL ranks where there are two GPUs, else 1."""
    return spawn(_on_ranks, 2 if torch.cuda.device_count() >= 2 else 1, backend="nccl")


def _expect_same(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Token ids, counts and messages equal; floats to 1e-12."""
    assert got.keys() == want.keys(), where
    for key, value in want.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=f"{where}: {key}")
        elif isinstance(value, Tensor):
            assert torch.equal(got[key], value), f"{where}: {key}"
        else:
            assert got[key] == value, f"{where}: {key}"


@nccl_only
@pytest.mark.parametrize("name", NCCL_RUNS)
def test_run_over_nccl_ranks_equals_the_run_alone(nccl_ranks: list[dict[str, Any]], name: str) -> None:
    world = len(nccl_ranks)
    for rank, out in enumerate(nccl_ranks):
        where = f"{name} on rank {rank} of {world}"
        assert not isinstance(out[name], str), f"{where}: {out[name]}"
        spread, alone, devices = out[name]
        assert devices <= {KIND}, (where, devices)
        if name == "distributed.sample failing rank" and rank != world - 1:
            alone = {
                "said": f"RuntimeError: distributed.sample: rank(s) [{world - 1}] of the group failed (each "
                f"raised its error); so stops rank {rank}"
            }
        _expect_same(spread, alone, where)


def test_the_nccl_runs_resample_select_and_fail() -> None:
    """What the NCCL comparison covers, checked alone on the device: resampling at some nodes and not at
    others, a selection at every node, the failures raised, the windows sliding by more than one node."""
    device = torch.device(DEVICE)
    for name in ("fk_steering", "fk_steering generator=None", "discrete.fk_steering"):
        events = NCCL_RUNS[name](None, device)["resampled"][:-1]
        assert 0 < int(events.sum()) < events.numel(), name
    assert bool(NCCL_RUNS["svdd"](None, device)["resampled"][:-1].all())
    for name in ("distributed.sample failing rank", "fk_steering NaN", "discrete.fk_steering NaN"):
        assert NCCL_RUNS[name](None, device)["said"] is not None, name
    for name in ("paradigms", "paradigms generator=None", "paradigms unipc"):
        assert max(NCCL_RUNS[name](None, device)["strides"]) > 1, name


# --- metrics ----------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "relative_rmse": sd.metrics.relative_rmse,
    "sliced_wasserstein": lambda a, b: sd.metrics.sliced_wasserstein(a, b, generator=_gen(3)),
    "mmd": sd.metrics.mmd,
    "mmd_bandwidth": lambda a, b: sd.metrics.mmd(a, b, bandwidth=1.5),
    "frechet_distance": sd.metrics.frechet_distance,
}


@pytest.mark.parametrize("name", METRICS)
def test_metric_on_device_tensors_equals_the_cpu(name: str) -> None:
    a, b = GMM.sample(64, _gen(1)), CLASS.sample(64, _gen(2))
    ref = METRICS[name](a, b)
    assert ref > 1e-3
    _expect_float(METRICS[name](a.to(DEVICE), b.to(DEVICE)), ref)
    _expect_float(METRICS[name](a.float().to(DEVICE), b.float().to(DEVICE)), ref, 1e-6)  # measured 6e-9
