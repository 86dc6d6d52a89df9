r"""What every guidance method shares: a guided denoiser *is* a :class:`~steerdiff.denoiser.Denoiser`.

A guidance method wraps a base denoiser (same process, time map and sample shape) and returns,
at ``(x, t)``, a :class:`~steerdiff.denoiser.Prediction` whose ``x0``/``eps`` are steered. Every
solver therefore works with every guidance, and the sampler's NaN check and NFE count apply
(``cost`` network evaluations per call).

Most methods steer through the score. With ``x_t = alpha x0 + sigma eps`` and Tweedie's formula
``E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha``, adding a log-likelihood gradient
``g = grad_x log p(y | x_t)`` to the score gives

    eps' = eps - sigma g,        x0' = x0 + (sigma^2 / alpha) g,

which :func:`add_score` applies. Gradients through the network come from :func:`denoise_with_grad`,
taken under :func:`grad_on`: autograd is switched on for them also under an outer ``torch.no_grad()``
(pipelines sample under it), and refused clearly under ``torch.inference_mode()``.

Where ``x`` itself is being differentiated through -- the wrapper inside another gradient
(``DPS(SelfGuidedMinority(den), ...)``, TDS's twist of a guided denoiser) or a backward pass through the
sampler -- the guided prediction is a function of ``x`` whose derivative holds the guidance gradient's
own: :func:`grad_on` reports it (``nested``), the gradient is then taken at ``x`` itself with
``create_graph=True`` (:func:`grad_leaf`, :func:`value_grad`) and the prediction returned attached
(:func:`hold`), so the outer gradient is exact (a second-order graph, as much memory again as the first).

A wrapper implements :meth:`Guided.evaluate`: its base's nets run in ``net_dtype`` (half precision
under a float32 solver state), its own arithmetic in ``x``'s dtype.

A steered prediction is rebuilt with :func:`with_estimate`, which keeps the base prediction's
learned-variance interpolation ``var_interp`` (Improved DDPM; what the DDPM sampler uses), so a
guided ``learned_variance`` denoiser keeps its variance. A wrapper's ``cost`` is its base's, read
after every call (a nested :class:`~steerdiff.guidance.CFG` costs 1 or 2 per call), unless it
assigns its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import CostOfBase, Denoiser, Prediction, check_call, check_denoiser, take_wrapped_rows
from ..processes import difference

__all__ = [
    "Guided",
    "add_score",
    "denoise_with_grad",
    "grad_leaf",
    "grad_on",
    "hold",
    "process_difference",
    "value_grad",
    "with_estimate",
]


class Guided(CostOfBase, Denoiser):
    """Base class of guided denoisers: a denoiser built on ``base``.

    It shares ``base``'s net, process, prediction, time map and shape (so the sampler checks
    ``x_T`` as for ``base``). A subclass implements :meth:`evaluate`, getting the base prediction
    from ``self.base.evaluate(x, t, net_dtype, **cond)`` and returning a steered one built with
    :func:`with_estimate` or :func:`add_score`; a gradient is taken under :func:`grad_on` with
    :func:`denoise_with_grad` / :func:`value_grad` (autograd on under an outer ``no_grad``, clear
    refusals). A subclass that overrides ``__call__`` instead runs whole in the net's dtype (half
    precision under a float32 solver state). ``cost``, the network evaluations of the latest call
    (the sampler reads it after each call), is ``base.cost`` read at that moment -- exact when
    ``base``'s cost varies from call to call -- unless the subclass assigns its own
    (``self.cost = ...``, e.g. :class:`~steerdiff.guidance.CFG`, which sums its branches').
    ``guidance_scale`` is ``base``'s (a wrapper around :class:`~steerdiff.guidance.CFG` keeps the
    default solver that CFG's scale picks).
    """

    guided: ClassVar[bool] = True  # sample's default solver is then sampling.guided_solver(steps, ...)
    base_arg: ClassVar[str] = "base"  # the subclass's name for the wrapped denoiser, for the message

    def __init__(self, base: Denoiser) -> None:
        check_denoiser(type(self).__name__, self.base_arg, base)
        super().__init__(
            base.net, base.process, base.prediction, base.time_map, base.shape, base.learned_variance
        )
        self.base = base

    @property
    def guidance_scale(self) -> float | None:
        """``base``'s."""
        return self.base.guidance_scale

    def __call__(self, x: Tensor, t: float | Tensor, /, **cond: Any) -> Prediction:
        """The guided prediction (:meth:`evaluate` in ``x``'s dtype). ``x`` and ``t`` are positional-only,
        so that ``**cond`` may hold any name (``x=``, ``t=``)."""
        check_call(type(self).__name__, x, t)
        return self.evaluate(x, t, x.dtype, **cond)

    def evaluate(self, x: Tensor, t: float | Tensor, net_dtype: torch.dtype, /, **cond: Any) -> Prediction:
        """The guided prediction at ``x``, ``base``'s nets run in ``net_dtype`` (``base.evaluate``), the
        guidance's own arithmetic in ``x``'s dtype. Subclasses implement it (or ``__call__``, which
        then runs whole in ``net_dtype``). It is the wrappers' inner call: ``den(x, t)`` checks ``x`` and
        ``t`` before it, a direct call leaves them to the base's ``evaluate``."""
        if type(self).__call__ is not Guided.__call__:
            return super().evaluate(x, t, net_dtype, **cond)
        raise NotImplementedError(
            f"{type(self).__name__} must implement evaluate(x, t, net_dtype, /, **cond) (or __call__)"
        )

    def describe_shape(self) -> str:
        """``base``'s (whose shape it has): a wrapper of a :class:`~steerdiff.guidance.Coupled` names its
        stacked layout too."""
        return self.base.describe_shape()

    def inner_denoisers(self) -> tuple[Denoiser, ...]:
        """``(base,)``; a wrapper that calls other denoisers too lists them all."""
        return (self.base,)

    def take_rows(self, rows: Tensor | slice, n: int) -> Denoiser:
        """A copy around ``base.take_rows(rows, n)``; itself where that is ``base`` (a wrapper holding
        other denoisers or per-sample keyword arguments takes theirs too)."""
        return take_wrapped_rows(self, rows, n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"


@contextmanager
def grad_on(who: str, x: Tensor) -> Iterator[bool]:
    """Autograd on for a guidance gradient at ``x``, also under an outer ``torch.no_grad()``; yields
    ``nested``: whether ``x`` is itself being differentiated through (grad mode on and ``x`` requiring
    grad). Then the guidance gradient is a term of the guided output whose derivative the caller needs:
    take it with ``create_graph=nested`` at :func:`grad_leaf` ``(x)`` and return the prediction with
    :func:`hold` (module docstring).

    Refused with a clear error under ``torch.inference_mode()`` (no tensor made there can be
    differentiated)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{who} needs gradients with respect to x, but the sampler runs under torch.inference_mode(); "
            "call steerdiff.sample outside it (torch.no_grad() is fine)"
        )
    nested = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        yield nested


def grad_leaf(x: Tensor) -> Tensor:
    """Where to differentiate at ``x`` under :func:`grad_on`: ``x`` itself if it requires grad (so a
    gradient taken with ``create_graph=True`` stays a function of the ``x`` an outer computation
    differentiates), else a detached copy that requires grad."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def value_grad(who: str, what: str, value: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    """``grad_x value.sum()`` for per-sample values computed from ``x`` (``create_graph``: itself
    differentiable, for :func:`grad_on`'s ``nested``); a ``ValueError`` naming ``who`` and ``what`` (the
    argument that computed it) when ``value`` does not depend on ``x`` differentiably."""
    if not value.requires_grad:
        raise ValueError(
            f"{who}: {what} does not depend differentiably on x (computed under torch.no_grad(), "
            f"detached, or a denoiser whose output is detached); {who} needs its gradient"
        )
    (g,) = torch.autograd.grad(value.sum(), x, create_graph=create_graph)
    return g


def denoise_with_grad(
    who: str,
    den: Denoiser,
    x: Tensor,
    t: float | Tensor,
    net_dtype: torch.dtype | None = None,
    /,
    **cond: Any,
) -> tuple[Tensor, Prediction]:
    """``(x_leaf, pred)``: the prediction at ``x_leaf = grad_leaf(x)`` (a differentiable copy of ``x``, or
    ``x`` itself where it requires grad), the net run in ``net_dtype`` (default ``x``'s). Call it under
    :func:`grad_on`.

    ``pred.x0`` and ``pred.eps`` carry the graph back to ``x_leaf``; differentiate a function of them
    with ``torch.autograd.grad(..., x_leaf)``. A ``ValueError`` if the net's output does not depend
    on ``x`` differentiably.
    """
    xr = grad_leaf(x)
    pred = den.evaluate(xr, t, x.dtype if net_dtype is None else net_dtype, **cond)
    if not pred.given.requires_grad:
        raise ValueError(
            f"{who} needs gradients through the network, but its output is detached from x "
            "(is the net run under torch.no_grad() or does it call .detach()?)"
        )
    return xr, pred


def with_estimate(
    pred: Prediction,
    *,
    x0: Tensor | None = None,
    eps: Tensor | None = None,
    x: Tensor | None = None,
    detach: bool = False,
) -> Prediction:
    """A steered copy of ``pred``: the prediction at ``pred``'s ``(alpha, sigma)`` (and ``x``, unless
    given) built from the new ``x0`` or ``eps`` (exactly one), carrying ``pred.var_interp`` over --
    guidance moves the mean, not the learned variance (for CFG the conditional branch's, as
    diffusers' DiT pipeline keeps). ``detach``: detach the carried ``var_interp`` too (for
    predictions returned from a gradient computation)."""
    out = Prediction(pred.x if x is None else x, pred.alpha, pred.sigma, x0=x0, eps=eps)
    v = pred.var_interp
    out.var_interp = v.detach() if detach and v is not None else v
    return out


def hold(pred: Prediction, x0_held: bool, nested: bool = False) -> Prediction:
    """``pred`` as a gradient guidance returns it before :func:`add_score`: holding ``x0`` if ``x0_held``
    (read before anything derived it: an ``x0``/``v`` net's, or one the guidance derived), else ``eps``,
    so that neither is taken through ``x`` and back (which cancels where ``alpha``, for ``x0``, or
    ``sigma``, for ``eps``, is tiny); detached from the graph unless ``nested`` (:func:`grad_on`), where
    the outer gradient must go through it."""

    def kept(v: Tensor) -> Tensor:
        return v if nested else v.detach()

    if x0_held:
        return with_estimate(pred, x=kept(pred.x), x0=kept(pred.x0), detach=not nested)
    return with_estimate(pred, x=kept(pred.x), eps=kept(pred.eps), detach=not nested)


def add_score(pred: Prediction, grad: Tensor) -> Prediction:
    """The prediction whose score is ``pred``'s plus ``grad``: ``x0' = x0 + (sigma^2 / alpha) grad``
    where ``pred`` holds ``x0`` (:attr:`~steerdiff.denoiser.Prediction.x0_given`: an ``x0``/``v`` net's
    estimate, or one a wrapper derived, as :class:`~steerdiff.guidance.MCG`'s projection), else
    ``eps' = eps - sigma grad``; the other estimate is
    derived from it on access. Steering ``eps`` of a held ``x0`` would take it through ``x`` twice
    (``x0 -> eps -> x0``), which cancels where ``alpha`` is tiny (zero terminal SNR)."""
    a, s = pred.alpha, pred.sigma
    if isinstance(a, float) and isinstance(s, float):  # one fused kernel
        if pred.x0_given:
            return with_estimate(pred, x0=torch.add(pred.x0, grad, alpha=s * s / a))
        return with_estimate(pred, eps=torch.add(pred.eps, grad, alpha=-s))
    if pred.x0_given:
        return with_estimate(pred, x0=pred.x0 + (s * s / a) * grad)
    return with_estimate(pred, eps=pred.eps - s * grad)


def process_difference(a: Denoiser, b: Denoiser) -> str | None:
    """``None`` where two denoisers share a noise process (:func:`steerdiff.processes.equivalent`), else how
    ``a``'s differs from ``b``'s (:func:`steerdiff.processes.difference`), for the error. Methods that
    combine several denoisers' estimates at one ``x_t`` (CFG, Feynman-Kac correctors) need one process."""
    return difference(a.process, b.process)
