"""The repeat-aware copy prior: its terms against written-out references, the decoder against
the slow reference, and that it learns to copy where the plain objective cannot in the budget."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import N_ITEMS
from test_objective import _batch, _example, make_model
from torch.nn import functional as F

from sigmarec.generation.decode import SigmaDecoder
from sigmarec.generation.reference import reference_recommend
from sigmarec.model import load_sigma_model
from sigmarec.model.repeat import PromptSlots
from sigmarec.tasks.channels import CHANNELS
from sigmarec.training.config import TrainingConfig
from sigmarec.training.loop import train_sigma

torch.set_num_threads(1)


def _randomised(**cfg):
    # Gates away from their shared start and distinct new-token rows: strict orderings.
    model = make_model(**{"repeat_aware": True, **cfg}).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.token_delta.normal_(0, 0.5, generator=g)
        model.repeat.proj.weight.normal_(0, 0.05, generator=g)
    return model


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).mean().detach())


def _hidden(model, b):
    return model(**{k: b[k] for k in ("input_ids", "attention_mask", "item_ids")})["hidden"]


def test_prompt_slots_table_follows_prompt_order() -> None:
    model = make_model(repeat_aware=True)
    ex, b = _batch(model)
    slots = PromptSlots.from_batch(b["input_ids"], b["attention_mask"], b["item_ids"],
                                   b["sequence_mask"], model.item_token_id)
    for r, e in enumerate(ex):
        row = slots.items[r][slots.items[r] >= 0].tolist()
        assert row == list(e.item_ids)
        seq = slots.seq[r][: len(row)].tolist()
        assert seq == [False] * e.n_context + [True] * (len(row) - e.n_context)
    assert slots.ranks().tolist() == [j for e in ex for j in range(len(e.item_ids))]


def test_label_ntp_adds_the_gated_log_counts_of_the_prompts_prefixes() -> None:
    model = _randomised()
    ex, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
        h = _hidden(model, b)
    t = b["input_ids"].shape[1]
    nll = []
    for r, e in enumerate(ex):
        state = h[r, t - 3]
        gates = F.softplus(model.repeat.proj(state.float()))
        logits = model.level_logits(state[None], 0)[0]
        for code in range(4):
            n_seq = sum(int(model.item_prefix[i]) == code for i in e.item_ids[e.n_context:])
            n_ctx = sum(int(model.item_prefix[i]) == code for i in e.item_ids[: e.n_context])
            logits[code] += gates[0] * math.log1p(n_seq) + gates[1] * math.log1p(n_ctx)
        nll.append(-logits.log_softmax(-1)[e.target_prefix])
    assert out["l_ntp"].item() == pytest.approx(_mean(nll), rel=1e-5)


def test_infonce_contrasts_the_target_with_the_prompts_other_items() -> None:
    model = _randomised()
    ex, b = _batch(model)
    b = {**b, "hard_negatives": torch.full_like(b["hard_negatives"], -1)}
    with torch.no_grad():
        out = model(**b)
        h = _hidden(model, b)
    t = b["input_ids"].shape[1]
    temp = model.cfg.temperature
    targets = [e.target_item for e in ex]
    nll = []
    for r, e in enumerate(ex):
        q = model.query_from_hidden(h[r, t - 1][None])[0]
        gates = F.softplus(model.repeat.proj(h[r, t - 3].float()))

        def score(item: int, e=e, q=q, gates=gates) -> torch.Tensor:
            v = model.item_vectors(torch.tensor([item]))[0]
            n_seq = list(e.item_ids[e.n_context:]).count(item)
            n_ctx = list(e.item_ids[: e.n_context]).count(item)
            return (q @ v + temp * (gates[2] * math.log1p(n_seq) + gates[3] * math.log1p(n_ctx))
                    ) / temp

        positives = set(e.positives) | {e.target_item}
        # In-batch columns: every row's target that is not one of this row's positives (its
        # own target stays).
        cols = [score(x) for c, x in enumerate(targets) if c == r or x not in positives]
        # Prompt columns: its distinct items that are no positive and no column already.
        seen: set[int] = set()
        for item in e.item_ids:
            if item in seen or item in positives or item in targets:
                seen.add(item)
                continue
            seen.add(item)
            cols.append(score(item))
        logits = torch.stack(cols)
        own = [c for c, x in enumerate(targets) if c == r or x not in positives].index(r)
        nll.append(-logits.log_softmax(-1)[own])
    assert out["l_infonce"].item() == pytest.approx(_mean(nll), rel=1e-4)


def test_dense_copy_term_counts_only_the_sequence_items_before_the_position() -> None:
    model = _randomised(dense_weight=1.0)
    ex, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
        h = _hidden(model, b)
    rows = model.prefix_rows()
    feats = torch.unique(torch.cat([b["item_ids"], b["target_item"],
                                    b["hard_negatives"].clamp(min=0).view(-1),
                                    b["positives"].clamp(min=0).view(-1)]))
    v = model.item_vectors(feats)
    temp = model.cfg.temperature
    ntp, nce = [], []
    for r, e in enumerate(ex):
        cols = [c for c in range(h.shape[1]) if b["input_ids"][r, c] == model.item_token_id
                and b["attention_mask"][r, c]]
        for j, c in enumerate(cols):
            if j < e.n_context:
                continue
            item, before = e.item_ids[j], list(e.item_ids[e.n_context:j])
            gates = F.softplus(model.repeat.proj(h[r, c - 2].float()))
            logits = h[r, c - 2].float() @ rows.T
            for code in range(4):
                n = sum(int(model.item_prefix[i]) == code for i in before)
                logits[code] += gates[0] * math.log1p(n)
            ntp.append(-logits.log_softmax(-1)[int(model.item_prefix[item])])
            q = model.query_from_hidden(h[r, c - 1][None])[0]
            bias = torch.tensor([math.log1p(before.count(int(u))) for u in feats])
            sims = (q @ v.T + temp * gates[2] * bias) / temp
            nce.append(-sims.log_softmax(-1)[int((feats == item).nonzero())])
    assert out["l_ntp_dense"].item() == pytest.approx(_mean(ntp), rel=1e-4)
    assert out["l_infonce_dense"].item() == pytest.approx(_mean(nce),
                                                          rel=1e-4)


@pytest.mark.parametrize("fusion", ["adaptive", "off"])
@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_decoder_with_the_copy_prior_equals_the_reference(sizes, fusion) -> None:
    prefix = np.random.default_rng(7).permutation(np.arange(N_ITEMS) % int(np.prod(sizes)))
    from test_model import make_model as base

    model = base(sizes, prefix=prefix, repeat_aware=True).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.token_delta.normal_(0, 0.5, generator=g)
        model.repeat.proj.weight.normal_(0, 0.05, generator=g)
    exs = [_example(model, [3, 4], [1, 2, 3], 5), _example(model, [], [7, 8, 7], 9),
           _example(model, [12], [10, 11, 12, 13], 1), _example(model, [6, 20, 21], [20, 6], 5)]
    k, m, n = 2, 2, 4  # M small: the copy term must pull prompt items past the cosine top-M
    dec = SigmaDecoder(model, k, m)
    for allow in (None, np.arange(N_ITEMS) % 3 != 0):
        items, scores = dec.recommend(exs, n, fusion=fusion, tau=0.05, allow_mask=allow)
        for r, ex in enumerate(exs):
            ref_items, ref_scores = reference_recommend(model, ex, k, m, n, fusion, 0.05, allow)
            assert items[r].tolist() == ref_items
            assert np.allclose(scores[r], ref_scores, atol=1e-4)


def test_gates_survive_save_and_load(tmp_path: Path) -> None:
    model = _randomised()
    model.save_trainable(tmp_path)
    again = load_sigma_model(tmp_path, __import__("sigmarec.backbone", fromlist=["x"])
                             .BackboneConfig(source="tiny"),
                             {s: getattr(model, f"feat_{s}").numpy() for s in model.sources},
                             model.item_prefix.numpy())
    assert torch.equal(again.repeat.proj.weight, model.repeat.proj.weight)
    assert again.cfg.repeat_aware


def _top1_after_training(model_cfg, samples, hit, prepare=None, **overrides) -> float:
    """Share of 40 held-out samples whose top-1 item is a ``hit``, after 40 steps on 32
    (``prepare(model)`` runs on the fresh model first; ``overrides`` go to TrainingConfig)."""
    torch.manual_seed(0)
    model = make_model(**model_cfg, fuse_dropout=0.0, lora_dropout=0.0)
    if prepare is not None:
        prepare(model)
    train = samples(model, 32)
    cfg = TrainingConfig(steps=40, per_device_batch_size=8, lr=3e-3, new_params_lr=1e-2,
                         warmup_ratio=0.0, hard_negatives=0, eval_at_end=False,
                         mixed_precision="no", restore_best=False)
    cfg = cfg.model_copy(update=overrides)
    train_sigma(model, train, cfg, seed=0, progress=False)
    model.eval()
    test = samples(model, 40)
    items, _ = SigmaDecoder(model, 4, N_ITEMS).recommend(test, 1, fusion="fixed", tau=0.05)
    return float(np.mean([hit(items[r, 0], e) for r, e in enumerate(test)]))


def test_the_copy_prior_learns_to_copy_on_unseen_prompts() -> None:
    """Targets are always an item of the prompt (a repurchase): after the same short training
    the repeat-aware model ranks held-out prompts' targets far better than the plain one."""
    rng = np.random.default_rng(5)

    def samples(model, count: int):
        out = []
        for _ in range(count):
            hist = rng.choice(N_ITEMS, size=4, replace=False).tolist()
            out.append(_example(model, [], hist, int(rng.choice(hist))))
        return out

    acc = {repeat: _top1_after_training({"repeat_aware": repeat}, samples,
                                        lambda item, e: item in e.item_ids)
           for repeat in (False, True)}
    assert acc[True] >= 0.9, acc
    assert acc[True] > acc[False] + 0.3, acc


