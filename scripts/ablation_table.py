"""The report's paired ablation table for runs made outside one ``sigma experiment compare``
directory (e.g. ablations of the current default next to main runs decoded earlier).

    python scripts/ablation_table.py --main R0 R1 R2 --ablation NAME=V0,V1,V2 [--ablation ...]

``--main``: one finished run per seed; each ``--ablation`` names one run per seed, in the same
seed order (the pairing is by position; each pair is checked to have the same seed). The
effects and verdicts are :func:`sigmarec.evaluation.ablations.paired_effects` (the rule of the
``sigma experiment compare`` report); the sigma+rule effect is added beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sigmarec.core.stage import read_manifest
from sigmarec.evaluation.ablations import MAIN, PREFIX, paired_effects
from sigmarec.evaluation.report import headline_figures

RULE = "sigma+rule"


def _metrics(run: Path) -> dict:
    path = run / "evaluation" / "metrics_tasks.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no evaluation/metrics_tasks.json (has the run finished?)")
    return json.loads(path.read_text())


def _seed(run: Path) -> int | None:
    m = read_manifest(run / "training")
    return None if m is None else m.get("seed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--main", nargs="+", type=Path, required=True)
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME=DIR,DIR,...")
    a = ap.parse_args()
    per_seed = [_metrics(r) for r in a.main]
    names = []
    for spec in a.ablation:
        name, _, dirs = spec.partition("=")
        runs = [Path(d) for d in dirs.split(",") if d]
        if not name or len(runs) > len(a.main):
            raise SystemExit(f"--ablation {spec!r}: NAME=DIR,... with at most one run per seed")
        names.append(name)
        for i, run in enumerate(runs):
            if _seed(run) != _seed(a.main[i]):
                raise SystemExit(f"{run} (seed {_seed(run)}) is paired with {a.main[i]} "
                                 f"(seed {_seed(a.main[i])})")
            test = _metrics(run)["test"]
            per_seed[i]["test"][PREFIX + name] = test[MAIN]
            if RULE in test:
                per_seed[i]["test"][f"{PREFIX}{name}+rule"] = test[RULE]
    eff = paired_effects(per_seed, names)
    rule = {}
    for name in names:
        d = [float(f.loc[RULE, "mean HR@10"] - f.loc[f"{PREFIX}{name}+rule", "mean HR@10"])
             for f in (headline_figures(m) for m in per_seed)
             if f"{PREFIX}{name}+rule" in f.index and RULE in f.index]
        rule[name] = (" / ".join(f"{x:+.3f}" for x in d) + f" (mean {np.mean(d):+.3f})"
                      if d else "-")
    eff["on sigma+rule (per seed)"] = [rule[n] for n in eff.index]
    print(f"main runs' seed sd of the task mean: {eff.attrs['seed_sd']:.4f}")
    print(eff.to_markdown(floatfmt="+.3f"))


if __name__ == "__main__":
    main()
