import numpy as np
import pytest

from streamsketch._validation import (
    as_float_matrix,
    as_float_vector,
    check_dtype_arg,
    check_float,
    check_int,
)


def test_float_dtypes_kept_and_ints_converted():
    for dt in (np.float32, np.float64):
        assert as_float_matrix(np.ones((2, 3), dt), "X").dtype == dt
    out = as_float_matrix(np.ones((2, 3), np.int16), "X")
    assert out.dtype == np.float64
    assert as_float_matrix(np.ones((2, 3), np.uint8), "X", dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((2, 2), bool),
        np.ones((2, 2), np.float16),
        np.ones((2, 2), complex),
        np.array([[object(), 1]], dtype=object),
        "abc",
    ],
)
def test_other_dtypes_refused_with_argument_name(bad):
    with pytest.raises(TypeError, match="Xname"):
        as_float_matrix(bad, "Xname")


def test_shape_errors_name_argument():
    with pytest.raises(ValueError, match="rows.*2-D"):
        as_float_matrix(np.ones(3), "rows")
    with pytest.raises(ValueError, match="rows must have 4 columns"):
        as_float_matrix(np.ones((2, 3)), "rows", 4)
    with pytest.raises(ValueError, match="x must have length 4"):
        as_float_vector(np.ones(3), "x", 4)
    with pytest.raises(ValueError, match="at least one row"):
        as_float_matrix(np.ones((0, 3)), "rows", allow_empty=False)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_refused_with_position(value):
    X = np.ones((4, 3))
    X[2, 1] = value
    with pytest.raises(ValueError, match=r"X contains NaN or Inf \(first at index \[2, 1\]\)"):
        as_float_matrix(X, "X")
    # finite=False lets kernels do the check themselves
    assert as_float_matrix(X, "X", finite=False).shape == (4, 3)


def test_layouts_become_c_contiguous():
    F = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    out = as_float_matrix(F, "X")
    assert out.flags.c_contiguous and np.array_equal(out, F)
    strided = np.arange(24.0).reshape(6, 4)[::2]
    assert as_float_matrix(strided, "X").flags.c_contiguous
    ro = np.ones((2, 2))
    ro.flags.writeable = False
    assert np.array_equal(as_float_matrix(ro, "X"), ro)


def test_torch_tensor_refused_with_hint():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"X must be a numpy array.*numpy\(\)"):
        as_float_matrix(torch.ones(2, 2), "X")


def test_scalar_checks():
    assert check_int(np.int64(3), "n") == 3
    with pytest.raises(TypeError, match="n must be an integer"):
        check_int(3.0, "n")
    with pytest.raises(TypeError, match="n must be an integer"):
        check_int(True, "n")
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_int(0, "n", minimum=1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        check_float(0.0, "eps", minimum=0, strict_minimum=True)
    with pytest.raises(ValueError, match="eps must be finite"):
        check_float(float("nan"), "eps")
    assert check_dtype_arg("float32") == np.float32
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        check_dtype_arg(np.int32)
