"""The ranker's candidate pools and features: the copy prior's evidence as a table.

For each task instance (a prompt row of the tasks stage) and each candidate item, one row of
:data:`FEATURES`:

* ``task``: the instruction task, a categorical code (:data:`TASK_CODES`);
* ``hist_len``: how many items the household bought before the cut;
* ``count``, ``count_share``, ``recency``: the household's purchase count of the item over its
  whole history before the cut, that count over the history length, and how many purchases ago
  it last bought it (1 = the last item; NaN = never), what the copy prior's sequence, context and
  purchase-count channels read;
* ``text_match``: the TF-IDF cosine between the instruction and the item's text (the text-match
  channel, :mod:`sigmarec.tasks.text_match`), 0 where they share no word;
* ``rarity``: the share of the catalogue bought at least as often in training (the rarity
  channel; about 0 for the best-seller, 1 for an item never bought);
* ``novelty``: the item's training count over the catalogue's best-seller if its category (at
  the Discover level) is absent from the household's history, else 0 (the novelty channel,
  :mod:`sigmarec.tasks.novelty`, for any item, not only its listed best sellers);
* ``popularity``: the item's training count over the best-seller's;
* ``sasrec``, ``cooccurrence``: the two baselines' scores of the item for this history
  (co-occurrence's evidence, 0 where no history item co-occurs with it).

Every value reads the history before the cut, the catalogue and training-window counts only: a
row is as leak-free as the history it is given (:func:`training_histories` checks that a
training row's history and target basket lie inside the training window).

The pool of an instance is the union of the copy prior's channel lists as the tasks stage wrote
them for its prompt (recent window, "bought most often", purchase counts, novelty list) and the
instruction's text matches, plus SASRec's top ``sasrec_top``: a pool no smaller than the
candidates SIGMA's copy prior adds to its own retrieval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.tasks.config import TASK_NAMES
from sigmarec.tasks.text import clean_words
from sigmarec.tasks.text_match import InstructionMatcher

FEATURES: tuple[str, ...] = ("task", "hist_len", "count", "count_share", "recency", "text_match",
                             "rarity", "novelty", "popularity", "sasrec", "cooccurrence")
TASK_CODES: dict[str, int] = {name: i for i, name in enumerate(TASK_NAMES)}
# (users, full histories) -> (batch, n_items) scores of every catalogue item.
Scorer = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class ItemStats:
    """Per-item values that do not depend on the household, from training counts only."""

    popularity: np.ndarray  # train count / the best-seller's
    rarity: np.ndarray  # share of the catalogue bought at least as often
    novelty_value: np.ndarray  # train count / the best-seller's among items with a category
    category: np.ndarray  # category code at the Discover level, -1 = none
    popular: np.ndarray  # item ids, most bought first (ties by id)

    @classmethod
    def from_counts(cls, train_counts: np.ndarray, category: np.ndarray) -> ItemStats:
        counts = np.asarray(train_counts, dtype=np.float64)
        cat = np.asarray(category, dtype=np.int64)
        if counts.shape != cat.shape:
            raise ValueError(f"{len(counts)} item counts but {len(cat)} item categories")
        order = np.sort(counts)
        at_least = len(counts) - np.searchsorted(order, counts, side="left")
        top = counts.max(initial=0.0)
        has = (cat >= 0) & (counts > 0)
        top_cat = counts[has].max(initial=0.0)
        return cls(popularity=counts / top if top > 0 else np.zeros_like(counts),
                   rarity=at_least / max(len(counts), 1),
                   novelty_value=np.where(has, counts / max(top_cat, 1.0), 0.0),
                   category=cat,
                   popular=np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64))

    @property
    def n_items(self) -> int:
        return len(self.popularity)


def purchase_stats(history: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count, recency) of each of ``items`` in ``history``: purchases, and purchases ago it was
    last bought (1 = the last item of the history; NaN = never bought)."""
    h = np.asarray(history, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    count = np.zeros(len(items))
    recency = np.full(len(items), np.nan)
    if not len(h) or not len(items):
        return count, recency
    uniq, first_rev, n = np.unique(h[::-1], return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, items), len(uniq) - 1)
    found = uniq[pos] == items
    count[found] = n[pos[found]]
    recency[found] = first_rev[pos[found]] + 1
    return count, recency


