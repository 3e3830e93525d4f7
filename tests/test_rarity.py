"""The copy prior's rarity channel (the household's purchases weighted by how rarely the
catalogue's households buy them): the values, the losses against the written-out reference,
the decoder against the slow reference, save/load and serving extension, and that it learns
to pick a household's niche purchase where the count channel alone cannot."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model import N_ITEMS
from test_objective import _example
from test_repeat import (
    _randomised,
    _top1_after_training,
    assert_decoder_matches_reference,
    assert_losses_match_reference,
    decoder_model_and_examples,
)
from test_text_match import _count_and_match, _match_batch

from sigmarec.model import load_sigma_model
from sigmarec.model.batch import PromptBatch
from sigmarec.model.config import ModelConfig
from sigmarec.model.sigma import WEIGHTS_FILE

torch.set_num_threads(1)

# Training purchase counts of the N_ITEMS test items: item i bought (i * 7) % 11 times.
TRAIN_COUNTS = (np.arange(N_ITEMS) * 7) % 11


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=N_ITEMS, max_size=N_ITEMS))
def test_rarity_is_the_share_of_the_catalogue_bought_at_least_as_often(counts) -> None:
    model = _rarity_model()
    model.set_item_rarity(np.array(counts))
    r = model.item_rarity.numpy().astype(np.float64)
    c = np.array(counts)
    want = np.array([(c >= x).mean() for x in c])
    np.testing.assert_allclose(r, want, rtol=1e-6)
    assert np.all((r > 0) & (r <= 1))
    # More often bought, never rarer; an unbought item is the rarest possible (1).
    order = np.argsort(c)
    assert np.all(np.diff(r[order]) <= 1e-7)
    assert np.all(r[c == 0] == 1.0)


def _rarity_model(**cfg):
    model = _randomised(repeat_counts=True, repeat_rarity=True, **cfg)
    model.set_item_rarity(TRAIN_COUNTS)
    return model


def test_rarity_channel_lists_the_counted_items_at_their_scaled_rarity() -> None:
    model = _rarity_model(text_match=True)
    ex, b = _match_batch(model)
    slots = model.prompt_slots(PromptBatch.from_collated(
        {k: v for k, v in b.items() if not k.startswith("novel_")}))
    rarity_items, rarity_values = slots.lists["rarity"]
    assert torch.equal(rarity_items, b["count_items"])
    ok = b["count_items"] >= 0
    want = model.item_rarity[b["count_items"].clamp(min=0)] * model.cfg.rarity_scale
    torch.testing.assert_close(rarity_values[ok], want[ok])
    assert (rarity_values[~ok] == 0).all()
    assert slots.channels == 5 and model.repeat.proj.out_features == 10
    # The counted items are listed once for the decoder, not once per channel.
    assert slots.listed_items().shape[1] == (slots.items.shape[1] + b["count_items"].shape[1]
                                             + b["match_items"].shape[1])
    with pytest.raises(ValueError, match="repeat_counts"):
        ModelConfig(repeat_aware=True, repeat_rarity=True)
    with pytest.raises(ValueError, match="shape"):
        model.set_item_rarity(np.zeros(N_ITEMS + 1))


def test_rarity_channel_in_the_label_ntp_and_the_catalogue_softmax() -> None:
    """Ten gates: sequence, context, counts, match, rarity (prefix), then the same for items;
    the rarity enters as log1p(scale x rarity) of each counted item."""
    model = _rarity_model(text_match=True, infonce_negatives="catalogue", dense_weight=1.0)
    with torch.no_grad():
        model.repeat.proj.bias[4].fill_(0.9)  # the rarity gates away from the others
        model.repeat.proj.bias[9].fill_(1.7)
    ex, b = _match_batch(model)
    assert_losses_match_reference(model, ex, b)


@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_decoder_with_rarity_equals_the_reference(sizes) -> None:
    # The rarity item gate at 4: rare counted items must reach the lists.
    model, exs = decoder_model_and_examples(
        sizes, 9, _count_and_match, prepare=lambda m: m.set_item_rarity(TRAIN_COUNTS),
        repeat_counts=True, text_match=True, repeat_rarity=True)
    assert_decoder_matches_reference(model, exs)

def test_rarities_survive_save_and_load_and_are_required(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from sigmarec.backbone import BackboneConfig

    model = _rarity_model()
    model.save_trainable(tmp_path)
    feats = {s: getattr(model, f"feat_{s}").numpy() for s in model.sources}
    again = load_sigma_model(tmp_path, BackboneConfig(source="tiny"), feats,
                             model.item_prefix.numpy())
    assert torch.equal(again.item_rarity, model.item_rarity)
    # A checkpoint without them would score with zeros: refused.
    weights = tmp_path / WEIGHTS_FILE
    state = load_file(str(weights))
    del state["item_rarity"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="item_rarity"):
        load_sigma_model(tmp_path, BackboneConfig(source="tiny"), feats,
                         model.item_prefix.numpy())


def test_items_added_for_serving_are_the_rarest() -> None:
    from sigmarec.serving.overlay import extend_model

    model = _rarity_model()
    before = model.item_rarity.clone()
    feats = {s: getattr(model, f"feat_{s}")[:2].numpy() for s in model.sources}
    new = extend_model(model, feats, np.array([0, 1]))
    assert new.tolist() == [N_ITEMS, N_ITEMS + 1]
    assert torch.equal(model.item_rarity[:N_ITEMS], before)
    assert model.item_rarity[N_ITEMS:].tolist() == [1.0, 1.0]


def test_the_rarity_channel_learns_to_pick_the_niche_purchase() -> None:
    """Targets are always the household's one niche purchase (an item of the catalogue's least
    bought quarter) among three staples (its most bought quarter), which the prompt never
    shows and whose purchase count says nothing (counts are shuffled): only the rarity channel
    tells it from the others."""
    rng = np.random.default_rng(5)
    counts = rng.permutation(np.arange(N_ITEMS) * 3)  # distinct training counts
    niche = np.flatnonzero(counts < np.quantile(counts, 0.25))
    staple = np.flatnonzero(counts >= np.quantile(counts, 0.75))

    def samples(model, count: int):
        out = []
        for _ in range(count):
            target = int(rng.choice(niche))
            counted = [target, *rng.choice(staple, size=3, replace=False).tolist()]
            counted = [int(i) for i in rng.permutation(counted)]
            rest = np.setdiff1d(np.arange(N_ITEMS), counted)
            hist = rng.choice(rest, size=3, replace=False).tolist()
            values = tuple(int(v) for v in rng.permutation([4, 3, 2, 1]))
            out.append(_example(model, [], hist, target).with_lists(
                counts=(tuple(counted), values)))
        return out

    acc = {on: _top1_after_training(
        {"repeat_aware": True, "repeat_counts": True, "repeat_rarity": on}, samples,
        lambda item, e: item == e.target_item,
        prepare=lambda m: m.set_item_rarity(counts) if m.cfg.repeat_rarity else None)
        for on in (False, True)}
    assert acc[True] >= 0.9, acc
    assert acc[True] > acc[False] + 0.3, acc
