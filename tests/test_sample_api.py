"""The contract of ``sd.sample``: exact NFE, callbacks, dtypes, ``final``, bad input, NaN reporting.

Parametrized over ``sd.solvers.available()`` where the contract is generic, so that every newly
registered solver is checked. Accuracy is measured against the exact probability-flow ODE
solution of the smooth mixture (``exact_sample``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest
import torch

import steerdiff as sd

from .reference import Noise64, exact_sample, half_net, noise, rel_rmse

ALL = sd.solvers.available()


@pytest.fixture(scope="module")
def problem(gmm, sd_process):
    """4 samples and their exact answer."""
    x_T = noise(4, 8)
    return x_T, exact_sample(gmm, sd_process, x_T)


def counting_denoiser(gmm, process, bad_call: int | None = None, bad_value: float = float("nan")):
    """The exact x0 denoiser; records the net's time on every call and can spoil call ``bad_call``."""
    calls: list[float] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = float(t.reshape(-1)[0])
        calls.append(tt)
        x0 = gmm.denoise(x, float(process.alpha(tt)), float(process.sigma(tt)))
        return torch.full_like(x0, bad_value) if len(calls) - 1 == bad_call else x0

    return sd.Denoiser(net, process, prediction="x0", shape=(gmm.dim,)), calls


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- NFE, callback, dtype, accuracy: every registered solver -------------------------------------


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("steps", [1, 2, 5, 16])
@pytest.mark.parametrize("name", ALL)
def test_nfe_is_exact(gmm, sd_process, name, steps, final):
    den, calls = counting_denoiser(gmm, sd_process)
    x, info = sd.sample(
        den, noise(2, 8), steps=steps, solver=name, final=final, generator=_gen(), return_info=True
    )
    assert info.grid.steps == steps and info.grid.clean_end == (final == "zero")
    assert info.nfe == len(calls) == info.solver.nfe(steps, clean_end=final == "zero")
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", ALL)
def test_accuracy_at_40_steps(gmm, sd_process, problem, name):
    solver = sd.solvers.get(name)
    if solver.stochastic:
        pytest.skip("stochastic: not a path to the ODE solution (its distribution is tested elsewhere)")
    x_T, exact = problem
    x = sd.sample(gmm.denoiser(sd_process), x_T, steps=40, solver=solver)
    # measured: ddim/euler 3.5e-2 (first order: 1e-2 needs ~140 steps), heun 2.6e-3,
    # dpmpp_2m 1.3e-3, dpmpp_3m 1.8e-4
    assert rel_rmse(x, exact) < (5e-2 if solver.order == 1 else 1e-2)


@pytest.mark.parametrize("name", ALL)
def test_callback_once_per_step(gmm, sd_process, name):
    seen: list[dict] = []
    x, info = sd.sample(
        gmm.denoiser(sd_process),
        noise(2, 8),
        steps=6,
        solver=name,
        generator=_gen(),
        callback=seen.append,
        return_info=True,
    )
    assert [s["i"] for s in seen] == list(range(6))
    assert [s["t"] for s in seen] == info.grid.t[1:]
    assert [s["sigma"] for s in seen] == info.grid.sigma[1:]
    nfe = [s["nfe"] for s in seen]
    assert all(a < b for a, b in itertools.pairwise(nfe)) and nfe[-1] == info.nfe
    assert torch.equal(seen[-1]["x"], x)
    assert all(s["denoised"].shape == x.shape for s in seen)
    if name in ("ddim", "dpmpp_2m", "unipc", "euler", "heun"):  # the step to the clean end returns it
        assert torch.equal(seen[-1]["denoised"], x)


@pytest.mark.parametrize(("scale", "h"), [(2.0, 1.49), (4.0, 0.79), (7.5, 0.51), (None, 0.51)])
def test_the_guided_corrector_limit_solves_its_equation(scale, h):
    """``guided_corrector_max_h``: the step at which UniPC-2's stable stiffness on the linear test equals
    2M's at ``guided_max_h``, ``(1 + e^{-h_2}) / (2 (1 - e^{-h_2}))`` -- solved, not approximately (the
    docstring's 1.49 / 0.79 / 0.51); none from scale 1 down."""
    from steerdiff.sampling import _unipc2_stiffness_limit, guided_corrector_max_h, guided_max_h

    h2 = guided_max_h(scale)
    got = guided_corrector_max_h(scale)
    assert _unipc2_stiffness_limit(got) == pytest.approx(
        (1 + math.exp(-h2)) / (2 * -math.expm1(-h2)), rel=1e-9
    )
    assert got == pytest.approx(h, abs=5e-3) and got < h2
    assert guided_corrector_max_h(1.0) == math.inf


def test_the_clean_step_is_reported_at_t_min(gmm):
    """With ``final="zero"`` the node after the last step is the clean state at the process's ``t_min``
    (``sigma = 0``): on EDM, ``t_min = 0.002``, not the ``t = 0`` of ``sigma = t`` (on Stable Diffusion's
    betas both are 0)."""
    p = sd.EDM()
    seen: list[dict] = []
    _, info = sd.sample(
        gmm.denoiser(p), 80 * noise(2, 8), 4, "ddim", "karras", callback=seen.append, return_info=True
    )
    assert (seen[-1]["t"], seen[-1]["sigma"]) == (p.t_min, 0.0)
    assert info.grid.t == [*sd.schedules.Karras()(p, 4).tolist(), p.t_min]


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("name", ALL)
def test_no_step_writes_x_T_or_a_handed_out_state_in_place(gmm, sd_process, name, prediction, final):
    """``x_T`` and every ``x`` / ``denoised`` handed to the callback keep their values to the end of the
    run: a solver that wrote into its input or into a tensor it returned (a fused in-place update on the
    hot path) would change the caller's ``x_T`` or the stored trajectory."""
    den = gmm.denoiser(sd_process)
    if prediction == "eps":
        den = sd.Denoiser(half_net(gmm, sd_process), sd_process)
    x_T, seen, handed = noise(2, 8), [], []
    before = x_T.clone()
    sd.sample(den, x_T, steps=5, solver=name, final=final, generator=_gen(), callback=seen.append)
    assert torch.equal(x_T, before)
    at_end = [(s["x"].clone(), s["denoised"].clone()) for s in seen]

    def copy_now(s: dict) -> None:  # the same run again, copied as handed out
        handed.append((s["x"].clone(), s["denoised"].clone()))

    sd.sample(den, x_T, steps=5, solver=name, final=final, generator=_gen(), callback=copy_now)
    for (x, d), (x_then, d_then) in zip(at_end, handed, strict=True):
        assert torch.equal(x, x_then) and torch.equal(d, d_then)