def novelty_scores(stats: ItemStats, history: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The novelty value of each of ``items``: 0 unless its category is new to ``history``."""
    h = np.asarray(history, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    seen = np.unique(stats.category[h]) if len(h) else np.zeros(0, dtype=np.int64)
    cat = stats.category[items]
    new = (cat >= 0) & ~np.isin(cat, seen)
    return np.where(new, stats.novelty_value[items], 0.0)


def instance_features(task: str, history: np.ndarray, items: np.ndarray, stats: ItemStats,
                      text: np.ndarray, sasrec: np.ndarray, cooc: np.ndarray) -> np.ndarray:
    """(len(items), len(FEATURES)) float32 rows of one instance (see the module docstring);
    ``text``, ``sasrec``, ``cooc`` are the instance's scores of ``items``, aligned with them."""
    if task not in TASK_CODES:
        raise StageError(f"ranker: unknown task {task!r}; tasks are {list(TASK_CODES)}")
    items = np.asarray(items, dtype=np.int64)
    n_hist = len(history)
    count, recency = purchase_stats(history, items)
    cols = {
        "task": np.full(len(items), TASK_CODES[task], dtype=np.float64),
        "hist_len": np.full(len(items), n_hist, dtype=np.float64),
        "count": count,
        "count_share": count / max(n_hist, 1),
        "recency": recency,
        "text_match": np.asarray(text, dtype=np.float64),
        "rarity": stats.rarity[items],
        "novelty": novelty_scores(stats, history, items),
        "popularity": stats.popularity[items],
        "sasrec": np.asarray(sasrec, dtype=np.float64),
        "cooccurrence": np.maximum(np.asarray(cooc, dtype=np.float64), 0.0),
    }
    return np.stack([cols[f] for f in FEATURES], axis=1).astype(np.float32)


def _ints(value: object) -> np.ndarray:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(value, dtype=np.int64)


def channel_items(row: object, matched: np.ndarray) -> np.ndarray:
    """The copy prior's channel lists of a prompt row, in channel order, deduplicated: recent
    window, "bought most often", purchase counts, text matches, novelty list."""
    parts = [_ints(getattr(row, c, None)) for c in ("history", "frequent", "count_items")]
    parts += [np.asarray(matched, dtype=np.int64), _ints(getattr(row, "novel_items", None))]
    return pd.unique(np.concatenate(parts)).astype(np.int64)


@dataclass
class Sources:
    """Everything a pool and its features are read from."""

    stats: ItemStats
    matcher: InstructionMatcher
    sasrec: Scorer
    cooc: Scorer
    sasrec_top: int
    bought_first: bool = True

    def text_scores(self, instructions: Sequence[str]) -> np.ndarray:
        """(B, n_items) float32 TF-IDF cosine of every item to each instruction."""
        m = self.matcher
        q = m.vectorizer.transform([" ".join(clean_words(str(t))) for t in instructions])
        return np.asarray((q @ m.matrix).toarray(), dtype=np.float32)


@dataclass
class Groups:
    """Ranking groups: rows of ``features`` in instance order, ``sizes`` rows per group."""

    features: np.ndarray  # (N, F) float32
    items: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int32, 1 = a target of the instance
    sizes: np.ndarray  # (G,) rows per group
    frame_rows: np.ndarray  # (G,) the row of the instance frame each group ranks

    def subset(self, keep: np.ndarray) -> Groups:
        """Only the groups ``keep`` (bool per group) marks."""
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        rows = np.concatenate([np.arange(s, s + n) for s, n, k in
                               zip(starts, self.sizes, keep, strict=True) if k] or [[]])
        rows = rows.astype(np.int64)
        return Groups(self.features[rows], self.items[rows], self.labels[rows],
                      self.sizes[keep], self.frame_rows[keep])

    def has_positive(self) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        if not len(self.sizes):
            return np.zeros(0, dtype=bool)
        return np.add.reduceat(self.labels, starts) > 0 if len(self.labels) else \
            np.zeros(len(self.sizes), dtype=bool)


def training_histories(data: ProcessedData, df: pd.DataFrame) -> list[np.ndarray]:
    """The whole history before each training sample's cut, refusing a sample whose target
    basket does not start inside the user's training window (its history or its target would
    read the evaluation period)."""
    n_train = np.bincount(data.train()["user_idx"].to_numpy(np.int64), minlength=data.n_users)
    users = df["user_idx"].to_numpy(np.int64)
    hist = df["hist_len"].to_numpy(np.int64)
    bad = np.flatnonzero(hist >= n_train[users])
    if len(bad):
        r = df.iloc[int(bad[0])]
        raise StageError(f"ranker: training sample {r.get('sample_id', bad[0])} (user "
                         f"{int(r['user_idx'])}) cuts at position {int(r['hist_len'])} but the "
                         f"user has {int(n_train[int(r['user_idx'])])} training interactions: "
                         "its target is not in the training window")
    return data.histories(df)


def build_groups(df: pd.DataFrame, histories: list[np.ndarray], src: Sources, *,
                 allow: np.ndarray | None = None, fill: int = 0,
                 negatives: int | None = None, seed: int = 0, batch_size: int = 256,
                 desc: str = "ranker features") -> Groups:
    """One ranking group per row of ``df`` (tasks-stage rows: instruction, task, the channel
    columns, ``targets``) over its pool (module docstring), its features and 0/1 labels.

    ``allow`` (len(df), n_items) bool: the rule filter (``+rule`` lists); a row that does not
    admit every item keeps only the admitted pool items, takes SASRec's top among the admitted
    items and the ``fill`` most popular admitted ones. ``negatives``: keep every positive and
    a seeded sample of that many other pool items (training only)."""
    if len(histories) != len(df):
        raise ValueError(f"{len(histories)} histories for {len(df)} rows")
    stats = src.stats
    rng = np.random.default_rng(seed)
    feats, items_out, labels, sizes = [], [], [], []
    rows = list(df.itertuples(index=False))
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        chunk = rows[s:s + batch_size]
        hist = histories[s:s + batch_size]
        users = np.asarray([int(r.user_idx) for r in chunk], dtype=np.int64)
        instr = [str(r.instruction) for r in chunk]
        prefer = [_ints(getattr(r, "count_items", None)).tolist() for r in chunk] \
            if src.bought_first else None
        matched = src.matcher.match(instr, prefer)
        text = src.text_scores(instr)
        sas = np.asarray(src.sasrec(users, hist), dtype=np.float32)
        cooc = np.asarray(src.cooc(users, hist), dtype=np.float32)
        for j, row in enumerate(chunk):
            pool = channel_items(row, matched[j][0])
            ok = None if allow is None else allow[s + j]
            sas_j = sas[j]
            if ok is not None and not ok.all():
                pool = pool[ok[pool]]
                sas_j = np.where(ok, sas_j, -np.inf)
                extra = stats.popular[ok[stats.popular]][:fill]
                pool = np.concatenate([pool, extra])
            if src.sasrec_top:
                top = np.argpartition(-sas_j, min(src.sasrec_top, len(sas_j) - 1))
                top = top[: src.sasrec_top]
                top = top[np.isfinite(sas_j[top])]
                pool = np.concatenate([pool, top[np.argsort(-sas_j[top], kind="stable")]])
            pool = pd.unique(pool).astype(np.int64)
            y = np.isin(pool, _ints(row.targets)).astype(np.int32)
            if negatives is not None and (y == 0).sum() > negatives:
                neg = np.flatnonzero(y == 0)
                keep = np.sort(np.concatenate([np.flatnonzero(y),
                                               rng.choice(neg, negatives, replace=False)]))
                pool, y = pool[keep], y[keep]
            feats.append(instance_features(str(row.task), hist[j], pool, stats, text[j, pool],
                                           sas[j, pool], cooc[j, pool]))
            items_out.append(pool)
            labels.append(y)
            sizes.append(len(pool))
    if not feats:
        return Groups(np.zeros((0, len(FEATURES)), np.float32), np.zeros(0, np.int64),
                      np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Groups(np.concatenate(feats), np.concatenate(items_out), np.concatenate(labels),
                  np.asarray(sizes, dtype=np.int64), np.arange(len(df), dtype=np.int64))
