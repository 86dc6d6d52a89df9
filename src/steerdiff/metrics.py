r"""Distances between a sampler's output and an exact answer.

* :func:`relative_rmse` -- per-sample error against the exact solution from the same noise (ODE
  solvers).
* :func:`sliced_wasserstein` -- sliced Wasserstein-2 between two sample sets (Rabin et al. 2011;
  Bonneel et al. 2015): ``SW_2^2 = E_theta W_2^2(theta^T X, theta^T Y)`` over uniform directions
  ``theta``, estimated with seeded projections; the 1-D transport is the sorted matching when one
  set's size is a multiple of the other's and POT's (``ot.sliced_wasserstein_distance``) otherwise;
  ``control_variates="lower"`` / ``"upper"`` corrects the average over directions with the control variates
  of Nguyen & Ho (ICLR 2024) for less variance at the same number of projections.
* :func:`mmd` -- maximum mean discrepancy with the RBF kernel, bandwidth by the median heuristic
  (Gretton et al. 2012), unbiased estimate.
* :func:`frechet_distance` -- Frechet distance between Gaussians fitted to two feature sets (the FID
  of Heusel et al. 2017 on a chosen feature map).
* :func:`floor` -- what a metric reads between two independent exact sample sets of the same size:
  a sampler's distance is quoted beside it.
* :func:`minority_score` -- how unusual a clean sample is to a denoiser (Um, Lee & Ye 2024), and
  :func:`minority_levels`, its quantile levels, the labels of a minority classifier
  (:class:`~steerdiff.guidance.MinorityGuidance`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import integer, real, tensor
from .denoiser import Denoiser, check_denoiser
from .noise import Generators, check_generators, randn
from .sampling import check_x_T

__all__ = [
    "floor",
    "frechet_distance",
    "minority_levels",
    "minority_score",
    "mmd",
    "relative_rmse",
    "sliced_wasserstein",
]

Distance = str | Callable[[Tensor, Tensor], Tensor]
DISTANCES = ("l2", "l1")


def _tensors(who: str, **values: object) -> None:
    """A ``ValueError`` naming the first of ``values`` that is not a tensor (an array's ``.reshape`` or
    ``.shape`` gave an AttributeError deep inside)."""
    for name, value in values.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _pair(x: Tensor, y: Tensor, name: str, names: tuple[str, str] = ("x", "y")) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as float64 ``(n, d)`` sample sets, each of at least 2 samples of ``d >= 1`` entries
    (checked before the reshape, which raised torch's RuntimeError for an empty set)."""
    _tensors(name, **dict(zip(names, (x, y), strict=True)))
    for arg, v in zip(names, (x, y), strict=True):
        if v.ndim == 0 or v.shape[0] < 2 or v[0].numel() == 0:
            raise ValueError(
                f"{name}: need at least 2 samples of at least one entry in each set, {arg} has shape "
                f"{tuple(v.shape)}"
            )
    x, y = x.reshape(x.shape[0], -1).to(torch.float64), y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name}: sample dimensions differ, {x.shape[1]} vs {y.shape[1]}")
    return x, y


