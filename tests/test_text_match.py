"""The instruction's text match: the matcher, the copy prior's channel against written-out
references, the decoder against the slow reference, and that the channel learns to follow an
instruction the LLM alone does not."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")


import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model import N_ITEMS
from test_objective import _batch, _example
from test_repeat import (
    COUNTS,
    _randomised,
    _top1_after_training,
    assert_decoder_matches_reference,
    assert_losses_match_reference,
    decoder_model_and_examples,
)

from sigmarec.errors import SigmaError
from sigmarec.tasks.text_match import (
    InstructionMatcher,
    item_match_texts,
    season_tags,
    template_words,
)

torch.set_num_threads(1)

ITEMS = pd.DataFrame({
    "title": ["POTATO CHIPS", "TORTILLA CHIPS", "SOUR CREAMS", "ICE CREAM", "FRZN PIZZA",
              "HOUSEHOLD CLEANER", "KIDS CEREAL"],
    "category_path": ["GROCERY > BAG SNACKS > POTATO CHIPS", "GROCERY > BAG SNACKS > TORTILLA",
                      "GROCERY > DAIRY > SOUR CREAMS", "GROCERY > FROZEN > ICE CREAM",
                      "GROCERY > FROZEN PIZZA > PIZZA", "DRUG GM > HOUSEHOLD > CLEANERS",
                      "GROCERY > COLD CEREAL > KIDS CEREAL"],
    "brand": ["National"] * 7,
})


def test_item_texts_drop_the_top_level_and_expand_abbreviations() -> None:
    texts = item_match_texts(ITEMS)
    assert "grocery" not in texts[0] and "bag snacks" in texts[0]
    assert texts[4].startswith("frozen pizza")


def test_matcher_finds_the_named_items_and_ignores_template_words() -> None:
    m = InstructionMatcher.from_items(ITEMS, top=3, min_score=0.05)
    (chips, c_val), (none, _), (home, _) = m.match([
        "Help this household find some potato chips.",
        "What will this household buy next?",  # template words only ("household", ...)
        "Show me household cleaner",
    ])
    assert chips[0] == 0 and 1 in chips.tolist() and len(chips) <= 3
    assert np.all(np.diff(c_val) <= 0) and c_val[0] <= 1 + 1e-6
    assert len(none) == 0
    assert "household" in template_words()
    assert home.tolist() == [5]  # "cleaner" still matches; "household" does not


def test_matcher_refuses_a_catalogue_without_text() -> None:
    with pytest.raises(SigmaError, match="text_match"):
        InstructionMatcher([""] * 3, top=5, min_score=0.1)
    with pytest.raises(SigmaError, match="text_match_items"):
        InstructionMatcher(["a b"], top=0, min_score=0.1)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["chips", "potato", "cream", "sour", "pizza", "frozen",
                                 "kids", "the", "next", "household", "cereal"]),
                max_size=6),
       st.integers(1, 7), st.floats(0.01, 0.9))
def test_matches_are_sorted_capped_and_above_the_floor(words, top, floor) -> None:
    m = InstructionMatcher.from_items(ITEMS, top=top, min_score=floor)
    ((items, values),) = m.match([" ".join(words)])
    assert len(items) == len(values) <= top and len(set(items.tolist())) == len(items)
    assert np.all(values >= floor - 1e-6) and np.all(values <= 1 + 1e-6)
    assert np.all(np.diff(values) <= 1e-7)
    assert np.all((items >= 0) & (items < len(ITEMS)))


def _seasons(n_items: int = len(ITEMS)):
    from types import SimpleNamespace

    members = np.zeros((2, n_items), dtype=bool)
    members[0, [3, 4]] = True  # ice cream, frozen pizza: summer
    members[1, [4, 6]] = True  # frozen pizza, kids cereal: fall
    return SimpleNamespace(n_items=n_items, season_names=["summer", "fall"],
                           season_items=members)


def test_season_tags_let_a_season_request_match_the_seasons_items() -> None:
    tags = season_tags(_seasons(), len(ITEMS) + 2)
    assert tags[:7] == ["", "", "", "summer", "summer fall", "", "fall"] and tags[7:] == ["", ""]
    with pytest.raises(SigmaError, match="season tags for 3 items"):
        season_tags(_seasons(), 3)
    plain = InstructionMatcher.from_items(ITEMS, top=5, min_score=0.05)
    tagged = InstructionMatcher.from_items(ITEMS, top=5, min_score=0.05, tags=tags[:7])
    request = ["It is summer. What seasonal item will this household buy?"]
    assert len(plain.match(request)[0][0]) == 0
    assert sorted(tagged.match(request)[0][0].tolist()) == [3, 4]
    # Tags add to the text; they do not replace it.
    assert tagged.match(["potato chips"])[0][0][0] == 0
    with pytest.raises(SigmaError, match="2 item tags for 7 items"):
        item_match_texts(ITEMS, ["a", "b"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["chips", "potato", "cream", "sour", "pizza", "frozen",
                                 "kids", "cereal", "ice"]), min_size=1, max_size=5),
       st.integers(1, 7), st.sets(st.integers(0, 6)))
def test_bought_first_keeps_the_households_matches_then_the_best_others(words, top,
                                                                      bought) -> None:
    m = InstructionMatcher.from_items(ITEMS, top=top, min_score=0.01)
    request = [" ".join(words)]
    everything = InstructionMatcher.from_items(ITEMS, top=len(ITEMS), min_score=0.01)
    ((all_items, all_values),) = everything.match(request)
    ((items, values),) = m.match(request, prefer=[sorted(bought)])
    score = dict(zip(all_items.tolist(), all_values.tolist(), strict=True))
    mine = [i for i in all_items.tolist() if i in bought]
    others = [i for i in all_items.tolist() if i not in bought]
    # The household's matches first (best first), then the best others, up to top.
    assert items.tolist() == (mine + others)[:top]
    assert values.tolist() == pytest.approx([score[i] for i in items.tolist()])
    with pytest.raises(SigmaError, match="preferred-item lists"):
        m.match(request, prefer=[[], []])


def test_to_examples_keeps_the_households_matches_and_needs_tags_resources() -> None:
    from sigmarec.tasks.prompt_style import DEFAULT_STYLE
    from sigmarec.tasks.text_match import text_matcher
    from sigmarec.training.stage import to_examples

    model = _randomised(repeat_counts=True, text_match=True, text_match_bought_first=True,
                        text_match_items=1)
    items = pd.DataFrame({"title": ["CHIPS ALPHA"] + ["CHIPS"] * (N_ITEMS - 1)})
    matcher = text_matcher(model.cfg, items)
    rows = pd.DataFrame({"instruction": ["chips", "chips"], "targets": [np.array([1])] * 2,
                         "history": [np.array([2, 3])] * 2, "n_context": [0, 0],
                         "count_items": [np.array([9, 4]), np.array([], dtype=np.int64)],
                         "count_values": [np.array([3, 1]), np.array([], dtype=np.int64)]})
    prefix = model.item_prefix.numpy()
    from sigmarec.tokenization.hybrid import HybridVocab

    exs = to_examples(rows, model, HybridVocab(model.codebook_sizes), prefix, with_target=False,
                      matcher=matcher, style=DEFAULT_STYLE)
    # One item kept: the household's best match (9 and 4 match equally: the lower id), and for
    # a household without purchases the best match overall (the lowest id of cosine 1).
    assert exs[0].channel("text_match")[0] == (4,) and exs[1].channel("text_match")[0] == (1,)
    tagged = model.cfg.model_copy(update={"text_match_tags": True})
    with pytest.raises(ValueError, match="text_match_tags"):
        text_matcher(tagged, items)
    assert text_matcher(tagged, items, _seasons(N_ITEMS)) is not None


# ------------------------------------------------------------------------ the model's channel
MATCHES = [((25, 7), (0.9, 0.4)), ((26, 2, 19), (1.0, 0.6, 0.2)), ((), ()), ((27,), (0.8,))]


def _count_and_match(i: int) -> dict:
    """Example i's purchase counts and text matches, as SFTExample lists by channel."""
    return {"counts": COUNTS[i], "text_match": MATCHES[i]}


