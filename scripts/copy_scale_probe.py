"""Re-sort a finished generation stage's candidates under several copy-scale grids.

    python scripts/copy_scale_probe.py RUN_DIR [GRID ...]      e.g.  runs/default "" "1.5,2,3,4,6,8"

For each grid (comma-separated scales; "" = only 1, the copy term as trained) this makes the
generation stage's own validation choices (K, then tau jointly with the copy scale, for SIGMA
and for sigma+rule) on the stored candidates, and prints the test HR@10 per task of both lists.
No model is loaded: the candidates hold each score's copy term (``Candidates.copy``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sigmarec.config import load_config
from sigmarec.data.processed import ProcessedData
from sigmarec.generation.fusion import fuse, truncate
from sigmarec.generation.stage import GenerationStage, fill_lists, load_candidates
from sigmarec.metrics import accuracy_metrics


def per_task(df: pd.DataFrame, items: np.ndarray, popular: np.ndarray) -> pd.Series:
    # Lists are filled from popularity as the stage writes them.
    items = fill_lists(items, popular)[0]
    hr = accuracy_metrics(items[:, :10], list(df["targets"]), [10])["HR@10"]
    return pd.Series(hr).groupby(df["task"].to_numpy()).mean()


def main(run: Path, grids: list[str]) -> None:
    gcfg0 = load_config("default").generation
    inst = {s: pd.read_parquet(run / "tasks" / f"{s}.parquet") for s in ("valid", "test")}
    gen = run / "generation"
    plain = {s: load_candidates(gen / f"candidates_{s}.npz") for s in inst}
    rule = {s: load_candidates(gen / f"candidates_rule_{s}.npz") for s in inst}
    counts = ProcessedData.load(run / "data").train_item_counts
    popular = np.argsort(-counts, kind="stable")
    n, stage, cols = 50, GenerationStage(), {}
    for grid in grids:
        scales = [float(x) for x in grid.split(",") if x.strip()]
        gcfg = gcfg0.model_copy(update={"copy_scale_grid": scales})
        k = stage._choose_k(gcfg, inst, plain, n)
        cands = {s: truncate(c, k) for s, c in plain.items()}
        taus, chosen = stage._choose_tau(gcfg, inst, cands, n)
        tau_r, scale_r = stage._choose_rule_tau(gcfg, inst, rule, taus["adaptive"], n)
        name = grid or "1"
        cols[f"sigma [{name}] x{chosen['adaptive']:g}"] = per_task(
            inst["test"], fuse(cands["test"], "adaptive", taus["adaptive"], n,
                               chosen["adaptive"])[0], popular)
        cols[f"sigma+rule [{name}] x{scale_r:g}"] = per_task(
            inst["test"], fuse(rule["test"], "adaptive", tau_r, n, scale_r)[0], popular)
    table = pd.DataFrame(cols)
    table.loc["MEAN"] = table.mean()
    print(table.round(3).to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["", "1.5,2,3"])
