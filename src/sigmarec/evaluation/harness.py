"""Scores one model's ranked lists on one split: accuracy and beyond-accuracy, by task and kind.

Grocery baskets mix re-purchases with discoveries, and a model can look strong by replaying
history alone. So every accuracy metric is also reported against two target subsets:
  "repeat": the instance's targets already in its history,
  "new":    the targets not in it;
an instance whose subset is empty is left out of that kind, and each kind reports its instance
count ``n``. Beyond-accuracy metrics describe the lists, so within a kind they are averaged over
that kind's instances. Layout: ``{task: {kind: {metric: value, "n": count}}}``, with task "ALL"
aggregating every task and kind "all" using every target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import EvalConfig
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.metrics import (
    accuracy_metrics,
    beyond_metrics,
    category_codes,
    coverage,
    head_mask,
    repeated_mask,
)

KINDS = ("all", "repeat", "new")
ALL_TASKS = "ALL"
MEAN_TASK = "MEAN"
# Fixed, not the run seed: every seed and every model is scored on the same subset.
SUBSET_SEED = 0


def eval_instances(data: ProcessedData, split: str, cfg: EvalConfig) -> pd.DataFrame:
    """The instances a split is scored on: all of them, or a fixed sample of ``max_instances``.

    Model stages should rank exactly these (ranking more is harmless: extras are ignored).
    """
    inst = data.eval_instances(split)
    if cfg.max_instances is not None and len(inst) > cfg.max_instances:
        rng = np.random.default_rng(SUBSET_SEED)
        keep = np.sort(rng.choice(len(inst), size=cfg.max_instances, replace=False))
        inst = inst.iloc[keep].reset_index(drop=True)
    return inst


def _few(values: Any, n: int = 5) -> str:
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    more = f" (+{len(values) - n} more)" if len(values) > n else ""
    return f"{values[:n]}{more}"


def align_rankings(
    data: ProcessedData,
    rankings: pd.DataFrame,
    split: str,
    cfg: EvalConfig,
    source: str = "rankings",
    instances: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Validate a rankings table; return the scored instances and their (n, max K) item lists.

    ``instances``: the instances to score (e.g. the tasks stage's); default the data stage's.
    Every problem is a ``StageError`` naming ``source``, so a broken model output fails loudly
    instead of quietly scoring zero or above one.
    """
    missing_cols = [c for c in ("instance_id", "items") if c not in rankings.columns]
    if missing_cols:
        raise StageError(
            f"{source}: missing column(s) {missing_cols}; found {list(rankings.columns)}"
        )
    ids = rankings["instance_id"]
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise StageError(f"{source}: duplicate instance_id(s) {_few(dup)}")
    if instances is None:
        inst = eval_instances(data, split, cfg)
        all_split = set(data.eval_instances(split)["instance_id"].tolist())
    else:
        inst = instances.reset_index(drop=True)
        all_split = set(inst["instance_id"].tolist())
    foreign = sorted(set(ids.tolist()) - all_split)
    if foreign:
        raise StageError(f"{source}: instance_id(s) {_few(foreign)} are not {split} instances")
    row_of = pd.Series(np.arange(len(rankings)), index=ids.to_numpy())
    absent = sorted(set(inst["instance_id"].tolist()) - set(row_of.index.tolist()))
    if absent:
        raise StageError(
            f"{source}: {len(absent)} of {len(inst)} {split} instances have no ranking, e.g. "
            f"{_few(absent)}"
        )
    lists = rankings["items"].iloc[row_of.loc[inst["instance_id"]].to_numpy()].tolist()
    k_max = max(cfg.ks)
    for iid, lst in zip(inst["instance_id"], lists, strict=True):
        if lst is None or len(lst) < k_max:
            length = 0 if lst is None else len(lst)
            raise StageError(
                f"{source}: instance {iid} has a list of {length} items but eval.ks needs "
                f"K={k_max}; write at least eval.top_n ({cfg.top_n}) items per list"
            )
    ranked = np.array([np.asarray(lst)[:k_max] for lst in lists]).reshape(len(lists), k_max)
    if ranked.size and not np.issubdtype(ranked.dtype, np.integer):
        raise StageError(f"{source}: items must be integer item_idx values, got {ranked.dtype}")
    ranked = ranked.astype(np.int64)
    bad = (ranked < 0) | (ranked >= data.n_items)
    if bad.any():
        r = int(bad.any(axis=1).nonzero()[0][0])
        raise StageError(
            f"{source}: instance {inst['instance_id'].iloc[r]} ranks item(s) "
            f"{_few(ranked[r][bad[r]])} outside the catalogue [0, {data.n_items})"
        )
    rep = repeated_mask(ranked)
    if rep.any():
        r = int(rep.any(axis=1).nonzero()[0][0])
        raise StageError(
            f"{source}: instance {inst['instance_id'].iloc[r]} lists item(s) "
            f"{_few(ranked[r][rep[r]])} more than once in its top {k_max}"
        )
    return inst, ranked


