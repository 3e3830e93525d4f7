"""Probe: SASRec-CE with a share of each batch's targets scored (``sasrec.ce_target_fraction``).

Trains one SASRec-CE on a finished run's data stage with the default profile's SASRec settings
and the given share, and prints its train seconds and validation NDCG@10 per epoch (the figures
of docs/experiments.md, round 6)::

    .venv/bin/python scripts/sasrec_ce_fraction_probe.py runs/default 0.5 [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sigmarec.baselines.sasrec.train import train_sasrec
from sigmarec.config import SASRecConfig, load_config
from sigmarec.data.processed import ProcessedData


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory with a finished data stage")
    ap.add_argument("fraction", type=float, help="share of the targets scored per step")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the training summary here as JSON")
    args = ap.parse_args()
    cfg = load_config(profile=args.profile)
    sasrec = SASRecConfig.model_validate({**cfg.baselines.sasrec_for("sasrec_ce").model_dump(),
                                          "ce_target_fraction": args.fraction})
    data = ProcessedData.load(args.run_dir / "data")
    _, summary = train_sasrec(data, sasrec, "ce", args.seed, cfg.eval, None,
                              f"sasrec_ce share {args.fraction}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({"fraction": args.fraction, "train_seconds": summary["train_seconds"],
                      "valid_ndcg10": summary["valid_ndcg10"],
                      "per_epoch": [h["valid_ndcg10"] for h in summary["history"]]}))


if __name__ == "__main__":
    main()
