"""The input matrix of issue 8: every public sketch and function against bad and odd input.

Each case ends in one of two ways:

- a clear error (``TypeError`` for the kind of thing passed, ``ValueError`` for
  its values or shape) that names the argument, with the object's bytes and
  ``n_seen`` exactly as before the call, or
- a documented conversion whose result is checked: bit-identical to feeding
  the canonical C-contiguous float array, or equal to an exact float64
  reference (to a stated tolerance).

See ``docs/reliability.md`` for the policy these tests pin down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from streamsketch import (
    SRHT,
    CountSketch,
    FrequentDirections,
    GaussianSketch,
    LinearAttentionState,
    MergeReduce,
    OnlineRidgeLeverage,
    PolySketch,
    TensorSketch,
    UniversalSet,
    countsketch,
    leverage_scores,
    lewis_weights,
    lp_sensitivity_bound,
)

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test extra
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
# np.matrix is one of the accepted inputs; its deprecation notice is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

D = 5
N_TARGETS = 2
DTYPES = [np.float64, np.float32]


# ---------------------------------------------------------------------------
# the streaming objects


@dataclass(frozen=True)
class Spec:
    """How to build one public streaming object and what may not merge with it."""

    name: str
    make: Callable[[Any], Any]
    # label -> factory(dtype) of an object that must be refused by merge (ValueError)
    incompatible: dict[str, Callable[[Any], Any]] = field(default_factory=dict)


def _las(fmap_seed: int = 3, m: int = 16, n_targets: int = N_TARGETS):
    return lambda dt: LinearAttentionState(
        TensorSketch(D, 2, m, seed=fmap_seed), n_targets, dtype=dt
    )


def _linear(cls):
    return Spec(
        cls.__name__,
        lambda dt: cls(D, 16, dtype=dt, seed=3),
        {
            "n_features": lambda dt: cls(D + 1, 16, dtype=dt, seed=3),
            "sketch_size": lambda dt: cls(D, 8, dtype=dt, seed=3),
            "seed": lambda dt: cls(D, 16, dtype=dt, seed=4),
            "dtype": lambda dt: cls(D, 16, dtype=_other(dt), seed=3),
        },
    )


def _other(dt):
    return np.float32 if np.dtype(dt) == np.float64 else np.float64


SPECS = [
    _linear(CountSketch),
    _linear(GaussianSketch),
    _linear(SRHT),
    Spec(
        "LinearAttentionState",
        _las(),
        {
            "map seed": _las(fmap_seed=4),
            "map size": _las(m=8),
            "n_targets": _las(n_targets=3),
            "dtype": lambda dt: _las()(_other(dt)),
            "map class": lambda dt: LinearAttentionState(
                CountSketch(D, 16, seed=3), N_TARGETS, dtype=dt
            ),
        },
    ),
    Spec(
        "OnlineRidgeLeverage",
        lambda dt: OnlineRidgeLeverage(D, 1e-2, dtype=dt),
        {
            "ridge": lambda dt: OnlineRidgeLeverage(D, 2e-2, dtype=dt),
            "refactor_every": lambda dt: OnlineRidgeLeverage(D, 1e-2, dtype=dt, refactor_every=7),
            "n_features": lambda dt: OnlineRidgeLeverage(D + 1, 1e-2, dtype=dt),
            "dtype": lambda dt: OnlineRidgeLeverage(D, 1e-2, dtype=_other(dt)),
        },
    ),
    Spec(
        "FrequentDirections",
        lambda dt: FrequentDirections(D, 3, dtype=dt),
        {
            "sketch_size": lambda dt: FrequentDirections(D, 2, dtype=dt),
            "n_features": lambda dt: FrequentDirections(D + 1, 3, dtype=dt),
            "dtype": lambda dt: FrequentDirections(D, 3, dtype=_other(dt)),
        },
    ),
    Spec(
        "UniversalSet",
        lambda dt: UniversalSet(D, 0.2, dtype=dt),
        {
            "eps": lambda dt: UniversalSet(D, 0.3, dtype=dt),
            "p": lambda dt: UniversalSet(D, 0.2, p=1.0, dtype=dt),
            "ridge": lambda dt: UniversalSet(D, 0.2, ridge=1e-3, dtype=dt),
            "capacity": lambda dt: UniversalSet(D, 0.2, capacity=4, dtype=dt),
            "dtype": lambda dt: UniversalSet(D, 0.2, dtype=_other(dt)),
        },
    ),
    Spec("UniversalSet-p1", lambda dt: UniversalSet(D, 0.3, p=1.0, dtype=dt)),
    Spec("UniversalSet-p3", lambda dt: UniversalSet(D, 0.3, p=3.0, dtype=dt)),
    Spec("UniversalSet-capacity", lambda dt: UniversalSet(D, 0.0, capacity=4, dtype=dt)),
    Spec(
        "MergeReduce-FD",
        lambda dt: MergeReduce(lambda: FrequentDirections(D, 3, dtype=dt), 4),
        {
            "leaf_size": lambda dt: MergeReduce(lambda: FrequentDirections(D, 3, dtype=dt), 5),
            "reducer size": lambda dt: MergeReduce(lambda: FrequentDirections(D, 2, dtype=dt), 4),
            "reducer dtype": lambda dt: MergeReduce(
                lambda: FrequentDirections(D, 3, dtype=_other(dt)), 4
            ),
        },
    ),
    Spec(
        "MergeReduce-US",
        lambda dt: MergeReduce(lambda: UniversalSet(D, 0.2, dtype=dt), 4),
        {
            "reducer class": lambda dt: MergeReduce(lambda: FrequentDirections(D, 3, dtype=dt), 4),
        },
    ),
]
SPEC_IDS = [s.name for s in SPECS]


def _rows_of(X: Any) -> int:
    try:
        shape = np.shape(X)
    except Exception:
        return 1
    return int(shape[0]) if len(shape) >= 1 else 1


def feed(sk: Any, X: Any) -> Any:
    """``extend`` (with targets for the linear-attention state)."""
    if isinstance(sk, LinearAttentionState):
        return sk.extend(X, np.ones((_rows_of(X), sk.n_targets)))
    return sk.extend(X)


def feed_row(sk: Any, x: Any) -> Any:
    if isinstance(sk, LinearAttentionState):
        return sk.update(x, np.ones(N_TARGETS))
    return sk.update(x)


def _prefix(rng: np.random.Generator, n: int = 9) -> np.ndarray:
    X = rng.standard_normal((n, D))
    X[2] *= 30.0  # one heavy row, so the sets are not empty
    return X


def _started(spec: Spec, dtype: Any, rng: np.random.Generator) -> Any:
    sk = spec.make(dtype)
    feed(sk, _prefix(rng))
    return sk


def _assert_refused(call, sk, exc, match, *others):
    before = [o.to_bytes() for o in (sk, *others)]
    n_seen = sk.n_seen
    with pytest.raises(exc, match=match):
        call()
    assert sk.n_seen == n_seen
    assert [o.to_bytes() for o in (sk, *others)] == before


# ---------------------------------------------------------------------------
# refused rows


def _with(value, where):
    def build(rng):
        X = rng.standard_normal((6, D))
        X[where] = value
        return X

    return build


BAD_BLOCKS = [
    ("1-D", lambda rng: rng.standard_normal(D), ValueError, r"X must be 2-D"),
    ("3-D", lambda rng: rng.standard_normal((2, 3, D)), ValueError, r"X must be 2-D"),
    ("scalar", lambda rng: 1.5, ValueError, r"X must be 2-D"),
    ("wide", lambda rng: rng.standard_normal((3, D + 1)), ValueError, rf"X must have {D} col"),
    ("narrow-empty", lambda rng: np.zeros((0, D - 1)), ValueError, rf"X must have {D} col"),
    ("bool", lambda rng: np.ones((3, D), bool), TypeError, r"X must have a float32"),
    ("complex", lambda rng: np.ones((3, D), complex), TypeError, r"X must have a float32"),
    ("object", lambda rng: np.full((3, D), 1.0, dtype=object), TypeError, r"X must have"),
    ("float16", lambda rng: np.ones((3, D), np.float16), TypeError, r"X must have a float32"),
    (
        "datetime",
        lambda rng: np.zeros((3, D), dtype="datetime64[s]"),
        TypeError,
        r"X must have a float32",
    ),
    ("str", lambda rng: "1 2 3 4 5", TypeError, r"X must be a numeric array"),
    ("bytes", lambda rng: b"\x00" * 40, TypeError, r"X must be a numeric array"),
    ("ragged", lambda rng: [[1.0] * D, [1.0] * (D - 1)], TypeError, r"X could not be converted"),
    ("None", lambda rng: None, TypeError, r"X must have"),
    (
        "masked",
        lambda rng: np.ma.masked_array(np.ones((2, D)), mask=np.eye(2, D, dtype=bool)),
        TypeError,
        r"X must be a plain array",
    ),
    ("NaN row", _with(np.nan, 3), ValueError, r"X contains NaN or Inf \(first at index \[3, 0\]"),
    ("+Inf", _with(np.inf, (4, 2)), ValueError, r"X contains NaN or Inf \(first at index \[4, 2\]"),
    (
        "-Inf",
        _with(-np.inf, (0, 4)),
        ValueError,
        r"X contains NaN or Inf \(first at index \[0, 4\]",
    ),
    ("NaN chunk", _with(np.nan, slice(None)), ValueError, r"X contains NaN or Inf"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [case[1:] for case in BAD_BLOCKS],
    ids=[case[0] for case in BAD_BLOCKS],
)
def test_extend_refuses_and_leaves_state(spec, dtype, build, exc, match, rng):
    sk = _started(spec, dtype, rng)
    X = build(rng)
    _assert_refused(lambda: feed(sk, X), sk, exc, match)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_torch_tensors_refused_by_the_numpy_core(spec, dtype, rng):
    """Policy: no silent host copy of device memory; the error says how to convert."""
    sk = _started(spec, dtype, rng)
    X = torch.ones(3, D)
    _assert_refused(lambda: feed(sk, X), sk, TypeError, r"X must be a numpy array.*numpy\(\)")
    _assert_refused(lambda: feed_row(sk, X[0]), sk, TypeError, r"x must be a numpy array")


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_values_beyond_float32_refused_by_float32_sketches(spec, rng):
    sk = _started(spec, np.float32, rng)
    X = rng.standard_normal((4, D))
    X[1, 1] = 1e39  # finite in float64, Inf once cast
    _assert_refused(lambda: feed(sk, X), sk, ValueError, r"X has values beyond the float32")


def _row_with(value, i):
    def build(rng):
        x = rng.standard_normal(D)
        x[i] = value
        return x

    return build


BAD_ROWS = [
    ("2-D", lambda rng: rng.standard_normal((1, D)), ValueError, r"x must be 1-D"),
    ("scalar", lambda rng: 2.0, ValueError, r"x must be 1-D"),
    ("short", lambda rng: rng.standard_normal(D - 1), ValueError, rf"x must have length {D}"),
    ("empty", lambda rng: np.zeros(0), ValueError, rf"x must have length {D}"),
    ("bool", lambda rng: np.ones(D, bool), TypeError, r"x must have a float32"),
    ("complex", lambda rng: np.ones(D, complex), TypeError, r"x must have a float32"),
    ("str", lambda rng: "abcde", TypeError, r"x must be a numeric array"),
    ("NaN", _row_with(np.nan, 2), ValueError, r"x contains NaN or Inf \(first at index \[2\]"),
    ("Inf", _row_with(np.inf, 0), ValueError, r"x contains NaN or Inf \(first at index \[0\]"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize(
    ("build", "exc", "match"), [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS]
)
def test_update_refuses_and_leaves_state(spec, dtype, build, exc, match, rng):
    sk = _started(spec, dtype, rng)
    x = build(rng)
    _assert_refused(lambda: feed_row(sk, x), sk, exc, match)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("make_y", "exc", "match"),
    [
        (lambda Y: np.where(np.arange(N_TARGETS) == 1, np.nan, Y), ValueError, r"Y contains NaN"),
        (lambda Y: Y[:3], ValueError, r"X and Y must have as many rows"),
        (lambda Y: np.ones((4, 3)), ValueError, r"Y must have 2 columns"),
        (lambda Y: Y.astype(bool), TypeError, r"Y must have a float32"),
        (lambda Y: Y[:, 0], ValueError, r"Y must be 2-D"),
    ],
    ids=["NaN", "rows", "width", "bool", "1-D"],
)
def test_linear_attention_state_checks_targets(dtype, make_y, exc, match, rng):
    sk = _started(SPECS[3], dtype, rng)
    X = rng.standard_normal((4, D))
    Y = make_y(np.ones((4, N_TARGETS)))
    _assert_refused(lambda: sk.extend(X, Y), sk, exc, match)
    _assert_refused(lambda: sk.update(X[0], np.ones(3)), sk, ValueError, r"y must have length 2")


# ---------------------------------------------------------------------------
# accepted conversions: bit-identical to the canonical array


def _canonical(X: Any, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X, dtype=np.float64).astype(dtype))


def _readonly(X: np.ndarray) -> np.ndarray:
    X = X.copy()
    X.flags.writeable = False
    return X


CONVERSIONS = [
    ("int64", lambda G: np.round(G * 3).astype(np.int64)),
    ("int32", lambda G: np.round(G * 3).astype(np.int32)),
    ("uint8", lambda G: np.abs(np.round(G * 3)).astype(np.uint8)),
    ("big-endian int", lambda G: np.round(G * 3).astype(">i8")),
    ("list", lambda G: G.tolist()),
    ("tuple", lambda G: tuple(map(tuple, G))),
    ("fortran", lambda G: np.asfortranarray(G)),
    ("row-strided", lambda G: np.repeat(G, 2, axis=0)[::2]),
    ("col-strided", lambda G: np.repeat(G, 2, axis=1)[:, ::2]),
    ("reversed", lambda G: G[::-1]),
    ("read-only", _readonly),
    ("float32 input", lambda G: G.astype(np.float32)),
    ("float64 input", lambda G: G.astype(np.float64)),
    ("big-endian float", lambda G: G.astype(">f8")),
    ("matrix", lambda G: np.asmatrix(G)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("convert", [c[1] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_accepted_layouts_and_dtypes_match_canonical(spec, dtype, convert, rng):
    G = rng.standard_normal((7, D)) * 4
    X = convert(G)
    snapshot = np.array(X, dtype=np.float64, copy=True)
    a, b = (_started(spec, dtype, np.random.default_rng(0)) for _ in range(2))
    feed(a, X)
    feed(b, _canonical(snapshot, dtype))
    assert a.to_bytes() == b.to_bytes()
    assert np.array_equal(np.asarray(X, dtype=np.float64), snapshot)  # input not written


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_update_conversions_and_update_equals_extend_of_one_row(spec, dtype, rng):
    G = rng.standard_normal((4, D)) * 4
    rows = [np.round(G[0] * 3).astype(np.int64), G[1].tolist(), G[:, 2 % D].repeat(2)[:D], G[3]]
    rows.append(_readonly(G[2]))
    rows.append(np.repeat(G[1], 2)[::2])  # strided
    a, b = (_started(spec, dtype, np.random.default_rng(0)) for _ in range(2))
    for x in rows:
        feed_row(a, x)
        feed(b, _canonical(x, dtype)[None, :])
    assert a.to_bytes() == b.to_bytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_empty_block_is_a_no_op(spec, dtype, rng):
    sk = _started(spec, dtype, rng)
    before = sk.to_bytes()
    for empty in (np.zeros((0, D)), np.zeros((0, D), np.int32), np.zeros((0, D), np.float32)):
        out = feed(sk, empty)
        if isinstance(sk, OnlineRidgeLeverage):
            assert out.shape == (0,)
    assert sk.to_bytes() == before


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_input_is_not_retained(spec, rng):
    """The sketch copies what it keeps: writing into the caller's array later changes nothing."""
    X = rng.standard_normal((9, D)) * 5
    a, b = spec.make(np.float64), spec.make(np.float64)
    feed(a, X)
    feed(b, X.copy())
    X[...] = np.nan
    assert a.to_bytes() == b.to_bytes()


