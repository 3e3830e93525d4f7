"""The ranker stage: ``features_ltr``, LightGBM's LambdaRank over the copy prior's evidence.

The peer a practitioner builds first: a learning-to-rank model over the same evidence SIGMA's
copy prior reads (:mod:`sigmarec.ranker.features`), without an LLM. It is trained on the tasks
stage's SFT samples (training window only; one ranking group per sample, its ``targets`` the
relevant items; the catalogue-alignment samples, which ask for no recommendation, are left
out), its few hyper-parameters (``ranker.num_leaves`` x ``ranker.learning_rate``, rounds by
early stopping on validation NDCG@10) chosen by validation HR@10 averaged over tasks, then it
ranks every validation and test instance of the tasks stage:

* ``features_ltr``: the pool sorted by the model's score, filled from popularity to
  ``eval.top_n``;
* ``features_ltr+rule``: the instance's checkable rule as a filter, as the baselines' ``+rule``
  lists: the admitted pool items plus SASRec's and popularity's best admitted items, scored by
  the same model, admitted items first, then the most popular others.

LightGBM (``lightgbm.train``, objective ``lambdarank``) does the learning; only the pools, the
features and the grid are written here. Writes ``rankings/{model}_{split}.parquet``
(instance_id, items, scores), ``selection.json`` (validation figures of every grid point) and
``feature_importance.json`` (total gain per feature).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sigmarec.core.atomic import write_json, write_parquet
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import ConfigError, StageError
from sigmarec.metrics import accuracy_metrics
from sigmarec.ranker.features import (
    FEATURES,
    Groups,
    ItemStats,
    Sources,
    build_groups,
    training_histories,
)
from sigmarec.tasks.resources import build_resources
from sigmarec.tasks.rules import instance_allow_masks, load_tasks
from sigmarec.tasks.text_match import InstructionMatcher, season_tags

log = logging.getLogger("sigmarec")

MODEL = "features_ltr"
SPLITS = ("valid", "test")


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageError(f"{path} not found; rerun the tasks stage")
    return pd.read_parquet(path)


def _scorer(model: Any, batch_size: int) -> Any:
    def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        out = []
        for s in range(0, len(users), batch_size):
            with torch.no_grad():
                out.append(model.score(users[s:s + batch_size],
                                       histories[s:s + batch_size]).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
    return score


def ranked_lists(groups: Groups, scores: np.ndarray, n_rows: int, top: int,
                 popular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, top) items and scores: each group's pool by score (ties to the earlier pool
    item), then the most popular items not in it (score -inf)."""
    items = np.full((n_rows, top), -1, dtype=np.int64)
    out = np.full((n_rows, top), -np.inf)
    start = 0
    for size, r in zip(groups.sizes, groups.frame_rows, strict=True):
        it, sc = groups.items[start:start + size], scores[start:start + size]
        start += size
        order = np.argsort(-sc, kind="stable")[:top]
        items[r, :len(order)], out[r, :len(order)] = it[order], sc[order]
        if len(order) < top:
            rest = popular[~np.isin(popular, it[order])][: top - len(order)]
            items[r, len(order):len(order) + len(rest)] = rest
    return items, out


def task_mean_hr(df: pd.DataFrame, items: np.ndarray, k: int = 10) -> float:
    """HR@k averaged over tasks (each task weighs the same, as in the comparison tables)."""
    hr = accuracy_metrics(items[:, :k], list(df["targets"]), [k])[f"HR@{k}"]
    return float(pd.Series(hr).groupby(df["task"].to_numpy()).mean().mean())


