"""Stream real text through streamsketch's sketches and check what each one promises.

The text is the Python reference documentation that every Python install ships
(``pydoc_data.topics``). Each sentence becomes a 64-dimensional "key": TF-IDF
weights of the 2 000 most frequent words, hashed down with a CountSketch
feature map (a Johnson–Lindenstrauss map). Then

1. four "workers" stream their shards of the keys into LevAttention universal
   sets, which merge into exactly the single-stream set, and every key that any
   query can weight by >= eps under f(x) = x^2 attention is in it;
2. online ridge leverage scores the "novelty" of each sentence as it arrives,
   in O(d^2) memory, matching the exact scores;
3. Frequent Directions keeps the keys' covariance within its certified bound.

Run: ``python examples/quickstart.py`` (seconds on two cores).
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from pydoc_data.topics import topics

import numpy as np

from streamsketch import (
    CountSketch,
    FrequentDirections,
    OnlineRidgeLeverage,
    UniversalSet,
    leverage_scores,
)

D = 64  # key width
EPS = 0.03  # universal-set threshold
VOCAB = 2000


def sentence_keys() -> tuple[list[str], np.ndarray]:
    """Sentences of the Python docs and their hashed bag-of-words keys, shape (n, D)."""
    text = "\n".join(topics[k] for k in sorted(topics))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    words = [re.findall(r"[a-z_]+", s.lower()) for s in sentences]
    vocab = {
        w: i for i, (w, _) in enumerate(Counter(w for ws in words for w in ws).most_common(VOCAB))
    }
    counts = np.zeros((len(sentences), VOCAB))
    for row, ws in enumerate(words):
        for w in ws:
            if w in vocab:
                counts[row, vocab[w]] += 1.0
    keep = counts.sum(axis=1) > 0
    counts = counts[keep]
    tfidf = counts * np.log(len(counts) / (1.0 + (counts > 0).sum(axis=0)))
    tfidf /= np.linalg.norm(tfidf, axis=1, keepdims=True)
    keys = CountSketch(VOCAB, D, seed=0).transform(tfidf)  # feature hashing: a JL map
    return [s for s, k in zip(sentences, keep, strict=True) if k], keys


def main() -> None:
    t0 = time.perf_counter()
    sentences, K = sentence_keys()
    n = len(K)
    print(f"{n} sentences of the Python reference docs -> keys of shape {K.shape}")

    # 1. Universal set: 4 workers, merged, against the single stream and the guarantee.
    single = UniversalSet(D, eps=EPS)
    for chunk in np.array_split(K, 50):
        single.extend(chunk)
    bounds = np.linspace(0, n, 5).astype(int)
    shards = [
        UniversalSet(D, eps=EPS).extend(K[lo:hi], start_index=lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    merged = shards[0]
    for other in shards[1:]:
        merged.merge(other)
    same = np.array_equal(merged.indices, single.indices)
    print(
        f"universal set: {len(single.indices)} of {n} keys kept (bound d/eps = {D / EPS:.0f}); "
        f"4 merged shards give the same indices: {same}; nbytes = {single.nbytes}"
    )

    tau = leverage_scores(K)  # exact leverage against all keys
    heavy = np.flatnonzero(tau >= EPS)
    rng = np.random.default_rng(1)
    M_pinv = np.linalg.pinv(K.T @ K)
    worst_queries = (M_pinv @ K[heavy].T).T  # q = M^+ k_j maximises key j's attention
    queries = np.vstack([rng.standard_normal((200, D)), worst_queries])
    A = (queries @ K.T) ** 2
    A /= A.sum(axis=1, keepdims=True)
    needed = np.flatnonzero((A >= EPS).any(axis=0))
    missing = np.setdiff1d(needed, single.indices)
    print(
        f"keys some query weights by >= {EPS}: {len(needed)}; missing from the set: {len(missing)}"
    )
    top = single.indices[np.argsort(single.scores)[::-1][:3]]
    for j in top:
        print(f"   heavy key {j}: {sentences[j][:90]!r}")

    # 2. Online ridge leverage: how new is each sentence, given all before it?
    online = OnlineRidgeLeverage(D, ridge=1e-3)
    novelty = np.concatenate([online.extend(chunk) for chunk in np.array_split(K, 30)])
    M = K.T @ K + 1e-3 * np.eye(D)
    exact_now = np.einsum("ij,ij->i", K @ np.linalg.inv(M), K)
    drift = np.max(np.abs(online.scores(K) - exact_now) / exact_now)
    late = n // 2 + np.argsort(novelty[n // 2 :])[::-1][:2]
    print(
        f"online ridge leverage: {online.nbytes} bytes of state; current scores within "
        f"{drift:.1e} relative of exact; most novel sentences in the second half:"
    )
    for j in late:
        print(f"   {novelty[j]:.2f} {sentences[j][:90]!r}")

    # 3. Frequent Directions: covariance within its certified bound.
    fd = FrequentDirections(D, 16)
    for chunk in np.array_split(K, 20):
        fd.extend(chunk)
    err = np.linalg.norm(K.T @ K - fd.covariance(), 2)
    print(
        f"FrequentDirections(l=16): ||K'K - B'B||_2 = {err:.2f} "
        f"<= certified bound {fd.error_bound:.2f}"
    )

    ok = same and len(missing) == 0 and drift < 1e-6 and err <= fd.error_bound * (1 + 1e-9)
    print(f"all guarantees hold: {ok} ({time.perf_counter() - t0:.1f} s)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
