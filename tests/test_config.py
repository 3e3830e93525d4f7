from __future__ import annotations

import pytest

from sigmarec.config import available_profiles, load_config
from sigmarec.errors import ConfigError


def test_profiles_load():
    assert {"tiny", "default", "full"} <= set(available_profiles())
    for p in available_profiles():
        cfg = load_config(p)
        assert cfg.profile == p


def test_layering_order(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text("seed: 3\ndata: {min_item_count: 4}\n")
    f2 = tmp_path / "b.yaml"
    f2.write_text("data: {min_item_count: 6}\n")
    cfg = load_config("tiny", files=[f1, f2], overrides=["seed=9"])
    assert cfg.seed == 9 and cfg.data.min_item_count == 6
    assert cfg.data.max_users == 150  # from the profile, untouched


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data: {min_item_cnt: 4}\n")
    with pytest.raises(ConfigError, match="data.min_item_cnt"):
        load_config("tiny", files=[f])


@pytest.mark.parametrize("override,needle", [
    ("eval.ks=[0, 5]", "eval.ks"),
    ("eval.top_n=5", "top_n"),
    ("data.source=nope", "data.source"),
    ("baselines.sasrec.heads=3", "divisible"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", overrides=[override])


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("tiny", files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "x.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", files=[bad])


def test_section_hash_tracks_only_its_sections():
    a = load_config("tiny")
    b = load_config("tiny", overrides=["eval.batch_size=3"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("eval") != b.section_hash("eval")
