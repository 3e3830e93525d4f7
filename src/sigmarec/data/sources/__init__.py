"""Readers that turn each supported source into the common schema (``data.schema.Dataset``)."""

from __future__ import annotations

import importlib

from sigmarec.config import DataConfig
from sigmarec.data.schema import Dataset, validate
from sigmarec.errors import DataError

# source name -> module with ``load(cfg: DataConfig) -> Dataset``; imported only when chosen.
SOURCES = {
    "completejourney": "sigmarec.data.sources.completejourney",
    "ml100k": "sigmarec.data.sources.movielens",
    "files": "sigmarec.data.sources.files",
    "amazon": "sigmarec.data.sources.amazon",
    "sequences": "sigmarec.data.sources.sequences",
}


def load_source(cfg: DataConfig) -> Dataset:
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    return validate(importlib.import_module(SOURCES[cfg.source]).load(cfg))
