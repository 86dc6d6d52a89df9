"""FlowShift (SD3 / Flux / Wan / LTX-Video timestep shift) and Beta (diffusers' ``use_beta_sigmas``) against
diffusers' own schedulers: the same sigmas on rectified flow, to float32 rounding.

diffusers keeps sigmas in float32; "ulps" below are float32 ulps of diffusers' value. Measured (diffusers
0.42.1, steps 2-100): FlowMatchEuler's ``set_timesteps(n)`` (SD3, dynamic) and UniPC's flow sigmas (Wan)
shift in float64, 0.50 ulp at most (ours rounded, but for a tie); the Flux / LTX-Video pipelines' sigmas
are shifted in float32, 1.39 / 3.4 ulps."""

from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff.integrations.diffusers_config import process_from_config
from steerdiff.integrations.diffusers_ref import sd_betas_config
from steerdiff.schedules import Beta, FlowShift, calculate_shift, flow_time

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
RF = sd.RectifiedFlow()
STEPS = (2, 5, 10, 28, 50)

# scheduler configs as released (the keys that choose the grid)
SD3 = {"shift": 3.0}
FLUX = {  # black-forest-labs/FLUX.1-dev
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
LTX = {  # Lightricks/LTX-Video
    "base_image_seq_len": 1024,
    "base_shift": 0.95,
    "max_image_seq_len": 4096,
    "max_shift": 2.05,
    "shift": 1.0,
    "shift_terminal": 0.1,
    "use_dynamic_shifting": True,
}
WAN = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0}  # Wan 2.1 720p


def ulps(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest ``|ours - theirs|`` in float32 ulps of diffusers' float32 ``theirs``."""
    spacing = torch.from_numpy(np.spacing(theirs.float().numpy()).astype(np.float64))
    return float(((ours - theirs.double()).abs() / spacing).max())


def _pipeline_function(path: str, name: str):
    """A module-level function of a diffusers pipeline file, compiled from its source alone: importing the
    pipeline module needs transformers, which the tests do not install."""
    source = (inspect.getfile(diffusers).rsplit("/", 1)[0] + "/" + path).strip()
    with open(source) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), source, "exec"), scope)
    return scope[name]


@pytest.mark.parametrize(
    ("seq_len", "config"),
    [(4096, FLUX), (1024, FLUX), (256, FLUX), (7 * 16 * 24, LTX), (3000, LTX)],
)
def test_calculate_shift_is_the_pipelines(seq_len, config):
    """Flux's ``calculate_shift`` (from the pipeline's source): 0.5 at 256 tokens, 1.15 at 4096 (1024 x
    1024), bit for bit."""
    theirs = _pipeline_function("pipelines/flux/pipeline_flux.py", "calculate_shift")
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    args = [config[k] for k in keys]
    assert calculate_shift(seq_len, *args) == theirs(seq_len, *args)
    assert calculate_shift(256) == 0.5 and calculate_shift(4096) == pytest.approx(1.15, abs=1e-15)


@pytest.mark.parametrize("n", STEPS)
def test_sd3_is_flowmatch_euler_set_timesteps(n):
    """SD3 (``FlowMatchEulerDiscreteScheduler(shift=3.0)``, ``set_timesteps(n)``): its last unshifted point
    is its own sigma_min, already shifted, so the last node is shifted twice (0.0089 at 28 steps). The first
    node, 1, is the process's t_max = 0.999."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**SD3)
    theirs.set_timesteps(n)
    ours = FlowShift(shift=3.0)(RF, n)
    assert float(theirs.sigmas[0]) == 1.0 and float(ours[0]) == RF.t_max
    assert float(theirs.sigmas[-1]) == 0.0 and len(theirs.sigmas) == n + 1  # n nodes, then the clean end
    assert ulps(ours[1:], theirs.sigmas[1:-1]) <= 0.51  # measured 0.50


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("seq_len", [1024, 4096])
def test_flux_is_the_flux_pipeline(n, seq_len):
    """Flux: ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=calculate_shift(image_seq_len))``; also
    ``set_timesteps(n, mu=mu)`` (a dynamic-shift config driven by steps), whose last unshifted point is
    1/1000, not shifted twice."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    mu = calculate_shift(seq_len)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours = FlowShift(mu=mu, spacing="flux")(RF, n)
    assert ulps(ours[1:], theirs.sigmas[1:-1]) <= 2  # measured 1.39: diffusers shifts float32 sigmas
    theirs.set_timesteps(n, mu=mu)
    ours = FlowShift(mu=mu)(RF, n)
    assert ulps(ours[1:], theirs.sigmas[1:-1]) <= 1.2  # measured 1.11, the last: its 1/1000 is float32


