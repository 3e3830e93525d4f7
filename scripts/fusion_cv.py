"""Which fusion family ranks best, decided on validation alone (docs/experiments.md, round 12).

    python scripts/fusion_cv.py RUN_DIR plain|rule [--halvings 20]

Re-sorts a finished generation stage's stored candidates (no model is loaded). For each family
- adaptive (APF), fixed and joint fusion, each with one (tau, copy scale[, K]) for all tasks
or one per task - the settings are chosen on a random half of the validation instances
(stratified by task) and scored on the other half, both ways, over ``--halvings`` random
halvings: a held-out validation estimate that does not reward a family for having more knobs
to fit. Test HR@10 at the choice made on the whole validation split is printed beside it.
Grids: the generation config's tau grid (rescaled by the spread for adaptive), copy scales
{1} and ``copy_scale_grid``, and K from ``k_grid`` (plain lists; sigma+rule keeps its beam).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from sigmarec.config import load_config
from sigmarec.generation.fusion import fuse, truncate
from sigmarec.generation.stage import load_candidates, mode_taus

FAMILIES = [(m, per) for m in ("adaptive", "fixed", "joint") for per in (False, True)]


def _hits(df: pd.DataFrame, items: np.ndarray) -> np.ndarray:
    return np.array([bool(set(np.asarray(t).tolist()) & set(r[:10].tolist()))
                     for t, r in zip(df["targets"], items, strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("lists", choices=["plain", "rule"])
    ap.add_argument("--halvings", type=int, default=20)
    ap.add_argument("--profile", default="default")
    a = ap.parse_args()
    g = load_config(a.profile).generation
    suffix = "_rule" if a.lists == "rule" else ""
    inst = {s: pd.read_parquet(a.run_dir / "tasks" / f"{s}.parquet") for s in ("valid", "test")}
    cand = {s: load_candidates(a.run_dir / "generation" / f"candidates{suffix}_{s}.npz")
            for s in ("valid", "test")}
    width = cand["valid"].items.shape[1]
    ks = [width] if a.lists == "rule" else sorted({*g.k_grid, width})
    scales = sorted({1.0, *g.copy_scale_grid})

    def cut(split: str, k: int):  # noqa: ANN202
        return truncate(cand[split], k) if k < width else cand[split]

    # Adaptive's grid is rescaled by the validation spread (as the stage does) and the same
    # absolute taus are applied to test.
    taus = {(m, k): mode_taus(m, cut("valid", k), g.tau_grid, g.tau)
            for m in ("adaptive", "fixed", "joint") for k in ks}

    def table(split: str) -> dict[tuple, np.ndarray]:
        out = {}
        for k in ks:
            c = cut(split, k)
            for mode in ("adaptive", "fixed", "joint"):
                for i, t in enumerate(taus[(mode, k)]):
                    for s in scales:
                        out[(mode, k, i, s)] = _hits(inst[split], fuse(c, mode, t, 10, s)[0])
        return out

    hv, ht = table("valid"), table("test")
    tv, tt = inst["valid"]["task"].to_numpy(), inst["test"]["task"].to_numpy()
    tasks = sorted(set(tv.tolist()))

    def mean(h: dict, t: np.ndarray, sel: dict, rows: np.ndarray) -> float:
        return float(np.mean([h[sel[x]][rows & (t == x)].mean() for x in tasks]))

    def choose(mode: str, per_task: bool, rows: np.ndarray) -> dict[str, tuple]:
        keys = [k for k in hv if k[0] == mode]
        if per_task:
            return {x: max(keys, key=lambda k: hv[k][rows & (tv == x)].mean()) for x in tasks}
        best = max(keys, key=lambda k: mean(hv, tv, dict.fromkeys(tasks, k), rows))
        return dict.fromkeys(tasks, best)

    rng = np.random.default_rng(0)
    cv: dict[tuple, list[float]] = {f: [] for f in FAMILIES}
    for _ in range(a.halvings):
        half = np.zeros(len(tv), dtype=bool)
        for x in tasks:
            ids = np.flatnonzero(tv == x)
            half[rng.choice(ids, len(ids) // 2, replace=False)] = True
        for f in FAMILIES:
            cv[f].append((mean(hv, tv, choose(*f, half), ~half)
                          + mean(hv, tv, choose(*f, ~half), half)) / 2)
    every = np.ones(len(tv), dtype=bool)
    print(f"{a.run_dir} ({a.lists} lists): held-out validation HR@10 (mean ± sd over "
          f"{a.halvings} halvings), test HR@10 at the whole-validation choice")
    for f in FAMILIES:
        sel = choose(*f, every)
        print(f"  {f[0]:9s} {'per task' if f[1] else 'one    '}  valid {np.mean(cv[f]):.4f} ± "
              f"{np.std(cv[f]):.4f}   test {mean(ht, tt, sel, np.ones(len(tt), dtype=bool)):.4f}")


if __name__ == "__main__":
    main()