def test_callback_denoised_is_the_step_s_x0_estimate(gmm, sd_process):
    """``denoised`` (k-diffusion's name) is the x0 estimate of the step's last evaluation: for DDIM
    the exact denoiser at the step's input (to 1e-12)."""
    den = gmm.denoiser(sd_process)
    seen: list[dict] = []
    x_T = noise(4, 8)
    _, info = sd.sample(den, x_T, steps=5, solver="ddim", callback=seen.append, return_info=True)
    xs = [x_T] + [s["x"] for s in seen]
    for i, s in enumerate(seen):
        assert torch.allclose(s["denoised"], den(xs[i], info.grid.t[i]).x0, rtol=0, atol=1e-12)


class _EvaluatesFromStep2(sd.solvers.Solver):
    """A custom solver whose first step does not call the model (it keeps x)."""

    def step(self, model, x, i, grid, state):
        return x if i == 0 else model(x, grid.t[i], i).renoise(grid.alpha[i + 1], grid.sigma[i + 1])


def test_callback_denoised_is_none_before_a_custom_solver_evaluates(gmm, sd_process):
    """A custom solver need not evaluate in its first step: ``denoised`` is then ``None`` there (an
    assertion failed before), and the x0 estimate of the latest evaluation after."""
    den, x_T, seen = gmm.denoiser(sd_process), noise(4, 8), []
    sd.sample(den, x_T, steps=3, solver=_EvaluatesFromStep2(), callback=seen.append)
    assert seen[0]["denoised"] is None and seen[0]["nfe"] == 0
    assert all(isinstance(s["denoised"], torch.Tensor) for s in seen[1:]) and seen[-1]["nfe"] == 2


@pytest.mark.parametrize("name", ALL)
def test_dtype_is_kept(gmm, sd_process, problem, name):
    x_T, _ = problem
    den = gmm.denoiser(sd_process)
    x64 = sd.sample(den, x_T, steps=8, solver=name, generator=_gen())
    x32 = sd.sample(den, x_T.float(), steps=8, solver=name, generator=_gen())
    assert x64.dtype == torch.float64 and x32.dtype == torch.float32
    if not sd.solvers.get(name).stochastic:
        assert rel_rmse(x32, x64) < 1e-5  # measured <= 4e-7


def test_final_none_returns_the_noisy_state(gmm, sd_process, problem):
    x_T, exact = problem
    den = gmm.denoiser(sd_process)
    noisy = gmm.reference_ode(x_T, sd_process, sd_process.t_max, sd_process.t_min)  # no denoising
    x, info = sd.sample(
        den, x_T, steps=40, solver="dpmpp_3m", schedule="logsnr_uniform", final="none", return_info=True
    )
    g = info.grid
    assert len(g.t) == 41 and not g.clean_end
    assert g.t[-1] == sd_process.t_min and g.sigma[-1] == pytest.approx(
        float(sd_process.sigma(sd_process.t_min))
    )
    assert info.nfe == 40
    # at t_min (sigma = 0.029) state and denoised estimate differ by only 9.6e-4: measured 1.7e-4
    assert rel_rmse(x, noisy) < 3e-4 < rel_rmse(x, exact)

    # ending half-way, where the two differ by 40%
    nodes = sd.schedules.Custom(torch.linspace(sd_process.t_max, 300.0, 21, dtype=torch.float64))
    mid = gmm.reference_ode(x_T, sd_process, sd_process.t_max, 300.0)
    x, info = sd.sample(den, x_T, steps=20, solver="heun", schedule=nodes, final="none", return_info=True)
    assert info.nfe == 40 and info.grid.t[-1] == 300.0
    assert rel_rmse(x, mid) < 3e-3  # measured 1.8e-3


# --- few steps for the order ------------------------------------------------------------------


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("steps", [1, 2])
def test_dpmpp_3m_with_fewer_steps_than_its_order(gmm, sd_process, problem, steps, final):
    # warm-up and the first-order step into the end (or lower_order_final) leave only DDIM steps
    x_T, _ = problem
    den = gmm.denoiser(sd_process)
    x, info = sd.sample(den, x_T, steps=steps, solver="dpmpp_3m", final=final, return_info=True)
    assert info.nfe == steps
    assert torch.allclose(x, sd.sample(den, x_T, steps=steps, solver="ddim", final=final), rtol=0, atol=1e-12)
    if steps == 1 and final == "zero":  # one step: the denoised estimate at t_max
        t = sd_process.t_max
        x0 = gmm.denoise(x_T, float(sd_process.alpha(t)), float(sd_process.sigma(t)))
        assert torch.allclose(x, x0, rtol=0, atol=1e-12)


