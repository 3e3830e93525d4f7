"""Task lookup, construction for a dataset, and mapping a user's free text onto a task."""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

from sigmarec.errors import SigmaError
from sigmarec.tasks.config import TASK_NAMES, default_holidays, default_seasons
from sigmarec.tasks.definitions import TASK_CLASSES, Task
from sigmarec.tasks.resources import TaskResources
from sigmarec.tasks.text import clean_words, display_category

log = logging.getLogger("sigmarec")


def task_names() -> list[str]:
    return list(TASK_NAMES)


def get_task_class(name: str) -> type[Task]:
    """The task class called ``name`` (case-insensitive); a ``SigmaError`` lists the known ones."""
    if name in TASK_CLASSES:
        return TASK_CLASSES[name]
    for k, cls in TASK_CLASSES.items():
        if k.lower() == str(name).lower():
            return cls
    raise SigmaError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")


def build_tasks(res: TaskResources, names: list[str] | None = None) -> dict[str, Task]:
    """Instantiate the named tasks (all by default) over one dataset's resources."""
    out: dict[str, Task] = {}
    for n in names or TASK_NAMES:
        cls = get_task_class(n)
        out[cls.name] = cls(res)
    return out


def supported(tasks: dict[str, Task]) -> tuple[dict[str, Task], dict[str, str]]:
    """Split tasks into those the dataset supports and the skipped ones with their reason."""
    keep: dict[str, Task] = {}
    skipped: dict[str, str] = {}
    for name, task in tasks.items():
        ok, why = task.supports()
        if ok:
            keep[name] = task
        else:
            skipped[name] = why
            log.info("task %s skipped: %s", name, why)
    return keep, skipped


# ----------------------------------------------------------------------------------------------
# free instructions

_LONGTAIL = ("niche", "long tail", "long-tail", "longtail", "less popular", "lesser known",
             "lesser-known", "rarely bought", "hidden gem", "unpopular", "not popular",
             "off the beaten", "obscure", "best-seller", "best seller", "bestseller", "rare ")
_DISCOVER = ("never bought", "never tried", "not tried", "haven't tried", "have not tried",
             "new to", "new kind", "new category", "new categories", "something new",
             "something different", "discover", "explore", "unfamiliar", "broaden",
             "outside the categories", "new type")
_SEASONAL = ("seasonal", "in season", "in-season", "this season")
_SEASON_ALIASES = {"autumn": "fall"}
_QUERY_VERBS = re.compile(
    r"\b(?:searched for|search for|searching for|search query:?|search|looking for|look for|"
    r"find me|find|show me|show results for|results for|i want|i need|i'd like|get me)\s+(.+)$"
)
_CATEGORY_WORDS = re.compile(
    r"\b(?:category|categories|aisle|section|department|within|from|limit|limited|restrict|"
    r"restricted|only)\b"
)
_CATEGORY_PATTERNS = (
    re.compile(r"\b(?:in|from|within|browsing|browse|of|the)\s+(?:the\s+)?([a-z0-9&/' :\-]+?)\s+"
               r"(?:category|aisle|section|department)\b"),
    re.compile(r"\bcategory\s*:?\s+((?:[a-z0-9&/'\-]+\s*){1,4})$"),
    re.compile(r"\bwithin\s+(?:the\s+)?((?:[a-z0-9&/'\-]+\s*){1,4})$"),
)
_TRAILERS = re.compile(
    r"\s+(?:for me|for us|for my \w+|for this \w+|for them|please|to buy|that .*|which .*|"
    r"on my next .*|next time)$"
)
_LEADING = re.compile(r"^(?:some|a|an|the|me|us|any|good|nice|great)\s+")
_VAGUE = {"something", "anything", "products", "product", "items", "item", "stuff", "things",
          "thing", "recommendations", "recommendation", "ideas", "me", "food", "groceries"}