def test_gate_biases_get_their_own_learning_rate() -> None:
    from sigmarec.training.loop import param_groups

    model = make_model(repeat_aware=True)
    groups = param_groups(model, TrainingConfig(gate_lr=0.07))
    gate = [g for g in groups if g["name"].startswith("gate")]
    assert len(gate) == 1 and gate[0]["lr"] == 0.07
    assert [p.data_ptr() for p in gate[0]["params"]] == [model.repeat.proj.bias.data_ptr()]
    # The gate weights train with the other new modules.
    new = [p.data_ptr() for g in groups if g["name"].startswith("new") for p in g["params"]]
    assert model.repeat.proj.weight.data_ptr() in new


@pytest.mark.parametrize("repeat", [False, True])
def test_catalogue_infonce_is_a_full_softmax_over_every_item(repeat: bool) -> None:
    model = _randomised(infonce_negatives="catalogue", dense_weight=1.0) if repeat else \
        make_model(infonce_negatives="catalogue", dense_weight=1.0).eval()
    ex, b = _batch(model)
    with torch.no_grad():
        out = model(**b)
        h = _hidden(model, b)
        v = model.item_vectors()  # every item: the columns
    t = b["input_ids"].shape[1]
    temp = model.cfg.temperature

    def copy(state: torch.Tensor, seq: list[int], ctx: list[int]) -> torch.Tensor:
        if not repeat:
            return torch.zeros(N_ITEMS)
        g = F.softplus(model.repeat.proj(state.float()))
        return torch.tensor([temp * (g[2] * math.log1p(seq.count(i)) +
                                     g[3] * math.log1p(ctx.count(i))) for i in range(N_ITEMS)])

    nll, dense = [], []
    with torch.no_grad():
        for r, e in enumerate(ex):
            q = model.query_from_hidden(h[r, t - 1][None])[0]
            logits = (q @ v.T + copy(h[r, t - 3], list(e.item_ids[e.n_context:]),
                                     list(e.item_ids[: e.n_context]))) / temp
            others = [p for p in e.positives if p != e.target_item]
            logits[others] = -torch.inf
            nll.append(-logits.log_softmax(-1)[e.target_item])
            cols = [c for c in range(t) if b["input_ids"][r, c] == model.item_token_id
                    and b["attention_mask"][r, c]]
            for j, c in enumerate(cols):
                if j < e.n_context:
                    continue
                qd = model.query_from_hidden(h[r, c - 1][None])[0]
                # The dense copy term never counts the context section.
                bias = copy(h[r, c - 2], list(e.item_ids[e.n_context:j]), [])
                sims = (qd @ v.T + bias) / temp
                dense.append(-sims.log_softmax(-1)[e.item_ids[j]])
    assert out["l_infonce"].item() == pytest.approx(_mean(nll), rel=1e-4)
    assert out["l_infonce_dense"].item() == pytest.approx(_mean(dense),
                                                          rel=1e-4)


