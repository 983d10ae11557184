"""Four workers, one universal set: ``streamsketch.distributed.all_merge`` over gloo.

Four CPU processes (``torch.multiprocessing.spawn``, gloo on localhost) each
stream their shard of one key sequence into a LevAttention
:class:`~streamsketch.UniversalSet`, passing the shard's global offset as
``start_index``. ``all_merge`` then leaves on every rank the set of the whole
sequence: every key whose ridge-free leverage against *all* keys is at least
``eps`` (for f(x) = x^2 attention: every key some query weights by >= eps).
Rank 0 checks it against the set a single process builds from the whole
sequence and prints it.

Run: ``python examples/distributed_universal_set.py`` (about 20 s on two
cores, most of it starting the processes). ``--world`` and ``--rows`` change
the size. With ``torchrun`` the same ``work`` function runs unchanged after
``init_process_group("gloo")``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamsketch import UniversalSet
from streamsketch.distributed import all_merge

D = 32  # key width
EPS = 0.02  # keep keys of leverage >= eps: at most D / EPS = 1600 of them


def keys(n: int) -> np.ndarray:
    """A key sequence every rank can rebuild: Gaussian keys, a weak direction, planted keys."""
    rng = np.random.default_rng(0)
    K = rng.standard_normal((n, D))
    K[:, -1] *= 1e-3  # almost nobody uses the last direction...
    rare = rng.choice(n, 6, replace=False)
    K[rare] = 0.0
    K[rare, -1] = 2.0  # ...except these six keys, which only it can explain
    loud = rng.choice(n, 12, replace=False)
    K[loud] *= rng.uniform(10.0, 60.0, size=(12, 1))  # and a dozen large keys
    return K


def work(rank: int, world: int, n: int) -> None:
    K = keys(n)
    bounds = np.linspace(0, n, world + 1).astype(int)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    t0 = time.perf_counter()
    us = UniversalSet(D, EPS).extend(K[lo:hi], start_index=lo)
    t_local = time.perf_counter() - t0
    local_kept = us.n_kept
    t0 = time.perf_counter()
    all_merge(us)
    t_merge = time.perf_counter() - t0
    for r in range(world):  # one rank at a time, so the lines do not interleave
        if r == rank:
            print(
                f"rank {rank}: rows [{lo}, {hi}), {local_kept} keys kept locally in "
                f"{t_local:.2f} s; after all_merge {us.n_kept} keys ({t_merge * 1e3:.1f} ms)",
                flush=True,
            )
        dist.barrier()
    if rank == 0:
        t0 = time.perf_counter()
        single = UniversalSet(D, EPS).extend(K)
        t_single = time.perf_counter() - t0
        same = np.array_equal(us.indices, single.indices)
        print(f"\nsingle process over all {n} keys: {single.n_kept} keys in {t_single:.2f} s")
        print(f"merged set == single-process set: {same}")
        print(f"kept positions: {us.indices.tolist()}")
        print(f"their leverage: {np.round(us.scores, 3).tolist()}")
        if not same:
            raise SystemExit("the merged set differs from the single-process set")


def _rank_main(rank: int, world: int, port: int, n: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        work(rank, world, n)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4, help="processes (default 4)")
    parser.add_argument("--rows", type=int, default=400_000, help="keys in all (default 400k)")
    args = parser.parse_args()
    # One thread per process: the ranks share the machine's cores.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "STREAMSKETCH_NUM_THREADS"):
        os.environ[var] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args.world, port, args.rows), nprocs=args.world)


if __name__ == "__main__":
    main()