# ---------------------------------------------------------------------------
# streams with exact references: zero, rank-deficient, tiny, huge, mixed


def _stream(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = 36
    G = rng.standard_normal((n, D))
    G[5] *= 20.0
    if kind == "gaussian":
        return G
    if kind == "zeros":
        G[::3] = 0.0
        G[10:20] = 0.0
        return G
    if kind == "rank2":
        return rng.standard_normal((n, 2)) @ rng.standard_normal((2, D))
    if kind == "tiny":
        return G * 1e-30
    if kind == "huge":
        return G * 1e30
    if kind == "mixed":
        return G * np.array([1e-30, 1.0, 1e30])[np.arange(n) % 3, None]
    raise AssertionError(kind)


STREAMS = ["gaussian", "zeros", "rank2", "tiny", "huge", "mixed"]

# Cases the library refuses, with the reason; every other cell must match its
# exact reference. Messages must name X and the state must stay as it was.
REFUSED = {
    # ridge 1e-2 against rows of norm 1e30: I + X M^-1 X^T is not positive
    # definite in float64 (cond ~ 1e64); the error asks for a larger ridge.
    ("OnlineRidgeLeverage", "huge"): r"X: the stream is too ill-conditioned",
    ("OnlineRidgeLeverage", "mixed"): r"X: the stream is too ill-conditioned",
    # degree-2 features of rows of norm 1e30 are 1e60: beyond float32.
    ("LinearAttentionState", "huge", "f32"): r"X, Y are too large",
    ("LinearAttentionState", "mixed", "f32"): r"X, Y are too large",
}


def _tol(dtype: Any) -> float:
    return 1e-10 if np.dtype(dtype) == np.float64 else 2e-5


def _check_linear(sk, X, dtype):
    S = sk.sketch_matrix(X.shape[0]).astype(np.float64)
    ref = S @ X
    bound = _tol(dtype) * (np.abs(S) @ np.abs(X)) + np.finfo(dtype).tiny
    assert np.all(np.abs(sk.result() - ref) <= bound)


def _check_las(sk, X, dtype):
    phi = sk.feature_map.transform(X)
    Y = np.ones((X.shape[0], N_TARGETS))
    S, z = sk.result()
    tiny = np.finfo(dtype).tiny * 16  # float32 flushes 1e-60 features to zero
    assert np.all(np.abs(S - phi.T @ Y) <= _tol(dtype) * (np.abs(phi).T @ Y) + tiny)
    assert np.all(np.abs(z - phi.sum(0)) <= _tol(dtype) * np.abs(phi).sum(0) + tiny)


def _exact_online(X, ridge):
    M = ridge * np.eye(X.shape[1])
    out = np.empty(len(X))
    for t, x in enumerate(X):
        M += np.outer(x, x)
        out[t] = x @ np.linalg.solve(M, x)
    return out, M


def _check_online(sk, X, dtype, scores):
    ref, M = _exact_online(X, sk.ridge)
    np.testing.assert_allclose(scores, ref, rtol=1e-8 if dtype == np.float64 else 1e-4, atol=1e-300)
    np.testing.assert_allclose(sk.gram, M, rtol=1e-12, atol=1e-12 * np.abs(M).max())
    assert np.all((scores >= 0) & (scores < 1))


def _check_fd(fd, X, dtype):
    B = fd.sketch().astype(np.float64)
    frob = float(np.sum(X * X))
    E = X.T @ X - B.T @ B
    eig = np.linalg.eigvalsh(0.5 * (E + E.T))
    slack = (1e-9 if dtype == np.float64 else 1e-5) * frob
    assert eig[0] >= -slack
    assert eig[-1] <= fd.error_bound + slack
    assert fd.error_bound <= frob / fd.sketch_size * (1 + 1e-9) + slack


def _exact_leverage(X):
    return leverage_scores(X) if np.any(X) else np.zeros(len(X))


def _check_universal(us, X, dtype, spec_name):
    assert us.n_kept <= us.max_kept
    assert np.all(np.diff(us.indices) > 0)
    assert np.all((us.scores >= us.eps) & (us.scores <= 1.0))
    kept = set(us.indices.tolist())
    if spec_name == "UniversalSet":
        tau = _exact_leverage(X)
        clear = np.abs(tau - us.eps) > 1e-6
        want = set(np.flatnonzero((tau >= us.eps) & clear).tolist())
        assert want <= kept
        assert kept & set(np.flatnonzero(clear).tolist()) == want
        np.testing.assert_allclose(us.scores, tau[us.indices], rtol=1e-6, atol=1e-9)
    elif spec_name == "UniversalSet-capacity":
        # The per-row rule: a loop of update() gives the same set.
        loop = UniversalSet(D, us.eps, capacity=us.capacity, dtype=dtype)
        for x in X:
            loop.update(x)
        assert np.array_equal(loop.indices, us.indices)
        np.testing.assert_allclose(loop.scores, us.scores, rtol=1e-6)
    else:
        # p != 2: every key whose sensitivity provably reaches eps is kept. A
        # lower bound on the sensitivity of key j is its weight for the query
        # q = M^+ k_j.
        p = us.p
        Q = np.linalg.pinv(X.T @ X, rcond=1e-12) @ X.T
        with np.errstate(all="ignore"):
            W = np.abs(X @ Q) ** p
            low = np.diag(W) / W.sum(axis=0)
        heavy = np.flatnonzero(np.nan_to_num(low) >= us.eps * (1 + 1e-6))
        assert set(heavy.tolist()) <= kept


def _check(spec, sk, X, dtype, out):
    name = spec.name
    if name in ("CountSketch", "GaussianSketch", "SRHT"):
        _check_linear(sk, X, dtype)
    elif name == "LinearAttentionState":
        _check_las(sk, X, dtype)
    elif name == "OnlineRidgeLeverage":
        _check_online(sk, X, dtype, out)
    elif name == "FrequentDirections":
        _check_fd(sk, X, dtype)
    elif name.startswith("UniversalSet"):
        _check_universal(sk, X, dtype, name)
    elif name == "MergeReduce-FD":
        _check_fd(sk.result(), X, dtype)
    elif name == "MergeReduce-US":
        flat = UniversalSet(D, 0.2, dtype=dtype).extend(X)
        assert np.array_equal(sk.result().indices, flat.indices)
    else:  # pragma: no cover
        raise AssertionError(name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_streams_match_exact_reference_or_are_refused(spec, kind, dtype, rng):
    X = _stream(kind, rng).astype(dtype).astype(np.float64)  # the values the sketch sees
    sk = spec.make(dtype)
    tag = "f64" if dtype == np.float64 else "f32"
    refused = REFUSED.get((spec.name, kind)) or REFUSED.get((spec.name, kind, tag))
    if refused:
        # The first block is fine; the refused one leaves the state as it was.
        _assert_refused(lambda: feed(sk, X), sk, ValueError, refused)
        return
    outs = [feed(sk, X[lo : lo + 13]) for lo in range(0, X.shape[0], 13)]
    out = np.concatenate(outs) if isinstance(outs[0], np.ndarray) else None
    assert sk.n_seen == X.shape[0]
    _check(spec, sk, X, dtype, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_online_scores_invariant_when_rows_and_ridge_scale_together(dtype, scale, rng):
    """(c X, c^2 ridge) is the same problem as (X, ridge): extreme scales lose nothing."""
    X = rng.standard_normal((300, D))
    X[::7] *= 20.0
    Xs = (X * scale).astype(dtype)
    X = (Xs.astype(np.float64) / scale).astype(dtype)  # the same rounded rows
    base = OnlineRidgeLeverage(D, 1e-2, dtype=dtype).extend(X)
    scaled = OnlineRidgeLeverage(D, 1e-2 * scale**2, dtype=dtype).extend(Xs)
    np.testing.assert_allclose(scaled, base, rtol=1e-9 if dtype == np.float64 else 1e-5)


def test_capacity_set_with_scales_1e60_apart_equals_row_by_row():
    # Regression: capacity mode simulated 256-row blocks through a Cholesky of
    # I + Y Y^T that loses its identity when whitened keys reach ~1e8; it now
    # falls back to one row at a time, which is exact.
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, D)) * np.array([1.0, 1e30])[np.arange(300) % 2, None]
    block = UniversalSet(D, 0.0, capacity=6).extend(X)
    loop = UniversalSet(D, 0.0, capacity=6)
    for x in X:
        loop.update(x)
    assert np.array_equal(block.indices, loop.indices)


# ---------------------------------------------------------------------------
# merge


def _merge_cases():
    for spec in SPECS:
        for label, make in spec.incompatible.items():
            # Another class anywhere (the map, the reducer) is a TypeError.
            exc = TypeError if "class" in label else ValueError
            yield pytest.param(spec, make, exc, id=f"{spec.name}-{label}")
        foreign = SPECS[1] if spec is SPECS[0] else SPECS[0]
        yield pytest.param(spec, foreign.make, TypeError, id=f"{spec.name}-class")
        yield pytest.param(spec, lambda dt: np.ones((3, D)), TypeError, id=f"{spec.name}-array")
        yield pytest.param(spec, lambda dt: None, TypeError, id=f"{spec.name}-None")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(("spec", "make_other", "exc"), list(_merge_cases()))
def test_merge_refuses_incompatible_and_leaves_both(spec, make_other, exc, dtype, rng):
    sk = _started(spec, dtype, rng)
    other = make_other(dtype)
    others = ()
    if hasattr(other, "extend"):
        try:
            feed(other, rng.standard_normal((5, other.n_features)))
        except TypeError:
            pass
        others = (other,)
    _assert_refused(lambda: sk.merge(other), sk, exc, r"other", *others)


def _near_overflow(spec: Spec):
    """A sketch whose state is finite but doubles past the dtype's range."""
    e1 = np.eye(1, D)
    if spec.name == "OnlineRidgeLeverage":
        sk = OnlineRidgeLeverage(D, 1e300)
        sk.extend(1e154 * e1)  # M[0, 0] ~ 1e308
        return sk
    if spec.name == "FrequentDirections":
        return FrequentDirections(D, 3, dtype=np.float32).extend(7e37 * e1)  # limit 8.5e37
    sk = spec.make(np.float32)
    if spec.name == "LinearAttentionState":
        peak = float(np.abs(sk.feature_map.transform(e1)).max())  # degree-2 features
        for _ in range(6):
            feed(sk, np.sqrt(3e37 / peak) * e1)
        return sk
    peak = float(np.abs(sk.sketch_matrix(1)).max())
    for _ in range(6):  # the same position six times: the largest entry reaches 1.8e38
        sk.extend(3e37 / peak * e1, start_index=0)
    return sk


@pytest.mark.parametrize("spec", SPECS[:6], ids=SPEC_IDS[:6])
def test_merge_that_would_overflow_is_refused(spec):
    sk = _near_overflow(spec)
    twin = sk.copy()
    _assert_refused(lambda: sk.merge(twin), sk, ValueError, r"other", twin)


def test_merge_of_disjoint_positions_only():
    rng = np.random.default_rng(0)
    us = UniversalSet(D, 0.2).extend(_prefix(rng))
    _assert_refused(lambda: us.merge(us.copy()), us, ValueError, r"other holds stream position")


# ---------------------------------------------------------------------------
# functions and read-outs


G40 = np.random.default_rng(7).standard_normal((40, D))


def _fed(make):
    def build():
        sk = make()
        feed(sk, G40)
        return sk

    return build


def _function_cases():
    """(label, fn(array) -> ndarray, argument name, scale law ``f(cX) = c^k f(X)``)."""
    ols = _fed(lambda: OnlineRidgeLeverage(D, 1e-2))()
    fd = _fed(lambda: FrequentDirections(D, 3))()
    las = _fed(lambda: LinearAttentionState(PolySketch(D, 2, 6, seed=2), N_TARGETS))()
    return [
        ("countsketch", lambda A: countsketch(A, 8, seed=1), "A", 1),
        ("leverage exact", lambda A: leverage_scores(A), "A", 0),
        (
            "leverage sketch",
            lambda A: leverage_scores(A, method="sketch", sketch_size=16, seed=1),
            "A",
            0,
        ),
        ("lewis p=1", lambda A: lewis_weights(A, 1.0), "A", 0),
        ("lewis p=3", lambda A: lewis_weights(A, 3.0), "A", 0),
        ("CountSketch.transform", CountSketch(D, 8, seed=1).transform, "X", 1),
        ("GaussianSketch.transform", GaussianSketch(D, 8, seed=1).transform, "X", 1),
        ("SRHT.transform", SRHT(D, 8, seed=1).transform, "X", 1),
        ("TensorSketch.transform", TensorSketch(D, 2, 8, seed=1).transform, "X", 2),
        ("PolySketch.transform", PolySketch(D, 4, 6, seed=1).transform, "X", 4),
        ("PolySketch.inner_transform", PolySketch(D, 4, 6, seed=1).inner_transform, "X", 2),
        ("OnlineRidgeLeverage.scores", ols.scores, "X", 2),
        ("FrequentDirections.ridge_leverage", lambda X: fd.ridge_leverage(X, 0.1), "X", 2),
        ("LinearAttentionState.query", lambda Q: las.query(Q, normalize=False), "Q", 2),
    ]


FUNCTIONS = _function_cases()
FUNC_IDS = [f[0] for f in FUNCTIONS]


def _function_bad_cases():
    for label, fn, arg, _ in FUNCTIONS:
        for case, build, exc, match in BAD_BLOCKS:
            # Any width is valid for the one-shot functions.
            if "col" in match and label.startswith(("leverage", "lewis", "countsketch")):
                continue
            yield pytest.param(fn, arg, build, exc, match, id=f"{label}-{case}")


@pytest.mark.parametrize(("fn", "arg", "build", "exc", "match"), list(_function_bad_cases()))
def test_functions_refuse_bad_arrays_naming_the_argument(fn, arg, build, exc, match):
    X = build(np.random.default_rng(3))
    snapshot = np.array(X, copy=True) if isinstance(X, np.ndarray) else None
    with pytest.raises(exc, match=match.replace("X ", arg + " ", 1)):
        fn(X)
    if snapshot is not None:
        np.testing.assert_array_equal(X, snapshot)  # not written, even on failure


@needs_torch
@pytest.mark.parametrize(("label", "fn", "arg", "power"), FUNCTIONS, ids=FUNC_IDS)
def test_functions_refuse_torch_tensors(label, fn, arg, power):
    with pytest.raises(TypeError, match=rf"{arg} must be a numpy array.*numpy\(\)"):
        fn(torch.from_numpy(G40))


@pytest.mark.parametrize(("label", "fn", "arg", "power"), FUNCTIONS, ids=FUNC_IDS)
@pytest.mark.parametrize("convert", [c[1] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_function_conversions_match_canonical(label, fn, arg, power, convert):
    X = convert(G40 * 4)
    snapshot = np.array(X, dtype=np.float64, copy=True)
    got = fn(X)
    kept = np.asarray(X).dtype
    # float32 stays float32 where a function keeps the input's dtype.
    want = fn(
        np.ascontiguousarray(np.asarray(snapshot, dtype=np.float64)).astype(
            np.float32 if kept == np.float32 and label == "countsketch" else np.float64
        )
    )
    if kept == np.float32 and label != "countsketch":
        np.testing.assert_allclose(got, fn(snapshot.astype(np.float32)), rtol=0, atol=0)
    else:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(X, dtype=np.float64), snapshot)


@pytest.mark.parametrize(("label", "fn", "arg", "power"), FUNCTIONS, ids=FUNC_IDS)
@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-200, 1e200])
def test_functions_follow_their_scale_law_or_refuse_overflow(label, fn, arg, power, scale):
    """``f(c X) = c^power f(X)`` to rounding, or a ValueError when ``c^power`` overflows."""
    base = fn(G40)
    factor = float(scale) ** power if abs(power * np.log10(scale)) < 300 else None
    if factor is None or not np.all(np.isfinite(base * factor)):
        try:
            out = fn(G40 * scale)
        except ValueError as exc:
            assert "too large" in str(exc) and arg in str(exc)
            return
        assert np.all(np.isfinite(out))
        return
    out = fn(G40 * scale)
    tiny = 1e-300 if factor < 1e-250 else 0.0
    np.testing.assert_allclose(
        out, base * factor, rtol=1e-8, atol=max(tiny, 1e-12 * np.abs(base * factor).max())
    )


