"""Item-subset nearest-neighbour search: the top items *within one SID prefix* (SIGMA step 2).

After prefix beam search, each of the K chosen prefixes ``c_k`` comes with a query vector ``h_k``,
and only the items whose prefix is ``c_k`` may be returned. :class:`PrefixIndex` stores the items in
a faiss ``IndexIVFFlat`` (inner product) whose inverted lists *are* the prefixes: items are added
with their prefix as a precomputed list number (``add_core``) and queries probe exactly the list of
their prefix (``search_preassigned`` with ``nprobe = 1``), so a query scans only its prefix's items
and never sees another prefix's. Allow/deny masks (exclude already-bought items, restrict to a
category, ...) are an ``IDSelectorBitmap`` handed to the scan, so filtered items never occupy a
result slot and k eligible items come back whenever k exist.

:class:`ExhaustivePrefixIndex` is the reference with the same API: all dot products, masked, top-k.

Scores are raw inner products; store and query L2-normalised vectors (or build with
``normalize=True``) to get cosine similarity. Items are numbered 0..n-1 in the order they were
added (``build`` first, then each ``add_items`` call appends).
"""

from __future__ import annotations

from typing import Protocol, Self

import faiss
import numpy as np

Result = tuple[np.ndarray, np.ndarray]  # (scores float32, items int64), padded with -inf / -1


class ItemSubsetIndex(Protocol):
    """What the generation step needs from an index; both implementations below satisfy it."""

    @property
    def n_items(self) -> int: ...

    def add_items(self, vectors: np.ndarray, prefixes: np.ndarray) -> np.ndarray: ...

    def search(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
               allow_mask: np.ndarray | None = None) -> Result: ...

    def search_multi(self, queries: np.ndarray, prefixes: np.ndarray, m: int,
                     allow_mask: np.ndarray | None = None) -> Result: ...


