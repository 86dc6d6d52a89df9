"""Eta Inversion (``sd.eta_invert``, ``sd.eta_inversion.EtaDDIM``; Kang, Galim & Koo, ECCV 2024).

Exact answers: ``eta(t)`` is the authors' table ``np.linspace(0, 0.4, 1000)[t]`` at Stable Diffusion's
timesteps, and the edit's step is diffusers' ``DDIMScheduler.step`` with that ``eta`` and the given noise (the
authors' ``step_backward``), masked element by element; the source branch is :func:`sd.invert`'s DDIM
inversion bit for bit; ``eta = (0, 0)`` is DDIM inversion then DDIM sampling bit for bit; each map is the
candidate nearest to the source branch's optimal noise, recomputed by hand. Editing the conditional
two-Gaussian model of ``tests/test_ddpm_inversion.py`` is measured against DDIM inversion, edit-friendly DDPM
inversion and fresh noise.

``python -m tests.test_eta_inversion`` prints the editing table quoted in docs/inversion.md.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff.eta_inversion import EtaDDIM
from steerdiff.solvers.base import Model, make_grid
from steerdiff.solvers.ddim import ancestral_split

from .test_ddpm_inversion import SCHEDULE, VP, gen, two_gaussians

F64 = torch.float64


@pytest.fixture(scope="module")
def x_0(gmm):
    return gmm.sample(16, generator=gen(5))


# --- the eta function and the step ------------------------------------------------------------------------


def test_eta_function_is_the_authors_table():
    """``eta(t)`` on SD's 1000 timesteps is ``np.linspace(eta_0, eta_1, 1000)[t]`` (the authors' ``etas``),
    clamped outside ``[t_min, t_max]``."""
    grid = make_grid(VP, sd.schedules.get(SCHEDULE), 10, "none")
    for eta in ((0.0, 0.4), (0.0, 0.2), (0.7, 0.1)):
        table = np.linspace(eta[0], eta[1], 1000)
        slv = EtaDDIM(eta=eta)
        for t in (0, 1, 19, 250, 500, 981, 999):
            assert abs(slv.eta_at(grid, float(t)) - table[t]) < 1e-15
        assert slv.eta_at(grid, 1e4) == eta[1] and slv.eta_at(grid, -5.0) == eta[0]
    assert EtaDDIM().eta_at(grid, 499.5) == 0.2


@pytest.mark.parametrize(("t", "t_prev"), [(981, 961), (501, 481), (41, 21)])
def test_step_is_diffusers_ddim_with_the_eta_of_its_timestep(gmm, t, t_prev):
    """One step from ``t`` to ``t_prev`` with noise ``n`` is ``DDIMScheduler.step(eps, t, x, eta=eta(t),
    variance_noise=n)`` (max relative error 6.7e-8, diffusers' float32 ``alphas_cumprod``); with a 0/1 mask,
    its step with ``eta(t)`` where the mask is 1 and with ``eta = 0`` where it is 0."""
    den = gmm.denoiser(VP)
    theirs = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    theirs.set_timesteps(50)
    grid = make_grid(VP, sd.schedules.Custom([float(t), float(t_prev)]), 1, "none")
    x = gmm.sample(8, generator=gen(0)) * VP.alpha(float(t)) + VP.sigma(float(t)) * torch.randn(
        8, 8, dtype=F64, generator=gen(1)
    )
    n = torch.randn(8, 8, dtype=F64, generator=gen(2))
    eta = 0.4 * t / 999
    eps = den(x, float(t)).eps

    def ref(e: float) -> torch.Tensor:
        return theirs.step(eps, t, x, eta=e, variance_noise=n).prev_sample

    mask = (torch.arange(8) < 3).to(F64)
    for m, expected in ((None, ref(eta)), (mask, torch.where(mask.bool(), ref(eta), ref(0.0)))):
        out = EtaDDIM(mask=m).step(Model(den, {}), x, 0, grid, {})
        assert isinstance(out, sd.solvers.base.Transition)
        ours = out.mean + out.std * n
        assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-6


# --- the inversion and the maps ---------------------------------------------------------------------------


def test_source_branch_is_the_ddim_inversion(gmm, x_0):
    """``xs`` are ``sd.invert(solver="ddim")``'s states bit for bit, ending at ``x_0`` itself (the source
    branch's exact reconstruction); the inversion and the source branch spend ``N`` evaluations each."""
    den = gmm.denoiser(VP)
    inv = sd.eta_invert(den, x_0, 12, SCHEDULE, generator=gen(0))
    assert torch.equal(inv.xs[-1], x_0) and len(inv.xs) == 13 and inv.steps == 12
    for k in (1, 5, 12):
        assert torch.equal(inv.xs[12 - k], sd.invert(den, x_0, k, "ddim", inv.times[12 - k :]))
    assert inv.nfe == 24
    guided = sd.guidance.CFG(den, den, 3.0)
    assert sd.eta_invert(den, x_0, 12, SCHEDULE, source=guided).nfe == 12 + 24


def test_eta_zero_is_ddim_inversion_then_ddim(gmm, x_0):
    """``eta = (0, 0)``: no noise (all maps 0), and the edit is DDIM sampling from DDIM's inversion."""
    den = gmm.denoiser(VP)
    inv = sd.eta_invert(den, x_0, 12, SCHEDULE, eta=(0.0, 0.0))
    assert all(not bool(z.any()) for z in inv.z)
    other = gmm.denoiser(VP, shape=(8,))
    x_T = sd.invert(den, x_0, 12, "ddim", SCHEDULE)
    assert torch.equal(
        sd.sample(other, **inv.sample_kwargs()), sd.sample(other, x_T, 12, "ddim", SCHEDULE, final="none")
    )


def test_each_map_is_the_candidate_nearest_the_optimal_noise(gmm, x_0):
    """Recomputed by hand: ``z* = (x_{i+1} - mu_i) / c_i`` from the source's DDIM step with ``eta(t_i)``, ten
    draws per step from the same generator, the nearest per row. More candidates bring the maps nearer
    ``z*`` (mean distance 3.07 / 2.01 / 1.07 at ``K`` = 1 / 10 / 1000 over the first 7 of 8 steps; at the
    last, ``eta = 0.05`` and ``|z*|`` is 250, out of any draw's reach, and ``c <= 0.05 sigma``)."""
    den = gmm.denoiser(VP)
    inv = sd.eta_invert(den, x_0, 8, SCHEDULE, generator=gen(3))
    g = gen(3)
    dists = []
    for i in range(8):
        a_next = inv.noise.grid.alpha[i + 1]
        sigma_det, c = ancestral_split(inv.noise.grid, i, inv.solver.eta_at(inv.noise.grid, inv.times[i]))
        best = (inv.xs[i + 1] - den(inv.xs[i], inv.times[i]).renoise(a_next, sigma_det)) / c
        draws = torch.stack([torch.randn(16, 8, dtype=F64, generator=g) for _ in range(10)])
        pick = (draws - best).pow(2).mean(2).argmin(0)
        assert torch.equal(inv.z[i], draws[pick, torch.arange(16)])
        if i < 7:
            dists.append(best)
    mean_dist = []
    for k in (1, 10, 1000):
        z = sd.eta_invert(den, x_0, 8, SCHEDULE, candidates=k, generator=gen(3)).z
        mean_dist.append(
            float(torch.stack([(a - b).norm(dim=1) for a, b in zip(z[:-1], dists, strict=True)]).mean())
        )
    assert mean_dist == sorted(mean_dist, reverse=True) and mean_dist[2] < 0.5 * mean_dist[0]


def test_reproducible_and_per_row(gmm, x_0):
    """The same seed gives the same maps; with one generator per row, row ``b``'s maps depend only on
    ``generator[b]``."""
    den = gmm.denoiser(VP)
    a, b = (sd.eta_invert(den, x_0, 6, SCHEDULE, generator=gen(4)) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.z, b.z, strict=True))
    rows = sd.eta_invert(den, x_0[:4], 6, SCHEDULE, generator=[gen(10 + r) for r in range(4)])
    two = sd.eta_invert(den, x_0[2:4], 6, SCHEDULE, generator=[gen(12), gen(13)])
    assert all(torch.equal(p[2:4], q) for p, q in zip(rows.z, two.z, strict=True))