def test_function_edge_shapes():
    empty = np.zeros((0, D))
    assert countsketch(empty, 8, seed=0).shape == (8, D)
    assert leverage_scores(empty).shape == (0,)
    assert lewis_weights(empty, 1.0).shape == (0,)
    assert TensorSketch(D, 2, 8, seed=0).transform(empty).shape == (0, 8)
    assert PolySketch(D, 2, 4, seed=0).transform(empty).shape == (0, 16)
    for sk in (CountSketch(D, 8, seed=0), GaussianSketch(D, 8, seed=0), SRHT(D, 8, seed=0)):
        assert sk.transform(empty).shape == (0, 8)
    # No columns: scores of a zero-dimensional space are zero; a sketch needs one.
    assert np.array_equal(leverage_scores(np.zeros((3, 0))), np.zeros(3))
    assert np.array_equal(lewis_weights(np.zeros((3, 0)), 1.0), np.zeros(3))
    with pytest.raises(ValueError, match="A must have at least one column"):
        countsketch(np.zeros((3, 0)), 8, seed=0)
    # Zero rows score zero.
    Z = np.vstack([G40, np.zeros((2, D))])
    assert np.all(leverage_scores(Z)[-2:] == 0) and np.all(lewis_weights(Z, 1.0)[-2:] == 0)
    # NaN in a one-shot sketch is reported against the caller's argument name.
    bad = G40.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"A contains NaN or Inf \(first at index \[3, 1\]"):
        countsketch(bad, 8, seed=0)


