"""Run directories: fresh stages are skipped, forced or upstream-changed ones rerun, and a failing
stage leaves nothing a later stage could trust."""

from __future__ import annotations

from typing import ClassVar

import pytest

from sigmarec.config import load_config
from sigmarec.core.stage import Stage, StageContext, execute, is_fresh, read_manifest
from sigmarec.errors import StageError

CALLS: list[str] = []


class Up(Stage):
    name: ClassVar[str] = "up"
    config_sections: ClassVar[tuple[str, ...]] = ("data",)

    def run(self, ctx: StageContext) -> dict:
        CALLS.append(self.name)
        (ctx.out / "value.txt").write_text(str(ctx.config.data.min_item_count))
        return {"ok": True}


class Down(Stage):
    name: ClassVar[str] = "down"
    requires: ClassVar[tuple[str, ...]] = ("up",)
    config_sections: ClassVar[tuple[str, ...]] = ("eval",)

    def run(self, ctx: StageContext) -> dict:
        CALLS.append(self.name)
        v = (ctx.input("up") / "value.txt").read_text()
        (ctx.out / "value.txt").write_text(v + "!")
        return {}


class Boom(Stage):
    name: ClassVar[str] = "up"

    def run(self, ctx: StageContext) -> dict:
        (ctx.out / "value.txt").write_text("half")
        raise RuntimeError("interrupted")


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()


def test_skip_force_and_upstream_invalidation(tmp_path):
    cfg = load_config("tiny")
    execute(Up(), cfg, tmp_path)
    execute(Down(), cfg, tmp_path)
    assert CALLS == ["up", "down"]
    m = read_manifest(tmp_path / "up")
    for key in ("config", "config_hash", "versions", "seed", "wall_time_s", "peak_memory_mb"):
        assert key in m
    assert m["versions"]["torch"]
    # unchanged: both skipped
    assert execute(Up(), cfg, tmp_path)["skipped"] and execute(Down(), cfg, tmp_path)["skipped"]
    assert CALLS == ["up", "down"]
    # a section the downstream stage does not read leaves it fresh...
    cfg2 = load_config("tiny", overrides=["eval.batch_size=7"])
    assert is_fresh(Up(), cfg2, tmp_path)
    # ...but forcing the upstream stage gives it a new run id, so downstream reruns
    execute(Up(), cfg, tmp_path, force=True)
    assert not is_fresh(Down(), cfg, tmp_path)
    execute(Down(), cfg, tmp_path)
    assert CALLS == ["up", "down", "up", "down"]
    # a changed config section reruns the stage
    cfg3 = load_config("tiny", overrides=["data.min_item_count=9"])
    execute(Up(), cfg3, tmp_path)
    assert (tmp_path / "up" / "value.txt").read_text() == "9"


def test_failed_stage_leaves_previous_artifacts_intact(tmp_path):
    cfg = load_config("tiny")
    execute(Up(), cfg, tmp_path)
    with pytest.raises(RuntimeError):
        execute(Boom(), cfg, tmp_path, force=True)
    assert (tmp_path / "up" / "value.txt").read_text() == "5"
    assert read_manifest(tmp_path / "up") is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_first_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        execute(Boom(), load_config("tiny"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_upstream_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="needs 'up'"):
        execute(Down(), load_config("tiny"), tmp_path)


def test_a_linked_stage_of_another_config_is_recomputed_beside_its_target(tmp_path, caplog):
    """A stage linked from another run (``compare --share-upstream``) that no longer matches the
    config is recomputed in this run: the link is replaced, the other run is left as it was."""
    cfg = load_config("tiny")
    other, run = tmp_path / "other", tmp_path / "run"
    execute(Up(), cfg, other)
    before = (other / "up" / "value.txt").read_text(), read_manifest(other / "up")["run_id"]
    run.mkdir()
    (run / "up").symlink_to(other / "up", target_is_directory=True)
    assert execute(Up(), cfg, run)["skipped"]  # the same config: the link is used as it is
    changed = cfg.model_copy(deep=True, update={"seed": cfg.seed + 1})
    changed.data.min_item_count += 1
    with caplog.at_level("WARNING", logger="sigmarec"):
        execute(Up(), changed, run)
    assert "links to" in caplog.text and "recomputing" in caplog.text
    assert not (run / "up").is_symlink()
    assert (run / "up" / "value.txt").read_text() == str(cfg.data.min_item_count + 1)
    assert ((other / "up" / "value.txt").read_text(), read_manifest(other / "up")["run_id"]) \
        == before
    assert not any(p.name.startswith(".up") for p in run.iterdir())  # no .old, no .tmp left
