"""Few-step solvers. One family per module; :func:`available` lists the names ``solver=`` takes.

Each name resolves to a configured instance (``"dpmpp_3m"`` is ``DPMSolverPPMultistep(order=3)``);
pass an instance for other options (``solver=sd.solvers.UniPC(order=3, variant="bh2")``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._checks import caller
from .accelerated import AcceleratedDDIM, AcceleratedDDPM
from .base import Grid, History, Model, NonFiniteError, Solver, Transition, make_grid, step_order
from .cps import CPS
from .dc_solver import CPR, DCSearch, DCSolver, ExactReference, SolverReference, search_ratios
from .ddim import DDIM
from .ddpm import DDPM
from .deis import DEIS
from .dpm_2 import DPMSolver2
from .dpm_adaptive import AdaptiveInfo, dpm_adaptive
from .dpm_solver import DPMSolver
from .dpm_solver_v3 import EMS, DPMSolverV3, fit_ems
from .dpmpp import DPMSolverPPMultistep
from .dpmpp_sde import DPMSolverSDE, DPMSolverSDEMultistep
from .edm import EDMStochasticHeun
from .er_sde import ERSDE
from .euler import Euler, EulerAncestral, Heun
from .euler_maruyama import EulerMaruyama
from .flow_sde import FlowSDE
from .gradient_estimation import GradientEstimation
from .ipndm import IPNDM
from .lms import LMS
from .mrs import MRSampler
from .pndm import PNDM
from .restart import Restart
from .sa_solver import SASolver
from .self_recurrence import SelfRecurrence
from .tcd import TCD
from .unipc import UniPC

__all__ = [
    "CPR",
    "CPS",
    "DDIM",
    "DDPM",
    "DEIS",
    "EMS",
    "ERSDE",
    "IPNDM",
    "LMS",
    "PNDM",
    "TCD",
    "AcceleratedDDIM",
    "AcceleratedDDPM",
    "AdaptiveInfo",
    "DCSearch",
    "DCSolver",
    "DPMSolver",
    "DPMSolver2",
    "DPMSolverPPMultistep",
    "DPMSolverSDE",
    "DPMSolverSDEMultistep",
    "DPMSolverV3",
    "EDMStochasticHeun",
    "Euler",
    "EulerAncestral",
    "EulerMaruyama",
    "ExactReference",
    "FlowSDE",
    "GradientEstimation",
    "Grid",
    "Heun",
    "History",
    "MRSampler",
    "Model",
    "NonFiniteError",
    "Restart",
    "SASolver",
    "SelfRecurrence",
    "Solver",
    "SolverReference",
    "Transition",
    "UniPC",
    "available",
    "dpm_adaptive",
    "fit_ems",
    "get",
    "make_grid",
    "search_ratios",
    "step_order",
]

_REGISTRY: dict[str, Callable[[], Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "accel_ddim": AcceleratedDDIM,
    "accel_ddpm": AcceleratedDDPM,
    "gradient_estimation": GradientEstimation,
    "euler_ancestral": EulerAncestral,
    "euler_maruyama": EulerMaruyama,
    "flow_sde": FlowSDE,
    "cps": CPS,
    "euler": Euler,
    "heun": Heun,
    "edm_sde": EDMStochasticHeun,
    "restart": Restart,
    "sa_solver": SASolver,
    "dpmpp_2m": lambda: DPMSolverPPMultistep(order=2),
    "dpmpp_3m": lambda: DPMSolverPPMultistep(order=3),
    "dpmpp_2m_sde": lambda: DPMSolverSDEMultistep(order=2),
    "dpmpp_3m_sde": lambda: DPMSolverSDEMultistep(order=3),
    "dpmpp_sde": DPMSolverSDE,
    "er_sde": ERSDE,
    "unipc": UniPC,
    "deis": DEIS,
    "ipndm": IPNDM,
    "lms": LMS,
    "pndm": PNDM,
    "plms": lambda: PNDM(warmup="improved_euler"),
    "mrs": MRSampler,
    "dpm_solver": DPMSolver,
    "dpm_2": DPMSolver2,
    "dpm_2_ancestral": lambda: DPMSolver2(eta=1.0),
    "dpmpp_2s_ancestral": lambda: DPMSolver2(algorithm="dpmsolver++", eta=1.0),
    "tcd": TCD,
    "lcm": lambda: TCD(gamma=1.0),
}


def available() -> list[str]:
    """Names accepted by ``solver=``."""
    return sorted(_REGISTRY)


def get(solver: str | Solver, who: str | None = None, accepted: Sequence[str] | None = None) -> Solver:
    """Resolve a name (see :func:`available`) or pass a :class:`Solver` instance through; anything else
    is a ``ValueError`` naming ``solver`` and the accepted values (after ``who:``, the caller, where
    given): ``accepted``, the names a caller takes (default :func:`available`)."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver in _REGISTRY:
        return _REGISTRY[solver]()
    prefix = caller(who)
    names = available() if accepted is None else list(accepted)
    raise ValueError(f"{prefix}unknown solver={solver!r}; accepted: {names} or a Solver instance")
