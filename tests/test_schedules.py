"""Schedules against their formulas, the published AYS lists and diffusers' timestep spacings."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff.schedules import AYS, LCM, Custom, Karras, Leading, Linspace, Trailing

F64 = torch.float64
N = 1000

PROCESSES = {
    "sd": sd.VP.scaled_linear(),
    "vp_zero_snr": sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, N, dtype=F64) ** 2, rescale_zero_snr=True
    ),
    "vp_linear": sd.VP.linear(),
    "vp_cosine": sd.VP.cosine(),
    "ve": sd.VE(),
    "edm": sd.EDM(),
    "rectified_flow": sd.RectifiedFlow(),
}
DISCRETE_ONLY = {"linspace", "leading", "trailing", "lcm"}
# schedules whose last node is t_min by definition
ENDS_AT_T_MIN = {"time_uniform", "logsnr_uniform", "exponential", "karras", "linspace"}
ENDS_AT_T_MIN |= {"polyexponential", "kl_optimal"}
# schedules of their own noise levels: vp's (refused where the process's range does not hold them) and
# laplace's quantiles (clamped to the range)
OWN_LEVELS = {"vp", "laplace"}

SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Sabour et al. 2024
SDXL = [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]
AYS_SIGMAS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
SD_CONFIG = {
    "num_train_timesteps": N,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _ratio(p: sd.Process, t: torch.Tensor) -> torch.Tensor:
    return p.sigma(t) / p.alpha(t)


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("name", sd.schedules.available())
def test_contract(name, kind):
    """n nodes, strictly decreasing, inside the range; t_max first; t_min last where defined."""
    p = PROCESSES[kind]
    sched = sd.schedules.get(name)
    discrete = isinstance(p, sd.processes.VPDiscrete)
    if name in DISCRETE_ONLY and not discrete:
        with pytest.raises(ValueError, match=r"VP\.discrete"):
            sched(p, 5)
        return
    if name == "vp" and kind not in ("vp_linear", "rectified_flow"):  # sigma/alpha from 0.0105 to 152
        with pytest.raises(ValueError, match=r"outside the range of"):
            sched(p, 5)
        return
    for n in (1, 2, 3, 7, 10, 25):
        t = sched(p, n)
        assert t.dtype == F64 and t.shape == (n,)
        assert bool((t[1:] < t[:-1]).all())
        assert p.t_min - 1e-12 <= float(t.min()) and float(t.max()) <= p.t_max + 1e-12
        if name == "leading":  # by definition: k * (N // n) + offset
            assert float(t[-1]) == 0.0
            continue
        if name in OWN_LEVELS and float(_ratio(p, t[:1])) < float(_ratio(p, p.t_max)) * (1 - 1e-9):
            continue  # its own first level lies below the process's s_max (laplace: 317 on rectified flow)
        # exactly: the ends are set, not recovered through t_of_lam (EDM's lam round trip is 1 ulp off)
        assert float(t[0]) == p.t_max, (name, n, t[0])
        if name in ENDS_AT_T_MIN and n > 1:
            assert float(t[-1]) == p.t_min, (name, n, t[-1])


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_uniform_grids(kind):
    p = PROCESSES[kind]
    n = 12
    t = sd.schedules.get("time_uniform")(p, n)
    assert torch.allclose(t, torch.linspace(p.t_max, p.t_min, n, dtype=F64), rtol=0, atol=1e-12)
    for name in ("logsnr_uniform", "exponential"):
        lam = p.lam(sd.schedules.get(name)(p, n))
        ref = torch.linspace(float(p.lam(p.t_max)), float(p.lam(p.t_min)), n, dtype=F64)
        assert float((lam - ref).abs().max()) < 1e-9, name


def _karras(smin: float, smax: float, n: int, rho: float = 7.0) -> np.ndarray:
    """k-diffusion's ``get_sigmas_karras`` (Karras et al. 2022, Eq. 5), without the final zero."""
    ramp = np.linspace(0, 1, n)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_is_kdiffusion_formula(kind, rho):
    p = PROCESSES[kind]
    smin, smax = float(_ratio(p, p.t_min)), float(_ratio(p, p.t_max))
    for n in (2, 10, 33):
        ours = _ratio(p, Karras(rho=rho)(p, n)).numpy()
        assert np.allclose(ours, _karras(smin, smax, n, rho), rtol=1e-10, atol=0)


