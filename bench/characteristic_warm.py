"""Characteristic guidance's warm start (the authors', ``warm_start=1``) against its cold start (every call
from ``d = 0``, the default): ``python bench/characteristic_warm.py [--n 256] [--seed 0]``.

UniPC at 10 / 20 / 100 steps under SD's betas (``VP.scaled_linear``), ``w = 2 / 4 / 8``, default solve
(``tol = 1e-4``, ``memory = 2``, ``max_iter = 30``), ``n`` samples from ``x_T`` of seed ``seed``:

* ``gauss2``: ``tests/test_characteristic_guidance.py``'s 2-d Gaussians (conditional ``N((1, -.5),
  diag(.25, .3))``, unconditional ``N(0, diag(1, .5))``), whose guided target ``p_c^w p_u^{1-w}`` is a
  Gaussian: the endpoint error is the relative RMSE against its exact probability-flow ODE's endpoint from
  the same ``x_T`` (closed form).
* ``gauss8``: 8-d diagonal Gaussians (means ``N(0, I)``, variances ``.2 + .5 U`` / ``.8 + .5 U``, seed 1),
  exact endpoint as above.
* ``mix8``: 8-d mixtures (seed 2): the conditional law 3 components (means ``1.5 N(0, I)``, variances
  ``.3 + .3 U``), the unconditional one those 3 at twice the variances and 3 more (means ``2 N(0, I)``,
  variances ``.8 + .5 U``), equal weights; ``memory = 9`` (the default 2 gives up at most calls above
  ``t = 600`` here, cold and warm alike). The fixed point need not be unique and no exact answer is
  known: printed, the warm
  endpoints' relative RMSE against the cold ones, the samples whose endpoints are more than 0.1 apart
  (RMS), and, per call, which root the warm start takes: at every call of the warm run the cold solve is
  made at the same ``(x, t)`` too (not counted in its NFE) and the call's samples where both converge and
  their guided ``x0`` differ by more than ``100 tol`` (RMS) are counted (``other root``, over all calls and
  samples).

Columns: NFE cold / warm (exact, ``SampleInfo.nfe``), the samples warm-started (mean per call, of ``n``),
the endpoint errors, and the unconverged samples (summed over the calls: they get CFG's estimate).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

import steerdiff as sd
from steerdiff.guidance import CharacteristicGuidance
from steerdiff.metrics import relative_rmse

F64 = torch.float64
PROC = sd.VP.scaled_linear()
WS, STEPS = (2.0, 4.0, 8.0), (10, 20, 100)


def gaussians(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu_c, var_c, mu_u, var_u)``, diagonal."""
    if name == "gauss2":
        mu_c, var_c = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([0.25, 0.3], dtype=F64)
        return mu_c, var_c, torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)
    g = torch.Generator().manual_seed(1)
    mu_c, mu_u = torch.randn(8, dtype=F64, generator=g), torch.randn(8, dtype=F64, generator=g)
    var_c = 0.2 + 0.5 * torch.rand(8, dtype=F64, generator=g)
    return mu_c, var_c, mu_u, 0.8 + 0.5 * torch.rand(8, dtype=F64, generator=g)


def one(mean: torch.Tensor, var: torch.Tensor) -> sd.toy.GaussianMixture:
    return sd.toy.GaussianMixture(mean[None], var[None], torch.ones(1, dtype=F64))


def exact_endpoint(name: str, w: float, x_T: torch.Tensor) -> torch.Tensor:
    """The target ``N(m, diag(v))``'s probability-flow ODE from ``x_T`` at ``t_max`` to ``t_min``, then its
    denoised estimate (``sd.sample``'s last step): ``x_t - a_t m = (a_t^2 v + s_t^2)^{1/2} (a_T^2 v +
    s_T^2)^{-1/2} (x_T - a_T m)`` per coordinate."""
    mu_c, var_c, mu_u, var_u = gaussians(name)
    v = 1 / (w / var_c - (w - 1) / var_u)
    m = v * (w * mu_c / var_c - (w - 1) * mu_u / var_u)
    (a_T, s_T), (a_0, s_0) = ((float(PROC.alpha(t)), float(PROC.sigma(t))) for t in (PROC.t_max, PROC.t_min))
    return m + a_0 * v / ((a_T**2 * v + s_T**2) * (a_0**2 * v + s_0**2)).sqrt() * (x_T - a_T * m)