class RankerStage(Stage):
    name: ClassVar[str] = "ranker"
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines", "tasks")
    config_sections: ClassVar[tuple[str, ...]] = ("ranker", "tasks", "eval")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg, rc = ctx.config, ctx.config.ranker
        if not rc.enabled:
            return {"enabled": False, "note": "ranker.enabled is off: features_ltr not trained"}
        import lightgbm as lgb

        t_all = time.perf_counter()
        top = cfg.eval.top_n
        data = ProcessedData.load(ctx.input("data"))
        frames = {s: _read(ctx.input("tasks") / f"{s}.parquet") for s in ("train", *SPLITS)}
        train_df = frames["train"][frames["train"]["task"] != "Align"].reset_index(drop=True)
        if rc.max_train_groups is not None and len(train_df) > rc.max_train_groups:
            keep = np.random.default_rng(cfg.seed).choice(len(train_df), rc.max_train_groups,
                                                          replace=False)
            train_df = train_df.iloc[np.sort(keep)].reset_index(drop=True)
        if train_df.empty:
            raise StageError(f"{ctx.input('tasks')}/train.parquet holds no task samples")
        src = self._sources(ctx, data)
        t0 = time.perf_counter()
        train = build_groups(train_df, training_histories(data, train_df), src,
                             negatives=rc.train_negatives, seed=cfg.seed,
                             batch_size=rc.batch_size, desc="ranker train features")
        train = train.subset(train.has_positive())
        if not len(train.sizes):
            raise StageError("ranker: no training sample has a target in its candidate pool")
        tasks = load_tasks(data, cfg.tasks)
        groups: dict[str, dict[str, Groups]] = {}
        for split in SPLITS:
            df = frames[split]
            if df.empty:
                continue
            hist = data.histories(df)
            allow = instance_allow_masks(data, df, tasks)
            groups[split] = {
                MODEL: build_groups(df, hist, src, batch_size=rc.batch_size,
                                    desc=f"ranker {split} features"),
                f"{MODEL}+rule": build_groups(df, hist, src, allow=allow, fill=top,
                                              batch_size=rc.batch_size,
                                              desc=f"ranker {split}+rule features"),
            }
        feature_s = time.perf_counter() - t0
        log.info("ranker: %d training groups (%d rows), features in %.1fs", len(train.sizes),
                 len(train.labels), feature_s)
        if "valid" not in groups:
            raise StageError(f"{ctx.input('tasks')}/valid.parquet is empty: the ranker's "
                             "hyper-parameters are chosen on validation instances")

        valid = groups["valid"][MODEL]
        stop = valid.subset(valid.has_positive())
        t0 = time.perf_counter()
        grid: list[dict[str, Any]] = []
        best: tuple[float, Any] | None = None
        dtrain = lgb.Dataset(train.features, train.labels, group=train.sizes,
                             categorical_feature=[FEATURES.index("task")], free_raw_data=False)
        dstop = lgb.Dataset(stop.features, stop.labels, group=stop.sizes, reference=dtrain)
        points = [(leaves, lr) for leaves in rc.num_leaves for lr in rc.learning_rate]
        for leaves, lr in tqdm(points, desc="ranker grid", unit="fit", leave=False):
            params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10],
                      "num_leaves": leaves, "learning_rate": lr, "seed": cfg.seed,
                      "num_threads": cfg.threads or 0, "deterministic": True,
                      "force_row_wise": True, "verbose": -1}
            model = lgb.train(params, dtrain, num_boost_round=rc.n_estimators,
                              valid_sets=[dstop], callbacks=[lgb.early_stopping(
                                  rc.early_stopping_rounds, verbose=False)])
            items, _ = ranked_lists(valid, model.predict(valid.features),
                                    len(frames["valid"]), top, src.stats.popular)
            hr = task_mean_hr(frames["valid"], items)
            grid.append({"num_leaves": leaves, "learning_rate": lr,
                         "best_iteration": int(model.best_iteration or rc.n_estimators),
                         "valid_hr10": round(hr, 5)})
            log.info("ranker: num_leaves %d, learning rate %g: %d rounds, validation "
                     "HR@10 %.4f", leaves, lr, grid[-1]["best_iteration"], hr)
            # Ties go to the earlier grid point (fewer leaves, then the smaller rate).
            if best is None or hr > best[0] + 1e-9:
                best = (hr, model)
        fit_s = time.perf_counter() - t0
        assert best is not None
        model = best[1]
        (ctx.out / "rankings").mkdir(parents=True, exist_ok=True)
        for split, by_model in groups.items():
            for name, g in by_model.items():
                items, scores = ranked_lists(g, model.predict(g.features),
                                             len(frames[split]), top, src.stats.popular)
                write_parquet(ctx.out / "rankings" / f"{name}_{split}.parquet", pd.DataFrame({
                    "instance_id": frames[split]["instance_id"].to_numpy(np.int64),
                    "items": list(items), "scores": list(scores)}))
        gain = model.feature_importance(importance_type="gain")
        importance = {f: round(float(v), 2) for f, v in zip(FEATURES, gain, strict=True)}
        chosen = grid[[g["valid_hr10"] for g in grid].index(round(best[0], 5))]
        write_json(ctx.out / "selection.json", {"grid": grid, "chosen": chosen})
        write_json(ctx.out / "feature_importance.json", importance)
        pool = {s: round(float(np.mean(g[MODEL].sizes)), 1) for s, g in groups.items()}
        return {"chosen": chosen, "grid": grid, "train_groups": int(len(train.sizes)),
                "train_rows": int(len(train.labels)), "mean_pool": pool,
                "feature_importance_gain": importance,
                "seconds": {"features": round(feature_s, 1), "fit": round(fit_s, 1),
                            "total": round(time.perf_counter() - t_all, 1)}}

    def _sources(self, ctx: StageContext, data: ProcessedData) -> Sources:
        from sigmarec.baselines.registry import restore

        cfg, rc = ctx.config, ctx.config.ranker
        for name in (rc.sasrec_model, "cooccurrence"):
            if name not in cfg.baselines.enabled:
                raise ConfigError(f"ranker: its {name} feature needs baselines.enabled to "
                                  f"include {name!r} (or set ranker.enabled: false)")
        res = build_resources(data, cfg.tasks)
        category = (res.level_codes[res.discover_level] if res.depth
                    else np.full(data.n_items, -1, dtype=np.int64))
        stats = ItemStats.from_counts(data.train_item_counts, category)
        tags = season_tags(res, data.n_items) if rc.match_tags else None
        matcher = InstructionMatcher.from_items(data.items, rc.match_items, rc.match_min, tags)
        models = ctx.input("baselines") / "models"
        sasrec = restore(rc.sasrec_model, cfg, models / rc.sasrec_model, data)
        cooc = restore("cooccurrence", cfg, models / "cooccurrence", data)
        return Sources(stats=stats, matcher=matcher, sasrec=_scorer(sasrec, cfg.eval.batch_size),
                       cooc=_scorer(cooc, cfg.eval.batch_size), sasrec_top=rc.sasrec_top,
                       bought_first=rc.match_bought_first)
