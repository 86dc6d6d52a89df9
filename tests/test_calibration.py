"""Calibrating a DPM (Pang et al. 2023): ``sd.guidance.calibrate`` and ``sd.guidance.Calibrated``.

The exact model's mean noise prediction over the data is 0 at every t (the score is a martingale): the
estimated correction of the Gaussian-mixture oracle is 0 within its Monte Carlo standard errors. A model
off by a constant in eps (miscalibrated) gets exactly that constant removed, and its samples move back to the
data law. ``python -m tests.test_calibration`` measures the FD on the learned digits model with and without.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

import steerdiff as sd
from steerdiff.guidance import Calibrated, Guided, calibrate, with_estimate

F64 = torch.float64
PROCESS = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64))
W = torch.tensor([[0.9, -0.3, 0.2], [0.1, 1.1, -0.4], [0.3, 0.2, 0.8]], dtype=F64)
OFFSET = torch.tensor([0.15, -0.1, 0.05, 0.2], dtype=F64)


def linear_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x @ W.T * (1 + t[:, None] / 2000) + 0.05


def gmm() -> sd.toy.GaussianMixture:
    means = torch.tensor([[-1.5, 0.5, 0.0, 1.0], [1.0, -1.0, 1.5, 0.0]], dtype=F64)
    var = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.4, 0.1, 0.25, 0.2]], dtype=F64)
    return sd.toy.GaussianMixture(means, var, torch.tensor([0.4, 0.6], dtype=F64))


class Offset(Guided):
    """A miscalibrated model: the exact one with ``OFFSET`` added to its noise prediction."""

    def evaluate(self, x, t, net_dtype, /, **cond):
        pred = self.base.evaluate(x, t, net_dtype, **cond)
        return with_estimate(pred, eps=pred.eps + OFFSET)


TIMES = [0.0, 50.0, 200.0, 500.0, 800.0, 999.0]


def test_exact_model_needs_no_correction():
    """eta_t of the exact denoiser is 0 within its Monte Carlo standard error at every t and coordinate:
    480 z-scores (20 data sets of 1,000 draws, 6 times, 4 coordinates), mean square 0.88, max |z| 2.6 (one
    data set's z-scores are correlated across times: the control variate leaves the data's sampling error)."""
    law = gmm()
    zs = []
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        cal = calibrate(law.denoiser(PROCESS), law.sample(1000, g), TIMES, generator=g)
        assert cal.stderr is not None
        zs.append(cal.mean_eps / cal.stderr)
    z = torch.stack(zs)
    assert float(z.abs().max()) < 4.0 and 0.5 < float((z * z).mean()) < 1.5


def test_control_variate_at_high_noise():
    """Where eps_theta is mostly the draw's own noise z, the estimate subtracts z's sample mean (E[z] = 0
    exactly): at t = 999 the standard error is 1.4e-4 at 4,000 draws (the plain mean's: 0.016, 1 / sqrt(n) of
    a unit-variance eps). Under zero terminal SNR (sigma / alpha = 3e4 at t = 999) that error, carried into x0
    as (sigma / alpha) eta, moved the calibrated exact model's samples (DDIM, 50 trailing steps) from a
    sliced-W2 of 0.046 to 0.84; now 0.043."""
    law = gmm()
    data = law.sample(4000, torch.Generator().manual_seed(1))
    cal = calibrate(law.denoiser(PROCESS), data, TIMES, generator=torch.Generator().manual_seed(2))
    assert cal.stderr is not None and float(cal.stderr[-1].max()) < 1e-3
    zero_snr = sd.VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64), rescale_zero_snr=True)
    den = law.denoiser(zero_snr)
    cal = calibrate(den, data, TIMES, generator=torch.Generator().manual_seed(2))
    x_T = torch.randn(4000, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    exact = law.sample(4000, torch.Generator().manual_seed(7))
    d_exact, d_cal = (
        sd.metrics.sliced_wasserstein(sd.sample(d, x_T, 50, "ddim", "trailing"), exact) for d in (den, cal)
    )
    assert d_exact < 0.06 and d_cal < 1.2 * d_exact


def test_a_constant_offset_is_removed_exactly():
    """The offset model's table is the oracle's plus the offset, draw for draw (same generator), so the
    calibrated offset model is the calibrated oracle (to rounding) at every time, also between the nodes."""
    law = gmm()
    den = law.denoiser(PROCESS)
    data = law.sample(2000, torch.Generator().manual_seed(1))
    for samples in (None, 3000):  # every row once; 3,000 draws with replacement
        g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        ref = calibrate(den, data, TIMES, samples, generator=g1, batch_size=700)
        off = calibrate(Offset(den), data, TIMES, samples, generator=g2, batch_size=700)
        torch.testing.assert_close(
            off.mean_eps - ref.mean_eps, OFFSET.expand(len(TIMES), 4), rtol=0, atol=1e-12
        )
    x = law.sample(5, torch.Generator().manual_seed(3)) * 0.8 + 0.1
    for t in (0.0, 120.0, 500.0, 650.5, 999.0, torch.tensor([3.0, 250.0, 500.0, 750.0, 990.0], dtype=F64)):
        a, b = off(x, t), ref(x, t)
        torch.testing.assert_close(a.eps, b.eps, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=1e-9)


def test_calibration_repairs_the_samples():
    """DDIM / DDPM 50 steps from the same x_T / noise, 4,000 samples: sliced-W2 to 4,000 exact draws. The
    exact model is at 0.044 / 0.043 (sample noise and 50 steps), the offset model far off (0.857 / 0.435),
    calibrated on 1,000 draws a time back at 0.049 / 0.045 (40,000: 0.047 / 0.044). The plain mean of
    eps_theta, without the control variate, gave 0.191 for DDIM from 1,000 draws: its Monte Carlo error,
    about 0.03 per coordinate at high noise, times the ODE sampler's sensitivity."""
    law = gmm()
    den = law.denoiser(PROCESS)
    bad = Offset(den)
    fixed = calibrate(bad, law.sample(1000, torch.Generator().manual_seed(4)), TIMES,
                      generator=torch.Generator().manual_seed(5))  # fmt: skip
    x_T = torch.randn(4000, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    exact = law.sample(4000, torch.Generator().manual_seed(7))

    def sw(d: sd.Denoiser, solver: str) -> float:
        x = sd.sample(d, x_T, 50, solver, generator=torch.Generator().manual_seed(8))
        return sd.metrics.sliced_wasserstein(x, exact)

    for solver in ("ddim", "ddpm"):
        d_exact, d_bad, d_fixed = sw(den, solver), sw(bad, solver), sw(fixed, solver)
        assert d_bad > 0.3 and d_fixed < 1.5 * d_exact + 0.01 and d_fixed < 0.15 * d_bad


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_matches_the_hand_computation(prediction):
    """eps - eta(t) with eta linear between the table's times (constant outside); x0 moved by
    (sigma / alpha) eta, for eps-, x0- and v-nets; per-sample times row by row."""
    den = sd.Denoiser(linear_net, PROCESS, prediction=prediction)
    times = torch.tensor([100.0, 300.0, 700.0], dtype=F64)
    table = torch.tensor([[0.1, 0.2, -0.1], [0.3, -0.2, 0.0], [-0.1, 0.1, 0.4]], dtype=F64)
    cal = Calibrated(den, times, table)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    for t, eta in ((50.0, table[0]), (100.0, table[0]), (200.0, (table[0] + table[1]) / 2),
                   (600.0, 0.25 * table[1] + 0.75 * table[2]), (900.0, table[2])):  # fmt: skip
        a, s = float(PROCESS.alpha(t)), float(PROCESS.sigma(t))
        ref, got = den(x, t), cal(x, t)
        torch.testing.assert_close(got.eps, ref.eps - eta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.x0, ref.x0 + s / a * eta, rtol=1e-10, atol=1e-10)
    ts = torch.tensor([50.0, 200.0, 600.0, 900.0], dtype=F64)
    rows = cal(x, ts)
    for i, ti in enumerate(ts.tolist()):
        torch.testing.assert_close(rows.eps[i : i + 1], cal(x[i : i + 1], ti).eps, rtol=1e-12, atol=1e-12)
    one = Calibrated(den, times[:1], table[:1])
    torch.testing.assert_close(one(x, 900.0).eps, den(x, 900.0).eps - table[0], rtol=1e-12, atol=1e-12)


def test_table_on_another_device():
    """A table estimated on an accelerator (calibrate keeps data's device) is interpolated with the CPU times:
    the weights once multiplied a device table on the CPU (a device-mismatch error at the first step). The
    meta device stands in for CUDA here."""
    den = sd.Denoiser(linear_net, PROCESS)
    table = torch.tensor([[0.1, 0.2, -0.1], [0.3, -0.2, 0.0]], dtype=F64)
    cal = Calibrated(den, torch.tensor([100.0, 300.0], dtype=F64), table.to("meta"))
    for t in (200.0, torch.tensor([150.0, 250.0], dtype=F64)):
        eta = cal.eta(t, torch.zeros(2, 3, dtype=torch.float32, device="meta"))
        assert eta.device.type == "meta" and eta.dtype == torch.float32 and eta.shape[1:] == (3,)
    ref = Calibrated(den, torch.tensor([100.0, 300.0], dtype=F64), table)
    torch.testing.assert_close(ref.eta(200.0, torch.zeros(1, 3, dtype=F64)), (table[:1] + table[1:]) / 2)


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp_2m", "unipc"])
def test_same_nfe(solver):
    law = gmm()
    den = law.denoiser(PROCESS)
    cal = Calibrated(den, torch.tensor(TIMES, dtype=F64), torch.zeros(len(TIMES), 4, dtype=F64))
    x_T = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(10))

    def run(d: sd.Denoiser) -> tuple[torch.Tensor, int]:
        out = sd.sample(d, x_T, 8, solver, generator=torch.Generator().manual_seed(0), return_info=True)
        return out[0], out[1].nfe

    (ref, nfe), (x, nfe_cal) = run(den), run(cal)
    assert nfe == nfe_cal and torch.allclose(x, ref, rtol=1e-12, atol=1e-12)  # a zero table changes nothing


