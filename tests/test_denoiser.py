"""Denoiser: every parameterization recovers the (x0, eps) pair it was built from."""

from __future__ import annotations

import math
import re

import pytest
import torch

import steerdiff as sd

F64 = torch.float64

PROCESSES = {
    "vp_discrete": (sd.VP.scaled_linear(), [999.0, 500.0, 123.4, 0.0]),
    "vp_linear": (sd.VP.linear(), [1.0, 0.5, 0.01]),
    "ve": (sd.VE(), [1.0, 0.3, 0.0]),
    "edm": (sd.EDM(), [80.0, 1.0, 0.002]),
    "rectified_flow": (sd.RectifiedFlow(), [0.999, 0.5, 0.001]),
}


def _target(prediction: str, p: sd.Process, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor):
    """The quantity a net of this parameterization is trained to output (from the definitions)."""
    shape = (-1, *([1] * (x0.ndim - 1)))
    a, s = p.alpha(t).reshape(shape), p.sigma(t).reshape(shape)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":  # Salimans & Ho 2022
        return a * eps - s * x0
    if prediction == "score":  # grad log p(x_t | x0) = -(x_t - a x0) / s^2 = -eps / s
        return -eps / s
    if isinstance(p, sd.RectifiedFlow):  # d/dt ((1 - t) x0 + t eps)
        return eps - x0
    return p.d_alpha(t).reshape(shape) * x0 + p.d_sigma(t).reshape(shape) * eps


class _Net:
    """A net that outputs the exact target for a fixed ``(x0, eps)``, recording its inputs."""

    def __init__(self, prediction, process, x0, eps):
        self.prediction, self.process, self.x0, self.eps = prediction, process, x0, eps
        self.calls: list[tuple[torch.Tensor, dict]] = []

    def __call__(self, x, t, **cond):
        self.calls.append((t, cond))
        return _target(self.prediction, self.process, t.to(F64), self.x0, self.eps)


@pytest.mark.parametrize("prediction", sd.denoiser.PREDICTIONS)
@pytest.mark.parametrize("kind", list(PROCESSES))
def test_round_trip(prediction, kind):
    p, times = PROCESSES[kind]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(4, 2, 3, generator=g, dtype=F64)
    for t in times:
        tt = torch.full((4,), t, dtype=F64)
        x = p.alpha(t) * x0 + p.sigma(t) * eps
        net = _Net(prediction, p, x0, eps)
        out = sd.Denoiser(net, p, prediction=prediction)(x, t)
        assert isinstance(out, sd.Prediction)
        assert len(net.calls) == 1  # one net call for both estimates
        assert torch.equal(net.calls[0][0], tt)  # net time = process time, one per sample
        scale = 1.0 + float(x.abs().max())
        assert float((out.x0 - x0).abs().max()) < 1e-10 * scale, (kind, prediction, t)
        assert float((out.eps - eps).abs().max()) < 1e-10 * scale, (kind, prediction, t)


@pytest.mark.parametrize("prediction", sd.denoiser.PREDICTIONS)
def test_round_trip_per_sample_times(prediction):
    """A ``(batch,)`` tensor of times: each sample converted at its own ``(alpha, sigma)``."""
    p = sd.VP.scaled_linear()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 5, generator=g, dtype=F64)
    eps = torch.randn(4, 5, generator=g, dtype=F64)
    t = torch.tensor([999.0, 600.5, 50.0, 1.0], dtype=F64)
    x = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
    net = _Net(prediction, p, x0, eps)
    out = sd.Denoiser(net, p, prediction=prediction)(x, t)
    assert torch.equal(net.calls[0][0], t)
    assert torch.allclose(out.x0, x0, rtol=0, atol=1e-10)
    assert torch.allclose(out.eps, eps, rtol=0, atol=1e-10)