def test_lp_sensitivity_bound_inputs():
    w = np.array([0.2, 0.5, 1.0])
    for bad, exc, match in (
        (np.ones((2, 2)), ValueError, r"w must be 1-D"),
        (np.array([0.1, np.nan]), ValueError, r"w contains NaN"),
        (np.array([0.1, -0.2]), ValueError, r"w must be non-negative"),
        (np.ones(2, bool), TypeError, r"w must have a float32"),
    ):
        with pytest.raises(exc, match=match):
            lp_sensitivity_bound(bad, 1.0, 2)
    assert np.array_equal(lp_sensitivity_bound([1, 0, 2], 1.0, 2), [1.0, 0.0, 1.0])
    assert np.array_equal(
        lp_sensitivity_bound(w[::-1], 3.0, 2), lp_sensitivity_bound(w, 3.0, 2)[::-1]
    )
    assert lp_sensitivity_bound(np.zeros(0), 1.0, 2).shape == (0,)


def test_frequent_directions_float32_covariance_overflow_is_named():
    fd = FrequentDirections(D, 2, dtype=np.float32).extend(G40 * 1e30)
    with pytest.raises(ValueError, match="covariance overflows float32"):
        fd.covariance()
    B = fd.sketch().astype(np.float64)  # the state itself is fine
    assert np.isfinite(B).all() and np.isfinite(B.T @ B).all()


