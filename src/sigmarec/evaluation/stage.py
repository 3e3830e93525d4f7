"""The evaluation stage: scores every ranked list the model stages wrote, on valid and test.

Model stages write ``<stage>/rankings/{model}_{split}.parquet`` (instance_id, items, scores); this
stage finds them in every stage it requires, so a new model stage only has to be added to
``requires`` to appear in the results. All models are scored by this one harness on the same
instances, so their numbers are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from sigmarec.core.atomic import write_json
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.evaluation.harness import ALL_TASKS, evaluate_rankings

SPLITS = ("valid", "test")
SUMMARY_METRICS = ("HR@10", "NDCG@10", "Recall@10")


def find_rankings(ctx: StageContext, split: str) -> dict[str, Path]:
    """Model name -> rankings file of ``split``, over every required stage but "data"."""
    found: dict[str, Path] = {}
    for dep in ctx.inputs:
        if dep == "data":
            continue
        for path in sorted((ctx.input(dep) / "rankings").glob(f"*_{split}.parquet")):
            model = path.name.removesuffix(f"_{split}.parquet")
            if model in found:
                raise StageError(
                    f"model {model!r} has {split} rankings in both {found[model]} and {path}; "
                    "model names must be unique across stages"
                )
            found[model] = path
    return found


def metrics_table(metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Flatten ``{split: {model: {task: {kind: {...}}}}}`` to one row per split/model/task/kind."""
    rows = [
        {"split": split, "model": model, "task": task, "kind": kind, **values}
        for split, models in metrics.items()
        for model, tasks in models.items()
        for task, kinds in tasks.items()
        for kind, values in kinds.items()
    ]
    return pd.DataFrame(rows)


class EvaluationStage(Stage):
    name: ClassVar[str] = "evaluation"
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines")
    config_sections: ClassVar[tuple[str, ...]] = ("eval",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        data = ProcessedData.load(ctx.input("data"))
        cfg = ctx.config.eval
        metrics: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            metrics[split] = {
                model: evaluate_rankings(data, pd.read_parquet(path), split, cfg, source=str(path))
                for model, path in find_rankings(ctx, split).items()
            }
        if not any(metrics.values()):
            raise StageError(
                f"no rankings/*_<split>.parquet found in stages {list(ctx.inputs)}; "
                "did the model stages run?"
            )
        write_json(ctx.out / "metrics.json", metrics)
        metrics_table(metrics).to_csv(ctx.out / "metrics_table.csv", index=False)
        return {
            "models": {split: sorted(m) for split, m in metrics.items()},
            "test": {
                model: {k: round(res[ALL_TASKS]["all"][k], 4) for k in SUMMARY_METRICS
                        if k in res[ALL_TASKS]["all"]}
                for model, res in metrics.get("test", {}).items()
            },
        }