# ----------------------------------------------------------------- the purchase-count channel
COUNTS = [((5, 14, 3), (4, 2, 1)), ((), ()), ((15, 1), (6, 3)), ((20, 16, 17, 18), (2, 2, 1, 1))]


def _count_batch(model):
    ex, _ = _batch(model)
    ex = [e.with_lists(counts=(ci, cv)) for e, (ci, cv) in zip(ex, COUNTS, strict=True)]
    return ex, model.collator(hard_negatives=3)(ex, rng=np.random.default_rng(0))


def test_collator_pads_purchase_counts_and_checks_them() -> None:
    model = make_model(repeat_aware=True, repeat_counts=True)
    ex, b = _count_batch(model)
    assert b["count_items"].shape == (4, 4)
    assert b["count_items"][1].tolist() == [-1] * 4
    assert b["count_values"][2].tolist() == [6.0, 3.0, 0.0, 0.0]
    bad = ex[0].with_lists(counts=(ex[0].channel("counts")[0], (1, 2)))
    with pytest.raises(ValueError, match="3 count_items but 2 count_values"):
        model.collator()([bad])
    with pytest.raises(ValueError, match="count_items outside"):
        model.collator()([ex[0].with_lists(counts=((5, 14, N_ITEMS), (4, 2, 1)))])
    with pytest.raises(ValueError, match="repeat_counts"):
        make_model(repeat_counts=True)


