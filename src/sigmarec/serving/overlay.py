"""Items added after training, applied to what serving loads (the other half of
:mod:`sigmarec.serving.items`, which computes and publishes them).

:func:`apply_overlay` extends the run's parts before a model is built (item features, prefixes,
item table: :class:`RuntimeParts`, the serving runtime's contract), and :func:`extend_model` /
:func:`extend_decoder` / :func:`add_to_loaded` extend an already loaded model and its prefix index
in place, so the new items are recommendable at once. Nothing trainable changes: new items get
soft tokens through the trained ProjFuse like every other item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from sigmarec.data.processed import ProcessedData
from sigmarec.serving.catalog import CatalogError, CatalogOverlay
from sigmarec.tokenization.hybrid import flat_to_codes

if TYPE_CHECKING:
    from sigmarec.generation.decode import SigmaDecoder
    from sigmarec.model.sigma import SigmaModel

# Per-item buffers of SigmaModel that extend_model knows how to grow; any other buffer with one
# row per item means the model changed and extend_model must learn it (it refuses, loudly).
_ITEM_BUFFERS = ("item_prefix", "item_codes", "item_rarity")


@dataclass
class RuntimeParts:
    """What a run directory provides before the model is built (``apply_overlay`` extends it)."""

    data: ProcessedData
    item_features: dict[str, np.ndarray]  # "text", optionally "id": (n_items, d)
    item_prefix: np.ndarray  # (n_items,) flat prefix id
    n_trained_items: int


def overlay_features(overlay: CatalogOverlay, sources: list[str] | tuple[str, ...]
                     ) -> dict[str, np.ndarray]:
    """The overlay's rows of each model feature source."""
    have = {"text": overlay.v_text, "id": overlay.id_vectors}
    missing = [s for s in sources if s not in have]
    if missing:
        raise CatalogError(f"catalogue {overlay.version}: the model reads {missing} features, "
                           "which added items do not have")
    return {s: have[s] for s in sources}


def apply_overlay(parts: RuntimeParts, overlay: CatalogOverlay | None) -> RuntimeParts:
    """The runtime's parts with the overlay's items appended: item features, prefixes and the
    item table; ``parts`` is not changed."""
    if overlay is None or overlay.n_items == 0:
        return parts
    n = parts.n_trained_items
    if overlay.n_base != n or parts.data.n_items != n or len(parts.item_prefix) != n:
        raise CatalogError(f"catalogue {overlay.version} extends a catalogue of "
                           f"{overlay.n_base} items; this run has {n} trained items")
    feats = overlay_features(overlay, sorted(parts.item_features))
    for s, f in feats.items():
        if f.shape[1] != parts.item_features[s].shape[1]:
            raise CatalogError(f"catalogue {overlay.version}: {s} features of width "
                               f"{f.shape[1]}, the run's have {parts.item_features[s].shape[1]}")
    return dataclasses.replace(
        parts,
        data=extend_items(parts.data, overlay),
        item_features={s: np.concatenate([parts.item_features[s], feats[s]])
                       for s in parts.item_features},
        item_prefix=np.concatenate([parts.item_prefix, overlay.prefix.astype(np.int64)]),
    )


def extend_items(data: ProcessedData, overlay: CatalogOverlay) -> ProcessedData:
    """``data`` with the overlay's items not yet in its item table appended (a new object:
    cached per-item arrays such as ``train_item_counts`` are recomputed at the new size)."""
    start = data.n_items - overlay.n_base
    if start < 0 or start > overlay.n_items:
        raise CatalogError(f"catalogue {overlay.version}: the item table has {data.n_items} "
                           f"items, the overlay covers {overlay.n_base}.."
                           f"{overlay.n_base + overlay.n_items}")
    if start == overlay.n_items:
        return data
    new = overlay.items.iloc[start:]
    items = pd.concat([data.items, new[[c for c in new.columns if c in data.items.columns]]],
                      ignore_index=True)
    return dataclasses.replace(data, items=items)