def test_bad_arguments():
    den = gmm().denoiser(PROCESS)
    zeros = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"Calibrated: times must be a non-empty 1-D strictly increasing"):
        Calibrated(den, torch.tensor([5.0, 5.0], dtype=F64), zeros)
    with pytest.raises(ValueError, match=r"Calibrated: times must lie in den's time range \[0, 999\]"):
        Calibrated(den, torch.tensor([5.0, 1000.0], dtype=F64), zeros)
    with pytest.raises(ValueError, match=r"Calibrated: mean_eps must have shape \(2, 4\), got \(2, 3\)"):
        Calibrated(den, torch.tensor([5.0, 6.0], dtype=F64), torch.zeros(2, 3, dtype=F64))
    data = gmm().sample(10)
    with pytest.raises(ValueError, match=r"calibrate: samples must be an integer >= 3"):
        calibrate(den, data, TIMES, samples=2)
    calls = []
    counting = sd.Denoiser(lambda x, t: calls.append(1) or x, PROCESS)  # refused before any network call
    bad_times = (
        ([5.0, 1000.0], r"must lie in den's time range \[0, 999\]"),
        ([5.0, 5.0], r"must be a non-empty 1-D strictly increasing"),
        ([], r"must be a non-empty"),
        ([float("nan")], r"must be a non-empty"),
    )
    for times, why in bad_times:
        with pytest.raises(ValueError, match=r"calibrate: times " + why):
            calibrate(counting, data, times)
    assert not calls
    with pytest.raises(ValueError, match=r"calibrate: batch_size must be an integer >= 1"):
        calibrate(den, data, TIMES, batch_size=0)