@pytest.mark.parametrize("n", STEPS)
def test_ltx_video_shift_terminal(n):
    """LTX-Video: dynamic shifting, then ``shift_terminal=0.1`` stretches the grid to end at 0.1."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**LTX)
    mu = calculate_shift(7 * 16 * 24, 1024, 4096, 0.95, 2.05)  # 49 frames of 512 x 768: 2688 tokens
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours = FlowShift(mu=mu, shift_terminal=0.1, spacing="flux")(RF, n)
    assert float(ours[-1]) == pytest.approx(0.1, abs=1e-15)
    assert ulps(ours[1:], theirs.sigmas[1:-1]) <= 6  # measured 4.8: stretched in float32


@pytest.mark.parametrize("n", STEPS)
def test_wan_is_unipc_flow_sigmas(n):
    """Wan (UniPC with ``use_flow_sigmas``, ``flow_shift=5``): ``linspace(1, 1/1000, n + 1)[:n]``, shifted;
    UniPC moves its first sigma from 1 to 1 - 1e-6, here t_max."""
    theirs = diffusers.UniPCMultistepScheduler(**WAN)
    theirs.set_timesteps(n)
    ours = FlowShift(shift=5.0, spacing="unipc")(RF, n)
    assert ulps(ours[1:], theirs.sigmas[1:-1]) <= 0.51  # measured 0.50


@pytest.mark.parametrize("n", [5, 28])
def test_linear_time_shift(n):
    """``time_shift_type="linear"`` (CogView4's config): ``mu / (mu + 1/s - 1)``; with ``mu < 1`` the last
    node (7.0e-4 at 5 steps) falls below the process's 1e-3 and is taken to t_min."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    for mu in (0.7, 2.5):
        theirs.set_timesteps(n, mu=mu)
        ours = FlowShift(mu=mu, time_shift_type="linear")(RF, n)
        assert (float(theirs.sigmas[-2]) < RF.t_min) == (mu < 1)
        k = n - 1 if mu < 1 else n  # the nodes inside the process's range
        assert ulps(ours[1:k], theirs.sigmas[1:k]) <= 1.2  # measured 0.76: its 1/1000 is float32
        assert mu > 1 or float(ours[-1]) == RF.t_min
    assert torch.equal(
        FlowShift(mu=2.5, time_shift_type="linear", spacing="flux")(RF, n),
        FlowShift(shift=2.5, spacing="flux")(RF, n),
    )
    assert torch.allclose(
        FlowShift(mu=math.log(2.5), spacing="flux")(RF, n),
        FlowShift(shift=2.5, spacing="flux")(RF, n),
        rtol=1e-15,
        atol=0,
    )


@pytest.mark.parametrize("n", [3, 10, 28])
def test_sample_on_flowshift_is_flowmatch_eulers_loop(n):
    """``steps=n``: ``n`` network calls, at the ``n`` nodes, then the step to the clean end (FlowMatchEuler's
    trailing sigma 0): ``sd.sample(..., "euler", FlowShift(3))`` on the exact velocity is the loop
    ``x += (s_{k+1} - s_k) v(x, s_k)`` over the nodes and 0, FlowMatchEulerDiscreteScheduler.step's update."""
    gmm = sd.toy.default_benchmark_mixture(dim=4)
    den = gmm.denoiser(RF)
    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    calls = []

    def velocity(x, s):
        calls.append(s)
        p = den(x, s)
        return p.eps - p.x0

    nodes = FlowShift(shift=3.0)(RF, n).tolist()
    x = x_T.clone()
    for s, s_next in zip(nodes, [*nodes[1:], 0.0], strict=True):
        x = x + (s_next - s) * velocity(x, s)
    out, info = sd.sample(den, x_T, n, "euler", FlowShift(shift=3.0), return_info=True)
    assert info.nfe == len(calls) == n
    assert torch.allclose(out, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", ["flowmatch", "flux", "unipc"])
@pytest.mark.parametrize("n", [1, 2, 7, 28])
def test_shift_1_is_the_plain_flow_time_linspace(spacing, n):
    """Unshifted, on rectified flow: exactly numpy's linspace in flow time = process time (its first point,
    1, at t_max); ``flowmatch`` ends at t_min."""
    lo = RF.t_min
    plain = {
        "flowmatch": np.linspace(1, lo, n),
        "flux": np.linspace(1, 0, n + 1)[:n],
        "unipc": np.linspace(1, lo, n + 1)[:n],
    }[spacing]
    plain[0] = RF.t_max
    assert torch.equal(FlowShift(spacing=spacing)(RF, n), torch.from_numpy(plain))


PROCESSES = {
    "sd": sd.VP.scaled_linear(),
    "vp_zero_snr": sd.VP.discrete(
        betas=torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, rescale_zero_snr=True
    ),
    "vp_linear": sd.VP.linear(),
    "vp_cosine": sd.VP.cosine(),
    "ve": sd.VE(),
    "edm": sd.EDM(),
    "rectified_flow": RF,
}


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_any_process_same_snr_as_on_rectified_flow(kind):
    """The shift acts on sigma/alpha: on any process the nodes have the sigma/alpha of the nodes on a
    rectified flow spanning the same flow times, t_max first, strictly decreasing; shift 1 is uniform
    in flow time sigma / (alpha + sigma). Stable Diffusion's betas end at flow time 0.936 (sigma/alpha
    14.6): from 17 steps two unshifted nodes lie above it, refused rather than repeated."""
    p = PROCESSES[kind]
    lo, hi = flow_time(p, p.t_min), flow_time(p, p.t_max)
    twin = sd.RectifiedFlow(t_min=lo, t_max=hi)
    made = 0
    for sched in (FlowShift(), FlowShift(shift=3.0), FlowShift(mu=0.8, spacing="flux")):
        for n in (1, 2, 3, 7, 10, 25):
            try:
                on_twin = sched(twin, n)
            except ValueError:  # the same flow times: refused on both
                with pytest.raises(ValueError, match=r"nodes are at or above the largest flow time"):
                    sched(p, n)
                continue
            t = sched(p, n)
            made += 1
            assert t.dtype == F64 and t.shape == (n,) and bool((t[1:] < t[:-1]).all())
            assert float(t[0]) == p.t_max
            assert torch.allclose(p.sigma_ratio(t), twin.sigma_ratio(on_twin), rtol=1e-9, atol=0)
    assert made >= (9 if kind == "sd" else 15)
    s = FlowShift()(p, 10)
    flow = p.sigma(s) / (p.alpha(s) + p.sigma(s))
    assert torch.allclose(flow[1:], torch.from_numpy(np.linspace(1, lo, 10))[1:], rtol=1e-10, atol=0)
    assert float(s[-1]) == p.t_min


def test_stable_diffusion_betas_end_at_flow_time_0936():
    """SD's betas reach sigma/alpha 14.6, flow time 0.936: unshifted, 16 steps fit (the second node at
    0.9352), 17 do not (0.9393, with the first above it)."""
    p = sd.VP.scaled_linear()
    assert flow_time(p, p.t_max) == pytest.approx(0.935958, abs=1e-6)
    FlowShift()(p, 16)
    with pytest.raises(ValueError, match=r"2 of the 17 nodes are at or above the largest flow time of VP"):
        FlowShift()(p, 17)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shift": 0}, r"FlowShift: shift must be a finite number > 0, got 0"),
        ({"shift": -3.0}, r"shift must be a finite number > 0"),
        ({"shift": math.inf}, r"shift must be a finite number > 0"),
        ({"shift": "3"}, r"shift must be"),
        ({"time_shift_type": "linear"}, r"time_shift_type='linear' shifts by mu, and mu is None"),
        (
            {"time_shift_type": "cubic", "mu": 1.0},
            r"time_shift_type must be one of \['exponential', 'linear'\]",
        ),
        ({"mu": 1.0, "shift": 3.0}, r"pass shift .* or mu .*, not both"),
        ({"mu": 0.0, "time_shift_type": "linear"}, r"mu must be > 0 with time_shift_type='linear'"),
        ({"mu": math.nan}, r"mu must be a finite number"),
        ({"mu": 800.0}, r"mu must be a finite number in \[-700, 700\]"),
        ({"shift_terminal": 1.0}, r"shift_terminal must be a finite number in \(0, 1\)"),
        ({"spacing": "trailing"}, r"spacing must be one of \['flowmatch', 'flux', 'unipc'\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowShift(**kwargs)


def test_grids_outside_the_process_are_refused():
    """A terminal outside the process's flow times is named; a shift that puts two nodes beyond either end
    (where both would be clamped to the same time) is refused, with the counts."""
    with pytest.raises(ValueError, match=r"shift_terminal=0.0005 is outside the flow times of RectifiedFlow"):
        FlowShift(shift_terminal=5e-4)(RF, 10)
    with pytest.raises(ValueError, match=r"6 of the 10 nodes are at or above the largest flow time"):
        FlowShift(shift=1000.0, spacing="flux")(RF, 10)  # 1000 s / (1 + 999 s) >= 0.999 from s = 0.5
    # 0.02 u / (1 - 0.98 u) < 1e-3 below u = 0.049: u = k / 80 for k = 1, 2, 3; k = 1 of 40
    with pytest.raises(ValueError, match=r"3 of the 80 nodes are at or below the smallest flow time"):
        FlowShift(shift=0.02, spacing="flux")(RF, 80)
    t = FlowShift(shift=0.02, spacing="flux")(RF, 40)  # one node below 1e-3: t_min, no repeat
    assert float(t[-1]) == RF.t_min and float(t[-2]) > RF.t_min
    t = FlowShift(shift=100.0, spacing="flux")(RF, 3)  # 1 (t_max), then 0.9955 and 0.980
    assert float(t[0]) == RF.t_max and float(t[1]) == pytest.approx(
        100 * (2 / 3) / (1 + 99 * (2 / 3)), rel=1e-15
    )


# --- Beta -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10, 28])
@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)])
def test_beta_is_diffusers_convert_to_beta(n, a, b):
    """``_convert_to_beta`` called on scheduler instances, over the process's own range of diffusers' sigma:
    sigma/alpha for VP (EulerDiscreteScheduler), flow time for rectified flow (FlowMatchEuler)."""
    euler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    for p, sched in ((sd.VP.scaled_linear(), euler), (RF, flow), (sd.EDM(), euler)):
        ends = p.sigma_ratio(torch.tensor([p.t_max, p.t_min], dtype=F64))
        if p is RF:
            ends = torch.tensor([RF.t_max, RF.t_min], dtype=F64)
        theirs = torch.from_numpy(
            sched._convert_to_beta(in_sigmas=ends, num_inference_steps=n, alpha=a, beta=b)
        )
        t = Beta(a, b)(p, n)
        ours = t if p is RF else p.sigma_ratio(t)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=0), p
        assert float(t[0]) == p.t_max and (n == 1 or float(t[-1]) == p.t_min)