def test_blob_arguments():
    blob = CountSketch(D, 8, seed=0).to_bytes()
    from streamsketch import load

    for good in (bytearray(blob), memoryview(blob)):
        assert load(good).to_bytes() == blob
    for bad in ("text", None, 3, np.frombuffer(blob, np.uint8), [1, 2]):
        with pytest.raises(TypeError, match="blob must be bytes"):
            load(bad)
        with pytest.raises(TypeError, match="blob must be bytes"):
            CountSketch.from_bytes(bad)


# ---------------------------------------------------------------------------
# the torch KV adapter: KeySelector and its scorers

KV_SCORERS = ["window", "knorm", "leverage", "query", "leverage+query"]


def _kv_stream(n, B=1, Hkv=2, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, n, d, generator=gen)
    k = torch.randn(B, Hkv, n, d, generator=gen)
    v = torch.randn(B, Hkv, n, d, generator=gen)
    return q, k, v


def _selector(scorer):
    return KeySelector(2, 8, 6, sinks=2, window=4, scorer=scorer)


def _kv_snapshot(sel):
    snap = {"n_seen": sel.n_seen}
    for name in ("keys", "values", "positions"):
        snap[name] = getattr(sel, name).clone()
    for name, t in sel.scorer.state().items():
        snap["scorer." + name] = t.clone()
    return snap