def test_karras_explicit_range_on_edm():
    t = Karras(sigma_min=0.002, sigma_max=80.0)(sd.EDM(), 18)
    assert np.allclose(t.numpy(), _karras(0.002, 80.0, 18), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 / torch __array__ inside diffusers
def test_karras_matches_diffusers_euler():
    """Euler's ``use_karras_sigmas`` timesteps: float64 through its own methods, and float32 as shipped."""
    diffusers = pytest.importorskip("diffusers")
    p = PROCESSES["sd"]
    sched = diffusers.EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    ac = p.alphas_cumprod.numpy()
    sigmas = ((1 - ac) / ac) ** 0.5
    for n in (5, 10, 25):
        ours = Karras()(p, n).numpy()
        k = sched._convert_to_karras(in_sigmas=torch.from_numpy(sigmas[::-1].copy()), num_inference_steps=n)
        ref64 = np.array([sched._sigma_to_t(s, np.log(sigmas)) for s in np.asarray(k)]).ravel()
        assert np.abs(ours - ref64).max() < 1e-9
        sched.set_timesteps(n)
        assert np.abs(ours - sched.timesteps.double().numpy()).max() < 2e-3  # float32 (measured 1.3e-3)


@pytest.mark.parametrize(("model", "published"), [("sd15", SD15), ("sdxl", SDXL)])
def test_ays_published_lists(model, published):
    p = PROCESSES["sd"]
    assert AYS(model)(p, 10).tolist() == [float(v) for v in published]
    diffusers = pytest.importorskip("diffusers")
    key = {"sd15": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps"}[model]
    assert diffusers.schedulers.AysSchedules[key] == published


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ays_interpolation(model):
    """Log-linear in sigma over a uniform index: monotone, starts at 999, and at n = 20 the published
    nodes sit at the even positions with the odd ones at the midpoints in lam."""
    p = PROCESSES["sd"]
    published = torch.tensor(SD15 if model == "sd15" else SDXL, dtype=F64)
    for n in (4, 7, 15, 20, 32):
        t = AYS(model)(p, n)
        assert t.shape == (n,) and bool((t[1:] < t[:-1]).all())
        assert abs(float(t[0]) - 999) < 1e-9
    t20 = AYS(model)(p, 20)
    assert float((t20[::2] - published).abs().max()) < 1e-9
    lam = p.lam(torch.cat([published, torch.zeros(1, dtype=F64)]))
    mid = 0.5 * (lam[:-1] + lam[1:])
    assert float((p.lam(t20[1::2]) - mid).abs().max()) < 1e-10


def test_ays_other_processes_use_sigma_list():
    """The published sigma list, its first node moved up to t_max (x_T is the noise of t_max: EDM's
    80 z was taken for noise at 14.6; on this mixture 2M at 20 steps was 0.77 from the exact answer then,
    0.014 now)."""
    p = sd.EDM()
    t = AYS("sd15")(p, 10)
    ref = [80.0, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152]
    assert np.allclose(t.numpy(), ref, rtol=1e-12, atol=0)
    gmm = sd.toy.default_benchmark_mixture(dim=4, components=3)
    x_T = 80 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gmm.reference_ode(x_T, p, p.t_max, p.t_min, denoise=True)
    assert sd.metrics.relative_rmse(sd.sample(gmm.denoiser(p), x_T, 20, "dpmpp_2m", "ays"), exact) < 0.03


@pytest.mark.parametrize("n", [13, 20])
def test_ays_on_other_processes_interpolates_the_moved_list(n):
    """Past 10 nodes the interpolation runs over the list whose first node was moved up to t_max: the
    nodes between it and the published second one are log-linear from ``s(t_max)`` (EDM: 80), not from
    the list's own 14.615 (numpy's interp of log sigma over a uniform index, the paper's rule)."""
    p = sd.EDM()
    sigmas = [p.t_max, *AYS_SIGMAS_SD15[1:]]  # EDM: s = sigma/alpha = t
    ref = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, 11), np.log(sigmas)))[:-1]
    assert np.allclose(AYS("sd15")(p, n).numpy(), ref, rtol=1e-12, atol=0)


