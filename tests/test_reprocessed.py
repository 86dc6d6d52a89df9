"""Interpolant conversion (``sd.Reprocessed``): the exact denoiser of one process, converted, is the exact
denoiser of the other; sampling the converted rectified-flow oracle on a VP path ends at the reference
probability-flow ODE solution (the two processes' ODEs agree in x0 space); the shared log-SNR range."""

from __future__ import annotations

import pytest
import torch

import steerdiff as sd

from .reference import noise

F64 = torch.float64
PROCESSES = {
    "rf": sd.RectifiedFlow(),
    "vp": sd.VP.linear(),
    "edm": sd.EDM(),
    "vp_discrete": sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
}


@pytest.mark.parametrize(
    ("source", "target"), [("rf", "vp"), ("rf", "edm"), ("vp", "rf"), ("vp", "edm"), ("vp_discrete", "rf")]
)
def test_converted_oracle_is_the_target_oracle(gmm, source, target):
    """``x0`` and ``eps`` of the converted exact denoiser equal the target's exact ones (measured <= 4.5e-13
    over these pairs, eps amplified by 1 / sigma at EDM's t_min = 0.002), at scalar and per-sample times."""
    den = sd.Reprocessed(gmm.denoiser(PROCESSES[source]), PROCESSES[target])
    exact = gmm.denoiser(den.process)
    proc, g = den.process, torch.Generator().manual_seed(3)
    times = torch.linspace(proc.t_min, proc.t_max, 9, dtype=F64)

    def noised(t: torch.Tensor) -> torch.Tensor:
        n = len(t)
        return proc.alpha(t)[:, None] * gmm.sample(n, g) + proc.sigma(t)[:, None] * torch.randn(
            n, gmm.dim, generator=g
        )

    for s in times.tolist():
        x = noised(torch.full((6,), s, dtype=F64))
        got, want = den(x, s), exact(x, s)
        assert torch.allclose(got.x0, want.x0, rtol=0, atol=1e-11)
        assert torch.allclose(got.eps, want.eps, rtol=0, atol=1e-11)
    t = times[torch.randint(0, 9, (12,), generator=g)]
    x = noised(t)
    assert torch.allclose(den(x, t).x0, exact(x, t).x0, rtol=0, atol=1e-11)


def test_vp_ode_on_the_converted_flow_oracle_ends_at_the_reference(gmm):
    """The PF-ODE from ``x_T`` under VP and from ``(alpha_RF / alpha_VP) x_T`` at the equal-log-SNR time under
    rectified flow end at the same x0 (<= 1e-8, both at rtol 1e-10); UniPC on the converted RF oracle is the
    same run as on the exact VP oracle (to 1e-12) and converges to that reference: relative error measured
    8.2e-5 / 8.0e-6 at 50 / 100 logSNR-uniform steps."""
    vp, rf = PROCESSES["vp"], PROCESSES["rf"]
    den = sd.Reprocessed(gmm.denoiser(rf), vp)
    assert den.process is vp  # VP-linear's log-SNR range lies inside rectified flow's
    x_T = noise(16, gmm.dim)
    ref = gmm.reference_ode(x_T, vp, vp.t_max, vp.t_min, denoise=True)
    t0, t1 = (float(den.base_time(s)) for s in (vp.t_max, vp.t_min))
    x_rf = float(rf.alpha(t0) / vp.alpha(vp.t_max)) * x_T
    ref_rf = gmm.reference_ode(x_rf, rf, t0, t1, denoise=True)
    assert float((ref_rf - ref).abs().max()) < 1e-8
    err = []
    for steps in (50, 100):
        got = sd.sample(den, x_T, steps=steps, solver="unipc", schedule="logsnr_uniform")
        same = sd.sample(gmm.denoiser(vp), x_T, steps=steps, solver="unipc", schedule="logsnr_uniform")
        assert torch.allclose(got, same, rtol=0, atol=1e-12)
        err.append(float((got - ref).norm() / ref.norm()))
    assert err[1] < 2e-5 and err[0] > 5 * err[1]


