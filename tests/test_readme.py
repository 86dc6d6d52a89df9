"""The README's worked example of a new solver runs as printed and is what it says: second order
against the exact ODE, and the heun-weighted DPM-Solver++(2M) of the library to round-off."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

import steerdiff as sd

from .reference import slope

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    match = re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S)
    assert match is not None, heading
    return match.group(1)


def test_the_custom_solver_example_runs_and_is_second_order():
    scope: dict[str, object] = {}
    exec(compile(_block("### Your own solver"), "README.md", "exec"), scope)
    solver, gmm, proc, x_T, exact = (scope[k] for k in ("ExpAB2", "gmm", "proc", "x_T", "exact"))
    den = gmm.denoiser(proc)
    steps = [10, 20, 40]
    errors = [sd.metrics.relative_rmse(sd.sample(den, x_T, n, solver()), exact) for n in steps]
    assert 1.7 < slope(steps, errors) < 2.4, errors  # measured 2.1
    library = sd.solvers.DPMSolverSDEMultistep(
        order=2, eta=0.0, solver_type="heun", max_h=math.inf, max_h_ratio=0.0
    )
    torch.testing.assert_close(
        sd.sample(den, x_T, 20, solver()), sd.sample(den, x_T, 20, library), rtol=0, atol=1e-12
    )