def _kind_targets(
    targets: list[np.ndarray], histories: list[np.ndarray]
) -> dict[str, list[np.ndarray]]:
    repeat, new = [], []
    for t, h in zip(targets, histories, strict=True):
        t = np.unique(np.asarray(t, dtype=np.int64))
        seen = np.isin(t, h)
        repeat.append(t[seen])
        new.append(t[~seen])
    return {"all": targets, "repeat": repeat, "new": new}


def instance_metrics(
    data: ProcessedData, inst: pd.DataFrame, ranked: np.ndarray, cfg: EvalConfig,
    allow: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per instance: target counts, ``{kind}:{metric}`` accuracy (NaN if the kind is empty) and
    beyond-accuracy metrics - the raw material for aggregates and paired significance tests."""
    histories = data.histories(inst)
    targets = [np.asarray(t, dtype=np.int64) for t in inst["targets"]]
    out = pd.DataFrame({"instance_id": inst["instance_id"].to_numpy(),
                        "task": inst["task"].to_numpy()})
    for kind, kt in _kind_targets(targets, histories).items():
        sizes = np.array([len(np.unique(t)) for t in kt], dtype=np.int64)
        out[f"n_{kind}"] = sizes
        rows = np.flatnonzero(sizes > 0)
        acc = accuracy_metrics(ranked[rows], [kt[i] for i in rows], cfg.ks) if len(rows) else {}
        for name, values in acc.items():
            col = np.full(len(inst), np.nan)
            col[rows] = values
            out[f"{kind}:{name}"] = col
    cats = category_codes(data.items["category_path"].tolist(), cfg.category_level)
    head = head_mask(data.train_item_counts, cfg.long_tail_head_share)
    for name, values in beyond_metrics(ranked, cfg.ks, cats, head, histories).items():
        out[name] = values
    if allow is not None:
        # Instruction following: the share of listed items that satisfy the instance's rule.
        ok = np.take_along_axis(allow, ranked, axis=1)
        for k in cfg.ks:
            out[f"RuleShare@{k}"] = ok[:, :k].mean(axis=1)
    return out


def _aggregate(
    per: pd.DataFrame, ranked: np.ndarray, cfg: EvalConfig, n_items: int
) -> dict[str, dict[str, Any]]:
    beyond = [c for c in per.columns if "@" in c and ":" not in c]
    res: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mask = (per[f"n_{kind}"] > 0).to_numpy()
        entry: dict[str, Any] = {"n": int(mask.sum())}
        if mask.any():
            sub = per.loc[mask]
            for c in per.columns:
                if c.startswith(f"{kind}:"):
                    entry[c.split(":", 1)[1]] = float(sub[c].mean())
            entry.update({c: float(sub[c].mean()) for c in beyond})
            entry.update(coverage(ranked[mask], cfg.ks, n_items))
        res[kind] = entry
    return res


def evaluate_rankings(
    data: ProcessedData,
    rankings_df: pd.DataFrame,
    split: str,
    cfg: EvalConfig,
    source: str = "rankings",
    instances: pd.DataFrame | None = None,
    allow: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every metric, per task and target kind, plus the "ALL" task (see module doc).

    With several tasks, "MEAN" is the unweighted mean of the tasks' "all" metrics (each task
    counts once, however many instances it has). ``allow`` (n_instances, n_items), aligned with
    ``instances``, adds the instruction-following share ``RuleShare@K``.
    """
    inst, ranked = align_rankings(data, rankings_df, split, cfg, source, instances)
    if len(inst) == 0:
        raise StageError(f"{source}: the {split} split has no instances to evaluate")
    per = instance_metrics(data, inst, ranked, cfg, allow)
    result = {ALL_TASKS: _aggregate(per, ranked, cfg, data.n_items)}
    tasks = per["task"].to_numpy()
    for task in sorted(set(tasks.tolist())):
        m = tasks == task
        result[task] = _aggregate(per.loc[m].reset_index(drop=True), ranked[m], cfg, data.n_items)
    names = sorted(set(tasks.tolist()))
    if len(names) > 1:
        keys = set.intersection(*(set(result[t]["all"]) for t in names))
        result[MEAN_TASK] = {"all": {k: float(np.mean([result[t]["all"][k] for t in names]))
                                     for k in sorted(keys) if k != "n"} | {"n": len(names)}}
    return result
