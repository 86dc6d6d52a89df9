r"""Training of the embedded digits models (``steerdiff train digits``), on CPU in minutes.

All three nets are trained on the training split of :func:`~steerdiff.toy.digits.digits_data`
with AdamW, a linear warm-up then cosine decay of the learning rate, gradient clipping at 1, and
an exponential moving average of the weights (the EMA weights are saved):

* denoiser: the DDPM objective (Ho et al. 2020) with v-prediction (Salimans & Ho 2022),
  ``E |v - v_theta(x_t, t, c)|^2``, ``x_t = alpha_t x0 + sigma_t eps``, ``v = alpha_t eps - sigma_t x0``,
  ``t`` uniform on the 1,000 timesteps, the label ``c`` replaced by the null label with probability
  ``label_dropout`` (classifier-free guidance, Ho & Salimans 2022);
* noisy classifier: cross-entropy of ``p(y | x_t)`` on the same noised images (Dhariwal & Nichol
  2021);
* clean classifier: cross-entropy on the clean images.

Deterministic given ``seed``, the number of torch threads and the machine's float kernels: all
randomness comes from generators seeded from it, and the caller's global RNG is left as it was. The
committed weights are ``steerdiff train digits --out src/steerdiff/toy/weights`` (seed 0, one thread): 7
minutes wall clock (6.3 minutes of CPU) on a 2-core machine shared with other jobs. Rerun on another
2-core machine (the code of the weights' commit and today's alike: the same bits there), the weights come
out 1e-6 to 1e-5 relative from the committed ones (float summation order), and ``steerdiff demo --weights
DIR`` with them gives the committed table's accuracies exactly and its Frechet distances within 6e-4 relative
(DPS inpainting 180.71 against 180.61).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import digits as _d

__all__ = ["TrainConfig", "TrainResult", "format_report", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Steps and optimizer settings of one net (``arch``: its constructor arguments)."""

    steps: int
    batch: int
    lr: float
    arch: dict[str, Any]
    weight_decay: float = 0.0
    ema: float = 0.999
    warmup: int = 200
    label_dropout: float = 0.0
    prediction: str | None = None


CONFIGS: dict[str, TrainConfig] = {
    "denoiser": TrainConfig(
        steps=15000, batch=256, lr=1e-3, arch={"width": 256, "blocks": 3}, label_dropout=0.2, prediction="v"
    ),
    "noisy_classifier": TrainConfig(steps=5000, batch=256, lr=1e-3, arch={"width": 128, "blocks": 3}),
    "classifier": TrainConfig(
        steps=2000, batch=128, lr=2e-3, arch={"channels": 16, "features_dim": 64}, weight_decay=1e-2
    ),
}
QUICK_STEPS = 20


@dataclass
class TrainResult:
    """What a run wrote: the weight files, seconds per net, final training losses."""

    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 0.05 of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


