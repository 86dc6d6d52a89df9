r"""What every corrector shares: the target density, the chain state, the step size and the loop.

A :class:`Target` is ``log p`` known through its gradient (the score) and, where a method needs
it, its value: either a differentiable ``log_prob(x) -> (n,)`` (value and gradient by autograd)
or a ``score(x)`` alone (e.g. a denoiser's ``-eps / sigma``, Song et al. 2021). A
:class:`Point` caches the value and gradient at ``x`` so that a chain evaluates each state once.
A :class:`Kernel` (ULA, MALA, HMC) makes one move; :func:`chain` runs several and collects the
per-sample acceptance rates in a :class:`ChainInfo`.

Randomness: a move draws standard normals from ``normal(like)`` (a noise source of
:mod:`steerdiff.noise`); Metropolis uniforms are ``u = Phi(z)`` of such a draw (``Phi`` the normal
CDF), so per-sample generators keep a sample independent of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, overload

import torch
from torch import Tensor

from .._checks import integer, real
from .._ops import first_false
from ..noise import NoiseSource, check_fixed_time, check_generators, make_noise
from ..solvers.base import DIVERGED, Model, NonFiniteError, guard_scale, largest, state_bound, within

__all__ = [
    "ChainInfo",
    "Kernel",
    "Normal",
    "Point",
    "Scored",
    "StepSize",
    "Target",
    "Valued",
    "chain",
    "finite_run",
    "fixed_time",
    "snr_step_size",
]

Normal = Callable[[Tensor], Tensor]
StepSize = float | Tensor  # a float, or a 0-d tensor on the samples' device (snr_step_size)


@dataclass
class Point:
    """A chain state ``x`` with ``log p(x)`` (``(n,)``) and ``grad log p(x)`` once evaluated."""

    x: Tensor
    log_prob: Tensor | None = None
    grad: Tensor | None = None


class Scored(Point):
    """A :class:`Point` whose gradient is evaluated (:meth:`Target.evaluate`)."""

    grad: Tensor


class Valued(Scored):
    """A :class:`Point` whose value and gradient are evaluated (:meth:`Target.evaluate` with ``value``)."""

    log_prob: Tensor


def _value_and_grad(
    log_prob: Callable[[Tensor], Tensor], x: Tensor, name: str, nested: bool = False
) -> tuple[Tensor, Tensor]:
    """``log_prob(x)`` and its gradient, detached; ``name`` is the function as messages call it
    (:class:`Target`). ``nested``: ``x`` is itself being differentiated through (a backward pass through
    the sampler), so both are taken at ``x`` with ``create_graph=True`` and returned attached: the outer
    gradient then holds the gradient's own derivative (as gradient guidance's,
    :func:`steerdiff.guidance.grad_on`)."""
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: its gradient is needed, which torch.inference_mode() forbids")
    with torch.enable_grad():
        xr = x if nested else x.detach().clone().requires_grad_(True)
        lp = log_prob(xr)
        if not isinstance(lp, Tensor) or tuple(lp.shape) != (x.shape[0],):
            shape = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
            raise ValueError(f"{name} must return a ({x.shape[0]},) tensor, got {shape}")
        if not lp.requires_grad:
            raise ValueError(
                f"{name} is not differentiable in x (computed under torch.no_grad() or detached?); "
                "the corrector needs its gradient"
            )
        (g,) = torch.autograd.grad(lp.sum(), xr, create_graph=nested)
    return (lp, g) if nested else (lp.detach(), g.detach())


class Target:
    """``log p`` by value and gradient (``log_prob``, gradient by autograd) or by gradient only (``score``).

    ``evaluations`` counts the evaluations (one value-and-gradient or one score each). ``name``: the
    ``log_prob`` as the messages about what it returns call it, after its caller (``"MALA.run:
    log_prob(x)"``).
    """

    def __init__(
        self,
        log_prob: Callable[[Tensor], Tensor] | None = None,
        score: Callable[[Tensor], Tensor] | None = None,
        name: str = "log_prob(x)",
    ) -> None:
        if (log_prob is None) == (score is None):
            raise ValueError("Target: give exactly one of `log_prob` or `score`")
        self._log_prob, self._score, self.name = log_prob, score, name
        self.evaluations = 0
        self._bad: Tensor | None = None

    @property
    def sound(self) -> Tensor | None:
        """A 0-d bool tensor on the samples' device: whether no ``log_prob`` evaluation so far was NaN or
        had a non-finite gradient where its value is finite (``-inf``, outside the support, is a value; a move
        there is rejected); ``None`` before any. Accumulated without a host read: a NaN there would only
        make every move through it rejected, silently."""
        return None if self._bad is None else ~self._bad

    @property
    def has_log_prob(self) -> bool:
        """Whether the target has a log-density (a Metropolis test needs one; ULA only the score)."""
        return self._log_prob is not None

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``log_prob(x)`` and its gradient (autograd through the whole batch at once; a subclass may evaluate
        it otherwise, in slices of rows say, for a ``log_prob`` of each row alone): detached, but attached
        with the gradient's own graph where ``x`` is being differentiated through (grad mode on and ``x``
        requiring grad: a backward pass through ``sample`` with a corrector), so that gradient is exact."""
        assert self._log_prob is not None, "called for a Target of a log_prob (evaluate)"
        nested = torch.is_grad_enabled() and x.requires_grad
        return _value_and_grad(self._log_prob, x, self.name, nested)

    @overload
    def evaluate(self, p: Point, value: Literal[True]) -> Valued: ...
    @overload
    def evaluate(self, p: Point, value: bool = False) -> Scored: ...
    def evaluate(self, p: Point, value: bool = False) -> Scored:
        """``p`` with its gradient (and value if ``value``), evaluated only if not cached."""
        if p.grad is not None and p.log_prob is not None:
            return p if isinstance(p, Valued) else Valued(p.x, p.log_prob, p.grad)
        if p.grad is not None and not value:
            return p if isinstance(p, Scored) else Scored(p.x, p.log_prob, p.grad)
        if value and self._log_prob is None:
            raise ValueError("this corrector needs log p(x): give a `log_prob`, a score alone is not enough")
        self.evaluations += 1
        if self._log_prob is not None:
            lp, g = self.value_and_grad(p.x)
            bad = lp.isnan().any() | (lp.isfinite() & ~rows(g).isfinite().all(-1)).any()
            self._bad = bad if self._bad is None else self._bad | bad
            return Valued(p.x, lp, g)
        assert self._score is not None, "a Target holds one of log_prob and score (checked in __init__)"
        return Scored(p.x, None, self._score(p.x))


@dataclass
class ChainInfo:
    """What a run of corrector moves did.

    Attributes:
        t: the process time it ran at (``None`` off a diffusion).
        step_size: the step size used (Langevin ``eps``; HMC's leapfrog step): a float, or a 0-d
            tensor where :func:`snr_step_size` chose it (read it with ``float``); ``nan`` where it had an
            empty batch to choose from.
        acceptance: per-sample fraction of accepted moves, ``(n,)`` float64; ``None`` for ULA
            (no Metropolis test).
        evaluations: target evaluations (score or log-density with gradient).
        finite: a 0-d bool tensor on the samples' device, whether every final state is finite and no
            evaluation of the ``log_prob`` NaN (:func:`finite_run`), where :func:`~steerdiff.mcmc.correct` or
            :meth:`Kernel.run` ran on a ``log_prob`` (a non-finite gradient makes ULA's state NaN; under
            MALA / HMC a NaN only makes the moves through it rejected; the denoiser's score is checked as a
            network output); else ``None``.
    """

    t: float | None
    step_size: StepSize
    acceptance: Tensor | None
    evaluations: int
    finite: Tensor | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Mean acceptance over samples and moves (``None`` for ULA)."""
        return None if self.acceptance is None else float(self.acceptance.mean())


def snr_step_size(grad: Tensor, snr: float) -> Tensor:
    """Langevin step from a signal-to-noise ratio (Song et al. 2021, Alg. 4-5, the PC sampler):

        eps = 2 a (snr ||z|| / ||grad||)^2,

    with batch means of the per-sample norms (as in their code), ``a = 1`` (their
    ``alpha_i = 1 - beta_i`` of a 1000-step discretization) and ``||z||`` its large-``d`` value
    ``sqrt(d)``.

    The batch mean makes the step, and so every corrected sample, depend on the batch: the one
    exception to per-sample reproducibility under a list of generators (give the kernel a
    ``step_size`` for that). A per-sample step (each sample's own norm) is not used because it is not
    a valid step: taken from the score at the chain's start, it is a function of the state it moves,
    so MALA's and HMC's Metropolis test, exact for a step independent of the state, no longer leaves
    ``p`` invariant (a state-dependent proposal needs the reverse move's step in the ratio, and
    leapfrog with one is not reversible), and ULA's step ``~ 1 / ||grad||^2`` is heavy-tailed where a
    score nearly vanishes. Measured from 200k exact draws of ``p_t`` of the 8-d mixture
    (``VP.linear``, ``t = 0.3``, ``snr = 0.16``, 3 moves), largest moment z-score per sample against
    batch mean: MALA 15 against 1.3 (variance off by 5.5% against 0.15%), HMC 8.3 against 1.4; ULA's
    variance bias 7.2% against 0.76%, and in 2-d ULA diverges. With the mean over a batch of ``n`` the
    step depends on a sample's own state through ``1 / n`` of it (a batch of one is the per-sample
    rule).

    A 0-d float64 tensor on ``grad``'s device, never read on the host (no device sync per node): a
    zero or non-finite score norm makes it non-finite, which :func:`check_step_sizes` reports.
    """
    snr = real("snr_step_size", "snr", snr, lo=0, lo_open=True)
    if not isinstance(grad, Tensor) or grad.ndim == 0 or grad.numel() == 0:
        got = f"shape {tuple(grad.shape)}" if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(f"snr_step_size: grad must be a non-empty tensor of shape (n, ...), got {got}")
    n = grad.shape[0]
    gnorm = grad.reshape(n, -1).to(torch.float64).norm(dim=-1).mean()
    return 2.0 * (snr * math.sqrt(grad[0].numel()) / gnorm) ** 2


def check_step_sizes(chains: Sequence[ChainInfo]) -> None:
    """Raise a ``ValueError`` at the first run whose step size is not finite (from a zero or
    non-finite score norm in :func:`snr_step_size`); one host read for all of them."""
    sizes = [(c, s) for c in chains if isinstance(s := c.step_size, Tensor)]
    k = first_false(torch.isfinite(torch.stack([s for _, s in sizes]))) if sizes else None
    if k is None:
        return
    c, s = sizes[k]
    where = "" if c.t is None else f" at t={c.t:.6g}"
    raise ValueError(
        f"corrector{where}: the snr step size is {float(s)} (the score norm is 0 or not finite); "
        "give the kernel an explicit step_size"
    )


def rows(v: Tensor) -> Tensor:
    """``v`` ``(n, ...)`` as ``(n, D)``, one sample a row (``D = 1`` for ``(n,)``; zero rows too, which
    ``reshape(n, -1)`` refuses)."""
    return v.reshape(v.shape[0], math.prod(v.shape[1:]))


def sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared norm, float64 ``(n,)``."""
    return rows(v).to(torch.float64).pow(2).sum(-1)


def metropolis(log_ratio: Tensor, normal: Normal) -> Tensor:
    """Per-sample accept flags ``log u < log_ratio`` with ``u = Phi(z)``, ``z`` from ``normal``."""
    z = normal(torch.empty(log_ratio.shape[0], dtype=torch.float64, device=log_ratio.device))
    return torch.special.log_ndtr(z) < log_ratio


def select(accept: Tensor, new: Valued, old: Valued) -> Valued:
    """Per sample: ``new`` where accepted, else ``old`` (values and gradients follow)."""
    m = accept.reshape(-1, *([1] * (new.x.ndim - 1)))
    lp = torch.where(accept, new.log_prob, old.log_prob)
    return Valued(torch.where(m, new.x, old.x), lp, torch.where(m, new.grad, old.grad))


@dataclass
class Kernel:
    """Base class of the corrector moves.

    Args:
        step_size: a fixed step size; ``None``: from ``snr`` (:func:`snr_step_size`) when used as a
            predictor-corrector in :func:`steerdiff.sample`.
        log_prob: for :func:`steerdiff.sample`: the noised log-density ``log p_t(x)`` as
            ``log_prob(x, t) -> (n,)`` at process time ``t``, differentiable in ``x``. Without
            it the score is the denoiser's ``-eps / sigma`` (ULA only).
        generator: for :func:`steerdiff.sample`: a generator, or a list with one per sample, for
            the corrector's own draws; default the run's noise source. Required with a Brownian
            tree, which has no noise at a fixed time; one per sample where the run's is (a single
            one is refused there: every sample would depend on the batch). Nothing else is accepted:
            a noise source such as a Brownian tree would give the moves no noise at their fixed time.
    """

    name: ClassVar[str] = ""
    needs_log_prob: ClassVar[bool] = False
    # whether it targets the density it is given (a corrector of steerdiff.sample); PCNL is given a
    # log-likelihood against a Gaussian reference instead
    corrector: ClassVar[bool] = True

    step_size: float | None = None
    log_prob: Callable[[Tensor, float], Tensor] | None = None
    generator: torch.Generator | Sequence[torch.Generator] | None = None

    def __post_init__(self) -> None:
        if self.step_size is not None:
            self.step_size = real(type(self).__name__, "step_size", self.step_size, lo=0, lo_open=True)
        self.generator = check_generators(type(self).__name__, self.generator)
        if self.log_prob is not None and not callable(self.log_prob):
            raise ValueError(f"{type(self).__name__}: log_prob must be callable (x, t) -> (n,)")

    def target(self, model: Model, t: float, sigma: float, step: int) -> Target:
        """What the moves at node ``t`` (noise level ``sigma``, after solver ``step``) target in
        :func:`~steerdiff.mcmc.correct`: the kernel's ``log_prob(x, t)``, else the denoiser's score
        ``-eps / sigma`` (one counted call of ``model`` per evaluation). A kernel with a target of its own
        (:class:`~steerdiff.mcmc.BiGLangevin`) overrides it."""
        if self.log_prob is not None:
            log_prob = self.log_prob
            return Target(
                lambda y: log_prob(y, t), name=f"sample: the corrector {type(self).__name__}'s log_prob(x, t)"
            )
        return Target(score=lambda y: model(y, t, step).eps * (-1.0 / sigma))

    def step_from_langevin(self, eps: StepSize) -> StepSize:
        """This kernel's step size for the Langevin step ``eps`` (the identity but for HMC)."""
        return eps

    def move(
        self, p: Point, target: Target, step_size: StepSize, normal: Normal
    ) -> tuple[Point, Tensor | None]:
        """One move from ``p``; returns the new point and the per-sample accept flags (``None``: no test)."""
        raise NotImplementedError

    def run(
        self,
        x: Tensor,
        log_prob: Callable[[Tensor], Tensor],
        steps: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        step_size: float | None = None,
    ) -> tuple[Tensor, ChainInfo]:
        """``steps`` moves targeting the differentiable density ``log_prob(x) -> (n,)`` from ``x``.

        ``step_size`` defaults to the kernel's; one of the two must be given. ``generator``: one, or
        one per row of ``x`` (a row's chain then depends on its own generator only); a Brownian tree
        is refused (:func:`~steerdiff.noise.check_fixed_time`). A ``log_prob`` that is NaN, or whose gradient
        is not finite where it is, at any point evaluated raises :class:`~steerdiff.NonFiniteError` after the
        run (under MALA / HMC such a point would only have had its moves rejected, silently).
        """
        who = f"{type(self).__name__}.run"
        if not isinstance(x, Tensor) or x.ndim == 0 or not x.is_floating_point():
            got = (
                f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            )
            raise ValueError(f"{who}: x must be a floating-point tensor of shape (n, ...), got {got}")
        if not callable(log_prob):
            raise ValueError(f"{who}: log_prob must be callable as log_prob(x) -> (n,), got {log_prob!r:.60}")
        steps = integer(who, "steps", steps, lo=1)
        eps = step_size if step_size is not None else self.step_size
        if eps is None:
            raise ValueError(f"{who}: give a step_size")
        eps = real(who, "step_size", eps, lo=0, lo_open=True)
        check_fixed_time(who, generator, "pass a torch.Generator or a list of them (one per row)")
        normal = fixed_time(make_noise(check_generators(who, generator, x.shape[0])), 0.0)
        target = Target(log_prob=log_prob, name=f"{who}: log_prob(x)")
        # the divergence guard: every state within DIVERGED max(1, max |x|) (a device scalar: no host read),
        # and whether the log_prob was sound up to each move (which came first: a NaN gradient makes ULA's
        # state NaN, a diverged state may make the log_prob NaN)
        guard = MoveGuard(_chain_bound(x), lambda: target.sound)
        out, info = chain(self, Point(x), target, steps, eps, normal, moved=guard)
        info.finite = guard.last()
        bad = guard.first_bad()  # one host read per run
        if bad is not None and bad[1]:
            raise NonFiniteError(
                f"{who}: the chain diverged at its move {bad[0] + 1} of {steps} (an entry NaN/inf or beyond "
                f"{DIVERGED:g} max(1, max |x|) of the start x; the log_prob sound until then): "
                f"step_size={eps:g} is too large for this log_prob: take a smaller step_size"
            )
        if bad is not None:
            raise NonFiniteError(
                f"{who}: log_prob returned NaN, or a non-finite gradient where its value is finite, at a "
                f"point the chain visited or proposed (or the chain left the finite numbers); {steps} moves, "
                f"step_size {eps:g}"
            )
        return out, info


class MoveGuard:
    """The divergence guard on a chain's moves, as :func:`chain`'s ``moved``: after each move, whether its
    state is within ``bound`` (:func:`~steerdiff.solvers.base.within`: finite, and the guard's bound, a number
    or a 0-d tensor on the state's device) and whether ``sound()`` held until then (a 0-d bool tensor, or
    ``None`` for True: a target's :attr:`Target.sound`, whether every evaluation so far was finite). No host
    read: :meth:`flags` stacks them, :meth:`first_bad` reads them once."""

    def __init__(self, bound: float | Tensor, sound: Callable[[], Tensor | None]) -> None:
        self.bound, self.sound = bound, sound
        self._flags: list[Tensor] = []
        self._sure: Tensor | None = None  # True on the states' device, made at the first move

    def __call__(self, y: Tensor) -> None:
        ok = self.sound()
        if ok is None:
            if self._sure is None:
                self._sure = torch.ones((), dtype=torch.bool, device=y.device)
            ok = self._sure
        self._flags.append(torch.stack([within(y, self.bound), ok]))

    def flags(self) -> Tensor:
        """``(2, moves)`` bool, on the states' device: within the bound, and sound until then."""
        return torch.stack(self._flags, 1)

    def last(self) -> Tensor:
        """Whether the last move's flags both hold, a 0-d bool tensor (no read): its state finite and within
        the bound, the target sound; a checked chain's :attr:`ChainInfo.finite` (what :func:`finite_run`
        computes again from the final state)."""
        return self._flags[-1].all()

    def first_bad(self) -> tuple[int, bool] | None:
        """The first move (from 0) whose flags do not both hold, and whether its state left the bound while
        the target was still sound (the chain diverged, not the target); ``None`` if every move's hold. One
        host read."""
        ok = self.flags().cpu()
        first = first_false(ok.all(0))
        return None if first is None else (first, bool(ok[1, first]))


def _chain_bound(x: Tensor) -> Tensor:
    """The divergence guard's bound on a standalone chain from ``x`` (:meth:`Kernel.run`), with no process to
    scale it: ``DIVERGED max(1, max |x|)``, :func:`~steerdiff.solvers.base.state_bound` of
    :func:`~steerdiff.solvers.base.guard_scale` at ``alpha = 1, sigma = 0`` (the rule of a process's runs),
    a 0-d tensor on ``x``'s device in its dtype (capped at the dtype's largest number), never read on the
    host."""
    if x.numel() == 0:
        return torch.ones((), dtype=x.dtype, device=x.device)
    return state_bound(guard_scale(largest(x)), 1.0, 0.0).clamp_max(torch.finfo(x.dtype).max)


def finite_run(x: Tensor, target: Target) -> Tensor:
    """A 0-d bool tensor on ``x``'s device: whether the chain's final state ``x`` is finite and no
    ``log_prob`` evaluation of ``target`` was unsound (:attr:`Target.sound`); no host read."""
    ok = torch.isfinite(x).all()
    return ok if target.sound is None else ok & target.sound


def fixed_time(source: NoiseSource, t: float) -> Normal:
    """The standard normals of moves at process time ``t``: ``source(t, t, like)`` (independent draws
    for a generator's source; see :func:`~steerdiff.noise.check_fixed_time` for a Brownian tree)."""
    return lambda like: source(t, t, like)


def chain(
    kernel: Kernel,
    p: Point,
    target: Target,
    steps: int,
    step_size: StepSize,
    normal: Normal,
    t: float | None = None,
    moved: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, ChainInfo]:
    """``steps`` moves of ``kernel`` from ``p``; the final state and a :class:`ChainInfo`. ``moved``, where
    given, sees the state after each move (:meth:`~steerdiff.solvers.base.Model.note_move`)."""
    steps = integer("chain", "steps", steps, lo=1)
    flags: list[Tensor] = []
    for _ in range(steps):
        p, accepted = kernel.move(p, target, step_size, normal)
        if moved is not None:
            moved(p.x)
        if accepted is not None:
            flags.append(accepted)
    acceptance = torch.stack(flags).to(torch.float64).mean(0) if flags else None
    return p.x, ChainInfo(t, step_size, acceptance, target.evaluations)