def _norm(text: str) -> str:
    t = str(text).lower().replace("’", "'")
    t = re.sub(r"[^a-z0-9'&:\- ]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text) is not None


def _phrase(raw: str) -> str:
    p = raw.strip(" .?!:,")
    for _ in range(3):
        p = _TRAILERS.sub("", p).strip(" .?!:,")
        p = _LEADING.sub("", p).strip()
    return p


def _stem(w: str) -> str:
    return w[:-1] if len(w) > 3 and w.endswith("s") else w


def _snap_query(phrase: str, res: TaskResources) -> str | None:
    """The phrase as a catalogue query: the longest leading run of its words that some item's
    product type holds (plural-insensitive, spelled as the catalogue spells them), else the
    closest catalogue query by spelling."""
    words = clean_words(phrase)
    if not words or set(words) <= _VAGUE:
        return None
    names = res.query_names
    stems = [{_stem(w) for w in q.split()} for q in names]
    for k in range(len(words), 0, -1):
        head = words[:k]
        if set(head) <= _VAGUE:
            break
        want = [_stem(w) for w in head]
        holders = [q for q, st in zip(names, stems, strict=True) if set(want) <= st]
        if holders:
            best = min(holders, key=lambda q: (len(q.split()), q))
            spelled = {_stem(w): w for w in best.split()}
            return " ".join(spelled[s] for s in want)
    close = difflib.get_close_matches(" ".join(words), names, n=1, cutoff=0.8)
    return close[0] if close else None


def _contained(text: str, names: dict[str, str]) -> str | None:
    """The longest of ``names`` (display -> value) appearing in ``text`` as whole words."""
    hits = [d for d in names if len(d) > 2 and _has(text, d)]
    return names[max(hits, key=len)] if hits else None


def _category_names(res: TaskResources) -> dict[str, str]:
    names = res.level_names[res.category_level] if res.depth else []
    return {display_category(n): n for n in names}


def _snap_category(phrase: str, res: TaskResources) -> str | None:
    by_display = _category_names(res)
    if not by_display:
        return None
    p = " ".join(clean_words(phrase)) or phrase.lower()
    if p in by_display:
        return by_display[p]
    close = difflib.get_close_matches(p, list(by_display), n=1, cutoff=0.8)
    return by_display[close[0]] if close else None


def _template_task(text: str) -> str | None:
    best, best_name = 0.0, None
    for name in ("JustForYou", "Longtail", "Discover"):
        cls = TASK_CLASSES[name]
        for t in (*cls.train_templates, *cls.eval_templates):
            r = difflib.SequenceMatcher(None, text, _norm(t)).ratio()
            if r > best:
                best, best_name = r, name
    return best_name if best >= 0.75 else None


def match_instruction(text: str, res: TaskResources | None = None) -> tuple[str, dict[str, Any]]:
    """Map a user's free text to the nearest task and its parameters.

    Holiday and season names, long-tail and discovery phrases, search phrases ("find X",
    "looking for X") and category phrases ("in the X aisle") are recognised; with ``res`` the
    query/category is snapped to the catalogue's vocabulary. Anything else is JustForYou with
    the text used as the instruction as given (``{"text": text}``).
    """
    t = _norm(text)
    # Search and category phrases end with their sentence.
    clauses = [c for c in (_norm(x) for x in re.split(r"[.?!;]+", str(text))) if c]
    query_phrase = cat_phrase = None
    for c in clauses:
        m = _QUERY_VERBS.search(c)
        if m and query_phrase is None:
            query_phrase = _phrase(m.group(1)) or None
        for pat in _CATEGORY_PATTERNS:
            cm = pat.search(c)
            if cm and cat_phrase is None:
                cat_phrase = _phrase(cm.group(1)) or None
    quoted = re.findall(r"[\"“]([^\"”]+)[\"”]", str(text))
    if quoted and _norm(quoted[0]):
        query_phrase = _norm(quoted[0])  # a quoted phrase is what was typed into a search box
    # An explicit search for something the catalogue holds wins even when it names a holiday
    # ("search for valentine hearts").
    if res is not None and query_phrase and not _CATEGORY_WORDS.search(t):
        q = _snap_query(query_phrase, res)
        if q:
            return "Query", {"query": q}

    holidays = res.holidays if res is not None else default_holidays()
    for h in holidays:
        names = {h.name.replace("_", " "), h.display.lower().removeprefix("the "), *h.aliases}
        if any(_has(t, a.lower()) for a in names if a):
            return "Holiday", {"holiday": h.name}
    if any(k in t for k in _LONGTAIL):
        return "Longtail", {}
    if any(k in t for k in _DISCOVER):
        return "Discover", {}

    if res is not None:
        if cat_phrase:
            cat = _snap_category(cat_phrase, res)
            if cat:
                return "Category", {"category": cat, "level": res.category_level}
        if query_phrase:
            q = _snap_query(query_phrase, res)
            if q:
                return "Query", {"query": q}

    seasons = res.season_names if res is not None else list(default_seasons())
    for s in seasons:
        if _has(t, s.lower()):
            return "Season", {"season": s}
    for alias, s in _SEASON_ALIASES.items():
        if _has(t, alias) and s in seasons:
            return "Season", {"season": s}

    if res is None:
        if cat_phrase and not set(clean_words(cat_phrase)) <= _VAGUE:
            return "Category", {"category": cat_phrase.upper()}
        if query_phrase and clean_words(query_phrase) and \
                not set(clean_words(query_phrase)) <= _VAGUE:
            return "Query", {"query": " ".join(clean_words(query_phrase))}
    else:
        cats = _category_names(res)
        if _CATEGORY_WORDS.search(t):
            cat = _contained(t, cats)
            if cat:
                return "Category", {"category": cat, "level": res.category_level}
        # A product type named anywhere ("potato chips please") is a query.
        q = _contained(t, {n: n for n in res.query_names})
        if q is None and len(t.split()) <= 5 and not any(k in t for k in _SEASONAL):
            q = _snap_query(_phrase(t), res)
        if q:
            return "Query", {"query": q}
        cat = _contained(t, cats)
        if cat:
            return "Category", {"category": cat, "level": res.category_level}

    name = _template_task(t)
    if name and name != "JustForYou":
        return name, {}
    return "JustForYou", {"text": str(text).strip()}
