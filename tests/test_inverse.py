"""Linear operators of ``sd.inverse`` against explicit dense matrices, scipy and numpy.linalg.pinv."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import steerdiff as sd
from steerdiff.inverse import Blur, Downsample, Inpaint, LinearOperator, Matrix

g = torch.Generator().manual_seed(0)
MASK = (torch.rand(2, 4, 5, generator=g) < 0.6).to(torch.float64)
KERNEL_ODD = torch.rand(3, 3, generator=g, dtype=torch.float64)
KERNEL_EVEN = torch.rand(2, 4, generator=g, dtype=torch.float64)
A_WIDE = torch.randn(3, 7, generator=g, dtype=torch.float64)
A_TALL_LOWRANK = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
    2, 5, generator=g, dtype=torch.float64
)

OPERATORS: dict[str, LinearOperator] = {
    "matrix_wide": Matrix(A_WIDE),
    "matrix_lowrank_shaped": Matrix(A_TALL_LOWRANK, shape_in=(1, 5)),
    "inpaint": Inpaint(MASK),
    "downsample": Downsample(2, (2, 4, 6)),
    "blur_circ_odd": Blur(KERNEL_ODD, (2, 5, 6), padding="circular"),
    "blur_circ_even": Blur(KERNEL_EVEN, (1, 6, 5), padding="circular"),
    "blur_box_circ": Blur(torch.full((2, 2), 0.25, dtype=torch.float64), (1, 4, 6)),
    "blur_zero_odd": Blur(KERNEL_ODD, (2, 5, 6), padding="zero"),
    "blur_zero_even": Blur(KERNEL_EVEN, (1, 6, 5), padding="zero"),
}
HAS_PINV = [k for k, op in OPERATORS.items() if not (isinstance(op, Blur) and op.padding == "zero")]


def _scipy_blur(op: Blur, x: np.ndarray) -> np.ndarray:
    boundary = "wrap" if op.padding == "circular" else "fill"
    k = op.kernel.numpy()
    flat = x.reshape(-1, *op.shape_in[-2:])
    out = np.stack([convolve2d(img, k, mode="same", boundary=boundary) for img in flat])
    return out.reshape(x.shape)


def _explicit(op: LinearOperator) -> np.ndarray:
    """The matrix of ``op`` built independently of its forward."""
    d = math.prod(op.shape_in)
    if isinstance(op, Matrix):
        return op.A.numpy()
    if isinstance(op, Inpaint):
        return np.eye(d)[op.mask.flatten().numpy()]
    if isinstance(op, Downsample):
        f = op.factor
        grid_in = np.arange(d).reshape(op.shape_in)
        rows = []
        for c in range(op.shape_out[0]):
            for i in range(op.shape_out[1]):
                for j in range(op.shape_out[2]):
                    row = np.zeros(d)
                    row[grid_in[c, f * i : f * (i + 1), f * j : f * (j + 1)].ravel()] = 1.0 / f**2
                    rows.append(row)
        return np.array(rows)
    assert isinstance(op, Blur)
    return _scipy_blur(op, np.eye(d).reshape(d, *op.shape_in)).reshape(d, -1).T


@pytest.mark.parametrize("name", OPERATORS)
def test_adjoint_identity(name: str) -> None:
    op = OPERATORS[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, *op.shape_in, generator=gen, dtype=torch.float64)
    y = torch.randn(3, *op.shape_out, generator=gen, dtype=torch.float64)
    lhs = (op.forward(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y)).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", OPERATORS)
def test_forward_equals_explicit_matrix(name: str) -> None:
    op = OPERATORS[name]
    dense = op.to_dense().numpy()
    expected = _explicit(op)
    assert dense.shape == (math.prod(op.shape_out), math.prod(op.shape_in))
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-13)
    # The adjoint applied to basis vectors gives the transpose.
    m = math.prod(op.shape_out)
    basis = torch.eye(m, dtype=torch.float64).reshape(m, *op.shape_out)
    np.testing.assert_allclose(op.adjoint(basis).reshape(m, -1).numpy(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", [k for k in OPERATORS if k.startswith("blur")])
def test_blur_matches_scipy_on_random_images(name: str) -> None:
    op = OPERATORS[name]
    x = torch.randn(4, *op.shape_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    np.testing.assert_allclose(op.forward(x).numpy(), _scipy_blur(op, x.numpy()), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", HAS_PINV)
def test_pinv_is_moore_penrose(name: str) -> None:
    op = OPERATORS[name]
    A = op.to_dense().numpy()
    m = A.shape[0]
    basis = torch.eye(m, dtype=torch.float64).reshape(m, *op.shape_out)
    P = op.pinv(basis).reshape(m, -1).numpy().T  # column i = A^+ e_i
    np.testing.assert_allclose(A @ P @ A, A, rtol=0, atol=1e-12)
    np.testing.assert_allclose(P @ A @ P, P, rtol=0, atol=1e-10)
    np.testing.assert_allclose(P, np.linalg.pinv(A, rcond=1e-10), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", HAS_PINV)
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_aat_solve_matches_dense_solve(name: str, shift: float) -> None:
    op = OPERATORS[name]
    A = op.to_dense().numpy()
    M = A @ A.T + shift * np.eye(A.shape[0])
    y = torch.randn(2, *op.shape_out, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if np.linalg.matrix_rank(M) < M.shape[0]:
        with pytest.raises(ValueError, match="singular"):
            op.aat_solve(y, shift)
        return
    z = op.aat_solve(y, shift).reshape(2, -1).numpy()
    np.testing.assert_allclose(z, np.linalg.solve(M, y.reshape(2, -1).numpy().T).T, rtol=0, atol=1e-10)


def test_singular_cases_are_exercised() -> None:
    # The low-rank matrix and the 2x2 box kernel (DFT zeros at Nyquist) are rank deficient.
    for name in ("matrix_lowrank_shaped", "blur_box_circ"):
        A = OPERATORS[name].to_dense().numpy()
        assert np.linalg.matrix_rank(A) < min(A.shape)


def test_matrix_pinv_equals_numpy_and_svd_cached() -> None:
    op = Matrix(A_WIDE)
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    np.testing.assert_allclose(op.pinv(y).numpy(), y.numpy() @ np.linalg.pinv(A_WIDE.numpy()).T, atol=1e-12)
    assert op.svd() is op.svd()


@pytest.mark.parametrize("name", ["matrix_wide", "inpaint", "downsample", "blur_circ_even", "blur_zero_odd"])
def test_differentiable_and_dtype_preserving(name: str) -> None:
    op = OPERATORS[name]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, *op.shape_in, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, *op.shape_out, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op.forward, (x,))
    assert torch.autograd.gradcheck(op.adjoint, (y,))
    # grad of 0.5 |A x - y|^2 is A^T (A x - y).
    (grad,) = torch.autograd.grad(0.5 * (op(x) - y).square().sum(), x)
    torch.testing.assert_close(grad, op.adjoint(op(x) - y).detach())
    x32 = x.detach().float()
    out = op.forward(x32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), op.forward(x.detach()), rtol=1e-5, atol=1e-5)
    if name in HAS_PINV:
        assert op.pinv(out).dtype == torch.float32


@pytest.mark.parametrize("name", OPERATORS)
def test_shape_mismatch_names_operator_and_shape(name: str) -> None:
    op = OPERATORS[name]
    bad = torch.zeros(2, *op.shape_in, 1, dtype=torch.float64)
    cls = type(op).__name__
    with pytest.raises(ValueError, match=re.escape(f"{cls}: x must have shape (n, *{op.shape_in})")):
        op.forward(bad)
    with pytest.raises(ValueError, match=re.escape(f"{cls}: y must have shape (n, *{op.shape_out})")):
        op.adjoint(torch.zeros(2, *op.shape_out, 1, dtype=torch.float64))


@pytest.mark.parametrize(
    "make",
    [
        lambda s: Matrix(A_WIDE, noise_std=s),
        lambda s: Inpaint(MASK, noise_std=s),
        lambda s: Downsample(2, (2, 4, 6), noise_std=s),
        lambda s: Blur(KERNEL_ODD, (1, 5, 5), noise_std=s),
    ],
)
def test_noise_std_field(make) -> None:
    assert make(0.1).noise_std == 0.1
    assert make(0).noise_std == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_std"):
            make(bad)


def test_bad_construction_and_no_pinv_for_zero_padding() -> None:
    with pytest.raises(ValueError, match="factor"):
        Downsample(0, (1, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        Downsample(3, (1, 4, 4))
    with pytest.raises(ValueError, match="padding"):
        Blur(KERNEL_ODD, (1, 5, 5), padding="reflect")
    with pytest.raises(ValueError, match="larger"):
        Blur(KERNEL_ODD, (1, 2, 5))
    with pytest.raises(ValueError, match="0 and 1"):
        Inpaint(torch.full((3,), 0.5))
    for bad in (None, "mask"):  # was torch's RuntimeError / TypeError, naming no argument
        with pytest.raises(ValueError, match=r"^Inpaint: mask must be a tensor or array of numbers, got"):
            Inpaint(bad)
        with pytest.raises(ValueError, match=r"^Blur: kernel must be a tensor or array of numbers, got"):
            Blur(bad, (1, 4, 4))
    assert Inpaint([[1, 0], [0, 1]]).shape_out == (2,)  # a nested list is still a mask
    with pytest.raises(ValueError, match="shape_in"):
        Matrix(A_WIDE, shape_in=(2, 3))
    with pytest.raises(ValueError, match=r"^Matrix: A must be a 2-D float tensor \(m, d\), got str$"):
        Matrix("abc")
    with pytest.raises(ValueError, match=r"^Matrix: A must be finite"):  # was a LinAlgError at first use
        Matrix(torch.full((2, 4), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="shift"):
        OPERATORS["inpaint"].aat_solve(torch.zeros(1, *OPERATORS["inpaint"].shape_out), -1.0)
    with pytest.raises(NotImplementedError, match="circular"):
        OPERATORS["blur_zero_odd"].pinv(torch.zeros(1, 2, 5, 6, dtype=torch.float64))


def test_exported() -> None:
    assert sd.inverse.Matrix is Matrix and "inverse" in sd.__all__


class _OpLog(TorchDispatchMode):
    """Records the aten ops run and the dtypes of their tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.dtypes.add(o.dtype)
        return out


