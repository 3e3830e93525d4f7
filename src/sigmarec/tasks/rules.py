"""Each evaluation instance's checkable rule as an item mask.

Used three ways: as a filter inside retrieval (the baselines' "+rule" variants), to measure
instruction following (the share of recommended items that satisfy the instruction), and as a
business filter for SIGMA. Tasks without a rule (JustForYou) allow every item.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from sigmarec.data.processed import ProcessedData
from sigmarec.tasks.config import TasksConfig
from sigmarec.tasks.definitions import Cut, Task
from sigmarec.tasks.registry import build_tasks, supported
from sigmarec.tasks.resources import build_resources


def load_tasks(data: ProcessedData, cfg: TasksConfig) -> dict[str, Task]:
    """The enabled, supported tasks, rebuilt from the training data exactly as the tasks stage
    built them (the resources are a deterministic function of training data and config)."""
    tasks, _ = supported(build_tasks(build_resources(data, cfg), list(cfg.enabled)))
    return tasks


def instance_allow_masks(data: ProcessedData, instances: pd.DataFrame,
                         tasks: dict[str, Task]) -> np.ndarray:
    """(n_instances, n_items) bool: the items each instance's instruction admits."""
    out = np.ones((len(instances), data.n_items), dtype=bool)
    cache: dict[tuple[str, str], np.ndarray] = {}
    for r, row in enumerate(instances[["task", "params", "user_idx", "hist_len",
                                       "split"]].itertuples(index=False)):
        task = tasks.get(row.task)
        if task is None or not task.checkable:
            continue
        key = (row.task, row.params)
        if task.name != "Discover" and key in cache:  # Discover alone depends on the history
            out[r] = cache[key]
            continue
        u, h = int(row.user_idx), int(row.hist_len)
        cut = Cut(user_idx=u, hist_len=h, timestamp=pd.Timestamp(0), split=str(row.split),
                  history=data.history(u, h))
        out[r] = task.allowed(json.loads(row.params), cut)
        cache[key] = out[r]
    return out


def checkable(tasks: dict[str, Task]) -> list[str]:
    return [n for n, t in tasks.items() if t.checkable]