def test_range_narrowed_to_the_shared_log_snr(gmm):
    """VP-linear's model onto rectified flow: RF's ``[1e-3, 0.999]`` (lam +-6.9) is narrowed to where its lam
    meets VP-linear's ends, in a copy; the user's process is untouched; base times stay in VP's range."""
    vp, rf = PROCESSES["vp"], PROCESSES["rf"]
    den = sd.Reprocessed(gmm.denoiser(vp), rf)
    assert den.process is not rf and (rf.t_min, rf.t_max) == (1e-3, 0.999)
    assert float(den.process.lam(den.process.t_min)) == pytest.approx(float(vp.lam(vp.t_min)), abs=1e-12)
    assert float(den.process.lam(den.process.t_max)) == pytest.approx(float(vp.lam(vp.t_max)), abs=1e-12)
    ends = den.base_time(torch.tensor([den.process.t_min, den.process.t_max], dtype=F64))
    assert vp.t_min <= float(ends[0]) and float(ends[1]) <= vp.t_max


def test_bad_input(gmm):
    den = gmm.denoiser(PROCESSES["rf"])
    disjoint = r"Reprocessed: process .* covers log-SNR .* base's process .* must overlap"
    with pytest.raises(ValueError, match=disjoint):
        sd.Reprocessed(gmm.denoiser(sd.RectifiedFlow(t_min=0.9, t_max=0.999)), sd.EDM(0.002, 1.0))
    with pytest.raises(ValueError, match=r"Reprocessed: process must be a steerdiff Process, got str"):
        sd.Reprocessed(den, "vp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Reprocessed: base must be a steerdiff Denoiser, got Tensor"):
        sd.Reprocessed(torch.zeros(2), sd.VP.linear())  # type: ignore[arg-type]


def test_the_per_time_cache_is_bounded(gmm):
    """The table of Q's time -> (P's time, alpha ratio) is cleared past Denoiser's cache size, as the base's
    own per-time caches are (before: 5000 distinct times kept 5000 entries); the values stay exact."""
    from steerdiff.denoiser import _CACHE_SIZE

    vp = PROCESSES["vp"]
    den = sd.Reprocessed(gmm.denoiser(PROCESSES["rf"]), vp)
    x = noise(2, gmm.dim)
    for s in torch.linspace(0.01, 0.99, _CACHE_SIZE + 904, dtype=F64).tolist():
        den._map(s, x)
    assert len(den._at) <= _CACHE_SIZE + 1
    assert torch.allclose(den(x, 0.5).x0, gmm.denoiser(vp)(x, 0.5).x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("prediction", "source", "target"), [("v", "vp", "rf"), ("flow", "rf", "vp"), ("eps", "edm", "rf")]
)
def test_process_dependent_predictions_convert_at_the_base_process(gmm, prediction, source, target):
    """A v-prediction VP net and a flow-prediction RF net (outputs that depend on the process's alpha, sigma
    and their derivatives) reprocessed: their output is turned into x0 at the base's process and time, so
    the converted denoiser is the target's exact one."""
    src = PROCESSES[source]
    exact = gmm.denoiser(src)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p, t = exact(x, t.to(F64)), t.to(F64)[:, None]
        if prediction == "v":
            return src.alpha(t) * p.eps - src.sigma(t) * p.x0
        if prediction == "flow":
            return src.d_alpha(t) * p.x0 + src.d_sigma(t) * p.eps
        return p.eps

    den = sd.Reprocessed(sd.Denoiser(net, src, prediction), PROCESSES[target])
    proc, g = den.process, torch.Generator().manual_seed(5)
    t = torch.linspace(proc.t_min, proc.t_max, 12, dtype=F64)
    x = proc.alpha(t)[:, None] * gmm.sample(12, g) + proc.sigma(t)[:, None] * torch.randn(
        12, gmm.dim, generator=g
    )
    assert torch.allclose(den(x, t).x0, gmm.denoiser(proc)(x, t).x0, rtol=0, atol=1e-11)