def load_model_with_items(model_dir: Path, backbone_cfg: Any, parts: RuntimeParts
                          ) -> SigmaModel:
    """``load_sigma_model`` for parts that hold added items: the checkpoint is checked against
    the trained catalogue, then the model is extended by the added rows."""
    from sigmarec.model.sigma import load_sigma_model

    n = parts.n_trained_items
    model = load_sigma_model(model_dir, backbone_cfg,
                             {s: f[:n] for s, f in parts.item_features.items()},
                             parts.item_prefix[:n])
    if len(parts.item_prefix) > n:
        extend_model(model, {s: f[n:] for s, f in parts.item_features.items()},
                     parts.item_prefix[n:])
    return model


@torch.no_grad()
def extend_model(model: SigmaModel, features: Mapping[str, np.ndarray],
                 prefix: np.ndarray) -> np.ndarray:
    """Append items to a loaded SigmaModel in place (its frozen feature buffers and prefixes);
    returns their item indices. Their soft tokens then come from the trained ProjFuse like
    every other item's. Nothing trainable changes."""
    prefix = np.asarray(prefix, dtype=np.int64)
    n_old, n_new = model.n_items, len(prefix)
    if set(features) != set(model.sources):
        raise CatalogError(f"new items have features {sorted(features)}, the model reads "
                           f"{model.sources}")
    if len(prefix) and (prefix.min() < 0 or prefix.max() >= model.n_prefixes):
        raise CatalogError(f"new item prefixes must lie in 0..{model.n_prefixes - 1}")
    known = {f"feat_{s}" for s in model.sources} | set(_ITEM_BUFFERS)
    unknown = [name for name, b in model.named_buffers(recurse=False)
               if b.ndim and b.shape[0] == n_old and name not in known
               and name not in ("token_row", "prefix_ids_t")]
    if unknown:
        raise CatalogError(f"SigmaModel has per-item buffers {unknown} that "
                           "sigmarec.serving.overlay.extend_model does not extend")
    for s in model.sources:
        buf = getattr(model, f"feat_{s}")
        add = torch.as_tensor(np.asarray(features[s]), dtype=buf.dtype, device=buf.device)
        if add.shape != (n_new, buf.shape[1]):
            raise CatalogError(f"{s} features of new items: shape {tuple(add.shape)}, expected "
                               f"({n_new}, {buf.shape[1]})")
        setattr(model, f"feat_{s}", torch.cat([buf, add]))
    dev = model.item_prefix.device
    p = torch.as_tensor(prefix, device=dev)
    model.item_prefix = torch.cat([model.item_prefix, p])
    if hasattr(model, "item_codes"):
        model.item_codes = torch.cat([model.item_codes, flat_to_codes(p, model.codebook_sizes)])
    # Never bought in training: the rarest (the rarity channel's value of an unsold item).
    model.item_rarity = torch.cat([model.item_rarity,
                                   torch.ones(n_new, dtype=model.item_rarity.dtype, device=dev)])
    model.n_items = n_old + n_new
    return np.arange(n_old, n_old + n_new)


def extend_decoder(decoder: SigmaDecoder) -> int:
    """Add the model's items that the decoder's prefix index does not hold yet (after
    :func:`extend_model`); returns how many were added."""
    model = decoder.model
    have = decoder.index.n_items
    if have > model.n_items:
        raise CatalogError(f"the prefix index holds {have} items, the model {model.n_items}")
    if have < model.n_items:
        idx = np.arange(have, model.n_items)
        vecs = model.item_vectors(idx).cpu().numpy().astype(np.float32)
        decoder.index.add_items(vecs, model.item_prefix[have:].cpu().numpy())
    decoder.item_prefix = model.item_prefix.cpu().numpy()
    decoder.collate = model.collator()
    return model.n_items - have


def add_to_loaded(overlay: CatalogOverlay, model: SigmaModel,
                  decoder: SigmaDecoder | None = None) -> np.ndarray:
    """Make the overlay's items that a loaded model (and decoder) lack recommendable now."""
    start = model.n_items - overlay.n_base
    if start < 0 or start > overlay.n_items:
        raise CatalogError(f"catalogue {overlay.version} covers items {overlay.n_base}.."
                           f"{overlay.n_base + overlay.n_items}; the model has {model.n_items}")
    feats = overlay_features(overlay, model.sources)
    ids = extend_model(model, {s: f[start:] for s, f in feats.items()}, overlay.prefix[start:])
    if decoder is not None:
        extend_decoder(decoder)
    return ids