def test_cond_kwargs_and_time_map_reach_the_net():
    p = sd.VP.scaled_linear()
    x = torch.randn(3, 2, dtype=F64)
    seen = {}

    def net(x, t, *, context, scale):
        seen.update(t=t, context=context, scale=scale)
        return torch.zeros_like(x)

    ctx = torch.arange(3.0)
    den = sd.Denoiser(net, p, prediction="eps", time_map=lambda t: t / 1000)
    out = den(x, 250.0, context=ctx, scale=7.5)
    assert seen["context"] is ctx and seen["scale"] == 7.5
    assert torch.equal(seen["t"], torch.full((3,), 0.25, dtype=F64))
    # eps = 0 -> x0 = x / alpha
    assert torch.allclose(out.x0, x / p.alpha(250.0), rtol=1e-15, atol=0)


def test_a_net_condition_may_be_named_x_or_t():
    """``Denoiser.__call__`` and ``Guided.__call__`` take ``x`` and ``t`` positional-only, so a net
    condition named ``x`` or ``t`` reaches the net, in a direct call and through ``sd.sample`` (which
    calls ``den(x, t, **cond)``) with a plain or a guided denoiser (before: a TypeError, multiple values
    for ``x``); bit for bit the net with the condition baked in."""
    p = sd.VP.scaled_linear()
    seen = []
    c = torch.tensor([[0.5], [-0.2], [0.1]], dtype=F64)

    def net(z, s, *, x, t):
        seen.append((x, t))
        return 0.3 * z * x + t

    named = sd.Denoiser(net, p, prediction="eps")
    baked = sd.Denoiser(lambda z, s: 0.3 * z * c + 0.25, p, prediction="eps")
    x_T = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(named(x_T, 500.0, x=c, t=0.25).x0, baked(x_T, 500.0).x0)
    for wrap in (lambda d: d, lambda d: sd.guidance.DynamicThreshold(d, 0.9)):
        seen.clear()
        out = sd.sample(wrap(named), x_T, 4, "ddim", x=c, t=0.25)
        assert len(seen) == 4 and all(x is c and t == 0.25 for x, t in seen)
        assert torch.equal(out, sd.sample(wrap(baked), x_T, 4, "ddim"))


def test_half_precision_input_gets_float32_time():
    p = sd.EDM()
    seen = {}

    def net(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    sd.Denoiser(net, p, prediction="eps")(torch.zeros(2, 3, dtype=torch.float16), 2.5)
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [2.5, 2.5]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (F64, F64),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_per_sample_times_reach_the_net_in_the_states_dtype(dtype, expected):
    """A ``(batch,)`` tensor of times is handed to the net in ``x``'s dtype (float32 for half precision),
    not rounded further: float16 would give 123.4 -> 123.375, 999.7 -> 999.5."""
    t = torch.tensor([999.7, 123.4, 0.3], dtype=F64)
    seen = {}

    def net(x, tt):
        seen["t"] = tt
        return torch.zeros_like(x)

    sd.Denoiser(net, sd.VP.scaled_linear(), prediction="eps")(torch.zeros(3, 2, dtype=dtype), t)
    assert seen["t"].dtype == expected and torch.equal(seen["t"], t.to(expected))


def test_unknown_prediction_lists_accepted():
    with pytest.raises(ValueError) as err:
        sd.Denoiser(lambda x, t: x, sd.EDM(), prediction="epsilon")
    for name in ("eps", "x0", "v", "score", "flow"):
        assert repr(name) in str(err.value)
    assert "epsilon" in str(err.value)


def test_bad_process_and_output_shape_raise():
    with pytest.raises(ValueError, match="process"):
        sd.Denoiser(lambda x, t: x, "edm", prediction="eps")
    den = sd.Denoiser(lambda x, t: x[:, :1], sd.EDM(), prediction="eps")
    with pytest.raises(ValueError, match="shape"):
        den(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="`net` must be callable"):
        sd.Denoiser(None, sd.EDM())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"time_map": "linear"}, "time_map"),
        ({"time_map": 1000.0}, "time_map"),
        ({"shape": 2}, "shape"),
        ({"shape": "ab"}, "shape"),
        ({"shape": (2, -1)}, r"shape\[1\]"),
        ({"shape": (2.5,)}, r"shape\[0\]"),
        ({"shape": (True,)}, r"shape\[0\]"),
        ({"learned_variance": "no"}, "learned_variance"),
        ({"learned_variance": 1}, "learned_variance"),
        ({"learned_variance": None}, "learned_variance"),
    ],
)
def test_bad_denoiser_options_are_named(kwargs, name):
    """``time_map``, ``shape`` and ``learned_variance`` are checked where they enter: a string
    ``learned_variance="no"`` would be truthy, a non-callable ``time_map`` would fail at the first net
    call."""
    with pytest.raises(ValueError, match=f"Denoiser: {name}|Denoiser: `{name}`"):
        sd.Denoiser(lambda x, t: x, sd.EDM(), "eps", **kwargs)


