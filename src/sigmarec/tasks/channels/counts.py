"""The purchase-count channel (``model.repeat_counts``): the household's ``tasks.count_items``
most bought items over its whole history before the cut, valued by their count. The prompt
shows 40 of a median 340 purchases; the repurchase baseline reads them all."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sigmarec.tasks.channels.base import Channel, Lister
from sigmarec.tasks.history import purchase_counts

if TYPE_CHECKING:
    from sigmarec.tasks.config import TasksConfig
    from sigmarec.tasks.resources import TaskResources


class Counts(Channel):
    name: ClassVar[str] = "counts"
    key: ClassVar[str] = "count"
    source = "history"
    flag: ClassVar[str] = "repeat_counts"
    # The rarity channel weighs these items: no counts, no rarity.
    ablation_extra = {"repeat_rarity": False}
    integer_values: ClassVar[bool] = True
    what: ClassVar[str] = "positive purchase counts"
    missing_fix: ClassVar[str] = "build the prompts with tasks.count_items > 0"

    def valid(self, value: float) -> bool:
        return value > 0

    def lister(self, res: TaskResources, cfg: TasksConfig) -> Lister | None:
        n = cfg.count_items
        return lambda history: purchase_counts(history, n)
