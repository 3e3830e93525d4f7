"""Categories as requests name them: the category filter's index and the Category task's level.

A request names a category by any level's name (``"KIDS CEREAL"``, case-insensitive) or by a path
prefix (``"GROCERY > COLD CEREAL"``). The filter admits the items under it at any level; the
Category task was trained on one level (``tasks.category_level``), so it asks for the category
of that level that the named one lies in.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.serving.request import RequestError


def category_key(text: str) -> str:
    """A category name or path as the index keys it: upper case, levels joined by " > "."""
    parts = [p.strip() for p in str(text).upper().replace(">", CATEGORY_SEP).split(
        CATEGORY_SEP.strip())]
    return CATEGORY_SEP.join(p for p in parts if p)


def _levels(path: object) -> list[str]:
    return [p.strip() for p in str(path or "").split(CATEGORY_SEP) if p.strip()]


def category_index(items: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every category name at any level and every path prefix -> the items under it."""
    out: dict[str, list[int]] = {}
    paths = items["category_path"] if "category_path" in items.columns else [""] * len(items)
    for i, path in enumerate(paths):
        levels = [p.upper() for p in _levels(path)]
        keys = {*levels, *(CATEGORY_SEP.join(levels[:d]) for d in range(2, len(levels) + 1))}
        for key in keys:
            out.setdefault(key, []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def unknown_category(given: str, names: Sequence[str]) -> str:
    """The message for a category no item lies in, with the closest names."""
    close = difflib.get_close_matches(str(given).upper(), list(names), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown category {given!r}{hint}"


def task_category(given: str, level: int, names: Sequence[str],
                  index: Mapping[str, np.ndarray], items: pd.DataFrame) -> str:
    """The level-``level`` category (one of ``names``) that a Category request asks for:
    ``given`` itself when it is a name of that level, else the one category of that level that
    every item under ``given`` (a deeper name, or a path) lies in. A :class:`RequestError` on
    ``category`` names the level otherwise (a broader category spans several)."""
    key = category_key(given)
    by_key = {n.upper(): n for n in names}
    if key in by_key:
        return by_key[key]
    members = index.get(key)
    if members is None:
        raise RequestError("category", unknown_category(given, names))
    paths = items["category_path"].iloc[members] if "category_path" in items.columns else []
    above = {lv[level].upper() for lv in map(_levels, paths) if len(lv) > level}
    if len(above) == 1 and (name := by_key.get(next(iter(above)))) is not None:
        return name
    examples = ", ".join(sorted(by_key.get(a, a) for a in above)[:3]) or ", ".join(names[:3])
    raise RequestError("category", f"task Category asks for a category at path level {level} "
                       f"(tasks.category_level; 0 = top), and {given!r} spans "
                       f"{len(above) or 'no'} of them (e.g. {examples}): name one, or keep "
                       f"{given!r} as a filter with another task")
