"""Step 3 of SIGMA's generation: adaptive probabilistic fusion (APF) and one global sort.

``P(item | T) = P(c_k | T) · softmax_{items of c_k}(cos(h_k, ṽ_item) · s / τ)``, where ``s`` is
the standard deviation of the request's top-K prefix probabilities: a confident prefix
distribution (large ``s``) sharpens the within-prefix ranking, a flat one (small ``s``) flattens
it and lets more prefixes into the top-N. ``fixed`` uses ``s = 1`` (one temperature for every
request), ``off`` ranks by prefix probability first and cosine second (no fusion at all).

``joint`` drops the per-prefix normalisation: ``log P(c_k | T) + score / τ``, one softmax over
all K·M candidates with the prefix probability as a prior (a product of the two experts rather
than the chain rule). Within a prefix it ranks as APF does; across prefixes an item is no longer
lifted for being alone (or one of few) in its prefix, which matters most when a business filter
leaves few eligible items per prefix (docs/experiments.md, round 12).

Every item lives under exactly one prefix, so the K·M candidates of a request are distinct and
the global sort needs no de-duplication.

A repeat-aware model's scores are cosine plus a copy term; ``copy_scale`` re-weights that term at
fusion time (a calibration chosen on validation: the training softmax fits one target of a
basket, the ranking metric rewards every repeat in it). It re-ranks the decoded candidates
only, so every value is a re-sort of the same steps 1-2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sigmarec.generation.config import Fusion

# "off" fusion ranks by prefix first: consecutive prefixes' keys are this far apart.
OFF_GAP = 1000.0


@dataclass
class Candidates:
    """What steps 1-2 produce for a batch of B requests: K prefix slots with M items each.

    Padding: a prefix slot of -1 (log-prob -inf) was not used; an item of -1 (cosine -inf) is an
    empty place in a prefix with fewer than M eligible items.
    """

    prefixes: np.ndarray  # (B, K) int64 flat prefix ids
    prefix_logp: np.ndarray  # (B, K) float64 log P(c_k | T)
    items: np.ndarray  # (B, K, M) int64
    cosine: np.ndarray  # (B, K, M) float64, the copy term included
    # The K used for ``s``: the configured K, even where a request was given extra prefixes to
    # reach N eligible items (those are padding for the statistic, not a different request).
    k_for_spread: int
    # (B, K, M) the copy term inside ``cosine`` (repeat-aware models), None = none.
    copy: np.ndarray | None = None

    def __post_init__(self) -> None:
        b, k, m = self.items.shape
        if self.prefixes.shape != (b, k) or self.prefix_logp.shape != (b, k):
            raise ValueError("prefixes / prefix_logp must be (B, K) like items' first two axes")
        if self.cosine.shape != (b, k, m):
            raise ValueError("cosine must have the shape of items")
        if self.copy is not None and self.copy.shape != (b, k, m):
            raise ValueError("copy must have the shape of items")

    def scores(self, copy_scale: float = 1.0) -> np.ndarray:
        """(B, K, M) in-prefix scores with the copy term weighted by ``copy_scale``."""
        if self.copy is None or copy_scale == 1.0:
            return self.cosine
        if copy_scale < 0:
            raise ValueError(f"copy_scale must be >= 0, got {copy_scale}")
        return self.cosine + (copy_scale - 1.0) * np.where(np.isfinite(self.cosine),
                                                           self.copy, 0.0)


def take_rows(c: Candidates, idx: np.ndarray) -> Candidates:
    """The candidates of the requests ``idx`` only (same K, M and spread)."""
    return Candidates(c.prefixes[idx], c.prefix_logp[idx], c.items[idx], c.cosine[idx],
                      c.k_for_spread, None if c.copy is None else c.copy[idx])


def tuned_mode(mode: Fusion) -> Fusion:
    """The mode whose tau and copy scale are chosen for a run fused in ``mode``: ``off`` has
    none, so its run tunes adaptive (also used for its sigma+rule lists)."""
    return mode if mode != "off" else "adaptive"


def truncate(c: Candidates, k: int) -> Candidates:
    """The candidates as if step 1 had kept only the first ``k`` prefixes (the beam is sorted
    by probability, so these are its top ``k``; exactly a K = ``k`` decode for a one-level
    prefix, the best-first part of a wider beam for several levels)."""
    return Candidates(c.prefixes[:, :k], c.prefix_logp[:, :k], c.items[:, :k], c.cosine[:, :k],
                      min(k, c.k_for_spread), None if c.copy is None else c.copy[:, :k])


def prefix_spread(prefix_logp: np.ndarray, k: int) -> np.ndarray:
    """``s`` per request: population std of the probabilities of its (first) ``k`` prefixes."""
    p = np.exp(prefix_logp[:, :k])
    valid = np.isfinite(prefix_logp[:, :k])
    n = np.maximum(valid.sum(1), 1)
    mean = np.where(valid, p, 0.0).sum(1) / n
    var = np.where(valid, (p - mean[:, None]) ** 2, 0.0).sum(1) / n
    return np.sqrt(var)


def _log_softmax_masked(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    x = np.where(valid, x, -np.inf)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    z = np.exp(x - top)
    lse = np.log(np.maximum(z.sum(-1, keepdims=True), 1e-300)) + top
    return np.where(valid, x - lse, -np.inf)


def fused_scores(c: Candidates, mode: Fusion, tau: float, copy_scale: float = 1.0
                 ) -> np.ndarray:
    """(B, K, M) log P(item | T) of every candidate (``off``: a lexicographic key instead)."""
    cosine = c.scores(copy_scale)
    valid = (c.items >= 0) & np.isfinite(cosine) & np.isfinite(c.prefix_logp)[:, :, None]
    if mode == "off":
        # Prefix first, cosine (in [-1, 1]) second: a key with the same order as the tuple.
        rank = np.argsort(np.argsort(-c.prefix_logp, axis=1, kind="stable"), axis=1)
        # (Scores are cosines, plus a copy term for repeat-aware models: well inside the gap.)
        key = -rank[:, :, None] * OFF_GAP + np.clip(cosine, -OFF_GAP / 4, OFF_GAP / 4)
        return np.where(valid, key, -np.inf)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if mode == "joint":
        return np.where(valid, c.prefix_logp[:, :, None] + np.where(valid, cosine, 0.0) / tau,
                        -np.inf)
    if mode == "adaptive":
        scale = prefix_spread(c.prefix_logp, c.k_for_spread) / tau
    elif mode == "fixed":
        scale = np.full(c.items.shape[0], 1.0 / tau)
    else:
        raise ValueError(f"unknown fusion mode {mode!r} (adaptive | fixed | joint | off)")
    within = _log_softmax_masked(np.where(valid, cosine, 0.0) * scale[:, None, None], valid)
    return np.where(valid, c.prefix_logp[:, :, None] + within, -np.inf)


def fuse(c: Candidates, mode: Fusion, tau: float, n: int, copy_scale: float = 1.0
         ) -> tuple[np.ndarray, np.ndarray]:
    """The global top-``n``: (items (B, n), scores (B, n)), padded with -1 / -inf."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    b = c.items.shape[0]
    scores = fused_scores(c, mode, tau, copy_scale).reshape(b, -1)
    items = c.items.reshape(b, -1)
    # Stable sort on (-score, flat position): ties keep prefix order, then within-prefix order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    top_s = np.take_along_axis(scores, order, axis=1)
    top_i = np.take_along_axis(items, order, axis=1)
    top_i = np.where(np.isfinite(top_s), top_i, -1)
    if top_i.shape[1] < n:
        pad = n - top_i.shape[1]
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_i, top_s


def fuse_by_group(c: Candidates, groups: np.ndarray,
                  settings: Mapping[str, tuple[float, float]], default: tuple[float, float],
                  n: int, mode: Fusion = "adaptive") -> tuple[np.ndarray, np.ndarray]:
    """:func:`fuse` with each request at its group's (tau, copy scale) (e.g. per task, chosen
    on validation), ``default`` for groups without one. Rows are independent in :func:`fuse`,
    so this equals fusing each group alone."""
    groups = np.asarray(groups)
    if groups.shape != (c.items.shape[0],):
        raise ValueError(f"groups must have one entry per request ({c.items.shape[0]}), got "
                         f"shape {groups.shape}")
    per_row = [settings.get(g, default) for g in groups.tolist()]
    items = np.full((len(per_row), n), -1, dtype=np.int64)
    scores = np.full((len(per_row), n), -np.inf)
    for setting in dict.fromkeys(per_row):
        idx = np.flatnonzero([s == setting for s in per_row])
        items[idx], scores[idx] = fuse(take_rows(c, idx), mode, setting[0], n, setting[1])
    return items, scores
