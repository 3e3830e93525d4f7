"""What a prompt row reads from the household's whole history before the cut: the recent
window, the "bought most often" section and the lists of the copy prior's history channels
(:mod:`sigmarec.tasks.channels`), one pair of columns each. Written by the tasks stage, the
serving runtime and the cold-start check, so the three build the same rows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sigmarec.tasks.channels import Lister, history_channels
from sigmarec.tasks.config import TasksConfig
from sigmarec.tasks.history import most_bought
from sigmarec.tasks.resources import TaskResources


def channel_columns() -> list[str]:
    """The history channels' prompt columns, in registry order."""
    return [col for ch in history_channels() for col in ch.columns]


def history_listers(res: TaskResources, cfg: TasksConfig) -> dict[str, Lister | None]:
    """Each history channel's lister for ``cfg`` (None: its rows carry empty lists)."""
    return {ch.name: ch.lister(res, cfg) for ch in history_channels()}


def prompt_columns(history: np.ndarray, cfg: TasksConfig,
                   listers: Mapping[str, Lister | None]) -> dict[str, np.ndarray]:
    """The columns of one prompt row from the household's whole history before the cut;
    ``listers`` (:func:`history_listers`) by channel name."""
    h = np.asarray(history, dtype=np.int64)
    out = {"history": h[-cfg.history_len:].copy(),
           "frequent": most_bought(h, cfg.frequent_items, cfg.frequent_min_count)}
    for ch in history_channels():
        lister = listers.get(ch.name)
        items, values = lister(h) if lister is not None else ch.empty()
        out[ch.columns[0]], out[ch.columns[1]] = items, values
    return out