class _PrefixIndexBase:
    """Input checks and the (B, K, D) -> (B*K, D) batching shared by both implementations."""

    @classmethod
    def build(cls, vectors: np.ndarray, prefixes: np.ndarray, n_prefixes: int,
              normalize: bool = False) -> Self:
        """An index over ``vectors`` (n_items, D), item i stored under ``prefixes[i]``."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (n_items, D), got shape {vectors.shape}")
        out = cls(vectors.shape[1], n_prefixes, normalize)
        out.add_items(vectors, prefixes)
        return out

    def __init__(self, dim: int, n_prefixes: int, normalize: bool) -> None:
        if dim < 1 or n_prefixes < 1:
            raise ValueError(f"dim ({dim}) and n_prefixes ({n_prefixes}) must be positive")
        self.dim = int(dim)
        self.n_prefixes = int(n_prefixes)
        self.normalize = normalize
        self._prefix_of = np.empty(0, dtype=np.int64)

    @property
    def n_items(self) -> int:
        return int(self._prefix_of.size)

    @property
    def item_prefixes(self) -> np.ndarray:
        """Prefix of each stored item, shape (n_items,)."""
        return self._prefix_of

    def prefix_sizes(self) -> np.ndarray:
        return np.bincount(self._prefix_of, minlength=self.n_prefixes)

    def add_items(self, vectors: np.ndarray, prefixes: np.ndarray) -> np.ndarray:
        """Append items and return their ids (SIGMA: a new item needs only embedding + prefix)."""
        vectors = self._vectors(vectors, "vectors")
        prefixes = np.asarray(prefixes)
        if prefixes.shape != (vectors.shape[0],):
            raise ValueError(f"prefixes shape {prefixes.shape} != ({vectors.shape[0]},)")
        prefixes = prefixes.astype(np.int64)
        if prefixes.size and (prefixes.min() < 0 or prefixes.max() >= self.n_prefixes):
            raise ValueError(f"item prefixes must lie in [0, {self.n_prefixes})")
        ids = np.arange(self.n_items, self.n_items + vectors.shape[0], dtype=np.int64)
        if ids.size:
            self._add(vectors, prefixes, ids)
            self._prefix_of = np.concatenate([self._prefix_of, prefixes])
        return ids

    def search(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
               allow_mask: np.ndarray | None = None) -> Result:
        """Top-``k`` items of prefix ``prefixes[b]`` for each query ``queries[b]``.

        ``allow_mask``: None, a bool array (n_items,) shared by all queries, or (B, n_items), one
        row per query. A prefix of -1 means "no prefix" and returns only padding. Returns
        ``(scores (B, k), items (B, k))`` sorted by decreasing score, padded with -inf / -1.
        """
        queries = self._vectors(queries, "queries")
        b = queries.shape[0]
        prefixes = self._query_prefixes(prefixes, (b,))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows, row_of_query = self._mask_rows(allow_mask, b)
        scores, items = self._search(queries, prefixes, int(k), rows, row_of_query)
        scores[items < 0] = -np.inf
        return scores, items

    def search_multi(self, queries: np.ndarray, prefixes: np.ndarray, m: int,
                     allow_mask: np.ndarray | None = None) -> Result:
        """Top-``m`` per (request b, prefix slot k), batched as one B*K search.

        ``queries`` (B, K, D), ``prefixes`` (B, K); ``allow_mask`` None, (n_items,) or
        (B, n_items) (a request's row applies to all its K prefixes). Returns (B, K, m) arrays.
        """
        queries = np.asarray(queries)
        if queries.ndim != 3:
            raise ValueError(f"queries must be (B, K, D), got shape {queries.shape}")
        b, kk, d = queries.shape
        prefixes = self._query_prefixes(prefixes, (b, kk)).reshape(-1)
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        flat = self._vectors(queries.reshape(b * kk, d), "queries")
        rows, row_of_request = self._mask_rows(allow_mask, b)
        row_of_query = None if row_of_request is None else np.repeat(row_of_request, kk)
        scores, items = self._search(flat, prefixes, int(m), rows, row_of_query)
        scores[items < 0] = -np.inf
        return scores.reshape(b, kk, m), items.reshape(b, kk, m)

    # ------------------------------------------------------------------ checks
    def _vectors(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must be (n, {self.dim}), got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.normalize:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norms, 1e-12)
        return x

    def _query_prefixes(self, prefixes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        prefixes = np.asarray(prefixes)
        if prefixes.shape != shape:
            raise ValueError(f"prefixes must have shape {shape}, got {prefixes.shape}")
        prefixes = prefixes.astype(np.int64)
        if prefixes.size and (prefixes.min() < -1 or prefixes.max() >= self.n_prefixes):
            raise ValueError(f"query prefixes must lie in [0, {self.n_prefixes}) (or -1)")
        return prefixes

    def _mask_rows(self, allow_mask: np.ndarray | None,
                   n_rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Distinct mask rows (U, n_items) and the row each request uses (n_rows,).

        Requests often share a mask (a task-wide filter, or no per-user exclusions), and each
        distinct row costs one faiss call, so identical rows are merged.
        """
        if allow_mask is None:
            return None, None
        mask = np.asarray(allow_mask)
        if mask.dtype != np.bool_:
            raise ValueError(f"allow_mask must be boolean, got dtype {mask.dtype}")
        n = self.n_items
        if mask.shape == (n,):
            return mask[None, :], np.zeros(n_rows, dtype=np.int64)
        if mask.shape == (n_rows, n):
            packed = np.packbits(mask, axis=1)
            _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
            return mask[first], inverse.reshape(-1).astype(np.int64)
        raise ValueError(f"allow_mask must have shape ({n},) or ({n_rows}, {n}), got {mask.shape}")

    # ------------------------------------------------------------------ backend
    def _add(self, vectors: np.ndarray, prefixes: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
                rows: np.ndarray | None, row_of_query: np.ndarray | None) -> Result:
        raise NotImplementedError


class PrefixIndex(_PrefixIndexBase):
    """faiss ``IndexIVFFlat`` (inner product) with one inverted list per prefix."""

    def __init__(self, dim: int, n_prefixes: int, normalize: bool = False) -> None:
        super().__init__(dim, n_prefixes, normalize)
        # The coarse quantizer is never consulted (every add and search passes its list number),
        # but an IVF index needs one with nlist entries to count as trained.
        self._quantizer = faiss.IndexFlatIP(self.dim)
        self._quantizer.add(np.zeros((self.n_prefixes, self.dim), dtype=np.float32))
        self.index = faiss.IndexIVFFlat(self._quantizer, self.dim, self.n_prefixes,
                                        faiss.METRIC_INNER_PRODUCT)
        self.index.is_trained = True

    def _add(self, vectors: np.ndarray, prefixes: np.ndarray, ids: np.ndarray) -> None:
        # add_core with precomputed list numbers: the documented IVF entry point for "the
        # assignment is already known" (faiss's own add() computes it with the quantizer).
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lists = np.ascontiguousarray(prefixes, dtype=np.int64)
        self.index.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids),
                            faiss.swig_ptr(lists))

    def _search(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
                rows: np.ndarray | None, row_of_query: np.ndarray | None) -> Result:
        n = queries.shape[0]
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        items = np.full((n, k), -1, dtype=np.int64)
        if rows is None or row_of_query is None:
            self._search_lists(queries, prefixes, k, None, scores, items)
            return scores, items
        for r, row in enumerate(rows):
            idx = np.flatnonzero(row_of_query == r)
            # Faiss's IDSelectorBitmap reads bit (id & 7) of byte (id >> 3): little bit order.
            bitmap = np.packbits(row, bitorder="little")
            sel = faiss.IDSelectorBitmap(bitmap)
            s, i = scores[idx], items[idx]
            self._search_lists(np.ascontiguousarray(queries[idx]), prefixes[idx], k, sel, s, i)
            scores[idx], items[idx] = s, i
        return scores, items

    def _search_lists(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
                      sel: faiss.IDSelector | None, scores: np.ndarray,
                      items: np.ndarray) -> None:
        if queries.shape[0] == 0 or self.n_items == 0:
            return
        params = faiss.SearchParametersIVF()
        params.nprobe = 1  # probe exactly the given list: the query's prefix, nothing else
        if sel is not None:
            params.sel = sel
        keys = np.ascontiguousarray(prefixes.reshape(-1, 1), dtype=np.int64)  # -1 = skip
        coarse = np.zeros(keys.shape, dtype=np.float32)  # unused by a flat (non-residual) IVF
        # The Python wrapper of search_preassigned refuses `params`, so call the SWIG method.
        self.index.search_preassigned_c(
            queries.shape[0], faiss.swig_ptr(queries), k, faiss.swig_ptr(keys),
            faiss.swig_ptr(coarse), faiss.swig_ptr(scores), faiss.swig_ptr(items), False, params,
        )


