"""The copy prior's channels, as a registry (see :mod:`sigmarec.model.repeat` for the prior).

Each channel is one class (:class:`~sigmarec.tasks.channels.base.Channel`) that says its name,
where its lists come from (the household's history, the instruction, or per-item values over
another channel's items), whether the decoder merges its items, and how it lists (items, values)
for one prompt. The collator, the model, both decoders, the tasks stage and the serving runtime
iterate over :data:`CHANNELS`; its order is the gate order (a saved model records the names of
the channels it reads, in that order). A new channel: one file here, one line below, its
``model`` config flag and a profile line.
"""

from __future__ import annotations

from typing import Any

from sigmarec.tasks.channels.base import Channel, ExampleContext, Lister, Lists
from sigmarec.tasks.channels.counts import Counts
from sigmarec.tasks.channels.novelty import Novelty, novelty_lister
from sigmarec.tasks.channels.rarity import Rarity
from sigmarec.tasks.channels.text_match import TextMatch

CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Counts(),
    TextMatch(),
    Rarity(),
    Novelty(),
)}


def active_channels(model_cfg: Any) -> list[Channel]:
    """The channels a model with ``model_cfg`` reads, in gate order (none without the copy
    prior)."""
    if not getattr(model_cfg, "repeat_aware", False):
        return []
    return [c for c in CHANNELS.values() if c.active(model_cfg)]


def collated_channels() -> list[Channel]:
    """The channels whose own lists examples and batches carry, in registry order."""
    return [c for c in CHANNELS.values() if c.collated]


def history_channels() -> list[Channel]:
    """The channels the tasks stage and the serving runtime list from the history."""
    return [c for c in CHANNELS.values() if c.source == "history"]


__all__ = ["CHANNELS", "Channel", "ExampleContext", "Lister", "Lists", "active_channels",
           "collated_channels", "history_channels", "novelty_lister"]
