"""The stage contract and the runner that skips finished stages.

A stage reads the artifacts of the stages it ``requires`` from the run directory and writes its own
into a temporary folder that replaces ``<run_dir>/<name>`` only when the stage succeeds, with
``manifest.json`` written last. A stage is skipped when its manifest records the same fingerprint:
the hash of the config sections it depends on, the seed, and the run ids of its inputs (so any
recomputed input forces a recompute downstream).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sigmarec.config import SigmaConfig, _hash
from sigmarec.core.atomic import atomic_dir, write_json
from sigmarec.core.manifest import PeakMemory, git_commit, package_versions
from sigmarec.core.seed import seed_everything, set_threads
from sigmarec.errors import StageError

log = logging.getLogger("sigmarec")

MANIFEST = "manifest.json"


@dataclass
class StageContext:
    config: SigmaConfig
    run_dir: Path
    out: Path  # the stage's temporary output folder
    inputs: dict[str, Path] = field(default_factory=dict)  # upstream stage name -> its folder
    # Survives a failed or interrupted attempt (checkpoints live here) and is removed once the
    # stage succeeds; keyed by the fingerprint, so a changed config never resumes a stale run.
    scratch: Path | None = None

    def input(self, stage: str) -> Path:
        try:
            return self.inputs[stage]
        except KeyError:
            raise StageError(f"stage input {stage!r} was not declared in `requires`") from None


class Stage(ABC):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    # Top-level config sections whose change invalidates this stage's artifacts.
    config_sections: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write artifacts under ``ctx.out``; return a small summary for the manifest."""


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def fingerprint(stage: Stage, config: SigmaConfig, run_dir: Path) -> str:
    upstream = {}
    for dep in stage.requires:
        m = read_manifest(run_dir / dep)
        if m is None:
            raise StageError(f"stage {stage.name!r} needs {dep!r}, which has not run in {run_dir}")
        upstream[dep] = m["run_id"]
    return _hash({"config": config.section_hash(*stage.config_sections), "upstream": upstream})


def is_fresh(stage: Stage, config: SigmaConfig, run_dir: Path) -> bool:
    m = read_manifest(run_dir / stage.name)
    if m is None:
        return False
    try:
        return m.get("fingerprint") == fingerprint(stage, config, run_dir)
    except StageError:
        return False


def execute(stage: Stage, config: SigmaConfig, run_dir: Path, force: bool = False) -> dict:
    """Run ``stage`` unless a fresh result exists; return its manifest."""
    run_dir = Path(run_dir)
    target = run_dir / stage.name
    fp = fingerprint(stage, config, run_dir)
    existing = read_manifest(target)
    if not force and existing and existing.get("fingerprint") == fp:
        log.info("stage %s: up to date (%s), skipped", stage.name, existing["run_id"])
        existing["skipped"] = True
        return existing
    if target.is_symlink() and existing:
        # Linked from another run (compare's shared upstream, or by hand) but made with another
        # config or seed: the result goes here instead of the link, never into the other run.
        log.warning("stage %s: %s links to %s, made with another config (seed %s, this run's %s): "
                    "recomputing it in this run; pass --only for the later stages to use the "
                    "linked result as it is", stage.name, target, target.resolve(),
                    existing.get("seed"), config.seed)
    set_threads(config.threads)
    seed_everything(config.seed)
    inputs = {dep: run_dir / dep for dep in stage.requires}
    log.info("stage %s: running", stage.name)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    start = time.perf_counter()
    scratch = run_dir / ".scratch" / f"{stage.name}-{fp}"
    with atomic_dir(target) as tmp, PeakMemory() as mem:
        summary = stage.run(
            StageContext(config=config, run_dir=run_dir, out=tmp, inputs=inputs, scratch=scratch)
        )
        manifest = {
            "stage": stage.name,
            "run_id": uuid.uuid4().hex[:12],
            "fingerprint": fp,
            "config_hash": config.full_hash(),
            "config": config.model_dump(mode="json"),
            "seed": config.seed,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "started_at": started_at,
            "summary": summary,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "peak_memory_mb": mem.sample(),
        }
        # The manifest is the last file written: its presence marks the stage complete.
        write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("stage %s: done in %.1fs", stage.name, manifest["wall_time_s"])
    manifest["skipped"] = False
    return manifest