def _diffusers_timesteps(cls, spacing: str, offset: int, n: int) -> np.ndarray:
    sched = cls(**SD_CONFIG, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    return sched.timesteps.double().numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("spacing", "schedule"), [("linspace", Linspace), ("leading", Leading), ("trailing", Trailing)]
)
@pytest.mark.parametrize("offset", [0, 1])
def test_discrete_spacings_match_diffusers(spacing, schedule, offset):
    """DDIM/DDPM (and Euler for leading/trailing) evaluate the net at exactly these timesteps.

    Conventions checked: only ``leading`` adds ``steps_offset``. Euler's ``linspace`` is not
    rounded (fractional timesteps, with sigma interpolated linearly in sigma) and is not compared.
    diffusers' ``trailing`` returns ``n + 1`` timesteps for some ``n`` (61, 103, ... for 1000
    training steps: ``np.arange`` overshoots) with a spurious last timestep ``-1``; we return
    ``n`` and match the first ``n``. At ``n = 1`` diffusers' ``linspace`` gives ``[0]`` (a lone
    evaluation at the clean end); ours gives ``[999]``.
    """
    diffusers = pytest.importorskip("diffusers")
    p = PROCESSES["sd"]
    classes = [diffusers.DDIMScheduler, diffusers.DDPMScheduler]
    if spacing != "linspace":
        classes.append(diffusers.EulerDiscreteScheduler)
    if spacing == "trailing":  # the multistep schedulers' linspace and leading space n + 1 points
        classes += [diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler]
    extra = 0
    for n in range(2 if spacing == "linspace" else 1, 101):
        ours = schedule(steps_offset=offset)(p, n).numpy()
        for cls in classes:
            ref = _diffusers_timesteps(cls, spacing, offset, n)
            if spacing == "trailing" and ref.size == n + 1:
                assert ref[-1] == -1
                ref, extra = ref[:n], extra + 1
            assert np.array_equal(ours, ref), (cls.__name__, n, ours[:5], ref[:5])
    if spacing == "trailing":
        assert extra == 5  # n = 61 (within 1..100), for DDIM, DDPM, Euler, DPM-Solver and UniPC


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("spacing", "schedule"), [("linspace", Linspace), ("leading", Leading), ("trailing", Trailing)]
)
def test_discrete_spacings_of_mean_reverting_processes(spacing, schedule):
    """``MeanReverting.discrete`` processes (time = the integer step, as for ``VP.discrete``) were refused
    by linspace / leading / trailing. Their trained steps are ``1, ..., T`` where ``thetabar_0 = 0`` (IR-SDE,
    ``MeanReverting.cosine(T)``: step 0 is the clean image) and ``0, ..., N - 1`` otherwise: the nodes are
    DDIMScheduler's timesteps for ``num_train_timesteps = T`` (``N``) shifted up by the first step, for
    ``n = 1 .. N_train`` and ``steps_offset`` 0 and 1 (trailing's spurious ``n + 1``-th timestep -1 dropped,
    as above; leading's timestep ``N_train`` at ``n = N_train``, offset 1, is refused, as for VP.discrete);
    ``linspace`` with ``n = T`` is IR-SDE's own loop ``T, ..., 1``."""
    diffusers = pytest.importorskip("diffusers")
    irsde = sd.MeanReverting.cosine(100, stationary_std=10 / 255)
    shifted = sd.MeanReverting.discrete(torch.linspace(0.01, 3.0, 40, dtype=F64))  # thetabar_0 > 0
    for p, first, m in ((irsde, 1, 100), (shifted, 0, 40)):
        assert (p.t_min, p.t_max) == (first, first + m - 1)
        for offset in (0, 1):
            for n in range(1, m + 1):
                ref = diffusers.DDIMScheduler(
                    num_train_timesteps=m, timestep_spacing=spacing, steps_offset=offset
                )
                ref.set_timesteps(n)
                want = ref.timesteps.double().numpy()[:n]
                if spacing == "linspace" and n == 1:
                    want = np.array([m - 1.0])  # diffusers: [0], a lone evaluation at the clean end
                if want[0] > m - 1:  # leading at n = m with steps_offset 1: timestep m, out of range
                    with pytest.raises(ValueError, match=r"times must lie in the process range"):
                        schedule(steps_offset=offset)(p, n)
                    continue
                assert np.array_equal(schedule(steps_offset=offset)(p, n).numpy(), first + want), (m, n)
    assert Linspace()(irsde, 100).tolist() == [float(k) for k in range(100, 0, -1)]
    assert Trailing()(irsde, 10).tolist() == [100.0 - 10 * k for k in range(10)]
    assert Leading(steps_offset=1)(irsde, 10).tolist() == [92.0 - 10 * k for k in range(10)]


def test_integer_spacings_and_ays_say_why_they_refuse():
    """A continuous-time process has no integer steps: the message names the processes that have them and
    the schedules to use instead; AYS's sigma list outside a process's range names that range."""
    for other in (sd.VP.linear(), sd.EDM(), sd.RectifiedFlow(), sd.MeanReverting()):
        with pytest.raises(ValueError) as err:
            Trailing()(other, 4)
        assert str(err.value) == (
            "schedule 'trailing' needs a process of a model trained on integer steps (VP.discrete, "
            "VP.scaled_linear, diffusers' VP configs; MeanReverting.discrete / .cosine), got "
            f"{other!r}; for a continuous-time process use time_uniform, logsnr_uniform or karras"
        )
    p = sd.MeanReverting.cosine(100, stationary_std=10 / 255)  # sigma/alpha up to 7.84 < 14.6
    with pytest.raises(ValueError) as err:
        sd.schedules.AYS()(p, 10)
    assert str(err.value) == (
        f"AYS('sd15') spans sigma/alpha in [0.029, 14.615], outside the range of {p!r} ([0.0007366, "
        "7.843]); use a schedule spaced over the process's own range (karras, logsnr_uniform, time_uniform)"
    )
    # where the range covers the list, AYS applies (the sigma list, its first node moved to t_max)
    t = sd.schedules.AYS()(sd.MeanReverting.cosine(100), 10)
    assert float(t[0]) == 100.0
    np.testing.assert_allclose(_ratio(sd.MeanReverting.cosine(100), t[1:]).numpy(), AYS_SIGMAS_SD15[1:10])


