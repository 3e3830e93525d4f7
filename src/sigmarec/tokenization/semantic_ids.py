"""Semantic IDs: residual k-means quantisation of the items' text embeddings (SIGMA part 2).

Level 1 quantises ``v_text``; level ``l`` quantises what the levels before it left unexplained (the
residual). An item's semantic ID (SID) is its tuple of codes, and its level-1 code is the *prefix*
token of the hybrid item token, so level 1 also partitions the catalogue for the item-subset ANN
search of generation step 2 (see :mod:`sigmarec.tokenization.prefix_index`).

k-means itself is faiss's, seeded. Its result *does* depend on the OpenMP thread count: at real
sizes (11,875 grounded 128-d vectors, 64 codes) one and two threads give different centroids and
1,398 different level-1 codes, since the threads split faiss's BLAS sums differently and k-means
turns the rounding into other assignments. So the fit runs on ``SemanticIdConfig.threads``
threads (1 by default), and a seed gives the same semantic IDs on any machine's thread count. The
balanced variant adds a capacity-constrained assignment step on top (see :func:`capacity_assign`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from sigmarec.core.atomic import atomic_path, write_json
from sigmarec.errors import DataError
from sigmarec.tokenization.config import SemanticIdConfig

log = logging.getLogger("sigmarec")

CODES_FILE = "semantic_ids.npz"
META_FILE = "semantic_ids.json"
FORMAT_VERSION = 1


@dataclass
class SemanticIds:
    """The SIDs of a catalogue: ``codes[i, l]`` is item ``i``'s code at level ``l``."""

    codes: np.ndarray  # (n_items, levels) int32
    codebooks: list[np.ndarray]  # level l: (K_l, dim) float32, K_l possibly capped below config
    method: str = "rq_kmeans"
    requested_sizes: list[int] = field(default_factory=list)  # sizes asked for, before capping

    def __post_init__(self) -> None:
        self.codes = np.ascontiguousarray(self.codes, dtype=np.int32)
        self.codebooks = [np.ascontiguousarray(c, dtype=np.float32) for c in self.codebooks]
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.codebooks):
            raise DataError(
                f"semantic IDs: codes shape {self.codes.shape} does not match "
                f"{len(self.codebooks)} codebooks"
            )
        dims = {c.shape[1] for c in self.codebooks if c.ndim == 2}
        if len(dims) != 1 or any(c.ndim != 2 for c in self.codebooks):
            raise DataError("semantic IDs: codebooks must be 2-D arrays of one common width")
        for lvl, cb in enumerate(self.codebooks):
            col = self.codes[:, lvl]
            if col.size and (col.min() < 0 or col.max() >= cb.shape[0]):
                raise DataError(
                    f"semantic IDs: level-{lvl + 1} codes outside [0, {cb.shape[0]})"
                )
        if not self.requested_sizes:
            self.requested_sizes = self.codebook_sizes

    # ------------------------------------------------------------------ shape
    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    @property
    def dim(self) -> int:
        return int(self.codebooks[0].shape[1])

    @property
    def codebook_sizes(self) -> list[int]:
        return [int(c.shape[0]) for c in self.codebooks]

    @property
    def n_prefixes(self) -> int:
        """Size of the level-1 codebook: the number of prefix tokens the LLM vocabulary needs."""
        return self.codebook_sizes[0]

    @property
    def prefixes(self) -> np.ndarray:
        """Each item's level-1 code (its prefix token), shape (n_items,)."""
        return self.codes[:, 0]

    # ------------------------------------------------------------------ use
    def reconstruct(self, levels: int | None = None) -> np.ndarray:
        """Sum of the item's centroids over the first ``levels`` levels (all by default)."""
        levels = self.levels if levels is None else levels
        if not 0 <= levels <= self.levels:
            raise ValueError(f"levels must be in [0, {self.levels}], got {levels}")
        out = np.zeros((self.n_items, self.dim), dtype=np.float32)
        for lvl in range(levels):
            out += self.codebooks[lvl][self.codes[:, lvl]]
        return out

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes of new items under the fitted codebooks: nearest centroid, level by level.

        No capacity constraint here: adding a few items must not move existing items' codes.
        """
        x = _as_matrix(x, "x")
        if x.shape[1] != self.dim:
            raise DataError(f"encode: x has width {x.shape[1]}, codebooks have {self.dim}")
        residual = x.copy()
        codes = np.empty((x.shape[0], self.levels), dtype=np.int32)
        for lvl, cb in enumerate(self.codebooks):
            codes[:, lvl] = _nearest(residual, cb)
            residual -= cb[codes[:, lvl]]
        return codes

    def prefix_groups(self) -> dict[int, np.ndarray]:
        """Level-1 code -> sorted item indices, for every non-empty code."""
        order = np.argsort(self.prefixes, kind="stable")
        codes, starts = np.unique(self.prefixes[order], return_index=True)
        bounds = [*starts[1:], len(order)]
        return {int(c): order[s:e] for c, s, e in zip(codes, starts, bounds, strict=True)}

    def stats(self) -> dict[str, Any]:
        """Codebook use per level and how well the SIDs separate items (all JSON-serialisable)."""
        n = self.n_items
        per_level = []
        for lvl, size in enumerate(self.codebook_sizes):
            counts = np.bincount(self.codes[:, lvl], minlength=size)
            used = int((counts > 0).sum())
            per_level.append({
                "level": lvl + 1,
                "codebook_size": size,
                "requested_size": int(self.requested_sizes[lvl]),
                "used_codes": used,
                "utilisation": used / size,
                "entropy_bits": _entropy_bits(counts),
                "max_entropy_bits": math.log2(size) if size > 1 else 0.0,
            })
        group_sizes = np.bincount(self.prefixes, minlength=self.n_prefixes)
        group_sizes = group_sizes[group_sizes > 0]
        largest = int(group_sizes.max()) if group_sizes.size else 0
        median = float(np.median(group_sizes)) if group_sizes.size else 0.0
        if n:
            _, inverse, counts = np.unique(
                self.codes, axis=0, return_inverse=True, return_counts=True
            )
            distinct = int(counts.size)
            collided = int((counts[inverse.ravel()] > 1).sum())
        else:
            distinct, collided = 0, 0
        return {
            "n_items": n,
            "levels": per_level,
            "prefix_groups": int(group_sizes.size),
            "largest_prefix_group": largest,
            "largest_prefix_group_share": largest / n if n else 0.0,
            "median_prefix_group": median,
            "median_prefix_group_share": median / n if n else 0.0,
            "distinct_sids": distinct,
            "collision_rate": collided / n if n else 0.0,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path | str) -> None:
        """Write ``semantic_ids.npz`` (codes, codebooks) and ``semantic_ids.json`` (meta, stats)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"codes": self.codes}
        arrays.update({f"codebook_{lvl}": cb for lvl, cb in enumerate(self.codebooks)})
        with atomic_path(folder / CODES_FILE) as tmp, open(tmp, "wb") as fh:
            # A file handle, not a name: np.savez would append ".npz" to the temp name.
            np.savez(fh, **arrays)
        write_json(folder / META_FILE, {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "levels": self.levels,
            "dim": self.dim,
            "codebook_sizes": self.codebook_sizes,
            "requested_sizes": [int(k) for k in self.requested_sizes],
            "stats": self.stats(),
        })

    @classmethod
    def load(cls, folder: Path | str) -> SemanticIds:
        folder = Path(folder)
        npz_path, meta_path = folder / CODES_FILE, folder / META_FILE
        for path in (npz_path, meta_path):
            if not path.exists():
                raise DataError(f"semantic IDs: {path} not found (run the tokenization stage)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"semantic IDs: {meta_path} has format_version {meta.get('format_version')}, "
                f"this code reads {FORMAT_VERSION}"
            )
        with np.load(npz_path) as z:
            codes = z["codes"]
            codebooks = [z[f"codebook_{lvl}"] for lvl in range(int(meta["levels"]))]
        return cls(codes=codes, codebooks=codebooks, method=meta["method"],
                   requested_sizes=list(meta["requested_sizes"]))