@pytest.mark.parametrize("n", [10, 28])
def test_beta_is_euler_use_beta_sigmas(n):
    """EulerDiscreteScheduler(use_beta_sigmas=True) with Stable Diffusion's betas: its sigmas, to float32
    (diffusers forms its alphas_cumprod in float32)."""
    theirs = diffusers.EulerDiscreteScheduler(**sd_betas_config(), use_beta_sigmas=True)
    theirs.set_timesteps(n)
    p = process_from_config(sd_betas_config())  # its betas as diffusers forms them
    ours = p.sigma_ratio(Beta()(p, n))
    assert torch.allclose(ours, theirs.sigmas[:-1].double(), rtol=2e-7, atol=0)  # measured 5.5e-8
    # the adapter's hint for use_beta_sigmas: that scheduler's sigmas and timesteps
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    adapter = SteerdiffScheduler.from_config(sd_betas_config(), solver="euler", schedule=Beta())
    adapter.set_timesteps(n)
    assert torch.allclose(adapter.sigmas, theirs.sigmas, rtol=5e-7, atol=0)  # measured 1.2e-7
    assert torch.allclose(adapter.timesteps, theirs.timesteps, rtol=0, atol=1e-3)


def test_beta_1_1_is_time_uniform_on_rectified_flow_and_refuses_bad_shapes():
    assert torch.allclose(Beta(1.0, 1.0)(RF, 12), sd.schedules.TimeUniform()(RF, 12), rtol=0, atol=1e-15)
    t = Beta()(RF, 11)  # 0.6 / 0.6 crowds both ends: the end steps are the shortest
    steps = (t[:-1] - t[1:]).tolist()
    assert steps[0] == min(steps) or steps[-1] == min(steps)
    assert max(steps) == steps[5] or max(steps) == steps[4]
    for kwargs, name in [({"alpha": 0}, "alpha"), ({"beta": -1.0}, "beta"), ({"alpha": math.nan}, "alpha")]:
        with pytest.raises(ValueError, match=f"Beta: {name} must be a finite number > 0"):
            Beta(**kwargs)


