"""The novelty channel (``model.novelty``): the ``tasks.novel_items`` most bought training
items of the categories absent from the household's whole history before the cut
(:mod:`sigmarec.tasks.novelty`), valued by their popularity over the best-seller's x
``model.novelty_scale``. How a Discover request reaches the scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sigmarec.tasks.channels.base import Channel, Lister
from sigmarec.tasks.novelty import NoveltyLister

if TYPE_CHECKING:
    from sigmarec.tasks.config import TasksConfig
    from sigmarec.tasks.resources import TaskResources


def novelty_lister(res: TaskResources, cfg: TasksConfig) -> NoveltyLister | None:
    """The novelty lists' source for ``cfg`` (None with ``novel_items: 0`` or a catalogue
    without category paths, whose rows then carry empty lists)."""
    if cfg.novel_items <= 0 or res.depth == 0:
        return None
    return NoveltyLister.from_resources(res, cfg.novel_items)


class Novelty(Channel):
    name: ClassVar[str] = "novelty"
    key: ClassVar[str] = "novel"
    source = "history"
    flag: ClassVar[str] = "novelty"
    scale: ClassVar[str | None] = "novelty_scale"
    what: ClassVar[str] = "popularity shares in (0, 1]"
    # A model that reads it would score every Discover request without it.
    strict_rows: ClassVar[bool] = True
    missing_fix: ClassVar[str] = ("build the prompts with tasks.novel_items > 0 (rerun the "
                                  "tasks stage)")

    def lister(self, res: TaskResources, cfg: TasksConfig) -> Lister | None:
        found = novelty_lister(res, cfg)
        return None if found is None else found.list
