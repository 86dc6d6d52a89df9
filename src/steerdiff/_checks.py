"""Argument validation: the one check of a scalar argument (and of an ordered pair of them, or a
1-d array of reals), and its message.

:func:`real` and :func:`integer` accept any :class:`numbers.Real` / :class:`numbers.Integral` (numpy
scalars included) except ``bool``, check it against a range and return it as a plain ``float`` /
``int``. Anything else is a ``ValueError`` naming the owner, the argument and what is accepted::

    DDIM: eta must be a finite number >= 0, got -1.0
    DPMSolverSDE: r must be a finite number in (0, 1], got 0
    svdd: alpha must be a number >= 0 or inf, got nan
    HMC: leapfrog_steps must be an integer >= 1, got 1.5

NaN is never accepted; ``inf`` only with ``finite=False``, and then where the bounds admit it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

__all__ = [
    "Bounds",
    "boolean",
    "caller",
    "choice",
    "device_or_none",
    "held_by",
    "integer",
    "ordered",
    "real",
    "real_array",
    "sizes",
    "tensor",
    "torch_device",
]


def _bound(v: float) -> str:
    """A bound as the message writes it: an ``int`` as is, a ``float`` in ``%g``."""
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    """The message's range: ``" >= lo"``, ``" < hi"``, ``" in (lo, hi]"``, ...; empty without bounds."""
    if lo == -math.inf and hi == math.inf:
        return ""
    if hi == math.inf:
        return f" {'>' if lo_open else '>='} {_bound(lo)}"
    if lo == -math.inf:
        return f" {'<' if hi_open else '<='} {_bound(hi)}"
    return f" in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"


class Bounds(TypedDict, total=False):
    """The keyword bounds of :func:`real` (and :func:`ordered`), kept as a dict to pass as ``**bounds``."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    finite: bool


def real(
    who: str,
    name: str,
    value: object,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float`` if it is a real number (not a ``bool``, not NaN) in the range from
    ``lo`` to ``hi`` (each bound excluded where ``lo_open`` / ``hi_open``), else a ``ValueError``
    ``"{who}: {name} must be a finite number in (lo, hi], got {value!r}"``.

    ``finite=False`` also accepts ``inf`` (``-inf``) where ``hi`` (``lo``) is an infinite closed
    bound: ``real(who, "alpha", a, lo=0, finite=False)`` accepts ``[0, inf]``.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        inside = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        if inside and (math.isfinite(v) or not finite):
            return v
    accepted = ("a finite number" if finite else "a number") + _range(lo, hi, lo_open, hi_open)
    if not finite:  # name the infinite ends that the bounds admit
        accepted += " or -inf" * (lo == -math.inf and not lo_open)
        accepted += " or inf" * (hi == math.inf and not hi_open)
    raise ValueError(f"{who}: {name} must be {accepted}, got {value!r}")


def integer(who: str, name: str, value: object, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a ``bool``) with ``lo <= value <= hi``
    (``None``: no bound), else a ``ValueError`` ``"{who}: {name} must be an integer >= lo, got
    {value!r}"`` (``"... must be 1, got 3"`` where ``lo == hi``: one value is accepted)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = int(value)
        if (lo is None or v >= lo) and (hi is None or v <= hi):
            return v
    if lo is not None and lo == hi:
        raise ValueError(f"{who}: {name} must be {lo}, got {value!r}")
    bounds = _range(-math.inf if lo is None else lo, math.inf if hi is None else hi, False, False)
    raise ValueError(f"{who}: {name} must be an integer{bounds}, got {value!r}")


def held_by(who: str, name: str, value: float, dtype: torch.dtype) -> float:
    """``value``, a checked finite number such as a guidance scale, if ``dtype`` -- the dtype of the tensors
    it multiplies -- holds it (its magnitude at most ``dtype``'s largest finite number), else a
    ``ValueError`` ``"{who}: {name} must be at most 3.403e+38 in magnitude, the largest float32 (the dtype
    it is applied in), got 1e+39"``: a finite float64 beyond that is ``inf`` there, which torch refuses
    (``torch.lerp``) or which turns every entry it meets into ``inf`` or NaN."""
    big = torch.finfo(dtype).max
    if abs(value) <= big:
        return value
    kind = str(dtype).removeprefix("torch.")
    raise ValueError(
        f"{who}: {name} must be at most {big:.4g} in magnitude, the largest {kind} (the dtype it is applied "
        f"in), got {value!r}"
    )


def sizes(who: str, name: str, value: object) -> tuple[int, ...]:
    """``value`` -- a tuple or list of integers >= 1, such as a sample shape -- as a tuple of ``int``, else a
    ``ValueError`` naming ``who`` and ``name`` (and the offending entry, ``name[i]``)."""
    if not isinstance(value, tuple | list):
        raise ValueError(f"{who}: {name} must be a tuple of integers >= 1, got {value!r}")
    return tuple(integer(who, f"{name}[{i}]", s, lo=1) for i, s in enumerate(value))


def tensor(who: str, name: str, value: object, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` -- a tensor, array or nested sequence of numbers -- as a tensor (of ``dtype`` where given),
    else a ``ValueError`` naming ``who`` and ``name`` (torch's own errors for ``None`` or a string named no
    argument)."""
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{who}: {name} must be a tensor or array of numbers, got {value!r:.60}") from e


