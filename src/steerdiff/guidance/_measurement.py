r"""What the inverse-problem guidance methods share: the measurement ``y = A x0 + s n`` and its checks.

:class:`MeasurementGuided` holds a linear operator ``A`` (:mod:`steerdiff.inverse`), the observation
``y`` (one observation of shape ``A.shape_out``, broadcast over the batch, or one per sample) and
the noise level ``s``, and checks them against the sample shape. :meth:`MeasurementGuided.vjp_score`
is the one gradient DPS and PiGDM need: for a measurement-space weight ``w(r)`` of the residual
``r = y - A x0_hat(x_t)``, held fixed,

    g = grad_x <A x0_hat(x), w> = (d x0_hat / d x_t)^T A^T w,

one vector-Jacobian product through the denoiser (DPS: ``w = r / ||r||`` or ``r / s^2``; PiGDM:
``w = (r_t^2 A A^T + s^2 I)^{-1} r``, :meth:`MeasurementGuided.gaussian_weight`, which TDS's
linear-Gaussian twist uses too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import real
from ..denoiser import Denoiser, Prediction, take_tensor_rows, take_wrapped_rows
from ..inverse.operators import LinearOperator
from ..solvers.base import work_dtype
from .base import Guided, denoise_with_grad, grad_on, hold

__all__ = ["MeasurementGuided"]


class MeasurementGuided(Guided):
    """A guided denoiser that conditions on ``y = A x0 + noise_std n`` (base class).

    Args:
        base: the denoiser of the prior.
        operator: a :class:`~steerdiff.inverse.LinearOperator` whose ``shape_in`` is the sample shape.
        y: ``operator.shape_out`` (one observation for the whole batch) or ``(batch, *shape_out)``, one per
            sample. Under a particle method of :mod:`steerdiff.smc` row ``b`` guides the particles of
            batch row ``b`` (:meth:`take_rows`); ``batch x particles`` rows, each row's repeated for its
            particles, are taken as they are.
        noise_std: the observation noise ``s >= 0``; ``None`` takes ``operator.noise_std``.
    """

    def __init__(
        self, base: Denoiser, operator: LinearOperator, y: Tensor, noise_std: float | None = None
    ) -> None:
        super().__init__(base)
        who = type(self).__name__
        if not isinstance(operator, LinearOperator):
            raise ValueError(
                f"{who}: operator must be a steerdiff.inverse.LinearOperator, got {type(operator)}"
            )
        if base.shape is not None and tuple(base.shape) != tuple(operator.shape_in):
            raise ValueError(
                f"{who}: operator acts on samples of shape {operator.shape_in}, the denoiser's samples have "
                f"shape {base.shape}"
            )
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise ValueError(f"{who}: y must be a floating-point torch.Tensor, got {type(y).__name__}")
        out = tuple(operator.shape_out)
        if tuple(y.shape) != out and tuple(y.shape[1:]) != out:
            raise ValueError(
                f"{who}: y must have shape {out} (one observation) or (batch, *{out}), got {tuple(y.shape)}"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{who}: y contains NaN or inf")
        s = operator.noise_std if noise_std is None else noise_std
        self.operator = operator
        self.y = y.detach()
        # (the y it was made from, y on a device and dtype) per device and dtype asked for
        self._y: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self.noise_std = real(who, "noise_std", s, lo=0)

    def probe(self) -> Tensor:
        """One observation ``(1, *shape_out)`` in the dtype the guidance computes in (float32 for a
        half-precision ``y``, as :meth:`observation` casts it to the state's), to check at construction
        what the operator can solve (a circular :class:`~steerdiff.inverse.Blur` refuses half precision)."""
        y = self.y.reshape(-1, *self.operator.shape_out)[:1]
        return y.to(work_dtype(y.dtype))

    def check_pinv(self) -> None:
        """A ``ValueError`` naming the class unless the operator has a pseudo-inverse (methods that
        replace or project the measured component need ``A^+``)."""
        try:
            self.operator.pinv(self.probe())
        except NotImplementedError as err:
            raise ValueError(f"{type(self).__name__}: the operator has no pseudo-inverse ({err})") from err

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy with a per-sample ``y`` of ``n`` rows taken at ``rows``, around
        :func:`~steerdiff.denoiser.take_wrapped_rows` (``base``'s rows, a subclass's per-row generators);
        itself where nothing changes. A ``y`` of ``len(rows)`` rows for integer ``rows`` (the particle
        methods' ``batch x particles`` rows, each batch row's repeated for its particles) is kept as it is;
        any other row count is a ValueError naming ``y``."""
        out, y = take_wrapped_rows(self, rows, n), self.y
        per_sample = y.ndim > len(self.operator.shape_out)
        if per_sample and len(y) != n:
            k = len(rows) if isinstance(rows, Tensor) else len(range(n)[rows])
            if not (isinstance(rows, Tensor) and len(y) == k):
                ok = f"{n} or {k}" if isinstance(rows, Tensor) else f"{n}"
                raise ValueError(
                    f"{type(self).__name__}: y holds {len(y)} observations for calls on {k} samples taken "
                    f"from a batch of {n} (a particle method of steerdiff.smc repeats each batch row for its "
                    f"particles): give one for all ({tuple(self.operator.shape_out)}) or {ok}"
                )
            per_sample = False
        if not per_sample:
            return out
        out = copy.copy(out) if out is self else out
        out.y = take_tensor_rows(y, rows)
        # its own cache, of the taken rows of the original's (no new device copy per max_batch slice)
        out._y = {key: (out.y, take_tensor_rows(v, rows)) for key, (src, v) in self._y.items() if src is y}
        return out

    def observation(self, x: Tensor) -> Tensor:
        """``y`` as a ``(batch, *shape_out)`` tensor on ``x``'s device and dtype; checks ``x``'s shape."""
        who, op = type(self).__name__, self.operator
        if tuple(x.shape[1:]) != tuple(op.shape_in):
            raise ValueError(
                f"{who}: x has sample shape {tuple(x.shape[1:])}, the operator acts on {op.shape_in}"
            )
        kept = self._y.get((x.device, x.dtype))
        if kept is not None and kept[0] is self.y:
            y = kept[1]
        else:  # first use on this device and dtype, or y was replaced
            with torch.inference_mode(False):  # kept for later runs, which may need autograd
                y = self.y.to(device=x.device, dtype=x.dtype)
            self._y[x.device, x.dtype] = (self.y, y)
        if y.shape == op.shape_out:
            return y.expand(x.shape[0], *op.shape_out)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{who}: y holds {y.shape[0]} observations for a batch of {x.shape[0]} samples")
        return y

    def residual(self, x0: Tensor) -> Tensor:
        """``y - A x0``, ``(batch, *shape_out)``."""
        return self.observation(x0) - self.operator.forward(x0)

    def project(self, x0: Tensor) -> Tensor:
        """``x0 + A^+ (y - A x0)``: the point of ``{A x = y}`` nearest to ``x0`` (least squares if ``y`` is
        not in the range of ``A``)."""
        return x0 + self.operator.pinv(self.residual(x0))

    def gaussian_weight(
        self, res: Tensor, alpha: float | Tensor, sigma: float | Tensor, prior_var: float = 1.0
    ) -> Tensor:
        """``C^{-1} res`` for ``C = r^2 A A^T + s^2 I``: the precision of ``y | x_t`` when ``x0 | x_t ~
        N(x0_hat, r^2 I)``, with ``r^2 = v sigma^2 / (alpha^2 v + sigma^2)`` the variance of ``x0 | x_t``
        under a ``N(m, v I)`` prior (``v = prior_var``; PiGDM's ``r_t^2`` at ``v = 1``).

        ``alpha``, ``sigma``: floats, or per-sample tensors (``n`` entries, one per row of ``res``)
        for one ``aat_solve`` with a shift per sample. ``C^{-1} res = aat_solve(res, s^2 / r^2) / r^2``,
        and ``res / s^2`` where ``r^2 = 0``.
        """
        s2 = self.noise_std**2
        r2 = prior_var * sigma * sigma / (alpha * alpha * prior_var + sigma * sigma)
        if not isinstance(r2, Tensor):
            return res / s2 if r2 == 0 else self.operator.aat_solve(res, s2 / r2) / r2
        r2 = r2.reshape(-1).expand(res.shape[0])
        col = r2.reshape(-1, *([1] * (res.ndim - 1)))
        return torch.where(col > 0, self.operator.aat_solve(res, s2 / r2) / col, res / s2)

    def vjp_score(
        self,
        x: Tensor,
        t: float | Tensor,
        weight: Callable[[Tensor, Prediction], Tensor],
        net_dtype: torch.dtype | None = None,
        /,
        **cond: Any,
    ) -> tuple[Prediction, Tensor]:
        """``(pred, g)``: the base prediction at ``x`` (detached, holding the estimate the net gives --
        ``x0`` for an ``x0``/``v`` net, ``eps`` for an ``eps`` net, read before the residual derives ``x0``
        -- so that :func:`~steerdiff.guidance.add_score` steers it without a trip through ``x``; its net in
        ``net_dtype``, default ``x``'s) and ``g = J^T A^T w``, with ``J = d x0_hat / d x_t`` and
        ``w = weight(r, pred)`` (held fixed) for ``r = y - A x0_hat``, in ``x``'s dtype. Where ``x`` is
        itself differentiated (:func:`~steerdiff.guidance.grad_on`'s ``nested``: this guidance inside
        another's gradient) both are functions of ``x``, ``g`` through ``J`` and ``w`` alike."""
        y = self.observation(x)
        who = type(self).__name__
        with grad_on(who, x) as nested:
            xr, pred = denoise_with_grad(who, self.base, x, t, net_dtype, **cond)
            x0_held = pred.x0_given  # before the residual reads x0 (which derives it for an eps net)
            ax0 = self.operator.forward(pred.x0)
            w = weight(y - ax0, pred)
            (g,) = torch.autograd.grad(ax0, xr, w if nested else w.detach(), create_graph=nested)
        return hold(pred, x0_held, nested), g
