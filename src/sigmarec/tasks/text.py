"""Small text helpers shared by the tasks: query cleaning and user-profile sentences."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

# Complete Journey names product types in 30 upper-case characters with many abbreviations.
ABBREVIATIONS = {
    "frzn": "frozen", "frz": "frozen", "sft": "soft", "drnk": "drink", "drnks": "drinks",
    "btl": "bottle", "carb": "carbonated", "mxs": "mixes", "brkfst": "breakfast",
    "whlsm": "wholesome", "bkd": "baked", "fd": "food", "fds": "foods", "sald": "salad",
    "drsng": "dressing", "sndwch": "sandwich", "sprd": "spread", "dnrs": "dinners",
    "dnr": "dinner", "ss": "single serve", "rts": "ready to serve", "veg": "vegetable",
    "vegs": "vegetables", "bn": "bean", "chix": "chicken", "brd": "breaded",
    "pkgd": "packaged", "conc": "concentrate", "flvrd": "flavored", "unswe": "unsweetened",
    "prem": "premium", "sup": "super", "catfd": "cat food", "dogfd": "dog food",
    "hygn": "hygiene", "fem": "feminine", "lozng": "lozenge", "cntrl": "control",
    "liqs": "liquids", "jce": "juice", "ltr": "lighter", "refrig": "refrigerated",
    "pk": "pack", "car": "carbonated", "sngl": "single", "srv": "serve", "mlt": "multi",
    "crmd": "creamed", "orgnzrs": "organizers", "hngrs": "hangers", "spec": "special",
}
# Words that carry no search meaning on their own.
STOPWORDS = {"all", "other", "misc", "incl", "including", "w", "and", "the", "of", "only", "ex",
             "exc", "excp", "exce", "exct"}
# A product type that is just one of these needs its parent category to become a query.
GENERIC = {
    "premium", "fresh", "economy", "dry", "cooked", "enhanced", "entrees", "flavored", "value",
    "regular", "select", "choice", "specialty", "natural", "organic", "external", "bulk",
    "angus", "beans", "juice", "cheese", "dressings", "blends", "mainstream", "seasonal",
}

_PARENS = re.compile(r"\([^)]*\)|\(.*$")
_SPLIT = re.compile(r"[^a-z0-9']+")


def clean_words(text: str) -> list[str]:
    """Lower-cased search words of a category name: parentheses, numbers and stop words gone,
    abbreviations expanded, repeats removed."""
    text = _PARENS.sub(" ", str(text).lower())
    out: list[str] = []
    for tok in _SPLIT.split(text):
        tok = tok.strip("'")
        if len(tok) < 2 or any(ch.isdigit() for ch in tok) or tok in STOPWORDS:
            continue
        for word in ABBREVIATIONS.get(tok, tok).split():
            if word not in out:
                out.append(word)
    return out


def clean_text(text: str) -> str:
    return " ".join(clean_words(text))


def display_category(name: str) -> str:
    """How an instruction names a category: lower case, abbreviations expanded."""
    words = clean_words(name)
    return " ".join(words) if words else str(name).strip().lower()


def is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    try:
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(v, str) and v.strip().lower() in ("", "nan", "none", "unknown")


UNKNOWN_PROFILE = "unknown (no demographics on file)"

# How known profile columns read; any other column reads "<column> <value>".
_PROFILE_FORMATS = {
    "age": "age {}",
    "income": "income {}",
    "home_ownership": "{}",
    "marital_status": "{}",
    "household_size": "household of {}",
    "household_comp": "{}",
    "kids_count": "kids: {}",
    "gender": "gender {}",
    "occupation": "occupation {}",
}


def profile_text(row: Mapping[str, Any], columns: list[str]) -> str:
    """One line describing a user from the profile columns present; neutral when all missing."""
    parts = []
    for col in columns:
        v = row.get(col)
        if is_missing(v):
            continue
        fmt = _PROFILE_FORMATS.get(col, col.replace("_", " ") + " {}")
        parts.append(fmt.format(str(v).strip()).lower())
    return ", ".join(parts) if parts else UNKNOWN_PROFILE