def _kv_same(a, b):
    return a.keys() == b.keys() and all(
        (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]) for k in a
    )


if torch is not None:
    from streamsketch.kv import SCORERS, KeySelector

    def _bad_kv_calls(q, k, v):
        c = slice(20, 23)
        qc, kc, vc = q[:, :, c], k[:, :, c], v[:, :, c]
        return [
            ("keys", TypeError, r"keys must be a torch.Tensor", (kc.numpy(), vc, qc)),
            ("keys", TypeError, r"keys must be a floating-point", (kc.long(), vc, qc)),
            ("keys", TypeError, r"keys must be a floating-point", (kc > 0, vc, qc)),
            ("keys", TypeError, r"keys must be a floating-point", (kc.to(torch.complex64), vc, qc)),
            ("keys", ValueError, r"keys must have shape", (kc[0], vc, qc)),
            ("keys", ValueError, r"keys must have shape", (kc[:, :1], vc[:, :1], qc)),
            ("keys", ValueError, r"keys must have head dim", (kc[..., :4], vc, qc)),
            (
                "keys",
                ValueError,
                r"keys must hold at least one",
                (kc[:, :, :0], vc[:, :, :0], qc[:, :, :0]),
            ),
            ("values", TypeError, r"values must be a torch.Tensor", (kc, vc.numpy(), qc)),
            ("values", TypeError, r"values must be a floating-point", (kc, vc.int(), qc)),
            ("values", ValueError, r"values must match keys", (kc, vc[:, :, :2], qc)),
            ("queries", TypeError, r"queries must be a torch.Tensor", (kc, vc, qc.numpy())),
            ("queries", TypeError, r"queries must be a floating-point", (kc, vc, qc.long())),
            ("queries", ValueError, r"queries", (kc, vc, qc[:, :3])),
            (
                "batch",
                ValueError,
                r"batch size changed",
                (kc.repeat(2, 1, 1, 1), vc.repeat(2, 1, 1, 1), qc.repeat(2, 1, 1, 1)),
            ),
        ]