@pytest.mark.parametrize(
    "name, ours", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v"), ("flow_prediction", "flow")]
)
def test_a_diffusers_prediction_type_is_told_its_name(name, ours):
    # a diffusers user writes prediction="v_prediction"; the message listed the accepted names only
    hint = re.escape(f"(diffusers' prediction_type '{name}' is prediction='{ours}')")
    with pytest.raises(ValueError, match=f"unknown prediction='{name}'; accepted: .* {hint}$"):
        sd.Denoiser(lambda x, t: x, sd.EDM(), name)
    assert sd.Denoiser(lambda x, t: x, sd.EDM(), ours).prediction == ours
    with pytest.raises(ValueError, match=r"accepted: \('eps', 'x0', 'v', 'score', 'flow'\)$"):  # no hint
        sd.Denoiser(lambda x, t: x, sd.EDM(), "noise")


def test_denoiser_shape_accepts_a_list_and_torch_size():
    assert sd.Denoiser(lambda x, t: x, sd.EDM(), shape=[1, 2]).shape == (1, 2)
    assert sd.Denoiser(lambda x, t: x, sd.EDM(), shape=torch.zeros(3, 1, 2).shape[1:]).shape == (1, 2)


class _ModelOutput:  # what a diffusers model returns: the tensor is its .sample
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


@pytest.mark.parametrize("wrap", [_ModelOutput, lambda f: (f,), lambda f: f.numpy()])
def test_a_net_that_returns_no_tensor_is_named(wrap):
    den = sd.Denoiser(lambda x, t: wrap(torch.zeros_like(x)), sd.EDM())
    with pytest.raises(ValueError, match=r"net returned a .*not a Tensor.*denoiser_from_diffusers"):
        sd.sample(den, torch.zeros(2, 3), steps=2)


@pytest.mark.parametrize("given", ["x0", "eps"])
def test_prediction_derives_the_other_estimate_and_renoises(given):
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    a, s = 0.6, 0.8
    x = a * x0 + s * eps
    pred = sd.Prediction(x, a, s, **{given: x0 if given == "x0" else eps})
    assert pred.given is (pred.x0 if given == "x0" else pred.eps)
    assert torch.allclose(pred.x0, x0, atol=1e-13) and torch.allclose(pred.eps, eps, atol=1e-13)
    for a2, s2 in ((0.9, 0.3), (1.0, 0.0)):  # including the clean end
        assert torch.allclose(pred.renoise(a2, s2), a2 * x0 + s2 * eps, atol=1e-13)
    with pytest.raises(ValueError, match="exactly one of `x0` or `eps`"):
        sd.Prediction(x, a, s)


