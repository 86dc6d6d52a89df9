r"""The embedded image model: scikit-learn's 8x8 handwritten digits, no download.

Data (:func:`digits_data`): the 1,797 images of ``sklearn.datasets.load_digits`` (UCI optical
digits, integer intensities ``v`` in ``0..16``) as ``x = v / 8 - 1`` in ``[-1, 1]``, shape
``(n, 1, 8, 8)``, with their labels ``0..9``. A fixed stratified split holds out 20% of every class
(:data:`HELDOUT_FRACTION`); the nets are trained on the rest, and quality is measured against the
held-out images.

Process (:func:`digits_process`): DDPM's linear betas, ``beta_i`` from ``1e-4`` to ``0.02`` over
1,000 timesteps (Ho et al. 2020), i.e. ``sd.VP.discrete`` -- the ``DDPMScheduler()`` defaults of
diffusers, so the denoiser also runs in its pipelines. Network time is the timestep index.

Three trained networks, weights in ``toy/weights/digits_*.safetensors`` (written by
``steerdiff train digits --out src/steerdiff/toy/weights``, :mod:`steerdiff.toy.train_digits`):

* :func:`load_digits_denoiser` -- a class-conditional v-prediction denoiser
  ``v(x_t, t, label) = alpha eps - sigma x0`` (Salimans & Ho 2022; well-posed at every noise
  level, where eps-prediction amplifies its errors by ``sigma / alpha`` near pure noise), trained
  with label dropout (label 10 = :data:`NULL_LABEL` is the unconditional model), so
  classifier-free guidance ``eps_u + w (eps_c - eps_u)`` works (Ho & Salimans 2022).
* :func:`load_noisy_classifier` -- logits of ``p(y | x_t)`` at any noise level, for classifier
  guidance (Dhariwal & Nichol 2021) and twisted SMC (Wu et al. 2023).
* :func:`load_classifier` -- a classifier of clean digits: logits (a reward, an evaluator) and
  ``features(x)`` (its penultimate layer), on which :func:`steerdiff.metrics.frechet_distance`
  measures sample quality.

The denoiser and the noisy classifier are residual MLPs over the 64 pixels with a sinusoidal
time embedding (and a label embedding) modulating every block (FiLM: ``LN(h) (1 + s) + b``); the
clean classifier is a small convolutional net. The nets compute in their parameters' dtype
(float32) and return their input's dtype.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import choice, integer, tensor, torch_device
from ..denoiser import Denoiser
from ..processes import VP, VPDiscrete

__all__ = [
    "DIGITS_SHAPE",
    "HELDOUT_FRACTION",
    "MODELS",
    "NETS",
    "NULL_LABEL",
    "NUM_CLASSES",
    "WEIGHTS_DIR",
    "DigitsClassifier",
    "DigitsDenoiserNet",
    "NoisyDigitsClassifier",
    "digits_data",
    "digits_process",
    "load_classifier",
    "load_digits_denoiser",
    "load_noisy_classifier",
    "save_model",
    "timestep_embedding",
    "weights_path",
]

DIGITS_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
NULL_LABEL = 10  # the label-dropout token: the unconditional model
HELDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout", "all")
WEIGHTS_DIR = Path(__file__).parent / "weights"
MODELS = ("denoiser", "noisy_classifier", "classifier")
TRAIN_HINT = (
    "run `steerdiff train digits --out DIR` to create it in DIR, then load it from there (path=, --weights "
    f"DIR); the package's own are in {WEIGHTS_DIR}"
)


def digits_data(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x, y)``: digits as float32 ``(n, 1, 8, 8)`` in ``[-1, 1]`` and int64 labels ``(n,)``.

    ``split`` is ``"train"``, ``"heldout"`` (a stratified :data:`HELDOUT_FRACTION` of every class,
    chosen by a permutation seeded with ``seed``) or ``"all"``.
    """
    if split not in SPLITS:
        raise ValueError(f"digits_data: unknown split={split!r}; accepted: {SPLITS}")
    seed = integer("digits_data", "seed", seed, lo=0)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # a dev extra: the trained nets load without it
        raise ImportError("digits_data needs scikit-learn (pip install 'scikit-learn>=1.3')") from err

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).reshape(-1, *DIGITS_SHAPE) / 8 - 1
    y = torch.as_tensor(data.target, dtype=torch.int64)
    if split == "all":
        return x, y
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        held[idx[: round(HELDOUT_FRACTION * len(idx))]] = True
    keep = held if split == "heldout" else ~held
    return x[keep], y[keep]


