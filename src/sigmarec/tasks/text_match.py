"""The items an instruction names, by its words: the copy prior's text-match channel.

An 8-layer LLM fine-tuned on 4,000 prompts does not learn to follow instructions: unfiltered,
2-4% of SIGMA's top 10 satisfied a Category or Query instruction (docs/experiments.md, round 8),
although the words of such an instruction name the items it asks for. The paper's SIGMA learns
the mapping from ~130M samples; here it is given as evidence the model weighs: a TF-IDF cosine
between the instruction and each item's text (title, category path below the top level, brand),
fitted on the catalogue alone, so nothing of a household or an evaluation period enters it.
The model reads the best-matching items like the purchase counts (``model.text_match``), with
gates it learns from the prompt's hidden state: a task whose words name no product (JustForYou,
Longtail) is free to ignore it.

Two refinements (``model.text_match_tags``, ``model.text_match_bought_first``):

* an item's text may carry derived attributes as words (:func:`season_tags`: the seasons whose
  training-window purchase rate the item rises in), so "It is winter: what seasonal item ..."
  matches the winter items, though no title says "winter". They come from training data only,
  like the tasks' own season sets (the rule a Season target satisfies).
* :meth:`InstructionMatcher.match` can keep the household's own purchases among the matches
  first: a broad category matches thousands of items, and the best 200 by cosine (short titles)
  need not hold one the household buys.

scikit-learn's ``TfidfVectorizer`` does the weighting and the English stop words; words that no
item text holds have no column and drop out, and so do the task templates' own words
(:func:`template_words`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from sigmarec.data.processed import ProcessedData
from sigmarec.errors import SigmaError
from sigmarec.tasks.config import TasksConfig
from sigmarec.tasks.definitions import TASK_CLASSES
from sigmarec.tasks.resources import TaskResources, build_resources
from sigmarec.tasks.sft_data import ALIGN_ITEM_TEMPLATES
from sigmarec.tasks.text import clean_words

_TOKENS = r"(?u)\b[a-z][a-z]+\b"
_PLACEHOLDER = re.compile(r"\{[^}]*\}")


def template_words() -> frozenset[str]:
    """The words of every task's instruction templates outside their placeholders ("household",
    "items", "popular", "seasonal"): they are in every request of a task and name no product,
    though some item texts hold them ("HOUSEHOLD CLEANING"), so the matcher ignores them."""
    words: set[str] = set()
    for cls in TASK_CLASSES.values():
        for tpl in (*cls.train_templates, *cls.eval_templates):
            words.update(clean_words(_PLACEHOLDER.sub(" ", tpl)))
    for tpl in ALIGN_ITEM_TEMPLATES:
        words.update(clean_words(_PLACEHOLDER.sub(" ", tpl)))
    return frozenset(words)


def season_tags(res: TaskResources, n_items: int | None = None) -> list[str]:
    """Per item, the names of the seasons whose item set (training-window lift, the Season
    task's rule) holds it, as words; items past the resources' catalogue (added after
    training, never bought in it) get none."""
    n = res.n_items if n_items is None else int(n_items)
    if n < res.n_items:
        raise SigmaError(f"season tags for {n} items, but the task resources know "
                         f"{res.n_items}")
    words = [" ".join(clean_words(name)) for name in res.season_names]
    out = [""] * n
    for s, members in enumerate(res.season_items):
        for i in np.flatnonzero(members):
            out[i] = f"{out[i]} {words[s]}".strip()
    return out


def item_match_texts(items: pd.DataFrame, tags: Sequence[str] | None = None) -> list[str]:
    """Each item's matchable text: title, the category path without its top level (a
    department name such as "grocery" is in nearly every request and names nothing), brand,
    and ``tags`` (one string per item, e.g. :func:`season_tags`); abbreviations expanded as
    the tasks write their queries."""
    n = len(items)
    if tags is not None and len(tags) != n:
        raise SigmaError(f"text match: {len(tags)} item tags for {n} items")

    def col(name: str) -> pd.Series:
        if name not in items.columns:
            return pd.Series([""] * n, index=items.index)
        return items[name].fillna("").astype(str)

    def below_top(path: str) -> str:
        parts = [p.strip() for p in path.split(">")]
        return " ".join(parts[1:] if len(parts) > 1 else parts)

    texts = col("title") + " " + col("category_path").map(below_top) + " " + col("brand")
    if tags is not None:
        texts = texts + " " + pd.Series(list(tags), index=items.index).astype(str)
    return [" ".join(clean_words(t)) for t in texts.tolist()]


class InstructionMatcher:
    """Fitted on a catalogue's item texts; :meth:`match` gives each instruction's best-matching
    items and their cosine (0, 1]."""

    def __init__(self, texts: Sequence[str], top: int, min_score: float) -> None:
        if top < 1:
            raise SigmaError(f"model.text_match_items must be >= 1, got {top}")
        self.top, self.min_score = int(top), float(min_score)
        self.n_items = len(texts)
        stop = sorted(ENGLISH_STOP_WORDS | template_words())
        self.vectorizer = TfidfVectorizer(stop_words=stop, sublinear_tf=True,
                                          token_pattern=_TOKENS, dtype=np.float32)
        if not any(t.strip() for t in texts):
            raise SigmaError("model.text_match: no item of the catalogue has a title, category "
                             "path or brand to match instructions against")
        self.matrix = self.vectorizer.fit_transform(list(texts)).T.tocsr()  # (V, N)

    @classmethod
    def from_items(cls, items: pd.DataFrame, top: int, min_score: float,
                   tags: Sequence[str] | None = None) -> InstructionMatcher:
        return cls(item_match_texts(items, tags), top, min_score)

    def match(self, instructions: Sequence[str],
              prefer: Sequence[Sequence[int]] | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per instruction: (items int64, cosines float32), at most ``top``, each cosine >=
        ``min_score``; best first (ties to the lower id), except that with ``prefer`` (one
        list of item ids per instruction: the household's purchases) those of them that
        match come first, best first among themselves."""
        if not len(instructions):
            return []
        if prefer is not None and len(prefer) != len(instructions):
            raise SigmaError(f"text match: {len(prefer)} preferred-item lists for "
                             f"{len(instructions)} instructions")
        q = self.vectorizer.transform([" ".join(clean_words(str(t))) for t in instructions])
        sims = (q @ self.matrix).tocsr()  # (B, N), sparse: only items sharing a word
        out = []
        for r in range(sims.shape[0]):
            lo, hi = sims.indptr[r], sims.indptr[r + 1]
            idx, val = sims.indices[lo:hi], sims.data[lo:hi]
            keep = val >= self.min_score
            idx, val = idx[keep], val[keep]
            first = (np.isin(idx, np.asarray(prefer[r], dtype=np.int64)) if prefer is not None
                     else np.zeros(len(idx), dtype=bool))
            order = np.lexsort((idx, -val, ~first))[: self.top]
            out.append((idx[order].astype(np.int64), val[order].astype(np.float32)))
        return out