def test_sample_rejects_non_finite_x_T():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    x_T = torch.zeros(3, 2)
    x_T[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):
        sd.sample(gmm.denoiser(sd.VP.scaled_linear()), x_T, steps=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prediction", sd.denoiser.PREDICTIONS)
def test_evaluate_runs_only_the_net_in_half_precision(prediction, dtype):
    """``evaluate(x, t, dtype)``: the net sees ``x`` in ``dtype``; its output is upcast and converted at
    the float32 ``x`` itself (as diffusers' ``step`` does with ``model_output.float()``)."""
    p, t = sd.VP.scaled_linear(), 250.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    f = torch.randn(4, 3, generator=g).to(dtype)
    seen = {}

    def net(xin, tm):
        seen["x"], seen["t"] = xin, tm
        return f

    den = sd.Denoiser(net, p, prediction=prediction)
    pred = den.evaluate(x, t, dtype)
    assert (
        seen["x"].dtype == dtype and torch.equal(seen["x"], x.to(dtype)) and seen["t"].dtype == torch.float32
    )
    ref = sd.Denoiser(lambda xin, tm: f.float(), p, prediction=prediction)(x, t)  # float32 throughout
    assert pred.x is x and pred.x0.dtype == pred.eps.dtype == torch.float32
    assert torch.equal(pred.x0, ref.x0) and torch.equal(pred.eps, ref.eps)
    # float32 in, float32 net: the plain call
    same = den.evaluate(x, t, torch.float32)
    assert torch.equal(
        same.given, sd.Denoiser(lambda xin, tm: f.float(), p, prediction=prediction)(x, t).given
    )


def test_evaluate_learned_variance_and_wrappers():
    p, t = sd.VP.scaled_linear(), 600.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 5, generator=g)
    out = torch.randn(2, 4, 5, generator=g).to(torch.bfloat16)
    den = sd.Denoiser(lambda xin, tm: out, p, prediction="eps", learned_variance=True)
    pred = den.evaluate(x, t, torch.bfloat16)
    eps, r = out.float().chunk(2, dim=1)
    assert torch.equal(pred.eps, eps) and torch.equal(pred.var_interp, (r + 1) / 2)
    assert pred.var_interp.dtype == torch.float32

    class Shift(sd.Denoiser):
        """A wrapper (overrides ``__call__``): it is called in the net's dtype, as guidance is."""

        def __init__(self, base):
            super().__init__(base.net, base.process, base.prediction, learned_variance=True)
            self.base, self.seen = base, None

        def __call__(self, x, t, **cond):
            self.seen = x.dtype
            q = self.base(x, t, **cond)
            s = sd.Prediction(q.x, q.alpha, q.sigma, eps=q.eps + 1)
            s.var_interp = q.var_interp
            return s

    w = Shift(den)
    pred = w.evaluate(x, t, torch.bfloat16)
    assert w.seen == torch.bfloat16 and pred.x is x
    assert pred.given.dtype == pred.var_interp.dtype == torch.float32
    assert torch.equal(pred.eps, (out.chunk(2, dim=1)[0] + 1).float())  # eps + 1 computed in bfloat16
    assert torch.equal(pred.var_interp, ((r + 1) / 2).to(torch.bfloat16).float())


@pytest.mark.parametrize("given", ["x0", "eps"])
def test_prediction_to_keeps_the_given_estimate_at_the_new_point(given):
    g = torch.Generator().manual_seed(2)
    x, est = (torch.randn(3, 4, generator=g).to(torch.bfloat16) for _ in range(2))
    a, s = torch.tensor([[0.6], [0.8], [0.28]]), torch.tensor([[0.8], [0.6], [0.96]])  # per-sample
    pred = sd.Prediction(x, a.to(torch.bfloat16), s.to(torch.bfloat16), **{given: est})
    pred.var_interp = est * 0.5
    assert pred.x0_given == (given == "x0")
    x32 = x.float() + 1e-3  # the full-precision point the net saw rounded
    out = pred.to(torch.float32, x32)
    assert out.x is x32 and out.x0_given == (given == "x0") and out.alpha.dtype == torch.float32
    assert torch.equal(out.given, est.float()) and torch.equal(out.var_interp, (est * 0.5).float())
    # the other estimate is derived at the new point: x = alpha x0 + sigma eps there
    assert torch.allclose(out.alpha * out.x0 + out.sigma * out.eps, x32, rtol=0, atol=1e-5)
    assert pred.x.dtype == torch.bfloat16 and pred.given is est  # the original is untouched
    assert sd.Prediction(x, 0.6, 0.8, eps=est).to(torch.float32).x.dtype == torch.float32