def test_dpmpp_3m_two_steps_without_lower_order_final_is_2m(gmm, sd_process, problem):
    x_T, _ = problem
    den = gmm.denoiser(sd_process)
    s3 = sd.solvers.DPMSolverPPMultistep(order=3, lower_order_final=False)
    s2 = sd.solvers.DPMSolverPPMultistep(order=2, lower_order_final=False)
    x3 = sd.sample(den, x_T, steps=2, solver=s3, final="none")
    x2 = sd.sample(den, x_T, steps=2, solver=s2, final="none")
    x1 = sd.sample(den, x_T, steps=2, solver="ddim", final="none")
    assert torch.allclose(x3, x2, rtol=0, atol=1e-12) and rel_rmse(x3, x1) > 1e-3


# --- bad input ----------------------------------------------------------------------------------


def _raises(match_all: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    missing = [m for m in match_all if m not in msg]
    assert not missing, f"{missing} not in {msg!r}"
    return msg


def test_unknown_solver_lists_the_names(gmm, sd_process, problem):
    _raises(["solver", "'dpm++'", *ALL], sd.sample, gmm.denoiser(sd_process), problem[0], solver="dpm++")


def test_unknown_schedule_lists_the_names(gmm, sd_process, problem):
    names = sd.schedules.available()
    _raises(
        ["schedule", "'karas'", *names], sd.sample, gmm.denoiser(sd_process), problem[0], schedule="karas"
    )
    _raises(
        ["schedule=5", "list of process times"], sd.sample, gmm.denoiser(sd_process), problem[0], 4, None, 5
    )


@pytest.mark.parametrize("final", ["zero", "none"])
# None is the default (10, or an explicit grid's count: tests/test_steps_count.py)
@pytest.mark.parametrize("steps", [0, -3, 2.5, 10.0, "10", True, np.int64(4) + 0.5])
def test_bad_steps(gmm, sd_process, problem, steps, final):
    _raises(
        ["sample: steps", ">= 1", repr(steps)],
        sd.sample,
        gmm.denoiser(sd_process),
        problem[0],
        steps=steps,
        final=final,
    )


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: sd.solvers.DPMSolverPPMultistep(order=4), ["order must be an integer in [1, 3]"]),
        (lambda: sd.solvers.DPMSolverPPMultistep(order=0), ["order must be an integer in [1, 3]"]),
        (lambda: sd.solvers.DPMSolverPPMultistep(order=2.0), ["order must be an integer in [1, 3]"]),
        (lambda: sd.solvers.Heun(order=3), ["order must be an integer in [1, 2]"]),
        (lambda: sd.solvers.DDIM(order=2), ["DDIM: order must be 1, got 2"]),
        (lambda: sd.solvers.Euler(order=2), ["order must be 1, got 2"]),
        (lambda: sd.solvers.AcceleratedDDIM(order=3), ["order must be an integer in [1, 2]"]),
        (lambda: sd.solvers.AcceleratedDDPM(order=2), ["AcceleratedDDPM: order must be 1, got 2"]),
        (lambda: sd.solvers.GradientEstimation(order=2), ["order must be 1, got 2"]),
    ],
)
def test_unsupported_order(make, words):
    _raises(words, make)


def test_bad_third_order():
    _raises(
        ["third_order", "'exact'", "'dpmsolver'"], sd.solvers.DPMSolverPPMultistep, order=3, third_order="x"
    )


@pytest.mark.parametrize(
    ("x_T", "words"),
    [
        (torch.zeros(4, 8, dtype=torch.int64), ["x_T", "floating", "torch.int64"]),
        (torch.zeros(8, dtype=torch.float64), ["x_T", "batch", "(8,)"]),
        (torch.zeros(4, 7, dtype=torch.float64), ["x_T", "(7,)", "(8,)"]),
        (torch.zeros(4, 2, 4, dtype=torch.float64), ["x_T", "(2, 4)", "(8,)"]),
        (np.zeros((4, 8)), ["x_T", "torch.Tensor"]),
    ],
    ids=["int", "unbatched", "wrong-shape", "wrong-rank", "numpy"],
)
def test_bad_x_T(gmm, sd_process, x_T, words):
    _raises(words, sd.sample, gmm.denoiser(sd_process), x_T)


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({"callback": 5}, ["sample: callback", "callable", "int"]),
        ({"progress": "no"}, ["sample: progress", "True or False", "'no'"]),
        ({"return_info": 1}, ["sample: return_info", "True or False"]),
        ({"generator": 5}, ["sample: generator must be None", "got int 5"]),  # was unnamed: 'generator must'
        ({"generator": "seed"}, ["sample: generator must be None", "'seed'"]),
    ],
)
def test_bad_flags_and_callback(gmm, sd_process, problem, option, words):
    """Checked before sampling (a non-callable callback failed after the first step; a string progress
    flag was taken as true)."""
    _raises(words, sd.sample, gmm.denoiser(sd_process), problem[0], 3, **option)


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({"num_inference_steps": 10}, ["sample: num_inference_steps is not an argument here", "use steps="]),
        ({"sigmas": [14.6, 1.0, 0.0]}, ["sample: sigmas is not an argument here", "schedule=sigmas[:-1]"]),
    ],
)
def test_diffusers_and_k_diffusion_names_are_refused_naming_ours(gmm, sd_process, problem, option, words):
    """diffusers' ``num_inference_steps`` and k-diffusion's ``sigmas`` in ``**cond`` reached the net as
    conditions: a TypeError inside it, or, for a net taking ``**kwargs``, the default 10 steps on the default
    grid without a word (here, before: the oracle's net's TypeError)."""
    _raises(words, sd.sample, gmm.denoiser(sd_process), problem[0], **option)


def test_den_must_be_a_denoiser(gmm, sd_process, problem):
    net = gmm.denoiser(sd_process).net
    _raises(["den", "Denoiser", "function"], sd.sample, net, problem[0])


def test_bad_final(gmm, sd_process, problem):
    _raises(
        ["sample: final", "'clean'", "'zero'", "'none'"],
        sd.sample,
        gmm.denoiser(sd_process),
        problem[0],
        final="clean",
    )


