"""SIGMA's step 3 (fusion) at the settings the run's generation stage chose on validation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigmarec.config import SigmaConfig
from sigmarec.core.stage import read_manifest
from sigmarec.generation.config import Fusion
from sigmarec.generation.fusion import Candidates, fuse_by_group, tuned_mode

log = logging.getLogger("sigmarec")


@dataclass(frozen=True)
class FusionChoice:
    """The fusion's settings as the generation stage chose them on validation (or the
    config's, for a run without a generation stage; ``source`` says which)."""

    tau: float
    k_prefixes: int
    copy_scale: float
    source: str
    # For requests with a filter: the pair sigma+rule chose on rule-filtered validation lists.
    tau_filtered: float | None = None
    copy_scale_filtered: float | None = None
    # generation.fusion_per_task: {task: (tau, copy scale)}, unfiltered and filtered; a task
    # without an entry uses the pair above.
    per_task: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    per_task_filtered: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    # generation.fusion of the run (a manifest written before the field existed: adaptive).
    mode: Fusion = "adaptive"

    def fuse(self, cands: Candidates, filtered: np.ndarray, n: int,
             tasks: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fusion of a batch (in ``mode``): rows with a filter (``filtered`` (B,) bool) at the
        filtered pair, the others at the unfiltered one; with ``tasks`` (one per row), at
        the pair chosen for the row's task where there is one."""
        groups = np.array(["" for _ in range(len(filtered))] if tasks is None else
                          [str(t) for t in tasks], dtype=object)
        if len(groups) != len(filtered):
            raise ValueError(f"{len(groups)} tasks for a batch of {len(filtered)}")
        # "off" lists ranked by prefix, then score; sigma+rule is fused adaptively then.
        rule_mode = tuned_mode(self.mode)
        items, scores = fuse_by_group(cands, groups, self.per_task,
                                      (self.tau, self.copy_scale), n, self.mode)
        if filtered.any() and self.tau_filtered is not None:
            f_items, f_scores = fuse_by_group(
                cands, groups, self.per_task_filtered,
                (self.tau_filtered, self.copy_scale_filtered or 1.0), n, rule_mode)
            items = np.where(filtered[:, None], f_items, items)
            scores = np.where(filtered[:, None], f_scores, scores)
        return items, scores


def generation_choice(run_dir: Path, cfg: SigmaConfig) -> FusionChoice:
    """(mode, tau, K, copy scale) of the run's fusion, from its generation manifest."""
    manifest = read_manifest(run_dir / "generation")
    sigma = (manifest or {}).get("summary", {}).get("sigma", {})
    if "tau" in sigma:
        mode = sigma.get("fusion", "adaptive")
        tuned = tuned_mode(mode)
        scales = sigma.get("copy_scale", {})
        rule_tau = sigma["tau"].get("rule")
        per = sigma.get("per_task", {})

        def pairs(which: str) -> dict[str, tuple[float, float]]:
            return {t: (float(v[0]), float(v[1])) for t, v in per.get(which, {}).items()}

        return FusionChoice(float(sigma["tau"][tuned]),
                            int(sigma.get("k_prefixes", cfg.generation.k_prefixes)),
                            float(scales.get(tuned, 1.0)),
                            "chosen on validation by the generation stage",
                            None if rule_tau is None else float(rule_tau),
                            float(scales.get("rule", 1.0)), pairs(mode), pairs("rule"), mode)
    log.warning("serving: %s has no generation manifest; SIGMA uses generation.tau (%s) and "
                "k_prefixes (%d) from the config, not values chosen on validation",
                run_dir / "generation", cfg.generation.tau, cfg.generation.k_prefixes)
    return FusionChoice(cfg.generation.tau, cfg.generation.k_prefixes, 1.0,
                        "config (no generation stage)", mode=cfg.generation.fusion)