@needs_torch
@pytest.mark.parametrize("scorer", KV_SCORERS)
def test_kv_selector_refuses_bad_tensors_and_leaves_state(scorer):
    q, k, v = _kv_stream(40)
    sel = _selector(scorer)
    sel.update(k[:, :, :20], v[:, :, :20], queries=q[:, :, :20])
    snap = _kv_snapshot(sel)
    for _, exc, match, (kk, vv, qq) in _bad_kv_calls(q, k, v):
        with pytest.raises(exc, match=match):
            sel.update(kk, vv, queries=qq)
        assert _kv_same(_kv_snapshot(sel), snap)
    # The selector still works afterwards.
    sel.update(k[:, :, 20:], v[:, :, 20:], queries=q[:, :, 20:])
    assert sel.n_seen == 40 and len(sel) == sel.capacity


def _spoil(t, rows, value):
    t = t.clone()
    for r in rows:
        t[0, 0, r, 1] = value
    return t


@needs_torch
@pytest.mark.parametrize("scorer", KV_SCORERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("where", ["keys", "queries", "values"])
def test_kv_non_finite_rows_are_neutralised_without_host_sync(scorer, value, where):
    """Documented conversion: a non-finite row enters the scorer state as a zero row,
    and a candidate with a non-finite key or value is evicted first."""
    q, k, v = _kv_stream(60)
    bad = [25, 26, 33]
    spoiled = {"keys": k, "queries": q, "values": v}
    spoiled[where] = _spoil(spoiled[where], bad, value)
    zeroed = {"keys": k.clone(), "queries": q.clone(), "values": v.clone()}
    if where != "values":  # values never enter the state
        for r in bad:
            zeroed[where][0, 0, r] = 0.0  # the row as the scorer state sees it
    a, b = _selector(scorer), _selector(scorer)
    for lo in range(0, 60, 10):
        sl = slice(lo, lo + 10)
        a.update(
            spoiled["keys"][:, :, sl], spoiled["values"][:, :, sl], spoiled["queries"][:, :, sl]
        )
        b.update(zeroed["keys"][:, :, sl], zeroed["values"][:, :, sl], zeroed["queries"][:, :, sl])
        for t in a.scorer.state().values():
            assert torch.isfinite(t).all()
    for name, t in a.scorer.state().items():
        assert torch.equal(t, b.scorer.state()[name]), name
    if where in ("keys", "values") and not np.isfinite(value):
        # Long out of the window: a non-finite key/value pair was evicted first.
        assert not (a.positions[0, 0][:, None] == torch.tensor(bad)).any()
        assert torch.isfinite(a.keys).all() and torch.isfinite(a.values).all()


@needs_torch
@pytest.mark.parametrize("scorer", KV_SCORERS)
def test_kv_accepted_layouts_and_dtypes(scorer):
    q, k, v = _kv_stream(40)
    a, b = _selector(scorer), _selector(scorer)
    for sel in (a, b):
        sel.update(k[:, :, :20], v[:, :, :20], queries=q[:, :, :20])
    c = slice(20, 40)
    # float64 and non-contiguous chunks: converted to the selector's float32 and copied.
    kk = k[:, :, c].double().transpose(2, 3).contiguous().transpose(2, 3)
    a.update(
        kk, v[:, :, c].double(), queries=q[:, :, c].transpose(2, 3).contiguous().transpose(2, 3)
    )
    b.update(k[:, :, c].contiguous(), v[:, :, c].contiguous(), queries=q[:, :, c].contiguous())
    assert a.keys.dtype == torch.float32
    sa, sb = _kv_snapshot(a), _kv_snapshot(b)
    for name in ("keys", "values", "positions", "n_seen"):
        assert _kv_same({name: sa.pop(name)}, {name: sb.pop(name)})
    for name, t in sa.items():  # another memory layout may round the products differently
        torch.testing.assert_close(t, sb[name], rtol=1e-6, atol=1e-6)


@needs_torch
def test_kv_scorer_merge_refuses_and_leaves_both():
    from streamsketch.kv import AccumulatedAttentionScorer, LeverageScorer, QueryGaussianScorer

    q, k, _ = _kv_stream(30)

    def fed(cls, B=1, **kw):
        sc = cls(2, 8, **kw)
        sc.observe_keys(k.repeat(B, 1, 1, 1))
        sc.observe_queries(q.repeat(B, 1, 1, 1))
        return sc

    for cls in (LeverageScorer, QueryGaussianScorer):
        sc = fed(cls)
        others = [
            (
                TypeError,
                r"cannot merge",
                fed(LeverageScorer if cls is not LeverageScorer else QueryGaussianScorer),
            ),
            (ValueError, r"other has different heads", cls(2, 4)),
            (ValueError, r"other has different heads", cls(2, 8, scale=0.5)),
            (ValueError, r"other has batch size 2", fed(cls, B=2)),
        ]
        if cls is QueryGaussianScorer:
            others.append((ValueError, r"other has half_life", fed(cls, half_life=4.0)))
        for exc, match, other in others:
            mine = {n: t.clone() for n, t in sc.state().items()}
            theirs = {n: t.clone() for n, t in other.state().items()}
            with pytest.raises(exc, match=match):
                sc.merge(other)
            assert all(torch.equal(t, mine[n]) for n, t in sc.state().items())
            assert all(torch.equal(t, theirs[n]) for n, t in other.state().items())
    with pytest.raises(TypeError, match="cannot be merged"):
        AccumulatedAttentionScorer(2, 8).merge(AccumulatedAttentionScorer(2, 8))
    assert set(SCORERS) >= set(KV_SCORERS)


# ---------------------------------------------------------------------------
# attention functions (stateless, torch)


def _attention_fns():
    from streamsketch.attention import (
        exact_attention,
        hyper_attention,
        lev_attention,
        polysketch_attention,
    )

    return {
        "exact": exact_attention,
        "lev": lambda q, k, v: lev_attention(q, k, v, budget=8, window=4),
        "hyper": lambda q, k, v: hyper_attention(
            q, k, v, block_size=16, sample_size=16, min_seq_len=16, seed=0
        ),
        "poly": lambda q, k, v: polysketch_attention(q, k, v, sketch_size=8, seed=0),
    }


ATTENTION = ["exact", "lev", "hyper", "poly"]


def _qkv(seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))


