"""The sample-efficient SFT objective: dense next-item losses, multi-positive labels, the
frequent-items context section, and the overfit proof that the optimisation path learns."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import math

import numpy as np
import pytest
import torch
from test_model import N_ITEMS
from test_model import make_model as _make_model
from torch.nn import functional as F

from sigmarec.model import SFTExample, SigmaModel
from sigmarec.tokenization.hybrid import flat_to_codes
from sigmarec.training.config import TrainingConfig
from sigmarec.training.loop import train_sigma

torch.set_num_threads(1)

# Prefixes that are NOT a function of the item id's residue, so a loss that confuses item ids
# with prefix ids is caught.
PREFIX = np.random.default_rng(7).permutation(np.arange(N_ITEMS) % 4)


def make_model(**cfg) -> SigmaModel:
    return _make_model(prefix=PREFIX, **cfg)


def _prompt(model: SigmaModel, frequent: list[int], hist: list[int]) -> list[int]:
    tok = model.tokenizer

    def items(seq: list[int]) -> list[int]:
        out: list[int] = []
        codes = flat_to_codes(model.item_prefix[seq].numpy(), model.codebook_sizes)
        for row in codes:
            out += [model.level_token_ids[lv][c] for lv, c in enumerate(row)]
            out += [model.item_token_id]
        return out

    ids = tok("<|im_start|>user\nOften:")["input_ids"] + items(frequent)
    ids += tok(" Recently:")["input_ids"] + items(hist)
    ids += tok(" Next?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    return ids


def _example(model: SigmaModel, frequent: list[int], hist: list[int], target: int,
             positives: tuple[int, ...] = ()) -> SFTExample:
    return SFTExample(_prompt(model, frequent, hist), [*frequent, *hist], target,
                      int(model.item_prefix[target]), n_context=len(frequent),
                      positives=positives or (target,))


def _batch(model: SigmaModel) -> tuple[list[SFTExample], dict[str, torch.Tensor]]:
    ex = [_example(model, [3, 4], [1, 2, 3], 5, (5, 9, 6)),
          _example(model, [], [7, 8], 9),
          _example(model, [12], [10, 11, 12, 13], 1, (1, 2)),
          _example(model, [6, 20, 21], [20, 6], 5)]
    return ex, model.collator(hard_negatives=3)(ex, rng=np.random.default_rng(0))


def test_collator_marks_sequence_items_and_positives() -> None:
    model = make_model()
    ex, b = _batch(model)
    assert b["sequence_mask"].tolist() == ([False] * 2 + [True] * 3 + [True] * 2
                                           + [False] + [True] * 4 + [False] * 3 + [True] * 2)
    assert b["positives"][0].tolist() == [5, 9, 6]
    assert b["positives"][1].tolist() == [9, -1, -1]
    hard = b["hard_negatives"]
    for r in range(len(ex)):
        pos = set(b["positives"][r].tolist()) - {-1}
        assert not pos & set(hard[r].tolist())


def test_bad_context_count_is_rejected() -> None:
    model = make_model()
    bad = SFTExample(_prompt(model, [], [1, 2]), [1, 2], 5, int(model.item_prefix[5]),
                     n_context=3)
    with pytest.raises(ValueError, match="n_context 3"):
        model.collator()([bad])


def _reference_dense(model: SigmaModel, b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Dense losses written out position by position (no vectorisation)."""
    out = model(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask",
                                                       "item_ids")})
    h = out["hidden"]
    feats_items = torch.unique(torch.cat([b["item_ids"], b["target_item"],
                                          b["hard_negatives"].clamp(min=0).view(-1),
                                          b["positives"].clamp(min=0).view(-1)]))
    v = F.normalize(model.item_embeddings(feats_items).float(), dim=-1)
    rows = model.prefix_rows()
    ntp, nce = [], []
    slot = 0
    for r in range(h.shape[0]):
        for c in range(h.shape[1]):
            if b["input_ids"][r, c] != model.item_token_id or not b["attention_mask"][r, c]:
                continue
            item = int(b["item_ids"][slot])
            is_seq = bool(b["sequence_mask"][slot])
            slot += 1
            if not is_seq:
                continue
            code = int(model.item_prefix[item])
            logits = h[r, c - 2].float() @ rows.T
            ntp.append(-torch.log_softmax(logits, -1)[code])
            q = F.normalize(model.head(h[r, c - 1].float()), dim=-1)
            sims = q @ v.T / model.cfg.temperature
            nce.append(-torch.log_softmax(sims, -1)[int((feats_items == item).nonzero())])
    return float(torch.stack(ntp).mean()), float(torch.stack(nce).mean())


