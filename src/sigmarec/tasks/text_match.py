"""The items an instruction names, by its words: the copy prior's text-match channel.

An 8-layer LLM fine-tuned on 4,000 prompts does not learn to follow instructions: unfiltered,
2-4% of SIGMA's top 10 satisfied a Category or Query instruction (docs/experiments.md, round 8),
although the words of such an instruction name the items it asks for. The paper's SIGMA learns
the mapping from ~130M samples; here it is given as evidence the model weighs: a TF-IDF cosine
between the instruction and each item's text (title, category path below the top level, brand),
fitted on the catalogue alone, so nothing of a household or an evaluation period enters it.
The model reads the best-matching items like the purchase counts (``model.text_match``), with
gates it learns from the prompt's hidden state: a task whose words name no product (JustForYou,
Season) is free to ignore it.

scikit-learn's ``TfidfVectorizer`` does the weighting and the English stop words; words that no
item text holds have no column and drop out, and so do the task templates' own words
(:func:`template_words`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from sigmarec.errors import SigmaError
from sigmarec.tasks.definitions import TASK_CLASSES
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


def item_match_texts(items: pd.DataFrame) -> list[str]:
    """Each item's matchable text: title, the category path without its top level (a
    department name such as "grocery" is in nearly every request and names nothing), brand;
    abbreviations expanded as the tasks write their queries."""
    n = len(items)

    def col(name: str) -> pd.Series:
        if name not in items.columns:
            return pd.Series([""] * n, index=items.index)
        return items[name].fillna("").astype(str)

    def below_top(path: str) -> str:
        parts = [p.strip() for p in path.split(">")]
        return " ".join(parts[1:] if len(parts) > 1 else parts)

    texts = col("title") + " " + col("category_path").map(below_top) + " " + col("brand")
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
    def from_items(cls, items: pd.DataFrame, top: int, min_score: float) -> InstructionMatcher:
        return cls(item_match_texts(items), top, min_score)

    def match(self, instructions: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per instruction: (items int64, cosines float32), best first (ties to the lower id),
        at most ``top``, each cosine >= ``min_score``."""
        if not len(instructions):
            return []
        q = self.vectorizer.transform([" ".join(clean_words(str(t))) for t in instructions])
        sims = (q @ self.matrix).tocsr()  # (B, N), sparse: only items sharing a word
        out = []
        for r in range(sims.shape[0]):
            lo, hi = sims.indptr[r], sims.indptr[r + 1]
            idx, val = sims.indices[lo:hi], sims.data[lo:hi]
            keep = val >= self.min_score
            idx, val = idx[keep], val[keep]
            order = np.lexsort((idx, -val))[: self.top]
            out.append((idx[order].astype(np.int64), val[order].astype(np.float32)))
        return out
