"""The seven SIGMA tasks, each defined from the data: instruction paraphrases (training ones and
held-out evaluation ones), which items of a user's next basket are its targets, the instruction
parameters, and the checkable rule every target satisfies.

Two views of "is this item a target", cross-checked when samples are built:
* ``admit(rows)``: vectorised over interaction rows, used to enumerate candidates fast;
* ``rule(item, params, context)``: the scalar, human-checkable rule (``targets`` uses it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from sigmarec.tasks.resources import TaskResources
from sigmarec.tasks.text import clean_words, display_category

SOFT_TOKEN = "<|item|>"
NO_DATES = "the data has no timestamps (its times are sequence positions, no calendar)"


@dataclass
class Cut:
    """A point in a user's sequence: everything before ``hist_len`` is history; the basket that
    starts there holds the candidate targets. Also the context a rule is judged in."""

    user_idx: int
    hist_len: int
    timestamp: pd.Timestamp
    split: str
    history: np.ndarray  # the full history (all items before the cut), oldest first
    season: str | None = None
    holiday: str | None = None  # the holiday window the basket falls in, if usable in its split


@dataclass
class RowView:
    """Interaction rows (basket items) with what the tasks' ``admit`` needs, aligned arrays."""

    item: np.ndarray
    user: np.ndarray
    split: np.ndarray  # "train" / "valid" / "test"
    hist_len: np.ndarray  # start position of the row's basket in its user's sequence
    season: np.ndarray  # season index of the basket (-1 none)
    holiday: np.ndarray  # holiday-window index of the basket (-1 none)
    first_in_category: np.ndarray  # the basket is the user's first with the item's category


