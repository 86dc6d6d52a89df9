"""Guidance: denoisers that wrap a denoiser and steer it (every solver works with every guidance)."""

from ..solvers.self_recurrence import SelfRecurrence
from .base import Guided, add_score, denoise_with_grad, grad_leaf, grad_on, hold, with_estimate
from .boundary import ConsistencyBoundary
from .calibration import Calibrated, calibrate
from .cfg import CADS, CFG
from .characteristic import CharacteristicGuidance
from .classifier import ClassifierGuidance, RewardGuidance
from .coupled import Coupled, pcd_sample
from .density import DensityGuidance, prior_guidance
from .dps import DPS
from .epsilon_scaling import EpsilonNorms, EpsilonScaling, epsilon_norms
from .lanpaint import LanPaint, lanpaint_nfe
from .mcg import MCG
from .minority import MinorityGuidance, SelfGuidedMinority
from .pcg import pcg
from .pigdm import PiGDM
from .repaint import RePaint, repaint_nfe, repaint_sample
from .threshold import DynamicThreshold
from .time_shift import TimeShift

__all__ = [
    "CADS",
    "CFG",
    "DPS",
    "MCG",
    "Calibrated",
    "CharacteristicGuidance",
    "ClassifierGuidance",
    "ConsistencyBoundary",
    "Coupled",
    "DensityGuidance",
    "DynamicThreshold",
    "EpsilonNorms",
    "EpsilonScaling",
    "Guided",
    "LanPaint",
    "MinorityGuidance",
    "PiGDM",
    "RePaint",
    "RewardGuidance",
    "SelfGuidedMinority",
    "SelfRecurrence",
    "TimeShift",
    "add_score",
    "calibrate",
    "denoise_with_grad",
    "epsilon_norms",
    "grad_leaf",
    "grad_on",
    "hold",
    "lanpaint_nfe",
    "pcd_sample",
    "pcg",
    "prior_guidance",
    "repaint_nfe",
    "repaint_sample",
    "with_estimate",
]
