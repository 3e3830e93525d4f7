"""The grounding stage's item text features, named and read here only.

``v_text.npy`` (the grounded text space) and ``v_text_ungrounded.npy`` (the untrained backbone's
pooled states, the ``ungrounded`` ablation's space); with the baselines stage's ID tower
(``item_embeddings.npy``, absent without SASRec) they are the frozen item features ProjFuse reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("sigmarec")

# tokenization.embedding -> the text-feature file of that space
TEXT_FEATURE_FILES = {"grounded": "v_text.npy", "ungrounded": "v_text_ungrounded.npy"}
UNGROUNDED_FILE = TEXT_FEATURE_FILES["ungrounded"]
ID_TOWER_FILE = "item_embeddings.npy"  # written by the baselines stage


def text_features_file(embedding: str) -> str:
    """The file name of the text space ``tokenization.embedding`` names."""
    return TEXT_FEATURE_FILES["grounded" if embedding == "grounded" else "ungrounded"]


def load_item_features(grounding_dir: Path, baselines_dir: Path, embedding: str
                       ) -> dict[str, np.ndarray]:
    """Frozen item features for ProjFuse: the SASRec ID tower and the text space that the
    tokenizer quantised (``embedding``: grounded, or ungrounded for the ablation)."""
    feats = {"text": np.load(Path(grounding_dir) / text_features_file(embedding))}
    id_path = Path(baselines_dir) / ID_TOWER_FILE
    if id_path.is_file():
        feats["id"] = np.load(id_path)
    else:
        log.info("training: no ID tower (%s); ProjFuse uses text embeddings only", id_path)
    return feats