def test_a_counts_model_refuses_prompts_without_counts() -> None:
    model = _randomised(repeat_counts=True)
    _, b = _batch(model)
    with pytest.raises(ValueError, match="count_items"):
        model(**{k: v for k, v in b.items() if not k.startswith("count_")})


def test_count_channel_in_the_label_ntp_and_the_catalogue_softmax() -> None:
    model = _randomised(repeat_counts=True, infonce_negatives="catalogue", dense_weight=1.0)
    with torch.no_grad():
        model.repeat.proj.bias[2].fill_(0.7)  # the count gates away from the others
        model.repeat.proj.bias[5].fill_(1.3)
    ex, b = _count_batch(model)
    assert_losses_match_reference(model, ex, b)


def assert_losses_match_reference(model, ex, b) -> None:
    """The label NTP, the catalogue InfoNCE and the dense InfoNCE of a copy-prior model with
    purchase counts (and, with ``model.cfg.text_match``, text matches; with
    ``model.cfg.repeat_rarity``, the counted items' rarities; with ``model.cfg.novelty``, the
    novelty lists) against a per-row
    written-out computation: gates (prefix channels, then item channels) read at the token
    before the label; each channel adds ``gate x log1p(count)`` per code on the prefix logits
    and ``tau x gate x log1p(count)`` per item; dense positions see only the sequence items
    before them, never the counts (which summarise the whole history up to the cut, this
    position's own item included) or the matches (the instruction comes after the history);
    with ``model.cfg.task_gates`` the label gates add the row's task offset, the dense ones
    none (a history position answers no instruction)."""
    scale = model.cfg.text_match_scale
    with torch.no_grad():
        out = model(**b)
        h = _hidden(model, b)
        v = model.item_vectors()
    t = b["input_ids"].shape[1]
    temp = model.cfg.temperature
    ntp, nce, dense = [], [], []
    with torch.no_grad():
        for r, e in enumerate(ex):
            state = h[r, t - 3]
            g = F.softplus(model.repeat.proj(state.float()) + (
                model.repeat.task_bias.weight[e.task_id] if model.cfg.task_gates
                and e.task_id >= 0 else 0.0))
            n_ch = (3 + int(model.cfg.text_match) + int(model.cfg.repeat_rarity)
                    + int(model.cfg.novelty))
            assert g.shape == (2 * n_ch,)
            seq, ctx = list(e.item_ids[e.n_context:]), list(e.item_ids[: e.n_context])
            weights = [{i: float(seq.count(i)) for i in seq}, {i: float(ctx.count(i)) for i in ctx},
                       dict(zip(*e.channel("counts"), strict=True))]
            if model.cfg.text_match:
                weights.append({i: scale * c for i, c in zip(*e.channel("text_match"),
                                                                strict=True)})
            if model.cfg.repeat_rarity:
                weights.append({i: model.cfg.rarity_scale * float(model.item_rarity[i])
                                for i in e.channel("counts")[0]})
            if model.cfg.novelty:
                weights.append({i: model.cfg.novelty_scale * v
                                for i, v in zip(*e.channel("novelty"), strict=True)})
            logits = model.level_logits(state[None], 0)[0]
            for code in range(4):
                for ch, w in enumerate(weights):
                    n = sum(c for i, c in w.items() if int(model.item_prefix[i]) == code)
                    logits[code] += g[ch] * math.log1p(n)
            ntp.append(-logits.log_softmax(-1)[e.target_prefix])
            q = model.query_from_hidden(h[r, t - 1][None])[0]
            copy = torch.tensor([temp * sum(g[n_ch + ch] * math.log1p(w.get(i, 0.0))
                                            for ch, w in enumerate(weights))
                                 for i in range(N_ITEMS)])
            sims = (q @ v.T + copy) / temp
            sims[[p for p in e.positives if p != e.target_item]] = -torch.inf
            nce.append(-sims.log_softmax(-1)[e.target_item])
            cols = [c for c in range(t) if b["input_ids"][r, c] == model.item_token_id
                    and b["attention_mask"][r, c]]
            for j, c in enumerate(cols[e.n_context:], start=e.n_context):
                gd = F.softplus(model.repeat.proj(h[r, c - 2].float()))
                before = list(e.item_ids[e.n_context:j])
                qd = model.query_from_hidden(h[r, c - 1][None])[0]
                bias = torch.tensor([temp * gd[n_ch] * math.log1p(before.count(i))
                                     for i in range(N_ITEMS)])
                dense.append(-((qd @ v.T + bias) / temp).log_softmax(-1)[e.item_ids[j]])
    assert out["l_ntp"].item() == pytest.approx(_mean(ntp), rel=1e-5)
    assert out["l_infonce"].item() == pytest.approx(_mean(nce), rel=1e-4)
    assert out["l_infonce_dense"].item() == pytest.approx(_mean(dense), rel=1e-4)


