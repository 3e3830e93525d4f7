"""Instructions never seen in training: the held-out wordings file and the router's accuracy.

``unseen_instructions.yaml`` (packaged beside this module) holds at least 15 wordings per task,
written apart from every training and evaluation template; ``unseen_instructions_b.yaml`` is a
second such file written blind to the router (the router's word lists were tuned on the first
file's misses, so only the second gives an honest router figure). A wording's slots are
filled the way the templates fill them (:meth:`Task.display` of an instance's parameters), so
the same evaluation instances can be asked in words the model never read. :func:`router_accuracy`
measures how often :func:`sigmarec.tasks.registry.match_instruction` maps them to the intended
task (and, for tasks with parameters, to the intended ones); :func:`route_instances` routes
evaluation instances asked in held-out words, as ``scripts/unseen_eval.py`` asks the model.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sigmarec.errors import DataError
from sigmarec.tasks.config import TASK_NAMES
from sigmarec.tasks.definitions import TASK_CLASSES, Task
from sigmarec.tasks.registry import match_instruction
from sigmarec.tasks.resources import TaskResources

UNSEEN_FILE = Path(__file__).with_name("unseen_instructions.yaml")
UNSEEN_FILE_B = Path(__file__).with_name("unseen_instructions_b.yaml")
MIN_WORDINGS = 15
# Parameters the router must recover for the request to mean the same thing.
ROUTED_PARAMS = {"Query": "query", "Category": "category", "Season": "season",
                 "Holiday": "holiday"}


def _slots(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def template_slots(task: str) -> set[str]:
    """The slots the task's templates fill (e.g. ``{"category"}``)."""
    cls = TASK_CLASSES[task]
    return set().union(*(_slots(t) for t in (*cls.train_templates, *cls.eval_templates)))


def load_unseen(path: Path | str | None = None, min_per_task: int = MIN_WORDINGS
                ) -> dict[str, list[str]]:
    """{task: wordings} of the held-out file; a ``DataError`` names a bad task, slot or count."""
    path = Path(path) if path is not None else UNSEEN_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the unseen wordings: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping task -> list of wordings")
    out: dict[str, list[str]] = {}
    for task, wordings in raw.items():
        if task not in TASK_NAMES:
            raise DataError(f"{path}: unknown task {task!r}; tasks are {list(TASK_NAMES)}")
        if not isinstance(wordings, list) or not all(isinstance(w, str) for w in wordings):
            raise DataError(f"{path}: {task} must be a list of strings")
        if len(wordings) < min_per_task:
            raise DataError(f"{path}: {task} has {len(wordings)} wordings, fewer than "
                            f"{min_per_task}")
        want = template_slots(task)
        for w in wordings:
            if _slots(w) != want:
                raise DataError(f"{path}: {task} wording {w!r} has slots {sorted(_slots(w))} "
                                f"but the task's templates fill {sorted(want)}")
        out[task] = list(wordings)
    return out


def fill(task: Task, wording: str, params: Mapping[str, Any]) -> str:
    """The wording with the instance's parameters, as the templates display them."""
    return wording.format(**task.display(dict(params)))


def normalised(text: str) -> str:
    """Lower case, words only: how two wordings are compared for equality."""
    return " ".join(re.findall(r"[a-z0-9{}]+", text.lower()))


def router_accuracy(res: TaskResources, tasks: Mapping[str, Task],
                    params: Mapping[str, Sequence[str]], wordings: Mapping[str, list[str]],
                    per_wording: int = 5, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per task: how often the router maps a filled wording to the task (``task_acc``) and to
    the task with its parameters (``params_acc``), over every wording filled with up to
    ``per_wording`` of the task's parameter sets (``params``: JSON strings, e.g. an instance
    frame's ``params`` column), and the misses."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for name, texts in wordings.items():
        task = tasks.get(name)
        choices = sorted(set(params.get(name, ()))) or ["{}"]
        if task is None:
            continue
        hits = exact = n = 0
        misses: list[dict[str, Any]] = []
        for w in texts:
            pick = rng.choice(len(choices), min(per_wording, len(choices)), replace=False)
            for i in sorted(pick.tolist()):
                p = json.loads(choices[i])
                text = fill(task, w, p)
                got, gp = match_instruction(text, res)
                key = ROUTED_PARAMS.get(name)
                ok = got == name
                same = ok and (key is None or gp.get(key) == p.get(key))
                n, hits, exact = n + 1, hits + ok, exact + same
                if not same and len(misses) < 20:
                    misses.append({"text": text, "got": got, "params": gp})
        out[name] = {"n": n, "task_acc": round(hits / max(n, 1), 4),
                     "params_acc": round(exact / max(n, 1), 4), "misses": misses}
    return out


@dataclass(frozen=True)
class Routed:
    """One instance asked in held-out words and what the router made of it."""

    text: str  # the filled wording
    task: str  # the routed task (JustForYou when the router's pick is not an enabled task)
    params: dict[str, Any]  # the routed parameters
    task_ok: bool  # routed to the instance's task
    params_ok: bool  # ... and to its routed parameter (ROUTED_PARAMS), where it has one


def sample_instances(df: pd.DataFrame, per_task: int, seed: int) -> pd.DataFrame:
    """Up to ``per_task`` instances of every task (a seeded sample, frame order kept)."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, g in df.groupby("task", sort=True):
        keep = np.sort(rng.choice(len(g), min(per_task, len(g)), replace=False))
        parts.append(g.iloc[keep])
    return pd.concat(parts).reset_index(drop=True)


def route_instances(res: TaskResources, tasks: Mapping[str, Task], inst: pd.DataFrame,
                    wordings: Mapping[str, list[str]]) -> list[Routed]:
    """Every instance (``task``, ``params`` columns) asked with its task's held-out wordings,
    cycled in file order over the task's instances, and routed as a served request is."""
    seen: dict[str, int] = {}
    out: list[Routed] = []
    for name, raw in zip(inst["task"], inst["params"], strict=True):
        i = seen.get(name, 0)
        seen[name] = i + 1
        params = json.loads(raw)
        text = fill(tasks[name], wordings[name][i % len(wordings[name])], params)
        got, gp = match_instruction(text, res)
        if got not in tasks:
            got, gp = "JustForYou", {"text": text}
        key = ROUTED_PARAMS.get(name)
        ok = got == name
        out.append(Routed(text=text, task=got, params=gp, task_ok=ok,
                          params_ok=ok and (key is None or gp.get(key) == params.get(key))))
    return out
