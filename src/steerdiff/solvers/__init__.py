"""Few-step solvers. One family per module; :func:`available` lists the names ``solver=`` takes.

Each name resolves to a configured instance (``"dpmpp_3m"`` is ``DPMSolverPPMultistep(order=3)``);
pass an instance for other options (``solver=sd.solvers.UniPC(order=3, variant="bh2")``).
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Grid, Model, NonFiniteError, Solver, Transition, make_grid, step_order
from .ddim import DDIM
from .deis import DEIS
from .dpm_solver import DPMSolver
from .dpmpp import DPMSolverPPMultistep
from .euler import Euler, Heun
from .ipndm import IPNDM
from .lms import LMS
from .unipc import UniPC

__all__ = [
    "DDIM",
    "DEIS",
    "IPNDM",
    "LMS",
    "DPMSolver",
    "DPMSolverPPMultistep",
    "Euler",
    "Grid",
    "Heun",
    "Model",
    "NonFiniteError",
    "Solver",
    "Transition",
    "UniPC",
    "available",
    "get",
    "make_grid",
    "step_order",
]

_REGISTRY: dict[str, Callable[[], Solver]] = {
    "ddim": DDIM,
    "euler": Euler,
    "heun": Heun,
    "dpmpp_2m": lambda: DPMSolverPPMultistep(order=2),
    "dpmpp_3m": lambda: DPMSolverPPMultistep(order=3),
    "unipc": UniPC,
    "deis": DEIS,
    "ipndm": IPNDM,
    "lms": LMS,
    "dpm_solver": DPMSolver,
}


def available() -> list[str]:
    """Names accepted by ``solver=``."""
    return sorted(_REGISTRY)


def get(solver: str | Solver) -> Solver:
    """Resolve a name (see :func:`available`) or pass a :class:`Solver` instance through."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver in _REGISTRY:
        return _REGISTRY[solver]()
    raise ValueError(f"unknown solver={solver!r}; accepted: {available()} or a Solver instance")