@pytest.mark.parametrize("name", HAS_PINV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warm_calls_copy_nothing_recompute_nothing_and_never_sync(name: str, dtype: torch.dtype) -> None:
    """After a first call, ``pinv`` and ``aat_solve`` (float and per-sample shift) run no copy (``_to_copy``,
    a host->device move on a GPU), no ``|K|^2`` / rank recomputation and no host sync, and the FFT
    product stays in the input's complex dtype (was: complex128 for float32, ``abs``/``sqrt``/``all`` and a
    ``bool()`` per ``aat_solve`` call)."""
    op = OPERATORS[name]
    y = torch.randn(2, *op.shape_out, generator=torch.Generator().manual_seed(4), dtype=dtype)
    shift = torch.tensor([0.3, 1.7], dtype=dtype)
    full = name not in ("matrix_lowrank_shaped", "blur_box_circ")

    def calls() -> None:
        op.pinv(y)
        op.aat_solve(y, 0.3)
        op.aat_solve(y, shift)
        if full:
            op.aat_solve(y, 0.0)

    calls()
    with _OpLog() as log:
        calls()
    banned = {"_to_copy", "abs", "sqrt", "all", "is_nonzero", "_local_scalar_dense", "item", "linalg_svd"}
    assert banned.isdisjoint(log.ops), sorted(banned.intersection(log.ops))
    assert log.dtypes <= {dtype, dtype.to_complex(), torch.bool}, log.dtypes


@pytest.mark.parametrize("name", HAS_PINV)
def test_aat_solve_with_a_shift_per_sample_is_the_dense_solve_per_row(name: str) -> None:
    op = OPERATORS[name]
    A = op.to_dense().numpy()
    y = torch.randn(3, *op.shape_out, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shifts = [0.3, 1.7, 1e-3]
    z = op.aat_solve(y, torch.tensor(shifts, dtype=torch.float64)).reshape(3, -1).numpy()
    for row, c in enumerate(shifts):
        want = np.linalg.solve(A @ A.T + c * np.eye(A.shape[0]), y[row].reshape(-1).numpy())
        np.testing.assert_allclose(z[row], want, rtol=1e-10, atol=1e-10)
        # the same numbers as the float shift, row by row
        np.testing.assert_allclose(z[row], op.aat_solve(y[row : row + 1], c).reshape(-1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("per_sample", [False, True])
def test_matrix_aat_solve_keeps_float32_accuracy_at_a_small_shift(per_sample: bool) -> None:
    """A wide ``A`` (m <= d) has ``U`` square, so ``y - U U^T y`` is 0: computed, its float32 round-off was
    divided by the shift. A 4 x 16 ``A`` (singular values 1.35-2.92), float32 against the float64 dense
    solve, relative: 3.1e-7 at shift 1, 2.8e-5 at 1e-2, 2.8e-3 at 1e-4 (PiGDM's shift ``s^2 / r_t^2`` at
    noise_std 0.01 and high noise); now 1.3e-7, 3.9e-8, 1.6e-7 (6.3e-8 at shift 0)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 16, generator=gen, dtype=torch.float64) / 2
    y = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    op = Matrix(A)
    for c in (1.0, 1e-2, 1e-4):
        want = torch.linalg.solve(A @ A.T + c * torch.eye(4, dtype=torch.float64), y.T).T
        shift = torch.full((8,), c) if per_sample else c
        got = op.aat_solve(y.float(), shift).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6, c


def test_aat_solve_per_sample_shift_of_the_wrong_shape() -> None:
    op = OPERATORS["downsample"]
    y = torch.zeros(2, *op.shape_out)
    with pytest.raises(ValueError) as e:
        op.aat_solve(y, torch.ones(3))
    assert str(e.value) == (
        "Downsample.aat_solve: shift must be a float or a floating tensor of shape (2,) (one per sample), "
        "got torch.float32 (3,)"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Downsample(2, shape=(1, 8.9, 8)), "Downsample: shape[1] must be an integer >= 1, got 8.9"),
        (lambda: Blur(KERNEL_ODD, (True, 5, 5)), "Blur: shape[0] must be an integer >= 1, got True"),
        (lambda: Matrix(A_WIDE, shape_in=(7.0,)), "Matrix: shape_in[0] must be an integer >= 1, got 7.0"),
        (
            lambda: Downsample(2, shape=(4,)),
            "Downsample: shape must be a tuple of >= 2 positive integers, got (4,)",
        ),
        (
            lambda: Blur(KERNEL_ODD, (1, 5, 5), padding="reflect"),
            "Blur: padding must be one of ['circular', 'zero'], got 'reflect'",
        ),
    ],
)
def test_shapes_are_integers_and_padding_a_choice(make, message: str) -> None:
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


def test_integer_input_is_refused_not_computed_with_integer_operators() -> None:
    """An integer x took the operator's entries to integers: ``Matrix([[0.5, 0.5]])`` applied to the
    integer image ``[2, 4]`` gave 0 (A truncated to zeros), not 3; the average of ``Downsample`` and the
    weights of ``Blur`` were truncated the same way. Now each names the argument and the dtypes accepted."""
    image = torch.tensor([[2, 4]])
    assert Matrix(torch.tensor([[0.5, 0.5]])).forward(image.double()).tolist() == [[3.0]]
    cases = [
        (Matrix(torch.tensor([[0.5, 0.5]])), "forward", image, "Matrix: x"),
        (Matrix(A_WIDE), "adjoint", torch.ones(1, 3, dtype=torch.int64), "Matrix: y"),
        (Downsample(2, (2, 2)), "forward", torch.ones(1, 2, 2, dtype=torch.uint8), "Downsample: x"),
        (Blur(KERNEL_ODD, (5, 6)), "forward", torch.ones(1, 5, 6, dtype=torch.int32), "Blur: x"),
        (
            Inpaint(MASK),
            "pinv",
            torch.ones(1, *OPERATORS["inpaint"].shape_out, dtype=torch.bool),
            "Inpaint: y",
        ),
        (Matrix(A_WIDE), "forward", torch.ones(1, 7, dtype=torch.complex64), "Matrix: x"),
    ]
    for op, method, arg, who in cases:
        with pytest.raises(ValueError) as e:
            getattr(op, method)(arg)
        assert (
            str(e.value) == f"{who} must be a float16, bfloat16, float32 or float64 tensor, got {arg.dtype}"
        )
    with pytest.raises(ValueError) as e:  # was an int64 matrix of A's truncated entries
        Matrix(A_WIDE).to_dense(dtype=torch.int64)
    assert (
        str(e.value)
        == "Matrix.to_dense: dtype must be float16, bfloat16, float32 or float64, got torch.int64"
    )


def test_blur_fft_paths_in_half_precision_and_empty_kernels_or_matrices_are_named() -> None:
    """Blur's pinv / aat_solve on float16 raised torch's "Unsupported dtype Half" (after a ComplexHalf
    warning); an empty kernel or matrix was accepted and failed at first use (conv2d's "kernel size
    should be greater than zero", ``s.max()`` of an empty SVD)."""
    op = Blur(KERNEL_ODD, (5, 6))
    for method in ("pinv", "aat_solve"):
        with pytest.raises(ValueError) as e:
            getattr(op, method)(torch.ones(1, 5, 6, dtype=torch.float16))
        assert str(e.value) == f"Blur.{method}: y must be float32 or float64 (an FFT), got torch.float16"
    assert op.forward(torch.ones(1, 5, 6, dtype=torch.float16)).dtype == torch.float16  # conv2d: fine
    with pytest.raises(ValueError) as e:
        Blur(torch.ones(0, 3), (4, 4))
    assert (
        str(e.value)
        == "Blur: kernel must be a finite 2-D float tensor (kh, kw), kh, kw >= 1, got (0, 3) torch.float32"
    )
    for shape in ((0, 4), (3, 0)):
        with pytest.raises(ValueError) as e:
            Matrix(torch.ones(shape))
        assert (
            str(e.value)
            == f"Matrix: A must be a 2-D float tensor (m, d), m, d >= 1, got {shape} torch.float32"
        )


def _nearly_singular(m: int, d: int, s: list[float]) -> Tensor:
    """An ``(m, d)`` matrix with singular values ``s`` and random singular vectors."""
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, len(s), generator=gen, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
def test_matrix_pinv_cutoff_follows_the_dtype(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The cutoff was ``1e-12 s_max`` in every dtype: a float32 ``pinv`` kept the singular value ``1e-10``
    and multiplied ``y``'s round-off by ``1e10`` (singular values 1 .. 1e-10, random ``y``: relative error
    7.7e5 (5 x 8) and 9.6e5 (8 x 5) against the exact pseudo-inverse at float32's cutoff). Now
    ``eps * max(m, d) * s_max`` of the dtype of ``y``, as numpy / torch.linalg.pinv: float32 drops 1e-10
    and keeps 1e-4 (5.4e-8, 1.5e-7), float64 keeps both (3.2e-7, 6.7e-7: the conditioning 1e10 times
    float64's round-off)."""
    m, d = shape
    A = _nearly_singular(m, d, [1.0, 0.5, 0.2, 1e-4, 1e-10])
    y = torch.randn(4, m, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    want = y.numpy() @ np.linalg.pinv(A.numpy(), rcond=eps * max(m, d)).T
    got = Matrix(A).pinv(y.to(dtype)).double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (1e-6 if dtype == torch.float32 else 1e-5)
    assert sd.inverse.cutoff(None, dtype, max(m, d)) == eps * max(m, d)
    # an explicit rcond is the cutoff in every dtype
    want = y.numpy() @ np.linalg.pinv(A.numpy(), rcond=1e-3).T
    got = Matrix(A, rcond=1e-3).pinv(y.to(dtype)).double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    # aat_solve(y, 0) needs full row rank at the same cutoff: float32 lacks it for a wide A
    if m < d:
        op = Matrix(A)
        if dtype == torch.float32:
            with pytest.raises(ValueError, match="singular"):
                op.aat_solve(y.to(dtype), 0.0)
        else:
            P = np.linalg.pinv(A.numpy(), rcond=eps * max(m, d))  # (A A^T)^{-1} = P^T P at full row rank
            got = op.aat_solve(y, 0.0).numpy()
            # 1 / s_min^2 dominates, and an SVD gets s_min = 1e-10 to eps s_max / s_min = 2e-6 relative (two
            # SVDs, squared: ~1e-5; 3e-8 with this machine's LAPACK, 1.1e-6 with torch 2.11's on an H200)
            assert np.linalg.norm(got - y.numpy() @ (P.T @ P).T) / np.linalg.norm(got) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_pinv_cutoff_follows_the_dtype(dtype: torch.dtype) -> None:
    """As for Matrix: the 2x2 box kernel nudged by 1e-10 has DFT gains down to 1e-10 of the largest; float32
    kept them (cutoff 1e-12): relative error 4.5e9 against the exact pseudo-inverse at float32's cutoff,
    now 1.2e-7 (float64: 8.9e-7, unchanged)."""
    kernel = torch.tensor([[0.25, 0.25], [0.25, 0.25 + 1e-10]], dtype=torch.float64)
    op = Blur(kernel, (1, 4, 6))
    A = op.to_dense().numpy()
    n = A.shape[0]
    y = torch.randn(3, 1, 4, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = y.reshape(3, -1).numpy() @ np.linalg.pinv(A, rcond=torch.finfo(dtype).eps * n).T
    got = op.pinv(y.to(dtype)).double().reshape(3, -1).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (1e-6 if dtype == torch.float32 else 1e-5)
    if dtype == torch.float32:
        with pytest.raises(ValueError, match="singular"):
            op.aat_solve(y.to(dtype), 0.0)


@pytest.mark.parametrize("name", ["matrix_wide", "matrix_lowrank_shaped", "blur_circ_odd", "blur_box_circ"])
@pytest.mark.parametrize("c", [1e-20, 1e20])
def test_pinv_cutoff_is_relative_to_the_largest_singular_value(name: str, c: float) -> None:
    """``(c A)^+ = A^+ / c``: the cutoff is ``r s_max``, so scaling ``A`` scales what it keeps. An absolute
    cutoff ``r`` passed every other test (their operators have ``s_max`` near 1); with it, ``1e-20 A`` has a
    zero pseudo-inverse and ``1e20 A`` of low rank inverts its round-off (1e4 instead of 0)."""
    op = OPERATORS[name]
    scaled = (
        Matrix(c * op.A, shape_in=op.shape_in) if isinstance(op, Matrix) else Blur(c * op.kernel, op.shape_in)
    )
    y = torch.randn(3, *op.shape_out, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    want = op.pinv(y) / c
    torch.testing.assert_close(scaled.pinv(y), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_rcond_is_checked() -> None:
    for bad in (-1e-3, 1.0, float("nan"), "small"):
        with pytest.raises(ValueError) as e:
            Matrix(A_WIDE, rcond=bad)
        assert str(e.value) == f"Matrix: rcond must be a finite number in [0, 1), got {bad!r}"
        with pytest.raises(ValueError, match=r"^Blur: rcond must be a finite number in \[0, 1\)"):
            Blur(KERNEL_ODD, (5, 6), rcond=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matrix_pinv_in_half_precision_is_float32s(dtype: torch.dtype) -> None:
    """A half-precision ``y`` is solved in float32 (:func:`~steerdiff.solvers.base.work_dtype`) at
    float32's cutoff and rounded back. The cutoff ``eps * max(m, d)`` of the half dtype itself is no
    cutoff at all for a mid-sized matrix (float16: 0.39 at 300 x 400, bfloat16: 3.1): a well-conditioned
    ``A`` (singular values 1 .. 0.05) lost most of them, relative error 0.95 (float16) and 1.0 (bfloat16,
    ``pinv`` all zeros), and ``aat_solve(y, 0)`` refused it as singular; now the float32 answer rounded
    to the dtype: ``pinv`` 2.0e-4 / 1.7e-3, ``aat_solve`` 2.0e-4 / 1.7e-3, under a quarter of the dtype's
    eps (in half precision throughout, before the dtype-aware cutoff: 5.4e-4 / 4.3e-3)."""
    m, d = 300, 400
    A = _nearly_singular(m, d, torch.linspace(1.0, 0.05, m).tolist())
    y = torch.randn(4, m, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(dtype)
    op = Matrix(A)
    eps = torch.finfo(dtype).eps
    want = y.double() @ torch.linalg.pinv(A).T
    got = op.pinv(y)
    assert got.dtype == dtype and (got.double() - want).norm() / want.norm() < eps / 2
    P = torch.linalg.pinv(A)  # (A A^T)^{-1} = P^T P at full row rank
    got, want = op.aat_solve(y, 0.0), y.double() @ (P.T @ P).T
    assert got.dtype == dtype and (got.double() - want).norm() / want.norm() < eps / 2


def _build(name: str) -> LinearOperator:
    """``OPERATORS[name]`` rebuilt from clones of its tensors, in the current inference mode."""
    op = OPERATORS[name]
    if isinstance(op, Matrix):
        return Matrix(op.A.clone(), shape_in=op.shape_in)
    if isinstance(op, Inpaint):
        return Inpaint(op.mask.to(torch.float64))
    if isinstance(op, Downsample):
        return Downsample(op.factor, op.shape_in)
    assert isinstance(op, Blur)
    return Blur(op.kernel.clone(), op.shape_in, padding=op.padding)


@pytest.mark.parametrize("name", OPERATORS)
def test_an_operator_built_under_inference_mode_is_differentiable_after_it(name: str) -> None:
    """A mask or matrix made under ``torch.inference_mode()`` (as an inference script loads an image):
    gradients through every method outside it, as DPS / PiGDM / MCG take them, equal those of the
    operator built normally. Before, a Matrix or Inpaint held the inference tensor (``A.to`` of the same
    dtype is ``A`` itself) and the gradient failed inside autograd: 'Inference tensors cannot be saved
    for backward'."""
    with torch.inference_mode():
        built = _build(name)
    normal = _build(name)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *normal.shape_in, generator=gen, dtype=torch.float64)
    y = torch.randn(2, *normal.shape_out, generator=gen, dtype=torch.float64)
    methods = ["forward", "adjoint"] + (["pinv", "aat_solve"] if name in HAS_PINV else [])
    for method in methods:
        v = (x if method == "forward" else y).clone().requires_grad_(True)
        grads = []
        for op in (built, normal):
            out = getattr(op, method)(v, 0.5) if method == "aat_solve" else getattr(op, method)(v)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=out.dtype)
            (grad,) = torch.autograd.grad(out, v, w)
            grads.append(grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