@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_decoder_with_purchase_counts_equals_the_reference(sizes) -> None:
    model, exs = decoder_model_and_examples(
        sizes, 5, lambda i: {"counts": COUNTS[i]},
        repeat_counts=True)
    items = assert_decoder_matches_reference(model, exs)
    counted = {i for ci, _ in COUNTS for i in ci} - {i for e in exs for i in e.item_ids}
    assert counted & set(items.ravel().tolist()), "no counted-only item was recommended"


def decoder_model_and_examples(sizes, gate: int, channels, prepare=None, **cfg):
    """A randomised copy-prior model over a shuffled ``sizes`` prefix space, the item gate
    ``gate`` at 4 (so the channel's items must reach the lists), and four examples with
    ``channels(i)`` (channel name -> (items, values) for example i, and other SFTExample
    fields by name) filled in."""
    prefix = np.random.default_rng(7).permutation(np.arange(N_ITEMS) % int(np.prod(sizes)))
    from test_model import make_model as base

    model = base(sizes, prefix=prefix, repeat_aware=True, **cfg).eval()
    if prepare is not None:
        prepare(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.token_delta.normal_(0, 0.5, generator=g)
        model.repeat.proj.weight.normal_(0, 0.05, generator=g)
        model.repeat.proj.bias[gate].fill_(4.0)
    exs = [_example(model, [3, 4], [1, 2, 3], 5), _example(model, [], [7, 8, 7], 9),
           _example(model, [12], [10, 11, 12, 13], 1), _example(model, [6, 20, 21], [20, 6], 5)]
    out = []
    for i, e in enumerate(exs):
        fields = channels(i)
        lists = {k: v for k, v in fields.items() if k in CHANNELS}
        rest = {k: v for k, v in fields.items() if k not in CHANNELS}
        out.append(dataclasses.replace(e, **rest).with_lists(**lists))
    return model, out


def assert_decoder_matches_reference(model, exs, k: int = 2, m: int = 2, n: int = 4):
    """The batched decoder's lists and scores equal the exhaustive reference, unfiltered and
    under a filter; returns the last (filtered) lists. M small: only the copy term brings
    the channel's items past the cosine top-M."""
    dec = SigmaDecoder(model, k, m)
    for allow in (None, np.arange(N_ITEMS) % 3 != 0):
        items, scores = dec.recommend(exs, n, fusion="adaptive", tau=0.05, allow_mask=allow)
        for r, ex in enumerate(exs):
            ref_items, ref_scores = reference_recommend(model, ex, k, m, n, "adaptive", 0.05,
                                                        allow)
            assert items[r].tolist() == ref_items
            assert np.allclose(scores[r], ref_scores, atol=1e-4)
    return items


def test_the_count_channel_learns_repeats_the_prompt_does_not_show() -> None:
    """Targets are always the household's most bought item, which the prompt never shows: only
    a model with the count channel can find it on held-out prompts."""
    rng = np.random.default_rng(5)

    def samples(model, count: int):
        out = []
        for _ in range(count):
            items = rng.choice(N_ITEMS, size=7, replace=False).tolist()
            hist, counted = items[:3], items[3:]
            values = (int(rng.integers(5, 9)), 2, 1, 1)
            out.append(_example(model, [], hist, counted[0]).with_lists(
                counts=(tuple(counted), values)))
        return out

    acc = {counts: _top1_after_training({"repeat_aware": True, "repeat_counts": counts},
                                        samples, lambda item, e: item == e.target_item)
           for counts in (False, True)}
    assert acc[True] >= 0.9, acc
    assert acc[True] > acc[False] + 0.3, acc


def test_candidates_carry_the_copy_term_and_copy_scale_reweights_it() -> None:
    from sigmarec.generation.fusion import fuse

    model = _randomised(repeat_counts=True)
    with torch.no_grad():
        model.repeat.proj.bias[3:].fill_(2.0)
    ex, _ = _count_batch(model)
    dec = SigmaDecoder(model, 2, 3)
    cands = dec.candidates(dec.batch(ex), 4)
    assert cands.copy is not None and cands.copy.shape == cands.items.shape
    cache = model.prefix_logprobs(dec.batch(ex))[1]
    want = model.item_copy_scores(cache, torch.as_tensor(cands.items.clip(0))).numpy()
    ok = cands.items >= 0
    np.testing.assert_allclose(cands.copy[ok], want[ok], atol=1e-5)
    assert (cands.copy[ok] > 0).any() and (cands.copy[~ok] == 0).all()
    # Scale 1 is the decode as is; scale 0 ranks by cosine alone; others re-weight the term.
    base = fuse(cands, "adaptive", 0.05, 4)
    np.testing.assert_array_equal(fuse(cands, "adaptive", 0.05, 4, 1.0)[0], base[0])
    cos_only = cands.scores(0.0)
    np.testing.assert_allclose(cos_only[ok], (cands.cosine - cands.copy)[ok])
    np.testing.assert_allclose(cands.scores(3.0)[ok], (cands.cosine + 2 * cands.copy)[ok])
    with pytest.raises(ValueError, match="copy_scale"):
        cands.scores(-1.0)