def relative_rmse(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` over all entries, in float64: a solver's error against the exact
    solution from the same initial noise. ``ref`` must have a nonzero entry (the relative error of a
    zero reference is undefined).

    ``x - ref`` and ``ref`` are scaled by the power of two nearest below ``1 / max|ref|`` first: exact in
    floating point, so the value is unchanged, but the squares of a tiny (``1e-200``) or huge
    (``1e200``) reference no longer underflow to ``0 / 0`` or overflow to ``inf / inf``.
    """
    _tensors("relative_rmse", x=x, ref=ref)
    if x.shape != ref.shape:
        raise ValueError(f"relative_rmse: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.numel() == 0:
        raise ValueError(f"relative_rmse: x and ref have no entries, shape {tuple(x.shape)}")
    if not bool(ref.any()):
        raise ValueError(
            "relative_rmse: ref is all zero; a relative error needs a reference with a nonzero entry"
        )
    x, ref = x.to(torch.float64), ref.to(torch.float64)
    scale = torch.ldexp(
        torch.ones((), dtype=torch.float64, device=ref.device), -torch.frexp(ref.abs().amax())[1]
    )
    return float((((x - ref) * scale) ** 2).mean().sqrt() / ((ref * scale) ** 2).mean().sqrt())


CONTROL_VARIATES = ("lower", "upper")


def _control_variate_kind(value: object) -> str | None:
    """``None`` for the plain estimate (``False``), else the variate's name (``True``: ``"upper"``)."""
    if isinstance(value, bool):
        return "upper" if value else None
    if isinstance(value, str) and value in CONTROL_VARIATES:
        return value
    raise ValueError(
        f"sliced_wasserstein: control_variates must be False, True or one of {list(CONTROL_VARIATES)}, "
        f"got {value!r}"
    )


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    projections: int = 512,
    generator: torch.Generator | None = None,
    control_variates: bool | str = False,
) -> float:
    """Sliced Wasserstein-2 distance between the empirical laws of ``x`` and ``y`` (``(n, ...)``).

    ``projections`` (an integer >= 1) directions uniform on the sphere, drawn from ``generator``
    (default: one seeded 0; the same generator state gives the same directions, so distances of
    several samplers are comparable, and a call without one always gives the same value).

    ``control_variates`` (default ``False``: the plain average ``sqrt(mean_l W_2^2(theta_l))``) takes
    ``"lower"`` or ``"upper"`` (``True`` is ``"upper"``): the same directions' average corrected by a control
    variate (:func:`_controlled`, Nguyen & Ho 2024), an estimate of the same ``SW_2`` with less variance
    over the directions' draw.
    """
    x, y = _pair(x, y, "sliced_wasserstein")
    projections = integer("sliced_wasserstein", "projections", projections, lo=1)
    kind = _control_variate_kind(control_variates)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = randn((x.shape[1], projections), generator, torch.float64, x.device)  # the same on any device
    theta = theta / theta.norm(dim=0, keepdim=True)
    n, m = len(x), len(y)
    if max(n, m) % min(n, m) == 0:
        # uniform weights, one size a multiple k of the other: the 1-D optimal plan sends the i-th
        # smallest of the smaller set to the i-th block of k smallest of the larger one
        # projections as rows: sorting contiguous rows is ~3x faster than sorting columns on CPU
        px = (theta.T @ x.T).sort(dim=1).values
        py = (theta.T @ y.T).sort(dim=1).values
        if n < m:
            px = px.repeat_interleave(m // n, dim=1)
        elif m < n:
            py = py.repeat_interleave(n // m, dim=1)
        gaps = (px - py).pow(2)
        if kind is None:
            return float(gaps.mean().sqrt())
        return _controlled(x, y, theta, gaps.mean(dim=1), kind)
    import ot

    if kind is None:
        return float(ot.sliced_wasserstein_distance(x, y, projections=theta, p=2))
    return _controlled(x, y, theta, ot.wasserstein_1d(x @ theta, y @ theta, p=2), kind)


def _controlled(x: Tensor, y: Tensor, theta: Tensor, w2: Tensor, kind: str) -> float:
    r"""``SW_2`` from the directions ``theta`` (``(d, L)``, unit columns) and their ``W_2^2`` values ``w2``
    (``(L,)``), with the control variate of Nguyen & Ho (ICLR 2024, "Sliced Wasserstein Estimation with
    Control Variates", Sec. 3).

    The projected laws are replaced by Gaussians with their means and variances (``theta^T m_x``,
    ``theta^T S_x theta``; ``S`` the empirical covariance, ``1/n``), whose ``W_2^2`` is
    ``(theta^T (m_x - m_y))^2 + (sqrt(theta^T S_x theta) - sqrt(theta^T S_y theta))^2``. Its bounds have
    closed-form means over ``theta`` uniform on the sphere (``E theta theta^T = I / d``):

        lower  G(theta) = (theta^T (m_x - m_y))^2,                               E G = |m_x - m_y|^2 / d,
        upper  G(theta) = (theta^T (m_x - m_y))^2 + theta^T (S_x + S_y) theta,    E G = (|m_x - m_y|^2
                                                                                  + tr S_x + tr S_y) / d.

    The estimate of ``SW_2^2`` is ``mean(w2) - gamma (mean(G) - E G)`` with the paper's coefficient
    ``gamma = mean((w2 - mean(w2)) (G - E G)) / mean((G - E G)^2)`` from the same directions (0 where ``G``
    is constant: ``d = 1``, or the lower variate of equal means); its square root, 0 where a rare draw makes
    it negative. ``gamma`` from the same draws makes it biased by ``O(1/L)`` (the paper's estimator).
    """
    d = x.shape[1]
    mx, my = x.mean(dim=0), y.mean(dim=0)
    dm = mx - my
    g = (dm @ theta).pow(2)
    g_mean = dm.pow(2).sum() / d
    if kind == "upper":
        cx, cy = x - mx, y - my
        g = g + (cx @ theta).pow(2).mean(dim=0) + (cy @ theta).pow(2).mean(dim=0)
        g_mean = g_mean + (cx.pow(2).sum() / len(x) + cy.pow(2).sum() / len(y)) / d
    dg = g - g_mean
    var = float(dg.pow(2).mean())
    gamma = float(((w2 - w2.mean()) * dg).mean()) / var if var > 0 else 0.0
    return max(float(w2.mean() - gamma * dg.mean()), 0.0) ** 0.5


def mmd(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``; ``h = bandwidth`` (a finite number
    > 0) defaults to the median pairwise distance of the pooled samples (median heuristic)."""
    x, y = _pair(x, y, "mmd")
    if bandwidth is not None:
        bandwidth = real("mmd", "bandwidth", bandwidth, lo=0, lo_open=True)
    z = torch.cat([x, y])
    d = torch.cdist(z, z)
    if bandwidth is None:
        for name, v in (("x", x), ("y", y)):
            if not bool(torch.isfinite(v).all()):  # a NaN median would read as bandwidth 0 below
                raise ValueError(f"mmd: the median heuristic needs finite samples; {name} has NaN or inf")
        bandwidth = float(d[~torch.eye(len(z), dtype=torch.bool)].median())
        if not bandwidth > 0:
            raise ValueError(
                "mmd: the median heuristic gives bandwidth 0 (most samples coincide); pass a bandwidth > 0"
            )
    # (d / h)^2, not d^2 / h^2: h^2 of a tiny bandwidth (1e-200) underflows to 0, and 0 / 0 on the diagonal
    k = torch.exp(-0.5 * (d / bandwidth).pow(2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def _psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0,
    round-off, set to 0)."""
    lam, u = torch.linalg.eigh(m)
    return (u * lam.clamp_min(0).sqrt()) @ u.mT


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    r"""Frechet (Wasserstein-2) distance, squared, between Gaussians fitted to two feature sets.

    With the sample means ``mu`` and unbiased covariances ``C`` of ``feats_a`` and ``feats_b``
    (``(n, d)``; more dimensions are flattened), Dowson & Landau (1982):

        FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2}),

    the FID of Heusel et al. 2017 when the features are Inception activations. Computed in float64
    from two symmetric eigendecompositions (the inner matrix is symmetric PSD, so no complex
    ``sqrtm`` round-off).
    """
    a, b = _pair(feats_a, feats_b, "frechet_distance", ("feats_a", "feats_b"))
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_cross = torch.linalg.eigvalsh(0.5 * (inner + inner.mT)).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross)


def floor(
    sample: Callable[[int, torch.Generator], Tensor],
    n: int,
    metric: Callable[[Tensor, Tensor], float] = sliced_wasserstein,
    repeats: int = 5,
    generator: torch.Generator | None = None,
    reference: Tensor | None = None,
) -> float:
    """Mean of ``metric(a, b)`` over ``repeats`` pairs of independent exact sample sets of size ``n``
    (``sample(n, generator)``, e.g. ``GaussianMixture.sample``): the value a perfect sampler reads.
    With a fixed ``reference`` set (what the sampler is compared to), ``b = reference``. ``n``: an
    integer >= 2; ``repeats``: an integer >= 1."""
    if not callable(sample):
        raise ValueError(f"floor: sample must be callable as sample(n, generator), got {type(sample)}")
    n = integer("floor", "n", n, lo=2)
    repeats = integer("floor", "repeats", repeats, lo=1)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    pairs = ((sample(n, g), sample(n, g) if reference is None else reference) for _ in range(repeats))
    return sum(metric(a, b) for a, b in pairs) / repeats


def reconstruction_distance(who: str, distance: object) -> Callable[[Tensor, Tensor], Tensor]:
    """``d(a, b) -> (n,)`` per sample for ``distance``: ``"l2"``, the Euclidean norm ``||a - b||_2`` over a
    sample's entries (the authors' choice without LPIPS, ``norm_for_mg=2``), ``"l1"``, ``||a - b||_1``, or
    a callable ``(a, b) -> (n,)`` such as LPIPS (the papers' choice on images), whose output is checked at
    each call. Else a ``ValueError`` naming ``who``'s ``distance``."""
    if distance in DISTANCES:
        p = 2 if distance == "l2" else 1
        return lambda a, b: torch.linalg.vector_norm((a - b).reshape(a.shape[0], -1), ord=p, dim=1)
    if not callable(distance) or isinstance(distance, str):
        raise ValueError(
            f"{who}: distance must be one of {list(DISTANCES)} or a callable (a, b) -> (n,), "
            f"got {distance!r:.60}"
        )

    def checked(a: Tensor, b: Tensor) -> Tensor:
        d = distance(a, b)
        if not isinstance(d, Tensor) or tuple(d.shape) != (a.shape[0],):
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(
                f"{who}: distance must return a ({a.shape[0]},) tensor (one per sample), got {got}"
            )
        return d

    return checked


def minority_score(
    den: Denoiser,
    x0: Tensor,
    t: float | None = None,
    *,
    samples: int = 5,
    distance: Distance = "l2",
    generator: Generators = None,
    **cond: object,
) -> Tensor:
    r"""The minority score of clean samples ``x0`` (Um, Lee & Ye 2024, "Don't Play Favorites: Minority
    Guidance for Diffusion Models", ICLR, Eq. 7): the expected distance between ``x0`` and Tweedie's
    reconstruction of it from one noise level ``t``,

        l(x0) = E_{eps ~ N(0, I)} d(x0, x0_hat(alpha_t x0 + sigma_t eps, t)),

    estimated with ``samples`` draws of ``eps``. The posterior mean ``x0_hat`` pulls a noised sample
    toward where most of the data lie, so samples of low-density regions are reconstructed worst: a
    large score marks a minority sample.

    Args:
        den: the denoiser (``x0_hat``).
        x0: clean samples ``(n, *den.shape)``.
        t: the process time of the perturbation; default ``t_min + 0.6 (t_max - t_min)``, the
            authors' choice (``perturb_t = 60`` of a 100-step respacing of a 1000-step model:
            timestep 605 of 999, ``construct_ms_dataset.py``).
        samples: draws of ``eps`` per sample (the authors' ``n_iter = 5``); NFE ``samples``
            evaluations of ``den`` per sample.
        distance: ``"l2"`` (``||a - b||_2``), ``"l1"``, or ``d(a, b) -> (n,)``: the paper's is LPIPS.
        generator: draws ``eps``: one ``torch.Generator``, a list with one per row, or ``None``
            (torch's global RNG).
        **cond: passed to ``den``.

    Returns the ``(n,)`` scores (the distance's dtype), computed under ``torch.no_grad()``.
    """
    who = "minority_score"
    check_denoiser(who, "den", den)
    check_x_T(den, x0, who, "x0")
    p = den.process
    t = p.t_min + 0.6 * (p.t_max - p.t_min) if t is None else real(who, "t", t, lo=p.t_min, hi=p.t_max)
    samples = integer(who, "samples", samples, lo=1)
    d = reconstruction_distance(who, distance)
    generator = check_generators(who, generator, x0.shape[0])
    alpha, sigma = den.coefficients(t, x0)[:2]
    with torch.no_grad():
        draws = [
            d(x0, den(alpha * x0 + sigma * randn(x0.shape, generator, x0.dtype, x0.device), t, **cond).x0)
            for _ in range(samples)
        ]
    return torch.stack(draws).mean(0)


def minority_levels(scores: Tensor, levels: int, reference: Tensor | None = None) -> Tensor:
    """Quantile levels of minority scores (Um, Lee & Ye 2024, Sec. 3.3): the labels ``0 ... levels - 1``
    a minority classifier is trained on. With thresholds ``q_l``, the ``(l + 1) / levels`` quantiles of
    ``reference`` (default ``scores`` itself), a score ``s`` is at level ``l`` where
    ``q_{l-1} < s <= q_l`` (level 0 below ``q_0``, the top level ``levels - 1`` the rarest samples; the
    authors' ``construct_ms_dataset.py``, which uses 100 levels). ``scores``: a finite 1-d tensor;
    ``reference``: one with at least one entry, to label new scores by the levels of a training set.
    Returns ``int64`` labels of ``scores``' shape."""
    who = "minority_levels"
    levels = integer(who, "levels", levels, lo=2)
    s = _scores(who, "scores", scores)
    ref = s if reference is None else _scores(who, "reference", reference)
    q = torch.linspace(1 / levels, 1, levels, dtype=torch.float64, device=ref.device)[:-1]
    return torch.bucketize(s, torch.quantile(ref, q).to(s.device))


def _scores(who: str, name: str, value: object) -> Tensor:
    """``value`` as a float64 1-d tensor of at least one finite entry, else a ``ValueError`` naming it."""
    v = tensor(who, name, value, torch.float64)
    if v.ndim != 1 or v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError(
            f"{who}: {name} must be a non-empty 1-d tensor of finite scores, got shape {tuple(v.shape)}"
        )
    return v