def _fit(
    net: nn.Module,
    cfg: TrainConfig,
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    n: int,
    g: torch.Generator,
) -> tuple[nn.Module, float]:
    """Optimize ``loss_fn(net, batch_indices)``; returns the EMA net and the last 100 steps' mean loss."""
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    recent: list[float] = []
    net.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        loss = loss_fn(net, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        recent = [*recent[-99:], loss.item()]
        if step % 1000 == 0:
            log.info("step %d/%d loss %.4f", step, cfg.steps, recent[-1])
    return ema.eval(), sum(recent) / len(recent)


def _noised(x0: Tensor, ac: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(x_t, t, eps, alpha_t, sigma_t)``: ``t`` uniform on the timesteps, ``x_t = alpha_t x0 + sigma_t eps``
    with ``alpha_t = sqrt(ac_t)``, ``sigma_t = sqrt(1 - ac_t)``."""
    t = torch.randint(0, len(ac), (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = ac[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - ac[t]).sqrt().reshape(-1, 1, 1, 1)
    return a * x0 + s * eps, t.float(), eps, a, s


def train(
    out: str | Path, seed: int = 0, quick: bool = False, models: tuple[str, ...] = _d.MODELS
) -> TrainResult:
    """Train the digits ``models`` and write ``out/digits_{model}.safetensors``; load them with the
    loaders' ``path=`` (``steerdiff demo --weights out``). ``out`` has no default: the package's folder
    :data:`~steerdiff.toy.digits.WEIGHTS_DIR`, where the loaders look by default, holds the committed
    weights, which a run replaces only where ``out`` names it.

    ``quick`` trains :data:`QUICK_STEPS` steps per net (a smoke test; the nets are then useless).
    """
    if not isinstance(out, (str, Path)):
        raise ValueError(
            f"train: out must be a folder (a str or Path), got {out!r}; the package's committed weights are "
            f"in {_d.WEIGHTS_DIR}, replaced only where out names that folder"
        )
    for m in models:
        if m not in _d.MODELS:
            raise ValueError(f"train: unknown model {m!r}; accepted: {_d.MODELS}")
    x, y = _d.digits_data("train")
    ac = _d.digits_process().alphas_cumprod.float()
    result = TrainResult()
    with torch.random.fork_rng(devices=[]):
        for model in models:
            k = _d.MODELS.index(model)  # each net's seeds do not depend on which others are trained
            cfg = CONFIGS[model]
            if quick:
                cfg = TrainConfig(**{**asdict(cfg), "steps": QUICK_STEPS, "warmup": 10})
            torch.manual_seed(seed * 1000 + k)  # initialization and dropout
            g = torch.Generator().manual_seed(seed * 1000 + 100 + k)
            net = _d.NETS[model](**cfg.arch)
            start = time.perf_counter()
            ema, loss = _fit(net, cfg, _loss(model, cfg, x, y, ac, g), len(y), g)
            result.seconds[model] = time.perf_counter() - start
            result.loss[model] = loss
            result.paths[model] = _d.save_model(
                ema, model, cfg.arch, _d.weights_path(model, out), cfg.prediction
            )
            log.info("%s: %.1f s, loss %.4f -> %s", model, result.seconds[model], loss, result.paths[model])
    return result


def format_report(result: TrainResult) -> str:
    """One line per net: seconds, final training loss, file and its size."""
    lines = [f"{'model':<18}{'seconds':>9}{'loss':>9}  file"]
    for model, path in result.paths.items():
        size = path.stat().st_size / 1e6
        lines.append(
            f"{model:<18}{result.seconds[model]:>9.1f}{result.loss[model]:>9.4f}  {path} ({size:.2f} MB)"
        )
    lines.append(f"total {sum(result.seconds.values()):.1f} s")
    return "\n".join(lines)


def _loss(
    model: str, cfg: TrainConfig, x: Tensor, y: Tensor, ac: Tensor, g: torch.Generator
) -> Callable[[nn.Module, Tensor], Tensor]:
    """The training loss of ``model`` on the batch ``x[idx]``."""

    def denoiser(net: nn.Module, idx: Tensor) -> Tensor:
        xt, t, eps, a, s = _noised(x[idx], ac, g)
        drop = torch.rand(len(idx), generator=g) < cfg.label_dropout
        label = torch.where(drop, _d.NULL_LABEL, y[idx])
        target = a * eps - s * x[idx] if cfg.prediction == "v" else eps
        return F.mse_loss(net(xt, t, label=label), target)

    def noisy_classifier(net: nn.Module, idx: Tensor) -> Tensor:
        xt, t, *_ = _noised(x[idx], ac, g)
        return F.cross_entropy(net(xt, t), y[idx])

    def classifier(net: nn.Module, idx: Tensor) -> Tensor:
        return F.cross_entropy(net(x[idx]), y[idx])

    return {"denoiser": denoiser, "noisy_classifier": noisy_classifier, "classifier": classifier}[model]