# ---------------------------------------------------------------------- fitting
def fit_semantic_ids(x: np.ndarray, cfg: SemanticIdConfig | None = None) -> SemanticIds:
    """Residual k-means over ``x`` (n_items x d), one faiss k-means per level.

    Deterministic given ``cfg.seed`` and ``cfg.threads``: level ``l`` uses seed ``cfg.seed + l``.
    A level's codebook is capped at the number of distinct residual vectors (a tiny or
    duplicate-heavy catalogue cannot fill 256 codes; k-means would only invent empty clusters).
    """
    cfg = cfg or SemanticIdConfig()
    x = _as_matrix(x, "x")
    if x.shape[0] == 0:
        raise DataError("semantic IDs: cannot quantise an empty catalogue (0 embeddings)")
    with _faiss_threads(cfg.threads):
        return _fit(x, cfg)


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP thread count set to ``n`` for the block, then restored (it is global)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _fit(x: np.ndarray, cfg: SemanticIdConfig) -> SemanticIds:
    n = x.shape[0]
    balanced = cfg.method == "rq_kmeans_balanced"
    residual = x.copy()
    codes = np.empty((n, cfg.levels), dtype=np.int32)
    codebooks: list[np.ndarray] = []
    tol = 1e-6 * max(1.0, float(np.abs(x).max()))
    for lvl, requested in enumerate(cfg.codebook_sizes):
        k = min(requested, _n_distinct_rows(residual, tol))
        if k < requested:
            log.info("semantic IDs: level %d codebook capped at %d (asked %d): only %d distinct "
                     "vectors", lvl + 1, k, requested, k)
        centroids = _kmeans(residual, k, cfg.kmeans_iters, cfg.seed + lvl)
        labels = _nearest(residual, centroids)
        if balanced and k > 1:
            capacity = math.ceil(n / k * (1 + cfg.balance_slack))
            centroids, labels = balanced_kmeans_refine(residual, centroids, capacity,
                                                       cfg.balance_iters)
        codes[:, lvl] = labels
        codebooks.append(centroids)
        residual -= centroids[labels]
    return SemanticIds(codes=codes, codebooks=codebooks, method=cfg.method,
                       requested_sizes=list(cfg.codebook_sizes))


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    if k == 1:
        return x.mean(axis=0, keepdims=True).astype(np.float32)
    # min_points_per_centroid=1: small catalogues are legitimate here, and faiss would print a
    # warning to stderr for every level otherwise. The default subsampling above 256 points per
    # centroid stays (it is seeded, so still deterministic).
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def balanced_kmeans_refine(
    x: np.ndarray, centroids: np.ndarray, capacity: int, iters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations whose assignment step respects ``capacity`` items per centroid.

    Starts from the plain k-means centroids, so balancing only moves the items that overflow a
    crowded code; each round is a capacity-constrained assignment followed by a mean update.
    """
    k = centroids.shape[0]
    if capacity * k < x.shape[0]:
        raise ValueError(f"capacity {capacity} x {k} codes cannot hold {x.shape[0]} items")
    centroids = centroids.copy()
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    x_sq = (x * x).sum(axis=1, keepdims=True)
    for _ in range(iters):
        new = capacity_assign(_sq_dists(x, centroids, x_sq), capacity)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = _update_centroids(x, labels, centroids)
    return centroids, labels


def capacity_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Assign rows of ``dist`` (n x K) to columns, at most ``capacity`` rows per column.

    Why this scheme: it is a hard cap (Sinkhorn balancing only balances in expectation, and its
    arg-max can still overflow), it is deterministic, and it is vectorised. Each round every
    unassigned item proposes to its nearest non-full code, and each code keeps its closest
    proposers up to its remaining room. A code that turns anyone away is full, so every round
    either finishes or fills a code: at most K rounds, each O(n_left * K), and in practice a
    handful, because most items get their first choice.
    """
    n, k = dist.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} codes cannot hold {n} items")
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = np.arange(n)
    while left.size:
        d = dist[left]
        d[:, load >= capacity] = np.inf
        choice = d.argmin(axis=1)
        chosen_d = d[np.arange(left.size), choice]
        order = np.lexsort((left, chosen_d, choice))  # by code, then distance, then item id
        by_code = choice[order]
        first = np.searchsorted(by_code, by_code, side="left")
        rank = np.arange(order.size) - first
        accept = rank < (capacity - load)[by_code]
        won = order[accept]
        labels[left[won]] = choice[won]
        load += np.bincount(choice[won], minlength=k)
        left = np.sort(left[order[~accept]])
    return labels


