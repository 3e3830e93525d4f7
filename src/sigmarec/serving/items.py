"""New items without retraining (SIGMA part 2: a new item needs only its embeddings).

``sigma items add FILE`` computes, for each item of FILE, with the run's own artifacts and no
training:

* ``v_text``: the item text rendered with the run's ``grounding.text_template`` through the
  grounded text encoder (the backbone plus the grounding stage's LoRA/projection), exactly as the
  grounding stage encoded the catalogue (the untrained backbone's state when the run ablated
  grounding, ``tokenization.embedding: ungrounded``);
* its semantic ID: the nearest codebook entry level by level (``SemanticIds.encode``), no
  re-clustering, so no trained item's code moves; the prefix is its first level(s);
* a stand-in for the ID-tower vector it cannot have (``serving.items.id_stand_in``): by default
  the mean ID vector of its ``neighbours`` nearest trained items in the text space. Grounding's
  L_KD distilled the ID tower's similarities into that space, so an item's text neighbours are
  the items whose collaborative vectors it would most resemble, and their mean lies in the
  populated part of the ID space (a zero or random vector would not: ProjFuse never saw one);
* its soft token ``ṽ = ProjFuse(v_ID, v_text)`` with the trained ProjFuse weights.

The result is published as a new version of the catalogue overlay (:mod:`.catalog`: complete
folder renamed into place, then ``CURRENT`` swapped), so a reader sees all of a batch or none.
Applying it to what serving loads (and to a loaded model) is :mod:`.overlay`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sigmarec.config import ItemColumnMap, SigmaConfig
from sigmarec.data.build import render_item_text
from sigmarec.data.schema import ITEM_COLUMNS
from sigmarec.data.sources.files import read_items, read_table
from sigmarec.errors import DataError, StageError
from sigmarec.generation.run_model import model_dir, run_config
from sigmarec.grounding.artifacts import ID_TOWER_FILE, UNGROUNDED_FILE, text_features_file
from sigmarec.serving.catalog import (
    CatalogOverlay,
    catalog_dir,
    load_overlay,
    next_version,
    publish,
    stage_run_ids,
    write_version,
)
from sigmarec.serving.config import NewItemsConfig
from sigmarec.tokenization.artifacts import load_vocab
from sigmarec.tokenization.hybrid import ProjFuse
from sigmarec.tokenization.semantic_ids import SemanticIds

log = logging.getLogger("sigmarec")

# Test hook for the kill -9 tests: "<point>:<seconds>" sleeps at that point of a publication
# ("writing": half of the version folder written; "publish": folder renamed, CURRENT not yet).
PAUSE_ENV = "SIGMAREC_ITEMS_ADD_PAUSE"


# ------------------------------------------------------------------------------- reading


def read_new_items(path: Path, columns: ItemColumnMap) -> tuple[pd.DataFrame, str]:
    """The new items of ``path`` in the common item schema, validated.

    A file that already has the data layer's item columns (``item_id``, ``title``,
    ``category_path`` with levels joined by " > ", ``brand``, ``attributes`` as a JSON object,
    e.g. ``data/holdout/items.parquet``) is read as it is; any other file is mapped by
    ``columns`` (``data.files.item_columns``), as the files source reads a catalogue.
    """
    path = Path(path)
    raw = read_table(path, "new items")
    if set(ITEM_COLUMNS) <= set(raw.columns):
        items, src = _common_schema(raw, str(path)), str(path)
    else:
        items, src = read_items(path, columns)
    dup = items["item_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{src}: row {row}, column '{_id_column(raw, columns)}': duplicate item "
                        f"id (value {items['item_id'].iloc[row]!r})")
    return items.reset_index(drop=True), src


def _id_column(raw: pd.DataFrame, columns: ItemColumnMap) -> str:
    return "item_id" if set(ITEM_COLUMNS) <= set(raw.columns) else columns.item


def _common_schema(raw: pd.DataFrame, src: str) -> pd.DataFrame:
    def text(col: str, required: bool) -> pd.Series:
        s = raw[col].astype(object).where(raw[col].notna(), None)
        s = s.map(lambda v: None if v is None or str(v).strip() == "" else str(v).strip())
        if required and s.isna().any():
            row = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise DataError(f"{src}: row {row}, column '{col}': missing {col.replace('_', ' ')} "
                            f"(value {raw[col].iloc[row]!r})")
        return s

    ids = text("item_id", required=True).astype(str)
    attrs = []
    for row, v in enumerate(raw["attributes"]):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            attrs.append("{}")
            continue
        try:
            obj = json.loads(str(v))
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise DataError(f"{src}: row {row}, column 'attributes': not a JSON object "
                            f"(value {v!r})")
        attrs.append(json.dumps(obj, ensure_ascii=False))
    title = text("title", required=False)
    return pd.DataFrame({
        "item_id": ids,
        "title": title.where(title.notna(), ids).astype(str),
        "category_path": text("category_path", required=False).fillna("").astype(str),
        "brand": text("brand", required=False),
        "attributes": attrs,
    })


def check_new_ids(items: pd.DataFrame, src: str, trained: pd.Index,
                  added: pd.Index, column: str = "item_id") -> None:
    """Refuse ids the catalogue already holds (trained, or added by an earlier version)."""
    for known, where in ((trained, "the trained catalogue"), (added, "the added items")):
        clash = items["item_id"].isin(known).to_numpy()
        if clash.any():
            row = int(np.flatnonzero(clash)[0])
            raise DataError(f"{src}: row {row}, column '{column}': item already in {where} "
                            f"(value {items['item_id'].iloc[row]!r}); {int(clash.sum())} of "
                            f"{len(items)} ids clash")


# ------------------------------------------------------------------------------- the run


class ItemSpace:
    """What onboarding needs from a finished run, loaded once: the trained items' features,
    the codebooks, the hybrid vocabulary and the trained ProjFuse."""

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        self.cfg = run_config(run_dir)
        self.items = pd.read_parquet(run_dir / "data" / "items.parquet")
        self.text_file = text_features_file(self.cfg.tokenization.embedding)
        self.text = np.load(run_dir / "grounding" / self.text_file).astype(np.float32)
        id_path = run_dir / "baselines" / ID_TOWER_FILE
        self.ids = np.load(id_path).astype(np.float32) if id_path.is_file() else None
        self.sids = SemanticIds.load(run_dir / "tokenization")
        self.vocab, self.item_prefix = load_vocab(run_dir / "tokenization")
        n = len(self.items)
        for name, arr in (("text features", self.text), ("item prefixes", self.item_prefix),
                          ("ID tower", self.ids)):
            if arr is not None and len(arr) != n:
                raise StageError(f"{run_dir}: {name} have {len(arr)} rows for {n} items; the "
                                 "run's stages are out of step (rerun `sigma run`)")
        self.fuse = _load_fuse(model_dir(run_dir))
        if set(self.fuse.sources) != ({"text", "id"} if self.ids is not None else {"text"}):
            raise StageError(f"{run_dir}: the trained ProjFuse reads {self.fuse.sources}; new "
                             "items can supply text and ID-tower stand-in vectors only")

    @property
    def n_items(self) -> int:
        return len(self.items)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """``v_text`` of new item texts, as the grounding stage encoded the catalogue."""
        from sigmarec.backbone.loading import load_backbone
        from sigmarec.grounding.encoder import ItemEncoder, raw_backbone_embeddings

        g = self.cfg.grounding
        backbone, tokenizer, _ = load_backbone(self.cfg.backbone)
        with torch.no_grad():
            if self.text_file == UNGROUNDED_FILE:
                return raw_backbone_embeddings(backbone, tokenizer, texts, g.max_text_tokens,
                                               g.encode_batch_size)
            encoder = ItemEncoder(backbone, tokenizer, g)
            state = torch.load(self.run_dir / "grounding" / "encoder" / "encoder_trainable.pt",
                               map_location="cpu")
            encoder.load_trainable_state(state)
            return encoder.encode(texts)

    def id_stand_in(self, v_text: np.ndarray, prefix: np.ndarray,
                    cfg: NewItemsConfig) -> np.ndarray:
        """The documented stand-in for the ID-tower vector of items never trained on."""
        if self.ids is None:
            return np.zeros((len(v_text), 0), dtype=np.float32)
        return id_stand_in(cfg, v_text, prefix, self.text, self.ids, self.item_prefix)

    @torch.no_grad()
    def fused(self, v_text: np.ndarray, id_vectors: np.ndarray) -> np.ndarray:
        """Normalised ṽ of items from their features, through the trained ProjFuse."""
        feats = {"text": torch.as_tensor(v_text, dtype=torch.float32)}
        if "id" in self.fuse.sources:
            feats["id"] = torch.as_tensor(id_vectors, dtype=torch.float32)
        v = self.fuse(feats)
        return torch.nn.functional.normalize(v.float(), dim=-1).numpy().astype(np.float32)


def id_stand_in(cfg: NewItemsConfig, v_text: np.ndarray, prefix: np.ndarray,
                ref_text: np.ndarray, ref_ids: np.ndarray, ref_prefix: np.ndarray
                ) -> np.ndarray:
    """Stand-in ID vectors of items from their text features and prefixes, given reference
    (trained) items' text features, ID vectors and prefixes; see ``NewItemsConfig``."""
    if cfg.id_stand_in == "text_neighbours":
        k = min(cfg.neighbours, len(ref_text))
        sims = _normalise(v_text) @ _normalise(ref_text).T
        nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        return ref_ids[nn_idx].mean(axis=1).astype(np.float32)
    if cfg.id_stand_in == "prefix_mean":
        out = np.empty((len(v_text), ref_ids.shape[1]), dtype=np.float32)
        overall = ref_ids.mean(axis=0)
        for i, p in enumerate(prefix):
            members = ref_prefix == p
            out[i] = ref_ids[members].mean(axis=0) if members.any() else overall
        return out
    x = np.hstack([ref_text, np.ones((len(ref_text), 1), dtype=np.float32)]).astype(np.float64)
    reg = cfg.ridge_alpha * np.eye(x.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    w = np.linalg.solve(x.T @ x + reg, x.T @ ref_ids.astype(np.float64))
    xn = np.hstack([v_text, np.ones((len(v_text), 1), dtype=np.float32)])
    return (xn @ w).astype(np.float32)


def stand_in_fidelity(space: ItemSpace, cfg: NewItemsConfig, n: int = 1000,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """How close each stand-in comes to the real ID vector, measured on trained items treated
    as new (a seeded sample, left out of the reference set): mean cosine to the item's SASRec
    vector, raw and centred (both minus the catalogue's mean ID vector, so only what is specific
    to the item counts; the mean itself scores 0 there). "overall mean" is that mean vector."""
    if space.ids is None:
        return {}
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(space.n_items, min(n, space.n_items // 2), replace=False))
    rest = np.setdiff1d(np.arange(space.n_items), held)
    ref = (space.text[rest], space.ids[rest], space.item_prefix[rest])
    mean = space.ids[rest].mean(axis=0, keepdims=True)
    truth = space.ids[held]

    def score(v: np.ndarray) -> dict[str, float]:
        raw = (_normalise(v) * _normalise(truth)).sum(1).mean()
        centred = (_normalise(v - mean + 1e-12) * _normalise(truth - mean)).sum(1).mean()
        return {"cosine": round(float(raw), 4), "centred cosine": round(float(centred), 4)}

    out = {mode: score(id_stand_in(cfg.model_copy(update={"id_stand_in": mode}),
                                   space.text[held], space.item_prefix[held], *ref))
           for mode in ("text_neighbours", "prefix_mean", "ridge")}
    out["overall mean"] = {"cosine": score(np.repeat(mean, len(held), 0))["cosine"],
                           "centred cosine": 0.0}
    return out


def _load_fuse(model_dir: Path) -> ProjFuse:
    """The trained ProjFuse alone (no backbone): its weights are part of the SFT checkpoint."""
    from safetensors.torch import load_file

    from sigmarec.model.sigma import META_FILE, WEIGHTS_FILE

    meta = json.loads((model_dir / META_FILE).read_text())
    state = load_file(str(model_dir / WEIGHTS_FILE))
    fuse_state = {k[len("fuse."):]: v for k, v in state.items() if k.startswith("fuse.")}
    if not fuse_state:
        raise StageError(f"{model_dir}: the checkpoint holds no ProjFuse weights")
    fuse = ProjFuse({s: int(d) for s, d in meta["feature_dims"].items()}, int(meta["hidden"]),
                    target_norm=1.0)  # the trained scale is in the state
    fuse.load_state_dict(fuse_state)
    return fuse.eval()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------- onboarding


def compute_overlay(space: ItemSpace, items: pd.DataFrame, cfg: NewItemsConfig,
                    previous: CatalogOverlay | None, run_ids: Mapping[str, str | None]
                    ) -> CatalogOverlay:
    """The next overlay: ``previous`` plus ``items`` (common schema), every array computed."""
    from sigmarec.grounding.stage import render_texts

    items = items.copy()
    start = space.n_items + (previous.n_items if previous is not None else 0)
    items.insert(0, "item_idx", np.arange(start, start + len(items), dtype=np.int64))
    items["text"] = items.apply(render_item_text, axis=1)
    texts = list(render_texts(items, space.cfg.grounding.text_template))
    t0 = time.perf_counter()
    v_text = space.encode_texts(texts)
    if v_text.shape[1] != space.text.shape[1]:
        raise StageError(f"new items encode to width {v_text.shape[1]}, the run's text features "
                         f"have {space.text.shape[1]}; the encoder does not match the run")
    codes = space.sids.encode(v_text)
    prefix = space.vocab.prefix_ids(codes)
    id_vectors = space.id_stand_in(v_text, prefix, cfg)
    item_vectors = space.fused(v_text, id_vectors)
    log.info("items add: %d items encoded, coded and fused in %.1fs", len(items),
             time.perf_counter() - t0)
    meta = {"n_base": space.n_items, "stage_run_ids": dict(run_ids),
            "id_stand_in": cfg.model_dump(mode="json"), "text_features": space.text_file,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    new = {"v_text": v_text, "codes": codes.astype(np.int32), "prefix": prefix.astype(np.int64),
           "id_vectors": id_vectors, "item_vectors": item_vectors}
    if previous is not None:
        meta["batches"] = [*previous.meta.get("batches", []), len(items)]
        items = pd.concat([previous.items, items], ignore_index=True)
        new = {k: np.concatenate([getattr(previous, k), v]) for k, v in new.items()}
    else:
        meta["batches"] = [len(items)]
    return CatalogOverlay(version="", items=items, meta=meta, **new)


def add_items(run_dir: Path, cfg: SigmaConfig, items_file: Path) -> CatalogOverlay:
    """``sigma items add``: validate, compute and publish; returns the published overlay."""
    run_dir = Path(run_dir)
    space = ItemSpace(run_dir)
    items, src = read_new_items(items_file, cfg.data.files.item_columns)
    return add_frame(run_dir, space, items, src, cfg.serving.items)


def add_frame(run_dir: Path, space: ItemSpace, items: pd.DataFrame, src: str,
              cfg: NewItemsConfig) -> CatalogOverlay:
    """Onboard ``items`` (common item schema) into ``run_dir``'s catalogue overlay."""
    run_ids = stage_run_ids(run_dir)
    previous = load_overlay(run_dir, check=False)
    if previous is not None and previous.meta.get("stage_run_ids") != run_ids:
        # The run was recomputed since: the items added before are re-derived with it.
        log.info("items add: the run changed since %s; its %d added items are computed again",
                 previous.version, previous.n_items)
        base_cols = [c for c in previous.items.columns if c not in ("item_idx", "text")]
        items = pd.concat([previous.items[base_cols], items], ignore_index=True)
        previous = None
    added = pd.Index(previous.items["item_id"].astype(str)) if previous is not None else \
        pd.Index([])
    check_new_ids(items, src, pd.Index(space.items["item_id"].astype(str)), added)
    overlay = compute_overlay(space, items, cfg, previous, run_ids)
    return publish_overlay(run_dir, overlay)


def publish_overlay(run_dir: Path, overlay: CatalogOverlay) -> CatalogOverlay:
    """Write the overlay as a new version folder and point ``CURRENT`` at it."""
    root = catalog_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".v*.tmp"):  # left by a writer killed mid-way
        _rmtree(stale)
    version = next_version(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the published version from other readers
    try:
        write_version(tmp, overlay)
        _pause("writing")
        os.replace(tmp, root / version)
    finally:
        if tmp.exists():
            _rmtree(tmp)
    _pause("publish")
    publish(run_dir, version)
    log.info("items add: published catalogue %s (%d added items)", version, overlay.n_items)
    return dataclasses.replace(overlay, version=version)


def _pause(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec.partition(":")[0] == point:
        print(f"items add: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(float(spec.partition(":")[2] or 60))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
