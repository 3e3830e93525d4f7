"""SIGMA at several SFT budgets: where the test accuracy is lost and how it scales with steps.

    python scripts/budget_table.py RUN_DIR [RUN_DIR ...]

One row per finished run (any seeds and budgets; sorted by steps, then seed): the SFT steps, the
validated step it ended with (``training.restore_best``), SFT wall time, the validation prefix NTP
against the marginal prior, SIGMA's and sigma+rule's test HR@10, and SIGMA's test instances split
by where they are lost, averaged over the seven tasks (the generation stage's diagnostics): a hit,
a prefix miss (no target's prefix among the top K; K is chosen on validation, so it moves
misses between this column and the next), a retrieval miss (a prefix found, but no
target among its top M candidates) and a fusion miss (a target among the candidates, but not in the
fused top 10).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sigmarec.evaluation.report import headline_figures


def _row(run: Path) -> dict[str, float]:
    train = json.loads((run / "training" / "manifest.json").read_text())
    summ = train["summary"]
    metrics = json.loads((run / "evaluation" / "metrics_tasks.json").read_text())
    head = headline_figures(metrics)
    diag = json.loads((run / "generation" / "diagnostics.json").read_text())["test"]
    tasks = [t for t in diag if not t.startswith("_")]
    gen = json.loads((run / "generation" / "manifest.json").read_text())["summary"]["sigma"]
    split = {k: float(np.mean([diag[t][k] for t in tasks]))
             for k in ("HR@10", "prefix_miss", "retrieval_miss", "fusion_miss")}
    return {
        "steps": summ["steps"], "seed": train["seed"], "best": summ["best"]["step"],
        "sft_s": summ["seconds"], "ntp": summ["best"]["valid_prefix_ntp"],
        "prior": summ["references"]["ref_ntp_prior"], "k": gen["k_prefixes"],
        "sigma": float(head.loc["sigma", "mean HR@10"]),
        "jfy": float(diag["JustForYou"]["HR@10"]) if "JustForYou" in diag else float("nan"),
        "instr": float(head.loc["sigma", "instruction HR@10"]),
        "rule": float(head.loc["sigma", "rule@10"]),
        "sigma_rule": float(head.loc["sigma+rule", "mean HR@10"])
        if "sigma+rule" in head.index else float("nan"),
        **split,
    }


def main(runs: list[Path]) -> None:
    rows = sorted((_row(r) for r in runs), key=lambda r: (r["steps"], r["seed"]))
    print("| SFT steps | seed | restored step | SFT s | valid prefix NTP (prior) | sigma | "
          "JustForYou | instruction (6) | rule@10 | sigma+rule | K | hit | prefix miss | "
          "retrieval miss | fusion miss |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['steps']} | {r['seed']} | {r['best']:.0f} | {r['sft_s']:.0f} | "
              f"{r['ntp']:.3f} ({r['prior']:.3f}) | {r['sigma']:.3f} | {r['jfy']:.3f} | "
              f"{r['instr']:.3f} | {r['rule']:.3f} | {r['sigma_rule']:.3f} | {r['k']} | "
              f"{r['HR@10']:.3f} | {r['prefix_miss']:.3f} | {r['retrieval_miss']:.3f} | "
              f"{r['fusion_miss']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
