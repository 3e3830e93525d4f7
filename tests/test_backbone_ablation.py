"""The backbone ablated (issue 27): ``no_llm`` (zero transformer layers) and ``frozen_llm`` (the
layers kept, no LoRA) train, decode like the reference, round-trip through a checkpoint and the
serving KV path, and validate as ``sigma experiment compare`` overlays."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_model import N_ITEMS, example, make_model

from sigmarec.backbone import BackboneConfig
from sigmarec.backbone.loading import find_decoder_layers
from sigmarec.config import load_config
from sigmarec.errors import ConfigError
from sigmarec.experiment import ABLATIONS, _overlay, plan
from sigmarec.generation.decode import SigmaDecoder
from sigmarec.generation.reference import reference_recommend
from sigmarec.model.config import ModelConfig
from sigmarec.model.sigma import load_sigma_model
from sigmarec.serving import kv_cache as kc
from sigmarec.training.config import TrainingConfig
from sigmarec.training.loop import train_sigma

torch.set_num_threads(1)

NO_LLM = ABLATIONS["no_llm"]["model"]
FROZEN = ABLATIONS["frozen_llm"]["model"]


def _layers(model) -> int:
    parent, attr = find_decoder_layers(model.backbone)
    return len(getattr(parent, attr))


def _model(overlay: dict, sizes: list[int] | None = None, **cfg):
    """A tiny SIGMA model with the copy prior, its new token rows and gates randomised (a fresh
    model ties everywhere, so the orderings compared would not be strict)."""
    prefix = np.random.default_rng(7).permutation(np.arange(N_ITEMS) % int(np.prod(sizes or [4])))
    model = make_model(sizes, prefix=prefix, repeat_aware=True, **overlay, **cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.token_delta.normal_(0, 0.5, generator=g)
        model.repeat.proj.weight.normal_(0, 0.05, generator=g)
    return model


def _examples(model):
    return [example(model, [1, 2, 3], 5), example(model, [7, 8], 9, "Find snacks"),
            example(model, [10, 11, 12, 13, 14], 1), example(model, [20, 6, 20], 5, "Again")]


# ------------------------------------------------------------------------------ config


def test_overlays_validate_and_are_planned() -> None:
    base = load_config(profile="tiny")
    for name in ("no_llm", "frozen_llm"):
        cfg = _overlay(base, ABLATIONS[name])
        assert cfg.model.finetune == "frozen"
        # The grounding stage (linked from the main run) must see the same backbone.
        assert cfg.backbone == base.backbone and cfg.grounding == base.grounding
    assert _overlay(base, ABLATIONS["no_llm"]).model.backbone_layers == 0
    assert _overlay(base, ABLATIONS["frozen_llm"]).model.backbone_layers is None
    runs = plan(base, Path("/tmp/x"), [0, 1], ["no_llm", "frozen_llm"], [], [0, 1])
    assert [r["variant"] for r in runs] == ["main", "no_llm", "frozen_llm"] * 2
    # Already frozen: the variant would repeat the main run, so it is refused.
    frozen = _overlay(base, ABLATIONS["frozen_llm"])
    with pytest.raises(ConfigError, match="finetune = 'frozen'"):
        plan(frozen, Path("/tmp/x"), [0], ["frozen_llm"], [], [0])


def test_zero_layers_with_lora_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="backbone_layers = 0 leaves LoRA"):
        ModelConfig(backbone_layers=0)
    with pytest.raises(ValidationError):
        ModelConfig(backbone_layers=-1, finetune="frozen")
    with pytest.raises(ConfigError, match="model.backbone_layers must be between 0 and 2"):
        make_model(backbone_layers=3)


# ------------------------------------------------------------------------------ no_llm


def _train(model, steps: int = 6) -> None:
    train = [example(model, [i % N_ITEMS, (i + 3) % N_ITEMS], (i + 5) % N_ITEMS)
             for i in range(16)]
    cfg = TrainingConfig(steps=steps, per_device_batch_size=4, lr=3e-3, new_params_lr=1e-2,
                         warmup_ratio=0.0, hard_negatives=0, eval_at_end=False,
                         mixed_precision="no", restore_best=False)
    train_sigma(model, train, cfg, seed=0, progress=False)


def test_zero_layer_model_trains_its_own_parts_only() -> None:
    model = make_model(repeat_aware=True, **NO_LLM)
    assert _layers(model) == 0
    names = model.trainable_names()
    assert names and not any(n.startswith("backbone.") for n in names)
    assert "token_delta" in names and any(n.startswith("repeat.") for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ("token_delta", "head.", "fuse.", "repeat."):
        assert any(n.startswith(part) for n in changed), (part, changed)
    assert not any(n.startswith("backbone.") for n in changed), changed


def test_zero_layer_hidden_state_is_the_normed_token_embedding() -> None:
    """No layer: each position's state is the final norm of its own input row, whatever the
    rest of the prompt says."""
    model = _model(NO_LLM)
    ex = _examples(model)[0]
    ids = torch.tensor([ex.input_ids])
    mask = torch.ones_like(ids)
    items = torch.tensor(ex.item_ids)
    h = model(ids, mask, items)["hidden"][0]
    emb = model.inputs_embeds(ids, mask, model.item_embeddings(items))[0]
    norm = model._decoder().norm
    torch.testing.assert_close(h, norm(emb), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlay", [NO_LLM, FROZEN], ids=["no_llm", "frozen_llm"])
@pytest.mark.parametrize("sizes", [[4], [2, 2]])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "expanded"])
def test_decoder_equals_the_reference(overlay, sizes, shared) -> None:
    model = _model(overlay, sizes, shared_prefix_decode=shared)
    exs = _examples(model)
    k, m, n = 2, 3, 5
    dec = SigmaDecoder(model, k, m)
    for fusion in ("adaptive", "joint"):
        items, scores = dec.recommend(exs, n, fusion=fusion, tau=0.05)
        for b, ex in enumerate(exs):
            ref_items, ref_scores = reference_recommend(model, ex, k, m, n, fusion, 0.05)
            assert items[b].tolist() == ref_items
            assert np.allclose(scores[b], ref_scores, atol=1e-4)


def test_zero_layer_checkpoint_round_trips(tmp_path: Path) -> None:
    model = _model(NO_LLM, [2, 2])
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    model.save_trainable(tmp_path)
    again = load_sigma_model(tmp_path, BackboneConfig(source="tiny"),
                             {s: getattr(model, f"feat_{s}").numpy() for s in model.sources},
                             model.item_prefix.numpy())
    assert _layers(again) == 0 and again.cfg.finetune == "frozen"
    exs = _examples(model)
    dec_a, dec_b = SigmaDecoder(model, 2, 3), SigmaDecoder(again, 2, 3)
    a, sa = dec_a.recommend(exs, 5, fusion="joint", tau=0.05)
    b, sb = dec_b.recommend(exs, 5, fusion="joint", tau=0.05)
    assert np.array_equal(a, b) and np.allclose(sa, sb, atol=1e-6)


def test_zero_layer_serving_kv_path_falls_back_to_a_full_forward() -> None:
    """A cache with no layers holds nothing to reuse: the nearline KV path stores no rows and
    gives what a from-scratch forward gives."""
    model = _model(NO_LLM)
    exs = _examples(model)
    batch = SigmaDecoder(model, 2, 3).batch(exs)
    ref_logp, ref = model.prefix_logprobs(batch)
    got, rows, stats = kc.prompt_forward(model, batch, exs, None)
    assert rows is None and stats.reused == 0 and not kc.reusable(got.past_key_values)
    torch.testing.assert_close(got.logprobs, ref_logp)


# ------------------------------------------------------------------------------ frozen_llm


def test_frozen_backbone_has_no_lora_and_keeps_every_layer_weight() -> None:
    model = make_model(repeat_aware=True, **FROZEN)
    assert _layers(model) == 2
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora" in n for n in names)
    assert not any(n.startswith("backbone.") for n in model.trainable_names())
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model)
    for n, p in model.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p, trained[n])]
    assert "token_delta" in moved and any(n.startswith("repeat.") for n in moved), moved
