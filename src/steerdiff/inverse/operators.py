r"""Linear measurement operators ``y = A x + noise_std * n`` for inverse problems.

An operator acts on a batch ``x`` of shape ``(n, *shape_in)`` and returns ``(n, *shape_out)``;
``A`` is the linear map on one flattened sample. Every operator gives

- ``forward(x)`` = ``A x`` and ``adjoint(y)`` = ``A^T y`` (differentiable, any float dtype/device);
- ``pinv(y)`` = ``A^+ y``, the Moore-Penrose pseudo-inverse, with singular values at or below
  ``rcond * s_max`` treated as zero (numpy's ``rcond`` convention); by default (``rcond=None``)
  ``rcond = eps * max(m, d)`` with ``eps`` the machine epsilon of the dtype ``y`` is computed in, as
  ``numpy.linalg.pinv`` / ``torch.linalg.pinv`` do by default (:func:`cutoff`): in float32 a singular
  value far below ``eps * s_max`` multiplies the round-off of ``y`` by ``1 / s`` and swamps the answer;
- ``aat_solve(y, shift)`` = ``(A A^T + shift I)^{-1} y`` (``shift`` a float, or one per sample), the
  one solve that PiGDM (Song et al. 2023, "Pseudoinverse-guided diffusion models for inverse
  problems") needs: ``(r^2 A A^T + s_y^2 I)^{-1} v = aat_solve(v, s_y^2 / r^2) / r^2``;
- ``to_dense()``, the ``(m, d)`` matrix of ``A`` built column by column;
- ``noise_std >= 0``, the standard deviation of the Gaussian observation noise.

Each operator uses its structure for ``pinv`` and ``aat_solve``: an SVD computed once
(:class:`Matrix`), ``A A^T = I`` (:class:`Inpaint`), ``A A^T = I / f^2`` (:class:`Downsample`), or
the FFT diagonalisation of a circular convolution (:class:`Blur`; none for zero padding). What
they need on the input's device (factors, spectral gains, indices) is moved there once per device
and dtype, and the rank is decided once per dtype, so no call copies from the host or syncs with the
device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import SAMPLE_DTYPES, choice, device_or_none, integer, real, sample_dtype, tensor
from .._ops import kept
from ..solvers.base import work_dtype

__all__ = ["Blur", "Downsample", "Inpaint", "LinearOperator", "Matrix", "cutoff"]


def cutoff(rcond: float | None, dtype: torch.dtype, size: int) -> float:
    """The relative cutoff of a pseudo-inverse computed in ``dtype``: singular values ``<= cutoff * s_max``
    count as zero in ``pinv`` and in the rank that ``aat_solve(y, 0)`` needs. ``rcond`` if given, else
    ``eps(dtype) * size`` with ``size = max(m, d)`` of the dense matrix (the default of
    ``numpy.linalg.pinv`` and ``torch.linalg.pinv``)."""
    return torch.finfo(dtype).eps * size if rcond is None else rcond


def _savable(value: Any) -> Any:
    """``value`` (a tensor, or a tuple of tensors and flags) with each inference tensor copied outside
    inference mode, so that autograd can save it for a backward pass (a guidance gradient through ``A``)."""
    if isinstance(value, tuple):
        return tuple(_savable(v) for v in value)
    if isinstance(value, Tensor) and value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


def _rcond(who: str, rcond: float | None) -> float | None:
    """``rcond``: ``None`` (the dtype's default, :func:`cutoff`) or a number in ``[0, 1)``."""
    return None if rcond is None else real(who, "rcond", rcond, lo=0, hi=1, hi_open=True)


def _shape(who: str, name: str, shape: Sequence[int], min_dims: int = 1) -> tuple[int, ...]:
    """``shape`` as a tuple of ``>= min_dims`` integers ``>= 1`` (each checked by ``integer``)."""
    if not isinstance(shape, Sequence) or isinstance(shape, str) or len(shape) < min_dims:
        raise ValueError(f"{who}: {name} must be a tuple of >= {min_dims} positive integers, got {shape!r}")
    return tuple(integer(who, f"{name}[{i}]", s, lo=1) for i, s in enumerate(shape))


class LinearOperator:
    r"""A linear map ``A: R^d -> R^m`` on per-sample shapes ``shape_in -> shape_out``, batched over dim 0.

    Subclasses implement ``_forward`` and ``_adjoint`` on validated batches, and ``_pinv`` and
    ``_aat_solve`` where they are cheap. ``noise_std`` is the observation noise ``y = A x + noise_std n``.
    """

    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]

    def __init__(self, noise_std: float = 0.0) -> None:
        self.noise_std = real(type(self).__name__, "noise_std", noise_std, lo=0)
        self._cache: dict[tuple[str, torch.device, torch.dtype], Any] = {}

    def _on(self, key: str, like: Tensor, make: Callable[[torch.device, torch.dtype], Any]) -> Any:
        """``make(like.device, like.dtype)``, built once per ``(key, device, dtype)`` and kept
        (:func:`~steerdiff._ops.kept`), its tensors ones autograd can save: an operator's own tensor made
        under ``torch.inference_mode()`` (a mask or matrix an inference script built), which ``make`` returns
        as it is where no conversion is needed, is copied."""
        return kept(
            self._cache, (key, like.device, like.dtype), lambda: _savable(make(like.device, like.dtype))
        )

    def _check(self, t: Tensor, shape: tuple[int, ...], arg: str) -> None:
        if not isinstance(t, Tensor) or t.ndim < 1 or tuple(t.shape[1:]) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{type(self).__name__}: {arg} must have shape (n, *{shape}), got {got}")
        if t.dtype not in SAMPLE_DTYPES:  # an integer x would take A's entries to integers
            raise ValueError(
                f"{type(self).__name__}: {arg} must be a float16, bfloat16, float32 or float64 tensor, "
                f"got {t.dtype}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` for ``x`` of shape ``(n, *shape_in)``, returning ``(n, *shape_out)``."""
        self._check(x, self.shape_in, "x")
        return self._forward(x)

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^T y`` for ``y`` of shape ``(n, *shape_out)``, returning ``(n, *shape_in)``."""
        self._check(y, self.shape_out, "y")
        return self._adjoint(y)

    def pinv(self, y: Tensor) -> Tensor:
        """``A^+ y`` (Moore-Penrose, cutoff ``r s_max``, ``r`` from :func:`cutoff` for the dtype it is
        computed in: ``y``'s, float32 for a half-precision ``y`` of :class:`Matrix`), returning
        ``(n, *shape_in)``."""
        self._check(y, self.shape_out, "y")
        return self._pinv(y)

    def aat_solve(self, y: Tensor, shift: float | Tensor = 0.0) -> Tensor:
        """``(A A^T + shift I)^{-1} y``; ``shift = 0`` requires ``A`` of full row rank.

        ``shift`` is a float ``>= 0`` or a tensor ``(n,)``, one shift per sample of ``y``: entries
        ``>= 0``, not checked (that would sync with the device), a zero one needing full row rank.
        """
        who = f"{type(self).__name__}.aat_solve"
        self._check(y, self.shape_out, "y")
        if not isinstance(shift, Tensor) or shift.ndim == 0:  # a 0-d tensor is no float: refused
            return self._aat_solve(y, real(who, "shift", shift, lo=0))
        if not shift.is_floating_point() or tuple(shift.shape) != (y.shape[0],):
            raise ValueError(
                f"{who}: shift must be a float or a floating tensor of shape ({y.shape[0]},) (one per "
                f"sample), got {shift.dtype} {tuple(shift.shape)}"
            )
        return self._aat_solve(y, shift.to(y).reshape(-1, *([1] * len(self.shape_out))))

    def to_dense(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """The ``(m, d)`` matrix of ``A`` on flattened samples: column ``j`` is ``A e_j``."""
        dtype = sample_dtype(f"{type(self).__name__}.to_dense", "dtype", dtype)
        device = device_or_none(f"{type(self).__name__}.to_dense", "device", device)
        d = math.prod(self.shape_in)
        basis = torch.eye(d, dtype=dtype, device=device).reshape(d, *self.shape_in)
        return self.forward(basis).reshape(d, -1).T.contiguous()

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _pinv(self, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no cheap pseudo-inverse")

    def _aat_solve(self, y: Tensor, shift: float | Tensor) -> Tensor:
        """``(A A^T + shift I)^{-1} y`` for a float ``shift`` or one ``(n, 1, ..., 1)`` per sample."""
        raise NotImplementedError(f"{type(self).__name__} has no cheap (A A^T + shift I) solve")


class Matrix(LinearOperator):
    r"""A dense ``(m, d)`` matrix on flattened samples of shape ``shape_in`` (default ``(d,)``).

    ``pinv`` and ``aat_solve`` use the thin SVD ``A = U diag(s) V^T``, computed once in float64 on
    first use (:meth:`svd`): ``A^+ y = V diag(1/s) U^T y`` over ``s > r s_max``, and
    ``(A A^T + c I)^{-1} y = U diag(1/(s^2 + c)) U^T y + (y - U U^T y) / c`` (the last term 0 where
    ``c = 0``, which needs full row rank -- every ``s > r s_max`` -- and not computed where ``m <= d``:
    ``U`` is square there). ``r = rcond`` if given (a number in ``[0, 1)``), else ``eps * max(m, d)``
    in the dtype of the call (:func:`cutoff`); a float16 / bfloat16 call is solved in float32, at its
    cutoff, and rounded back.
    """

    def __init__(
        self,
        A: Tensor,
        noise_std: float = 0.0,
        shape_in: Sequence[int] | None = None,
        rcond: float | None = None,
    ) -> None:
        super().__init__(noise_std)
        self.rcond = _rcond("Matrix", rcond)
        try:
            A = torch.as_tensor(A)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"Matrix: A must be a 2-D float tensor (m, d), got {type(A).__name__}") from None
        if A.ndim != 2 or not A.is_floating_point() or A.numel() == 0:
            raise ValueError(
                f"Matrix: A must be a 2-D float tensor (m, d), m, d >= 1, got {tuple(A.shape)} {A.dtype}"
            )
        if not bool(torch.isfinite(A).all()):
            raise ValueError("Matrix: A must be finite (it has NaN or inf entries)")
        m, d = A.shape
        self.A = A
        self.shape_in = (d,) if shape_in is None else _shape("Matrix", "shape_in", shape_in)
        if math.prod(self.shape_in) != d:
            raise ValueError(f"Matrix: shape_in {self.shape_in} does not hold d = {d} entries")
        self.shape_out = (m,)
        self._svd: tuple[Tensor, Tensor, Tensor] | None = None

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD ``(U (m, k), s (k,), Vh (k, d))`` of ``A`` in float64, ``k = min(m, d)``, cached."""
        if self._svd is None:
            U, s, Vh = torch.linalg.svd(self.A.detach().to(torch.float64), full_matrices=False)
            self._svd = (U, s, Vh)
        return self._svd

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """``(U, s, 1/s over s > r s_max else 0, Vh)`` on ``like``'s device and dtype, and whether ``A`` has
        full row rank at that cutoff ``r``."""

        def make(device: torch.device, dtype: torch.dtype) -> tuple[Tensor | bool, ...]:
            U, s, Vh = self.svd()
            keep = s > cutoff(self.rcond, dtype, max(U.shape[0], Vh.shape[1])) * s.max()
            inv = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)
            full_rank = U.shape[0] <= Vh.shape[1] and bool(keep.all())
            return (*(v.to(device=device, dtype=dtype) for v in (U, s, inv, Vh)), full_rank)

        return self._on("svd", like, make)

    def _matrix(self, like: Tensor) -> Tensor:
        return self._on("A", like, lambda device, dtype: self.A.to(device=device, dtype=dtype))

    def _forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self._matrix(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return (y @ self._matrix(y)).reshape(-1, *self.shape_in)

    def _pinv(self, y: Tensor) -> Tensor:
        # half precision: its own cutoff eps * max(m, d) reaches s_max from a few hundred entries
        w = y.to(work_dtype(y.dtype))
        U, _, inv, Vh, _ = self._factors(w)
        return ((w @ U) * inv @ Vh).reshape(-1, *self.shape_in).to(y.dtype)

    def _aat_solve(self, y: Tensor, shift: float | Tensor) -> Tensor:
        if y.dtype != (work := work_dtype(y.dtype)):
            return self._aat_solve(y.to(work), shift).to(y.dtype)
        U, s, _, _, full_rank = self._factors(y)
        if isinstance(shift, float) and shift == 0.0 and not full_rank:
            raise ValueError("Matrix.aat_solve: A A^T is singular (A lacks full row rank); pass shift > 0")
        coef = y @ U
        out = (coef / (s**2 + shift)) @ U.T
        if U.shape[0] <= U.shape[1]:  # U square: the complement is {0} (its round-off / shift: none)
            return out
        if isinstance(shift, Tensor):  # the range's complement, where the shift is > 0
            return out + (y - coef @ U.T) / torch.where(shift > 0, shift, math.inf)
        if shift > 0.0:
            out = out + (y - coef @ U.T) / shift
        return out


class Inpaint(LinearOperator):
    r"""Observe the entries where ``mask == 1``: ``A`` selects them, so ``A x`` is the vector ``x[mask]``.

    ``shape_in = mask.shape``, ``shape_out = (number of observed entries,)`` in row-major order.
    The adjoint scatters ``y`` into zeros at the observed entries. The rows of ``A`` are orthonormal
    (``A A^T = I``), so ``A^+ = A^T`` and ``(A A^T + c I)^{-1} y = y / (1 + c)``.
    """

    def __init__(self, mask: Tensor, noise_std: float = 0.0) -> None:
        super().__init__(noise_std)
        mask = tensor("Inpaint", "mask", mask)
        if mask.ndim < 1 or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("Inpaint: mask must be a tensor of the sample shape holding only 0 and 1")
        self.mask = mask.to(torch.bool)
        self.shape_in = tuple(mask.shape)
        self._index = self.mask.flatten().nonzero().squeeze(1)
        self.shape_out = (int(self._index.numel()),)

    def _index_on(self, like: Tensor) -> Tensor:
        return self._on("index", like, lambda device, _: self._index.to(device))

    def _forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, self._index_on(x)]

    def _adjoint(self, y: Tensor) -> Tensor:
        out = y.new_zeros(y.shape[0], math.prod(self.shape_in))
        out = out.index_copy(1, self._index_on(y), y)
        return out.reshape(-1, *self.shape_in)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._adjoint(y)

    def _aat_solve(self, y: Tensor, shift: float | Tensor) -> Tensor:
        return y / (1.0 + shift)


class Downsample(LinearOperator):
    r"""Average pooling over ``factor x factor`` blocks of the last two dims of samples of ``shape``.

    ``(A x)[.., i, j] = mean of x[.., f i : f (i+1), f j : f (j+1)]`` (e.g. ``shape = (C, H, W)``,
    ``H`` and ``W`` divisible by ``f``). The adjoint copies each value to its block divided by
    ``f^2``; ``A A^T = I / f^2``, so ``A^+ y`` is nearest-neighbour upsampling and
    ``(A A^T + c I)^{-1} y = y / (1 / f^2 + c)``.
    """

    def __init__(self, factor: int, shape: Sequence[int], noise_std: float = 0.0) -> None:
        super().__init__(noise_std)
        factor = integer("Downsample", "factor", factor, lo=1)
        self.shape_in = _shape("Downsample", "shape", shape, min_dims=2)
        *lead, H, W = self.shape_in
        if H % factor or W % factor:
            raise ValueError(f"Downsample: H, W = {H}, {W} of shape must be divisible by factor {factor}")
        self.factor = factor
        self.shape_out = (*lead, H // factor, W // factor)

    def _forward(self, x: Tensor) -> Tensor:
        H, W = self.shape_in[-2:]
        out = F.avg_pool2d(x.reshape(-1, 1, H, W), self.factor)
        return out.reshape(-1, *self.shape_out)

    def _upsample(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._upsample(y) / self.factor**2

    def _pinv(self, y: Tensor) -> Tensor:
        return self._upsample(y)

    def _aat_solve(self, y: Tensor, shift: float | Tensor) -> Tensor:
        return y / (1.0 / self.factor**2 + shift)


class Blur(LinearOperator):
    r"""2-D convolution of the last two dims of samples of ``shape`` with ``kernel`` ``(kh, kw)``.

    ``(A x)[.., i, j] = sum_{a, b} k[a, b] x[.., i + c_h - a, j + c_w - b]`` with centre
    ``c = ((kh - 1) // 2, (kw - 1) // 2)``: a true convolution with the output the size of the
    input, as ``scipy.signal.convolve2d(x, k, mode="same")``. Indices out of range wrap around
    (``padding="circular"``, scipy's ``boundary="wrap"``) or read zero (``padding="zero"``,
    ``boundary="fill"``). The adjoint is the correlation with ``k`` (convolution with the flipped
    kernel) under the same padding. For circular padding ``A = F^{-1} diag(K) F`` with ``K`` the
    2-D DFT of the centred kernel, so ``A^+ y = F^{-1} (conj(K) / |K|^2) F y`` over
    ``|K| > r max |K|`` and ``(A A^T + c I)^{-1} y = F^{-1} F y / (|K|^2 + c)`` (``c = 0`` needs every
    ``|K| > r max |K|``), with ``r = rcond`` if given (in ``[0, 1)``), else ``eps * d`` in the dtype of
    the call, ``d`` the number of entries of a sample (:func:`cutoff`); zero padding has no cheap
    ``pinv`` / ``aat_solve``. The FFT paths need float32 or float64 and compute in the matching complex
    dtype; the gains are built once per device and dtype.
    """

    def __init__(
        self,
        kernel: Tensor,
        shape: Sequence[int],
        padding: str = "circular",
        noise_std: float = 0.0,
        rcond: float | None = None,
    ) -> None:
        super().__init__(noise_std)
        self.rcond = _rcond("Blur", rcond)
        kernel = tensor("Blur", "kernel", kernel)
        if (
            kernel.ndim != 2
            or kernel.numel() == 0
            or not kernel.is_floating_point()
            or not bool(kernel.isfinite().all())
        ):
            raise ValueError(
                f"Blur: kernel must be a finite 2-D float tensor (kh, kw), kh, kw >= 1, got "
                f"{tuple(kernel.shape)} {kernel.dtype}"
            )
        padding = choice("Blur", "padding", padding, ("circular", "zero"))
        self.shape_in = self.shape_out = _shape("Blur", "shape", shape, min_dims=2)
        H, W = self.shape_in[-2:]
        kh, kw = kernel.shape
        if kh > H or kw > W:
            raise ValueError(f"Blur: kernel {tuple(kernel.shape)} larger than the image ({H}, {W})")
        self.kernel = kernel
        self.padding = padding
        ch, cw = (kh - 1) // 2, (kw - 1) // 2
        # F.pad order (left, right, top, bottom); forward reads x[i + c - a], adjoint y[j - c + b].
        self._pad_fwd = (kw - 1 - cw, cw, kh - 1 - ch, ch)
        self._pad_adj = (cw, kw - 1 - cw, ch, kh - 1 - ch)
        self._mode = "circular" if padding == "circular" else "constant"
        # the DFT of the centred kernel, complex128 on the CPU, its half spectrum: a real kernel's gains
        # are Hermitian, so the real FFT's half carries them (and every |K|)
        self._K: Tensor | None = None
        if padding == "circular":
            centred = torch.zeros(H, W, dtype=torch.float64)
            centred[:kh, :kw] = kernel.detach().cpu().to(torch.float64)
            self._K = torch.fft.fft2(centred.roll((-ch, -cw), dims=(0, 1)))[:, : W // 2 + 1]

    def _correlate(self, x: Tensor, flip: bool, pad: tuple[int, int, int, int]) -> Tensor:
        """Correlation of ``x`` with the kernel (flipped: convolution), the weight cached per device."""
        H, W = self.shape_in[-2:]
        kernel = self.kernel.flip(0, 1) if flip else self.kernel
        weight = self._on("flipped" if flip else "kernel", x, lambda d, dt: kernel.to(d, dt)[None, None])
        xp = F.pad(x.reshape(-1, 1, H, W), pad, mode=self._mode)
        return F.conv2d(xp, weight).reshape(x.shape)

    def _forward(self, x: Tensor) -> Tensor:
        return self._correlate(x, True, self._pad_fwd)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._correlate(y, False, self._pad_adj)

    def _gain(self, method: str, y: Tensor) -> tuple[Tensor, bool]:
        """``method``'s spectral gain on ``y``'s device, half spectrum (``"pinv"``: ``conj(K) / |K|^2``
        over the frequencies kept at ``y``'s dtype's cutoff, in ``y``'s complex dtype; ``"aat_solve"``:
        ``|K|^2`` in ``y``'s dtype), and whether that cutoff keeps every frequency (full rank)."""
        K = self._K
        if K is None:
            raise NotImplementedError(f"Blur: {method} needs padding='circular'")
        if y.dtype not in (torch.float32, torch.float64):  # torch's FFTs: no half precision on the CPU
            raise ValueError(f"Blur.{method}: y must be float32 or float64 (an FFT), got {y.dtype}")

        def make(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, bool]:
            mag = K.abs()
            keep = mag > cutoff(self.rcond, dtype, math.prod(self.shape_in)) * mag.max()
            if method == "aat_solve":
                return (mag**2).to(device=device, dtype=dtype), bool(keep.all())
            gain = torch.where(keep, K.conj() / torch.where(keep, mag, 1.0) ** 2, 0.0)
            return gain.to(device=device, dtype=dtype.to_complex()), bool(keep.all())

        return self._on(method, y, make)

    def _spectral(self, y: Tensor, gain: Tensor) -> Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(y) * gain, s=self.shape_in[-2:])

    def _pinv(self, y: Tensor) -> Tensor:
        return self._spectral(y, self._gain("pinv", y)[0])

    def _aat_solve(self, y: Tensor, shift: float | Tensor) -> Tensor:
        mag2, full_rank = self._gain("aat_solve", y)
        if isinstance(shift, float) and shift == 0.0 and not full_rank:
            raise ValueError("Blur.aat_solve: A A^T is singular (kernel DFT has zeros); pass shift > 0")
        return self._spectral(y, 1.0 / (mag2 + shift))
