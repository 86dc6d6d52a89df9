r"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", NeurIPS 2023, arXiv:2310.13268; the authors' ``dpm_solver_v3.py`` in ``thu-ml/DPM-Solver-v3``):
a multistep predictor-corrector for the probability-flow ODE in a parameterization fitted to the model.

In ``lam = log(alpha / sigma)`` the ODE is ``dx/dlam = (dlog alpha/dlam) x - sigma eps(x, lam)``. With three
*empirical model statistics* (EMS) ``l_lam``, ``s_lam``, ``b_lam`` (per entry of the sample, like ``x``) the
paper (Sec. 3.1) rewrites it through

    N(x, lam) = sigma eps - l x,      f = N / alpha,
    g(lam) = e^{-int_{lam_s}^{lam} s} f - int_{lam_s}^{lam} e^{-int_{lam_s}^{r} s} b_r dr,

whose exact solution from ``lam_s`` to ``lam_t`` (``L = int l``, ``S = int s``, ``h = lam_t - lam_s``) is

    x_t = (alpha_t / alpha_s) e^{-(L_t - L_s)} x_s
          - alpha_t e^{-(L_t - L_s)} int_{lam_s}^{lam_t} E(u) [g(u) + F(u)] du,
    E(u) = e^{L_u + S_u - L_s - S_s},    F(u) = int_{lam_s}^{u} e^{S_s - S_r} b_r dr.

The EMS minimise the first-order discretisation error of this form: ``l`` makes ``N`` least sensitive to
``x``, ``l* = argmin E ||grad_x N||_F^2``, i.e. ``l*`` is the mean diagonal of ``sigma grad_x eps`` along the
ODE's trajectories; ``s, b`` make ``g`` least variable, ``(s*, b*) = argmin E ||f' - s f - b||^2`` with
``f' = df/dlam`` along the trajectories (a least-squares line per entry). :func:`fit_ems` estimates them at
nodes uniform in ``lam`` from teacher trajectories: the diagonal by Hutchinson's estimator ``E_v[v (J v)]``
(Rademacher ``v``; exact for a diagonal Jacobian) and ``J x'`` by Jacobian-vector products through autograd.