def _match_batch(model):
    ex, _ = _batch(model)
    ex = [e.with_lists(counts=c, text_match=m) for e, c, m in zip(ex, COUNTS, MATCHES, strict=True)]
    return ex, model.collator(hard_negatives=3)(ex, rng=np.random.default_rng(0))


def test_collator_pads_matches_and_checks_them() -> None:
    model = _randomised(repeat_counts=True, text_match=True)
    ex, b = _match_batch(model)
    assert b["match_items"].shape == (4, 3) and b["match_items"][2].tolist() == [-1] * 3
    assert b["match_values"][0].tolist() == pytest.approx([0.9, 0.4, 0.0])
    with pytest.raises(ValueError, match="2 match_items but 1 match_values"):
        model.collator()([ex[0].with_lists(text_match=(MATCHES[0][0], (0.5,)))])
    with pytest.raises(ValueError, match="cosines"):
        model.collator()([ex[0].with_lists(text_match=(MATCHES[0][0], (1.5, 0.2)))])
    with pytest.raises(ValueError, match="match_items"):
        model(**{k: v for k, v in b.items() if not k.startswith("match_")})
    from sigmarec.model.config import ModelConfig

    with pytest.raises(ValueError, match="text_match"):
        ModelConfig(text_match=True)


def test_to_examples_needs_the_matcher_of_a_text_match_model() -> None:
    from sigmarec.tasks.prompt_style import DEFAULT_STYLE
    from sigmarec.training.stage import to_examples

    model = _randomised(text_match=True)
    rows = pd.DataFrame({"instruction": ["potato chips"], "targets": [np.array([1])]})
    with pytest.raises(ValueError, match="matcher"):
        to_examples(rows, model, None, model.item_prefix.numpy(), with_target=False,
                    style=DEFAULT_STYLE)
    small = InstructionMatcher.from_items(ITEMS, 5, 0.1)
    with pytest.raises(ValueError, match="fitted on 7 items"):
        to_examples(rows, model, None, model.item_prefix.numpy(), with_target=False,
                    matcher=small, style=DEFAULT_STYLE)