# --- non-finite network output ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad_call", "step", "node", "value"),
    [
        ("ddim", 4, 4, 4, float("nan")),
        ("dpmpp_3m", 0, 0, 0, float("nan")),
        ("dpmpp_3m", 7, 7, 7, float("inf")),
        ("heun", 4, 2, 2, float("nan")),  # step 2's first evaluation, at t_2
        ("heun", 5, 2, 3, float("nan")),  # step 2's second evaluation, at t_3
        ("accel_ddim", 4, 4, 4, float("nan")),
        ("accel_ddpm", 3, 3, 3, float("inf")),  # at the pre-noised point, at t_3
        ("gradient_estimation", 4, 4, 4, float("nan")),
    ],
)
def test_non_finite_output_names_step_and_time(gmm, sd_process, problem, name, bad_call, step, node, value):
    den, calls = counting_denoiser(gmm, sd_process, bad_call=bad_call, bad_value=value)
    with pytest.raises(sd.NonFiniteError) as err:
        sd.sample(den, problem[0], steps=8, solver=name, schedule="logsnr_uniform")
    msg = str(err.value)
    t = sd.solvers.make_grid(sd_process, sd.schedules.get("logsnr_uniform"), 8).t[node]
    assert len(calls) == bad_call + 1  # on the CPU the run stops at the bad evaluation
    assert calls[bad_call] == pytest.approx(t)
    assert re.search(rf"\bstep {step}\b", msg), msg  # steps count from 0, as the callback's "i"
    assert f"(evaluation {bad_call + 1}," in msg, msg  # evaluations count from 1
    assert f"t={t:.6g}" in msg, msg


@pytest.mark.parametrize("eager", [True, False])
def test_model_names_a_move_before_the_evaluation_that_took_it(sd_process, eager):
    """Model.first_error: a non-finite moved state recorded (note_move) after ``c`` evaluations and the first
    non-finite evaluation the ``c``-th (from 0, the one that took the moved state as input): the move's error;
    a non-finite evaluation before the move is the model's (with the step and the evaluation's number)."""
    den = sd.Denoiser(lambda x, t: x, sd_process, "x0")
    x, bad = torch.zeros(2, 3), torch.full((2, 3), float("nan"))

    def moved(step: int, t: float) -> sd.NonFiniteError:
        return sd.NonFiniteError(f"moved at {step}, {t}")

    model = sd.solvers.Model(den)
    model.eager = eager
    model(x, 0.9, 0)
    model(x, 0.8, 1)
    with pytest.raises(sd.NonFiniteError, match=r"^moved at 1, 0\.8$") as err:
        model.note_move(torch.tensor(False), 1, 0.8, moved)
        model(bad, 0.7, 2)
        model.check_finite()
    assert model.first_nonfinite() == (None if eager else (2, 2, 0.7))
    assert model.first_bad_move() == 0
    model = sd.solvers.Model(den)
    model.eager = False
    model(x, 0.9, 0)
    model(bad, 0.8, 1)
    model.note_move(torch.tensor(False), 1, 0.8, moved)
    with pytest.raises(sd.NonFiniteError, match=r"at step 1 \(evaluation 2, process time t=0\.8\)") as err:
        model.check_finite()
    assert model.first_error(model.first_nonfinite(), model.first_bad_move()).key == (1, -0.8)
    assert model.nfe == model.calls == 2 and "moved" not in str(err.value)


@pytest.mark.parametrize("final", ["zero", "none"])
@pytest.mark.parametrize("bad_call", [1, 3])
def test_non_finite_learned_variance_names_step_and_time(gmm, sd_process, problem, final, bad_call):
    """The learned-variance channel is a model output too (DDPM draws its noise with it): a NaN there
    is named at the evaluation that returned it. Before, only the x0/eps half was checked: the NaN
    reached the state and was named one step late (step 2 for call 1), and at the last noisy step of
    ``final="none"`` (call 3 of 4 steps) not at all -- the run returned NaN samples silently."""
    calls: list[float] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(float(t[0]))
        x0 = gmm.denoise(x, float(sd_process.alpha(calls[-1])), float(sd_process.sigma(calls[-1])))
        r = torch.full_like(x0, float("nan") if len(calls) - 1 == bad_call else 0.0)
        return torch.cat([x0, r], 1)

    den = sd.Denoiser(net, sd_process, prediction="x0", learned_variance=True)
    steps = 4 if final == "none" else 5
    with pytest.raises(sd.NonFiniteError) as err:
        sd.sample(den, problem[0], steps=steps, solver="ddpm", final=final, generator=_gen())
    assert re.search(rf"\bstep {bad_call}\b", str(err.value)), str(err.value)
    assert f"t={calls[bad_call]:.6g}" in str(err.value)
    assert len(calls) == bad_call + 1  # on the CPU the run stops at the bad evaluation


def test_deferred_non_finite_check_names_the_first_bad_step(gmm, sd_process, problem, monkeypatch):
    """On an accelerator the check is deferred to the end of the run (simulated: tensors report
    ``is_cpu`` False). It still names the first bad step: with a corrector the NaN also spoils the snr
    step sizes (they were checked first, a ValueError about the step size); in ``pcg`` a bad corrector
    evaluation before a bad predictor one is the one named (the predictor's was)."""
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    den, _ = counting_denoiser(gmm, sd_process, bad_call=3)
    with pytest.raises(sd.NonFiniteError, match=r"\bstep 1\b"):  # call 3: step 1's corrector
        sd.sample(den, problem[0], steps=6, solver="ddim", corrector="ula", generator=_gen())
    calls: list[float] = []

    def spoiled(x: torch.Tensor, t: torch.Tensor, *, bad: bool = False) -> torch.Tensor:
        calls.append(float(t.reshape(-1)[0]))
        x0 = gmm.denoise(x, float(sd_process.alpha(calls[-1])), float(sd_process.sigma(calls[-1])))
        # the corrector's (unconditional) branch at the 3rd call, the predictor from the 5th on
        return x0 * float("nan") if (len(calls) == 3 and bad) or len(calls) >= 5 else x0

    cond = sd.Denoiser(spoiled, sd_process, "x0")
    with pytest.raises(sd.NonFiniteError, match=r"\bstep 0\b"):
        sd.guidance.pcg(cond, cond, problem[0], 6, 2.0, uncond_kwargs={"bad": True}, generator=_gen())


