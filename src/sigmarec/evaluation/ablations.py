"""What each part of SIGMA adds, read off a comparison's ablation runs, paired by seed.

An ablation run (``sigma_<variant>``) shares its seed's data, tokenization seed and SFT seed
with the main run's ``sigma``, so the per-seed difference ``sigma - sigma_<variant>`` cancels
much of the noise that the mean ± spread of two separate rows would carry. A part is said to
help (or hurt) only when the difference has the same sign on every seed *and* its mean is larger
than both the main run's own seed-to-seed standard deviation (the project's rule: a result inside
the seed spread is a tie) and the binomial standard deviation of one run's task mean on the test
instances (what the test set's size can resolve). The second floor matters with three seeds:
their standard deviation is itself a rough estimate, and the default run at three seeds before
and after its semantic IDs were pinned to one thread (another draw of the same k-means) differed
by +0.004 / +0.005 / +0.0005, same sign and a mean above that seed sd of 0.0024, though nothing
but the k-means' rounding changed (BENCHMARKS.md §23). With one seed there is no verdict.

A variant either takes a part away (``no_*``: the part's effect is ``sigma - sigma_<variant>``)
or adds one the configuration leaves off (``adds``, e.g. ``dense``: the effect is
``sigma_<variant> - sigma``), so "helps" always speaks of the part, never of the variant.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.evaluation.report import headline_figures

MAIN = "sigma"
PREFIX = "sigma_"
RULE = "+rule"  # an ablation run's sigma+rule is merged as sigma_<variant>+rule


def verdict(deltas: list[float], seed_sd: float, test_sd: float = math.nan) -> str:
    """``helps`` / ``hurts`` / ``tie`` / ``one seed`` for the per-seed effects of a part.
    ``test_sd``: the binomial sd of a run's task mean (nan = unknown, no floor from it)."""
    if len(deltas) < 2:
        return "one seed"
    mean = float(np.mean(deltas))
    same_sign = all(d > 0 for d in deltas) or all(d < 0 for d in deltas)
    floor = max((x for x in (seed_sd, test_sd) if not math.isnan(x)), default=math.nan)
    if same_sign and not math.isnan(floor) and abs(mean) > floor:
        return "helps" if mean > 0 else "hurts"
    return "tie"


def task_mean_sd(model: dict[str, Any]) -> float:
    """Binomial standard deviation of a model's mean HR@10 over its tasks: each task's HR@10 is a
    proportion over its ``n`` test instances, the tasks' instances are disjoint. nan when the
    metrics carry no instance counts."""
    var, tasks = 0.0, 0
    for task, res in model.items():
        if task in ("ALL", "MEAN"):
            continue
        row = res.get("all", {})
        n, p = row.get("n"), row.get("HR@10")
        if not n or p is None:
            return math.nan
        var += p * (1 - p) / n
        tasks += 1
    return math.sqrt(var) / tasks if tasks else math.nan


def paired_effects(per_seed: list[dict[str, Any]], ablations: list[str],
                   adds: Collection[str] = ()) -> pd.DataFrame:
    """One row per ablation: the part's effect on each seed that ran both (``sigma -
    sigma_<ablation>``, negated for the variants in ``adds``), its mean and the verdict, and the
    effect on sigma+rule where both runs have it. ``per_seed``: one ``{"test": {model: ...}}``
    per seed, with the ablation runs' SIGMA as ``sigma_<ablation>`` (and ``sigma_<ablation>+rule``).
    The ablations are named, not guessed from the model names: the main run has ``sigma_*`` rows
    of its own (fusion variants of the same SFT), which are not ablations."""
    figs = [headline_figures(m) for m in per_seed if MAIN in m.get("test", {})]
    main_means = [float(f.loc[MAIN, "mean HR@10"]) for f in figs]
    seed_sd = float(np.std(main_means, ddof=1)) if len(main_means) > 1 else float("nan")
    test_sds = [task_mean_sd(m["test"][MAIN]) for m in per_seed if MAIN in m.get("test", {})]
    test_sd = float(np.mean(test_sds)) if test_sds else float("nan")
    variants = [PREFIX + a for a in ablations if any(PREFIX + a in f.index for f in figs)]
    rows = {}
    for v in variants:
        name = v[len(PREFIX):]
        sign = -1.0 if name in adds else 1.0
        paired = [f for f in figs if v in f.index]
        d = {c: [sign * float(f.loc[MAIN, c] - f.loc[v, c]) for f in paired]
             for c in ("mean HR@10", "instruction HR@10", "rule@10")}
        rule_d = [sign * float(f.loc[MAIN + RULE, "mean HR@10"] - f.loc[v + RULE, "mean HR@10"])
                  for f in paired if MAIN + RULE in f.index and v + RULE in f.index]
        main_d = d["mean HR@10"]
        rows[name] = {
            "part": "added" if name in adds else "removed",
            "seeds": len(paired),
            "effect per seed": " / ".join(f"{x:+.3f}" for x in main_d),
            "effect on mean HR@10": float(np.mean(main_d)),
            "on instruction HR@10": float(np.mean(d["instruction HR@10"])),
            "on rule@10": float(np.mean(d["rule@10"])),
            "on sigma+rule": float(np.mean(rule_d)) if rule_d else float("nan"),
            "verdict": verdict(main_d, seed_sd, test_sd),
        }
    cols = ["part", "seeds", "effect per seed", "effect on mean HR@10", "on instruction HR@10",
            "on rule@10", "on sigma+rule", "verdict"]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=cols).rename_axis("ablation")
    df.attrs["seed_sd"] = seed_sd
    df.attrs["test_sd"] = test_sd
    return df