def test_trailing_ties_round_as_diffusers():
    """n = 48: 1000 - 3 * 1000/48 = 937.5 in exact arithmetic; numpy's arange gives 937.4999..."""
    t = Trailing()(PROCESSES["sd"], 48)
    assert t[:4].tolist() == [999.0, 978.0, 957.0, 936.0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_linspace_ties_round_as_diffusers():
    """999 training steps, n = 29: node 7 is 998 * 21 / 28 = 748.5 in exact arithmetic; numpy's increasing
    linspace (diffusers) gives 748.5000...1, rounded to 749; torch's decreasing one 748.4999..., 748. With
    1000 training steps such ties first differ at n = 103."""
    p = sd.VP.scaled_linear(num_train_timesteps=999)
    assert Linspace()(p, 29)[6:9].tolist() == [784.0, 749.0, 713.0]
    diffusers = pytest.importorskip("diffusers")
    for m, n in ((999, 29), (999, 57), (1000, 103), (1000, 199), (1000, 741)):  # 1000 steps: from n = 103
        sched = diffusers.DDIMScheduler(num_train_timesteps=m, timestep_spacing="linspace")
        sched.set_timesteps(n)
        ours = Linspace()(sd.VP.scaled_linear(num_train_timesteps=m), n)
        assert ours.tolist() == sched.timesteps.double().tolist()


def test_linspace_n1_and_leading_formula():
    p = PROCESSES["sd"]
    assert Linspace()(p, 1).tolist() == [999.0]
    assert Leading(steps_offset=1)(p, 10).tolist() == [901.0 - 100 * k for k in range(10)]


@pytest.mark.parametrize("cls", ["LCMScheduler", "TCDScheduler"])
def test_lcm_matches_diffusers(cls):
    """LCM(original_steps, strength) gives LCMScheduler's and TCDScheduler's timesteps (set_timesteps(n,
    strength=...), original_inference_steps from the config) at every step count, and refuses where they do
    (n above int(original_steps * strength), original_steps above N): checked for N in (1000, 999, 768),
    original_steps in (1, 8, 50, 100, N), strength in (1, 0.75, 0.3), n up to 60; 1000, 50: 999, 759, 499,
    259 at 4 steps; 999, 499 at 2 (the distillation timesteps 20 j - 1)."""
    diffusers = pytest.importorskip("diffusers")
    checked = refused = 0
    for m in (1000, 999, 768):
        p = sd.VP.scaled_linear(num_train_timesteps=m)
        for original in (1, 8, 50, 100, m):
            for strength in (1.0, 0.75, 0.3):
                sched = getattr(diffusers, cls)(num_train_timesteps=m, original_inference_steps=original)
                for n in (*range(1, 11), 25, 49, 50, 51, 60):
                    try:
                        sched.set_timesteps(n, strength=strength)
                        ref = sched.timesteps.double().tolist()
                    except ValueError:
                        with pytest.raises(ValueError, match=r"LCM\(original_steps="):
                            LCM(original, strength)(p, n)
                        refused += 1
                        continue
                    assert LCM(original, strength)(p, n).tolist() == ref, (m, original, strength, n)
                    checked += 1
    assert (checked, refused) == (411, 264)
    p = PROCESSES["sd"]
    assert LCM()(p, 4).tolist() == [999.0, 759.0, 499.0, 259.0]
    assert LCM(strength=0.5)(p, 4).tolist() == [499.0, 379.0, 259.0, 139.0]
    assert LCM(original_steps=25)(p, 4).tolist() == [999.0, 759.0, 519.0, 279.0]
    assert sd.schedules.get("lcm")(p, 2).tolist() == [999.0, 499.0]


def test_lcm_clean_node_ends_at_timestep_0():
    """``clean_node=True``: the ``n - 1``-step nodes, then ``t_min`` (TCDScheduler's last step, to
    timestep 0): with ``final="none"`` the grid of ``steps`` steps is ``LCM()``'s ``steps`` nodes and 0."""
    p = PROCESSES["sd"]
    assert LCM(clean_node=True)(p, 5).tolist() == [999.0, 759.0, 499.0, 259.0, 0.0]
    grid = sd.solvers.make_grid(p, LCM(clean_node=True), 4, "none")
    assert grid.t == [*LCM()(p, 4).tolist(), 0.0] and not grid.clean_end
    with pytest.raises(ValueError, match=r"clean_node=True\): needs at least 2 nodes .*got 1"):
        LCM(clean_node=True)(p, 1)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"original_steps": 0}, "LCM: original_steps must be an integer >= 1, got 0"),
        ({"original_steps": 50.0}, "LCM: original_steps must be an integer >= 1, got 50.0"),
        ({"strength": 0.0}, "LCM: strength must be a finite number in (0, 1], got 0.0"),
        ({"strength": 1.5}, "LCM: strength must be a finite number in (0, 1], got 1.5"),
        ({"clean_node": 1}, "LCM: clean_node must be True or False, got 1"),
    ],
)
def test_lcm_rejects_bad_options(kwargs, words):
    with pytest.raises(ValueError) as err:
        LCM(**kwargs)
    assert words in str(err.value), str(err.value)


