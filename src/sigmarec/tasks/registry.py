"""Task lookup, construction for a dataset, and mapping a user's free text onto a task."""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

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
    r"\b(?:category|categories|aisle|section|department|shelf|shelves|range|within|from|limit|"
    r"limited|restrict|restricted|only)\b"
)
_CATEGORY_PATTERNS = (
    re.compile(r"\b(?:in|from|within|browsing|browse|of|the)\s+(?:the\s+)?([a-z0-9&/' :\-]+?)\s+"
               r"(?:category|aisle|section|department|shelf|range)\b"),
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


# Requests without a parameter are recognised by what they mean, not only by fixed phrases: a
# long-tail request says that few others buy (or know) an item, a discovery request that the
# household itself has not bought a kind of product. Each is a small grammar of general words.
_FEW = (r"(?:few|fewer|hardly|barely|seldom|rarely|nobody|no one|not many|little|less|least|"
        r"low|not|isn't|doesn't|don't|aren't|beyond|avoid|skip|without|instead of|rather than)")
_POPULAR = (r"(?:popular\w*|mainstream|sell|sells|selling|sellers?|sold|known|common|famous|"
            r"heard|talks?|talked|buys?|bought|purchases?|purchased|hits?|top)")
_RARE = (r"\b(?:uncommon|unusual|rarer|rarest|rare|little-known|lesser-known|unknown|obscure|"
         r"overlooked|overlook|underrated|under-the-radar|offbeat|quirky|niche)\b")
_LONGTAIL_CONCEPT = re.compile(rf"\b{_FEW}\b(?:\W+[\w'-]+){{0,2}}\W+{_POPULAR}\b|{_RARE}")
_HOUSEHOLD = (r"(?:i|i've|i'm|we|we've|we're|us|our|my|me|household|family|they|they've|"
              r"shopper|customer)")
_NOT_YET = (r"(?:never|not|haven't|hasn't|didn't|don't|doesn't|skip|skipped|ignore|ignored|"
            r"avoid|avoided)")
_CONSUME = (r"(?:buy|buys|bought|tried|try|had|have|purchased?|shopped|shop|get|got|put|eaten|"
            r"eat|cooked|cook|used|use)")
_KIND = r"(?:categor(?:y|ies)|kinds?|types?|aisles?|sections?|departments?)"
_DISCOVER_CONCEPT = re.compile(
    rf"\b{_HOUSEHOLD}\b(?:\W+[\w']+){{0,2}}\W+{_NOT_YET}\b(?:\W+[\w']+){{0,2}}\W+{_CONSUME}\b"
    rf"|\b{_HOUSEHOLD}\b(?:\W+[\w']+){{0,2}}\W+(?:skip|skipped|ignore|ignored)\b"
    rf"|\b(?:new|untried|unexplored|unfamiliar|different|another|first-time)\b"
    rf"(?:\W+[\w'-]+){{0,2}}\W+{_KIND}\b"
    rf"|\boutside\b(?:\W+[\w']+){{0,2}}\W+(?:categor(?:y|ies)|range|habits?|kinds?|types?)\b"
    rf"|\bnew (?:to|for) (?:me|us|them|this)\b|\bbranch(?:ing)? out\b|\bhorizons?\b"
)


def _concept_task(t: str) -> str | None:
    """Discover or Longtail by meaning (see ``_DISCOVER_CONCEPT`` / ``_LONGTAIL_CONCEPT``), else
    None; discovery first: "we don't buy" is about the household, "few people buy" about
    everyone else."""
    if _DISCOVER_CONCEPT.search(t):
        return "Discover"
    if _LONGTAIL_CONCEPT.search(t):
        return "Longtail"
    return None


def _router_vocabulary() -> frozenset[str]:
    """The words the router's rules are written in: a misspelt request word one edit from one
    of them is read as it (``_fix_typos``)."""
    text = " ".join([*_LONGTAIL, *_DISCOVER, *_SEASONAL, "category categories aisle section "
                     "department shelf range search searching looking find show niche rare "
                     "seasonal season popular seller bestseller discover explore unusual "
                     "uncommon never tried bought", *default_seasons()])
    return frozenset(w for w in re.findall(r"[a-z]+", text) if len(w) >= 4)


_VOCAB = _router_vocabulary()


def _fix_typos(t: str, keep: frozenset[str] = frozenset()) -> str:
    """``t`` with each word of 5+ letters that is not a rule word (nor in ``keep``, the
    catalogue's words) replaced by the closest rule word when they are one slip apart. Shorter
    words are left alone: one edit from a rule word they are as often another word ("nice",
    "niche")."""
    def fix(m: re.Match[str]) -> str:
        w = m.group(0)
        if len(w) < 5 or w in _VOCAB or w in keep:
            return w
        close = difflib.get_close_matches(w, _VOCAB, n=1, cutoff=0.85)
        return close[0] if close else w
    return re.sub(r"[a-z]+", fix, t)


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
        # A head of vague or function words alone ("to" in "i want to try ...") names no
        # product, even where some product type holds the word.
        if set(head) <= _VAGUE | ENGLISH_STOP_WORDS:
            break
        want = [_stem(w) for w in head]
        holders = [q for q, st in zip(names, stems, strict=True) if set(want) <= st]
        if holders:
            best = min(holders, key=lambda q: (len(q.split()), q))
            spelled = {_stem(w): w for w in best.split()}
            return " ".join(spelled[s] for s in want)
    close = difflib.get_close_matches(" ".join(words), names, n=1, cutoff=0.8)
    return close[0] if close else None


def _catalogue_words(res: TaskResources | None) -> frozenset[str]:
    """The words of the catalogue's queries and categories: never read as typos."""
    if res is None:
        return frozenset()
    names = [*res.query_names, *_category_names(res)]
    return frozenset(w for n in names for w in re.findall(r"[a-z]+", n.lower()))


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
    keep = _catalogue_words(res)
    t = _fix_typos(_norm(text), keep)
    # Search and category phrases end with their sentence.
    clauses = [c for c in (_fix_typos(_norm(x), keep) for x in re.split(r"[.?!;]+", str(text)))
               if c]
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
    concept = _concept_task(t)
    if concept:
        return concept, {}

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
        # A product type named anywhere ("potato chips please") is a query, unless a longer
        # category name holds it ("fluid milk products"): the most specific name wins.
        q = _contained(t, {n: n for n in res.query_names})
        cat = _contained(t, cats)
        if cat and (q is None or len(display_category(cat).split()) > len(q.split())):
            return "Category", {"category": cat, "level": res.category_level}
        if q is None and len(t.split()) <= 5 and not any(k in t for k in _SEASONAL):
            q = _snap_query(_phrase(t), res)
        if q:
            return "Query", {"query": q}
        if cat:
            return "Category", {"category": cat, "level": res.category_level}

    name = _template_task(t)
    if name and name != "JustForYou":
        return name, {}
    return "JustForYou", {"text": str(text).strip()}
