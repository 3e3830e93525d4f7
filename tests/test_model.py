"""The SIGMA model: soft tokens, the two losses, hard negatives, generation helpers, save/load."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: nothing here may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sigmarec.backbone import BackboneConfig, load_backbone
from sigmarec.model import (
    HardNegativeSampler,
    ModelConfig,
    PromptBatch,
    SFTExample,
    SigmaModel,
    load_sigma_model,
)
from sigmarec.tokenization.hybrid import HybridVocab, flat_to_codes

torch.set_num_threads(1)

N_ITEMS = 40


def _features(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"id": rng.normal(size=(N_ITEMS, 8)).astype(np.float32),
            "text": rng.normal(size=(N_ITEMS, 16)).astype(np.float32)}


def make_model(codebook_sizes: list[int] | None = None, features: dict | None = None,
               prefix: np.ndarray | None = None, **cfg) -> SigmaModel:
    sizes = codebook_sizes or [4]
    torch.manual_seed(0)
    backbone, tok, _ = load_backbone(BackboneConfig(source="tiny"))
    n_prefixes = int(np.prod(sizes))
    prefix = np.arange(N_ITEMS) % n_prefixes if prefix is None else prefix
    return SigmaModel(backbone, tok, HybridVocab(sizes), features or _features(), prefix,
                      ModelConfig(**cfg))


def prompt(model: SigmaModel, hist: list[int], words: str = "Predict the next purchase"
           ) -> list[int]:
    tok = model.tokenizer
    ids = tok("<|im_start|>user\nRecently bought:")["input_ids"]
    codes = flat_to_codes(model.item_prefix[hist].numpy(), model.codebook_sizes)
    for row in codes:
        ids += [model.level_token_ids[lv][c] for lv, c in enumerate(row)] + [model.item_token_id]
    ids += tok(f" {words}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    return ids


def example(model: SigmaModel, hist: list[int], target: int, words: str = "Next?") -> SFTExample:
    return SFTExample(prompt(model, hist, words), list(hist), target,
                      int(model.item_prefix[target]))


@pytest.fixture(scope="module")
def model() -> SigmaModel:
    return make_model().eval()


@pytest.fixture(scope="module")
def examples(model: SigmaModel) -> list[SFTExample]:
    return [example(model, [1, 2, 3], 5), example(model, [7, 8], 9, "Find snacks"),
            example(model, [10, 11, 12, 13, 14], 1), example(model, [20, 6], 5)]


# ---------------------------------------------------------------------------------- basics


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        ModelConfig(finetun="lora")
    with pytest.raises(ValidationError):
        ModelConfig(temperature=0)


def test_tokens_added_and_only_new_modules_train(model: SigmaModel) -> None:
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids("<a_0>") == model.prefix_token_ids[0]
    assert tok.convert_tokens_to_ids("<q>") == model.query_token_id
    assert tok.convert_tokens_to_ids("<|item|>") == model.item_token_id
    # One token each, never split.
    assert tok("<a_3><q><|item|>", add_special_tokens=False)["input_ids"] == [
        model.prefix_token_ids[3], model.query_token_id, model.item_token_id]
    names = model.trainable_names()
    assert "token_delta" in names and any("lora_A" in n for n in names)
    assert any(n.startswith("fuse.") for n in names) and any(n.startswith("head.") for n in names)
    # The frozen backbone and the item features are not trained and not saved.
    assert not any(n.endswith("embed_tokens.weight") for n in names)
    assert not any(k.startswith("feat_") for k in model.state_dict())


def test_full_finetune_trains_the_backbone() -> None:
    m = make_model(finetune="full")
    names = m.trainable_names()
    assert any(n.endswith("embed_tokens.weight") for n in names)
    assert not any("lora" in n for n in names)


def test_bad_inputs_are_rejected(model: SigmaModel, examples: list[SFTExample]) -> None:
    col = model.collator()
    bad = SFTExample(examples[0].input_ids, [1, 2], 5, int(model.item_prefix[5]))
    with pytest.raises(ValueError, match="placeholder"):
        col([bad])
    wrong_prefix = SFTExample(examples[0].input_ids, [1, 2, 3], 5,
                              (int(model.item_prefix[5]) + 1) % 4)
    with pytest.raises(ValueError, match="target_prefix"):
        col([wrong_prefix])
    with pytest.raises(ValueError, match="n_items"):
        make_model(features={"id": np.zeros((N_ITEMS, 4), np.float32),
                             "text": np.zeros((N_ITEMS + 1, 4), np.float32)})


def test_collator_layout(model: SigmaModel, examples: list[SFTExample]) -> None:
    batch = model.collator(hard_negatives=3)(examples, rng=np.random.default_rng(0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Left padding: the label tokens <prefix><q> end every row in the same columns.
    assert bool(mask[:, -1].all())
    assert (ids[:, -1] == model.query_token_id).all()
    expected_prefix = [model.prefix_token_ids[int(model.item_prefix[e.target_item])]
                       for e in examples]
    assert ids[:, -2].tolist() == expected_prefix
    assert batch["item_ids"].tolist() == [i for e in examples for i in e.item_ids]
    # Dict rows work as well as dataclasses.
    as_dicts = [e.__dict__ for e in examples]
    again = model.collator(hard_negatives=3)(as_dicts, rng=np.random.default_rng(0))
    assert all(torch.equal(again[k], batch[k]) for k in batch)


# ---------------------------------------------------------------------------------- soft tokens


def test_soft_tokens_replace_the_placeholder_embeddings(examples: list[SFTExample]) -> None:
    m = make_model().eval()
    batch = m.collator(hard_negatives=2)(examples, rng=np.random.default_rng(0))
    with torch.no_grad():
        base = m(**batch)["loss"]
        h0 = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]

        # The placeholder's own vocabulary row does not matter: it is replaced.
        emb = m.backbone.get_input_embeddings().weight
        saved = emb[m.item_token_id].clone()
        emb[m.item_token_id] = torch.randn_like(saved) * 10
        h1 = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
        emb[m.item_token_id] = saved
        assert torch.equal(h0, h1)

        # Changing the features of an item in row 0's history changes row 0's output only
        # (row 3's history does not contain item 2; row 2's neither).
        m.feat_text[2] += 3.0
        h2 = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
        m.feat_text[2] -= 3.0
        assert not torch.allclose(h0[0], h2[0])
        assert torch.allclose(h0[1:], h2[1:], atol=1e-6)
        # And the placeholder position itself carries ṽ: its input equals the item vector.
        soft = m.item_embeddings(batch["item_ids"])
        inp = m.inputs_embeds(batch["input_ids"], batch["attention_mask"], soft)
        slots = batch["input_ids"] == m.item_token_id
        assert torch.allclose(inp[slots], soft)
        assert torch.isfinite(base)


def test_placeholder_row_gets_no_gradient(examples: list[SFTExample]) -> None:
    m = make_model(finetune="full").train()
    batch = m.collator(hard_negatives=2)(examples, rng=np.random.default_rng(0))
    m(**batch)["loss"].backward()
    grad = m.backbone.get_input_embeddings().weight.grad
    assert grad[m.item_token_id].abs().sum() == 0
    assert m.fuse.inputs["id"][1].weight.grad.abs().sum() > 0  # ṽ is trained through the LLM


# ---------------------------------------------------------------------------------- losses


def test_ntp_is_restricted_to_prefix_tokens(examples: list[SFTExample]) -> None:
    m = make_model().eval()
    batch = m.collator()(examples[:2])
    with torch.no_grad():
        out = m(**batch)
        h = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
        # Column -3 is the last prompt token; it predicts the prefix token at column -2.
        full = m.backbone.get_output_embeddings()(h[:, -3]).float()  # whole-vocabulary logits
        restricted = full[:, m.prefix_token_ids]
        expected = torch.nn.functional.cross_entropy(restricted, batch["target_prefix"])
        unrestricted = torch.nn.functional.cross_entropy(full, batch["input_ids"][:, -2])
    assert torch.allclose(out["l_ntp"], expected, atol=1e-5)
    assert not torch.allclose(out["l_ntp"], unrestricted, atol=1e-3)
    # Uniform over the 4 fresh prefix tokens at initialisation (all rows start equal).
    assert abs(float(out["l_ntp"]) - np.log(4)) < 1e-4


def test_two_level_prefix_loss_and_logprobs() -> None:
    m = make_model(codebook_sizes=[2, 3]).eval()
    exs = [example(m, [1, 2], 7), example(m, [4], 11)]
    batch = m.collator()(exs)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in exs) + 3
    with torch.no_grad():
        out = m(**batch)
    assert abs(float(out["l_ntp"]) - np.mean([np.log(2), np.log(3)])) < 1e-4
    pb = m.collator()(exs, with_labels=False)
    logp, cache = m.prefix_logprobs(PromptBatch.from_collated(pb))
    assert logp.shape == (2, 2)
    _, lp = m.query_vectors(cache, torch.tensor([[0, 5], [3, 1]]), return_prefix_logprobs=True)
    assert torch.allclose(lp, torch.full((2, 2), -float(np.log(6))), atol=1e-4)


def test_hard_negatives_share_the_target_prefix() -> None:
    rng = np.random.default_rng(0)
    prefix = np.append(rng.integers(0, 4, size=199), 4)  # prefix 4: item 199 alone
    sampler = HardNegativeSampler(prefix, k=6)
    targets = rng.integers(0, 199, size=300)
    neg = sampler.sample(targets, rng)
    assert neg.shape == (300, 6)
    for t, row in zip(targets, neg, strict=True):
        assert (row >= 0).all()
        assert (prefix[row] == prefix[t]).all()
        assert t not in row
        assert len(set(row.tolist())) == 6  # no duplicates
    alone = sampler.sample(np.array([199]), rng)
    assert (alone == -1).all()  # nothing shares its prefix: all padding
    small = HardNegativeSampler(np.array([0, 0, 0, 1]), k=5).sample(np.array([1, 3]), rng)
    assert sorted(small[0][small[0] >= 0].tolist()) == [0, 2] and (small[1] == -1).all()


def test_infonce_uses_hard_and_in_batch_negatives(examples: list[SFTExample]) -> None:
    m = make_model().eval()
    col = m.collator(hard_negatives=3)
    batch = col(examples, rng=np.random.default_rng(1))
    hn = batch["hard_negatives"]
    prefix = m.item_prefix
    assert (prefix[hn] == prefix[batch["target_item"]][:, None]).all()
    with torch.no_grad():
        out = m(**batch)
        h = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
        q = m.query_from_hidden(h[:, -1])
        v = m.item_vectors(torch.arange(N_ITEMS))
        tgt = batch["target_item"]
        logits = torch.cat([q @ v[tgt].T, torch.einsum("bh,bkh->bk", q, v[hn])], 1)
        # Rows 0 and 3 share target 5: neither is the other's negative.
        logits[0, 3] = logits[3, 0] = -torch.inf
        expected = torch.nn.functional.cross_entropy(logits / m.cfg.temperature,
                                                     torch.arange(len(tgt)))
    assert torch.allclose(out["l_infonce"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], out["l_ntp"] + m.cfg.infonce_weight * out["l_infonce"])


# ---------------------------------------------------------------------------------- generation


def test_query_vectors_over_a_shared_cache_match_separate_runs(
        model: SigmaModel, examples: list[SFTExample]) -> None:
    m = model
    pb = m.collator()(examples, with_labels=False)
    logp, cache = m.prefix_logprobs(PromptBatch.from_collated(pb))
    assert logp.shape == (len(examples), 4)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(examples)), atol=1e-5)
    prefixes = torch.tensor([[0, 2, 3], [1, 0, 2], [3, 3, 1], [2, 1, 0]])
    q = m.query_vectors(cache, prefixes)
    q_again = m.query_vectors(cache, prefixes)  # the cache was not consumed
    assert q.shape == (4, 3, m.hidden)
    assert torch.equal(q, q_again)
    with torch.no_grad():
        for b, ex in enumerate(examples):
            for k in range(prefixes.shape[1]):
                ids = ex.input_ids + [m.prefix_token_ids[int(prefixes[b, k])], m.query_token_id]
                ids_t = torch.tensor([ids])
                soft = m.item_embeddings(torch.tensor(ex.item_ids))
                emb = m.inputs_embeds(ids_t, torch.ones_like(ids_t), soft)
                h, _ = m.decode(emb, torch.ones_like(ids_t), torch.arange(len(ids))[None])
                ref = m.query_from_hidden(h[:, -1])[0]
                assert torch.allclose(q[b, k], ref, atol=1e-4)
            # Step 1 matches an unpadded single run too.
            ids_t = torch.tensor([ex.input_ids])
            lp1, _ = m.prefix_logprobs(PromptBatch(ids_t, torch.ones_like(ids_t),
                                                   torch.tensor(ex.item_ids)))
            assert torch.allclose(lp1[0], logp[b], atol=1e-4)


def test_prefix_logprobs_needs_left_padding(model: SigmaModel, examples: list[SFTExample]
                                            ) -> None:
    pb = model.collator()(examples, with_labels=False)
    right = pb["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        model.prefix_logprobs(PromptBatch(pb["input_ids"], right, pb["item_ids"]))


def test_item_vectors_are_normalised_and_deterministic(model: SigmaModel) -> None:
    v = model.item_vectors()
    assert v.shape == (N_ITEMS, model.hidden)
    assert torch.allclose(v.norm(dim=-1), torch.ones(N_ITEMS), atol=1e-5)
    assert torch.allclose(model.item_vectors(torch.tensor([3, 1])), v[[3, 1]], atol=1e-6)
    assert model.training is False


# ---------------------------------------------------------------------------------- save/load


def test_save_and_load_trainable_roundtrip(tmp_path: Path, examples: list[SFTExample]) -> None:
    m = make_model().train()
    batch = m.collator(hard_negatives=2)(examples, rng=np.random.default_rng(0))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(**batch)["loss"].backward()
        opt.step()
    m.eval()
    m.save_trainable(tmp_path / "w")
    files = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert files == ["sigma_model.json", "sigma_trainable.safetensors"]
    # Only trainable weights: far smaller than the backbone.
    assert (tmp_path / "w" / "sigma_trainable.safetensors").stat().st_size < 1_000_000
    loaded = load_sigma_model(tmp_path / "w", BackboneConfig(source="tiny"), _features(),
                              m.item_prefix.numpy())
    with torch.no_grad():
        a, b = m(**batch), loaded(**batch)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)
    assert torch.equal(m.item_vectors(), loaded.item_vectors())
    # A model for another catalogue refuses the weights.
    other = make_model(codebook_sizes=[5])
    with pytest.raises(ValueError, match="differs"):
        other.load_trainable(tmp_path / "w")


def test_gradient_checkpointing_gives_the_same_loss(examples: list[SFTExample]) -> None:
    plain = make_model(fuse_dropout=0.0, lora_dropout=0.0).train()
    ckpt = make_model(fuse_dropout=0.0, lora_dropout=0.0, gradient_checkpointing=True).train()
    ckpt.load_trainable_state(plain.trainable_state())
    batch = plain.collator(hard_negatives=2)(examples, rng=np.random.default_rng(0))
    a, b = plain(**batch)["loss"], ckpt(**batch)["loss"]
    a.backward()
    b.backward()
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(plain.token_delta.grad, ckpt.token_delta.grad, atol=1e-5)


def test_untied_output_embeddings_get_their_own_trainable_rows(
        examples: list[SFTExample]) -> None:
    torch.manual_seed(0)
    backbone, tok, _ = load_backbone(BackboneConfig(source="tiny"))
    # Untie: a separate LM head (as in larger Llama/Qwen models).
    backbone.lm_head.weight = torch.nn.Parameter(backbone.lm_head.weight.detach().clone() * 2)
    backbone.config.tie_word_embeddings = False
    m = SigmaModel(backbone, tok, HybridVocab([4]), _features(), np.arange(N_ITEMS) % 4)
    assert not m.tied and m.head_delta is not None and "head_delta" in m.trainable_names()
    exs = [example(m, e.item_ids, e.target_item) for e in examples]
    batch = m.collator(hard_negatives=2)(exs, rng=np.random.default_rng(0))
    out = m(**batch)
    out["loss"].backward()
    assert m.head_delta.grad.abs().sum() > 0
    with torch.no_grad():
        h = m(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
        logits = backbone.lm_head(h[:, -3])[:, m.prefix_token_ids]
    expected = torch.nn.functional.cross_entropy(logits, batch["target_prefix"])
    assert torch.allclose(out["l_ntp"].detach(), expected, atol=1e-5)


def test_shared_row_continuations_equal_the_expanded_cache_path(
        model: SigmaModel, examples: list[SFTExample]) -> None:
    # The fast path (K continuations side by side under a 4D mask, cache cropped afterwards)
    # and the plain path (cache copied K times) are the same computation.
    two = make_model([4, 3]).eval()
    for m in (model, two):
        exs = [example(m, [1, 2, 3], 5), example(m, [7, 8], 9, "Find snacks"),
               example(m, [10, 11, 12, 13, 14], 1)]
        pb = m.collator()(exs, with_labels=False)
        _, cache = m.prefix_logprobs(PromptBatch.from_collated(pb))
        length = cache.past_key_values.get_seq_length()
        prefixes = torch.tensor([[0, 2, 3], [1, 0, 2], [3, 3, 1]]) % m.n_prefixes
        q_fast, lp_fast = m.query_vectors(cache, prefixes, return_prefix_logprobs=True)
        assert cache.past_key_values.get_seq_length() == length  # appended tokens dropped
        m.cfg.shared_prefix_decode = False
        try:
            q_plain, lp_plain = m.query_vectors(cache, prefixes, return_prefix_logprobs=True)
        finally:
            m.cfg.shared_prefix_decode = True
        assert torch.allclose(q_fast, q_plain, atol=1e-5)
        assert torch.allclose(lp_fast, lp_plain, atol=1e-5)


def test_prefix_rows_start_from_their_items_text() -> None:
    m = make_model([4, 3])
    rng = np.random.default_rng(0)
    vecs = [rng.normal(size=(4, m.hidden)).astype(np.float32),
            rng.normal(size=(3, m.hidden)).astype(np.float32)]
    m.init_prefix_rows(vecs)
    emb = m.embed_tokens(torch.tensor(m.prefix_token_ids)).detach()
    # Rows now differ, and each lies along its centred direction from the shared mean row.
    assert torch.cdist(emb, emb).triu(1)[torch.triu(torch.ones(7, 7), 1).bool()].min() > 0
    centred = torch.from_numpy(vecs[0] - vecs[0].mean(0))
    step = emb[:4] - emb[:4].mean(0)
    cos = torch.nn.functional.cosine_similarity(step, centred, dim=-1)
    assert (cos > 0.99).all()
    assert torch.allclose(emb.norm(dim=-1).median(), torch.tensor(m.token_norm), rtol=0.5)
    with pytest.raises(ValueError, match="level 1"):
        m.init_prefix_rows([vecs[0], vecs[0]])


def test_prefix_rows_start_from_their_items_soft_tokens() -> None:
    m = make_model([4])
    cents = m.item_code_centroids()
    assert len(cents) == 1 and cents[0].shape == (4, m.hidden)
    with torch.no_grad():
        v = m.eval().item_embeddings(torch.arange(N_ITEMS))
    # Items 0, 4, 8, ... carry code 0 (make_model's prefix = item % 4).
    assert np.allclose(cents[0][0], v[0::4].mean(0).numpy(), atol=1e-5)
    m.init_prefix_rows_from("item_embedding")
    emb = m.embed_tokens(torch.tensor(m.prefix_token_ids)).detach()
    step = emb - emb.mean(0)
    centred = torch.from_numpy(cents[0] - cents[0].mean(0))
    assert (torch.nn.functional.cosine_similarity(step, centred, dim=-1) > 0.99).all()
    r = make_model([4])
    r.init_prefix_rows_from("random", seed=1)
    e = r.embed_tokens(torch.tensor(r.prefix_token_ids)).detach()
    assert torch.cdist(e, e).triu(1)[torch.triu(torch.ones(4, 4), 1).bool()].min() > 0
    with pytest.raises(ValueError, match="outside inputs"):
        r.init_prefix_rows_from("item_text")
