"""The data stage: source -> validated schema -> filtered, indexed, split ``ProcessedData``."""

from __future__ import annotations

from typing import Any, ClassVar

from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.build import build
from sigmarec.data.sources import load_source
from sigmarec.data.stats import processed_stats


class DataStage(Stage):
    name: ClassVar[str] = "data"
    config_sections: ClassVar[tuple[str, ...]] = ("data",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ds = load_source(ctx.config.data)
        data = build(ds, ctx.config.data, ctx.config.seed)
        data.info["stats"] = processed_stats(data)
        data.save(ctx.out)
        return data.info