def test_x_T_of_an_unsupported_float_dtype_is_named(gmm, sd_process):
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int64):
        with pytest.raises(ValueError, match=r"x_T must have a floating dtype \(float16/bfloat16"):
            sd.sample(gmm.denoiser(sd_process), torch.zeros(2, gmm.dim).to(dtype))


# --- half precision: the net in float16/bfloat16, the solver in float32 ---------------------------


HALF_RUNS = [("unipc", 25), ("ddim", 50), ("heun", 25), ("dpmpp_2m_sde", 50)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("name", "steps"), HALF_RUNS, ids=[n for n, _ in HALF_RUNS])
def test_half_precision_input_runs_the_solver_in_float32(gmm, sd_process, name, steps, dtype):
    x_T = noise(16, 8)
    den = sd.Denoiser(half_net(gmm, sd_process), sd_process, prediction="eps")
    ref = sd.sample(den, x_T, steps=steps, solver=name, schedule="karras", generator=Noise64())
    half = x_T.to(dtype)
    x = sd.sample(den, half, steps=steps, solver=name, schedule="karras", generator=Noise64())
    assert x.dtype == dtype
    # exactly a float32 run whose net rounds its input and output to `dtype`, cast at the end
    rounding = sd.Denoiser(half_net(gmm, sd_process, round_input=dtype), sd_process, prediction="eps")
    x32 = sd.sample(rounding, half.float(), steps=steps, solver=name, schedule="karras", generator=Noise64())
    assert torch.equal(x, x32.to(dtype))
    # against float64, measured: bf16 1.8e-3 (unipc) .. 2.5e-3 (heun), fp16 2.3e-4 .. 3.2e-4; with the
    # state rounded to `dtype` at every step (before): bf16 9.2e-3 .. 1.7e-2, fp16 1.2e-3 .. 1.9e-3
    assert rel_rmse(x.double(), ref) < (4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("run", ["sample", "repaint", "fk_steering"])
def test_a_float16_result_that_overflows_is_an_error(sd_process, run):
    """Guidance takes a float32 state past float16's 65504 while every net output stays finite: the
    cast back is refused by name (it returned inf silently); bfloat16 and float32 keep the value."""
    cond = sd.Denoiser(lambda x, t: torch.full_like(x, 6e4), sd_process, "x0")
    uncond = sd.Denoiser(lambda x, t: torch.zeros_like(x), sd_process, "x0")
    guided = sd.guidance.CFG(cond, uncond, 2.0)  # x0 = 1.2e5 in float32

    def go(x_T: torch.Tensor) -> torch.Tensor:
        if run == "repaint":
            mask = torch.tensor([1.0, 0.0, 0.0, 0.0])
            return sd.guidance.repaint_sample(guided, sd.inverse.Inpaint(mask), torch.zeros(1), x_T, 3)
        if run == "fk_steering":
            return sd.smc.fk_steering(
                guided,
                lambda x: x.sum(-1),
                shape=(2, 4),
                particles=2,
                steps=3,
                x_T=x_T[:, None].expand(2, 2, 4),
            ).x
        return sd.sample(guided, x_T, 3, "ddim")

    x_T = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    big = go(x_T)
    assert float(big.abs().max()) > 65504 and bool(torch.isfinite(big).all())
    assert bool(torch.isfinite(go(x_T.bfloat16())).all())
    with pytest.raises(FloatingPointError, match=r"overflows float16 \(max \|x\| = .* > 65504\)"):
        go(x_T.half())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["unipc", "heun", "dpmpp_2m_sde"])
def test_half_precision_sample_equals_the_diffusers_scheduler(gmm, name, prediction):
    """``SteerdiffScheduler`` upcasts in ``step`` as diffusers' schedulers do; ``sd.sample`` with the same
    bfloat16 net, x_T and noise must return the same tensor, to the bit."""
    pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    kind = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction]
    sched = SteerdiffScheduler(solver=name, schedule="karras", prediction_type=kind)
    process = sched.denoiser.process
    net = half_net(gmm, process, prediction)
    x_T = noise(4, 8).to(torch.bfloat16)
    sched.set_timesteps(8)
    x, g = x_T, torch.Generator().manual_seed(5)
    for t in sched.timesteps:  # as a pipeline: the net in bfloat16 on prev_sample
        x = sched.step(net(x, t.reshape(1)), t, x, generator=g).prev_sample
    den = sd.Denoiser(net, process, prediction=prediction)
    y = sd.sample(
        den, x_T, steps=8, solver=name, schedule="karras", generator=torch.Generator().manual_seed(5)
    )
    assert y.dtype == x.dtype == torch.bfloat16
    assert torch.equal(y, x)  # before: 3e-3 .. 5e-2 relative apart


# --- zero terminal SNR: updates that read the estimate the net gave --------------------------------


