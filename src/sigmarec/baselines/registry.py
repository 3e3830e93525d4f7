"""Baseline name (as in ``baselines.enabled``) -> its ``Recommender`` class."""

from __future__ import annotations

from sigmarec.baselines.base import Recommender
from sigmarec.baselines.cooccurrence import Cooccurrence
from sigmarec.baselines.popularity import MostPop
from sigmarec.baselines.repurchase import Repurchase
from sigmarec.baselines.sasrec import SASRecBCE, SASRecCE
from sigmarec.config import SigmaConfig
from sigmarec.errors import ConfigError

REGISTRY: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (MostPop, Repurchase, Cooccurrence, SASRecBCE, SASRecCE)
}
SASREC_NAMES = ("sasrec_bce", "sasrec_ce")


def create(name: str, config: SigmaConfig) -> Recommender:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(REGISTRY)}") from None
    return cls.from_config(config)
