"""The SFT loop: learning, exact resume, checkpoints, validation and best-weight selection."""

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
from sigmarec.model import ModelConfig, SFTExample, SigmaModel
from sigmarec.tokenization.hybrid import HybridVocab
from sigmarec.training import ExampleStream, TrainingConfig, make_accelerator, train_sigma
from sigmarec.training.distributed import accelerate_config
from sigmarec.training.loop import lr_lambda

torch.set_num_threads(1)

N_ITEMS = 40


def build(n_examples: int = 24, seed: int = 0, **model_cfg) -> tuple[SigmaModel, list]:
    """A tiny model and examples with a learnable rule: the target follows the last item."""
    torch.manual_seed(seed)
    backbone, tok, _ = load_backbone(BackboneConfig(source="tiny"))
    rng = np.random.default_rng(seed)
    feats = {"id": rng.normal(size=(N_ITEMS, 8)).astype(np.float32),
             "text": rng.normal(size=(N_ITEMS, 16)).astype(np.float32)}
    prefix = np.arange(N_ITEMS) % 4
    model = SigmaModel(backbone, tok, HybridVocab([4]), feats, prefix, ModelConfig(**model_cfg))
    head = tok("<|im_start|>user\nRecently bought:")["input_ids"]
    tail = tok(" Predict the next purchase<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    examples = []
    for _ in range(n_examples):
        hist = [int(i) for i in rng.choice(N_ITEMS, size=rng.integers(2, 6), replace=False)]
        target = (hist[-1] + 1) % N_ITEMS
        ids = list(head)
        for it in hist:
            ids += [model.prefix_token_ids[prefix[it]], model.item_token_id]
        examples.append(SFTExample(ids + tail, hist, target, int(prefix[target])))
    return model, examples


def cfg(**kw) -> TrainingConfig:
    base = {"steps": 6, "per_device_batch_size": 4, "hard_negatives": 3, "warmup_ratio": 0.2,
            "checkpoint_every": 3, "eval_every": 3, "mixed_precision": "no"}
    return TrainingConfig(**{**base, **kw})


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


# ---------------------------------------------------------------------------------- pieces


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        TrainingConfig(stepz=3)
    with pytest.raises(ValidationError, match="select_mode"):
        TrainingConfig(select_metric="valid_loss", select_mode="max")
    TrainingConfig(select_metric="hr@10", select_mode="max")


def test_example_stream_is_deterministic_epoch_permutations() -> None:
    s = ExampleStream(10, seed=3)
    first = s.take(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert sorted(s.take(10, 10).tolist()) == list(range(10))
    assert not np.array_equal(first, s.take(10, 10))
    assert np.array_equal(s.take(7, 6), np.concatenate([first[7:], s.take(10, 3)]))
    assert np.array_equal(ExampleStream(10, seed=3).take(25, 4), s.take(25, 4))


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    f = lr_lambda(steps=10, warmup=2)
    values = [f(i) for i in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))
    assert f(10) == 0.0
    assert lr_lambda(steps=5, warmup=0)(0) == 1.0


def test_shipped_accelerate_configs_exist() -> None:
    import yaml

    for name in ("cpu_single", "ddp", "fsdp", "deepspeed_zero2"):
        data = yaml.safe_load(accelerate_config(name).read_text())
        assert "distributed_type" in data


# ---------------------------------------------------------------------------------- learning


def test_loss_decreases_on_a_fixed_batch() -> None:
    model, examples = build(n_examples=4)
    result = train_sigma(model, examples, cfg(steps=20, warmup_ratio=0.0, hard_negatives=2,
                                              new_params_lr=5e-3, lr=5e-3),
                         seed=0, progress=False)
    ls = losses(result)
    assert len(ls) == 20 and all(np.isfinite(ls))
    assert np.mean(ls[-3:]) < 0.6 * np.mean(ls[:3]), ls
    assert result.history[-1]["l_ntp"] < result.history[0]["l_ntp"]
    assert model.training is False


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    c = cfg(steps=6, grad_accum_steps=2, checkpoint_every=2, eval_every=3)
    acc = make_accelerator(c)  # one accelerator serves the three trainings in turn
    model, examples = build()
    full = train_sigma(model, examples, c, seed=1, valid_examples=examples[:6],
                       accelerator=acc, progress=False)
    ref_state = model.trainable_state()

    model, examples = build()
    part = train_sigma(model, examples, c, seed=1, valid_examples=examples[:6],
                       checkpoint_dir=tmp_path / "ck", stop_after=3, accelerator=acc,
                       progress=False)
    assert part.stopped_early and len(part.history) == 3
    # Steps 2 is the last checkpoint; step 3 ran after it and is lost, as in a crash.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002"]

    model, examples = build()
    resumed = train_sigma(model, examples, c, seed=1, valid_examples=examples[:6],
                          checkpoint_dir=tmp_path / "ck", accelerator=acc, progress=False)
    assert resumed.resumed_from == 2
    assert len(resumed.history) == 6
    np.testing.assert_allclose(losses(resumed), losses(full), rtol=0, atol=1e-6)
    assert [v["valid_loss"] for v in resumed.validations] == pytest.approx(
        [v["valid_loss"] for v in full.validations], abs=1e-6)
    state = model.trainable_state()
    assert all(torch.allclose(state[k], ref_state[k], atol=1e-6) for k in ref_state)
    # The checkpoint holds trainable weights only, and only the newest one is kept.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000006"]
    weights = tmp_path / "ck" / "step-00000006" / "sigma" / "sigma_trainable.safetensors"
    assert weights.stat().st_size < 1_000_000


def test_bf16_autocast_trains_close_to_fp32() -> None:
    model, examples = build()
    fp32 = train_sigma(model, examples, cfg(steps=2), seed=0, progress=False)
    model, examples = build()
    bf16 = train_sigma(model, examples, cfg(steps=2, mixed_precision="bf16"), seed=0,
                       progress=False)
    assert bf16.setup["mixed_precision"] == "bf16"
    assert all(np.isfinite(losses(bf16)))
    assert abs(losses(bf16)[0] - losses(fp32)[0]) < 0.1


def test_callback_metric_selects_and_restores_the_best_weights(tmp_path: Path) -> None:
    model, examples = build()
    seen: dict[int, dict[str, torch.Tensor]] = {}
    scores = {2: 0.5, 4: 0.9, 6: 0.1}

    def validate(m: SigmaModel, step: int) -> dict[str, float]:
        assert not m.training and not torch.is_grad_enabled()
        seen[step] = m.trainable_state()
        return {"hr@10": scores[step]}

    result = train_sigma(model, examples,
                         cfg(steps=6, eval_every=2, select_metric="hr@10", select_mode="max"),
                         seed=0, validate_fn=validate, valid_examples=examples[:4],
                         output_dir=tmp_path / "model", progress=False)
    assert [v["step"] for v in result.validations] == [2, 4, 6]
    assert all("valid_loss" in v and "hr@10" in v for v in result.validations)
    assert result.best["step"] == 4
    state = model.trainable_state()
    assert all(torch.equal(state[k], seen[4][k]) for k in state)
    assert not all(torch.equal(seen[6][k], seen[4][k]) for k in state)
    # The restored best weights are what output_dir holds.
    fresh, _ = build()
    fresh.load_trainable(tmp_path / "model")
    assert all(torch.equal(fresh.trainable_state()[k], seen[4][k]) for k in state)