@pytest.mark.parametrize("given", ["x0", "eps"])
def test_prediction_to_after_the_other_estimate_was_derived(given):
    """Once the other estimate is derived both are held, and :meth:`Prediction.to` carries ``x0`` as ``x0``
    (``given`` is the held ``x0``): a ``given`` that returned the held ``eps`` made it the new ``x0``."""
    g = torch.Generator().manual_seed(5)
    x, est = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(2))
    pred = sd.Prediction(x, 0.6, 0.8, **{given: est})
    x0, eps = pred.x0, pred.eps  # the other one derived, both held now
    out = pred.to(torch.float32)
    torch.testing.assert_close(out.x0, x0.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.eps, eps.float(), rtol=1e-6, atol=1e-6)


def test_the_net_time_follows_the_states_dtype_call_by_call():
    """The time tensor handed to the net is cached per time, device, dtype and batch: a float64 call after
    a float32 one at the same time gets float64 (123.4, not float32's 123.40000153)."""
    seen = []

    def net(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    den = sd.Denoiser(net, sd.VP.scaled_linear(), prediction="eps")
    for dtype in (torch.float32, F64, torch.float32):
        den(torch.zeros(2, 3, dtype=dtype), 123.4)
    assert [t.dtype for t in seen] == [torch.float32, F64, torch.float32]
    assert seen[1].tolist() == [123.4, 123.4]


def test_per_sample_times_of_another_shape_are_named():
    """t of shape (B, 1) or of another length: a ValueError naming t's shape (was torch's expand error)."""
    den = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1)).denoiser(
        sd.VP.scaled_linear()
    )
    x = torch.zeros(3, 2)
    for t in (torch.full((3, 1), 500.0), torch.full((2,), 500.0)):
        with pytest.raises(ValueError, match=r"per-sample times t must have shape \(3,\)"):
            den(x, t)
    torch.testing.assert_close(den(x, torch.full((3,), 500.0)).x0, den(x, 500.0).x0)


def test_a_direct_call_names_a_bad_x_or_t():
    """den(x, t) with x a list or numpy array was an AttributeError, with t NaN a VP.discrete IndexError
    (inf, silently clamped), None or a string torch's TypeError / float()'s ValueError: a ValueError
    naming x or t, from a plain denoiser and from a guided wrapper alike. A tensor t is checked only on
    the CPU (a GPU read would sync)."""
    den = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1)).denoiser(
        sd.VP.scaled_linear()
    )
    cfg = sd.guidance.CFG(den, den, 2.0)
    x = torch.zeros(3, 2)
    for d, who in ((den, "Denoiser"), (cfg, "CFG")):
        for bad in ([[0.0, 0.0]] * 3, x.numpy()):
            with pytest.raises(ValueError, match=rf"^{who}: x must be a tensor of shape \(batch, "):
                d(bad, 500.0)
        for t in (float("nan"), float("inf"), None, "500", True):
            with pytest.raises(ValueError, match=rf"^{who}: t must be a finite number or a tensor of times"):
                d(x, t)
        for t in (torch.tensor(float("nan")), torch.tensor([500.0, float("inf"), 1.0])):
            with pytest.raises(ValueError, match=rf"^{who}: t must be finite, got tensor"):
                d(x, t)
        with pytest.raises(ValueError, match=rf"^{who}: t must be a tensor of real times, got a torch.bool"):
            d(x, torch.tensor(True))
    torch.testing.assert_close(den(x, torch.tensor(500.0)).x0, den(x, 500).x0)
    # evaluate, the solvers' entry for a half-precision net, checks as a call does (a list x was an
    # AttributeError; a NaN t was named as the process's model_time)
    with pytest.raises(ValueError, match=r"^Denoiser\.evaluate: x must be a tensor"):
        den.evaluate([[0.0, 0.0]] * 3, 500.0, torch.float32)
    with pytest.raises(ValueError, match=r"^Denoiser\.evaluate: t must be a finite number"):
        den.evaluate(x, float("nan"), torch.float64)