def digits_process() -> VPDiscrete:
    """DDPM's linear betas (``1e-4`` to ``0.02``, 1,000 timesteps; Ho et al. 2020) as ``VP.discrete``."""
    return VP.discrete(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k / (dim/2))``,
    ``k = 0..dim/2-1`` (Vaswani et al. 2017, as in DDPM), of a ``(n,)`` time tensor."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * w[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _check_images(who: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != DIGITS_SHAPE:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{who}: x must have shape (batch, 1, 8, 8) (the model takes 8x8 single-channel images "
            f"only), got {shape}"
        )


def _times(who: str, t: float | Tensor, n: int, device: torch.device) -> Tensor:
    """A ``(n,)`` float32 time tensor from a number, a one-element tensor or a ``(n,)`` tensor."""
    tt = tensor(who, "t", t, torch.float32).to(device)
    if tt.numel() == 1:
        return tt.reshape(()).expand(n)
    if tuple(tt.shape) != (n,):
        raise ValueError(f"{who}: t must be a number or a ({n},) tensor, got shape {tuple(tt.shape)}")
    return tt


def _labels(who: str, label: Any, n: int, device: torch.device, null: bool = True) -> Tensor:
    """Validate class labels: an int or ``(n,)`` ints in ``0..9``, or :data:`NULL_LABEL` (``None``) where
    ``null``. An int is checked on the host and filled on ``device``; a tensor is checked where it lies
    and then moved (a device tensor's check reads the device: one sync per call)."""
    hi = NULL_LABEL if null else NUM_CLASSES - 1
    what = f"integers in 0-9 (or {NULL_LABEL}: unconditional)" if null else "integers in 0-9 for a classifier"
    if label is None:
        label = NULL_LABEL
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label <= hi:
            raise ValueError(f"{who}: label must be {what}, got {label}")
        return torch.full((n,), label, dtype=torch.int64, device=device)
    lab = tensor(who, "label", label)
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"{who}: label must be {what}, got dtype {lab.dtype}")
    if lab.ndim == 0:
        lab = lab.expand(n)
    if tuple(lab.shape) != (n,):
        shape = tuple(lab.shape)
        raise ValueError(f"{who}: label must be an int or a ({n},) tensor of ints, got shape {shape}")
    bad = (lab < 0) | (lab > hi)
    if bool(bad.any()):
        raise ValueError(f"{who}: label must be {what}, got {int(lab[bad][0])}")
    return lab.to(device, torch.int64)


def _log_prob_of(who: str, logits: Tensor, label: Any) -> Tensor:
    lab = _labels(who, label, logits.shape[0], logits.device, null=False)
    return torch.log_softmax(logits, dim=1).gather(1, lab[:, None]).squeeze(1)


class _FiLMBlock(nn.Module):
    """``h + W_2 silu(W_1 silu(LN(h) (1 + s) + b))`` with ``(s, b)`` a linear map of the embedding."""

    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)  # every block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        s, b = self.film(emb).chunk(2, dim=1)
        z = self.norm(h) * (1 + s) + b
        return h + self.fc2(self.drop(F.silu(self.fc1(F.silu(z)))))


class _TimeMLP(nn.Module):
    """Residual FiLM MLP ``(x_t, t[, label]) -> out_dim`` over the 64 pixels."""

    def __init__(
        self, out_dim: int, width: int, blocks: int, emb_dim: int, dropout: float, labels: bool
    ) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(NUM_CLASSES + 1, emb_dim) if labels else None
        self.inp = nn.Linear(math.prod(DIGITS_SHAPE), width)
        self.blocks = nn.ModuleList(_FiLMBlock(width, emb_dim, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def trunk(self, x: Tensor, t: Tensor, label: Tensor | None) -> Tensor:
        emb = self.time(timestep_embedding(t, self.emb_dim).to(self.inp.weight.dtype))  # float32 angles
        if self.label is not None and label is not None:
            emb = emb + self.label(label)
        emb = F.silu(emb)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))