class ExhaustivePrefixIndex(_PrefixIndexBase):
    """Reference implementation: every dot product, masked to the prefix and the allow mask."""

    # Scores are computed this many queries at a time to bound memory (chunk x n_items floats).
    chunk = 1024

    def __init__(self, dim: int, n_prefixes: int, normalize: bool = False) -> None:
        super().__init__(dim, n_prefixes, normalize)
        self._vecs = np.empty((0, self.dim), dtype=np.float32)

    def _add(self, vectors: np.ndarray, prefixes: np.ndarray, ids: np.ndarray) -> None:
        self._vecs = np.concatenate([self._vecs, vectors])

    def _search(self, queries: np.ndarray, prefixes: np.ndarray, k: int,
                rows: np.ndarray | None, row_of_query: np.ndarray | None) -> Result:
        n = queries.shape[0]
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        items = np.full((n, k), -1, dtype=np.int64)
        kk = min(k, self.n_items)
        if kk == 0:
            return scores, items
        for lo in range(0, n, self.chunk):
            hi = min(n, lo + self.chunk)
            sims = queries[lo:hi] @ self._vecs.T
            eligible = self._prefix_of[None, :] == prefixes[lo:hi, None]
            if rows is not None and row_of_query is not None:
                eligible &= rows[row_of_query[lo:hi]]
            sims[~eligible] = -np.inf
            top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            top_s = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            top_s = np.take_along_axis(top_s, order, axis=1)
            top[~np.isfinite(top_s)] = -1
            scores[lo:hi, :kk] = top_s
            items[lo:hi, :kk] = top
        return scores, items


def make_prefix_index(backend: str, vectors: np.ndarray, prefixes: np.ndarray, n_prefixes: int,
                      normalize: bool = False) -> PrefixIndex | ExhaustivePrefixIndex:
    """Build the index named by ``PrefixIndexConfig.backend`` ("faiss" or "exhaustive")."""
    if backend == "faiss":
        return PrefixIndex.build(vectors, prefixes, n_prefixes, normalize)
    if backend == "exhaustive":
        return ExhaustivePrefixIndex.build(vectors, prefixes, n_prefixes, normalize)
    raise ValueError(f"unknown prefix index backend {backend!r} (faiss | exhaustive)")
