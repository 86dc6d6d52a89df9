"""The scalar argument checks of ``steerdiff._checks`` and the sites that use them."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff._checks import boolean, choice, held_by, integer, real
from steerdiff._ops import first_false
from steerdiff.paradigms import ACCEPTED as PARADIGMS_ACCEPTED

from .reference import noise

# --- real ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(3), 3.0), (2, 2.0), (Fraction(1, 4), 0.25)],
)
def test_real_returns_a_plain_float(value, expected):
    out = real("W", "x", value)
    assert type(out) is float and out == expected


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {}, "W: x must be a finite number, got True"),
        (False, {"lo": 0}, "W: x must be a finite number >= 0, got False"),
        (math.nan, {}, "W: x must be a finite number, got nan"),
        (math.nan, {"lo": 0, "finite": False}, "W: x must be a number >= 0 or inf, got nan"),
        (math.inf, {}, "W: x must be a finite number, got inf"),
        (-math.inf, {}, "W: x must be a finite number, got -inf"),
        (math.inf, {"lo": 0, "hi": 1}, "W: x must be a finite number in [0, 1], got inf"),
        ("1.0", {"lo": 0}, "W: x must be a finite number >= 0, got '1.0'"),
        (None, {"lo": 0, "lo_open": True}, "W: x must be a finite number > 0, got None"),
        (torch.tensor(0.5), {}, "W: x must be a finite number, got tensor(0.5000)"),
        (-1.0, {"lo": 0}, "W: x must be a finite number >= 0, got -1.0"),
        (2, {"hi": 1}, "W: x must be a finite number <= 1, got 2"),
        (1.0, {"hi": 1, "hi_open": True}, "W: x must be a finite number < 1, got 1.0"),
        (0.0, {"lo": 0, "hi": 1, "lo_open": True}, "W: x must be a finite number in (0, 1], got 0.0"),
        (1.0, {"lo": 0, "hi": 1, "hi_open": True}, "W: x must be a finite number in [0, 1), got 1.0"),
        (0.05, {"lo": 0.1, "hi": 2.5}, "W: x must be a finite number in [0.1, 2.5], got 0.05"),
        (np.float32(-1), {"lo": 0}, "W: x must be a finite number >= 0, got np.float32(-1.0)"),
        (0.0, {"lo": 0, "lo_open": True, "finite": False}, "W: x must be a number > 0 or inf, got 0.0"),
        (math.inf, {"lo": 0, "hi_open": True, "finite": False}, "W: x must be a number >= 0, got inf"),
        (math.nan, {"finite": False}, "W: x must be a number or -inf or inf, got nan"),
    ],
)
def test_real_rejects(value, kwargs, message):
    with pytest.raises(ValueError) as err:
        real("W", "x", value, **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {"lo": 0}),  # closed bounds include the boundary value
        (1, {"lo": 0, "hi": 1}),
        (0.5, {"lo": 0, "hi": 1, "lo_open": True, "hi_open": True}),
        (1e-300, {"lo": 0, "lo_open": True}),
        (math.inf, {"lo": 0, "finite": False}),
        (-math.inf, {"hi": 0, "finite": False}),
        (-1e300, {}),
    ],
)
def test_real_accepts(value, kwargs):
    assert real("W", "x", value, **kwargs) == value


def test_real_bounds_at_the_boundary():
    for open_ in (False, True):
        ok = not open_
        for kwargs in ({"lo": 2.0, "lo_open": open_}, {"hi": 2.0, "hi_open": open_}):
            if ok:
                assert real("W", "x", 2.0, **kwargs) == 2.0
            else:
                with pytest.raises(ValueError, match=r"W: x must be a finite number [<>] 2, got 2\.0"):
                    real("W", "x", 2.0, **kwargs)


# --- integer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), 3])
def test_integer_returns_a_plain_int(value):
    out = integer("W", "n", value, lo=1)
    assert type(out) is int and out == 3


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {}, "W: n must be an integer, got True"),
        (True, {"lo": 0}, "W: n must be an integer >= 0, got True"),
        (2.0, {"lo": 1}, "W: n must be an integer >= 1, got 2.0"),
        (np.float64(2.0), {"lo": 1}, "W: n must be an integer >= 1, got np.float64(2.0)"),
        ("3", {"lo": 1}, "W: n must be an integer >= 1, got '3'"),
        (0, {"lo": 1}, "W: n must be an integer >= 1, got 0"),
        (5, {"hi": 4}, "W: n must be an integer <= 4, got 5"),
        (5, {"lo": 0, "hi": 4}, "W: n must be an integer in [0, 4], got 5"),
        (-1, {"lo": 0, "hi": 4}, "W: n must be an integer in [0, 4], got -1"),
        (3, {"lo": 1, "hi": 1}, "W: n must be 1, got 3"),
        (1.0, {"lo": 1, "hi": 1}, "W: n must be 1, got 1.0"),
        (10**8, {"hi": 10**7}, "W: n must be an integer <= 10000000, got 100000000"),
    ],
)
def test_integer_rejects(value, kwargs, message):
    with pytest.raises(ValueError) as err:
        integer("W", "n", value, **kwargs)
    assert str(err.value) == message


def test_integer_bounds_are_closed():
    assert integer("W", "n", 0, lo=0, hi=4) == 0
    assert integer("W", "n", 4, lo=0, hi=4) == 4
    assert integer("W", "n", -(10**30)) == -(10**30)


# --- the sites agree -------------------------------------------------------------------------------


def _den(gmm, sd_process):
    return gmm.denoiser(sd_process)


# before: these sites took only ``int``/``float`` and refused numpy scalars (the schedules took them)
@pytest.mark.parametrize(
    ("make", "attr", "expected"),
    [
        (lambda d: sd.solvers.DDIM(eta=np.float32(0.5)), "eta", 0.5),
        (lambda d: sd.solvers.DPMSolverSDE(r=np.float32(0.5)), "r", 0.5),
        (lambda d: sd.solvers.DPMSolverPPMultistep(order=np.int64(2)), "order", 2),
        (lambda d: sd.solvers.SASolver(corrector_order=np.int64(1)), "corrector_order", 1),
        (lambda d: sd.mcmc.HMC(leapfrog_steps=np.int64(3)), "leapfrog_steps", 3),
        (lambda d: sd.mcmc.ULA(step_size=np.float32(0.25)), "step_size", 0.25),
        (lambda d: sd.guidance.CFG(d, d, np.float32(2.0)), "scale", 2.0),
        (lambda d: sd.inverse.Downsample(np.int64(2), (1, 4, 4)), "factor", 2),
        (lambda d: sd.schedules.Karras(rho=np.float32(7.0)), "rho", 7.0),
    ],
)
def test_numpy_scalars_are_accepted_as_plain_numbers(gmm, sd_process, make, attr, expected):
    value = getattr(make(_den(gmm, sd_process)), attr)
    assert value == expected and type(value) is type(expected)


# before: these accepted inf (a bound ``value <= inf`` or ``not value >= lo``); an infinite scale,
# noise or restart level gives non-finite samples
@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: sd.guidance.CFG(d, d, math.inf), "CFG: scale must be a finite number >= 0"),
        (lambda d: sd.guidance.CADS("y", math.inf), "CADS: noise_scale must be a finite number >= 0"),
        (lambda d: sd.solvers.EDMStochasticHeun(s_noise=math.inf), "s_noise must be a finite number >= 0"),
        (lambda d: sd.solvers.SASolver(tau=math.inf), "SASolver: tau must be a finite number >= 0"),
        (
            lambda d: sd.solvers.Restart(restart_info=[(0.1, math.inf, 1, 1)]),
            "Restart: s_max in restart_info (above its s_min) must be a finite number > 0.1",
        ),
        (
            lambda d: sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1)).posterior(
                torch.eye(2), torch.zeros(2), math.inf
            ),
            "GaussianMixture.posterior: noise_std must be a finite number >= 0",
        ),
    ],
)
def test_inf_is_rejected_where_it_was_accepted(gmm, sd_process, make, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make(_den(gmm, sd_process))


def _steered(den: sd.Denoiser, scale: float) -> list[tuple[str, sd.Denoiser]]:
    """Every guidance wrapper with a ``scale`` around ``den`` (an 8-d prior), at ``scale``."""
    cond = sd.toy.GaussianMixture(torch.zeros(1, 8), torch.ones(1, 8), torch.ones(1))
    A, y = torch.eye(2, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    return [
        ("CFG", sd.guidance.CFG(cond.denoiser(den.process), den, scale)),
        ("ClassifierGuidance", sd.guidance.ClassifierGuidance(den, lambda x, t: -(x**2).sum(1), scale)),
        ("RewardGuidance", sd.guidance.RewardGuidance(den, lambda x0: -(x0**2).sum(1), scale)),
        ("DPS", sd.guidance.DPS(den, sd.inverse.Matrix(A), y, noise_std=0.1, scale=scale)),
        ("MCG", sd.guidance.MCG(den, sd.inverse.Matrix(A), y, noise_std=0.1, scale=scale)),
        ("PiGDM", sd.guidance.PiGDM(den, sd.inverse.Matrix(A), y, noise_std=0.1, scale=scale)),
    ]


def test_a_scale_beyond_the_samples_dtype_is_refused_by_name(gmm, sd_process):
    # before: on float32 samples CFG raised torch's bare "RuntimeError: value cannot be converted to type
    # float without overflow" (torch.lerp); the others made every entry inf/NaN, reported by sd.sample as
    # "the model returned NaN/inf at step 0"
    x32 = noise(3, 8, dtype=torch.float32)
    for who, den in _steered(_den(gmm, sd_process), 1e39):
        with pytest.raises(ValueError) as err:
            sd.sample(den, x32, 2)
        assert str(err.value) == (
            f"{who}: scale must be at most 3.403e+38 in magnitude, the largest float32 (the dtype it is "
            "applied in), got 1e+39"
        )
    # float64 samples hold it: the CFG combination eps_u + w (eps_c - eps_u), as it reads
    cfg = _steered(_den(gmm, sd_process), 1e39)[0][1]
    x64, t = noise(3, 8), 500.0
    pc, pu = cfg.base(x64, t), cfg.uncond(x64, t)
    assert torch.allclose(cfg(x64, t).eps, pu.eps + 1e39 * (pc.eps - pu.eps), rtol=1e-12, atol=0)
    # the largest float32 itself is accepted
    big = torch.finfo(torch.float32).max
    assert held_by("CFG", "scale", big, torch.float32) == big


# before: EDMStochasticHeun(s_tmin=inf) said "s_tmax must be a number >= inf or inf, got 50.0", naming the
# argument the user left alone; SelfRecurrence(inner=...) said "unknown solver=..."
@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: sd.solvers.EDMStochasticHeun(s_tmin=math.inf),
            r"need s_tmin <= s_tmax, got s_tmin=inf, s_tmax=50",
        ),
        (
            lambda: sd.solvers.EDMStochasticHeun(s_tmax=0.01),
            r"need s_tmin <= s_tmax, got s_tmin=0\.05, s_tmax=0\.01",
        ),
        (lambda: sd.solvers.SelfRecurrence(inner="nope"), r"^SelfRecurrence: inner: unknown solver='nope'"),
    ],
)
def test_a_pair_or_a_nested_solver_is_named(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()
    assert sd.solvers.EDMStochasticHeun(s_tmin=1.0, s_tmax=1.0).s_tmax == 1.0  # equal: still accepted


# before: ``float(noise_std)`` let a bool, a numeric string or a tensor through
@pytest.mark.parametrize("bad", [True, "0.1", torch.tensor(0.1)])
def test_operator_noise_std_must_be_a_number(bad):
    with pytest.raises(ValueError, match="Matrix: noise_std must be a finite number >= 0"):
        sd.inverse.Matrix(torch.eye(2), noise_std=bad)
    with pytest.raises(ValueError, match=r"Matrix\.aat_solve: shift must be a finite number >= 0"):
        sd.inverse.Matrix(torch.eye(2)).aat_solve(torch.zeros(1, 2), bad)


# unchanged: where inf means something, it is still accepted
def test_inf_is_kept_where_it_means_something(gmm, sd_process):
    den = _den(gmm, sd_process)
    assert sd.solvers.EDMStochasticHeun(s_tmax=math.inf).s_tmax == math.inf  # churn at every level
    assert sd.solvers.DPMSolverPPMultistep(max_h=math.inf).max_h == math.inf  # no long-step limit
    assert sd.guidance.CFG(den, den, 2.0, interval=(0.5, math.inf)).interval == (0.5, math.inf)
    with pytest.raises(ValueError, match=r"svdd: alpha must be a number >= 0 or inf, got -1\.0"):
        sd.smc.svdd(den, lambda x: x[:, 0], -1.0, shape=(1, 2), particles=2, steps=2)


def test_choice_and_boolean():
    assert choice("UniPC", "variant", "bh2", ("bh1", "bh2")) == "bh2"
    for bad in ("bh3", None, 2):
        with pytest.raises(ValueError, match=r"^UniPC: variant must be one of \['bh1', 'bh2'\], got "):
            choice("UniPC", "variant", bad, ("bh1", "bh2"))
    assert boolean("UniPC", "corrector", False) is False
    assert boolean("UniPC", "corrector", np.bool_(True)) is True
    for bad in ("no", 0, 1, None):
        with pytest.raises(ValueError, match=r"^UniPC: corrector must be True or False, got "):
            boolean("UniPC", "corrector", bad)


def test_first_false_reads_the_flags_once():
    assert first_false(torch.tensor([True, True])) is None
    assert first_false(torch.tensor([True, False, True, False])) == 1


# --- the messages of the shared resolvers and input checks name the function called -----------------

_X = torch.zeros(2, 2)
_MASK = torch.tensor([True, False])
_SMC = {"shape": (1, 2), "particles": 2, "steps": 3}


def _reward(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0]


class _Mine(sd.smc.SMCAlgorithm):
    """A user's algorithm keeping the base class's name: its messages name run_smc."""


# before: "unknown solver='nope'; accepted: [...]", "x_T must be a torch.Tensor, got list" and the
# like, naming the argument but not which of sample, repaint_sample, pcg, the sd.smc samplers or
# run_smc refused it (the resolvers and checks are shared by all of them)
@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda den: sd.sample(den, _X, 5, solver="nope"),
            r"^sample: unknown solver='nope'; accepted: \['accel_ddim', 'accel_ddpm', 'cps', 'ddim'",
        ),
        (
            lambda den: sd.sample(den, _X, 5, schedule="nope"),
            r"^sample: unknown schedule='nope'; accepted: \['ays', .*a Schedule object",
        ),
        (lambda den: sd.sample(den, [[0.0, 0.0]], 5), r"^sample: x_T must be a torch\.Tensor, got list$"),
        (lambda den: sd.sample(den, _X.long(), 5), r"^sample: x_T must have a floating dtype"),
        (lambda den: sd.sample(den, _X[0], 5), r"^sample: x_T must be batched"),
        (lambda den: sd.sample(den, _X + math.nan, 5), r"^sample: x_T contains NaN or inf$"),
        (lambda den: sd.sample(den, torch.zeros(2, 3), 5), r"^sample: x_T has sample shape \(3,\)"),
        (lambda den: sd.sample("den", _X, 5), r"^sample: den must be a steerdiff Denoiser"),
        (
            lambda den: sd.sample(den, _X, 5, corrector="nope"),
            r"^sample: unknown corrector='nope'; accepted: None, \['hmc'",
        ),
        (
            lambda den: sd.sample(den, _X, 5, generator=[torch.Generator()]),
            r"^sample: generator: 1 generators for a batch of 2 rows",
        ),
        (
            lambda den: sd.sample(
                sd.guidance.RePaint(den, sd.inverse.Inpaint(_MASK), _X[:, :1]),
                _X,
                5,
                generator=torch.Generator(),
            ),
            r"^sample: generator: RePaint .* global RNG",
        ),
        (
            lambda den: sd.guidance.repaint_sample(
                den, sd.inverse.Inpaint(_MASK), _X[:, :1], _X, 3, schedule="nope"
            ),
            r"^repaint_sample: unknown schedule='nope'; accepted: \[",
        ),
        (
            lambda den: sd.guidance.repaint_sample(
                den, sd.inverse.Inpaint(_MASK), _X[:, :1], [[0.0, 0.0]], 3
            ),
            r"^repaint_sample: x_T must be a torch\.Tensor, got list$",
        ),
        (lambda den: sd.guidance.pcg(den, den, [[0.0]], 3, 1.0), r"^pcg: x_T must be a torch\.Tensor"),
        (
            lambda den: sd.guidance.pcg(den, den, _X, 3, 1.0, schedule="nope"),
            r"^pcg: unknown schedule='nope'; accepted: \[",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, solver="nope", **_SMC),
            r"^fk_steering: unknown solver='nope'; accepted: \['accel_ddim', 'accel_ddpm', 'cps', 'ddim'",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, schedule="nope", **_SMC),
            r"^fk_steering: unknown schedule='nope'; accepted: \[",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, resampler="nope", **_SMC),
            r"^fk_steering: unknown resampler='nope'; accepted: \['multinomial'",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, **{**_SMC, "shape": (2,)}),
            r"^fk_steering: shape must be \(batch, \*sample_shape\)",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, **{**_SMC, "shape": (1, 3)}),
            r"^fk_steering: shape has sample shape \(3,\), the denoiser expects \(2,\)",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, x_T=_X, **_SMC),
            r"^fk_steering: x_T must be \(batch, particles, \*shape\) = \(1, 2, 2\) for shape=\(1, 2\) and "
            r"particles=2, got \(2, 2\)",
        ),
        (
            lambda den: sd.smc.fk_steering(den, _reward, 1.0, x_T=torch.full((1, 2, 2), math.nan), **_SMC),
            r"^fk_steering: x_T contains NaN or inf$",
        ),
        (lambda den: sd.smc.fk_steering(den, 3, 1.0, **_SMC), r"^fk_steering: reward must be a callable"),
        (
            lambda den: sd.smc.fk_steering(den, lambda x: x, 1.0, **_SMC),
            r"^fk_steering: reward must map a batch",
        ),
        (lambda den: sd.smc.svdd(den, 3, **_SMC), r"^svdd: reward must be a callable"),
        (lambda den: sd.smc.code(den, _reward, solver="nope", **_SMC), r"^code: unknown solver='nope'"),
        (lambda den: sd.smc.run_smc(den, "fk", (1, 2), particles=2, steps=3), r"^run_smc: algorithm must be"),
        (lambda den: sd.smc.run_smc(den, _Mine(), (2,), particles=2, steps=3), r"^run_smc: shape must be"),
        (lambda den: sd.smc.run_smc("den", _Mine(), (1, 2), particles=2, steps=3), r"^run_smc: den must be"),
    ],
)
def test_messages_name_the_function(sd_process, call, pattern):
    one = torch.ones(1, 2, dtype=torch.float64)
    den = sd.toy.GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), one, one[0, :1]).denoiser(sd_process)
    with pytest.raises(ValueError, match=pattern):
        call(den)


def test_the_resolvers_name_their_caller_where_given():
    """``who`` prefixes the message; without it the message is as before (SelfRecurrence adds its own)."""
    cases = [
        (sd.solvers.get, "solver"),
        (sd.schedules.get, "schedule"),
        (sd.smc.resample.get, "resampler"),
        (sd.mcmc.get, "corrector"),
    ]
    for get, name in cases:
        with pytest.raises(ValueError, match=rf"^W: unknown {name}='nope'; accepted: "):
            get("nope", "W")
        with pytest.raises(ValueError, match=rf"^unknown {name}='nope'; accepted: "):
            get("nope")


# before: set_timesteps(10, device="gpu0") raised torch's bare "RuntimeError: Invalid device string:
# 'gpu0'" from inside (device=3.5 a TypeError about Tensor.to), as did noise.randn / rand and
# LinearOperator.to_dense; the digits loaders safetensors' "device gpu0 is invalid"
@pytest.mark.parametrize("bad", ["gpu0", 3.5])
def test_a_device_argument_is_checked_where_it_is_given(bad):
    accepted = (
        r"device must be a torch\.device or a device string torch accepts \(such as 'cpu', 'cuda', 'cuda:0'\)"
    )
    got = re.escape(f", got {bad!r}")
    calls = [
        ("randn", lambda: sd.noise.randn((2, 2), None, None, bad)),
        ("rand", lambda: sd.noise.rand((2, 2), None, None, bad)),
        ("Matrix.to_dense", lambda: sd.inverse.Matrix(torch.eye(2)).to_dense(device=bad)),
    ]
    for who, call in calls:
        with pytest.raises(ValueError, match=rf"^{re.escape(who)}: {accepted} or None{got}"):
            call()
    from steerdiff.toy import digits

    for who in ("load_digits_denoiser", "load_classifier", "load_noisy_classifier"):
        with pytest.raises(ValueError, match=rf"^{who}: {accepted}{got}"):
            getattr(digits, who)(device=bad)
    assert sd.noise.randn((2, 2), None, None, "cpu").device.type == "cpu"  # strings torch accepts still work
    assert sd.inverse.Matrix(torch.eye(2)).to_dense(device=None).shape == (2, 2)


@pytest.mark.parametrize("bad", ["gpu0", 3.5, True])
def test_set_timesteps_names_a_bad_device(bad):
    pytest.importorskip("diffusers")
    from steerdiff.integrations.diffusers import SteerdiffScheduler

    sched = SteerdiffScheduler()
    pattern = (
        r"^set_timesteps: device must be a torch\.device or a device string torch accepts \(such as 'cpu', "
        rf"'cuda', 'cuda:0'\) or None, got {re.escape(repr(bad))}"
    )
    with pytest.raises(ValueError, match=pattern):
        sched.set_timesteps(10, device=bad)
    sched.set_timesteps(10, device="cpu")
    assert sched.timesteps.device.type == "cpu" and sched.sigmas.device.type == "cpu"
    sched.set_timesteps(10, device=None)
    assert len(sched.timesteps) == 10


def test_a_device_index_is_a_device():
    """A device index, as torch takes it (``torch.cuda.current_device()``, ``torch.device(0)``), reaches
    torch, as it did before 6b35560 (which refused it as 'not a device string' also where it exists): the
    accelerator's device where there is one, else torch's reason; a bool is still refused."""
    calls = [
        lambda d: sd.noise.randn((2, 2), None, None, d).device,
        lambda d: sd.noise.rand((2, 2), None, None, d).device,
        lambda d: sd.inverse.Matrix(torch.eye(2)).to_dense(device=d).device,
    ]
    for call in calls:
        if torch.cuda.is_available():
            assert call(0) == torch.device("cuda", 0)
        else:  # torch's own reason (its wording varies with the version), not a refusal of the index
            with pytest.raises((ValueError, RuntimeError, AssertionError)) as err:
                call(0)
            assert not str(err.value).endswith("or None, got 0"), err.value
        with pytest.raises(ValueError, match=r"or None, got True$"):
            call(True)


def test_unknown_solver_lists_what_the_entry_point_takes():
    """``invert`` / ``rf_invert`` take deterministic solvers only and ``paradigms`` not PNDM / PLMS; an
    unknown name's message listed every registered solver, the ones each then refuses included."""
    ones = torch.ones(1, 2, dtype=torch.float64)
    gmm = sd.toy.GaussianMixture(0 * ones, ones, torch.ones(1, dtype=torch.float64))
    den = gmm.denoiser(sd.RectifiedFlow())
    x = torch.zeros(2, 2, dtype=torch.float64)
    calls = {
        "invert": (lambda: sd.invert(den, x, 5, "nope"), sd.inversion.deterministic_solvers()),
        "rf_invert": (
            lambda: sd.rf_inversion.rf_invert(den, x, x, 0.5, 5, "nope"),
            sd.inversion.deterministic_solvers(),
        ),
        "paradigms": (lambda: sd.paradigms(den, x, 5, "nope"), list(PARADIGMS_ACCEPTED)),
    }
    for who, (call, names) in calls.items():
        with pytest.raises(ValueError, match=rf"^{who}: unknown solver='nope'") as err:
            call()
        assert str(err.value).split("accepted: ")[1].startswith(repr(names)), who
    assert "ddpm" not in sd.inversion.deterministic_solvers() and "pndm" not in PARADIGMS_ACCEPTED


