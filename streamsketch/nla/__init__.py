"""Randomised numerical linear algebra drivers built on the library's sketches.

- :func:`lstsq`: overdetermined least squares by sketch-and-precondition
  (Blendenpik / LSRN: QR of a sketch as the preconditioner of LSQR) or
  sketch-and-solve; dense or ``scipy.sparse`` ``A``.
- :func:`low_rank`: truncated SVD by the randomized range finder with power
  iterations, by Frequent Directions (two passes over a row stream) or by a
  one-pass two-sided linear sketch (Tropp et al. 2017) that never holds ``A``.
- :func:`matmul`: ``A^T B`` through a shared sketch, with
  :func:`matmul_error_bound` for its guarantee.

The streaming routes read ``A`` as row blocks: an array, a ``numpy.memmap``
(``numpy.load(path, mmap_mode="r")``), a sparse matrix, or any iterable of
2-D blocks. Pages of *read-only* memory maps are handed back to the OS
(``madvise(MADV_DONTNEED)``) after each block, so the resident memory stays at
the algorithm's workspace however large the file; the data stay in the page
cache and nothing is lost (a read-only map holds no changes).

Each function's docstring states its guarantee and its cost;
``docs/nla.md`` has measured numbers.
"""

from .low_rank import low_rank
from .lstsq import LstsqInfo, lstsq
from .matmul import matmul, matmul_error_bound

__all__ = ["LstsqInfo", "low_rank", "lstsq", "matmul", "matmul_error_bound"]
