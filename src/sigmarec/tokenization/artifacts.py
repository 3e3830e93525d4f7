"""The tokenization stage's vocabulary artifacts, written and read here only.

``vocab.json`` (the new tokens, the prefix levels' codebook sizes, the query token and the text
space that was quantised) and ``item_prefix.npy`` (each item's flat prefix id).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sigmarec.core.atomic import write_json
from sigmarec.errors import StageError
from sigmarec.tokenization.hybrid import HybridVocab

VOCAB_FILE = "vocab.json"
PREFIX_FILE = "item_prefix.npy"


def write_vocab(folder: Path, vocab: HybridVocab, item_prefix: np.ndarray, embedding: str
                ) -> None:
    """Write ``vocab.json`` and ``item_prefix.npy`` into a tokenization stage folder."""
    np.save(Path(folder) / PREFIX_FILE, item_prefix)
    write_json(Path(folder) / VOCAB_FILE, {
        "tokens": vocab.tokens,
        "prefix_codebook_sizes": vocab.codebook_sizes,
        "query_token": vocab.query_token,
        "embedding": embedding,
    })


def load_vocab(folder: Path) -> tuple[HybridVocab, np.ndarray]:
    """The hybrid vocabulary and the items' flat prefix ids of a tokenization stage folder."""
    import json

    folder = Path(folder)
    vpath, ppath = folder / VOCAB_FILE, folder / PREFIX_FILE
    missing = [p.name for p in (vpath, ppath) if not p.is_file()]
    if missing:
        raise StageError(f"{folder}: tokenization artifacts missing {missing}; rerun tokenization")
    meta = json.loads(vpath.read_text())
    vocab = HybridVocab(codebook_sizes=meta["prefix_codebook_sizes"],
                        query_token=meta["query_token"])
    return vocab, np.load(ppath)
