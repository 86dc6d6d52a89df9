r"""The model a diffusers scheduler config describes, as steerdiff sees it: its process, prediction and
net time input (:func:`process_from_config`), and a :class:`~steerdiff.denoiser.Denoiser` of a diffusers
model under it (:func:`denoiser_from_diffusers`). Needs no diffusers import; the scheduler that runs
steerdiff's solvers in a pipeline is :mod:`steerdiff.integrations.diffusers`.

A diffusers scheduler config says how the net was trained: a discrete VP process (DDPM, Ho et al.
2020) from ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` -- the cosine
schedule of Nichol & Dhariwal 2021, Eq. 17 -- or ``sigmoid``) or ``trained_betas``, over
``num_train_timesteps``, optionally rescaled to zero terminal SNR (``rescale_betas_zero_snr``,
Lin et al. 2024) or SNR-shifted (``snr_shift_scale``: ``SNR / s``); ``prediction_type``
``epsilon``/``sample``/``v_prediction``; ``variance_type="learned_range"`` (Improved DDPM: the net
returns twice the channels; the fixed types, DDPMScheduler's sampling variance, are no part of the model:
:class:`~steerdiff.integrations.diffusers.SteerdiffScheduler`'s ``solver="ddpm"`` reads them; ``learned``
and names DDPMScheduler does not know are refused). The betas and ``alphas_cumprod`` are computed in
float32 as diffusers computes them for training, then held in float64. Flow-matching configs
(``FlowMatch*`` schedulers, ``use_flow_sigmas`` / ``prediction_type="flow_prediction"``) give the
rectified flow ``x = (1 - t) x0 + t eps`` with the velocity ``eps - x0`` as output and the net time ``1000 t``
(``num_train_timesteps * t``); with ``use_flow_sigmas`` the output is what ``prediction_type`` says
(``flow_prediction``, ``epsilon`` or ``sample``, as DPMSolver/UniPC/DEIS/SA-Solver convert it).
EDM configs (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``: Playground v2.5, CosXL) give
the process ``x = x0 + sigma eps`` on ``[sigma_min, sigma_max]`` and Karras et al.'s (2022)
preconditioning with ``sigma_data``: the net gets ``c_in x`` and ``0.25 log(sigma)``, and
``x0 = c_skip x + c_out F`` (:class:`~steerdiff.denoiser.EDMDenoiser`; ``prediction_type``
``epsilon`` or ``v_prediction``, the sign of ``c_out``). ``CosineDPMSolverMultistepScheduler`` configs
(Stable Audio Open, Evans et al. 2024: ``sigma_min=0.3``, ``sigma_max=500``, ``sigma_data=1``,
``v_prediction``) are the same model with another net time, ``2 atan(sigma) / pi``
(:func:`cosine_noise`). ``LCMScheduler`` configs (LCM, LCM-LoRA; Luo et al. 2023) are VP models whose
denoised estimate goes through LCM's boundary condition ``c_skip x + c_out x0`` at ``timestep_scaling``
times the timestep (:class:`~steerdiff.guidance.ConsistencyBoundary`, around the thresholding, which
LCMScheduler applies first); ``TCDScheduler`` configs (TCD, Hyper-SD) the net as it is (TCDScheduler takes
``clip_sample`` and ``thresholding`` and applies neither). Made in code the two have the same keys: a
config with ``timestep_scaling`` needs its ``_class_name``. ``CMStochasticIterativeScheduler`` configs
(Song et al. 2023's consistency models, ``ConsistencyModelPipeline``) give a
:class:`~steerdiff.denoiser.ConsistencyModelDenoiser` of their ``sigma_min``, ``sigma_max`` and
``sigma_data`` (the boundary condition at ``sigma_min``, the net time ``250 log(sigma)``), clipped to
``[-1, 1]`` with ``clip_denoised``, on the process of the consistency function's end ``x_e``;
:func:`consistency_schedule` is that scheduler's grid (its ``rho``, ``num_train_timesteps``), its
``s_noise`` a sampling setting (:class:`~steerdiff.integrations.diffusers.SteerdiffScheduler` refuses one
other than 1). ``ScoreSdeVeScheduler`` configs (Song et al. 2021's VE SDE, NCSN++; ScoreSdeVePipeline) give
the process :class:`~steerdiff.processes.VE` of their ``sigma_min``, ``sigma_max`` with the score as the
net's output and ``sigma`` as its time input, for :func:`steerdiff.sample` (that scheduler's
predictor-corrector loop, ``step_pred`` / ``step_correct``, is no scheduler step that
:class:`~steerdiff.integrations.diffusers.SteerdiffScheduler` can take).
Settings that only choose diffusers' sampling grid (spacing, ``shift``, Karras sigmas, ...) do not
change the model and are ignored. ``thresholding=True``
(DeepFloyd IF: Imagen's dynamic thresholding, Saharia et al. 2022, at the quantile
``dynamic_thresholding_ratio`` of ``|x0|`` per sample, capped at ``sample_max_value``) or else
``clip_sample=True`` (``x0`` clipped to ``clip_sample_range``; DDPM's default, google/ddpm-*) change
the denoised estimate as DDPM/DDIM/DPMSolver/UniPC apply them: the denoiser is then a
:class:`~steerdiff.guidance.DynamicThreshold` (``x0' = clip(x0, -s, s) / s``,
``eps' = (x - alpha x0') / sigma``). Every solver then steps with that consistent pair, as
DDPM/DPMSolver++/UniPC do (they step from ``x0'`` and ``x``); diffusers' DDIM does so only with
``step(..., use_clipped_model_output=True)``: by default it pairs ``x0'`` with the net's own eps,
which a denoiser at ``x`` does not express (steerdiff's ``ddim`` on such a config is DDIM's
``use_clipped_model_output=True``; the ``step`` of
:class:`~steerdiff.integrations.diffusers.SteerdiffScheduler` takes the option as DDIMScheduler does, with
the prediction at ``x + alpha (x0' - x0)``, where the pair is consistent, for its ``ddim`` runs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import choice, integer, ordered, real, real_array
from ..denoiser import (
    DIFFUSERS_PREDICTIONS,
    ConsistencyModelDenoiser,
    Denoiser,
    EDMDenoiser,
    consistency_noise,
    consistency_process,
    edm_noise,
)
from ..guidance import ConsistencyBoundary, DynamicThreshold
from ..processes import EDM, VE, VP, Process, RectifiedFlow
from ..schedules import Custom

__all__ = ["consistency_schedule", "cosine_noise", "denoiser_from_diffusers", "process_from_config"]

F64 = torch.float64

_WHO = "scheduler config"  # the name the config checks give
# DDPMScheduler's variance types but "learned" (refused): the fixed ones choose the ddpm sampler's variance
# (SteerdiffScheduler's solver="ddpm"), "learned_range" is the model's (twice the channels)
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_COSINE_CLASS = "CosineDPMSolverMultistepScheduler"  # EDM preconditioning, cosine_noise as the net time
_EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", _COSINE_CLASS)
_EDM_OUTPUTS = {"epsilon": "edm", "v_prediction": "v"}  # EDMDenoiser's output of a prediction_type
_LCM_CLASS, _TCD_CLASS = "LCMScheduler", "TCDScheduler"  # VP models; LCM's with its boundary condition
_CM_CLASS = "CMStochasticIterativeScheduler"  # consistency models (ConsistencyModelDenoiser)
_VE_CLASS = "ScoreSdeVeScheduler"  # VE score models (NCSN++); denoiser_from_diffusers only
_UNSUPPORTED = {
    "SCMScheduler": "a consistency model",
    "FlowMatchLCMScheduler": "a consistency-distilled model",
    "HeliosScheduler": "a multi-stage (pyramid) flow model",
    "HeliosDMDScheduler": "a distilled multi-stage (pyramid) flow model",
    "KarrasVeScheduler": "a variance-exploding model",
    "IPNDMScheduler": "a model without a beta schedule",
    "DDPMWuerstchenScheduler": "a Wuerstchen model",
    "VQDiffusionScheduler": "a discrete-token model",
    "AmusedScheduler": "a discrete-token model",
}
# configs of schedulers made in code carry no _class_name: these keys tell the same models apart
_UNSUPPORTED_KEYS = {
    "sigma_data": "an EDM-preconditioned or consistency model",
    "scale_factors": "a consistency-distilled model",  # FlowMatchLCM
    "stages": "a multi-stage (pyramid) flow model",  # Helios, HeliosDMD
    "num_vec_classes": "a discrete-token model",
    "mask_token_id": "a discrete-token model",
}
# the keys read here from a VP config, and its sampling settings: a config with no beta_schedule or
# trained_betas is read with diffusers' defaults (linear betas) only where these are all its keys (a
# hand-written dict); every VP scheduler's own config has a beta_schedule, and one of diffusers'
# schedulers without one that is no flow-matching config (FlowMatchHeun made in code: no _class_name,
# no use_dynamic_shifting; flow-map, pi-Flow, discrete-token, ...) describes another model
_VP_KEYS = frozenset(
    (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "prediction_type",
        "variance_type",
        "rescale_betas_zero_snr",
        "snr_shift_scale",
        "timestep_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "clip_sample",
        "clip_sample_range",
        "timestep_spacing",
        "steps_offset",
        "origin",
    )
)
_SUPPORTED = (
    "VP configs (beta_schedule/trained_betas: DDPM, DDIM, PNDM, Euler, Heun, LMS, DPM-Solver, UniPC, "
    "DEIS, ... schedulers; LCM and TCD), flow-matching configs (FlowMatchEuler/FlowMatchHeun, "
    "use_flow_sigmas), EDM configs (EDMEuler, EDMDPMSolverMultistep, CosineDPMSolverMultistep), "
    "consistency models (CMStochasticIterative) and, for sd.sample, variance-exploding score models "
    "(ScoreSdeVe)"
)


@dataclass(frozen=True)
class NetTime:
    """A net's time input as a function of process time, with its inverse: ``forward(t)`` is the net's time
    at process time ``t`` (the denoiser's ``time_map``), ``inverse(c)`` the process time at which the net
    sees ``c`` (how a pipeline's custom ``timesteps`` are read), NaN where ``c`` is no time of that net
    (outside ``domain``). ``owner`` and ``domain`` name the config and the net times for messages: "timesteps
    of {owner} are its net's times {domain}". Module-level functions or partials, so that a scheduler
    holding them pickles."""

    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    owner: str
    domain: str


@dataclass(frozen=True)
class _Spec:
    process: Process
    prediction: str
    learned_variance: bool
    time_map: NetTime | None  # None: the process's own time (a VP config's integer timestep)
    threshold: tuple[float | None, float] | None = None  # DynamicThreshold's (percentile, max_value)
    sigma_data: float | None = None  # EDM preconditioning (EDMDenoiser; prediction is then its output)
    timestep_scaling: float | None = None  # LCM's boundary condition (ConsistencyBoundary)
    consistency: tuple[float, float, float] | None = None  # a consistency model's (sigma_min, sigma_max, s_d)


def _config_of(scheduler_or_config: Any) -> dict[str, Any]:
    if isinstance(scheduler_or_config, dict):
        return dict(scheduler_or_config)
    config = getattr(scheduler_or_config, "config", None)
    if isinstance(config, dict):
        return dict(config)
    raise ValueError(
        "scheduler_or_config must be a diffusers scheduler or its config dict, "
        f"got {type(scheduler_or_config).__name__}"
    )


def _cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: ``beta_i = min(1 - f((i+1)/n) / f(i/n), 0.999)``,
    ``f(u) = cos((u + s) / (1 + s) pi / 2)^2``."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _betas(cfg: dict[str, Any]) -> Tensor:
    """The float32 betas of a VP config, as diffusers computes them for training."""
    n = _train_steps(cfg)
    if cfg.get("trained_betas") is not None:
        betas = real_array(_WHO, "trained_betas", cfg["trained_betas"])
        if len(betas) != n or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"{_WHO}: trained_betas must hold num_train_timesteps = {n} betas in (0, 1), one per "
                f"training timestep; got {len(betas)} values in "
                f"[{float(betas.min()):g}, {float(betas.max()):g}]"
            )
        return betas.to(torch.float32)
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = (real(_WHO, k, cfg.get(k, v), lo=0, hi=1) for k, v in (("beta_start", 1e-4), ("beta_end", 0.02)))
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        return _cosine_betas(n)
    if kind == "sigmoid":  # GeoDiff (Xu et al. 2022)
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32)) * (b1 - b0) + b0
    raise ValueError(f"beta_schedule={kind!r} is not supported; accepted: {_BETA_SCHEDULES} or trained_betas")


def _origin(cfg: dict[str, Any]) -> str | None:
    """The diffusers scheduler class a config comes from: ``origin`` (SteerdiffScheduler's own config),
    else its ``_class_name``; ``None`` for a config made in code."""
    return cfg.get("origin") or cfg.get("_class_name")


def _is_flow(cfg: dict[str, Any]) -> bool:
    """Whether a config describes a flow-matching model (class name, or keys when it has none)."""
    origin = _origin(cfg)
    has_betas = "beta_schedule" in cfg or cfg.get("trained_betas") is not None
    return (
        origin in _FLOW_CLASSES
        or bool(cfg.get("use_flow_sigmas"))
        or cfg.get("prediction_type") == "flow_prediction"
        or (origin is None and "use_dynamic_shifting" in cfg and not has_betas)
    )


def _is_edm(cfg: dict[str, Any]) -> bool:
    """Whether a config describes an EDM-preconditioned model: an EDM scheduler's (cosine's included) by
    class name, or made in code (no class name) with ``sigma_data`` and ``sigma_schedule``."""
    origin = _origin(cfg)
    if origin is not None:
        return origin in _EDM_CLASSES
    return cfg.get("sigma_data") is not None and "sigma_schedule" in cfg


def _is_cosine(cfg: dict[str, Any]) -> bool:
    """Whether an EDM config is CosineDPMSolverMultistep's: by class name, or made in code by its keys (it
    has ``solver_order`` and no ``algorithm_type``; EDMEuler neither, EDMDPMSolver both)."""
    origin = _origin(cfg)
    if origin is not None:
        return origin == _COSINE_CLASS
    return "solver_order" in cfg and "algorithm_type" not in cfg


def cosine_noise(t: Tensor) -> Tensor:
    """The net time of CosineDPMSolverMultistep's model (Stable Audio Open) at ``t = sigma``:
    ``c_noise = 2 atan(sigma) / pi``, in ``[0, 1)`` -- the time of the continuous cosine schedule
    ``alpha = cos(pi c / 2)``, ``sigma_vp = sin(pi c / 2)`` (Nichol & Dhariwal 2021, without the offset)
    whose ``sigma_vp / alpha`` is ``sigma``. Its inverse is :func:`_cosine_noise_inverse`."""
    return torch.atan(t) * (2 / math.pi)


def _cosine_noise_inverse(c: Tensor) -> Tensor:
    """``sigma = tan(pi c / 2)`` for ``c`` in ``[0, 1)`` (the inverse of :func:`cosine_noise`), else NaN."""
    return torch.where((c >= 0) & (c < 1), torch.tan(c * (math.pi / 2)), math.nan)


def _edm_noise_inverse(c: Tensor) -> Tensor:
    """``sigma = exp(4 c)``, the inverse of :func:`~steerdiff.denoiser.edm_noise` (``inf`` above
    ``c = 177``: clipped to the range by the caller)."""
    return torch.exp(4 * c)


_EDM_TIME = NetTime(edm_noise, _edm_noise_inverse, "an EDM config", "log(sigma) / 4")
_COSINE_TIME = NetTime(
    cosine_noise, _cosine_noise_inverse, "a CosineDPMSolverMultistep config", "2 atan(sigma) / pi, in [0, 1)"
)


def _noise_range(
    cfg: dict[str, Any], sigma_min: float, sigma_max: float, sigma_data: float | None = None
) -> tuple[float, float, float]:
    """A config's ``(sigma_min, sigma_max, sigma_data)``, positive numbers with ``sigma_min < sigma_max``
    (the arguments: the defaults of its class, for keys absent or ``None``; ``sigma_data`` 0 where no
    default is given, a model without one), else a ``ValueError`` naming the key."""

    def read(key: str, default: float) -> float:
        return real(_WHO, key, default if cfg.get(key) is None else cfg[key], lo=0, lo_open=True)

    lo, hi = ordered(
        _WHO, "sigma_min", read("sigma_min", sigma_min), "sigma_max", read("sigma_max", sigma_max)
    )
    return lo, hi, 0.0 if sigma_data is None else read("sigma_data", sigma_data)


def _edm_spec(cfg: dict[str, Any], threshold: tuple[float | None, float] | None) -> _Spec:
    """An EDM scheduler config: the process ``x = x0 + sigma eps`` on ``[sigma_min, sigma_max]`` and
    Karras et al.'s preconditioning with ``sigma_data`` (:class:`~steerdiff.denoiser.EDMDenoiser`), its
    ``F`` as ``prediction_type`` says (``epsilon`` or ``v_prediction``: the sign of ``c_out``); for
    CosineDPMSolverMultistep's the net time :func:`cosine_noise` and that class's defaults."""
    cosine = _is_cosine(cfg)
    pred_type = cfg.get("prediction_type", "v_prediction" if cosine else "epsilon")
    if not isinstance(pred_type, str) or pred_type not in _EDM_OUTPUTS:
        raise ValueError(
            f"prediction_type={pred_type!r} of an EDM config is not supported; accepted: "
            f"{sorted(_EDM_OUTPUTS)}"
        )
    precondition = cfg.get("precondition_type", "edm")
    if precondition != "edm":
        raise ValueError(
            f"precondition_type={precondition!r} of an EDM config is not supported; accepted: 'edm'"
        )
    lo, hi, sigma_data = _noise_range(cfg, *((0.3, 500.0, 1.0) if cosine else (0.002, 80.0, 0.5)))
    time_map = _COSINE_TIME if cosine else _EDM_TIME
    return _Spec(EDM(lo, hi), _EDM_OUTPUTS[pred_type], False, time_map, threshold, sigma_data)


def _is_consistency(cfg: dict[str, Any]) -> bool:
    """Whether a config is CMStochasticIterativeScheduler's: by class name, or made in code by its key
    ``clip_denoised`` (no other scheduler has it)."""
    origin = _origin(cfg)
    return origin == _CM_CLASS if origin is not None else "clip_denoised" in cfg


def _consistency_model(cfg: dict[str, Any]) -> tuple[float, float, float, int, float]:
    """A consistency-model config's ``(sigma_min, sigma_max, sigma_data, num_train_timesteps, rho)``,
    checked, with CMStochasticIterativeScheduler's defaults (0.002, 80, 0.5, 40, 7)."""
    lo, hi, sigma_data = _noise_range(cfg, 0.002, 80.0, 0.5)
    n = integer(_WHO, "num_train_timesteps", cfg.get("num_train_timesteps", 40), lo=2)
    rho = real(_WHO, "rho", cfg.get("rho", 7.0), lo=0, lo_open=True)
    return lo, hi, sigma_data, n, rho


def _ramp_times(cfg: dict[str, Any], ramp: Tensor) -> Tensor:
    """The process times (:func:`~steerdiff.denoiser.consistency_process`: ``sqrt(sigma^2 - sigma_min^2)``)
    at positions ``ramp`` of a consistency-model config's Karras ramp, ``sigma = (s_max^(1/rho) + ramp
    (s_min^(1/rho) - s_max^(1/rho)))^rho`` (Karras et al. 2022, Eq. 5; 0: ``sigma_max``, 1: ``sigma_min``)."""
    lo, hi, _, _, rho = _consistency_model(cfg)
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    sigma = (a + ramp * (b - a)) ** rho
    return (sigma * sigma - lo * lo).clamp(min=0).sqrt()


def _consistency_noise_inverse(sigma_min: float, c: Tensor) -> Tensor:
    """The process time ``t = sqrt(sigma^2 - sigma_min^2)`` at which a consistency model's net sees ``c =
    250 log(sigma)`` (the inverse of :func:`~steerdiff.denoiser.consistency_noise`); NaN below
    ``sigma_min``."""
    sigma = torch.exp(c / 250)
    return torch.where(sigma >= sigma_min, (sigma * sigma - sigma_min**2).clamp(min=0).sqrt(), math.nan)


def _ve_sigma_inverse(process: VE, c: Tensor) -> Tensor:
    """The process time at which a ScoreSdeVe net sees its time ``c = sigma``; NaN for ``c <= 0``."""
    return torch.where(c > 0, process.t_of_sigma_ratio(c.clamp(min=1e-300)), math.nan)


def _consistency_spec(cfg: dict[str, Any]) -> _Spec:
    """A CMStochasticIterativeScheduler config (Song et al. 2023; ConsistencyModelPipeline): a
    :class:`~steerdiff.denoiser.ConsistencyModelDenoiser` of its ``sigma_min``, ``sigma_max`` and
    ``sigma_data``, its ``x0`` clipped to ``[-1, 1]`` with ``clip_denoised`` (default ``True``), as that
    scheduler clips it. The process's smallest time is that of the ramp's last node before ``sigma_min``
    (position ``(N - 2) / (N - 1)``, ``N = num_train_timesteps``; above ``sigma_min``, so ``t > 0``), or
    ``sigma_min`` if that is below it: every node of the scheduler's grids is in the range."""
    lo, hi, sigma_data, n, _ = _consistency_model(cfg)
    last = float(_ramp_times(cfg, torch.tensor([(n - 2) / (n - 1)], dtype=F64)))
    process = consistency_process(lo, hi, min(lo, last))
    clip = cfg.get("clip_denoised", True)
    if not isinstance(clip, bool):
        raise ValueError(f"{_WHO}: clip_denoised must be True or False, got {clip!r}")
    time_map = NetTime(
        functools.partial(consistency_noise, lo),
        functools.partial(_consistency_noise_inverse, lo),
        "a consistency model's config",
        f"250 log(sigma), sigma >= sigma_min = {lo:g}",
    )
    threshold = (None, 1.0) if clip else None
    return _Spec(process, "x0", False, time_map, threshold, consistency=(lo, hi, sigma_data))


def consistency_schedule(
    scheduler_or_config: Any, num_inference_steps: int | None = None, timesteps: Sequence[float] | None = None
) -> Custom:
    """The grid of ``CMStochasticIterativeScheduler.set_timesteps`` for a consistency-model config, as a
    :class:`~steerdiff.schedules.Custom` schedule of the process times of
    :func:`denoiser_from_diffusers`' :class:`~steerdiff.denoiser.ConsistencyModelDenoiser`: for
    ``sd.sample(den, x_T, len(nodes), "lcm", schedule)`` (``final="zero"``: the run ends at ``sigma_min``,
    where that scheduler ends; ``x_T`` is ``sigma_max`` times standard normal noise, as its pipeline starts).

    Pass one of ``num_inference_steps`` (``n``: the indices ``k N // n`` for ``k = n - 1, ..., 0``) or
    ``timesteps``, strictly decreasing integer indices (openai's ``ts`` without the last, ``[22, 0]`` for
    their two-step ImageNet-64 run); the nodes are the indices in increasing order as positions ``k / (N -
    1)`` on the Karras ramp of ``sigma_min``, ``sigma_max`` and ``rho`` (so the first node is
    ``sigma_max``), ``N = num_train_timesteps``, as that scheduler reads them. Index ``N - 1`` is the
    ramp's end, ``sigma_min``, where the consistency function is the identity: refused (that scheduler's
    step there only clips), and with it ``num_inference_steps = N``.
    """
    cfg = _config_of(scheduler_or_config)
    if not _is_consistency(cfg):
        raise ValueError(
            "consistency_schedule: scheduler_or_config must be a CMStochasticIterativeScheduler config (a "
            f"consistency model), got one of {_origin(cfg) or 'a scheduler without a _class_name'}"
        )
    who = "consistency_schedule"
    n = _consistency_model(cfg)[3]
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError(f"{who}: pass one of num_inference_steps or timesteps")
    if num_inference_steps is not None:
        steps = integer(who, "num_inference_steps", num_inference_steps, lo=1, hi=n - 1)
        index = torch.arange(steps, dtype=F64) * (n // steps)
    else:
        index = real_array(who, "timesteps", timesteps).flip(0)
        if not bool(
            (index == index.round()).all()
            & (index >= 0).all()
            & (index <= n - 2).all()
            & (index[1:] > index[:-1]).all()
        ):
            raise ValueError(
                f"{who}: timesteps must be strictly decreasing integers in [0, {n - 2}] (num_train_timesteps "
                f"- 2; {n - 1} is the ramp's end, sigma_min), got {timesteps!r}"
            )
    return Custom(_ramp_times(cfg, index / (n - 1)))


def _is_score_sde_ve(cfg: dict[str, Any]) -> bool:
    """Whether a config is ScoreSdeVeScheduler's: by class name, or made in code by its keys ``sampling_eps``,
    ``snr`` and ``correct_steps`` (the deprecated ScoreSdeVpScheduler, a VP SDE, has ``sampling_eps`` too)."""
    origin = _origin(cfg)
    if origin is not None:
        return origin == _VE_CLASS
    return {"sampling_eps", "snr", "correct_steps"} <= cfg.keys()


def _score_sde_ve_spec(cfg: dict[str, Any]) -> _Spec:
    """A ScoreSdeVeScheduler config (Song et al. 2021, the VE SDE; NCSN++, ScoreSdeVePipeline): the process
    :class:`~steerdiff.processes.VE` of its ``sigma_min``, ``sigma_max`` (``sigma(t) = sigma_min
    (sigma_max / sigma_min)^t``, ``t`` in ``[0, 1]``), the net's output the score (the pipeline's model
    output: UNet2DModel's Fourier-time NCSN++ divides its output by the ``sigma`` it gets) and its time
    input ``sigma(t)`` itself. ``snr``, ``correct_steps``, ``sampling_eps`` and ``num_train_timesteps``
    are sampling settings."""
    lo, hi, _ = _noise_range(cfg, 0.01, 1348.0)
    process = VE(lo, hi)
    net_time = NetTime(
        process.sigma, functools.partial(_ve_sigma_inverse, process), "a ScoreSdeVe config", "sigma > 0"
    )
    return _Spec(process, "score", False, net_time)


def _threshold(cfg: dict[str, Any]) -> tuple[float | None, float] | None:
    """The post-processing of the denoised estimate a config asks for, as DDPM/DDIM apply it (and
    DPMSolver/UniPC/DEIS its first case): ``thresholding=True`` (not UniPC's with ``predict_x0=False``,
    which thresholds nothing), Imagen's dynamic thresholding at quantile ``dynamic_thresholding_ratio``
    capped at ``sample_max_value``; else ``clip_sample=True``,
    clipping to ``[-clip_sample_range, clip_sample_range]`` (not CogVideoX's, which never clip); else
    none. As :class:`~steerdiff.guidance.DynamicThreshold`'s ``(percentile, max_value)``."""
    if cfg.get("thresholding") and cfg.get("predict_x0", True):  # UniPC thresholds its x0 only
        ratio = cfg.get("dynamic_thresholding_ratio", 0.995)
        return (
            real("thresholding", "dynamic_thresholding_ratio", ratio, lo=0, hi=1, lo_open=True),
            real("thresholding", "sample_max_value", cfg.get("sample_max_value", 1.0), lo=1),
        )
    if cfg.get("clip_sample") and not _unclipped(cfg):
        limit = cfg.get("clip_sample_range", 1.0)
        return None, real("clip_sample", "clip_sample_range", limit, lo=0, lo_open=True)
    return None


def _unclipped(cfg: dict[str, Any]) -> bool:
    """Whether the config is CogVideoX's (by class name; made in code: ``snr_shift_scale`` and no
    ``thresholding`` key), whose schedulers take ``clip_sample`` (default ``True``) and never clip, or
    TCDScheduler's (takes ``clip_sample`` and ``thresholding``, applies neither)."""
    origin = _origin(cfg)
    if origin is None:
        return "snr_shift_scale" in cfg and "thresholding" not in cfg
    return origin in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", _TCD_CLASS)


def _train_steps(cfg: dict[str, Any]) -> int:
    """The config's ``num_train_timesteps`` (default 1000), checked."""
    return integer(_WHO, "num_train_timesteps", cfg.get("num_train_timesteps", 1000), lo=2)


def _flow_sigmas_prediction(pred_type: Any) -> str:
    """The net output of a ``use_flow_sigmas`` config (DPMSolver, UniPC, DEIS, SA-Solver on the rectified
    flow ``alpha = 1 - sigma``): as ``prediction_type`` says, as those schedulers convert it -- the
    velocity for ``flow_prediction``, ``eps`` for ``epsilon`` (``x0 = (x - sigma eps) / alpha``), ``x0`` for
    ``sample``. Their ``v_prediction`` (``x0 = alpha x - sigma v``) is the x0 of no model where
    ``alpha^2 + sigma^2 != 1``: refused."""
    accepted = {"flow_prediction": "flow", "epsilon": "eps", "sample": "x0"}
    if not isinstance(pred_type, str) or pred_type not in accepted:
        raise ValueError(
            f"prediction_type={pred_type!r} with use_flow_sigmas=True is not supported; accepted: "
            f"{sorted(accepted)}"
        )
    return accepted[pred_type]


def _euler_continuous_time(process: Process, t: Tensor) -> Tensor:
    """Euler's continuous timesteps (``timestep_type="continuous"``): the net sees ``0.25 log(sigma /
    alpha) = -lam / 4``."""
    return -0.25 * process.lam(t)


def _euler_continuous_inverse(process: Process, c: Tensor) -> Tensor:
    """The process time of Euler's continuous timestep ``c = -lam / 4``: ``t_of_lam(-4 c)``."""
    return process.t_of_lam(-4 * c)


def _flow_time(n: int, t: Tensor) -> Tensor:
    """A flow-matching net's time ``n t`` (``n = num_train_timesteps``)."""
    return n * t


def _flow_time_inverse(n: int, c: Tensor) -> Tensor:
    """``t = c / n`` for ``c >= 0``, the inverse of :func:`_flow_time`; NaN elsewhere."""
    return torch.where(c >= 0, c / n, math.nan)


def _spec(cfg: dict[str, Any]) -> _Spec:
    origin = _origin(cfg) or ""
    if _is_consistency(cfg):
        return _consistency_spec(cfg)
    if _is_score_sde_ve(cfg):
        return _score_sde_ve_spec(cfg)
    threshold = _threshold(cfg)
    if _is_edm(cfg):
        return _edm_spec(cfg, threshold)
    # a key's presence tells (FlowMatchLCM's scale_factors defaults to None), but SteerdiffScheduler's own
    # config holds sigma_data=None where it describes no EDM model
    said = (k for k in _UNSUPPORTED_KEYS if k in cfg and (k != "sigma_data" or cfg[k] is not None))
    reason = _UNSUPPORTED.get(origin) or next((_UNSUPPORTED_KEYS[k] for k in said), None)
    if reason is not None:
        raise ValueError(
            f"the scheduler config of {origin or 'this scheduler'} ({reason}) is not supported; "
            f"supported: {_SUPPORTED}"
        )
    scaling = _timestep_scaling(cfg, origin)
    n = _train_steps(cfg)
    pred_type = cfg.get("prediction_type", "epsilon")
    if _is_flow(cfg):
        if cfg.get("invert_sigmas"):
            raise ValueError("flow-matching config with invert_sigmas=True is not supported")
        prediction = _flow_sigmas_prediction(pred_type) if cfg.get("use_flow_sigmas") else "flow"
        # the net time n t (partials, not lambdas: a scheduler holding them pickles)
        flow_time = NetTime(
            functools.partial(_flow_time, n),
            functools.partial(_flow_time_inverse, n),
            "a flow-matching config",
            f"{n} t, >= 0",
        )
        return _Spec(RectifiedFlow(1 / n, 1 - 1 / n), prediction, False, flow_time, threshold)
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        key = next((k for k in cfg if not k.startswith("_") and k not in _VP_KEYS), None)
        if key is not None:
            hint = "" if origin else " (a FlowMatchHeun config made in code: give its _class_name)"
            raise ValueError(
                f"the scheduler config of {origin or 'this scheduler'} has no beta_schedule or "
                f"trained_betas, is no flow-matching config and has the key {key!r}: it describes a model "
                f"that is not supported{hint}; supported: {_SUPPORTED}"
            )
    if not isinstance(pred_type, str) or pred_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(
            f"prediction_type={pred_type!r} is not supported; accepted: {sorted(DIFFUSERS_PREDICTIONS)}"
        )
    variance = cfg.get("variance_type")
    if variance == "learned":
        raise ValueError(
            "variance_type='learned' (extra output channels that diffusers' DDPMScheduler takes as the "
            "step's variance itself, where Improved DDPM's code takes a learned output as its log) is not "
            "supported; accepted: 'learned_range' or a fixed variance type"
        )
    if variance is not None:
        choice(_WHO, "variance_type", variance, _VARIANCE_TYPES)
    ac = torch.cumprod(1 - _betas(cfg), 0)
    shift = real(_WHO, "snr_shift_scale", cfg.get("snr_shift_scale") or 1.0, lo=0, lo_open=True)
    if shift != 1.0:  # CogVideoX: SNR / s
        ac = ac / (shift + (1 - shift) * ac)
    process = VP.discrete(alphas_cumprod=ac.to(F64), rescale_zero_snr=bool(cfg.get("rescale_betas_zero_snr")))
    time_map = None
    choice(_WHO, "timestep_type", cfg.get("timestep_type", "discrete"), ("discrete", "continuous"))
    if cfg.get("timestep_type") == "continuous" and pred_type == "v_prediction":
        time_map = NetTime(
            functools.partial(_euler_continuous_time, process),
            functools.partial(_euler_continuous_inverse, process),
            "a continuous-timestep VP config",
            "log(sigma / alpha) / 4",
        )
    learned = variance == "learned_range"
    return _Spec(
        process, DIFFUSERS_PREDICTIONS[pred_type], learned, time_map, threshold, timestep_scaling=scaling
    )


def _timestep_scaling(cfg: dict[str, Any], origin: str) -> float | None:
    """LCM's boundary-condition scaling (``timestep_scaling``, default 10) where the config is an
    LCMScheduler's (``origin`` or ``_class_name``), else ``None``: TCDScheduler's has the key and applies no
    boundary condition. Made in code, LCM's and TCD's configs have the same keys and defaults: one with a
    ``timestep_scaling`` and no class name is refused."""
    value = cfg.get("timestep_scaling")
    if origin == _LCM_CLASS:
        return real(_WHO, "timestep_scaling", 10.0 if value is None else value, lo=0, lo_open=True)
    if value is not None and origin != _TCD_CLASS:
        raise ValueError(
            f"the scheduler config of {origin} (a consistency-distilled model) is not supported; supported: "
            f"{_SUPPORTED}"
            if origin
            else "the scheduler config of this scheduler has timestep_scaling: an LCMScheduler's or a "
            "TCDScheduler's config made in code (a consistency-distilled model, with or without LCM's "
            "boundary condition); give its _class_name (SteerdiffScheduler: origin)"
        )
    return None


def process_from_config(scheduler_or_config: Any) -> Process:
    """The noise process a diffusers scheduler config describes (see the module docstring).

    Raises:
        ValueError: an unknown ``beta_schedule``/``prediction_type`` or an unsupported scheduler.
    """
    return _spec(_config_of(scheduler_or_config)).process


class _ModelNet:
    """``model(x, t, **cond)`` as a tensor: the ``.sample`` of diffusers' model outputs."""

    def __init__(self, model: Callable[..., Any]) -> None:
        self.model = model

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = self.model(x, t, **cond)
        if hasattr(out, "sample"):
            return out.sample
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def _denoiser(net: Callable[..., Tensor], spec: _Spec, **kw: Any) -> Denoiser:
    """The denoiser of ``spec`` over ``net`` (``kw`` override it), in its
    :class:`~steerdiff.guidance.DynamicThreshold` where the config thresholds or clips, and that in a
    :class:`~steerdiff.guidance.ConsistencyBoundary` for an LCM config (LCMScheduler clips first)."""
    den: Denoiser
    opts: dict[str, Any] = {} if spec.time_map is None else {"time_map": spec.time_map.forward}
    if spec.consistency is not None:
        lo, hi, sigma_data = spec.consistency
        den = ConsistencyModelDenoiser(net, lo, hi, sigma_data, **{**opts, "t_min": spec.process.t_min, **kw})
    elif spec.sigma_data is not None:
        assert isinstance(spec.process, EDM), "an EDM config's spec holds an EDM process"
        den = EDMDenoiser(net, spec.process, spec.sigma_data, **{"output": spec.prediction, **opts, **kw})
    else:
        opts.update(prediction=spec.prediction, learned_variance=spec.learned_variance)
        den = Denoiser(net, spec.process, **{**opts, **kw})
    if spec.threshold is not None:
        den = DynamicThreshold(den, *spec.threshold)
    return den if spec.timestep_scaling is None else ConsistencyBoundary(den, spec.timestep_scaling)


def denoiser_from_diffusers(model: Callable[..., Any], scheduler_or_config: Any, **kw: Any) -> Denoiser:
    """A :class:`~steerdiff.denoiser.Denoiser` of a diffusers model (``UNet2DModel``,
    ``UNet2DConditionModel``, a transformer, ...) trained as ``scheduler_or_config`` says.

    The net is called as ``model(x, t, **cond).sample`` (a tuple's first entry, or the tensor
    itself), with ``t`` the timestep diffusers would pass (``(batch,)``); ``cond`` are the
    keyword arguments given to :func:`steerdiff.sample` (``encoder_hidden_states``,
    ``class_labels``, ...). ``kw`` go to :class:`~steerdiff.denoiser.Denoiser` and override what
    the config says (``prediction``, ``time_map``, ``learned_variance``, ``shape``); for an EDM config
    to :class:`~steerdiff.denoiser.EDMDenoiser` (``output``, ``time_map``, ``shape``), whose net gets
    ``c_in x`` and ``0.25 log(sigma)`` (a CosineDPMSolverMultistep config's: ``2 atan(sigma) / pi``), as
    diffusers' EDM schedulers' pipelines give it; for a CMStochasticIterativeScheduler config to
    :class:`~steerdiff.denoiser.ConsistencyModelDenoiser` (``time_map``, ``shape``, ``t_min``). A config with
    ``thresholding=True`` or ``clip_sample=True`` gives that denoiser in a
    :class:`~steerdiff.guidance.DynamicThreshold` (see the module docstring).

    Raises:
        ValueError: an unknown ``beta_schedule``/``prediction_type`` (``v_prediction`` with
            ``use_flow_sigmas``), ``variance_type="learned"`` or one DDPMScheduler does not take,
            a threshold setting out of range (naming the key), a config of an unsupported
            scheduler (sCM and flow-map consistency models, Karras' VE, discrete-token models), or one with no
            ``beta_schedule`` or ``trained_betas`` that is no flow-matching config and has a key no VP
            config has (naming it), an EDM config of another ``prediction_type`` or ``precondition_type``.
    """
    return _denoiser(_ModelNet(model), _spec(_config_of(scheduler_or_config)), **kw)