def test_lcm_names_what_it_cannot_take(gmm):
    """Too many steps for the distillation timesteps left (``strength``), ``original_steps`` above the
    training steps, a process without integer timesteps: each a ValueError naming the schedule."""
    p = PROCESSES["sd"]
    with pytest.raises(
        ValueError,
        match=r"LCM\(original_steps=50, strength=1, clean_node=False\): 51 nodes asked, "
        r"more than the int\(original_steps \* strength\) = 50 distillation timesteps",
    ):
        LCM()(p, 51)
    with pytest.raises(ValueError, match=r"strength=0.3, .*: 16 nodes asked, .* = 15 distillation"):
        LCM(strength=0.3)(p, 16)
    # strength below 1 / original_steps keeps no timestep: the message asked for "at most 0" steps
    with pytest.raises(
        ValueError,
        match=r"strength=0\.01, .*: 1 nodes asked, .* = 0 distillation timesteps they are taken from; "
        r"it keeps none: raise original_steps \(to 100 or above, at most num_train_timesteps = 1000\), or "
        r"raise strength \(to 1 / original_steps = 0\.02 or above\)$",
    ):
        LCM(strength=0.01)(p, 1)
    # each way out only where it is one: strength is at most 1 and original_steps at most num_train_timesteps
    # (before, 1000 nodes were told to raise strength "to 1000 / original_steps = 20 or above")
    with pytest.raises(
        ValueError,
        match=r": 1000 nodes asked, .* = 50 distillation timesteps they are taken from; ask for at most 50 "
        r"\(steps\), or raise original_steps \(to 1000 or above, at most num_train_timesteps = 1000\)$",
    ):
        LCM()(p, 1000)
    with pytest.raises(ValueError, match=r": 1001 nodes asked, .*; ask for at most 50 \(steps\)$"):
        LCM()(p, 1001)
    with pytest.raises(
        ValueError, match=r"original_steps must be at most the process's num_train_timesteps = 1000"
    ):
        LCM(original_steps=1001)(p, 4)
    accepted = r"schedule 'lcm' needs a VP\.discrete process \(integer timesteps: VP\.discrete, "
    for other in (sd.VP.linear(), sd.VP.cosine(), sd.EDM(), sd.RectifiedFlow()):
        with pytest.raises(ValueError, match=accepted + r".*got " + re.escape(repr(other))):
            LCM()(other, 4)
    with pytest.raises(ValueError, match=accepted):
        sd.sample(gmm.denoiser(sd.EDM()), torch.zeros(1, gmm.dim), 4, "lcm", "lcm")


def test_custom_validates():
    p = PROCESSES["sd"]
    assert Custom([999.0, 500.5, 0.0])(p, 3).tolist() == [999.0, 500.5, 0.0]
    with pytest.raises(ValueError, match="nodes"):
        Custom([999.0, 500.0])(p, 3)
    with pytest.raises(ValueError, match="decreasing"):
        Custom([999.0, 999.0, 10.0])(p, 3)
    with pytest.raises(ValueError, match="decreasing"):
        Custom([10.0, 500.0])(p, 2)
    with pytest.raises(ValueError, match="range"):
        Custom([1000.0, 10.0])(p, 2)
    with pytest.raises(ValueError, match="range"):
        Custom([80.0, 0.001])(sd.EDM(), 2)
    with pytest.raises(ValueError):
        Custom([])


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        sd.schedules.get("karas")
    names = sd.schedules.available()
    assert set(names) >= {"time_uniform", "logsnr_uniform", "exponential", "karras", "ays"} | DISCRETE_ONLY
    for name in names:
        assert name in str(err.value)
    assert sd.schedules.get(Karras(rho=5)).rho == 5.0


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "10"])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        sd.schedules.get("karras")(sd.EDM(), steps)


