"""Facts about the catalogue and the training period that the task definitions read.

Everything here is either catalogue metadata (category paths) or counted on the training period
only (``ProcessedData.train()``): popularity, seasonal lift and the lift of training-period
holidays. The one exception is documented and deliberate: the item set of an *evaluation*
holiday (Thanksgiving in validation, Christmas and New Year in test) is computed from that
window's own purchases. It only decides which evaluation targets count as holiday items (and
judges the rule); it never feeds a training sample, so the model has to generalise to those
holidays through item semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.tasks.config import HolidayWindow, TasksConfig
from sigmarec.tasks.text import GENERIC, clean_words, profile_text

SPLITS = ("train", "valid", "test")


def smoothed_lift(n_in: np.ndarray, total_in: int, n_out: np.ndarray, total_out: int,
                  alpha: float) -> np.ndarray:
    """Observed over expected purchases inside a window, both shrunk by ``alpha`` pseudo-counts
    (so a rarely bought item cannot reach a high lift by chance)."""
    if total_in <= 0 or total_out <= 0:
        return np.ones(len(n_in))
    expected = n_out.astype(float) * (total_in / total_out)
    return (n_in + alpha) / (expected + alpha)


@dataclass
class TaskResources:
    n_items: int
    n_users: int
    depth: int
    level_codes: np.ndarray  # (depth, n_items) int64, -1 = item has no such level
    level_names: list[list[str]]
    item_query: np.ndarray  # (n_items,) object: the search query of the item's product type
    train_counts: np.ndarray
    longtail_threshold: float
    longtail: np.ndarray  # (n_items,) bool
    eligible: np.ndarray  # (n_items,) bool: may be the target of a task other than JustForYou
    season_names: list[str]
    month_season: np.ndarray  # (13,) int64, index = month, -1 = no season
    season_items: np.ndarray  # (n_seasons, n_items) bool
    holidays: list[HolidayWindow]
    holiday_split: dict[str, str | None]  # name -> "train"/"valid"/"test"; None = not usable
    holiday_items: dict[str, np.ndarray]  # name -> (n_items,) bool
    valid_start: pd.Timestamp | None
    test_start: pd.Timestamp | None
    profiles: list[str]
    category_level: int
    discover_level: int
    discover_min_history: int
    notes: dict[str, str] = field(default_factory=dict)
    has_dates: bool = True  # False: times are synthetic (sequence positions), no calendar

    @property
    def query_names(self) -> list[str]:
        return sorted({q for q in self.item_query.tolist() if q})

    def holiday(self, name: str) -> HolidayWindow:
        for h in self.holidays:
            if h.name == name:
                return h
        raise KeyError(name)

    def level_of(self, item: int, level: int) -> str | None:
        c = int(self.level_codes[level, item])
        return None if c < 0 else self.level_names[level][c]

    def holiday_index(self, timestamps: pd.Series | pd.DatetimeIndex) -> np.ndarray:
        """Index into ``holidays`` of the window each timestamp falls in (-1 = none)."""
        days = pd.DatetimeIndex(timestamps).normalize()
        out = np.full(len(days), -1, dtype=np.int64)
        for i, h in enumerate(self.holidays):
            m = (days >= pd.Timestamp(h.start)) & (days <= pd.Timestamp(h.end))
            out[np.asarray(m)] = i
        return out


def _paths(items: pd.DataFrame) -> list[list[str]]:
    col = items["category_path"] if "category_path" in items.columns else None
    out = []
    for p in (col if col is not None else [""] * len(items)):
        if not isinstance(p, str) or not p.strip():
            out.append([])
        else:
            out.append([x.strip() for x in p.split(CATEGORY_SEP) if x.strip()])
    return out


def _levels(paths: list[list[str]], depth: int) -> tuple[np.ndarray, list[list[str]]]:
    codes = np.full((depth, len(paths)), -1, dtype=np.int64)
    names: list[list[str]] = []
    for lv in range(depth):
        # Keyed by the name an instruction shows: equal names under different parents are one
        # category (what a shopper asking for "cheese" means).
        keys = [p[lv] if len(p) > lv else None for p in paths]
        uniq = sorted({k for k in keys if k is not None})
        index = {k: i for i, k in enumerate(uniq)}
        codes[lv] = [index[k] if k is not None else -1 for k in keys]
        names.append(uniq)
    return codes, names


def item_queries(paths: list[list[str]]) -> np.ndarray:
    """Search query per item from its product type (the leaf of its path): cleaned words, with
    the parent category's words added when the product type alone is generic or ambiguous
    (the same name under several parents)."""
    parents: dict[str, set[str]] = {}
    for p in paths:
        if p:
            parents.setdefault(p[-1], set()).add(p[-2] if len(p) > 1 else "")
    out = np.empty(len(paths), dtype=object)
    for i, p in enumerate(paths):
        if not p:
            out[i] = ""
            continue
        words = clean_words(p[-1])
        ambiguous = len(parents[p[-1]]) > 1 or (len(words) <= 1 and set(words) <= GENERIC)
        if ambiguous and len(p) > 1:
            words = words + [w for w in clean_words(p[-2]) if w not in words]
        out[i] = " ".join(words)
    return out


def _season_items(train: pd.DataFrame, cfg: TasksConfig, n_items: int,
                  month_season: np.ndarray) -> np.ndarray:
    names = list(cfg.seasons)
    out = np.zeros((len(names), n_items), dtype=bool)
    if train.empty:
        return out
    seas = month_season[train["timestamp"].dt.month.to_numpy()]
    items = train["item_idx"].to_numpy()
    total = np.bincount(items, minlength=n_items)
    for s in range(len(names)):
        m = seas == s
        if not m.any() or m.all():
            continue
        n_in = np.bincount(items[m], minlength=n_items)
        lift = smoothed_lift(n_in, int(m.sum()), total - n_in, int((~m).sum()),
                             cfg.lift_smoothing)
        out[s] = (lift >= cfg.season_min_lift) & (n_in >= cfg.season_min_count)
    return out


def _holiday_split(h: HolidayWindow, valid_start: pd.Timestamp | None,
                   test_start: pd.Timestamp | None, first: pd.Timestamp,
                   last: pd.Timestamp) -> str | None:
    start, end = pd.Timestamp(h.start), pd.Timestamp(h.end) + pd.Timedelta(days=1)
    if end <= first or start > last:
        return None  # outside the data
    if valid_start is None or test_start is None:
        return "train"  # leave-one-out data: no global evaluation period
    if end <= valid_start:
        return "train"
    if start >= valid_start and end <= test_start:
        return "valid"
    if start >= test_start:
        return "test"
    return None  # straddles a cut-off: never used, so it cannot leak across it


def build_resources(data: ProcessedData, cfg: TasksConfig) -> TaskResources:
    n_items = data.n_items
    paths = _paths(data.items)
    depth = max((len(p) for p in paths), default=0)
    codes, names = _levels(paths, depth)
    train = data.train()
    counts = np.bincount(train["item_idx"].to_numpy(), minlength=n_items)
    threshold = float(np.quantile(counts, cfg.longtail_quantile)) if n_items else 0.0
    longtail = counts < threshold
    if not longtail.any():  # heavy ties at the quantile: fall back to "at most"
        longtail = counts <= threshold

    month_season = np.full(13, -1, dtype=np.int64)
    for s, months in enumerate(cfg.seasons.values()):
        month_season[months] = s

    info = data.info or {}
    vs = pd.Timestamp(info["valid_start"]) if info.get("valid_start") else None
    ts = pd.Timestamp(info["test_start"]) if info.get("test_start") else None
    inter = data.interactions
    first, last = inter["timestamp"].min(), inter["timestamp"].max()
    holiday_split = {h.name: _holiday_split(h, vs, ts, first, last) for h in cfg.holidays}

    holiday_items: dict[str, np.ndarray] = {}
    train_items = train["item_idx"].to_numpy()
    train_days = train["timestamp"].dt.normalize()
    for h in cfg.holidays:
        split = holiday_split[h.name]
        mask = np.zeros(n_items, dtype=bool)
        if split is not None:
            in_train = ((train_days >= pd.Timestamp(h.start))
                        & (train_days <= pd.Timestamp(h.end))).to_numpy()
            if split == "train":
                n_in = np.bincount(train_items[in_train], minlength=n_items)
                tot_in = int(in_train.sum())
                n_out = counts - n_in
                tot_out = len(train) - tot_in
            else:
                # Evaluation holiday: the window's own purchases against the training rates.
                days = inter["timestamp"].dt.normalize()
                w = ((days >= pd.Timestamp(h.start)) & (days <= pd.Timestamp(h.end))
                     & (inter["split"] == split)).to_numpy()
                n_in = np.bincount(inter["item_idx"].to_numpy()[w], minlength=n_items)
                tot_in = int(w.sum())
                n_out, tot_out = counts, len(train)
            if tot_in:
                lift = smoothed_lift(n_in, tot_in, n_out, tot_out, cfg.lift_smoothing)
                mask = (lift >= cfg.holiday_min_lift) & (n_in >= cfg.holiday_min_count)
        holiday_items[h.name] = mask

    prof_cols = [c for c in data.users.columns if c not in ("user_idx", "user_id")]
    users = data.users.sort_values("user_idx")
    profiles = [profile_text(r, prof_cols) for r in users.to_dict("records")]

    last_level = max(depth - 1, 0)
    excluded = {c.strip().upper() for c in cfg.exclude_categories}
    eligible = np.array([not any(x.upper() in excluded for x in p) for p in paths], dtype=bool)
    return TaskResources(
        n_items=n_items,
        n_users=data.n_users,
        depth=depth,
        level_codes=codes,
        level_names=names,
        item_query=item_queries(paths),
        train_counts=counts,
        longtail_threshold=threshold,
        longtail=longtail,
        eligible=eligible,
        season_names=list(cfg.seasons),
        month_season=month_season,
        season_items=_season_items(train, cfg, n_items, month_season),
        holidays=list(cfg.holidays),
        holiday_split=holiday_split,
        holiday_items=holiday_items,
        valid_start=vs,
        test_start=ts,
        profiles=profiles,
        category_level=min(cfg.category_level, last_level),
        discover_level=min(cfg.discover_level, last_level),
        discover_min_history=cfg.discover_min_history,
        has_dates="timestamps" not in info,
    )