# before: these ran sd.sample / sd.invert inside and their messages named those ("sample: steps must be an
# integer >= 1, got 0" from rf_edit), not the function called
@pytest.mark.parametrize(
    ("who", "call", "message"),
    [
        ("epsilon_norms", lambda den, x: sd.guidance.epsilon_norms(den, x, x, 0), "steps must be an integer"),
        (
            "epsilon_norms",
            lambda den, x: sd.guidance.epsilon_norms(den, x, x, 3, "ddpm", generator=[torch.Generator()]),
            "generator: 1 generators for a batch of 2 rows",
        ),
        # before: final= ran the sampler and reached the net too (a TypeError there); callback= collided
        # with its own (TypeError: multiple values)
        (
            "epsilon_norms",
            lambda den, x: sd.guidance.epsilon_norms(den, x, x, 3, final="none"),
            "final is an argument of sample, not of epsilon_norms",
        ),
        (
            "epsilon_norms",
            lambda den, x: sd.guidance.epsilon_norms(den, x, x, 3, callback=print, return_info=True),
            "callback, return_info are arguments of sample, not of epsilon_norms",
        ),
        ("rf_edit", lambda den, x: sd.rf_inversion.rf_edit(den, x, x, steps=0), "steps must be an integer"),
        ("rf_edit", lambda den, x: sd.rf_inversion.rf_edit(den, x, x, final="nope"), "final must be one of"),
        ("rf_edit", lambda den, x: sd.rf_inversion.rf_edit(den, x, x, snr=0.3), "snr has no effect"),
        (
            "rf_edit",
            lambda den, x: sd.rf_inversion.rf_edit(den, x, x, corrector="ula", corrector_steps=0),
            "corrector_steps must be an integer >= 1",
        ),
        (
            "rf_invert",
            lambda den, x: sd.rf_inversion.rf_invert(den, x, x, steps=0),
            "steps must be an integer",
        ),
        (
            "rf_invert",
            lambda den, x: sd.rf_inversion.rf_invert(den, x, x, final="zero"),
            "final is an argument of sample, not of rf_invert",
        ),
        (
            "distributed.sample",
            lambda den, x: sd.distributed.sample(den, x, 3, group=None, callback=3),
            "callback must be None or a callable",
        ),
    ],
)
def test_an_entry_point_running_sample_or_invert_names_itself(who, call, message):
    ones = torch.ones(1, 2, dtype=torch.float64)
    den = sd.toy.GaussianMixture(0 * ones, ones, torch.ones(1, dtype=torch.float64)).denoiser(
        sd.RectifiedFlow()
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(who)}: {re.escape(message)}"):
        call(den, torch.zeros(2, 2, dtype=torch.float64))