@pytest.mark.parametrize("name", sd.schedules.available())
@pytest.mark.parametrize("process", ["vp", None, 1.0])
def test_a_process_that_is_no_process_is_named(name, process):
    """It raised an AttributeError from inside the schedule's arithmetic."""
    with pytest.raises(ValueError, match="process must be a steerdiff Process"):
        sd.schedules.get(name)(process, 5)
    with pytest.raises(ValueError, match="process must be a steerdiff Process"):
        sd.solvers.make_grid(process, sd.schedules.get(name), 5)


@pytest.mark.parametrize("schedule", ["karras", None, [0.9, 0.5]])
def test_make_grid_names_a_schedule_that_is_no_schedule(schedule):
    """It called the string or list and raised a bare TypeError."""
    with pytest.raises(ValueError, match="make_grid: schedule must be a steerdiff Schedule"):
        sd.solvers.make_grid(sd.EDM(), schedule, 5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="rho"):
        Karras(rho=0)
    with pytest.raises(ValueError, match="KarrasCapped: max_nodes"):  # named KarrasJump before
        sd.schedules.KarrasCapped(max_nodes=0)
    with pytest.raises(ValueError, match="sd15"):
        AYS("sd3")
    with pytest.raises(ValueError, match="unknown model=\\['sd15'\\]"):  # was TypeError: unhashable type
        AYS(["sd15"])
    with pytest.raises(ValueError, match="Karras: sigma_min must be a finite number > 0"):  # was RuntimeError
        Karras(sigma_min=torch.tensor([0.1, 0.2]))


def test_ays_rejects_a_process_that_does_not_cover_its_sigmas():
    p = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 50, dtype=F64))  # sigma/alpha_max ~ 0.8
    with pytest.raises(ValueError, match=r"AYS\('sd15'\) spans sigma/alpha"):
        AYS("sd15")(p, 10)


def test_karras_jump_and_capped_options():
    """KarrasCapped takes KarrasJump's arguments by position too (a TypeError before), and the repr of
    either names sigma_min / sigma_max where given (two different schedules printed alike)."""
    p = sd.VP.scaled_linear()
    capped = sd.schedules.KarrasCapped(5.0, None, None, 12)
    assert (capped.rho, capped.max_nodes, capped.sigma_top, capped.sigma_floor) == (5.0, 12, 30.0, 0.03)
    assert torch.equal(capped(p, 8), sd.schedules.KarrasCapped(rho=5.0, max_nodes=12)(p, 8))
    assert repr(sd.schedules.KarrasJump(sigma_min=0.5, sigma_max=10)) == (
        "KarrasJump(rho=7, sigma_min=0.5, sigma_max=10, max_nodes=15, sigma_top=None, sigma_floor=None)"
    )


def test_steps_accepts_numpy_integers():
    p = sd.VP.scaled_linear()
    assert Karras()(p, np.int64(7)).shape == (7,)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Karras()(p, 7.0)


@pytest.mark.parametrize("cls", [Karras, sd.schedules.KarrasJump])
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sigma_min": 0.0}, ["sigma_min", "> 0", "0.0", "infinite log-SNR", "final='zero'"]),
        ({"sigma_min": -1.0}, ["sigma_min", "> 0", "-1.0"]),
        ({"sigma_max": math.inf}, ["sigma_max", "finite", "inf"]),
        ({"sigma_max": math.nan}, ["sigma_max", "finite", "nan"]),
        ({"rho": math.nan}, ["rho", "finite number > 0", "nan"]),
        ({"rho": 0}, ["rho", "> 0", "got 0"]),
        ({"rho": -7.0}, ["rho", "> 0", "-7.0"]),
        ({"rho": None}, ["rho", "> 0", "None"]),
        ({"rho": True}, ["rho", "True"]),
        ({"rho": "7"}, ["rho", "'7'"]),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, ["sigma_max > sigma_min", "sigma_min=2.0", "sigma_max=1.0"]),
        ({"sigma_min": 1.0, "sigma_max": 1.0}, ["sigma_max > sigma_min"]),
    ],
)
def test_karras_rejects_bad_arguments(cls, kwargs, words):
    # before: sigma_min=0 was silently replaced by the process minimum, -1 gave a complex-cast
    # warning and "non-decreasing times", rho=nan was accepted
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    msg = str(err.value)
    assert cls.__name__ in msg and all(w in msg for w in words), msg


