"""The GR baselines: item token schemes, the trie constraint, exact beam search, training, stage."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: nothing here may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from sigmarec.backbone import BackboneConfig, load_backbone
from sigmarec.config import load_config
from sigmarec.core.stage import execute
from sigmarec.errors import ConfigError
from sigmarec.gr.config import GRConfig
from sigmarec.gr.decoding import (
    ItemTrie,
    gr_recommend,
    prefix_allowed_tokens_fn,
    score_all_items,
)
from sigmarec.gr.items import id_tokens, sid_tokens
from sigmarec.gr.model import GRExample, GRModel
from sigmarec.gr.stage import GRBaselinesStage, fill_popular, gr_model_config
from sigmarec.model import ModelConfig
from sigmarec.pipeline import run_pipeline
from sigmarec.training import TrainingConfig, train_sigma

torch.set_num_threads(1)

# 14 items over a 3 x 2 SID: several items share a full SID, so the dedup level is needed.
CODES = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [1, 0], [1, 1], [2, 1], [2, 1],
                  [2, 0], [0, 1], [1, 1], [2, 1], [0, 0]])


def make_model(items, seed: int = 0, delta: float = 0.0) -> GRModel:
    torch.manual_seed(seed)
    backbone, tok, _ = load_backbone(BackboneConfig(source="tiny"))
    model = GRModel(backbone, tok, items, ModelConfig())
    if delta:  # distinct new-token rows, so the items' scores differ (no ties)
        with torch.no_grad():
            model.token_delta.normal_(0, delta)
    return model.eval()


def prompt(model: GRModel, hist: list[int], words: str = "Next?") -> list[int]:
    text = ("<|im_start|>user\nRecently bought: " + " ".join(model.items.item_text(i)
            for i in hist) + f" {words}<|im_end|>\n<|im_start|>assistant\n")
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def sid_model() -> GRModel:
    return make_model(sid_tokens(CODES, [3, 2]), delta=1.0)


# ------------------------------------------------------------------------------- schemes


def test_config_is_strict_and_off_by_default() -> None:
    assert GRConfig().enabled == [] and GRConfig().num_beams == 20
    with pytest.raises(ValidationError):
        GRConfig(enabled=["gr_text"])
    with pytest.raises(ValidationError):
        GRConfig(beams=3)
    assert load_config("tiny", overrides=["gr.enabled=[gr_sid]"]).gr.enabled == ["gr_sid"]
    with pytest.raises(ConfigError, match="gr"):
        load_config("tiny", overrides=["gr.num_beams=0"])


def test_gr_dense_weight_is_its_own_unless_unset() -> None:
    # The default turns SIGMA's dense losses off but keeps GR's (they were ablated on SIGMA only).
    cfg = load_config("default")
    assert cfg.model.dense_weight == 0.0 and gr_model_config(cfg).dense_weight == 1.0
    assert gr_model_config(cfg).lora_r == cfg.model.lora_r  # everything else is SIGMA's
    unset = load_config("tiny", overrides=["model.dense_weight=0.5"])
    assert unset.gr.dense_weight is None and gr_model_config(unset).dense_weight == 0.5
    with pytest.raises(ConfigError, match="dense_weight"):
        load_config("tiny", overrides=["gr.dense_weight=-1"])


def test_dedup_level_makes_every_sequence_unique() -> None:
    plain = sid_tokens(CODES, [3, 2], dedup=False)
    assert not plain.unique() and plain.length == 2
    assert plain.item_text(3) == "<a_1><b_0>"
    items = sid_tokens(CODES, [3, 2])
    assert items.unique() and items.length == 3
    largest = int(np.unique(CODES, axis=0, return_counts=True)[1].max())
    assert items.stats()["largest_group"] == 1
    assert items.tokens[-largest:] == [f"<c_{j}>" for j in range(largest)]
    assert len(items.tokens) == 3 + 2 + largest
    # items 3, 4, 5 share <a_1><b_0> and are numbered in item order
    assert [items.item_text(i) for i in (3, 4, 5)] == [
        "<a_1><b_0><c_0>", "<a_1><b_0><c_1>", "<a_1><b_0><c_2>"]
    ids = id_tokens(5)
    assert ids.unique() and ids.item_text(4) == "<item_4>" and ids.length == 1


def test_trie_allows_exactly_the_valid_continuations() -> None:
    rng = np.random.default_rng(0)
    vocab = 30
    seqs = np.unique(rng.integers(0, 6, size=(40, 3)) + np.array([0, 10, 20]), axis=0)
    trie = ItemTrie(seqs, vocab).to("cpu")
    ref = prefix_allowed_tokens_fn(seqs, prompt_len=0)
    valid = {tuple(s) for s in seqs.tolist()}
    for step in range(4):
        # real prefixes, and random (mostly invalid) ones
        real = seqs[rng.integers(0, len(seqs), 20), :step]
        rand = rng.integers(0, vocab, size=(20, step))
        gen = torch.as_tensor(np.concatenate([real, rand]), dtype=torch.long)
        allowed = trie.allowed(gen, vocab + 5)
        for row, mask in zip(gen, allowed, strict=True):
            assert sorted(torch.nonzero(mask).ravel().tolist()) == ref(0, row)
    leaves = trie.nodes(torch.as_tensor(seqs))
    assert sorted(leaves.tolist()) == list(range(len(seqs)))
    for s, lf in zip(seqs, leaves.tolist(), strict=True):
        assert tuple(seqs[trie.items_of_leaf(lf)[0]]) == tuple(s) in valid
    bad = next(s for s in ([a, b, c] for a in range(6) for b in range(10, 16)
                           for c in range(20, 26)) if tuple(s) not in valid)
    assert trie.nodes(torch.tensor([bad])).item() == -1
    assert not trie.allowed(torch.tensor([bad]), vocab).any()  # nothing after a full item


def test_fill_popular_completes_lists_with_distinct_items() -> None:
    items = np.array([[3, -1, -1], [1, 2, 0]])
    scores = np.array([[-1.0, -np.inf, -np.inf], [-1.0, -2.0, -3.0]], dtype=np.float32)
    out, sc, rows, slots = fill_popular(items, scores, np.array([3, 4, 0, 1, 2]))
    assert out.tolist() == [[3, 4, 0], [1, 2, 0]] and (rows, slots) == (1, 2)
    assert np.isneginf(sc[0, 1:]).all()


# ------------------------------------------------------------------------------- decoding


def test_beam_search_is_exact_when_the_beam_holds_every_item(sid_model: GRModel) -> None:
    m = sid_model
    p1, p2 = prompt(m, [3, 5]), prompt(m, [1], "A much longer request so the row is padded.")
    batch = m.collator()([GRExample(p1, 0), GRExample(p2, 0)], with_labels=False)
    n = m.items.n_items
    items, scores = gr_recommend(m, batch, num_beams=n)
    for row, p in enumerate((p1, p2)):
        brute = score_all_items(m, p)
        order = np.argsort(-brute, kind="stable")
        assert sorted(items[row].tolist()) == list(range(n))  # every item, each once
        np.testing.assert_allclose(scores[row], brute[order], atol=1e-3)
        np.testing.assert_allclose(brute[items[row]], scores[row], atol=1e-3)
    # the plain prefix_allowed_tokens_fn constraint and the unshared-prompt path agree
    for kw in ({"constraint": "prefix_fn"}, {"share_prompt": False}):
        other, other_scores = gr_recommend(m, batch, num_beams=n, **kw)
        np.testing.assert_array_equal(other, items)
        np.testing.assert_allclose(other_scores, scores, atol=1e-4)
    # a narrow beam still returns only valid, distinct items
    top, _ = gr_recommend(m, batch, num_beams=4)
    assert ((top >= 0) & (top < n)).all() and all(len(set(r)) == 4 for r in top.tolist())


def test_gr_id_is_a_top_k_over_item_tokens() -> None:
    m = make_model(id_tokens(30), delta=1.0)
    p = prompt(m, [4, 7])
    batch = m.collator()([GRExample(p, 0)], with_labels=False)
    items, scores = gr_recommend(m, batch, num_beams=8)
    brute = score_all_items(m, p)
    np.testing.assert_array_equal(items[0], np.argsort(-brute, kind="stable")[:8])
    np.testing.assert_allclose(scores[0], np.sort(brute)[::-1][:8], atol=1e-4)


# ------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_weights_round_trip(tmp_path: Path) -> None:
    items = sid_tokens(CODES, [3, 2])
    m = make_model(items).train()
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(16):
        hist = [int(i) for i in rng.choice(items.n_items, size=3, replace=False)]
        examples.append(GRExample(prompt(m, hist), (hist[-1] + 1) % items.n_items))
    cfg = TrainingConfig(steps=12, per_device_batch_size=8, lr=5e-3, new_params_lr=2e-2,
                         warmup_ratio=0.0, eval_every=12, checkpoint_every=12)
    result = train_sigma(m, examples, cfg, valid_examples=examples[:8], progress=False,
                         output_dir=tmp_path / "w")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(m.trainable_names()) >= {"token_delta"}
    assert all("lora_" in k or k == "token_delta" for k in m.trainable_names())
    other = make_model(items, seed=1)
    other.load_trainable(tmp_path / "w")
    batch = m.collator()(examples[:4])
    with torch.no_grad():
        a, b = m.eval()(**batch)["loss"], other(**batch)["loss"]
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- stage


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gr_tiny")
    over = ["tasks.eval_instances_per_task=4", "training.steps=2", "gr.generate_batch_size=16"]
    cfg = load_config("tiny", overrides=over)
    run_pipeline(cfg, run_dir, until="tasks")
    return over, run_dir


def test_stage_disabled_is_instant_and_writes_no_rankings(tiny_tasks) -> None:
    over, run_dir = tiny_tasks
    t0 = time.perf_counter()
    m = execute(GRBaselinesStage(), load_config("tiny", overrides=over), run_dir)
    assert time.perf_counter() - t0 < 1.0
    assert m["summary"]["enabled"] == []
    assert not (run_dir / "gr_baselines" / "rankings").exists()
    with pytest.raises(ConfigError, match="gr.num_beams"):
        cfg = load_config("tiny", overrides=[*over, "gr.enabled=[gr_id]", "gr.num_beams=5"])
        execute(GRBaselinesStage(), cfg, run_dir)


def test_stage_ranks_every_task_instance(tiny_tasks) -> None:
    over, run_dir = tiny_tasks
    cfg = load_config("tiny", overrides=[*over, "gr.enabled=[gr_sid,gr_id]"])
    m = execute(GRBaselinesStage(), cfg, run_dir)
    out = run_dir / "gr_baselines"
    n_items = len(np.load(run_dir / "tokenization" / "item_prefix.npy"))
    for name in ("gr_sid", "gr_id"):
        s = m["summary"][name]
        assert s["steps"] == 2 and s["final_loss"] > 0
        assert (out / "models" / name / "gr_trainable.safetensors").is_file()
        for split in ("valid", "test"):
            tasks = pd.read_parquet(run_dir / "tasks" / f"{split}.parquet")
            ranks = pd.read_parquet(out / "rankings" / f"{name}_{split}.parquet")
            assert ranks["instance_id"].dtype == np.int64
            assert sorted(ranks["instance_id"]) == sorted(tasks["instance_id"])
            assert len(tasks["task"].unique()) > 1
            for its, sc in zip(ranks["items"], ranks["scores"], strict=True):
                its = np.asarray(its)
                assert len(its) == 20 and len(set(its.tolist())) == 20
                assert ((its >= 0) & (its < n_items)).all()
                assert len(sc) == 20 and np.all(np.diff(np.asarray(sc)) <= 1e-5)
            assert s["splits"][split]["instances"] == len(tasks)
            assert s["splits"][split]["filled_rows"] == 0
    assert m["summary"]["gr_sid"]["items"]["largest_group"] == 1