@needs_torch
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_refuses_bad_tensors_naming_them(name):
    fn = _attention_fns()[name]
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    for args, exc, match in (
        ((q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
        ((q, k.long(), v), TypeError, r"k must be a floating-point"),
        ((q, k, v > 0), TypeError, r"v must be a floating-point"),
        ((q[0], k, v), ValueError, r"q must have shape"),
        ((q, k.double(), v), TypeError, r"share a dtype"),
        ((q, k[..., :4], v), ValueError, r"k must have head dim"),
        ((q, k[:, :, :5], v), ValueError, r"v must match k"),
        ((q[:, :1], k, v), ValueError, r"multiple of k's heads"),
    ):
        with pytest.raises(exc, match=match):
            fn(*args)


@needs_torch
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_nan_query_row_stays_in_its_row(name):
    fn, (q, k, v) = _attention_fns()[name], _qkv(0)
    clean = fn(q, k, v)
    q[0, 1, 9, 3] = float("nan")
    out = fn(q, k, v)
    bad = torch.isnan(out).any(-1)
    assert bad[0, 1, 9] and int(bad.sum()) == 1
    if name != "hyper":  # hyper buckets queries by hash: the others move, but stay finite
        keep = ~bad[..., None].expand_as(out)
        torch.testing.assert_close(out[keep], clean[keep])


@needs_torch
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_layouts_and_empty_inputs(name):
    fn, (q, k, v) = _attention_fns()[name], _qkv(1)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)]
    torch.testing.assert_close(fn(*strided), fn(q, k, v))
    empty = fn(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    assert empty.shape == (1, 2, 0, 8)


@needs_torch
def test_attention_non_finite_keys_policy():
    """lev_attention scores keys, so it refuses non-finite k; the others propagate NaN
    like torch's scaled_dot_product_attention (no device sync to check)."""
    fns, (q, k, v) = _attention_fns(), _qkv(2)
    k[0, 0, 7, 2] = float("nan")
    with pytest.raises(ValueError, match="k must be finite"):
        fns["lev"](q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = fns["exact"](q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    for name in ("hyper", "poly"):
        out = fns[name](q, k, v)
        assert out.shape == q.shape
        assert torch.isfinite(out[0, 1]).all()  # heads without the bad key are untouched
