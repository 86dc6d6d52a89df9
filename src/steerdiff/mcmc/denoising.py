r"""Denoising MCMC: a Gibbs chain over data and noise level, each state then denoised from its own level.

Kim & Ye 2022, "Denoising MCMC for Accelerating Diffusion-Based Generative Models" (arXiv 2209.14593;
code github.com/1202kbs/DMCMC), the instance Denoising Langevin Gibbs (DLG). In the variance-exploding
coordinates of any process, ``y = x_t / alpha(t)`` at noise ``s = sigma(t) / alpha(t)`` (``y = x_0 + s n``),
the chain targets the joint law of a noise level ``k`` of a fixed grid ``s_1..s_K`` and a noisy datum,

    p(y, k) = pi_k q_k(y),    q_k(y) = (p_data * N(0, s_k^2 I))(y),

whose ``y``-marginal given ``k`` is the data noised to ``s_k`` and whose ``k``-marginal is the prior ``pi``
itself (each ``q_k`` is normalized). A Gibbs sweep alternates

1. ``y | k``: ``moves`` unadjusted Langevin steps on ``q_k`` with the denoiser's score (Tweedie),
   ``grad log q_k(y) = (xhat(alpha_k y; t_k) - y) / s_k^2``, ``t_k`` the process time of ``s_k``,
   ``alpha_k = alpha(t_k)``; with step ``eps = h s_k^2`` (``h = step_size``, free of the data's scale as in
   :mod:`~steerdiff.mcmc.walk_jump`)::

       y <- y + h (xhat - y) + sqrt(2 h) s_k z,    z ~ N(0, I);

   the paper's step is ``y <- y + (eta / 2) s_theta(y, s) + sqrt(eta) z`` with one ``eta`` for every level
   (their ``Demo.ipynb``: ``eta = 0.8`` on CIFAR-10); a step proportional to ``s_k^2`` keeps the ULA bias,
   ``O(eps / s_k^2)``, the same at every level.
2. ``k | y``: ``p(k | y) = pi_k q_k(y) / sum_j pi_j q_j(y)``, from ``level_logits(y) -> (n, K)``, any
   logits of it (a softmax is taken). ``level_update="sample"`` draws ``k`` from it: the Gibbs step (the
   released code's comment, ``s ~ p(s|x)``); ``"argmax"`` takes its mode, as that code does
   (``s = get_sigma(net(x).argmax(dim=1))``), which is not a Gibbs step and leaves the joint no longer
   invariant (the levels' law is then not the prior).

Step 2 leaves ``p(y, k)`` exactly invariant; step 1 leaves ``q_k`` invariant only up to ULA's bias (no
Metropolis correction), so the sweep keeps the joint up to that bias, ``O(h)``: the states at level ``k``
follow ULA's stationary law, ``O(h)`` off ``q_k``, and through ``p(k | y)`` the levels' law moves off the
prior by the same order.

The paper learns ``p(k | y)`` with a noise-level classifier (a CNN with 1000 classes, trained by
cross-entropy on ``x_0 + s_i n`` with ``i`` uniform over 1000 levels log-uniform in ``s`` between 0.01 and
``sigma_max``: so ``pi`` is that uniform prior). **steerdiff has no such estimator, and a denoiser alone does
not give one**: ``log q_k(y)`` up to a ``k``-independent constant would need the data density at each level
(the probability-flow ODE's log-likelihood, hundreds of evaluations per level). So ``level_logits`` is an
argument: a trained classifier's logits, or, on a Gaussian mixture, the exact posterior
:meth:`steerdiff.toy.GaussianMixture.noise_level_logits` (``log pi_k + log q_k(y)``, closed form). A user
with only a denoiser can use :func:`~steerdiff.mcmc.walk_jump` (one fixed noise level) or
:func:`steerdiff.sample`.

**Mixing.** The level moves by a random walk whose steps shrink as ``p(k | y)`` narrows with the
dimension (the relative spread of ``|y - x_0|^2`` is ``sqrt(2 / d)``), and a mode changes only through the
high levels (simulated tempering, the noise level as temperature): on the 8-d mixture of
``tests/test_denoising_mcmc.py`` 1000 chains started at the top level are still 0.12 from the prior (total
variation) after 300 sweeps of burn-in, where the 2-d mixture's are 0.02-0.03 after 100.

**Samples.** After ``burn_in`` sweeps each chain gives ``samples_per_chain`` states, one every ``thin``
sweeps: with ``select="last"`` the state at the end of each window (draws of ``p(y, k)`` where the chain
mixed); with ``select="lowest"`` the window's state of lowest noise level (the earliest among equals; of the
``thin`` states the window's sweeps give, so no state is given twice), the released code's choice ("choose
MCMC samples of smallest noise levels"), which starts the denoising lower but conditions the state on its
level's being a minimum. Each
state ``(y, k)`` is then denoised from ``t_k``: :func:`steerdiff.sample` on ``alpha_k y`` with ``solver`` in
``denoise_steps`` steps of Karras et al.'s ramp (``rho = 7``) from ``s_k`` down to the process's smallest
noise, then the step to the clean state (``final="zero"``; one step is Tweedie's ``xhat(alpha_k y; t_k)``;
the paper's integrators: Karras et al.'s Algorithms 1-2 from ``s`` to 0.01, then Tweedie). If ``y`` given
``k`` is exactly ``q_k`` and the solver exact, the result is exactly ``p_data``, whatever the law of ``k``:
only the conditional law matters.

**Cost** (NFE: calls of the denoiser, ``den.cost`` network evaluations each, read after every call): each
chain makes ``moves`` per sweep, ``chain_nfe = (burn_in + samples_per_chain * thin) * moves``; each sample
``denoise_nfe = solver.nfe(denoise_steps)``; a chain's row is evaluated ``nfe = chain_nfe + samples_per_chain
* denoise_nfe`` times (the NFE of :func:`steerdiff.sample`, whose batch is evaluated as one),
``nfe_per_sample = nfe / samples_per_chain`` per sample. Where ``den``'s cost varies with the noise level (a
:class:`~steerdiff.guidance.CFG` with an ``interval``), ``chain_nfe`` sums the chain's calls' costs and
``denoise_nfe`` is the mean over the samples of their denoising's. ``level_logits`` calls are not NFE (the
paper's classifier is a small CNN); ``classifier_calls`` counts them (one per sweep).

**Divergence.** Each Langevin move's state is bounded by the divergence guard, ``1e8 max(1, max |y|)`` of the
chains' start (:data:`~steerdiff.solvers.base.DIVERGED`, as :meth:`~steerdiff.mcmc.Kernel.run`'s), read with
the denoiser's finiteness after the chain (one read): a move out of bounds before the first non-finite
output is a :class:`~steerdiff.NonFiniteError` naming the move, its sweep and ``step_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import solvers
from .._checks import choice, integer, real, real_array, sizes
from .._ops import first_false
from ..denoiser import Denoiser, check_denoiser, check_sample_shape, take_kwarg_rows
from ..noise import check_generators, rand, randn, repeat_rows, take_generator_rows
from ..schedules import Karras
from ..solvers.base import DIVERGED, NonFiniteError, Solver, within
from .base import _chain_bound
from .walk_jump import CHAIN_SAMPLE_ONLY, CHAIN_SAMPLE_ONLY_WHY, initial_state, measurement_time

__all__ = ["LEVEL_UPDATES", "SELECTS", "DenoisingMCMC", "denoising_mcmc"]

LEVEL_UPDATES = ("sample", "argmax")
SELECTS = ("last", "lowest")


@dataclass
class DenoisingMCMC:
    """What :func:`denoising_mcmc` returns; ``chains * samples_per_chain`` samples, chain-major (sample ``j``
    of chain ``c`` is row ``c * samples_per_chain + j``).

    Attributes:
        x: the denoised samples, ``(chains * samples_per_chain, *sample_shape)``.
        y: the chain states they were denoised from, in variance-exploding coordinates (``x_t / alpha``).
        level: each state's level index into ``sigmas``, ``(n,)`` int64.
        t: each state's process time ``t_k`` (float64, ``(n,)``), where its denoising started.
        nfe: evaluations of a chain's row, ``chain_nfe + samples_per_chain * denoise_nfe`` (``den.cost``
            network evaluations per denoiser call; the batch is evaluated as one).
        chain_nfe: the chain's (burn-in included); ``denoise_nfe``: each sample's denoising (the mean over the
            samples where ``den``'s cost varies with the noise level).
        nfe_per_sample: ``nfe / samples_per_chain``.
        classifier_calls: calls of ``level_logits`` (one per sweep, on all chains).
    """

    x: Tensor
    y: Tensor
    level: Tensor
    t: Tensor
    nfe: float
    chain_nfe: int
    denoise_nfe: float
    nfe_per_sample: float
    classifier_calls: int


def _new_level(logits: Tensor, update: str, generator: Any, n: int, k: int) -> tuple[Tensor, Tensor]:
    """The next levels, ``(n,)`` int64, from ``level_logits``' output: its argmax, or a draw by the inverse
    CDF of its softmax at a uniform per row (from ``generator``, one per row where it is a list); and a 0-d
    bool tensor, whether no logit is NaN and every row has a finite one (read once, after the chain)."""
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (n, k) or not logits.is_floating_point():
        got = (
            f"shape {tuple(logits.shape)}, {logits.dtype}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"denoising_mcmc: level_logits(y) must return a ({n}, {k}) float tensor, got {got}")
    logits = logits.detach().to(torch.float64)
    sound = torch.isfinite(logits.amax(-1)).all() & ~logits.isnan().any()
    if update == "argmax":
        return logits.argmax(-1), sound
    cdf = torch.softmax(logits, -1).cumsum(-1)
    u = rand((n, 1), generator, torch.float64, logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(0, k - 1), sound


def denoising_mcmc(
    den: Denoiser,
    shape: Sequence[int],
    sigmas: Sequence[float] | Tensor,
    level_logits: Callable[[Tensor], Tensor],
    samples_per_chain: int,
    *,
    thin: int = 10,
    burn_in: int = 100,
    moves: int = 1,
    step_size: float = 0.1,
    level_update: str = "sample",
    select: str = "last",
    denoise_steps: int = 10,
    solver: str | Solver = "dpmpp_2m",
    y_init: Tensor | None = None,
    level_init: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **cond: Any,
) -> DenoisingMCMC:
    """Samples of ``den``'s data law by Denoising Langevin Gibbs (Kim & Ye 2022; the module docstring has
    the equations): ``chains = shape[0]`` Gibbs chains over (noisy datum, noise level), each state denoised
    from its own level.

    Args:
        den: any :class:`~steerdiff.denoiser.Denoiser`; called at the levels' times (one time per row).
        shape: ``(chains, *sample_shape)``.
        sigmas: the noise levels ``s_1..s_K`` (``sigma / alpha``), each ``> 0`` and within the process's range
            of ``sigma(t) / alpha(t)``, distinct; in the order of ``level_logits``' columns.
        level_logits: ``level_logits(y) -> (chains, K)``, logits of ``p(k | y)`` at the chain states ``y``
            (variance-exploding coordinates): a trained noise-level classifier, or
            :meth:`~steerdiff.toy.GaussianMixture.noise_level_logits` (exact); its prior over the levels is
            the chain's law of ``k``.
        samples_per_chain: states each chain gives (``>= 1``).
        thin: Gibbs sweeps per state given (``>= 1``; the paper's ``n_skip``, 10 on CIFAR-10).
        burn_in: sweeps before the first window (``>= 0``).
        moves: Langevin moves per sweep (``>= 1``; the paper's 1).
        step_size: ``h`` of the Langevin step ``eps = h s_k^2``, in ``(0, 1]``.
        level_update: ``"sample"`` (Gibbs) or ``"argmax"`` (the released code).
        select: ``"last"`` or ``"lowest"`` (the released code's) state of each window.
        denoise_steps: steps of ``solver`` from each level to the clean state (``>= 1``).
        solver: any solver :func:`steerdiff.sample` takes (a stochastic one draws from ``generator``).
        y_init: the chains' start, ``shape`` (default ``s_max z``, ``s_max`` the highest level, the paper's
            start); its dtype and device are the samples'.
        level_init: the chains' first levels, ``(chains,)`` int64 indices into ``sigmas`` (default the
            highest); with ``y_init`` drawn from ``q_k`` at ``k`` drawn from the prior, the chain starts at
            its stationary law.
        dtype, device: of the samples where ``y_init`` is not given (default float32, the generator's
            device); refused beside it.
        generator: one ``torch.Generator``, or one per chain (a chain's samples are then the same whatever
            the other chains), for every draw.
        **cond: passed to the net at every call.

    Returns:
        :class:`DenoisingMCMC`.

    >>> sig = torch.logspace(-1.3, 0.7, 12)
    >>> logits = lambda y: gmm.noise_level_logits(y, sig)
    >>> out = sd.mcmc.denoising_mcmc(den, (500, 2), sig, logits, samples_per_chain=4, generator=g)
    """
    from ..sampling import check_sample_only  # sampling imports this package: here, once loaded

    who = "denoising_mcmc"
    check_denoiser(who, "den", den)
    check_sample_only(who, cond, CHAIN_SAMPLE_ONLY, CHAIN_SAMPLE_ONLY_WHY)
    shape = sizes(who, "shape", shape)
    if len(shape) < 2:
        raise ValueError(f"{who}: shape must be (chains, *sample_shape), at least 2 entries, got {shape}")
    check_sample_shape(f"{who}: shape", den, shape[1:])
    levels = real_array(who, "sigmas", sigmas)
    if not bool((levels > 0).all()) or not bool(torch.isfinite(levels).all()):
        raise ValueError(f"{who}: sigmas must be finite and > 0, got {levels.tolist()}")
    if torch.unique(levels).numel() != levels.numel():
        raise ValueError(f"{who}: sigmas must be distinct, got {levels.tolist()}")
    floor = float(den.process.sigma_ratio(den.process.t_min))
    if not bool((levels > floor).all()):
        raise ValueError(
            f"{who}: sigmas must exceed the process's smallest sigma / alpha, {floor:.6g} (each is denoised "
            f"from there), got {levels.min().item():.6g}"
        )
    if not callable(level_logits):
        raise ValueError(f"{who}: level_logits must be callable as level_logits(y) -> (chains, K)")
    m = integer(who, "samples_per_chain", samples_per_chain, lo=1)
    thin = integer(who, "thin", thin, lo=1)
    burn_in = integer(who, "burn_in", burn_in, lo=0)
    moves = integer(who, "moves", moves, lo=1)
    h = real(who, "step_size", step_size, lo=0, hi=1, lo_open=True)
    level_update = choice(who, "level_update", level_update, LEVEL_UPDATES)
    select = choice(who, "select", select, SELECTS)
    denoise_steps = integer(who, "denoise_steps", denoise_steps, lo=1)
    solver = solvers.get(solver, who)  # before the chain's calls
    generator = check_generators(who, generator, shape[0])
    process = den.process
    times = torch.tensor([measurement_time(process, float(s), 1, who) for s in levels], dtype=torch.float64)
    alphas = process.alpha(times).to(torch.float64)
    top = int(levels.argmax())
    y = initial_state(who, shape, float(levels[top]), y_init, dtype, device, generator)
    n, k_count, on = shape[0], levels.numel(), y.device
    per_row = (n, *([1] * (len(shape) - 1)))
    s_dev, t_dev, a_dev = (v.to(on) for v in (levels, times, alphas))
    if level_init is None:
        level = torch.full((n,), top, dtype=torch.int64, device=on)
    elif (
        not isinstance(level_init, Tensor)
        or level_init.dtype != torch.int64
        or tuple(level_init.shape) != (n,)
        or not bool(((level_init >= 0) & (level_init < k_count)).all())
    ):
        raise ValueError(
            f"{who}: level_init must be an int64 tensor of shape ({n},) with indices into sigmas, 0 to "
            f"{k_count - 1}, got {level_init!r:.60}"
        )
    else:
        level = level_init.to(on)
    sums: list[Tensor] = []  # one finiteness sum per denoiser call, read once at the end
    # the divergence guard: each move's state within DIVERGED max(1, max |y|) of the start, read with the sums
    bound, bounded = _chain_bound(y), []
    chain_nfe = 0  # den.cost read after each call (a guided den's varies: CFG's interval)
    sound: list[Tensor] = []  # level_logits' outputs: no NaN, a finite logit per row; read once too

    def sweep() -> None:
        nonlocal y, level, chain_nfe
        s, t, a = s_dev[level], t_dev[level], a_dev[level]
        scale = (s.reshape(per_row) * math.sqrt(2 * h)).to(y.dtype)
        for _ in range(moves):
            x0 = den(a.reshape(per_row).to(y.dtype) * y, t, **cond).x0
            chain_nfe += den.cost
            sums.append(x0.detach().sum())
            y = y + h * (x0 - y) + scale * randn(shape, generator, y.dtype, on)
            bounded.append(within(y, bound))
        level, ok = _new_level(level_logits(y), level_update, generator, n, k_count)
        level = level.to(on)
        sound.append(ok)

    for _ in range(burn_in):
        sweep()
    states, picked = [], []
    for _ in range(m):
        sweep()
        best_y, best = y, level  # the window's own thin states: the previous window's last is not one
        for _ in range(thin - 1):
            sweep()
            if select == "lowest":
                lower = s_dev[level] < s_dev[best]
                best_y = torch.where(lower.reshape(per_row), y, best_y)
                best = torch.where(lower, level, best)
        states.append(y if select == "last" else best_y)
        picked.append(level if select == "last" else best)
    # first: a NaN y makes NaN logits. Move j takes evaluation j's x0, its state evaluation j + 1's input: a
    # move out of bounds before the first non-finite evaluation is the move's fault, else the model's
    calls = len(sums)
    ok = torch.cat([torch.isfinite(torch.stack(sums)), torch.stack(bounded)]).cpu()  # one read for both
    bad, move = first_false(ok[:calls]), first_false(ok[calls:])
    if move is not None and (bad is None or move < bad):
        raise NonFiniteError(
            f"{who}: the chain diverged at its move {move + 1} of {calls} (sweep {move // moves + 1}; an "
            f"entry NaN/inf or beyond {DIVERGED:g} max(1, max |y|) of the start y, the model's outputs "
            f"finite until then): step_size={h:g} is too large for this denoiser's field: take a smaller "
            "step_size"
        )
    if bad is not None:
        raise NonFiniteError(
            f"{who}: the model returned NaN/inf at step {bad + 1} of the chain (sweep {bad // moves + 1})"
        )
    if (bad := first_false(torch.stack(sound))) is not None:
        raise ValueError(
            f"{who}: level_logits(y) returned NaN, or no finite logit in a row, at sweep {bad + 1}"
        )
    ys = torch.stack(states, 1).reshape(n * m, *shape[1:])
    levels_out = torch.stack(picked, 1).reshape(n * m)
    x, denoise_nfe = _denoise(
        den, ys, levels_out, levels, times, alphas, denoise_steps, solver, generator, m, cond
    )
    nfe = chain_nfe + m * denoise_nfe
    return DenoisingMCMC(
        x,
        ys,
        levels_out,
        times.to(on)[levels_out],
        nfe,
        chain_nfe,
        denoise_nfe,
        nfe / m,
        burn_in + m * thin,
    )


def _denoise(
    den: Denoiser,
    ys: Tensor,
    level: Tensor,
    sigmas: Tensor,
    times: Tensor,
    alphas: Tensor,
    steps: int,
    solver: str | Solver,
    generator: Any,
    per_chain: int,
    cond: dict[str, Any],
) -> tuple[Tensor, float]:
    """Each state ``ys[r]`` denoised from its level's time by :func:`steerdiff.sample` (one run per level
    present, Karras' ramp from ``sigmas[k]``); the samples and the calls each one cost, on average over the
    samples (the same for all unless ``den``'s cost varies with the noise level, as a CFG's with an
    ``interval``). Row ``r`` is chain ``r // per_chain``'s: it draws from that chain's generator where there
    is one per chain, and takes that chain's rows of ``cond``'s per-chain tensors and of ``den``'s
    (:func:`~steerdiff.denoiser.take_kwarg_rows`)."""
    from ..sampling import sample_as  # sampling imports this package

    n = ys.shape[0]
    chains = n // per_chain
    rows_generator = repeat_rows(generator, per_chain)
    out = torch.empty_like(ys)
    total = 0
    for k in torch.unique(level).tolist():
        rows = (level == k).nonzero().squeeze(-1)
        owners = rows // per_chain
        x, info = sample_as(
            "denoising_mcmc",
            den.take_rows(owners, chains),
            float(alphas[k]) * ys[rows],
            steps,
            solver,
            Karras(sigma_max=float(sigmas[k])),
            generator=take_generator_rows(rows_generator, rows, n),
            return_info=True,
            **take_kwarg_rows(cond, owners, chains),
        )
        out[rows] = x
        total += info.nfe * rows.numel()
    return out, total / n
