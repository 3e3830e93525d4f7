"""``sigma experiment compare``: SIGMA against every baseline and its own ablations, over seeds.

Every variant is a config overlay, never a code path of its own:

* ``main`` (each seed): the base config with that seed - SIGMA (in ``generation.fusion``; the
  other fusion modes come from the same run's candidates), the classical baselines (as is and
  ``+rule``) and, on ``gr_seeds``, the generative baselines GR(SID) and GR(ID) (``gr.enabled``).
* ``no_grounding``: ``tokenization.embedding = ungrounded`` (the untrained backbone's text
  embeddings feed the semantic IDs and ProjFuse).
* ``two_level``: ``tokenization.prefix_levels = 2``.
* ``dense``, ``multi_positive``, ``align``, ``item_prefix_init``: a part the default leaves off
  turned on (the dense next-item losses, multi-positive NTP labels, 1,000 catalogue alignment
  samples, prefix rows started at their items' mean ṽ); ``no_dense``,
  ``no_multi_positive``, ``no_frequent``, ``no_align``, ``shared_prefix_init``,
  ``no_repeat`` (the copy prior), ``no_<channel>`` for each channel of the copy prior
  (:data:`sigmarec.tasks.channels.CHANNELS`: ``no_counts``, ``no_text_match``, ``no_rarity``,
  ``no_novelty``), ``no_match_tags``, ``no_bought_first`` (refinements of the text match),
  ``no_task_gates`` (the gates' per-task offsets),
  ``batch_negatives`` (sampled instead of whole-catalogue InfoNCE): one part of the
  sample-efficient SFT objective off; ``no_copy_scale``: the copy term at its trained weight
  in fusion; ``paper_objective``: all of it off.
* ``no_llm``: the transformer layers removed (``model.backbone_layers = 0``, backbone frozen):
  the token and item embeddings go straight to the final norm, the heads and the copy gates,
  so only the copy prior, the heads, ProjFuse, the new token rows and the gate offsets learn.
* ``frozen_llm``: the pretrained layers kept but not fine-tuned (``model.finetune = frozen``,
  no LoRA), everything else trained as usual: what the SFT of the backbone adds.

An ablation run shares the main run's data, baselines and grounding stages (linked, not
recomputed: its config does not change them) and retrains from tokenization on. The run list
goes to ``<out>/compare.json``; ``sigma report --out <out>`` then writes the comparison.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sigmarec.config import SigmaConfig
from sigmarec.core.atomic import write_json
from sigmarec.errors import ConfigError
from sigmarec.tasks.channels import CHANNELS

log = logging.getLogger("sigmarec")

# Every copy-prior channel off (and what refines one): no_repeat and paper_objective.
_CHANNELS_OFF: dict[str, Any] = {k: v for ch in CHANNELS.values() for k, v in ch.ablation.items()}

ABLATIONS: dict[str, dict[str, Any]] = {
    "no_grounding": {"tokenization": {"embedding": "ungrounded"}},
    "two_level": {"tokenization": {"prefix_levels": 2}},
    # The sample-efficient SFT objective (docs/training.md), one part off at a time, and all of
    # it off (the paper's label losses on the plain prompt).
    "no_dense": {"model": {"dense_weight": 0.0}},
    # The default leaves the dense losses off (a tie at three seeds, docs/experiments.md round
    # 12); this turns them back on for SIGMA (GR keeps gr.dense_weight either way).
    "dense": {"model": {"dense_weight": 1.0}},
    "no_multi_positive": {"model": {"multi_positive": False}},
    "no_frequent": {"tasks": {"frequent_items": 0}},
    "no_align": {"tasks": {"align_samples": 0}},
    # Parts the default leaves off (docs/experiments.md): these turn them on. 1,000 alignment
    # samples is the size of round 1's probe (a fifth of the default's SFT data).
    "multi_positive": {"model": {"multi_positive": True}},
    "align": {"tasks": {"align_samples": 1000}},
    "shared_prefix_init": {"model": {"prefix_init": "shared"}},
    "item_prefix_init": {"model": {"prefix_init": "item_embedding"}},
    "no_repeat": {"model": {"repeat_aware": False, **_CHANNELS_OFF, "task_gates": False}},
    # One copy-prior channel off at a time: no_<channel> for every channel of the registry.
    **{f"no_{ch.name}": {"model": ch.ablation} for ch in CHANNELS.values()},
    "no_match_tags": {"model": {"text_match_tags": False}},
    "no_bought_first": {"model": {"text_match_bought_first": False}},
    "no_task_gates": {"model": {"task_gates": False}},
    "no_copy_scale": {"generation": {"copy_scale_grid": []}},
    "batch_negatives": {"model": {"infonce_negatives": "batch"}},
    # The backbone itself (issue 27): what the LLM adds beyond the copy prior and the heads.
    # Removing the layers leaves LoRA nothing to adapt, so no_llm freezes what is left (the
    # embedding matrix and final norm; the new token rows are separate parameters and train).
    "no_llm": {"model": {"backbone_layers": 0, "finetune": "frozen"}},
    "frozen_llm": {"model": {"finetune": "frozen"}},
    "paper_objective": {"model": {"dense_weight": 0.0, "multi_positive": False,
                                  "prefix_init": "shared", "repeat_aware": False,
                                  **_CHANNELS_OFF, "task_gates": False,
                                  "infonce_negatives": "batch"},
                        "generation": {"copy_scale_grid": []},
                        "tasks": {"frequent_items": 0, "align_samples": 0}},
}
# The variants that add a part the configuration leaves off: the report reads their effect as
# variant minus SIGMA (evaluation/ablations.py), the others' as SIGMA minus variant.
ADDS = frozenset({"dense", "multi_positive", "align", "item_prefix_init"})
SHARED_STAGES = ("data", "baselines", "grounding")


def _overlay(cfg: SigmaConfig, update: dict[str, Any]) -> SigmaConfig:
    from sigmarec.config import deep_merge

    return SigmaConfig.model_validate(deep_merge(cfg.model_dump(), update))


def _unchanged(cfg: SigmaConfig, update: dict[str, Any]) -> list[str]:
    """``key = value`` for every leaf of ``update`` that ``cfg`` already has; empty when the
    overlay changes something."""
    current = cfg.model_dump()
    same: list[str] = []

    def walk(upd: dict[str, Any], cur: dict[str, Any], prefix: str) -> bool:
        changed = False
        for k, v in upd.items():
            if isinstance(v, dict) and isinstance(cur.get(k), dict):
                changed |= walk(v, cur[k], f"{prefix}{k}.")
            elif cur.get(k) == v:
                same.append(f"{prefix}{k} = {v!r}")
            else:
                changed = True
        return changed

    return [] if walk(update, current, "") else same


def plan(base: SigmaConfig, out: Path, seeds: list[int], ablations: list[str],
         gr_seeds: list[int], ablation_seeds: list[int],
         share_upstream: bool = False) -> list[dict[str, Any]]:
    """The runs of a comparison: (dir, seed, variant, config), main runs first.

    ``share_upstream``: the main runs of the later seeds link the first seed's data, baselines
    and grounding instead of recomputing them (a CPU budget choice: the spread then covers
    tokenization, SFT and decoding, not the classical baselines' own seeds)."""
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; choose from {sorted(ABLATIONS)}")
    if not seeds:
        raise ConfigError("give at least one seed")
    # A variant equal to the main run would spend a full SFT to reproduce it (e.g. no_align when
    # the profile has no alignment samples): refuse it and say what the profile already has.
    for name in ablations:
        same = _unchanged(base, ABLATIONS[name])
        if same:
            raise ConfigError(
                f"ablation {name!r} changes nothing in this config (already {', '.join(same)}); "
                "the part is off here: compare with the variant that turns it on, if there "
                f"is one ({', '.join(sorted(ADDS))}), or drop it")
    runs = []
    # Seed by seed, each main run followed by its ablations: an interrupted comparison then
    # holds complete seeds.
    for s in seeds:
        cfg = _overlay(base, {"seed": s, "gr": {"enabled": ["gr_sid", "gr_id"]
                                               if s in gr_seeds else []}})
        main = {"dir": out / f"seed{s}" / "main", "seed": s, "variant": "main", "cfg": cfg}
        if share_upstream and s != seeds[0]:
            main["share_from"] = out / f"seed{seeds[0]}" / "main"
        runs.append(main)
        for name in ablations if s in ablation_seeds else []:
            # Only SIGMA is retrained; the baselines are not re-ranked (the main run has them).
            cfg = _overlay(_overlay(base, {"seed": s, "gr": {"enabled": []}, "generation": {
                "baselines": [], "variants": []}}), ABLATIONS[name])
            runs.append({"dir": out / f"seed{s}" / name, "seed": s, "variant": name,
                         "cfg": cfg, "share_from": out / f"seed{s}" / "main"})
    return runs


def _seed_of(run_dir: Path) -> int | None:
    from sigmarec.core.stage import read_manifest

    m = read_manifest(Path(run_dir) / "data")
    return None if m is None else m.get("seed")


def run_comparison(base: SigmaConfig, out: Path, seeds: list[int], ablations: list[str],
                   gr_seeds: list[int], ablation_seeds: list[int],
                   share_upstream: bool = False) -> dict[str, Any]:
    """Run (or resume: finished stages are skipped) every run of the plan, then record it."""
    from sigmarec.pipeline import run_pipeline

    out = Path(out)
    runs = plan(base, out, seeds, ablations, gr_seeds, ablation_seeds, share_upstream)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"runs": [], "seeds": seeds, "ablations": ablations,
                              "adds": [a for a in ablations if a in ADDS],
                              "gr_seeds": gr_seeds, "ablation_seeds": ablation_seeds,
                              "share_upstream": share_upstream}
    for run in runs:
        run["dir"].mkdir(parents=True, exist_ok=True)
        for stage in SHARED_STAGES if "share_from" in run else ():
            link, target = run["dir"] / stage, run["share_from"] / stage
            if not link.exists():
                link.symlink_to(target.resolve(), target_is_directory=True)
        log.info("compare: %s seed %s -> %s", run["variant"], run["seed"], run["dir"])
        t = time.perf_counter()
        shared = SHARED_STAGES if "share_from" in run else ()
        if shared and run["cfg"].seed != _seed_of(run["share_from"]):
            # Linked stages of another seed are inputs, never rerun (a rerun would write into
            # the first seed's run): only the stages after them run here.
            from sigmarec.pipeline import stage_names

            run_pipeline(run["cfg"], run["dir"],
                         only=[n for n in stage_names() if n not in shared])
        else:
            run_pipeline(run["cfg"], run["dir"])
        record["runs"].append({"dir": str(run["dir"]), "seed": run["seed"],
                               "variant": run["variant"],
                               "wall_time_s": round(time.perf_counter() - t, 1)})
        record["wall_time_s"] = round(time.perf_counter() - t0, 1)
        write_json(out / "compare.json", record)  # after every run: a partial report works
    return record
