"""Shared fixtures: a small synthetic dataset in the common schema with known structure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sigmarec.data.schema import Dataset


def make_dataset(n_users: int = 30, n_items: int = 40, baskets_per_user: int = 12,
                 seed: int = 0, start: str = "2017-01-01", days: int = 120) -> Dataset:
    """Users buy baskets of 1-4 items at random times over ``days`` days."""
    rng = np.random.default_rng(seed)
    cats = ["FOOD > SNACKS > CHIPS", "FOOD > DAIRY > MILK", "HOME > CLEANING > SOAP"]
    items = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n_items)],
        "title": [f"item {i}" for i in range(n_items)],
        "category_path": [cats[i % 3] for i in range(n_items)],
        "brand": ["National" if i % 2 else "Private" for i in range(n_items)],
        "attributes": [json.dumps({"size": f"{i} OZ"}) for i in range(n_items)],
    })
    rows = []
    t0 = pd.Timestamp(start)
    for u in range(n_users):
        times = np.sort(rng.uniform(0, days * 86400, size=baskets_per_user))
        for b, t in enumerate(times):
            for it in rng.choice(n_items, size=rng.integers(1, 5), replace=False):
                rows.append({"user_id": f"u{u}", "item_id": f"i{it}",
                             "timestamp": t0 + pd.Timedelta(seconds=float(t)),
                             "basket_id": f"u{u}b{b}", "quantity": 1.0, "event": "purchase"})
    inter = pd.DataFrame(rows)
    inter["timestamp"] = inter["timestamp"].astype("datetime64[ns]")
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)],
                          "age": ["25-34"] * n_users})
    return Dataset("synthetic", items, inter, users)


@pytest.fixture
def synthetic() -> Dataset:
    return make_dataset()


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A finished tiny-profile run up to generation (about 20 s), built once per test session
    for the serving tests: (config, run directory). Treat it as read-only; copy it
    (``shutil.copytree``) before anything writes into it."""
    from sigmarec.config import load_config
    from sigmarec.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = load_config("tiny")
    run_pipeline(cfg, run_dir, until="generation")
    return cfg, run_dir
