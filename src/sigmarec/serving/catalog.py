"""Items added after training (``sigma items add``), as serving reads them.

Layout: ``<run>/serving/catalog/CURRENT`` holds the name of the published version folder
(``v000001``, ...); each version folder is complete on its own (every item added so far) and is
written under a temporary name and renamed, then ``CURRENT`` is replaced atomically. A reader
that follows ``CURRENT`` therefore never sees a half-added batch.

Version folder: ``items.parquet`` (the data stage's item columns; ``item_idx`` continues after the
trained catalogue) and ``arrays.npz`` with ``v_text`` (n, d), ``codes`` (n, levels), ``prefix``
(n,), ``id_vectors`` (n, d_id, the documented stand-in for the missing ID-tower vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class CatalogOverlay:
    version: str
    items: pd.DataFrame
    v_text: np.ndarray
    codes: np.ndarray
    prefix: np.ndarray
    id_vectors: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.items)


def catalog_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "serving" / "catalog"


def load_overlay(run_dir: Path) -> CatalogOverlay | None:
    """The published overlay, or None when no item was ever added."""
    root = catalog_dir(run_dir)
    current = root / "CURRENT"
    if not current.is_file():
        return None
    version = current.read_text().strip()
    folder = root / version
    items = pd.read_parquet(folder / "items.parquet")
    with np.load(folder / "arrays.npz") as z:
        arrays = {k: z[k] for k in ("v_text", "codes", "prefix", "id_vectors")}
    return CatalogOverlay(version=version, items=items, **arrays)