class MatchSettings(Protocol):
    """The text-match fields of the model config (``model.text_match*``); a protocol, so the
    tasks package reads them without importing the later model package."""

    text_match: bool
    text_match_tags: bool
    text_match_items: int
    text_match_min: float


def text_matcher(cfg: MatchSettings, items: pd.DataFrame,
                 resources: TaskResources | None = None) -> InstructionMatcher | None:
    """The instruction matcher a model with ``cfg.text_match`` reads, fitted on ``items`` (the
    catalogue the model ranks; with ``cfg.text_match_tags`` also on the seasons of
    ``resources``, the task resources of the training data); None without the channel."""
    if not cfg.text_match:
        return None
    tags = None
    if cfg.text_match_tags:
        if resources is None:
            raise ValueError("this model's text match carries season tags "
                             "(model.text_match_tags): pass text_matcher(cfg.model, items, "
                             "build_resources(data, cfg.tasks))")
        tags = season_tags(resources, len(items))
    return InstructionMatcher.from_items(items, cfg.text_match_items, cfg.text_match_min, tags)


def data_matcher(cfg: MatchSettings, data: ProcessedData, tasks: TasksConfig,
                 items: pd.DataFrame | None = None) -> InstructionMatcher | None:
    """:func:`text_matcher` over ``data``'s catalogue (or ``items``, a served catalogue that
    extends it), with the season tags of ``data``'s training window where the model reads
    them (``tasks``: the run's task config, which defines the seasons)."""
    res = build_resources(data, tasks) if cfg.text_match and cfg.text_match_tags else None
    return text_matcher(cfg, data.items if items is None else items, res)
