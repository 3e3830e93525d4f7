"""Locate data files shipped inside installed packages without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sigmarec.errors import DataError


def package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package {pip_name!r} is not installed; install it with "
            f"`pip install {extra}{pip_name}` (scripts/bootstrap.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