class Task(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    train_templates: ClassVar[tuple[str, ...]]
    eval_templates: ClassVar[tuple[str, ...]]
    rule_text: ClassVar[str]
    # JustForYou has no rule beyond "an item of the next basket".
    checkable: ClassVar[bool] = True
    # Non-products (``TasksConfig.exclude_categories``) are targets of JustForYou only.
    eligible_only: ClassVar[bool] = True

    def __init__(self, res: TaskResources) -> None:
        self.res = res

    def supports(self, data: Any = None) -> tuple[bool, str]:
        """Whether the dataset the resources were built from can define this task."""
        return True, ""

    def admit(self, rows: RowView) -> np.ndarray:
        """Which rows (items of a next basket) may be targets of this task."""
        ok = self._admit(rows)
        return ok & self.res.eligible[rows.item] if self.eligible_only else ok

    def rule(self, item_idx: int, params: dict[str, Any], context: Cut | None = None) -> bool:
        """The checkable rule: does ``item_idx`` fulfil the instruction ``params``?"""
        if self.eligible_only and not self.res.eligible[int(item_idx)]:
            return False
        return self._rule(int(item_idx), params, context)

    def allowed(self, params: dict[str, Any], context: Cut | None = None) -> np.ndarray:
        """(n_items,) bool: ``rule`` for every item at once. Used as a filter inside retrieval
        (baselines "+rule", SIGMA's business filters) and to measure instruction following."""
        ok = self._allowed(params, context)
        return ok & self.res.eligible if self.eligible_only else ok

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        # Correct for any rule, but one Python call per item: tasks override it vectorised.
        return np.array([self._rule(i, params, context) for i in range(self.res.n_items)],
                        dtype=bool)

    @abstractmethod
    def _admit(self, rows: RowView) -> np.ndarray: ...

    @abstractmethod
    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool: ...

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        """The instruction parameters when ``item`` is the target."""
        return {}

    def targets(self, basket_items: np.ndarray, cut: Cut,
                anchor: int) -> tuple[dict[str, Any], np.ndarray]:
        """Instruction parameters set by ``anchor`` (one admitted item of the basket) and every
        item of the basket that satisfies the task's rule under them."""
        params = self.params_for(int(anchor), cut)
        keep = [int(i) for i in np.unique(basket_items) if self.rule(int(i), params, cut)]
        if int(anchor) not in keep:
            raise AssertionError(
                f"{self.name}: anchor item {anchor} was admitted but breaks the rule {params}"
            )
        return params, np.asarray(keep, dtype=np.int64)

    def display(self, params: dict[str, Any]) -> dict[str, str]:
        """Template fields from params."""
        return {}

    def instruction(self, params: dict[str, Any], held_out: bool,
                    rng: np.random.Generator) -> str:
        """A paraphrase filled with ``params``: a training one, or a held-out evaluation one."""
        if params.get("text"):
            return str(params["text"])
        pool = self.eval_templates if held_out else self.train_templates
        text = pool[int(rng.integers(len(pool)))].format(**self.display(params))
        return text[:1].upper() + text[1:]

    def all_templates(self) -> tuple[str, ...]:
        return (*self.train_templates, *self.eval_templates)


class JustForYou(Task):
    name = "JustForYou"
    description = "the general next-basket feed: any item of the user's next basket"
    train_templates = (
        "Predict the next purchase for this household.",
        "What will this household buy next?",
        "Recommend items for this household's next shopping trip.",
        "Suggest a product this customer is likely to buy on the next visit.",
        "Based on the purchase history, recommend the next item.",
    )
    eval_templates = (
        "Which product should we show this shopper for the upcoming basket?",
        "Pick something this household will want on its next grocery run.",
    )
    rule_text = "none (every item of the next basket is a target)"
    checkable = False
    eligible_only = False

    def _admit(self, rows: RowView) -> np.ndarray:
        return np.ones(len(rows.item), dtype=bool)

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        return 0 <= int(item_idx) < self.res.n_items

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        return np.ones(self.res.n_items, dtype=bool)


class Query(Task):
    name = "Query"
    description = "items for a search query built from the target's product type"
    train_templates = (
        'The user searched for "{query}". Recommend a matching product.',
        "Find {query} for this household.",
        "Search query: {query}. Which item fits best?",
        'Show results for "{query}" tailored to this shopper.',
        "This customer is looking for {query}. Suggest one.",
    )
    eval_templates = (
        'A shopper typed "{query}" into the search box: what should come up first for them?',
        "Help this household find some {query}.",
    )
    rule_text = "every word of the query is a word of the item's product-type query"

    def __init__(self, res: TaskResources) -> None:
        super().__init__(res)
        self._words = [frozenset(q.split()) for q in res.item_query.tolist()]

    def supports(self, data: Any = None) -> tuple[bool, str]:
        if self.res.depth == 0 or not any(self.res.item_query.tolist()):
            return False, "items have no category path to build queries from"
        if self.res.depth - 1 == self.res.category_level:
            return False, ("the catalogue has one category level, which Category already names "
                           "(a query would repeat it)")
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        return self.res.item_query[rows.item] != ""

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        return {"query": str(self.res.item_query[item])}

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        words = set(clean_words(params["query"])) or set(str(params["query"]).split())
        return bool(words) and words <= self._words[int(item_idx)]

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        words = set(clean_words(params["query"])) or set(str(params["query"]).split())
        if not words:
            return np.zeros(self.res.n_items, dtype=bool)
        return np.fromiter((words <= w for w in self._words), dtype=bool,
                           count=self.res.n_items)

    def display(self, params: dict[str, Any]) -> dict[str, str]:
        return {"query": str(params["query"])}


class Category(Task):
    name = "Category"
    description = "items within a named category (the target's category at category_level)"
    train_templates = (
        "Recommend an item from the {category} category.",
        "Within {category}, what will this household buy next?",
        "Suggest a product in the category {category} for this shopper.",
        "Pick something from {category} that this customer will like.",
    )
    eval_templates = (
        "Browsing the {category} aisle: which product suits this household?",
        "Limit the recommendation to {category}. What should we show?",
    )
    rule_text = "the item's category at the named level equals the named category"

    def supports(self, data: Any = None) -> tuple[bool, str]:
        if self.res.depth == 0:
            return False, "items have no category path"
        if len(self.res.level_names[self.res.category_level]) < 2:
            return False, "the catalogue has a single category at that level"
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        return self.res.level_codes[self.res.category_level, rows.item] >= 0

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        lv = self.res.category_level
        return {"category": self.res.level_of(item, lv), "level": lv}

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        lv = int(params.get("level", self.res.category_level))
        return self.res.level_of(int(item_idx), lv) == params["category"]

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        lv = int(params.get("level", self.res.category_level))
        names = self.res.level_names[lv]
        if params["category"] not in names:
            return np.zeros(self.res.n_items, dtype=bool)
        return self.res.level_codes[lv] == names.index(params["category"])

    def display(self, params: dict[str, Any]) -> dict[str, str]:
        return {"category": display_category(params["category"])}


class Longtail(Task):
    name = "Longtail"
    description = ("niche items: training purchase count below the longtail_quantile of the "
                   "catalogue's counts")
    train_templates = (
        "Recommend a niche, less popular product this household would enjoy.",
        "Suggest a hidden gem: an item few shoppers buy but this one might.",
        "Find a long-tail product for this customer.",
        "Recommend something off the beaten path rather than a best-seller.",
    )
    eval_templates = (
        "Skip the best-sellers and surface a lesser-known item for this shopper.",
        "Which rarely bought product would fit this household?",
    )
    rule_text = "the item's training purchase count is below the long-tail threshold"

    def supports(self, data: Any = None) -> tuple[bool, str]:
        n = int(self.res.longtail.sum())
        if n == 0 or n == self.res.n_items:
            return False, "training popularity does not separate a long tail"
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        return self.res.longtail[rows.item]

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        return bool(self.res.longtail[int(item_idx)])

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        return np.asarray(self.res.longtail, dtype=bool).copy()


class Discover(Task):
    name = "Discover"
    description = ("items of a category (at discover_level) the user never bought before the "
                   "cut (whole history, not only the part shown)")
    train_templates = (
        "Recommend something from a category this household has never bought.",
        "Help this customer discover a new kind of product.",
        "Suggest an item outside the categories in the purchase history.",
        "Introduce this shopper to a product type they have not tried yet.",
    )
    eval_templates = (
        "Broaden this household's basket with a category new to them.",
        "What unfamiliar product category could this shopper explore next?",
    )
    rule_text = "the item's category is not the category of any item in the user's history"

    def supports(self, data: Any = None) -> tuple[bool, str]:
        if self.res.depth == 0:
            return False, "items have no category path"
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        lv = self.res.discover_level
        return (rows.first_in_category & (self.res.level_codes[lv, rows.item] >= 0)
                & (rows.hist_len >= self.res.discover_min_history))

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        return {"level": self.res.discover_level}

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        if context is None:
            raise ValueError("Discover's rule needs the user's history (context)")
        codes = self.res.level_codes[int(params.get("level", self.res.discover_level))]
        c = codes[int(item_idx)]
        return bool(c >= 0 and c not in set(codes[context.history].tolist()))

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        if context is None:
            raise ValueError("Discover's rule needs the user's history (context)")
        codes = self.res.level_codes[int(params.get("level", self.res.discover_level))]
        seen = np.unique(codes[np.asarray(context.history, dtype=np.int64)])
        return (codes >= 0) & ~np.isin(codes, seen)


class Season(Task):
    name = "Season"
    description = ("items whose training purchase rate rises in the season of the basket "
                   "(smoothed lift vs the rest of the training period)")
    train_templates = (
        "Recommend a seasonal product for {season}.",
        "It is {season}. What seasonal item will this household buy?",
        "Suggest something that sells well in {season} for this shopper.",
        "Pick an in-season {season} product for this customer.",
    )
    eval_templates = (
        "With {season} here, which seasonal favourite suits this household?",
        "Show this shopper a product that is popular this {season}.",
    )
    rule_text = "the item is in the season's item set (training lift >= season_min_lift)"

    def supports(self, data: Any = None) -> tuple[bool, str]:
        if not self.res.has_dates:
            return False, NO_DATES
        if not self.res.season_items.any():
            return False, "no item's purchase rate rises in any season of the training period"
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        s = rows.season
        ok = s >= 0
        out = np.zeros(len(s), dtype=bool)
        out[ok] = self.res.season_items[s[ok], rows.item[ok]]
        return out

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        return {"season": cut.season}

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        names = self.res.season_names
        if params.get("season") not in names:
            return False
        return bool(self.res.season_items[names.index(params["season"]), int(item_idx)])

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        names = self.res.season_names
        if params.get("season") not in names:
            return np.zeros(self.res.n_items, dtype=bool)
        return np.asarray(self.res.season_items[names.index(params["season"])], dtype=bool)

    def display(self, params: dict[str, Any]) -> dict[str, str]:
        return {"season": str(params["season"])}


class Holiday(Task):
    name = "Holiday"
    description = ("items whose purchase rate rises in a named holiday window; training samples "
                   "only from holidays inside the training period")
    train_templates = (
        "Recommend something for {holiday}.",
        "The household is shopping for {holiday}. What will they buy?",
        "Suggest a product for the {holiday} celebrations.",
        "{holiday} is coming up. Pick an item for this customer.",
    )
    eval_templates = (
        "Help this family get ready for {holiday}: which product fits?",
        "What should this shopper add to the basket ahead of {holiday}?",
    )
    rule_text = "the item is in the holiday's item set (window lift >= holiday_min_lift)"

    def __init__(self, res: TaskResources) -> None:
        super().__init__(res)
        self._split = np.array([res.holiday_split[h.name] or "" for h in res.holidays] + [""],
                               dtype=object)
        self._items = np.stack([res.holiday_items[h.name] for h in res.holidays]
                               + [np.zeros(res.n_items, dtype=bool)])

    def supports(self, data: Any = None) -> tuple[bool, str]:
        if not self.res.has_dates:
            return False, NO_DATES
        train = [h for h, s in self.res.holiday_split.items()
                 if s == "train" and self.res.holiday_items[h].any()]
        if not train:
            return False, "no holiday window with holiday items lies inside the training period"
        return True, ""

    def _admit(self, rows: RowView) -> np.ndarray:
        h = rows.holiday  # -1 indexes the all-False row appended above
        usable = self._split[h] == rows.split
        return usable & (h >= 0) & self._items[h, rows.item]

    def params_for(self, item: int, cut: Cut) -> dict[str, Any]:
        return {"holiday": cut.holiday}

    def _rule(self, item_idx: int, params: dict[str, Any], context: Cut | None) -> bool:
        items = self.res.holiday_items.get(params.get("holiday"))
        return bool(items is not None and items[int(item_idx)])

    def _allowed(self, params: dict[str, Any], context: Cut | None) -> np.ndarray:
        items = self.res.holiday_items.get(params.get("holiday"))
        if items is None:
            return np.zeros(self.res.n_items, dtype=bool)
        return np.asarray(items, dtype=bool).copy()

    def display(self, params: dict[str, Any]) -> dict[str, str]:
        try:
            return {"holiday": self.res.holiday(params["holiday"]).display}
        except KeyError:
            return {"holiday": str(params["holiday"]).replace("_", " ")}


TASK_CLASSES: dict[str, type[Task]] = {
    c.name: c for c in (JustForYou, Query, Category, Longtail, Discover, Season, Holiday)
}