**Predictor** (Sec. 3.2, the authors' ``multistep_predictor_update``): ``g`` is expanded around ``lam_s``,
``g(u) ~ sum_n g^(n) (u - lam_s)^n / n!``, with the derivatives estimated from the ``k`` newest estimates
``g_j`` (``g_j`` of node ``j`` re-expressed around ``s``: ``e^{S_s - S_j} f_j - F(lam_j)``), so

    x_t = (alpha_t / alpha_s) e^{-(L_t - L_s)} x_s - alpha_t e^{-(L_t - L_s)} [sum_n W_n g^(n) + W_b],
    W_n = int E(u) (u - lam_s)^n / n! du,     W_b = int E(u) F(u) du.

The derivatives come from the polynomial through the ``k`` estimates (its Taylor coefficients at ``lam_s``),
or, with ``pseudo=True`` (the *pseudo-order* solver of Sec. 3.4 for very few steps), from Newton's divided
differences, ``g^(n) ~ n! g[lam_s, ..., lam_{s-n}]``, which uses fewer of the older estimates per derivative.

**Corrector** (Sec. 3.3): after the evaluation at the predicted ``x_t``, the step ``s -> t`` is redone with
the new estimate among the points (``s``, ``t``, ``s-1``, ...); the corrected ``x_t`` keeps the evaluation's
``N`` (``eps`` is re-derived, as the authors do), so the corrector is free: **NFE = steps**. Its order is
that of the predictor that produced ``x_t`` (plus one with ``corrector_pseudo``); it runs where that is at
least 2. ``half=True`` (the *half-corrector* of Sec. 3.4) corrects only at nodes in the noisier half of the
process's time range (the authors: ``t > 0.5``).

With ``l = 1``, ``s = b = 0`` (:meth:`EMS.degenerate`) ``f = -x0``, ``E(u) = e^{u - lam_s}`` and the
predictor is DPM-Solver++'s exponential integrator of the interpolating polynomial: multistep DPM-Solver++
with the exact ``phi_2`` weight (``second_order="heun"``) at order 2 and ``third_order="exact"`` at 3.

The integrals over the EMS, which are piecewise linear in ``lam`` between their nodes (any grid inside the
fitted range is served; the authors round the grid to the EMS nodes instead), are done by Gauss-Legendre
quadrature on each piece between nodes (the authors: the trapezoidal rule on 1200 nodes), nested for ``W_b``.
The step into a clean end (``sigma = 0``, outside every EMS range) returns the denoised estimate of the last
evaluation, at the corrected state. Warm-up, lower order at the last steps and the long-step rule follow
:func:`~steerdiff.solvers.base.step_order`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import boolean, device_or_none, integer, real, sample_dtype, sizes
from .._ops import host_to, kept
from ..denoiser import Denoiser
from ..noise import randn
from ..processes import Process, equivalent
from ._poly import lagrange_basis, newton_weights
from .base import ODE_MAX_H, ODE_MAX_H_RATIO, Grid, History, MaxH, Model, Solver, check_long_step, step_order

__all__ = ["EMS", "DPMSolverV3", "fit_ems"]

F64 = torch.float64
GAUSS_POINTS = 10  # Gauss-Legendre points per piece between EMS nodes (exact to ~1e-16 on such pieces)


def _gauss_legendre(m: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the ``m``-point Gauss-Legendre rule on ``[0, 1]`` (Golub-Welsch)."""
    k = torch.arange(1, m, dtype=F64)
    off = k / torch.sqrt(4 * k * k - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return (nodes + 1) / 2, vecs[0] ** 2


@dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics ``l, s, b`` at nodes ``lam`` (increasing), fitted to ``process``.

    ``l``, ``s``, ``b``: ``(K, *shape)`` float64 tensors, the statistics at the ``K >= 2`` nodes; between the
    nodes they are linear in ``lam``. ``nfe``: network evaluations per sample of the fit (teacher and
    statistics, without the autograd passes); ``seconds``: its wall time. Made by :func:`fit_ems`, or by hand
    (:meth:`degenerate`, closed forms).
    """

    process: Process
    lam: Tensor
    l: Tensor  # noqa: E741 (the paper's name)
    s: Tensor
    b: Tensor
    nfe: int = 0
    seconds: float = 0.0
    _cum: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.process, Process):
            raise ValueError(f"EMS: process must be a steerdiff Process, got {type(self.process).__name__}")
        lam = self.lam
        if not isinstance(lam, Tensor) or lam.ndim != 1 or lam.numel() < 2:
            raise ValueError("EMS: lam must be a 1-d tensor of at least 2 nodes")
        lam = lam.detach().to("cpu", F64)
        if not bool(torch.isfinite(lam).all()) or not bool((lam[1:] > lam[:-1]).all()):
            raise ValueError(f"EMS: lam must be finite and strictly increasing, got {lam.tolist()}")
        object.__setattr__(self, "lam", lam)
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if not isinstance(v, Tensor) or v.ndim < 2 or v.shape[0] != lam.numel():
                raise ValueError(
                    f"EMS: {name} must be a ({lam.numel()}, *shape) tensor (one row per node of lam), got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                )
            if v.shape != self.l.shape:
                raise ValueError(f"EMS: {name} has shape {tuple(v.shape)}, l has {tuple(self.l.shape)}")
            v = v.detach().to("cpu", F64)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS: {name} must be finite")
            object.__setattr__(self, name, v)
        # cumulative integrals of the piecewise-linear l and s at the nodes (the trapezoidal rule is exact)
        d = (lam[1:] - lam[:-1]).reshape(-1, *[1] * (self.l.ndim - 1))
        for name in ("l", "s"):
            v = getattr(self, name)
            steps = d * (v[1:] + v[:-1]) / 2
            self._cum[name] = torch.cat([torch.zeros_like(v[:1]), steps.cumsum(0)])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerate(cls, process: Process, shape: Sequence[int], lo: float = -20.0, hi: float = 20.0) -> EMS:
        """``l = 1``, ``s = b = 0`` on ``[lo, hi]``: DPM-Solver++'s data-prediction parameterization."""
        shape = sizes("EMS.degenerate", "shape", shape)
        lam = torch.tensor([lo, hi], dtype=F64)
        one = torch.ones(2, *shape, dtype=F64)
        return cls(process, lam, one, torch.zeros_like(one), torch.zeros_like(one))

    def at(self, u: Tensor) -> dict[str, Tensor]:
        """``l, s, b`` and ``L = int l``, ``S = int s`` (from the first node) at the points ``u``, each of
        shape ``(*u.shape, *shape)``."""
        lam, flat = self.lam, self.l.reshape(self.lam.numel(), -1)
        idx = (torch.searchsorted(lam, u.reshape(-1), right=True) - 1).clamp(0, lam.numel() - 2)
        tau = (u.reshape(-1) - lam[idx])[:, None]
        width = (lam[idx + 1] - lam[idx])[:, None]
        out: dict[str, Tensor] = {}
        for name in ("l", "s", "b"):
            v = getattr(self, name).reshape(flat.shape)
            lo, slope = v[idx], (v[idx + 1] - v[idx]) / width
            out[name] = lo + slope * tau
            if name != "b":
                cum = self._cum[name].reshape(flat.shape)[idx]
                out[name.upper()] = cum + lo * tau + slope * tau * tau / 2
        return {k: v.reshape(*u.shape, *self.shape) for k, v in out.items()}

    def _pieces(self, a: float, c: float) -> tuple[Tensor, Tensor]:
        """Starts and widths of the pieces of ``[a, c]`` (``a < c``) between the EMS nodes."""
        inner = self.lam[(self.lam > a) & (self.lam < c)]
        cuts = torch.cat([torch.tensor([a], dtype=F64), inner, torch.tensor([c], dtype=F64)])
        return cuts[:-1], cuts[1:] - cuts[:-1]

    def drift_integral(self, a: float, u: float) -> Tensor:
        """``F_a(u) = int_a^u e^{S_a - S_r} b_r dr`` (signed: ``u < a`` too)."""
        if u == a:
            return torch.zeros(self.shape, dtype=F64)
        lo, hi = min(a, u), max(a, u)
        start, width = self._pieces(lo, hi)
        x, w = _gauss_legendre(GAUSS_POINTS)
        r = start[:, None] + width[:, None] * x
        v, s_a = self.at(r), self.at(torch.tensor(a, dtype=F64))["S"]
        vals = torch.exp(s_a - v["S"]) * v["b"]
        total = torch.einsum("pm...,pm->...", vals, width[:, None] * w)
        return total if u > a else -total

    def step_integrals(self, a: float, c: float, k: int) -> tuple[Tensor, list[Tensor], Tensor]:
        """For the step ``a -> c`` (``a < c``): ``e^{-(L_c - L_a)}``, ``[W_0, ..., W_{k-1}]`` and ``W_b``
        (module docstring), by Gauss-Legendre quadrature on each piece between EMS nodes, nested for
        ``W_b``."""
        start, width = self._pieces(a, c)
        x, w = _gauss_legendre(GAUSS_POINTS)
        u = start[:, None] + width[:, None] * x  # (P, m)
        wu = width[:, None] * w  # outer weights
        ends = self.at(torch.tensor([a, c], dtype=F64))
        v = self.at(u)
        expo = torch.exp(v["L"] + v["S"] - ends["L"][0] - ends["S"][0])  # E(u): (P, m, *shape)
        W = []
        for n in range(k):
            poly = (u - a) ** n / math.factorial(n)
            W.append(torch.einsum("pm...,pm->...", expo, wu * poly))
        # F(u) = F(start of its piece) + int_{start}^{u}: inner nodes r = start + (u - start) x_j
        r = start[:, None, None] + (u - start[:, None])[:, :, None] * x  # (P, m, m)
        vr = self.at(r)
        inner = torch.exp(ends["S"][0] - vr["S"]) * vr["b"]
        partial = torch.einsum("pmj...,pmj->pm...", inner, (u - start[:, None])[:, :, None] * w)
        vu = torch.exp(ends["S"][0] - v["S"]) * v["b"]
        whole = torch.einsum("pm...,pm->p...", vu, wu)  # F over each full piece
        before = torch.cat([torch.zeros_like(whole[:1]), whole.cumsum(0)[:-1]])
        big_f = before[:, None] + partial
        wb = torch.einsum("pm...,pm->...", expo * big_f, wu)
        return torch.exp(ends["L"][0] - ends["L"][1]), W, wb

    def served(self, process: Process, who: str) -> None:
        """A ``ValueError`` naming ``who`` unless ``process`` is the process these EMS were fitted to."""
        p = self.process
        if not (equivalent(process, p) and (process.t_min, process.t_max) == (p.t_min, p.t_max)):
            raise ValueError(
                f"{who}: the EMS were fitted to {p!r}, not to {process!r} (another kind, other alpha / sigma "
                "or another time range): fit them (fit_ems) with a denoiser of this process"
            )


def _jvp_setup(fn: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``y = fn(x)`` and what :func:`_jvp` needs: ``g = J^T u`` on a graph in the dummy ``u``."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    u = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, u, create_graph=True)
    return y.detach(), g, u


def _jvp(g: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``J v`` by double backward: the gradient of ``J^T u`` in ``u`` along ``v``."""
    (jv,) = torch.autograd.grad(g, u, v, retain_graph=True)
    return jv


def fit_ems(
    den: Denoiser,
    x_T: Tensor | None = None,
    *,
    shape: Sequence[int] | None = None,
    samples: int = 256,
    generator: torch.Generator | None = None,
    nodes: int = 100,
    substeps: int = 2,
    probes: int = 1,
    delta: float = 1e-4,
    ridge: float = 1e-8,
    dtype: torch.dtype = F64,
    device: torch.device | str = "cpu",
    **cond: Any,
) -> EMS:
    r"""The EMS ``l, s, b`` of ``den`` at ``nodes`` points uniform in ``lam`` over its process's range.

    A teacher (DPM-Solver++(3M), ``substeps`` steps per EMS interval, logSNR-uniform) carries the draws
    ``x_T`` (or ``samples`` draws of the prior, ``sqrt(alpha^2 + sigma^2)`` at ``t_max`` times
    ``randn(shape)`` from ``generator``: about ``sigma_max`` for VE / EDM) through the nodes. At each node,
    with ``y = sigma eps(x, lam)`` and its Jacobian ``J`` in ``x`` (autograd, double backward):

    * ``l = mean_batch mean_v v (J v)`` (``probes`` Rademacher ``v`` per draw, the same at every node);
    * ``N' = dN/dlam = J x' + d_lam y - l' x - l x'`` along the trajectory, ``x' = (dlog alpha/dlam) x - y``;
      ``d_lam y`` at fixed ``x`` and ``l'`` (the derivative of the estimate of ``l`` along the flow) by
      central differences of step ``delta`` in ``lam`` (the denoiser's time input is not differentiable);
    * ``f = N / alpha``, ``f' = N' / alpha - (dlog alpha/dlam) f``; per entry, ``s = Cov(f', f) / (Var f +
      ridge E f^2)`` and ``b = E f' - s E f`` (``ridge`` keeps ``s`` at 0 where ``f`` does not vary with
      the draw, as for Gaussian data, where any ``s`` fits).

    Args:
        den: the denoiser (its process is the one the EMS serve).
        x_T: the teacher's initial noise, a batch (at the prior's scale); or None to draw ``samples`` of
            ``shape`` (default ``den.shape``) from ``generator``.
        nodes: EMS nodes (an integer >= 2); the authors use 1200 on images.
        substeps: teacher steps per EMS interval (>= 1).
        probes: Rademacher probes per draw for the diagonal of ``J`` (>= 1).
        delta: the finite-difference step in ``lam`` (> 0).
        ridge: relative regularisation of ``Var f`` (>= 0).
        dtype, device: of the drawn ``x_T`` (float64 by default; the statistics are float64 on the CPU).
        **cond: passed to the network on every call.

    It differentiates the network: not under ``torch.inference_mode()`` (a ``ValueError``); under
    ``torch.no_grad()`` it turns gradients on where it needs them.

    Costs per draw ``(nodes - 1) substeps`` teacher evaluations and 5 per node (the node itself and the two
    displaced states with their Jacobian-vector products, and two at fixed ``x``), a guided denoiser's
    ``cost`` each: :attr:`EMS.nfe`.
    """
    from ..sampling import sample
    from ..schedules import Custom
    from .dpmpp import DPMSolverPPMultistep

    who = "fit_ems"
    if not isinstance(den, Denoiser):
        raise ValueError(f"{who}: den must be a steerdiff Denoiser, got {type(den).__name__}")
    nodes = integer(who, "nodes", nodes, lo=2)
    substeps = integer(who, "substeps", substeps, lo=1)
    probes = integer(who, "probes", probes, lo=1)
    delta = real(who, "delta", delta, lo=0, lo_open=True)
    ridge = real(who, "ridge", ridge, lo=0)
    if torch.is_inference_mode_enabled():
        raise ValueError(
            f"{who}: needs autograd for its Jacobian-vector products; call it outside torch.inference_mode() "
            "(torch.no_grad() is fine)"
        )
    if x_T is None:
        if shape is None:
            if den.shape is None:
                raise ValueError(f"{who}: shape (of one sample) is needed where den.shape is not set")
            shape = den.shape
        shape = sizes(who, "shape", shape)
        samples = integer(who, "samples", samples, lo=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"{who}: generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        x_T = randn(
            (samples, *shape),
            generator,
            sample_dtype(who, "dtype", dtype),
            device_or_none(who, "device", device),
        )
        # the prior at t_max: sqrt(alpha^2 + sigma^2) times standard normal (about sigma_max for VE / EDM)
        prior = math.hypot(
            float(den.process.alpha(den.process.t_max)), float(den.process.sigma(den.process.t_max))
        )
        if not math.isclose(prior, 1.0, rel_tol=1e-9):
            x_T = x_T * prior
    elif not isinstance(x_T, Tensor) or x_T.ndim < 2 or not x_T.is_floating_point():
        raise ValueError(f"{who}: x_T must be a floating (batch, *shape) tensor, got {x_T!r:.60}")
    t0 = time.perf_counter()
    proc = den.process
    lam_hi, lam_lo = float(proc.lam(proc.t_min)), float(proc.lam(proc.t_max))
    lams = torch.linspace(lam_lo, lam_hi, nodes, dtype=F64)
    fine = torch.linspace(lam_lo, lam_hi, (nodes - 1) * substeps + 1, dtype=F64)
    times = proc.t_of_lam(fine)
    times[0], times[-1] = proc.t_max, proc.t_min
    nfe = [0]  # network evaluations, a guided denoiser's cost per call
    gen = torch.Generator().manual_seed(0)
    v = [(torch.randint(0, 2, x_T.shape, generator=gen, dtype=F64) * 2 - 1).to(x_T) for _ in range(probes)]

    def sig_eps(lam: float, x: Tensor) -> Tensor:
        t = float(proc.t_of_lam(torch.tensor(lam, dtype=F64)))
        x0 = den(x, t, **cond).x0
        nfe[0] += den.cost
        return x - float(proc.alpha(t)) * x0  # sigma eps = x - alpha x0

    def dlog_alpha(lam: float) -> float:
        t = proc.t_of_lam(torch.tensor(lam, dtype=F64))
        a, sg, da, ds = proc.alpha(t), proc.sigma(t), proc.d_alpha(t), proc.d_sigma(t)
        return float((da / a) / (da / a - ds / sg))

    def diag(lam: float, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``y``, the probes' ``v J v`` averaged, ``x'`` and ``J x'`` at ``(x, lam)``."""
        with torch.enable_grad():
            y, g, u = _jvp_setup(lambda z: sig_eps(lam, z), x)
            est = torch.stack([vi * _jvp(g, u, vi) for vi in v]).mean(0)
            xdot = dlog_alpha(lam) * x - y
            jx = _jvp(g, u, xdot)
        return y.detach(), est.detach(), xdot.detach(), jx.detach()

    rows: dict[str, list[Tensor]] = {"l": [], "s": [], "b": []}

    def take(lam: float, x: Tensor) -> None:
        """``l, s, b`` at the node ``lam`` from the teacher's states ``x`` there (kept: the rows only)."""
        y, est, xdot, jx = diag(lam, x)
        # d/dlam by the central difference, or the second-order one-sided one at the range's ends
        if lam - delta < lam_lo:
            offsets, weights, w0 = (delta, 2 * delta), (2.0, -0.5), -1.5
        elif lam + delta > lam_hi:
            offsets, weights, w0 = (-delta, -2 * delta), (-2.0, 0.5), 1.5
        else:
            offsets, weights, w0 = (delta, -delta), (0.5, -0.5), 0.0
        dy, dl = w0 * y, w0 * est
        for off, wt in zip(offsets, weights, strict=True):
            dl = dl + wt * diag(lam + off, x + off * xdot)[1]  # the estimate of l along the flow
            with torch.no_grad():
                dy = dy + wt * sig_eps(lam + off, x)  # sigma eps at fixed x
        dy, dl = dy / delta, (dl / delta).mean(0).to("cpu", F64)
        l_j = est.mean(0).to("cpu", F64)
        x64, xdot64 = x.to("cpu", F64), xdot.to("cpu", F64)
        dn = (jx + dy).to("cpu", F64) - dl * x64
        alpha = float(proc.alpha(proc.t_of_lam(torch.tensor(lam, dtype=F64))))
        f = (y.to("cpu", F64) - l_j * x64) / alpha
        df = (dn - l_j * xdot64) / alpha - dlog_alpha(lam) * f
        mf, mdf = f.mean(0), df.mean(0)
        var = (f * f).mean(0) - mf * mf
        cov = (f * df).mean(0) - mf * mdf
        s_j = cov / (var + ridge * ((f * f).mean(0) + torch.finfo(F64).tiny))
        rows["l"].append(l_j)
        rows["s"].append(s_j)
        rows["b"].append(mdf - s_j * mf)

    node_lams = lams.tolist()
    take(node_lams[0], x_T.detach())

    def record(d: dict[str, Any]) -> None:
        if (d["i"] + 1) % substeps == 0:
            take(node_lams[(d["i"] + 1) // substeps], d["x"].detach())

    teacher = DPMSolverPPMultistep(order=3, max_h=math.inf)
    with torch.no_grad():  # the teacher's states carry no graph
        _, info = sample(
            den,
            x_T,
            steps=len(times) - 1,
            solver=teacher,
            schedule=Custom(times),
            final="none",
            callback=record,
            return_info=True,
            **cond,
        )
    nfe[0] += info.nfe
    seconds = time.perf_counter() - t0
    l, s, b = (torch.stack(rows[name]) for name in ("l", "s", "b"))  # noqa: E741
    return EMS(proc, lams, l, s, b, nfe=nfe[0], seconds=seconds)


class DPMSolverV3(Solver):
    """DPM-Solver-v3: the multistep predictor of order 1-3 and its corrector over fitted EMS (module
    docstring). One NFE per step, at its own node: :func:`steerdiff.paradigms` takes it (a guess of ``x_i``
    moved by the corrector's move).

    Args:
        ems: the :class:`EMS` of the model (:func:`fit_ems`), fitted to the process it samples.
        order: the predictor's order (the authors: 3).
        pseudo: the pseudo-order predictor (divided differences; the authors at <= 5 steps).
        corrector: correct each state after its evaluation (the authors at <= 6 steps on CIFAR-10, at every
            step count on latent models).
        corrector_pseudo: the corrector one order higher than the predictor, with divided differences.
        half: correct only at nodes in the noisier half of the time range (the half-corrector).
        lower_order_final, max_h, max_h_ratio: as :class:`~steerdiff.solvers.dpmpp.DPMSolverPPMultistep`'s
            (:func:`~steerdiff.solvers.base.step_order`).
    """

    name: ClassVar[str] = "dpm_solver_v3"
    max_order: ClassVar[int] = 3
    picard: ClassVar[str | None] = "step"

    def __init__(
        self,
        ems: EMS,
        order: int = 3,
        *,
        pseudo: bool = False,
        corrector: bool = True,
        corrector_pseudo: bool = False,
        half: bool = False,
        lower_order_final: bool = True,
        max_h: MaxH = ODE_MAX_H,
        max_h_ratio: float = ODE_MAX_H_RATIO,
    ) -> None:
        who = type(self).__name__
        if not isinstance(ems, EMS):
            raise ValueError(f"{who}: ems must be an EMS (fit_ems(den, ...)), got {type(ems).__name__}")
        self.ems, self.order = ems, order
        self.pseudo = boolean(who, "pseudo", pseudo)
        self.corrector = boolean(who, "corrector", corrector)
        self.corrector_pseudo = boolean(who, "corrector_pseudo", corrector_pseudo)
        self.half = boolean(who, "half", half)
        self.lower_order_final = boolean(who, "lower_order_final", lower_order_final)
        self.max_h, self.max_h_ratio = max_h, max_h_ratio
        check_long_step(self, max_h, max_h_ratio)
        super().__post_init__()
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._grid: tuple[float, ...] = ()  # the log-SNR nodes of the grid the kept tables are for

    def __repr__(self) -> str:
        return (
            f"DPMSolverV3(order={self.order}, pseudo={self.pseudo}, corrector={self.corrector}, "
            f"corrector_pseudo={self.corrector_pseudo}, half={self.half}, "
            f"EMS of {self.ems.lam.numel()} nodes)"
        )

    def init_state(self, grid: Grid) -> dict[str, Any]:
        who = type(self).__name__
        self.ems.served(grid.process, who)
        lo, hi = float(self.ems.lam[0]), float(self.ems.lam[-1])
        noisy = grid.lam[: len(grid.lam) - grid.clean_end]
        tol = 1e-9 * max(1.0, abs(lo), abs(hi))
        if any(not lo - tol <= v <= hi + tol for v in noisy):
            raise ValueError(
                f"{who}: the grid's log-SNR nodes must lie in the EMS range [{lo:.6g}, {hi:.6g}], got "
                f"{[round(v, 6) for v in noisy]}"
            )
        # the tables kept are those of the latest grid: a solver reused over many grids holds one grid's
        nodes = tuple(grid.lam)
        if nodes != self._grid:
            self._cache.clear()
            self._grid = nodes
        # f: N / alpha of the evaluations, newest first; x/k/pred: start, order, result of the last prediction
        return {"f": History(self.order), "x": None, "k": 0, "pred": None}

    def moved(self, state: dict[str, Any]) -> None:
        """A corrector moved ``x_i``: no correction of it, and the estimates restart."""
        super().moved(state)
        state["x"] = None

    def _coefficients(self, a: float, c: float, lams: Sequence[float], pseudo: bool, like: Tensor) -> Any:
        """Kept per step, device and dtype, for the latest grid (:func:`~steerdiff._ops.kept`; copied with
        :func:`~steerdiff._ops.host_to`, no device sync): ``x_t = A x_s - C (sum_j w_j g_j + W_b)`` and,
        per point ``j``, ``g_j = e^{S_s - S_j} f_j - F_s(lam_j)``."""

        def make() -> tuple[Tensor, list[Tensor], Tensor, list[Tensor], list[Tensor]]:
            ems, k = self.ems, len(lams)
            decay, W, wb = ems.step_integrals(a, c, k)
            r, zero = [u - a for u in lams], torch.zeros_like(W[0])
            fact = [math.factorial(n) * W[n] for n in range(k)]  # n! W_n: the weight of g^(n) / n!
            if pseudo:  # g^(n) / n! ~ g[u_0..u_n]
                per = [newton_weights(r, [0.0] * n + [1.0]) for n in range(k)]
                w = [sum((per[n][j] * fact[n] for n in range(j, k)), zero) for j in range(k)]
            else:  # the interpolating polynomial's Taylor coefficients
                basis = lagrange_basis(r)
                w = [sum((basis[j][n] * fact[n] for n in range(k)), zero) for j in range(k)]
            S = ems.at(torch.tensor([a, *lams], dtype=F64))["S"]
            shift = [torch.exp(S[0] - S[j + 1]) for j in range(k)]
            drift = [ems.drift_integral(a, u) for u in lams]
            table = torch.stack([decay, wb, *w, *shift, *drift])
            on = host_to(table, like.device, like.dtype).unbind(0)  # one copy
            return on[0], list(on[2 : 2 + k]), on[1], list(on[2 + k : 2 + 2 * k]), list(on[2 + 2 * k :])

        return kept(self._cache, (a, c, tuple(lams), pseudo, like.device, like.dtype), make)

    def _l(self, lam: float, like: Tensor) -> Tensor:
        """``l`` at ``lam`` on ``like``'s device and dtype, kept (as :meth:`_coefficients`)."""
        return kept(
            self._cache,
            ("l", lam, like.device, like.dtype),
            lambda: host_to(self.ems.at(torch.tensor(lam, dtype=F64))["l"], like.device, like.dtype),
        )

    def _update(
        self, grid: Grid, x: Tensor, src: int, dst: int, f: list[Tensor], lams: list[float], pseudo: bool
    ) -> Tensor:
        """The predictor (``dst = src + 1``, points ``src, src-1, ...``) or corrector (points ``src, dst,
        src-1, ...``) update of ``x`` at node ``src``, from the estimates ``f`` at ``lams``."""
        decay, w, wb, shift, drift = self._coefficients(grid.lam[src], grid.lam[dst], lams, pseudo, x)
        total = wb
        for wj, sj, dj, fj in zip(w, shift, drift, f, strict=True):
            total = total + wj * (sj * fj - dj)
        a = grid.alpha[dst]
        return (a / grid.alpha[src]) * decay * x - a * decay * total

    def step(self, model: Model, x: Tensor, i: int, grid: Grid, state: dict[str, Any]) -> Tensor:
        pred = model(x, grid.t[i], i)
        lam_i, alpha = grid.lam[i], grid.alpha[i]
        l_i = self._l(lam_i, x)
        n_i = (1 - l_i) * pred.x - alpha * pred.x0  # N = sigma eps - l x at the evaluated point
        f_i = n_i / alpha
        hist = state["f"]
        if self.corrector and state["x"] is not None:
            k = state["k"] + int(self.corrector_pseudo)
            mid = (grid.process.t_min + grid.process.t_max) / 2
            if k > 1 and (not self.half or grid.t[i] > mid):
                f_pts = [hist.values[0], f_i, *hist.values[1 : k - 1]]
                lams = [hist.at[0], lam_i, *hist.at[1 : k - 1]]
                corrected = self._update(grid, state["x"], i - 1, i, f_pts, lams, self.corrector_pseudo)
                predicted = state["pred"]
                # entries moved since the prediction: kept, or a guess's moved by the correction's move
                if x is not predicted:
                    off = torch.add(x, corrected - predicted) if model.guesses else x
                    corrected = torch.where(x == predicted, corrected, off)
                x = corrected
        if grid.is_final_clean(i):
            return ((1 - l_i) * x - alpha * f_i) / alpha  # x0 at x with the evaluation's N kept
        hist.push(f_i, lam_i)
        k = step_order(
            i, grid, self.order, len(hist.values), self.lower_order_final, self.max_h, self.max_h_ratio
        )
        state["x"], state["k"] = x, k
        state["pred"] = self._update(grid, x, i, i + 1, hist.values[:k], hist.at[:k], self.pseudo)
        return state["pred"]
