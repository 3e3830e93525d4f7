"""Wires the stages in order: data -> baselines -> ... -> evaluation.

This is the one module that knows every stage; stages themselves only know their inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sigmarec.config import SigmaConfig
from sigmarec.core.stage import Stage, execute, is_fresh, read_manifest
from sigmarec.errors import StageError


def stages() -> list[Stage]:
    from sigmarec.baselines.stage import BaselinesStage
    from sigmarec.data.stage import DataStage
    from sigmarec.evaluation.stage import EvaluationStage
    from sigmarec.generation.stage import GenerationStage
    from sigmarec.gr.stage import GRBaselinesStage
    from sigmarec.grounding.stage import GroundingStage
    from sigmarec.ranker.stage import RankerStage
    from sigmarec.tasks.stage import TasksStage
    from sigmarec.tokenization.stage import TokenizationStage
    from sigmarec.training.stage import TrainingStage

    return [DataStage(), BaselinesStage(), GroundingStage(), TokenizationStage(), TasksStage(),
            TrainingStage(), GRBaselinesStage(), RankerStage(), GenerationStage(),
            EvaluationStage()]


def stage_names() -> list[str]:
    return [s.name for s in stages()]


def run_pipeline(
    config: SigmaConfig,
    run_dir: Path,
    force: list[str] | None = None,
    until: str | None = None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every stage (up to ``until``, or just the ``only`` ones, whose inputs must exist),
    skipping fresh ones; ``force`` names stages to redo."""
    names = stage_names()
    force = list(force or [])
    for f in [*force, *([until] if until else []), *(only or [])]:
        if f != "all" and f not in names:
            raise StageError(f"unknown stage {f!r}; stages are {names}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifests = []
    for stage in stages():
        if only and stage.name not in only:
            continue
        manifests.append(
            execute(stage, config, run_dir, force="all" in force or stage.name in force)
        )
        if stage.name == until:
            break
    return manifests


def status(config: SigmaConfig, run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for stage in stages():
        m = read_manifest(Path(run_dir) / stage.name)
        out.append(
            {
                "stage": stage.name,
                "state": "missing"
                if m is None
                else ("fresh" if is_fresh(stage, config, run_dir) else "stale"),
                "wall_time_s": m.get("wall_time_s") if m else None,
                "peak_memory_mb": m.get("peak_memory_mb") if m else None,
            }
        )
    return out