@pytest.mark.parametrize("schedule", ["time_uniform", "trailing"])
def test_euler_heun_keep_float32_accuracy_at_zero_terminal_snr(gmm, schedule):
    # alpha(t_max) = 2**-12: the (x / alpha) form derived eps from the exact x0 and cancelled it
    # against x again (before, float32 vs float64: euler 9e-6 .. 1.3e-5, heun 9e-4 .. 1.2e-3)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    p = sd.VP.discrete(betas=betas, rescale_zero_snr=True)
    den, x_T = gmm.denoiser(p), noise(16, 8)
    for name, bound in (("ddim", 1e-6), ("euler", 1e-6), ("heun", 2e-6)):  # measured <= 1.2e-7, 3.8e-7
        x64 = sd.sample(den, x_T, steps=10, solver=name, schedule=schedule)
        x32 = sd.sample(den, x_T.float(), steps=10, solver=name, schedule=schedule)
        assert rel_rmse(x32.double(), x64) < bound, name
    # Euler in (x / alpha, sigma / alpha) is the DDIM step
    euler, ddim = (sd.sample(den, x_T, steps=10, solver=n, schedule=schedule) for n in ("euler", "ddim"))
    assert torch.allclose(euler, ddim, rtol=0, atol=1e-12)


# --- a grid needs lam strictly increasing ----------------------------------------------------------


class _Bumpy(sd.Process):
    """alpha = 1, sigma = 1 + (t - 0.4)^2 on [0, 1]: lam = -log(sigma) is not monotone in t."""

    t_min, t_max = 0.0, 1.0

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t):
        return 1 + (torch.as_tensor(t, dtype=torch.float64) - 0.4) ** 2


@pytest.mark.parametrize(
    ("final", "where"),
    [("zero", "node 2 to node 3 (t = 0.333333 -> 0,"), ("none", "node 2 to node 3 (t = 0.5 -> 0.25,")],
)
def test_grid_rejects_a_non_increasing_log_snr(final, where):
    # nodes t = 1, 2/3, 1/3, 0 (final="zero") or 1, 0.75, 0.5, 0.25, 0: lam rises, then falls
    den = sd.Denoiser(lambda x, t: torch.zeros_like(x), _Bumpy(), prediction="x0")
    args = (den, noise(2, 8))
    kw = {"steps": 4, "solver": "ddim", "schedule": "time_uniform", "final": final}
    _raises(
        ["schedule TimeUniform() with steps=4", "lam", "does not increase", where], sd.sample, *args, **kw
    )


def test_grid_rejects_nodes_that_coincide_after_the_clamp_to_the_range():
    """Times within float32's slack above ``t_max`` are clamped to it (a float32 grid): two distinct given
    times that both land on ``t_max`` would make a step with ``h = 0``, refused by name."""
    p = sd.RectifiedFlow()
    den = sd.Denoiser(lambda x, t: torch.zeros_like(x), p, prediction="x0")
    kw = {"steps": 2, "solver": "ddim", "schedule": [0.9990001, 0.999, 0.5], "final": "none"}
    _raises(
        ["lam", "does not increase", "node 0 to node 1", "t = 0.999 -> 0.999"],
        sd.sample,
        den,
        noise(2, 8),
        **kw,
    )


def test_grid_rejects_an_infinite_log_snr():
    """A user's process whose ``t_max`` has ``alpha = 0`` (rectified flow up to ``t = 1``: ``lam = -inf``)
    is refused before any step, naming the log-SNR, not run into a division by ``alpha = 0``."""
    p = sd.RectifiedFlow()
    p.t_max = 1.0
    den = sd.Denoiser(lambda x, t: torch.zeros_like(x), p, prediction="x0")
    _raises(
        ["infinite log-SNR", "-inf"],
        sd.sample,
        den,
        noise(2, 8),
        steps=3,
        solver="ddim",
        schedule="time_uniform",
    )


def test_the_default_takes_a_long_step_after_short_ones_at_first_order():
    """``sd.sample`` without ``solver``: UniPC-3 (the named ``"unipc"``), predicting at first order on
    a step longer than 2 in log-SNR and than twice the step before. On the default schedule that
    never happens, so the run is UniPC-3 without the rule (``max_h=inf``, the paper's and diffusers')
    bit for bit; on grids that end with such a step (``linspace`` to t = 0, ``leading``) the cubic
    extrapolated over it amplifies the estimates' errors. Measured on the 16-d mixture under DDPM
    betas (256 samples, against the exact ODE), default / ``max_h=inf`` at 10 / 15 / 20 / 25 steps:
    linspace 0.110 / 0.058 / 0.042 / 0.032 against 0.319 / 1.03 / 0.321 / 0.151, leading 0.104 /
    0.053 / 0.039 / 0.030 against 0.268 / 0.732 / 0.252 / 0.126."""
    unguarded = sd.solvers.UniPC(max_h=math.inf)
    x_small = noise(8, 4)
    small = sd.toy.default_benchmark_mixture(dim=4, components=3)
    ddpm = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    for process in (sd.VP.scaled_linear(), ddpm, sd.RectifiedFlow(), sd.EDM()):
        den = small.denoiser(process)
        for n in range(1, 26):
            assert torch.equal(sd.sample(den, x_small, n), sd.sample(den, x_small, n, unguarded))
    solver = sd.sampling.default_solver(small.denoiser(ddpm), 10)
    assert solver == sd.solvers.UniPC(max_h=2.0, max_h_ratio=2.0) == sd.solvers.get("unipc") != unguarded

    gmm = sd.toy.default_benchmark_mixture(dim=16)
    x_T = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den, ref = gmm.denoiser(ddpm), exact_sample(gmm, ddpm, x_T)
    for schedule in ("linspace", "leading"):
        assert rel_rmse(sd.sample(den, x_T, 15, schedule=schedule), ref) < 0.1
        assert rel_rmse(sd.sample(den, x_T, 15, unguarded, schedule), ref) > 0.5
        for n in (10, 20, 25):
            ours = rel_rmse(sd.sample(den, x_T, n, schedule=schedule), ref)
            assert ours < 0.5 * rel_rmse(sd.sample(den, x_T, n, unguarded, schedule), ref)


