"""Interactions that arrived after training (written by the nearline job), as serving reads them.

Layout: ``<run>/serving/events/<seq:08d>.parquet``, one file per ingested batch, published by
rename, so a reader sees whole batches only. Columns: ``user_idx`` (int64), ``item_idx`` (int64,
may index an item added by ``sigma items add``), ``timestamp`` (datetime64[ns]), ``basket``
(int64, increasing within a user after that user's last training-data basket).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

EVENT_COLUMNS = ("user_idx", "item_idx", "timestamp", "basket")


def events_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "serving" / "events"


def load_events(run_dir: Path) -> pd.DataFrame:
    """Every published event batch, in publication order (empty frame when there are none)."""
    files = sorted(events_dir(run_dir).glob("[0-9]*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype="datetime64[ns]" if c == "timestamp" else
                                          "int64") for c in EVENT_COLUMNS})
    return pd.concat([pd.read_parquet(f, columns=list(EVENT_COLUMNS)) for f in files],
                     ignore_index=True)