def test_karras_checks_a_one_sided_range_against_the_process():
    p = sd.VP.scaled_linear()  # sigma/alpha in [0.0292, 14.6]
    with pytest.raises(ValueError, match=r"sigma_max > sigma_min.*sigma_min=0.0291.*sigma_max=0.01"):
        Karras(sigma_max=0.01)(p, 5)
    with pytest.raises(ValueError, match=r"sigma_max > sigma_min.*sigma_min=20.*sigma_max=14.6"):
        Karras(sigma_min=20.0)(p, 5)
    # an explicit sigma_min is honoured, the default range fills the other end
    t = Karras(sigma_min=0.1)(p, 6)
    assert np.allclose(_ratio(p, t).numpy(), _karras(0.1, float(_ratio(p, p.t_max)), 6), rtol=1e-10, atol=0)
    assert float(_ratio(p, t[-1])) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize(
    ("times", "words"),
    [
        # before: a torch TypeError, or "gave non-decreasing times ... (too many steps for this spacing?)"
        ("abc", ["Custom", "times", "1-d array of real numbers", "'abc'"]),
        ([[999.0, 0.0]], ["times", "1-d", "(1, 2)"]),
        (999.0, ["times", "1-d", "999.0"]),
        ([999.0, None], ["times", "real numbers"]),
        ([True, False], ["times", "real numbers", "bool"]),
        ([999.0, math.nan, 0.0], ["times", "finite", "nan"]),
        ([1, 2, 3], ["times", "strictly decreasing", "times[0] = 1 <= times[1] = 2"]),
        ([999, 999, 0], ["times", "strictly decreasing", "times[0] = 999 <= times[1] = 999"]),
    ],
)
def test_custom_names_bad_times_at_construction(times, words):
    with pytest.raises(ValueError) as err:
        Custom(times)
    msg = str(err.value)
    assert all(w in msg for w in words), msg


def test_custom_says_which_steps_its_grid_takes():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64), torch.ones(1))
    den, x_T = gmm.denoiser(PROCESSES["sd"]), torch.randn(2, 2, dtype=F64)
    custom = Custom([999.0, 600.0, 300.0, 0.0])
    for final, steps in (("zero", 10), ("none", 9)):
        with pytest.raises(ValueError) as err:
            sd.sample(den, x_T, steps=steps, schedule=custom, final=final)
        msg = str(err.value)
        assert msg.startswith("sample: schedule has 4 times: "), msg  # the entry point named
        assert "steps must equal len(times) = 4 with final='zero'" in msg, msg
        assert "len(times) - 1 = 3 with final='none'" in msg, msg
        assert f"got steps={steps} with final={final!r}" in msg, msg
    # the counts it names run
    assert sd.sample(den, x_T, steps=4, schedule=custom).shape == (2, 2)
    assert sd.sample(den, x_T, steps=3, schedule=custom, final="none").shape == (2, 2)


@pytest.mark.parametrize("cls", [Karras, sd.schedules.KarrasJump])
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sigma_max": 1e6}, ["sigma_max=1e+06", "outside the range", "[0.0291", "14.61"]),
        ({"sigma_min": 1e-9}, ["sigma_min=1e-09", "outside the range", "[0.0291", "14.61"]),
        ({"sigma_min": 1e-9, "sigma_max": 1.0}, ["sigma_min=1e-09", "outside the range"]),
    ],
)
def test_karras_names_a_sigma_outside_the_process_range(cls, kwargs, words):
    # before: "gave non-decreasing times ... (too many steps for this spacing?)" (times clamped to the range)
    with pytest.raises(ValueError) as err:
        cls(**kwargs)(PROCESSES["sd"], 5)
    msg = str(err.value)
    assert cls.__name__ in msg and all(w in msg for w in words), msg


def test_karras_takes_a_sigma_at_the_range_end_typed_to_a_few_digits():
    p = PROCESSES["sd"]  # sigma/alpha in [0.029167..., 14.6146...]
    s_min, s_max = float(_ratio(p, p.t_min)), float(_ratio(p, p.t_max))
    t = Karras(sigma_min=0.02916, sigma_max=14.615)(p, 8)  # 2.5e-4 and 2.5e-5 outside: round-off
    assert float(t[0]) == p.t_max and float(t[-1]) == p.t_min
    inside = _ratio(p, t[1:-1]).numpy()
    assert np.allclose(inside, _karras(0.02916, 14.615, 8)[1:-1], rtol=1e-9, atol=0)
    assert s_min > 0.02916 and s_max < 14.615  # both just outside the range


@pytest.mark.parametrize("cls", [Leading, Linspace, Trailing])
@pytest.mark.parametrize("offset", [math.nan, 2.5, -1, "1", True, None])
def test_steps_offset_must_be_an_integer_at_least_zero(cls, offset):
    # before: "cannot convert float NaN to integer"; 2.5 was truncated to 2
    with pytest.raises(ValueError) as err:
        cls(steps_offset=offset)
    msg = str(err.value)
    assert f"{cls.__name__}: steps_offset must be an integer >= 0, got {offset!r}" in msg, msg