# --- from k-diffusion: a model(x, sigma) -> denoised and a sigmas list ------------------------------


def test_a_k_diffusion_model_and_sigmas_list(gmm):
    """A k-diffusion denoiser ``model(x, sigma) -> x0`` (x = x0 + sigma eps) is
    ``sd.Denoiser(model, sd.EDM(), prediction="x0")`` and its ``sigmas`` (ending in 0) the custom grid
    ``sigmas[:-1]`` (a list, or a ``Custom`` schedule): ``euler`` and ``dpmpp_2m`` then equal
    k-diffusion's ``sample_euler`` (``x += (x - D) / sigma * (sigma' - sigma)``) and
    ``sample_dpmpp_2m`` (Lu et al. 2022b, Alg. 2 in ``t = -log sigma``), written out here, to 1e-12."""
    proc = sd.EDM()

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return gmm.denoise(x, 1.0, float(sigma[0]))

    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.5, 0.4, 0.1, 0.0], dtype=torch.float64)
    x_T = noise(16, 8) * sigmas[0]
    den = sd.Denoiser(model, proc, prediction="x0")
    grid = sd.schedules.Custom(sigmas[:-1])

    x = x_T.clone()
    for s, s_next in itertools.pairwise(sigmas.tolist()):
        d = model(x, torch.tensor([s], dtype=torch.float64))
        x = x + (x - d) / s * (s_next - s)
    assert torch.allclose(sd.sample(den, x_T, 6, "euler", sigmas[:-1].tolist()), x, rtol=0, atol=1e-12)

    x, old = x_T.clone(), None
    for i, (s, s_next) in enumerate(itertools.pairwise(sigmas.tolist())):
        d = model(x, torch.tensor([s], dtype=torch.float64))
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        if old is None:
            x = (s_next / s) * x - math.expm1(-h) * d
        else:
            r = math.log(sigmas[i - 1] / s) / h
            x = (s_next / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - old / (2 * r))
        old = d
    assert torch.allclose(sd.sample(den, x_T, 6, "dpmpp_2m", grid), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_the_result_is_in_x_T_s_layout_whatever_the_net_returns(gmm, sd_process, name):
    """A net returning channels_last for any input (Was: for a contiguous x_T, 17 solvers returned
    channels_last, dpm_2 and its kin among them, 13 contiguous, heun among them, by the order of the
    operands in their steps), and the same values as a net that keeps its input's layout."""
    exact = gmm.denoiser(sd_process, shape=(2, 2, 2))
    cl = torch.channels_last
    keeps = sd.Denoiser(
        lambda x, t: torch.empty_like(x).copy_(exact.net(x, t)), sd_process, "x0", shape=(2, 2, 2)
    )
    changes = sd.Denoiser(
        lambda x, t: exact.net(x, t).contiguous(memory_format=cl), sd_process, "x0", shape=(2, 2, 2)
    )
    images = noise(4, 8).reshape(-1, 2, 2, 2)
    for x_T, layout in ((images, torch.contiguous_format), (images.contiguous(memory_format=cl), cl)):
        for final in ("zero", "none"):
            ref = sd.sample(keeps, x_T, 6, name, final=final, generator=_gen())
            x = sd.sample(changes, x_T, 6, name, final=final, generator=_gen())
            assert ref.is_contiguous(memory_format=layout) and x.is_contiguous(memory_format=layout), final
            assert torch.equal(x, ref)
    if not sd.solvers.get(name).stochastic:
        assert sd.invert(changes, images, 6, name).is_contiguous()


# --- breaks: where the field jumps, the history restarts -------------------------------------------------


@dataclasses.dataclass
class _Recording(sd.solvers.UniPC):
    """UniPC-3 recording the steps after which ``run_grid`` restarts its history; ``strict``: refuse."""

    strict: bool = False
    made: int = 0
    calls: list[int] = dataclasses.field(default_factory=list)

    def step(self, model, x, i, grid, state):
        self.made = i
        return super().step(model, x, i, grid, state)

    def moved(self, state):
        assert not self.strict, f"moved after step {self.made}"
        self.calls.append(self.made)
        super().moved(state)


def test_breaks_are_the_jumps_of_each_wrapper_and_of_those_it_wraps(gmm, sd_process):
    """``Denoiser.breaks()``: RF-Inversion's window ends at ``t = 1 - stop, 1 - start`` (only those inside the
    process's range; none where nothing jumps); a wrapper adds its own to those of the denoisers it wraps
    (CFG's two branches, ``DynamicThreshold``), mapped by equal log-SNR onto another process
    (``Reprocessed``). CFG's guidance interval declares none (measured: see ``CFG``)."""
    from steerdiff.guidance import CFG
    from steerdiff.rf_inversion import ControlledEditing

    den = gmm.denoiser(sd_process)
    assert den.breaks() == ()
    assert CFG(den, den, 3.0, interval=(0.28, 2.9)).breaks() == ()
    flow = sd.RectifiedFlow()
    on_flow = gmm.denoiser(flow)
    inner = ControlledEditing(on_flow, torch.zeros(1, 8), 0.7, 0.1, 0.5)
    assert inner.breaks() == pytest.approx([0.5, 0.9], rel=1e-12)
    nested = ControlledEditing(
        CFG(inner, on_flow, 3.0, interval=(0.28, 2.9)), torch.zeros(1, 8), 0.5, 0.0, 0.3
    )
    assert nested.breaks() == pytest.approx([0.5, 0.7, 0.9], rel=1e-12)  # its own 0.7, the inner's two
    assert sd.guidance.DynamicThreshold(nested).breaks() == nested.breaks()
    moved = sd.Reprocessed(inner, sd_process)  # at the times of SD's process with inner's sigma/alpha there
    assert [float(sd_process.sigma(t) / sd_process.alpha(t)) for t in moved.breaks()] == pytest.approx(
        [0.5 / 0.5, 0.9 / 0.1], rel=1e-9
    )
    # the window from the run's start (tau = 0: t = 1) or to its end (t = 0) has no break there; eta = 0 none
    assert ControlledEditing(on_flow, torch.zeros(1, 8), 0.7).breaks() == (0.75,)
    assert ControlledEditing(on_flow, torch.zeros(1, 8), 0.7, 0.0, 1.0).breaks() == ()
    assert ControlledEditing(on_flow, torch.zeros(1, 8), 0.0, 0.2, 0.6).breaks() == ()

    class Switch(sd.Denoiser):  # a user's wrapper declaring a break "never" (inf) beside a real one
        def own_breaks(self):
            return (math.inf, 0.5, -math.inf, math.nan)

    assert Switch(on_flow.net, flow, "x0").breaks() == (0.5,)  # the finite ones only


def test_a_step_across_a_break_restarts_the_history(gmm):
    """``crossings``: the steps whose nodes lie on two pieces (a node on a break is on the less noisy side,
    where the field is evaluated there), down a sampling grid and up an inversion's; ``run_grid`` restarts
    the solver's history after them and after no other."""
    from steerdiff.rf_inversion import ControlledEditing
    from steerdiff.sampling import crossings
    from steerdiff.solvers.base import make_grid

    flow = sd.RectifiedFlow()
    edit = ControlledEditing(gmm.denoiser(flow), torch.zeros(1, 8), 0.7, stop=0.25)  # jumps at t = 0.75
    nodes = [0.999, 0.9, 0.75, 0.6, 0.3, 0.001]
    grid = make_grid(flow, sd.schedules.Custom(nodes), 5, "none")
    assert crossings(edit, grid) == {1}  # into the node on the break, evaluated uncontrolled
    assert crossings(edit, grid.reversed()) == {3}  # out of it, up the grid
    # a pipeline's breaks as a sequence of times, in any order: t = 0.65 in step 2, 0.75 ends step 1
    assert crossings([0.65, 0.75], grid) == crossings([0.75, 0.65], grid) == {1, 2}
    assert [edit.weight(t) > 0 for t in nodes] == [True, True, False, False, False, False]
    x_T = noise(4, 8)
    for steps, after in ((10, [2]), (20, [4]), (3, [0])):  # time_uniform: t = 0.999 - 0.998 i / steps
        solver = _Recording()
        sd.sample(edit, x_T, steps, solver, "time_uniform", final="none")
        assert solver.calls == after
    # up an inversion's grid: after the steps across the window's ends (t = 0.75 and 0.35)
    window = ControlledEditing(gmm.denoiser(flow), torch.zeros(1, 8), 0.7, 0.25, 0.65)
    solver = _Recording()
    _, info = sd.invert(window, x_T, 10, solver, "time_uniform", return_info=True)
    assert info.grid.t[0] < info.grid.t[-1] and solver.calls == sorted(crossings(window, info.grid))
    assert len(solver.calls) == 2
    # a break in the last step (t = 0.05 between 0.1008 and 0.001): no step left to restart for
    solver = _Recording()
    window = ControlledEditing(gmm.denoiser(flow), torch.zeros(1, 8), 0.7, stop=0.95)
    sd.sample(window, x_T, 10, solver, "time_uniform", final="none")
    assert crossings(window, make_grid(flow, sd.schedules.get("time_uniform"), 10, "none")) == set()
    assert solver.calls == []


def test_without_breaks_the_history_is_never_restarted(gmm, sd_process):
    """Denoisers whose field does not jump, or CFG's whose does at its interval's ends, take the run they
    took before the breaks: no ``moved`` at all (the plain denoiser, CFG with and without an interval, a
    window over the whole run or at ``eta = 0``), sampling and inverting."""
    from steerdiff.guidance import CFG
    from steerdiff.rf_inversion import ControlledEditing

    den, flow_den = gmm.denoiser(sd_process), gmm.denoiser(sd.RectifiedFlow())
    x_T = noise(4, 8)
    for d in (
        den,
        CFG(den, den, 3.0),
        CFG(den, den, 3.0, interval=(0.28, 2.9)),
        ControlledEditing(flow_den, torch.zeros(1, 8), 0.7, 0.0, 1.0),
        ControlledEditing(flow_den, torch.zeros(1, 8), 0.0, 0.2, 0.6),
    ):
        sd.sample(d, x_T, 10, _Recording(strict=True), "time_uniform")
        sd.invert(d, x_T, 10, _Recording(strict=True), "time_uniform")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_finite_check_of_half_outputs_does_not_overflow(sd_process, dtype):
    # the check sums each output: in float32 for half precision, whose sum of 8192 entries of 100 (8.2e5) is
    # past float16's 65504 though every entry is finite
    den = sd.Denoiser(lambda x, t: x, sd_process, "x0")
    model = sd.solvers.Model(den)
    pred = model(torch.full((2, 4096), 100.0, dtype=dtype), 0.5, 0)
    assert pred.x0.dtype == dtype and model.first_nonfinite() is None


def test_model_drops_the_last_prediction_before_the_next_call(sd_process):
    # Model.last is the latest prediction, released when the next call starts: the net does not run with the
    # previous estimates held (a batch of x0 and eps of device memory)
    seen: list[object] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(model.last)
        return 0.5 * x

    model = sd.solvers.Model(sd.Denoiser(net, sd_process, "x0"))
    first = model(torch.ones(2, 3), 0.5, 0)
    assert model.last is first and torch.equal(first.x0, torch.full((2, 3), 0.5))
    second = model(torch.ones(2, 3), 0.4, 1)
    assert seen == [None, None] and model.last is second
