"""Compare two run directories' rankings and metrics, exactly.

    python scripts/compare_runs.py RUN_A RUN_B [--tolerance 0]

Reads every rankings parquet under ``generation/``, ``gr_baselines/`` and ``baselines/``
(``**/rankings/*.parquet``) and ``evaluation/metrics*.json`` of both runs and prints each file
that is missing from one side or differs (the first differing rows or keys). A behaviour-
preserving change (a refactor) must leave them identical: the default tolerance is 0 (pandas
equality, bit for bit). Exits 0 when every file matches, 1 when any differs, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RANKING_DIRS = ("generation", "gr_baselines", "baselines")


def ranking_files(run: Path) -> list[str]:
    """The run's rankings parquet files, relative to the run directory."""
    out = []
    for top in RANKING_DIRS:
        out += [str(p.relative_to(run)) for p in sorted((run / top).glob("**/rankings/*.parquet"))]
        out += [str(p.relative_to(run)) for p in sorted((run / top).glob("rankings/*.parquet"))]
    return sorted(set(out))


def metric_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in (run / "evaluation").glob("metrics*.json"))


def _cell_equal(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        if a.dtype.kind == "f":
            return bool(np.allclose(a, b, rtol=0, atol=tol, equal_nan=True)) if tol else \
                bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= tol if tol else a == b
    return bool(a == b)


def _short(value: Any, width: int = 120) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= width else text[:width] + "..."


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, tol: float) -> list[str]:
    """Differences between two rankings tables (empty when equal)."""
    if list(a.columns) != list(b.columns):
        return [f"columns differ: {list(a.columns)} vs {list(b.columns)}"]
    if len(a) != len(b):
        return [f"{len(a)} rows vs {len(b)}"]
    if list(a.dtypes) != list(b.dtypes):
        return [f"dtypes differ: {list(a.dtypes)} vs {list(b.dtypes)}"]
    out = []
    for col in a.columns:
        bad = [i for i, (x, y) in enumerate(zip(a[col], b[col], strict=True))
               if not _cell_equal(x, y, tol)]
        if bad:
            out.append(f"column {col!r}: {len(bad)} of {len(a)} rows differ (first: row "
                       f"{bad[0]}: {_short(a[col].iloc[bad[0]])} vs {_short(b[col].iloc[bad[0]])})")
    return out


def compare_json(a: Any, b: Any, tol: float, path: str = "") -> list[str]:
    """Differences between two JSON values, by key path (empty when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in the first" for k in sorted(set(a) - set(b))]
        out += [f"{path}/{k}: only in the second" for k in sorted(set(b) - set(a))]
        for k in sorted(set(a) & set(b)):
            out += compare_json(a[k], b[k], tol, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in compare_json(x, y, tol, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return [] if _cell_equal(float(a), float(b), tol) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def compare_runs(run_a: Path, run_b: Path, tol: float = 0.0) -> dict[str, list[str]]:
    """{file: differences} for every compared file that differs or is missing on one side."""
    out: dict[str, list[str]] = {}
    for kind, lister in (("rankings", ranking_files), ("metrics", metric_files)):
        fa, fb = set(lister(run_a)), set(lister(run_b))
        if not fa and not fb:
            out[f"<{kind}>"] = ["no files in either run"]
        for f in sorted(fa - fb):
            out[f] = [f"only in {run_a}"]
        for f in sorted(fb - fa):
            out[f] = [f"only in {run_b}"]
        for f in sorted(fa & fb):
            if kind == "rankings":
                diff = compare_frames(pd.read_parquet(run_a / f), pd.read_parquet(run_b / f), tol)
            else:
                diff = compare_json(json.loads((run_a / f).read_text()),
                                    json.loads((run_b / f).read_text()), tol)
            if diff:
                out[f] = diff
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="largest absolute difference of a float that still counts as equal "
                    "(default 0: exact)")
    args = ap.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            print(f"error: {run}: no such run directory", file=sys.stderr)
            return 2
    n = len(ranking_files(args.run_a)) + len(metric_files(args.run_a))
    diffs = compare_runs(args.run_a, args.run_b, args.tolerance)
    for f, lines in diffs.items():
        print(f"DIFFERS {f}")
        for line in lines[:10]:
            print(f"    {line}")
        if len(lines) > 10:
            print(f"    ... {len(lines) - 10} more")
    if diffs:
        print(f"{len(diffs)} file(s) differ")
        return 1
    print(f"identical: {n} files (rankings and metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
