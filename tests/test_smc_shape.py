"""The particle methods' ``shape`` and ``x_T``: ``shape`` may be left out where ``x_T`` fixes it, a shape that
disagrees with ``x_T`` is refused naming both, and the methods that draw their own start refuse ``x_T``
(which would otherwise reach the net as a condition)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import steerdiff as sd

from .reference import smooth_mixture

F64 = torch.float64
PROC = sd.VP.cosine()
GMM = smooth_mixture(dim=2, components=3, seed=0)
DEN = GMM.denoiser(PROC)
C = torch.tensor([1.0, -0.5], dtype=F64)
A = torch.tensor([[1.0, 0.5]], dtype=F64)
Y = torch.tensor([1.0], dtype=F64)
BATCH, N, STEPS = 2, 4, 8


def _reward(x: torch.Tensor) -> torch.Tensor:
    return x @ C


def _log_p(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x @ A[0] - Y[0]) / 0.5) ** 2


# name -> (the name its messages carry, the call without shape and x_T)
METHODS: dict[str, tuple[str, Callable[..., Any]]] = {
    "run_smc": (
        "fk_steering",
        lambda **kw: sd.smc.run_smc(
            DEN, sd.smc.FKSteering(1.0, "difference", set(range(STEPS))), reward=_reward, **kw
        ),
    ),
    "fk_steering": ("fk_steering", lambda **kw: sd.smc.fk_steering(DEN, _reward, 1.0, **kw)),
    "tds": ("tds", lambda **kw: sd.smc.tds(DEN, sd.inverse.Matrix(A), Y, noise_std=0.5, **kw)),
    "tds_log_likelihood": ("tds", lambda **kw: sd.smc.tds(DEN, log_likelihood=_log_p, **kw)),
    "best_of_n": ("best_of_n", lambda **kw: sd.smc.best_of_n(DEN, _reward, **kw)),
    "code": ("code", lambda **kw: sd.smc.code(DEN, _reward, block=3, **kw)),
    "svdd": ("svdd", lambda **kw: sd.smc.svdd(DEN, _reward, 0.5, **kw)),
    "fkc": ("fkc", lambda **kw: sd.smc.fkc([DEN], [2.0], **kw)),
    "fkc_anneal": ("fkc", lambda **kw: sd.smc.fkc_anneal(DEN, 2.0, **kw)),
    "fkc_product": ("fkc", lambda **kw: sd.smc.fkc_product(DEN, DEN, **kw)),
    "fkc_cfg": ("fkc", lambda **kw: sd.smc.fkc_cfg(DEN, DEN, 2.0, **kw)),
    "driftlite": ("driftlite", lambda **kw: sd.smc.driftlite([DEN], [2.0], **kw)),
    "psi_sampler": ("psi_sampler", lambda **kw: sd.smc.psi_sampler(DEN, _reward, 1.0, mcmc_steps=2, **kw)),
    "twisted_prior": (
        "psi_sampler",
        lambda **kw: sd.smc.twisted_prior(DEN, _reward, 1.0, mcmc_steps=2, **kw)[0],
    ),
}


def _x_T(name: str = "") -> torch.Tensor:
    """Initial particles; for the methods that start a row's particles from one state, one per row repeated
    (distinct ones are refused there: tests/test_smc_fk.py)."""
    x = torch.randn(BATCH, N, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return x[:, :1].expand_as(x) if name in ("code", "svdd") else x


def _x(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.x


@pytest.mark.parametrize("name", METHODS)
def test_shape_is_read_off_x_T(name: str) -> None:
    """Without ``shape`` the run equals the run given the shape that ``x_T`` has, draw for draw (before: a
    ``TypeError``, "missing ... 'shape'")."""
    call = METHODS[name][1]
    x_T = _x_T(name)
    kw: dict[str, Any] = {"x_T": x_T, "particles": N, "steps": STEPS}
    ref = call(shape=(BATCH, 2), generator=torch.Generator().manual_seed(0), **kw)
    out = call(generator=torch.Generator().manual_seed(0), **kw)
    assert _x(out).shape == (BATCH, N, 2)
    assert torch.equal(_x(out), _x(ref))
    assert bool(torch.isfinite(_x(out)).all())
    if not isinstance(out, torch.Tensor):
        assert torch.equal(out.log_w, ref.log_w) and out.nfe == ref.nfe


@pytest.mark.parametrize("name", METHODS)
def test_a_shape_that_disagrees_with_x_T_is_refused_naming_both(name: str) -> None:
    who, call = METHODS[name]
    pattern = (
        rf"^{who}: shape=\(3, 2\) disagrees with x_T of shape \(2, 4, 2\) = \(batch, particles, "
        r"\*sample_shape\), whose \(batch, \*sample_shape\) is \(2, 2\)"
    )
    with pytest.raises(ValueError, match=pattern):
        call(shape=(3, 2), x_T=_x_T(), particles=N, steps=STEPS)


@pytest.mark.parametrize("name", METHODS)
def test_neither_shape_nor_x_T_is_refused(name: str) -> None:
    who, call = METHODS[name]
    with pytest.raises(ValueError, match=rf"^{who}: pass shape=\(batch, \*sample_shape\), or x_T \(batch, "):
        call(particles=N, steps=STEPS)


def test_x_T_of_other_particles_names_shape_and_particles() -> None:
    """The particles are not read off ``x_T``: ``particles`` (default 16) must match it."""
    msg = (
        "fk_steering: x_T must be (batch, particles, *shape) = (2, 16, 2) for shape=(2, 2) and particles=16, "
    )
    with pytest.raises(ValueError, match=re.escape(msg + "got (2, 4, 2)")):
        sd.smc.fk_steering(DEN, _reward, 1.0, x_T=_x_T(), steps=STEPS)
    with pytest.raises(
        ValueError, match=r"^fk_steering: x_T must be a tensor \(batch, particles, \*sample_sh"
    ):
        sd.smc.fk_steering(DEN, _reward, 1.0, x_T=_x_T()[:, 0], particles=N, steps=STEPS)


def test_x_T_of_another_sample_shape_is_named_as_x_T() -> None:
    with pytest.raises(ValueError, match=r"^fk_steering: x_T has sample shape \(3,\), the denoiser expects"):
        sd.smc.fk_steering(DEN, _reward, 1.0, x_T=torch.zeros(BATCH, N, 3, dtype=F64), particles=N)


@pytest.mark.parametrize(
    "who, call",
    [
        ("afdps", lambda **kw: sd.smc.afdps(DEN, sd.inverse.Matrix(A), Y, noise_std=0.5, **kw)),
        ("dts", lambda **kw: sd.smc.dts(DEN, _reward, 1.0, rollouts=4, **kw)),
        ("rbf", lambda **kw: sd.smc.rbf(DEN, _reward, 40, **kw)),
    ],
)
def test_methods_that_draw_their_own_start_refuse_x_T(who: str, call: Callable[..., Any]) -> None:
    """Before: afdps raised a TypeError (x_T given twice to run_smc); dts and rbf passed x_T to the net."""
    with pytest.raises(
        ValueError, match=rf"^{who}: x_T is not an argument of {who}, which draws its own start"
    ):
        call(shape=(BATCH, 2), x_T=_x_T(), steps=STEPS)