def test_region_mask_injects_noise_only_inside():
    """On the two-Gaussian model (its classes' coordinates independent), a mask on the first three
    coordinates gives there the unmasked edit and elsewhere the ``eta = 0`` edit; the maps do not depend on
    the mask."""
    den, c0, _ = two_gaussians()
    x0 = c0.sample(32, generator=gen(1))
    mask = (torch.arange(8) < 3).to(F64)
    inv = sd.eta_invert(den, x0, 20, SCHEDULE, generator=gen(2), y=0)
    masked = sd.eta_invert(den, x0, 20, SCHEDULE, mask=mask, generator=gen(2), y=0)
    assert all(torch.equal(p, q) for p, q in zip(inv.z, masked.z, strict=True))
    full = sd.sample(den, **inv.sample_kwargs(), y=1)
    part = sd.sample(den, **masked.sample_kwargs(), y=1)
    ddim = sd.sample(den, **sd.eta_invert(den, x0, 20, SCHEDULE, eta=(0.0, 0.0), y=0).sample_kwargs(), y=1)
    assert (part[:, :3] - full[:, :3]).abs().max() < 1e-12
    assert (part[:, 3:] - ddim[:, 3:]).abs().max() < 1e-12
    assert (full[:, 3:] - ddim[:, 3:]).abs().max() > 0.1