def test_a_users_evaluate_keeps_its_own_signature():
    """A wrapper written with ``net_dtype`` optional is called as written (a guard: an input check wrapped
    around every subclass's ``evaluate``, tried and reverted this session, required it)."""

    class Half(sd.guidance.base.Guided):
        def evaluate(self, x, t, net_dtype=None, **cond):  # type: ignore[no-untyped-def]
            return self.base.evaluate(x, t, net_dtype or x.dtype, **cond)

    gmm, proc = sd.toy.default_benchmark_mixture(dim=4), sd.VP.scaled_linear()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Half(gmm.denoiser(proc)).evaluate(x, 500.0).x0, gmm.denoiser(proc)(x, 500.0).x0)


def test_a_subclass_evaluate_may_call_super():
    """A Denoiser subclass whose ``evaluate`` calls ``super().evaluate`` gets the plain denoiser's (a guard:
    it recursed without end under the reverted input check around subclasses' ``evaluate``)."""
    gmm, proc = sd.toy.default_benchmark_mixture(dim=4), sd.VP.scaled_linear()
    base = gmm.denoiser(proc)

    class Passthrough(sd.Denoiser):
        def evaluate(self, x, t, net_dtype, /, **cond):  # type: ignore[no-untyped-def]
            return super().evaluate(x, t, net_dtype, **cond)

    den = Passthrough(base.net, proc, prediction=base.prediction)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(den.evaluate(x, 500.0, x.dtype).x0, base(x, 500.0).x0)
    assert torch.equal(den(x, 500.0).x0, base(x, 500.0).x0)


def test_a_mixins_evaluate_is_the_subclass_own():
    """An ``evaluate`` a subclass inherits from a mixin (a class that is no Denoiser, before a built-in
    wrapper in the bases) is what samplers and wrappers run, as one defined in the subclass is (a guard:
    the reverted input check around subclasses' ``evaluate`` skipped the mixin's)."""
    gmm, proc = sd.toy.default_benchmark_mixture(dim=4), sd.VP.scaled_linear()
    base = gmm.denoiser(proc)

    class Shrink:
        def evaluate(self, x, t, net_dtype, **cond):  # type: ignore[no-untyped-def]
            pred = super().evaluate(x, t, net_dtype, **cond)  # type: ignore[misc]
            return sd.guidance.with_estimate(pred, x0=0.5 * pred.x0)

    class Mixed(Shrink, sd.guidance.CFG):
        pass

    class Direct(sd.guidance.CFG):
        def evaluate(self, x, t, net_dtype, **cond):  # type: ignore[no-untyped-def]
            pred = super().evaluate(x, t, net_dtype, **cond)
            return sd.guidance.with_estimate(pred, x0=0.5 * pred.x0)

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mixed, direct = Mixed(base, base, 2.0), Direct(base, base, 2.0)
    want = direct.evaluate(x, 500.0, x.dtype).x0
    assert not torch.equal(want, sd.guidance.CFG(base, base, 2.0)(x, 500.0).x0)
    assert torch.equal(mixed.evaluate(x, 500.0, x.dtype).x0, want)
    assert torch.equal(sd.sample(mixed, x, 4, "ddim"), sd.sample(direct, x, 4, "ddim"))
    outer = sd.guidance.DynamicThreshold(mixed, 0.9)
    assert torch.equal(outer(x, 500.0).x0, sd.guidance.DynamicThreshold(direct, 0.9)(x, 500.0).x0)


def test_a_users_evaluate_takes_x_and_t_by_keyword():
    """A user's ``evaluate(self, x, t, net_dtype, **cond)`` (as docs/custom.md writes it, no ``/``) is called
    with keywords as its signature allows, and what reaches the base denoiser is checked (a guard: the
    reverted input check around subclasses' ``evaluate`` took ``x`` and ``t`` by position only)."""
    gmm, proc = sd.toy.default_benchmark_mixture(dim=4), sd.VP.scaled_linear()

    class Clip(sd.guidance.Guided):
        def evaluate(self, x, t, net_dtype, **cond):  # type: ignore[no-untyped-def]
            pred = self.base.evaluate(x, t, net_dtype, **cond)
            return sd.guidance.with_estimate(pred, x0=pred.x0.clamp(-1, 1))

    den = Clip(gmm.denoiser(proc))
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = den.evaluate(x, 500.0, x.dtype).x0
    assert torch.equal(den.evaluate(x=x, t=500.0, net_dtype=x.dtype).x0, want)
    assert torch.equal(den.evaluate(x, t=500.0, net_dtype=x.dtype).x0, want)
    with pytest.raises(ValueError, match=r"t must be a finite number"):
        den.evaluate(x=x, t=math.nan, net_dtype=x.dtype)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 't'"):
        den.evaluate(x=x, net_dtype=x.dtype)


