"""Items added after training (``sigma items add``), as serving reads them.

Layout: ``<run>/serving/catalog/CURRENT`` holds the name of the published version folder
(``v000001``, ...); each version folder is complete on its own (every item added so far) and is
written under a temporary name and renamed, then ``CURRENT`` is replaced atomically. A reader
that follows ``CURRENT`` therefore never sees a half-added batch, and a writer killed at any
point leaves the previous version published (a folder renamed but never pointed to is garbage
that the next ``items add`` skips over).

Version folder: ``items.parquet`` (the data stage's item columns; ``item_idx`` continues after the
trained catalogue), ``arrays.npz`` with ``v_text`` (n, d: the text features the model was trained
on, grounded unless the run ablated grounding), ``codes`` (n, levels: the semantic ID),
``prefix`` (n,: the flat prefix id), ``id_vectors`` (n, d_id: the documented stand-in for the
missing ID-tower vector; width 0 when the run has no ID tower), ``item_vectors`` (n, hidden:
the normalised soft token ṽ = ProjFuse(v_ID, v_text) of the trained model), and ``meta.json``
(the trained catalogue size, the run ids of the stages the overlay was computed from, the
stand-in used).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.core.atomic import atomic_path
from sigmarec.core.stage import read_manifest
from sigmarec.errors import SigmaError

ARRAYS = ("v_text", "codes", "prefix", "id_vectors", "item_vectors")
# The stages whose artifacts an overlay was computed from: any rerun of one invalidates it.
SOURCE_STAGES = ("data", "baselines", "grounding", "tokenization", "training")


class CatalogError(SigmaError):
    """The published catalogue overlay cannot be used with this run directory."""


@dataclass(frozen=True)
class CatalogOverlay:
    version: str
    items: pd.DataFrame
    v_text: np.ndarray
    codes: np.ndarray
    prefix: np.ndarray
    id_vectors: np.ndarray
    item_vectors: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_base(self) -> int:
        """Size of the trained catalogue: the first added item has this ``item_idx``."""
        return int(self.meta["n_base"])


def catalog_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "serving" / "catalog"


def current_version(run_dir: Path) -> str | None:
    current = catalog_dir(run_dir) / "CURRENT"
    return current.read_text().strip() if current.is_file() else None


def stage_run_ids(run_dir: Path) -> dict[str, str | None]:
    out = {}
    for stage in SOURCE_STAGES:
        m = read_manifest(Path(run_dir) / stage)
        out[stage] = None if m is None else m.get("run_id")
    return out


def load_overlay(run_dir: Path, check: bool = True) -> CatalogOverlay | None:
    """The published overlay, or None when no item was ever added.

    With ``check`` (the default) an overlay computed from stage results that have since been
    recomputed (a retrained model, new semantic IDs) is refused with a :class:`CatalogError`:
    its prefixes and soft tokens would belong to another model.
    """
    version = current_version(run_dir)
    if version is None:
        return None
    folder = catalog_dir(run_dir) / version
    if not (folder / "meta.json").is_file():
        raise CatalogError(f"{folder}: published catalogue version is incomplete (no meta.json)")
    meta = json.loads((folder / "meta.json").read_text())
    items = pd.read_parquet(folder / "items.parquet")
    with np.load(folder / "arrays.npz") as z:
        arrays = {k: z[k] for k in ARRAYS}
    if check:
        now = stage_run_ids(run_dir)
        changed = [s for s, rid in meta.get("stage_run_ids", {}).items() if now.get(s) != rid]
        if changed:
            raise CatalogError(
                f"{folder}: the added items were computed from stage results that have since been "
                f"recomputed ({', '.join(changed)}); add them again with `sigma items add`")
    return CatalogOverlay(version=version, items=items, meta=meta, **arrays)


def next_version(run_dir: Path) -> str:
    """A version name above every folder present, published or left behind by a crash."""
    root = catalog_dir(run_dir)
    taken = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    return f"v{max(taken, default=0) + 1:06d}"


def write_version(folder: Path, overlay: CatalogOverlay) -> None:
    """Write a complete version folder (the caller renames it into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    overlay.items.to_parquet(folder / "items.parquet", index=False)
    with open(folder / "arrays.npz", "wb") as fh:
        np.savez(fh, **{k: getattr(overlay, k) for k in ARRAYS})
    (folder / "meta.json").write_text(json.dumps(overlay.meta, indent=2, sort_keys=True) + "\n")
    for p in folder.iterdir():
        _fsync(p)
    _fsync(folder)


def publish(run_dir: Path, version: str) -> None:
    """Point ``CURRENT`` at ``version`` in one atomic rename."""
    root = catalog_dir(run_dir)
    if not (root / version / "meta.json").is_file():
        raise CatalogError(f"{root / version}: cannot publish an incomplete version")
    with atomic_path(root / "CURRENT") as tmp:
        tmp.write_text(version + "\n")
        tmp.chmod(0o644)
        _fsync(tmp)
    _fsync(root)


def _fsync(path: Path) -> None:
    # kill -9 cannot lose written data (the page cache survives the process); fsync makes the
    # rename order hold across a power loss too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
