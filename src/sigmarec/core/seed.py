"""One place that seeds every random number generator a stage may use."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return np.random.default_rng(seed)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        try:
            import faiss

            faiss.omp_set_num_threads(n)
        except ImportError:
            pass