@pytest.mark.parametrize("output", ["edm", "v"])
def test_edm_denoiser_recovers_x0_and_eps_from_its_training_target(output):
    # Karras et al. 2022, Table 1: F's target is (x0 - c_skip x) / c_out; for output="v" it is the v of the
    # variance-preserving point c_in x = a x0 / s_d + s eps (a = s_d c_in, s = sigma c_in)
    sd_, g = 0.7, torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    for sigma in (80.0, 1.3, 0.002):
        x = x0 + sigma * eps
        c_in = 1 / math.sqrt(sigma**2 + sd_**2)
        if output == "edm":
            c_skip, c_out = sd_**2 * c_in**2, sigma * sd_ * c_in
            target = (x0 - c_skip * x) / c_out
        else:
            target = sd_ * c_in * eps - sigma * c_in * x0 / sd_
        seen = []

        def net(u, t, target=target, seen=seen):
            seen.append((u, t))
            return target

        den = sd.denoiser.EDMDenoiser(net, sd.EDM(), sigma_data=sd_, output=output)
        pred = den(x, sigma)
        assert torch.allclose(pred.x0, x0, rtol=0, atol=1e-9 * (1 + sigma))
        assert torch.allclose(pred.eps, eps, rtol=0, atol=1e-9 * (1 + 1 / sigma))
        u, t = seen[0]
        assert torch.allclose(u, x * c_in, rtol=1e-15, atol=0)
        assert torch.allclose(t, torch.full((3,), 0.25 * math.log(sigma), dtype=F64), rtol=1e-15, atol=0)


def test_edm_denoiser_names_a_bad_argument():
    for kw, match in (
        ({"process": sd.VE()}, "process must be a steerdiff EDM process"),
        ({"output": "eps"}, "output"),
        ({"sigma_data": 0.0}, "sigma_data"),
    ):
        with pytest.raises(ValueError, match=match):
            sd.denoiser.EDMDenoiser(lambda x, t: x, **{"process": sd.EDM(), **kw})


@pytest.mark.parametrize("output", ["edm", "v"])
def test_edm_denoiser_samples_the_exact_ode(output: str) -> None:
    # an EDM-preconditioned net whose D is a mixture's exact denoiser: F = +-(D - c_skip x) / c_out, read
    # from what the net is given (c_in x, log(sigma) / 4) alone; sd.sample then follows the exact ODE
    g = torch.Generator().manual_seed(0)
    gmm = sd.toy.GaussianMixture(
        torch.randn(3, 4, generator=g, dtype=torch.float64), torch.full((3, 4), 0.09), [1.0, 2.0, 1.0]
    )
    proc, s_d, sign = sd.EDM(), 0.5, 1.0 if output == "edm" else -1.0

    def net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.exp(4 * c_noise).flatten()[0])
        n = sigma**2 + s_d**2
        x = x_in * math.sqrt(n)
        return sign * (gmm.denoise(x, 1.0, sigma) - s_d**2 / n * x) / (sigma * s_d / math.sqrt(n))

    den = sd.EDMDenoiser(net, proc, sigma_data=s_d, output=output)
    x_T = float(proc.sigma(proc.t_max)) * torch.randn(64, 4, generator=g, dtype=torch.float64)
    ref = gmm.reference_ode(x_T, proc, proc.t_max, proc.t_min, denoise=True)
    errors = [float((sd.sample(den, x_T, steps=n) - ref).norm() / ref.norm()) for n in (10, 40)]
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 4  # measured 0.055 / 7.6e-4; the other sign: 1.6
