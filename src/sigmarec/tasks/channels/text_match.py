"""The text-match channel (``model.text_match``): the catalogue items whose text the
instruction's words match (:mod:`sigmarec.tasks.text_match`), valued by their cosine x
``model.text_match_scale``. How a Category or Query instruction reaches the scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sigmarec.tasks.channels.base import Channel, ExampleContext, Lists

if TYPE_CHECKING:
    import pandas as pd


class TextMatch(Channel):
    name: ClassVar[str] = "text_match"
    key: ClassVar[str] = "match"
    source = "instruction"
    flag: ClassVar[str] = "text_match"
    scale: ClassVar[str | None] = "text_match_scale"
    ablation_extra = {"text_match_tags": False, "text_match_bought_first": False}
    what: ClassVar[str] = "cosines in (0, 1]"
    missing_fix: ClassVar[str] = "build the examples with to_examples(..., matcher=...)"

    def example_lists(self, rows: pd.DataFrame, ctx: ExampleContext) -> list[Lists]:
        if ctx.matcher is None:
            return [((), ())] * len(rows)
        # text_match_bought_first keeps the household's own purchases first: the counts
        # channel's items (listed before this one).
        prefer = ([c for c, _ in ctx.lists["counts"]] if ctx.model_cfg.text_match_bought_first
                  else None)
        matches = ctx.matcher.match(rows["instruction"].astype(str).tolist(), prefer)
        return [(tuple(int(i) for i in items), tuple(float(v) for v in values))
                for items, values in matches]
