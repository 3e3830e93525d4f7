"""The copy prior's novelty channel (the most bought items of the categories a household never
bought): the lists against their definition, the collator and the model's checks, the losses
against the written-out reference, the decoder against the slow reference, and that the
instruction learns to switch it on."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
from types import SimpleNamespace

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
from test_text_match import MATCHES

from sigmarec.model.batch import PromptBatch
from sigmarec.model.config import ModelConfig
from sigmarec.tasks.novelty import NoveltyLister

torch.set_num_threads(1)

NOVEL = [((30, 31, 9), (1.0, 0.5, 0.25)), ((), ()), ((22, 23), (0.9, 0.3)), ((33,), (0.7,))]


def _lister(codes, counts, n: int) -> NoveltyLister:
    res = SimpleNamespace(depth=2, discover_level=1,
                          level_codes=np.stack([np.zeros(len(codes), dtype=np.int64),
                                                np.asarray(codes, dtype=np.int64)]),
                          train_counts=np.asarray(counts))
    return NoveltyLister.from_resources(res, n)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_novelty_list_is_the_most_bought_items_of_the_unseen_categories(data) -> None:
    n_items = data.draw(st.integers(1, 30))
    codes = data.draw(st.lists(st.integers(-1, 5), min_size=n_items, max_size=n_items))
    counts = data.draw(st.lists(st.integers(0, 9), min_size=n_items, max_size=n_items))
    history = data.draw(st.lists(st.integers(0, n_items - 1), max_size=12))
    n = data.draw(st.integers(1, 8))
    if not any(c >= 0 and k > 0 for c, k in zip(codes, counts, strict=True)):
        return  # nothing to list in any history
    items, values = _lister(codes, counts, n).list(np.array(history, dtype=np.int64))
    seen = {codes[i] for i in history}
    # Brute force: unseen category, bought in training, most bought first, ties by index.
    want = sorted((i for i in range(n_items) if codes[i] >= 0 and codes[i] not in seen
                   and counts[i] > 0), key=lambda i: (-counts[i], i))[:n]
    assert items.tolist() == want
    top = max(counts[i] for i in range(n_items) if codes[i] >= 0)
    np.testing.assert_allclose(values, [counts[i] / top for i in want])
    assert np.all((values > 0) & (values <= 1)) and np.all(np.diff(values) <= 0)


def test_novelty_lister_refuses_a_catalogue_without_categories() -> None:
    res = SimpleNamespace(depth=0, discover_level=0, level_codes=np.zeros((0, 3)),
                          train_counts=np.ones(3))
    with pytest.raises(ValueError, match="category paths"):
        NoveltyLister.from_resources(res, 5)
    with pytest.raises(ValueError, match="n >= 1"):
        _lister([0, 1], [1, 1], 0)


def _novel_batch(model):
    ex, _ = _batch(model)
    ex = [e.with_lists(counts=c, text_match=m, novelty=v)
          for e, c, m, v in zip(ex, COUNTS, MATCHES, NOVEL, strict=True)]
    return ex, model.collator(hard_negatives=3)(ex, rng=np.random.default_rng(0))


def test_collator_pads_novelty_lists_and_the_model_requires_them() -> None:
    model = _randomised(repeat_counts=True, text_match=True, novelty=True)
    ex, b = _novel_batch(model)
    assert b["novel_items"].shape == (4, 3) and b["novel_items"][1].tolist() == [-1] * 3
    assert b["novel_values"][2].tolist() == pytest.approx([0.9, 0.3, 0.0])
    with pytest.raises(ValueError, match="2 novel_items but 1 novel_values"):
        model.collator()([ex[2].with_lists(novelty=(NOVEL[2][0], (0.5,)))])
    with pytest.raises(ValueError, match="popularity shares"):
        model.collator()([ex[2].with_lists(novelty=(NOVEL[2][0], (1.5, 0.2)))])
    with pytest.raises(ValueError, match="novel_items outside"):
        model.collator()([ex[2].with_lists(novelty=((22, N_ITEMS), NOVEL[2][1]))])
    with pytest.raises(ValueError, match="novel_items"):
        model(**{k: v for k, v in b.items() if not k.startswith("novel_")})
    with pytest.raises(ValueError, match="novelty"):
        ModelConfig(novelty=True)
    slots = model.prompt_slots(PromptBatch.from_collated(b))
    assert slots.channels == 5 and model.repeat.proj.out_features == 10
    torch.testing.assert_close(slots.lists["novelty"][1],
                               b["novel_values"] * model.cfg.novelty_scale)
    # The decoder sees the listed items as candidates.
    assert slots.listed_items().shape[1] == (slots.items.shape[1] + 4 + 3 + 3)


def test_to_examples_refuses_rows_without_novelty_lists() -> None:
    from sigmarec.tasks.prompt_style import DEFAULT_STYLE
    from sigmarec.training.stage import to_examples

    model = _randomised(novelty=True)
    rows = pd.DataFrame({"instruction": ["something new"], "targets": [np.array([1])]})
    with pytest.raises(ValueError, match="novel_items"):
        to_examples(rows, model, None, model.item_prefix.numpy(), with_target=False,
                    style=DEFAULT_STYLE)


def test_novelty_channel_in_the_label_ntp_and_the_catalogue_softmax() -> None:
    """Twelve gates: sequence, context, counts, match, rarity, novelty (prefix), then the same
    for items; the novelty enters as log1p(scale x popularity); dense positions never see it."""
    model = _randomised(repeat_counts=True, text_match=True, repeat_rarity=True, novelty=True,
                        infonce_negatives="catalogue", dense_weight=1.0)
    model.set_item_rarity((np.arange(N_ITEMS) * 7) % 11)
    with torch.no_grad():
        model.repeat.proj.bias[5].fill_(0.9)  # the novelty gates away from the others
        model.repeat.proj.bias[11].fill_(1.7)
    ex, b = _novel_batch(model)
    assert_losses_match_reference(model, ex, b)


@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_decoder_with_novelty_equals_the_reference(sizes) -> None:
    model, exs = decoder_model_and_examples(
        sizes, 5, lambda i: {"counts": COUNTS[i], "novelty": NOVEL[i]},
        repeat_counts=True, novelty=True)
    items = assert_decoder_matches_reference(model, exs)
    listed = {i for e in exs for i in (*e.item_ids, *e.channel("counts")[0])}
    novel = {i for vi, _ in NOVEL for i in vi} - listed
    assert novel & set(items.ravel().tolist()), "no novelty-only item was recommended"


def test_the_instruction_learns_to_switch_the_novelty_channel_on() -> None:
    """Half the prompts ask for the household's staple (the target is its most bought item),
    half for something new (the target is the most popular item of a category it never
    bought); the request word is the only difference. Neither target is in the prompt. A model
    with the channel learns which to read from the instruction; one without cannot find the
    new item."""
    rng = np.random.default_rng(5)

    def samples(model, count: int):
        tok = model.tokenizer
        out = []
        for s in range(count):
            items = rng.choice(N_ITEMS, size=10, replace=False).tolist()
            hist, counted, novel = items[:3], items[3:6], items[6:]
            new = s % 2 == 1
            target = novel[0] if new else counted[0]
            e = _example(model, [], hist, target)
            word = tok(" Something new." if new else " The usual.")["input_ids"]
            out.append(dataclasses.replace(e, input_ids=word + list(e.input_ids)).with_lists(
                counts=(tuple(counted), (int(rng.integers(5, 9)), 2, 1)),
                novelty=(tuple(novel),
                         (1.0, *np.sort(rng.uniform(0.2, 0.6, 3))[::-1].tolist()))))
        return out

    acc = {on: _top1_after_training(
        {"repeat_aware": True, "repeat_counts": True, "novelty": on}, samples,
        lambda item, e: item == e.target_item) for on in (False, True)}
    assert acc[True] >= 0.85, acc
    assert acc[True] > acc[False] + 0.3, acc