def test_steerdiff_scheduler_with_flowshift_runs_sd3s_grid():
    """``SteerdiffScheduler.from_config(sd3_config, schedule=FlowShift(shift=3.0))``: the nodes (and net times
    ``1000 s``) of FlowMatchEuler(shift=3) but the first, and the schedule kept in the config (by class and
    options) rebuilds it."""
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**SD3)
    ours = SteerdiffScheduler.from_config(theirs.config, solver="euler", schedule=FlowShift(shift=3.0))
    again = SteerdiffScheduler.from_config(ours.config)
    assert ours.config["schedule"]["class"] == "steerdiff.schedules:FlowShift"
    for sched in (theirs, ours, again):
        sched.set_timesteps(28)
    assert float(ours.sigmas[0]) == pytest.approx(RF.t_max) and float(theirs.sigmas[0]) == 1.0
    assert torch.allclose(ours.sigmas[1:], theirs.sigmas[1:], rtol=0, atol=1e-7)  # measured 0
    assert torch.equal(again.sigmas, ours.sigmas)


def test_the_docs_example_runs():
    """docs/schedules.md's example, with the exact velocity of a mixture as the transformer."""
    from types import SimpleNamespace

    from steerdiff.integrations.diffusers import SteerdiffScheduler

    from ._docs import block

    exact = sd.toy.default_benchmark_mixture(dim=4).denoiser(RF)

    def transformer(x, t):
        p = exact(x, t)
        return p.eps - p.x0

    pipe = SimpleNamespace(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SD3))
    scope = {"transformer": transformer, "x_T": torch.randn(8, 4, dtype=F64), "pipe": pipe}
    code = block("## Shifted flow-matching grids: `sd.schedules.FlowShift`")
    exec(compile(code, "docs/schedules.md", "exec"), scope)
    assert scope["x0"].shape == (8, 4) and bool(scope["x0"].isfinite().all())
    assert isinstance(pipe.scheduler, SteerdiffScheduler)
    assert pipe.scheduler.config["schedule"]["shift"] == 3.0