def test_match_channel_in_the_label_ntp_and_the_catalogue_softmax() -> None:
    """Eight gates: sequence, context, counts, match (prefix), then the same for items; the
    match enters as log1p(scale x cosine), summed per code on the prefix logits; dense history
    positions never see it (the instruction comes after the history)."""
    model = _randomised(repeat_counts=True, text_match=True, infonce_negatives="catalogue",
                        dense_weight=1.0)
    with torch.no_grad():
        model.repeat.proj.bias[3].fill_(0.8)  # the match gates away from the others
        model.repeat.proj.bias[7].fill_(1.6)
    ex, b = _match_batch(model)
    assert_losses_match_reference(model, ex, b)


@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_decoder_with_text_matches_equals_the_reference(sizes) -> None:
    model, exs = decoder_model_and_examples(sizes, 7, _count_and_match, repeat_counts=True,
                                            text_match=True)
    items = assert_decoder_matches_reference(model, exs)
    listed = {i for e in exs for i in (*e.item_ids, *e.channel("counts")[0])}
    matched = {i for mi, _ in MATCHES for i in mi} - listed
    assert matched & set(items.ravel().tolist()), "no matched-only item was recommended"


def test_the_match_channel_learns_to_follow_the_instruction() -> None:
    """Targets are always the item the instruction names best, never in the prompt: a model
    with the channel finds it on held-out prompts, one without it cannot."""
    rng = np.random.default_rng(5)

    def samples(model, count: int):
        out = []
        for _ in range(count):
            items = rng.choice(N_ITEMS, size=7, replace=False).tolist()
            hist, named = items[:3], items[3:]
            values = (1.0, float(rng.uniform(0.3, 0.6)), 0.2, 0.1)
            out.append(_example(model, [], hist, named[0]).with_lists(
                text_match=(tuple(named), values)))
        return out

    acc = {on: _top1_after_training({"repeat_aware": True, "text_match": on}, samples,
                                    lambda item, e: item == e.target_item)
           for on in (False, True)}
    assert acc[True] >= 0.9, acc
    assert acc[True] > acc[False] + 0.3, acc
