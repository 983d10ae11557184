"""The merge-and-reduce tree: any mergeable sketch, summarised in O(log n) pieces.

The stream is cut into *leaves* of ``leaf_size`` rows. Each leaf is summarised
by its own reducer (any mergeable :class:`~streamsketch.base.Sketch`); closed
leaves are kept in a Bentley–Saxe binary counter: bucket ``i`` is empty or
holds one reducer summarising ``2^i`` leaves, and closing a leaf carries like
binary addition (two reducers of level ``i`` merge into one of level
``i + 1``). After ``n`` rows there are at most ``⌊log2(n / leaf_size)⌋ + 1``
occupied buckets, and every row has been through at most that many merges.

Error growth: if merging two reducers adds an error ``ε`` (relative, as in
merge-and-reduce coresets where each reduction is a ``(1 + ε)``-coreset of its
input), a row of the final :meth:`MergeReduce.result` went through one reducer
per level plus the final fold, so the errors compound to
``(1 + ε)^{O(log(n / leaf_size))} - 1 = O(ε log(n / leaf_size))``; choose the
per-merge ``ε`` as ``ε_target / log2(n / leaf_size)``. Reducers whose merge is
*exact* in the sense of their guarantee add nothing: with
:class:`~streamsketch.rows.frequent_directions.FrequentDirections` the
shrinkages of all merges add up and the result satisfies
``‖A^T A - B^T B‖_2 ≤ Δ ≤ ‖A - A_k‖_F^2 / (ℓ - k)`` for the whole stream, the
same bound as a flat sketch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _serialization
from .._validation import as_float_matrix, check_int, resolve_start
from ..base import Sketch, load, registered_class

__all__ = ["MergeReduce"]

# 2^i * leaf_size rows in bucket i must stay a sane integer.
_MAX_LEVELS = 62


def _merged(a: Sketch, b: Sketch) -> Sketch:
    """A new reducer summarising ``a`` then ``b``; neither is modified."""
    return a.copy().merge(b)


class MergeReduce(Sketch):
    """Bentley–Saxe merge-and-reduce tree over a mergeable reducer sketch.

    Parameters
    ----------
    make : callable
        ``make()`` returns an empty (``n_seen == 0``) mergeable
        :class:`~streamsketch.base.Sketch`, e.g.
        ``lambda: FrequentDirections(d, 32)``. It is called once; every
        reducer of the tree is a copy of that template, so all of them are
        mutually mergeable even if ``make`` draws a fresh seed each call.
    leaf_size : int
        Rows summarised by one leaf reducer before it is closed into the tree.

    Notes
    -----
    State: the open leaf (fewer than ``leaf_size`` rows) and the buckets;
    bucket ``i`` summarises ``2^i`` closed leaves, each of at least
    ``leaf_size`` rows (a leaf made by merging two trees' open leaves may hold
    up to ``2 leaf_size - 2``).

    Cost: ``extend`` of ``k`` rows is the reducer's own ``extend`` of those
    rows plus, per closed leaf, amortised O(1) reducer merges (binary-counter
    carries), one extra reducer copy when ``k`` crosses a leaf boundary (so a
    failure can be rolled back), and one O(k d) validation pass. Workspace:
    ``nbytes`` is the sum of the live reducers' ``nbytes`` (template, open
    leaf and at most ``⌊log2(n / leaf_size)⌋ + 1`` buckets), so it grows as
    O(log(n / leaf_size)) reducer sizes — not constant, unlike a flat sketch.

    ``extend(X)`` equals row-by-row :meth:`update` whenever the reducer's
    does: leaves close at the same rows and carries merge in the same order.
    See the module docstring for how errors grow over the tree.

    Serialisation: ``to_bytes`` nests the template's, the open leaf's and each
    bucket's own blobs as bytes fields; ``from_bytes`` rebuilds the template
    with :func:`streamsketch.load` (its class must be importable) and
    checks every nested reducer against it.

    Examples
    --------
    >>> import numpy as np
    >>> from streamsketch.rows.frequent_directions import FrequentDirections
    >>> from streamsketch.rows.merge_reduce import MergeReduce
    >>> A = np.random.default_rng(0).standard_normal((5000, 30))
    >>> tree = MergeReduce(lambda: FrequentDirections(30, 10), 256).extend(A)
    >>> fd = tree.result()
    >>> bool(np.linalg.norm(A.T @ A - fd.covariance(), 2) <= fd.error_bound * (1 + 1e-9))
    True
    >>> tree.bucket_levels  # 5000 // 256 = 19 = 0b10011 closed leaves
    [0, 1, 4]
    """

    def __init__(self, make: Callable[[], Sketch], leaf_size: int) -> None:
        if not callable(make):
            raise TypeError(f"make must be a zero-argument callable, got {type(make).__name__}")
        self.leaf_size = check_int(leaf_size, "leaf_size", minimum=1)
        template = make()
        if not isinstance(template, Sketch) or isinstance(template, MergeReduce):
            raise TypeError(f"make() must return a Sketch, got {type(template).__name__}")
        if template.n_seen != 0:
            raise ValueError(f"make() must return an empty sketch, got n_seen={template.n_seen}")
        self._template = template
        self._template_blob = template.to_bytes()
        self.n_features = int(template.n_features)
        self.dtype = getattr(template, "dtype", None)
        self._leaf = template.copy()
        self._buckets: list[Sketch | None] = []
        self._n_seen = 0
        # Reducers that record stream positions (UniversalSet, the linear row
        # sketches) get each row's global position, so leaves closed at
        # different times still merge into the sketch of one stream.
        self._positional = "start_index" in inspect.signature(template.extend).parameters
        self._next_index = 0

    # -- protocol -----------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"leaf_size": self.leaf_size, "reducer": self._template_blob}

    def _state_scalars(self) -> dict[str, int]:
        return {"n_seen": self._n_seen}

    @property
    def nbytes(self) -> int:
        """Bytes of the live reducers: O(log(n_seen / leaf_size)) reducer sizes."""
        live = [self._template, self._leaf, *(b for b in self._buckets if b is not None)]
        return int(sum(r.nbytes for r in live))

    @property
    def reducer_class(self) -> type[Sketch]:
        """Class of the reducers in the tree."""
        return type(self._template)

    @property
    def n_buckets(self) -> int:
        """Occupied buckets: at most ``⌊log2(n_seen / leaf_size)⌋ + 1``."""
        return sum(b is not None for b in self._buckets)

    @property
    def bucket_levels(self) -> list[int]:
        """Levels ``i`` of the occupied buckets (bucket ``i`` holds ``2^i`` leaves)."""
        return [i for i, b in enumerate(self._buckets) if b is not None]

    def make(self) -> Sketch:
        """A new empty reducer, compatible with every reducer of the tree."""
        return self._template.copy()

    # -- streaming ----------------------------------------------------------
    def _validate_rows(self, X: Any, name: str = "X") -> np.ndarray:
        return as_float_matrix(X, name, self.n_features, dtype=self.dtype)

    def extend(self, X: Any, start_index: int | None = None) -> MergeReduce:
        """Consume rows ``X`` of shape ``(k, n_features)``.

        Rows go into the open leaf (the reducer's ``extend``); every time it
        reaches ``leaf_size`` rows it is closed and carried into the buckets.
        If the reducer takes stream positions (its ``extend`` has a
        ``start_index``), every piece is passed its global position:
        ``start_index`` (default: right after the last row consumed) plus its
        offset in ``X``.

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            Bad shape, dtype or NaN/Inf (checked on all of ``X`` first), or
            any error of the reducer. The tree is unchanged.
        """
        X = self._validate_rows(X)
        if start_index is not None and not self._positional:
            raise ValueError(
                "start_index needs a reducer that takes positions; "
                f"{self.reducer_class.__name__} does not"
            )
        start = resolve_start(start_index, self._next_index, X.shape[0])
        k = X.shape[0]
        if k == 0:
            return self

        def feed(leaf: Sketch, lo: int, hi: int) -> None:
            if self._positional:
                leaf.extend(X[lo:hi], start_index=start + lo)
            else:
                leaf.extend(X[lo:hi])

        room = self.leaf_size - self._leaf.n_seen
        if k < room:
            # One reducer call: the reducer itself leaves its state unchanged
            # when it refuses the rows.
            feed(self._leaf, 0, k)
            self._n_seen += k
            self._next_index = start + k
            return self
        # The rows cross at least one leaf boundary: build the new leaf and
        # buckets as new objects and commit only at the end, so that an error
        # half-way leaves the tree as it was. Stored buckets are never merged
        # into in place (the carry accumulates in the fresh leaf objects).
        buckets = list(self._buckets)
        leaf = self._leaf.copy()
        pos = 0
        while k - pos >= room:
            feed(leaf, pos, pos + room)
            pos += room
            self._carry(buckets, leaf)
            leaf = self._template.copy()
            room = self.leaf_size
        if pos < k:
            feed(leaf, pos, k)
        self._buckets, self._leaf = buckets, leaf
        self._n_seen += k
        self._next_index = start + k
        return self

    def update(self, x: Any, start_index: int | None = None) -> MergeReduce:
        """Consume one row ``x`` of shape ``(n_features,)``; same as ``extend(x[None])``."""
        super().update(x, start_index=start_index)
        return self

    @staticmethod
    def _carry(buckets: list[Sketch | None], carry: Sketch) -> None:
        """Binary-counter insertion of a level-0 reducer ``carry`` (owned, mutable)."""
        level = 0
        while level < len(buckets) and (stored := buckets[level]) is not None:
            # Older data first would need a copy of the stored bucket; FD and
            # the other reducers' guarantees do not depend on the order.
            carry.merge(stored)
            buckets[level] = None
            level += 1
        if level == len(buckets):
            if level >= _MAX_LEVELS:
                raise ValueError("MergeReduce holds too many leaves")
            buckets.append(carry)
        else:
            buckets[level] = carry

    def merge(self, other: MergeReduce) -> MergeReduce:
        """Fold another tree into ``self``: the tree of both streams. Returns ``self``.

        The open leaves merge (and close if together they reach
        ``leaf_size`` rows); the buckets add like binary numbers, bucket by
        bucket with carries. ``other`` is not modified. Cost: O(log n)
        reducer merges and copies.

        Raises
        ------
        TypeError
            ``other`` is not a MergeReduce.
        ValueError
            Another ``leaf_size`` or reducer (class, parameters or seed), or
            an error of the reducer's merge. The tree is unchanged.
        """
        return super().merge(other)

    def _check_compatible(self, other: Any, argname: str = "other") -> None:
        if isinstance(other, MergeReduce):
            # Name the reducers' real difference (size, seed, dtype...), not "reducer".
            self._template._check_compatible(other._template, argname + ".reducer")
        super()._check_compatible(other, argname)

    def _merge_state(self, other: MergeReduce) -> None:
        mine, theirs = self._buckets, other._buckets
        width = max(len(mine), len(theirs))
        buckets: list[Sketch | None] = []
        carry: Sketch | None = None
        for level in range(width):
            own = mine[level] if level < len(mine) else None
            # other's reducers are copied before they are kept: the trees must
            # never share a mutable object.
            fresh = carry
            items = [b for b in (own, carry) if b is not None]
            if level < len(theirs) and (their := theirs[level]) is not None:
                items.append(their)
            carry = None
            if not items:
                buckets.append(None)
            elif len(items) == 1:
                only = items[0]
                buckets.append(only if only is own or only is fresh else only.copy())
            elif len(items) == 2:
                buckets.append(None)
                carry = _merged(items[0], items[1])
            else:
                buckets.append(items[0])
                carry = _merged(items[1], items[2])
        if carry is not None:
            if width >= _MAX_LEVELS:
                raise ValueError("MergeReduce holds too many leaves")
            buckets.append(carry)
        leaf = _merged(self._leaf, other._leaf)
        if leaf.n_seen >= self.leaf_size:
            self._carry(buckets, leaf)
            leaf = self._template.copy()
        while buckets and buckets[-1] is None:
            buckets.pop()
        self._buckets, self._leaf = buckets, leaf
        self._n_seen += other._n_seen
        if self._positional:
            self._next_index = max(self._next_index, other._next_index)
        else:
            # Without stream positions the index is the row count (what from_bytes checks).
            self._next_index = self._n_seen

    # -- results ------------------------------------------------------------
    def result(self) -> Sketch:
        """One reducer summarising the whole stream; the tree is not modified.

        Buckets are folded from the oldest data (highest level) to the open
        leaf into a new reducer. Cost: O(log(n / leaf_size)) reducer merges.
        """
        out = self._template.copy()
        for bucket in reversed(self._buckets):
            if bucket is not None:
                out.merge(bucket)
        return out.merge(self._leaf)

    # -- bytes --------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise: parameters, ``n_seen`` and the reducers' blobs as nested bytes.

        Cost: O(nbytes).
        """
        fields: dict[str, Any] = {"layout_version": self._layout_version}
        for name, value in self._params().items():
            fields["param." + name] = value
        fields["scalar.n_seen"] = self._n_seen
        fields["scalar.next_index"] = self._next_index
        fields["scalar.n_levels"] = len(self._buckets)
        fields["leaf"] = self._leaf.to_bytes()
        for level, bucket in enumerate(self._buckets):
            fields[f"bucket.{level}"] = None if bucket is None else bucket.to_bytes()
        return _serialization.dumps(type(self).__name__, fields)

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> MergeReduce:
        if set(params) != {"leaf_size", "reducer"}:
            raise ValueError("parameters must be exactly leaf_size and reducer")
        blob = params["reducer"]
        if not isinstance(blob, bytes):
            raise ValueError("the reducer parameter must be a nested blob")
        # A tree of trees is never needed and would let a blob nest without
        # bound: refuse it before loading anything.
        if registered_class(blob) is cls:
            raise ValueError("the reducer of a MergeReduce cannot be a MergeReduce")
        template = load(blob)
        if not isinstance(template, Sketch):
            raise ValueError(f"the reducer must be a Sketch, got {type(template).__name__}")
        return cls(template.copy, params["leaf_size"])

    @classmethod
    def _from_fields(cls, fields: dict[str, Any], blob_size: int) -> MergeReduce:
        name = cls.__name__
        layout = fields.pop("layout_version", None)
        if layout != cls._layout_version:
            raise ValueError(
                f"{name} blob has layout version {layout!r}, this build reads {cls._layout_version}"
            )
        params = {k[6:]: v for k, v in fields.items() if k.startswith("param.")}
        try:
            tree = cls._from_params(params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"corrupt {name} blob: bad parameters ({exc})") from None

        def counter(key: str) -> int:
            value = fields.get("scalar." + key)
            if type(value) is not int or value < 0:
                raise ValueError(f"corrupt {name} blob: {key!r} must be a non-negative int")
            return value

        n_seen, n_levels, next_index = counter("n_seen"), counter("n_levels"), counter("next_index")
        if n_levels > _MAX_LEVELS:
            raise ValueError(f"corrupt {name} blob: {n_levels} levels")
        expected = {"param.leaf_size", "param.reducer", "scalar.n_seen", "scalar.n_levels", "leaf"}
        expected.add("scalar.next_index")
        expected |= {f"bucket.{i}" for i in range(n_levels)}
        if set(fields) != expected:
            raise ValueError(f"corrupt {name} blob: fields do not match the class")

        def reducer(key: str) -> Sketch:
            blob = fields[key]
            if not isinstance(blob, bytes):
                raise ValueError(f"corrupt {name} blob: {key!r} must be a nested blob")
            try:
                obj = tree.reducer_class.from_bytes(blob)
                tree._template._check_compatible(obj, key)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"corrupt {name} blob: {exc}") from None
            return obj

        leaf = reducer("leaf")
        if leaf.n_seen >= tree.leaf_size:
            raise ValueError(f"corrupt {name} blob: the open leaf holds >= leaf_size rows")
        buckets: list[Sketch | None] = []
        total = leaf.n_seen
        for level in range(n_levels):
            if fields[f"bucket.{level}"] is None:
                buckets.append(None)
                continue
            bucket = reducer(f"bucket.{level}")
            if bucket.n_seen < (1 << level) * tree.leaf_size:
                raise ValueError(
                    f"corrupt {name} blob: bucket {level} holds fewer than 2^{level} leaves"
                )
            total += bucket.n_seen
            buckets.append(bucket)
        if buckets and buckets[-1] is None:
            raise ValueError(f"corrupt {name} blob: trailing empty bucket")
        if total != n_seen:
            raise ValueError(f"corrupt {name} blob: n_seen does not match the reducers")
        if next_index > 2**62 or (not tree._positional and next_index != n_seen):
            raise ValueError(f"corrupt {name} blob: bad next_index")
        tree._leaf, tree._buckets, tree._n_seen = leaf, buckets, n_seen
        tree._next_index = next_index
        return tree
