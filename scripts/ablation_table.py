"""The report's paired ablation table for runs made outside one ``sigma experiment compare``
directory (e.g. ablations of the current default next to main runs decoded earlier).

    python scripts/ablation_table.py --main R0 R1 R2 --ablation NAME=V0,V1,V2 [--ablation ...]

``--main``: one finished run per seed; each ``--ablation`` names one run per seed, in the same
seed order (the pairing is by position; each pair is checked to have the same seed). A NAME of
:data:`sigmarec.experiment.ADDS` (``dense``, ``align``, ...) or given with ``--adds`` is a
variant that adds a part, so its effect is read as variant minus SIGMA. The table is
:func:`sigmarec.evaluation.ablations.paired_effects` over
:func:`sigmarec.evaluation.markdown.merge_models`, the code of the ``compare`` report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sigmarec.core.stage import read_manifest
from sigmarec.evaluation.ablations import paired_effects
from sigmarec.evaluation.markdown import merge_models
from sigmarec.experiment import ADDS


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
    ap.add_argument("--adds", action="append", default=[], metavar="NAME",
                    help="a variant that adds a part (besides sigmarec.experiment.ADDS)")
    a = ap.parse_args()
    runs = [_metrics(r) for r in a.main]
    entries = [{"seed": i, "variant": "main"} for i in range(len(a.main))]
    names = []
    for spec in a.ablation:
        name, _, dirs = spec.partition("=")
        paths = [Path(d) for d in dirs.split(",") if d]
        if not name or len(paths) > len(a.main):
            raise SystemExit(f"--ablation {spec!r}: NAME=DIR,... with at most one run per seed")
        names.append(name)
        for i, run in enumerate(paths):
            if _seed(run) != _seed(a.main[i]):
                raise SystemExit(f"{run} (seed {_seed(run)}) is paired with {a.main[i]} "
                                 f"(seed {_seed(a.main[i])})")
            runs.append(_metrics(run))
            entries.append({"seed": i, "variant": name})
    eff = paired_effects(merge_models(runs, entries), names, {*ADDS, *a.adds})
    print(f"main runs' seed sd of the task mean: {eff.attrs['seed_sd']:.4f}; binomial sd of "
          f"one run's task mean: {eff.attrs['test_sd']:.4f}")
    print(eff.to_markdown(floatfmt="+.3f"))


if __name__ == "__main__":
    main()
