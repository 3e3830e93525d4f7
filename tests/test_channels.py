"""The copy prior's channel registry (sigmarec.tasks.channels): the gate order, the checks every
channel gets from the registry (collator, model, ablation), the checkpoint's record of the
gate channels, and a toy channel, defined here as one class plus a registry entry, that flows
through to_examples, training, the fast and the reference decoder and serving's ranking path
with no other edit."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from test_model import N_ITEMS
from test_objective import _batch
from test_repeat import _randomised, assert_decoder_matches_reference, decoder_model_and_examples

from sigmarec.backbone import BackboneConfig
from sigmarec.experiment import ABLATIONS
from sigmarec.model import load_sigma_model
from sigmarec.model.config import ModelConfig
from sigmarec.model.repeat import RepeatGate, gate_channels, n_gates
from sigmarec.model.sigma import META_FILE
from sigmarec.tasks.channels import CHANNELS, Channel, Lister, active_channels, collated_channels
from sigmarec.tasks.columns import history_listers, prompt_columns
from sigmarec.tasks.config import TasksConfig
from sigmarec.training.config import TrainingConfig
from sigmarec.training.loop import train_sigma

# Every channel on (rarity weighs the counted items, so it needs the counts).
ALL_ON = {"repeat_counts": True, "text_match": True, "repeat_rarity": True, "novelty": True}


# ------------------------------------------------------------------------ the registry itself

def test_the_registry_order_is_the_gate_order() -> None:
    cfg = ModelConfig(repeat_aware=True, **ALL_ON)
    assert list(CHANNELS) == ["counts", "text_match", "rarity", "novelty"]
    assert gate_channels(cfg) == ["sequence", "context", *CHANNELS]
    assert n_gates(cfg) == 2 * (2 + len(CHANNELS))
    assert n_gates(ModelConfig(repeat_aware=True)) == 4
    assert active_channels(ModelConfig()) == []  # no copy prior, no channel
    keys = [c.key for c in CHANNELS.values()]
    assert len(set(keys)) == len(keys) and len(set(CHANNELS)) == len(CHANNELS)


@pytest.mark.parametrize("name", list(CHANNELS))
def test_each_channel_has_its_ablation_and_it_turns_the_channel_off(name: str) -> None:
    ch = CHANNELS[name]
    overlay = ABLATIONS[f"no_{name}"]["model"]
    assert overlay == ch.ablation and overlay[ch.flag] is False
    cfg = ModelConfig(repeat_aware=True, **ALL_ON).model_copy(update=overlay)
    assert not ch.active(cfg)
    assert name not in gate_channels(cfg)
    # no_repeat and paper_objective turn every channel off.
    for whole in ("no_repeat", "paper_objective"):
        assert ABLATIONS[whole]["model"][ch.flag] is False


@pytest.mark.parametrize("name", [c.name for c in collated_channels()])
def test_the_collator_pads_and_checks_each_channel(name: str) -> None:
    ch = CHANNELS[name]
    items_col, values_col = ch.columns
    model = _randomised(**ALL_ON)
    ex, _ = _batch(model)
    lists = [((1, 2), (0.5, 1.0)), ((), ()), ((3,), (0.25,)), ((4, 5, 6), (1.0, 0.5, 0.5))]
    ex = [e.with_lists(**{name: li}) for e, li in zip(ex, lists, strict=True)]
    b = model.collator()(ex)
    assert b[items_col].shape == (4, 3) and b[items_col][1].tolist() == [-1] * 3
    assert b[values_col][0].tolist() == [0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match=f"2 {items_col} but 1 {values_col}"):
        model.collator()([ex[0].with_lists(**{name: ((1, 2), (0.5,))})])
    with pytest.raises(ValueError, match=f"{items_col} outside"):
        model.collator()([ex[0].with_lists(**{name: ((1, N_ITEMS), (0.5, 0.5))})])
    with pytest.raises(ValueError, match=f"{values_col} must be"):
        model.collator()([ex[0].with_lists(**{name: ((1,), (-1.0,))})])
    # A plain row (e.g. read back from the prompt tables) carries the same lists as columns.
    row = {"input_ids": ex[2].input_ids, "item_ids": ex[2].item_ids,
           "target_item": ex[2].target_item, "target_prefix": ex[2].target_prefix,
           items_col: [3], values_col: [0.25]}
    assert model.collator()([row])[items_col].tolist() == [[3]]
    # A model that reads the channel cannot score a batch without it.
    with pytest.raises(ValueError, match=items_col):
        model(**{k: v for k, v in b.items() if k not in ch.columns})


@pytest.mark.parametrize("name", list(CHANNELS))
def test_each_channel_adds_two_gates_and_its_table(name: str) -> None:
    ch = CHANNELS[name]
    on = {ch.flag: True, **({"repeat_counts": True} if name == "rarity" else {})}
    model = _randomised(**on)
    assert model.repeat.proj.out_features == 2 * (2 + len(on))
    _, b = _batch(model)
    from sigmarec.model.batch import PromptBatch

    slots = model.prompt_slots(PromptBatch.from_collated(b))
    assert list(slots.lists) == [c.name for c in active_channels(model.cfg)]
    assert name in slots.lists and slots.channels == 2 + len(on)


# ------------------------------------------------------------------------ the checkpoint

def test_the_checkpoint_records_the_gate_channels_and_load_checks_them(tmp_path: Path) -> None:
    model = _randomised(repeat_counts=True, novelty=True)
    model.save_trainable(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["gate_channels"] == ["sequence", "context", "counts", "novelty"]
    feats = {s: getattr(model, f"feat_{s}").numpy() for s in model.sources}
    prefix = model.item_prefix.numpy()
    again = load_sigma_model(tmp_path, BackboneConfig(source="tiny"), feats, prefix)
    assert torch.equal(again.repeat.proj.bias, model.repeat.proj.bias)
    # Gates trained for other channels (here: a registry reordered since) are refused by name.
    meta["gate_channels"] = ["sequence", "context", "novelty", "counts"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained for the channels .*sigma run --force training"):
        load_sigma_model(tmp_path, BackboneConfig(source="tiny"), feats, prefix)
    # A checkpoint written before the names were recorded loads when its gate count matches...
    del meta["gate_channels"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    again = load_sigma_model(tmp_path, BackboneConfig(source="tiny"), feats, prefix)
    assert torch.equal(again.repeat.proj.bias, model.repeat.proj.bias)
    # ... and is refused with the fix when it does not.
    other = _randomised(repeat_counts=True)
    with pytest.raises(ValueError, match="without channel names holds 8 copy gates.*"
                       "model.novelty"):
        other.load_trainable(tmp_path)


# ------------------------------------------------------------------------ a toy channel

class Toy(Channel):
    """One item per prompt: the one after the history's largest id (never in the history),
    valued 1. On in every copy-prior model while ``on`` (no config flag: a test channel)."""

    name: ClassVar[str] = "toy"
    key: ClassVar[str] = "toy"
    source = "history"
    flag: ClassVar[str] = "repeat_aware"
    on: ClassVar[bool] = True

    def active(self, model_cfg) -> bool:
        return self.on and bool(model_cfg.repeat_aware)

    def lister(self, res, cfg) -> Lister | None:
        n = len(res.train_counts)  # the catalogue

        def toy(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            top = int(np.max(history)) if len(history) else -1
            return np.array([(top + 1) % n], dtype=np.int64), np.array([1.0])

        return toy


@pytest.fixture
def toy(monkeypatch):
    """The toy channel registered (last: a new channel goes at the end of the gate order)."""
    monkeypatch.setitem(CHANNELS, "toy", Toy())
    monkeypatch.setattr(Toy, "on", True)
    return CHANNELS["toy"]


def test_a_toy_channel_flows_through_examples_training_and_both_decoders(toy) -> None:
    from sigmarec.tasks.prompt_style import DEFAULT_STYLE
    from sigmarec.tokenization.hybrid import HybridVocab
    from sigmarec.training.stage import to_examples

    model = _randomised(repeat_counts=True)
    assert gate_channels(model.cfg)[-1] == "toy" and model.repeat.proj.out_features == 8
    tcfg = TasksConfig(novel_items=0, count_items=5)
    listers = history_listers(SimpleNamespace(depth=0, train_counts=np.zeros(N_ITEMS)), tcfg)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        hist = rng.choice(N_ITEMS - 1, size=4, replace=False)
        cols = prompt_columns(hist, tcfg, listers)
        assert {"toy_items", "toy_values"} <= set(cols)
        target = int(cols["toy_items"][0])
        rows.append({**cols, "instruction": "something", "target": target,
                     "targets": np.array([target]), "profile": "unknown"})
    df = pd.DataFrame(rows)
    exs = to_examples(df, model, HybridVocab(model.codebook_sizes), model.item_prefix.numpy(),
                      style=DEFAULT_STYLE)
    assert all(e.channel("toy")[0] == (e.target_item,) for e in exs)
    batch = model.collator()(exs)
    assert batch["toy_items"].shape == (16, 1)
    # Training: a few steps move the toy's gates (the target is always its item).
    before = model.repeat.proj.bias.detach().clone()
    cfg = TrainingConfig(steps=3, per_device_batch_size=8, lr=3e-3, new_params_lr=1e-2,
                         warmup_ratio=0.0, hard_negatives=0, eval_at_end=False,
                         mixed_precision="no", restore_best=False)
    model.train()
    res = train_sigma(model, exs, cfg, seed=0, progress=False)
    assert len(res.history) == 3 and all(np.isfinite(r["loss"]) for r in res.history)
    moved = (model.repeat.proj.bias.detach() - before).abs()
    assert moved[3] > 0 and moved[7] > 0  # the toy's prefix gate and item gate
    # The fast decoder equals the reference with the toy's item gate up (index 7 of 8).
    model, exs = decoder_model_and_examples(
        [2, 2], 7, lambda i: {"toy": ((22 + i,), (1.0,))}, repeat_counts=True)
    items = assert_decoder_matches_reference(model, exs)
    assert {22, 23, 24, 25} & set(items.ravel().tolist()), "no toy-listed item recommended"


def test_a_toy_channel_reaches_servings_ranking_path(toy, tiny_run_dir, tmp_path) -> None:
    from sigmarec.serving.runtime import RecRequest, Runtime

    cfg, src = tiny_run_dir
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    # The run's model was trained without the toy: with it registered, loading names the fix.
    with pytest.raises(ValueError, match="trained for the channels"):
        Runtime.load(run_dir, cfg)
    Toy.on = False  # registered but read by no model: the runtime loads and lists it anyway
    rt = Runtime.load(run_dir, cfg)
    st = rt._state
    assert "toy" in st.listers
    # A model that reads the toy (its gates re-made for it, the toy's item gate up).
    Toy.on = True
    model = copy.deepcopy(st.model)
    assert gate_channels(model.cfg)[-1] == "toy"
    model.repeat = RepeatGate(model.hidden, 1.0, n_gates(model.cfg))
    n = n_gates(model.cfg)
    with torch.no_grad():  # the toy's prefix and item gates up
        model.repeat.proj.bias[n // 2 - 1].fill_(30.0)
        model.repeat.proj.bias[n - 1].fill_(30.0)
    decoder = copy.copy(st.decoder)
    decoder.model = model
    rt._state = dataclasses.replace(st, model=model, decoder=decoder)
    users = [str(u) for u in rt.data.users["user_id"].iloc[:3]]
    resolved = [rt.resolve(RecRequest(user_id=u)) for u in users]
    exs = rt._examples(resolved)
    toy_items = [e.channel("toy")[0] for e in exs]
    assert all(len(t) == 1 for t in toy_items)
    cands = decoder.candidates(decoder.batch(exs), cfg.eval.top_n)
    for r, (t,) in enumerate(toy_items):
        assert t in cands.items[r].ravel().tolist()  # the decoder merged the toy's item
    ranked = rt.rank(resolved)
    assert [len(r) for r in ranked] == [x.k for x in resolved]
    assert any(rt.item_idx(x.item_id) == t for r, (t,) in zip(ranked, toy_items, strict=True)
               for x in r), "the toy's item reached no served list"


def test_examples_of_old_prompt_rows_without_a_channels_columns() -> None:
    """Rows written before a channel existed carry no columns: empty lists, unless the channel
    is strict (novelty) for a model that reads it."""
    from sigmarec.tasks.channels import ExampleContext

    rows = pd.DataFrame({"instruction": ["x"]})
    ctx = ExampleContext(ModelConfig(repeat_aware=True, **ALL_ON), None, {})
    assert CHANNELS["counts"].example_lists(rows, ctx) == [((), ())]
    with pytest.raises(ValueError, match="novel_items / novel_values.*--force tasks"):
        CHANNELS["novelty"].example_lists(rows, ctx)
    ctx.model_cfg = ModelConfig(repeat_aware=True)
    assert CHANNELS["novelty"].example_lists(rows, ctx) == [((), ())]