def test_mask_is_read_on_the_host_once(gmm):
    """Whether a masked ``EtaDDIM`` draws noise is read from its mask at construction, not at every step (a
    device sync per step for a CUDA mask)."""
    den = gmm.denoiser(VP)
    mask = (torch.arange(8) < 3).to(F64)
    slv = EtaDDIM(mask=mask)
    reads = []

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if args and args[0] is mask and func in (torch.Tensor.gt, torch.Tensor.any):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Reads():
        sd.sample(den, torch.randn(4, 8, dtype=F64, generator=gen(0)), 10, slv, SCHEDULE, generator=gen(1))
    assert slv.stochastic and not reads
    assert not EtaDDIM(mask=torch.zeros(8, dtype=F64)).stochastic and not EtaDDIM(eta=(0.0, 0.0)).stochastic


def test_mask_is_moved_to_the_batch_once(gmm):
    """The mask is converted to the batch's device and dtype once per run's ``(device, dtype)``, not at every
    step (was a copy per masked step: for a CPU mask on a GPU batch, a host-to-device copy from pageable
    memory, which waits for the device, at every step)."""
    den = gmm.denoiser(VP)
    mask = (torch.arange(8) < 3).to(F64)
    slv = EtaDDIM(mask=mask)
    moves = []

    class Moves(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if args and args[0] is mask and func is torch.Tensor.to:
                moves.append(func)
            return func(*args, **(kwargs or {}))

    x_T = torch.randn(4, 8, dtype=torch.float32, generator=gen(0))
    with Moves():
        xs = [sd.sample(den, x_T, 10, slv, SCHEDULE, generator=gen(1)) for _ in range(2)]
    assert len(moves) == 1, len(moves)
    assert xs[0].dtype == torch.float32 and torch.equal(xs[0], xs[1])


# --- editing ----------------------------------------------------------------------------------------------


def edit_table(n: int = 256, steps: int = 50) -> dict[str, dict[str, float]]:
    """Class-0 samples of the two-Gaussian model edited to class 1 (``y = 0 -> 1``, unguided): structure
    (as in ``tests/test_ddpm_inversion.py``: 0 the whitened deviation kept, 1 none of it), the fraction in
    class 1, the mean distance to the source, the sliced Wasserstein distance to ``n`` exact class-1 samples
    and the distance to the source of the same run under the source condition (``recon``)."""
    den, c0, c1 = two_gaussians()
    x0 = c0.sample(n, generator=gen(1))
    exact = c1.sample(n, generator=gen(9))
    w0 = (x0 - c0.means[0]) / c0.variances[0].sqrt()
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for k in (1, 10, 1000):
        inv = sd.eta_invert(den, x0, steps, SCHEDULE, candidates=k, generator=gen(2), y=0)
        runs[f"eta_invert K={k}"] = {y: sd.sample(den, **inv.sample_kwargs(), y=y) for y in (0, 1)}
    ddpm = sd.ddpm_invert(den, x0, steps, "ddpm", SCHEDULE, generator=gen(2), y=0)
    runs["ddpm_invert"] = {y: sd.sample(den, **ddpm.sample_kwargs(), y=y) for y in (0, 1)}
    x_T = sd.invert(den, x0, steps, "ddim", SCHEDULE, y=0)
    runs["ddim invert"] = {y: sd.sample(den, x_T, steps, "ddim", SCHEDULE, final="none", y=y) for y in (0, 1)}
    fresh = torch.randn(n, 8, dtype=F64, generator=gen(3))
    fresh_edit = sd.sample(den, fresh, steps, "ddpm", SCHEDULE, final="none", generator=gen(4), y=1)
    runs["fresh noise"] = {1: fresh_edit}
    out = {}
    for method, xs in runs.items():
        x = xs[1]
        w1 = (x - c1.means[0]) / c1.variances[0].sqrt()
        out[method] = {
            "structure": float((w1 - w0).norm(dim=1).mean()) / math.sqrt(2 * 8),
            "in class 1": float((c1.log_prob(x) > c0.log_prob(x)).double().mean()),
            "to source": float((x - x0).norm(dim=1).mean()),
            "SW to class 1": sd.metrics.sliced_wasserstein(x, exact),
            "recon": float((xs[0] - x0).norm(dim=1).mean()) if 0 in xs else math.nan,
        }
    return out


def test_edit_trades_structure_for_the_target_law():
    """Measured (256 samples, 50 steps; SW of two exact samples 0.11): the paper's default (``eta`` 0 -> 0.4,
    10 candidates) keeps structure 0.30 (DDIM inversion 0.20, ``ddpm_invert`` 0.063, fresh 0.95) and lands
    nearer the class-1 law than DDIM inversion (SW 0.184 against 0.231); more candidates keep more (0.45 /
    0.30 / 0.20 at K = 1 / 10 / 1000) and reconstruct better (1.32 / 0.81 / 0.39 from ``x_0`` under the
    source condition; DDIM inversion 0.14, ``ddpm_invert`` 6e-19). Every edit lands in class 1."""
    t = edit_table()
    assert all(row["in class 1"] == 1.0 for row in t.values())
    eta = [t[f"eta_invert K={k}"] for k in (1, 10, 1000)]
    assert [r["structure"] for r in eta] == sorted((r["structure"] for r in eta), reverse=True)
    assert [r["recon"] for r in eta] == sorted((r["recon"] for r in eta), reverse=True)
    assert 0.25 < eta[1]["structure"] < 0.35 and 0.6 < eta[1]["recon"] < 1.0
    assert eta[1]["SW to class 1"] < 0.85 * t["ddim invert"]["SW to class 1"]
    assert t["ddpm_invert"]["structure"] < t["ddim invert"]["structure"] < eta[1]["structure"]
    assert eta[1]["structure"] < 0.4 * t["fresh noise"]["structure"]


# --- bad input --------------------------------------------------------------------------------------------


def test_refuses_bad_arguments(gmm, x_0):
    den = gmm.denoiser(VP)
    cases = [
        ({"eta": 0.4}, r"eta_invert: eta must be a pair \(eta at the clean end, eta at the noise end\)"),
        ({"eta": (0.0, -0.1)}, r"eta_invert: eta\[1\] must be a finite number >= 0"),
        ({"eta": (math.nan, 0.4)}, r"eta_invert: eta\[0\] must be a finite number"),
        ({"candidates": 0}, r"eta_invert: candidates must be an integer >= 1"),
        ({"steps": 0}, r"eta_invert: steps must be an integer >= 1"),
        ({"mask": torch.full((8,), 1.5, dtype=F64)}, r"eta_invert: mask must hold values in \[0, 1\]"),
        ({"mask": [1.0] * 8}, r"eta_invert: mask must be None or a non-empty floating torch.Tensor"),
        ({"mask": torch.ones(3, dtype=F64)}, r"eta_invert: mask of shape \(3,\) must broadcast to x_0's"),
        ({"generator": [gen(0)] * 3}, r"eta_invert: generator must be None, one torch.Generator or a list"),
        ({"final": "zero"}, r"eta_invert: final is an argument of sample, not of eta_invert"),
        ({"solver": "ddim"}, r"eta_invert: solver is an argument of sample, not of eta_invert"),
        ({"source": "den"}, r"eta_invert: source must be"),
        ({"source": gmm.denoiser(sd.RectifiedFlow())}, r"eta_invert: source has process RectifiedFlow"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sd.eta_invert(den, x_0, **kwargs)
    with pytest.raises(ValueError, match=r"eta_invert: x_0 must be batched"):
        sd.eta_invert(den, x_0[0])
    # x_0 is checked before the mask's shape and the generators' count are read from it
    with pytest.raises(ValueError, match=r"eta_invert: x_0 must be a torch.Tensor, got list"):
        sd.eta_invert(den, x_0.tolist(), mask=torch.ones(8, dtype=F64))
    with pytest.raises(ValueError, match=r"eta_invert: x_0 must be batched"):
        sd.eta_invert(den, x_0[0, 0])
    narrow = EtaDDIM(mask=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"EtaDDIM: mask of shape \(3,\) must broadcast to the batch"):
        sd.sample(den, torch.randn(4, 8, dtype=F64, generator=gen(0)), 4, narrow)
    with pytest.raises(ValueError, match=r"EtaDDIM: eta\[0\] must be a finite number >= 0"):
        EtaDDIM(eta=(-1.0, 0.0))
    inv = sd.eta_invert(den, x_0, 6, SCHEDULE)
    # karras's 6 steps on this process also run from 999 to 0: the message names the first node that differs
    with pytest.raises(ValueError, match=r"0\] \(its node 1 at t = 868\.4\d+, the maps. at 832\.5\)"):
        sd.sample(den, **{**inv.sample_kwargs(), "schedule": "karras"})
    with pytest.raises(ValueError, match=r"sample: generator replays noise maps made for solver EtaDDIM"):
        sd.sample(den, **{**inv.sample_kwargs(), "solver": EtaDDIM(eta=(0.0, 0.2))})


if __name__ == "__main__":
    for method, row in edit_table().items():
        print(f"{method:18s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))