def digits_fd(n: int = 1024, seeds: tuple[int, ...] = (0, 1)) -> Iterator[str]:
    """FD to the held-out digits (unconditional, ``steerdiff bench epsilon``'s samplers and seeds) without and
    with calibration: eta at every 10th training timestep and 999 over the training images once each (the
    authors' estimate), and at every 20th from 16,384 draws (images with replacement, fresh noise; seed 0)."""
    from steerdiff.bench.digits import load_models
    from steerdiff.bench.epsilon import SAMPLERS
    from steerdiff.toy import digits as D

    models = load_models()
    train = models.train[0]
    tables = {
        "data once": ([*range(0, 1000, 10), 999], None),
        "16,384 draws": ([*range(0, 1000, 20), 999], 16384),
    }
    cals = {}
    for name, (times, samples) in tables.items():
        g = torch.Generator().manual_seed(0)
        cal = calibrate(models.den, train, times, samples, generator=g, label=D.NULL_LABEL)
        assert cal.stderr is not None
        norm2 = cal.mean_eps.flatten(1).pow(2).sum(1)
        noise2 = cal.stderr.flatten(1).pow(2).sum(1)  # E||eta_hat||^2 where the true eta is 0
        yield (
            f"{name} ({len(train)} images): ||eta_t|| mean {float(norm2.sqrt().mean()):.4f}, "
            f"||eta_t||^2 / its Monte Carlo noise: median {float((norm2 / noise2).median()):.2f}, "
            f"max {float((norm2 / noise2).max()):.2f}"
        )
        cals[name] = cal
    yield "| sampler | none | " + " | ".join(cals) + " |"
    for solver, steps, schedule in SAMPLERS:
        fds: dict[str, list[float]] = {"none": [], **{k: [] for k in cals}}
        for seed in seeds:
            x_T = torch.randn(n, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(seed))
            for name, den in (("none", models.den), *cals.items()):
                with torch.no_grad():
                    g = torch.Generator().manual_seed(seed + 1)
                    x = sd.sample(den, x_T, steps, solver, schedule, generator=g, label=D.NULL_LABEL)
                fds[name].append(models.frechet(x))
        row = " | ".join(f"{sum(v) / len(v):.2f} ({' / '.join(f'{f:.2f}' for f in v)})" for v in fds.values())
        yield f"| {solver} {steps} | {row} |"


if __name__ == "__main__":
    for line in digits_fd():
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