class DigitsDenoiserNet(_TimeMLP):
    """Class-conditional denoising net ``f(x_t, t, label)`` for :func:`digits_process` (the committed
    weights predict ``v = alpha eps - sigma x0``; the weights file records the prediction type).

    ``forward(x, t, label=None)``: ``x`` ``(n, 1, 8, 8)``, ``t`` the timestep (a float or ``(n,)``),
    ``label`` an int or ``(n,)`` ints in ``0..9``, or :data:`NULL_LABEL` (also the default) for the
    unconditional prediction. Returns ``f`` of ``x``'s shape and dtype.
    """

    def __init__(self, width: int = 256, blocks: int = 3, emb_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(math.prod(DIGITS_SHAPE), width, blocks, emb_dim, dropout, labels=True)

    def forward(self, x: Tensor, t: float | Tensor, label: Any = None) -> Tensor:
        _check_images("digits denoiser", x)
        dtype = self.inp.weight.dtype
        lab = _labels("digits denoiser", label, x.shape[0], x.device)
        out = self.trunk(x.to(dtype), _times("digits denoiser", t, x.shape[0], x.device), lab)
        return out.reshape(x.shape).to(x.dtype)


class NoisyDigitsClassifier(_TimeMLP):
    """Noise-conditional classifier: ``forward(x_t, t)`` returns the ``(n, 10)`` logits of
    ``p(y | x_t)`` at the timestep ``t`` of :func:`digits_process` (a float or ``(n,)``; process time
    and network time coincide). Differentiable in ``x_t`` for classifier guidance
    (``grad log p(y | x_t)``, Dhariwal & Nichol 2021) and twisted SMC (Wu et al. 2023)."""

    def __init__(self, width: int = 128, blocks: int = 3, emb_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(NUM_CLASSES, width, blocks, emb_dim, dropout, labels=False)

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        _check_images("noisy digits classifier", x)
        dtype = self.inp.weight.dtype
        times = _times("noisy digits classifier", t, x.shape[0], x.device)
        return self.trunk(x.to(dtype), times, None).to(x.dtype)

    def log_prob(self, x: Tensor, t: float | Tensor, label: Any, **_: Any) -> Tensor:
        """``(n,)`` values of ``log p(label | x_t)`` (``label`` an int or ``(n,)`` ints in ``0..9``): the
        ``log_prob_y`` of :class:`~steerdiff.guidance.ClassifierGuidance`; other keywords are ignored."""
        return _log_prob_of("noisy digits classifier", self(x, t), label)


class DigitsClassifier(nn.Module):
    """Classifier of clean digits: conv(1->c) -> conv(c->2c, stride 2) -> conv(2c->2c) -> linear
    (the ``features``) -> linear -> ``(n, 10)`` logits, SiLU between layers."""

    def __init__(self, channels: int = 16, features_dim: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.SiLU(),
        )
        self.fc = nn.Linear(2 * c * 16, features_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(features_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """The ``(n, features_dim)`` penultimate activations (the feature map of the Frechet distance)."""
        _check_images("digits classifier", x)
        h = self.conv(x.to(self.fc.weight.dtype)).flatten(1)
        return F.silu(self.fc(h)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x).to(self.fc.weight.dtype))).to(x.dtype)

    def log_prob(self, x: Tensor, label: Any) -> Tensor:
        """``(n,)`` values of ``log p(label | x)``, ``label`` an int or ``(n,)`` ints in 0..9: a reward."""
        return _log_prob_of("digits classifier", self(x), label)


NETS: dict[str, type[nn.Module]] = {  # the class of each of MODELS
    "denoiser": DigitsDenoiserNet,
    "noisy_classifier": NoisyDigitsClassifier,
    "classifier": DigitsClassifier,
}


def weights_path(model: str, folder: str | Path | None = None) -> Path:
    """``folder/digits_{model}.safetensors`` (``folder`` defaults to :data:`WEIGHTS_DIR`)."""
    if model not in MODELS:
        raise ValueError(f"weights_path: unknown model={model!r}; accepted: {MODELS}")
    return Path(folder if folder is not None else WEIGHTS_DIR) / f"digits_{model}.safetensors"


def save_model(
    net: nn.Module, model: str, config: dict[str, Any], path: str | Path, prediction: str | None = None
) -> Path:
    """Write ``net``'s weights, its constructor ``config`` and (a denoiser's) ``prediction`` type
    (safetensors metadata) to ``path``; ``model`` is one of :data:`MODELS`, the loader that reads it back."""
    from safetensors.torch import save

    choice("save_model", "model", model, MODELS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"model": model, "config": json.dumps(config, sort_keys=True)}
    if prediction is not None:
        meta["prediction"] = prediction
    data = save(state, metadata=meta)
    # safetensors writes the metadata keys in a random order (a Rust HashMap, safetensors#584): sorted
    # here, so the same weights give the same bytes (the header keeps its length, padded with spaces)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n :] if len(text) <= n else data)
    return path


def _load(
    model: str, path: str | Path | None, device: str | torch.device
) -> tuple[nn.Module, dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    who = f"load_{'digits_denoiser' if model == 'denoiser' else model}"
    device = torch_device(who, "device", device)

    file = Path(path) if path is not None else weights_path(model)
    if file.is_dir():
        raise ValueError(
            f"{who}: path must be a weights file, got the folder {file} (its {model} file would be "
            f"{weights_path(model, file)})"
        )
    if not file.is_file():
        raise FileNotFoundError(f"digits {model} weights not found at {file}; {TRAIN_HINT}")
    try:  # another format, a truncated or empty file
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{who}: {file} is not a safetensors file ({err})") from err
    if meta.get("model") != model or "config" not in meta:
        raise ValueError(f"{file} holds no digits {model} weights (metadata model={meta.get('model')!r})")
    state = load_file(str(file))  # on the host: the net is built there, then moved
    try:  # a config the net does not take, or tensors of other names or shapes than its config's net
        net = NETS[model](**json.loads(meta["config"]))
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{file}: its tensors are not those of a digits {model} of config {meta['config']}: {err}"
        ) from err
    return net.to(device).eval().requires_grad_(False), meta


def load_digits_denoiser(path: str | Path | None = None, device: str | torch.device = "cpu") -> Denoiser:
    """The class-conditional digits denoiser as a :class:`~steerdiff.denoiser.Denoiser`
    (v-prediction on :func:`digits_process`, sample shape ``(1, 8, 8)``).

    Condition with ``label=`` (an int or ``(n,)`` ints in ``0..9``; :data:`NULL_LABEL` or no label:
    unconditional), e.g. ``sd.sample(den, torch.randn(16, 1, 8, 8), steps=10, label=3)``.

    Raises:
        FileNotFoundError: no weights file (run ``steerdiff train digits --out DIR``).
        ValueError: ``path`` is a folder, or a file that is not a safetensors file of the digits denoiser
            (the other loaders alike).
    """
    net, meta = _load("denoiser", path, device)
    return Denoiser(net, digits_process(), prediction=meta.get("prediction", "eps"), shape=DIGITS_SHAPE)


def load_noisy_classifier(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> NoisyDigitsClassifier:
    """The noise-conditional classifier ``(x_t, t) -> (n, 10)`` logits of ``p(y | x_t)``
    (:class:`NoisyDigitsClassifier`); parameters frozen, gradients flow to ``x_t``."""
    return cast(NoisyDigitsClassifier, _load("noisy_classifier", path, device)[0])


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The clean-digit classifier (:class:`DigitsClassifier`): ``(x) -> (n, 10)`` logits and
    ``features(x)`` for :func:`steerdiff.metrics.frechet_distance`; parameters frozen."""
    return cast(DigitsClassifier, _load("classifier", path, device)[0])