def test_dense_losses_match_a_per_position_reference() -> None:
    model = make_model(dense_weight=1.0).eval()
    _, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
        ref_ntp, ref_nce = _reference_dense(model, b)
    assert out["l_ntp_dense"].item() == pytest.approx(ref_ntp, rel=1e-4)
    assert out["l_infonce_dense"].item() == pytest.approx(ref_nce, rel=1e-4)
    total = out["l_ntp"] + out["l_infonce"] + out["l_ntp_dense"] + out["l_infonce_dense"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_dense_weight_zero_is_the_paper_objective() -> None:
    model = make_model().eval()
    _, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
    assert out["l_ntp_dense"].item() == 0.0
    assert out["loss"].item() == pytest.approx((out["l_ntp"] + out["l_infonce"]).item())


def test_multi_positive_ntp_is_the_cross_entropy_to_the_positives_prefix_mix() -> None:
    model = make_model(multi_positive=True).eval()
    _, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
        h = model(**{k: b[k] for k in ("input_ids", "attention_mask", "item_ids")})["hidden"]
        logits = model.level_logits(h[:, b["input_ids"].shape[1] - 3], 0).log_softmax(-1)
    ref = []
    for r in range(len(b["target_item"])):
        pos = [p for p in b["positives"][r].tolist() if p >= 0]
        codes = model.item_prefix[pos]
        mix = torch.bincount(codes, minlength=logits.shape[1]).float() / len(pos)
        ref.append(-(mix * logits[r]).sum())
    assert out["l_ntp"].item() == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)


def test_other_positives_are_never_infonce_negatives() -> None:
    model = make_model().eval()
    # Row 0's positives include row 1's target (9): its in-batch column must be masked. If it
    # were a negative, making its embedding the query's would raise row 0's loss.
    ex = [_example(model, [], [1, 2], 5, (5, 9)), _example(model, [], [3], 9)]
    b = model.collator(hard_negatives=0)(ex, rng=np.random.default_rng(0))
    with torch.no_grad():
        with_pos = model(**b)["l_infonce"].item()
        b2 = dict(b)
        b2["positives"] = b["positives"][:, :1]
        without = model(**b2)["l_infonce"].item()
    assert with_pos < without


@pytest.mark.parametrize("part", ["dense", "multi_positive"])
def test_each_new_loss_decreases_on_a_fixed_batch(part: str) -> None:
    kw = {"dense_weight": 1.0} if part == "dense" else {"multi_positive": True}
    model = make_model(**kw)
    _, b = _batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    key = "l_infonce_dense" if part == "dense" else "l_ntp"
    first = None
    model.train()
    for _ in range(30):
        out = model(**b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out[key].item()
    assert out[key].item() < 0.7 * first


def test_overfit_a_few_dozen_samples() -> None:
    """The cheapest proof that the optimisation path can learn at all: the tiny model on 32
    samples must drive both losses far below chance within a fixed budget of steps."""
    torch.manual_seed(0)
    model = make_model(dense_weight=1.0, fuse_dropout=0.0, lora_dropout=0.0)
    rng = np.random.default_rng(1)
    ex = []
    for _ in range(32):
        hist = rng.choice(N_ITEMS, size=4, replace=False).tolist()
        # A learnable rule: the next item follows the last one.
        target = (hist[-1] + 1) % N_ITEMS
        ex.append(_example(model, [], hist, target))
    cfg = TrainingConfig(steps=150, per_device_batch_size=8, lr=3e-3, new_params_lr=1e-2,
                         warmup_ratio=0.0, hard_negatives=4, eval_at_end=False,
                         mixed_precision="no", restore_best=False)
    result = train_sigma(model, ex, cfg, seed=0, progress=False)
    tail = result.history[-10:]
    ntp = float(np.mean([r["l_ntp"] for r in tail]))
    nce = float(np.mean([r["l_infonce"] for r in tail]))
    # Chance: ln(4 prefixes) = 1.39 for NTP; InfoNCE over 8 in-batch + 4 hard candidates ~ 2.5.
    assert ntp < 0.3 * math.log(4), ntp
    assert nce < 0.3 * math.log(12), nce
