"""Cost of merging sketches across processes: ``all_merge`` vs ``all_gather_object``, gloo on CPU.

For 2 and 4 processes on localhost (``torch.multiprocessing``, gloo, one thread
each) and sketches of growing size, every rank fills its sketch with its own
shard and then, timed:

- **ours**: ``streamsketch.distributed.all_merge(sketch)`` on a copy: the
  72-byte agreement, then one ``all_reduce(SUM)`` of the state (CountSketch,
  OnlineRidgeLeverage's Gram matrix) or an all-gather of the ``to_bytes``
  blobs and a balanced tree of merges on every rank (FrequentDirections,
  UniversalSet);
- **peer**: what one writes without it: ``torch.distributed.all_gather_object``
  (pickle) of the sketch, then ``merge`` of the ranks' objects in rank order.

Each call is timed from a barrier to a barrier (every rank done), best of
``--repeats`` after a warm-up, ours and the peer interleaved
(``_common.best_times``), on rank 0. Bytes: the state each rank puts on the
wire (the summed arrays, the blob, or the pickle) and what each rank receives
(ring all-reduce: ``2 (w - 1) / w`` of the summed bytes; all-gather: ``w - 1``
blobs). Both results are checked equal (to rounding; same indices for the
universal set; both within the FD error bound for Frequent Directions).

Run ``python benchmarks/bench_merge.py`` (writes ``benchmarks/results/merge.md``,
2 to 4 minutes on two busy cores) or ``--quick`` (small sizes, prints only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import best_times, blas_info, load_average, machine

from streamsketch import CountSketch, FrequentDirections, OnlineRidgeLeverage, UniversalSet
from streamsketch.distributed import all_merge

ROWS = 4000  # rows per rank


def configs(quick: bool) -> list[tuple[str, str, object]]:
    """(sketch, size label, zero-argument constructor) in growing state size."""
    out = []
    for m in (256, 4096) if quick else (256, 4096, 65536):
        out.append(("CountSketch", f"d=64, m={m}", functools.partial(CountSketch, 64, m, seed=0)))
    for d in (64, 256) if quick else (64, 256, 1024):
        out.append(
            ("OnlineRidgeLeverage", f"d={d}", functools.partial(OnlineRidgeLeverage, d, 1e-3))
        )
    for ell in (16, 128) if quick else (16, 128, 1024):
        out.append(
            (
                "FrequentDirections",
                f"d=256, l={ell}",
                functools.partial(FrequentDirections, 256, ell),
            )
        )
    for eps in (0.1, 0.01) if quick else (0.1, 0.01, 0.002):
        out.append(("UniversalSet", f"d=64, eps={eps}", functools.partial(UniversalSet, 64, eps)))
    return out


def shard(rank: int, d: int) -> np.ndarray:
    rng = np.random.default_rng([11, rank])
    X = rng.standard_normal((ROWS, d))
    X[rng.choice(ROWS, 5, replace=False)] *= 40.0  # a few heavy keys for the universal set
    return X


def fill(sk, rank: int):
    X = shard(rank, sk.n_features)
    if isinstance(sk, (CountSketch, UniversalSet)):
        sk.extend(X, start_index=rank * ROWS)
    else:
        sk.extend(X)
    return sk


def summed_bytes(sk) -> int | None:
    """Bytes all_merge sums with all_reduce, or None when it gathers blobs."""
    if isinstance(sk, CountSketch):
        return sk.result().nbytes
    if isinstance(sk, OnlineRidgeLeverage):
        return sk.gram.nbytes
    return None


def same(a, b) -> bool:
    """Both merges agree: to rounding, or (Frequent Directions) both within the FD bound."""
    if isinstance(a, UniversalSet):
        return np.array_equal(a.indices, b.indices) and np.allclose(a.scores, b.scores)
    if isinstance(a, FrequentDirections):
        # The tree and the sequential fold shrink differently; each must keep
        # ||A^T A - B^T B||_2 <= Delta for the stream of all ranks.
        A = np.concatenate([shard(r, a.n_features) for r in range(dist.get_world_size())])
        C = A.T @ A
        slack = 1e-9 * np.trace(C)
        return all(np.linalg.norm(C - f.covariance(), 2) <= f.error_bound + slack for f in (a, b))
    if isinstance(a, OnlineRidgeLeverage):
        return np.allclose(a.gram, b.gram, rtol=1e-12)
    return np.allclose(a.result(), b.result(), rtol=1e-12, atol=1e-12)


def peer_merge(sk):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, sk)
    out = objs[0]
    for o in objs[1:]:
        out.merge(o)
    return out


def fenced(fn, sk, calls: int):
    """``fn`` on a fresh copy of ``sk`` per call (made beforehand), between two barriers."""
    pool = [sk.copy() for _ in range(calls)]

    def run():
        mine = pool.pop()
        dist.barrier()
        out = fn(mine)
        dist.barrier()
        return out

    return run


def rank_main(rank: int, world: int, port: int, quick: bool, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rows = []
    try:
        for name, size, make in configs(quick):
            sk = fill(make(), rank)
            calls = repeats + 1  # best_times warms up once
            fns = {"ours": fenced(all_merge, sk, calls), "peer": fenced(peer_merge, sk, calls)}
            best, res = best_times(fns, repeats)
            ok = torch.tensor([int(same(res["ours"], res["peer"]))])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if rank == 0:
                blob = len(sk.to_bytes())
                summed = summed_bytes(sk)
                sent = summed if summed is not None else blob
                recv = (
                    2 * (world - 1) * summed // world if summed is not None else (world - 1) * blob
                )
                rows.append(
                    (
                        world,
                        name,
                        size,
                        "all_reduce" if summed is not None else "all_gather + tree",
                        sk.nbytes,
                        sent,
                        recv,
                        len(pickle.dumps(sk)),
                        best["ours"],
                        best["peer"],
                        bool(ok.item()),
                    )
                )
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--output", type=Path, default=None, help="report (default benchmarks/results/merge.md)"
    )
    args = parser.parse_args()
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "STREAMSKETCH_NUM_THREADS",
    ):
        os.environ[var] = "1"
    load = load_average()
    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_merge_{os.getpid()}.txt"
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        mp.spawn(rank_main, args=(world, port, args.quick, args.repeats, str(tmp)), nprocs=world)
        print(f"{world} processes: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows += json.loads(tmp.read_text())
        tmp.unlink()

    head = (
        "| processes | sketch | size | ours: route | nbytes | ours: bytes sent per rank | "
        "ours: bytes received per rank | peer: pickle bytes per rank | ours (ms) | peer (ms) | "
        "peer / ours | same result |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for w, name, size, route, nb, sent, recv, pk, t_ours, t_peer, ok in rows:
        lines.append(
            f"| {w} | {name} | {size} | {route} | {nb:,} | {sent:,} | {recv:,} | {pk:,} | "
            f"{t_ours * 1e3:.2f} | {t_peer * 1e3:.2f} | {t_peer / t_ours:.2f}x | "
            f"{'yes' if ok else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    env = (
        f"Environment: {machine()}, BLAS {blas_info()}, torch {torch.__version__} (gloo), "
        f"numpy {np.__version__}, one thread per process, load average at start {load:.2f}."
    )
    text = f"""# Merging sketches across processes: `all_merge` vs `all_gather_object`

`python benchmarks/bench_merge.py` — 2 and 4 CPU processes on localhost
(`torch.multiprocessing`, gloo), each rank holding a sketch of its own {ROWS} rows. **Ours**:
`streamsketch.distributed.all_merge` (agreement on class/parameters/seed, then `all_reduce(SUM)`
of the state, or an all-gather of the `to_bytes` blobs and a balanced merge tree on every rank).
**Peer**: `torch.distributed.all_gather_object` (pickle) and `merge` in rank order. Each call
timed from a barrier to a barrier on rank 0 (every rank done), best of {args.repeats} after a
warm-up, ours and the peer interleaved. 'Bytes received' for all_reduce is the ring estimate
`2 (w - 1) / w` times the summed bytes; for the all-gather it is `w - 1` blobs. 'Same result':
both merged sketches equal to rounding (the same indices for the universal set; for Frequent
Directions, whose merge tree changes the shrinkage, both within the FD bound for all ranks' rows).

{env}

The 4-process rows run 4 processes on 2 cores, so their times include waiting for a core.

{table}
"""
    out = args.output or Path(__file__).parent / "results" / "merge.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