def branches(name: str) -> tuple[sd.Denoiser, sd.Denoiser]:
    if name != "mix8":
        mu_c, var_c, mu_u, var_u = gaussians(name)
        return one(mu_c, var_c).denoiser(PROC), one(mu_u, var_u).denoiser(PROC)
    g = torch.Generator().manual_seed(2)
    mc, vc = (
        1.5 * torch.randn(3, 8, dtype=F64, generator=g),
        0.3 + 0.3 * torch.rand(3, 8, dtype=F64, generator=g),
    )
    mo, vo = (
        2 * torch.randn(3, 8, dtype=F64, generator=g),
        0.8 + 0.5 * torch.rand(3, 8, dtype=F64, generator=g),
    )
    cond = sd.toy.GaussianMixture(mc, vc, torch.ones(3, dtype=F64) / 3)
    uncond = sd.toy.GaussianMixture(
        torch.cat([mc, mo]), torch.cat([2 * vc, vo]), torch.ones(6, dtype=F64) / 6
    )
    return cond.denoiser(PROC), uncond.denoiser(PROC)


class Probe(CharacteristicGuidance):
    """The guidance, recording per call the samples warm-started and unconverged, and (``compare``) the
    samples whose converged guided ``x0`` is another root than a cold solve's at the same ``(x, t)``."""

    def __init__(self, *args: Any, compare: CharacteristicGuidance | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compare, self.calls, self.warm_rows, self.lost, self.other, self.both = compare, 0, 0, 0, 0, 0

    def evaluate(self, x: torch.Tensor, t: Any, net_dtype: torch.dtype, /, **cond: Any) -> sd.Prediction:
        pred = super().evaluate(x, t, net_dtype, **cond)
        self.calls += 1
        self.warm_rows += self.warmed
        self.lost += self.unconverged
        if self.compare is not None and self.residual is not None:
            ok = self.residual <= self.tol
            cold = self.compare.evaluate(x, t, net_dtype, **cond)
            assert self.compare.residual is not None
            both = ok & (self.compare.residual <= self.tol)
            far = (pred.x0 - cold.x0).reshape(x.shape[0], -1).square().mean(1).sqrt() > 100 * self.tol
            self.both += int(both.sum())
            self.other += int((both & far).sum())
        return pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("steerdiff.guidance.characteristic").setLevel(logging.ERROR)  # counted instead
    start = time.perf_counter()
    for name in ("gauss2", "gauss8", "mix8"):
        dc, du = branches(name)
        dim = 2 if name == "gauss2" else 8
        x_T = torch.randn(args.n, dim, dtype=F64, generator=torch.Generator().manual_seed(args.seed))
        mixture = name == "mix8"
        last = (
            ["warm vs cold endpoint (rel. RMSE)", "endpoints > 0.1 apart", "other root (calls x samples)"]
            if mixture
            else ["endpoint error cold / warm"]
        )
        head = ["w", "steps", "NFE cold / warm", "warm rows per call", *last, "unconverged cold / warm"]
        print(f"\n{name}, {args.n} samples, UniPC\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for w in WS:
            for steps in STEPS:
                kw = {"memory": 9} if mixture else {}
                cold = Probe(dc, du, w, **kw)
                again = CharacteristicGuidance(dc, du, w, **kw) if mixture else None
                warm = Probe(dc, du, w, warm_start=1.0, compare=again, **kw)
                (xc, ic), (xw, iw) = (
                    sd.sample(d, x_T, steps=steps, solver="unipc", return_info=True) for d in (cold, warm)
                )
                cells = [f"{w:g}", str(steps), f"{ic.nfe} / {iw.nfe}", f"{warm.warm_rows / warm.calls:.0f}"]
                if mixture:
                    apart = int(((xw - xc).square().mean(1).sqrt() > 0.1).sum())
                    cells += [
                        f"{relative_rmse(xw, xc):.2g}",
                        f"{apart} of {args.n}",
                        f"{warm.other} of {warm.both}",
                    ]
                else:
                    exact = exact_endpoint(name, w, x_T)
                    cells.append(f"{relative_rmse(xc, exact):.2g} / {relative_rmse(xw, exact):.2g}")
                print("| " + " | ".join([*cells, f"{cold.lost} / {warm.lost}"]) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
