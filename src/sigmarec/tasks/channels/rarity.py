"""The rarity channel (``model.repeat_rarity``): the purchase-count channel's items again, each
valued by its rarity (the share of the catalogue bought at least as often in training) x
``model.rarity_scale``, so a request for something niche can prefer the household's rare
purchases where the count channel prefers its staples. The model holds each item's rarity
(``item_rarity``, saved with the weights), so the channel has no lists of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sigmarec.tasks.channels.base import Channel

if TYPE_CHECKING:
    import torch


class Rarity(Channel):
    name: ClassVar[str] = "rarity"
    key: ClassVar[str] = "rarity"
    source = "item"
    flag: ClassVar[str] = "repeat_rarity"
    merged: ClassVar[bool] = False  # the counted items, already merged by the counts channel
    state_keys: ClassVar[tuple[str, ...]] = ("item_rarity",)

    def slot_lists(self, lists: Mapping[str, tuple[torch.Tensor, torch.Tensor]], model: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        got = lists.get("counts")
        if got is None or got[0] is None:
            raise ValueError("this model scores with the rarity channel (model.repeat_rarity), "
                             "which weighs the purchase counts, but the batch has no "
                             "count_items: build the prompts with tasks.count_items > 0")
        import torch  # the tasks stage imports the registry without torch's cost

        items = got[0]
        known = (items >= 0) & (items < model.n_items)
        rarity = model.item_rarity.to(items.device)[items.clamp(0, model.n_items - 1)]
        return items, torch.where(known, rarity, 0.0) * model.cfg.rarity_scale

    def prepare(self, model: Any, train_counts: np.ndarray) -> None:
        model.set_item_rarity(train_counts)