def test_steps_offset_accepts_numpy_integers():
    p = PROCESSES["sd"]
    assert Leading(steps_offset=np.int64(1))(p, 10).tolist() == Leading(steps_offset=1)(p, 10).tolist()
    assert Leading(steps_offset=np.int64(1)).steps_offset == 1


def test_repr_names_what_was_given():
    # the repr appears in make_grid's and the schedules' errors
    assert repr(Karras()) == "Karras(rho=7)"
    assert repr(Karras(rho=5, sigma_min=0.1, sigma_max=10.0)) == "Karras(rho=5, sigma_min=0.1, sigma_max=10)"


def test_a_custom_schedule_may_return_a_list_of_times():
    """``nodes`` returning a list (was an AttributeError on ``.to``); anything else is named."""
    p = PROCESSES["sd"]

    class Every100(sd.schedules.Schedule):
        def nodes(self, process, n):
            return [999.0 - 100 * i for i in range(n)]

    assert Every100()(p, 4).tolist() == [999.0, 899.0, 799.0, 699.0]
    bad = type("Bad", (sd.schedules.Schedule,), {"nodes": lambda self, process, n: "abc"})
    with pytest.raises(ValueError, match=r"schedule Bad\(\): nodes must be a non-empty 1-d array"):
        bad()(p, 4)


def test_float32_grids_at_the_range_ends_are_taken():
    """diffusers' flow sigmas are float32: ``float32(0.999)`` is 0.99900001, above RectifiedFlow's
    t_max by 1e-8 (was refused); such a grid is clamped into the range and gives the float64 grid's
    samples to 1e-8. A time really outside is refused with the values."""
    p = sd.RectifiedFlow()
    t32 = Custom(torch.linspace(0.999, 0.001, 10, dtype=torch.float32))(p, 10)
    assert float(t32.max()) == p.t_max
    torch.testing.assert_close(t32, torch.linspace(0.999, 0.001, 10, dtype=F64), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"process range \[0\.001, 0\.999\], got 1\.5 \.\. 0\.5"):
        Custom([1.5, 0.5])(p, 2)


def test_refusals_show_the_offending_nodes():
    """Too many steps for a spacing names the first repeated pair (it printed all 1500 nodes); a
    k-diffusion sigmas list still ending in 0 is told to drop it."""
    with pytest.raises(ValueError, match=r"1500 nodes .*: t\[1\] = 998, t\[2\] = 998$"):
        Linspace()(PROCESSES["sd"], 1500)
    with pytest.raises(
        ValueError, match=r"got 80 \.\. 0; a k-diffusion sigmas list ends in 0: pass sigmas\[:-1\]"
    ):
        Custom([80.0, 1.0, 0.0])(sd.EDM(), 3)


def _accepted(schedule: sd.schedules.Schedule, process: sd.Process) -> int:
    """The largest node count the schedule's own checks accept, tried one by one from 60 down."""
    for n in range(60, 0, -1):
        try:
            schedule(process, n)
        except ValueError:
            continue
        return n
    return 0


@pytest.mark.parametrize(
    ("schedule", "offset"),
    [
        (Linspace(), 0),
        (Trailing(), 0),
        (Leading(), 0),
        (Leading(steps_offset=1), 1),
        (Leading(steps_offset=3), 3),
    ],
)
@pytest.mark.parametrize("kind", ["vp", "mean_reverting"])
def test_a_spacing_given_too_many_steps_names_the_most_it_takes(schedule, offset, kind):
    """Before: "gave non-decreasing times for 51 nodes (too many steps for this spacing?)", or for leading's
    steps_offset a time outside the range, without the most steps accepted. That count runs, one more is
    refused naming it, for either final; called directly the schedule names its most nodes."""
    betas = torch.linspace(1e-4, 0.2, 50, dtype=F64)
    process = sd.VP.discrete(betas=betas) if kind == "vp" else sd.MeanReverting.cosine(50)
    most = _accepted(schedule, process)
    assert most == 50 - offset  # every trained step, less those the offset moves past the last one
    assert schedule.most_nodes(process) == most
    for final, steps in (("zero", most), ("none", most - 1)):
        grid = sd.solvers.base.make_grid(process, schedule, steps, final)
        assert len(grid.t) == steps + 1
        with pytest.raises(ValueError) as err:
            sd.solvers.base.make_grid(process, schedule, steps + 1, final, who="sample")
        msg = str(err.value)
        assert msg.startswith(
            f"sample: schedule {schedule!r} takes at most steps={steps} with final={final!r}"
        )
        assert msg.endswith(f"got steps={steps + 1}"), msg
    if offset == 0:  # more nodes than trained steps repeat one
        with pytest.raises(ValueError, match=rf"at most {most} distinct nodes\): t\["):
            schedule(process, most + 1)
