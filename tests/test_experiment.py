"""The comparison plan: every variant is a config overlay of the base config."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigmarec.config import load_config
from sigmarec.errors import ConfigError
from sigmarec.experiment import plan


def test_plan_orders_seeds_and_overlays_the_variants(tmp_path: Path) -> None:
    base = load_config("tiny")
    runs = plan(base, tmp_path, [0, 1, 2], ["no_grounding", "two_level"], [0], [0])
    assert [(r["seed"], r["variant"]) for r in runs] == [
        (0, "main"), (0, "no_grounding"), (0, "two_level"), (1, "main"), (2, "main")]
    main0, nog, two, main1, _ = runs
    assert main0["cfg"].gr.enabled == ["gr_sid", "gr_id"] and main1["cfg"].gr.enabled == []
    assert main1["cfg"].seed == 1 and main1["cfg"].tokenization == base.tokenization
    assert nog["cfg"].tokenization.embedding == "ungrounded"
    assert two["cfg"].tokenization.prefix_levels == 2
    # Ablations share the main run's upstream stages, whose config they leave unchanged.
    for r in (nog, two):
        assert r["share_from"] == tmp_path / "seed0" / "main"
        for section in ("data", "baselines", "grounding", "backbone", "model", "training"):
            assert getattr(r["cfg"], section) == getattr(main0["cfg"], section)
        assert r["cfg"].generation.baselines == [] and r["cfg"].gr.enabled == []


def test_plan_rejects_unknown_ablations_and_empty_seeds(tmp_path: Path) -> None:
    base = load_config("tiny")
    with pytest.raises(ConfigError, match="no_such"):
        plan(base, tmp_path, [0], ["no_such"], [], [])
    with pytest.raises(ConfigError, match="seed"):
        plan(base, tmp_path, [], [], [], [])


def test_plan_can_share_the_first_seeds_upstream(tmp_path: Path) -> None:
    base = load_config("tiny")
    runs = plan(base, tmp_path, [0, 1], ["no_dense"], [], [0], share_upstream=True)
    assert [(r["seed"], r["variant"]) for r in runs] == [(0, "main"), (0, "no_dense"),
                                                        (1, "main")]
    assert "share_from" not in runs[0]
    assert runs[2]["share_from"] == tmp_path / "seed0" / "main"
    assert runs[1]["cfg"].model.dense_weight == 0.0
    paper = plan(base, tmp_path, [0], ["paper_objective"], [], [0])[1]["cfg"]
    assert (paper.model.dense_weight, paper.model.multi_positive, paper.tasks.frequent_items,
            paper.tasks.align_samples, paper.model.prefix_init) == (0.0, False, 0, 0, "shared")


@pytest.mark.parametrize("profile", ["tiny", "default", "full"])
def test_every_ablation_is_a_valid_config_of_every_profile(tmp_path: Path, profile: str) -> None:
    from sigmarec.experiment import ABLATIONS

    base = load_config(profile)
    noop = []
    for name in sorted(ABLATIONS):
        try:
            plan(base, tmp_path, [0], [name], [], [0])
        except ConfigError as e:
            assert repr(name) in str(e) and "changes nothing" in str(e)
            noop.append(name)
    # Only a switch the profile already has can coincide with it, and then its opposite runs.
    opposite = {"dense": "no_dense", "multi_positive": "no_multi_positive", "align": "no_align",
                "item_prefix_init": "shared_prefix_init"}
    opposite |= {v: k for k, v in opposite.items()}
    assert set(noop) <= set(opposite) and not {opposite[n] for n in noop} & set(noop)
    runs = plan(base, tmp_path, [0], [a for a in sorted(ABLATIONS) if a not in noop], [], [0])
    by = {r["variant"]: r["cfg"] for r in runs}
    assert set(by) == {"main", *ABLATIONS} - set(noop)
    by.update({n: base for n in noop})
    assert not by["no_repeat"].model.repeat_aware and not by["no_repeat"].model.repeat_counts
    # `dense` puts SIGMA's dense losses back on whatever the profile says; GR's own weight is
    # the profile's (the variant does not train GR anyway).
    assert by["dense"].model.dense_weight == 1.0 and by["no_dense"].model.dense_weight == 0.0
    assert by["dense"].gr.dense_weight == by["main"].gr.dense_weight
    assert by["no_counts"].model.repeat_aware and not by["no_counts"].model.repeat_counts
    assert by["no_copy_scale"].generation.copy_scale_grid == []


def test_plan_refuses_an_ablation_that_changes_nothing(tmp_path: Path) -> None:
    base = load_config("default")  # no alignment samples, single-positive labels
    assert base.tasks.align_samples == 0 and not base.model.multi_positive
    with pytest.raises(ConfigError, match=r"'no_align' changes nothing.*tasks.align_samples = 0"):
        plan(base, tmp_path, [0], ["no_frequent", "no_align"], [], [0])
    with pytest.raises(ConfigError, match="model.multi_positive = False"):
        plan(base, tmp_path, [0], ["no_multi_positive"], [], [0])
    runs = plan(base, tmp_path, [0], ["align", "multi_positive", "no_frequent"], [], [0])
    align, mp, nof = (r["cfg"] for r in runs[1:])
    assert align.tasks.align_samples == 1000 and mp.model.multi_positive
    assert nof.tasks.frequent_items == 0 and nof.model == runs[0]["cfg"].model
