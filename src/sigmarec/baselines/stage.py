"""The baselines stage: fit every enabled baseline on the training period, write its validation and
test rankings, its model state, and the SASRec item embeddings that become the ID tower.

Artifacts (under the stage folder):
  rankings/{model}_{split}.parquet   instance_id, items (top-N item_idx), scores
  models/{model}/                    model state (SASRec: model.pt + hparams.json)
  item_embeddings.npy                float32 (n_items, hidden), row = item_idx
  item_embeddings.json               {"source": model, "shape": [n_items, hidden]}
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np

from sigmarec.baselines.base import rank_instances
from sigmarec.baselines.registry import SASREC_NAMES, create
from sigmarec.baselines.sasrec import SASRecRecommender
from sigmarec.core.atomic import atomic_path, write_json, write_parquet
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.metrics import accuracy_metrics

log = logging.getLogger("sigmarec")

SPLITS = ("valid", "test")


def id_tower_source(enabled: list[str], preferred: str) -> str | None:
    """The configured SASRec if it runs, else the other one, else none."""
    if preferred in enabled:
        return preferred
    return next((n for n in SASREC_NAMES if n in enabled), None)


class BaselinesStage(Stage):
    name: ClassVar[str] = "baselines"
    requires: ClassVar[tuple[str, ...]] = ("data",)
    config_sections: ClassVar[tuple[str, ...]] = ("data", "eval", "baselines")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config
        data = ProcessedData.load(ctx.input("data"))
        tower = id_tower_source(list(cfg.baselines.enabled), cfg.baselines.id_tower)
        embeddings: np.ndarray | None = None
        summary: dict[str, Any] = {}
        for name in cfg.baselines.enabled:
            model = create(name, cfg)
            log.info("baselines: fitting %s", name)
            start = time.perf_counter()
            fit_summary = model.fit(data)
            fit_seconds = round(time.perf_counter() - start, 2)
            entry: dict[str, Any] = {"fit": fit_summary, "fit_seconds": fit_seconds}
            for split in SPLITS:
                inst = data.eval_instances(split)
                ranked = rank_instances(
                    model, data, inst, top=cfg.eval.top_n, exclude_seen=cfg.eval.exclude_seen,
                    batch_size=cfg.eval.batch_size,
                )
                write_parquet(ctx.out / "rankings" / f"{name}_{split}.parquet", ranked)
                # Validation only: test figures belong to the evaluation stage, not to model choice.
                if split == "valid" and len(inst):
                    m = accuracy_metrics(
                        np.stack(ranked["items"].to_list()), list(inst["targets"]), [10]
                    )
                    entry["valid_ndcg10"] = round(float(m["NDCG@10"].mean()), 5)
                    entry["valid_hr10"] = round(float(m["HR@10"].mean()), 5)
            model.save(ctx.out / "models" / name)
            if name == tower and isinstance(model, SASRecRecommender):
                embeddings = model.item_embeddings()
            log.info("baselines: %s fitted in %.1fs, valid NDCG@10 %s", name, fit_seconds,
                     entry.get("valid_ndcg10"))
            summary[name] = entry
            del model
        if embeddings is None:
            log.info("baselines: no SASRec enabled, so no item_embeddings.npy (ID tower) written")
        else:
            with atomic_path(ctx.out / "item_embeddings.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, embeddings.astype(np.float32))
            write_json(ctx.out / "item_embeddings.json",
                       {"source": tower, "shape": list(embeddings.shape), "dtype": "float32"})
            summary["id_tower"] = {"source": tower, "shape": list(embeddings.shape)}
        return summary