def _update_centroids(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    k = old.shape[0]
    member = sp.csr_matrix(
        (np.ones(labels.size, dtype=np.float64), (labels, np.arange(labels.size))),
        shape=(k, labels.size),
    )
    sums = np.asarray(member @ x.astype(np.float64))
    counts = np.bincount(labels, minlength=k)
    out = old.astype(np.float64)
    nonempty = counts > 0
    out[nonempty] = sums[nonempty] / counts[nonempty, None]  # an empty code keeps its centroid
    return out.astype(np.float32)


def _sq_dists(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    d = x @ c.T
    d *= -2.0
    d += x_sq
    d += (c * c).sum(axis=1)[None, :]
    return np.maximum(d, 0.0, out=d)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def _n_distinct_rows(x: np.ndarray, tol: float) -> int:
    """Rows that differ by more than float noise: snapped to a ``tol`` grid, then counted.

    Exact byte equality is too strict: the mean of identical vectors is not always bit-identical
    to them, so the residuals of duplicates would look distinct.
    """
    grid = np.round(x.astype(np.float64) / tol).astype(np.int64)
    return int(np.unique(grid.view(np.dtype((np.void, 8 * x.shape[1])))).size)


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() + 0.0)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"semantic IDs: {name} must be 2-D (n_items x dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"semantic IDs: {name} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"semantic IDs: {name} contains NaN or infinite values")
    return x