def real_array(who: str, name: str, value: object) -> Tensor:
    """``value`` -- a non-empty 1-d tensor, numpy array or sequence of real numbers -- as a float64 tensor,
    else a ``ValueError`` naming ``who`` and ``name`` (booleans and complex numbers are refused)."""
    try:
        kind = torch.as_tensor(value)  # for its dtype and shape; converted to float64 once accepted
    except (TypeError, ValueError, RuntimeError):
        kind = None
    if kind is None or kind.ndim == 0:
        got = f"{value!r:.60}"
    elif kind.dtype == torch.bool or kind.is_complex():
        got = f"{kind.dtype} values"
    elif kind.ndim != 1 or kind.numel() == 0:
        got = f"shape {tuple(kind.shape)}"
    else:
        return torch.as_tensor(value, dtype=torch.float64)
    raise ValueError(f"{who}: {name} must be a non-empty 1-d array of real numbers, got {got}")


def ordered(
    who: str, first: str, a: object, second: str, b: object, /, **bounds: Unpack[Bounds]
) -> tuple[float, float]:
    """``(a, b)``, the arguments named ``first`` and ``second``, as floats, each checked by
    :func:`~steerdiff._checks.real` with ``bounds``, and ``a < b``; else a ``ValueError`` naming them."""
    lo, hi = real(who, first, a, **bounds), real(who, second, b, **bounds)
    if not lo < hi:
        raise ValueError(f"{who}: need {first} < {second}, got {first}={a!r}, {second}={b!r}")
    return lo, hi


def choice(who: str, name: str, value: object, accepted: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``accepted``, else a ``ValueError``
    ``"{who}: {name} must be one of [...], got {value!r}"``."""
    if isinstance(value, str) and value in accepted:
        return value
    raise ValueError(f"{who}: {name} must be one of {list(accepted)}, got {value!r}")


SAMPLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sample_dtype(who: str, name: str, value: object) -> torch.dtype:
    """``value`` if it is a floating dtype samples can have (:data:`SAMPLE_DTYPES`), else a
    ``ValueError`` naming it and them."""
    if isinstance(value, torch.dtype) and value in SAMPLE_DTYPES:
        return value
    raise ValueError(f"{who}: {name} must be float16, bfloat16, float32 or float64, got {value!r}")


def caller(who: str | None) -> str:
    """The start of a message naming its caller, ``"who: "`` (nothing for ``None`` or ``""``): for checks
    that public functions share, each passing its own name."""
    return f"{who}: " if who else ""


_DEVICES = "a torch.device or a device string torch accepts (such as 'cpu', 'cuda', 'cuda:0')"


def torch_device(who: str, name: str, value: object) -> torch.device:
    """``value`` -- a ``torch.device``, a device string such as ``"cuda:0"`` or a device index such as
    ``torch.cuda.current_device()`` -- as a ``torch.device``, else a ``ValueError`` naming ``who`` and
    ``name`` and what is accepted (with torch's reason for a string or index it refuses, such as
    ``"gpu0"``, or ``0`` without an accelerator)."""
    return _device(who, name, value, "")


def device_or_none(who: str, name: str, value: object) -> torch.device | None:
    """:func:`torch_device` for an argument that may also be ``None`` (returned as it is), which its
    message then lists too."""
    return None if value is None else _device(who, name, value, " or None")


def _device(who: str, name: str, value: object, also: str) -> torch.device:
    if isinstance(value, torch.device):
        return value
    # an index is a device too (torch.device(0), torch.cuda.current_device()), not a bool
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            return torch.device(value)
        except RuntimeError as e:
            raise ValueError(f"{who}: {name} must be {_DEVICES}{also}, got {value!r} ({e})") from e
    raise ValueError(f"{who}: {name} must be {_DEVICES}{also}, got {value!r}")


def boolean(who: str, name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (numpy's included), else a ``ValueError`` naming it: a string such
    as ``"no"`` is truthy and would silently mean ``True``."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise ValueError(f"{who}: {name} must be True or False, got {value!r}")
